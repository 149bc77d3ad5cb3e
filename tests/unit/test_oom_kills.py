"""Where the kernel's count of OOM kills is read, and which SIGKILL death it
names (service/oom_kills.py): the files' text in, answers out, no I/O
(tests/e2e/test_oom_kill.py has a real OOM kill)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fleet_ingress.service import oom_kills
from fleet_ingress.service.oom_kills import (
    HOST_COUNTER,
    OOM_CREDIT_S,
    PROC_PID_INIT_INO,
    KernelLog,
    OomCounter,
    OomKills,
    count_in,
    counter_candidates,
    kmsg_record,
    rose_since,
)

V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"
VMSTAT = "nr_free_pages 4902\noom_kill 41\nnuma_hit 1\n"

# A systemd host on cgroup v2 alone (Debian 11 and later).
UNIFIED_CGROUP = "0::/system.slice/fleet-ingress.service\n"
UNIFIED_MOUNTS = (
    "25 31 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 "
    "cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    "26 31 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:10 - proc proc rw\n"
)
# Hybrid (this project's test machine): v1 controllers, an empty v2 tree beside them.
HYBRID_CGROUP = (
    "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/4043\n3:cpuset:/\n1:cpu,cpuacct:/\n0::/\n"
)
HYBRID_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


@pytest.mark.parametrize(
    ("text", "key", "count"),
    [
        (V2_EVENTS, "oom_kill", 2),  # not oom (3), nor oom_group_kill
        (V1_OOM_CONTROL, "oom_kill", 7),
        (VMSTAT, "oom_kill", 41),
        ("oom_kill_disable 0\nunder_oom 0\n", "oom_kill", None),  # before Linux 4.13
        ("oom_kill many\n", "oom_kill", None),
        ("", "oom_kill", None),
    ],
)
def test_the_count_is_the_line_named_so(text: str, key: str, count: int | None) -> None:
    assert count_in(text, key) == count


def test_on_cgroup_v2_the_units_memory_events_first_then_its_ancestors_then_the_host() -> None:
    candidates = counter_candidates(UNIFIED_CGROUP, UNIFIED_MOUNTS)
    assert [c.path for c in candidates] == [
        "/sys/fs/cgroup/system.slice/fleet-ingress.service/memory.events",
        "/sys/fs/cgroup/system.slice/memory.events",
        "/sys/fs/cgroup/memory.events",  # a container's namespace root has one; a host's not
        "/proc/vmstat",
    ]
    assert "/system.slice/fleet-ingress.service" in candidates[0].covers
    assert candidates[-1] == HOST_COUNTER


def test_on_a_hybrid_host_the_v1_memory_group_then_the_host() -> None:
    # The v2 tree has no memory controller there: its memory.events are not
    # there to read (find_oom_counter passes over a file that is not there).
    candidates = counter_candidates(HYBRID_CGROUP, HYBRID_MOUNTS)
    assert [c.path for c in candidates] == [
        "/sys/fs/cgroup/unified/memory.events",
        "/sys/fs/cgroup/memory/process_api/4043/memory.oom_control",
        "/proc/vmstat",
    ]
    assert "cgroup v1" in candidates[1].covers


def test_a_cgroup_namespace_shows_paths_under_its_root() -> None:
    mounts = "25 31 0:22 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    inside = counter_candidates("0::/kubepods/pod1/c1\n", mounts)
    assert inside[0].path == "/sys/fs/cgroup/c1/memory.events"
    # A group the mount does not show: the host's count alone, and why.
    (host,) = counter_candidates("0::/elsewhere\n", mounts)
    assert host.path == HOST_COUNTER.path and host.broad
    assert "could not be read: its cgroup /elsewhere is not under" in host.covers


# This host's v1 memory hierarchy bound into a container with a cgroup
# namespace of its own (`unshare -C` there: mountinfo's root "/..").
NAMESPACED_CGROUP = "4:memory:/\n0::/\n"
NAMESPACED_MOUNTS = (
    "35 31 0:32 /.. /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def test_a_cgroup_namespace_over_the_hosts_cgroupfs_is_said_not_taken_for_the_host() -> None:
    # On main: the host's /proc/vmstat, as if no memory cgroup were there, said nowhere.
    candidates = counter_candidates(NAMESPACED_CGROUP, NAMESPACED_MOUNTS)
    assert candidates[-1].path == "/proc/vmstat" and candidates[-1].broad
    assert "a cgroup namespace over a cgroupfs mounted outside it" in candidates[-1].covers
    # Found (config.cgroup_files.find_directory looks for it by pid): its own group, narrow.
    found = counter_candidates(
        NAMESPACED_CGROUP,
        NAMESPACED_MOUNTS,
        lambda mount, path: (
            ("/sys/fs/cgroup/memory/oom36-x", None)
            if mount.point.endswith("memory")
            else ("/sys/fs/cgroup/unified", None)
        ),
    )
    assert found[1].path == "/sys/fs/cgroup/memory/oom36-x/memory.oom_control"
    assert not found[1].broad


def test_which_counts_are_broad() -> None:
    v2 = counter_candidates(UNIFIED_CGROUP, UNIFIED_MOUNTS)
    # The unit's own group: its processes alone; those above and the host: others' too.
    assert [c.broad for c in v2] == [False, True, True, True]
    assert "its other groups' OOM kills too" in v2[1].covers
    assert not counter_candidates(HYBRID_CGROUP, HYBRID_MOUNTS)[1].broad
    # The v1 root memory group (a v1 host's service without MemoryAccounting=):
    # every process not in a group of its own; a container's namespace root is its own.
    in_root = HYBRID_CGROUP.replace("4:memory:/process_api/4043", "4:memory:/")
    root = counter_candidates(in_root, HYBRID_MOUNTS)[1]
    assert root.path == "/sys/fs/cgroup/memory/memory.oom_control" and root.broad
    assert "the host's root group" in root.covers
    assert not counter_candidates(in_root, HYBRID_MOUNTS, initial_namespace=False)[1].broad


def test_no_cgroup_at_all_leaves_the_hosts_count() -> None:
    assert counter_candidates("", "") == [HOST_COUNTER]


def test_a_sigkill_death_is_the_oom_killers_when_the_count_rose() -> None:
    kills = OomKills()
    kills.seen(5, now=0.0)  # the count as the supervisor started: none of its own
    assert not kills.claim(5, now=10.0)  # an operator's kill -9: counted nowhere
    assert kills.claim(6, now=11.0)  # the OOM killer's
    assert not kills.claim(6, now=12.0)  # claimed once only
    assert kills.last == 6


def test_two_workers_killed_at_once_are_both_the_oom_killers() -> None:
    kills = OomKills(last=0)
    kills.seen(2, now=1.0)  # read every second, before either death is read
    assert kills.claim(2, now=1.2)
    assert kills.claim(2, now=1.3)
    assert not kills.claim(2, now=1.4)


def test_a_rise_unclaimed_for_long_names_no_later_kill() -> None:
    # An OOM kill of another process of the group (a `check` the unit ran):
    # an operator's kill -9 a minute later is not the OOM killer's.
    kills = OomKills(last=0)
    kills.seen(1, now=0.0)
    kills.seen(1, now=OOM_CREDIT_S / 2)
    assert not kills.claim(1, now=OOM_CREDIT_S + 1)
    # Within it: claimed (a busy supervisor reads a death a few seconds late).
    kills.seen(2, now=100.0)
    assert kills.claim(2, now=100.0 + OOM_CREDIT_S - 1)


def test_an_unreadable_count_names_nothing_and_keeps_what_was_seen() -> None:
    kills = OomKills()
    assert kills.seen(None, now=0.0) == 0 and kills.last is None
    kills.seen(3, now=1.0)
    assert not kills.claim(None, now=2.0)  # first read: a baseline, not kills
    kills.seen(4, now=3.0)
    assert kills.claim(None, now=4.0)  # what the last good read found
    assert kills.seen(1, now=5.0) == 0  # the count went down (another file): from there
    assert kills.seen(2, now=6.0) == 1


@pytest.mark.parametrize(
    ("carried", "now", "rose"),
    [
        (3, 4, 1),  # the previous supervisor's last snapshot read 3
        (3, 3, 0),  # a kill -9, a crash, the watchdog
        (None, 4, 0),  # it read none
        (3, None, 0),  # this one reads none
        ("3", 4, 0),  # not a count
        (9, 4, 0),  # another file's count
    ],
)
def test_a_supervisor_that_died_was_oom_killed_when_the_count_rose_since(
    carried: object, now: int | None, rose: int
) -> None:
    assert rose_since(carried, now) == rose


@pytest.mark.parametrize(
    ("record", "parsed"),
    [
        (
            "3,3413,44403863398,-;Memory cgroup out of memory: Killed process 17964 (python) "
            "total-vm:141940kB, anon-rss:34360kB, UID:0 pgtables:176kB oom_score_adj:1000\n",
            (3413, 17964),
        ),
        # Host-wide, and a kernel before 5.1's wording after "Kill process ... or sacrifice child".
        ("3,7,1,-;Out of memory: Killed process 42 (fleet-ingress) total-vm:1kB\n", (7, 42)),
        ("3,8,1,-;Killed process 43 (python3) total-vm:1kB, anon-rss:0kB\n", (8, 43)),
        # Not a kill: the reaper's line after it, the choice before it, another message.
        ("6,9,1,-;oom_reaper: reaped process 42 (python), now anon-rss:0kB\n", (9, None)),
        (
            "3,10,1,-;Out of memory: Kill process 42 (python) score 900 or sacrifice child\n",
            (10, None),
        ),
        ("6,11,1,-;eth0: link up\n SUBSYSTEM=net\n", (11, None)),
        ("not a record", None),
        # Written by a process (facility user, 1: prefix 8 and up), not the kernel's.
        ("12,12,1,-;Killed process 44 (python3) total-vm:1kB\n", (12, None)),
    ],
)
def test_the_kernels_log_names_the_pid_an_oom_kill_killed(
    record: str, parsed: tuple[int, int | None] | None
) -> None:
    assert kmsg_record(record) == parsed


class _Kmsg:
    """/dev/kmsg as `KernelLog` reads it, in place of the `os` functions it
    calls: a ring of records by sequence number, each read one record from
    the reader's position; BlockingIOError at the end, BrokenPipeError (and
    the position moved to the oldest) where the record there was overwritten;
    SEEK_SET to the oldest record the ring still holds."""

    O_RDONLY = O_NONBLOCK = O_CLOEXEC = 0
    SEEK_SET = 0

    def __init__(self, records: list[str], first_seq: int = 0) -> None:
        self.ring = list(records)
        self.first = self.position = first_seq

    def log(self, text: str) -> None:
        self.ring.append(text)

    def stat(self, path: str) -> SimpleNamespace:
        return SimpleNamespace(st_ino=PROC_PID_INIT_INO)

    def open(self, path: str, flags: int) -> int:
        return 99

    def close(self, fd: int) -> None:
        pass

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        self.position = self.first
        return 0

    def read(self, fd: int, size: int) -> bytes:
        if self.position >= self.first + len(self.ring):
            raise BlockingIOError
        if self.position < self.first:
            self.position = self.first
            raise BrokenPipeError
        seq, self.position = self.position, self.position + 1
        return self.ring[seq - self.first].replace("SEQ", str(seq)).encode()


def test_a_supervisor_oom_kill_is_read_past_a_full_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor started again after a death reads the kernel's log on from
    the sequence number its predecessor's last snapshot carried (`rewind`),
    then looks for that one's pid (`_say_if_oom_killed`), at once. The ring
    before that number is read through first, from its oldest record: a 1 MiB
    ring (CONFIG_LOG_BUF_SHIFT=20) holds 10,000 records and more, and two
    reads of KMSG_READS stopped short of the kill (its record unread, the
    death said to be none of the OOM killer's, the log being complete)."""
    kmsg = _Kmsg(["6,SEQ,1,-;eth0: link up\n"] * 12_000, first_seq=40_000)
    monkeypatch.setattr(oom_kills, "os", kmsg)
    carried = KernelLog().last_seq  # the previous supervisor's last snapshot
    assert carried == 51_999
    for _ in range(300):  # its OOM kill's report (the task dump), then the kill
        kmsg.log("4,SEQ,2,-;[  17964]     0 17964    35485     8590   big   0  1000 python\n")
    kmsg.log("3,SEQ,3,-;Memory cgroup out of memory: Killed process 17964 (python) total-vm:1kB\n")
    started_again = KernelLog()
    started_again.rewind(carried, 100.0)
    assert started_again.killed(17964, 100.0) and started_again.complete


_OPENED: list[str] = []


def _note_opens(event: str, args: tuple) -> None:
    """The opens of _OPENED[0] to read it (os.open's mode is None; the test's
    own writes, open(..., "w"), are not counted)."""
    if event == "open" and _OPENED and str(args[0]) == _OPENED[0] and "w" not in str(args[1]):
        _OPENED.append(event)


def test_the_oom_counter_is_opened_once_and_read_afresh_each_time(tmp_path) -> None:
    """The supervisor reads the count every second: its file is opened at the
    first read and read again from its start (one pread; opened each time, it
    took seven system calls a second: the idle audit of session 39). What was
    written since is read, in place (the kernel's seq_file) or past one read's
    length (/proc/vmstat is 5-8 KB); a file that cannot be read is None, and
    opened afresh once it can."""
    import sys

    events = tmp_path / "memory.events"
    counter = OomCounter(str(events), "memory cgroup /test (cgroup v2 memory.events)")
    assert counter.read() is None  # not there yet
    events.write_text("oom 1\noom_kill 1\n")
    _OPENED[:] = [str(events)]
    sys.addaudithook(_note_opens)  # (for good: a hook cannot be taken off; it checks _OPENED)
    try:
        for n in range(2, 12):
            events.write_text(f"oom {n}\noom_kill {n}\n")  # in place, as the kernel's count moves
            assert counter.read() == n
        assert len(_OPENED) - 1 == 1, f"opened {len(_OPENED) - 1} times for 10 reads"
    finally:
        _OPENED.clear()
    filler = "".join(f"nr_item_{i} {i}\n" for i in range(3000))  # past 16 KB
    events.write_text(f"{filler}oom_kill 42\n")
    assert len(events.read_bytes()) > 2 * 16384 and counter.read() == 42
    counter.close()
    events.write_text("oom_kill 7\n")
    assert counter.read() == 7  # opened again
    counter.close()
