"""Trust between users (issue 12, the database and coordinator side; issue 13's bug 5). Each test is an attack
by a hostile but legitimately granted role (bob) on another user (alice), with real login roles, a real
coordinator and workers, against a database whose pgflow owner is a superuser and one whose owner is not
(`pgflow init` run by an ordinary role with CREATEROLE that owns the database)."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import httpx
import psycopg
import pytest
from conftest import Engine, pgflow_command, subprocess_env, wait_until
from conftest import run_sql as as_role

import pgflow
from pgflow import InstanceNotFound
from pgflow import tree as t

WAIT = 90  # seconds: a deadline for states the engine reaches, never a timing assertion


def _status(dsn: str, iid: int) -> str:
    return as_role(dsn, "SELECT pgflow.status(%s)->>'status'", (iid,))[0][0]


def _wait_status(dsn: str, iid: int, *statuses: str) -> str:
    wait_until(lambda: _status(dsn, iid) in statuses, WAIT, f"instance {iid} {'/'.join(statuses)}")
    return _status(dsn, iid)


# ------------------------------------------------------------------------------------ trusted definitions

def test_flow_poisoning_a_users_version_with_other_sql_is_refused(site):
    """Attack 2: bob computes the version of alice's workflow (pgflow.tree_shape is public) and registers
    his own SQL under it before alice starts; then under a version of his own choosing for alice's DAG."""
    alice, bob = site.users["alice"], site.users["bob"]
    site.engine()
    good = "INSERT INTO alice_orders VALUES ('from alice') RETURNING v"
    evil = "SELECT current_user::text AS v"
    version = as_role(bob, "SELECT pgflow.shape_version(pgflow.tree_shape(%s::text, 'orders'))", (good,))[0][0]
    evil_shape = as_role(bob, "SELECT pgflow.tree_shape(%s::text, 'orders')", (evil,))[0][0]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="does not match its shape"):
        as_role(bob, "SELECT pgflow.register_flow('orders', %s, NULL, %s)", (version, psycopg.types.json.Jsonb(
            evil_shape)))
    # a forged tree shape whose steps are not its tree's is refused whatever the version
    forged = dict(evil_shape, tree=as_role(bob, "SELECT pgflow.node(%s::text)", (good,))[0][0])
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not those of its tree"):
        as_role(bob, "SELECT pgflow.register_flow('orders', pgflow.shape_version(%s), NULL, %s)",
                (psycopg.types.json.Jsonb(forged), psycopg.types.json.Jsonb(forged)))
    iid = as_role(alice, "SELECT pgflow.start(%s, p_name => 'orders')", (good,))[0][0]
    assert _wait_status(alice, iid, "completed", "failed") == "completed"
    assert pgflow.result(iid, dsn=alice) == [{"v": "from alice"}]
    # a DAG flow: a version that is not its shape's is refused, so bob cannot pre-register alice's
    dag = {"name": "billing", "steps": [{"name": "s", "kind": "sql", "deps": [], "over": None, "flatten": False,
                                         "queue": "pgflow", "max_attempts": 3, "backoff_base": 1.0,
                                         "backoff_cap": 60.0, "timeout": None, "sql": "SELECT 1 AS x"}]}
    dag_version = pgflow.flow.version_hash(dag)
    evil_dag = dict(dag, steps=[dict(dag["steps"][0], sql=evil)])
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="does not match its shape"):
        as_role(bob, "SELECT pgflow.register_flow('billing', %s, NULL, %s)",
                (dag_version, psycopg.types.json.Jsonb(evil_dag)))
    # the database computes the same version as the Python client for the same shape
    assert as_role(bob, "SELECT pgflow.shape_version(%s)", (psycopg.types.json.Jsonb(dag),))[0][0] == dag_version
    # a version already registered with another code reference is refused, never replaced
    as_role(alice, "SELECT pgflow.register_flow('billing', %s, 'alice_mod:flow', %s)",
            (dag_version, psycopg.types.json.Jsonb(dag)))
    with pytest.raises(psycopg.errors.UniqueViolation, match="already registered with code reference"):
        as_role(bob, "SELECT pgflow.register_flow('billing', %s, 'b_mod:flow', %s)",
                (dag_version, psycopg.types.json.Jsonb(dag)))
    assert as_role(site.owner, "SELECT ref FROM pgflow.flows WHERE flow_name = 'billing'") == [("alice_mod:flow",)]


MALFORMED = [("max_attempts", "x"), ("queue", 123), ("queue", "Upper"), ("deps", ["nope"]),
             ("backoff_base", "soon"), ("kind", "shell"), ("timeout", -1), ("priority", 1.5)]


def test_malformed_shapes_are_refused_at_registration(site):
    """Attacks 9 and 10: shapes with fields of the wrong type killed coordinators and workers on every
    delivery. They are refused when registered, with a one-line reason; the engine never sees them."""
    bob = site.users["bob"]
    engine = site.engine()
    step = {"name": "s", "kind": "sql", "deps": [], "over": None, "flatten": False, "queue": "pgflow",
            "max_attempts": 3, "backoff_base": 1.0, "backoff_cap": 60.0, "timeout": None, "sql": "SELECT 1 AS x"}
    for field_name, value in MALFORMED:
        shape = {"name": "bad", "steps": [dict(step, **{field_name: value})]}
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=f"invalid shape.*{field_name}"):
            as_role(bob, "SELECT pgflow.register_flow('bad', pgflow.shape_version(%s), NULL, %s)",
                    (psycopg.types.json.Jsonb(shape), psycopg.types.json.Jsonb(shape)))
    cyclic = {"name": "bad", "steps": [dict(step, name="a", deps=["b"]), dict(step, name="b", deps=["a"])]}
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="cycle"):
        as_role(bob, "SELECT pgflow.register_flow('bad', pgflow.shape_version(%s), NULL, %s)",
                (psycopg.types.json.Jsonb(cyclic), psycopg.types.json.Jsonb(cyclic)))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid queue name"):
        as_role(bob, "SELECT pgflow.ensure_queue('Upper')")
    assert as_role(site.owner, "SELECT count(*) FROM pgflow.flows WHERE flow_name = 'bad'") == [(0,)]
    iid = as_role(site.users["alice"], "SELECT pgflow.start('SELECT 1 AS one')")[0][0]
    assert _wait_status(site.users["alice"], iid, "completed", "failed") == "completed"
    assert all(proc.poll() is None for proc in engine.procs)


# ------------------------------------------------------------------------------------ definer hygiene

def test_every_definer_function_pins_its_search_path_with_pg_temp_last(site):
    """Items 3 and 4: a SECURITY DEFINER function that resolves names through the caller's search_path runs
    the caller's objects as the pgflow owner. Audit of the catalog, not of a list kept by hand."""
    rows = as_role(site.owner, """
        SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p
        WHERE p.pronamespace = 'pgflow'::regnamespace AND p.prosecdef""")
    assert len(rows) >= 10, rows  # the audit saw them
    unsafe = [sig for sig, config in rows
              if not any(re.fullmatch(r"search_path=pg_catalog(, ?\w+)*, ?pg_temp", c) for c in config or [])]
    assert unsafe == []
    # is_admin (row-level security's test) is pinned too, though it is not a definer function
    config = as_role(site.owner, "SELECT proconfig FROM pg_proc WHERE oid = 'pgflow.is_admin()'::regprocedure")
    assert config == [(["search_path=pg_catalog, pg_temp"],)]


def test_a_shadowed_pg_has_role_does_not_make_a_user_admin(site):
    """Attack 3: bob's own pg_has_role first on his search_path made is_admin() true for him: he saw and
    cancelled everyone's instances. Attack 4: a temporary view named pg_namespace flipped may_use."""
    alice, bob = site.users["alice"], site.users["bob"]
    iid = as_role(alice, "SELECT pgflow.start(pgflow.sleep(600))")[0][0]
    with psycopg.connect(bob, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION b.pg_has_role(name, name, text) RETURNS boolean LANGUAGE sql "
                     "AS 'SELECT true'")
        conn.execute("CREATE FUNCTION b.pg_has_role(name, text, text) RETURNS boolean LANGUAGE sql "
                     "AS 'SELECT true'")
        conn.execute("SET search_path = b, pg_catalog, public")
        assert conn.execute("SELECT count(*) FROM pgflow.instances").fetchone() == (0,)
        with pytest.raises(psycopg.errors.NoDataFound):
            conn.execute("SELECT pgflow.cancel(%s)", (iid,))
        conn.execute("CREATE TEMP VIEW pg_namespace AS SELECT 'pgflow'::name AS nspname, "
                     "(SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) AS nspowner")
        conn.execute("SET search_path = pg_temp, b, pg_catalog, public")
        assert conn.execute("SELECT pgflow.may_use('http')").fetchone() == (False,)
        assert conn.execute("SELECT pgflow.is_admin()").fetchone() == (False,)
    assert _status(alice, iid) in ("pending", "running")


def test_users_cannot_insert_instances_wakeups_or_signals_directly(site):
    """Attack 4: rights, limits and quotas were checked only in start_instances; bob inserted instances
    (with secret references and variables of his choosing) and 300,000 wake-ups directly."""
    alice, bob = site.users["alice"], site.users["bob"]
    mine = as_role(bob, "SELECT pgflow.start(pgflow.wait_for_signal('go'))")[0][0]
    version = as_role(bob, "SELECT flow_version FROM pgflow.instances WHERE id = %s", (mine,))[0][0]
    for statement, params in [
        ("INSERT INTO pgflow.instances (flow_name, flow_version, secret_refs) VALUES ('sql', %s, "
         "'{\"k\": \"env:PGFLOW_DSN\"}')", (version,)),
        ("INSERT INTO pgflow.wakeups (instance_id) SELECT %s FROM generate_series(1, 1000)", (mine,)),
        ("INSERT INTO pgflow.signals (instance_id, name) VALUES (%s, 'go')", (mine,)),
    ]:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(bob, statement, params)
    theirs = as_role(alice, "SELECT pgflow.start(pgflow.wait_for_signal('go'))")[0][0]
    with pytest.raises(psycopg.errors.NoDataFound):  # through the function: only his own instances
        as_role(bob, "SELECT pgflow.signal(%s, 'go')", (theirs,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not act as role"):
        as_role(bob, "SELECT pgflow.signal(%s, 'go', NULL, %s)", (theirs, site.names["alice"]))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not act as role"):
        as_role(bob, "SELECT pgflow.start_instances('sql', %s, ARRAY['1'::jsonb], NULL, %s)",
                (version, site.names["alice"]))
    assert as_role(bob, "SELECT pgflow.signal(%s, 'go')", (mine,))[0][0] > 0


# The statements a granted role once could run on pgflow's tables directly: each must be refused.
DIRECT_WRITES = [
    "UPDATE pgflow.instances SET status = 'cancelled' WHERE id = {mine}",
    "UPDATE pgflow.instances SET error = 'x', finished_at = now() WHERE id = {mine}",
    "UPDATE pgflow.steps SET status = 'cancelled' WHERE instance_id = {mine}",
    "DELETE FROM pgflow.instances WHERE id = {mine}",
    "DELETE FROM pgflow.steps WHERE instance_id = {mine}",
    "SELECT 1 FROM pgflow.instances WHERE id = {mine} FOR UPDATE",
    "SELECT 1 FROM pgflow.instances WHERE id = {mine} FOR KEY SHARE",
    "SELECT 1 FROM pgflow.steps WHERE instance_id = {mine} FOR UPDATE SKIP LOCKED",
    "INSERT INTO pgflow.steps (instance_id, step_name, status) VALUES ({mine}, 'forged', 'queued')",
    "INSERT INTO pgflow.wakeups (instance_id) SELECT {mine} FROM generate_series(1, 1000)",
    "UPDATE pgflow.signals SET consumed_at = now() WHERE instance_id = {mine}",
    "INSERT INTO pgflow.variables (name, value) VALUES ('v', '1')",
    "INSERT INTO pgflow.variables (name, secret_ref) VALUES ('s', 'env:PGFLOW_DSN')",
    "UPDATE pgflow.variables SET value = '2'",
    "DELETE FROM pgflow.variables",
    "SELECT 1 FROM pgflow.variables FOR UPDATE",
    "TRUNCATE pgflow.wakeups",
    "DELETE FROM pgflow.http_audit",
    # table locks beyond ACCESS SHARE need a write privilege; DELETE on variables once let a user lock the
    # table every start reads (ACCESS EXCLUSIVE: all starts wait)
    "DO $$ BEGIN LOCK TABLE pgflow.variables IN ACCESS EXCLUSIVE MODE; END $$",
    "DO $$ BEGIN LOCK TABLE pgflow.instances IN EXCLUSIVE MODE; END $$",
    "DO $$ BEGIN LOCK TABLE pgflow.steps IN SHARE MODE; END $$",
    "DO $$ BEGIN LOCK TABLE pgflow.wakeups IN ROW EXCLUSIVE MODE; END $$",
]


def test_users_write_only_through_functions(site):
    """Done-criterion 3: granted roles held UPDATE on their own instance and step rows (cancel and retry ran
    as the caller), and INSERT/UPDATE/DELETE on variables: enough to forge statuses, lock rows the
    coordinator needs, or write around the functions' checks. Every direct write (and row lock) is refused;
    the functions check ownership themselves: another user's instance is "not found" (and never locked),
    the caller's own and an administrator's any are cancelled and retried."""
    alice, bob, boss = site.users["alice"], site.users["bob"], site.users["boss"]
    site.engine()
    mine = as_role(bob, "SELECT pgflow.start(pgflow.wait_for_signal('go'))")[0][0]
    pgflow.set_variable("colour", "blue", dsn=bob)
    for statement in DIRECT_WRITES:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(bob, statement.format(mine=mine))
    assert _status(bob, mine) in ("pending", "running")
    failing = "SELECT pgflow.start(pgflow.with_options('SELECT 1/0 AS x', '{\"max_attempts\": 1}'))"
    theirs = as_role(alice, "SELECT pgflow.start(pgflow.wait_for_signal('go'))")[0][0]
    theirs_failed = as_role(alice, failing)[0][0]
    assert _wait_status(alice, theirs_failed, "completed", "failed") == "failed"
    pgflow.set_variable("colour", "red", dsn=alice)
    for statement in ("SELECT pgflow.cancel(%s)", "SELECT pgflow.retry(%s)"):
        for iid in (theirs, theirs_failed):
            with pytest.raises(psycopg.errors.NoDataFound):
                as_role(bob, statement, (iid,))
    with pytest.raises(InstanceNotFound):
        pgflow.cancel(theirs, dsn=bob)
    with pytest.raises(InstanceNotFound):
        pgflow.retry(theirs_failed, dsn=bob)
    for statement in ("SELECT pgflow.cancel_instance(%s, 'x', %s)", "SELECT pgflow.retry_instance(%s, %s)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not act as role"):
            as_role(bob, statement, (theirs, site.names["alice"]))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not act as role"):
        as_role(bob, "SELECT pgflow.set_variable('colour', '\"green\"', %s)", (site.names["alice"],))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the internal half of a retry is not granted
        as_role(bob, "SELECT pgflow._reopen_failed_steps(%s)", (theirs_failed,))
    # a failed cancel in bob's open transaction holds no lock on alice's row
    with psycopg.connect(bob) as spy, psycopg.connect(site.owner, autocommit=True) as probe:
        assert spy.execute("SELECT pgflow.cancel_instance(%s, 'x')", (theirs,)).fetchone() == (None,)
        assert probe.execute("SELECT 1 FROM pgflow.instances WHERE id = %s FOR UPDATE NOWAIT",
                             (theirs,)).fetchone() == (1,)
    as_role(bob, "SELECT pgflow.clearvars()")
    assert _status(alice, theirs) in ("pending", "running")
    assert _status(alice, theirs_failed) == "failed"
    assert as_role(alice, "SELECT pgflow.getvar('colour')") == [("red",)]
    assert as_role(bob, "SELECT pgflow.getvar('colour')") == [(None,)]
    # the caller's own: cancel, retry and variables work through the functions (SQL and Python)
    assert pgflow.cancel(mine, dsn=bob) == "cancelled"
    mine_failed = as_role(bob, failing)[0][0]
    assert _wait_status(bob, mine_failed, "completed", "failed") == "failed"
    assert pgflow.retry(mine_failed, dsn=bob) in ("pending", "running", "failed")
    assert _wait_status(bob, mine_failed, "completed", "failed") == "failed"
    assert as_role(bob, "SELECT pgflow.retry(%s)", (mine_failed,)) == [("retried",)]
    as_role(bob, "SELECT pgflow.setvar('n', '1'), pgflow.unsetvar('n')")
    # an administrator controls everyone's
    assert as_role(boss, "SELECT pgflow.cancel(%s)", (theirs,)) == [("cancelled",)]
    assert as_role(boss, "SELECT pgflow.retry(%s)", (theirs_failed,)) == [("retried",)]


# ------------------------------------------------------------------------------------ one-statement outages

def test_an_open_transaction_on_an_instance_does_not_stall_the_coordinator(site):
    """Issue 13 bug 5 and attack 11: a user's open transaction holding its instance (a signal, a cancel, a
    row lock) made the coordinator's lock wait, and every other instance with it. (A row lock of the user's
    own making is refused now: test_users_write_only_through_functions; the owner's stands in for it.)"""
    alice, bob = site.users["alice"], site.users["bob"]
    site.engine()
    signalled = as_role(bob, "SELECT pgflow.start(pgflow.sleep(1) ~> 'SELECT 1 AS a')")[0][0]
    cancelled = as_role(bob, "SELECT pgflow.start(pgflow.sleep(1) ~> 'SELECT 2 AS b')")[0][0]
    locked = as_role(bob, "SELECT pgflow.start(pgflow.sleep(1) ~> 'SELECT 3 AS c')")[0][0]
    for iid in (signalled, cancelled, locked):
        _wait_status(bob, iid, "running")
    with psycopg.connect(bob) as a, psycopg.connect(bob) as b, psycopg.connect(site.owner) as c:
        a.execute("SELECT pgflow.signal(%s, 'other', '{}')", (signalled,))
        b.execute("SELECT pgflow.cancel(%s)", (cancelled,))
        c.execute("SELECT 1 FROM pgflow.instances WHERE id = %s FOR UPDATE", (locked,))
        # the three timers fall due while the transactions stay open; an unrelated start must still complete
        unrelated = as_role(alice, "SELECT pgflow.start('SELECT 1 AS one')")[0][0]
        assert _wait_status(alice, unrelated, "completed", "failed") == "completed"
        later = as_role(alice, "SELECT pgflow.start(pgflow.sleep(1.5) ~> 'SELECT 2 AS two')")[0][0]
        assert _wait_status(alice, later, "completed", "failed") == "completed"
        a.commit()
        b.commit()
        c.commit()
    # the skipped instances are looked at again once released
    assert _wait_status(bob, signalled, "completed", "failed") == "completed"
    assert _wait_status(bob, locked, "completed", "failed") == "completed"
    assert _status(bob, cancelled) == "cancelled"


def test_advisory_lock_keys_stop_neither_maintenance_nor_init(site):
    """Attack 11: pg_advisory_lock(hashtext('pgflow.maintenance')) stopped retention and the safety net;
    pg_advisory_lock(7406111) hung `pgflow init`."""
    bob = site.users["bob"]
    with psycopg.connect(bob, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('pgflow.maintenance')), pg_advisory_lock(7406111)")
        init = subprocess.run(pgflow_command("init", "--dsn", site.owner), env=subprocess_env(),
                              capture_output=True, text=True, timeout=WAIT)
        assert init.returncode == 0, init.stderr
        site.engine("--retention", "1", "--maintenance-every", "0.2")
        iid = as_role(bob, "SELECT pgflow.start('SELECT 1 AS one')")[0][0]
        _wait_status(bob, iid, "completed")
        # retention (1 s) deletes the finished instance while bob holds the advisory keys
        wait_until(lambda: as_role(site.owner, "SELECT count(*) FROM pgflow.instances WHERE id = %s",
                                   (iid,)) == [(0,)], WAIT, "retention to delete the finished instance")


def test_a_users_open_transaction_does_not_hang_init(site):
    """Attack 11's cousin: bob opens a transaction that reads pgflow.migrations (and starts an instance) and
    leaves it open. `pgflow init` (every deployment runs it) waited for him: its no-op ALTER TABLE ... ADD
    COLUMN IF NOT EXISTS needed an exclusive lock, and every engine process starting queued behind it. An
    init with nothing to migrate takes no lock he holds; one that must wait, under a lock_timeout, is one
    clear line."""
    with psycopg.connect(site.users["bob"]) as held:
        held.execute("SELECT count(*) FROM pgflow.migrations")
        held.execute("SELECT pgflow.start('SELECT 1 AS one')")
        init = subprocess.run(pgflow_command("init", "--dsn", site.owner), env=subprocess_env(),
                              capture_output=True, text=True, timeout=WAIT)
        assert init.returncode == 0 and "already up to date" in init.stdout, init.stderr
    with psycopg.connect(site.owner) as held:  # a lock init needs (only the owner can take it)
        held.execute("LOCK TABLE pgflow.migrations IN ACCESS EXCLUSIVE MODE")
        init = subprocess.run(pgflow_command("init", "--dsn", site.owner),
                              env=subprocess_env(PGOPTIONS="-c lock_timeout=500ms"),
                              capture_output=True, text=True, timeout=WAIT)
    assert init.returncode == 1 and "not granted within lock_timeout" in init.stderr, init.stderr
    assert "Traceback" not in init.stderr and len(init.stderr.strip().splitlines()) == 1, init.stderr


def test_a_poisoned_instance_fails_alone_and_the_coordinator_lives(site):
    """Attack 9: one instance the coordinator cannot handle (here an input nested 1,100 deep, written by
    the owner as data from before the limits existed) aborted the whole batch, and every restart died on
    it again. Now it fails alone, with the reason, its wake-up gone; the others in its batch complete."""
    alice = site.users["alice"]
    others = [as_role(alice, "SELECT pgflow.start(%s)", (f"SELECT {n} AS n",))[0][0] for n in range(5)]
    poison = as_role(site.owner, "SELECT pgflow.start('SELECT 1 AS one')")[0][0]
    deep = "[" * 1100 + "]" * 1100
    as_role(site.owner, "UPDATE pgflow.instances SET input = %s::jsonb WHERE id = %s", (deep, poison))
    engine = site.engine()
    for iid in others:
        assert _wait_status(alice, iid, "completed", "failed") == "completed"
    assert _wait_status(site.owner, poison, "completed", "failed") == "failed"
    error = as_role(site.owner, "SELECT error FROM pgflow.instances WHERE id = %s", (poison,))[0][0]
    assert "cannot run this instance" in error
    assert as_role(site.owner, "SELECT count(*) FROM pgflow.wakeups WHERE instance_id = %s", (poison,)) == [(0,)]
    assert engine.procs[0].poll() is None
    after = as_role(alice, "SELECT pgflow.start('SELECT 2 AS two')")[0][0]
    assert _wait_status(alice, after, "completed", "failed") == "completed"


def test_deep_and_huge_inputs_are_refused_at_start(site):
    """Attack 9 through the front door: a 300-deep input and a 17 MiB input are refused by the start itself,
    with a clear error, before anything is written."""
    bob = site.users["bob"]
    with pytest.raises(psycopg.errors.StatementTooComplex, match="deeper than 100 levels"):
        as_role(bob, "SELECT pgflow.start('SELECT 1', (repeat('[', 300) || repeat(']', 300))::jsonb)")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="over the 16777216 bytes allowed"):
        as_role(bob, "SELECT pgflow.start('SELECT 1', jsonb_build_array(repeat('x', 17 * 1024 * 1024)))")
    assert as_role(bob, "SELECT count(*) FROM pgflow.instances") == [(0,)]
    # an administrator may allow more (or less) per role
    as_role(site.owner, "SELECT pgflow.set_quota(%s, p_max_input_depth => 3)", (site.names["bob"],))
    with pytest.raises(psycopg.errors.StatementTooComplex, match="deeper than 3 levels"):
        as_role(bob, "SELECT pgflow.start('SELECT 1', '[[[[1]]]]')")
    assert as_role(bob, "SELECT pgflow.start('SELECT 1', '[[[1]]]')")[0][0] > 0  # three levels: allowed


def test_per_role_quotas_hold_with_clear_errors(site):
    """Attack 12: with no quotas, one user's 300,000 wake-ups or 30,000-wide map delayed everyone. An
    administrator sets per-role quotas; the defaults apply to every other role."""
    alice, bob, boss = site.users["alice"], site.users["bob"], site.users["boss"]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # users cannot set their own quotas
        as_role(bob, "SELECT pgflow.set_quota(%s, p_max_open_instances => 1000000000)", (site.names["bob"],))
    as_role(boss, "SELECT pgflow.set_quota(%s, p_max_open_instances => 2, p_max_map_width => 3, "
                  "p_max_queues => 1, p_max_pending_signals => 2)", (site.names["bob"],))
    waiting = [as_role(bob, "SELECT pgflow.start(pgflow.wait_for_signal('go'))")[0][0] for _ in range(2)]
    with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="open instances.*quota of 2"):
        as_role(bob, "SELECT pgflow.start('SELECT 1')")
    as_role(bob, "SELECT pgflow.signal(%s, 'x')", (waiting[0],))
    as_role(bob, "SELECT pgflow.signal(%s, 'x')", (waiting[0],))
    with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="signals not yet received"):
        as_role(bob, "SELECT pgflow.signal(%s, 'x')", (waiting[1],))
    as_role(bob, "SELECT pgflow.ensure_queue('bob_one')")
    with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="queues, its quota"):
        as_role(bob, "SELECT pgflow.ensure_queue('bob_two')")
    for iid in waiting:
        as_role(bob, "SELECT pgflow.cancel(%s)", (iid,))
    # a map wider than the quota fails its instance with the reason; alice (the defaults) is not limited
    site.engine()
    from support.sample_flows import input_map

    wide = pgflow.start(input_map, list(range(10)), dsn=bob)
    assert _wait_status(bob, wide, "completed", "failed") == "failed"
    assert "over role" in as_role(bob, "SELECT error FROM pgflow.instances WHERE id = %s", (wide,))[0][0]
    fine = pgflow.start(input_map, list(range(10)), dsn=alice)
    assert pgflow.wait(fine, WAIT, dsn=alice).output == [x * 2 for x in range(10)]
    assert as_role(boss, "SELECT max_open_instances FROM pgflow.quotas_of(%s)", (site.names["bob"],)) == [(2,)]


def test_the_open_instance_quota_counts_only_when_its_bound_passes_it(site):
    """A start bounds the role's open instances with two index probes (its oldest open instance, anyone's
    newest) and counts them only when that bound passes the quota. Other users' instances widen the bound
    but must never refuse a start the exact count allows; the bound is never below the count."""
    alice, bob, boss = site.users["alice"], site.users["bob"], site.users["boss"]
    as_role(boss, "SELECT pgflow.set_quota(%s, p_max_open_instances => 3)", (site.names["bob"],))
    first = as_role(bob, "SELECT pgflow.start(pgflow.wait_for_signal('go'))")[0][0]
    as_role(alice, "SELECT count(pgflow.start(pgflow.wait_for_signal('go'))) FROM generate_series(1, 5)")
    later = [as_role(bob, "SELECT pgflow.start(pgflow.wait_for_signal('go'))")[0][0] for _ in range(2)]
    with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="3 open instances.*quota of 3"):
        as_role(bob, "SELECT pgflow.start('SELECT 1')")
    as_role(bob, "SELECT pgflow.cancel(%s)", (first,))  # the oldest one closes: the bound shrinks to exact
    as_role(bob, "SELECT pgflow.start('SELECT 1')")
    bounds = as_role(site.owner, """
        SELECT r.rolname, pgflow.open_instances_bound(r.rolname),
               (SELECT count(*) FROM pgflow.instances i WHERE i.owner = r.rolname
                  AND i.status = ANY (pgflow.open_instance_statuses()))
        FROM pg_roles r WHERE r.rolname = ANY (%s)""", (list(site.names.values()),))
    assert {name for name, _, _ in bounds} == set(site.names.values())
    assert all(bound >= count for _, bound, count in bounds), bounds
    assert dict((n, c) for n, _, c in bounds)[site.names["bob"]] == 3, later


def test_a_queue_depth_quota_fails_the_map_that_would_pass_it(site):
    """Attack 12: bob's maps filled the queues (30,000 tasks delayed alice's instance by 123 s), each one
    within the map-width quota. A per-role queue-depth quota counts the tasks a role has on queues: the map
    that would pass it fails its instance with the reason; other roles (the defaults) are not limited."""
    alice, bob, boss = site.users["alice"], site.users["bob"], site.users["boss"]
    from support.sample_flows import input_map

    sql_map = pgflow.Flow("bob_sql_map")
    sql_map.sql("echo", "SELECT $item AS v", over=pgflow.INPUT)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(bob, "SELECT pgflow.set_quota(%s, p_max_queued_tasks => 1000000000)", (site.names["bob"],))
    as_role(boss, "SELECT pgflow.set_quota(%s, p_max_queued_tasks => 5)", (site.names["bob"],))
    assert as_role(boss, "SELECT max_queued_tasks FROM pgflow.quotas_of(%s)", (site.names["bob"],)) == [(5,)]
    coordinator = site.engine(workers=0)  # nothing takes the tasks off the queue
    first = pgflow.start(sql_map, list(range(4)), dsn=bob)
    wait_until(lambda: as_role(bob, "SELECT count(*) FROM pgflow.steps WHERE instance_id = %s AND task_index >= 0",
                               (first,)) == [(4,)], WAIT, "bob's first map to fan out")
    second = pgflow.start(sql_map, list(range(3)), dsn=bob)
    assert _wait_status(bob, second, "completed", "failed") == "failed"
    error = as_role(bob, "SELECT error FROM pgflow.instances WHERE id = %s", (second,))[0][0]
    assert "queue-depth quota of 5" in error and "has 4 on queues" in error, error
    theirs = pgflow.start(input_map, list(range(10)), dsn=alice)
    coordinator.worker()
    assert pgflow.wait(theirs, WAIT, dsn=alice).output == [x * 2 for x in range(10)]
    assert pgflow.wait(first, WAIT, dsn=bob).status == "completed"
    # once the queue has drained, the same map is admitted again
    assert pgflow.wait(pgflow.start(sql_map, list(range(3)), dsn=bob), WAIT, dsn=bob).status == "completed"


# ------------------------------------------------------------------------------------ leaks

def test_notifications_name_no_other_users_instances(site):
    """Leak: LISTEN pgflow_instance_done showed every user's instance ids. Finished instances are notified
    on a channel of their owner's, named by a token only the owner can read."""
    alice, bob = site.users["alice"], site.users["bob"]
    site.engine()
    with psycopg.connect(bob, autocommit=True) as spy:
        bob_channel = spy.execute("SELECT pgflow.done_channel()").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not act as role"):
            spy.execute("SELECT pgflow.done_channel(%s)", (site.names["alice"],))
        assert spy.execute("SELECT count(*) FROM pgflow.role_channels").fetchone() == (1,)
        spy.execute("LISTEN pgflow_instance_done")
        spy.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(bob_channel)))
        with psycopg.connect(alice, autocommit=True) as owner:
            alice_channel = owner.execute("SELECT pgflow.done_channel()").fetchone()[0]
            assert alice_channel != bob_channel
            owner.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(alice_channel)))
            iid = owner.execute("SELECT pgflow.start('SELECT 1 AS one')").fetchone()[0]
            heard = []
            deadline = time.monotonic() + WAIT
            while str(iid) not in heard and time.monotonic() < deadline:
                heard += [n.payload for n in owner.notifies(timeout=1, stop_after=1)]
            assert str(iid) in heard
        assert [n.payload for n in spy.notifies(timeout=0.5)] == []
    # the Python client waits on its own channel
    assert pgflow.wait(pgflow.start(t.sql("SELECT 2 AS two"), dsn=alice), WAIT, dsn=alice).status == "completed"


def test_flows_and_rights_of_other_users_are_not_readable(site):
    """Leaks: pgflow.flows had no row-level security (alice's SQL text readable by bob), and
    may_use(kind, other_role) revealed others' rights."""
    alice, bob, boss = site.users["alice"], site.users["bob"], site.users["boss"]
    as_role(alice, "SELECT pgflow.start('SELECT ''alice secret plan'' AS s', p_name => 'alice_flow')")
    assert as_role(alice, "SELECT count(*) FROM pgflow.flows WHERE strpos(shape::text, 'alice secret') > 0") == [(1,)]
    assert as_role(bob, "SELECT count(*) FROM pgflow.flows") == [(0,)]
    assert as_role(bob, "SELECT count(*) FROM pgflow.flow_steps") == [(0,)]
    assert as_role(bob, "SELECT count(*) FROM pgflow.flow_registrations") == [(0,)]
    assert as_role(boss, "SELECT count(*) FROM pgflow.flows WHERE flow_name = 'alice_flow'") == [(1,)]
    # bob cannot start alice's registered flow by name either
    version = as_role(alice, "SELECT version FROM pgflow.flows WHERE flow_name = 'alice_flow'")[0][0]
    with pytest.raises(psycopg.errors.NoDataFound, match="not registered"):
        as_role(bob, "SELECT pgflow.start_instance('alice_flow', %s, NULL, NULL)", (version,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not act as role"):
        as_role(bob, "SELECT pgflow.may_use('http', %s)", (site.names["alice"],))
    assert as_role(alice, "SELECT pgflow.may_use('http')") == [(True,)]
    assert as_role(bob, "SELECT pgflow.may_use('http')") == [(False,)]
    assert as_role(boss, "SELECT pgflow.may_use('http', %s)", (site.names["alice"],)) == [(True,)]


def test_pg_monitor_members_read_no_queue_messages(site, server):
    """Leak: pgmq grants pg_monitor SELECT on its tables; queue messages and archives carry inputs."""
    alice, bob = site.users["alice"], site.users["bob"]
    with psycopg.connect(server[0], autocommit=True) as conn:
        conn.execute(f'GRANT pg_monitor TO "{site.names["bob"]}"')
    try:
        as_role(site.owner, "SELECT pgflow.ensure_queue('fresh_q')")
        as_role(alice, "SELECT pgflow.start('SELECT 1', '{\"card\": \"4111\"}')")
        for table in ("pgmq.q_pgflow", "pgmq.a_pgflow", "pgmq.q_fresh_q", "pgmq.a_fresh_q"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                as_role(bob, f"SELECT count(*) FROM {table}")
    finally:
        with psycopg.connect(server[0], autocommit=True) as conn:
            conn.execute(f'REVOKE pg_monitor FROM "{site.names["bob"]}"')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_do_not_name_users_flows_unless_opted_in(site):
    """Leak: the unauthenticated /metrics listed every user's flow names."""
    alice = site.users["alice"]
    quiet, loud = _free_port(), _free_port()
    site.engine("--metrics-port", str(quiet), "--maintenance-every", "0.2")
    engine = Engine(site.owner, subprocess_env())
    site.engines.append(engine)
    engine.coordinator("--metrics-port", str(loud), "--metrics-flow-labels", "--maintenance-every", "0.2")
    iid = as_role(alice, "SELECT pgflow.start('SELECT 1 AS one', p_name => 'alice_private_flow')")[0][0]
    _wait_status(alice, iid, "completed")

    def page(port: int) -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return ""

    wait_until(lambda: 'flow="other"' in page(quiet) and "alice_private_flow" in page(loud), WAIT,
               "the instance in both coordinators' metrics")
    assert "alice_private_flow" not in page(quiet)


# ------------------------------------------------------------------------------------ operator input

@pytest.mark.parametrize("args, message", [
    (("--retention", "-5"), "--retention"),
    (("--batch", "-1"), "--batch"),
    (("--batch", "0"), "--batch"),
    (("--maintenance-every", "0"), "--maintenance-every"),
    (("--metrics-port", "70000"), "--metrics-port"),
])
def test_coordinator_options_out_of_range_are_one_clear_line(site, args, message):
    """Operator input: `--retention -5` deleted every finished instance at once; `--batch -1` and
    `--dsn not-a-dsn` printed tracebacks."""
    iid = as_role(site.users["alice"], "SELECT pgflow.start('SELECT 1 AS one')")[0][0]
    run = subprocess.run(pgflow_command("coordinator", "--dsn", site.owner, *args), env=subprocess_env(),
                         capture_output=True, text=True, timeout=WAIT)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert as_role(site.owner, "SELECT status FROM pgflow.instances WHERE id = %s", (iid,)) == [("pending",)]


@pytest.mark.parametrize("command", ["coordinator", "worker", "status"])
def test_a_malformed_dsn_is_one_clear_line(command):
    extra = ("1",) if command == "status" else ()
    run = subprocess.run(pgflow_command(command, "--dsn", "not-a-dsn", *extra), env=subprocess_env(),
                         capture_output=True, text=True, timeout=WAIT)
    assert run.returncode == 2
    assert "not a PostgreSQL connection string" in run.stderr and "Traceback" not in run.stderr
    assert "not-a-dsn" not in run.stderr.split("Error:")[-1]

