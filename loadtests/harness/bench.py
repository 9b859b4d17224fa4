"""What every engine scenario shares: the run (arguments, server, database, result paths), its
common options, the verdicts against the targets, and the JSON + PNG written at the end."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

import harness as h
from pgflow.db.connection import resolve_dsn

TARGETS = {
    "chain_steps_per_second": 5000, "dbos_ratio": 15, "scheduling_p50_ms": 5, "scheduling_p99_ms": 25,
    "wide_enqueue_s": 1.0, "wide_fan_in_s": 1.0, "linear_spread": 0.20, "worker_rss_mb": 150,
    "parallel_efficiency": 0.85,          # one embed task per chunk
    "parallel_efficiency_batched": 0.90,  # embed tasks of --embed-batch chunks (issue 14)
}


class Run:
    """One invocation: arguments, the server, where results go."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scenario = args.scenario
        self.admin_dsn = resolve_dsn(args.dsn)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.base = self.out / f"{self.scenario}-{self.stamp}"
        self.dbname = f"pgflow_bench_{self.scenario}"

    def artifacts(self, kind: str) -> Path:
        path = self.out / f"{self.scenario}-{self.stamp}-{kind}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, iterable: Any = None, **kwargs: Any) -> tqdm:
        return tqdm(iterable, disable=self.args.no_progress, mininterval=0.5, dynamic_ncols=True, **kwargs)


def check(value: float | None, target: float, *, below: bool = False) -> str:
    if value is None:
        return "n/a"
    ok = value < target if below else value >= target
    return "met" if ok else "MISSED"


def show(label: str, value: str, verdict: str = "") -> None:
    h.log(f"  {label:<34} {value:<44} {verdict}")


def _strip_private(value: Any) -> Any:
    """Keep plot series out of the figures' top level: keys starting with _ go under "series"."""
    if isinstance(value, dict):
        return {k: _strip_private(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_private(v) for v in value]
    return value


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parser(scenario: str, doc: str, instances_help: str) -> argparse.ArgumentParser:
    """The options every engine scenario takes; the scenario adds its own."""
    p = argparse.ArgumentParser(prog=f"loadtests/run.py {scenario}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(scenario=scenario)
    p.add_argument("--instances", type=int, default=None, help=instances_help)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--dsn", default=None, help="server to use (default: PGFLOW_DSN, else the embedded one)")
    p.add_argument("--out", default=str(h.RESULTS), help="directory for the JSON and PNG (default loadtests/results)")
    p.add_argument("--batch-size", type=int, default=None, help="messages a worker reads at once (engine default)")
    p.add_argument("--chain-length", type=int, default=3, help="steps per chain instance (default 3)")
    p.add_argument("--start-many", action="store_true",
                   help="start instances with pgflow.start_many (one statement per 500) instead of pgflow.start")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


Measure = Callable[[Run], tuple[dict[str, Any], list[dict[str, Any]]]]


def main(args: argparse.Namespace, measure: Measure) -> int:
    """Run one scenario against a fresh database of its own; write its figures (JSON) and plot (PNG)."""
    run = Run(args)
    env_dsn = h.database_dsn(run.admin_dsn, "postgres") if args.dsn is None else run.admin_dsn
    environment = h.environment(env_dsn, {k: v for k, v in vars(args).items() if k != "dsn"})
    h.log(f"{args.scenario}: PostgreSQL {environment['postgres']['server_version']}, {environment['cpus']} CPUs, "
          f"load average {', '.join(f'{x:.1f}' for x in environment['load_average'])}")
    figures, panels = measure(run)
    environment["load_average_after"] = os.getloadavg()
    series = {}

    def lift(d: dict[str, Any], prefix: str = "") -> None:
        for k in list(d):
            if k.startswith("_"):
                series[prefix + k[1:]] = d.pop(k)
            elif isinstance(d[k], dict):
                lift(d[k], f"{prefix}{k}.")
            elif isinstance(d[k], list):
                for i, item in enumerate(d[k]):
                    if isinstance(item, dict):
                        lift(item, f"{prefix}{k}[{i}].")

    lift(figures)
    payload = {"scenario": args.scenario, "environment": environment, "figures": _strip_private(figures),
               "series": series}
    path = run.base.with_suffix(".json")
    path.write_text(json.dumps(payload, indent=2, default=str))
    title = (f"pgflow {args.scenario} - {run.stamp} - {environment['cpus']} CPUs, load avg "
             f"{environment['load_average'][0]:.1f}, PostgreSQL {environment['postgres']['server_version']}")
    png = h.plot(run.base.with_suffix(".png"), title, panels)
    h.log(f"written: {_rel(path)}" + (f", {_rel(png)}" if png else ""))
    return 0
