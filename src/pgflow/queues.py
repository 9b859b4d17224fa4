"""The pgmq queues pgflow uses: creating them, listing them, and the NOTIFY channel of each."""

from __future__ import annotations

import psycopg

from .db.queries import Queries

Q = Queries("queues")


def ensure_queue(conn: psycopg.Connection, queue: str) -> None:
    """Create a pgflow queue unless it exists (idempotent; safe when replicas start at once)."""
    Q.execute(conn, "ensure_queue", {"queue": queue})


def queue_names(conn: psycopg.Connection) -> list[str]:
    """Every queue pgflow created."""
    return [r[0] for r in Q.all(conn, "list_queues")]


def channel(queue: str) -> str:
    """The NOTIFY channel on which the coordinator announces new messages in ``queue``."""
    return f"pgflow_queue_{queue}"
