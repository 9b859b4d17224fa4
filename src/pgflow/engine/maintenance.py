"""The coordinator's upkeep: the stalled-instance safety net, retention of finished instances, archived
messages and HTTP audit rows, VACUUM of the tables whose rows live for milliseconds and ANALYZE of the busiest
ones, and the sampled metrics (instances by status, queue depth and age, wake-up backlog, dead letters).
Maintenance is done by one coordinator at a time (a row lock no user can take); VACUUM and ANALYZE run in a
thread of their own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from threading import Event
from typing import Any

import psycopg

from .. import settings
from ..db.connection import close_quietly, connect
from ..db.queries import Queries
from ..errors import DatabaseUnavailable
from ..metrics import OTHER_FLOWS, metrics
from ..queues import queue_names
from ..statuses import InstanceStatus

log = logging.getLogger("pgflow.coordinator")
Q = Queries("maintenance")


class Maintenance:
    """Periodic upkeep every ``every`` seconds (:meth:`maybe_run`, on the coordinator's connection) and a
    vacuum every ``vacuum_every`` seconds (:meth:`vacuum_loop`, on a connection of its own)."""

    def __init__(self, dsn: str, *, every: float = 10.0, retention_seconds: float | None = 7 * 86400,
                 stalled_after: float = 30.0, vacuum_every: float = 2.0, vacuum_min_dead: int = 5000) -> None:
        self.dsn = dsn
        self.every = every
        self.retention_seconds = retention_seconds
        self.stalled_after = stalled_after
        self.vacuum_every = vacuum_every
        self.vacuum_min_dead = vacuum_min_dead
        self._next = 0.0
        self._vacuum_conn: psycopg.Connection | None = None
        self._sampled_flows: set[str] = set()

    def maybe_run(self, conn: psycopg.Connection) -> None:
        """:meth:`run` when it is due."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        self.run(conn)

    def run(self, conn: psycopg.Connection) -> None:
        """Wake stalled instances, purge what retention allows (instances, HTTP audit rows, archived messages),
        then sample the metrics."""
        with conn.transaction():
            if not Q.value(conn, "try_maintenance_lock"):
                return
            woken = Q.all(conn, "stalled_instances", {"age": self.stalled_after})
            if woken:
                log.warning("woke %d stalled instance(s)", len(woken))
            if self.retention_seconds:
                Q.execute(conn, "delete_finished_instances", {"seconds": self.retention_seconds})
                Q.execute(conn, "purge_http_audit", {"seconds": self.retention_seconds})
                self.purge_archives(conn)
        self.sample_metrics(conn)

    def purge_archives(self, conn: psycopg.Connection) -> None:
        """Delete archived messages older than the retention, queue by queue."""
        for queue in queue_names(conn):
            conn.execute(Q.composed("purge_archive", archive=("pgmq", "a_" + queue)),
                         {"seconds": self.retention_seconds})

    def sample_metrics(self, conn: psycopg.Connection) -> None:
        """Set the gauges that sample the database: one truth, read by whichever coordinator maintains."""
        m = metrics()
        counts = {(f, st): n for f, st, n in Q.all(conn, "instance_counts", {
            "all_flows": settings.current().metrics_flow_labels, "other": OTHER_FLOWS})}
        self._sampled_flows.update(f for f, _ in counts)
        for flow in self._sampled_flows:  # statuses without rows read 0, not their last count
            for status in InstanceStatus:
                m.instances.labels(flow, status).set(counts.get((flow, status), 0))
        queues = Q.all(conn, "queue_totals")
        for name, total in queues:
            ready, oldest = conn.execute(Q.composed("ready_messages", table=("pgmq", "q_" + name))).fetchone()
            m.queue_depth.labels(name).set(ready)
            m.queue_oldest.labels(name).set(oldest)
            m.queue_total.labels(name).set(total)
        due, lag = Q.one(conn, "wakeup_backlog")
        m.wakeups_due.set(due)
        m.wakeup_lag.set(lag)
        dead = dict(Q.all(conn, "dead_letter_counts"))
        for name, _total in queues:  # queues without dead letters read 0
            m.dead_letters.labels(name).set(dead.pop(name, 0))
        for name, count in dead.items():  # dead letters of queues since dropped
            m.dead_letters.labels(name).set(count)

    def vacuum_churned_tables(self) -> list[str]:
        """VACUUM the queue tables and ``pgflow.wakeups`` that have gathered ``vacuum_min_dead`` dead rows;
        returns the tables vacuumed. Why: their rows live for milliseconds, and autovacuum (a pass a minute
        at most, by default) leaves the dead index entries at the head of the indexes that every read walks
        from the start; with a 100,000-instance backlog throughput was 12% lower (loadtests/README.md)."""
        conn = self._maintenance_conn()
        tables = Q.all(conn, "churned_tables", {"min_dead": self.vacuum_min_dead})
        return _run_on_each(conn, tables, lambda table: Q.composed("vacuum", table=table))

    def analyze_stale_tables(self) -> list[str]:
        """ANALYZE the engine's busiest tables (instances, steps, wake-ups, queues) whose live rows differ by
        half (and by ``vacuum_min_dead`` rows) from what their statistics say; returns the tables analyzed.
        Why: they fill in bursts, and plans made with statistics of a nearly empty table read every open
        instance to lock a batch of them by id (loadtests/README.md)."""
        conn = self._maintenance_conn()
        tables = Q.all(conn, "stale_statistics", {"min_changes": self.vacuum_min_dead})
        return _run_on_each(conn, tables, lambda table: Q.composed("analyze", table=table))

    def _maintenance_conn(self) -> psycopg.Connection:
        """The VACUUM and ANALYZE thread's own connection (opened again after an outage)."""
        if self._vacuum_conn is None or self._vacuum_conn.closed:
            self._vacuum_conn = connect(self.dsn, autocommit=True)
        return self._vacuum_conn

    def vacuum_loop(self, stop: Event) -> None:
        """Vacuum and analyze every ``vacuum_every`` seconds until ``stop`` is set."""
        while not stop.wait(self.vacuum_every):
            try:
                self.vacuum_churned_tables()
                self.analyze_stale_tables()
            except (psycopg.Error, DatabaseUnavailable) as exc:  # the main loop deals with outages
                log.info("vacuum skipped: %s", str(exc).strip())
                close_quietly(self._vacuum_conn)
                self._vacuum_conn = None
        close_quietly(self._vacuum_conn)


def _run_on_each(conn: psycopg.Connection, tables: list[tuple[str, str]],
                 command: Callable[[tuple[str, str]], Any]) -> list[str]:
    """Run the statement ``command`` makes for each (schema, table); the tables, schema-qualified."""
    for table in tables:
        conn.execute(command(table))
    return [f"{schema}.{table}" for schema, table in tables]
