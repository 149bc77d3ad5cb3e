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
    StartIngress,
    TLSFiles,
    WsFleet,
    access_entries,
    echo,
    eventually,
    free_port,
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
