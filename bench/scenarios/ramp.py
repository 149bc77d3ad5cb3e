"""ramp: add calls in steps, a window per level, until the added p99 round trip over
direct at the same level passes the budget (one frame interval) twice running, a call
fails, a generator saturates, or ``--ramp-max``.

The decision uses the generators' live 5 % histograms; the figures reported per
level are exact, from their records.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..harness.carrier import FramePool, Recorder
from ..harness.children import log
from ..harness.generator import Generators, merged_percentile
from ..harness.run import (
    GENERATOR_SATURATED,
    SETTLE,
    Run,
    Sample,
    merged_record,
    msgs_between,
    rtts_between,
    who,
)
from ..harness.stats import diff, percentile, ratio, stagger
from ..harness.targets import Target


def why_over(proxy_cores: float, host_cores: float, nproc: int) -> str:
    """Who was saturated when a level went over budget."""
    if proxy_cores > 0.9:
        return "the proxy was saturated"
    if host_cores > 0.9 * nproc:
        return "the host was saturated"
    if host_cores > 0.7 * nproc:
        return "the host was heavily loaded"
    return "neither host nor proxy saturated"


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
    interval = FramePool.build(run.args.profile).interval
    rss0 = run.rss(target)
    groups: list[Generators] = []
    windows: list[tuple[int, Sample, Sample, int | None]] = []
    calls, stop_reason = 0, f"reached --ramp-max {maximum}"
    async with run.progress(f"ramp {target.label}", target, lambda: groups):
        while calls < maximum:
            add = start if calls == 0 else min(step, maximum - calls)
            gap = stagger(add, interval, ramp=1.0)
            t0 = time.monotonic() + 0.3
            groups.append(
                await run.generators(
                    target, calls=add, mode="stream", t0=t0, gap=gap, max_seconds=3600
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
                approx = merged_percentile(groups, a.t, b.t, 99)
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
                why = why_over(loads["proxy_cores"] or 0, host, run.nproc)
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
    levels = []
    for n, a, b, rss in windows:
        msgs = msgs_between(recs, a.t, b.t)
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
    # failed: what the carriers recorded (a ramp has no fixed number of calls to hold it to).
    return {**who(target), "levels": levels, "stop_reason": stop_reason, **merged_record(recs)}
