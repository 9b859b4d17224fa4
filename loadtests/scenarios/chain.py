"""K instances of a 3-step chain of no-op Python steps, W worker processes + 1 coordinator: steps/s
end to end, instance latency, the raw commit rate (1 and 16 clients) and the ratio; then scheduling latency
at low load (sequential instances: a step's finished_at -> its successor's started_at). --compare dbos runs
the same work on DBOS; --profile records py-spy profiles of the coordinator and workers; --trace-sql counts
the engine's statements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import bench_flows
import harness as h
import psycopg
from harness import bench
from harness.bench import TARGETS, Run, check, show
from harness.chain import register, run_chain_load, scheduling_latency, xact_commits


def compare_dbos(run: Run, workflows: int, deadline: float) -> dict[str, Any]:
    """The same shape of work on DBOS (its own database on the same server), in a subprocess with a hard
    time limit; the database is dropped afterwards."""
    name = "pgflow_bench_dbos"
    h.fresh_database(run.admin_dsn, name, pgflow_schema=False)
    dsn = h.database_uri(run.admin_dsn, name)
    script = Path(__file__).resolve().parent / "dbos_compare.py"  # run as a script: DBOS in its own process
    try:
        proc = subprocess.run([sys.executable, str(script), "--dsn", dsn, "--workflows", str(workflows),
                               "--deadline", str(deadline)], capture_output=True, text=True,
                              timeout=deadline + 90)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": f"dbos_compare.py exited {proc.returncode}: {proc.stderr.strip()[-800:]}"}
        return json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        return {"error": f"DBOS run killed after {deadline + 90:.0f} s"}
    finally:
        h.drop_database(run.admin_dsn, name)


def measure(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    instances = a.instances or 20_000
    flow = bench_flows.chain(a.chain_length)
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    h.log(f"chain: {instances:,} instances x {a.chain_length} no-op steps, {a.workers} worker processes")
    baseline = h.commit_baseline(dsn)
    register(dsn, flow)
    trace_dir = run.artifacts("sqltrace") if a.trace_sql else None
    engine = h.Engine(dsn, workers=a.workers, queues=["bench"], batch_size=a.batch_size, trace_dir=trace_dir)
    try:
        if not a.prestart:
            engine.start()
        figures = run_chain_load(run, dsn, engine, flow, instances, profile=a.profile, prestart=a.prestart)
        if figures["timed_out"]:
            raise TimeoutError(figures["timed_out"])
        h.log(f"scheduling latency: {a.sequential} sequential instances at low load")
        with run.progress(total=a.sequential, unit="instance", desc="sequential") as bar:
            sched = scheduling_latency(dsn, flow, a.sequential, progress=bar)
    finally:
        engine.stop()
    # the engine's backends have exited, so their statistics are flushed: transactions per completed step
    # over both phases (the monitor's and the client's few transactions are included)
    commits = xact_commits(dsn) - figures.pop("xact_commits_before")
    with psycopg.connect(dsn, autocommit=True) as conn:
        all_steps = conn.execute("SELECT count(*) FROM pgflow.steps WHERE status = 'completed'").fetchone()[0]
    figures["server_commits_per_step"] = commits / all_steps if all_steps else None
    figures.update(baseline)
    figures["ratio_steps_to_commits_1_client"] = figures["steps_per_second"] / baseline["commits_per_second_1_client"]
    figures["ratio_steps_to_commits_16_clients"] = (figures["steps_per_second"]
                                                    / baseline["commits_per_second_16_clients"])
    figures["scheduling"] = sched
    if trace_dir:
        figures["sql_trace"] = h.read_sql_traces(trace_dir)
    if a.compare == "dbos":
        h.log(f"DBOS: {a.dbos_workflows:,} workflows x 3 no-op steps on a DBOS Queue "
              f"(deadline {a.dbos_deadline:.0f} s)")
        dbos = compare_dbos(run, a.dbos_workflows, a.dbos_deadline)
        figures["dbos"] = dbos
        if "steps_per_second" in dbos and dbos["steps_per_second"]:
            figures["ratio_to_dbos"] = figures["steps_per_second"] / dbos["steps_per_second"]

    h.log("results")
    if a.prestart:
        h.log(f"  (instances pre-started in {figures['start_phase_seconds']:.2f} s before the engine: the figure "
              "below runs from the coordinator's first transaction)")
    show("steps/s (end to end)", f"{figures['steps_per_second']:,.0f}  ({figures['steps']:,} steps in "
         f"{figures['seconds']:.2f} s, {figures['failed']} failed)",
         check(figures["steps_per_second"], TARGETS["chain_steps_per_second"]) + " (target >= 5,000)")
    show("start phase", f"{figures['start_phase_seconds']:.2f} s ({figures['starts_per_second']:,.0f} starts/s)")
    show("instance latency under load", f"p50 {figures['latency_p50_ms']:,.0f} ms  p99 "
         f"{figures['latency_p99_ms']:,.0f} ms")
    show("raw commits/s (1 / 16 clients)", f"{baseline['commits_per_second_1_client']:,.0f} / "
         f"{baseline['commits_per_second_16_clients']:,.0f}")
    show("steps per raw commit (1 / 16 cl.)", f"{figures['ratio_steps_to_commits_1_client']:.2f} / "
         f"{figures['ratio_steps_to_commits_16_clients']:.2f}")
    if figures["server_commits_per_step"] is not None:
        show("server transactions per step", f"{figures['server_commits_per_step']:.2f}")
    show("scheduling latency (low load)", f"p50 {sched['handoff_p50_ms']:.1f} ms  p99 {sched['handoff_p99_ms']:.1f} ms",
         f"p50 {check(sched['handoff_p50_ms'], 5, below=True)} (< 5), "
         f"p99 {check(sched['handoff_p99_ms'], 25, below=True)} (< 25)")
    show("  finished -> coordinator txn", f"p50 {sched['handoff_to_enqueue_p50_ms']:.1f} ms  "
         f"p99 {sched['handoff_to_enqueue_p99_ms']:.1f} ms")
    show("  coordinator txn -> started", f"p50 {sched['enqueue_to_start_p50_ms']:.1f} ms  "
         f"p99 {sched['enqueue_to_start_p99_ms']:.1f} ms")
    show("start -> first step started", f"p50 {sched['start_to_first_step_p50_ms']:.1f} ms  "
         f"p99 {sched['start_to_first_step_p99_ms']:.1f} ms")
    show("worker RSS max / CPU s", f"{figures['rss_max_mb'].get('workers', 0):.0f} MB / "
         + ", ".join(f"{k} {v:.1f}" for k, v in figures["cpu_seconds"].items()))
    if "dbos" in figures:
        d = figures["dbos"]
        if "error" in d:
            show("DBOS", d["error"][:200])
        else:
            show(f"DBOS {d['version']} steps/s", f"{d['steps_per_second']:,.0f} ({d['completed']:,}/{d['workflows']:,} "
                 f"workflows in {d['seconds']:.1f} s{', TIMED OUT' if d['timed_out'] else ''})")
            show("pgflow / DBOS", f"{figures['ratio_to_dbos']:.1f}x",
                 check(figures["ratio_to_dbos"], TARGETS["dbos_ratio"]) + " (target >= 15x)")
    if "profile" in figures:
        print_profile(figures["profile"])
    if "sql_trace" in figures:
        print_sql_trace(figures["sql_trace"], figures["steps"])

    lat_panel = {"kind": "bar", "title": "instance latency under load (ms)",
                 "series": {k: figures[f"latency_{k}_ms"] for k in ("p50", "p90", "p99")}}
    sched_panel = {"kind": "bar", "title": f"scheduling latency, low load (ms, {sched['samples']} hand-offs)",
                   "series": {k: sched[f"handoff_{k}_ms"] for k in ("p50", "p90", "p99")}, "fmt": "{:.1f}",
                   "hlines": {"p50 target 5 ms": 5, "p99 target 25 ms": 25}}
    bars = {"pgflow steps/s": figures["steps_per_second"],
            "commits/s 1 client": baseline["commits_per_second_1_client"],
            "commits/s 16 clients": baseline["commits_per_second_16_clients"]}
    if figures.get("dbos", {}).get("steps_per_second"):
        bars["DBOS steps/s"] = figures["dbos"]["steps_per_second"]
    panels = [
        {"kind": "line", "title": "throughput over time", "xlabel": "s since first start", "ylabel": "steps/s",
         "series": {"completed steps (finished_at, 0.25 s bins)": figures["_series_steps_per_second"],
                    "live sample (finished instances x steps)": figures["_series_live_steps_per_second"]},
         "hlines": {"target 5,000": 5000}},
        lat_panel, sched_panel,
        {"kind": "bar", "title": "pgflow vs baselines (same run)", "series": bars, "rotation": 20},
    ]
    return figures, panels


def print_profile(profile: dict[str, Any]) -> None:
    server = profile.get("server")
    for role, summary in profile.items():
        if role == "server":
            continue
        if "error" in summary:
            h.log(f"  profile {role}: {summary['error']}")
            continue
        h.log(f"  profile of the {role} ({summary['samples']:,} samples, % of wall time):")
        for name, pct in summary["categories_pct"].items():
            h.log(f"      {pct:5.1f}%  {name}")
        h.log("    top self time:")
        for name, pct in summary["top_self_pct"][:8]:
            h.log(f"      {pct:5.1f}%  {name}")
        h.log("    waiting for PostgreSQL, by pgflow caller:")
        for name, pct in summary["db_wait_by_caller_pct"][:6]:
            h.log(f"      {pct:5.1f}%  {name}")
    if server:
        h.log(f"  server backends of the engine, sampled every {1000 * server['interval']:.0f} ms "
              f"({server['samples']:,} samples; busy backends on average):")
        for wait, busy in list(server["by_wait"].items())[:8]:
            h.log(f"      {busy:6.3f}  {wait}")
        h.log("    by statement:")
        for query, wait, busy in server["by_statement_and_wait"][:12]:
            h.log(f"      {busy:6.3f}  {wait:<28} {query}")


def print_sql_trace(trace: dict[str, Any], steps: int) -> None:
    for role, data in trace.items():
        h.log(f"  SQL trace of the {role} ({data['processes']} process(es); per completed step):")
        ranked = sorted(data["queries"].items(), key=lambda kv: -kv[1]["seconds"])
        for name, q in ranked[:12]:
            h.log(f"      {q['calls'] / steps:7.3f} calls  {1e6 * q['seconds'] / steps:8.1f} us  "
                  f"({1e3 * q['seconds'] / max(1, q['calls']):.2f} ms/call)  {name}")


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("chain", __doc__, "instances (20000)")
    g = p.add_argument_group("chain")
    g.add_argument("--compare", choices=["dbos"], default=None, help="run the same work on DBOS too")
    g.add_argument("--sequential", type=int, default=200, help="instances for the scheduling latency (200)")
    g.add_argument("--profile", action="store_true", help="py-spy profiles of the coordinator and workers")
    g.add_argument("--prestart", action="store_true",
                   help="start every instance before the engine: the engine's own throughput, without the starts")
    g.add_argument("--trace-sql", action="store_true", help="count and time the engine's statements (perturbs)")
    g.add_argument("--dbos-workflows", type=int, default=2000, help="workflows for --compare dbos (2000)")
    g.add_argument("--dbos-deadline", type=float, default=120.0, help="time limit of the DBOS run (120 s)")
    return bench.main(p.parse_args(argv), measure)
