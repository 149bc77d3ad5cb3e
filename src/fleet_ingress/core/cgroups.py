"""Where a process's cgroups are, I/O-free: from the text of /proc/PID/cgroup
and /proc/PID/mountinfo, the cgroup v2 hierarchy and the v1 hierarchy of one
controller ("memory" for the OOM kills' count, service/oom_kills.py; "cpu" for
the CPU quota, core/cpu_quota.py), each mount, the process's path in it, and
where that path is in the file system. A hybrid host has both hierarchies,
with a controller in one of them only; a cgroup namespace's mount shows its
own root, and a path outside that root is not shown (None, or no directory).

A cgroup namespace over a cgroupfs mounted outside it (a container with its
own cgroup namespace and the host's /sys/fs/cgroup bound in) shows the mount's
top as "/.." (one group above the namespace's root; "/../.." two) and the
process's path from the namespace's root ("/"): the groups between are not
named anywhere. `hidden` says so; `locate` finds them by the process's pid in
the cgroup.procs of the groups that deep (I/O through the caller's readers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Mount",
    "above_namespace",
    "cgroup_paths",
    "directories_from",
    "directories_up",
    "directory",
    "hidden",
    "locate",
    "mounts",
]


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


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def above_namespace(mount: Mount, path: str) -> tuple[int, list[str]] | None:
    """When `mount`'s top is groups above the cgroup namespace's root that
    `path` is read from (mountinfo's root "/..", "/../.."): how many, and
    `path` below that root; None when the mount shows `path` by name or not
    at all."""
    root, own = _parts(mount.root), _parts(path)
    common = 0
    while common < min(len(root), len(own)) and root[common] == own[common]:
        common += 1
    up, below = root[common:], own[common:]
    if not up or any(part != ".." for part in up) or ".." in below:
        return None
    return len(up), below


def hidden(mount: Mount, path: str) -> str | None:
    """Why `directory(mount, path)` finds no directory, as check and stat say
    it; None when it does."""
    if directory(mount, path) is not None:
        return None
    if above_namespace(mount, path) is not None:
        return (
            f"a cgroup namespace over a cgroupfs mounted outside it: /proc/self/cgroup says "
            f"{path}, the mount at {mount.point} starts at {mount.root} above it, and the "
            "groups between are not named (the host's /sys/fs/cgroup bound into a container "
            "with its own cgroup namespace)"
        )
    return (
        f"its cgroup {path} is not under what the cgroupfs mounted at {mount.point} shows "
        f"({mount.root}): a cgroup namespace's mount, the process moved out of it"
    )


# Groups read at most, each a cgroup.procs (a Kubernetes node: thousands of pods' groups).
LOCATE_LIMIT = 5000


def locate(
    mount: Mount,
    path: str,
    pid: int,
    subdirectories: Callable[[str], list[str]],
    read: Callable[[str], str | None],
    limit: int = LOCATE_LIMIT,
) -> tuple[str | None, str | None]:
    """Where `path` is under a mount whose top is above its namespace's root
    (`above_namespace`): (the one directory that deep whose group `path`
    holds process `pid` (as this process's pid namespace numbers it), None);
    (None, None) when none or more than one does; (None, why) when more than
    `limit` groups were to be looked through (not looked for: said so)."""
    found = above_namespace(mount, path)
    if found is None:
        return None, None
    up, below = found
    level = [mount.point.rstrip("/")]
    for depth in range(1, up + 1):
        level = [f"{where}/{name}" for where in level for name in subdirectories(where or "/")]
        if len(level) > limit:
            return None, (
                f"not looked for by this process's pid: {len(level)} groups {depth} "
                f"level{'s' if depth > 1 else ''} below {mount.point}, more than the "
                f"{limit} read at most (the limit reached)"
            )
    matches = []
    for where in level:
        candidate = "/".join([where, *below])
        procs = read(candidate + "/cgroup.procs")
        if procs is not None and str(pid) in procs.split():
            matches.append(candidate)
    return (matches[0] if len(matches) == 1 else None), None


def directories_from(mount: Mount, where: str) -> list[str]:
    """`where` (a directory under `mount`) and each above it up to the mount point."""
    point = mount.point.rstrip("/")
    below = _parts(where[len(point) :])
    return ["/".join([point, *below[:depth]]) or "/" for depth in range(len(below), -1, -1)]


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(escaped, plain)
    return text
