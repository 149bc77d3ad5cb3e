"""Seconds this thread has waited for a CPU: how starved the host keeps it.

A thread that is ready to run but not running (other processes hold every
CPU, or a CPU quota throttles its cgroup) makes no progress, and every timer
it judges by fires on a world it could not watch: a health probe that timed
out then says nothing about the fleet. The kernel counts that wait per thread
(`/proc/thread-self/schedstat`, its second field: nanoseconds on a run
queue); where it does not (no CONFIG_SCHED_INFO, another OS) this reads None.
"""

from __future__ import annotations

SCHEDSTAT = "/proc/thread-self/schedstat"


def cpu_wait() -> float | None:
    """Seconds this thread has spent ready to run but not running, since it
    started; None where the kernel does not say."""
    try:
        with open(SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
