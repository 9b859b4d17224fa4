"""The rest of pg_durable's surface on pgflow, in this project's own words: HTTP steps through the allow-list
and an operator's resolver override (a local server stands in for the public hosts: nothing leaves
127.0.0.1), multipart uploads, binary bodies, the HTTP right checked when each step runs, DSL-time checks,
and the df.instances / df.nodes writes and grants pg_durable's users make."""

from __future__ import annotations

import base64
import json

import httpx
import psycopg
import pytest
import test_pg_durable_compat as compat
from conftest import run_sql
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
