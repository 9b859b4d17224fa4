"""Named SQL queries, loaded from ``sql/*.sql`` files (blocks headed ``-- name: <name>``)."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def read_sql(relative_path: str) -> str:
    """Return the text of a packaged ``.sql`` file, e.g. ``migrations/0001_initial.sql``."""
    return files("pgflow").joinpath("sql", relative_path).read_text(encoding="utf-8")


@cache
def _load(file: str) -> dict[str, str]:
    text = read_sql(file)
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str, file: str = "queries.sql") -> str:
    """The SQL text of the named query in ``sql/<file>``; a KeyError names the missing query."""
    try:
        return _load(file)[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/{file}") from None
