"""The ``pgflow`` command line: init | demo | coordinator | worker | start | status | result | cancel | list |
console.

Every command takes ``--dsn`` (or ``PGFLOW_DSN``); without one it uses the embedded PostgreSQL under
``PGFLOW_HOME``. Errors are one clear line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import sys
from typing import Any

import click
import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import client, logs, settings
from .db.connection import connect, resolve_dsn, without_dsn
from .db.migrations import COMPAT_LAYERS, LATEST_VERSION, init_schema, require_schema
from .errors import InstanceFailed, InstanceNotFinished, PgflowError
from .registry import forget_current_directory, import_module, load_flow, trust
from .statuses import InstanceStatus


def _from_settings(name: str) -> Any:
    """A default read from the PGFLOW_* settings (so every variable is read in one place)."""
    def default() -> Any:
        try:
            return getattr(settings.current(), name)
        except settings.SettingsError as exc:
            raise click.UsageError(str(exc)) from None
    return default


class Dsn(click.ParamType):
    """A PostgreSQL connection string libpq can parse (checked before anything connects: one clear line,
    never a traceback; the value is not echoed, it may hold a password)."""

    name = "dsn"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or value == "":
            return None
        try:
            conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            self.fail(f"not a PostgreSQL connection string ({without_dsn(str(exc), value)})", param, ctx)
        return value


_QUEUE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,46}$")


def _queue_names(ctx: Any, param: Any, value: tuple[str, ...]) -> tuple[str, ...]:
    """--queue values: pgflow queue names (the database would refuse others in every worker process)."""
    for name in value:
        if not _QUEUE_NAME.match(name):
            raise click.BadParameter(f"{name!r}: use 1 to 47 lower-case letters, digits or _, starting with a "
                                     "letter", ctx, param)
    return value


dsn_option = click.option("--dsn", default=_from_settings("dsn"), metavar="DSN", type=Dsn(),
                          help="PostgreSQL connection string (env PGFLOW_DSN). Default: the embedded server "
                               "under PGFLOW_HOME (~/.local/share/pgflow).")

metrics_port_option = click.option("--metrics-port", default=0, show_default=True, type=click.IntRange(0, 65535),
                                   help="Serve /metrics /healthz /readyz (0: off).")


def _opt_in_flow_labels(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        os.environ["PGFLOW_METRICS_FLOW_LABELS"] = "1"
        settings.reload()
    return value


metrics_flow_labels_option = click.option(
    "--metrics-flow-labels", is_flag=True, callback=_opt_in_flow_labels, expose_value=False,
    help="Name every user's flows in metrics labels (env PGFLOW_METRICS_FLOW_LABELS); by default only the "
         "engine role's own flows are named, users' instances count under flow=\"other\".")


def _friendly_errors(fn):
    """Turn pgflow's own errors into a one-line message and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (PgflowError, TimeoutError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def _json_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None


def _name_sessions(kind: str) -> None:
    """Name this process's (and its children's) database sessions ``pgflow <kind> <host>:<pid>`` through
    libpq's PGAPPNAME, unless the user named them: ``pgflow.engine_processes()`` (the console's "workers
    alive") counts them from the server's own pg_stat_activity."""
    os.environ.setdefault("PGAPPNAME", f"pgflow {kind} {socket.gethostname()}:{os.getpid()}"[:63])


def _echo_json(value: Any) -> None:
    click.echo(orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=_from_settings("log_level"), show_default="WARNING",
              type=click.Choice(settings.LOG_LEVELS, case_sensitive=False),
              help="(env PGFLOW_LOG_LEVEL)")
@click.option("--log-format", default=_from_settings("log_format"), show_default="text",
              type=click.Choice(logs.FORMATS, case_sensitive=False),
              help="Log lines on stderr as text, or as JSON objects with instance_id, flow, step, task_index, "
                   "attempt and queue fields (env PGFLOW_LOG_FORMAT).")
def main(log_level: str, log_format: str) -> None:
    """pgflow: durable DAG workflows whose only infrastructure is PostgreSQL."""
    logs.configure(log_level, log_format.lower())


@main.command()
@dsn_option
@click.option("--queue", "-q", "queues", multiple=True, metavar="NAME",
              help="Also create this queue (repeatable): the queues your deployment's workers serve.")
@click.option("--compat", "compat", multiple=True, type=click.Choice(sorted(COMPAT_LAYERS)),
              help="Also install a compatibility layer: pg_durable adds its df schema (its SQL runs unchanged).")
@_friendly_errors
def init(dsn: str | None, queues: tuple[str, ...], compat: tuple[str, ...]) -> None:
    """Install pgmq, apply pgflow's schema migrations and create the given queues (idempotent)."""
    dsn = resolve_dsn(dsn, setup=True)
    applied = init_schema(dsn, queues, compat)
    click.echo(f"pgflow schema at version {LATEST_VERSION}"
               + (f" (applied {', '.join(map(str, applied))})" if applied else " (already up to date)")
               + (f"; queues: {', '.join(queues)}" if queues else ""))


@main.command()
@dsn_option
@click.option("--documents", default=2000, show_default=True, help="Documents to generate and embed.")
@click.option("--batches", default=20, show_default=True, help="Instances to split the documents into.")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
@click.option("--embedder", type=click.Choice(["hashing", "minilm"]), default="hashing", show_default=True,
              help="hashing: a deterministic function, nothing to install; minilm: the real all-MiniLM-L6-v2, "
                   "64 chunks per task (needs the embed extra).")
@_friendly_errors
def demo(dsn: str | None, documents: int, batches: int, workers: int, no_progress: bool, embedder: str) -> None:
    """Run the fan-out embedding pipeline (load -> chunk -> embed -> upsert into pgvector -> mark done)
    with a coordinator and worker processes, then print a summary."""
    from .demo import format_summary, run_demo

    if documents < 1 or not 1 <= batches <= documents or workers < 1:
        raise click.BadParameter("need documents >= 1, 1 <= batches <= documents, workers >= 1")
    dsn = resolve_dsn(dsn, setup=True)
    summary = run_demo(dsn, documents=documents, batches=batches, workers=workers, progress=not no_progress,
                       embedder=embedder)
    click.echo(format_summary(summary))
    if not summary.ok:
        raise click.ClickException("the demo did not complete every instance (see the summary above)")


@main.command()
@dsn_option
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 100_000),
              help="Instances evaluated per transaction.")
@click.option("--retention", default=7 * 86400.0, show_default=True, type=click.FloatRange(0, 100 * 365 * 86400.0),
              help="Seconds to keep finished instances and archived messages (0 keeps them forever).")
@click.option("--maintenance-every", default=10.0, show_default=True, type=click.FloatRange(0.1, 86400.0),
              help="Seconds between maintenance runs (retention, stalled-instance check, queue metrics).")
@click.option("--vacuum-every", default=2.0, show_default=True, type=click.FloatRange(0, 86400.0),
              help="Seconds between checks for queue tables and wake-ups to VACUUM (0: leave it to autovacuum).")
@metrics_port_option
@metrics_flow_labels_option
@_friendly_errors
def coordinator(dsn: str | None, batch: int, retention: float, maintenance_every: float, vacuum_every: float,
                metrics_port: int) -> None:
    """Run a coordinator: schedules ready steps, fans maps out and in, finishes instances. Several may
    run at once (high availability)."""
    from .engine.coordinator import Coordinator
    from .health import Health, readiness
    from .metrics import disable_multiprocess, serve

    disable_multiprocess()  # one process: export its own values, never files another process left behind
    _name_sessions("coordinator")
    dsn = resolve_dsn(dsn, setup=True)
    health = Health()
    serve(metrics_port, health, readiness(dsn))
    instance = Coordinator(dsn, batch=batch, retention_seconds=retention or None, health=health,
                           maintenance_every=maintenance_every, vacuum_every=vacuum_every)
    signal.signal(signal.SIGTERM, instance.stop)
    signal.signal(signal.SIGINT, instance.stop)
    instance.run()


@main.command()
@dsn_option
@click.option("--concurrency", "-c", default=2, show_default=True, type=click.IntRange(1, 1024),
              help="Worker processes.")
@click.option("--queue", "-q", "queues", multiple=True, callback=_queue_names,
              help="Queue to serve (repeatable). Default: all.")
@click.option("--batch-size", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="Most messages read per batch (fewer when a queue's tasks are slow: about 0.25 s of work "
                   "per read, so that slow tasks are not held by one worker while others wait).")
@click.option("--visibility-timeout", default=30, show_default=True, type=click.IntRange(1, 86_400),
              help="Seconds a read message stays hidden; extended while its step runs.")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import this module first (flows defined there; repeatable).")
@click.option("--drain-timeout", default=45.0, show_default=True, type=click.FloatRange(0, 86_400),
              help="On SIGTERM, seconds to let in-flight steps finish before killing.")
@metrics_port_option
@metrics_flow_labels_option
@click.option("--init", "inits", multiple=True, metavar="MODULE:FUNCTION",
              help="Run this function once in each worker process before it takes work (load a model, open a "
                   "client; repeatable).")
@click.option("--compute-threads", default=1, show_default=True, type=click.IntRange(0),
              help="Threads per worker process for numeric libraries (OMP/MKL/OpenBLAS, torch); 0: leave them "
                   "as they are. One process per core with one thread each avoids oversubscribing the cores.")
@_friendly_errors
def worker(dsn: str | None, concurrency: int, queues: tuple[str, ...], batch_size: int, visibility_timeout: int,
           imports: tuple[str, ...], drain_timeout: float, metrics_port: int, inits: tuple[str, ...],
           compute_threads: int) -> None:
    """Run worker processes that pop steps from pgmq, execute them and checkpoint their results."""
    from .engine.supervisor import run_workers
    from .hooks import init_functions, limit_compute_threads
    from .metrics import disable_multiprocess, enable_multiprocess

    _name_sessions("worker")
    # before --import (user modules may import prometheus_client): children's samples go to a fresh directory
    # that /metrics aggregates; without /metrics, none is needed (and an inherited one must not be written to)
    if metrics_port:
        try:
            enable_multiprocess()
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        disable_multiprocess()
    limit_compute_threads(compute_threads)  # before --import: a numeric library reads them when imported
    for module in imports:
        try:
            import_module(module)
        except ImportError as exc:
            raise click.ClickException(f"cannot import {module!r}: {exc}") from exc
    trust(imports)  # these (and their submodules) are the code the worker may import by name, nothing else
    try:
        init = init_functions(inits)
    except (ImportError, AttributeError, ValueError) as exc:
        raise click.ClickException(f"--init: {exc}") from exc
    forget_current_directory()
    dsn = resolve_dsn(dsn, setup=True)
    with connect(dsn) as conn:
        require_schema(conn)
    sys.exit(run_workers(dsn, queues=list(queues) or None, concurrency=concurrency, drain_timeout=drain_timeout,
                         metrics_port=metrics_port, batch_size=batch_size, visibility_timeout=visibility_timeout,
                         init=tuple(init), compute_threads=compute_threads))


@main.command()
@dsn_option
@click.argument("flow_ref", metavar="FLOW")
@click.option("--input", "input_", callback=_json_argument, help="The flow input, as JSON.")
@click.option("--label", help="A label to find the instance by (pgflow list --label).")
@_friendly_errors
def start(dsn: str | None, flow_ref: str, input_: Any, label: str | None) -> None:
    """Start an instance of FLOW (module:attribute: a Flow, or a workflow node from pgflow.tree) and print
    its id."""
    flow = load_flow(flow_ref)
    click.echo(client.start(flow, input_, label=label, dsn=resolve_dsn(dsn)))


@main.command()
@dsn_option
@click.argument("instance_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly_errors
def status(dsn: str | None, instance_id: int, as_json: bool) -> None:
    """Show an instance's status and its steps."""
    st = client.status(instance_id, dsn=resolve_dsn(dsn))
    if as_json:
        _echo_json(st.as_dict())
        return
    click.echo(f"instance {st.id}  {st.flow} ({st.version})  {st.status}"
               + (f"  label={st.label}" if st.label else ""))
    if st.error:
        click.echo(f"error: {st.error}")
    for s in st.steps:
        tasks = f"  tasks {s.tasks_completed}/{s.tasks}" if s.tasks else ""
        error = f"  error: {s.error}" if s.error else ""
        click.echo(f"  {s.name:<24} {s.status or '-':<10} attempts {s.attempts}{tasks}{error}")


@main.command()
@dsn_option
@click.argument("instance_id", type=int)
@_friendly_errors
def result(dsn: str | None, instance_id: int) -> None:
    """Print a completed instance's output as JSON (exit 1 if it failed or has not finished)."""
    try:
        _echo_json(client.result(instance_id, dsn=resolve_dsn(dsn)))
    except (InstanceFailed, InstanceNotFinished) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@dsn_option
@click.argument("instance_id", type=int)
@click.option("--reason", default=None, help="Stored as the instance's error.")
@_friendly_errors
def cancel(dsn: str | None, instance_id: int, reason: str | None) -> None:
    """Cancel a pending or running instance."""
    outcome = client.cancel(instance_id, reason, dsn=resolve_dsn(dsn))
    if outcome != InstanceStatus.CANCELLED:
        raise click.ClickException(f"instance {instance_id} already {outcome}; nothing to cancel")
    click.echo(f"instance {instance_id} cancelled")


@main.command()
@dsn_option
@click.argument("instance_id", type=int)
@_friendly_errors
def explain(dsn: str | None, instance_id: int) -> None:
    """Draw the instance's tree with a status marker per node (pending, running, completed, failed,
    skipped, waiting with its due time), attempts and errors."""
    click.echo(client.explain(instance_id, dsn=resolve_dsn(dsn)))


@main.command()
@dsn_option
@click.argument("instance_id", type=int)
@click.option("--interval", default=0.5, show_default=True, help="Seconds between refreshes.")
@_friendly_errors
def watch(dsn: str | None, instance_id: int, interval: float) -> None:
    """Redraw `pgflow explain ID` until the instance ends."""
    import time

    dsn = resolve_dsn(dsn)
    while True:
        finished = client.status(instance_id, dsn=dsn).finished  # read first: the last drawing shows the end
        text = client.explain(instance_id, dsn=dsn)
        click.clear()
        click.echo(text)
        if finished:
            return
        time.sleep(interval)


@main.command(name="signal")
@dsn_option
@click.argument("instance_id", type=int)
@click.argument("name")
@click.option("--data", callback=_json_argument, help="The signal's data, as JSON.")
@_friendly_errors
def signal_(dsn: str | None, instance_id: int, name: str, data: Any) -> None:
    """Send signal NAME to an instance (a wait_for_signal(NAME) receives DATA)."""
    client.signal(instance_id, name, data, dsn=resolve_dsn(dsn))
    click.echo(f"signal {name!r} sent to instance {instance_id}")


@main.command(name="list")
@dsn_option
@click.option("--status", type=click.Choice([s.value for s in InstanceStatus]))
@click.option("--flow", help="Only this flow.")
@click.option("--label", help="Only this label.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--before", type=int, help="Keyset pagination: only ids below this one (the last id shown).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly_errors
def list_(dsn: str | None, status: str | None, flow: str | None, label: str | None, limit: int,
          before: int | None, as_json: bool) -> None:
    """List instances, newest first."""
    rows = client.list_instances(status=status, flow=flow, label=label, limit=limit, before=before,
                                 dsn=resolve_dsn(dsn))
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['id']:>10}  {r['flow_name']:<20} {r['status']:<10} {r['label'] or '':<16} "
                   f"{r['created_at']:%Y-%m-%d %H:%M:%S}")
    if len(rows) == limit:
        click.echo(f"(more: pgflow list --before {rows[-1]['id']})", err=True)


@main.command()
@dsn_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback exposes the console to the network).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--read-only", is_flag=True, help="Show everything, change nothing: no action forms, POSTs refused.")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import this module first: its DAG flows can be started from the console (repeatable).")
@_friendly_errors
def console(dsn: str | None, host: str, port: int, read_only: bool, imports: tuple[str, ...]) -> None:
    """Serve the web console: instances, their graphs and steps, flows, queues and dead letters, and actions
    (cancel, retry, signal, start, requeue). It acts as the database role of its DSN: row-level security
    decides what it shows and what succeeds."""
    from .console import serve

    for module in imports:
        try:
            import_module(module)
        except ImportError as exc:
            raise click.ClickException(f"cannot import {module!r}: {exc}") from exc
    serve(resolve_dsn(dsn), host=host, port=port, read_only=read_only)


if __name__ == "__main__":  # pragma: no cover
    main()

