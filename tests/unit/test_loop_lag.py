"""The event-loop lag probe on a real loop (no sockets)."""

import asyncio
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
    # sleep minus one interval), however noisy the machine.
    assert max(lags) >= 0.1 - 0.02


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
