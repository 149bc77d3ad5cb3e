"""Which SIGKILL was the kernel's OOM killer's: a worker (or the supervisor
before this one) killed for want of memory ends as one killed by an
operator's `kill -9` does, and only the kernel's count tells them apart. (A
userspace OOM killer, systemd-oomd or earlyoom, kills with SIGKILL too and the
kernel counts none of its kills: they are `killed`, as a `kill -9` is.)

The kernel counts each OOM kill before it sends the SIGKILL ("task reaper
must see this", mm/oom_kill.c), whether the host ran out or a memory cgroup
hit its limit: in the victim's memory cgroup (cgroup v2 `memory.events`,
`oom_kill`, counted in each ancestor too; cgroup v1 `memory.oom_control`,
`oom_kill`, that group alone) and for the whole host (`/proc/vmstat`,
`oom_kill`). The supervisor reads the count of its own memory cgroup (under
systemd: the unit's, which its workers share), or the host's where no
memory cgroup can be read, every second and at each SIGKILL death; a rise
seen within OOM_CREDIT_S before such a death names the OOM killer.

Where the count takes in other processes' kills (`OomCounter.broad`), a rise
says only "possibly". The kernel's own record names the pid: each OOM kill
logs "Killed process PID (name) ..." (mm/oom_kill.c, just after the SIGKILL is
sent), which /dev/kmsg gives to a reader with CAP_SYSLOG (root; not the
shipped unit's user, nor under its ProtectKernelLogs=) in the host's pid
namespace (the pid logged is the host's). Where it can be read (`KernelLog`),
a SIGKILL death is the OOM killer's when that record names its pid, whatever
the count says.

Everything here but `find_oom_counter`, `OomCounter.read` and `KernelLog` is
I/O-free: text in, answers out (tests/unit/test_oom_kills.py).
"""

from __future__ import annotations

import os
import re
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fleet_ingress.config.cgroup_files import find_directory, in_initial_cgroup_namespace
from fleet_ingress.core.cgroups import (
    Mount,
    cgroup_paths,
    directories_from,
    directory,
    hidden,
    mounts,
)
from fleet_ingress.core.cpu_quota import Finder

__all__ = [
    "OOM_CREDIT_S",
    "KernelLog",
    "OomCounter",
    "OomKills",
    "count_in",
    "counter_candidates",
    "find_oom_counter",
    "kmsg_record",
]

# How long a rise of the count stays unclaimed for a SIGKILL death: the kill is
# counted a moment before the signal, the death read within a second of it (a
# busy supervisor loop: a few). Longer, and a rise for some other process of
# the group (a `check` run by ExecReload) could name an operator's kill -9
# later on; shorter, and a stalled loop could miss its own worker's.
OOM_CREDIT_S = 30.0


def count_in(text: str, key: str = "oom_kill") -> int | None:
    """The value of `key` in a "name value" file (memory.events,
    memory.oom_control, /proc/vmstat); None when it has none (a kernel before
    4.13 has no oom_kill)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class OomCounter:
    """A file whose `oom_kill` counts the OOM kills a SIGKILL death is
    weighed against, and what it covers, as the log says it. `broad`: it
    counts the kills of processes outside the service too (the host's count,
    a v2 group above the service's, the v1 root memory group), so a rise says
    only that the death was *possibly* the OOM killer's."""

    path: str
    covers: str
    broad: bool = False
    # The file, opened at the first read and read again with one pread from
    # its start (a seq_file reads afresh there): read every second, opening
    # it each time took seven system calls (openat, fstat, ioctl, lseek,
    # read twice, close; the idle audit of session 39). Empty until then; its
    # closer is called by `close` or as the counter is collected.
    _open: list[tuple[int, weakref.finalize]] = field(
        default_factory=list, compare=False, repr=False
    )

    def read(self) -> int | None:
        try:
            if not self._open:
                fd = _open_file(self.path, os.O_RDONLY | os.O_CLOEXEC)
                self._open.append((fd, weakref.finalize(self, _close_file, fd)))
            fd = self._open[0][0]
            data = _pread(fd, _COUNTER_READ, 0)
            while data and len(data) % _COUNTER_READ == 0:  # a file longer than a read
                more = _pread(fd, _COUNTER_READ, len(data))
                if not more:
                    break
                data += more
            return count_in(data.decode("ascii"))
        except (OSError, ValueError):
            self.close()  # opened afresh next time (a group removed and made again)
            return None

    def close(self) -> None:
        if self._open:
            self._open.pop()[1]()


# Bytes read of a counter file at a time: /proc/vmstat is 5-8 KB, memory.events 100.
_COUNTER_READ = 16384
# The counter file's calls, bound apart from `KernelLog`'s (`os.*`, which the
# tests replace with a /dev/kmsg of their own: tests/unit/test_oom_kills.py).
_open_file, _pread, _close_file = os.open, os.pread, os.close


HOST_COUNTER = OomCounter(
    "/proc/vmstat", "the whole host (/proc/vmstat: any process's OOM kill)", broad=True
)


def _host_counter(unseen: list[str]) -> OomCounter:
    if not unseen:
        return HOST_COUNTER
    return OomCounter(
        HOST_COUNTER.path,
        "the whole host (/proc/vmstat: any process's OOM kill; this service's memory "
        f"cgroup could not be read: {'; '.join(unseen)})",
        broad=True,
    )


def _name(mount: Mount, where: str) -> str:
    return "/" + where[len(mount.point.rstrip("/")) :].strip("/")


def counter_candidates(
    proc_cgroup: str,
    mountinfo: str,
    find: Finder | None = None,
    initial_namespace: bool = True,
) -> list[OomCounter]:
    """The files to try, best first: the cgroup v2 memory.events of this
    process's cgroup (the unit's, its workers' and any process it started
    counted with it), then of each group above it (broad: their other
    groups' kills too), its cgroup v1 memory.oom_control (that group alone;
    broad for the host's root group, which holds every process not put in
    one), then the host's count (any process on the host: broad).
    `find`: where a cgroup is under a mount, or why not (`core.cgroups.hidden`
    by default; config.cgroup_files.find_directory looks for it);
    `initial_namespace`: this process's cgroup namespace is the host's."""
    v2_path, v1_path = cgroup_paths(proc_cgroup, "memory")
    v2_mount, v1_mount = mounts(mountinfo, "memory")
    find = find or _by_name
    found: list[OomCounter] = []
    unseen: list[str] = []
    if v2_path is not None and v2_mount is not None:
        where, why = find(v2_mount, v2_path)
        if where is None:
            if why is not None:
                unseen.append(why)
        else:
            # Its own group's first; an ancestor's (its count is its descendants'
            # too) where the memory controller is not enabled on the group itself.
            for depth, each in enumerate(directories_from(v2_mount, where)):
                by_name = not depth and where == directory(v2_mount, v2_path)
                name = v2_path if by_name else _name(v2_mount, each)
                found.append(
                    OomCounter(
                        f"{each}/memory.events",
                        f"memory cgroup {name} (cgroup v2 memory.events)"
                        if not depth
                        else f"memory cgroup {name} (cgroup v2 memory.events of a group above "
                        "this service's: its other groups' OOM kills too)",
                        broad=depth > 0,
                    )
                )
    if v1_path is not None and v1_mount is not None:
        where, why = find(v1_mount, v1_path)
        if where is None:
            if why is not None:
                unseen.append(why)
        else:
            root = initial_namespace and where.rstrip("/") == v1_mount.point.rstrip("/")
            name = v1_path if where == directory(v1_mount, v1_path) else _name(v1_mount, where)
            found.append(
                OomCounter(
                    f"{where}/memory.oom_control",
                    f"memory cgroup {name} (cgroup v1 memory.oom_control"
                    + (
                        ", the host's root group: every process not in a group of its own)"
                        if root
                        else ")"
                    ),
                    broad=root,
                )
            )
    return [*found, _host_counter(unseen)]


def _by_name(mount: Mount, path: str) -> tuple[str | None, str | None]:
    where = directory(mount, path)
    return (where, None) if where is not None else (None, hidden(mount, path))


def find_oom_counter(pid: int | str = "self") -> OomCounter | None:
    """The first of `counter_candidates` for process `pid` that reads; None
    when none does (not Linux, or a kernel without the count)."""
    try:
        proc_cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        proc_cgroup = mountinfo = ""
    owner = os.getpid() if pid == "self" else int(pid)
    candidates = counter_candidates(
        proc_cgroup,
        mountinfo,
        lambda mount, path: find_directory(mount, path, "memory", owner),
        in_initial_cgroup_namespace(),
    )
    for counter in candidates:
        if os.path.exists(counter.path) and counter.read() is not None:
            return counter
    return None


@dataclass
class OomKills:
    """The OOM kills counted and not yet claimed by a SIGKILL death, each
    with when it was first seen. Fed the count as read (`seen`); a death by
    SIGKILL asks `claim`. `last`: the count read last (None: never read),
    which a supervisor started after this one died compares its own with."""

    last: int | None = None
    credit_s: float = OOM_CREDIT_S
    _unclaimed: deque[float] = field(default_factory=deque)

    def seen(self, count: int | None, now: float) -> int:
        """The count read at `now`; returns the kills new since the last read."""
        if count is None:
            return 0
        new = 0 if self.last is None else max(0, count - self.last)
        # A count that went down is another group's (the counter file moved): start again.
        self.last = count
        self._unclaimed.extend([now] * new)
        while self._unclaimed and now - self._unclaimed[0] > self.credit_s:
            self._unclaimed.popleft()
        return new

    def carried(self) -> int | None:
        """The count an exec's next image starts from: the last read, less the
        kills seen and not claimed yet (a worker's whose death the next image
        reads), which it then sees again as new."""
        return None if self.last is None else self.last - len(self._unclaimed)

    def pending(self, count: int | None, now: float) -> int:
        """The kills counted and not claimed yet (the count read at `now`)."""
        self.seen(count, now)
        return len(self._unclaimed)

    def claim(self, count: int | None, now: float) -> bool:
        """Whether a SIGKILL death read at `now` (the count as read then) was
        the OOM killer's: a kill counted since OOM_CREDIT_S ago and not yet
        claimed by another death (two workers killed at once: two kills)."""
        self.seen(count, now)
        if not self._unclaimed:
            return False
        self._unclaimed.popleft()
        return True


def rose_since(carried: object, count: int | None) -> int:
    """OOM kills counted since a supervisor that died last read `carried`
    (its snapshot's, written every second): the next one's sign that the
    OOM killer took it. 0 when either is not known."""
    if not isinstance(carried, int) or count is None:
        return 0
    return max(0, count - carried)


# "3,3413,44403863398,-;Memory cgroup out of memory: Killed process 17964 (python) ..."
_KILLED = re.compile(r"\bKilled process (\d+) \(")
PROC_PID_INIT_INO = 0xEFFFFFFC  # the host's pid namespace (include/linux/proc_ns.h)
# Records read at most at a time (a kernel log flooded by something else: read on next time).
KMSG_READS = 5000
# ...when the whole ring is read through (at start, and from its oldest record
# on a `rewind`): a 1 MiB ring holds 10,000 records and more, a 16 MiB one
# about 100,000 (3-4 us each: a third of a second at most, once).
KMSG_RING_READS = KMSG_READS * 20


def kmsg_record(record: str) -> tuple[int, int | None] | None:
    """A /dev/kmsg record's sequence number, and the pid an OOM kill it
    logs killed (None: another message); None for no record."""
    head, sep, message = record.partition(";")
    fields_ = head.split(",")
    if not sep or len(fields_) < 2:
        return None
    try:
        prefix, seq = int(fields_[0]), int(fields_[1])
    except ValueError:
        return None
    if prefix >> 3:  # not the kernel's facility: a line a process wrote (`echo > /dev/kmsg`)
        return seq, None
    killed = _KILLED.search(message.partition("\n")[0])
    return seq, None if killed is None else int(killed.group(1))


class KernelLog:
    """The kernel's log of OOM kills by pid (/dev/kmsg), read from where this
    image started (or the one before it stopped reading: `rewind`); `usable`
    False where it cannot be read (not root, no CAP_SYSLOG, another pid
    namespace, not Linux). `complete` False for OOM_CREDIT_S once records
    were lost before being read (the ring overwritten, or gone by a rewind):
    then the count decides, as without it."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self.fd: int | None = None
        self.last_seq: int | None = None  # the last record read (carried over an exec)
        self._gap_at: float | None = None  # when records were last found lost
        self._killed: dict[int, float] = {}  # pid: when its record was read
        try:
            if os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO:
                return  # the pids it logs are the host's: not this namespace's
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.close()
            return
        # Read through to the end, its kills left (before this start): the last
        # record's number is where the next image (an exec's, after a crash) reads on.
        self.read(0.0, KMSG_RING_READS, note=False)

    @property
    def usable(self) -> bool:
        return self.fd is not None

    @property
    def complete(self) -> bool:
        """No record lost in the last OOM_CREDIT_S (the ring overwritten
        before it was read): a kill then may be one not read."""
        return self._gap_at is None or time.monotonic() - self._gap_at > OOM_CREDIT_S

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def rewind(self, after_seq: object, now: float) -> None:
        """Read again from the record after `after_seq` (the image before
        this one's last: an exec's, a crash snapshot's), so that an OOM kill
        logged meanwhile is seen; not complete if the ring lost some since.
        Read through to the end at once: the records before `after_seq` come
        first, and a crash's check for its predecessor's kill reads next.
        None (a release that read no log, or could not): what was logged
        before this image opened it went unnoted, a kill the count carried
        over with it among them; not complete, the count decides meanwhile."""
        if self.fd is None:
            return
        if not isinstance(after_seq, int):
            self._gap_at = time.monotonic()
            return
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)  # the oldest record the ring holds
        except OSError:
            return
        self.last_seq = after_seq
        self.read(now, KMSG_RING_READS)

    def read(self, now: float, most: int = KMSG_READS, *, note: bool = True) -> None:
        """The records logged since the last read: each OOM kill's pid kept
        for OOM_CREDIT_S."""
        if self.fd is None:
            return
        for _ in range(most):
            try:
                data = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten before this read
                if note:
                    self._gap_at = time.monotonic()
                continue
            except OSError:
                self.close()
                break
            record = kmsg_record(data.decode("utf-8", "replace"))
            if record is None:
                continue
            seq, pid = record
            if self.last_seq is not None and seq <= self.last_seq:
                continue  # read before (a rewind)
            if note and self.last_seq is not None and seq > self.last_seq + 1:
                self._gap_at = time.monotonic()
            self.last_seq = seq
            if pid is not None and note:
                self._killed[pid] = now
        for pid, when in list(self._killed.items()):
            if now - when > OOM_CREDIT_S:
                del self._killed[pid]

    def killed(self, pid: int, now: float) -> bool:
        """Whether the kernel logged an OOM kill of `pid` (read now), once."""
        self.read(now)
        return self._killed.pop(pid, None) is not None
