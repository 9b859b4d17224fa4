"""Regressions of issue 13, found while running pg_durable's own SQL against pgflow: each test failed before
its fix. Real coordinator and worker processes; SQL started as a psql user would."""

from __future__ import annotations

import uuid
from decimal import Decimal

import psycopg
import pytest
from conftest import run_sql as sql

import pgflow


def finish(dsn: str, iid: int, timeout: float = 60) -> object:
    st = pgflow.wait(iid, timeout, dsn=dsn)
    assert st.status == "completed", (st.status, st.error, pgflow.explain(iid, dsn=dsn))
    return st.output


@pytest.mark.parametrize("prefix", ["", "'SELECT 0' ~> "], ids=["root", "nested"])
def test_break_in_a_loop_condition_ends_the_loop_with_its_value(dsn, engine, prefix):
    """Bug 1: the instance hung with every node done (the loop passed the break up instead of ending)."""
    iid = sql(dsn, f"SELECT pgflow.start({prefix}pgflow.loop('SELECT ''body'' AS b', "
                   "'SELECT 1' ~> pgflow.break_loop('SELECT 2 AS v')))")[0][0]
    assert finish(dsn, iid, 30) == [{"v": 2}]
    # the body never ran: the condition broke out before the first iteration
    assert sql(dsn, "SELECT count(*) FROM pgflow.steps WHERE instance_id = %s AND output::text LIKE '%%body%%'",
               (iid,)) == [(0,)]


def test_break_in_a_while_condition_of_a_later_iteration(dsn, engine):
    """A condition that breaks only on its third evaluation: two iterations ran, then the loop ended."""
    sql(dsn, "CREATE TABLE ticks (n int)")
    cond = ("pgflow.if_then('SELECT count(*) >= 2 FROM ticks', pgflow.break_loop('SELECT count(*) AS n FROM ticks'),"
            " 'SELECT true')")
    iid = sql(dsn, f"SELECT pgflow.start(pgflow.loop('INSERT INTO ticks VALUES (1)', {cond}))")[0][0]
    assert finish(dsn, iid, 60) == [{"n": 2}]
    assert sql(dsn, "SELECT count(*) FROM ticks") == [(2,)]


def _dblink_available(dsn: str) -> bool:
    return bool(sql(dsn, "SELECT 1 FROM pg_available_extensions WHERE name = 'dblink'"))


def test_detached_start_works_when_dblink_is_installed(dsn, engine):
    """Bug 2: with dblink installed, p_detached => true still said "needs the dblink extension" (dblink's
    name is overloaded, so to_regproc found nothing). A detached start survives the caller's rollback."""
    if not _dblink_available(dsn):
        pytest.skip("this PostgreSQL build has no dblink extension to install")
    sql(dsn, "CREATE EXTENSION dblink")
    sql(dsn, "CREATE TABLE audit (v text)")
    with psycopg.connect(dsn) as conn:
        iid = conn.execute("SELECT pgflow.start('INSERT INTO audit VALUES (''kept'')', p_label => 'detached', "
                           "p_detached => true)").fetchone()[0]
        conn.rollback()
    finish(dsn, iid)
    assert sql(dsn, "SELECT v FROM audit") == [("kept",)]
    assert sql(dsn, "SELECT label FROM pgflow.instances WHERE id = %s", (iid,)) == [("detached",)]


def test_detached_start_without_dblink_says_so(dsn):
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="needs the dblink extension"):
        sql(dsn, "SELECT pgflow.start('SELECT 1', p_detached => true)")


def test_numeric_results_keep_every_digit_and_their_scale(dsn, engine):
    """Bug 4: numerics were stored as JSON floats (12345678901234567890.123456789 became 1.2345678901234567e19,
    123456.78900000 lost its trailing zeros) and $name carried the rounded value on."""
    sql(dsn, "CREATE TABLE kept (v numeric, s numeric(20, 8))")
    first = "SELECT 12345678901234567890.123456789::numeric AS big, 123456.78900000::numeric AS scaled"
    iid = sql(dsn, f"SELECT pgflow.start(('{first}' |=> 'x') ~> "
                   "'INSERT INTO kept VALUES ($x, $x.scaled::numeric) RETURNING v, s')")[0][0]
    assert finish(dsn, iid) == [{"v": "12345678901234567890.123456789", "s": "123456.78900000"}]
    assert sql(dsn, "SELECT v, s FROM kept") == [(Decimal("12345678901234567890.123456789"),
                                                   Decimal("123456.78900000"))]
    stored = sql(dsn, "SELECT output FROM pgflow.steps WHERE instance_id = %s AND output::text LIKE '%%big%%'",
                 (iid,))
    assert stored == [([{"big": "12345678901234567890.123456789", "scaled": "123456.78900000"}],)]


def test_numeric_references_are_exact_for_granted_users_too(dsn, engine):
    """The same through the executor another owner's steps run in (values travel as one jsonb array)."""
    role = f"numeric_user_{uuid.uuid4().hex[:8]}"  # roles are the server's: a name of this run's own
    sql(dsn, f"CREATE ROLE {role} LOGIN; SELECT pgflow.grant_usage('{role}');"
             f"CREATE TABLE kept (v numeric); GRANT INSERT, SELECT ON kept TO {role}")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"SET ROLE {role}")
            iid = conn.execute("SELECT pgflow.start(('SELECT 98765432109876543210.000000001::numeric AS n' |=> 'x')"
                               " ~> 'INSERT INTO kept VALUES ($x) RETURNING v')").fetchone()[0]
        assert finish(dsn, iid) == [{"v": "98765432109876543210.000000001"}]
        assert sql(dsn, "SELECT v FROM kept") == [(Decimal("98765432109876543210.000000001"),)]
    finally:
        sql(dsn, f"SELECT pgflow.revoke_usage('{role}'); DROP OWNED BY {role}; DROP ROLE {role}")
