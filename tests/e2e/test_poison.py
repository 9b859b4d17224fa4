"""Poison messages and poison instances: whatever lands on a queue or is accepted by the validator, the worker
and the coordinator keep serving other work. Undecodable messages and messages that name no instance or an
unknown flow version are archived (never run, never left in the queue) with the reason recorded; a step
that kills its worker process is retried per its policy and then fails its instance with a stated reason.

Assertions on ``pgflow.dead_letters`` (the recorded reason) are marked ``# DEAD-LETTER``."""

from __future__ import annotations

import json
import time

import psutil
import pytest
from conftest import run_sql, wait_until
from support import poison_flows as pf
from support import sample_flows as sf

import pgflow
from pgflow import FlowDefinitionError
from pgflow import tree as t

QUIET = {"PGFLOW_LOG_LEVEL": "ERROR"}  # the engine's stderr goes to a pipe nobody reads until teardown


# ---------------------------------------------------------------------------------------------- helpers

def send(dsn, body, queue="pgflow"):
    """Put a raw message on a pgflow queue, as anyone with access to pgmq could; returns its msg_id."""
    text = body if isinstance(body, str) else json.dumps(body)
    return run_sql(dsn, "SELECT * FROM pgmq.send(%s, %s::jsonb)", (queue, text))[0][0]


def live(dsn, msg_id, queue="pgflow"):
    return run_sql(dsn, f"SELECT count(*) FROM pgmq.q_{queue} WHERE msg_id = %s", (msg_id,))[0][0]


def archived(dsn, msg_id, queue="pgflow"):
    """The archived message's body (as JSON text, for comparison), or None."""
    rows = run_sql(dsn, f"SELECT message::text FROM pgmq.a_{queue} WHERE msg_id = %s", (msg_id,))
    return rows[0][0] if rows else None


def dead_letters(dsn, msg_id, queue="pgflow"):
    """DEAD-LETTER: (message as JSON text, reason) rows recorded for a message."""
    return run_sql(dsn, "SELECT message::text, reason FROM pgflow.dead_letters WHERE queue = %s AND msg_id = %s",
                   (queue, msg_id))


def canonical(dsn, body) -> str:
    """A JSON value as PostgreSQL prints jsonb (key order, spacing), for comparing bodies."""
    text = body if isinstance(body, str) else json.dumps(body)
    return run_sql(dsn, "SELECT %s::jsonb::text", (text,))[0][0]


def assert_put_aside(dsn, msg_id, body):
    """The message left the queue for the archive unchanged and (DEAD-LETTER) its reason is recorded."""
    assert live(dsn, msg_id) == 0, f"message {msg_id} {body!r} is still in the queue"
    assert archived(dsn, msg_id) == canonical(dsn, body), f"message {msg_id} {body!r} was not archived as sent"
    # DEAD-LETTER: exactly one record, with the message as sent and a non-empty reason
    recorded = dead_letters(dsn, msg_id)
    assert len(recorded) == 1, f"message {msg_id} {body!r}: dead letters {recorded}"  # DEAD-LETTER
    message, reason = recorded[0]
    assert message == canonical(dsn, body)  # DEAD-LETTER
    assert reason and reason.strip(), f"message {msg_id}: empty dead-letter reason"  # DEAD-LETTER


def start_healthy(dsn, count, label):
    return [pgflow.start(sf.chain, {"n": i, "label": label}, dsn=dsn) for i in range(count)]


def assert_completed(dsn, ids, timeout=60.0):
    statuses = [pgflow.wait(iid, timeout, dsn=dsn) for iid in ids]
    assert [s.status for s in statuses] == ["completed"] * len(ids), [(s.id, s.status, s.error) for s in statuses]
    assert [s.output["value"] for s in statuses] == [(s.input["n"] + 1) * 10 + 1 for s in statuses]


def children(proc):
    return {c.pid for c in psutil.Process(proc.pid).children()}


# ---------------------------------------------------------------------------------------------- (a) undecodable

UNDECODABLE = [
    '"garbage"',
    '{"flow": 1}',
    "[1, 2, 3]",
    "null",
    "42",
    '{"flow": "chain", "version": "0123456789abcdef", "instance": "seven", "step": "first", "task": -1}',
    '{"flow": "chain", "version": "0123456789abcdef", "instance": 1, "step": "first"}',
    '{"item": "\'; DROP TABLE pgflow.instances; --"}',
]


def test_undecodable_messages_are_dead_lettered_while_the_worker_keeps_serving(dsn, engine_factory):
    engine = engine_factory(**QUIET)
    engine.coordinator()
    worker = engine.worker(concurrency=2)
    engine.worker_children(worker, 2)
    pids = children(worker)
    before = start_healthy(dsn, 5, "before")  # also creates the queue 'pgflow'
    poison = [(send(dsn, body), body) for body in UNDECODABLE]
    after = start_healthy(dsn, 5, "after")
    assert_completed(dsn, before + after)
    wait_until(lambda: all(archived(dsn, m) is not None for m, _ in poison), 60, "the poison messages to be archived")
    for msg_id, body in poison:
        assert_put_aside(dsn, msg_id, body)
    assert run_sql(dsn, "SELECT count(*) FROM pgmq.q_pgflow") == [(0,)]
    assert worker.poll() is None and engine.procs[0].poll() is None
    assert children(worker) == pids, "a worker process died on a poison message"


# ---------------------------------------------------------------------------------------------- (b) unknown names

def test_messages_naming_no_instance_or_an_unknown_version_are_dead_lettered(dsn, engine_factory):
    engine = engine_factory(**QUIET)
    engine.coordinator()
    worker = engine.worker(concurrency=2)
    [done] = start_healthy(dsn, 1, "done")
    assert_completed(dsn, [done])
    pids = children(worker)
    version = sf.chain.version
    other = "0123456789abcdef"
    bodies = [
        {"flow": "chain", "version": version, "instance": 987654321, "step": "first", "task": -1},  # no such instance
        {"flow": "chain", "version": version, "instance": -5, "step": "first", "task": -1},
        {"flow": "chain", "version": other, "instance": done, "step": "first", "task": -1},  # unknown version
        {"flow": "no_such_flow", "version": other, "instance": done, "step": "first", "task": -1},  # unknown flow
        {"flow": "chain", "version": version, "instance": done, "step": "no_such_step", "task": -1},  # unknown step
        {"flow": "chain", "version": version, "instance": 987654321, "step": "first", "task": 3, "item": {"e": 1}},
    ]
    poison = [(send(dsn, body), body) for body in bodies]
    healthy = start_healthy(dsn, 6, "alongside")
    assert_completed(dsn, healthy)
    wait_until(lambda: all(live(dsn, m) == 0 for m, _ in poison), 60, "the poison messages to leave the queue")
    for msg_id, body in poison:
        assert_put_aside(dsn, msg_id, body)
    assert worker.poll() is None and engine.procs[0].poll() is None
    assert children(worker) == pids, "a worker process died on a poison message"


@pytest.mark.parametrize("body", [
    {"flow": "chain", "version": "0123456789abcdef", "instance": 10 ** 30, "step": "first", "task": -1},  # > bigint
    {"flow": "chain", "version": "0123456789abcdef", "instance": 1, "step": "first", "task": 2 ** 40},  # > integer
], ids=["instance_id_beyond_bigint", "task_index_beyond_integer"])
def test_a_message_with_out_of_range_ids_is_dead_lettered_not_a_crash_loop(dsn, engine_factory, body):
    engine = engine_factory(**QUIET)
    engine.coordinator()
    worker = engine.worker(concurrency=1)
    assert_completed(dsn, start_healthy(dsn, 1, "first"))
    pids = children(worker)
    msg_id = send(dsn, body)
    healthy = start_healthy(dsn, 4, "alongside")
    try:
        wait_until(lambda: live(dsn, msg_id) == 0, 60, f"message {msg_id} {body} to leave the queue")
    except AssertionError:
        [(reads,)] = run_sql(dsn, "SELECT read_ct FROM pgmq.q_pgflow WHERE msg_id = %s", (msg_id,))
        stuck = run_sql(dsn, "SELECT count(*) FROM pgflow.instances WHERE status <> 'completed'")[0][0]
        raise AssertionError(f"message {msg_id} {body} is still in the queue after {reads} reads; worker processes "
                             f"{pids} -> {children(worker)}; {stuck} healthy instance(s) not completed") from None
    assert_put_aside(dsn, msg_id, body)
    assert_completed(dsn, healthy)
    assert children(worker) == pids, "the worker process died reading the message (and will again: a crash loop)"


def test_a_task_the_database_refuses_to_claim_is_dead_lettered_and_its_batch_still_runs(dsn, engine_factory):
    """A worker reads and claims a batch in one statement; when the claim fails for one task, the whole
    statement fails: the worker then claims the batch's tasks one by one, dead-letters the refused one and
    runs the rest."""
    [victim] = start_healthy(dsn, 1, "victim")  # no engine yet: its first task waits in the queue
    run_sql(dsn, f"""
        CREATE FUNCTION refuse_claim() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'claim refused for instance %%', NEW.instance_id; END $$;
        CREATE TRIGGER refuse_claim BEFORE UPDATE ON pgflow.steps FOR EACH ROW
            WHEN (NEW.instance_id = {int(victim)} AND NEW.status = 'running') EXECUTE FUNCTION refuse_claim();""")
    engine = engine_factory(**QUIET)
    engine.coordinator()
    wait_until(lambda: run_sql(dsn, "SELECT count(*) FROM pgmq.q_pgflow")[0][0] == 1, 60, "the victim's task")
    [(msg_id, body)] = run_sql(dsn, "SELECT msg_id, message::text FROM pgmq.q_pgflow")
    healthy = start_healthy(dsn, 6, "alongside")
    wait_until(lambda: run_sql(dsn, "SELECT count(*) FROM pgmq.q_pgflow")[0][0] == 7, 60, "all first tasks queued")
    worker = engine.worker(concurrency=1)
    assert_completed(dsn, healthy)
    wait_until(lambda: live(dsn, msg_id) == 0, 60, "the refused message to leave the queue")
    [(message, reason)] = dead_letters(dsn, msg_id)  # DEAD-LETTER
    assert message == canonical(dsn, body)  # DEAD-LETTER
    assert "cannot be claimed" in reason and f"claim refused for instance {victim}" in reason  # DEAD-LETTER
    assert worker.poll() is None


def test_a_message_with_an_unknown_version_does_not_run_a_live_instance_s_step(effects_db, engine_factory):
    """A message that names a live instance and a step it has, but another flow version, must not run that
    step (here: ahead of its 20-40 s retry backoff)."""
    dsn = effects_db
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn, **QUIET)
    engine.start(concurrency=1)
    iid = pgflow.start(pf.slow_retry, {}, dsn=dsn)
    wait_until(lambda: run_sql(dsn, "SELECT status, attempt FROM pgflow.steps WHERE instance_id = %s", (iid,))
               == [("retrying", 1)], 60, "the first attempt to fail")
    body = {"flow": "slow_retry", "version": "0123456789abcdef", "instance": iid, "step": "later", "task": -1}
    msg_id = send(dsn, body)
    wait_until(lambda: live(dsn, msg_id) == 0, 60, "the forged message to leave the queue")
    # the worker's one process handles messages one after another: once an instance started now has
    # completed, it is done with the forged message (had it run the step, the run would be recorded)
    assert_completed(dsn, start_healthy(dsn, 1, "afterwards"))
    runs = run_sql(dsn, "SELECT attempt FROM py_runs ORDER BY attempt")
    assert runs == [(1,)], f"a message naming version 0123456789abcdef ran step 'later' (attempts run: {runs})"
    assert run_sql(dsn, "SELECT status, attempt FROM pgflow.steps WHERE instance_id = %s", (iid,)) == [("retrying", 1)]
    assert_put_aside(dsn, msg_id, body)
    pgflow.cancel(iid, "test over", dsn=dsn)


# ---------------------------------------------------------------------------------------------- (c) dead processes

@pytest.mark.parametrize("flow", [pf.segfault, pf.hard_exit], ids=["segfault", "os_exit_3"])
def test_a_step_that_kills_its_process_fails_its_instance_after_max_attempts(effects_db, engine_factory, flow):
    dsn = effects_db
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn, **QUIET)
    coordinator = engine.coordinator()
    worker = engine.worker(concurrency=2)  # --visibility-timeout 3: a lost attempt comes back after 3 s
    engine.worker_children(worker, 2)
    iid = pgflow.start(flow, {"poison": True}, dsn=dsn)
    st = pgflow.wait(iid, 90, dsn=dsn)
    assert st.status == "failed", (st.status, st.error)
    assert st.error and "lost" in st.error, st.error
    # retried per policy: it ran exactly max_attempts times, never a third
    assert run_sql(dsn, "SELECT attempt FROM py_runs ORDER BY attempt") == [(1,), (2,)]
    [(step_msg,)] = run_sql(dsn, "SELECT msg_id FROM pgflow.steps WHERE instance_id = %s", (iid,))
    assert live(dsn, step_msg) == 0 and archived(dsn, step_msg) is not None, "the message was not archived"
    assert worker.poll() is None, "the worker supervisor died with its child"
    assert coordinator.poll() is None
    assert_completed(dsn, start_healthy(dsn, 3, "afterwards"))
    assert run_sql(dsn, "SELECT count(*) FROM pgmq.q_pgflow") == [(0,)]


# ---------------------------------------------------------------------------------------------- poison instances

ACCEPTED_BUT_DANGEROUS = {
    # each is accepted by pgflow.tree_shape (the validator); running it must end the instance, not the coordinator
    "sleep_1e300_seconds": {"t": "sleep", "seconds": 1e300},
    "signal_timeout_as_text": {"t": "wait_signal", "name": "go", "timeout": "soon"},
    "failing_sql_step_given_as_a_number": {"t": "sql", "sql": 5},
    "loop_while_false_as_text": {"t": "loop", "while": "false", "c": [{"t": "sql", "sql": "SELECT 1 AS one"}]},
    "cron_that_never_fires": {"t": "schedule", "cron": "0 0 30 2 *"},
    "http_without_method": {"t": "http", "url": "http://127.0.0.1:9/x", "method": None, "max_attempts": 1},
}


@pytest.mark.parametrize("node", list(ACCEPTED_BUT_DANGEROUS.values()), ids=list(ACCEPTED_BUT_DANGEROUS))
def test_an_accepted_tree_never_crashes_the_coordinator(dsn, engine_factory, node):
    engine = engine_factory(**QUIET)
    coordinator = engine.coordinator()
    worker = engine.worker(concurrency=1)
    try:
        iid = pgflow.start(t.Node(node), dsn=dsn)
    except FlowDefinitionError as exc:  # refused up front: as good as a clean failure
        assert str(exc).strip()
        return
    def waiting():  # a durable wait: a timer (or a signal) far in the future
        return run_sql(dsn, "SELECT count(*) FROM pgflow.steps WHERE instance_id = %s AND status = 'waiting'",
                       (iid,))[0][0] > 0

    watched_until = time.monotonic() + 20  # the coordinator comes back to the instance for a while: it must live
    wait_until(lambda: coordinator.poll() is not None or pgflow.status(iid, dsn=dsn).finished
               or (time.monotonic() > watched_until and waiting()), 120,
               f"the instance of {node} to finish or wait")
    assert coordinator.poll() is None, f"the coordinator died (exit {coordinator.returncode}) evaluating {node}"
    st = pgflow.status(iid, dsn=dsn)
    if st.status == "running":  # acceptable only as a durable wait (a timer far in the future)
        assert waiting(), f"instance of {node} still running, and not waiting:\n{pgflow.explain(iid, dsn=dsn)}"
        pgflow.cancel(iid, "test over", dsn=dsn)
    else:
        assert st.status in ("completed", "failed"), st.status
        if st.status == "failed":
            assert st.error and st.error.strip()
    # the coordinator is not wedged on the instance either: other work still gets done
    assert_completed(dsn, start_healthy(dsn, 2, "after"))
    assert worker.poll() is None
