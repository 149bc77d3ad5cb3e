"""What fleet-ingress costs when nothing happens, and while calls are held: counts, not times.

Starts ``fleet-ingress run`` (1 worker unless ``--workers``) in front of two
simulated TLS fleets (each in its own process, ``bench.harness.fleets``), and
in three phases reads, for the supervisor and for each worker:

- ``idle``: no call;
- ``held``: ``--calls`` calls up and silent but for a WebSocket ping from the
  carrier every ``--ping-every`` seconds (under ``timeouts.carrier_silence``,
  30 s, which would end them), staggered;
- ``stream``: the same calls, one 160-byte binary frame a second each
  (staggered; echoed by the fleets), no pings.

Each phase settles ``--settle`` seconds, then two windows of ``--seconds``:

1. /proc only (nothing attached): wake-ups a second (``/proc/PID/task/*/schedstat``'s
   third field, the times a thread was put on a CPU, summed over threads; and
   the voluntary context switches of ``/proc/PID/task/*/status``), the main
   thread's apart from the others' (libuv's pool, the executor);
2. ``strace -f -c -p PID``: system calls a second, ``epoll_wait`` returns among them.

Counts, so a shared host does not skew them (strace slows the process, not
what it is asked to do). ``--timeline DIR`` also writes ``strace -f -tt`` of
each process for each phase, to read what woke it. Instructions are not
counted here: ``perf stat -e instructions`` is not supported in this VM; use
valgrind --tool=callgrind on a process for that.

    .venv/bin/python -m bench.idle_wakeups --seconds 10 --json /tmp/idle.json

Calls on 127.0.0.1 are never watched by the worker's address sweep (a loopback
address cannot move to another host). To count it too, run inside a network
namespace of your own with a documentation address on its loopback device::

    ip netns add idle-bench && ip -n idle-bench link set lo up
    ip -n idle-bench addr add 192.0.2.10/32 dev lo
    ip netns exec idle-bench .venv/bin/python -m bench.idle_wakeups --address 192.0.2.10
    ip netns del idle-bench

Every phase is bounded: calls opened once, at most ``--calls`` of them, and the
run ends after the three phases (about 3 x (settle + 2 x seconds) plus start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from .harness import fleets, procfs, profile, targets
from .harness.carrier import FramePool, LeanCall, Recorder, client_frame, open_call
from .harness.children import Children, log
from .harness.targets import Settings, start_target
from .harness.tlsfiles import TLSFiles

PHASES = ("idle", "held", "stream")


def thread_counts(pid: int) -> dict[int, tuple[str, int, int]]:
    """Each thread of ``pid``: (name, run count from schedstat, voluntary switches)."""
    out: dict[int, tuple[str, int, int]] = {}
    task = Path(f"/proc/{pid}/task")
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for tid in os.listdir(task):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                runs = int((task / tid / "schedstat").read_text().split()[2])
                status = (task / tid / "status").read_text().splitlines()
                name = next(s.split(":", 1)[1].strip() for s in status if s.startswith("Name:"))
                vol = next(int(s.split()[1]) for s in status if s.startswith("voluntary_ctxt"))
                out[int(tid)] = (name, runs, vol)
    return out


async def proc_window(pids: dict[str, int], seconds: float) -> dict[str, dict[str, Any]]:
    """Wake-ups a second of each process over ``seconds``, nothing attached."""
    before = {role: thread_counts(pid) for role, pid in pids.items()}
    await asyncio.sleep(seconds)
    after = {role: thread_counts(pid) for role, pid in pids.items()}
    out: dict[str, dict[str, Any]] = {}
    for role in pids:
        by_name: Counter[str] = Counter()
        runs = vol = 0
        for tid, (name, r, v) in after[role].items():
            _, r0, v0 = before[role].get(tid, (name, 0, 0))
            runs += r - r0
            vol += v - v0
            by_name["main thread" if tid == pids[role] else f"other: {name}"] += r - r0
        out[role] = {
            "wakeups_per_s": round(runs / seconds, 1),
            "voluntary_switches_per_s": round(vol / seconds, 1),
            "wakeups_per_s_by_thread": {n: round(c / seconds, 1) for n, c in by_name.items() if c},
        }
    return out


async def strace_window(
    pids: dict[str, int], seconds: float, home: Path, phase: str, timeline: Path | None
) -> dict[str, dict[str, Any]]:
    """System calls a second of each process (``strace -f -c``), all attached at once."""
    procs: dict[str, asyncio.subprocess.Process] = {}
    for role, pid in pids.items():
        argv = ["strace", "-f", "-p", str(pid)]
        if timeline is not None:
            argv += ["-tt", "-o", str(timeline / f"{phase}-{role}.strace")]
        else:
            argv += ["-c", "-o", str(home / f"{phase}-{role}.count")]
        procs[role] = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
    await asyncio.sleep(seconds)
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    for proc in procs.values():
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    out: dict[str, dict[str, Any]] = {}
    for role in pids:
        if timeline is not None:
            lines = (timeline / f"{phase}-{role}.strace").read_text().splitlines()
            counts = Counter(
                m.group(1)
                for line in lines
                if (m := re.match(r"^\d+\s+[\d:.]+\s+(\w+)\(", line)) and "resumed>" not in line
            )
        else:
            summary = profile.strace_counts(home / f"{phase}-{role}.count")
            counts = Counter({name: row["calls"] for name, row in summary.items()})
        total = sum(counts.values())
        epoll = sum(c for n, c in counts.items() if n.startswith("epoll_"))
        out[role] = {
            "syscalls_per_s": round(total / seconds, 1),
            "epoll_waits_per_s": round(epoll / seconds, 1),
            "top_per_s": {n: round(c / seconds, 1) for n, c in counts.most_common()},
        }
    return out


async def ping_calls(calls: list[LeanCall], every: float, stop: asyncio.Event) -> None:
    """A ping from each call every ``every`` seconds, spread evenly over the interval."""
    frame = client_frame(b"", 0x9, b"\x01\x02\x03\x04")
    step = every / max(1, len(calls))
    while not stop.is_set():
        for call in calls:
            if stop.is_set():
                return
            if call.transport is not None:
                call.transport.write(frame)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step):
                    await stop.wait()


def _listening_everywhere() -> None:
    """The ingress's config rendered with ``wss`` on 0.0.0.0 (its port kept), so that
    calls can come to an address other than 127.0.0.1 (``--address``)."""
    render = targets.render_ingress

    def render_everywhere(*a: Any, **kw: Any) -> Path:
        config = render(*a, **kw)
        text = re.sub(r'^wss = "127\.0\.0\.1:', 'wss = "0.0.0.0:', config.read_text(), flags=re.M)
        config.write_text(text)
        return config

    targets.render_ingress = render_everywhere  # type: ignore[assignment]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.address:
        _listening_everywhere()
    home = Path(tempfile.mkdtemp(prefix="idle-wakeups-", dir=args.dir))
    tls = TLSFiles.write(home)
    children = Children()
    timeline = args.timeline
    if timeline is not None:
        timeline.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": vars(args) | {"timeline": str(timeline)}}
    calls: list[LeanCall] = []
    try:
        fleet_ports = [
            (await fleets.start(children, home, f"fleet-{i}", args.calls + 50))[1]
            for i in range(args.fleets)
        ]
        settings = Settings(maxconn=args.calls, ingress_workers=args.workers)
        target = await start_target("ingress", children, tls, settings, fleet_ports, home)
        assert target.pid is not None
        tree = procfs.descendants(target.pid)
        pids = {"supervisor": tree[0]} | {f"worker{i}": p for i, p in enumerate(tree[1:], 1)}
        log(f"ingress up: {pids}")
        pool = replace(FramePool.build("binary"), interval=1.0)
        rec = Recorder()
        ctx = tls.carrier_context()
        call_url = target.urls[0]
        if args.address:  # the ingress listens on every address (`_listening_everywhere`)
            call_url = (args.address, target.urls[0][1])
            ctx.check_hostname = False  # its certificate names 127.0.0.1; the chain is checked
        stop_pings = asyncio.Event()
        pinger: asyncio.Task[None] | None = None
        for phase in PHASES:
            if phase == "held":
                for start in range(0, args.calls, 20):
                    opened = await asyncio.gather(
                        *(
                            open_call(rec, pool, call_url, f"/ws/idle{i}", ctx, i, 10.0)
                            for i in range(start, min(args.calls, start + 20))
                        )
                    )
                    calls += [c for c in opened if c is not None]
                log(f"{len(calls)} calls up ({rec.failed} failed)")
                if args.ping_every > 0:
                    pinger = asyncio.create_task(ping_calls(calls, args.ping_every, stop_pings))
            elif phase == "stream":
                stop_pings.set()
                if pinger is not None:
                    await pinger
                loop = asyncio.get_running_loop()
                now = loop.time()
                for i, call in enumerate(calls):
                    call.stream(now + i / max(1, len(calls)), now + 10 * 3600)
            log(f"{phase}: settling {args.settle:g} s")
            await asyncio.sleep(args.settle)
            log(f"{phase}: /proc window {args.seconds:g} s")
            counts = await proc_window(pids, args.seconds)
            log(f"{phase}: strace window {args.seconds:g} s")
            traced = await strace_window(pids, args.seconds, home, phase, timeline)
            alive = sum(1 for c in calls if c.transport is not None)
            results[phase] = {
                "calls_up": alive,
                **{role: counts[role] | traced[role] for role in pids},
            }
        results["carrier"] = {"failed": rec.failed, "errors": rec.errors, "lost": rec.lost}
    finally:
        for call in calls:
            call.stop_streaming()
            if call.transport is not None:
                call.transport.abort()
        await children.stop_all()
        shutil.rmtree(home, ignore_errors=True)
    return results


def show(results: dict[str, Any]) -> str:
    rows = [f"{'phase':7} {'process':11} {'calls':>5} {'wake/s':>7} {'vol/s':>7} "
            f"{'sys/s':>7} {'epoll/s':>7}  top syscalls/s"]  # fmt: skip
    for phase in PHASES:
        if phase not in results:
            continue
        r = results[phase]
        for role, v in r.items():
            if not isinstance(v, dict):
                continue
            top = ", ".join(f"{n} {c:g}" for n, c in list(v["top_per_s"].items())[:5])
            rows.append(
                f"{phase:7} {role:11} {r['calls_up']:5} {v['wakeups_per_s']:7.1f} "
                f"{v['voluntary_switches_per_s']:7.1f} {v['syscalls_per_s']:7.1f} "
                f"{v['epoll_waits_per_s']:7.1f}  {top}"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fleets", type=int, default=2, help="simulated fleets, a process each")
    p.add_argument("--seconds", type=float, default=10.0, help="each window (two a phase)")
    p.add_argument("--settle", type=float, default=5.0, help="before each phase's windows")
    p.add_argument(
        "--ping-every",
        type=float,
        default=10.0,
        help="a held call's ping; 0: none (the held windows end before carrier_silence, 30 s, "
        "would end the calls, with --settle and --seconds at most 8 and 10)",
    )
    p.add_argument("--timeline", type=Path, help="strace -f -tt of each process and phase here")
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument(
        "--address",
        help="calls to this address of the host (the ingress listening on all): "
        "not loopback, whose calls the address sweep never watches",
    )
    p.add_argument("--dir", type=Path, help="the run files under here (removed after)")
    args = p.parse_args()
    if not 1 <= args.calls <= 2000 or not 1 <= args.seconds <= 120 or not 1 <= args.fleets <= 8:
        p.error("--calls 1..2000, --seconds 1..120, --fleets 1..8: every run is bounded")
    if args.ping_every <= 0 and args.settle + 2 * args.seconds > 28:
        p.error("--ping-every 0: --settle + 2 x --seconds over 28 s: carrier_silence ends calls")
    import uvloop

    results = uvloop.run(measure(args))
    print(show(results))
    print(f"carrier: {results.get('carrier')}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
