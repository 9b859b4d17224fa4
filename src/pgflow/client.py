"""Start, watch and control instances: the Python API behind ``pgflow start | status | result | cancel |
list`` (all of it works on a DSN, or inside the caller's own psycopg connection and transaction)."""

from __future__ import annotations

import hashlib
import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.rows import dict_row

from . import store, tracing
from .errors import FlowDefinitionError, InstanceFailed, InstanceNotFinished, InstanceNotFound, PgflowError
from .flows import INPUT, Flow
from .queries import query
from .tree import Node, as_node

T = TypeVar("T")

TERMINAL = ("completed", "failed", "cancelled")


def load_flow(ref: str) -> Flow | Node:
    """Import a flow (or a control-flow workflow node) from ``module:attribute`` (the CLI's FLOW
    argument), with a clear error."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise FlowDefinitionError(f"FLOW must look like module:attribute, not {ref!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the current directory are importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlowDefinitionError(f"cannot import module {module_name!r} for flow {ref!r}: {exc}") from exc
    flow = getattr(module, attr, None)
    if not isinstance(flow, Flow | Node):
        raise FlowDefinitionError(f"{ref!r} is not a pgflow Flow or workflow node (found {type(flow).__name__})")
    return flow


def register(conn: psycopg.Connection, flow: Flow) -> None:
    """Store the flow's current version (idempotent) so coordinators and workers can run it."""
    conn.execute(query("register_flow"), {"name": flow.name, "version": flow.version, "ref": flow.ref,
                                          "shape": flow.shape_json})


def _check_input(flow: Flow, input: Any) -> str:
    for step in flow.steps.values():
        if step.over == INPUT and not isinstance(input, list):
            raise FlowDefinitionError(
                f"flow {flow.name!r}: step {step.name!r} maps over the input, which must be a list, "
                f"not {type(input).__name__}"
            )
    return store.dumps(input, "flow input")


def start(flow: Flow | Node | str, input: Any = None, *, label: str | None = None,
          conn: psycopg.Connection | None = None, dsn: str | None = None, name: str = "python") -> int:
    """Start an instance of ``flow`` (a DAG :class:`Flow`, or a control-flow node from
    :mod:`pgflow.tree`, or SQL text) and return its id.

    With ``conn`` the instance is created inside that connection's current transaction (nothing is
    committed here): if the caller rolls back, the instance never existed. Otherwise it is committed on
    ``dsn`` (default: ``PGFLOW_DSN`` or the embedded server). ``name`` names a control-flow workflow."""
    if isinstance(flow, Flow):
        flow.validate()
        payload = _check_input(flow, input)
    else:
        payload = store.dumps(input, "flow input")

    def run(c: psycopg.Connection, traced: tracing.StartSpan) -> int:
        if isinstance(flow, Flow):
            return c.execute(query("register_and_start"), {
                "flow": flow.name, "version": flow.version, "ref": flow.ref, "shape": flow.shape_json,
                "input": payload, "label": label, "trace_context": traced.traceparent}).fetchone()[0]
        flow_name, version = register_tree(c, as_node(flow), name)
        return c.execute(query("start_instance"), {
            "flow": flow_name, "version": version, "input": payload, "label": label,
            "trace_context": traced.traceparent}).fetchone()[0]

    return _starting(run, conn, dsn, flow.name if isinstance(flow, Flow) else name)


def start_many(flow: Flow, inputs: list[Any], *, label: str | None = None,
               conn: psycopg.Connection | None = None, dsn: str | None = None) -> list[int]:
    """Start one instance of ``flow`` per input, in one statement (much faster than a loop of
    :func:`start`); returns their ids in the order of ``inputs``. Same transaction rules as start."""
    flow.validate()
    payloads = [_check_input(flow, i) for i in inputs]
    if not payloads:
        return []

    def run(c: psycopg.Connection, traced: tracing.StartSpan) -> list[int]:
        ids: list[int] = []
        for _, inputs_json in store.json_arrays(payloads):
            ids += [r[0] for r in c.execute(query("register_and_start_many"), {
                "flow": flow.name, "version": flow.version, "ref": flow.ref, "shape": flow.shape_json,
                "inputs": inputs_json, "label": label, "trace_context": traced.traceparent}).fetchall()]
        return ids

    return _starting(run, conn, dsn, flow.name)


def _starting(run: Callable[[psycopg.Connection, tracing.StartSpan], T], conn: psycopg.Connection | None,
              dsn: str | None, flow_name: str) -> T:
    """Run a start in the caller's transaction (``conn``) or in one of its own on ``dsn``, inside the
    instance span (its traceparent is stored with the instances); a role that may not start it gets a
    PgflowError with the database's reason."""
    with tracing.start_span(flow_name) as traced:
        try:
            if conn is not None:
                started = run(conn, traced)
            else:
                with store.transaction(store.resolve_dsn(dsn)) as own:
                    started = run(own, traced)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PgflowError(_sql_message(exc)) from None
        traced.started(started if isinstance(started, list) else [started])
        return started


def register_tree(conn: psycopg.Connection, node: Node, name: str) -> tuple[str, str]:
    """Validate a control-flow workflow in the database (the same rules as the SQL front door) and
    register it; returns (flow name, version)."""
    try:
        with conn.transaction():
            shape = conn.execute("SELECT pgflow.tree_shape(%s::jsonb, %s)", (store.dumps(node.data), name)
                                 ).fetchone()[0]
    except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded) as exc:  # 22xxx, 54xxx
        raise FlowDefinitionError(_sql_message(exc)) from None
    version = hashlib.sha256(orjson.dumps(shape, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    conn.execute(query("register_flow"), {"name": name, "version": version, "ref": None, "shape": store.dumps(shape)})
    return name, version


def _sql_message(exc: psycopg.Error) -> str:
    """The text of an error raised by pgflow's SQL functions, without the "pgflow: " prefix."""
    message = exc.diag.message_primary or str(exc)
    return message.removeprefix("pgflow: ")


def signal(instance_id: int, name: str, data: Any = None, *, dsn: str | None = None,
           conn: psycopg.Connection | None = None) -> int:
    """Send a signal to a running instance (kept until a ``wait_for_signal(name)`` consumes it).
    InstanceNotFound for an unknown id; PgflowError for a finished instance."""
    def run(c: psycopg.Connection) -> int:
        try:
            with c.transaction():
                return c.execute("SELECT pgflow.signal(%s, %s, %s::jsonb)",
                                 (instance_id, name, store.dumps(data, "signal data"))).fetchone()[0]
        except psycopg.errors.NoDataFound as exc:
            raise InstanceNotFound(_sql_message(exc)) from None
        except psycopg.Error as exc:
            if exc.sqlstate in ("55000", "22023"):
                raise PgflowError(_sql_message(exc)) from None
            raise

    return _with_conn(dsn, conn, run)


def explain(instance_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> str:
    """The instance drawn as a tree, one line per node with its status marker (``pgflow.explain``)."""
    def run(c: psycopg.Connection) -> str:
        try:
            text = c.execute("SELECT pgflow.explain(%s)", (instance_id,)).fetchone()[0]
        except psycopg.errors.NoDataFound as exc:
            raise InstanceNotFound(_sql_message(exc)) from None
        if text is None:
            raise InstanceNotFound(f"no instance with id {instance_id}")
        return text

    return _with_conn(dsn, conn, run)


def set_secret(name: str, ref: str, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> None:
    """Declare a secret by reference — ``env:NAME`` or ``file:/path`` on the workers — never its value.
    HTTP steps use it as ``$secrets.name``; Python steps call ``ctx.secret(name)``."""
    def run(c: psycopg.Connection) -> None:
        try:
            with c.transaction():
                c.execute("SELECT pgflow.set_secret(%s, %s)", (name, ref))
        except psycopg.errors.InvalidParameterValue as exc:
            raise PgflowError(_sql_message(exc)) from None

    _with_conn(dsn, conn, run)


def set_variable(name: str, value: Any, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> None:
    """Set one of the current user's variables, copied into every instance they start from now on
    (``$vars.name`` in SQL, ``ctx.vars`` / a ``vars`` parameter in Python)."""
    def run(c: psycopg.Connection) -> None:
        c.execute("SELECT pgflow.set_variable(%s, %s::jsonb)", (name, store.dumps(value, "variable")))

    _with_conn(dsn, conn, run)


@dataclass
class InstanceStatus:
    """An instance as stored, with a per-step summary."""

    id: int
    flow: str
    version: str
    status: str
    label: str | None
    input: Any
    output: Any
    error: str | None
    created_at: Any
    started_at: Any
    finished_at: Any
    steps: list[dict[str, Any]]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in self.__dict__.items()}


def _with_conn(dsn: str | None, conn: psycopg.Connection | None, fn):
    if conn is not None:
        return fn(conn)
    with store.connect(store.resolve_dsn(dsn), autocommit=True) as own:
        return fn(own)


def status(instance_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> InstanceStatus:
    """The instance's state and a summary per step; InstanceNotFound for an unknown id."""
    def read(c: psycopg.Connection) -> InstanceStatus:
        with c.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query("instance"), {"id": instance_id}).fetchone()
            if row is None:
                raise InstanceNotFound(f"no instance with id {instance_id}")
            steps = cur.execute(query("instance_steps"), {"id": instance_id}).fetchall()
        return InstanceStatus(
            id=row["id"], flow=row["flow_name"], version=row["flow_version"], status=row["status"],
            label=row["label"], input=row["input"], output=row["output"], error=row["error"],
            created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            steps=sorted(steps, key=lambda s: s["step_name"]),
        )

    return _with_conn(dsn, conn, read)


def result(instance_id: int, *, dsn: str | None = None, conn: psycopg.Connection | None = None) -> Any:
    """The output of a completed instance. InstanceNotFinished while it runs, InstanceFailed if it failed
    or was cancelled."""
    st = status(instance_id, dsn=dsn, conn=conn)
    if st.status == "completed":
        return st.output
    if st.status in ("failed", "cancelled"):
        raise InstanceFailed(instance_id, st.status, st.error)
    raise InstanceNotFinished(f"instance {instance_id} is {st.status}")


def wait(instance_id: int, timeout: float = 60.0, *, dsn: str | None = None) -> InstanceStatus:
    """Block until the instance finishes (woken by NOTIFY, re-checked every second); TimeoutError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with store.connect(store.resolve_dsn(dsn), autocommit=True) as conn:
        conn.execute("LISTEN pgflow_instance_done")
        while True:
            st = status(instance_id, conn=conn)
            if st.finished:
                return st
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"instance {instance_id} still {st.status} after {timeout} s")
            for _ in conn.notifies(timeout=min(left, 1.0), stop_after=1):
                pass


def cancel(instance_id: int, reason: str | None = None, *, dsn: str | None = None,
           conn: psycopg.Connection | None = None) -> str:
    """Cancel a pending or running instance; returns its status afterwards (a finished instance keeps its
    status). Its unfinished steps are marked cancelled and their queued messages are archived."""
    def run(c: psycopg.Connection) -> str:
        outcome = c.execute(query("cancel_instance"), {"id": instance_id, "reason": reason}).fetchone()[0]
        if outcome is None:
            raise InstanceNotFound(f"no instance with id {instance_id}")
        return outcome

    return _with_conn(dsn, conn, run)


def list_instances(*, status: str | None = None, flow: str | None = None, label: str | None = None,
                   limit: int = 50, before: int | None = None, dsn: str | None = None,
                   conn: psycopg.Connection | None = None) -> list[dict[str, Any]]:
    """Instances newest first, filtered. Keyset pagination: pass the last id you got as ``before``."""
    if status is not None and status not in ("pending", "running", *TERMINAL):
        raise ValueError(f"unknown status {status!r}: use pending, running, completed, failed or cancelled")
    if not 1 <= limit <= 10_000:
        raise ValueError("limit must be between 1 and 10000")
    params = {"status": status, "flow": flow, "label": label, "limit": limit, "before": before}

    def run(c: psycopg.Connection) -> list[dict[str, Any]]:
        with c.cursor(row_factory=dict_row) as cur:
            return cur.execute(query("list_instances"), params).fetchall()

    return _with_conn(dsn, conn, run)
