"""`snapshot_pace.settled`: what the every-second crash snapshot compares."""

from __future__ import annotations

import marshal

import pytest

from fleet_ingress.service import snapshot_pace
from fleet_ingress.service.snapshot_pace import settled


def state(running: dict, **more) -> dict:
    return {"generation": 1, "queue_timeouts": 3, "running": running, **more}


def test_the_running_part_is_marshalled_once_an_object_and_still_follows_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The configuration, fleets and certificate run (`running`, made once and
    never changed in place: `upgrade.RunningJson`) are marshalled once while
    the same object is taken, not every second; another object is read again,
    told apart when it says something else and not when it says the same;
    the parts moving on their own are left out as before."""
    marshalled: list[object] = []
    real_dumps = marshal.dumps

    def dumps(value, version):
        marshalled.append(value)
        return real_dumps(value, version)

    monkeypatch.setattr(snapshot_pace.marshal, "dumps", dumps)
    running = {"config": {"listen": ["a", 1]}, "fleets": [{"name": "c"}], "pem": "x" * 50}
    first = settled(state(running))
    for timeouts in (4, 5):
        assert settled(state(running, queue_timeouts=timeouts)) == first
    assert sum(value is running for value in marshalled) == 1
    same = {**running}
    assert settled(state(same)) == first
    other = {**running, "fleets": [{"name": "d"}]}
    assert settled(state(other)) != first
    assert settled(state(running, generation=2)) != first
    assert settled(state({"bad": 2**70})) is not None
    assert settled(state({"bad": object()})) is None
