"""The asyncio layer of a call: the pump of its machine, one Protocol per side.

Where a call stands and what happens next is decided by its machine
(`core.call_machine`): the carrier protocol feeds it events (the head read,
a slot granted or refused, the fleet connected, its answer's head, a timer,
a side gone, an end asked from outside) and carries out its commands (answer,
take or give back a slot, connect, send the head, link, close, abort, time).
The head reader (`RequestHeadReader`) and the fleet exchange (`FleetExchange`)
are fed here, and what they find is reported to the machine.

Outside the machine, on purpose: the tunnel's hot path. Once linked, each
`data_received` adds to a counter, writes straight to the peer transport and
feeds its direction's frame tracker; only a side's WebSocket close frame is
reported, once it is whole (`_Side.close_frame_read`). When a side's write buffer
passes its high-water mark, the other side stops being read until it drains,
so a call holds a bounded number of bytes.

Both sides' TLS runs on socket BIOs (`net.tls_socket.TLSConnection`), which
offers what the protocols use of an asyncio transport: `serve` attaches a side
to one. A plain-TCP fleet (an `http://` URL) stays on an asyncio transport,
and so does a plain carrier in the socketpair tests. A TLS side's reads are
views of a buffer shared by every connection, valid only during
`data_received`: whatever is kept is copied (`_early`, `_pending`, the head
reader's and exchange's buffers, a TLSConnection's unfinished write).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from fleet_ingress.core.addresses import peer_ip
from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.call_machine import (
    CARRIER_CLOSE_FRAME,
    CARRIER_CLOSED,
    FLEET_CLOSE_FRAME,
    FLEET_CLOSED,
    FLEET_CONNECTED,
    FLEET_SWITCHED,
    GOODBYE_REPLY_WAIT,
    HEAD_COMPLETE,
    AbortSide,
    Answer,
    CallEnded,
    CallMachine,
    CallRules,
    CancelSlotWait,
    CancelTimer,
    CarrierLost,
    CloseSide,
    Command,
    ConnectFleet,
    DropFleet,
    EndReason,
    EndRequested,
    Event,
    FleetAnswerComplete,
    FleetConnectFailed,
    FleetError,
    FleetFull,
    FleetHead,
    FleetLost,
    FleetUnreachable,
    FleetWentDown,
    Goodbye,
    HeadParsed,
    HeadRefused,
    IllegalEvent,
    Link,
    LogAttemptFailed,
    Lost,
    OfferedConnectionFailed,
    OpenCall,
    ParseHead,
    Relay,
    ReleaseSlot,
    SendHead,
    SetupFailed,
    Side,
    SideFinished,
    SidesGone,
    SlotGranted,
    SlotRefused,
    StartTimer,
    State,
    TakeSlot,
    Timer,
    TimerFired,
)
from fleet_ingress.core.fleet_exchange import FleetExchange, Progress, ResponseError
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.forwarding import fleet_request_headers
from fleet_ingress.core.request_head import (
    RequestHead,
    RequestHeadReader,
    RequestRefused,
    logged_first_line,
    logged_target,
    parse_request_head,
)
from fleet_ingress.core.responses import local_response
from fleet_ingress.core.retry import Failure, RetryPolicy
from fleet_ingress.core.routing import Router
from fleet_ingress.core.silence import SilenceLimits, SilencePolicy
from fleet_ingress.core.ws_frames import GAVE_UP, FrameTracker, close_frame
from fleet_ingress.logs import RateLimitedLog, fields, write_event
from fleet_ingress.net import fleet_sessions
from fleet_ingress.net.calls import Call, Registry
from fleet_ingress.net.dispatch import DescribedCall, HeldSlot, NoFleetAvailable, SlotSource
from fleet_ingress.net.head_queue import HeadQueue
from fleet_ingress.net.late_timers import PatientTimer, peer_moved, put_off_by
from fleet_ingress.net.liveness import (
    RESET_ON_CLOSE,
    PeerGaveNoAnswer,
    PeerStoppedReading,
    TcpLiveness,
    peer_gone,
)
from fleet_ingress.net.tcp_connect import HOST_WIDE_FIXES, Underway, open_tcp, out_of_resources
from fleet_ingress.net.tls_socket import Buffer, SessionRefused, TLSConnection, connect

log = logging.getLogger("fleet_ingress.proxy")
access_log = logging.getLogger("fleet_ingress.access")
# Beside the access log (same handler, same JSON lines): one line per refused
# head, so a scan or a misbehaving carrier shows (HAProxy logs <BADREQ>).
refused_log = logging.getLogger("fleet_ingress.refused")
# Lines a second at most: a flood of bad heads is counted, not written out.
REFUSED_LINES_PER_SECOND = 20
# Warnings a flood can cause (failed fleet attempts, the :80 upstream's failures).
WARNING_LINES_PER_SECOND = 20
# A worker out of descriptors or memory fails every call's connect to a fleet:
# said once this often (the rest counted), naming the fix, as net.listener
# says an accept() that fails for it.
CONNECT_OUT_OF_RESOURCES = (
    "cannot connect to fleets: this worker is out of descriptors or memory; calls "
    "are answered 503 and no fleet is tried again. EMFILE: raise LimitNOFILE "
    f"(systemd) or ulimit -n, or lower limits.max_connections; {HOST_WIDE_FIXES}"
)
OUT_OF_RESOURCES_EVERY = 5.0

# A side stops reading its peer when its own write buffer passes this.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# Bytes a side may send before the other side is linked (a carrier's first
# frames before the fleet's 101, a fleet's first frames before we relay it).
MAX_EARLY_BYTES = 64 * 1024
# A carrier whose reading stopped at MAX_EARLY_BYTES before its call is linked
# is looked at this often (one getsockopt) for an end TCP has seen and no read
# will (`CarrierProtocol._look_while_kept`).
EARLY_LOOK_EVERY = 0.5
# The most a transport delivers in one read (a plain asyncio transport reads
# 256 KiB at most here; a TLSConnection one record, 16 KiB); one read may land
# on a buffer just under the mark.
MAX_READ_CHUNK = 256 * 1024
# What one call can hold, both directions together: the bound flow control keeps.
MAX_BUFFERED_PER_CALL = 2 * (WRITE_HIGH_WATER + MAX_READ_CHUNK) + 2 * MAX_EARLY_BYTES
# A WebSocket close frame (FIN + opcode 8) fits in 131 bytes (125 payload,
# 2 header, 4 mask). Seeing a side's close frame tells who hung up: in a normal
# close the fleet (the server) ends TCP first whoever asked, so TCP alone
# would blame the fleet for every carrier hang-up. The frame tracker finds it
# anywhere in a read; a read that is one whole close frame is the fallback
# where a direction is not tracked (a tracker that gave up).
_CLOSE_FRAME_FIRST_BYTE = 0x88
_MAX_CLOSE_FRAME = 131
# A closing transport may wait this long for its peer to take pending bytes:
# timeouts.close_flush's default (ProxyContext.close_flush_timeout).
CLOSE_FLUSH_TIMEOUT = 10.0
# A side the ingress says goodbye to (a WebSocket close frame: CloseSide's
# `goodbye`) is sent it at the next frame boundary of what is relayed to it:
# one still mid-frame this long after is closed without it, as before.
GOODBYE_BOUNDARY_WAIT = 0.2
# Then its close reply is waited for, GOODBYE_REPLY_WAIT at most (the call
# machine's), before the TLS close.
# One read buffer for every plain asyncio transport in the process (http://
# fleets): the loop reads into it and each read is copied out at once. TLS sides
# read into tls_socket's own shared buffer.
_READ_BUFFER = memoryview(bytearray(MAX_READ_CHUNK))


@dataclass(frozen=True)
class ProxyContext:
    """What a connection needs to serve; swapped as a whole on reload."""

    router: Router
    slots: SlotSource  # this process's Dispatcher, or a worker's SlotClient
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
    # The process's descriptor limit when it, not limits.max_connections, sets
    # max_connections (net.listener.connections_within); None otherwise.
    descriptor_limit: int | None = None
    # limits.new_connection_share: the listener's accept pacing (core/accept_pacing.py).
    new_connection_share: float = 1.0
    access_log: bool = True
    # timeouts.close_flush: a closing side's peer that reads nothing is cut then.
    close_flush_timeout: float = CLOSE_FLUSH_TIMEOUT
    # One per ingress, kept across reloads; None writes no refused-request lines.
    refusals: RateLimitedLog | None = None
    # One per ingress: the "fleet attempt failed" warnings (None: each written).
    attempt_failures: RateLimitedLog | None = None
    # One per ingress: CONNECT_OUT_OF_RESOURCES, once every OUT_OF_RESOURCES_EVERY
    # (None: each written).
    out_of_resources: RateLimitedLog | None = None
    # One per ingress: where complete heads wait for their parse (net/head_queue.py).
    heads: HeadQueue = field(default_factory=HeadQueue)
    # What each call's machine consults (built from the fields above).
    rules: CallRules = field(init=False, repr=False)
    # `slots.lease_now` where the slot source can hand a free slot over at
    # once (this process's `Dispatcher`; a worker's `SlotClient` from its
    # grant budget), else None: every lease is awaited. It answers None when
    # it cannot (the call queues, or the supervisor is asked): then awaited.
    lease_now: Callable[[tuple[str, ...], DescribedCall | None], HeldSlot | None] | None = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        rules = CallRules(
            router=self.router,
            retry=self.retry,
            request_timeout=self.request_timeout,
            connect_timeout=self.connect_timeout,
            response_timeout=self.response_timeout,
        )
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "lease_now", getattr(self.slots, "lease_now", None))


class _Side(asyncio.BufferedProtocol):
    """What both sides share: the link to the peer, flow control, the read buffer."""

    # Slots, not an instance dict (here and in both sides): CPython 3.11 keeps
    # an instance's attributes inline only while its class's shared key table
    # takes their names, and that table's room shrinks by one with every
    # instance made. Carriers accepted in a burst before the first call linked
    # froze it without the names a link sets (peer, tracker, transport...):
    # every later call's sides held their attributes in a dict, read on the
    # relay's hot path (tests/socketpair/test_side_attributes.py).
    __slots__ = (
        "__weakref__",  # tests and diagnostics ask whether an ended call's sides are freed
        "_abort_timer",
        "_loop",
        "_reply_timer",
        "bytes_received",
        "close_flush_timeout",
        "close_heard",
        "given_up",
        "lost",
        "peer",
        "peer_side",
        "reading_paused",
        "saying_goodbye",
        "tracker",
        "transport",
    )
    _masked = False  # whether this side's frames are masked (a client's): per class

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # The peer's transport once linked: the hot path writes straight to it.
        self.peer: asyncio.Transport | None = None
        self.peer_side: _Side | None = None
        self.bytes_received = 0
        self.lost = False
        # Cut for a peer that stopped answering.
        self.given_up: PeerGaveNoAnswer | None = None
        self.reading_paused = False  # by flow control (the peer's buffer is full)
        self._abort_timer: PatientTimer | None = None
        # Where frames begin in what this side reads, once a tunnel (core.ws_frames).
        self.tracker: FrameTracker | None = None
        # A close frame is sent to this side, or waits for a boundary.
        self.saying_goodbye = False
        self.close_heard = False  # this side's close frame was reported to the machine
        self._reply_timer: PatientTimer | None = None
        # Its context's close_flush_timeout (a fleet side's: its carrier's), set at start.
        self.close_flush_timeout = CLOSE_FLUSH_TIMEOUT
        # The loop, looked up once a call (the carrier's connection_made), not at
        # each timer: CPython 3.11's get_running_loop makes a getpid system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports duck-type asyncio.Transport without subclassing it
        # (and so does TLSConnection): taken as one, with no typing.cast call at
        # run time (~860 instructions, callgrind; two a call here, two in `serve`).
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes].tobytes())

    def data_received(self, data: Buffer) -> None:
        """Bytes (asyncio transports) or a view valid only during this call (TLS)."""
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
        never wait longer than close_flush_timeout on a peer that does not read."""
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        if isinstance(t, TLSConnection):
            # Its own close waits no less than the flush may take (10 s else:
            # a close_flush above it was cut there).
            t.close(flush_within=self.close_flush_timeout)
        else:
            t.close()
        if t.get_write_buffer_size():
            # Patient: after a stall, a peer that read meanwhile (the socket
            # writable) gets back the time the loop took, so that what it took
            # its time to read is not cut; one that read nothing is cut at once.
            sock = t.get_extra_info("socket")
            self._abort_timer = PatientTimer(
                self._running_loop(),
                self.close_flush_timeout,
                t.abort,
                answered=lambda: peer_moved(sock),
            )

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def tcp_socket(self) -> Any:
        t = self.transport
        return None if t is None or self.lost else t.get_extra_info("socket")

    def give_up(self, why: PeerGaveNoAnswer) -> None:
        """Its peer stopped answering (`net.dead_peers`): cut the connection
        with a reset (SO_LINGER 0), which a peer whose receive path still works
        gets (the kernel's own user timeout would drop it without a word); the
        side is lost as by that timeout, `why` the access line's detail."""
        t = self.transport
        if t is None or self.lost:
            return
        sock = t.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        self.given_up = why
        t.abort()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def write_goodbye(self, frame: bytes) -> None:
        """Write the close frame (at a frame boundary), then close once the
        side's close reply is read or GOODBYE_REPLY_WAIT has passed."""
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        if frame:  # b"": the other side's own close frame was relayed whole
            t.write(frame)
        # Patient: a reply that came during a stall is read before the close.
        self._reply_timer = PatientTimer(self._running_loop(), GOODBYE_REPLY_WAIT, self.close)

    def close_frame_read(self, data: Buffer) -> None:
        """A read that holds a close frame, or may be one (rare: the hot path
        comes here when the tracker saw a close frame start, or when no tracker
        and a short read starting 0x88). The machine hears of this side's close
        frame once, when all of it is read: reported at its header, the machine
        might close both sides before the rest of it was relayed (a close frame
        cut short to the peer). Nothing may follow a close frame, so it is whole
        when the tracker stands at a frame boundary. Untracked (no tracker, or
        one that gave up), a read that is one whole close frame counts."""
        if self.close_heard:
            return
        tracker = self.tracker
        if tracker is None or tracker.need >= GAVE_UP:
            if not _is_close_frame(data, masked=self._masked):
                return
        elif not tracker.close_whole:
            return  # no close frame (a message's bytes), or not all of it yet
        self.close_heard = True
        self.say_close_frame()

    def say_close_frame(self) -> None:
        """Report this side's close frame (`CloseFrameSeen`)."""
        raise NotImplementedError

    def goodbye_replied(self) -> None:
        """The side's close frame, read after ours: nothing more comes."""
        if self._reply_timer is not None:
            self._reply_timer.cancel()
            self._reply_timer = None
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if self._reply_timer is not None:
            self._reply_timer.cancel()

    def buffered_bytes(self) -> int:
        t = self.transport
        return 0 if t is None or self.lost else t.get_write_buffer_size()

    def read_if_ended(self) -> None:
        t = self.transport
        if isinstance(t, TLSConnection) and not self.lost:
            t.read_if_ended()

    def unlink(self) -> None:
        self.peer = self.peer_side = self.transport = None

    def peer_writer(self, peer: asyncio.Transport) -> asyncio.Transport:
        """What the hot path writes this side's reads to. A TLSConnection keeps a
        copy of what it cannot send at once; an asyncio transport may keep the
        object it was given (asyncio's buffers the unsent view): a view of the
        shared TLS read buffer must reach one as bytes."""
        if isinstance(self.transport, TLSConnection) and not isinstance(peer, TLSConnection):
            return cast(asyncio.Transport, _CopyingWriter(peer))
        return peer


class _CopyingWriter:
    """A TLS side's reads written to a plain-TCP peer (an http:// fleet). Once
    that peer is closed what comes is dropped, as a TLSConnection and asyncio's
    transports drop it: uvloop's raise RuntimeError (a carrier's reads after its
    fleet was lost, while it is sent 1011 and its reply awaited, raised one a
    read, each counted an unexpected error: the second review of session 30)."""

    __slots__ = ("write",)

    def __init__(self, transport: asyncio.Transport) -> None:
        write = transport.write

        def copy(data: Buffer) -> None:
            try:
                write(bytes(data))
            except RuntimeError:
                if not transport.is_closing():
                    raise

        self.write: Callable[[Buffer], None] = copy


class _Dropping:
    """Where a side's reads go once its peer was sent a close frame: nothing
    may follow one in that direction."""

    __slots__ = ()

    def write(self, data: Buffer) -> None:
        pass


_DROPPING = cast(asyncio.Transport, _Dropping())


class _ToFrameBoundary:
    """Relays to `side` up to the end of the frame under way, then sends it
    the close frame (b"": the frame under way is the source's own close frame,
    relayed) and waits for its reply, dropping what follows; or, at `give_up`,
    closes it without one."""

    __slots__ = ("done", "frame", "inner", "side", "timer", "tracker")

    def __init__(
        self, inner: asyncio.Transport, tracker: FrameTracker, frame: bytes, side: _Side
    ) -> None:
        self.inner, self.tracker, self.frame, self.side = inner, tracker, frame, side
        self.timer: PatientTimer | None = None
        self.done = False

    def write(self, data: Buffer) -> None:
        if self.done:
            return
        end = self.tracker.boundary_in(data)  # the hot path feeds it after this write
        if end < 0:
            self.inner.write(data)
            return
        if end:
            self.inner.write(data[:end])
        self._finish(self.frame)

    def give_up(self) -> None:
        self._finish(None)

    def _finish(self, frame: bytes | None) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if frame is None:
            self.side.close()
        else:
            self.side.write_goodbye(frame)


def serve(conn: TLSConnection, side: _Side) -> None:
    """Run a side on a TLS connection whose handshake is done: what an asyncio
    loop does for a protocol with a new transport. Started first, so a side
    that closes or aborts in `connection_made` still gets `connection_lost`."""
    conn.start(side)
    if side._loop is None:  # the connection's, not asked (a getpid: CPython 3.11)
        side._loop = conn.loop
    side.connection_made(conn)  # type: ignore[arg-type]  # an asyncio.Transport by duck typing


# Before the 101, what a carrier sends after its head waits (bounded) for the tunnel.
_EARLY_BYTES_KEPT = frozenset({State.PARSING, State.LEASING, State.CONNECTING, State.AWAITING})
# An attempt on a fleet not answered yet: one its fleet going DOWN gives up.
_ATTEMPT_UNDER_WAY = frozenset({State.CONNECTING, State.AWAITING})
# Where a call is being set up: a failure there is answered 502 (`SetupFailed`).
_SETUP_STATES = frozenset({State.LEASING, State.CONNECTING, State.AWAITING})
# The members the pump reads, as module constants (core/call_machine.py: an Enum
# class's attribute read is about 900 instructions in CPython 3.11).
_HEAD = State.HEAD
_PARSING = State.PARSING
_HALF_CLOSED = State.HALF_CLOSED
_ENDED = State.ENDED
_CARRIER = Side.CARRIER
_FLEET = Side.FLEET
_CONNECT_TIMER = Timer.CONNECT
_END_ERROR = EndReason.ERROR
_LOST_CLOSED = Lost.CLOSED
_LOST_GONE = Lost.GONE
_LOST_RESET = Lost.RESET
_LOST_ERROR = Lost.ERROR


class CarrierProtocol(_Side):
    """The carrier side, and the pump of its call's machine (`core.call_machine`):
    it feeds the machine what the transports, the slot source and the timers say,
    and carries out what the machine commands. It decides nothing itself."""

    __slots__ = (
        "_early",
        "_early_look",
        "_ended_after_bug",
        "_ended_at_bound",
        "_events",
        "_feeding",
        "_fleet",
        "_head",
        "_raw_head",
        "_reader",
        "_received_at",
        "_slot_turn",
        "_task",
        "_timers",
        "_underway",
        "call",
        "client_ip",
        "ctx",
        "fleet_side",
        "machine",
        "target",
    )
    _masked = True  # the carrier is the WebSocket client

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.close_flush_timeout = ctx.close_flush_timeout
        self.machine = CallMachine(ctx.rules)
        self.target = ""  # the head's target once read (for the refused-request line)
        self.client_ip = ""
        self.call: Call | None = None
        self.fleet_side: FleetProtocol | None = None  # the current attempt's
        self._reader: RequestHeadReader | None = RequestHeadReader(
            ctx.max_head_bytes, ctx.max_header_count
        )
        self._raw_head = b""
        self._early = bytearray()
        # The look at a carrier not read at the early bound (`_look_while_kept`),
        # while one is scheduled.
        self._early_look: asyncio.Handle | None = None
        # That look found it ended: what it sends is read to its end and dropped.
        self._ended_at_bound = False
        # Put off after a stall: an answer waiting unread goes first (late_timers).
        self._timers: dict[Timer, asyncio.TimerHandle] = {}
        # The fleet connection's sockets while it connects (`_connect_fleet`).
        self._underway: Underway | None = None
        # The fleet of the current attempt (its TLS session kept at the link),
        # and the session its connection resumed, once connected.
        self._fleet: tuple[FleetState, FleetSpec, fleet_sessions.KeptSession | None] | None = None
        self._task: asyncio.Task[None] | None = None  # waiting for a slot, or connecting
        # The turn a free slot is taken on (`_take_slot`), while it is due.
        self._slot_turn: asyncio.Handle | None = None
        self._head: RequestHead | None = None
        self._received_at = 0.0
        self._feeding = False
        self._events: list[Event] = []  # fed while commands run: they wait their turn
        self._ended_after_bug = False  # tried once; a second failure aborts both sides

    @property
    def route_label(self) -> str:
        return self.machine.route_label

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peername = transport.get_extra_info("peername")
        self.client_ip = peer_ip(peername[0]) if peername else "unknown"
        registry = self.ctx.registry
        registry.connections.add(self)
        registry.connections_total += 1
        registry.counted()
        for command in self.machine.start():
            _COMMANDS[type(command)](self, command)

    def data_received(self, data: Buffer) -> None:
        peer = self.peer
        if peer is not None:  # the hot path
            n = len(data)
            self.bytes_received += n
            peer.write(data)
            if (tracker := self.tracker) is not None:
                if tracker.feed(data, n):  # a close frame started, or it gave up
                    self.close_frame_read(data)
                return
            if n <= _MAX_CLOSE_FRAME and data[0] == _CLOSE_FRAME_FIRST_BYTE:
                self.close_frame_read(data)
            return
        state = self.machine.state
        if state is _HEAD:
            self._on_head_bytes(data)
        elif state in _EARLY_BYTES_KEPT:
            # Kept reading while a fleet is found, so a carrier that hangs up
            # is noticed at once; what it sends early waits, within a bound.
            if not self._ended_at_bound:
                self._early += data
                if len(self._early) >= MAX_EARLY_BYTES:
                    self._early_bound_reached()
        # Otherwise (answering, closing): bytes are dropped; reading goes on
        # only to see the carrier leave.

    def say_close_frame(self) -> None:
        if self.saying_goodbye:
            self.goodbye_replied()
        self.feed(CARRIER_CLOSE_FRAME)

    def eof_received(self) -> bool:
        if self.peer is None or not _ended_cleanly(self.transport):
            return False  # not linked: close (the loss ends what was under way)
        self.feed(SideFinished(_CARRIER))
        return self.machine.state is _HALF_CLOSED  # the fleet's reply may follow

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._early_look is not None:
            self._stop_early_look()
        self.ctx.registry.connections.discard(self)
        exc = exc or self.given_up
        self.feed(CARRIER_CLOSED if exc is None else CarrierLost(*_lost(exc)))
        if self.call is None:
            # Protocol, transport, TLS state and timers point at each other: left
            # as cycles, every refused connection waits for the cyclic collector, whose
            # pauses under a flood (10-20 ms, measured) are jitter on every live call.
            self.unlink()

    def request_end(self, reason: EndReason, why: str = "") -> None:
        """End the call from outside (silence sweep, drain, forced removal)."""
        self.feed(EndRequested(reason, why))

    def fleet_went_down(self, lease: HeldSlot) -> None:
        """The fleet of `lease` went DOWN (`net.fleet_down`): if that is this
        call's attempt under way, connecting or waiting for the fleet's answer,
        its machine gives it up (and retries). A later attempt's lease, a call
        linked (a fleet DOWN keeps its calls) or ending: nothing."""
        call = self.call
        if call is None or call.lease is not lease or not lease.held:
            return
        if self.machine.state in _ATTEMPT_UNDER_WAY:
            self.feed(FleetWentDown())

    def feed(self, event: Event) -> None:
        """Hand the machine an event and carry out its commands. An event raised
        while commands run (a relayed answer that completes as it is linked)
        waits for them, so commands run in the order the machine gave them."""
        if self._feeding:
            self._events.append(event)
            return
        self._feeding = True
        try:
            for command in self.machine.feed(event):
                _COMMANDS[type(command)](self, command)
            while self._events:  # rare, and one or two
                for command in self.machine.feed(self._events.pop(0)):
                    _COMMANDS[type(command)](self, command)
        except Exception as exc:
            # A bug (an event the machine refuses, or a command that raised): said
            # loudly, but the call must not stay where its commands left it, with a
            # timer never started, a carrier never answered and a slot held.
            message = (
                "call machine refused an event; ending the call"
                if isinstance(exc, IllegalEvent)
                else "call command failed; ending the call"
            )
            call_id = None if self.call is None else self.call.id
            log.exception(message, extra=fields(call_id=call_id, state=self.machine.state.value))
            self._events.clear()
            self._feeding = False
            self._end_after_bug(str(exc) or type(exc).__name__)
        finally:
            self._feeding = False

    def _end_after_bug(self, detail: str) -> None:
        """End the call as the ingress's error: answered 502 during its setup,
        closed on both sides once linked. Should that fail too, both sides are
        aborted; their losses reach the machine as events like any other."""
        state = self.machine.state
        if not self._ended_after_bug:
            self._ended_after_bug = True
            if state in _SETUP_STATES:
                self.feed(SetupFailed(detail))
                return
            if self.call is not None and state is not _ENDED:
                self.feed(EndRequested(_END_ERROR))
                return
        if self.fleet_side is not None:
            self.fleet_side.abort()
        self.abort()

    def _on_head_bytes(self, data: Buffer) -> None:
        reader = self._reader
        assert reader is not None  # state HEAD: the head is not taken yet
        try:
            taken = reader.take(data)
        except RequestRefused as refused:
            self.feed(HeadRefused(refused.status, refused.reason))
            return
        if taken is None:
            return
        # Its work is done: a held call does not keep it (memory per call).
        self._reader = None
        # Parsed on a later loop turn, a bounded number per turn (net/head_queue.py):
        # a flood of large heads must not hold the calls' frames. What the carrier
        # sends meanwhile (its first frames) waits with what came after the head.
        self._raw_head, trailing = taken
        self._early += trailing
        if len(self._early) >= MAX_EARLY_BYTES:
            self._early_bound_reached()
        self.feed(HEAD_COMPLETE)

    def _early_bound_reached(self) -> None:
        """Its early bytes at the bound: stop reading the carrier until the link,
        and look at TCP meanwhile (`_look_while_kept`)."""
        self.pause_reading()
        if (
            self._early_look is None
            and not self._ended_at_bound
            and isinstance(self.transport, TLSConnection)
        ):
            self._early_look = self._running_loop().call_soon(self._look_while_kept)

    def _look_while_kept(self) -> None:
        """A carrier not read (its early bytes at the bound) until its call is
        linked, which TCP says has ended (a reset, a FIN): nothing it sent can
        reach a bot now (a call ends at its carrier's end before the link), so
        what it holds is read to its end and dropped, and the call ends as the
        carrier did, its slot given back. Not read, its end waited for the
        fleet's answer: a fleet slow to answer held the slot for
        timeouts.response, and the call was logged the fleet's 504 (a
        response-timeout, retried on another fleet), on both loops. First on
        the turn after the pause (the reset read with the bytes), then every
        EARLY_LOOK_EVERY (a reset after them: no read event comes for it, the
        reading stopped)."""
        self._early_look = None
        t = self.transport
        if (
            not isinstance(t, TLSConnection)
            or not self.reading_paused
            or self.peer is not None
            or self.machine.state not in _EARLY_BYTES_KEPT
        ):
            return
        if not t.peer_has_ended():
            self._early_look = self._running_loop().call_later(
                EARLY_LOOK_EVERY, self._look_while_kept
            )
            return
        self._ended_at_bound = True
        self._early.clear()
        self.resume_reading()
        t.read_if_ended()  # its poll may have stopped (uvloop): read on now

    def _parse_head(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.machine.state is not _PARSING:
            return  # the carrier left, or the ingress is stopping
        raw, self._raw_head = self._raw_head, b""
        try:
            # A body, or an HTTP/1.1 head without Host, is the call machine's to
            # refuse: the health route answers them.
            head = parse_request_head(raw, refuse_body=False, refuse_hostless=False)
        except RequestRefused as refused:
            # What the log line can name of a head that did not parse: its first line.
            self.target = logged_first_line(raw)
            self.feed(HeadRefused(refused.status, refused.reason, refused.head_only))
            return
        except Exception:
            # A bug in the parse must not leave the carrier unanswered with its head
            # timer already gone (it would hold a connection slot for good).
            log.exception("request head parse failed", extra=fields(client_ip=self.client_ip))
            self.feed(HeadRefused(400, "malformed request"))
            return
        self.target = logged_target(head)
        self._head = head
        self.feed(HeadParsed(head))

    # The commands (run by `feed`, each by its type: `_COMMANDS`) -----------

    def _answer(self, command: Answer) -> None:
        status = command.status
        # Refused as it was read (431, 408): what came of its first line, for
        # its log line, and no body for a HEAD.
        read_so_far = "" if self._reader is None else self._reader.first_line()
        head_only = command.head_only or read_so_far.startswith("HEAD ")
        self.ctx.registry.count_request(self.machine.route_label, status)
        if self.call is None and status >= 400 and self.ctx.refusals is not None:
            if self.ctx.access_log:
                # A call that is refused has its access-log line; a head that never
                # became a call has this one.
                if not self.target:
                    self.target = read_so_far
                self.ctx.refusals.info(
                    "request refused",
                    client_ip=self.client_ip,
                    listener="wss",
                    route=self.machine.route_label,
                    target=self.target,
                    status=status,
                    reason=command.text,
                )
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(
                local_response(status, command.text, head_only=head_only, headers=command.headers)
            )

    def _parse_head_later(self, command: Command) -> None:
        self.ctx.heads.add(self._parse_head)

    def _open_call(self, command: OpenCall) -> None:
        call = Call(self, self.client_ip, command.route, command.bot_id, machine=self.machine)
        self.call = call
        self._received_at = call.started_mono  # (its clock read, not read again)
        self.ctx.registry.add_call(call)

    def _take_slot(self, command: TakeSlot) -> None:
        loop = self._loop or self._running_loop()
        if self.ctx.lease_now is not None and self.ctx.slots.may_lease_now:
            # The in-process slot table, or a worker's standing budget, hands a
            # free slot over at once: taken on the next turn by a callback, not a
            # task (a task and its three coroutines cost ~20k instructions more a
            # call; without a budget, `may_lease_now` False, the task at once:
            # the callback would find nothing). The next turn, as
            # the task's first step was: the loop reads the carrier in between,
            # so one that reset with its head ends before a slot is taken and a
            # fleet connected (tests/e2e/test_dead_poll.py).
            self._slot_turn = loop.call_soon(self._lease_at_once, command.avoid)
            return
        self._task = loop.create_task(self._lease(command.avoid))

    def _lease_at_once(self, avoid: tuple[str, ...]) -> None:
        self._slot_turn = None
        lease_now = self.ctx.lease_now
        assert lease_now is not None
        try:
            lease = lease_now(avoid, self.call)
        except Exception as exc:
            self._setup_failed(exc)
            return
        if lease is None:  # queued, or refused: awaited as any lease is
            self._task = self._running_loop().create_task(self._lease(avoid))
            return
        self._slot_granted(lease)

    async def _lease(self, avoid: tuple[str, ...]) -> None:
        try:
            call = self.call
            lease = await self.ctx.slots.lease(
                avoid=avoid, call=None if call is None else call.described
            )
        except NoFleetAvailable as exc:
            self._task = None
            if exc.queued_s != 0 and self.call is not None:
                self.ctx.registry.slot_waited(self.call, exc.queued_s, granted=False)
            self.feed(SlotRefused(exc.reason))
            return
        except Exception as exc:
            self._task = None
            self._setup_failed(exc)
            return
        self._task = None
        self._slot_granted(lease)

    def _slot_granted(self, lease: HeldSlot) -> None:
        call = self.call
        assert call is not None
        call.lease = lease
        if lease.queued_s != 0:
            self.ctx.registry.slot_waited(call, lease.queued_s, granted=True)
        self.feed(SlotGranted(lease.fleet))

    def _cancel_slot_wait(self, command: Command) -> None:
        # Cancelled after the queue handed a slot over, the slot source gives it back.
        self._cancel_task()

    def _release_slot(self, command: Command) -> None:
        call = self.call
        if call is not None and call.lease is not None:
            call.lease.release()

    def _held_lease(self) -> HeldSlot | None:
        """The slot this call's attempt holds, if it holds one."""
        call = self.call
        lease = None if call is None else call.lease
        return lease if lease is not None and lease.held else None

    def _fleet_full(self, command: Command) -> None:
        if (lease := self._held_lease()) is not None:
            lease.fleet_said_full()

    def _fleet_unreachable(self, command: FleetUnreachable) -> None:
        if (lease := self._held_lease()) is not None:
            lease.fleet_unreachable(refused=command.refused)

    def _connect_fleet(self, command: ConnectFleet) -> None:
        call = self.call
        assert call is not None
        head = self._head
        assert head is not None
        spec = command.fleet.spec
        exchange = FleetExchange(
            head.method,
            head.target,
            fleet_request_headers(head, fleet_host=spec.host_header, client_ip=call.client_ip),
            max_head_bytes=self.ctx.max_head_bytes,
        )
        fleet_side = FleetProtocol(self, exchange)
        self.fleet_side = fleet_side
        self._fleet = (command.fleet, spec, None)
        # What the connect timer (StartTimer, next) asks after a stall.
        self._underway = underway = Underway()
        self._task = (self._loop or self._running_loop()).create_task(
            self._connect(fleet_side, command.fleet, spec, underway)
        )

    async def _connect(
        self, fleet_side: FleetProtocol, fleet: FleetState, spec: FleetSpec, underway: Underway
    ) -> None:
        """The connection alone: its timer is the machine's (`timeouts.connect`,
        TCP and TLS together; told by `underway` whether the fleet answered,
        after a stall), and the fleet side reports itself connected
        (`connection_made`)."""
        ctx = self.ctx
        offered = None
        try:
            if spec.scheme == "https":
                # SNI and the certificate's name are the fleet URL's host (an
                # IPv6 zone left out: spec.tls_name); the
                # context checks them (fleets.verify, fleets.ca_file). No timer
                # of its own: the machine's bounds it (`timeout` bounds a
                # renegotiation of the connection). The fleet's kept session
                # offered (net/fleet_sessions.py): declined, a full handshake;
                # refused (an alert, a close), dropped and connected again at
                # once without it, within the same timer: the fleet's answer
                # to our optimisation is no failed attempt, and not its health.
                # A refusal once such a connection gets through
                # (`connect_again`, the calls refused together waiting for the
                # first's): a fleet that fails it too (down, resetting,
                # overloaded) failed the attempt, as any connection's failure
                # does. The connection that failed, its refusal not proven,
                # is a failed connection to the fleet (passive health).
                offered = fleet_sessions.offer(fleet, ctx.fleet_ssl, spec)
                try:
                    conn = await self._connect_tls(spec, underway, offered)
                except SessionRefused as exc:
                    assert offered is not None
                    refused, offered = offered, None
                    conn, proven = await fleet_sessions.connect_again(
                        fleet,
                        spec,
                        refused,
                        exc,
                        lambda: self._connect_tls(spec, underway, None),
                        self._offered_connection_failed,
                    )
                    if proven:
                        ctx.registry.fleet_tls_sessions_refused += 1
                    if self._task is not asyncio.current_task(self._loop):
                        # Given up as that failure took the fleet DOWN
                        # (`FleetWentDown`): this connection is not the call's.
                        conn.abort()
                        return
                if offered is not None and not fleet_sessions.resumed(conn, offered):
                    offered = None  # declined: a full handshake
                ctx.registry.fleet_tls_handshakes["full" if offered is None else "resumed"] += 1
                serve(conn, fleet_side)
            else:
                loop = self._running_loop()
                sock = await open_tcp(spec.host, spec.port, underway, loop=loop)  # staggered
                try:
                    await loop.create_connection(lambda: fleet_side, sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except (OSError, ssl.SSLError) as exc:
            fleet_sessions.failed(fleet, offered)
            if self._task is asyncio.current_task(self._loop):
                self._task = None
                if isinstance(exc, socket.gaierror):
                    why = exc.strerror or str(exc)
                    detail = f"the fleet's name {spec.host} did not resolve: {why}"
                    self.feed(FleetConnectFailed(detail, unresolved=True))
                elif (want := out_of_resources(exc)) is not None:
                    self.feed(FleetConnectFailed(want, local=True, exhausted=True))
                else:
                    detail = str(exc) or type(exc).__name__
                    self.feed(FleetConnectFailed(detail, local=_this_hosts_failure(exc)))
            return
        except asyncio.CancelledError:
            # Ended by the connect timer (or the carrier gone): a fleet that
            # hangs on a resumed handshake is not offered the session again.
            fleet_sessions.failed(fleet, offered)
            raise
        except Exception as exc:
            if self._task is asyncio.current_task(self._loop):
                self._task = None
                self._setup_failed(exc)
            return
        if self._task is asyncio.current_task(self._loop):
            self._task = None
            self._underway = None
            if offered is not None:  # resumed: what the session kept at the link rests on
                self._fleet = (fleet, spec, offered)

    def _offered_connection_failed(self) -> None:
        """`fleet_sessions.connect_again`: this attempt's connection offered
        the fleet's session failed, no refusal proven (its machine counts it
        for the fleet's passive health), while the attempt is still this one's."""
        if self._task is asyncio.current_task(self._loop):
            self.feed(OfferedConnectionFailed())

    def _connect_tls(
        self, spec: FleetSpec, underway: Underway, offered: fleet_sessions.KeptSession | None
    ) -> Coroutine[Any, Any, TLSConnection]:
        """`connect`'s coroutine itself, awaited by `_connect` (a coroutine of
        its own around it was one more frame each of its steps went through)."""
        ctx = self.ctx
        return connect(
            spec.host,
            spec.port,
            ctx.fleet_ssl,
            server_hostname=spec.tls_name,
            timeout=ctx.connect_timeout,
            kept_session=offered,
            underway=underway,
            meter=ctx.registry.new_connection_cpu,
            loop=self._loop or self._running_loop(),
        )

    def _setup_failed(self, exc: Exception) -> None:
        call_id = None if self.call is None else self.call.id
        log.error("call setup failed", exc_info=exc, extra=fields(call_id=call_id))
        self.feed(SetupFailed(str(exc)))

    def _send_head(self, command: Command) -> None:
        fleet_side = self.fleet_side
        assert fleet_side is not None and fleet_side.transport is not None
        # A fleet host that vanishes from here on fails this socket within
        # seconds, not after the kernel's 15 minutes of retransmissions.
        if (sock := fleet_side.transport.get_extra_info("socket")) is not None:
            self.ctx.liveness.apply(sock)
        assert fleet_side.exchange is not None  # not linked yet
        fleet_side.transport.write(fleet_side.exchange.request_bytes)

    def _drop_fleet(self, command: Command) -> None:
        self._resumed_attempt_failed()
        self._cancel_task()
        self._underway = None
        fleet_side, self.fleet_side = self.fleet_side, None
        if fleet_side is not None:
            fleet_side.pump = None  # nothing more from this attempt reaches the machine
            fleet_side.abort()

    def _resumed_attempt_failed(self) -> None:
        """This attempt's connection resumed its fleet's TLS session and is
        given up before its 101 (closed, reset, garbage, no head in time, a
        5xx; or its carrier gone, one full handshake more): the session is not
        offered again (net/fleet_sessions.py)."""
        attempted, self._fleet = self._fleet, None
        if attempted is not None:
            fleet, _, resumed = attempted
            fleet_sessions.failed(fleet, resumed)

    def _cancel_task(self) -> None:
        """Stop waiting for a slot (its turn, or the lease task) or connecting."""
        turn, self._slot_turn = self._slot_turn, None
        if turn is not None:
            turn.cancel()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    def _log_attempt_failed(self, command: LogAttemptFailed) -> None:
        values = {
            "call_id": None if self.call is None else self.call.id,
            "fleet": command.fleet,
            "attempt": command.attempt,
            "failure": command.failure.value,
            "detail": command.detail,
        }
        if command.exhausted:
            self._say_out_of_resources(command.fleet, command.detail)
            return
        # Rate-limited: a worker out of local ports fails every attempt of every
        # call at once (the limits audit of session 14: 494 lines in a burst).
        if self.ctx.attempt_failures is not None:
            self.ctx.attempt_failures.info("fleet attempt failed", **values)
        else:
            log.warning("fleet attempt failed", extra=fields(**values))

    def _say_out_of_resources(self, fleet: str, detail: str) -> None:
        """This worker could not connect to a fleet for want of its own
        descriptors or memory: the calls are answered 503 at once (each access
        line says why); the journal says it once every OUT_OF_RESOURCES_EVERY,
        with the fix, as the listener does when accept() fails for it."""
        values = {
            "fleet": fleet,
            "error": detail,
            "open_connections": len(self.ctx.registry.connections),
        }
        said = self.ctx.out_of_resources
        if said is not None:
            said.info(CONNECT_OUT_OF_RESOURCES, **values)
        else:
            log.warning(CONNECT_OUT_OF_RESOURCES, extra=fields(**values))

    def _stop_early_look(self) -> None:
        """Called where one is scheduled (`_early_look` set), which few calls
        have: called at each of a call's link, loss and unlink, it was 3.8
        Python calls a churned call (call_profile, session 47)."""
        look, self._early_look = self._early_look, None
        if look is not None:
            look.cancel()

    def _link(self, command: Link) -> None:
        if self._early_look is not None:
            self._stop_early_look()
        call, fleet_side, ctx = self.call, self.fleet_side, self.ctx
        assert call is not None and fleet_side is not None and fleet_side.transport is not None
        call.fleet_side = fleet_side
        self._head = None  # no further attempt: the head need not be kept
        attempted, self._fleet = self._fleet, None
        if attempted is not None and isinstance(fleet_side.transport, TLSConnection):
            fleet, spec, offered = attempted
            fleet_sessions.keep(fleet, spec, fleet_side.transport, offered)
        if isinstance(self.transport, TLSConnection):
            # A call now: its frames are not a new connection's work, and its
            # reads are the hot path (the silence sweep finds a dead poll).
            self.transport.linked()
        ctx.registry.count_request(self.machine.route_label, command.status)
        now = time.monotonic()
        if call.lease is not None and call.lease.held:
            call.lease.fleet_answered(now)  # the fleet has this call: out of flight
        call.handshake_ms = (now - self._received_at) * 1000
        call.tunnel_since = now
        fleet_side.link(self, relaying=False)
        self.tracker = FrameTracker()  # the carrier's first frame starts here
        if self._ended_at_bound:
            # The carrier has ended, its early bytes dropped and what it sent
            # after them being read to its end and dropped (`_look_while_kept`):
            # none is relayed, its end ends the call. Linked (before, the review
            # of session 37), what was left of it went to the bot from wherever
            # the dropped reads had stopped, inside a frame.
            if fleet_side.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
                self.resume_reading()
            ctx.registry.sweep.watch_tunnel(call, ctx.silence)
            ctx.registry.dead_peers.watch(ctx.liveness.user_timeout, call.id)
            ctx.registry.call_linked(call)
            return
        early = bytes(self._early)
        self._early.clear()
        if early:
            self.bytes_received += len(early)
            fleet_side.transport.write(early)
            self.tracker.feed(early)
            if self.tracker.closed:  # the carrier hung up before the 101
                self.close_frame_read(early)
        self.peer = self.peer_writer(fleet_side.transport)
        # Paused only at the early bound (`_early_bound_reached`): asked first,
        # the fleet's buffer and `resume_reading` are two Python calls a call.
        if self.reading_paused and fleet_side.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
            self.resume_reading()
        ctx.registry.sweep.watch_tunnel(call, ctx.silence)
        ctx.registry.dead_peers.watch(ctx.liveness.user_timeout, call.id)
        ctx.registry.call_linked(call)

    def _relay(self, command: Relay) -> None:
        if self._early_look is not None:
            self._stop_early_look()
        call, fleet_side, ctx = self.call, self.fleet_side, self.ctx
        assert call is not None and fleet_side is not None
        call.fleet_side = fleet_side
        self._head = None
        if command.status >= 500:
            self._resumed_attempt_failed()
        ctx.registry.count_request(self.machine.route_label, command.status)
        self._early.clear()
        # A fleet that stalls in the middle of its answer must not
        # hold the call (and its slot) forever.
        ctx.registry.sweep.watch(call, SilenceLimits(idle=ctx.response_timeout))
        fleet_side.link(self, relaying=True)

    def _close_side(self, command: CloseSide) -> None:
        side = self if command.side is _CARRIER else self.fleet_side
        if side is None or side.saying_goodbye:  # its close follows its goodbye
            return
        if command.goodbye is None or not self._say_goodbye(side, command.goodbye):
            side.close()

    def _say_goodbye(self, side: _Side, goodbye: Goodbye) -> bool:
        """Send `side` a close frame (CloseSide's `goodbye`), then close it: at
        once if what is relayed to it stands at a frame boundary, else at the
        next boundary within GOODBYE_BOUNDARY_WAIT; when the frame under way is
        the other side's own close frame, that one, relayed whole, is the
        goodbye. False when it cannot be (the other side's frames are not
        tracked or have ended in a close frame, or `side` is going)."""
        source = side.peer_side
        t = side.transport
        tracker = None if source is None else source.tracker
        if (
            source is None
            or tracker is None
            or tracker.gave_up
            or tracker.close_whole  # its close frame, whole: nothing follows
            # Not relayed (a carrier that ended before its link): nothing of it
            # was sent, its tracker stands where it began.
            or (source.peer is None and not tracker.at_boundary)
            or t is None
            or side.lost
            or t.is_closing()
        ):
            return False
        if tracker.closed:
            # The source's own close frame is under way (split over reads): it
            # reaches `side` whole, no frame of ours after it, and `side` has
            # GOODBYE_REPLY_WAIT to reply, as to ours (before, `side` was closed
            # at once: the close frame cut short; then, with no time to reply, a
            # carrier's stack said 1006: the third review of session 30).
            frame = b""
        else:
            mask = os.urandom(4) if side is self.fleet_side else None  # to the fleet as its client
            frame = close_frame(goodbye.code, goodbye.reason, mask)
        side.saying_goodbye = True
        if tracker.at_boundary:
            source.peer = _DROPPING
            side.write_goodbye(frame)
            return True
        if source.lost:  # the frame under way will not end
            side.saying_goodbye = False
            return False
        writer = _ToFrameBoundary(source.peer, tracker, frame, side)
        source.peer = cast(asyncio.Transport, writer)
        # Patient: the end of the frame, come during a stall, is read first
        # (given up on then, the frame was cut short and no close frame sent).
        writer.timer = PatientTimer(self._running_loop(), GOODBYE_BOUNDARY_WAIT, writer.give_up)
        return True

    def _abort_side(self, command: AbortSide) -> None:
        side = self if command.side is _CARRIER else self.fleet_side
        if side is not None:
            side.abort()

    def _start_timer(self, command: StartTimer) -> None:
        """A loop timer of the machine's, the loop's handle kept (no timer
        object of ours: three a call), put off after a stall as a PatientTimer
        is (`_timer_due`)."""
        timers = self._timers
        timer = command.timer
        old = timers.pop(timer, None)
        if old is not None:
            old.cancel()
        # After a stall, the connect timer is put off only if the fleet answered
        # meanwhile (a connection made, unread): one that did not fails at once.
        underway = self._underway if timer is _CONNECT_TIMER else None
        answered = None if underway is None else underway.answered
        loop = self._loop or self._running_loop()  # set at connection_made
        seconds = command.seconds
        # Its own due time: uvloop answers a delay under its 1 ms tick with a
        # plain Handle, which has no `when()`.
        when = loop.time() + seconds
        timers[timer] = loop.call_later(seconds, self._timer_due, command, when, answered)

    def _timer_due(
        self, command: StartTimer, when: float, answered: Callable[[], bool] | None
    ) -> None:
        """A timer's due time has come: run over STALL late (the loop did not
        run), it is put off once (`late_timers.put_off_by`), so that an answer
        waiting unread is read first and cancels it; else it fires."""
        loop = self._running_loop()
        wait = put_off_by(loop.time() - when, command.seconds, answered)
        if wait is not None:
            self._timers[command.timer] = loop.call_later(wait, self._timer_fired, command.timer)
            return
        self._timer_fired(command.timer)

    def _timer_fired(self, timer: Timer) -> None:
        timers = self._timers
        timers.pop(timer, None)
        if not timers:
            self._timers = {}  # see `_cancel_timer`
        self.feed(TimerFired(timer))

    def _cancel_timer(self, command: CancelTimer) -> None:
        timers = self._timers
        handle = timers.pop(command.timer, None)
        if handle is not None:
            handle.cancel()
        if not timers:
            # Emptied, the dict is made anew: a call holds no timer in its
            # tunnel, and a dict keeps the table its entries had (160 bytes a
            # held call, memory per call: issue 13).
            self._timers = {}

    def _call_ended(self, command: Command) -> None:
        """The call's end is settled: its access line, out of the live calls.
        Its sides may still be closing (a close frame flushed, the TLS close):
        the registry keeps it among those closing until `SidesGone`."""
        call, ctx = self.call, self.ctx
        assert call is not None
        if not ctx.registry.remove_call(call):
            return
        call.quiet = None
        if ctx.access_log:
            write_event(access_log, logging.INFO, "call ended", call.access_record())
        lease = call.lease  # (`_held_lease`, spelt out)
        if lease is not None and lease.held:
            lease.call_logged()  # its worker's death now is no second line

    def _sides_gone(self, command: Command) -> None:
        """Both sides of the ended call are gone: forget it."""
        call, ctx = self.call, self.ctx
        assert call is not None
        if self._task is not None or self._slot_turn is not None:  # (none, most calls)
            self._cancel_task()
        ctx.registry.forget_call(call)
        _break_cycles(call)

    def buffered_bytes(self) -> int:
        reader = self._reader
        return super().buffered_bytes() + len(self._early) + (reader.buffered if reader else 0)

    def unlink(self) -> None:
        super().unlink()
        self.fleet_side = None
        if self._early_look is not None:
            self._stop_early_look()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


# Each command's method, by its type: it takes a command of that type (no
# isinstance check in each: an assert a command, some twenty a call).
_COMMANDS: dict[type[Command], Callable[[CarrierProtocol, Any], None]] = {
    Answer: CarrierProtocol._answer,
    ParseHead: CarrierProtocol._parse_head_later,
    OpenCall: CarrierProtocol._open_call,
    TakeSlot: CarrierProtocol._take_slot,
    CancelSlotWait: CarrierProtocol._cancel_slot_wait,
    ReleaseSlot: CarrierProtocol._release_slot,
    FleetFull: CarrierProtocol._fleet_full,
    FleetUnreachable: CarrierProtocol._fleet_unreachable,
    ConnectFleet: CarrierProtocol._connect_fleet,
    SendHead: CarrierProtocol._send_head,
    DropFleet: CarrierProtocol._drop_fleet,
    LogAttemptFailed: CarrierProtocol._log_attempt_failed,
    Link: CarrierProtocol._link,
    Relay: CarrierProtocol._relay,
    CloseSide: CarrierProtocol._close_side,
    AbortSide: CarrierProtocol._abort_side,
    StartTimer: CarrierProtocol._start_timer,
    CancelTimer: CarrierProtocol._cancel_timer,
    CallEnded: CarrierProtocol._call_ended,
    SidesGone: CarrierProtocol._sides_gone,
}


# Read once: CPython 3.11 reads a member through its class by EnumType's
# __getattr__ slot (~900 instructions, callgrind), a module's global by a dict lookup.
_NEED_DATA = Progress.NEED_DATA


class FleetProtocol(_Side):
    """The fleet side of one call attempt: reports to its carrier's pump."""

    __slots__ = ("_head_read", "_pending", "exchange", "pump")

    def __init__(self, pump: CarrierProtocol, exchange: FleetExchange) -> None:
        super().__init__()
        # None once the attempt is dropped: a late word from it goes nowhere.
        self.pump: CarrierProtocol | None = pump
        self._loop = pump._loop
        self.close_flush_timeout = pump.close_flush_timeout
        # Read for the fleet's head, then, once linked, for a relayed (non-101)
        # answer until it ends; None in a tunnel and after a relayed answer: so
        # linked with an exchange is relaying an answer.
        self.exchange: FleetExchange | None = exchange
        self._pending = bytearray()  # raw bytes from the fleet, until linked
        self._head_read = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.pump is not None:
            self.pump.feed(FLEET_CONNECTED)
        else:  # dropped while its connection was made
            self.abort()

    def data_received(self, data: Buffer) -> None:
        peer = self.peer
        if peer is not None:  # the hot path
            exchange = self.exchange
            if exchange is not None:  # relaying an answer
                self._relay_answer(peer, exchange, data)
                return
            n = len(data)
            self.bytes_received += n
            peer.write(data)
            if (tracker := self.tracker) is not None:
                if tracker.feed(data, n):  # a close frame started, or it gave up
                    self.close_frame_read(data)
                return
            if n <= _MAX_CLOSE_FRAME and data[0] == _CLOSE_FRAME_FIRST_BYTE:
                self.close_frame_read(data)
            return
        pump = self.pump
        if pump is not None and not isinstance(self.transport, TLSConnection):
            # A plain (http://) fleet's answer, read before the link, is the
            # call's set-up, counted as a TLS fleet connection meters its own
            # (`connect`'s meter): accept pacing's new-connection CPU.
            pump.ctx.registry.new_connection_cpu.run(self._read_answer, data)
        else:
            self._read_answer(data)

    def _read_answer(self, data: Buffer) -> None:
        """The fleet's bytes before the link: its answer's head, and what
        comes with it, held until the link."""
        self._pending += data
        if self._head_read or self.pump is None:
            # Head read, not linked yet: hold what came with it, read no more.
            self.pause_reading()
            return
        exchange = self.exchange
        assert exchange is not None  # the head is not read yet
        try:
            progress = exchange.feed(data)
        except ResponseError as exc:
            self._head_read = True
            self.pump.feed(FleetError(Failure(exc.kind), exc.detail))
            return
        if progress is not _NEED_DATA:
            head = exchange.head
            assert head is not None
            self._head_read = True
            self.pump.feed(FLEET_SWITCHED if head.switched else FleetHead(head.status, False))
            if self.peer is None:
                # Not linked by it (its event waits behind a command, or the
                # attempt was dropped): hold what came, read no more. Paused
                # before the event, a side linked in it was paused and resumed
                # in one turn: six Python calls a call and the TLS layer's work.
                self.pause_reading()
        elif len(self._pending) > exchange.max_head_bytes:
            # Complete 1xx heads escape h11's size limit: bound them all here.
            self._head_read = True
            self.pump.feed(FleetError(Failure.JUNK_RESPONSE, "response head larger than the limit"))

    def say_close_frame(self) -> None:
        if self.pump is None:
            return  # a dropped attempt: nothing of it reaches the machine
        if self.saying_goodbye:
            self.goodbye_replied()  # its reply to ours: the attempt may be dropped in it
        if self.pump is not None:
            self.pump.feed(FLEET_CLOSE_FRAME)

    def _relay_answer(self, peer: asyncio.Transport, exchange: FleetExchange, data: Buffer) -> None:
        """More of a relayed (non-101) answer: up to its end, no further."""
        progress = exchange.feed(data)
        if exchange.surplus:
            data = bytes(data)[: len(data) - exchange.surplus]
        self.bytes_received += len(data)
        peer.write(data)
        # After the write: a carrier lost in it may close this side, ending the answer.
        if self.exchange is not None:
            self._relay_progress(progress)

    def eof_received(self) -> bool:
        pump = self.pump
        if pump is None or self.peer is None or self.exchange is not None:
            return False  # not in a tunnel: a relayed answer ends with the connection
        if not _ended_cleanly(self.transport):
            return False
        pump.feed(SideFinished(_FLEET))
        return pump.machine.state is _HALF_CLOSED  # the carrier's reply may follow

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        pump = self.pump
        if pump is None:
            return
        if not self._head_read:
            self._head_read = True
            assert self.exchange is not None  # the head is not read yet
            try:
                self.exchange.feed_eof()
            except ResponseError as error:
                pump.feed(FleetError(Failure(error.kind), error.detail))
            else:  # pragma: no cover - feed_eof raises when no head was read
                pump.feed(FleetError(Failure.EMPTY_RESPONSE, "closed"))
            return
        if self.exchange is not None and self.peer_side is not None:  # relaying an answer
            self._relay_progress(Progress.BODY_COMPLETE)
        exc = exc or self.given_up
        pump.feed(FLEET_CLOSED if exc is None else FleetLost(*_lost(exc)))

    def link(self, carrier: CarrierProtocol, *, relaying: bool) -> None:
        """Relay everything the fleet sent so far and what it sends from now on.

        Flow control is wired first, so the carrier's buffer filling up
        (even with these first bytes) stops the fleet being read."""
        assert carrier.transport is not None
        exchange = self.exchange
        assert exchange is not None  # its head is read: linked once
        if not relaying:
            # A tunnel reads the exchange no more: a held call does not keep its
            # HTTP state and the fleet's head (memory per call). Let go before
            # the link, so that linked with an exchange means relaying.
            self.exchange = None
        self.peer_side = carrier
        self.peer = self.peer_writer(carrier.transport)
        carrier.peer_side = self
        if isinstance(self.transport, TLSConnection):
            self.transport.linked()  # its reads are the hot path from now on
        # A body may follow the head in what was read: how far it goes first.
        # (Everything pending was fed: the head's read links the answer at once.)
        progress = exchange.advance() if relaying else None
        pending = exchange.relayable(bytes(self._pending))
        self._pending.clear()
        # What came after the fleet's head counts as relayed (the head is not),
        # as every later read does: a body, or the first frames of a tunnel.
        # The head as relayed, which a 101 made right may have lengthened.
        head = exchange.relayed_head_bytes
        self.bytes_received += len(pending) - head
        carrier.transport.write(pending)
        if not relaying:  # the fleet's first frame starts after its 101
            self.tracker = FrameTracker()
            frames = memoryview(pending)[head:]
            self.tracker.feed(frames)
            if self.tracker.closed:  # the bot hung up with its 101
                self.close_frame_read(frames)
        # Paused where its head's event was not answered at once, or by the
        # carrier's buffer filling with what was pending (flow control).
        if self.reading_paused and carrier.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
            self.resume_reading()
        if progress is not None and self.exchange is not None:
            self._relay_progress(progress)

    def _relay_progress(self, progress: Progress) -> None:
        if progress is Progress.BODY_COMPLETE:
            self.exchange = None  # the answer has ended: nothing reads it again
            if self.pump is not None:
                self.pump.feed(FleetAnswerComplete())

    def buffered_bytes(self) -> int:
        return super().buffered_bytes() + len(self._pending)

    def unlink(self) -> None:
        super().unlink()
        self.pump = None


def _ended_cleanly(transport: asyncio.Transport | None) -> bool:
    """A TLS peer's close_notify (its FIN without one ends the TLS session:
    nothing more can be written), or a plain TCP peer's FIN."""
    if isinstance(transport, TLSConnection):
        return bool(transport.peer_ended_cleanly)
    return transport is not None


def _is_close_frame(data: Buffer, *, masked: bool) -> bool:
    """Whether a read is one whole WebSocket close frame (opcode 8, FIN), as a
    side sends it alone as it hangs up (masked from the carrier, a client; not
    from the fleet): what tells an untracked direction's close. A record of a
    message's payload may start with 0x88 too, and is not one. Its first byte
    is looked at here too: a direction whose tracker gave up comes here with
    every read (`FrameTracker.feed`'s return), not only one starting 0x88."""
    if len(data) < 2 or data[0] != _CLOSE_FRAME_FIRST_BYTE:
        return False
    second = data[1]
    length = second & 0x7F
    if bool(second & 0x80) is not masked or length > 125:
        return False
    return len(data) == 2 + (4 if masked else 0) + length


# A fleet connection that failed for want of this host's own resources: not
# the fleet's failure (every fleet would be held for this host's trouble). A
# name that does not resolve (socket.gaierror) is the fleet's, as a timeout is
# (FleetConnectFailed.unresolved): its probe, on a new connection, tells.
# Out of local ports (EADDRNOTAVAIL) is counted per address: another fleet's may
# have some left, so that one is tried again; the process out of descriptors or
# memory is not (tcp_connect.out_of_resources: every fleet's attempt fails the
# same, at once).
_LOCAL_CONNECT_ERRNOS = frozenset({errno.EADDRNOTAVAIL})


def _this_hosts_failure(exc: OSError) -> bool:
    """A fleet connection that failed for this host's own want (local ports),
    not for the fleet's answer."""
    return not isinstance(exc, ssl.SSLError) and exc.errno in _LOCAL_CONNECT_ERRNOS


def _lost_kind(exc: Exception | None) -> Lost:
    """How a side's connection ended: closed by its peer, gone without a word
    (TCP user timeout, keepalive, unreachable), reset by its peer, or another error."""
    if exc is None:
        return _LOST_CLOSED
    if peer_gone(exc):
        return _LOST_GONE
    # A write to a side its peer has reset fails EPIPE rather than ECONNRESET.
    reset = isinstance(exc, (ConnectionResetError, BrokenPipeError))
    return _LOST_RESET if reset else _LOST_ERROR


def _lost(exc: Exception | None) -> tuple[Lost, str]:
    """How a side's connection ended and, for an error (a bad TLS record, a
    renegotiation refused) or a peer that stopped reading, what failed: the
    access line's detail."""
    how = _lost_kind(exc)
    if isinstance(exc, (PeerStoppedReading, PeerGaveNoAnswer)):
        return how, str(exc.strerror)
    if how is not _LOST_ERROR or exc is None:
        return how, ""
    return how, str(exc) or type(exc).__name__


def _break_cycles(call: Call) -> None:
    """An ended call's objects point at each other (sides, transports, the
    call, its idle watch): left as cycles, they and their TLS state wait for a
    full garbage collection, minutes under load (the soak's RSS growth)."""
    for side in (call.carrier, call.fleet_side):
        if side is not None:
            side.unlink()
    call.carrier.call = None
