"""Soak: N concurrent calls under churn through fleet-ingress for M minutes; RSS and fds over time.

    .venv/bin/python -m bench.soak --calls 200 --minutes 10 --call-seconds 20
    .venv/bin/python bench/soak.py --calls 20 --minutes 1          # a quick check

One real ``python -m fleet_ingress run -c CONFIG`` process (rendered by
:mod:`bench.harness.targets`, TLS on both sides, its stats listener on) in front
of the bench's two simulated fleets (:mod:`bench.harness.fleets`, one process
each), all on 127.0.0.1. Generator processes (:mod:`bench.harness.generator` in
``slots`` mode, on the lean carrier of :mod:`bench.harness.carrier`) keep
``--calls`` call slots busy: a call streams twilio-like 20 ms frames for a
random length in ``--call-seconds`` +- ``--call-spread``, waits for its echoes,
closes (1000), and the slot opens the next call at once, so a 10-minute run
makes thousands of call set-ups and tear-downs. Every ``--sample-every``
seconds it records the ingress's VmRSS (and its ``[heap]`` / anonymous-mmap
split), its open descriptors (``/proc/PID/fd``), its CPU, the calls up,
started, completed and failed, the frames lost, and the ingress's own
``/stats.json`` frontend figures.

The verdict is :func:`bench.scenarios.soak_verdict.judge`, a pure function of
the samples: the first quarter of the run is warm-up; RSS is flat when the mean
of the last quarter is within ``--rss-tolerance-pct`` of the second quarter's
and the least-squares slope after warm-up, over that span, is too; descriptors
are flat when every sample after warm-up has at most ``--fd-slack`` more than
baseline + 2 x calls up, that excess does not drift (last quarter's mean minus
the second's at most ``FD_DRIFT``), and they return to baseline (+
``FD_SLACK_IDLE``) once every call has closed. Exit status 1 on a failed call,
a lost or corrupt frame, or growth beyond tolerance; 2 on an error. Every
child runs in its own session with ``PR_SET_PDEATHSIG`` and is stopped at the
end, on error, SIGTERM or Ctrl-C; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvloop

from fleet_ingress.sim import PROFILES

from ..harness import memory, procfs
from ..harness.children import REPO, Children, free_port, log, log_as
from ..harness.generator import (
    CLOSE_WAIT,
    ECHO_WAIT,
    MIN_CALL_SECONDS,
    OPEN_TIMEOUT,
    Generators,
    call_bounds,
)
from ..harness.report import write_json
from ..harness.run import Run, target_env
from ..harness.stats import hist_percentile, mean, round_or_none
from ..harness.targets import Target, get_json
from ..harness.versions import code_version
from .soak_verdict import FD_SLACK_IDLE, judge

AFTER_WAIT = 15.0  # at most, after the last call, for descriptors to return to baseline
SPREAD_MAX = 0.9


@dataclass
class Sampler:
    """One row of figures every ``--sample-every`` seconds (CPU as cores since the last)."""

    target: Target
    stats_port: int | None
    run: Run
    gens: Generators | None = None
    t0: float = 0.0
    fd0: int = 0
    last: tuple[float, float, float, float, float] | None = None
    probes: int = 0

    async def _memhook(self) -> dict[str, Any] | None:
        """glibc's heap (in use / free) and live objects by type, from ``bench/memhook``."""
        directory = self.target.env.get("BENCH_MEMHOOK_DIR")
        if not directory:
            return None
        self.probes += 1
        snap = await memory.probe(Path(directory), f"sample-{self.probes}", timeout=10.0)
        return memory.heap(snap)

    def _cpu(self) -> tuple[float, float, float, float, float]:
        pid = self.target.pid
        assert pid is not None
        gen = sum(procfs.cpu_seconds(p.pid) for p in self.gens.procs) if self.gens else math.nan
        fleets = sum(procfs.cpu_seconds(p.pid) for p in self.run.fleet_procs)
        return (
            time.monotonic(),
            procfs.tree_cpu_seconds(pid),
            gen,
            fleets,
            procfs.host_busy_seconds(),
        )

    async def take(self, phase: str) -> dict[str, Any]:
        pid = self.target.pid
        assert pid is not None
        # Descriptors and memory before the stats request (its own socket is not counted).
        # The supervisor and its workers: the calls, and any leak, are in the workers.
        fds = procfs.tree_fd_count(pid)
        rss = procfs.tree_rss_kib(pid)
        maps = procfs.tree_rss_by_mapping(pid)
        cpu = self._cpu()
        cores: dict[str, float | None] = {}
        if self.last is not None:
            window = cpu[0] - self.last[0]
            for i, name in enumerate(("ingress", "generators", "fleets", "host"), 1):
                used = cpu[i] - self.last[i]
                cores[name] = round(used / window, 3) if window and not math.isnan(used) else None
        self.last = cpu
        stats = await get_json(self.stats_port, "/stats.json") if self.stats_port else None
        hook = await self._memhook()
        front = (stats or {}).get("frontend")
        g = self.gens
        rtt, hs = g.take_hists() if g else ({}, {})
        active_gen = g.total("active") if g else 0
        active_ing = front.get("active_calls") if front else None
        active = active_ing if active_ing is not None else active_gen
        row: dict[str, Any] = {
            "phase": phase,
            "t_s": round(time.monotonic() - self.t0, 2) if self.t0 else 0.0,
            "rss_kib": rss,
            "heap_kib": maps.get("[heap]", 0),
            "anon_mmap_kib": maps.get("anon-mmap", 0),
            "fds": fds,
            "fd_excess": None if fds is None else fds - self.fd0 - 2 * active,
            "active_calls": active_gen,
            "active_calls_ingress": active_ing,
            "calls_started": g.total("established") if g else 0,
            "calls_completed": g.total("finished") if g else 0,
            "calls_failed": g.total("failed") if g else 0,
            "call_attempts": g.total("attempts") if g else 0,
            "frames_sent": g.total("sent") if g else 0,
            "frames_echoed": g.total("recv") if g else 0,
            "lost_frames": g.total("lost") if g else 0,
            "corrupt_frames": g.total("corrupt") if g else 0,
            "rtt_ms_p50": hist_percentile(rtt, 50),
            "rtt_ms_p99": hist_percentile(rtt, 99),
            "handshake_ms_p99": hist_percentile(hs, 99),
            "cores": cores,
            "generators_rss_kib": sum(procfs.rss_kib(p.pid) for p in g.procs) if g else 0,
            "fleets_rss_kib": sum(procfs.rss_kib(p.pid) for p in self.run.fleet_procs),
            "memhook": hook,
            "frontend": front,
            "fleets": [
                {k: f.get(k) for k in ("name", "health", "active", "calls_total")}
                for f in (stats or {}).get("fleets", [])
            ]
            or None,
        }
        return row


def describe_row(row: dict[str, Any]) -> str:
    front = row["frontend"] or {}
    c = row["cores"]
    return (
        f"{row['phase']} {row['t_s']:6.0f}s calls up {row['active_calls']} "
        f"(ingress {row['active_calls_ingress']}) completed {row['calls_completed']} "
        f"failed {row['calls_failed']} lost {row['lost_frames']} | RSS "
        f"{row['rss_kib'] / 1024:.1f} MiB fds {row['fds']} (excess {row['fd_excess']}) | "
        f"conns total {front.get('connections_total')} rtt~p99 {row['rtt_ms_p99']} ms | cores: "
        f"ingress {c.get('ingress')} gen {c.get('generators')} fleets {c.get('fleets')} "
        f"host {c.get('host')}"
    )


# -- output -------------------------------------------------------------------------


def md_table(rows: list[dict[str, Any]], every: float) -> list[str]:
    """Samples at every ``every`` seconds of the run (the nearest), the baseline and after."""
    run_rows = [r for r in rows if r["phase"] == "run"]
    picked: list[dict[str, Any]] = [r for r in rows if r["phase"] == "baseline"][:1]
    if run_rows:
        end = run_rows[-1]["t_s"]
        marks = [i * every for i in range(int(end // every) + 1)]
        if end - marks[-1] > every / 4:
            marks.append(end)
        for m in marks:
            best = min(run_rows, key=lambda r: abs(r["t_s"] - m))
            if best not in picked:
                picked.append(best)
    picked += [r for r in rows if r["phase"] == "after"][-1:]
    out = [
        "| t | RSS MiB | heap MiB | fds | fds - 2 x calls up - baseline | calls up "
        "(ingress) | calls started | completed | failed | lost frames | conns accepted "
        "| RTT p99 ms | ingress cores | host cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in picked:
        front = r["frontend"] or {}
        when = {"baseline": "before", "after": "after"}.get(r["phase"], f"{r['t_s'] / 60:.1f} min")
        out.append(
            f"| {when} | {r['rss_kib'] / 1024:.1f} | {r['heap_kib'] / 1024:.1f} | {r['fds']} "
            f"| {r['fd_excess']} | {r['active_calls']} ({r['active_calls_ingress']}) "
            f"| {r['calls_started']} | {r['calls_completed']} | {r['calls_failed']} "
            f"| {r['lost_frames']} | {front.get('connections_total', '-')} "
            f"| {r['rtt_ms_p99'] if r['rtt_ms_p99'] is not None else '-'} "
            f"| {r['cores'].get('ingress', '-')} | {r['cores'].get('host', '-')} |"
        )
    return out


def memhook_lines(hook: dict[str, Any] | None) -> list[str]:
    if not hook:
        return []
    out = []
    for key, what in (
        ("malloc_in_use_kib", "glibc malloc in use KiB"),
        ("malloc_free_kib", "glibc malloc free (held) KiB"),
        ("heap_arena_kib", "glibc brk heap size KiB"),
        ("gc_objects_top60", "live GC objects (60 commonest types)"),
    ):
        v = hook[key]
        out.append(
            f"| {what}: baseline / end of warm-up / end / after | {v['baseline']} / "
            f"{v['end_of_warm_up']} / {v['end']} / {v['after']} |"
        )
    grown = hook.get("types_grown_after_warm_up")
    if grown is not None:
        text = ", ".join(f"{k} +{v}" for k, v in grown.items()) or "none"
        out.append(f"| object types grown after warm-up | {text} |")
    return out


def markdown(rep: dict[str, Any]) -> str:
    v, s, m = rep["verdict"], rep["summary"], rep["machine"]
    p = rep["params"]
    verdict = "PASS" if v["passed"] else "FAIL"
    lines = [
        f"# Soak: {p['calls']} calls for {p['minutes']:g} min under churn",
        "",
        f"`{rep['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_mib']} MiB, Linux "
        f"{m['kernel']}, Python {m['python']}. fleet_ingress {rep['code'].get('git_head')} "
        f"({rep['code'].get('src_uncommitted_changes')} uncommitted files in src/). "
        f"Calls {p['call_seconds']:g} s on average ({s['call_seconds_min']:g}-"
        f"{s['call_seconds_max']:g} s, uniform), {p['profile']} frames every "
        f"{p['frame_interval_ms']:g} ms, TLS both sides, stats listener "
        f"{'on' if rep['stats_listener'] else 'off'}.",
        "",
        f"**Verdict: {verdict}** ({'flat' if v['flat'] else 'not flat'})"
        + ("" if not v["reasons"] else ": " + "; ".join(v["reasons"])),
        "",
        "| figure | value |",
        "|---|---|",
        f"| run | {s['duration_s']:.0f} s, {s['samples']} samples every {p['sample_every']:g} s |",
        f"| calls set up / completed / failed / aborted at the end | {s['calls_started']} / "
        f"{s['calls_completed']} / {s['calls_failed']} / {s['calls_cut_at_end']} |",
        f"| frames sent / echoed / lost / corrupt | {s['frames_sent']} / {s['frames_echoed']} / "
        f"{s['lost_frames']} / {s['corrupt_frames']} |",
        f"| connections accepted by the ingress (stats) | {s['connections_accepted']} |",
        f"| RSS KiB: baseline / end of warm-up / end of run / after all calls closed | "
        f"{s['rss_kib_baseline']} / {s['rss_kib_end_of_warm_up']} / {s['rss_kib_end']} / "
        f"{s['rss_kib_after']} |",
        f"| RSS KiB, mean per quarter | {' / '.join(str(x) for x in v['rss_kib_quarter_means'])} |",
        f"| RSS growth, last quarter vs second | {v['rss_growth_pct_q4_vs_q2']} % "
        f"(tolerance {v['rss_tolerance_pct']} %) |",
        f"| RSS slope after warm-up / whole run | {v['rss_slope_kib_per_min_after_warm_up']} / "
        f"{v['rss_slope_kib_per_min_whole_run']} KiB per min ("
        f"{v['rss_growth_pct_by_slope_after_warm_up']} % over the span after warm-up) |",
        f"| growth after warm-up per call set up, if it were a leak | "
        f"{v['rss_bytes_per_call_if_leak']} bytes ({v['calls_started_after_warm_up']} calls) |",
        f"| fds: baseline / end of warm-up / end of run / after all calls closed | "
        f"{s['fds_baseline']} / {s['fds_end_of_warm_up']} / {s['fds_end']} / {s['fds_after']} |",
        "| fds, mean per quarter (calls up) | "
        + " / ".join(
            f"{a} ({b})"
            for a, b in zip(v["fds_quarter_means"], v["active_calls_quarter_means"], strict=True)
        )
        + " |",
        f"| fds - baseline - 2 x calls up: max after warm-up, last quarter minus second, "
        f"slope | {v['fd_excess_max_after_warm_up']} (allowed {v['fd_slack']}), "
        f"{v['fd_excess_drift_q4_vs_q2']} (allowed {v['fd_drift_allowed']}), "
        f"{v['fd_excess_slope_per_min_after_warm_up']} per min |",
        f"| handshake p99 / RTT p50 / p99 over the run (ms) | {s['handshake_ms_p99']} / "
        f"{s['rtt_ms_p50']} / {s['rtt_ms_p99']} |",
        f"| ingress CPU (mean cores) / host busy (mean cores of {m['nproc']}) | "
        f"{s['ingress_cores_mean']} / {s['host_cores_mean']} |",
        *memhook_lines(s.get("memhook")),
        "",
        "## Samples",
        "",
        *md_table(rep["samples"], p["table_every"]),
        "",
    ]
    if rep["warnings"]:
        lines += ["## Warnings", "", *(f"- {w}" for w in rep["warnings"]), ""]
    return "\n".join(lines)


def summarize(
    rows: list[dict[str, Any]],
    totals: dict[str, Any],
    gens: Generators | None,
    duration: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    run_rows = [r for r in rows if r["phase"] == "run"]
    base = next((r for r in rows if r["phase"] == "baseline"), None)
    after = next((r for r in reversed(rows) if r["phase"] == "after"), None)
    warm = [r for r in run_rows if r["t_s"] <= duration / 4]
    end = run_rows[-1] if run_rows else None
    lo, hi = call_bounds(args.call_seconds, args.call_spread)
    ing = [r["cores"]["ingress"] for r in run_rows if r["cores"].get("ingress") is not None]
    host = [r["cores"]["host"] for r in run_rows if r["cores"].get("host") is not None]
    accepted = None
    if end and end["frontend"] and base and base["frontend"]:
        accepted = end["frontend"]["connections_total"] - base["frontend"]["connections_total"]
    return {
        "duration_s": round(run_rows[-1]["t_s"], 1) if run_rows else 0.0,
        "samples": len(run_rows),
        "call_seconds_min": round(lo, 2),
        "call_seconds_max": round(hi, 2),
        "calls_started": totals.get("established", 0),
        "calls_completed": totals.get("finished", 0),
        "calls_failed": totals.get("failed", 0),
        "calls_cut_at_end": totals.get("cut", 0),
        "call_attempts": totals.get("attempts", 0),
        "frames_sent": totals.get("sent", 0),
        "frames_echoed": totals.get("recv", 0),
        "lost_frames": totals.get("lost", 0),
        "corrupt_frames": totals.get("corrupt", 0),
        "unexpected_messages": totals.get("unexpected", 0),
        "errors": totals.get("errors", {}),
        "statuses": totals.get("statuses", {}),
        "fleets": totals.get("fleets", {}),
        "connections_accepted": accepted,
        "rss_kib_baseline": base and base["rss_kib"],
        "rss_kib_end_of_warm_up": warm[-1]["rss_kib"] if warm else None,
        "rss_kib_end": end and end["rss_kib"],
        "rss_kib_after": after and after["rss_kib"],
        "rss_kib_max": max((r["rss_kib"] for r in run_rows), default=None),
        "fds_baseline": base and base["fds"],
        "fds_end_of_warm_up": warm[-1]["fds"] if warm else None,
        "fds_end": end and end["fds"],
        "fds_after": after and after["fds"],
        "fds_max": max((r["fds"] or 0 for r in run_rows), default=None),
        "handshake_ms_p50": hist_percentile(gens.hs_all, 50) if gens else None,
        "handshake_ms_p99": hist_percentile(gens.hs_all, 99) if gens else None,
        "rtt_ms_p50": hist_percentile(gens.rtt_all, 50) if gens else None,
        "rtt_ms_p99": hist_percentile(gens.rtt_all, 99) if gens else None,
        "ingress_cores_mean": round_or_none(mean(ing), 3),
        "host_cores_mean": round_or_none(mean(host), 3),
        "generators_rss_kib_start_end": [
            run_rows[0]["generators_rss_kib"],
            end["generators_rss_kib"],
        ]
        if end
        else None,
        "fleets_rss_kib_start_end": [run_rows[0]["fleets_rss_kib"], end["fleets_rss_kib"]]
        if end
        else None,
    }


def memhook_summary(rows: list[dict[str, Any]], duration: float) -> dict[str, Any] | None:
    """With ``--memhook``: glibc's heap at the four points, and which object types grew
    between the end of warm-up and the end of the run."""
    hooked = [r for r in rows if r.get("memhook") and "error" not in r["memhook"]]
    if not hooked:
        return None
    run_rows = [r for r in hooked if r["phase"] == "run"]
    points = {
        "baseline": next((r for r in hooked if r["phase"] == "baseline"), None),
        "end_of_warm_up": next((r for r in reversed(run_rows) if r["t_s"] <= duration / 4), None),
        "end": run_rows[-1] if run_rows else None,
        "after": next((r for r in reversed(hooked) if r["phase"] == "after"), None),
    }
    out: dict[str, Any] = {}
    for key in ("malloc_in_use_kib", "malloc_free_kib", "heap_arena_kib", "gc_objects_top60"):
        out[key] = {name: r and r["memhook"][key] for name, r in points.items()}
    a, b = points["end_of_warm_up"], points["end"]
    if a and b:
        ta, tb = a["memhook"]["gc_objects_by_type"], b["memhook"]["gc_objects_by_type"]
        grown = {k: tb.get(k, 0) - ta.get(k, 0) for k in set(ta) | set(tb)}
        out["types_grown_after_warm_up"] = dict(
            sorted(((k, v) for k, v in grown.items() if v > 0), key=lambda kv: -kv[1])[:10]
        )
    return out


def warnings_for(rep: dict[str, Any]) -> list[str]:
    out = []
    nproc = rep["machine"]["nproc"] or 1
    s = rep["summary"]
    if (s.get("host_cores_mean") or 0) > 0.9 * nproc:
        out.append(f"host busy {s['host_cores_mean']}/{nproc} cores on average: saturated")
    gen = [r["cores"].get("generators") or 0 for r in rep["samples"] if r["phase"] == "run"]
    if gen and max(gen) > 0.8 * max(1, rep["params"]["generators_used"]):
        out.append(
            f"generators used up to {max(gen)} cores over {rep['params']['generators_used']} "
            "process(es): they may have fallen behind (frames late, not lost)"
        )
    if s.get("unexpected_messages"):
        out.append(f"{s['unexpected_messages']} echoes arrived with nothing outstanding")
    return out


# -- the run ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=doc.splitlines()[0])
    p.add_argument("--calls", type=int, default=200, help="concurrent calls kept up")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument(
        "--call-seconds", type=float, default=20.0, help="mean call length (uniform around it)"
    )
    p.add_argument(
        "--call-spread",
        type=float,
        default=0.5,
        help=f"call lengths uniform in mean x (1 +- SPREAD), at most {SPREAD_MAX}; default 0.5",
    )
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    p.add_argument("--table-every", type=float, default=60.0, help="Markdown rows, seconds")
    p.add_argument("--profile", default="twilio-like", choices=sorted(PROFILES))
    p.add_argument("--route", help="call route prefix (default /exotel/ for exotel, else /ws/)")
    p.add_argument("--generators", type=int, default=0, help="processes (0: by --calls)")
    p.add_argument("--calls-per-generator", type=int, default=250)
    p.add_argument("--ramp", type=float, default=5.0, help="seconds over which calls start")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--rss-tolerance-pct",
        type=float,
        default=5.0,
        help="RSS growth after warm-up still called flat (default 5)",
    )
    p.add_argument(
        "--fd-slack",
        type=int,
        default=16,
        help="descriptors over baseline + 2 x calls up still called flat (default 16)",
    )
    p.add_argument("--no-stats", action="store_true", help="leave the ingress's stats listener off")
    p.add_argument(
        "--ingress-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for fleet-ingress (experiments, e.g. "
        "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072); {repo} is the repository",
    )
    p.add_argument(
        "--memhook",
        action="store_true",
        help="load bench/memhook into the ingress and record glibc's heap in use / free and "
        "live objects by type at every sample (diagnosis: disturbs the figures a little)",
    )
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="with --memhook")
    p.add_argument("--json-out", type=Path, help="default bench/results/soak-TIME/results.json")
    p.add_argument("--md-out", type=Path, help="default next to the JSON, results.md")
    args = p.parse_args(argv)
    if args.calls < 1 or args.calls > 5000:
        p.error("--calls must be 1..5000")
    if not 0 < args.minutes <= 24 * 60:
        p.error("--minutes must be in (0, 1440]")
    if not 0 <= args.call_spread <= SPREAD_MAX:
        p.error(f"--call-spread must be in [0, {SPREAD_MAX}]")
    if args.call_seconds < MIN_CALL_SECONDS:
        p.error(f"--call-seconds must be at least {MIN_CALL_SECONDS}")
    if args.sample_every <= 0 or args.minutes * 60 / args.sample_every < 8:
        p.error("need at least 8 samples: lower --sample-every or raise --minutes")
    if args.route is None:
        args.route = "/exotel/" if args.profile == "exotel" else "/ws/"
    return args


async def soak(args: argparse.Namespace, rep: dict[str, Any]) -> dict[str, Any]:
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    rows: list[dict[str, Any]] = rep["samples"]
    duration = args.minutes * 60
    # Each fleet could take every call; the other options are the soak's own.
    run_args = SimpleNamespace(**vars(args), fleet_capacity=args.calls + 16)
    gens: Generators | None = None
    totals: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fleet-ingress-soak-") as tmp:
        run = Run(run_args, Path(tmp), Path(tmp))
        rep["settings"] = run.settings.as_dict()
        try:
            await run.start_fleets()
            stats_port = None if args.no_stats else free_port()
            hook_dir = run.dir / "memhook" if args.memhook else None
            env = target_env(args.ingress_env, hook_dir, args.tracemalloc)
            ingress = await run.start("ingress", env, stats_port)
            rep["stats_listener"] = stats_port is not None
            assert ingress.config is not None and ingress.pid is not None
            rep["ingress_config"] = ingress.config.read_text()
            log(f"fleet-ingress ready (pid {ingress.pid}) after {ingress.ready_s} s")
            await asyncio.sleep(2.0)  # the ready call gone, health probes settled
            sampler = Sampler(ingress, stats_port, run)
            await sampler.take("baseline")  # primes the CPU counters
            await asyncio.sleep(1.0)
            base = await sampler.take("baseline")
            sampler.fd0 = base["fds"] or 0
            base["fd_excess"] = 0
            rows.append(base)
            log(describe_row(base))
            gens = await run.generators(
                ingress,
                calls=args.calls,
                mode="slots",
                t0=time.monotonic() + 0.5,
                gap=args.ramp / args.calls,
                max_seconds=args.minutes * 60 + 60,
                seed=args.seed,
                extra=[
                    *("--call-seconds", repr(args.call_seconds)),
                    *("--call-spread", repr(args.call_spread)),
                ],
            )
            rep["params"]["generators_used"] = len(gens.procs)
            sampler.gens = gens
            sampler.t0 = time.monotonic()
            log(
                f"{args.calls} calls of {args.call_seconds:g} s (+-{args.call_spread * 100:g} %) "
                f"for {args.minutes:g} min in {len(gens.procs)} generator process(es)"
            )
            end = sampler.t0 + duration
            n = 0
            while True:
                n += 1
                due = min(end, sampler.t0 + n * args.sample_every)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if ingress.proc is not None and ingress.proc.returncode is not None:
                    raise RuntimeError(
                        f"fleet-ingress exited {ingress.proc.returncode} during the run"
                    )
                row = await sampler.take("run")
                rows.append(row)
                log(describe_row(row))
                if due >= end:
                    break
            log("stopping the calls")
            await gens.stop(timeout=OPEN_TIMEOUT + ECHO_WAIT + CLOSE_WAIT + 15)
            done = list(gens.done.values())
            if len(done) < len(gens.procs):
                rep["warnings"].append(
                    f"{len(gens.procs) - len(done)} generator(s) left no final count: "
                    "their last progress line is used"
                )
            totals = {
                k: gens.total(k)
                for k in (
                    "attempts",
                    "established",
                    "failed",
                    "finished",
                    "lost",
                    "corrupt",
                    "unexpected",
                    "sent",
                    "recv",
                )
            }
            rep["generators_final"] = [
                {k: v for k, v in d.items() if k not in ("rtt_hist", "hs_hist")} for d in done
            ]
            totals["cut"] = gens.total("cut")
            # A frame sent and never echoed is lost, even on a call aborted at the end.
            totals["lost"] = max(totals["lost"], totals["sent"] - totals["recv"])
            totals["errors"] = gens.merged("errors")
            totals["statuses"] = gens.merged("statuses")
            totals["fleets"] = gens.merged("fleets")
            # Every call is closed: descriptors back to the baseline (bounded wait).
            sampler.gens = None
            deadline = time.monotonic() + AFTER_WAIT
            while True:
                await asyncio.sleep(1.0)
                after = await sampler.take("after")
                after["t_s"] = round(time.monotonic() - sampler.t0, 2)
                for k in ("calls_started", "calls_completed", "calls_failed", "call_attempts"):
                    after[k] = totals.get(
                        {
                            "calls_started": "established",
                            "calls_completed": "finished",
                            "calls_failed": "failed",
                            "call_attempts": "attempts",
                        }[k]
                    )
                after["lost_frames"] = totals.get("lost")
                after["corrupt_frames"] = totals.get("corrupt")
                after["frames_sent"], after["frames_echoed"] = totals["sent"], totals["recv"]
                ok = after["fds"] is not None and after["fds"] <= sampler.fd0 + FD_SLACK_IDLE
                if ok or time.monotonic() > deadline:
                    break
            rows.append(after)
            log(describe_row(after))
            code = await Children.stop(ingress.proc)  # type: ignore[arg-type]
            if code not in (0, -15, 143):
                rep["warnings"].append(f"fleet-ingress exited {code} on SIGTERM")
        finally:
            with contextlib.suppress(Exception):
                if gens is not None:
                    for task in gens.readers:
                        task.cancel()
            await run.close()
            err = Path(tmp) / "ingress" / "stderr.log"
            if err.exists():
                lines = err.read_text(errors="replace").splitlines()
                rep["ingress_stderr_lines"] = len(lines)
                rep["ingress_stderr_head"] = lines[:20]
                if lines:
                    rep["warnings"].append(
                        f"fleet-ingress wrote {len(lines)} lines on stderr, first: {lines[0]!r}"
                    )
    rep["summary"] = summarize(rows, totals, gens, duration, args)
    rep["summary"]["memhook"] = memhook_summary(rows, duration)
    base = next(r for r in rows if r["phase"] == "baseline")
    after = next((r for r in reversed(rows) if r["phase"] == "after"), None)
    rep["verdict"] = judge(
        rows,
        base,
        after,
        totals,
        duration=duration,
        rss_tolerance_pct=args.rss_tolerance_pct,
        fd_slack=args.fd_slack,
    )
    rep["warnings"] += warnings_for(rep)
    return rep


def write(rep: dict[str, Any], json_out: Path, md_out: Path) -> None:
    write_json(rep, json_out)
    md_out.parent.mkdir(parents=True, exist_ok=True)
    if "verdict" in rep:
        md_out.write_text(markdown(rep))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log_as("soak")
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_out = args.json_out or REPO / "bench" / "results" / f"soak-{stamp}" / "results.json"
    md_out = args.md_out or json_out.with_name("results.md")
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    params["frame_interval_ms"] = PROFILES[args.profile].interval * 1000
    params["tls"] = "both sides"
    rep: dict[str, Any] = {
        "scenario": "soak",
        "command": "python -m bench.soak " + shlex.join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": procfs.machine(),
        "code": code_version(),
        "params": params,
        "samples": [],
        "warnings": [],
    }
    log(f"soak: writing to {json_out} and {md_out}")
    try:
        rep = uvloop.run(soak(args, rep))
    except (KeyboardInterrupt, asyncio.CancelledError):
        rep["error"] = "interrupted"
        write(rep, json_out, md_out)
        log("interrupted: every child process stopped; samples so far in the JSON")
        return 130
    except Exception as exc:
        rep["error"] = f"{type(exc).__name__}: {exc}"
        write(rep, json_out, md_out)
        log(f"error: {rep['error']} (every child process stopped; samples so far in the JSON)")
        return 2
    rep["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    write(rep, json_out, md_out)
    print(markdown(rep))
    for w in rep["warnings"]:
        log(f"WARNING: {w}")
    v = rep["verdict"]
    log(f"verdict: {'PASS' if v['passed'] else 'FAIL'}" + "".join(f"; {r}" for r in v["reasons"]))
    log(f"results: {json_out}, {md_out}")
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
