"""``python -m bench hostile``: live calls streaming while a flood of hostile connections hits
the same proxy, side by side with HAProxy.

For each target (fleet-ingress, HAProxy; each a fresh process, the same two
simulated fleets): ``--calls`` calls stream 20 ms frames; their round trip is
measured over a quiet window of ``--seconds``, then over a window of the same
length while one generator process (:mod:`bench.harness.flood`) floods the proxy with
worst-case heads (4,000 tiny header lines, 100 lines of the largest size that
fits 16 KiB, one 16 KiB line, a 20 KiB head), slowloris connections and
handshake garbage, as fast as it can. Reported: live-call RTT p50/p99/max with
and without the flood, the set-up time of new calls made one at a time (every
0.25 s through the flood window, and for 3 s before the quiet one: what a
carrier dialling in during the flood waits, against no flood), the flood's
rate and the answers it got, the proxy's CPU, and for fleet-ingress its own
event-loop lag histogram (scraped from /metrics, the stats listener turned on
through the environment).

Target (issue #12): live-call p99 within 5 ms of the quiet window.

Target ``ingress@unpaced`` is fleet-ingress with accept pacing off
(``limits.new_connection_share = 1.0``), ``ingress@share0.3`` with that share,
to measure what pacing does in the same run; fleet-ingress's seconds of paused
accepts are reported per window.

    python -m bench hostile --calls 20 --seconds 10
    python -m bench hostile --targets ingress,ingress@unpaced,haproxy
    python -m bench.hostile --calls 20 --seconds 10 --targets ingress,haproxy

Writes results.json and results.md to ``--out`` (default bench/results/hostile-TIME/).
Kept in its own module on purpose: it reuses :class:`bench.scenarios.Run` (fleets,
targets, generators, /proc sampling) and changes nothing they do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from fleet_ingress.sim import PROFILES

from ..harness import procfs
from ..harness.carrier import FramePool, Recorder, open_call
from ..harness.children import HOST, REPO, free_port, log, python_module
from ..harness.run import SETTLE, Run, merged_record, rtts_between
from ..harness.stats import percentile, stagger
from ..harness.targets import haproxy_version, label

TARGET_P99_MARGIN_MS = 5.0
LAG_METRIC = "fleet_ingress_event_loop_lag_seconds"
PAUSED_METRIC = "fleet_ingress_accepts_paused_seconds"
TARGETS = ("ingress", "ingress@unpaced", "haproxy")  # and ingress@share<0-1>
SHARE_ENV = "FLEET_INGRESS_LIMITS__NEW_CONNECTION_SHARE"


def target_env(name: str) -> dict[str, str]:
    """``ingress@unpaced``: pacing off; ``ingress@share0.3``: that share of a core."""
    variant = name.partition("@")[2]
    if variant == "unpaced":
        return {SHARE_ENV: "1.0"}
    if variant.startswith("share"):
        return {SHARE_ENV: variant.removeprefix("share")}
    return {}


def known_target(name: str) -> bool:
    if name in TARGETS:
        return True
    share = name.removeprefix("ingress@share")
    try:
        return share != name and 0 < float(share) <= 1
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench hostile", description=__doc__)
    p.add_argument(
        "--targets",
        default="ingress,haproxy",
        help=f"of {', '.join(TARGETS)}, ingress@share0.3 (in order)",
    )
    p.add_argument("--calls", type=int, default=20, help="live calls streaming")
    p.add_argument("--seconds", type=float, default=10.0, help="each window (quiet, flood)")
    p.add_argument("--profile", default="twilio-like", choices=sorted(PROFILES))
    p.add_argument("--route", default="/ws/")
    p.add_argument("--concurrency", type=int, default=8, help="flood: head connections at once")
    p.add_argument("--slowloris", type=int, default=100, help="flood: slowloris connections")
    p.add_argument("--garbage", type=int, default=2, help="flood: garbage connections at once")
    p.add_argument("--pin", action="store_true", help="as for the other scenarios")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in args.targets:
        if not known_target(t):
            p.error(
                f"target {t!r}: the flood is aimed at a proxy "
                f"({', '.join(TARGETS)}, ingress@share<0-1>)"
            )
    if not 1 <= args.calls <= 2000 or not 1 <= args.seconds <= 300:
        p.error("1-2000 calls and 1-300 s windows")
    # What bench.scenarios.Run reads from the other scenarios' arguments.
    args.fleet_capacity = max(64, args.calls + 16)
    args.haproxy_nbthread, args.haproxy_option = 1, []
    args.generators, args.calls_per_generator = 1, 250
    return args


async def loop_lag(stats: tuple[str, int] | None) -> dict[str, float] | None:
    """fleet-ingress's event-loop lag histogram now: {le: cumulative count}, and under
    "paused" its seconds of paused accepts."""
    if stats is None:
        return None
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{stats[0]}:{stats[1]}/metrics") as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == LAG_METRIC:
            found |= {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
        elif family.name == PAUSED_METRIC:
            found["paused"] = family.samples[0].value
    return found if "+Inf" in found else None


PROBE_EVERY = 0.25  # s between two new calls that measure set-up during a window
PROBE_TIMEOUT = 10.0
QUIET_PROBING = 3.0  # s of new calls before the quiet window (not in it)


async def new_call_probes(run: Run, url: tuple[str, int], route: str, seconds: float) -> Any:
    """New calls, one at a time, every PROBE_EVERY for `seconds`: the time from connect
    to the fleet's 101 (what a carrier dialling in meanwhile waits), ms."""
    pool = FramePool.build("binary")
    ctx = run.tls.carrier_context()
    setups: list[float] = []
    failed = 0
    end = time.monotonic() + seconds
    for n in range(int(seconds / PROBE_EVERY) + 1):
        if time.monotonic() >= end:
            break
        started = time.monotonic()
        call = await open_call(Recorder(), pool, url, f"{route}probe-{n}", ctx, 0, PROBE_TIMEOUT)
        if call is None:
            failed += 1
        else:
            setups.append((time.monotonic() - started) * 1000)
            await call.finish(0.5, 2.0)
        await asyncio.sleep(max(0.0, started + PROBE_EVERY - time.monotonic()))
    return {
        "calls": len(setups) + failed,
        "failed": failed,
        "setup_ms_p50": percentile(setups, 50),
        "setup_ms_max": round(max(setups), 1) if setups else None,
    }


def lag_window(before: dict[str, float] | None, after: dict[str, float] | None) -> Any:
    """Probes in the window and how many were late by more than each bucket bound."""
    if before is None or after is None:
        return None
    paused = round(after.pop("paused", 0.0) - before.pop("paused", 0.0), 3)
    total = after["+Inf"] - before["+Inf"]
    late = {
        f"over_{le}_s": int(total - (after[le] - before.get(le, 0.0)))
        for le in after
        if le != "+Inf"
    }
    # The smallest bound 99 % of the probes were within: an upper bound on the p99.
    p99 = next(
        (le for le in after if le != "+Inf" and after[le] - before[le] >= 0.99 * total), "+Inf"
    )
    return {"probes": int(total), "p99_at_most_s": p99, **late, "accepts_paused_s": paused}


async def one_target(run: Run, name: str, args: argparse.Namespace) -> dict[str, Any]:
    stats = (HOST, free_port()) if name.startswith("ingress") else None
    env = {"FLEET_INGRESS_LISTEN__STATS": f"{stats[0]}:{stats[1]}"} if stats else {}
    env |= target_env(name)
    async with run.target(name, env=env) as target:
        interval = PROFILES[args.profile].interval
        gap = stagger(args.calls, interval, 1.0)
        ramp = gap * (args.calls - 1)
        t0 = time.monotonic() + 0.5
        gens = await run.generators(
            target,
            calls=args.calls,
            mode="stream",
            t0=t0,
            gap=gap,
            max_seconds=ramp + SETTLE + 2 * args.seconds + 60,
            workers=1,
        )
        windows: dict[str, Any] = {}
        async with run.progress(f"hostile {target.label}", target, lambda: [gens]):
            await asyncio.sleep(max(0.0, t0 + ramp + SETTLE - time.monotonic()))
            url = target.urls[0]
            # The quiet set-up time, before the quiet window: a new call's set-up
            # holds the loop too, and the quiet RTT is the yardstick of the flood's.
            probes_quiet = await new_call_probes(run, url, args.route, QUIET_PROBING)
            lag0 = await loop_lag(stats)
            a = run.sample(target, [gens])
            await asyncio.sleep(args.seconds)
            b = run.sample(target, [gens])
            lag1 = await loop_lag(stats)
            log(f"hostile {target.label}: quiet window done; flooding for {args.seconds:g} s")
            flood = await run.children.spawn(
                python_module(
                    "bench.harness.flood",
                    "--url",
                    f"{url[0]}:{url[1]}",
                    "--seconds",
                    str(args.seconds + 2.0),
                    "--concurrency",
                    str(args.concurrency),
                    "--slowloris",
                    str(args.slowloris),
                    "--garbage",
                    str(args.garbage),
                ),
                stdout=asyncio.subprocess.PIPE,
                cpus=run.load_cpus,
            )
            await asyncio.sleep(1.0)  # the flood's connections up
            lag2 = await loop_lag(stats)
            c = run.sample(target, [gens])
            probes_flood = await new_call_probes(run, url, args.route, args.seconds)
            await asyncio.sleep(max(0.0, c.t + args.seconds - time.monotonic()))
            d = run.sample(target, [gens])
            lag3 = await loop_lag(stats)
            async with asyncio.timeout(args.seconds + 30):
                out, _ = await flood.communicate()
            recs = await gens.stop(timeout=30)
        for window, (start, end, lag, probes) in {
            "quiet": (a, b, lag_window(lag0, lag1), probes_quiet),
            "flood": (c, d, lag_window(lag2, lag3), probes_flood),
        }.items():
            rtts = rtts_between(recs, start.t, end.t)
            windows[window] = {
                "frames_echoed": len(rtts),
                "rtt_ms_p50": percentile(rtts, 50),
                "rtt_ms_p99": percentile(rtts, 99),
                "rtt_ms_max": round(max(rtts), 3) if rtts else None,
                "event_loop_lag": lag,
                "new_calls": probes,
                "loads": run.loads(start, end),
            }
        try:
            flood_result = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            flood_result = {"error": f"flood exited {flood.returncode} without a result"}
    m = merged_record(recs)
    quiet, flooded = windows["quiet"]["rtt_ms_p99"], windows["flood"]["rtt_ms_p99"]
    added = None if quiet is None or flooded is None else round(flooded - quiet, 3)
    return {
        "target": name,
        "label": label(name),
        "calls": args.calls,
        "established": m["established"],
        "failed": max(m["failed"], args.calls - m["established"]),
        "lost_frames": m["lost_frames"],
        "corrupt_frames": m["corrupt_frames"],
        "errors": m["errors"],
        "windows": windows,
        "p99_added_by_flood_ms": added,
        "within_target": added is not None and added <= TARGET_P99_MARGIN_MS,
        "flood": flood_result,
    }


def _new_calls(probes: dict[str, Any] | None) -> str:
    if not probes:
        return "-"
    return f"{probes['setup_ms_p50']} / {probes['setup_ms_max']} ({probes['failed']})"


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# hostile: {rep['params']['calls']} live calls, {rep['params']['seconds']:g} s "
        "quiet then flooded",
        "",
        f"`{rep['command']}`, {rep['when']}. Machine: {rep['machine'].get('cpu_model', '?')}, "
        f"{rep['machine'].get('nproc', '?')} CPUs, shared with other work "
        f"({rep['busy_cores_before_start']} cores busy before start): figures are noisy.",
        "",
        "| target | window | RTT p50 ms | RTT p99 ms | RTT max ms | proxy cores | host busy "
        "| loop lag p99 <= s | probes > 5 ms late | accepts paused s "
        "| new calls: set-up p50 / max ms (failed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["results"]:
        for window, w in r["windows"].items():
            lag = w["event_loop_lag"] or {}
            lines.append(
                f"| {r['label']} | {window} | {w['rtt_ms_p50']} | {w['rtt_ms_p99']} | "
                f"{w['rtt_ms_max']} | {w['loads']['proxy_cores']} | "
                f"{w['loads']['host_busy_cores']} | {lag.get('p99_at_most_s', '-')} | "
                f"{lag.get('over_0.005_s', '-')} | {lag.get('accepts_paused_s', '-')} | "
                f"{_new_calls(w.get('new_calls'))} |"
            )
    lines += ["", "| target | p99 added by the flood | within 5 ms | calls failed | frames lost "
              "| flood heads/s | flood answers | slowloris opened | garbage conns/s |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rep["results"]:
        f = r["flood"]
        answers = "; ".join(
            f"{kind}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
            for kind, counts in sorted(f.get("statuses", {}).items())
        )
        lines.append(
            f"| {r['label']} | {r['p99_added_by_flood_ms']} ms | "
            f"{'yes' if r['within_target'] else 'NO'} | {r['failed']} | {r['lost_frames']} | "
            f"{f.get('heads_per_s')} | {answers} | {f.get('slowloris_opened')} | "
            f"{f.get('garbage_per_s')} |"
        )
    return "\n".join(lines) + "\n"


async def run_all(args: argparse.Namespace, out: Path, argv: list[str]) -> dict[str, Any]:
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    before = procfs.host_busy_seconds()
    await asyncio.sleep(1.0)
    rep: dict[str, Any] = {
        "scenario": "hostile",
        "command": "python -m bench hostile " + shlex.join(argv),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {**procfs.machine(), "haproxy": haproxy_version() or "no haproxy"},
        "busy_cores_before_start": round(procfs.host_busy_seconds() - before, 3),
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="fleet-ingress-hostile-") as tmp:
        run = Run(args, Path(tmp), out)
        try:
            await run.start_fleets()
            for name in args.targets:
                log(f"hostile via {label(name)}")
                rep["results"].append(await one_target(run, name, args))
                (out / "results.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        finally:
            await run.close()
    return rep


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = args.out or REPO / "bench" / "results" / f"hostile-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    log(f"hostile: writing to {out}")
    try:
        rep = uvloop.run(run_all(args, out, argv))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: every child process stopped")
        return 130
    (out / "results.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(rep))
    print(markdown(rep))
    bad = any(r["failed"] or r["lost_frames"] or r["corrupt_frames"] for r in rep["results"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
