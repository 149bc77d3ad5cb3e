"""Which level a ramp measures next, and where a target's limit lies: no I/O.

A ramp adds ``step`` calls a level from ``start`` until a level is over the budget
(confirmed in two windows) or the hard cap. With a ``fine`` step smaller than
``step``, the first level over is not the end: the ramp drops that level's batch
of calls (back to the last level in budget) and climbs again ``fine`` calls at a
time, until a level is over again or the next would reach the level already seen
over. The limit is the last level in budget, judged at the step of its last climb.

    >>> steps = RampSteps(start=250, step=50, fine=10, cap=600)
    >>> steps.first()
    250
    >>> steps.judge(in_budget=True), steps.judge(in_budget=False)
    (Add(calls=50), Drop(calls=50, then=10))
    >>> steps.judge(in_budget=True), steps.judge(in_budget=True), steps.judge(in_budget=False)
    (Add(calls=10), Add(calls=10), Stop(reason='over'))
    >>> steps.limit, steps.first_over, steps.resolution
    (270, 280, 10)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Add:
    calls: int


@dataclass(frozen=True)
class Drop:
    """Stop the last level's batch of ``calls`` (back to the last level in budget), then
    add ``then`` calls."""

    calls: int
    then: int


@dataclass(frozen=True)
class Stop:
    reason: str  # "over", "cap", "edge" (in budget one fine step under the level over)


@dataclass
class RampSteps:
    start: int
    step: int
    fine: int
    cap: int
    calls: int = 0  # the level being measured
    limit: int | None = None  # the last level in budget
    first_over: int | None = None  # the lowest level seen over the budget
    fine_phase: bool = False
    _last_add: int = 0

    def first(self) -> int:
        self.calls = self._last_add = min(self.start, self.cap)
        return self.calls

    def judge(self, *, in_budget: bool) -> Add | Drop | Stop:
        """The level ``calls`` was in budget or not: what to do next."""
        if in_budget:
            self.limit = self.calls
            if self.fine_phase:
                if self.calls + self.fine >= self.first_over:  # type: ignore[operator]
                    return Stop("edge")
                return self._add(self.fine)
            add = min(self.step, self.cap - self.calls)
            return self._add(add) if add > 0 else Stop("cap")
        self.first_over = (
            self.calls if self.first_over is None else min(self.first_over, self.calls)
        )
        can_refine = (
            not self.fine_phase and self.limit is not None and 0 < self.fine < self._last_add
        )
        if not can_refine:
            return Stop("over")
        self.fine_phase = True
        dropped, self.calls = self._last_add, self.limit  # type: ignore[assignment]
        if self.calls + self.fine >= self.first_over:
            return Stop("edge")
        self._last_add = self.fine
        self.calls += self.fine
        return Drop(dropped, self.fine)

    @property
    def resolution(self) -> int | None:
        """The step the limit was judged at: from the last level in budget to the lowest
        seen over it (None when no level was over, or none in budget)."""
        if self.limit is None or self.first_over is None:
            return None
        return self.first_over - self.limit

    def _add(self, calls: int) -> Add:
        self._last_add = calls
        self.calls += calls
        return Add(calls)


def interpolate(levels: dict[int, float], calls: int) -> float | None:
    """A figure at ``calls`` from the levels measured (calls -> figure): itself, else the
    straight line between the two levels around it; None outside the levels measured."""
    if calls in levels:
        return levels[calls]
    below = [n for n in levels if n < calls]
    above = [n for n in levels if n > calls]
    if not below or not above:
        return None
    lo, hi = max(below), min(above)
    return round(levels[lo] + (levels[hi] - levels[lo]) * (calls - lo) / (hi - lo), 3)
