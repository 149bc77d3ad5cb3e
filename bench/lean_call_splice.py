"""A bench floor: the least Python a call can cost doing a call's work, on ``net.tls_socket``.

``bare_bio_splice.py`` is the floor of the relay: it forwards the carrier's head
verbatim to a fleet round-robin and parses nothing. This one does what any
ingress must do for a call (issue #13 asks what of the ingress's extra CPU a
call is that work, and what is this design's machinery) and nothing more:

- accept TLS (the ingress's own server context, ``net.tls.server_ssl_context``);
- read the carrier's head (bounded, 16 KiB), parse and check it as a call route
  does (one Host, HTTP/1.1 GET WebSocket upgrade, a Sec-WebSocket-Key, version
  13, no body), route ``/ws/{bot}`` and ``/exotel/{bot}`` (``/haproxy-health``
  answered ``200 ok``, anything else ``404``);
- pick a fleet leastconn under ``--maxconn`` (ties round-robin; none free: 503);
- rewrite the head for the fleet (SPEC 3.2: Host the fleet's ``host:port``,
  X-Forwarded-For appended, X-Forwarded-Proto / -Host and X-Real-IP set,
  hop-by-hop and the carrier's own claims dropped);
- connect with TLS to it (the ingress's fleet context: SNI, the certificate
  verified against ``--ca``), the fleet's TLS session kept and offered as
  ``bare-bio@reuse`` does (SSL_get1_session / SSL_set_session, no copy);
- read the fleet's answer head, check a 101 answers the key sent
  (Sec-WebSocket-Accept), relay it, then link the two (``TLSConnection.linked``,
  the hot path as the ingress's), bytes both ways with flow control;
- at the call's end count it and free its fleet slot.

Not done (the design's machinery, or failure paths a churned call never takes):
no call machine (events, commands), no slot lease, no head, connect or
response timer of its own (``tls_socket``'s handshake and connect bounds only,
as the bare floor), no retry, no registry, metrics, call table, log line, no
health probe, no silence sweep. A bench floor, not a way to serve::

    python bench/lean_call_splice.py --listen 127.0.0.1:8443 --cert c.pem --key k.pem \\
        --ca ca.pem --fleet 127.0.0.1:9001 --fleet 127.0.0.1:9002 [--maxconn 16]

Two ways to do the head's work (the ``lean`` target of ``python -m bench``,
bench/harness/targets.py; ``--variant hand:LEAN_HAND=1 --targets lean@hand``):

- by default the project's own pure code from ``core/``: ``RequestHeadReader``
  and ``parse_request_head`` (request_head), ``Router`` (routing), the call
  route's checks (``call_machine._local_answer``), ``fleet_request_headers``
  (forwarding), ``FleetExchange`` for the request's bytes and the 101's reading
  and checks (fleet_exchange): what this design's head work costs, without its
  machinery around it;
- ``LEAN_HAND=1``: the leanest hand-written path for the same checks and
  rewrite (a split at CRLFs and colons, a dict by lowercased name, one join),
  which accepts what a plain call head is and refuses the rest with 400; it
  does not match the grammar byte by byte as ``request_head`` does (h11's
  grammar, smuggling checks, dot segments): what a lean Python ingress that
  trusted less could cost.

It serves until SIGTERM or SIGINT; on the way out it says on stderr how many
calls it linked, answered itself, and ended.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from fleet_ingress.core.addresses import peer_ip
from fleet_ingress.core.call_machine import _local_answer
from fleet_ingress.core.fleet_exchange import FleetExchange, Progress, ResponseError
from fleet_ingress.core.forwarding import fleet_request_headers
from fleet_ingress.core.request_head import RequestHeadReader, RequestRefused, parse_request_head
from fleet_ingress.core.responses import local_response
from fleet_ingress.core.routing import Router
from fleet_ingress.net import tls, tls_socket
from fleet_ingress.net.tls_socket import Acceptor, TLSConnection, connect, wrap_accepted

Address = tuple[str, int]
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0
MAX_HEAD_BYTES = 16384  # SPEC 2: limits.max_header_bytes
CALL_ROUTES = ("/ws/", "/exotel/")
HEALTH_ROUTE = "/haproxy-health"
_HAND = os.environ.get("LEAN_HAND") == "1"
_NEED_DATA = Progress.NEED_DATA
# What was done, said on stderr at the stop (a correctness check, not a metric).
COUNTS = {"linked": 0, "answered_here": 0, "refused_by_fleet": 0, "ended": 0}


class Fleet:
    """One fleet: its address, its Host, its slots, its kept TLS session."""

    __slots__ = ("active", "host", "host_header", "maxconn", "port", "session")

    def __init__(self, host: str, port: int, maxconn: int) -> None:
        self.host = host
        self.port = port
        self.host_header = f"{host}:{port}"
        self.maxconn = maxconn
        self.active = 0
        self.session: _HeldSession | None = None


class Fleets:
    """leastconn under maxconn; ties go round-robin (SPEC 4), by where the scan starts."""

    __slots__ = ("_all", "_next")

    def __init__(self, fleets: list[Fleet]) -> None:
        self._all = fleets
        self._next = 0

    def pick(self) -> Fleet | None:
        fleets = self._all
        n = len(fleets)
        start = self._next
        self._next = (start + 1) % n
        best: Fleet | None = None
        for i in range(n):
            fleet = fleets[(start + i) % n]
            if fleet.active < fleet.maxconn and (best is None or fleet.active < best.active):
                best = fleet
        if best is not None:
            best.active += 1
        return best


class _HeldSession:
    """An OpenSSL SSL_SESSION reference (SSL_get1_session), freed with its holder."""

    __slots__ = ("pointer",)

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __del__(self) -> None:
        calls = tls_socket.session_calls()
        if calls is not None and self.pointer:
            calls.free(self.pointer)
            self.pointer = 0


class Side:
    """One TLS connection of a call, once linked: bytes to ``peer``."""

    __slots__ = ("conn", "peer")

    def __init__(self, conn: TLSConnection) -> None:
        self.conn = conn
        self.peer: Side | None = None

    def data_received(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.conn.write(data)

    def eof_received(self) -> bool:
        return False  # close ours; connection_lost closes the peer

    def connection_lost(self, exc: BaseException | None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.conn.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.conn.resume_reading()


class CarrierSide(Side):
    """The carrier's connection, and the call: its head, its fleet and slot."""

    __slots__ = (
        "_buf",
        "_connecting",
        "_early",
        "_fleet_side",
        "_fleet_ssl",
        "_fleets",
        "_reader",
        "fleet",
        "key",
        "linked",
    )

    def __init__(self, conn: TLSConnection, fleets: Fleets, fleet_ssl: ssl.SSLContext) -> None:
        super().__init__(conn)
        self._fleets = fleets
        self._fleet_ssl = fleet_ssl
        self._reader = None if _HAND else RequestHeadReader(MAX_HEAD_BYTES)
        self._buf: bytearray | None = bytearray()  # the head, until read (hand path)
        self._early = b""  # what came after the head, until linked
        self._connecting: asyncio.Task[None] | None = None
        self._fleet_side: FleetSide | None = None  # connected, its answer not read yet
        self.fleet: Fleet | None = None  # the slot this call holds
        self.key = b""  # the carrier's Sec-WebSocket-Key (hand path)
        self.linked = False

    def handshaken(self, exc: BaseException | None) -> None:
        if exc is None:
            self.conn.start(self)

    def data_received(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.conn.write(data)
        elif self._connecting is not None or self.fleet is not None:
            self._early += data  # sent before the 101: held until linked
        elif _HAND:
            self._hand_head(data)
        else:
            self._own_head(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        fleet_side, self._fleet_side = self._fleet_side, None
        if fleet_side is not None:  # the carrier left before the fleet's answer
            fleet_side.conn.close()
        self.end()

    def end(self) -> None:
        """The call's end: counted once, its slot freed."""
        fleet, self.fleet = self.fleet, None
        if fleet is not None:
            fleet.active -= 1
            COUNTS["ended"] += 1

    def answer(self, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        COUNTS["answered_here"] += 1
        self._buf = self._reader = None
        self.conn.write(local_response(status, text, headers=headers))
        self.conn.close()

    # -- the project's own parsers ----------------------------------------------

    def _own_head(self, data: memoryview) -> None:
        reader = self._reader
        if reader is None:
            return  # answered: the rest is dropped
        try:
            taken = reader.take(data)  # type: ignore[arg-type]  # copied into its buffer
            if taken is None:
                return
            self._reader = None
            head = parse_request_head(*taken, refuse_body=False, refuse_hostless=False)
        except RequestRefused as refused:
            self.answer(refused.status, refused.reason)
            return
        route = ROUTER.route(head.path.decode("latin-1"))
        said = _local_answer(head, route)
        if said is not None:
            self.answer(*said)  # type: ignore[arg-type]
            return
        fleet = self._fleets.pick()
        if fleet is None:
            self.answer(503, "no fleet has a free slot")
            return
        self.fleet = fleet
        self._early = head.trailing
        peername = self.conn.peername
        client_ip = peer_ip(peername[0]) if peername else "unknown"
        exchange = FleetExchange(
            head.method,
            head.target,
            fleet_request_headers(head, fleet_host=fleet.host_header, client_ip=client_ip),
            max_head_bytes=MAX_HEAD_BYTES,
        )
        self._start_connect(fleet, exchange.request_bytes, exchange)

    # -- the hand-written path (LEAN_HAND=1) ------------------------------------

    def _hand_head(self, data: memoryview) -> None:
        buf = self._buf
        if buf is None:
            return  # answered: the rest is dropped
        scanned = max(0, len(buf) - 3)
        buf += data
        end = buf.find(b"\r\n\r\n", scanned)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                self.answer(431, "request head larger than the limit")
            return
        if end + 4 > MAX_HEAD_BYTES:
            self.answer(431, "request head larger than the limit")
            return
        self._buf = None
        head = bytes(buf[:end])
        self._early = bytes(buf[end + 4 :])
        peername = self.conn.peername
        client_ip = peer_ip(peername[0]) if peername else "unknown"
        fleets = self._fleets
        said = hand_request(head, client_ip, fleets)
        if len(said) == 2:  # (status, reason)
            self.answer(*said)  # type: ignore[arg-type]
            return
        request, fleet, self.key = said  # type: ignore[misc]
        self.fleet = fleet
        self._start_connect(fleet, request, None)

    # -- the fleet ---------------------------------------------------------------

    def _start_connect(self, fleet: Fleet, request: bytes, exchange: FleetExchange | None) -> None:
        self._connecting = self.conn.loop.create_task(self._connect(fleet, request, exchange))

    async def _connect(self, fleet: Fleet, request: bytes, exchange: FleetExchange | None) -> None:
        try:
            fleet_conn = await connect(
                fleet.host,
                fleet.port,
                self._fleet_ssl,
                server_hostname=fleet.host,
                timeout=CONNECT_TIMEOUT,
                kept_session=fleet.session,
            )
        except (OSError, TimeoutError):
            self._connecting = None
            fleet.session = None  # as the ingress drops a session offered to a failed connection
            self.answer(503, "the fleet cannot be reached")
            self.end()
            return
        self._connecting = None
        if self.conn.is_closing():  # the carrier left while we connected
            fleet_conn.close()
            return
        side = self._fleet_side = FleetSide(fleet_conn, self, exchange)
        fleet_conn.start(side)
        fleet_conn.write(request)

    def link(self, fleet_side: FleetSide, answer: bytes) -> None:
        """The fleet's 101 (or another answer) read: relay it, then bytes both ways."""
        self._fleet_side = None
        fleet_side.peer, self.peer = self, fleet_side
        self.conn.write(answer)
        if self._early:
            fleet_side.conn.write(self._early)
            self._early = b""
        self.conn.linked()
        fleet_side.conn.linked()


class FleetSide(Side):
    """The fleet's connection: its answer head read, then linked."""

    __slots__ = ("_call", "_exchange", "_fed", "_session_taken")

    def __init__(
        self, conn: TLSConnection, call: CarrierSide, exchange: FleetExchange | None
    ) -> None:
        super().__init__(conn)
        self._call: CarrierSide | None = call
        self._exchange = exchange
        self._fed = b""
        self._session_taken = False

    def data_received(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.conn.write(data)
            return
        call = self._call
        if call is None:
            return
        if not self._session_taken:
            # At its first bytes a TLS 1.3 ticket has come: the newest session kept.
            self._session_taken = True
            calls = tls_socket.session_calls()
            ssl_pointer = self.conn._ssl
            pointer = calls.get1_session(ssl_pointer) if calls and ssl_pointer else 0
            if pointer:
                assert call.fleet is not None
                call.fleet.session = _HeldSession(pointer)
        fed = self._fed = self._fed + data
        exchange = self._exchange
        if exchange is None:
            self._hand_answer(call, fed)
            return
        try:
            progress = exchange.feed(bytes(data))
        except ResponseError as exc:
            self._refused(call, 502, f"the fleet's answer: {exc}")
            return
        if progress is _NEED_DATA:
            return
        head = exchange.head
        assert head is not None
        self._answered(call, exchange.relayable(fed), head.switched)

    def _hand_answer(self, call: CarrierSide, fed: bytes) -> None:
        end = fed.find(b"\r\n\r\n")
        if end < 0:
            if len(fed) > MAX_HEAD_BYTES:
                self._refused(call, 502, "the fleet's answer head is too large")
            return
        if not fed.startswith(b"HTTP/1.1 101 "):
            self._answered(call, fed, switched=False)  # relayed as the fleet sent it
            return
        lowered = fed[:end].lower()
        at = lowered.find(b"\r\nsec-websocket-accept:")
        accept = websocket_accept(call.key)
        if (
            at < 0
            or fed[at + 23 : lowered.find(b"\r\n", at + 2)].strip(b" \t") != accept
            or lowered.find(b"\r\nupgrade: websocket") < 0
        ):
            self._refused(call, 502, "the fleet's 101 does not answer the WebSocket key")
            return
        self._answered(call, fed, switched=True)

    def _answered(self, call: CarrierSide, answer: bytes, switched: bool) -> None:
        self._call = None
        self._fed = b""
        COUNTS["linked" if switched else "refused_by_fleet"] += 1
        call.link(self, answer)

    def _refused(self, call: CarrierSide, status: int, text: str) -> None:
        self._call = None
        call._fleet_side = None
        self.conn.close()
        call.answer(status, text)

    def connection_lost(self, exc: BaseException | None) -> None:
        call, self._call = self._call, None
        super().connection_lost(exc)
        if call is not None:  # gone before its answer
            call._fleet_side = None
            call.answer(502, "the fleet closed before its answer")


# -- the hand-written head work (LEAN_HAND=1) ----------------------------------

_OWS = (32, 9)  # SP, HTAB: none may end a name (bytes' `in` costs a TypeError first)
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Not sent on: hop-by-hop (re-sent as the upgrade), set by us, the carrier's claims
# of its address, scheme or URL (core/forwarding.py's lists, the common names).
_DROPPED = frozenset(
    b"connection keep-alive proxy-connection te trailer transfer-encoding upgrade "
    b"proxy-authorization proxy-authenticate http2-settings host x-forwarded-for "
    b"x-forwarded-proto x-forwarded-host x-real-ip forwarded expect x-client-ip "
    b"true-client-ip cf-connecting-ip x-cluster-client-ip client-ip x-original-url "
    b"x-rewrite-url x-original-host x-host x-scheme".split()
)


def websocket_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


def hand_request(
    head: bytes, client_ip: str, fleets: Fleets
) -> tuple[int, str] | tuple[bytes, Fleet, bytes]:
    """The carrier's head (no final CRLF CRLF) checked, routed, a fleet picked and
    the request for it written: (request, fleet, key), or (status, reason)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return 400, "malformed request line"
    method, target, _ = parts
    path = target.partition(b"?")[0]
    if path == b"/haproxy-health":
        return 200, "ok"
    if not (
        (path.startswith(b"/ws/") and len(path) > 4)
        or (path.startswith(b"/exotel/") and len(path) > 8)
    ):
        return 404, "no such route on this ingress"
    if path.find(b"/.") >= 0 or path.find(b"%") >= 0:
        return 400, "request path has '.' segments or an encoded byte"
    by_name: dict[bytes, bytes] = {}
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        lower = name.lower()
        if not colon or not name or lower in by_name or name[-1] in _OWS:
            return 400, "malformed or repeated header line"
        value = value.strip(b" \t")
        by_name[lower] = value
        headers.append((name, lower, value))
    host = by_name.get(b"host")
    key = by_name.get(b"sec-websocket-key", b"")
    if (
        method != b"GET"
        or host is None
        or b"content-length" in by_name
        or b"transfer-encoding" in by_name
        or by_name.get(b"upgrade", b"").lower().find(b"websocket") < 0
        or by_name.get(b"connection", b"").lower().find(b"upgrade") < 0
        or len(key) != 24
        or by_name.get(b"sec-websocket-version") != b"13"
    ):
        return 400, "a call route accepts only a GET WebSocket upgrade (one key, version 13)"
    fleet = fleets.pick()
    if fleet is None:
        return 503, "no fleet has a free slot"
    ip = client_ip.encode("ascii")
    out = [b"GET ", target, b" HTTP/1.1\r\nHost: ", fleet.host_header.encode("ascii")]
    for name, lower, value in headers:
        if lower not in _DROPPED and not lower.startswith(b"x-forwarded-"):
            out += (b"\r\n", name, b": ", value)
    prior = by_name.get(b"x-forwarded-for")
    out += (
        b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Forwarded-For: ",
        prior + b", " + ip if prior else ip,
        b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: ",
        host,
        b"\r\nX-Real-IP: ",
        ip,
        b"\r\n\r\n",
    )
    return b"".join(out), fleet, key


ROUTER = Router(CALL_ROUTES, HEALTH_ROUTE)


async def serve(
    listen: Address, cert: str, key: str, ca: str, fleet_addresses: Sequence[Address], maxconn: int
) -> None:
    server_ssl = tls.server_ssl_context(Path(cert), Path(key))
    fleet_ssl = tls.fleet_ssl_context(verify=True, ca_file=Path(ca))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fleets = Fleets([Fleet(host, port, maxconn) for host, port in fleet_addresses])

    def accepted(sock: socket.socket) -> None:
        conn = wrap_accepted(loop, sock, server_ssl)
        carrier = CarrierSide(conn, fleets, fleet_ssl)
        conn.start_handshake(HANDSHAKE_TIMEOUT, carrier.handshaken)

    listener = socket.create_server(listen, backlog=1024)
    acceptor = Acceptor(loop, listener, accepted)
    try:
        await stop.wait()
    finally:
        acceptor.close()
        said = ", ".join(f"{k} {v}" for k, v in COUNTS.items())
        print(f"lean_call_splice ({'hand' if _HAND else 'own parsers'}): {said}", file=sys.stderr)


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    parser.add_argument("--key", required=True, help="server key (PEM)")
    parser.add_argument("--ca", required=True, help="CA the fleets' certificates chain to")
    parser.add_argument(
        "--fleet", type=_address, action="append", required=True, help="HOST:PORT (repeat)"
    )
    parser.add_argument("--maxconn", type=int, default=16, help="calls a fleet at most (SPEC 4)")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.cert, args.key, args.ca, args.fleet, args.maxconn))


if __name__ == "__main__":
    main()
