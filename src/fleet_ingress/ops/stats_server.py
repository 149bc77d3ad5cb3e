"""The read-only stats listener: `/stats`, `/stats.json`, `/metrics`.

Nothing here changes state: writes go through the admin Unix socket only,
and any method but GET/HEAD is answered 405.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from fleet_ingress.ops.json_in_turns import dumps_in_turns
from fleet_ingress.ops.metrics import FamilyInPieces
from fleet_ingress.ops.stats_page import render_stats_page_in_turns

T = TypeVar("T")

# Sample lines formatted between two turns of the loop: about 1 ms of it.
SAMPLES_PER_TURN = 250
# Families that generate_latest writes as a header and one sample line each
# (counters have no `_created` here: metrics.py disables them).
_SPLITTABLE = frozenset({"counter", "gauge", "histogram"})


class _Families(Collector):
    """What generate_latest reads of a registry: these families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


async def generate_in_turns(registry: CollectorRegistry) -> bytes:
    """generate_latest(registry), byte for byte, with the loop let run after
    each family collected and each SAMPLES_PER_TURN sample lines written. At
    500 fleets and 2 workers the text is 1.2 MB and 16,600 lines, 90-130 ms of
    work: done in one piece it held the supervisor's loop, which leases every
    new call its slot, 105-190 ms a scrape, and leases waited up to 90-360 ms
    (the scale audit of session 32; session 33's figures). Each family's
    values are read in one piece, as before, but a `metrics.FamilyInPieces`'s
    (the probes' histogram), read a piece at a time; a family may be read a
    few turns after the one before it (`stats_app`'s `shown` comes after them all)."""
    parts: list[bytes] = []
    for family in registry.collect():
        if isinstance(family, FamilyInPieces):  # its samples not read whole
            parts.append(await _written_in_turns(family, family.pieces()))
        elif len(family.samples) <= SAMPLES_PER_TURN or family.type not in _SPLITTABLE:
            parts.append(generate_latest(_Families([family])))
        else:
            samples = family.samples
            slices = (
                samples[start : start + SAMPLES_PER_TURN]
                for start in range(0, len(samples), SAMPLES_PER_TURN)
            )
            parts.append(await _written_in_turns(family, slices))
        await asyncio.sleep(0)
    return b"".join(parts)


async def _written_in_turns(family: Metric, pieces: Iterable[list[Sample]]) -> bytes:
    """`family` written as generate_latest writes it whole, from its samples
    given a piece at a time (each piece made, then written, then the loop let
    run); with no piece, its header alone."""
    parts: list[bytes] = []
    for samples in pieces:
        piece = Metric(family.name, family.documentation, family.type, family.unit)
        piece.samples = samples
        text = generate_latest(_Families([piece]))
        # Past the first piece, the family's "# HELP" and "# TYPE" lines are written already.
        parts.append(text.split(b"\n", 2)[2] if parts else text)
        await asyncio.sleep(0)
    if not parts:  # no sample: the header alone
        parts.append(
            generate_latest(
                _Families([Metric(family.name, family.documentation, family.type, family.unit)])
            )
        )
    return b"".join(parts)


class SharedRender(Generic[T]):
    """One render of a view at a time, shared by the requests that come while it
    runs; the next starts no sooner than the last took after it ended. Rendering
    runs on the supervisor's loop, which also leases every new call its fleet
    slot: at 300 fleets `/metrics` takes 55-190 ms, and 50 scrapes a second
    (or scrapers that give up and ask again) kept the loop rendering, new calls
    waited up to 0.55 s for their slots (the control-plane audit of session 22).
    Now rendering takes at most about half of the loop (and `/metrics`, the
    largest, renders in turns: `generate_in_turns`). A request is answered
    from a render that began after it came, or that was under way when it came."""

    def __init__(
        self,
        render: Callable[[], T] | Callable[[], Awaitable[T]],
        prepare: Callable[[], Awaitable[object]] | None = None,
        shown: Callable[[], object] | Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """`render` the work on the loop (timed: the pause after it is as long),
        or a coroutine doing it in turns (`generate_in_turns`: timed from its
        start to its end, the other work the loop did meanwhile included);
        `prepare` awaited first, not timed (waiting on workers' reports is not work);
        `shown` called once a render has ended, before any request has its answer."""
        self._render = render
        self._prepare = prepare
        self._shown = shown
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
            if inspect.isawaitable(result):
                result = await result
            if self._shown is not None and inspect.isawaitable(shown := self._shown()):
                await shown
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
    shown: Callable[[], object] | Callable[[], Awaitable[object]] | None = None,
) -> web.Application:
    """`snapshot` is read for each render (the page and /stats.json), `prometheus`
    likewise (`SharedRender`: requests at once share one): nothing is kept
    here between renders. `refresh` is awaited first (a supervisor asks its
    workers for their counts; bounded by it). `shown` is called after each
    render, before it is answered: a supervisor writes its crash snapshot then,
    so that what a scrape shows is in it first (`/metrics`, rendered in turns,
    may show a count that came during the render)."""

    async def fresh() -> None:
        if refresh is not None:
            await refresh()

    # In turns: 500 fleets' rows were 3 ms of the loop in one piece.
    shared_page = SharedRender(lambda: render_stats_page_in_turns(snapshot()), fresh, shown)
    # In turns: 300 KB at 500 fleets, 3-5 ms of encoding in one piece.
    shared_json = SharedRender(lambda: dumps_in_turns(snapshot()), fresh, shown)
    shared_metrics = SharedRender(lambda: generate_in_turns(prometheus), fresh, shown)

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
