"""bench/workers_count.py's arithmetic: perf stat's CSV read, and a phase's
count per call or message less the clock's work of its seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.workers_count import per_unit, perf_counts


def test_perf_counts_reads_events_and_drops_the_syscalls_prefix(tmp_path: Path) -> None:
    out = tmp_path / "perf.csv"
    out.write_text(
        "# started on Sun Dec  6 13:14:19 2026\n\n"
        "812,,raw_syscalls:sys_enter,180970,100.00,,\n"
        "3,,context-switches,180970,100.00,,\n"
        "<not counted>,,syscalls:sys_enter_accept4,0,100.00,,\n"
        "40,,syscalls:sys_enter_epoll_pwait,180970,100.00,,\n"
    )
    assert perf_counts(out) == {
        "raw_syscalls:sys_enter": 812,
        "context-switches": 3,
        "epoll_pwait": 40,
    }


def _phase(name: str, seconds: float, roles: dict[str, int], frames: int = 0, calls: int = 0):
    return {
        "phase": name,
        "seconds": seconds,
        "frames": frames,
        "calls": calls,
        "roles": {role: {"n": n} for role, n in roles.items()},
    }


def test_per_unit_takes_each_role_clock_rate_off_for_the_phase_seconds() -> None:
    result = {
        "phases": [
            _phase("idle", 10.0, {"supervisor": 100, "worker-1": 50}),
            _phase("churn", 2.0, {"supervisor": 60, "worker-1": 1010}, calls=10),
            _phase("open", 1.0, {"supervisor": 0, "worker-1": 0}, calls=5),
            _phase("hold", 4.0, {"supervisor": 80, "worker-1": 40}),
            _phase("stream", 5.0, {"supervisor": 150, "worker-1": 2050}, frames=100),
        ]
    }
    got = per_unit(result, "n")
    call = got["churned call"]
    assert call["all"] == pytest.approx((60 + 1010) / 10)
    # idle: 10/s and 5/s for 2 s
    assert call["supervisor less idle"] == pytest.approx((60 - 20) / 10)
    assert call["worker-1 less idle"] == pytest.approx((1010 - 10) / 10)
    # hold: 20/s and 10/s for 2 s
    assert call["all less clock"] == pytest.approx((60 - 40 + 1010 - 20) / 10)
    message = got["relayed message"]
    assert message["worker-1 less clock"] == pytest.approx((2050 - 50) / 100)
    assert message["idle per second"] == pytest.approx(15.0)
    assert message["hold per second"] == pytest.approx(30.0)
