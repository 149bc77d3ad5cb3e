"""The bench's pure parts, without a process or a socket: statistics, the generators'
progress lines, the ramp's and the soak's verdicts, and the results already in
bench/results/ (still read, judged and rendered as they were written)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import tomllib
from array import array
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from bench import strace_stages
from bench.__main__ import check_targets, parse_args, parse_variants, ramp_summary
from bench.harness import callgrind, procfs, profile, report, targets
from bench.harness.carrier import Recorder
from bench.harness.children import REPO
from bench.harness.generator import Generators, Progress, call_bounds, merged_percentile
from bench.harness.run import Memory, Sample, cores_by_role, process_roles
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
from bench.harness.tlsfiles import TLSFiles
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
        again = json.loads(json.dumps(report.summarize_rounds(rep["scenario"], rep["rounds"])))
        # Runs stored before a key was added (cpu_by_process, the controlled CPU
        # ratio) are checked on the keys they have.
        for name, per_key in again["ratios"].items():
            if report.CONTROLLED not in rep["ratios"].get(name, {}):
                per_key.pop(report.CONTROLLED, None)
        assert {"summary", "ratios"} <= again.keys()
        assert again == {key: rep[key] for key in again if key in rep}
        assert {key for key in again if key not in rep} <= {"cpu_by_process"}
        assert report.targets_check(rep["scenario"], rep) == rep["targets_check"]
    assert report.markdown(rep) == path.with_name("results.md").read_text()


def test_every_stored_result_is_read() -> None:
    assert len(_results("soak")) >= 2 and len(_results("bench")) >= 20


# -- targets: built-in variants, rendered settings -------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ingress@w1", {"ingress_workers": 1}),
        ("ingress@w2", {"ingress_workers": 2}),
        ("ingress@w16", {"ingress_workers": 16}),
        ("haproxy@nt2", {"haproxy_nbthread": 2}),
        ("ingress@w2pin", {"ingress_workers": 2, "ingress_pinned": True}),
        ("haproxy@nt2pin", {"haproxy_nbthread": 2, "haproxy_pinned": True}),
        ("ingress@pin", None),
        ("ingress@w2pinned", None),
        ("ingress", None),
        ("ingress@w0", None),
        ("ingress@w", None),
        ("ingress@nt2", None),  # threads are HAProxy's
        ("haproxy@w2", None),  # workers are fleet-ingress's
        ("ingress@base", None),  # an environment variant (--variant base:...)
        ("bare@w2", None),
    ],
)
def test_builtin_variants(name: str, expected: dict[str, object] | None) -> None:
    assert targets.builtin_variant(name) == expected


def test_a_builtin_variant_changes_its_setting_only() -> None:
    run = targets.Settings(maxconn=80, haproxy_nbthread=1, ingress_workers=1)
    assert targets.target_settings("ingress@w2", run) == replace(run, ingress_workers=2)
    assert targets.target_settings("haproxy@nt2", run) == replace(run, haproxy_nbthread=2)
    assert targets.target_settings("ingress@w2pin", run) == replace(
        run, ingress_workers=2, ingress_pinned=True
    )
    assert targets.target_settings("ingress@base", run) is run
    assert targets.target_settings("haproxy", run) is run


@pytest.mark.parametrize(("workers", "expected"), [(1, 1), (2, 2), ("auto", "auto")])
def test_rendered_ingress_runs_the_workers_asked(
    tmp_path: Path, workers: int | str, expected: int | str
) -> None:
    tls = TLSFiles.at(tmp_path)
    settings = targets.target_settings("ingress", targets.Settings(ingress_workers=workers))
    path = targets.render_ingress(settings, tls, 4000, [4001, 4002], tmp_path)
    config = tomllib.loads(path.read_text())
    assert config["process"] == {"workers": expected}
    assert config["tls"]["ca_file"] == str(tls.ca)


def test_rendered_haproxy_runs_the_threads_asked(tmp_path: Path) -> None:
    settings = targets.target_settings("haproxy@nt2", targets.Settings())
    text = targets.render_haproxy(settings, TLSFiles.at(tmp_path), 4000, [4001], tmp_path)
    assert "\n    nbthread 2\n" in text.read_text()
    assert "cpu-map" not in text.read_text()


def test_pinned_variants_render_a_cpu_per_worker_or_thread(tmp_path: Path) -> None:
    tls = TLSFiles.at(tmp_path)
    ingress = targets.target_settings("ingress@w2pin", targets.Settings())
    config = tomllib.loads(targets.render_ingress(ingress, tls, 4000, [4001], tmp_path).read_text())
    assert config["process"] == {"workers": 2, "cpu_affinity": "auto"}
    haproxy = targets.target_settings("haproxy@nt2pin", targets.Settings())
    text = targets.render_haproxy(haproxy, tls, 4000, [4001], tmp_path).read_text()
    cpus = sorted(os.sched_getaffinity(0))
    assert f"    cpu-map 1/1 {cpus[0]}\n" in text
    assert f"    cpu-map 1/2 {cpus[1 % len(cpus)]}\n" in text


def test_splice_command_lines_give_maxconn_to_the_lean_floor_alone(tmp_path: Path) -> None:
    tls = TLSFiles.at(tmp_path)
    lean = targets.splice_argv("lean", 4000, tls, [4001, 4002], 7)
    assert Path(lean[1]).name == "lean_call_splice.py" and Path(lean[1]).exists()
    assert lean[2:] == [
        "--listen", "127.0.0.1:4000", "--cert", str(tls.server_cert), "--key",
        str(tls.server_key), "--ca", str(tls.ca), "--fleet", "127.0.0.1:4001",
        "--fleet", "127.0.0.1:4002", "--maxconn", "7",
    ]  # fmt: skip
    bare = targets.splice_argv("bare-bio", 4000, tls, [4001], 7)
    assert Path(bare[1]).name == "bare_bio_splice.py" and "--maxconn" not in bare
    check_targets(["lean", "lean@hand"], {"hand": {"LEAN_HAND": "1"}})


def test_variant_options_parse() -> None:
    assert parse_variants(["a:K=1", "a:L={repo}/x", "b:K=2=3"]) == {
        "a": {"K": "1", "L": f"{REPO}/x"},
        "b": {"K": "2=3"},
    }
    for bad in ("a", "a:K", ":K=1", "a:=1"):
        with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
            parse_variants([bad])


@pytest.mark.parametrize(
    ("names", "variants", "error"),
    [
        (["ingress@w1", "ingress@w2", "haproxy@nt1", "haproxy@nt2"], {}, None),
        (["direct", "ingress", "ingress@base", "haproxy"], {"base": {"K": "V"}}, None),
        (["ingress@w2"], {"w2": {"K": "V"}}, None),  # built in, plus an environment
        (["ingress@base"], {}, "no --variant base:KEY=VALUE"),
        (["haproxy@w2"], {}, "no --variant w2:KEY=VALUE"),
        (["nginx"], {}, "unknown target 'nginx'"),
        (["ingress@w1", "ingress@w1"], {}, "named twice"),
    ],
)
def test_target_lists_are_checked(
    names: list[str], variants: dict[str, dict[str, str]], error: str | None
) -> None:
    if error is None:
        check_targets(names, variants)
    else:
        with pytest.raises(ValueError, match=error):
            check_targets(names, variants)


def test_old_command_lines_still_parse() -> None:
    args = parse_args(
        ["steady", "--targets", "ingress,ingress@base,haproxy", "--variant", "base:A=1"]
    )
    assert args.targets == ["ingress", "ingress@base", "haproxy"]
    assert args.variants == {"base": {"A": "1"}}
    assert (args.ingress_workers, args.haproxy_nbthread) == (1, 1)
    args = parse_args(["churn", "--targets", "ingress@w1,ingress@w2", "--ingress-workers", "auto"])
    assert args.ingress_workers == "auto" and args.variants == {}
    with pytest.raises(SystemExit):
        parse_args(["churn", "--ingress-workers", "0"])


def test_notify_ready_reads_one_datagram() -> None:
    assert targets.notify_ready(b"READY=1\nSTATUS=serving\nMAINPID=7")
    assert targets.notify_ready(b"STATUS=x\nREADY=1")
    assert not targets.notify_ready(b"STATUS=READY=1 soon")
    assert not targets.notify_ready(b"RELOADING=1")


# -- a process tree in a made-up /proc ---------------------------------------------------


def _proc(
    root: Path,
    pid: int,
    ppid: int,
    ticks: tuple[int, int],
    rss: int,
    comm: str = "python",
    fds: int = 0,
    threads: dict[int, tuple[int, int]] | None = None,
    argv: tuple[str, ...] = (),
    smaps: dict[str, int] | None = None,
) -> None:
    """/proc/PID as procfs reads it: stat (fields 14, 15 = utime, stime), status, fd/,
    task/TID/stat, cmdline, smaps, io."""
    d = root / str(pid)
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(ticks[0]), str(ticks[1])] + ["0"] * 30
    (d / "fd").mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "status").write_text(f"Name:\t{comm}\nVmRSS:\t{rss} kB\n")
    for i in range(fds):
        (d / "fd" / str(i)).write_text("")
    for tid, (u, s) in (threads or {pid: ticks}).items():
        (d / "task" / str(tid)).mkdir(parents=True)
        tf = ["S", str(ppid)] + ["0"] * 9 + [str(u), str(s)] + ["0"] * 30
        (d / "task" / str(tid) / "stat").write_text(f"{tid} ({comm}) " + " ".join(tf) + "\n")
        (d / "task" / str(tid) / "status").write_text(
            f"Name:\t{comm}\nvoluntary_ctxt_switches:\t{7 + u}\nnonvoluntary_ctxt_switches:\t99\n"
        )
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    maps = "".join(
        f"7f00{i:04x}000-7f00{i:04x}fff rw-p 00000000 00:00 0 {name}\nRss: {kib} kB\n"
        for i, (name, kib) in enumerate((smaps or {}).items())
    )
    (d / "smaps").write_text(maps)
    (d / "io").write_text("syscr: 10\nsyscw: 5\n")


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    """A supervisor (100) with two workers (102, 101), one worker's helper (103), and
    processes outside the tree (1, and 200 whose parent is 1)."""
    tick = procfs.CLK_TCK
    py = ("python", "-m", "fleet_ingress")
    _proc(tmp_path, 1, 0, (5 * tick, 0), 1000, comm="init")
    _proc(
        tmp_path,
        100,
        1,
        (tick, tick),
        60000,
        fds=6,
        argv=(*py, "run", "-c", "x"),
        smaps={"[heap]": 100, "/usr/lib/libssl.so": 50},
    )
    _proc(
        tmp_path,
        101,
        100,
        (3 * tick, tick),
        62000,
        fds=10,
        argv=(*py, "worker", "-c", "x"),
        smaps={"[heap]": 300, "": 40},
    )
    _proc(
        tmp_path,
        102,
        100,
        (6 * tick, 2 * tick),
        63000,
        fds=12,
        argv=(*py, "worker", "-c", "x"),
        smaps={"[heap]": 200},
    )
    _proc(tmp_path, 103, 101, (tick, 0), 1000, comm="helper", fds=1)
    _proc(tmp_path, 200, 1, (9 * tick, 0), 5000, comm="other")
    (tmp_path / "self").mkdir()  # not a pid: ignored
    return tmp_path


def test_the_tree_is_the_supervisor_and_every_descendant(fake_proc: Path) -> None:
    assert procfs.descendants(100, fake_proc) == [100, 101, 102, 103]
    assert procfs.descendants(102, fake_proc) == [102]
    assert procfs.tree_cpu_by_process(100, fake_proc) == {100: 2.0, 101: 4.0, 102: 8.0, 103: 1.0}
    assert procfs.tree_cpu_seconds(100, fake_proc) == 15.0  # not init's, not 200's
    assert procfs.tree_rss_kib(100, fake_proc) == 60000 + 62000 + 63000 + 1000
    assert procfs.tree_fd_count(100, fake_proc) == 6 + 10 + 12 + 1
    assert procfs.tree_io_syscalls(100, fake_proc) == 4 * 15
    # Voluntary switches of every thread (7 + its utime ticks here), not the involuntary ones.
    tick = procfs.CLK_TCK
    assert procfs.tree_sleeps(100, fake_proc) == 4 * 7 + (1 + 3 + 6 + 1) * tick
    assert procfs.tree_rss_by_mapping(100, fake_proc) == {
        "[heap]": 600,
        "libssl": 50,
        "anon-mmap": 40,
    }


def test_context_switches_are_both_kinds_summed_over_threads(tmp_path: Path) -> None:
    # bench/workers_count.py reads both per phase; procfs.sleeps is the first.
    _proc(tmp_path, 300, 1, (0, 0), 1000, threads={300: (2, 0), 301: (5, 0)})
    assert procfs.context_switches(300, tmp_path) == ((7 + 2) + (7 + 5), 99 + 99)
    assert procfs.sleeps(300, tmp_path) == (7 + 2) + (7 + 5)
    assert procfs.context_switches(999, tmp_path) == (0, 0)


def test_a_gone_process_counts_nothing(fake_proc: Path) -> None:
    assert procfs.tree_cpu_seconds(999, fake_proc) == 0.0
    assert procfs.tree_rss_kib(999, fake_proc) == 0
    assert procfs.tree_fd_count(999, fake_proc) is None
    assert procfs.thread_cpu_seconds(999, fake_proc) == {}
    assert procfs.cmdline(999, fake_proc) == []


# An excerpt of a worker's /proc/PID/smaps as Linux 6 writes it: each mapping's header
# then its counters; a library in several mappings, a path with a space, a deleted file.
SMAPS = """\
55d0a0000000-55d0a0001000 r--p 00000000 fe:01 1234    /root/.pyenv/versions/3.11.7/bin/python3.11
Size:                  4 kB
Rss:                   4 kB
Pss:                   2 kB
VmFlags: rd mr mw me dw sd
55d0a1000000-55d0a9000000 rw-p 00000000 00:00 0                          [heap]
Size:             131072 kB
Rss:               34000 kB
Private_Dirty:     34000 kB
VmFlags: rd wr mr mw me ac sd
7f1000000000-7f1000400000 rw-p 00000000 00:00 0 \n\
Size:               4096 kB
Rss:                3000 kB
VmFlags: rd wr mr mw me ac sd
7f1000400000-7f1000500000 rw-p 00000000 00:00 0
Rss:                 600 kB
7f1100000000-7f1100100000 r--p 00000000 fe:01 77 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
Rss:                1500 kB
7f1100100000-7f1100200000 r-xp 00100000 fe:01 77 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
Rss:                1400 kB
7f1100200000-7f1100210000 rw-p 00200000 fe:01 77 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
Rss:                  40 kB
7f1200000000-7f1200010000 r-xp 00000000 fe:01 78 /usr/lib/x86_64-linux-gnu/libssl.so.3
Rss:                 240 kB
7f1300000000-7f1300010000 r-xp 00000000 fe:01 79 /w/site-packages/uvloop/loop.cpython-311.so
Rss:                 800 kB
7f1400000000-7f1400010000 r-xp 00000000 fe:01 80 /p/lib-dynload/_ssl.cpython-311.so
Rss:                  60 kB
7f1500000000-7f1500010000 r-xp 00000000 fe:01 81 /p/lib/libpython3.11.so.1.0
Rss:                5000 kB
7f1600000000-7f1600001000 rw-s 00000000 00:01 82 /dev/shm/a name with spaces (deleted)
Rss:                   4 kB
7f1700000000-7f1700010000 r-xp 00000000 fe:01 83 /usr/lib/x86_64-linux-gnu/libz.so.1.2.13
Rss:                  88 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  36 kB
"""


def test_smaps_is_read_mapping_by_mapping_and_grouped_by_kind(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "smaps").write_text(SMAPS)
    lib = "/usr/lib/x86_64-linux-gnu/"
    assert procfs.smaps_rss(7, tmp_path) == {
        "/root/.pyenv/versions/3.11.7/bin/python3.11": 4,
        "[heap]": 34000,
        "": 3600,  # two anonymous mmaps, one header with a trailing blank
        lib + "libcrypto.so.3": 2940,
        lib + "libssl.so.3": 240,
        "/w/site-packages/uvloop/loop.cpython-311.so": 800,
        "/p/lib-dynload/_ssl.cpython-311.so": 60,
        "/p/lib/libpython3.11.so.1.0": 5000,
        "/dev/shm/a name with spaces (deleted)": 4,
        lib + "libz.so.1.2.13": 88,
        "[stack]": 36,
    }
    assert procfs.rss_by_mapping(7, tmp_path) == {
        "python": 5064,
        "[heap]": 34000,
        "anon-mmap": 3600,
        "libcrypto": 2940,
        "libssl": 240,
        "uvloop": 800,
        "other file": 4,
        "other .so": 88,
        "[stack]": 36,
    }
    assert procfs.smaps_rss(8, tmp_path) == {} == procfs.rss_by_mapping(8, tmp_path)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("", "anon-mmap"),
        ("[heap]", "[heap]"),
        ("[anon:glibc malloc]", "[anon:glibc malloc]"),
        ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "libssl"),
        ("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", "libcrypto"),
        ("/usr/sbin/haproxy", "haproxy"),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", "libc"),
        ("/usr/local/bin/python3.11", "python"),
        ("/x/site-packages/uvloop/loop.cpython-311-x86_64-linux-gnu.so (deleted)", "uvloop"),
        ("/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0.11.2", "other .so"),
        ("/usr/lib/locale/C.utf8/LC_CTYPE", "other file"),
    ],
)
def test_mapping_kinds(name: str, kind: str) -> None:
    assert procfs.mapping_kind(name) == kind


def test_the_memory_probe_reads_mappings_as_the_harness_does() -> None:
    # bench/memhook runs inside the target with only its own directory on the path: it
    # loads procfs by file, so its snapshots name the same kinds as the harness's.
    by_kind = _memhook_probe()._rss_by_mapping()
    assert by_kind.keys() == procfs.rss_by_mapping(os.getpid()).keys()
    assert "python" in by_kind and "[heap]" in by_kind and "file" not in by_kind


def _memhook_probe() -> Any:
    spec = importlib.util.spec_from_file_location(
        "memhook_probe", REPO / "bench" / "memhook" / "sitecustomize.py"
    )
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


@pytest.mark.parametrize(
    ("argv", "process", "probed"),
    [
        (["-m", "run", "-c", "x.toml"], None, False),
        (["-m", "worker", "-c", "x.toml"], None, True),
        (["-m", "worker", "-c", "x.toml"], "worker", True),
        (["-m", "run", "-c", "x.toml"], "supervisor", True),
        (["-m", "worker", "-c", "x.toml"], "supervisor", False),
        (["bench/bare_splice.py", "--listen", "x"], None, True),
    ],
)
def test_the_memory_probe_answers_from_one_process(
    argv: list[str], process: str | None, probed: bool
) -> None:
    assert _memhook_probe().probed(argv, process) is probed


def test_memory_per_call_reads_a_trace_started_at_the_baseline(tmp_path: Path) -> None:
    # The probe starts tracemalloc once the baseline is written: there is no
    # baseline.snapshot, and the calls' snapshot holds what came after it.
    import tracemalloc

    from bench.harness import memory

    tracemalloc.start(1)
    try:
        kept = [bytearray(2048) for _ in range(400)]
        tracemalloc.take_snapshot().dump(str(tmp_path / "calls.snapshot"))
    finally:
        tracemalloc.stop()
    snap = {
        "mallinfo2": dict.fromkeys(("uordblks", "hblkhd", "arena", "fordblks"), 0),
        "rss_kib_by_mapping": {"[heap]": 100},
        "gc_objects_by_type": {},
    }
    out = memory.per_call(snap, snap, len(kept), tmp_path)
    assert out["tracemalloc_kib_per_call"] >= 2.0
    top = out["tracemalloc_top_sites_per_call"][0]
    assert top["site"].endswith("test_bench_harness.py:" + str(_line_of("bytearray(2048)")))
    assert top["kib_per_call"] >= 2.0 and top["blocks_per_call"] == 2.0  # the object and its buffer


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line and "kept" in line)


def test_smaps_rollup_is_summed_over_the_tree(fake_proc: Path) -> None:
    for pid, rss in ((100, 60000), (101, 62000), (102, 63000)):
        (fake_proc / str(pid) / "smaps_rollup").write_text(
            "55d0a0000000-7ffd00021000 ---p 00000000 00:00 0                          [rollup]\n"
            f"Rss:            {rss} kB\nPss:            {rss // 2} kB\n"
            "Anonymous:       1000 kB\nVmFlags: rd\n"
        )
    assert procfs.smaps_rollup(101, fake_proc) == {"Rss": 62000, "Pss": 31000, "Anonymous": 1000}
    # 103 has no smaps_rollup (gone meanwhile): it counts nothing.
    assert procfs.tree_smaps_rollup(100, fake_proc) == {
        "Rss": 185000,
        "Pss": 92500,
        "Anonymous": 3000,
    }


def test_threads_of_one_process(tmp_path: Path) -> None:
    tick = procfs.CLK_TCK
    _proc(
        tmp_path,
        50,
        1,
        (5 * tick, tick),
        20000,
        comm="haproxy",
        threads={50: (2 * tick, tick), 51: (3 * tick, 0)},
    )
    assert procfs.thread_cpu_seconds(50, tmp_path) == {50: 3.0, 51: 3.0}
    assert procfs.tree_cpu_seconds(50, tmp_path) == 6.0  # the process's stat has all threads


@pytest.mark.parametrize(
    ("kind", "argvs", "roles"),
    [
        (
            "ingress",
            [
                ["py", "-m", "fleet_ingress", "run"],
                ["py", "-m", "fleet_ingress", "worker"],
                ["py", "-m", "fleet_ingress", "worker"],
            ],
            ["supervisor", "worker 1", "worker 2"],
        ),
        ("ingress", [["py", "-m", "fleet_ingress", "run"]], ["supervisor"]),
        (
            "ingress",
            [["py", "run"], ["py", "worker"], ["sh", "-c", "x"], ["py", "worker"]],
            ["supervisor", "worker 1", "child 1", "worker 2"],
        ),
        ("haproxy", [["haproxy", "-db"], ["haproxy", "-db"]], ["haproxy", "child 1"]),
        ("bare", [["python", "bare_splice.py", "--worker"]], ["bare"]),
    ],
)
def test_process_roles(kind: str, argvs: list[list[str]], roles: list[str]) -> None:
    tree = [(10 + i, argv) for i, argv in enumerate(argvs)]
    assert list(process_roles(kind, tree).values()) == roles


def _sample(t: float, parts: dict[int, float], roles: dict[int, str]) -> Sample:
    return Sample(t, sum(parts.values()), 0.0, {}, 0.0, 0, {}, parts, roles)


def test_cores_by_role_over_a_window() -> None:
    roles = {1: "supervisor", 2: "worker 1", 3: "worker 2"}
    a = _sample(10.0, {1: 1.0, 2: 5.0, 3: 4.0}, roles)
    b = _sample(12.0, {1: 1.02, 2: 6.0, 3: 4.5}, roles)
    assert cores_by_role(a, b, 2.0) == {"supervisor": 0.01, "worker 1": 0.5, "worker 2": 0.25}
    # worker 2 replaced in the window by 4: the new one counts from zero, the old is gone
    c = _sample(12.0, {1: 1.02, 2: 6.0, 4: 0.3}, {1: "supervisor", 2: "worker 1", 4: "worker 2"})
    assert cores_by_role(a, c, 2.0) == {"supervisor": 0.01, "worker 1": 0.5, "worker 2": 0.15}


# -- the report: pairs, the workers' check, CPU by process ---------------------------------


@pytest.mark.parametrize(
    ("names", "pairs"),
    [
        (["direct", "ingress", "haproxy"], [("ingress", "haproxy")]),
        (
            ["ingress", "ingress@base", "haproxy"],
            [("ingress", "haproxy"), ("ingress@base", "ingress"), ("ingress@base", "haproxy")],
        ),
        (
            ["ingress@w1", "ingress@w2", "haproxy@nt1", "haproxy@nt2"],
            [
                ("ingress@w2", "ingress@w1"),
                ("ingress@w1", "haproxy@nt1"),
                ("ingress@w2", "haproxy@nt2"),
                ("haproxy@nt2", "haproxy@nt1"),
            ],
        ),
        (
            ["ingress@w1", "ingress@w2", "haproxy"],
            [("ingress@w1", "haproxy"), ("ingress@w2", "haproxy"), ("ingress@w2", "ingress@w1")],
        ),
        (  # the one-process floor: against HAProxy, and what the supervisor adds over it
            ["ingress@w1", "ingress1p", "haproxy"],
            [("ingress@w1", "haproxy"), ("ingress1p", "haproxy"), ("ingress@w1", "ingress1p")],
        ),
    ],
)
def test_ratio_pairs(names: list[str], pairs: list[tuple[str, str]]) -> None:
    assert sorted(report.ratio_pairs(names)) == sorted(pairs)


def _round(cpu: dict[str, float], key: str) -> dict[str, dict[str, Any]]:
    parts = {
        "ingress@w1": {"supervisor": 0.01, "worker 1": 0.3},
        "ingress@w2": {"supervisor": 0.01, "worker 1": 0.15, "worker 2": 0.16},
        "haproxy@nt2": {"thread 1": 0.1, "thread 2": 0.1},
    }
    return {
        t: {
            key: v,
            "loads": {
                "proxy_cores": sum(parts[t].values()),
                "proxy_cores_by_process": parts[t],
                "generator_cores": 0.2,
                "generator_max_process_cores": 0.2,
                "fleets_cores": 0.3,
                "harness_cores": 0.01,
            },
        }
        for t, v in cpu.items()
    }


@pytest.mark.parametrize(
    ("scenario", "key", "w2", "verdict"),
    [
        ("churn", "cpu_ms_per_call", [6.6, 7.0], "MET"),  # 1.1 at most
        ("churn", "cpu_ms_per_call", [7.2, 7.0], "MISSED"),  # one round 1.2
        ("steady", "cpu_s_per_1000_msgs", [0.02, 0.021], "MET"),
        ("steady", "cpu_s_per_1000_msgs", [0.03, 0.03], "MISSED"),
    ],
)
def test_workers_check_judges_every_round(
    scenario: str, key: str, w2: list[float], verdict: str
) -> None:
    w1 = [6.0, 7.0] if scenario == "churn" else [0.02, 0.02]
    rounds = [
        _round({"ingress@w1": a, "ingress@w2": b, "haproxy@nt2": a}, key)
        for a, b in zip(w1, w2, strict=True)
    ]
    rep: dict[str, Any] = {"params": {}}
    rep.update(report.summarize_rounds(scenario, rounds))
    (line,) = report.workers_check(scenario, rep)
    assert line.startswith(f"CPU per {'call' if scenario == 'churn' else 'message'} with 2 workers")
    assert line.endswith(verdict)


def test_the_controlled_ratio_takes_out_what_the_load_side_says_of_the_window() -> None:
    """The generator and the fleets do the same work in both windows: a window
    where their CPU per message is 10 % higher (a slower host then) explains
    10 % of the proxy's ratio."""
    rounds = [
        _round(
            {"ingress@w1": 0.020, "ingress@w2": 0.0242, "haproxy@nt2": 0.02}, "cpu_s_per_1000_msgs"
        )
    ]
    for target, r in rounds[0].items():
        r["msgs_window"] = 100_000
        slower = 1.1 if target == "ingress@w2" else 1.0
        r["loads"]["generator_cores"] *= slower
        r["loads"]["fleets_cores"] *= slower
    summary = report.summarize_rounds("steady", rounds)
    ratio = summary["ratios"]["ingress@w2/ingress@w1"]
    assert ratio["cpu_s_per_1000_msgs"]["median"] == 1.21
    assert ratio[report.CONTROLLED]["median"] == 1.1
    rep: dict[str, Any] = {"params": {}, **summary}
    (line,) = report.workers_check("steady", rep)
    assert line.endswith(
        "MISSED; over the load side's CPU per message in the same windows "
        "(cpu_controlled): 1.1 (rounds [1.1])"
    )
    # Without the work done in the window (a run stored before): none.
    del rounds[0]["ingress@w2"]["msgs_window"]
    again = report.summarize_rounds("steady", rounds)["ratios"]["ingress@w2/ingress@w1"]
    assert again[report.CONTROLLED]["median"] is None


def test_cpu_by_process_is_summarized_and_rendered() -> None:
    rounds = [
        _round({"ingress@w1": 6.0, "ingress@w2": 6.1, "haproxy@nt2": 4.0}, "cpu_ms_per_call")
        for _ in range(2)
    ]
    summary = report.summarize_rounds("churn", rounds)
    by = summary["cpu_by_process"]
    assert by["ingress@w2"]["proxy"]["worker 2"]["median"] == 0.16
    assert by["ingress@w2"]["load"]["harness_cores"]["median"] == 0.01
    table = "\n".join(report.by_process_table(by))
    assert "| fleet-ingress@w2 | supervisor 0.010, worker 1 0.150, worker 2 0.160 |" in table
    assert "| HAProxy@nt2 | thread 1 0.100, thread 2 0.100 |" in table
    # Results written before the split have no figures by process, and no table.
    for rnd in rounds:
        for r in rnd.values():
            del r["loads"]["proxy_cores_by_process"]
    assert "cpu_by_process" not in report.summarize_rounds("churn", rounds)


def test_memory_per_call_is_split_by_mapping_and_process_and_rendered() -> None:
    def result(heap: float, anon: float, worker: float) -> dict[str, Any]:
        return {
            "rss_kib_per_call": heap + anon,
            "rss_kib_per_call_by_mapping": {"[heap]": heap, "anon-mmap": anon},
            "rss_kib_per_call_by_process": {"worker 1": worker, "supervisor": 0.1},
            "smaps_rollup_kib_per_call": {"Rss": heap + anon, "Pss": 30.0, "Anonymous": 33.0},
        }

    rounds = [
        {"ingress@w1": result(28.0, 6.0, 33.9), "haproxy@nt1": result(40.0, 0.0, 40.0)},
        {"ingress@w1": result(29.0, 5.0, 33.9), "haproxy@nt1": result(42.0, 0.0, 42.0)},
        {"ingress@w1": result(30.0, 7.0, 36.9), "haproxy@nt1": result(41.0, 0.0, 41.0)},
    ]
    for r in rounds:  # HAProxy is one process: no supervisor, no anonymous mmaps
        hap = r["haproxy@nt1"]
        hap["rss_kib_per_call_by_process"] = {"haproxy": hap.pop("rss_kib_per_call")}
        del hap["rss_kib_per_call_by_mapping"]["anon-mmap"]
    split = report.summarize_rounds("idle", rounds)["memory_per_call"]
    assert split["ingress@w1"]["by_mapping"]["[heap]"]["median"] == 29.0
    assert split["ingress@w1"]["by_mapping"]["anon-mmap"]["values"] == [6.0, 5.0, 7.0]
    assert split["haproxy@nt1"]["by_process"]["haproxy"]["median"] == 41.0
    table = "\n".join(report.memory_table(split))
    assert "| target | [heap] | anon-mmap | by process | Pss | Anonymous |" in table
    assert (
        "| fleet-ingress@w1 | 29.0 (28.0-30.0) | 6.0 (5.0-7.0) | "
        "worker 1 33.9 (33.9-36.9), supervisor 0.1 | 30.0 | 33.0 |" in table
    )
    assert (
        "| HAProxy@nt1 | 41.0 (40.0-42.0) | - | haproxy 41.0 (40.0-42.0) | 30.0 | 33.0 |" in table
    )
    # Results written before the split have no figures by process, and no table.
    for r in rounds:
        for res in r.values():
            del res["rss_kib_per_call_by_process"]
    assert "memory_per_call" not in report.summarize_rounds("idle", rounds)
    assert report.memory_table({}) == []


def test_a_later_reading_divides_by_its_own_calls_over_the_same_baseline() -> None:
    mem = Memory(target=None, rss0=100_000, map0={}, hook=None)  # type: ignore[arg-type]
    assert mem.per_call_later(104_000, 100) == 40.0
    assert mem.per_call_later(104_000, 80) == 50.0  # calls gone by then: fewer to divide by
    assert mem.per_call_later(None, 100) is None
    assert mem.per_call_later(104_000, 0) is None
    # Shown as a column beside the first reading when the run has it, not for older runs.
    rounds = [
        {"ingress": {"rss_kib_per_call": 36.0, "rss_kib_per_call_end_of_window": v}}
        for v in (36.5, 37.5, 36.9)
    ]
    summary = report.summarize_rounds("steady", rounds)["summary"]["ingress"]
    assert summary["rss_kib_per_call_end_of_window"]["median"] == 36.9
    older = [{"ingress": {"rss_kib_per_call": 36.0}}]
    assert (
        "rss_kib_per_call_end_of_window"
        not in report.summarize_rounds("steady", older)["summary"]["ingress"]
    )


def test_system_call_counts_are_read_from_strace_and_from_perf_stat(tmp_path: Path) -> None:
    strace = tmp_path / "strace.txt"
    strace.write_text(
        "% time     seconds  usecs/call     calls    errors syscall\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        " 40.00    0.112772           6     18666        99 read\n"
        "  5.19    0.014644           5      2451      1226 epoll_ctl\n"
        "  0.39    0.001113          14        78           accept4\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        "100.00    0.281895           7     21195      1325 total\n"
    )
    perf = tmp_path / "perf.txt"
    perf.write_text(
        "# started on Sat Dec  5 16:53:26 2026\n\n"
        "0,,syscalls:sys_enter_mmap,14426113,100.00,,\n"
        "94,,syscalls:sys_enter_getpid,15507553,100.00,,\n"
        "<not counted>,,syscalls:sys_enter_iopl,0,100.00,,\n"
        "188,,syscalls:sys_enter_read,15507553,100.00,,\n"
    )
    assert profile.strace_counts(strace) == {
        "read": {"calls": 18666, "errors": 99},
        "epoll_ctl": {"calls": 2451, "errors": 1226},
        "accept4": {"calls": 78, "errors": 0},
    }
    assert profile.strace_counts(perf) == {
        "read": {"calls": 188, "errors": 0},
        "getpid": {"calls": 94, "errors": 0},
    }
    summary = profile.strace_summary({"worker 1": strace}, calls=78)
    assert summary["worker 1"]["per_call"]["accept4"] == 1.0
    assert summary["worker 1"]["per_call_total"] == round(21195 / 78, 1)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('read(15<TCP:[1]>, "\\27\\3\\3\\0\\31", 5) = 5', (0x17, 25)),
        ('read(15<TCP:[1]>, "\\27\\3\\3\\1E", 5) = 5', (0x17, 0x145)),
        ('write(17<TCP:[1]>, "\\24\\3\\3\\0\\1\\1\\27\\3\\3\\0E\\231"..., 80) = 80', (0x14, 1)),
        ('read(15<TCP:[1]>, "\\26\\3\\1\\2\\0", 5) = 5', None),  # a ClientHello's 3.1
        ("read(15<TCP:[1]>, 0x55fc9ce49e23, 5) = -1 EAGAIN", None),
    ],
)
def test_a_tls_record_header_is_read_from_an_strace_line(
    line: str, expected: tuple[int, int] | None
) -> None:
    assert strace_stages.record_header(line) == expected


def test_callgrind_annotate_rows_and_the_shared_object_of_each() -> None:
    """What the counting scripts read of callgrind_annotate (valgrind 3.19's layout)."""
    text = (
        "Events shown:     Ir\n"
        "--------------------------------------------------------------------------------\n"
        "3,336,890,729 (100.0%)  PROGRAM TOTALS\n"
        "\n"
        "Ir                    file:function\n"
        " 47,499,650 ( 1.42%)  ???:0x000000000029ad80 [/usr/lib/x86_64-linux-gnu/libcrypto.so.3]\n"
        "      1,702 ( 0.00%)  ./elf/dl-lookup.c:do_lookup_x\n"
    )
    rows = callgrind.rows(text)
    assert rows == [
        (3_336_890_729, "PROGRAM TOTALS"),
        (47_499_650, "???:0x000000000029ad80 [/usr/lib/x86_64-linux-gnu/libcrypto.so.3]"),
        (1_702, "./elf/dl-lookup.c:do_lookup_x"),
    ]
    assert [callgrind.shared_object(name) for _, name in rows] == ["???", "libcrypto.so.3", "???"]
    assert callgrind.argv("/tmp/x.%p", "--instr-atstart=no")[-1] == "--callgrind-out-file=/tmp/x.%p"
