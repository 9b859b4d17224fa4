"""Grammars implemented twice, in SQL (checked when a workflow starts) and in Python (used when it runs), checked
against the same test vectors so that what the database accepts is what the engine can run:

* the ``$references`` of SQL steps (tests/data/references.json): pgflow.parse_sql_references, the validator's
  lexer, and pgflow.references.compile_sql, the worker's;
* cron expressions (tests/data/cron.json): pgflow.valid_cron, the one definition of a valid schedule, and the
  coordinator's croniter (pgflow.engine.tree.next_fire).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from conftest import fresh_database

from pgflow.engine.tree import next_fire
from pgflow.errors import FlowDefinitionError
from pgflow.references import compile_sql

DATA = Path(__file__).parents[1] / "data"
REFERENCES = json.loads((DATA / "references.json").read_text())["vectors"]
CRONS = json.loads((DATA / "cron.json").read_text())["vectors"]
# the coordinator computes fire times from "now": any time of any year must do
STARTS = [datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 6, 30, 23, 59, tzinfo=UTC),
          datetime(2097, 3, 1, 0, 0, tzinfo=UTC)]


@pytest.fixture(scope="module")
def db(server, template_db):
    """One initialised database for all vectors (read-only use)."""
    with fresh_database(server[0], template_db) as conninfo, psycopg.connect(conninfo, autocommit=True) as conn:
        yield conn


def _ids(vectors, key):
    return [repr(v[key])[:60] for v in vectors]


def _python_vector(vector):
    bug = vector.get("python_bug")
    marks = [pytest.mark.xfail(strict=True, reason=f"known references.py bug: {bug}")] if bug else []
    return pytest.param(vector, marks=marks)


def sql_references(conn: psycopg.Connection, sql: str) -> list[str] | str:
    """What the database's lexer finds: the references, or the error message."""
    try:
        return conn.execute("SELECT pgflow.parse_sql_references(%s)", (sql,)).fetchone()[0]
    except psycopg.errors.InvalidParameterValue as exc:
        return exc.diag.message_primary


def python_references(sql: str) -> list[str] | str:
    """What the worker's lexer finds: the references, or the error message."""
    try:
        return [str(ref) for ref in compile_sql(sql).references]
    except FlowDefinitionError as exc:
        return str(exc)


def _check(found: list[str] | str, vector: dict) -> None:
    if "error" in vector:
        assert isinstance(found, str) and vector["error"] in found, (vector["why"], found)
    else:
        assert found == vector["references"], vector["why"]


@pytest.mark.parametrize("vector", REFERENCES, ids=_ids(REFERENCES, "sql"))
def test_the_sql_validator_finds_the_references(db, vector):
    _check(sql_references(db, vector["sql"]), vector)


@pytest.mark.parametrize("vector", [_python_vector(v) for v in REFERENCES], ids=_ids(REFERENCES, "sql"))
def test_the_worker_finds_the_same_references(vector):
    _check(python_references(vector["sql"]), vector)


def test_sql_references_names_each_reference_once(db):
    names = db.execute("SELECT array_agg(n ORDER BY n) FROM pgflow.sql_references('SELECT $b.x, $a, $b?') n")
    assert names.fetchone()[0] == ["a", "b"]


def test_a_refused_sql_step_is_a_clean_start_error(db):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r'positional parameter \$1.*"SELECT \$1"'):
        db.execute("SELECT pgflow.tree_shape('SELECT $1')")


def _coordinator_schedules(cron: str) -> bool:
    try:
        for start in STARTS:
            assert next_fire(cron, start) > start
    except Exception:  # noqa: BLE001 - any failure means the coordinator could not run the wait
        return False
    return True


@pytest.mark.parametrize("vector", CRONS, ids=_ids(CRONS, "cron"))
def test_cron_validity_is_one_definition_the_coordinator_can_schedule(db, vector):
    assert db.execute("SELECT pgflow.valid_cron(%s)", (vector["cron"],)).fetchone()[0] is vector["valid"], vector["why"]
    expected = True if vector["valid"] else vector.get("croniter_accepts", False)
    assert _coordinator_schedules(vector["cron"]) is expected, vector["why"]
