"""A timeout that comes late after a stall waits a moment for what the loop has
unread (`net.late_timers`); on time, it is a plain timer. Real loops (asyncio's
and uvloop), no sockets; the stop itself: tests/e2e/test_clocks.py."""

import asyncio
import time

from fleet_ingress.net.late_timers import AFTER_STALL, STALL, PatientTimer


async def test_on_time_it_fires_at_its_delay_once():
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    PatientTimer(loop, 0.02, lambda: fired.append(loop.time()))
    began = loop.time()
    await asyncio.sleep(0.02 + STALL / 2)
    assert len(fired) == 1 and fired[0] - began < 0.02 + STALL


async def test_late_it_is_put_off_once_and_what_comes_meanwhile_cancels_it():
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    PatientTimer(loop, 0.01, fired.append, "stalled")
    answered = PatientTimer(loop, 0.01, fired.append, "answered")
    time.sleep(0.01 + 2 * STALL)  # noqa: ASYNC251 - the loop does not run, as if stopped
    await asyncio.sleep(0)  # both come due, late: put off
    await asyncio.sleep(0)
    assert fired == []
    answered.cancel()  # its answer read in the moment it was given
    await asyncio.sleep(AFTER_STALL * 3)
    assert fired == ["stalled"]  # once: not put off again


async def test_cancelled_before_it_is_due_it_never_fires():
    fired: list[int] = []
    PatientTimer(asyncio.get_running_loop(), 0.01, fired.append, 1).cancel()
    await asyncio.sleep(0.05)
    assert fired == []
