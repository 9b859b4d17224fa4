"""DAG semantics, retries, timeouts, cancel, transactional start and the read API, on a real PostgreSQL
with a real coordinator and worker processes (started through the CLI)."""

from __future__ import annotations

import time

import psycopg
import pytest
from conftest import wait_until
from support import sample_flows as sf

import pgflow
from pgflow import FlowDefinitionError, InstanceFailed, InstanceNotFinished, InstanceNotFound, PayloadTooLarge, settings
from pgflow.db import codec


def queued_messages(dsn):
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pgmq.q_pgflow").fetchone()[0]


def run(flow, input, dsn, timeout=60.0, **kwargs):
    iid = pgflow.start(flow, input, dsn=dsn, **kwargs)
    return iid, pgflow.wait(iid, timeout, dsn=dsn)


def test_sequence_passes_outputs_and_input(dsn, engine):
    iid, st = run(sf.chain, {"n": 4, "label": "seq"}, dsn)
    assert st.status == "completed", st.error
    assert pgflow.result(iid, dsn=dsn) == {"value": 51, "label": "seq", "key": f"pgflow:{iid}:third"}
    assert {s.name: (s.status, s.attempts) for s in st.steps} == {
        "first": ("completed", 1), "second": ("completed", 1), "third": ("completed", 1)}


def test_diamond_joins_both_branches(dsn, engine):
    iid, st = run(sf.diamond, 5, dsn)
    assert st.status == "completed", st.error
    assert st.output == [10, 15]


def test_wide_map_fans_out_and_in_in_order(dsn, engine):
    iid, st = run(sf.wide, 1000, dsn, timeout=120)
    assert st.status == "completed", st.error
    assert st.output == {"count": 1000, "sum": sum(i * i for i in range(1000)), "in_order": True}
    square = st.step("square")
    assert square.tasks == square.tasks_completed == 1000


def test_empty_map_completes_with_an_empty_list(dsn, engine):
    iid, st = run(sf.wide, 0, dsn)
    assert st.status == "completed", st.error
    assert st.output == {"count": 0, "sum": 0, "in_order": True}


def test_map_over_the_flow_input(dsn, engine):
    _, st = run(sf.input_map, [1, 2, 3], dsn)
    assert st.output == [2, 4, 6]
    with pytest.raises(FlowDefinitionError, match="must be a list"):
        pgflow.start(sf.input_map, {"not": "a list"}, dsn=dsn)


def test_sql_steps_bind_values_as_data_never_as_sql(dsn, engine):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (id serial PRIMARY KEY, name text, note text)")
    evil = "Robert'); DROP TABLE people; --"
    iid, st = run(sf.sql_flow, {"name": evil, "note": "$input %s %(x)s"}, dsn)
    assert st.status == "completed", st.error
    assert st.output == [[{"name": evil.upper()}]]  # a SQL map: one row list per element
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT name, note FROM people").fetchall() == [(evil, "$input %s %(x)s")]
    inserted = pgflow.status(iid, dsn=dsn).step("insert")
    assert inserted.status == "completed"


def test_retries_with_backoff_then_success(dsn, engine):
    started = time.monotonic()
    iid, st = run(sf.flaky, {"succeed_on": 3}, dsn)
    assert st.status == "completed", st.error
    assert st.output == 3
    assert st.steps[0].attempts == 3
    # two backoffs of at least base/2 and base (equal jitter): 0.1 s + 0.2 s at the least
    assert time.monotonic() - started >= 0.3


def test_exhausted_attempts_fail_the_instance_and_archive_the_message(dsn, engine):
    iid, st = run(sf.broken, "x", dsn)
    assert st.status == "failed"
    assert "ValueError: boom: x" in st.error
    explode = st.step("explode")
    assert explode.status == "failed" and explode.attempts == 2
    assert "Traceback" in explode.traceback and "sample_flows.py" in explode.traceback
    assert not any(s.name == "never" for s in st.steps)
    with pytest.raises(InstanceFailed, match="boom"):
        pgflow.result(iid, dsn=dsn)
    with psycopg.connect(dsn) as conn:
        archived = conn.execute("SELECT message FROM pgmq.a_pgflow").fetchall()
        queued = conn.execute("SELECT count(*) FROM pgmq.q_pgflow").fetchone()[0]
    assert [m[0]["step"] for m in archived] == ["explode"]
    assert queued == 0


def test_non_retryable_error_fails_at_once(dsn, engine):
    _, st = run(sf.fatal, None, dsn)
    assert st.status == "failed" and "no point retrying" in st.error
    assert st.steps[0].attempts == 1


def test_timeout_stops_a_step(dsn, engine):
    started = time.monotonic()
    _, st = run(sf.slow, None, dsn)
    assert st.status == "failed"
    assert "StepTimeout" in st.error
    assert st.steps[0].attempts == 2
    assert time.monotonic() - started < 30  # the 30 s sleep was interrupted (one uninterrupted would take 30 s)


def test_outputs_over_the_limit_or_not_json_fail_clearly(dsn, engine_factory):
    engine_factory(PGFLOW_MAX_PAYLOAD_BYTES="1000").start()
    _, st = run(sf.big_output, 5000, dsn)
    assert st.status == "failed" and "over the 1,000-byte limit" in st.error
    assert st.steps[0].attempts == 1
    _, st = run(sf.not_json, None, dsn)
    assert st.status == "failed" and "not JSON-serializable" in st.error


def test_oversized_input_is_refused_at_start(dsn, monkeypatch):
    monkeypatch.setenv("PGFLOW_MAX_PAYLOAD_BYTES", "100")
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env())  # settings are read once
    with pytest.raises(PayloadTooLarge, match="flow input is .* over the 100-byte limit"):
        pgflow.start(sf.chain, {"n": 1, "label": "x" * 200}, dsn=dsn)
    assert pgflow.list_instances(dsn=dsn) == []


def test_cancel_stops_later_steps(dsn, effects_db, engine_factory):
    engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn).start()
    iid = pgflow.start(sf.pause, 2.0, dsn=dsn)
    wait_until(lambda: pgflow.status(iid, dsn=dsn).steps != [], 60, "the first step to be scheduled")
    assert pgflow.cancel(iid, "changed my mind", dsn=dsn) == "cancelled"
    # the running step finishes and its message leaves the queue; then an instance started afterwards runs
    # both steps on the same coordinator and worker: had the cancelled one's successor been scheduled, it
    # would have run by then
    wait_until(lambda: queued_messages(dsn) == 0, 60, "the cancelled instance's step to finish")
    later = pgflow.start(sf.pause, 0, dsn=dsn)
    assert pgflow.wait(later, 60, dsn=dsn).status == "completed"
    st = pgflow.status(iid, dsn=dsn)
    assert st.status == "cancelled" and st.error == "changed my mind"
    assert [s.status for s in st.steps] == ["cancelled"]
    with psycopg.connect(dsn) as conn:  # only the later instance's successor ran
        assert conn.execute("SELECT key FROM py_runs").fetchall() == [(f"pgflow:{later}:after_hold",)]
    assert pgflow.cancel(iid, dsn=dsn) == "cancelled"  # idempotent
    with pytest.raises(InstanceFailed, match="cancelled"):
        pgflow.result(iid, dsn=dsn)


def test_start_inside_the_callers_transaction(dsn, engine):
    with psycopg.connect(dsn) as conn:
        rolled_back = pgflow.start(sf.diamond, 1, conn=conn)
        conn.rollback()
        committed = pgflow.start(sf.diamond, 2, conn=conn)
        conn.commit()
    assert pgflow.wait(committed, 60, dsn=dsn).output == [4, 6]
    with pytest.raises(InstanceNotFound):
        pgflow.status(rolled_back, dsn=dsn)
    assert [r["id"] for r in pgflow.list_instances(dsn=dsn)] == [committed]


def test_instances_keep_the_version_they_started_with(dsn, engine):
    old = pgflow.start(sf.versioned_v1, None, dsn=dsn)
    new = pgflow.start(sf.versioned, None, dsn=dsn)
    assert pgflow.wait(old, 60, dsn=dsn).output == "alpha"
    assert pgflow.wait(new, 60, dsn=dsn).output == "alpha+beta"
    assert pgflow.status(old, dsn=dsn).version == sf.VERSION_1 != sf.versioned.version


def test_list_filters_and_keyset_pagination(dsn):
    ids = [pgflow.start(sf.chain, {"n": i, "label": "l"}, label=f"batch-{i % 2}", dsn=dsn) for i in range(5)]
    other = pgflow.start(sf.diamond, 1, dsn=dsn)
    assert [r["id"] for r in pgflow.list_instances(flow="chain", dsn=dsn)] == ids[::-1]
    assert [r["id"] for r in pgflow.list_instances(label="batch-0", dsn=dsn)] == [ids[4], ids[2], ids[0]]
    page1 = pgflow.list_instances(limit=4, dsn=dsn)
    page2 = pgflow.list_instances(limit=4, before=page1[-1]["id"], dsn=dsn)
    assert [r["id"] for r in page1 + page2] == [other, *ids[::-1]]
    assert {r["status"] for r in pgflow.list_instances(status="pending", dsn=dsn)} == {"pending"}
    with pytest.raises(InstanceNotFinished):
        pgflow.result(ids[0], dsn=dsn)
    with pytest.raises(ValueError, match="unknown status"):
        pgflow.list_instances(status="bogus", dsn=dsn)


def test_long_steps_keep_their_message_invisible(dsn, effects_db, engine_factory):
    """A step running longer than the visibility timeout (3 s here) is not redelivered meanwhile."""
    engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn).start(concurrency=2)
    iid, st = run(sf.effects, {"i": 0, "sleep": 7}, dsn)
    assert st.status == "completed", st.error
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM py_runs").fetchone()[0] == 1


def test_retention_removes_finished_instances_and_archived_messages(dsn, engine_factory):
    engine = engine_factory()
    engine.coordinator("--retention", "1", "--maintenance-every", "0.5")
    engine.worker(concurrency=1)
    done, _ = run(sf.diamond, 1, dsn)
    failed, _ = run(sf.broken, 1, dsn)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pgmq.a_pgflow").fetchone()[0] == 1
    wait_until(lambda: pgflow.list_instances(dsn=dsn) == [], 60, "retention to remove the finished instances")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pgflow.steps").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pgmq.a_pgflow").fetchone()[0] == 0
    with pytest.raises(InstanceNotFound):
        pgflow.status(done, dsn=dsn)


def test_retention_purges_the_http_audit_trail(dsn, engine_factory):
    """pgflow.http_audit gains a row per HTTP attempt and was never purged: rows older than the retention go
    with the finished instances, newer ones stay."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pgflow.http_audit (owner, method, host, at) VALUES "
                     "(current_user, 'GET', 'old.example', now() - interval '2 hours'), "
                     "(current_user, 'GET', 'new.example', now())")
    engine_factory().coordinator("--retention", "3600", "--maintenance-every", "0.2")

    def hosts() -> list[str]:
        with psycopg.connect(dsn) as conn:
            return [r[0] for r in conn.execute("SELECT host FROM pgflow.http_audit ORDER BY id")]

    wait_until(lambda: hosts() == ["new.example"], 60, "retention to purge the old audit row")


def test_start_many_starts_all_in_one_statement(dsn, engine):
    ids = pgflow.start_many(sf.diamond, [1, 2, 3], label="many", dsn=dsn)
    assert len(ids) == 3 and ids == sorted(ids)
    assert [pgflow.wait(i, 60, dsn=dsn).output for i in ids] == [[2, 3], [4, 6], [6, 9]]
    with psycopg.connect(dsn) as conn:
        rolled = pgflow.start_many(sf.diamond, [4, 5], conn=conn)
        conn.rollback()
    with pytest.raises(InstanceNotFound):
        pgflow.status(rolled[0], dsn=dsn)
    assert pgflow.start_many(sf.diamond, [], dsn=dsn) == []
    with pytest.raises(FlowDefinitionError, match="must be a list"):
        pgflow.start_many(sf.input_map, [[1], "not a list"], dsn=dsn)


def test_the_coordinator_vacuums_queue_tables_and_wakeups_once_dead_rows_gather(dsn, engine_factory):
    """Their rows live for milliseconds; waiting for autovacuum lets dead index entries slow every read."""
    engine = engine_factory()
    engine.coordinator("--vacuum-every", "0.3")
    engine.worker(concurrency=2)
    ids = pgflow.start_many(sf.chain, [{"n": i, "label": "churn"} for i in range(2500)], dsn=dsn)
    assert {pgflow.wait(i, 120, dsn=dsn).status for i in ids} == {"completed"}

    def manual_vacuums():  # VACUUM by the coordinator counts here; autovacuum counts in autovacuum_count
        with psycopg.connect(dsn, autocommit=True) as conn:
            return dict(conn.execute("SELECT schemaname || '.' || relname, vacuum_count FROM pg_stat_user_tables"
                                     " WHERE relname IN ('wakeups', 'q_pgflow')").fetchall())

    wait_until(lambda: min(manual_vacuums().values()) > 0, 60, "the coordinator to vacuum both tables")
    counts = manual_vacuums()
    assert counts.keys() == {"pgflow.wakeups", "pgmq.q_pgflow"} and min(counts.values()) > 0, counts


def test_json_lists_are_cut_below_the_limit_and_rebuilt_in_order_by_the_database(dsn):
    """Lists of payloads travel as JSON array documents (pgflow.jsonb_list), cut before jsonb's size cap."""
    values = [1, None, {"a": [2, "x"]}, "it's", 3.5, [], "é" * 5]
    payloads = [codec.dumps(v) for v in values]
    parts = list(codec.json_arrays(payloads, limit=12))
    assert len(parts) > 2 and all(len(text) - 2 <= 12 or p.stop - p.start == 1 for p, text in parts)
    assert [i for p, _ in parts for i in range(p.start, p.stop)] == list(range(len(values)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        codec.configure(conn)
        rebuilt = [v for _, text in parts
                   for v in conn.execute("SELECT pgflow.jsonb_list(%s::jsonb)", (text,)).fetchone()[0]]
    assert rebuilt == values
    assert list(codec.json_arrays([])) == []
