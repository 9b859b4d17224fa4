"""Workers: processes that pop tasks from pgmq, run them and acknowledge them with a checkpoint write.

A batch is read and claimed in one statement (``pgflow.read_tasks``: the messages are hidden for the
visibility timeout and their steps marked running with a new attempt), so a batch costs two round trips:
read-and-claim, then one acknowledgement for its Python tasks.

The acknowledgement of a task (its output, status and attempt, the message's deletion and a wake-up for
the coordinator) is one transaction. A SQL step runs inside that same transaction, so its effect lands
exactly once; a Python step runs before it, so it runs at least once and gets a stable
``ctx.idempotency_key``. Python acknowledgements are batched (one transaction for many tasks); messages
of long steps have their visibility timeout extended by a heartbeat thread.

``pgflow worker --concurrency N`` runs N such processes (``multiprocess``) under a supervisor that
restarts crashed children and, on SIGTERM, lets them drain: stop taking work, finish the step in hand,
give back claimed tasks not yet started, exit 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import decimal
import importlib
import inspect
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import http_step, logs, store, tracing
from . import queue as q
from .client import load_flow
from .coordinator import ShapeCache
from .dsl import SqlTemplate, compile_sql
from .errors import FlowDefinitionError, NonRetryableError, NotSerializable, PayloadTooLarge, StepTimeout
from .flows import INPUT, ITEM, REGISTRY, SECRETS, VARS, FlowShape, Step, StepContext, StepShape, resolve_secrets
from .metrics import ALL_QUEUES, Health, metrics
from .queries import query

log = logging.getLogger("pgflow.worker")

PERMANENT_SQLSTATE_CLASSES = ("42", "22")  # syntax/undefined object, data exceptions: retrying won't help


def backoff_seconds(step: StepShape, attempt: int) -> float:
    """Exponential backoff with "equal jitter": between half and all of min(cap, base * 2^(attempt-1))."""
    delay = min(step.backoff_cap, step.backoff_base * 2 ** (attempt - 1))
    return random.uniform(delay / 2, delay)


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise StepTimeout in the running step after ``seconds`` (SIGALRM: main thread only)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise StepTimeout(f"step exceeded its {seconds} s timeout")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _unique(names: list[str]) -> list[str]:
    """Column names made unique (a record's column list may not repeat one): "n", "n_2", ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _sql_value(value: Any) -> Any:
    """JSON form of column types orjson does not know (numeric, bytea)."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return str(value)


class StepCode:
    """Finds the Python function behind a step: flows defined in this process first, else the flow's
    ``module:attribute`` reference recorded when it was registered; for control-flow leaves, the
    ``module:function`` named in the node."""

    def __init__(self) -> None:
        self._leaves: dict[str, tuple[Callable, tuple[tuple[str, str], ...], bool]] = {}

    def leaf_function(self, ref: str) -> tuple[Callable, tuple[tuple[str, str], ...], bool]:
        """The function, its (parameter, scope name) bindings, and whether it takes **kwargs."""
        if ref not in self._leaves:
            module_name, _, qualname = ref.partition(":")
            if "" not in sys.path:
                sys.path.insert(0, "")
            try:
                target: Any = importlib.import_module(module_name)
                for part in qualname.split("."):
                    target = getattr(target, part)
            except (ImportError, AttributeError) as exc:
                raise NonRetryableError(f"cannot load Python step {ref!r}: {exc}") from exc
            if not getattr(target, "__pgflow_task__", False):
                # a workflow names its functions itself: only those marked for it may run (not os:system)
                raise NonRetryableError(f"{ref} is not marked with @pgflow.tree.task, so workflows may not call it")
            params = list(inspect.signature(target).parameters.values())[1:]  # after ctx
            bindings = tuple((p.name, p.name) for p in params
                             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty)
            self._leaves[ref] = (target, bindings, any(p.kind == p.VAR_KEYWORD for p in params))
        return self._leaves[ref]

    def function(self, flow_name: str, ref: str | None, step_name: str) -> Step:
        flow = REGISTRY.get(flow_name)
        if flow is None and ref:
            flow = load_flow(ref)
        if flow is None:
            raise NonRetryableError(f"flow {flow_name!r} is not importable by this worker (defined in "
                                    "__main__?): start the worker with --import MODULE")
        step = flow.steps.get(step_name)
        if step is None or step.fn is None:
            raise NonRetryableError(f"flow {flow_name!r} as loaded by this worker has no Python step "
                                    f"{step_name!r} (the code changed since the instance started?)")
        return step


def step_label(shape: FlowShape, step: StepShape | None, name: str) -> str:
    """The ``step`` label of a task's metrics. A DAG step is named in its flow's code, so its name is
    bounded. A control-flow leaf is named by its position in the tree, and positions multiply with the width
    of a join and with loop iterations, so it is labelled by what it runs instead: ``sql``, ``http`` or
    ``python:<module:function>`` (a flow's series are bounded by its distinct functions, plus two)."""
    if shape.tree is None:
        return name
    if step is None:
        return "unknown"
    if step.kind == "python" and step.spec:
        return f"python:{step.spec.get('fn')}"
    return step.kind


def task_arrays(rows: list[dict]) -> dict[str, list]:
    """The parallel arrays that name claimed tasks in complete_tasks and release_tasks."""
    return {"msg_ids": [r["msg_id"] for r in rows], "instance_ids": [r["instance_id"] for r in rows],
            "steps": [r["step_name"] for r in rows], "tasks": [r["task_index"] for r in rows],
            "attempts": [r["attempt"] for r in rows]}


class _Acks:
    """Completed Python tasks waiting to be checkpointed together."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.rows: list[tuple[dict, str, tuple[str, str, str]]] = []
        self.since = 0.0

    def add(self, row: dict, payload: str, labels: tuple[str, str, str]) -> None:
        if not self.rows:
            self.since = time.monotonic()
        self.rows.append((row, payload, labels))

    def due(self, interval: float) -> bool:
        return bool(self.rows) and time.monotonic() - self.since >= interval

    def flush(self, conn: psycopg.Connection) -> None:
        if not self.rows:
            return
        for part, outputs in store.json_arrays([p for _, p, _ in self.rows]):
            conn.execute(query("complete_tasks"), {
                "queue": self.queue, **task_arrays([r for r, _, _ in self.rows[part]]), "outputs": outputs,
                "columns": None,
            })
        completed = metrics().completed
        for _, _, labels in self.rows:
            completed.labels(*labels).inc()
        self.rows.clear()


class Worker(store.ConnectedLoop):
    """One worker process's loop: read a batch, claim it, run it, acknowledge it."""

    def __init__(self, dsn: str, queues: list[str] | None = None, *, batch_size: int = 20,
                 visibility_timeout: int = 30, poll_interval: float = 1.0, ack_interval: float = 0.05,
                 health: Health | None = None) -> None:
        super().__init__(dsn)
        self.fixed_queues = list(queues) if queues else None
        self.batch_size = batch_size
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.ack_interval = ack_interval
        self.health = health or Health()
        self.shapes = ShapeCache()
        self.code = StepCode()
        self.templates: dict[str, SqlTemplate] = {}
        self.type_names: dict[int, str] = {}
        self.executors: set[str] = set()  # roles whose executor was checked
        self.session_role = ""
        self._jsonb_oid = 3802
        self._finished = threading.Event()  # the loop has returned: the heartbeat may stop too
        self.in_flight: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._queues: list[str] = []
        self._listening: set[str] = set()
        self._queues_checked = 0.0
        self.tracer = tracing.step_tracer()  # None unless OpenTelemetry is set up in this process

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> None:
        """Work until :meth:`stop` (then finish the step in hand and give back the rest)."""
        threading.Thread(target=self._heartbeat, name="pgflow-heartbeat", daemon=True).start()
        try:
            super().run()
        finally:
            self._finished.set()

    def loop(self) -> None:
        while not self.stop_event.is_set():
            self.health.beat()
            got = 0
            for name in self._current_queues():
                if self.stop_event.is_set():
                    break
                messages, claimed = self._read(name)
                if messages:
                    got += len(messages)
                    self.process(name, messages, claimed)
            if got == 0 and not self.stop_event.is_set():
                for _ in self._listen.notifies(timeout=self.poll_interval, stop_after=1):
                    pass

    def waiting_for_database(self) -> None:
        self.health.beat()

    def on_connect(self) -> None:
        self.session_role = self._conn.execute("SELECT current_user").fetchone()[0]
        for name in self.fixed_queues or ():  # a worker may start before any flow has named its queue
            q.ensure_queue(self._conn, name)
        self._listening = set()
        self._queues_checked = 0.0

    def _current_queues(self) -> list[str]:
        """The queues to serve (fixed, or every pgflow queue, re-read every few seconds), listened to."""
        now = time.monotonic()
        if now - self._queues_checked > 5.0:
            self._queues_checked = now
            self._queues = self.fixed_queues or q.pgflow_queues(self._conn)
            for name in self._queues:
                if name not in self._listening:
                    self._listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(q.channel(name))))
                    self._listening.add(name)
        return self._queues

    # ------------------------------------------------------------------------------------------ batch

    def _read(self, queue: str) -> tuple[list[tuple[int, Any]], list[dict] | None]:
        """Read a batch and claim its tasks in one round trip. Returns the messages read and the claimed
        rows; if the claim fails as a whole (nothing was read then), reads alone and returns None for
        the claimed rows: :meth:`process` claims them one by one and dead-letters what fails."""
        try:
            with self._conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(query("read_tasks"), {
                    "queue": queue, "vt": self.visibility_timeout, "qty": self.batch_size}).fetchall()
        except psycopg.Error:
            if self._conn.broken or self._conn.closed:
                raise
            return q.read(self._conn, queue, self.visibility_timeout, self.batch_size), None
        claimed = [r for r in rows if r["attempt"] is not None]
        waits = metrics().queue_wait.labels(queue)
        for row in claimed:
            if row["queue_wait"] is not None:
                waits.observe(row["queue_wait"])
        return [(r["msg_id"], r["message"]) for r in rows], claimed

    def process(self, queue: str, messages: list[tuple[int, Any]], claimed: list[dict] | None = None) -> None:
        """Claim (unless ``claimed`` holds the rows already claimed), run and acknowledge one batch read
        from ``queue``."""
        conn = self._conn
        tasks = []
        for msg_id, body in messages:
            task = q.decode(msg_id, body)
            if task is None:
                q.dead_letter(conn, queue, msg_id, body, "not a pgflow task message (undecodable)")
            else:
                tasks.append(task)
        if not tasks:
            return
        if claimed is None:
            rows, rejected = self._claim(queue, tasks)
        else:  # pgflow.is_task_message claims exactly the messages decode accepts
            rows, rejected = claimed, set()
        claimed_ids = {r["msg_id"] for r in rows}
        unclaimed = [t for t in tasks if t.msg_id not in claimed_ids and t.msg_id not in rejected]
        if unclaimed:
            self._put_aside(queue, unclaimed)
        by_msg = {t.msg_id: t for t in tasks}
        with self._lock:
            self.in_flight[queue] = claimed_ids
        acks = _Acks(queue)
        try:
            for index, row in enumerate(rows):
                if self.stop_event.is_set():
                    acks.flush(conn)
                    self._release(queue, rows[index:])
                    break
                self._run_task(queue, row, by_msg[row["msg_id"]], acks)
                if acks.due(self.ack_interval):
                    acks.flush(conn)
            acks.flush(conn)
        finally:
            with self._lock:
                self.in_flight[queue] = set()

    def _claim(self, queue: str, tasks: list[q.Task]) -> tuple[list[dict], set[int]]:
        """Claim a batch. If the database rejects it, claim one by one and dead-letter the messages it
        rejects: one bad message can neither stop the worker nor take healthy ones down with it. Returns
        the claimed rows and the ids of the dead-lettered messages."""
        try:
            return self._claim_batch(tasks), set()
        except psycopg.Error:
            if self._conn.broken or self._conn.closed:
                raise
        rows: list[dict] = []
        rejected: set[int] = set()
        for task in tasks:
            try:
                rows += self._claim_batch([task])
            except psycopg.Error as exc:
                if self._conn.broken or self._conn.closed:
                    raise
                q.dead_letter(self._conn, queue, task.msg_id, task.body, f"cannot be claimed: {exc}".strip())
                rejected.add(task.msg_id)
        return rows, rejected

    def _claim_batch(self, tasks: list[q.Task]) -> list[dict]:
        with self._conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(query("claim_tasks"), {
                "msg_ids": [t.msg_id for t in tasks], "instance_ids": [t.instance_id for t in tasks],
                "steps": [t.step for t in tasks], "tasks": [t.task_index for t in tasks],
                "flows": [t.flow for t in tasks], "versions": [t.version for t in tasks],
            }).fetchall()

    def _put_aside(self, queue: str, tasks: list[q.Task]) -> None:
        """Archive messages that cannot run. Those of a cancelled or finished instance are expected; those
        naming no instance or no step of the flow version are poison, recorded with the reason."""
        known = {msg_id: (instance, step) for msg_id, instance, step in self._conn.execute(
            "SELECT u.msg_id, i.id IS NOT NULL, fs.step_name IS NOT NULL"
            " FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[])"
            "      AS u(msg_id, instance_id, flow, version, step)"
            " LEFT JOIN pgflow.instances i ON i.id = u.instance_id"
            " LEFT JOIN pgflow.flow_steps fs ON fs.flow_name = u.flow AND fs.version = u.version"
            "                                 AND fs.step_name = u.step",
            ([t.msg_id for t in tasks], [t.instance_id for t in tasks], [t.flow for t in tasks],
             [t.version for t in tasks], [t.step for t in tasks])).fetchall()}
        expected = []
        for task in tasks:
            has_instance, has_step = known[task.msg_id]
            if not has_instance:
                q.dead_letter(self._conn, queue, task.msg_id, task.body, f"no instance {task.instance_id}")
            elif not has_step:
                q.dead_letter(self._conn, queue, task.msg_id, task.body,
                              f"flow {task.flow!r} version {task.version} has no step {task.step!r}")
            else:
                expected.append(task.msg_id)
        q.archive(self._conn, queue, expected)

    def _release(self, queue: str, rows: list[dict]) -> None:
        self._conn.execute(query("release_tasks"), {"queue": queue, **task_arrays(rows)})

    def _run_task(self, queue: str, row: dict, task: q.Task, acks: _Acks) -> None:
        """Run one claimed task with its engine fields on every log line (a step's own lines too) and, when
        its instance is traced and this process traces, inside the task's span."""
        with logs.TaskFields((row["instance_id"], row["flow_name"], row["step_name"], row["task_index"],
                              row["attempt"], queue)):
            if self.tracer is not None and row["trace_context"]:
                with self.tracer.span(row, queue):
                    self._run_claimed(queue, row, task, acks)
            else:
                self._run_claimed(queue, row, task, acks)

    def _run_claimed(self, queue: str, row: dict, task: q.Task, acks: _Acks) -> None:
        shape = self.shapes.get(self._conn, row["flow_name"], row["flow_version"])
        step = shape.steps.get(row["step_name"])
        labels = (shape.name, step_label(shape, step, row["step_name"]), queue)
        m = metrics()
        m.started.labels(*labels).inc()  # also for tasks that fail before running, so failed <= started
        if step is None:
            self._record_failure(queue, row, None, NonRetryableError(f"flow version has no step {row['step_name']!r}"),
                                 labels)
            return
        if row["attempt"] > step.max_attempts:
            self._record_failure(queue, row, step, NonRetryableError(
                f"attempt {row['attempt']} exceeds max_attempts={step.max_attempts}: earlier attempts were lost "
                "(worker killed, or visibility timeout expired)"), labels)
            return
        in_flight = m.in_flight.labels(queue)
        in_flight.inc()
        started = time.perf_counter()
        try:
            scope, columns = self._scope(row, task)
            if step.kind == "sql":
                acks.flush(self._conn)  # keep acknowledgements in order with the SQL step's transaction
                self._run_sql(queue, row, step, scope, columns, labels)
            else:
                try:
                    output = self._call(shape.ref, step, row, task, scope)
                    payload = store.dumps(output, f"output of step {step.name}")
                except (PayloadTooLarge, NotSerializable) as exc:
                    raise NonRetryableError(str(exc)) from exc
                acks.add(row, payload, labels)
        except Exception as exc:
            if isinstance(exc, psycopg.Error) and (self._conn.broken or self._conn.closed):
                raise  # the connection is gone: the loop reconnects; the message comes back after its vt
            self._record_failure(queue, row, step, exc, labels)
        finally:
            in_flight.dec()
            m.step_duration.labels(*labels).observe(time.perf_counter() - started)

    @staticmethod
    def _scope(row: dict, task: q.Task) -> tuple[dict[str, Any], dict[str, Any]]:
        """The values a step can refer to, and the SQL column types of SQL results among them. A
        control-flow leaf brings its scope (input, vars, named results) in its message; a DAG step gets
        the flow input, the user's variables and its dependencies' outputs from the claim."""
        if task.scope is not None:
            return task.scope, task.columns or {}
        scope = {INPUT: row["input"], VARS: row["variables"] or {}, **(row["deps"] or {})}
        if row["task_index"] >= 0:
            scope[ITEM] = task.item
        return scope, row["dep_columns"] or {}

    def _context(self, step: StepShape, row: dict, scope: dict[str, Any]) -> StepContext:
        return StepContext(instance_id=row["instance_id"], flow=row["flow_name"], step=step.name,
                           task_index=row["task_index"], attempt=row["attempt"], max_attempts=step.max_attempts,
                           input=scope.get(INPUT), vars=scope.get(VARS) or {},
                           secret_refs=row["secret_refs"] or {})

    def _call(self, ref: str | None, step: StepShape, row: dict, task: q.Task, scope: dict[str, Any]) -> Any:
        """Run a Python or HTTP step (not in a transaction: at least once)."""
        if step.kind == "http":
            secrets = resolve_secrets(row["secret_refs"])
            with time_limit(step.timeout):
                return http_step.request(step.spec, {**scope, SECRETS: secrets}, row["attempt"], step.max_attempts,
                                         redact=list(secrets.values()))
        if task.scope is not None:  # a control-flow leaf: a module-level function bound by parameter names
            fn, bindings, wants_all = self.code.leaf_function(step.spec["fn"])
            kwargs = {p: scope[source] for p, source in bindings if source in scope}
            missing = [p for p, source in bindings if source not in scope]
            if missing:
                raise NonRetryableError(f"{step.spec['fn']}: no value for parameter(s) {missing}")
        else:
            code = self.code.function(row["flow_name"], ref, step.name)
            fn, wants_all = code.fn, code.wants_all
            kwargs = {p: scope[source] for p, source in code.bindings}
        if wants_all:
            for name, value in scope.items():
                kwargs.setdefault(name, value)
        with time_limit(step.timeout):
            result = fn(self._context(step, row, scope), **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
        return result

    def _run_sql(self, queue: str, row: dict, step: StepShape, scope: dict[str, Any], columns: dict[str, Any],
                 labels: tuple[str, str, str]) -> None:
        """Run a SQL step and its acknowledgement in one transaction: its effect happens exactly once."""
        template = self.templates.get(step.sql)
        if template is None:
            try:
                template = self.templates[step.sql] = compile_sql(step.sql)
            except FlowDefinitionError as exc:  # SQL from the SQL front door, validated only approximately
                raise NonRetryableError(str(exc)) from exc
        run_as = row["owner"] if row["owner"] != self.session_role else None
        try:
            if run_as:
                text, params = template.render_jsonb(scope, columns)
            else:
                text, params = template.render(scope, columns)
        except LookupError as exc:
            raise NonRetryableError(str(exc)) from exc
        conn = self._conn
        try:
            with conn.transaction():
                if run_as:
                    output, types = self._execute_as(run_as, text, params, step.timeout)
                else:
                    output, types = self._execute(text, params, step.timeout)
                payload = store.dumps(output, f"output of step {step.name}", default=_sql_value)
                conn.execute(query("complete_tasks"), {
                    "queue": queue, **task_arrays([row]), "outputs": f"[{payload}]",
                    "columns": [store.dumps(types) if types else None],
                })
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            if exc.sqlstate and exc.sqlstate[:2] in PERMANENT_SQLSTATE_CLASSES:
                raise NonRetryableError(f"{type(exc).__name__}: {exc}".strip()) from exc
            raise
        except (PayloadTooLarge, NotSerializable) as exc:
            raise NonRetryableError(str(exc)) from exc
        metrics().completed.labels(*labels).inc()

    def _execute(self, text: str, params: list[Any], timeout: float | None) -> tuple[Any, list[list[str]] | None]:
        """Run a statement on the worker's own connection (its role is the instance's owner)."""
        if timeout:
            self._conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(timeout * 1000)}ms",))
        with self._conn.cursor(row_factory=dict_row) as cur:
            cur.execute(text, params)
            if cur.description:
                return cur.fetchall(), self._column_types(cur.description)
            return {"rowcount": cur.rowcount}, None

    def _execute_as(self, role: str, text: str, params: str, timeout: float | None
                    ) -> tuple[Any, list[list[str]] | None]:
        """Run a statement with exactly ``role``'s privileges, through its SECURITY DEFINER executor
        (created by pgflow.grant_usage; SET ROLE is impossible inside it). The result's columns are
        described first, without running it, to give the executor's record its column list."""
        self._check_executor(role)
        described = self._describe(text)
        timeout_ms = int(timeout * 1000) if timeout else None
        executor = sql.Identifier("pgflow_exec", role)
        if not described:
            count = self._conn.execute(sql.SQL("SELECT {}(%s, %s::jsonb, %s, true)").format(executor),
                                       (text, params, timeout_ms)).fetchone()[0]
            return {"rowcount": count}, None
        names = _unique([name for name, _ in described])
        column_list = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
                                         for n, (_, t) in zip(names, described, strict=True))
        with self._conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql.SQL("SELECT * FROM {}(%s, %s::jsonb, %s) AS t({})").format(executor, column_list),
                        (text, params, timeout_ms))
            return cur.fetchall(), [[n, t] for n, (_, t) in zip(names, described, strict=True)]

    def _check_executor(self, role: str) -> None:
        """Refuse to run a step through an executor that does not exist or is not owned by its role."""
        if role in self.executors:
            return
        owners = {r[0] for r in self._conn.execute(
            "SELECT proowner::regrole::text FROM pg_proc WHERE pronamespace = 'pgflow_exec'::regnamespace"
            " AND proname = %s", (role,)).fetchall()}
        if owners != {sql.Identifier(role).as_string(self._conn)} and owners != {role}:
            raise NonRetryableError(f"role {role!r} cannot run SQL steps: no executor owned by it "
                                    f"(run SELECT pgflow.grant_usage('{role}'))")
        self.executors.add(role)

    def _describe(self, text: str) -> list[tuple[str, str]]:
        """(name, SQL type) of the columns a statement would return, from a prepare that runs nothing."""
        pgconn = self._conn.pgconn
        name = b"pgflow_describe"
        result = pgconn.prepare(name, text.encode(), [self._jsonb_oid])
        try:
            if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
                raise psycopg.errors.lookup(result.error_field(psycopg.pq.DiagnosticField.SQLSTATE).decode())(
                    (result.error_message or b"").decode().strip())
            described = pgconn.describe_prepared(name)
            columns = [(described.fname(i).decode(), described.ftype(i)) for i in range(described.nfields)]
        finally:
            if result.status == psycopg.pq.ExecStatus.COMMAND_OK:
                pgconn.exec_(b"DEALLOCATE pgflow_describe")
        types = self._type_names([oid for _, oid in columns])
        return [(n, types[oid]) for n, oid in columns]

    def _type_names(self, oids: list[int]) -> dict[int, str]:
        unknown = [oid for oid in oids if oid not in self.type_names]
        if unknown:
            for oid, name in self._conn.execute("SELECT t, format_type(t, NULL) FROM unnest(%s::oid[]) AS t",
                                                (unknown,)).fetchall():
                self.type_names[oid] = name
        return self.type_names

    def _column_types(self, description: Any) -> list[list[str]]:
        """[column name, SQL type name] of a result, in order (jsonb keeps neither order nor types: this
        lets ``$name`` pick the first column and ``$name.*`` rebuild a typed relation)."""
        types = self._type_names([c.type_code for c in description])
        return [[c.name, types[c.type_code]] for c in description]

    def _record_failure(self, queue: str, row: dict, step: StepShape | None, exc: BaseException,
                        labels: tuple[str, str, str]) -> None:
        permanent = step is None or isinstance(exc, NonRetryableError) or row["attempt"] >= step.max_attempts
        retry_in = None if permanent else backoff_seconds(step, row["attempt"])
        error = f"{type(exc).__name__}: {exc}"
        log.log(logging.ERROR if permanent else logging.WARNING, "step %s[%s] of instance %s attempt %s: %s",
                row["step_name"], row["task_index"], row["instance_id"], row["attempt"], error)
        if self.tracer is not None and row["trace_context"]:
            self.tracer.failed(exc, error, permanent)
        self._conn.execute(query("fail_task"), {
            "queue": queue, "msg_id": row["msg_id"], "instance_id": row["instance_id"], "step": row["step_name"],
            "task": row["task_index"], "attempt": row["attempt"], "error": error,
            "traceback": "".join(traceback.format_exception(exc)), "retry_in": retry_in,
        })
        (metrics().failed if permanent else metrics().retried).labels(*labels).inc()

    # ------------------------------------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        """Extend the visibility timeout of claimed messages so long steps are not redelivered."""
        conn = None
        while not self._finished.wait(self.visibility_timeout / 3):  # beats on while draining
            with self._lock:
                snapshot = {name: list(ids) for name, ids in self.in_flight.items() if ids}
            if not snapshot:
                continue
            try:
                if conn is None or conn.closed:
                    conn = store.connect(self.dsn, autocommit=True)
                for name, ids in snapshot.items():
                    q.extend(conn, name, ids, self.visibility_timeout)
            except Exception as exc:  # the main loop deals with outages; just try again next beat
                log.debug("heartbeat failed: %s", exc)
                conn = None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


# ---------------------------------------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the supervisor dies (even by kill -9), so it drains."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_main(dsn: str, queues: list[str] | None, options: dict[str, Any], inherited: tuple = (),
                supervisor: int | None = None) -> None:
    """A worker child (forked): close what it inherited but must not hold (the supervisor's metrics socket,
    so a child draining after its supervisor died never keeps the port), then work until SIGTERM.

    ``supervisor`` is the pid of the process that forked it, passed by the parent: if the child's parent
    is no longer that process, the supervisor died before the child asked to be told, and the child
    quits. (Comparing with pid 1 would be wrong: in a container the supervisor *is* pid 1.)"""
    # our own handlers first: until now the supervisor's (inherited) would swallow the SIGTERM that announces
    # its death; then ask for that signal, and check the supervisor did not die before we asked
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _die_with_parent()
    if os.getppid() != (supervisor or os.getppid()):
        return
    for resource in inherited:
        with contextlib.suppress(OSError):
            resource.close()
    worker = Worker(dsn, queues, **options)
    worker.stop_event = stop
    log.info("worker process %d working", os.getpid())
    worker.run()
    log.info("worker process %d exiting", os.getpid())


def run_workers(dsn: str, *, queues: list[str] | None = None, concurrency: int = 2, drain_timeout: float = 45.0,
                metrics_port: int = 0, stop_event: threading.Event | None = None, **options: Any) -> int:
    """Supervise ``concurrency`` worker processes until SIGTERM/SIGINT (or ``stop_event``); restart any
    that dies; on stop, let them drain for up to ``drain_timeout`` seconds. Returns the exit code (0).

    With ``metrics_port`` the supervisor serves /metrics (the children's samples, aggregated through
    prometheus-client's multiprocess mode: call :func:`pgflow.metrics.enable_multiprocess` before
    prometheus_client is imported; done here if it has not been), /healthz and /readyz."""
    import multiprocess

    from .metrics import enable_multiprocess, multiprocess_active, readiness, serve

    if metrics_port and not multiprocess_active():
        try:
            enable_multiprocess()
        except RuntimeError as exc:
            log.warning("/metrics will not include the worker processes' samples: %s", exc)
    context = multiprocess.get_context("fork")
    stop = stop_event or threading.Event()
    received: list[str] = []  # the signal that stopped us, for the drain's log line

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info("worker supervisor %d starting %d worker processes for %s", os.getpid(), concurrency,
             "queues " + ", ".join(queues) if queues else "every queue")
    health = Health()
    server = serve(metrics_port, health, readiness(dsn))
    inherited = (server.socket,) if server else ()
    # a series per queue served, or one labelled "*" when it serves every queue (counted once, not per queue)
    queue_labels = list(queues) if queues else [ALL_QUEUES]
    alive_gauges = [metrics().workers_alive.labels(name) for name in queue_labels]
    restart_counters = [metrics().restarts.labels(name) for name in queue_labels]

    def spawn(index: int):
        process = context.Process(target=_child_main, args=(dsn, queues, options, inherited, os.getpid()),
                                  name=f"pgflow-worker-{index}")
        process.start()
        log.info("started worker process %d (slot %d)", process.pid, index)
        return process

    children = [spawn(i) for i in range(concurrency)]
    started = [time.monotonic()] * concurrency
    while not stop.is_set():
        health.beat()
        for i, child in enumerate(children):
            if not child.is_alive():
                log.warning("worker process %s exited with %s; restarting", child.pid, child.exitcode)
                _mark_dead(child.pid)
                for counter in restart_counters:
                    counter.inc()
                health.restarted()
                if time.monotonic() - started[i] < 1.0:
                    time.sleep(1.0)  # do not spin on a child that dies at start-up
                children[i], started[i] = spawn(i), time.monotonic()
        alive = sum(c.is_alive() for c in children)
        for gauge in alive_gauges:
            gauge.set(alive)
        stop.wait(0.5)
    log.info("%s: draining %d worker processes (up to %s s)", received[0] if received else "stop requested",
             sum(c.is_alive() for c in children), drain_timeout)
    drain_started = time.monotonic()
    for child in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.error("worker process %s did not drain in %s s; killing it", child.pid, drain_timeout)
            child.kill()
            child.join()
        _mark_dead(child.pid)
        health.beat()
    log.info("worker processes drained in %.1f s", time.monotonic() - drain_started)
    if server is not None:
        server.shutdown()
        server.server_close()
    exit_code = 0
    log.info("worker supervisor %d exiting with code %d", os.getpid(), exit_code)
    return exit_code


def _mark_dead(pid: int | None) -> None:
    """Forget a dead child's live gauges (in flight): multiprocess mode would keep exporting them."""
    if pid:
        from .metrics import multiprocess_active

        if multiprocess_active():
            from prometheus_client import multiprocess as prom_mp

            prom_mp.mark_process_dead(pid)
