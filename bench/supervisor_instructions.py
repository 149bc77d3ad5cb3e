"""The supervisor's instructions per churned call, counted (callgrind), not timed.

Runs ``fleet-ingress run`` (1 worker, 2 simulated TLS fleets probed every
second, as ``bench churn`` configures it) with the supervisor alone under
``valgrind --tool=callgrind`` (its workers are not traced: they run natively),
then counts it over windows of the same length, each zeroed and dumped with
``callgrind_control``: one with no calls (the background: health probes, report
pulls, timers) and one per rate (calls started at an even pace for
``--seconds``, each held ``--call-seconds`` from its start, ``--messages``
frames echoed one by one, closed 1000). Every window lasts ``--seconds`` +
``--call-seconds`` + ``SETTLE``, so that all of a window's calls end inside it.
What a call costs the supervisor is the slope between the two rates::

    python -m bench.supervisor_instructions --out /tmp/si              # idle, 4/s, 20/s
    python -m bench.supervisor_instructions --out DIR --variant-pythonpath /tmp/base/src
    python -m bench.supervisor_instructions --out DIR --workers 2        # no lone budget

Prints, per window, the supervisor's instructions and voluntary context
switches (its wake-ups, from ``/proc/PID/status``), then the background a
second (the window with no calls), the slope per call, and what is beyond
both while calls run (their reports, sent each second while calls are live),
and each function's own instructions per call and a second with no call, by
shared object too. ``--strace`` counts the supervisor's system calls in each
window (``strace -c``; it slows the process: not with instructions), and
``--native`` runs the same windows without valgrind, reading its utime+stime
from ``/proc`` (a second check; CPU time means something on a quiet host
only). ``--profile FILE`` (with ``--native``) runs the supervisor under
cProfile for the whole run: two runs' call counts, one with ``--rates`` and
one without, tell Python functions a call apart. Session 39's figures are in
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import callgrind, procfs
from bench.harness.carrier import FramePool, Recorder, echoed_call
from bench.harness.children import HOST, REPO, free_port, log
from bench.harness.launch import (
    Launched,
    drain_notify,
    fresh_dir,
    variant_env,
    wait_notified_ready,
)
from bench.harness.profile import strace_counts
from bench.harness.targets import Settings, notify_socket, render_ingress
from bench.harness.tlsfiles import TLSFiles

STEP = 30.0  # seconds any one step of a call may take
SETTLE = 1.5  # seconds after a window's last call should have ended, before its dump
READY_SECONDS = 300.0  # fleet-ingress under callgrind imports slowly
WARMUP = 5  # calls before the first window (first-time paths)


async def paced(port: int, tls: TLSFiles, calls: int, seconds: float, args) -> None:
    """``calls`` calls started evenly over ``seconds`` (none: nothing), all awaited."""
    rec = Recorder()
    pool = FramePool.build("twilio-like")
    ctx = tls.carrier_context()
    t0 = time.monotonic()
    tasks = []
    for i in range(calls):
        await asyncio.sleep(max(0.0, t0 + i * seconds / calls - time.monotonic()))
        call = echoed_call(
            rec, pool, (HOST, port), f"/ws/si-{i}", ctx, i * 7,
            messages=args.messages, step=STEP, hold=args.call_seconds,
        )  # fmt: skip
        tasks.append(asyncio.create_task(call))
    await asyncio.gather(*tasks)


def proc_counts(pid: int) -> dict[str, int]:
    """The supervisor's CPU ticks (utime+stime) and context switches, from /proc."""
    _, stat = procfs.read_stat(pid)
    status = Path(f"/proc/{pid}/status").read_text()
    switches = {
        k: int(v)
        for k, v in re.findall(
            r"^(voluntary_ctxt_switches|nonvoluntary_ctxt_switches):\s+(\d+)", status, re.M
        )
    }
    return {"ticks": int(stat[11]) + int(stat[12]), **switches}


def run(args: argparse.Namespace) -> dict:
    work = fresh_dir(args.out)
    tls = TLSFiles.write(work)
    env = variant_env(args.variant_pythonpath)
    compile_variant(args)
    notify, env["NOTIFY_SOCKET"] = notify_socket()
    with notify, Launched(work, env) as launched:
        ports = [launched.fleet(name) for name in ("fleet-a", "fleet-b")]
        port = free_port()
        settings = Settings(maxconn=1000, ingress_workers=args.workers)
        config = render_ingress(settings, tls, port, ports, work)
        argv = [sys.executable, "-m", "fleet_ingress", "run", "-c", str(config)]
        if args.profile:
            # cProfile over the whole run (no windows): compare two runs' call counts.
            argv[1:1] = ["-m", "cProfile", "-o", str(args.profile.resolve())]
        if not args.native:
            argv = [*callgrind.argv(work / "callgrind.out"), *argv]
        proc = launched.start(argv)
        wait_notified_ready(proc, notify, time.monotonic() + READY_SECONDS)
        log(f"supervisor {proc.pid} ready")
        asyncio.run(paced(port, tls, WARMUP, 1.0, args))
        # Past the first of every periodic task (report pulls, STATUS=, the fd
        # store's snapshot): what each imports the first time is not counted.
        time.sleep(args.settle)
        windows = []
        length = args.seconds + args.call_seconds + SETTLE
        idle = [0.0] * args.idle_windows if args.idle else []
        for rate in idle + list(args.rates) * args.repeat:
            calls = round(rate * args.seconds)
            drain_notify(notify)
            if not args.native:
                subprocess.run(
                    ["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True
                )
            tracer = None
            if args.strace:
                traced = work / f"strace-{len(windows)}.txt"
                tracer = subprocess.Popen(
                    ["strace", "-c", "-p", str(proc.pid), "-o", str(traced)],
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)  # attached
            before = proc_counts(proc.pid)
            t0 = time.monotonic()
            if calls:
                asyncio.run(
                    asyncio.wait_for(paced(port, tls, calls, args.seconds, args), length + STEP)
                )
            time.sleep(max(0.0, t0 + length - time.monotonic()))
            after = proc_counts(proc.pid)
            window = {"rate": rate, "calls": calls, "seconds": round(time.monotonic() - t0, 2)}
            window.update({k: after[k] - before[k] for k in after})
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
                by_name = {n: row["calls"] for n, row in strace_counts(traced).items()}
                window["syscalls_by_name"] = {**by_name, "total": sum(by_name.values())}
                window["syscalls"] = window["syscalls_by_name"]["total"]
            if not args.native:
                dumps = set(work.glob("callgrind.out*"))
                subprocess.run(
                    ["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True
                )
                new = sorted(set(work.glob("callgrind.out*")) - dumps)
                window["instructions"], window["functions"] = callgrind.own_counts(new[-1])
            said = {k: v for k, v in window.items() if k != "functions"}
            log(f"window {rate}/s: {json.dumps(said)}")
            windows.append(window)
        launched.stop(proc)
        return {"length": length, "windows": windows}


def summarize(result: dict, args: argparse.Namespace) -> None:
    windows = result["windows"]
    idle = [w for w in windows if not w["calls"]]
    busy = sorted((w for w in windows if w["calls"]), key=lambda w: w["calls"])
    lo = [w for w in busy if w["calls"] == busy[0]["calls"]]
    hi = [w for w in busy if w["calls"] == busy[-1]["calls"]]

    def mean(ws, key):
        """The median of the windows' (a window now and then holds a collection
        of the interpreter's oldest generation, some 20 M instructions)."""
        return statistics.median(w[key] for w in ws)

    keys = ["voluntary_ctxt_switches", "ticks"] + ([] if args.native else ["instructions"])
    keys += ["syscalls"] if args.strace else []
    dn = mean(hi, "calls") - mean(lo, "calls")
    for key in keys:
        bg = mean(idle, key) / result["length"]
        per = (mean(hi, key) - mean(lo, key)) / dn if dn else float("nan")
        extra = (mean(lo, key) - mean(idle, key) - per * mean(lo, "calls")) / result["length"]
        print(
            f"{key}: background {bg:,.1f}/s with no call; per call {per:,.1f}; "
            f"while calls run, beyond both: {extra:,.1f}/s"
        )
    if args.native:
        hz = os.sysconf("SC_CLK_TCK")
        per_ms = (mean(hi, "ticks") - mean(lo, "ticks")) / dn * 1000 / hz if dn else 0
        background = mean(idle, "ticks") / hz / result["length"] * 1000
        print(f"CPU per call (slope): {per_ms:.3f} ms; background {background:.2f} ms/s")
        return
    names = set().union(*(w["functions"] for w in idle + lo + hi))

    def per(ws, name):
        return statistics.median(w["functions"].get(name, 0) for w in ws)

    per_call = {n: (per(hi, n) - per(lo, n)) / dn for n in names}
    per_second = {n: per(idle, n) / result["length"] for n in names}
    for what, costs, unit in (
        ("per call", per_call, ""),
        ("a second with no call", per_second, "/s"),
    ):
        objects: dict[str, float] = {}
        for name, v in costs.items():
            obj = callgrind.shared_object(name)
            objects[obj] = objects.get(obj, 0.0) + v
        print(f"own instructions {what}, by shared object:")
        for name, v in sorted(objects.items(), key=lambda kv: -kv[1])[:8]:
            print(f"{v:14,.0f}{unit}  {name}")
        print(f"top {args.top} functions {what}, own instructions:")
        for name, v in sorted(costs.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"{v:14,.0f}{unit}  {name[:160]}")


def compile_variant(args: argparse.Namespace) -> None:
    """A variant's src compiled first (as pip installs it): otherwise the first
    window to import a module lazily counts its compilation (tens of millions)."""
    if args.variant_pythonpath:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", args.variant_pythonpath],
            check=True,
            capture_output=True,
        )


def lease_counts(args: argparse.Namespace) -> int:
    """The lease alone, without the background: ``bench.slot_rtt``'s coordinator
    (`SlotServer` + `HostSlots` in one process, under callgrind; its worker
    native, `SlotClient`, each request with its call and the fleet's answer
    told) at two turn counts; the difference over the turns is a lease's."""
    work = fresh_dir(args.out)
    env = variant_env(args.variant_pythonpath)
    compile_variant(args)
    totals = []
    for n in args.lease_turns:
        cg = work / f"callgrind.out.{n}"
        argv = [*callgrind.argv(cg), sys.executable, "-m", "bench.slot_rtt", "--iterations", str(n)]
        argv += ["--gap", str(args.lease_gap), "--like-a-call", "--no-dispatcher"]
        argv += ["--seconds", "600"]
        subprocess.run(argv, env=env, cwd=REPO, check=True, capture_output=True, timeout=900)
        totals.append(callgrind.own_counts(cg))
    (n1, n2), ((a, fa), (b, fb)) = args.lease_turns, totals
    per_lease = (b - a) / (n2 - n1)
    print(f"coordinator instructions a lease: {per_lease:,.0f} (N={n1}: {a:,}, N={n2}: {b:,})")
    per = {k: (fb.get(k, 0) - fa.get(k, 0)) / (n2 - n1) for k in set(fa) | set(fb)}
    for name, v in sorted(per.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{v:12,.0f}  {name[:160]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[4.0, 20.0],
        help="calls a second in each busy window (two for a slope)",
    )
    p.add_argument("--no-idle", dest="idle", action="store_false", help="no window without calls")
    p.add_argument("--idle-windows", type=int, default=1, help="windows without calls")
    p.add_argument(
        "--profile",
        type=Path,
        help="with --native: the supervisor under cProfile, its stats written here",
    )
    p.add_argument("--seconds", type=float, default=12.5, help="calls start over this long")
    p.add_argument("--call-seconds", type=float, default=1.0, help="each call held this long")
    p.add_argument("--messages", type=int, default=4, help="frames echoed a call")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the busy windows")
    p.add_argument(
        "--settle", type=float, default=12.0, help="seconds from the warm-up to the first window"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (1: a lone worker's budget stands; 2: every acquire a round trip)",
    )
    p.add_argument("--native", action="store_true", help="no valgrind: /proc CPU time only")
    p.add_argument(
        "--strace",
        action="store_true",
        help="count the supervisor's system calls in each window (strace -c)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant-pythonpath", help="src of the code to count (default: this tree)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument(
        "--lease-turns",
        type=int,
        nargs=2,
        metavar=("N1", "N2"),
        help="count the lease alone (bench.slot_rtt) at these two turn counts, nothing else",
    )
    p.add_argument(
        "--lease-gap", type=float, default=0.005, help="with --lease-turns: slot_rtt's --gap"
    )
    args = p.parse_args(argv)
    if args.lease_turns:
        return lease_counts(args)
    result = run(args)
    strip = [{k: v for k, v in w.items() if k != "functions"} for w in result["windows"]]
    (args.out / "windows.json").write_text(json.dumps({**result, "windows": strip}, indent=1))
    if args.idle and len(set(args.rates)) == 2:
        summarize(result, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
