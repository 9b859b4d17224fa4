"""pg_durable's SQL, unchanged, on pgflow (`pgflow init --compat pg_durable`): one test per behaviour its
end-to-end suite checks, written for this project. Everything runs as an ordinary role granted usage with
df.grant_usage, against real coordinator and worker processes."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import psycopg
import pytest
from conftest import run_sql, wait_until

from pgflow import PgflowError
from pgflow.db.migrations import init_schema


@pytest.fixture
def df_dsn(dsn):
    """The test database with the df schema installed."""
    init_schema(dsn, compat=("pg_durable",))
    return dsn


@pytest.fixture
def df_engine(df_dsn, engine_factory):
    return engine_factory().start(concurrency=2)


@pytest.fixture
def df_user(df_dsn):
    """An ordinary login role granted usage with df.grant_usage (HTTP included), able to create tables."""
    role = f"df_user_{uuid.uuid4().hex[:8]}"
    run_sql(df_dsn, f"CREATE ROLE {role} LOGIN; SELECT df.grant_usage('{role}', include_http => true);"
                    f"GRANT CREATE ON SCHEMA public TO {role}")
    yield role
    run_sql(df_dsn, f"DROP OWNED BY {role}; DROP ROLE {role}")


class Session:
    """One connection of ``role`` in autocommit (a psql session as that user)."""

    def __init__(self, dsn: str, role: str | None) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        if role:
            self.conn.execute(f"SET SESSION AUTHORIZATION {role}")

    def one(self, statement: str, params: tuple = ()) -> object:
        return self.conn.execute(statement, params).fetchone()[0]

    def rows(self, statement: str, params: tuple = ()) -> list[tuple]:
        return self.conn.execute(statement, params).fetchall()

    def run(self, statement: str, params: tuple = ()) -> None:
        self.conn.execute(statement, params)

    def finish(self, iid: str, timeout: int = 60) -> str:
        """Await the instance (df.await_instance) and return its status."""
        return self.one("SELECT df.await_instance(%s, %s)", (iid, timeout))


@pytest.fixture
def user(df_dsn, df_user):
    session = Session(df_dsn, df_user)
    yield session
    session.conn.close()


@pytest.fixture
def admin(df_dsn):
    session = Session(df_dsn, None)
    yield session
    session.conn.close()


def start(session: Session, expression: str, label: str | None = None) -> str:
    return session.one(f"SELECT df.start({expression}, %s)", (label,))


def result(session: Session, iid: str) -> object:
    return json.loads(session.one("SELECT df.result(%s)", (iid,)))


def test_ids_are_text_and_sql_results_are_rows_with_a_count(user, df_engine):
    iid = start(user, "'SELECT 42 AS answer'", "simple")
    assert len(iid) == 8 and int(iid, 16) > 0
    assert user.finish(iid) == "completed"
    assert user.one("SELECT df.status(%s)", (iid,)) == "completed"
    assert result(user, iid) == {"rows": [{"answer": 42}], "row_count": 1}
    assert user.one("SELECT df.status('ffffffff')") is None  # unknown id: NULL, not an error


def test_sequence_join_and_race_through_functions_and_operators(user, df_engine):
    user.run("CREATE TABLE steps_log (n int)")
    seq = start(user, "df.seq('INSERT INTO steps_log VALUES (1)', 'INSERT INTO steps_log VALUES (2)')"
                      " ~> 'INSERT INTO steps_log VALUES (3)'")
    assert user.finish(seq) == "completed"
    assert user.rows("SELECT n FROM steps_log ORDER BY n") == [(1,), (2,), (3,)]
    joined = start(user, "df.join('SELECT 1 AS a', 'SELECT 2 AS b')")
    assert user.finish(joined) == "completed"
    assert result(user, joined) == [{"rows": [{"a": 1}], "row_count": 1}, {"rows": [{"b": 2}], "row_count": 1}]
    raced = start(user, "'SELECT ''fast'' AS w' | df.sleep(60)")
    assert user.finish(raced) == "completed"
    assert result(user, raced) == [{"w": "fast"}]  # a race's value is its winner's


def test_if_and_if_rows_take_one_branch(user, df_engine):
    user.run("CREATE TABLE branch_log (v text)")
    iid = start(user, "df.if('SELECT 2 > 1', 'INSERT INTO branch_log VALUES (''then'')',"
                      " 'INSERT INTO branch_log VALUES (''else'')')")
    assert user.finish(iid) == "completed"
    rows = start(user, "('SELECT 1 WHERE false' |=> 'empty') ~> df.if_rows('empty', "
                       "'INSERT INTO branch_log VALUES (''rows'')', 'INSERT INTO branch_log VALUES (''none'')')")
    assert user.finish(rows) == "completed"
    assert sorted(user.rows("SELECT v FROM branch_log")) == [("none",), ("then",)]
    skipped = user.rows("SELECT inferred_status FROM df.nodes WHERE instance_id = %s AND query LIKE '%%else%%'",
                        (iid,))
    assert skipped == [("skipped",)]


def test_break_returns_a_literal_json_value_and_is_the_loop_nodes_result(user, df_engine):
    user.run("CREATE TABLE ticks (n int)")
    iid = start(user, "df.loop('INSERT INTO ticks VALUES (1)' ~> "
                      "df.if('SELECT count(*) >= 2 FROM ticks', df.break('{\"done\": true}'), 'SELECT 0'))")
    assert user.finish(iid) == "completed"
    assert result(user, iid) == {"done": True}
    assert user.rows("SELECT result FROM df.nodes WHERE instance_id = %s AND node_type = 'LOOP'", (iid,)) == [
        ({"done": True},)]
    plain = start(user, "df.loop(df.break('finished'))")  # text that is not JSON is a JSON string
    assert user.finish(plain) == "completed" and result(user, plain) == "finished"


def test_break_in_a_while_condition_ends_the_loop(user, df_engine):
    iid = start(user, "'SELECT 0' ~> df.loop('SELECT ''body''', 'SELECT 1' ~> df.break('from-condition'))")
    assert user.finish(iid, 30) == "completed"
    assert result(user, iid) == "from-condition"


def test_loop_iterations_start_at_least_a_second_apart(user, df_engine):
    user.run("CREATE TABLE beats (at timestamptz DEFAULT clock_timestamp())")
    iid = start(user, "df.loop('INSERT INTO beats DEFAULT VALUES' ~> df.sleep(0))")
    wait_until(lambda: user.one("SELECT count(*) FROM beats") >= 4, 60, "four iterations")
    user.one("SELECT df.cancel(%s)", (iid,))
    # iterations 2, 3 and 4 each began at least a second after the one before (an insert may lag its
    # iteration's start by the queue's latency, the first one's included): without the minimum, four
    # iterations of a body that takes no time would be milliseconds apart
    first, fourth = user.rows("SELECT at FROM beats ORDER BY at LIMIT 4")[0::3]
    assert fourth[0] - first[0] >= timedelta(seconds=2), (first, fourth)


def test_variables_and_text_templates(user, df_engine):
    user.run("SELECT df.clearvars(); SELECT df.setvar('greeting', 'Hello'); SELECT df.setvar('who', 'World')")
    assert user.one("SELECT df.getvar('greeting')") == "Hello"
    assert user.rows("SELECT name, value FROM df.vars ORDER BY name") == [("greeting", "Hello"), ("who", "World")]
    iid = start(user, "'SELECT ''{greeting}, {who}! {sys_label} {sys_instance_id}'' AS m'", "tmpl")
    assert user.finish(iid) == "completed"
    assert result(user, iid)["rows"] == [{"m": f"Hello, World! tmpl {iid}"}]
    user.run("SELECT df.unsetvar('who')")
    assert user.one("SELECT count(*) FROM df.vars") == 1


def test_numeric_results_are_exact_strings_and_round_trip_through_references(user, df_engine):
    user.run("CREATE TABLE amounts (v numeric(20, 8))")
    iid = start(user, "('SELECT 9876543.12345678::numeric AS n' |=> 'n') ~> 'INSERT INTO amounts SELECT $n::numeric'")
    assert user.finish(iid) == "completed"
    assert str(user.one("SELECT v FROM amounts")) == "9876543.12345678"
    stored = user.one("SELECT result FROM df.nodes WHERE instance_id = %s AND result_name = 'n'", (iid,))
    assert stored == {"rows": [{"n": "9876543.12345678"}], "row_count": 1}


def test_signal_result_shape_timeouts_and_plain_text_payloads(user, df_engine):
    iid = start(user, "df.wait_for_signal('approval') |=> 'sig'")
    wait_until(lambda: user.one("SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SIGNAL'"
                                " AND status = 'running'", (iid,)) == 1, 30, "the wait")
    user.one("SELECT df.signal(%s, 'approval', 'yes please')", (iid,))
    assert user.finish(iid) == "completed"
    assert result(user, iid) == {"signal_name": "approval", "timed_out": False, "data": "yes please"}
    timed = start(user, "df.wait_for_signal('never', 1)")
    assert user.finish(timed) == "completed"
    assert result(user, timed) == {"signal_name": "never", "timed_out": True, "data": None}
    assert "ignored" in user.one("SELECT df.signal(%s, 'late', '{}')", (timed,))  # ended: nothing happens


def test_a_signal_is_delivered_even_while_the_senders_transaction_is_open(admin, df_engine):
    """pg_durable's signal goes through the engine, not the caller's transaction (here: dblink)."""
    if not run_sql(admin.conn.info.dsn, "SELECT 1 FROM pg_available_extensions WHERE name = 'dblink'"):
        pytest.skip("this PostgreSQL build has no dblink extension")
    admin.run("CREATE EXTENSION dblink; SET pg_durable.enable_superuser_instances = on")
    iid = start(admin, "df.wait_for_signal('go')")
    with admin.conn.transaction():
        admin.one("SELECT df.signal(%s, 'go', '{\"n\": 1}')", (iid,))
        status = admin.one("SELECT df.await_instance(%s, 30)", (iid,))
    assert status == "completed"


def test_list_instances_columns_cursor_and_limit(user, df_engine):
    ids = [start(user, "'SELECT 1'", f"page-{n}") for n in range(5)]
    basic = user.conn.execute("SELECT * FROM df.list_instances()")
    assert [c.name for c in basic.description] == ["instance_id", "label", "function_name", "status",
                                                   "execution_count", "output"]
    assert {r[0] for r in basic.fetchall()} == set(ids)
    seen, cursor = [], None
    while True:
        page = user.rows("SELECT instance_id, next_cursor FROM df.list_instances(NULL, 2, NULL, %s)", (cursor,))
        seen += [r[0] for r in page]
        cursor = page[-1][1]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert user.rows("SELECT instance_id FROM df.list_instances(NULL, 10, 'page-3')") == [(ids[3],)]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="list_instances_max_limit"):
        user.rows("SELECT * FROM df.list_instances(NULL, 100000)")


def test_instances_and_nodes_views_show_only_the_callers_own(user, df_engine, df_dsn, df_user):
    iid = start(user, "('SELECT 7 AS n' |=> 'seven') ~> 'SELECT $seven + 1 AS m'", "views")
    assert user.finish(iid) == "completed"
    row = user.rows("SELECT id, label, root_node, status, submitted_by::text, database FROM df.instances"
                    " WHERE id = %s", (iid,))
    assert row == [(iid, "views", "r", "completed", df_user, user.one("SELECT current_database()"))]
    nodes = user.rows("SELECT node_type, result_name, status FROM df.nodes WHERE instance_id = %s"
                      " ORDER BY node_type, result_name", (iid,))
    assert nodes == [("SQL", "seven", "completed"), ("SQL", None, "completed"), ("THEN", None, "completed")]
    run_sql(df_dsn, f"CREATE ROLE {df_user}_other LOGIN; SELECT df.grant_usage('{df_user}_other')")
    try:
        other = Session(df_dsn, f"{df_user}_other")
        assert other.rows("SELECT * FROM df.instances") == []
        assert other.rows("SELECT * FROM df.nodes") == []
        with pytest.raises(psycopg.errors.NoDataFound, match="not found or access denied"):
            other.one("SELECT df.cancel(%s)", (iid,))
        other.conn.close()
    finally:
        run_sql(df_dsn, f"SELECT df.revoke_usage('{df_user}_other'); DROP ROLE {df_user}_other")


def test_explain_of_an_instance_and_dry_run_of_a_graph(user, df_engine):
    dry = user.one("SELECT df.explain($$ 'SELECT ''a''' | df.sleep(30) $$)")
    assert "RACE" in dry and "branch 1: SQL: SELECT 'a'" in dry and "branch 2: SLEEP 30s" in dry
    assert user.rows("SELECT count(*) FROM df.instances") == [(0,)]  # a dry run starts nothing
    invalid = user.one("""SELECT df.explain('{"node_type": "NOPE"}')""")
    assert invalid.startswith("Invalid durable function graph: root: Unknown node_type 'NOPE'")
    iid = start(user, "df.if('SELECT true', 'SELECT 1', 'SELECT 2')")
    assert user.finish(iid) == "completed"
    shown = user.one("SELECT df.explain(%s)", (iid,))
    assert "(completed)" in shown and "⊘" in shown and "(skipped)" in shown


def test_instance_info_executions_and_metrics(user, admin, df_engine):
    iid = start(user, "'SELECT 123 AS v'", "info")
    assert user.finish(iid) == "completed"
    info = user.rows("SELECT instance_id, label, status, output FROM df.instance_info(%s)", (iid,))
    assert info == [(iid, "info", "completed", json.dumps({"rows": [{"v": 123}], "row_count": 1}))]
    assert user.rows("SELECT execution_id, status FROM df.instance_executions(%s)", (iid,)) == [(1, "completed")]
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        user.rows("SELECT * FROM df.instance_executions(%s, 0)", (iid,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # engine-wide numbers: administrators only
        user.rows("SELECT * FROM df.metrics()")
    total, running, completed, failed = admin.rows(
        "SELECT total_instances, running_instances, completed_instances, failed_instances FROM df.metrics()")[0]
    assert (total, completed, failed) == (1, 1, 0) and running == 0


def test_start_options_transaction_mode_database_and_invalid_nodes(user, df_engine):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="transaction_mode"):
        user.one("SELECT df.start('SELECT 1', transaction_mode => 'sometimes')")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="database"):
        user.one("SELECT df.start('SELECT 1', database => 'template1')")  # another database of the cluster
    with pytest.raises(psycopg.errors.InvalidCatalogName, match='database "elsewhere" does not exist'):
        user.one("SELECT df.start('SELECT 1', database => 'elsewhere')")
    here = user.one("SELECT df.start('SELECT 1', database => current_database())")
    assert user.finish(here) == "completed"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="Unknown node_type 'NOT_A_NODE'"):
        user.one("""SELECT df.start('{"node_type": "NOT_A_NODE"}')""")


def test_a_superuser_needs_the_setting_to_start(admin, df_engine):
    admin.run("SET pgflow.allow_superuser = off")  # the test databases turn it on
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="enable_superuser_instances"):
        admin.one("SELECT df.start('SELECT 1')")
    admin.run("SET pg_durable.enable_superuser_instances = on")
    assert admin.finish(admin.one("SELECT df.start('SELECT 1')")) == "completed"


def test_grant_usage_keeps_http_for_those_granted_it(df_dsn, df_user):
    run_sql(df_dsn, f"CREATE ROLE {df_user}_nohttp; SELECT df.grant_usage('{df_user}_nohttp')")
    try:
        assert run_sql(df_dsn, "SELECT has_function_privilege(%s, 'df.http(text, text, text, jsonb, integer)', "
                               "'EXECUTE'), has_function_privilege(%s, 'df.start(text, text, text, text)', 'EXECUTE'),"
                               " has_function_privilege(%s, 'df.grant_usage(text, boolean, boolean)', 'EXECUTE')",
                       (f"{df_user}_nohttp", f"{df_user}_nohttp", f"{df_user}_nohttp")) == [(False, True, False)]
        assert run_sql(df_dsn, "SELECT has_function_privilege(%s, 'df.http(text, text, text, jsonb, integer)', "
                               "'EXECUTE')", (df_user,)) == [(True,)]
        run_sql(df_dsn, f"SELECT df.grant_usage('{df_user}_nohttp', with_grant => true)")
        assert run_sql(df_dsn, "SELECT has_function_privilege(%s, 'df.metrics()', 'EXECUTE WITH GRANT OPTION')",
                       (f"{df_user}_nohttp",)) == [(True,)]
    finally:
        run_sql(df_dsn, f"SELECT df.revoke_usage('{df_user}_nohttp'); DROP ROLE {df_user}_nohttp")


def test_init_refreshes_the_layer_and_never_takes_a_foreign_df_schema(dsn, df_dsn, df_user):
    run_sql(df_dsn, "DROP FUNCTION df.instance_info(text)")  # an older layer, say
    init_schema(df_dsn)  # an upgrade: the layer pgflow installed is rebuilt, grants included
    granted = run_sql(df_dsn, "SELECT has_function_privilege(%s, 'df.instance_info(text)', 'EXECUTE'),"
                              " has_function_privilege(%s, 'df.metrics()', 'EXECUTE')", (df_user, df_user))
    assert granted == [(True, False)]
    run_sql(df_dsn, "DROP SCHEMA df CASCADE; CREATE SCHEMA df; CREATE TABLE df.mine (x int)")
    init_schema(df_dsn)  # not ours: untouched
    assert run_sql(df_dsn, "SELECT count(*) FROM df.mine") == [(0,)]
    with pytest.raises(PgflowError, match="schema df exists and is not pgflow's"):
        init_schema(df_dsn, compat=("pg_durable",))
