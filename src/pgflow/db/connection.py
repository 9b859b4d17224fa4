"""Finding the database and connecting to it: the DSN (argument, ``PGFLOW_DSN``, else the embedded server),
single connections with clear errors, and the connection pool behind :class:`pgflow.Client`."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .. import settings
from ..errors import DatabaseUnavailable
from . import codec

CONNECT_TIMEOUT = 10  # seconds
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@")  # up to the last "@" of the authority


def resolve_dsn(dsn: str | None = None, *, setup: bool = False) -> str:
    """The DSN to use: the argument, else ``PGFLOW_DSN``, else the embedded server's (started on demand).
    ``setup`` is for commands that prepare a server (init, demo, coordinator, worker): on the embedded
    server they let its superuser start instances; a call that only reads never changes a role."""
    dsn = dsn or settings.current().dsn
    if dsn:
        return dsn
    from .embedded import embedded_dsn

    return embedded_dsn(setup=setup)


def connect(dsn: str, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection:
    """Open a configured connection, turning "server unreachable" into a clear DatabaseUnavailable."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT, **kwargs)
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None
    return codec.configure(conn)


def unavailable(dsn: str, exc: Exception) -> DatabaseUnavailable:
    """The error for a server that cannot be reached, naming it without its password."""
    return DatabaseUnavailable(without_dsn(
        f"cannot connect to PostgreSQL ({describe_dsn(dsn)}): {str(exc)}".strip(), dsn))


@contextmanager
def transaction(dsn: str) -> Iterator[psycopg.Connection]:
    """A connection inside one transaction, committed on success and closed afterwards."""
    with connect(dsn) as conn, conn.transaction():
        yield conn


def close_quietly(*conns: psycopg.Connection | None) -> None:
    """Close connections that may already be broken (after a server restart): best effort."""
    for conn in conns:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def describe_dsn(dsn: str) -> str:
    """Where a DSN points (host, port, database, user), never its password, in any DSN syntax."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparseable DSN"
    shown = {k: params[k] for k in ("host", "port", "dbname", "user") if params.get(k)}
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "default connection parameters"


def without_dsn(text: str, dsn: str) -> str:
    """``text`` with the DSN and its password cut out (error messages may quote them)."""
    secrets = [dsn]
    with contextlib.suppress(psycopg.ProgrammingError):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            secrets += [str(password), quote(str(password), safe="")]
    userinfo = _URL_USERINFO.match(dsn)  # a URL whose password holds "@": libpq cuts it at the first one,
    if userinfo and ":" in userinfo[1]:  # and the rest shows up as part of the host name
        password = userinfo[1].partition(":")[2]
        secrets += [password, unquote(password), *(piece for piece in password.split("@") if piece)]
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def open_pool(dsn: str, *, min_size: int = 1, max_size: int = 4, timeout: float = CONNECT_TIMEOUT) -> Any:
    """An open psycopg-pool of autocommit connections (configured like :func:`connect`, each checked before
    it is lent, so one broken by a server restart is replaced instead of failing a call). A server that
    cannot be reached fails here, with the same clear DatabaseUnavailable as :func:`connect`."""
    from psycopg_pool import ConnectionPool, PoolTimeout

    pool = ConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False, configure=codec.configure,
                          check=ConnectionPool.check_connection, timeout=timeout, name="pgflow-client",
                          kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT})
    try:
        pool.open(wait=True, timeout=timeout)
    except PoolTimeout as exc:
        pool.close()
        connect(dsn).close()  # raises DatabaseUnavailable with the server's own reason
        raise unavailable(dsn, exc) from None
    return pool
