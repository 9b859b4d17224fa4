"""Worker side of batched maps, limits and task-level values: what a batch task must return, how a failing
batch is bisected, a task's cost, parking a task that was told to wait, and the task's own values that SQL
steps see (``$instance_id``, ``$step``, ``$attempt``, ``$idempotency_key``).

A batched map's task holds a slice of the map's elements (its message's ``item`` is the list) and is indexed
by the position of its first element, so halves of a split batch keep their place in the fan-in's order.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import psycopg

from ..db.codec import dumps
from ..db.queries import Queries
from ..errors import NonRetryableError
from ..flow import INPUT, ITEM, TASK_VALUES
from ..limits import limit_key_value, task_cost
from ..shape import StepShape
from .messages import task_message
from .task import ClaimedTask

log = logging.getLogger("pgflow.worker")
Q = Queries("batches")


def is_batch(step: StepShape, task: ClaimedTask) -> bool:
    """A task of a batched map (its element is a list of elements)."""
    return bool(step.batch_size) and task.task_index >= 0 and not task.is_leaf


def check_batch_output(step: StepShape, task: ClaimedTask, output: Any) -> Any:
    """A batch must give one output per element: a list of the same length."""
    if not isinstance(output, list) or len(output) != len(task.item):
        got = f"a list of {len(output)}" if isinstance(output, list) else type(output).__name__
        raise NonRetryableError(f"batched step {step.name} must return a list of {len(task.item)} outputs (one per "
                                f"element, in order), not {got}")
    return output


def check_batch_sql_output(step: StepShape, task: ClaimedTask, output: str) -> None:
    """The same check for a batched SQL map, whose output is the JSON text of its rows."""
    check_batch_output(step, task, orjson.loads(output))


def task_values(task: ClaimedTask, scope: dict[str, Any]) -> dict[str, Any]:
    """The scope of a SQL step plus the task's own values (a control-flow result of the same name wins)."""
    context = task.context_values()
    return {**dict(zip(TASK_VALUES, context, strict=True)), **scope}


def charge(conn: psycopg.Connection, step: StepShape, cost_fn: Any, task: ClaimedTask, scope: dict[str, Any]) -> None:
    """Tell the step's limit what this task really costs (admission reserved an estimate)."""
    if step.limit is None or step.cost is None or (step.limit.get("cost") is None and len(step.limit) > 1):
        return
    element = task.item if task.task_index >= 0 else scope.get(INPUT)
    cost = task_cost(cost_fn if callable(cost_fn) else step.cost, element, is_batch(step, task))
    key = limit_key_value(step.limit_key, {INPUT: scope.get(INPUT),
                                           ITEM: task.item[0] if is_batch(step, task) and task.item else task.item})
    Q.execute(conn, "charge_limit", {"name": step.limit["name"], "key": key, "cost": cost})


def park(conn: psycopg.Connection, task: ClaimedTask, seconds: float) -> None:
    """Put a task back, unspent, for ``seconds``; its limit holds back the others until then."""
    Q.execute(conn, "park_task", {
        "queue": task.queue, "msg_id": task.msg_id, "instance_id": task.instance_id, "step": task.step,
        "task": task.task_index, "attempt": task.attempt, "seconds": seconds})


def split(conn: psycopg.Connection, step: StepShape, task: ClaimedTask) -> bool:
    """Replace a failing batch by its two halves (fresh attempts); False when it holds one element or the
    task is no longer this attempt's."""
    items = task.item
    if len(items) < 2:
        return False
    half = (len(items) + 1) // 2
    parts = [(task.task_index, items[:half]), (task.task_index + half, items[half:])]
    messages = [dumps(task_message(task.flow, task.version, task.instance_id, task.step, index, part))
                for index, part in parts]
    return bool(Q.value(conn, "split_task", {
        "queue": task.queue, "msg_id": task.msg_id, "instance_id": task.instance_id, "step": task.step,
        "task": task.task_index, "attempt": task.attempt, "tasks": [index for index, _ in parts],
        "messages": "[" + ",".join(messages) + "]"}))
