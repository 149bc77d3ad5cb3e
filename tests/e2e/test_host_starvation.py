"""A host that keeps the supervisor from running (every CPU taken, a CPU quota)
must not take healthy fleets DOWN: its probes time out on a world it could
not watch (the pressure audit of session 16: a 2 % CPU quota took all three
fleets DOWN and calls got `503 no fleet is up`). Real processes, real
starvation: the supervisor is put on one CPU beside busy processes that the
kernel always runs first (SCHED_IDLE against SCHED_OTHER)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator

import pytest

from fleet_ingress.sim import SimulatedFleet
from tests.support import RunningIngress, TLSFiles, simulated_fleets

# One process tree per test (the event loop is its own); alone: the test takes a CPU
# away on purpose, and a test beside it would be starved too.
pytestmark = [pytest.mark.uvloop_only, pytest.mark.alone]

STARVED_FOR = 6.0  # seconds: fall 2 at a 0.2 s interval would take a fleet DOWN in 0.4 s


@pytest.fixture
async def two_fleets(tls_files: TLSFiles) -> AsyncIterator[list[SimulatedFleet]]:
    async with simulated_fleets(tls_files, capacity=16) as sims:
        yield sims


def _threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def _run_queue_wait(pid: int) -> float:
    """Seconds the main thread of `pid` has waited for a CPU (schedstat)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat", "rb") as f:
        return int(f.read().split()[1]) / 1e9


async def test_a_starved_supervisor_does_not_take_healthy_fleets_down(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one to starve the supervisor on, one for the fleets")
    # The first CPU this process may use, not CPU 0: a cpuset without CPU 0 (a
    # container's --cpuset-cpus=1-2) refuses threads pinned to it (EINVAL).
    starved_cpu = min(os.sched_getaffinity(0))
    other_cpus = os.sched_getaffinity(0) - {starved_cpu}
    lines = [f"{sim.url} name={sim.name}" for sim in two_fleets]
    service = await RunningIngress.start(
        tls_files, lines, workers=1, check_timeout=1, check_interval=0.2
    )
    ours = os.sched_getaffinity(0)
    hogs: list[asyncio.subprocess.Process] = []
    try:
        await service.fleets_up()
        os.sched_setaffinity(0, other_cpus)  # the fleets (this process) keep answering
        supervisor = service.proc.pid
        waited_before = _run_queue_wait(supervisor)
        for thread in _threads(supervisor):
            os.sched_setaffinity(thread, {starved_cpu})
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        spin = (
            f"import time\nend = time.monotonic() + {STARVED_FOR}\n"
            "while time.monotonic() < end: pass"
        )
        hogs = [
            await asyncio.create_subprocess_exec(
                "taskset", "-c", str(starved_cpu), sys.executable, "-c", spin
            )
            for _ in range(2)
        ]
        started = time.monotonic()
        async with asyncio.timeout(STARVED_FOR + 10):
            for hog in hogs:
                await hog.wait()
        assert time.monotonic() - started >= STARVED_FOR - 0.5
        for thread in _threads(supervisor):
            os.sched_setscheduler(thread, os.SCHED_OTHER, os.sched_param(0))
            os.sched_setaffinity(thread, ours)
        await asyncio.sleep(1.0)  # what it read meanwhile, judged
        # The test starved it: its event loop's thread waited for a CPU most of
        # the time. (Whether a probe then timed out, and the starvation was
        # said, depends on which of its timer and its answer the loop ran first
        # once it ran again: either way no fleet may go DOWN.)
        assert _run_queue_wait(supervisor) - waited_before >= STARVED_FOR / 2
        events = [e["event"] for e in service.log()]
        assert "fleet DOWN" not in events, [e for e in service.log() if e["event"] == "fleet DOWN"]
        snap = await service.stats()
        assert [f["health"] for f in snap["fleets"]] == ["UP", "UP"]
        assert all(f["check_failures"] == 0 for f in snap["fleets"]), snap["fleets"]
    finally:
        for hog in hogs:
            if hog.returncode is None:
                hog.kill()
                await hog.wait()
        os.sched_setaffinity(0, ours)
        await service.finish()
