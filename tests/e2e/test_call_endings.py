"""What each side of a tunnel hears when the ingress ends its call: a WebSocket
close frame of the ingress's own (1001 going away for a drain, a forced
removal, an idle tunnel, a carrier gone; 1011 for a fleet gone), sent at a
frame boundary and its reply waited for, so that real client libraries
(websockets, aiohttp) report a clean close with the reason rather than 1006,
the same as a network failure (the endings audit of session 25). A side that
closes its connection itself without a close frame is passed on as it was."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import socket
import ssl
import struct

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

from tests.support import (
    SWITCHING,
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    eventually,
    read_head,
    wss_url,
)


@pytest.fixture
async def ws_fleet(tls_files: TLSFiles):
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    yield fleet
    await fleet.stop()


async def _in_call(ingress, tls_files: TLSFiles, fleet: WsFleet):
    ws = await connect(wss_url(ingress), ssl=tls_files.client_context())
    await ws.send("hello")
    assert await ws.recv() == "hello"
    await eventually(lambda: fleet.active == 1)
    return ws


async def _closed_ok(ws) -> tuple[int, str]:
    with pytest.raises(ConnectionClosedOK) as info:
        async with asyncio.timeout(5):
            await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


@pytest.mark.parametrize("how", ["stop", "remove", "idle"])
async def test_calls_the_ingress_ends_are_told_why_on_both_sides(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet, how: str
):
    timeouts = {"tunnel": 0.5} if how == "idle" else {}
    # b takes no call (drained): there to be left when a is removed.
    other = await WsFleet(tls_files.fleet_server_context()).start()
    lines = [ws_fleet.line("a"), other.line("b", "admin=drain")]
    try:
        ingress = await start_ingress(lines, timeouts=timeouts)
        await _told_why(ingress, tls_files, ws_fleet, how)
    finally:
        await other.stop()


async def _told_why(ingress, tls_files: TLSFiles, ws_fleet: WsFleet, how: str) -> None:
    ws = await _in_call(ingress, tls_files, ws_fleet)
    if how == "stop":
        stopping = asyncio.ensure_future(ingress.stop(drain_timeout=0.2))
        reason = "ingress draining"
    elif how == "remove":
        await ingress.ops.remove_fleet("a", force=True)
        reason = "fleet removed"
    else:
        reason = "tunnel idle"  # nothing sent for timeouts.tunnel
    assert await _closed_ok(ws) == (1001, reason)
    await eventually(lambda: ws_fleet.peer_close_codes == [1001])
    assert ws_fleet.peer_close_reasons == [reason]
    if how == "stop":
        await stopping


async def test_an_aiohttp_carrier_sees_a_clean_1001_at_a_drain(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet
):
    """aiohttp reports 1006 and an exception when the TLS close comes before
    it could answer the close frame: the ingress waits for its reply."""
    ingress = await start_ingress([ws_fleet.line("a")])
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            stopping = asyncio.ensure_future(ingress.stop(drain_timeout=0.2))
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert (message.data, message.extra) == (1001, "ingress draining")
            assert ws.close_code == 1001 and ws.exception() is None
    await stopping
    await eventually(lambda: ws_fleet.peer_close_codes == [1001])


def _accept(key: bytes) -> bytes:
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


def _switching_then(react_after):
    """A fleet that answers the upgrade 101 (for the carrier's own key), then
    does `react_after`."""

    async def react(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        key = re.search(rb"(?i)\r\nsec-websocket-key: *([^\r]+)", head)
        assert key is not None
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + _accept(key[1]) + b"\r\n\r\n"
        )
        await writer.drain()
        await react_after(reader, writer)

    return react


async def test_a_fleet_reset_is_a_1011_to_the_carrier_a_fleet_closing_itself_is_passed_on(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    async def reset(reader, writer):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # an RST

    async def close_without_frame(reader, writer):
        writer.close()  # a FIN, no close frame: how this fleet chose to end

    fleets = [
        await RawFleet(None, _switching_then(reset)).start(),
        await RawFleet(None, _switching_then(close_without_frame)).start(),
    ]
    try:
        for fleet, expected in zip(fleets, [(1011, "fleet reset"), None], strict=True):
            ingress = await start_ingress([fleet.line("a")])
            async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
                with pytest.raises((ConnectionClosedError, ConnectionClosedOK)) as info:
                    async with asyncio.timeout(5):
                        await ws.recv()
            rcvd = info.value.rcvd
            assert (None if rcvd is None else (rcvd.code, rcvd.reason)) == expected
            await ingress.stop(drain_timeout=0)
    finally:
        for fleet in fleets:
            await fleet.stop()


async def _raw_carrier(ingress, tls_files: TLSFiles):
    """A carrier speaking raw bytes over TLS, its upgrade sent: (reader, writer)."""
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    writer.write(UPGRADE.format(path="/ws/bot-1").encode())
    return reader, writer


async def _rest(reader: asyncio.StreamReader) -> bytes:
    """What comes until the ingress closes (nothing, if it ends with a reset)."""
    try:
        return await asyncio.wait_for(reader.read(-1), 5)
    except (ssl.SSLError, ConnectionError):
        return b""


def _frame(payload: bytes, *, masked: bool) -> bytes:
    head = bytes((0x82, (0x80 if masked else 0) | 126)) + struct.pack("!H", len(payload))
    if not masked:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("finished_after", [0.05, None])
async def test_the_close_frame_waits_for_the_frame_under_way_and_never_cuts_into_it(
    start_ingress: StartIngress, tls_files: TLSFiles, finished_after: float | None
):
    """The fleet is mid-frame when the drain ends the call: the carrier gets the
    rest of that frame and then the close frame, or (the frame unfinished
    after GOODBYE_BOUNDARY_WAIT) the close alone, as before; the fleet, whose
    direction is at a boundary, gets its close frame at once (masked)."""
    frame = _frame(b"m" * 3000, masked=False)
    fleet_heard = asyncio.get_running_loop().create_future()

    async def mid_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frame[:1000])
        await writer.drain()
        heard = await reader.read(8)  # what the ingress sends the fleet: its close frame
        if finished_after is not None:
            await asyncio.sleep(finished_after)
            writer.write(frame[1000:])
            await writer.drain()
        fleet_heard.set_result(heard)
        await asyncio.sleep(2)

    fleet = await RawFleet(None, _switching_then(mid_frame)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await _raw_carrier(ingress, tls_files)
        assert await read_head(reader) == SWITCHING
        assert await reader.readexactly(1000) == frame[:1000]
        stopping = asyncio.ensure_future(ingress.stop(drain_timeout=0.1))
        heard = await asyncio.wait_for(fleet_heard, 5)
        assert heard[:2] == b"\x88\x92" and len(heard) == 8  # masked, 18 bytes of payload
        rest = await _rest(reader)
        writer.close()
        if finished_after is not None:
            assert rest == frame[1000:] + b"\x88\x12\x03\xe9ingress draining"
        else:
            assert rest == b""  # no close frame inside the frame under way
        await stopping
    finally:
        await fleet.stop()


@pytest.mark.parametrize("with_data", [False, True])
async def test_a_fleets_close_frame_read_with_other_bytes_is_followed_by_nothing(
    start_ingress: StartIngress, tls_files: TLSFiles, with_data: bool
):
    """A plain fleet's close frame that came with its 101, or in the same read
    as a data frame, is not the lone read the call machine hears of: the drain
    must still add no close frame of the ingress's after it (the review of
    session 25 saw 1000 then 1001)."""
    bye = b"\x88\x05\x03\xe8bye"  # 1000 "bye"
    data = _frame(b"d" * 200, masked=False) if with_data else b""

    async def close_at_once(reader, writer):
        writer.write(data + bye)  # in one write, with the 101 just before it
        await writer.drain()
        await asyncio.sleep(5)  # the carrier's reply never comes: the drain ends it

    fleet = await RawFleet(None, _switching_then(close_at_once)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await _raw_carrier(ingress, tls_files)
        await read_head(reader)
        assert await reader.readexactly(len(data + bye)) == data + bye
        await ingress.stop(drain_timeout=0.1)
        rest = await _rest(reader)
        writer.close()
        assert rest == b""
    finally:
        await fleet.stop()


async def test_a_fleets_reply_to_the_goodbye_raises_nothing(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet
) -> None:
    """A carrier gone (reset mid-call): the ingress says 1001 to the fleet, whose
    close frame in reply ends the attempt. Reading on from the attempt just
    dropped raised AttributeError in the event loop on about every other call
    (the review of session 27: each an ERROR traceback, and the unexpected-errors
    alert lit on any busy host). Ten calls, nothing raised."""
    loop = asyncio.get_running_loop()
    raised: list[dict] = []
    previous = loop.get_exception_handler()  # the project's loop counts with its own
    loop.set_exception_handler(lambda _loop, context: raised.append(context))
    try:
        ingress = await start_ingress([ws_fleet.line("f")])
        for n in range(10):
            ws = await _in_call(ingress, tls_files, ws_fleet)
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.transport.abort()
            await eventually(lambda: ws_fleet.active == 0 and not ingress.registry.calls)
            assert ws_fleet.peer_close_codes[-1] == 1001, n
        await asyncio.sleep(0.2)
        assert [c.get("message") for c in raised] == []
    finally:
        loop.set_exception_handler(previous)
