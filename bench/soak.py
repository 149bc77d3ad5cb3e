"""Soak: N concurrent calls under churn through fleet-ingress for M minutes; RSS and fds over time.

    .venv/bin/python -m bench.soak --calls 200 --minutes 10 --call-seconds 20
    .venv/bin/python bench/soak.py --calls 20 --minutes 1          # a quick check

One real ``python -m fleet_ingress run -c CONFIG`` process (rendered by
:mod:`bench.targets`, TLS on both sides, its stats listener on) in front of
the bench's two simulated fleets (:mod:`bench.fleets`, one process each), all
on 127.0.0.1. Generator processes (this module with ``--generator``, built on
the lean carrier of :mod:`bench.carrier`) keep ``--calls`` call slots busy: a
call streams twilio-like 20 ms frames for a random length in ``--call-seconds``
+- ``--call-spread``, waits for its echoes, closes (1000), and the slot opens
the next call at once, so a 10-minute run makes thousands of call set-ups and
tear-downs. Every ``--sample-every`` seconds it records the ingress's VmRSS
(and its ``[heap]`` / anonymous-mmap split), its open descriptors
(``/proc/PID/fd``), its CPU, the calls up, started, completed and failed, the
frames lost, and the ingress's own ``/stats.json`` frontend figures.

The verdict (see :func:`judge`): the first quarter of the run is warm-up; RSS is
flat when the mean of the last quarter is within ``--rss-tolerance-pct`` of the
second quarter's and the least-squares slope after warm-up, over that span, is
too; descriptors are flat when every sample after warm-up has at most
``--fd-slack`` more than baseline + 2 x calls up, that excess does not drift
(last quarter's mean minus the second's at most ``FD_DRIFT``), and they return
to baseline (+ ``FD_SLACK_IDLE``) once every call has closed. Exit status 1 on a failed
call, a lost or corrupt frame, or growth beyond tolerance; 2 on an error.
Every child runs in its own session with ``PR_SET_PDEATHSIG`` and is stopped at
the end, on error, SIGTERM or Ctrl-C; every loop is bounded in count and time.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # ``python bench/soak.py``: run as the package's module
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import signal
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import uvloop

from fleet_ingress.sim import PROFILES

from . import memory, procfs
from .carrier import FramePool, LeanCall, Recorder, open_call
from .children import (
    HOST,
    REPO,
    Children,
    child_env,
    free_port,
    python_module,
    stop_generators,
    stop_on_request,
)
from .scenarios import Run
from .targets import Target, render_ingress, wait_ready
from .versions import code_version
from .worker import hist_upper, rtt_histogram

ECHO_WAIT = 2.0  # at a call's end, for its last echoes; what is still missing is lost
CLOSE_WAIT = 3.0  # for the close handshake, then abort
OPEN_TIMEOUT = 10.0  # TCP + TLS + upgrade
FAIL_BACKOFF = 0.5  # a slot whose call failed to open waits this long before the next
REPORT_EVERY = 0.5  # generator progress lines
FD_SLACK_IDLE = 4  # descriptors over the baseline allowed once every call has closed
FD_DRIFT = 2.0  # mean (fds - baseline - 2 x calls up), last quarter minus second, allowed
AFTER_WAIT = 15.0  # at most, after the last call, for descriptors to return to baseline
SPREAD_MAX = 0.9
MIN_CALL_SECONDS = 0.5


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the generator process ------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def call_bounds(mean: float, spread: float) -> tuple[float, float]:
    """Shortest and longest call: ``mean`` +- ``spread`` x ``mean`` (uniform between)."""
    return max(MIN_CALL_SECONDS, mean * (1 - spread)), mean * (1 + spread)


@dataclass
class Tally:
    """Counts of one generator process; per-frame timestamps are folded in and dropped, so
    a long run holds no per-frame arrays (the carrier's Recorder appends one per frame)."""

    attempts: int = 0
    sent: int = 0
    recv: int = 0
    longest_call_s: float = 0.0
    cut: int = 0
    cut_states: list[dict[str, Any]] = field(default_factory=list)

    def fold(self, rec: Recorder) -> tuple[dict[int, int], dict[int, int]]:
        """Counts what ``rec`` recorded since the last fold; round-trip and handshake
        histograms (5 % buckets, :func:`bench.worker.rtt_histogram`) of it."""
        self.sent += len(rec.sent_t)
        self.recv += len(rec.recv_t)
        rtt = rtt_histogram(rec.rtt_ms)
        hs = rtt_histogram(rec.handshake_ms)
        del rec.sent_t[:], rec.recv_t[:], rec.rtt_ms[:]
        rec.handshake_ms.clear()
        rec.handshake_t.clear()
        return rtt, hs


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Keep ``args.calls`` calls up until told to stop (stdin ``stop``, SIGTERM) or
    ``--max-seconds``; every slot replaces its call as soon as it has closed."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stdin_task = stop_on_request(stop)
    stop_task = loop.create_task(stop.wait())
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    pool = FramePool.build(args.profile, seed=args.seed)
    rng = random.Random(args.seed)
    rec = Recorder()
    tally = Tally()
    live: set[LeanCall] = set()
    lo, hi = call_bounds(args.call_seconds, args.call_spread)
    deadline = time.monotonic() + args.max_seconds
    # Bounded in count as well as time: a slot cannot open more calls than this.
    max_per_slot = math.ceil(args.max_seconds / min(lo, FAIL_BACKOFF)) + 2
    gap = args.ramp / max(1, args.calls)

    async def stopped_within(seconds: float) -> bool:
        await asyncio.wait({stop_task}, timeout=max(0.0, seconds))
        return stop.is_set()

    async def slot(k: int) -> None:
        if await stopped_within(k * gap):
            return
        first = True
        for n in range(max_per_slot):
            if stop.is_set() or time.monotonic() >= deadline:
                return
            tally.attempts += 1
            call = await open_call(
                rec,
                pool,
                args.url[(k + n) % len(args.url)],
                f"{args.route}soak-{args.first + k}-{n}",
                ctx,
                offset=rng.randrange(len(pool.wire)),
                timeout=OPEN_TIMEOUT,
            )
            if call is None:
                if await stopped_within(FAIL_BACKOFF):
                    return
                continue
            live.add(call)
            try:
                # The first call of each slot ends anywhere up to the longest, so that
                # ends (and the set-ups replacing them) are spread out from the start.
                length = rng.uniform(min(1.0, lo), hi) if first else rng.uniform(lo, hi)
                first = False
                tally.longest_call_s = max(tally.longest_call_s, length)
                now = loop.time()
                call.stream(now, now + length)
                await asyncio.wait(
                    {stop_task, call.closed}, timeout=length, return_when=asyncio.FIRST_COMPLETED
                )
                await call.finish(ECHO_WAIT, CLOSE_WAIT)
            finally:
                live.discard(call)

    def progress(done: bool = False) -> dict[str, Any]:
        rtt, hs = tally.fold(rec)
        return {
            "t": time.monotonic(),
            "done": done,
            "active": len(live),
            "attempts": tally.attempts,
            "established": rec.established,
            "failed": rec.failed,
            "finished": rec.finished,
            "lost": rec.lost,
            "corrupt": rec.corrupt,
            "unexpected": rec.unexpected,
            "sent": tally.sent,
            "recv": tally.recv,
            "errors": dict(rec.errors),
            "statuses": dict(rec.statuses),
            "fleets": dict(rec.fleets),
            "longest_call_s": round(tally.longest_call_s, 2),
            "cut": tally.cut,
            "cut_states": tally.cut_states,
            "cpu": time.process_time(),
            "rtt_hist": rtt,
            "hs_hist": hs,
        }

    async def report() -> None:
        while True:
            print(json.dumps(progress()), flush=True)
            await asyncio.sleep(REPORT_EVERY)

    slots = [loop.create_task(slot(k)) for k in range(args.calls)]
    reporter = loop.create_task(report())
    stopped_at = deadline
    try:
        await asyncio.wait({stop_task}, timeout=max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
        stopped_at = time.monotonic()
        # Every call stops streaming now, waits for its echoes and closes.
        _, pending = await asyncio.wait(slots, timeout=OPEN_TIMEOUT + ECHO_WAIT + CLOSE_WAIT + 5)
        for task in pending:
            task.cancel()
        tally.cut = len(live)  # calls that had not finished closing in time
        tally.cut_states = [
            {
                "finishing": c.finishing,
                "close_sent": c.close_sent,
                "close_received": c.close_received,
                "outstanding": len(c.outstanding),
                "transport": c.transport is not None,
                "seq": c.seq,
                "closed_done": c.closed.done(),
            }
            for c in list(live)[:10]
        ]
        for call in list(live):
            if call.transport is not None:
                call.transport.abort()
        reporter.cancel()
        stdin_task.cancel()
        stop_task.cancel()
    return progress(done=True) | {"stop_s": round(time.monotonic() - stopped_at, 2)}


def generator_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak --generator")
    p.add_argument("--generator", action="store_true")
    p.add_argument("--url", type=_address, action="append", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--profile", default="twilio-like")
    p.add_argument("--route", default="/ws/")
    p.add_argument("--calls", type=int, required=True, help="call slots of this process")
    p.add_argument("--first", type=int, default=0, help="global index of its first slot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--call-seconds", type=float, required=True)
    p.add_argument("--call-spread", type=float, required=True)
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which slots start")
    p.add_argument("--max-seconds", type=float, required=True, help="hard bound on the run")
    args = p.parse_args(argv)
    result = uvloop.run(generate(args))
    print(json.dumps(result), flush=True)
    return 0


# -- the orchestrator -----------------------------------------------------------


@dataclass
class Generators:
    """The generator processes and the latest progress line of each."""

    procs: list[asyncio.subprocess.Process]
    latest: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    rtt: dict[int, int] = field(default_factory=dict)  # since the last sample
    hs: dict[int, int] = field(default_factory=dict)
    rtt_all: dict[int, int] = field(default_factory=dict)  # over the whole run
    hs_all: dict[int, int] = field(default_factory=dict)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    def start_reading(self) -> None:
        loop = asyncio.get_running_loop()
        self.readers = [loop.create_task(self._read(p)) for p in self.procs]

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            with contextlib.suppress(ValueError, KeyError):
                msg = json.loads(line)
                for key, now, total in (
                    ("rtt_hist", self.rtt, self.rtt_all),
                    ("hs_hist", self.hs, self.hs_all),
                ):
                    for b, n in msg.pop(key, {}).items():
                        now[int(b)] = now.get(int(b), 0) + n
                        total[int(b)] = total.get(int(b), 0) + n
                self.latest[proc.pid] = msg
                if msg.get("done"):
                    self.done[proc.pid] = msg

    def total(self, key: str) -> int:
        return sum(int(m.get(key, 0)) for m in self.latest.values())

    def merged(self, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.latest.values():
            for k, v in m.get(key, {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def take_hists(self) -> tuple[dict[int, int], dict[int, int]]:
        rtt, hs = self.rtt, self.hs
        self.rtt, self.hs = {}, {}
        return rtt, hs

    async def stop(self, timeout: float) -> None:
        if not await stop_generators(self.procs, timeout):
            log("a generator did not finish in time: stopped")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*self.readers, return_exceptions=True)
        for reader in self.readers:
            reader.cancel()


def hist_p(hist: dict[int, int], p: float) -> float | None:
    """Percentile (upper bound of its 5 % bucket) of a :func:`rtt_histogram`."""
    total = sum(hist.values())
    if not total:
        return None
    need, seen = total * p / 100, 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= need:
            return round(hist_upper(b), 3)
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


async def fetch_stats(port: int) -> dict[str, Any] | None:
    """The ingress's ``/stats.json`` (plain HTTP on loopback), None if it does not answer."""
    try:
        async with asyncio.timeout(2.0):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(
                f"GET /stats.json HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while len(data) < 4 << 20 and (chunk := await reader.read(65536)):
                data += chunk
            writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    try:
        return dict(json.loads(body))
    except (ValueError, TypeError):
        return None


def round_or_none(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Ingress:
    target: Target
    stats_port: int | None
    config_text: str


async def start_ingress(run: Run, stats: bool, env: dict[str, str]) -> Ingress:
    """fleet-ingress as :func:`bench.targets.start_target` starts it, with the stats
    listener on (the bench's rendering turns it off)."""
    port = free_port()
    directory = run.dir / "ingress"
    directory.mkdir(exist_ok=True)
    config = render_ingress(run.settings, run.tls, port, run.fleet_ports, directory)
    text = config.read_text()
    stats_port = None
    if stats:
        stats_port = free_port()
        swapped = text.replace('stats = ""', f'stats = "{HOST}:{stats_port}"', 1)
        if swapped == text:
            log("could not turn the stats listener on in the rendered config: no /stats.json")
            stats_port = None
        text = swapped
        config.write_text(text)
    err_path = directory / "stderr.log"
    with err_path.open("wb") as err:
        proc = await run.children.spawn(
            python_module("fleet_ingress", "run", "-c", str(config)),
            stdout=err,
            stderr=err,
            env=child_env(env),
        )
    target = Target("ingress", [(HOST, port)], proc, err_path, config, env=dict(env))
    started = time.monotonic()
    await wait_ready(target, run.tls.carrier_context(), run.settings.proxy_routes[0])
    target.ready_s = round(time.monotonic() - started, 2)
    return Ingress(target, stats_port, text)


def ingress_env(args: argparse.Namespace, directory: Path) -> dict[str, str]:
    """``--ingress-env`` entries, and the ``bench/memhook`` probe with ``--memhook``."""
    env: dict[str, str] = {}
    if args.memhook:
        env["PYTHONPATH"] = str(REPO / "bench" / "memhook")
        env["BENCH_MEMHOOK_DIR"] = str(directory / "memhook")
        env["BENCH_TRACEMALLOC"] = str(args.tracemalloc)
    for item in args.ingress_env:
        key, _, val = item.partition("=")
        env[key] = val.replace("{repo}", str(REPO))
    return env


async def spawn_generators(run: Run, args: argparse.Namespace, ingress: Ingress) -> Generators:
    workers = args.generators or max(1, math.ceil(args.calls / args.calls_per_generator))
    workers = min(workers, args.calls)
    procs = []
    first = 0
    for w in range(workers):
        n = len(range(w, args.calls, workers))
        argv = python_module(
            "bench.soak",
            "--generator",
            "--ca",
            str(run.tls.ca),
            "--profile",
            args.profile,
            "--route",
            args.route,
            "--calls",
            str(n),
            "--first",
            str(first),
            "--seed",
            str(args.seed * 1000 + w),
            "--call-seconds",
            repr(args.call_seconds),
            "--call-spread",
            repr(args.call_spread),
            "--ramp",
            repr(args.ramp),
            "--max-seconds",
            repr(args.minutes * 60 + 60),
        )
        for host, port in ingress.target.urls:
            argv += ["--url", f"{host}:{port}"]
        procs.append(
            await run.children.spawn(
                argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        )
        first += n
    gens = Generators(procs)
    gens.start_reading()
    return gens


@dataclass
class Sampler:
    """One row of figures every ``--sample-every`` seconds (CPU as cores since the last)."""

    ingress: Ingress
    run: Run
    gens: Generators | None = None
    t0: float = 0.0
    fd0: int = 0
    last: tuple[float, float, float, float, float] | None = None
    probes: int = 0

    async def _memhook(self) -> dict[str, Any] | None:
        """glibc's heap (in use / free) and live objects by type, from ``bench/memhook``."""
        directory = self.ingress.target.env.get("BENCH_MEMHOOK_DIR")
        if not directory:
            return None
        self.probes += 1
        snap = await memory.probe(Path(directory), f"sample-{self.probes}", timeout=10.0)
        if snap is None or "error" in snap:
            return {"error": (snap or {}).get("error", "no answer")}
        mi = snap["mallinfo2"]
        types = snap["gc_objects_by_type"]
        return {
            "malloc_in_use_kib": (mi["uordblks"] + mi["hblkhd"]) // 1024,
            "malloc_free_kib": mi["fordblks"] // 1024,
            "heap_arena_kib": mi["arena"] // 1024,
            "mmapped_chunks_kib": mi["hblkhd"] // 1024,
            "gc_objects_top60": sum(types.values()),
            "gc_objects_by_type": types,
            "tracemalloc_current": snap.get("tracemalloc_current"),
        }

    def _cpu(self) -> tuple[float, float, float, float, float]:
        pid = self.ingress.target.pid
        assert pid is not None
        gen = sum(procfs.cpu_seconds(p.pid) for p in self.gens.procs) if self.gens else math.nan
        fleets = sum(procfs.cpu_seconds(p.pid) for p in self.run.fleet_procs)
        return (
            time.monotonic(),
            procfs.cpu_seconds(pid),
            gen,
            fleets,
            procfs.host_busy_seconds(),
        )

    async def take(self, phase: str) -> dict[str, Any]:
        pid = self.ingress.target.pid
        assert pid is not None
        # Descriptors and memory before the stats request (its own socket is not counted).
        fds = fd_count(pid)
        rss = procfs.rss_kib(pid)
        maps = procfs.rss_by_mapping(pid)
        cpu = self._cpu()
        cores: dict[str, float | None] = {}
        if self.last is not None:
            window = cpu[0] - self.last[0]
            for i, name in enumerate(("ingress", "generators", "fleets", "host"), 1):
                used = cpu[i] - self.last[i]
                cores[name] = round(used / window, 3) if window and not math.isnan(used) else None
        self.last = cpu
        stats = await fetch_stats(self.ingress.stats_port) if self.ingress.stats_port else None
        hook = await self._memhook()
        front = (stats or {}).get("frontend")
        g = self.gens
        rtt, hs = g.take_hists() if g else ({}, {})
        active_gen = g.total("active") if g else 0
        active_ing = front.get("active_calls") if front else None
        active = active_ing if active_ing is not None else active_gen
        row: dict[str, Any] = {
            "phase": phase,
            "t_s": round(time.monotonic() - self.t0, 2) if self.t0 else 0.0,
            "rss_kib": rss,
            "heap_kib": maps.get("[heap]", 0),
            "anon_mmap_kib": maps.get("anon-mmap", 0),
            "fds": fds,
            "fd_excess": None if fds is None else fds - self.fd0 - 2 * active,
            "active_calls": active_gen,
            "active_calls_ingress": active_ing,
            "calls_started": g.total("established") if g else 0,
            "calls_completed": g.total("finished") if g else 0,
            "calls_failed": g.total("failed") if g else 0,
            "call_attempts": g.total("attempts") if g else 0,
            "frames_sent": g.total("sent") if g else 0,
            "frames_echoed": g.total("recv") if g else 0,
            "lost_frames": g.total("lost") if g else 0,
            "corrupt_frames": g.total("corrupt") if g else 0,
            "rtt_ms_p50": hist_p(rtt, 50),
            "rtt_ms_p99": hist_p(rtt, 99),
            "handshake_ms_p99": hist_p(hs, 99),
            "cores": cores,
            "generators_rss_kib": sum(procfs.rss_kib(p.pid) for p in g.procs) if g else 0,
            "fleets_rss_kib": sum(procfs.rss_kib(p.pid) for p in self.run.fleet_procs),
            "memhook": hook,
            "frontend": front,
            "fleets": [
                {k: f.get(k) for k in ("name", "health", "active", "calls_total")}
                for f in (stats or {}).get("fleets", [])
            ]
            or None,
        }
        return row


def describe_row(row: dict[str, Any]) -> str:
    front = row["frontend"] or {}
    c = row["cores"]
    return (
        f"{row['phase']} {row['t_s']:6.0f}s calls up {row['active_calls']} "
        f"(ingress {row['active_calls_ingress']}) completed {row['calls_completed']} "
        f"failed {row['calls_failed']} lost {row['lost_frames']} | RSS "
        f"{row['rss_kib'] / 1024:.1f} MiB fds {row['fds']} (excess {row['fd_excess']}) | "
        f"conns total {front.get('connections_total')} rtt~p99 {row['rtt_ms_p99']} ms | cores: "
        f"ingress {c.get('ingress')} gen {c.get('generators')} fleets {c.get('fleets')} "
        f"host {c.get('host')}"
    )


# -- judging ---------------------------------------------------------------------


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return None
    mx = mean([p[0] for p in points]) or 0.0
    my = mean([p[1] for p in points]) or 0.0
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 60


def quarters(rows: list[dict[str, Any]], duration: float) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[], [], [], []]
    for r in rows:
        out[min(3, max(0, int(r["t_s"] / duration * 4)))].append(r)
    return out


def judge(
    rows: list[dict[str, Any]],
    baseline: dict[str, Any],
    after: dict[str, Any] | None,
    totals: dict[str, Any],
    args: argparse.Namespace,
    duration: float,
) -> dict[str, Any]:
    """Flat or not, with every figure the decision uses."""
    run_rows = [r for r in rows if r["phase"] == "run" and r["rss_kib"] and r["fds"] is not None]
    q = quarters(run_rows, duration)
    warm = [r for r in run_rows if r["t_s"] >= duration / 4]
    span_min = (warm[-1]["t_s"] - warm[0]["t_s"]) / 60 if len(warm) >= 2 else 0.0

    def qmean(key: str) -> list[float | None]:
        return [round_or_none(mean([float(r[key]) for r in part]), 1) for part in q]

    rss_q, fds_q, excess_q = qmean("rss_kib"), qmean("fds"), qmean("fd_excess")
    active_q = qmean("active_calls")
    rss_slope = slope_per_minute([(r["t_s"], r["rss_kib"]) for r in warm])
    rss_slope_all = slope_per_minute([(r["t_s"], r["rss_kib"]) for r in run_rows])
    fd_slope = slope_per_minute([(r["t_s"], r["fds"]) for r in warm])
    excess_slope = slope_per_minute([(r["t_s"], r["fd_excess"]) for r in warm])
    tol = args.rss_tolerance_pct
    reasons: list[str] = []
    rss_growth_pct = rss_span_pct = None
    rss_flat = False
    if rss_q[1] and rss_q[3]:
        rss_growth_pct = round((rss_q[3] - rss_q[1]) / rss_q[1] * 100, 2)
        rss_span_pct = round((rss_slope or 0.0) * span_min / rss_q[1] * 100, 2)
        rss_flat = rss_growth_pct <= tol and rss_span_pct <= tol
        if not rss_flat:
            reasons.append(
                f"RSS grew {rss_growth_pct} % (last quarter vs second) and "
                f"{rss_span_pct} % by slope after warm-up: tolerance {tol} %"
            )
    else:
        reasons.append("too few samples to judge RSS")
    # If the growth after warm-up were a leak, this much per call set up meanwhile.
    calls_in_span = warm[-1]["calls_started"] - warm[0]["calls_started"] if len(warm) >= 2 else 0
    per_call_bytes = (
        round((rss_slope or 0.0) * span_min * 1024 / calls_in_span)
        if calls_in_span and rss_slope is not None
        else None
    )
    max_excess = max((r["fd_excess"] for r in warm), default=None)
    drift = (
        round(excess_q[3] - excess_q[1], 2)
        if excess_q[1] is not None and excess_q[3] is not None
        else None
    )
    fds_flat = max_excess is not None and max_excess <= args.fd_slack
    if drift is not None and drift > FD_DRIFT:
        fds_flat = False
        reasons.append(
            f"descriptors over baseline + 2 x calls up grew by {drift} on average from the "
            f"second quarter to the last (allowed {FD_DRIFT})"
        )
    if max_excess is None:
        reasons.append("too few samples to judge descriptors")
    elif max_excess > args.fd_slack:
        worst = max(warm, key=lambda r: r["fd_excess"])
        reasons.append(
            f"descriptors {worst['fds']} at {worst['t_s']:.0f} s: {max_excess} over baseline "
            f"{baseline['fds']} + 2 x {worst['active_calls_ingress'] or worst['active_calls']} "
            f"calls up (allowed {args.fd_slack})"
        )
    fds_back = bool(
        after is not None
        and after["fds"] is not None
        and after["fds"] <= baseline["fds"] + FD_SLACK_IDLE
    )
    if not fds_back:
        reasons.append(
            f"descriptors after every call closed: {after and after['fds']} against baseline "
            f"{baseline['fds']} (allowed +{FD_SLACK_IDLE})"
        )
    for key, what in (
        ("failed", "calls failed"),
        ("lost", "frames lost"),
        ("corrupt", "frames corrupt"),
        ("cut", "calls not closed in time at the end (aborted)"),
    ):
        if totals.get(key):
            reasons.append(f"{totals[key]} {what}")
    return {
        "flat": rss_flat and fds_flat and fds_back,
        "passed": not reasons,
        "reasons": reasons,
        "warm_up_s": round(duration / 4, 1),
        "rss_tolerance_pct": tol,
        "fd_slack": args.fd_slack,
        "fd_slack_idle": FD_SLACK_IDLE,
        "rss_kib_quarter_means": rss_q,
        "fds_quarter_means": fds_q,
        "fd_excess_quarter_means": excess_q,
        "active_calls_quarter_means": active_q,
        "rss_growth_pct_q4_vs_q2": rss_growth_pct,
        "rss_slope_kib_per_min_after_warm_up": round_or_none(rss_slope, 2),
        "rss_slope_kib_per_min_whole_run": round_or_none(rss_slope_all, 2),
        "rss_growth_pct_by_slope_after_warm_up": rss_span_pct,
        "rss_bytes_per_call_if_leak": per_call_bytes,
        "calls_started_after_warm_up": calls_in_span,
        "fds_slope_per_min_after_warm_up": round_or_none(fd_slope, 3),
        "fd_excess_slope_per_min_after_warm_up": round_or_none(excess_slope, 3),
        "fd_excess_max_after_warm_up": max_excess,
        "fd_excess_drift_q4_vs_q2": drift,
        "fd_drift_allowed": FD_DRIFT,
        "rss_flat": rss_flat,
        "fds_flat": fds_flat,
        "fds_back_to_baseline": fds_back,
    }


# -- output -------------------------------------------------------------------------


def md_table(rows: list[dict[str, Any]], every: float) -> list[str]:
    """Samples at every ``every`` seconds of the run (the nearest), the baseline and after."""
    run_rows = [r for r in rows if r["phase"] == "run"]
    picked: list[dict[str, Any]] = [r for r in rows if r["phase"] == "baseline"][:1]
    if run_rows:
        end = run_rows[-1]["t_s"]
        marks = [i * every for i in range(int(end // every) + 1)]
        if end - marks[-1] > every / 4:
            marks.append(end)
        for m in marks:
            best = min(run_rows, key=lambda r: abs(r["t_s"] - m))
            if best not in picked:
                picked.append(best)
    picked += [r for r in rows if r["phase"] == "after"][-1:]
    out = [
        "| t | RSS MiB | heap MiB | fds | fds - 2 x calls up - baseline | calls up "
        "(ingress) | calls started | completed | failed | lost frames | conns accepted "
        "| RTT p99 ms | ingress cores | host cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in picked:
        front = r["frontend"] or {}
        when = {"baseline": "before", "after": "after"}.get(r["phase"], f"{r['t_s'] / 60:.1f} min")
        out.append(
            f"| {when} | {r['rss_kib'] / 1024:.1f} | {r['heap_kib'] / 1024:.1f} | {r['fds']} "
            f"| {r['fd_excess']} | {r['active_calls']} ({r['active_calls_ingress']}) "
            f"| {r['calls_started']} | {r['calls_completed']} | {r['calls_failed']} "
            f"| {r['lost_frames']} | {front.get('connections_total', '-')} "
            f"| {r['rtt_ms_p99'] if r['rtt_ms_p99'] is not None else '-'} "
            f"| {r['cores'].get('ingress', '-')} | {r['cores'].get('host', '-')} |"
        )
    return out


def memhook_lines(hook: dict[str, Any] | None) -> list[str]:
    if not hook:
        return []
    out = []
    for key, what in (
        ("malloc_in_use_kib", "glibc malloc in use KiB"),
        ("malloc_free_kib", "glibc malloc free (held) KiB"),
        ("heap_arena_kib", "glibc brk heap size KiB"),
        ("gc_objects_top60", "live GC objects (60 commonest types)"),
    ):
        v = hook[key]
        out.append(
            f"| {what}: baseline / end of warm-up / end / after | {v['baseline']} / "
            f"{v['end_of_warm_up']} / {v['end']} / {v['after']} |"
        )
    grown = hook.get("types_grown_after_warm_up")
    if grown is not None:
        text = ", ".join(f"{k} +{v}" for k, v in grown.items()) or "none"
        out.append(f"| object types grown after warm-up | {text} |")
    return out


def markdown(rep: dict[str, Any]) -> str:
    v, s, m = rep["verdict"], rep["summary"], rep["machine"]
    p = rep["params"]
    verdict = "PASS" if v["passed"] else "FAIL"
    lines = [
        f"# Soak: {p['calls']} calls for {p['minutes']:g} min under churn",
        "",
        f"`{rep['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_mib']} MiB, Linux "
        f"{m['kernel']}, Python {m['python']}. fleet_ingress {rep['code'].get('git_head')} "
        f"({rep['code'].get('src_uncommitted_changes')} uncommitted files in src/). "
        f"Calls {p['call_seconds']:g} s on average ({s['call_seconds_min']:g}-"
        f"{s['call_seconds_max']:g} s, uniform), {p['profile']} frames every "
        f"{p['frame_interval_ms']:g} ms, TLS both sides, stats listener "
        f"{'on' if rep['stats_listener'] else 'off'}.",
        "",
        f"**Verdict: {verdict}** ({'flat' if v['flat'] else 'not flat'})"
        + ("" if not v["reasons"] else ": " + "; ".join(v["reasons"])),
        "",
        "| figure | value |",
        "|---|---|",
        f"| run | {s['duration_s']:.0f} s, {s['samples']} samples every {p['sample_every']:g} s |",
        f"| calls set up / completed / failed / aborted at the end | {s['calls_started']} / "
        f"{s['calls_completed']} / {s['calls_failed']} / {s['calls_cut_at_end']} |",
        f"| frames sent / echoed / lost / corrupt | {s['frames_sent']} / {s['frames_echoed']} / "
        f"{s['lost_frames']} / {s['corrupt_frames']} |",
        f"| connections accepted by the ingress (stats) | {s['connections_accepted']} |",
        f"| RSS KiB: baseline / end of warm-up / end of run / after all calls closed | "
        f"{s['rss_kib_baseline']} / {s['rss_kib_end_of_warm_up']} / {s['rss_kib_end']} / "
        f"{s['rss_kib_after']} |",
        f"| RSS KiB, mean per quarter | {' / '.join(str(x) for x in v['rss_kib_quarter_means'])} |",
        f"| RSS growth, last quarter vs second | {v['rss_growth_pct_q4_vs_q2']} % "
        f"(tolerance {v['rss_tolerance_pct']} %) |",
        f"| RSS slope after warm-up / whole run | {v['rss_slope_kib_per_min_after_warm_up']} / "
        f"{v['rss_slope_kib_per_min_whole_run']} KiB per min ("
        f"{v['rss_growth_pct_by_slope_after_warm_up']} % over the span after warm-up) |",
        f"| growth after warm-up per call set up, if it were a leak | "
        f"{v['rss_bytes_per_call_if_leak']} bytes ({v['calls_started_after_warm_up']} calls) |",
        f"| fds: baseline / end of warm-up / end of run / after all calls closed | "
        f"{s['fds_baseline']} / {s['fds_end_of_warm_up']} / {s['fds_end']} / {s['fds_after']} |",
        "| fds, mean per quarter (calls up) | "
        + " / ".join(
            f"{a} ({b})"
            for a, b in zip(v["fds_quarter_means"], v["active_calls_quarter_means"], strict=True)
        )
        + " |",
        f"| fds - baseline - 2 x calls up: max after warm-up, last quarter minus second, "
        f"slope | {v['fd_excess_max_after_warm_up']} (allowed {v['fd_slack']}), "
        f"{v['fd_excess_drift_q4_vs_q2']} (allowed {v['fd_drift_allowed']}), "
        f"{v['fd_excess_slope_per_min_after_warm_up']} per min |",
        f"| handshake p99 / RTT p50 / p99 over the run (ms) | {s['handshake_ms_p99']} / "
        f"{s['rtt_ms_p50']} / {s['rtt_ms_p99']} |",
        f"| ingress CPU (mean cores) / host busy (mean cores of {m['nproc']}) | "
        f"{s['ingress_cores_mean']} / {s['host_cores_mean']} |",
        *memhook_lines(s.get("memhook")),
        "",
        "## Samples",
        "",
        *md_table(rep["samples"], p["table_every"]),
        "",
    ]
    if rep["warnings"]:
        lines += ["## Warnings", "", *(f"- {w}" for w in rep["warnings"]), ""]
    return "\n".join(lines)


def summarize(
    rows: list[dict[str, Any]],
    totals: dict[str, Any],
    gens: Generators | None,
    duration: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    run_rows = [r for r in rows if r["phase"] == "run"]
    base = next((r for r in rows if r["phase"] == "baseline"), None)
    after = next((r for r in reversed(rows) if r["phase"] == "after"), None)
    warm = [r for r in run_rows if r["t_s"] <= duration / 4]
    end = run_rows[-1] if run_rows else None
    lo, hi = call_bounds(args.call_seconds, args.call_spread)
    ing = [r["cores"]["ingress"] for r in run_rows if r["cores"].get("ingress") is not None]
    host = [r["cores"]["host"] for r in run_rows if r["cores"].get("host") is not None]
    accepted = None
    if end and end["frontend"] and base and base["frontend"]:
        accepted = end["frontend"]["connections_total"] - base["frontend"]["connections_total"]
    return {
        "duration_s": round(run_rows[-1]["t_s"], 1) if run_rows else 0.0,
        "samples": len(run_rows),
        "call_seconds_min": round(lo, 2),
        "call_seconds_max": round(hi, 2),
        "calls_started": totals.get("established", 0),
        "calls_completed": totals.get("finished", 0),
        "calls_failed": totals.get("failed", 0),
        "calls_cut_at_end": totals.get("cut", 0),
        "call_attempts": totals.get("attempts", 0),
        "frames_sent": totals.get("sent", 0),
        "frames_echoed": totals.get("recv", 0),
        "lost_frames": totals.get("lost", 0),
        "corrupt_frames": totals.get("corrupt", 0),
        "unexpected_messages": totals.get("unexpected", 0),
        "errors": totals.get("errors", {}),
        "statuses": totals.get("statuses", {}),
        "fleets": totals.get("fleets", {}),
        "connections_accepted": accepted,
        "rss_kib_baseline": base and base["rss_kib"],
        "rss_kib_end_of_warm_up": warm[-1]["rss_kib"] if warm else None,
        "rss_kib_end": end and end["rss_kib"],
        "rss_kib_after": after and after["rss_kib"],
        "rss_kib_max": max((r["rss_kib"] for r in run_rows), default=None),
        "fds_baseline": base and base["fds"],
        "fds_end_of_warm_up": warm[-1]["fds"] if warm else None,
        "fds_end": end and end["fds"],
        "fds_after": after and after["fds"],
        "fds_max": max((r["fds"] or 0 for r in run_rows), default=None),
        "handshake_ms_p50": hist_p(gens.hs_all, 50) if gens else None,
        "handshake_ms_p99": hist_p(gens.hs_all, 99) if gens else None,
        "rtt_ms_p50": hist_p(gens.rtt_all, 50) if gens else None,
        "rtt_ms_p99": hist_p(gens.rtt_all, 99) if gens else None,
        "ingress_cores_mean": round_or_none(mean(ing), 3),
        "host_cores_mean": round_or_none(mean(host), 3),
        "generators_rss_kib_start_end": [
            run_rows[0]["generators_rss_kib"],
            end["generators_rss_kib"],
        ]
        if end
        else None,
        "fleets_rss_kib_start_end": [run_rows[0]["fleets_rss_kib"], end["fleets_rss_kib"]]
        if end
        else None,
    }


def memhook_summary(rows: list[dict[str, Any]], duration: float) -> dict[str, Any] | None:
    """With ``--memhook``: glibc's heap at the four points, and which object types grew
    between the end of warm-up and the end of the run."""
    hooked = [r for r in rows if r.get("memhook") and "error" not in r["memhook"]]
    if not hooked:
        return None
    run_rows = [r for r in hooked if r["phase"] == "run"]
    points = {
        "baseline": next((r for r in hooked if r["phase"] == "baseline"), None),
        "end_of_warm_up": next((r for r in reversed(run_rows) if r["t_s"] <= duration / 4), None),
        "end": run_rows[-1] if run_rows else None,
        "after": next((r for r in reversed(hooked) if r["phase"] == "after"), None),
    }
    out: dict[str, Any] = {}
    for key in ("malloc_in_use_kib", "malloc_free_kib", "heap_arena_kib", "gc_objects_top60"):
        out[key] = {name: r and r["memhook"][key] for name, r in points.items()}
    a, b = points["end_of_warm_up"], points["end"]
    if a and b:
        ta, tb = a["memhook"]["gc_objects_by_type"], b["memhook"]["gc_objects_by_type"]
        grown = {k: tb.get(k, 0) - ta.get(k, 0) for k in set(ta) | set(tb)}
        out["types_grown_after_warm_up"] = dict(
            sorted(((k, v) for k, v in grown.items() if v > 0), key=lambda kv: -kv[1])[:10]
        )
    return out


def warnings_for(rep: dict[str, Any]) -> list[str]:
    out = []
    nproc = rep["machine"]["nproc"] or 1
    s = rep["summary"]
    if (s.get("host_cores_mean") or 0) > 0.9 * nproc:
        out.append(f"host busy {s['host_cores_mean']}/{nproc} cores on average: saturated")
    gen = [r["cores"].get("generators") or 0 for r in rep["samples"] if r["phase"] == "run"]
    if gen and max(gen) > 0.8 * max(1, rep["params"]["generators_used"]):
        out.append(
            f"generators used up to {max(gen)} cores over {rep['params']['generators_used']} "
            "process(es): they may have fallen behind (frames late, not lost)"
        )
    if s.get("unexpected_messages"):
        out.append(f"{s['unexpected_messages']} echoes arrived with nothing outstanding")
    return out


# -- the run ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=doc.splitlines()[0])
    p.add_argument("--calls", type=int, default=200, help="concurrent calls kept up")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument(
        "--call-seconds", type=float, default=20.0, help="mean call length (uniform around it)"
    )
    p.add_argument(
        "--call-spread",
        type=float,
        default=0.5,
        help=f"call lengths uniform in mean x (1 +- SPREAD), at most {SPREAD_MAX}; default 0.5",
    )
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    p.add_argument("--table-every", type=float, default=60.0, help="Markdown rows, seconds")
    p.add_argument("--profile", default="twilio-like", choices=sorted(PROFILES))
    p.add_argument("--route", help="call route prefix (default /exotel/ for exotel, else /ws/)")
    p.add_argument("--generators", type=int, default=0, help="processes (0: by --calls)")
    p.add_argument("--calls-per-generator", type=int, default=250)
    p.add_argument("--ramp", type=float, default=5.0, help="seconds over which calls start")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--rss-tolerance-pct",
        type=float,
        default=5.0,
        help="RSS growth after warm-up still called flat (default 5)",
    )
    p.add_argument(
        "--fd-slack",
        type=int,
        default=16,
        help="descriptors over baseline + 2 x calls up still called flat (default 16)",
    )
    p.add_argument("--no-stats", action="store_true", help="leave the ingress's stats listener off")
    p.add_argument(
        "--ingress-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for fleet-ingress (experiments, e.g. "
        "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072); {repo} is the repository",
    )
    p.add_argument(
        "--memhook",
        action="store_true",
        help="load bench/memhook into the ingress and record glibc's heap in use / free and "
        "live objects by type at every sample (diagnosis: disturbs the figures a little)",
    )
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="with --memhook")
    p.add_argument("--json-out", type=Path, help="default bench/results/soak-TIME/results.json")
    p.add_argument("--md-out", type=Path, help="default next to the JSON, results.md")
    args = p.parse_args(argv)
    if args.calls < 1 or args.calls > 5000:
        p.error("--calls must be 1..5000")
    if not 0 < args.minutes <= 24 * 60:
        p.error("--minutes must be in (0, 1440]")
    if not 0 <= args.call_spread <= SPREAD_MAX:
        p.error(f"--call-spread must be in [0, {SPREAD_MAX}]")
    if args.call_seconds < MIN_CALL_SECONDS:
        p.error(f"--call-seconds must be at least {MIN_CALL_SECONDS}")
    if args.sample_every <= 0 or args.minutes * 60 / args.sample_every < 8:
        p.error("need at least 8 samples: lower --sample-every or raise --minutes")
    if args.route is None:
        args.route = "/exotel/" if args.profile == "exotel" else "/ws/"
    return args


async def soak(args: argparse.Namespace, rep: dict[str, Any]) -> dict[str, Any]:
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    rows: list[dict[str, Any]] = rep["samples"]
    duration = args.minutes * 60
    # What bench.scenarios.Run reads of the bench's options; each fleet could take every call.
    run_args = SimpleNamespace(
        fleet_capacity=args.calls + 16,
        haproxy_nbthread=1,
        haproxy_option=[],
        pin=False,
        profile=args.profile,
    )
    gens: Generators | None = None
    totals: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fleet-ingress-soak-") as tmp:
        run = Run(run_args, Path(tmp), Path(tmp))
        rep["settings"] = run.settings.as_dict()
        try:
            await run.start_fleets()
            ingress = await start_ingress(run, not args.no_stats, ingress_env(args, run.dir))
            rep["stats_listener"] = ingress.stats_port is not None
            rep["ingress_config"] = ingress.config_text
            pid = ingress.target.pid
            assert pid is not None
            log(f"fleet-ingress ready (pid {pid}) after {ingress.target.ready_s} s")
            await asyncio.sleep(2.0)  # the ready call gone, health probes settled
            sampler = Sampler(ingress, run)
            await sampler.take("baseline")  # primes the CPU counters
            await asyncio.sleep(1.0)
            base = await sampler.take("baseline")
            sampler.fd0 = base["fds"] or 0
            base["fd_excess"] = 0
            rows.append(base)
            log(describe_row(base))
            gens = await spawn_generators(run, args, ingress)
            rep["params"]["generators_used"] = len(gens.procs)
            sampler.gens = gens
            sampler.t0 = time.monotonic()
            log(
                f"{args.calls} calls of {args.call_seconds:g} s (+-{args.call_spread * 100:g} %) "
                f"for {args.minutes:g} min in {len(gens.procs)} generator process(es)"
            )
            end = sampler.t0 + duration
            n = 0
            while True:
                n += 1
                due = min(end, sampler.t0 + n * args.sample_every)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if ingress.target.proc is not None and ingress.target.proc.returncode is not None:
                    raise RuntimeError(
                        f"fleet-ingress exited {ingress.target.proc.returncode} during the run"
                    )
                row = await sampler.take("run")
                rows.append(row)
                log(describe_row(row))
                if due >= end:
                    break
            log("stopping the calls")
            await gens.stop(timeout=OPEN_TIMEOUT + ECHO_WAIT + CLOSE_WAIT + 15)
            done = list(gens.done.values())
            if len(done) < len(gens.procs):
                rep["warnings"].append(
                    f"{len(gens.procs) - len(done)} generator(s) left no final count: "
                    "their last progress line is used"
                )
            totals = {
                k: gens.total(k)
                for k in (
                    "attempts",
                    "established",
                    "failed",
                    "finished",
                    "lost",
                    "corrupt",
                    "unexpected",
                    "sent",
                    "recv",
                )
            }
            rep["generators_final"] = [
                {k: v for k, v in d.items() if k not in ("rtt_hist", "hs_hist")} for d in done
            ]
            totals["cut"] = gens.total("cut")
            # A frame sent and never echoed is lost, even on a call aborted at the end.
            totals["lost"] = max(totals["lost"], totals["sent"] - totals["recv"])
            totals["errors"] = gens.merged("errors")
            totals["statuses"] = gens.merged("statuses")
            totals["fleets"] = gens.merged("fleets")
            # Every call is closed: descriptors back to the baseline (bounded wait).
            sampler.gens = None
            deadline = time.monotonic() + AFTER_WAIT
            while True:
                await asyncio.sleep(1.0)
                after = await sampler.take("after")
                after["t_s"] = round(time.monotonic() - sampler.t0, 2)
                for k in ("calls_started", "calls_completed", "calls_failed", "call_attempts"):
                    after[k] = totals.get(
                        {
                            "calls_started": "established",
                            "calls_completed": "finished",
                            "calls_failed": "failed",
                            "call_attempts": "attempts",
                        }[k]
                    )
                after["lost_frames"] = totals.get("lost")
                after["corrupt_frames"] = totals.get("corrupt")
                after["frames_sent"], after["frames_echoed"] = totals["sent"], totals["recv"]
                ok = after["fds"] is not None and after["fds"] <= sampler.fd0 + FD_SLACK_IDLE
                if ok or time.monotonic() > deadline:
                    break
            rows.append(after)
            log(describe_row(after))
            code = await Children.stop(ingress.target.proc)  # type: ignore[arg-type]
            if code not in (0, -15, 143):
                rep["warnings"].append(f"fleet-ingress exited {code} on SIGTERM")
        finally:
            with contextlib.suppress(Exception):
                if gens is not None:
                    for task in gens.readers:
                        task.cancel()
            await run.close()
            err = Path(tmp) / "ingress" / "stderr.log"
            if err.exists():
                lines = err.read_text(errors="replace").splitlines()
                rep["ingress_stderr_lines"] = len(lines)
                rep["ingress_stderr_head"] = lines[:20]
                if lines:
                    rep["warnings"].append(
                        f"fleet-ingress wrote {len(lines)} lines on stderr, first: {lines[0]!r}"
                    )
    rep["summary"] = summarize(rows, totals, gens, duration, args)
    rep["summary"]["memhook"] = memhook_summary(rows, duration)
    base = next(r for r in rows if r["phase"] == "baseline")
    after = next((r for r in reversed(rows) if r["phase"] == "after"), None)
    rep["verdict"] = judge(rows, base, after, totals, args, duration)
    rep["warnings"] += warnings_for(rep)
    return rep


def write(rep: dict[str, Any], json_out: Path, md_out: Path) -> None:
    json_out.parent.mkdir(parents=True, exist_ok=True)
    md_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    if "verdict" in rep:
        md_out.write_text(markdown(rep))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--generator" in argv:
        return generator_main(argv)
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_out = args.json_out or REPO / "bench" / "results" / f"soak-{stamp}" / "results.json"
    md_out = args.md_out or json_out.with_name("results.md")
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    params["frame_interval_ms"] = PROFILES[args.profile].interval * 1000
    params["tls"] = "both sides"
    rep: dict[str, Any] = {
        "scenario": "soak",
        "command": "python -m bench.soak " + shlex.join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": procfs.machine(),
        "code": code_version(),
        "params": params,
        "samples": [],
        "warnings": [],
    }
    log(f"soak: writing to {json_out} and {md_out}")
    try:
        rep = uvloop.run(soak(args, rep))
    except (KeyboardInterrupt, asyncio.CancelledError):
        rep["error"] = "interrupted"
        write(rep, json_out, md_out)
        log("interrupted: every child process stopped; samples so far in the JSON")
        return 130
    except Exception as exc:
        rep["error"] = f"{type(exc).__name__}: {exc}"
        write(rep, json_out, md_out)
        log(f"error: {rep['error']} (every child process stopped; samples so far in the JSON)")
        return 2
    rep["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    write(rep, json_out, md_out)
    print(markdown(rep))
    for w in rep["warnings"]:
        log(f"WARNING: {w}")
    v = rep["verdict"]
    log(f"verdict: {'PASS' if v['passed'] else 'FAIL'}" + "".join(f"; {r}" for r in v["reasons"]))
    log(f"results: {json_out}, {md_out}")
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
