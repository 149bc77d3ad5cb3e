"""churn: new calls at ``rate`` a second for ``seconds``, each streaming ``call_s`` then
hanging up: what setting up a call costs the proxy (CPU per call, handshake)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..harness import profile
from ..harness.children import log
from ..harness.run import Run, call_figures, msgs_between, rtts_between
from ..harness.stats import count_between, percentile, ratio
from ..harness.targets import Target


async def churn(
    run: Run, target: Target, rate: float, seconds: float, call_s: float
) -> dict[str, Any]:
    calls = max(1, round(rate * seconds))
    rss0 = run.rss(target)
    t0 = time.monotonic() + 0.5
    gens = await run.generators(
        target,
        calls=calls,
        mode="churn",
        t0=t0,
        gap=1.0 / rate,
        max_seconds=seconds + call_s + 60,
        workers=run.workers(round(rate * call_s) or 1),  # by the calls up at once
        extra=["--call-seconds", str(call_s)],
    )
    first = run.sample(target, [gens])
    async with run.progress(f"churn {target.label}", target, lambda: [gens]):
        # Window: from when as many calls end as start, to the last start.
        await asyncio.sleep(max(0.0, t0 + call_s + 1.0 - time.monotonic()))
        a = run.sample(target, [gens])
        perf = strace = None
        if run.args.strace and target.pid:
            run.gen_seq += 1
            out = run.out / f"strace-{target.name.replace('@', '-')}-{run.gen_seq}.txt"
            window = t0 + seconds - time.monotonic()
            strace = asyncio.get_running_loop().create_task(
                profile.strace_record(
                    run.children,
                    target.kind,
                    target.pid,
                    window,
                    out,
                    full=run.args.strace == "full",
                    tracepoints=run.args.strace == "tracepoints",
                )
            )
        elif run.args.perf and target.pid:
            run.gen_seq += 1
            out = run.out / f"perf-{target.name.replace('@', '-')}-{run.gen_seq}.data"
            window = t0 + seconds - time.monotonic()
            perf = asyncio.get_running_loop().create_task(
                profile.perf_record(run.children, target.pid, window - 1, out)
            )
        await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
        b = run.sample(target, [gens])
        perf_path = await perf if perf is not None else None
        strace_files = await strace if strace is not None else None
        rss1 = run.rss(target)
        try:
            await gens.wait_all_done(call_s + 30)
        except TimeoutError:
            log("churn generators still running: stopping them")
        recs = await gens.stop(timeout=30)
    last = run.sample(target, [gens])
    loads = run.loads(a, b)
    # A handshake's end stands for the call's start.
    started = sum(count_between(sorted(r.handshake_t), a.t, b.t) for r in recs)
    msgs = msgs_between(recs, a.t, b.t)
    rtts = rtts_between(recs, a.t, b.t)
    proxy = target.pid is not None
    return {
        **call_figures(
            target,
            calls,
            recs,
            rate_per_s=rate,
            call_seconds=call_s,
            concurrent_calls=round(rate * call_s, 1),
        ),
        "calls_started_window": started,
        "msgs_window": msgs,
        "rtt_ms_p50": percentile(rtts, 50),
        "rtt_ms_p99": percentile(rtts, 99),
        "cpu_ms_per_call": ratio(loads["proxy_cpu_s"] * 1000, started) if proxy else None,
        "cpu_s_per_1000_msgs": ratio(loads["proxy_cpu_s"] * 1000, msgs, 5) if proxy else None,
        "cpu_s_run": round(last.target_cpu - first.target_cpu, 3) if proxy else None,
        "rss_kib_baseline": rss0,
        "rss_kib_end": rss1,
        "perf": {"file": perf_path.name, **(await profile.perf_summary(perf_path))}
        if perf_path
        else None,
        "strace": profile.strace_summary(strace_files, started)
        if strace_files and run.args.strace in ("count", "tracepoints")
        else {"files": {k: v.name for k, v in strace_files.items()}}
        if strace_files
        else None,
        "loads": loads,
    }
