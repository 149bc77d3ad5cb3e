"""How long an upgrade's re-execution keeps the host's slots ungranted, step
by step (docs/WORKERS.md "Upgrade: the sequence").

From the old image's hand-over of the workers' channels (`exec_at` in the
state it carries: CLOCK_MONOTONIC, the same clock after the exec) until the
new image grants again, no call waiting in a worker for a slot is answered.
The new image marks each step of its start as it ends (`step_done`) and says
them once it grants (`steps_since`): where a carrier's wait went.

The new image's imports (0.5-0.6 s of a core, most of the gap) run with the
cyclic garbage collector off (`collector_off_over_exec`): its passes over
the objects they make are 8-9 % of their CPU (its first pass runs later,
once the table grants: `Supervisor.start`).

Imports nothing but `gc`, `os` and `time`: `cli._run` marks its first step before
its imports.
"""

from __future__ import annotations

import gc
import os
import time

# The environment variable naming the descriptor of the state an upgrade's
# exec carries (`service.upgrade.take_state` reads it).
UPGRADE_STATE = "FLEET_INGRESS_UPGRADE_STATE"

# The key, in the state carried over the exec, of the moment the old image
# stopped reading its workers (its last grant is before it).
EXEC_AT = "exec_at"

_steps: list[tuple[str, float]] = []


def step_done(name: str, now: float | None = None) -> None:
    """`name` ended now (or at `now`, CLOCK_MONOTONIC)."""
    _steps.append((name, time.monotonic() if now is None else now))


def steps_since(exec_at: float | None, now: float) -> dict[str, float]:
    """Each step's seconds, from the end of the one before (the first from
    `exec_at`; `exec_at` None: the first step is left out), then "total" (from
    `exec_at`, or the first step, to `now`), in milliseconds' precision."""
    took: dict[str, float] = {}
    before = exec_at
    for name, at in _steps:
        if before is not None:
            took[name] = round(at - before, 3)
        before = at
    start = exec_at if exec_at is not None else (_steps[0][1] if _steps else now)
    took["total"] = round(now - start, 3)
    return took


_passes_before: int | None = None


def collector_off_over_exec() -> bool:
    """After an upgrade's exec (the state's variable set): the garbage collector
    off until the slot table grants again (`gc.enable()` there). Whether it was.
    Its passes are counted from here (`collector_passes`)."""
    global _passes_before
    _passes_before = _passes()
    if UPGRADE_STATE not in os.environ:
        return False
    gc.disable()
    return True


def collector_passes() -> int | None:
    """The garbage collector's passes (every generation's) since
    `collector_off_over_exec` was called; None if it was not."""
    return None if _passes_before is None else _passes() - _passes_before


def _passes() -> int:
    return sum(generation["collections"] for generation in gc.get_stats())


def forget_steps() -> None:
    """Start afresh (tests; a second exec's image starts with none anyway)."""
    _steps.clear()
