"""The edges of a call that the second review of session 30 tried on real
sockets: a carrier's close while queued or before a retry, a head refused as
it is read, one answer whatever follows a head, a carrier reading on after its
plain fleet was lost (uvloop raised on every read), and a fleet's 101 made
right (its frames followed from where they begin as relayed)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

from tests.support import (
    SWITCHING,
    RawFleet,
    StartIngress,
    TLSFiles,
    access_entries,
    eventually,
    masked_close,
    raw_carrier,
    raw_exchange,
    read_frame,
    read_head,
    switching_then,
    wss_url,
)


async def _until_eof(reader: asyncio.StreamReader, limit: float = 5.0) -> bytes:
    got = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                got += chunk
    except (OSError, TimeoutError, ssl.SSLError):
        pass
    return got


async def _reset_after_a_moment(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain fleet whose process dies 0.2 s into the call: an RST."""
    await asyncio.sleep(0.2)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.asynccontextmanager
async def _loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler meanwhile (a callback
    that raised: what production counts as an unexpected error)."""
    loop = asyncio.get_running_loop()
    raised: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: raised.append(context))
    try:
        yield raised
    finally:
        loop.set_exception_handler(previous)


async def test_a_carrier_closing_while_queued_for_a_slot_is_its_own_hang_up(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """maxconn 1, held by a first call for 0.6 s; a second carrier sends its
    upgrade and a close frame in one write while queued: once linked, the close
    is relayed, the fleet replies, the call ends at once, 'carrier closed'."""
    count = itertools.count()

    async def react(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if next(count) == 0:
            await asyncio.sleep(0.6)
            writer.transport.abort()  # the first call's fleet goes: its slot frees
            return
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 8
        writer.write(b"\x88\x02" + payload[:2])
        await writer.drain()

    fleet = await RawFleet(None, switching_then(react)).start()
    try:
        ingress = await start_ingress([fleet.line("a", "maxconn=1")], timeouts={"queue": 5})
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        first = await raw_carrier(ingress, tls_files)
        await read_head(first[0])
        reader, writer = await raw_carrier(ingress, tls_files, "/ws/bot-2", then=masked_close(4000))
        await asyncio.sleep(0.2)  # queued behind the first call (maxconn 1)
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 101 "), head + await reader.read(200)
        assert await read_frame(reader) == (8, (4000).to_bytes(2, "big"))
        started = time.monotonic()
        await _until_eof(reader, 8)
        held = time.monotonic() - started
        writer.close()
        first[1].close()
        await eventually(lambda: len(access_entries(caplog)) == 2)
        reasons = sorted(e["end_reason"] for e in access_entries(caplog))
        assert reasons == ["carrier closed", "fleet closed"], reasons
        assert held < 1.0, held
    finally:
        await fleet.stop()


async def test_a_carriers_close_sent_before_a_retried_attempt_is_its_own_hang_up(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """The first attempt's fleet closes at once (empty response, retried); the
    second answers 101 and replies to the carrier's early close frame."""
    count = itertools.count()

    async def replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 8
        writer.write(b"\x88\x02" + payload[:2])
        await writer.drain()

    switching = switching_then(replies)

    async def react(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if next(count) == 0:
            await read_head(reader)
            return  # closed at once: an empty response, retried
        await switching(reader, writer)

    fleets = [await RawFleet(None, react).start(), await RawFleet(None, react).start()]
    try:
        ingress = await start_ingress([fleets[0].line("a"), fleets[1].line("b")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        reader, writer = await raw_carrier(ingress, tls_files, then=masked_close())
        await read_head(reader)
        assert await read_frame(reader) == (8, b"\x03\xe8")
        started = time.monotonic()
        await _until_eof(reader, 8)
        held = time.monotonic() - started
        writer.close()
        await eventually(lambda: bool(access_entries(caplog)))
        entry = access_entries(caplog)[0]
        assert entry["end_reason"] == "carrier closed", entry
        assert held < 1.0, held
    finally:
        for fleet in fleets:
            await fleet.stop()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"HEAD /haproxy-health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
        b"HEAD /haproxy-health HTTP/1.1\nHost: x\n\n",
    ],
    ids=["431-many-lines", "400-bare-lf"],
)
async def test_a_head_refused_as_it_is_read_gets_no_body(
    start_ingress: StartIngress, tls_files: TLSFiles, request_bytes: bytes
):
    ingress = await start_ingress(["http://127.0.0.1:9 name=a"])
    got = await raw_exchange(ingress, tls_files, request_bytes)
    assert got.startswith(b"HTTP/1.1 4"), got[:40]
    assert got.endswith(b"\r\n\r\n"), got


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # A body, then a second request on the same connection: never read.
        (
            b"POST /haproxy-health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /ws/bot-1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n",
            200,
        ),
        # Transfer-Encoding and Content-Length together.
        (
            b"POST /haproxy-health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n",
            None,
        ),
        # A call route with TE and CL 0: refused before any fleet.
        (
            b"GET /ws/bot-1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n0\r\n\r\n",
            400,
        ),
        # HEAD with a body on a call route: 400, no body.
        (b"HEAD /ws/bot-1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 400),
    ],
    ids=["pipelined-after-body", "te-and-cl", "call-te-cl0", "head-body-call"],
)
async def test_one_answer_and_the_close_whatever_follows_the_head(
    start_ingress: StartIngress, tls_files: TLSFiles, request_bytes: bytes, status: int | None
):
    fleet_heads: list[bytes] = []

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fleet_heads.append(await read_head(reader))

    fleet = await RawFleet(None, never).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        got = await raw_exchange(ingress, tls_files, request_bytes)
        assert got.count(b"HTTP/1.1 ") == 1, got
        if status is not None:
            assert got.startswith(b"HTTP/1.1 %d " % status), got[:60]
        if request_bytes.startswith(b"HEAD"):
            assert got.endswith(b"\r\n\r\n"), got
        assert fleet_heads == []
    finally:
        await fleet.stop()


async def test_port_80s_head_refused_as_read_names_its_first_line(
    start_ingress: StartIngress, caplog
):
    ingress = await start_ingress(
        ["https://127.0.0.1:9 name=unused"],
        listen={"acme": "127.0.0.1:0"},
        acme={"upstream": "127.0.0.1:9"},
    )
    caplog.set_level(logging.INFO, logger="fleet_ingress.refused")
    reader, writer = await asyncio.open_connection(*ingress.acme_address)
    writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")
    got = await _until_eof(reader, 5)
    writer.close()
    assert got.startswith(b"HTTP/1.1 431 ")
    await eventually(lambda: bool([r for r in caplog.records if r.name == "fleet_ingress.refused"]))
    lines = [r.fields for r in caplog.records if r.name == "fleet_ingress.refused"]  # type: ignore[attr-defined]
    assert lines[-1]["status"] == 431
    assert lines[-1]["target"] == "GET /x HTTP/1.1", lines[-1]


@pytest.mark.uvloop_only
async def test_a_carriers_reply_after_a_plain_fleet_reset_raises_nothing(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    async with _loop_errors() as raised:
        fleet = await RawFleet(None, switching_then(_reset_after_a_moment)).start()
        try:
            ingress = await start_ingress([fleet.line("a")])
            async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
                with pytest.raises((ConnectionClosedError, ConnectionClosedOK)) as info:
                    async with asyncio.timeout(5):
                        await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011
            await eventually(lambda: not ingress.registry.calls)
            await asyncio.sleep(0.2)
            assert [str(c.get("exception") or c.get("message")) for c in raised] == []
        finally:
            await fleet.stop()


@pytest.mark.uvloop_only
async def test_a_streaming_carrier_after_a_plain_fleet_reset_raises_nothing(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    async with _loop_errors() as raised:
        fleet = await RawFleet(None, switching_then(_reset_after_a_moment)).start()
        try:
            ingress = await start_ingress([fleet.line("a")])
            reader, writer = await raw_carrier(ingress, tls_files)
            await read_head(reader)
            media = bytes((0x82, 0x80 | 100)) + bytes(4) + bytes(100)  # masked, a zero mask
            for _ in range(40):  # 20 ms media for 0.8 s, the carrier not reading
                try:
                    writer.write(media)
                    await writer.drain()
                except (ConnectionError, ssl.SSLError):
                    break
                await asyncio.sleep(0.02)
            await _until_eof(reader, 3)
            writer.close()
            await eventually(lambda: not ingress.registry.calls)
            assert [str(c.get("exception") or c.get("message")) for c in raised] == []
        finally:
            await fleet.stop()


async def test_a_bot_hang_up_after_a_bare_lf_101_is_logged_fleet_closed(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    hello = b"\x81\x05hello"
    last_words = b"\x81\x08Goodbye!" + b"\x88\x0a\x03\xe8bot done"

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)
        writer.write(hello)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(last_words)
        await writer.drain()
        opcode, _ = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 8

    fleet = await RawFleet(None, switching_then(line_end=b"\n", react_after=bot)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            assert await ws.recv() == "hello"
            assert await ws.recv() == "Goodbye!"
            with pytest.raises(ConnectionClosedOK):
                await ws.recv()
        await eventually(lambda: bool(access_entries(caplog)))
        entry = access_entries(caplog)[0]
        assert entry["end_reason"] == "fleet closed", entry
    finally:
        await fleet.stop()


async def test_a_drain_after_a_bare_lf_101_sends_its_close_frame_at_a_frame_boundary(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    frame = bytes((0x82, 126)) + struct.pack("!H", 3000) + b"m" * 3000

    async def mid_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frame[:1000])
        await writer.drain()
        await reader.read(8)  # the ingress's close frame to the fleet
        await asyncio.sleep(0.05)
        writer.write(frame[1000:])
        await writer.drain()
        await asyncio.sleep(2)

    fleet = await RawFleet(None, switching_then(line_end=b"\n", react_after=mid_frame)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await raw_carrier(ingress, tls_files)
        await read_head(reader)
        assert await reader.readexactly(1000) == frame[:1000]
        stopping = asyncio.ensure_future(ingress.stop(drain_timeout=0.1))
        rest = await _until_eof(reader, 5)
        writer.close()
        await stopping
        assert rest == frame[1000:] + b"\x88\x12\x03\xe9ingress draining", rest[:40]
    finally:
        await fleet.stop()


async def test_a_carriers_close_frame_split_at_a_drain_reaches_the_fleet_whole(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """The carrier's close frame split over two TLS records, a drain ending the
    call between them: the fleet gets it whole, then the close (before: its
    first three bytes, then the close: a frame cut short)."""
    fleet_got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fleet_got.set_result(await _until_eof(reader, 5))

    async with _loop_errors() as raised:
        fleet = await RawFleet(None, switching_then(record)).start()
        try:
            ingress = await start_ingress([fleet.line("a")])
            reader, writer = await raw_carrier(ingress, tls_files)
            assert await read_head(reader) == SWITCHING
            close = masked_close()
            writer.write(close[:3])  # its header read: the tracker has seen it start
            await writer.drain()
            await asyncio.sleep(0.1)
            stopping = asyncio.ensure_future(ingress.stop(drain_timeout=0.05))
            # The drain ends the call meanwhile; the rest comes within the
            # GOODBYE_BOUNDARY_WAIT (0.2 s) the fleet side is held for it.
            await asyncio.sleep(0.15)
            writer.write(close[3:])  # the rest of the carrier's close frame
            await writer.drain()
            got = await asyncio.wait_for(fleet_got, 6)
            await _until_eof(reader, 3)
            writer.close()
            await stopping
            assert got == close, got
            assert [(c.get("message"), repr(c.get("exception"))) for c in raised] == []
        finally:
            await fleet.stop()


@pytest.mark.parametrize("drain", [True, False])
async def test_a_carrier_hears_the_bots_close_code_when_a_drain_splits_its_close_frame(
    start_ingress: StartIngress, tls_files: TLSFiles, drain: bool
):
    """The bot's close frame (1000 'bot done') split over two reads 0.15 s
    apart, the ingress draining between them or not: the carrier's aiohttp
    client hears 1000 either way. With the drain it got the frame whole but was
    closed at once, with no time to reply, and said 1006 (the third review of
    session 30): it now has GOODBYE_REPLY_WAIT, as after the ingress's own."""
    import aiohttp

    close = b"\x88\x0a\x03\xe8bot done"
    go_on = asyncio.Event()

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(close[:3])
        await writer.drain()
        await go_on.wait()
        writer.write(close[3:])
        await writer.drain()
        await _until_eof(reader, 5)

    fleet = await RawFleet(None, switching_then(bot)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
                receiving = asyncio.ensure_future(ws.receive())
                await asyncio.sleep(0.4)
                stopping = (
                    asyncio.ensure_future(ingress.stop(drain_timeout=0.05)) if drain else None
                )
                await asyncio.sleep(0.1)
                go_on.set()
                msg = await asyncio.wait_for(receiving, 5)
                await asyncio.sleep(0.3)
                if stopping is not None:
                    await stopping
        assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1000, (msg, ws.close_code)
    finally:
        await fleet.stop()
