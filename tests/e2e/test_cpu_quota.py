"""process.workers = "auto" under a CPU quota (systemd's CPUQuota=): a cpu
cgroup made for the test, the ingress started in it, the workers it forks
counted. On main it read the affinity mask only: 2 workers on this 2-CPU host
for one CPU's worth of time (64 on a 64-CPU host for CPUQuota=200%)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_ingress.config import settings
from fleet_ingress.config.cpus import usable_cpus
from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import load_config
from fleet_ingress.core.cpu_quota import AutoWorkers, CpuQuota, auto_workers
from fleet_ingress.service.supervisor import Supervisor
from fleet_ingress.service.supervisor_process import run_supervisor
from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    UPGRADE_WITHIN,
    CpuCgroup,
    RunningIngress,
    TLSFiles,
    admin_command,
    eventually,
    upgrade_test_timeout,
    write_run_home,
)

ONE_CPU_US = 100_000


@pytest.fixture
def one_cpu_cgroup() -> Iterator[CpuCgroup]:
    """A cpu cgroup with one CPU's worth of time (CPUQuota=100%), removed after."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU in the affinity mask: a quota of one CPU lowers nothing")
    if not CpuCgroup.has_controller():
        pytest.skip("no cpu controller on this host (neither v1 nor in v2's root)")
    try:
        why = CpuCgroup.unavailable()
        if why is not None:
            raise OSError(why)
        group = CpuCgroup.make(ONE_CPU_US)
    except OSError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the host has a cpu controller but no cpu cgroup could be made: {exc}")
        pytest.skip(f"no cpu cgroup could be made: {exc} (CI unset)")
    try:
        yield group
    finally:
        group.remove()


@pytest.mark.uvloop_only  # processes of their own: the test's loop changes nothing here
async def test_auto_workers_follow_the_cgroups_cpu_quota(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet, one_cpu_cgroup: CpuCgroup
) -> None:
    cpus = len(os.sched_getaffinity(0))
    service = await RunningIngress.start(
        tls_files,
        [f"{roomy_fleet.url} name=a"],
        workers="auto",
        preexec_fn=one_cpu_cgroup.join,
    )
    try:
        stats = await service.stats()
        rows = stats["workers"]
        assert len(rows) == 1, f"{len(rows)} workers for one CPU's worth of time ({cpus} CPUs)"
        assert rows[0]["pid"] in one_cpu_cgroup.pids()
        (serving,) = [line for line in service.log() if line.get("event") == "workers serving"]
        assert serving["count"] == f"1 (CPUQuota 100% of {cpus} CPUs)"
        assert stats["workers_from"] == serving["count"]
        code, printed = await asyncio.wait_for(admin_command(service, "stat"), 30)
        assert code == 0 and f"workers wanted: {serving['count']}\n" in printed, printed
        # `check` judges process.workers against the same figure: 3 is past twice one CPU.
        toml = service.home / "ingress-3.toml"
        text = (service.home / "ingress.toml").read_text()
        assert 'workers = "auto"' in text
        toml.write_text(text.replace('workers = "auto"', "workers = 3"))
        check = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fleet_ingress",
            "check",
            "-c",
            str(toml),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=one_cpu_cgroup.join,
        )
        out = (await asyncio.wait_for(check.communicate(), 60))[0].decode()
        assert (
            "process.workers = 3 is more than twice the 1 CPU this process may run on "
            f"(CPUQuota 100% of {cpus} CPUs)" in out
        ), out
    finally:
        await service.finish()


@pytest.mark.uvloop_only
@pytest.mark.timeout(upgrade_test_timeout())
async def test_a_quota_changed_under_a_running_service_is_noted_then_applied_by_an_upgrade(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet, one_cpu_cgroup: CpuCgroup
) -> None:
    """`systemctl set-property CPUQuota=` on a running service: a reload says
    "auto" counts anew (process.workers, "auto" in the file before and after,
    did not change: on main it said it had) and changes nothing; the next
    upgrade's generation has the new count, and stat says where it came from."""
    cpus = len(os.sched_getaffinity(0))
    service = await RunningIngress.start(
        tls_files,
        [f"{roomy_fleet.url} name=a"],
        workers="auto",
        preexec_fn=one_cpu_cgroup.join,
    )
    try:
        assert len((await service.stats())["workers"]) == 1
        # Two CPUs' worth (not lifted: 64 workers on a 64-CPU host): 2 workers.
        one_cpu_cgroup.set_quota(2 * ONE_CPU_US)
        two = auto_workers(cpus, CpuQuota(2 * ONE_CPU_US, ONE_CPU_US, "")).because
        service.proc.send_signal(signal.SIGHUP)
        await service.wait_for("READY=1", count=2)
        (reloaded,) = [e for e in service.log() if e["event"] == "reloaded"]
        changes = reloaded["changes"]
        assert 'process.workers = "auto" counts anew: takes effect at the next' in changes
        assert f"{two}, not the 1 serving" in changes
        assert "process.workers changed" not in changes, changes
        stats = await service.stats()
        assert len(stats["workers"]) == 1 and stats["workers_wanted"] == 1  # nothing acted on it
        code, said = await admin_command(service, "upgrade", timeout=UPGRADE_WITHIN)
        assert code == 0, said
        stats = await service.stats()
        serving = [r for r in stats["workers"] if r["state"] == "serving"]
        assert sorted(r["generation"] for r in serving) == [2, 2], stats["workers"]
        assert stats["workers_from"] == two
    finally:
        await service.finish()


@pytest.mark.uvloop_only
async def test_a_reload_counts_auto_off_the_supervisors_loop(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload counts "auto" anew (its note of a changed quota): that reads
    /proc/self/mountinfo, 30-40 ms on a host of 3000 mounts (a Kubernetes
    node), during which the loop answered no worker's slot request. It is read
    off the loop (a real `run_supervisor` in this process, its worker a process)."""
    counted_on: list[bool] = []  # True: on the loop's thread

    def recording() -> AutoWorkers:
        counted_on.append(threading.current_thread() is threading.main_thread())
        return usable_cpus()

    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=a"], workers="auto")
    config = load_config(tmp_path / "ingress.toml")
    fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
    monkeypatch.chdir(tmp_path)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    supervisor = Supervisor(config, fleets, tmp_path / "ingress.toml")
    running = asyncio.ensure_future(run_supervisor(supervisor))
    try:
        await eventually(
            lambda: (
                0 < supervisor.pool.worker_target == supervisor.pool.serving_workers()
                or running.done()
            ),
            timeout=30,
        )
        assert not running.done(), running.exception()
        monkeypatch.setattr(settings, "usable_cpus", recording)
        await asyncio.wait_for(supervisor.reload(), 30)
        assert counted_on == [False]
    finally:
        supervisor.stop_asked.set()
        try:
            await asyncio.wait_for(running, 30)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            await supervisor.close()
