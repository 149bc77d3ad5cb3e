"""CPU seconds the event loop's thread spent on one kind of work.

`time.thread_time()` around the work: the loop thread's own user and system
time, so what other threads or processes do, and time spent waiting for a
CPU, is not counted. One system call per measurement: meter callbacks that
do real work (a TLS handshake step, a head's parse), not a call's frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


class CpuMeter:
    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = 0.0  # seconds, since start

    def run(self, work: Callable[..., _T], *args: object) -> _T:
        """`work(*args)`, its CPU added to `spent` (raised or not)."""
        started = time.thread_time()
        try:
            return work(*args)
        finally:
            self.spent += time.thread_time() - started
