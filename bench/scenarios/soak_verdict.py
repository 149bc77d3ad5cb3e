"""The soak's verdict, from its samples alone: no process, no clock, no I/O.

The first quarter of the run is warm-up. RSS is flat when the mean of the last
quarter is within ``rss_tolerance_pct`` of the second quarter's and the
least-squares slope after warm-up, over that span, is too. Descriptors are
flat when no sample after warm-up has more than ``fd_slack`` over baseline +
2 x calls up (each call holds a carrier and a fleet socket), that excess does
not drift (last quarter's mean minus the second's at most :data:`FD_DRIFT`),
and they come back to baseline (+ :data:`FD_SLACK_IDLE`) once every call has
closed. It passes when all of that holds and no call failed, no frame was lost
or corrupt and no call had to be aborted at the end.
"""

from __future__ import annotations

from typing import Any

from ..harness.stats import mean, round_or_none, slope_per_minute

FD_SLACK_IDLE = 4  # descriptors over the baseline allowed once every call has closed
FD_DRIFT = 2.0  # mean (fds - baseline - 2 x calls up), last quarter minus second, allowed


def quarters(rows: list[dict[str, Any]], duration: float) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[], [], [], []]
    for r in rows:
        out[min(3, max(0, int(r["t_s"] / duration * 4)))].append(r)
    return out


def judge(
    rows: list[dict[str, Any]],
    baseline: dict[str, Any],
    after: dict[str, Any] | None,
    totals: dict[str, Any],
    *,
    duration: float,
    rss_tolerance_pct: float,
    fd_slack: int,
) -> dict[str, Any]:
    """Flat or not, passed or not, with every figure the decision uses.

    ``rows``: the samples (``phase`` "baseline", "run" or "after"; ``t_s`` since the
    calls started; ``rss_kib``, ``fds``, ``fd_excess`` = fds - baseline - 2 x calls up,
    ``active_calls``, ``active_calls_ingress``, ``calls_started``); ``baseline`` and
    ``after``: the samples before the first call and after the last closed;
    ``totals``: the generators' final counts (``failed``, ``lost``, ``corrupt``,
    ``cut``); ``duration``: the run's length in seconds."""
    run_rows = [r for r in rows if r["phase"] == "run" and r["rss_kib"] and r["fds"] is not None]
    q = quarters(run_rows, duration)
    warm = [r for r in run_rows if r["t_s"] >= duration / 4]
    span_min = (warm[-1]["t_s"] - warm[0]["t_s"]) / 60 if len(warm) >= 2 else 0.0

    def qmean(key: str) -> list[float | None]:
        return [round_or_none(mean([float(r[key]) for r in part]), 1) for part in q]

    rss_q, fds_q, excess_q = qmean("rss_kib"), qmean("fds"), qmean("fd_excess")
    active_q = qmean("active_calls")
    rss_slope = slope_per_minute([(r["t_s"], r["rss_kib"]) for r in warm])
    rss_slope_all = slope_per_minute([(r["t_s"], r["rss_kib"]) for r in run_rows])
    fd_slope = slope_per_minute([(r["t_s"], r["fds"]) for r in warm])
    excess_slope = slope_per_minute([(r["t_s"], r["fd_excess"]) for r in warm])
    tol = rss_tolerance_pct
    reasons: list[str] = []
    rss_growth_pct = rss_span_pct = None
    rss_flat = False
    if rss_q[1] and rss_q[3]:
        rss_growth_pct = round((rss_q[3] - rss_q[1]) / rss_q[1] * 100, 2)
        rss_span_pct = round((rss_slope or 0.0) * span_min / rss_q[1] * 100, 2)
        rss_flat = rss_growth_pct <= tol and rss_span_pct <= tol
        if not rss_flat:
            reasons.append(
                f"RSS grew {rss_growth_pct} % (last quarter vs second) and "
                f"{rss_span_pct} % by slope after warm-up: tolerance {tol} %"
            )
    else:
        reasons.append("too few samples to judge RSS")
    # If the growth after warm-up were a leak, this much per call set up meanwhile.
    calls_in_span = warm[-1]["calls_started"] - warm[0]["calls_started"] if len(warm) >= 2 else 0
    per_call_bytes = (
        round((rss_slope or 0.0) * span_min * 1024 / calls_in_span)
        if calls_in_span and rss_slope is not None
        else None
    )
    max_excess = max((r["fd_excess"] for r in warm), default=None)
    drift = (
        round(excess_q[3] - excess_q[1], 2)
        if excess_q[1] is not None and excess_q[3] is not None
        else None
    )
    fds_flat = max_excess is not None and max_excess <= fd_slack
    if drift is not None and drift > FD_DRIFT:
        fds_flat = False
        reasons.append(
            f"descriptors over baseline + 2 x calls up grew by {drift} on average from the "
            f"second quarter to the last (allowed {FD_DRIFT})"
        )
    if max_excess is None:
        reasons.append("too few samples to judge descriptors")
    elif max_excess > fd_slack:
        worst = max(warm, key=lambda r: r["fd_excess"])
        reasons.append(
            f"descriptors {worst['fds']} at {worst['t_s']:.0f} s: {max_excess} over baseline "
            f"{baseline['fds']} + 2 x {worst['active_calls_ingress'] or worst['active_calls']} "
            f"calls up (allowed {fd_slack})"
        )
    fds_back = bool(
        after is not None
        and after["fds"] is not None
        and after["fds"] <= baseline["fds"] + FD_SLACK_IDLE
    )
    if not fds_back:
        reasons.append(
            f"descriptors after every call closed: {after and after['fds']} against baseline "
            f"{baseline['fds']} (allowed +{FD_SLACK_IDLE})"
        )
    for key, what in (
        ("failed", "calls failed"),
        ("lost", "frames lost"),
        ("corrupt", "frames corrupt"),
        ("cut", "calls not closed in time at the end (aborted)"),
    ):
        if totals.get(key):
            reasons.append(f"{totals[key]} {what}")
    return {
        "flat": rss_flat and fds_flat and fds_back,
        "passed": not reasons,
        "reasons": reasons,
        "warm_up_s": round(duration / 4, 1),
        "rss_tolerance_pct": tol,
        "fd_slack": fd_slack,
        "fd_slack_idle": FD_SLACK_IDLE,
        "rss_kib_quarter_means": rss_q,
        "fds_quarter_means": fds_q,
        "fd_excess_quarter_means": excess_q,
        "active_calls_quarter_means": active_q,
        "rss_growth_pct_q4_vs_q2": rss_growth_pct,
        "rss_slope_kib_per_min_after_warm_up": round_or_none(rss_slope, 2),
        "rss_slope_kib_per_min_whole_run": round_or_none(rss_slope_all, 2),
        "rss_growth_pct_by_slope_after_warm_up": rss_span_pct,
        "rss_bytes_per_call_if_leak": per_call_bytes,
        "calls_started_after_warm_up": calls_in_span,
        "fds_slope_per_min_after_warm_up": round_or_none(fd_slope, 3),
        "fd_excess_slope_per_min_after_warm_up": round_or_none(excess_slope, 3),
        "fd_excess_max_after_warm_up": max_excess,
        "fd_excess_drift_q4_vs_q2": drift,
        "fd_drift_allowed": FD_DRIFT,
        "rss_flat": rss_flat,
        "fds_flat": fds_flat,
        "fds_back_to_baseline": fds_back,
    }
