"""A claimed task: everything a worker knows about one task it is about to run, in one typed object (the
claim's row, from ``pgflow.read_tasks`` or ``pgflow.claim_tasks``, with the element, scope and column types
its message carried)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..context import StepContext, idempotency_key
from ..flow import INPUT, ITEM, VARS
from ..shape import StepShape
from .messages import TaskMessage


@dataclass(slots=True)
class ClaimedTask:
    """A task this worker holds (its step is running with ``attempt``; its message is hidden)."""

    queue: str
    msg_id: int
    instance_id: int
    flow: str
    version: str
    step: str
    task_index: int
    attempt: int
    input: Any
    variables: dict[str, Any] | None
    deps: dict[str, Any] | None  # outputs of the step's dependencies (DAG steps)
    dep_columns: dict[str, Any] | None  # SQL column types of those outputs
    owner: str  # the role that started the instance: SQL steps run with its privileges
    secret_refs: dict[str, str] | None
    trace_context: str | None
    item: Any = None  # a map task's element
    scope: dict[str, Any] | None = None  # a control-flow leaf's input, vars and named results
    columns: dict[str, Any] | None = None  # SQL column types of those named results

    @classmethod
    def from_claim(cls, queue: str, row: dict[str, Any], message: TaskMessage) -> ClaimedTask:
        return cls(queue, row["msg_id"], row["instance_id"], row["flow_name"], row["flow_version"],
                   row["step_name"], row["task_index"], row["attempt"], row["input"], row["variables"], row["deps"],
                   row["dep_columns"], row["owner"], row["secret_refs"], row["trace_context"], message.item,
                   message.scope, message.columns)

    @property
    def is_leaf(self) -> bool:
        """A control-flow leaf (its message brought its scope), not a DAG step."""
        return self.scope is not None

    def values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The values the step can refer to, and the SQL column types of SQL results among them. A
        control-flow leaf brings its scope (input, vars, named results) in its message; a DAG step gets
        the flow input, the user's variables and its dependencies' outputs from the claim."""
        if self.scope is not None:
            return self.scope, self.columns or {}
        scope = {INPUT: self.input, VARS: self.variables or {}, **(self.deps or {})}
        if self.task_index >= 0:
            scope[ITEM] = self.item
        return scope, self.dep_columns or {}

    def context(self, step: StepShape, scope: dict[str, Any]) -> StepContext:
        """The ``ctx`` a Python step receives."""
        batched = bool(step.batch_size) and self.task_index >= 0 and isinstance(self.item, list)
        return StepContext(instance_id=self.instance_id, flow=self.flow, step=step.name, task_index=self.task_index,
                           attempt=self.attempt, max_attempts=step.max_attempts, input=scope.get(INPUT),
                           vars=scope.get(VARS) or {}, secret_refs=self.secret_refs or {},
                           indices=range(self.task_index, self.task_index + len(self.item)) if batched else None)

    def context_values(self) -> tuple[int, str, int, str]:
        """(instance id, step, attempt, idempotency key): what a SQL step sees of its task."""
        return self.instance_id, self.step, self.attempt, idempotency_key(self.instance_id, self.step, self.task_index)

    def log_fields(self) -> tuple[Any, ...]:
        """The engine fields of this task's log lines (pgflow.logs.FIELDS order)."""
        return self.instance_id, self.flow, self.step, self.task_index, self.attempt, self.queue

    def describe(self) -> str:
        return f"step {self.step}[{self.task_index}] of instance {self.instance_id} attempt {self.attempt}"


def task_arrays(tasks: list[ClaimedTask]) -> dict[str, list]:
    """The parallel arrays that name claimed tasks in pgflow.complete_tasks and pgflow.release_tasks."""
    return {"msg_ids": [t.msg_id for t in tasks], "instance_ids": [t.instance_id for t in tasks],
            "steps": [t.step for t in tasks], "tasks": [t.task_index for t in tasks],
            "attempts": [t.attempt for t in tasks]}
