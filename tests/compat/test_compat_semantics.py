# ruff: noqa: F811  (the fixtures imported from test_pg_durable_compat are parameters here)
"""Where pg_durable's semantics and pgflow's differed, pgflow now follows pg_durable's, in the df layer and
(for joins, breaks and nesting) in pgflow's own API: one test per behaviour of pg_durable's end-to-end suite,
written for this project. Fixtures and helpers come from test_pg_durable_compat."""

from __future__ import annotations

import contextlib
import re

import psycopg
import pytest
from conftest import run_sql
from test_pg_durable_compat import (  # noqa: F401 (fixtures)
    Session,
    admin,
    df_dsn,
    df_engine,
    df_user,
    result,
    start,
    user,
)

import pgflow.tree as t


def nodes(session: Session, iid: str, columns: str = "node_type, status, inferred_status") -> list[tuple]:
    """The instance's df.instance_nodes rows, in tree order."""
    return session.rows(f"SELECT {columns} FROM df.instance_nodes(%s)", (iid,))


# ---------------------------------------------------------------------------------------------- joins


def test_a_join_of_a_join_keeps_its_nesting_in_both_apis(user, df_engine):
    iid = start(user, "('SELECT 1 AS a' & 'SELECT 2 AS b') & 'SELECT 3 AS c'")
    assert user.finish(iid) == "completed"
    rows = [{"rows": [{"a": 1}], "row_count": 1}, {"rows": [{"b": 2}], "row_count": 1}]
    assert result(user, iid) == [rows, {"rows": [{"c": 3}], "row_count": 1}]
    own = user.one("SELECT pgflow.start(('SELECT 1 AS a' & 'SELECT 2 AS b') & 'SELECT 3 AS c')")
    assert user.one("SELECT (pgflow.await_instance(%s, 60))->'output'", (own,)) == [[[{"a": 1}], [{"b": 2}]],
                                                                                   [{"c": 3}]]
    flat = start(user, "df.join3('SELECT 1 AS a', 'SELECT 2 AS b', 'SELECT 3 AS c')")  # one join of three
    assert user.finish(flat) == "completed" and len(result(user, flat)) == 3
    assert (t.sql("SELECT 1") & t.sql("SELECT 2") & t.sql("SELECT 3")).data["c"][0]["t"] == "join"
    assert len((t.sql("SELECT 1") >> t.sql("SELECT 2") >> t.sql("SELECT 3")).data["c"]) == 3  # sequences flatten


# ---------------------------------------------------------------------------------------------- break


def test_a_break_outside_any_loop_fails_the_instance_when_it_runs(user, df_engine):
    iid = start(user, "df.break('too-early')")  # accepted at start, as pg_durable does
    assert user.finish(iid) == "failed"
    assert "break outside a loop" in user.one("SELECT error FROM df.instances WHERE id = %s", (iid,))
    own = user.one("SELECT pgflow.start('SELECT 1' ~> pgflow.break_loop())")
    assert user.one("SELECT (pgflow.await_instance(%s, 60))->>'status'", (own,)) == "failed"
    inner = start(user, "df.loop('SELECT 1' ~> (df.break('out') & 'SELECT 2'))")  # a break in a join ends the loop
    assert user.finish(inner) == "completed" and result(user, inner) == "out"


# ---------------------------------------------------------------------------------------------- depth


def test_nesting_goes_to_256_levels_a_sequence_counting_as_nested_pairs(user):
    chain = user.one("SELECT df.sql('SELECT 1')")
    for _ in range(256):  # as a loop in plpgsql would build it: a ~> b, then (a ~> b) ~> c, ...
        chain = user.one("SELECT df.seq(%s::text, 'SELECT 1')", (chain,))
    deepest = user.one("SELECT df.explain(%s::text)", (chain,))
    assert not deepest.startswith("Invalid") and deepest.count("→") == 256
    too_deep = user.one("SELECT df.explain(df.seq(%s::text, 'SELECT 1'))", (chain,))
    assert too_deep.startswith("Invalid") and "maximum nesting depth of 256" in too_deep
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="maximum nesting depth of 256"):
        user.one("SELECT pgflow.start(pgflow.seq(%s::text, 'SELECT 1'))", (chain,))
    ifs = "SELECT 1"
    for _ in range(129):  # 129 levels of if: more than the 100 pgflow allowed before
        ifs = user.one("SELECT ('SELECT true' ?> %s::text) !> 'SELECT 0'", (ifs,))
    assert user.one("SELECT df.explain(%s::text)", (ifs,)).count("IF") == 129


# ---------------------------------------------------------------------------------------------- df.nodes


def test_nodes_have_8_hex_ids_and_a_sequence_shows_as_nested_then_pairs(user, df_engine):
    iid = start(user, "'SELECT 1' ~> 'SELECT 2' ~> 'SELECT 3' ~> 'SELECT 4'")
    assert user.finish(iid) == "completed"
    shown = nodes(user, iid, "node_id, node_type, query, left_node, right_node, status")
    assert all(re.fullmatch(r"[0-9a-f]{8}", row[0]) for row in shown)
    by_id = {row[0]: row for row in shown}
    assert [row[1] for row in shown].count("THEN") == 3 and len(shown) == 7
    order, node = [], shown[0]  # walk the left spine down, as pg_durable's pairs nest: ((1 ~> 2) ~> 3) ~> 4
    while node[1] == "THEN":
        order.insert(0, by_id[node[4]][2])
        node = by_id[node[3]]
    assert [node[2], *order] == ["SELECT 1", "SELECT 2", "SELECT 3", "SELECT 4"]
    assert {row[5] for row in shown} == {"completed"}


def test_if_and_join_name_their_condition_and_extra_branches_in_query(user, df_engine):
    iid = start(user, "df.if('SELECT true', df.join3('SELECT 1', 'SELECT 2', 'SELECT 3'), 'SELECT 0')")
    assert user.finish(iid) == "completed"
    rows = nodes(user, iid, "node_id, node_type, query, left_node, right_node")
    shown = {row[1]: row for row in rows if row[1] != "SQL"}
    ids = {row[2]: row[0] for row in rows if row[1] == "SQL"}
    assert user.one("SELECT %s::jsonb->>'condition_node'", (shown["IF"][2],)) == ids["SELECT true"]
    assert shown["IF"][4] == ids["SELECT 0"]
    assert user.one("SELECT %s::jsonb->'extra_nodes'", (shown["JOIN"][2],)) == [ids["SELECT 3"]]


def test_a_skipped_node_names_the_ancestor_it_is_inferred_from(user, df_engine):
    iid = start(user, "df.if('SELECT true', 'SELECT 1', 'SELECT 2')")
    assert user.finish(iid) == "completed"
    rows = nodes(user, iid, "node_id, node_type, query, status, inferred_status, inferred_status_from_ancestor_id")
    if_id = next(r[0] for r in rows if r[1] == "IF")
    assert [(r[2], r[3], r[5]) for r in rows if r[4] == "skipped"] == [("SELECT 2", "pending", if_id)]
    failed = start(user, "'SELECT 1/0' ~> 'SELECT 42'")
    assert user.finish(failed) == "failed"
    rows = nodes(user, failed, "node_id, node_type, query, inferred_status, inferred_status_from_ancestor_id")
    then_id = next(r[0] for r in rows if r[1] == "THEN")
    assert [(r[2], r[4]) for r in rows if r[3] == "skipped"] == [("SELECT 42", then_id)]


def test_execution_ids_follow_branches_and_loops(user, df_engine):
    user.run("CREATE TABLE laps (n serial)")
    iid = start(user, "df.race(df.loop('INSERT INTO laps DEFAULT VALUES' ~> "
                      "('SELECT count(*) >= 2 FROM laps' ?> df.break() !> df.sleep(1))), 'SELECT pg_sleep(30)')")
    assert user.finish(iid, 90) == "completed"
    rows = nodes(user, iid, "node_id, node_type, query, status_details::jsonb->>'execution_id'")
    race, loop = (next(r for r in rows if r[1] == kind) for kind in ("RACE", "LOOP"))
    body, sleeper = (next(r for r in rows if r[2] == q) for q in ("INSERT INTO laps DEFAULT VALUES",
                                                                  "SELECT pg_sleep(30)"))
    assert race[3] == f"{iid}::1"
    assert loop[3] == f"{iid}::1::{loop[0]}::2"  # a branch of its own, in its second iteration
    assert body[3] == loop[3]  # the body runs in the loop's execution
    assert sleeper[3] == f"{iid}::1::{sleeper[0]}::1"


# ---------------------------------------------------------------------------------------------- loops


def test_a_loop_that_loses_a_race_is_shown_failed(user, df_engine):
    iid = start(user, "df.race(df.sleep(1), df.loop(df.sleep(30)))")
    assert user.finish(iid) == "completed"
    loop_id, stamp = user.rows("SELECT node_id, status_details::jsonb->>'execution_id' FROM df.instance_nodes(%s)"
                               " WHERE node_type = 'LOOP'", (iid,))[0]
    assert nodes(user, iid, "status, inferred_status")[2] == ("failed", "failed")  # RACE, SLEEP, LOOP, ...
    assert stamp == f"{iid}::1::{loop_id}::1"
    assert not re.search(r"LOOP.*(running|pending)", user.one("SELECT df.explain(%s)", (iid,)), re.S)


def test_a_loop_whose_body_fails_is_failed_with_the_error_of_the_step(user, df_engine):
    user.run("CREATE TABLE rounds (n int)")
    iid = start(user, "df.loop('INSERT INTO rounds SELECT count(*) + 1 FROM rounds' ~> "
                      "df.if('SELECT count(*) >= 2 FROM rounds', 'SELECT 1/0', df.sleep(1))) & 'SELECT 1'")
    assert user.finish(iid, 60) == "failed"
    status, inferred, error = user.rows("SELECT status, inferred_status, result FROM df.instance_nodes(%s)"
                                        " WHERE node_type = 'LOOP'", (iid,))[0]
    assert (status, inferred) == ("failed", "failed") and "division by zero" in error
    assert user.one("SELECT count(*) FROM rounds") == 2


def test_explain_of_a_failed_instance_shows_what_never_ran_as_skipped(user, df_engine):
    iid = start(user, "'SELECT 1/0' ~> df.loop('SELECT 1', 'SELECT false')")
    assert user.finish(iid) == "failed"
    shown = user.one("SELECT df.explain(%s)", (iid,))
    assert "pending" not in shown and "⊘" in shown and "→ " in shown


# ---------------------------------------------------------------------------------------------- raw JSON


def test_pg_durables_own_node_json_starts_and_is_checked_with_its_words(user, df_engine):
    raw = ('{"node_type": "THEN", "left_node": {"node_type": "SQL", "query": "SELECT 6 AS n", "result_name": "six"},'
           ' "right_node": {"node_type": "JOIN", "left_node": {"node_type": "SQL", "query": "SELECT $six.n + 1 AS m"},'
           ' "right_node": {"node_type": "SLEEP", "query": "0"},'
           ' "extra_nodes": [{"node_type": "SQL", "query": "SELECT 8 AS o"}]}}')
    iid = start(user, f"'{raw}'")
    assert user.finish(iid) == "completed"
    assert result(user, iid)[0] == {"rows": [{"m": 7}], "row_count": 1} and len(result(user, iid)) == 3
    refused = {
        '{"node_type": "IF", "left_node": {"node_type": "SQL", "query": "SELECT 1"}, "condition_node": 42}':
            "condition_node must be a Durofut JSON object",
        '{"node_type": "IF", "left_node": {"node_type": "SQL", "query": "SELECT 1"},'
        ' "query": "{\\"condition_node\\": {}}"}': "condition_node in IF must be a first-class Durofut field",
        '{"node_type": "JOIN", "left_node": {"node_type": "SQL", "query": "SELECT 1"},'
        ' "right_node": {"node_type": "SQL", "query": "SELECT 1"}, "extra_nodes": ["a1b2c3d4"]}':
            "extra_nodes entries must be Durofut JSON objects",
        '{"node_type": "IF", "left_node": {"node_type": "SQL", "query": "SELECT 1"},'
        ' "condition_node": {"node_type": "SQL", "query": "SELECT true"}, "query": "not-json"}':
            "query in IF must be valid JSON config",
        '{"node_type": "NOPE"}': "Unknown node_type 'NOPE'",
    }
    for node, message in refused.items():
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=re.escape(message)):
            user.one("SELECT df.start(%s)", (node,))
    assert user.one("SELECT count(*) FROM df.instances") == 1


# ---------------------------------------------------------------------------------------------- launches


def test_new_transaction_launches_wait_for_one_of_a_capped_number_of_slots(user, df_dsn):
    """transaction_mode 'new' opens a loopback session per launch: at most max_new_transaction_starts at
    once; a caller waits new_transaction_start_timeout seconds for a slot, then gets a clear error."""
    holders = [psycopg.connect(df_dsn, autocommit=True) for _ in range(2)]
    try:
        for n, holder in enumerate(holders, 1):  # another two launches hold both slots
            holder.execute("SELECT pg_advisory_lock(1346982470, %s)", (n,))
        user.run("SET pg_durable.max_new_transaction_starts = 2; SET pg_durable.new_transaction_start_timeout = 1")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded,
                           match=r"Timed out after 1s waiting for a launch slot.*max_new_transaction_starts=2"):
            user.one("SELECT df.start('SELECT 1', 'capped', NULL, 'new')")
        assert user.one("SELECT count(*) FROM df.instances") == 0
        holders[1].close()  # a slot frees up: the launch goes ahead (and fails here, without dblink) ...
        with contextlib.suppress(psycopg.errors.FeatureNotSupported):
            user.one("SELECT df.start('SELECT 1', 'admitted', NULL, 'new')")
        # ... and gives its slot back either way
        assert user.one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1346982470"
                        " AND objsubid = 2 AND pid = pg_backend_pid()") == 0
    finally:
        for holder in holders:
            holder.close()


def test_workers_run_superuser_instances_when_pg_durable_allows_them(df_dsn, admin, engine_factory):
    database = admin.one("SELECT current_database()")
    run_sql(df_dsn, f'ALTER DATABASE "{database}" SET pg_durable.enable_superuser_instances = on')
    try:
        engine_factory().start(concurrency=1)
        admin.run("SET pg_durable.enable_superuser_instances = on")
        iid = start(admin, "'SELECT current_user AS who'")
        assert admin.finish(iid) == "completed"
        assert result(admin, iid)["rows"][0]["who"] == admin.one("SELECT current_user")
    finally:
        run_sql(df_dsn, f'ALTER DATABASE "{database}" RESET pg_durable.enable_superuser_instances')


def test_views_show_owners_with_quoted_names_and_survive_a_dropped_owner(df_dsn, admin, df_engine):
    role = 'Mixed Case Owner'
    run_sql(df_dsn, f'CREATE ROLE "{role}" LOGIN; SELECT df.grant_usage(\'{role}\')')
    owner = Session(df_dsn, f'"{role}"')
    iid = start(owner, "df.if('SELECT true', 'SELECT 1', 'SELECT 2')")
    assert owner.finish(iid) == "completed"
    owner.conn.close()
    assert admin.one("SELECT submitted_by::text FROM df.instances WHERE id = %s", (iid,)) == f'"{role}"'
    run_sql(df_dsn, f'SELECT df.revoke_usage(\'{role}\'); DROP OWNED BY "{role}"; DROP ROLE "{role}"')
    # the instance outlives its owner: the views show no owner rather than failing
    assert admin.one("SELECT submitted_by FROM df.instances WHERE id = %s", (iid,)) is None
    assert len(nodes(admin, iid)) == 4 and "IF" in admin.one("SELECT df.explain(%s)", (iid,))
