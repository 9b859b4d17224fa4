"""Crashes lose nothing: kill -9 of a worker process or a coordinator, and a PostgreSQL restart, in the middle
of a run of real OS processes. Afterwards every instance completes, every SQL step's effect is present
exactly once, and no Python step ran more often than its attempts allow."""

from __future__ import annotations

import os
import signal

import psycopg
import pytest
from conftest import restart_postgres, run_sql, wait_until
from support import sample_flows as sf

import pgflow

pytestmark = pytest.mark.slow

INSTANCES = 24


def start_all(dsn, sleep=0.2):
    return [pgflow.start(sf.effects, {"i": i, "sleep": sleep}, dsn=dsn) for i in range(INSTANCES)]


def wait_all(dsn, ids, timeout=120.0):
    return [pgflow.wait(iid, timeout, dsn=dsn) for iid in ids]


def count(dsn, sql):
    return run_sql(dsn, sql)[0][0]


def assert_effects(dsn, statuses, max_runs_per_step):
    assert [s.status for s in statuses] == ["completed"] * INSTANCES, [s.error for s in statuses]
    assert all(s.output == {"rowcount": 1} for s in statuses)
    with psycopg.connect(dsn) as conn:
        effects = conn.execute("SELECT instance_id, count(*) FROM sql_effects GROUP BY 1 ORDER BY 1").fetchall()
        runs = conn.execute("SELECT key, count(*), max(attempt) FROM py_runs GROUP BY 1").fetchall()
        in_flight = conn.execute("SELECT count(*) FROM pgmq.q_pgflow").fetchone()[0]
    assert effects == [(i, 1) for i in range(INSTANCES)], "a SQL step's effect is missing or duplicated"
    assert len(runs) == INSTANCES
    assert max(r[1] for r in runs) <= max_runs_per_step
    # attempts count deliveries; a task claimed in a batch but not started when the worker died spends one
    assert all(r[1] <= r[2] for r in runs), "a step ran more often than its attempts"
    assert in_flight == 0
    return runs


def steps_in_hand(dsn):
    """Keys of the Python steps whose current attempt has started (its run is recorded) and not finished."""
    return {key for (key,) in run_sql(dsn, "SELECT r.key FROM py_runs r JOIN pgflow.steps s"
                                           " ON r.key = format('pgflow:%%s:%%s', s.instance_id, s.step_name)"
                                           " AND r.attempt = s.attempt WHERE s.status = 'running'")}


def test_kill_9_of_worker_processes_mid_step(effects_db, engine_factory):
    dsn = effects_db
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn)
    engine.coordinator()
    worker = engine.worker(concurrency=2)
    ids = start_all(dsn, sleep=0.4)
    killed_mid_step: set[str] = set()
    for _ in range(5):  # until a kill lands mid-step (a step may end between the look and the kill)
        children = engine.worker_children(worker, 2)
        wait_until(lambda: len(steps_in_hand(dsn)) >= 2, 60, "both processes to be in the middle of a step")
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
        killed_mid_step = steps_in_hand(dsn)  # their processes are gone: these steps were cut short
        if killed_mid_step:
            break
    assert killed_mid_step, "no kill landed in the middle of a step"
    statuses = wait_all(dsn, ids)
    runs = assert_effects(dsn, statuses, max_runs_per_step=sf.effects.max_attempts)
    # (one of them may have been committing its acknowledgement at the very moment of the kill)
    assert any(n > 1 for key, n, _ in runs if key in killed_mid_step), "the killed steps should have been run again"
    assert worker.poll() is None, "the supervisor survives and restarts its children"


def test_kill_9_of_a_coordinator_while_another_runs(effects_db, engine_factory):
    dsn = effects_db
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn)
    doomed = engine.coordinator()
    engine.coordinator()
    engine.worker(concurrency=2)
    ids = start_all(dsn, sleep=0.05)
    wait_until(lambda: count(dsn, "SELECT count(*) FROM sql_effects") >= 3, what="first instances")
    doomed.send_signal(signal.SIGKILL)
    statuses = wait_all(dsn, ids)
    runs = assert_effects(dsn, statuses, max_runs_per_step=1)  # no worker died: every step ran once
    assert len(runs) == INSTANCES


def test_postgres_restart_mid_run(effects_db, engine_factory, server):
    dsn = effects_db
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn)
    engine.start(workers=1, concurrency=2)
    ids = start_all(dsn, sleep=0.3)
    wait_until(lambda: count(dsn, "SELECT count(*) FROM sql_effects") >= 2, what="first instances")
    restart_postgres(server)
    statuses = wait_all(dsn, ids, timeout=180)
    assert_effects(dsn, statuses, max_runs_per_step=sf.effects.max_attempts)
    assert all(p.poll() is None for p in engine.procs), "coordinator and workers reconnect instead of dying"


def test_sigterm_drains_a_worker_and_exits_0(effects_db, engine_factory):
    dsn = effects_db
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn)
    engine.coordinator()
    worker = engine.worker(concurrency=1)
    engine.worker_children(worker, 1)
    ids = start_all(dsn, sleep=0.5)
    wait_until(lambda: count(dsn, "SELECT count(*) FROM py_runs") >= 1, what="a step to start")
    worker.terminate()
    assert worker.wait(60) == 0
    # nothing is left marked running by the drained worker: claimed-but-unstarted tasks were given back
    with psycopg.connect(dsn) as conn:
        running = conn.execute("SELECT count(*) FROM pgflow.steps WHERE status = 'running'").fetchone()[0]
    assert running == 0
    engine.worker(concurrency=2)
    statuses = wait_all(dsn, ids)
    assert_effects(dsn, statuses, max_runs_per_step=1)
