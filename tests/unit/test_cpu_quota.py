"""process.workers = "auto" and the cgroup's CPU quota (core.cpu_quota):
v1, v2, hybrid, "max", a quota on a parent, files missing."""

from __future__ import annotations

import pytest

from fleet_ingress.core.cpu_quota import CpuQuota, auto_workers, cpu_quota, cpu_quota_found

V2_ONLY = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1 = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
)
HYBRID = V1 + "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
UNIT = "/system.slice/fleet-ingress.service"


def reader(files: dict[str, str]):
    return files.get


def test_v2_quota_of_the_unit() -> None:
    files = {f"/sys/fs/cgroup{UNIT}/cpu.max": "200000 100000\n"}
    quota = cpu_quota(f"0::{UNIT}\n", V2_ONLY, reader(files))
    assert quota == CpuQuota(200000, 100000, f"/sys/fs/cgroup{UNIT}")
    assert quota.cpus == 2 and quota.percent == 200


def test_v2_max_is_no_quota() -> None:
    files = {f"/sys/fs/cgroup{UNIT}/cpu.max": "max 100000\n"}
    assert cpu_quota(f"0::{UNIT}\n", V2_ONLY, reader(files)) is None


def test_v1_quota_and_minus_one() -> None:
    proc = f"4:memory:{UNIT}\n3:cpu,cpuacct:{UNIT}\n0::{UNIT}\n"
    base = f"/sys/fs/cgroup/cpu,cpuacct{UNIT}"
    files = {f"{base}/cpu.cfs_quota_us": "150000\n", f"{base}/cpu.cfs_period_us": "100000\n"}
    quota = cpu_quota(proc, V1, reader(files))
    assert quota is not None and quota.cpus == 2 and quota.percent == 150
    files[f"{base}/cpu.cfs_quota_us"] = "-1\n"
    assert cpu_quota(proc, V1, reader(files)) is None


def test_hybrid_reads_the_hierarchy_the_cpu_controller_is_on() -> None:
    # On a hybrid host the cpu controller is v1's; the v2 tree has no cpu.max.
    proc = f"3:cpu,cpuacct:{UNIT}\n0::{UNIT}\n"
    base = f"/sys/fs/cgroup/cpu,cpuacct{UNIT}"
    files = {
        f"{base}/cpu.cfs_quota_us": "50000",
        f"{base}/cpu.cfs_period_us": "100000",
        f"/sys/fs/cgroup/unified{UNIT}/cgroup.procs": "1\n",
    }
    quota = cpu_quota(proc, HYBRID, reader(files))
    assert quota is not None and quota.cpus == 1  # half a CPU: still one worker
    # And one on the v2 side too (a controller moved): the tighter counts.
    files[f"/sys/fs/cgroup/unified{UNIT}/cpu.max"] = "30000 100000"
    quota = cpu_quota(proc, HYBRID, reader(files))
    assert quota is not None and quota.quota == 30000


def test_a_parent_quota_holds_the_child_the_smallest_along_the_path() -> None:
    files = {
        "/sys/fs/cgroup/ingress.slice/cpu.max": "300000 100000",
        "/sys/fs/cgroup/ingress.slice/fleet-ingress.service/cpu.max": "max 100000",
    }
    proc = "0::/ingress.slice/fleet-ingress.service\n"
    quota = cpu_quota(proc, V2_ONLY, reader(files))
    assert quota == CpuQuota(300000, 100000, "/sys/fs/cgroup/ingress.slice")
    files["/sys/fs/cgroup/ingress.slice/fleet-ingress.service/cpu.max"] = "400000 100000"
    assert cpu_quota(proc, V2_ONLY, reader(files)).cpus == 3  # type: ignore[union-attr]
    files["/sys/fs/cgroup/ingress.slice/fleet-ingress.service/cpu.max"] = "150000 100000"
    assert cpu_quota(proc, V2_ONLY, reader(files)).cpus == 2  # type: ignore[union-attr]


def test_a_tighter_share_wins_over_a_shorter_period() -> None:
    # 190% (ceil 2) and 150% (ceil 2): the smaller share, not the first found.
    files = {
        "/sys/fs/cgroup/a/cpu.max": "150000 100000",
        "/sys/fs/cgroup/a/b/cpu.max": "19000 10000",
    }
    quota = cpu_quota("0::/a/b\n", V2_ONLY, reader(files))
    assert quota is not None and quota.percent == 150


def test_a_namespaced_mount_root_maps_to_the_mount_point() -> None:
    # A container without a cgroup namespace: the mount shows its own cgroup.
    mountinfo = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n"
    files = {
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "200000",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
    }
    quota = cpu_quota("3:cpu,cpuacct:/docker/abc\n", mountinfo, reader(files))
    assert quota is not None and quota.cpus == 2
    # A cgroup outside what the mount shows: nothing read, no guess.
    assert cpu_quota("3:cpu,cpuacct:/other\n", mountinfo, reader(files)) is None


@pytest.mark.parametrize(
    ("proc", "mountinfo", "files"),
    [
        ("", V2_ONLY, {}),
        (f"0::{UNIT}\n", "", {}),
        (f"0::{UNIT}\n", V2_ONLY, {}),  # no cpu controller enabled: no cpu.max
        (f"0::{UNIT}\n", V2_ONLY, {f"/sys/fs/cgroup{UNIT}/cpu.max": "garbage"}),
        (f"0::{UNIT}\n", V2_ONLY, {f"/sys/fs/cgroup{UNIT}/cpu.max": "0 100000"}),
        (f"3:cpu:{UNIT}\n", V1, {f"/sys/fs/cgroup/cpu,cpuacct{UNIT}/cpu.cfs_quota_us": "1"}),
    ],
)
def test_missing_or_unreadable_is_no_quota(
    proc: str, mountinfo: str, files: dict[str, str]
) -> None:
    assert cpu_quota(proc, mountinfo, reader(files)) is None


def test_auto_workers_never_past_the_affinity_mask_and_says_why() -> None:
    two = CpuQuota(200000, 100000, "/sys/fs/cgroup/x")
    assert auto_workers(64, two).count == 2
    assert auto_workers(64, two).because == "2 (CPUQuota 200% of 64 CPUs)"
    assert auto_workers(1, two).count == 1  # taskset to one CPU: the quota allows more
    assert auto_workers(8, None).count == 8
    assert auto_workers(8, None).because == "8 (the CPUs of its affinity mask)"
    assert auto_workers(64, CpuQuota(10000, 100000, "/x")).count == 1  # 10%: at least 1
    assert auto_workers(0, None).count == 1


def test_a_quota_behind_a_cgroup_namespace_is_said_not_known() -> None:
    # The host's v1 cpu hierarchy bound into a container with its own cgroup
    # namespace: on main no quota (every CPU of the mask) and no word of why.
    mountinfo = "32 31 0:29 /.. /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    files = {
        "/sys/fs/cgroup/cpu/oom36-c/cpu.cfs_quota_us": "100000\n",
        "/sys/fs/cgroup/cpu/oom36-c/cpu.cfs_period_us": "100000\n",
    }
    quota, why = cpu_quota_found("1:cpu:/\n", mountinfo, files.get)
    assert quota is None and why is not None and "cgroup namespace" in why
    auto = auto_workers(8, quota, why)
    assert auto.count == 8 and "its CPU quota, if any, could not be read" in auto.because
    # Found (config.cgroup_files looks for it by pid): the quota counts.
    quota, why = cpu_quota_found(
        "1:cpu:/\n", mountinfo, files.get, lambda mount, path: ("/sys/fs/cgroup/cpu/oom36-c", None)
    )
    assert why is None and quota is not None and auto_workers(8, quota).count == 1
