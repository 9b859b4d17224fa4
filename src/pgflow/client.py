"""Start, watch and control instances: :class:`Client` and the module-level shortcuts behind ``pgflow.start``,
``pgflow.status``... and the ``pgflow start | status | result | cancel | list`` commands.

Every call runs on the client's own connection (from its pool) or, with ``conn=``, inside the caller's
psycopg connection and transaction. A client given no DSN uses ``PGFLOW_DSN`` or the embedded server, and
only ever reads from it or starts instances: it never changes a role's settings.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from . import tracing
from .db.codec import dumps, json_arrays
from .db.connection import connect, open_pool, resolve_dsn, unavailable
from .db.queries import Queries
from .errors import FlowDefinitionError, InstanceFailed, InstanceNotFinished, InstanceNotFound, PgflowError
from .flow import INPUT, MAX_PRIORITY, Flow, version_hash
from .statuses import TERMINAL_INSTANCE_STATUSES, InstanceStatus, StepStatus
from .tree import Node, as_node

T = TypeVar("T")
Q = Queries("client")

WAIT_POLL_SECONDS = 0.2  # re-check interval of a wait that cannot LISTEN (a connection inside a transaction)
_ABANDONED: list[Any] = []  # pools inherited across fork: kept, never closed (closing ends the parent's sessions)


# ---------------------------------------------------------------------------------------------- typed results

@dataclass(frozen=True)
class StepInfo:
    """One step of an instance (for a map: its parent row and a count of its tasks)."""

    name: str
    status: StepStatus | None
    attempts: int | None
    tasks: int  # map tasks (0 for a step that is not a map)
    tasks_completed: int
    error: str | None
    traceback: str | None


@dataclass(frozen=True)
class InstanceInfo:
    """An instance as stored, with its steps. ``status`` is an :class:`InstanceStatus` (a StrEnum: it equals
    the string ``"completed"`` too)."""

    id: int
    flow: str
    version: str
    status: InstanceStatus
    label: str | None
    input: Any
    output: Any
    error: str | None
    created_at: Any
    started_at: Any
    finished_at: Any
    steps: list[StepInfo]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_INSTANCE_STATUSES

    def step(self, name: str) -> StepInfo:
        """The step called ``name``; KeyError if the instance has no row for it (yet)."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"instance {self.id} has no step {name!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 text, statuses as strings."""
        return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class InstanceHandle:
    """A started instance, bound to the client that started it (``int(handle)`` is its id)."""

    id: int
    client: Client = field(repr=False, compare=False)

    def __int__(self) -> int:
        return self.id

    def status(self, *, conn: psycopg.Connection | None = None) -> InstanceInfo:
        return self.client.status(self.id, conn=conn)

    def result(self, *, conn: psycopg.Connection | None = None) -> Any:
        return self.client.result(self.id, conn=conn)

    def wait(self, timeout: float = 60.0, *, conn: psycopg.Connection | None = None) -> InstanceInfo:
        return self.client.wait(self.id, timeout, conn=conn)

    def cancel(self, reason: str | None = None, *, conn: psycopg.Connection | None = None) -> InstanceStatus:
        return self.client.cancel(self.id, reason, conn=conn)

    def retry(self, *, conn: psycopg.Connection | None = None) -> InstanceStatus:
        return self.client.retry(self.id, conn=conn)


# ---------------------------------------------------------------------------------------------- the client

class Client:
    """pgflow's API on one database. ``Client(dsn)`` keeps a small psycopg-pool (opened on first use,
    closed by :meth:`close` or at the end of a ``with`` block); ``pool=False`` opens a connection per call
    instead (what the module-level shortcuts do). Every method takes ``conn=`` to run inside the caller's
    own connection and transaction instead.

    A pool belongs to the process that opened it: a client used again after ``fork`` leaves the inherited
    pool alone (its connections are the parent's) and opens its own."""

    def __init__(self, dsn: str | None = None, *, pool: bool = True, min_size: int = 1, max_size: int = 4) -> None:
        self._dsn = dsn
        self._pooled = pool
        self._sizes = (min_size, max_size)
        self._pool: Any = None
        self._pool_pid = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def dsn(self) -> str:
        """The DSN this client uses (resolved on first use: the argument, PGFLOW_DSN, or the embedded server)."""
        if self._dsn is None:
            self._dsn = resolve_dsn(None)
        return self._dsn

    def close(self) -> None:
        """Close the pool (a later call opens a new one)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()

    # ------------------------------------------------------------------------------------------ starting

    def start(self, flow: Flow | Node | str, input: Any = None, *, label: str | None = None,
              conn: psycopg.Connection | None = None, name: str = "python", priority: int = 0) -> InstanceHandle:
        """Start an instance of ``flow`` (a DAG :class:`Flow`, a control-flow node from :mod:`pgflow.tree`,
        or SQL text); its handle. With ``conn`` the instance is created inside that connection's current
        transaction (nothing is committed here): if the caller rolls back, the instance never existed.
        ``name`` names a control-flow workflow. ``priority``: its tasks run before those of lower
        priority (added to each step's own; -1000 to 1000)."""
        if isinstance(flow, Flow):
            registration = flow.registration  # validates the flow the first time
            payload = _checked_input(flow, input)
        else:
            payload = dumps(input, "flow input")

        def run(c: psycopg.Connection, traced: tracing.StartSpan) -> int:
            if isinstance(flow, Flow):
                return Q.value(c, "register_and_start", {
                    **registration, "input": payload, "label": label, "trace_context": traced.traceparent,
                    "priority": _priority(priority)})
            flow_name, version = register_tree(c, as_node(flow), name)
            return Q.value(c, "start_instance", {"flow": flow_name, "version": version, "input": payload,
                                                 "label": label, "trace_context": traced.traceparent,
                                                 "priority": _priority(priority)})

        return self.handle(self._starting(run, conn, flow.name if isinstance(flow, Flow) else name))

    def start_many(self, flow: Flow, inputs: list[Any], *, label: str | None = None,
                   conn: psycopg.Connection | None = None, priority: int = 0) -> list[InstanceHandle]:
        """Start one instance of ``flow`` per input, in one statement (much faster than a loop of
        :meth:`start`); their handles in the order of ``inputs``. Same transaction rules as start."""
        registration = flow.registration  # validates the flow the first time
        payloads = [_checked_input(flow, i) for i in inputs]
        if not payloads:
            return []

        def run(c: psycopg.Connection, traced: tracing.StartSpan) -> list[int]:
            ids: list[int] = []
            for _, inputs_json in json_arrays(payloads):
                ids += [r[0] for r in Q.all(c, "register_and_start_many", {
                    **registration, "inputs": inputs_json, "label": label, "trace_context": traced.traceparent,
                    "priority": _priority(priority)})]
            return ids

        return [self.handle(i) for i in self._starting(run, conn, flow.name)]

    def start_registered(self, flow: str, input: Any = None, *, version: str | None = None,
                         label: str | None = None, conn: psycopg.Connection | None = None) -> InstanceHandle:
        """Start a flow version registered earlier (by a start, from any client), by name: the newest version
        of ``flow`` unless ``version`` is given (``pgflow.start_registered``). No code is needed here: workers
        that can import the flow's code run it. InstanceNotFound when no such version is registered."""
        payload = dumps(input, "flow input")

        def run(c: psycopg.Connection, traced: tracing.StartSpan) -> int:
            try:
                with c.transaction():
                    return Q.value(c, "start_registered", {"flow": flow, "version": version, "input": payload,
                                                           "label": label, "trace_context": traced.traceparent})
            except psycopg.errors.NoDataFound as exc:
                raise InstanceNotFound(_sql_message(exc)) from None

        return self.handle(self._starting(run, conn, flow))

    def handle(self, instance_id: int) -> InstanceHandle:
        """The handle of an instance started earlier."""
        return InstanceHandle(instance_id, self)

    def _starting(self, run: Callable[[psycopg.Connection, tracing.StartSpan], T], conn: psycopg.Connection | None,
                  flow_name: str) -> T:
        """Run a start in the caller's transaction (``conn``) or in one of its own, inside the instance span
        (its traceparent is stored with the instances); a role that may not start it gets a PgflowError
        with the database's reason."""
        with tracing.start_span(flow_name) as traced:
            try:
                with self._transaction(conn) as c:
                    started = run(c, traced)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise PgflowError(_sql_message(exc)) from None
            traced.started(started if isinstance(started, list) else [started])
            return started

    # ------------------------------------------------------------------------------------------ watching

    def status(self, instance_id: int, *, conn: psycopg.Connection | None = None) -> InstanceInfo:
        """The instance's state and its steps; InstanceNotFound for an unknown id."""
        with self._connection(conn) as c:
            return _read_status(c, instance_id)

    def result(self, instance_id: int, *, conn: psycopg.Connection | None = None) -> Any:
        """The output of a completed instance. InstanceNotFinished while it runs, InstanceFailed if it
        failed or was cancelled."""
        info = self.status(instance_id, conn=conn)
        if info.status == InstanceStatus.COMPLETED:
            return info.output
        if info.finished:
            raise InstanceFailed(instance_id, info.status, info.error)
        raise InstanceNotFinished(f"instance {instance_id} is {info.status}")

    def wait(self, instance_id: int, timeout: float = 60.0, *, conn: psycopg.Connection | None = None
             ) -> InstanceInfo:
        """Block until the instance finishes; TimeoutError after ``timeout`` seconds. On an autocommit
        connection outside a transaction (the client's own, or ``conn``) it is woken by NOTIFY (LISTEN for
        the call's duration, re-checked every second). A ``conn`` inside a transaction gets no
        notifications until it ends, so there the status is polled instead: under READ COMMITTED each poll
        sees the instance's commits; under REPEATABLE READ or SERIALIZABLE the transaction's snapshot never
        does, and the wait times out."""
        deadline = time.monotonic() + timeout
        with self._connection(conn) as c:
            listening = c.autocommit and c.info.transaction_status == TransactionStatus.IDLE
            if listening:  # the caller's own channel: no one else's instance ids reach it
                channel = Q.value(c, "done_channel")
                c.execute(Q.composed("listen_done", channel=channel))
            try:
                while True:
                    info = _read_status(c, instance_id)
                    if info.finished:
                        return info
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"instance {instance_id} still {info.status} after {timeout} s")
                    if listening:
                        for _ in c.notifies(timeout=min(left, 1.0), stop_after=1):
                            pass
                    else:
                        time.sleep(min(left, WAIT_POLL_SECONDS))
            finally:
                if listening and not (c.closed or c.broken):
                    c.execute(Q.composed("unlisten_done", channel=channel))

    def list_instances(self, *, status: str | None = None, flow: str | None = None, label: str | None = None,
                       limit: int = 50, before: int | None = None,
                       conn: psycopg.Connection | None = None) -> list[dict[str, Any]]:
        """Instances newest first, filtered (id, flow_name, status, label, created_at, finished_at, error).
        Keyset pagination: pass the last id you got as ``before``."""
        if status is not None and status not in set(InstanceStatus):
            raise ValueError(f"unknown status {status!r}: use {', '.join(InstanceStatus)}")
        if not 1 <= limit <= 10_000:
            raise ValueError("limit must be between 1 and 10000")
        params = {"status": status, "flow": flow, "label": label, "limit": limit, "before": before}
        with self._connection(conn) as c:
            rows = Q.all(c, "list_instances", params, row_factory=dict_row)
        for row in rows:
            row["status"] = InstanceStatus(row["status"])
        return rows

    def explain(self, instance_id: int, *, conn: psycopg.Connection | None = None) -> str:
        """The instance drawn as a tree, one line per node with its status marker (``pgflow.explain``)."""
        with self._connection(conn) as c:
            try:
                text = Q.value(c, "explain", {"id": instance_id})
            except psycopg.errors.NoDataFound as exc:
                raise InstanceNotFound(_sql_message(exc)) from None
        if text is None:
            raise InstanceNotFound(f"no instance with id {instance_id}")
        return text

    # ------------------------------------------------------------------------------------------ controlling

    def cancel(self, instance_id: int, reason: str | None = None, *, conn: psycopg.Connection | None = None
               ) -> InstanceStatus:
        """Cancel a pending or running instance; its status afterwards (a finished instance keeps its
        status). Its unfinished steps are marked cancelled and their queued messages are archived."""
        with self._connection(conn) as c:
            outcome = Q.value(c, "cancel_instance", {"id": instance_id, "reason": reason})
        if outcome is None:
            raise InstanceNotFound(f"no instance with id {instance_id}")
        return InstanceStatus(outcome)

    def retry(self, instance_id: int, *, conn: psycopg.Connection | None = None) -> InstanceStatus:
        """Retry a failed instance from its failed steps (``pgflow.retry_instance``): it runs again, its
        failed and cancelled steps with fresh attempts, its completed steps keep their outputs; its status
        afterwards. InstanceNotFound for an unknown id; PgflowError when the instance is not failed."""
        with self._connection(conn) as c:
            outcome = Q.value(c, "retry_instance", {"id": instance_id})
            if outcome is None:
                raise InstanceNotFound(f"no instance with id {instance_id}")
            if outcome != "retried":
                raise PgflowError(f"instance {instance_id} is {outcome}; only a failed instance can be retried")
            return _read_status(c, instance_id).status

    def requeue_dead_letter(self, dead_letter_id: int, *, conn: psycopg.Connection | None = None) -> int:
        """Put a dead letter's message back on its queue (operators: the pgflow owner or pgflow_admin); the
        new message id. PgflowError when it does not exist, cannot be requeued or the role may not."""
        return self._dead_letter_action(dead_letter_id, conn, requeue=True)

    def discard_dead_letter(self, dead_letter_id: int, *, conn: psycopg.Connection | None = None) -> None:
        """Delete a dead letter for good (operators only, like :meth:`requeue_dead_letter`)."""
        self._dead_letter_action(dead_letter_id, conn, requeue=False)

    def _dead_letter_action(self, dead_letter_id: int, conn: psycopg.Connection | None, *, requeue: bool) -> Any:
        name = "requeue_dead_letter" if requeue else "discard_dead_letter"
        with self._connection(conn) as c:
            try:
                with c.transaction():
                    return Q.value(c, name, {"id": dead_letter_id})
            except (psycopg.errors.NoDataFound, psycopg.errors.ObjectNotInPrerequisiteState,
                    psycopg.errors.InsufficientPrivilege) as exc:
                raise PgflowError(_sql_message(exc)) from None

    def signal(self, instance_id: int, name: str, data: Any = None, *, conn: psycopg.Connection | None = None
               ) -> int:
        """Send a signal to a running instance (kept until a ``wait_for_signal(name)`` consumes it); the
        signal's id. InstanceNotFound for an unknown id; PgflowError for a finished instance."""
        payload = dumps(data, "signal data")
        with self._connection(conn) as c:
            try:
                with c.transaction():
                    return Q.value(c, "signal", {"id": instance_id, "name": name, "data": payload})
            except psycopg.errors.NoDataFound as exc:
                raise InstanceNotFound(_sql_message(exc)) from None
            except psycopg.Error as exc:
                if exc.sqlstate in ("55000", "22023"):
                    raise PgflowError(_sql_message(exc)) from None
                raise

    def set_variable(self, name: str, value: Any, *, conn: psycopg.Connection | None = None) -> None:
        """Set one of the current user's variables, copied into every instance they start from now on
        (``$vars.name`` in SQL, ``ctx.vars`` / a ``vars`` parameter in Python)."""
        payload = dumps(value, "variable")
        with self._connection(conn) as c:
            Q.execute(c, "set_variable", {"name": name, "value": payload})

    def grant_secret(self, role: str, name: str, ref: str, *, conn: psycopg.Connection | None = None) -> None:
        """Give ``role`` a secret called ``name`` whose value workers read from ``ref`` (``'env:NAME'`` or
        ``'file:/path'``): run as the pgflow owner or a superuser. Secrets are granted, never chosen by users
        (any user could otherwise send ``env:PGFLOW_DSN`` anywhere); HTTP steps use ``$secrets.name``, Python
        steps ``ctx.secret(name)``."""
        with self._connection(conn) as c:
            Q.execute(c, "grant_secret", {"role": role, "name": name, "ref": ref})

    # ------------------------------------------------------------------------------------------ connections

    @contextmanager
    def _connection(self, conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
        """The caller's connection, else an autocommit connection of this client's."""
        if conn is not None:
            yield conn
            return
        if not self._pooled:
            with connect(self.dsn, autocommit=True) as own:
                yield own
            return
        from psycopg_pool import PoolTimeout

        pool = self._open_pool()
        try:
            with pool.connection() as own:
                yield own
        except PoolTimeout as exc:
            raise unavailable(self.dsn, exc) from None

    @contextmanager
    def _transaction(self, conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
        """The caller's connection as it is (their transaction), else one of ours inside a transaction."""
        if conn is not None:
            yield conn
            return
        with self._connection(None) as own, own.transaction():
            yield own

    def _open_pool(self) -> Any:
        with self._lock:
            if self._pool is not None and self._pool_pid != os.getpid():
                _ABANDONED.append(self._pool)  # forked: the parent's connections, never to be used here
                self._pool = None
            if self._pool is None:
                self._pool = open_pool(self.dsn, min_size=self._sizes[0], max_size=self._sizes[1])
                self._pool_pid = os.getpid()
            return self._pool


# ---------------------------------------------------------------------------------------------- helpers

def _checked_input(flow: Flow, input: Any) -> str:
    for step in flow.steps.values():
        if step.over == INPUT and not isinstance(input, list):
            raise FlowDefinitionError(
                f"flow {flow.name!r}: step {step.name!r} maps over the input, which must be a list, "
                f"not {type(input).__name__}"
            )
    return dumps(input, "flow input")


def register_tree(conn: psycopg.Connection, node: Node, name: str) -> tuple[str, str]:
    """Validate a control-flow workflow in the database (the same rules as the SQL front door) and
    register it; returns (flow name, version)."""
    try:
        with conn.transaction():
            shape = Q.value(conn, "tree_shape", {"tree": dumps(node.data), "name": name})
    except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded) as exc:  # 22xxx, 54xxx
        raise FlowDefinitionError(_sql_message(exc)) from None
    version = version_hash(shape)
    Q.execute(conn, "register_flow", {"name": name, "version": version, "ref": None, "shape": dumps(shape)})
    return name, version


def _read_status(conn: psycopg.Connection, instance_id: int) -> InstanceInfo:
    row = Q.one(conn, "instance", {"id": instance_id}, row_factory=dict_row)
    if row is None:
        raise InstanceNotFound(f"no instance with id {instance_id}")
    steps = [StepInfo(name=s["step_name"], status=None if s["status"] is None else StepStatus(s["status"]),
                      attempts=s["attempts"], tasks=s["tasks"], tasks_completed=s["tasks_completed"],
                      error=s["error"], traceback=s["traceback"])
             for s in Q.all(conn, "instance_steps", {"id": instance_id}, row_factory=dict_row)]
    return InstanceInfo(
        id=row["id"], flow=row["flow_name"], version=row["flow_version"], status=InstanceStatus(row["status"]),
        label=row["label"], input=row["input"], output=row["output"], error=row["error"],
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        steps=sorted(steps, key=lambda s: s.name),
    )


def _sql_message(exc: psycopg.Error) -> str:
    """The text of an error raised by pgflow's SQL functions, without the "pgflow: " prefix."""
    message = exc.diag.message_primary or str(exc)
    return message.removeprefix("pgflow: ")


# ---------------------------------------------------------------------------------------------- shortcuts
# ``pgflow.start(...)`` and friends: one call on a client that opens a connection per call (never a pool
# shared by a process that may fork, and no pool left behind for every DSN a process ever named).

def _client(dsn: str | None) -> Client:
    return Client(dsn, pool=False)


def start(flow: Flow | Node | str, input: Any = None, *, label: str | None = None,
          conn: psycopg.Connection | None = None, dsn: str | None = None, name: str = "python",
          priority: int = 0) -> int:
    """Start an instance (see :meth:`Client.start`); its id."""
    return _client(dsn).start(flow, input, label=label, conn=conn, name=name, priority=priority).id


def start_many(flow: Flow, inputs: list[Any], *, label: str | None = None,
               conn: psycopg.Connection | None = None, dsn: str | None = None, priority: int = 0) -> list[int]:
    """Start one instance per input in one statement (see :meth:`Client.start_many`); their ids."""
    return [h.id for h in _client(dsn).start_many(flow, inputs, label=label, conn=conn, priority=priority)]


def _priority(priority: int) -> str:
    """A start's priority as the pgflow.priority setting the instances' column default reads."""
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}, not {priority!r}")
    return str(priority)


def status(instance_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> InstanceInfo:
    """The instance's state and its steps (see :meth:`Client.status`)."""
    return _client(dsn).status(instance_id, conn=conn)


def result(instance_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> Any:
    """A completed instance's output (see :meth:`Client.result`)."""
    return _client(dsn).result(instance_id, conn=conn)


def wait(instance_id: int, timeout: float = 60.0, *, dsn: str | None = None,
         conn: psycopg.Connection | None = None) -> InstanceInfo:
    """Block until the instance finishes (see :meth:`Client.wait`)."""
    return _client(dsn).wait(instance_id, timeout, conn=conn)


def cancel(instance_id: int, reason: str | None = None, *, dsn: str | None = None,
           conn: psycopg.Connection | None = None) -> InstanceStatus:
    """Cancel an instance (see :meth:`Client.cancel`)."""
    return _client(dsn).cancel(instance_id, reason, conn=conn)


def list_instances(*, status: str | None = None, flow: str | None = None, label: str | None = None,
                   limit: int = 50, before: int | None = None, dsn: str | None = None,
                   conn: psycopg.Connection | None = None) -> list[dict[str, Any]]:
    """Instances newest first, filtered (see :meth:`Client.list_instances`)."""
    return _client(dsn).list_instances(status=status, flow=flow, label=label, limit=limit, before=before, conn=conn)


def explain(instance_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> str:
    """The instance drawn as a tree (see :meth:`Client.explain`)."""
    return _client(dsn).explain(instance_id, conn=conn)


def signal(instance_id: int, name: str, data: Any = None, *, dsn: str | None = None,
           conn: psycopg.Connection | None = None) -> int:
    """Send a signal to a running instance (see :meth:`Client.signal`)."""
    return _client(dsn).signal(instance_id, name, data, conn=conn)


def set_variable(name: str, value: Any, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> None:
    """Set one of the current user's variables (see :meth:`Client.set_variable`)."""
    _client(dsn).set_variable(name, value, conn=conn)


def grant_secret(role: str, name: str, ref: str, *, dsn: str | None = None,
                 conn: psycopg.Connection | None = None) -> None:
    """Grant ``role`` a secret by reference (see :meth:`Client.grant_secret`)."""
    _client(dsn).grant_secret(role, name, ref, conn=conn)


def retry(instance_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> InstanceStatus:
    """Retry a failed instance from its failed steps (see :meth:`Client.retry`)."""
    return _client(dsn).retry(instance_id, conn=conn)


def start_registered(flow: str, input: Any = None, *, version: str | None = None, label: str | None = None,
                     dsn: str | None = None, conn: psycopg.Connection | None = None) -> int:
    """Start a registered flow version by name (see :meth:`Client.start_registered`); its id."""
    return _client(dsn).start_registered(flow, input, version=version, label=label, conn=conn).id


def requeue_dead_letter(dead_letter_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> int:
    """Put a dead letter back on its queue (see :meth:`Client.requeue_dead_letter`)."""
    return _client(dsn).requeue_dead_letter(dead_letter_id, conn=conn)


def discard_dead_letter(dead_letter_id: int, *, dsn: str | None = None,
                        conn: psycopg.Connection | None = None) -> None:
    """Delete a dead letter (see :meth:`Client.discard_dead_letter`)."""
    _client(dsn).discard_dead_letter(dead_letter_id, conn=conn)
