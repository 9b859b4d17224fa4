"""Prometheus metrics, and the endpoint serving /metrics, /healthz and /readyz in every pgflow process.

Worker children run in separate processes, so ``pgflow worker`` uses prometheus-client's multiprocess mode:
each process writes its samples under ``PROMETHEUS_MULTIPROC_DIR`` and the supervisor's endpoint aggregates
them. That directory must be chosen before prometheus_client is imported (it picks its value class at import),
hence the lazy imports here: :func:`enable_multiprocess` for the worker, :func:`disable_multiprocess` for
single-process commands such as the coordinator.
"""

from __future__ import annotations

import atexit
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import urlsplit

from . import settings
from .health import Health

log = logging.getLogger("pgflow.metrics")

STEP_LABELS = ("flow", "step", "queue")
OTHER_FLOWS = "other"  # the flow label of instances started by users, unless flow labels are opted into


def flow_label(flow: str, owner: str | None, engine_role: str | None) -> str:
    """The ``flow`` label of an instance's metrics: its flow's name when the instance belongs to the role
    the engine runs as (the operator's own), else ``other``: /metrics needs no login, and users' flow names
    are theirs (SECURITY.md). ``PGFLOW_METRICS_FLOW_LABELS=1`` (``--metrics-flow-labels``) names them all."""
    if owner is None or owner == engine_role or settings.current().metrics_flow_labels:
        return flow
    return OTHER_FLOWS
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MINUTE, HOUR, DAY = 60, 3600, 86400
#: Instances sleep, wait for signals and cron fires: their durations reach days and weeks.
INSTANCE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, MINUTE, 5 * MINUTE, 15 * MINUTE, HOUR, 6 * HOUR, DAY,
                    3 * DAY, 7 * DAY, 30 * DAY)
#: Enqueue to start of a task: milliseconds when workers keep up, minutes when a queue backs up.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, MINUTE,
                5 * MINUTE, 15 * MINUTE, HOUR)
#: The queue label of a worker that serves every queue (not a valid queue name, so never ambiguous).
ALL_QUEUES = "*"

#: What KEDA's postgresql trigger runs to read a queue's backlog; {queue} is substituted. The backlog counts
#: messages ready to run and those in flight (so scaling to zero never removes a worker holding a step), and
#: is 0 for a queue that does not exist yet (the query never fails).
KEDA_DEPTH_QUERY_TEMPLATE = "SELECT pgflow.queue_backlog('{queue}')"

_MULTIPROC_VARS = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
_owned_dir: tuple[int, str] | None = None  # (pid, path) of the directory enable_multiprocess made


def multiprocess_active() -> bool:
    """Whether metrics of this process go to multiprocess files (decided when prometheus_client was imported;
    before that, by the environment)."""
    if "prometheus_client" in sys.modules:
        from prometheus_client import values

        return bool(getattr(values.ValueClass, "_multiprocess", False))
    return any(os.environ.get(var) for var in _MULTIPROC_VARS)


def enable_multiprocess() -> str:
    """Give this process and the children it forks a fresh, empty multiprocess directory; return it.

    Call it before prometheus_client is imported. The directory is new on every start, so files of an earlier
    run (or of another process tree) can never be counted: an inherited ``PROMETHEUS_MULTIPROC_DIR`` is only
    used as the parent of the new directory. The directory is removed when this process exits. Calling it
    again in the same process returns the same directory.
    """
    global _owned_dir
    if _owned_dir is not None and _owned_dir[0] == os.getpid() and os.path.isdir(_owned_dir[1]):
        return _owned_dir[1]
    if "prometheus_client" in sys.modules:
        raise RuntimeError("enable_multiprocess() must run before prometheus_client is imported "
                           "(it chooses between single- and multiprocess mode at import time)")
    base = next((os.environ[var] for var in _MULTIPROC_VARS if os.environ.get(var)), None)
    if base:
        os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="pgflow-metrics-", dir=base)
    for var in _MULTIPROC_VARS:
        os.environ.pop(var, None)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    _owned_dir = (os.getpid(), path)
    atexit.register(_remove_dir, os.getpid(), path)
    return path


def _remove_dir(owner: int, path: str) -> None:
    if os.getpid() == owner:  # never from a forked child that happens to run exit handlers
        shutil.rmtree(path, ignore_errors=True)


def disable_multiprocess() -> None:
    """For single-process commands (the coordinator): ignore an inherited ``PROMETHEUS_MULTIPROC_DIR`` so the
    process reports its own values, not the sum over stale files of other processes. Call it before
    prometheus_client is imported."""
    for var in _MULTIPROC_VARS:
        os.environ.pop(var, None)
    if multiprocess_active():
        log.warning("prometheus_client was imported in multiprocess mode before disable_multiprocess(); "
                    "this process's metrics may include other processes' files")


@cache
def metrics() -> SimpleNamespace:
    """The metric objects, created on first use (after the multiprocess directory is decided).

    Multiprocess modes of the gauges (they only matter in multiprocess mode, i.e. in ``pgflow worker``):
    ``in_flight`` is changed by each worker child (the sum over live processes); ``workers_alive`` is set by
    the supervisor alone (children hold 0 for it: the max over live processes); the sampled gauges (instances,
    queue depth/age) hold the latest sample of one truth, so the most recent write wins.
    """
    from prometheus_client import Counter, Gauge, Histogram

    from . import __version__

    build_info = Gauge("pgflow_build_info", "Always 1; the labels say which pgflow and schema this process runs",
                       ("version", "schema_version", "python"), multiprocess_mode="livemax")
    build_info.labels(__version__, str(_schema_version()), platform.python_version()).set(1)
    return SimpleNamespace(
        build_info=build_info,
        started=Counter("pgflow_steps_started_total", "Step tasks started", STEP_LABELS),
        completed=Counter("pgflow_steps_completed_total", "Step tasks completed", STEP_LABELS),
        failed=Counter("pgflow_steps_failed_total", "Step tasks failed for good", STEP_LABELS),
        retried=Counter("pgflow_steps_retried_total", "Step task attempts that failed and will retry",
                        STEP_LABELS),
        step_duration=Histogram("pgflow_step_duration_seconds", "Step task run time", STEP_LABELS,
                                buckets=DURATION_BUCKETS),
        instance_duration=Histogram("pgflow_instance_duration_seconds", "Instance start to completion",
                                    ("flow",), buckets=INSTANCE_BUCKETS),
        instances_finished=Counter("pgflow_instances_finished_total",
                                   "Instances a coordinator completed or failed, by final status", ("flow", "status")),
        queue_wait=Histogram("pgflow_task_queue_wait_seconds",
                             "From a task becoming ready (enqueued, or its retry due) to a worker claiming it",
                             ("queue",), buckets=WAIT_BUCKETS),
        dead_lettered=Counter("pgflow_dead_letters_total", "Messages put in pgflow.dead_letters", ("queue",)),
        dead_letters=Gauge("pgflow_dead_letters_stored", "Messages in pgflow.dead_letters now", ("queue",),
                           multiprocess_mode="livemostrecent"),
        restarts=Counter("pgflow_worker_restarts_total", "Worker processes that died and were restarted",
                         ("queue",)),
        round_duration=Histogram("pgflow_coordinator_round_seconds",
                                 "Duration of one coordinator round (claim wake-ups, evaluate, write)",
                                 buckets=DURATION_BUCKETS),
        wakeups_due=Gauge("pgflow_wakeups_due", "Wake-ups due and not yet taken by a coordinator (backlog)",
                          multiprocess_mode="livemostrecent"),
        wakeup_lag=Gauge("pgflow_wakeup_lag_seconds", "Age of the oldest due wake-up (how far coordinators lag)",
                         multiprocess_mode="livemostrecent"),
        in_flight=Gauge("pgflow_steps_in_flight", "Step tasks being executed", ("queue",),
                        multiprocess_mode="livesum"),
        workers_alive=Gauge("pgflow_worker_processes_alive", "Worker processes alive", ("queue",),
                            multiprocess_mode="livemax"),
        instances=Gauge("pgflow_instances", "Instances by status", ("flow", "status"),
                        multiprocess_mode="livemostrecent"),
        queue_depth=Gauge("pgflow_queue_depth", "Messages in the queue", ("queue",),
                          multiprocess_mode="livemostrecent"),
        queue_oldest=Gauge("pgflow_queue_oldest_message_age_seconds", "Age of the oldest message",
                           ("queue",), multiprocess_mode="livemostrecent"),
        queue_total=SampledCounter("pgflow_queue_messages_total", "Messages ever sent to the queue", ("queue",)),
    )


class SampledCounter:
    """A counter whose value is sampled from elsewhere (pgmq's message count) rather than incremented:
    ``.labels(...).set(value)`` like a gauge, exposed with the counter type so that ``rate()`` and lint
    tools treat it as one. Only the (single-process) coordinator sets it; it lives in the default registry."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        from prometheus_client import REGISTRY

        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = labelnames
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def labels(self, *values: str) -> _Sample:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        return _Sample(self, tuple(str(v) for v in values))

    def describe(self):
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            for labels, value in self._values.items():
                family.add_metric(labels, value)
        return [family]


class _Sample:
    def __init__(self, owner: SampledCounter, labels: tuple[str, ...]) -> None:
        self.owner = owner
        self.key = labels

    def set(self, value: float) -> None:
        with self.owner._lock:
            self.owner._values[self.key] = float(value)


def _schema_version() -> int:
    from .db.migrations import LATEST_VERSION

    return LATEST_VERSION


def registry():
    """What /metrics exports: in multiprocess mode the aggregate of every process's files in
    ``PROMETHEUS_MULTIPROC_DIR``, else this process's default registry."""
    from prometheus_client import REGISTRY as DEFAULT_REGISTRY
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if not multiprocess_active():
        return DEFAULT_REGISTRY
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path or not os.path.isdir(path):
        raise RuntimeError(f"prometheus_client is in multiprocess mode but PROMETHEUS_MULTIPROC_DIR ({path!r}) "
                           "is not a directory")
    multi = CollectorRegistry()
    MultiProcessCollector(multi, path=path)
    return multi


def serve(port: int, health: Health, ready: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer | None:
    """Serve /metrics, /healthz and /readyz in a daemon thread on ``PGFLOW_METRICS_HOST`` (default
    127.0.0.1; the Kubernetes manifests set 0.0.0.0 so probes and Prometheus reach it); port 0 disables it."""
    if not port:
        return None
    from prometheus_client.exposition import choose_encoder

    exported = registry()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = urlsplit(self.path).path
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                try:
                    body = encoder(exported)
                except Exception as exc:  # a scrape must get an answer, not a dropped connection
                    log.exception("collecting metrics failed")
                    self._reply(500, f"collecting metrics failed: {exc}\n".encode())
                    return
                self._reply(200, body, content_type)
            elif path == "/healthz":
                problem = health.problem()
                self._reply(503 if problem else 200, f"{problem or 'ok'}\n".encode())
            elif path == "/readyz":
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

    host = settings.current().metrics_host
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pgflow-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
