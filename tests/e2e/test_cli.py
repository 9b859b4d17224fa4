"""The CLI contract: every command, its --help, clear errors with non-zero exit, and the demo (twice)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import pgflow_command, subprocess_env, wait_until

import pgflow

COMMANDS = ["init", "demo", "coordinator", "worker", "start", "status", "result", "cancel", "list", "explain",
            "watch", "signal"]


def cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(pgflow_command(*args), env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def test_every_command_has_help():
    top = cli("--help")
    assert top.returncode == 0
    for command in COMMANDS:
        assert command in top.stdout
        sub = cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "Usage: " in sub.stdout and "--dsn" in sub.stdout


def test_init_is_idempotent(dsn):
    first = cli("init", "--dsn", dsn)
    again = cli("init", "--dsn", dsn)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert "already up to date" in again.stdout


def test_start_status_result_list_cancel(dsn, engine):
    started = cli("start", "support.sample_flows:diamond", "--input", "7", "--label", "cli", "--dsn", dsn)
    assert started.returncode == 0, started.stderr
    iid = int(started.stdout)
    subprocess.run(pgflow_command("status", str(iid), "--dsn", dsn), env=subprocess_env(), check=True,
                   capture_output=True)
    pgflow.wait(iid, 60, dsn=dsn)
    result = cli("result", str(iid), "--dsn", dsn)
    assert result.returncode == 0 and json.loads(result.stdout) == [14, 21]
    status = cli("status", str(iid), "--json", "--dsn", dsn)
    assert json.loads(status.stdout)["status"] == "completed"
    human = cli("status", str(iid), "--dsn", dsn).stdout
    assert "completed" in human and "bottom" in human
    listed = cli("list", "--label", "cli", "--json", "--dsn", dsn)
    assert [r["id"] for r in json.loads(listed.stdout)] == [iid]
    again = cli("cancel", str(iid), "--dsn", dsn)
    assert again.returncode == 1 and "already completed" in again.stderr


def test_cancel_a_pending_instance(dsn):
    iid = cli("start", "support.sample_flows:diamond", "--input", "1", "--dsn", dsn).stdout.strip()
    done = cli("cancel", iid, "--reason", "not needed", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    failed = cli("result", iid, "--dsn", dsn)
    assert failed.returncode == 1 and "cancelled: not needed" in failed.stderr


@pytest.mark.parametrize("args, code, message", [
    (["status", "999999"], 1, "no instance with id 999999"),
    (["result", "999999"], 1, "no instance with id 999999"),
    (["cancel", "999999"], 1, "no instance with id 999999"),
    (["status", "abc"], 2, "is not a valid integer"),
    (["start", "support.sample_flows:diamond", "--input", "{bad json"], 2, "not valid JSON"),
    (["start", "support.sample_flows:nothing_here"], 1, "is not a pgflow Flow"),
    (["start", "no_such_module:flow"], 1, "cannot import module"),
    (["start", "noколон"], 1, "module:attribute"),
    (["list", "--status", "weird"], 2, "Invalid value"),
])
def test_clear_errors(dsn, args, code, message):
    out = cli(*args, "--dsn", dsn)
    assert out.returncode == code, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_server_is_a_clear_error():
    out = cli("status", "1", "--dsn", "postgresql://127.0.0.1:1/nothing?connect_timeout=2")
    assert out.returncode == 1
    assert "cannot connect to PostgreSQL" in out.stderr and "Traceback" not in out.stderr


def test_uninitialised_database_asks_for_init(server):
    from psycopg.conninfo import make_conninfo

    admin, _ = server
    out = cli("worker", "--dsn", make_conninfo(admin, dbname="postgres"), "--concurrency", "1")
    assert out.returncode == 1 and "run `pgflow init`" in out.stderr


def test_demo_runs_twice(dsn):
    for _ in range(2):
        out = cli("demo", "--documents", "120", "--batches", "3", "--no-progress", "--dsn", dsn, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "instances   3 (3 completed, 0 failed)" in out.stdout
        assert "failures    0" in out.stdout


def test_explain_watch_and_signal_a_control_flow_workflow(dsn, engine):
    started = cli("start", "support.sample_trees:approval", "--dsn", dsn)
    assert started.returncode == 0, started.stderr
    iid = started.stdout.strip()
    wait_until(lambda: "[waiting] wait for signal go" in cli("explain", iid, "--dsn", dsn).stdout, 60,
               "explain to show the signal wait", detail=lambda: cli("explain", iid, "--dsn", dsn).stdout)
    bad = cli("signal", iid, "go", "--data", "{oops", "--dsn", dsn)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    sent = cli("signal", iid, "go", "--data", '{"v": 5}', "--dsn", dsn)
    assert sent.returncode == 0, sent.stderr
    watched = cli("watch", iid, "--interval", "0.2", "--dsn", dsn, timeout=60)
    assert watched.returncode == 0 and "instance " + iid + "  python  completed" in watched.stdout
    assert "[done]    wait for signal go" in watched.stdout
    assert pgflow.result(int(iid), dsn=dsn) == [{"v": 5}]
    late = cli("signal", iid, "go", "--dsn", dsn)
    assert late.returncode == 1 and "takes no signals" in late.stderr
