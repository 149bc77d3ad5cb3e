"""The rate-limited log for lines a stranger can cause (no sockets, a hand-moved clock)."""

import json
import logging

import pytest

from fleet_ingress.logs import JsonFormatter, RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="test.refused")
    return lambda: [r.fields for r in caplog.records if r.name == "test.refused"]  # type: ignore[attr-defined]


def test_lines_past_the_rate_are_counted_and_the_next_line_says_how_many(lines):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.refused"), per_second=3, clock=clock)
    written = [log.info("request refused", status=400 + i) for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert [f["status"] for f in lines()] == [400, 401, 402]
    assert all("suppressed" not in f for f in lines())
    clock.now += 0.99  # same second: still suppressed
    assert not log.info("request refused", status=499)
    clock.now += 0.02
    assert log.info("request refused", status=431)
    assert lines()[-1] == {"status": 431, "suppressed": 8}
    assert log.info("request refused", status=400)
    assert "suppressed" not in lines()[-1]  # reported once
    assert log.suppressed_total == 8


def test_a_steady_flood_gets_per_second_lines_each_second(lines):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.refused"), per_second=5, clock=clock)
    for _ in range(10):  # 10 seconds of 1,000 refusals a second
        for _ in range(1000):
            log.info("request refused")
            clock.now += 0.001
    assert len(lines()) == 50
    suppressed = sum(f.get("suppressed", 0) for f in lines())
    assert suppressed + log._suppressed == 10 * 1000 - 50


def test_a_burst_that_stops_is_counted_in_a_line_at_the_end_of_its_second(lines):
    """A flood that stops leaves no next line to carry its count: the timer set
    when the first line is dropped writes it at the end of that second, once."""
    clock = Clock()
    timers: list[tuple[float, object]] = []
    log = RateLimitedLog(
        logging.getLogger("test.refused"),
        per_second=3,
        clock=clock,
        call_later=lambda delay, then: timers.append((delay, then)),
    )
    log.info("request refused", status=400)
    clock.now += 0.25
    for _ in range(9):
        log.info("request refused", status=431)
    assert [delay for delay, _ in timers] == [0.75]  # one timer, at the second's end
    clock.now += 0.75
    timers[0][1]()  # type: ignore[operator]
    assert lines()[-1] == {"suppressed": 7, "of": "request refused"}
    assert [r for r in lines() if "status" in r] == [{"status": 400}] + [{"status": 431}] * 2
    timers[0][1]()  # type: ignore[operator]  # a second call finds nothing to say
    assert len(lines()) == 4
    assert log.info("request refused", status=400)
    assert "suppressed" not in lines()[-1]  # counted once


def test_a_count_carried_by_the_next_line_is_not_written_again(lines):
    clock = Clock()
    timers: list[object] = []
    log = RateLimitedLog(
        logging.getLogger("test.refused"),
        per_second=1,
        clock=clock,
        call_later=lambda delay, then: timers.append(then),
    )
    log.info("request refused")
    log.info("request refused")  # dropped: a timer
    clock.now += 1.0
    log.info("request refused")  # the next second's line carries the count
    timers[0]()  # type: ignore[operator]
    assert lines() == [{}, {"suppressed": 1}]


def test_the_line_is_one_json_object_with_its_fields(caplog):
    caplog.set_level(logging.INFO, logger="test.refused")
    RateLimitedLog(logging.getLogger("test.refused"), per_second=1).info(
        "request refused", client_ip="203.0.113.7", status=431
    )
    entry = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert entry["event"] == "request refused"
    assert (entry["client_ip"], entry["status"]) == ("203.0.113.7", 431)
