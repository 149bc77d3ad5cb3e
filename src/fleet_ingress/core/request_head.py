"""The carrier's request head: read, check and parse, with no I/O.

Bytes go in through `RequestHeadReader.feed()`; out comes a `RequestHead` once
the head is complete, or a `RequestRefused` carrying the status to answer
(400, 431). The size and the number of header lines are bounded while the
bytes arrive, before any parsing: a parse costs the event loop time in
proportion to the lines, and every live call shares that loop. h11 does the
HTTP/1.1 grammar. On top of it we refuse what h11
tolerates but a proxy must not forward: a fleet's nginx may read an ambiguous
head differently from us (request smuggling), so anything ambiguous is refused,
never repaired.

A plain head (`_plain_read`: HTTP/1.1, CRLF line ends, every line fullmatching
h11's own grammar, one Host, no Content-Length or Transfer-Encoding, which h11
checks and normalizes, no control byte) is read without h11, by a regular
expression built from that grammar (its header line in a form that costs one
compare a byte, see `_PLAIN_HEAD`) and a split at the colons: h11 read a call's
head in about 600 lines of Python, half of what a churned call's head cost
(issue #13). h11 reads such a head to the
same method, target, headers and version, and raises nothing on it; every other
head (a fold, a bare LF, HTTP/1.0, no Host, a Content-Length, anything the
grammar does not match) is read by h11, as it always was. Both are then checked
by the same code, so a verdict never depends on which read the head
(tests/unit/test_request_head_parity.py).
"""

from __future__ import annotations

import codecs
import ipaddress
import re
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import NamedTuple

import h11

from fleet_ingress.core.h11_grammar import FIELD_NAME, METHOD, REQUEST_TARGET

Header = tuple[bytes, bytes]

# A head line that starts with SP/HTAB continues the previous one (obs-fold,
# RFC 9112 section 5.2). h11 unfolds it; we refuse it, as the RFC allows.
_OBS_FOLD = re.compile(rb"\r\n[ \t]")
# A bare CR or LF is found by counting (CRs and LFs against CRLFs): a regex
# with a look-behind has no literal to skip to, so it steps through a 16 KiB
# head byte by byte.
_HEAD_END = b"\r\n\r\n"
# Bytes are searched here with `find(...) >= 0`, not `in`: CPython 3.11's `in`
# on bytes first tries its operand as an integer (a byte), and makes, formats and
# clears a TypeError before it searches: about 2,500 instructions each, 7 a
# call's head and fleet request (callgrind), a search of a head line some 50.
# h11 merges repeated identical Content-Length headers, and "0, 0" lists: we
# must see both, to refuse them rather than repair them. Looked for in the
# lowercased head once h11 has read it, so no space can precede the colon.
_CONTENT_LENGTH_LINE = b"\r\ncontent-length:"
# h11 refuses only NUL, CR and LF in values; a fleet may read the other
# controls differently from us. HTAB stays allowed (RFC 9110 field-vchar rules).
# Looked for once over the raw head, not per value: h11 has already refused them
# in the request line and in names, and a CR or LF not in a CRLF before that.
CONTROLS = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# Every byte but those controls, CR and LF: deleted from a head (`bytes.translate`,
# one pass in C) they leave its controls and line ends, in order, a few hundred
# bytes. A regular expression's search for a control stepped through a 16 KiB head
# at ~50 instructions a byte (0.85 M), translate at ~9.
_TEXT = bytes(sorted(set(range(256)) - set(CONTROLS) - set(b"\r\n")))
# RFC 9112 3.2: a Host that is not uri-host[:port] gets 400 (and so does a
# port a TCP connection cannot have: a fleet reading "99999999" modulo 2^16
# would see another port than we do).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+;=]*)(?::([0-9]*))?")
_MAX_PORT = 65535
_MAX_PORT_DIGITS = len(str(_MAX_PORT))
# RFC 9112 3.2.2: a server MUST accept the absolute-form ("GET https://host/ws/x").
# Its authority is kept to compare with Host; the path and query go on as origin-form.
_ABSOLUTE_FORM = re.compile(rb"(?i:(https?|wss?))://([^/?]*)([^?]*)(\?.*)?", re.DOTALL)
_DEFAULT_PORTS = {b"http": b"80", b"ws": b"80", b"https": b"443", b"wss": b"443"}
# RFC 6455 4.1: a nonce of 16 bytes, base64-encoded (24 characters, "==" last).
_WEBSOCKET_KEY = re.compile(rb"[A-Za-z0-9+/]{22}==")
# The handshake's fields (RFC 6455 4.1, 11.3), for the fleet that answers them: the
# key (its accept value), the version, the subprotocols and extensions it chooses
# from. Named by Connection, they would be dropped on the way as hop-by-hop (RFC 9110
# 7.6.1): a fleet refuses a keyless or versionless upgrade with its own 400, and
# chooses no subprotocol the carrier asked for. Looked for in this order.
_HANDSHAKE_FIELDS = {
    b"sec-websocket-key": "Sec-WebSocket-Key",
    b"sec-websocket-version": "Sec-WebSocket-Version",
    b"sec-websocket-protocol": "Sec-WebSocket-Protocol",
    b"sec-websocket-extensions": "Sec-WebSocket-Extensions",
}
# RFC 6455 4.1, 4.2.2: the WebSocket version a handshake asks for, the one there is.
WEBSOCKET_VERSION = b"13"
# RFC 9112 2.2: a server SHOULD ignore at least one empty line (CRLF) before the
# request line (clients that end a body with an extra CRLF). A few, not a stream.
MAX_LEADING_EMPTY_LINES = 8
# "." or ".." as a path segment, literally or percent-encoded: a fleet's
# nginx normalizes them, so "/ws/../attach" would reach a route the ingress
# refuses. Nothing legitimate on a call route needs them. With path parameters
# too ("..;", "..;x=1"): a Java servlet container (Tomcat, Jetty: a Spring
# fleet) drops a segment's parameters before it resolves dot segments, so
# "/ws/..;/attach" was forwarded and served as /attach.
_DOT_SEGMENT = re.compile(rb"/(?:\.|%2e){1,2}(?:;[^/]*)?(?:/|$)", re.IGNORECASE)
# nginx decodes %2F before it resolves dot segments, so "/ws/x/..%2fattach"
# reaches /attach. Encoded '/', '\\' and '.' have no business in a call path,
# nor have encoded control characters: "%00" truncates a path in C code and
# "%0d%0a" splits the lines of a fleet's log or redirect.
_ENCODED_FORBIDDEN = re.compile(rb"%(?:2f|5c|2e|[01][0-9a-f]|7f)", re.IGNORECASE)


def comma_tokens(values: Iterable[bytes]) -> set[bytes]:
    """The comma-separated tokens of header values (Connection, Upgrade...),
    lowercased, without empty ones."""
    # One lower() per value and one strip() per token: a 16 KiB list of tokens
    # is read on every head (Connection, twice), so this is on the loop's clock.
    found: set[bytes] = set()
    for value in values:
        found.update({t.strip(b" \t") for t in value.lower().split(b",")})
    found.discard(b"")
    return found


class RequestRefused(Exception):
    """The head cannot be served: answer `status` with `reason` and close.
    `head_only` when the head read as a HEAD request: the answer has no body
    (RFC 9110 9.3.2)."""

    def __init__(self, status: int, reason: str, *, head_only: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.head_only = head_only


class RequestHead:
    """A parsed head: its method, target, headers (names in the carrier's casing,
    in order), the bytes after it, and its version (b"1.1", or b"1.0": a monitor's
    probe, never a call). Not changed once made (nothing assigns to it).

    A slotted class with its own `__init__`, not a frozen dataclass: the frozen
    one set each of its seven attributes by `object.__setattr__` and ran a
    `__post_init__`, 24k instructions a call's head (callgrind, session 48)."""

    __slots__ = ("_by_name", "_tokens", "headers", "http_version", "method", "target", "trailing")

    method: bytes
    target: bytes
    headers: list[Header]
    trailing: bytes
    http_version: bytes
    # Each lowercased name's values, in order, made once: a head is looked up
    # about twelve times a call. A name's values are a 1-tuple when no name is
    # repeated (a call's head: one comprehension), a list when one is.
    _by_name: dict[bytes, Sequence[bytes]]
    # Each comma-list header's tokens (`tokens`), made at its first look: a call
    # reads Connection's three times (the upgrade, the handshake fields it names,
    # the headers forwarded), about 6,000 instructions each (callgrind).
    _tokens: dict[bytes, frozenset[bytes]]

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[Header],
        trailing: bytes = b"",
        http_version: bytes = b"1.1",
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.trailing = trailing
        self.http_version = http_version
        # A comprehension: 8k instructions a call's head, where the same dict made
        # by `map`s and `zip`s in C cost 15k (callgrind, session 49).
        by_name: dict[bytes, Sequence[bytes]] = {key.lower(): (value,) for key, value in headers}
        if len(by_name) < len(headers):  # a name repeated: its values, in order
            repeated: dict[bytes, list[bytes]] = {}
            for key, value in headers:
                repeated.setdefault(key.lower(), []).append(value)
            by_name = dict(repeated)
        self._by_name = by_name
        self._tokens = {}

    def __repr__(self) -> str:
        return (
            f"RequestHead(method={self.method!r}, target={self.target!r}, "
            f"headers={self.headers!r}, http_version={self.http_version!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestHead):
            return NotImplemented
        return (self.method, self.target, self.headers, self.trailing, self.http_version) == (
            other.method,
            other.target,
            other.headers,
            other.trailing,
            other.http_version,
        )

    __hash__ = None  # type: ignore[assignment]  # (its headers are a list, as before)

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    def _values(self, name: bytes) -> Sequence[bytes]:
        """`name`'s values, not copied; the name lowercased only when it is not
        found as given (the callers' names are lowercase already)."""
        by_name = self._by_name
        return by_name.get(name) or by_name.get(name.lower(), ())

    def get_all(self, name: bytes) -> list[bytes]:
        return list(self._values(name))

    def get(self, name: bytes) -> bytes | None:
        values = self._values(name)
        return values[0] if values else None

    def tokens(self, name: bytes) -> frozenset[bytes]:
        """The comma-separated tokens of every `name` header, lowercased."""
        found = self._tokens.get(name)
        if found is None:
            values = self._values(name)
            if len(values) == 1 and values[0].find(b",") < 0:
                # One value, one token (a call's Upgrade and Connection), as
                # `comma_tokens` reads it, without its set comprehension: a call's
                # `_local_answer` 42.0k -> 36.3k instructions (callgrind, session 49).
                token = values[0].lower().strip(b" \t")
                found = frozenset((token,)) if token else frozenset()
            else:
                found = frozenset(comma_tokens(values))
            self._tokens[name] = found
        return found

    @property
    def host(self) -> bytes:
        hosts = self._by_name.get(b"host")
        return hosts[0] if hosts else b""

    @property
    def host_missing(self) -> bool:
        """An HTTP/1.1 head without Host (RFC 9112 3.2: 400), read for the health
        route only (`parse_request_head(refuse_hostless=False)`)."""
        return self.http_version == b"1.1" and b"host" not in self._by_name

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == b"GET"
            and self.http_version == b"1.1"  # RFC 6455 4.1
            and b"websocket" in self.tokens(b"upgrade")
            and b"upgrade" in self.tokens(b"connection")
        )

    @property
    def websocket_key(self) -> bytes | None:
        """The one Sec-WebSocket-Key, when it is 16 bytes in base64 (RFC 6455
        4.1: a server answers 400 otherwise); None when there is none, several,
        or not such a key."""
        keys = self._by_name.get(b"sec-websocket-key", ())
        if len(keys) != 1:
            return None
        key = keys[0].strip(b" \t")
        return key if _WEBSOCKET_KEY.fullmatch(key) else None

    @property
    def websocket_version_13(self) -> bool:
        """Whether the upgrade asks for WebSocket version 13, the only one
        (RFC 6455 4.1: every browser and carrier library since 2011; older
        drafts said 7 or 8). Its one Sec-WebSocket-Version, "13"."""
        versions = self._by_name.get(b"sec-websocket-version", ())
        return len(versions) == 1 and versions[0].strip(b" \t") == WEBSOCKET_VERSION

    @property
    def handshake_field_named_by_connection(self) -> str | None:
        """A WebSocket handshake field the Connection header names (and so would
        have dropped before the fleet), or None: Connection may name the Upgrade
        header, Keep-Alive, a carrier's own field, but not what the fleet must read
        to answer the upgrade."""
        named = self.tokens(b"connection")
        if named.isdisjoint(_HANDSHAKE_FIELDS):  # a call's head: no generator made
            return None
        return next((said for name, said in _HANDSHAKE_FIELDS.items() if name in named), None)

    @property
    def has_body(self) -> bool:
        by_name = self._by_name
        if b"transfer-encoding" in by_name:
            return True
        # 1*DIGIT (RFC 9110 8.6), as h11 checked: "00" is a length of 0 too, not
        # a body (it was refused "a request with a body": the review of session 35).
        lengths = by_name.get(b"content-length")
        return lengths is not None and any(value.strip().lstrip(b"0") for value in lengths)


DEFAULT_MAX_HEADER_COUNT = 100
BODY_REFUSED = "a request with a body is not served"
# What h11 says of an HTTP/1.1 head without Host (RFC 9112 3.2: a server MUST
# answer it 400). HAProxy's own check sends one (`option httpchk GET
# /haproxy-health HTTP/1.1`: no Host), and HAProxy answered it: so does the
# health route; every other route refuses it (the call machine).
HOSTLESS = "Missing mandatory Host: header"


class RequestHeadReader:
    """Accumulates bytes until one complete, acceptable request head.

    `feed()` returns None while more bytes are needed, the `RequestHead` once
    complete, or raises `RequestRefused`. Nothing is buffered past
    `max_head_bytes`, and no head of more than `max_header_count` header
    lines is parsed: either is refused with 431 as soon as the bytes show it.
    """

    def __init__(
        self, max_head_bytes: int, max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    ) -> None:
        self._max = max_head_bytes
        self._max_lines = max_header_count
        self._buf = bytearray()
        self._scanned = 0  # bytes already searched: a trickled head costs O(n), not O(n^2)
        self._line_ends = 0  # LFs in _buf[:_scanned], counted once each
        self._request_line_started = False
        self._empty_lines = 0  # CRLFs skipped before the request line

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def first_line(self) -> str:
        """What came of the request line, for the log line of a head refused as
        it was read (too large, too many lines, too slow): as `logged_first_line`,
        whole or cut short."""
        return logged_first_line(bytes(self._buf[: LOGGED_TARGET + 2]))

    def feed(self, data: bytes) -> RequestHead | None:
        taken = self.take(data)
        return None if taken is None else parse_request_head(*taken)

    def take(self, data: bytes) -> tuple[bytes, bytes] | None:
        """As `feed`, but the complete head is returned unparsed, with the bytes
        after it: (raw head, trailing) for `parse_request_head`, which the caller
        may run later. The limits are checked here, as the bytes arrive."""
        buf = self._buf
        buf += data
        if not self._request_line_started and not self._skip_empty_lines():
            return None
        scanned = self._scanned
        # Look back a few bytes: the CRLF CRLF may straddle two reads.
        end = buf.find(_HEAD_END, max(0, scanned - len(_HEAD_END) + 1))
        if end < 0:
            if len(buf) > self._max:
                raise RequestRefused(431, "request head larger than the limit")
            # Every LF but the request line's ends a header line.
            new_line_ends = buf.count(b"\n", scanned)
            line_ends = self._line_ends + new_line_ends
            self._check_header_lines(line_ends - 1)
            # A CRLF may straddle two reads: its CR is looked for one byte back.
            if new_line_ends != buf.count(b"\r\n", max(0, scanned - 1)):
                # Without this a head using bare LF would never complete and
                # would only be answered by the request timeout.
                raise RequestRefused(400, "malformed request: line ending without CR")
            self._line_ends = line_ends
            self._scanned = len(buf)
            return None
        head_len = end + len(_HEAD_END)
        if head_len > self._max:
            raise RequestRefused(431, "request head larger than the limit")
        # The request line's LF and the empty line's are no header lines.
        self._check_header_lines(self._line_ends + buf.count(b"\n", scanned, head_len) - 2)
        raw = bytes(buf[:head_len])
        trailing = bytes(buf[head_len:])
        buf.clear()
        self._scanned = self._line_ends = 0
        self._request_line_started = False
        self._empty_lines = 0
        return raw, trailing

    def _skip_empty_lines(self) -> bool:
        """Drop CRLFs before the request line; True once it has begun."""
        buf = self._buf
        skip = 0
        while buf.startswith(b"\r\n", skip):
            skip += 2
        if skip:
            del buf[:skip]
            self._empty_lines += skip // 2
            if self._empty_lines > MAX_LEADING_EMPTY_LINES:
                raise RequestRefused(
                    400, "malformed request: too many empty lines before the request line"
                )
        if not buf or buf == b"\r":  # a CRLF may be cut between two reads
            return False
        self._request_line_started = True
        return True

    def _check_header_lines(self, lines: int) -> None:
        if lines > self._max_lines:
            raise RequestRefused(431, f"request head has more than {self._max_lines} header lines")


# What of h11's words a refusal keeps: its reason, never the bytes it quotes
# (the carrier's own line, up to the head's limit, echoed into the answer and
# the log: 14 KiB sent, 56 KiB answered, a 70 KB log line).
_QUOTED = re.compile(r":?\s*(?:bytearray\()?b['\"].*", re.DOTALL)
_REASON_CHARS = 120


def _what_h11_said(exc: h11.RemoteProtocolError) -> str:
    said = _QUOTED.sub("", str(exc)).strip()
    return said[:_REASON_CHARS] or "not HTTP/1.1"


def parse_request_head(
    raw: bytes, trailing: bytes = b"", *, refuse_body: bool = True, refuse_hostless: bool = True
) -> RequestHead:
    """Parse one complete head (ending in CRLF CRLF) or raise `RequestRefused`.

    A head that says a body follows is refused unless `refuse_body` is False, and
    an HTTP/1.1 head without Host unless `refuse_hostless` is False: the carrier
    listener routes first, for its health route answers any request (SPEC 2), and
    the call machine refuses the rest (`RequestHead.has_body`, `.host_missing`)."""
    lowered = raw.lower()
    read = _plain_read(raw, lowered)
    if read is None:  # h11's to read: the checks below pass on any plain head
        read = _h11_read(raw, refuse_hostless)
        control = bool(raw.translate(None, _TEXT).translate(None, b"\r\n"))
    else:
        control = False  # a plain head has none (`_plain_read`)
    try:
        return _checked_request(read, raw, lowered, trailing, refuse_body, control)
    except RequestRefused as refused:
        refused.head_only = read.method == b"HEAD"
        raise


class _Read(NamedTuple):
    """What h11 read of a request line and its header lines (a tuple: a frozen
    dataclass's four fields cost 3,500 instructions more a head, callgrind)."""

    method: bytes
    target: bytes
    headers: list[Header]
    http_version: bytes


# A head h11 reads as it is written (`_plain_read`): an HTTP/1.1 request line
# and header lines in h11's grammar, CRLF after each, no fold (a line starts with
# a name). Each line is matched whole once (atomic, possessive): a 16 KiB head
# that fails late is not matched again from each earlier line.
#
# h11's header line is `field_name ":" OWS field_value OWS`, its value runs of
# `[^\x00\s]` (a byte but NUL and bytes' \s: SP HTAB LF VT FF CR) with SP and HTAB
# between them. Any run of bytes but NUL, LF, VT, FF and CR is such an OWS, value,
# OWS (its SP and HTAB at either end are the OWS), and nothing else is: so a line
# is `field_name ":" [^\r]*` once the head holds no NUL, VT or FF (controls, which
# `_plain_read` sends to h11) and no LF but a CRLF's. `[^\r]` is one compare a
# byte in the regular expression engine; h11's `[^\x00\s]` tested a category and
# made a failed match cost a 16 KiB head 1.0 M instructions more than h11's own
# read (tests/unit/test_request_head_parity.py pins the two equal, byte by byte).
_PLAIN_HEAD = re.compile(
    f"(?P<method>{METHOD}) (?P<target>{REQUEST_TARGET}) HTTP/1\\.1\r\n"
    f"(?P<fields>(?>{FIELD_NAME}:[^\r]*\r\n)*+)\r\n".encode()
)
# The names h11 counts (one Host, RFC 9112 3.2) or checks and rewrites (a
# Content-Length list made one value, a Transfer-Encoding other than chunked
# refused), as they start a line of the lowercased head: heads with the last two,
# or not one Host, are h11's to read and to refuse, as ever.
_HOST_LINE = b"\r\nhost:"
_TRANSFER_ENCODING_LINE = b"\r\ntransfer-encoding:"


def _plain_read(raw: bytes, lowered: bytes) -> _Read | None:
    """What h11 reads of `raw`, read without it when `raw` is a plain head (see
    `_PLAIN_HEAD`, with one Host and no Content-Length or Transfer-Encoding), or
    None: h11 reads the rest. Within these bounds h11 raises nothing (the request
    line and every header line match its own expressions, its Host count is one,
    nothing is left for `normalize_and_validate` to check) and reads the same
    method, target, names as sent and values without their OWS."""
    # The cheap refusals first (a search in C each), so that a head h11 is to
    # read for a Host, a Content-Length or a Transfer-Encoding is not matched too;
    # the translate after the match, so that a head failing it is not translated.
    if (
        lowered.count(_HOST_LINE) != 1
        or lowered.find(_CONTENT_LENGTH_LINE) >= 0
        or lowered.find(_TRANSFER_ENCODING_LINE) >= 0
        or (match := _PLAIN_HEAD.fullmatch(raw)) is None
        # What is left is CRLFs alone: no control, no LF but a CRLF's (a CR but
        # a CRLF's the expression refuses).
        or raw.translate(None, _TEXT).replace(b"\r\n", b"")
    ):
        return None
    # Each line matched h11's `header_field`: its name runs to the first colon (a
    # token has none), its value is what is left without the OWS around it (a
    # value starts and ends with a field-vchar, never SP or HTAB). Split, not
    # matched again: a quarter of the instructions on a 16 KiB head.
    lines = raw[match.start("fields") : match.end("fields") - 2].split(b"\r\n")
    fields = map(bytes.partition, lines, repeat(b":"))
    headers = [(name, value.strip(b" \t")) for name, _, value in fields]
    return _Read(match["method"], match["target"], headers, b"1.1")


def _h11_read(raw: bytes, refuse_hostless: bool) -> _Read:
    """What h11 reads of `raw`, once the line ends and folds pass; refused as it
    says, but for the Host-less head the caller asked to be read."""
    crlfs = raw.count(b"\r\n")
    if raw.count(b"\n") != crlfs or raw.count(b"\r") != crlfs:
        raise RequestRefused(400, "malformed request: line ending without CR")
    if _OBS_FOLD.search(raw):
        raise RequestRefused(400, "malformed request: folded header line")
    try:
        return _h11_request(raw)
    except h11.RemoteProtocolError as exc:
        said = _what_h11_said(exc)
        if refuse_hostless or said != HOSTLESS:
            raise RequestRefused(400, f"malformed request: {said}") from None
        return _hostless_request(raw)


def _h11_request(raw: bytes) -> _Read:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(raw) + 1)
    conn.receive_data(raw)
    event = conn.next_event()
    if not isinstance(event, h11.Request):  # pragma: no cover - h11 yields a Request here
        raise RequestRefused(400, "malformed request")
    headers = [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]
    return _Read(bytes(event.method), bytes(event.target), headers, bytes(event.http_version))


def _hostless_request(raw: bytes) -> _Read:
    """What h11 reads of an HTTP/1.1 head it refused for having no Host alone: the
    head with an empty Host line after its request line, that line then dropped."""
    line_end = raw.index(b"\r\n") + 2
    try:
        read = _h11_request(raw[:line_end] + b"Host: \r\n" + raw[line_end:])
    except h11.RemoteProtocolError as exc:
        raise RequestRefused(400, f"malformed request: {_what_h11_said(exc)}") from None
    stand_in, *headers = read.headers
    assert stand_in == (b"Host", b""), read.headers
    return _Read(read.method, read.target, headers, read.http_version)


def _checked_request(
    read: _Read, raw: bytes, lowered: bytes, trailing: bytes, refuse_body: bool, control: bool
) -> RequestHead:
    """The head read (by h11 or as h11 reads it), once it passes the checks h11
    does not make. `lowered` is `raw.lower()`; `control`: `raw` holds one of `CONTROLS`."""
    # HTTP/1.0 is read (monitors still probe /haproxy-health with it, and port 80
    # redirects it); a call needs HTTP/1.1, which the call route checks.
    if read.http_version not in (b"1.1", b"1.0"):
        raise RequestRefused(400, "only HTTP/1.1 requests are served (and 1.0 for probes)")
    headers = read.headers
    target = read.target
    if not target.startswith(b"/"):
        target = _origin_form(target, headers)
    if target.find(b"#") >= 0 or target.find(b"\\") >= 0:
        raise RequestRefused(400, "request target has characters a path cannot hold")
    head = RequestHead(
        method=read.method,
        target=target,
        headers=headers,
        trailing=trailing,
        http_version=read.http_version,
    )
    if (at := lowered.find(_CONTENT_LENGTH_LINE)) >= 0:
        line = lowered[at + 2 : lowered.find(b"\r\n", at + 2)]
        if b"," in line or lowered.find(_CONTENT_LENGTH_LINE, at + 2) >= 0:
            raise RequestRefused(400, "malformed request: more than one Content-Length")
    if control:
        raise RequestRefused(400, "malformed request: control character in a header value")
    if not _valid_host(head.host):
        raise RequestRefused(400, "malformed request: Host is not host[:port]")
    if refuse_body and head.has_body:
        raise RequestRefused(400, BODY_REFUSED)
    path = head.path
    if _DOT_SEGMENT.search(path):
        raise RequestRefused(400, "request path has '.' or '..' segments")
    if _ENCODED_FORBIDDEN.search(path):
        raise RequestRefused(400, "request path has an encoded '/', '\\', '.' or control character")
    return head


def _valid_host(host: bytes) -> bool:
    return _host_match(host) is not None


def _host_match(host: bytes) -> re.Match[bytes] | None:
    """`host` as host[:port] (the port in group 1), None when it is not one
    or its port is past 65535."""
    match = _HOST.fullmatch(host)
    if match is None:
        return None
    # Compared by length first: int() refuses more than 4,300 digits with a ValueError,
    # which a stranger's Host could otherwise raise out of the parse.
    port = (match.group(1) or b"").lstrip(b"0")
    valid = len(port) <= _MAX_PORT_DIGITS and int(port or b"0") <= _MAX_PORT
    return match if valid else None


def _origin_form(target: bytes, headers: list[Header]) -> bytes:
    """An absolute-form target as origin-form, once its authority matches Host.

    RFC 9112 3.2.2 has an origin server use the target's authority over Host;
    as a gateway we forward Host (as X-Forwarded-Host) and the path, so the two
    must agree, or a fleet could be told one host while we routed for another.
    A client MUST send them identical (RFC 9112 3.2), so a mismatch is refused."""
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise RequestRefused(
            400, "request target must be a path (origin-form) or an http(s) URL (absolute-form)"
        )
    scheme, authority, path, query = match.groups()
    if not authority or b"@" in authority or not _valid_host(authority):
        raise RequestRefused(400, "request target's authority is not host[:port]")
    hosts = [value for name, value in headers if name.lower() == b"host"]
    if len(hosts) == 1 and _same_authority(scheme.lower(), authority, hosts[0]):
        return (path or b"/") + (query or b"")
    raise RequestRefused(400, "request target's authority differs from Host")


def _same_authority(scheme: bytes, a: bytes, b: bytes) -> bool:
    """Whether two authorities name one host and port: an IP literal compared as
    an address (`[0::1]` is `[::1]`), a port as a number, an absent or empty
    one as the scheme's (RFC 3986 6.2.3). Compared as text, a client that
    spelt the address one way in its URL and the other in Host got a 400."""
    default = int(_DEFAULT_PORTS[scheme])
    return _authority_key(a, default) == _authority_key(b, default)


def _authority_key(authority: bytes, default_port: int) -> tuple[object, int]:
    match = _host_match(authority)
    if match is None:  # compared as text, as before
        return authority.lower(), -1
    host, port = authority, default_port
    if match.group(1) is not None:
        host = authority[: match.start(1) - 1]
        # Its zeros dropped first, as `_valid_host` does: int() raises on more than
        # 4,300 digits, and "0…0443" (a stranger's) would fail the parse with a traceback.
        digits = match.group(1).lstrip(b"0")
        port = int(digits) if digits else (0 if match.group(1) else default_port)
    if host.startswith(b"["):
        try:
            return ipaddress.IPv6Address(host[1:-1].decode("ascii")), port
        except ValueError:
            pass
    return host.lower(), port


# The codec `logged_first_line` uses, looked up (its module imported) now rather
# than at a worker's first head refused as it was read: that import opens a file,
# and a worker out of descriptors failed the refusal with "call command failed;
# ending the call" and a traceback (the resources audit of session 34).
codecs.lookup("unicode_escape")

LOGGED_TARGET = 256
"""Bytes of a request's target (or of a refused head's first line) that a log
line names: a scanner's 16 KiB target would make a 16 KiB line."""


def logged_target(head: RequestHead) -> str:
    """A parsed head's target for a log line (its bytes are printable ASCII)."""
    return head.target[:LOGGED_TARGET].decode("latin-1")


def logged_first_line(raw: bytes) -> str:
    """A head that did not parse, for its log line: its first line, bounded, every
    byte that is not printable ASCII escaped (the log is read in a terminal), a
    backslash the client sent doubled (its ``\\xc3`` is not the byte 0xc3)."""
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")[:LOGGED_TARGET]
    return line.decode("latin-1").encode("unicode_escape").decode("ascii")
