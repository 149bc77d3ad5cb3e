"""The access line of a call retried off a fleet names every fleet it tried
(`tried`, net/calls.py `Call.access_record`): real TLS calls through the
ingress, a fleet that refuses its connections, one that answers."""

from __future__ import annotations

import json
import logging

import pytest
from websockets.asyncio.client import connect

from fleet_ingress.logs import JsonFormatter, TextFormatter
from tests.support import (
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    access_entries,
    answer,
    echo,
    eventually,
    free_port,
    raw_exchange,
    wss_url,
)


async def test_a_call_refused_by_one_fleet_then_answered_by_another_lists_both_in_order(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """Round robin starts on the first fleet listed: a, whose port refuses
    the connection; b answers. The line's `fleet` is b (the last attempt's,
    as before) and `tried` says a was tried first and what came of it. The
    next call, answered by its first fleet, has no `tried` (the common
    line not made longer). Before, the line named b alone: that the call
    went to a first was only in a "fleet attempt failed" line."""
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    refusing = await free_port()
    good = await WsFleet(tls_files.fleet_server_context()).start()
    try:
        ingress = await start_ingress(
            [f"https://127.0.0.1:{refusing} name=a", good.line("b")], retry={"retries": 1}
        )
        for bot in ("first", "second"):
            async with connect(
                wss_url(ingress, f"/ws/{bot}"), ssl=tls_files.client_context()
            ) as ws:
                await echo(ws)
        await eventually(lambda: len(access_entries(caplog)) == 2)
        retried, direct = access_entries(caplog)
        assert (retried["fleet"], retried["status"], retried["attempts"]) == ("b", 101, 2)
        assert retried["tried"] == ["a conn-failure", "b 101"], retried
        # Round robin after b: a is avoided no more, so the second call may
        # meet it too; where it went straight to its fleet, nothing is added.
        if direct["attempts"] == 1:
            assert "tried" not in direct, direct
        else:
            assert direct["tried"] == ["a conn-failure", "b 101"], direct
    finally:
        await good.stop()
    # What it costs, and how each log format writes it.
    (record,) = [
        r
        for r in caplog.records
        if r.name == "fleet_ingress.access" and r.fields is retried  # type: ignore[attr-defined]
    ]
    line = JsonFormatter().format(record)
    assert json.loads(line)["tried"] == ["a conn-failure", "b 101"]
    added = len(', "tried": ["a conn-failure", "b 101"]')
    assert line.endswith('"tried": ["a conn-failure", "b 101"]}'), line
    print(f"a retried call's JSON line: {len(line)} bytes, {added} of them `tried`")
    text = TextFormatter().format(record)
    assert text.endswith(' tried="a conn-failure,b 101"'), text


async def test_a_call_retried_thirty_times_writes_ten_entries_of_tried(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """`retry.retries` has no maximum: a fleet answering 503 at once, which
    `retry_on` lists, is tried 1 + retries times. The line keeps the first 8
    of `tried`, "+M more" and the last; `attempts` says them all. Before, one
    entry an attempt: retries=1000 wrote some 20 KB on one line."""
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    busy = await RawFleet(
        tls_files.fleet_server_context(),
        answer(b"HTTP/1.1 503 S\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    ).start()
    try:
        ingress = await start_ingress(
            [busy.line("busy")], retry={"retries": 30, "retry_on": ["conn-failure", 503]}
        )
        got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/x").encode())
        assert got.startswith(b"HTTP/1.1 503 "), got
        await eventually(lambda: len(access_entries(caplog)) == 1)
    finally:
        await busy.stop()
    (line,) = access_entries(caplog)
    assert (line["attempts"], busy.connections) == (31, 31), line
    assert line["tried"] == ["busy 503"] * 8 + ["+22 more", "busy 503"], line
