"""The runner of SQL steps: the statement runs in the acknowledgement transaction (exactly once), with its
``$references`` bound as parameters, as the role that started the instance.

User statements run on a session of their own (one per worker process, kept open, never the one the worker
claims and reads with), and that session is reset after every step (settings, temporary objects, prepared
statements, cursors, advisory locks, LISTENs): nothing a step leaves behind reaches another user's step or
pgflow's own statements. Inside the step's transaction, the acknowledgement runs only after the search_path
is pinned to ``pg_catalog, pg_temp`` again, so a step's ``set_config('search_path', ...)`` cannot make the
worker call a user's function or type.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ...db.codec import dumps
from ...db.connection import close_quietly, connect
from ...db.queries import Queries
from ...errors import FlowDefinitionError, NonRetryableError, NotSerializable, PayloadTooLarge
from ...references import SqlTemplate, compile_sql
from ...shape import StepShape
from ..task import ClaimedTask

Q = Queries("sql_runner")

PERMANENT_SQLSTATE_CLASSES = ("42", "22")  # syntax/undefined object, data exceptions: retrying won't help
JSONB_OID = 3802
Columns = list[list[str]]  # [[column name, SQL type], ...] of a result, in order
#: called inside the step's transaction, on the step's connection, with the output (JSON text) and its
#: column types (JSON text or None)
Acknowledge = Callable[[psycopg.Connection, str, str | None], None]


class SqlStepError(Exception):
    """A SQL step's statement failed (retried per the step's policy): the database's message, one line."""


def one_line(exc: psycopg.Error) -> str:
    """What a user is told about a failed statement: the database's message and SQLSTATE, on one line,
    without the executor's internals (its CONTEXT lines, function names, column definition list)."""
    lines = str(exc).strip().splitlines()
    message = exc.diag.message_primary or (lines[0] if lines else type(exc).__name__)
    message = " ".join(message.split())
    return f"{message} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else message


def _wrapped(text: str, names: list[str], pseudo: list[bool]) -> str:
    """The statement as a CTE whose pseudo-typed columns (void, record: a function's result column list
    cannot hold them) are cast to text."""
    body = _TRAILING.sub("", text)
    columns = ", ".join(sql_ident(n) for n in names)
    select = ", ".join(f"{sql_ident(n)}::pg_catalog.text AS {sql_ident(n)}" if p else sql_ident(n)
                       for n, p in zip(names, pseudo, strict=True))
    return f"WITH pgflow_step ({columns}) AS (\n{body}\n) SELECT {select} FROM pgflow_step"


def sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_TRAILING = re.compile(r"[\s;]+$")


def _unique(names: list[str]) -> list[str]:
    """Column names made unique (a record's column list may not repeat one): "n", "n_2", ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _sql_value(value: Any) -> Any:
    """JSON form of column types orjson does not know. A numeric becomes a JSON string of its exact digits,
    scale included (a JSON number read back as a float would lose both). A bytea fails the step, as in
    pg_durable: base64 text would pass for a text column downstream; encode() says what it is."""
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, bytes | memoryview):
        raise TypeError("unsupported column type bytea: select encode(column, 'base64') (or 'hex') instead")
    return str(value)


class SqlRunner:
    """Runs SQL steps on a session of their own (see module docs). The worker's session role runs its own
    instances' statements directly; another owner's run through that role's SECURITY DEFINER executor."""

    def __init__(self, dsn: str = "", options: str = "") -> None:
        self.dsn = dsn
        self.options = options  # startup settings of the step session (what RESET ALL returns to)
        self.templates: dict[str, SqlTemplate] = {}
        self.type_names: dict[int, str] = {}
        self.pseudo_types: set[int] = set()
        self.executors: set[str] = set()  # roles whose executor was checked
        self.session_role = ""
        self._conn: psycopg.Connection | None = None

    def on_connect(self, conn: psycopg.Connection) -> None:
        self.session_role = Q.value(conn, "current_user")

    def session(self) -> psycopg.Connection:
        """The step session: opened once and kept (reset after each step, replaced only when broken).
        No statement is prepared on it by psycopg, so the reset's DEALLOCATE ALL takes nothing away."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            close_quietly(self._conn)
            self._conn = connect(self.dsn, autocommit=True, prepare_threshold=None, options=self.options)
        return self._conn

    def close(self) -> None:
        close_quietly(self._conn)
        self._conn = None

    def _reset(self, conn: psycopg.Connection) -> None:
        """Forget everything the step left in the session; a session that cannot be reset is closed."""
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            conn.execute(Q["reset_session"])
        except psycopg.Error:
            self.close()

    def run(self, conn: psycopg.Connection | None, task: ClaimedTask, step: StepShape, scope: dict[str, Any],
            columns: dict[str, Any], acknowledge: Acknowledge) -> None:
        """Run the step and ``acknowledge`` it in one transaction: its effect happens exactly once. ``conn``
        (the worker's) is not used for the statement: it runs on the step session."""
        template = self.template(step.sql)
        if "{sys_instance_id}" in step.sql:  # pg_durable's template (the others are filled in at start)
            template = compile_sql(step.sql.replace("{sys_instance_id}", f"{task.instance_id:08x}"))
        run_as = task.owner if task.owner != self.session_role else None
        try:
            if run_as:
                text, params = template.render_jsonb(scope, columns)
            else:
                text, params = template.render(scope, columns)
        except LookupError as exc:
            raise NonRetryableError(str(exc)) from exc
        session = self.session()
        try:
            with session.transaction():
                if run_as:
                    output, types = self._execute_as(session, run_as, text, params, step.timeout)
                else:
                    output, types = self._execute(session, text, params, step.timeout)
                Q.execute(session, "pin_search_path")
                acknowledge(session, dumps(output, f"output of step {step.name}", default=_sql_value),
                            dumps(types) if types else None)
        except psycopg.Error as exc:
            if session.broken or session.closed:
                self.close()
                raise SqlStepError(f"the step's database session was lost: {one_line(exc)}") from None
            if exc.sqlstate and exc.sqlstate[:2] in PERMANENT_SQLSTATE_CLASSES:
                raise NonRetryableError(f"{type(exc).__name__}: {one_line(exc)}") from None
            raise SqlStepError(f"{type(exc).__name__}: {one_line(exc)}") from None
        except (PayloadTooLarge, NotSerializable) as exc:
            raise NonRetryableError(str(exc)) from exc
        finally:
            self._reset(session)

    def template(self, text: str) -> SqlTemplate:
        template = self.templates.get(text)
        if template is None:
            try:
                template = self.templates[text] = compile_sql(text)
            except FlowDefinitionError as exc:  # SQL from the SQL front door, validated only approximately
                raise NonRetryableError(str(exc)) from exc
        return template

    def _execute(self, conn: psycopg.Connection, text: str, params: list[Any], timeout: float | None
                 ) -> tuple[Any, Columns | None]:
        """Run a statement on the worker's own connection (its role is the instance's owner)."""
        if timeout:
            Q.execute(conn, "local_statement_timeout", {"timeout": f"{int(timeout * 1000)}ms"})
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(text, params)
            if cur.description:
                return cur.fetchall(), self._column_types(conn, cur.description)
            return {"rowcount": cur.rowcount}, None

    def _execute_as(self, conn: psycopg.Connection, role: str, text: str, params: str, timeout: float | None
                    ) -> tuple[Any, Columns | None]:
        """Run a statement with exactly ``role``'s privileges, through its SECURITY DEFINER executor
        (created by pgflow.grant_usage; SET ROLE is impossible inside it). The result's columns are
        described first, without running it, to give the executor's record its column list."""
        self._check_executor(conn, role)
        described = self._describe(conn, text)
        timeout_ms = int(timeout * 1000) if timeout else None
        executor = ("pgflow_exec", role)
        if not described:
            count = conn.execute(Q.composed("execute_as_count", executor=executor),
                                 (text, params, timeout_ms)).fetchone()[0]
            return {"rowcount": count}, None
        names = _unique([name for name, _, _ in described])
        pseudo = [is_pseudo for _, _, is_pseudo in described]
        if any(pseudo):  # e.g. SELECT pg_sleep(1): a void column cannot be in the executor's column list
            text = _wrapped(text, names, pseudo)
        types = ["text" if is_pseudo else t for _, t, is_pseudo in described]
        column_list = sql.SQL(", ").join(sql.Composed([sql.Identifier(n), sql.SQL(" " + t)])
                                         for n, t in zip(names, types, strict=True))
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(Q.composed("execute_as_rows", executor=executor, columns=column_list),
                        (text, params, timeout_ms))
            return cur.fetchall(), [[n, t] for n, t in zip(names, types, strict=True)]

    def _check_executor(self, conn: psycopg.Connection, role: str) -> None:
        """Refuse to run a step through an executor that does not exist or is not owned by its role."""
        if role in self.executors:
            return
        owners = {r[0] for r in Q.all(conn, "executor_owners", {"role": role})}
        if owners != {sql.Identifier(role).as_string(conn)} and owners != {role}:
            raise NonRetryableError(f"role {role!r} cannot run SQL steps: no executor owned by it "
                                    f"(run SELECT pgflow.grant_usage('{role}'))")
        self.executors.add(role)

    def _describe(self, conn: psycopg.Connection, text: str) -> list[tuple[str, str, bool]]:
        """(name, SQL type, whether a pseudo-type) of the columns a statement would return, from a prepare
        that runs nothing."""
        pgconn = conn.pgconn
        name = b"pgflow_describe"
        result = pgconn.prepare(name, text.encode(), [JSONB_OID])
        try:
            if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
                raise psycopg.errors.lookup(result.error_field(psycopg.pq.DiagnosticField.SQLSTATE).decode())(
                    (result.error_message or b"").decode().strip())
            described = pgconn.describe_prepared(name)
            columns = [(described.fname(i).decode(), described.ftype(i)) for i in range(described.nfields)]
        finally:
            if result.status == psycopg.pq.ExecStatus.COMMAND_OK:
                pgconn.exec_(Q["deallocate_describe"].encode())
        types = self._type_names(conn, [oid for _, oid in columns])
        return [(n, types[oid], oid in self.pseudo_types) for n, oid in columns]

    def _type_names(self, conn: psycopg.Connection, oids: list[int]) -> dict[int, str]:
        unknown = [oid for oid in oids if oid not in self.type_names]
        if unknown:
            for oid, name, pseudo in Q.all(conn, "type_names", {"oids": unknown}):
                self.type_names[oid] = name
                if pseudo:
                    self.pseudo_types.add(oid)
        return self.type_names

    def _column_types(self, conn: psycopg.Connection, description: Any) -> Columns:
        """[column name, SQL type name] of a result, in order (jsonb keeps neither order nor types: this
        lets ``$name`` pick the first column and ``$name.*`` rebuild a typed relation)."""
        types = self._type_names(conn, [c.type_code for c in description])
        return [[c.name, types[c.type_code]] for c in description]
