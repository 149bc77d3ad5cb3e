"""The oracle for a carrier's request head: what the ingress must do with any bytes.

Shared by the hypothesis property test (``tests/test_hostile_input.py``) and
the atheris harness (``fuzz/fuzz_request_head.py``), so that both check the
same invariants. No sockets.

- :func:`check_verdicts`: the bytes fed whole and fed in pieces get the same
  verdict: refused (400, or 431 only past the size or header-line limit),
  incomplete (no CRLF CRLF yet, within the limits), or the same head with the
  same bytes after it. Empty lines before the request line are skipped
  (RFC 9112 2.2), a few of them.
- :func:`check_accepted`: an HTTP/1.0 head is never a call; an HTTP/1.1 one
  goes to :func:`check_forwarded`.
- :func:`check_forwarded`: an accepted head forwards as exactly one head, no
  control character but HTAB inside a line, that h11 as the fleet's server and
  the ingress's own check both read back to the same method, target and
  route, with the carrier's headers but the documented rewrites (SPEC 3.2:
  Host replaced, X-Forwarded-* set, a carrier's other X-Forwarded-* dropped;
  RFC 9110 7.6.1: hop-by-hop dropped; and the underscore spellings of those
  names dropped).
- :func:`check_plain_read`: a head read without h11 (a plain one, see
  `request_head._plain_read`) is read as h11 reads it: the same method,
  target, headers and version, h11 raising nothing.
- :func:`build_head`: the fuzz harness's generator of heads, on a request-head
  template, driven by a fuzzer's bytes (atheris) or by a seeded
  :class:`RandomChoices` (the parity test of the two head readers).
"""

from __future__ import annotations

import random
import re
from typing import Any, Protocol

import h11

from fleet_ingress.core import request_head
from fleet_ingress.core.fleet_exchange import FleetExchange
from fleet_ingress.core.forwarding import fleet_request_headers
from fleet_ingress.core.request_head import (
    DEFAULT_MAX_HEADER_COUNT,
    HOSTLESS,
    MAX_LEADING_EMPTY_LINES,
    RequestHead,
    RequestHeadReader,
    RequestRefused,
    parse_request_head,
)
from fleet_ingress.core.routing import Router

# Set by the ingress, or hop-by-hop (and the proxy-* pair). Stated here on
# their own, not imported, so that a change to the ingress's sets shows up.
SET_BY_INGRESS = {b"host", b"connection", b"upgrade", b"x-real-ip"} | {
    b"x-forwarded-" + x for x in (b"for", b"proto", b"host")
}
# A carrier's claims the fleet must not read as the ingress's: dropped, never
# replaced (RFC 7239 Forwarded; an h2c upgrade's settings; below); and an expectation
# of a body a call does not have (a fleet's 100 Continue would precede its 101).
DROPPED = {b"forwarded", b"http2-settings", b"expect"} | {
    # ...and a carrier's other claims of its address, scheme, host or original URL
    # (nginx realip, Tornado's xheaders, IIS URL Rewrite: the one proxy's word).
    b"x-client-ip",
    b"true-client-ip",
    b"cf-connecting-ip",
    b"cf-connecting-ipv6",
    b"fastly-client-ip",
    b"x-cluster-client-ip",
    b"x-proxyuser-ip",
    b"client-ip",
    b"x-original-forwarded-for",
    b"forwarded-for",
    b"x-forwarded",
    b"x-originating-ip",
    b"x-remote-ip",
    b"x-remote-addr",
    b"x-scheme",
    b"x-url-scheme",
    b"front-end-https",
    b"x-original-host",
    b"x-host",
    b"x-original-url",
    b"x-rewrite-url",
}
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
    b"proxy-authenticate",
}
FLEET_HOST = "fleet-1.internal:8443"
CLIENT_IP = "203.0.113.7"
ROUTER = Router(["/ws/", "/exotel/"], "/haproxy-health")
# RFC 9110 field-vchar: inside a forwarded line, no control character but HTAB.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

Verdict = RequestHead | RequestRefused | None

# The template `build_head` fills. Index 0 of each list is the valid choice: an
# exhausted fuzzer input picks it.
METHODS = [b"GET", b"GET", b"POST", b"HEAD", b"get", b"CONNECT"]
PREFIXES = [
    b"/ws/", b"/exotel/", b"/", b"/haproxy-health", b"http://f/ws/", b"*",
    b"https://calls.test/ws/", b"http://calls.test:80/exotel/", b"https://calls.test:99999/",
]  # fmt: skip
SEGMENTS = [b"bot-1", b"x", b"", b".", b"..", b"%2e", b"%2f", b"..;", b"?a=/../b", b"/"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b""]
NAMES = [
    b"X-Trace", b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
    b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Authorization", b"X-Forwarded-For",
    b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Sec-WebSocket-Key", b"Content_Length",
]  # fmt: skip
VALUES = [b"a", b"websocket", b"Upgrade", b"keep-alive, Upgrade", b"0", b"chunked", b"calls.test"]
SEPARATORS = [b": ", b": ", b":", b" : ", b":\t"]
EOLS = [b"\r\n"] * 6 + [b"\n", b"\r"]


class Choices(Protocol):
    """What `build_head` draws from: the methods of atheris' FuzzedDataProvider it uses."""

    def ConsumeIntInRange(self, low: int, high: int) -> int: ...
    def PickValueInList(self, values: list[Any]) -> Any: ...
    def ConsumeBytes(self, count: int) -> bytes: ...
    def remaining_bytes(self) -> int: ...


class RandomChoices:
    """`Choices` from a seeded `random.Random`, not a fuzzer's bytes: the same
    heads every run, as many as asked for (the fuzzer's raw bytes and free
    pieces are random bytes here, of its lengths)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def ConsumeIntInRange(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def PickValueInList(self, values: list[Any]) -> Any:
        return self._rng.choice(values)

    def ConsumeBytes(self, count: int) -> bytes:
        return self._rng.randbytes(count)

    def remaining_bytes(self) -> int:
        return self._rng.randint(0, 96)


def build_head(choices: Choices) -> tuple[bytes, list[int], int, int]:
    """(the carrier's bytes, how to cut them, the head size limit, the header-line limit)."""
    pick = choices.PickValueInList
    limit = pick([16384, 16384, 16384, 256])
    max_lines = pick([100, 100, 100, 3])
    cuts = [choices.ConsumeIntInRange(1, 64) for _ in range(choices.ConsumeIntInRange(0, 6))]
    if choices.ConsumeIntInRange(0, 3) == 3:
        return choices.ConsumeBytes(choices.remaining_bytes()), cuts, limit, max_lines

    def piece(among: list[bytes], max_len: int = 16) -> bytes:
        if choices.ConsumeIntInRange(0, 3) != 3:
            return pick(among)
        return choices.ConsumeBytes(choices.ConsumeIntInRange(0, max_len))

    target = piece(PREFIXES) + b"/".join(
        piece(SEGMENTS) for _ in range(choices.ConsumeIntInRange(1, 3))
    )
    # RFC 9112 2.2: empty lines before the request line are skipped, a few of them.
    out = [b"\r\n" * pick([0, 0, 0, 1, 2, 9])]
    out += [piece(METHODS) + b" " + target + b" " + piece(VERSIONS) + piece(EOLS)]
    if not choices.ConsumeIntInRange(0, 3):
        out.append(b"Host: calls.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n")
    for _ in range(choices.ConsumeIntInRange(0, 8)):
        out.append(piece(NAMES) + piece(SEPARATORS) + piece(VALUES, 24) + piece(EOLS))
    out.append(b"\r\n" if choices.ConsumeIntInRange(0, 7) else piece(EOLS))
    out.append(choices.ConsumeBytes(choices.ConsumeIntInRange(0, 16)))  # bytes after the head
    return b"".join(out), cuts, limit, max_lines


def judge(
    limit: int, pieces: list[bytes], max_lines: int = DEFAULT_MAX_HEADER_COUNT
) -> tuple[Verdict, bytes]:
    """Feed pieces until a verdict: (verdict, the bytes after the head, unfed too)."""
    reader = RequestHeadReader(limit, max_lines)
    try:
        for i, piece in enumerate(pieces):
            head = reader.feed(piece)
            if head is not None:
                return head, head.trailing + b"".join(pieces[i + 1 :])
    except RequestRefused as refused:
        return refused, b""
    return None, b""


def cut(data: bytes, lengths: list[int]) -> list[bytes]:
    """`data` in pieces of these lengths, the rest as the last piece; no empty piece."""
    pieces, at = [], 0
    for length in lengths:
        pieces.append(data[at : at + length])
        at += length
    pieces.append(data[at:])
    return [p for p in pieces if p]


def _header_lines(head: bytes) -> int:
    """Header lines in a head, or so far in an incomplete one (bare LFs count too)."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return head.count(b"\n") - 1
    return head[: end + 4].count(b"\n") - 2


def check_verdicts(
    data: bytes, cuts: list[int], limit: int, max_lines: int = DEFAULT_MAX_HEADER_COUNT
) -> Verdict:
    """The verdict on `data`, checked to be the same when it arrives in pieces."""
    whole, _ = judge(limit, [data], max_lines)
    trickled, after = judge(limit, cut(data, cuts), max_lines)
    assert type(whole) is type(trickled), (whole, trickled)
    empty_lines = 0
    while data.startswith(b"\r\n", 2 * empty_lines):
        empty_lines += 1
    head = data[2 * empty_lines :]
    if isinstance(whole, RequestRefused):
        assert whole.status in (400, 431), whole.status
        assert isinstance(trickled, RequestRefused) and trickled.status in (400, 431)
        assert whole.status != 431 or len(head) > limit or _header_lines(head) > max_lines
        return whole
    assert empty_lines <= MAX_LEADING_EMPTY_LINES
    if whole is None:  # no CRLF CRLF yet: the request timeout answers it
        assert b"\r\n\r\n" not in head and len(head) <= limit
        assert _header_lines(head) <= max_lines
        return None
    assert isinstance(trickled, RequestHead)
    assert (trickled.method, trickled.target, trickled.headers) == (
        whole.method,
        whole.target,
        whole.headers,
    )
    assert whole.trailing == after == head[head.index(b"\r\n\r\n") + 4 :]
    assert _header_lines(head) <= max_lines and len(head) - len(after) <= limit
    return whole


def check_hostless(data: bytes, limit: int, max_lines: int = DEFAULT_MAX_HEADER_COUNT) -> None:
    """The carrier listener's parse (`refuse_hostless=False`, for the health route
    answers HAProxy's hostless check) reads a head as the strict parse does, but
    for an HTTP/1.1 head without Host: that one it may read, Host-less, a call
    machine's to refuse (`host_missing`), or refuse as well."""
    try:
        taken = RequestHeadReader(limit, max_lines).take(data)
    except RequestRefused:
        return
    if taken is None:
        return
    raw, trailing = taken
    strict: RequestHead | RequestRefused
    lenient: RequestHead | RequestRefused
    try:
        strict = parse_request_head(raw, trailing, refuse_body=False)
    except RequestRefused as refused:
        strict = refused
    try:
        lenient = parse_request_head(raw, trailing, refuse_body=False, refuse_hostless=False)
    except RequestRefused as refused:
        lenient = refused
    if isinstance(strict, RequestHead):
        assert isinstance(lenient, RequestHead), lenient
        assert (lenient.method, lenient.target, lenient.headers, lenient.http_version) == (
            strict.method,
            strict.target,
            strict.headers,
            strict.http_version,
        )
        assert not lenient.host_missing
    elif strict.reason != "malformed request: " + HOSTLESS:
        assert isinstance(lenient, RequestRefused), (strict.reason, lenient)
        assert (lenient.status, lenient.reason) == (strict.status, strict.reason)
    elif isinstance(lenient, RequestRefused):
        assert lenient.status == 400, lenient.status
    else:
        assert lenient.host_missing and lenient.http_version == b"1.1", lenient
        assert not lenient.get_all(b"host") and lenient.trailing == trailing


def check_plain_read(data: bytes, limit: int, max_lines: int = DEFAULT_MAX_HEADER_COUNT) -> None:
    """A head the fast path reads (as the reader takes it, and `data` whole) is
    read by h11 to the same method, target, headers and version, without an
    error: the checks after the read are the same code, so the verdict is too."""
    raws = [data]
    try:
        taken = RequestHeadReader(limit, max_lines).take(data)
    except RequestRefused:
        taken = None
    if taken is not None:
        raws.append(taken[0])
    for raw in raws:
        plain = request_head._plain_read(raw, raw.lower())
        if plain is not None:
            assert request_head._h11_request(raw) == plain, raw


def _by_name(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out


def check_accepted(head: RequestHead, max_head_bytes: int) -> bytes | None:
    """An accepted head: an HTTP/1.0 one is never a call, so never forwarded (the
    health route and port 80 answer it); an HTTP/1.1 one is checked as forwarded."""
    if head.http_version != b"1.1":
        assert head.http_version == b"1.0" and not head.is_websocket_upgrade, head
        return None
    return check_forwarded(head, max_head_bytes)


def check_forwarded(head: RequestHead, max_head_bytes: int) -> bytes:
    """What the fleet would get for `head`, checked; returns the bytes."""
    headers = fleet_request_headers(head, fleet_host=FLEET_HOST, client_ip=CLIENT_IP)
    exchange = FleetExchange(head.method, head.target, headers, max_head_bytes=max_head_bytes)
    sent = exchange.request_bytes
    # One head, nothing after it; no control character but HTAB inside any line.
    assert sent.endswith(b"\r\n\r\n") and sent.count(b"\r\n\r\n") == 1, sent
    for line in sent[:-4].split(b"\r\n"):
        assert not _CONTROL.search(line), line
    # h11 as the fleet's server reads one request, no body, nothing left over.
    fleet = h11.Connection(h11.SERVER)
    fleet.receive_data(sent)
    request = fleet.next_event()
    assert isinstance(request, h11.Request), request
    assert isinstance(fleet.next_event(), h11.EndOfMessage)
    assert fleet.trailing_data == (b"", False)
    assert (request.method, request.target, request.http_version) == (
        head.method,
        head.target,
        b"1.1",
    )
    got = [(bytes(k), bytes(v)) for k, v in request.headers.raw_items()]
    # Same headers as the carrier's, in order and casing, but the documented rewrites.
    # A name's underscore spelling of a header the ingress sets or drops is dropped too
    # (a WSGI/CGI fleet reads X_Forwarded_For as X-Forwarded-For).
    dropped = SET_BY_INGRESS | HOP_BY_HOP | DROPPED
    # ...and of a header the ingress judges the head by (Content-Length is forwarded).
    underscore_dropped = dropped | {b"content-length"}
    named = head.tokens(b"connection")

    def is_dropped(name: bytes) -> bool:
        lower = name.lower()
        if lower in named or lower in dropped:
            return True
        # The X-Forwarded-* family is the ingress's to say (any spelling); the carrier's
        # X-Forwarded-For chain is kept in ours (checked below).
        if lower.replace(b"_", b"-").startswith(b"x-forwarded-"):
            return True
        return b"_" in lower and lower.replace(b"_", b"-") in underscore_dropped

    assert [(k, v) for k, v in got if k.lower() not in SET_BY_INGRESS] == [
        (k, v) for k, v in head.headers if not is_dropped(k)
    ], (got, head)
    by_name = _by_name(got)
    prior = [v.strip() for v in head.get_all(b"x-forwarded-for") if v.strip()]
    assert by_name[b"host"] == [FLEET_HOST.encode()]
    assert by_name[b"x-forwarded-for"] == [b", ".join([*prior, CLIENT_IP.encode()])]
    assert by_name[b"x-forwarded-proto"] == [b"https"]
    assert by_name[b"x-forwarded-host"] == [head.host]
    assert by_name[b"x-real-ip"] == [CLIENT_IP.encode()]
    assert by_name[b"connection"] == [b"Upgrade"]
    assert by_name[b"upgrade"] == [b"websocket"]  # whatever else the carrier asked
    assert not (HOP_BY_HOP - {b"connection", b"upgrade"}) & by_name.keys()
    assert not DROPPED & {k.lower().replace(b"_", b"-") for k in by_name}
    # The ingress's own check reads it the same way, to the same route.
    again = parse_request_head(sent)
    assert (again.method, again.target) == (head.method, head.target)
    assert ROUTER.route(again.path.decode("latin-1")) == ROUTER.route(head.path.decode("latin-1"))
    # A call keeps its handshake (RFC 6455 4.1): the ingress refuses a head whose
    # Connection names one of its fields, and forwards the rest of them all.
    handshake = {b"sec-websocket-" + x for x in (b"key", b"version", b"protocol", b"extensions")}
    assert (head.handshake_field_named_by_connection is None) == (not named & handshake), head
    if head.is_websocket_upgrade and not named & handshake:
        for field in handshake:
            assert by_name.get(field, []) == head.get_all(field), (field, got, head)
    # A call stays a call. (A head that is no upgrade, such as `Upgrade: websocket` without
    # `Connection: Upgrade`, gets 400 and is never forwarded; the rewrite always says
    # `Connection: Upgrade`, so it is checked here for its other invariants only.)
    if head.is_websocket_upgrade:
        assert again.is_websocket_upgrade
    return sent
