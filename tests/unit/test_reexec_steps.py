"""The steps of the new image's start after an upgrade's exec, as its log line
says them (service/reexec_steps.py): each from the end of the one before, the
first from the old image's hand-over."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet_ingress.service import reexec_steps
from fleet_ingress.service.reexec_steps import forget_steps, step_done, steps_since


@pytest.fixture(autouse=True)
def _no_steps() -> Iterator[None]:
    forget_steps()
    yield
    forget_steps()


def test_each_step_from_the_end_of_the_one_before_the_first_from_the_exec() -> None:
    step_done("python started", 100.08)
    step_done("imports", 100.7)
    step_done("workers answered", 100.75)
    assert steps_since(100.0, 100.76) == {
        "python started": 0.08,
        "imports": 0.62,
        "workers answered": 0.05,
        "total": 0.76,
    }


def test_without_the_moment_of_the_exec_the_first_step_is_where_it_starts() -> None:
    # From a release that did not carry it: nothing before the first mark is known.
    step_done("python started", 50.0)
    step_done("imports", 50.5)
    assert steps_since(None, 51.0) == {"imports": 0.5, "total": 1.0}


def test_no_step_marked() -> None:
    assert steps_since(None, 7.0) == {"total": 0.0}
    assert steps_since(6.5, 7.0) == {"total": 0.5}


def test_a_step_is_marked_now_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reexec_steps.time, "monotonic", lambda: 42.0)
    step_done("imports")
    assert steps_since(41.0, 43.0) == {"imports": 1.0, "total": 2.0}


def test_the_collector_is_off_after_an_exec_alone_and_its_passes_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    monkeypatch.delenv(reexec_steps.UPGRADE_STATE, raising=False)
    assert not reexec_steps.collector_off_over_exec() and gc.isenabled()
    gc.collect()
    assert reexec_steps.collector_passes() == 1  # a full pass
    monkeypatch.setenv(reexec_steps.UPGRADE_STATE, "7")
    try:
        assert reexec_steps.collector_off_over_exec() and not gc.isenabled()
        _ = [[] for _ in range(20_000)]  # would take several passes
        assert reexec_steps.collector_passes() == 0
    finally:
        gc.enable()
