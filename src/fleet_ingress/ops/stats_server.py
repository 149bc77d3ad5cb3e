"""The read-only stats listener: `/stats`, `/stats.json`, `/metrics`.

Nothing here changes state: writes go through the admin Unix socket only,
and any method but GET/HEAD is answered 405.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleet_ingress.ops.stats_page import render_stats_page


def stats_app(
    snapshot: Callable[[], dict[str, Any]],
    prometheus: CollectorRegistry,
    *,
    refresh: Callable[[], Awaitable[object]] | None = None,
) -> web.Application:
    """`snapshot` is read at each request (the page and /stats.json), `prometheus` at
    each scrape: nothing is kept here between requests. `refresh` is awaited
    first (a supervisor asks its workers for their counts; bounded by it)."""

    async def fresh() -> None:
        if refresh is not None:
            await refresh()

    async def page(request: web.Request) -> web.Response:
        await fresh()
        return web.Response(text=render_stats_page(snapshot()), content_type="text/html")

    async def as_json(request: web.Request) -> web.Response:
        await fresh()
        return web.json_response(snapshot())

    async def metrics(request: web.Request) -> web.Response:
        await fresh()
        body = generate_latest(prometheus)
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
