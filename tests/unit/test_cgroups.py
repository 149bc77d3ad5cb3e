"""Where a process's cgroups are (core/cgroups.py): /proc/PID/cgroup and
/proc/PID/mountinfo's text in, mounts, paths and directories out, for the
memory controller (the OOM kills' count) and the cpu controller (the CPU
quota) alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet_ingress.core.cgroups import (
    Mount,
    above_namespace,
    cgroup_paths,
    directories_from,
    directories_up,
    directory,
    hidden,
    locate,
    mounts,
)
from tests.unit.test_oom_kills import HYBRID_CGROUP, HYBRID_MOUNTS, UNIFIED_CGROUP, UNIFIED_MOUNTS


@pytest.mark.parametrize(
    ("proc_cgroup", "paths"),
    [
        (UNIFIED_CGROUP, ("/system.slice/fleet-ingress.service", None)),
        (HYBRID_CGROUP, ("/", "/process_api/4043")),
        ("5:memory,hugetlb:/x\n", (None, "/x")),  # v1 alone, controllers comounted
        ("3:cpu:/\n", (None, None)),
        ("", (None, None)),
    ],
)
def test_the_cgroup_paths_of_a_process(
    proc_cgroup: str, paths: tuple[str | None, str | None]
) -> None:
    assert cgroup_paths(proc_cgroup, "memory") == paths


def test_the_mounts_of_cgroup2_and_of_v1_memory() -> None:
    assert mounts(UNIFIED_MOUNTS, "memory") == (Mount("/", "/sys/fs/cgroup"), None)
    assert mounts(HYBRID_MOUNTS, "memory") == (
        Mount("/", "/sys/fs/cgroup/unified"),
        Mount("/", "/sys/fs/cgroup/memory"),
    )
    escaped = "40 31 0:37 /a\\040b /mnt/c\\040g rw - cgroup2 cgroup2 rw\n"
    assert mounts(escaped, "memory") == (Mount("/a b", "/mnt/c g"), None)
    assert mounts("garbage\n\n1 2 3\n", "memory") == (None, None)


def test_the_cpu_controllers_v1_mount_and_path_are_its_own() -> None:
    assert mounts(HYBRID_MOUNTS, "cpu") == (
        Mount("/", "/sys/fs/cgroup/unified"),
        Mount("/", "/sys/fs/cgroup/cpu"),
    )
    assert cgroup_paths(HYBRID_CGROUP, "cpu") == ("/", "/")
    assert cgroup_paths("1:cpu,cpuacct:/a/b\n", "cpu") == (None, "/a/b")
    assert cgroup_paths("1:cpuacct:/a/b\n", "cpu") == (None, None)  # not "cpu" itself


def test_a_path_and_its_directories_as_the_mount_shows_them() -> None:
    host = Mount("/", "/sys/fs/cgroup")
    assert directory(host, "/system.slice/x.service") == "/sys/fs/cgroup/system.slice/x.service"
    assert directory(host, "/") == "/sys/fs/cgroup"
    assert directories_up(host, "/a/b") == [
        "/sys/fs/cgroup/a/b",
        "/sys/fs/cgroup/a",
        "/sys/fs/cgroup",
    ]
    namespace = Mount("/kubepods/pod1", "/sys/fs/cgroup")
    assert directory(namespace, "/kubepods/pod1/c1") == "/sys/fs/cgroup/c1"
    assert directories_up(namespace, "/kubepods/pod1/c1") == ["/sys/fs/cgroup/c1", "/sys/fs/cgroup"]
    # Outside the namespace's root, or a name that only begins like it: not shown.
    assert directory(namespace, "/elsewhere") is None
    assert directory(namespace, "/kubepods/pod10") is None
    assert directories_up(namespace, "/kubepods/pod10/c") == []


def test_a_mount_from_outside_the_namespace_is_told_and_its_groups_found_by_pid() -> None:
    # The host's /sys/fs/cgroup/memory bound into a container whose cgroup
    # namespace is /docker/c1: its mountinfo root is "/../..", its path "/".
    mount = Mount("/../..", "/sys/fs/cgroup/memory")
    assert directory(mount, "/") is None
    assert above_namespace(mount, "/") == (2, [])
    assert above_namespace(mount, "/sub") == (2, ["sub"])
    why = hidden(mount, "/")
    assert why is not None and "cgroup namespace over a cgroupfs mounted outside it" in why
    tree = {
        "/sys/fs/cgroup/memory": ["docker", "system.slice"],
        "/sys/fs/cgroup/memory/docker": ["c1", "c2"],
        "/sys/fs/cgroup/memory/system.slice": ["a.service"],
    }
    procs = {
        "/sys/fs/cgroup/memory/docker/c1/cgroup.procs": "1\n7\n",
        "/sys/fs/cgroup/memory/docker/c2/cgroup.procs": "3\n",
        "/sys/fs/cgroup/memory/system.slice/a.service/cgroup.procs": "70\n",
    }
    found, _ = locate(mount, "/", 7, lambda d: tree.get(d, []), procs.get)
    assert found == "/sys/fs/cgroup/memory/docker/c1"
    assert locate(mount, "/", 8, lambda d: tree.get(d, []), procs.get) == (None, None)
    over, why = locate(mount, "/", 7, lambda d: tree.get(d, []), procs.get, limit=2)
    assert over is None and why is not None and "the limit reached" in why
    assert found is not None
    assert directories_from(mount, found) == [
        "/sys/fs/cgroup/memory/docker/c1",
        "/sys/fs/cgroup/memory/docker",
        "/sys/fs/cgroup/memory",
    ]
    # Shown by name (the process moved out of its namespace, the mount higher still): found.
    assert directory(Mount("/../..", "/m"), "/../../x") == "/m/x"
    assert above_namespace(Mount("/../..", "/m"), "/../../x") is None
    # A sibling's subtree: neither shown nor above.
    assert above_namespace(Mount("/../other", "/m"), "/") is None
    assert "is not under" in (hidden(Mount("/../other", "/m"), "/") or "")


def test_a_walk_past_the_limit_says_the_limit_was_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More groups that deep than `locate` reads: not looked for, and the
    reason check, stat's workers wanted and the OOM log's
    oom_kills_counted_in give says the limit was reached (on main it said
    only that the groups between are not named, as if none held the pid)."""
    from fleet_ingress.config import cgroup_files
    from fleet_ingress.core import cgroups

    for pod in ("docker/c1", "docker/c2", "docker/c3", "system.slice/a.service"):
        (tmp_path / pod).mkdir(parents=True)
    (tmp_path / "docker/c1/cgroup.procs").write_text("1\n7\n")
    mount = Mount("/../..", str(tmp_path))
    where, why = cgroup_files.find_directory(mount, "/", "memory", pid=7)
    assert (where, why) == (str(tmp_path / "docker/c1"), None)
    monkeypatch.setattr(cgroup_files, "locate", _limited(cgroups.locate, 3))
    where, why = cgroup_files.find_directory(mount, "/", "memory", pid=7)
    assert where is None and why is not None
    assert "cgroup namespace over a cgroupfs mounted outside it" in why
    assert "4 groups 2 levels below" in why and "the limit reached" in why


def _limited(locate_: Callable[..., Any], limit: int) -> Callable[..., Any]:
    return lambda *args: locate_(*args, limit=limit)
