"""The four scenarios, each run against every target in turn, with the same fleets.

A :class:`Run` owns the temporary directory, the TLS files, the two fleet
processes and every child it starts (all stopped at the end, even on error).
For each target it starts a fresh proxy process, waits until a real call goes
through, and drives generator processes (:mod:`bench.worker`) while sampling
/proc: the proxy's CPU and RSS, the fleets', the generators', the host's and
every other process's (the machine is shared: their CPU is reported, never
subtracted).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import pickle
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import memory, procfs, profile
from .carrier import Recorder
from .children import HOST, Children, python_module, stop_generators
from .targets import Settings, Target, fleet_available, start_target
from .tlsfiles import TLSFiles
from .worker import hist_upper

FLEETS = ("fleet-a", "fleet-b")
RAMP = 2.0  # seconds over which a batch of streaming calls starts (see ``stagger``)
SETTLE = 1.0  # after the last call started, before the window opens
GENERATOR_SATURATED = 0.8  # of one core, per generator process
OTHER_LOAD = 0.1  # cores used by processes that are not this benchmark's
PROGRESS_EVERY = 2.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stagger(calls: int, interval: float, ramp: float = RAMP) -> float:
    """Delay between call starts, ~``ramp / calls``, chosen so the calls' frame clocks
    fall at ``calls`` distinct, evenly spaced phases of ``interval``.

    ``ramp / calls`` itself can be a multiple of the interval (100 calls over 2 s
    with 20 ms frames), which puts every call's frames in the same burst. With
    ``stagger = m * interval / calls`` and ``m`` prime to ``calls``, call ``i``
    starts at phase ``i * m mod calls`` (in ``interval / calls`` units): each once.
    """
    m = max(1, round(ramp / interval))
    while math.gcd(m, calls) != 1:
        m += 1
    return m * interval / calls


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (as ``fleet_ingress.sim.summarize``); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return round(ordered[int(rank) - 1], 3)


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


# -- sampling ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float
    target_cpu: float
    fleets_cpu: float
    gen_cpu: dict[int, float]
    host_busy: float
    syscalls: int
    others: dict[str, float]


@dataclass
class Generators:
    """Generator processes of one batch of calls, with their latest progress lines."""

    procs: list[asyncio.subprocess.Process]
    outs: list[Path]
    latest: dict[int, dict[str, Any]] = field(default_factory=dict)
    hists: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)

    def start_reading(self) -> None:
        for proc in self.procs:
            self.readers.append(asyncio.get_running_loop().create_task(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if msg.get("done"):
                    self.done[proc.pid] = msg
                    continue
                self.latest[proc.pid] = msg
                hist = {int(k): v for k, v in msg.pop("rtt_hist", {}).items()}
                if hist:
                    self.hists.append((msg["t"], hist))

    def total(self, key: str) -> int:
        return sum(int(m.get(key, 0)) for m in self.latest.values())

    def p_rtt(self, start: float, end: float, p: float) -> float | None:
        """Approximate (5 %) round-trip percentile of echoes reported in (start, end]."""
        merged: dict[int, int] = {}
        for t, hist in self.hists:
            if start < t <= end:
                for b, n in hist.items():
                    merged[b] = merged.get(b, 0) + n
        total = sum(merged.values())
        if not total:
            return None
        need, seen = total * p / 100, 0
        for b in sorted(merged):
            seen += merged[b]
            if seen >= need:
                return round(hist_upper(b), 3)
        return None

    async def stop(self, timeout: float) -> list[Recorder]:
        if not await stop_generators(self.procs, timeout):
            log("a generator did not finish in time: stopped")
        for reader in self.readers:
            reader.cancel()
        recs = []
        for out in self.outs:
            if out.exists():
                with out.open("rb") as f:
                    recs.append(pickle.load(f)["recorder"])
            else:
                rec = Recorder()
                rec.error("generator process left no result")
                recs.append(rec)
        return recs

    async def wait_all_done(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(p.wait() for p in self.procs))


# -- window figures from the generators' records ----------------------------------


def count_between(values: Any, start: float, end: float) -> int:
    return bisect.bisect_right(values, end) - bisect.bisect_left(values, start)


def rtts_between(recs: list[Recorder], start: float, end: float) -> list[float]:
    out: list[float] = []
    for rec in recs:
        i, j = bisect.bisect_left(rec.recv_t, start), bisect.bisect_right(rec.recv_t, end)
        out.extend(rec.rtt_ms[i:j])
    return out


def merged_record(recs: list[Recorder]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    fleets: dict[str, int] = {}
    for rec in recs:
        for src, dst in ((rec.errors, errors), (rec.statuses, statuses), (rec.fleets, fleets)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
    handshakes = [h for rec in recs for h in rec.handshake_ms]
    return {
        "established": sum(r.established for r in recs),
        "failed": sum(r.failed for r in recs),
        "frames_sent": sum(len(r.sent_t) for r in recs),
        "frames_echoed": sum(len(r.recv_t) for r in recs),
        "lost_frames": sum(r.lost for r in recs),
        "corrupt_frames": sum(r.corrupt for r in recs),
        "unexpected_messages": sum(r.unexpected for r in recs),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        "statuses": statuses,
        "fleets": fleets,
        "handshake_ms_p50": percentile(handshakes, 50),
        "handshake_ms_p99": percentile(handshakes, 99),
        "handshakes": len(handshakes),
    }


# -- the run ---------------------------------------------------------------------


class Run:
    """Temp dir, TLS files, fleets, and every child process of one bench invocation."""

    def __init__(self, args: Any, directory: Path, out: Path) -> None:
        self.args = args
        self.dir = directory
        self.out = out
        self.children = Children()
        self.tls = TLSFiles.write(directory)
        self.settings = Settings(
            maxconn=args.fleet_capacity,
            haproxy_nbthread=args.haproxy_nbthread,
            haproxy_extra=tuple(args.haproxy_option),
        )
        self.fleet_procs: list[asyncio.subprocess.Process] = []
        self.fleet_ports: list[int] = []
        self.nproc = os.cpu_count() or 1
        self.proxy_cpus: set[int] | None = None
        self.load_cpus: set[int] | None = None
        if args.pin and self.nproc >= 2:
            self.proxy_cpus = {self.nproc - 1}
            self.load_cpus = set(range(self.nproc - 1))
            os.sched_setaffinity(0, self.load_cpus)
        self.gen_seq = 0

    async def start_fleets(self) -> None:
        for name in FLEETS:
            proc = await self.children.spawn(
                python_module(
                    "bench.fleets",
                    "--tls",
                    str(self.dir),
                    "--name",
                    name,
                    "--capacity",
                    str(self.args.fleet_capacity),
                ),
                stdout=asyncio.subprocess.PIPE,
                cpus=self.load_cpus,
            )
            assert proc.stdout is not None
            async with asyncio.timeout(20):
                line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"fleet {name} exited ({await proc.wait()}) before serving")
            self.fleet_procs.append(proc)
            self.fleet_ports.append(int(json.loads(line)["port"]))
        log(f"fleets up on ports {self.fleet_ports} (capacity {self.args.fleet_capacity} each)")

    async def fleets_idle(self, timeout: float = 30.0) -> bool:
        """Until both fleets report all their capacity free (no call left from before)."""
        ctx = self.tls.carrier_context()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            free = [await fleet_available(p, ctx) for p in self.fleet_ports]
            if all(f == self.args.fleet_capacity for f in free):
                return True
            await asyncio.sleep(0.5)
        log(f"fleets still busy after {timeout:g} s: {free}")
        return False

    @contextlib.asynccontextmanager
    async def target(self, name: str, env: dict[str, str] | None = None) -> AsyncIterator[Target]:
        await self.fleets_idle()
        target = await start_target(
            name,
            self.children,
            self.tls,
            self.settings,
            self.fleet_ports,
            self.dir,
            cpus=self.proxy_cpus,
            env=env,
        )
        if target.proc is not None:
            log(f"{target.label} ready (pid {target.pid}) after {target.ready_s} s")
            await asyncio.sleep(1.5)  # the ready call is gone; health probes settled
        try:
            yield target
        finally:
            if target.proc is not None:
                code = await Children.stop(target.proc)
                if code not in (0, -15, 143):
                    target.notes.append(f"exited {code} on SIGTERM")
                if target.log is not None and target.log.exists():
                    lines = target.log.read_text(errors="replace").splitlines()
                    if lines:
                        target.notes.append(f"{len(lines)} lines on stderr, first: {lines[0]!r}")

    async def generators(
        self,
        target: Target,
        *,
        calls: int,
        mode: str,
        t0: float,
        gap: float,
        max_seconds: float,
        workers: int,
        extra: list[str] | None = None,
    ) -> Generators:
        workers = max(1, min(workers, calls))
        procs, outs = [], []
        for w in range(workers):
            self.gen_seq += 1
            out = self.dir / f"gen-{self.gen_seq}.pickle"
            n = len(range(w, calls, workers))
            argv = python_module(
                "bench.worker",
                "--ca",
                str(self.tls.ca),
                "--profile",
                self.args.profile,
                "--route",
                self.args.route,
                "--mode",
                mode,
                "--calls",
                str(n),
                "--first",
                str(w),
                "--step",
                str(workers),
                "--t0",
                repr(t0),
                "--gap",
                repr(gap),
                "--max-seconds",
                str(max_seconds),
                "--out",
                str(out),
                *(extra or []),
            )
            for host, port in target.urls:
                argv += ["--url", f"{host}:{port}"]
            proc = await self.children.spawn(
                argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cpus=self.load_cpus,
            )
            procs.append(proc)
            outs.append(out)
        gens = Generators(procs, outs)
        gens.start_reading()
        return gens

    def sample(self, target: Target, gens: list[Generators]) -> Sample:
        pids = {p.pid for g in gens for p in g.procs}
        fleet_pids = [p.pid for p in self.fleet_procs]
        exclude = pids | set(fleet_pids) | {os.getpid()}
        if target.pid is not None:
            exclude |= set(procfs.descendants(target.pid))
        return Sample(
            time.monotonic(),
            procfs.tree_cpu_seconds(target.pid) if target.pid else 0.0,
            sum(procfs.cpu_seconds(p) for p in fleet_pids),
            {p: procfs.cpu_seconds(p) for p in pids},
            procfs.host_busy_seconds(),
            procfs.io_syscalls(target.pid) if target.pid else 0,
            procfs.others_cpu_seconds(exclude),
        )

    def loads(self, a: Sample, b: Sample) -> dict[str, Any]:
        """CPU of everyone between two samples, as cores (shares of one core)."""
        window = b.t - a.t
        proxy = b.target_cpu - a.target_cpu if b.target_cpu else None
        gen = {p: b.gen_cpu[p] - a.gen_cpu.get(p, 0.0) for p in b.gen_cpu}
        others = procfs.others_busy(a.others, b.others)
        return {
            "window_s": round(window, 3),
            "proxy_cpu_s": None if proxy is None else round(proxy, 3),
            "proxy_cores": ratio(proxy, window),
            "generator_cores": ratio(sum(gen.values()), window),
            "generator_max_process_cores": ratio(max(gen.values(), default=0.0), window),
            "generator_processes": len(gen),
            "fleets_cores": ratio(b.fleets_cpu - a.fleets_cpu, window),
            "host_busy_cores": ratio(b.host_busy - a.host_busy, window),
            "other_procs_cores": ratio(sum(others.values()), window),
            "other_procs_busiest": {
                procfs.describe(k): ratio(v, window) for k, v in list(others.items())[:3]
            },
            "proxy_syscalls": b.syscalls - a.syscalls,
        }

    @contextlib.asynccontextmanager
    async def progress(
        self, label: str, target: Target, gens: Callable[[], list[Generators]]
    ) -> AsyncIterator[None]:
        async def show() -> None:
            last = self.sample(target, gens())
            started = last.t
            while True:
                await asyncio.sleep(PROGRESS_EVERY)
                now = self.sample(target, gens())
                cur = self.loads(last, now)
                groups = gens()
                est = sum(g.total("established") for g in groups)
                fail = sum(g.total("failed") for g in groups)
                msgs = sum(g.total("sent") + g.total("recv") for g in groups)
                p99 = groups[-1].p_rtt(last.t, now.t, 99) if groups else None
                log(
                    f"{label} {now.t - started:5.1f}s calls up {est} failed {fail} "
                    f"msgs {msgs} rtt~p99 {p99} ms | cores: proxy {cur['proxy_cores']} "
                    f"gen {cur['generator_cores']} fleets {cur['fleets_cores']} "
                    f"host {cur['host_busy_cores']}/{self.nproc} others {cur['other_procs_cores']}"
                )
                last = now

        task = asyncio.get_running_loop().create_task(show())
        try:
            yield
        finally:
            task.cancel()

    def rss(self, target: Target) -> int | None:
        return procfs.tree_rss_kib(target.pid) if target.pid else None

    def mappings(self, target: Target) -> dict[str, int]:
        return procfs.rss_by_mapping(target.pid) if target.pid else {}

    async def close(self) -> None:
        await self.children.stop_all()


async def memhook(target: Target, name: str, before: Any = None, calls: int = 0) -> Any:
    """A ``bench/memhook`` snapshot of the target, when it runs the hook (else None).
    With ``before`` (the baseline's), the per-call analysis of the two."""
    directory = target.env.get("BENCH_MEMHOOK_DIR")
    if not directory or target.pid is None:
        return None
    snap = await memory.probe(Path(directory), name)
    if before is None or snap is None:
        return snap
    if "error" in snap or "error" in before:
        return {"error": snap.get("error") or before.get("error")}
    return memory.per_call(before, snap, calls, Path(directory))


def mapping_delta(before: dict[str, int], after: dict[str, int], calls: int) -> dict[str, float]:
    keys = set(before) | set(after)
    out = {k: round((after.get(k, 0) - before.get(k, 0)) / max(calls, 1), 1) for k in keys}
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -abs(kv[1])) if v}


def warnings_for(label: str, r: dict[str, Any], nproc: int, gen_cpus: int) -> list[str]:
    out = []
    if r.get("failed"):
        out.append(f"{label}: {r['failed']} calls failed: {r.get('errors')}")
    if r.get("lost_frames") or r.get("corrupt_frames"):
        out.append(f"{label}: {r['lost_frames']} frames lost, {r['corrupt_frames']} corrupt")
    loads = r.get("loads", {})
    if (loads.get("generator_max_process_cores") or 0) > GENERATOR_SATURATED:
        out.append(
            f"{label}: a generator process used {loads['generator_max_process_cores']} of a "
            f"core (> {GENERATOR_SATURATED}): the generator may be the bottleneck"
        )
    if (loads.get("generator_cores") or 0) > GENERATOR_SATURATED * gen_cpus:
        out.append(
            f"{label}: generators used {loads['generator_cores']} cores of the "
            f"{gen_cpus} they may run on: the generator may be the bottleneck"
        )
    if (loads.get("host_busy_cores") or 0) > 0.9 * nproc:
        out.append(f"{label}: host busy {loads['host_busy_cores']}/{nproc} cores: saturated")
    if (loads.get("other_procs_cores") or 0) > OTHER_LOAD:
        out.append(
            f"{label}: other processes used {loads['other_procs_cores']} cores during the "
            f"window ({loads['other_procs_busiest']}): figures disturbed"
        )
    return out


# -- scenarios ---------------------------------------------------------------------


def _workers(args: Any, calls: int) -> int:
    if args.generators:
        return int(args.generators)
    return max(1, math.ceil(calls / args.calls_per_generator))


async def steady(
    run: Run, target: Target, calls: int, seconds: float, ramp_s: float = RAMP
) -> dict[str, Any]:
    """``calls`` calls streaming together for a ``seconds`` window (after ramp and settle)."""
    from .carrier import FramePool

    interval = FramePool.build(run.args.profile).interval
    gap = stagger(calls, interval, ramp_s)
    ramp = gap * (calls - 1)
    hook = await memhook(target, "baseline")
    rss0, map0 = run.rss(target), run.mappings(target)
    t0 = time.monotonic() + 0.5
    gens = await run.generators(
        target,
        calls=calls,
        mode="stream",
        t0=t0,
        gap=gap,
        max_seconds=ramp + SETTLE + seconds + 60,
        workers=_workers(run.args, calls),
    )
    first = run.sample(target, [gens])
    async with run.progress(f"steady {target.label}", target, lambda: [gens]):
        await asyncio.sleep(max(0.0, t0 + ramp + SETTLE - time.monotonic()))
        rss1, map1 = run.rss(target), run.mappings(target)
        established = gens.total("established")
        hook = await memhook(target, "calls", hook, established)
        a = run.sample(target, [gens])
        spy = None
        if run.args.py_spy and target.pid and target.kind in ("ingress", "bare"):
            run.gen_seq += 1
            spy = asyncio.get_running_loop().create_task(
                profile.record(
                    run.children,
                    target.pid,
                    seconds - 1,
                    run.out / f"py-spy-{target.name}-{run.gen_seq}.txt",
                )
            )
        perf = None
        if run.args.perf and target.pid:
            run.gen_seq += 1
            perf = asyncio.get_running_loop().create_task(
                profile.perf_record(
                    run.children,
                    target.pid,
                    seconds - 1,
                    run.out / f"perf-{target.name.replace('@', '-')}-{run.gen_seq}.data",
                )
            )
        await asyncio.sleep(max(0.0, a.t + seconds - time.monotonic()))
        b = run.sample(target, [gens])
        spy_path = await spy if spy is not None else None
        perf_path = await perf if perf is not None else None
        recs = await gens.stop(timeout=30)
    await asyncio.sleep(1.0)  # let the closes land
    last = run.sample(target, [gens])
    rss2 = run.rss(target)
    m = merged_record(recs)
    msgs = sum(count_between(r.sent_t, a.t, b.t) + count_between(r.recv_t, a.t, b.t) for r in recs)
    rtts = rtts_between(recs, a.t, b.t)
    loads = run.loads(a, b)
    run_msgs = m["frames_sent"] + m["frames_echoed"]
    return {
        "target": target.name,
        "label": target.label,
        "pid": target.pid,
        "calls": calls,
        **m,
        "failed": max(m["failed"], calls - m["established"]),
        "established_at_window": established,
        "msgs_window": msgs,
        "msgs_window_expected": round(calls * 2 * loads["window_s"] / interval),
        "rtt_ms_p50": percentile(rtts, 50),
        "rtt_ms_p99": percentile(rtts, 99),
        "rtt_ms_max": round(max(rtts), 3) if rtts else None,
        "cpu_s_per_1000_msgs": ratio(loads["proxy_cpu_s"] * 1000, msgs, 5) if target.pid else None,
        "cpu_s_per_1000_msgs_run": ratio((last.target_cpu - first.target_cpu) * 1000, run_msgs, 5)
        if target.pid
        else None,
        "syscalls_per_msg": ratio(loads["proxy_syscalls"], msgs) if target.pid else None,
        "rss_kib_baseline": rss0,
        "rss_kib_with_calls": rss1,
        "rss_kib_after": rss2,
        "rss_kib_per_call": round((rss1 - rss0) / established, 1)
        if rss0 and rss1 and established
        else None,
        "rss_kib_per_call_by_mapping": mapping_delta(map0, map1, established) if map0 else None,
        "memory_profile": hook,
        "py_spy": {"file": spy_path.name, **profile.summarize(spy_path)} if spy_path else None,
        "perf": {"file": perf_path.name, **(await profile.perf_summary(perf_path))}
        if perf_path
        else None,
        "loads": loads,
    }


async def idle(run: Run, target: Target, calls: int, hold: float) -> dict[str, Any]:
    """``calls`` calls that each send one frame (echoed) and then hold, silent."""
    from .carrier import FramePool

    interval = FramePool.build(run.args.profile).interval
    spread = max(RAMP, calls / run.args.connect_rate)
    gap = spread / calls
    hook = await memhook(target, "baseline")
    rss0, map0 = run.rss(target), run.mappings(target)
    t0 = time.monotonic() + 0.5
    gens = await run.generators(
        target,
        calls=calls,
        mode="idle",
        t0=t0,
        gap=gap,
        max_seconds=spread + hold + 60,
        workers=_workers(run.args, calls),
        extra=["--idle-frames", str(run.args.idle_frames)],
    )
    async with run.progress(f"idle {target.label}", target, lambda: [gens]):
        await asyncio.sleep(max(0.0, t0 + spread - time.monotonic()))
        # Until every call is up and has had its echo (bounded).
        for _ in range(100):
            if (
                gens.total("established") + gens.total("failed") >= calls
                and gens.total("recv") >= gens.total("established") * run.args.idle_frames
            ):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(SETTLE + run.args.idle_frames * interval)
        established = gens.total("established")
        a = run.sample(target, [gens])
        rss1, map1 = run.rss(target), run.mappings(target)
        hook = await memhook(target, "calls", hook, established)
        await asyncio.sleep(max(0.0, a.t + hold - time.monotonic()))
        b = run.sample(target, [gens])
        rss1b = run.rss(target)
        recs = await gens.stop(timeout=60)
    m = merged_record(recs)
    loads = run.loads(a, b)
    return {
        "target": target.name,
        "label": target.label,
        "pid": target.pid,
        "calls": calls,
        **m,
        "failed": max(m["failed"], calls - m["established"]),
        "established_at_sample": established,
        "rss_kib_baseline": rss0,
        "rss_kib_with_calls": rss1,
        "rss_kib_end_of_hold": rss1b,
        "rss_kib_per_call": round((rss1 - rss0) / established, 1)
        if rss0 and rss1 and established
        else None,
        "rss_kib_per_call_by_mapping": mapping_delta(map0, map1, established) if map0 else None,
        "memory_profile": hook,
        "idle_cpu_ms_per_call_minute": ratio(
            loads["proxy_cpu_s"] * 1000 * 60, established * loads["window_s"]
        )
        if target.pid and established
        else None,
        "loads": loads,
    }


async def churn(
    run: Run, target: Target, rate: float, seconds: float, call_s: float
) -> dict[str, Any]:
    """New calls at ``rate`` a second for ``seconds``, each streaming ``call_s`` then hanging up."""
    calls = max(1, round(rate * seconds))
    gap = 1.0 / rate
    rss0 = run.rss(target)
    t0 = time.monotonic() + 0.5
    gens = await run.generators(
        target,
        calls=calls,
        mode="churn",
        t0=t0,
        gap=gap,
        max_seconds=seconds + call_s + 60,
        workers=_workers(run.args, round(rate * call_s) or 1),
        extra=["--call-seconds", str(call_s)],
    )
    first = run.sample(target, [gens])
    async with run.progress(f"churn {target.label}", target, lambda: [gens]):
        # Window: from when as many calls end as start, to the last start.
        await asyncio.sleep(max(0.0, t0 + call_s + 1.0 - time.monotonic()))
        a = run.sample(target, [gens])
        await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
        b = run.sample(target, [gens])
        rss1 = run.rss(target)
        try:
            await gens.wait_all_done(call_s + 30)
        except TimeoutError:
            log("churn generators still running: stopping them")
        recs = await gens.stop(timeout=30)
    last = run.sample(target, [gens])
    m = merged_record(recs)
    loads = run.loads(a, b)
    started = sum(count_between(sorted(_starts(r)), a.t, b.t) for r in recs)
    msgs = sum(count_between(r.sent_t, a.t, b.t) + count_between(r.recv_t, a.t, b.t) for r in recs)
    rtts = rtts_between(recs, a.t, b.t)
    return {
        "target": target.name,
        "label": target.label,
        "pid": target.pid,
        "calls": calls,
        "rate_per_s": rate,
        "call_seconds": call_s,
        "concurrent_calls": round(rate * call_s, 1),
        **m,
        "failed": max(m["failed"], calls - m["established"]),
        "calls_started_window": started,
        "msgs_window": msgs,
        "rtt_ms_p50": percentile(rtts, 50),
        "rtt_ms_p99": percentile(rtts, 99),
        "cpu_ms_per_call": ratio(loads["proxy_cpu_s"] * 1000, started) if target.pid else None,
        "cpu_s_per_1000_msgs": ratio(loads["proxy_cpu_s"] * 1000, msgs, 5) if target.pid else None,
        "cpu_s_run": round(last.target_cpu - first.target_cpu, 3) if target.pid else None,
        "rss_kib_baseline": rss0,
        "rss_kib_end": rss1,
        "loads": loads,
    }


def _starts(rec: Recorder) -> list[float]:
    """When calls were established (a handshake's end stands for the call's start)."""
    return rec.handshake_t


async def ramp(
    run: Run,
    target: Target,
    start: int,
    step: int,
    maximum: int,
    hold: float,
    budget_ms: float | None,
    direct_p99: dict[int, float],
) -> dict[str, Any]:
    """Add ``step`` calls at a time (from ``start``) until the added p99 round trip over
    direct at the same level passes ``budget_ms`` (one frame interval), a call fails, or
    ``maximum``. The decision uses the generators' live 5 % histograms; the figures
    reported per level are exact, from their records."""
    from .carrier import FramePool

    interval = FramePool.build(run.args.profile).interval
    rss0 = run.rss(target)
    groups: list[Generators] = []
    levels: list[dict[str, Any]] = []
    windows: list[tuple[int, Sample, Sample, int | None]] = []
    calls, stop_reason = 0, f"reached --ramp-max {maximum}"
    async with run.progress(f"ramp {target.label}", target, lambda: groups):
        while calls < maximum:
            add = start if calls == 0 else min(step, maximum - calls)
            gap = stagger(add, interval, ramp=1.0)
            t0 = time.monotonic() + 0.3
            groups.append(
                await run.generators(
                    target,
                    calls=add,
                    mode="stream",
                    t0=t0,
                    gap=gap,
                    max_seconds=3600,
                    workers=_workers(run.args, add),
                )
            )
            calls += add
            await asyncio.sleep(max(0.0, t0 + gap * (add - 1) + SETTLE - time.monotonic()))
            over, first_host = False, 0.0
            for attempt in (1, 2):  # a level over budget is measured again before stopping
                a = run.sample(target, groups)
                await asyncio.sleep(hold)
                b = run.sample(target, groups)
                rss = run.rss(target)
                approx = _merged_p(groups, a.t, b.t, 99)
                failed = sum(g.total("failed") for g in groups)
                base = direct_p99.get(calls)
                added = diff(approx, base) if base is not None else None
                loads = run.loads(a, b)
                log(
                    f"ramp {target.label}: {calls} calls (window {attempt}), p99 ~{approx} ms "
                    f"(added ~{added} ms), proxy {loads['proxy_cores']} cores, host "
                    f"{loads['host_busy_cores']}, failed {failed}"
                )
                over = budget_ms is not None and added is not None and added > budget_ms
                first_host = max(first_host, loads["host_busy_cores"] or 0)
                if not over or failed:
                    break
            windows.append((calls, a, b, rss))
            if failed:
                stop_reason = f"{failed} calls failed at {calls} calls"
                break
            if over:
                host = max(loads["host_busy_cores"] or 0, first_host)
                why = (
                    "the proxy was saturated"
                    if (loads["proxy_cores"] or 0) > 0.9
                    else "the host was saturated"
                    if host > 0.9 * run.nproc
                    else "the host was heavily loaded"
                    if host > 0.7 * run.nproc
                    else "neither host nor proxy saturated"
                )
                stop_reason = (
                    f"added p99 ~{added} ms > {budget_ms:g} ms at {calls} calls in two "
                    f"windows running ({why}: host up to {host}/{run.nproc} cores busy, proxy "
                    f"{loads['proxy_cores']})"
                )
                break
            if (loads["generator_max_process_cores"] or 0) > GENERATOR_SATURATED:
                stop_reason = f"a generator process saturated at {calls} calls"
                break
        recs: list[Recorder] = []
        for g in groups:
            recs += await g.stop(timeout=60)
    m = merged_record(recs)
    for n, a, b, rss in windows:
        msgs = sum(
            count_between(r.sent_t, a.t, b.t) + count_between(r.recv_t, a.t, b.t) for r in recs
        )
        rtts = rtts_between(recs, a.t, b.t)
        loads = run.loads(a, b)
        levels.append(
            {
                "calls": n,
                "rtt_ms_p50": percentile(rtts, 50),
                "rtt_ms_p99": percentile(rtts, 99),
                "msgs": msgs,
                "msgs_expected": round(n * 2 * loads["window_s"] / interval),
                "cpu_s_per_1000_msgs": ratio(loads["proxy_cpu_s"] * 1000, msgs, 5)
                if target.pid
                else None,
                "rss_kib_per_call": round((rss - rss0) / n, 1) if rss and rss0 else None,
                "loads": loads,
            }
        )
    return {
        "target": target.name,
        "label": target.label,
        "pid": target.pid,
        "levels": levels,
        "stop_reason": stop_reason,
        **m,
        "failed": m["failed"],
    }


def _merged_p(groups: list[Generators], start: float, end: float, p: float) -> float | None:
    merged = Generators([], [])
    for g in groups:
        merged.hists += g.hists
    return merged.p_rtt(start, end, p)


__all__ = ["HOST", "Run", "churn", "idle", "ramp", "steady"]
