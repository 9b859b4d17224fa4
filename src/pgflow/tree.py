"""Authoring control-flow workflows (the pg_durable model): the public ``pgflow.tree`` builders.

Python builders mirror the SQL operators: ``a >> b`` is ``a ~> b`` (sequence), ``a.named("x")`` is
``a |=> 'x'``, ``a & b`` joins, ``a | b`` races, ``if_(c, t, e)`` is ``c ?> t !> e``, ``loop(body)`` is
``@> body``. Plain strings are SQL steps. The tree is validated by the database (``pgflow.tree_shape``),
so both front doors accept and reject exactly the same workflows.

Work happens in leaves (``sql``, ``python``, ``http``); the coordinator walks the rest of the tree
(:mod:`pgflow.engine.tree`).
"""

from __future__ import annotations

from typing import Any

LEAVES = ("sql", "python", "http")


class Node:
    """A workflow node; combine with ``>>`` (sequence), ``&`` (join), ``|`` (race), ``.named()``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Node({self.data!r})"

    def __rshift__(self, other: Any) -> Node:
        return _compose("seq", self, other)

    def __rrshift__(self, other: Any) -> Node:
        return _compose("seq", other, self)

    def __and__(self, other: Any) -> Node:
        return _compose("join", self, other)

    def __rand__(self, other: Any) -> Node:
        return _compose("join", other, self)

    def __or__(self, other: Any) -> Node:
        return _compose("race", self, other)

    def __ror__(self, other: Any) -> Node:
        return _compose("race", other, self)

    def named(self, name: str) -> Node:
        """Name this node's result: later SQL refers to it as ``$name``, ``$name.col``, ``$name.*``."""
        return Node({"t": "name", "name": name, "c": [self.data]})

    def options(self, **options: Any) -> Node:
        """Leaf options: max_attempts, timeout, queue, backoff_base, backoff_cap, retry_on (http)."""
        return Node({**self.data, **options})


def as_node(value: Any) -> Node:
    """A Node, or plain SQL text wrapped as a SQL step."""
    if isinstance(value, Node):
        return value
    if isinstance(value, str):
        return sql(value)
    raise TypeError(f"expected a workflow node or SQL text, got {type(value).__name__}")


def _compose(kind: str, left: Any, right: Any) -> Node:
    """``a >> b >> c`` is one sequence of three, ``a | b | c`` one race; ``a & b & c`` stays ``(a & b) & c``
    (its result nests, ``[[a, b], c]``, as the SQL operator's); ``join(a, b, c)`` is one join of three."""
    left_node, right_node = as_node(left), as_node(right)
    flat = kind != "join" and left_node.data["t"] == kind
    children = left_node.data["c"] if flat else [left_node.data]
    return Node({"t": kind, "c": [*children, right_node.data]})


def sql(statement: str) -> Node:
    """A SQL step: ``$input``, ``$vars.x``, ``$name``, ``$name.col``, ``$name?`` and ``$name.*`` become
    bound parameters (``$name.*`` a typed relation of the named result's rows)."""
    return Node({"t": "sql", "sql": statement})


def task(function: Any) -> Any:
    """Mark a module-level function as callable from workflows (``python(fn)`` / ``pgflow.python('m:f')``).
    Workers refuse unmarked functions, so a workflow cannot call arbitrary library code."""
    function.__pgflow_task__ = True
    return function


def python(function: Any) -> Node:
    """A Python step: a module-level function marked with :func:`task` (or ``"module:function"``) called
    as ``fn(ctx, ...)`` with parameters bound by name to ``input``, ``vars`` and named results."""
    if callable(function):
        qualname = function.__qualname__
        if "<locals>" in qualname or function.__module__ == "__main__":
            raise ValueError(f"{qualname} must be a module-level function of an importable module")
        function = f"{function.__module__}:{qualname}"
    return Node({"t": "python", "fn": function})


def http(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0, retry_on: list[int] | None = None) -> Node:
    """An HTTP call whose output is an envelope: status, ok, headers, body, encoding (text or base64),
    duration_ms (and json when the body is JSON). Retried on network errors and on ``retry_on`` statuses
    (default: 5xx); other responses, 4xx included, complete the step with ``ok`` false."""
    node = {"t": "http", "url": url, "method": method.upper(), "body": body, "headers": headers or {},
            "timeout": timeout}
    if retry_on is not None:
        node["retry_on"] = list(retry_on)
    return Node(node)


def seq(*nodes: Any) -> Node:
    return Node({"t": "seq", "c": [as_node(n).data for n in nodes]})


def join(*nodes: Any) -> Node:
    """Run branches in parallel; completes with the list of their results when all have."""
    return Node({"t": "join", "c": [as_node(n).data for n in nodes]})


def race(*nodes: Any) -> Node:
    """Run branches in parallel; the first to complete wins, the others are cancelled (shown skipped)."""
    return Node({"t": "race", "c": [as_node(n).data for n in nodes]})


def if_(condition: Any, then: Any, else_: Any = None) -> Node:
    """Branch on the truthiness of ``condition``'s result (see :func:`pgflow.engine.tree.truthy`)."""
    children = [as_node(condition).data, as_node(then).data]
    if else_ is not None:
        children.append(as_node(else_).data)
    return Node({"t": "if", "c": children})


def has_rows(name: str) -> Node:
    """A condition: the named result has at least one row."""
    return Node({"t": "has_rows", "name": name})


def loop(body: Any, while_: Any = None) -> Node:
    """Repeat ``body`` forever (until ``brk``), or while ``while_`` is truthy; each iteration is
    checkpointed and the previous iteration's rows are dropped."""
    if while_ is None:
        return Node({"t": "loop", "c": [as_node(body).data]})
    return Node({"t": "loop", "while": True, "c": [as_node(while_).data, as_node(body).data]})


def brk(value: Any = None) -> Node:
    """Leave the innermost loop; the loop's result is ``value``'s result (or null)."""
    return Node({"t": "break", "c": [] if value is None else [as_node(value).data]})


def sleep(seconds: float) -> Node:
    """A durable timer: no worker is held while it waits, and it survives restarts."""
    return Node({"t": "sleep", "seconds": seconds})


def wait_for_schedule(cron: str) -> Node:
    """Wait until the next time the 5-field cron expression fires (UTC)."""
    return Node({"t": "schedule", "cron": cron})


def wait_for_signal(name: str, timeout: float | None = None) -> Node:
    """Wait for ``pgflow.signal(instance, name, data)``; the result is the data, or
    ``{"timed_out": true}`` after ``timeout`` seconds. Signals sent earlier are kept, not lost."""
    return Node({"t": "wait_signal", "name": name, "timeout": timeout})
