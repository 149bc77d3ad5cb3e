"""A timeout that comes late after a stall waits a moment for what the loop has
unread (`net.late_timers`); on time, it is a plain timer. Real loops (asyncio's
and uvloop), no sockets; the stop itself: tests/e2e/test_clocks.py."""

import asyncio
import time

import pytest

from fleet_ingress.net.late_timers import (
    AFTER_STALL,
    STALL,
    PatientDeadline,
    PatientTimer,
    patient_timeout,
    put_off_by,
    wait_patiently,
)


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


async def test_late_a_timer_whose_peer_did_not_answer_fires_on_the_first_turn():
    """A connect's timer after a stall: the fleet never answered (a dead one),
    so it fails on the loop's first turn, put off by nothing."""
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    PatientTimer(loop, 0.01, lambda: fired.append(loop.time()), answered=lambda: False)
    time.sleep(0.01 + 2 * STALL)  # noqa: ASYNC251 - the loop does not run, as if stopped
    resumed = loop.time()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(fired) == 1 and fired[0] - resumed < AFTER_STALL / 2


async def test_late_a_timer_whose_peer_answered_is_put_off_by_how_late_it_came():
    """The fleet answered during the stall (its connection made, unread): the
    timer gives back the time the loop took, its own delay at most, once."""
    loop = asyncio.get_running_loop()
    fired: dict[str, float] = {}
    asked: list[str] = []

    def answered(name: str) -> bool:
        asked.append(name)
        return True

    delay = 0.01
    PatientTimer(loop, delay, fired.__setitem__, "short", 0.0, answered=lambda: True)
    PatientTimer(loop, 1.0, fired.__setitem__, "long", 0.0, answered=lambda: answered("long"))
    began = loop.time()
    time.sleep(1.0 + 2 * STALL)  # noqa: ASYNC251 - the loop does not run, as if stopped
    resumed = loop.time()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fired == {} and asked == ["long"]
    await asyncio.sleep(AFTER_STALL * 2)
    assert set(fired) == {"short"}  # put off by AFTER_STALL: its delay was less
    await asyncio.sleep(resumed - began - 1.0 + AFTER_STALL)  # "long" came that late
    assert set(fired) == {"short", "long"} and asked == ["long"]  # once


async def test_a_timer_due_at_once_fires():
    """A delay of 0 or less (a deadline come or past: the slot queue's timer);
    on uvloop, under its 1 ms tick, call_later hands back a plain Handle with
    no `when()`: the timer raised AttributeError when due and never fired."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    fired: list[str] = []
    PatientTimer(loop, 0.0, fired.append, "now")
    PatientTimer(loop, -0.01, fired.append, "past")
    PatientTimer(loop, 0.0003, fired.append, "sub-tick")
    # Waited for, not slept on: a loaded host that holds this loop past STALL
    # makes them late, and a late timer is put off once (AFTER_STALL).
    await _fired(fired, 3)
    assert errors == [] and sorted(fired) == ["now", "past", "sub-tick"]
    PatientTimer(loop, -1.0, fired.append, "long past")  # late by over STALL: put off once
    await _fired(fired, 4)
    assert errors == [] and "long past" in fired


async def _fired(fired: list[str], count: int, within: float = 5.0) -> None:
    """Until `fired` holds `count` names, `within` seconds at most."""
    deadline = asyncio.get_running_loop().time() + within
    while len(fired) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)


async def test_a_patient_timeout_late_lets_what_came_meanwhile_in_first():
    """`patient_timeout` (asyncio.timeout's stand-in): come late, an answer
    set on the loop's next turns (read from the kernel) is taken; on time, or
    with nothing coming, it raises TimeoutError as asyncio.timeout does."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    async def waiting() -> object:
        async with patient_timeout(0.01):
            return await answer

    task = loop.create_task(waiting())
    await asyncio.sleep(0)
    time.sleep(0.01 + 2 * STALL)  # noqa: ASYNC251 - the loop does not run, as if stopped
    loop.call_soon(answer.set_result, "read")  # what the loop reads after the timers
    assert await task == "read"
    began = loop.time()
    with pytest.raises(TimeoutError):
        async with patient_timeout(0.02):
            await loop.create_future()
    assert loop.time() - began < 0.02 + STALL


async def test_wait_patiently_late_takes_what_came_meanwhile_and_cancels_nothing():
    loop = asyncio.get_running_loop()
    answered, silent = loop.create_future(), loop.create_future()
    waiting = loop.create_task(wait_patiently([answered, silent], 0.01))
    await asyncio.sleep(0)
    time.sleep(0.01 + 2 * STALL)  # noqa: ASYNC251 - the loop does not run, as if stopped
    loop.call_soon(answered.set_result, None)
    done, pending = await waiting
    assert done == {answered} and pending == {silent} and not silent.cancelled()


def test_a_deadline_asked_late_after_it_passed_moves_on_once():
    """A polling loop's kill deadline (a failed resume's drain, drain_children):
    asked on time it passes at its time; asked over STALL late once past it
    (the process stopped), it moves `put_off` on, once."""
    on_time = PatientDeadline(time.monotonic() + 0.02, 1.0, 5.0)  # asked within `every`
    time.sleep(0.01)
    assert not on_time.passed()
    time.sleep(0.015)
    assert on_time.passed()
    late = PatientDeadline(time.monotonic() + 0.02, 0.01, 0.5)
    time.sleep(0.01 + 2 * STALL)  # the process did not run
    assert not late.passed()
    time.sleep(0.01)
    assert not late.passed()  # within put_off (a loaded host's sleep may overrun)
    time.sleep(0.5)
    assert late.passed()
    time.sleep(0.01 + 2 * STALL)
    assert late.passed()  # once only


@pytest.mark.parametrize(
    ("late", "answered", "put_off"),
    [
        (0.0, None, None),  # on time: fires
        (STALL, None, None),  # at the bound, still on time
        (STALL + 0.01, None, AFTER_STALL),  # late: put off once
        (3.0, lambda: False, None),  # late, its peer did not answer: fires
        (0.3, lambda: True, 0.3),  # answered: by how late it came
        (9.0, lambda: True, 5.0),  # ... its delay at most
    ],
)
def test_put_off_by_is_patient_timers_rule(late, answered, put_off):
    """The rule a PatientTimer and the call pump's timers share (`put_off_by`)."""
    assert put_off_by(late, 5.0, answered) == put_off
