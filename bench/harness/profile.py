"""Profilers on a target during a measurement window, and what their samples say.

- py-spy (Python targets): ``record`` runs ``py-spy record`` (blocking: py-spy
  pauses the target for each sample, so that run's CPU and latency figures are
  disturbed) and ``summarize`` folds the collapsed stacks into the Python
  functions that use the time, self (leaf) and inclusive. ``--native`` would
  show C frames, but py-spy 0.3.14 cannot merge uvloop's Cython frames ("Failed
  to merge native and python frames"), and 0.4.x cannot read this Python's
  version at all: native time is seen with perf instead.
- perf (any target, HAProxy too): ``perf record -e cpu-clock`` (no call
  graphs: cheap) and the share of samples per shared object (libcrypto,
  libssl, libpython, uvloop, the kernel, haproxy) and per symbol.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

from . import procfs
from .children import Children
from .run import process_roles

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")
BUCKETS = (
    ("OpenSSL (libssl/libcrypto)", ("libssl", "libcrypto")),
    ("kernel I/O (send/recv/epoll)", ("libc.so", "epoll", "__libc_send", "__libc_recv")),
    ("uvloop / libuv", ("uvloop", "loop.cpython", "libuv", "uv__")),
    ("fleet_ingress", ("fleet_ingress",)),
    ("asyncio", ("asyncio",)),
    ("ssl module", ("ssl.py", "_ssl.cpython")),
)


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(p) for p in (Path(__file__).resolve().parents[2] / ".venv/bin/py-spy",) if p.exists()),
        None,
    )


async def record(
    children: Children, pid: int, seconds: float, out: Path, rate: int = 100
) -> Path | None:
    """py-spy on ``pid`` and each process below it (fleet-ingress's supervisor and its
    workers, where the calls run), one py-spy each, their stacks in one file ``out``
    (py-spy's ``--subprocesses`` did not sample the workers here)."""
    binary = py_spy()
    if binary is None:
        return None
    parts = []
    for p in procfs.descendants(pid):
        part = out.with_name(f"{out.stem}-{p}{out.suffix}")
        argv = [binary, "record", "--pid", str(p), "--duration", str(max(1, round(seconds)))]
        argv += ["--rate", str(rate), "--format", "raw", "--output", str(part)]
        parts.append(_profile(children, argv, seconds, part))
    return _concat(await asyncio.gather(*parts), out)


def _concat(parts: list[Path], out: Path) -> Path:
    """Collapsed stacks are one line each: files of several processes just add up."""
    done = [part for part in parts if part.exists()]
    if done:
        out.write_text("".join(part.read_text(errors="replace") for part in done))
    return out


async def _profile(children: Children, argv: list[str], seconds: float, out: Path) -> Path:
    """Run a profiler for ``seconds`` (stopped if it overstays), its stderr beside ``out``."""
    with out.with_suffix(".log").open("wb") as err:
        proc = await children.spawn(argv, stdout=err, stderr=err)
    try:
        async with asyncio.timeout(seconds + 30):
            await proc.wait()
    except TimeoutError:
        await Children.stop(proc)
    return out


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame.strip())
        func, where = (m["func"], m["where"]) if m else (frame.strip(), "")
        out.append((func, where.rsplit(":", 1)[0]))
    return out


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    if not path.exists():
        log = path.with_suffix(".log")
        return {"error": log.read_text(errors="replace")[-500:] if log.exists() else "no output"}
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    buckets: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        n = int(count)
        total += n
        frames = _frames(stack)
        leaf_func, leaf_where = frames[-1]
        leaf = f"{leaf_func} ({Path(leaf_where).name})"
        self_time[leaf] = self_time.get(leaf, 0) + n
        for name in {f"{f} ({Path(w).name})" for f, w in frames}:
            inclusive[name] = inclusive.get(name, 0) + n
        bucket = "Python interpreter / other"
        for label, needles in BUCKETS:
            if any(s in leaf_where or s in leaf_func for s in needles):
                bucket = label
                break
        buckets[bucket] = buckets.get(bucket, 0) + n

    def pct(d: dict[str, int]) -> dict[str, float]:
        items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return {k: round(100 * v / total, 1) for k, v in items} if total else {}

    return {
        "samples": total,
        "leaf_bucket_pct": pct(buckets),
        "self_pct": pct(self_time),
        "inclusive_pct": pct(inclusive),
    }


async def perf_record(children: Children, pid: int, seconds: float, out: Path) -> Path | None:
    binary = shutil.which("perf")
    if binary is None:
        return None
    # Every process of the tree (fleet-ingress's workers): -p takes a list, not children.
    pids = ",".join(str(p) for p in procfs.descendants(pid))
    argv = [binary, "record", "-e", "cpu-clock", "-F", "999", "-p", pids, "-o", str(out)]
    argv += ["--", "sleep", str(max(1, round(seconds)))]
    return await _profile(children, argv, seconds, out)


async def perf_summary(path: Path, top: int = 25) -> dict[str, Any]:
    binary = shutil.which("perf")
    if binary is None:
        return {"error": "no perf"}
    out: dict[str, Any] = {}
    for key, sort in (("dso_pct", "dso"), ("symbol_pct", "dso,sym")):
        proc = await asyncio.create_subprocess_exec(
            binary,
            "report",
            "-i",
            str(path),
            "--no-children",
            "--sort",
            sort,
            "--stdio",
            "-q",
            "--percent-limit",
            "0.5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        text, err = await proc.communicate()
        rows = {}
        for line in text.decode(errors="replace").splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].endswith("%"):
                rows[" ".join(parts[1].split())] = float(parts[0].rstrip("%"))
        out[key] = dict(list(rows.items())[:top])
        if not rows:
            out["error"] = err.decode(errors="replace")[-300:]
    return out


# -- strace: system calls per call ------------------------------------------------------

_STRACE_ROW = re.compile(
    r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(?P<calls>\d+)\s+(?P<errors>\d+)?\s*(?P<name>\w+)\s*$"
)


async def strace_record(
    children: Children,
    kind: str,
    pid: int,
    seconds: float,
    out: Path,
    *,
    full: bool = False,
    tracepoints: bool = False,
) -> dict[str, Path]:
    """``strace -f`` on each process of ``pid``'s tree for ``seconds``, one file each
    (``out``-ROLE.txt): a count per system call (``-c``), or with ``full`` every call
    with its time and its descriptors' addresses (``-tt -yy``). strace stops the
    process at each system call, so the proxy runs slower while traced: its CPU
    and latency figures do not hold, and a slowed proxy finds more waiting at
    each wake-up (fewer epoll waits, reads coalesced). With ``tracepoints``,
    ``perf stat`` counts the kernel's ``syscalls:sys_enter_*`` instead, which
    stops nothing (same summary format once read by `strace_counts`)."""
    binary = shutil.which("strace")
    if binary is None:
        return {}
    files: dict[str, Path] = {}
    procs = []
    tree = [(p, procfs.cmdline(p)) for p in procfs.descendants(pid)]
    for p, role in process_roles(kind, tree).items():
        part = out.with_name(f"{out.stem}-{role.replace(' ', '')}{out.suffix}")
        mode = ["-tt", "-yy", "-s", "64"] if full else ["-c"]
        argv = [binary, "-f", *mode, "-p", str(p), "-o", str(part)]
        if tracepoints:
            # The kernel's syscall tracepoints, counted: no stop at each call.
            argv = [shutil.which("perf") or "perf", "stat", "-e", "syscalls:sys_enter_*"]
            argv += ["-x", ",", "-p", str(p), "-o", str(part), "--", "sleep", f"{seconds:.1f}"]
        with part.with_suffix(".log").open("wb") as err:
            procs.append(await children.spawn(argv, stdout=err, stderr=err))
        files[role] = part
    if tracepoints:  # perf stops by itself (sleep), its summary written
        try:
            async with asyncio.timeout(seconds + 30):
                await asyncio.gather(*(p.wait() for p in procs))
        finally:
            await asyncio.gather(*(Children.stop(p, 30) for p in procs))
        return files
    await asyncio.sleep(seconds)
    # SIGTERM: strace detaches and writes the -c summary before it exits.
    await asyncio.gather(*(Children.stop(p, 30) for p in procs))
    return files


def strace_counts(path: Path) -> dict[str, dict[str, int]]:
    """An ``strace -c`` summary (or ``perf stat -x,`` of syscalls:sys_enter_*):
    {syscall: {"calls": n, "errors": n}}, most calls first (perf counts no errors)."""
    rows: dict[str, dict[str, int]] = {}
    if not path.exists():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_"):
            if parts[0].isdigit() and int(parts[0]):
                rows[parts[2].removeprefix("syscalls:sys_enter_")] = {
                    "calls": int(parts[0]),
                    "errors": 0,
                }
            continue
        m = _STRACE_ROW.match(line)
        if m and m["name"] != "total":
            rows[m["name"]] = {"calls": int(m["calls"]), "errors": int(m["errors"] or 0)}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["calls"]))


def strace_summary(files: dict[str, Path], calls: int) -> dict[str, Any]:
    """Per process: system calls per proxied call by name (and errors), and the total."""
    out: dict[str, Any] = {"calls_in_window": calls}
    for role, path in files.items():
        counts = strace_counts(path)
        per = {k: round(v["calls"] / calls, 2) for k, v in counts.items()} if calls else {}
        errs = {k: round(v["errors"] / calls, 2) for k, v in counts.items() if v["errors"]}
        out[role] = {
            "file": path.name,
            "total": sum(v["calls"] for v in counts.values()),
            "per_call_total": round(sum(v["calls"] for v in counts.values()) / calls, 1)
            if calls
            else None,
            "per_call": per,
            "errors_per_call": errs if calls else {},
        }
    return out
