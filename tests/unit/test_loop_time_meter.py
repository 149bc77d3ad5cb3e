"""The new connections' meter (accept pacing's measure): the loop's time in the work."""

import time

import pytest

from fleet_ingress.net.loop_time_meter import LoopTimeMeter


def test_a_run_reads_no_thread_cpu_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """`time.thread_time()` is a system call each (clock_gettime of the thread's
    CPU clock; 12.8 a churned call, session 48): the meter reads the process's
    own clock instead."""

    def thread_time() -> float:
        raise AssertionError("the meter read the thread's CPU clock")

    monkeypatch.setattr(time, "thread_time", thread_time)
    meter = LoopTimeMeter()
    assert meter.run(lambda a, b: a + b, 2, 3) == 5
    assert meter.spent >= 0.0


def test_the_loop_s_time_held_by_the_work_counts_cpu_or_not() -> None:
    """What a live call's next frame waits for is the loop held, whether the
    work used a CPU or waited for one: 10 ms held count 10 ms at least (a
    lower bound: `time.sleep` sleeps that long at least)."""
    meter = LoopTimeMeter()
    meter.run(time.sleep, 0.01)
    assert meter.spent >= 0.01


def test_work_that_raises_is_counted_too() -> None:
    meter = LoopTimeMeter()

    def fails() -> None:
        time.sleep(0.002)
        raise ValueError("a bug in a handshake step")

    with pytest.raises(ValueError, match="a bug"):
        meter.run(fails)
    assert meter.spent >= 0.002
