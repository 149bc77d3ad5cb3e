"""steady: ``calls`` calls streaming together for a ``seconds`` window.

The calls start over ``ramp_s`` at evenly spread frame phases
(:func:`bench.harness.stats.stagger`), settle, then the window opens: proxy
CPU per relayed message, RSS per call, round trips, and optionally py-spy or
perf on the proxy during the window.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..harness import profile
from ..harness.carrier import FramePool
from ..harness.run import (
    RAMP,
    SETTLE,
    Memory,
    Run,
    call_figures,
    msgs_between,
    rtts_between,
)
from ..harness.stats import percentile, ratio, stagger
from ..harness.targets import Target


async def steady(
    run: Run, target: Target, calls: int, seconds: float, ramp_s: float = RAMP
) -> dict[str, Any]:
    interval = FramePool.build(run.args.profile).interval
    gap = stagger(calls, interval, ramp_s)
    ramp = gap * (calls - 1)
    mem = await Memory.baseline(run, target)
    t0 = time.monotonic() + 0.5
    gens = await run.generators(
        target, calls=calls, mode="stream", t0=t0, gap=gap, max_seconds=ramp + SETTLE + seconds + 60
    )
    first = run.sample(target, [gens])
    async with run.progress(f"steady {target.label}", target, lambda: [gens]):
        await asyncio.sleep(max(0.0, t0 + ramp + SETTLE - time.monotonic()))
        established = gens.total("established")
        await mem.with_calls(run, established)
        a = run.sample(target, [gens])
        loop = asyncio.get_running_loop()
        spy = perf = None
        if run.args.py_spy and target.pid and target.kind in ("ingress", "bare"):
            run.gen_seq += 1
            out = run.out / f"py-spy-{target.name}-{run.gen_seq}.txt"
            spy = loop.create_task(profile.record(run.children, target.pid, seconds - 1, out))
        if run.args.perf and target.pid:
            run.gen_seq += 1
            out = run.out / f"perf-{target.name.replace('@', '-')}-{run.gen_seq}.data"
            perf = loop.create_task(profile.perf_record(run.children, target.pid, seconds - 1, out))
        await asyncio.sleep(max(0.0, a.t + seconds - time.monotonic()))
        b = run.sample(target, [gens])
        rss_end, established_end = run.rss(target), gens.total("established")
        spy_path = await spy if spy is not None else None
        perf_path = await perf if perf is not None else None
        recs = await gens.stop(timeout=30)
    await asyncio.sleep(1.0)  # let the closes land
    last = run.sample(target, [gens])
    rss_after = run.rss(target)
    msgs = msgs_between(recs, a.t, b.t)
    rtts = rtts_between(recs, a.t, b.t)
    loads = run.loads(a, b)
    proxy = target.pid is not None
    figures = call_figures(target, calls, recs)
    run_msgs = figures["frames_sent"] + figures["frames_echoed"]
    return {
        **figures,
        "established_at_window": established,
        "msgs_window": msgs,
        "msgs_window_expected": round(calls * 2 * loads["window_s"] / interval),
        "rtt_ms_p50": percentile(rtts, 50),
        "rtt_ms_p99": percentile(rtts, 99),
        "rtt_ms_max": round(max(rtts), 3) if rtts else None,
        "cpu_s_per_1000_msgs": ratio(loads["proxy_cpu_s"] * 1000, msgs, 5) if proxy else None,
        "cpu_s_per_1000_msgs_run": ratio((last.target_cpu - first.target_cpu) * 1000, run_msgs, 5)
        if proxy
        else None,
        "syscalls_per_msg": ratio(loads["proxy_syscalls"], msgs) if proxy else None,
        # Wake-ups of the proxy per relayed message: below 1, a wake serves several.
        "sleeps_per_msg": ratio(loads["proxy_sleeps"], msgs) if proxy else None,
        "rss_kib_baseline": mem.rss0,
        "rss_kib_with_calls": mem.rss1,
        "rss_kib_end_of_window": rss_end,
        "established_at_window_end": established_end,
        "rss_kib_per_call_end_of_window": mem.per_call_later(rss_end, established_end),
        "rss_kib_after": rss_after,
        **mem.per_call(),
        "py_spy": {"file": spy_path.name, **profile.summarize(spy_path)} if spy_path else None,
        "perf": {"file": perf_path.name, **(await profile.perf_summary(perf_path))}
        if perf_path
        else None,
        "loads": loads,
    }
