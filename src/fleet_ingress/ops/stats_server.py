"""The read-only stats listener: `/stats`, `/stats.json`, `/metrics`.

Nothing here changes state: writes go through the admin Unix socket only,
and any method but GET/HEAD is answered 405.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleet_ingress.ops.stats_page import render_stats_page

T = TypeVar("T")


class SharedRender(Generic[T]):
    """One render of a view at a time, shared by the requests that come while it
    runs; the next starts no sooner than the last took after it ended. Rendering
    runs on the supervisor's loop, which also leases every new call its fleet
    slot: at 300 fleets `/metrics` takes 55-190 ms, and 50 scrapes a second
    (or scrapers that give up and ask again) kept the loop rendering, new calls
    waited up to 0.55 s for their slots (the control-plane audit of session 22).
    Now rendering takes at most about half of the loop. A request is answered
    from a render that began after it came, or that was under way when it came."""

    def __init__(
        self, render: Callable[[], T], prepare: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """`render` the work on the loop (timed: the pause after it is as long);
        `prepare` awaited first, not timed (waiting on workers' reports is not work)."""
        self._render = render
        self._prepare = prepare
        self._running: asyncio.Future[T] | None = None
        self._next_at = 0.0

    async def __call__(self) -> T:
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
            # Every request may have gone: its failure is then nobody's to read.
            self._running.add_done_callback(lambda done: done.cancelled() or done.exception())
        # A request that goes away leaves the render to the others.
        return await asyncio.shield(self._running)

    async def _run(self) -> T:
        loop = asyncio.get_running_loop()
        try:
            if (wait := self._next_at - loop.time()) > 0:
                await asyncio.sleep(wait)
            if self._prepare is not None:
                await self._prepare()
            started = loop.time()
            result = self._render()
            ended = loop.time()
            self._next_at = ended + (ended - started)
            return result
        finally:
            self._running = None


def stats_app(
    snapshot: Callable[[], dict[str, Any]],
    prometheus: CollectorRegistry,
    *,
    refresh: Callable[[], Awaitable[object]] | None = None,
) -> web.Application:
    """`snapshot` is read for each render (the page and /stats.json), `prometheus`
    likewise (`SharedRender`: requests at once share one): nothing is kept
    here between renders. `refresh` is awaited first (a supervisor asks its
    workers for their counts; bounded by it)."""

    async def fresh() -> None:
        if refresh is not None:
            await refresh()

    shared_page = SharedRender(lambda: render_stats_page(snapshot()), fresh)
    shared_json = SharedRender(lambda: json.dumps(snapshot()), fresh)
    shared_metrics = SharedRender(lambda: generate_latest(prometheus), fresh)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=await shared_page(), content_type="text/html")

    async def as_json(request: web.Request) -> web.Response:
        return web.json_response(text=await shared_json())

    async def metrics(request: web.Request) -> web.Response:
        body = await shared_metrics()
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
