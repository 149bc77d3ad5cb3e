"""What each side of a tunnel hears when the ingress ends its call: a WebSocket
close frame of the ingress's own (1001 going away for a drain, a forced
removal, an idle tunnel, a carrier gone; 1011 for a fleet gone), sent at a
frame boundary and its reply waited for, so that real client libraries
(websockets, aiohttp) report a clean close with the reason rather than 1006,
the same as a network failure (the endings audit of session 25). So is a
side that closes its connection without one: a fleet (1011 `fleet closed`),
a carrier (1001 `carrier closed`, session 37).

Who hung up is the side whose close frame came first, wherever it was in a
read (beside a media frame, right behind the carrier's head, with the
fleet's 101): the access line names it, and the other side's close reply
ends the call at once rather than after HALF_CLOSED_GRACE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import time

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

from fleet_ingress.net import tls_socket
from fleet_ingress.net.calls import END_CALL_WAIT, Registry, end_call
from fleet_ingress.service.ingress import CLOSE_AT_STOP_TIMEOUT
from tests.support import (
    SWITCHING,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    access_entries,
    eventually,
    masked_close,
    raw_carrier,
    read_frame,
    read_head,
    switching_then,
    upgrade_on,
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


async def test_a_fleet_reset_or_closing_without_a_close_frame_is_a_1011_to_the_carrier(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """A fleet gone without a close frame, by an RST or a FIN (right after its
    101, or after a message: a bot process that exited), is a 1011 with the
    reason to the carrier, sent between two frames. The FIN was passed on as
    it was: the carrier saw 1006, which carriers log as a network failure,
    and which of the two a crashed bot gave was down to whether its socket
    held unread bytes (leftovers of session 36)."""

    async def reset(reader, writer):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # an RST

    async def close_without_frame(reader, writer):
        writer.close()  # a FIN, no close frame

    async def say_then_close(reader, writer):
        writer.write(b"\x81\x05hello")  # a whole text frame, then a FIN
        await writer.drain()
        writer.close()

    fleets = [
        await RawFleet(None, switching_then(reset)).start(),
        await RawFleet(None, switching_then(close_without_frame)).start(),
        await RawFleet(None, switching_then(say_then_close)).start(),
    ]
    expected = [(1011, "fleet reset"), (1011, "fleet closed"), (1011, "fleet closed")]
    try:
        for n, (fleet, said) in enumerate(zip(fleets, expected, strict=True), start=1):
            ingress = await start_ingress([fleet.line("a")])
            caplog.set_level(logging.INFO, logger="fleet_ingress.access")
            async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
                if fleet is fleets[2]:
                    assert await asyncio.wait_for(ws.recv(), 5) == "hello"
                with pytest.raises(ConnectionClosedError) as info:
                    async with asyncio.timeout(5):
                        await ws.recv()
            rcvd = info.value.rcvd
            assert (None if rcvd is None else (rcvd.code, rcvd.reason)) == said
            assert info.value.rcvd_then_sent is True  # its reply was waited for
            await ingress.stop(drain_timeout=0)
            # The access line's end_reason is as before: who ended the call.
            await eventually(lambda: len(access_entries(caplog)) == n)  # noqa: B023
            ended = access_entries(caplog)[-1]["end_reason"]
            assert ended == ("fleet_reset" if said[1] == "fleet reset" else "fleet closed")
    finally:
        for fleet in fleets:
            await fleet.stop()


def _masked_text(text: bytes) -> bytes:
    mask = b"\x09\x08\x07\x06"
    assert len(text) < 126
    return (
        bytes((0x81, 0x80 | len(text))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    )


@pytest.mark.parametrize("how", ["close_notify and FIN", "bare FIN", "FIN mid-frame"])
async def test_a_carrier_closing_without_a_close_frame_is_a_1001_to_the_bot(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet, caplog, how: str
):
    """A carrier that closes its connection without a WebSocket close frame
    (its TLS close and a FIN, or a FIN alone) after a message: the bot, a
    websockets server, is sent 1001 'carrier closed' (masked: the ingress is
    its client) and ends cleanly. Passed on as a bare TLS close, the bot saw
    1006 (ConnectionClosedError, "no close frame received or sent"), an
    abnormal end to bot frameworks' logs, the same as a network failure
    between the ingress and the fleet. Mid-frame, nothing is added inside the
    frame: the bot gets a bare close, as before. The access line is as before:
    'carrier closed'."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    ingress = await start_ingress([ws_fleet.line("a")])
    reader, writer = await raw_carrier(ingress, tls_files)
    assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
    writer.write(_masked_text(b"hello"))
    assert await asyncio.wait_for(read_frame(reader), 5) == (1, b"hello")
    if how == "FIN mid-frame":
        writer.write(_masked_text(b"half of a frame")[:9])
        await writer.drain()
        await asyncio.sleep(0.1)  # relayed to the bot before the FIN
    if how == "close_notify and FIN":
        writer.close()
    else:
        fd = writer.transport.get_extra_info("socket").fileno()
        with socket.socket(fileno=os.dup(fd)) as raw:  # below TLS: no close_notify
            raw.shutdown(socket.SHUT_WR)
    await eventually(lambda: ws_fleet.active == 0 and not ingress.registry.calls, timeout=5)
    writer.close()
    if how == "FIN mid-frame":
        assert ws_fleet.peer_close_codes == [1006]
    else:
        assert (ws_fleet.peer_close_codes, ws_fleet.peer_close_reasons) == (
            [1001],
            ["carrier closed"],
        )
    await eventually(lambda: bool(access_entries(caplog)))
    assert access_entries(caplog)[0]["end_reason"] == "carrier closed"


async def test_a_fleet_closing_mid_frame_gets_the_carrier_no_close_frame_inside_it(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """A fleet that closes (a FIN) with a frame half sent: nothing is added
    inside the frame; the carrier gets the bytes relayed, then the TLS close
    (GOODBYE_BOUNDARY_WAIT after), as before."""
    frame = _frame(b"m" * 3000, masked=False)

    async def close_mid_frame(reader, writer):
        writer.write(frame[:1000])
        await writer.drain()
        writer.close()

    fleet = await RawFleet(None, switching_then(close_mid_frame)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await raw_carrier(ingress, tls_files)
        assert await read_head(reader) == SWITCHING
        assert await reader.readexactly(1000) == frame[:1000]
        rest = await _rest(reader)
        writer.close()
        assert rest == b""
        await ingress.stop(drain_timeout=0)
    finally:
        await fleet.stop()


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
    fleet_told: list[float] = []  # when the fleet read the goodbye: the drain's end

    async def mid_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frame[:1000])
        await writer.drain()
        heard = await reader.read(8)  # what the ingress sends the fleet: its close frame
        fleet_told.append(time.monotonic())
        if finished_after is not None:
            await asyncio.sleep(finished_after)
            writer.write(frame[1000:])
            await writer.drain()
        fleet_heard.set_result(heard)
        await asyncio.sleep(2)

    fleet = await RawFleet(None, switching_then(mid_frame)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await raw_carrier(ingress, tls_files)
        assert await read_head(reader) == SWITCHING
        assert await reader.readexactly(1000) == frame[:1000]
        stopping = asyncio.ensure_future(ingress.stop(drain_timeout=0.1))
        heard = await asyncio.wait_for(fleet_heard, 5)
        assert heard[:2] == b"\x88\x92" and len(heard) == 8  # masked, 18 bytes of payload
        rest = await _rest(reader)
        waited = time.monotonic() - fleet_told[0]
        writer.close()
        if finished_after is not None:
            assert rest == frame[1000:] + b"\x88\x12\x03\xe9ingress draining"
        else:
            assert rest == b""  # no close frame inside the frame under way
            # Let go GOODBYE_BOUNDARY_WAIT (0.2 s) after, not held for a boundary.
            assert waited < 1.0, waited
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

    fleet = await RawFleet(None, switching_then(close_at_once)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await raw_carrier(ingress, tls_files)
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


# Who hung up: a side's close frame wherever it is in a read (the carrier-edge
# audit of session 30 found the machine heard only a read that was one whole
# close frame).


def _masked_binary(payload: bytes) -> bytes:
    mask = b"\x05\x06\x07\x08"
    assert len(payload) < 126
    return (
        bytes((0x82, 0x80 | len(payload)))
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


async def _held(reader: asyncio.StreamReader) -> float:
    """Seconds until the ingress lets the carrier go; nothing more may come."""
    started = time.monotonic()
    try:
        rest = await asyncio.wait_for(reader.read(-1), 10)  # past HALF_CLOSED_GRACE
    except (ssl.SSLError, ConnectionError):
        rest = b""
    assert rest == b""
    return time.monotonic() - started


@pytest.mark.parametrize("with_101", [False, True])
async def test_a_bot_hanging_up_after_its_last_words_is_logged_as_fleet_closed(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog, with_101: bool
):
    """The usual way a bot ends a call: its last words and its close frame in
    one read (nginx in front of a bot coalesces them into one TLS record the
    same way), later in the call or with its 101 (relayed at the link). Before:
    'carrier closed', the read not being one whole close frame; the carrier's
    reply was taken for the hang-up."""
    last_words = b"\x81\x08Goodbye!" + b"\x88\x0a\x03\xe8bot done"

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not with_101:
            await asyncio.sleep(0.2)
            writer.write(last_words)
            await writer.drain()
        opcode, _ = await asyncio.wait_for(read_frame(reader), 5)  # the carrier's reply
        assert opcode == 8

    fleet = await RawFleet(
        None, switching_then(bot, with_101=last_words if with_101 else b"")
    ).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            assert await ws.recv() == "Goodbye!"
            with pytest.raises(ConnectionClosedOK):
                await ws.recv()
            assert ws.close_code == 1000
        await eventually(lambda: bool(access_entries(caplog)))
        assert access_entries(caplog)[0]["end_reason"] == "fleet closed"
        assert ingress.registry.ended[("a", "fleet closed")] == 1
    finally:
        await fleet.stop()


async def test_a_carrier_hanging_up_before_the_101_is_let_go_at_once_and_logged_as_its_own(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """A close frame right behind the carrier's head waits for the tunnel and
    is relayed at the link; the fleet's reply then ends the call. Before: not
    heard, so the fleet's reply read as the fleet hanging up, its FIN opened
    HALF_CLOSED and the carrier was held 5 s (HALF_CLOSED_GRACE) for a reply
    it had sent; logged 'fleet closed'."""

    async def fleet_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 8
        writer.write(b"\x88\x02" + payload[:2])  # the reply, then TCP close (server first)
        await writer.drain()

    fleet = await RawFleet(None, switching_then(fleet_replies)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        reader, writer = await raw_carrier(ingress, tls_files, then=masked_close())  # one write
        await read_head(reader)
        assert await read_frame(reader) == (8, b"\x03\xe8")
        held = await _held(reader)
        writer.close()
        await eventually(lambda: bool(access_entries(caplog)))
        assert access_entries(caplog)[0]["end_reason"] == "carrier closed"
        assert held < 1.0
    finally:
        await fleet.stop()


async def test_a_carrier_whose_close_reply_follows_its_last_media_frame_is_let_go_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """The bot hangs up while the carrier streams: the carrier's last media
    frame and its close reply come in one TLS record, and the bot closes TCP
    once it reads the reply. Before: the reply was not heard, the bot's FIN
    opened HALF_CLOSED and the carrier was held 5 s after the bot had gone."""

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)
        writer.write(b"\x88\x02\x03\xe8")  # the bot hangs up: a lone close frame
        await writer.drain()
        while (await asyncio.wait_for(read_frame(reader), 5))[0] != 8:
            pass  # media still in flight, then the carrier's reply: close TCP

    fleet = await RawFleet(None, switching_then(bot)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        reader, writer = await raw_carrier(ingress, tls_files)
        await read_head(reader)
        assert await read_frame(reader) == (8, b"\x03\xe8")
        writer.write(_masked_binary(b"\x7f" * 80) + masked_close())  # one write
        held = await _held(reader)
        writer.close()
        await eventually(lambda: bool(access_entries(caplog)))
        assert access_entries(caplog)[0]["end_reason"] == "fleet closed"
        assert held < 1.0
    finally:
        await fleet.stop()


async def test_a_close_reply_split_across_reads_is_heard_at_its_last_byte_and_relayed_whole(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """The bot hangs up and half-closes (HALF_CLOSED: the carrier's reply is
    due); the carrier's reply comes in two TLS records, its header, then 0.3 s
    later its payload. Heard at its header, the call would close both sides
    and the bot would get a close frame cut short; not heard at all (before),
    the carrier is held HALF_CLOSED_GRACE (5 s). Heard at its last byte: the
    bot gets the whole frame, and both sides are let go at once."""
    fleet_got = bytearray()
    fleet_done = asyncio.get_running_loop().create_future()

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)  # a read of its own: heard before and after the fix
        writer.write(b"\x88\x02\x03\xe8")
        writer.write_eof()  # nothing more from the bot; it reads on for the reply
        await writer.drain()
        while chunk := await reader.read(4096):
            fleet_got.extend(chunk)
        fleet_done.set_result(time.monotonic())

    fleet = await RawFleet(None, switching_then(bot)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        reader, writer = await raw_carrier(ingress, tls_files)
        await read_head(reader)
        assert await read_frame(reader) == (8, b"\x03\xe8")
        reply = masked_close()
        writer.write(reply[:6])  # the header and its mask
        await writer.drain()
        await asyncio.sleep(0.3)
        assert not fleet_done.done() and bytes(fleet_got) == reply[:6]
        writer.write(reply[6:])
        sent = time.monotonic()
        held = await _held(reader)
        writer.close()
        assert await asyncio.wait_for(fleet_done, 5) - sent < 1.0
        assert bytes(fleet_got) == reply
        assert held < 1.0
        await eventually(lambda: bool(access_entries(caplog)))
        assert access_entries(caplog)[0]["end_reason"] == "fleet closed"
    finally:
        await fleet.stop()


async def test_a_call_whose_carrier_reads_nothing_is_cut_at_stop_after_its_close_wait_and_logged(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """At stop, the drain's end tells each call 1001 and gives its close
    CLOSE_AT_STOP_TIMEOUT. Here both peers send and neither reads (their
    windows full, the ingress's buffers at their bound both ways): no close
    frame, close_notify or FIN can go, so the call is cut then, both sides
    at once. The stop ends, the call is gone from the registry with its one
    access line (drain), and the fleet's connection is reset, not left open."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    frame = _frame(b"f" * 4000, masked=False)
    fleet_closed = asyncio.get_running_loop().create_future()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(20):
                while not reader.at_eof():
                    writer.write(frame * 16)
                    await writer.drain()  # held once the ingress stops reading
        except (ConnectionError, TimeoutError):
            pass
        finally:
            fleet_closed.set_result(reader.at_eof() or writer.is_closing())

    fleet = await RawFleet(None, switching_then(flood)).start()
    writer: asyncio.StreamWriter | None = None
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await raw_carrier(ingress, tls_files)
        assert await read_head(reader) == SWITCHING
        # Read no more, and send as the fleet does: the ingress buffers up to
        # its bound each way, then stops reading either side.
        writer.write(_frame(b"c" * 4000, masked=True) * 2048)
        before = -1
        for _ in range(30):
            if (now := ingress.registry.buffered_bytes()) == before:
                break
            before = now
            await asyncio.sleep(0.3)
        assert before > 0
        assert len(ingress.registry.calls) == 1
        began = time.monotonic()
        await asyncio.wait_for(ingress.stop(drain_timeout=0), 10)
        took = time.monotonic() - began
        assert CLOSE_AT_STOP_TIMEOUT - 0.1 <= took < CLOSE_AT_STOP_TIMEOUT + 3, took
        assert not ingress.registry.calls
        (line,) = access_entries(caplog)
        assert line["end_reason"] == "drain", line
        assert await asyncio.wait_for(fleet_closed, 5)
    finally:
        if writer is not None:
            writer.close()
        await fleet.stop()


@pytest.mark.parametrize("replies_after", [None, 0.3])
async def test_a_carrier_told_goodbye_has_half_a_second_to_reply_before_its_tls_close(
    start_ingress: StartIngress, tls_files: TLSFiles, replies_after: float | None
):
    """The drain's end tells the carrier 1001 and waits GOODBYE_REPLY_WAIT
    (0.5 s) for its reply: one that replies 0.3 s later is let go at its
    reply, with close_notify (a client library reports a clean close, not
    1006); one that never replies is let go 0.5 s after, not held longer."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(-1), 10)  # says nothing, not even its reply

    fleet = await RawFleet(None, switching_then(silent)).start()
    writer: asyncio.StreamWriter | None = None
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await raw_carrier(ingress, tls_files)
        assert await read_head(reader) == SWITCHING
        stopping = asyncio.ensure_future(ingress.stop(drain_timeout=0.1))
        async with asyncio.timeout(5):
            assert await read_frame(reader) == (8, b"\x03\xe9ingress draining")
        told = time.monotonic()
        if replies_after is not None:
            # Nothing, not even the TLS close, before the reply.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(replies_after):
                    await reader.read(1)
            writer.write(masked_close(1001))
        began = time.monotonic()
        async with asyncio.timeout(10):
            assert await reader.read(-1) == b""  # close_notify: a reset would raise
        held = time.monotonic() - began
        since_told = time.monotonic() - told
        if replies_after is None:
            assert 0.4 <= held < 1.5, held
        else:
            assert held < 0.25, held  # let go at its reply
            assert since_told < 1.0, since_told
        await asyncio.wait_for(stopping, 10)
    finally:
        if writer is not None:
            writer.close()
        await fleet.stop()


# timeouts.close_flush (10 s by default) for the close-flush tests: what they
# pin is the same at any length (a read within it gets everything, one past it
# finds the connection cut at it), 3 s spares each 7 s of waiting.
CLOSE_FLUSH = 3.0
# Reads within the flush come at half of it, reads past it 1.5 s after it.
WITHIN_FLUSH = CLOSE_FLUSH / 2
PAST_FLUSH = CLOSE_FLUSH + 1.5


@pytest.mark.timeout(60)
async def test_a_plain_fleet_that_reads_late_gets_what_was_sent_it_within_the_close_flush(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    await _a_plain_fleet_reads_late(start_ingress, tls_files, reads_after=WITHIN_FLUSH)


# Past the flush, on uvloop alone: the cut is the same timer on both loops, and
# the read within it, on both, has them reach the same close path.
@pytest.mark.uvloop_only
@pytest.mark.timeout(60)
async def test_a_plain_fleet_that_reads_past_the_close_flush_has_what_was_left_dropped(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    await _a_plain_fleet_reads_late(start_ingress, tls_files, reads_after=PAST_FLUSH)


async def _cut_after(registry: Registry) -> float:
    """Seconds from the call's end (its access line) until both its sides are
    gone, the last closing one flushed or cut."""
    (call,) = registry.calls or registry.closing
    await eventually(lambda: call.ended_mono is not None, timeout=10)
    await eventually(lambda: call not in registry.closing, timeout=30)
    assert call.ended_mono is not None
    return time.monotonic() - call.ended_mono


async def _a_plain_fleet_reads_late(
    start_ingress: StartIngress, tls_files: TLSFiles, *, reads_after: float
) -> None:
    """A plain fleet that stops reading (a bot held a few seconds) while the
    carrier says its last 60 kB and hangs up: the fleet's side is closed with
    most of it still in the ingress's buffer, and waits for the fleet
    timeouts.close_flush (CLOSE_FLUSH here). Reading again within it, the
    fleet gets every byte, then a FIN; past it, the ingress has given up on
    it at the flush: what it still held is dropped, its descriptor not held
    longer."""
    frame = _frame(b"c" * 4000, masked=True)
    sent = frame * 15  # 60 kB: what the kernel does not take is under WRITE_HIGH_WATER
    ended = asyncio.get_running_loop().create_future()

    async def held_bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.pause_reading()  # reads nothing (held) ...
        await asyncio.sleep(reads_after)
        writer.transport.resume_reading()  # ... then everything
        got = bytearray()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    got.extend(chunk)
        ended.set_result(bytes(got))

    fleet = await RawFleet(None, switching_then(held_bot)).start()
    assert fleet._server is not None
    for listening in fleet._server.sockets:  # its window small from the SYN on
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    writer: asyncio.StreamWriter | None = None
    try:
        ingress = await start_ingress([fleet.line("a")], timeouts={"close_flush": CLOSE_FLUSH})
        reader, writer = await raw_carrier(ingress, tls_files)
        assert await read_head(reader) == SWITCHING
        (call,) = ingress.registry.calls
        assert call.fleet_side is not None and call.fleet_side.transport is not None
        # The kernel takes 4 KiB of it (loopback's autotuned 4 MiB would take it all).
        fleet_socket = call.fleet_side.transport.get_extra_info("socket")
        fleet_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.write(sent)
        await eventually(lambda: ingress.registry.buffered_bytes() > 24000)
        cut = asyncio.ensure_future(_cut_after(ingress.registry))
        writer.close()  # the carrier hangs up: close_notify, FIN
        got = await asyncio.wait_for(ended, reads_after + 10)
        cut_after = await asyncio.wait_for(cut, 30)
        if reads_after < CLOSE_FLUSH:
            # Then the ingress's 1001 (the carrier sent no close frame), masked
            # (the ingress is the bot's client), and its FIN.
            assert got[: len(sent)] == sent, len(got)
            goodbye = got[len(sent) :]
            said = b"\x03\xe9carrier closed"
            assert goodbye[:2] == bytes((0x88, 0x80 | len(said))) and len(goodbye) == 6 + len(said)
            mask = goodbye[2:6]
            assert bytes(b ^ mask[i % 4] for i, b in enumerate(goodbye[6:])) == said
            assert cut_after < CLOSE_FLUSH, cut_after  # flushed, not cut
        else:
            assert len(got) < len(sent), len(got)  # what it held is dropped
            assert sent.startswith(got)
            # ... cut at the flush's end, not before (nor at the default 10 s).
            assert CLOSE_FLUSH - 0.1 <= cut_after < reads_after, cut_after
        assert not ingress.registry.calls
    finally:
        if writer is not None:
            writer.close()
        await fleet.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("replies_after", [2.0, None])
async def test_a_carrier_has_five_seconds_to_reply_to_a_bot_that_hung_up_and_finished(
    start_ingress: StartIngress, tls_files: TLSFiles, replies_after: float | None
):
    """The bot hangs up and half-closes (HALF_CLOSED): the carrier's reply is
    waited for HALF_CLOSED_GRACE (5 s). One that replies 2 s later has its
    reply relayed whole to the bot and is let go at once; one that never
    replies is let go after 5 s, its call not held longer (its slot with it)."""
    fleet_got = bytearray()

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x88\x02\x03\xe8")
        writer.write_eof()  # nothing more from the bot; it reads on for the reply
        await writer.drain()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(15):
                while chunk := await reader.read(4096):
                    fleet_got.extend(chunk)

    fleet = await RawFleet(None, switching_then(bot)).start()
    writer: asyncio.StreamWriter | None = None
    try:
        ingress = await start_ingress([fleet.line("a")])
        reader, writer = await raw_carrier(ingress, tls_files)
        await read_head(reader)
        async with asyncio.timeout(5):
            assert await read_frame(reader) == (8, b"\x03\xe8")
        began = time.monotonic()
        if replies_after is not None:
            await asyncio.sleep(replies_after)
            # Its end settled (logged, not live) but still waiting for the reply.
            assert ingress.registry.closing and not ingress.registry.calls
            writer.write(masked_close())
        held = await _held(reader)
        since = time.monotonic() - began
        if replies_after is None:
            assert 4.5 <= held < 7.0, held
        else:
            assert held < 0.5 and since < 3.0, (held, since)
            await eventually(lambda: bytes(fleet_got) == masked_close())
        await eventually(lambda: not ingress.registry.calls and not ingress.registry.closing)
    finally:
        if writer is not None:
            writer.close()
        await fleet.stop()


@pytest.mark.timeout(60)
async def test_a_carrier_that_reads_late_gets_the_bots_last_words_within_the_close_flush(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    await _a_carrier_reads_late(start_ingress, tls_files, reads_after=WITHIN_FLUSH)


# Past the flush, on uvloop alone: the cut is the same timer on both loops, and
# the read within it, on both, has them reach the same close path.
@pytest.mark.uvloop_only
@pytest.mark.timeout(60)
async def test_a_carrier_that_reads_past_the_close_flush_has_what_was_left_dropped(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    await _a_carrier_reads_late(start_ingress, tls_files, reads_after=PAST_FLUSH)


# A close flush longer than the TLS close's own wait (tls_socket.CLOSE_TIMEOUT,
# 10 s; 0.5 s here, so that the test takes seconds): a carrier's TLS side is
# waited for the whole flush, not cut at the TLS close's wait (it was: a
# close_flush above 10 s did nothing for carriers and TLS fleets). The carrier
# reads 1-2 s after its side's close (the bot's 0.5 s and the relay), 0.5 s
# before the flush's end.
@pytest.mark.timeout(60)
async def test_a_close_flush_longer_than_the_tls_close_wait_holds_for_a_carrier(
    start_ingress: StartIngress, tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(tls_socket, "CLOSE_TIMEOUT", 0.5)
    await _a_carrier_reads_late(start_ingress, tls_files, reads_after=CLOSE_FLUSH - 0.5)


async def _a_carrier_reads_late(
    start_ingress: StartIngress, tls_files: TLSFiles, *, reads_after: float
) -> None:
    """The carrier reads nothing for a while (a phone's stack held) as the bot
    says its last 60 kB and closes its connection: the carrier's TLS side is
    closed with most of it in the ingress's buffer, and waits for the carrier
    timeouts.close_flush (CLOSE_FLUSH here; the TLS close's own wait,
    tls_socket.CLOSE_TIMEOUT, is 10 s). Reading again within it, it gets
    every byte and close_notify; past it, the ingress has given up on it at
    the flush: what it held is dropped."""
    frame = _frame(b"b" * 4000, masked=False)
    said = frame * 15

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)  # the carrier's socket is set up meanwhile
        writer.write(said)
        await writer.drain()
        writer.close()  # no close frame: the ingress's 1011 follows the last frame

    fleet = await RawFleet(None, switching_then(bot)).start()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # its window small from the SYN
    try:
        ingress = await start_ingress([fleet.line("a")], timeouts={"close_flush": CLOSE_FLUSH})
        host, port = ingress.wss_address
        tls = tls_files.client_context().wrap_socket(
            raw,
            server_hostname="localhost",
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,  # a FIN without close_notify raises
        )

        def upgrade() -> bytes:
            tls.settimeout(5)
            tls.connect((host, port))
            tls.do_handshake()
            return upgrade_on(tls, "/ws/bot-1")

        assert await asyncio.to_thread(upgrade) == SWITCHING
        (call,) = ingress.registry.calls
        # The kernel takes 4 KiB of it (loopback's autotuned 4 MiB would take it all).
        carrier_socket = call.carrier.transport.get_extra_info("socket")
        carrier_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        cut = asyncio.ensure_future(_cut_after(ingress.registry))
        await asyncio.sleep(reads_after)  # the bot closes 0.5 s in

        def read_all() -> tuple[bytes, str]:
            got = b""
            try:
                while chunk := tls.recv(65536):
                    got += chunk
            except (OSError, ssl.SSLError) as exc:
                return got, type(exc).__name__
            return got, "close_notify"

        got, how = await asyncio.to_thread(read_all)
        if reads_after < CLOSE_FLUSH:
            # (Its side then waits for this carrier's close_notify, sent at the
            # close below: `cut` would count that wait too.)
            cut.cancel()
            goodbye = b"\x88\x0e\x03\xf3fleet closed"
            assert (how, got == said + goodbye) == ("close_notify", True), (how, len(got))
        else:
            assert how != "close_notify" and len(got) < len(said), (how, len(got))
            assert said.startswith(got)
            # ... cut at the flush's end (the bot closed 0.5 s in), not before.
            cut_after = await asyncio.wait_for(cut, 30)
            assert CLOSE_FLUSH - 0.1 <= cut_after < reads_after, cut_after
    finally:
        raw.close()
        await fleet.stop()


async def _end_the_call(ingress, how: str) -> asyncio.Future:
    """Ask the call's end as a drain's end or `fleet-ingress end-call` does;
    returns once the machine has it (the end reason is written at the ask)."""
    (call,) = ingress.registry.calls
    if how == "drain":
        asked = asyncio.ensure_future(ingress.stop(drain_timeout=0))
    else:
        asked = asyncio.ensure_future(
            end_call(ingress.registry, call.id, "ticket 9", os.getpid(), 1)
        )
    await eventually(lambda: call.end_reason is not None)
    return asked


@pytest.mark.parametrize("fleet_tls", [True, False], ids=["https", "http"])
@pytest.mark.parametrize("how", ["drain", "end-call"])
async def test_an_end_asked_between_a_carriers_close_frame_and_the_reply_waits_for_the_reply(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog, how: str, fleet_tls: bool
):
    """The carrier hangs up (a websockets client's close) and a drain's end or
    an operator's end-call comes before the bot's reply: the reply still
    reaches the carrier (GOODBYE_REPLY_WAIT at most), which ends cleanly, and
    the access line says who hung up. Before (review of session 37): both
    sides were closed at once with nothing more sent (a close frame had been
    seen): the carrier got no reply (1006) and the line said 'drain' / 'admin'."""
    heard = asyncio.Event()
    go = asyncio.Event()
    fleet_got: list[tuple[int, bytes]] = []

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fleet_got.append(await asyncio.wait_for(read_frame(reader), 5))
        heard.set()
        await asyncio.wait_for(go.wait(), 5)
        writer.write(b"\x88\x0a\x03\xe8bot done")  # the reply, 0.1 s after the ask
        await writer.drain()
        await asyncio.wait_for(reader.read(-1), 5)

    context = tls_files.fleet_server_context() if fleet_tls else None
    fleet = await RawFleet(context, switching_then(bot)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        ws = await connect(wss_url(ingress), ssl=tls_files.client_context())
        closing = asyncio.ensure_future(ws.close(1000, "carrier done"))
        await asyncio.wait_for(heard.wait(), 5)
        assert fleet_got == [(8, b"\x03\xe8carrier done")]
        asked = await _end_the_call(ingress, how)
        await asyncio.sleep(0.1)
        go.set()
        await asyncio.wait_for(closing, 5)
        rcvd = ws.protocol.close_rcvd
        assert rcvd is not None, ws.close_code  # 1006 without the reply
        assert (rcvd.code, rcvd.reason, ws.close_code) == (1000, "bot done", 1000)
        row = await asyncio.wait_for(asked, 5)
        if how == "end-call":
            assert row["end_reason"] == "carrier closed" and "aborted" not in row
        await eventually(lambda: bool(access_entries(caplog)))
        assert access_entries(caplog)[0]["end_reason"] == "carrier closed"
    finally:
        await fleet.stop()


@pytest.mark.parametrize("replies", [True, False], ids=["replies", "never-replies"])
async def test_an_end_asked_between_a_bots_close_frame_and_the_reply_waits_for_the_reply(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog, replies: bool
):
    """The mirror: the bot hangs up, the drain's end comes before the
    carrier's reply, which reaches the bot whole; the carrier gets its TLS
    close right after. A carrier that never replies is let go
    GOODBYE_REPLY_WAIT (0.5 s) after the ask, not held longer."""
    fleet_got = bytearray()
    fleet_done = asyncio.get_running_loop().create_future()

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x88\x0a\x03\xe8bot done")
        await writer.drain()
        while chunk := await asyncio.wait_for(reader.read(4096), 5):
            fleet_got.extend(chunk)
        fleet_done.set_result(True)

    fleet = await RawFleet(None, switching_then(bot)).start()
    writer: asyncio.StreamWriter | None = None
    try:
        ingress = await start_ingress([fleet.line("a")])
        caplog.set_level(logging.INFO, logger="fleet_ingress.access")
        reader, writer = await raw_carrier(ingress, tls_files)
        await read_head(reader)
        assert await asyncio.wait_for(read_frame(reader), 5) == (8, b"\x03\xe8bot done")
        asked = await _end_the_call(ingress, "drain")
        began = time.monotonic()
        if replies:
            await asyncio.sleep(0.1)
            writer.write(masked_close())
        async with asyncio.timeout(5):
            assert await reader.read(-1) == b""  # close_notify: a reset would raise
        held = time.monotonic() - began
        await asyncio.wait_for(fleet_done, 5)
        assert bytes(fleet_got) == (masked_close() if replies else b"")
        if replies:
            assert held < 0.4, held  # let go at its reply
        else:
            assert 0.4 <= held < 1.5, held  # GOODBYE_REPLY_WAIT
        await asyncio.wait_for(asked, 5)
        await eventually(lambda: bool(access_entries(caplog)))
        assert access_entries(caplog)[0]["end_reason"] == "fleet closed"
    finally:
        if writer is not None:
            writer.close()
        await fleet.stop()


async def test_a_carriers_close_frame_with_a_broken_peers_bytes_behind_it_is_heard(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet, caplog
):
    """A broken carrier whose close frame comes with a frame's first byte
    behind it, in one TLS record (nothing may follow a close frame: RFC 6455
    5.5.1): the close is heard at its last byte, so the bot's reply ends the
    call at once and the access line says the carrier hung up. Before (the
    review of session 37) it was heard only at a frame boundary, never here:
    the bot's reply read as the bot hanging up, logged 'fleet closed'."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    ingress = await start_ingress([ws_fleet.line("a")])
    reader, writer = await raw_carrier(ingress, tls_files)
    assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
    writer.write(_masked_text(b"hello"))
    assert await asyncio.wait_for(read_frame(reader), 5) == (1, b"hello")
    writer.write(masked_close(1000) + b"\x82")  # one record
    assert await asyncio.wait_for(read_frame(reader), 5) == (8, b"\x03\xe8")  # the reply
    held = await _held(reader)
    writer.close()
    assert held < 1.0, held
    await eventually(lambda: bool(access_entries(caplog)))
    assert access_entries(caplog)[0]["end_reason"] == "carrier closed"


def _deaf_carrier(
    address: tuple[str, int], context: ssl.SSLContext, *, hang_up: bool
) -> ssl.SSLSocket:
    """A carrier in a call that reads nothing past the 101, not even a TLS
    close (a phone's stack held); with `hang_up`, its close frame sent first."""
    tls = context.wrap_socket(socket.socket(), server_hostname="localhost")
    tls.settimeout(5)
    tls.connect(address)
    head = upgrade_on(tls, "/ws/deaf-1")
    assert head.startswith(b"HTTP/1.1 101 "), head
    if hang_up:
        tls.sendall(masked_close(1000))
    return tls


async def test_end_call_cuts_a_call_whose_carrier_takes_no_close_after_its_wait(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet, caplog
):
    """`end-call` of a live call whose carrier reads nothing: its line comes at
    once (end_reason admin), its carrier's TLS close waits for an answer that
    never comes, so END_CALL_WAIT later both sides are aborted and the answer
    says so. Since session 41 it returned at the line, said "both sides
    closed", and the carrier's connection stayed open (10 s) with nobody
    cutting it."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    ingress = await start_ingress([ws_fleet.line("a")])
    carrier = await asyncio.to_thread(
        _deaf_carrier, ingress.wss_address, tls_files.client_context(), hang_up=False
    )
    try:
        await eventually(lambda: len(ingress.registry.calls) == 1 and ws_fleet.active == 1)
        (call,) = ingress.registry.calls
        began = time.monotonic()
        row = await end_call(ingress.registry, call.id, "stuck", os.getpid(), 1)
        took = time.monotonic() - began
        assert row is not None and row.get("aborted") is True, row
        assert row["end_reason"] == "admin" and not row.get("closing"), row
        assert END_CALL_WAIT - 0.1 <= took < END_CALL_WAIT + 1.5, took
        reg = ingress.registry
        assert (len(reg.calls), len(reg.closing), len(reg.connections)) == (0, 0, 0)
        (line,) = access_entries(caplog)
        assert (line["end_reason"], line["detail"]) == ("admin", "stuck"), line
    finally:
        carrier.close()


async def test_end_call_of_a_call_still_closing_aborts_its_sides_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet, caplog
):
    """A carrier that hangs up and then reads nothing: the bot's reply relayed,
    the call's end is settled (its line, `carrier closed`), and its carrier's
    TLS close waits (CLOSE_TIMEOUT, 10 s) in `Registry.closing`. `end-call` of
    it aborts what is left at once, its line unchanged, and says it was
    closing; before, it answered no such call and the close could not be cut."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    ingress = await start_ingress([ws_fleet.line("a")])
    carrier = await asyncio.to_thread(
        _deaf_carrier, ingress.wss_address, tls_files.client_context(), hang_up=True
    )
    try:
        reg = ingress.registry
        await eventually(lambda: not reg.calls and len(reg.closing) == 1)
        (call,) = reg.closing
        assert len(reg.connections) == 1  # its carrier, closing
        began = time.monotonic()
        row = await end_call(reg, call.id, "stuck", os.getpid(), 1)
        took = time.monotonic() - began
        assert row is not None and row.get("closing") is True and row.get("aborted") is True
        assert row["end_reason"] == "carrier closed" and row["state"] == "closing", row
        assert took < 0.5, took
        await eventually(lambda: not reg.closing and not reg.connections, timeout=1)
        (line,) = access_entries(caplog)  # one line, its own
        assert line["end_reason"] == "carrier closed", line
    finally:
        carrier.close()


async def test_a_carrier_that_resets_while_its_close_flushes_is_let_go_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """A carrier known gone while its close is flushed waits no flush: its
    socket's error (a reset here; the kernel's TCP user timeout, ETIMEDOUT,
    comes the same way, an error event) ends the close at once, on both loops,
    rather than at CLOSE_FLUSH_TIMEOUT (10 s). The carrier reads nothing as the
    bot says its last 60 kB and closes, so the ingress holds most of it, its
    TLS side closing; then the carrier resets. (Session 42's check of the 'dead
    carrier's 10 s flush': a carrier given up by the dead-peer watch, the
    kernel or the silence sweep is aborted, not closed; one that ends while
    its close flushes is let go at its error.)"""
    said = _frame(b"b" * 4000, masked=False) * 15

    async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)  # the carrier's socket is set up meanwhile
        writer.write(said)
        await writer.drain()
        writer.close()

    fleet = await RawFleet(None, switching_then(bot)).start()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    tls = tls_files.client_context().wrap_socket(
        raw, server_hostname="localhost", do_handshake_on_connect=False
    )
    try:
        ingress = await start_ingress([fleet.line("a")])
        host, port = ingress.wss_address

        def upgrade() -> bytes:
            tls.settimeout(5)
            tls.connect((host, port))
            tls.do_handshake()
            return upgrade_on(tls, "/ws/bot-1")

        assert await asyncio.to_thread(upgrade) == SWITCHING
        (call,) = ingress.registry.calls
        carrier_side = call.carrier.transport
        carrier_side.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        reg = ingress.registry
        await eventually(lambda: not reg.calls and len(reg.closing) == 1, timeout=5)
        # Its 1011 written after the last frame, the reply's wait over: its TLS
        # close is flushing what it holds.
        await eventually(lambda: carrier_side.is_closing(), timeout=2)
        assert carrier_side.get_write_buffer_size() > 16384
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset_at = time.monotonic()
        tls.close()
        await eventually(lambda: not reg.closing and not reg.connections, timeout=2)
        assert time.monotonic() - reset_at < 1.0
    finally:
        tls.close()
        await fleet.stop()


async def test_a_drain_that_waits_for_a_closing_call_says_so_at_its_end(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet, caplog
):
    """A drain waits for calls still closing (its carrier hung up and reads
    nothing, its TLS close unanswered): at its end the warning counts them
    (`closing_calls` 1 beside `calls` 0), where it said only calls 0; then
    the close is cut, as every call's is at the drain's end."""
    caplog.set_level(logging.WARNING, logger="fleet_ingress.server")
    ingress = await start_ingress([ws_fleet.line("a")])
    carrier = await asyncio.to_thread(
        _deaf_carrier, ingress.wss_address, tls_files.client_context(), hang_up=True
    )
    try:
        reg = ingress.registry
        await eventually(lambda: not reg.calls and len(reg.closing) == 1)
        began = time.monotonic()
        await asyncio.wait_for(ingress.stop(drain_timeout=0.3), 10)
        took = time.monotonic() - began
        (up,) = [r for r in caplog.records if r.getMessage() == "drain time is up: closing calls"]
        said = up.fields  # type: ignore[attr-defined]
        assert (said["calls"], said["closing_calls"]) == (0, 1), said
        assert not reg.closing and not reg.connections
        assert took < 0.3 + CLOSE_AT_STOP_TIMEOUT + 2, took
    finally:
        carrier.close()
