"""The commands the Helm chart's hooks run, taken from the rendered chart and run here for real: the
migrations Job's `pgflow init --queue ...` against a real database, and both containers of the `helm test`
Pod (`pgflow list`, and the /readyz check against pgflow's own health server)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys

import psycopg
import pytest
from conftest import pgflow_command, subprocess_env
from psycopg.conninfo import make_conninfo
from support import deploy_helpers as h

from pgflow.health import Health, readiness
from pgflow.metrics import serve
from pgflow.queues import queue_names

COMPONENT = "app.kubernetes.io/component"


def _container(objects, kind, component, name):
    (owner,) = h.find(objects, kind, {COMPONENT: component})
    return next(c for c in h.pod_spec(owner)["containers"] if c["name"] == name)


def _run_pgflow(args, dsn):
    return subprocess.run(pgflow_command(*args), env=subprocess_env(PGFLOW_DSN=dsn),
                          capture_output=True, text=True, timeout=120)


def test_migrations_job_creates_the_declared_queues(dsn):
    objects = h.render_chart(h.load_values_file(h.MULTI_QUEUE_VALUES), release="acme", namespace="jobs")
    args = _container(objects, "Job", "migrations", "init")["args"]
    declared = [args[i + 1] for i, arg in enumerate(args) if arg == "--queue"]
    assert declared == ["default", "etl_heavy", "notify"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert not set(declared) & set(queue_names(conn))
    for _ in range(2):  # every install/upgrade runs it again: idempotent
        result = _run_pgflow(args, dsn)
        assert result.returncode == 0, result.stdout + result.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert set(declared) <= set(queue_names(conn))


def _missing_database(dsn):
    return make_conninfo(dsn, dbname="pgflow_no_such_database")


def test_helm_test_database_check(dsn):
    args = _container(h.render_chart(), "Pod", "test", "database")["args"]
    result = _run_pgflow(args, dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run_pgflow(args, _missing_database(dsn))
    assert result.returncode != 0


@contextlib.contextmanager
def _health_server(dsn):
    """pgflow's own /metrics, /healthz, /readyz server, with its real readiness check of ``dsn``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve(port, Health(), readiness(dsn))
    try:
        yield f"http://127.0.0.1:{port}/readyz"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("ready", [True, False], ids=["ready", "not-ready"])
def test_helm_test_services_check(dsn, ready, monkeypatch):
    monkeypatch.delenv("PGFLOW_METRICS_HOST", raising=False)
    container = _container(h.render_chart(), "Pod", "test", "services")
    assert container["command"] == ["python", "-c"]
    script, *urls = container["args"]
    assert len(urls) == 2  # the coordinator's and the workers' Service
    with _health_server(dsn if ready else _missing_database(dsn)) as url:
        result = subprocess.run([sys.executable, "-c", script, url, url], capture_output=True, text=True,
                                timeout=60)
    if ready:
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines() == [f"{url} 200 ready"] * 2
    else:
        assert result.returncode != 0
        assert "503" in result.stderr
