"""What a second worker costs a call and a message, counted, not timed (issue #14).

Runs ``fleet-ingress run`` (supervisor and workers; ``RUN_INGRESS``: a
worker's start timeout raised for valgrind) with ``process.workers`` 1 and 2,
a simulated fleet in its own process (not counted), and drives through it from
this process, in one life of the ingress, these phases:

- ``idle``: nothing, ``--idle`` seconds (the timers, reports, pings, health
  checks: what the ingress does by the clock);
- ``churn``: ``--churn`` twilio-like TLS calls, ``--wave`` at a time, each
  upgraded, ``--messages`` frames sent one by one (each after the last one's
  echo), closed (1000);
- ``open``: ``--held`` calls opened and left up;
- ``hold``: those calls up and silent, ``--hold`` seconds (the clock's work
  while calls are up: the workers' reports, the silence sweeps);
- ``stream``: each held call streams a frame every 20 ms for ``--stream``
  seconds, all echoes waited for;
- ``close``: the held calls closed.

At each phase's end every process of the ingress is read: with ``--tool
callgrind`` (the ingress under ``valgrind --tool=callgrind --trace-children=yes
--instr-atstart=no``, counting from the first mark) ``callgrind_control -d
PID`` dumps its instructions since the last dump; with ``--tool perf`` a ``perf
stat`` a process and phase counts its system calls (all, and by name), context
switches and CPU migrations in the kernel (tracepoints: the process is not
stopped, unlike under strace, so its loop batches as it would); with every tool
``/proc/PID/task/*/status`` gives its voluntary and involuntary context
switches (read these from ``--tool perf`` or ``plain``: valgrind changes the
process's sleeps).

Per churned call: churn / calls; per relayed message (each frame sent and each
echo, as bench steady counts them): stream / messages; each raw, less the idle
phase's rate for the phase's seconds, and less the hold phase's (the clock's
work with calls up: under valgrind a phase lasts 3-10 times longer, the clock's
work does not slow down, so raw over-counts it against the bench's mix). Every step is
bounded (``STEP``), the whole run by ``--max-seconds``::

    python -m bench.workers_count --tool callgrind --out /tmp/wc-cg
    python -m bench.workers_count --tool perf --held 100 --out /tmp/wc-perf

The callgrind files stay in ``OUT/callgrind-wN/callgrind.out.PID.DUMP`` (dump
1 ends at the first mark, 2 is ``idle``, 3 ``churn``, 4 ``open``, 5 ``hold``, 6
``stream``, 7 ``close``) for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import callgrind, procfs
from bench.harness.carrier import FramePool, LeanCall, Recorder, echoed_calls, open_call
from bench.harness.children import HOST, free_port, log
from bench.harness.launch import Launched, fresh_dir, variant_env, wait_port
from bench.harness.targets import Settings, render_ingress
from bench.harness.tlsfiles import TLSFiles

STEP = 60.0  # seconds any one step of a call may take under callgrind
WARMUP = 5  # calls before the first mark (lazy imports, first-time paths)
# `fleet-ingress run`, but a worker may take up to START_TIMEOUT seconds to
# start serving (WORKER_START_TIMEOUT, 30 s, is too short for three processes
# starting under valgrind on a shared 2-core host): nothing else changed.
START_TIMEOUT = 600.0
RUN_INGRESS = f"""
import sys
from fleet_ingress.service import reload_rounds, worker_pool, worker_process
for module in (reload_rounds, worker_pool, worker_process):
    module.WORKER_START_TIMEOUT = {START_TIMEOUT}
from fleet_ingress.entry import main
sys.exit(main(["run", *sys.argv[1:]]))
"""
PHASES = ("idle", "churn", "open", "hold", "stream", "close")
# Counted in the kernel for ``--tool perf`` (tracepoints: no sampling, no stops).
SYSCALLS = (
    "epoll_wait", "epoll_pwait", "epoll_ctl", "read", "write", "recvfrom", "sendto",
    "recvmsg", "sendmsg", "readv", "writev", "accept4", "connect", "socket", "close",
    "getsockopt", "setsockopt", "getsockname", "getpeername", "shutdown", "futex",
    "getpid", "openat", "newfstatat", "lseek", "ioctl", "getrusage",
    "clock_gettime", "sched_getaffinity", "pread64", "mmap", "munmap", "brk", "madvise",
)  # fmt: skip
PERF_EVENTS = (
    "raw_syscalls:sys_enter",
    "context-switches",
    "cpu-migrations",
    *(f"syscalls:sys_enter_{name}" for name in SYSCALLS),
)


def perf_counts(path: Path) -> dict[str, int]:
    """``perf stat -x,`` output: event -> count."""
    out = {}
    for line in path.read_text().splitlines():
        cells = line.split(",")
        if len(cells) > 2 and cells[0].isdigit():
            out[cells[2].removeprefix("syscalls:sys_enter_")] = int(cells[0])
    return out


@dataclasses.dataclass
class Mark:
    phase: str
    seconds: float  # the phase's length
    roles: dict[int, str]  # pid -> "supervisor" / "worker-N"
    ctxt: dict[int, tuple[int, int]]  # pid -> (voluntary, involuntary), cumulative
    frames: int = 0  # relayed messages in the phase (sent + echoed)
    calls: int = 0


def ingress_roles(sup: int) -> dict[int, str]:
    """pid -> role: the supervisor and its workers."""
    supervisor, *workers = procfs.descendants(sup)
    return {supervisor: "supervisor"} | {w: f"worker-{i}" for i, w in enumerate(workers, 1)}


class Run:
    """One life of the ingress under one tool, with its marks."""

    def __init__(self, tool: str, workers: int, work: Path, proc: subprocess.Popen) -> None:
        self.tool, self.workers, self.work, self.proc = tool, workers, work, proc
        self.marks: list[Mark] = []
        self.t_last = time.monotonic()
        self.perf: list[tuple[subprocess.Popen, int, Path]] = []  # the phase's counters
        self.counted: list[dict[int, dict[str, int]]] = []  # each phase: pid -> event -> n

    def _perf_roll(self, roles: dict[int, str], phase: str) -> None:
        """End the last phase's ``perf stat`` (one a process), start the next's."""
        if self.perf:
            for proc, _, _ in self.perf:
                proc.send_signal(signal.SIGINT)
            counted = {}
            for proc, pid, out in self.perf:
                _, err = proc.communicate(timeout=STEP)
                if not out.exists():
                    raise RuntimeError(f"perf stat failed: {err.decode(errors='replace')}")
                counted[pid] = perf_counts(out)
            self.counted.append(counted)
        self.perf = []
        if phase == "close":
            return
        for pid in roles:
            out = self.work / f"perf-{len(self.marks)}-{pid}.csv"
            argv = ["perf", "stat", "-x,", "-e", ",".join(PERF_EVENTS), "-p", str(pid)]
            proc = subprocess.Popen([*argv, "-o", str(out)], stderr=subprocess.PIPE)
            self.perf.append((proc, pid, out))
        time.sleep(0.3)  # attached before the phase starts

    def mark(self, phase: str, frames: int = 0, calls: int = 0) -> None:
        roles = ingress_roles(self.proc.pid)
        if len(roles) != self.workers + 1:
            raise RuntimeError(f"expected a supervisor and {self.workers} workers, found {roles}")
        if self.tool == "perf":
            self._perf_roll(roles, phase)
        if self.tool == "callgrind":
            for pid in roles:
                # Started with --instr-atstart=no (a worker must start within
                # WORKER_START_TIMEOUT): counting begins at the first mark.
                for how in (["-i", "on"] if not self.marks else []), ["-d", phase]:
                    subprocess.run(
                        ["callgrind_control", *how, str(pid)],
                        check=True,
                        capture_output=True,
                        timeout=STEP,
                    )
        now = time.monotonic()
        self.marks.append(
            Mark(
                phase,
                now - self.t_last,
                {p: r for p, r in roles.items()},
                {p: procfs.context_switches(p) for p in roles},
                frames,
                calls,
            )
        )
        self.t_last = time.monotonic()


async def drive(run: Run, port: int, tls: TLSFiles, a: argparse.Namespace) -> None:
    ctx = tls.carrier_context()
    pool = FramePool.build("twilio-like")
    rec = Recorder()
    url = (HOST, port)

    async def churn(calls: range, wave: int) -> None:
        await echoed_calls(rec, pool, url, ctx, calls, wave=wave, messages=a.messages, step=STEP)

    while True:  # a worker under valgrind takes a while to start after the listener
        try:
            await churn(range(1), 1)
            break
        except RuntimeError:
            if run.proc.poll() is not None:
                raise RuntimeError(f"the ingress exited: see {run.work}/stderr.log") from None
            log("no call through yet: again in 1 s")
            await asyncio.sleep(1.0)
    await churn(range(1, WARMUP), 1)
    await asyncio.sleep(2.0)
    run.mark("start")
    await asyncio.sleep(a.idle)
    run.mark("idle")
    await churn(range(WARMUP, WARMUP + a.churn), a.wave)
    run.mark("churn", frames=2 * a.churn * a.messages, calls=a.churn)
    held: list[LeanCall] = []
    base = WARMUP + a.churn
    for start in range(0, a.held, a.wave):
        opened = await asyncio.gather(
            *(
                open_call(rec, pool, url, f"/ws/held-{i}", ctx, i * 7, STEP)
                for i in range(base + start, base + min(a.held, start + a.wave))
            )
        )
        if any(c is None for c in opened):
            raise RuntimeError(f"a held call failed: {rec.errors}")
        held += [c for c in opened if c is not None]
    run.mark("open", calls=a.held)
    await asyncio.sleep(a.hold)
    run.mark("hold")
    sent0, echoed0 = len(rec.sent_t), len(rec.recv_t)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    for i, call in enumerate(held):
        call.stream(t0 + i * pool.interval / len(held), t0 + a.stream)
    await asyncio.sleep(a.stream + 0.1)
    for call in held:
        call.stop_streaming()
        if call.outstanding:
            call.drained = asyncio.Event()
            async with asyncio.timeout(STEP):
                await call.drained.wait()
    frames = len(rec.sent_t) - sent0 + len(rec.recv_t) - echoed0
    if len(rec.sent_t) - sent0 != len(rec.recv_t) - echoed0 or rec.corrupt:
        raise RuntimeError(f"frames lost or corrupt: {rec}")
    run.mark("stream", frames=frames)
    await asyncio.gather(*(c.finish(STEP, STEP) for c in held))
    run.mark("close", calls=a.held)


def one_run(tool: str, workers: int, out: Path, a: argparse.Namespace) -> dict:
    work = fresh_dir(out / f"{tool}-w{workers}")
    tls = TLSFiles.write(work)
    with Launched(work, variant_env(a.variant_pythonpath)) as launched:
        fleet_port = launched.fleet("fleet-a")
        port = free_port()
        settings = Settings(
            maxconn=1000,
            ingress_workers=workers,
            check_interval=a.check_interval,
            ingress_accept=a.accept,
        )
        config = render_ingress(settings, tls, port, [fleet_port], work)
        argv = [sys.executable, "-c", RUN_INGRESS, "-c", str(config)]
        if tool == "callgrind":
            options = ("--trace-children=yes", "--instr-atstart=no")
            argv = [*callgrind.argv(f"{work}/callgrind.out.%p", *options), *argv]
        proc = launched.start(argv)
        deadline = time.monotonic() + a.max_seconds
        wait_port(port, deadline)
        run = Run(tool, workers, work, proc)
        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(drive(run, port, tls, a), deadline - time.monotonic()))
        log(f"{tool} w{workers}: phases done in {time.monotonic() - t0:.0f} s")
        launched.stop(proc)
        return figures(run, a)


# The event loop's parts, inclusive (callgrind_annotate), counted apart: timer
# callbacks (the clock's work: reports, sweeps, the lag probe) and loop turns.
LOOP_PARTS = {"uv__run_timers": "in_timers", "uv__io_poll": "in_io"}


def callgrind_totals(work: Path, pid: int) -> list[dict[str, int]]:
    """Each dump of ``pid`` in order (dumps .1, .2, ...): its instructions, and
    those in timer callbacks and in I/O callbacks (``LOOP_PARTS``)."""
    out = []
    for n in range(1, 100):
        f = work / f"callgrind.out.{pid}.{n}"
        if not f.exists():
            break
        text = f.read_text(errors="replace")
        m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
        row = {"instructions": int(m.group(1)) if m else 0}
        annotated = callgrind.annotate(f, inclusive=True)
        for fn, key in LOOP_PARTS.items():
            m = re.search(rf"^\s*([\d,]+) \([^)]*\)\s+\S*:{fn} ", annotated, re.M)
            row[key] = int(m.group(1).replace(",", "")) if m else 0
        row["not_in_timers"] = row["instructions"] - row["in_timers"]
        out.append(row)
    return out


def figures(run: Run, a: argparse.Namespace) -> dict:
    """Each phase's length, calls and messages, and each role's counts in it:
    instructions (callgrind), system calls (perf), context switches."""
    roles = run.marks[-1].roles
    for m in run.marks:
        roles = {**m.roles, **roles}
    phases = []
    cg = {pid: callgrind_totals(run.work, pid) for pid in roles} if run.tool == "callgrind" else {}
    for i, m in enumerate(run.marks[1:], start=1):
        prev = run.marks[i - 1]
        row: dict = {"phase": m.phase, "seconds": round(m.seconds, 3), "frames": m.frames}
        row["calls"] = m.calls
        by_role: dict[str, dict] = {}
        for pid, role in roles.items():
            d = by_role.setdefault(role, {})
            v0, i0 = prev.ctxt.get(pid, (0, 0))
            v1, i1 = m.ctxt.get(pid, (0, 0))
            d["ctxt_vol"], d["ctxt_invol"] = v1 - v0, i1 - i0
            if cg:
                # dump n (1-based) ends mark n-1's phase (mark 0, "start", is dump 1)
                dumps = cg.get(pid, [])
                d.update(dumps[i] if i < len(dumps) else {"instructions": 0})
            if run.counted:
                c = run.counted[i - 1].get(pid, {})
                d["syscalls"] = c.get("raw_syscalls:sys_enter", 0)
                d["perf_ctxt"] = c.get("context-switches", 0)
                d["migrations"] = c.get("cpu-migrations", 0)
                d["syscall_names"] = {
                    k: v for k, v in sorted(c.items(), key=lambda kv: -kv[1]) if v and ":" not in k
                }
        row["roles"] = by_role
        phases.append(row)
    return {"tool": run.tool, "workers": run.workers, "phases": phases}


def per_unit(result: dict, key: str) -> dict[str, dict[str, float]]:
    """{"churned call": {role: x, ...}, "relayed message": ...}: each role's
    figure raw, less the idle phase's rate for the phase's seconds (``less
    idle``), and less the hold phase's (``less clock``: the clock's work with
    calls up); "all" sums the roles."""
    ph = {p["phase"]: p for p in result["phases"]}
    out: dict[str, dict[str, float]] = {}
    for unit, phase, count in (
        ("churned call", "churn", ph["churn"]["calls"]),
        ("relayed message", "stream", ph["stream"]["frames"]),
    ):
        p = ph[phase]
        row: dict[str, float] = {}
        for how, base in (("", None), (" less idle", ph["idle"]), (" less clock", ph["hold"])):
            total = 0.0
            for role, d in p["roles"].items():
                if key not in d:
                    continue
                rate = base["roles"].get(role, {}).get(key, 0) / base["seconds"] if base else 0
                row[role + how] = (d[key] - rate * p["seconds"]) / count
                total += row[role + how]
            row["all" + how] = total
        for name in ("idle", "hold"):
            b = ph[name]
            row[f"{name} per second"] = (
                sum(d.get(key, 0) for d in b["roles"].values()) / b["seconds"]
            )
        out[unit] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=("callgrind", "perf", "plain"), required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--idle", type=float, default=20.0, help="seconds of the idle phase")
    p.add_argument("--churn", type=int, default=40, help="churned calls")
    p.add_argument("--wave", type=int, default=5, help="calls up at once")
    p.add_argument("--messages", type=int, default=4, help="frames each way a churned call")
    p.add_argument("--held", type=int, default=20, help="calls held for the stream phase")
    p.add_argument("--hold", type=float, default=10.0, help="seconds the held calls are silent")
    p.add_argument("--stream", type=float, default=10.0, help="seconds the held calls stream")
    p.add_argument("--check-interval", type=float, default=1.0, help="fleets.check_interval")
    p.add_argument(
        "--accept",
        choices=("spread", "first"),
        default="spread",
        help='process.accept: "first" has the workers take connections in rank order',
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant-pythonpath", help="src of the code to count (default: this tree)")
    p.add_argument("--max-seconds", type=float, default=1500.0, help="bound of one run")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for w in a.workers:
        results[w] = one_run(a.tool, w, a.out, a)
        (a.out / f"{a.tool}-w{w}.json").write_text(json.dumps(results[w], indent=1))
    keys = {
        "callgrind": ["instructions", "not_in_timers", "in_timers"],
        "perf": ["syscalls", "perf_ctxt", "migrations"],
    }.get(a.tool, [])
    keys += ["ctxt_vol", "ctxt_invol"]
    summary = {}
    for key in keys:
        for w, r in results.items():
            for unit, row in per_unit(r, key).items():
                summary.setdefault(key, {}).setdefault(unit, {})[w] = row
    for key, units in summary.items():
        for unit, by_w in units.items():
            print(f"{key} per {unit}:")
            for w, row in by_w.items():
                cells = ", ".join(f"{r} {v:,.3f}" for r, v in row.items())
                print(f"  {w} worker(s): {cells}")
            ws = sorted(by_w)
            if len(ws) == 2:
                x, y = by_w[ws[0]], by_w[ws[1]]
                ratios = ", ".join(
                    f"{how or 'raw'} {y['all' + how] / x['all' + how]:.3f}"
                    for how in ("", " less idle", " less clock")
                    if x["all" + how]
                )
                print(f"  {ws[1]} / {ws[0]}: {ratios}")
    (a.out / f"{a.tool}-summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
