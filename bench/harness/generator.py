"""One load-generator process: ``python -m bench.harness.generator ...`` (started by
:meth:`bench.harness.run.Run.generators`).

It opens its share of the calls (global indexes ``--first``, ``--first + --step``,
...; index ``i`` starts at ``--t0 + i x --gap``), streams frames with
:mod:`bench.harness.carrier`, prints a JSON progress line to stdout every half
second, and on ``stop`` (a line on stdin), stdin closing, SIGTERM or after
``--max-seconds`` finishes every call (waits for the echoes, closes with 1000)
and prints a last progress line with ``"done": true``.

Modes:

- ``stream``: calls stream until stopped;
- ``idle``: ``--idle-frames`` frames each, then silent until stopped;
- ``churn``: each call streams ``--call-seconds`` then hangs up; the process
  ends after its last call;
- ``slots``: every call slot is kept busy until stopped: a call streams for a
  random length in ``--call-seconds`` +- ``--call-spread``, waits for its
  echoes, closes, and the slot opens the next call at once (the soak).

The first three write what the carriers recorded (every frame's timestamps)
to ``--out`` (pickle) at the end, for exact figures over a window. ``slots``
runs for minutes to hours, so it keeps no per-frame array: each progress line
carries the round trips and handshakes since the last one as 5 % histograms
(:func:`bench.harness.stats.histogram`) and the arrays are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import pickle
import random
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from .carrier import FramePool, LeanCall, Recorder, open_call
from .children import log, stop_generators, stop_on_request
from .stats import Histogram, hist_percentile, histogram, merge

ECHO_WAIT = 2.0  # at a call's end, for its last echoes; what is still missing is lost
CLOSE_WAIT = 3.0  # for the close handshake, then abort
OPEN_TIMEOUT = 10.0  # TCP + TLS + upgrade
FAIL_BACKOFF = 0.5  # a slot whose call failed to open waits this long before the next
REPORT_EVERY = 0.5  # progress lines
MIN_CALL_SECONDS = 0.5
MODES = ("stream", "idle", "churn", "slots")


def call_bounds(mean: float, spread: float) -> tuple[float, float]:
    """Shortest and longest call: ``mean`` +- ``spread`` x ``mean`` (uniform between)."""
    return max(MIN_CALL_SECONDS, mean * (1 - spread)), mean * (1 + spread)


@dataclass
class Progress:
    """The progress lines of one process, from its :class:`Recorder`.

    With ``keep`` the per-frame arrays stay (written to ``--out`` at the end) and a
    line's histograms cover what came since the previous line; without, they are
    folded into counts and dropped, so a long run holds no per-frame arrays."""

    rec: Recorder
    keep: bool
    live: set[LeanCall] = field(default_factory=set)
    attempts: int = 0
    sent: int = 0  # folded and dropped
    recv: int = 0
    seen_rtt: int = 0  # kept and already reported
    seen_hs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # the mode's own counts
    last: dict[str, Any] = field(default_factory=dict)  # on the last line only

    def line(self, done: bool = False) -> dict[str, Any]:
        rec = self.rec
        rtt = histogram(rec.rtt_ms[self.seen_rtt :])
        hs = histogram(rec.handshake_ms[self.seen_hs :])
        if self.keep:
            self.seen_rtt, self.seen_hs = len(rec.rtt_ms), len(rec.handshake_ms)
        else:
            self.sent += len(rec.sent_t)
            self.recv += len(rec.recv_t)
            del rec.sent_t[:], rec.recv_t[:], rec.rtt_ms[:]
            rec.handshake_ms.clear()
            rec.handshake_t.clear()
        return {
            "t": time.monotonic(),
            "done": done,
            "active": len(self.live),
            "attempts": self.attempts,
            "established": rec.established,
            "failed": rec.failed,
            "finished": rec.finished,
            "lost": rec.lost,
            "corrupt": rec.corrupt,
            "unexpected": rec.unexpected,
            "sent": self.sent + len(rec.sent_t),
            "recv": self.recv + len(rec.recv_t),
            "errors": dict(rec.errors),
            "statuses": dict(rec.statuses),
            "fleets": dict(rec.fleets),
            **self.extra,
            "cpu": time.process_time(),
            "rtt_hist": rtt,
            "hs_hist": hs,
        }

    async def report(self) -> None:
        while True:
            print(json.dumps(self.line()), flush=True)
            await asyncio.sleep(REPORT_EVERY)


def client_context(ca: str | None) -> ssl.SSLContext | None:
    if not ca:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def timed(args: argparse.Namespace, prog: Progress, stop: asyncio.Event) -> None:
    """``stream``, ``idle`` and ``churn``: one call per index, at its start time."""
    loop = asyncio.get_running_loop()
    ssl_ctx = client_context(args.ca)
    pool = FramePool.build(args.profile, seed=args.first if args.seed is None else args.seed)
    interval = pool.interval
    rec = prog.rec
    offset = loop.time() - time.monotonic()  # monotonic -> loop time
    deadline = time.monotonic() + args.max_seconds

    async def one(j: int) -> None:
        index = args.first + j * args.step
        start = args.t0 + index * args.gap
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        if stop.is_set():
            return
        url = args.url[index % len(args.url)]
        prog.attempts += 1
        call = await open_call(
            rec, pool, url, f"{args.route}bench-{index}", ssl_ctx, offset=index * 7
        )
        if call is None:
            return
        prog.live.add(call)
        # First frame on the call's own phase (its scheduled start), not the handshake's end.
        now = time.monotonic()
        first = start + math.ceil(max(0.0, now - start) / interval) * interval
        if args.mode == "stream":
            call.stream(first + offset, math.inf)
        elif args.mode == "idle":
            call.stream(first + offset, first + offset + (args.idle_frames - 0.5) * interval)
        else:  # churn: a short call, then hang up
            call.stream(first + offset, first + offset + args.call_seconds)
            await asyncio.sleep(max(0.0, first + args.call_seconds - time.monotonic()))
            await call.finish(ECHO_WAIT, CLOSE_WAIT)
            prog.live.discard(call)

    openers = [loop.create_task(one(j)) for j in range(args.calls)]
    all_opened = asyncio.gather(*openers)
    try:
        waiter = loop.create_task(stop.wait())
        ends = {waiter} | ({all_opened} if args.mode == "churn" else set())
        await asyncio.wait(
            ends, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED"
        )
        waiter.cancel()
    finally:
        for task in openers:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await all_opened
        calls = list(prog.live)
        for call in calls:
            call.stop_streaming()  # every call stops at the same moment
        finishing = [loop.create_task(c.finish(ECHO_WAIT, CLOSE_WAIT)) for c in calls]
        if finishing:
            await asyncio.wait(finishing, timeout=ECHO_WAIT + CLOSE_WAIT + 5)
        prog.live.clear()


async def slots(args: argparse.Namespace, prog: Progress, stop: asyncio.Event) -> None:
    """Keep ``args.calls`` call slots busy until stopped; each slot replaces its call as
    soon as it has closed."""
    loop = asyncio.get_running_loop()
    stop_task = loop.create_task(stop.wait())
    ctx = client_context(args.ca)
    seed = args.first if args.seed is None else args.seed
    pool = FramePool.build(args.profile, seed=seed)
    rng = random.Random(seed)
    rec, live = prog.rec, prog.live
    lo, hi = call_bounds(args.call_seconds, args.call_spread)
    deadline = time.monotonic() + args.max_seconds
    # Bounded in count as well as time: a slot cannot open more calls than this.
    max_per_slot = math.ceil(args.max_seconds / min(lo, FAIL_BACKOFF)) + 2
    longest = 0.0

    async def stopped_within(seconds: float) -> bool:
        await asyncio.wait({stop_task}, timeout=max(0.0, seconds))
        return stop.is_set()

    async def slot(j: int) -> None:
        nonlocal longest
        index = args.first + j * args.step
        if await stopped_within(args.t0 + index * args.gap - time.monotonic()):
            return
        first = True
        for n in range(max_per_slot):
            if stop.is_set() or time.monotonic() >= deadline:
                return
            prog.attempts += 1
            call = await open_call(
                rec,
                pool,
                args.url[(index + n) % len(args.url)],
                f"{args.route}soak-{index}-{n}",
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
                longest = max(longest, length)
                prog.extra["longest_call_s"] = round(longest, 2)
                now = loop.time()
                call.stream(now, now + length)
                await asyncio.wait(
                    {stop_task, call.closed}, timeout=length, return_when=asyncio.FIRST_COMPLETED
                )
                await call.finish(ECHO_WAIT, CLOSE_WAIT)
            finally:
                live.discard(call)

    prog.extra.update(longest_call_s=0.0, cut=0, cut_states=[])
    tasks = [loop.create_task(slot(j)) for j in range(args.calls)]
    try:
        await asyncio.wait({stop_task}, timeout=max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
        stopped_at = time.monotonic()
        # Every call stops streaming now, waits for its echoes and closes.
        _, pending = await asyncio.wait(tasks, timeout=OPEN_TIMEOUT + ECHO_WAIT + CLOSE_WAIT + 5)
        for task in pending:
            task.cancel()
        prog.extra["cut"] = len(live)  # calls that had not finished closing in time
        prog.extra["cut_states"] = [
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
        stop_task.cancel()
        prog.last["stop_s"] = round(time.monotonic() - stopped_at, 2)


async def run(args: argparse.Namespace) -> Progress:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stdin_task = stop_on_request(stop)
    prog = Progress(Recorder(), keep=args.mode != "slots")
    reporter = loop.create_task(prog.report())
    try:
        await (slots if args.mode == "slots" else timed)(args, prog, stop)
    finally:
        reporter.cancel()
        stdin_task.cancel()
    return prog


# -- in the orchestrator: the processes and what their progress lines say -----------


@dataclass
class Generators:
    """Generator processes of one batch of calls, with the latest progress line of each
    and the histograms every line brought, by the time it was written."""

    procs: list[asyncio.subprocess.Process]
    outs: list[Path | None]
    latest: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    rtt: list[tuple[float, Histogram]] = field(default_factory=list)
    hs: list[tuple[float, Histogram]] = field(default_factory=list)
    rtt_all: Histogram = field(default_factory=dict)  # over the whole run, never pruned
    hs_all: Histogram = field(default_factory=dict)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    def start_reading(self) -> None:
        loop = asyncio.get_running_loop()
        self.readers = [loop.create_task(self._read(p)) for p in self.procs]

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.read_line(proc.pid, json.loads(line))

    def read_line(self, pid: int, msg: dict[str, Any]) -> None:
        """One progress line of process ``pid``."""
        for key, timed, total in (
            ("rtt_hist", self.rtt, self.rtt_all),
            ("hs_hist", self.hs, self.hs_all),
        ):
            hist = {int(b): n for b, n in msg.pop(key, {}).items()}
            if hist:
                timed.append((msg["t"], hist))
                for b, n in hist.items():
                    total[b] = total.get(b, 0) + n
        self.latest[pid] = msg
        if msg.get("done"):
            self.done[pid] = msg

    def total(self, key: str) -> int:
        return sum(int(m.get(key, 0)) for m in self.latest.values())

    def merged(self, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.latest.values():
            for k, v in m.get(key, {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def rtt_percentile(self, start: float, end: float, p: float) -> float | None:
        """Approximate (5 %) round-trip percentile of echoes reported in (start, end]."""
        return hist_percentile(merge(h for t, h in self.rtt if start < t <= end), p)

    def hs_percentile(self, start: float, end: float, p: float) -> float | None:
        return hist_percentile(merge(h for t, h in self.hs if start < t <= end), p)

    def take_hists(self) -> tuple[Histogram, Histogram]:
        """Round trips and handshakes of every line read since the last take (a soak's
        samples); what is taken is dropped, so a long run holds only the totals."""
        rtt, hs = merge(h for _, h in self.rtt), merge(h for _, h in self.hs)
        self.rtt, self.hs = [], []
        return rtt, hs

    async def stop(self, timeout: float) -> list[Recorder]:
        """Ask every process to finish its calls (stop them after ``timeout``), read their
        last lines, and return what each wrote to its ``--out``."""
        if not await stop_generators(self.procs, timeout):
            log("a generator did not finish in time: stopped")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*self.readers, return_exceptions=True)
        for reader in self.readers:
            reader.cancel()
        recs = []
        for out in self.outs:
            if out is None:
                continue
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


def merged_percentile(groups: list[Generators], start: float, end: float, p: float) -> float | None:
    """Round-trip percentile over several batches (a ramp's levels), from their histograms."""
    return hist_percentile(merge(h for g in groups for t, h in g.rtt if start < t <= end), p)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", type=_address, action="append", required=True)
    p.add_argument("--ca", help="CA file: TLS to the target (else plain TCP)")
    p.add_argument("--profile", default="twilio-like")
    p.add_argument("--route", default="/ws/")
    p.add_argument("--mode", choices=MODES, default="stream")
    p.add_argument("--calls", type=int, required=True, help="calls (slots) of this process")
    p.add_argument("--first", type=int, default=0, help="global index of its first call")
    p.add_argument("--step", type=int, default=1, help="global index step between its calls")
    p.add_argument("--t0", type=float, required=True, help="time.monotonic() of call index 0")
    p.add_argument("--gap", type=float, required=True, help="seconds between call indexes")
    p.add_argument("--seed", type=int, help="frame pool and call lengths (default --first)")
    p.add_argument("--idle-frames", type=int, default=1)
    p.add_argument("--call-seconds", type=float, default=1.0, help="churn; slots: the mean")
    p.add_argument("--call-spread", type=float, default=0.0, help="slots: lengths mean x (1 +-)")
    p.add_argument("--max-seconds", type=float, required=True, help="hard bound on the run")
    p.add_argument("--out", type=Path, help="where the recorder goes (not with slots)")
    args = p.parse_args(argv)
    if args.mode != "slots" and args.out is None:
        p.error(f"--mode {args.mode} writes its records: --out is required")
    return args


def main() -> None:
    args = parse_args()
    prog = uvloop.run(run(args))
    if args.out is not None:
        with args.out.open("wb") as f:
            pickle.dump(
                {"calls": args.calls, "cpu_s": time.process_time(), "recorder": prog.rec}, f
            )
    print(json.dumps(prog.line(done=True) | prog.last), flush=True)


if __name__ == "__main__":
    main()
