"""When the supervisor forgets a fleet gone from the set (ops.fleet_ops.ForgetLater):
`after` seconds after it left, unless it is listed again by then, and counted
from its last removal (a fleet removed, listed again and removed again was
forgotten by the first removal's timer: the review of session 25)."""

from __future__ import annotations

import asyncio

from fleet_ingress.ops.fleet_ops import ForgetLater


async def test_a_fleet_is_forgotten_after_the_wait_from_its_last_removal_unless_back() -> None:
    listed: set[str] = set()
    forgotten: list[str] = []
    later = ForgetLater(0.2, listed.__contains__, forgotten.append)
    later.gone("a")  # removed
    later.gone("b")
    await asyncio.sleep(0.05)
    listed.add("b")  # b listed again: it counts on
    listed.add("a")
    await asyncio.sleep(0.05)
    listed.discard("a")
    later.gone("a")  # a removed again, 0.1 s after its first removal
    await asyncio.sleep(0.15)  # 0.25 s after a's first removal, 0.15 after its second
    assert forgotten == [] and later.pending == {"a"}  # b listed again: due no more
    await asyncio.sleep(0.1)
    assert forgotten == ["a"]
    assert later.pending == set()  # what /metrics shows the calls ended of, besides the set
    await asyncio.sleep(0.2)
    assert forgotten == ["a"]  # once; b, listed, never
