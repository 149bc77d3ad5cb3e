"""The asyncio layer of a call: one Protocol per side, linked as peers.

A carrier connection reads one request head (`RequestHeadReader`), takes a
route (`Router`), and for a call gets a fleet slot (`Dispatcher`), sends the
rebuilt head (`FleetExchange`) and reads the answer, retrying per
`RetryPolicy`. On 101 the two protocols are linked: from then on each
`data_received` writes straight to the peer transport, nothing more. When a
side's write buffer passes its high-water mark, the other side stops being
read until it drains, so a call holds a bounded number of bytes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, cast

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_exchange import FleetExchange, Progress, ResponseError, ResponseHead
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.forwarding import fleet_request_headers
from fleet_ingress.core.request_head import (
    RequestHead,
    RequestHeadReader,
    RequestRefused,
    parse_request_head,
)
from fleet_ingress.core.responses import local_response
from fleet_ingress.core.retry import GIVE_UP_ANSWER, Failure, RetryPolicy
from fleet_ingress.core.routing import RouteKind, Router
from fleet_ingress.core.silence import SilenceLimits, SilencePolicy
from fleet_ingress.logs import RateLimitedLog, fields
from fleet_ingress.net.calls import Call, EndReason, Registry
from fleet_ingress.net.dispatch import Dispatcher, Lease, NoFleetAvailable
from fleet_ingress.net.head_queue import HeadQueue
from fleet_ingress.net.liveness import TcpLiveness, peer_gone

log = logging.getLogger("fleet_ingress.proxy")
access_log = logging.getLogger("fleet_ingress.access")
# Beside the access log (same handler, same JSON lines): one line per refused
# head, so a scan or a misbehaving carrier shows (HAProxy logs <BADREQ>).
refused_log = logging.getLogger("fleet_ingress.refused")
# Lines a second at most: a flood of bad heads is counted, not written out.
REFUSED_LINES_PER_SECOND = 20
_LOGGED_TARGET = 256

# A side stops reading its peer when its own write buffer passes this.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# Bytes a side may send before the other side is linked (a carrier's first
# frames before the fleet's 101, a fleet's first frames before we relay it).
MAX_EARLY_BYTES = 64 * 1024
# The most a transport delivers in one read (uvloop and asyncio's SSL layer
# read 256 KiB at most); one read may land on a buffer just under the mark.
MAX_READ_CHUNK = 256 * 1024
# What one call can hold, both directions together: the bound flow control keeps.
MAX_BUFFERED_PER_CALL = 2 * (WRITE_HIGH_WATER + MAX_READ_CHUNK) + 2 * MAX_EARLY_BYTES
# A WebSocket close frame (FIN + opcode 8) fits in 131 bytes (125 payload,
# 2 header, 4 mask). Seeing one alone in a read tells who hung up: in a normal
# close the fleet (the server) ends TCP first whoever asked, so TCP alone
# would blame the fleet for every carrier hang-up.
_CLOSE_FRAME_FIRST_BYTE = 0x88
_MAX_CLOSE_FRAME = 131
# A closing transport may wait this long for its peer to take pending bytes.
CLOSE_FLUSH_TIMEOUT = 10.0
# One read buffer for every connection in the process: the loop reads (or
# decrypts) into it and each read is copied out at once. Without it uvloop's
# SSL layer gives each connection's reads a 256 KiB buffer of its own, most of
# a call's resident memory (bench/README.md: 76.5 -> 60 KiB per call).
_READ_BUFFER = memoryview(bytearray(MAX_READ_CHUNK))


@dataclass(frozen=True)
class ProxyContext:
    """What a connection needs to serve; swapped as a whole on reload."""

    router: Router
    dispatcher: Dispatcher
    registry: Registry
    retry: RetryPolicy
    fleet_ssl: ssl.SSLContext
    connect_timeout: float
    response_timeout: float
    request_timeout: float
    silence: SilencePolicy  # timeouts.tunnel, carrier_silence, fleet_silence, per route
    liveness: TcpLiveness  # TCP user timeout and keepalive, both sides
    max_head_bytes: int
    max_header_count: int
    max_connections: int
    access_log: bool = True
    # One per ingress, kept across reloads; None writes no refused-request lines.
    refusals: RateLimitedLog | None = None
    # One per ingress: where complete heads wait for their parse (net/head_queue.py).
    heads: HeadQueue = field(default_factory=HeadQueue)


class _Side(asyncio.BufferedProtocol):
    """What both sides share: the link to the peer, flow control, the read buffer."""

    transport: asyncio.Transport | None = None
    # The peer's transport once linked: the hot path writes straight to it.
    peer: asyncio.Transport | None = None
    peer_side: _Side | None = None
    bytes_received = 0
    lost = False
    reading_paused = False  # by flow control (the peer's buffer is full)
    _abort_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports duck-type asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def eof_received(self) -> bool:
        return False  # close our side too; the peer follows in connection_lost

    # Flow control: my write buffer is full, so stop reading what fills it.
    def pause_writing(self) -> None:
        if self.peer_side is not None:
            self.peer_side.pause_reading()

    def resume_writing(self) -> None:
        if self.peer_side is not None:
            self.peer_side.resume_reading()

    def pause_reading(self) -> None:
        t = self.transport
        if not self.reading_paused and t is not None and not t.is_closing():
            self.reading_paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self.transport
        if self.reading_paused and t is not None and not t.is_closing():
            self.reading_paused = False
            t.resume_reading()

    def close(self) -> None:
        """Close after pending bytes are flushed (TLS cannot half-close), but
        never wait longer than CLOSE_FLUSH_TIMEOUT on a peer that does not read."""
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        t.close()
        if t.get_write_buffer_size():
            self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, t.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()

    def buffered_bytes(self) -> int:
        t = self.transport
        return 0 if t is None or self.lost else t.get_write_buffer_size()

    def unlink(self) -> None:
        self.peer = self.peer_side = self.transport = None


class CarrierState(enum.Enum):
    HEAD = "head"  # reading the request head
    PARSING = "parsing"  # the head is complete, queued for its parse; later bytes wait
    CONNECTING = "connecting"  # finding a fleet; early carrier bytes wait, bounded
    TUNNEL = "tunnel"
    ANSWERING = "answering"  # a local answer or a fleet's non-101 being sent


class CarrierProtocol(_Side):
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.state = CarrierState.HEAD
        self.route_label = "-"  # for metrics: "-" until a head is routed
        self.target = ""  # the head's target once read (for the refused-request line)
        self.client_ip = ""
        self.call: Call | None = None
        self._reader = RequestHeadReader(ctx.max_head_bytes, ctx.max_header_count)
        self._early = bytearray()
        self._head_timer: asyncio.TimerHandle | None = None
        self._setup: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peername = transport.get_extra_info("peername")
        self.client_ip = _client_ip(peername[0]) if peername else "unknown"
        registry = self.ctx.registry
        registry.connections.add(self)
        registry.connections_total += 1
        self._head_timer = asyncio.get_running_loop().call_later(
            self.ctx.request_timeout, self._head_timed_out
        )

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:  # the hot path
            self.bytes_received += len(data)
            peer.write(data)
            if len(data) <= _MAX_CLOSE_FRAME and data[0] == _CLOSE_FRAME_FIRST_BYTE:
                _note_close_frame(self.call, EndReason.CARRIER_CLOSED)
            return
        if self.state is CarrierState.HEAD:
            self._on_head_bytes(data)
        elif self.state is CarrierState.CONNECTING or self.state is CarrierState.PARSING:
            # Kept reading while a fleet is found, so a carrier that hangs up
            # is noticed at once; what it sends early waits, within a bound.
            self._early += data
            if len(self._early) >= MAX_EARLY_BYTES:
                self.pause_reading()
        # ANSWERING: bytes are dropped; reading goes on only to see the carrier leave.

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.ctx.registry.connections.discard(self)
        if self._head_timer is not None:
            self._head_timer.cancel()
        call = self.call
        if call is None:
            # Protocol, transport, TLS state and head timer point at each other: left
            # as cycles, every refused connection waits for the cyclic collector, whose
            # pauses under a flood (10-20 ms, measured) are jitter on every live call.
            self._head_timer = None
            self.unlink()
            return
        if call.end_reason is None:
            call.end_reason = call.hung_up_by or _lost_reason(
                exc, EndReason.CARRIER_CLOSED, EndReason.CARRIER_LOST
            )
        self._abandon_setup()
        fleet_side = call.fleet_side
        if fleet_side is not None:
            fleet_side.close()
        _finish_if_done(self.ctx, call)

    def _head_timed_out(self) -> None:
        if self.state is CarrierState.HEAD:
            self.answer(408, "request head not received in time")

    def _on_head_bytes(self, data: bytes) -> None:
        try:
            taken = self._reader.take(data)
        except RequestRefused as refused:
            self.answer(refused.status, refused.reason)
            return
        if taken is None:
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
        # Parsed on a later loop turn, a bounded number per turn (net/head_queue.py):
        # a flood of large heads must not hold the calls' frames. What the carrier
        # sends meanwhile (its first frames) waits with what came after the head.
        raw, trailing = taken
        self.state = CarrierState.PARSING
        self._early += trailing
        if len(self._early) >= MAX_EARLY_BYTES:
            self.pause_reading()
        self.ctx.heads.add(lambda: self._parse_head(raw))

    def _parse_head(self, raw: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.state is not CarrierState.PARSING:
            return  # the carrier left, or the ingress is stopping
        try:
            head = parse_request_head(raw)
        except RequestRefused as refused:
            self.answer(refused.status, refused.reason)
            return
        route = self.ctx.router.route(head.path.decode("latin-1"))
        self.route_label = route.label
        # Bounded: a scanner's 16 KiB target would make a 16 KiB log line.
        self.target = head.target[:_LOGGED_TARGET].decode("latin-1")
        if route.kind is RouteKind.HEALTH:
            # Like HAProxy's monitor-uri: any method, any version gets 200 (HEAD no body).
            self.answer(200, "ok", head_only=head.method == b"HEAD")
        elif route.kind is RouteKind.NOT_FOUND:
            self.answer(404, "no such route on this ingress")
        elif head.http_version != b"1.1":
            self.answer(400, "a call is a WebSocket upgrade, which needs HTTP/1.1")
        elif not head.is_websocket_upgrade:
            self.answer(400, "a call route accepts only a GET WebSocket upgrade")
        else:
            self.state = CarrierState.CONNECTING
            call = Call(self, self.client_ip, route.prefix, route.bot_id)
            self.call = call
            self.ctx.registry.add_call(call)
            self._setup = asyncio.get_running_loop().create_task(
                _connect_call(self.ctx, self, call, head)
            )

    def _abandon_setup(self) -> None:
        setup, self._setup = self._setup, None
        if setup is not None and not setup.done():
            setup.cancel()

    def answer(self, status: int, text: str, *, head_only: bool = False) -> None:
        """Answer locally and close (every local answer ends the connection)."""
        self.state = CarrierState.ANSWERING
        if self._head_timer is not None:
            self._head_timer.cancel()
        self.ctx.registry.count_request(self.route_label, status)
        if self.call is not None:
            self.call.status = status
            self.call.end_reason = EndReason.REFUSED
        elif status >= 400 and self.ctx.refusals is not None and self.ctx.access_log:
            # A call that is refused has its access-log line; a head that never
            # became a call has this one.
            self.ctx.refusals.info(
                "request refused",
                client_ip=self.client_ip,
                listener="wss",
                route=self.route_label,
                target=self.target,
                status=status,
                reason=text,
            )
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(local_response(status, text, head_only=head_only))
        self.close()

    def take_early_bytes(self) -> bytes:
        early = bytes(self._early)
        self._early.clear()
        return early

    def buffered_bytes(self) -> int:
        return super().buffered_bytes() + len(self._early) + self._reader.buffered


class FleetProtocol(_Side):
    """The fleet side of one call attempt."""

    def __init__(self, exchange: FleetExchange, lease: Lease) -> None:
        self.exchange = exchange
        self.lease = lease
        self.head_received: asyncio.Future[ResponseHead] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending = bytearray()  # raw bytes from the fleet, until linked
        self._relaying = False  # passing a non-101 answer through

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.exchange.request_bytes)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:  # the hot path
            self.bytes_received += len(data)
            peer.write(data)
            if self._relaying:
                self._relay_progress(self.exchange.feed(data))
            elif len(data) <= _MAX_CLOSE_FRAME and data[0] == _CLOSE_FRAME_FIRST_BYTE:
                carrier = self.peer_side
                if isinstance(carrier, CarrierProtocol):
                    _note_close_frame(carrier.call, EndReason.FLEET_CLOSED)
            return
        self._pending += data
        if self.head_received.done():
            # Head read, not linked yet: hold what came with it, read no more.
            self.pause_reading()
            return
        try:
            progress = self.exchange.feed(data)
        except ResponseError as exc:
            self.head_received.set_exception(exc)
            return
        if progress is not Progress.NEED_DATA:
            assert self.exchange.head is not None
            self.pause_reading()
            self.head_received.set_result(self.exchange.head)
        elif len(self._pending) > self.exchange.max_head_bytes:
            # Complete 1xx heads escape h11's size limit: bound them all here.
            self.head_received.set_exception(
                ResponseError("junk-response", "response head larger than the limit")
            )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.lease.release()
        if not self.head_received.done():
            try:
                self.exchange.feed_eof()
            except ResponseError as error:
                self.head_received.set_exception(error)
            else:  # pragma: no cover - feed_eof raises when no head was read
                self.head_received.set_exception(ResponseError("empty-response", "closed"))
            return
        if self._relaying and self.peer_side is not None:
            self._relay_progress(Progress.BODY_COMPLETE)
        carrier = self.peer_side
        if isinstance(carrier, CarrierProtocol) and carrier.call is not None:
            call = carrier.call
            if call.end_reason is None:
                call.end_reason = call.hung_up_by or _lost_reason(
                    exc, EndReason.FLEET_CLOSED, EndReason.FLEET_LOST
                )
            carrier.close()
            _finish_if_done(carrier.ctx, call)

    def link(self, carrier: CarrierProtocol, *, relaying: bool) -> None:
        """Relay everything the fleet sent so far and what it sends from now on.

        Flow control is wired first, so the carrier's buffer filling up
        (even with these first bytes) stops the fleet being read."""
        assert carrier.transport is not None
        self._relaying = relaying
        self.peer_side = carrier
        self.peer = carrier.transport
        carrier.peer_side = self
        pending = bytes(self._pending)
        self._pending.clear()
        carrier.transport.write(pending)
        if carrier.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
            self.resume_reading()
        if relaying:
            self._relay_progress(self.exchange.advance())

    def _relay_progress(self, progress: Progress) -> None:
        if progress is Progress.BODY_COMPLETE:
            self._relaying = False
            self.close()
            if self.peer_side is not None:
                self.peer_side.close()

    def buffered_bytes(self) -> int:
        return super().buffered_bytes() + len(self._pending)


def _lost_reason(exc: Exception | None, closed: EndReason, lost: EndReason) -> EndReason:
    """Why a side's connection ended: closed by its peer, gone without a word
    (TCP user timeout, keepalive, unreachable), or another error."""
    if exc is None:
        return closed
    return lost if peer_gone(exc) else EndReason.ERROR


def _note_close_frame(call: Call | None, side: EndReason) -> None:
    if call is not None and call.hung_up_by is None:
        call.hung_up_by = side


def _finish_if_done(ctx: ProxyContext, call: Call) -> None:
    """End the call once both sides are gone: access log, out of the registry."""
    fleet_side = call.fleet_side
    if not call.carrier.lost or (fleet_side is not None and not fleet_side.lost):
        return
    if not ctx.registry.remove_call(call):
        return
    call.quiet = None
    if ctx.access_log:
        access_log.info("call ended", extra=fields(**call.access_record()))
    _break_cycles(call)


def _client_ip(address: str) -> str:
    """An IPv4 carrier on a dual-stack listener ("::ffff:203.0.113.7") as IPv4."""
    if address.startswith("::ffff:") and "." in address:
        return address.removeprefix("::ffff:")
    return address


def _break_cycles(call: Call) -> None:
    """An ended call's objects point at each other (sides, transports, the
    call, its idle watch): left as cycles, they and their TLS state wait for a
    full garbage collection, minutes under load (the soak's RSS growth)."""
    for side in (call.carrier, call.fleet_side):
        if side is not None:
            side.unlink()
    call.carrier.call = None


class _AttemptFailed(Exception):
    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail


async def _connect_call(
    ctx: ProxyContext, carrier: CarrierProtocol, call: Call, head: RequestHead
) -> None:
    """Find a fleet that answers and link the call to it, or answer the carrier."""
    received_at = time.monotonic()
    tried: list[str] = []
    failure: Failure | None = None
    lease: Lease | None = None
    retried_from: FleetState | None = None  # the fleet the last attempt failed on
    try:
        while True:
            try:
                lease = await ctx.dispatcher.lease(avoid=tried)
            except NoFleetAvailable as exc:
                if failure is None:
                    carrier.answer(503, exc.reason)
                else:
                    carrier.answer(*GIVE_UP_ANSWER[failure])
                return
            if lease.fleet.admin is not Admin.READY:
                # Drained (or removed) between the queue's hand-off and this turn.
                lease.release()
                continue
            if retried_from is not None and retried_from is not lease.fleet:
                retried_from.redispatches += 1
            retried_from = None
            call.attempts += 1
            call.lease = lease
            tried.append(lease.fleet.name)
            try:
                fleet_side = await _attempt(ctx, call, head, lease)
            except _AttemptFailed as exc:
                lease.release()
                failure = exc.failure
                log.warning(
                    "fleet attempt failed",
                    extra=fields(
                        call_id=call.id,
                        fleet=lease.fleet.name,
                        attempt=call.attempts,
                        failure=exc.failure.value,
                        detail=exc.detail,
                    ),
                )
                if ctx.retry.retry_failure(exc.failure, call.attempts):
                    lease.fleet.retries += 1
                    retried_from = lease.fleet
                    continue
                carrier.answer(*GIVE_UP_ANSWER[exc.failure])
                return
            response = fleet_side.head_received.result()
            lease.fleet.responses[response.status] += 1
            if not response.switched and ctx.retry.retry_status(response.status, call.attempts):
                fleet_side.abort()
                lease.release()
                lease.fleet.retries += 1
                retried_from = lease.fleet
                continue
            call.status = response.status
            call.fleet_side = fleet_side
            ctx.registry.count_request(carrier.route_label, response.status)
            if response.switched:
                call.handshake_ms = (time.monotonic() - received_at) * 1000
                call.tunnel_since = time.monotonic()
                lease.fleet.calls_total += 1
                fleet_side.link(carrier, relaying=False)
                _link_carrier(carrier, fleet_side)
                ctx.registry.sweep.watch(call, ctx.silence.for_route(call.route))
                ctx.registry.call_linked(call)
            else:
                carrier.state = CarrierState.ANSWERING
                call.end_reason = EndReason.REFUSED
                # A fleet that stalls in the middle of its answer must not
                # hold the call (and its slot) forever.
                ctx.registry.sweep.watch(call, SilenceLimits(idle=ctx.response_timeout))
                fleet_side.link(carrier, relaying=True)
            if fleet_side.lost:  # the fleet closed right after answering
                carrier.close()
                _finish_if_done(ctx, call)
            return
    except asyncio.CancelledError:
        # The carrier left mid-setup: a slot not yet tied to a fleet
        # connection goes back now (release is idempotent).
        if lease is not None and call.fleet_side is None:
            lease.release()
        raise
    except Exception:
        log.exception("call setup failed", extra=fields(call_id=call.id))
        if call.fleet_side is not None:
            call.fleet_side.abort()
        elif lease is not None:
            lease.release()
        carrier.answer(502, "internal error while connecting the call")
        call.end_reason = EndReason.ERROR


def _link_carrier(carrier: CarrierProtocol, fleet_side: FleetProtocol) -> None:
    carrier.state = CarrierState.TUNNEL
    assert fleet_side.transport is not None
    early = carrier.take_early_bytes()
    if early:
        carrier.bytes_received += len(early)
        fleet_side.transport.write(early)
    carrier.peer = fleet_side.transport
    if fleet_side.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
        carrier.resume_reading()


async def _attempt(ctx: ProxyContext, call: Call, head: RequestHead, lease: Lease) -> FleetProtocol:
    """One attempt on one fleet: connect, send the head, read the answer's head."""
    spec = lease.fleet.spec
    exchange = FleetExchange(
        head.method,
        head.target,
        fleet_request_headers(head, fleet_host=spec.host_header, client_ip=call.client_ip),
        max_head_bytes=ctx.max_head_bytes,
    )
    loop = asyncio.get_running_loop()
    tls: dict[str, Any] = {}
    if spec.scheme == "https":
        tls = {"ssl": ctx.fleet_ssl, "server_hostname": spec.host}
    try:
        async with asyncio.timeout(ctx.connect_timeout):
            transport, fleet_side = await loop.create_connection(
                lambda: FleetProtocol(exchange, lease), spec.host, spec.port, **tls
            )
    except TimeoutError:
        raise _AttemptFailed(
            Failure.CONN_FAILURE, f"no connection within {ctx.connect_timeout:g}s"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise _AttemptFailed(Failure.CONN_FAILURE, str(exc) or type(exc).__name__) from None
    # A fleet host that vanishes from here on fails this socket within
    # seconds, not after the kernel's 15 minutes of retransmissions.
    if (sock := transport.get_extra_info("socket")) is not None:
        ctx.liveness.apply(sock)
    try:
        async with asyncio.timeout(ctx.response_timeout):
            await fleet_side.head_received
    except TimeoutError:
        fleet_side.head_received.cancel()
        fleet_side.abort()
        raise _AttemptFailed(
            Failure.RESPONSE_TIMEOUT, f"no response head within {ctx.response_timeout:g}s"
        ) from None
    except ResponseError as exc:
        fleet_side.abort()
        raise _AttemptFailed(Failure(exc.kind), exc.detail) from None
    except asyncio.CancelledError:
        fleet_side.head_received.cancel()
        fleet_side.abort()
        raise
    return fleet_side
