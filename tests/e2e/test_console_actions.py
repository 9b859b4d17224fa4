"""The console's actions from SQL and Python, with real workers: retrying failed DAG, map and control-flow
instances from their failed steps, starting registered versions, requeueing and discarding dead letters; and
the console itself acting as its role (row-level security, CSRF, read-only, no secret on a page)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from conftest import drop_database_and_roles, run_sql, wait_until
from psycopg.conninfo import make_conninfo
from support.console_helpers import Browserless, console_process

import pgflow
from pgflow import InstanceNotFound, PgflowError
from pgflow import tree as t
from pgflow.engine.messages import task_message


def _engine(engine_factory):
    engine = engine_factory()
    engine.coordinator()
    engine.worker("--import", "support.console_flows")
    return engine


def _steps(dsn: str, iid: int) -> dict[tuple[str, int], tuple]:
    rows = run_sql(dsn, "SELECT step_name, task_index, status, attempt, finished_at FROM pgflow.steps"
                        " WHERE instance_id = %s", (iid,))
    return {(r[0], r[1]): r[2:] for r in rows}


def test_retry_a_failed_dag_runs_only_its_failed_step_again(dsn, engine_factory, tmp_path):
    from support import console_flows

    _engine(engine_factory)
    flag = tmp_path / "open"
    iid = pgflow.start(console_flows.gate, {"n": 21, "flag": str(flag)}, dsn=dsn)
    failed = pgflow.wait(iid, 60, dsn=dsn)
    assert failed.status == "failed" and "gate closed" in failed.error
    assert "RuntimeError: gate closed" in failed.step("guarded").traceback
    before = _steps(dsn, iid)
    assert before[("guarded", -1)][:2] == ("failed", 2)
    flag.write_text("")
    assert pgflow.retry(iid, dsn=dsn) == "running"
    done = pgflow.wait(iid, 60, dsn=dsn)
    assert done.status == "completed", done.error
    assert done.output == {"doubled": 42, "attempt": 1}  # fresh attempts: the first one after the retry
    after = _steps(dsn, iid)
    assert after[("prepare", -1)] == before[("prepare", -1)]  # completed step kept, not run again
    with pytest.raises(PgflowError, match="only a failed instance can be retried"):
        pgflow.retry(iid, dsn=dsn)
    with pytest.raises(InstanceNotFound):
        pgflow.retry(10**12, dsn=dsn)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        run_sql(dsn, "SELECT pgflow.retry(%s)", (iid,))


def test_retry_a_map_requeues_only_its_failed_task_with_the_engines_message(dsn, engine_factory, tmp_path):
    from support import console_flows

    engine = _engine(engine_factory)
    flag = tmp_path / "seven"
    iid = pgflow.start(console_flows.gated_map, {"n": 30, "flag": str(flag)}, dsn=dsn)
    assert pgflow.wait(iid, 60, dsn=dsn).status == "failed"
    wait_until(lambda: run_sql(dsn, "SELECT count(*) FROM pgflow.steps WHERE instance_id = %s AND status IN"
                                    " ('running', 'queued', 'retrying')", (iid,)) == [(0,)], what="tasks settled")
    assert engine.stop() == []  # no worker: the requeued message stays on the queue for us to read
    before = _steps(dsn, iid)
    flag.write_text("")
    assert pgflow.retry(iid, dsn=dsn) == "running"  # its queued tasks can be claimed before a coordinator looks
    reopened = {k: v for k, v in _steps(dsn, iid).items() if v[0] == "queued"}
    rerun = {k for k, v in before.items() if k[0] == "check" and k[1] >= 0 and v[0] != "completed"}
    assert set(reopened) == rerun and ("check", 7) in rerun
    queued = run_sql(dsn, "SELECT message FROM pgmq.q_pgflow WHERE message->>'instance' = %s"
                          " ORDER BY (message->>'task')::int", (str(iid),))
    version = console_flows.gated_map.version
    assert [m for (m,) in queued] == [task_message("console_map", version, iid, "check", k[1],
                                                   {"i": k[1], "flag": str(flag)}) for k in sorted(rerun)]
    engine = engine_factory()
    engine.worker("--import", "support.console_flows")  # the worker first: it claims the tasks of the running instance
    wait_until(lambda: run_sql(dsn, "SELECT count(*) FROM pgflow.steps WHERE instance_id = %s AND task_index >= 0"
                                    " AND status <> 'completed'", (iid,)) == [(0,)], what="re-run tasks done")
    engine.coordinator()
    done = pgflow.wait(iid, 60, dsn=dsn)
    assert done.status == "completed" and done.output == sum(range(30))
    after = _steps(dsn, iid)
    kept = [k for k, v in before.items() if k[0] == "check" and v[0] == "completed"]
    assert kept and all(after[k] == before[k] for k in kept)  # completed tasks were not run again


def test_retry_a_control_flow_instance_keeps_its_completed_nodes(dsn, engine_factory):
    _engine(engine_factory)
    run_sql(dsn, "CREATE TABLE gate (open boolean)")
    node = t.sql("SELECT 5 AS a").named("a") >> "SELECT $a.a / (SELECT count(*) FROM gate)::int AS b"
    iid = pgflow.start(node, dsn=dsn)
    failed = pgflow.wait(iid, 60, dsn=dsn)
    assert failed.status == "failed" and "division by zero" in failed.error
    first = _steps(dsn, iid)[("r.0.0", -1)]
    run_sql(dsn, "INSERT INTO gate VALUES (true)")
    assert run_sql(dsn, "SELECT pgflow.retry(%s)", (iid,)) == [("retried",)]
    done = pgflow.wait(iid, 60, dsn=dsn)
    assert done.status == "completed" and done.output == [{"b": 5}]
    assert _steps(dsn, iid)[("r.0.0", -1)] == first


def test_start_a_registered_version_by_name(dsn, engine_factory):
    from support import sample_flows

    _engine(engine_factory)
    first = pgflow.start(sample_flows.chain, {"n": 1, "label": "a"}, dsn=dsn)
    assert pgflow.wait(first, 60, dsn=dsn).status == "completed"
    again = pgflow.start_registered("chain", {"n": 2, "label": "b"}, label="again", dsn=dsn)
    info = pgflow.wait(again, 60, dsn=dsn)
    assert info.status == "completed" and info.output["value"] == 31 and info.label == "again"
    sql_id = run_sql(dsn, "SELECT pgflow.start_registered('chain', '{\"n\": 3, \"label\": \"c\"}')")[0][0]
    assert pgflow.wait(sql_id, 60, dsn=dsn).output["value"] == 41
    with pytest.raises(InstanceNotFound, match="no registered flow"):
        pgflow.start_registered("nope", dsn=dsn)


@pytest.fixture
def roles(dsn, server):
    """alice and bob (pgflow usage), boss (pgflow_admin); dropped afterwards."""
    admin_dsn, _ = server
    suffix = uuid.uuid4().hex[:8]
    names = {k: f"pgflow_{k}_{suffix}" for k in ("alice", "bob", "boss")}
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE ROLE "{name}" LOGIN')
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute("SELECT pgflow.grant_usage(%s)", (name,))
        conn.execute(f'GRANT pgflow_admin TO "{names["boss"]}"')
    yield {k: make_conninfo(dsn, user=v) for k, v in names.items()}
    drop_database_and_roles(admin_dsn, dsn, names.values())


def test_dead_letters_are_requeued_or_discarded_by_operators_only(dsn, roles, engine_factory):
    run_sql(dsn, "SELECT pgflow.ensure_queue('pgflow')")
    _engine(engine_factory)
    run_sql(dsn, "SELECT pgmq.send('pgflow', '{\"not\": \"a task\"}')")
    wait_until(lambda: run_sql(dsn, "SELECT count(*) FROM pgflow.dead_letters") == [(1,)], what="dead letter")
    (letter,) = run_sql(dsn, "SELECT id FROM pgflow.dead_letters")[0]
    for user in ("alice", "bob"):
        with pytest.raises(PgflowError):
            pgflow.requeue_dead_letter(letter, dsn=roles[user])
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            run_sql(roles[user], "SELECT pgflow.discard_dead_letter(%s)", (letter,))
    assert pgflow.requeue_dead_letter(letter, dsn=roles["boss"]) > 0
    wait_until(lambda: run_sql(dsn, "SELECT count(*) FROM pgflow.dead_letters WHERE id > %s", (letter,)) == [(1,)],
               what="dead-lettered again")
    (again,) = run_sql(dsn, "SELECT id FROM pgflow.dead_letters")[0]
    pgflow.discard_dead_letter(again, dsn=dsn)
    assert run_sql(dsn, "SELECT count(*) FROM pgflow.dead_letters") == [(0,)]
    with pytest.raises(PgflowError, match="no dead letter"):
        pgflow.discard_dead_letter(again, dsn=dsn)


# ---------------------------------------------------------------------------------------------- the console


def test_a_users_console_shows_and_acts_on_their_own_instances_only(dsn, roles, engine_factory, tmp_path):
    from support import console_flows

    _engine(engine_factory)
    mine = pgflow.start(t.wait_for_signal("go"), label="bobs", dsn=roles["bob"])
    theirs = pgflow.start(t.wait_for_signal("go"), label="alices", dsn=roles["alice"])
    broken = pgflow.start(console_flows.gate, {"n": 1, "flag": str(tmp_path / "never")}, dsn=roles["alice"])
    assert pgflow.wait(broken, 60, dsn=roles["alice"]).status == "failed"
    (tmp_path / "never").write_text("")
    with console_process(roles["bob"]) as url:
        bob = Browserless(url)
        listing = bob.get("/").text
        assert f'href="/instances/{mine}"' in listing
        assert f'href="/instances/{theirs}"' not in listing and f'href="/instances/{broken}"' not in listing
        for other in (theirs, broken):
            assert bob.get(f"/instances/{other}").status_code == 404
        assert bob.post(f"/instances/{theirs}/cancel").status_code == 404
        assert bob.post(f"/instances/{theirs}/signal", name="go", data="{}").status_code == 404
        assert bob.post(f"/instances/{broken}/retry").status_code == 404
        assert "does not" in bob.get("/dead-letters").text  # not an operator
        assert bob.post("/dead-letters/1/discard").status_code == 403
        # ... and on his own instance the same action works
        answer = bob.post(f"/instances/{mine}/signal", name="go", data='{"x": 1}')
        assert answer.status_code == 303 and "signal" in answer.headers["location"]
        assert pgflow.wait(mine, 60, dsn=roles["bob"]).status == "completed"
    assert pgflow.status(theirs, dsn=roles["alice"]).status == "running"
    assert pgflow.status(broken, dsn=roles["alice"]).status == "failed"


def test_actions_need_the_forms_token_a_confirmation_and_a_writable_console(dsn, engine_factory):
    _engine(engine_factory)
    iid = pgflow.start(t.wait_for_signal("go"), dsn=dsn)
    with console_process(dsn) as url:
        session = Browserless(url)
        assert session.post(f"/instances/{iid}/cancel", token="").status_code == 403
        assert session.post(f"/instances/{iid}/cancel", token="0" * 64).status_code == 403
        stranger = Browserless(url)  # another browser: its own cookie, someone else's token
        assert stranger.post(f"/instances/{iid}/cancel", token=session.token()).status_code == 403
        asked = session.post(f"/instances/{iid}/cancel", confirm=False)
        assert asked.status_code == 200 and 'id="confirm"' in asked.text
        assert pgflow.status(iid, dsn=dsn).status == "running"  # asking is not doing
        assert session.post(f"/instances/{iid}/cancel").status_code == 303
        assert pgflow.status(iid, dsn=dsn).status == "cancelled"
        page = session.get("/")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "samesite=strict" in page.headers.get("set-cookie", "samesite=strict").lower()
    other = pgflow.start(t.wait_for_signal("go"), dsn=dsn)
    with console_process(dsn, "--read-only") as url:
        session = Browserless(url)
        page = session.get(f"/instances/{other}").text
        assert 'id="actions"' not in page and "read-only" in page
        assert session.post(f"/instances/{other}/cancel", token="", confirm=True).status_code == 403
    assert pgflow.status(other, dsn=dsn).status == "running"


def test_no_secret_or_password_appears_on_any_page(dsn, engine_factory):
    secret_value = "s3cret-" + uuid.uuid4().hex
    password = "pw-" + uuid.uuid4().hex
    _engine(engine_factory)
    pgflow.grant_secret("postgres", "token", "env:I15_CONSOLE_SECRET", dsn=dsn)
    pgflow.set_variable("region", "eu", dsn=dsn)
    iid = pgflow.start(t.sql("SELECT 1 AS one"), dsn=dsn)
    pgflow.wait(iid, 60, dsn=dsn)
    with console_process(make_conninfo(dsn, password=password), I15_CONSOLE_SECRET=secret_value) as url:
        session = Browserless(url)
        pages = ["/", f"/instances/{iid}", "/flows", "/queues", "/dead-letters", "/instances/999999999",
                 f"/?id={iid}", "/?since=not-a-time"]
        pages += [p for p in _links(session.get("/flows").text) if p.startswith("/flows/")]
        texts = [session.http.get(p, follow_redirects=True).text for p in pages]
    assert len(texts) > 8
    for text in texts:
        assert secret_value not in text and password not in text and "env:I15_CONSOLE_SECRET" not in text


def _links(page: str) -> list[str]:
    import re

    return re.findall(r'href="(/[^"]*)"', page)
