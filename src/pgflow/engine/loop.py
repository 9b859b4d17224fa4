"""The reconnecting loop under the coordinator and each worker process."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from .. import settings
from ..db.connection import close_quietly, connect
from ..db.migrations import require_schema
from ..db.queries import Queries
from ..errors import DatabaseUnavailable

log = logging.getLogger("pgflow.loop")
Q = Queries("loop")


class ConnectedLoop:
    """A long-running loop on two connections (work + LISTEN) that survives database outages: on a lost
    connection it closes both, waits with exponential backoff and reconnects. Subclasses implement
    :meth:`loop` (return when :attr:`stop_event` is set) and may extend :meth:`on_connect`."""

    RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop_event = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None

    def loop(self) -> None:
        raise NotImplementedError

    def on_connect(self) -> None:
        """Called after (re)connecting: set up LISTENs and per-connection state."""

    def waiting_for_database(self) -> None:
        """Called between reconnection attempts (waiting for the database is not being stuck)."""

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish what it has in hand and return."""
        self.stop_event.set()

    def run(self) -> None:
        """Run :meth:`loop` until :meth:`stop`, reconnecting with backoff when the database goes away."""
        backoff = 0.2
        while not self.stop_event.is_set():
            try:
                self._connect()
                backoff = 0.2
                self.loop()
            except self.RETRYABLE as exc:
                log.info("retrying after %s", type(exc).__name__)
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                log.warning("database unavailable (%s); reconnecting in %.1f s", str(exc).strip(), backoff)
                self._close()
                self.waiting_for_database()
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 3.0)
        self._close()

    def _connect(self) -> None:
        if self._conn is not None and not self._conn.closed and self._listen is not None \
                and not self._listen.closed:
            return
        self._close()
        self._conn = connect(self.dsn, autocommit=True)
        require_schema(self._conn)
        # the engine's session settings, and why: queries/loop.sql (engine_session)
        Q.execute(self._conn, "engine_session", {"synchronous_commit": settings.current().synchronous_commit})
        self._listen = connect(self.dsn, autocommit=True)
        self.on_connect()

    def _close(self) -> None:
        close_quietly(self._conn, self._listen)
        self._conn = self._listen = None

    def wait_for_notify(self, timeout: float) -> None:
        """Sleep until a NOTIFY on the listening connection, or ``timeout`` seconds."""
        if timeout > 0:
            for _ in self._listen.notifies(timeout=timeout, stop_after=1):
                pass
