"""The chain workload the chain and linear scenarios share (start instances, run a load on a running engine,
read its figures from the database's own timestamps, scheduling latency), and the flow registration every
engine scenario does before anything is timed."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import bench_flows
import psycopg
from tqdm import tqdm

import harness as h
import pgflow
from harness.bench import Run
from pgflow.db.connection import connect, transaction


def register(dsn: str, *flows: pgflow.Flow) -> None:
    """Register flows (and create their queues) before anything is timed."""
    with transaction(dsn) as conn:
        for flow in flows:
            conn.execute("SELECT pgflow.register_flow(%s, %s, %s, %s::jsonb)",
                         (flow.name, flow.version, flow.ref, flow.shape_json))


def start_instances(dsn: str, flow: pgflow.Flow, count: int, bar: tqdm | None = None, per_txn: int = 500,
                    first: int = 0, *, start_many: bool = False) -> float:
    """Start ``count`` instances, ``per_txn`` per transaction (as an application that batches its starts
    would): with pgflow.start one by one, or with one pgflow.start_many per transaction (``start_many``,
    --start-many);
    returns the seconds it took."""
    t0 = time.monotonic()
    with connect(dsn) as conn:
        for begin in range(first, first + count, per_txn):
            with conn.transaction():
                batch = range(begin, min(begin + per_txn, first + count))
                if start_many:
                    pgflow.start_many(flow, list(batch), conn=conn)
                    continue
                for i in batch:
                    pgflow.start(flow, i, conn=conn)
            if bar is not None:
                bar.set_postfix_str(f"started {min(begin + per_txn, first + count) - first:,}/{count:,}")
    return time.monotonic() - t0


def xact_commits(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        return conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                            ).fetchone()[0]


def chain_figures(dsn: str, flow: pgflow.Flow, prestarted: bool = False) -> dict[str, Any]:
    """End-to-end figures of the instances of ``flow`` from the database's own timestamps: from the first
    start (or, when the instances were started before the engine, from the coordinator's first
    transaction) to the last completion."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        n, completed, t0, last_created, t1, lat = conn.execute("""
            SELECT count(*), count(*) FILTER (WHERE status = 'completed'), min(created_at), max(created_at),
                   max(finished_at),
                   percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP
                       (ORDER BY extract(epoch FROM finished_at - created_at))
            FROM pgflow.instances WHERE flow_name = %s""", (flow.name,)).fetchone()
        if prestarted:
            t0 = conn.execute("""SELECT min(s.enqueued_at) FROM pgflow.steps s JOIN pgflow.instances i
                                 ON i.id = s.instance_id WHERE i.flow_name = %s""", (flow.name,)).fetchone()[0]
        steps, = conn.execute("""
            SELECT count(*) FROM pgflow.steps s JOIN pgflow.instances i ON i.id = s.instance_id
            WHERE i.flow_name = %s AND s.status = 'completed'""", (flow.name,)).fetchone()
        series = conn.execute("""
            SELECT floor(extract(epoch FROM s.finished_at - %s) / 0.25)::int AS b, count(*)
            FROM pgflow.steps s JOIN pgflow.instances i ON i.id = s.instance_id
            WHERE i.flow_name = %s AND s.status = 'completed' GROUP BY b ORDER BY b""", (t0, flow.name)).fetchall()
    seconds = (t1 - t0).total_seconds()
    return {
        "instances": n, "completed": completed, "failed": n - completed, "steps": steps, "seconds": seconds,
        "steps_per_second": steps / seconds if seconds else None,
        "last_start_transaction_began_s": (last_created - t0).total_seconds(),
        "latency_p50_ms": 1000 * lat[0], "latency_p90_ms": 1000 * lat[1], "latency_p99_ms": 1000 * lat[2],
        "_series_steps_per_second": [(b * 0.25, c / 0.25) for b, c in series],
    }


def run_chain_load(run: Run, dsn: str, engine: h.Engine, flow: pgflow.Flow, instances: int, *,
                   profile: bool = False, timeout: float = 1800.0, prestart: bool = False) -> dict[str, Any]:
    """Start ``instances`` instances of ``flow`` on a running engine and wait for all of them. With
    ``prestart`` the instances are all started first and the (not yet started) engine afterwards: the
    figure is then the engine's own throughput, without the client's start rate."""
    length = len(flow.steps)
    prestart_seconds = None
    if prestart:
        with run.progress(total=instances, unit="instance", desc="pre-starting") as bar:
            prestart_seconds = start_instances(dsn, flow, instances, start_many=run.args.start_many)
            bar.update(instances)
        engine.start()
    commits0 = xact_commits(dsn)
    monitor = h.Monitor(dsn, engine, f"SELECT count(*) FROM pgflow.instances WHERE flow_name = '{flow.name}' "
                        f"AND status IN {h.TERMINAL}", server_pid=h.postmaster_pid(dsn))
    profiler = waits = None
    if profile:
        waits = h.WaitSampler(dsn)
        waits.start()
        profiler = h.Profiler(run.artifacts("profile"), {"coordinator": engine.coordinator.pid,
                                                         "workers": engine.pool.pid})
        profiler.start()
        time.sleep(1.0)  # let py-spy attach
    monitor.start()
    wall0 = monitor.t0 = time.monotonic()  # the live series' zero: the first start
    timed_out = None
    starter = h.Starter(lambda *_: prestart_seconds)
    try:
        with run.progress(total=instances * length, unit="step", desc=f"{flow.name} x{instances:,}") as bar:
            if not prestart:
                starter = h.Starter(partial(start_instances, start_many=run.args.start_many), dsn, flow,
                                    instances, bar)
            starter.start()
            h.wait_for_instances(monitor, instances, timeout, bar, scale=length, starter=starter)
            starter.join(60)
            starter.check()
    except TimeoutError as exc:  # keep what was measured; the caller decides what to do
        timed_out = str(exc)
        h.log(f"  TIMED OUT: {exc}")
        h.terminate_backends(dsn)  # a statement that never ends must not outlive the run
    finally:
        wall = time.monotonic() - wall0
        if profiler:
            profiler.stop()
        if waits:
            server_waits = waits.finish()
        resources = monitor.finish()
    figures = chain_figures(dsn, flow, prestarted=prestart)
    figures["prestarted"] = prestart
    figures["timed_out"] = timed_out
    figures["start_phase_seconds"] = starter.result
    figures["starts_per_second"] = instances / starter.result if starter.result else None
    figures.update(resources)
    figures["wall_seconds_harness"] = wall
    figures["xact_commits_before"] = commits0
    live = monitor.samples
    figures["_series_live_steps_per_second"] = [
        (t1, (c1 - c0) * length / (t1 - t0)) for (t0, c0), (t1, c1) in zip(live, live[1:], strict=False) if t1 > t0]
    figures["_series_worker_rss_mb"] = monitor.rss_series
    if profiler:
        figures["profile"] = profiler.summary()
        figures["profile"]["server"] = server_waits
        figures["profile_files"] = str(run.artifacts("profile"))
    return figures


def scheduling_latency(dsn: str, flow: pgflow.Flow, count: int, timeout_each: float = 10.0,
                       progress: tqdm | None = None) -> dict[str, Any]:
    """``count`` instances one at a time (each waited for before the next starts); then, per step, the
    delay from its predecessor's finished_at to its own started_at (split at its enqueued_at, when the
    coordinator's transaction began), and from an instance's creation to its first step starting."""
    ids = []
    with connect(dsn, autocommit=True) as conn:
        channel = conn.execute("SELECT pgflow.done_channel()").fetchone()[0]  # this role's own channel
        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        for i in range(count):
            iid = pgflow.start(flow, {"seq": i}, conn=conn)
            ids.append(iid)
            deadline = time.monotonic() + timeout_each
            done = False
            while not done:
                for note in conn.notifies(timeout=0.5, stop_after=1):
                    done = note.payload == str(iid)
                if not done:
                    status = conn.execute("SELECT status FROM pgflow.instances WHERE id = %s", (iid,)).fetchone()[0]
                    done = status in ("completed", "failed", "cancelled")
                if not done and time.monotonic() > deadline:
                    raise TimeoutError(f"instance {iid} did not finish within {timeout_each} s")
            if progress is not None:
                progress.update(1)
        pairs = bench_flows.chain_pairs(len(flow.steps))
        rows = conn.execute("""
            SELECT 1000 * extract(epoch FROM s.started_at - p.finished_at),
                   1000 * extract(epoch FROM s.enqueued_at - p.finished_at),
                   1000 * extract(epoch FROM s.started_at - s.enqueued_at)
            FROM unnest(%(preds)s::text[], %(succs)s::text[]) AS u(pred, succ)
            JOIN pgflow.steps p ON p.step_name = u.pred AND p.task_index = -1 AND p.instance_id = ANY(%(ids)s)
            JOIN pgflow.steps s ON s.instance_id = p.instance_id AND s.step_name = u.succ AND s.task_index = -1
            """, {"preds": [a for a, _ in pairs], "succs": [b for _, b in pairs], "ids": ids}).fetchall()
        first = [r[0] for r in conn.execute("""
            SELECT 1000 * extract(epoch FROM s.started_at - i.created_at)
            FROM pgflow.instances i JOIN pgflow.steps s ON s.instance_id = i.id AND s.step_name = 's1'
            WHERE i.id = ANY(%s)""", (ids,)).fetchall()]
        e2e = [r[0] for r in conn.execute("SELECT 1000 * extract(epoch FROM finished_at - created_at) "
                                          "FROM pgflow.instances WHERE id = ANY(%s)", (ids,)).fetchall()]
    handoff = [float(r[0]) for r in rows]
    out = {"instances": count, "samples": len(handoff)}
    for name, values in (("handoff", handoff), ("handoff_to_enqueue", [float(r[1]) for r in rows]),
                         ("enqueue_to_start", [float(r[2]) for r in rows]),
                         ("start_to_first_step", [float(v) for v in first]),
                         ("instance_end_to_end", [float(v) for v in e2e])):
        for key, value in h.percentiles(values).items():
            out[f"{name}_{key}_ms"] = value
    out["_handoff_ms"] = handoff
    return out
