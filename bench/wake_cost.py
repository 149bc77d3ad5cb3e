"""What a relayed message costs the kernel at N steady calls: system calls, epoll waits, wake-ups.

Runs fleet-ingress (a supervisor and one worker) and HAProxy (``nbthread 1``) in
front of the same two simulated fleets, one target at a time (the order rotated
each round), each under the steady scenario's load (``python -m bench steady``:
N twilio-like calls streaming, started at evenly spread frame phases) at each
``--calls`` level, and reads for every proxy process over a window of ``--seconds``,
divided by the WebSocket messages relayed in it (a frame and its echo are 2):

- from ``perf stat`` (the kernel's tracepoints, counted: nothing stopped): every
  system call, the epoll waits (``epoll_wait`` + ``epoll_pwait``) and of them those
  that returned no event (a timer's wake, not a socket's: ``sys_exit`` with
  ``ret == 0``), ``epoll_ctl``, the reads and writes; with ``--syscalls`` every
  system call by name;
- from /proc: voluntary context switches (the process slept: one wake-up each;
  all threads, and the main thread's alone) and involuntary ones.

Messages a wake (the inverse of the wake-ups a message) is the figure HAProxy
improves with load: a wait that returns more ready sockets serves more messages.
Both proxies see the same load on the same host minutes apart: read the
ratios of counts (``ingress / haproxy``), not times::

    python -m bench.wake_cost --calls 100 300 --seconds 10 --rounds 2 --out DIR
    python -m bench.wake_cost --calls 100 --targets ingress,ingress@new,haproxy \\
        --variant new:PYTHONPATH=/tmp/new/src --out DIR

``--python-calls`` also counts the ingress worker's Python calls over the window
(cProfile turned on in the worker by a ``sitecustomize`` on its PYTHONPATH, its
totals dumped on SIGRTMIN+7 at the window's start and end): per message and per
second, by function, with the loop's timer and callback methods (``call_later``,
``call_at``, ``call_soon``, ``TimerHandle.cancel``) picked out. The profiler slows
the worker: take the other figures from a run without it.

``--instructions`` counts instead what a wake costs in instructions, apart from its
messages (callgrind: user space, the kernel not counted), for the one-process
ingress (``ingress1p``: the worker's ``Ingress``) and HAProxy: message_instructions'
load (N calls held, each frame sent after the last one's echo, run with M1 and M2
frames a call: the difference is the messages' own) at two ``--waves`` (calls up at
once: 1 wakes the proxy about once a message, more wake it less), the epoll waits
counted in the same files (calls to ``epoll_wait`` / ``epoll_pwait``). Two points
give a message's own instructions and a wake's (the line through them)::

    python -m bench.wake_cost --instructions --waves 1 20 --out DIR

Writes ``DIR/wake_cost.json`` and prints a table a message (median of the rounds,
each round in brackets). Every load is bounded: N calls for ramp + settle +
``--seconds``, each generator stopped by that + 60 s. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.harness.carrier import FramePool
from bench.harness.children import log
from bench.harness.run import RAMP, SETTLE, Run, msgs_between
from bench.harness.stats import stagger
from bench.harness.targets import Target
from bench.kernel_cost import parse_perf_stat, parts_of, proc_counters, target_env

# Each -e its own: a --filter applies to every event of the -e before it.
PERF_EVENTS: tuple[tuple[str, str | None], ...] = (
    ("task-clock", None),
    ("context-switches", None),
    ("raw_syscalls:sys_enter", None),
    ("syscalls:sys_enter_epoll_wait", None),
    ("syscalls:sys_enter_epoll_pwait", None),
    ("syscalls:sys_exit_epoll_wait", "ret == 0"),
    ("syscalls:sys_exit_epoll_pwait", "ret == 0"),
    ("syscalls:sys_enter_epoll_ctl", None),
    ("syscalls:sys_enter_read", None),
    ("syscalls:sys_enter_recvfrom", None),
    ("syscalls:sys_enter_write", None),
    ("syscalls:sys_enter_sendto", None),
    ("syscalls:sys_enter_clock_gettime", None),
    ("syscalls:sys_enter_getpid", None),
)

# cProfile in every process whose environment has WAKE_COST_PROFILE_DIR: its
# totals dumped to DIR/PID-K.prof on each SIGRTMIN+7 (K counts the dumps).
PROFILE_HOOK = """
import os
_dir = os.environ.get("WAKE_COST_PROFILE_DIR")
if _dir:
    import cProfile, signal
    _prof = cProfile.Profile()
    _n = [0]
    def _dump(signum, frame):
        _prof.disable()
        _n[0] += 1
        _prof.dump_stats(os.path.join(_dir, "%d-%d.prof" % (os.getpid(), _n[0])))
        _prof.enable()
    signal.signal(signal.SIGRTMIN + 7, _dump)
    _prof.enable()
"""
DUMP_SIGNAL = signal.SIGRTMIN + 7

# The loop's timer and callback methods, as cProfile names them (uvloop's C methods).
LOOP_METHODS = ("call_later", "call_at", "call_soon", "call_soon_threadsafe", "cancel")


def perf_argv(pid: int, seconds: float, out: Path, by_name: bool) -> list[str]:
    argv = [shutil.which("perf") or "perf", "stat", "-x", ","]
    for event, filt in PERF_EVENTS:
        argv += ["-e", event] + (["--filter", filt] if filt else [])
    if by_name:
        argv += ["-e", "syscalls:sys_enter_*"]
    return [*argv, "-p", str(pid), "-o", str(out), "--timeout", str(int(seconds * 1000))]


def main_thread_voluntary(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def perf_figures(counted: dict[str, float]) -> dict[str, float]:
    """perf's counts as the figures of the table (exit events counted with ret == 0)."""

    def get(*keys: str) -> float:
        return sum(counted.get(k, 0.0) for k in keys)

    out = {
        "syscalls": get("raw_syscalls:sys_enter"),
        "epoll_waits": get("syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait"),
        "epoll_waits_empty": get("syscalls:sys_exit_epoll_wait", "syscalls:sys_exit_epoll_pwait"),
        "epoll_ctl": get("syscalls:sys_enter_epoll_ctl"),
        "reads": get("syscalls:sys_enter_read", "syscalls:sys_enter_recvfrom"),
        "writes": get("syscalls:sys_enter_write", "syscalls:sys_enter_sendto"),
        "clock_gettime": get("syscalls:sys_enter_clock_gettime"),
        "getpid": get("syscalls:sys_enter_getpid"),
        "context_switches_perf": get("context-switches"),
        "task_clock_ms": get("task-clock"),
    }
    for key, value in counted.items():
        if key.startswith("syscalls:sys_enter_") and key not in dict(PERF_EVENTS):
            out["by_name:" + key.removeprefix("syscalls:sys_enter_")] = value
    return out


def profile_delta(a: Path, b: Path) -> dict[str, float]:
    """Python calls between two cumulative cProfile dumps, by function label."""
    from bench.call_profile import costs_of, label, per_call

    before, after = (costs_of(pstats.Stats(str(p)).stats) for p in (a, b))
    return {label(k): c.calls for k, c in per_call(before, after, 1).items() if c.calls}


async def one_level(
    run: Run, target: Target, calls: int, args: argparse.Namespace, n: int, prof_dir: Path | None
) -> dict[str, Any]:
    interval = FramePool.build(run.args.profile).interval
    gap = stagger(calls, interval, RAMP)
    ramp = gap * (calls - 1)
    parts = parts_of(target)
    t0 = time.monotonic() + 0.5
    gens = await run.generators(
        target,
        calls=calls,
        mode="stream",
        t0=t0,
        gap=gap,
        max_seconds=ramp + SETTLE + args.seconds + 60,
    )
    await asyncio.sleep(max(0.0, t0 + ramp + SETTLE - time.monotonic()))
    safe = target.name.replace("@", "-")
    perfs = {}
    for pid, role in parts.items():
        out = args.out / f"perf-r{n}-c{calls}-{safe}-{role.replace(' ', '')}.txt"
        argv = perf_argv(pid, args.seconds, out, args.syscalls)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        perfs[pid] = (out, proc)
    profiled = [p for p, r in parts.items() if prof_dir is not None and r != "haproxy"]
    dumps_a = _dump_profiles(profiled, prof_dir)
    ta = time.monotonic()
    before = {pid: (proc_counters(pid), main_thread_voluntary(pid)) for pid in parts}
    await asyncio.sleep(args.seconds)
    tb = time.monotonic()
    after = {pid: (proc_counters(pid), main_thread_voluntary(pid)) for pid in parts}
    dumps_b = _dump_profiles(profiled, prof_dir)
    async with asyncio.timeout(30):
        for _, proc in perfs.values():
            await proc.wait()
    recs = await gens.stop(timeout=30)
    msgs = msgs_between(recs, ta, tb)
    window = tb - ta
    errors = sum(r.failed + r.lost + r.corrupt for r in recs)
    by_part = {}
    for pid, role in parts.items():
        (a, ma), (b, mb) = before[pid], after[pid]
        out, _ = perfs[pid]
        counted = perf_figures(parse_perf_stat(out.read_text())) if out.exists() else {}
        counts = {
            **counted,
            "ctx_voluntary": b["ctx_voluntary"] - a["ctx_voluntary"],
            "ctx_voluntary_main": mb - ma,
            "ctx_involuntary": b["ctx_involuntary"] - a["ctx_involuntary"],
            "cpu_ms": 1000 * (b["utime_s"] + b["stime_s"] - a["utime_s"] - a["stime_s"]),
        }
        part: dict[str, Any] = {"pid": pid, "counts": counts}
        if pid in dumps_a and pid in dumps_b:
            await asyncio.to_thread(_wait_for, dumps_b[pid])
            await asyncio.to_thread(_wait_for, dumps_a[pid])
            part["python_calls"] = profile_delta(dumps_a[pid], dumps_b[pid])
        by_part[role] = part
    await run.fleets_idle()
    return {
        "round": n,
        "calls": calls,
        "target": target.name,
        "window_s": round(window, 3),
        "messages": msgs,
        "errors": errors,
        "parts": by_part,
    }


def _dump_profiles(pids: list[int], prof_dir: Path | None) -> dict[int, Path]:
    """Ask each profiled process for its totals now: the file each will write."""
    out = {}
    for pid in pids:
        assert prof_dir is not None
        k = len(list(prof_dir.glob(f"{pid}-*.prof"))) + 1
        os.kill(pid, DUMP_SIGNAL)
        out[pid] = prof_dir / f"{pid}-{k}.prof"
    return out


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    """Until `path` is written (bounded by `timeout`): run in a thread."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # written whole (dump_stats: one write, then close)


ROWS = (
    ("system calls", "syscalls"),
    ("epoll waits", "epoll_waits"),
    ("  of them returning no event", "epoll_waits_empty"),
    ("epoll_ctl", "epoll_ctl"),
    ("read + recvfrom", "reads"),
    ("write + sendto", "writes"),
    ("clock_gettime", "clock_gettime"),
    ("getpid", "getpid"),
    ("wake-ups (voluntary switches, all threads)", "ctx_voluntary"),
    ("  the main thread's", "ctx_voluntary_main"),
    ("involuntary switches", "ctx_involuntary"),
)


def per_message(level: dict[str, Any], key: str, role: str | None = None) -> float | None:
    msgs = level["messages"]
    if not msgs:
        return None
    parts = level["parts"]
    chosen = [parts[role]] if role else list(parts.values())
    vals = [p["counts"].get(key) for p in chosen]
    if any(v is None for v in vals):
        return None
    return float(sum(vals)) / msgs


def table(levels: list[dict[str, Any]], calls: int) -> str:
    mine = [lv for lv in levels if lv["calls"] == calls]
    names = list(dict.fromkeys(lv["target"] for lv in mine))
    columns: list[tuple[str, str | None]] = []
    for name in names:
        roles = next(lv["parts"] for lv in mine if lv["target"] == name)
        columns += [(name, r) for r in roles] if len(roles) > 1 else [(name, None)]
    ingress = next((n for n in names if n.startswith("ingress")), None)
    head = [f"a message at {calls} calls"]
    head += [f"{n} {r}" if r else n for n, r in columns]
    if ingress and "haproxy" in names:
        head.append(f"{ingress} / haproxy")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def vals(name: str, key: str, role: str | None) -> list[float]:
        got = [per_message(lv, key, role) for lv in mine if lv["target"] == name]
        return [v for v in got if v is not None]

    def cell(got: list[float]) -> str:
        if not got:
            return "-"
        med = statistics.median(got)
        return f"{med:.3f} ({', '.join(f'{v:.3f}' for v in got)})" if len(got) > 1 else f"{med:.3f}"

    rows = [*ROWS, ("messages a wake (main thread)", "msgs_per_wake")]
    for label, key in rows:
        if key == "msgs_per_wake":
            cells = []
            for n, r in columns:
                w = vals(n, "ctx_voluntary_main", r)
                cells.append(cell([1 / v for v in w if v]))
        else:
            cells = [cell(vals(n, key, r)) for n, r in columns]
        line = [label, *cells]
        if ingress and "haproxy" in names:
            k = "ctx_voluntary_main" if key == "msgs_per_wake" else key
            # The ingress's processes summed, round by round, over HAProxy's.
            a = [
                per_message(lv, k)
                for lv in mine
                if lv["target"] == ingress and per_message(lv, k) is not None
            ]
            b = [
                per_message(lv, k)
                for lv in mine
                if lv["target"] == "haproxy" and per_message(lv, k) is not None
            ]
            ratios = [x / y for x, y in zip(a, b, strict=False) if x is not None and y]
            if key == "msgs_per_wake":
                ratios = [1 / r for r in ratios if r]
            line.append(cell(ratios))
        lines.append("| " + " | ".join(line) + " |")
    msgs = {n: [lv["messages"] for lv in mine if lv["target"] == n] for n in names}
    lines.append(f"\nmessages a window: {msgs}")
    return "\n".join(lines)


def python_table(levels: list[dict[str, Any]], top: int = 25) -> str:
    """The profiled processes' Python calls a message and a second, by function."""
    out = []
    for lv in levels:
        for role, part in lv["parts"].items():
            calls = part.get("python_calls")
            if not calls or not lv["messages"]:
                continue
            total = sum(calls.values())
            w, m = lv["window_s"], lv["messages"]
            out.append(
                f"round {lv['round']}, {lv['calls']} calls, {lv['target']} {role}: "
                f"{total / m:.1f} Python calls a message, {total / w:,.0f} a second "
                f"({m / w:,.0f} messages a second)"
            )
            loop = {k: v for k, v in calls.items() if any(f"'{x}'" in k for x in LOOP_METHODS)}
            for k, v in sorted(loop.items(), key=lambda kv: -kv[1]):
                out.append(f"    {v / w:10.1f} a second  {v / m:8.4f} a message  {k}")
            out.append("  top functions:")
            for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:top]:
                out.append(f"    {v / w:10.1f} a second  {v / m:8.4f} a message  {k}")
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wake-cost-", dir=args.out))
    top_calls = max(args.calls)
    run_args = SimpleNamespace(
        profile="twilio-like",
        route="/ws/",
        fleet_capacity=top_calls + 16,
        generators=0,
        calls_per_generator=250,
    )
    run = Run(run_args, work, args.out)
    env: dict[str, str] = {}
    prof_dir: Path | None = None
    if args.python_calls:
        prof_dir = work / "prof"
        hook = work / "prof-hook"
        prof_dir.mkdir()
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(PROFILE_HOOK)
        env["PYTHONPATH"] = str(hook)
        env["WAKE_COST_PROFILE_DIR"] = str(prof_dir)
    levels = []
    try:
        await run.start_fleets()
        targets = []
        for name in args.targets:
            target = await run.start(name, target_env(name, env, args.variant))
            log(f"{name} ready (pid {target.pid}): {parts_of(target)}")
            targets.append(target)
        await asyncio.sleep(1.5)
        for n in range(1, args.rounds + 1):
            k = (n - 1) % len(targets)
            order = targets[k:] + targets[:k]
            for calls in args.calls:
                for target in order:
                    lv = await one_level(run, target, calls, args, n, prof_dir)
                    log(
                        f"round {n}, {calls} calls, {target.name}: {lv['messages']} messages "
                        f"in {lv['window_s']} s, {lv['errors']} errors"
                    )
                    levels.append(lv)
    finally:
        await run.children.stop_all()
    (args.out / "wake_cost.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "levels": levels}, indent=1)
    )
    for calls in args.calls:
        print(table(levels, calls))
        print()
    if args.python_calls:
        print(python_table(levels))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(lv["errors"] for lv in levels) else 0


_CALLED = re.compile(r"^c?fn=\((\d+)\)(?: (.*))?$")


def calls_to(cg: Path, names: tuple[str, ...]) -> dict[str, int]:
    """Calls to the functions ``names`` in a callgrind file (``calls=N`` lines after a
    ``cfn=``; names compressed to ``(id)`` after their first mention)."""
    ids: dict[str, str] = {}
    out = dict.fromkeys(names, 0)
    callee: str | None = None
    with cg.open(errors="replace") as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                m = _CALLED.match(line.rstrip("\n"))
                if m is None:
                    continue
                if m.group(2) is not None:
                    ids[m.group(1)] = m.group(2)
                if line.startswith("cfn="):
                    callee = ids.get(m.group(1))
            elif line.startswith("calls=") and callee in out:
                out[callee] += int(line.split("=", 1)[1].split()[0])
    return out


EPOLL_FUNCTIONS = ("epoll_wait", "epoll_pwait")


def instructions_mode(args: argparse.Namespace) -> int:
    """A wake's instructions and a message's own, for ingress1p and HAProxy (callgrind)."""
    from bench.call_instructions import WARMUP, count, totals

    m1, m2 = args.messages
    relayed = (args.instruction_calls + WARMUP) * (m2 - m1) * 2
    results: dict[str, dict[str, Any]] = {}
    for name in args.instruction_targets:
        base = {"ingress1p": "ingress", "haproxy": "haproxy"}[name]
        for wave in args.waves:
            run_args = argparse.Namespace(
                target=base, counter="callgrind", variant_pythonpath=None,
                wave=wave, max_seconds=900.0, access=None,
            )  # fmt: skip
            files = []
            for m in (m1, m2):
                run_args.messages = m
                out = args.out / name
                files.append(count(args.instruction_calls, out, run_args, run=f"w{wave}-m{m}"))
            (a, b), (wa, wb) = (
                (totals(f)["PROGRAM TOTALS"] for f in files),
                (calls_to(f, EPOLL_FUNCTIONS) for f in files),
            )
            waits = sum(wb.values()) - sum(wa.values())
            results[f"{name} wave {wave}"] = {
                "target": name,
                "wave": wave,
                "instructions_a_message": (b - a) / relayed,
                "waits_a_message": waits / relayed,
                "waits_by_function": {k: (wb[k] - wa[k]) / relayed for k in wb},
            }
            log(f"{name} wave {wave}: {json.dumps(results[f'{name} wave {wave}'])}")
            (args.out / "wake_cost.json").write_text(json.dumps(results, indent=1))
    print(f"| callgrind, {relayed} messages | instructions a message | epoll waits a message |")
    print("|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['instructions_a_message']:,.0f} | {r['waits_a_message']:.3f} |")
    for name in args.instruction_targets:
        pts = [r for r in results.values() if r["target"] == name]
        if len(pts) == 2 and pts[0]["waits_a_message"] != pts[1]["waits_a_message"]:
            p, q = pts
            wake = (p["instructions_a_message"] - q["instructions_a_message"]) / (
                p["waits_a_message"] - q["waits_a_message"]
            )
            own = p["instructions_a_message"] - wake * p["waits_a_message"]
            print(f"{name}: a wake {wake:,.0f} instructions, a message's own {own:,.0f}")
    return 0


def stored_wakes(dirs: list[Path]) -> str:
    """Wake-ups and read/write system calls a message from stored steady and ramp runs
    (``results.json``: ``loads.proxy_sleeps``, the voluntary context switches of the
    proxy's processes, and ``proxy_syscalls``, /proc/PID/io's syscr + syscw; HAProxy's
    io file is not readable to the harness: 0), by target, calls and round."""
    lines = [
        "| run | target | calls | round | messages | wake-ups a message | read+write a message |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in dirs:
        data = json.loads((d / "results.json").read_text())
        for n, rnd in enumerate(data["rounds"], 1):
            for name, t in rnd.items():
                if not isinstance(t, dict) or name == "direct":
                    continue
                levels = t.get("levels") or [t]
                for lv in levels:
                    loads = lv.get("loads") or {}
                    msgs = lv.get("msgs_window") or lv.get("msgs")
                    if not msgs or "proxy_sleeps" not in loads:
                        continue
                    calls = lv.get("calls") or data.get("params", {}).get("calls", "-")
                    sleeps = loads["proxy_sleeps"] / msgs
                    io = loads.get("proxy_syscalls", 0) / msgs
                    row = [
                        d.name,
                        name,
                        str(calls),
                        str(n),
                        str(msgs),
                        f"{sleeps:.3f}",
                        f"{io:.3f}",
                    ]
                    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, nargs="+", default=[100, 300], help="levels, each round")
    p.add_argument("--seconds", type=float, default=10.0, help="window a level")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--targets", type=lambda s: s.split(","), default=["ingress", "haproxy"])
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="environment of target ingress@NAME (repeatable; {repo}: this repository)",
    )
    p.add_argument("--syscalls", action="store_true", help="every system call by name")
    p.add_argument(
        "--python-calls",
        action="store_true",
        help="cProfile in the ingress's processes: Python calls a message and a second",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="callgrind instead: a wake's instructions and a message's own (ingress1p, haproxy)",
    )
    p.add_argument("--waves", type=int, nargs=2, default=[1, 20], help="--instructions: calls up")
    p.add_argument("--instruction-calls", type=int, default=20, help="--instructions: calls")
    p.add_argument(
        "--instruction-targets",
        type=lambda s: s.split(","),
        default=["ingress1p", "haproxy"],
        help="--instructions: of ingress1p, haproxy (HAProxy under callgrind on a busy host "
        "answered 503 to a wave of 20: its fleet connect past 3 s; --waves 1 10 for it)",
    )
    p.add_argument("--messages", type=int, nargs=2, default=[10, 60], metavar=("M1", "M2"))
    p.add_argument(
        "--stored",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="print wake-ups a message from stored steady / ramp runs' results.json and exit",
    )
    p.add_argument("--out", type=Path, required="--stored" not in (argv or sys.argv))
    args = p.parse_args(argv)
    if args.stored:
        print(stored_wakes(args.stored))
        return 0
    if args.instructions:
        if unknown := set(args.instruction_targets) - {"ingress1p", "haproxy"}:
            p.error(f"--instruction-targets: unknown {sorted(unknown)}")
        args.out.mkdir(parents=True, exist_ok=True)
        return instructions_mode(args)
    if args.seconds > 120 or max(args.calls) > 1000 or args.rounds > 10:
        p.error("bounded: --seconds <= 120, --calls <= 1000, --rounds <= 10")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
