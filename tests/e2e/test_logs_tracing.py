"""Logs an operator can use and OpenTelemetry tracing: JSON log lines of real `pgflow worker` and
`pgflow coordinator` processes carry the engine fields; workers log start, drain and exit; the coordinator
logs every failed instance; step spans continue the trace that was current around `pgflow.start`, from a
worker in this process (the SDK's in-memory exporter) and from real worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import run_sql, subprocess_env, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from psycopg.conninfo import make_conninfo
from support import log_flows
from support import sample_flows as sf

import pgflow
from pgflow.engine.worker import Worker
from pgflow.logs import FIELDS

# --------------------------------------------------------------------------- logs


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line a process wrote to stderr, each of which must be one JSON object with the engine fields."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        missing = {"timestamp", "level", "logger", "message", "pid", *FIELDS} - set(line)
        assert not missing, f"{line} lacks {missing}"
    return lines


def find(lines: list[dict[str, Any]], text: str, **fields: Any) -> list[dict[str, Any]]:
    """The lines whose message contains ``text`` and whose fields have these values."""
    return [line for line in lines if text in line["message"] and all(line[k] == v for k, v in fields.items())]


def test_json_lines_of_real_processes_carry_the_engine_fields(dsn, engine_factory):
    engine = engine_factory("--log-format", "json", "--log-level", "INFO")
    coordinator = engine.coordinator()
    worker = engine.worker("--import", "support.log_flows")
    iid = pgflow.start(log_flows.chatty, "hello", dsn=dsn)
    assert pgflow.wait(iid, timeout=60, dsn=dsn).status == "failed"
    assert not engine.stop()

    lines = json_lines(worker.stderr_text)
    task = {"instance_id": iid, "flow": "chatty", "task_index": -1, "queue": "pgflow"}
    # a step's own line carries the fields of the task it runs in
    [spoken] = find(lines, "speaking for hello", logger="support.log_flows", step="speak", attempt=1, **task)
    assert spoken["level"] == "WARNING" and spoken["pid"] != worker.pid
    # the worker's line for each failed attempt: retried (WARNING), then failed for good (ERROR)
    [retried] = find(lines, "RuntimeError: cannot go on after hello", step="stumble", attempt=1, **task)
    [failed] = find(lines, "RuntimeError: cannot go on after hello", step="stumble", attempt=2, **task)
    assert (retried["level"], failed["level"]) == ("WARNING", "ERROR")
    assert retried["logger"] == failed["logger"] == "pgflow.worker"

    # the supervisor: start, each child's start, drain begin and end, exit; each child: working, exiting
    supervisor = [line for line in lines if line["pid"] == worker.pid]
    messages = [line["message"] for line in supervisor]
    assert messages[0] == f"worker supervisor {worker.pid} starting 2 worker processes for every queue"
    children = {int(m.split()[3]) for m in messages if m.startswith("started worker process ")}
    assert len(children) == 2 and worker.pid not in children
    [drain] = [i for i, m in enumerate(messages) if m.startswith("SIGTERM: draining 2 worker processes")]
    [drained] = [i for i, m in enumerate(messages) if m.startswith("worker processes drained in ")]
    assert drain < drained < len(messages) - 1
    assert messages[-1] == f"worker supervisor {worker.pid} exiting with code 0"
    for child in children:
        own = [line["message"] for line in lines if line["pid"] == child]
        assert own[0] == f"worker process {child} working" and own[-1] == f"worker process {child} exiting"

    # the coordinator logs the failed instance, with its flow and error
    [gone] = find(json_lines(coordinator.stderr_text), f"instance {iid} of flow chatty failed", instance_id=iid,
                  flow="chatty", logger="pgflow.coordinator")
    assert gone["level"] == "WARNING"
    assert "step stumble failed: RuntimeError: cannot go on after hello" in gone["message"]


def test_text_lines_stay_readable(dsn, engine_factory):
    """Without --log-format the lines are text (not JSON) and tell the same story."""
    engine = engine_factory(PGFLOW_LOG_LEVEL="INFO")
    worker = engine.worker(concurrency=1)
    # the child has connected (work + LISTEN): past its start-up, so it drains on SIGTERM
    wait_until(lambda: run_sql(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                    " AND pid <> pg_backend_pid()")[0][0] >= 2, what="the worker's connections")
    assert not engine.stop()
    lines = worker.stderr_text.splitlines()
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    assert any(f"pgflow.worker INFO worker supervisor {worker.pid} starting 1 worker processes for every queue"
               in line for line in lines)
    assert any("pgflow.worker INFO SIGTERM: draining 1 worker processes" in line for line in lines)
    assert lines[-1].endswith(f"pgflow.worker INFO worker supervisor {worker.pid} exiting with code 0")


# --------------------------------------------------------------------------- tracing


@pytest.fixture(scope="module")
def spans():
    """The SDK as this process's tracer provider (set once: OpenTelemetry allows one), exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.fail("another tracer provider was set in this test process first")
    yield exporter
    exporter.clear()


def traceparent(span: Any) -> str:
    """The W3C traceparent of a finished (sampled) span."""
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def run_worker_in_thread(dsn: str, until: list[int]) -> None:
    """A Worker in a thread of this process (its spans go to the in-memory exporter) until the instances end."""
    worker = Worker(dsn, poll_interval=0.1)
    assert worker.tracer is not None
    thread = threading.Thread(target=worker.run, name="test-worker")
    thread.start()
    try:
        for iid in until:
            pgflow.wait(iid, timeout=60, dsn=dsn)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_step_spans_continue_the_trace_around_start(dsn, engine_factory, spans):
    spans.clear()
    engine_factory().coordinator()
    with trace.get_tracer("test").start_as_current_span("request") as request:
        ok = pgflow.start(sf.chain, {"n": 1, "label": "x"}, dsn=dsn)
        refused = pgflow.start(sf.fatal, None, dsn=dsn)
        mapped = pgflow.start_many(sf.input_map, [[1, 2], [3]], dsn=dsn)
    run_worker_in_thread(dsn, [ok, refused, *mapped])
    assert pgflow.status(ok, dsn=dsn).status == "completed"

    finished = spans.get_finished_spans()
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in finished} == {trace_id}
    starts = {s.attributes["pgflow.flow"]: s for s in finished if s.name.startswith("pgflow start ")}
    assert set(starts) == {"chain", "fatal", "input_map"}
    for start in starts.values():
        assert start.parent.span_id == request.get_span_context().span_id and start.kind == SpanKind.PRODUCER
    assert starts["chain"].attributes["pgflow.instance_id"] == ok
    assert starts["input_map"].attributes["pgflow.instance_count"] == 2
    # each instance keeps the traceparent of its start span
    stored = dict(run_sql(dsn, "SELECT id, trace_context FROM pgflow.instances"))
    assert stored == {ok: traceparent(starts["chain"]), refused: traceparent(starts["fatal"]),
                      **{i: traceparent(starts["input_map"]) for i in mapped}}

    steps = [s for s in finished if s.name.startswith("pgflow step ")]
    by_task = {(s.attributes["pgflow.instance_id"], s.attributes["pgflow.step"], s.attributes["pgflow.task_index"],
                s.attributes["pgflow.attempt"]): s for s in steps}
    assert set(by_task) == {(ok, "first", -1, 1), (ok, "second", -1, 1), (ok, "third", -1, 1),
                            (refused, "refuse", -1, 1),
                            (mapped[0], "double", 0, 1), (mapped[0], "double", 1, 1), (mapped[1], "double", 0, 1)}
    assert len(steps) == len(by_task)
    flows = {ok: "chain", refused: "fatal", mapped[0]: "input_map", mapped[1]: "input_map"}
    for (iid, step, _index, _attempt), span in by_task.items():
        assert span.parent.span_id == starts[flows[iid]].context.span_id
        assert span.kind == SpanKind.CONSUMER and span.name == f"pgflow step {flows[iid]}.{step}"
        assert span.attributes["pgflow.flow"] == flows[iid] and span.attributes["pgflow.queue"] == "pgflow"
    for key in [(ok, "first", -1, 1), (mapped[1], "double", 0, 1)]:
        assert by_task[key].status.status_code == StatusCode.UNSET
    failure = by_task[(refused, "refuse", -1, 1)]
    assert failure.status.status_code == StatusCode.ERROR
    assert failure.status.description == "NonRetryableError: no point retrying"
    assert failure.attributes["pgflow.retried"] is False
    assert [e.name for e in failure.events] == ["exception"]


def test_worker_processes_continue_the_trace(dsn, engine_factory, spans, tmp_path):
    """Real `pgflow worker` processes (forked children) export their step spans (JSON lines, see
    otel_file_export); they are children of the start span of this process."""
    spans.clear()
    exported = tmp_path / "spans.jsonl"
    engine = engine_factory(PGFLOW_TEST_SPANS=str(exported))
    engine.coordinator()
    engine.worker("--import", "support.otel_file_export")
    with trace.get_tracer("test").start_as_current_span("request"):
        iid = pgflow.start(sf.chain, {"n": 1, "label": "x"}, dsn=dsn)
    assert pgflow.wait(iid, timeout=60, dsn=dsn).status == "completed"
    [start] = [s for s in spans.get_finished_spans() if s.name == "pgflow start chain"]

    def step_spans() -> list[dict[str, Any]]:
        text = exported.read_text() if exported.exists() else ""
        complete = text.split("\n")[:-1]  # a worker may be writing the last line
        return [s for s in map(json.loads, complete) if s["attributes"].get("pgflow.instance_id") == iid]

    wait_until(lambda: len(step_spans()) == 3, what="3 step spans in the export file")
    assert not engine.stop()
    found = step_spans()
    assert sorted(s["attributes"]["pgflow.step"] for s in found) == ["first", "second", "third"]
    for span in found:
        assert int(span["context"]["trace_id"], 16) == start.context.trace_id
        assert int(span["parent_id"], 16) == start.context.span_id
        assert span["kind"] == "SpanKind.CONSUMER" and span["resource"]["attributes"]["service.name"] == \
            "pgflow-test-worker"


def test_roles_store_a_trace_context_without_new_privileges(dsn, server, spans):
    """An ordinary role (pgflow.grant_usage) starts traced instances: the context arrives through the
    column's default, from SQL (a malformed one is not kept) as from Python; a Python start stores its own
    span's context, never one set earlier in the same transaction."""
    admin_dsn, _ = server
    role = f"pgflow_tracer_{uuid.uuid4().hex[:8]}"
    run_sql(admin_dsn, f'CREATE ROLE "{role}" LOGIN')
    spans.clear()
    try:
        run_sql(dsn, "SELECT pgflow.grant_usage(%s)", (role,))
        good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        by_sql, by_python = [], []
        with psycopg.connect(make_conninfo(dsn, user=role)) as conn:
            conn.execute("SELECT pgflow.register_flow(%s, %s, %s, %s::jsonb)",
                         (sf.chain.name, sf.chain.version, sf.chain.ref, sf.chain.shape_json))
            for value in (good, "not a traceparent", ""):
                conn.execute("SELECT set_config('pgflow.trace_context', %s, true)", (value,))
                by_sql.append(conn.execute("SELECT pgflow.start_instance('chain', %s, '{}', NULL)",
                                           (sf.chain.version,)).fetchone()[0])
                by_python += pgflow.start_many(sf.chain, [{"n": 1, "label": "x"}], conn=conn)
            conn.commit()
        stored = dict(run_sql(dsn, "SELECT id, trace_context FROM pgflow.instances"))
        assert [stored[i] for i in by_sql] == [good, None, None]
        starts = [s for s in spans.get_finished_spans() if s.name == "pgflow start chain"]
        assert [stored[i] for i in by_python] == [traceparent(s) for s in starts]
        assert len(set(stored[i] for i in by_python)) == 3
    finally:
        run_sql(dsn, f'DROP OWNED BY "{role}"')
        run_sql(admin_dsn, f'DROP ROLE IF EXISTS "{role}"')


def test_without_opentelemetry_nothing_is_imported_or_stored(dsn, engine_factory, tmp_path):
    """A process where OpenTelemetry cannot be imported starts and runs an instance as before."""
    engine_factory().coordinator()
    script = tmp_path / "untraced.py"
    script.write_text(textwrap.dedent(f"""
        import sys, threading
        sys.modules["opentelemetry"] = None  # as if the [otel] extra were not installed
        import pgflow
        from support import sample_flows as sf
        from pgflow.engine.worker import Worker

        dsn = {dsn!r}
        iid = pgflow.start(sf.chain, {{"n": 1, "label": "x"}}, dsn=dsn)
        worker = Worker(dsn, poll_interval=0.1)
        assert worker.tracer is None
        thread = threading.Thread(target=worker.run)
        thread.start()
        status = pgflow.wait(iid, timeout=60, dsn=dsn).status
        worker.stop()
        thread.join(30)
        loaded = sorted(name for name, module in sys.modules.items()
                        if name.startswith("opentelemetry") and module is not None)
        print(iid, status, loaded)
    """))
    done = subprocess.run([sys.executable, str(script)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    iid, status, loaded = done.stdout.split(" ", 2)
    assert (status, loaded.strip()) == ("completed", "[]")
    assert run_sql(dsn, "SELECT trace_context FROM pgflow.instances WHERE id = %s", (int(iid),)) == [(None,)]
