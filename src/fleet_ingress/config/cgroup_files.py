"""Where this process's cgroup is in the file system, reading it: the one
place core/cgroups.py's I/O-free answers meet /proc and /sys/fs/cgroup, for
the CPU quota (config/cpus.py) and the OOM kills' count (service/oom_kills.py).

A cgroup namespace over a cgroupfs mounted outside it (the host's
/sys/fs/cgroup bound into a container with a cgroup namespace of its own)
names neither the process's groups nor those above them: they are looked
for by this process's pid (`core.cgroups.locate`); when that finds none,
the reason is said (check, stat, the start log), not a quota of none or the
host's count taken for the service's.
"""

from __future__ import annotations

import os

from fleet_ingress.core.cgroups import Mount, directory, hidden, locate


def read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def subdirectories(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def find_directory(
    mount: Mount, path: str, controller: str, pid: int | None = None
) -> tuple[str | None, str | None]:
    """(the directory of cgroup `path` under `mount`, None) where it is
    found, else (None, why not); (None, None) for a cgroup v2 mount without
    `controller` (a hybrid host's, whose controller is in v1): nothing missed."""
    if (where := directory(mount, path)) is not None:
        return where, None
    top = read(mount.point.rstrip("/") + "/cgroup.controllers")
    if top is not None and controller not in top.split():
        return None, None
    found, too_many = locate(mount, path, os.getpid() if pid is None else pid, subdirectories, read)
    if found is not None:
        return found, None
    why = hidden(mount, path)
    return None, why if too_many is None or why is None else f"{why}; {too_many}"


def in_initial_cgroup_namespace() -> bool:
    """Whether this process's cgroup namespace is the host's (a cgroup path
    of "/" then is the whole host's root group, not a container's)."""
    try:
        return os.stat("/proc/self/ns/cgroup").st_ino == 0xEFFFFFFB  # PROC_CGROUP_INIT_INO
    except OSError:
        return True
