"""One load-generator process: ``python -m bench.worker ...`` (started by the orchestrator).

It opens its share of the calls at the times it is given, streams frames with
:mod:`bench.carrier`, prints a JSON progress line to stdout every half second,
and on ``stop`` (a line on stdin), on stdin closing, or after ``--max-seconds``
finishes every call (waits for the echoes, closes with 1000), writes what it
recorded to ``--out`` (pickle) and prints ``{"done": ...}``.

Modes: ``stream`` (calls stream until stopped), ``idle`` (``--idle-frames``
frames, then silent until stopped), ``churn`` (each call streams
``--call-seconds`` then hangs up; the process ends after its last call).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import pickle
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import uvloop

from .carrier import FramePool, LeanCall, Recorder, open_call
from .children import stop_on_request

HIST_FLOOR = 0.01  # ms
HIST_BASE = 1.05
ECHO_WAIT = 2.0
CLOSE_WAIT = 3.0


def rtt_histogram(values: Iterable[float]) -> dict[int, int]:
    """Round trips in buckets 5 % wide (bucket b holds up to ``hist_upper(b)`` ms)."""
    hist: dict[int, int] = {}
    for v in values:
        b = max(0, math.ceil(math.log(max(v, HIST_FLOOR) / HIST_FLOOR, HIST_BASE)))
        hist[b] = hist.get(b, 0) + 1
    return hist


def hist_upper(bucket: int) -> float:
    return HIST_FLOOR * HIST_BASE**bucket


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stdin_task = stop_on_request(stop)
    ssl_ctx = None
    if args.ca:
        ssl_ctx = ssl.create_default_context(cafile=args.ca)
        ssl_ctx.set_alpn_protocols(["http/1.1"])
    pool = FramePool.build(args.profile, seed=args.first)
    interval = pool.interval
    rec = Recorder()
    calls: list[LeanCall] = []
    finishing: list[asyncio.Task[None]] = []
    offset = loop.time() - time.monotonic()  # monotonic -> loop time
    deadline = time.monotonic() + args.max_seconds

    async def one(j: int) -> None:
        index = args.first + j * args.step
        start = args.t0 + index * args.gap
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        if stop.is_set():
            return
        url = args.url[index % len(args.url)]
        call = await open_call(
            rec, pool, url, f"{args.route}bench-{index}", ssl_ctx, offset=index * 7
        )
        if call is None:
            return
        calls.append(call)
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

    openers = [loop.create_task(one(j)) for j in range(args.calls)]
    all_opened = asyncio.gather(*openers)

    async def progress() -> None:
        seen = 0
        while True:
            rtts = rec.rtt_ms[seen:]
            seen += len(rtts)
            print(
                json.dumps(
                    {
                        "t": time.monotonic(),
                        "established": rec.established,
                        "failed": rec.failed,
                        "finished": rec.finished,
                        "sent": len(rec.sent_t),
                        "recv": len(rec.recv_t),
                        "cpu": time.process_time(),
                        "rtt_hist": rtt_histogram(rtts),
                    }
                ),
                flush=True,
            )
            await asyncio.sleep(0.5)

    progress_task = loop.create_task(progress())

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
        for call in calls:
            call.stop_streaming()  # every call stops at the same moment
        finishing = [loop.create_task(c.finish(ECHO_WAIT, CLOSE_WAIT)) for c in calls]
        if finishing:
            await asyncio.wait(finishing, timeout=ECHO_WAIT + CLOSE_WAIT + 5)
        progress_task.cancel()
        stdin_task.cancel()
    return {
        "calls": args.calls,
        "cpu_s": time.process_time(),
        "recorder": rec,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", type=_address, action="append", required=True)
    p.add_argument("--ca", help="CA file: TLS to the target (else plain TCP)")
    p.add_argument("--profile", default="twilio-like")
    p.add_argument("--route", default="/ws/")
    p.add_argument("--mode", choices=["stream", "idle", "churn"], default="stream")
    p.add_argument("--calls", type=int, required=True, help="calls of this process")
    p.add_argument("--first", type=int, default=0, help="global index of its first call")
    p.add_argument("--step", type=int, default=1, help="global index step between its calls")
    p.add_argument("--t0", type=float, required=True, help="time.monotonic() of call index 0")
    p.add_argument("--gap", type=float, required=True, help="seconds between call indexes")
    p.add_argument("--idle-frames", type=int, default=1)
    p.add_argument("--call-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, required=True, help="hard bound on the run")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    result = uvloop.run(run(args))
    with args.out.open("wb") as f:
        pickle.dump(result, f)
    rec: Recorder = result["recorder"]
    print(json.dumps({"done": True, "established": rec.established, "failed": rec.failed}))


if __name__ == "__main__":
    main()
