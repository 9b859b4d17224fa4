"""Attacks on the worker by a hostile but legitimately granted role (issue 12): each test is the attack,
with real login roles, a real coordinator and a real worker. The worker runs everyone's steps, so nothing a
step leaves in a session may reach another user's step or pgflow's own statements."""

from __future__ import annotations

import os
import subprocess

import psycopg
from conftest import pgflow_command, wait_until
from conftest import run_sql as as_role
from test_security import roles  # noqa: F401  (the fixture: alice, bob, boss, stranger)

import pgflow
from pgflow import tree as t


def one_worker(engine_factory, **env: str):
    """A coordinator and one worker process: every step runs on the same worker session."""
    return engine_factory(**env).start(workers=1, concurrency=1)


def run(node, role_dsn: str, timeout: float = 60):
    return pgflow.wait(pgflow.start(node, dsn=role_dsn), timeout, dsn=role_dsn)


def test_a_steps_search_path_never_reaches_pgflows_statements(dsn, roles, engine_factory):  # noqa: F811
    """Bob's step sets the session's search_path to a schema of his whose clock_timestamp() and now()
    record who calls them; pgflow's own statements (run as the pgflow owner) must never call them."""
    bob, names = roles["bob"], roles["names"]
    as_role(dsn, f'CREATE SCHEMA b AUTHORIZATION "{names["bob"]}"')
    as_role(bob, "CREATE TABLE b.calls (who text); GRANT INSERT ON b.calls TO PUBLIC;"
                 "CREATE FUNCTION b.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS"
                 " $$ INSERT INTO b.calls VALUES (current_user); SELECT pg_catalog.clock_timestamp() $$;"
                 "CREATE FUNCTION b.now() RETURNS timestamptz LANGUAGE sql AS"
                 " $$ INSERT INTO b.calls VALUES (current_user); SELECT pg_catalog.now() $$;"
                 "GRANT USAGE ON SCHEMA b TO PUBLIC")
    one_worker(engine_factory)
    hijack = "SELECT set_config('search_path', 'b, pg_catalog, public', false) AS path"
    st = run(t.sql(hijack) >> t.sql(hijack) >> "SELECT 1 AS one", bob)
    assert st.status == "completed", st.error
    st = run(t.sql("SELECT 2 AS two") >> "SELECT 3 AS three", roles["alice"])
    assert st.status == "completed", st.error
    callers = {r[0] for r in as_role(dsn, "SELECT who FROM b.calls")}
    assert callers <= {names["bob"]}, callers


def test_a_temp_table_never_captures_another_users_statement(dsn, roles, engine_factory):  # noqa: F811
    """Bob's step creates pg_temp.orders, open to everyone; Alice's later INSERT INTO orders on the same
    worker must go to her table, not his."""
    alice, bob, names = roles["alice"], roles["bob"], roles["names"]
    as_role(dsn, f'CREATE TABLE public.orders (v text); GRANT ALL ON public.orders TO "{names["alice"]}"')
    one_worker(engine_factory)
    trap = ("DO $$ BEGIN CREATE TEMP TABLE orders (v text); GRANT ALL ON pg_temp.orders TO PUBLIC; "
            "PERFORM set_config('pgflow_test.trap', 'set', false); END $$")
    st = run(t.sql(trap) >> "SELECT to_regclass('pg_temp.orders')::text AS mine", bob)
    assert st.status == "completed", st.error
    st = run(t.sql("INSERT INTO orders VALUES ('alice') RETURNING v") >> "SELECT count(*) AS n FROM orders",
             alice)
    assert st.status == "completed", st.error
    assert as_role(dsn, "SELECT v FROM public.orders") == [("alice",)]


def test_a_session_setting_never_changes_another_users_results(dsn, roles, engine_factory):  # noqa: F811
    alice, bob = roles["alice"], roles["bob"]
    one_worker(engine_factory)
    st = run(t.sql("SELECT set_config('DateStyle', 'SQL, DMY', false) AS ds, "
                   "set_config('TimeZone', 'Pacific/Kiritimati', false) AS tz"), bob)
    assert st.status == "completed", st.error
    st = run(t.sql("SELECT '01/02/2026'::date::text AS d, current_setting('TimeZone') AS tz"), alice)
    assert st.status == "completed", st.error
    server_zone = as_role(dsn, "SELECT current_setting('TimeZone')")[0][0]
    assert st.output == [{"d": "2026-01-02", "tz": server_zone}]


def test_a_session_advisory_lock_is_released_after_the_step(dsn, roles, engine_factory):  # noqa: F811
    """A step takes a session-level advisory lock: it must not outlive the step (it would block whoever
    needs that key, e.g. pgflow's maintenance, for as long as the worker lives)."""
    bob = roles["bob"]
    one_worker(engine_factory)
    st = run(t.sql("SELECT pg_advisory_lock(74061120) AS locked"), bob)
    assert st.status == "completed", st.error

    def free() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            got = conn.execute("SELECT pg_try_advisory_lock(74061120)").fetchone()[0]
            if got:
                conn.execute("SELECT pg_advisory_unlock(74061120)")
            return got

    wait_until(free, 30, "the step's advisory lock to be released")


def test_void_results_and_one_line_errors_for_granted_users(dsn, roles, engine_factory):  # noqa: F811
    """Issue 13: SELECT pg_sleep(0.1) as a granted role works; a failure is one clear line with the
    database's message and SQLSTATE, none of the executor's internals."""
    alice = roles["alice"]
    one_worker(engine_factory)
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


def test_a_malformed_shape_is_poison_for_its_own_task_only(dsn, roles, engine_factory):  # noqa: F811
    """Attack 10: a stored shape with "max_attempts": "x" (registered before shapes were validated, or by
    a hand-made register_flow call) once killed the worker on every delivery, and the other tasks of the
    batch spent their attempts. Now its task fails with the reason and is dead-lettered; the worker's
    processes live on and other users' tasks complete."""
    alice, bob = roles["alice"], roles["bob"]
    engine = engine_factory()
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


def test_a_python_node_never_imports_an_untrusted_module(dsn, roles, engine_factory, tmp_path):  # noqa: F811
    """Attack 5: a Python node naming a module makes the worker import it before the @task marker is
    checked (side effects, process death). Modules on the worker's path but not trusted (not --import'ed,
    not in PGFLOW_PYTHON_MODULES), and modules in the worker's current directory, are never imported."""
    alice = roles["alice"]
    marker = tmp_path / "imported"
    for name, where in (("evil_on_path", tmp_path / "path"), ("evil_in_cwd", tmp_path / "cwd")):
        where.mkdir()
        (where / f"{name}.py").write_text(f"open({str(marker)!r} + '-{name}', 'w').close()\n"
                                          "def x(ctx):\n    return 'ran'\n")
    engine = engine_factory()
    engine.env["PYTHONPATH"] = os.pathsep.join([engine.env["PYTHONPATH"], str(tmp_path / "path")])
    engine.coordinator()
    worker = subprocess.Popen(pgflow_command("worker", "--dsn", dsn, "--import", "sample_flows", "--concurrency", "1"),
                              env=engine.env, cwd=tmp_path / "cwd", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine.procs.append(worker)
    for ref in ("evil_on_path:x", "evil_in_cwd:x", "venv.__main__:x", "this.is.not:there"):
        st = run(t.python(ref), alice)
        assert st.status == "failed" and "is not trusted by this worker" in st.error, (ref, st.error)
    assert not list(tmp_path.glob("imported*")), "an untrusted module was imported"
    # trusted code still runs: the --import module's marked functions, and PGFLOW_PYTHON_MODULES ones
    st = pgflow.wait(pgflow.start(t.python("sample_trees:greet"), {"who": "alice"}, dsn=alice), 60, dsn=alice)
    assert st.status == "completed" and st.output.startswith("hello, alice"), st.error
    assert worker.poll() is None
