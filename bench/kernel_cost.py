"""A churned call's cost that instruction counts do not show: the kernel's side, by process.

Runs fleet-ingress (a supervisor and one worker) and HAProxy (``nbthread 1``) side by
side, in the same window, in front of the same two simulated fleets, each under its
own churn (new twilio-like TLS calls at ``--rate`` a second, ``--call-seconds`` each,
from the bench's generator processes), and reads for every proxy process, over the
steady part of each round (as many calls ending as starting), divided by the calls
started in it (and, "beyond idle", less what the process does per second with no call,
from an idle window before each round's calls):

- CPU split: user and system time (``/proc/PID/stat`` utime, stime; clock ticks, so a
  window of 15 s at 20 calls/s resolves 0.03 ms a call), and the scheduler's run and
  wait time (``/proc/PID/schedstat``: on-CPU ns, runnable-but-waiting ns, slices);
- page faults (minor, major) and context switches (voluntary: the process slept, so
  a wake-up followed; involuntary: preempted), from /proc;
- from ``perf stat`` on each process for the window (software events and the kernel's
  tracepoints, which stop nothing): page faults by the kernel's count, context
  switches, CPU migrations, every system call (``raw_syscalls:sys_enter``) and the
  memory ones by name (mmap, munmap, brk, madvise, mprotect, mremap);
- with ``--gc``, the cyclic GC of each fleet-ingress process: collections by
  generation, objects collected, and the thread CPU time inside collections (a
  ``sitecustomize`` on the ingress's PYTHONPATH adds a ``gc.callbacks`` hook that
  writes its totals to a file at most every 0.2 s and at exit; those writes are system calls of
  their own: take the other figures from a run without ``--gc``).

Both proxies run in one window, so the host's speed and the other processes' load
fall on both: compare ratios side by side, round by round. Nothing is timed per
instruction; perf's hardware counters are not needed::

    python -m bench.kernel_cost --rate 20 --seconds 15 --call-seconds 1 --rounds 3 --out DIR
    python -m bench.kernel_cost --rounds 2 --gc --out DIR            # the GC's share
    python -m bench.kernel_cost --shape lockstep --targets ingress,ingress1p,haproxy --out DIR
    python -m bench.kernel_cost --variant-pythonpath /tmp/base/src ... # another src

Writes ``DIR/kernel_cost.json`` (every round, every process) and prints a table per
call (medians of the rounds, then each round). Every load is bounded: calls =
rate x seconds, each generator stopped by ``--seconds + --call-seconds + 60``.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.harness import procfs, profile
from bench.harness.carrier import FramePool, Recorder, echoed_calls
from bench.harness.children import log
from bench.harness.run import Run, process_roles
from bench.harness.stats import count_between
from bench.harness.targets import Target

PERF_EVENTS = (
    "task-clock",
    "page-faults",
    "major-faults",
    "context-switches",
    "cpu-migrations",
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_mmap",
    "syscalls:sys_enter_munmap",
    "syscalls:sys_enter_brk",
    "syscalls:sys_enter_madvise",
    "syscalls:sys_enter_mprotect",
    "syscalls:sys_enter_mremap",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
    "syscalls:sys_enter_epoll_ctl",
    "syscalls:sys_enter_getpid",
    "syscalls:sys_enter_clock_gettime",
)

# The cyclic GC's totals, written by each fleet-ingress process (with --gc) to
# GC_DIR/gc-PID.json: installed as sitecustomize, so it runs in the supervisor and
# in every worker without a change to the ingress.
GC_HOOK = """
import atexit, gc, json, os, time
_dir = os.environ.get("KERNEL_COST_GC_DIR")
if _dir:
    _s = {"collections": [0, 0, 0], "collected": [0, 0, 0], "cpu_s": [0.0, 0.0, 0.0]}
    _t = [0.0, 0.0]
    def _write():
        path = os.path.join(_dir, "gc-%d.json" % os.getpid())
        with open(path + ".tmp", "w") as f:
            json.dump(_s, f)
        os.replace(path + ".tmp", path)
    def _hook(phase, info):
        if phase == "start":
            _t[0] = time.thread_time()
            return
        g = info["generation"]
        _s["collections"][g] += 1
        _s["collected"][g] += info["collected"]
        _s["cpu_s"][g] += time.thread_time() - _t[0]
        now = time.monotonic()
        if now - _t[1] >= 0.2:
            _t[1] = now
            _write()
    gc.callbacks.append(_hook)
    atexit.register(_write)
"""


def proc_counters(pid: int) -> dict[str, float]:
    """What /proc says of one process now (all its threads): CPU split, faults, switches."""
    _, f = procfs.read_stat(pid)
    voluntary, involuntary = procfs.context_switches(pid)
    threads, others_voluntary = _other_threads(pid)
    run_ns, wait_ns, slices = (int(x) for x in Path(f"/proc/{pid}/schedstat").read_text().split())
    return {
        "utime_s": int(f[11]) / procfs.CLK_TCK,
        "stime_s": int(f[12]) / procfs.CLK_TCK,
        "minflt": int(f[7]),
        "majflt": int(f[9]),
        "ctx_voluntary": voluntary,
        "ctx_involuntary": involuntary,
        "threads": threads,
        "ctx_voluntary_other_threads": others_voluntary,
        "sched_run_s": run_ns / 1e9,
        "sched_wait_s": wait_ns / 1e9,
        "sched_slices": slices,
    }


def _other_threads(pid: int) -> tuple[int, int]:
    """Threads of `pid` (now), and the voluntary context switches of all but its
    main thread (the log writer's wake-ups and any other thread's)."""
    try:
        tasks = [t for t in (Path("/proc") / str(pid) / "task").iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return (0, 0)
    voluntary = 0
    for task in tasks:
        if task.name == str(pid):
            continue
        try:
            text = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
    return (len(tasks), voluntary)


def parse_perf_stat(text: str) -> dict[str, float]:
    """``perf stat -x,`` output: {event: count}; an event perf could not count is left out."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or line.startswith("#"):
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue  # "<not counted>", "<not supported>"
        out[parts[2]] = value
    return out


def parts_of(target: Target) -> dict[int, str]:
    """The target's processes by pid: their role ("supervisor", "worker 1", "haproxy")."""
    assert target.pid is not None
    tree = [(p, procfs.cmdline(p)) for p in procfs.descendants(target.pid)]
    return process_roles(target.kind, tree)


async def perf_stat(
    pid: int, seconds: float, out: Path, by_name: bool = False
) -> asyncio.subprocess.Process:
    """`by_name`: every system call by name too (the kernel's ``syscalls:sys_enter_*``
    tracepoints, counted: nothing stopped)."""
    perf = shutil.which("perf") or "perf"
    events = [*PERF_EVENTS, "syscalls:sys_enter_*"] if by_name else list(PERF_EVENTS)
    argv = [perf, "stat", "-x", ",", "-e", ",".join(events), "-p", str(pid)]
    argv += ["-o", str(out), "--", "sleep", f"{seconds:.2f}"]
    return await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


async def perf_record_start(
    args: argparse.Namespace, parts: dict[str, dict[int, str]], n: int
) -> dict[tuple[str, int], tuple[Path, asyncio.subprocess.Process]]:
    """With ``--perf-dso``: ``perf record -e cpu-clock`` on each process (software
    sampling: no hardware counter needed), stopped by ``perf_record_stop``."""
    if not args.perf_dso:
        return {}
    perf = shutil.which("perf") or "perf"
    out = {}
    for name, roles in parts.items():
        for pid, role in roles.items():
            path = args.out / f"record-r{n}-{name.replace('@', '-')}-{role.replace(' ', '')}.data"
            argv = [perf, "record", "-q", "-e", "cpu-clock", "-F", "2000", "-p", str(pid)]
            proc = await asyncio.create_subprocess_exec(
                *argv, "-o", str(path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out[(name, pid)] = (path, proc)
    return out


async def perf_record_stop(
    records: dict[tuple[str, int], tuple[Path, asyncio.subprocess.Process]],
) -> dict[tuple[str, int], dict[str, float]]:
    """Each record stopped (SIGINT: perf writes its file), and its samples' share by
    shared object (``[kernel.kallsyms]``, ``libpython3.11...``, ``haproxy``), in %."""
    for _, proc in records.values():
        proc.send_signal(signal.SIGINT)
    shares = {}
    for key, (path, proc) in records.items():
        async with asyncio.timeout(60):
            await proc.wait()
        shares[key] = (await profile.perf_summary(path)).get("dso_pct", {})
    return shares


def dso_ms(shares: dict[str, float], on_cpu_ms: float | None) -> dict[str, float]:
    """A process's on-CPU ms a call split by shared object, from its samples' shares."""
    if on_cpu_ms is None:
        return {}
    return {dso: round(pct / 100 * on_cpu_ms, 3) for dso, pct in shares.items()}


def read_gc(gc_dir: Path | None, pid: int) -> dict[str, Any] | None:
    if gc_dir is None:
        return None
    path = gc_dir / f"gc-{pid}.json"
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, ValueError):
        return None


def gc_delta(a: dict[str, Any] | None, b: dict[str, Any] | None, calls: int) -> dict[str, Any]:
    if a is None or b is None or not calls:
        return {}
    return {
        key: [
            round((y - x) / calls, 4 if key == "cpu_s" else 3)
            for x, y in zip(a[key], b[key], strict=True)
        ]
        for key in ("collections", "collected", "cpu_s")
    }


async def one_round(
    run: Run, targets: list[Target], args: argparse.Namespace, n: int, gc_dir: Path | None
) -> dict[str, Any]:
    calls = max(1, round(args.rate * args.seconds))
    parts = {t.name: parts_of(t) for t in targets}
    # Idle first: what each process does with no call (health probes, the supervisor's
    # ticks), per second, to take off the churn window's figures ("beyond idle").
    i0 = time.monotonic()
    idle_a = {(name, pid): proc_counters(pid) for name, r in parts.items() for pid in r}
    await asyncio.sleep(args.idle_seconds)
    idle_s = time.monotonic() - i0
    idle_b = {(name, pid): proc_counters(pid) for name, r in parts.items() for pid in r}
    t0 = time.monotonic() + 0.5
    gens = {}
    for target in targets:
        gens[target.name] = await run.generators(
            target,
            calls=calls,
            mode="churn",
            t0=t0,
            gap=1.0 / args.rate,
            max_seconds=args.seconds + args.call_seconds + 60,
            workers=1,
            extra=["--call-seconds", str(args.call_seconds)],
        )
    # The window: from when as many calls end as start, to the last start.
    await asyncio.sleep(max(0.0, t0 + args.call_seconds + 1.0 - time.monotonic()))
    window = t0 + args.seconds - time.monotonic()
    perfs = {}
    for name, roles in parts.items():
        for pid, role in roles.items():
            out = args.out / f"perf-r{n}-{name.replace('@', '-')}-{role.replace(' ', '')}.txt"
            perfs[(name, pid)] = (out, await perf_stat(pid, window, out, args.syscalls))
    ta = time.monotonic()
    before = {(name, pid): proc_counters(pid) for name, r in parts.items() for pid in r}
    records = await perf_record_start(args, parts, n)
    gc_before = {(name, pid): read_gc(gc_dir, pid) for name, r in parts.items() for pid in r}
    host_a = procfs.host_busy_seconds()
    await asyncio.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
    tb = time.monotonic()
    after = {(name, pid): proc_counters(pid) for name, r in parts.items() for pid in r}
    gc_after = {(name, pid): read_gc(gc_dir, pid) for name, r in parts.items() for pid in r}
    host_b = procfs.host_busy_seconds()
    shares = await perf_record_stop(records)
    async with asyncio.timeout(30):
        for _, proc in perfs.values():
            await proc.wait()
    recs = {}
    for name, g in gens.items():
        try:
            await g.wait_all_done(args.call_seconds + 30)
        except TimeoutError:
            log(f"{name}'s generator still running: stopping it")
        recs[name] = await g.stop(timeout=30)
    result: dict[str, Any] = {
        "round": n,
        "window_s": round(tb - ta, 3),
        "host_cores": round((host_b - host_a) / (tb - ta), 3),
        "targets": {},
    }
    for target in targets:
        name = target.name
        started = sum(count_between(sorted(r.handshake_t), ta, tb) for r in recs[name])
        failed = sum(r.failed + r.lost + r.corrupt for r in recs[name])
        by_part = {}
        for pid, role in parts[name].items():
            a, b = before[(name, pid)], after[(name, pid)]
            per = {k: round((b[k] - a[k]) / started, 6) if started else None for k in a}
            ia, ib = idle_a[(name, pid)], idle_b[(name, pid)]
            idle_rate = {k: (ib[k] - ia[k]) / idle_s for k in ia}
            beyond = {
                k: round((b[k] - a[k] - idle_rate[k] * (tb - ta)) / started, 6) if started else None
                for k in a
            }
            out, _ = perfs[(name, pid)]
            counted = parse_perf_stat(out.read_text()) if out.exists() else {}
            per_perf = {k: round(v / started, 3) for k, v in counted.items()} if started else {}
            by_part[role] = {
                "pid": pid,
                "threads": after[(name, pid)]["threads"],
                "proc": per,
                "beyond_idle": beyond,
                "idle_per_s": {k: round(v, 6) for k, v in idle_rate.items()},
                "perf": per_perf,
                "gc": gc_delta(gc_before[(name, pid)], gc_after[(name, pid)], started),
                "dso_ms": dso_ms(shares.get((name, pid), {}), ms(per.get("sched_run_s"))),
            }
        result["targets"][name] = {
            "calls_started": started,
            "errors": failed,
            "parts": by_part,
        }
    return result


async def lockstep_round(
    run: Run, targets: list[Target], args: argparse.Namespace, n: int
) -> dict[str, Any]:
    """``--shape lockstep``: call_instructions' load, natively. Each target is sent
    ``--calls`` calls, ``--wave`` at a time, ``--messages`` frames each sent after the last
    one's echo (the process is never idle while its calls run), every target at once
    from this process. No idle window and no perf: /proc's counters over the calls."""
    pool = FramePool.build("twilio-like")
    ctx = run.tls.carrier_context()
    recs = {t.name: Recorder() for t in targets}
    parts = {t.name: parts_of(t) for t in targets}

    async def push(target: Target) -> None:
        await echoed_calls(
            recs[target.name], pool, target.urls[0], ctx, range(args.calls),
            wave=args.wave, messages=args.messages, step=30.0,
        )  # fmt: skip

    ta = time.monotonic()
    before = {(name, pid): proc_counters(pid) for name, r in parts.items() for pid in r}
    records = await perf_record_start(args, parts, n)
    host_a = procfs.host_busy_seconds()
    async with asyncio.timeout(args.seconds + 120):
        await asyncio.gather(*(push(t) for t in targets))
    tb = time.monotonic()
    after = {(name, pid): proc_counters(pid) for name, r in parts.items() for pid in r}
    host_b = procfs.host_busy_seconds()
    shares = await perf_record_stop(records)
    result: dict[str, Any] = {
        "round": n,
        "window_s": round(tb - ta, 3),
        "host_cores": round((host_b - host_a) / (tb - ta), 3),
        "targets": {},
    }
    for target in targets:
        name, rec = target.name, recs[target.name]
        by_part = {}
        for pid, role in parts[name].items():
            a, b = before[(name, pid)], after[(name, pid)]
            per = {k: round((b[k] - a[k]) / args.calls, 6) for k in a}
            by_part[role] = {
                "pid": pid,
                "proc": per,
                "perf": {},
                "beyond_idle": {},
                "gc": {},
                "dso_ms": dso_ms(shares.get((name, pid), {}), ms(per["sched_run_s"])),
            }
        result["targets"][name] = {
            "calls_started": args.calls,
            "errors": rec.failed + rec.lost + rec.corrupt + len(rec.errors),
            "parts": by_part,
        }
    return result


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def dso_table(rounds: list[dict[str, Any]]) -> str:
    """On-CPU ms a call by shared object and process, mean of the rounds."""
    sums: dict[tuple[str, str], dict[str, float]] = {}
    for r in rounds:
        for name, t in r["targets"].items():
            for role, p in t["parts"].items():
                row = sums.setdefault((name, role), {})
                for dso, v in p.get("dso_ms", {}).items():
                    row[dso] = row.get(dso, 0.0) + v / len(rounds)
    lines = []
    for (name, role), row in sums.items():
        if row:
            top = sorted(row.items(), key=lambda kv: -kv[1])[:8]
            cells = ", ".join(f"{dso} {v:.2f}" for dso, v in top)
            lines.append(f"{name} {role}, ms a call by object: {cells}")
    return "\n".join(lines)


def summed(parts: dict[str, Any], section: str, key: str) -> float | None:
    vals = [p[section].get(key) for p in parts.values()]
    return None if any(v is None for v in vals) else sum(vals)


EPOLL_WAITS = ("syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait")
ROWS = (
    ("CPU ms (utime+stime)", "proc", ("utime_s", "stime_s"), 1000),
    ("  user ms", "proc", ("utime_s",), 1000),
    ("  system ms", "proc", ("stime_s",), 1000),
    ("on-CPU ms (schedstat)", "proc", ("sched_run_s",), 1000),
    ("runnable, waiting ms", "proc", ("sched_wait_s",), 1000),
    ("CPU ms beyond idle", "beyond_idle", ("utime_s", "stime_s"), 1000),
    ("  user ms beyond idle", "beyond_idle", ("utime_s",), 1000),
    ("  system ms beyond idle", "beyond_idle", ("stime_s",), 1000),
    ("context switches beyond idle, voluntary", "beyond_idle", ("ctx_voluntary",), 1),
    ("minor page faults", "proc", ("minflt",), 1),
    ("major page faults", "proc", ("majflt",), 1),
    ("context switches, voluntary", "proc", ("ctx_voluntary",), 1),
    ("context switches, involuntary", "proc", ("ctx_involuntary",), 1),
    ("  of them voluntary, threads but the main one", "proc", ("ctx_voluntary_other_threads",), 1),
    ("CPU migrations (perf)", "perf", ("cpu-migrations",), 1),
    ("system calls (perf)", "perf", ("raw_syscalls:sys_enter",), 1),
    ("  epoll_wait + epoll_pwait", "perf", EPOLL_WAITS, 1),
    ("  epoll_ctl", "perf", ("syscalls:sys_enter_epoll_ctl",), 1),
    ("  getpid", "perf", ("syscalls:sys_enter_getpid",), 1),
    ("  clock_gettime", "perf", ("syscalls:sys_enter_clock_gettime",), 1),
    ("  mmap", "perf", ("syscalls:sys_enter_mmap",), 1),
    ("  munmap", "perf", ("syscalls:sys_enter_munmap",), 1),
    ("  brk", "perf", ("syscalls:sys_enter_brk",), 1),
    ("  madvise", "perf", ("syscalls:sys_enter_madvise",), 1),
    ("  mprotect", "perf", ("syscalls:sys_enter_mprotect",), 1),
    ("  mremap", "perf", ("syscalls:sys_enter_mremap",), 1),
)


def figure(part: dict[str, Any], section: str, keys: tuple[str, ...], scale: float) -> float | None:
    vals = [part[section].get(k) for k in keys]
    return None if any(v is None for v in vals) else sum(vals) * scale


def table(rounds: list[dict[str, Any]]) -> str:
    """Per call, median over rounds (each round in brackets), by process, and the
    ingress (all its processes) over HAProxy."""
    columns: list[tuple[str, str]] = []  # (target, role)
    for name, t in rounds[0]["targets"].items():
        columns += [(name, role) for role in t["parts"]]
    head = ["a churned call"] + [f"{n} {r}" if r != n else n for n, r in columns]
    head += ["ingress / haproxy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def per_round(name: str, role: str | None, row: tuple[Any, ...]) -> list[float | None]:
        out: list[float | None] = []
        for r in rounds:
            parts = r["targets"][name]["parts"]
            chosen = [parts[role]] if role else list(parts.values())
            vals = [figure(p, *row[1:]) for p in chosen]
            out.append(None if any(v is None for v in vals) else sum(vals))  # type: ignore[arg-type]
        return out

    def cell(vals: list[float | None]) -> str:
        got = [v for v in vals if v is not None]
        if not got:
            return "-"
        med = statistics.median(got)
        spread = ", ".join(f"{v:.2f}" for v in got)
        return f"{med:.2f} ({spread})" if len(got) > 1 else f"{med:.2f}"

    names = list(rounds[0]["targets"])
    for row in ROWS:
        cells = [cell(per_round(n, r, row)) for n, r in columns]
        ratio = "-"
        if "haproxy" in names and any(n.startswith("ingress") for n in names):
            ing = per_round(next(n for n in names if n.startswith("ingress")), None, row)
            hap = per_round("haproxy", None, row)
            ratios = [a / b for a, b in zip(ing, hap, strict=True) if a is not None and b]
            if ratios:
                ratio = f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})"
        lines.append("| " + " | ".join([row[0], *cells, ratio]) + " |")
    return "\n".join(lines)


def target_env(name: str, env: dict[str, str], variants: list[str]) -> dict[str, str] | None:
    """The environment of target `name`: `env` for an ingress, and for
    ``ingress@V`` what each ``--variant V:KEY=VALUE`` adds (``{repo}`` is this
    repository; a PYTHONPATH goes before the one `env` sets)."""
    if "@" not in name and not name.startswith("ingress"):
        return None
    out = dict(env) if name.startswith("ingress") else {}
    _, _, own = name.partition("@")
    repo = str(Path(__file__).resolve().parent.parent)
    for variant in variants:
        label, _, assignment = variant.partition(":")
        key, _, value = assignment.partition("=")
        if label != own or not key:
            continue
        value = value.replace("{repo}", repo)
        if key == "PYTHONPATH" and out.get(key):
            value = os.pathsep.join((value, out[key]))
        out[key] = value
    return out


def syscall_table(rounds: list[dict[str, Any]], least: float = 0.05) -> str:
    """With ``--syscalls``: every system call by name a call (median over the rounds),
    by process, those made at least `least` times a call by some process; and the
    threads each process had at the window's end."""
    columns: list[tuple[str, str]] = []
    for name, t in rounds[0]["targets"].items():
        columns += [(name, role) for role in t["parts"]]
    prefix = "syscalls:sys_enter_"
    names: set[str] = set()
    for r in rounds:
        for name, role in columns:
            perf = r["targets"][name]["parts"][role]["perf"]
            names |= {k for k, v in perf.items() if k.startswith(prefix) and v >= least}

    def med(name: str, role: str, key: str, section: str = "perf") -> float:
        vals = [r["targets"][name]["parts"][role][section].get(key) or 0.0 for r in rounds]
        return float(statistics.median(vals))

    head = ["system calls a call"] + [f"{n} {r}" if r != n else n for n, r in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(names, key=lambda k: -max(med(n, r, k) for n, r in columns))
    for key in order:
        cells = [f"{med(n, r, key):.2f}" for n, r in columns]
        lines.append("| " + " | ".join([key.removeprefix(prefix), *cells]) + " |")
    threads = [str(rounds[-1]["targets"][n]["parts"][r].get("threads", "-")) for n, r in columns]
    lines.append("| " + " | ".join(["threads (at the window's end)", *threads]) + " |")
    return "\n".join(lines)


def gc_table(rounds: list[dict[str, Any]]) -> str:
    out = []
    for r in rounds:
        for name, t in r["targets"].items():
            for role, p in t["parts"].items():
                if p["gc"]:
                    out.append(f"round {r['round']} {name} {role}: {json.dumps(p['gc'])}")
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kernel-cost-", dir=args.out))
    run_args = SimpleNamespace(
        profile="twilio-like",
        route="/ws/",
        fleet_capacity=max(64, int(args.rate * args.call_seconds * 2) + 16),
        generators=1,
        calls_per_generator=250,
    )
    run = Run(run_args, work, args.out)
    gc_dir: Path | None = None
    env: dict[str, str] = {}
    if args.variant_pythonpath:
        env["PYTHONPATH"] = args.variant_pythonpath
    if args.gc:
        gc_dir = work / "gc"
        hook = work / "gc-hook"
        gc_dir.mkdir()
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(GC_HOOK)
        paths = [env.get("PYTHONPATH"), str(hook)]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["KERNEL_COST_GC_DIR"] = str(gc_dir)
    rounds = []
    try:
        await run.start_fleets()
        targets = []
        for name in args.targets:
            target = await run.start(name, target_env(name, env, args.variant))
            log(f"{name} ready (pid {target.pid}): {parts_of(target)}")
            targets.append(target)
        await asyncio.sleep(1.5)
        for n in range(1, args.rounds + 1):
            if args.shape == "lockstep":
                r = await lockstep_round(run, targets, args, n)
            else:
                r = await one_round(run, targets, args, n, gc_dir)
            calls = {k: v["calls_started"] for k, v in r["targets"].items()}
            log(f"round {n}: calls {calls}, host {r['host_cores']} cores busy")
            rounds.append(r)
            await run.fleets_idle()
    finally:
        await run.children.stop_all()
    (args.out / "kernel_cost.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds}, indent=1)
    )
    print(table(rounds))
    if args.perf_dso:
        print(dso_table(rounds))
    if args.gc:
        print(gc_table(rounds))
    if args.syscalls:
        print(syscall_table(rounds))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(t["errors"] for r in rounds for t in r["targets"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=20.0, help="new calls a second, each target")
    p.add_argument("--seconds", type=float, default=15.0, help="of calls started, a round")
    p.add_argument("--call-seconds", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--targets", type=lambda s: s.split(","), default=["ingress", "haproxy"])
    p.add_argument(
        "--shape",
        choices=("churn", "lockstep"),
        default="churn",
        help="churn: the bench's paced calls; lockstep: call_instructions' back-to-back calls",
    )
    p.add_argument("--calls", type=int, default=200, help="lockstep: calls a target, a round")
    p.add_argument("--wave", type=int, default=5, help="lockstep: calls up at once")
    p.add_argument("--messages", type=int, default=4, help="lockstep: frames each way a call")
    p.add_argument("--idle-seconds", type=float, default=8.0, help="idle window, a round")
    p.add_argument(
        "--perf-dso",
        action="store_true",
        help="perf record (cpu-clock) each process over the window: on-CPU ms by object",
    )
    p.add_argument("--gc", action="store_true", help="count the ingress's cyclic GC")
    p.add_argument(
        "--syscalls",
        action="store_true",
        help="every system call by name (perf's syscalls:sys_enter_* tracepoints)",
    )
    p.add_argument("--variant-pythonpath", help="src of the ingress to run (default: this tree)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="environment of target ingress@NAME (repeatable; {repo}: this repository)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.seconds > 600 or args.rate * args.seconds > 20000 or args.calls > 20000:
        p.error("a round is bounded: --seconds <= 600, rate x seconds <= 20000")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
