"""pgflow.Client: a pooled client on one database, start -> a handle, typed status objects, the same conn=
option on every call, a pool never shared across fork; and no read-only call ever changes a role."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
from conftest import pgflow_command, run_sql, subprocess_env
from support import sample_flows as sf

import pgflow
from pgflow import Client, InstanceFailed, InstanceHandle, InstanceInfo, InstanceStatus, StepInfo, StepStatus, settings
from pgflow import tree as t


def test_a_handle_reports_typed_statuses_and_results(dsn, engine):
    with Client(dsn) as client:
        handle = client.start(sf.chain, {"n": 2, "label": "typed"}, label="handles")
        assert isinstance(handle, InstanceHandle) and int(handle) == handle.id
        info = handle.wait(30)
        assert isinstance(info, InstanceInfo) and info.status is InstanceStatus.COMPLETED
        assert info.status == "completed" and info.finished  # a StrEnum: equal to its text
        assert [type(s) for s in info.steps] == [StepInfo] * 3
        assert info.step("third").status is StepStatus.COMPLETED and info.step("third").attempts == 1
        assert handle.result() == {"value": 31, "label": "typed", "key": f"pgflow:{handle.id}:third"}
        assert handle.status() == info
        assert handle.cancel() is InstanceStatus.COMPLETED  # finished: keeps its status
        [listed] = client.list_instances(label="handles")
        assert listed["id"] == handle.id and listed["status"] is InstanceStatus.COMPLETED
        many = client.start_many(sf.chain, [{"n": i, "label": "many"} for i in range(3)])
        assert [h.wait(30).output["value"] for h in many] == [11, 21, 31]
    assert client._pool is None  # closed by the with block


def test_a_failed_instance_and_its_step_error(dsn, engine):
    handle = Client(dsn, pool=False).start(sf.broken, "x")
    info = handle.wait(30)
    assert info.status is InstanceStatus.FAILED and info.step("explode").status is StepStatus.FAILED
    assert "ValueError: boom: x" in info.step("explode").error
    with pytest.raises(InstanceFailed, match="boom"):
        handle.result()
    assert info.as_dict()["steps"][0]["status"] == "failed" and isinstance(info.as_dict()["created_at"], str)


def test_every_call_takes_the_callers_connection_and_transaction(dsn):
    client = Client(dsn)
    try:
        with psycopg.connect(dsn) as conn:
            handle = client.start(sf.chain, {"n": 1, "label": "tx"}, conn=conn)
            assert client.status(handle.id, conn=conn).status is InstanceStatus.PENDING
            assert client.cancel(handle.id, "changed my mind", conn=conn) is InstanceStatus.CANCELLED
            # inside a transaction: no NOTIFY can arrive, so wait polls; the instance is finished already
            assert handle.wait(5, conn=conn).status is InstanceStatus.CANCELLED
            assert [r["id"] for r in client.list_instances(conn=conn)] == [handle.id]
            client.set_variable("colour", "blue", conn=conn)
            conn.rollback()
        assert client.list_instances() == []  # rolled back: it never existed
        with pytest.raises(pgflow.InstanceNotFound):
            client.status(handle.id)
        tree_handle = client.start(t.wait_for_signal("go"), name="waits")
        assert client.signal(tree_handle.id, "go", {"v": 1}) > 0
        assert "wait for signal go" in client.explain(tree_handle.id)
    finally:
        client.close()


def test_wait_on_an_autocommit_connection_listens_only_for_its_duration(dsn, engine):
    with psycopg.connect(dsn, autocommit=True) as conn:
        iid = pgflow.start(sf.diamond, 4, conn=conn)
        assert pgflow.wait(iid, 30, conn=conn).output == [8, 12]
        assert conn.execute("SELECT pg_listening_channels()").fetchall() == []
    waiting = pgflow.start(t.wait_for_signal("never"), dsn=dsn, name="never")  # does not end by itself
    with pytest.raises(TimeoutError, match=f"instance {waiting} still (pending|running) after 0.1 s"):
        pgflow.wait(waiting, 0.1, dsn=dsn)


def test_a_pooled_client_is_not_shared_across_fork(dsn):
    """The child of a fork opens its own pool: the inherited connections belong to the parent's sessions."""
    client = Client(dsn)
    try:
        handle = client.start(sf.chain, {"n": 1, "label": "fork"})
        parent_pool = client._pool
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if it read the instance through a pool of its own
            code = 1
            try:
                ok = client.status(handle.id).status is InstanceStatus.PENDING and client._pool is not parent_pool
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client._pool is parent_pool and client.status(handle.id).status is InstanceStatus.PENDING
    finally:
        client.close()


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(pgflow.DatabaseUnavailable, match="cannot connect to PostgreSQL"), \
            Client("postgresql://127.0.0.1:1/nothing?connect_timeout=2") as client:
        client.status(1)


@pytest.fixture
def embedded(server):
    """An embedded server: the suite's own, or (when the suite runs on PGFLOW_TEST_DSN) a temporary one."""
    _, handle = server
    if handle is not None:
        yield handle
        return
    from pgflow.db.embedded import start_server

    home = Path(tempfile.mkdtemp(prefix="pgflow-embedded-"))
    handle = start_server(home / "pgdata", cleanup_mode="delete")
    yield handle
    handle.cleanup()
    shutil.rmtree(home, ignore_errors=True)


def test_read_only_calls_never_alter_the_embedded_servers_role(embedded, monkeypatch):
    """Without a DSN every call uses the embedded server; only the commands that set a server up (init, demo,
    coordinator, worker) let its superuser start instances, never status, result, list, explain or wait."""
    home, uri = embedded.pgdata.parent, embedded.get_uri()
    monkeypatch.delenv("PGFLOW_DSN", raising=False)
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env({"PGFLOW_HOME": str(home)}))

    def allowed() -> bool:
        rows = run_sql(uri, "SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole"
                            " WHERE r.rolname = 'postgres' AND s.setdatabase = 0")
        return any("pgflow.allow_superuser=on" in setting for row in rows for setting in row[0] or [])

    was_allowed = allowed()
    run_sql(uri, "ALTER ROLE postgres RESET pgflow.allow_superuser")
    try:
        assert pgflow.resolve_dsn() == uri
        for read in (lambda: pgflow.status(1), lambda: pgflow.result(1), lambda: pgflow.list_instances(),
                     lambda: pgflow.explain(1), lambda: pgflow.wait(1, 0.1)):
            with pytest.raises(psycopg.Error):  # its database has no pgflow schema: each call reads, then fails
                read()
        listed = subprocess.run(pgflow_command("list"), env=subprocess_env(PGFLOW_HOME=str(home)),
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 1 and "pgflow.instances" in listed.stderr, listed.stderr
        assert not allowed()
        pgflow.resolve_dsn(setup=True)  # what init, demo, coordinator and worker do
        assert allowed()
    finally:
        run_sql(uri, "ALTER ROLE postgres " + ("SET pgflow.allow_superuser = on" if was_allowed
                                              else "RESET pgflow.allow_superuser"))
