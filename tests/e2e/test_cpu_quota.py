"""process.workers = "auto" under a CPU quota (systemd's CPUQuota=): a cpu
cgroup made for the test, the ingress started in it, the workers it forks
counted. On main it read the affinity mask only: 2 workers on this 2-CPU host
for one CPU's worth of time (64 on a 64-CPU host for CPUQuota=200%)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fleet_ingress.sim import SimulatedFleet
from tests.support import CpuCgroup, RunningIngress, TLSFiles

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
        rows = (await service.stats())["workers"]
        assert len(rows) == 1, f"{len(rows)} workers for one CPU's worth of time ({cpus} CPUs)"
        assert rows[0]["pid"] in one_cpu_cgroup.pids()
        (serving,) = [line for line in service.log() if line.get("event") == "workers serving"]
        assert serving["count"] == f"1 (CPUQuota 100% of {cpus} CPUs)"
    finally:
        await service.finish()
