"""Rolling upgrades: the migrations Job of release N+1 runs while pods of release N still work.

The code of schema version N accepts a newer schema whose migrations declare ``-- compatible-from: N`` (they
only add things), so old pods keep completing steps beside new ones; a schema that declares itself
incompatible turns old pods unready and stops new old-version processes from starting, with the fix."""

from __future__ import annotations

import subprocess

from conftest import pgflow_command, run_sql, subprocess_env
from psycopg.conninfo import conninfo_to_dict
from support import sample_flows as sf
from support.endpoints import endpoint_up, free_port, http_get, wait_for

import pgflow
from pgflow.db import migrations
from pgflow.db.connection import connect

ADDITIVE = f"""-- compatible-from: {migrations.LATEST_VERSION}
ALTER TABLE pgflow.instances ADD COLUMN upgrade_test_note text;
CREATE FUNCTION pgflow.upgrade_test_feature() RETURNS integer LANGUAGE sql AS 'SELECT 1';
"""
BREAKING = "ALTER TABLE pgflow.instances ADD COLUMN upgrade_test_required text NOT NULL DEFAULT '';"


def apply_next_release(dsn: str, version: int, sql: str) -> None:
    """Apply a migration the way the next release's `pgflow init` would."""
    migration = migrations.Migration(version, f"upgrade_test_{version}", sql)
    with connect(dsn) as conn, conn.transaction():
        migrations.apply_migration(conn, migration)


def cut_connections(server, dsn: str) -> None:
    """Make every process reconnect (and so check the schema again), as a database failover would."""
    admin_dsn, _ = server
    name = conninfo_to_dict(dsn)["dbname"]
    run_sql(admin_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                       " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))


def test_old_pods_keep_completing_steps_against_a_compatible_newer_schema(server, dsn, engine_factory):
    port = free_port()
    engine = engine_factory()
    engine.coordinator()
    engine.worker("--metrics-port", str(port))
    wait_for(lambda: endpoint_up(port), 60, "the worker's /healthz")
    first = pgflow.wait(pgflow.start(sf.chain, {"n": 1, "label": "old"}, dsn=dsn), 60, dsn=dsn)
    assert first.status == "completed", first

    apply_next_release(dsn, migrations.LATEST_VERSION + 1, ADDITIVE)
    cut_connections(server, dsn)
    ids = [pgflow.start(sf.chain, {"n": i, "label": "upgraded"}, dsn=dsn) for i in range(5)]
    assert [pgflow.wait(i, 60, dsn=dsn).status for i in ids] == ["completed"] * 5
    assert http_get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
    version = run_sql(dsn, "SELECT max(version) FROM pgflow.migrations")[0][0]
    assert version == migrations.LATEST_VERSION + 1

    apply_next_release(dsn, migrations.LATEST_VERSION + 2, BREAKING)
    code, body = http_get(f"http://127.0.0.1:{port}/readyz")
    assert code == 503 and "upgrade it" in body, body
    refused = subprocess.run(pgflow_command("worker", "--dsn", dsn), env=subprocess_env(), capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"Error: the pgflow schema is at version {migrations.LATEST_VERSION + 2}, which needs pgflow code of schema "
        f"version {migrations.LATEST_VERSION + 2} or newer; this pgflow is {migrations.LATEST_VERSION}: upgrade it"]


def test_new_code_refuses_an_older_schema_with_the_fix(dsn):
    run_sql(dsn, "DELETE FROM pgflow.migrations WHERE version = (SELECT max(version) FROM pgflow.migrations)")
    older = run_sql(dsn, "SELECT coalesce(max(version), 0) FROM pgflow.migrations")[0][0]
    refused = subprocess.run(pgflow_command("worker", "--dsn", dsn), env=subprocess_env(), capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"Error: the pgflow schema is at version {older}, this pgflow needs "
        f"{migrations.LATEST_VERSION}: run `pgflow init`"]
