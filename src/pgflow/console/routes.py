"""The console's URLs: pages are GETs, actions POSTs (each through :func:`views.act`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import views


def routes(static: StaticFiles) -> list:
    def action(path: str, make) -> Route:
        async def endpoint(request: Request) -> Response:
            return await views.act(request, make)

        return Route(path, endpoint, methods=["POST"])

    return [
        Route("/", views.instances),
        Route("/instances/{id:int}", views.instance),
        Route("/flows", views.flows),
        Route("/flows/{name}/{version}", views.flow),
        Route("/queues", views.queues),
        Route("/dead-letters", views.dead_letters),
        action("/instances/{id:int}/cancel", views.cancel_action),
        action("/instances/{id:int}/retry", views.retry_action),
        action("/instances/{id:int}/signal", views.signal_action),
        action("/start", views.start_action),
        action("/dead-letters/{id:int}/requeue", views.dead_letter_action("requeue")),
        action("/dead-letters/{id:int}/discard", views.dead_letter_action("discard")),
        Mount("/static", static, name="static"),
    ]
