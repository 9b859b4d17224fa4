"""The functions every step passes through (enqueue_tasks, read_tasks, claim_tasks, complete_tasks) keep their
plans for the session, with sequential scans off (07_enqueue.sql). The danger of a kept plan: it was made
when the engine's tables were nearly empty, when reading a table whole is cheaper than probing an index, and
it is still used once they hold thousands of rows. These tests make exactly that happen."""

from __future__ import annotations

import psycopg
import pytest
from conftest import run_sql
from support import claim_flows as cf

import pgflow
from pgflow.engine.coordinator import Coordinator

ENGINE_TABLES = ("steps", "instances", "wakeups")


@pytest.fixture
def coordinator(dsn):
    c = Coordinator(dsn, maintenance_every=3600, vacuum_every=0)
    c._connect()
    yield c
    c._close()


def schedule(coordinator: Coordinator) -> None:
    while coordinator.process_batch():
        pass


def one_step_cycle(conn: psycopg.Connection) -> int:
    """What a step costs the engine, in the caller's transaction: a read and claim, the checkpoint, and an
    enqueue of a new task row (its foreign-key check reads pgflow.instances). Returns the tasks read."""
    claimed = conn.execute("SELECT msg_id, instance_id, step_name, task_index, attempt "
                           "FROM pgflow.read_tasks('fair', 30, 5)").fetchall()
    ids, instances, steps, tasks, attempts = (list(c) for c in zip(*claimed, strict=True))
    conn.execute("SELECT pgflow.complete_tasks('fair', %s, %s, %s, %s, %s, array_fill('1'::jsonb, ARRAY[%s]))",
                 (ids, instances, steps, tasks, attempts, len(ids)))
    conn.execute("SELECT pgflow.enqueue_tasks('fair', ARRAY[%s::bigint], ARRAY['tick'], ARRAY[1000000], "
                 "ARRAY['{}'::jsonb])", (instances[0],))
    return len(ids)


def sequential_scans(conn: psycopg.Connection) -> dict[str, int]:
    """Sequential scans of the engine's tables in this session's current transaction."""
    return dict(conn.execute("SELECT relname, seq_scan FROM pg_stat_xact_user_tables "
                             "WHERE schemaname = 'pgflow' AND relname = ANY (%s)", (list(ENGINE_TABLES),)))


def test_plans_kept_while_the_tables_were_small_still_probe_indexes_once_they_are_large(dsn, coordinator):
    pgflow.start(cf.fan, list(range(60)), dsn=dsn)
    schedule(coordinator)
    run_sql(dsn, "ANALYZE pgflow.steps, pgflow.instances, pgflow.wakeups")  # statistics of nearly empty tables
    with psycopg.connect(dsn) as conn:
        conn.execute("SET plan_cache_mode = force_custom_plan")  # the engine's own session setting (loop.sql)
        for _ in range(8):  # past the plan cache's first five custom plans: the kept plans are made now
            assert one_step_cycle(conn) == 5
            conn.rollback()
        for _ in range(10):  # the tables grow by thousands of rows, their statistics unchanged
            pgflow.start(cf.fan, list(range(300)), dsn=dsn)
        schedule(coordinator)
        assert run_sql(dsn, "SELECT count(*) FROM pgflow.steps")[0][0] > 3000
        assert one_step_cycle(conn) == 5
        scans = sequential_scans(conn)
        conn.rollback()
    assert scans and not any(scans.values()), scans
