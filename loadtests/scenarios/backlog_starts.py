"""Starts while a backlog grows: a granted role (pgflow.grant_usage) and the pgflow owner each start
instances one by one, in transactions of 1,000, with no engine running, so every instance stays open. Each
start checks the role's open instances against its quota (the owner has none): the figure is starts/s per
block of 1,000 as the backlog grows, and the last block's rate against the first's (target: the granted role
keeps at least 80% of its first rate, as the owner does).

    python loadtests/run.py backlog_starts [--instances 20000] [--dsn DSN]
"""

from __future__ import annotations

import time
from typing import Any

import bench_flows
import harness as h
import psycopg
from harness import bench
from harness.bench import Run, show
from harness.chain import register
from psycopg.conninfo import make_conninfo

import pgflow

BLOCK = 1_000
TARGET = 0.8  # the last block's starts/s over the first's


def starts_per_block(dsn: str, flow: pgflow.Flow, instances: int, bar: Any) -> list[float]:
    """Start ``instances`` instances of ``flow`` one by one, a transaction per block; starts/s per block."""
    rates = []
    with psycopg.connect(dsn) as conn:
        for _ in range(instances // BLOCK):
            began = time.perf_counter()
            with conn.transaction():
                for i in range(BLOCK):
                    pgflow.start(flow, i, conn=conn)
            rates.append(BLOCK / (time.perf_counter() - began))
            bar.update(BLOCK)
    return rates


def granted_role(admin_dsn: str, dsn: str, name: str) -> str:
    """A login role granted pgflow usage in the benchmark database; its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgflow.grant_usage(%s)", (name,))
    return make_conninfo(dsn, user=name)


def measure(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    instances = max(BLOCK, (run.args.instances or 20_000) // BLOCK * BLOCK)
    flow = bench_flows.chain(run.args.chain_length)
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    register(dsn, flow)
    role = "pgflow_bench_backlog_user"
    starters = {"owner": dsn, "granted role": granted_role(run.admin_dsn, dsn, role)}
    rates: dict[str, list[float]] = {}
    try:
        for who, starter_dsn in starters.items():
            h.log(f"backlog_starts: {instances:,} starts by the {who}, {BLOCK:,} per transaction, no engine")
            with run.progress(total=instances, unit="start", desc=who) as bar:
                rates[who] = starts_per_block(starter_dsn, flow, instances, bar)
    finally:
        h.drop_database(run.admin_dsn, run.dbname)
        with psycopg.connect(run.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    figures: dict[str, Any] = {"instances_per_starter": instances, "block": BLOCK, "starts_per_second": rates}
    h.log("results")
    for who, r in rates.items():
        kept = r[-1] / r[0]
        figures[f"{who.replace(' ', '_')}_last_over_first"] = kept
        show(f"starts/s, {who}", f"first block {r[0]:,.0f}, last {r[-1]:,.0f} (at {instances - BLOCK:,} open): "
             f"{kept:.2f}x", "met" if kept >= TARGET else f"MISSED (target >= {TARGET})")
    granted, owner = rates["granted role"], rates["owner"]
    show("granted role / owner, mean", f"{sum(granted) / sum(owner):.2f}x")
    panels = [{"kind": "line", "title": "starts/s per block of 1,000", "xlabel": "open instances before the block",
               "ylabel": "starts/s", "series": {who: [(i * BLOCK, v) for i, v in enumerate(r)]
                                                for who, r in rates.items()}}]
    return figures, panels


def main(argv: list[str] | None = None) -> int:
    return bench.main(bench.parser("backlog_starts", __doc__, "instances per starter (20000)").parse_args(argv),
                      measure)
