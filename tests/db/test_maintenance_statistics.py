"""The coordinator's vacuum thread also refreshes the statistics of the engine's busiest tables: they fill in
bursts, and plans made while the statistics still said "nearly empty" read every open instance to lock a
batch of them by id. No engine runs here: the test writes rows and calls the maintenance pass itself."""

from __future__ import annotations

from conftest import run_sql, wait_until

from pgflow.engine.maintenance import Maintenance


def _live_rows(dsn: str, table: str) -> int:
    rows = run_sql(dsn, "SELECT n_live_tup FROM pg_stat_user_tables WHERE schemaname = 'pgmq' AND relname = %s",
                   (table,))
    return rows[0][0] if rows else 0


def test_a_burst_of_messages_gets_fresh_statistics_and_quiet_tables_are_left_alone(dsn):
    run_sql(dsn, "SELECT pgflow.ensure_queue('burst')")
    run_sql(dsn, "SELECT pgflow.ensure_queue('quiet')")
    maintenance = Maintenance(dsn, vacuum_min_dead=1000)
    run_sql(dsn, "SELECT count(*) FROM pgmq.send_batch('burst', array_fill('{}'::jsonb, ARRAY[3000]))")
    run_sql(dsn, "SELECT count(*) FROM pgmq.send_batch('quiet', array_fill('{}'::jsonb, ARRAY[10]))")
    wait_until(lambda: _live_rows(dsn, "q_burst") >= 3000, 30, "the burst in the statistics views")
    analyzed = maintenance.analyze_stale_tables()
    assert "pgmq.q_burst" in analyzed and "pgmq.q_quiet" not in analyzed, analyzed
    wait_until(lambda: run_sql(dsn, "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables "
                                    "WHERE schemaname = 'pgmq' AND relname = 'q_burst'")[0][0], 30,
               "the ANALYZE in the statistics views")
    assert run_sql(dsn, "SELECT reltuples FROM pg_class WHERE oid = 'pgmq.q_burst'::regclass")[0][0] == 3000
    assert "pgmq.q_burst" not in maintenance.analyze_stale_tables()  # the statistics hold its size now
    run_sql(dsn, "SELECT count(*) FROM pgmq.send_batch('burst', array_fill('{}'::jsonb, ARRAY[1000]))")
    wait_until(lambda: _live_rows(dsn, "q_burst") >= 4000, 30, "the second burst in the statistics views")
    assert "pgmq.q_burst" not in maintenance.analyze_stale_tables()  # a third more rows: planned well enough
