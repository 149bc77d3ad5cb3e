"""What /proc says about processes and the host: CPU seconds, RSS, memory maps.

Everything here reads Linux's /proc and nothing else, so the same figures come
out for a Python ingress, HAProxy (C) or a load generator.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The tree functions take ``proc`` so that the unit tests can hand them a made-up /proc.
PROC = Path("/proc")


def read_stat(pid: int | str, proc: Path = PROC) -> tuple[str, list[str]]:
    """/proc/PID/stat: comm (field 2, may hold spaces) and the fields from 3 (state) on."""
    stat = (proc / str(pid) / "stat").read_text()
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """utime + stime of a process (all its threads), in seconds (clock-tick resolution)."""
    try:
        _, fields = read_stat(pid, proc)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """``pid`` and every live process below it (the ingress's supervisor and workers,
    HAProxy master/worker, helpers), parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            _, fields = read_stat(entry, proc)
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo.extend(sorted(children.get(p, ())))
    return found


def tree_cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """CPU seconds of ``pid`` and its live descendants, summed (a process that exits in
    a window takes its seconds with it: a replaced worker's are missing, never doubled)."""
    return sum(tree_cpu_by_process(pid, proc).values())


def tree_cpu_by_process(pid: int, proc: Path = PROC) -> dict[int, float]:
    """CPU seconds of ``pid`` and of each live descendant, by pid, parents first."""
    return {p: cpu_seconds(p, proc) for p in descendants(pid, proc)}


def thread_cpu_seconds(pid: int, proc: Path = PROC) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (/proc/PID/task/TID/stat), by thread id:
    HAProxy's ``nbthread`` threads live in one process."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in sorted(tids, key=int):
        try:
            _, fields = read_stat(f"{pid}/task/{tid}", proc)
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def cmdline(pid: int, proc: Path = PROC) -> list[str]:
    """A process's argv ([] once it is gone)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def rss_kib(pid: int, proc: Path = PROC) -> int:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_rss_kib(pid: int, proc: Path = PROC) -> int:
    """RSS of ``pid`` and its live descendants, summed (shared pages counted twice): the
    supervisor's and each worker's own baseline are all in a fresh target's figure."""
    return sum(rss_kib(p, proc) for p in descendants(pid, proc))


def smaps_rollup(pid: int, proc: Path = PROC) -> dict[str, int]:
    """/proc/PID/smaps_rollup in KiB: Rss, Pss, Anonymous, Private_Dirty, ..."""
    out: dict[str, int] = {}
    try:
        lines = (proc / str(pid) / "smaps_rollup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for line in lines[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def tree_smaps_rollup(pid: int, proc: Path = PROC) -> dict[str, int]:
    """``smaps_rollup`` summed over ``pid`` and its live descendants (Pss adds up to what
    the tree holds; Rss counts a page shared by two processes twice)."""
    out: dict[str, int] = {}
    for p in descendants(pid, proc):
        for key, kib in smaps_rollup(p, proc).items():
            out[key] = out.get(key, 0) + kib
    return out


def tree_rss_by_mapping(pid: int, proc: Path = PROC) -> dict[str, int]:
    """``rss_by_mapping`` summed over ``pid`` and its live descendants."""
    out: dict[str, int] = {}
    for p in descendants(pid, proc):
        for name, kib in rss_by_mapping(p, proc).items():
            out[name] = out.get(name, 0) + kib
    return out


def rss_by_mapping(pid: int | str, proc: Path = PROC) -> dict[str, int]:
    """Rss in KiB per kind of mapping (``mapping_kind``): [heap], anonymous mmaps, libssl,
    libcrypto, python, uvloop, ..."""
    out: dict[str, int] = {}
    for name, kib in smaps_rss(pid, proc).items():
        kind = mapping_kind(name)
        out[kind] = out.get(kind, 0) + kib
    return out


def smaps_rss(pid: int | str, proc: Path = PROC) -> dict[str, int]:
    """Rss in KiB of each mapping of a process by its name in /proc/PID/smaps: a file's
    path, [heap], [stack], [vdso], ..., or "" for an anonymous mmap; the mappings of one
    name (a library's text, data and relro) summed."""
    out: dict[str, int] = {}
    try:
        text = (proc / str(pid) / "smaps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return out
    name = ""
    for line in text.splitlines():
        # A mapping's header: "start-end perms offset dev inode [path]"; a path may hold
        # spaces (and " (deleted)"), so it is all that follows the inode.
        first = line.split(maxsplit=5)
        if len(first) >= 5 and "-" in first[0] and not first[0].endswith(":"):
            name = first[5].strip() if len(first) > 5 else ""
        elif line.startswith("Rss:"):
            out[name] = out.get(name, 0) + int(line.split()[1])
    return out


def mapping_kind(name: str) -> str:
    """What a mapping named ``name`` in smaps is: "anon-mmap" (no name: glibc's large
    blocks and secondary arenas, CPython's object arenas), "[heap]" (glibc's brk heap),
    "[stack]" and the kernel's other bracketed names as they are, and for a file: libssl,
    libcrypto, uvloop (its extension modules), python (the executable, libpython and the
    standard library's extension modules), haproxy (its executable), libc, "other .so",
    or "other file"."""
    if not name:
        return "anon-mmap"
    if name.startswith("["):
        return name
    path = name.removesuffix(" (deleted)")
    base = path.rsplit("/", 1)[-1]
    if base.startswith(("libssl.so", "libcrypto.so")):
        return base.split(".so")[0]
    if "/uvloop/" in path:
        return "uvloop"
    if base.startswith(("python3", "libpython3")) or "/lib-dynload/" in path:
        return "python"
    if base == "haproxy":
        return "haproxy"
    if base.startswith("libc.so"):
        return "libc"
    return "other .so" if ".so" in base else "other file"


def fd_count(pid: int, proc: Path = PROC) -> int | None:
    """Open descriptors of a process (/proc/PID/fd); None once it is gone."""
    try:
        return len(os.listdir(proc / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def tree_io_syscalls(pid: int, proc: Path = PROC) -> int:
    """``io_syscalls`` summed over ``pid`` and its live descendants."""
    return sum(io_syscalls(p, proc) for p in descendants(pid, proc))


def tree_fd_count(pid: int, proc: Path = PROC) -> int | None:
    """Open descriptors of ``pid`` and its live descendants; None once ``pid`` is gone."""
    counts = [fd_count(p, proc) for p in descendants(pid, proc)]
    return None if counts[0] is None else sum(c or 0 for c in counts)


def io_syscalls(pid: int, proc: Path = PROC) -> int:
    """Read and write system calls a process made (/proc/PID/io syscr + syscw)."""
    try:
        text = (proc / str(pid) / "io").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    counts = dict(line.split(": ") for line in text.splitlines())
    return int(counts["syscr"]) + int(counts["syscw"])


def tree_sleeps(pid: int, proc: Path = PROC) -> int:
    """``sleeps`` summed over ``pid`` and its live descendants."""
    return sum(sleeps(p, proc) for p in descendants(pid, proc))


def sleeps(pid: int, proc: Path = PROC) -> int:
    """Times the threads of a process went to sleep (voluntary context switches,
    /proc/PID/task/TID/status): for an event loop, one per wait in epoll_wait
    that found nothing ready, so each is a wake-up to come."""
    return context_switches(pid, proc)[0]


def context_switches(pid: int, proc: Path = PROC) -> tuple[int, int]:
    """Voluntary and involuntary context switches of a process, summed over its
    threads (/proc/PID/task/TID/status); (0, 0) once it is gone."""
    voluntary = involuntary = 0
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return (0, 0)
    for task in tasks:
        try:
            text = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return (voluntary, involuntary)


def host_busy_seconds() -> float:
    """CPU seconds the host spent busy (all cores, idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def others_cpu_seconds(exclude: set[int]) -> dict[str, float]:
    """CPU seconds of every other live user-space process, keyed "comm[pid]".

    Kernel threads are left out (some work for us: softirq, memory reclaim), and so is
    reaped children's time (cutime): it lands all at once, however long the child ran."""
    found: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            comm, fields = read_stat(entry)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if entry == "2" or fields[1] == "2":  # kthreadd and its children
            continue
        found[f"{comm}[{entry}]"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def others_busy(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each other process used between two ``others_cpu_seconds``, busiest first."""
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in used.items() if v > 0), key=lambda kv: -kv[1]))


def describe(key: str, chars: int = 60) -> str:
    """ "comm[pid]" with the start of its command line, to tell whose process it is."""
    pid = key[key.rindex("[") + 1 : -1]
    try:
        cmd = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except (FileNotFoundError, ProcessLookupError):
        return key
    return f"{key} {cmd.strip()[:chars]}"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def machine() -> dict[str, object]:
    """The machine a result was measured on."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_mib": mem_total_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
