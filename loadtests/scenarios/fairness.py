"""Fair claiming under load (issue 14): how long a newly started 3-step chain takes while a 20,000-wide
fan-out runs on the same queue, and how 5,000 chains started at once complete (progressively, not FIFO).

    python loadtests/run.py fairness [--width 20000] [--chains 20] [--storm 5000] [--workers 2] [--dsn DSN]

Each chain's latency is from its instance's created_at to its finished_at (database clock). The FIFO figure
beside it is what strict FIFO order (pgmq.read, before issue 14) would have made the chain wait, computed in
the same run: the fan-out tasks queued ahead of the chain's first step when it started, divided by the map's
measured rate. These are measurements, not tests; a JSON result goes to loadtests/results/.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import harness as h
import psycopg

import pgflow
from pgflow.db.connection import resolve_dsn

fan = pgflow.Flow("fair_fan", queue="fair")


@fan.map(over=pgflow.INPUT)
def tick(ctx, n: int) -> int:
    return n


chain = pgflow.Flow("fair_chain", queue="fair")


@chain.step()
def first(ctx, input):
    return input


@chain.step(after=[first])
def second(ctx, first):
    return first


@chain.step(after=[second])
def third(ctx, second):
    return second


def chains_during_fan_out(dsn: str, width: int, count: int) -> dict[str, Any]:
    """Start the fan-out, then chains one at a time while it runs; each chain's latency and the FIFO wait."""
    fan_id = pgflow.start(fan, list(range(width)), dsn=dsn)
    latencies, fifo, ahead_counts = [], [], []
    with psycopg.connect(dsn, autocommit=True) as conn:
        h.wait_until(lambda: conn.execute("SELECT count(*) FROM pgflow.steps WHERE instance_id = %s AND "
                                          "step_name = 'tick' AND status = 'completed'", (fan_id,)
                                          ).fetchone()[0] >= width // 10, 600, "the fan-out to be under way")
        for _ in range(count):
            done_before, t_before = _fan_done(conn, fan_id)
            if done_before >= width * 0.95:
                break
            chain_id = pgflow.start(chain, 1, dsn=dsn)
            info = pgflow.wait(chain_id, timeout=600, dsn=dsn)
            done_after, t_after = _fan_done(conn, fan_id)
            seconds = conn.execute("SELECT extract(epoch FROM finished_at - created_at)::float8 FROM "
                                   "pgflow.instances WHERE id = %s", (chain_id,)).fetchone()[0]
            rate = (done_after - done_before) / max(t_after - t_before, 1e-6)
            ahead = width - done_before
            if info.status == "completed" and done_after < width:  # the fan-out was still running throughout
                latencies.append(seconds)
                ahead_counts.append(ahead)
                fifo.append(ahead / rate if rate else None)
        pgflow.wait(fan_id, timeout=1800, dsn=dsn)
    fifo_known = [f for f in fifo if f is not None]
    return {"width": width, "chains": len(latencies), "latency_s": latencies,
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_max_s": max(latencies) if latencies else None,
            "fifo_wait_estimate_p50_s": statistics.median(fifo_known) if fifo_known else None,
            "fan_out_tasks_ahead_p50": statistics.median(ahead_counts) if ahead_counts else None}


def _fan_done(conn: psycopg.Connection, fan_id: int) -> tuple[int, float]:
    row = conn.execute("SELECT count(*) FILTER (WHERE status = 'completed'), extract(epoch FROM clock_timestamp()) "
                       "FROM pgflow.steps WHERE instance_id = %s AND step_name = 'tick'", (fan_id,)).fetchone()
    return row[0], row[1]


def chain_storm(dsn: str, count: int) -> dict[str, Any]:
    """Start ``count`` chains in one statement: when the first completes, and how completions spread."""
    ids = pgflow.start_many(chain, [1] * count, dsn=dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        h.wait_until(lambda: conn.execute("SELECT count(*) FROM pgflow.instances WHERE id = ANY(%s) AND "
                                          "finished_at IS NOT NULL", (ids,)).fetchone()[0] == count, 1800,
                     "the chains to complete")
        finished = [r[0] for r in conn.execute(
            "SELECT extract(epoch FROM finished_at - min(created_at) OVER ())::float8 FROM pgflow.instances "
            "WHERE id = ANY(%s) ORDER BY finished_at", (ids,))]
    return {"storm": count, "first_completion_s": finished[0], "median_completion_s": statistics.median(finished),
            "last_completion_s": finished[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests/run.py fairness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=20_000)
    p.add_argument("--chains", type=int, default=20)
    p.add_argument("--storm", type=int, default=5_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dsn", default=None)
    p.add_argument("--out", default=str(h.RESULTS))
    args = p.parse_args(argv)
    dsn = h.fresh_database(resolve_dsn(args.dsn), "pgflow_bench_fairness")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER DATABASE pgflow_bench_fairness SET pgflow.allow_superuser = on")
    with h.Engine(dsn, workers=args.workers, queues=["fair"]):
        figures = chains_during_fan_out(dsn, args.width, args.chains)
        if args.storm:
            figures.update(chain_storm(dsn, args.storm))
    h.log("fairness")
    h.log(f"  3-step chain while a {args.width:,}-wide fan-out runs: p50 {figures['latency_p50_s']:.3f} s, "
          f"max {figures['latency_max_s']:.3f} s over {figures['chains']} chains (target < 1 s: "
          f"{'met' if (figures['latency_max_s'] or 99) < 1 else 'MISSED'})")
    h.log(f"  strict FIFO would have waited (same run, estimated): p50 {figures['fifo_wait_estimate_p50_s']:.1f} s "
          f"behind {figures['fan_out_tasks_ahead_p50']:,.0f} fan-out tasks")
    if args.storm:
        h.log(f"  {args.storm:,} chains started at once: first completed after {figures['first_completion_s']:.2f} s, "
              f"median {figures['median_completion_s']:.2f} s, last {figures['last_completion_s']:.2f} s")
    out = h.write_figures(args.out, "fairness", dsn, vars(args), figures)
    h.log(f"  written {out}")
    return 0

