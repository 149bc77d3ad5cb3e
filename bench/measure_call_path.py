"""What one relayed call costs the ingress process: CPU per message, RSS per call.

Everything runs on 127.0.0.1 with TLS on both sides:

- two ``SimulatedFleet`` echo hosts in a child process (``--serve-fleets``,
  this script's own entry point), so their CPU is not the ingress's;
- the process under measure, ``--target``:
  ``ingress`` = ``python -m fleet_ingress run -c CONFIG`` (generated config),
  ``bare`` = ``bench/bare_splice.py``, the minimal uvloop TLS splice (the floor),
  ``both`` (default) = one after the other against the same fleets and load,
  plus the ratio fleet-ingress / bare splice;
- the carriers (``run_calls``) in this process, on ``--loop``.

Procedure, per target: wait until it completes a TLS handshake; read VmRSS
(baseline); start ``--calls`` calls of ``--duration`` s, ramping in over about
``RAMP`` s (start phases spread evenly over the frame interval, as real calls'
are, not bunched into one burst: see ``stagger``); ``SETTLE`` s after the last
call started, read VmRSS again (all calls established: ``(rss - baseline) /
calls`` = RSS per call) and open the steady window, closed ``TAIL`` s before
the calls end. Over the window: the target's utime+stime
(``/proc/PID/stat``) and the messages it relayed, both directions (a frame and
its echo are 2 messages), counted by the carriers as they send and receive and
estimated from the call rate (``calls * 2 * window / interval``). The whole run
is cross-checked with ``summarize()`` totals.

The generator's own CPU, the fleets', the whole host's and other processes'
are reported too, and flagged when they may distort the figures: a saturated
generator or host, or other work on the machine. Exits 1 if a call failed or
a frame was lost or corrupted. Usage::

    .venv/bin/python bench/measure_call_path.py [--calls 100] [--duration 20]
        [--profile twilio-like] [--target both] [--loop uvloop] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import math
import os
import platform
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
import uvloop

import fleet_ingress
from fleet_ingress.sim import (
    PROFILES,
    Profile,
    SimulatedFleet,
    register_profile,
    run_calls,
    summarize,
)

HOST = "127.0.0.1"
BARE_SPLICE = Path(__file__).resolve().with_name("bare_splice.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
RAMP = 2.0  # seconds over which the calls start (about: see ``stagger``)
SETTLE = 1.0  # after the ramp, before the RSS sample and the window start
TAIL = 1.0  # the window ends this long before the calls do
READY_TIMEOUT = 20.0  # for a child process to start serving
STOP_TIMEOUT = 5.0  # for a child process to exit on SIGTERM before SIGKILL
GENERATOR_SATURATED = 0.8  # of one core
OTHER_LOAD = 0.1  # cores used by processes that are not this benchmark's
TARGET_NAMES = {"ingress": "fleet-ingress", "bare": "bare-splice"}

Frame = str | bytes


# -- /proc -------------------------------------------------------------------


def _read_stat(pid: int | str) -> tuple[str, list[str]]:
    """/proc/PID/stat: comm (field 2, may hold spaces) and the fields from 3 (state) on."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (clock-tick resolution)."""
    _, fields = _read_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def others_cpu_seconds(exclude: set[int]) -> dict[str, float]:
    """CPU seconds of every other live user-space process, keyed "comm[pid]".

    Kernel threads are left out (some work for us: softirq, memory reclaim), and so is
    reaped children's time (cutime): it lands all at once, however long the child ran."""
    found: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            comm, fields = _read_stat(entry)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        if entry == "2" or fields[1] == "2":  # kthreadd and its children
            continue
        found[f"{comm}[{entry}]"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def others_busy(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each other process used between two ``others_cpu_seconds``, busiest first."""
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in used.items() if v > 0), key=lambda kv: -kv[1]))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def host_busy_seconds() -> float:
    """CPU seconds the host spent busy (all cores, idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


async def busy_cores(seconds: float) -> float:
    """How many cores the host keeps busy, over ``seconds`` (other work, before we start)."""
    before = host_busy_seconds()
    await asyncio.sleep(seconds)
    return round((host_busy_seconds() - before) / seconds, 3)


def code_version() -> dict[str, Any]:
    """Which fleet_ingress was measured: the commit, and the source as it was on disk."""
    src = Path(fleet_ingress.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes())
    git = ["git", "-C", str(src)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
    )
    return {
        "package_dir": str(src),
        "src_sha256": digest.hexdigest()[:16],
        "git_head": head.stdout.strip() or None,
        "src_uncommitted_changes": len(dirty.stdout.splitlines()),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# -- carriers that count what they relay -----------------------------------------


class FrameCounter:
    """Frames the carriers sent and received, and calls that sent a first frame."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.calls_started = 0

    def reset(self) -> None:
        self.sent = self.received = self.calls_started = 0


def counted_profile(base: Profile, counter: FrameCounter) -> Profile:
    """``base`` with every frame sent and message received counted (a few ns each)."""

    def make_frame(seq: int) -> Frame:
        counter.sent += 1
        if seq == 0:
            counter.calls_started += 1  # the upgrade went through
        return base.make_frame(seq)

    def seq_of(frame: Frame) -> int | None:
        counter.received += 1  # called once per message received
        return base.seq_of(frame)

    return register_profile(
        Profile(f"{base.name}+counted", base.interval, make_frame, seq_of, base.description)
    )


# -- TLS material and child processes ------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path  # the ingress's (and the bare splice's), for 127.0.0.1
    server_key: Path
    fleet_cert: Path
    fleet_key: Path

    @classmethod
    def at(cls, directory: Path) -> TLSFiles:
        return cls(*(directory / n for n in ("ca.pem", "srv.pem", "srv.key", "fl.pem", "fl.key")))

    @classmethod
    def write(cls, directory: Path) -> TLSFiles:
        """A throwaway CA and the two leaf certificates, as PEM files in ``directory``."""
        ca = trustme.CA()
        files = cls.at(directory)
        ca.cert_pem.write_to_path(files.ca)
        for leaf, cert, key in (
            (ca.issue_cert(HOST, "localhost"), files.server_cert, files.server_key),
            (ca.issue_cert(HOST, "localhost"), files.fleet_cert, files.fleet_key),
        ):
            for blob in leaf.cert_chain_pems:
                blob.write_to_path(cert, append=True)
            leaf.private_key_pem.write_to_path(key)
        return files

    def carrier_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def fleet_server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.fleet_cert, self.fleet_key)
        return ctx


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when this script dies, however it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The environment without FLEET_INGRESS_* overrides: the config file rules."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}


class Children:
    """Child processes, all stopped (SIGTERM, then SIGKILL) by ``stop_all``."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def spawn(self, argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent, **kw
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    async def stop(proc: asyncio.subprocess.Process) -> int:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        return await proc.wait()

    async def stop_all(self) -> None:
        for proc in self.procs:
            await self.stop(proc)


async def start_fleets(
    children: Children, tls: TLSFiles, capacity: int, loop_name: str
) -> tuple[asyncio.subprocess.Process, list[int]]:
    argv = [sys.executable, __file__, "--serve-fleets", str(tls.ca.parent)]
    argv += ["--fleet-capacity", str(capacity), "--loop", loop_name]
    proc = await children.spawn(argv, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    async with asyncio.timeout(READY_TIMEOUT):
        line = await proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the fleets process exited ({await proc.wait()}) before serving")
    return proc, list(json.loads(line)["ports"])


async def serve_fleets(tls: TLSFiles, capacity: int) -> None:
    """``--serve-fleets``: two echo fleets until SIGTERM; prints their ports first."""
    ssl_ctx = tls.fleet_server_context()
    fleets = [
        SimulatedFleet(name=name, capacity=capacity, ssl_context=ssl_ctx)
        for name in ("fleet-a", "fleet-b")
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for fleet in fleets:
        await fleet.start()
    try:
        print(json.dumps({"ports": [f.port for f in fleets]}), flush=True)
        await stop.wait()
    finally:
        for fleet in fleets:
            await fleet.stop()


def target_argv(
    target: str, tls: TLSFiles, port: int, fleet_ports: list[int], calls: int
) -> list[str]:
    if target == "bare":
        argv = [sys.executable, str(BARE_SPLICE), "--listen", f"{HOST}:{port}"]
        argv += ["--cert", str(tls.server_cert), "--key", str(tls.server_key), "--ca", str(tls.ca)]
        for p in fleet_ports:
            argv += ["--fleet", f"{HOST}:{p}"]
        return argv
    directory = tls.ca.parent
    maxconn = max(100, calls)  # never the limit: leastconn spreads the calls anyway
    fleets_file = directory / "fleets.txt"
    fleets_file.write_text(
        "".join(
            f"https://{HOST}:{p} name=fleet-{'ab'[i]} maxconn={maxconn}\n"
            for i, p in enumerate(fleet_ports)
        )
    )
    config = directory / "ingress.toml"
    q = json.dumps  # a JSON string is a valid TOML basic string
    config.write_text(
        f"""[listen]
wss = {q(f"{HOST}:{port}")}
acme = ""
stats = ""
admin_socket = ""

[tls]
cert = {q(str(tls.server_cert))}
key = {q(str(tls.server_key))}

[fleets]
file = {q(str(fleets_file))}
ca_file = {q(str(tls.ca))}

[timeouts]
drain = 2.0

[log]
level = "warning"
access = false
"""
    )
    return [sys.executable, "-m", "fleet_ingress", "run", "-c", str(config)]


async def wait_ready(
    proc: asyncio.subprocess.Process, port: int, ctx: ssl.SSLContext, log: Path
) -> None:
    """Until the target completes a TLS handshake on ``port`` (bounded in time and tries)."""
    deadline = time.monotonic() + READY_TIMEOUT
    for _ in range(int(READY_TIMEOUT / 0.1)):
        if proc.returncode is not None or time.monotonic() > deadline:
            break
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
            writer.close()
            await writer.wait_closed()
            return
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
    raise RuntimeError(f"target on port {port} not serving (exit {proc.returncode}):\n{_tail(log)}")


def _tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


# -- one measurement -------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic
    target_cpu: float
    fleets_cpu: float
    own_cpu: float
    host_busy: float
    target_syscalls: int
    others_cpu: dict[str, float]
    sent: int
    received: int

    @classmethod
    def take(cls, pid: int, fleets_pid: int, counter: FrameCounter) -> Sample:
        return cls(
            time.monotonic(),
            cpu_seconds(pid),
            cpu_seconds(fleets_pid),
            time.process_time(),
            host_busy_seconds(),
            io_syscalls(pid),
            others_cpu_seconds({pid, fleets_pid, os.getpid()}),
            counter.sent,
            counter.received,
        )


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


def io_syscalls(pid: int) -> int:
    """Read and write system calls a process made (/proc/PID/io syscr + syscw)."""
    counts = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(counts["syscr"]) + int(counts["syscw"])


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or not b else round(a / b, digits)


async def measure(
    name: str,
    pid: int,
    fleets_pid: int,
    url: str,
    carrier_ssl: ssl.SSLContext,
    profile: Profile,
    counter: FrameCounter,
    calls: int,
    duration: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gap = stagger(calls, profile.interval)
    ramp = gap * (calls - 1)  # when the last call starts
    counter.reset()
    rss_baseline = rss_kib(pid)
    first = Sample.take(pid, fleets_pid, counter)
    t0 = loop.time()
    run = loop.create_task(
        run_calls(
            url,
            calls,
            ssl_context=carrier_ssl,
            profile=profile.name,
            duration=duration,
            stagger=gap,
        )
    )

    async def at(offset: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - loop.time()))

    try:
        await at(ramp + SETTLE)
        rss_with_calls = rss_kib(pid)
        established = counter.calls_started
        start = Sample.take(pid, fleets_pid, counter)
        await at(duration - TAIL)
        end = Sample.take(pid, fleets_pid, counter)
        async with asyncio.timeout(duration + RAMP + 30.0):
            results = await run
    finally:
        run.cancel()
    await asyncio.sleep(1.0)  # let the closes land
    last = Sample.take(pid, fleets_pid, counter)
    rss_after = rss_kib(pid)

    s = summarize(results)
    window = end.t - start.t
    cpu = end.target_cpu - start.target_cpu
    counted = (end.sent - start.sent) + (end.received - start.received)
    estimated = calls * 2 * window / profile.interval
    run_msgs = s["frames_sent"] + s["frames_received"]
    run_cpu = last.target_cpu - first.target_cpu
    others = others_busy(start.others_cpu, end.others_cpu)
    return {
        "target": name,
        "pid": pid,
        "calls": calls,
        "ok": s["ok"],
        "failed": s["failed"],
        "errors": s["errors"],
        "fleets": s["fleets"],
        "established_at_rss_sample": established,
        "frames_sent": s["frames_sent"],
        "frames_received": s["frames_received"],
        "lost_frames": s["lost_frames"],
        "corrupt_frames": s["corrupt_frames"],
        "handshake_ms_p50": s["handshake_ms_p50"],
        "handshake_ms_p99": s["handshake_ms_p99"],
        "rtt_ms_p50": s["rtt_ms_p50"],
        "rtt_ms_p99": s["rtt_ms_p99"],
        "window_s": round(window, 3),
        "cpu_s_window": round(cpu, 3),
        "cpu_share_of_one_core": _ratio(cpu, window),
        "msgs_window_counted": counted,
        "msgs_window_estimated": round(estimated),
        "cpu_s_per_1000_msgs": _ratio(cpu * 1000, counted, 5),
        "cpu_s_per_1000_msgs_rate_estimate": _ratio(cpu * 1000, estimated, 5),
        "syscalls_per_msg": _ratio(end.target_syscalls - start.target_syscalls, counted),
        "msgs_run_summarize": run_msgs,
        "msgs_run_expected": calls * 2 * max(1, round(duration / profile.interval)),
        "cpu_s_run": round(run_cpu, 3),
        "cpu_s_per_1000_msgs_run": _ratio(run_cpu * 1000, run_msgs, 5),
        "rss_kib_baseline": rss_baseline,
        "rss_kib_with_calls": rss_with_calls,
        "rss_kib_per_call": round((rss_with_calls - rss_baseline) / calls, 1),
        "rss_kib_after_calls": rss_after,
        "generator_cpu_share": _ratio(end.own_cpu - start.own_cpu, window),
        "fleets_cpu_share": _ratio(end.fleets_cpu - start.fleets_cpu, window),
        "host_busy_cores": _ratio(end.host_busy - start.host_busy, window),
        # Processes that are none of the three above: other work on the host.
        "other_procs_cores": _ratio(sum(others.values()), window),
        "other_procs_busiest": {k: _ratio(v, window) for k, v in list(others.items())[:3]},
    }


def anomalies(r: dict[str, Any], nproc: int) -> list[str]:
    name, out = r["target"], []
    if r["failed"]:
        out.append(f"{name}: {r['failed']} calls failed: {r['errors']}")
    if r["established_at_rss_sample"] < r["calls"]:
        out.append(
            f"{name}: only {r['established_at_rss_sample']}/{r['calls']} calls established "
            "at the RSS sample"
        )
    if r["lost_frames"] or r["corrupt_frames"]:
        out.append(f"{name}: {r['lost_frames']} frames lost, {r['corrupt_frames']} corrupt")
    if (r["generator_cpu_share"] or 0) > GENERATOR_SATURATED:
        out.append(
            f"{name}: generator used {r['generator_cpu_share']:.2f} of a core "
            f"(> {GENERATOR_SATURATED}): it may be the bottleneck"
        )
    if (r["host_busy_cores"] or 0) > 0.9 * nproc:
        out.append(f"{name}: host busy {r['host_busy_cores']:.2f}/{nproc} cores: saturated")
    if (r["other_procs_cores"] or 0) > OTHER_LOAD:
        out.append(
            f"{name}: other processes used {r['other_procs_cores']:.2f} cores on the host "
            f"during the window ({r['other_procs_busiest']}): figures disturbed"
        )
    gap = _ratio(r["msgs_window_counted"], r["msgs_window_estimated"])
    if gap is not None and abs(gap - 1) > 0.02:
        out.append(f"{name}: window messages counted/estimated = {gap} (frames sent late?)")
    if r.get("exit_code"):
        out.append(f"{name}: exited {r['exit_code']} on SIGTERM")
    if r.get("log_lines"):
        out.append(f"{name}: {r['log_lines']} lines on stderr, first: {r['log_first']!r}")
    return out


async def run_target(
    target: str,
    children: Children,
    tls: TLSFiles,
    fleets: tuple[asyncio.subprocess.Process, list[int]],
    profile: Profile,
    counter: FrameCounter,
    args: argparse.Namespace,
) -> dict[str, Any]:
    fleets_proc, fleet_ports = fleets
    port = free_port()
    log = tls.ca.parent / f"{target}.stderr"
    with log.open("wb") as err:
        proc = await children.spawn(
            target_argv(target, tls, port, fleet_ports, args.calls),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            env=clean_env(),
        )
    try:
        await wait_ready(proc, port, tls.carrier_context(), log)
        await asyncio.sleep(0.5)  # the ready probe's connection is gone
        result = await measure(
            TARGET_NAMES[target],
            proc.pid,
            fleets_proc.pid,
            f"wss://{HOST}:{port}",
            tls.carrier_context(),
            profile,
            counter,
            args.calls,
            args.duration,
        )
    finally:
        exit_code = await Children.stop(proc)
    lines = log.read_text(errors="replace").splitlines()
    result.update(exit_code=exit_code, log_lines=len(lines), log_first=lines[0] if lines else None)
    if lines:
        result["log_tail"] = lines[-20:]
    return result


def human(r: dict[str, Any], nproc: int) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    return "\n".join(
        [
            f"{r['target']} (pid {r['pid']}): calls ok/failed {r['ok']}/{r['failed']}, "
            f"lost frames {r['lost_frames']}, corrupt {r['corrupt_frames']}",
            f"  CPU  {r['cpu_s_per_1000_msgs']} s per 1000 msgs over a {r['window_s']:.1f} s "
            f"window ({r['msgs_window_counted']} msgs counted, {r['msgs_window_estimated']} "
            f"estimated -> {r['cpu_s_per_1000_msgs_rate_estimate']}); "
            f"{r['cpu_share_of_one_core']} of a core",
            f"       whole run {r['cpu_s_per_1000_msgs_run']} s per 1000 msgs "
            f"({r['msgs_run_summarize']}/{r['msgs_run_expected']} msgs, handshakes included)",
            f"  RSS  baseline {r['rss_kib_baseline']} KiB, with calls {r['rss_kib_with_calls']} "
            f"KiB -> {r['rss_kib_per_call']} KiB per call "
            f"({r['established_at_rss_sample']} established); after {r['rss_kib_after_calls']} KiB",
            f"  RTT  p50 {ms(r['rtt_ms_p50'])}, p99 {ms(r['rtt_ms_p99'])}; "
            f"handshake p50 {ms(r['handshake_ms_p50'])}, p99 {ms(r['handshake_ms_p99'])}",
            f"  load generator {r['generator_cpu_share']} of a core, fleets "
            f"{r['fleets_cpu_share']}, host busy {r['host_busy_cores']}/{nproc} cores "
            f"(other processes {r['other_procs_cores']})",
        ]
    )


async def bench(args: argparse.Namespace, code: dict[str, Any]) -> dict[str, Any]:
    this = asyncio.current_task()
    assert this is not None
    # SIGTERM cancels the run, so the children are stopped and the temp dir removed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    nproc = os.cpu_count() or 1
    targets = ["ingress", "bare"] if args.target == "both" else [args.target]
    counter = FrameCounter()
    profile = counted_profile(PROFILES[args.profile], counter)
    interval = profile.interval
    report: dict[str, Any] = {
        "machine": {
            "nproc": nproc,
            "cpu_model": cpu_model(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "busy_cores_before_start": await busy_cores(1.0),
        },
        "code": code,
        "params": {
            "calls": args.calls,
            "duration_s": args.duration,
            "profile": args.profile,
            "frame_interval_ms": interval * 1000,
            "stagger_ms": round(stagger(args.calls, interval) * 1000, 3),
            "window_s": [
                round(stagger(args.calls, interval) * (args.calls - 1) + SETTLE, 3),
                args.duration - TAIL,
            ],
            "generator_loop": args.loop,
            "tls": "both sides",
        },
        "targets": {},
    }
    children = Children()
    with tempfile.TemporaryDirectory(prefix="measure-call-path-") as tmp:
        tls = TLSFiles.write(Path(tmp))
        try:
            fleets = await start_fleets(children, tls, max(200, 2 * args.calls), args.loop)
            for target in targets:
                result = await run_target(target, children, tls, fleets, profile, counter, args)
                report["targets"][target] = result
                print(human(result, nproc), flush=True)
        finally:
            await children.stop_all()
    found = report["targets"]
    if "ingress" in found and "bare" in found:
        report["ratio_ingress_over_bare"] = {
            key: _ratio(found["ingress"][key], found["bare"][key], 2)
            for key in ("cpu_s_per_1000_msgs", "rss_kib_per_call")
        }
        print(f"ratio fleet-ingress / bare splice: {report['ratio_ingress_over_bare']}")
    report["warnings"] = [w for r in found.values() for w in anomalies(r, nproc)]
    before = report["machine"]["busy_cores_before_start"]
    if before > OTHER_LOAD:
        report["warnings"].insert(0, f"host already {before} cores busy before the start")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    return report


def _run(loop_name: str, main: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(main) if loop_name == "uvloop" else asyncio.run(main)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CPU per 1000 relayed messages and RSS per call of the ingress process."
    )
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds each call streams (default 20)"
    )
    parser.add_argument("--profile", default="twilio-like", choices=sorted(PROFILES))
    parser.add_argument(
        "--target",
        default="both",
        choices=["ingress", "bare", "both"],
        help="process measured: fleet-ingress, bench/bare_splice.py, or both (default)",
    )
    parser.add_argument(
        "--loop",
        default="uvloop",
        choices=["uvloop", "asyncio"],
        help="event loop of the carriers and fleets (the targets always run uvloop)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON report here")
    parser.add_argument("--serve-fleets", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fleet-capacity", type=int, default=200, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    if args.duration < RAMP + SETTLE + TAIL + 2:
        parser.error(f"--duration must be at least {RAMP + SETTLE + TAIL + 2:g} s")
    return args


def main() -> int:
    args = parse_args()
    if args.serve_fleets is not None:
        _run(args.loop, serve_fleets(TLSFiles.at(args.serve_fleets), args.fleet_capacity))
        return 0
    try:
        report = _run(args.loop, bench(args, code_version()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: child processes stopped", file=sys.stderr)
        return 130
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    clean = all(
        not r["failed"] and not r["lost_frames"] and not r["corrupt_frames"]
        for r in report["targets"].values()
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
