"""kill -9 in the middle of the long control-flow scenarios: loops, cron waits, signal waits and races
resume from their checkpoints; SQL steps take effect exactly once."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
from conftest import run_sql as sql
from conftest import wait_until

import pgflow
from pgflow import tree as t

pytestmark = pytest.mark.slow


def kill_worker_processes(engine, worker):
    for child in engine.worker_children(worker, 1):
        os.kill(child.pid, signal.SIGKILL)


def test_while_loop_resumes_at_its_iteration_after_kill_9(dsn, engine_factory):
    sql(dsn, "CREATE TABLE tasks (id int PRIMARY KEY); INSERT INTO tasks SELECT generate_series(1, 30);"
             "CREATE TABLE done (id int)")
    engine = engine_factory(PGFLOW_TIME_SCALE="60")
    engine.coordinator()
    worker = engine.worker(concurrency=1)
    body = ("WITH d AS (DELETE FROM tasks WHERE id = (SELECT min(id) FROM tasks) RETURNING id) "
            "INSERT INTO done SELECT id FROM d RETURNING id")
    iid = pgflow.start(t.loop(t.sleep(3) >> body, while_="SELECT EXISTS (SELECT 1 FROM tasks)"), dsn=dsn)
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM done")[0][0] >= 8, what="eight iterations")
    kill_worker_processes(engine, worker)
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM done")[0][0] >= 16, what="iterations after the kill")
    os.kill(engine.procs[0].pid, signal.SIGKILL)  # the coordinator too, mid-loop
    engine.coordinator()
    st = pgflow.wait(iid, 90, dsn=dsn)
    assert st.status == "completed", st.error
    assert sql(dsn, "SELECT id, count(*) FROM done GROUP BY id ORDER BY id") == [(i, 1) for i in range(1, 31)]


def test_cron_loop_survives_kill_9_of_coordinator_and_worker(dsn, engine_factory):
    sql(dsn, "CREATE TABLE ticks (at timestamptz DEFAULT clock_timestamp())")
    engine = engine_factory(PGFLOW_TIME_SCALE="60")
    coordinator = engine.coordinator()
    worker = engine.worker(concurrency=1)
    body = (t.wait_for_schedule("* * * * *") >> "INSERT INTO ticks DEFAULT VALUES"
            >> t.if_("SELECT count(*) >= 5 FROM ticks", t.brk("SELECT count(*) AS n FROM ticks")))
    iid = pgflow.start(t.loop(body), dsn=dsn)
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM ticks")[0][0] >= 2, what="two ticks")
    coordinator.send_signal(signal.SIGKILL)
    kill_worker_processes(engine, worker)
    time.sleep(1.5)  # a fire time passes while no coordinator runs: it must fire late, not be skipped
    engine.coordinator()
    st = pgflow.wait(iid, 60, dsn=dsn)
    assert st.status == "completed", st.error
    assert st.output == [{"n": 5}]


def test_signal_wait_survives_kill_9_of_everything(dsn, engine_factory):
    sql(dsn, "CREATE TABLE decided (v text)")
    engine = engine_factory()
    coordinator = engine.coordinator()
    worker = engine.worker(concurrency=1)
    node = t.wait_for_signal("go").named("s") >> "INSERT INTO decided VALUES ($s.v) RETURNING v"
    iid = pgflow.start(node, dsn=dsn)
    wait_until(lambda: "[waiting] wait for signal go" in pgflow.explain(iid, dsn=dsn), what="the wait")
    coordinator.send_signal(signal.SIGKILL)
    worker.send_signal(signal.SIGKILL)
    pgflow.signal(iid, "go", {"v": "after the crash"}, dsn=dsn)
    engine.start(concurrency=1)
    st = pgflow.wait(iid, 60, dsn=dsn)
    assert st.status == "completed" and st.output == [{"v": "after the crash"}]
    assert sql(dsn, "SELECT v FROM decided") == [("after the crash",)]


def test_race_is_decided_once_when_the_slow_branch_s_worker_dies(dsn, engine_factory):
    sql(dsn, "CREATE TABLE slow_effect (v int)")
    engine = engine_factory()
    engine.coordinator()
    worker = engine.worker(concurrency=1)
    # the slow step waits for a lock this test holds: it is surely in the middle of its SQL when its worker
    # process is killed, and cannot finish before the timer, however slow the machine
    slow = "INSERT INTO slow_effect SELECT 1 FROM pg_advisory_xact_lock(4242) RETURNING v"
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        iid = pgflow.start(t.race(t.sql(slow), t.sleep(1.5) >> "SELECT 'timer' AS winner"), dsn=dsn)
        wait_until(lambda: sql(dsn, "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                                    " WHERE d.datname = current_database() AND l.locktype = 'advisory'"
                                    " AND l.objid = 4242 AND NOT l.granted") == [(1,)],
                   what="the slow step to wait for the lock")
        kill_worker_processes(engine, worker)
        st = pgflow.wait(iid, 60, dsn=dsn)
    assert st.status == "completed" and st.output == [{"winner": "timer"}]
    # the killed slow step's message comes back (after its visibility timeout) and leaves the queue: it must
    # not run (its branch lost). Its SQL would commit with the message's deletion, so once the queue is empty
    # an effect of it would be there
    wait_until(lambda: sql(dsn, "SELECT count(*) FROM pgmq.q_pgflow") == [(0,)], 60,
               "the killed slow step's message to be handled")
    assert sql(dsn, "SELECT count(*) FROM slow_effect") == [(0,)]
