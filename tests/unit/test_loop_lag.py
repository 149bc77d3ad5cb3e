"""The event-loop lag probe on a real loop (no sockets)."""

import asyncio
import random
import time

from fleet_ingress.net.loop_lag import LoopLagProbe


async def test_a_loop_held_by_synchronous_work_shows_as_lag():
    lags: list[float] = []
    probe = LoopLagProbe(lags.append, interval=0.02)
    probe.start()
    try:
        await asyncio.sleep(0.07)  # a few probes on an idle loop
        idle = list(lags)
        time.sleep(0.1)  # noqa: ASYNC251 - what a slow parse does to every call
        await asyncio.sleep(0.05)
    finally:
        probe.stop()
    assert idle and all(lag >= 0 for lag in lags)
    # The probe due during the sleep fired late by most of it (never less than the
    # sleep minus the longest wait, 1.5 intervals), however noisy the machine.
    assert max(lags) >= 0.1 - 1.5 * 0.02


async def test_stop_stops_the_probe_and_start_is_idempotent():
    lags: list[float] = []
    probe = LoopLagProbe(lags.append, interval=0.01)
    probe.start()
    probe.start()
    await asyncio.sleep(0.05)
    probe.stop()
    assert not probe.running
    seen = len(lags)
    await asyncio.sleep(0.05)
    assert len(lags) == seen > 0


async def test_a_stall_that_recurs_at_the_probes_own_period_is_seen_each_time_it_is_hit():
    """Work that holds the loop half of every period, the probe's own (or a
    multiple of it: work every second against the default 0.2 s). A probe due a fixed interval
    after it fired locked onto the stall's end and reported nothing after the
    first (the alerts audit of session 17); drawn waits land inside it."""
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    rng = random.Random(17)
    probe = LoopLagProbe(lags.append, interval=0.1, draw=rng.random)
    start = loop.time()
    stalls = 0

    def stall() -> None:
        nonlocal stalls
        stalls += 1
        time.sleep(0.05)  # the point: the loop is held
        if stalls < 20:
            loop.call_at(start + 0.1 * stalls, stall)

    loop.call_at(start, stall)
    probe.start()
    try:
        await asyncio.sleep(2.0)
    finally:
        probe.stop()
    late = [lag for lag in lags if lag > 0.01]
    assert len(late) >= 4, (len(lags), sorted(lags)[-6:])


async def test_an_observer_that_raises_once_does_not_stop_the_probe():
    lags: list[float] = []
    failed: list[dict] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()  # the project's loop counts with its own
    loop.set_exception_handler(lambda _loop, context: failed.append(context))

    def observe(lag: float) -> None:
        if not failed and not lags:
            lags.append(-1.0)
            raise RuntimeError("a bug in the observer")
        lags.append(lag)

    probe = LoopLagProbe(observe, interval=0.01)
    probe.start()
    try:
        await asyncio.sleep(0.1)
    finally:
        probe.stop()
        loop.set_exception_handler(previous)
    assert len(failed) == 1 and isinstance(failed[0]["exception"], RuntimeError)
    assert len(lags) > 2 and probe.running is False


def test_what_reaches_the_loops_handler_uncaught_is_counted_but_uvloops_closed_tls_noise():
    """fleet_ingress_unexpected_errors_total: a callback that raised, on the
    loop `run` uses; uvloop's complaint about a TLS connection it had closed
    (a probe cut mid-handshake) is no bug of ours and is not counted."""
    from fleet_ingress.net import event_loop

    loop = event_loop.new_event_loop()
    try:
        before = event_loop.unexpected_errors()
        loop.call_soon(lambda: 1 / 0)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert event_loop.unexpected_errors() == before + 1
        noise = {
            "message": "Fatal error on SSL protocol",
            "exception": RuntimeError(
                "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
            ),
        }
        loop.call_exception_handler(noise)
        assert event_loop.unexpected_errors() == before + 1
    finally:
        loop.close()


async def test_a_probe_rests_while_nothing_is_busy_and_a_wake_sets_it_again():
    """An idle worker's loop lag is felt by no call: with `busy` false the probe
    sets no timer (it woke an idle worker five times a second), and `wake` (a
    connection counted) brings it back, sampling as before."""
    lags: list[float] = []
    busy = False
    probe = LoopLagProbe(lags.append, interval=0.01, busy=lambda: busy)
    probe.start()
    assert probe.running and probe.resting  # nothing busy at the start: no timer
    await asyncio.sleep(0.05)
    assert lags == []
    busy = True
    probe.wake()
    assert not probe.resting
    await asyncio.sleep(0.06)
    assert len(lags) >= 2
    busy = False
    await asyncio.sleep(0.03)  # the next firing looks, and rests
    assert probe.resting
    seen = len(lags)
    await asyncio.sleep(0.05)
    assert len(lags) == seen
    probe.wake()  # woken while nothing is busy: one sample, then rest again
    await asyncio.sleep(0.05)
    assert len(lags) == seen + 1 and probe.resting
    probe.stop()
    probe.wake()  # a stopped probe stays stopped
    assert not probe.running and probe.resting is False
    await asyncio.sleep(0.03)
    assert len(lags) == seen + 1
