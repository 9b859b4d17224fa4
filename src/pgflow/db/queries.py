"""The one module that runs SQL by name: every statement pgflow's Python code sends is a ``-- name: x`` block
of ``sql/queries/<module>.sql`` (one file per module that runs them) or a call of a SQL function there.

Statements run with psycopg placeholders (``%(name)s``); every value is a bound parameter. The few statements
that need an identifier (a queue's table, a role's executor) name it ``{placeholder}``: :meth:`Queries.composed`
fills it in, quoted by psycopg.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def read_sql(relative_path: str) -> str:
    """The text of a packaged ``.sql`` file, e.g. ``migrations/0001_initial.sql``."""
    return files("pgflow").joinpath("sql", relative_path).read_text(encoding="utf-8")


@cache
def named_blocks(file: str) -> dict[str, str]:
    """The named queries of ``sql/queries/<file>.sql``: {name: statement}."""
    parts = _HEADER.split(read_sql(f"queries/{file}.sql"))
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query_files() -> list[str]:
    """Every query file (without ``.sql``)."""
    return sorted(e.name.removesuffix(".sql") for e in files("pgflow").joinpath("sql", "queries").iterdir()
                  if e.name.endswith(".sql"))


class Queries:
    """The queries of one module, run by name: ``Q = Queries("worker"); Q.all(conn, "read_tasks", {...})``."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._texts = named_blocks(file)

    def __getitem__(self, name: str) -> str:
        try:
            return self._texts[name]
        except KeyError:
            raise KeyError(f"no query named {name!r} in sql/queries/{self.file}.sql") from None

    def execute(self, conn: psycopg.Connection, name: str, params: Any = None, *,
                row_factory: Any = None) -> psycopg.Cursor:
        """Run the named statement; its cursor (rows as tuples, or made by ``row_factory``)."""
        if row_factory is None:
            return conn.execute(self[name], params)
        return conn.cursor(row_factory=row_factory).execute(self[name], params)

    def all(self, conn: psycopg.Connection, name: str, params: Any = None, *, row_factory: Any = None) -> list:
        return self.execute(conn, name, params, row_factory=row_factory).fetchall()

    def all_dicts(self, conn: psycopg.Connection, name: str, params: Any = None) -> list[dict[str, Any]]:
        """Every row, as a dict keyed by column name."""
        return self.all(conn, name, params, row_factory=dict_row)

    def one(self, conn: psycopg.Connection, name: str, params: Any = None, *, row_factory: Any = None) -> Any:
        """The first row, or None."""
        return self.execute(conn, name, params, row_factory=row_factory).fetchone()

    def value(self, conn: psycopg.Connection, name: str, params: Any = None) -> Any:
        """The first column of the first row (None without rows)."""
        row = self.execute(conn, name, params).fetchone()
        return None if row is None else row[0]

    def composed(self, name: str, **identifiers: Any) -> sql.Composed:
        """The named statement with its ``{placeholders}`` filled: strings and tuples become quoted
        identifiers, psycopg ``sql`` objects are used as they are."""
        def quote(value: Any) -> Any:
            if isinstance(value, sql.Composable):
                return value
            return sql.Identifier(*value) if isinstance(value, tuple) else sql.Identifier(value)

        return sql.SQL(self[name]).format(**{k: quote(v) for k, v in identifiers.items()})
