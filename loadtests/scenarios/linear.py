"""Chain at 1k, 10k, 100k instances: steps/s each, database bytes per instance, worker RSS, and
retention purging finished instances and archived messages."""

from __future__ import annotations

import threading
import time
from typing import Any

import bench_flows
import harness as h
import psycopg
from harness import bench
from harness.bench import TARGETS, Run, check, show
from harness.chain import register, run_chain_load

import pgflow
from pgflow.engine.coordinator import Coordinator


def retention_check(dsn: str, retention: float, timeout: float) -> dict[str, Any]:
    """Run a coordinator with a short retention (in a thread of this process) until every finished
    instance and archived message is gone; counts and sizes before and after."""
    def counts(conn: psycopg.Connection) -> dict[str, Any]:
        row = conn.execute("""SELECT (SELECT count(*) FROM pgflow.instances), (SELECT count(*) FROM pgflow.steps),
                                     (SELECT count(*) FROM pgmq.a_bench), (SELECT count(*) FROM pgmq.q_bench)
                              """).fetchone()
        sizes = h.relation_sizes(conn)
        return {"instances": row[0], "steps": row[1], "archived_messages": row[2], "queued_messages": row[3],
                "bytes": sum(sizes.values())}

    with psycopg.connect(dsn, autocommit=True) as conn:
        before = counts(conn)
        time.sleep(retention + 0.5)  # let everything age past the retention
        coordinator = Coordinator(dsn, retention_seconds=retention, maintenance_every=0.5)
        thread = threading.Thread(target=coordinator.run, daemon=True, name="retention-coordinator")
        t0 = time.monotonic()
        thread.start()
        try:
            h.wait_until(lambda: (lambda c: c["instances"] == 0 and c["archived_messages"] == 0)(counts(conn)),
                         timeout, "retention purging every finished instance and archived message", 0.5)
        finally:
            coordinator.stop()
            thread.join(30)
        seconds = time.monotonic() - t0
        after = counts(conn)
        conn.execute("VACUUM pgflow.instances, pgflow.steps, pgflow.wakeups, pgmq.a_bench, pgmq.q_bench")
        vacuumed = counts(conn)
    return {"retention_seconds": retention, "purge_seconds": seconds, "before": before, "after": after,
            "after_vacuum": vacuumed}


def measure(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    sizes = [int(x) for x in a.sizes.split(",")]
    flow = bench_flows.chain(a.chain_length)
    h.log(f"linear: chain of {a.chain_length} steps at {', '.join(f'{s:,}' for s in sizes)} instances, "
          f"{a.workers} worker processes; each size in a fresh database, then retention {a.retention:g} s")
    runs = []
    for size in sizes:
        dsn = h.fresh_database(run.admin_dsn, run.dbname)
        baseline = h.commit_baseline(dsn, seconds=2.0)
        register(dsn, flow, bench_flows.failing)
        with h.Engine(dsn, workers=a.workers, queues=["bench"], batch_size=a.batch_size, quiet=True) as engine:
            figures = run_chain_load(run, dsn, engine, flow, size, timeout=a.timeout)
            figures.pop("xact_commits_before")
            figures["size"] = size
            figures.update(baseline)
            if figures["timed_out"]:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    figures["bytes_per_instance"] = sum(h.relation_sizes(conn).values()) / size
                figures["retention"] = None
                h.log(f"  {size:,}: TIMED OUT after {a.timeout:g} s with {figures['completed']:,} instances "
                      f"completed ({figures['steps_per_second'] or 0:,.0f} steps/s until the last completion)")
                runs.append(figures)
                continue
            with psycopg.connect(dsn, autocommit=True) as conn:
                sizes_after = h.relation_sizes(conn)
                # failed instances whose messages are archived, for the retention check
                for i in range(a.failing):
                    pgflow.start(bench_flows.failing, i, conn=conn)
                h.wait_until(lambda: conn.execute(
                    "SELECT count(*) FROM pgflow.instances WHERE flow_name = 'bench_failing' "
                    f"AND status IN {h.TERMINAL}").fetchone()[0] == a.failing, 60, "the failing instances")
        total_bytes = sum(sizes_after.values())
        figures["bytes_total"] = total_bytes
        figures["bytes_per_instance"] = total_bytes / size
        figures["largest_relations"] = dict(list(sizes_after.items())[:6])
        figures["retention"] = retention_check(dsn, a.retention, a.timeout)
        r = figures["retention"]
        h.log(f"  {size:,}: {figures['steps_per_second']:,.0f} steps/s ({figures['seconds']:.1f} s, starts "
              f"{figures['starts_per_second']:,.0f}/s), {figures['bytes_per_instance']:,.0f} bytes/instance, "
              f"worker RSS max {figures['rss_max_mb'].get('workers', 0):.0f} MB; retention purged "
              f"{r['before']['instances']:,} instances and {r['before']['archived_messages']} archived messages "
              f"in {r['purge_seconds']:.1f} s")
        runs.append(figures)
    rates = [f["steps_per_second"] or 0.0 for f in runs]
    finished = [f for f in runs if not f["timed_out"]]
    # a size that did not finish has no end-to-end rate: the spread is then not measured (target missed)
    spread = (max(rates) - min(rates)) / max(rates) if len(finished) == len(runs) and max(rates) else None
    rss = max(f["rss_max_mb"].get("workers", 0) for f in runs)
    summary = {"sizes": sizes, "steps_per_second": rates, "spread": spread, "worker_rss_max_mb": rss,
               "timed_out": [f["size"] for f in runs if f["timed_out"]],
               "bytes_per_instance": [f["bytes_per_instance"] for f in runs]}
    h.log("results")
    for f in runs:
        r = f["retention"]
        if r is None:
            show(f"{f['size']:,} instances", f"TIMED OUT: {f['completed']:,}/{f['size']:,} completed",
                 f"{f['steps_per_second'] or 0:,.0f} steps/s until the last completion")
            continue
        show(f"{f['size']:,} instances",
             f"{f['steps_per_second']:,.0f} steps/s; {f['bytes_per_instance']:,.0f} B/inst.; "
             f"RSS {f['rss_max_mb'].get('workers', 0):.0f} MB",
             f"retention: {r['before']['instances']:,} -> {r['after']['instances']} instances, "
             f"{r['before']['archived_messages']} -> {r['after']['archived_messages']} archived")
    if spread is None:
        show("spread of steps/s", "not measured: a size did not finish", "MISSED (target <= 20%)")
    else:
        show("spread of steps/s", f"{100 * spread:.1f}% (max-min)/max",
             check(spread, TARGETS["linear_spread"], below=True) + " (target <= 20%)")
    show("worker RSS max", f"{rss:.0f} MB", check(rss, TARGETS["worker_rss_mb"], below=True) + " (target < 150 MB)")
    panels = [
        {"kind": "bar", "title": "steps/s by size", "series": {f"{s:,}": v for s, v in zip(sizes, rates, strict=True)}},
        {"kind": "line", "title": "throughput over time", "xlabel": "s since first start", "ylabel": "steps/s",
         "series": {f"{f['size']:,}": f["_series_steps_per_second"] for f in runs}},
        {"kind": "bar", "title": "database bytes per completed instance", "series":
            {f"{f['size']:,}": f["bytes_per_instance"] for f in runs}},
        {"kind": "line", "title": "max worker RSS (MB)", "xlabel": "s", "ylabel": "MB",
         "series": {f"{f['size']:,}": f["_series_worker_rss_mb"] for f in runs},
         "hlines": {"target 150 MB": 150}},
    ]
    return {"summary": summary, "runs": runs}, panels


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("linear", __doc__, "not used (see --sizes)")
    g = p.add_argument_group("linear")
    g.add_argument("--sizes", default="1000,10000,100000")
    g.add_argument("--retention", type=float, default=2.0, help="retention of the purge check, seconds (2)")
    g.add_argument("--failing", type=int, default=100, help="failed instances (archived messages) to purge (100)")
    return bench.main(p.parse_args(argv), measure)
