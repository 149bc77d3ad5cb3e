"""Seconds the event loop's thread spent on one kind of work.

`time.perf_counter()` around the work: the time the loop was held by it,
which is what every other callback (a live call's next frame) waited for:
the work's CPU, and any wait for a CPU the thread had meanwhile (the host
busy). On a quiet host that is the work's CPU; on a busy one it is more,
as the calls' wait is. The clock is read in the process (the vDSO), no
system call: `time.thread_time()` (the thread's own CPU) is one each,
`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, 12.8 a churned call metered so
(session 48). Meter callbacks that do real work (a TLS handshake step, a
head's parse), not a call's frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


class LoopTimeMeter:
    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = 0.0  # seconds, since start

    def run(self, work: Callable[..., _T], *args: object) -> _T:
        """`work(*args)`, the loop's time in it added to `spent` (raised or not)."""
        started = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.spent += time.perf_counter() - started
