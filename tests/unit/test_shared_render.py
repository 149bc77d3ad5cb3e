"""`ops.stats_server.SharedRender`: the stats views rendered once for the
requests that come at once, and at most about half of the loop's time."""

from __future__ import annotations

import asyncio

import pytest

from fleet_ingress.ops.stats_server import SharedRender


class _Render:
    def __init__(self, takes: float = 0.05) -> None:
        self.takes, self.count = takes, 0
        self.fail: Exception | None = None

    async def __call__(self) -> int:
        self.count += 1
        await asyncio.sleep(self.takes)
        if self.fail is not None:
            raise self.fail
        return self.count


async def test_requests_at_once_share_one_render_and_one_that_leaves_does_not_stop_it():
    render = _Render()
    shared = SharedRender(render)
    callers = [asyncio.create_task(shared()) for _ in range(5)]
    await asyncio.sleep(0.01)
    callers[0].cancel()  # a scraper that gave up
    assert await asyncio.gather(*callers[1:]) == [1, 1, 1, 1]
    assert render.count == 1


async def test_the_next_render_waits_as_long_as_the_last_took_and_is_fresh():
    loop = asyncio.get_running_loop()
    render = _Render(takes=0.2)
    shared = SharedRender(render)
    assert await shared() == 1
    began = loop.time()
    assert await shared() == 2  # rendered again, after it came
    assert loop.time() - began >= 0.35  # 0.2 s of pause, then 0.2 s of render


async def test_a_failed_render_fails_its_requests_and_the_next_renders_again():
    render = _Render(takes=0.01)
    render.fail = RuntimeError("collector broke")
    shared = SharedRender(render)
    callers = [asyncio.create_task(shared()) for _ in range(2)]
    for caller in callers:
        with pytest.raises(RuntimeError, match="collector broke"):
            await caller
    render.fail = None
    assert await shared() == 2
