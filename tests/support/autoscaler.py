"""Autoscaling demo: what KEDA does in Kubernetes, done locally with OS processes.

    python loadtests/run.py autoscale [--dsn DSN] [--instances 3] [--tasks 200] [--max-replicas 4] [--target 20]

A small scaler polls the depth of one pgmq queue with exactly the query KEDA's postgresql trigger runs
(``pgflow.metrics.KEDA_DEPTH_QUERY_TEMPLATE``: ready and in-flight messages), computes
``replicas = ceil(depth / target)`` clamped to [min, max] like KEDA's HPA, and adds or removes
``pgflow worker --queue Q --concurrency 1`` processes, one per "replica". Scale-out is immediate; scale-in
waits for a stabilization window (the HPA's ``scaleDown.stabilizationWindowSeconds``) and sends SIGTERM,
as Kubernetes does to a pod it removes: the worker drains (finishes the step in hand, gives back the tasks it
claimed but did not start) and must exit 0 within its ``--drain-timeout`` (a replica still starting up, which
has not installed its SIGTERM handler yet and has claimed nothing, may instead die of the signal).

The workload is the ``fanout`` flow of tests/support/sample_flows.py: a map of a few hundred tasks of 20-50 ms
each, each recording its execution (idempotency key, attempt) in a table. The script prints every scaling
decision, then checks what tests/deploy/test_autoscale.py asserts: 1 -> max -> 1 replicas, every instance
completed, every task's side effect present and never run more often than its attempts, no task left
running, every scaled-in worker exited 0 within the drain timeout. Without ``--dsn`` it uses the embedded
PostgreSQL (``PGFLOW_HOME``); it always works in a fresh database of its own (``pgflow_autoscale``).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

import pgflow
from pgflow.db.connection import resolve_dsn
from pgflow.db.migrations import init_schema
from pgflow.metrics import KEDA_DEPTH_QUERY_TEMPLATE

TESTS = Path(__file__).resolve().parents[1]
QUEUE = "scale"  # the queue of sample_flows.fanout


def queue_depth(conn: psycopg.Connection, queue: str) -> int:
    """Ready and in-flight messages in ``queue``: the very statement KEDA's postgresql scaler runs."""
    if not queue.replace("_", "").isalnum() or queue != queue.lower():
        raise ValueError(f"not a pgmq queue name: {queue!r}")
    return conn.execute(KEDA_DEPTH_QUERY_TEMPLATE.format(queue=queue)).fetchone()[0]


@dataclass
class Exit:
    pid: int
    code: int | None  # None: did not exit within the drain timeout (then killed)
    seconds: float    # from SIGTERM to exit
    ready: bool       # it had installed its SIGTERM handler when it was sent SIGTERM

    def drained(self, drain_timeout: float) -> bool:
        """A replica that was up drained: exit 0 within the drain timeout. One SIGTERMed while still starting
        (no handler yet: on a busy machine start-up takes seconds) had claimed nothing and may die of it."""
        if not self.ready:
            return self.code in (0, -signal.SIGTERM)
        return self.code == 0 and self.seconds <= drain_timeout


class Drain:
    """A replica sent SIGTERM: when, whether it was ready for it, and when it exited (a thread waits for the
    exit, so the drain time is the process's, not the polling loop's)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        from support import process_state  # tests/ is on sys.path (see main), like support.sample_flows

        self.proc = proc
        self.since = time.monotonic()
        self.exited_at: float | None = None
        self.ready = process_state.terminate(proc)
        self.waiter = threading.Thread(target=self._wait, name=f"drain-{proc.pid}", daemon=True)
        self.waiter.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.exited_at = time.monotonic()


@dataclass
class Scaler:
    """KEDA + HPA in miniature, for one queue. ``spawn()`` starts one worker replica (a Popen)."""

    dsn: str
    queue: str
    spawn: Callable[[], subprocess.Popen]
    min_replicas: int = 1
    max_replicas: int = 4
    target: int = 20                    # ready messages per replica (KEDA's targetQueryValue)
    poll_interval: float = 0.5          # KEDA's pollingInterval (30 s by default in a cluster)
    stabilization: float = 1.0          # the HPA's scale-down stabilization window (300 s by default)
    drain_timeout: float = 10.0         # the workers' --drain-timeout: the grace period on scale-in
    echo: Callable[[str], None] = print
    replicas: list[subprocess.Popen] = field(default_factory=list)
    draining: list[Drain] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    history: list[tuple[float, int, int]] = field(default_factory=list)  # (t, depth, replicas)
    scale_ins: list[tuple[float, int, int]] = field(default_factory=list)  # (t, replicas removed, in flight)
    _recommendations: deque = field(default_factory=deque)
    _t0: float = field(default_factory=time.monotonic)

    @property
    def peak(self) -> int:
        return max((n for _, _, n in self.history), default=len(self.replicas))

    def start(self) -> None:
        self._scale_to(self.min_replicas, depth=0, why="min replicas")

    def desired(self, depth: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, math.ceil(depth / self.target)))

    def step(self, conn: psycopg.Connection) -> None:
        """One polling round: read the depth, decide, scale; reap draining replicas."""
        now = time.monotonic()
        depth = queue_depth(conn, self.queue)
        want = self.desired(depth)
        self._recommendations.append((now, want))
        while self._recommendations and self._recommendations[0][0] < now - self.stabilization:
            self._recommendations.popleft()
        # out at once; in only to the highest recommendation of the stabilization window
        target = want if want > len(self.replicas) else max(w for _, w in self._recommendations)
        if target != len(self.replicas):
            # messages read but not acknowledged yet (or waiting for a retry): work a scale-in must drain
            hidden = conn.execute(f"SELECT count(*) FROM pgmq.q_{self.queue} WHERE vt > now()").fetchone()[0]
            if target < len(self.replicas):
                self.scale_ins.append((now - self._t0, len(self.replicas) - target, hidden))
            self._scale_to(target, depth, why=f"ceil({depth} ready / {self.target}); {hidden} in flight")
        self._reap()
        self.history.append((now - self._t0, depth, len(self.replicas)))

    def _scale_to(self, count: int, depth: int, why: str) -> None:
        before = len(self.replicas)
        while len(self.replicas) < count:
            self.replicas.append(self.spawn())
        while len(self.replicas) > count:
            self.draining.append(Drain(self.replicas.pop()))  # the newest, like a ReplicaSet scaling down
        self.echo(f"[{time.monotonic() - self._t0:6.1f}s] depth {depth:4d} -> replicas {before} -> {count} ({why})"
                  + (f"; SIGTERM to {before - count}" if count < before else ""))

    def _reap(self, wait: bool = False) -> None:
        for drain in list(self.draining):
            if wait:
                drain.waiter.join(max(0.0, drain.since + self.drain_timeout + 5 - time.monotonic()))
            exited_at = drain.exited_at
            overdue = time.monotonic() - drain.since > self.drain_timeout + 5
            if exited_at is None and not overdue:
                continue
            code = None if exited_at is None else drain.proc.returncode
            if exited_at is None:  # what Kubernetes does after terminationGracePeriodSeconds
                drain.proc.kill()
                drain.waiter.join()
            seconds = (exited_at or time.monotonic()) - drain.since
            self.draining.remove(drain)
            self.exits.append(Exit(drain.proc.pid, code, seconds, drain.ready))
            self.echo(f"[{time.monotonic() - self._t0:6.1f}s] worker {drain.proc.pid} exited "
                      f"{'(killed: drain timeout)' if code is None else code} {seconds:.1f} s after SIGTERM"
                      + ("" if drain.ready else " (sent while it was still starting)"))

    def run(self, done: Callable[[], bool], timeout: float) -> bool:
        """Poll until ``done()`` and back at min replicas with nothing draining, or ``timeout``; True if so."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                self.step(conn)
                if len(self.replicas) == self.min_replicas and not self.draining and done():
                    return True
                time.sleep(self.poll_interval)
        return False

    def close(self) -> None:
        """Scale to zero (SIGTERM every replica) and wait for the drains."""
        if self.replicas:
            self._scale_to(0, depth=0, why="shutting down")
        self._reap(wait=True)


# ---------------------------------------------------------------------------------------------- workload

@dataclass
class Outcome:
    instances: dict[int, str]
    tasks: int                # map tasks in the database
    missing: list[str]        # tasks without a recorded execution
    over_run: list[str]       # tasks executed more often than their attempts (or an attempt twice)
    running: int              # step rows still 'running'
    executions: int           # rows in py_runs


def start_workload(dsn: str, instances: int, tasks: int, sleep: tuple[float, float]) -> list[int]:
    from support import sample_flows

    return [pgflow.start(sample_flows.fanout, {"tasks": tasks, "sleep": list(sleep)}, dsn=dsn)
            for _ in range(instances)]


def all_finished(dsn: str, ids: list[int]) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pgflow.instances WHERE id = ANY(%s)"
                            " AND status IN ('pending', 'running')", (ids,)).fetchone()[0] == 0


def outcome(dsn: str, ids: list[int]) -> Outcome:
    with psycopg.connect(dsn) as conn:
        statuses = dict(conn.execute("SELECT id, status FROM pgflow.instances WHERE id = ANY(%s)",
                                     (ids,)).fetchall())
        rows = conn.execute("""
            SELECT format('pgflow:%%s:%%s[%%s]', s.instance_id, s.step_name, s.task_index) AS key, s.attempt,
                   count(r.key) AS runs, count(DISTINCT r.attempt) AS attempts_run, max(r.attempt) AS last_run
            FROM pgflow.steps s
            LEFT JOIN py_runs r ON r.key = format('pgflow:%%s:%%s[%%s]', s.instance_id, s.step_name, s.task_index)
            WHERE s.instance_id = ANY(%s) AND s.step_name = 'crunch' AND s.task_index >= 0
            GROUP BY 1, 2""", (ids,)).fetchall()
        running = conn.execute("SELECT count(*) FROM pgflow.steps WHERE instance_id = ANY(%s)"
                               " AND status = 'running'", (ids,)).fetchone()[0]
        executions = conn.execute("SELECT count(*) FROM py_runs").fetchone()[0]
    missing = [key for key, _, runs, _, _ in rows if runs == 0]
    over = [key for key, attempt, runs, distinct, last in rows
            if runs and (runs > attempt or distinct != runs or last > attempt)]
    return Outcome(statuses, len(rows), missing, over, running, executions)


def worker_command(dsn: str, queue: str, drain_timeout: float, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "pgflow", "worker", "--dsn", dsn, "--queue", queue, "--concurrency", "1",
            "--import", "support.sample_flows", "--drain-timeout", str(drain_timeout),
            "--batch-size", str(batch_size),
            "--visibility-timeout", "5"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtests/run.py autoscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("PGFLOW_DSN"), help="a server (default: embedded)")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=200, help="map tasks per instance")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--target", type=int, default=20, help="ready messages per replica")
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=50,
                        help="messages a worker reads at once (a scale-in then has claimed work to give back)")
    parser.add_argument("--stabilization", type=float, default=1.0, help="scale-down stabilization window (s)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(TESTS))  # support.sample_flows: the workload, for this process and the workers
    from support.sample_flows import create_effect_tables

    admin = resolve_dsn(args.dsn)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "pgflow_autoscale" WITH (FORCE)')
        conn.execute('CREATE DATABASE "pgflow_autoscale"')
    dsn = make_conninfo(admin, dbname="pgflow_autoscale")
    init_schema(dsn)
    create_effect_tables(dsn)
    env = dict(os.environ, PGFLOW_TEST_EFFECTS_DSN=dsn,
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    env.pop("PGFLOW_DSN", None)

    procs: list[subprocess.Popen] = []

    def spawn(cmd: list[str]) -> subprocess.Popen:
        procs.append(subprocess.Popen(cmd, env=env))
        return procs[-1]

    coordinator = spawn([sys.executable, "-m", "pgflow", "coordinator", "--dsn", dsn])
    scaler = Scaler(dsn, QUEUE, lambda: spawn(worker_command(dsn, QUEUE, args.drain_timeout, args.batch_size)),
                    min_replicas=args.min_replicas, max_replicas=args.max_replicas, target=args.target,
                    stabilization=args.stabilization, drain_timeout=args.drain_timeout)
    try:
        scaler.start()
        ids = start_workload(dsn, args.instances, args.tasks, (0.02, 0.05))
        print(f"started {len(ids)} instances of fanout ({args.tasks} map tasks of 20-50 ms each) on queue {QUEUE}; "
              f"KEDA query: {KEDA_DEPTH_QUERY_TEMPLATE.format(queue=QUEUE)}")
        settled = scaler.run(lambda: all_finished(dsn, ids), args.timeout)
        result = outcome(dsn, ids)
    finally:
        scaler.close()
        coordinator.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    replicas = [n for _, _, n in scaler.history]
    checks = {
        f"reached {args.max_replicas} replicas": scaler.peak == args.max_replicas,
        f"back to {args.min_replicas} replica(s)": settled and replicas[-1] == args.min_replicas,
        "every instance completed": set(result.instances.values()) == {"completed"},
        "every task's side effect present": not result.missing and result.tasks == args.instances * args.tasks,
        "no task ran more often than its attempts": not result.over_run,
        "no task left running": result.running == 0,
        "scaled-in workers exited 0 within the drain timeout":
            all(e.drained(args.drain_timeout) for e in scaler.exits),
    }
    print(f"\n{result.tasks} tasks, {result.executions} executions; replica counts seen: "
          f"{' '.join(str(n) for i, n in enumerate(replicas) if i == 0 or n != replicas[i - 1])}; "
          f"scale-ins with work in flight: {sum(1 for _, _, hidden in scaler.scale_ins if hidden)}"
          f"/{len(scaler.scale_ins)}")
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
