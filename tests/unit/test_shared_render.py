"""`ops.stats_server.SharedRender`: the stats views rendered once for the
requests that come at once, and at most about half of the loop's time."""

from __future__ import annotations

import asyncio
import time

import pytest

from fleet_ingress.ops.stats_server import SharedRender


class _Render:
    """A render that takes `takes` seconds of the loop, after `waits` seconds of
    waiting (the workers' reports), which is not counted in the pause."""

    def __init__(self, takes: float = 0.0, waits: float = 0.05) -> None:
        self.takes, self.waits, self.count = takes, waits, 0
        self.fail: Exception | None = None

    async def prepare(self) -> None:
        await asyncio.sleep(self.waits)

    def __call__(self) -> int:
        self.count += 1
        time.sleep(self.takes)
        if self.fail is not None:
            raise self.fail
        return self.count


async def test_requests_at_once_share_one_render_and_one_that_leaves_does_not_stop_it():
    render = _Render()
    shared = SharedRender(render, render.prepare)
    callers = [asyncio.create_task(shared()) for _ in range(5)]
    await asyncio.sleep(0.01)
    callers[0].cancel()  # a scraper that gave up
    assert await asyncio.gather(*callers[1:]) == [1, 1, 1, 1]
    assert render.count == 1


async def test_the_next_render_waits_as_long_as_the_last_took_and_is_fresh():
    loop = asyncio.get_running_loop()
    render = _Render(takes=0.2, waits=0.3)
    shared = SharedRender(render, render.prepare)
    assert await shared() == 1
    began = loop.time()
    assert await shared() == 2  # rendered again, after it came
    # 0.2 s of pause (the render's work, not its 0.3 s wait), 0.3 s of wait, 0.2 s of work
    assert 0.65 <= loop.time() - began


async def test_a_failed_render_fails_its_requests_and_the_next_renders_again():
    render = _Render(waits=0.01)
    render.fail = RuntimeError("collector broke")
    shared = SharedRender(render, render.prepare)
    callers = [asyncio.create_task(shared()) for _ in range(2)]
    for caller in callers:
        with pytest.raises(RuntimeError, match="collector broke"):
            await caller
    render.fail = None
    assert await shared() == 2
