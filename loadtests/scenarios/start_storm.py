"""Several client processes start instances as fast as they can: starts/s, completion."""

from __future__ import annotations

import time
from typing import Any

import bench_flows
import harness as h
import multiprocess
import psycopg
from harness import bench
from harness.bench import Run, show
from harness.chain import register

import pgflow
from pgflow.db.connection import connect


def _storm_client(dsn: str, flow_length: int, first: int, count: int, go: Any, results: Any) -> None:
    flow = bench_flows.chain(flow_length)
    latencies = []
    go.wait(30)
    t0 = time.time()
    with connect(dsn) as conn:
        for i in range(first, first + count):
            s = time.perf_counter()
            with conn.transaction():
                pgflow.start(flow, i, conn=conn)
            latencies.append(time.perf_counter() - s)
    results.put({"first": t0, "last": time.time(), "count": count, "latencies": latencies})


def measure(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    instances = a.instances or 10_000
    flow = bench_flows.chain(a.chain_length)
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    register(dsn, flow)
    h.log(f"start_storm: {instances:,} instances started by {a.clients} client processes (one transaction per "
          f"start), {a.workers} worker processes")
    context = multiprocess.get_context("fork")
    go, results = context.Event(), context.Queue()
    per = [instances // a.clients + (1 if c < instances % a.clients else 0) for c in range(a.clients)]
    firsts = [sum(per[:c]) for c in range(a.clients)]
    with h.Engine(dsn, workers=a.workers, queues=["bench"], batch_size=a.batch_size) as engine:
        monitor = h.Monitor(dsn, engine, f"SELECT count(*) FROM pgflow.instances WHERE status IN {h.TERMINAL}",
                            server_pid=h.postmaster_pid(dsn))
        clients = [context.Process(target=_storm_client, args=(dsn, a.chain_length, firsts[c], per[c], go, results))
                   for c in range(a.clients)]
        for c in clients:
            c.start()
        monitor.start()
        try:
            go.set()
            outcome = [results.get(timeout=a.timeout) for _ in clients]
            with run.progress(total=instances, unit="instance", desc="completing") as bar:
                h.wait_for_instances(monitor, instances, a.timeout, bar)
        finally:
            for c in clients:
                c.join(10)
                if c.is_alive():
                    c.kill()
            resources = monitor.finish()
    first, last = min(o["first"] for o in outcome), max(o["last"] for o in outcome)
    latencies = [x * 1000 for o in outcome for x in o["latencies"]]
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0, t_last_start, t1, failed = conn.execute("""
            SELECT min(created_at), max(created_at), max(finished_at), count(*) FILTER (WHERE status <> 'completed')
            FROM pgflow.instances""").fetchone()
        created = [(b * 0.25, c / 0.25) for b, c in conn.execute("""
            SELECT floor(extract(epoch FROM created_at - %s) / 0.25)::int AS b, count(*) FROM pgflow.instances
            GROUP BY b ORDER BY b""", (t0,)).fetchall()]
        finished = [(b * 0.25, c / 0.25) for b, c in conn.execute("""
            SELECT floor(extract(epoch FROM finished_at - %s) / 0.25)::int AS b, count(*) FROM pgflow.instances
            GROUP BY b ORDER BY b""", (t0,)).fetchall()]
    lat = h.percentiles(latencies)
    complete_seconds = (t1 - t0).total_seconds()
    figures = {
        "instances": instances, "clients": a.clients, "workers": a.workers, "failed": failed,
        "start_seconds": last - first, "starts_per_second": instances / (last - first),
        "start_latency_ms": lat, "all_complete_seconds": complete_seconds,
        "complete_after_last_start_seconds": (t1 - t_last_start).total_seconds(),
        "steps_per_second": instances * a.chain_length / complete_seconds, **resources,
    }
    h.log("results")
    show("starts/s", f"{figures['starts_per_second']:,.0f} ({instances:,} in {figures['start_seconds']:.2f} s, "
         f"{a.clients} clients)")
    show("start latency", f"p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms")
    show("all complete", f"{complete_seconds:.2f} s after the first start "
         f"({figures['complete_after_last_start_seconds']:.2f} s after the last); {failed} failed")
    show("steps/s (end to end)", f"{figures['steps_per_second']:,.0f}")
    panels = [
        {"kind": "line", "title": "instances per second (0.25 s bins)", "xlabel": "s since first start",
         "ylabel": "instances/s", "series": {"started": created, "finished": finished}},
        {"kind": "bar", "title": "start latency (ms)", "fmt": "{:.1f}", "series": lat},
    ]
    return figures, panels


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("start_storm", __doc__, "instances (10000)")
    g = p.add_argument_group("start_storm")
    g.add_argument("--clients", type=int, default=4, help="client processes (4)")
    return bench.main(p.parse_args(argv), measure)
