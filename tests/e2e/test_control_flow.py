"""Everything pg_durable does, through both front doors: each scenario is started once from SQL (operators
and pgflow.* functions, as a psql user would) and once from the Python API (pgflow.tree), and run by real
coordinator and worker processes."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

import psycopg
import pytest
from conftest import run_sql as sql
from conftest import serve_http, wait_until

import pgflow
from pgflow import FlowDefinitionError, InstanceNotFound, PgflowError
from pgflow import tree as t

FRONT_DOORS = ["sql", "python"]


def start(dsn, door, sql_expr, node, input=None, label=None):
    if door == "sql":
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(f"SELECT pgflow.start({sql_expr}, %s::jsonb, %s)",
                                (json.dumps(input), label)).fetchone()[0]
    return pgflow.start(node, input, label=label, dsn=dsn)


def quote(statement):
    """A SQL string literal of a statement (what a psql user would type)."""
    return "'" + statement.replace("'", "''") + "'"


def finish(dsn, iid, timeout=60):
    st = pgflow.wait(iid, timeout, dsn=dsn)
    assert st.status == "completed", (st.error, pgflow.explain(iid, dsn=dsn))
    return st.output


@pytest.fixture
def fast_engine(dsn, engine_factory):
    """Coordinator with timers sped up 60x (a minute of cron or sleep takes a second) and a worker."""
    engine = engine_factory(PGFLOW_TIME_SCALE="60", PGFLOW_HTTP_ALLOW="127.0.0.1")  # the tests' local web server
    engine.start(concurrency=2)
    return engine


@pytest.fixture
def web(dsn):
    """A local HTTP server on 127.0.0.1: /ok (JSON), /echo (POST), /missing (404), /flaky (503 once),
    /hook (records the call, then signals the instance labelled by the body's "order" back)."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code, body, ctype="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            calls.append(("GET", self.path, None))
            if self.path == "/ok":
                self._send(200, {"hello": "world"})
            elif self.path == "/flaky" and sum(c[1] == "/flaky" for c in calls) == 1:
                self._send(503, {"busy": True})
            elif self.path == "/flaky":
                self._send(200, {"second": "try"})
            elif self.path == "/binary":
                self._send(200, b"\xff\x00\xfe", "application/octet-stream")
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
            calls.append(("POST", self.path, body))
            if self.path == "/hook":
                order = body["order"]
                threading.Timer(0.3, self._callback, args=(order,)).start()
                self._send(202, {"accepted": order})
            else:
                self._send(200, {"echo": body, "token": self.headers.get("X-Token")})

        @staticmethod
        def _callback(order):
            [found] = pgflow.list_instances(label=f"order-{order}", dsn=dsn)
            pgflow.signal(found["id"], "callback", {"order": order, "paid": True}, dsn=dsn)

    with serve_http(Handler) as url:
        yield url, calls


# ---------------------------------------------------------------------------------------------- scenarios

@pytest.mark.parametrize("door", FRONT_DOORS)
def test_simple_query(dsn, fast_engine, door):
    iid = start(dsn, door, "'SELECT 42 AS answer'", t.sql("SELECT 42 AS answer"))
    assert finish(dsn, iid) == [{"answer": 42}]


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_named_results_whole_value_column_null_safe_and_row_set(dsn, fast_engine, door):
    sql(dsn, "CREATE TABLE documents (id int, processed boolean DEFAULT false);"
             "INSERT INTO documents (id) SELECT generate_series(1, 150)")
    batch, update = ("SELECT id FROM documents WHERE NOT processed LIMIT 100",
                     "UPDATE documents SET processed = true WHERE id IN (SELECT id FROM $batch.*)")
    iid = start(dsn, door, f"'{batch}' |=> 'batch' ~> '{update}'", t.sql(batch).named("batch") >> update)
    assert finish(dsn, iid) == {"rowcount": 100}
    assert sql(dsn, "SELECT count(*) FROM documents WHERE processed") == [(100,)]
    steps = [("SELECT 100 AS amount, 1 AS other", "total"), ("SELECT 42 AS id, 'Alice' AS name", "user"),
             ("SELECT NULL::text AS val WHERE false", "x")]
    final = "SELECT $total * 2 AS doubled, $user.name AS name, coalesce($x.val?, 'fallback') AS v, $x? AS none"
    node = t.seq(*[t.sql(q).named(n) for q, n in steps], final)
    expr = " ~> ".join([*(f"({quote(s)} |=> '{n}')" for s, n in steps), quote(final)])
    assert finish(dsn, start(dsn, door, expr, node)) == [{"doubled": 200, "name": "Alice", "v": "fallback",
                                                         "none": None}]
    strict = t.sql(steps[2][0]).named("x") >> "SELECT $x.val AS v"
    failed = pgflow.wait(pgflow.start(strict, dsn=dsn), 60, dsn=dsn)
    assert failed.status == "failed" and "$x.val: x returned no rows (write $x.val? to get NULL)" in failed.error


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_three_step_etl_with_named_results_and_row_sets(dsn, fast_engine, door):
    sql(dsn, "CREATE TABLE raw (id int, v numeric, seen timestamptz DEFAULT now());"
             "CREATE TABLE clean (id int, v2 numeric, seen timestamptz);"
             "INSERT INTO raw (id, v) VALUES (1, 1.5), (2, 2.5), (3, NULL)")
    extract = "SELECT id, v, seen FROM raw WHERE v IS NOT NULL"
    transform = "SELECT id, v * 2 AS v2, seen FROM $rows.*"
    load = "INSERT INTO clean SELECT id, v2, seen FROM $doubled.* RETURNING id"
    node = t.sql(extract).named("rows") >> t.sql(transform).named("doubled") >> t.sql(load)
    iid = start(dsn, door, f"('{extract}' |=> 'rows') ~> ('{transform}' |=> 'doubled') ~> '{load}'", node)
    assert sorted(r["id"] for r in finish(dsn, iid)) == [1, 2]
    # typed relation: numeric and timestamptz survive the round trip through $name.*
    assert sql(dsn, "SELECT c.id, c.v2, c.seen = r.seen FROM clean c JOIN raw r USING (id) ORDER BY 1") == [
        (1, 3.0, True), (2, 5.0, True)]


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_fan_out_of_three_counts_joined_into_a_report(dsn, fast_engine, door):
    sql(dsn, "CREATE TABLE a (x int); CREATE TABLE b (x int); CREATE TABLE c (x int);"
             "INSERT INTO a VALUES (1); INSERT INTO b VALUES (1), (2); INSERT INTO c VALUES (1), (2), (3);"
             "CREATE TABLE report (a int, b int, c int, total int)")
    counts = [f"SELECT count(*) AS n FROM {x}" for x in "abc"]
    insert = "INSERT INTO report VALUES ($a.n, $b.n, $c.n, $total) RETURNING *"
    # one join of three (a & b & c would be (a & b) & c, whose result nests)
    node = t.join(t.sql(counts[0]).named("a"), t.sql(counts[1]).named("b"), t.sql(counts[2]).named("c")).named(
        "counts") >> t.python("support.sample_trees:total").named("total") >> t.sql(insert)
    expr = (f"pgflow.join('{counts[0]}' |=> 'a', '{counts[1]}' |=> 'b', '{counts[2]}' |=> 'c') |=> 'counts'"
            f" ~> (pgflow.python('support.sample_trees:total') |=> 'total') ~> '{insert}'")
    assert finish(dsn, start(dsn, door, expr, node)) == [{"a": 1, "b": 2, "c": 3, "total": 6}]


@pytest.mark.parametrize("door", FRONT_DOORS)
@pytest.mark.parametrize("orders, expected", [(5, "many"), (1, "few")])
def test_conditional_branch_on_a_count(dsn, fast_engine, door, orders, expected):
    sql(dsn, f"CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, {orders});"
             "CREATE TABLE log (v text)")
    cond, many, few = ("SELECT count(*) > 2 FROM orders", "INSERT INTO log VALUES ('many')",
                       "INSERT INTO log VALUES ('few')")
    q = "''"
    iid = start(dsn, door, f"'{cond}' ?> '{many.replace(chr(39), q)}' !> '{few.replace(chr(39), q)}'",
                t.if_(cond, many, few))
    finish(dsn, iid)
    assert sql(dsn, "SELECT v FROM log") == [(expected,)]
    explained = pgflow.explain(iid, dsn=dsn)
    skipped = few if expected == "many" else many
    assert f"[skipped] sql: {skipped}" in explained


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_branch_on_whether_a_named_result_has_rows(dsn, fast_engine, door):
    sql(dsn, "CREATE TABLE inbox (id int)")
    node = t.sql("SELECT id FROM inbox").named("mail") >> t.if_(t.has_rows("mail"), "SELECT 'busy' AS s",
                                                                  "SELECT 'idle' AS s")
    expr = ("('SELECT id FROM inbox' |=> 'mail') ~> (pgflow.has_rows('mail') ?> 'SELECT ''busy'' AS s' "
            "!> 'SELECT ''idle'' AS s')")
    assert finish(dsn, start(dsn, door, expr, node)) == [{"s": "idle"}]


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_task_queue_drained_by_a_while_loop(dsn, fast_engine, door):
    sql(dsn, "CREATE TABLE tasks (id int PRIMARY KEY); INSERT INTO tasks SELECT generate_series(1, 6);"
             "CREATE TABLE done (id int)")
    cond = "SELECT EXISTS (SELECT 1 FROM tasks)"
    body = "WITH d AS (DELETE FROM tasks WHERE id = (SELECT min(id) FROM tasks) RETURNING id) " \
           "INSERT INTO done SELECT id FROM d RETURNING id"
    iid = start(dsn, door, f"pgflow.loop_while('{cond}', '{body}')", t.loop(body, while_=cond))
    assert finish(dsn, iid) == [{"id": 6}]
    assert sql(dsn, "SELECT id FROM done ORDER BY id") == [(i,) for i in range(1, 7)]
    # history stays bounded: one row per node of the current iteration, not one per iteration
    assert sql(dsn, "SELECT count(*) FROM pgflow.steps WHERE instance_id = %s", (iid,))[0][0] <= 4
    assert "loop while (iteration 6)" in pgflow.explain(iid, dsn=dsn)


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_loop_on_a_cron_schedule_with_break(dsn, fast_engine, door):
    sql(dsn, "CREATE TABLE ticks (at timestamptz DEFAULT now())")
    body = (t.wait_for_schedule("* * * * *") >> "INSERT INTO ticks DEFAULT VALUES"
            >> t.if_("SELECT count(*) >= 3 FROM ticks", t.brk("SELECT count(*) AS ticks FROM ticks")))
    expr = ("@> (pgflow.wait_for_schedule('* * * * *') ~> 'INSERT INTO ticks DEFAULT VALUES' ~> "
            "('SELECT count(*) >= 3 FROM ticks' ?> pgflow.break_loop('SELECT count(*) AS ticks FROM ticks')))")
    iid = start(dsn, door, expr, t.loop(body))
    assert finish(dsn, iid) == [{"ticks": 3}]  # every minute, at 60x: about a second apart


def waiting_for(dsn, iid, name):
    """Wait until the instance is waiting for signal ``name`` (its wait node reached: the state, not a pause)."""
    wait_until(lambda: f"[waiting] wait for signal {name}" in pgflow.explain(iid, dsn=dsn), 60,
               f"instance {iid} to wait for signal {name}")


@pytest.mark.parametrize("door", FRONT_DOORS)
@pytest.mark.parametrize("approve", [True, False, None])
def test_order_approval_waits_for_a_signal_with_a_timeout(dsn, fast_engine, door, approve):
    sql(dsn, "CREATE TABLE orders (id int, status text); INSERT INTO orders VALUES (1, 'new')")
    decide = ("SELECT coalesce(($decision.approved?)::boolean, false)", "UPDATE orders SET status = 'approved'",
              "UPDATE orders SET status = $decision.reason?::text")
    # no signal: the 2-minute timeout fires (2 s at 60x). A signal is sent while an hour's timeout (a minute
    # at 60x) is pending, so that it arrives first however slow the machine: the signal must win.
    timeout = 120 if approve is None else 3600
    node = t.wait_for_signal("approval", timeout=timeout).named("decision") >> t.if_(*decide)
    q = "''"
    expr = (f"(pgflow.wait_for_signal('approval', {timeout}) |=> 'decision') ~> "
            f"('{decide[0]}' ?> '{decide[1].replace(chr(39), q)}' !> '{decide[2]}')")
    iid = start(dsn, door, expr, node)
    if approve is not None:
        waiting_for(dsn, iid, "approval")
        pgflow.signal(iid, "approval", {"approved": approve, "reason": "rejected: too big"}, dsn=dsn)
    finish(dsn, iid)
    expected = {True: "approved", False: "rejected: too big", None: None}[approve]
    assert sql(dsn, "SELECT status FROM orders") == [(expected,)]


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_two_party_approval_joins_two_signal_waits_and_keeps_early_signals(dsn, engine_factory, door):
    sql(dsn, "CREATE TABLE approvals (alice boolean, bob boolean)")
    insert = "INSERT INTO approvals VALUES ($a.ok, $b.ok) RETURNING *"
    node = (t.wait_for_signal("alice").named("a") & t.wait_for_signal("bob").named("b")) >> insert
    expr = f"((pgflow.wait_for_signal('alice') |=> 'a') & (pgflow.wait_for_signal('bob') |=> 'b')) ~> '{insert}'"
    iid = start(dsn, door, expr, node)
    # bob answers before the instance has even reached its waits (no coordinator runs yet): the signal is
    # kept, not lost
    pgflow.signal(iid, "bob", {"ok": True}, dsn=dsn)
    assert pgflow.status(iid, dsn=dsn).status == "pending"
    engine_factory().start(concurrency=2)
    waiting_for(dsn, iid, "alice")
    assert pgflow.status(iid, dsn=dsn).status == "running"
    assert "[done]    wait for signal bob" in pgflow.explain(iid, dsn=dsn)  # the early signal was consumed
    pgflow.signal(iid, "alice", {"ok": False}, dsn=dsn)
    assert finish(dsn, iid) == [{"alice": False, "bob": True}]


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_webhook_style_callback(dsn, fast_engine, door, web):
    url, calls = web
    node = t.http(f"{url}/hook", "POST", {"order": "$input.order"}).named("sent") \
        >> t.wait_for_signal("callback", timeout=600).named("cb") >> "SELECT $cb.paid AS paid, $sent.status AS status"
    expr = (f"(pgflow.http('{url}/hook', 'POST', '{{\"order\": \"$input.order\"}}') |=> 'sent') ~> "
            "(pgflow.wait_for_signal('callback', 600) |=> 'cb') ~> 'SELECT $cb.paid AS paid, $sent.status AS status'")
    iid = start(dsn, door, expr, node, input={"order": 7}, label="order-7")
    assert finish(dsn, iid) == [{"paid": True, "status": 202}]
    assert ("POST", "/hook", {"order": 7}) in calls


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_http_get_post_and_a_4xx_handled_by_an_if(dsn, fast_engine, door, web):
    url, _ = web
    sql(dsn, "CREATE TABLE outcome (what text, detail jsonb)")
    ok_branch = "INSERT INTO outcome VALUES ('ok', $got.json)"
    bad_branch = "INSERT INTO outcome VALUES ('missing', to_jsonb($missing.status))"
    node = (t.http(f"{url}/ok").named("got")
            >> t.http(f"{url}/echo", "POST", {"n": "$input.n", "nested": ["$input.n"]},
                      headers={"X-Token": "t-$input.n"}).named("posted")
            >> t.http(f"{url}/missing").named("missing")
            >> t.if_("SELECT $missing.ok", ok_branch, bad_branch)
            >> "SELECT $posted.json AS posted, $got.ok AS ok")
    q = "''"
    expr = (f"(pgflow.http('{url}/ok') |=> 'got') ~> "
            f"(pgflow.http('{url}/echo', 'POST', '{{\"n\": \"$input.n\", \"nested\": [\"$input.n\"]}}', "
            f"'{{\"X-Token\": \"t-$input.n\"}}') |=> 'posted') ~> "
            f"(pgflow.http('{url}/missing') |=> 'missing') ~> "
            f"('SELECT $missing.ok' ?> '{ok_branch.replace(chr(39), q)}' !> '{bad_branch.replace(chr(39), q)}') ~> "
            "'SELECT $posted.json AS posted, $got.ok AS ok'")
    out = finish(dsn, start(dsn, door, expr, node, input={"n": 5}))
    assert out == [{"posted": {"echo": {"n": 5, "nested": [5]}, "token": "t-5"}, "ok": True}]
    assert sql(dsn, "SELECT what, detail FROM outcome") == [("missing", 404)]


def test_http_retries_on_5xx_and_encodes_binary(dsn, fast_engine, web):
    url, calls = web
    node = t.http(f"{url}/flaky").options(backoff_base=0.05, backoff_cap=0.1).named("f") \
        >> t.http(f"{url}/binary").named("b") >> "SELECT $f.status AS s, $b.encoding AS e, $b.body AS body"
    out = finish(dsn, pgflow.start(node, dsn=dsn))
    assert out == [{"s": 200, "e": "base64", "body": "/wD+"}]
    assert sum(c[1] == "/flaky" for c in calls) == 2


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_race_of_a_slow_step_against_a_timer(dsn, engine_factory, door):
    engine_factory().start(concurrency=2)  # real time here: the timer is 0.5 s
    # the slow branch cannot finish while this test holds the lock it waits for: the race is decided by the
    # timer without waiting for the slow branch, however long anything takes on this machine
    slow = "SELECT 'slow' AS winner FROM pg_advisory_xact_lock(4242)"
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        iid = start(dsn, door, f"'{slow.replace(chr(39), chr(39) * 2)}' | pgflow.sleep(0.5)",
                    t.race(slow, t.sleep(0.5)))
        assert finish(dsn, iid) == {"slept": 0.5}
        explained = pgflow.explain(iid, dsn=dsn)
    assert f"[skipped] sql: {slow}" in explained and "[done]    sleep 0.5 s" in explained


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_variables_are_visible_to_steps(dsn, fast_engine, door):
    pgflow.set_variable("greeting", "bonjour", dsn=dsn)
    node = t.python("support.sample_trees:greet").named("g") >> "SELECT $g AS text, $vars.greeting AS v"
    expr = "(pgflow.python('support.sample_trees:greet') |=> 'g') ~> 'SELECT $g AS text, $vars.greeting AS v'"
    out = finish(dsn, start(dsn, door, expr, node, input={"who": "Ada"}))
    assert out == [{"text": "bonjour, Ada (attempt 1)", "v": "bonjour"}]


def test_sql_start_joins_the_callers_transaction(dsn, fast_engine):
    with psycopg.connect(dsn) as conn:
        rolled_back = conn.execute("SELECT pgflow.start('SELECT 1 AS one')").fetchone()[0]
        conn.rollback()
        kept = conn.execute("SELECT pgflow.start('SELECT 1 AS one')").fetchone()[0]
        conn.commit()
        awaited = conn.execute("SELECT pgflow.await_instance(%s, 60)", (kept,)).fetchone()[0]
    assert awaited["status"] == "completed" and awaited["output"] == [{"one": 1}]
    with pytest.raises(InstanceNotFound):
        pgflow.status(rolled_back, dsn=dsn)
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.FeatureNotSupported, match="dblink"):
        if conn.execute("SELECT to_regproc('dblink') IS NULL").fetchone()[0]:
            conn.execute("SELECT pgflow.start('SELECT 1', p_detached => true)")
        else:  # dblink installed here: a detached start survives the caller's rollback
            raise psycopg.errors.FeatureNotSupported("dblink present")


def test_sql_read_api(dsn, fast_engine):
    with psycopg.connect(dsn, autocommit=True) as conn:
        iid = conn.execute("SELECT pgflow.start('SELECT 7 AS x', p_label => 'sqlapi')").fetchone()[0]
        finish(dsn, iid)
        assert conn.execute("SELECT pgflow.result(%s)", (iid,)).fetchone()[0] == [{"x": 7}]
        assert conn.execute("SELECT pgflow.status(%s)->>'status'", (iid,)).fetchone()[0] == "completed"
        listed = conn.execute("SELECT id FROM pgflow.list_instances(p_label => 'sqlapi')").fetchall()
        assert listed == [(iid,)]
        nodes = conn.execute("SELECT path, node_type, status FROM pgflow.instance_nodes(%s)", (iid,)).fetchall()
        assert nodes == [("r", "sql", "completed")]
        waiting = conn.execute("SELECT pgflow.start(pgflow.wait_for_signal('never'))").fetchone()[0]
        waiting_for(dsn, waiting, "never")
        assert conn.execute("SELECT pgflow.cancel(%s, 'enough')", (waiting,)).fetchone()[0] == "cancelled"
        with pytest.raises(psycopg.errors.RaiseException, match="cancelled: enough"):
            conn.execute("SELECT pgflow.result(%s)", (waiting,))


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("expr, message", [
    ("'{\"t\": \"bogus\"}'", "unknown node type 'bogus'"),
    ("'SELECT 1' !> 'SELECT 2'", "!> needs an if"),
    ("pgflow.wait_for_schedule('61 * * * *')", "invalid cron expression '61 * * * *'"),
    ("pgflow.wait_for_schedule('* * * *')", "invalid cron expression"),
    ("'SELECT $nope'", "$nope in SQL step"),
    ("pgflow.has_rows('ghost')", "has_rows(ghost) names no earlier result"),
    ("'{not json'", "malformed node JSON"),
])
def test_bad_sql_input_is_a_clear_error_and_starts_nothing(dsn, expr, message):
    with psycopg.connect(dsn) as conn:
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(f"SELECT pgflow.start({expr})")
        assert message in str(raised.value)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM pgflow.instances").fetchone()[0] == 0


@pytest.mark.parametrize("node, message", [
    (t.Node({"t": "bogus"}), "unknown node type 'bogus'"),
    (t.wait_for_schedule("*/0 * * * *"), "invalid cron expression"),
    (t.sql("SELECT $nope"), "$nope in SQL step"),
])
def test_bad_python_input_is_a_clear_error_and_starts_nothing(dsn, node, message):
    with pytest.raises(FlowDefinitionError, match=message.replace("$", r"\$").replace("*", r"\*")):
        pgflow.start(node, dsn=dsn)
    assert pgflow.list_instances(dsn=dsn) == []


def test_signals_to_unknown_or_finished_instances_are_refused(dsn, fast_engine):
    with pytest.raises(InstanceNotFound, match="no instance with id 424242"):
        pgflow.signal(424242, "x", dsn=dsn)
    iid = pgflow.start(t.sql("SELECT 1"), dsn=dsn)
    finish(dsn, iid)
    with pytest.raises(PgflowError, match="is completed and takes no signals"):
        pgflow.signal(iid, "x", dsn=dsn)
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.Error, match="takes no signals"):
        conn.execute("SELECT pgflow.signal(%s, 'x')", (iid,))


def test_python_builders_reject_non_nodes():
    with pytest.raises(TypeError, match="expected a workflow node or SQL text"):
        t.seq("SELECT 1", 42)
    with pytest.raises(ValueError, match="module-level function"):
        t.python(lambda ctx: 1)


def test_a_tree_instance_failed_by_the_coordinator_leaves_no_step_open(dsn, fast_engine):
    """When a leaf fails, the coordinator fails the instance and cancels every step still open: timers and
    signal waits ('waiting') too, not only tasks (they used to stay 'waiting' after the instance failed, as
    the coordinator kept its own list of open statuses)."""
    failing = "pgflow.with_options('SELECT 1 / 0', '{\"max_attempts\": 1}')"
    expr = f"pgflow.join(pgflow.wait_for_signal('never'), pgflow.sleep(3600), {failing})"
    iid = sql(dsn, f"SELECT pgflow.start({expr})")[0][0]
    assert pgflow.wait(iid, 60, dsn=dsn).status == "failed"
    still_open = sql(dsn, "SELECT step_name, status FROM pgflow.steps WHERE instance_id = %s"
                          " AND status NOT IN ('completed', 'failed', 'cancelled', 'skipped') ORDER BY 1", (iid,))
    assert still_open == []
    assert sql(dsn, "SELECT step_name, status FROM pgflow.steps WHERE instance_id = %s AND step_name IN"
                    " ('r.0', 'r.1') ORDER BY 1", (iid,)) == [("r.0", "cancelled"), ("r.1", "cancelled")]
