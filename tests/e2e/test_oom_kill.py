"""A worker killed by the kernel's OOM killer, told from one killed by an
operator's `kill -9` (service/oom_kills.py): real processes in a real memory
cgroup made for the test (cgroup v2 where the host has its memory controller
there, else v1), whose limit the worker's calls run past.

The supervisor and its workers start in that cgroup, as systemd starts them
in the unit's; once serving, the limit is set a little above what they use,
and calls are opened until the OOM killer takes a process of the group: a
worker, which asks to be taken first (`worker._prefer_for_oom_kill`). The
limit is lifted at once, so its replacement starts freely. Bounded: 400
calls, 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect

from fleet_ingress.service.oom_verdict import OOM_KILLED_WORKER
from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    MemoryCgroup,
    RunningIngress,
    TLSFiles,
    admin_command,
    close_calls,
    fleets_up_or_finished,
    metric_samples,
)

# Alone: the kernel counts an OOM kill in the group's ancestors too (the v1
# root memory group, /proc/vmstat), which the supervisors of tests running
# beside it read: a kill -9 of theirs within OOM_CREDIT_S was called the OOM
# killer's (restarts {"oom": 1} for {"killed": 1}).
pytestmark = [pytest.mark.uvloop_only, pytest.mark.alone]

# Above what the group uses once serving: what the calls opened next run past.
HEADROOM = 4 << 20
MAX_CALLS = 400
SQUEEZE_FOR = 60.0


@pytest.fixture
def memory_cgroup() -> Iterator[MemoryCgroup]:
    why = MemoryCgroup.unavailable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI (root, Debian) must run the OOM-kill test")
        pytest.skip(f"{why} (CI unset)")
    group = MemoryCgroup.make()
    try:
        yield group
    finally:
        group.remove()


@pytest.fixture
async def big_fleet(tls_files: TLSFiles) -> AsyncIterator[SimulatedFleet]:
    sim = SimulatedFleet(
        name="a", capacity=MAX_CALLS + 10, ssl_context=tls_files.fleet_server_context()
    )
    sim.available_override = 10_000
    await sim.start()
    yield sim
    await sim.stop()


async def _squeeze(
    service: RunningIngress, tls_files: TLSFiles, group: MemoryCgroup, calls: list[ClientConnection]
) -> float:
    """Calls opened, with the group's limit just above its use, until the
    kernel counts an OOM kill there; the limit lifted at once (the worker's
    replacement starts in the group). Returns how long it took."""
    started = time.monotonic()
    group.limit(group.usage() + HEADROOM)
    lifted = asyncio.Event()

    async def lift_on_kill() -> None:
        while not group.oom_kills():
            await asyncio.sleep(0.005)
        group.limit(None)
        lifted.set()

    watcher = asyncio.create_task(lift_on_kill())
    try:
        async with asyncio.timeout(SQUEEZE_FOR):
            for i in range(MAX_CALLS):
                if lifted.is_set():
                    break
                with contextlib.suppress(Exception):  # refused, reset: the squeeze
                    calls.append(
                        await connect(
                            service.url(f"/ws/bot-{i}"),
                            ssl=tls_files.client_context(),
                            open_timeout=5,
                            max_size=None,
                        )
                    )
            await lifted.wait()
    finally:
        watcher.cancel()
        group.limit(None)
    return time.monotonic() - started


async def test_a_worker_oom_killed_is_said_so_and_told_from_a_kill_9(
    tls_files: TLSFiles, big_fleet: SimulatedFleet, memory_cgroup: MemoryCgroup
) -> None:
    service = await RunningIngress.start(
        tls_files,
        [f"{big_fleet.url} name=a maxconn={MAX_CALLS + 10}"],
        workers=1,
        check_timeout=5,
        preexec_fn=memory_cgroup.join,
    )
    calls: list[ClientConnection] = []
    try:
        await fleets_up_or_finished(service)
        (victim,) = (await service.stats())["workers"]
        assert victim["pid"] in memory_cgroup.pids()
        used = memory_cgroup.usage()
        took = await _squeeze(service, tls_files, memory_cgroup, calls)
        version = "v2" if memory_cgroup.v2 else "v1"
        print(
            f"\n{len(calls)} calls opened before the OOM kill ({version} memory cgroup "
            f"using {used / 2**20:.0f} MiB serving, limit {HEADROOM >> 20} MiB over), {took:.1f} s"
        )
        assert service.proc.returncode is None, "the OOM killer took the supervisor"

        async def replaced() -> dict:
            while True:
                rows = (await service.stats())["workers"]
                if rows and all(r["pid"] != victim["pid"] for r in rows):
                    return rows[0]
                await asyncio.sleep(0.05)

        async with asyncio.timeout(20):
            new = await replaced()
        killed = [e for e in service.log() if e["event"] == OOM_KILLED_WORKER]
        assert [e["pid"] for e in killed] == [victim["pid"]], service.log_tail()
        assert killed[0]["exit_status"] == "killed by SIGKILL from the kernel's OOM killer"
        assert memory_cgroup.path.name in killed[0]["oom_kills_counted_in"]
        assert not [e for e in service.log() if e["event"].startswith("worker died")]
        # Each call lost with it says how in its access line.
        lost = [e for e in service.log() if e.get("worker_pid") == victim["pid"]]
        assert lost and all("the kernel's OOM killer" in e["detail"] for e in lost)
        restarts = metric_samples(await service.metrics())["fleet_ingress_worker_restarts_total"]
        assert restarts[(("reason", "oom"),)] == 1
        assert restarts[(("reason", "killed"),)] == 0
        assert (
            metric_samples(await service.metrics())["fleet_ingress_worker_oom_kills_total"][()] == 1
        )
        code, out = await admin_command(service, "stat")
        assert code == 0 and "oom 1" in out and "OOM killer" in out, out

        # An operator's kill -9 of its replacement: a kill, not the OOM killer's.
        await close_calls(calls)
        os.kill(new["pid"], signal.SIGKILL)
        async with asyncio.timeout(20):
            while True:
                counted = metric_samples(await service.metrics())
                if counted["fleet_ingress_worker_restarts_total"][(("reason", "killed"),)]:
                    break
                await asyncio.sleep(0.05)
        assert counted["fleet_ingress_worker_restarts_total"][(("reason", "oom"),)] == 1
        died = [e for e in service.log() if e["event"].startswith("worker died")]
        assert [(e["pid"], e["exit_status"]) for e in died] == [(new["pid"], "killed by SIGKILL")]
        assert (await service.stats())["worker_restarts"] == {"oom": 1, "killed": 1}
    finally:
        await close_calls(calls)
        await service.finish()


def _make_the_oom_killers_first_choice(pid: int) -> None:
    Path(f"/proc/{pid}/oom_score_adj").write_text("1000")  # raised: no capability needed


async def test_an_old_generation_worker_oom_killed_in_an_upgrade_is_counted(
    tls_files: TLSFiles, big_fleet: SimulatedFleet, memory_cgroup: MemoryCgroup
) -> None:
    """An upgrade is when a memory limit bites (two generations of workers
    side by side: docs/INSTALL.md, Memory), and the old generation, holding
    the calls, is the larger: the OOM killer's likely choice. Such a worker is
    not replaced, so not in fleet_ingress_worker_restarts_total; it is counted
    in fleet_ingress_worker_oom_kills_total (FleetIngressOOMKilled reads it)
    and `stat` says it. Before (the review of session 35): only its line's
    exit_status said it; no counter rose, the alert stayed silent."""
    service = await RunningIngress.start(
        tls_files,
        [f"{big_fleet.url} name=a maxconn={MAX_CALLS + 10}"],
        workers=1,
        check_timeout=5,
        env={"FLEET_INGRESS_TIMEOUTS__UPGRADE_DRAIN": "0"},  # the old one keeps its call
        preexec_fn=memory_cgroup.join,
    )
    calls: list[ClientConnection] = []
    try:
        await fleets_up_or_finished(service)
        (old,) = (await service.stats())["workers"]
        calls.append(
            await connect(service.url("/ws/kept"), ssl=tls_files.client_context(), open_timeout=5)
        )
        os.kill(service.proc.pid, signal.SIGUSR2)
        await service.wait_for("READY=1", count=2, timeout=60)
        assert old["pid"] in memory_cgroup.pids()
        # The old generation the kernel's first choice, as the larger would be.
        _make_the_oom_killers_first_choice(old["pid"])
        await _squeeze(service, tls_files, memory_cgroup, calls)
        assert service.proc.returncode is None, "the OOM killer took the supervisor"
        async with asyncio.timeout(20):
            while not [e for e in service.log() if e["event"] == "old-generation worker exited"]:
                await asyncio.sleep(0.05)
        (exited,) = [e for e in service.log() if e["event"] == "old-generation worker exited"]
        assert exited["pid"] == old["pid"]
        assert exited["exit_status"] == "killed by SIGKILL from the kernel's OOM killer"
        # The kernel may take the new generation's worker too before the limit
        # is lifted (a kill frees what the reaper can; the calls' socket memory
        # stays charged until the process has exited): then it is replaced, and
        # counted as well. What the kernel counted in the group is what must be
        # counted here, each worker once (the supervisor is not among them).
        async with asyncio.timeout(20):
            while len(_oom_killed_workers(service)) < memory_cgroup.oom_kills():
                await asyncio.sleep(0.05)
        killed = _oom_killed_workers(service)
        assert old["pid"] in killed and len(set(killed)) == len(killed) == memory_cgroup.oom_kills()
        counted = metric_samples(await service.metrics())
        assert counted["fleet_ingress_worker_oom_kills_total"][()] == len(killed)
        replaced = len(killed) - 1  # the new generation's, if the kernel took it too
        assert counted["fleet_ingress_worker_restarts_total"][(("reason", "oom"),)] == replaced
        code, out = await admin_command(service, "stat")
        assert code == 0 and "1 worker killed by the kernel's OOM killer" in out, out
        # Carried over the next upgrade (an exec), as every counter is.
        await close_calls(calls)
        os.kill(service.proc.pid, signal.SIGUSR2)
        await service.wait_for("READY=1", count=3, timeout=60)
        counted = metric_samples(await service.metrics())
        assert counted["fleet_ingress_worker_oom_kills_total"][()] == len(killed)
    finally:
        await close_calls(calls)
        await service.finish()


def _oom_killed_workers(service: RunningIngress) -> list[int]:
    """The pids of the workers the service logged as the OOM killer's, an old
    generation's exit or a worker replaced."""
    return [
        e["pid"]
        for e in service.log()
        if e["event"] == OOM_KILLED_WORKER
        or (
            e["event"] == "old-generation worker exited"
            and e.get("exit_status") == "killed by SIGKILL from the kernel's OOM killer"
        )
    ]
