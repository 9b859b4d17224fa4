"""Metrics and health endpoints of real `pgflow worker` / `pgflow coordinator` processes, scraped by a real
Prometheus (Debian package ``prometheus``: prometheus + promtool) that evaluates every query of the Grafana
dashboard and every alert rule of deploy/.

Without prometheus/promtool the tests that need them skip; the others still run. Everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import yaml
from conftest import run_sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from support import sample_flows as sf
from support import sample_trees
from support.endpoints import HOST, endpoint_up, free_port, http_get, wait_for

import pgflow
from pgflow import metrics as pm
from pgflow.db.migrations import LATEST_VERSION
from pgflow.health import Health, readiness

REPO = Path(__file__).resolve().parents[2]
RULES_FILE = REPO / "deploy" / "prometheus" / "rules.yml"
DASHBOARD_FILE = REPO / "deploy" / "grafana" / "pgflow.json"


# --------------------------------------------------------------------------- helpers


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package `prometheus`: apt-get install -y prometheus)")
    return path


# --------------------------------------------------------------------------- multiprocess mode, in isolation

CHILD_SCRIPT = textwrap.dedent("""
    import json, os, sys, urllib.request
    from pgflow import metrics as pm
    from pgflow.engine.supervisor import _mark_dead
    from pgflow.health import Health

    path = pm.enable_multiprocess()
    assert pm.enable_multiprocess() == path          # idempotent in one process
    import multiprocess

    server = pm.serve(int(sys.argv[1]), Health(), lambda: (True, "ready"))
    m = pm.metrics()
    m.workers_alive.labels("q").set(1)               # set by the parent (supervisor) only

    def child():
        m.completed.labels("f", "s", "q").inc(3)
        m.step_duration.labels("f", "s", "q").observe(0.02)
        m.in_flight.labels("q").inc()                 # dies "in flight"

    p = multiprocess.get_context("fork").Process(target=child)
    p.start()
    p.join()
    url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
    before = urllib.request.urlopen(url).read().decode()
    _mark_dead(p.pid)
    after = urllib.request.urlopen(url).read().decode()
    print(json.dumps({"dir": path, "child_exit": p.exitcode, "before": before, "after": after}))
""")


def stale_multiprocess_dir(path: Path) -> None:
    """Files such as an earlier run (same PROMETHEUS_MULTIPROC_DIR, e.g. an emptyDir that survived a container
    restart) leaves behind: large counts for the very series the tests check."""
    script = textwrap.dedent("""
        from pgflow import metrics as pm
        m = pm.metrics()
        for flow, step in (("f", "s"), ("wide", "square"), ("wide", "numbers"), ("flaky", "wobble")):
            m.completed.labels(flow, step, "q").inc(1000)
            m.completed.labels(flow, step, "pgflow").inc(1000)
        m.instance_duration.labels("wide").observe(1)
        m.in_flight.labels("q").inc(500)
        m.in_flight.labels("pgflow").inc(500)
        m.workers_alive.labels("pgflow").set(99)
        m.instances.labels("wide", "completed").set(1000)
    """)
    path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(path))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert list(path.glob("*.db")), "the stale run wrote no files"


def test_a_child_process_counter_is_visible_on_the_parents_endpoint(tmp_path):
    """enable_multiprocess + serve + a forked child: the parent's /metrics aggregates the child's samples,
    ignores stale files of an inherited PROMETHEUS_MULTIPROC_DIR, and drops a dead child's live gauge."""
    stale = tmp_path / "inherited"
    stale_multiprocess_dir(stale)
    stale_files = sorted(p.name for p in stale.iterdir())
    port = free_port()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(stale))
    out = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, str(port)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["child_exit"] == 0
    before, after = samples(report["before"]), samples(report["after"])
    # the child's counter and histogram, and nothing of the stale run (which counted 1000)
    assert value(before, "pgflow_steps_completed_total", flow="f", step="s", queue="q") == 3
    assert value(before, "pgflow_step_duration_seconds_count", flow="f", step="s", queue="q") == 1
    assert value(before, "pgflow_step_duration_seconds_bucket", flow="f", step="s", queue="q", le="0.025") == 1
    assert value(before, "pgflow_worker_processes_alive", queue="q") == 1
    assert value(before, "pgflow_steps_in_flight", queue="q") == 1  # livesum: the child's, until marked dead
    assert value(after, "pgflow_steps_in_flight", queue="q") is None
    assert value(after, "pgflow_steps_completed_total", flow="f", step="s", queue="q") == 3  # counters stay
    # a fresh directory inside the inherited one, removed at exit; the inherited files are left alone
    assert Path(report["dir"]).parent == stale
    assert not Path(report["dir"]).exists()
    assert sorted(p.name for p in stale.iterdir()) == stale_files


def test_health_endpoints_in_process():
    """/healthz follows Health.beat, /readyz the readiness callback, unknown paths 404, query strings ignored."""
    health = Health(stuck_after=60)
    ready = {"ok": (False, "not ready: testing")}
    port = free_port()
    server = pm.serve(port, health, lambda: ready["ok"])
    try:
        base = f"http://{HOST}:{port}"
        assert server.server_address[0] == HOST
        assert http_get(base + "/healthz") == (200, "ok\n")
        assert http_get(base + "/readyz") == (503, "not ready: testing\n")
        ready["ok"] = (True, "ready")
        assert http_get(base + "/readyz") == (200, "ready\n")
        assert http_get(base + "/nope")[0] == 404
        assert http_get(base + "/metrics?debug=1")[0] == 200
        health.last_beat -= 61  # no beat for longer than stuck_after: the main loop is "stuck"
        code, body = http_get(base + "/healthz")
        assert code == 503 and body.startswith("main loop stuck for "), body
        health.beat()
        assert http_get(base + "/healthz")[0] == 200
        for _ in range(health.max_restarts - 1):
            health.restarted()
        assert http_get(base + "/healthz")[0] == 200  # a few restarts are what a supervisor is for
        health.restarted()
        code, body = http_get(base + "/healthz")
        assert code == 503 and "crash-looping: 5 restarts in 60 s" in body, body
        assert pm.serve(0, health, lambda: (True, "")) is None  # port 0: off
    finally:
        server.shutdown()
        server.server_close()


def test_readiness_needs_a_reachable_initialised_database(server, dsn):
    admin_dsn, _ = server
    assert readiness(dsn)() == (True, "ready")
    ok, why = readiness(make_conninfo(dsn, port=free_port(), host=HOST))()  # nothing listens there
    assert not ok and "cannot connect" in why
    port = free_port()
    for unreachable in (make_conninfo(dsn, port=port, host=HOST, password="pw-in-keyword-form"),
                        f"postgresql://u:pw%40in-url@{HOST}:{port}/db?sslmode=disable",
                        f"postgresql://u@{HOST}:{port}/db?password=pw-in-query"):
        ok, why = readiness(unreachable)()
        assert not ok and "cannot connect" in why
        assert "pw-in" not in why and "pw%40in" not in why and "pw@in" not in why, why
    empty = f"pgflow_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{empty}"')
    try:
        ok, why = readiness(make_conninfo(admin_dsn, dbname=empty))()
        assert not ok and "version 0" in why and "pgflow init" in why
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')


def test_readyz_of_a_running_coordinator_follows_the_database(server, dsn, engine_factory):
    """A real coordinator: /readyz turns 503 when its database refuses new connections or its schema is not
    at the version the code needs, and 200 again afterwards; /healthz stays 200 meanwhile."""
    admin_dsn, _ = server
    name = conninfo_to_dict(dsn)["dbname"]
    port = free_port()
    engine = engine_factory()
    engine.coordinator("--metrics-port", str(port))
    wait_for(lambda: endpoint_up(port), 60, "the coordinator's /healthz")
    base = f"http://{HOST}:{port}"
    assert http_get(base + "/readyz") == (200, "ready\n")
    for _ in range(5):  # probes reuse one connection rather than opening one each
        assert http_get(base + "/readyz") == (200, "ready\n")
    probe_sessions = run_sql(admin_dsn, "SELECT pid FROM pg_stat_activity"
                             " WHERE datname = %s AND application_name = 'pgflow readiness'", (name,))
    assert len(probe_sessions) == 1, probe_sessions
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        code, body = http_get(base + "/readyz")
        assert code == 503 and "cannot connect" in body, body
        assert http_get(base + "/healthz")[0] == 200
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    assert http_get(base + "/readyz")[0] == 200
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE saved_migrations AS SELECT * FROM pgflow.migrations")
        conn.execute("DELETE FROM pgflow.migrations WHERE version = %s", (LATEST_VERSION,))
        try:
            code, body = http_get(base + "/readyz")
            assert code == 503 and "pgflow init" in body, body
            assert http_get(base + "/healthz")[0] == 200
        finally:
            conn.execute("INSERT INTO pgflow.migrations SELECT * FROM saved_migrations ON CONFLICT DO NOTHING")
    assert http_get(base + "/readyz") == (200, "ready\n")


def test_healthz_of_a_crash_looping_worker_fails_and_counts_restarts(server, dsn, engine_factory):
    """Worker processes that keep dying (here: their schema check fails on every reconnect) are restarted
    and counted, and the worker's /healthz turns 503 so that Kubernetes restarts the pod and alerts fire."""
    admin_dsn, _ = server
    name = conninfo_to_dict(dsn)["dbname"]
    port = free_port()
    engine = engine_factory()
    engine.worker("--metrics-port", str(port), concurrency=2)
    wait_for(lambda: endpoint_up(port), 60, "the worker's /healthz")
    base = f"http://{HOST}:{port}"
    wait_for(lambda: run_sql(admin_dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                             " AND application_name <> 'pgflow readiness'", (name,))[0][0] >= 4,
             60, "both worker processes connected")
    run_sql(dsn, "UPDATE pgflow.migrations SET compatible_from = version + 1"
                 " WHERE version = (SELECT max(version) FROM pgflow.migrations)")  # a schema this code can't run
    run_sql(admin_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    def crash_looping() -> str:
        code, body = http_get(base + "/healthz")
        assert code == 503, (code, body)
        return body

    assert "crash-looping" in wait_for(crash_looping, 120, "/healthz to report the crash loop")
    restarts = value(samples(http_get(base + "/metrics")[1]), "pgflow_worker_restarts_total", queue="*")
    assert restarts is not None and restarts >= 5, restarts


def test_step_labels_of_a_tree_workflow_do_not_grow_with_its_width_or_iterations(dsn, engine_factory):
    """A 150-wide join and a loop of 20 iterations of SQL and Python leaves: the step label is the leaf's
    kind, so the flow has a handful of series, not one per branch or iteration."""
    from pgflow import tree as t

    port = free_port()
    engine = engine_factory()
    engine.coordinator()
    engine.worker("--metrics-port", str(port), concurrency=2)
    wide = t.join(*[f"SELECT {i} AS n" for i in range(150)]).named("counts") >> t.python(sample_trees.total)
    counted = t.loop("INSERT INTO loop_count DEFAULT VALUES"
                     >> t.if_("SELECT count(*) >= 20 FROM loop_count", t.brk("SELECT 'done' AS v")))
    run_sql(dsn, "CREATE TABLE loop_count (id serial)")
    ids = [pgflow.start(wide, name="wide", dsn=dsn), pgflow.start(counted, name="loop", dsn=dsn)]
    finished = [pgflow.wait(i, 120, dsn=dsn) for i in ids]
    assert [f.status for f in finished] == ["completed", "completed"], finished
    flows = {i: pgflow.status(i, dsn=dsn).flow for i in ids}

    def step_labels() -> dict[str, set[str]]:
        found = samples(http_get(f"http://{HOST}:{port}/metrics")[1])
        labels: dict[str, set[str]] = {}
        for name, pairs in found:
            pairs = dict(pairs)
            if name == "pgflow_steps_completed_total" and pairs.get("flow") in flows.values():
                labels.setdefault(pairs["flow"], set()).add(pairs["step"])
        assert set(labels) == set(flows.values()), labels
        return labels

    labels = wait_for(step_labels, 60, "the flows' step series")
    assert labels[flows[ids[0]]] == {"sql", "python:support.sample_trees:total"}
    assert labels[flows[ids[1]]] == {"sql"}
    assert run_sql(dsn, "SELECT count(*) FROM loop_count")[0][0] == 20


# --------------------------------------------------------------------------- real processes, exact counts


def test_process_metrics_count_exactly_the_work_done(dsn, engine_factory, tmp_path):
    """`pgflow worker --concurrency 2` and `pgflow coordinator`, both started with an inherited
    PROMETHEUS_MULTIPROC_DIR full of stale files: every count equals what the database says happened."""
    stale = tmp_path / "inherited"
    stale_multiprocess_dir(stale)
    stale_files = sorted(p.name for p in stale.iterdir())
    worker_port, coordinator_port = free_port(), free_port()
    engine = engine_factory(PROMETHEUS_MULTIPROC_DIR=str(stale))
    engine.coordinator("--metrics-port", str(coordinator_port), "--maintenance-every", "0.5")
    worker = engine.worker("--metrics-port", str(worker_port), concurrency=2)
    wide = [pgflow.start(sf.wide, 40, dsn=dsn) for _ in range(2)]
    flaky = pgflow.start(sf.flaky, {"succeed_on": 2}, dsn=dsn)
    broken = pgflow.start(sf.broken, "x", dsn=dsn)
    for iid in (*wide, flaky):
        assert pgflow.wait(iid, 60, dsn=dsn).status == "completed"
    assert pgflow.wait(broken, 60, dsn=dsn).status == "failed"

    with psycopg.connect(dsn) as conn:
        total_messages = conn.execute("SELECT total_messages FROM pgmq.metrics('pgflow')").fetchone()[0]
    expected_worker = {
        ("pgflow_steps_completed_total", "wide", "numbers"): 2,
        ("pgflow_steps_completed_total", "wide", "square"): 80,
        ("pgflow_steps_completed_total", "wide", "total"): 2,
        ("pgflow_steps_completed_total", "flaky", "wobble"): 1,
        ("pgflow_steps_retried_total", "flaky", "wobble"): 1,
        ("pgflow_steps_retried_total", "broken", "explode"): 1,
        ("pgflow_steps_failed_total", "broken", "explode"): 1,
        ("pgflow_steps_started_total", "flaky", "wobble"): 2,
        ("pgflow_steps_started_total", "broken", "explode"): 2,
        ("pgflow_steps_started_total", "wide", "square"): 80,
        ("pgflow_step_duration_seconds_count", "wide", "square"): 80,
        ("pgflow_step_duration_seconds_count", "broken", "explode"): 2,
    }

    def worker_matches():
        found = samples(http_get(f"http://{HOST}:{worker_port}/metrics")[1])
        got = {k: value(found, k[0], flow=k[1], step=k[2], queue="pgflow") for k in expected_worker}
        got["alive"] = value(found, "pgflow_worker_processes_alive", queue="*")  # serves every queue: once
        got["in_flight"] = value(found, "pgflow_steps_in_flight", queue="pgflow")
        # every message sent was read for the first time exactly once: one enqueue-to-start observation each
        got["waits"] = value(found, "pgflow_task_queue_wait_seconds_count", queue="pgflow")
        got["restarts"] = value(found, "pgflow_worker_restarts_total", queue="*")
        want = {**expected_worker, "alive": 2, "in_flight": 0, "waits": total_messages, "restarts": 0}
        assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        return found

    def coordinator_matches():
        found = samples(http_get(f"http://{HOST}:{coordinator_port}/metrics")[1])
        got = {
            "wide durations": value(found, "pgflow_instance_duration_seconds_count", flow="wide"),
            "flaky durations": value(found, "pgflow_instance_duration_seconds_count", flow="flaky"),
            "broken durations": value(found, "pgflow_instance_duration_seconds_count", flow="broken"),
            "wide completed": value(found, "pgflow_instances", flow="wide", status="completed"),
            "broken failed": value(found, "pgflow_instances", flow="broken", status="failed"),
            "depth": value(found, "pgflow_queue_depth", queue="pgflow"),
            "oldest": value(found, "pgflow_queue_oldest_message_age_seconds", queue="pgflow"),
            "total": value(found, "pgflow_queue_messages_total", queue="pgflow"),
            "wide outcomes": value(found, "pgflow_instances_finished_total", flow="wide", status="completed"),
            "flaky outcomes": value(found, "pgflow_instances_finished_total", flow="flaky", status="completed"),
            "broken outcomes": value(found, "pgflow_instances_finished_total", flow="broken", status="failed"),
            "wake-ups due": value(found, "pgflow_wakeups_due"),
            "dead letters": value(found, "pgflow_dead_letters_stored", queue="pgflow"),
            "build": value(found, "pgflow_build_info", version=pgflow.__version__,
                           schema_version=str(LATEST_VERSION), python=platform.python_version()),
        }
        want = {"wide durations": 2, "flaky durations": 1, "broken durations": None, "wide completed": 2,
                "broken failed": 1, "depth": 0, "oldest": 0, "total": total_messages, "wide outcomes": 2,
                "flaky outcomes": 1, "broken outcomes": 1, "wake-ups due": 0, "dead letters": 0, "build": 1}
        assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        return found

    worker_found = wait_for(worker_matches, 60, "worker metrics to match the work done")
    coordinator_found = wait_for(coordinator_matches, 60, "coordinator metrics to match the work done")
    # the coordinator is one process: its default registry (process_* metrics), not multiprocess files
    assert value(coordinator_found, "process_cpu_seconds_total") is not None
    assert not any(name.startswith("process_") for name, _ in worker_found)  # the worker: aggregated files
    assert "# TYPE pgflow_queue_messages_total counter" in \
        http_get(f"http://{HOST}:{coordinator_port}/metrics")[1]
    for port in (worker_port, coordinator_port):
        assert http_get(f"http://{HOST}:{port}/healthz") == (200, "ok\n")
        assert http_get(f"http://{HOST}:{port}/readyz") == (200, "ready\n")

    # only the supervisor listens on the metrics port: its forked children closed the inherited socket
    children = psutil.Process(worker.pid).children()
    assert len(children) == 2
    for child in children:
        connections = getattr(child, "net_connections", child.connections)(kind="tcp")
        assert not [c for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == worker_port]

    # the worker's own directory was created inside the inherited one and is removed when it exits (SIGTERM)
    own = [p for p in stale.iterdir() if p.is_dir()]
    assert len(own) == 1 and list(own[0].glob("*.db")), own
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert sorted(p.name for p in stale.iterdir()) == stale_files


# --------------------------------------------------------------------------- a real Prometheus

TEMPLATE_VARIABLES = {"flow": ".*", "queue": ".*", "__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with the template variables substituted) for every target of the dashboard."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    def substitute(expr: str) -> str:
        expr = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", lambda m: TEMPLATE_VARIABLES[m[1] or m[2]], expr)
        assert "$" not in expr, expr
        return expr

    found = [(p["title"], substitute(t["expr"])) for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert len(found) >= 10, found
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules and all("alert" in r and "expr" in r for r in rules)
    return rules


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own storage, scraping the given jobs every second."""

    def __init__(self, binary: str, workdir: Path, jobs: dict[str, int]) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES_FILE)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"{HOST}:{port}"]}]}
                               for job, port in jobs.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={HOST}:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-3000:]}"
        return http_get(self.url + "/-/ready", timeout=2)[0] == 200

    def api(self, path: str, **params: str) -> Any:
        code, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        reply = json.loads(body)
        assert code == 200 and reply["status"] == "success", (path, params, code, body[:2000])
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def promtool_check_metrics(promtool: str, text: str, what: str) -> None:
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"promtool check metrics ({what}): {out.stdout}{out.stderr}"


def test_prometheus_evaluates_every_dashboard_query_and_alert(dsn, engine_factory, tmp_path):
    promtool, prometheus_bin = tool("promtool"), tool("prometheus")
    out = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    queries, rules = dashboard_queries(), alert_rules()

    worker_port, coordinator_port = free_port(), free_port()
    engine = engine_factory()
    engine.coordinator("--metrics-port", str(coordinator_port), "--maintenance-every", "0.5")
    engine.worker("--metrics-port", str(worker_port), concurrency=2)  # every queue (no --queue)
    prometheus = Prometheus(prometheus_bin, tmp_path,
                            {"pgflow-worker": worker_port, "pgflow-coordinator": coordinator_port})
    try:
        wait_for(prometheus.ready, 60, "prometheus to be ready")
        for port in (worker_port, coordinator_port):
            wait_for(lambda port=port: endpoint_up(port), 60, f"/healthz on {port}")
        # Prometheus holds a sample of the queue's dead-letter count from before the workload: the alert on its
        # growth compares with it (without it, a busy machine whose first scrapes come late would see the
        # count only once it has stopped growing)
        run_sql(dsn, "SELECT pgflow.ensure_queue('pgflow')")
        wait_for(lambda: prometheus.query('pgflow_dead_letters_stored{queue="pgflow"} == 0'), 60,
                 "prometheus to scrape the queue's dead-letter count before any dead letter")

        # a workload spread over several scrapes, so that rates (completions, failures, retries) are non-zero
        started: list[tuple[int, str]] = []
        for i in range(16):
            started.append((pgflow.start(sf.wide, 30, dsn=dsn), "completed"))
            if i % 2 == 0:
                started.append((pgflow.start(sf.broken, i, dsn=dsn), "failed"))
                started.append((pgflow.start(sf.flaky, {"succeed_on": 2}, dsn=dsn), "completed"))
            if i % 8 == 0:  # a message that can never run: a dead letter
                run_sql(dsn, "SELECT pgmq.send('pgflow', '\"not a task\"'::jsonb)")
            time.sleep(0.5)
        for iid, status in started:
            assert pgflow.wait(iid, 60, dsn=dsn).status == status

        up = wait_for(lambda: len(prometheus.query("up == 1")) == 2 and prometheus.query("up"), 60,
                      "both targets up")
        assert {r["metric"]["job"] for r in up} == {"pgflow-worker", "pgflow-coordinator"}

        # every dashboard query evaluates and returns data
        def dashboard_has_data():
            empty = [(title, expr) for title, expr in queries if not prometheus.query(expr)]
            assert not empty, empty
            return True

        wait_for(dashboard_has_data, 60, "every dashboard query to return data", interval=1.0)
        results = {expr: prometheus.query(expr) for _, expr in queries}
        numbers = {expr: [float(r["value"][1]) for r in result] for expr, result in results.items()}
        ratio = next(e for t, e in queries if t == "Failure ratio")
        assert 0 < numbers[ratio][0] < 1, numbers[ratio]  # broken fails, the rest completes
        for title, expr in queries:
            if "histogram_quantile" in expr:  # latencies were observed within the window
                assert any(v == v for v in numbers[expr]), (title, expr, numbers[expr])  # not all NaN
            if "rate(pgflow_steps_completed_total" in expr and "failed" not in expr:
                assert sum(numbers[expr]) > 0, (title, expr)

        # the template variables (label_values(metric, label)) have values
        dashboard = json.loads(DASHBOARD_FILE.read_text())
        for variable in dashboard["templating"]["list"]:
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable.get("query", ""))
            if match:
                values = prometheus.api(f"label/{match[2]}/values", **{"match[]": match[1]})
                assert values, variable["name"]
        assert "pgflow" in prometheus.api("label/queue/values", **{"match[]": "pgflow_queue_depth"})

        # every alert expression evaluates; the ones this setup must trigger (or not) do so. Checked until they
        # agree: on a busy machine one scrape may time out, and until the next one `up` is 0 (which is what
        # the coordinator alerts are for)
        def alerts_as_expected():
            by_name = {rule["alert"]: prometheus.query(rule["expr"]) for rule in rules}
            assert by_name["PgflowCoordinatorDown"] == []
            assert [r["value"][1] for r in by_name["PgflowCoordinatorNotRedundant"]] == ["1"]  # one coordinator
            failing = {(r["metric"]["flow"], r["metric"]["step"]) for r in by_name["PgflowStepFailureRatioHigh"]}
            assert failing == {("broken", "explode")}, failing
            # a worker serving every queue reports its processes once, as queue "*", which the no-workers alert
            # counts for every queue
            alive = prometheus.query("sum by (queue) (pgflow_worker_processes_alive)")
            assert {r["metric"]["queue"]: r["value"][1] for r in alive} == {"*": "2"}
            assert by_name["PgflowQueueHasNoWorkers"] == []
            dead = prometheus.query("sum by (queue) (pgflow_dead_letters_total)")
            assert {r["metric"]["queue"]: r["value"][1] for r in dead} == {"pgflow": "2"}
            assert [r["metric"]["queue"] for r in by_name["PgflowDeadLettersGrowing"]] == ["pgflow"]
            return by_name

        by_name = wait_for(alerts_as_expected, 60, "the alert expressions to give the expected values")

        # Prometheus itself evaluates the loaded rule file without errors
        def rules_evaluated():
            loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
            assert {r["name"] for r in loaded} == set(by_name), loaded
            assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
            return True

        wait_for(rules_evaluated, 60, "prometheus to evaluate the rules")

        # the exposition of both processes passes promtool's lint
        promtool_check_metrics(promtool, http_get(f"http://{HOST}:{worker_port}/metrics")[1], "worker")
        promtool_check_metrics(promtool, http_get(f"http://{HOST}:{coordinator_port}/metrics")[1], "coordinator")
    except BaseException:
        print(prometheus.log.read_text()[-5000:], file=sys.stderr)
        raise
    finally:
        prometheus.stop()
