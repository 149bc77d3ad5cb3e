"""Calls that arrive while the supervisor re-executes (an upgrade) are granted
from the workers' grant budgets (`core.slot_budget`), not held until the new
image's table grants again; and maxconn holds host-wide through it. Real
processes, real TLS, streaming calls on loopback; the new image's start made
slow on purpose (a copy of the package, a sleep planted before its imports)
so that the gap is wide and known."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import fleet_ingress
from fleet_ingress.sim import SimulatedFleet
from fleet_ingress.sim.carrier import CallResult, run_call
from tests.support import RunningIngress, TLSFiles

pytestmark = pytest.mark.uvloop_only

PATIENT_PROBES = {"FLEET_INGRESS_FLEETS__CHECK_TIMEOUT": "5", "FLEET_INGRESS_FLEETS__FALL": "5"}
# How long the new image sleeps before anything else: no slot is granted by a
# supervisor meanwhile (and its imports, some 0.6 s of a core, come after).
EXEC_DELAY = 3.0
# Under this, a call's 101 did not wait for the new image.
QUICK_S = 1.0


def _copy_slowed(into: Path, flag: Path) -> Path:
    """A copy of the package whose image started by an upgrade's exec (the
    state's descriptor in its environment) touches `flag`, then sleeps."""
    src = into / "src"
    shutil.copytree(Path(fleet_ingress.__file__).parent, src / "fleet_ingress")
    cli = src / "fleet_ingress" / "cli.py"
    text = cli.read_text()
    anchor = '    step_done("python started")'
    assert text.count(anchor) == 1
    planted = (
        '    if __import__("os").environ.get("FLEET_INGRESS_UPGRADE_STATE"):\n'
        f"        open({str(flag)!r}, 'w').close()\n"
        f'        __import__("time").sleep({EXEC_DELAY})\n'
    )
    cli.write_text(text.replace(anchor, planted + anchor))
    return src


async def test_calls_arriving_during_the_exec_are_granted_from_budgets_within_maxconn(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Fleets at maxconn 2 and 3, two workers, nothing queued: at the
    hand-over the 5 free slots are shared between the workers. A burst of 7
    calls as the new image starts (asleep for EXEC_DELAY): those the budgets
    cover get their 101 at once (before budgets, none did for EXEC_DELAY and
    more); the rest wait for the new image, whose table counts the calls the
    budgets granted (still open: 5 s long), so that no fleet ever carries
    more than its maxconn, counted at the fleet."""
    flag = tmp_path / "exec-began"
    src = _copy_slowed(tmp_path, flag)
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
            async with asyncio.timeout(60):
                while not flag.exists():
                    await asyncio.sleep(0.01)
            began = time.monotonic()
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
            sent_s = time.monotonic() - began
            assert sent_s < EXEC_DELAY - QUICK_S - 0.5, "the burst was late: nothing tested"
            async with asyncio.timeout(90):
                results = await asyncio.gather(*calls)
            failed = [(r.status, r.error) for r in results if not r.ok]
            assert not failed, failed
            assert sum(r.lost_frames for r in results) == 0
            quick = sorted(r.handshake_ms or 0.0 for r in results if r.ok)
            # Granted from the budgets: at least the share of the worker that took
            # fewest of the burst, at most the 5 free slots.
            assert 3 <= sum(ms < QUICK_S * 1000 for ms in quick) <= 5, quick
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
            for task in calls:
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await service.finish()
