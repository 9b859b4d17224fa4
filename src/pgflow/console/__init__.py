"""``pgflow console``: a web application served by pgflow itself (Starlette + Jinja2 under uvicorn, static
files inside the wheel) to look at instances, flows, queues and dead letters and to act on them."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
