"""idle: ``calls`` calls that each send ``--idle-frames`` frames (echoed), then hold
silent for ``hold`` seconds: memory per held call, and what holding costs in CPU."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..harness.carrier import FramePool
from ..harness.run import RAMP, SETTLE, Memory, Run, call_figures
from ..harness.stats import ratio
from ..harness.targets import Target


async def idle(run: Run, target: Target, calls: int, hold: float) -> dict[str, Any]:
    interval = FramePool.build(run.args.profile).interval
    frames = run.args.idle_frames
    spread = max(RAMP, calls / run.args.connect_rate)
    gap = spread / calls
    mem = await Memory.baseline(run, target)
    t0 = time.monotonic() + 0.5
    gens = await run.generators(
        target,
        calls=calls,
        mode="idle",
        t0=t0,
        gap=gap,
        max_seconds=spread + hold + 60,
        extra=["--idle-frames", str(frames)],
    )
    async with run.progress(f"idle {target.label}", target, lambda: [gens]):
        await asyncio.sleep(max(0.0, t0 + spread - time.monotonic()))
        # Until every call is up and has had its echo (bounded).
        for _ in range(100):
            up = gens.total("established")
            if up + gens.total("failed") >= calls and gens.total("recv") >= up * frames:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(SETTLE + frames * interval)
        established = gens.total("established")
        a = run.sample(target, [gens])
        await mem.with_calls(run, established)
        await asyncio.sleep(max(0.0, a.t + hold - time.monotonic()))
        b = run.sample(target, [gens])
        rss_end, established_end = run.rss(target), gens.total("established")
        recs = await gens.stop(timeout=60)
    loads = run.loads(a, b)
    return {
        **call_figures(target, calls, recs),
        "established_at_sample": established,
        "rss_kib_baseline": mem.rss0,
        "rss_kib_with_calls": mem.rss1,
        "rss_kib_end_of_hold": rss_end,
        "rss_kib_per_call_end_of_hold": mem.per_call_later(rss_end, established_end),
        **mem.per_call(),
        "idle_cpu_ms_per_call_minute": ratio(
            loads["proxy_cpu_s"] * 1000 * 60, established * loads["window_s"]
        )
        if target.pid and established
        else None,
        "loads": loads,
    }
