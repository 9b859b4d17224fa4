"""The one ``$reference`` grammar: references to earlier results inside SQL steps (turned into bound
parameters) and inside HTTP requests (URLs, headers, bodies).

A SQL step may say ``$input``, ``$input.key``, ``$load`` (another step's output), ``$load.col`` (a column of
its first row), ``$item`` (a map task's element) and ``$name?`` (NULL instead of an error when there is no
row or no such key). References are found by a small lexer that skips string literals, quoted identifiers,
comments and dollar-quoted bodies, and every reference becomes a ``%s`` placeholder: values travel as data,
never as SQL text, so a value like ``'; DROP TABLE x; --`` is just a string.

HTTP text is not SQL: there every ``$name.path?`` is a reference and any other ``$`` is literal text. Both
lexers read a reference with :func:`read_reference`, so the two front doors share one grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from psycopg.types.json import Jsonb

from .errors import FlowDefinitionError

_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_REFERENCE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)(\.\*)?(\?)?")
"""``$name``, then ``.key`` any number of times, then ``.*`` (a row set), then ``?`` (NULL when absent)."""
_IDENTIFIER = re.compile(r"[^\W\d][\w$]*")
_LINE_END = re.compile(r"[\r\n]")
_POSITIONAL = re.compile(r"\$\d+")


@dataclass(frozen=True)
class Reference:
    """One ``$name.path?`` occurrence in a SQL step."""

    name: str
    path: tuple[str, ...] = ()
    nullable: bool = False
    rowset: bool = False  # $name.* : the named result's rows as a relation

    def __str__(self) -> str:
        return "$" + ".".join((self.name, *self.path)) + (".*" if self.rowset else "") + ("?" if self.nullable else "")


_SQL_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .,()\[\]\"]*$")
_PYTHON_TYPES = ((bool, "boolean"), (int, "bigint"), (float, "double precision"), (str, "text"))


@dataclass(frozen=True)
class SqlTemplate:
    """A SQL step's text split around its references; :meth:`render` puts placeholders back in."""

    source: str
    parts: tuple[str, ...]  # len(references) + 1 pieces of the SQL text around the references
    references: tuple[Reference, ...]

    @property
    def names(self) -> set[str]:
        return {ref.name for ref in self.references}

    @property
    def text(self) -> str:
        """The statement for psycopg: a ``%s`` per reference, literal ``%`` doubled (psycopg reads ``%``
        everywhere, even inside string literals)."""
        return "%s".join(_escape_percent(p) for p in self.parts)

    def render(self, scope: dict[str, Any], columns: dict[str, list[list[str]]] | None = None
               ) -> tuple[str, list[Any]]:
        """The statement and its bound values for one execution. ``scope`` maps names to values (input,
        vars, item, step outputs); ``columns`` gives the [name, SQL type] columns, in order, of the
        results that came from SQL steps: ``$name`` of such a result is its first column of its first row,
        and ``$name.*`` rebuilds a typed relation (for other lists of objects, types are inferred)."""
        pieces = [_escape_percent(self.parts[0])]
        params = []
        for ref, after in zip(self.references, self.parts[1:], strict=True):
            value = self._value(ref, scope, columns)
            if ref.rowset:
                pieces.append(_rowset_sql(ref, value, (columns or {}).get(ref.name), "%s::jsonb"))
                params.append(Jsonb(value, dumps=_orjson_dumps))
            else:
                pieces.append("%s")
                params.append(adapt(value))
            pieces.append(_escape_percent(after))
        return "".join(pieces), params

    def render_jsonb(self, scope: dict[str, Any], columns: dict[str, list[list[str]]] | None = None
                     ) -> tuple[str, str]:
        """The statement and its values for an executor that takes one jsonb array parameter (``$1``):
        each reference becomes a typed extraction such as ``(($1->>0)::bigint)``. Used to run a step as
        another role; values still travel as data. Strings arrive as text (cast them where a column of
        another type is compared)."""
        pieces = [self.parts[0]]
        values = []
        for index, (ref, after) in enumerate(zip(self.references, self.parts[1:], strict=True)):
            value = self._value(ref, scope, columns)
            values.append(value)
            if ref.rowset:
                pieces.append(_rowset_sql(ref, value, (columns or {}).get(ref.name), f"($1->{index})"))
            else:
                pieces.append(_typed_extraction(value, index))
            pieces.append(after)
        return "".join(pieces), _orjson_dumps(values)

    @staticmethod
    def _value(ref: Reference, scope: dict[str, Any], columns: dict[str, list[list[str]]] | None) -> Any:
        value = resolve(ref, scope)
        if not ref.rowset and not ref.path and columns and columns.get(ref.name):
            column, sql_type = columns[ref.name][0][:2]
            value = _first_cell(ref, value, column)  # $name of a SQL result: first cell
            if sql_type.startswith("numeric") and isinstance(value, str):
                value = Decimal(value)  # exact, as it was stored (numerics are kept as JSON strings)
        return value


def _first_cell(ref: Reference, rows: Any, column: str) -> Any:
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        return rows[0].get(column)
    if ref.nullable:
        return None
    raise MissingValue(f"{ref}: {ref.name} returned no rows (write {ref}? to get NULL)")


def _escape_percent(text: str) -> str:
    return text.replace("%", "%%")


def _typed_extraction(value: Any, index: int) -> str:
    """The SQL that reads element ``index`` of the ``$1`` jsonb array with the type psycopg would bind."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return f"(($1->>{index})::boolean)"
    if isinstance(value, int):
        return f"(($1->>{index})::bigint)"
    if isinstance(value, float):
        return f"(($1->>{index})::float8)"
    if isinstance(value, Decimal):
        return f"(($1->>{index})::numeric)"
    if isinstance(value, str):
        return f"($1->>{index})"
    return f"($1->{index})"


def _rowset_sql(ref: Reference, rows: Any, types: list[list[str]] | None, source: str) -> str:
    """``jsonb_to_recordset(%s) AS "name"(col type, ...)``: the rows as a relation in a FROM clause,
    named after the result."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise MissingValue(f"{ref}: {ref.name} is not a list of rows")
    if not types:
        if not rows:
            raise MissingValue(f"{ref}: {ref.name} has no rows and no known columns")
        types = [[col, next((t for py, t in _PYTHON_TYPES if type(v) is py), "jsonb")] for col, v in rows[0].items()]
    columns = []
    for col, sql_type in types:
        if not _SQL_TYPE.match(sql_type):
            raise MissingValue(f"{ref}: unsupported column type {sql_type!r}")
        columns.append('"' + col.replace('"', '""') + '" ' + sql_type)
    return f'jsonb_to_recordset({source}) AS "{ref.name}"({", ".join(columns)})'


def _end_of_quoted(text: str, start: int, quote: str, backslash_escapes: bool) -> int:
    """Index just past the closing quote of a literal that opens at ``start``."""
    i = start + 1
    while i < len(text):
        ch = text[i]
        if backslash_escapes and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < len(text) and text[i + 1] == quote:  # doubled quote is an escaped quote
                i += 2
                continue
            return i + 1
        i += 1
    raise FlowDefinitionError(f"unterminated {quote} literal in SQL: {text[start:start + 40]!r}")


def _end_of_block_comment(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text) - 1:
        pair = text[i : i + 2]
        if pair == "/*":
            depth, i = depth + 1, i + 2
        elif pair == "*/":
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    raise FlowDefinitionError("unterminated /* comment in SQL")


def read_reference(text: str, at: int) -> tuple[Reference, int] | None:
    """The reference that starts at ``text[at]`` (a ``$``) and the index just past it, or None."""
    match = _REFERENCE.match(text, at)
    if match is None:
        return None
    path = tuple(p for p in match.group(2).split(".") if p)
    if match.group(3) and path:
        raise FlowDefinitionError(f"row-set reference {match.group(0)}: use $name.* on a whole result")
    return Reference(match.group(1), path, bool(match.group(4)), bool(match.group(3))), match.end()


def compile_sql(source: str) -> SqlTemplate:
    """Find the ``$references`` in a SQL step and replace them by placeholders (see module docs)."""
    out: list[str] = []
    parts: list[str] = []
    refs: list[Reference] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch == "'":
            e_string = i > 0 and source[i - 1] in "eE" and (i < 2 or not (source[i - 2].isalnum() or
                                                                        source[i - 2] == "_"))
            end = _end_of_quoted(source, i, "'", e_string)
        elif ch == '"':
            end = _end_of_quoted(source, i, '"', False)
        elif source.startswith("--", i):
            end = _LINE_END.search(source, i)
            end = n if end is None else end.start()
        elif ch.isalpha() or ch == "_":  # an identifier, which may hold "$" after its first letter (foo$bar)
            end = _IDENTIFIER.match(source, i).end()
        elif source.startswith("/*", i):
            end = _end_of_block_comment(source, i)
        elif ch == "$":
            quote = _DOLLAR_QUOTE.match(source, i)
            if quote:
                close = source.find(quote.group(0), quote.end())
                if close < 0:
                    raise FlowDefinitionError(f"unterminated dollar-quoted string {quote.group(0)} in SQL")
                end = close + len(quote.group(0))
            elif _POSITIONAL.match(source, i):
                raise FlowDefinitionError(
                    f"positional parameter {_POSITIONAL.match(source, i).group(0)} in SQL: "
                    "refer to values by name ($input, $input.key, $step, $step.col, $item)"
                )
            elif found := read_reference(source, i):
                refs.append(found[0])
                parts.append("".join(out))
                out = []
                i = found[1]
                continue
            else:
                raise FlowDefinitionError(f"stray '$' in SQL at {source[i:i + 20]!r}")
            out.append(source[i:end])
            i = end
            continue
        else:
            out.append(ch)
            i += 1
            continue
        out.append(source[i:end])
        i = end
    parts.append("".join(out))
    return SqlTemplate(source, tuple(parts), tuple(refs))


class MissingValue(LookupError):
    """A reference has nothing to point at (no such name, no rows, no such key) and is not ``?``."""


def resolve(ref: Reference, scope: dict[str, Any]) -> Any:
    """The value a reference points at; SQL results (lists of rows) yield their first row for ``.col``."""
    if ref.name not in scope:
        if ref.nullable:
            return None
        raise MissingValue(f"{ref}: no value named {ref.name!r} (known: {', '.join(sorted(scope))})")
    value = scope[ref.name]
    for key in ref.path:
        if isinstance(value, list):
            if not value:
                if ref.nullable:
                    return None
                raise MissingValue(f"{ref}: {ref.name} returned no rows (write {ref}? to get NULL)")
            value = value[0]
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif ref.nullable:
            return None
        else:
            raise MissingValue(f"{ref}: no key {key!r} in {type(value).__name__} value")
    return value


def _orjson_dumps(value: Any) -> str:
    return orjson.dumps(value, default=_exact_decimal).decode()


def _exact_decimal(value: Any) -> str:
    """A Decimal as the JSON string of its exact digits (orjson knows no Decimal)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def adapt(value: Any) -> Any:
    """Objects and arrays travel as jsonb; scalars as their natural PostgreSQL types."""
    if isinstance(value, dict | list):
        return Jsonb(value, dumps=_orjson_dumps)
    return value


@dataclass(frozen=True)
class TextTemplate:
    """Text with references that is not SQL (an HTTP URL, header or body string)."""

    parts: tuple[str, ...]  # len(references) + 1 pieces of text around the references
    references: tuple[Reference, ...]

    @property
    def whole(self) -> Reference | None:
        """The reference when the text is exactly one reference (its value replaces the text as it is)."""
        return self.references[0] if self.parts == ("", "") else None

    def substitute(self, scope: dict[str, Any], as_text: Any) -> str:
        """The text with each reference replaced by ``as_text(value)``."""
        pieces = [self.parts[0]]
        for ref, after in zip(self.references, self.parts[1:], strict=True):
            pieces += [as_text(value_of(ref, scope)), after]
        return "".join(pieces)


def compile_text(source: str) -> TextTemplate:
    """Find the references in plain text: every ``$`` that starts a reference is one; others stay text."""
    parts: list[str] = []
    refs: list[Reference] = []
    start = i = 0
    while (i := source.find("$", i)) >= 0:
        found = read_reference(source, i)
        if found is None:
            i += 1
            continue
        parts.append(source[start:i])
        refs.append(found[0])
        start = i = found[1]
    parts.append(source[start:])
    return TextTemplate(tuple(parts), tuple(refs))


def value_of(ref: Reference, scope: dict[str, Any]) -> Any:
    """A reference's value outside SQL, where a row set has no meaning."""
    if ref.rowset:
        raise MissingValue(f"{ref}: a row set ($name.*) can only be used in a SQL step")
    return resolve(ref, scope)
