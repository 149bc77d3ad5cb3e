"""The ticks a process's clock work shares (`net.event_loop.sleep_to_tick`): the
supervisor's snapshot, admin-socket look, status line and report pull each
second (or 5, 10 s) wake it once a tick between them, not once each."""

from __future__ import annotations

import asyncio

import pytest

from fleet_ingress.net.event_loop import next_tick, sleep_to_tick


@pytest.mark.parametrize(
    ("now", "every", "tick"),
    [
        (100.25, 1.0, 101.0),
        (100.0, 1.0, 101.0),  # on a tick: the next one, never now
        (100.999, 1.0, 101.0),
        (12.0, 5.0, 15.0),
        (1234.05, 0.05, 1234.1),  # 1234.05 / 0.05 reads 24680.999...: still the next one
        (7.3, 0.0, 7.3),
    ],
)
def test_the_wait_ends_on_the_clocks_next_multiple(now: float, every: float, tick: float) -> None:
    assert next_tick(now, every) == pytest.approx(tick, abs=1e-9)


def test_tasks_of_other_rates_started_apart_come_due_on_one_tick() -> None:
    """Started at any moment, a task every second and one every 5 are due on the
    same tick each 5 s: the loop runs them in one turn, one wake-up."""
    for start_a, start_b in ((3.1, 3.7), (0.02, 4.99), (10.0, 12.5)):
        a = next_tick(start_a, 1.0)
        while a % 5:  # the 1-second task's ticks, on to a multiple of 5
            a = next_tick(a, 1.0)
        b = next_tick(start_b, 5.0)
        assert a == b or b == a + 5.0


async def _two_sleepers() -> tuple[list[float], list[int]]:
    """Two tasks sleep to the 0.5 s tick, started 0.05 s apart: the ticks they
    aimed at and the loop turn each woke in."""
    loop = asyncio.get_running_loop()
    woken: list[int] = []
    aimed: list[float] = []
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    async def sleeper(delay: float) -> None:
        await asyncio.sleep(delay)
        aimed.append(next_tick(loop.time(), 0.5))
        await sleep_to_tick(0.5)
        woken.append(turns)

    await sleep_to_tick(0.5)  # both start in one tick, 0.05 s apart, 0.5 s before the next
    counter = asyncio.ensure_future(count_turns())
    try:
        await asyncio.gather(sleeper(0.0), sleeper(0.05))
    finally:
        counter.cancel()
    return aimed, woken


async def test_two_sleepers_wake_in_the_same_turn() -> None:
    """Two tasks that sleep to the tick at different moments of the tick are
    woken in the same loop turn (one wake-up of the process), on asyncio's
    loop as on uvloop. A round where a stall of the test process put the two
    starts in different ticks says nothing and is run again (three at most)."""
    for _ in range(3):
        aimed, woken = await _two_sleepers()
        if aimed[0] == aimed[1]:
            break
    assert aimed[0] == aimed[1], f"the test process stalled past a tick in every round: {aimed}"
    assert len(woken) == 2 and woken[0] == woken[1], woken
