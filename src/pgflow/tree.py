"""Control-flow workflows (the pg_durable model): a tree of nodes, built in Python or in SQL, walked by the
coordinator.

Python builders mirror the SQL operators: ``a >> b`` is ``a ~> b`` (sequence), ``a.named("x")`` is
``a |=> 'x'``, ``a & b`` joins, ``a | b`` races, ``if_(c, t, e)`` is ``c ?> t !> e``, ``loop(body)`` is
``@> body``. Plain strings are SQL steps. The tree is validated by the database (``pgflow.tree_shape``),
so both front doors accept and reject exactly the same workflows.

Work happens in leaves (``sql``, ``python``, ``http``), queued to workers like DAG steps, one step row per
node path ("r", "r.0", "r.0.1", ...). The coordinator evaluates the composite nodes and the waits
(sleep, schedule, signal) itself, records each node's status in its row, and keeps loops' history bounded:
each iteration deletes the rows of the previous one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from . import store
from .queue import task_message

LEAVES = ("sql", "python", "http")


# ---------------------------------------------------------------------------------------------- builders

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
    left_node, right_node = as_node(left), as_node(right)
    children = left_node.data["c"] if left_node.data["t"] == kind else [left_node.data]
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
    """Branch on the truthiness of ``condition``'s result (see :func:`truthy`)."""
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


# ---------------------------------------------------------------------------------------------- semantics

def truthy(value: Any) -> bool:
    """The condition rules of ``if`` and ``loop while``: NULL, false, 0, '' and "no rows" are false. A
    SQL result of exactly one row with one column is the truth of that value; other non-empty results are
    true."""
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], dict) and len(value[0]) == 1:
            return truthy(next(iter(value[0].values())))
        return bool(value)
    if isinstance(value, dict):
        return bool(value)
    return bool(value) if value is not None else False


def time_scale() -> float:
    """``PGFLOW_TIME_SCALE`` makes timers run faster (like a test server's time skipping): with 60, a
    one-minute sleep or cron wait takes one second. Default 1."""
    scale = float(os.environ.get("PGFLOW_TIME_SCALE", "1"))
    if scale <= 0:
        raise ValueError("PGFLOW_TIME_SCALE must be > 0")
    return scale


def next_fire(cron: str, after: datetime) -> datetime:
    """The next time a 5-field cron expression fires after ``after`` (UTC)."""
    from croniter import croniter

    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ValueError(f"invalid cron expression {cron!r} (5 fields: minute hour day month weekday)")
    return croniter(cron, after.astimezone(UTC)).get_next(datetime)


@dataclass
class Result:
    """What evaluating a node found: running | waiting | completed | failed | break."""

    status: str
    output: Any = None
    columns: list[list[str]] | None = None  # [[column, SQL type], ...] of a SQL result
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "completed"


RUNNING = Result("running")
WAITING = Result("waiting")
_ROW_STATUS = {"running": "running", "waiting": "running", "completed": "completed", "failed": "failed",
               "break": "completed"}


@dataclass
class Row:
    status: str
    output: Any
    columns: Any
    error: str | None
    due: datetime | None
    finished_at: datetime | None


@dataclass
class TreeRun:
    """One evaluation of one instance's tree, inside the coordinator's transaction."""

    conn: psycopg.Connection
    instance_id: int
    flow: str
    version: str
    input: Any
    variables: Any
    leaves: dict[str, Any]  # path -> StepShape
    now: datetime
    enqueue: Any  # callable(queue, instance_id, step, task_index, message)
    rows: dict[str, Row] = field(default_factory=dict)
    scope: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scope = {"input": self.input, "vars": self.variables or {}}
        for path, status, output, columns, error, due, finished in self.conn.execute(
                "SELECT step_name, status, output, columns, error, next_attempt_at, finished_at FROM pgflow.steps"
                " WHERE instance_id = %s AND task_index = -1", (self.instance_id,)).fetchall():
            self.rows[path] = Row(status, output, columns, error, due, finished)

    # -------------------------------------------------------------------------------------- dispatch

    def evaluate(self, node: dict[str, Any], path: str = "r") -> Result:
        kind = node["t"]
        if kind in LEAVES:
            return self._leaf(node, path)
        handler = getattr(self, "_" + kind)
        result = handler(node, path)
        if kind not in ("sleep", "schedule", "wait_signal", "race"):  # these write their own rows
            self._record(path, result)
        return result

    def _child(self, node: dict[str, Any], path: str, index: int) -> Result:
        return self.evaluate(node["c"][index], f"{path}.{index}")

    # -------------------------------------------------------------------------------------- leaves

    def _leaf(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        if row is None:
            step = self.leaves[path]
            message = task_message(self.flow, self.version, self.instance_id, path)
            message["c"] = self.scope
            message["ct"] = self.columns
            self.enqueue(step.queue, self.instance_id, path, -1, message)
            self.rows[path] = Row("queued", None, None, None, None, None)
            return RUNNING
        if row.status == "completed":
            return Result("completed", row.output, row.columns)
        if row.status == "failed":
            return Result("failed", error=f"step {path} ({_describe(node)}) failed: {row.error}")
        if row.status in ("cancelled", "skipped"):
            return Result("failed", error=f"step {path} was {row.status}")
        return RUNNING

    # -------------------------------------------------------------------------------------- composites

    def _seq(self, node: dict[str, Any], path: str) -> Result:
        result = Result("completed")
        for index in range(len(node["c"])):
            result = self._child(node, path, index)
            if not result.done:
                return result
        return result

    def _name(self, node: dict[str, Any], path: str) -> Result:
        result = self._child(node, path, 0)
        if result.done:
            self.scope[node["name"]] = result.output
            if result.columns:
                self.columns[node["name"]] = result.columns
        return result

    def _join(self, node: dict[str, Any], path: str) -> Result:
        results = [self._child(node, path, i) for i in range(len(node["c"]))]
        for status in ("failed", "break"):
            hit = next((r for r in results if r.status == status), None)
            if hit:
                return hit
        if all(r.done for r in results):
            return Result("completed", [r.output for r in results])
        return RUNNING

    def _race(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        if row is not None and row.status == "completed":
            return Result("completed", row.output["value"])
        results = [self._child(node, path, i) for i in range(len(node["c"]))]
        finished = [i for i, r in enumerate(results) if r.done]
        if finished:
            winner = min(finished, key=lambda i: self._finished_at(f"{path}.{i}"))
            for loser in range(len(results)):
                if loser != winner:
                    self._skip(f"{path}.{loser}")
            value = results[winner].output
            self._write(path, "completed", {"winner": winner, "value": value})
            return Result("completed", value, results[winner].columns)
        if all(r.status == "failed" for r in results):
            result = results[0]
        elif any(r.status == "break" for r in results):
            result = next(r for r in results if r.status == "break")
        else:
            result = RUNNING
        self._record(path, result)
        return result

    def _finished_at(self, path: str) -> datetime:
        """When a (sub)tree completed: the latest finish among its recorded rows."""
        times = [r.finished_at for p, r in self.rows.items() if (p == path or p.startswith(path + "."))
                 and r.finished_at is not None]
        return max(times) if times else self.now

    def _if(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        branch = (row.output or {}).get("branch") if row else None
        if branch is None:
            condition = self._child(node, path, 0)
            if not condition.done:
                return condition
            branch = "then" if truthy(condition.output) else "else"
            self._write(path, "running", {"branch": branch})
            untaken = 2 if branch == "then" else 1
            if untaken < len(node["c"]):
                self._skip(f"{path}.{untaken}")
        index = 1 if branch == "then" else 2
        if index >= len(node["c"]):
            return Result("completed", None)
        return self._child(node, path, index)

    def _has_rows(self, node: dict[str, Any], path: str) -> Result:
        value = self.scope.get(node["name"])
        return Result("completed", bool(value) if isinstance(value, list) else value is not None)

    def _loop(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        state = (row.output if row and isinstance(row.output, dict) else None) or {"iteration": 0}
        body_index = 0
        if node.get("while"):
            body_index = 1
            condition = self._child(node, path, 0)
            if not condition.done:
                return condition
            if not truthy(condition.output):
                return Result("completed", state.get("last"))
        body = self._child(node, path, body_index)
        if body.status == "break":
            return Result("completed", body.output)
        if not body.done:
            return body
        # next iteration: forget this one's rows (bounded history), keep the counter and last value
        self.conn.execute("DELETE FROM pgflow.steps WHERE instance_id = %s AND step_name LIKE %s",
                          (self.instance_id, path + ".%"))
        self.rows = {p: r for p, r in self.rows.items() if not p.startswith(path + ".")}
        self._write(path, "running", {"iteration": state["iteration"] + 1, "last": body.output})
        self._wake(self.now)
        return RUNNING

    def _break(self, node: dict[str, Any], path: str) -> Result:
        if not node["c"]:
            return Result("break", None)
        value = self._child(node, path, 0)
        return Result("break", value.output) if value.done else value

    # -------------------------------------------------------------------------------------- waits

    def _sleep(self, node: dict[str, Any], path: str) -> Result:
        return self._timer(path, lambda: self.now + timedelta(seconds=node["seconds"] / time_scale()),
                           lambda: {"slept": node["seconds"]})

    def _schedule(self, node: dict[str, Any], path: str) -> Result:
        fire = next_fire(node["cron"], self.now)
        return self._timer(path, lambda: self.now + (fire - self.now) / time_scale(),
                           lambda: {"scheduled_for": fire.isoformat(), "fired_at": self.now.isoformat()})

    def _timer(self, path: str, due: Any, output: Any) -> Result:
        row = self.rows.get(path)
        if row is None:
            when = due()
            self._write(path, "waiting", None, due=when)
            self._wake(when)
            return WAITING
        if row.status == "completed":
            return Result("completed", row.output)
        if row.status == "waiting" and row.due is not None and self.now >= row.due:
            value = output()
            self._write(path, "completed", value)
            return Result("completed", value)
        return WAITING

    def _wait_signal(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        if row is not None and row.status == "completed":
            return Result("completed", row.output)
        due = row.due if row is not None else None
        if row is None:
            if node.get("timeout") is not None:
                due = self.now + timedelta(seconds=node["timeout"] / time_scale())
                self._wake(due)
            self._write(path, "waiting", None, due=due)
        got = self.conn.execute(
            "UPDATE pgflow.signals SET consumed_at = now(), consumed_by = %(path)s WHERE id = ("
            " SELECT id FROM pgflow.signals WHERE instance_id = %(id)s AND name = %(name)s AND consumed_at IS NULL"
            " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING data",
            {"path": path, "id": self.instance_id, "name": node["name"]}).fetchone()
        if got is not None:
            self._write(path, "completed", got[0])
            return Result("completed", got[0])
        if due is not None and self.now >= due:
            self._write(path, "completed", {"timed_out": True})
            return Result("completed", {"timed_out": True})
        return WAITING

    # -------------------------------------------------------------------------------------- writes

    def _record(self, path: str, result: Result) -> None:
        """Keep a composite node's row in step with its children (for explain and status)."""
        status = _ROW_STATUS[result.status]
        row = self.rows.get(path)
        if row is None or row.status != status:
            self._write(path, status, row.output if row else None)

    def _write(self, path: str, status: str, output: Any, due: datetime | None = None) -> None:
        finished = self.now if status in ("completed", "failed", "skipped") else None
        self.conn.execute(
            "INSERT INTO pgflow.steps (instance_id, step_name, task_index, status, output, next_attempt_at,"
            " finished_at) VALUES (%s, %s, -1, %s, %s::jsonb, %s, %s)"
            " ON CONFLICT (instance_id, step_name, task_index) DO UPDATE SET status = excluded.status,"
            " output = excluded.output, next_attempt_at = excluded.next_attempt_at,"
            " finished_at = excluded.finished_at",
            (self.instance_id, path, status, store.dumps(output), due, finished))
        self.rows[path] = Row(status, output, None, None, due, finished)

    def _skip(self, path: str) -> None:
        """Cancel a branch that lost a race or that an if did not take: its rows become 'skipped', so a
        running task's acknowledgement no longer lands and a queued message is archived unrun."""
        self.conn.execute(
            "UPDATE pgflow.steps SET status = 'skipped', finished_at = now() WHERE instance_id = %s"
            " AND (step_name = %s OR step_name LIKE %s) AND status NOT IN ('completed', 'failed')",
            (self.instance_id, path, path + ".%"))
        for p, row in self.rows.items():
            if (p == path or p.startswith(path + ".")) and row.status not in ("completed", "failed"):
                row.status = "skipped"
        self._write(path, "skipped", None)

    def _wake(self, when: datetime) -> None:
        self.conn.execute("INSERT INTO pgflow.wakeups (instance_id, due_at) VALUES (%s, %s)",
                          (self.instance_id, when))


def _describe(node: dict[str, Any]) -> str:
    if node["t"] == "sql":
        return "sql: " + " ".join(node["sql"].split())[:60]
    if node["t"] == "python":
        return "python: " + node["fn"]
    return f"http: {node.get('method', 'GET')} {node['url']}"
