"""The worker supervisor: ``pgflow worker --concurrency N`` runs N worker processes (``multiprocess``,
forked), restarts any that dies and, on SIGTERM, lets them drain: stop taking work, finish the step in hand,
give back claimed tasks not yet started, exit 0. It serves /metrics, /healthz and /readyz for them all."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Any

from ..health import Health, readiness
from ..hooks import start_worker_process
from ..metrics import ALL_QUEUES, enable_multiprocess, metrics, multiprocess_active, serve
from .worker import Worker

log = logging.getLogger("pgflow.worker")


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the supervisor dies (even by kill -9), so it drains."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_main(dsn: str, queues: list[str] | None, options: dict[str, Any], inherited: tuple = (),
                supervisor: int | None = None, init: tuple = (), compute_threads: int = 1) -> None:
    """A worker child (forked): close what it inherited but must not hold (the supervisor's metrics socket,
    so a child draining after its supervisor died never keeps the port), then work until SIGTERM.

    ``supervisor`` is the pid of the process that forked it, passed by the parent: if the child's parent
    is no longer that process, the supervisor died before the child asked to be told, and the child
    quits. (Comparing with pid 1 would be wrong: in a container the supervisor *is* pid 1.)"""
    # our own handlers first: until now the supervisor's (inherited) would swallow the SIGTERM that announces
    # its death; then ask for that signal, and check the supervisor did not die before we asked
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _die_with_parent()
    if os.getppid() != (supervisor or os.getppid()):
        return
    for resource in inherited:
        with contextlib.suppress(OSError):
            resource.close()
    start_worker_process(init, compute_threads)  # before it takes work: model loads, one compute thread
    worker = Worker(dsn, queues, **options)
    worker.stop_event = stop
    log.info("worker process %d working", os.getpid())
    worker.run()
    log.info("worker process %d exiting", os.getpid())


def run_workers(dsn: str, *, queues: list[str] | None = None, concurrency: int = 2, drain_timeout: float = 45.0,
                metrics_port: int = 0, stop_event: threading.Event | None = None, init: tuple = (),
                compute_threads: int = 1, **options: Any) -> int:
    """Supervise ``concurrency`` worker processes until SIGTERM/SIGINT (or ``stop_event``); restart any
    that dies; on stop, let them drain for up to ``drain_timeout`` seconds. Returns the exit code (0).
    Each process first runs the ``init`` functions and sets ``compute_threads`` (:mod:`pgflow.hooks`).

    With ``metrics_port`` the supervisor serves /metrics (the children's samples, aggregated through
    prometheus-client's multiprocess mode: call :func:`pgflow.metrics.enable_multiprocess` before
    prometheus_client is imported; done here if it has not been), /healthz and /readyz."""
    import multiprocess

    if metrics_port and not multiprocess_active():
        try:
            enable_multiprocess()
        except RuntimeError as exc:
            log.warning("/metrics will not include the worker processes' samples: %s", exc)
    context = multiprocess.get_context("fork")
    stop = stop_event or threading.Event()
    received: list[str] = []  # the signal that stopped us, for the drain's log line

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info("worker supervisor %d starting %d worker processes for %s", os.getpid(), concurrency,
             "queues " + ", ".join(queues) if queues else "every queue")
    health = Health()
    server = serve(metrics_port, health, readiness(dsn))
    inherited = (server.socket,) if server else ()
    # a series per queue served, or one labelled "*" when it serves every queue (counted once, not per queue)
    queue_labels = list(queues) if queues else [ALL_QUEUES]
    alive_gauges = [metrics().workers_alive.labels(name) for name in queue_labels]
    restart_counters = [metrics().restarts.labels(name) for name in queue_labels]

    def spawn(index: int):
        process = context.Process(target=_child_main, args=(dsn, queues, options, inherited, os.getpid(),
                                                            tuple(init), compute_threads),
                                  name=f"pgflow-worker-{index}")
        process.start()
        log.info("started worker process %d (slot %d)", process.pid, index)
        return process

    children = [spawn(i) for i in range(concurrency)]
    started = [time.monotonic()] * concurrency
    while not stop.is_set():
        health.beat()
        for i, child in enumerate(children):
            if not child.is_alive():
                log.warning("worker process %s exited with %s; restarting", child.pid, child.exitcode)
                _mark_dead(child.pid)
                for counter in restart_counters:
                    counter.inc()
                health.restarted()
                if time.monotonic() - started[i] < 1.0:
                    time.sleep(1.0)  # do not spin on a child that dies at start-up
                children[i], started[i] = spawn(i), time.monotonic()
        alive = sum(c.is_alive() for c in children)
        for gauge in alive_gauges:
            gauge.set(alive)
        stop.wait(0.5)
    log.info("%s: draining %d worker processes (up to %s s)", received[0] if received else "stop requested",
             sum(c.is_alive() for c in children), drain_timeout)
    drain_started = time.monotonic()
    for child in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.error("worker process %s did not drain in %s s; killing it", child.pid, drain_timeout)
            child.kill()
            child.join()
        _mark_dead(child.pid)
        health.beat()
    log.info("worker processes drained in %.1f s", time.monotonic() - drain_started)
    if server is not None:
        server.shutdown()
        server.server_close()
    exit_code = 0
    log.info("worker supervisor %d exiting with code %d", os.getpid(), exit_code)
    return exit_code


def _mark_dead(pid: int | None) -> None:
    """Forget a dead child's live gauges (in flight): multiprocess mode would keep exporting them."""
    if pid and multiprocess_active():
        from prometheus_client import multiprocess as prom_mp

        prom_mp.mark_process_dead(pid)
