"""The access line the supervisor writes for a call lost with its worker."""

from __future__ import annotations

from fleet_ingress.core.lost_calls import lost_call_record
from fleet_ingress.ops.local_counts import CALL_DURATION
from fleet_ingress.ops.metrics import lost_call_counts

SAID = {
    "call_id": 7,
    "call": "4321-7-k3f9",
    "started": "2026-12-04T10:00:00Z",
    "client_ip": "198.51.100.7",
    "route": "/ws/",
    "bot_id": "support-bot",
    "started_at": 1_000.0,
}


def record(call: dict, **kw) -> dict:
    return lost_call_record(
        call,
        worker_pid=4321,
        generation=2,
        exit_status=kw.pop("exit_status", "killed by SIGKILL"),
        now=kw.pop("now", 1_062.5),
    )


def test_an_answered_call_has_every_access_field_and_says_how_its_worker_ended() -> None:
    line = record({**SAID, "fleet": "a", "status": 101})
    assert line == {
        "call_id": 7,
        "call": "4321-7-k3f9",  # the id `calls` listed, whole
        "started": "2026-12-04T10:00:00Z",
        "client_ip": "198.51.100.7",
        "route": "/ws/",
        "bot_id": "support-bot",
        "fleet": "a",
        "status": 101,
        "attempts": None,
        "queued_ms": None,  # the worker knew it
        "handshake_ms": None,
        "duration_s": 62.5,
        "bytes_from_carrier": None,
        "bytes_to_carrier": None,
        "end_reason": "error",
        "detail": "its worker (pid 4321, generation 2) ended: killed by SIGKILL; the call "
        "was up and was lost with it (bytes not known)",
        "worker_pid": 4321,
    }


def test_a_call_connecting_or_queued_says_where_it_was() -> None:
    connecting = record({**SAID, "fleet": "b"})
    assert connecting["status"] is None and connecting["fleet"] == "b"
    assert (
        "the call was connecting to its fleet (or had just been answered)" in connecting["detail"]
    )
    queued = record(SAID, exit_status="exit 1")
    assert queued["fleet"] is None
    assert "ended: exit 1; the call waited for a fleet slot" in queued["detail"]


def test_a_slot_known_only_by_its_fleet_still_gets_a_line() -> None:
    """A lease held before an older release said who its call is."""
    line = record({"fleet": "a"})
    assert (line["fleet"], line["call_id"], line["bot_id"], line["duration_s"]) == (
        "a",
        None,
        None,
        None,
    )
    assert line["end_reason"] == "error"


def test_what_a_worker_said_is_taken_only_as_plain_bounded_values() -> None:
    line = record(
        {
            **SAID,
            "bot_id": "x" * 5000,
            "client_ip": {"nested": True},
            "route": ["/ws/"],
            "status": "101",
            "fleet": 3,
            "started": None,
            "started_at": True,
            "extra": "ignored",
        }
    )
    assert len(line["bot_id"]) == 256
    assert line["client_ip"] is None and line["route"] is None
    assert line["status"] is None and line["fleet"] is None
    assert line["duration_s"] is None and line["started"] is None
    assert "extra" not in line


def test_started_is_derived_from_started_at_when_not_said() -> None:
    line = record({"started_at": 0.0}, now=30.0)
    assert line["started"] == "1970-01-01T00:00:00Z" and line["duration_s"] == 30.0


def test_a_start_time_no_clock_could_say_is_left_out_not_raised() -> None:
    """A worker's `started_at` of 1e300 raised OverflowError in time.gmtime: the
    supervisor's watch on that worker ended there, and its death, its lost
    calls and their lines went unsaid (the supervisor-crash audit of session 26)."""
    for bad in (1e300, -5.0, float("nan"), float("inf")):
        line = record({"started_at": bad}, now=1_000.0)
        assert line["started"] is None and line["duration_s"] is None, bad
    assert record({"started_at": 1_010.0}, now=1_000.0)["duration_s"] == 0.0  # its clock ahead


def test_its_duration_is_by_the_monotonic_clock_where_the_worker_said_its_start_by_it() -> None:
    """No wall-clock step between its start and its worker's death moves it: a
    day forward, or back past the minute a start may be ahead by."""
    said = {**SAID, "started_monotonic": 500.0}
    for now in (1_000.0 + 86_400 + 12, 1_000.0 - 300 + 12):
        line = lost_call_record(
            said, worker_pid=1, generation=1, exit_status="x", now=now, now_monotonic=512.0
        )
        assert line["duration_s"] == 12.0 and line["started"] == SAID["started"]
    # One it could not have said (ahead of this clock, not a number): the wall clock's.
    for bad in (600.0, -1.0, float("nan"), True, "500"):
        line = lost_call_record(
            {**SAID, "started_monotonic": bad},
            worker_pid=1,
            generation=1,
            exit_status="x",
            now=1_030.0,
            now_monotonic=512.0,
        )
        assert line["duration_s"] == 30.0, bad


def test_a_lost_tunneled_call_counts_ended_and_its_duration_a_waiting_one_ended_only() -> None:
    """`ops.metrics.lost_call_counts`: what the supervisor adds to the host's
    counts for each lost call, rendered as a worker's own calls are."""
    from fleet_ingress.ops.local_counts import CALL_DURATION
    from fleet_ingress.ops.metrics import HISTOGRAMS, histogram_families, lost_call_counts

    up = lost_call_counts(record({**SAID, "fleet": "a", "status": 101}))
    assert dict(up.counters) == {("calls_ended", "a", "error"): 1}
    histo = up.histograms[CALL_DURATION]
    assert histo.bounds == HISTOGRAMS[CALL_DURATION][1] and histo.sum == 62.5
    below = dict(zip(histo.bounds, histo.cumulative, strict=False))
    assert (below[60], below[120], histo.count) == (0, 1, 1)
    (family,) = list(histogram_families(up))
    assert family.name == "fleet_ingress_call_duration_seconds"

    waiting = lost_call_counts(record(SAID))  # no fleet, no 101: no duration of a call
    assert dict(waiting.counters) == {("calls_ended", "", "error"): 1}
    assert waiting.histograms == {}


def test_lost_calls_land_in_the_buckets_a_worker_would_put_them_in() -> None:
    """Summed over many lost calls, `lost_call_counts` gives the histogram a
    worker's prometheus_client Histogram gives for the same durations: on a
    bound (le is inclusive), just past it, past the last bound (+Inf alone),
    zero; the count and the sum. The supervisor adds these to its retired
    counts, merged with its workers' on their shared bounds."""
    from prometheus_client import CollectorRegistry

    from fleet_ingress.core.host_view import Counts
    from fleet_ingress.ops.local_counts import CALL_DURATION, histo_of
    from fleet_ingress.ops.metrics import _histogram, lost_call_counts

    durations = [0.0, 0.5, 1.0, 1.001, 5.0, 59.999, 60.0, 60.001, 7200.0, 7200.001, 86_400.0]
    worker = _histogram(CALL_DURATION, CollectorRegistry())
    lost = Counts()
    for duration in durations:
        worker.observe(duration)
        lost.add(
            lost_call_counts(
                {"fleet": "a", "status": 101, "duration_s": duration, "end_reason": "error"}
            ),
            gauges=False,
        )
    assert lost.histograms[CALL_DURATION] == histo_of(worker)
    assert lost.histograms[CALL_DURATION].count == len(durations)
    assert lost.counter("calls_ended", "a", "error") == len(durations)


def test_bytes_its_worker_last_reported_are_said_at_least_with_their_age() -> None:
    said = {
        **SAID,
        "fleet": "a",
        "status": 101,
        "started_monotonic": 500.0,
        "answered_monotonic": 500.25,
        "bytes_from_carrier": 48_000,
        "bytes_to_carrier": 47_500,
        "bytes_reported_monotonic": 558.0,
    }
    line = lost_call_record(
        said,
        worker_pid=4321,
        generation=2,
        exit_status="killed by SIGKILL",
        now=1_062.5,
        now_monotonic=560.5,
    )
    assert (line["bytes_from_carrier"], line["bytes_to_carrier"]) == (48_000, 47_500)
    assert line["bytes_at_least"] is True
    assert line["detail"].endswith(
        "(bytes at least, as its worker's last report said them, 2.5s before it ended)"
    )
    # The access line's duration from the call's start, as every one; the
    # histogram's ("101 to end") from its 101.
    assert (line["duration_s"], line["tunnel_s"]) == (60.5, 60.25)
    assert lost_call_counts(line).histograms[CALL_DURATION].sum == 60.25


def test_bytes_or_a_101_moment_not_plain_numbers_are_not_taken() -> None:
    for bad in (-1, 1.5, True, "12", None, [3]):
        said = {
            **SAID,
            "status": 101,
            "fleet": "a",
            "bytes_from_carrier": bad,
            "bytes_to_carrier": 5,
            "answered_monotonic": bad if bad != 1.5 else 10**9,
        }
        line = lost_call_record(
            said,
            worker_pid=1,
            generation=1,
            exit_status="exit 1",
            now=1_062.5,
            now_monotonic=600.0,
        )
        assert line["bytes_from_carrier"] is None and "bytes_at_least" not in line, bad
        assert "tunnel_s" not in line and line["detail"].endswith("(bytes not known)"), bad
