"""One request to a fleet and the reading of its answer, with no I/O.

The request is serialized by h11 from parsed fields. The answer is parsed by
h11 to learn where its head and body end; what the carrier receives is the
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

import h11

from fleet_ingress.core.request_head import Header, comma_tokens

# RFC 6455 4.2.2: the accept value is base64(SHA-1(key + this GUID)).
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A head line's break before SP/HTAB (obs-fold): replaced by as many spaces, so
# the head keeps its length.
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# A line end without its CR (RFC 9112 2.2: a recipient MAY read it as one).
_BARE_LF = re.compile(rb"(?<!\r)\n")
# The status line of a 101 as HTTP/1.0 (the head's first: any 1xx before it is dropped).
_STATUS_101_HTTP_1_0 = re.compile(rb"HTTP/1\.0 101(?= |\r\n)")


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


@dataclass(slots=True)
class ResponseHead:
    status: int
    switched: bool  # 101: the connection is now a WebSocket tunnel


class FleetExchange:
    def __init__(
        self, method: bytes, target: bytes, headers: list[Header], *, max_head_bytes: int
    ) -> None:
        self.max_head_bytes = max_head_bytes
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        request = h11.Request(method=method, target=target, headers=headers)
        self.request_bytes = (self._conn.send(request) or b"") + (
            self._conn.send(h11.EndOfMessage()) or b""
        )
        # What the fleet's 101 must answer: the key the carrier sent (checked
        # as it came in), when the request is a WebSocket handshake.
        key = next((v for k, v in headers if k.lower() == b"sec-websocket-key"), None)
        self._accept = websocket_accept(key.strip()) if key is not None else None
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
        self._fed += len(data)
        if self._raw is not None:
            self._raw += data
        self._conn.receive_data(data)
        return self.advance()

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
                    self._head_done(ResponseHead(101, switched=True))
                    return Progress.HEAD_COMPLETE
                # 100 Continue and friends: wait for the real answer.
                self._interim_bytes = self._fed - len(self._conn.trailing_data[0])
                continue
            if isinstance(event, h11.Response):
                self._head_done(ResponseHead(event.status_code, switched=False))
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

    def _head_done(self, head: ResponseHead) -> None:
        # What h11 has not read yet follows the head: a tunnel's first bytes or a body's.
        head_bytes = self._fed - len(self._conn.trailing_data[0])
        if head_bytes > self.max_head_bytes:
            # h11 bounds only a head still incomplete: one read can complete a
            # larger one (up to a TLS record more).
            raise ResponseError(
                "junk-response",
                f"response head of {head_bytes} bytes, over the limit of {self.max_head_bytes}",
            )
        raw, self._raw = self._raw, None
        assert raw is not None
        if _FOLD.search(raw, 0, head_bytes):
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
                fixed = _BARE_LF.sub(b"\r\n", fixed)
                if _STATUS_101_HTTP_1_0.match(fixed):
                    fixed = b"HTTP/1.1" + fixed[8:]
            if fixed != given:
                self.unfolded_head = fixed
        self.head = head
        self.head_bytes = head_bytes
