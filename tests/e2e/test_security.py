"""Multi-user security: grants, row-level security, SQL steps run as their owner, the superuser guard, HTTP
rights and egress policy, secrets by reference — through both front doors, with real roles logging in."""

from __future__ import annotations

import uuid
from http.server import BaseHTTPRequestHandler

import psycopg
import pytest
from conftest import drop_database_and_roles, serve_http
from conftest import run_sql as as_role
from psycopg.conninfo import make_conninfo

import pgflow
from pgflow import InstanceNotFound, PgflowError
from pgflow import tree as t


@pytest.fixture
def roles(dsn, server):
    """Two ordinary login roles with pgflow usage (alice may use HTTP and Python), one admin, one stranger;
    dropped afterwards."""
    admin_dsn, _ = server
    suffix = uuid.uuid4().hex[:8]
    names = {k: f"pgflow_{k}_{suffix}" for k in ("alice", "bob", "boss", "stranger")}
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE ROLE "{name}" LOGIN')
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE shared (v text); CREATE TABLE private (v text)")
        conn.execute("INSERT INTO private VALUES ('top secret')")
        conn.execute(f'GRANT ALL ON shared TO "{names["alice"]}", "{names["bob"]}"')
        conn.execute("SELECT pgflow.grant_usage(%s, p_include_http => true, p_include_python => true)",
                     (names["alice"],))
        conn.execute("SELECT pgflow.grant_usage(%s)", (names["bob"],))
        conn.execute("SELECT pgflow.grant_usage(%s)", (names["boss"],))
        conn.execute(f'GRANT pgflow_admin TO "{names["boss"]}"')
    yield {k: make_conninfo(dsn, user=v) for k, v in names.items()} | {"names": names}
    drop_database_and_roles(admin_dsn, dsn, names.values())


def test_nothing_is_granted_to_public(dsn, roles):
    stranger = roles["stranger"]
    for statement in ("SELECT pgflow.start('SELECT 1')", "SELECT count(*) FROM pgflow.instances",
                      "SELECT pgflow.status(1)", "SELECT count(*) FROM pgflow.variables"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(stranger, statement)
    with pytest.raises(PgflowError):
        pgflow.start(t.sql("SELECT 1"), dsn=stranger)
    # a NULL ACL means the default privileges, which include EXECUTE for PUBLIC on functions
    leaked = as_role(dsn, "SELECT p.oid::regprocedure::text FROM pg_proc p"
                          " WHERE p.pronamespace IN ('pgflow'::regnamespace, 'pgflow_exec'::regnamespace)"
                          "   AND (p.proacl IS NULL"
                          "        OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))"
                          " UNION ALL SELECT c.oid::regclass::text FROM pg_class c"
                          " WHERE c.relnamespace = 'pgflow'::regnamespace"
                          "   AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0)")
    assert leaked == []


def test_users_see_and_control_only_their_own_instances(dsn, roles, engine):
    alice, bob, boss = roles["alice"], roles["bob"], roles["boss"]
    pgflow.set_variable("greeting", "hi from alice", dsn=alice)
    a_sql = as_role(alice, "SELECT pgflow.start(pgflow.wait_for_signal('go') ~> 'SELECT $vars.greeting AS g')")[0][0]
    a_py = pgflow.start(t.wait_for_signal("go"), label="alice-py", dsn=alice)
    b_own = pgflow.start(t.sql("SELECT 1 AS one"), dsn=bob)
    assert pgflow.wait(b_own, 60, dsn=bob).status == "completed"
    for other in (a_sql, a_py):
        with pytest.raises(InstanceNotFound):
            pgflow.status(other, dsn=bob)
        with pytest.raises(InstanceNotFound):
            pgflow.cancel(other, dsn=bob)
        with pytest.raises(InstanceNotFound):
            pgflow.signal(other, "go", dsn=bob)
        with pytest.raises(InstanceNotFound):
            pgflow.explain(other, dsn=bob)
        for statement in ("SELECT pgflow.status(%s)", "SELECT pgflow.cancel(%s)", "SELECT pgflow.signal(%s, 'go')",
                          "SELECT pgflow.result(%s)"):
            with pytest.raises(psycopg.errors.NoDataFound):
                as_role(bob, statement, (other,))
    assert [r["id"] for r in pgflow.list_instances(dsn=bob)] == [b_own]
    assert as_role(bob, "SELECT id FROM pgflow.list_instances()") == [(b_own,)]
    assert as_role(bob, "SELECT count(*) FROM pgflow.steps WHERE instance_id = ANY(%s)", ([a_sql, a_py],)) == [(0,)]
    assert as_role(bob, "SELECT count(*) FROM pgflow.variables") == [(0,)]
    assert as_role(bob, "SELECT pgflow.getvar('greeting')") == [(None,)]
    # the identity captured at start cannot be changed
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(alice, "UPDATE pgflow.instances SET owner = %s", (roles["names"]["bob"],))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(alice, "INSERT INTO pgflow.instances (flow_name, flow_version, owner) VALUES ('x', 'y', 'z')")
    # the admin role sees everyone's; alice controls her own
    assert {r["id"] for r in pgflow.list_instances(dsn=boss)} >= {a_sql, a_py, b_own}
    pgflow.signal(a_sql, "go", dsn=alice)
    assert pgflow.wait(a_sql, 60, dsn=alice).output == [{"g": "hi from alice"}]
    assert pgflow.cancel(a_py, dsn=alice) == "cancelled"


def test_the_admin_role_acts_on_every_users_work_and_an_ordinary_role_does_not(dsn, roles, engine):
    """One rule (pgflow._is_privileged) behind four doors: signalling and cancelling another's instance,
    starting a flow version another role registered, and asking what another role may use."""
    alice, bob, boss, names = roles["alice"], roles["bob"], roles["boss"], roles["names"]
    waiting = pgflow.start(t.wait_for_signal("go"), dsn=alice)
    assert as_role(boss, "SELECT pgflow.signal(%s, 'go') > 0", (waiting,)) == [(True,)]
    assert pgflow.wait(waiting, 60, dsn=alice).status == "completed"
    flow, version = as_role(alice, "SELECT flow_name, flow_version FROM pgflow.instances WHERE id = %s",
                            (waiting,))[0]
    with pytest.raises(psycopg.errors.NoDataFound, match="not registered"):
        as_role(bob, "SELECT pgflow.start_instance(%s, %s, NULL, NULL)", (flow, version))
    by_boss = as_role(boss, "SELECT pgflow.start_instance(%s, %s, NULL, NULL)", (flow, version))[0][0]
    assert as_role(boss, "SELECT owner FROM pgflow.instances WHERE id = %s", (by_boss,)) == [(names["boss"],)]
    assert pgflow.cancel(by_boss, dsn=boss) == "cancelled"
    other = pgflow.start(t.wait_for_signal("never"), dsn=alice)
    with pytest.raises(InstanceNotFound):
        pgflow.cancel(other, dsn=bob)
    assert pgflow.cancel(other, dsn=boss) == "cancelled"
    assert as_role(boss, "SELECT pgflow.may_use('http', %s), pgflow.may_use('http', %s)",
                   (names["alice"], names["bob"])) == [(True, False)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(bob, "SELECT pgflow.may_use('http', %s)", (names["alice"],))


def test_sql_steps_run_as_the_submitting_role(dsn, roles, engine):
    alice, names = roles["alice"], roles["names"]
    node = (t.sql("SELECT current_user::text AS who, session_user::text AS session").named("me")
            >> t.sql("INSERT INTO shared VALUES ($me.who) RETURNING v, length(v) AS n").named("ins")
            >> "SELECT count(*) AS shared_rows, $ins.n AS n FROM $ins.*")
    iid = pgflow.start(node, {"x": "it's; -- data"}, dsn=alice)
    st = pgflow.wait(iid, 60, dsn=alice)
    assert st.status == "completed", st.error
    assert st.output == [{"shared_rows": 1, "n": len(names["alice"])}]
    assert as_role(dsn, "SELECT v FROM shared") == [(names["alice"],)]
    for attempt in ("SELECT v FROM private",  # no privilege: the worker's would have sufficed
                    "SELECT set_config('role', 'postgres', false)",  # no way back to the worker's role
                    "SELECT set_config('session_authorization', 'postgres', false)"):
        failed = pgflow.wait(pgflow.start(t.sql(attempt), dsn=alice), 60, dsn=alice)
        assert failed.status == "failed", attempt
        assert any(m in failed.error for m in ("permission denied", "cannot set parameter")), failed.error
    # the same through the SQL front door, and DAG flows started by the user take the same path
    sql_iid = as_role(alice, "SELECT pgflow.start('SELECT current_user::text AS who')")[0][0]
    assert pgflow.wait(sql_iid, 60, dsn=alice).output == [{"who": names["alice"]}]


def test_starting_as_superuser_is_refused_unless_allowed(dsn, server):
    admin_dsn, _ = server
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" RESET pgflow.allow_superuser')
        superuser = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                                 ).fetchone()
    assert superuser[1], "the test suite connects as a superuser"
    with psycopg.connect(dsn) as conn:
        conn.execute("SET pgflow.allow_superuser = off")  # the embedded server's role-level default is on
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="refusing to start an instance as superuser"):
            conn.execute("SELECT pgflow.start('SELECT 1')")
        conn.rollback()
        conn.execute("SET pgflow.allow_superuser = off")
        with pytest.raises(PgflowError, match="refusing to start an instance as superuser"):
            pgflow.start(t.sql("SELECT 1"), conn=conn)
        conn.rollback()
        conn.execute("SET pgflow.allow_superuser = on")
        assert pgflow.start(t.sql("SELECT 1"), conn=conn) > 0


def test_http_and_python_steps_need_their_grant(dsn, roles):
    bob = roles["bob"]
    with pytest.raises(PgflowError, match="may not use HTTP steps"):
        pgflow.start(t.http("http://127.0.0.1:9/x"), dsn=bob)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not use HTTP steps"):
        as_role(bob, "SELECT pgflow.start(pgflow.http('http://127.0.0.1:9/x'))")
    with pytest.raises(PgflowError, match="may not use Python steps"):
        pgflow.start(t.python("support.sample_trees:total"), dsn=bob)
    assert pgflow.list_instances(dsn=bob) == []


def test_workflows_call_only_functions_marked_as_tasks(dsn, roles, engine):
    st = pgflow.wait(pgflow.start(t.python("os:getcwd"), dsn=roles["alice"]), 60, dsn=roles["alice"])
    assert st.status == "failed" and "not marked with @pgflow.tree.task" in st.error


@pytest.fixture
def web():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            body = b"x" * (5000 if self.path == "/big" else 10)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serve_http(Handler) as url:
        yield url, seen


def test_http_egress_policy_and_secrets(dsn, roles, engine_factory, web):
    url, seen = web
    token = "tok-" + uuid.uuid4().hex
    engine_factory(PGFLOW_TEST_TOKEN=token, PGFLOW_HTTP_ALLOW="127.0.0.1,localhost",
                   PGFLOW_HTTP_MAX_BYTES="1000").start()
    alice = roles["alice"]
    as_role(dsn, "SELECT pgflow.grant_secret(%s, 'token', 'env:PGFLOW_TEST_TOKEN')", (roles["names"]["alice"],))
    with pytest.raises(psycopg.Error, match="secrets are granted by an administrator"):
        as_role(alice, "SELECT pgflow.set_secret('raw', 'env:PGFLOW_DSN')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(alice, "SELECT pgflow.grant_secret(current_user, 'mine', 'env:PGFLOW_DSN')")
    ok = pgflow.start(t.http(f"{url}/ok?t=$secrets.token", headers={"Authorization": "Bearer $secrets.token"})
                      .named("r") >> "SELECT $r.status AS status", dsn=alice)
    assert pgflow.wait(ok, 60, dsn=alice).output == [{"status": 200}]
    assert seen[-1] == (f"/ok?t={token}", f"Bearer {token}")
    # the value is nowhere in the database: not in variables, instances, step outputs or queue archives
    dump = as_role(dsn, "SELECT concat((SELECT string_agg(t::text, '') FROM pgflow.variables t),"
                        " (SELECT string_agg(t::text, '') FROM pgflow.instances t),"
                        " (SELECT string_agg(t::text, '') FROM pgflow.steps t),"
                        " (SELECT string_agg(t::text, '') FROM pgmq.a_pgflow t))")[0][0]
    assert token not in dump
    for target, message in ((f"{url}/big", "response larger than 1,000 bytes"),
                            ("http://169.254.169.254/latest/meta-data/", "never allowed"),
                            (url.replace("127.0.0.1", "127.0.0.2") + "/ok", "refused unless allow-listed")):
        st = pgflow.wait(pgflow.start(t.http(target), dsn=alice), 60, dsn=alice)
        assert st.status == "failed" and message in st.error, (target, st.error)
    with pytest.raises(PgflowError, match=r"\$secrets in SQL step"):
        pgflow.start(t.sql("SELECT $secrets.token"), dsn=alice)


def test_revoke_usage(dsn, roles):
    bob, names = roles["bob"], roles["names"]
    assert pgflow.start(t.sql("SELECT 1"), dsn=bob) > 0
    as_role(dsn, "SELECT pgflow.revoke_usage(%s)", (names["bob"],))
    with pytest.raises((PgflowError, psycopg.errors.InsufficientPrivilege)):
        pgflow.start(t.sql("SELECT 1"), dsn=bob)
