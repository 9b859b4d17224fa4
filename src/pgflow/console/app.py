"""The console's application: one Starlette app per console process, holding a small connection pool (every
page and action runs as the role of the console's DSN, so row-level security decides what it sees and
what succeeds), the templates, the CSRF keys and the queue throughput sampler.

Starlette serves the pages (server-rendered with Jinja2, a little JavaScript of our own for live updates and
the graph drawing) and uvicorn runs it; both are small, well-kept and need nothing but the wheel: no CDN,
no build step, works offline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..db.connection import describe_dsn, open_pool
from ..db.queries import Queries
from .sampler import Sampler, Throughput
from .security import HEADERS, Csrf

Q = Queries("console")
PACKAGE = files("pgflow.console")


@dataclass
class Console:
    """Everything a request handler needs."""

    dsn: str
    read_only: bool
    templates: Jinja2Templates
    csrf: Csrf = field(default_factory=Csrf)
    throughput: Throughput = field(default_factory=Throughput)
    pool: Any = None

    @property
    def where(self) -> str:
        """The server and role, never a password."""
        return describe_dsn(self.dsn)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """An autocommit connection of the pool that plans every statement with its values (no prepared
        statements: see sql/queries/console.sql)."""
        with self.pool.connection() as conn:
            conn.prepare_threshold = None
            yield conn

    def sample_queues(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return Q.all_dicts(conn, "queue_stats")


class Headers(BaseHTTPMiddleware):
    """Security headers on every response, and the handler's own time as Server-Timing (what the load
    test reads: time spent serving, without the network)."""

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["server-timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def without_jit(dsn: str) -> str:
    """The DSN with JIT compilation off for the console's sessions: its statements are small, but the planner's
    row estimates for set-returning functions (pgflow.instance_nodes) pass jit_above_cost, and compiling took
    ~0.5 s per page on a server with JIT."""
    options = conninfo_to_dict(dsn).get("options") or ""
    return make_conninfo(dsn, options=f"{options} -c jit=off".strip())


def create_app(dsn: str, *, read_only: bool = False) -> Starlette:
    """The console for the database at ``dsn`` (pool and sampler start with the app and stop with it)."""
    from .routes import routes
    from .views import not_found, register_filters

    templates = Jinja2Templates(directory=str(PACKAGE.joinpath("templates")))
    register_filters(templates.env)
    console = Console(dsn, read_only, templates)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        console.pool = open_pool(without_jit(dsn), min_size=1, max_size=6)
        sampler = Sampler(console.sample_queues, console.throughput)
        sampler.start()
        try:
            yield
        finally:
            sampler.stop()
            console.pool.close()

    app = Starlette(routes=routes(StaticFiles(directory=str(PACKAGE.joinpath("static")))),
                    middleware=[Middleware(Headers)], lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found})
    app.state.console = console
    return app


def serve(dsn: str, *, host: str = "127.0.0.1", port: int = 8080, read_only: bool = False) -> None:
    """Run the console with uvicorn until interrupted (``pgflow console``); prints its address first (port
    0 picks a free one)."""

    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections made from now on wait for uvicorn to accept them
    bound_host, bound_port = sock.getsockname()[:2]
    app = create_app(dsn, read_only=read_only)
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    print(f"pgflow console on http://{bound_host}:{bound_port}/ as {describe_dsn(dsn)}"
          + (" (read-only)" if read_only else ""), flush=True)
    uvicorn.Server(config).run(sockets=[sock])
