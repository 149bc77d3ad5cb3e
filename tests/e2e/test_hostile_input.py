"""Hostile input on the carrier listener (issue #7, "Hostile input").

Real TLS connections to a real listener: smuggling attempts and malformed
heads are refused with 400 and never reach a fleet; a property-based test of
the head check and the head rewrite (no sockets); slowloris and 10,000 idle
TLS connections; random bytes instead of TLS and after it. Every loop is
bounded in count and time, and all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import random
import resource
import select
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fleet_ingress.core.request_head import RequestRefused
from fleet_ingress.service.ingress import Ingress
from tests.head_oracle import check_accepted, check_hostless, check_plain_read, check_verdicts
from tests.property_settings import property_settings
from tests.support import (
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    eventually,
    free_port,
    free_ports,
    raw_exchange,
    wss_url,
)

# What a fleet answers if a head ever reaches it: the carrier would see 418,
# never the 400 the ingress owes it, and the fleet counts the connection.
FORWARDED = b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

UPGRADE_HEADERS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def upgrade(extra: bytes = b"", *, target: bytes = b"/ws/bot-1", host: bytes = b"calls.test"):
    """A WebSocket upgrade head the ingress forwards, plus `extra` header lines."""
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (target, host, UPGRADE_HEADERS, extra)


def with_version(version: bytes) -> bytes:
    return upgrade().replace(b" HTTP/1.1\r\n", b" " + version + b"\r\n", 1)


@pytest.fixture
async def teapot(tls_files: TLSFiles):
    """A fleet that counts connections and answers 418 to whatever reaches it."""
    heads: list[bytes] = []

    async def record_and_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(FORWARDED)
        await writer.drain()

    fleet = await RawFleet(tls_files.fleet_server_context(), record_and_answer).start()
    fleet.heads = heads
    yield fleet
    await fleet.stop()


# -- 1. smuggling and malformed heads through the real listener ---------------------------


# Beyond h11's own checks (found by this file): control characters in header
# values (h11 lets \x01-\x08, \x0e-\x1f and DEL through), a Host that is not
# uri-host[:port] (RFC 9112 3.2), and "Content-Length: 0, 0" (h11 merges it).
def _case(raw: bytes, case_id: str) -> Any:
    return pytest.param(raw, id=case_id)


SMUGGLING = [
    # Content-Length: a GET upgrade has no body, and two lengths are two framings.
    pytest.param(upgrade(b"Content-Length: 0\r\nContent-Length: 0\r\n"), id="cl-0-twice"),
    pytest.param(upgrade(b"Content-Length: 0\r\nContent-Length: 5\r\n"), id="cl-0-and-5"),
    pytest.param(upgrade(b"Content-Length: 5\r\ncontent-length: 5\r\n"), id="cl-5-twice"),
    pytest.param(upgrade(b"Content-Length: 5\r\n"), id="cl-5"),
    pytest.param(upgrade(b"Content-Length: 0,5\r\n"), id="cl-list-differs"),
    pytest.param(upgrade(b"Content-Length: +0\r\n"), id="cl-signed"),
    pytest.param(upgrade(b"Content-Length: \r\n"), id="cl-empty"),
    _case(upgrade(b"Content-Length: 0, 0\r\n"), "cl-list-same"),
    # Transfer-Encoding, alone or with Content-Length: any TE is a body.
    pytest.param(upgrade(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"), id="cl-te"),
    pytest.param(upgrade(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"), id="te-cl"),
    pytest.param(upgrade(b"Transfer-Encoding: chunked\r\n"), id="te-chunked"),
    pytest.param(upgrade(b"Transfer-Encoding: identity\r\n"), id="te-identity"),
    pytest.param(upgrade(b"Transfer-Encoding: gzip, chunked\r\n"), id="te-gzip-chunked"),
    pytest.param(upgrade(b"Transfer-Encoding:chunked\r\n"), id="te-no-space"),
    pytest.param(upgrade(b"Transfer-Encoding: \x0bchunked\r\n"), id="te-vtab"),
    pytest.param(upgrade(b"Transfer-Encoding:\r\n"), id="te-empty"),
    pytest.param(
        upgrade(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"), id="te-twice"
    ),
    # obs-fold, in any line.
    pytest.param(upgrade(b"X-Trace: a\r\n folded\r\n"), id="fold-space"),
    pytest.param(upgrade(b"X-Trace: a\r\n\tfolded\r\n"), id="fold-tab"),
    pytest.param(upgrade(b"Transfer-Encoding: x\r\n chunked\r\n"), id="fold-te"),
    pytest.param(
        b"GET /ws/bot-1 HTTP/1.1\r\n Host: calls.test\r\n" + UPGRADE_HEADERS + b"\r\n",
        id="fold-first-line",
    ),
    # Whitespace between the name and the colon (RFC 9112 5.1: MUST 400).
    pytest.param(upgrade(b"Transfer-Encoding : chunked\r\n"), id="space-before-colon-te"),
    pytest.param(upgrade(b"X-Trace\t: a\r\n"), id="tab-before-colon"),
    pytest.param(upgrade().replace(b"Host: ", b"Host : "), id="space-before-colon-host"),
    # Malformed header lines.
    pytest.param(upgrade(b"X Trace: a\r\n"), id="space-in-name"),
    pytest.param(upgrade(b": a\r\n"), id="empty-name"),
    pytest.param(upgrade(b"X-Trace\r\n"), id="no-colon"),
    pytest.param(upgrade(b"X-Trace: a\rX-Other: b\r\n"), id="bare-cr"),
    pytest.param(upgrade().replace(b"\r\n", b"\n"), id="bare-lf"),
    pytest.param(upgrade(b"X-Trace: a\nX-Other: b\r\n"), id="bare-lf-in-one-line"),
    # NUL and other control characters in names, values and the target.
    pytest.param(upgrade(b"X-Trace: a\x00b\r\n"), id="nul-in-value"),
    pytest.param(upgrade(b"X-Tr\x00ce: a\r\n"), id="nul-in-name"),
    pytest.param(upgrade(target=b"/ws/bot\x00-1"), id="nul-in-target"),
    pytest.param(upgrade(b"X-Tr\x01ce: a\r\n"), id="ctl-01-in-name"),
    pytest.param(upgrade(b"X-Tr\x7fce: a\r\n"), id="del-in-name"),
    pytest.param(upgrade(b"X-Trace: a\x0bb\r\n"), id="vt-in-value"),
    pytest.param(upgrade(b"X-Trace: a\x0cb\r\n"), id="ff-in-value"),
    pytest.param(upgrade(target=b"/ws/bot\x01-1"), id="ctl-01-in-target"),
    pytest.param(upgrade(target=b"/ws/bot\x7f-1"), id="del-in-target"),
    pytest.param(upgrade(target=b"/ws/bot\t-1"), id="tab-in-target"),
    pytest.param(upgrade(target=b"/ws/bot\xff-1"), id="obs-text-in-target"),
    pytest.param(upgrade(target=b"/ws/bot -1"), id="space-in-target"),
    pytest.param(b"G\x00T /ws/bot-1 HTTP/1.1\r\nHost: calls.test\r\n\r\n", id="nul-in-method"),
    _case(upgrade(b"X-Trace: a\x01b\r\n"), "ctl-01-in-value"),
    _case(upgrade(b"X-Trace: a\x1bb\r\n"), "esc-in-value"),
    _case(upgrade(b"X-Trace: a\x7fb\r\n"), "del-in-value"),
    _case(upgrade(host=b"calls.test\x08"), "ctl-08-in-host"),
    # Host: exactly one, and a valid one.
    pytest.param(upgrade(b"Host: evil.test\r\n"), id="host-twice"),
    pytest.param(upgrade(b"Host: calls.test\r\n"), id="host-twice-same"),
    pytest.param(upgrade(b"host: evil.test\r\n"), id="host-twice-case"),
    pytest.param(upgrade().replace(b"Host: calls.test\r\n", b""), id="host-missing"),
    _case(upgrade(host=b"calls.test, evil.test"), "host-list"),
    _case(upgrade(host=b"calls.test evil.test"), "host-space"),
    _case(upgrade(host=b"evil.test/ws/x?"), "host-path"),
    _case(upgrade(host=b"calls.test:99999999"), "host-port-out-of-range"),
    _case(upgrade(host=b"calls.test:65536"), "host-port-65536"),
    _case(upgrade(host=b"calls.test:https"), "host-port-not-numeric"),
    # Versions: HTTP/1.1 only (an HTTP/1.0 upgrade is no WebSocket handshake).
    pytest.param(with_version(b"HTTP/1.0"), id="http-1.0-upgrade"),
    pytest.param(b"GET /ws/bot-1 HTTP/1.0\r\n\r\n", id="http-1.0-no-host"),
    pytest.param(with_version(b"HTTP/1.2"), id="http-1.2"),
    pytest.param(with_version(b"HTTP/2.0"), id="http-2.0"),
    pytest.param(with_version(b"HTTP/0.9"), id="http-0.9-label"),
    pytest.param(b"GET /ws/bot-1\r\n\r\n", id="http-0.9-style"),
    pytest.param(with_version(b"HTTP/1.10"), id="http-1.10"),
    pytest.param(with_version(b"HTTP/11"), id="http-11"),
    pytest.param(with_version(b"http/1.1"), id="http-lowercase"),
    pytest.param(with_version(b"HTTP/1.1 "), id="version-trailing-space"),
    pytest.param(upgrade().replace(b"GET ", b"GET  ", 1), id="double-space"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-preface"),
    pytest.param(b"\r\n" * 9 + upgrade(), id="many-leading-crlf"),
    # Targets other than origin-form.
    pytest.param(upgrade(target=b"http://fleet.internal/ws/bot-1"), id="absolute-form-http"),
    pytest.param(upgrade(target=b"https://evil.test/ws/bot-1"), id="absolute-form-other-host"),
    pytest.param(upgrade(target=b"https://x@calls.test/ws/bot-1"), id="absolute-form-userinfo"),
    pytest.param(upgrade(target=b"https://calls.test/ws/../attach"), id="absolute-form-dot-dot"),
    pytest.param(upgrade(target=b"ftp://calls.test/ws/bot-1"), id="absolute-form-ftp"),
    pytest.param(upgrade(target=b"calls.test:443"), id="authority-form"),
    pytest.param(
        b"CONNECT fleet.internal:443 HTTP/1.1\r\nHost: fleet.internal:443\r\n\r\n", id="connect"
    ),
    pytest.param(upgrade(target=b"*"), id="asterisk-form"),
    pytest.param(upgrade(target=b"/ws/bot-1#frag"), id="fragment"),
    pytest.param(upgrade(target=b"/ws/x\\..\\attach"), id="backslash"),
    # Dot segments and encoded separators: a fleet's nginx would normalize
    # them to a route the ingress refuses (/attach, /livekit/*).
    pytest.param(upgrade(target=b"/ws/../attach"), id="dot-dot"),
    pytest.param(upgrade(target=b"/ws/./bot-1"), id="dot"),
    pytest.param(upgrade(target=b"/ws/bot-1/.."), id="dot-dot-at-end"),
    pytest.param(upgrade(target=b"/ws/%2e%2e/attach"), id="enc-dot-dot"),
    pytest.param(upgrade(target=b"/ws/%2E./attach"), id="enc-mixed-dot-dot"),
    pytest.param(upgrade(target=b"/ws/.%2E/attach"), id="mixed-enc-dot-dot"),
    pytest.param(upgrade(target=b"/ws/bot-1/%2e"), id="enc-dot-at-end"),
    # ...and with path parameters: a servlet container (Tomcat, Jetty) drops them
    # from a segment before it resolves dot segments ("/ws/..;/attach" is /attach).
    pytest.param(upgrade(target=b"/ws/..;/attach"), id="dot-dot-params"),
    pytest.param(upgrade(target=b"/ws/x/..;v=1/..;/livekit/dispatch"), id="dot-dot-params-2"),
    pytest.param(upgrade(target=b"/ws/.;/bot-1"), id="dot-params"),
    pytest.param(upgrade(target=b"/ws/x/..%2fattach"), id="enc-slash"),
    pytest.param(upgrade(target=b"/ws/x%2F..%2Fattach"), id="enc-slash-upper"),
    pytest.param(upgrade(target=b"/ws/bot%00.php"), id="enc-nul-in-path"),
    pytest.param(upgrade(target=b"/ws/bot%0D%0AX-Injected:%201"), id="enc-crlf-in-path"),
    pytest.param(upgrade(target=b"/ws/..%2F..%2Flivekit/dispatch"), id="enc-slash-livekit"),
    pytest.param(upgrade(target=b"/ws/x%5c..%5cattach"), id="enc-backslash"),
    pytest.param(upgrade(target=b"/ws/x%2fattach?q=1"), id="enc-slash-with-query"),
]


async def test_the_harness_sees_a_forwarded_head(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet
):
    """The control case: a good upgrade does reach the fleet (and comes back 418)."""
    ingress = await start_ingress([teapot.line("teapot")])
    got = await raw_exchange(ingress, tls_files, upgrade(b"Content-Length: 0\r\n"))
    assert got == FORWARDED
    assert teapot.connections == 1


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        # RFC 9112 2.2: empty lines before the request line are skipped (SHOULD).
        pytest.param(b"\r\n" + upgrade(), b"/ws/bot-1", id="leading-crlf"),
        pytest.param(b"\r\n\r\n" + upgrade(), b"/ws/bot-1", id="two-leading-crlf"),
        # RFC 9112 3.2.2: absolute-form is accepted (MUST), routed by its path, and the
        # fleet gets origin-form.
        pytest.param(
            upgrade(target=b"https://calls.test/ws/bot-1?x=1"), b"/ws/bot-1?x=1", id="absolute"
        ),
        pytest.param(
            upgrade(target=b"wss://CALLS.test:443/exotel/b"), b"/exotel/b", id="absolute-wss"
        ),
    ],
)
async def test_lenient_but_unambiguous_heads_reach_the_fleet_in_origin_form(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet, raw: bytes, target: bytes
):
    ingress = await start_ingress([teapot.line("teapot")])
    got = await raw_exchange(ingress, tls_files, raw)
    assert got == FORWARDED
    (head,) = teapot.heads
    assert head.startswith(b"GET " + target + b" HTTP/1.1\r\n"), head
    assert b"\r\nX-Forwarded-Host: calls.test" in head


async def test_an_absolute_form_ipv6_authority_matches_host_as_an_address(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet
):
    """`https://[0::1]:8443/...` with `Host: [::1]:8443`: one address, spelt two
    ways. Compared as text, it was answered 400 "request target's authority
    differs from Host"; a Host naming another address still is."""
    ingress = await start_ingress([teapot.line("teapot")])
    raw = upgrade(target=b"https://[0::1]:8443/ws/bot-1", host=b"[::1]:8443")
    assert await raw_exchange(ingress, tls_files, raw) == FORWARDED
    (head,) = teapot.heads
    assert head.startswith(b"GET /ws/bot-1 HTTP/1.1\r\n"), head
    other = upgrade(target=b"https://[0::2]:8443/ws/bot-1", host=b"[::1]:8443")
    assert (await raw_exchange(ingress, tls_files, other)).startswith(b"HTTP/1.1 400 ")
    assert teapot.connections == 1


async def test_underscore_content_length_is_not_forwarded(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet
):
    ingress = await start_ingress([teapot.line("teapot")])
    extra = b"Content_Length: 5\r\nTransfer_Encoding: chunked\r\nX_Trace: kept\r\n"
    assert await raw_exchange(ingress, tls_files, upgrade(extra)) == FORWARDED
    (head,) = teapot.heads
    assert b"X_Trace: kept\r\n" in head
    assert b"_Length" not in head and b"_Encoding" not in head


def many_lines(count: int) -> bytes:
    """An upgrade head with `count` header lines in all."""
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(count - 5))
    return upgrade(extra)


async def test_more_header_lines_than_the_limit_get_431_and_never_reach_a_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet
):
    ingress = await start_ingress([teapot.line("teapot")])
    assert await raw_exchange(ingress, tls_files, many_lines(100)) == FORWARDED
    got = await raw_exchange(ingress, tls_files, many_lines(101))
    assert got.startswith(b"HTTP/1.1 431 "), got[:80]
    assert b"more than 100 header lines" in got
    # 4,000 tiny lines in 16 KiB: refused as they arrive.
    tiny = b"GET /ws/bot-1 HTTP/1.1\r\nHost: calls.test\r\n" + b"a:\r\n" * 4000 + b"\r\n"
    assert (await raw_exchange(ingress, tls_files, tiny)).startswith(b"HTTP/1.1 431 ")
    assert teapot.connections == 1


async def test_the_header_line_limit_is_configurable(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet
):
    ingress = await start_ingress([teapot.line("teapot")], limits={"max_header_count": 20})
    assert (await raw_exchange(ingress, tls_files, many_lines(21))).startswith(b"HTTP/1.1 431 ")
    assert await raw_exchange(ingress, tls_files, many_lines(20)) == FORWARDED


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "fleet_ingress.refused"]  # type: ignore[attr-defined]


async def test_each_refused_head_is_logged_with_who_where_what_and_why(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    ingress = await start_ingress([teapot.line("teapot")], timeouts={"request": 0.3})
    await raw_exchange(ingress, tls_files, many_lines(101))
    await raw_exchange(ingress, tls_files, upgrade(target=b"/nowhere"))
    await raw_exchange(ingress, tls_files, b"GET /ws/bot-1 HTTP/1.1\r\nHost: calls.test\r\n\r\n")
    await raw_exchange(ingress, tls_files, b"GET /ws/bot-1 HTTP/1.1\r\n")  # then silence: 408
    await raw_exchange(ingress, tls_files, upgrade())  # forwarded: an access-log line, not this
    # A head that does not parse: its first line, bounded and escaped, is what is named.
    await raw_exchange(ingress, tls_files, b"GET /ws/\x01" + b"x" * 400 + b"  HTTP/1.1\r\n\r\n")
    # The byte 0xc3 and the four characters \xc3 a carrier typed are told apart.
    await raw_exchange(ingress, tls_files, b"GET /ws/\xc3\\xc3  HTTP/1.1\r\n\r\n")
    await eventually(lambda: len(refused_lines(caplog)) == 6)
    assert [(f["status"], f["route"], f["target"]) for f in refused_lines(caplog)] == [
        # Refused as they were read: what came of the first line (was "").
        (431, "-", "GET /ws/bot-1 HTTP/1.1"),
        (404, "not_found", "/nowhere"),
        (400, "/ws/", "/ws/bot-1"),
        (408, "-", "GET /ws/bot-1 HTTP/1.1"),
        (400, "-", "GET /ws/\\x01" + "x" * 247),
        (400, "-", "GET /ws/\\xc3\\\\xc3  HTTP/1.1"),
    ]
    for line in refused_lines(caplog):
        assert line["client_ip"] == "127.0.0.1" and line["listener"] == "wss"
    assert "more than 100 header lines" in refused_lines(caplog)[0]["reason"]
    record = next(r for r in caplog.records if r.name == "fleet_ingress.refused")
    assert record.getMessage() == "request refused"


async def test_a_flood_of_refused_heads_is_logged_at_a_bounded_rate(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    ingress = await start_ingress([teapot.line("teapot")])
    now = [1000.0]
    ingress.refusals.clock = lambda: now[0]  # one second, however long the handshakes take
    ingress.refusals.call_later = lambda delay, then: None  # its end-of-second line: below
    flood = [upgrade(target=b"/nowhere")] * (ingress.refusals.per_second + 5)
    await asyncio.gather(*(raw_exchange(ingress, tls_files, raw) for raw in flood))
    assert len(refused_lines(caplog)) == ingress.refusals.per_second
    now[0] += 1.0
    await raw_exchange(ingress, tls_files, many_lines(101))
    assert refused_lines(caplog)[-1]["suppressed"] == 5
    assert refused_lines(caplog)[-1]["status"] == 431
    # Refused as it was read: its line names the request all the same (was "").
    assert refused_lines(caplog)[-1]["target"] == "GET /ws/bot-1 HTTP/1.1"


async def test_a_flood_of_refused_heads_that_stops_is_counted_within_a_second(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet, caplog
):
    """No next line comes to carry the count of the lines dropped: a line at the
    end of the second says it (before, it waited for the next refused request,
    which could be hours later)."""
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    ingress = await start_ingress([teapot.line("teapot")])
    ingress.refusals.per_second = 3
    flood = [upgrade(target=b"/nowhere")] * 8
    await asyncio.gather(*(raw_exchange(ingress, tls_files, raw) for raw in flood))
    summary = lambda: [f for f in refused_lines(caplog) if "status" not in f]  # noqa: E731
    await eventually(lambda: bool(summary()), timeout=2.5)
    counted = sum(f.get("suppressed", 0) for f in refused_lines(caplog))
    written = [f for f in refused_lines(caplog) if "status" in f]
    assert len(written) + counted == 8 and counted >= 1
    assert summary()[0]["of"] == "request refused"
    assert any(r.getMessage() == "log lines suppressed" for r in caplog.records)


async def test_refused_heads_on_port_80_are_logged_too(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    ingress = await start_ingress(
        ["https://127.0.0.1:9 name=unused"], listen={"acme": "127.0.0.1:0"}
    )
    reader, writer = await asyncio.open_connection(*ingress.acme_address)
    writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n" + b"X: a\r\n" * 101 + b"\r\n")
    async with asyncio.timeout(5):
        assert (await reader.read(-1)).startswith(b"HTTP/1.1 431 ")
    writer.close()
    ((line),) = refused_lines(caplog)
    assert (line["listener"], line["status"], line["client_ip"]) == ("acme", 431, "127.0.0.1")


async def test_log_access_false_writes_no_refused_lines(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    ingress = await start_ingress([teapot.line("teapot")], log={"access": False})
    await raw_exchange(ingress, tls_files, many_lines(101))
    assert refused_lines(caplog) == []


async def test_a_refused_connection_is_freed_without_the_cyclic_collector(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet
):
    """Left as cycles, refused connections pile up for the collector, whose pauses
    under a flood (10-20 ms) hold every live call's frames."""
    ingress = await start_ingress([teapot.line("teapot")])
    host, port = ingress.wss_address
    gc.disable()
    try:
        gc.collect()
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        await eventually(lambda: len(ingress.registry.connections) == 1)
        (carrier,) = ingress.registry.connections
        freed = weakref.ref(carrier)
        del carrier
        writer.write(many_lines(101))
        async with asyncio.timeout(5):
            assert (await reader.read(-1)).startswith(b"HTTP/1.1 431 ")
        writer.close()
        await eventually(lambda: not ingress.registry.connections)
        await eventually(lambda: freed() is None)
    finally:
        gc.enable()


@pytest.mark.parametrize("raw", SMUGGLING)
async def test_smuggling_and_malformed_heads_get_400_and_never_reach_a_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet, raw: bytes
):
    ingress = await start_ingress([teapot.line("teapot")])
    got = await raw_exchange(ingress, tls_files, raw)
    await asyncio.sleep(0.02)  # a forwarded head would have connected by now
    await eventually(lambda: len(teapot.heads) == teapot.connections)
    assert teapot.connections == 0, f"the fleet got: {teapot.heads}"
    assert got.startswith(b"HTTP/1.1 400 "), got[:80]
    assert b"\r\nConnection: close\r\n" in got
    assert ingress.registry.calls == set()
    # One request counted, as a 400: on no route when the head is unreadable, on the call
    # route when it reads but is no call (an HTTP/1.0 upgrade).
    ((route, status),) = ingress.registry.requests.elements()
    assert status == 400 and route in ("-", "/ws/")


async def test_a_pipelined_request_after_a_refused_answer_never_reaches_the_fleet(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """Bytes after a head are carrier WebSocket frames, sent on only after a
    101: when the fleet answers anything else, they are dropped, so a second
    request smuggled behind a good head never reaches the fleet's HTTP parser."""
    seen: list[bytes] = []

    async def refuse_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        try:
            async with asyncio.timeout(0.5):
                seen.append(await reader.read(65536))  # b"" when the ingress closes
        except TimeoutError:
            pass

    fleet = await RawFleet(tls_files.fleet_server_context(), refuse_then_listen).start()
    ingress = await start_ingress([fleet.line("busy")])
    smuggled = b"GET /attach HTTP/1.1\r\nHost: calls.test\r\nContent-Length: 0\r\n\r\n"
    got = await raw_exchange(ingress, tls_files, upgrade() + smuggled)
    assert got.startswith(b"HTTP/1.1 429 ")
    await eventually(lambda: len(seen) == 2)
    assert seen[0].startswith(b"GET /ws/bot-1 HTTP/1.1\r\n")
    assert seen[1] == b""  # nothing after the head, then the ingress closed
    await fleet.stop()


# -- 2. property: the head check and the head rewrite ------------------------------------

_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_tokens = st.lists(st.sampled_from(list(_TCHAR)), min_size=1, max_size=10).map(bytes)
_NAMES = [
    b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Transfer-Encoding",
    b"Connection", b"connection", b"Upgrade", b"Keep-Alive", b"TE", b"Trailer",
    b"Proxy-Connection", b"Proxy-Authorization", b"Proxy-Authenticate", b"X-Forwarded-For",
    b"x-forwarded-for", b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Protocol", b"X-Trace", b"Expect", b"Cookie", b"X_Forwarded_For",
    b"x_forwarded-host", b"Transfer_Encoding", b"Keep_Alive", b"X_Trace", b"Content_Length",
    b"X-Forwarded-Port", b"x-forwarded-prefix", b"X_Forwarded_Ssl", b"X-Forwardedness",
]  # fmt: skip
_VALUE_PIECES = [
    b"a", b"websocket", b"Upgrade", b"keep-alive", b"close", b"X-Trace", b"te", b"cookie",
    b"0", b"5", b"chunked", b"identity", b",", b", ", b" ", b"\t", b"\r", b"\n", b"\r\n",
    b"\r\n ", b"\r\n\t", b"\x00", b"\x01", b"\x0b", b"\x7f", b"\xff", b":", b";", b"=",
    b"1.2.3.4", b"calls.test", b"%0d%0a", b"\r\n\r\nGET /attach HTTP/1.1\r\n",
    b"Sec-WebSocket-Key",
]  # fmt: skip
_names = st.one_of(st.sampled_from(_NAMES), _tokens, st.binary(max_size=6))
_values = st.one_of(
    st.lists(st.sampled_from(_VALUE_PIECES), max_size=6).map(b"".join), st.binary(max_size=12)
)
_SEPARATORS = [b": "] * 8 + [b":", b":\t", b" : ", b"\t:", b":  "]
_EOLS = [b"\r\n"] * 12 + [b"\n", b"\r", b"\n\r", b"\r\r\n"]
_SEGMENTS = [
    b"bot-1", b"x", b"", b".", b"..", b"%2e", b"%2E%2e", b"%2f", b"%5c", b"a%20b",
    b"..;", b"attach", b"haproxy-health", b"\x00", b"#", b"\\", b"@", b"\xff", b" ",
]  # fmt: skip
_PREFIXES = [b"/ws/"] * 4 + [b"/exotel/", b"/", b"//", b"http://fleet/ws/", b"*", b""] + [
    b"https://calls.test/ws/", b"HTTP://Calls.Test:80/exotel/", b"wss://u@calls.test/ws/",
    b"https://calls.test:99999/ws/", b"https://calls.test",
]  # fmt: skip
_QUERIES = [b"", b"", b"?a=1", b"?next=%2F..%2f", b"?x=/../attach", b"?q=\r\n"]
_targets = st.one_of(
    st.tuples(
        st.sampled_from(_PREFIXES),
        st.lists(st.sampled_from(_SEGMENTS), max_size=4).map(b"/".join),
        st.sampled_from(_QUERIES),
    ).map(b"".join),
    st.binary(max_size=12),
)
_METHODS = [b"GET"] * 6 + [b"POST", b"get", b"CONNECT", b"OPTIONS", b"HEAD"]
_VERSIONS = [b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"", b"x"]


_LEGAL_PIECES = [p for p in _VALUE_PIECES if not {0x00, 0x0A, 0x0B, 0x0D} & set(p)]
_LEGAL_SEGMENTS = [s for s in _SEGMENTS if s not in (b"\x00", b"#", b"\\", b"\xff", b" ")]


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """Valid-ish heads: the grammar's shape with hostile tokens, bytes and repeats.

    Half are "clean" (CRLF endings, tokens for names, no CR/LF/NUL in values,
    a GET upgrade on a call route), so that many are accepted and their
    rewrite is checked; the other half take any piece anywhere."""
    clean = draw(st.booleans())
    if clean:
        method = draw(st.sampled_from([b"GET"] * 4 + [b"POST", b"HEAD"]))
        path = b"/".join(draw(st.lists(st.sampled_from(_LEGAL_SEGMENTS), max_size=3)))
        prefix = draw(st.sampled_from([b"/ws/", b"/exotel/", b"/", b"https://calls.test/ws/"]))
        target = prefix + b"bot" + path + draw(st.sampled_from(_QUERIES[:-1]))
        line = method + b" " + target + b" HTTP/1.1"
        names = st.one_of(st.sampled_from(_NAMES), _tokens)
        values = st.lists(st.sampled_from(_LEGAL_PIECES), max_size=6).map(b"".join)
        separators = st.sampled_from([b": ", b":", b":\t", b":  "])
        eols = st.just(b"\r\n")
    else:
        method = draw(st.one_of(st.sampled_from(_METHODS), _tokens))
        space = draw(st.sampled_from([b" "] * 10 + [b"  ", b"\t"]))
        line = method + space + draw(_targets) + b" " + draw(st.sampled_from(_VERSIONS))
        names, values = _names, _values
        separators, eols = st.sampled_from(_SEPARATORS), st.sampled_from(_EOLS)
    lines: list[bytes] = []
    if clean or draw(st.booleans()):
        lines += [b"Host: calls.test", b"Upgrade: websocket", b"Connection: Upgrade"]
    for _ in range(draw(st.integers(0, 8))):
        lines.append(draw(names) + draw(separators) + draw(values))
    lines = draw(st.permutations(lines))
    ends = [draw(eols) for _ in range(len(lines) + 2)]
    head = line + ends[0] + b"".join(h + e for h, e in zip(lines, ends[1:], strict=False))
    # RFC 9112 2.2: empty lines before the request line are skipped, a few of them.
    empty = draw(st.sampled_from([0] * 6 + [1, 2, 9]))
    return b"\r\n" * empty + head + ends[-1]


# 400 examples, the same on every run (a new random example can never turn CI
# red); FLEET_INGRESS_PROPERTY_EXAMPLES=N runs N from a random seed (fuzz/README.md).
@property_settings(400)
@given(
    raw=request_heads(),
    trailing=st.sampled_from([b"", b"\x81\x05hello", b"GET /attach HTTP/1.1\r\n\r\n"]),
    cuts=st.lists(st.integers(1, 40), max_size=12),
    limit=st.sampled_from([16384, 16384, 16384, 128]),
    max_lines=st.sampled_from([100, 100, 100, 3]),
)
# Always tried: an HTTP/1.0 upgrade is read (monitors probe with 1.0) but is never a call.
@example(raw=with_version(b"HTTP/1.0"), trailing=b"", cuts=[7], limit=16384, max_lines=100)
# Found by the atheris harness: Upgrade without Connection: Upgrade is no call (400).
@example(
    raw=b"GET /ws/bot-1 HTTP/1.1\r\nHost:\tchunked\r\nUpgrade:\twebsocket\r\nX-Trace: a\r\n\r\n",
    trailing=b"",
    cuts=[],
    limit=16384,
    max_lines=100,
)
def test_heads_are_refused_400_431_or_forwarded_in_a_shape_that_reparses_the_same(
    raw: bytes, trailing: bytes, cuts: list[int], limit: int, max_lines: int
):
    # However the bytes arrive, the verdict is the same (head_oracle.check_verdicts).
    verdict = check_verdicts(raw + trailing, cuts, limit, max_lines)
    # The carrier listener's parse, lenient to a missing Host only (the health route's).
    check_hostless(raw + trailing, limit, max_lines)
    # A plain head read without h11 is read as h11 reads it (the parity of the two readers).
    check_plain_read(raw + trailing, limit, max_lines)
    if isinstance(verdict, RequestRefused):
        event(f"refused {verdict.status}")
    elif verdict is None:
        event("incomplete")
    else:
        event("accepted: call upgrade" if verdict.is_websocket_upgrade else "accepted")
        check_accepted(verdict, limit)


# -- 3. slowloris and idle connections -----------------------------------------------------


class Probe(asyncio.Protocol):
    """One client connection: when it opened and closed, what it received."""

    def __init__(self, first_bytes: bytes = b"", *, hang_up: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.first_bytes = first_bytes
        self.hang_up = hang_up
        self.transport: asyncio.Transport | None = None
        self.opened = 0.0
        self.closed: float | None = None
        self.received = bytearray()
        self.done: asyncio.Future[None] = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # For TLS this runs once the handshake is complete.
        self.transport = transport  # type: ignore[assignment]
        self.opened = self.loop.time()
        if self.first_bytes:
            self.transport.write(self.first_bytes)  # type: ignore[union-attr]
        if self.hang_up:
            self.transport.close()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.loop.time()
        if not self.done.done():
            self.done.set_result(None)

    @property
    def status(self) -> int | None:
        if self.received[:9] != b"HTTP/1.1 " or len(self.received) < 12:
            return None
        return int(self.received[9:12])


async def open_probes(
    n: int,
    batch: int,
    port: int,
    make: Callable[[], Probe],
    *,
    ssl_context: ssl.SSLContext | None,
) -> tuple[list[Probe], list[BaseException]]:
    """Open `n` connections, `batch` handshakes at a time."""
    loop = asyncio.get_running_loop()
    tls: dict[str, Any] = {"ssl": ssl_context, "server_hostname": "localhost"}
    opened: list[Probe] = []
    errors: list[BaseException] = []
    for start in range(0, n, batch):
        results = await asyncio.gather(
            *(
                loop.create_connection(make, "127.0.0.1", port, **(tls if ssl_context else {}))
                for _ in range(min(batch, n - start))
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                opened.append(result[1])
    return opened, errors


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def open_fds_settled() -> int:
    """`open_fds()` once the test's loop has listened: uvloop (libuv) opens
    /dev/null once a loop, at its first listening server (its reserve for
    EMFILE), which is no descriptor left open by a call. `free_port` used to
    make that first server itself; it no longer listens."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    server.close()
    await server.wait_closed()
    return open_fds()


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert hard == resource.RLIM_INFINITY or hard >= needed, (
        f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn) to run this test"
    )


async def real_calls_until(
    stop: asyncio.Event, ingress_url: str, tls_files: TLSFiles, *, limit: int = 200
) -> list[float]:
    """Real WebSocket calls one after another until `stop`: each one's seconds."""
    took: list[float] = []
    loop = asyncio.get_running_loop()
    while not stop.is_set() and len(took) < limit:
        started = loop.time()
        async with connect(ingress_url, ssl=tls_files.client_context(), open_timeout=5) as ws:
            await ws.send("still here")
            assert await ws.recv() == "still here"
        took.append(loop.time() - started)
        await asyncio.sleep(0.05)
    return took


SLOW_HEAD = b"GET /ws/slow HTTP/1.1\r\nHost: calls.test\r\nX-Slow: "


# 1000 TLS handshakes, both ends in this process's loop beside the live calls it
# times (under 3 s): 2 s of a core alone, 10.3 s in CI's main phase on the AMD
# host, where a live call took 3.29 s (session 49; alone, on the same code and
# session 48's, 0.18-0.29 s in twelve runs).
@pytest.mark.alone
async def test_slowloris_1000_trickling_heads_are_closed_at_the_request_timeout(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    raise_fd_limit(4096)
    request_timeout = 2.0
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    ingress = await start_ingress([fleet.line("a")], timeouts={"request": request_timeout})
    _, port = ingress.wss_address
    loop = asyncio.get_running_loop()
    fds_before = await open_fds_settled()
    stop_calls = asyncio.Event()
    calls = asyncio.create_task(real_calls_until(stop_calls, wss_url(ingress), tls_files))

    probes: list[Probe] = []

    async def trickle() -> None:  # one byte per connection every 0.3 s: never a whole head
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.3)
                for probe in probes:
                    if probe.closed is None and probe.transport is not None:
                        probe.transport.write(b"a")

    trickler = asyncio.create_task(trickle())
    try:
        started = loop.time()
        opened, errors = await open_probes(
            1000, 100, port, lambda: Probe(SLOW_HEAD), ssl_context=tls_files.client_context()
        )
        probes += opened
        opening_s = loop.time() - started
        fds_peak = open_fds()
        assert errors == [] and len(opened) == 1000
        async with asyncio.timeout(request_timeout + 15):
            await asyncio.gather(*(p.done for p in probes))
    finally:
        trickler.cancel()
        stop_calls.set()
    took = await calls

    lived = sorted(p.closed - p.opened for p in probes if p.closed is not None)
    statuses = {p.status for p in probes}
    print(
        f"\nslowloris: 1000 TLS opened in {opening_s:.2f}s; closed after "
        f"{lived[0]:.2f}..{lived[-1]:.2f}s (p50 {lived[500]:.2f}); "
        f"{len(took)} real calls, slowest {max(took):.3f}s"
    )
    assert statuses == {408}
    # The last closes lag by the loop's backlog of handshakes: 4.08 s once on
    # plain asyncio beside three other test runs (opening took 8.2 s); without
    # the timeout they would trickle on for the test's 30 s.
    assert request_timeout - 0.05 <= lived[0] and lived[-1] <= request_timeout + 3.0
    assert len(took) >= 3 and max(took) < 3.0
    assert len(fleet.requests) == len(took)  # only the real calls reached the fleet
    assert ingress.registry.requests[("-", 408)] == 1000
    await eventually(lambda: not ingress.registry.connections and open_fds() <= fds_before)
    print(f"slowloris: test process fds {fds_before} -> {fds_peak} -> {open_fds()}")
    await fleet.stop()


def _service_config(tls_files: TLSFiles, port: int, stats_port: int, timeout: float) -> str:
    return f"""
[listen]
wss = "127.0.0.1:{port}"
acme = ""
stats = "127.0.0.1:{stats_port}"
admin_socket = ""

[tls]
cert = "{tls_files.ingress_cert}"
key = "{tls_files.ingress_key}"

[fleets]
ca_file = "{tls_files.ca_pem}"
check_interval = 0.5

[timeouts]
request = {timeout}

[limits]
max_connections = 10100

[log]
level = "warning"
access = false
"""


async def _stats(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stats.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read(-1)
    writer.close()
    return json.loads(raw.partition(b"\r\n\r\n")[2])


# The fleet in a process of its own: the test process is busy with 10k handshakes.
FLEET_PROCESS = """
import asyncio, ssl, sys, uvloop
from fleet_ingress.sim import SimulatedFleet

async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[1])
    fleet = SimulatedFleet(name="a", ssl_context=ctx)
    await fleet.start()
    print(fleet.url, flush=True)
    await asyncio.sleep(300)

uvloop.run(main())
"""


@pytest.mark.uvloop_only
@pytest.mark.alone  # 10,000 handshakes take both cores for 8-12 s, within the request timeout
@pytest.mark.timeout(360)  # 35 s alone; on a loaded host 3-4 times the opening (up to 90 s)
async def test_10000_idle_tls_connections_are_held_then_closed_at_the_request_timeout(
    tls_files: TLSFiles,
):
    """The ingress as a real process (its fds apart from the client's)."""
    raise_fd_limit(10_500)
    # Opening takes 8-12 s on 2 cores alone: all are held at once within 20 s.
    # On a loaded host it took 77 s (two CPU hogs beside the test, other work
    # on the host): the first closed at the timeout long before the last was
    # open. A pilot of 1,000 measures this host's pace now, and the request
    # timeout is set past the opening it projects (the service started anew),
    # up to 180 s: past that (1,000 took 10-20 s on a host at load 12-16) the host
    # cannot hold 10,000 at once in the test's time, and says so by a skip.
    n, pilot, request_timeout, longest = 10_000, 1_000, 20.0, 180
    home = Path(tempfile.mkdtemp(prefix="fi-idle-"))
    tls_files.fleet_cert.private_key_and_cert_chain_pem.write_to_path(home / "fleet.pem")
    fleet = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLEET_PROCESS, str(home / "fleet.pem"), stdout=asyncio.subprocess.PIPE
    )
    assert fleet.stdout is not None
    fleet_url = (await fleet.stdout.readline()).decode().strip()
    assert fleet_url.startswith("https://"), "the fleet process did not start"
    (home / "fleets.txt").write_text(f"{fleet_url} name=a\n")
    loop = asyncio.get_running_loop()
    proc: asyncio.subprocess.Process | None = None

    async def start(timeout: float) -> tuple[asyncio.subprocess.Process, int, int]:
        port, stats_port = await free_ports(2)
        (home / "ingress.toml").write_text(_service_config(tls_files, port, stats_port, timeout))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleet_ingress", "run", "-c", str(home / "ingress.toml")
        )
        async with asyncio.timeout(30):
            while True:
                try:
                    stats = await _stats(stats_port)
                    workers = len(os.sched_getaffinity(0))  # process.workers = "auto"
                    if stats["fleets"][0]["health"] == "UP" and len(stats["workers"]) == workers:
                        return proc, port, stats_port
                except (OSError, ValueError, KeyError, IndexError):
                    pass
                await asyncio.sleep(0.1)

    async def stop(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    try:
        proc, port, stats_port = await start(request_timeout)
        started = loop.time()
        probes, errors = await open_probes(
            pilot, pilot, port, Probe, ssl_context=tls_files.client_context()
        )
        pilot_s = loop.time() - started
        assert errors == [] and len(probes) == pilot
        for probe in probes:
            probe.transport.close()  # type: ignore[union-attr]
        async with asyncio.timeout(30):
            await asyncio.gather(*(p.done for p in probes))
        # Half as long again as the projected opening (which the pilot's pace
        # over-projected by 16% quiet, 32% loaded), and at least the 20 s it
        # was: a fresh service (its counts and descriptors the test's alone).
        request_timeout = max(request_timeout, round(1.5 * pilot_s * n / pilot))
        await stop(proc)
        if request_timeout > longest:
            pytest.skip(
                f"this host opened {pilot} TLS connections in {pilot_s:.1f}s: {n} would take "
                f"about {pilot_s * n / pilot:.0f}s, too loaded to hold them all at once"
            )
        assert proc.returncode == 0
        proc, port, stats_port = await start(request_timeout)
        # The supervisor and its workers: the connections are held in the workers.
        pids = [proc.pid, *(w["pid"] for w in (await _stats(stats_port))["workers"])]

        def ingress_fds() -> int:
            return sum(open_fds(pid) for pid in pids)

        fds_before = ingress_fds()

        started = loop.time()
        probes, errors = await open_probes(
            n, 1000, port, Probe, ssl_context=tls_files.client_context()
        )
        opening_s = loop.time() - started
        assert errors == [] and len(probes) == n
        fds_peak = ingress_fds()
        # All held at once, and the service still serves a real call.
        early = [p for p in probes if p.closed is not None]
        assert not early, (
            f"{len(early)} closed before all {n} were open ({opening_s:.1f}s; the pilot's "
            f"{pilot} {pilot_s:.1f}s, the request timeout {request_timeout}s): "
            f"{early[0].received[:40]!r} after {early[0].closed - early[0].opened:.2f}s"
        )
        # The host's count is the workers' reports summed: a worker busy with the
        # last handshakes may answer a scrape's pull late (its previous report
        # then stands: 9,947 and 9,976 of 10,000 read at once in two runs).
        # Waited for up to half the time left before the first is closed (at
        # least 5 s): on a loaded host the workers' reports come slower too.
        counted = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(5.0, (request_timeout - opening_s) / 2)):
                while (counted := (await _stats(stats_port))["frontend"]["connections"]) != n:
                    await asyncio.sleep(0.2)
        assert counted == n
        url = f"wss://127.0.0.1:{port}/ws/during-idle"
        try:
            async with connect(url, ssl=tls_files.client_context(), open_timeout=5) as ws:
                await ws.send("x")
                assert await ws.recv() == "x"
        except InvalidStatus as exc:
            fleet_row = (await _stats(stats_port))["fleets"][0]
            pytest.fail(
                f"a real call got {exc.response.status_code} {exc.response.body!r}: {fleet_row}"
            )

        async with asyncio.timeout(request_timeout + 20):
            await asyncio.gather(*(p.done for p in probes))
        closing_s = loop.time() - started
        lived = sorted(p.closed - p.opened for p in probes if p.closed is not None)
        async with asyncio.timeout(10):
            while (fds_after := ingress_fds()) > fds_before:
                await asyncio.sleep(0.1)
        stats = await _stats(stats_port)
        print(
            f"\n10k idle: pilot {pilot} in {pilot_s:.2f}s, request timeout {request_timeout}s; "
            f"opened {n} TLS in {opening_s:.2f}s ({n / opening_s:.0f}/s); "
            f"ingress fds {fds_before} -> {fds_peak} -> {fds_after}; closed after "
            f"{lived[0]:.2f}..{lived[-1]:.2f}s (p50 {lived[n // 2]:.2f}), "
            f"all gone {closing_s:.1f}s after the first connect; fleet probes failed: "
            f"{stats['fleets'][0]['check_failures']}/{stats['fleets'][0]['checks_total']}"
        )
        assert fds_peak >= fds_before + n
        assert {p.status for p in probes} == {408}
        # Each closed at the timeout: within 3 s after it, or on a loaded host
        # half as long again as the pilot took (a batch of 1,000 opened
        # together times out together, and its closes take a loaded worker
        # seconds: the last 3.7, 3.8 and 4.3 s late where the pilot took 4.5,
        # 4.9 and 8.9 s).
        late = max(3.0, 1.5 * pilot_s)
        assert request_timeout - 0.05 <= lived[0] and lived[-1] <= request_timeout + late
        assert stats["frontend"]["connections"] == 0
        assert stats["frontend"]["requests"]["-"] == {"408": n}
        assert proc.returncode is None
        assert stats["fleets"][0]["calls_total"] == 1
    finally:
        if proc is not None:
            await stop(proc)
        with contextlib.suppress(ProcessLookupError):
            fleet.kill()
        await fleet.wait()
        shutil.rmtree(home, ignore_errors=True)
    assert proc is not None and proc.returncode == 0


# -- 4. random bytes instead of TLS, and after it ------------------------------------------


async def test_random_bytes_instead_of_tls_by_the_thousand(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    raise_fd_limit(4096)
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    ingress = await start_ingress([fleet.line("a")], timeouts={"request": 2})
    _, port = ingress.wss_address
    fds_before = await open_fds_settled()
    rng = random.Random(7)

    async def storm(payloads: list[bytes], hang_up: Callable[[], bool]) -> None:
        sent = iter(payloads)
        probes, errors = await open_probes(
            len(payloads), 200, port, lambda: Probe(next(sent), hang_up=hang_up()), ssl_context=None
        )
        assert errors == []
        async with asyncio.timeout(20):
            await asyncio.gather(*(p.done for p in probes))
        # Dropped with at most a TLS alert; never an HTTP answer.
        assert all(p.received == b"" or p.received.startswith(b"\x15\x03") for p in probes)

    # 1. Bytes OpenSSL can judge at once: neither a record header (a version
    #    byte 0x03 second) nor an SSLv2-style one (high bit first), either of
    #    which may announce more bytes to wait for. Half hang up at once, half
    #    wait to be dropped: each one is counted.
    n = 2000
    first_bytes = [b for b in range(0x80) if b != 0x16]
    second_bytes = [b for b in range(0x100) if b != 0x03]
    judged = [
        bytes([rng.choice(first_bytes), rng.choice(second_bytes)])
        + rng.randbytes(rng.randint(16, 2048))
        for _ in range(n)
    ]
    await storm(judged, lambda: rng.random() < 0.5)
    await eventually(lambda: ingress.registry.tls_handshake_failures >= n, timeout=10)
    assert ingress.registry.tls_handshake_failures == n
    # 2. Any bytes at all, then hang-up: some stall OpenSSL, which waits for
    #    more; the hang-up fails those handshakes, and they count too.
    m = 500
    await storm([rng.randbytes(rng.randint(1, 2048)) for _ in range(m)], lambda: True)
    await eventually(lambda: ingress.registry.tls_handshake_failures >= n + m, timeout=10)
    assert ingress.registry.tls_handshake_failures == n + m
    assert ingress.registry.connections_total == 0  # none ever became a carrier connection
    await _after_the_storm(ingress, tls_files, fleet, fds_before)


def _half_a_client_hello(tls_files: TLSFiles) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = tls_files.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


async def test_tls_handshakes_cut_short_or_stalled_are_dropped_and_counted(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    """A record header promising more then EOF, the same in SSLv2 form, and
    half a ClientHello then silence (dropped at timeouts.request): each one
    a failed handshake, counted, nothing left open."""
    ingress = await start_ingress(
        [f"https://127.0.0.1:{await free_port()} name=none"], timeouts={"request": 0.5}
    )
    _, port = ingress.wss_address
    fds_before = await open_fds_settled()
    cut_short = iter([b"\x16\x03\x01\x02\x00" + b"\x01" * 10, b"\x80\xff\x01\x03\x01" + b"\0" * 10])
    hung_up, _ = await open_probes(
        2, 2, port, lambda: Probe(next(cut_short), hang_up=True), ssl_context=None
    )
    # Made once: 20 made in the probes' factory (~20 ms each, in this loop) would
    # delay the client's connection_made (the probe's start) past the server's accept.
    half_hello = _half_a_client_hello(tls_files)
    stalled, _ = await open_probes(20, 20, port, lambda: Probe(half_hello), ssl_context=None)
    async with asyncio.timeout(5):
        await asyncio.gather(*(p.done for p in hung_up + stalled))
    lived = [p.closed - p.opened for p in stalled if p.closed is not None]
    assert 0.45 <= min(lived) and max(lived) < 2.0
    await eventually(lambda: ingress.registry.tls_handshake_failures == 22)
    assert ingress.registry.connections_total == 0
    await eventually(lambda: ingress.registry.handshaking == 0 and open_fds() <= fds_before)


async def test_a_network_error_passed_up_by_accept_does_not_stop_the_listener(
    start_ingress: StartIngress, tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch
):
    """Linux accept(2) hands up pending network errors of the new connection
    (ENETDOWN, EHOSTUNREACH, ENETUNREACH, ...) and says to retry as for EAGAIN.
    One such error must not leave the ingress serving but never accepting."""
    ingress = await start_ingress([f"https://127.0.0.1:{await free_port()} name=none"])
    listening = ingress._wss.sock.fileno()  # type: ignore[union-attr]
    # accept(2) as CPython calls it: the C socket's _accept, under socket.accept()
    # and under the listener's own accepts (net/tls_socket.py's Acceptor).
    real_accept = socket.socket._accept  # type: ignore[attr-defined]
    raised: list[int] = []

    def accept(sock: socket.socket) -> tuple[int, Any]:
        if sock.fileno() == listening and not raised:
            raised.append(errno.EHOSTUNREACH)
            raise OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))
        return real_accept(sock)  # type: ignore[no-any-return]

    monkeypatch.setattr(socket.socket, "_accept", accept)
    request = b"GET /haproxy-health HTTP/1.1\r\nHost: calls.test\r\n\r\n"
    for _ in range(2):  # the first connection meets the error; both must be served
        got = await raw_exchange(ingress, tls_files, request, timeout=2)
        assert got.startswith(b"HTTP/1.1 200 ")
    assert raised == [errno.EHOSTUNREACH]


async def test_random_bytes_after_a_tls_handshake_by_the_thousand(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    raise_fd_limit(4096)
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    ingress = await start_ingress([fleet.line("a")], timeouts={"request": 1})
    _, port = ingress.wss_address
    fds_before = await open_fds_settled()
    rng = random.Random(11)
    n = 2000
    sizes = [rng.choice([1, 64, 1024, 4096, 20000]) for _ in range(n)]
    payloads = iter([rng.randbytes(size) for size in sizes])

    def noise() -> Probe:  # half hang up at once, half wait for the answer
        return Probe(next(payloads), hang_up=rng.random() < 0.5)

    probes, errors = await open_probes(n, 100, port, noise, ssl_context=tls_files.client_context())
    assert errors == []
    async with asyncio.timeout(30):
        await asyncio.gather(*(p.done for p in probes))
    answered = [p.status for p in probes if p.received]
    assert set(answered) <= {400, 408, 431}, set(answered)
    assert ingress.registry.tls_handshake_failures == 0
    assert ingress.registry.connections_total == n
    assert sum(ingress.registry.requests.values()) <= n
    await _after_the_storm(ingress, tls_files, fleet, fds_before)


async def _after_the_storm(
    ingress: Ingress, tls_files: TLSFiles, fleet: WsFleet, fds_before: int
) -> None:
    """No leak (fds, registry), nothing reached the fleet, and a real call works."""
    await eventually(
        lambda: not ingress.registry.connections and open_fds() <= fds_before, timeout=10
    )
    print(f"\nafter the storm: test process fds {fds_before} -> {open_fds()}")
    assert ingress.registry.calls == set()
    assert ingress.registry.handshaking == 0
    assert fleet.requests == []
    async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
        await ws.send("after the storm")
        assert await ws.recv() == "after the storm"
    assert len(fleet.requests) == 1
    await fleet.stop()


def _client_hellos(tls_files: TLSFiles, count: int) -> list[bytes]:
    """`count` ClientHellos (each its own key share), as a carrier's first flight."""
    ctx = tls_files.client_context()
    hellos = []
    for _ in range(count):
        outgoing = ssl.MemoryBIO()
        tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hellos.append(outgoing.read())
    return hellos


async def test_client_hellos_arriving_together_are_answered_over_many_loop_turns(
    start_ingress: StartIngress, tls_files: TLSFiles, teapot: RawFleet
):
    """A burst of carriers that connect, are accepted (one a loop turn), and then
    send their ClientHellos together: each answer (key exchange, the
    certificate's signature) is 0.3-0.7 ms of the worker's CPU. Answered as
    their reads came, all of them ran in one loop turn, which every live call's
    next frame waited for: 300 such carriers held the calls of a worker of
    `fleet-ingress run` 100-250 ms (hostile37: 159 answers, 45 ms of CPU, in
    one turn). They wait their turn in the head queue's budget instead."""
    count = 100
    ingress = await start_ingress([teapot.line("teapot")])
    host, port = ingress.wss_address
    hellos = _client_hellos(tls_files, count)
    socks = [socket.create_connection((host, port)) for _ in range(count)]
    try:
        # Accepted, each in its handshake, waiting for its ClientHello.
        await eventually(lambda: ingress.registry.handshaking == count)
        for sock, hello in zip(socks, hellos, strict=True):
            sock.sendall(hello)
        # The CPU of each loop turn (the thread's: a loaded host's waits for a
        # processor are not the loop's), while the ClientHellos are answered.
        loop = asyncio.get_running_loop()
        turns: list[float] = []
        done = loop.create_future()
        last = time.thread_time()

        def tick() -> None:
            nonlocal last
            now = time.thread_time()
            turns.append(now - last)
            last = now
            if len(turns) < 5000 and not done.done():
                loop.call_soon(tick)
            elif not done.done():
                done.set_result(None)

        loop.call_soon(tick)
        await asyncio.wait_for(done, 30)
        # Every one answered (its ServerHello in its socket), none dropped.
        await eventually(lambda: len(select.select(socks, [], [], 0)[0]) == count)
        assert {sock.recv(1) for sock in socks} == {b"\x16"}  # a handshake record
        assert max(turns) < 0.01, f"one loop turn took {max(turns) * 1000:.0f} ms of CPU"
    finally:
        for sock in socks:
            sock.close()
