"""The carrier request head check, driven with bytes (no sockets)."""

import random

import pytest

from fleet_ingress.core.request_head import (
    RequestHead,
    RequestHeadReader,
    RequestRefused,
    comma_tokens,
    parse_request_head,
)

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


@pytest.mark.parametrize(
    ("lines", "key"),
    [
        (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Key:   AQIDBAUGBwgJCgsMDQ4PEA== \r\n", b"AQIDBAUGBwgJCgsMDQ4PEA=="),
        (b"", None),
        (b"Sec-WebSocket-Key: \r\n", None),
        (b"Sec-WebSocket-Key: k==\r\n", None),  # not 16 bytes
        (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n", None),  # padding cut
        (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==x\r\n", None),
        (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q==\r\n", None),
        (b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n", None),  # 24 bytes
        (  # two keys: which one would the fleet answer?
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n",
            None,
        ),
    ],
)
def test_a_websocket_key_is_one_of_16_bytes_in_base64(lines, key):
    raw = b"GET /ws/x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    assert parse_request_head(raw + lines + b"\r\n").websocket_key == key


@pytest.mark.parametrize(
    ("connection", "named"),
    [
        (b"Upgrade", None),
        # What a carrier may name as its own hop's: it is dropped before the fleet.
        (b"keep-alive, Upgrade, X-Trace", None),
        (b"Upgrade, Host, Origin", None),
        (b"Upgrade, Sec-WebSocket-Key", "Sec-WebSocket-Key"),
        (b"Upgrade,sec-websocket-version", "Sec-WebSocket-Version"),
        (b"SEC-WEBSOCKET-PROTOCOL, Upgrade", "Sec-WebSocket-Protocol"),
        (b"Upgrade, Sec-WebSocket-Extensions", "Sec-WebSocket-Extensions"),
        (b"Sec-WebSocket-Protocol, Upgrade, Sec-WebSocket-Key", "Sec-WebSocket-Key"),
        (b"Upgrade, Sec-WebSocket-Keys", None),  # no handshake field: its own to drop
    ],
)
def test_a_connection_header_naming_a_websocket_handshake_field_is_seen(connection, named):
    raw = UPGRADE.replace(b"Connection: keep-alive, Upgrade", b"Connection: " + connection)
    head = parse_request_head(raw)
    assert head.is_websocket_upgrade and head.websocket_key is not None
    assert head.handshake_field_named_by_connection == named


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
        (b"GET http://fleet/ws/x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "differs from Host"),
        (b"GET ftp://h/ws/x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "absolute-form"),
        (b"GET https://u:p@h/ws/x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "authority"),
        (b"GET https:///ws/x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "authority"),
        (b"GET https://h:70000/ws/x HTTP/1.1\r\nHost: h:70000\r\n\r\n", 400, "authority"),
        (b"GET https://h/ws/x HTTP/1.1\r\n\r\n", 400, "Host"),
        (b"GET https://h/ws/../attach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 400, "origin-form"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h:99999999\r\n\r\n", 400, "Host"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h:65536\r\n\r\n", 400, "Host"),
        (b"GET /ws/x HTTP/1.1\r\nHost: h:https\r\n\r\n", 400, "Host"),
        (b"GET /ws/x HTTP/1.1\r\nHost: [::1]:99999\r\n\r\n", 400, "Host"),
        # More digits than int() converts (4300): refused, not a ValueError out of the parse.
        (b"GET /ws/x HTTP/1.1\r\nHost: h:" + b"9" * 5000 + b"\r\n\r\n", 400, "Host"),
        (b"GET https://h:" + b"1" * 5000 + b"/ws/x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "authority"),
        (b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400, "origin-form"),
        (b"GET /ws/../attach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/%2e%2E/attach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/./x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/..;/attach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/x/..;v=1/..;/attach HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/.;/x HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
        (b"GET /ws/x/..; HTTP/1.1\r\nHost: h\r\n\r\n", 400, "segments"),
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


@pytest.mark.parametrize(
    ("raw", "head_only"),
    [
        (b"HEAD /ws/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n", True),
        (b"HEAD /ws/a/../b HTTP/1.1\r\nHost: h\r\n\r\n", True),
        (b"HEAD /ws/x HTTP/1.1\r\nHost: a b\r\n\r\n", True),
        (b"GET /ws/a/../b HTTP/1.1\r\nHost: h\r\n\r\n", False),
        # Not read far enough to know the method: a body with the 400.
        (b"HEAD /ws/x HTTP/1.1\r\nHost : h\r\n\r\n", False),
    ],
)
def test_a_head_request_refused_is_answered_without_a_body(raw, head_only):
    assert _refusal(raw).head_only is head_only  # RFC 9110 9.3.2


def test_a_body_is_left_to_the_caller_when_it_routes_first():
    raw = b"POST /haproxy-health HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n"
    assert _refusal(raw).reason == "a request with a body is not served"
    head = parse_request_head(raw, b"ok", refuse_body=False)
    assert head.has_body and head.trailing == b"ok"
    # The other checks stand.
    with pytest.raises(RequestRefused, match="Content-Length"):
        parse_request_head(
            raw.replace(b"\r\n\r\n", b"\r\nContent-Length: 2\r\n\r\n"), refuse_body=False
        )


# HAProxy 2.6's `option httpchk GET /haproxy-health HTTP/1.1`, byte for byte.
HAPROXY_CHECK = b"GET /haproxy-health HTTP/1.1\r\nconnection: close\r\n\r\n"


def test_an_http_1_1_head_without_host_is_left_to_the_caller_when_it_routes_first():
    # RFC 9112 3.2 has it 400, but the health route answers HAProxy's own check.
    assert _refusal(HAPROXY_CHECK).reason == "malformed request: Missing mandatory Host: header"
    head = parse_request_head(HAPROXY_CHECK, b"x", refuse_hostless=False)
    assert (head.method, head.target, head.http_version) == (b"GET", b"/haproxy-health", b"1.1")
    assert head.headers == [(b"connection", b"close")] and head.trailing == b"x"
    assert head.host_missing and head.host == b""
    assert not parse_request_head(UPGRADE).host_missing
    assert not parse_request_head(b"GET / HTTP/1.0\r\n\r\n").host_missing


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b"GET /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "Content-Length"),
        (b"GET /x HTTP/1.1\r\nX: a\x01b\r\n\r\n", "control character"),
        (b"GET /ws/../x HTTP/1.1\r\n\r\n", "'..' segments"),
        (b"GET * HTTP/1.1\r\n\r\n", "origin-form"),
        (b"GET https://calls.test/haproxy-health HTTP/1.1\r\n\r\n", "differs from Host"),
        (b"GET /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"GET /x HTTP/1.1\r\nX : a\r\n\r\n", "illegal header line"),
    ],
)
def test_a_head_without_host_gets_every_other_check(raw, said):
    with pytest.raises(RequestRefused, match=said):
        parse_request_head(raw, refuse_body=False, refuse_hostless=False)


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


def test_a_head_refused_as_it_is_read_names_what_came_of_its_first_line():
    """For the log line of a 431 or a 408 (the audit of session 30: target "")."""
    reader = RequestHeadReader(1024)
    assert reader.first_line() == ""
    assert reader.feed(b"\r\nGET /ws/bot-\xc3") is None
    assert reader.first_line() == "GET /ws/bot-\\xc3"  # escaped, cut short as it came
    reader.feed(b" HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 300)
    assert reader.first_line() == "GET /ws/bot-\\xc3 HTTP/1.1"
    with pytest.raises(RequestRefused):
        reader.feed(b"a" * 1100)
    assert reader.first_line() == "GET /ws/bot-\\xc3 HTTP/1.1"


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
    "host",
    [
        *(b"calls.test", b"calls.test:443", b"[::1]:8443", b"127.0.0.1", b"", b"h:65535"),
        *(b"h:", b"h:000443", b"h:0"),
    ],
)
def test_valid_hosts_and_tabs_in_values_pass(host):
    head = parse_request_head(b"GET /ws/x HTTP/1.1\r\nHost: " + host + b"\r\nX-T: a\tb\r\n\r\n")
    assert head.host == host and head.get(b"x-t") == b"a\tb"


# -- header-line limit: counted as the bytes arrive, before any parsing ------------------


def _with_headers(count: int) -> bytes:
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(count - 1))
    return b"GET /ws/x HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n"


def test_a_head_with_the_most_header_lines_allowed_is_accepted():
    head = RequestHeadReader(16384, 100).feed(_with_headers(100))
    assert head is not None and len(head.headers) == 100


def test_one_header_line_over_the_limit_gets_431_naming_the_limit():
    with pytest.raises(RequestRefused) as info:
        RequestHeadReader(16384, 100).feed(_with_headers(101))
    assert info.value.status == 431
    assert "more than 100 header lines" in info.value.reason


def test_header_lines_over_the_limit_get_431_before_the_head_ends():
    # 4,000 tiny lines fit in 16 KiB; they are refused as they arrive, not parsed.
    reader = RequestHeadReader(16384, 100)
    assert reader.feed(b"GET /ws/x HTTP/1.1\r\nHost: h\r\n") is None
    assert reader.feed(b"a:\r\n" * 99) is None
    with pytest.raises(RequestRefused) as info:
        reader.feed(b"a:\r\n")
    assert info.value.status == 431


def test_header_lines_are_counted_the_same_however_the_bytes_arrive():
    raw = _with_headers(100) + b"\x81\x05after\n\n\n"  # LFs after the head are not counted
    for size in (1, 2, 3, 7, 64, len(raw)):
        reader = RequestHeadReader(16384, 100)
        head = None
        for i in range(0, len(raw), size):
            if (head := reader.feed(raw[i : i + size])) is not None:
                break
        assert head is not None and len(head.headers) == 100, size
    with pytest.raises(RequestRefused):
        reader = RequestHeadReader(16384, 100)
        for i in range(len(_with_headers(101))):
            reader.feed(_with_headers(101)[i : i + 1])


def test_the_reader_starts_afresh_after_a_head():
    reader = RequestHeadReader(16384, 3)
    assert reader.feed(_with_headers(3)) is not None
    assert reader.feed(_with_headers(3)) is not None


# -- RFC 9112 details ----------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [[b"\r\n" + UPGRADE], [b"\r\n\r\n\r", b"\n" + UPGRADE]])
def test_empty_lines_before_the_request_line_are_ignored(pieces):
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request line.
    reader = RequestHeadReader(16384)
    heads = [reader.feed(p) for p in pieces]
    assert heads[:-1] == [None] * (len(pieces) - 1)
    assert heads[-1] is not None and heads[-1].target == b"/ws/bot-1?call=42&lang=en"


def test_many_empty_lines_before_the_request_line_are_refused():
    reader = RequestHeadReader(16384)
    assert reader.feed(b"\r\n" * 8) is None
    with pytest.raises(RequestRefused) as info:
        reader.feed(b"\r\n")
    assert info.value.status == 400 and "empty lines" in info.value.reason


@pytest.mark.parametrize(
    ("target", "host", "origin"),
    [
        (b"https://calls.example.com/ws/bot?x=1", b"calls.example.com", b"/ws/bot?x=1"),
        (b"HTTPS://Calls.Example.com:443/ws/bot", b"calls.example.com", b"/ws/bot"),
        (b"http://calls.example.com/ws/bot", b"calls.example.com:80", b"/ws/bot"),
        (b"wss://[::1]:8443/exotel/b", b"[::1]:8443", b"/exotel/b"),
        (b"https://calls.example.com", b"calls.example.com", b"/"),
        (b"https://calls.example.com?q", b"calls.example.com", b"/?q"),
    ],
)
def test_an_absolute_form_target_is_accepted_as_its_origin_form(target, host, origin):
    # RFC 9112 3.2.2: a server MUST accept the absolute-form; the fleet gets origin-form.
    head = parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert head.target == origin
    assert head.host == host


@pytest.mark.parametrize(
    ("line", "said"),
    [
        (b"GET /ws/" + b"x" * 9000 + b"  HTTP/1.1", "malformed request: illegal request line"),
        (b"GET /ws/x HTTP/1.1\r\nX: " + b"\0" * 14000, "malformed request: illegal header line"),
        (b"GET /ws/x HTTP/1.1\r\nBad Name: v", "malformed request: illegal header line"),
    ],
)
def test_a_refusal_names_the_fault_without_echoing_the_carriers_bytes(line: bytes, said: str):
    """h11 quotes the offending line in its message; the answer and the log
    line keep its reason only (a 14 KiB head once got a 56 KiB answer)."""
    with pytest.raises(RequestRefused) as refused:
        parse_request_head(line + b"\r\nHost: a\r\n\r\n")
    assert refused.value.status == 400
    assert str(refused.value) == said


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"https://[0::1]:8443/ws/b", b"[::1]:8443"),
        (b"wss://[::1]:8443/ws/b", b"[0:0:0:0:0:0:0:1]:8443"),
        (b"https://[2001:DB8::1]/ws/b", b"[2001:db8:0::1]:443"),
        (b"https://calls.example.com:0443/ws/b", b"calls.example.com"),
        (b"https://calls.example.com:/ws/b", b"calls.example.com:443"),
    ],
)
def test_an_absolute_form_authority_is_compared_with_host_as_an_address(target, host):
    # Before: compared as text, `https://[0::1]:P` against `Host: [::1]:P` was a 400.
    head = parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert head.target == b"/ws/b" and head.host == host


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"https://[::1]:8443/ws/b", b"[::2]:8443"),
        (b"https://[::1]:8443/ws/b", b"[::1]:9443"),
        (b"https://[::1]/ws/b", b"[::1]:80"),
        (b"http://calls.example.com/ws/b", b"calls.example.com:443"),
        (b"https://a.example.com/ws/b", b"b.example.com"),
        (b"https://[::1]:8443/ws/b", b"::1:8443"),
    ],
)
def test_an_absolute_form_authority_naming_another_address_is_still_refused(target, host):
    with pytest.raises(RequestRefused) as refused:
        parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert refused.value.status == 400


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"https://calls.example.com:" + b"0" * 5000 + b"443/ws/b", b"calls.example.com"),
        (b"https://calls.example.com/ws/b", b"calls.example.com:" + b"0" * 5000 + b"443"),
        (b"https://calls.example.com:" + b"0" * 5000 + b"/ws/b", b"calls.example.com:0"),
    ],
)
def test_an_authority_port_with_thousands_of_leading_zeros_is_read_as_its_number(target, host):
    # Before: int() of more than 4,300 digits raised ValueError out of the parse (a
    # traceback logged as "request head parse failed" for every such head a stranger sent).
    head = parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert head.target == b"/ws/b"
    with pytest.raises(RequestRefused) as refused:
        parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
    assert refused.value.status == 400


@pytest.mark.parametrize("length", [b"00", b"000", b" 00 "])
def test_a_zero_length_with_leading_zeros_is_a_length_of_zero(length):
    """Content-Length: 00 is 1*DIGIT and means 0 (RFC 9110 8.6): it was refused
    "a request with a body" on a call route, then (earlier in session 35)
    "malformed", and the health route, which answers any method, 400. It is
    no body, as 0 is; 007 is one."""
    raw = b"GET /ws/x HTTP/1.1\r\nHost: h\r\nContent-Length: " + length + b"\r\n\r\n"
    assert not parse_request_head(raw).has_body
    assert not parse_request_head(raw, refuse_body=False).has_body
    assert not parse_request_head(raw.replace(length, b"0")).has_body
    assert _refusal(raw.replace(length, b"007")).reason == "a request with a body is not served"


def test_a_header_s_tokens_are_made_once_a_head_and_cannot_be_changed(monkeypatch):
    # A call reads Connection's tokens three times (the upgrade, the handshake
    # fields it names, the headers forwarded): made once, shared, so frozen.
    from fleet_ingress.core import request_head

    made = []
    real = request_head.comma_tokens
    monkeypatch.setattr(request_head, "comma_tokens", lambda values: made.append(1) or real(values))
    head = parse_request_head(UPGRADE)
    connection = head.tokens(b"connection")
    assert head.is_websocket_upgrade and head.handshake_field_named_by_connection is None
    assert head.tokens(b"connection") is connection == {b"keep-alive", b"upgrade"}
    # Connection's ("keep-alive, upgrade"), once; Upgrade's one token is read
    # without it (session 49: `test_a_headers_tokens_are_comma_tokens_whatever_its_values`).
    assert len(made) == 1
    with pytest.raises(AttributeError):
        connection.add(b"sec-websocket-key")  # type: ignore[attr-defined]


def test_a_headers_tokens_are_comma_tokens_whatever_its_values() -> None:
    """`RequestHead.tokens` reads one comma-free value without `comma_tokens`
    (session 49): the same tokens, for values with OWS, case, commas, empty
    ones and repeats, one value or several."""
    rng = random.Random(49)
    alphabet = [b"a", b"B", b",", b" ", b"\t", b"upgrade", b"Keep-Alive", b""]
    for _ in range(2000):
        values = [
            b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
            for _ in range(rng.choice([1, 1, 1, 2, 3]))
        ]
        head = RequestHead(b"GET", b"/ws/x", [(b"Connection", value) for value in values])
        assert head.tokens(b"connection") == comma_tokens(values), values
        assert head.tokens(b"connection") is head.tokens(b"connection")  # made once
