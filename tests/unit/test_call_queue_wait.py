"""A call's queue wait as its access line says it (queued_ms) and the
histogram observes it, when a wait is not known: a worker of this release
under a supervisor of one before "queued" in the slot channel's answers."""

from __future__ import annotations

from typing import Any

from fleet_ingress.core.call_machine import CallMachine, State
from fleet_ingress.net.calls import Call, Registry


class _Carrier:
    bytes_received = 0
    lost = False
    reading_paused = False
    call = None


def _call() -> Call:
    machine = CallMachine(None, State.LEASING)  # type: ignore[arg-type]  # rules not read
    return Call(_Carrier(), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]


def test_a_wait_not_known_makes_the_access_lines_queued_ms_null_not_a_part_of_it() -> None:
    registry = Registry()
    observed: list[Any] = []
    registry.on_slot_waited.append(observed.append)
    known, unknown = _call(), _call()
    registry.slot_waited(known, 0.25, granted=True)
    registry.slot_waited(known, 0.5, granted=False)  # a retry's 503 after its wait
    assert known.access_record()["queued_ms"] == 750.0
    registry.slot_waited(unknown, 0.25, granted=True)
    registry.slot_waited(unknown, None, granted=True)  # a retry under an older supervisor
    registry.slot_waited(unknown, 0.5, granted=True)
    assert unknown.access_record()["queued_ms"] is None  # not 250 or 750: a part
    assert observed == [0.25, 0.25]  # the waits known and granted, each once
    assert _call().access_record()["queued_ms"] == 0  # no wait: 0
