"""The container image, built from the real Dockerfile (unmodified) and run the way production runs it: pgflow
as PID 1 (no --init), a read-only root filesystem, uid 10001, a tmpfs on /tmp, the host's network. The worked
example of deploy/README.md (deploy/examples/orders: `FROM pgflow` + a module + `worker --import`) is built
and run too.

Skipped only where no Docker daemon answers; in CI .ci/docker-setup starts one and makes the base image.
Both images are built once per session; Docker's layer cache makes the second CI pass quick.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import run_sql, wait_until
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgflow
from pgflow import InstanceInfo

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "examples" / "orders"
RUNTIME_USER = "10001:10001"
IMAGE_BUDGET_BYTES = 300_000_000  # 228 MB when measured (base 75, Python 47, virtualenv 107 of which 75 PG)
SOCKET_DIR = "/run/pgflow-test-postgresql"  # where a container finds the test server's unix socket
DRAIN_TIMEOUT = 30  # the worker's --drain-timeout; `docker stop` grants more
STOP_GRACE = DRAIN_TIMEOUT + 30
ORDER = {"order": 7, "warehouse_seconds": 0,
         "lines": [{"sku": "tea", "quantity": 3, "unit_cents": 450}, {"sku": "cup", "quantity": 2, "unit_cents": 900}]}


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [pytest.mark.docker,
              pytest.mark.skipif(not _docker_answers(), reason="no Docker daemon answers (.ci/docker-setup makes one)")]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run the docker CLI; on failure (with ``check``) fail the test with its output."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Images:
    pgflow: str  # the repository's Dockerfile
    orders: str  # deploy/examples/orders, FROM the image above
    revision: str
    source: str


def _git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def _local_ca_certificates() -> str:
    """CA certificates added to this machine (update-ca-certificates' local directory), for pip inside the
    build: where an egress proxy re-signs TLS, Debian's certificates alone do not reach PyPI. Usually empty."""
    local = Path("/usr/local/share/ca-certificates")
    return "".join(p.read_text() for p in sorted(local.rglob("*.crt"))) if local.is_dir() else ""


def _build(tag: str, context: Path, build_args: dict[str, str]) -> None:
    args = [arg for name, value in build_args.items() for arg in ("--build-arg", f"{name}={value}")]
    docker("build", "--network", "host", "--tag", tag, *args, str(context), timeout=1800)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    """Build the pgflow image and the example worker image under tags of this session (so parallel runs from
    other checkouts cannot swap them); untag them afterwards, keeping their layers as the build cache."""
    session = uuid.uuid4().hex[:10]
    built = Images(pgflow=f"pgflow-test:{session}", orders=f"pgflow-test-orders:{session}",
                   revision=_git("rev-parse", "HEAD") or "unknown",
                   source=_git("remote", "get-url", "origin") or REPO.as_uri())
    try:
        _build(built.pgflow, REPO, {"REVISION": built.revision, "SOURCE": built.source,
                                    "EXTRA_CA_CERTS": _local_ca_certificates()})
        _build(built.orders, EXAMPLE, {"PGFLOW_IMAGE": built.pgflow})
        yield built
    finally:
        for tag in (built.orders, built.pgflow):
            docker("image", "rm", "--no-prune", tag, check=False)


# --------------------------------------------------------------------------- running


def container_connection(dsn: str) -> tuple[str, list[str]]:
    """The DSN a container on the host network uses for the test database, and the `docker run` options it
    needs. A TCP address works as it is. A unix socket (the embedded server's) is bind-mounted by itself: its
    directory is the server's private data directory, which uid 10001 may not enter. The user is named, since
    libpq's default (the OS user) differs inside the container."""
    params = conninfo_to_dict(dsn)
    params["user"] = run_sql(dsn, "SELECT current_user")[0][0]
    host = params.get("host") or ""
    if not host.startswith("/"):
        return make_conninfo(**params), []
    name = f".s.PGSQL.{params.get('port') or 5432}"
    params["host"] = SOCKET_DIR
    return make_conninfo(**params), ["--mount", f"type=bind,source={host}/{name},target={SOCKET_DIR}/{name}"]


class Containers:
    """Containers of one test, run as in production; all removed at teardown."""

    def __init__(self, dsn: str) -> None:
        self.dsn, self.mounts = container_connection(dsn)
        self.names: list[str] = []

    def options(self) -> list[str]:
        return ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", RUNTIME_USER,
                "--env", f"PGFLOW_DSN={self.dsn}", "--env", "PGFLOW_LOG_LEVEL=INFO", *self.mounts]

    def run(self, image: str, *args: str, timeout: float = 120) -> str:
        """A one-shot command (`init`, `start`, `result`); its stdout."""
        return docker("run", "--rm", *self.options(), image, *args, timeout=timeout).stdout

    def start(self, role: str, image: str, *args: str) -> str:
        """A long-running container (`coordinator`, `worker`); its name."""
        name = f"pgflow-test-{role}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        docker("run", "--detach", "--name", name, *self.options(), image, *args)
        return name

    def logs(self, name: str) -> str:
        result = docker("logs", "--tail", "60", name, check=False)
        return f"--- {name}:\n{result.stdout}{result.stderr}"

    def state(self, name: str) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)

    def remove_all(self) -> None:
        for name in self.names:
            docker("rm", "--force", name, check=False)


@pytest.fixture
def containers(dsn) -> Iterator[Containers]:
    yield from _containers(dsn)


@pytest.fixture
def empty_containers(empty_dsn) -> Iterator[Containers]:
    yield from _containers(empty_dsn)


def _containers(dsn: str) -> Iterator[Containers]:
    made = Containers(dsn)
    try:
        yield made
    finally:
        made.remove_all()


def pid1_argv(name: str) -> list[str]:
    """The command line of PID 1 inside the container (its own PID namespace)."""
    return docker("exec", name, "cat", "/proc/1/cmdline").stdout.rstrip("\0").split("\0")


def pid1_uids(name: str) -> list[str]:
    status = docker("exec", name, "cat", "/proc/1/status").stdout
    return next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))


def assert_pgflow_is_pid1(containers: Containers, name: str, command: str) -> None:
    argv = pid1_argv(name)
    # the console script runs through its interpreter: python3 /opt/pgflow/bin/pgflow <command> ...
    assert argv[1:3] == ["/opt/pgflow/bin/pgflow", command], (argv, containers.logs(name))
    assert pid1_uids(name) == ["10001"] * 4, "PID 1 runs as uid 10001 (real, effective, saved, fs)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    return False


def instance_status(dsn: str, instance_id: int) -> InstanceInfo:
    return pgflow.status(instance_id, dsn=dsn)


def wait_finished(dsn: str, instance_id: int, containers: Containers, timeout: float = 120) -> InstanceInfo:
    try:
        wait_until(lambda: instance_status(dsn, instance_id).finished, timeout=timeout,
                   what=f"instance {instance_id} to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(containers.logs(n) for n in containers.names)) from None
    return instance_status(dsn, instance_id)


def start_order(containers: Containers, images: Images, order: dict) -> int:
    """Start the example flow with the CLI inside the example image; the instance id it prints."""
    return int(containers.run(images.orders, "start", "orders:fulfil", "--input", json.dumps(order)).strip())


def expected_output(order: dict, instance_id: int) -> dict:
    return {"total_cents": sum(line["quantity"] * line["unit_cents"] for line in order["lines"]),
            "reservation": f"pgflow:{instance_id}:reserve", "skus": sorted(line["sku"] for line in order["lines"])}


# --------------------------------------------------------------------------- the image itself


def test_image_metadata_and_contents(images):
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", images.pgflow).stdout)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.revision"] == images.revision
    assert labels["org.opencontainers.image.source"] == images.source
    assert config["User"] == RUNTIME_USER
    assert config["Entrypoint"] == ["pgflow"], "exec form: pgflow itself is PID 1"
    size = int(docker("image", "inspect", "--format", "{{.Size}}", images.pgflow).stdout)
    print(f"image size: {size / 1e6:.0f} MB")
    assert size < IMAGE_BUDGET_BYTES, f"the image grew to {size / 1e6:.0f} MB"
    # the final stage carries no compiler, no pip or apt cache, and nothing of the build's extra CA certificates
    leftovers = docker("run", "--rm", "--entrypoint", "sh", images.pgflow, "-c",
                       "for tool in gcc cc c++ make ld; do command -v $tool; done;"
                       " ls -d /root/.cache /tmp/* /opt/build-ca-certificates.crt /var/cache/apt/archives/*.deb"
                       " /var/lib/apt/lists/*Packages* /var/cache/apt/*.bin 2>/dev/null; true").stdout
    assert leftovers == ""
    history = docker("history", "--no-trunc", images.pgflow).stdout
    assert "EXTRA_CA_CERTS" not in history and "BEGIN CERTIFICATE" not in history
    assert "/opt/pgflow/bin/pip" in docker("run", "--rm", "--entrypoint", "sh", images.pgflow, "-c",
                                           "command -v pip").stdout, "pip stays for images built FROM this one"


def test_zero_install_default_runs_in_the_image(images):
    """Without a DSN, `pgflow init` starts the embedded PostgreSQL under /tmp (the tmpfs): even offline."""
    out = docker("run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "--user", RUNTIME_USER,
                 images.pgflow, "init").stdout
    assert out.startswith("pgflow schema at version ") and "(applied " in out, out


# --------------------------------------------------------------------------- init, coordinator, worker as PID 1


def test_init_coordinator_and_worker_as_pid1_run_flows_started_from_sql_and_cli(images, empty_dsn, empty_containers):
    dsn, containers = empty_dsn, empty_containers
    out = containers.run(images.pgflow, "init")
    assert "(applied " in out, out  # an empty database: init installed pgmq and built the schema

    coordinator = containers.start("coordinator", images.pgflow, "coordinator")
    metrics_port = free_port()
    worker = containers.start("worker", images.orders, "worker", "--import", "orders", "--concurrency", "2",
                              "--metrics-port", str(metrics_port))
    wait_until(lambda: ready(metrics_port), timeout=60, what="the worker's /readyz")
    assert_pgflow_is_pid1(containers, coordinator, "coordinator")
    assert_pgflow_is_pid1(containers, worker, "worker")

    from_sql = run_sql(dsn, "SELECT pgflow.start('SELECT 41 + 1 AS answer')")[0][0]
    from_cli = start_order(containers, images, ORDER)
    for instance_id in (from_sql, from_cli):
        final = wait_finished(dsn, instance_id, containers)
        assert final.status == "completed", (final.error, containers.logs(worker))
    assert run_sql(dsn, "SELECT pgflow.result(%s)", (from_sql,))[0][0] == [{"answer": 42}]
    printed = containers.run(images.orders, "result", str(from_cli))
    assert json.loads(printed) == expected_output(ORDER, from_cli)

    for name in (worker, coordinator):
        docker("stop", "--time", str(STOP_GRACE), name, timeout=STOP_GRACE + 60)
        assert containers.state(name)["ExitCode"] == 0, containers.logs(name)


def reserve_row(dsn: str, instance_id: int) -> tuple:
    """(status, finished_at, attempt) of the example flow's slow step."""
    rows = run_sql(dsn, "SELECT status, finished_at, attempt FROM pgflow.steps"
                        " WHERE instance_id = %s AND step_name = 'reserve' AND task_index = -1", (instance_id,))
    return rows[0] if rows else ("not queued yet", None, 0)


def test_docker_stop_drains_the_worker_and_it_exits_0(images, dsn, containers):
    containers.start("coordinator", images.pgflow, "coordinator")
    worker = containers.start("worker", images.orders, "worker", "--import", "orders", "--concurrency", "1",
                              "--drain-timeout", str(DRAIN_TIMEOUT))
    order = {**ORDER, "warehouse_seconds": 6}
    instance_id = start_order(containers, images, order)
    wait_until(lambda: reserve_row(dsn, instance_id)[0] == "running", timeout=120, what="the slow step to run")

    sigterm_at = run_sql(dsn, "SELECT clock_timestamp()")[0][0]  # the database's clock, as finished_at
    began = time.monotonic()
    docker("stop", "--time", str(STOP_GRACE), worker, timeout=STOP_GRACE + 60)
    stopped_after = time.monotonic() - began
    state = containers.state(worker)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, containers.logs(worker))
    assert stopped_after < STOP_GRACE, "pgflow exited by itself, not by the SIGKILL at the end of the grace period"
    status, finished_at, attempt = reserve_row(dsn, instance_id)
    # drained: the step in hand ran to its end after SIGTERM; or, claimed but not started yet, it was given back
    if status == "completed":
        assert finished_at > sigterm_at and attempt == 1, (finished_at, sigterm_at, attempt)
    else:
        assert status == "queued", status
    # the rest of the instance (and the slow step, if given back) runs on a new worker, started with the
    # example image's default command: worker --import orders
    containers.start("worker", images.orders)
    final = wait_finished(dsn, instance_id, containers)
    assert final.status == "completed", (final.error, [containers.logs(n) for n in containers.names])
    assert final.output == expected_output(order, instance_id)
    print(f"docker stop returned after {stopped_after:.1f} s; the slow step was {status} at exit")
