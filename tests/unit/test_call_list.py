"""`fleet-ingress calls` / `end-call`: the filter, the ids, the order, the
text, and the listing in turns, without sockets."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from fleet_ingress.core.call_list import (
    TAG_LENGTH,
    CallFilter,
    CallIdError,
    FilterError,
    host_call_id,
    new_process_tag,
    oldest_first,
    parse_call_id,
    shown_state,
)
from fleet_ingress.core.call_machine import CallMachine, EndReason, State
from fleet_ingress.net import calls as calls_module
from fleet_ingress.net.calls import Call, Registry, list_calls_in_turns
from fleet_ingress.ops.call_display import (
    describe_ended,
    format_calls_table,
    shown_age,
    shown_bytes,
)


def test_every_machine_state_reads_as_one_of_four_words():
    assert {shown_state(s) for s in State} == {"waiting", "connecting", "tunnel", "closing"}
    assert shown_state(State.LEASING) == "waiting"
    assert shown_state(State.AWAITING) == "connecting"
    assert shown_state(State.TUNNEL) == "tunnel"
    assert shown_state(State.HALF_CLOSED) == "closing"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, CallFilter()),
        ({"fleet": "a"}, CallFilter(fleet="a")),
        ({"bot": "b-1", "longer_than": "90"}, CallFilter(bot="b-1", longer_than=90.0)),
        ({"fleet": ""}, CallFilter()),
        ({"longer_than": "0"}, CallFilter(longer_than=0.0)),
    ],
)
def test_a_query_is_read_as_its_filter(query, expected):
    assert CallFilter.from_query(query) == expected
    assert CallFilter.from_wire(expected.to_wire()) == expected


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ({"flet": "a"}, "unknown filter 'flet'"),
        ({"longer_than": "soon"}, "longer_than 'soon' is not a number"),
        ({"longer_than": "-1"}, "is not a number of seconds"),
        ({"longer_than": "nan"}, "is not a number of seconds"),
        ({"longer_than": "1e9"}, "is not a number of seconds"),
    ],
)
def test_a_filter_that_means_nothing_is_refused_naming_it(query, said):
    with pytest.raises(FilterError, match=said):
        CallFilter.from_query(query)


def test_odd_filter_fields_on_the_wire_are_no_filter():
    assert CallFilter.from_wire(None) == CallFilter()
    assert CallFilter.from_wire({"fleet": 3, "longer_than": "x"}) == CallFilter()
    assert CallFilter.from_wire({"longer_than": float("inf")}) == CallFilter()


def test_all_given_filters_must_hold():
    f = CallFilter(fleet="a", bot="b", longer_than=60)
    assert f.keeps("a", "b", 61)
    assert not f.keeps("a", "b", 60)  # longer than: strictly
    assert not f.keeps("x", "b", 61)
    assert not f.keeps("a", "x", 61)
    assert not CallFilter(fleet="a").keeps(None, "b", 1)  # no fleet yet: not on a
    assert CallFilter().keeps(None, "", 0)


@pytest.mark.parametrize(
    ("text", "tag"),
    [("4242-17-k3f9", "k3f9"), (" 4242-17-K3F9 ", "k3f9"), ("4242-17", None), ("4242-17 ", None)],
)
def test_a_call_id_is_its_worker_s_pid_its_number_and_its_worker_s_tag(text, tag):
    assert parse_call_id(text) == (4242, 17, tag)


def test_a_process_tag_is_short_typeable_and_round_trips():
    tag = new_process_tag(bytes(range(200, 204)))
    assert len(tag) == TAG_LENGTH and tag.isalnum() and tag == tag.lower()
    assert not set(tag) & set("ilou")
    assert parse_call_id(host_call_id(4242, 17, tag)) == (4242, 17, tag)
    assert host_call_id(4242, 17, None) == "4242-17"
    assert len({new_process_tag(bytes([b, 0, 0, 0])) for b in range(256)}) == 32


@pytest.mark.parametrize(
    "text",
    ["17", "4242", "4242-", "-17", "a-1", "1-b", "0-1", "1-0", "1-2-3x9", "1-2-k3f", "1-2-k3fi"],
)
def test_anything_else_is_refused_saying_the_form(text):
    with pytest.raises(CallIdError, match="PID-N-TAG") as caught:
        parse_call_id(text)
    assert repr(text) in str(caught.value)


def _row(pid: int, n: int, age: float, **more: Any) -> dict[str, Any]:
    return {
        "id": f"{pid}-{n}",
        "pid": pid,
        "generation": 1,
        "call_id": n,
        "age_s": age,
        "started_monotonic": 10_000.0 - age,
        "state": "tunnel",
        "fleet": "a",
        "bot_id": f"bot-{n}",
        "client_ip": "192.0.2.7",
        "route": "/ws/",
        "bytes_from_carrier": 1536,
        "bytes_to_carrier": 3 * 1024 * 1024,
        "carrier_quiet_s": 0.0,
        "fleet_quiet_s": 12.5,
        **more,
    }


def test_rows_of_every_worker_are_oldest_first_by_the_host_s_clock():
    # Ages read a moment apart by each worker (2-1's a little later) do not
    # decide: when each call began, on the one monotonic clock, does.
    rows = [
        _row(2, 1, 5.1, started_monotonic=1000.0),
        _row(1, 9, 300.0, started_monotonic=705.0),
        _row(1, 3, 5.0, started_monotonic=1000.05),
        _row(2, 2, 4000.0, started_monotonic=-2995.0),
    ]
    assert [r["id"] for r in oldest_first(rows)] == ["2-2", "1-9", "2-1", "1-3"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (0.4, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m")],
)
def test_an_age_reads_to_the_unit_that_matters(seconds, shown):
    assert shown_age(seconds) == shown
    assert shown_age(2 * 86400 + 4 * 3600) == "2d04h"


def test_bytes_read_in_binary_units():
    assert [shown_bytes(n) for n in (None, 0, 1023, 1536, 3 * 1024**2, 5 * 1024**4)] == [
        "-",
        "0B",
        "1023B",
        "1.5KiB",
        "3.0MiB",
        "5120.0GiB",
    ]


def test_the_table_is_aligned_oldest_first_with_a_count_line():
    answer = {
        "calls": [
            _row(4242, 7, 3725.0, bot_id="a-long-bot-name"),
            _row(
                4243,
                12,
                2.0,
                generation=2,
                state="waiting",
                fleet=None,
                carrier_quiet_s=None,
                fleet_quiet_s=None,
            ),
        ],
        "filter": {"fleet": "a"},
        "workers": [
            {"pid": 4242, "generation": 1, "answered": True, "calls": 1},
            {"pid": 4243, "generation": 2, "answered": True, "calls": 1},
            {"pid": 4244, "generation": 2, "answered": False, "calls": None},
        ],
        "channel_lost": [4245],
    }
    lines = format_calls_table(answer).splitlines()
    header, first, second = lines[:3]
    assert header.split() == [
        "id", "gen", "age", "state", "fleet", "bot", "carrier", "route",
        "from", "carrier", "to", "carrier", "quiet", "c/f",
    ]  # fmt: skip
    # Aligned: each column starts where its header does.
    for column in ("age", "state", "fleet", "bot", "carrier", "route"):
        at = header.index(column)
        assert first[at - 1] == " " and first[at] != " ", column
        assert second[at - 1] == " " and second[at] != " ", column
    assert first.split()[:6] == ["4242-7", "1", "1h02m", "tunnel", "a", "a-long-bot-name"]
    assert "1.5KiB" in first and "3.0MiB" in first and first.endswith("0s/12s")
    assert second.split()[:5] == ["4243-12", "2", "2s", "waiting", "-"]
    assert second.endswith("  -")
    assert lines[3] == "2 calls on fleet a (2 workers, generations 1, 2); oldest first"
    assert "NOT LISTED: the calls of worker 4244, which did not answer" in lines[4]
    assert "NOT LISTED: the calls of worker 4245, whose channel" in lines[5]
    assert "fleet-ingress end-call ID" in lines[6]


def test_a_long_bot_id_is_cut_in_the_table_only():
    answer = {
        "calls": [_row(1, 1, 5.0, bot_id="b" * 256)],
        "workers": [{"pid": 1, "answered": True}],
    }
    (row,) = [line for line in format_calls_table(answer).splitlines() if line.startswith("1-1")]
    assert row.split()[5] == "b" * 31 + "~"


def test_no_call_is_a_count_line_alone():
    answer = {"calls": [], "filter": {}, "workers": [{"pid": 1, "answered": True}]}
    assert format_calls_table(answer) == "0 calls (1 worker); oldest first"


def _closing(pid: int, n: int, age: float, closing_s: float, **more: Any) -> dict[str, Any]:
    return _row(
        pid,
        n,
        age,
        state="closing",
        closing_s=closing_s,
        end_reason="carrier closed",
        carrier_quiet_s=None,
        fleet_quiet_s=None,
        **more,
    )


def test_calls_closing_are_listed_below_the_live_ones_with_how_long_and_why_they_ended():
    """`stat` says "1 closing": the listing names which call, how long it
    has been closing and how it ended, with the id `end-call` takes; the
    live calls' table, count line and fields are as they were."""
    answer = {
        "calls": [_row(4242, 7, 3725.0)],
        "closing": [_closing(4242, 9, 65.0, 4.2), _closing(4243, 2, 8.0, 0.4, fleet=None)],
        "filter": {},
        "workers": [
            {"pid": 4242, "generation": 1, "answered": True, "calls": 1, "closing": 1},
            {"pid": 4243, "generation": 1, "answered": True, "calls": 0, "closing": 1},
        ],
        "channel_lost": [],
    }
    text = format_calls_table(answer)
    lines = text.splitlines()
    live = format_calls_table({**answer, "closing": []}).splitlines()
    assert lines[: len(live)] == live  # the live calls' part unchanged
    assert live[1].split()[:4] == ["4242-7", "1", "1h02m", "tunnel"]
    assert live[2] == "1 call (2 workers); oldest first"
    blank, header, first, second, count = lines[len(live) :]
    assert blank == ""
    assert header.split() == [
        "id", "gen", "age", "closing", "end_reason", "fleet", "bot", "carrier", "route",
        "from", "carrier", "to", "carrier",
    ]  # fmt: skip
    for column in ("age", "closing", "end_reason", "fleet", "bot"):
        at = header.index(column)
        assert first[at - 1] == " " and first[at] != " ", column
        assert second[at - 1] == " " and second[at] != " ", column
    at = header.index("end_reason")
    assert first[at : header.index("fleet")] == "carrier closed  ", first
    assert first[header.index("fleet") : header.index("bot")].strip() == "a", first
    assert first.split()[:4] == ["4242-9", "1", "1m05s", "4s"]
    assert second.split()[:4] == ["4243-2", "1", "8s", "0s"]
    assert second[header.index("fleet") : header.index("bot")].strip() == "-", second
    assert first.endswith("1.5KiB        3.0MiB"), first
    assert count.startswith("2 calls closing: ended, access line written, connections still")
    assert "`fleet-ingress end-call ID`" in count and "NOT LISTED" not in text


def test_no_call_closing_adds_nothing_and_a_worker_that_does_not_say_is_named():
    """No closing call: the listing as before. A worker that answered
    without saying its closing calls (an upgrade's old generation, a release
    before them) is named NOT LISTED; an ingress of a release before them
    (no `closing` in its answer) has nothing said of them, as before."""
    none = {
        "calls": [],
        "closing": [],
        "filter": {},
        "workers": [{"pid": 1, "answered": True, "calls": 0, "closing": 0}],
    }
    assert format_calls_table(none) == "0 calls (1 worker); oldest first"
    old_worker = {
        **none,
        "closing": [_closing(1, 3, 20.0, 2.0)],
        "workers": [
            {"pid": 1, "generation": 2, "answered": True, "calls": 0, "closing": 1},
            {"pid": 2, "generation": 1, "answered": True, "calls": 0, "closing": None},
        ],
    }
    lines = format_calls_table(old_worker).splitlines()
    assert lines[0] == "0 calls (2 workers, generations 1, 2); oldest first"
    assert lines[3].split()[:5] == ["1-3", "1", "20s", "2s", "carrier"]
    assert lines[4].startswith("1 call closing: ")
    assert lines[5].startswith(
        "NOT LISTED: the closing calls of worker 2, of a release before they were listed"
    )
    before = {"calls": [], "filter": {}, "workers": [{"pid": 1, "answered": True}]}
    assert format_calls_table(before) == "0 calls (1 worker); oldest first"


def test_an_ended_call_is_said_with_who_it_was_and_why():
    said = describe_ended({"ended": _row(4242, 7, 65.0), "reason": "stuck"})
    assert said.startswith(
        "ended call 4242-7 (bot bot-7 on fleet a, from 192.0.2.7, tunnel, up 1m05s)"
    )
    assert "end_reason admin, reason: stuck" in said
    aborted = describe_ended({"ended": _row(4242, 7, 65.0, aborted=True), "reason": ""})
    assert "aborted" in aborted and "reason" not in aborted.split("admin")[1]


class _Carrier:
    bytes_received = 0
    lost = False
    reading_paused = False
    call = None

    def __init__(self) -> None:
        self.ended: list[tuple[EndReason, str]] = []

    def request_end(self, reason: EndReason, why: str = "") -> None:
        self.ended.append((reason, why))


async def test_a_listing_reads_its_calls_a_part_a_turn_and_skips_those_ended_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(calls_module, "LIST_TURN", 3)
    registry = Registry()
    now = time.monotonic()
    made = []
    for i in range(8):
        machine = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]  # rules not read
        call = Call(_Carrier(), "192.0.2.1", "/ws/", f"bot-{i % 2}", machine=machine)  # type: ignore[arg-type]
        call.started_mono = now - i
        registry.add_call(call)
        made.append(call)
    parts = []
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counter = asyncio.ensure_future(count_turns())
    await asyncio.sleep(0)
    in_order = list(registry.calls)  # the order the listing reads them in
    async for rows in list_calls_in_turns(registry, CallFilter(bot="bot-1"), 4242, 3):
        parts.append(rows)
        if len(parts) == 1:  # the last bot-1 call ends between turns: not listed
            registry.calls.discard([c for c in in_order if c.bot_id == "bot-1"][-1])
    counter.cancel()
    turns_between = turns
    assert len(parts) == 3 and turns_between >= 2  # 8 calls, 3 a turn: the loop ran between
    listed = [r for part in parts for r in part]
    assert {r["bot_id"] for r in listed} == {"bot-1"} and len(listed) == 3
    assert {r["pid"] for r in listed} == {4242} and {r["generation"] for r in listed} == {3}
    assert all(r["state"] == "tunnel" and r["carrier_quiet_s"] is None for r in listed)


async def test_a_listing_of_the_calls_closing_reads_those_still_closing_with_how_long(
    monkeypatch: pytest.MonkeyPatch,
):
    """`closing=True` lists `Registry.closing` (the live calls not), in
    turns, with the filter, each row its `listed` fields and how long it has
    been closing, the end_reason its access line says, no quiet (not
    watched); one gone (`forget_call`) between turns is left out."""
    monkeypatch.setattr(calls_module, "LIST_TURN", 2)
    registry = Registry()
    now = time.monotonic()
    tunnel = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]
    live = Call(_Carrier(), "192.0.2.1", "/ws/", "bot-live", machine=tunnel)  # type: ignore[arg-type]
    registry.add_call(live)
    ended = []
    for i in range(5):
        machine = CallMachine(None, State.CLOSING)  # type: ignore[arg-type]
        machine.end_reason = EndReason.CARRIER_CLOSED
        call = Call(_Carrier(), "192.0.2.2", "/ws/", f"bot-{i % 2}", machine=machine)  # type: ignore[arg-type]
        call.started_mono = now - 100 - i
        registry.add_call(call)
        assert registry.remove_call(call)
        call.ended_mono = now - 3.0
        ended.append(call)
    parts = []
    in_order = list(registry.closing)
    async for rows in list_calls_in_turns(registry, CallFilter(bot="bot-0"), 4242, 2, closing=True):
        parts.append(rows)
        if len(parts) == 1:
            registry.forget_call([c for c in in_order if c.bot_id == "bot-0"][-1])
    listed = [r for part in parts for r in part]
    assert len(parts) == 3 and len(listed) == 2, parts
    for row in listed:
        assert row["bot_id"] == "bot-0" and row["state"] == "closing"
        assert row["end_reason"] == "carrier closed" and 3.0 <= row["closing_s"] < 4.0
        assert row["carrier_quiet_s"] is None and row["fleet_quiet_s"] is None
        assert row["id"] == host_call_id(4242, row["call_id"], calls_module.process_tag())
    everyone = CallFilter()
    live_rows = [r async for part in list_calls_in_turns(registry, everyone, 1, 1) for r in part]
    assert [r["bot_id"] for r in live_rows] == ["bot-live"] and "closing_s" not in live_rows[0]


def test_the_supervisor_gathers_a_worker_s_closing_parts_apart_from_its_live_ones():
    """A worker's answer comes in parts: its live calls', then its closing
    ones' (`closing`); the supervisor answers the listing with both, in
    order. A worker whose parts never say `closing` (a release before it)
    is answered with None for them, not an empty list."""
    from types import SimpleNamespace

    from fleet_ingress.service.worker_calls import WorkerCalls

    answered: list[tuple[int, dict[str, Any]]] = []
    asks = SimpleNamespace(waiting=lambda ask: True, answered=lambda k, m: answered.append((k, m)))
    calls = WorkerCalls(asks, None, {})  # type: ignore[arg-type]
    parts = [
        {"calls": [{"id": "1"}, {"id": "2"}], "more": True},
        {"calls": [], "closing": [{"id": "3"}], "more": True},
        {"calls": [], "closing": [{"id": "4"}], "more": True},
        {"calls": [], "closing": [], "more": False},
    ]
    for part in parts:
        calls.calls_listed(7, {"op": "calls-listed", "id": 1, **part})
    (key, answer), *_ = answered
    assert key == 7 and [r["id"] for r in answer["calls"]] == ["1", "2"]
    assert [r["id"] for r in answer["closing"]] == ["3", "4"]
    for part in ({"calls": [{"id": "5"}], "more": True}, {"calls": [], "more": False}):
        calls.calls_listed(8, {"op": "calls-listed", "id": 2, **part})
    assert answered[1][1]["calls"] == [{"id": "5"}] and answered[1][1]["closing"] is None


def test_calls_of_a_fleet_removed_whose_call_is_closing_is_no_unknown_fleet():
    """`calls --fleet f` of a fleet the host no longer has is refused 404
    (a typo), but not while a call of it is listed: one closing counts."""
    from types import SimpleNamespace

    from fleet_ingress.ops.admin_server import _no_such_fleet
    from fleet_ingress.ops.fleet_ops import FleetChangeError

    ops = SimpleNamespace(fleets=SimpleNamespace(get=lambda name: None, fleets=[]))
    workers = [{"pid": 1, "answered": True, "calls": 0, "closing": 1}]
    closing = {"calls": [], "closing": [_closing(1, 2, 30.0, 1.0, fleet="f")], "workers": workers}
    _no_such_fleet(ops, CallFilter(fleet="f"), closing)  # type: ignore[arg-type]
    with pytest.raises(FleetChangeError, match="no fleet named 'f'"):
        _no_such_fleet(ops, CallFilter(fleet="f"), {**closing, "closing": []})  # type: ignore[arg-type]


def test_a_call_waiting_for_a_slot_is_on_no_fleet_even_after_an_attempt():
    """A retry waits for its next slot: the fleet it tried (its last lease)
    is not the one it is on, for the row and for --fleet alike."""
    from types import SimpleNamespace

    machine = CallMachine(None, State.LEASING)  # type: ignore[arg-type]
    call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
    call.lease = SimpleNamespace(fleet=SimpleNamespace(name="a"), held=False)  # type: ignore[assignment]
    now = time.monotonic()
    assert call.listed(now, 1, 1)["fleet"] is None
    machine.state = State.CONNECTING
    assert call.listed(now, 1, 1)["fleet"] == "a"
    machine.state = State.CLOSING  # ended: the fleet it was on, its slot given back or not
    assert call.listed(now, 1, 1)["fleet"] == "a"


class _EndingCarrier(_Carrier):
    """A carrier side whose end request reaches its call's machine as the
    proxy's does: the first reason stands (`CallMachine._end`)."""

    def __init__(self, machine: CallMachine) -> None:
        super().__init__()
        self.machine = machine

    def request_end(self, reason: EndReason, why: str = "") -> None:
        super().request_end(reason, why)
        if self.machine.end_reason is None:
            self.machine.end_reason = reason


@pytest.mark.parametrize(
    ("ending_as", "logged"),
    [(None, "admin"), (EndReason.CARRIER_CLOSED, "carrier closed")],
)
async def test_end_call_answers_the_end_reason_its_access_line_says(ending_as, logged):
    """A call already ending when end-call reaches it (its carrier hung up,
    the fleet's reply awaited) keeps its own reason, as its access line does:
    the answer and the CLI's line say that one, not `admin`."""
    from fleet_ingress.net.calls import end_call

    registry = Registry()
    machine = CallMachine(None, State.TUNNEL if ending_as is None else State.CLOSING)  # type: ignore[arg-type]
    machine.end_reason = ending_as
    call = Call(_EndingCarrier(machine), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
    registry.add_call(call)
    # Its end settled a moment after (its line), its sides gone after that
    # (the proxy's work): out of the registry; end-call waits for both.
    asyncio.get_running_loop().call_later(0.1, registry.remove_call, call)
    asyncio.get_running_loop().call_later(0.15, registry.forget_call, call)
    row = await end_call(registry, call.id, "ticket 9", 4242, 1)
    assert row is not None and not row.get("aborted")
    assert row["end_reason"] == logged
    assert registry.ended == {("", logged): 1}  # what its access line and counts say
    said = describe_ended({"ended": row, "reason": "ticket 9"})
    if logged == "admin":
        assert said.endswith("its access line says end_reason admin, reason: ticket 9")
    else:
        assert "end_reason carrier closed" in said and "end_reason admin" not in said


async def test_a_worker_ends_no_call_for_an_id_of_another_process_s_tag():
    """A worker's own check of the tag (review36g: no test reached it), for
    when the supervisor did not know its tag yet (kept over an exec, its
    state unread): an id with another tag ends nothing and is answered with
    this worker's tag; with its own, the call ends."""
    from types import SimpleNamespace

    from fleet_ingress.service.worker import Worker

    registry = Registry()
    machine = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]
    carrier = _EndingCarrier(machine)
    carrier.abort = lambda: None  # type: ignore[attr-defined]  # (ended by mistake: cut)
    call = Call(carrier, "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
    registry.add_call(call)
    sent: list[dict[str, Any]] = []
    worker = Worker.__new__(Worker)
    worker.client = SimpleNamespace(send=sent.append, generation=1)  # type: ignore[assignment]
    worker.ingress = SimpleNamespace(registry=registry)  # type: ignore[assignment]
    mine = calls_module.process_tag()
    other = "zzzz" if mine != "zzzz" else "yyyy"
    await worker.end_call(7, call.id, "x", other)
    assert sent == [{"op": "call-ended", "id": 7, "call": None, "tag": mine}]
    assert carrier.ended == [] and machine.end_reason is None  # untouched
    asyncio.get_running_loop().call_later(0.05, registry.remove_call, call)
    asyncio.get_running_loop().call_later(0.1, registry.forget_call, call)
    await worker.end_call(8, call.id, "x", mine)
    assert sent[1]["id"] == 8 and sent[1]["call"]["end_reason"] == "admin", sent


async def test_a_calls_identity_and_silence_watch_make_no_getpid(
    monkeypatch: pytest.MonkeyPatch,
):
    """os.getpid() and CPython 3.11's asyncio.get_running_loop() are each a
    getpid system call: a churned call's identity asked two and its silence
    watch one (session 41). The pid is kept for the process, and the watch
    takes the loop of the pass already due (asked once, for the first call)."""
    from fleet_ingress.core.silence import SilenceLimits

    pid = os.getpid()
    asked: list[str] = []
    real_loop = asyncio.get_running_loop
    monkeypatch.setattr(os, "getpid", lambda: asked.append("getpid") or pid)
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: asked.append("loop") or real_loop())
    registry = Registry()
    try:
        for _ in range(3):
            machine = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]
            call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
            assert call.identity()["call"].startswith(f"{pid}-{call.id}-")
            registry.sweep.watch(call, SilenceLimits(idle=30.0))
        assert asked == ["loop"]
    finally:
        registry.sweep.stop()


def test_a_forked_child_has_its_own_pid_and_tag_in_its_call_ids():
    """The pid and tag kept for the process (`process_tag`) are drawn again
    in a child forked from it: two processes never share a call id."""
    machine = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]
    call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
    parent_tag = calls_module.process_tag()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.write(write_end, f"{os.getpid()} {call.identity()['call']}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        said = os.read(read_end, 200).decode()
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    child_pid, child_id = said.split()
    pid, n, tag = child_id.split("-")
    assert (int(pid), int(n)) == (int(child_pid), call.id) and pid != str(os.getpid())
    assert tag != parent_tag
    assert call.identity()["call"] == f"{os.getpid()}-{call.id}-{parent_tag}"


def test_an_access_line_names_the_call_as_its_slot_request_did_and_as_one_that_asked_none():
    """A guard (it passes before and after `access_record` took who the call
    is from `described`, built at its first slot request, rather than making
    `identity()` again): the same fields in the same order, identity's first."""
    machine = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]
    call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
    call.ended_mono = call.started_mono + 1.5
    asked_none = call.access_record()
    assert call.described["call_id"] == call.id  # its slot request's
    asked = call.access_record()
    assert list(asked.items()) == list(asked_none.items())
    assert list(asked)[: len(call.identity())] == list(call.identity())
    assert "started_at" not in asked and "started_monotonic" not in asked
