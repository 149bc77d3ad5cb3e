"""One request to a fleet and the reading of its answer, with no I/O.

The request is serialized by h11 from parsed fields. The answer is parsed by
h11 only to learn where its head and body end; what the carrier receives is
the fleet's own bytes, unchanged (SPEC: relayed exactly as the fleet sent it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import h11

from fleet_ingress.core.request_head import Header


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
        self.head: ResponseHead | None = None
        # Bytes fed, and of them the answer's head (with any 1xx before it):
        # what follows the head is what the carrier is relayed as the call's.
        self._fed = 0
        self.head_bytes = 0

    def feed(self, data: bytes) -> Progress:
        """Feed bytes from the fleet and say how far the answer got."""
        self._fed += len(data)
        self._conn.receive_data(data)
        return self.advance()

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
                    self._head_done(ResponseHead(101, switched=True))
                    return Progress.HEAD_COMPLETE
                continue  # 100 Continue and friends: wait for the real answer
            if isinstance(event, h11.Response):
                self._head_done(ResponseHead(event.status_code, switched=False))
                return Progress.HEAD_COMPLETE
            if isinstance(event, h11.EndOfMessage):
                return Progress.BODY_COMPLETE
            # h11.Data: body bytes, relayed raw by the caller; keep reading.

    def _head_done(self, head: ResponseHead) -> None:
        self.head = head
        # What h11 has not read yet follows the head: a tunnel's first bytes or a body's.
        self.head_bytes = self._fed - len(self._conn.trailing_data[0])
