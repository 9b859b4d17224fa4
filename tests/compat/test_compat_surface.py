"""The rest of pg_durable's surface on pgflow, in this project's own words: HTTP steps through the allow-list
and an operator's resolver override (a local server stands in for the public hosts: nothing leaves
127.0.0.1), multipart uploads, binary bodies, the HTTP right checked when each step runs, DSL-time checks,
and the df.instances / df.nodes writes and grants pg_durable's users make."""

from __future__ import annotations

import base64
import json
import uuid

import httpx
import psycopg
import pytest
import test_pg_durable_compat as compat
from conftest import run_sql, wait_until
from fake_hosts import serve
from test_pg_durable_compat import Session, start

from pgflow import settings
from pgflow.engine.runners import http

df_dsn, df_user, user, admin = compat.df_dsn, compat.df_user, compat.user, compat.admin  # the same fixtures
TEST_HOSTS = "httpbingo.org,api.github.com,*.blob.core.windows.net"


@pytest.fixture
def fake_port():
    server = serve()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def http_engine(df_dsn, engine_factory, fake_port):
    """Workers whose HTTP steps may reach the test hosts only, the echo host being the local fake server;
    every other name is unresolvable without a DNS query."""
    return engine_factory(PGFLOW_HTTP_ALLOW=TEST_HOSTS,
                          PGFLOW_HTTP_RESOLVE=f"httpbingo.org=http://127.0.0.1:{fake_port},*=none").start(concurrency=2)


def node_result(session: Session, iid: str, node_type: str = "HTTP") -> str:
    return session.one("SELECT result::text FROM df.nodes WHERE instance_id = %s AND node_type = %s", (iid, node_type))


def test_a_mapped_name_reaches_the_local_server_and_others_stay_outside(user, http_engine):
    iid = start(user, "df.http('https://httpbingo.org/get?source=test', 'GET')")
    assert user.finish(iid) == "completed"
    envelope = json.loads(node_result(user, iid))
    assert envelope["status"] == 200 and envelope["encoding"] == "text"
    assert envelope["json"]["args"] == {"source": ["test"]}
    assert envelope["json"]["headers"]["Host"] == ["httpbingo.org"]  # the original name, not the address
    blocked = start(user, "df.http('https://example.com/x', 'GET')")
    assert user.finish(blocked) == "failed"
    assert "not in the allowed hosts" in node_result(user, blocked)
    unresolved = start(user, "df.http('https://acct.blob.core.windows.net/c', 'GET', NULL, NULL, 5)")
    assert user.finish(unresolved) == "failed"
    error = node_result(user, unresolved)
    assert "cannot resolve" in error and "not in the allowed" not in error


def test_bare_addresses_and_other_schemes_are_refused(user, http_engine):
    for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/probe", "https://8.8.8.8/"):
        iid = start(user, f"df.http('{url}', 'GET')")
        assert user.finish(iid) == "failed"
        assert "bare IP" in node_result(user, iid), url
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unsupported URL scheme"):
        user.one("SELECT df.http('file:///etc/passwd', 'GET')")
    raw = json.dumps({"node_type": "HTTP", "query": json.dumps({"url": "file:///etc/passwd", "method": "GET"})})
    iid = user.one("SELECT df.start(%s, 'raw')", (raw,))  # pg_durable's node JSON: checked when it runs
    assert user.finish(iid) == "failed"
    assert "unsupported URL scheme" in node_result(user, iid)


def test_multipart_parts_are_uploaded_and_references_must_be_whole(user, http_engine):
    iid = start(user, """df.sql('SELECT encode(repeat(''long payload '', 12)::bytea, ''base64'') AS b64') |=> 'p'
        ~> df.http_multipart('https://httpbingo.org/post', 'POST', jsonb_build_array(
            jsonb_build_object('name', 'field1', 'data_b64', encode('hello multipart'::bytea, 'base64')),
            jsonb_build_object('name', 'doc', 'filename', 'a.txt', 'content_type', 'text/plain',
                               'data_b64', '$p.b64')))""")
    assert user.finish(iid) == "completed"
    echo = json.loads(node_result(user, iid, "HTTP_MULTIPART"))["json"]
    assert echo["headers"]["Content-Type"][0].startswith("multipart/form-data")
    assert echo["form"] == {"field1": ["hello multipart"]}
    assert echo["files"] == {"doc": ["long payload " * 12]}  # wrapped base64 from encode() decoded whole
    spliced = start(user, """df.sql('SELECT ''aGk='' AS b64') |=> 'p' ~> df.http_multipart(
        'https://httpbingo.org/post', 'POST', jsonb_build_array(jsonb_build_object('name', 'x',
        'data_b64', 'prefix$p.b64')))""")
    assert user.finish(spliced) == "failed"
    assert "whole-value reference" in node_result(user, spliced, "HTTP_MULTIPART")


def test_binary_bodies_are_base64_and_feed_an_upload(user, http_engine):
    iid = start(user, """df.http('https://httpbingo.org/bytes/256', 'GET') |=> 'blob'
        ~> df.http_multipart('https://httpbingo.org/post', 'POST', jsonb_build_array(jsonb_build_object(
            'name', 'payload', 'filename', 'b.bin', 'data_b64', '$blob.body')))""")
    assert user.finish(iid) == "completed"
    blob = json.loads(node_result(user, iid))
    assert blob["encoding"] == "base64" and len(base64.b64decode(blob["body"])) == 256
    echo = json.loads(node_result(user, iid, "HTTP_MULTIPART"))["json"]
    assert echo["files"]["payload"][0] == "data:application/octet-stream;base64," + blob["body"]


def test_text_with_a_nul_character_is_kept_as_base64():
    """PostgreSQL's text and jsonb cannot hold NUL: such a body must not reach them as text (a worker
    storing it failed its whole batch, again and again)."""
    response = httpx.Response(200, headers={"content-type": "application/json"})
    envelope = http.envelope_of(response, b'{"a": "x\\u0000y", "b": "\x00"}', 1.0)
    assert envelope["encoding"] == "base64" and "json" not in envelope
    assert base64.b64decode(envelope["body"]) == b'{"a": "x\\u0000y", "b": "\x00"}'
    escaped_only = http.envelope_of(response, b'{"a": "x\\u0000y"}', 1.0)
    assert escaped_only["encoding"] == "text" and "json" not in escaped_only


def test_revoking_df_http_stops_the_next_http_step(df_dsn, df_user, user, http_engine):
    raw = json.dumps({"node_type": "HTTP", "query": json.dumps({"url": "https://httpbingo.org/get",
                                                                "method": "GET"})})
    assert user.finish(user.one("SELECT df.start(%s)", (raw,))) == "completed"
    signature = "df.http(text, text, text, jsonb, integer)"
    run_sql(df_dsn, f"REVOKE EXECUTE ON FUNCTION {signature} FROM {df_user}")
    refused = user.one("SELECT df.start(%s)", (raw,))  # at once: the right is not cached for HTTP steps
    assert user.finish(refused) == "failed"
    assert "does not have EXECUTE privilege" in node_result(user, refused)
    run_sql(df_dsn, f"GRANT EXECUTE ON FUNCTION {signature} TO {df_user}")
    assert user.finish(user.one("SELECT df.start(%s)", (raw,))) == "completed"


def test_http_switched_off_refuses_when_built_and_when_run(df_dsn, user, engine_factory):
    engine_factory(PGFLOW_HTTP_ALLOW="none").start(concurrency=1)
    raw = json.dumps({"node_type": "HTTP", "query": json.dumps({"url": "https://example.com/", "method": "GET"})})
    iid = user.one("SELECT df.start(%s)", (raw,))
    assert user.finish(iid) == "failed"
    assert "outbound HTTP requests are disabled" in node_result(user, iid)
    user.run("SET pgflow.http = off")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match=r"df.http\(\) is disabled"):
        user.one("SELECT df.http('https://example.com/', 'GET')")


def test_resolver_override_setting_is_validated(monkeypatch):
    monkeypatch.setenv("PGFLOW_HTTP_RESOLVE", "a.example=http://127.0.0.1:8080, *=none")
    assert settings.reload().http_resolve == (("a.example", "http://127.0.0.1:8080"), ("*", "none"))
    for bad in ("a.example=127.0.0.1:8080", "a.example=ftp://h:1", "=http://h:1", "a=http://h:1/path"):
        monkeypatch.setenv("PGFLOW_HTTP_RESOLVE", bad)
        with pytest.raises(settings.SettingsError, match="PGFLOW_HTTP_RESOLVE"):
            settings.reload()
    monkeypatch.delenv("PGFLOW_HTTP_RESOLVE")
    settings.reload()


def test_variables_cannot_change_inside_a_workflow(user, http_engine):
    iid = start(user, "'SELECT df.setvar(''x'', ''y'')'")
    assert user.finish(iid) == "failed"
    error = user.one("SELECT result::text FROM df.nodes WHERE instance_id = %s AND status = 'failed'", (iid,))
    assert "cannot be called inside a workflow" in error


def test_result_names_are_checked_when_given(user):
    for name in ("x) UNION SELECT version()--", "has space", "123abc", "input"):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not a valid identifier"):
            user.one("SELECT df.sql('SELECT 1') |=> %s", (name,))
    assert "my_result" in user.one("SELECT df.sql('SELECT 1') |=> 'my_result'")


@pytest.fixture
def make_role(df_dsn):
    """Login roles made by the test (unique names), dropped afterwards with what they own."""
    made: list[str] = []

    def make(prefix: str = "r", grant: str | None = "") -> str:
        role = f"{prefix}_{uuid.uuid4().hex[:8]}"
        run_sql(df_dsn, f'CREATE ROLE "{role}" LOGIN; GRANT CREATE ON SCHEMA public TO "{role}"')
        made.append(role)
        if grant is not None:
            run_sql(df_dsn, f"SELECT df.grant_usage(%s{grant})", (role,))
        return role

    yield make
    for role in reversed(made):
        if run_sql(df_dsn, "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
            run_sql(df_dsn, f'DROP OWNED BY "{role}" CASCADE; DROP ROLE "{role}"')


def test_the_list_cap_is_the_administrators_a_user_may_only_lower_it(df_dsn, df_user):
    run_sql(df_dsn, "DO $$ BEGIN EXECUTE format('ALTER DATABASE %%I SET pg_durable.list_instances_max_limit = 5', "
                    "current_database()); END $$")
    user = Session(df_dsn, df_user)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"list_instances_max_limit \(5\)"):
        user.rows("SELECT * FROM df.list_instances(NULL, 6)")
    user.run("SET pg_durable.list_instances_max_limit = 100000")  # a session may SET any such name ...
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"list_instances_max_limit \(5\)"):
        user.rows("SELECT * FROM df.list_instances(NULL, 6, NULL)")  # ... but not raise the cap with it
    user.run("SET pg_durable.list_instances_max_limit = 3")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"list_instances_max_limit \(3\)"):
        user.rows("SELECT * FROM df.list_instances(NULL, 4)")
    admin = Session(df_dsn, None)
    admin.run("SET pg_durable.list_instances_max_limit = 50")  # a superuser's own SET counts
    assert admin.rows("SELECT * FROM df.list_instances(NULL, 6)") == []


def test_users_write_the_columns_pg_durable_lets_them_on_their_own_rows_only(df_dsn, make_role, http_engine):
    alice, bob = Session(df_dsn, make_role("alice")), Session(df_dsn, make_role("bob"))
    mine = start(alice, "'SELECT 1 AS a'")
    theirs = start(bob, "df.sleep(600)")
    assert alice.finish(mine) == "completed"
    assert alice.conn.execute("UPDATE df.instances SET status = 'completed', updated_at = now() WHERE id = %s",
                              (mine,)).rowcount == 1
    assert alice.conn.execute("UPDATE df.instances SET status = 'cancelled' WHERE id = %s", (theirs,)).rowcount == 0
    assert bob.one("SELECT status FROM df.instances WHERE id = %s", (theirs,)) in ("pending", "running")
    for statement, error in (
            ("DELETE FROM df.instances WHERE id = %s", psycopg.errors.InsufficientPrivilege),
            ("UPDATE df.instances SET submitted_by = 'postgres'::regrole WHERE id = %s",
             psycopg.errors.InsufficientPrivilege),
            ("UPDATE df.instances SET status = 'failed' WHERE id = %s", psycopg.errors.FeatureNotSupported)):
        with pytest.raises(error):
            alice.run(statement, (mine,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        alice.run("INSERT INTO df.instances (id, root_node, status) VALUES ('deadbeef', 'cafebabe', 'completed')")
    with pytest.raises(psycopg.errors.CheckViolation):
        alice.run("INSERT INTO df.instances (id, root_node) VALUES ('not_hex!', 'cafebabe')")
    with pytest.raises(psycopg.errors.CheckViolation):
        alice.run("INSERT INTO df.nodes (id, instance_id, node_type, query, result_name) "
                  "VALUES ('deadbeef', 'cafebabe', 'SQL', 'SELECT 1', 'bad-name')")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="df.start"):
        alice.run("INSERT INTO df.instances (id, root_node) VALUES ('deadbeef', 'cafebabe')")
    assert bob.conn.execute("UPDATE df.instances SET status = 'cancelled' WHERE id = %s", (theirs,)).rowcount == 1
    assert bob.one("SELECT status FROM df.instances WHERE id = %s", (theirs,)) == "cancelled"


def test_a_granted_submitted_by_write_does_not_change_who_runs_it(df_dsn, make_role, http_engine):
    owner, forger = make_role("owner"), make_role("forger")
    run_sql(df_dsn, f"GRANT UPDATE (submitted_by) ON df.instances, df.nodes TO {forger}; "
                    f"ALTER ROLE {forger} BYPASSRLS; CREATE TABLE ran_as (who text); GRANT ALL ON ran_as TO {owner}")
    session = Session(df_dsn, owner)
    iid = start(session, "df.sleep(1) ~> 'INSERT INTO ran_as SELECT current_user'")
    # once running (a forgery while still pending fails the instance: test_compat_rest.py)
    wait_until(lambda: session.one("SELECT df.status(%s)", (iid,)) == "running", 30, "the instance to run")
    forging = Session(df_dsn, forger)
    assert forging.conn.execute("UPDATE df.instances SET submitted_by = 'postgres'::regrole WHERE id = %s",
                                (iid,)).rowcount == 1
    forging.run("UPDATE df.nodes SET submitted_by = 'postgres'::regrole WHERE instance_id = %s", (iid,))
    assert session.finish(iid) == "completed"
    assert run_sql(df_dsn, "SELECT who FROM ran_as") == [(owner,)]
    assert session.one("SELECT submitted_by::text FROM df.instances WHERE id = %s", (iid,)) == owner


def test_an_administrator_of_usage_grants_what_it_holds(df_dsn, make_role, http_engine):
    delegate = make_role("dg_admin", ", include_http => false, with_grant => true")
    app, http_target = make_role("dg_app", None), make_role("dg_http", None)
    admin = Session(df_dsn, delegate)
    admin.run("SELECT df.grant_usage(%s)", (app,))
    app_session = Session(df_dsn, app)
    assert app_session.finish(start(app_session, "'SELECT 200 AS r'")) == "completed"
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        admin.run("SELECT df.grant_usage(%s, include_http => true)", (http_target,))
    assert not run_sql(df_dsn, "SELECT has_function_privilege(%s, 'df.http(text,text,text,jsonb,integer)', "
                               "'EXECUTE')", (http_target,))[0][0]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app_session.run("SELECT df.grant_usage(%s)", (http_target,))  # not an administrator of usage
    admin.run("SELECT df.revoke_usage(%s)", (app,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app_session.run("SELECT df.start('SELECT 1')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # nor through pgflow's own API underneath
        app_session.run("SELECT pgflow.start('SELECT 1')")


def test_a_dropped_granted_role_does_not_stop_everyone_elses_steps(df_dsn, make_role, user, http_engine):
    gone = make_role("gone")
    run_sql(df_dsn, f"DROP OWNED BY {gone}; DROP ROLE {gone}")  # dropped without revoke_usage
    assert user.finish(start(user, "'SELECT 1 AS still_runs'")) == "completed"


def test_mixed_case_role_names_are_kept(df_dsn, make_role, http_engine):
    role = make_role("labUser")
    session = Session(df_dsn, None)
    session.run(f'SET SESSION AUTHORIZATION "{role}"')
    iid = start(session, "'SELECT 1 AS ok'")
    assert session.finish(iid) == "completed"
    assert session.one("SELECT r.rolname FROM df.nodes n JOIN pg_roles r ON r.oid = n.submitted_by::oid "
                       "WHERE n.instance_id = %s LIMIT 1", (iid,)) == role
    session.run("SELECT df.setvar('k', 'v')")
    assert session.conn.execute("DELETE FROM df.vars WHERE name = 'k'").rowcount == 1
    assert session.one("SELECT df.getvar('k')") is None
