"""One bench run: its temporary directory, TLS files, fleets, targets, generators and samples.

A :class:`Run` owns the temporary directory, the TLS files, the two fleet
processes and every child it starts (all stopped at the end, even on error).
For a target it starts a fresh proxy process, waits until a real call goes
through, and drives generator processes (:mod:`bench.harness.generator`) while
sampling /proc: the proxy's CPU and RSS, the fleets', the generators', the
host's and every other process's (the machine is shared: their CPU is
reported, never subtracted). The scenarios (:mod:`bench.scenarios`) only say
which calls to make when and which figures to take.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fleets, memory, procfs
from .carrier import Recorder
from .children import REPO, Children, log, python_module
from .generator import Generators
from .stats import count_between, percentile, ratio
from .targets import Settings, Target, fleet_available, start_target
from .tlsfiles import TLSFiles

FLEETS = ("fleet-a", "fleet-b")
RAMP = 2.0  # seconds over which a batch of streaming calls starts (see ``stats.stagger``)
SETTLE = 1.0  # after the last call started, before the window opens
GENERATOR_SATURATED = 0.8  # of one core, per generator process
OTHER_LOAD = 0.1  # cores used by processes that are not this benchmark's
PROGRESS_EVERY = 2.0


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
    # The target's CPU by part (a pid, or a thread id of a one-process target) and what
    # each part is ("supervisor", "worker 1", "thread 2"); this harness's own CPU.
    target_parts: dict[int, float] = field(default_factory=dict)
    part_roles: dict[int, str] = field(default_factory=dict)
    harness_cpu: float = 0.0
    sleeps: int = 0  # the target's voluntary context switches (procfs.sleeps)


def process_roles(kind: str, tree: list[tuple[int, list[str]]]) -> dict[int, str]:
    """What each process of a target's tree is, from its argv; ``tree`` is (pid, argv),
    the target's own process first, then the others in pid order (start order). fleet-ingress:
    "supervisor", "worker 1", "worker 2", ...; anything else: the kind, then "child N"."""
    out: dict[int, str] = {}
    workers = children = 0
    for i, (pid, argv) in enumerate(tree):
        if i == 0:
            out[pid] = "supervisor" if kind == "ingress" else kind
        elif kind == "ingress" and "worker" in argv[1:]:
            workers += 1
            out[pid] = f"worker {workers}"
        else:
            children += 1
            out[pid] = f"child {children}"
    return out


def cpu_parts(kind: str, pid: int) -> tuple[dict[int, float], dict[int, str]]:
    """A target's CPU seconds by process, or by thread when it is one process with
    several threads (HAProxy's ``nbthread``), and the role of each part."""
    by_pid = procfs.tree_cpu_by_process(pid)
    if len(by_pid) == 1 and kind == "haproxy":
        threads = procfs.thread_cpu_seconds(pid)
        if len(threads) > 1:
            return threads, {tid: f"thread {i}" for i, tid in enumerate(threads, 1)}
    roles = process_roles(kind, [(p, procfs.cmdline(p)) for p in by_pid])
    return by_pid, roles


def cores_by_role(a: Sample, b: Sample, window: float) -> dict[str, float | None]:
    """Cores each role of the target used between two samples; a part that started in
    the window counts from zero, one that ended takes its seconds with it."""
    out: dict[str, float] = {}
    for part, cpu in b.target_parts.items():
        role = b.part_roles.get(part, str(part))
        out[role] = out.get(role, 0.0) + cpu - a.target_parts.get(part, 0.0)
    return {role: ratio(v, window) for role, v in out.items()}


# -- window figures from the generators' records ----------------------------------


def rtts_between(recs: list[Recorder], start: float, end: float) -> list[float]:
    out: list[float] = []
    for rec in recs:
        i, j = bisect.bisect_left(rec.recv_t, start), bisect.bisect_right(rec.recv_t, end)
        out.extend(rec.rtt_ms[i:j])
    return out


def msgs_between(recs: list[Recorder], start: float, end: float) -> int:
    """WebSocket messages relayed in [start, end]: frames sent and echoes read."""
    return sum(
        count_between(r.sent_t, start, end) + count_between(r.recv_t, start, end) for r in recs
    )


def merged_record(recs: list[Recorder]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    fleets: dict[str, int] = {}
    tls: dict[str, int] = {}
    for rec in recs:
        pairs = ((rec.errors, errors), (rec.statuses, statuses), (rec.fleets, fleets))
        for src, dst in (*pairs, (getattr(rec, "tls", {}), tls)):
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
        "tls": tls,
        "handshake_ms_p50": percentile(handshakes, 50),
        "handshake_ms_p99": percentile(handshakes, 99),
        "handshakes": len(handshakes),
    }


# -- the run ---------------------------------------------------------------------


class Run:
    """Temp dir, TLS files, fleets, and every child process of one bench invocation."""

    def __init__(self, args: Any, directory: Path, out: Path) -> None:
        """``args``: the command's options. A run reads ``profile``, ``route``,
        ``fleet_capacity``, ``generators`` and ``calls_per_generator``, and where the
        command has them ``pin``, ``haproxy_nbthread``, ``ingress_workers`` and
        ``haproxy_option``."""
        self.args = args
        self.dir = directory
        self.out = out
        self.children = Children()
        self.tls = TLSFiles.write(directory)
        self.settings = Settings(
            maxconn=args.fleet_capacity,
            haproxy_nbthread=getattr(args, "haproxy_nbthread", 1),
            ingress_workers=getattr(args, "ingress_workers", 1),
            haproxy_extra=tuple(getattr(args, "haproxy_option", ())),
        )
        self.fleet_procs: list[asyncio.subprocess.Process] = []
        self.fleet_ports: list[int] = []
        self.nproc = os.cpu_count() or 1
        self.proxy_cpus: set[int] | None = None
        self.load_cpus: set[int] | None = None
        if getattr(args, "pin", False) and self.nproc >= 2:
            self.proxy_cpus = {self.nproc - 1}
            self.load_cpus = set(range(self.nproc - 1))
            os.sched_setaffinity(0, self.load_cpus)
        self.gen_seq = 0

    async def start_fleets(self) -> None:
        for name in FLEETS:
            proc, port = await fleets.start(
                self.children, self.dir, name, self.args.fleet_capacity, cpus=self.load_cpus
            )
            self.fleet_procs.append(proc)
            self.fleet_ports.append(port)
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

    async def start(
        self, name: str, env: dict[str, str] | None = None, stats_port: int | None = None
    ) -> Target:
        """Target ``name`` in front of this run's fleets, serving calls."""
        return await start_target(
            name,
            self.children,
            self.tls,
            self.settings,
            self.fleet_ports,
            self.dir,
            cpus=self.proxy_cpus,
            env=env,
            stats_port=stats_port,
        )

    @contextlib.asynccontextmanager
    async def target(self, name: str, env: dict[str, str] | None = None) -> AsyncIterator[Target]:
        """A fresh ``name`` for one scenario, once the fleets have no call left from the
        last; stopped after, its exit code and stderr kept in its notes."""
        await self.fleets_idle()
        target = await self.start(name, env)
        if target.proc is not None:
            log(f"{target.label} ready (pid {target.pid}) after {target.ready_s} s")
            await asyncio.sleep(1.5)  # the ready call is gone; health probes settled
        try:
            yield target
        finally:
            if target.proc is not None:
                code = await Children.stop(target.proc)
                target.close_notify()
                if code not in (0, -15, 143):
                    target.notes.append(f"exited {code} on SIGTERM")
                if target.log is not None and target.log.exists():
                    lines = target.log.read_text(errors="replace").splitlines()
                    if lines:
                        target.notes.append(f"{len(lines)} lines on stderr, first: {lines[0]!r}")

    def workers(self, calls: int) -> int:
        """Generator processes for ``calls`` calls: ``--generators``, else one per
        ``--calls-per-generator``."""
        if self.args.generators:
            return int(self.args.generators)
        return max(1, math.ceil(calls / self.args.calls_per_generator))

    async def generators(
        self,
        target: Target,
        *,
        calls: int,
        mode: str,
        t0: float,
        gap: float,
        max_seconds: float,
        workers: int | None = None,
        seed: int | None = None,
        extra: list[str] | None = None,
    ) -> Generators:
        """Generator processes making ``calls`` calls (call ``i`` at ``t0 + i x gap``) in
        ``mode`` (:mod:`bench.harness.generator`) against ``target``; with ``seed``,
        process ``w`` seeds its frames and call lengths with ``seed x 1000 + w``."""
        workers = max(1, min(self.workers(calls) if workers is None else workers, calls))
        procs, outs = [], []
        for w in range(workers):
            self.gen_seq += 1
            out = None if mode == "slots" else self.dir / f"gen-{self.gen_seq}.pickle"
            argv = python_module(
                "bench.harness.generator",
                "--ca",
                str(self.tls.ca),
                "--profile",
                self.args.profile,
                "--route",
                self.args.route,
                "--mode",
                mode,
                "--calls",
                str(len(range(w, calls, workers))),
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
                *(["--out", str(out)] if out is not None else []),
                *(["--seed", str(seed * 1000 + w)] if seed is not None else []),
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
        parts: dict[int, float] = {}
        roles: dict[int, str] = {}
        if target.pid is not None:
            exclude |= set(procfs.descendants(target.pid))
            parts, roles = cpu_parts(target.kind, target.pid)
        return Sample(
            time.monotonic(),
            sum(parts.values()),
            sum(procfs.cpu_seconds(p) for p in fleet_pids),
            {p: procfs.cpu_seconds(p) for p in pids},
            procfs.host_busy_seconds(),
            procfs.tree_io_syscalls(target.pid) if target.pid else 0,
            procfs.others_cpu_seconds(exclude),
            parts,
            roles,
            procfs.cpu_seconds(os.getpid()),
            procfs.tree_sleeps(target.pid) if target.pid else 0,
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
            # The load side's CPU seconds unrounded (the cores above are rounded to 3 digits,
            # 0.5 % of a generator's 0.18 core): what bench.harness.load_side divides by work.
            "generator_cpu_s": round(sum(gen.values()), 6),
            "fleets_cpu_s": round(b.fleets_cpu - a.fleets_cpu, 6),
            "generator_max_process_cores": ratio(max(gen.values(), default=0.0), window),
            "generator_processes": len(gen),
            "fleets_cores": ratio(b.fleets_cpu - a.fleets_cpu, window),
            "host_busy_cores": ratio(b.host_busy - a.host_busy, window),
            "other_procs_cores": ratio(sum(others.values()), window),
            "other_procs_busiest": {
                procfs.describe(k): ratio(v, window) for k, v in list(others.items())[:3]
            },
            "proxy_syscalls": b.syscalls - a.syscalls,
            "proxy_sleeps": b.sleeps - a.sleeps,
            "harness_cores": ratio(b.harness_cpu - a.harness_cpu, window),
            # The proxy's cores by process (fleet-ingress: supervisor, worker N) or by
            # thread (HAProxy nbthread > 1), and each generator process's.
            "proxy_cores_by_process": cores_by_role(a, b, window),
            "generator_cores_by_process": [ratio(v, window) for v in gen.values()],
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
                p99 = groups[-1].rtt_percentile(last.t, now.t, 99) if groups else None
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
        return procfs.tree_rss_by_mapping(target.pid) if target.pid else {}

    def rss_by_process(self, target: Target) -> dict[str, int]:
        """RSS KiB of each process of the target by its role (supervisor, worker N)."""
        if not target.pid:
            return {}
        tree = [(p, procfs.cmdline(p)) for p in procfs.descendants(target.pid)]
        roles = process_roles(target.kind, tree)
        return {roles[p]: procfs.rss_kib(p) for p, _ in tree}

    def rollup(self, target: Target) -> dict[str, int]:
        return procfs.tree_smaps_rollup(target.pid) if target.pid else {}

    async def close(self) -> None:
        await self.children.stop_all()


def target_env(
    entries: list[str],
    memhook_dir: Path | None = None,
    tracemalloc: int = 0,
    memhook_process: str = "worker",
) -> dict[str, str]:
    """A Python target's extra environment: ``--ingress-env KEY=VALUE`` entries (``{repo}``
    is the repository) and, with ``memhook_dir``, the ``bench/memhook`` probe in
    fleet-ingress's ``memhook_process`` (worker or supervisor)."""
    env = {}
    if memhook_dir is not None:
        env["PYTHONPATH"] = str(REPO / "bench" / "memhook")
        env["BENCH_MEMHOOK_DIR"] = str(memhook_dir)
        env["BENCH_TRACEMALLOC"] = str(tracemalloc)
        env["BENCH_MEMHOOK_PROCESS"] = memhook_process
    for item in entries:
        key, _, val = item.partition("=")
        env[key] = val.replace("{repo}", str(REPO))
    return env


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


@dataclass
class Memory:
    """A target's memory with no call and with the calls up: RSS (the process tree), RSS
    by kind of mapping, by process and smaps_rollup's counters and, when the target runs
    ``bench/memhook``, its snapshots."""

    target: Target
    rss0: int | None
    map0: dict[str, int]
    hook: Any
    by_process0: dict[str, int] = field(default_factory=dict)
    rollup0: dict[str, int] = field(default_factory=dict)
    rss1: int | None = None
    map1: dict[str, int] | None = None
    by_process1: dict[str, int] = field(default_factory=dict)
    rollup1: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    @classmethod
    async def baseline(cls, run: Run, target: Target) -> Memory:
        hook = await memhook(target, "baseline")
        return cls(
            target,
            run.rss(target),
            run.mappings(target),
            hook,
            run.rss_by_process(target),
            run.rollup(target),
        )

    async def with_calls(self, run: Run, calls: int) -> None:
        self.rss1, self.map1, self.calls = run.rss(self.target), run.mappings(self.target), calls
        self.by_process1, self.rollup1 = run.rss_by_process(self.target), run.rollup(self.target)
        self.hook = await memhook(self.target, "calls", self.hook, calls)

    def per_call_later(self, rss: int | None, calls: int) -> float | None:
        """RSS KiB a call from a later reading of the tree (the window's or the hold's end)
        over the same baseline: beside ``rss_kib_per_call``, whether the figure had settled."""
        if not (self.rss0 and rss and calls):
            return None
        return round((rss - self.rss0) / calls, 1)

    def per_call(self) -> dict[str, Any]:
        ok = self.rss0 and self.rss1 and self.calls
        split = (
            {
                "rss_kib_per_call_by_process": mapping_delta(
                    self.by_process0, self.by_process1, self.calls
                ),
                "smaps_rollup_kib_per_call": mapping_delta(self.rollup0, self.rollup1, self.calls),
                "rss_kib_by_mapping_baseline": self.map0,
                "rss_kib_by_mapping_with_calls": self.map1,
            }
            if ok and self.by_process0
            else {}
        )
        return {
            "rss_kib_per_call": round((self.rss1 - self.rss0) / self.calls, 1)  # type: ignore[operator]
            if ok
            else None,
            "rss_kib_per_call_by_mapping": mapping_delta(self.map0, self.map1 or {}, self.calls)
            if self.map0
            else None,
            **split,
            "memory_profile": self.hook,
        }


def who(target: Target) -> dict[str, Any]:
    return {"target": target.name, "label": target.label, "pid": target.pid}


def call_figures(target: Target, calls: int, recs: list[Recorder], **before: Any) -> dict[str, Any]:
    """What every scenario reports of its calls: who, how many, and the carriers' records
    merged; a call that never got to open counts as failed."""
    m = merged_record(recs)
    return {
        **who(target),
        "calls": calls,
        **before,
        **m,
        "failed": max(m["failed"], calls - m["established"]),
    }


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
