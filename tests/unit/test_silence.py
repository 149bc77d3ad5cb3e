"""Which call the silence sweep ends, and when: counters and `now` in, a verdict out. No sockets."""

import pytest

from fleet_ingress.core.silence import QuietWatch, Silence, SilenceLimits, SilencePolicy

# Defaults: timeouts.tunnel 3600, carrier_silence 30, fleet_silence off.
DEFAULT = SilenceLimits(idle=3600.0, carrier=30.0)
BOTH = SilenceLimits(idle=3600.0, carrier=30.0, fleet=10.0)
IDLE_ONLY = SilenceLimits(idle=5.0)  # a non-101 answer being relayed: timeouts.response


def _run(limits: SilenceLimits, sweeps: list[tuple[float, int, int, str]]) -> list[Silence | None]:
    """Each sweep: (now, bytes from carrier, bytes to carrier, held) with held one of
    "", "c" (carrier's reading paused by flow control), "f" (the fleet's)."""
    watch = QuietWatch.start(limits, 0, 0, now=0.0)
    return [
        watch.check(c, f, now, carrier_held="c" in held, fleet_held="f" in held)
        for now, c, f, held in sweeps
    ]


CARRIER, FLEET, IDLE = Silence.CARRIER, Silence.FLEET, Silence.IDLE


@pytest.mark.parametrize(
    ("limits", "sweeps", "verdicts"),
    [
        # A carrier streaming, the fleet answering: never ended.
        (DEFAULT, [(7.5 * i, 100 * i, 90 * i, "") for i in range(1, 20)], [None] * 19),
        # The carrier stops at 7.5 s (its link went down): ended at the first sweep
        # 30 s after the last one that saw its count move, whatever the fleet sends.
        (
            DEFAULT,
            [(7.5, 100, 50, ""), (15, 100, 60, ""), (30, 100, 70, ""), (37.5, 100, 80, "")],
            [None, None, None, CARRIER],
        ),
        # The bot thinking: the fleet silent for minutes while the carrier streams.
        (DEFAULT, [(30.0 * i, 100 * i, 5, "") for i in range(1, 11)], [None] * 10),
        # ... unless fleet_silence is set: then the fleet's silence ends it.
        (BOTH, [(5, 10, 0, ""), (10, 20, 0, ""), (15, 30, 0, "")], [None, FLEET, FLEET]),
        # The carrier silent only because flow control stopped reading it (the fleet
        # is not taking its bytes): not the carrier's silence.
        (DEFAULT, [(15, 100, 0, "c"), (40, 100, 0, "c"), (60, 100, 0, "c")], [None] * 3),
        # ... and its clock starts again from the last held sweep once reading resumes.
        (DEFAULT, [(20, 100, 0, "c"), (45, 100, 0, ""), (50, 100, 0, "")], [None, None, CARRIER]),
        # The same for the fleet when the carrier does not read.
        (BOTH, [(8, 10, 0, "f"), (16, 20, 0, "f"), (20, 30, 0, "")], [None, None, None]),
        # Nothing either way: the idle rule (here the relay of a non-101 answer).
        (IDLE_ONLY, [(2, 0, 0, ""), (4.9, 0, 0, ""), (5.0, 0, 0, "")], [None, None, IDLE]),
        (IDLE_ONLY, [(4, 0, 7, ""), (8, 0, 7, ""), (9, 0, 7, "")], [None, None, IDLE]),
        # The idle rule counts bytes, held or not (timeouts.tunnel as it always was).
        (IDLE_ONLY, [(3, 0, 0, "c"), (6, 0, 0, "c")], [None, IDLE]),
        # carrier_silence off (0): a silent carrier is left to the idle rule.
        (
            SilenceLimits(idle=60.0),
            [(30, 0, 5, ""), (59, 0, 5, ""), (89, 0, 5, ""), (90, 0, 5, "")],
            [None, None, None, IDLE],
        ),
        # Both silent: the more telling reason wins (the carrier's, then the fleet's).
        (BOTH, [(31, 0, 0, "")], [CARRIER]),
    ],
)
def test_which_call_is_silent_and_when(limits, sweeps, verdicts):
    assert _run(limits, sweeps) == verdicts


def test_idle_counts_from_the_last_byte_either_way():
    watch = QuietWatch.start(SilenceLimits(idle=10.0), 0, 0, now=0.0)
    assert watch.check(5, 0, 4.0) is None  # the carrier spoke at (about) 4 s
    assert watch.check(5, 0, 13.9) is None
    assert watch.check(5, 0, 14.0) is Silence.IDLE


@pytest.mark.parametrize(
    ("limits", "period"),
    [
        (DEFAULT, 7.5),  # a quarter of carrier_silence
        (BOTH, 2.5),
        (IDLE_ONLY, 1.25),
        (SilenceLimits(idle=3600.0), 900.0),  # carrier_silence off: the tunnel's quarter
    ],
)
def test_sweep_period_is_a_quarter_of_the_shortest_limit(limits, period):
    assert limits.sweep_period == period


def test_per_route_overrides():
    policy = SilencePolicy(
        tunnel=3600.0,
        carrier=30.0,
        route_carrier={"/exotel/": 0.0},
        route_fleet={"/exotel/": 120.0},
    )
    assert policy.for_route("/ws/") == SilenceLimits(idle=3600.0, carrier=30.0, fleet=0.0)
    assert policy.for_route("/exotel/") == SilenceLimits(idle=3600.0, carrier=0.0, fleet=120.0)


def test_a_reloads_limits_for_a_call_up_are_each_the_longer_of_the_two():
    """A reload may spare a call, never end one (SPEC 11): 0 (off) is the longest."""
    started = SilenceLimits(idle=3600.0, carrier=30.0, fleet=0.0)
    relaxed = started.lenient(SilenceLimits(idle=60.0, carrier=0.0, fleet=10.0))
    assert relaxed == SilenceLimits(idle=3600.0, carrier=0.0, fleet=0.0)
    longer = started.lenient(SilenceLimits(idle=7200.0, carrier=120.0, fleet=5.0))
    assert longer == SilenceLimits(idle=7200.0, carrier=120.0, fleet=0.0)
    assert SilenceLimits(idle=60.0, carrier=0.0).lenient(started).carrier == 0.0


# With timeouts.tcp_user_timeout (20 s) as the limit on a side that takes nothing.
STALLED = SilenceLimits(idle=3600.0, carrier=30.0, stalled=20.0)
CARRIER_STALLED, FLEET_STALLED = Silence.CARRIER_STALLED, Silence.FLEET_STALLED


@pytest.mark.parametrize(
    ("sweeps", "verdicts"),
    [
        # The carrier stops reading at about 10 s and streams on: the fleet is held
        # and nothing more is relayed to the carrier; ended 20 s after the last
        # sweep that saw bytes go to it (the session 32 audit: not ended before).
        (
            [
                (5, 100, 500, ""),
                (10, 200, 600, "f"),
                (15, 300, 600, "f"),
                (25, 400, 600, "f"),
                (30, 500, 600, "f"),
            ],
            [None, None, None, None, CARRIER_STALLED],
        ),
        # A slow carrier: held at every sweep, but taking bytes: never.
        ([(5.0 * i, 100 * i, 50 * i, "f") for i in range(1, 12)], [None] * 11),
        # A bot silent for a minute, then a burst the carrier does not take:
        # counted from the burst, not from the bot's silence.
        (
            [
                (30, 100, 0, ""),
                (60, 200, 0, ""),
                (65, 300, 500, "f"),
                (80, 400, 500, "f"),
                (85, 500, 500, "f"),
            ],
            [None, None, None, None, CARRIER_STALLED],
        ),
        # A bot that stops reading and talks on: the carrier is held.
        (
            [(5, 100, 50, ""), (10, 200, 100, "c"), (20, 200, 150, "c"), (30, 200, 200, "c")],
            [None, None, None, FLEET_STALLED],
        ),
        # Held, then free again before the limit: nothing.
        ([(10, 100, 50, "f"), (25, 200, 50, ""), (31, 300, 50, "")], [None, None, None]),
    ],
)
def test_a_side_that_takes_nothing_while_its_peer_is_held_has_stalled(sweeps, verdicts):
    assert _run(STALLED, sweeps) == verdicts


def test_the_stall_limit_is_off_at_0_and_counts_in_the_sweep_period():
    held = [(10.0 * i, 100 * i, 5, "f") for i in range(1, 10)]
    assert _run(DEFAULT, held) == [None] * 9
    assert STALLED.sweep_period == 5.0
    longer = SilenceLimits(idle=3600.0, carrier=30.0, stalled=40.0)
    assert STALLED.lenient(longer).stalled == 40.0
    assert STALLED.lenient(DEFAULT).stalled == 0.0  # off wins, as for the other limits
