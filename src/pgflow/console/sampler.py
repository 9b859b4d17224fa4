"""Queue throughput for the queues page: the console samples ``pgflow.queue_stats()`` every few seconds
and keeps the last minutes in memory. Messages sent (pgmq's id sequence) minus the growth of the queue is
what left it (completed, or archived) between two samples: the rate the workers got through. Figures start
when the console does."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pgflow.console")

SAMPLE_EVERY = 5.0  # seconds
KEEP = 180  # samples per queue (15 minutes)


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    sent: int  # messages ever sent to the queue
    depth: int  # messages in the queue (ready, in flight, delayed)


class Throughput:
    """Samples of every queue, and the rates between them."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[Sample]] = {}
        self._lock = threading.Lock()

    def add(self, rows: list[dict[str, Any]], at: float | None = None) -> None:
        """Record one queue_stats() result."""
        at = time.monotonic() if at is None else at
        with self._lock:
            for r in rows:
                depth = r["ready"] + r["in_flight"] + r["delayed"]
                self._samples.setdefault(r["queue"], deque(maxlen=KEEP)).append(Sample(at, r["total_sent"], depth))

    def rates(self, queue: str) -> list[float]:
        """Messages per second that left ``queue`` between consecutive samples, oldest first."""
        with self._lock:
            samples = list(self._samples.get(queue, ()))
        return [max(0.0, ((b.sent - a.sent) - (b.depth - a.depth)) / (b.at - a.at))
                for a, b in zip(samples, samples[1:], strict=False) if b.at > a.at]

    def per_minute(self, queue: str) -> float | None:
        """Messages that left ``queue`` per minute over the last minute of samples (None before two)."""
        recent = self.rates(queue)[-int(60 / SAMPLE_EVERY):]
        return sum(recent) / len(recent) * 60 if recent else None


class Sampler(threading.Thread):
    """Calls ``read`` (which returns queue_stats rows) every SAMPLE_EVERY seconds until stopped."""

    def __init__(self, read: Callable[[], list[dict[str, Any]]], throughput: Throughput) -> None:
        super().__init__(name="pgflow-console-sampler", daemon=True)
        self.read = read
        self.throughput = throughput
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(Exception):  # the database may be away for a moment: sample again later
                self.throughput.add(self.read())
            self.stopped.wait(SAMPLE_EVERY)

    def stop(self) -> None:
        self.stopped.set()
