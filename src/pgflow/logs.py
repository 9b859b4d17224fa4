"""Logging set-up for the command line, and the engine fields every log record carries.

Each record gets the attributes named in :data:`FIELDS` (None where they do not apply): those a call passes
with ``extra=``, else those of the task this thread is running (:class:`TaskFields`, set by the worker
around each task, so that lines logged by a step's own code carry them too). ``--log-format json`` renders
them as JSON fields, so an operator can filter one instance's or one queue's lines.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

FIELDS = ("instance_id", "flow", "step", "task_index", "attempt", "queue")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_task: ContextVar[tuple[Any, ...] | None] = ContextVar("pgflow_task_fields", default=None)
_NO_TASK = (None,) * len(FIELDS)


class TaskFields:
    """``with TaskFields(values):`` every record logged in the block (in this thread) gets these engine
    fields (``values`` in :data:`FIELDS` order). A class, not a generator: the worker enters one per task."""

    __slots__ = ("_token", "_values")

    def __init__(self, values: tuple[Any, ...]) -> None:
        self._values = values

    def __enter__(self) -> None:
        self._token = _task.set(self._values)

    def __exit__(self, *_: object) -> None:
        _task.reset(self._token)


class EngineFields(logging.Filter):
    """A handler filter that sets the engine fields a record does not have (from the task in hand), so a
    formatter can always name them. Add it to your own handlers to get them when embedding pgflow."""

    def filter(self, record: logging.LogRecord) -> bool:
        task = _task.get() or _NO_TASK
        for name, value in zip(FIELDS, task, strict=True):
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, pid, the engine
    fields, then any other ``extra`` (python-json-logger: escaping, exceptions as text)."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(" ".join(f"%({name})s" for name in ("levelname", "name", "message", "process", *FIELDS)),
                         rename_fields={"levelname": "level", "name": "logger", "process": "pid"}, timestamp=True)


def configure(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as human-readable text or as JSON lines (``fmt``)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(EngineFields())
    logging.basicConfig(level=level.upper(), handlers=[handler])
