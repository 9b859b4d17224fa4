"""pgflow's messages on pgmq queues: what a task message holds and how it is read and put aside.

A message only names the task (flow, version, instance, step, task index) and, for a map task, carries its
element; everything else (inputs, dependency outputs, attempt) is read from the step tables when the task
is claimed, so a message is small and a redelivered one can never carry stale state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .queries import query

log = logging.getLogger("pgflow.queue")


@dataclass(frozen=True)
class Task:
    """A decoded task message."""

    msg_id: int
    flow: str
    version: str
    instance_id: int
    step: str
    task_index: int
    item: Any = None
    scope: dict[str, Any] | None = None  # control-flow leaves: input, vars and named results
    columns: dict[str, Any] | None = None  # SQL column types of named SQL results
    body: Any = None  # the message as read, for the dead-letter record


def task_message(flow: str, version: str, instance_id: int, step: str, task_index: int = -1,
                 item: Any = None) -> dict[str, Any]:
    """The message body for one task (kept short: it is written and read once per step)."""
    body: dict[str, Any] = {"f": flow, "v": version, "i": instance_id, "s": step, "t": task_index}
    if task_index >= 0:
        body["x"] = item
    return body


_BIGINT = 2**63 - 1
_INT = 2**31 - 1


def decode(msg_id: int, body: Any) -> Task | None:
    """A Task, or None when the message is not a well-formed pgflow task (it is dead-lettered, not run):
    ids must be integers within their column types, names strings."""
    if not isinstance(body, dict):
        return None
    flow, version, instance, step, task = (body.get(k) for k in ("f", "v", "i", "s", "t"))
    if not (isinstance(flow, str) and isinstance(version, str) and isinstance(step, str)
            and type(instance) is int and 0 < instance <= _BIGINT and type(task) is int and -1 <= task <= _INT):
        return None
    scope, columns = body.get("c"), body.get("ct")
    if not isinstance(scope, dict | None) or not isinstance(columns, dict | None):
        return None
    return Task(msg_id, flow, version, instance, step, task, body.get("x"), scope, columns, body)


def read(conn: psycopg.Connection, queue: str, visibility_timeout: int, qty: int) -> list[tuple[int, Any]]:
    """Read up to ``qty`` messages, hiding them from other readers for ``visibility_timeout`` seconds."""
    rows = conn.execute(query("read_messages"), {"queue": queue, "vt": visibility_timeout, "qty": qty})
    return [(msg_id, message) for msg_id, _read_ct, message in rows.fetchall()]


def archive(conn: psycopg.Connection, queue: str, msg_ids: list[int]) -> None:
    """Move messages to the queue's archive table (kept for inspection; never silently dropped)."""
    if msg_ids:
        conn.execute(query("archive_messages"), {"queue": queue, "msg_ids": msg_ids})


def dead_letter(conn: psycopg.Connection, queue: str, msg_id: int, body: Any, reason: str) -> None:
    """Archive a message that can never run and record why in pgflow.dead_letters."""
    from .metrics import metrics

    log.error("dead letter %s on %s: %s: %.200r", msg_id, queue, reason, body, extra=_log_fields(queue, msg_id, body))
    with conn.transaction():
        conn.execute(query("insert_dead_letter"), {"queue": queue, "msg_id": msg_id, "message": Jsonb(body),
                                                   "reason": reason})
        archive(conn, queue, [msg_id])
    metrics().dead_lettered.labels(queue).inc()


def _log_fields(queue: str, msg_id: int, body: Any) -> dict[str, Any]:
    """The engine log fields of a message: its queue, and the task it names if it is well-formed."""
    task = decode(msg_id, body)
    if task is None:
        return {"queue": queue}
    return {"queue": queue, "instance_id": task.instance_id, "flow": task.flow, "step": task.step,
            "task_index": task.task_index}


def extend(conn: psycopg.Connection, queue: str, msg_ids: list[int], visibility_timeout: int) -> None:
    """Push back the visibility timeout of messages still being worked on (long-running steps)."""
    if msg_ids:
        conn.execute(query("extend_visibility"), {"queue": queue, "msg_ids": msg_ids, "vt": visibility_timeout})


def ensure_queue(conn: psycopg.Connection, queue: str) -> None:
    """Create a pgflow queue unless it exists (idempotent; safe when replicas start at once)."""
    conn.execute(query("ensure_queue"), {"queue": queue})


def pgflow_queues(conn: psycopg.Connection) -> list[str]:
    """Every queue pgflow created."""
    return [r[0] for r in conn.execute(query("list_queues")).fetchall()]


def channel(queue: str) -> str:
    """The NOTIFY channel on which the coordinator announces new messages in ``queue``."""
    return f"pgflow_queue_{queue}"
