"""When the supervisor forgets a fleet gone from the set (ops.fleet_ops.ForgetLater):
`after` seconds after it left, unless it is listed again by then, and counted
from its last removal (a fleet removed, listed again and removed again was
forgotten by the first removal's timer: the review of session 25)."""

from __future__ import annotations

import asyncio

from fleet_ingress.ops.fleet_ops import ForgetLater


async def test_a_fleet_is_forgotten_after_the_wait_from_its_last_removal_unless_back() -> None:
    """Each verdict is read where the event happens (the loop's clock when a
    fleet is forgotten, what is pending when a wait runs out), not after a fixed
    sleep: with 50 ms margins a busy host once woke the test after a's wait
    had run out (the flake of session 42). Timers run in the order they are
    due however late the loop wakes, so the order below holds on any host."""
    loop = asyncio.get_running_loop()
    listed: set[str] = set()
    forgotten: list[tuple[str, float]] = []
    pending_when_checked: dict[str, frozenset[str]] = {}
    done = asyncio.Event()

    def is_listed(name: str) -> bool:
        pending_when_checked[name] = later.pending
        return name in listed

    def forget(name: str) -> None:
        forgotten.append((name, loop.time()))
        done.set()

    later = ForgetLater(0.2, is_listed, forget)
    later.gone("b", 0.1)  # removed, then listed again before its wait runs out
    listed.add("b")
    first = loop.time()
    later.gone("a", 0.05)  # removed: due first of all (the earlier wait)
    listed.add("a")  # listed again
    listed.discard("a")
    last = loop.time()
    later.gone("a")  # removed again: forgotten 0.2 s from here, not from the first
    assert later.pending == {"a", "b"}
    async with asyncio.timeout(5):
        await done.wait()
    # Once, from its last removal: the first removal's wait (due at first +
    # 0.05) forgot it before. uvloop's clock counts whole milliseconds.
    assert [name for name, _ in forgotten] == ["a"], (forgotten, first)
    assert forgotten[0][1] >= last + 0.2 - 0.002, (forgotten, last)
    # b listed again: its wait ran out (before a's) and it stayed.
    assert pending_when_checked["b"] == {"a"}
    assert later.pending == set()  # what /metrics shows the calls ended of, besides the set
    await asyncio.sleep(0.05)
    assert [name for name, _ in forgotten] == ["a"]


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
    loop = asyncio.get_running_loop()
    forgotten: list[str] = []
    forgotten_at: list[float] = []

    def forget(name: str) -> None:
        forgotten.append(name)
        forgotten_at.append(loop.time())

    new = ForgetLater(1.0, lambda name: False, forget)
    # Junk or a wait past `after` (another release's): none, or `after` at most.
    new.take({**carried, "b": 99.0, "c": "soon", 7: 1.0, "d": float("nan")})
    assert new.pending == {"a", "b"}  # shown while taken up, not started yet
    assert new.to_json() == {"a": carried["a"], "b": 1.0}
    started = loop.time()  # before: each wait is armed at or after it
    new.start()
    await asyncio.sleep(carried["a"] + 0.2)  # b's wait: 1 s from `start`
    assert forgotten == ["a"] and new.pending == {"b"}
    async with asyncio.timeout(5):  # b forgotten: waited for, not slept past
        while new.pending:
            await asyncio.sleep(0.02)
    assert forgotten == ["a", "b"]
    # Each from `start`, with what it had left (uvloop's clock: whole milliseconds).
    assert forgotten_at[0] >= started + carried["a"] - 0.002, (forgotten_at, started)
    assert forgotten_at[1] >= started + 1.0 - 0.002, (forgotten_at, started)
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
    # b's half second, not `after`; 0.25 s below it for a host that stalls this
    # process between start and to_json.
    assert left["a"] == 0.0 and 0.25 <= left["b"] <= 0.5
