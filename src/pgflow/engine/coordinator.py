"""The coordinator: expands DAGs. It consumes wake-ups (an instance started, a step ended), decides which
steps became ready and pushes them onto their pgmq queues, fans maps out and in, and finishes or fails
instances; control-flow workflows are advanced by the tree evaluator (:mod:`.tree`), and upkeep is done by
:mod:`.maintenance`.

Several coordinators may run at once: wake-ups are claimed with SKIP LOCKED and each instance is locked
(FOR NO KEY UPDATE) while it is evaluated, so every decision is made once, against committed state. An
instance locked by someone else (a user's open transaction) is skipped and woken again shortly: the
coordinator never waits on a lock a user can hold. One instance's failure never stops the batch: a batch
that fails is evaluated again one instance at a time, and an instance that fails alone is failed with the
reason (its wake-up is gone), so poison never stops the coordinator.

The decisions themselves are pure functions of what was read (:func:`ready_steps`, :func:`map_elements`,
:func:`step_failures`, :func:`map_outcomes`, :func:`is_complete`); :class:`Coordinator` does the reading
and the writing around them.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from ..db.codec import dumps, json_arrays
from ..db.queries import Queries
from ..errors import DatabaseUnavailable
from ..flow import INPUT
from ..health import Health
from ..limits import task_headers
from ..metrics import flow_label, metrics
from ..shape import FlowShape, ShapeCache, StepShape
from ..statuses import InstanceStatus, StepStatus
from . import tree
from .loop import ConnectedLoop
from .maintenance import Maintenance
from .messages import task_message

log = logging.getLogger("pgflow.coordinator")
Q = Queries("coordinator")


# ---------------------------------------------------------------------------------------------- decisions

@dataclass
class DagInstance:
    """A DAG instance as one round sees it: its shape and the status of each step's row."""

    id: int
    shape: FlowShape
    input: Any
    variables: Any
    states: dict[str, str] = field(default_factory=dict)  # step -> status of its task_index -1 row
    owner: str | None = None


def step_failures(rows: Iterable[tuple[int, str, str, str | None]]) -> dict[int, str]:
    """The first failed step of each instance, from (instance, step, status, error) rows."""
    failures: dict[int, str] = {}
    for iid, step, status, error in rows:
        if status == StepStatus.FAILED:
            failures.setdefault(iid, f"step {step} failed: {error}")
    return failures


def map_outcomes(progress: Iterable[tuple[int, str, int, str | None]]
                 ) -> tuple[dict[int, str], list[tuple[int, str]]]:
    """From (instance, map step, unfinished tasks, first failed task) rows: the instances a failed task
    fails, and the maps whose tasks all completed (ready for fan-in)."""
    failures: dict[int, str] = {}
    finished: list[tuple[int, str]] = []
    for iid, step, unfinished, failure in progress:
        if failure:
            failures.setdefault(iid, f"step {failure}")
        elif unfinished == 0:
            finished.append((iid, step))
    return failures, finished


def ready_steps(instance: DagInstance) -> list[StepShape]:
    """Steps that have no row yet and whose dependencies have all completed."""
    states = instance.states
    return [step for step in instance.shape.steps.values()
            if step.name not in states and all(states.get(d) == StepStatus.COMPLETED for d in step.deps)]


def map_elements(step: StepShape, value: Any) -> tuple[list[Any], str | None]:
    """The elements a map fans out over, or an error message when the value is not a list (of lists)."""
    source = "the flow input" if step.over == INPUT else f"step {step.over}'s output"
    if not isinstance(value, list):
        return [], f"step {step.name} maps over {source}, which is {type(value).__name__}, not a list"
    if not step.flatten:
        return value, None
    if not all(isinstance(v, list) for v in value):
        return [], f"step {step.name} flattens {source}, which is not a list of lists"
    return [x for inner in value for x in inner], None


def is_complete(instance: DagInstance) -> bool:
    """Every step of the instance has completed."""
    return all(instance.states.get(s) == StepStatus.COMPLETED for s in instance.shape.steps)


def completion(instance: DagInstance) -> dict[str, Any]:
    """How a complete instance's output is made: one terminal step gives its output, several an object."""
    terminal = instance.shape.terminal
    return {"id": instance.id, "terminal": list(terminal), "single": len(terminal) == 1}


@dataclass
class Writes:
    """The tasks and map rows one evaluation round decided, written with one statement per kind."""

    tasks: dict[str, list[tuple[int, str, int, dict, dict | None]]] = field(
        default_factory=lambda: defaultdict(list))
    map_parents: list[tuple[int, str, str, str]] = field(default_factory=list)
    limits: dict[str, dict] = field(default_factory=dict)  # limits declared in code that tasks consume

    def enqueue(self, queue: str, instance_id: int, step: str, task_index: int, message: dict,
                headers: dict | None = None) -> None:
        self.tasks[queue].append((instance_id, step, task_index, message, headers))

    def drop_instances(self, instance_ids: Iterable[int]) -> None:
        """Forget what was decided for instances that have just failed."""
        gone = set(instance_ids)
        for queue in self.tasks:
            self.tasks[queue] = [t for t in self.tasks[queue] if t[0] not in gone]
        self.map_parents = [m for m in self.map_parents if m[0] not in gone]

    def flush(self, conn: psycopg.Connection) -> None:
        define_limits(conn, self.limits)
        if self.map_parents:
            ids, steps, statuses, queues = zip(*self.map_parents, strict=True)
            Q.execute(conn, "insert_map_parents", {"ids": list(ids), "steps": list(steps),
                                                   "statuses": list(statuses), "queues": list(queues)})
        for queue, tasks in self.tasks.items():
            if not tasks:
                continue
            for part, messages in json_arrays([dumps(t[3]) for t in tasks]):
                headers = [t[4] for t in tasks[part]]
                Q.execute(conn, "enqueue_tasks", {
                    "queue": queue,
                    "instance_ids": [t[0] for t in tasks[part]],
                    "steps": [t[1] for t in tasks[part]],
                    "tasks": [t[2] for t in tasks[part]],
                    "messages": messages,
                    "headers": dumps([h or {} for h in headers]) if any(headers) else None,
                })
        self.tasks.clear()
        self.map_parents.clear()


_DEFINED_LIMITS: dict[str, dict] = {}  # limits this process has written to pgflow.limits (as declared)


def define_limits(conn: psycopg.Connection, limits: dict[str, dict]) -> None:
    """Write the limits that steps declare in code before their first tasks are enqueued (once per
    process and definition; a limit named by a string only is defined in SQL)."""
    new = [spec for name, spec in limits.items() if len(spec) > 1 and _DEFINED_LIMITS.get(name) != spec]
    if new:
        Q.execute(conn, "define_limits", {"limits": dumps(new)})
        _DEFINED_LIMITS.update((spec["name"], spec) for spec in new)
    limits.clear()


def claim_headers(writes: Writes, step: StepShape, inst: DagInstance, item: Any = None) -> dict | None:
    """The headers of one task of ``step``: its priority and the limit it consumes (and its key)."""
    if step.limit is not None:
        writes.limits[step.limit["name"]] = step.limit
    elif not step.priority:
        return None
    return task_headers(step.limit, step.limit_key, step.priority, {INPUT: inst.input, "item": item})


def map_tasks(step: StepShape, items: list[Any]) -> list[tuple[int, Any]]:
    """(task index, element) of a map's tasks; a batched map's task holds a slice, indexed by the position
    of its first element (so the fan-in orders outputs by task index)."""
    if not step.batch_size:
        return list(enumerate(items))
    size = step.batch_size
    return [(start, items[start:start + size]) for start in range(0, len(items), size)]


@dataclass
class MapQuotas:
    """An owner's map quotas in one fan-out (None: no limit): the widest map and the tasks it may have on
    queues at once (``queued``: how many it has, counting the maps admitted so far; ``counted_at``: when the
    count it started from was taken, on the monotonic clock)."""

    width: int | None
    depth: int | None
    queued: int
    counted_at: float = 0.0
    admitted: int = 0  # tasks of the maps admitted in this fan-out (not on the queues yet)

    def admit(self, owner: str, step: str, elements: int, tasks: int) -> str | None:
        """Why a map of ``elements`` elements in ``tasks`` tasks is refused, or None (then it counts)."""
        if self.width is not None and elements > self.width:
            return (f"step {step} maps over {elements:,} elements, over role {owner}'s quota of {self.width:,} "
                    "(pgflow.set_quota)")
        if self.depth is not None and self.queued + tasks > self.depth:
            return (f"step {step} would queue {tasks:,} tasks while role {owner} has {self.queued:,} on queues, "
                    f"over its queue-depth quota of {self.depth:,} tasks (pgflow.set_quota)")
        self.queued += tasks
        self.admitted += tasks
        return None

    def recount(self, queued: int, counted_at: float) -> None:
        """Start again from a fresh count of the tasks on queues (the maps admitted so far still count)."""
        self.queued, self.counted_at = queued + self.admitted, counted_at


class QueuedCounts:
    """Each owner's tasks on queues, as last counted, for the queue-depth quota. Counting runs over the
    owner's whole backlog (up to its quota: 16 ms per fan-out batch at 60,000 queued tasks, about a quarter
    of a second at the default quota of 1,000,000), so a count is reused for ``ttl`` seconds to admit maps,
    plus what this coordinator queued since. A map the reused count would refuse is decided on a fresh
    count: a refusal never rests on an old one. A second coordinator's maps are seen at the next count."""

    def __init__(self, ttl: float = 2.0) -> None:
        self.ttl = ttl
        self._counts: dict[str, tuple[int, float]] = {}  # owner -> (queued, counted_at)

    def reusable(self, owner: str, now: float) -> tuple[int, float] | None:
        """The owner's last count and when it was taken, if it is recent enough to admit maps by."""
        count = self._counts.get(owner)
        return count if count is not None and now - count[1] < self.ttl else None

    def keep(self, owner: str, quotas: MapQuotas) -> None:
        """Remember the owner's count after a fan-out (the maps it admitted included)."""
        self._counts[owner] = (quotas.queued, quotas.counted_at)


# ---------------------------------------------------------------------------------------------- the loop

REWAKE_DELAY = 0.5  # seconds before an instance locked by someone else is looked at again
ERROR_CHARS = 2000  # of an instance's failure reason, when the engine cannot run it


def decode(text: str | None) -> Any:
    """A jsonb column read as text (decoded per instance, inside its fault isolation)."""
    return None if text is None else orjson.loads(text)


class Coordinator(ConnectedLoop):
    """Runs the coordinator loop on one database. ``batch`` bounds the instances handled per transaction."""

    def __init__(self, dsn: str, *, batch: int = 500, maintenance_every: float = 10.0,
                 retention_seconds: float | None = 7 * 86400, stalled_after: float = 30.0,
                 vacuum_every: float = 2.0, vacuum_min_dead: int = 5000, health: Health | None = None) -> None:
        super().__init__(dsn)
        self.batch = batch
        self.health = health or Health()
        self.shapes = ShapeCache()
        self.maintenance = Maintenance(dsn, every=maintenance_every, retention_seconds=retention_seconds,
                                       stalled_after=stalled_after, vacuum_every=vacuum_every,
                                       vacuum_min_dead=vacuum_min_dead)
        self._finished: list[tuple[int, str, str, float]] = []  # completions of the round, counted once committed
        self._role: str | None = None  # the role the coordinator runs as (metrics name its flows)
        self.queued_counts = QueuedCounts()

    def run(self) -> None:
        """Run the loop until :meth:`stop`, with the vacuum thread beside it (``vacuum_every`` 0: none)."""
        if self.maintenance.vacuum_every > 0:
            threading.Thread(target=self.maintenance.vacuum_loop, args=(self.stop_event,), name="pgflow-vacuum",
                             daemon=True).start()
        super().run()

    def loop(self) -> None:
        round_duration = metrics().round_duration
        while not self.stop_event.is_set():
            self.health.beat()
            started = time.perf_counter()
            handled = self.process_batch()
            if handled:
                round_duration.observe(time.perf_counter() - started)
            self.maintenance.maybe_run(self._conn)
            if handled == 0:
                self._wait()

    def waiting_for_database(self) -> None:
        self.health.beat()

    def on_connect(self) -> None:
        Q.execute(self._listen, "listen")
        self._role = self._conn.info.user

    def _wait(self) -> None:
        """Sleep until a NOTIFY or the next timed wake-up (at most one second, as a safety net)."""
        due = Q.value(self._conn, "next_wakeup_in")
        self.wait_for_notify(1.0 if due is None else max(0.0, min(1.0, float(due))))

    # ------------------------------------------------------------------------------------------ one round

    def process_batch(self) -> int:
        """Evaluate one batch of woken instances in one transaction; returns how many wake-ups it took."""
        conn = self._conn
        try:
            with conn.transaction():
                woken = [r[0] for r in Q.all(conn, "claim_wakeups", {"limit": self.batch})]
                if not woken:
                    return 0
                ids = sorted(set(woken))
                rows = Q.all(conn, "lock_instances", {"ids": ids})
                skipped = set(ids) - {r[0] for r in rows}
                if skipped:
                    Q.execute(conn, "rewake_skipped", {"ids": sorted(skipped), "delay": REWAKE_DELAY})
                if rows:
                    self._evaluate_isolated(conn, rows)
        except BaseException:
            self._finished.clear()  # rolled back: counted when done again
            raise
        self._count_finished()
        return len(woken)

    def _evaluate_isolated(self, conn: psycopg.Connection, rows: list[tuple]) -> None:
        """Evaluate ``rows`` in a savepoint; when that fails, evaluate them one at a time, and fail an
        instance that fails alone with the reason: nothing one instance holds (a malformed input, a
        shape the engine cannot run) stops the others or the coordinator."""
        finished = len(self._finished)
        try:
            with conn.transaction():
                self._evaluate(conn, rows)
            return
        except Exception as exc:
            if conn.broken or isinstance(exc, (*self.RETRYABLE, DatabaseUnavailable)):
                raise  # the connection or the transaction as a whole: the batch is retried
            del self._finished[finished:]
            if len(rows) == 1:
                self._poisoned(conn, rows[0][0], rows[0][1], exc)
                return
            log.warning("a batch of %d instances failed (%s: %s); evaluating them one at a time", len(rows),
                        type(exc).__name__, str(exc).strip()[:200])
        for row in rows:
            self._evaluate_isolated(conn, [row])

    def _poisoned(self, conn: psycopg.Connection, iid: int, flow: str, exc: Exception) -> None:
        """Fail an instance the engine cannot run, with the reason (its wake-up is already consumed)."""
        log.warning("instance %s: cannot evaluate it: %s: %s", iid, type(exc).__name__, str(exc).strip()[:500],
                    extra={"instance_id": iid, "flow": flow})
        reason = f"cannot run this instance: {type(exc).__name__}: {str(exc).strip()}"[:ERROR_CHARS]
        try:
            with conn.transaction():
                self._fail(conn, {iid: reason})
        except Exception as again:
            if conn.broken or isinstance(again, (*self.RETRYABLE, DatabaseUnavailable)):
                raise
            log.error("instance %s: cannot even fail it (%s); the safety net will try again", iid, again,
                      extra={"instance_id": iid})

    def _evaluate(self, conn: psycopg.Connection, rows: list[tuple]) -> None:
        dags: dict[int, DagInstance] = {}
        trees: list[DagInstance] = []
        for iid, flow, version, _status, input_, variables, owner in rows:
            try:
                shape = self.shapes.get(conn, flow, version)
            except LookupError as exc:
                self._fail(conn, {iid: str(exc)})
                continue
            instance = DagInstance(iid, shape, decode(input_), decode(variables), owner=owner)
            if shape.tree is not None:
                trees.append(instance)
            else:
                dags[iid] = instance
        pending = [r[0] for r in rows if r[3] == InstanceStatus.PENDING]
        if pending:
            Q.execute(conn, "mark_started", {"ids": pending})
        if trees:
            self._evaluate_trees(conn, trees)
        if dags:
            self._evaluate_dags(conn, dags)

    def _evaluate_dags(self, conn: psycopg.Connection, instances: dict[int, DagInstance]) -> None:
        states = Q.all(conn, "step_states", {"ids": list(instances)})
        for iid, step, status, _error in states:
            instances[iid].states[step] = status
        failures = step_failures(states)
        mapping = [i for i, inst in instances.items() if StepStatus.MAPPING in inst.states.values()]
        map_failures, finished_maps = map_outcomes(Q.all(conn, "map_progress", {"ids": mapping}) if mapping else [])
        for iid, error in map_failures.items():
            failures.setdefault(iid, error)
        self._fail(conn, failures)
        for iid in failures:
            instances.pop(iid, None)
        self._finish_maps(conn, [(iid, step) for iid, step in finished_maps if iid in instances], instances)
        self._schedule(conn, instances)
        self._complete(conn, instances)

    def _finish_maps(self, conn: psycopg.Connection, finished: list[tuple[int, str]],
                     instances: dict[int, DagInstance]) -> None:
        """Fan-in: a map whose tasks all completed gets the ordered list of their outputs."""
        if not finished:
            return
        Q.execute(conn, "finish_maps", {"ids": [f[0] for f in finished], "steps": [f[1] for f in finished],
                                        "batched": [bool(instances[f[0]].shape.steps[f[1]].batch_size)
                                                    for f in finished]})
        for iid, step in finished:
            instances[iid].states[step] = StepStatus.COMPLETED

    def _schedule(self, conn: psycopg.Connection, instances: dict[int, DagInstance]) -> None:
        """Push every step whose dependencies are complete; repeat while empty maps complete instantly."""
        todo = dict(instances)
        while todo:
            writes = Writes()
            maps: list[tuple[DagInstance, StepShape]] = []
            for inst in todo.values():
                for step in ready_steps(inst):
                    if step.is_map:
                        maps.append((inst, step))
                        continue
                    writes.enqueue(step.queue, inst.id, step.name, -1,
                                   task_message(inst.shape.name, inst.shape.version, inst.id, step.name),
                                   claim_headers(writes, step, inst))
                    inst.states[step.name] = StepStatus.QUEUED
                    log.debug("instance %s: step %s queued", inst.id, step.name, extra={
                        "instance_id": inst.id, "flow": inst.shape.name, "step": step.name, "queue": step.queue})
            again = self._fan_out(conn, maps, writes, instances)
            writes.flush(conn)
            todo = {iid: instances[iid] for iid in again if iid in instances}

    def _fan_out(self, conn: psycopg.Connection, maps: list[tuple[DagInstance, StepShape]], writes: Writes,
                 instances: dict[int, DagInstance]) -> set[int]:
        """Create one task per element for each ready map. Returns instances to look at again (a map over
        an empty list completes at once, which may make its dependents ready)."""
        if not maps:
            return set()
        wanted = [(inst.id, step.over) for inst, step in maps if step.over != INPUT]
        outputs: dict[tuple[int, str], Any] = {}
        if wanted:
            rows = Q.all(conn, "step_outputs", {"ids": [w[0] for w in wanted], "steps": [w[1] for w in wanted]})
            outputs = {(iid, step): output for iid, step, output in rows}
        again: set[int] = set()
        failures: dict[int, str] = {}
        now = time.monotonic()
        quotas = self._map_quotas(conn, sorted({inst.owner for inst, _ in maps}), now)
        for inst, step in maps:
            items = inst.input if step.over == INPUT else outputs.get((inst.id, step.over))
            items, problem = map_elements(step, items)
            tasks = [] if problem else map_tasks(step, items)
            quota = quotas.get(inst.owner)
            if not problem and quota is not None:
                problem = quota.admit(inst.owner, step.name, len(items), len(tasks))
                if problem and quota.counted_at < now:  # refused by a reused count: count afresh
                    quota.recount(*self._count_queued(conn, {inst.owner: quota.depth})[inst.owner])
                    problem = quota.admit(inst.owner, step.name, len(items), len(tasks))
            if problem:
                failures.setdefault(inst.id, problem)
                continue
            if not items:
                writes.map_parents.append((inst.id, step.name, StepStatus.COMPLETED, step.queue))
                inst.states[step.name] = StepStatus.COMPLETED
                again.add(inst.id)
                continue
            writes.map_parents.append((inst.id, step.name, StepStatus.MAPPING, step.queue))
            inst.states[step.name] = StepStatus.MAPPING
            log.debug("instance %s: map step %s fans out into %d tasks", inst.id, step.name, len(items), extra={
                "instance_id": inst.id, "flow": inst.shape.name, "step": step.name, "queue": step.queue})
            for index, item in tasks:
                writes.enqueue(step.queue, inst.id, step.name, index,
                               task_message(inst.shape.name, inst.shape.version, inst.id, step.name, index, item),
                               claim_headers(writes, step, inst, item[0] if step.batch_size else item))
        for owner, quota in quotas.items():
            if quota.depth is not None:
                self.queued_counts.keep(owner, quota)
        if failures:
            self._fail(conn, failures)
            for iid in failures:
                instances.pop(iid, None)
            writes.drop_instances(failures)
        return again

    def _map_quotas(self, conn: psycopg.Connection, owners: list[str], now: float) -> dict[str, MapQuotas]:
        """The owners' map quotas, each with its tasks on queues: a recent count (QueuedCounts) when there
        is one, else counted now (``counted_at`` = ``now``)."""
        limits = {o: (width, depth) for o, width, depth in Q.all(conn, "map_quotas", {"owners": owners})}
        reused = {o: self.queued_counts.reusable(o, now) for o, (_, depth) in limits.items() if depth is not None}
        counted = self._count_queued(conn, {o: limits[o][1] for o, count in reused.items() if count is None}, now)
        return {o: MapQuotas(width, depth, *(reused.get(o) or counted.get(o) or (0, now)))
                for o, (width, depth) in limits.items()}

    def _count_queued(self, conn: psycopg.Connection, depths: dict[str, int],
                      now: float | None = None) -> dict[str, tuple[int, float]]:
        """How many tasks each owner has on queues (counted up to one past its quota ``depths[owner]``),
        and when they were counted."""
        if not depths:
            return {}
        at = time.monotonic() if now is None else now
        owners = sorted(depths)
        rows = Q.all(conn, "queued_tasks", {"owners": owners, "depths": [depths[o] for o in owners]})
        return {o: (n, at) for o, n in rows}

    def _complete(self, conn: psycopg.Connection, instances: dict[int, DagInstance]) -> None:
        done = [completion(inst) for inst in instances.values() if is_complete(inst)]
        if not done:
            return
        for iid, flow, owner, seconds in Q.all(conn, "complete_instances", {"done": dumps(done)}):
            self._completed(iid, flow, owner, seconds)

    def _evaluate_trees(self, conn: psycopg.Connection, trees: list[DagInstance]) -> None:
        """Control-flow workflows: read their rows and signals, evaluate each tree, write its decisions,
        then finish or fail the instances that are done."""
        now = tree.now(conn)
        rows, signals = tree.read_states(conn, [inst.id for inst in trees])
        writes = Writes()
        failures: dict[int, str] = {}
        for inst in trees:
            state = tree.TreeState(inst.id, inst.shape.name, inst.shape.version, inst.input, inst.variables,
                                   inst.shape.steps, now, rows[inst.id], signals[inst.id])
            try:
                evaluation = tree.evaluate(state, inst.shape.tree)
                with conn.transaction():  # a savepoint: a failure undoes this instance's writes only
                    for leaf in tree.apply(conn, inst.id, evaluation.decisions):
                        writes.enqueue(leaf.queue, inst.id, leaf.step, -1, leaf.message)
                result = evaluation.result
            except psycopg.OperationalError:
                raise  # connection trouble: the whole batch is retried
            except Exception as exc:  # a workflow the engine cannot run fails alone, never the coordinator
                log.exception("instance %s: cannot evaluate its workflow", inst.id,
                              extra={"instance_id": inst.id, "flow": inst.shape.name})
                result = tree.Result("failed", error=f"cannot run this workflow: {type(exc).__name__}: {exc}")
            if result.status == "failed":
                failures[inst.id] = result.error
            elif result.done:
                seconds = Q.value(conn, "complete_tree_instance", {"id": inst.id, "output": dumps(result.output)})
                self._completed(inst.id, inst.shape.name, inst.owner, seconds)
        writes.drop_instances(failures)
        writes.flush(conn)
        self._fail(conn, failures)

    def _completed(self, iid: int, flow: str, owner: str, seconds: float) -> None:
        self._finished.append((iid, flow, flow_label(flow, owner, self._role), seconds))

    def _count_finished(self) -> None:
        """Metrics and logs of the round's completions, once they are committed (a savepoint rolled back
        for fault isolation drops its completions, which are then done again)."""
        m = metrics()
        for iid, flow, label, seconds in self._finished:
            m.instance_duration.labels(label).observe(seconds)
            m.instances_finished.labels(label, InstanceStatus.COMPLETED).inc()
            log.debug("instance %s of flow %s completed in %.3f s", iid, flow, seconds,
                      extra={"instance_id": iid, "flow": flow})
        self._finished.clear()

    def _fail(self, conn: psycopg.Connection, failures: dict[int, str]) -> None:
        """Fail instances for good: stored error, open steps cancelled, waiters notified."""
        if not failures:
            return
        ids = list(failures)
        failed = Q.all(conn, "fail_instances", {"ids": ids, "errors": [failures[i] for i in ids]})
        Q.execute(conn, "cancel_open_steps", {"ids": ids})
        Q.execute(conn, "notify_done", {"ids": ids})
        outcomes = metrics().instances_finished
        for iid, flow, owner, error in failed:
            outcomes.labels(flow_label(flow, owner, self._role), InstanceStatus.FAILED).inc()
            log.warning("instance %s of flow %s failed: %s", iid, flow, error,
                        extra={"instance_id": iid, "flow": flow})


def run_coordinator(dsn: str, **options: Any) -> None:
    """Run a coordinator in this process until SIGTERM/SIGINT (used by ``pgflow coordinator``)."""
    coordinator = Coordinator(dsn, **options)
    signal.signal(signal.SIGTERM, coordinator.stop)
    signal.signal(signal.SIGINT, coordinator.stop)
    coordinator.run()
