"""Seconds this thread has waited for a CPU: how starved the host keeps it.

A thread that is ready to run but not running (other processes hold every
CPU, or a CPU quota throttles its cgroup) makes no progress, and every timer
it judges by fires on a world it could not watch: a health probe that timed
out then says nothing about the fleet. The kernel counts that wait per thread
(`/proc/thread-self/schedstat`, its second field: nanoseconds on a run
queue); where it does not (no CONFIG_SCHED_INFO, another OS) this reads None.

Read before every health probe: the file is opened once a thread and read
again from its start (one pread, where opening it each time took nine system
calls, a quarter of an idle supervisor's: the idle audit of session 39), and
a process out of descriptors, whose probes this judges, can still read it.
"""

from __future__ import annotations

import os
import threading

SCHEDSTAT = "/proc/thread-self/schedstat"


class _Schedstat:
    """This thread's SCHEDSTAT, open; closed as the thread ends (its local goes)."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = os.open(SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        os.close(self.fd)


_opened = threading.local()  # .file: a _Schedstat, at the thread's first read


def _forget_after_fork() -> None:
    # The child's thread is another one: the descriptor it inherited names the
    # parent's thread (closed here, the child's copy; the parent keeps its own).
    _opened.__dict__.pop("file", None)


os.register_at_fork(after_in_child=_forget_after_fork)


def cpu_wait() -> float | None:
    """Seconds this thread has spent ready to run but not running, since it
    started; None where the kernel does not say."""
    try:
        opened = getattr(_opened, "file", None)
        if opened is None:
            opened = _opened.file = _Schedstat()
        return int(os.pread(opened.fd, 128, 0).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
