"""End to end on loopback: real TLS, real WebSocket clients and fleets (issue #2)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleet_ingress.config.fleets_file import parse_fleets_text
from tests.support import (
    SWITCHING,
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    answer,
    close_at_once,
    eventually,
    free_port,
    free_ports,
    need_ipv6_loopback,
    never_answer,
    raw_exchange,
    wss_url,
)


@pytest.fixture
async def ws_fleets(tls_files: TLSFiles):
    fleets = [await WsFleet(tls_files.fleet_server_context()).start() for _ in range(2)]
    yield fleets
    for fleet in fleets:
        await fleet.stop()


# -- 1. messages both ways, close codes ------------------------------------------------


async def test_messages_fragments_ping_and_close_codes_pass_through(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    a, b = ws_fleets
    ingress = await start_ingress([a.line("a"), b.line("b")])
    async with connect(wss_url(ingress), ssl=tls_files.client_context(), max_size=None) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary\xff")
        assert await ws.recv() == b"\x00\x01binary\xff"
        big = bytes(range(256)) * 4096  # 1 MiB
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send(["frag", "mented ", "message"])  # three frames, one message
        assert await ws.recv() == "fragmented message"
        pong = await ws.ping(b"are you there")
        async with asyncio.timeout(2):
            await pong
        await ws.close(4002, "carrier hangs up")
    await eventually(lambda: 4002 in a.peer_close_codes + b.peer_close_codes)

    async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
        await ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4001


# -- 2. what the fleet sees --------------------------------------------------------------


async def test_the_ipv6_wildcard_serves_ipv4_and_ipv6_carriers_on_one_listener(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    need_ipv6_loopback()
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")], listen={"wss": "[::]:0"})
    _, port = ingress.wss_address
    for host in ("127.0.0.1", "[::1]"):
        url = f"wss://{host}:{port}/ws/bot-1"
        async with connect(url, ssl=tls_files.client_context(), server_hostname="localhost") as ws:
            await ws.send(host)
            assert await ws.recv() == host
    # An IPv4 carrier is named as IPv4 to the fleet, not as "::ffff:127.0.0.1".
    assert [r.headers["X-Forwarded-For"] for r in a.requests] == ["127.0.0.1", "::1"]


async def test_a_fleet_named_by_host_name_gets_that_name_as_sni_and_host(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """A fleet URL with a DNS name: TLS sends it as SNI and checks the certificate
    against it, and the fleet's Host is that name (the fleet's cert is for localhost)."""
    server_names: list[str | None] = []
    ctx = tls_files.fleet_server_context()
    ctx.sni_callback = lambda _obj, name, _ctx: server_names.append(name)  # type: ignore[assignment,misc,return-value]
    fleet = await WsFleet(ctx).start()
    try:
        ingress = await start_ingress([f"https://localhost:{fleet.port} name=a"])
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("by name")
            assert await ws.recv() == "by name"
        assert "localhost" in server_names
        assert fleet.requests[0].headers["Host"] == f"localhost:{fleet.port}"
    finally:
        await fleet.stop()


async def test_fleet_sees_its_host_forwarded_headers_query_and_subprotocol(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    a = await WsFleet(tls_files.fleet_server_context(), subprotocols=["audio.v2"]).start()
    ingress = await start_ingress([a.line("a")])
    url = wss_url(ingress, "/exotel/bot-7?CallSid=abc%20d&From=%2B911234")
    async with connect(
        url,
        ssl=tls_files.client_context(),
        subprotocols=["audio.v1", "audio.v2"],  # type: ignore[list-item]
        additional_headers={"X-Carrier-Trace": "t-1"},
    ) as ws:
        assert ws.subprotocol == "audio.v2"
        await ws.send("x")
        await ws.recv()
    request = a.requests[-1]
    assert request.path == "/exotel/bot-7?CallSid=abc%20d&From=%2B911234"
    assert request.headers["Host"] == f"127.0.0.1:{a.port}"
    assert request.headers["X-Forwarded-For"] == "127.0.0.1"
    assert request.headers["X-Forwarded-Proto"] == "https"
    assert request.headers["X-Forwarded-Host"].startswith("127.0.0.1:")
    assert request.headers["X-Carrier-Trace"] == "t-1"
    await a.stop()


# -- 3. a 429 is relayed exactly, and not retried -----------------------------------------

BODY_429 = b"<html><body>429 Too Many Requests</body></html>"
FLEET_429 = (
    b"HTTP/1.1 429 Too Many Requests\r\nServer: nginx\r\nContent-Type: text/html\r\n"
    b"Retry-After: 1\r\nX-Odd-CASE: kept\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY_429), BODY_429)
)


async def test_429_reaches_the_carrier_byte_for_byte_and_no_other_fleet_is_tried(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    busy = await RawFleet(tls_files.fleet_server_context(), answer(FLEET_429)).start()
    _, spare = ws_fleets
    ingress = await start_ingress([busy.line("busy"), spare.line("spare")])
    got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/bot").encode())
    assert got == FLEET_429
    assert busy.connections == 1
    assert spare.requests == []
    # Counted as the fleet's own answer, passed through (stat: whose refusal).
    await eventually(lambda: sum(ingress.registry.refused.values()) == 1)
    assert dict(ingress.registry.refused) == {("fleet", "429"): 1}
    await busy.stop()


async def test_a_removed_fleets_totals_stay_in_the_removed_row_in_one_process(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    """The one-process ingress (`demo`) drops a removed fleet's record as it
    leaves the set: its calls, answers and retries went with it, while the
    (removed) row, which says "its lifetime totals summed", still showed its
    calls ended. Its 429 and its tunneled call were in no row (the workers'
    `SlotClient.forgotten` keeps them; the one process had nothing like it)."""
    busy = await RawFleet(tls_files.fleet_server_context(), answer(FLEET_429)).start()
    a, b = ws_fleets
    ingress = await start_ingress([busy.line("busy")])

    def reload(*lines: str) -> None:
        specs = parse_fleets_text("\n".join(lines), default_maxconn=16)
        ingress.apply_fleets(specs, ingress.config)

    try:
        got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/bot").encode())
        assert got == FLEET_429
        await eventually(lambda: sum(ingress.registry.ended.values()) == 1)
        reload(a.line("a"))
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
        await eventually(lambda: sum(ingress.registry.ended.values()) == 2)
        reload(b.line("b"))
        snap = ingress.snapshot()
        assert [f["name"] for f in snap["fleets"]] == ["b"]
        removed = snap["removed_fleets"]
        assert removed["calls_ended"] == {"carrier closed": 1, "refused": 1}, removed
        assert removed["calls_total"] == 1, removed
        assert removed["responses"] == {"101": 1, "429": 1}, removed
        assert removed["responses_429"] == 1, removed
    finally:
        await busy.stop()


async def test_a_status_listed_in_retry_on_is_retried_elsewhere(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    busy = await RawFleet(tls_files.fleet_server_context(), answer(FLEET_429)).start()
    _, spare = ws_fleets
    ingress = await start_ingress(
        [busy.line("busy"), spare.line("spare")], retry={"retry_on": ["conn-failure", 429]}
    )
    async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
        await ws.send("ok?")
        assert await ws.recv() == "ok?"
    assert busy.connections == 1 and len(spare.requests) == 1
    await busy.stop()


# -- 4. retries and give-up answers -------------------------------------------------------


async def test_conn_failures_go_to_the_other_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    good, _ = ws_fleets
    untrusted = trustme_other_ca_context()
    bad_cert = await WsFleet(untrusted).start()
    dead_port = await free_port()
    ingress = await start_ingress(
        [f"https://127.0.0.1:{dead_port} name=dead", bad_cert.line("badcert"), good.line("good")]
    )
    for _ in range(3):  # round-robin starts each call on a different fleet
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
    assert len(good.requests) == 3
    assert bad_cert.requests == []  # the handshake failed before any request
    await bad_cert.stop()


def trustme_other_ca_context() -> ssl.SSLContext:
    import trustme

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


async def test_every_fleet_unreachable_gives_503(start_ingress: StartIngress, tls_files: TLSFiles):
    ports = await free_ports(2)
    ingress = await start_ingress(
        [f"https://127.0.0.1:{p} name=f{p}" for p in ports], timeouts={"connect": 1}
    )
    got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/bot").encode())
    assert got.startswith(b"HTTP/1.1 503 ")
    assert got.endswith(b"no fleet could be reached")


async def test_fleets_closing_without_answer_are_retried_then_502(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    fleets = [await RawFleet(tls_files.fleet_server_context(), close_at_once).start() for _ in "ab"]
    ingress = await start_ingress([fleets[0].line("a"), fleets[1].line("b")])
    got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/bot").encode())
    assert got.startswith(b"HTTP/1.1 502 ")
    # 1 attempt + 3 retries, redispatched: both fleets tried, 4 connections in all.
    assert [f.connections for f in fleets] == [2, 2]
    # The ingress's own answer, though the call is counted ended on the fleet
    # it tried last: "refused" on that fleet's row is not the fleet's word.
    await eventually(lambda: sum(ingress.registry.refused.values()) == 1)
    assert dict(ingress.registry.refused) == {("ingress", "502"): 1}
    ((fleet, reason),) = ingress.registry.ended
    assert fleet in ("a", "b") and reason == "refused"
    for f in fleets:
        await f.stop()


async def test_a_closing_fleet_is_retried_on_a_good_one(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    closer = await RawFleet(tls_files.fleet_server_context(), close_at_once).start()
    good, _ = ws_fleets
    ingress = await start_ingress([closer.line("closer"), good.line("good")])
    async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
    assert closer.connections == 1
    await closer.stop()


async def test_a_fleet_that_never_answers_gives_504_after_the_response_timeout(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    silent = await RawFleet(tls_files.fleet_server_context(), never_answer).start()
    ingress = await start_ingress(
        [silent.line("silent")], timeouts={"response": 0.3}, retry={"retries": 1}
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/bot").encode())
    elapsed = loop.time() - started
    assert got.startswith(b"HTTP/1.1 504 ")
    assert 0.6 <= elapsed < 2.0  # two attempts of 0.3 s
    assert silent.connections == 2
    await silent.stop()


# -- 5. leastconn, maxconn, queue ---------------------------------------------------------


async def test_twenty_calls_split_ten_ten(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    a, b = ws_fleets
    ingress = await start_ingress([a.line("a"), b.line("b")])
    calls = [await connect(wss_url(ingress), ssl=tls_files.client_context()) for _ in range(20)]
    assert (a.active, b.active) == (10, 10)
    assert [f.active for f in ingress.balancer.fleets] == [10, 10]
    for ws in calls:
        await ws.close()
    await eventually(lambda: sum(f.active for f in ingress.balancer.fleets) == 0)


async def test_a_fifth_call_queues_until_a_slot_frees_or_times_out(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    a, b = ws_fleets
    ingress = await start_ingress(
        [a.line("a"), b.line("b")], fleets={"maxconn": 2}, timeouts={"queue": 1.0}
    )
    ctx = tls_files.client_context()
    calls = [await connect(wss_url(ingress), ssl=ctx) for _ in range(4)]
    fifth = asyncio.ensure_future(connect(wss_url(ingress), ssl=ctx))
    await eventually(lambda: ingress.dispatcher.queue_length == 1)
    assert not fifth.done()
    await calls[0].close()
    async with asyncio.timeout(1):
        ws5 = await fifth
    await ws5.send("queued, then served")
    assert await ws5.recv() == "queued, then served"

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(InvalidStatus) as info:
        await connect(wss_url(ingress), ssl=ctx)
    assert info.value.response.status_code == 503
    assert 0.9 <= loop.time() - started < 2.0
    for ws in [*calls[1:], ws5]:
        await ws.close()


# -- 6. local answers, limits, TLS versions -----------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /haproxy-health HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        # Monitors moved over from HAProxy (monitor-uri): HTTP/1.0, no Host, any method.
        (b"GET /haproxy-health HTTP/1.0\r\n\r\n", 200),
        (b"OPTIONS /haproxy-health HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        # HTTP/1.1 with no Host: HAProxy 2.6's own check (`option httpchk GET
        # /haproxy-health HTTP/1.1`, a balancer in front of two ingress hosts), byte for
        # byte. It got 400 "Missing mandatory Host: header": every host DOWN to it.
        (b"GET /haproxy-health HTTP/1.1\r\nconnection: close\r\n\r\n", 200),
        (b"HEAD /haproxy-health?x HTTP/1.1\r\n\r\n", 200),
        # ...anywhere else still 400 (RFC 9112 3.2).
        (b"GET /nope HTTP/1.1\r\n\r\n", 400),
        (UPGRADE.format(path="/ws/x").replace("Host: calls.test\r\n", "").encode(), 400),
        # A body too (SPEC 2: any method), not read: the answer closes the connection.
        (b"POST /haproxy-health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 200),
        (
            b"POST /haproxy-health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n",
            200,
        ),
        # No route, with a body or not: 404, as HAProxy's `deny_status 404` answered. The
        # short POST routes are POSTs with a body (it was 400 "a request with a body is
        # not served", which sent a misrouted client looking at its JSON).
        (b"POST /unknown HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 404),
        (
            b"POST /livekit/dispatch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            404,
        ),
        (
            b"POST /attach HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n",
            404,
        ),
        (
            b"GET /ws/x HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            400,
        ),
        (b"GET /attach HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /livekit/dialout HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404),
        (b"GET /livekit/widget HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /livekit/dispatch HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (UPGRADE.format(path="/ws/").encode(), 404),
        (b"GET /unknown/path HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (UPGRADE.format(path="/ws/x").replace("GET", "POST").encode(), 400),
        (b"GET /ws/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /ws/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", 400),
        (b"GET /ws/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20480 + b"\r\n\r\n", 431),
        (b"\x00\x01garbage\r\n\r\n", 400),
    ],
)
async def test_local_answers(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets, request_bytes, status
):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")])
    got = await raw_exchange(ingress, tls_files, request_bytes)
    assert got.startswith(f"HTTP/1.1 {status} ".encode()), got[:80]
    assert b"\r\nConnection: close\r\n" in got
    if status == 200 and not request_bytes.startswith(b"HEAD"):
        assert got.endswith(b"\r\n\r\nok")
        assert b"Content-Type: text/plain" in got
    assert a.requests == []


async def test_a_health_probe_posting_a_large_body_gets_its_200_and_the_close(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """The body is not read: the answer and the connection's end reach the monitor
    while it is still sending (the carrier-edge audit of session 30: 400 before)."""
    ingress = await start_ingress(["http://127.0.0.1:9 name=a"])
    host, port = ingress.wss_address
    body = b"x" * (4 << 20)
    head = b"POST /haproxy-health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        writer.write(head + body)  # not drained: the answer is read meanwhile
        try:
            got = await reader.read(-1)
        finally:
            writer.close()
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nok"), got[:80]


def _haproxy() -> str | None:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )
    if found is None and os.environ.get("CI"):
        pytest.fail("CI must have haproxy: the health route is checked against its own probe")
    return found


async def test_haproxys_own_check_of_the_health_route_finds_the_ingress_up(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path
):
    """A balancer in front of ingress hosts, as HAProxy users write it: `option
    httpchk GET /haproxy-health HTTP/1.1`, which sends no Host. It read 400
    "Missing mandatory Host: header" and took every host DOWN ("backend has no
    server available"), where the HAProxy ingress answered it 200."""
    haproxy = _haproxy()
    if haproxy is None:
        pytest.skip("no haproxy (CI unset)")
    ingress = await start_ingress(["http://127.0.0.1:9 name=a"])
    host, port = ingress.wss_address
    stats = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"global\n    stats socket {stats} mode 600\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\n"
        "backend ingresses\n    option httpchk GET /haproxy-health HTTP/1.1\n"
        f"    server ing {host}:{port} check check-ssl verify none inter 100ms fall 2 rise 2\n"
    )
    proc = await asyncio.create_subprocess_exec(
        haproxy,
        "-f",
        str(config),
        "-db",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )

    async def checked() -> list[str]:
        reader, writer = await asyncio.open_unix_connection(str(stats))
        writer.write(b"show stat\n")
        rows = (await reader.read(-1)).decode().splitlines()
        writer.close()
        # pxname, svname, ..., status (18th), ..., check_status (37th, "* " while
        # a check runs)
        row = next(r for r in rows if r.startswith("ingresses,ing,")).split(",")
        return [*row[:36], row[36].removeprefix("* "), *row[37:]]

    try:
        await eventually(lambda: stats.exists())
        for _ in range(50):  # until a check has read an answer (1 s at most)...
            if (await checked())[36].startswith("L7"):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # ...and 5 more have: 2 failing take the host DOWN
        row = await checked()
    finally:
        proc.terminate()
        _, said = await proc.communicate()
    # (main: DOWN, L7STS: "Layer7 wrong status, code: 400")
    assert (row[17], row[36]) == ("UP", "L7OK"), (row, said[-400:])


async def test_a_head_probe_of_the_health_route_gets_200_without_a_body(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")])
    got = await raw_exchange(ingress, tls_files, b"HEAD /haproxy-health HTTP/1.0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        ("HEAD /ws/bot-1 HTTP/1.1", 400),
        ("HEAD /nowhere HTTP/1.1", 404),
        ("HEAD /ws/a/../b HTTP/1.1", 400),  # refused by the head's parse
    ],
)
async def test_a_head_request_refused_gets_no_body(
    start_ingress: StartIngress, tls_files: TLSFiles, request_line: str, status: int
):
    # RFC 9110 9.3.2: no content answers a HEAD (the carrier-edge audit of session 30).
    ingress = await start_ingress(["http://127.0.0.1:9 name=a"])
    answer = await raw_exchange(
        ingress, tls_files, f"{request_line}\r\nHost: calls.test\r\n\r\n".encode()
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert b"\r\nContent-Length: " in head  # of the body a GET would get, as RFC 9110 allows
    assert body == b""


async def test_a_trickled_head_gets_408(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")], timeouts={"request": 0.5})
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    for chunk in (b"GET /ws/x HTTP/1.1\r\n", b"Host: x\r\n", b"Upgrade: websocket\r\n"):
        writer.write(chunk)
        await asyncio.sleep(0.2)
    got = await reader.read(-1)
    writer.close()
    assert got.startswith(b"HTTP/1.1 408 ")
    assert 0.45 <= loop.time() - started < 1.5


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_3, True),
    ],
)
async def test_tls_floor_is_1_2(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets, version, accepted
):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")])
    ctx = tls_files.client_context()
    # Let the client offer old versions at all: OpenSSL's default level forbids them.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.minimum_version = version if version != ssl.TLSVersion.TLSv1_1 else ctx.minimum_version
    ctx.maximum_version = version
    host, port = ingress.wss_address
    if not accepted:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
        await eventually(lambda: ingress.registry.tls_handshake_failures == 1)
        return
    _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    assert ssl_object.selected_alpn_protocol() is None  # we offered none
    writer.close()


async def test_alpn_offers_http_1_1(start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")])
    ctx = tls_files.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    host, port = ingress.wss_address
    _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.close()


async def test_plain_http_on_the_tls_port_is_dropped_and_calls_go_on(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets
):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")])
    async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
        host, port = ingress.wss_address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /ws/x HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(3):
            await reader.read(-1)  # dropped: EOF
        writer.close()
        await ws.send("still here")
        assert await ws.recv() == "still here"
    assert ingress.registry.tls_handshake_failures == 1


# -- 7. flow control ----------------------------------------------------------------------


async def test_flow_control_bounds_what_the_ingress_buffers(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    from fleet_ingress.net.proxy import MAX_BUFFERED_PER_CALL

    total = 50 * 1024 * 1024
    received = 0

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCHING)
        await writer.drain()
        while received < total:
            chunk = await reader.read(64 * 1024)
            if not chunk:
                return
            received += len(chunk)
            await asyncio.sleep(0.001)  # a fleet that reads slower than the carrier sends

    fleet = await RawFleet(tls_files.fleet_server_context(), slow_reader).start()
    ingress = await start_ingress([fleet.line("slow")])
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    writer.write(UPGRADE.format(path="/ws/bulk").encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, ingress.registry.buffered_bytes())
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    chunk = b"\x82" * (256 * 1024)
    async with asyncio.timeout(60):
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        await eventually(lambda: received >= total, timeout=30)
    sampler.cancel()
    writer.close()
    await fleet.stop()
    assert received == total
    assert 0 < peak <= MAX_BUFFERED_PER_CALL, f"peak {peak} over {MAX_BUFFERED_PER_CALL}"


# -- the access log -----------------------------------------------------------------------


async def test_one_access_line_per_call_with_why_it_ended(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets, caplog
):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")])
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    async with connect(wss_url(ingress, "/ws/bot-9"), ssl=tls_files.client_context()) as ws:
        await ws.send(os.urandom(100))  # incompressible: permessage-deflate is on
        await ws.recv()
    await eventually(lambda: any(r.name == "fleet_ingress.access" for r in caplog.records))
    record = next(r for r in caplog.records if r.name == "fleet_ingress.access")
    entry = record.fields  # type: ignore[attr-defined]
    json.dumps(entry)
    assert entry["bot_id"] == "bot-9" and entry["route"] == "/ws/" and entry["fleet"] == "a"
    assert entry["status"] == 101 and entry["attempts"] == 1
    assert entry["end_reason"] == "carrier closed"
    assert entry["bytes_from_carrier"] > 100 and entry["bytes_to_carrier"] > 100
    assert entry["handshake_ms"] > 0


async def test_a_fleet_hang_up_is_logged_as_fleet_closed(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleets, caplog
):
    a, _ = ws_fleets
    ingress = await start_ingress([a.line("a")])
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
        await ws.send("close:4001")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    await eventually(lambda: any(r.name == "fleet_ingress.access" for r in caplog.records))
    record = next(r for r in caplog.records if r.name == "fleet_ingress.access")
    assert record.fields["end_reason"] == "fleet closed"  # type: ignore[attr-defined]
