"""What crosses between carrier and fleet beyond the call itself, on real TLS
sockets: a carrier's claims about itself, a WebSocket handshake the fleet does
not answer, and fleet answers a proxy may not pass on as they came (the
carrier-and-fleet headers audit of session 15)."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect

from tests.support import (
    SWITCHING,
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    answer,
    echo,
    raw_exchange,
    read_head,
    wss_url,
)

CALL = UPGRADE.format(path="/ws/bot").encode()


# What a carrier gets after the fleet's last whole frame when the fleet closes
# without a close frame (a FIN): a 1011 'fleet closed' (core/call_machine.py).
FLEET_CLOSED = b"\x88\x0e\x03\xf3fleet closed"


async def _through(
    start_ingress: StartIngress, tls_files: TLSFiles, fleet_says: bytes, request: bytes = CALL
) -> tuple[bytes, RawFleet]:
    """What the carrier gets for `request` from a fleet answering `fleet_says` at once."""
    fleet = await RawFleet(tls_files.fleet_server_context(), answer(fleet_says)).start()
    try:
        ingress = await start_ingress([fleet.line("raw")])
        return await raw_exchange(ingress, tls_files, request), fleet
    finally:
        await fleet.stop()


async def test_a_carriers_address_and_scheme_claims_do_not_reach_the_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        writer.write(SWITCHING)
        await writer.drain()

    fleet = await RawFleet(tls_files.fleet_server_context(), record).start()
    try:
        ingress = await start_ingress([fleet.line("raw")])
        claims = (
            b"X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=http;host=evil\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
            # The rest of the X-Forwarded-* family: what a fleet's framework reads as the
            # ingress's word beside our X-Forwarded-Proto and -Host (Werkzeug's ProxyFix,
            # Rack, Spring: "https://calls.test:80/attach/..."). 6.6.6.6 in the chain is the
            # carrier's to claim (SPEC 3.2: ours is appended).
            b"X-Forwarded-Port: 6666\r\nX-Forwarded-Prefix: /attach\r\nX-Forwarded-Ssl: off\r\n"
            b"X-Forwarded-Scheme: http\r\nx-forwarded-server: evil\r\nX_Forwarded_Port: 6666\r\n"
            b"X-Forwarded-For: 6.6.6.7\r\n"
        )
        request = CALL.replace(b"Upgrade: websocket\r\n", b"Upgrade: websocket, h2c\r\n" + claims)
        got = await raw_exchange(ingress, tls_files, request)
    finally:
        await fleet.stop()
    assert got.startswith(b"HTTP/1.1 101 "), got
    (head,) = heads
    lines = head.lower().split(b"\r\n")
    assert b"x-real-ip: 127.0.0.1" in lines
    assert b"upgrade: websocket" in lines
    assert b"6.6.6.6" not in head and b"h2c" not in head, head
    assert not any(line.startswith((b"forwarded:", b"http2-settings:")) for line in lines)
    assert b"6666" not in head and b"/attach" not in head and b"evil" not in head, head
    forwarded = [line for line in lines if line.replace(b"_", b"-").startswith(b"x-forwarded-")]
    assert forwarded == [
        b"x-forwarded-for: 6.6.6.7, 127.0.0.1",
        b"x-forwarded-proto: https",
        b"x-forwarded-host: calls.test",
    ], forwarded


# A carrier's other claims of its address, scheme, host or original URL: each is read
# as the one proxy's word by some framework or module told to trust it (nginx realip,
# Tornado's xheaders, IIS URL Rewrite, Symfony before 5, request-ip-style lookups).
CLAIMS = [
    ("X-Client-IP", "6.6.6.1"),
    ("True-Client-IP", "6.6.6.2"),
    ("CF-Connecting-IP", "6.6.6.3"),
    ("X-Original-URL", "/attach"),
    ("X-Rewrite-URL", "/livekit/dispatch"),
    ("X-Original-Forwarded-For", "6.6.6.4"),
    ("X-ProxyUser-Ip", "6.6.6.5"),
    ("Client-IP", "6.6.6.6"),
    ("X-Cluster-Client-IP", "6.6.6.7"),
    ("Fastly-Client-IP", "6.6.6.8"),
    ("X-Scheme", "http"),
    ("Front-End-Https", "off"),
    ("X-Original-Host", "evil.test"),
    ("X_Client_IP", "6.6.6.9"),  # HTTP_X_CLIENT_IP to a WSGI fleet, as the dashed name
]
# What a carrier legitimately sends, passed on as it came, in its order and case.
KEPT = [
    ("X-Twilio-Signature", "c2lnbmF0dXJl"),
    ("X-Exotel-CallSid", "a1b2c3"),
    ("Cookie", "session=abc; lang=en"),
    ("Authorization", "Bearer t0ken"),
    ("Via", "1.1 carrier-edge"),
    ("X-Forwarded-For", "198.51.100.7"),  # the carrier's chain; ours is appended
]


async def test_the_fleet_gets_the_carriers_head_less_its_claims_and_plus_the_ingresss_own(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A websockets carrier through the ingress to a websockets fleet: the fleet's
    head is exactly the carrier's, its claims dropped, the handshake end to end (the
    subprotocol and permessage-deflate chosen by the fleet), ours set."""
    fleet = await WsFleet(tls_files.fleet_server_context(), subprotocols=["audio.v2"]).start()
    fleet_port = fleet.port
    try:
        ingress = await start_ingress([fleet.line("ws")])
        async with connect(
            wss_url(ingress, "/ws/bot?sid=1&x=%2F%20"),
            ssl=tls_files.client_context(),
            additional_headers=CLAIMS + KEPT,
            subprotocols=["audio.v1", "audio.v2"],  # type: ignore[list-item]
        ) as ws:
            await echo(ws)
            assert ws.subprotocol == "audio.v2"
            assert ws.response is not None and "permessage-deflate" in (
                ws.response.headers.get("Sec-WebSocket-Extensions") or ""
            )
            sent = list(ws.request.headers.raw_items()) if ws.request else []
    finally:
        await fleet.stop()
    (request,) = fleet.requests
    assert request.path == "/ws/bot?sid=1&x=%2F%20"
    got = list(request.headers.raw_items())
    claimed = {name.lower() for name, _ in CLAIMS}
    carriers = [
        (k, v)
        for k, v in sent
        if k.lower() not in claimed | {"host", "upgrade", "connection", "x-forwarded-for"}
    ]
    host, port = ingress.wss_address
    assert got == [
        ("Host", f"127.0.0.1:{fleet_port}"),
        *carriers,
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("X-Forwarded-For", "198.51.100.7, 127.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", f"{host}:{port}"),
        ("X-Real-IP", "127.0.0.1"),
    ], got
    assert [k for k, _ in carriers if k.startswith(("Sec-WebSocket-", "X-Tw", "Via"))] == [
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
        "X-Twilio-Signature",
        "Via",
    ], carriers


async def test_an_upgrade_without_a_websocket_key_is_refused_before_any_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    request = CALL.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"k==")
    got, fleet = await _through(start_ingress, tls_files, SWITCHING, request)
    assert got.startswith(b"HTTP/1.1 400 "), got
    assert got.endswith(b"a WebSocket upgrade needs one Sec-WebSocket-Key of 16 bytes in base64")
    assert fleet.connections == 0


@pytest.mark.parametrize(
    ("named", "extra"),
    [
        ("Sec-WebSocket-Key", b""),
        ("Sec-WebSocket-Version", b""),
        ("Sec-WebSocket-Protocol", b"Sec-WebSocket-Protocol: audio.v1\r\n"),
    ],
)
async def test_an_upgrade_whose_connection_header_names_a_handshake_field_is_refused_at_the_edge(
    start_ingress: StartIngress, tls_files: TLSFiles, named: str, extra: bytes
) -> None:
    # Dropped as hop-by-hop, the key or version would cost a fleet slot for the fleet's
    # own 400 ("Handshake error"), the subprotocol a call the fleet chose without it
    # (the carrier-edge audit of session 30).
    request = CALL.replace(
        b"Connection: Upgrade\r\n", b"Connection: Upgrade, %s\r\n%s" % (named.encode(), extra)
    )
    got, fleet = await _through(start_ingress, tls_files, SWITCHING, request)
    assert got.startswith(b"HTTP/1.1 400 "), got
    said = f"the Connection header names {named}, which a WebSocket upgrade must carry to the fleet"
    assert got.endswith(said.encode())
    assert fleet.connections == 0


async def test_a_101_that_does_not_answer_the_key_is_a_502_not_a_call(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    wrong = SWITCHING.replace(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    got, fleet = await _through(start_ingress, tls_files, wrong + b"\x81\x02hi")
    assert got.startswith(b"HTTP/1.1 502 "), got
    assert b"\x81\x02hi" not in got and fleet.connections == 1


async def test_a_fleets_101_reaches_the_carrier_byte_for_byte(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """Its names' case and order, repeated fields, spacing inside values and
    obs-text, the subprotocol and extensions the fleet chose: as sent."""
    given = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nConnection: upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: audio.v2\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
        b"Set-Cookie: a=b; Path=/\r\nSet-Cookie: c=d\r\nX-Spaced: a   b\r\nX-Obs: caf\xe9\r\n\r\n"
    )
    got, _ = await _through(start_ingress, tls_files, given + b"\x81\x02hi")
    assert got == given + b"\x81\x02hi" + FLEET_CLOSED, got


@pytest.mark.parametrize("mangle", ["bare-lf", "http/1.0"])
async def test_a_fleets_101_reaches_the_carrier_as_http_1_1_with_crlf_line_ends(
    start_ingress: StartIngress, tls_files: TLSFiles, mangle: str
) -> None:
    """Bare LF line ends, or HTTP/1.0 (RFC 6455 4.1 rules it out): the
    websockets client refused the call while the access log said 101 (the
    carrier-edge audit of session 30). It gets the 101 as it should have been
    written, and the frame after it as it came."""
    given = SWITCHING.replace(b"\r\n", b"\n") if mangle == "bare-lf" else SWITCHING
    if mangle == "http/1.0":
        given = given.replace(b"HTTP/1.1 101", b"HTTP/1.0 101")
    got, _ = await _through(start_ingress, tls_files, given + b"\x81\x02\n\n")
    assert got == SWITCHING + b"\x81\x02\n\n" + FLEET_CLOSED, got


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
    ids=["100", "103", "100-102"],
)
async def test_a_fleets_interim_answers_before_its_101_do_not_reach_the_carrier(
    start_ingress: StartIngress, tls_files: TLSFiles, interim: bytes
) -> None:
    """A fleet's unasked-for 1xx before its 101 (a 100 Continue, a 103 Early
    Hints from a framework or a proxy in front of the bot) was relayed: the
    carrier's WebSocket client read it as the answer and refused the call
    ("HTTP 100"), while the access log said 101 (the odd-fleet audit of
    session 35). The carrier gets the 101, and the call works."""
    from websockets.asyncio.client import connect

    from tests.support import read_frame, switching_then, wss_url

    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, said = await read_frame(reader)
        writer.write(b"\x81" + bytes([len(said)]) + said)
        await writer.drain()
        await read_frame(reader)  # the carrier's close
        writer.write(b"\x88\x02\x03\xe8")
        await writer.drain()

    async def interim_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(interim)
        await switching_then(echo_once)(reader, writer)

    fleet = await RawFleet(tls_files.fleet_server_context(), interim_first).start()
    try:
        ingress = await start_ingress([fleet.line("raw")])
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 5) == "hello"
        got = await raw_exchange_first_bytes(ingress, tls_files)
        assert got.startswith(SWITCHING), got
    finally:
        await fleet.stop()


async def raw_exchange_first_bytes(ingress: object, tls_files: TLSFiles) -> bytes:
    """What a raw carrier reads first for its upgrade: the head it is answered."""
    host, port = ingress.wss_address  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    try:
        writer.write(CALL)
        async with asyncio.timeout(5):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_a_carriers_expectation_of_a_body_does_not_reach_the_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A call has no body: a carrier's `Expect: 100-continue` is not forwarded,
    so a fleet that honours it (aiohttp's does) sends no `100 Continue` before
    its 101, which the ingress would relay and strict clients refuse (the
    websockets client failed the call: the carrier-edge audit of session 30)."""
    from websockets.asyncio.client import connect

    from tests.support import read_frame, switching_then, wss_url

    async def honours_expect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, said = await read_frame(reader)  # the carrier's close: replied
        writer.write(b"\x88\x02" + said[:2])
        await writer.drain()

    seen: list[bytes] = []

    def recording(react):  # the 101 after a 100 Continue, when the head asks for one
        async def first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peeked = await reader.readuntil(b"\r\n\r\n")
            seen.append(peeked)
            if b"expect: 100-continue" in peeked.lower():
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            replay = asyncio.StreamReader()
            replay.feed_data(peeked)

            async def then(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await react(reader, writer)  # the frames come on the connection

            await switching_then(then)(replay, writer)

        return first

    fleet = await RawFleet(None, recording(honours_expect)).start()
    try:
        ingress = await start_ingress([fleet.line("raw")])
        async with connect(
            wss_url(ingress),
            ssl=tls_files.client_context(),
            additional_headers={"Expect": "100-continue"},
        ) as ws:
            assert ws.response is not None and ws.response.status_code == 101
        assert seen and b"expect" not in seen[0].lower()
    finally:
        await fleet.stop()


async def test_a_fleet_head_over_the_limit_is_a_502_however_its_records_fall(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    # 20,000 bytes in one write: two TLS records, the second completing the head.
    big = b"HTTP/1.1 429 Too Many Requests\r\nX-Big: " + b"a" * 19_950 + b"\r\n\r\n"
    got, _ = await _through(start_ingress, tls_files, big)
    assert got.startswith(b"HTTP/1.1 502 "), got[:100]


async def test_a_folded_header_line_reaches_the_carrier_unfolded(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    body = b"busy\r\n wait"  # a body's own line breaks are left alone
    folded = (
        b"HTTP/1.1 429 Too Many Requests\r\nX-Reason: all bots\r\n are busy\r\n"
        b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    got, _ = await _through(start_ingress, tls_files, folded)
    assert got == folded.replace(b"bots\r\n are", b"bots   are")


async def test_what_a_fleet_sends_after_its_answer_ends_is_not_relayed(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    first = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"
    got, _ = await _through(start_ingress, tls_files, first + b"HTTP/1.1 200 OK\r\n\r\nevil")
    assert got == first
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    got, _ = await _through(start_ingress, tls_files, no_content + b"extra")
    assert got == no_content


def _in_writes(*parts: bytes):
    """A fleet answering in separate writes (so in separate reads), then idle."""

    async def react(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)

    return react


@pytest.mark.parametrize(
    ("parts", "relayed"),
    [
        (
            [b"HTTP/1.1 404 NF\r\nContent-Length: 6\r\n\r\nab", b"cd", b"efEXTRA"],
            b"HTTP/1.1 404 NF\r\nContent-Length: 6\r\n\r\nabcdef",
        ),
        (
            [
                b"HTTP/1.1 503 S\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                b"0\r\nX-T",
                b": 1\r\n\r\nHTTP/1.1 200 OK\r\n\r\nevil",
            ],
            b"HTTP/1.1 503 S\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        ),
        (
            # The 100 is not relayed (a WebSocket client reads it as the answer).
            [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 404 NF\r\nContent-Length: 2\r\n\r\nokZZ"],
            b"HTTP/1.1 404 NF\r\nContent-Length: 2\r\n\r\nok",
        ),
    ],
    ids=["length", "chunked-trailer", "after-100"],
)
async def test_an_answer_ending_in_a_later_read_is_relayed_to_its_end_only(
    start_ingress: StartIngress, tls_files: TLSFiles, parts: list[bytes], relayed: bytes
) -> None:
    """The review of session 15: the end of an answer, and bytes after it,
    arriving in a read after the head's (the tests above have both in one)."""
    fleet = await RawFleet(tls_files.fleet_server_context(), _in_writes(*parts)).start()
    try:
        ingress = await start_ingress([fleet.line("raw")])
        assert await raw_exchange(ingress, tls_files, CALL) == relayed
    finally:
        await fleet.stop()


async def test_a_fleet_answer_that_stalls_before_its_end_is_cut_and_logged_so(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked 429 whose last chunk never comes, on a kept-alive connection:
    the carrier gets what came, cut at timeouts.response, and the access line
    says the answer was cut, not only "refused" (the odd-fleet audit of
    session 35)."""
    import logging

    from tests.support import access_entries

    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    started = b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbusy\r\n"
    fleet = await RawFleet(tls_files.fleet_server_context(), _in_writes(started)).start()
    try:
        ingress = await start_ingress([fleet.line("raw")], timeouts={"response": 1})
        assert await raw_exchange(ingress, tls_files, CALL) == started
        await asyncio.sleep(0.2)  # the fleet side's close, then the line
        (entry,) = access_entries(caplog)
        assert (entry["status"], entry["end_reason"]) == (429, "refused"), entry
        said = "the fleet's answer stalled before its end: cut, no byte for timeouts.response (1s)"
        assert entry["detail"] == said, entry
    finally:
        await fleet.stop()


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
    ids=["100", "103", "100-102"],
)
async def test_a_fleets_interim_answers_before_its_refusal_do_not_reach_the_carrier(
    start_ingress: StartIngress, tls_files: TLSFiles, interim: bytes, caplog
) -> None:
    """As before a 101: a fleet's unasked-for 1xx before its 429 was relayed, and
    the carrier's WebSocket client read it as the answer ("HTTP 100": not the
    429 its retry and back-off look for) while the access log said 429 (the
    review of session 35). The carrier gets the 429 alone, its body whole."""
    import logging

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from tests.support import access_entries, eventually, wss_url

    refusal = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nbusy"
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    fleet = await RawFleet(tls_files.fleet_server_context(), answer(interim + refusal)).start()
    try:
        ingress = await start_ingress([fleet.line("raw")])
        with pytest.raises(InvalidStatus) as refused:
            async with connect(wss_url(ingress), ssl=tls_files.client_context()):
                pass
        assert refused.value.response.status_code == 429, refused.value
        got = await raw_exchange(ingress, tls_files, CALL)
    finally:
        await fleet.stop()
    assert got == refusal, got
    await eventually(lambda: len(access_entries(caplog)) == 2)
    assert [e["status"] for e in access_entries(caplog)] == [429, 429]
