"""The stored shape of a flow version: what the coordinator and workers read from the database to run an
instance, without importing any user code (a DAG's steps, or a control-flow workflow's tree and leaves)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import psycopg

from .db.queries import Queries

Q = Queries("shape")


@dataclass(frozen=True)
class StepShape:
    """A step as the coordinator and workers see it: read from the database, no user code needed."""

    name: str
    kind: str
    deps: tuple[str, ...]
    over: str | None
    flatten: bool
    queue: str
    max_attempts: int
    backoff_base: float
    backoff_cap: float
    timeout: float | None
    sql: str | None
    spec: dict[str, Any] | None = None  # a control-flow leaf's node (python function, http request...)
    batch_size: int | None = None  # a batched map (pgflow.flow.Step.batch_size)
    split_on_failure: bool = False
    priority: int = 0
    limit: dict[str, Any] | None = None  # {"name", ...definition} of the limit its tasks consume
    limit_key: str | None = None
    cost: float | str | None = None  # a number, or "function" (the step's code computes it)

    @property
    def is_map(self) -> bool:
        return self.over is not None


@dataclass(frozen=True)
class FlowShape:
    """A flow version's DAG, parsed from its stored shape."""

    name: str
    version: str
    ref: str | None
    steps: dict[str, StepShape]
    tree: dict[str, Any] | None = None  # set for control-flow workflows (see tree.py)

    @classmethod
    def from_json(cls, name: str, version: str, ref: str | None, shape: dict[str, Any]) -> FlowShape:
        steps = {}
        for s in shape["steps"]:
            steps[s["name"]] = StepShape(
                name=s["name"], kind=s["kind"], deps=tuple(s["deps"]), over=s.get("over"),
                flatten=bool(s.get("flatten")), queue=s["queue"], max_attempts=s["max_attempts"],
                backoff_base=s["backoff_base"], backoff_cap=s["backoff_cap"], timeout=s.get("timeout"),
                sql=s.get("sql"), spec=s.get("spec"), batch_size=s.get("batch_size"),
                split_on_failure=bool(s.get("split_on_failure")), priority=s.get("priority") or 0,
                limit=s.get("limit"), limit_key=s.get("limit_key"), cost=s.get("cost"),
            )
        return cls(name, version, ref, steps, shape.get("tree"))

    @cached_property
    def terminal(self) -> tuple[str, ...]:
        """Steps nothing depends on: their outputs form the instance's result."""
        needed = {d for s in self.steps.values() for d in s.deps}
        return tuple(n for n in self.steps if n not in needed)


class ShapeCache:
    """Flow versions are immutable, so their parsed shapes are cached for the life of the process."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[str, str], FlowShape] = {}

    def get(self, conn: psycopg.Connection, flow: str, version: str) -> FlowShape:
        """The shape of ``flow`` at ``version``; LookupError when it is not registered."""
        key = (flow, version)
        if key not in self._shapes:
            row = Q.one(conn, "flow_shape", {"name": flow, "version": version})
            if row is None:
                raise LookupError(f"flow {flow!r} version {version} is not registered")
            self._shapes[key] = FlowShape.from_json(flow, version, row[0], row[1])
        return self._shapes[key]
