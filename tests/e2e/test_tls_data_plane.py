"""The call path on socket-BIO TLS (net/tls_socket.py), through the real listener.

What the wiring relies on, end to end: OpenSSL writes a refused handshake's
alert itself (issue #12, point 2), a handshake that never completes is cut at
`timeouts.request`, a head that arrives in the same flight as the client's
Finished is read, a fleet's answer spread over many records arrives whole,
and a TLS side's reads (views of one shared buffer) reach a plain-TCP fleet
intact however its transport buffers them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from fleet_ingress.logs import _FIELDS
from fleet_ingress.net.tls_socket import connect as tls_connect
from fleet_ingress.service.ingress import Ingress
from tests.support import (
    LIBSSL,
    SWITCHING,
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    access_entries,
    answer,
    blocking_handshake,
    eventually,
    free_port,
    masked_close,
    no_shared_cipher_client,
    raw_carrier,
    raw_exchange,
    read_frame,
    read_head,
    request_key_update,
    ssl_pointer,
    tls11_only_client,
    tls12_server_context,
)

HEALTH = b"GET /haproxy-health HTTP/1.1\r\nHost: calls.test\r\n\r\n"


async def _ingress_without_fleets(start_ingress: StartIngress, **kw: object):  # type: ignore[no-untyped-def]
    return await start_ingress([f"https://127.0.0.1:{await free_port()} name=none"], **kw)


# -- a refused handshake: the alert, through the listener ---------------------------------


@pytest.mark.parametrize(
    ("make_ctx", "alert"),
    [
        (tls11_only_client, "TLSV1_ALERT_PROTOCOL_VERSION"),
        (no_shared_cipher_client, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
    ],
    ids=["tls1.1-only", "no-shared-cipher"],
)
async def test_a_refused_client_gets_the_alert_that_says_why(
    start_ingress: StartIngress, make_ctx: Callable[[], ssl.SSLContext], alert: str
) -> None:
    """curl said SSL_ERROR_SYSCALL and Node ECONNRESET: the alert was dropped."""
    ingress = await _ingress_without_fleets(start_ingress)
    _, port = ingress.wss_address
    exc = await asyncio.to_thread(blocking_handshake, port, make_ctx())
    assert isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError), repr(exc)
    assert exc.reason == alert
    await eventually(lambda: ingress.registry.tls_handshake_failures == 1)
    await eventually(lambda: ingress.registry.handshaking == 0)
    assert ingress.registry.connections_total == 0


def _distrusting_client() -> ssl.SSLContext:
    """A client that does not trust the ingress's certificate (the system's CAs
    only, not the test CA): it refuses the handshake with an alert."""
    return ssl.create_default_context()


def _plain_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /ws/bot HTTP/1.1\r\nHost: calls.test\r\n\r\n")
        with contextlib.suppress(OSError):
            sock.recv(100)


def _connect_and_leave(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


def _handshake_with(make_ctx: Callable[[], ssl.SSLContext]) -> Callable[[int], object]:
    return lambda port: blocking_handshake(port, make_ctx())


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        r.__dict__[_FIELDS]
        for r in caplog.records
        if r.name == "fleet_ingress.refused" and r.getMessage() == "tls handshake failed"
    ]


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (_handshake_with(tls11_only_client), "UNSUPPORTED_PROTOCOL"),
        (_handshake_with(no_shared_cipher_client), "NO_SHARED_CIPHER"),
        (_handshake_with(_distrusting_client), "TLSV1_ALERT_UNKNOWN_CA"),
        (_plain_http, "HTTP_REQUEST"),
        (_connect_and_leave, None),
    ],
    ids=["tls1.1-only", "no-shared-cipher", "distrusts-the-certificate", "plain-http", "leaves"],
)
async def test_a_failed_handshake_is_logged_with_the_client_and_why(
    start_ingress: StartIngress,
    caplog: pytest.LogCaptureFixture,
    client: Callable[[int], object],
    reason: str | None,
) -> None:
    """An operator paged for failing handshakes (or told by a carrier that it
    cannot connect) had only a count: each failure with a reason now has a
    line naming the client and OpenSSL's reason. A client that leaves without
    a word (a TCP health check, a scanner) is counted, not logged."""
    caplog.set_level("INFO", logger="fleet_ingress.refused")
    ingress = await _ingress_without_fleets(start_ingress)
    _, port = ingress.wss_address
    await asyncio.to_thread(client, port)
    await eventually(lambda: ingress.registry.tls_handshake_failures == 1)
    lines = _refusal_lines(caplog)
    if reason is None:
        assert lines == []
        return
    assert [(r["client_ip"], r["listener"], r["reason"]) for r in lines] == [
        ("127.0.0.1", "wss", reason)
    ]


async def test_failed_handshakes_are_not_logged_with_the_access_log_off(
    start_ingress: StartIngress, caplog: pytest.LogCaptureFixture
) -> None:
    """`log.access = false` turns them off with the refused requests: still counted."""
    caplog.set_level("INFO", logger="fleet_ingress.refused")
    ingress = await _ingress_without_fleets(start_ingress, log={"access": False})
    _, port = ingress.wss_address
    await asyncio.to_thread(_plain_http, port)
    await eventually(lambda: ingress.registry.tls_handshake_failures == 1)
    assert _refusal_lines(caplog) == []


async def test_a_handshake_timeout_is_logged_with_the_client(
    start_ingress: StartIngress, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="fleet_ingress.refused")
    ingress = await _ingress_without_fleets(start_ingress, timeouts={"request": 0.3})
    host, port = ingress.wss_address
    _, writer = await asyncio.open_connection(host, port)
    try:
        await eventually(lambda: ingress.registry.tls_handshake_failures == 1)
    finally:
        writer.close()
    assert [(r["client_ip"], r["reason"]) for r in _refusal_lines(caplog)] == [
        ("127.0.0.1", "timeout: no TLS handshake within timeouts.request")
    ]


async def test_openssl_s_client_reports_the_protocol_version_alert(
    start_ingress: StartIngress,
) -> None:
    ingress = await _ingress_without_fleets(start_ingress)
    host, port = ingress.wss_address
    command = ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_1"]
    command += ["-cipher", "DEFAULT:@SECLEVEL=0"]  # the client may offer TLS 1.1 at all
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
    )
    said = done.stdout + done.stderr
    assert "alert protocol version" in said, said
    await eventually(lambda: ingress.registry.tls_handshake_failures == 1)


def _client_hello(server_name: bytes) -> bytes:
    """A TLS 1.2 ClientHello record offering ECDSA suites, with this SNI (any length)."""

    def ext(kind: int, body: bytes) -> bytes:
        return kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body

    name = b"\x00" + len(server_name).to_bytes(2, "big") + server_name
    extensions = (
        ext(0x0000, len(name).to_bytes(2, "big") + name)  # server_name
        + ext(0x000A, b"\x00\x02\x00\x17")  # supported_groups: secp256r1
        + ext(0x000B, b"\x01\x00")  # ec_point_formats: uncompressed
        + ext(0x000D, b"\x00\x04\x04\x03\x08\x04")  # signature_algorithms
    )
    body = (
        b"\x03\x03"
        + random.randbytes(32)
        + b"\x00"  # no session id
        + b"\x00\x04\xc0\x2b\xc0\x2f"  # ECDHE-ECDSA/RSA-AES128-GCM-SHA256
        + b"\x01\x00"  # no compression
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def _first_record(port: int, hello: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(hello)
        got = b""
        while len(got) < 7:
            chunk = sock.recv(7 - len(got))
            if not chunk:
                break
            got += chunk
        return got


async def test_a_hello_with_a_huge_server_name_gets_a_fatal_alert(
    start_ingress: StartIngress,
) -> None:
    """Issue #12: a huge SNI saw a dropped connection. OpenSSL refuses a host
    name over 255 bytes with a fatal alert, and now the client reads it."""
    ingress = await _ingress_without_fleets(start_ingress)
    _, port = ingress.wss_address
    # The same hello with a normal name is taken: the refusal is about the name.
    normal = await asyncio.to_thread(_first_record, port, _client_hello(b"calls.test"))
    assert normal[:1] == b"\x16", normal  # a handshake record: ServerHello
    record = await asyncio.to_thread(_first_record, port, _client_hello(b"a" * 2000))
    assert record[:1] == b"\x15", record  # an alert record
    assert record[5:6] == b"\x02", record  # level: fatal
    await eventually(lambda: ingress.registry.tls_handshake_failures >= 1)


# -- handshakes under way when the listener closes -------------------------------------------


async def _handshake_under_way(ingress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # type: ignore[no-untyped-def]
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(host, port)
    await eventually(lambda: ingress.registry.handshaking == 1)
    return reader, writer


def _handshake_failures_logged(caplog: pytest.LogCaptureFixture) -> int:
    """Failed handshakes logged: with a reason (INFO), or without (DEBUG)."""
    return sum(
        r.name in ("fleet_ingress.refused", "fleet_ingress.listener")
        and r.getMessage() == "tls handshake failed"
        for r in caplog.records
    )


async def test_a_handshake_kept_over_an_upgrades_stop_that_fails_is_counted_and_logged(
    start_ingress: StartIngress, caplog: pytest.LogCaptureFixture
) -> None:
    """An old generation stops accepting with its handshakes kept
    (`CarrierListener.close(keep_handshakes=True)`): one of them that then
    fails is the carrier's failure as any other, in the metric and the log."""
    caplog.set_level("DEBUG", logger="fleet_ingress.listener")
    caplog.set_level("INFO", logger="fleet_ingress.refused")
    ingress = await _ingress_without_fleets(start_ingress)
    reader, writer = await _handshake_under_way(ingress)
    try:
        ingress.stop_accepting(keep_pending=True)
        await asyncio.sleep(0.05)
        assert ingress.registry.handshaking == 1  # kept, not cut
        writer.write(b"GET / HTTP/1.1\r\nHost: calls.test\r\n\r\n")  # not TLS
        async with asyncio.timeout(5):
            await reader.read()  # the alert, then the close
        await eventually(lambda: ingress.registry.handshaking == 0)
        assert ingress.registry.tls_handshake_failures == 1
        assert _handshake_failures_logged(caplog) == 1
    finally:
        writer.close()


async def test_a_handshake_cut_by_a_plain_stop_is_not_counted_as_the_carriers_failure(
    start_ingress: StartIngress, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="fleet_ingress.listener")
    caplog.set_level("INFO", logger="fleet_ingress.refused")
    ingress = await _ingress_without_fleets(start_ingress)
    reader, writer = await _handshake_under_way(ingress)
    try:
        ingress.stop_accepting()
        async with asyncio.timeout(5):
            await reader.read()
        await eventually(lambda: ingress.registry.handshaking == 0)
        assert ingress.registry.tls_handshake_failures == 0
        assert _handshake_failures_logged(caplog) == 0
    finally:
        writer.close()


async def test_a_handshake_kept_by_an_upgrades_stop_is_cut_when_the_stop_ends(
    start_ingress: StartIngress,
) -> None:
    """An old generation's stop keeps its handshakes under way; once its
    drain is over (here cut short) nothing may be left to finish later and be
    served by an ingress that has stopped."""
    ingress = await _ingress_without_fleets(start_ingress)
    reader, writer = await _handshake_under_way(ingress)
    try:
        await ingress.stop(drain_timeout=0.2, keep_pending=True)
        assert ingress.registry.handshaking == 0
        async with asyncio.timeout(2):  # closed now, not at timeouts.request
            await reader.read()
    finally:
        writer.close()


# -- the handshake's deadline -----------------------------------------------------------------


async def test_a_client_that_never_says_hello_is_closed_at_timeouts_request(
    start_ingress: StartIngress,
) -> None:
    ingress = await _ingress_without_fleets(start_ingress, timeouts={"request": 0.4})
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        started = time.monotonic()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # a FIN, not a reset: nothing was sent
        assert time.monotonic() - started >= 0.35
    finally:
        writer.close()
    assert ingress.registry.tls_handshake_failures == 1
    assert ingress.registry.handshaking == 0


# -- the head in the same flight as the client's Finished --------------------------------------


def _head_with_finished(port: int, ctx: ssl.SSLContext, request: bytes) -> tuple[str, int, bytes]:
    """A TLS 1.3 client over memory BIOs, so that its Finished and the first
    application record leave in one send; then read the answer to its end."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(data)
        tls.write(request)
        flight = outgoing.read()  # the Finished record, then the request's
        sock.sendall(flight)
        answer = bytearray()
        while True:
            try:
                chunk = tls.read(65536)
                if not chunk:  # the server's close_notify
                    break
                answer += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
        return tls.version() or "", len(flight), bytes(answer)


async def test_a_head_sent_with_the_finished_message_is_answered(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """The server's handshake ends on the client's Finished; the head's record
    behind it is on the socket already and must be read, with no further
    wake-up from the client."""
    ingress = await _ingress_without_fleets(start_ingress)
    _, port = ingress.wss_address
    ctx = tls_files.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    version, flight, got = await asyncio.wait_for(
        asyncio.to_thread(_head_with_finished, port, ctx, HEALTH), 10
    )
    assert version == "TLSv1.3"
    assert flight > len(HEALTH) + 40  # Finished and the request went together
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]


# -- a large answer over many records, and a TLS side feeding a plain-TCP fleet ---------------


async def test_a_fleet_answer_over_many_records_reaches_the_carrier_whole(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    body = random.Random(5).randbytes(1024 * 1024 + 17)  # 65 records and a bit
    raw = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    busy = await RawFleet(tls_files.fleet_server_context(), answer(raw)).start()
    try:
        ingress = await start_ingress([busy.line("busy")])
        request = (
            b"GET /ws/bot-1 HTTP/1.1\r\nHost: calls.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        got = await raw_exchange(ingress, tls_files, request, timeout=10)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(raw).hexdigest()
    finally:
        await busy.stop()


async def test_a_tls_carrier_feeding_a_plain_tcp_fleet_that_lags_arrives_intact(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A TLS side's reads are views of one read buffer that the next read
    overwrites. A plain fleet's asyncio transport that cannot send at once may
    keep what it is given as given (uvloop does): it must be given bytes."""
    sent = random.Random(3).randbytes(16 * 1024 * 1024)  # more than the kernel buffers
    received: list[bytes] = []

    async def lagging_fleet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCHING)
        await asyncio.sleep(0.5)  # the ingress's writes back up meanwhile
        received.append(await reader.readexactly(len(sent)))
        writer.close()

    fleet = await RawFleet(None, lagging_fleet).start()  # http:// : an asyncio transport
    try:
        ingress = await start_ingress([fleet.line("plain")])
        host, port = ingress.wss_address
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls_files.client_context(), server_hostname="localhost"
            )
            writer.write(UPGRADE.format(path="/ws/bot-1").encode())
            assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
            writer.write(sent)  # not WebSocket frames: the tunnel relays bytes
            await writer.drain()
            await eventually(lambda: bool(received), timeout=15)
            writer.close()
        assert hashlib.sha256(received[0]).digest() == hashlib.sha256(sent).digest()
    finally:
        await fleet.stop()


async def test_a_call_ending_while_its_fleet_still_sends_delivers_the_carriers_last_bytes(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """The carrier sends its last 4 MiB and closes (close_notify) while the fleet
    streams to it and reads nothing for a while. The ingress closes the fleet's
    side once it has the carrier's bytes flushed, with the fleet's own bytes
    unread there: every byte reaches the fleet, then a clean end. Before, that
    close reset the connection and the fleet lost the tail (SPEC 3: "the other
    is closed after its pending bytes are flushed")."""
    sent = random.Random(5).randbytes(4 * 1024 * 1024)
    got: list[bytes | BaseException] = []

    async def streaming_fleet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCHING)

        async def stream() -> None:
            with contextlib.suppress(OSError):
                for _ in range(1024):  # until the call ends (64 MiB at most)
                    writer.write(b"m" * 65536)  # the carrier reads none of it
                    await writer.drain()

        streaming = asyncio.ensure_future(stream())
        await asyncio.sleep(1.0)  # reads nothing meanwhile: the ingress's writes back up
        received = bytearray()
        try:
            while chunk := await reader.read(65536):
                received += chunk
                await asyncio.sleep(0.002)  # slower than the ingress writes: bytes queue there
            got.append(bytes(received))
        except OSError as exc:
            got.append(exc)
        streaming.cancel()
        writer.close()

    fleet = await RawFleet(tls_files.fleet_server_context(), streaming_fleet).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        host, port = ingress.wss_address

        def carrier() -> None:
            raw = socket.create_connection((host, port), timeout=15)
            ctx = tls_files.client_context()
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(UPGRADE.format(path="/ws/bot-1").encode())
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += tls.recv(1)  # the head only: the fleet's stream stays unread
                assert head.startswith(b"HTTP/1.1 101 ")
                tls.sendall(sent)
                # close_notify once (asyncio's and CPython's unwrap() would read
                # on, and fail on the fleet's stream as the ingress did), then
                # the socket read and dropped until the ingress closes it.
                LIBSSL.SSL_shutdown(ssl_pointer(tls))
                while socket.socket.recv(tls, 1 << 16):  # below TLS
                    pass

        async with asyncio.timeout(20):
            await asyncio.to_thread(carrier)
            await eventually(lambda: bool(got), timeout=15)
        assert not isinstance(got[0], BaseException), got[0]
        assert (len(got[0]), hashlib.sha256(got[0]).digest()) == (
            len(sent),
            hashlib.sha256(sent).digest(),
        )
    finally:
        await fleet.stop()


# -- TLS 1.3 key updates during a call, both sides -----------------------------------------


class _Collect:
    """A carrier on the socket-BIO layer itself (a TLSHandler)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False

    def data_received(self, data: memoryview) -> None:
        self.data += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


async def test_key_updates_from_the_carrier_and_the_fleet_during_a_call(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A KeyUpdate asking for one back, from each end in turn: the ingress's
    side must read it, answer it (OpenSSL 3.0: with its next write) and carry on."""
    fleet_versions: list[str | None] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        tls = writer.get_extra_info("ssl_object")
        fleet_versions.append(tls.version())
        writer.write(SWITCHING)
        while data := await reader.read(65536):
            if data == b"fleet: update your keys":
                request_key_update(tls)  # sent with the echo below
            writer.write(data)
            await writer.drain()

    fleet = await RawFleet(tls_files.fleet_server_context(), echo).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        host, port = ingress.wss_address
        conn = await tls_connect(
            host, port, tls_files.client_context(), server_hostname="localhost", timeout=5
        )
        carrier = _Collect()
        conn.start(carrier)
        conn.write(UPGRADE.format(path="/ws/bot-1").encode())
        await eventually(lambda: b"\r\n\r\n" in carrier.data)
        assert carrier.data.startswith(b"HTTP/1.1 101 ")
        assert conn.ssl_object.version() == "TLSv1.3" and fleet_versions == ["TLSv1.3"]

        async def echoed(message: bytes) -> None:
            carrier.data.clear()
            conn.write(message)
            await eventually(lambda: bytes(carrier.data) == message)

        await echoed(b"before")
        request_key_update(conn.ssl_object)  # sent with the next write
        await echoed(b"carrier: keys updated")
        await echoed(b"fleet: update your keys")
        await echoed(b"after both" * 2000)  # a few records under the new keys
        assert not carrier.lost
        conn.close()
        await eventually(lambda: carrier.lost and not ingress.registry.calls)
    finally:
        await fleet.stop()


async def _carrier_voice(writer: asyncio.StreamWriter) -> None:
    """The carrier's audio: a masked (all-zero mask) 5-byte frame every 10 ms."""
    while True:
        writer.write(b"\x82\x85" + bytes(4) + b"voice")
        await asyncio.sleep(0.01)


def _answer_the_upgrade_and_hear_three_frames(tls: ssl.SSLSocket) -> bytearray:
    """A fleet's side of a call: the carrier's upgrade read and answered 101,
    then three of the carrier's frames (11 bytes each) heard: what was heard."""
    from fleet_ingress.core.fleet_exchange import websocket_accept

    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(4096)
    key = re.search(rb"(?i)\r\nsec-websocket-key: *([^\r]+)", head)
    assert key is not None
    tls.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + websocket_accept(key[1]) + b"\r\n\r\n"
    )
    heard = bytearray()
    while len(heard) < 3 * 11:
        heard += tls.recv(65536)
    return heard


def _renegotiating_fleet(
    tls_files: TLSFiles, listener: socket.socket, outcome: dict[str, object]
) -> None:
    """A TLS 1.2 fleet (blocking, in a thread) whose bot streams its audio (a
    frame every 10 ms) and, once the carrier's is flowing, asks for a
    renegotiation: its ClientHello is read a round trip (60 ms) later, the audio
    going on meanwhile. Then "after", and the carrier's close frame is answered."""
    ctx = tls12_server_context(tls_files)
    conn, _ = listener.accept()
    conn.settimeout(5)
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            heard = _answer_the_upgrade_and_hear_three_frames(tls)
            pointer = ssl_pointer(tls)
            LIBSSL.SSL_renegotiate(pointer)
            tls.do_handshake()  # the HelloRequest
            for _ in range(6):
                tls.sendall(b"\x82\x05audio")
                time.sleep(0.01)
            deadline = time.monotonic() + 5
            while LIBSSL.SSL_renegotiate_pending(pointer) and time.monotonic() < deadline:
                heard += tls.recv(65536)  # the renegotiation runs in these reads
            outcome["renegotiated"] = not LIBSSL.SSL_renegotiate_pending(pointer)
            tls.sendall(b"\x82\x05after")
            while b"\x88" not in heard and (data := tls.recv(65536)):
                heard += data
            tls.sendall(b"\x88\x02\x03\xe8")
    except (OSError, ssl.SSLError, AssertionError) as exc:
        outcome["fleet_error"] = repr(exc)


async def test_a_tls12_fleet_that_renegotiates_mid_call_keeps_the_call(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingress lets a TLS 1.2 fleet renegotiate (9e97047), but a call whose
    audio flowed both ways meanwhile lost its fleet, and the carrier was told
    1011 "call error": a write ran the handshake and met the fleet's audio sent
    before its ServerHello (the hostile-TLS audit of session 31). The layer's
    side is in tests/e2e/test_tls_socket.py; here the call goes on, nothing of
    either side's audio lost."""
    import threading

    caplog.set_level("INFO", logger="fleet_ingress.access")
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: dict[str, object] = {}
    fleet = threading.Thread(target=_renegotiating_fleet, args=(tls_files, listener, outcome))
    fleet.start()
    try:
        ingress = await start_ingress([f"https://127.0.0.1:{listener.getsockname()[1]} name=a"])
        reader, writer = await raw_carrier(ingress, tls_files, "/ws/bot-1")
        assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")

        speaking = asyncio.create_task(_carrier_voice(writer))
        heard: list[bytes] = []
        try:
            async with asyncio.timeout(10):
                while not heard or heard[-1] != b"after":
                    opcode, payload = await read_frame(reader)
                    assert opcode == 2, (opcode, payload, heard)
                    heard.append(payload)
        finally:
            speaking.cancel()
        assert heard == [b"audio"] * 6 + [b"after"]
        writer.write(masked_close())
        await asyncio.to_thread(fleet.join, 5)
        assert outcome == {"renegotiated": True}
        await eventually(lambda: not ingress.registry.calls)
        writer.close()
        (entry,) = access_entries(caplog)
        assert entry["end_reason"] == "carrier closed", entry
    finally:
        listener.close()
        fleet.join(5)


def _fleet_that_never_finishes_a_renegotiation(
    tls_files: TLSFiles, listener: socket.socket, stop: threading.Event
) -> None:
    """A TLS 1.2 fleet that answers the upgrade, hears the carrier's audio, asks
    for a renegotiation and never reads again (our ClientHello unanswered), its
    bot's audio going on (allowed before its ServerHello) for 10 s at most."""
    ctx = tls12_server_context(tls_files)
    conn, _ = listener.accept()
    conn.settimeout(5)
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            _answer_the_upgrade_and_hear_three_frames(tls)
            LIBSSL.SSL_renegotiate(ssl_pointer(tls))
            tls.do_handshake()  # the HelloRequest
            deadline = time.monotonic() + 10
            while not stop.is_set() and time.monotonic() < deadline:
                tls.sendall(b"\x82\x05audio")
                time.sleep(0.02)
    except (OSError, ssl.SSLError):
        pass  # the ingress gave up on it


async def test_a_fleet_that_never_finishes_its_renegotiation_ends_the_call_saying_so(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """While a fleet's renegotiation runs, the ingress's writes to it wait (its
    ServerHello has not come); a fleet that never finishes it held the carrier's
    audio for good, the bot's still flowing and the call up, until timeouts.tunnel
    or the carrier gave up. Now the wait ends at timeouts.connect: the carrier is
    told 1011 and the access line says why."""
    caplog.set_level("INFO", logger="fleet_ingress.access")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    fleet = threading.Thread(
        target=_fleet_that_never_finishes_a_renegotiation, args=(tls_files, listener, stop)
    )
    fleet.start()
    try:
        ingress = await start_ingress(
            [f"https://127.0.0.1:{listener.getsockname()[1]} name=a"], timeouts={"connect": 1}
        )
        reader, writer = await raw_carrier(ingress, tls_files, "/ws/bot-1")
        assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")

        speaking = asyncio.create_task(_carrier_voice(writer))
        frames: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(10):
                while not frames or frames[-1][0] != 8:
                    frames.append(await read_frame(reader))
        finally:
            speaking.cancel()
        payload = frames[-1][1]
        assert int.from_bytes(payload[:2], "big") == 1011, payload
        assert len(frames) > 10  # the bot's audio came meanwhile
        await eventually(lambda: not ingress.registry.calls)
        writer.close()
        (entry,) = access_entries(caplog)
        assert entry["end_reason"] == "error", entry
        assert entry["detail"] == "fleet: TLS renegotiation not done within 1s", entry
    finally:
        stop.set()
        listener.close()
        fleet.join(5)


# -- who hung up, through TLS on both sides -----------------------------------------------


@pytest.mark.parametrize("closer", ["fleet", "carrier"])
async def test_a_close_frame_through_tls_says_who_hung_up_and_a_payload_like_one_does_not(
    start_ingress: StartIngress, tls_files: TLSFiles, closer: str
) -> None:
    """A read that is one whole close frame says who hung up, whichever side's
    TCP close comes first (tests/socketpair has it without TLS, where a read is
    not a record). A binary message's payload read on its own that starts with
    0x88 is relayed and is not one. The side that did not send the close frame
    closes TCP first here, so the TCP order alone would name the wrong side."""
    payload_seen = asyncio.Event()
    carrier_close = b"\x88\x82" + bytes(4) + b"\x03\xe8"  # close 1000, masked (zero mask)
    fleet_close = b"\x88\x02\x0f\xa1"  # close 4001, unmasked: the fleet is the server

    async def fleet_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCHING)
        assert await reader.readexactly(2 + 4 + 100) == b"\x82\xe4" + bytes(4) + b"\x88" + bytes(99)
        payload_seen.set()
        if closer == "fleet":
            writer.write(fleet_close)
            await writer.drain()
            await reader.read()  # until the carrier's side is closed
        else:
            assert await reader.readexactly(len(carrier_close)) == carrier_close
            writer.write(fleet_close)  # the answering close frame, then TCP: the fleet first
            await writer.drain()
        writer.close()

    fleet = await RawFleet(tls_files.fleet_server_context(), fleet_side).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        host, port = ingress.wss_address
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls_files.client_context(), server_hostname="localhost"
            )
            writer.write(UPGRADE.format(path="/ws/bot-1").encode())
            assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
            writer.write(b"\x82\xe4" + bytes(4))  # binary, masked, 100 bytes: a record
            await writer.drain()
            await asyncio.sleep(0.05)  # read by the ingress apart from its payload
            writer.write(b"\x88" + bytes(99))  # the payload, starting as a close frame would
            await payload_seen.wait()
            if closer == "carrier":
                writer.write(carrier_close)
            assert await reader.readexactly(len(fleet_close)) == fleet_close
            if closer == "fleet":
                writer.close()  # the carrier answers by closing: its TCP goes first
            await eventually(lambda: not ingress.registry.calls)
            writer.close()
        assert dict(ingress.registry.ended) == {("a", f"{closer} closed"): 1}
    finally:
        await fleet.stop()


# -- a side that half-closes after its close frame: the other's reply reaches it ----------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
CLOSE_1000 = b"\x88\x06\x03\xe8done"  # a fleet's close frame (unmasked): 1000 "done"


def _masked(frame: bytes, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """The same frame as a client sends it (RFC 6455 5.3)."""
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(frame[2:]))
    return bytes([frame[0], 0x80 | frame[1]]) + mask + payload


def _read_to_end(tls: ssl.SSLSocket) -> bytes:
    got = bytearray()
    with contextlib.suppress(OSError):  # ssl.SSLError included: a close without close_notify
        while chunk := tls.recv(65536):
            got += chunk
    return bytes(got)


def _read_exactly(tls: ssl.SSLSocket, size: int) -> bytes:
    got = b""
    while len(got) < size and (chunk := tls.recv(size - len(got))):
        got += chunk
    return got


def _read_head(tls: ssl.SSLSocket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += _read_exactly(tls, 1) or b"\r\n\r\n"
    return head


def _one_fleet(tls_files: TLSFiles, act: Callable[[ssl.SSLSocket], bytes], *, tls: bool):  # type: ignore[no-untyped-def]
    """A fleet for one call on a blocking socket, TLS or plain TCP: its 101
    (the accept value worked out), then `act`, whose result is what the fleet read."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> bytes:
        conn, _ = listener.accept()
        conn.settimeout(10)
        context = tls_files.fleet_server_context() if tls else None
        with context.wrap_socket(conn, server_side=True) if context else conn as sock:  # type: ignore[union-attr]
            head = _read_head(sock)
            key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head)
            assert key is not None
            accept = base64.b64encode(hashlib.sha1(key[1] + WS_GUID).digest())
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            return act(sock)

    return listener, serve


def _one_carrier(ingress: Ingress, tls_files: TLSFiles, act: Callable[[ssl.SSLSocket], bytes]):  # type: ignore[no-untyped-def]
    host, port = ingress.wss_address
    raw = socket.create_connection((host, port), timeout=10)
    with tls_files.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(UPGRADE.format(path="/ws/half-close").encode())
        assert _read_head(tls).startswith(b"HTTP/1.1 101 ")
        return act(tls)


async def _one_call(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    fleet_act: Callable[[ssl.SSLSocket], bytes],
    carrier_act: Callable[[ssl.SSLSocket], bytes],
    *,
    fleet_tls: bool = True,
) -> tuple[bytes, bytes]:
    """One call through an ingress, each side a blocking socket after the 101
    (the carrier's TLS, the fleet's TLS or plain TCP): what the carrier read,
    and what the fleet read."""
    listener, fleet = _one_fleet(tls_files, fleet_act, tls=fleet_tls)
    port = listener.getsockname()[1]
    line = f"https://localhost:{port} name=a" if fleet_tls else f"http://127.0.0.1:{port} name=a"
    try:
        ingress = await start_ingress([line])
        async with asyncio.timeout(15):
            fleet_read = asyncio.ensure_future(asyncio.to_thread(fleet))
            got = await asyncio.to_thread(_one_carrier, ingress, tls_files, carrier_act)
            return got, await fleet_read
    finally:
        listener.close()


class _Started:
    """`start_ingress`, keeping the ingress it started."""

    def __init__(self, start_ingress: StartIngress) -> None:
        self.start_ingress = start_ingress
        self.ingress: Ingress | None = None

    async def __call__(self, *args: Any, **kwargs: Any) -> Ingress:
        self.ingress = await self.start_ingress(*args, **kwargs)
        return self.ingress

    async def relayed(self, *, to_carrier: int | None = None, from_carrier: int | None = None):
        """Once the call's sides are gone: its bytes in the totals, each way."""
        registry = self.ingress.registry
        await eventually(lambda: not registry.calls and not registry.closing)
        from_total, to_total = registry.relayed_bytes()
        if to_carrier is not None:
            assert to_total == to_carrier
        if from_carrier is not None:
            assert from_total == from_carrier


REPLY_AFTER = 0.3  # the close reply comes late enough that a close_notify is read first


async def test_a_carrier_that_half_closes_after_its_close_frame_gets_the_fleets_reply(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A carrier sends its close frame, then its TLS 1.3 close_notify, and reads
    on (RFC 8446 6.1 lets it): the fleet's close reply must reach it. It was
    lost (the carrier saw 1006), the call ending as the close_notify came
    (the carriers audit of session 17)."""
    caplog.set_level("INFO", logger="fleet_ingress.access")

    def fleet_act(tls: ssl.SSLSocket) -> bytes:
        got = _read_exactly(tls, len(CLOSE_1000) + 4)  # the carrier's close, masked
        time.sleep(REPLY_AFTER)
        tls.sendall(CLOSE_1000)
        return got + _read_to_end(tls)

    def carrier_act(tls: ssl.SSLSocket) -> bytes:
        tls.sendall(_masked(CLOSE_1000))
        LIBSSL.SSL_shutdown(ssl_pointer(tls))  # close_notify once; reading goes on
        return _read_to_end(tls)

    started = _Started(start_ingress)
    got, fleet_read = await _one_call(started, tls_files, fleet_act, carrier_act)
    assert (got, fleet_read) == (CLOSE_1000, _masked(CLOSE_1000))
    await eventually(lambda: bool(access_entries(caplog)))
    (entry,) = access_entries(caplog)
    assert entry["end_reason"] == "carrier closed"
    # Logged as it was settled, at the carrier's close_notify: the reply,
    # relayed after, is not in its line but in the ingress's totals.
    assert entry["bytes_to_carrier"] == 0
    await started.relayed(to_carrier=len(CLOSE_1000))


async def test_a_fleet_that_half_closes_after_its_close_frame_gets_the_carriers_reply(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror: the fleet sends its close frame, then close_notify, and reads
    on for the carrier's reply."""
    caplog.set_level("INFO", logger="fleet_ingress.access")

    def fleet_act(tls: ssl.SSLSocket) -> bytes:
        time.sleep(0.2)  # the close frame a read of its own, as a fleet sends it
        tls.sendall(CLOSE_1000)
        LIBSSL.SSL_shutdown(ssl_pointer(tls))
        return _read_to_end(tls)

    def carrier_act(tls: ssl.SSLSocket) -> bytes:
        got = _read_exactly(tls, len(CLOSE_1000))
        time.sleep(REPLY_AFTER)
        tls.sendall(_masked(CLOSE_1000))
        return got + _read_to_end(tls)

    started = _Started(start_ingress)
    got, fleet_read = await _one_call(started, tls_files, fleet_act, carrier_act)
    assert (got, fleet_read) == (CLOSE_1000, _masked(CLOSE_1000))
    await eventually(lambda: bool(access_entries(caplog)))
    (entry,) = access_entries(caplog)
    assert entry["end_reason"] == "fleet closed"
    assert entry["bytes_from_carrier"] == 0  # the reply came after the line
    await started.relayed(from_carrier=len(CLOSE_1000) + 4)


async def test_a_plain_fleet_that_sends_its_fin_after_its_close_frame_gets_the_carriers_reply(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """The same over an http:// fleet: its TCP FIN (shutdown of its writes)
    after its close frame is a half-close too."""
    caplog.set_level("INFO", logger="fleet_ingress.access")

    def fleet_act(conn: ssl.SSLSocket) -> bytes:
        time.sleep(0.2)  # the close frame a read of its own
        conn.sendall(CLOSE_1000)
        conn.shutdown(socket.SHUT_WR)
        return _read_to_end(conn)

    def carrier_act(tls: ssl.SSLSocket) -> bytes:
        got = _read_exactly(tls, len(CLOSE_1000))
        time.sleep(REPLY_AFTER)
        tls.sendall(_masked(CLOSE_1000))
        return got + _read_to_end(tls)

    got, fleet_read = await _one_call(
        start_ingress, tls_files, fleet_act, carrier_act, fleet_tls=False
    )
    assert (got, fleet_read) == (CLOSE_1000, _masked(CLOSE_1000))
    await eventually(lambda: bool(access_entries(caplog)))
    (entry,) = access_entries(caplog)
    assert entry["end_reason"] == "fleet closed"
