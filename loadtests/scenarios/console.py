"""The console with a big history: the instance list's server time with 1,000,000 instances in the database.

    python loadtests/run.py console [--instances 1000000] [--dsn DSN] [--repeat 20]

Creates (and leaves, for inspection) the database pgflow_bench_console, fills pgflow.instances with
``--instances`` rows in one INSERT (5 flows, 90% completed / 5% failed / 3% cancelled / 2% running, a label on
10%, one creation per second going back in time, 1 in 1,000 owned by an ordinary role granted usage), runs a
real `pgflow console` process and requests the instance list with each filter the page offers, as the pgflow
owner and as that role (row-level security). The figure is the handler's own time, read from the
``Server-Timing`` header the console sets (no network, no browser), p50/p95/max over ``--repeat`` requests
after 3 warm-up ones; the target is 200 ms. A measurement, not a test: it asserts nothing. Step rows are not
generated (the list does not read them). Writes loadtests/results/console-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import harness as h
import httpx
import psycopg
from psycopg.conninfo import make_conninfo

from pgflow.db.connection import resolve_dsn
from pgflow.db.migrations import init_schema

TARGET_MS = 200.0
DBNAME = "pgflow_bench_console"
USER = "pgflow_bench_console_user"
FLOWS = ["ingest", "embed_docs", "reports", "billing", "cleanup"]
FILL = """
INSERT INTO pgflow.instances (flow_name, flow_version, status, label, input, created_at, started_at, finished_at,
                              error, owner)
SELECT f.name, f.version, s.status, CASE WHEN g %% 10 = 0 THEN 'nightly' END, jsonb_build_object('n', g),
       t.at, t.at, CASE WHEN s.status <> 'running' THEN t.at + interval '2 seconds' END,
       CASE WHEN s.status = 'failed' THEN 'step load failed: boom ' || g END,
       CASE WHEN g %% 1000 = 7 THEN %(user)s ELSE current_user END
FROM generate_series(1, %(n)s) AS g
CROSS JOIN LATERAL (SELECT (%(names)s::text[])[1 + g %% 5] AS name, (%(versions)s::text[])[1 + g %% 5] AS version) f
CROSS JOIN LATERAL (SELECT CASE WHEN g %% 100 < 90 THEN 'completed' WHEN g %% 100 < 95 THEN 'failed'
                               WHEN g %% 100 < 98 THEN 'cancelled' ELSE 'running' END AS status) s
CROSS JOIN LATERAL (SELECT now() - make_interval(secs => %(n)s - g) AS at) t
"""


def prepare(admin_dsn: str, n: int) -> str:
    """A fresh database holding ``n`` instances; its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DBNAME}"')
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (USER,)).fetchone():
            conn.execute(f'CREATE ROLE "{USER}" LOGIN')
    dsn = make_conninfo(admin_dsn, dbname=DBNAME)
    init_schema(dsn)
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgflow.grant_usage(%s)", (USER,))
        versions = []
        for name in FLOWS:  # the version is the shape's (pgflow.shape_version), as register_flow requires
            shape = json.dumps({"name": name, "steps": [{
                "name": "load", "kind": "sql", "deps": [], "over": None, "flatten": False, "queue": "pgflow",
                "max_attempts": 3, "backoff_base": 1, "backoff_cap": 60, "timeout": None, "sql": "SELECT 1"}]})
            versions.append(conn.execute("SELECT pgflow.shape_version(%s::jsonb)", (shape,)).fetchone()[0])
            conn.execute("SELECT pgflow.register_flow(%s, %s, NULL, %s::jsonb)", (name, versions[-1], shape))
        conn.execute(FILL, {"n": n, "names": FLOWS, "versions": versions, "user": USER})
        conn.execute("VACUUM ANALYZE pgflow.instances")
    print(f"{n:,} instances written in {time.monotonic() - started:.1f} s", flush=True)
    return dsn


def cases(now: datetime) -> dict[str, str]:
    """The instance list with each filter the page offers (and a deep page)."""
    hour_ago = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    days_ago = (now - timedelta(days=5)).strftime("%Y-%m-%dT%H:%M")
    return {
        "first page": "/", "status=failed": "/?status=failed", "status=running": "/?status=running",
        "flow=billing": "/?flow=billing", "label=nightly": "/?label=nightly",
        "failed + billing": "/?status=failed&flow=billing", "since 1 h ago": f"/?since={hour_ago}",
        "until 5 days ago": f"/?until={days_ago}", "page 2": "/?before=999950",
        "deep page (before=500000)": "/?before=500000", "live refresh (partial=rows)": "/?partial=rows",
    }


def measure(base: str, path: str, repeat: int) -> dict[str, float]:
    with httpx.Client(base_url=base, timeout=60) as http:
        times = []
        for i in range(repeat + 3):
            response = http.get(path)
            response.raise_for_status()
            ms = float(re.search(r"dur=([0-9.]+)", response.headers["server-timing"])[1])
            if i >= 3:
                times.append(ms)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))], "max_ms": times[-1]}


def run_console(dsn: str):
    proc = subprocess.Popen([sys.executable, "-m", "pgflow", "console", "--dsn", dsn, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+/)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the console did not start: {line} {proc.stderr.read()}")
    return proc, match[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtests/run.py console", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--reuse", action="store_true", help="keep the database of an earlier run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args(argv)
    admin_dsn = resolve_dsn(args.dsn)
    dsn = make_conninfo(admin_dsn, dbname=DBNAME) if args.reuse else prepare(admin_dsn, args.instances)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with psycopg.connect(dsn) as conn:
        now = conn.execute("SELECT now()").fetchone()[0]
        total = conn.execute("SELECT count(*) FROM pgflow.instances").fetchone()[0]
        version = conn.execute("SHOW server_version").fetchone()[0]
    for who, role_dsn in (("pgflow owner", dsn), (f"role {USER} (1 in 1,000 instances, RLS)",
                                                  make_conninfo(dsn, user=USER))):
        proc, base = run_console(role_dsn)
        try:
            results[who] = {name: measure(base, path, args.repeat) for name, path in cases(now).items()}
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    print(f"\ninstance list, server time (Server-Timing), {total:,} instances, PostgreSQL {version}")
    for who, figures in results.items():
        print(f"\n  as {who}")
        for name, f in figures.items():
            verdict = "met" if f["p95_ms"] < TARGET_MS else "MISSED"
            print(f"    {name:<30} p50 {f['p50_ms']:7.1f} ms  p95 {f['p95_ms']:7.1f} ms  max {f['max_ms']:7.1f} ms"
                  f"  (target < {TARGET_MS:.0f} ms: {verdict})")
    path = h.write_figures(args.out, "console", dsn, vars(args), {
        "instances": total, "server_version": version, "target_ms": TARGET_MS, "repeat": args.repeat,
        "list": results})
    print(f"\n{path}")
    return 0
