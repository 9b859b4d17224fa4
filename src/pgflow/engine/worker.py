"""The worker loop: read and claim a batch of tasks, run each with its runner, acknowledge it.

A batch is read and claimed in one statement (``pgflow.read_tasks``: the messages are hidden for the
visibility timeout and their steps marked running with a new attempt), so a batch costs two round trips:
read-and-claim, then one acknowledgement for its Python and HTTP tasks.

The acknowledgement of a task (its output, status and attempt, the message's deletion and a wake-up for
the coordinator) is one transaction. A SQL step runs inside that same transaction, so its effect lands
exactly once; a Python step runs before it, so it runs at least once and gets a stable
``ctx.idempotency_key``. Python acknowledgements are batched (one transaction for many tasks); messages
of long steps have their visibility timeout extended by a heartbeat thread.

Messages that are not well-formed, or name no instance or step, are poison: they are dead-lettered
(archived, with the reason in ``pgflow.dead_letters``), never run, and never stop the worker.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import traceback
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .. import logs, settings, tracing
from ..context import redacted, resolve_secrets
from ..db.codec import dumps, json_arrays
from ..db.connection import connect
from ..db.queries import Queries
from ..errors import NonRetryableError, NotSerializable, PayloadTooLarge
from ..limits import RateLimited
from ..metrics import Health, flow_label, metrics
from ..queues import channel, ensure_queue, queue_names
from ..shape import FlowShape, ShapeCache, StepShape
from . import batches
from .loop import ConnectedLoop
from .messages import TaskMessage, decode, log_fields
from .rights import RightsCache
from .runners import http, python
from .runners.sql import SqlRunner
from .task import ClaimedTask, task_arrays

log = logging.getLogger("pgflow.worker")
Q = Queries("worker")

Labels = tuple[str, str, str]  # the flow, step and queue labels of a task's metrics
Read = tuple[int, Any, TaskMessage]  # a well-formed message read: msg_id, body, what it names


def backoff_seconds(step: StepShape, attempt: int) -> float:
    """Exponential backoff with "equal jitter": between half and all of min(cap, base * 2^(attempt-1))."""
    delay = min(step.backoff_cap, step.backoff_base * 2 ** (attempt - 1))
    return random.uniform(delay / 2, delay)


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


def secret_values(task: ClaimedTask) -> list[str]:
    """The values of the secrets granted to a task's owner (to redact them from what is stored)."""
    values = []
    for name, ref in (task.secret_refs or {}).items():
        with contextlib.suppress(NonRetryableError):
            values += resolve_secrets({name: ref}).values()
    return values


def step_session_options(dsn: str) -> str:
    """The startup options of the SQL step session: the DSN's own plus the engine's session settings (set
    at startup, so the reset after each step (RESET ALL) returns to them)."""
    own = conninfo_to_dict(dsn).get("options") or ""
    engine = (f"-c synchronous_commit={settings.current().synchronous_commit} "
              "-c plan_cache_mode=force_custom_plan")
    return f"{own} {engine}".strip()


def complete(conn: psycopg.Connection, queue: str, tasks: list[ClaimedTask], outputs: str,
             columns: list[str | None] | None) -> None:
    """Checkpoint finished tasks: outputs (a JSON array text) and statuses, messages deleted, one statement."""
    Q.execute(conn, "complete_tasks", {"queue": queue, **task_arrays(tasks), "outputs": outputs, "columns": columns})


class _Acks:
    """Completed Python and HTTP tasks waiting to be checkpointed together."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.done: list[tuple[ClaimedTask, str, Labels]] = []
        self.since = 0.0

    def add(self, task: ClaimedTask, payload: str, labels: Labels) -> None:
        if not self.done:
            self.since = time.monotonic()
        self.done.append((task, payload, labels))

    def due(self, interval: float) -> bool:
        return bool(self.done) and time.monotonic() - self.since >= interval

    def flush(self, conn: psycopg.Connection) -> None:
        if not self.done:
            return
        for part, outputs in json_arrays([p for _, p, _ in self.done]):
            complete(conn, self.queue, [t for t, _, _ in self.done[part]], outputs, None)
        completed = metrics().completed
        for _, _, labels in self.done:
            completed.labels(*labels).inc()
        self.done.clear()


class ServedQueues:
    """The queues a worker serves: the fixed ones, or every pgflow queue (re-read every few seconds, so a
    new flow's queue is found), each LISTENed to for the coordinator's "new messages" notifications."""

    REREAD_SECONDS = 5.0

    def __init__(self, fixed: list[str] | None) -> None:
        self.fixed = list(fixed) if fixed else None
        self._names: list[str] = []
        self._listening: set[str] = set()
        self._read_at = 0.0

    def on_connect(self, conn: psycopg.Connection) -> None:
        """A new session: create the fixed queues (a worker may start before any flow names them), and
        listen again."""
        for name in self.fixed or ():
            ensure_queue(conn, name)
        self._listening = set()
        self._read_at = 0.0

    def names(self, conn: psycopg.Connection, listen: psycopg.Connection) -> list[str]:
        now = time.monotonic()
        if now - self._read_at > self.REREAD_SECONDS:
            self._read_at = now
            self._names = self.fixed or queue_names(conn)
            for name in self._names:
                if name not in self._listening:
                    listen.execute(Q.composed("listen", channel=channel(name)))
                    self._listening.add(name)
        return self._names


class Heartbeat:
    """Extends the visibility timeout of the messages a worker holds, from a thread and a connection of
    its own, so a long step's message is not delivered again while it runs."""

    def __init__(self, dsn: str, visibility_timeout: int) -> None:
        self.dsn = dsn
        self.visibility_timeout = visibility_timeout
        self._held: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # the worker's loop has returned: the heartbeat may stop too

    def start(self) -> None:
        threading.Thread(target=self._beat, name="pgflow-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def hold(self, queue: str, msg_ids: set[int]) -> None:
        """The messages of ``queue`` the worker now holds (replacing the batch before)."""
        with self._lock:
            self._held[queue] = msg_ids

    def _beat(self) -> None:
        conn = None
        while not self._stopped.wait(self.visibility_timeout / 3):  # beats on while draining
            with self._lock:
                snapshot = {name: list(ids) for name, ids in self._held.items() if ids}
            if not snapshot:
                continue
            try:
                if conn is None or conn.closed:
                    conn = connect(self.dsn, autocommit=True)
                for name, ids in snapshot.items():
                    Q.execute(conn, "extend_visibility", {"queue": name, "msg_ids": ids,
                                                          "vt": self.visibility_timeout})
            except Exception as exc:  # the main loop deals with outages; just try again next beat
                log.debug("heartbeat failed: %s", exc)
                conn = None


class ReadSizes:
    """How many tasks to read from each queue at once. A batch read saves round trips for short tasks, but
    the tasks a worker has read wait for it while other workers may be idle: twenty one-second tasks held by
    one worker are twenty seconds of tail. So a worker reads about ``prefetch_seconds`` of work (by the
    recent time per task on that queue), at least one task and at most ``batch_size``."""

    def __init__(self, batch_size: int, prefetch_seconds: float = 0.25) -> None:
        self.batch_size = batch_size
        self.prefetch_seconds = prefetch_seconds
        self._per_task: dict[str, float] = {}  # queue -> moving average of seconds per task

    def size(self, queue: str) -> int:
        per_task = self._per_task.get(queue)
        if not per_task:
            return self.batch_size
        return max(1, min(self.batch_size, int(self.prefetch_seconds / per_task)))

    def observe(self, queue: str, tasks: int, seconds: float) -> None:
        """Record that ``tasks`` tasks of ``queue`` took ``seconds`` to run."""
        if tasks > 0:
            sample = seconds / tasks
            previous = self._per_task.get(queue)
            self._per_task[queue] = sample if previous is None else (previous + sample) / 2


class Worker(ConnectedLoop):
    """One worker process's loop: read a batch, claim it, run it, acknowledge it."""

    def __init__(self, dsn: str, queues: list[str] | None = None, *, batch_size: int = 20,
                 visibility_timeout: int = 30, poll_interval: float = 1.0, ack_interval: float = 0.05,
                 health: Health | None = None) -> None:
        super().__init__(dsn)
        self.queues = ServedQueues(queues)
        self.read_sizes = ReadSizes(batch_size)
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.ack_interval = ack_interval
        self.health = health or Health()
        self.shapes = ShapeCache()
        self.python = python.PythonRunner()
        self.sql = SqlRunner(dsn, step_session_options(dsn))
        self.rights = RightsCache()
        self.tracer = tracing.step_tracer()  # None unless OpenTelemetry is set up in this process
        self.heartbeat = Heartbeat(dsn, visibility_timeout)

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> None:
        """Work until :meth:`stop` (then finish the step in hand and give back the rest)."""
        self.heartbeat.start()
        try:
            super().run()
        finally:
            self.heartbeat.stop()

    def loop(self) -> None:
        while not self.stop_event.is_set():
            self.health.beat()
            got = 0
            for name in self.queues.names(self._conn, self._listen):
                if self.stop_event.is_set():
                    break
                messages, claimed = self._read(name)
                if messages:
                    got += len(messages)
                    self.process(name, messages, claimed)
            if got == 0 and not self.stop_event.is_set():
                self.wait_for_notify(self._idle_seconds())

    def waiting_for_database(self) -> None:
        self.health.beat()

    def _idle_seconds(self) -> float:
        """How long to wait for a notification: the poll interval, or less when a task that a limit parked
        comes due sooner (nothing announces that moment)."""
        due = Q.value(self._conn, "next_parked_in", {"queues": self.queues.names(self._conn, self._listen)})
        return self.poll_interval if due is None else min(self.poll_interval, float(due))

    def on_connect(self) -> None:
        self.sql.on_connect(self._conn)
        self.queues.on_connect(self._conn)

    def _close(self) -> None:
        super()._close()
        self.sql.close()

    # ------------------------------------------------------------------------------------------ batch

    def _read(self, queue: str) -> tuple[list[tuple[int, Any]], dict[int, dict] | None]:
        """Read a batch and claim its tasks in one round trip. Returns the messages read and the claimed
        rows by message id; if the claim fails as a whole (nothing was read then), reads alone and returns
        None for the claimed rows: :meth:`process` claims them one by one and dead-letters what fails."""
        try:
            rows = Q.all(self._conn, "read_tasks", {"queue": queue, "vt": self.visibility_timeout,
                                                    "qty": self.read_sizes.size(queue)}, row_factory=dict_row)
        except psycopg.Error:
            if self._conn.broken or self._conn.closed:
                raise
            read = Q.all(self._conn, "read_messages", {"queue": queue, "vt": self.visibility_timeout,
                                                       "qty": self.read_sizes.size(queue)})
            return [(msg_id, message) for msg_id, message in read], None
        claimed = {r["msg_id"]: r for r in rows if r["attempt"] is not None}
        waits = metrics().queue_wait.labels(queue)
        for row in claimed.values():
            if row["queue_wait"] is not None:
                waits.observe(row["queue_wait"])
        return [(r["msg_id"], r["message"]) for r in rows], claimed

    def process(self, queue: str, messages: list[tuple[int, Any]], claimed: dict[int, dict] | None = None) -> None:
        """Claim (unless ``claimed`` holds the rows already claimed, by message id), run and acknowledge
        one batch read from ``queue``."""
        conn = self._conn
        read: list[Read] = []
        for msg_id, body in messages:
            message = decode(body)
            if message is None:
                self._dead_letter(queue, msg_id, body, "not a pgflow task message (undecodable)")
            else:
                read.append((msg_id, body, message))
        if not read:
            return
        if claimed is None:
            claimed, rejected = self._claim(queue, read)
        else:  # pgflow.is_task_message claims exactly the messages decode accepts
            rejected = set()
        tasks = [ClaimedTask.from_claim(queue, claimed[msg_id], message) for msg_id, _, message in read
                 if msg_id in claimed]
        unclaimed = [r for r in read if r[0] not in claimed and r[0] not in rejected]
        if unclaimed:
            self._put_aside(queue, unclaimed)
        self.heartbeat.hold(queue, set(claimed))
        acks = _Acks(queue)
        bodies = {msg_id: body for msg_id, body, _ in read}
        started, ran = time.monotonic(), 0
        try:
            for index, task in enumerate(tasks):
                if self.stop_event.is_set():
                    acks.flush(conn)
                    Q.execute(conn, "release_tasks", {"queue": queue, **task_arrays(tasks[index:])})
                    break
                self._run_guarded(task, bodies[task.msg_id], acks)
                ran += 1
                if acks.due(self.ack_interval):
                    acks.flush(conn)
            acks.flush(conn)
            self.read_sizes.observe(queue, ran, time.monotonic() - started)
        finally:
            self.heartbeat.hold(queue, set())

    def _claim(self, queue: str, read: list[Read]) -> tuple[dict[int, dict], set[int]]:
        """Claim a batch. If the database rejects it, claim one by one and dead-letter the messages it
        rejects: one bad message can neither stop the worker nor take healthy ones down with it. Returns
        the claimed rows by message id and the ids of the dead-lettered messages."""
        try:
            return self._claim_batch(read), set()
        except psycopg.Error:
            if self._conn.broken or self._conn.closed:
                raise
        claimed: dict[int, dict] = {}
        rejected: set[int] = set()
        for one in read:
            try:
                claimed |= self._claim_batch([one])
            except psycopg.Error as exc:
                if self._conn.broken or self._conn.closed:
                    raise
                self._dead_letter(queue, one[0], one[1], f"cannot be claimed: {exc}".strip())
                rejected.add(one[0])
        return claimed, rejected

    def _claim_batch(self, read: list[Read]) -> dict[int, dict]:
        rows = Q.all(self._conn, "claim_tasks", {
            "msg_ids": [msg_id for msg_id, _, _ in read], "instance_ids": [m.instance_id for _, _, m in read],
            "steps": [m.step for _, _, m in read], "tasks": [m.task_index for _, _, m in read],
            "flows": [m.flow for _, _, m in read], "versions": [m.version for _, _, m in read],
        }, row_factory=dict_row)
        return {r["msg_id"]: r for r in rows}

    def _put_aside(self, queue: str, unclaimed: list[Read]) -> None:
        """Archive messages that cannot run. Those of a cancelled or finished instance are expected; those
        naming no instance or no step of the flow version are poison, recorded with the reason."""
        known = {msg_id: (instance, step) for msg_id, instance, step in Q.all(self._conn, "unclaimable", {
            "msg_ids": [msg_id for msg_id, _, _ in unclaimed], "instance_ids": [m.instance_id for _, _, m in unclaimed],
            "flows": [m.flow for _, _, m in unclaimed], "versions": [m.version for _, _, m in unclaimed],
            "steps": [m.step for _, _, m in unclaimed]})}
        expected = []
        for msg_id, body, message in unclaimed:
            has_instance, has_step = known[msg_id]
            if not has_instance:
                self._dead_letter(queue, msg_id, body, f"no instance {message.instance_id}")
            elif not has_step:
                self._dead_letter(queue, msg_id, body,
                                  f"flow {message.flow!r} version {message.version} has no step {message.step!r}")
            else:
                expected.append(msg_id)
        if expected:
            Q.execute(self._conn, "archive_messages", {"queue": queue, "msg_ids": expected})

    def _dead_letter(self, queue: str, msg_id: int, body: Any, reason: str) -> None:
        """Archive a message that can never run and record why in pgflow.dead_letters."""
        log.error("dead letter %s on %s: %s: %.200r", msg_id, queue, reason, body, extra=log_fields(queue, body))
        with self._conn.transaction():
            Q.execute(self._conn, "insert_dead_letter", {"queue": queue, "msg_id": msg_id, "message": Jsonb(body),
                                                         "reason": reason})
            Q.execute(self._conn, "archive_messages", {"queue": queue, "msg_ids": [msg_id]})
        metrics().dead_lettered.labels(queue).inc()

    # ------------------------------------------------------------------------------------------ one task

    def _run_guarded(self, task: ClaimedTask, body: Any, acks: _Acks) -> None:
        """Run one task; whatever it raises that is not a lost connection (a malformed shape, a bug
        tripped by a hostile message) makes it poison: its step fails with the reason, its message is
        dead-lettered, and the worker goes on with the rest of the batch."""
        try:
            self._run_task(task, acks)
        except Exception as exc:
            if isinstance(exc, psycopg.OperationalError) or (
                    isinstance(exc, psycopg.Error) and (self._conn.broken or self._conn.closed)):
                raise
            self._poison(task, body, f"cannot run: {type(exc).__name__}: {exc}", acks)

    def _poison(self, task: ClaimedTask, body: Any, reason: str, acks: _Acks) -> None:
        reason = redacted(" ".join(reason.split())[:2000], secret_values(task))
        try:
            acks.flush(self._conn)
            Q.execute(self._conn, "fail_task", {
                "queue": task.queue, "msg_id": task.msg_id, "instance_id": task.instance_id, "step": task.step,
                "task": task.task_index, "attempt": task.attempt, "error": reason, "traceback": None,
                "retry_in": None})
        except psycopg.Error as exc:
            if self._conn.broken or self._conn.closed:
                raise
            log.error("%s: cannot record its failure: %s", task.describe(), exc)
        self._dead_letter(task.queue, task.msg_id, body, reason)

    def _run_task(self, task: ClaimedTask, acks: _Acks) -> None:
        """Run one claimed task with its engine fields on every log line (a step's own lines too) and, when
        its instance is traced and this process traces, inside the task's span."""
        with logs.TaskFields(task.log_fields()):
            if self.tracer is not None and task.trace_context:
                with self.tracer.span(task):
                    self._run_claimed(task, acks)
            else:
                self._run_claimed(task, acks)

    def _run_claimed(self, task: ClaimedTask, acks: _Acks) -> None:
        shape = self.shapes.get(self._conn, task.flow, task.version)
        step = shape.steps.get(task.step)
        labels = (flow_label(shape.name, task.owner, self._conn.info.user), step_label(shape, step, task.step),
                  task.queue)
        m = metrics()
        m.started.labels(*labels).inc()  # also for tasks that fail before running, so failed <= started
        if step is None:
            self._record_failure(task, None, NonRetryableError(f"flow version has no step {task.step!r}"), labels,
                                 acks)
            return
        if task.attempt > step.max_attempts:
            self._record_failure(task, step, NonRetryableError(
                f"attempt {task.attempt} exceeds max_attempts={step.max_attempts}: earlier attempts were lost "
                "(worker killed, or visibility timeout expired)"), labels, acks)
            return
        in_flight = m.in_flight.labels(task.queue)
        in_flight.inc()
        started = time.perf_counter()
        try:
            self._dispatch(shape, step, task, acks, labels)
        except Exception as exc:
            if isinstance(exc, psycopg.Error) and (self._conn.broken or self._conn.closed):
                raise  # the connection is gone: the loop reconnects; the message comes back after its vt
            if not self._put_back(task, step, exc, labels):
                self._record_failure(task, step, exc, labels, acks)
        finally:
            in_flight.dec()
            m.step_duration.labels(*labels).observe(time.perf_counter() - started)

    def _dispatch(self, shape: FlowShape, step: StepShape, task: ClaimedTask, acks: _Acks, labels: Labels) -> None:
        """Run the task with the runner of its kind of step, and acknowledge it. The owner's rights are
        checked first (now, not only when the instance started), and its granted secrets given to the task."""
        rights = self.rights.get(self._conn, task.owner, fresh=step.kind == "http")
        rights.check(step.kind)
        task.secret_refs = rights.secrets
        scope, columns = task.values()
        batched = batches.is_batch(step, task)
        if step.limit is not None and step.cost is not None:
            cost = self.python.dag_step(task.flow, shape.ref, step.name).cost if step.cost == "function" else step.cost
            batches.charge(self._conn, step, cost, task, scope)
        if step.kind == "sql":
            acks.flush(self._conn)  # keep acknowledgements in order with the SQL step's transaction

            def acknowledge(session: psycopg.Connection, output: str, types: str | None) -> None:
                if batched:
                    batches.check_batch_sql_output(step, task, output)
                complete(session, task.queue, [task], f"[{output}]", [types])

            self.sql.run(self._conn, task, step, batches.task_values(task, scope), columns, acknowledge)
            metrics().completed.labels(*labels).inc()
            return
        try:
            if step.kind == "http":
                attempt = http.Attempt(str((step.spec or {}).get("method") or "GET"))
                try:
                    output = http.run(step, task, scope, attempt)
                finally:
                    self._audit(task, attempt)
            else:
                output = self.python.run(shape.ref, step, task, scope)
                if batched:
                    batches.check_batch_output(step, task, output)
            payload = dumps(output, f"output of step {step.name}")
        except (PayloadTooLarge, NotSerializable) as exc:
            raise NonRetryableError(str(exc)) from exc
        acks.add(task, payload, labels)

    def _audit(self, task: ClaimedTask, attempt: http.Attempt) -> None:
        """Record one HTTP attempt in pgflow.http_audit (its owner reads it; so do operators)."""
        try:
            Q.execute(self._conn, "insert_http_audit", {
                "owner": task.owner, "instance_id": task.instance_id, "step": task.step, "attempt": task.attempt,
                "method": attempt.method[:20], "host": attempt.host[:255] or "?", "address": attempt.address,
                "status": attempt.status, "error": attempt.error, "duration_ms": attempt.duration_ms})
        except psycopg.Error as exc:
            if self._conn.broken or self._conn.closed:
                raise
            log.error("%s: cannot record its HTTP attempt: %s", task.describe(), exc)

    def _put_back(self, task: ClaimedTask, step: StepShape | None, exc: BaseException, labels: Labels) -> bool:
        """A task told to wait (RateLimited, an HTTP 429) is parked without spending its attempt; a failing
        batch of a map with split_on_failure is bisected. True when the task was handled so."""
        if isinstance(exc, RateLimited):
            log.info("%s: rate limited, parked for %.3g s: %s", task.describe(), exc.retry_after, exc)
            batches.park(self._conn, task, exc.retry_after)
            return True
        if step is not None and step.split_on_failure and batches.is_batch(step, task) and \
                batches.split(self._conn, step, task):
            log.warning("%s: batch of %d failed (%s: %s); split in two", task.describe(), len(task.item),
                        type(exc).__name__, exc)
            metrics().retried.labels(*labels).inc()
            return True
        return False

    def _record_failure(self, task: ClaimedTask, step: StepShape | None, exc: BaseException, labels: Labels,
                        acks: _Acks) -> None:
        """Record a failed attempt: a retry later, or the step failed for good. The batch's tasks that
        completed before it are checkpointed first, so a failure that fails the instance does not leave
        them unrecorded (a retry of the instance would otherwise run them again)."""
        acks.flush(self._conn)
        permanent = step is None or isinstance(exc, NonRetryableError) or task.attempt >= step.max_attempts
        retry_in = None if permanent else backoff_seconds(step, task.attempt)
        secrets = secret_values(task)
        error = redacted(f"{type(exc).__name__}: {exc}", secrets)
        log.log(logging.ERROR if permanent else logging.WARNING, "%s: %s", task.describe(), error)
        if self.tracer is not None and task.trace_context:
            self.tracer.failed(exc, error, permanent)
        Q.execute(self._conn, "fail_task", {
            "queue": task.queue, "msg_id": task.msg_id, "instance_id": task.instance_id, "step": task.step,
            "task": task.task_index, "attempt": task.attempt, "error": error,
            "traceback": redacted("".join(traceback.format_exception(exc)), secrets), "retry_in": retry_in,
        })
        (metrics().failed if permanent else metrics().retried).labels(*labels).inc()
