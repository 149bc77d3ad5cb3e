"""The read-only stats listener: `/stats`, `/stats.json`, `/metrics`.

Nothing here changes state: writes go through the admin Unix socket only,
and any method but GET/HEAD is answered 405.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleet_ingress.ops.stats_page import render_stats_page

if TYPE_CHECKING:
    from fleet_ingress.service.ingress import Ingress


def stats_app(ingress: Ingress) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=render_stats_page(ingress.snapshot()), content_type="text/html")

    async def as_json(request: web.Request) -> web.Response:
        return web.json_response(ingress.snapshot())

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(ingress.metrics.prometheus)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPFound("/stats")

    async def read_only(request: web.Request) -> web.Response:
        raise web.HTTPMethodNotAllowed(
            request.method,
            ["GET", "HEAD"],
            text="read-only: use the admin socket to make changes\n",
        )

    app = web.Application()
    for path, handler in (
        ("/", root),
        ("/stats", page),
        ("/stats.json", as_json),
        ("/metrics", metrics),
    ):
        app.router.add_get(path, handler)
        app.router.add_route("*", path, read_only)
    return app
