"""Workers where operators run them: before their queue exists, and as PID 1 in a container.

On a fresh database a worker started with ``--queue NAME`` (the chart's default queue too) used to crash-loop
on ``relation "pgmq.q_NAME" does not exist``, and KEDA's depth query failed the same way."""

from __future__ import annotations

import os
import shutil
import subprocess

import psutil
import pytest
from conftest import pgflow_command, run_sql, subprocess_env, wait_until
from support import sample_flows as sf

import pgflow
from pgflow.metrics import KEDA_DEPTH_QUERY_TEMPLATE


def queue_rows(dsn: str, name: str) -> int:
    return run_sql(dsn, "SELECT count(*) FROM pgflow.queues WHERE queue_name = %s", (name,))[0][0]


def test_replicas_starting_at_once_create_their_queue_once_and_serve_it(dsn, engine_factory):
    assert run_sql(dsn, KEDA_DEPTH_QUERY_TEMPLATE.format(queue="ops"))[0][0] == 0  # KEDA: 0, not an error
    engine = engine_factory()
    replicas = [engine.worker("--queue", "ops", concurrency=2) for _ in range(3)]  # three pods at once
    wait_until(lambda: queue_rows(dsn, "ops") == 1, 60, "the queue to be created")
    for replica in replicas:
        engine.worker_children(replica, 2)
    engine.coordinator()
    iid = pgflow.start(sf.on_ops, 7, dsn=dsn)
    assert pgflow.wait(iid, 60, dsn=dsn).status == "completed"
    assert run_sql(dsn, KEDA_DEPTH_QUERY_TEMPLATE.format(queue="ops"))[0][0] == 0
    assert all(r.poll() is None for r in replicas)  # none crashed
    problems = engine.stop()
    assert not problems, problems
    for replica in replicas:  # no process died and was restarted, nothing raised
        assert "restarting" not in replica.stderr_text and "Traceback" not in replica.stderr_text, \
            replica.stderr_text[-3000:]


def test_init_creates_declared_queues_and_refuses_bad_names_in_one_line(dsn):
    ok = subprocess.run(pgflow_command("init", "--dsn", dsn, "--queue", "embed", "--queue", "notify"),
                        env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert queue_rows(dsn, "embed") == queue_rows(dsn, "notify") == 1
    for bad in ("Upper", "1starts_with_digit", "x" * 48, "semi;colon"):
        refused = subprocess.run(pgflow_command("init", "--dsn", dsn, "--queue", bad), env=subprocess_env(),
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            f"Error: pgflow: invalid queue name '{bad}': use 1 to 47 lower-case letters, digits or _, starting "
            "with a letter"]


def test_a_worker_running_as_pid_1_runs_steps(dsn, engine_factory):
    """In a container the supervisor is PID 1 (exec-form entrypoint, no init): its children must still
    work (they used to exit at once, because their parent's pid was 1, and be restarted forever). A new PID
    namespace makes the worker PID 1 here, as Docker and Kubernetes do."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to give the worker a PID namespace")
    engine = engine_factory()
    engine.coordinator()
    supervisor = engine.spawn(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                               *pgflow_command("worker", "--dsn", dsn, "--import", "support.sample_flows",
                                               "--concurrency", "2")])
    iid = pgflow.start(sf.on_ops, "pid 1", dsn=dsn)  # its queue is created at start: the worker serves all
    assert pgflow.wait(iid, 60, dsn=dsn).status == "completed"
    # SIGTERM to PID 1 itself (unshare does not forward it): a PID 1 without a handler would ignore it
    (pid_1,) = psutil.Process(supervisor.pid).children()
    pid_1.terminate()
    assert supervisor.wait(timeout=120) == 0
    problems = engine.stop()
    assert not problems, problems
    assert "restarting" not in supervisor.stderr_text, supervisor.stderr_text[-3000:]
