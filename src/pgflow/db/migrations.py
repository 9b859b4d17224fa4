"""The pgflow schema in a database: which version is installed, installing pgmq and applying migrations
(``pgflow init``), and refusing to run against a schema this code cannot work with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files

import psycopg

from ..errors import PgflowError
from .connection import connect
from .queries import Queries, read_sql

Q = Queries("migrations")

MIGRATION_LOCK = 7_406_111  # advisory lock key: one first `pgflow init` at a time (later: a table lock)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
_COMPATIBLE_FROM = re.compile(r"^-- compatible-from: (\d+)\s*$", re.MULTILINE)
_SCHEMA_FILE = re.compile(r"^\d{2}_\w+\.sql$")

# sql/schema/ is the current schema, one file per concept: a fresh database is built from it. sql/migrations/
# holds the steps between releases (0001_baseline.sql is a frozen copy of schema/ at the squash): an existing
# database gets the ones it has not applied. tests/db/test_schema.py checks that both paths build the same
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
    if not Q.value(conn, "migrations_table_exists"):
        return SchemaState(0, 0)
    return SchemaState(*Q.one(conn, "schema_state", {"baseline": BASELINE.name,
                                                     "baseline_version": BASELINE.version}))


def schema_version(conn: psycopg.Connection) -> int:
    """The applied pgflow schema version (0 when pgflow was never initialised here)."""
    return schema_state(conn).version


def apply_migration(conn: psycopg.Connection, migration: Migration) -> None:
    """Run one migration and record it (inside the caller's transaction)."""
    conn.execute(migration.sql)
    record_migration(conn, migration)


def record_migration(conn: psycopg.Connection, migration: Migration) -> None:
    """Note a migration as applied, with the oldest code version that works once it is."""
    Q.execute(conn, "record_migration", {"version": migration.version, "name": migration.name,
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
    tests/db/test_schema.py), so its recorded history is theirs too. Returns the versions recorded."""
    for name in schema_files():
        conn.execute(read_sql(f"schema/{name}"))
    for migration in migrations():
        record_migration(conn, migration)
    return [m.version for m in migrations()]


def install_pgmq(conn: psycopg.Connection) -> bool:
    """Install pgmq from the SQL bundled in the pgmq wheel unless it is there already (extension or SQL)."""
    if Q.value(conn, "pgmq_installed"):
        return False
    from pgmq.install import get_embedded_install_sql

    conn.execute(get_embedded_install_sql())
    return True


#: compatibility layers ``pgflow init --compat NAME`` installs: NAME -> the schema it owns (sql/compat/NAME.sql)
COMPAT_LAYERS = {"pg_durable": "df"}


def install_compat(conn: psycopg.Connection, name: str, requested: bool) -> bool:
    """(Re)build a compatibility layer: when ``requested``, or when pgflow installed it before (so that an
    upgrade refreshes it). A schema of that name that pgflow did not create is never touched. Returns
    whether the layer was built."""
    exists, ours = Q.one(conn, "compat_schema", {"schema": COMPAT_LAYERS[name]})
    if exists and not ours:
        if requested:
            raise PgflowError(f"schema {COMPAT_LAYERS[name]} exists and is not pgflow's {name} compatibility "
                              f"layer (is the {name} extension installed in this database?): drop it first")
        return False
    if requested or ours:
        conn.execute(read_sql(f"compat/{name}.sql"))
        return True
    return False


def init_schema(dsn: str, queues: tuple[str, ...] | list[str] = (), compat: tuple[str, ...] | list[str] = ()
                ) -> list[int]:
    """Install pgmq and pgflow's schema (a fresh database: built from ``sql/schema/``; an existing one: its
    pending migrations) and create ``queues`` (those the deployment declares, so autoscalers and workers find
    them before any flow names them); idempotent. Compatibility layers named in ``compat`` are installed,
    those installed before are refreshed. Returns the versions applied now. With a lock_timeout (e.g.
    PGOPTIONS='-c lock_timeout=5s'), a lock held by an open transaction is one clear error, not a wait."""
    try:
        return _init_schema(dsn, queues, compat)
    except psycopg.errors.LockNotAvailable:
        raise PgflowError("pgflow init: a lock on pgflow's tables was not granted within lock_timeout (an open "
                          "transaction holds it, see pg_stat_activity); nothing was changed: try again") from None


def _init_schema(dsn: str, queues: tuple[str, ...] | list[str], compat: tuple[str, ...] | list[str]) -> list[int]:
    from ..queues import ensure_queue

    with connect(dsn) as conn, conn.transaction():
        if Q.value(conn, "migrations_table_exists"):
            Q.execute(conn, "lock_migrations_table")
        else:
            Q.execute(conn, "lock_migrations", {"key": MIGRATION_LOCK})
        install_pgmq(conn)
        Q.execute(conn, "create_migrations_table")
        state = schema_state(conn)
        if state.before_baseline:
            raise PgflowError(state.problem())
        applied = install_schema(conn) if state.version == 0 else apply_pending_migrations(conn, state.version)
        for name in COMPAT_LAYERS:
            install_compat(conn, name, name in compat)
        for name in queues:
            try:
                with conn.transaction():
                    ensure_queue(conn, name)
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
