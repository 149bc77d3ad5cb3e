"""Complete request heads wait here for their parse, a bounded amount per loop turn.

A head's parse (h11 and our checks, then the route) is the one piece of a
carrier connection's work that grows with what a stranger sends: up to about
half a millisecond for 16 KiB of header lines. Done inside `data_received`,
every head that arrived in the same loop iteration is parsed before the loop
polls again, so N flood connections landing together hold every live call's
next frame for N parses. Queued, each turn of the loop parses heads for at
most `budget` seconds (at least one head), then lets the loop poll: a call's
frame waits for about one parse, however many heads a flood sends at once.
Heads are parsed in arrival order; a normal head costs well under the budget,
so a few at a time are all parsed in the same turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import cast

from fleet_ingress.net.loop_time_meter import LoopTimeMeter

log = logging.getLogger("fleet_ingress.proxy")

# About one worst-case head (bench/head_cost.py): what a live frame may wait.
DEFAULT_BUDGET = 0.0005


class HeadQueue:
    def __init__(self, budget: float = DEFAULT_BUDGET, meter: LoopTimeMeter | None = None) -> None:
        self.budget = budget
        self.meter = meter  # where the parses' CPU is counted (new connections' work)
        self._waiting: deque[Callable[[], None]] = deque()
        self._scheduled = False
        self.turns_deferred = 0  # turns that left heads for a later turn (tests, stats)
        # The loop of the first add: a queue serves one loop (the Ingress's).
        # Kept, not asked each head: CPython 3.11's get_running_loop is a getpid
        # system call (1.75 a churned call, session 41).
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, parse: Callable[[], None]) -> None:
        """Run `parse` on a later turn of the running loop, in arrival order."""
        self._waiting.append(parse)
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self.meter is None:
            self._parse_this_turn()
        else:
            self.meter.run(self._parse_this_turn)

    def _parse_this_turn(self) -> None:
        waiting = self._waiting
        deadline = time.perf_counter() + self.budget
        while waiting:
            parse = waiting.popleft()
            try:
                parse()
            except Exception:
                # A bug in one head's parse: the heads behind it still get theirs
                # (raised out of here, they would wait for some later head).
                log.exception("request head parse failed")
            if time.perf_counter() >= deadline:
                break
        if waiting:
            self.turns_deferred += 1
            self._scheduled = True
            cast("asyncio.AbstractEventLoop", self._loop).call_soon(self._run)
