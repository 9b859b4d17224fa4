"""examples/embeddings with its OpenAI-compatible HTTP embedder, against a local server that enforces a
quota and answers 429 with Retry-After: nothing is lost, no attempt is burnt on a 429, the quota holds."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler

import psycopg
import pytest
from conftest import TESTS, embedded_server, fresh_database, run_sql, serve_http

import pgflow
from pgflow.db.migrations import init_schema

ROOT = TESTS.parent
WORDS = ["durable", "workflow", "queue", "worker", "step", "retry", "vector", "embedding", "chunk", "document",
         "batch", "index"]


class QuotaServer:
    """What the embeddings endpoint saw: accepted requests (time, texts) and 429s. It refuses any request
    over ``quota`` requests in the last ``window`` seconds, and (``refuse_first``) every batch the first
    time it sees it, so the 429 path is always taken."""

    def __init__(self, quota: int, window: float, refuse_first: bool) -> None:
        self.quota, self.window, self.refuse_first = quota, window, refuse_first
        self.accepted: list[tuple[float, list[str]]] = []
        self.refused = 0
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                texts = body["input"]
                digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
                now = time.monotonic()
                with server.lock:
                    recent = sum(1 for t, _ in server.accepted if t > now - server.window)
                    refuse = recent >= server.quota or (server.refuse_first and digest not in server.seen)
                    server.seen.add(digest)
                    if refuse:
                        server.refused += 1
                    else:
                        server.accepted.append((now, texts))
                if refuse:
                    self.send_response(429)
                    self.send_header("Retry-After", "0.3")
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                data = [{"index": i, "embedding": [float(len(t) % 7), float(i), 1.0]} for i, t in enumerate(texts)]
                payload = json.dumps({"data": data}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler



@pytest.fixture(scope="module")
def vector_server(server):
    """A server with pgvector, which the example needs: the test server, else (PostgreSQL 15 here has no
    pgvector package) a second, embedded server, whose wheel ships pgvector."""
    admin_dsn, _ = server
    if run_sql(admin_dsn, "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"):
        yield admin_dsn
        return
    with embedded_server() as handle:
        yield handle.get_uri()


@pytest.fixture
def dsn(vector_server):
    """This module's databases: initialised, on a server with pgvector (engine_factory uses them too)."""
    with fresh_database(vector_server, None) as conninfo:
        init_schema(conninfo)
        yield conninfo


def documents(dsn: str, count: int, batches: int) -> int:
    """Insert generated documents; the number of chunks they make."""
    import random

    from examples.embeddings import pipeline

    with psycopg.connect(dsn, autocommit=True) as conn:
        pipeline.setup(conn)
        chunks = 0
        for doc_id in range(count):
            rng = random.Random(doc_id)
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 150)))
            chunks += len(pipeline.split({"id": doc_id, "body": body}))
            conn.execute("INSERT INTO embeddings_example.documents (id, batch, body) VALUES (%s, %s, %s)",
                         (doc_id, doc_id % batches, body))
    return chunks


def run_example(dsn, engine_factory, url: str, **limit_env: str) -> list[int]:
    env = {"EMBEDDINGS_URL": url, "PGFLOW_HTTP_ALLOW": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), **limit_env}
    os.environ.update(limit_env)  # the flow's limit (its shape) is read from the same variables here
    import importlib

    from examples.embeddings import pipeline

    importlib.reload(pipeline)
    engine = engine_factory(**env)
    engine.coordinator()
    engine.worker("--import", "examples.embeddings.pipeline")
    ids = pgflow.start_many(pipeline.api_flow, [{"batch": b} for b in range(4)], dsn=dsn)
    for iid in ids:
        info = pgflow.wait(iid, timeout=120, dsn=dsn)
        assert info.status == "completed", info.error
    return ids


@pytest.fixture(autouse=True)
def _restore_env():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_api_embedder_loses_nothing_and_burns_no_attempt_on_429(dsn, engine_factory):
    chunks = documents(dsn, 60, 4)
    quota = QuotaServer(quota=4, window=1.0, refuse_first=True)
    with serve_http(quota.handler()) as url:
        ids = run_example(dsn, engine_factory, url, EMBEDDINGS_RPM="600", EMBEDDINGS_TPM="1000000",
                          EMBEDDINGS_PER="60")
    assert quota.refused >= len(quota.accepted)  # every batch was refused once at least
    stored = run_sql(dsn, "SELECT count(*), count(DISTINCT (doc_id, chunk_no)) FROM embeddings_example.chunks")[0]
    assert stored == (chunks, chunks)
    assert sum(len(texts) for _, texts in quota.accepted) == chunks  # each chunk embedded exactly once
    attempts = run_sql(dsn, "SELECT max(attempt) FROM pgflow.steps WHERE instance_id = ANY(%s) "
                            "AND step_name = 'embed'", (ids,))[0][0]
    assert attempts == 1  # refused batches were parked, not retried
    assert run_sql(dsn, "SELECT count(*) FROM embeddings_example.documents WHERE NOT processed")[0][0] == 0


def test_api_embedder_keeps_within_the_declared_quota(dsn, engine_factory):
    chunks = documents(dsn, 300, 4)
    quota = QuotaServer(quota=10**6, window=1.0, refuse_first=False)  # counts, refuses nothing
    with serve_http(quota.handler()) as url:
        run_example(dsn, engine_factory, url, EMBEDDINGS_RPM="4", EMBEDDINGS_TPM="1000000", EMBEDDINGS_PER="1")
    times = [t for t, _ in quota.accepted]
    assert sum(len(texts) for _, texts in quota.accepted) == chunks
    # 4 requests per second, paced: the requests cannot have come faster than that on average (a slow machine
    # only stretches this). How they bunch within a second depends on the time from admission to arrival,
    # which a loaded machine stretches unevenly, so that is measured by loadtests/scenarios/rate_limit.py, not here.
    assert len(times) > 5 and times[-1] - times[0] >= (len(times) - 5) / 4

