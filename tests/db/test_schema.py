"""The schema has one truth: src/pgflow/sql/schema/ (one file per concept, each object defined once). A fresh
database is built from it; an existing one is brought forward by src/pgflow/sql/migrations/. Both paths must
give the same database: the catalogs (functions with their bodies and attributes, tables, columns, constraints,
indexes, policies, grants, operators, domains, storage options, comments...) are compared here."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import fresh_database, pgflow_command, subprocess_env

from pgflow import PgflowError, statuses
from pgflow.db import migrations as store
from pgflow.db.connection import connect

CATALOG_SQL = Path(__file__).parents[1] / "data" / "catalog.sql"
SCHEMA_DIR = Path(statuses.__file__).parent / "sql" / "schema"
SECTIONS = ("schemas", "default_privileges", "functions", "operators", "relations", "columns", "constraints",
            "indexes", "policies", "triggers", "sequences", "types", "comments")


def catalog(conn: psycopg.Connection) -> dict[str, dict[str, object]]:
    """pgflow's objects as {section: {object: details}}, independent of OIDs and of creation order."""
    conn.execute(_catalog_query("acl_helper"))
    return {section: dict(conn.execute(_catalog_query(section)).fetchall()) for section in SECTIONS}


def _catalog_query(name: str) -> str:
    text = CATALOG_SQL.read_text()
    blocks = re.split(r"^-- name: (\w+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(blocks[1::2], blocks[2::2], strict=True))[name].strip()


def differences(a: dict[str, dict[str, object]], b: dict[str, dict[str, object]]) -> list[str]:
    """What differs between two catalogs, one line per object (empty when they are the same)."""
    found = []
    for section in SECTIONS:
        for key in sorted(a[section].keys() | b[section].keys()):
            left, right = a[section].get(key), b[section].get(key)
            if left != right:
                if left is None or right is None:
                    found.append(f"{section} {key}: only in {'B' if left is None else 'A'}")
                else:
                    fields = sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))
                    found.append(f"{section} {key}: " + "; ".join(
                        f"{k}: {left.get(k)!r} != {right.get(k)!r}" for k in fields))
    return found


def build_from_migrations(dsn: str) -> None:
    """What `pgflow init` did to this database had it been created before every migration: each migration
    applied in turn."""
    with connect(dsn) as conn, conn.transaction():
        store.install_pgmq(conn)
        store.Q.execute(conn, "create_migrations_table")
        store.apply_pending_migrations(conn, 0)


@pytest.fixture(scope="module")
def schema_db(server) -> Iterator[str]:
    """A database built by `pgflow init` from sql/schema/ (how every fresh database is built)."""
    with fresh_database(server[0], None) as dsn:
        store.init_schema(dsn)
        yield dsn


@pytest.fixture(scope="module")
def migrations_db(server) -> Iterator[str]:
    """A database built by applying sql/migrations/ one after the other."""
    with fresh_database(server[0], None) as dsn:
        build_from_migrations(dsn)
        yield dsn


def _recorded(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version, name, compatible_from FROM pgflow.migrations ORDER BY 1").fetchall()


def test_schema_and_migrations_build_the_same_database(schema_db, migrations_db):
    with psycopg.connect(schema_db) as a, psycopg.connect(migrations_db) as b:
        from_schema, from_migrations = catalog(a), catalog(b)
    assert differences(from_schema, from_migrations) == []
    assert len(from_schema["functions"]) > 50 and len(from_schema["policies"]) == 10  # the comparison saw them
    assert _recorded(schema_db) == _recorded(migrations_db)
    assert _recorded(schema_db)[-1][0] == store.LATEST_VERSION


DRIFTS = {
    "function body": ("CREATE OR REPLACE FUNCTION pgflow.open_step_statuses() RETURNS text[] LANGUAGE sql IMMUTABLE"
                      " AS $$ SELECT ARRAY['queued', 'running', 'retrying', 'mapping'] $$",
                      "functions pgflow.open_step_statuses(): body"),
    "security definer": ("ALTER FUNCTION pgflow.register_flow(text, text, text, jsonb, name) SECURITY INVOKER",
                         "functions pgflow.register_flow(text,text,text,jsonb,name): security_definer"),
    "search_path": ("ALTER FUNCTION pgflow.ensure_queue(text, name) RESET search_path",
                    "functions pgflow.ensure_queue(text,name): config"),
    "function grant": ("GRANT EXECUTE ON FUNCTION pgflow.claim_tasks(bigint[], bigint[], text[], integer[], text[],"
                       " text[]) TO PUBLIC", "functions pgflow.claim_tasks("),
    "table grant": ("GRANT SELECT ON pgflow.role_grants TO PUBLIC", "relations pgflow.role_grants: acl"),
    "column grant": ("GRANT UPDATE (label) ON pgflow.instances TO PUBLIC", "columns pgflow.instances.label: acl"),
    "column default": ("ALTER TABLE pgflow.steps ALTER COLUMN attempt SET DEFAULT 1",
                       "columns pgflow.steps.attempt: default"),
    "column type": ("ALTER TABLE pgflow.signals ALTER COLUMN name TYPE varchar", "columns pgflow.signals.name: type"),
    "new column": ("ALTER TABLE pgflow.flows ADD COLUMN note text", "columns pgflow.flows.note: only in B"),
    "constraint": ("ALTER TABLE pgflow.variables DROP CONSTRAINT variables_secret_ref_check",
                   "constraints pgflow.variables variables_secret_ref_check: only in A"),
    "domain": ("ALTER DOMAIN pgflow.step_status ADD CONSTRAINT extra CHECK (VALUE <> 'x')",
               "constraints pgflow.step_status extra: only in B"),
    "index": ("DROP INDEX pgflow.instances_label_id", "indexes pgflow.instances_label_id: only in A"),
    "storage option": ("ALTER TABLE pgflow.steps SET (fillfactor = 90)", "relations pgflow.steps: options"),
    "row security": ("ALTER TABLE pgflow.variables FORCE ROW LEVEL SECURITY",
                     "relations pgflow.variables: force_row_security"),
    "policy": ("ALTER POLICY own_variables ON pgflow.variables USING (true)",
               "policies pgflow.variables own_variables: using"),
    "operator": ("CREATE OPERATOR pgflow.<~ (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_seq)",
                 "operators pgflow.<~(text, text): only in B"),
    "trigger": ("CREATE TRIGGER t BEFORE UPDATE ON pgflow.queues FOR EACH ROW"
                " EXECUTE FUNCTION suppress_redundant_updates_trigger()", "triggers pgflow.queues t: only in B"),
    "comment": ("COMMENT ON TABLE pgflow.wakeups IS 'changed'", "comments pgflow.wakeups (table): only in B"),
}


@pytest.mark.parametrize("change, expected", list(DRIFTS.values()), ids=list(DRIFTS))
def test_the_comparison_sees_any_drift(schema_db, migrations_db, change, expected):
    """The check above can fail: a migration that forgets or changes anything is reported."""
    with psycopg.connect(schema_db) as a:
        reference = catalog(a)
    with psycopg.connect(migrations_db) as b, b.transaction(force_rollback=True):
        b.execute(change)
        found = differences(reference, catalog(b))
    assert any(line.startswith(expected) for line in found), found


def _schema_texts() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(SCHEMA_DIR.glob("*.sql"))}


def test_each_function_is_defined_once_in_its_final_form():
    """One file defines a function (its overloads included); nothing is redefined or altered later."""
    defined_in: dict[str, set[str]] = {}
    for name, text in _schema_texts().items():
        assert not re.search(r"^(CREATE\s+OR\s+REPLACE|ALTER\s+FUNCTION|DROP\s+FUNCTION)", text, re.MULTILINE), name
        for function in re.findall(r"^CREATE FUNCTION pgflow\.([\w\"]+)\(", text, flags=re.MULTILINE):
            defined_in.setdefault(function, set()).add(name)
    assert {f: files for f, files in defined_in.items() if len(files) > 1} == {}
    assert [name for name in _schema_texts() if name not in store.schema_files()] == []


def test_no_function_is_executable_by_public(schema_db):
    """Every pgflow function is owner-only until pgflow.grant_usage grants it (see SECURITY.md)."""
    with psycopg.connect(schema_db) as conn:
        functions = catalog(conn)["functions"]
    assert [sig for sig, f in functions.items() if ["PUBLIC", "EXECUTE", False] in f["acl"]] == []


def _domain_values(conn: psycopg.Connection, domain: str) -> set[str]:
    (definition,) = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = %s::regtype",
                                 (domain,)).fetchone()
    return set(re.findall(r"'(\w+)'::text", definition))


def test_the_status_vocabularies_are_the_same_in_sql_and_python(schema_db):
    with psycopg.connect(schema_db) as conn:
        assert _domain_values(conn, "pgflow.instance_status") == set(statuses.InstanceStatus)
        assert _domain_values(conn, "pgflow.step_status") == set(statuses.StepStatus)
        sets = conn.execute("SELECT pgflow.open_instance_statuses(), pgflow.open_step_statuses(),"
                            " pgflow.claimable_step_statuses()").fetchone()
        assert [set(s) for s in sets] == [statuses.OPEN_INSTANCE_STATUSES, statuses.OPEN_STEP_STATUSES,
                                          statuses.CLAIMABLE_STEP_STATUSES]
        for status in statuses.StepStatus:  # the domain takes every Python status, and nothing else
            assert conn.execute("SELECT %s::pgflow.step_status", (status.value,)).fetchone() == (status,)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("SELECT 'done'::pgflow.step_status")


# ------------------------------------------------------------------------------------------------ pgflow init

def test_init_builds_a_fresh_database_from_the_schema_and_then_only_migrates(empty_dsn):
    assert store.init_schema(empty_dsn) == [m.version for m in store.migrations()]
    assert store.init_schema(empty_dsn) == []
    with psycopg.connect(empty_dsn) as conn:
        assert store.schema_state(conn) == store.SchemaState(store.LATEST_VERSION,
                                                             max(m.compatible_from for m in store.migrations()))


PRE_SQUASH = [(1, "initial"), (2, "control_flow"), (3, "security"), (4, "hot_updates"), (5, "plans"),
              (6, "start_many"), (7, "read_tasks"), (8, "queues"), (9, "trace_context"), (10, "queue_wait")]


def test_a_database_initialised_before_the_squash_is_refused_with_the_fix(empty_dsn):
    with psycopg.connect(empty_dsn) as conn:
        store.Q.execute(conn, "create_migrations_table")
        for version, name in PRE_SQUASH:
            store.Q.execute(conn, "record_migration", {"version": version, "name": name, "compatible_from": version})
    refused = subprocess.run(pgflow_command("init", "--dsn", empty_dsn), env=subprocess_env(), capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "before the migrations were squashed" in line and "run `pgflow init` again" in line, line
    with connect(empty_dsn) as conn, pytest.raises(PgflowError, match="drop the database"):
        store.require_schema(conn)


WRITES = "INSERT, UPDATE, DELETE, TRUNCATE"


def test_migrating_takes_every_write_privilege_from_granted_roles(server):
    """Users write only through functions (migration 0010): a role granted usage before it held UPDATE on
    instance and step status and INSERT/UPDATE/DELETE on variables. Once migrated, its privileges are
    exactly those grant_usage gives on a fresh database: no write on any table but the INSERT of a proof of
    its own role (migration 0015; its trigger stamps and limits the row), the new functions."""
    target = next(m.version for m in store.migrations() if m.name == "users_write_through_functions")
    role = f"pgflow_mig_{uuid.uuid4().hex[:8]}"
    admin = server[0]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}"')
    try:
        with fresh_database(admin, None) as old, fresh_database(admin, None) as new:
            with connect(old) as conn, conn.transaction():
                store.install_pgmq(conn)
                store.Q.execute(conn, "create_migrations_table")
                for migration in store.migrations():
                    if migration.version < target:
                        store.apply_migration(conn, migration)
                conn.execute("SELECT pgflow.grant_usage(%s, true, true)", (role,))
            assert _writable(old, role) != []  # the premise: the role could write before
            with connect(old) as conn, conn.transaction():
                store.apply_pending_migrations(conn, target - 1)
            store.init_schema(new)
            with psycopg.connect(new, autocommit=True) as conn:
                conn.execute("SELECT pgflow.grant_usage(%s, true, true)", (role,))
            proofs_only = [("caller_proofs", "INSERT")]
            assert _writable(old, role) == proofs_only and _writable(new, role) == proofs_only
            with psycopg.connect(new) as a, psycopg.connect(old) as b:
                assert differences(catalog(a), catalog(b)) == []
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def _writable(dsn: str, role: str) -> list[tuple]:
    """pgflow's tables (or columns) ``role`` may write to, or lock beyond reading."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"""
            SELECT c.relname, p.priv FROM pg_class c, unnest(string_to_array('{WRITES}', ', ')) AS p(priv)
            WHERE c.relnamespace = 'pgflow'::regnamespace AND c.relkind IN ('r', 'p')
              AND (has_table_privilege(%(role)s, c.oid, p.priv)
                   OR (p.priv IN ('INSERT', 'UPDATE') AND has_any_column_privilege(%(role)s, c.oid, p.priv)))
            ORDER BY 1, 2""", {"role": role}).fetchall()


def test_migrating_rebuilds_every_executor_to_fire_deferred_triggers_as_its_role(server):
    """Migration 0016: executors made before it left a step's deferred triggers to commit time, where they ran
    as the worker's role (PostgreSQL 15-17). Every role's executors are rebuilt."""
    target = next(m.version for m in store.migrations() if m.name == "deferred_triggers")
    role = f"pgflow_exe_{uuid.uuid4().hex[:8]}"
    admin = server[0]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}"')
    bodies = ("SELECT count(*) FILTER (WHERE prosrc LIKE '%%SET CONSTRAINTS ALL IMMEDIATE%%'), count(*) "
              "FROM pg_proc WHERE pronamespace = 'pgflow_exec'::regnamespace AND proname = %s")
    try:
        with fresh_database(admin, None) as old, connect(old) as conn, conn.transaction():
            store.install_pgmq(conn)
            store.Q.execute(conn, "create_migrations_table")
            for migration in store.migrations():
                if migration.version < target:
                    store.apply_migration(conn, migration)
            conn.execute("SELECT pgflow.grant_usage(%s)", (role,))
            assert conn.execute(bodies, (role,)).fetchone() == (0, 2)  # the premise: both without it
            store.apply_pending_migrations(conn, target - 1)
            assert conn.execute(bodies, (role,)).fetchone() == (2, 2)
            assert conn.execute("SELECT bool_and(prosecdef) AND bool_and(proowner = %s::regrole) FROM pg_proc "
                                "WHERE pronamespace = 'pgflow_exec'::regnamespace AND proname = %s",
                                (role, role)).fetchone() == (True,)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')
