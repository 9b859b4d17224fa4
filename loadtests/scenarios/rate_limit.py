"""Rate-limit accuracy (issue 14): with plenty of work queued under a limit of N requests per interval, how
many tasks start per interval, across every worker process.

    python loadtests/run.py rate_limit [--requests 600] [--per 60] [--seconds 150] [--workers 2] [--dsn DSN]

Work is plentiful: 3x what the limit allows in --seconds, in 10 instances of a no-op map. Starts are the
claims' started_at (database clock). Reported: the steady rate (starts per interval over the run after its
first interval) against N (target: <= N and >= 0.9 N), the most starts in any window of one interval (the
promise: N + burst - 1), and the attempts spent (waiting for the limit spends none). A JSON result goes to
loadtests/results/.
"""

from __future__ import annotations

import argparse
import bisect
import time

import harness as h
import psycopg

import pgflow
from pgflow.db.connection import resolve_dsn

ARGS = argparse.ArgumentParser(prog="loadtests/run.py rate_limit", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--requests", type=int, default=600)
ARGS.add_argument("--per", type=float, default=60.0)
ARGS.add_argument("--seconds", type=float, default=150.0)
ARGS.add_argument("--workers", type=int, default=2)
ARGS.add_argument("--dsn", default=None)
ARGS.add_argument("--out", default=str(h.RESULTS))


def limited_flow(requests: int, per: float) -> pgflow.Flow:
    flow = pgflow.Flow("rate_bench", queue="rate")

    @flow.map(over=pgflow.INPUT, limit=pgflow.Limit("rate_bench_api", requests=requests, per=per))
    def call(ctx, n: int) -> int:
        return n

    return flow


def main(argv: list[str] | None = None) -> int:
    args = ARGS.parse_args(argv)
    flow = limited_flow(args.requests, args.per)
    dsn = h.fresh_database(resolve_dsn(args.dsn), "pgflow_bench_rate_limit")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER DATABASE pgflow_bench_rate_limit SET pgflow.allow_superuser = on")
    total = int(3 * args.requests * args.seconds / args.per)
    with h.Engine(dsn, workers=args.workers, queues=["rate"]):
        per_instance = total // 10
        ids = pgflow.start_many(flow, [list(range(per_instance))] * 10, dsn=dsn)
        time.sleep(args.seconds)  # a measurement window, not a test: the limit decides what runs in it
        with psycopg.connect(dsn, autocommit=True) as conn:
            starts = [r[0] for r in conn.execute(
                "SELECT extract(epoch FROM started_at)::float8 FROM pgflow.steps WHERE instance_id = ANY(%s) "
                "AND task_index >= 0 AND started_at IS NOT NULL ORDER BY started_at", (ids,))]
            attempts = conn.execute("SELECT max(attempt) FROM pgflow.steps WHERE instance_id = ANY(%s) "
                                    "AND task_index >= 0", (ids,)).fetchone()[0]
            for iid in ids:
                pgflow.cancel(iid, "measured", dsn=dsn)
    t0 = starts[0]
    steady = [t for t in starts if t >= t0 + args.per]
    span = steady[-1] - (t0 + args.per) if len(steady) > 1 else 0.0
    rate = len(steady) / span * args.per if span else None
    most = max(bisect.bisect_left(starts, t + args.per) - i for i, t in enumerate(starts))
    figures = {"requests": args.requests, "per": args.per, "seconds": args.seconds, "tasks": total,
               "started": len(starts), "steady_rate_per_interval": rate, "steady_ratio": rate / args.requests if rate
               else None, "max_in_any_interval": most, "max_attempt": attempts,
               "first_interval_starts": sum(1 for t in starts if t < t0 + args.per)}
    ok = rate is not None and 0.9 * args.requests <= rate <= args.requests
    h.log(f"rate limit {args.requests} per {args.per:g} s, {args.workers} worker processes, {total:,} tasks queued")
    h.log(f"  steady rate: {rate:,.1f} per {args.per:g} s = {100 * figures['steady_ratio']:.1f}% of the limit "
          f"(target 90-100%: {'met' if ok else 'MISSED'})")
    h.log(f"  most starts in any {args.per:g} s window: {most} (promise: <= {args.requests} + burst 1 - 1)")
    h.log(f"  attempts: max {attempts} (waiting for the limit spends none)")
    out = h.write_figures(args.out, "rate_limit", dsn, vars(args), figures)
    h.log(f"  written {out}")
    return 0

