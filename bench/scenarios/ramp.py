"""ramp: add calls in steps, a window per level, until the added p99 round trip over
direct at the same level passes the budget (one frame interval) twice running, a call
fails, a generator saturates, or ``--ramp-max``; with ``--ramp-fine``, the first level
over is dropped and the edge climbed again by the fine step
(:mod:`bench.harness.ramp_steps`), so each target reports its own limit.

The decision uses the generators' live 5 % histograms; the figures reported per
level are exact, from their records.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..harness import load_side
from ..harness.carrier import FramePool, Recorder
from ..harness.children import log
from ..harness.generator import Generators, merged_percentile
from ..harness.ramp_steps import Drop, RampSteps, Stop, interpolate
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

RECOVER = 3.0  # s after a batch over budget hung up, before the ramp climbs again


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
    fine: int = 0,
    max_seconds: float = 3600.0,
) -> dict[str, Any]:
    """Levels of ``target`` as :class:`~bench.harness.ramp_steps.RampSteps` says, each held
    ``hold`` s; a level is over when its p99 less direct's at the same calls (direct's
    levels interpolated between) passes ``budget_ms``. ``budget_ms`` None (direct itself):
    a level over its own p99 of one budget ends the ramp (the load side's own limit: no
    target can be judged past it). At most ``max_seconds`` of levels."""
    interval = FramePool.build(run.args.profile).interval
    rss0 = run.rss(target)
    groups: list[Generators] = []
    dropped: list[Recorder] = []
    windows: list[tuple[int, Sample, Sample, int | None, dict[str, Any]]] = []
    steps = RampSteps(start, step, fine, maximum)
    calls, add = 0, steps.first()
    stop_reason = f"reached --ramp-max {maximum}"
    own_budget = interval * 1000  # direct's own: one frame interval
    began = time.monotonic()
    async with run.progress(f"ramp {target.label}", target, lambda: groups):
        while True:
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
                base = interpolate(direct_p99, calls)
                added = diff(approx, base) if base is not None else None
                loads = run.loads(a, b)
                log(
                    f"ramp {target.label}: {calls} calls (window {attempt}), p99 ~{approx} ms "
                    f"(added ~{added} ms), proxy {loads['proxy_cores']} cores, host "
                    f"{loads['host_busy_cores']}, failed {failed}"
                )
                if budget_ms is None:
                    over = approx is not None and approx > own_budget
                else:
                    over = added is not None and added > budget_ms
                first_host = max(first_host, loads["host_busy_cores"] or 0)
                if not over or failed:
                    break
            windows.append(
                (calls, a, b, rss, {"direct_p99_ms": base, "over_budget": over, "window": attempt})
            )
            if failed:
                stop_reason = f"{failed} calls failed at {calls} calls"
                break
            if budget_ms is not None and base is None:
                stop_reason = (
                    f"past direct's last level at {calls} calls: not judged (direct stopped "
                    "at the load side's own limit or the cap)"
                )
                break
            if over:
                host = max(loads["host_busy_cores"] or 0, first_host)
                why = why_over(loads["proxy_cores"] or 0, host, run.nproc)
                if budget_ms is None:
                    stop_reason = (
                        f"direct's own p99 ~{approx} ms > {own_budget:g} ms at {calls} calls in "
                        f"two windows running: the load side's own limit ({why}: host up to "
                        f"{host}/{run.nproc} cores busy)"
                    )
                    break
                stop_reason = (
                    f"added p99 ~{added} ms > {budget_ms:g} ms at {calls} calls in two "
                    f"windows running ({why}: host up to {host}/{run.nproc} cores busy, proxy "
                    f"{loads['proxy_cores']})"
                )
            action = steps.judge(in_budget=not over)
            if (loads["generator_max_process_cores"] or 0) > GENERATOR_SATURATED:
                stop_reason = f"a generator process saturated at {calls} calls"
                break
            if isinstance(action, Stop):
                if action.reason == "edge":
                    stop_reason = (
                        f"in budget at {steps.limit} calls, over at {steps.first_over}: "
                        f"limit judged at a step of {steps.resolution}"
                    )
                break
            if time.monotonic() - began > max_seconds:
                stop_reason = f"time limit ({max_seconds:g} s of levels) at {calls} calls"
                break
            if isinstance(action, Drop):
                # Back to the last level in budget: its batch of calls hung up, a pause to
                # drain what the overload queued, then up again by the fine step.
                dropped += await groups.pop().stop(timeout=30)
                calls -= action.calls
                log(f"ramp {target.label}: back to {calls} calls, then up by {action.then}")
                await asyncio.sleep(RECOVER)
                add = action.then
            else:
                add = action.calls
        recs: list[Recorder] = list(dropped)
        for g in groups:
            recs += await g.stop(timeout=60)
    levels = []
    for n, a, b, rss, judged in windows:
        msgs = msgs_between(recs, a.t, b.t)
        rtts = rtts_between(recs, a.t, b.t)
        loads = run.loads(a, b)
        p99 = percentile(rtts, 99)
        level = {
            "calls": n,
            "rtt_ms_p50": percentile(rtts, 50),
            "rtt_ms_p99": p99,
            "msgs": msgs,
            "msgs_expected": round(n * 2 * loads["window_s"] / interval),
            "cpu_s_per_1000_msgs": ratio(loads["proxy_cpu_s"] * 1000, msgs, 5)
            if target.pid
            else None,
            "rss_kib_per_call": round((rss - rss0) / n, 1) if rss and rss0 else None,
            "loads": loads,
            **judged,
            "added_p99_ms": diff(p99, judged["direct_p99_ms"]),
        }
        for side in load_side.SIDES:
            level[f"{side}_us_per_msg"] = load_side.us_per_msg(level, side, work="msgs")
        levels.append(level)
    # failed: what the carriers recorded (a ramp has no fixed number of calls to hold it to).
    return {
        **who(target),
        "levels": levels,
        "stop_reason": stop_reason,
        "limit": steps.limit if budget_ms is not None else None,
        "first_over": steps.first_over if budget_ms is not None else None,
        "resolution": steps.resolution if budget_ms is not None else None,
        **merged_record(recs),
    }
