"""The bench's session 46 parts, without a process or a socket: the ramp's steps to each
target's own limit and its verdict, the rounds' rotated order, the load side's CPU a
message and the proxy ratio controlled by the generator's."""

from __future__ import annotations

from typing import Any

import pytest
from bench.__main__ import parse_args, ramp_limits, round_order
from bench.harness import load_side, report
from bench.harness.ramp_steps import Add, Drop, RampSteps, Stop, interpolate

# -- the ramp's steps --------------------------------------------------------------------


def walk(steps: RampSteps, over_from: int) -> list[Any]:
    """Drive ``steps`` against a target whose every level of ``over_from`` calls or more is
    over the budget; the actions, bounded."""
    calls = steps.first()
    actions: list[Any] = []
    for _ in range(100):
        action = steps.judge(in_budget=calls < over_from)
        actions.append(action)
        if isinstance(action, Stop):
            return actions
        if isinstance(action, Drop):
            calls = calls - action.calls + action.then
        else:
            calls += action.calls
    raise AssertionError("the ramp never stopped")


def test_a_ramp_drops_the_level_over_and_climbs_to_the_edge_by_the_fine_step() -> None:
    steps = RampSteps(start=250, step=50, fine=10, cap=600)
    actions = walk(steps, over_from=383)
    assert actions == [
        *[Add(50)] * 3,  # 300, 350, 400: over
        Drop(50, then=10),  # back to 350, up to 360
        *[Add(10)] * 3,  # 370, 380, 390: over
        Stop("over"),
    ]
    assert (steps.limit, steps.first_over, steps.resolution) == (380, 390, 10)


def test_a_ramp_in_budget_to_the_edge_stops_one_fine_step_under_the_level_over() -> None:
    steps = RampSteps(start=250, step=50, fine=10, cap=600)
    actions = walk(steps, over_from=400)
    assert actions[-1] == Stop("edge")
    assert (steps.limit, steps.first_over, steps.resolution) == (390, 400, 10)


def test_a_ramp_that_never_goes_over_stops_at_the_cap_with_no_limit_found() -> None:
    steps = RampSteps(start=250, step=50, fine=10, cap=450)
    assert walk(steps, over_from=10_000)[-1] == Stop("cap")
    assert (steps.limit, steps.first_over, steps.resolution) == (450, None, None)


@pytest.mark.parametrize(
    ("fine", "over_from", "limit", "first_over"),
    [
        (0, 330, 300, 350),  # no fine step: the first level over ends it, as before
        (50, 330, 300, 350),  # a fine step no finer than the step: the same
        (10, 100, None, 250),  # over at the first level: nothing to climb back to
    ],
)
def test_a_ramp_stops_at_the_first_level_over_when_it_cannot_refine(
    fine: int, over_from: int, limit: int | None, first_over: int
) -> None:
    steps = RampSteps(start=250, step=50, fine=fine, cap=600)
    assert walk(steps, over_from)[-1] == Stop("over")
    assert (steps.limit, steps.first_over) == (limit, first_over)


def test_direct_round_trips_are_interpolated_between_its_levels() -> None:
    direct = {250: 1.0, 300: 2.0, 350: 4.0}
    assert interpolate(direct, 300) == 2.0
    assert interpolate(direct, 310) == 2.4
    assert interpolate(direct, 200) is None and interpolate(direct, 360) is None


# -- the ramp's verdict --------------------------------------------------------------------


def ramp_run(*rounds: dict[str, tuple[int | None, int | None]]) -> dict[str, Any]:
    """A ramp report with, per round and target, (limit, first level over)."""
    out = []
    for rnd in rounds:
        results = {}
        for t, (limit, over) in rnd.items():
            results[t] = {
                "levels": [],
                "stop_reason": "test",
                "limit": limit,
                "first_over": over,
                "resolution": None if limit is None or over is None else over - limit,
            }
        out.append(results)
    return {"rounds": out, "params": {"ramp_max": 450, "ramp_fine": 10}}


@pytest.mark.parametrize(
    ("ingress", "haproxy", "verdict"),
    [
        ((380, 390), (430, 440), "MISSED"),
        ((430, 440), (430, 440), "MET"),
        ((400, 410), (450, None), "MISSED"),  # HAProxy reached the cap, the ingress went over
        ((450, None), (450, None), "NOT KNOWN"),  # both at the cap: raise --ramp-max
        ((460, 470), (450, None), "NOT KNOWN"),  # HAProxy stopped short of the ingress's limit
        ((450, None), (410, 420), "MET"),
        ((None, 250), (None, 250), "NOT KNOWN"),  # both over at the first level
        ((None, 250), (250, 300), "MISSED"),
    ],
)
def test_the_ramp_point_is_judged_on_each_targets_own_limit(
    ingress: tuple[int, int | None], haproxy: tuple[int, int | None], verdict: str
) -> None:
    rep = ramp_run({"direct": (None, None), "ingress": ingress, "haproxy": haproxy})
    (line,) = report.ramp_check(rep)
    assert line.startswith("ramp: fleet-ingress in budget at least as far as HAProxy: round 1: ")
    assert line.endswith(f"-> {verdict}")


def test_a_missed_round_misses_the_ramp_point() -> None:
    rep = ramp_run(
        {"ingress": (430, 440), "haproxy": (430, 440)},
        {"ingress": (380, 390), "haproxy": (430, 440)},
    )
    (line,) = report.ramp_check(rep)
    assert "round 1: 430 (step 10) against 430 (step 10)" in line
    assert line.endswith("-> MISSED")


def test_the_ramp_summary_prints_each_limit_and_the_step_it_was_judged_at() -> None:
    rep = ramp_run({"ingress": (380, 390), "haproxy": (450, None)})
    assert ramp_limits(rep) == {
        "ingress (round 1)": "limit 380 calls (over at 390: judged at a step of 10); stopped: test",
        "haproxy (round 1)": "limit not found: in budget up to 450 calls (cap 450); stopped: test",
    }


# -- the rounds' order -------------------------------------------------------------------


def test_rounds_rotate_the_order_so_that_each_target_runs_first_once() -> None:
    targets = ["direct", "ingress", "haproxy"]
    orders = [round_order(targets, rnd, "steady") for rnd in range(3)]
    assert [o[0] for o in orders] == ["direct", "ingress", "haproxy"]
    assert all(sorted(o) == sorted(targets) for o in orders)
    assert round_order(["haproxy", "ingress"], 1, "steady") == ["ingress", "haproxy"]


def test_a_ramp_keeps_direct_first_and_rotates_the_rest() -> None:
    targets = ["direct", "ingress", "haproxy"]
    assert round_order(targets, 1, "ramp") == ["direct", "haproxy", "ingress"]


def test_the_header_says_the_order_was_rotated() -> None:
    rep = {"round_orders": [["haproxy", "ingress"], ["ingress", "haproxy"]]}
    assert report.round_order(rep) == (
        "targets interleaved, the order rotated each round "
        "(round 1: haproxy, ingress; round 2: ingress, haproxy)"
    )
    assert report.round_order({}) == "targets interleaved each round"  # runs stored before


def test_a_churn_with_no_window_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["churn", "--seconds", "2", "--call-seconds", "1"])
    assert parse_args(["churn", "--seconds", "4", "--call-seconds", "1"]).seconds == 4


# -- the load side's CPU a message -------------------------------------------------------


def steady_result(cpu_per_1000: float, gen_s: float, fleets_s: float) -> dict[str, Any]:
    return {
        "cpu_s_per_1000_msgs": cpu_per_1000,
        "msgs_window": 200_000,
        "loads": {
            "window_s": 20.0,
            "generator_cores": round(gen_s / 20, 3),
            "fleets_cores": round(fleets_s / 20, 3),
            "generator_cpu_s": gen_s,
            "fleets_cpu_s": fleets_s,
        },
    }


def test_the_generator_controlled_ratio_takes_out_the_hosts_speed_between_windows() -> None:
    """The ingress's window ran 5 % slower for the generator (its CPU a message 5 % up):
    of a raw 1.155, 1.1 is the ingress's own."""
    rnd = {
        "haproxy": steady_result(0.0170, gen_s=3.6, fleets_s=4.2),
        "ingress": steady_result(0.0170 * 1.155, gen_s=3.6 * 1.05, fleets_s=4.5),
    }
    assert load_side.us_per_msg(rnd["ingress"], "generator") == 18.9
    assert load_side.gen_controlled(rnd["ingress"], rnd["haproxy"]) == 1.1
    summary = report.summarize_rounds("steady", [rnd])
    ratio = summary["ratios"]["ingress/haproxy"]
    assert ratio["cpu_s_per_1000_msgs"]["median"] == 1.155
    assert ratio[load_side.GEN_CONTROLLED]["median"] == 1.1
    text = "\n".join(load_side.lines([rnd]))
    assert "| fleet-ingress | 18.90 / 22.50 |" in text
    assert "**controlled by the generator 1.1** (rounds [1.1])" in text


def test_the_unrounded_cpu_seconds_are_read_before_the_rounded_cores() -> None:
    result = steady_result(0.017, gen_s=3.6144, fleets_s=4.2)
    assert load_side.us_per_msg(result, "generator") == 18.072  # cores alone: 18.1
    del result["loads"]["generator_cpu_s"]
    assert load_side.us_per_msg(result, "generator") == 18.1


def test_runs_stored_before_get_no_generator_controlled_ratio() -> None:
    rnd = {
        "haproxy": steady_result(0.0170, gen_s=3.6, fleets_s=4.2),
        "ingress": steady_result(0.0190, gen_s=3.7, fleets_s=4.5),
    }
    for r in rnd.values():
        del r["loads"]["generator_cpu_s"], r["loads"]["fleets_cpu_s"]
    ratio = report.summarize_rounds("steady", [rnd])["ratios"]["ingress/haproxy"]
    assert load_side.GEN_CONTROLLED not in ratio


@pytest.mark.parametrize(
    ("targets", "pairs"),
    [
        (["direct", "ingress", "haproxy"], [("ingress", "haproxy")]),
        (
            ["ingress@w1", "ingress@w2", "haproxy@nt1", "haproxy@nt2"],
            [("ingress@w1", "haproxy@nt1"), ("ingress@w2", "haproxy@nt2")],
        ),
        (
            ["ingress", "ingress@base", "haproxy"],
            [("ingress", "haproxy"), ("ingress@base", "haproxy")],
        ),
        (["ingress", "bare-bio"], []),
    ],
)
def test_program_pairs(targets: list[str], pairs: list[tuple[str, str]]) -> None:
    assert load_side.program_pairs(targets) == pairs


@pytest.mark.parametrize(
    ("raw", "rounds", "verdict"),
    [
        (1.155, 3, "MISSED"),
        (1.04, 3, "MET"),
        (1.04, 2, "NOT JUDGED (2 rounds: #13 asks 3 or more)"),
    ],
)
def test_steady_is_judged_at_1_05x_on_the_median_with_the_controlled_reading_beside(
    raw: float, rounds: int, verdict: str
) -> None:
    runs = [
        {
            "haproxy": steady_result(0.0170, gen_s=3.6, fleets_s=4.2),
            "ingress": steady_result(0.0170 * raw, gen_s=3.6 * 1.05, fleets_s=4.5),
        }
        for _ in range(rounds)
    ]
    for rnd in runs:
        for r in rnd.values():
            r |= {"failed": 0, "lost_frames": 0, "rss_kib_per_call": 36.0}
    rep: dict[str, Any] = {
        "params": {"haproxy_nbthread": 1, "calls": 100, "profile": "twilio-like"}
    }
    rep.update(report.summarize_rounds("steady", runs))
    line = report.targets_check("steady", rep)[0]
    assert line.startswith(
        f"CPU per relayed message <= 1.05x HAProxy (nbthread 1) at 100 calls twilio-like, "
        f"median of {rounds} rounds: ingress/HAProxy = {raw} (rounds [{raw}"
    )
    ctl = round(raw / 1.05, 3)  # the generator 5 % slower a message in the ingress's windows
    assert line.endswith(
        f"-> {verdict}; controlled by the generator: {ctl} (rounds {[ctl] * rounds})"
    )


def test_the_tls_the_carriers_got_is_said_and_a_difference_flagged() -> None:
    rnd = {
        "haproxy": steady_result(0.0170, gen_s=3.6, fleets_s=4.2),
        "ingress": steady_result(0.0190, gen_s=3.7, fleets_s=4.5),
    }
    rnd["haproxy"]["tls"] = {"TLSv1.3 TLS_AES_256_GCM_SHA384": 100}
    rnd["ingress"]["tls"] = {"TLSv1.3 TLS_AES_256_GCM_SHA384": 100}
    text = "\n".join(load_side.lines([rnd]))
    assert (
        "TLS the carriers were given: HAProxy TLSv1.3 TLS_AES_256_GCM_SHA384 (100 calls); "
        "fleet-ingress TLSv1.3 TLS_AES_256_GCM_SHA384 (100 calls): the same behind every proxy."
    ) in text
    rnd["ingress"]["tls"] = {"TLSv1.3 TLS_AES_128_GCM_SHA256": 100}
    assert "the generators' work differs" in "\n".join(load_side.lines([rnd]))
