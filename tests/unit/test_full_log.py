"""FullLog: a fleet's FULL and room said once per real change, fed with `now`."""

from __future__ import annotations

from fleet_ingress.core.full_log import ROOM_HOLD, FullLog


def test_a_429_full_flipped_by_every_probe_is_said_once_then_room_after_the_hold():
    said = FullLog()
    assert said.answered_429_now(0.0)
    lines = []
    for i in range(1, 20):  # a probe saying room, then a 429, twice a second
        lines.append(said.probed(False, i * 0.5))
        assert not said.answered_429_now(i * 0.5 + 0.1)
    assert lines == [None] * 19
    now = 10.0
    assert said.probed(False, now) is None  # the hold starts at the first quiet probe
    assert said.probed(False, now + ROOM_HOLD - 0.1) is None
    assert said.probed(False, now + ROOM_HOLD) == "fleet has room"
    assert said.episode(now + ROOM_HOLD) == {"full_s": now + ROOM_HOLD, "answered_429": 20}
    assert said.probed(False, now + ROOM_HOLD + 1) is None
    assert said.answered_429_now(30.0)  # a new episode is said again


def test_a_full_that_only_probes_said_ends_at_once():
    said = FullLog()
    assert said.probed(True, 1.0) == "fleet full"
    assert said.probed(True, 2.0) is None
    assert said.probed(False, 3.0) == "fleet has room"
    assert said.episode(3.0) == {"full_s": 2.0, "answered_429": 0}
    assert said.probed(False, 4.0) is None


def test_a_429_while_probes_say_full_holds_its_room_line():
    said = FullLog()
    assert said.probed(True, 0.0) == "fleet full"
    assert not said.answered_429_now(0.5)  # FULL said already: counted
    assert said.probed(False, 1.0) is None
    assert said.probed(False, 1.0 + ROOM_HOLD) == "fleet has room"
    assert said.episode(1.0 + ROOM_HOLD)["answered_429"] == 1


def test_a_429_that_is_no_news_is_counted_in_the_full_log_and_begins_none():
    said = FullLog()
    assert said.answered_429_now(0.0, news=False) is False  # no FULL said: nothing
    assert said.answered_429 == 0 and not said.logged_full
    assert said.answered_429_now(1.0) is True
    assert said.answered_429_now(1.1, news=False) is False
    assert said.answered_429_now(1.2, news=False) is False
    assert said.probed(False, 2.0) is None
    assert said.answered_429_now(2.5, news=False) is False  # the hold starts over
    assert said.probed(False, 2.6) is None
    assert said.probed(False, 2.6 + ROOM_HOLD) == "fleet has room"
    assert said.episode(2.6 + ROOM_HOLD)["answered_429"] == 4
