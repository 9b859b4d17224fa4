"""What a step's owner may do, checked by the worker when the step runs (not only when its instance
started): the role still exists, is still granted pgflow usage, is not a superuser unless this database or
role allows it, holds the HTTP or Python right its step needs; and the secrets an administrator granted it.

Answers are kept for a second per owner (one query per owner per second, not per step): a revocation takes
effect for steps that start at most that long after it. HTTP steps read them afresh every time (a request
costs far more than the query, and a revoked HTTP right must stop the very next request).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..db.queries import Queries
from ..errors import NonRetryableError

Q = Queries("worker")


class StepRefused(NonRetryableError):
    """The step's owner may not run it now (never retried)."""


@dataclass(frozen=True)
class Rights:
    """One owner's rights as read from the database."""

    owner: str
    refusal: str | None  # why the owner may run no step at all now (None: it may)
    http: bool = False
    python: bool = False
    secrets: dict[str, str] = field(default_factory=dict)  # granted name -> env:/file: reference

    @classmethod
    def from_row(cls, owner: str, row: dict[str, Any]) -> Rights:
        refusal = None
        if not row["role_exists"]:
            refusal = f"role {owner!r} no longer exists"
        elif row["superuser"] and not row["superuser_allowed"]:
            refusal = (f"role {owner!r} is a superuser, and pgflow.allow_superuser is not on for the workers' "
                       "database or role")
        elif not row["granted"]:
            refusal = f"role {owner!r} is no longer granted pgflow usage (pgflow.grant_usage)"
        return cls(owner, refusal, bool(row["http"]), bool(row["python"]), dict(row["secrets"] or {}))

    def check(self, kind: str) -> None:
        """Raise StepRefused (one line) unless the owner may run a step of ``kind`` now."""
        if self.refusal:
            raise StepRefused(f"refused when the step ran: {self.refusal}")
        if kind == "http" and not self.http:
            raise StepRefused(f"refused when the step ran: role {self.owner!r} does not have EXECUTE privilege "
                              "for HTTP steps (grant_usage with include_http)")
        if kind == "python" and not self.python:
            raise StepRefused(f"refused when the step ran: role {self.owner!r} may not use Python steps")


class RightsCache:
    """Owners' rights, read at most once a second per owner."""

    TTL = 1.0

    def __init__(self) -> None:
        self._rights: dict[str, tuple[float, Rights]] = {}

    def get(self, conn: psycopg.Connection, owner: str, fresh: bool = False) -> Rights:
        now = time.monotonic()
        cached = self._rights.get(owner)
        if fresh or cached is None or now - cached[0] > self.TTL:
            row = Q.one(conn, "owner_rights", {"owner": owner}, row_factory=dict_row)
            cached = self._rights[owner] = (now, Rights.from_row(owner, row))
        return cached[1]
