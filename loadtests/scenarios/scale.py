"""The chain workload with 1, 2, 4 worker processes: steps/s per worker count."""

from __future__ import annotations

import threading
import time
from typing import Any

import bench_flows
import harness as h
import psycopg
from harness import bench
from harness.bench import Run, show
from harness.chain import register

import pgflow
from pgflow.db.connection import connect


def _feeder(dsn: str, flow: pgflow.Flow, backlog: int, stop: threading.Event, counter: list[int]) -> None:
    """Keep about ``backlog`` unfinished instances, starting 500 at a time (bounded by ``stop``)."""
    with connect(dsn) as conn:
        while not stop.is_set():
            unfinished = conn.execute("SELECT count(*) FROM pgflow.instances WHERE status IN ('pending', 'running')"
                                      ).fetchone()[0]
            conn.commit()
            if unfinished < backlog:  # start_many: the feeder must not be what limits the engine
                with conn.transaction():
                    pgflow.start_many(flow, list(range(counter[0], counter[0] + 500)), conn=conn)
                counter[0] += 500
            else:
                stop.wait(0.05)


def measure(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    counts = [int(x) for x in a.worker_counts.split(",")]
    flow = bench_flows.chain(a.chain_length)
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    register(dsn, flow)
    h.log(f"scale: chain of {a.chain_length} steps, a backlog of ~{a.backlog:,} unfinished instances kept "
          f"topped up; worker processes {counts}, {a.phase_seconds:g} s measured per phase after "
          f"{a.warmup:g} s warm-up")
    phases = []
    counter = [0]
    t_origin = None
    all_series: dict[str, list[tuple[float, float]]] = {}
    spans = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for w in counts:
            with h.Engine(dsn, workers=w, queues=["bench"], batch_size=a.batch_size) as engine:
                stop = threading.Event()
                feeder = threading.Thread(target=_feeder, args=(dsn, flow, a.backlog, stop, counter), daemon=True)
                feeder.start()
                monitor = h.Monitor(dsn, engine, None, server_pid=h.postmaster_pid(dsn))
                monitor.start()
                try:
                    time.sleep(a.warmup)
                    w0 = conn.execute("SELECT clock_timestamp()").fetchone()[0]
                    t_origin = t_origin or w0
                    for _ in run.progress(range(int(a.phase_seconds * 4)), desc=f"{w} worker(s)", unit="tick"):
                        time.sleep(0.25)
                    w1 = conn.execute("SELECT clock_timestamp()").fetchone()[0]
                finally:
                    stop.set()
                    feeder.join(30)
                    resources = monitor.finish()
            steps = conn.execute("SELECT count(*) FROM pgflow.steps WHERE status = 'completed' AND finished_at "
                                 "BETWEEN %s AND %s", (w0, w1)).fetchone()[0]
            series = [((b * 0.25) + (w0 - t_origin).total_seconds(), c / 0.25) for b, c in conn.execute("""
                SELECT floor(extract(epoch FROM finished_at - %s) / 0.25)::int AS b, count(*) FROM pgflow.steps
                WHERE status = 'completed' AND finished_at BETWEEN %s AND %s GROUP BY b ORDER BY b""",
                                                                                         (w0, w0, w1)).fetchall()]
            all_series[f"{w} worker process(es)"] = series
            seconds = (w1 - w0).total_seconds()
            spans[f"{w} w"] = ((w0 - t_origin).total_seconds(), (w1 - t_origin).total_seconds())
            phases.append({"workers": w, "steps": steps, "seconds": seconds, "steps_per_second": steps / seconds,
                           **resources})
            h.log(f"  {w} worker process(es): {steps / seconds:,.0f} steps/s")
    base = phases[0]["steps_per_second"]
    for p in phases:
        p["speedup"] = p["steps_per_second"] / base if base else None
    figures = {"chain_length": a.chain_length, "backlog": a.backlog, "phases": phases,
               "instances_started": counter[0]}
    h.log("results")
    for p in phases:
        show(f"{p['workers']} worker process(es)", f"{p['steps_per_second']:,.0f} steps/s (x{p['speedup']:.2f})",
             "CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in p["cpu_seconds"].items()))
    panels = [
        {"kind": "line", "title": "steps/s vs worker processes", "xlabel": "worker processes", "ylabel": "steps/s",
         "marker": "o", "series": {"steps/s": [(p["workers"], p["steps_per_second"]) for p in phases]}},
        {"kind": "line", "title": "throughput over time (measured windows)", "xlabel": "s", "ylabel": "steps/s",
         "series": all_series, "spans": spans},
    ]
    return figures, panels


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("scale", __doc__, "not used (the backlog is kept topped up)")
    g = p.add_argument_group("scale")
    g.add_argument("--worker-counts", default="1,2,4")
    g.add_argument("--phase-seconds", type=float, default=10.0)
    g.add_argument("--warmup", type=float, default=3.0)
    g.add_argument("--backlog", type=int, default=3000, help="unfinished instances kept topped up (3000)")
    return bench.main(p.parse_args(argv), measure)
