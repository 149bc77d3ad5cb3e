"""Where a process's cgroups are, I/O-free: from the text of /proc/PID/cgroup
and /proc/PID/mountinfo, the cgroup v2 hierarchy and the v1 hierarchy of one
controller ("memory" for the OOM kills' count, service/oom_kills.py; "cpu" for
the CPU quota, core/cpu_quota.py), each mount, the process's path in it, and
where that path is in the file system. A hybrid host has both hierarchies,
with a controller in one of them only; a cgroup namespace's mount shows its
own root, and a path outside that root is not shown (None, or no directory).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Mount", "cgroup_paths", "directories_up", "directory", "mounts"]


@dataclass(frozen=True)
class Mount:
    root: str  # the cgroup path the mount shows as its top (a cgroup namespace's, or /)
    point: str  # where it is mounted


def mounts(mountinfo: str, controller: str) -> tuple[Mount | None, Mount | None]:
    """From /proc/PID/mountinfo: (the cgroup2 mount, the cgroup v1 mount of
    `controller`); None for either not mounted."""
    v2 = v1 = None
    for line in mountinfo.splitlines():
        fields, sep, tail = line.partition(" - ")
        parts, after = fields.split(), tail.split()
        if not sep or len(parts) < 5 or len(after) < 3:
            continue
        mount = Mount(_unescape(parts[3]), _unescape(parts[4]))
        if after[0] == "cgroup2" and v2 is None:
            v2 = mount
        elif after[0] == "cgroup" and controller in after[2].split(",") and v1 is None:
            v1 = mount
    return v2, v1


def cgroup_paths(proc_cgroup: str, controller: str) -> tuple[str | None, str | None]:
    """From /proc/PID/cgroup: (its cgroup v2 path, its path in the v1
    hierarchy of `controller`), each None where the host has no such hierarchy."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            v2 = path
        elif controller in controllers.split(","):
            v1 = path
    return v2, v1


def directory(mount: Mount, path: str) -> str | None:
    """Where cgroup `path` is in the file system under `mount`; None when the
    mount does not show it (a cgroup outside the namespace's root)."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    return (mount.point.rstrip("/") + path[len(root) :]).rstrip("/") or "/"


def directories_up(mount: Mount, path: str) -> list[str]:
    """The directories of cgroup `path` and each group above it, up to the
    mount point; none when the mount does not show it."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return []
    point = mount.point.rstrip("/")
    below = [part for part in path[len(root) :].split("/") if part]
    return ["/".join([point, *below[:depth]]) or "/" for depth in range(len(below), -1, -1)]


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(escaped, plain)
    return text
