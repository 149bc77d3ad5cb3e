"""A peer's reset that comes with its last bytes, before a call is linked.

uvloop stops polling a descriptor after an error event (libuv's POLLERR),
calling its reader once: a peer's last bytes and the reset right behind them
were read as the bytes alone (one TLS record, one read a wake), and the
reset was never read (a "dead poll"). Session 35 fixed the tunnel (the
silence sweep, `TLSConnection.read_if_ended`); these are the phases before
it: the carrier's handshake and head, the fleet's answer. Each peer here
sends and resets in one loop callback, so both are on the ingress's socket
before it polls. Run on both loops (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time

import pytest

from tests.support import (
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    access_entries,
    eventually,
    never_answer,
    raw_carrier,
    read_head,
    switching_101,
)


def switching_then_at_once(react_after):
    """`switching_then`, its 101 written and `react_after` run in one callback
    (no drain between: the 101 goes out at once, the socket being empty)."""

    async def react(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(switching_101(await read_head(reader)))
        await react_after(reader, writer)

    return react


async def _a_call_ended_by_the_fleets_reset_at_once(
    ingress, tls_files: TLSFiles, caplog, *, frames: bytes = b""
) -> None:
    """A carrier's call through `ingress` to a fleet that answers and resets:
    the carrier gets the 101 and `frames` (all of them, in order), then the
    call's one access line says fleet_reset, within 1.5 s of the upgrade."""
    reader, writer = await raw_carrier(ingress, tls_files, "/ws/bot")
    started = time.monotonic()
    async with asyncio.timeout(5):
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 101 "), head
        got = await reader.readexactly(len(frames))
    assert got == frames
    await eventually(lambda: bool(access_entries(caplog)), timeout=10)
    took = time.monotonic() - started
    writer.close()
    (entry,) = access_entries(caplog)
    assert entry["end_reason"] == "fleet_reset", entry
    assert took < 1.5, (took, entry)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER {1, 0}: a TCP reset, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_fleet_that_sends_part_of_its_answer_then_resets_is_seen_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """A fleet that sends part of its response head and resets closed before a
    complete head (SPEC 5, empty-response): retried, then 502 after the
    attempts. On uvloop the part was read and the reset not: each attempt sat
    out timeouts.response, then 504 (a retry policy's response-timeout)."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")

    async def part_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        sock = writer.get_extra_info("socket")
        writer.write(b"HTTP/1.1 101 Switching")  # sent at once: the socket is empty
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    fleet = await RawFleet(tls_files.fleet_server_context(), part_then_reset).start()
    try:
        ingress = await start_ingress(
            [fleet.line("resets")], timeouts={"response": 2}, retry={"retries": 1}
        )
        host, port = ingress.wss_address
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        started = time.monotonic()
        writer.write(UPGRADE.format(path="/ws/bot").encode())
        async with asyncio.timeout(8):
            head = await read_head(reader)
        took = time.monotonic() - started
        writer.close()
        assert head.startswith(b"HTTP/1.1 502 "), head
        assert took < 1.5, took
        assert fleet.connections == 2
        await eventually(lambda: bool(access_entries(caplog)))
        (entry,) = access_entries(caplog)
        assert entry["status"] == 502 and entry["attempts"] == 2, entry
    finally:
        await fleet.stop()


async def test_a_carrier_whose_head_and_reset_come_together_ends_before_its_fleet_answers(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """A carrier that sends its upgrade and resets: the call ends, its slot
    given back, without waiting for the fleet (here one that never answers).
    On uvloop the head was read and the reset not: the head went on to the
    fleet and the call waited for timeouts.response (then retried, as if the
    fleet had failed), a slot and a bot held for nothing."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    fleet = await RawFleet(tls_files.fleet_server_context(), never_answer).start()
    try:
        ingress = await start_ingress(
            [fleet.line("quiet")], timeouts={"response": 4}, retry={"retries": 0}
        )
        port = ingress.wss_address[1]
        ctx = tls_files.client_context()

        def handshake() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port))
            return ctx.wrap_socket(raw, server_hostname="localhost")

        tls = await asyncio.to_thread(handshake)
        # The ingress's side of the handshake done too (its last step may wait a
        # loop turn in the head queue: a reset before it is a failed handshake).
        await eventually(lambda: bool(ingress.registry.connections), timeout=5)
        started = time.monotonic()
        # The head and the reset in one callback of the ingress's own loop:
        # both are on its socket before it polls.
        tls.sendall(UPGRADE.format(path="/ws/bot").encode())
        _reset(tls)
        await eventually(lambda: bool(access_entries(caplog)), timeout=8)
        took = time.monotonic() - started
        (entry,) = access_entries(caplog)
        # Its head not yet parsed: no slot taken, no fleet connected.
        assert entry["end_reason"] == "carrier_reset" and entry["attempts"] == 0, entry
        assert took < 1.5, (took, entry)
        assert fleet.connections == 0
        assert not ingress.registry.calls and not ingress.registry.connections
    finally:
        await fleet.stop()


class _BioClient:
    """A TLS client on memory BIOs over a non-blocking socket: what it sends
    is held until the test sends it, so that its last flight, a head and a
    reset can go in one callback of the ingress's own loop."""

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    async def handshake_but_the_last_flight(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.tls.do_handshake()
                return  # its Finished is in `outgoing`, unsent
            except ssl.SSLWantReadError:
                pass
            if self.outgoing.pending:
                await loop.sock_sendall(self.sock, self.outgoing.read())
            data = await loop.sock_recv(self.sock, 65536)
            assert data, "the ingress closed during the handshake"
            self.incoming.write(data)


async def _connected(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


@pytest.mark.parametrize("shape", ["part of a hello", "last flight and a head"])
async def test_a_carrier_that_resets_during_its_handshake_is_released_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, shape: str
):
    """A carrier that resets during its handshake: released at once, and counted
    as a failed handshake (its last flight with a head: the handshake done,
    then its loss, no call). On uvloop the reader was called once for the
    bytes and the reset; the reset went unread and the connection was held
    until timeouts.request."""
    ingress = await start_ingress([], timeouts={"request": 6})
    registry = ingress.registry
    port = ingress.wss_address[1]
    client = _BioClient(tls_files.client_context(), await _connected(port))
    await eventually(lambda: registry.handshaking == 1)
    if shape == "part of a hello":
        try:
            client.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = client.outgoing.read()
        sent = client.sock.send(hello[: len(hello) // 2])
        assert sent == len(hello) // 2
    else:
        await client.handshake_but_the_last_flight()
        client.tls.write(b"GET /ws/bot HTTP/1.1\r\n")
        flight = client.outgoing.read()
        assert client.sock.send(flight) == len(flight)
    started = time.monotonic()
    _reset(client.sock)
    await eventually(lambda: registry.handshaking == 0 and not registry.connections, timeout=8)
    took = time.monotonic() - started
    assert took < 1.5, took
    # Part of a hello is a failed handshake; a last flight read is a handshake
    # done, and a connection lost before its head (no call, no access line).
    assert registry.tls_handshake_failures == (1 if shape == "part of a hello" else 0)


async def test_a_fleet_whose_101_and_reset_come_together_ends_the_call_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """The fleet's whole 101 and its reset: the head read, the fleet's reading
    paused until the link, the reset unread on uvloop, the call held (the
    carrier told nothing) until the silence sweep's next pass (about 7 s at
    carrier_silence 30). Now `linked` looks once: ended at once, fleet_reset."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # in the callback that wrote the 101

    fleet = await RawFleet(tls_files.fleet_server_context(), switching_then_at_once(reset)).start()
    try:
        ingress = await start_ingress([fleet.line("resets")])
        await _a_call_ended_by_the_fleets_reset_at_once(ingress, tls_files, caplog)
    finally:
        await fleet.stop()


class _BioFleet:
    """A TLS fleet on memory BIOs over non-blocking sockets, on the test's own
    loop: what it writes after the carrier's head (`answer`, a list of
    plaintext writes, a TLS record each) is sent in one `send` and reset in
    the same callback, so that all of it and the reset are on the ingress's
    socket before it polls."""

    def __init__(self, ctx: ssl.SSLContext, answer) -> None:
        self.ctx, self.answer = ctx, answer
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.listening.setblocking(False)
        self.port = self.listening.getsockname()[1]
        self.task = asyncio.create_task(self._serve())

    def line(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port} name={name}"

    async def stop(self) -> None:
        self.task.cancel()
        self.listening.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        sock, _ = await loop.sock_accept(self.listening)
        # At once, as asyncio's transports send: Nagle's algorithm would hold
        # the answer behind the unacknowledged session tickets, and the reset
        # drop it unsent.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(incoming, outgoing, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                head += tls.read(65536)  # the handshake first
                continue
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                await loop.sock_sendall(sock, outgoing.read())
            data = await loop.sock_recv(sock, 65536)
            assert data, "the ingress closed before its head"
            incoming.write(data)
        if outgoing.pending:  # session tickets, say
            await loop.sock_sendall(sock, outgoing.read())
        for part in self.answer(head):
            tls.write(part)
        records = outgoing.read()
        assert sock.send(records) == len(records)
        _reset(sock)


async def test_a_fleets_answer_and_frames_that_come_with_its_reset_all_reach_the_carrier(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """The fleet's 101, its first frames (a TLS record each, more than a read
    event reads) and its reset, together, its session tickets just before:
    the carrier gets the 101 and every frame, then the call ends fleet_reset.
    What the fleet sent before it reset is relayed, as asyncio's loop always
    did. On uvloop before the set-up reads (session 36) its one read event took
    a ticket and nothing more: the answer went unread, the attempt failed
    after timeouts.response as a response-timeout and the carrier got none
    of it."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    frames = [b"\x81\x04" + b"f%03d" % i for i in range(40)]

    def answer(head: bytes) -> list[bytes]:
        return [switching_101(head), *frames]

    fleet = _BioFleet(tls_files.fleet_server_context(), answer)
    try:
        ingress = await start_ingress([fleet.line("resets")])
        await _a_call_ended_by_the_fleets_reset_at_once(
            ingress, tls_files, caplog, frames=b"".join(frames)
        )
    finally:
        await fleet.stop()


def _masked_frames(total: int, size: int = 4000) -> bytes:
    """Masked binary frames (a carrier's, a client's) of `size` bytes of
    payload each, `total` bytes of payload at least."""
    mask = b"\x01\x02\x03\x04"
    frame = b"\x82\xfe" + size.to_bytes(2, "big") + mask + bytes(size)  # zeros, masked: the mask
    return frame * -(-total // size)


async def test_a_carrier_that_resets_while_its_early_frames_wait_at_the_bound_ends_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """A carrier that sends its upgrade and more early frames than a call keeps
    before its 101 (MAX_EARLY_BYTES, 64 KiB), then resets: the call ends
    carrier_reset within EARLY_LOOK_EVERY, its slot given back, without
    waiting for the fleet (here one that never answers). Its reading stopped
    at the bound, nothing read its reset, on both loops, until the link: the
    call held its slot and the fleet's connection for timeouts.response, then
    was logged the fleet's 504, 'the fleet did not answer in time' (a
    response-timeout: retried on another fleet where retries are left)."""
    from fleet_ingress.net.proxy import MAX_EARLY_BYTES

    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    fleet = await RawFleet(tls_files.fleet_server_context(), never_answer).start()
    try:
        ingress = await start_ingress(
            [fleet.line("quiet")], timeouts={"response": 4}, retry={"retries": 0}
        )
        port = ingress.wss_address[1]
        ctx = tls_files.client_context()

        def handshake() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port))
            return ctx.wrap_socket(raw, server_hostname="localhost")

        tls = await asyncio.to_thread(handshake)
        sent = UPGRADE.format(path="/ws/bot").encode() + _masked_frames(MAX_EARLY_BYTES + 8000)
        await asyncio.to_thread(tls.sendall, sent)
        await eventually(lambda: bool(ingress.registry.calls))
        await asyncio.sleep(0.3)  # the ingress has read what it keeps, and stopped
        started = time.monotonic()
        _reset(tls)
        await eventually(lambda: bool(access_entries(caplog)), timeout=8)
        took = time.monotonic() - started
        (entry,) = access_entries(caplog)
        assert entry["end_reason"] == "carrier_reset", entry
        assert took < 1.5, (took, entry)
        await eventually(lambda: not ingress.registry.calls and not ingress.registry.connections)
    finally:
        await fleet.stop()


@pytest.mark.parametrize("answer", ["403 with a body", "429", "body to the close"])
async def test_a_fleets_refusal_and_reset_that_come_together_reach_the_carrier_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog, answer: str
):
    """A fleet that answers other than 101 (SPEC 3: relayed as it is, 429
    untouched) and resets with it: the carrier gets the answer whole and the
    call ends at once, not at the relay's silence watch."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    body = b"".join(b"no room for you, %04d\n" % i for i in range(1200))  # 26 KB: records
    if answer == "403 with a body":
        parts = [b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body)]
        parts += [body[i : i + 500] for i in range(0, len(body), 500)]
    elif answer == "429":
        parts = [b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n"]
    else:
        parts = [b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n"]
        parts += [body[i : i + 500] for i in range(0, len(body), 500)]
    expected = b"".join(parts)

    fleet = _BioFleet(tls_files.fleet_server_context(), lambda head: parts)
    try:
        ingress = await start_ingress([fleet.line("refuses")], timeouts={"response": 4})
        host, port = ingress.wss_address
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        started = time.monotonic()
        writer.write(UPGRADE.format(path="/ws/bot").encode())
        async with asyncio.timeout(8):
            got = await reader.read(-1)
        took = time.monotonic() - started
        writer.close()
        if answer == "body to the close":
            # Its end is the fleet's reset: what came before it, whole.
            assert got == expected, (len(got), len(expected))
        else:
            assert got == expected, got[:200]
        await eventually(lambda: bool(access_entries(caplog)), timeout=8)
        (entry,) = access_entries(caplog)
        assert entry["status"] == int(expected[9:12]), entry
        assert took < 1.5, (took, entry)
    finally:
        await fleet.stop()


async def test_a_carrier_ended_at_the_bound_whose_fleet_answers_as_its_rest_is_read_relays_none(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """The same carrier ending with a FIN while its early frames wait at the
    bound: what it sent past the bound is read and dropped a record a loop
    turn. A fleet whose 101 comes in those turns must not be relayed the rest
    from the middle of a frame (the records dropped before the link cut the
    frames anywhere): the bot gets nothing of the carrier's, then 1001
    'carrier closed', a clean close. Before (the review of session 37): the
    link relayed the rest, the bot read a frame from a dropped frame's middle."""
    from fleet_ingress.net.proxy import MAX_EARLY_BYTES

    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    got = bytearray()
    fleet_done = asyncio.get_running_loop().create_future()
    carrier_ended = asyncio.Event()

    async def answer_as_the_rest_is_read(reader, writer) -> None:
        head = await read_head(reader)
        await asyncio.wait_for(carrier_ended.wait(), 5)
        writer.write(switching_101(head))
        await writer.drain()
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                got.extend(chunk)
        except ConnectionError as exc:  # a reset: the call's end is its own
            fleet_done.set_result(exc)
        else:
            fleet_done.set_result(None)

    fleet = await RawFleet(None, answer_as_the_rest_is_read).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        port = ingress.wss_address[1]
        ctx = tls_files.client_context()

        def handshake() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port))
            return ctx.wrap_socket(raw, server_hostname="localhost")

        tls = await asyncio.to_thread(handshake)
        early = _masked_frames(MAX_EARLY_BYTES + 1_500_000)
        await asyncio.to_thread(
            tls.sendall, UPGRADE.format(path="/ws/bot").encode() + early[:MAX_EARLY_BYTES]
        )
        await eventually(lambda: bool(ingress.registry.calls))
        (call,) = ingress.registry.calls
        await eventually(lambda: call.carrier.reading_paused)  # at the bound
        # 1.5 MB more, all on the ingress's socket (its buffer made to hold
        # them) with the FIN behind: read and dropped a 16 KiB record a turn.
        sock = call.carrier.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        await asyncio.to_thread(tls.sendall, early[MAX_EARLY_BYTES:])
        tls.shutdown(socket.SHUT_WR)  # a FIN (no close_notify)
        async with asyncio.timeout(3):
            while not call.carrier._ended_at_bound:  # the look found it ended
                await asyncio.sleep(0)
        carrier_ended.set()  # the 101 now, the rest still being read
        reset = await asyncio.wait_for(fleet_done, 5)
        tls.close()
        # Linked (the fleet's connection closed, not reset as a dropped attempt's).
        assert reset is None, reset
        # Nothing of the carrier's: the ingress's own 1001 alone, masked.
        assert len(got) < 200, (len(got), bytes(got[:16]).hex())
        assert got[:2] == b"\x88\x90", bytes(got[:16]).hex()
        payload = bytes(b ^ got[2 + (i & 3)] for i, b in enumerate(got[6:]))
        assert payload == b"\x03\xe9carrier closed", payload
        await eventually(lambda: bool(access_entries(caplog)))
        (entry,) = access_entries(caplog)
        assert entry["end_reason"] == "carrier closed", entry
    finally:
        await fleet.stop()
