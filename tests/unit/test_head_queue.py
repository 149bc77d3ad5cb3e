"""The queue complete heads wait in for their parse (a real loop, no sockets)."""

import asyncio
import itertools
import time

from fleet_ingress.net.head_queue import HeadQueue
from fleet_ingress.net.loop_time_meter import LoopTimeMeter


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_heavy_heads_are_parsed_one_per_turn_in_arrival_order():
    queue = HeadQueue(budget=0.0005)
    done: list[int] = []
    turns: list[int] = []  # how many heads had been parsed at each turn of a frame's probe

    def head(i: int) -> None:
        _busy(0.002)  # a head that costs four budgets
        done.append(i)

    async def frames() -> None:  # a call's frames: a callback every turn
        while len(done) < 5:
            turns.append(len(done))
            await asyncio.sleep(0)

    for i in range(5):
        queue.add(lambda i=i: head(i))
    await asyncio.wait_for(frames(), 5)
    assert done == [0, 1, 2, 3, 4]
    # Between two heads the loop came round: the frames never waited for two parses.
    assert all(later - earlier <= 1 for earlier, later in itertools.pairwise(turns))
    assert queue.turns_deferred == 4 and len(queue) == 0


async def test_cheap_heads_are_all_parsed_in_one_turn():
    queue = HeadQueue(budget=0.05)
    done: list[int] = []
    for i in range(20):
        queue.add(lambda i=i: done.append(i))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert done == list(range(20)) and queue.turns_deferred == 0


async def test_a_parse_that_raises_is_logged_and_the_heads_behind_it_still_run(caplog):
    """A bug in one head's parse must not strand the heads queued behind it
    (they would wait, unanswered, for some later head to restart the queue)."""
    queue = HeadQueue(budget=0.05)
    done: list[int] = []

    def broken() -> None:
        raise ValueError("a parse bug")

    queue.add(broken)
    for i in range(3):
        queue.add(lambda i=i: done.append(i))
    for _ in range(3):
        await asyncio.sleep(0)
    assert done == [0, 1, 2] and len(queue) == 0
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.name == "fleet_ingress.proxy" and "a parse bug" in caplog.text


def _spend_cpu(seconds: float) -> None:
    """Work until this thread has used `seconds` of CPU (not of wall: preemption
    on a busy host does not shorten it)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_the_parses_cpu_is_counted_in_its_meter():
    """Accept pacing weighs the heads' parses as new connections' work."""
    meter = LoopTimeMeter()
    queue = HeadQueue(budget=0.05, meter=meter)
    done: list[int] = []
    for i in range(3):
        queue.add(lambda i=i: (_spend_cpu(0.002), done.append(i)))
    await asyncio.wait_for(_until(lambda: len(done) == 3), 5)
    assert meter.spent >= 0.006


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0)


async def test_the_queue_asks_for_its_loop_once_not_each_head(monkeypatch):
    """CPython 3.11's asyncio.get_running_loop() is a getpid system call: a
    churned call's head and its handshake's queued step asked one each
    (session 41). The queue keeps the loop of its first head."""
    asked = []
    real = asyncio.get_running_loop
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: asked.append(1) or real())
    queue = HeadQueue(budget=0.05)
    done = []
    for i in range(3):
        queue.add(lambda i=i: done.append(i))
        await asyncio.sleep(0)  # parsed: the next head schedules a turn again
    assert done == [0, 1, 2] and len(asked) == 1
