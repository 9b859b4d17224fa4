"""The tree evaluator: how the coordinator advances a control-flow workflow (the pg_durable model).

Work happens in leaves (``sql``, ``python``, ``http``), queued to workers like DAG steps, one step row per
node path ("r", "r.0", "r.0.1", ...). The coordinator evaluates the composite nodes and the waits (sleep,
schedule, signal) itself, records each node's status in its row, and keeps loops' history bounded: each
iteration forgets the rows of the previous one.

Evaluation is a pure function: :func:`evaluate` takes a :class:`TreeState` (the instance's rows and its
unconsumed signals, read beforehand) and returns the result and the :data:`Decision` list to apply, in order
(:func:`apply`), with every read and write at these two edges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .. import settings
from ..db.codec import dumps
from ..db.queries import Queries
from ..shape import StepShape
from ..statuses import StepStatus
from ..tree import LEAVES
from .messages import task_message

Q = Queries("tree")


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


def next_fire(cron: str, after: datetime) -> datetime:
    """The next time a 5-field cron expression fires after ``after`` (UTC)."""
    from croniter import croniter

    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ValueError(f"invalid cron expression {cron!r} (5 fields: minute hour day month weekday)")
    return croniter(cron, after.astimezone(UTC)).get_next(datetime)


#: the least time between the starts of two iterations of a loop (as pg_durable): a loop whose body takes
#: no time (INSERT ~> sleep(0)) polls once a second, not as fast as the database allows
LOOP_MIN_INTERVAL = 1.0


def scaled(seconds: float) -> timedelta:
    """A timer's duration under ``PGFLOW_TIME_SCALE`` (with 60, a one-minute sleep takes one second)."""
    return timedelta(seconds=seconds / settings.current().time_scale)


# ---------------------------------------------------------------------------------------------- state

@dataclass
class Row:
    """A node's step row, as read (and as this evaluation changed it)."""

    status: str
    output: Any = None
    columns: Any = None
    error: str | None = None
    due: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Signal:
    """A signal sent to the instance and not consumed yet."""

    id: int
    name: str
    data: Any


@dataclass
class TreeState:
    """Everything the evaluator reads about one instance."""

    instance_id: int
    flow: str
    version: str
    input: Any
    variables: Any
    leaves: dict[str, StepShape]  # path -> the leaf's stored step
    now: datetime
    rows: dict[str, Row] = field(default_factory=dict)  # path -> row (task_index -1)
    signals: list[Signal] = field(default_factory=list)  # oldest first


# ---------------------------------------------------------------------------------------------- decisions

@dataclass(frozen=True)
class WriteRow:
    """Insert or overwrite a node's row."""

    path: str
    status: str
    output: Any
    due: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class SkipBranch:
    """Mark a branch's unfinished rows skipped (a race's loser, the branch an if did not take): a running
    task's acknowledgement then no longer lands, and a queued message is archived unrun."""

    path: str


@dataclass(frozen=True)
class ForgetIteration:
    """Delete the rows under a loop (its finished iteration)."""

    path: str


@dataclass(frozen=True)
class Wake:
    """Have a coordinator look at the instance again at ``at``."""

    at: datetime


@dataclass(frozen=True)
class ConsumeSignal:
    """A wait received this signal."""

    signal_id: int
    path: str


@dataclass(frozen=True)
class Enqueue:
    """Queue a leaf for the workers."""

    queue: str
    step: str
    message: dict[str, Any]


Decision = WriteRow | SkipBranch | ForgetIteration | Wake | ConsumeSignal | Enqueue


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
_ROW_STATUS = {"running": StepStatus.RUNNING, "waiting": StepStatus.RUNNING, "completed": StepStatus.COMPLETED,
               "failed": StepStatus.FAILED, "break": StepStatus.COMPLETED}
_ENDED = (StepStatus.COMPLETED, StepStatus.FAILED)


@dataclass
class Evaluation:
    """The outcome of one evaluation: the tree's result and the decisions to apply, in order."""

    result: Result
    decisions: list[Decision]


def evaluate(state: TreeState, tree: dict[str, Any]) -> Evaluation:
    """Advance one instance's tree as far as it can go now (no I/O)."""
    evaluator = TreeEvaluator(state)
    result = evaluator.evaluate(tree)
    if result.status == "break":  # no loop caught it: the instance fails (as pg_durable's)
        result = Result("failed", error="break outside a loop: a break ends the innermost loop around it")
    return Evaluation(result, evaluator.decisions)


class TreeEvaluator:
    """One walk of one instance's tree; :data:`HANDLERS` says which method evaluates which node type."""

    def __init__(self, state: TreeState) -> None:
        self.state = state
        self.rows = dict(state.rows)
        self.signals = list(state.signals)
        self.decisions: list[Decision] = []
        self.scope: dict[str, Any] = {"input": state.input, "vars": state.variables or {}}
        self.columns: dict[str, Any] = {}

    @property
    def now(self) -> datetime:
        return self.state.now

    def evaluate(self, node: dict[str, Any], path: str = "r") -> Result:
        kind = node["t"]
        if kind in LEAVES:
            return self.leaf(node, path)
        result = HANDLERS[kind](self, node, path)
        if kind not in RECORDS_ITSELF:
            self.record(path, result)
        return result

    def child(self, node: dict[str, Any], path: str, index: int) -> Result:
        return self.evaluate(node["c"][index], f"{path}.{index}")

    # -------------------------------------------------------------------------------------- leaves

    def leaf(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        if row is None:
            state = self.state
            message = task_message(state.flow, state.version, state.instance_id, path, scope=self.scope,
                                   columns=self.columns)
            self.decisions.append(Enqueue(state.leaves[path].queue, path, message))
            self.rows[path] = Row(StepStatus.QUEUED)
            return RUNNING
        if row.status == StepStatus.COMPLETED:
            return Result("completed", row.output, row.columns)
        if row.status == StepStatus.FAILED:
            return Result("failed", error=f"step {path} ({describe(node)}) failed: {row.error}")
        if row.status in (StepStatus.CANCELLED, StepStatus.SKIPPED):
            return Result("failed", error=f"step {path} was {row.status}")
        return RUNNING

    # -------------------------------------------------------------------------------------- composites

    def seq(self, node: dict[str, Any], path: str) -> Result:
        result = Result("completed")
        for index in range(len(node["c"])):
            result = self.child(node, path, index)
            if not result.done:
                return result
        return result

    def name(self, node: dict[str, Any], path: str) -> Result:
        result = self.child(node, path, 0)
        if result.done:
            self.scope[node["name"]] = result.output
            if result.columns:
                self.columns[node["name"]] = result.columns
        return result

    def join(self, node: dict[str, Any], path: str) -> Result:
        results = [self.child(node, path, i) for i in range(len(node["c"]))]
        for status in ("failed", "break"):
            hit = next((r for r in results if r.status == status), None)
            if hit:
                return hit
        if all(r.done for r in results):
            return Result("completed", [r.output for r in results])
        return RUNNING

    def race(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        if row is not None and row.status == StepStatus.COMPLETED:
            return Result("completed", row.output["value"])
        results = [self.child(node, path, i) for i in range(len(node["c"]))]
        finished = [i for i, r in enumerate(results) if r.done]
        if finished:
            winner = min(finished, key=lambda i: self.finished_at(f"{path}.{i}"))
            for loser in range(len(results)):
                if loser != winner:
                    self.skip(f"{path}.{loser}")
            value = results[winner].output
            self.write(path, StepStatus.COMPLETED, {"winner": winner, "value": value})
            return Result("completed", value, results[winner].columns)
        if all(r.status == "failed" for r in results):
            result = results[0]
        elif any(r.status == "break" for r in results):
            result = next(r for r in results if r.status == "break")
        else:
            result = RUNNING
        self.record(path, result)
        return result

    def finished_at(self, path: str) -> datetime:
        """When a (sub)tree completed: the latest finish among its recorded rows."""
        times = [r.finished_at for p, r in self.rows.items() if (p == path or p.startswith(path + "."))
                 and r.finished_at is not None]
        return max(times) if times else self.now

    def if_(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        branch = (row.output or {}).get("branch") if row else None
        if branch is None:
            condition = self.child(node, path, 0)
            if condition.status == "break":  # a break in the condition ends this loop, like one in the body
                return Result("completed", condition.output)
            if not condition.done:
                return condition
            branch = "then" if truthy(condition.output) else "else"
            self.write(path, StepStatus.RUNNING, {"branch": branch})
            untaken = 2 if branch == "then" else 1
            if untaken < len(node["c"]):
                self.skip(f"{path}.{untaken}")
        index = 1 if branch == "then" else 2
        if index >= len(node["c"]):
            return Result("completed", None)
        return self.child(node, path, index)

    def has_rows(self, node: dict[str, Any], path: str) -> Result:
        value = self.scope.get(node["name"])
        return Result("completed", bool(value) if isinstance(value, list) else value is not None)

    def loop(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        state = (row.output if row and isinstance(row.output, dict) else None) or {"iteration": 0}
        if row is not None and row.status == StepStatus.RUNNING and row.due is not None and self.now < row.due:
            return WAITING  # the next iteration may not begin yet (LOOP_MIN_INTERVAL)
        if row is None:
            state = {"iteration": 0, "began": self.now.isoformat()}
            self.write(path, StepStatus.RUNNING, state)
        body_index = 0
        if node.get("while"):
            body_index = 1
            condition = self.child(node, path, 0)
            if condition.status == "break":  # a break in the condition ends this loop, like one in the body
                return self.end_loop(path, state, condition.output)
            if not condition.done:
                return condition
            if not truthy(condition.output):
                return self.end_loop(path, state, state.get("last"))
        body = self.child(node, path, body_index)
        if body.status == "break":
            return self.end_loop(path, state, body.output)
        if not body.done:
            return body
        # next iteration: forget this one's rows (bounded history), keep the counter and last value
        self.decisions.append(ForgetIteration(path))
        self.rows = {p: r for p, r in self.rows.items() if not p.startswith(path + ".")}
        began = datetime.fromisoformat(state["began"]) if isinstance(state.get("began"), str) else self.now
        at = max(self.now, began + scaled(LOOP_MIN_INTERVAL))
        self.write(path, StepStatus.RUNNING, {"iteration": state["iteration"] + 1, "last": body.output,
                                              "began": at.isoformat()}, due=at)
        self.decisions.append(Wake(at))
        return RUNNING if at <= self.now else WAITING

    def end_loop(self, path: str, state: dict[str, Any], value: Any) -> Result:
        """The loop is over: its row keeps the counter and, as "value", what the loop returned."""
        row = self.rows.get(path)
        if row is None or row.status != StepStatus.COMPLETED:
            self.write(path, StepStatus.COMPLETED, {**state, "value": value})
        return Result("completed", value)

    def brk(self, node: dict[str, Any], path: str) -> Result:
        if "value" in node:  # a literal JSON value (pg_durable's df.break('{"done": true}'))
            return Result("break", node["value"])
        if not node["c"]:
            return Result("break", None)
        value = self.child(node, path, 0)
        return Result("break", value.output) if value.done else value

    # -------------------------------------------------------------------------------------- waits

    def sleep(self, node: dict[str, Any], path: str) -> Result:
        return self.timer(path, lambda: self.now + scaled(node["seconds"]), lambda: {"slept": node["seconds"]})

    def schedule(self, node: dict[str, Any], path: str) -> Result:
        fire = next_fire(node["cron"], self.now)
        return self.timer(path, lambda: self.now + (fire - self.now) / settings.current().time_scale,
                          lambda: {"scheduled_for": fire.isoformat(), "fired_at": self.now.isoformat()})

    def timer(self, path: str, due: Callable[[], datetime], output: Callable[[], Any]) -> Result:
        row = self.rows.get(path)
        if row is None:
            when = due()
            self.write(path, StepStatus.WAITING, None, due=when)
            self.decisions.append(Wake(when))
            return WAITING
        if row.status == StepStatus.COMPLETED:
            return Result("completed", row.output)
        if row.status == StepStatus.WAITING and row.due is not None and self.now >= row.due:
            value = output()
            self.write(path, StepStatus.COMPLETED, value)
            return Result("completed", value)
        return WAITING

    def wait_signal(self, node: dict[str, Any], path: str) -> Result:
        row = self.rows.get(path)
        if row is not None and row.status == StepStatus.COMPLETED:
            return Result("completed", row.output)
        due = row.due if row is not None else None
        if row is None:
            if node.get("timeout") is not None:
                due = self.now + scaled(node["timeout"])
                self.decisions.append(Wake(due))
            self.write(path, StepStatus.WAITING, None, due=due)
        signal = next((s for s in self.signals if s.name == node["name"]), None)
        if signal is not None:
            self.signals.remove(signal)
            self.decisions.append(ConsumeSignal(signal.id, path))
            return self.signalled(node, path, signal.data, False)
        if due is not None and self.now >= due:
            return self.signalled(node, path, None, True)
        return WAITING

    def signalled(self, node: dict[str, Any], path: str, data: Any, timed_out: bool) -> Result:
        """A wait for a signal ends: with the payload, or {"timed_out": true}; a node marked "envelope"
        (pg_durable's shape) gives {signal_name, timed_out, data} either way."""
        if node.get("envelope"):
            value = {"signal_name": node["name"], "timed_out": timed_out, "data": data}
        else:
            value = {"timed_out": True} if timed_out else data
        self.write(path, StepStatus.COMPLETED, value)
        return Result("completed", value)

    # -------------------------------------------------------------------------------------- rows

    def record(self, path: str, result: Result) -> None:
        """Keep a composite node's row in step with its children (for explain and status)."""
        status = _ROW_STATUS[result.status]
        row = self.rows.get(path)
        if row is None or row.status != status:
            self.write(path, status, row.output if row else None)

    def write(self, path: str, status: str, output: Any, due: datetime | None = None) -> None:
        finished = self.now if status in (*_ENDED, StepStatus.SKIPPED) else None
        self.decisions.append(WriteRow(path, status, output, due, finished))
        self.rows[path] = Row(status, output, None, None, due, finished)

    def skip(self, path: str) -> None:
        self.decisions.append(SkipBranch(path))
        for p, row in self.rows.items():
            if (p == path or p.startswith(path + ".")) and row.status not in _ENDED:
                row.status = StepStatus.SKIPPED
        self.write(path, StepStatus.SKIPPED, None)


#: the method that evaluates each composite or wait node type (leaves: :meth:`TreeEvaluator.leaf`)
HANDLERS: dict[str, Callable[[TreeEvaluator, dict[str, Any], str], Result]] = {
    "seq": TreeEvaluator.seq,
    "name": TreeEvaluator.name,
    "join": TreeEvaluator.join,
    "race": TreeEvaluator.race,
    "if": TreeEvaluator.if_,
    "has_rows": TreeEvaluator.has_rows,
    "loop": TreeEvaluator.loop,
    "break": TreeEvaluator.brk,
    "sleep": TreeEvaluator.sleep,
    "schedule": TreeEvaluator.schedule,
    "wait_signal": TreeEvaluator.wait_signal,
}
#: node types that write their own rows (the others' rows follow their result)
RECORDS_ITSELF = frozenset({"sleep", "schedule", "wait_signal", "race"})


def describe(node: dict[str, Any]) -> str:
    """A leaf in a few words, for error messages."""
    if node["t"] == "sql":
        return "sql: " + " ".join(node["sql"].split())[:60]
    if node["t"] == "python":
        return "python: " + node["fn"]
    return f"http: {node.get('method', 'GET')} {node['url']}"


# ---------------------------------------------------------------------------------------------- I/O edges

def now(conn: psycopg.Connection) -> datetime:
    """The time evaluations in this round see (one clock for the whole round)."""
    return Q.value(conn, "now")


def read_states(conn: psycopg.Connection, instance_ids: list[int]
                ) -> tuple[dict[int, dict[str, Row]], dict[int, list[Signal]]]:
    """The node rows and the unconsumed signals of instances (locked by the caller), by instance."""
    rows: dict[int, dict[str, Row]] = {i: {} for i in instance_ids}
    for iid, path, status, output, columns, error, due, finished in Q.all(conn, "tree_rows", {"ids": instance_ids}):
        rows[iid][path] = Row(status, output, columns, error, due, finished)
    signals: dict[int, list[Signal]] = {i: [] for i in instance_ids}
    for iid, signal_id, name, data in Q.all(conn, "pending_signals", {"ids": instance_ids}):
        signals[iid].append(Signal(signal_id, name, data))
    return rows, signals


def apply(conn: psycopg.Connection, instance_id: int, decisions: list[Decision]) -> list[Enqueue]:
    """Write an evaluation's decisions for one instance, in order; returns the leaves to enqueue (written
    with the round's other messages)."""
    enqueued = []
    for d in decisions:
        if isinstance(d, Enqueue):
            enqueued.append(d)
        elif isinstance(d, WriteRow):
            Q.execute(conn, "write_row", {"id": instance_id, "path": d.path, "status": d.status,
                                          "output": dumps(d.output), "due": d.due, "finished": d.finished_at})
        elif isinstance(d, SkipBranch):
            Q.execute(conn, "skip_branch", {"id": instance_id, "path": d.path, "under": d.path + ".%"})
        elif isinstance(d, ForgetIteration):
            Q.execute(conn, "forget_iteration", {"id": instance_id, "under": d.path + ".%"})
        elif isinstance(d, Wake):
            Q.execute(conn, "wake", {"id": instance_id, "at": d.at})
        else:
            Q.execute(conn, "consume_signal", {"signal": d.signal_id, "path": d.path})
    return enqueued
