"""The upgrade's trial run judged by its progress (service.upgrade.TrialProgress):
its CPU time, read every second, not one wall-clock bound. Session 44 measured
the trial at 37.9 s at load 9 and 92 s beside the upgrade tests, a sound install
refused past its 90 s; it needs about a second of CPU however long it waits."""

from __future__ import annotations

from fleet_ingress.service.upgrade import (
    TRIAL_CPU_LIMIT,
    TRIAL_STALL_LIMIT,
    TRIAL_WALL_LIMIT,
    TrialProgress,
)


def _run(judge: TrialProgress, seconds: int, cpu_per_second: float, cpu: float = 0.0) -> str | None:
    """`seconds` one-second readings, its CPU growing by `cpu_per_second`: the
    first verdict, or None."""
    for _ in range(seconds):
        cpu += cpu_per_second
        if (why := judge.observe(1.0, cpu)) is not None:
            return why
    return None


def test_a_trial_that_gets_a_sliver_of_a_cpu_is_waited_for() -> None:
    """Niced behind busy cores, 1 % of a core: 100 s for a second of CPU."""
    judge = TrialProgress()
    assert _run(judge, 500, 0.01) is None
    assert judge.said() == {"wall_s": 500.0, "cpu_s": 5.0}


def test_a_trial_that_spins_is_given_up_at_its_cpu_limit() -> None:
    judge = TrialProgress()
    why = _run(judge, 100, 1.0)
    assert why is not None and why.startswith(f"used {TRIAL_CPU_LIMIT + 1:.1f}s of CPU"), why
    assert judge.wall == TRIAL_CPU_LIMIT + 1


def test_a_trial_that_uses_no_cpu_is_given_up_at_its_stall_limit() -> None:
    """It imported (2 s of CPU), then waits on something that never comes."""
    judge = TrialProgress()
    assert _run(judge, 10, 0.2) is None
    why = _run(judge, 100, 0.0, cpu=judge.cpu)
    assert why is not None and why.startswith(f"used no CPU for {TRIAL_STALL_LIMIT:.0f}s"), why
    assert judge.wall == 10 + TRIAL_STALL_LIMIT


def test_cpu_now_and_then_keeps_a_trial_from_its_stall_limit() -> None:
    """A tick of CPU every 50 s (the tick is /proc's 10 ms) is progress."""
    judge = TrialProgress()
    cpu = 0.0
    for second in range(1, 400):
        cpu += 0.01 if second % 50 == 0 else 0.0
        assert judge.observe(1.0, cpu) is None, second


def test_whatever_its_progress_a_trial_is_given_up_at_its_wall_limit() -> None:
    judge = TrialProgress()
    why = _run(judge, 1000, 0.001)
    assert why is not None and why.startswith(f"did not finish within {TRIAL_WALL_LIMIT:g}s")
    assert judge.wall == TRIAL_WALL_LIMIT


def test_the_limits_are_far_from_what_a_sound_trial_takes() -> None:
    """Measured (session 45): 0.38-1.3 s of CPU, 41 s of wall beside a busy loop
    on each core; its own waits (lookups, its ask of the supervisor) 2 s each."""
    assert TRIAL_CPU_LIMIT >= 20 * 1.3
    assert TRIAL_STALL_LIMIT >= 10 * 4
    assert TRIAL_WALL_LIMIT >= 10 * 41
