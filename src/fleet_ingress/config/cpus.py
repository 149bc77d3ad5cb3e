"""The CPUs this process may run on, for process.workers = "auto", the check's
warning of workers past them and an upgrade's batches: its affinity mask, and
its cgroup's CPU quota (core.cpu_quota) read from /proc and /sys/fs/cgroup."""

from __future__ import annotations

import os

from fleet_ingress.config.cgroup_files import find_directory
from fleet_ingress.core.cpu_quota import AutoWorkers, CpuQuota, auto_workers, cpu_quota_found


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(4096)
    except OSError:
        return None


def own_cpu_quota() -> CpuQuota | None:
    """This process's cgroup's quota (the tightest along its path); None
    where there is none or /proc cannot be read."""
    return own_cpu_quota_found()[0]


def own_cpu_quota_found() -> tuple[CpuQuota | None, str | None]:
    """`own_cpu_quota`, and why its cgroup's files could not be found (a
    cgroup namespace over the host's cgroupfs), if so."""
    proc_cgroup, mountinfo = _read_all("/proc/self/cgroup"), _read_all("/proc/self/mountinfo")
    if proc_cgroup is None or mountinfo is None:
        return None, None
    return cpu_quota_found(
        proc_cgroup, mountinfo, _read, lambda mount, path: find_directory(mount, path, "cpu")
    )


def _read_all(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def usable_cpus() -> AutoWorkers:
    """How many CPUs' worth this process may use, and why ("2 (CPUQuota 200%
    of 64 CPUs)")."""
    return auto_workers(len(os.sched_getaffinity(0)), *own_cpu_quota_found())
