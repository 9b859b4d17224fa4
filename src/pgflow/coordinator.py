"""The coordinator: expands DAGs. It consumes wake-ups (an instance started, a step ended), decides which
steps became ready and pushes them onto their pgmq queues, fans maps out and in, and finishes or fails
instances. It also runs maintenance: the stalled-instance safety net, retention and queue metrics.

Several coordinators may run at once: wake-ups are claimed with SKIP LOCKED and each instance is locked
(FOR UPDATE) while it is evaluated, so every decision is made once, against committed state.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from . import store, tree
from .errors import DatabaseUnavailable
from .flows import INPUT, FlowShape, StepShape
from .metrics import Health, metrics
from .queries import query
from .queue import task_message
from .tree import TreeRun

log = logging.getLogger("pgflow.coordinator")

INSTANCE_STATUSES = ("pending", "running", "completed", "failed", "cancelled")

class ShapeCache:
    """Flow versions are immutable, so their parsed shapes are cached for the life of the process."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[str, str], FlowShape] = {}

    def get(self, conn: psycopg.Connection, flow: str, version: str) -> FlowShape:
        key = (flow, version)
        if key not in self._shapes:
            row = conn.execute(query("flow_shape"), {"name": flow, "version": version}).fetchone()
            if row is None:
                raise LookupError(f"flow {flow!r} version {version} is not registered")
            self._shapes[key] = FlowShape.from_json(flow, version, row[0], row[1])
        return self._shapes[key]


@dataclass
class _Instance:
    id: int
    shape: FlowShape
    input: Any
    variables: Any
    states: dict[str, str] = field(default_factory=dict)  # step -> status of its task_index -1 row


@dataclass
class _Writes:
    """Everything one evaluation round decided, written with one statement per kind."""

    tasks: dict[str, list[tuple[int, str, int, dict]]] = field(default_factory=lambda: defaultdict(list))
    map_parents: list[tuple[int, str, str, str]] = field(default_factory=list)

    def enqueue(self, queue: str, instance_id: int, step: str, task_index: int, message: dict) -> None:
        self.tasks[queue].append((instance_id, step, task_index, message))

    def drop_instances(self, instance_ids: Any) -> None:
        """Forget what was decided for instances that have just failed."""
        gone = set(instance_ids)
        for queue in self.tasks:
            self.tasks[queue] = [t for t in self.tasks[queue] if t[0] not in gone]
        self.map_parents = [m for m in self.map_parents if m[0] not in gone]

    def flush(self, conn: psycopg.Connection) -> None:
        if self.map_parents:
            ids, steps, statuses, queues = zip(*self.map_parents, strict=True)
            conn.execute(query("insert_map_parents"), {"ids": list(ids), "steps": list(steps),
                                                       "statuses": list(statuses), "queues": list(queues)})
        for queue, tasks in self.tasks.items():
            if not tasks:
                continue
            for part, messages in store.json_arrays([store.dumps(t[3]) for t in tasks]):
                conn.execute(query("enqueue_tasks"), {
                    "queue": queue,
                    "instance_ids": [t[0] for t in tasks[part]],
                    "steps": [t[1] for t in tasks[part]],
                    "tasks": [t[2] for t in tasks[part]],
                    "messages": messages,
                })
        self.tasks.clear()
        self.map_parents.clear()


class Coordinator(store.ConnectedLoop):
    """Runs the coordinator loop on one database. ``batch`` bounds the instances handled per transaction."""

    def __init__(self, dsn: str, *, batch: int = 500, maintenance_every: float = 10.0,
                 retention_seconds: float | None = 7 * 86400, stalled_after: float = 30.0,
                 vacuum_every: float = 2.0, vacuum_min_dead: int = 5000, health: Health | None = None) -> None:
        super().__init__(dsn)
        self.batch = batch
        self.maintenance_every = maintenance_every
        self.vacuum_every = vacuum_every
        self.vacuum_min_dead = vacuum_min_dead
        self._vacuum_conn: psycopg.Connection | None = None
        self.retention_seconds = retention_seconds
        self.stalled_after = stalled_after
        self.health = health or Health()
        self.shapes = ShapeCache()
        self._next_maintenance = 0.0
        self._sampled_flows: set[str] = set()

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> None:
        """Run the loop until :meth:`stop`, with the vacuum thread beside it (``vacuum_every`` 0: none)."""
        if self.vacuum_every > 0:
            threading.Thread(target=self._vacuum_loop, name="pgflow-vacuum", daemon=True).start()
        super().run()

    def loop(self) -> None:
        round_duration = metrics().round_duration
        while not self.stop_event.is_set():
            self.health.beat()
            started = time.perf_counter()
            handled = self.process_batch()
            if handled:
                round_duration.observe(time.perf_counter() - started)
            self._maybe_maintain()
            if handled == 0:
                self._wait()

    def waiting_for_database(self) -> None:
        self.health.beat()

    def on_connect(self) -> None:
        self._listen.execute("LISTEN pgflow_coordinator")

    def _wait(self) -> None:
        """Sleep until a NOTIFY or the next timed wake-up (at most one second, as a safety net)."""
        due = self._conn.execute(query("next_wakeup_in")).fetchone()[0]
        timeout = 1.0 if due is None else max(0.0, min(1.0, float(due)))
        if timeout > 0:
            for _ in self._listen.notifies(timeout=timeout, stop_after=1):
                pass

    # ------------------------------------------------------------------------------------------ batch

    def process_batch(self) -> int:
        """Evaluate one batch of woken instances in one transaction; returns how many wake-ups it took."""
        conn = self._conn
        with conn.transaction():
            woken = [r[0] for r in conn.execute(query("claim_wakeups"), {"limit": self.batch}).fetchall()]
            if not woken:
                return 0
            ids = sorted(set(woken))
            rows = conn.execute(query("lock_instances"), {"ids": ids}).fetchall()
            if rows:
                self._evaluate(conn, rows)
        return len(woken)

    def _evaluate(self, conn: psycopg.Connection, rows: list[tuple]) -> None:
        instances: dict[int, _Instance] = {}
        trees: list[_Instance] = []
        for iid, flow, version, _status, input_, variables in rows:
            try:
                shape = self.shapes.get(conn, flow, version)
            except LookupError as exc:
                self._fail(conn, {iid: str(exc)})
                continue
            inst = _Instance(iid, shape, input_, variables)
            if shape.tree is not None:
                trees.append(inst)
            else:
                instances[iid] = inst
        pending = [r[0] for r in rows if r[3] == "pending"]
        if pending:
            conn.execute(query("mark_started"), {"ids": pending})
        if trees:
            self._evaluate_trees(conn, trees)
        ids = list(instances)
        if not ids:
            return
        failures: dict[int, str] = {}
        for iid, step, status, error in conn.execute(query("step_states"), {"ids": ids}).fetchall():
            instances[iid].states[step] = status
            if status == "failed":
                failures.setdefault(iid, f"step {step} failed: {error}")
        finished_maps = []
        mapping = [i for i in ids if "mapping" in instances[i].states.values()]
        progress = conn.execute(query("map_progress"), {"ids": mapping}).fetchall() if mapping else []
        for iid, step, unfinished, failure in progress:
            if failure:
                failures.setdefault(iid, f"step {failure}")
            elif unfinished == 0:
                finished_maps.append((iid, step))
        self._fail(conn, failures)
        for iid in failures:
            instances.pop(iid, None)
        self._finish_maps(conn, finished_maps, instances)
        self._schedule(conn, instances)
        self._complete(conn, instances)

    def _evaluate_trees(self, conn: psycopg.Connection, trees: list[_Instance]) -> None:
        """Control-flow workflows: walk each tree, then finish or fail the instances that are done."""
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        writes = _Writes()
        failures: dict[int, str] = {}
        for inst in trees:
            run = TreeRun(conn, inst.id, inst.shape.name, inst.shape.version, inst.input, inst.variables,
                          inst.shape.steps, now, writes.enqueue)
            try:
                with conn.transaction():  # a savepoint: a failure undoes this instance's writes only
                    result = run.evaluate(inst.shape.tree)
            except psycopg.OperationalError:
                raise  # connection trouble: the whole batch is retried
            except Exception as exc:  # a workflow the engine cannot run fails alone, never the coordinator
                log.exception("instance %s: cannot evaluate its workflow", inst.id,
                              extra={"instance_id": inst.id, "flow": inst.shape.name})
                result = tree.Result("failed", error=f"cannot run this workflow: {type(exc).__name__}: {exc}")
            if result.status == "failed":
                failures[inst.id] = result.error
            elif result.done:
                seconds = conn.execute(query("complete_tree_instance"),
                                       {"id": inst.id, "output": store.dumps(result.output)}).fetchone()[0]
                _count_completed(inst.shape.name, seconds)
                log.debug("instance %s of flow %s completed in %.3f s", inst.id, inst.shape.name, seconds,
                          extra={"instance_id": inst.id, "flow": inst.shape.name})
        writes.drop_instances(failures)
        writes.flush(conn)
        self._fail(conn, failures)

    def _finish_maps(self, conn: psycopg.Connection, finished: list[tuple[int, str]],
                     instances: dict[int, _Instance]) -> None:
        """Fan-in: a map whose tasks all completed gets the ordered list of their outputs."""
        finished = [(iid, step) for iid, step in finished if iid in instances]
        if not finished:
            return
        conn.execute(query("finish_maps"), {"ids": [f[0] for f in finished], "steps": [f[1] for f in finished]})
        for iid, step in finished:
            instances[iid].states[step] = "completed"

    def _schedule(self, conn: psycopg.Connection, instances: dict[int, _Instance]) -> None:
        """Push every step whose dependencies are complete; repeat while empty maps complete instantly."""
        todo = dict(instances)
        while todo:
            writes = _Writes()
            maps: list[tuple[_Instance, StepShape]] = []
            for inst in todo.values():
                for step in inst.shape.steps.values():
                    if step.name in inst.states or not all(inst.states.get(d) == "completed" for d in step.deps):
                        continue
                    if step.is_map:
                        maps.append((inst, step))
                    else:
                        writes.enqueue(step.queue, inst.id, step.name, -1,
                                       task_message(inst.shape.name, inst.shape.version, inst.id, step.name))
                        inst.states[step.name] = "queued"
                        log.debug("instance %s: step %s queued", inst.id, step.name, extra={
                            "instance_id": inst.id, "flow": inst.shape.name, "step": step.name, "queue": step.queue})
            again = self._fan_out(conn, maps, writes, instances)
            writes.flush(conn)
            todo = {iid: instances[iid] for iid in again if iid in instances}

    def _fan_out(self, conn: psycopg.Connection, maps: list[tuple[_Instance, StepShape]], writes: _Writes,
                 instances: dict[int, _Instance]) -> set[int]:
        """Create one task per element for each ready map. Returns instances to look at again (a map over
        an empty list completes at once, which may make its dependents ready)."""
        if not maps:
            return set()
        wanted = [(inst.id, step.over) for inst, step in maps if step.over != INPUT]
        outputs: dict[tuple[int, str], Any] = {}
        if wanted:
            rows = conn.execute(query("step_outputs"), {"ids": [w[0] for w in wanted],
                                                        "steps": [w[1] for w in wanted]}).fetchall()
            outputs = {(iid, step): output for iid, step, output in rows}
        again: set[int] = set()
        failures: dict[int, str] = {}
        for inst, step in maps:
            items = inst.input if step.over == INPUT else outputs.get((inst.id, step.over))
            items, problem = _map_elements(step, items)
            if problem:
                failures.setdefault(inst.id, problem)
                continue
            if not items:
                writes.map_parents.append((inst.id, step.name, "completed", step.queue))
                inst.states[step.name] = "completed"
                again.add(inst.id)
                continue
            writes.map_parents.append((inst.id, step.name, "mapping", step.queue))
            inst.states[step.name] = "mapping"
            log.debug("instance %s: map step %s fans out into %d tasks", inst.id, step.name, len(items), extra={
                "instance_id": inst.id, "flow": inst.shape.name, "step": step.name, "queue": step.queue})
            for index, item in enumerate(items):
                writes.enqueue(step.queue, inst.id, step.name, index,
                               task_message(inst.shape.name, inst.shape.version, inst.id, step.name, index, item))
        if failures:
            self._fail(conn, failures)
            for iid in failures:
                instances.pop(iid, None)
            writes.drop_instances(failures)
        return again

    def _complete(self, conn: psycopg.Connection, instances: dict[int, _Instance]) -> None:
        done = [
            {"id": inst.id, "terminal": list(inst.shape.terminal), "single": len(inst.shape.terminal) == 1}
            for inst in instances.values()
            if all(inst.states.get(s) == "completed" for s in inst.shape.steps)
        ]
        if not done:
            return
        finished = conn.execute(query("complete_instances"), {"done": store.dumps(done)}).fetchall()
        for iid, flow, seconds, _notified in finished:
            _count_completed(flow, seconds)
            log.debug("instance %s of flow %s completed in %.3f s", iid, flow, seconds,
                      extra={"instance_id": iid, "flow": flow})

    def _fail(self, conn: psycopg.Connection, failures: dict[int, str]) -> None:
        """Fail instances for good: stored error, unfinished steps cancelled, waiters notified."""
        if not failures:
            return
        ids = list(failures)
        failed = conn.execute(query("fail_instances"), {"ids": ids, "errors": [failures[i] for i in ids]}).fetchall()
        conn.execute(query("cancel_open_steps"), {"ids": ids})
        conn.execute(query("notify_done"), {"ids": ids})
        outcomes = metrics().instances_finished
        for iid, flow, error in failed:
            outcomes.labels(flow, "failed").inc()
            log.warning("instance %s of flow %s failed: %s", iid, flow, error,
                        extra={"instance_id": iid, "flow": flow})

    # ------------------------------------------------------------------------------------------ upkeep

    def _maybe_maintain(self) -> None:
        now = time.monotonic()
        if now < self._next_maintenance:
            return
        self._next_maintenance = now + self.maintenance_every
        self.maintain()

    def maintain(self) -> None:
        """Periodic upkeep, done by one coordinator at a time (advisory lock)."""
        conn = self._conn
        with conn.transaction():
            if not conn.execute(query("try_maintenance_lock")).fetchone()[0]:
                return
            woken = conn.execute(query("stalled_instances"), {"age": self.stalled_after}).fetchall()
            if woken:
                log.warning("woke %d stalled instance(s)", len(woken))
            if self.retention_seconds:
                conn.execute(query("delete_finished_instances"), {"seconds": self.retention_seconds})
                self._purge_archives(conn)
        self._sample_metrics(conn)

    def vacuum_churned_tables(self) -> list[str]:
        """VACUUM the queue tables and ``pgflow.wakeups`` that have gathered ``vacuum_min_dead`` dead rows;
        returns the tables vacuumed. Why: their rows live for milliseconds, and autovacuum (a pass a minute
        at most, by default) leaves the dead index entries at the head of the indexes that every read walks
        from the start; with a 100,000-instance backlog throughput was 12% lower (loadtests/README.md)."""
        if self._vacuum_conn is None or self._vacuum_conn.closed:
            self._vacuum_conn = store.connect(self.dsn, autocommit=True)
        conn = self._vacuum_conn
        tables = conn.execute(query("churned_tables"), {"min_dead": self.vacuum_min_dead}).fetchall()
        for schema, table in tables:
            # no truncation: it takes an exclusive lock (the engine's statements waited on it) to give back
            # pages the next second refills; index cleanup always, since the dead index entries are the point
            conn.execute(sql.SQL("VACUUM (SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP on) {}")
                         .format(sql.Identifier(schema, table)))
        return [f"{schema}.{table}" for schema, table in tables]

    def _vacuum_loop(self) -> None:
        while not self.stop_event.wait(self.vacuum_every):
            try:
                self.vacuum_churned_tables()
            except (psycopg.Error, DatabaseUnavailable) as exc:  # the main loop deals with outages
                log.info("vacuum skipped: %s", str(exc).strip())
                store.close_quietly(self._vacuum_conn)
                self._vacuum_conn = None
        store.close_quietly(self._vacuum_conn)

    def _purge_archives(self, conn: psycopg.Connection) -> None:
        for (queue,) in conn.execute(query("list_queues")).fetchall():
            conn.execute(sql.SQL("DELETE FROM pgmq.{} WHERE archived_at < now() - make_interval(secs => %s)")
                         .format(sql.Identifier("a_" + queue)), (self.retention_seconds,))

    def _sample_metrics(self, conn: psycopg.Connection) -> None:
        m = metrics()
        counts = {(f, st): n for f, st, n in conn.execute(query("instance_counts")).fetchall()}
        self._sampled_flows.update(f for f, _ in counts)
        for flow in self._sampled_flows:  # statuses without rows read 0, not their last count
            for status in INSTANCE_STATUSES:
                m.instances.labels(flow, status).set(counts.get((flow, status), 0))
        queues = conn.execute(query("queue_totals")).fetchall()
        for name, total in queues:
            ready, oldest = conn.execute(sql.SQL(query("ready_messages")).format(
                table=sql.Identifier("q_" + name))).fetchone()
            m.queue_depth.labels(name).set(ready)
            m.queue_oldest.labels(name).set(oldest)
            m.queue_total.labels(name).set(total)
        due, lag = conn.execute(query("wakeup_backlog")).fetchone()
        m.wakeups_due.set(due)
        m.wakeup_lag.set(lag)
        dead = dict(conn.execute(query("dead_letter_counts")).fetchall())
        for name, _total in queues:  # queues without dead letters read 0
            m.dead_letters.labels(name).set(dead.pop(name, 0))
        for name, count in dead.items():  # dead letters of queues since dropped
            m.dead_letters.labels(name).set(count)


def _count_completed(flow: str, seconds: float) -> None:
    m = metrics()
    m.instance_duration.labels(flow).observe(seconds)
    m.instances_finished.labels(flow, "completed").inc()


def _map_elements(step: StepShape, value: Any) -> tuple[list[Any], str | None]:
    """The elements a map fans out over, or an error message when the value is not a list (of lists)."""
    source = "the flow input" if step.over == INPUT else f"step {step.over}'s output"
    if not isinstance(value, list):
        return [], f"step {step.name} maps over {source}, which is {type(value).__name__}, not a list"
    if not step.flatten:
        return value, None
    if not all(isinstance(v, list) for v in value):
        return [], f"step {step.name} flattens {source}, which is not a list of lists"
    return [x for inner in value for x in inner], None


def run_coordinator(dsn: str, **options: Any) -> None:
    """Run a coordinator in this process until SIGTERM/SIGINT (used by ``pgflow coordinator``)."""
    coordinator = Coordinator(dsn, **options)
    signal.signal(signal.SIGTERM, coordinator.stop)
    signal.signal(signal.SIGINT, coordinator.stop)
    coordinator.run()
