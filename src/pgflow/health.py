"""The probes of every pgflow process: liveness (/healthz: the main loop beats, worker processes are not
crash-looping) and readiness (/readyz: the database answers with a schema this code works with)."""

from __future__ import annotations

import threading
import time

import psycopg

from .db.connection import close_quietly, connect, without_dsn
from .db.migrations import require_schema


class Health:
    """Liveness. The main loop calls :meth:`beat`: it is stuck when it has not for ``stuck_after`` s. A
    supervisor calls :meth:`restarted` for each child it restarts: it is crash-looping when
    ``max_restarts`` happened within ``restart_window`` s (a restart of the pod may cure what restarting the
    child did not, and an operator's alert should see it either way)."""

    def __init__(self, stuck_after: float = 120.0, max_restarts: int = 5, restart_window: float = 60.0) -> None:
        self.stuck_after = stuck_after
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.last_beat = time.monotonic()
        self._restarts: list[float] = []

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def restarted(self) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < self.restart_window] + [now]

    def problem(self) -> str | None:
        """Why the process is not alive, or None."""
        now = time.monotonic()
        if now - self.last_beat >= self.stuck_after:
            return f"main loop stuck for {now - self.last_beat:.0f} s"
        recent = [t for t in self._restarts if now - t < self.restart_window]
        if len(recent) >= self.max_restarts:
            return f"worker processes crash-looping: {len(recent)} restarts in {self.restart_window:.0f} s"
        return None

    def alive(self) -> bool:
        return self.problem() is None


class Readiness:
    """The /readyz check: the database answers and its pgflow schema is one this code works with.

    Probes come every few seconds from every pod: the check keeps one connection and reconnects only when
    it broke, instead of opening one per probe. The reason it gives never includes the DSN (which may hold
    a password)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn = None
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            try:
                try:
                    require_schema(self._connection())
                except psycopg.OperationalError:  # the kept connection was cut (server restart): once more
                    close_quietly(self._conn)
                    self._conn = None
                    require_schema(self._connection())
            except Exception as exc:  # any failure means "not ready", with the reason
                return False, f"not ready: {without_dsn(str(exc), self.dsn)}"
        return True, "ready"

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            close_quietly(self._conn)
            self._conn = connect(self.dsn, autocommit=True, application_name="pgflow readiness",
                                 options="-c statement_timeout=5000")
        return self._conn


def readiness(dsn: str) -> Readiness:
    """The /readyz check for a process using ``dsn``."""
    return Readiness(dsn)
