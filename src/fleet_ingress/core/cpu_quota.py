"""The CPU quota of a process's cgroup (systemd's CPUQuota=, a container's
--cpus), I/O-free: the caller hands over /proc/self/cgroup, /proc/self/mountinfo
and a reader of the cgroup files. process.workers = "auto" takes
ceil(quota / period) of it, never more than the affinity mask, as Go's
automaxprocs and the JDK's container support do: 64 workers sharing two CPUs'
worth of time each cost a Python process's memory for no more calls.

v2: cpu.max ("200000 100000", "max 100000"); v1: cpu.cfs_quota_us (-1: none)
and cpu.cfs_period_us of the hierarchy the cpu controller is mounted on; a
hybrid host has the controller in one of them only, and both are read. A quota
on a parent holds its children too: the smallest along the path counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fleet_ingress.core.cgroups import (
    Mount,
    cgroup_paths,
    directories_from,
    directory,
    hidden,
    mounts,
)

# Reads a cgroup file by its absolute path; None when it is not there (or not readable).
Reader = Callable[[str], "str | None"]
# Where a cgroup is under a mount: (its directory, None), or (None, why it is not found).
Finder = Callable[[Mount, str], "tuple[str | None, str | None]"]


def _by_name(mount: Mount, path: str) -> tuple[str | None, str | None]:
    where = directory(mount, path)
    return (where, None) if where is not None else (None, hidden(mount, path))


@dataclass(frozen=True)
class CpuQuota:
    quota: int  # microseconds of CPU time a period
    period: int  # microseconds
    cgroup: str  # the directory whose limit it is

    @property
    def cpus(self) -> int:
        """The CPUs' worth of time it allows, rounded up, at least 1."""
        return max(1, math.ceil(self.quota / self.period))

    @property
    def percent(self) -> float:
        """As systemd's CPUQuota= writes it (200 for two CPUs)."""
        return self.quota * 100 / self.period


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _v2_quota(directory: str, read: Reader) -> CpuQuota | None:
    text = read(directory + "/cpu.max")
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = _int(parts[0]), _int(parts[1])
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return CpuQuota(quota, period, directory)


def _v1_quota(directory: str, read: Reader) -> CpuQuota | None:
    quota = _int(read(directory + "/cpu.cfs_quota_us"))
    period = _int(read(directory + "/cpu.cfs_period_us"))
    if quota is None or period is None or quota <= 0 or period <= 0:  # -1: no quota
        return None
    return CpuQuota(quota, period, directory)


def cpu_quota(proc_cgroup: str, mountinfo: str, read: Reader) -> CpuQuota | None:
    """The tightest CPU quota on this process's cgroup and its parents, in
    either hierarchy; None when there is none (or none can be read)."""
    return cpu_quota_found(proc_cgroup, mountinfo, read)[0]


def cpu_quota_found(
    proc_cgroup: str, mountinfo: str, read: Reader, find: Finder = _by_name
) -> tuple[CpuQuota | None, str | None]:
    """`cpu_quota`, and why the cgroup's files could not be read where the
    cgroup holding the cpu controller was not found (`core.cgroups.hidden`):
    then a quota there is not known, not none."""
    v2_mount, v1_mount = mounts(mountinfo, "cpu")
    v2_path, v1_path = cgroup_paths(proc_cgroup, "cpu")
    found: list[CpuQuota] = []
    unseen: list[str] = []
    for mount, path, one in (
        (v2_mount, v2_path, _v2_quota),
        (v1_mount, v1_path, _v1_quota),
    ):
        if mount is None or path is None:
            continue
        where, why = find(mount, path)
        if where is None:
            if why is not None:
                unseen.append(why)
            continue
        for each in directories_from(mount, where):
            if (quota := one(each, read)) is not None:
                found.append(quota)
    # The smallest share of time, not the smallest ceil: 150% is tighter than 190%.
    tightest = min(found, key=lambda q: q.quota / q.period, default=None)
    return tightest, "; ".join(unseen) or None


@dataclass(frozen=True)
class AutoWorkers:
    """process.workers = "auto" resolved, and why (for the start log and stat)."""

    count: int
    quota: str | None = None  # "CPUQuota 200% of 64 CPUs" when the quota set the count
    # Why the cgroup's CPU quota could not be read (its cgroup not found): said, not taken for none.
    unseen: str | None = None

    @property
    def because(self) -> str:
        """ "2 (CPUQuota 200% of 64 CPUs)", "8 (the CPUs of its affinity mask)"."""
        why = self.quota or "the CPUs of its affinity mask"
        if self.unseen:
            why += f"; its CPU quota, if any, could not be read: {self.unseen}"
        return f"{self.count} ({why})"


def auto_workers(affinity: int, quota: CpuQuota | None, unseen: str | None = None) -> AutoWorkers:
    """One worker per CPU it may run on: the affinity mask's, fewer when the
    cgroup's quota allows less time than those CPUs have."""
    affinity = max(1, affinity)
    if quota is not None and quota.cpus < affinity:
        return AutoWorkers(quota.cpus, f"CPUQuota {quota.percent:g}% of {affinity} CPUs", unseen)
    return AutoWorkers(affinity, None, unseen)
