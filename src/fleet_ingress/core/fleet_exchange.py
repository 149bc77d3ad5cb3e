"""One request to a fleet and the reading of its answer, with no I/O.

The request is written here as h11 writes it, and the answer to a WebSocket
handshake read here while it is a plain 101, because h11 did both in about
1,000 lines of Python a call, over half a million instructions of the ~7.6 M a
churned call costs (issue #13; `bench/call_instructions.py`). Neither changes
a verdict: a request is written here only when it fullmatches h11's own
grammar (`h11_grammar`) and has nothing h11 normalizes (Content-Length,
Transfer-Encoding), else h11 writes it (and raises what it raised); a 101 is
read here only when its head fullmatches h11's grammar with CRLF line ends, no
fold, no Content-Length or Transfer-Encoding, starting `HTTP/1.` (its fields
then read as h11 reads them; until session 48 httptools read it, a Python call
a header line); any other answer (a 1xx first, a refusal, junk,
a fold, bare LFs, a head past the limit, a close) is handed to h11 from its
first byte, which reads it as it always did. The request's fields are ours
already: the carrier's head was validated (`request_head`, by h11 too) and
rewritten (`forwarding`).

The answer is parsed to learn where its head and body end; what the carrier receives is the
fleet's own bytes (SPEC: relayed exactly as the fleet sent it), within what
RFC 9112 lets a proxy pass on: a head over the limit, or a 101 that is no
answer to the WebSocket handshake sent, is no answer (502); a folded header
line has its line break replaced by spaces (section 5.2); a 101 is passed on as
HTTP/1.1 with CRLF line ends, which a carrier's WebSocket client requires (a
fleet's bare LF, or an `HTTP/1.0 101`, is read as section 2.2 allows and
written as it should have been); an answer, a 101 or not, is passed on alone,
without the 1xx answers that came before it, which such a client takes for its
answer; bytes after the end of an answer are not the answer's (`relayable`).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from dataclasses import dataclass
from itertools import repeat

import h11

from fleet_ingress.core.h11_grammar import FIELD_NAME, METHOD, REQUEST_TARGET
from fleet_ingress.core.request_head import Header, comma_tokens

# RFC 6455 4.2.2: the accept value is base64(SHA-1(key + this GUID)).
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A head line's break before SP/HTAB (obs-fold): replaced by as many spaces, so
# the head keeps its length.
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# A line end without its CR (RFC 9112 2.2: a recipient MAY read it as one).
_BARE_LF = re.compile(rb"(?<!\r)\n")
# Neither has a literal to skip to: a search tries it at each byte (43k and 40k
# instructions a plain 101, callgrind, session 43). Each is run only where the
# head has one, which `find` and `count` (in C) tell first.
# The status line of a 101 as HTTP/1.0 (the head's first: any 1xx before it is dropped).
_STATUS_101_HTTP_1_0 = re.compile(rb"HTTP/1\.0 101(?= |\r\n)")
# h11's own grammar (`h11_grammar`), so that what is written or read here without
# h11 is only what h11 would have written or read the same way.
#
# Its header line is `field_name ":" OWS field_value OWS`, a value runs of
# `[^\x00\s]` with SP and HTAB between them (and its reason phrase runs of SP,
# HTAB and `[^\x00\s]`): any run of bytes but NUL, VT, FF, CR and LF is an OWS,
# a value and an OWS (or a reason phrase), and nothing else is. That class is one
# bitmap test a byte; h11's classes test a category a byte: the plain 101 and the
# request a call sends cost 48k and 30k instructions in the regular expression
# engine (callgrind, session 43), most of what reading the 101 costs.
_ODD = "\x00\x0b\x0c\r\n"
# A request head h11 would write as we do: no line of it needs h11's care (a
# Content-Length or Transfer-Encoding it normalizes is left to it, below), and
# each value is a field_value: none, or one starting and ending with a byte but
# SP and HTAB, with no NUL, VT, FF, CR or LF in it. (Until session 49 the value
# was `[^\r]`, the rest searched for by a `translate` of the whole request: 7.5k
# instructions more a call, callgrind.)
_PLAIN_REQUEST = re.compile(
    f"{METHOD} {REQUEST_TARGET} HTTP/1\\.1\r\n"
    f"(?>{FIELD_NAME}: (?:[^{_ODD} \t][^{_ODD}]*+(?<![ \t])|)\r\n)*+\r\n".encode()
)
# A 101 head h11 reads as written: CRLF line ends, no fold, HTTP/1.x. The rest of
# its lines, after the status code or a name's colon, is any bytes but NUL, VT, FF,
# CR and LF (not `_ODD`), one class a byte.
_LINE_REST = f"[^{_ODD}]*+"
_PLAIN_101 = re.compile(
    f"HTTP/1\\.[01] 101(?: {_LINE_REST})?\r\n(?>{FIELD_NAME}:{_LINE_REST}\r\n)*+\r\n".encode()
)
_HTTP_1 = b"HTTP/1."
_HEAD_END = b"\r\n\r\n"
# The names h11 checks and rewrites in an answer it reads (`normalize_and_validate`),
# as they start a line of the lowercased head: an answer with either is h11's to read.
_CONTENT_LENGTH_LINE = b"\r\ncontent-length:"
_TRANSFER_ENCODING_LINE = b"\r\ntransfer-encoding:"
# The lines a 101 answers the handshake by (RFC 6455 4.2.2), as they start a line
# of the lowercased head.
_UPGRADE_LINE = b"\r\nupgrade:"
_CONNECTION_LINE = b"\r\nconnection:"
_ACCEPT_LINE = b"\r\nsec-websocket-accept:"
_USUAL_UPGRADE = _UPGRADE_LINE + b" websocket\r\n"
_USUAL_CONNECTION = _CONNECTION_LINE + b" upgrade\r\n"


def _write_request(
    method: bytes, target: bytes, headers: list[Header]
) -> tuple[bytes, bytes] | None:
    """The request as h11 writes it, and lowercased, or None when only h11
    should write it: its Host not first (h11 writes it first; the ingress's
    own requests have it there, `forwarding`), or not once (h11's error, or its
    way)."""
    start = b"%s %s HTTP/1.1\r\n" % (method, target)
    # Joined in C (11k instructions a call's request, where a `%` a header in a
    # list was 16k, callgrind, session 49). No headers: no Host first, so h11's.
    request = b"%s%s\r\n\r\n" % (start, b"\r\n".join(map(b": ".join, headers)))
    lowered = request.lower()
    # `find(...) >= 0`, not `in`: CPython 3.11's `in` on bytes tries its operand
    # as an integer first, and makes and clears a TypeError (about 2,500
    # instructions, callgrind) before it searches.
    if (
        not lowered.startswith(b"host:", len(start))
        or lowered.count(b"\r\nhost:") != 1
        or lowered.find(b"content-length") >= 0
        or lowered.find(b"transfer-encoding") >= 0
        or request.count(b"\n") != len(headers) + 2  # a CR LF inside a field: h11 refuses it
        or not _PLAIN_REQUEST.fullmatch(request)
    ):
        return None
    return request, lowered


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """A plain 101's header fields as h11 reads them: names lowercased, values
    without their OWS (each line `name ":" value`, its name a token: no colon)."""
    first = head.find(b"\r\n") + 2
    if first == len(head) - 2:  # the status line alone
        return []
    fields = map(bytes.partition, head[first:-4].split(b"\r\n"), repeat(b":"))
    return [(name.lower(), value.strip(b" \t")) for name, _, value in fields]


def _may_be_plain(raw: bytearray, fed_before: int) -> bool:
    """Whether `raw`, an answer head not complete yet (the bytes from `fed_before`
    just fed), may still be read here, h11 having said nothing of it yet: it
    starts `HTTP/1.` (h11 refuses a first byte below 0x21 at once) and each LF
    has its CR (h11 ends a head at LF LF or LF CR LF, which with only CRLFs is
    the CRLF CRLF looked for). Only the bytes just fed are counted (and a CR
    before them): a trickled head costs O(n)."""
    if fed_before < len(_HTTP_1) and not _HTTP_1.startswith(raw[: len(_HTTP_1)]):
        return False
    return raw.count(b"\n", fed_before) == raw.count(b"\r\n", max(0, fed_before - 1))


def websocket_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server answers `key` with (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    return comma_tokens(value for key, value in headers if key == name)  # h11 lowercases names


class ResponseError(Exception):
    """The fleet's answer was not a usable HTTP response."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # "empty-response" or "junk-response"
        self.detail = detail


class Progress(enum.Enum):
    NEED_DATA = "need_data"
    HEAD_COMPLETE = "head_complete"  # status known; see `status`/`switched`
    BODY_COMPLETE = "body_complete"  # a non-101 answer ended


# What the plain 101's read answers, read once: CPython 3.11 reads a member
# through its class by EnumType's __getattr__ slot (~900 instructions, callgrind).
_HEAD_COMPLETE = Progress.HEAD_COMPLETE
_NEED_DATA = Progress.NEED_DATA


@dataclass(slots=True)
class ResponseHead:
    status: int
    switched: bool  # 101: the connection is now a WebSocket tunnel


class FleetExchange:
    def __init__(
        self, method: bytes, target: bytes, headers: list[Header], *, max_head_bytes: int
    ) -> None:
        self.max_head_bytes = max_head_bytes
        self._request = (method, target, headers)
        self._conn: h11.Connection | None = None  # made only when h11 is needed
        self._written = b""  # what h11 wrote of the request (see `_h11`)
        written = _write_request(method, target, headers)
        if written is None:
            self.request_bytes = self._h11().send(h11.EndOfMessage()) or b""
            self.request_bytes = self._written + self.request_bytes
        else:
            self.request_bytes, lowered = written
        # A WebSocket handshake's answer is read here while it may be a plain
        # 101 (`_feed_fast`); anything else, by h11 from its first byte
        # (`_to_h11`), as it always was.
        self._fast = written is not None and lowered.find(b"\r\nupgrade:") >= 0
        if written is not None and not self._fast:
            # No handshake (an ACME challenge to certbot): h11 reads the answer,
            # the request sent through it so that it reads as a client's.
            self._h11().send(h11.EndOfMessage())
        # What the fleet's 101 must answer: the key the carrier sent (checked
        # as it came in), when the request is a WebSocket handshake.
        # A loop, not `next()` of a generator: 1.7k instructions, where the
        # generator made and run cost 5.1k (callgrind, session 50).
        for name, value in headers:
            if name.lower() == b"sec-websocket-key":
                accept: bytes | None = websocket_accept(value.strip())
                break
        else:
            accept = None
        self._accept = accept
        # Its line in a usual 101, lowercased (`_plain_switch`).
        self._accept_line = b"" if accept is None else b"%s %s\r\n" % (_ACCEPT_LINE, accept.lower())
        self.head: ResponseHead | None = None
        # Bytes fed, and of them the answer's head (with any 1xx before it):
        # what follows the head is what the carrier is relayed as the call's.
        self._fed = 0
        self.head_bytes = 0
        # The bytes fed until the head is read (then let go); the head as the
        # carrier gets it, when not as fed: its folded lines unfolded (same
        # length), a 101's line ends and version made what clients require.
        self._raw: bytearray | None = bytearray()
        self.unfolded_head: bytes | None = None
        # Bytes fed after the end of a non-101 answer: not the answer's.
        self.surplus = 0
        # Of the bytes fed, the 1xx answers before the answer (not relayed).
        self._interim_bytes = 0
        # The body broke off (closed before its Content-Length, a chunk cut):
        # `advance` says BODY_COMPLETE all the same, the end of what there is.
        self.cut_short = False

    def feed(self, data: bytes) -> Progress:
        """Feed bytes from the fleet and say how far the answer got."""
        fed_before = self._fed
        self._fed += len(data)
        if self._raw is not None:
            self._raw += data
        if self._fast:
            return self._feed_fast(fed_before)
        if self._conn is None:  # after a 101 read without h11: the tunnel's
            return Progress.HEAD_COMPLETE
        self._conn.receive_data(data)
        return self.advance()

    def _h11(self) -> h11.Connection:
        """h11's connection, the request sent through it (its state a client's)."""
        method, target, headers = self._request
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_head_bytes)
        request = h11.Request(method=method, target=target, headers=headers)
        self._written = self._conn.send(request) or b""
        return self._conn

    def _to_h11(self) -> None:
        """Hand the answer, every byte of it so far, to h11."""
        self._fast = False
        conn = self._h11()
        conn.send(h11.EndOfMessage())
        assert self._raw is not None
        if self._raw:  # (b"" would tell h11 the fleet closed)
            conn.receive_data(bytes(self._raw))

    def _feed_fast(self, fed_before: int) -> Progress:
        raw = self._raw
        assert raw is not None
        # Looked for from where the last read ended, a CRLF CRLF straddling it.
        end = raw.find(_HEAD_END, max(0, fed_before - 3))
        if end >= 0:
            # A plain 101: h11's grammar, CRLFs only, no fold (`_PLAIN_101`), no
            # Content-Length or Transfer-Encoding (h11 checks and rewrites them in
            # any answer it reads). h11 reads it as it is written, raising nothing
            # (tests/unit/test_fleet_exchange.py pins the two equal).
            head = bytes(raw[: end + len(_HEAD_END)])
            if _PLAIN_101.fullmatch(head) is not None:
                lowered = head.lower()
                if (
                    lowered.find(_CONTENT_LENGTH_LINE) < 0
                    and lowered.find(_TRANSFER_ENCODING_LINE) < 0
                ):
                    self._fast = False
                    self._plain_switch(head, lowered)
                    return _HEAD_COMPLETE
        elif len(raw) <= self.max_head_bytes and _may_be_plain(raw, fed_before):
            return _NEED_DATA
        # Not a plain 101 (or no head within the limit): h11's answer, as ever.
        self._to_h11()
        return self.advance()

    def _plain_switch(self, head: bytes, lowered: bytes) -> None:
        """A plain 101 read: checked as `_check_switch` checks it, then done as
        `_head_done` does it. A fleet's usual 101 (one `Upgrade: websocket`, one
        `Connection: upgrade`, one `Sec-WebSocket-Accept: <the value>`, in any
        case, one space after the colon) passes by a few searches of its head; any
        other is checked field by field (`_fields`), as h11's read would be."""
        accept_at = lowered.find(self._accept_line)
        if (
            lowered.find(_USUAL_UPGRADE) < 0
            or lowered.find(_USUAL_CONNECTION) < 0
            or lowered.count(_UPGRADE_LINE) != 1
            or lowered.count(_CONNECTION_LINE) != 1
            or (
                self._accept is not None
                and not (
                    accept_at >= 0
                    and head.startswith(self._accept, accept_at + len(_ACCEPT_LINE) + 1)
                    and lowered.count(_ACCEPT_LINE) == 1
                )
            )
        ):
            self._check_switch(_fields(head))
        head_bytes = len(head)
        if head_bytes > self.max_head_bytes:
            raise ResponseError(
                "junk-response",
                f"response head of {head_bytes} bytes, over the limit of {self.max_head_bytes}",
            )
        self._raw = None
        # What `_head_done` makes of a 101 with no fold, no 1xx before it and only
        # CRLFs: the same bytes, but an HTTP/1.0 status line's version.
        if head.startswith(b"HTTP/1.0"):
            self.unfolded_head = b"HTTP/1.1" + head[8:]
        self.head = ResponseHead(101, switched=True)
        self.head_bytes = head_bytes

    @property
    def relayed_head_bytes(self) -> int:
        """The length of the head as `relayable` passes it on (a 101's line ends
        made CRLF lengthen it): where what follows it starts in what it returns."""
        return self.head_bytes if self.unfolded_head is None else len(self.unfolded_head)

    def relayable(self, fed: bytes) -> bytes:
        """Of `fed`, every byte fed so far, what the carrier is sent: the head
        unfolded, nothing past the answer's end."""
        if self.unfolded_head is not None:
            fed = self.unfolded_head + fed[self.head_bytes :]
        return fed[: len(fed) - self.surplus] if self.surplus else fed

    def feed_eof(self) -> Progress:
        """The fleet closed its side."""
        if self._fast:
            self._to_h11()
        if self._conn is None:  # after a 101 read without h11
            return Progress.HEAD_COMPLETE
        self._conn.receive_data(b"")
        if self.head is None:
            # SPEC 5: closed before a complete head is an empty response,
            # whatever part of a head came first.
            try:
                self._advance()
            except h11.RemoteProtocolError:
                pass
            if self.head is None:
                raise ResponseError("empty-response", "fleet closed before a complete response")
        return self.advance()

    def advance(self) -> Progress:
        """Go on with bytes already fed (a body may follow the head in one read)."""
        try:
            return self._advance()
        except h11.RemoteProtocolError as exc:
            if self.head is None:
                raise ResponseError("junk-response", str(exc)) from None
            # The head was valid but the body broke off: it ends here.
            self.cut_short = True
            return Progress.BODY_COMPLETE

    def _advance(self) -> Progress:
        if self._fast:
            return Progress.NEED_DATA
        if self._conn is None:  # the 101 read without h11: nothing more to read
            return Progress.HEAD_COMPLETE
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                return Progress.NEED_DATA
            if event is h11.PAUSED:  # after a 101, h11 steps aside
                return Progress.HEAD_COMPLETE
            if isinstance(event, h11.ConnectionClosed):
                if self.head is None:
                    raise ResponseError("empty-response", "fleet closed before a response")
                return Progress.BODY_COMPLETE
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._check_switch(list(event.headers))
                    self._head_done(ResponseHead(101, switched=True), self._h11_read())
                    return Progress.HEAD_COMPLETE
                # 100 Continue and friends: wait for the real answer.
                self._interim_bytes = self._h11_read()
                continue
            if isinstance(event, h11.Response):
                self._head_done(ResponseHead(event.status_code, switched=False), self._h11_read())
                return Progress.HEAD_COMPLETE
            if isinstance(event, h11.EndOfMessage):
                # What h11 has not read is past the answer (a second answer,
                # bytes after a 204...): the carrier is closed after this one.
                self.surplus = len(self._conn.trailing_data[0])
                return Progress.BODY_COMPLETE
            # h11.Data: body bytes, relayed raw by the caller; keep reading.

    def _check_switch(self, headers: list[tuple[bytes, bytes]]) -> None:
        """A 101 switches to WebSocket only as RFC 6455 4.2.2 says; anything
        else is a fleet's error the carrier's client would fail the call on
        (and a call counted connected that never was)."""
        if b"websocket" not in _tokens(headers, b"upgrade"):
            raise ResponseError("junk-response", "the fleet's 101 has no Upgrade: websocket")
        if b"upgrade" not in _tokens(headers, b"connection"):
            raise ResponseError("junk-response", "the fleet's 101 has no Connection: upgrade")
        if self._accept is not None:
            accepts = [v for k, v in headers if k == b"sec-websocket-accept"]
            if accepts != [self._accept]:
                raise ResponseError(
                    "junk-response",
                    "the fleet's 101 has no Sec-WebSocket-Accept answering the key sent",
                )

    def _h11_read(self) -> int:
        """Of the bytes fed, those h11 has read: what it has not follows (a
        tunnel's first bytes or a body's)."""
        assert self._conn is not None
        return self._fed - len(self._conn.trailing_data[0])

    def _head_done(self, head: ResponseHead, head_bytes: int) -> None:
        if head_bytes > self.max_head_bytes:
            # h11 bounds only a head still incomplete: one read can complete a
            # larger one (up to a TLS record more).
            raise ResponseError(
                "junk-response",
                f"response head of {head_bytes} bytes, over the limit of {self.max_head_bytes}",
            )
        raw, self._raw = self._raw, None
        assert raw is not None
        if raw.find(b"\n ", 0, head_bytes) >= 0 or raw.find(b"\n\t", 0, head_bytes) >= 0:
            self.unfolded_head = _FOLD.sub(
                lambda fold: b" " * len(fold[0]), bytes(raw[:head_bytes])
            )
        if head.switched or self._interim_bytes:
            given = self.unfolded_head or bytes(raw[:head_bytes])
            # A 1xx before the answer (a 100 Continue, a 103 Early Hints) is not
            # passed on: a carrier's WebSocket client reads the first head as its
            # answer, and refused a call ("HTTP 100") while the access log said
            # 101 (the odd-fleet audit of session 35), or was told 100 for a 429
            # its retry and back-off look for (the review of session 35). The
            # carrier sent no Expect to the fleet (`request_head`): it asked for none.
            fixed = given[self._interim_bytes :]
            if head.switched:
                if fixed.count(b"\n") != fixed.count(b"\r\n"):
                    fixed = _BARE_LF.sub(b"\r\n", fixed)
                if _STATUS_101_HTTP_1_0.match(fixed):
                    fixed = b"HTTP/1.1" + fixed[8:]
            if fixed != given:
                self.unfolded_head = fixed
        self.head = head
        self.head_bytes = head_bytes
