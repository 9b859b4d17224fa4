# ruff: noqa: F811  (the fixtures imported from test_pg_durable_compat are parameters here)
"""The last behaviours of pg_durable's end-to-end suite the df layer matches: HTTP rights checked when the step
runs, starts from a SECURITY DEFINER function of another role (and the attacks that must stay refused), a
bytea column failing its SQL step, df.history derived from pgflow's state, and df.start held back while
df._worker_ready is marked down. Written for this project; real roles, real coordinator and worker
processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import psycopg.sql
import pytest
from conftest import run_sql, wait_until
from test_pg_durable_compat import (  # noqa: F401 (fixtures)
    Session,
    admin,
    df_dsn,
    df_engine,
    df_user,
    start,
    user,
)

# an HTTP node as pg_durable stores it: no call of df.http, so a role without its EXECUTE right can write it
HTTP_NODE = ('{"node_type": "HTTP", "query": "{\\"url\\": \\"https://api.github.com/\\", \\"method\\": '
             '\\"GET\\", \\"body\\": null, \\"headers\\": null, \\"timeout_seconds\\": 5}"}')


@pytest.fixture
def roles(df_dsn) -> Iterator[dict[str, str]]:
    """Three login roles granted df usage without HTTP: a victim, a hostile role and a bystander."""
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"{kind}_{suffix}" for kind in ("victim", "hostile", "plain")}
    for name in names.values():
        run_sql(df_dsn, f"CREATE ROLE {name} LOGIN; SELECT df.grant_usage('{name}');"
                        f"GRANT CREATE ON SCHEMA public TO {name}")
    yield names
    for name in names.values():
        run_sql(df_dsn, f"DROP OWNED BY {name}; DROP ROLE {name}")


def session(dsn: str, role: str) -> Session:
    return Session(dsn, role)


def owner_of(admin: Session, iid: str) -> str:
    return admin.one("SELECT submitted_by::text FROM df.instances WHERE id = %s", (iid,))


# ------------------------------------------------------------------------------------ HTTP rights at run time


def test_df_start_accepts_http_without_the_right_and_the_step_fails_when_it_runs(df_dsn, roles, admin,
                                                                                 df_engine):
    plain = session(df_dsn, roles["plain"])
    iid = plain.one("SELECT df.start(%s, 'no-http-right')", (HTTP_NODE,))  # accepted, as pg_durable does
    assert plain.finish(iid) == "failed"
    error = plain.one("SELECT result::text FROM df.nodes WHERE instance_id = %s AND node_type = 'HTTP'", (iid,))
    assert "does not have EXECUTE privilege" in error
    # pgflow's own API still refuses at start, also later in the same transaction as a df.start
    plain.run("BEGIN")
    plain.one("SELECT df.start(%s)", (HTTP_NODE,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not use HTTP steps"):
        plain.one("SELECT pgflow.start(pgflow.http('https://api.github.com/'))")
    plain.run("ROLLBACK")


# ------------------------------------------------------------------------------------ definer functions


def test_a_definer_function_of_another_role_starts_as_that_role(df_dsn, roles, admin, df_engine):
    victim, plain = session(df_dsn, roles["victim"]), session(df_dsn, roles["plain"])
    victim.run("CREATE TABLE victim_notes (note text); INSERT INTO victim_notes VALUES ('only for the victim')")
    victim.run("CREATE FUNCTION victim_start(q text) RETURNS text LANGUAGE sql SECURITY DEFINER "
               "AS $$ SELECT df.start(q, 'by-definer') $$")
    victim.run(f"GRANT EXECUTE ON FUNCTION victim_start(text) TO {roles['plain']}")
    iid = plain.one("SELECT victim_start('SELECT note FROM victim_notes')")
    assert admin.finish(iid) == "completed"
    assert owner_of(admin, iid) == roles["victim"]  # the function's owner chose to act as itself
    assert "only for the victim" in admin.one("SELECT df.result(%s)", (iid,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the caller itself still cannot read it
        plain.one("SELECT note FROM victim_notes")


def test_a_definer_function_of_another_role_starts_and_signals_in_new_transactions_as_that_role(
        df_dsn, roles, admin, df_engine):
    """transaction_mode 'new' and df.signal from a definer function of another role act as its owner, as a plain
    df.start there does. With dblink both commit on their own (the caller's rollback keeps them); without it
    the signal joins the caller's transaction and the start says it needs dblink. No proof outlives a call."""
    dblink = bool(admin.rows("SELECT 1 FROM pg_available_extensions WHERE name = 'dblink'"))
    if dblink:
        admin.run("CREATE EXTENSION dblink")
    victim = session(df_dsn, roles["victim"])
    victim.run("CREATE FUNCTION victim_start_new(q text) RETURNS text LANGUAGE sql SECURITY DEFINER "
               "AS $$ SELECT df.start(q, 'new-by-definer', transaction_mode => 'new') $$")
    victim.run("CREATE FUNCTION victim_signal(id text) RETURNS text LANGUAGE sql SECURITY DEFINER "
               "AS $$ SELECT df.signal(id, 'go', '{\"by\": \"definer\"}') $$")
    victim.run(f"GRANT EXECUTE ON FUNCTION victim_start_new(text), victim_signal(text) TO {roles['plain']}")
    waiting = victim.one("SELECT df.start(df.wait_for_signal('go'))")
    with psycopg.connect(df_dsn) as conn:
        conn.execute(f"SET SESSION AUTHORIZATION {roles['plain']}")
        conn.execute("SELECT public.victim_signal(%s)", (waiting,))
        if dblink:
            iid = conn.execute("SELECT public.victim_start_new('SELECT current_user AS who')").fetchone()[0]
            conn.rollback()
        else:
            conn.commit()
            conn.execute(f"SET SESSION AUTHORIZATION {roles['plain']}")
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="needs the dblink extension"):
                conn.execute("SELECT public.victim_start_new('SELECT 1')")
    assert admin.finish(waiting) == "completed"
    assert "definer" in admin.one("SELECT df.result(%s)", (waiting,))
    if dblink:
        assert admin.finish(iid) == "completed"
        assert owner_of(admin, iid) == roles["victim"]
        assert roles["victim"] in admin.one("SELECT df.result(%s)", (iid,))
    assert admin.one("SELECT count(*) FROM pgflow.caller_proofs") == 0


def test_a_superuser_definer_function_starts_as_superuser_only_when_allowed(df_dsn, roles, admin, df_engine):
    admin.run("CREATE FUNCTION su_start(q text) RETURNS text LANGUAGE sql SECURITY DEFINER "
              "AS $$ SELECT df.start(q) $$")
    admin.run(f"GRANT EXECUTE ON FUNCTION su_start(text) TO {roles['plain']}")
    plain = session(df_dsn, roles["plain"])
    plain.run("SET pgflow.allow_superuser = off")  # the test databases turn it on
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="enable_superuser_instances"):
        plain.one("SELECT su_start('SELECT 1')")
    plain.run("SET pg_durable.enable_superuser_instances = on")
    iid = plain.one("SELECT su_start('SELECT current_user AS who')")
    assert admin.finish(iid) == "completed"
    assert owner_of(admin, iid) == admin.one("SELECT current_user")


# ------------------------------------------------------------------------------------ attacks


def forged_calls(victim: str, victim_iid: int) -> list[tuple[str, tuple]]:
    """Every definer function that acts for a named role, called by someone else naming the victim."""
    return [
        ("SELECT pgflow.start_instances('sql', 'x', ARRAY['1'::jsonb], NULL, %s)", (victim,)),
        ("SELECT pgflow.cancel_instance(%s, 'forged', %s)", (victim_iid, victim)),
        ("SELECT pgflow.signal(%s, 'go', NULL, %s)", (victim_iid, victim)),
        ("SELECT pgflow.set_variable('colour', '\"forged\"', %s)", (victim,)),
        ("SELECT pgflow.done_channel(%s)", (victim,)),
        # the loopback launcher of transaction_mode 'new' and df.signal (dblink, switching to the named role)
        ("SELECT df._autonomous(%s, 'signal', jsonb_build_object('id', %s::bigint, 'name', 'go'))",
         (victim, victim_iid)),
    ]


def assert_all_refused(conn: psycopg.Connection, victim: str, victim_iid: int) -> None:
    for statement, params in forged_calls(victim, victim_iid):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not act as"), conn.transaction():
            conn.execute(statement, params)


def assert_no_definer_acts_as_owner(df_dsn: str, roles: dict[str, str], admin: Session) -> None:
    """pgflow's and df's own SECURITY DEFINER functions run as the pgflow owner: none of them may be made to
    start, cancel, signal or set variables as that owner for a granted caller, and none writes a proof (it
    would prove its owner)."""
    hostile = session(df_dsn, roles["hostile"])
    owner = admin.one("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgflow'")
    admin_iid = int(admin.one("SELECT df.start(df.wait_for_signal('go'))"), 16)
    with psycopg.connect(df_dsn) as conn:
        conn.execute(f"SET SESSION AUTHORIZATION {roles['hostile']}")
        assert_all_refused(conn, owner, admin_iid)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # not granted, and it checks the session's role
        hostile.one("SELECT df._autonomous(%s, 'start', '{\"node\": \"SELECT 1\"}')", (owner,))
    definers = admin.rows("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = "
                          "p.pronamespace WHERE n.nspname IN ('pgflow', 'df') AND p.prosecdef "
                          "AND pg_get_functiondef(p.oid) ~ %s",
                          (r"df\.start\(|df\.signal\(|_start_as_caller\(|_prove_current_role\("
                           r"|INSERT INTO pgflow\.caller_proofs",))
    assert definers == []
    assert admin.one("SELECT df.status(%s)", (format(admin_iid, "08x"),)) in ("pending", "running")


def test_a_hostile_role_cannot_prove_another_role(df_dsn, roles, admin, df_engine):
    """A proof is refused where the session could act as the role anyway (a hostile role's own session, even
    with BYPASSRLS) and stamped by the trigger elsewhere: a row written in the victim's definer function names
    the victim, in the caller's backend, whatever it said. Users may not read, change or delete proofs."""
    victim, hostile = session(df_dsn, roles["victim"]), session(df_dsn, roles["hostile"])
    victim_iid = int(victim.one("SELECT df.start(df.wait_for_signal('go'))"), 16)
    owner = admin.one("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgflow'")
    admin.run(f"ALTER ROLE {roles['hostile']} BYPASSRLS")
    forge = "INSERT INTO pgflow.caller_proofs (pid, xact, role) VALUES (pg_backend_pid(), pg_current_xact_id(), %s)"
    for name in (roles["victim"], owner):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs no proof"):
            hostile.run(forge, (name,))
    victim.run("CREATE FUNCTION victim_prove(who text) RETURNS void LANGUAGE sql SECURITY DEFINER "
               "AS $$ INSERT INTO pgflow.caller_proofs (pid, xact, role) VALUES (0, '1', who::name) $$")
    victim.run(f"GRANT EXECUTE ON FUNCTION victim_prove(text) TO {roles['hostile']}")
    with psycopg.connect(df_dsn) as conn:
        conn.execute(f"SET SESSION AUTHORIZATION {roles['hostile']}")
        conn.execute("SELECT public.victim_prove(%s)", (owner,))
        assert_all_refused(conn, owner, victim_iid)  # the row says the owner, but it proves only the victim
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()
    assert admin.rows("SELECT pid, role::text FROM pgflow.caller_proofs") == [(pid, roles["victim"])]
    for statement in ("DELETE FROM pgflow.caller_proofs", "SELECT * FROM pgflow.caller_proofs",
                      "UPDATE pgflow.caller_proofs SET role = current_user"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            hostile.run(statement)
    admin.run("DELETE FROM pgflow.caller_proofs")
    assert victim.one("SELECT df.status(%s)", (format(victim_iid, "08x"),)) in ("pending", "running")
    assert_no_definer_acts_as_owner(df_dsn, roles, admin)


def test_a_proof_ends_with_the_start_it_covered(df_dsn, roles, admin, df_engine):
    """Calling the victim's definer function lets the hostile role start as the victim (the victim chose
    so), and nothing more: in the same transaction, every call naming the victim is refused again."""
    victim = session(df_dsn, roles["victim"])
    victim_iid = int(victim.one("SELECT df.start(df.wait_for_signal('go'))"), 16)
    victim.run("CREATE FUNCTION victim_start(q text) RETURNS text LANGUAGE sql SECURITY DEFINER "
               "SET search_path = pg_catalog, pg_temp AS $$ SELECT df.start(q) $$")
    victim.run(f"GRANT EXECUTE ON FUNCTION victim_start(text) TO {roles['hostile']}")
    with psycopg.connect(df_dsn) as conn:
        conn.execute(f"SET SESSION AUTHORIZATION {roles['hostile']}")
        started = conn.execute("SELECT public.victim_start('SELECT 1')").fetchone()[0]
        assert_all_refused(conn, roles["victim"], victim_iid)
        conn.commit()
    assert owner_of(admin, started) == roles["victim"]
    assert admin.one("SELECT count(*) FROM pgflow.caller_proofs") == 0
    assert victim.one("SELECT df.status(%s)", (format(victim_iid, "08x"),)) in ("pending", "running")


def test_a_sql_step_cannot_act_as_the_workers_role_or_anyone_else(df_dsn, roles, admin, df_engine):
    """A worker runs a user's SQL step with its own role as the session's: the step's code naming that role (or,
    the worker being a superuser, any role) as p_caller must be refused; acting as itself still works."""
    hostile = session(df_dsn, roles["hostile"])
    owner = admin.one("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgflow'")
    victim_iid = int(session(df_dsn, roles["victim"]).one("SELECT df.start(df.wait_for_signal('go'))"), 16)
    for name in (owner, roles["victim"]):
        for statement, params in forged_calls(name, victim_iid):
            step = statement % tuple(psycopg.sql.Literal(p).as_string(None) for p in params)
            iid = hostile.one("SELECT df.start(%s)", (step,))
            assert hostile.finish(iid) == "failed", step
            assert "may not act as role" in hostile.one("SELECT error FROM df.instances WHERE id = %s", (iid,))
    own = hostile.one("SELECT df.start($$SELECT pgflow.set_variable('mine', '\"1\"')$$)")
    assert hostile.finish(own) == "completed"
    assert admin.rows("SELECT owner::text, name FROM pgflow.variables") == [(roles["hostile"], "mine")]
    assert admin.one("SELECT df.status(%s)", (format(victim_iid, "08x"),)) in ("pending", "running")


# ------------------------------------------------------------------------------------ forged owners


def test_a_forged_owner_fails_an_instance_not_yet_picked_up_and_changes_nothing_later(df_dsn, roles, admin,
                                                                                       engine_factory):
    """An administrator granted a role UPDATE on submitted_by (it bypasses row-level security): its write
    fails a pending instance (nothing ran, no node failed) and has no effect once the engine runs it; the
    engine never runs as the forged role. A role without the grant cannot use the function behind it."""
    admin.run(f"ALTER ROLE {roles['hostile']} BYPASSRLS; "
              f"GRANT UPDATE (submitted_by) ON df.instances, df.nodes TO {roles['hostile']}")
    victim, hostile = session(df_dsn, roles["victim"]), session(df_dsn, roles["hostile"])
    owner = admin.one("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgflow'")
    forge = "UPDATE df.instances SET submitted_by = %s::regrole WHERE id = %s"
    early = victim.one("SELECT df.start('SELECT 1')")  # no engine yet: pending for sure
    hostile.run(forge, (owner, early))
    hostile.run("UPDATE df.nodes SET submitted_by = %s::regrole WHERE instance_id = %s", (owner, early))
    assert victim.finish(early, 5) == "failed"
    assert "submitted_by was changed" in admin.one("SELECT error FROM df.instances WHERE id = %s", (early,))
    assert admin.one("SELECT count(*) FROM df.nodes WHERE instance_id = %s AND status = 'failed'", (early,)) == 0
    victim.run("CREATE TABLE ran_as (who text); GRANT INSERT ON ran_as TO PUBLIC")
    engine_factory().start(concurrency=1)
    late = victim.one("SELECT df.start(df.sleep(1) ~> 'INSERT INTO ran_as SELECT current_user')")
    wait_until(lambda: victim.one("SELECT df.status(%s)", (late,)) == "running", 30, "the instance to run")
    hostile.run(forge, (owner, late))
    assert victim.finish(late) == "completed"
    assert victim.rows("SELECT who FROM ran_as") == [(roles["victim"],)]
    assert owner_of(admin, late) == roles["victim"]
    plain = session(df_dsn, roles["plain"])
    pending = plain.one("SELECT df.start(df.wait_for_signal('go'))")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="submitted_by"):
        plain.run("SELECT df._owner_forged(%s)", (int(pending, 16),))


# ------------------------------------------------------------------------------------ typed results


def test_a_bytea_column_fails_the_sql_step_in_both_apis(user, df_engine):
    iid = start(user, "$$SELECT 'hello'::bytea AS b$$", "bytes")
    assert user.finish(iid) == "failed"
    error = user.one("SELECT error FROM df.nodes WHERE instance_id = %s AND status = 'failed'", (iid,))
    assert "unsupported column type bytea" in error
    own = user.one("SELECT pgflow.start($$SELECT 'hello'::bytea AS b$$)")
    assert user.one("SELECT (pgflow.await_instance(%s, 60))->>'status'", (own,)) == "failed"
    encoded = start(user, "$$SELECT encode('hello'::bytea, 'base64') AS b$$")  # what to write instead
    assert user.finish(encoded) == "completed"


# ------------------------------------------------------------------------------------ history


def test_history_shows_the_start_and_end_each_instance_implies(user, df_engine):
    done = start(user, "'SELECT 1'")
    failed = start(user, "'SELECT 1/0'")
    waiting = start(user, "df.wait_for_signal('never')")
    assert user.finish(done) == "completed" and user.finish(failed) == "failed"
    user.run("SELECT df.cancel(%s, 'stop')", (waiting,))
    assert user.finish(waiting) == "cancelled"
    events = {iid: user.rows("SELECT execution_id, event_id, event_type, event_data::jsonb FROM df.history "
                             "WHERE instance_id = %s ORDER BY event_id", (iid,)) for iid in (done, failed, waiting)}
    assert [e[2] for e in events[done]] == ["OrchestrationStarted", "OrchestrationCompleted"]
    for iid in (failed, waiting):  # a cancellation ends the orchestration as a failure, as in pg_durable
        assert [e[2] for e in events[iid]] == ["OrchestrationStarted", "OrchestrationFailed"]
    for iid, rows in events.items():
        assert all(data["instance_id"] == iid and data["execution_id"] == execution == 1
                   for execution, _, _, data in rows)
    assert user.one("SELECT df.duroxide_schema()") == "df"


# ------------------------------------------------------------------------------------ readiness


def test_df_start_is_refused_while_worker_ready_is_marked_down(admin, df_dsn, engine_factory):
    pending = start(admin, "'SELECT 1'", "no-engine-yet")  # no engine: accepted, it waits durably
    assert admin.one("SELECT df.status(%s)", (pending,)) == "pending"
    with psycopg.connect(df_dsn) as conn:  # one transaction: pg_stat_activity is re-read on every poll
        assert conn.execute("SELECT count(*) FROM df._worker_ready").fetchone() == (0,)
        engine_factory().start(concurrency=1)
        wait_until(lambda: conn.execute("SELECT schema_version FROM df._worker_ready").fetchone(), 30,
                   "df._worker_ready to show the engine within one transaction")
        # the view may first show the supervisor's own short connection: once a worker process has run the
        # pending instance, the engine's row stays
        assert admin.finish(pending) == "completed"
        assert conn.execute("UPDATE df._worker_ready SET schema_version = -1").rowcount == 1
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="worker_ready"), conn.transaction():
            conn.execute("SELECT df.start('SELECT 1', 'held-back')")
        assert conn.execute("UPDATE df._worker_ready SET schema_version = 1").rowcount == 1
        accepted = conn.execute("SELECT df.start('SELECT 1', 'after')").fetchone()[0]
    assert admin.finish(accepted) == "completed"
    assert admin.one("SELECT count(*) FROM df.instances WHERE label = 'held-back'") == 0
    assert admin.rows("SELECT schema_version FROM df._worker_ready") == [(1,)]  # the mark lasted one transaction
