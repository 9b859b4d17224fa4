"""Limits on what steps may do at once: named rate limits (requests and/or cost per interval, e.g. an
embedding API's 3,000 requests and 1,000,000 tokens per minute) and concurrency limits (at most N tasks at
once, optionally per key: a tenant, a model). They are enforced when workers claim tasks, in PostgreSQL
(sql/schema/22_limits.sql), so every worker on every host shares them and no other service is needed.

A step declares the limit it consumes (``limit=``), optionally a key (``limit_key="$input.tenant"``) and
its cost (``cost=``: a number, or a function of its element, summed over a batch). A task the limit cannot
admit now is not claimed and spends no attempt: it waits, parked, for its turn. A step that is told to
wait by the service it calls raises :class:`RateLimited` (an HTTP step does so on a 429 with Retry-After):
its task is parked until then, without spending an attempt, and the limit holds back its other tasks.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from .db.queries import Queries
from .errors import FlowDefinitionError, PgflowError
from .references import MissingValue, compile_text, value_of

Q = Queries("limits")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,62}$")
_KEY_SOURCES = ("input", "item")


class RateLimited(PgflowError):
    """Raise from a step when the service it calls says "not now": the task is parked for ``retry_after``
    seconds without spending an attempt, and the step's limit (if any) holds back its other tasks too."""

    def __init__(self, message: str = "rate limited", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, float(retry_after))


@dataclass(frozen=True)
class Limit:
    """A named limit. ``requests`` and ``cost`` are per ``per`` seconds; ``concurrency`` counts tasks
    running at once (per key when the step gives ``limit_key``). ``burst``: how many requests may start
    back to back before pacing applies (a window of ``per`` seconds then sees at most
    ``requests + burst - 1`` starts). The same limit may also be declared in SQL with
    ``pgflow.define_limit(name, requests, cost, per, concurrency, burst)``."""

    name: str
    requests: int | None = None
    cost: float | None = None
    per: float = 60.0
    concurrency: int | None = None
    burst: int = 1

    def __post_init__(self) -> None:
        where = f"limit {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise FlowDefinitionError(f"{where}: a limit name is 1-63 letters, digits, _ . : - (a letter first)")
        for field in ("requests", "concurrency"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise FlowDefinitionError(f"{where}: {field} must be a positive integer, not {value!r}")
        if self.cost is not None and (not isinstance(self.cost, int | float) or not 0 < self.cost < math.inf):
            raise FlowDefinitionError(f"{where}: cost must be a positive number, not {self.cost!r}")
        if not isinstance(self.per, int | float) or not 0 < self.per <= 86400:
            raise FlowDefinitionError(f"{where}: per must be a number of seconds in (0, 86400], not {self.per!r}")
        if not isinstance(self.burst, int) or self.burst < 1:
            raise FlowDefinitionError(f"{where}: burst must be an integer >= 1, not {self.burst!r}")
        if self.requests is None and self.cost is None and self.concurrency is None:
            raise FlowDefinitionError(f"{where}: give requests, cost or concurrency")

    def spec(self) -> dict[str, Any]:
        """The definition as stored with a flow's shape and in pgflow.limits."""
        return asdict(self)


def define_limit(conn: psycopg.Connection, limit: Limit) -> None:
    """Create or change a limit in the database (the coordinator does it for limits declared on steps)."""
    Q.execute(conn, "define_limit", limit.spec())


def check_limit_key(where: str, key: str | None, is_map: bool) -> str | None:
    """A limit key is one reference to the input or, in a map, to the element: ``$input.tenant``."""
    if key is None:
        return None
    template = compile_text(key) if isinstance(key, str) else None
    refs = template.references if template else ()
    sources = _KEY_SOURCES if is_map else ("input",)
    if len(refs) != 1 or "".join(template.parts) or refs[0].name not in sources or refs[0].rowset:
        raise FlowDefinitionError(f"{where}: limit_key must be one reference to {' or '.join('$' + s for s in sources)}"
                                  f" (like $input.tenant), not {key!r}")
    return key


def limit_key_value(key: str | None, scope: dict[str, Any]) -> str | None:
    """The key a task's limit is counted under (None: the limit as a whole). A missing value is a key too
    (the empty key), so a task without a tenant is limited with the others without one."""
    if key is None:
        return None
    ref = compile_text(key).references[0]
    try:
        value = value_of(ref, scope)
    except MissingValue:
        return ""
    return value if isinstance(value, str) else "" if value is None else str(value)


def task_headers(limit: dict[str, Any] | None, limit_key: str | None, priority: int,
                 scope: dict[str, Any]) -> dict[str, Any] | None:
    """The pgmq headers of a task's message: what read_tasks needs to order and admit it."""
    headers: dict[str, Any] = {}
    if priority:
        headers["priority"] = priority
    if limit is not None:
        headers["limit"] = limit["name"]
        key = limit_key_value(limit_key, scope)
        if key is not None:
            headers["limit_key"] = key
    return headers or None


def task_cost(cost: float | Callable[[Any], float] | None, element: Any, batched: bool) -> float | None:
    """A task's cost: the step's number, or its function of the element (summed over a batch's)."""
    if cost is None:
        return None
    if not callable(cost):
        return float(cost)
    if batched:
        return float(sum(cost(e) for e in element))
    return float(cost(element))


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """A Retry-After header's wait in seconds: a number of seconds or an HTTP date (RFC 9110)."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())
