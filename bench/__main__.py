"""``python -m bench SCENARIO``: simulated carriers against fleets on loopback, three ways.

Each round runs the scenario directly against the fleets, through
fleet-ingress (``python -m fleet_ingress run -c CONFIG``) and through HAProxy
(``haproxy -db -f CONFIG``, nbthread 1), both rendered from the same settings
(:mod:`bench.harness.targets`), TLS on both sides; the targets' order rotates each
round (:func:`round_order`). Writes ``results.json``,
``results.md`` and ``results.png`` to ``--out`` and progress lines to stderr.

    python -m bench steady --calls 100 --seconds 20 --profile twilio-like --repeat 2
    python -m bench ramp --ramp-start 250 --ramp-step 50 --ramp-fine 10 --ramp-max 650 --hold 8
    python -m bench idle --calls 1000 --hold 5
    python -m bench churn --rate 20 --seconds 20 --call-seconds 1
    python -m bench hostile --calls 20 --seconds 10      (bench/scenarios/hostile.py)

See bench/README.md for what each figure means and the figures measured.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from fleet_ingress.sim import PROFILES

from . import scenarios
from .harness import procfs, report
from .harness.children import REPO, log
from .harness.run import OTHER_LOAD, Run, target_env, warnings_for
from .harness.targets import TARGETS, base, builtin_variant, haproxy_version, label
from .harness.versions import code_version


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--targets",
        default="direct,ingress,haproxy",
        help="comma-separated, run in this order each round: direct, ingress, haproxy, bare "
        "(bench/bare_splice.py), bare-bio (bench/bare_bio_splice.py), lean "
        "(bench/lean_call_splice.py); default "
        "direct,ingress,haproxy. Built-in variants: ingress@wN (N worker processes), "
        "haproxy@ntN (nbthread N), e.g. ingress@w1,ingress@w2,haproxy@nt1,haproxy@nt2",
    )
    common.add_argument("--profile", default="twilio-like", choices=sorted(PROFILES))
    common.add_argument(
        "--route", help="call route prefix (default /exotel/ for exotel, else /ws/)"
    )
    common.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds (targets interleaved, order rotated each round)",
    )
    common.add_argument(
        "--generators",
        type=int,
        default=0,
        help="generator processes (0: one per --calls-per-generator calls)",
    )
    common.add_argument("--calls-per-generator", type=int, default=250)
    common.add_argument(
        "--pin",
        action="store_true",
        help="pin the proxy to the last CPU and everything else (generators, fleets, this "
        "process) to the others",
    )
    common.add_argument("--fleet-capacity", type=int, help="per fleet = maxconn per fleet")
    common.add_argument("--haproxy-nbthread", type=int, default=1)
    common.add_argument(
        "--ingress-workers",
        type=workers_option,
        default=1,
        help='fleet-ingress\'s [process] workers: N or "auto" (default 1, beside nbthread 1)',
    )
    common.add_argument(
        "--haproxy-option",
        action="append",
        default=[],
        metavar="LINE",
        help="a line added to HAProxy's defaults section (experiments, e.g. "
        "'option http-no-delay'); the design's configuration has none",
    )
    common.add_argument(
        "--ingress-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the fleet-ingress (and bare splice) process, e.g. the "
        "bench/memhook probe; {repo} stands for the repository",
    )
    common.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="environment of the target variant TARGET@NAME (repeat for more keys), e.g. "
        "--variant mmap128:GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 "
        "--targets ingress,ingress@mmap128,haproxy",
    )
    common.add_argument(
        "--memhook",
        action="store_true",
        help="profile the Python targets' memory per call from inside (bench/memhook): "
        "mallinfo2, RSS by mapping, objects by type; disturbs latency and CPU figures",
    )
    common.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="with --memhook: tracemalloc from the baseline on, FRAMES deep",
    )
    common.add_argument(
        "--memhook-process",
        choices=["worker", "supervisor"],
        default="worker",
        help="with --memhook: which of fleet-ingress's processes to profile",
    )
    common.add_argument("--out", type=Path, help="output directory (default bench/results/...)")
    common.add_argument("--title", help="a line saying what this run is for")

    p = sub.add_parser("steady", parents=[common], help="N calls streaming for S seconds")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="profile fleet-ingress (and the bare splice) with py-spy --native during the "
        "window: disturbs that run's CPU and latency figures",
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="perf record (cpu-clock) every proxy during the window: share of CPU per "
        "library (libcrypto, libpython, uvloop, kernel, haproxy) and per symbol",
    )
    p.add_argument(
        "--ramp-seconds", type=float, default=2.0, help="over which the calls start (default 2)"
    )

    p = sub.add_parser("ramp", parents=[common], help="add calls until added p99 > a frame")
    p.add_argument("--ramp-start", type=int, default=50)
    p.add_argument("--ramp-step", type=int, default=50)
    p.add_argument("--ramp-max", type=int, default=400)
    p.add_argument("--hold", type=float, default=6.0, help="window per level (s)")
    p.add_argument("--budget-ms", type=float, help="added p99 budget (default: frame interval)")
    p.add_argument(
        "--ramp-fine",
        type=int,
        default=10,
        help="after the first level over budget, back to the last level in budget and up by "
        "this many calls at a time to the edge (default 10; 0: stop at the first level over)",
    )
    p.add_argument(
        "--ramp-target-seconds",
        type=float,
        default=140.0,
        help="at most this long of levels per target and round (default 140: from 250 by 50, "
        "over at 500 and fine 10, hold 8 takes about 125 s; with it 2 rounds of direct, "
        "fleet-ingress and HAProxy stay under 15 minutes)",
    )

    p = sub.add_parser("idle", parents=[common], help="many held calls: memory per call")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--hold", type=float, default=5.0)
    p.add_argument("--idle-frames", type=int, default=1, help="frames each call sends first")
    p.add_argument("--connect-rate", type=float, default=200.0, help="new calls per second")

    p = sub.add_parser("churn", parents=[common], help="short calls at a fixed rate")
    p.add_argument("--rate", type=float, default=20.0, help="new calls per second")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--call-seconds", type=float, default=1.0)
    p.add_argument(
        "--perf",
        action="store_true",
        help="perf record (cpu-clock) every proxy during the window: share of CPU per "
        "library and per symbol, per call set-up",
    )
    p.add_argument(
        "--strace",
        choices=("count", "full", "tracepoints"),
        help="system calls of every process of each proxy during the window (instead of "
        "--perf): count, strace -f -c, per call by name and process; full, strace -f -tt "
        "-yy, every call with its time and descriptors (a short run at a low rate; "
        "python -m bench.strace_stages splits it by stage); tracepoints, perf stat of the "
        "kernel's syscalls:sys_enter_* (counts without stopping the proxy). strace slows "
        "the traced proxy: its CPU and latency figures do not hold",
    )

    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        args.variants = parse_variants(args.variant)
        check_targets(args.targets, args.variants)
    except ValueError as exc:
        parser.error(str(exc))
    if args.route is None:
        args.route = "/exotel/" if args.profile == "exotel" else "/ws/"
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.scenario == "churn" and args.seconds <= args.call_seconds + 1:
        # The window opens when as many calls end as start (call_seconds + 1 s in).
        parser.error(
            f"churn --seconds {args.seconds:g}: no window (it opens at --call-seconds + 1 = "
            f"{args.call_seconds + 1:g} s); give --seconds at least {args.call_seconds + 3:g}"
        )
    peak = {
        "steady": lambda: args.calls,
        "idle": lambda: args.calls,
        "ramp": lambda: args.ramp_max,
        "churn": lambda: round(args.rate * args.call_seconds) + 1,
    }[args.scenario]()
    if peak < 1:
        parser.error("at least one call")
    if args.fleet_capacity is None:
        # Never the limit: each fleet could take every call (leastconn spreads them anyway).
        args.fleet_capacity = max(64, peak + 16)
    args.peak_calls = peak
    args.connect_rate = getattr(args, "connect_rate", 200.0)
    args.idle_frames = getattr(args, "idle_frames", 1)
    args.py_spy = getattr(args, "py_spy", False)
    args.perf = getattr(args, "perf", False)
    args.strace = getattr(args, "strace", None)
    return args


def workers_option(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f'{text!r}: write "auto" or a whole number of at least 1')


def parse_variants(specs: list[str]) -> dict[str, dict[str, str]]:
    """``--variant NAME:KEY=VALUE`` options -> {NAME: {KEY: VALUE}} (``{repo}`` is the
    repository); ValueError naming a malformed one."""
    variants: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, assignment = spec.partition(":")
        key, eq, val = assignment.partition("=")
        if not name or not key or not eq:
            raise ValueError(f"--variant {spec!r}: write NAME:KEY=VALUE")
        variants.setdefault(name, {})[key] = val.replace("{repo}", str(REPO))
    return variants


def check_targets(targets: list[str], variants: dict[str, dict[str, str]]) -> None:
    """Every target known, every ``TARGET@NAME`` built in (ingress@wN, haproxy@ntN) or
    given an environment by ``--variant NAME:...``, none twice; ValueError saying which."""
    if len(set(targets)) != len(targets):
        raise ValueError(f"a target is named twice in {','.join(targets)}")
    for t in targets:
        if base(t) not in TARGETS:
            raise ValueError(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
        variant = t.partition("@")[2]
        if "@" in t and builtin_variant(t) is None and variant not in variants:
            raise ValueError(
                f"target {t!r}: no --variant {variant}:KEY=VALUE given (built in: "
                "ingress@wN for N workers, haproxy@ntN for nbthread N)"
            )


def machine() -> dict[str, Any]:
    return {**procfs.machine(), "haproxy": haproxy_version() or "no haproxy"}


def params(args: argparse.Namespace) -> dict[str, Any]:
    keep = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "title", "ingress_env", "argv") and not callable(v)
    }
    keep["frame_interval_ms"] = PROFILES[args.profile].interval * 1000
    keep["ingress_env"] = args.ingress_env
    keep["tls"] = "both sides"
    return keep


async def run_scenario(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    interval = PROFILES[args.profile].interval
    budget = getattr(args, "budget_ms", None) or interval * 1000
    rep: dict[str, Any] = {
        "scenario": args.scenario,
        "title": args.title or default_title(args),
        "command": "python -m bench " + shlex.join(args.argv),
        "machine": machine(),
        "code": code_version(),
        "params": params(args) | ({"budget_ms": budget} if args.scenario == "ramp" else {}),
        "rounds": [],
        "round_orders": [],
        "warnings": [],
    }
    rep["machine"]["busy_cores_before_start"] = await busy_cores(1.0)
    with tempfile.TemporaryDirectory(prefix="fleet-ingress-bench-") as tmp:
        run = Run(args, Path(tmp), out)
        rep["settings"] = run.settings.as_dict()
        try:
            await run.start_fleets()
            for rnd in range(args.repeat):
                results: dict[str, Any] = {}
                direct_p99: dict[int, float] = {}
                order = round_order(args.targets, rnd, args.scenario)
                rep["round_orders"].append(order)
                for name in order:
                    log(f"round {rnd + 1}/{args.repeat}: {args.scenario} via {label(name)}")
                    hook_dir = run.dir / f"memhook-{name}-{rnd + 1}" if args.memhook else None
                    env = (
                        target_env(
                            args.ingress_env, hook_dir, args.tracemalloc, args.memhook_process
                        )
                        if base(name) in ("ingress", "bare")
                        else {}
                    )
                    env.update(args.variants.get(name.partition("@")[2], {}))
                    async with run.target(name, env=env) as target:
                        r = await one(args, run, target, budget, direct_p99)
                    r["notes"] = target.notes
                    if target.config is not None:
                        (out / f"{name.replace('@', '-')}{target.config.suffix}").write_text(
                            target.config.read_text()
                        )
                    if base(name) == "direct" and args.scenario == "ramp":
                        # Not a level where direct itself was over (the load side's limit).
                        direct_p99 = {
                            lv["calls"]: lv["rtt_ms_p99"]
                            for lv in r["levels"]
                            if lv["rtt_ms_p99"] is not None and not lv.get("over_budget")
                        }
                    results[name] = r
                    gen_cpus = len(run.load_cpus) if run.load_cpus else run.nproc
                    rep["warnings"] += [
                        f"round {rnd + 1}: {w}"
                        for w in warnings_for(label(name), r, run.nproc, gen_cpus)
                    ]
                    rep["warnings"] += [f"round {rnd + 1}: {label(name)}: {n}" for n in r["notes"]]
                rep["rounds"].append(results)
                # Write what we have after each round: a long run interrupted keeps its rounds.
                finish(rep, out, partial=rnd + 1 < args.repeat)
        finally:
            await run.close()
    if rep["machine"]["busy_cores_before_start"] > OTHER_LOAD:
        rep["warnings"].insert(
            0, f"host already {rep['machine']['busy_cores_before_start']} cores busy before start"
        )
    return rep


def round_order(targets: list[str], rnd: int, scenario: str) -> list[str]:
    """The targets in the order round ``rnd`` (from 0) runs them: the order given, rotated
    by one each round, so that no target always runs first (on the host's warm-up) or
    always after the same one. A ramp keeps direct first: the others are judged against
    its round trip at each level as they run."""
    fixed = [t for t in targets if scenario == "ramp" and base(t) == "direct"]
    rest = [t for t in targets if t not in fixed]
    shift = rnd % len(rest) if rest else 0
    return fixed + rest[shift:] + rest[:shift]


def default_title(args: argparse.Namespace) -> str:
    if args.scenario == "steady":
        return f"{args.calls} {args.profile} calls for {args.seconds:g} s"
    if args.scenario == "ramp":
        return (
            f"{args.profile} calls from {args.ramp_start} by {args.ramp_step} to "
            f"{args.ramp_max}, {args.hold:g} s per level"
        )
    if args.scenario == "idle":
        return f"{args.calls} held {args.profile} calls"
    return (
        f"{args.profile} calls of {args.call_seconds:g} s at {args.rate:g}/s for {args.seconds:g} s"
    )


async def one(
    args: argparse.Namespace,
    run: Run,
    target: Any,
    budget: float,
    direct_p99: dict[int, float],
) -> dict[str, Any]:
    if args.scenario == "steady":
        return await scenarios.steady(run, target, args.calls, args.seconds, args.ramp_seconds)
    if args.scenario == "idle":
        return await scenarios.idle(run, target, args.calls, args.hold)
    if args.scenario == "churn":
        return await scenarios.churn(run, target, args.rate, args.seconds, args.call_seconds)
    return await scenarios.ramp(
        run,
        target,
        args.ramp_start,
        args.ramp_step,
        args.ramp_max,
        args.hold,
        None if target.kind == "direct" else budget,
        direct_p99,
        fine=args.ramp_fine,
        max_seconds=args.ramp_target_seconds,
    )


async def busy_cores(seconds: float) -> float:
    before = procfs.host_busy_seconds()
    await asyncio.sleep(seconds)
    return round((procfs.host_busy_seconds() - before) / seconds, 3)


def ramp_summary(rep: dict[str, Any]) -> dict[str, str]:
    """Each target's limit a round: runs since session 46 (``ramp_fine``) say where each
    stopped and the step its limit was judged at; earlier runs the last level in budget."""
    if "ramp_fine" in rep["params"]:
        return ramp_limits(rep)
    budget = rep["params"]["budget_ms"]
    out = {}
    for rnd_i, rnd in enumerate(rep["rounds"], 1):
        direct = {lv["calls"]: lv for lv in rnd.get("direct", {}).get("levels", [])}
        for t, r in rnd.items():
            if base(t) == "direct":
                continue
            ok = []
            for lv in r["levels"]:
                d = direct.get(lv["calls"], {})
                if lv["rtt_ms_p99"] is None or d.get("rtt_ms_p99") is None:
                    continue
                if lv["rtt_ms_p99"] - d["rtt_ms_p99"] <= budget:
                    ok.append(lv)
            if ok:
                best = ok[-1]
                cores = best["loads"]["proxy_cores"] or 0
                per_core = round(best["calls"] / cores) if cores else None
                out[f"{t} (round {rnd_i})"] = (
                    f"{best['calls']} calls within the budget (stopped: {r['stop_reason']}); "
                    f"there the proxy used {cores} of a core -> ~{per_core} calls per core "
                    f"(extrapolated at that CPU per call)"
                )
            else:
                out[f"{t} (round {rnd_i})"] = f"no level within the budget ({r['stop_reason']})"
    return out


def ramp_limits(rep: dict[str, Any]) -> dict[str, str]:
    """Per target and round: its limit (the last level in budget), the lowest level over,
    the step between them, and why it stopped."""
    cap = rep["params"]["ramp_max"]
    out = {}
    for rnd_i, rnd in enumerate(rep["rounds"], 1):
        for t, r in rnd.items():
            if base(t) == "direct":
                levels = [lv["calls"] for lv in r["levels"]]
                out[f"{t} (round {rnd_i})"] = (
                    f"levels up to {max(levels, default=0)} calls ({r['stop_reason']})"
                )
                continue
            limit, over, step = r.get("limit"), r.get("first_over"), r.get("resolution")
            at = next((lv for lv in r["levels"] if lv["calls"] == limit), None)
            there = (
                f"; there added p99 {at.get('added_p99_ms')} ms, proxy "
                f"{at['loads']['proxy_cores']} cores"
                if at
                else ""
            )
            if limit is None:
                text = "no level within the budget"
            elif over is None:
                text = f"limit not found: in budget up to {limit} calls (cap {cap})"
            else:
                text = f"limit {limit} calls (over at {over}: judged at a step of {step})"
            out[f"{t} (round {rnd_i})"] = f"{text}{there}; stopped: {r['stop_reason']}"
    return out


def finish(rep: dict[str, Any], out: Path, *, partial: bool = False) -> None:
    rounds = rep["rounds"]
    if rep["scenario"] != "ramp":
        report.add_relative(rounds)
        rep.update(report.summarize_rounds(rep["scenario"], rounds))
        rep["targets_check"] = report.targets_check(rep["scenario"], rep)
    else:
        rep["summary"], rep["ratios"] = {}, {}
        rep["ramp_summary"] = ramp_summary(rep)
        if "ramp_fine" in rep["params"]:
            rep["targets_check"] = report.ramp_check(rep)
    rep["partial"] = partial
    report.write_json(rep, out / "results.json")
    (out / "results.md").write_text(report.markdown(rep))
    if not partial:
        png = report.plot(rep, out / "results.png")
        if png is None:
            rep["warnings"].append("matplotlib not installed: no plot")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hostile"]:  # its own module and options: bench/scenarios/hostile.py
        from .scenarios.hostile import main as hostile

        return hostile(argv[1:])
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    out = args.out or REPO / "bench" / "results" / (
        f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    log(f"{args.scenario}: writing to {out}")
    try:
        rep = uvloop.run(run_scenario(args, out))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: every child process stopped")
        return 130
    finish(rep, out)
    text = (out / "results.md").read_text()
    print(text)
    for w in rep["warnings"]:
        log(f"WARNING: {w}")
    log(f"results: {out}/results.json, results.md, results.png")
    if args.scenario == "ramp":
        return 0
    bad = any(
        r.get("failed") or r.get("lost_frames") or r.get("corrupt_frames")
        for rnd in rep["rounds"]
        for r in rnd.values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
