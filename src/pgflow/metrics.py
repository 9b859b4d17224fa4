"""Prometheus metrics and the /metrics, /healthz, /readyz endpoint of every pgflow process.

Worker children run in separate processes, so the worker uses prometheus-client's multiprocess mode: each
process writes its samples under ``PROMETHEUS_MULTIPROC_DIR`` and the parent's endpoint aggregates them.
That directory must be chosen before prometheus_client is imported, hence the lazy imports here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

log = logging.getLogger("pgflow.metrics")

STEP_LABELS = ("flow", "step", "queue")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

#: What KEDA's postgresql trigger runs to read a queue's depth (visible messages); {queue} is substituted.
KEDA_DEPTH_QUERY_TEMPLATE = "SELECT count(*) FROM pgmq.q_{queue} WHERE vt <= now()"


def enable_multiprocess() -> str:
    """Point prometheus-client at a fresh per-run directory (before it is imported) and return it."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="pgflow-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


@cache
def metrics() -> SimpleNamespace:
    """The metric objects, created on first use (after the multiprocess directory is decided)."""
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        started=Counter("pgflow_steps_started_total", "Step tasks started", STEP_LABELS),
        completed=Counter("pgflow_steps_completed_total", "Step tasks completed", STEP_LABELS),
        failed=Counter("pgflow_steps_failed_total", "Step tasks failed for good", STEP_LABELS),
        retried=Counter("pgflow_steps_retried_total", "Step task attempts that failed and will retry",
                        STEP_LABELS),
        step_duration=Histogram("pgflow_step_duration_seconds", "Step task run time", STEP_LABELS,
                                buckets=DURATION_BUCKETS),
        instance_duration=Histogram("pgflow_instance_duration_seconds", "Instance start to completion",
                                    ("flow",), buckets=DURATION_BUCKETS),
        in_flight=Gauge("pgflow_steps_in_flight", "Step tasks being executed", ("queue",),
                        multiprocess_mode="livesum"),
        workers_alive=Gauge("pgflow_worker_processes_alive", "Worker processes alive", ("queue",),
                            multiprocess_mode="livemax"),
        instances=Gauge("pgflow_instances", "Instances by status", ("flow", "status"),
                        multiprocess_mode="livemax"),
        queue_depth=Gauge("pgflow_queue_depth", "Messages in the queue", ("queue",),
                          multiprocess_mode="livemax"),
        queue_oldest=Gauge("pgflow_queue_oldest_message_age_seconds", "Age of the oldest message",
                           ("queue",), multiprocess_mode="livemax"),
        queue_total=Gauge("pgflow_queue_messages_total", "Messages ever sent to the queue", ("queue",),
                          multiprocess_mode="livemax"),
    )


class Health:
    """Liveness: the main loop calls :meth:`beat`; it is stuck when it has not for ``stuck_after`` s."""

    def __init__(self, stuck_after: float = 120.0) -> None:
        self.stuck_after = stuck_after
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_beat < self.stuck_after


def serve(port: int, health: Health, ready: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer | None:
    """Serve /metrics, /healthz and /readyz in a daemon thread on ``PGFLOW_METRICS_HOST`` (default
    127.0.0.1; the Kubernetes manifests set 0.0.0.0 so probes and Prometheus reach it); port 0 disables it."""
    if not port:
        return None
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client import REGISTRY as DEFAULT_REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = DEFAULT_REGISTRY

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = health.alive()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"main loop stuck\n")
            elif self.path == "/readyz":
                ok, why = ready()
                self._reply(200 if ok else 503, (why + "\n").encode())
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep scrapes out of the logs
            pass

    host = os.environ.get("PGFLOW_METRICS_HOST", "127.0.0.1")
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="pgflow-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


def readiness(dsn: str) -> Callable[[], tuple[bool, str]]:
    """A /readyz check: the database answers and its pgflow schema is the version this code needs."""
    from . import store

    def check() -> tuple[bool, str]:
        try:
            with store.connect(dsn, autocommit=True) as conn:
                store.require_schema(conn)
        except Exception as exc:  # any failure means "not ready", with the reason
            return False, f"not ready: {exc}"
        return True, "ready"

    return check
