"""The host's counters summed over workers that come and go (core.host_view): no
sockets. Each scenario is a transcript: worker reports and departures in, the
host's total after each step out; and the total never goes down."""

from __future__ import annotations

import json

import pytest

from fleet_ingress.core.host_view import Counts, Histo, HostView, ReportError, WorkerReport

KEY = ("connections_total",)


def counts(n: int, *, calls: int = 0, histo: Histo | None = None) -> Counts:
    c = Counts()
    c.counters[KEY] = n
    c.counters[("requests", "/ws/", "101")] = 2 * n
    c.gauges[("connections",)] = calls
    if histo is not None:
        c.histograms[("handshake_duration_seconds",)] = histo
    return c


def report(pid, gen, seq, n, *, started=100.0, calls=0, draining=False) -> WorkerReport:
    return WorkerReport(
        pid=pid,
        generation=gen,
        seq=seq,
        started=started,
        counts=counts(n, calls=calls),
        calls=calls,
        draining=draining,
    )


# (step, expected host total of KEY after it). A step is
#   ("r", pid, generation, seq, count[, started])   a report read
#   ("x", pid, generation)                           the worker is gone
SCENARIOS = {
    "two workers count, one restarts after a clean exit": [
        (("r", 1, 1, 1, 10), 10),
        (("r", 2, 1, 1, 5), 15),
        (("r", 1, 1, 2, 12), 17),
        (("x", 1, 1), 17),  # its last report is kept, once
        (("r", 3, 1, 1, 4), 21),  # the replacement starts from 0
        (("r", 3, 1, 2, 6), 23),
    ],
    "a crash loses only what was counted since the last report": [
        (("r", 1, 1, 1, 10), 10),
        # the worker counted up to 14, then SIGKILL before its next report
        (("x", 1, 1), 10),
        (("r", 4, 1, 1, 1), 11),
    ],
    "a report read twice, or an older one after a newer, changes nothing": [
        (("r", 1, 1, 1, 10), 10),
        (("r", 1, 1, 1, 10), 10),
        (("r", 1, 1, 2, 13), 13),
        (("r", 1, 1, 1, 10), 13),
        (("r", 1, 1, 2, 13), 13),
    ],
    "an old generation drains while the new one counts": [
        (("r", 1, 1, 1, 50), 50),
        (("r", 2, 2, 1, 3), 53),
        (("r", 1, 1, 2, 51), 54),  # old calls still ending: counted
        (("r", 2, 2, 2, 9), 60),
        (("r", 1, 1, 3, 52), 61),  # its final report
        (("x", 1, 1), 61),
        (("r", 2, 2, 3, 10), 62),
    ],
    "a late report of a worker already gone is ignored": [
        (("r", 1, 1, 2, 10), 10),
        (("x", 1, 1), 10),
        (("r", 1, 1, 3, 99), 10),
        (("x", 1, 1), 10),  # leaving twice retires nothing twice
    ],
    "the pid comes round again for a new process": [
        (("r", 7, 1, 5, 30), 30),
        # its exit went unseen; a new process with the same pid reports seq 1
        (("r", 7, 1, 1, 2, 200.0), 32),
        (("x", 7, 1), 32),
    ],
    "a worker that never reported leaves nothing": [
        (("x", 9, 1), 0),
        (("r", 1, 1, 1, 3), 3),
    ],
}


def _apply(view: HostView, step: tuple, now: float) -> None:
    if step[0] == "r":
        _, pid, gen, seq, n, *started = step
        view.report(report(pid, gen, seq, n, started=started[0] if started else 100.0), now)
    else:
        view.leave((step[1], step[2]))


@pytest.mark.parametrize("name", SCENARIOS)
def test_host_totals_never_reset_nor_double_count(name):
    view = HostView()
    previous = 0
    for i, (step, expected) in enumerate(SCENARIOS[name]):
        _apply(view, step, now=float(i))
        total = view.totals()
        assert total.counter(*KEY) == expected, (name, i, step)
        assert total.counter("requests", "/ws/", "101") == 2 * expected
        assert total.counter(*KEY) >= previous
        previous = total.counter(*KEY)


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_view_carried_over_a_re_execution_goes_on_from_where_it_was(name):
    """Cut each transcript in two: the second half runs in a view rebuilt from
    the first's JSON (as the supervisor's new image does) and ends the same."""
    steps = SCENARIOS[name]
    for cut in range(len(steps) + 1):
        view = HostView()
        for i, (step, _) in enumerate(steps[:cut]):
            _apply(view, step, now=float(i))
        carried = json.loads(json.dumps(view.to_json(now=float(cut))))
        view = HostView.from_json(carried, now=1000.0)
        for i, (step, expected) in enumerate(steps[cut:], start=cut):
            _apply(view, step, now=1000.0 + i)
            assert view.totals().counter(*KEY) == expected, (name, cut, i)


def test_gauges_are_of_live_workers_only():
    view = HostView()
    view.report(report(1, 1, 1, 10, calls=3), now=0)
    view.report(report(2, 2, 1, 1, calls=4), now=0)
    assert view.totals().gauges[("connections",)] == 7
    view.leave((1, 1))
    total = view.totals()
    assert total.gauges[("connections",)] == 4
    assert total.counter(*KEY) == 11


def test_workers_rows_show_both_generations_and_their_report_age():
    view = HostView()
    view.report(report(1, 1, 1, 10, calls=3, draining=True), now=10.0)
    view.report(report(2, 2, 1, 1, calls=4), now=12.0)
    rows = view.workers(now=13.0)
    assert [(w.pid, w.generation, w.calls, w.draining, w.last_report_age) for w in rows] == [
        (1, 1, 3, True, 3.0),
        (2, 2, 4, False, 1.0),
    ]


def test_retire_absent_after_a_re_execution_retires_workers_whose_channel_is_gone():
    view = HostView()
    view.report(report(1, 1, 1, 10), now=0)
    view.report(report(2, 1, 1, 5), now=0)
    view = HostView.from_json(view.to_json(now=0), now=0)
    assert view.retire_absent({(2, 1)}) == [(1, 1)]
    assert [w.pid for w in view.workers(now=0)] == [2]
    assert view.totals().counter(*KEY) == 15
    assert view.retired_workers == 1


def H(bounds, cumulative, total):
    return Histo(tuple(bounds), tuple(cumulative), total)


@pytest.mark.parametrize(
    ("a", "b", "merged"),
    [
        # same bounds: bucket by bucket
        (H([0.1, 1], [1, 3, 4], 2.5), H([0.1, 1], [0, 2, 2], 1.0), H([0.1, 1], [1, 5, 6], 3.5)),
        # a worker of another version with other bounds: the shared ones, exact
        (
            H([0.1, 0.5, 1], [1, 2, 3, 4], 2.5),
            H([0.1, 1, 5], [2, 2, 3, 3], 4.0),
            H([0.1, 1], [3, 5, 7], 6.5),
        ),
        # nothing shared: the count and the sum still hold
        (H([1], [1, 1], 0.5), H([2], [0, 1], 3.0), H([], [2], 3.5)),
    ],
)
def test_histograms_merge_exactly_on_the_bounds_both_have(a, b, merged):
    assert a + b == merged
    assert b + a == merged
    view = HostView()
    for pid, histo in ((1, a), (2, b)):
        view.report(
            WorkerReport(pid, 1, 1, 1.0, counts(0, histo=histo)),
            now=0,
        )
    assert view.totals().histograms[("handshake_duration_seconds",)] == merged
    view.leave((1, 1))  # retired histograms still count
    assert view.totals().histograms[("handshake_duration_seconds",)] == merged


def test_a_report_survives_the_wire():
    sent = WorkerReport(
        4242,
        3,
        7,
        1700000000.25,
        counts(5, calls=2, histo=H([0.1, 1], [1, 2, 2], 0.7)),
        calls=2,
        draining=True,
        final=True,
        process={"cpu_seconds": 1.5},
    )
    assert WorkerReport.from_wire(json.loads(json.dumps(sent.to_wire()))) == sent


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"pid": 1, "generation": 1, "seq": 1, "started": 1.0, "counts": []},
        {"pid": 1, "generation": 1, "seq": 1, "started": 1.0, "counts": {"counters": [["x"]]}},
        {"pid": 1, "generation": 1, "seq": 1, "started": 1.0, "counts": {"counters": [["x", -1]]}},
        {"pid": 1, "generation": 1, "seq": 1, "started": 1.0, "counts": {"counters": [[1, 2]]}},
        # Past 2**63 every /metrics render raised OverflowError (the review of session 24).
        {
            "pid": 1,
            "generation": 1,
            "seq": 1,
            "started": 1.0,
            "counts": {"counters": [["connections_total", 10**400]]},
        },
        {"pid": "1", "generation": 1, "seq": 1, "started": 1.0, "counts": {}},
        {
            "pid": 1,
            "generation": 1,
            "seq": 1,
            "started": 1.0,
            "counts": {"histograms": [["h", {"bounds": [1, 0.5], "cumulative": [1, 1, 1]}]]},
        },
        {
            "pid": 1,
            "generation": 1,
            "seq": 1,
            "started": 1.0,
            "counts": {"histograms": [["h", {"bounds": [1], "cumulative": [1], "sum": 0}]]},
        },
    ],
)
def test_a_report_that_is_not_one_is_named(broken):
    with pytest.raises(ReportError):
        WorkerReport.from_wire(broken)


def test_what_is_kept_of_workers_gone_is_bounded_however_many_go():
    """A crash-looping worker for a day (thousands of deaths) or a year of
    upgrades keeps at most _RETIRED_IDS_KEPT ids in the supervisor and in what
    it carries over its re-execution; a late report of the ones still kept is
    refused, and the one index stays equal to what it mirrors (the audit of
    what the supervisor keeps of workers gone)."""
    from fleet_ingress.core import host_view

    kept = host_view._RETIRED_IDS_KEPT
    view = HostView()
    for pid in range(1, 3 * kept + 1):
        view.report(report(pid, 1, 1, 1, started=float(pid)), now=0)
        view.leave((pid, 1))
    assert len(view._gone) == len(view._gone_ids) == kept
    assert set(view._gone) == view._gone_ids
    assert view.totals().counter(*KEY) == 3 * kept  # every one counted, once
    last = 3 * kept
    assert not view.report(report(last, 1, 2, 9, started=float(last)), now=1)
    carried = json.loads(json.dumps(view.to_json(now=1)))
    assert len(carried["gone"]) == kept
    again = HostView.from_json(carried, now=2)
    assert again._gone_ids == set(again._gone) == set(view._gone)
    assert not again.report(report(last, 1, 2, 9, started=float(last)), now=3)
    assert again.totals().counter(*KEY) == 3 * kept


def test_counts_read_quickly_take_and_refuse_what_they_did():
    """`Counts.from_wire` checks each entry by a quicker test first (the
    supervisor reads 4,000 of them a report at 500 fleets): what it takes and
    what it refuses, and the words it refuses with, are as before."""

    def read(counters):
        return Counts.from_wire({"counters": counters, "gauges": []})

    taken = read([["a", "f1", 2], ["a", "f1", 3], ["b", 0], ["c", 2**63 - 1]])
    assert taken.counters == {("a", "f1"): 5, ("b",): 0, ("c",): 2**63 - 1}
    assert all(type(part) is str for key in taken.counters for part in key)
    for bad, words in [
        ([["a", True]], "a count must be a whole number from 0 to 2**63, not True"),
        ([["a", 1.0]], "not 1.0"),
        ([["a", 2**63]], f"not {2**63}"),
        ([["a", -1]], "not -1"),
        ([["a", None, 1]], "a key is strings, not ['a', None]"),
        # A key and a count both wrong: the key is named, as before.
        ([["a", 7, -1]], "a key is strings, not ['a', 7]"),
        ([["a", ["f"], 1]], "a key is strings"),
    ]:
        with pytest.raises(ReportError) as refused:
            read(bad)
        assert words in str(refused.value)


def test_the_view_taken_every_second_writes_each_report_once_and_always_the_latest():
    """`to_json` (the crash snapshot's, taken every second) makes a report's
    wire form once and shares it while no newer report came (a report is read
    every 5 s with no call live); a newer report, a new process under the same
    pid and a worker gone are each written as they are, and what it gives
    reads back to the same view."""
    view = HostView()
    view.report(report(1, 1, 1, 5), 10.0)
    view.report(report(2, 1, 1, 7), 10.0)
    first = view.to_json(11.0)
    again = view.to_json(12.0)
    assert [e["report"] for e in again["latest"]] == [e["report"] for e in first["latest"]]
    assert all(
        a["report"] is b["report"] for a, b in zip(first["latest"], again["latest"], strict=True)
    )
    assert [e["age"] for e in again["latest"]] == [2.0, 2.0]

    def latest(data) -> dict[int, int]:
        return {e["report"]["pid"]: e["report"]["seq"] for e in data["latest"]}

    view.report(report(1, 1, 2, 9), 13.0)  # newer
    view.report(report(2, 1, 1, 3, started=200.0), 13.0)  # a new process, pid 2 again
    taken = view.to_json(13.0)
    assert latest(taken) == {1: 2, 2: 1}
    by_pid = {e["report"]["pid"]: e["report"] for e in taken["latest"]}
    assert by_pid[1] == report(1, 1, 2, 9).to_wire()
    assert by_pid[2] == report(2, 1, 1, 3, started=200.0).to_wire()
    view.leave((1, 1))
    taken = view.to_json(14.0)
    assert latest(taken) == {2: 1}
    back = HostView.from_json(json.loads(json.dumps(taken)), 14.0)
    assert back.totals() == view.totals()


def test_the_retired_counts_are_written_again_only_when_they_changed_and_follow_every_change():
    """`to_json` (taken every second) sorts the retired counts once, not each
    time: the same wire while they hold the same counts, and a new one after
    each kind of change made to them, wherever it is made (a worker retired,
    a counter raised or added in place, a key folded under another name, a
    histogram merged, a gauge, the whole `retired` replaced)."""
    from fleet_ingress.ops.local_counts import fold_fleets_gone

    view = HostView()
    view.report(report(1, 1, 1, 5), 10.0)
    view.leave((1, 1))
    first = view.to_json(11.0)["retired"]
    assert view.to_json(12.0)["retired"] is first
    assert first == view.retired.to_wire()
    histo = Histo((0.1, 1.0), (1, 2, 3), 2.5)

    def raised(v: HostView) -> None:
        v.retired.counters[KEY] += 1

    def added(v: HostView) -> None:
        v.retired.counters[("log_lines_dropped",)] += 3

    def folded(v: HostView) -> None:
        v.retired.counters[("fleet_calls", "gone-fleet")] = 4
        v.to_json(1.0)
        fold_fleets_gone(v.retired, {"kept"})

    def merged(v: HostView) -> None:
        v.retired.add(counts(0, histo=histo), gauges=False)

    def gauge(v: HostView) -> None:
        v.retired.gauges[("connections",)] = 1

    def replaced(v: HostView) -> None:
        v.retired = Counts.from_wire({**v.retired.to_wire(), "counters": [[*KEY, 99]]})

    def retired_again(v: HostView) -> None:
        v.report(report(2, 1, 1, 7), 13.0)
        v.leave((2, 1))

    for change in (raised, added, folded, merged, merged, gauge, replaced, retired_again):
        before = view.to_json(13.0)["retired"]
        change(view)
        after = view.to_json(14.0)["retired"]
        assert after == view.retired.to_wire() != before, change.__name__
        assert view.to_json(15.0)["retired"] is after, change.__name__
