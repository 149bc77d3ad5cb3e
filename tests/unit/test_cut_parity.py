"""What session 43's cuts of a call's Python work kept as it was, where no
other test looked (the review of session 43, each checked by breaking the
line it pins in a scratch copy): a log line's pid in a forked child, a
line's and a call's second at a second's edge and after the clock steps
back, a head's names looked up in any case, and a worker of a release
before closing calls were listed named as not saying them. No sockets."""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import os
from types import SimpleNamespace
from typing import Any

import pytest

from fleet_ingress.core.call_list import CallFilter
from fleet_ingress.core.request_head import parse_request_head
from fleet_ingress.logs import JsonFormatter, TextFormatter
from fleet_ingress.net.calls import Call
from fleet_ingress.ops.call_display import format_calls_table
from fleet_ingress.service.worker_calls import WorkerCalls

# 2026-12-07 12:00:00 UTC, and a fraction just under a second that a binary
# float holds exactly (0.999 does not: its milliseconds would read 998).
NOON = calendar.timegm((2026, 12, 7, 12, 0, 0))
ALMOST = 1 - 2**-10  # 0.9990234375


def _record_at(created: float) -> logging.LogRecord:
    """A record made at `created`, its milliseconds as logging makes them."""
    record = logging.LogRecord(
        "fleet_ingress.access", logging.INFO, "", 0, "call ended", None, None
    )
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_a_forked_child_s_lines_say_its_own_pid():
    """The formatters keep the pid (a getpid system call a line, asked no
    more): a child forked from the process says its own, not its parent's."""
    record = _record_at(NOON)
    json_lines, text_lines = JsonFormatter(pid=True), TextFormatter(pid=True)
    assert json.loads(json_lines.format(record))["process"] == os.getpid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            said = [os.getpid(), json_lines.format(record), text_lines.format(record)]
            os.write(write_end, json.dumps(said).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child_pid, json_line, text_line = json.loads(os.read(read_end, 4096))
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    assert child_pid != os.getpid()
    assert json.loads(json_line)["process"] == child_pid
    assert text_line.endswith(f"process={child_pid}")
    assert json.loads(json_lines.format(record))["process"] == os.getpid()  # the parent's own


def test_a_line_s_time_is_its_own_second_at_a_second_s_edge_and_after_a_step_back():
    """A line's second is written once a second (the last one's text kept):
    the last millisecond of a second and the first of the next are two
    seconds, and a clock stepped back writes the earlier second again."""
    formatter = JsonFormatter()
    said = [
        json.loads(formatter.format(_record_at(NOON + offset)))["time"]
        for offset in (ALMOST, 1.0, 1.5, 0.25, 3601.0, 0.5)
    ]
    assert said == [
        "2026-12-07T12:00:00.999Z",
        "2026-12-07T12:00:01.000Z",
        "2026-12-07T12:00:01.500Z",
        "2026-12-07T12:00:00.250Z",  # stepped back
        "2026-12-07T13:00:01.000Z",
        "2026-12-07T12:00:00.500Z",
    ]


class _Carrier:
    bytes_received = 0


def test_a_call_s_start_is_its_own_second_at_a_second_s_edge_and_after_a_step_back():
    """A call's `started` (its access line, its slot requests, its listing)
    is written once a second: a call started at 12:00:00.999 and one at
    12:00:01.000 do not share a text, nor does one whose clock stepped back."""
    started = [
        Call(_Carrier(), "192.0.2.1", "/ws/", "bot", started_at=NOON + offset).identity()["started"]  # type: ignore[arg-type]
        for offset in (ALMOST, 1.0, 0.5, 86400.0)
    ]
    assert started == [
        "2026-12-07T12:00:00Z",
        "2026-12-07T12:00:01Z",
        "2026-12-07T12:00:00Z",
        "2026-12-08T12:00:00Z",
    ]


def test_a_head_s_names_are_found_in_any_case():
    """Lookups take a name as given when the head has it so (lowercase: the
    callers'), and lowercased when not: any casing finds the same values."""
    head = parse_request_head(
        b"GET /ws/x HTTP/1.1\r\nHost: f\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: websocket\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-For: 192.0.2.8\r\n\r\n"
    )
    for name in (b"x-forwarded-for", b"X-Forwarded-For", b"X-FORWARDED-FOR"):
        assert head.get_all(name) == [b"192.0.2.7", b"192.0.2.8"]
        assert head.get(name) == b"192.0.2.7"
    for name in (b"connection", b"Connection", b"CONNECTION"):
        assert head.tokens(name) == {b"keep-alive", b"upgrade"}
    assert head.get(b"Host") == head.get(b"host") == head.host == b"f"
    assert head.get(b"X-Absent") is None and head.get_all(b"X-Absent") == []


def test_a_worker_of_a_release_before_closing_calls_is_named_not_counted_as_none():
    """An upgrade's old generation (a release before closing calls were
    listed) answers `list-calls` with no `closing`: its row says None (not
    said), not 0, and the table names it as not listing them; a worker that
    said none closing is not named."""
    workers = {
        key: SimpleNamespace(
            pid=pid, generation=gen, key=key, left=asyncio.Event(), channel_lost=False
        )
        for key, pid, gen in ((1, 101, 1), (2, 202, 2))
    }
    call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot")  # type: ignore[arg-type]
    row = call.listed(call.started_mono + 3.0, 202, 2)
    answers: dict[int, dict[str, Any]] = {
        101: {"calls": []},  # the old release's last part: no "closing"
        202: {"calls": [row], "closing": []},
    }

    async def ask_workers(op: str, wait: float, **_: Any) -> dict[int, dict[str, Any]]:
        assert op == "list-calls"
        return answers

    asks = SimpleNamespace(ask_workers=ask_workers, waiting=lambda ask: False)
    server = SimpleNamespace(of_a_release_before_calls=lambda key: False)
    listing = asyncio.run(WorkerCalls(asks, server, workers).list_calls(CallFilter()))  # type: ignore[arg-type]
    assert listing["closing"] == []
    by_pid = {w["pid"]: w for w in listing["workers"]}
    assert (by_pid[101]["closing"], by_pid[202]["closing"]) == (None, 0)
    table = format_calls_table(listing)
    named = [line for line in table.splitlines() if "closing calls of worker" in line]
    assert len(named) == 1 and "101" in named[0] and "202" not in named[0], table


class _ClosingCarrier(_Carrier):
    aborted = 0

    def abort(self) -> None:
        self.aborted += 1


def test_end_call_of_a_call_closing_answers_its_closing_row_and_cuts_it():
    """`end-call` of a call ended whose sides are still closing answers the
    row `calls` lists it with (how long closing, the end_reason its line
    says, no quiet: not watched any more), `closing` and `aborted`, and cuts
    its sides at once."""
    from fleet_ingress.core.call_machine import CallMachine, EndReason, State
    from fleet_ingress.net.calls import Registry, end_call

    async def ending() -> tuple[dict[str, Any] | None, Call]:
        registry = Registry()
        machine = CallMachine(None, State.CLOSING)  # type: ignore[arg-type]  # rules not read
        machine.end_reason = EndReason.CARRIER_CLOSED
        call = Call(_ClosingCarrier(), "192.0.2.2", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
        registry.add_call(call)
        assert registry.remove_call(call)
        call.ended_mono = call.started_mono
        return await end_call(registry, call.id, "stuck", 4242, 2), call

    row, call = asyncio.run(ending())
    assert row is not None and row["closing"] is True and row["aborted"] is True
    assert row["end_reason"] == "carrier closed" and row["closing_s"] is not None
    assert row["carrier_quiet_s"] is None and row["fleet_quiet_s"] is None
    assert call.carrier.aborted == 1  # type: ignore[attr-defined]


def test_a_call_listed_live_that_ends_during_the_listing_is_not_listed_closing_too(
    monkeypatch: pytest.MonkeyPatch,
):
    """A worker lists its live calls a part a turn, then its closing ones: a
    call shown live that ends between turns (a mass hang-up as an operator
    looks) is in `closing` by then, and was listed twice, live and closing
    (250 live calls, 100 of them ended after the first turn: 43 twice)."""
    from fleet_ingress.core.call_machine import CallMachine, EndReason, State
    from fleet_ingress.net import calls as calls_module
    from fleet_ingress.net.calls import Registry
    from fleet_ingress.service.worker import Worker

    monkeypatch.setattr(calls_module, "LIST_TURN", 3)
    registry = Registry()
    made = []
    for _ in range(9):
        machine = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]  # rules not read
        call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
        registry.add_call(call)
        made.append(call)
    parts: list[dict[str, Any]] = []

    def send(message: dict[str, Any]) -> None:
        parts.append(message)
        if len(parts) == 1:  # after the first turn, every call ends (its sides closing)
            for call in made:
                assert call.machine is not None
                call.machine.end_reason = EndReason.CARRIER_CLOSED
                assert registry.remove_call(call)

    worker = SimpleNamespace(
        client=SimpleNamespace(generation=2, send=send),
        ingress=SimpleNamespace(registry=registry),
    )
    asyncio.run(Worker.list_calls(worker, 1, CallFilter()))  # type: ignore[arg-type]
    live = [row["call_id"] for part in parts for row in part["calls"]]
    closing = [row["call_id"] for part in parts for row in part.get("closing", [])]
    assert len(live) == 3 and parts[-1]["more"] is False
    assert sorted(live + closing) == sorted(call.id for call in made)  # each once


def test_an_ingress_run_as_one_process_lists_its_closing_calls_apart_and_counts_them():
    """`Ingress.list_calls` (the one-process ingress, generation 1) answers as a
    worker does: live calls in `calls`, calls ended and still closing in
    `closing`, each once, and its row counts both (review43b: no test looked)."""
    from fleet_ingress.core.call_machine import CallMachine, EndReason, State
    from fleet_ingress.net.calls import Registry
    from fleet_ingress.service.ingress import Ingress

    registry = Registry()
    made = []
    for _ in range(3):
        machine = CallMachine(None, State.TUNNEL)  # type: ignore[arg-type]  # rules not read
        call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot", machine=machine)  # type: ignore[arg-type]
        registry.add_call(call)
        made.append(call)
    ended = made[0]
    assert ended.machine is not None
    ended.machine.end_reason = EndReason.CARRIER_CLOSED
    assert registry.remove_call(ended)  # ended, its sides still closing

    ingress = SimpleNamespace(registry=registry)
    answer = asyncio.run(Ingress.list_calls(ingress, CallFilter()))  # type: ignore[arg-type]
    assert sorted(row["call_id"] for row in answer["calls"]) == sorted(c.id for c in made[1:])
    assert [row["call_id"] for row in answer["closing"]] == [ended.id]
    assert answer["closing"][0]["end_reason"] == "carrier closed"
    (row,) = answer["workers"]
    assert (row["generation"], row["calls"], row["closing"]) == (1, 2, 1)
