"""Fair claiming and priorities, at the database: a coordinator (in this process) enqueues, and the test
reads batches with pgflow.read_tasks as a worker would (no worker runs, so nothing moves but the reads)."""

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


def read(dsn: str, qty: int = 20) -> list[tuple[int, str, int]]:
    """(instance, step, task) of a batch read and claimed from the 'fair' queue, in the order returned."""
    return [(r[0], r[1], r[2]) for r in run_sql(
        dsn, "SELECT instance_id, step_name, task_index FROM pgflow.read_tasks('fair', 30, %s)", (qty,))]


def complete(dsn: str, claimed: list[tuple[int, str, int]]) -> None:
    run_sql(dsn, """SELECT pgflow.complete_tasks('fair', array_agg(s.msg_id), array_agg(s.instance_id),
                        array_agg(s.step_name), array_agg(s.task_index), array_agg(s.attempt),
                        array_agg('1'::jsonb))
                    FROM pgflow.steps s JOIN unnest(%s::bigint[], %s::text[], %s::int[]) AS u(i, n, t)
                      ON s.instance_id = u.i AND s.step_name = u.n AND s.task_index = u.t""",
            ([c[0] for c in claimed], [c[1] for c in claimed], [c[2] for c in claimed]))


def test_a_new_chain_is_claimed_among_the_first_tasks_of_a_wide_fan_out(dsn, coordinator):
    fan = pgflow.start(cf.fan, list(range(500)), dsn=dsn)
    schedule(coordinator)
    first = read(dsn)
    assert {c[0] for c in first} == {fan} and [c[2] for c in first] == list(range(20))
    chain = pgflow.start(cf.small_chain, None, dsn=dsn)
    schedule(coordinator)
    second = read(dsn)  # FIFO would give the chain's step after the 480 fan-out tasks still queued
    assert (chain, "c1", -1) in second[:2]
    complete(dsn, [c for c in second if c[0] == chain])
    schedule(coordinator)
    assert (chain, "c2", -1) in read(dsn)[:2]


def test_older_instances_win_ties_so_chains_complete_progressively(dsn, coordinator):
    ids = pgflow.start_many(cf.small_chain, [None] * 50, dsn=dsn)
    schedule(coordinator)
    first = read(dsn, 5)
    assert first == [(i, "c1", -1) for i in ids[:5]]
    complete(dsn, first)
    schedule(coordinator)
    # the second steps of the first chains come before the first steps of the later chains
    assert read(dsn, 5) == [(i, "c2", -1) for i in ids[:5]]


def test_priorities_per_step_and_per_start(dsn, coordinator):
    fan = pgflow.start(cf.fan, list(range(100)), dsn=dsn)
    plain = pgflow.start(cf.small_chain, None, dsn=dsn)
    urgent = pgflow.start(cf.urgent, None, dsn=dsn)  # its step has priority 10
    favoured = pgflow.start(cf.small_chain, None, dsn=dsn, priority=5)
    schedule(coordinator)
    batch = read(dsn, 3)
    assert batch[:2] == [(urgent, "now", -1), (favoured, "c1", -1)]
    assert fan not in [c[0] for c in batch[:2]] and plain not in [c[0] for c in batch[:2]]
    headers = run_sql(dsn, "SELECT headers FROM pgmq.q_fair WHERE (message->>'instance')::bigint = %s", (favoured,))
    assert headers[0][0]["priority"] == 5


def test_the_fair_read_uses_its_index(dsn, coordinator):
    pgflow.start(cf.fan, list(range(2000)), dsn=dsn)
    schedule(coordinator)
    run_sql(dsn, "ANALYZE pgmq.q_fair")
    plan = "\n".join(r[0] for r in run_sql(dsn, """
        EXPLAIN SELECT msg_id FROM pgmq.q_fair
        WHERE vt <= clock_timestamp() AND (headers->>'parked') IS NULL
        ORDER BY pgflow.task_priority(headers) DESC, pgflow.task_tag(headers), pgflow.task_instance(message), msg_id
        LIMIT 20 FOR UPDATE SKIP LOCKED"""))
    assert "q_fair_fair" in plan and "Sort" not in plan


def test_a_worker_session_plans_its_read_once_and_survives_losing_it(dsn, coordinator):
    """The reads are prepared once per session (pgflow._prepare_once): later reads use the generic plan
    instead of planning again, and a session that lost its statements (a pooler's DISCARD ALL, or a
    transaction that prepared and then rolled back) reads on."""
    pgflow.start(cf.fan, list(range(60)), dsn=dsn)
    schedule(coordinator)
    reads = "SELECT count(*) FROM pgflow.read_tasks('fair', 30, 5)"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert [conn.execute(reads).fetchone()[0] for _ in range(4)] == [5, 5, 5, 5]
        plans = conn.execute("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                             "WHERE name = 'pgflow_read_fair'").fetchone()
        assert plans == (4, 0)
        conn.execute("DISCARD ALL")
        assert conn.execute(reads).fetchone()[0] == 5
        conn.execute("DEALLOCATE ALL")
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute(reads)
            conn.execute("SELECT 1 / 0")
        assert conn.execute(reads).fetchone()[0] == 5


def test_the_reads_generic_plan_probes_the_picked_messages(dsn, coordinator):
    """The prepared read's generic plan does not know how many messages it takes: it must still touch
    only those (index probes), not hash or scan the whole queue."""
    pgflow.start(cf.fan, list(range(2000)), dsn=dsn)
    schedule(coordinator)
    run_sql(dsn, "ANALYZE pgmq.q_fair")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgflow.read_tasks('fair', 30, 5)").fetchone()[0] == 5
        for setting in ("plan_cache_mode = force_generic_plan", "enable_seqscan = off",
                        "enable_bitmapscan = off", "enable_sort = off"):
            conn.execute(f"SET {setting}")  # read_queue's own settings
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN EXECUTE pgflow_read_fair(5, 30)"))
    assert "Hash" not in plan and "Seq Scan" not in plan and "Merge" not in plan, plan
    assert "q_fair_fair" in plan and "q_fair_pkey" in plan, plan


def test_a_statement_prepared_under_the_reads_name_is_replaced_not_run(dsn, coordinator):
    """Whatever else prepared a statement named as the engine's read (code sharing the session) is
    replaced before the read: the engine never executes a statement it did not write."""
    pgflow.start(cf.fan, list(range(10)), dsn=dsn)
    schedule(coordinator)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE hijacked (n int)")
        conn.execute("PREPARE pgflow_read_fair (integer, integer) AS "
                     "INSERT INTO hijacked VALUES ($1) RETURNING NULL::bigint, 0, now(), now(), now(), "
                     "NULL::jsonb, NULL::jsonb")
        assert conn.execute("SELECT count(*) FROM pgflow.read_tasks('fair', 30, 5)").fetchone()[0] == 5
        assert conn.execute("SELECT count(*) FROM hijacked").fetchone()[0] == 0
        assert "pgmq.q_fair" in conn.execute("SELECT statement FROM pg_prepared_statements "
                                             "WHERE name = 'pgflow_read_fair'").fetchone()[0]


def test_queues_created_before_the_migration_get_the_fair_indexes(dsn):
    """What migration 0005 runs for every existing queue."""
    run_sql(dsn, "SELECT pgmq.create('legacy')")
    run_sql(dsn, "INSERT INTO pgflow.queues (queue_name) VALUES ('legacy')")
    run_sql(dsn, "SELECT pgflow.ensure_queue_order(queue_name) FROM pgflow.queues ORDER BY queue_name")
    names = {r[0] for r in run_sql(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'q_legacy'")}
    assert {"q_legacy_fair", "q_legacy_parked"} <= names


def test_an_idle_worker_waits_for_a_notification_unless_a_parked_task_comes_due(dsn, coordinator):
    """next_parked_in says when an idle worker must look again: never (NULL, it waits for a NOTIFY or the
    poll interval) when nothing is parked, else the seconds until the first parked task comes due. It once
    said 0 for an empty queue and idle workers read their queues without pause."""
    due = "SELECT pgflow.next_parked_in('fair')"
    pgflow.start(cf.small_chain, None, dsn=dsn)
    schedule(coordinator)
    assert run_sql(dsn, due)[0][0] is None  # a ready task is found by reading, not by this
    run_sql(dsn, """UPDATE pgmq.q_fair SET vt = clock_timestamp() + interval '60 seconds',
                        headers = coalesce(headers, '{}') || '{"parked": true}'""")
    assert 30 < run_sql(dsn, due)[0][0] <= 60


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
    """The functions every step passes through keep their plans for the session, with sequential scans off
    (07_enqueue.sql). The danger of a kept plan: made when the engine's tables were nearly empty, when reading
    a table whole is cheaper than probing an index, and still used once they hold thousands of rows."""
    pgflow.start(cf.fan, list(range(60)), dsn=dsn)
    schedule(coordinator)
    run_sql(dsn, "ANALYZE pgflow.steps, pgflow.instances, pgflow.wakeups")  # statistics of nearly empty tables
    with psycopg.connect(dsn) as conn:
        conn.execute("SET plan_cache_mode = force_custom_plan")  # the engine's own session setting (loop.sql)
        conn.commit()  # (a rollback would undo it)
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
