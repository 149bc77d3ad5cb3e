"""Fleet changes and stops that meet calls in flight (found by a race review).

Real TLS fleets and carriers on loopback. `Ingress.apply_fleets` is what a
reload does with a new fleets file once it has been read and checked. The
membership side of these races is table-tested without sockets in
tests/unit/test_fleet_set.py.
"""

from __future__ import annotations

import asyncio
import json
import logging

from websockets.asyncio.client import connect

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.call_machine import EndReason
from fleet_ingress.core.health import Health
from fleet_ingress.service.ingress import Ingress
from tests.support import (
    SWITCHING,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    eventually,
    never_answer,
    read_head,
    wss_url,
)

UPGRADE = (
    b"GET /ws/bot HTTP/1.1\r\nHost: calls.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def reload_with(ingress: Ingress, *lines: str) -> list[str]:
    specs = parse_fleets_text("\n".join(lines), default_maxconn=ingress.config.fleets.maxconn)
    notes = ingress.apply_fleets(specs, ingress.config)
    ingress.dispatcher.wake()
    return notes


async def healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    body = json.dumps({"fleet_available": 5}).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()


async def test_a_fleet_moved_to_a_new_address_is_probed_there(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    old, b, new = [await RawFleet(tls_files.fleet_server_context(), healthy).start() for _ in "abc"]
    try:
        ingress = await start_ingress(
            [old.line("a"), b.line("b")],
            health_checks=True,
            fleets={"check_interval": 0.2, "check_timeout": 0.5},
        )
        await eventually(lambda: ingress.balancer.get("a").health is Health.UP)  # type: ignore[union-attr]
        notes = reload_with(ingress, new.line("a"), b.line("b"))
        assert notes == ["fleet a removed: draining 0 calls", "fleet a added"]
        moved = ingress.balancer.get("a")
        assert moved is not None and moved.spec.port == new.port
        # The old record's probe loop must not outlive it and take the new one's place.
        await eventually(lambda: moved.health is Health.UP)
        probes = new.connections
        await asyncio.sleep(0.5)
        assert new.connections > probes  # still probed at the new address
    finally:
        for fleet in (old, b, new):
            await fleet.stop()


async def test_the_only_fleet_moved_while_it_carries_a_call_takes_calls_there_once_it_ends(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """Review finding: the new address used to wait for another reload, so every call
    got 503 once the old address had drained."""
    old, new = [await WsFleet(tls_files.fleet_server_context()).start() for _ in "ab"]
    try:
        ingress = await start_ingress([old.line("a")])
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            notes = reload_with(ingress, new.line("a"))
            assert notes == [
                "fleet a removed: draining 1 calls",
                "fleet a: still draining its old address; joins at the new one "
                f"(https://127.0.0.1:{new.port}, maxconn 16, READY) when its last call there ends",
            ]
        await eventually(
            lambda: (f := ingress.balancer.get("a")) is not None and f.spec.port == new.port
        )
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("y")
            assert await ws.recv() == "y"
        assert len(new.requests) == 1 and len(old.requests) == 1
    finally:
        for fleet in (old, new):
            await fleet.stop()


async def test_a_fleet_listed_again_while_it_drains_stays(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    a, b = [await WsFleet(tls_files.fleet_server_context()).start() for _ in "ab"]
    try:
        ingress = await start_ingress([a.line("a"), b.line("b")])
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            fleet_a = ingress.balancer.get("a")
            assert fleet_a is not None and fleet_a.active == 1
            assert reload_with(ingress, b.line("b")) == ["fleet a removed: draining 1 calls"]
            assert fleet_a.removing
            assert reload_with(ingress, a.line("a"), b.line("b")) == [
                "fleet a listed again: kept, READY"
            ]
            assert not fleet_a.removing
        await eventually(lambda: not ingress.registry.calls)
        await asyncio.sleep(0.1)
        assert ingress.balancer.get("a") is fleet_a  # not reaped when its call ended
    finally:
        for fleet in (a, b):
            await fleet.stop()


async def test_remove_fleet_force_spares_a_call_that_only_tried_that_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    stalls = await RawFleet(tls_files.fleet_server_context(), never_answer).start()
    b = await WsFleet(tls_files.fleet_server_context()).start()
    writers: list[asyncio.StreamWriter] = []
    try:
        ingress = await start_ingress(
            [stalls.line("a", "maxconn=1"), b.line("b", "maxconn=1")],
            timeouts={"response": 0.5, "queue": 3},
        )
        host, port = ingress.wss_address
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as busy:
            await busy.send("x")  # b's one slot is taken
            assert await busy.recv() == "x"
            for _ in range(2):  # X goes to a (it stalls), Y queues for a slot
                _, writer = await asyncio.open_connection(
                    host, port, ssl=tls_files.client_context(), server_hostname="localhost"
                )
                writer.write(UPGRADE)
                writers.append(writer)
                await asyncio.sleep(0.1)
            # X's attempt on a times out: Y takes a's slot, X queues to try again.
            await eventually(lambda: ingress.dispatcher.queue_length == 1, timeout=2)
            fleet_a = ingress.balancer.get("a")
            assert fleet_a is not None and fleet_a.active == 1
            result = await ingress.ops.remove_fleet("a", force=True)
            assert result["closed_calls"] == 1  # Y, on a; not X, queued for a retry
            queued = [c for c in ingress.registry.calls if c.lease is None or not c.lease.held]
            assert len(queued) == 1 and queued[0].end_reason is not EndReason.REMOVED
    finally:
        for writer in writers:
            writer.close()
        await stalls.stop()
        await b.stop()


async def test_calls_closed_by_a_stop_are_each_logged_even_if_the_fleet_is_slow_to_close(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")

    async def deaf_after_101(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCHING)
        await writer.drain()
        writer.transport.pause_reading()  # never reads the ingress's TLS close
        await asyncio.sleep(3600)

    fleet = await RawFleet(tls_files.fleet_server_context(), deaf_after_101).start()
    writers: list[asyncio.StreamWriter] = []
    try:
        ingress = await start_ingress([fleet.line("a")])
        host, port = ingress.wss_address
        for _ in range(3):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls_files.client_context(), server_hostname="localhost"
            )
            writer.write(UPGRADE)
            assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
            writers.append(writer)
        await eventually(lambda: len(ingress.registry.tunnels()) == 3)
        await ingress.stop(drain_timeout=0)
        assert not ingress.registry.calls
        assert ingress.balancer.fleets[0].active == 0
        ended = [r for r in caplog.records if r.name == "fleet_ingress.access"]
        assert [r.fields["end_reason"] for r in ended] == ["drain"] * 3  # type: ignore[attr-defined]
    finally:
        for writer in writers:
            writer.close()
        await fleet.stop()


async def test_remove_fleet_force_removes_a_fleet_that_never_reads_the_close(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """--force means at once: a call whose fleet never takes the TLS close is cut
    after a short wait, so the answer can say the fleet is gone (it used to say
    removed: false after 5 s while the close waited up to 10 s)."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")

    async def deaf_after_101(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCHING)
        await writer.drain()
        writer.transport.pause_reading()  # never reads the ingress's TLS close
        await asyncio.sleep(3600)

    deaf = await RawFleet(tls_files.fleet_server_context(), deaf_after_101).start()
    b = await WsFleet(tls_files.fleet_server_context()).start()
    writer = None
    try:
        ingress = await start_ingress([deaf.line("a"), b.line("b")])
        host, port = ingress.wss_address
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        writer.write(UPGRADE)
        assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
        await eventually(lambda: len(ingress.registry.tunnels()) == 1)
        result = await ingress.ops.remove_fleet("a", force=True)
        assert result["removed"] is True and result["closed_calls"] == 1
        assert ingress.balancer.get("a") is None
        await eventually(lambda: not ingress.registry.calls)
        ended = [r.fields for r in caplog.records if r.name == "fleet_ingress.access"]  # type: ignore[attr-defined]
        assert [e["end_reason"] for e in ended] == ["removed"]
    finally:
        if writer is not None:
            writer.close()
        await deaf.stop()
        await b.stop()
