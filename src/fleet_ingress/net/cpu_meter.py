"""CPU seconds the event loop's thread spent on one kind of work.

`time.thread_time()` around the work: the loop thread's own user and system
time, so what other threads or processes do, and time spent waiting for a
CPU, is not counted. One system call per measurement: meter callbacks that
do real work (a TLS handshake step, a head's parse), not a call's frames.
"""

from __future__ import annotations


class CpuMeter:
    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = 0.0  # seconds, since start
