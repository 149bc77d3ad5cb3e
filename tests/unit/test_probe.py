"""The health-probe verdict, table-driven (issue #3 acceptance 1). No sockets."""

import pytest

from fleet_ingress.core.probe import judge_health_response

KEY = "fleet_available"


@pytest.mark.parametrize(
    ("body", "capacity"),
    [
        (b'{"fleet_available": 12, "status": "ok"}', 12),  # first
        (b'{"status": "ok", "fleet_available": 12}', 12),  # last
        (b'{"a": 1, "fleet_available": 7, "b": 2}', 7),  # middle
        (b'{"prev_fleet_available": 0, "fleet_available": 5, "max_fleet_available": 0}', 5),
        (b'{"fleet_available": 3, "note": "fleet_available: 0"}', 3),
        (b'{"nested": {"fleet_available": 0}, "fleet_available": 9}', 9),
        (b'{\n  "status" : "ok",\n\t"fleet_available"   :\n 4\n}\n', 4),
        (b'{"fleet_available": 0}', 0),
        (b'{"fleet_available": 16}', 16),
        (b'{"fleet_available": 40}', 40),
        (b'{"fleet_available": 1000}', 1000),
    ],
)
def test_passing_bodies(body, capacity):
    result = judge_health_response(200, body, KEY)
    assert result.passed and result.capacity == capacity


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, b'{"fleet_available": -1}', "negative"),
        (200, b'{"fleet_available": 1.5}', "not an integer"),
        (200, b'{"fleet_available": true}', "not an integer"),
        (200, b'{"fleet_available": null}', "not an integer"),
        (200, b'{"fleet_available": "5"}', "not an integer"),
        (200, b'{"status": "ok"}', "missing"),
        (200, b'{"prev_fleet_available": 5, "max_fleet_available": 5}', "missing"),
        (200, b'{"nested": {"fleet_available": 5}}', "missing"),
        (200, b'{"text": "\\"fleet_available\\":5,"}', "missing"),
        (200, b'[{"fleet_available": 5}]', "not an object"),
        (200, b"<html><body>fleet_available: 5</body></html>", "not JSON"),
        (200, b"", "not JSON"),
        (200, b'{"fleet_available": 5', "not JSON"),
        (200, b"\xff\xfe{}", "not JSON"),
        (204, b"", "status 204"),
        (301, b'{"fleet_available": 5}', "status 301"),
        (500, b'{"fleet_available": 5}', "status 500"),
        (503, b'{"fleet_available": 5}', "status 503"),
        (200, b'{"fleet_available": 1, "pad": "' + b"x" * 70000 + b'"}', "larger"),
        # 60 KiB nested past the JSON parser's stack on every Python (it raised RecursionError).
        (200, b'{"fleet_available": 5, "x": ' + b"[" * 30000 + b"]" * 30000 + b"}", "too deep"),
    ],
)
def test_failing_answers(status, body, reason):
    result = judge_health_response(status, body, KEY)
    assert not result.passed and result.capacity is None
    assert reason in result.reason


def test_the_key_is_configurable():
    assert judge_health_response(200, b'{"free": 2}', "free").capacity == 2
    assert not judge_health_response(200, b'{"fleet_available": 2}', "free").passed


def test_describe_says_pass_with_capacity_or_fail_with_reason():
    assert judge_health_response(200, b'{"fleet_available": 3}', KEY).describe() == (
        "pass: fleet_available=3"
    )
    assert judge_health_response(503, b"", KEY).describe() == "fail: status 503"


def test_a_capacity_key_is_described_with_its_control_characters_escaped():
    """The key is the operator's text, and describe() is shown in stat's
    "last check" on a terminal: an escape sequence in it is shown, not run."""
    key = "cap\x1b[31m<b>"
    described = judge_health_response(200, b'{"cap\\u001b[31m<b>": 8}', key).describe(key)
    assert described == "pass: 'cap\\x1b[31m<b>'=8"
    assert "\x1b" not in described
