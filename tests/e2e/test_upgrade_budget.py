"""Calls around the supervisor's re-execution (an upgrade): those that arrive
during it are granted from the workers' grant budgets (`core.slot_budget`),
not held until the new image's table grants again; maxconn holds host-wide
through it, and so does a fleet's capacity for calls it answered during it.
Real processes, real TLS, streaming calls on loopback; the new image held at
its start on purpose (a copy of the package, a wait for the test's go planted
before its imports) so that the gap lasts as long as the test needs."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from websockets.asyncio.client import connect

import fleet_ingress
from fleet_ingress.sim import SimulatedFleet
from fleet_ingress.sim.carrier import CallResult, run_call
from tests.support import RunningIngress, TLSFiles, eventually

pytestmark = pytest.mark.uvloop_only

PATIENT_PROBES = {"FLEET_INGRESS_FLEETS__CHECK_TIMEOUT": "5", "FLEET_INGRESS_FLEETS__FALL": "5"}
# The most a held new image waits for the test's go (seconds): a test that
# fails before it goes leaves no image waiting for ever.
HELD_AT_MOST = 120


def _copy_held(into: Path, began: Path, go: Path) -> Path:
    """A copy of the package whose image started by an upgrade's exec (the
    state's descriptor in its environment) touches `began`, then waits for
    `go` to exist (HELD_AT_MOST at most) before anything else: no slot is
    granted by a supervisor meanwhile. Before, it slept 3 s, and the test
    failed "the burst was late" when a loaded host took longer to send it."""
    src = into / "src"
    shutil.copytree(Path(fleet_ingress.__file__).parent, src / "fleet_ingress")
    cli = src / "fleet_ingress" / "cli.py"
    text = cli.read_text()
    anchor = '    step_done("python started")'
    assert text.count(anchor) == 1
    planted = (
        '    if __import__("os").environ.get("FLEET_INGRESS_UPGRADE_STATE"):\n'
        f"        open({str(began)!r}, 'w').close()\n"
        f"        for _ in range({HELD_AT_MOST * 100}):\n"
        f'            if __import__("os").path.exists({str(go)!r}):\n'
        "                break\n"
        '            __import__("time").sleep(0.01)\n'
    )
    cli.write_text(text.replace(anchor, planted + anchor))
    return src


async def test_calls_arriving_during_the_exec_are_granted_from_budgets_within_maxconn(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Fleets at maxconn 2 and 3, two workers, nothing queued: at the
    hand-over the 5 free slots are shared between the workers. A burst of 7
    calls as the new image starts (held until the test's go): those the
    budgets cover get their 101 while it is held (before budgets, none did
    until the new image granted); the rest wait for the new image, whose
    table counts the calls the budgets granted (still open: 5 s long), so
    that no fleet ever carries more than its maxconn, counted at the fleet."""
    began, go = tmp_path / "exec-began", tmp_path / "go"
    src = _copy_held(tmp_path, began, go)
    context = tls_files.fleet_server_context()
    async with (
        SimulatedFleet(name="a", capacity=50, ssl_context=context) as a,
        SimulatedFleet(name="b", capacity=50, ssl_context=context) as b,
    ):
        a.available_override = b.available_override = 1000  # only maxconn holds the count
        service = await RunningIngress.start(
            tls_files,
            [f"{a.url} name=a maxconn=2", f"{b.url} name=b maxconn=3"],
            workers=2,
            queue=40,
            env={"PYTHONPATH": str(src), **PATIENT_PROBES},
        )
        calls: list[asyncio.Task[CallResult]] = []
        try:
            os.kill(service.proc.pid, signal.SIGUSR2)
            await eventually(began.exists, timeout=60)
            for i in range(7):
                calls.append(
                    asyncio.create_task(
                        run_call(
                            f"wss://127.0.0.1:{service.port}",
                            ssl_context=tls_files.client_context(),
                            profile="exotel",
                            duration=5.0,
                            bot_id=f"gap-{i}",
                            open_timeout=60,
                            echo_wait=3.0,
                        )
                    )
                )
                await asyncio.sleep(0.02)

            def answered() -> int:  # the fleets' 101s: none but the budgets' yet
                return a.calls_total + b.calls_total

            # Granted from the budgets while the new image is held: at least the
            # share of the worker that takes fewest of the burst (3 of the 5),
            # however long a loaded host takes to bring the calls; then as many
            # as come before the count stops moving, at most the 5 free slots.
            await eventually(lambda: answered() >= 3, timeout=60)
            for _ in range(20):  # bounded: it moves at most twice more
                before = answered()
                await asyncio.sleep(0.5)
                if answered() == before:
                    break
            answered_held = answered()
            go.touch()
            async with asyncio.timeout(90):
                results = await asyncio.gather(*calls)
            failed = [(r.status, r.error) for r in results if not r.ok]
            assert not failed, failed
            assert sum(r.lost_frames for r in results) == 0
            assert 3 <= answered_held <= 5, answered_held
            assert a.peak_calls <= 2 and b.peak_calls <= 3, (a.peak_calls, b.peak_calls)
            assert a.rejected_429 == b.rejected_429 == 0
            assert a.peak_calls + b.peak_calls == 5  # they were full: maxconn was tested
            log = service.log()
            assert any(e.get("event", "").startswith("upgrade done") for e in log)
            ended = [
                e
                for e in log
                if e.get("event") == "grant budget ended: the supervisor grants again"
            ]
            assert sum(e["granted"] for e in ended) >= 3, ended
        finally:
            go.touch()
            for task in calls:
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await service.finish()


class _FleetTakingWhenLet(SimulatedFleet):
    """A fleet that takes a call request (counts it, answers it) only once
    `letting` is set: until then the call is in flight, and its health leaves
    it out, as a bot slow to start."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.letting = asyncio.Event()
        self.held_requests = 0

    async def _call(self, request: web.Request) -> web.StreamResponse:
        self.held_requests += 1
        await self.letting.wait()
        return await super()._call(request)


# pair: in the main phase of a clean-clone CI run (session 50, 0f6f4218) the new image
# logged no "worker rejoined" line (its first failure in eleven such runs); alone, and
# beside two CPU burners, it passed every time (seven runs). Cause not found: run
# with one other test at most until it is.
@pytest.mark.pair
async def test_calls_the_fleet_answers_during_the_exec_are_not_counted_free_by_the_new_image(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A fleet with 3 workers, 3 calls still connecting there when a probe
    left (it said 3 free: the table leaves the 3 out) and at the exec. The
    fleet answers them while the new image is held; 3 more calls wait in the
    worker meanwhile. Before, the new image took the fleet's number carried
    over the exec for one that counted the 3 (their worker no longer says
    them in flight), granted the 3 waiting at once, and the fleet answered
    each 429 (passed on to the carrier: the call lost; session 41's load
    failure of test_upgrade's ..._not_counted_free_by_the_new_image, 3 in 8).
    Now they wait for room: 503 at the queue's timeout. The fleet's probes
    answer 1 s late from the exec on, so that the new image's own first probe
    (the fleet full) is not counted before it grants."""
    began, go = tmp_path / "exec-began", tmp_path / "go"
    src = _copy_held(tmp_path, began, go)
    async with _FleetTakingWhenLet(
        name="f", capacity=3, ssl_context=tls_files.fleet_server_context()
    ) as fleet:
        service = await RunningIngress.start(
            tls_files,
            [f"{fleet.url} name=f maxconn=16"],
            workers=1,
            queue=4,
            env={
                "PYTHONPATH": str(src),
                # The 3 calls wait for their answer over the upgrade's trial run.
                "FLEET_INGRESS_TIMEOUTS__RESPONSE": "120",
                **PATIENT_PROBES,
            },
        )
        first = [
            asyncio.ensure_future(
                connect(
                    f"wss://127.0.0.1:{service.port}/ws/first-{i}",
                    ssl=tls_files.client_context(),
                    open_timeout=150,
                )
            )
            for i in range(3)
        ]
        later: list[asyncio.Task[CallResult]] = []
        try:
            await service.fleets_up()
            await eventually(lambda: fleet.held_requests == 3, timeout=30)
            probes = fleet.health_probes
            # A probe sent with the 3 in flight is counted (the next one has left).
            await eventually(lambda: fleet.health_probes >= probes + 2, timeout=30)
            os.kill(service.proc.pid, signal.SIGUSR2)
            await eventually(began.exists, timeout=120)
            fleet.health_delay = 1.0
            fleet.letting.set()
            answered = await asyncio.gather(*first)  # their 101s read by the worker
            later = [
                asyncio.create_task(
                    run_call(
                        f"wss://127.0.0.1:{service.port}",
                        ssl_context=tls_files.client_context(),
                        profile="exotel",
                        duration=1.0,
                        bot_id=f"later-{i}",
                        open_timeout=60,
                        echo_wait=3.0,
                    )
                )
                for i in range(3)
            ]
            await asyncio.sleep(3.0)  # asked of the held supervisor: checked below
            go.touch()
            async with asyncio.timeout(90):
                results = await asyncio.gather(*later)
            rejoined = [
                e for e in service.log() if e["event"] == "worker rejoined the slot coordinator"
            ]
            assert [(e["held"], e["waiting"]) for e in rejoined] == [(3, 3)], rejoined
            assert fleet.rejected_429 == 0, [(r.status, r.error) for r in results]
            assert [r.status for r in results] == [503] * 3
            assert fleet.peak_calls == 3
            for call in answered:
                await call.close()
        finally:
            go.touch()
            fleet.letting.set()
            for task in later:
                task.cancel()
            await asyncio.gather(*later, return_exceptions=True)
            for task in first:
                if task.done() and not task.cancelled() and task.exception() is None:
                    await task.result().close()
                else:
                    task.cancel()
            await asyncio.gather(*first, return_exceptions=True)
            await service.finish()
