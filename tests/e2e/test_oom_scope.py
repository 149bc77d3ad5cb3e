"""Which SIGKILL is the OOM killer's where the kernel's count is not the
service's own (service/oom_kills.py), and a cgroup namespace over the host's
cgroupfs (config/cgroup_files.py): real cgroups, a real OOM kill of a process
outside the service, then an operator's kill -9 of a worker within
OOM_CREDIT_S of it.

- In a cgroup namespace of its own over the host's cgroupfs (mountinfo's root
  "/.."), the supervisor found no memory cgroup on main and read the host's
  /proc/vmstat without a word: the kill -9 read as the OOM killer's
  (restarts {"oom": 1}). Its group found by its pid: "killed" (the kernel's
  log made unreadable there, so that the count found decides).
- With no memory cgroup to read at all (a mount namespace without the memory
  hierarchy), the host's count is all there is: where the kernel's log can be
  read (root, the host's pid namespace) it names the pid the OOM killer took,
  and the kill -9 is "killed" (on main "oom"); where it cannot (no
  CAP_SYSLOG), the kill -9 is "possibly" the OOM killer's, said so, not
  asserted (on main asserted). A worker truly OOM-killed there is named by
  the kernel's log.
- The CPU quota behind such a namespace: "auto" counted every CPU on main.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from fleet_ingress.service.oom_kills import KernelLog
from fleet_ingress.service.oom_verdict import OOM_KILLED_WORKER, OOM_POSSIBLY_KILLED_WORKER
from fleet_ingress.sim import SimulatedFleet
from tests.e2e import test_oom_kill
from tests.support import (
    CpuCgroup,
    MemoryCgroup,
    RunningIngress,
    TLSFiles,
    admin_command,
    close_calls,
    metric_samples,
)

pytestmark = [pytest.mark.uvloop_only, pytest.mark.alone]

big_fleet = test_oom_kill.big_fleet  # the fleet of MAX_CALLS a worker is squeezed with
MAX_CALLS = test_oom_kill.MAX_CALLS

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
MS_REC, MS_PRIVATE, MNT_DETACH = 0x4000, 1 << 18, 2
PR_CAPBSET_DROP, CAP_SYS_ADMIN, CAP_SYSLOG = 24, 21, 34
_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")


def _in_cgroup_namespace(
    join: Callable[[], None], *, kernel_log: bool = True
) -> Callable[[], None]:
    """A preexec_fn: into the group, then a cgroup namespace rooted there,
    the host's cgroupfs left mounted (a container with the host's
    /sys/fs/cgroup); without `kernel_log`, the kernel's log not readable
    (`_drop_kernel_log`): the count alone decides."""

    def preexec() -> None:
        join()
        _unshare(CLONE_NEWCGROUP)
        if not kernel_log:
            _drop_kernel_log()

    return preexec


def _without_memory_hierarchy() -> None:
    """A preexec_fn: a mount namespace without the memory controller's mounts
    (the cgroup v2 tree too)."""
    _unshare(CLONE_NEWNS)
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    with open("/proc/self/mountinfo") as f:
        points = [
            line.split()[4]
            for line in f
            if (" - cgroup " in line and "memory" in line.split(" - ")[1].split()[2].split(","))
            or " - cgroup2 " in line
        ]
    for point in points:
        _libc.umount2(point.encode(), MNT_DETACH)


def _without_kernel_log() -> None:
    """A preexec_fn: `_without_memory_hierarchy`, and no CAP_SYSLOG (nor
    CAP_SYS_ADMIN, which the kernel still takes for it) after the exec: the
    kernel's log cannot be read (kernel.dmesg_restrict = 1), as under the
    shipped unit (User=, ProtectKernelLogs=)."""
    _without_memory_hierarchy()
    _drop_kernel_log()


def _drop_kernel_log() -> None:
    for cap in (CAP_SYSLOG, CAP_SYS_ADMIN):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def groups() -> Iterator[list[MemoryCgroup]]:
    why = MemoryCgroup.unavailable()
    if why is not None:
        pytest.skip(why)
    made: list[MemoryCgroup] = []
    yield made
    for group in made:
        group.remove()


def _oom_kill_elsewhere(group: MemoryCgroup) -> None:
    """A process outside the service OOM-killed in a group of its own (32 MiB)."""
    group.limit(32 << 20)
    done = subprocess.run(
        [sys.executable, "-c", "b = b'x' * (256 << 20)"],
        preexec_fn=group.join,
        timeout=30,
        capture_output=True,
    )
    assert done.returncode == -signal.SIGKILL and group.oom_kills() == 1, done


async def _kill_9_a_worker(service: RunningIngress) -> dict:
    """An operator's kill -9 of the worker; its replacement's restarts read."""
    (worker,) = (await service.stats())["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    async with asyncio.timeout(20):
        while True:
            stats = await service.stats()
            if sum(stats["worker_restarts"].values()):
                return stats
            await asyncio.sleep(0.05)


async def _a_kill_9_beside_an_oom_kill_elsewhere_is_said_killed(
    service: RunningIngress, other: MemoryCgroup
) -> None:
    """An OOM kill in `other`, then an operator's kill -9 of the service's
    worker: a restart "killed", no word of the OOM killer in the log or stat."""
    _oom_kill_elsewhere(other)
    stats = await _kill_9_a_worker(service)
    assert stats["worker_restarts"] == {"killed": 1}, service.log_tail()
    assert not [e for e in service.log() if "OOM killer" in e["event"]]
    code, out = await admin_command(service, "stat")
    assert code == 0 and "OOM kills read from" not in out, out


async def test_a_kill_9_beside_an_oom_kill_elsewhere_in_a_cgroup_namespace(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet, groups: list[MemoryCgroup]
) -> None:
    service_group, other = MemoryCgroup.make(v1=True), MemoryCgroup.make(v1=True)
    groups += [service_group, other]
    service = await RunningIngress.start(
        tls_files,
        [f"{roomy_fleet.url} name=a"],
        workers=1,
        # The kernel's log unread: the service's own group's count decides, found.
        preexec_fn=_in_cgroup_namespace(service_group.join, kernel_log=False),
    )
    try:
        assert service.proc.pid in service_group.pids()
        await _a_kill_9_beside_an_oom_kill_elsewhere_is_said_killed(service, other)
    finally:
        await service.finish()


def _kernel_log_readable() -> bool:
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC


async def test_a_kill_9_where_only_the_hosts_count_is_read_is_named_by_the_kernels_log(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet, groups: list[MemoryCgroup]
) -> None:
    if not _kernel_log_readable():
        pytest.skip("the kernel's log (/dev/kmsg) cannot be read here")
    other = MemoryCgroup.make(v1=True)
    groups.append(other)
    service = await RunningIngress.start(
        tls_files,
        [f"{roomy_fleet.url} name=a"],
        workers=1,
        preexec_fn=_without_memory_hierarchy,
    )
    try:
        await _a_kill_9_beside_an_oom_kill_elsewhere_is_said_killed(service, other)
    finally:
        await service.finish()


async def test_a_worker_oom_killed_where_only_the_hosts_count_is_read_is_named_so(
    tls_files: TLSFiles, big_fleet: SimulatedFleet, groups: list[MemoryCgroup]
) -> None:
    if not _kernel_log_readable():
        pytest.skip("the kernel's log (/dev/kmsg) cannot be read here")
    group = MemoryCgroup.make(v1=True)
    groups.append(group)

    def preexec() -> None:
        group.join()
        _without_memory_hierarchy()

    service = await RunningIngress.start(
        tls_files,
        [f"{big_fleet.url} name=a maxconn={MAX_CALLS + 10}"],
        workers=1,
        check_timeout=5,
        preexec_fn=preexec,
    )
    calls: list = []
    try:
        (victim,) = (await service.stats())["workers"]
        await test_oom_kill._squeeze(service, tls_files, group, calls)
        async with asyncio.timeout(20):
            while not sum((await service.stats())["worker_restarts"].values()):
                await asyncio.sleep(0.05)
        killed = [e for e in service.log() if "OOM killer" in e["event"]]
        assert [(e["event"], e["pid"]) for e in killed] == [(OOM_KILLED_WORKER, victim["pid"])]
        assert killed[0]["oom_kill_logged"] is True
        assert "/proc/vmstat" in killed[0]["oom_kills_counted_in"]
        assert (await service.stats())["worker_restarts"] == {"oom": 1}
    finally:
        await close_calls(calls)
        await service.finish()


async def test_a_kill_9_where_only_the_hosts_count_is_read_is_possibly_the_oom_killers(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet, groups: list[MemoryCgroup]
) -> None:
    other = MemoryCgroup.make(v1=True)
    groups.append(other)
    service = await RunningIngress.start(
        tls_files,
        [f"{roomy_fleet.url} name=a"],
        workers=1,
        preexec_fn=_without_kernel_log,
    )
    try:
        _oom_kill_elsewhere(other)
        stats = await _kill_9_a_worker(service)
        # Counted as the alert reads it (a real OOM kill there looks the same)...
        assert stats["worker_restarts"] == {"oom": 1}, service.log_tail()
        # ...but said as what it is: possibly.
        said = [e for e in service.log() if "OOM killer" in e["event"]]
        assert [e["event"] for e in said] == [OOM_POSSIBLY_KILLED_WORKER], said
        assert OOM_KILLED_WORKER not in [e["event"] for e in service.log()]
        assert said[0]["exit_status"] == "killed by SIGKILL, possibly from the kernel's OOM killer"
        assert "/proc/vmstat" in said[0]["oom_kills_counted_in"]
        assert said[0]["oom_kill_logged"] is False
        code, out = await admin_command(service, "stat")
        assert code == 0 and "OOM kills read from the whole host (/proc/vmstat" in out, out
        assert metric_samples(await service.metrics())["fleet_ingress_worker_oom_kills_total"][()]
    finally:
        await service.finish()


def test_the_cpu_quota_behind_a_cgroup_namespace_counts() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU in the affinity mask: a quota of one CPU lowers nothing")
    why = CpuCgroup.unavailable()
    if why is not None:
        pytest.skip(why)
    group = CpuCgroup.make(100_000)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fleet_ingress.config.cpus import usable_cpus; print(usable_cpus().because)",
            ],
            preexec_fn=_in_cgroup_namespace(group.join),
            timeout=60,
            capture_output=True,
            text=True,
        )
        cpus = len(os.sched_getaffinity(0))
        assert done.stdout.strip() == f"1 (CPUQuota 100% of {cpus} CPUs)", done
    finally:
        group.remove()


def test_the_kernels_log_is_read_on_from_where_the_image_before_left_it() -> None:
    """An OOM kill logged between one image's last read and the next one's
    start (an upgrade's exec, a supervisor's crash) is read by the next, from
    the sequence number carried (`kmsg_seq`); one starting afresh reads from
    the end and does not see it."""
    if not _kernel_log_readable():
        pytest.skip("the kernel's log (/dev/kmsg) cannot be read here")
    why = MemoryCgroup.unavailable()
    if why is not None:
        pytest.skip(why)
    before = KernelLog()
    carried = before.last_seq
    before.close()
    group = MemoryCgroup.make(v1=True)
    try:
        group.limit(32 << 20)
        proc = subprocess.Popen(
            [sys.executable, "-c", "b = b'x' * (256 << 20)"], preexec_fn=group.join
        )
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        group.remove()
    now = time.monotonic()
    afresh, next_image = KernelLog(), KernelLog()
    next_image.rewind(carried, now)
    try:
        assert not afresh.killed(proc.pid, now)
        assert next_image.killed(proc.pid, now) and next_image.complete
        assert not next_image.killed(proc.pid, now)  # once
    finally:
        afresh.close()
        next_image.close()
