"""Task messages on pgmq queues: what one holds, and which bodies are well-formed.

A message only names the task (flow, version, instance, step, task index) and, for a map task, carries its
element; a control-flow leaf also carries its scope (input, variables, named results) and the SQL column
types of named SQL results. Everything else (inputs, dependency outputs, attempt) is read from the step
tables when the task is claimed, so a message is small and a redelivered one can never carry stale state.

The database applies the same rules (``pgflow.is_task_message``, used by ``pgflow.read_tasks``); a property
test checks that both accept exactly the same bodies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_BIGINT = 2**63 - 1
_INT = 2**31 - 1


@dataclass(slots=True)
class TaskMessage:
    """A well-formed task message."""

    flow: str
    version: str
    instance_id: int
    step: str
    task_index: int
    item: Any = None
    scope: dict[str, Any] | None = None  # control-flow leaves: input, vars and named results
    columns: dict[str, Any] | None = None  # SQL column types of named SQL results


def task_message(flow: str, version: str, instance_id: int, step: str, task_index: int = -1, item: Any = None,
                 *, scope: dict[str, Any] | None = None, columns: dict[str, Any] | None = None) -> dict[str, Any]:
    """The message body for one task."""
    body: dict[str, Any] = {"flow": flow, "version": version, "instance": instance_id, "step": step,
                            "task": task_index}
    if task_index >= 0:
        body["item"] = item
    if scope is not None:
        body["scope"] = scope
    if columns is not None:
        body["columns"] = columns
    return body


def decode(body: Any) -> TaskMessage | None:
    """The task a message names, or None when it is not a well-formed pgflow task (it is dead-lettered, not
    run): ids must be integers within their column types, names strings, scope and columns objects."""
    if not isinstance(body, dict):
        return None
    flow, version, instance, step, task = (body.get(k) for k in ("flow", "version", "instance", "step", "task"))
    if not (isinstance(flow, str) and isinstance(version, str) and isinstance(step, str)
            and type(instance) is int and 0 < instance <= _BIGINT and type(task) is int and -1 <= task <= _INT):
        return None
    scope, columns = body.get("scope"), body.get("columns")
    if not isinstance(scope, dict | None) or not isinstance(columns, dict | None):
        return None
    return TaskMessage(flow, version, instance, step, task, body.get("item"), scope, columns)


def log_fields(queue: str, body: Any) -> dict[str, Any]:
    """The engine log fields of a message: its queue, and the task it names if it is well-formed."""
    task = decode(body)
    if task is None:
        return {"queue": queue}
    return {"queue": queue, "instance_id": task.instance_id, "flow": task.flow, "step": task.step,
            "task_index": task.task_index}
