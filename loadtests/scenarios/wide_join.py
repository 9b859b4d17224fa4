"""One instance with a 10,000-wide map then a fan-in: enqueue time and fan-in time."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import bench_flows
import harness as h
import psycopg
from harness import bench
from harness.bench import TARGETS, Run, check, show
from harness.chain import register

import pgflow


def measure(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    repeats = a.instances or 3
    flow = bench_flows.wide
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    register(dsn, flow)
    h.log(f"wide_join: {repeats} instance(s), one at a time, each a {a.width:,}-wide map then a fan-in; "
          f"{a.workers} worker processes")
    rounds = []
    with h.Engine(dsn, workers=a.workers, queues=["wide"], batch_size=a.batch_size) as engine:
        monitor = h.Monitor(dsn, engine, None)
        monitor.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for r in range(repeats):
                    rounds.append(one_wide_instance(conn, dsn, flow, a.width, a.timeout))
                    x = rounds[-1]
                    h.log(f"  instance {r + 1}: enqueue {x['enqueue_seconds']:.3f} s (visible "
                          f"{x['enqueue_visible_seconds']:.3f} s), fan-in {x['fan_in_seconds']:.3f} s, "
                          f"map {x['map_seconds']:.2f} s ({x['tasks_per_second']:,.0f} tasks/s)")
        finally:
            resources = monitor.finish()
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], float)]
    median = {k: statistics.median(r[k] for r in rounds) for k in keys}
    figures = {"width": a.width, "instances": repeats, "workers": a.workers, "median": median, "rounds": rounds,
               **resources}
    h.log("results (median of the instances)")
    show("map ready -> first task started", f"{median['enqueue_seconds']:.3f} s (all {a.width:,} tasks are "
         "committed at once)", check(median["enqueue_seconds"], TARGETS["wide_enqueue_s"], below=True)
         + " (target < 1 s)")
    show("  ready -> coordinator txn start", f"{median['ready_to_coordinator_seconds']:.3f} s")
    show("  ready -> all tasks visible (poll)", f"{median['enqueue_visible_seconds']:.3f} s")
    show("fan-in: last task -> total started", f"{median['fan_in_seconds']:.3f} s",
         check(median["fan_in_seconds"], TARGETS["wide_fan_in_s"], below=True) + " (target < 1 s)")
    show("  last task -> map completed (txn)", f"{median['fan_in_to_map_completed_seconds']:.3f} s")
    show("map execution", f"{median['map_seconds']:.2f} s ({median['tasks_per_second']:,.0f} tasks/s)")
    show("instance end to end", f"{median['instance_seconds']:.2f} s")
    panels = [
        {"kind": "line", "title": "tasks completed over time (instance 1)", "xlabel": "s since map ready",
         "ylabel": "tasks completed", "series": {"square tasks": rounds[0]["_cumulative"]}},
        {"kind": "bar", "title": f"median over {repeats} instance(s) (s)", "fmt": "{:.3f}",
         "series": {"enqueue 10k": median["enqueue_seconds"], "fan-in": median["fan_in_seconds"]},
         "hlines": {"target 1 s": 1.0}},
    ]
    for r in rounds[1:]:
        r.pop("_cumulative", None)
    return figures, panels


def one_wide_instance(conn: psycopg.Connection, dsn: str, flow: pgflow.Flow, width: int,
                      timeout: float) -> dict[str, Any]:
    """Run one wide instance; a poller records (database clock) when all its tasks became visible."""
    iid = pgflow.start(flow, {"width": width}, conn=conn)
    visible_at: list[Any] = []
    stop = threading.Event()

    def poll() -> None:
        with psycopg.connect(dsn, autocommit=True) as watch:
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                now, n = watch.execute("SELECT clock_timestamp(), count(*) FROM pgflow.steps WHERE instance_id = %s"
                                       " AND step_name = 'square' AND task_index >= 0", (iid,)).fetchone()
                if n >= width:
                    visible_at.append(now)
                    return
                time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    h.wait_until(lambda: conn.execute(f"SELECT status IN {h.TERMINAL} FROM pgflow.instances WHERE id = %s",
                                      (iid,)).fetchone()[0], timeout, f"wide instance {iid}", 0.05)
    stop.set()
    poller.join(10)
    row = conn.execute("""
        SELECT (SELECT finished_at FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'numbers'),
               min(enqueued_at), min(started_at), max(finished_at),
               (SELECT finished_at FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'square'
                AND task_index = -1),
               (SELECT started_at FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'total'),
               (SELECT finished_at - created_at FROM pgflow.instances WHERE id = %(id)s),
               count(*) FILTER (WHERE status = 'completed')
        FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'square' AND task_index >= 0""",
                       {"id": iid}).fetchone()
    ready, enqueued, first_start, last_finish, map_done, total_start, duration, done = row
    cumulative = conn.execute("""
        SELECT extract(epoch FROM finished_at - %s)::float8 FROM pgflow.steps
        WHERE instance_id = %s AND step_name = 'square' AND task_index >= 0 ORDER BY finished_at""",
                              (ready, iid)).fetchall()
    step = max(1, len(cumulative) // 400)
    return {
        "instance_id": iid, "tasks_completed": done,
        "ready_to_coordinator_seconds": (enqueued - ready).total_seconds(),
        "enqueue_seconds": (first_start - ready).total_seconds(),
        "enqueue_visible_seconds": (visible_at[0] - ready).total_seconds() if visible_at else float("nan"),
        "map_seconds": (last_finish - first_start).total_seconds(),
        "tasks_per_second": width / (last_finish - first_start).total_seconds(),
        "fan_in_seconds": (total_start - last_finish).total_seconds(),
        "fan_in_to_map_completed_seconds": (map_done - last_finish).total_seconds(),
        "instance_seconds": duration.total_seconds(),
        "_cumulative": [(t, i + 1) for i, (t,) in enumerate(cumulative) if i % step == 0 or i == len(cumulative) - 1],
    }


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("wide_join", __doc__, "instances run one after another (3)")
    g = p.add_argument_group("wide_join")
    g.add_argument("--width", type=int, default=10_000)
    return bench.main(p.parse_args(argv), measure)
