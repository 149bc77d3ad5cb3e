"""The bench's pure parts, without a process or a socket: statistics, the generators'
progress lines, the ramp's and the soak's verdicts, and the results already in
bench/results/ (still read, judged and rendered as they were written)."""

from __future__ import annotations

import json
import random
from array import array
from pathlib import Path
from typing import Any

import pytest
from bench.__main__ import ramp_summary
from bench.harness import report
from bench.harness.carrier import Recorder
from bench.harness.generator import Generators, Progress, call_bounds, merged_percentile
from bench.harness.stats import (
    bucket_upper,
    count_between,
    diff,
    hist_percentile,
    histogram,
    merge,
    percentile,
    ratio,
    slope_per_minute,
    stagger,
)
from bench.scenarios import soak
from bench.scenarios.ramp import why_over
from bench.scenarios.soak_verdict import FD_DRIFT, FD_SLACK_IDLE, judge

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"

# -- statistics ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([], 50, None),
        ([7.0], 50, 7.0),
        ([7.0], 99, 7.0),
        ([3.0, 1.0, 2.0], 50, 2.0),  # unsorted input
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),  # nearest rank: ceil(4 x 0.5) = 2nd
        ([1.0, 2.0, 3.0, 4.0], 51, 3.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 101)], 100, 100.0),
        ([float(i) for i in range(1, 1001)], 99, 990.0),
        ([0.12345, 0.5], 1, 0.123),  # rounded to microseconds (ms with 3 digits)
    ],
)
def test_percentile_is_nearest_rank(values: list[float], p: float, expected: float | None) -> None:
    assert percentile(values, p) == expected


def test_histogram_percentile_bounds_the_exact_one_within_five_percent() -> None:
    rng = random.Random(11)
    values = [rng.lognormvariate(0, 1.2) for _ in range(5000)]
    hist = histogram(values)
    assert sum(hist.values()) == len(values)
    for p in (1, 50, 90, 99, 99.9, 100):
        exact = percentile(values, p)
        approx = hist_percentile(hist, p)
        assert exact is not None and approx is not None
        assert exact - 0.001 <= approx <= exact * 1.05 + 0.001, (p, exact, approx)


def test_histogram_floor_and_buckets() -> None:
    assert histogram([]) == {}
    assert histogram([0.0, 0.001, 0.01]) == {0: 3}  # at or under the floor: bucket 0
    assert histogram([0.0101]) == {1: 1}
    assert bucket_upper(0) == 0.01
    assert hist_percentile({}, 99) is None
    assert hist_percentile({0: 1, 100: 1}, 50) == round(bucket_upper(0), 3)
    assert hist_percentile({0: 1, 100: 1}, 51) == round(bucket_upper(100), 3)


def test_merge_adds_bucket_counts() -> None:
    assert merge([{1: 2, 3: 1}, {}, {1: 1, 4: 5}]) == {1: 3, 3: 1, 4: 5}
    assert merge([]) == {}


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([], None),
        ([(0.0, 5.0)], None),
        ([(10.0, 1.0), (10.0, 9.0)], None),  # no spread in time: no slope
        ([(0.0, 3.0), (60.0, 3.0), (120.0, 3.0)], 0.0),
        ([(0.0, 3.0), (30.0, 63.0), (60.0, 123.0)], 120.0),  # 2 per second
        ([(0.0, 10.0), (60.0, 0.0), (120.0, 20.0)], 5.0),  # least squares, not end to end
    ],
)
def test_slope_per_minute(points: list[tuple[float, float]], expected: float | None) -> None:
    got = slope_per_minute(points)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_count_between_is_inclusive_on_both_ends() -> None:
    values = array("d", [1.0, 2.0, 2.0, 3.0, 5.0])
    assert count_between(values, 2.0, 3.0) == 3
    assert count_between(values, 3.5, 4.5) == 0
    assert count_between(values, 0.0, 10.0) == 5


def test_ratio_and_diff_of_missing_figures() -> None:
    assert ratio(1.0, 3.0) == 0.333
    assert ratio(1.0, 3.0, 5) == 0.33333
    assert ratio(None, 3.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None
    assert diff(5.0, 1.25) == 3.75
    assert diff(None, 1.0) is None and diff(1.0, None) is None


@pytest.mark.parametrize(
    ("calls", "interval", "ramp"), [(100, 0.02, 2.0), (4, 0.02, 0.5), (50, 0.1, 1.0)]
)
def test_stagger_puts_every_call_on_its_own_frame_phase(
    calls: int, interval: float, ramp: float
) -> None:
    gap = stagger(calls, interval, ramp)
    slot = interval / calls
    phases = sorted(round((i * gap % interval) / slot) % calls for i in range(calls))
    assert phases == list(range(calls))
    assert gap * calls == pytest.approx(ramp, rel=0.5)  # still about the ramp asked for


def test_call_bounds() -> None:
    assert call_bounds(20.0, 0.5) == (10.0, 30.0)
    assert call_bounds(20.0, 0.0) == (20.0, 20.0)
    assert call_bounds(1.0, 0.9) == (0.5, 1.9)  # never shorter than half a second


# -- the generators' progress lines ---------------------------------------------------


def _rec(rtts: list[float], handshakes: list[float]) -> Recorder:
    rec = Recorder()
    for i, r in enumerate(rtts):
        rec.sent_t.append(float(i))
        rec.recv_t.append(float(i) + r / 1000)
        rec.rtt_ms.append(r)
    rec.handshake_ms.extend(handshakes)
    rec.handshake_t.extend(range(len(handshakes)))
    rec.established = len(handshakes)
    return rec


def test_progress_keeps_the_records_and_reports_only_new_round_trips() -> None:
    rec = _rec([1.0, 2.0], [5.0])
    prog = Progress(rec, keep=True)
    first = prog.line()
    assert (first["sent"], first["recv"], first["established"]) == (2, 2, 1)
    assert sum(first["rtt_hist"].values()) == 2 and sum(first["hs_hist"].values()) == 1
    rec.sent_t.append(9.0)
    rec.recv_t.append(9.001)
    rec.rtt_ms.append(1.0)
    second = prog.line(done=True)
    assert second["done"] and (second["sent"], second["recv"]) == (3, 3)
    assert second["rtt_hist"] == histogram([1.0]) and second["hs_hist"] == {}
    assert len(rec.rtt_ms) == 3  # kept for the pickle the orchestrator reads


def test_progress_folds_and_drops_the_arrays_of_a_long_run() -> None:
    rec = _rec([1.0, 2.0, 3.0], [5.0, 6.0])
    prog = Progress(rec, keep=False)
    first = prog.line()
    assert (first["sent"], first["recv"]) == (3, 3)
    assert sum(first["rtt_hist"].values()) == 3
    assert not rec.sent_t and not rec.recv_t and not rec.rtt_ms and not rec.handshake_ms
    rec.sent_t.append(10.0)
    second = prog.line()
    assert (second["sent"], second["recv"]) == (4, 3)  # counts carry on over the folds
    assert second["rtt_hist"] == {} and second["hs_hist"] == {}


def _line(t: float, **counts: Any) -> dict[str, Any]:
    return {"t": t, "done": False, **counts}


def test_generators_read_lines_totals_windows_and_takes() -> None:
    gens = Generators([], [])
    gens.read_line(1, _line(1.0, established=3, sent=10, errors={"x": 1}, rtt_hist={"10": 4}))
    gens.read_line(2, _line(1.2, established=2, sent=5, errors={"x": 2, "y": 1}))
    gens.read_line(1, _line(2.0, established=4, sent=20, rtt_hist={"50": 1}, hs_hist={"30": 2}))
    assert gens.total("established") == 6  # each process's latest line, summed
    assert gens.total("sent") == 25
    assert gens.merged("errors") == {"x": 2, "y": 1}  # process 1's latest has none
    assert gens.rtt_percentile(0.0, 1.5, 99) == round(bucket_upper(10), 3)
    assert gens.rtt_percentile(1.0, 2.0, 99) == round(bucket_upper(50), 3)  # (start, end]
    assert gens.rtt_percentile(2.0, 9.0, 50) is None
    assert gens.hs_percentile(0.0, 9.0, 50) == round(bucket_upper(30), 3)
    assert merged_percentile([gens, gens], 0.0, 9.0, 50) == round(bucket_upper(10), 3)
    assert gens.take_hists() == ({10: 4, 50: 1}, {30: 2})
    assert gens.take_hists() == ({}, {})  # taken once
    assert gens.rtt_all == {10: 4, 50: 1} and gens.hs_all == {30: 2}  # the run's totals stay
    gens.read_line(2, _line(3.0, done=True, established=2, sent=6))
    assert set(gens.done) == {2} and gens.total("sent") == 26


# -- the ramp --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxy", "host", "why"),
    [
        (0.95, 1.0, "the proxy was saturated"),
        (0.5, 1.9, "the host was saturated"),
        (0.5, 1.5, "the host was heavily loaded"),
        (0.5, 1.0, "neither host nor proxy saturated"),
    ],
)
def test_why_a_ramp_level_went_over(proxy: float, host: float, why: str) -> None:
    assert why_over(proxy, host, nproc=2) == why


# -- the soak's verdict ----------------------------------------------------------------

DURATION = 600.0
BASE_RSS, BASE_FDS = 100_000, 30


def _rows(
    rss: Any = lambda t: 150_000,
    excess: Any = lambda t: 0,
    active: int = 200,
    every: float = 10.0,
) -> list[dict[str, Any]]:
    """Run samples every ``every`` s over DURATION; RSS and fd excess as functions of t."""
    rows = []
    n = int(DURATION / every)
    for i in range(1, n + 1):
        t = i * every
        rows.append(
            {
                "phase": "run",
                "t_s": t,
                "rss_kib": rss(t),
                "fds": BASE_FDS + 2 * active + excess(t),
                "fd_excess": excess(t),
                "active_calls": active,
                "active_calls_ingress": active,
                "calls_started": int(t * 10),
            }
        )
    return rows


def _base() -> dict[str, Any]:
    return {"phase": "baseline", "t_s": 0.0, "rss_kib": BASE_RSS, "fds": BASE_FDS, "fd_excess": 0}


def _after(fds: int = BASE_FDS) -> dict[str, Any]:
    return {"phase": "after", "t_s": DURATION + 5, "rss_kib": 150_000, "fds": fds}


def _judge(
    rows: list[dict[str, Any]] | None = None,
    after: dict[str, Any] | None = None,
    totals: dict[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    rows = _rows() if rows is None else rows
    return judge(
        [_base(), *rows],
        _base(),
        _after() if after is None else after,
        totals or {},
        duration=DURATION,
        rss_tolerance_pct=kw.get("rss_tolerance_pct", 5.0),
        fd_slack=kw.get("fd_slack", 16),
    )


def test_verdict_flat_run_passes() -> None:
    v = _judge()
    assert v["passed"] and v["flat"] and not v["reasons"]
    assert v["rss_flat"] and v["fds_flat"] and v["fds_back_to_baseline"]
    assert v["rss_growth_pct_q4_vs_q2"] == 0.0
    assert v["rss_slope_kib_per_min_after_warm_up"] == 0.0
    assert v["warm_up_s"] == 150.0
    assert v["fd_excess_max_after_warm_up"] == 0


def test_verdict_ignores_growth_during_warm_up() -> None:
    # Fills its pools in the first quarter (150 s), then flat: not a leak.
    v = _judge(_rows(rss=lambda t: 100_000 + 500 * min(t, 120)))
    assert v["passed"] and v["rss_flat"], v["reasons"]
    assert v["rss_slope_kib_per_min_whole_run"] > 0  # reported, not judged


def test_verdict_rss_growth_within_tolerance_passes() -> None:
    v = _judge(_rows(rss=lambda t: 150_000 + 5 * t))  # 3000 KiB over the run: 2 %
    assert v["passed"] and v["rss_flat"]
    assert 0 < v["rss_growth_pct_q4_vs_q2"] <= 5.0
    assert v["rss_bytes_per_call_if_leak"] > 0


@pytest.mark.parametrize(
    ("rss", "tolerance"),
    [
        (lambda t: 150_000 + 30 * t, 5.0),  # 18 MiB over ten minutes: a leak
        (lambda t: 150_000 + 5 * t, 1.0),  # a small growth, a strict tolerance
        (lambda t: 150_000 if t < 450 else 170_000, 5.0),  # a step in the last quarter
        # Each test alone: last quarter's mean within 5 % of the second's (1.25 %) but
        # climbing steeply (7.5 % by slope) ...
        (
            lambda t: 150_000 if t <= 300 else 140_000 if t <= 450 else 110_000 + (t - 450) * 533,
            5.0,
        ),
        # ... and 6.7 % over by quarter means, though the slope says 4.7 %.
        (
            lambda t: 150_000 if t <= 300 else 185_000 if t <= 450 else 185_000 - (t - 450) * 333,
            5.0,
        ),
    ],
)
def test_verdict_rss_growth_beyond_tolerance_fails(rss: Any, tolerance: float) -> None:
    v = _judge(_rows(rss=rss), rss_tolerance_pct=tolerance)
    assert not v["passed"] and not v["flat"] and not v["rss_flat"]
    assert v["fds_flat"] and v["fds_back_to_baseline"]
    assert any(r.startswith("RSS grew") for r in v["reasons"]), v["reasons"]


def test_verdict_descriptor_leak_fails_by_drift() -> None:
    # One more descriptor every 20 s: 30 by the end, yet never above a slack of 40.
    v = _judge(_rows(excess=lambda t: int(t // 20)), fd_slack=40)
    assert not v["passed"] and not v["fds_flat"] and v["rss_flat"]
    assert v["fd_excess_drift_q4_vs_q2"] > FD_DRIFT
    assert any("grew by" in r for r in v["reasons"]), v["reasons"]


def test_verdict_descriptors_over_slack_fail() -> None:
    v = _judge(_rows(excess=lambda t: 20 if t == 300 else 0), fd_slack=16)
    assert not v["passed"] and not v["fds_flat"]
    assert v["fd_excess_max_after_warm_up"] == 20
    assert any("20 over baseline" in r and "(allowed 16)" in r for r in v["reasons"])


def test_verdict_descriptor_excess_before_warm_up_is_not_judged() -> None:
    v = _judge(_rows(excess=lambda t: 50 if t < 100 else 0))
    assert v["passed"] and v["fds_flat"]


@pytest.mark.parametrize(
    ("after", "back"),
    [
        (_after(BASE_FDS), True),
        (_after(BASE_FDS + FD_SLACK_IDLE), True),
        (_after(BASE_FDS + FD_SLACK_IDLE + 1), False),  # a descriptor left behind
        ({"phase": "after", "t_s": 605.0, "rss_kib": 1, "fds": None}, False),  # ingress gone
    ],
)
def test_verdict_descriptors_back_to_baseline(after: dict[str, Any], back: bool) -> None:
    v = _judge(after=after)
    assert v["fds_back_to_baseline"] is back
    assert v["passed"] is back and v["flat"] is back
    if not back:
        assert any(r.startswith("descriptors after every call closed") for r in v["reasons"])


def test_verdict_without_an_after_sample_fails() -> None:
    rows = _rows()
    v = judge(
        [_base(), *rows], _base(), None, {}, duration=DURATION, rss_tolerance_pct=5, fd_slack=16
    )
    assert not v["passed"] and not v["fds_back_to_baseline"]


@pytest.mark.parametrize(
    ("totals", "reason"),
    [
        ({"failed": 1}, "1 calls failed"),
        ({"lost": 3}, "3 frames lost"),
        ({"corrupt": 2}, "2 frames corrupt"),
        ({"cut": 1}, "1 calls not closed in time at the end (aborted)"),
        ({"failed": 0, "lost": 0, "corrupt": 0, "cut": 0}, None),
    ],
)
def test_verdict_any_failed_call_or_lost_frame_fails(
    totals: dict[str, int], reason: str | None
) -> None:
    v = _judge(totals=totals)
    assert v["flat"]  # memory and descriptors were fine: the calls were not
    if reason is None:
        assert v["passed"] and not v["reasons"]
    else:
        assert not v["passed"] and v["reasons"] == [reason]


def test_verdict_too_few_samples() -> None:
    v = _judge(_rows()[:3])  # all in the first quarter
    assert not v["passed"] and not v["rss_flat"]
    assert "too few samples to judge RSS" in v["reasons"]
    assert "too few samples to judge descriptors" in v["reasons"]


# -- results already written -------------------------------------------------------------


# The scenarios the harness renders; other tools' results (hostile, head cost,
# overshoot) have their own shapes.
HARNESS_SCENARIOS = {"steady", "idle", "churn", "ramp", "soak"}


def _results(scenario: str | None = None) -> list[Path]:
    out = []
    for path in sorted(RESULTS.glob("*/results.json")):
        rep = json.loads(path.read_text())
        written = rep.get("scenario") if isinstance(rep, dict) else None
        if written not in HARNESS_SCENARIOS:
            continue
        if scenario is None or (written == "soak") == (scenario == "soak"):
            out.append(path)
    return out


@pytest.mark.parametrize("path", _results("soak"), ids=lambda p: p.parent.name)
def test_stored_soaks_judge_and_render_as_written(path: Path) -> None:
    rep = json.loads(path.read_text())
    rows, p, s = rep["samples"], rep["params"], rep["summary"]
    totals = {
        "failed": s["calls_failed"],
        "lost": s["lost_frames"],
        "corrupt": s["corrupt_frames"],
        "cut": s["calls_cut_at_end"],
    }
    base = next(r for r in rows if r["phase"] == "baseline")
    after = next((r for r in reversed(rows) if r["phase"] == "after"), None)
    verdict = judge(
        rows,
        base,
        after,
        totals,
        duration=p["minutes"] * 60,
        rss_tolerance_pct=p["rss_tolerance_pct"],
        fd_slack=p["fd_slack"],
    )
    assert verdict == rep["verdict"]
    assert soak.markdown(rep) == path.with_name("results.md").read_text()


@pytest.mark.parametrize("path", _results("bench"), ids=lambda p: p.parent.name)
def test_stored_runs_summarize_and_render_as_written(path: Path) -> None:
    rep = json.loads(path.read_text())
    if rep["scenario"] == "ramp":
        assert ramp_summary(rep) == rep["ramp_summary"]
    else:
        again = report.summarize_rounds(rep["scenario"], rep["rounds"])
        assert json.loads(json.dumps(again)) == {
            "summary": rep["summary"],
            "ratios": rep["ratios"],
        }
        assert report.targets_check(rep["scenario"], rep) == rep["targets_check"]
    assert report.markdown(rep) == path.with_name("results.md").read_text()


def test_every_stored_result_is_read() -> None:
    assert len(_results("soak")) >= 2 and len(_results("bench")) >= 20
