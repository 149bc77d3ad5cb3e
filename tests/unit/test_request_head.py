"""The carrier request head check, driven with bytes (no sockets)."""

import pytest

from fleet_ingress.core.request_head import RequestHeadReader, RequestRefused, parse_request_head

UPGRADE = (
    b"GET /ws/bot-1?call=42&lang=en HTTP/1.1\r\n"
    b"Host: calls.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


def test_upgrade_head_parses_with_path_query_and_headers_in_order():
    head = parse_request_head(UPGRADE)
    assert head.method == b"GET"
    assert head.target == b"/ws/bot-1?call=42&lang=en"
    assert head.path == b"/ws/bot-1"
    assert head.host == b"calls.example.com"
    assert [k for k, _ in head.headers][:3] == [b"Host", b"Upgrade", b"Connection"]
    assert head.is_websocket_upgrade
    assert not head.has_body


def test_reader_waits_for_the_whole_head_and_keeps_bytes_after_it():
    reader = RequestHeadReader(16384)
    for i in range(0, len(UPGRADE) - 1, 7):
        assert reader.feed(UPGRADE[i : min(i + 7, len(UPGRADE) - 1)]) is None
    head = reader.feed(UPGRADE[-1:] + b"\x81\x05early")
    assert head is not None and head.trailing == b"\x81\x05early"
    assert reader.buffered == 0


@pytest.mark.parametrize(
    ("headers", "upgrade"),
    [
        (b"Upgrade: WebSocket\r\nConnection: UPGRADE\r\n", True),
        (b"Upgrade: websocket\r\nConnection: Upgrade\r\n", True),
        (b"Upgrade: websocket\r\n", False),
        (b"Connection: Upgrade\r\n", False),
        (b"Upgrade: h2c\r\nConnection: Upgrade\r\n", False),
        (b"Upgrade: websocket\r\nConnection: keep-alive\r\n", False),
    ],
)
def test_websocket_upgrade_detection_is_case_insensitive_and_needs_both(headers, upgrade):
    head = parse_request_head(b"GET /ws/x HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n")
    assert head.is_websocket_upgrade is upgrade


def test_a_post_is_not_an_upgrade():
    raw = UPGRADE.replace(b"GET", b"POST", 1)
    assert not parse_request_head(raw).is_websocket_upgrade


def _refusal(raw: bytes) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        reader = RequestHeadReader(16384)
        if reader.feed(raw) is None:
            pytest.fail("head was not judged")
    return info.value


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n", 400, "body"),
        (
            b"GET /ws/x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            400,
            "Content-Length",
        ),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "body"),
        (
            b"GET /ws/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "",
        ),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-A: a\r\n folded\r\n\r\n", 400, "folded"),
        (b"GET /ws/x HTTP/1.1\r\nHost : h\r\n\r\n", 400, "malformed"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400, "malformed"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX\x01A: a\r\n\r\n", 400, "malformed"),
        (b"GET /ws/\x00x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "malformed"),
        (b"GET /ws/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Host"),
        (b"GET /ws/x HTTP/1.1\r\n\r\n", 400, "Host"),
        (b"GET /ws/x HTTP/2.0\r\nHost: h\r\n\r\n", 400, "HTTP/1.1"),
        (b"GET /ws/x HTTP/1.1\nHost: h\n\n", 400, "CR"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400, ""),
        (b"GET http://fleet/ws/x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "origin-form"),
        (b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400, "origin-form"),
        (b"GET /ws/../attach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/%2e%2E/attach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/./x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"NOT A REQUEST\r\n\r\n", 400, "malformed"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nContent-Length: 0, 0\r\n\r\n", 400, "Content-Length"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-T: a\x01b\r\n\r\n", 400, "control"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-T: a\x7fb\r\n\r\n", 400, "control"),
        (b"GET /ws/x HTTP/1.1\r\nHost: a.test, b.test\r\n\r\n", 400, "Host"),
        (b"GET /ws/x HTTP/1.1\r\nHost: a.test/ws?\r\n\r\n", 400, "Host"),
        (b"GET /ws/x/..%2fattach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "encoded"),
        (b"GET /ws/x/%2E%2E%2Fattach HTTP/1.1\r\nHost: h\r\n\r\n", 400, ""),
        (b"GET /ws/..%2F..%2Flivekit/dispatch HTTP/1.1\r\nHost: h\r\n\r\n", 400, "encoded"),
        (b"GET /ws/x%5c..%5cattach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "encoded"),
        (b"GET /ws/bot%00.php HTTP/1.1\r\nHost: h\r\n\r\n", 400, "control character"),
        (b"GET /ws/x%0d%0aSet-Cookie:a HTTP/1.1\r\nHost: h\r\n\r\n", 400, "encoded"),
        (b"GET /ws/x%1F HTTP/1.1\r\nHost: h\r\n\r\n", 400, "encoded"),
        (b"GET /ws/x%7f HTTP/1.1\r\nHost: h\r\n\r\n", 400, "encoded"),
    ],
)
def test_ambiguous_or_malformed_heads_are_refused(raw, status, words):
    refused = _refusal(raw)
    assert refused.status == status
    assert words in refused.reason


def test_bare_lf_is_refused_before_the_head_ends():
    reader = RequestHeadReader(16384)
    with pytest.raises(RequestRefused) as info:
        reader.feed(b"GET /ws/x HTTP/1.1\nHost: h\n")
    assert info.value.status == 400


def test_a_head_over_the_limit_gets_431_without_waiting_for_its_end():
    reader = RequestHeadReader(1024)
    assert reader.feed(b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-Big: ") is None
    with pytest.raises(RequestRefused) as info:
        reader.feed(b"a" * 1100)
    assert info.value.status == 431


def test_a_complete_head_over_the_limit_gets_431():
    raw = b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 1100 + b"\r\n\r\n"
    with pytest.raises(RequestRefused) as info:
        RequestHeadReader(1024).feed(raw)
    assert info.value.status == 431


def test_a_head_at_the_limit_is_accepted():
    start = b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-Pad: "
    raw = start + b"a" * (1024 - len(start) - 4) + b"\r\n\r\n"
    assert len(raw) == 1024
    assert RequestHeadReader(1024).feed(raw) is not None


def test_dots_inside_a_segment_are_fine():
    head = parse_request_head(b"GET /ws/bot.v2..x/a.b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert head.path == b"/ws/bot.v2..x/a.b"


def test_a_head_trickled_byte_by_byte_is_read_whole():
    raw = b"GET /ws/x HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 8000 + b"\r\n\r\nafter"
    reader = RequestHeadReader(16384)
    results = [reader.feed(raw[i : i + 1]) for i in range(len(raw) - 5)]
    assert all(r is None for r in results[:-1])
    head = results[-1]
    assert head is not None and head.get(b"x-pad") == b"p" * 8000


def test_other_percent_encodings_in_the_path_are_kept():
    # Only '/', '\\', '.' and control characters are refused encoded; a bot name may hold
    # spaces, dashes or UTF-8 (and %2 followed by a letter but f or e is not a separator).
    raw = b"GET /ws/bot%20one%2D%C3%A9%2A HTTP/1.1\r\nHost: h\r\n\r\n"
    assert parse_request_head(raw).target == b"/ws/bot%20one%2D%C3%A9%2A"


def test_http_1_0_is_read_but_is_never_a_websocket_upgrade():
    # A monitor's probe may be HTTP/1.0 (without Host); a call cannot (RFC 6455 4.1).
    head = parse_request_head(
        b"GET /ws/x HTTP/1.0\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert head.http_version == b"1.0" and not head.is_websocket_upgrade
    assert parse_request_head(b"GET /haproxy-health HTTP/1.0\r\n\r\n").host == b""
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").http_version == b"1.1"


def test_query_string_may_hold_encoded_slashes():
    head = parse_request_head(b"GET /ws/x?next=%2Fa%2e HTTP/1.1\r\nHost: h\r\n\r\n")
    assert head.target == b"/ws/x?next=%2Fa%2e"


@pytest.mark.parametrize(
    "host", [b"calls.test", b"calls.test:443", b"[::1]:8443", b"127.0.0.1", b""]
)
def test_valid_hosts_and_tabs_in_values_pass(host):
    head = parse_request_head(b"GET /ws/x HTTP/1.1\r\nHost: " + host + b"\r\nX-T: a\tb\r\n\r\n")
    assert head.host == host and head.get(b"x-t") == b"a\tb"
