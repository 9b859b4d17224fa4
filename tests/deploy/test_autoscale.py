"""Autoscaling on queue depth, proven locally: the scaler of tests/support/autoscaler.py (which
`python loadtests/run.py autoscale` runs as a demo) reads the queue depth with
exactly KEDA's query and adds/removes `pgflow worker --queue scale --concurrency 1` processes (one per
replica; SIGTERM on scale-in) while a fan-out pipeline runs on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import yaml

from pgflow.metrics import KEDA_DEPTH_QUERY_TEMPLATE
from pgflow.queues import ensure_queue

KEDA_MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "keda-scaledobject.yaml"
DRAIN_TIMEOUT = 10.0
INSTANCES, TASKS = 3, 200


@pytest.fixture(scope="module")
def autoscale():
    from support import autoscaler

    return autoscaler


def test_depth_is_read_with_the_keda_query(dsn, autoscale):
    from support import sample_flows as sf

    import pgflow

    with psycopg.connect(dsn, autocommit=True) as conn:
        pgflow.start(sf.fanout, {"tasks": 3, "sleep": [0, 0]}, dsn=dsn)  # creates the queue
        keda = conn.execute(KEDA_DEPTH_QUERY_TEMPLATE.format(queue="scale")).fetchone()[0]
        assert autoscale.queue_depth(conn, "scale") == keda == 0  # nothing enqueued before a coordinator runs
        conn.execute("SELECT pgmq.send('scale', '{}'::jsonb)")
        conn.execute("SELECT pgmq.send('scale', '{}'::jsonb, 60)")  # delayed (a retry's backoff): counted
        assert autoscale.queue_depth(conn, "scale") == 2
        conn.execute("SELECT pgmq.read('scale', 60, 1)")  # in flight: counted (scale-to-zero must wait for it)
        assert autoscale.queue_depth(conn, "scale") == 2
        assert conn.execute(KEDA_DEPTH_QUERY_TEMPLATE.format(queue="missing")).fetchone()[0] == 0
        with pytest.raises(ValueError):
            autoscale.queue_depth(conn, "scale; DROP TABLE x")


def test_keda_keeps_the_workers_while_a_message_is_in_flight(dsn):
    """KEDA's postgresql trigger is active while its query answers more than activationTargetQueryValue, and
    KEDA scales only an inactive ScaledObject to zero (after cooldownPeriod). With the manifest's query and
    threshold, run here on a real database: a message in flight keeps the queue active; an emptied queue
    does not."""
    scaled = next(d for d in yaml.safe_load_all(KEDA_MANIFEST.read_text()) if d and d["kind"] == "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    threshold = float(trigger["activationTargetQueryValue"])
    with psycopg.connect(dsn, autocommit=True) as conn:

        def active() -> bool:
            return conn.execute(trigger["query"]).fetchone()[0] > threshold

        assert not active()  # the queue does not exist yet: 0, no error
        ensure_queue(conn, "pgflow")
        assert not active()
        (msg_id,) = conn.execute("SELECT * FROM pgmq.send('pgflow', '{}'::jsonb)").fetchone()
        assert active()  # ready
        assert conn.execute("SELECT msg_id FROM pgmq.read('pgflow', 60, 1)").fetchone() == (msg_id,)
        assert active()  # in flight: a worker holds it
        conn.execute("SELECT pgmq.archive('pgflow', %s)", (msg_id,))
        assert not active()  # done: KEDA may scale to zero after its cooldown


def test_scaler_goes_1_to_4_and_back_while_a_fan_out_runs(dsn, effects_db, engine_factory, autoscale):
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn)
    engine.coordinator()
    lines: list[str] = []
    scaler = autoscale.Scaler(
        dsn, "scale",
        lambda: engine.worker("--queue", "scale", "--drain-timeout", str(DRAIN_TIMEOUT), "--batch-size", "50",
                              concurrency=1),
        min_replicas=1, max_replicas=4, target=20, poll_interval=0.5, stabilization=1.0,
        drain_timeout=DRAIN_TIMEOUT, echo=lambda line: (lines.append(line), print(line)))
    try:
        scaler.start()
        ids = autoscale.start_workload(dsn, INSTANCES, TASKS, (0.02, 0.05))
        settled = scaler.run(lambda: autoscale.all_finished(dsn, ids), timeout=240)  # a deadline, not a pace
    finally:
        scaler.close()  # SIGTERM the rest (engine_factory's teardown would too, and checks their exit codes)
    print("\n".join(f"{t:5.1f}s depth {d:4d} replicas {n}" for t, d, n in scaler.history))
    print("scale-ins (t, removed, in flight):", scaler.scale_ins)

    replicas = [n for _, _, n in scaler.history]
    assert scaler.peak == 4, lines
    assert settled and replicas[-1] == 1, lines
    assert replicas[0] == 1 and 1 in replicas[replicas.index(4):]  # 1, up to 4, then down to 1 again

    result = autoscale.outcome(dsn, ids)
    assert result.instances == {iid: "completed" for iid in ids}
    assert result.tasks == INSTANCES * TASKS
    assert result.missing == [], result.missing[:10]           # every task's side effect is there
    assert result.over_run == [], result.over_run[:10]         # at least once, never more than its attempts
    assert result.running == 0                                 # nothing left 'running'
    # scale-in: 3 replicas removed during the run (and the last one at close), each drained and exited 0 in time
    # (the drain time is measured from SIGTERM to the process's exit, not to when the scaler noticed it)
    scaled_in = scaler.exits[:-1]
    assert len(scaled_in) >= 3, scaler.exits
    # KEDA's depth leaves out messages being processed, so a replica may go while it still holds claimed work
    # (batches of 50); whether one did depends on the machine's pace, so it is printed, not asserted: the
    # checks above (nothing missing, nothing over-run) hold either way, and test_crashes drains claimed work
    assert all(e.drained(DRAIN_TIMEOUT) for e in scaler.exits), scaler.exits
    assert sum(e.ready for e in scaled_in) >= 2, scaler.exits  # most replicas were up, so drains were judged
    with psycopg.connect(dsn) as conn:
        outputs = conn.execute("SELECT output FROM pgflow.instances WHERE id = ANY(%s)", (ids,)).fetchall()
    assert [o for (o,) in outputs] == [{"count": TASKS, "sum": TASKS * (TASKS - 1) // 2}] * INSTANCES
