"""The fall/rise health state machine of one fleet. No I/O.

INIT -> UP on the first passing probe (a fresh process should serve as soon
as a fleet proves healthy); UP -> DOWN after `fall` consecutive failures;
DOWN -> UP after `rise` consecutive passes. fall 2 is deliberate: with two
fleets, ejecting one on a single slow probe dumps every call onto the
survivor and manufactures the saturation the check exists to prevent.
A fleet that never passes goes INIT -> DOWN after `fall` failures, so an
operator sees DOWN rather than a fleet stuck "starting".
"""

from __future__ import annotations

import enum


class Health(enum.Enum):
    INIT = "INIT"  # not probed yet
    UP = "UP"
    DOWN = "DOWN"


class Event(enum.Enum):
    PASS = "pass"
    FAIL = "fail"


class Step(enum.Enum):
    """What an observation does, before the counters are consulted."""

    STAY = "stay"  # reset the streak of the other kind, count nothing
    COUNT = "count"  # extend the streak; change state when it is long enough
    MOVE = "move"  # change state now


# {state: {event: step}}; the state a COUNT or MOVE leads to is in _TARGET.
_TABLE: dict[Health, dict[Event, Step]] = {
    Health.INIT: {Event.PASS: Step.MOVE, Event.FAIL: Step.COUNT},
    Health.UP: {Event.PASS: Step.STAY, Event.FAIL: Step.COUNT},
    Health.DOWN: {Event.PASS: Step.COUNT, Event.FAIL: Step.STAY},
}
_TARGET: dict[tuple[Health, Event], Health] = {
    (Health.INIT, Event.PASS): Health.UP,
    (Health.INIT, Event.FAIL): Health.DOWN,
    (Health.UP, Event.FAIL): Health.DOWN,
    (Health.DOWN, Event.PASS): Health.UP,
}


def observe(
    state: Health, streak: int, passed: bool, *, fall: int, rise: int
) -> tuple[Health, int]:
    """One probe's verdict applied: the new state and streak.

    `streak` counts the consecutive observations pushing toward a change; the
    caller keeps both (the fleet's record is the one place they live)."""
    if fall < 1 or rise < 1:
        raise ValueError("fall and rise must be at least 1")
    event = Event.PASS if passed else Event.FAIL
    step = _TABLE[state][event]
    if step is Step.STAY:
        return state, 0
    if step is Step.COUNT:
        streak += 1
        if streak < (rise if event is Event.PASS else fall):
            return state, streak
    return _TARGET[(state, event)], 0
