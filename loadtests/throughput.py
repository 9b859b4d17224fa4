"""Throughput benchmark: K instances of a 3-step chain of no-op Python steps, W worker processes and one
coordinator, against the same server's raw commit rate measured in the same run.

    python loadtests/throughput.py [--instances 2000] [--workers 2] [--dsn DSN]

Prints steps/s (first start to last completion), instance latency p50/p99 (created -> finished, from the
database's own timestamps), the raw commit rate of one tiny UPDATE per transaction (1 client and W clients)
and the ratio between them; writes the figures to loadtests/results/throughput-<timestamp>.json.
This is a measurement, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import multiprocess
import psycopg
from psycopg.conninfo import make_conninfo

import pgflow
from pgflow import store
from pgflow.coordinator import run_coordinator
from pgflow.worker import run_workers

RESULTS = Path(__file__).parent / "results"

chain = pgflow.Flow("bench_chain", queue="bench")


@chain.step()
def one(ctx, input):
    return None


@chain.step(after=[one])
def two(ctx, one):
    return None


@chain.step(after=[two])
def three(ctx, two):
    return None


def fresh_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(admin_dsn, dbname=name)
    store.init_schema(dsn)
    return dsn


def commit_rate(dsn: str, clients: int, seconds: float = 3.0) -> float:
    """Commits/s of one tiny UPDATE per transaction, from ``clients`` connections (threads)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_counter (id int PRIMARY KEY, n bigint)")
        conn.execute("INSERT INTO bench_counter SELECT g, 0 FROM generate_series(1, 64) g ON CONFLICT DO NOTHING")
    counts = [0] * clients
    stop = threading.Event()

    def client(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE bench_counter SET n = n + 1 WHERE id = %s", (i + 1,))
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def run_chain(dsn: str, instances: int, workers: int) -> dict:
    context = multiprocess.get_context("fork")
    coordinator = context.Process(target=run_coordinator, args=(dsn,))
    pool = context.Process(target=run_workers, args=(dsn,), kwargs={"queues": ["bench"], "concurrency": workers,
                                                                     "batch_size": 50})
    coordinator.start()
    pool.start()
    try:
        with store.transaction(dsn) as conn:  # register the flow and create its queue before timing
            pgflow.client.register(conn, chain)
        time.sleep(1.0)  # let the processes connect
        started = time.monotonic()
        with store.connect(dsn) as conn:
            for first in range(0, instances, 500):
                with conn.transaction():
                    for i in range(first, min(first + 500, instances)):
                        pgflow.start(chain, i, conn=conn)
            done = 0
            while done < instances:
                time.sleep(0.05)
                done = conn.execute("SELECT count(*) FROM pgflow.instances WHERE status IN "
                                    "('completed', 'failed', 'cancelled')").fetchone()[0]
                conn.commit()
            elapsed = time.monotonic() - started
            rows = conn.execute("SELECT status, extract(epoch FROM finished_at - created_at)::float8"
                                " FROM pgflow.instances").fetchall()
    finally:
        for process in (pool, coordinator):
            process.terminate()
        for process in (pool, coordinator):
            process.join(30)
    latencies = sorted(r[1] for r in rows)
    failed = sum(1 for r in rows if r[0] != "completed")
    return {
        "instances": instances, "failed": failed, "steps": 3 * instances, "seconds": elapsed,
        "steps_per_second": 3 * instances / elapsed,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dsn", default=None, help="server to use (default: PGFLOW_DSN or embedded)")
    args = parser.parse_args()

    dsn = fresh_database(store.resolve_dsn(args.dsn), "pgflow_bench")
    one_client = commit_rate(dsn, 1)
    w_clients = commit_rate(dsn, max(2, args.workers))
    figures = run_chain(dsn, args.instances, args.workers)
    figures.update({
        "commits_per_second_1_client": one_client,
        f"commits_per_second_{max(2, args.workers)}_clients": w_clients,
        "ratio_steps_to_commits_1_client": figures["steps_per_second"] / one_client,
        "workers": args.workers,
    })
    with psycopg.connect(dsn) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    print(f"pgflow throughput: {args.instances} instances x 3 no-op steps, {args.workers} worker processes, "
          f"PostgreSQL {server_version}")
    print(f"  steps/s              {figures['steps_per_second']:>10,.0f}   ({figures['seconds']:.2f} s, "
          f"{figures['failed']} failed)")
    print(f"  instance latency     p50 {figures['latency_p50_ms']:,.1f} ms   p99 {figures['latency_p99_ms']:,.1f} ms")
    print(f"  raw commits/s        {one_client:>10,.0f} (1 client)   {w_clients:,.0f} ({max(2, args.workers)} clients)")
    print(f"  ratio steps/commit   {figures['ratio_steps_to_commits_1_client']:>10.2f} (vs 1-client commits)")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"throughput-{stamp}.json"
    out.write_text(json.dumps({"figures": figures, "server_version": server_version, "python": sys.version,
                               "machine": platform.platform(), "cpus": multiprocess.cpu_count()}, indent=2))
    print(f"  written to {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0 if figures["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
