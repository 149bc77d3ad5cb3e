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


async def test_the_waits_go_over_to_the_next_image_where_they_were() -> None:
    """An upgrade's exec (or a crash) carries each wait's seconds left: the next
    image takes them up before its loop runs and starts them at `start`. Not
    carried, a fleet removed shortly before an upgrade was never forgotten (the
    accounting audit of session 31)."""
    old_forgotten: list[str] = []
    # Margins of half a second, not 50 ms: on a busy 2-core host a wake-up 0.1 s
    # late ran b's wait out too before the check (the review of session 31).
    old = ForgetLater(1.0, lambda name: False, old_forgotten.append)
    old.gone("a")
    await asyncio.sleep(0.7)
    carried = old.to_json()
    assert set(carried) == {"a"} and 0 <= carried["a"] <= 0.3
    forgotten: list[str] = []
    new = ForgetLater(1.0, lambda name: False, forgotten.append)
    # Junk or a wait past `after` (another release's): none, or `after` at most.
    new.take({**carried, "b": 99.0, "c": "soon", 7: 1.0, "d": float("nan")})
    assert new.pending == {"a", "b"}  # shown while taken up, not started yet
    assert new.to_json() == {"a": carried["a"], "b": 1.0}
    new.start()
    await asyncio.sleep(carried["a"] + 0.2)  # b's wait: 1 s from `start`
    assert forgotten == ["a"] and new.pending == {"b"}
    await asyncio.sleep(1.0)
    assert forgotten == ["a", "b"] and new.pending == set()
    new.take(None)  # a release that carried none
    assert new.pending == set()


def test_a_wait_carried_over_at_nothing_left_says_so_on_uvloop() -> None:
    """A wait taken up with 0 s left (an upgrade's exec at its end) is armed on
    uvloop as a plain Handle, which has no when(): the next image's to_json
    (its snapshot, a second upgrade) raised AttributeError until it ran (the
    review of session 33)."""
    import uvloop

    async def scenario() -> dict[str, float]:
        later = ForgetLater(1.0, lambda name: False, lambda name: None)
        later.take({"a": 0.0, "b": 0.5})
        later.start()
        return later.to_json()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        left = runner.run(scenario())
    assert left["a"] == 0.0 and 0.4 <= left["b"] <= 0.5
