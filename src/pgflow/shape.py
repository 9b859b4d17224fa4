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
        """Parse a stored shape; MalformedShape (one line) when it is not one pgflow can run: a shape is
        registered by users, and a worker must never trip over a field of the wrong type."""
        try:
            return cls._parse(name, version, ref, shape)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedShape(f"flow {name!r} version {version} has a malformed shape: "
                                 f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def _parse(cls, name: str, version: str, ref: str | None, shape: dict[str, Any]) -> FlowShape:
        steps = {}
        for s in shape["steps"]:
            steps[s["name"]] = StepShape(
                name=_typed(s, "name", str), kind=_typed(s, "kind", str), deps=tuple(s["deps"]), over=s.get("over"),
                flatten=bool(s.get("flatten")), queue=_typed(s, "queue", str),
                max_attempts=_typed(s, "max_attempts", int, minimum=1),
                backoff_base=_typed(s, "backoff_base", float), backoff_cap=_typed(s, "backoff_cap", float),
                timeout=_typed(s, "timeout", float, optional=True),
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


class MalformedShape(LookupError):
    """A stored shape that cannot be run (a field missing or of the wrong type): like no shape at all, the
    instance fails with the reason; the engine goes on."""


def _typed(step: dict[str, Any], key: str, kind: type, *, optional: bool = False, minimum: float = 0) -> Any:
    """``step[key]`` if it is a ``kind`` (an int is a float too; a bool is neither), else ValueError."""
    value = step.get(key)
    if value is None and optional:
        return None
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
        raise ValueError(f"step field {key!r} must be a {kind.__name__}, not {value!r:.60}")
    if kind in (int, float) and not value >= minimum:
        raise ValueError(f"step field {key!r} must be >= {minimum}, not {value!r}")
    return value


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
