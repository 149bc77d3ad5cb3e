"""What an idle ingress costs a second, beside HAProxy with the same fleets: counts, not times.

Runs fleet-ingress (``fleet-ingress run``, a supervisor and 1 worker) and HAProxy
(``nbthread 1``) as ``bench churn`` configures them (``bench.harness.targets``:
two simulated TLS fleets, each in its own process, probed every second with
fall 2 / rise 2, no stats listener, no access log), both in front of the same
fleets at once, gives each a few calls to warm it, lets them settle, and counts
each process over windows of ``--seconds`` with no call:

- ``--tool callgrind``: both proxies under ``valgrind --tool=callgrind``
  (fleet-ingress's worker too, ``--trace-children=yes``; counting turned on
  after the warm-up), each window zeroed and dumped (``callgrind_control``):
  instructions a second, and each function's own instructions a second
  (``--top``), by shared object too;
- ``--tool proc``: nothing attached for one window (``/proc/PID/task/*``:
  schedstat's run count, the times a thread was put on a CPU, preemptions
  included, and the voluntary context switches, its sleeps: wake-ups a second;
  the main thread's apart), then
  ``strace -f -c`` for another (system calls a second, by name);
- ``--tool cprofile``: fleet-ingress's processes under cProfile (a
  ``sitecustomize``, ``bench.wake_cost.PROFILE_HOOK``, its totals dumped at
  each window's start and end): each Python function's calls a second, to tell
  what the instructions went to (HAProxy is not counted).

Counts, so that a shared host does not skew them (valgrind and strace slow a
process, not what its clock asks of it). ``--variant-pythonpath`` counts another
tree's fleet-ingress (``git archive main src``) the same way::

    .venv/bin/python -m bench.idle_counts --tool proc --out /tmp/ic-proc
    .venv/bin/python -m bench.idle_counts --tool callgrind --seconds 20 --out /tmp/ic-cg
    .venv/bin/python -m bench.idle_counts --tool callgrind --targets ingress \\
        --variant-pythonpath /tmp/main/src --out /tmp/ic-cg-main

Every step is bounded (``STEP``), the whole run by ``--max-seconds``; every
process is stopped at the end (``Launched``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import callgrind, procfs
from bench.harness.carrier import FramePool, Recorder, echoed_call
from bench.harness.children import HOST, free_port, log
from bench.harness.launch import Launched, drain_notify, fresh_dir, variant_env, wait_port
from bench.harness.profile import strace_counts
from bench.harness.targets import (
    Settings,
    haproxy_binary,
    notify_socket,
    render_haproxy,
    render_ingress,
)
from bench.harness.tlsfiles import TLSFiles
from bench.wake_cost import DUMP_SIGNAL, PROFILE_HOOK
from bench.workers_count import RUN_INGRESS

STEP = 120.0  # seconds any one step may take (a call under valgrind, a dump)
WARMUP = 4  # calls through each proxy before counting (first-time paths, lazy imports)


def thread_runs(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread of ``pid``: (schedstat's run count, voluntary context switches)."""
    out: dict[int, tuple[int, int]] = {}
    task = Path(f"/proc/{pid}/task")
    try:
        tids = os.listdir(task)
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tids:
        try:
            runs = int((task / tid / "schedstat").read_text().split()[2])
            status = (task / tid / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        out[int(tid)] = (runs, int(m.group(1)) if m else 0)
    return out


def proc_window(roles: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    """Wake-ups a second of each process over ``seconds``, nothing attached."""
    before = {r: thread_runs(p) for r, p in roles.items()}
    time.sleep(seconds)
    after = {r: thread_runs(p) for r, p in roles.items()}
    out = {}
    for role, pid in roles.items():
        runs = vol = main = main_vol = 0
        for tid, (r, v) in after[role].items():
            r0, v0 = before[role].get(tid, (0, 0))
            runs, vol = runs + r - r0, vol + v - v0
            if tid == pid:
                main, main_vol = r - r0, v - v0
        out[role] = {
            "wakeups_per_s": round(runs / seconds, 2),
            "main_thread_wakeups_per_s": round(main / seconds, 2),
            "voluntary_switches_per_s": round(vol / seconds, 2),
            "main_thread_voluntary_per_s": round(main_vol / seconds, 2),
        }
    return out


def strace_window(roles: dict[str, int], seconds: float, work: Path, n: int) -> dict[str, Any]:
    """System calls a second of each process (``strace -f -c``), all attached at once."""
    tracers = {}
    for role, pid in roles.items():
        out = work / f"strace-{n}-{role}.txt"
        argv = ["strace", "-f", "-c", "-p", str(pid), "-o", str(out)]
        tracers[role] = (subprocess.Popen(argv, stderr=subprocess.DEVNULL), out)
    time.sleep(seconds)
    result = {}
    for role, (proc, out) in tracers.items():
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        counts = Counter({k: v["calls"] for k, v in strace_counts(out).items()})
        result[role] = {
            "syscalls_per_s": round(sum(counts.values()) / seconds, 2),
            "epoll_waits_per_s": round(
                sum(c for k, c in counts.items() if k.startswith("epoll_wait")) / seconds
                + counts.get("epoll_pwait", 0) / seconds,
                2,
            ),
            "by_name_per_s": {k: round(c / seconds, 2) for k, c in counts.most_common()},
        }
    return result


def callgrind_window(roles: dict[str, int], seconds: float, work: Path) -> dict[str, Any]:
    """Each process's instructions over ``seconds`` (zeroed, waited, dumped), and each
    function's own instructions in that dump."""
    for pid in roles.values():
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    t0 = time.monotonic()
    time.sleep(seconds)
    out = {}
    for role, pid in roles.items():
        before = set(work.glob(f"*/callgrind.out.{pid}*"))
        subprocess.run(
            ["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=STEP
        )
        new = sorted(set(work.glob(f"*/callgrind.out.{pid}*")) - before)
        took = time.monotonic() - t0
        total, functions = callgrind.own_counts(new[-1])
        out[role] = {"instructions": total, "seconds": round(took, 2), "functions": functions}
    return out


def cprofile_window(roles: dict[str, int], seconds: float, prof: Path) -> dict[str, Any]:
    """Each process's Python calls over ``seconds``: cProfile's totals dumped at the
    window's start and end (``PROFILE_HOOK``), the difference by function."""

    def dump() -> dict[int, Path]:
        before = {pid: set(prof.glob(f"{pid}-*.prof")) for pid in roles.values()}
        for pid in roles.values():
            os.kill(pid, DUMP_SIGNAL)
        out = {}
        for pid in roles.values():
            for _ in range(int(STEP * 10)):
                if new := set(prof.glob(f"{pid}-*.prof")) - before[pid]:
                    out[pid] = new.pop()
                    break
                time.sleep(0.1)
        time.sleep(0.5)  # written whole
        return out

    def calls(path: Path) -> dict[str, int]:
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        return {f"{f}:{line}({name})": row[1] for (f, line, name), row in stats.items()}

    first = dump()
    t0 = time.monotonic()
    time.sleep(seconds)
    last = dump()
    took = time.monotonic() - t0
    out = {}
    for role, pid in roles.items():
        a, b = calls(first[pid]), calls(last[pid])
        moved = {k: n - a.get(k, 0) for k, n in b.items() if n - a.get(k, 0) > 0}
        out[role] = {"seconds": round(took, 2), "calls": moved}
    return out


async def warm(port: int, tls: TLSFiles, calls: int, deadline: float) -> None:
    """``calls`` calls through the proxy on ``port``, one at a time, each with 4 frames
    echoed; retried until ``deadline`` while the proxy is not serving yet."""
    pool = FramePool.build("twilio-like")
    ctx = tls.carrier_context()
    done = 0
    while done < calls:
        try:
            await echoed_call(
                Recorder(), pool, (HOST, port), f"/ws/warm-{done}", ctx, done,
                messages=4, step=STEP / 4,
            )  # fmt: skip
        except (RuntimeError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)
            continue
        done += 1


def start(
    launched: Launched, argv: list[str], home: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    with (home / "stdout.log").open("wb") as out, (home / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(argv, env=env, cwd=home, stdout=out, stderr=err)
    launched.procs.append(proc)
    return proc


def roles_of(target: str, pid: int) -> dict[str, int]:
    if target == "haproxy":
        return {"haproxy": pid}
    tree = procfs.descendants(pid)
    return {"supervisor": tree[0]} | {f"worker{i}": p for i, p in enumerate(tree[1:], 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = fresh_dir(args.out)
    tls = TLSFiles.write(work)
    env = variant_env(args.variant_pythonpath)
    if args.variant_pythonpath:  # compiled as pip compiles: no compile counted in a window
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", args.variant_pythonpath],
            check=True,
            capture_output=True,
        )
    prof = work / "prof"
    if args.tool == "cprofile":
        hook = work / "prof-hook"
        prof.mkdir()
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(PROFILE_HOOK)
        paths = (str(hook), env.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    deadline = time.monotonic() + args.max_seconds
    notify: socket.socket | None = None
    with Launched(work, env) as launched:
        ports = [launched.fleet(name) for name in ("fleet-a", "fleet-b")]
        # As churn at 20 calls/s (maxconn max(64, peak + 16)); --check-interval: an ablation.
        settings = Settings(
            maxconn=64, check_interval=args.check_interval, check_timeout=args.check_timeout
        )
        procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        for target in args.targets:
            home = work / target
            home.mkdir()
            port = free_port()
            wrap: list[str] = []
            if args.tool == "callgrind":
                options = ["--instr-atstart=no"]
                options += ["--trace-children=yes"] if target == "ingress" else []
                wrap = callgrind.argv(f"{home}/callgrind.out.%p", *options)
            if target == "ingress":
                config = render_ingress(settings, tls, port, ports, home)
                argv = [sys.executable, "-c", RUN_INGRESS, "-c", str(config)]
                notify, sock_name = notify_socket()
                ingress_env = {**env, "NOTIFY_SOCKET": sock_name}
                if args.tool == "cprofile":
                    ingress_env["WAKE_COST_PROFILE_DIR"] = str(prof)
                proc = start(launched, [*wrap, *argv], home, ingress_env)
            else:
                binary = haproxy_binary()
                if binary is None:
                    raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
                config = render_haproxy(settings, tls, port, ports, home)
                proc = start(launched, [*wrap, binary, "-db", "-f", str(config)], home, env)
            procs[target] = (proc, port)
        for target, (proc, port) in procs.items():
            wait_port(port, deadline)
            asyncio.run(asyncio.wait_for(warm(port, tls, WARMUP, deadline), STEP * WARMUP))
            log(f"{target} serving (pid {proc.pid})")
        roles = {}
        for target, (proc, _) in procs.items():
            roles |= roles_of(target, proc.pid)
        log(f"counting {roles}")
        if args.tool == "callgrind":
            for pid in roles.values():
                subprocess.run(
                    ["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True
                )
        time.sleep(args.settle)
        windows = []
        for n in range(args.windows):
            if notify is not None:
                drain_notify(notify)
            if args.tool == "callgrind":
                window = callgrind_window(roles, args.seconds, work)
            elif args.tool == "cprofile":
                counted = {r: p for r, p in roles.items() if r != "haproxy"}
                window = cprofile_window(counted, args.seconds, prof)
            else:
                window = proc_window(roles, args.seconds)
                for role, v in strace_window(roles, args.seconds, work, n).items():
                    window[role] |= v
            said = {
                r: {k: v for k, v in w.items() if k not in ("functions", "by_name_per_s", "calls")}
                for r, w in window.items()
            }
            log(f"window {n + 1}: {json.dumps(said)}")
            windows.append(window)
        for proc, _ in procs.values():
            launched.stop(proc)
        if notify is not None:
            notify.close()
    return {"tool": args.tool, "roles": list(roles), "windows": windows, "settings": vars(args)}


def summary(result: dict[str, Any], top: int) -> str:
    windows, lines = result["windows"], []
    for role in result["roles"]:
        ws = [w[role] for w in windows if role in w]
        if not ws:
            continue
        if result["tool"] == "cprofile":
            names = set().union(*(w["calls"] for w in ws))
            per_s = {
                n: statistics.median(w["calls"].get(n, 0) / w["seconds"] for w in ws) for n in names
            }
            lines.append(f"{role}: Python calls a second, {sum(per_s.values()):,.1f} in all")
            lines += [
                f"  {v:10,.2f}/s  {n[-150:]}"
                for n, v in sorted(per_s.items(), key=lambda kv: -kv[1])[:top]
            ]
        elif result["tool"] == "callgrind":
            per_s = [w["instructions"] / w["seconds"] for w in ws]
            lines.append(
                f"{role}: {statistics.median(per_s) / 1e6:.3f} M instructions/s "
                f"(windows: {', '.join(f'{x / 1e6:.3f}' for x in per_s)})"
            )
            names = set().union(*(w["functions"] for w in ws))
            own = {
                n: statistics.median(w["functions"].get(n, 0) / w["seconds"] for w in ws)
                for n in names
            }
            objects: Counter[str] = Counter()
            for name, v in own.items():
                objects[callgrind.shared_object(name)] += int(v)
            lines += [f"  {v:12,.0f}/s  {o}" for o, v in objects.most_common(6)]
            lines += [
                f"  {v:12,.0f}/s  {n[:150]}"
                for n, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]
            ]
        else:
            keys = ("wakeups_per_s", "main_thread_wakeups_per_s", "voluntary_switches_per_s")
            keys += ("main_thread_voluntary_per_s",)
            keys += ("syscalls_per_s", "epoll_waits_per_s")
            lines.append(
                f"{role}: "
                + ", ".join(f"{k} {statistics.median(w[k] for w in ws):g}" for k in keys)
            )
            names = set().union(*(w["by_name_per_s"] for w in ws))
            by = {n: statistics.median(w["by_name_per_s"].get(n, 0) for w in ws) for n in names}
            lines.append(
                "  " + ", ".join(f"{n} {v:g}" for n, v in sorted(by.items(), key=lambda kv: -kv[1]))
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=("callgrind", "proc", "cprofile"), required=True)
    p.add_argument("--targets", type=lambda s: s.split(","), default=["ingress", "haproxy"])
    p.add_argument("--seconds", type=float, default=20.0, help="each window")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--settle", type=float, default=15.0, help="after the warm-up, before counting")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--check-interval",
        type=float,
        default=1.0,
        help="the fleets' probe interval (churn's: 1 s; a long one counts all but the probes)",
    )
    p.add_argument(
        "--check-timeout",
        type=float,
        default=1.0,
        help="a probe's timeout (churn's: 1 s); under callgrind on a busy host a probe may "
        "time out and the next one pay a new TLS handshake: 10 keeps the windows alike",
    )
    p.add_argument("--variant-pythonpath", help="src of the fleet-ingress to count")
    p.add_argument("--max-seconds", type=float, default=600.0, help="to start and warm")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not set(args.targets) <= {"ingress", "haproxy"} or not args.targets:
        p.error("--targets: ingress, haproxy or both")
    if not 1 <= args.seconds <= 120 or not 1 <= args.windows <= 10:
        p.error("--seconds 1..120, --windows 1..10: every run is bounded")
    result = run(args)
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(summary(result, args.top))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
