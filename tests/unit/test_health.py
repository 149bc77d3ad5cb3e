"""fall/rise over sequences of verdicts (issue #3 acceptance 2). No sockets."""

import pytest

from fleet_ingress.core.health import Health, observe

UP, DOWN, INIT = Health.UP, Health.DOWN, Health.INIT


def _run(seq: str, *, fall=2, rise=2, start=INIT) -> list[Health]:
    state, streak, states = start, 0, []
    for ch in seq:
        state, streak = observe(state, streak, ch == "P", fall=fall, rise=rise)
        states.append(state)
    return states


@pytest.mark.parametrize(
    ("seq", "start", "expected"),
    [
        ("P", INIT, [UP]),  # first pass at start: UP at once
        ("FP", INIT, [INIT, UP]),
        ("FF", INIT, [INIT, DOWN]),  # never healthy: DOWN after fall
        ("PFP", INIT, [UP, UP, UP]),  # one failing probe between passes stays UP
        ("PFF", INIT, [UP, UP, DOWN]),
        ("FPFPFPFP", UP, [UP] * 8),  # alternating never goes DOWN with fall 2
        ("FFPFP", UP, [UP, DOWN, DOWN, DOWN, DOWN]),  # alternating never comes UP with rise 2
        ("FFPP", UP, [UP, DOWN, DOWN, UP]),
        ("FFPPF", UP, [UP, DOWN, DOWN, UP, UP]),
        ("PPPP", DOWN, [DOWN, UP, UP, UP]),
        ("FFFF", DOWN, [DOWN] * 4),
    ],
)
def test_fall_2_rise_2(seq, start, expected):
    assert _run(seq, start=start) == expected


def test_fall_1_rise_3():
    assert _run("PFPPP", fall=1, rise=3) == [UP, DOWN, DOWN, DOWN, UP]


def test_streak_resets_on_a_change_and_on_an_opposite_verdict():
    assert observe(UP, 0, False, fall=3, rise=2) == (UP, 1)
    assert observe(UP, 1, True, fall=3, rise=2) == (UP, 0)
    assert observe(UP, 2, False, fall=3, rise=2) == (DOWN, 0)
    assert observe(DOWN, 1, True, fall=3, rise=2) == (UP, 0)


def test_fall_and_rise_must_be_positive():
    with pytest.raises(ValueError):
        observe(UP, 0, False, fall=0, rise=2)
