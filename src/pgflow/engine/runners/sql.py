"""The runner of SQL steps: the statement runs in the acknowledgement transaction (exactly once), with its
``$references`` bound as parameters, as the role that started the instance."""

from __future__ import annotations

import base64
import decimal
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ...db.codec import dumps
from ...db.queries import Queries
from ...errors import FlowDefinitionError, NonRetryableError, NotSerializable, PayloadTooLarge
from ...references import SqlTemplate, compile_sql
from ...shape import StepShape
from ..task import ClaimedTask

Q = Queries("sql_runner")

PERMANENT_SQLSTATE_CLASSES = ("42", "22")  # syntax/undefined object, data exceptions: retrying won't help
JSONB_OID = 3802
Columns = list[list[str]]  # [[column name, SQL type], ...] of a result, in order
#: called inside the step's transaction with the output (JSON text) and its column types (JSON text or None)
Acknowledge = Callable[[str, str | None], None]


def _unique(names: list[str]) -> list[str]:
    """Column names made unique (a record's column list may not repeat one): "n", "n_2", ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _sql_value(value: Any) -> Any:
    """JSON form of column types orjson does not know (numeric, bytea). A numeric becomes a JSON string of
    its exact digits, scale included (a JSON number read back as a float would lose both)."""
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return str(value)


class SqlRunner:
    """Runs SQL steps on the worker's connection. The worker's session role runs its own instances'
    statements directly; another owner's run through that role's SECURITY DEFINER executor."""

    def __init__(self) -> None:
        self.templates: dict[str, SqlTemplate] = {}
        self.type_names: dict[int, str] = {}
        self.executors: set[str] = set()  # roles whose executor was checked
        self.session_role = ""

    def on_connect(self, conn: psycopg.Connection) -> None:
        self.session_role = Q.value(conn, "current_user")

    def run(self, conn: psycopg.Connection, task: ClaimedTask, step: StepShape, scope: dict[str, Any],
            columns: dict[str, Any], acknowledge: Acknowledge) -> None:
        """Run the step and ``acknowledge`` it in one transaction: its effect happens exactly once."""
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
        try:
            with conn.transaction():
                if run_as:
                    output, types = self._execute_as(conn, run_as, text, params, step.timeout)
                else:
                    output, types = self._execute(conn, text, params, step.timeout)
                acknowledge(dumps(output, f"output of step {step.name}", default=_sql_value),
                            dumps(types) if types else None)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            if exc.sqlstate and exc.sqlstate[:2] in PERMANENT_SQLSTATE_CLASSES:
                raise NonRetryableError(f"{type(exc).__name__}: {exc}".strip()) from exc
            raise
        except (PayloadTooLarge, NotSerializable) as exc:
            raise NonRetryableError(str(exc)) from exc

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
        names = _unique([name for name, _ in described])
        column_list = sql.SQL(", ").join(sql.Composed([sql.Identifier(n), sql.SQL(" " + t)])
                                         for n, (_, t) in zip(names, described, strict=True))
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(Q.composed("execute_as_rows", executor=executor, columns=column_list),
                        (text, params, timeout_ms))
            return cur.fetchall(), [[n, t] for n, (_, t) in zip(names, described, strict=True)]

    def _check_executor(self, conn: psycopg.Connection, role: str) -> None:
        """Refuse to run a step through an executor that does not exist or is not owned by its role."""
        if role in self.executors:
            return
        owners = {r[0] for r in Q.all(conn, "executor_owners", {"role": role})}
        if owners != {sql.Identifier(role).as_string(conn)} and owners != {role}:
            raise NonRetryableError(f"role {role!r} cannot run SQL steps: no executor owned by it "
                                    f"(run SELECT pgflow.grant_usage('{role}'))")
        self.executors.add(role)

    def _describe(self, conn: psycopg.Connection, text: str) -> list[tuple[str, str]]:
        """(name, SQL type) of the columns a statement would return, from a prepare that runs nothing."""
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
        return [(n, types[oid]) for n, oid in columns]

    def _type_names(self, conn: psycopg.Connection, oids: list[int]) -> dict[int, str]:
        unknown = [oid for oid in oids if oid not in self.type_names]
        if unknown:
            for oid, name in Q.all(conn, "type_names", {"oids": unknown}):
                self.type_names[oid] = name
        return self.type_names

    def _column_types(self, conn: psycopg.Connection, description: Any) -> Columns:
        """[column name, SQL type name] of a result, in order (jsonb keeps neither order nor types: this
        lets ``$name`` pick the first column and ``$name.*`` rebuild a typed relation)."""
        types = self._type_names(conn, [c.type_code for c in description])
        return [[c.name, types[c.type_code]] for c in description]
