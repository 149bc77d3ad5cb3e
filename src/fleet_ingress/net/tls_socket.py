"""TLS on socket BIOs: OpenSSL on a non-blocking TCP socket, driven by the loop's reader/writer.

With asyncio's and uvloop's SSL transports every record goes socket ->
memory BIO -> plaintext -> memory BIO -> socket, and each connection holds
buffers of its own. Here OpenSSL reads and writes the socket itself, as
HAProxy does: a relayed record is one ``recv_into`` into a buffer shared by
every connection and one ``send``; CPython sets ``SSL_MODE_RELEASE_BUFFERS`` on
every context, and a read that wants more gives back what that mode keeps
(`TLSConnection._release_buffers`), so an idle connection holds no record buffers.

One :class:`TLSConnection` per socket, no task per connection: the loop calls
``_on_readable`` / ``_on_writable``; the connection calls its handler
(:class:`TLSHandler`, the shape of an ``asyncio.Protocol``): ``data_received``
with a view of the shared buffer (valid only during the call),
``eof_received``, ``connection_lost``, and ``pause_writing`` /
``resume_writing`` when its write buffer passes the high-water mark and when
it has drained.

What a socket BIO asks of its driver (each pinned by tests/e2e/test_tls_socket.py):

- OpenSSL may hold decrypted bytes (``pending()``) the poller cannot see
  when a read filled the buffer: they are read on at once, and when reading
  resumes. A read that did not fill it took its record whole, and with no
  read-ahead (CPython never sets it) OpenSSL holds nothing more: one read per
  readable event, no SSLWantReadError on the hot path. OpenSSL reads the socket
  twice per record (header, then body).
- OpenSSL's SSL_read runs on through the peer's post-handshake messages
  (KeyUpdate, NewSessionTicket) while more are on the socket, without limit
  (OpenSSL 3.0): a client streaming KeyUpdates, no head needed, held a worker's
  loop in one read for as long as it went on (3 s of 5, every call's frames
  waiting). So every connection's SSL has ``SSL_MODE_AUTO_RETRY`` cleared
  (through ctypes): a read returns ``SSLWantReadError`` after each such message,
  and the level-triggered poll brings the next one a loop turn later.
- A read may need the socket writable (``SSLWantWriteError``) and a write
  readable (``SSLWantReadError``): renegotiation, key updates. OpenSSL 3.0
  answers a peer's key update with our next write instead; both are handled.
- A TLS 1.2 server's renegotiation (a fleet's HelloRequest) starts inside a
  read, and a write while it runs runs the handshake too: ``SSL_write`` reads
  for the ServerHello, and the server's application data sent before it (which
  only ``SSL_read`` may take) fails the write (``UNEXPECTED_RECORD``, or with no
  reason: ``SSLEOFError``, "EOF occurred in violation of protocol"): a call
  streaming both ways lost its fleet at each renegotiation. A HelloRequest read
  while a write is only partly sent (its socket full) starts nothing: OpenSSL
  postpones it (not in a handshake) until that write is done, and then the next
  ``SSL_read`` or ``SSL_write`` starts it, a write failing as above. So from the
  HelloRequest until the handshake is done (``SSL_renegotiate_pending``, asked
  through ctypes, on TLS 1.2 connections that allow renegotiation only) writes
  are held, except the retry of a partly sent one, which must finish first; a
  read is made at once (a postponed renegotiation waits for one: the server
  waits for our ClientHello), and the reads finish it. Writes held longer than
  the handshake's timeout (timeouts.connect for a fleet; a period more while our
  own reading is paused) fail the connection (`RenegotiationTimeout`): a server
  that starts a renegotiation and never finishes it held our writes for good.
  A close reads the handshake through first, with writes held or, while it is
  under way (``SSL_in_init``), none: OpenSSL refuses ``SSL_shutdown`` in a
  handshake (``SHUTDOWN_WHILE_IN_INIT``).
- ``SSL_write`` without ``SSL_MODE_ENABLE_PARTIAL_WRITE`` (CPython never sets
  it) is all or nothing: after ``SSLWantWriteError`` some records may already
  be on the wire and the write must be retried with the same bytes (fewer is
  fatal: BAD_LENGTH). CPython sets ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER``
  (``newPySSLSocket`` in ``Modules/_ssl.c``), so a copy of the same bytes may
  be passed; bytes written later wait behind it, bounded.
- A failed handshake: OpenSSL has written its alert to the socket already, so
  the peer learns why (a memory-BIO transport drops it: issue #12, point 2).
  What the peer sent that OpenSSL did not read is read and dropped before the
  close, which would otherwise be a reset that can destroy the alert in flight.
- ``unwrap()`` on a non-blocking socket sends close_notify and raises
  ``SSLWantReadError`` while the peer's has not come; the peer's close_notify
  reads as 0 bytes (``SSLZeroReturnError`` once ours is sent), a TCP FIN
  without one as ``SSLEOFError`` (with ``suppress_ragged_eofs=False``). With
  the peer's application data waiting unread, ``unwrap()`` sends close_notify
  and then fails (``APPLICATION_DATA_AFTER_CLOSE_NOTIFY``: OpenSSL 3 reads on
  in its second ``SSL_shutdown``): the rest is read and dropped below TLS until
  the peer's FIN, so that the close is no reset (which would drop our last bytes).
- The reader and writer are registered by file descriptor and always removed
  before the socket closes: uvloop keeps a registered socket *object* open
  (``_io_refs``), asyncio's selector would keep a closed descriptor's entry.
- An open connection that stops reading (paused, no handler yet) stays
  registered until a read event it does not want comes, and is unregistered
  then: with uvloop every removal and addition of a descriptor's only interest
  is a poll handle closed and opened, seven system calls, and a call paused and
  resumed its sides three times before its first frame (a churned call's
  system calls, session 32).
- uvloop stops polling a descriptor after an error event (libuv's POLLERR),
  calling its reader once: a peer's last bytes and the reset that came with
  them are read as the bytes alone (a record a read), and the reset is never
  read. Until a call is linked each read event's read is followed by a look
  at TCP (``_read_watched``), and the call's link looks once (``linked``);
  after it, the silence sweep looks (``read_if_ended``). asyncio's loop polls on.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import enum
import errno
import functools
import inspect
import platform
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast

from fleet_ingress.net.late_timers import PatientTimer, peer_moved
from fleet_ingress.net.liveness import (
    TCP_ESTABLISHED,
    TCPI_LAST_DATA_RECV,
    PeerStoppedReading,
    gave_no_answer,
    probes_out,
    read_tcp_info,
    window_closed_on_unsent,
)
from fleet_ingress.net.loop_time_meter import LoopTimeMeter
from fleet_ingress.net.tcp_connect import Underway, open_tcp

# The codec `ssl` encodes a fleet's server_hostname with, looked up (its module
# imported) now rather than at a worker's first fleet connection: that import
# opens files, one descriptor more than the call needs (the resources audit of
# session 34).
codecs.lookup("idna")

# One read buffer for every connection in the process: a read is handed to
# the handler and consumed (written on, or copied) before the next read.
# OpenSSL returns at most one record (16 KiB of plaintext) per read. The size
# is the buffer's length, which the read event takes as said here (one
# replaced goes with its size).
READ_BUFFER_SIZE = 64 * 1024
_READ_BUFFER = memoryview(bytearray(READ_BUFFER_SIZE))
# Reads per readable callback at most, so one busy connection cannot hold the loop.
MAX_READS_PER_WAKE = 16
# Loop turns of reads a silence sweep pass gives a connection TCP says has
# ended (`TLSConnection.read_if_ended`): a read each, as a poll would.
ENDED_READS_PER_PASS = 4096
# Flow control: the high-water mark of net/proxy.py's transports; writing resumes
# once the buffer has drained (a write that could not finish keeps its bytes).
WRITE_HIGH_WATER = 64 * 1024
# What may queue behind a write that could not finish: a handler that stops
# reading at pause_writing overshoots the high-water mark by a read or two.
# More is a handler ignoring flow control, and the connection fails
# (WriteBufferFull) rather than grow without bound.
MAX_WRITE_BUFFER = WRITE_HIGH_WATER + 4 * READ_BUFFER_SIZE
# A closing connection may wait this long for its peer to take pending bytes
# and answer close_notify (uvloop's own SSL shutdown waits 30 s); longer when
# its closer's flush bound is (`close(flush_within=)`: timeouts.close_flush).
CLOSE_TIMEOUT = 10.0

Buffer = bytes | bytearray | memoryview


class _SSLObject(Protocol):
    """What a connection uses of CPython's ``_ssl._SSLSocket`` (an ``SSLObject``'s
    ``_sslobj``): the hot path's calls, and what `_renegotiation_watch` asks."""

    def read(self, size: int, buffer: memoryview) -> int: ...

    def write(self, data: Buffer) -> int: ...

    def pending(self) -> int: ...

    def do_handshake(self) -> None: ...

    def shutdown(self) -> object: ...

    def version(self) -> str | None: ...

    @property
    def context(self) -> ssl.SSLContext: ...


class HeldSession(Protocol):
    """A reference to an OpenSSL SSL_SESSION held by its owner for as long as the
    owner lives (`fleet_sessions.KeptSession`): `connect` keeps the owner, so the
    session cannot be freed while the connection waits for its TCP connect."""

    @property
    def pointer(self) -> int: ...


class TLSHandler(Protocol):
    """What a connection calls; the call pump implements it (one per side)."""

    def data_received(self, data: memoryview) -> None:
        """Plaintext; a view of the shared read buffer, valid only during this call."""

    def eof_received(self) -> bool:
        """The peer ended its side (close_notify or TCP FIN); True keeps ours open for writes."""

    def connection_lost(self, exc: BaseException | None) -> None:
        """The socket is closed; None after an orderly close."""

    def pause_writing(self) -> None:
        """The write buffer passed the high-water mark: stop feeding it."""

    def resume_writing(self) -> None:
        """The write buffer drained below the low-water mark."""


class _StepQueue(Protocol):
    def add(self, step: Callable[[], None]) -> None: ...


class HandshakeTimeout(TimeoutError):
    pass


class SessionRefused(ConnectionError):
    """The handshake of a connection offered a kept session (`connect`'s
    ``kept_session``) failed on the peer's side: an alert, or the connection
    closed or reset, after the TCP connect. A server that will not resume is
    meant to decline (a full handshake); some fail instead (OpenSSL's
    "session id context uninitialized", a middlebox that drops a ClientHello
    with a pre_shared_key), and a connection made again without the session
    may well succeed. `__cause__` is the handshake's own error."""


class WriteBufferFull(OSError):
    """A handler kept writing past MAX_WRITE_BUFFER: it ignored pause_writing."""


class RenegotiationTimeout(TimeoutError):
    """The peer's TLS 1.2 renegotiation, which holds our writes, did not finish in time."""


class _Unasked(enum.Enum):
    UNASKED = "unasked"


_UNASKED = _Unasked.UNASKED  # a connection's peer address not asked of its socket yet


class _State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"  # close() called: flushing what is buffered
    SHUTDOWN = "shutdown"  # close_notify sent: waiting (bounded) for the peer's
    CLOSED = "closed"


# The states as module globals: an Enum member read through its class costs a
# metaclass lookup (about 50 ns on 3.11), and the hot path checks the state
# three times a message.
_HANDSHAKE = _State.HANDSHAKE
_OPEN = _State.OPEN
_CLOSING = _State.CLOSING
_SHUTDOWN = _State.SHUTDOWN
_CLOSED = _State.CLOSED


class TLSConnection:
    """One TLS connection: a non-blocking TCP socket and OpenSSL's connection on
    it (`tls_on`), an ``ssl.SSLObject`` whose C object reads and writes the socket.

    Lifecycle: ``start_handshake`` (or ``await handshake()``), then
    ``start(handler)``; ``write``, ``pause_reading`` / ``resume_reading``;
    ``close()`` (flush, close_notify, then close) or ``abort()``.
    """

    __slots__ = (
        "_close_timer",
        "_detour",
        "_drain_below_tls",
        "_eof",
        "_fd",
        "_handler",
        "_held",
        "_high_water",
        "_hs_done",
        "_hs_read",
        "_loop",
        "_max_buffer",
        "_meter",
        "_more",
        "_out",
        "_partial",
        "_paused",
        "_peername",
        "_read_on_at_resume",
        "_reader_on",
        "_renegotiating",
        "_renegotiation_timeout",
        "_setting_up",
        "_shutdown_wants_write",
        "_sock",
        "_ssl",
        "_ssl_object",
        "_sslobj",
        "_state",
        "_step_queued",
        "_steps",
        "_timer",
        "_want_read_for_write",
        "_want_write_for_read",
        "_writer_foreign",
        "_writer_on",
        "_writing_paused",
        "peer_ended_cleanly",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ssl_object: SSLObjectOnSocket,
        *,
        high_water: int = WRITE_HIGH_WATER,
        max_buffer: int = MAX_WRITE_BUFFER,
        writer_registered: bool = False,
        meter: LoopTimeMeter | None = None,
        peername: tuple[str, int] | None = None,
    ) -> None:
        """``peername``: the peer's address where the caller has it (an accept
        answers it): not asked of the socket (`peername`).

        ``meter``: as `meter(meter)` once made, without its look at the
        registrations (none is this connection's yet: a call's two connections
        made a meter() call each, three Python calls, session 48).

        ``writer_registered``: the descriptor has a writer registered already
        (its TCP connect's: `open_tcp` with ``keep_writer``), taken over here and
        replaced or removed at the first registration: with uvloop a descriptor
        whose last interest is removed has its poll handle closed, and a new one
        opened for the next (six system calls: a fleet connection's connect
        and its handshake's first read, session 40).

        `sock`: connected, non-blocking; `ssl_object`: OpenSSL's connection on
        it (`tls_on`). The connection holds both: the C object under
        `ssl_object` keeps only weak references to them."""
        if sock.gettimeout() != 0.0:
            raise ValueError("a TLSConnection needs a non-blocking socket")
        # The C object (``_ssl._SSLSocket``), whose ``read`` and ``write`` the hot
        # path calls directly (an SSLObject's own are Python wrappers, a frame
        # more each). CPython-private (pinned by tests/e2e/test_tls_socket.py).
        sslobj: _SSLObject = ssl_object._sslobj  # type: ignore[attr-defined]
        self._loop = loop
        self._sock = sock
        self._ssl_object = ssl_object
        self._sslobj = sslobj
        # OpenSSL's SSL under it (None: not to be had): see the module docstring.
        self._ssl = _openssl_ssl(sslobj)
        if self._ssl is not None:
            _one_message_per_read(self._ssl)
        self._fd = sock.fileno()
        self._peername: tuple[str, int] | _Unasked | None = (
            _UNASKED if peername is None else peername[:2]
        )
        self._state = _HANDSHAKE
        self._handler: TLSHandler | None = None
        self._hs_done: Callable[[BaseException | None], None] | None = None
        self._hs_read = True
        # Where a read event's handshake step waits for its turn (`steps_in`);
        # None: the step runs in the read event.
        self._steps: _StepQueue | None = None
        self._step_queued = False
        self._timer: PatientTimer | None = None  # put off after a stall (late_timers)
        self._close_timer: PatientTimer | None = None
        self._reader_on = False
        self._writer_on = writer_registered
        # The writer registered is another's callback (writer_registered): the
        # first registration replaces or removes it.
        self._writer_foreign = writer_registered
        # A write OpenSSL could not finish: retried with these same bytes.
        self._out: Buffer | None = None
        # _out is partly sent (SSLWantWriteError): it goes before anything else.
        self._partial = False
        # Written after _out could not finish; sent once it has.
        self._more = bytearray()
        self._paused = False  # pause_reading()
        # A read on to the end TCP says has come (`_read_ended`) was stopped by
        # pause_reading: resume_reading takes it up again.
        self._read_on_at_resume = False
        self._eof = False  # the peer ended (no more reads)
        # After the peer ended: True for its close_notify, False for a bare TCP FIN.
        self.peer_ended_cleanly: bool | None = None
        self._writing_paused = False  # told the handler to pause_writing
        self._want_read_for_write = False  # a write/shutdown got SSLWantReadError
        self._want_write_for_read = False  # a read got SSLWantWriteError
        self._shutdown_wants_write = False
        # TLS 1.2 with renegotiation allowed: whether the peer has asked for a
        # renegotiation that is not done (postponed or under way); writes are
        # held meanwhile (_held), for _renegotiation_timeout of our reading at
        # most (the handshake's timeout; _timer). None otherwise.
        self._renegotiating: Callable[[], int] | None = None
        self._held = False
        self._renegotiation_timeout = 0.0
        # close_notify sent, the TLS session failed on what the peer kept sending:
        # its bytes are read and dropped from the socket itself until its FIN.
        self._drain_below_tls = False
        self._high_water = high_water
        self._max_buffer = max_buffer
        self._meter = meter  # counts this connection's work (meter())
        # Until its call is linked (`linked`): a read event's read is followed by
        # a look at TCP, for a reset that came with the bytes read (`_read_watched`).
        self._setting_up = True
        # A read event takes `_read_event` (`_on_readable`): while set up,
        # metered, paused, ended, not open, or a write waits for a read or a
        # read for a writable socket (`_detour_changed`). False: the hot path.
        self._detour = True

    def meter(self, meter: LoopTimeMeter | None) -> None:
        """Count the loop's time in this connection's I/O callbacks in `meter`
        (None: stop; a connection made with ``meter`` starts so).

        A carrier's connection is metered until its call is linked: its TLS
        handshake, its head and any answer and close are what a flood costs
        (core/accept_pacing.py). The loop's callbacks stay registered: they
        take the meter from the connection (`_on_readable`; a writer waiting
        is registered again, `_writer_changed`), and a call's hot path pays
        nothing for it."""
        self._meter = meter
        self._detour_changed()
        self._writer_changed()

    def linked(self) -> None:
        """Its call is linked (a tunnel, or a fleet's answer relayed): no more
        meter, and read events are read as they come, with no look at TCP
        after them (the hot path); from now on the silence sweep's
        `read_if_ended` finds a reset a dead poll hid. One look now, on the
        next loop turn (both sides resumed by then): the fleet's head read
        with a reset behind it, reading paused until the link, is ended at
        once rather than a sweep pass later. Nothing is registered again: the
        reader's callback reads `_detour` (it was an add_reader a side, about
        5,000 instructions each on uvloop, session 41)."""
        metered = self._meter is not None
        self._meter = None
        self._setting_up = False
        self._detour_changed()
        # A writer registered while metered has the metered callback: registered
        # again (`_writer_changed`, its test here: two Python calls a call less).
        if metered and self._writer_on and not self._writer_foreign:
            self._writer_changed()
        self._loop.call_soon(self.read_if_ended)

    def _detour_changed(self) -> None:
        """`_detour` again, after what it stands for may have gone (each of them
        set sets it True with it): a read event leaves the hot path while the
        connection is metered or set up, waits on a write or for a writable
        socket, holds its writes for a renegotiation (`_release` after each
        read), is paused, has ended, or is not open. One flag for the hot
        path to read: its five looks cost about 360 instructions a relayed
        record (callgrind, session 46)."""
        self._detour = (
            self._meter is not None
            or self._setting_up
            or self._want_read_for_write
            or self._want_write_for_read
            or self._paused
            or self._eof
            or self._held
            or self._state is not _OPEN
        )

    def _writer_changed(self) -> None:
        """The writer's callback for the meter now. Registered only while a write
        waits (or the handshake or a read wants the socket writable): rarely at
        a link, and the hot path's writable event pays no check."""
        if self._writer_on and not self._writer_foreign:  # a foreign one goes at _sync_io
            self._register(self._loop.add_writer, self._loop.remove_writer, self._write_callback())

    def _write_callback(self) -> Callable[[], None]:
        return self._on_writable if self._meter is None else self._on_writable_metered

    def _on_writable_metered(self) -> None:
        self._metered(self._on_writable)

    def _register(
        self,
        add: Callable[[int, Callable[[], None]], object],
        remove: Callable[[int], object],
        callback: Callable[[], None],
    ) -> None:
        """`add(fd, callback)`; where uvloop refuses it for the descriptor's poll it
        closed after an error event and keeps ("unable to perform operation on
        <UVPoll closed=True>; the handler is closed", uvloop issue 552: the peer's
        last bytes and its reset read as the bytes alone, see `read_if_ended`),
        that poll is dropped and a new one made, which reports the error. The
        call linked with such a carrier raised it, half linked, and was held."""
        try:
            add(self._fd, callback)
        except RuntimeError:
            if self._loop.is_closed():
                raise
            remove(self._fd)
            add(self._fd, callback)

    def _read_watched(self) -> None:
        """After a read event's read while the call is set up: read on if TCP says
        the connection has ended (a reset, a FIN) and the read left it unread.
        uvloop stops polling a descriptor after an error event (libuv's POLLERR),
        calling its reader this once: a peer's last bytes and the reset that came
        with them were read as the bytes alone (a read a record, a record a
        wake), the reset never (session 36): a fleet's part of a head, read,
        then a wait for timeouts.response and a retry as a timeout (504); a
        carrier's head, sent on to a fleet, the call held until the fleet's
        answer failed to reach it; a carrier's last handshake flight with its
        head, held until timeouts.request. asyncio's loop polls on, and reads
        the reset. One getsockopt a read event until the call is linked (a
        few a call), none after: the silence sweep watches a tunnel."""
        # `_reading_wanted` spelt out: a Python call less at each of a call's
        # set-up read events (about five, session 49).
        if (
            self._state is _OPEN
            and not self._paused
            and not self._eof
            and not self._want_write_for_read
            and self._handler is not None
            and not _tcp_established(self._sock)
        ):
            self._loop.call_soon(self._read_ended, ENDED_READS_PER_PASS)

    def _metered(self, callback: Callable[[], None]) -> None:
        # The meter as the callback starts: one that links the call (meter(None))
        # still counts, the set-up being a new connection's work to its end.
        meter = self._meter
        if meter is None:
            callback()
        else:
            meter.run(callback)

    # -- what the pump sees --------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the connection runs on."""
        return self._loop

    @property
    def peername(self) -> tuple[str, int] | None:
        """The peer's (host, port); None if the socket could not say. Given by
        the accept, or asked of the socket at the first read (a getpeername
        system call: two a call, made for every connection, where a carrier's
        accept had answered it and nothing read a fleet's, session 48); a
        socket closed before it was asked says None."""
        peername = self._peername
        if peername is _UNASKED:
            try:
                peername = self._sock.getpeername()[:2]
            except OSError:
                peername = None
            self._peername = peername
        return cast("tuple[str, int] | None", peername)

    @property
    def ssl_object(self) -> SSLObjectOnSocket:
        """For version(), cipher(), selected_alpn_protocol(), getpeercert(), session."""
        return self._ssl_object

    @property
    def tcp_socket(self) -> socket.socket:
        """The TCP socket under it, for its options (the TLS connection owns it:
        read or write it here and the TLS session breaks)."""
        return self._sock

    @property
    def ssl_pointer(self) -> int | None:
        """OpenSSL's SSL under this connection (None: not to be had)."""
        return self._ssl

    # What the call pump uses of an asyncio transport, with the same names, so
    # its protocols serve either (plain-TCP fleets stay on asyncio transports).

    def is_closing(self) -> bool:
        return self._state in (_CLOSING, _SHUTDOWN, _CLOSED)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The high-water mark; writing resumes once the buffer has drained, so
        ``low`` is accepted for the transport's signature and not used."""
        if high is not None:
            self._high_water = high

    def get_extra_info(self, name: str, default: object = None) -> object:
        """As an asyncio SSL transport's: "ssl_object" an ``ssl.SSLObject``,
        "socket" the TCP socket."""
        sock = self._sock
        if name == "ssl_object":
            return self._ssl_object
        if name == "socket":
            return sock
        if name == "peername":
            peername = self.peername
            return peername if peername is not None else default
        if name == "sslcontext":
            return self._sslobj.context
        if name == "peercert":
            return self._ssl_object.getpeercert()
        if name == "cipher":
            return self._ssl_object.cipher()
        if name == "sockname":
            try:
                return sock.getsockname()
            except OSError:
                return default
        return default

    @property
    def closed(self) -> bool:
        return self._state is _CLOSED

    def get_write_buffer_size(self) -> int:
        out = self._out
        return 0 if out is None else len(out) + len(self._more)

    # -- handshake -----------------------------------------------------------

    def start_handshake(
        self, timeout: float, done: Callable[[BaseException | None], None], *, timed: bool = True
    ) -> None:
        """Drive the handshake; ``done(None)`` or ``done(error)`` once. After an error
        the socket is closed (OpenSSL has sent its alert, if it had one).
        ``timed`` False: the caller's own timer bounds the handshake (it aborts
        it); ``timeout`` still bounds a renegotiation."""
        if self._state is not _HANDSHAKE or self._hs_done is not None:
            raise RuntimeError("handshake already started")
        self._hs_done = done
        self._renegotiation_timeout = timeout
        if timed:
            self._timer = PatientTimer(self._loop, timeout, self._handshake_timed_out, timeout)
        self._handshake_step()

    async def handshake(self, timeout: float, *, timed: bool = True) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def done(exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        self.start_handshake(timeout, done, timed=timed)
        try:
            await fut
        except asyncio.CancelledError:
            self.abort()
            raise

    def steps_in(self, queue: _StepQueue) -> None:
        """Run the handshake's steps that a read event brings in `queue`, a
        bounded number a loop turn (net/head_queue.py), not in the read event:
        a carrier's ClientHello costs 0.3-0.7 ms (the key exchange, the
        certificate's signature), and a burst of carriers, accepted one a turn,
        whose ClientHellos then arrive together, were all answered in one loop
        turn that every live call's next frame waited for (100 of them 26 ms of
        CPU; 300 held `run`'s calls 100-250 ms, hostile37). Its reader stays
        registered while its step waits, as a queue that runs it on the next
        loop turn does before the loop polls again; a read event that comes
        while it waits (a burst: the queue held it past a turn) unregisters it
        until the step runs, so that a waiting handshake is no busy loop. With
        uvloop a reader removed and added again is the descriptor's poll handle
        closed and opened again: seven system calls, a carrier's two flights
        each (session 40)."""
        self._steps = queue

    def _queue_step(self) -> None:
        if not self._step_queued:
            self._step_queued = True
            steps = self._steps
            assert steps is not None  # steps_in set it (not typing.cast: a call at run time)
            steps.add(self._queued_step)
        else:
            # Read again while the step waits: no more read events until it runs
            # (the step reads; `_handshake_step` registers again if it must).
            self._sync_io(eager=True)

    def _queued_step(self) -> None:
        self._step_queued = False
        if self._state is _HANDSHAKE and self._hs_done is not None:
            self._handshake_step()
            # The read event that queued the step may have been uvloop's last for
            # this poll (an error event: the peer's last flight, its head and its
            # reset together), the reader kept: once the handshake is done and
            # its handler reads, read on if TCP says the connection has ended.
            # (The reader removed while the step waited and added again after,
            # a new poll said so.)
            if self._setting_up:
                self._read_watched()

    def _handshake_step(self) -> None:
        try:
            # The C object's own step (no ssl.SSLSocket since session 44, whose
            # do_handshake set the socket's timeout again after every step).
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._hs_read = True
        except ssl.SSLWantWriteError:
            self._hs_read = False
        except (ssl.SSLError, OSError) as exc:
            self._handshake_finished(exc)
            return
        else:
            if self._sslobj.version() == "TLSv1.2":  # no renegotiation in TLS 1.3
                self._renegotiating = _renegotiation_watch(self._sslobj, self._ssl)
            self._state = _OPEN
            # Set up (until `linked`, never before the handshake's end) keeps
            # `_detour` True: no look at the rest (two Python calls a call).
            if not self._setting_up:
                self._detour_changed()
            self._handshake_finished(None)
            return
        self._sync_io()

    def _handshake_timed_out(self, timeout: float) -> None:
        self._timer = None
        self._handshake_finished(HandshakeTimeout(f"TLS handshake not done within {timeout:g}s"))

    def _handshake_finished(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, self._hs_done = self._hs_done, None
        if exc is not None:
            self._discard_unread()
            self._finish(None)
            if done is not None:
                done(exc)
            return
        if done is not None:
            done(None)
        # Registered for the open connection after `done`, unless `done` started
        # it (a carrier's: `start` registers for its handler) or closed it: a
        # `_sync_io` a call less (session 49). What it registers now is what it
        # did before `done`, which reads or writes nothing of it meanwhile.
        if self._handler is None and self._state is _OPEN:
            self._sync_io()

    def _discard_unread(self) -> None:
        """Before closing after a failed handshake: read (bounded) what the peer
        sent that OpenSSL left unread, below TLS. Closing with unread bytes
        resets the connection, and a reset can destroy the alert OpenSSL just
        sent before the peer reads it (plain HTTP on the TLS port would see
        ECONNRESET instead of the alert and an EOF)."""
        for _ in range(4):
            try:
                # The descriptor itself, not SSL_read.
                if self._sock.recv_into(_READ_BUFFER) < READ_BUFFER_SIZE:
                    return
            except OSError:  # BlockingIOError: nothing unread
                return

    # -- data ------------------------------------------------------------------

    def start(self, handler: TLSHandler, *, reading: bool = True) -> None:
        """Hand reads to ``handler`` from now on (after a successful handshake)."""
        if self._state is not _OPEN:
            raise RuntimeError(f"cannot start a connection in state {self._state.value}")
        self._handler = handler
        if not reading:
            self._paused = self._detour = True
        self._sync_io()
        if not self._paused and self._sslobj.pending():
            self._loop.call_soon(self._read_event)

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = self._detour = True
            if self._state is _OPEN:
                self._sync_io()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._detour_changed()
            if self._state is _OPEN:
                self._sync_io()
                # Bytes OpenSSL already decrypted make no poll event: read them now.
                # Held writes wait for a read (a postponed renegotiation may have
                # nothing to poll for): read now too. A read on to an end that
                # the pause stopped goes on: no poll event may come for it.
                if self._read_on_at_resume:
                    self._read_on_at_resume = False
                    self._loop.call_soon(self._read_ended, ENDED_READS_PER_PASS)
                elif self._sslobj.pending() or self._held:
                    self._loop.call_soon(self._read_event)

    def write(self, data: Buffer) -> None:
        """Send now if the socket takes it, else keep it (bounded) and send when writable.
        Writes after close() are dropped, as a closing transport drops them."""
        if self._state is not _OPEN or not data:
            if self._state is _HANDSHAKE:
                raise RuntimeError("write before the TLS handshake finished")
            return
        if self._out is not None:
            if len(self._more) + len(data) > self._max_buffer:
                self._finish(WriteBufferFull(f"TLS write buffer over {self._max_buffer} bytes"))
                return
            self._more += data
            self._buffered()
            return
        if self._renegotiating is not None and self._renegotiating():
            self._out = bytes(data)
            self._hold()
            self._buffered()
            return
        try:
            self._sslobj.write(data)
            return
        except ssl.SSLWantWriteError:
            self._partial = True
        except ssl.SSLWantReadError:
            self._want_read_for_write = self._detour = True
        except OSError as exc:  # ssl.SSLError included
            self._finish(_with_errno(exc, self._sock))
            return
        # Some records may be on the wire already: the retry must pass the same
        # bytes. A copy is fine (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER), and needed
        # when `data` is a view of a read buffer that the next read overwrites.
        self._out = data if isinstance(data, bytes) else bytes(data)
        self._sync_io()
        self._buffered()

    def _buffered(self) -> None:
        if self.get_write_buffer_size() > self._high_water and not self._writing_paused:
            self._writing_paused = True
            if self._handler is not None:
                self._handler.pause_writing()

    def _hold(self) -> None:
        """A renegotiation is asked for: what is to be written waits for the
        reads to finish it (`_release`), not for the socket to be writable. One
        read now: a renegotiation OpenSSL postponed starts in the next read, and
        the peer, waiting for our ClientHello, may send nothing to poll for."""
        if not self._held:
            self._held = self._detour = True
            self._timer = PatientTimer(
                self._loop, self._renegotiation_timeout, self._renegotiation_timed_out
            )
            self._loop.call_soon(self._read_event)
        self._sync_io()

    def _renegotiation_timed_out(self) -> None:
        self._timer = None
        if self._paused and self._state is _OPEN:
            # Our reading is paused (our handler's flow control): the wait is ours.
            self._timer = PatientTimer(
                self._loop, self._renegotiation_timeout, self._renegotiation_timed_out
            )
            return
        self._finish(
            RenegotiationTimeout(
                f"TLS renegotiation not done within {self._renegotiation_timeout:g}s"
            )
        )

    def _release(self) -> None:
        """After a read, with writes held: send them once the handshake is done."""
        renegotiating = self._renegotiating
        if self._state is _CLOSED or (renegotiating is not None and renegotiating()):
            return
        self._held = False
        self._detour_changed()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()

    def _flush(self) -> None:
        sslobj = self._sslobj
        renegotiating = self._renegotiating
        while (out := self._out) is not None:
            # A partly sent write goes first: OpenSSL starts no renegotiation
            # until it is done.
            if renegotiating is not None and not self._partial and renegotiating():
                self._hold()
                return
            try:
                sslobj.write(out)
            except ssl.SSLWantWriteError:
                self._partial = True
                self._sync_io()
                return
            except ssl.SSLWantReadError:
                self._want_read_for_write = self._detour = True
                self._sync_io()
                return
            except OSError as exc:
                self._finish(_with_errno(exc, self._sock))
                return
            self._partial = False
            more = self._more
            if more:
                # `more` becomes the retried buffer and is not appended to again.
                self._out, self._more = more, bytearray()
            else:
                self._out = None
        if self._state is _CLOSING:
            self._shutdown()
            return
        self._sync_io()
        if self._writing_paused:
            self._writing_paused = False
            if self._handler is not None:
                self._handler.resume_writing()

    def _release_buffers(self) -> None:
        """After a read that wanted more: give OpenSSL's record buffers back.
        SSL_MODE_RELEASE_BUFFERS frees them only as a write is sent and as
        application data is read whole; a read that takes a post-handshake
        message (a fleet's NewSessionTicket, a KeyUpdate: a WantRead with
        AUTO_RETRY cleared) sets the 16 KiB write buffer up and keeps it until
        the next write (the read buffer OpenSSL gives back itself as that read
        finds nothing more: ssl3_read_n, measured, session 36 review). A
        fleet's tickets come a round trip after its handshake, after our head
        on a real network: a call its carrier was silent on held 16.5 KiB more
        for as long as it lasted (memory per call: issue 13). OpenSSL frees
        nothing that holds a record under way (and says so)."""
        if self._out is None and self._renegotiating is None and self._ssl is not None:
            _free_buffers(self._ssl)

    def _peer_ended(self, *, clean: bool) -> None:
        self._eof = self._detour = True
        self.peer_ended_cleanly = clean
        self._sync_io()
        handler = self._handler
        keep_open = handler.eof_received() if handler is not None else False
        if self._state is not _OPEN:
            return
        if not clean:
            # A TCP FIN without close_notify is fatal to the TLS session: nothing
            # more can be written, and SSL_shutdown must not be called.
            self._finish(None)
        elif not keep_open:
            self.close()

    # -- closing ---------------------------------------------------------------

    def close(self, *, flush_within: float = 0.0) -> None:
        """Flush what is buffered, send close_notify, close; abort after
        CLOSE_TIMEOUT, or after `flush_within` when that is longer and bytes
        are buffered: the caller's own bound on the flush (net/proxy.py's
        timeouts.close_flush), which a shorter wait here would cut short."""
        state = self._state
        if state is _HANDSHAKE:
            self.abort()
            return
        if state is not _OPEN:
            return
        self._state = _CLOSING
        self._detour = True
        wait = CLOSE_TIMEOUT
        if flush_within > wait and self._out is not None:
            wait = flush_within
        if self._out is not None:
            self._sync_io()
        elif self._renegotiating is not None and _in_init(self._ssl):
            # OpenSSL refuses SSL_shutdown in a handshake (SHUTDOWN_WHILE_IN_INIT):
            # closed at once, the peer's bytes unread, it was a reset, and the peer
            # lost what it had not read of ours. Read the renegotiation through
            # first, as with a write held for it (`_read_through_handshake`). One
            # postponed, not started, is no handshake: close_notify goes now.
            self._hold()
        else:
            self._shutdown()
        if self._state is not _CLOSED:
            # Patient: after a stall, a peer that took our bytes or sent its
            # close_notify meanwhile gets back the time the loop took (what is
            # buffered was cut short); a silent one is aborted at once. Set
            # once the close waits: one done at once (the peer's close_notify
            # in, nothing buffered: a churned call's fleet side) had its timer
            # made and cancelled in the same call (session 47).
            self._close_timer = PatientTimer(
                self._loop, wait, self.abort, answered=self._peer_moved
            )

    def _peer_moved(self) -> bool:
        return peer_moved(self._sock, took=self._out is not None, sent=True)

    def read_if_ended(self) -> None:
        """Read now if TCP says the connection has ended (a reset, a timeout)
        while it waits for a read. uvloop stops polling a socket after an error
        event (libuv's POLLERR), calling its reader once more: a peer's last
        bytes and the reset that came with them were read as the bytes alone,
        and nothing was read again, the connection left open for good (a call
        held until carrier_silence, logged carrier_silent: the odd-fleet audit
        of session 35). asyncio's loop polls on, and reads the error. The
        silence sweep calls this for each side of a call: one getsockopt, which
        unlike SO_ERROR consumes nothing the read needs. What the connection
        holds is read to its end, a read a loop turn as the poll would
        (`_read_ended`): one read a pass took a record a pass, and a carrier
        whose last frames came as several records was held a pass each, never
        silent (6 records: 12 s at a 2 s pass, 30 s at the default 5 s). A
        connection paused (flow control) that TCP says has ended is read on at
        its resume: its poll may be stopped, and the next pass may find it
        paused again."""
        state = self._state
        if (  # `_reading_wanted`, spelt out (each side of a call at its link)
            state is not _OPEN
            or self._paused
            or self._eof
            or self._want_write_for_read
            or self._handler is None
        ):
            if (
                self._paused
                and state is _OPEN
                and not self._eof
                and not _tcp_established(self._sock)
            ):
                self._read_on_at_resume = True
            return
        if not _tcp_established(self._sock):
            self._read_ended(ENDED_READS_PER_PASS)

    def peer_has_ended(self) -> bool:
        """Whether TCP says the peer has ended (a reset, a FIN, a timeout) while
        this connection is open and has not read that end: one getsockopt."""
        return self._state is _OPEN and not self._eof and not _tcp_established(self._sock)

    def _reading_wanted(self) -> bool:
        return (
            self._state is _OPEN
            and not self._paused
            and not self._eof
            and not self._want_write_for_read
            and self._handler is not None
        )

    def _read_ended(self, turns: int) -> None:
        """A read, and another on the next loop turn (at most `turns` in all),
        until the connection TCP says has ended is read to its end (the reset
        or the FIN read), or stops being read (paused: flow control; it goes
        on at resume_reading, for on uvloop no read event may come after the
        error event that stopped its poll: the rest and the reset were read a
        sweep pass later, a pass a pause). Each read makes way: after a FIN or
        a reset the socket has data, an end or an error to give, never
        nothing; the bound is for a connection that would not end, to cost a
        pass no more than this."""
        if not self._reading_wanted():
            self._read_on_at_resume = self._paused
            return
        # Metered as the read event it stands for: a carrier being set up
        # that sends its head as many records and resets had all but the
        # first read outside the meter, its CPU not pacing the accepts.
        self._metered(self._read_event)
        if self._reading_wanted():
            if turns > 1:
                self._loop.call_soon(self._read_ended, turns - 1)
        else:
            self._read_on_at_resume = self._paused

    def abort(self) -> None:
        """Close now, without close_notify; what is buffered is lost."""
        if self._state is _HANDSHAKE and self._hs_done is not None:
            self._handshake_finished(ConnectionAbortedError("TLS handshake aborted"))
            return
        self._finish(None)

    def _shutdown(self) -> None:
        self._state = _SHUTDOWN
        self._detour = True
        self._shutdown_wants_write = False
        try:
            self._sslobj.shutdown()
        except ssl.SSLWantReadError:
            # close_notify is sent; the peer's has not come. Wait for it (or its
            # FIN), reading on: closing with unread bytes would reset the
            # connection, and the peer could lose what we sent last.
            if not self._eof:
                self._sync_io()
                return
        except ssl.SSLWantWriteError:
            self._shutdown_wants_write = True
            self._sync_io()
            return
        except ssl.SSLError as exc:
            if exc.reason == "APPLICATION_DATA_AFTER_CLOSE_NOTIFY" and not self._eof:
                # close_notify is sent (after everything written before it), but
                # the peer's data was waiting unread (its reading paused, say): the
                # second SSL_shutdown read it and failed the session (OpenSSL 3).
                # Closing now would reset the connection, and Linux would drop
                # what it has not sent yet. Drop the peer's bytes below TLS until
                # its FIN instead (bounded by CLOSE_TIMEOUT, as waiting is).
                self._drain_below_tls = True
                self._sync_io()
                return
        except OSError:
            pass
        self._finish(None)

    def _drain_after_close_notify(self) -> None:
        if self._state is not _SHUTDOWN:  # a read on after the bound, ended meanwhile
            return
        below_tls = self._drain_below_tls
        for _ in range(MAX_READS_PER_WAKE):
            try:
                if below_tls:
                    n = self._sock.recv_into(_READ_BUFFER)
                else:
                    n = self._sslobj.read(READ_BUFFER_SIZE, _READ_BUFFER)
                if n == 0:
                    break
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except OSError:
                break
        else:
            # The bound, more maybe to read. On uvloop, after an error event (the
            # peer's records and its reset together), no read event tells it:
            # twenty records and a reset held the close until CLOSE_TIMEOUT
            # (10 s; session 36). Read on if TCP says the peer has ended.
            # Metered as the read event it stands for (a carrier refused while
            # set up is a flood's cost to its close).
            if not _tcp_established(self._sock):
                self._loop.call_soon(self._metered, self._drain_after_close_notify)
            return
        self._finish(None)

    def _read_through_handshake(self) -> None:
        """Closing with a write held for a renegotiation: read on (what the peer
        sends is dropped, as a closing connection reads nothing) so that the
        handshake finishes, then send what was held and close_notify."""
        for _ in range(MAX_READS_PER_WAKE):
            try:
                if self._sslobj.read(READ_BUFFER_SIZE, _READ_BUFFER) == 0:
                    self._finish(None)  # the peer's close_notify
                    return
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                # Our handshake message waits for room (a ClientHello on a full
                # socket), and the peer, waiting for it, sends nothing to poll for.
                self._want_write_for_read = self._detour = True
                break
            except OSError:
                self._finish(None)
                return
        else:
            # The bound, more maybe to read: as the close's drain does
            # (`_drain_after_close_notify`), read on if TCP says the peer has
            # ended. On uvloop no read event comes after the error event:
            # twenty records and a reset held the close until the
            # renegotiation's timeout (session 36). As a read event would: the
            # handshake done meanwhile, the close_notify's drain reads it.
            if not _tcp_established(self._sock):
                self._loop.call_soon(self._metered, self._read_event)
        self._release()
        if self._held and self._state is _CLOSING:
            self._sync_io()

    def _finish(self, exc: BaseException | None) -> None:
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._detour = True
        for timer in (self._timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._close_timer = None
        self._sync_io()  # unregister before the descriptor can be reused
        self._sock.close()
        self._ssl_object.socket_closed = True  # no I/O through it on a reused number
        self._out = None
        self._more = bytearray()
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.connection_lost(exc)

    # -- the loop's callbacks ----------------------------------------------------

    def _sync_io(self, *, eager: bool = False) -> None:
        """Register for the events the current state waits on. An open
        connection that stops reading (paused, or no handler yet) stays
        registered for reads until a read event comes that it does not want
        (``eager``, from the callbacks): a pause that ends before the peer sends
        anything (the fleet's answer read, the call linked in the same callback;
        the handshake done, the handler started) costs no system call. With
        uvloop, removing a descriptor's last interest closes its poll handle
        (three epoll_ctl) and adding one opens a new one (two epoll_ctl for a
        check, an ioctl, an epoll_ctl, and the registration itself)."""
        state = self._state
        if state is _OPEN:
            # No handler yet (connect() returned, start() not called): what
            # arrives waits in the socket rather than being read and lost.
            reading = (
                self._handler is not None
                and not self._paused
                and not self._eof
                and not self._want_write_for_read
            ) or self._want_read_for_write
            writing = (
                self._out is not None and not self._want_read_for_write and not self._held
            ) or self._want_write_for_read
        elif state is _HANDSHAKE:
            reading, writing = self._hs_read, not self._hs_read
            if self._step_queued:
                reading = writing = False
        elif state is _CLOSING:
            # A renegotiation read through may want a write (its own message).
            reading = (self._want_read_for_write or self._held) and not self._want_write_for_read
            writing = (
                self._out is not None and not self._want_read_for_write and not self._held
            ) or self._want_write_for_read
        elif state is _SHUTDOWN:
            reading, writing = not self._shutdown_wants_write, self._shutdown_wants_write
        else:
            reading = writing = False
        loop, fd = self._loop, self._fd
        if (
            self._writer_foreign
            and not writing
            and state is _OPEN
            and not self._eof
            and not self._want_write_for_read
        ):
            # The handshake done in its first step (the fleet's answer came
            # before OpenSSL's first read: loopback, a near fleet), its reader
            # never registered and no handler yet: the reader takes the
            # connect's poll over now, for the reads to come (unregistered at
            # a read event it does not want, as a paused connection's). Removing
            # the writer alone closed the poll and start() opened a new one: six
            # epoll_ctl and an ioctl a call (session 41).
            reading = True
        if reading != self._reader_on and (
            reading
            or eager
            # A handshake step waiting in its queue keeps the reader until a read
            # event comes meanwhile (`_queue_step`).
            or (state is not _OPEN and not (state is _HANDSHAKE and self._step_queued))
            # These two would make every loop turn a wake-up: unregistered now.
            or self._eof
            or self._want_write_for_read
        ):
            self._reader_on = reading
            if reading:
                self._register(loop.add_reader, loop.remove_reader, self._on_readable)
            else:
                loop.remove_reader(fd)
        if writing != self._writer_on or self._writer_foreign:
            # After the reader's registration: a writer taken over (a connect's)
            # goes only once the reader holds the descriptor's poll.
            self._writer_foreign = False
            self._writer_on = writing
            if writing:
                self._register(loop.add_writer, loop.remove_writer, self._write_callback())
            else:
                loop.remove_writer(fd)

    def _on_readable(self, wanted: bool = False) -> None:
        """The loop's read callback, registered as it is from the handshake to
        the close, and the read itself. An open connection with nothing
        unusual (`_detour` False: its call linked, reading, no write waiting
        for a read nor a read for a writable socket, no write held for a
        renegotiation, not ended) reads at once, on one check; anything else
        takes the detour: `_read_event` (which unregisters a read event not
        wanted), metered while a meter is set, and followed by a look at TCP
        while the call is set up (`_read_watched`). ``wanted`` True: called
        by the detour's own paths (`_read_event`, `_on_writable`), which have
        seen the read wanted: no check. The hot path's read is here, not in a
        method of its own, and the detour too: a Python call a relayed record
        less (one of a relayed message's ten, session 49), none more a
        detoured event."""
        if self._detour and not wanted:
            if self._state is _HANDSHAKE and self._steps is not None:
                # The event queues its step (or unregisters while one waits): the
                # step is metered as its queue runs it. Metered here too, each of a
                # carrier's two flights cost two thread_time system calls for a
                # queue's append (1.7 a churned call, session 47); no look at TCP
                # follows a read event in a handshake (`_reading_wanted`).
                self._queue_step()
                return
            meter = self._meter
            if self._state is _OPEN and not (
                self._want_read_for_write
                or self._paused
                or self._eof
                or self._want_write_for_read
                or self._held
            ):
                # A set-up read event that reads (a head, a fleet's answer):
                # `_read_event`'s read, without its frame (four a churned call,
                # session 49).
                if meter is None:
                    self._on_readable(True)
                else:
                    meter.run(self._on_readable, True)
                if self._held:
                    self._release()
            elif meter is None:
                self._read_event()
            else:
                meter.run(self._read_event)
            if self._setting_up:
                self._read_watched()
            return
        handler = self._handler
        if handler is None:  # a write that wanted a read, before start(): read later
            self._sync_io(eager=True)
            return
        sslobj = self._sslobj
        buf = _READ_BUFFER
        size = READ_BUFFER_SIZE  # len(buf), without a call a read event
        # Counted down past each read that goes on: a range() here cost about
        # 1,000 instructions a wake (callgrind, session 45), most wakes one read.
        reads_left = MAX_READS_PER_WAKE
        while True:
            try:
                n = sslobj.read(size, buf)
            except ssl.SSLWantReadError:
                self._release_buffers()
                return
            except ssl.SSLWantWriteError:
                # OpenSSL must write before it can read on (a key update's answer):
                # stop polling for reads, which would fire again at once.
                self._want_write_for_read = self._detour = True
                self._sync_io()
                return
            except ssl.SSLEOFError as exc:
                if exc.reason is None:  # the socket failed, not a FIN
                    self._finish(_with_errno(exc, self._sock))
                else:
                    self._peer_ended(clean=False)
                return
            except ssl.SSLZeroReturnError:  # close_notify after we sent ours
                self._peer_ended(clean=True)
                return
            except OSError as exc:
                self._finish(exc)
                return
            if n == 0:  # the peer's close_notify
                self._peer_ended(clean=True)
                return
            handler.data_received(buf[:n])
            # Also covers a handler that closed the connection (``_finish``
            # drops it): nothing is read for a handler that is gone.
            if self._paused or self._state is not _OPEN:
                return
            # A read that did not fill the buffer took its record whole, and
            # OpenSSL (no read-ahead in CPython) holds nothing more: what
            # follows is on the socket, and the level-triggered poll says so.
            # One read per wake keeps the hot path free of the SSLWantReadError
            # a second read would raise.
            if n < size or not sslobj.pending():
                return
            reads_left -= 1
            if not reads_left:
                break
        if sslobj.pending():
            self._loop.call_soon(self._read_event)

    def _write_has_its_read(self) -> None:
        """A write that wanted a read has one: it goes on."""
        self._want_read_for_write = False
        self._detour_changed()
        self._flush()

    def _read_event(self) -> None:
        """What a read event does, in any state (unmetered, no look at TCP)."""
        state = self._state
        if state is _OPEN:
            if self._want_read_for_write:
                self._write_has_its_read()
                if self._state is not _OPEN:
                    return
            if not self._paused and not self._eof and not self._want_write_for_read:
                self._on_readable(True)
                if self._held:
                    self._release()
            else:
                self._sync_io(eager=True)  # a read event not wanted: unregister now
        elif state is _HANDSHAKE:
            if self._steps is None:
                self._handshake_step()
            else:
                self._queue_step()
        elif state is _CLOSING:
            if self._want_read_for_write:
                self._write_has_its_read()
            elif self._held:
                self._read_through_handshake()
        elif state is _SHUTDOWN:
            self._drain_after_close_notify()

    def _on_writable(self) -> None:
        state = self._state
        if state is _OPEN or state is _CLOSING:
            if self._want_write_for_read:
                self._want_write_for_read = False
                self._detour_changed()
                if state is _OPEN and not self._paused:
                    self._on_readable(True)
                    if self._state is not state:
                        return
                    if self._held:
                        self._release()
                        return
                elif state is _CLOSING and self._held:
                    self._read_through_handshake()
                    return
            if self._out is not None:
                self._flush()
            else:
                self._sync_io()
        elif state is _HANDSHAKE:
            self._handshake_step()
        elif state is _SHUTDOWN:
            self._shutdown()


class _LibSSL(NamedTuple):
    renegotiate_pending: Any  # SSL_renegotiate_pending(SSL *)
    in_init: Any  # SSL_in_init(SSL *)
    get_ctx: Any  # SSL_get_SSL_CTX(SSL *)
    ctrl: Any  # SSL_ctrl(SSL *, int, long, void *)
    free_buffers: Any  # SSL_free_buffers(SSL *)


# SSL_ctrl's command and the mode bit (openssl/ssl.h).
_SSL_CTRL_CLEAR_MODE = 78
_SSL_MODE_AUTO_RETRY = 0x4


@functools.cache
def _libssl() -> _LibSSL | None:
    """The OpenSSL calls CPython does not offer, looked up once per process
    (None: not to be had), as net/tls.py reaches SSL_CTX_ctrl."""
    try:
        import _ssl

        libssl = ctypes.CDLL(_ssl.__file__)  # resolves through the libssl _ssl links to
        calls = _LibSSL(
            libssl.SSL_renegotiate_pending,
            libssl.SSL_in_init,
            libssl.SSL_get_SSL_CTX,
            libssl.SSL_ctrl,
            libssl.SSL_free_buffers,
        )
    except (OSError, AttributeError, ImportError):
        return None
    pending = calls.renegotiate_pending
    pending.restype, pending.argtypes = ctypes.c_int, [ctypes.c_void_p]
    calls.in_init.restype, calls.in_init.argtypes = ctypes.c_int, [ctypes.c_void_p]
    calls.get_ctx.restype, calls.get_ctx.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    calls.ctrl.restype = ctypes.c_long
    calls.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    calls.free_buffers.restype, calls.free_buffers.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return calls


# Before these releases SSL_free_buffers freed a read buffer that still held a
# record partly read (CVE-2024-4741, a use after free): not called there unless
# OpenSSL is seen to refuse (`_refuses_a_record_under_way`): a distribution's
# patched build says its older number (Ubuntu 24.04's 3.0.13, 22.04's 3.0.2).
_FREE_BUFFERS_FIXED_IN = {0: 14, 1: 6, 2: 2, 3: 1}  # OpenSSL 3.minor: the patch release
# A TLS 1.2 handshake record's header (type 22, version 3.3, 64 bytes to come).
_A_RECORD_HEADER = b"\x16\x03\x03\x00\x40"


def _free_buffers_safe(version: tuple[int, int, int, int, int]) -> bool:
    """Whether this OpenSSL's SSL_free_buffers (`ssl.OPENSSL_VERSION_INFO`: 3.x
    reads (3, minor, 0, patch, status)) refuses a buffer a record is under way in."""
    major, minor, _fix, patch, _status = version
    if major != 3:
        return major > 3
    return patch >= _FREE_BUFFERS_FIXED_IN.get(minor, 0)


@functools.cache
def _free_buffers_call() -> Callable[[int], int] | None:
    calls = _libssl()
    if calls is None:
        return None
    free = cast(Callable[[int], int], calls.free_buffers)
    if _free_buffers_safe(ssl.OPENSSL_VERSION_INFO) or _refuses_a_record_under_way(free):
        return free
    return None


def _refuses_a_record_under_way(free: Callable[[int], int]) -> bool:
    """Whether this OpenSSL's SSL_free_buffers (`free`) refuses where
    CVE-2024-4741 freed: a record's header read, its body not come (the read
    buffer the record points into, nothing left in it). Asked of a client's SSL
    on memory BIOs, sent that header after its ClientHello; freed unread (an
    unpatched build frees the buffer, and nothing reads from it again)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming = ssl.MemoryBIO()
    probe = ctx.wrap_bio(incoming, ssl.MemoryBIO())
    try:
        for received in (b"", _A_RECORD_HEADER):
            incoming.write(received)
            with contextlib.suppress(ssl.SSLWantReadError):
                probe.do_handshake()
    except (ssl.SSLError, OSError):
        return False
    pointer = _openssl_ssl(probe._sslobj)  # type: ignore[attr-defined]
    return pointer is not None and free(pointer) == 0


def _free_buffers(pointer: int) -> None:
    """SSL_free_buffers: OpenSSL's record buffers, freed if no record is under
    way in them (it refuses otherwise); allocated again as they are needed."""
    free = _free_buffers_call()
    if free is not None:
        free(pointer)


def _openssl_ssl(sslobj: object) -> int | None:
    """The address of OpenSSL's SSL under `sslobj` (a ``_ssl._SSLSocket``), or
    None when it cannot be had (`_ssl_offset`)."""
    offset = _ssl_offset()
    if offset is None:
        return None
    pointer = ctypes.c_void_p.from_address(id(sslobj) + offset).value
    return int(pointer) if pointer else None


@functools.cache
def _ssl_offset() -> int | None:
    """Where a PySSLSocket holds OpenSSL's SSL: after PyObject_HEAD and its
    socket's weak reference (PySSLContext holds its SSL_CTX after PyObject_HEAD).
    Checked once a process, on a probe (a client's SSL on memory BIOs), whose SSL
    read there must name the probe's SSL_CTX back; None when it does not (another
    CPython's layout): no SSL is read then. Checked on each connection instead, a
    call's two connections cost 12,000 instructions more (callgrind, session 43)."""
    calls = _libssl()
    if calls is None:
        return None
    head = object.__basicsize__
    try:
        # The probe made in here: a context or SSL this OpenSSL will not make
        # (its configuration, its memory) is no SSL to be had (None, kept), not
        # an error out of every TLSConnection (functools.cache keeps none).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
        pointer = ctypes.c_void_p.from_address(id(probe._sslobj) + head + 8).value  # type: ignore[attr-defined]
        ctx_pointer = ctypes.c_void_p.from_address(id(ctx) + head).value
        if not pointer or calls.get_ctx(pointer) != ctx_pointer:
            return None
    except (OSError, ValueError, ctypes.ArgumentError):
        return None
    return head + 8


class SessionCalls(NamedTuple):
    """OpenSSL's session calls, for a fleet's session kept and offered without
    CPython's copy (net/fleet_sessions.py): `SSLSocket.session`'s setter and
    getter copy it through DER, its certificate parsed again each time."""

    set_session: Any  # SSL_set_session(SSL *, SSL_SESSION *): takes its own reference
    get1_session: Any  # SSL_get1_session(SSL *): a reference for the caller
    free: Any  # SSL_SESSION_free(SSL_SESSION *)
    has_ticket: Any  # SSL_SESSION_has_ticket(const SSL_SESSION *)
    is_resumable: Any  # SSL_SESSION_is_resumable(const SSL_SESSION *)
    get_time: Any  # SSL_SESSION_get_time(const SSL_SESSION *): seconds, when made
    get_timeout: Any  # SSL_SESSION_get_timeout(const SSL_SESSION *): its lifetime, s
    lifetime_hint: Any  # SSL_SESSION_get_ticket_lifetime_hint(const SSL_SESSION *): s
    session_reused: Any  # SSL_session_reused(const SSL *)


@functools.cache
def session_calls() -> SessionCalls | None:
    """The calls above, looked up once per process (None: not to be had, and
    no session is kept: every fleet handshake a full one, as before)."""
    if _libssl() is None:
        return None
    try:
        import _ssl

        libssl = ctypes.CDLL(_ssl.__file__)
        calls = SessionCalls(
            libssl.SSL_set_session,
            libssl.SSL_get1_session,
            libssl.SSL_SESSION_free,
            libssl.SSL_SESSION_has_ticket,
            libssl.SSL_SESSION_is_resumable,
            libssl.SSL_SESSION_get_time,
            libssl.SSL_SESSION_get_timeout,
            libssl.SSL_SESSION_get_ticket_lifetime_hint,
            libssl.SSL_session_reused,
        )
    except (OSError, AttributeError, ImportError):
        return None
    p = ctypes.c_void_p
    calls.set_session.restype, calls.set_session.argtypes = ctypes.c_int, [p, p]
    calls.get1_session.restype, calls.get1_session.argtypes = p, [p]
    calls.free.restype, calls.free.argtypes = None, [p]
    for one in (calls.has_ticket, calls.is_resumable, calls.session_reused):
        one.restype, one.argtypes = ctypes.c_int, [p]
    for one in (calls.get_time, calls.get_timeout):
        one.restype, one.argtypes = ctypes.c_long, [p]
    calls.lifetime_hint.restype, calls.lifetime_hint.argtypes = ctypes.c_ulong, [p]
    return calls


def _one_message_per_read(pointer: int) -> None:
    """SSL_read returns after each post-handshake message (module docstring)."""
    calls = _libssl()
    if calls is not None:
        calls.ctrl(pointer, _SSL_CTRL_CLEAR_MODE, _SSL_MODE_AUTO_RETRY, None)


def _in_init(pointer: int | None) -> bool:
    """Whether OpenSSL is in a handshake (a renegotiation under way, not one
    postponed): SSL_shutdown refuses then."""
    calls = _libssl()
    return calls is not None and pointer is not None and bool(calls.in_init(pointer))


def _renegotiation_watch(sslobj: _SSLObject, pointer: int | None) -> Callable[[], int] | None:
    """For a TLS 1.2 connection whose context allows renegotiation (the fleet
    side; the carrier listener's refuses it): a call saying whether the peer has
    asked for a renegotiation that is not done, postponed or under way
    (SSL_renegotiate_pending: set as OpenSSL reads the HelloRequest, cleared as
    the handshake finishes). None for TLS 1.3 (no renegotiation), for a context
    that refuses it, or when OpenSSL's SSL cannot be reached (writes are then
    not held, as before)."""
    calls = _libssl()
    if (
        calls is None
        or pointer is None
        or sslobj.version() != "TLSv1.2"
        or sslobj.context.options & ssl.OP_NO_RENEGOTIATION
    ):
        return None
    return functools.partial(calls.renegotiate_pending, pointer)


def cpython_ssl_missing(wrap_socket: Callable[..., object] | None = None) -> str | None:
    """What `tls_on` needs of CPython's private ``SSLContext._wrap_socket`` and
    this Python lacks, said for an operator (None: nothing). Asked as the module
    is imported: a Python that changed it fails at start, not at a first call."""
    if wrap_socket is None:
        wrap_socket = getattr(ssl.SSLContext, "_wrap_socket", None)
    wanted = ("sock", "server_side", "server_hostname", "owner", "session")
    try:
        said = inspect.signature(wrap_socket).parameters if wrap_socket is not None else {}
    except (TypeError, ValueError):
        said = {}
    if all(name in said for name in wanted):
        return None
    return (
        f"Python {platform.python_version()}'s ssl.SSLContext._wrap_socket does not take"
        f" ({', '.join(wanted)}), which fleet-ingress's TLS connections are made with"
        " (net/tls_socket.py, tls_on; CPython 3.11 to 3.13 have it): run it on one of those"
    )


if (_MISSING := cpython_ssl_missing()) is not None:
    raise RuntimeError(_MISSING)


class SSLObjectOnSocket(ssl.SSLObject):
    """The ``ssl.SSLObject`` `tls_on` makes, which its connection hands out
    (`TLSConnection.ssl_object`, ``get_extra_info("ssl_object")``). OpenSSL's
    socket BIO holds the descriptor's number, not the socket: once the
    connection has closed its socket that number may be another connection's,
    and a handshake step or a write through this object went there (session
    44's review: a ClientHello on another carrier's connection). After
    `socket_closed` is set (`TLSConnection` sets it as it closes the socket)
    its I/O raises ValueError, as a closed ``ssl.SSLSocket``'s does; what it
    says of the connection (context, session, version, cipher, certificate)
    it still says: net/fleet_sessions.py reads a failed handshake's context.
    The connection itself calls the C object under it (``_sslobj``), never
    these methods."""

    socket_closed = False

    def _refuse_if_closed(self, what: str) -> None:
        if self.socket_closed:
            raise ValueError(
                f"{what} on a closed TLS connection: its socket is closed, and its"
                " descriptor's number may be another connection's now"
            )

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # the base class names it len
        self._refuse_if_closed("read")
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        self._refuse_if_closed("write")
        return super().write(data)

    def do_handshake(self) -> None:
        self._refuse_if_closed("do_handshake")
        super().do_handshake()

    def unwrap(self) -> Any:
        self._refuse_if_closed("unwrap")
        return super().unwrap()

    def verify_client_post_handshake(self) -> Any:
        self._refuse_if_closed("verify_client_post_handshake")
        return super().verify_client_post_handshake()


@functools.lru_cache(maxsize=1024)
def _ascii_hostname(server_hostname: str) -> str:
    """As ``SSLContext._encode_hostname``: IDNA, whose codec is Python's own
    (a fleet connection's hostname encoded again each time cost instructions)."""
    return server_hostname.encode("idna").decode("ascii")


def tls_on(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> SSLObjectOnSocket:
    """OpenSSL's connection on the connected, non-blocking TCP socket `sock` (a
    socket BIO: OpenSSL reads and writes the descriptor), its handshake not
    started, as the ``ssl.SSLObject`` asyncio's transports give as
    "ssl_object". Made as ``SSLContext.wrap_socket`` makes its C object, without
    the ``ssl.SSLSocket`` around it: a second socket object, made in Python
    (family and type read as IntEnums, the descriptor detached, the timeout set,
    the peer's address asked), about 41,000 instructions a connection (session
    43) for nothing the connection used. An SNI callback is given the
    SSLObject (``owner``). The C object holds `sock` and its owner by weak
    reference only: the caller keeps both (`TLSConnection` does). ``session``
    is offered for resumption through CPython's setter (a copy)."""
    if server_side and server_hostname:
        raise ValueError("server_hostname can only be specified in client mode")
    if ctx.check_hostname and not server_side and not server_hostname:
        raise ValueError("check_hostname requires server_hostname")
    if sock.gettimeout() != 0.0:  # OpenSSL's BIO is made blocking or not now, for good
        raise ValueError("TLS on a socket needs it non-blocking first")
    hostname = None if server_hostname is None else _ascii_hostname(server_hostname)
    # SSLObject() refuses: the constructor is private.
    tls = object.__new__(SSLObjectOnSocket)
    tls._sslobj = ctx._wrap_socket(  # type: ignore[attr-defined]
        sock, server_side, hostname, owner=tls, session=session
    )
    return tls


def wrap_accepted(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    nodelay: bool = True,
    meter: LoopTimeMeter | None = None,
    peername: tuple[str, int] | None = None,
    **kw: int,
) -> TLSConnection:
    """The server side of an accepted TCP socket (handshake not started).
    ``nodelay`` False: the socket has TCP_NODELAY already (from its listener).
    ``meter``: where its I/O callbacks are counted (`TLSConnection.meter`);
    ``peername``: the address its accept answered (`Acceptor`'s ``with_address``)."""
    sock.setblocking(False)
    if nodelay:
        _nodelay(sock)
    tls = tls_on(sock, ctx, server_side=True)
    return TLSConnection(loop, sock, tls, meter=meter, peername=peername, **kw)


async def connect(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None,
    timeout: float,
    session: ssl.SSLSession | None = None,
    kept_session: HeldSession | None = None,
    underway: Underway | None = None,
    meter: LoopTimeMeter | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    **kw: int,
) -> TLSConnection:
    """TCP connect (``tcp_connect.open_tcp``: the addresses staggered) and the client
    handshake, all within ``timeout``; with ``underway`` the caller's own
    timer, told of the sockets under way, bounds it (it cancels the
    connect), and ``timeout`` only a renegotiation of the connection: a
    second timer of the same length would end a connection made during a
    stall that the caller's, asking ``underway``, gives its time (the
    session 32 clock audit: a TimeoutError read as the fleet's refusal).
    ``server_hostname`` is sent as SNI and checked against the certificate
    (if the context checks hostnames). ``session``: a session of an earlier
    connection to the same server, with the same context, offered for
    resumption (the server may decline: a full handshake then), through
    CPython's setter, which copies it (the bench's BARE_BIO_REUSE uses it).
    ``kept_session``: an OpenSSL SSL_SESSION (net/fleet_sessions.py) offered
    the same way, set on the SSL itself (SSL_set_session takes a reference of
    its own: no copy); not offered where that SSL cannot be reached. Its owner
    is held here until then: a bare pointer whose owner went during the TCP
    connect was a use after free (review38c). A handshake that fails on the
    peer's side with it offered raises `SessionRefused` (the caller may
    connect again without it).
    ``meter``: where the connection's I/O callbacks are counted from its
    handshake on (`TLSConnection.meter`): a call's fleet connection, until the
    link (accept pacing). ``loop``: the running loop, if the caller has it
    (CPython 3.11's get_running_loop is a getpid system call)."""
    loop = loop or asyncio.get_running_loop()
    # With `underway` no timer here: asyncio.timeout() asks for the running loop
    # twice (CPython 3.11: a getpid system call each).
    async with _NO_TIMEOUT if underway is not None else asyncio.timeout(timeout):
        # Its writer kept registered, for the connection to take over: the
        # descriptor's poll stays open from the connect to the handshake.
        sock = await open_tcp(host, port, underway, loop=loop, keep_writer=True)
        fd = sock.fileno()
        try:
            tls = tls_on(
                sock, ctx, server_side=False, server_hostname=server_hostname, session=session
            )
            conn = TLSConnection(loop, sock, tls, writer_registered=True, meter=meter, **kw)
        except BaseException:
            loop.remove_writer(fd)
            sock.close()
            raise
        offered = False
        if kept_session is not None and conn._ssl is not None:
            calls = session_calls()
            if calls is not None:
                offered = calls.set_session(conn._ssl, kept_session.pointer) == 1
        try:
            if underway is None:
                await conn.handshake(timeout)  # the outer timeout is the one that counts
                return conn
            underway.handshaking(sock)
            try:
                await conn.handshake(timeout, timed=False)
            finally:
                underway.handshaking(sock, False)
        except (ssl.SSLError, OSError) as exc:
            if offered and _refused_by_peer(exc):
                raise SessionRefused(f"the TLS session offered was refused: {exc}") from exc
            raise
    return conn


_NO_TIMEOUT = contextlib.nullcontext()

# OpenSSL's reasons for an alert the peer sent (SSL_AD_REASON_OFFSET + its
# code: "sslv3 alert handshake failure", "tlsv1 unrecognized name", ...).
_PEER_ALERT = ("SSLV3_ALERT_", "TLSV1_", "TLSV13_ALERT_")


def _refused_by_peer(exc: BaseException) -> bool:
    """Whether a client handshake's error is the peer's doing (an alert, its
    close or reset): not this side's check of its certificate, not a timeout,
    not this side's reading of an answer that is not TLS (a plain-HTTP fleet
    on the TLS port: "wrong version number"), nor another check of its own."""
    if isinstance(exc, ssl.SSLCertVerificationError | TimeoutError):
        return False
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return True  # its close
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or "").startswith(_PEER_ALERT)
    return isinstance(exc, ConnectionError)


class Acceptor:
    """Accepts on a listening socket from a reader callback, a bounded number per wake.

    ``on_error`` decides what an accept error costs: the seconds to stop
    accepting (0: go on). By default running out of descriptors or memory
    pauses for RETRY_DELAY and anything else (the connection is gone) goes on.
    ``pace``, called after each accepted connection, says how long to wait
    before the next (0: go on); the backlog holds what arrives meanwhile.
    ``with_address``: ``on_accept(sock, address)``, the peer's address as the
    accept answered it (without it, whoever needs the address asks the socket
    again: a system call a connection).
    ``reading``: whether its reader is on from the start; `read` turns it on
    and off (process.accept = "first": a worker that takes connections only
    while they wait, `core.accept_order`). `accepted` counts what it took.
    """

    MAX_ACCEPTS_PER_WAKE = 64
    # Out of descriptors or memory: the backlog stays readable, so accepting
    # again at once would spin. Pause, as asyncio's own accept loop does.
    RETRY_DELAY = 1.0
    _RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        on_accept: Callable[..., None],
        *,
        with_address: bool = False,
        per_wake: int | None = None,
        on_error: Callable[[OSError], float] | None = None,
        pace: Callable[[], float] | None = None,
        reading: bool = True,
    ) -> None:
        listener.setblocking(False)
        self._loop = loop
        self._listener = listener
        self._fd = listener.fileno()
        # What each accepted socket is made as, read once: `socket.accept()` reads
        # the listener's family and type again for every connection, each an IntEnum
        # made in Python (14,000 instructions a carrier of its 63,000, callgrind).
        self._family, self._type, self._proto = listener.family, listener.type, listener.proto
        self._on_accept = on_accept
        self._with_address = with_address
        self._per_wake = per_wake or self.MAX_ACCEPTS_PER_WAKE
        self._on_error = on_error or self._pause_for
        self._pace = pace
        self._retry: asyncio.TimerHandle | None = None
        self._reading = reading
        self.accepted = 0  # connections taken in all
        if reading:
            loop.add_reader(self._fd, self._accept)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def read(self, on: bool) -> None:
        """Turn its reader on or off (idempotent). Off, no connection is taken
        until it is on again; a pause under way ends into whichever it is."""
        if on == self._reading or self._fd < 0:
            return
        self._reading = on
        if self._retry is not None:
            return  # `_resume` adds the reader if on by then
        if on:
            self._loop.add_reader(self._fd, self._accept)
        else:
            self._loop.remove_reader(self._fd)

    def _pause_for(self, exc: OSError) -> float:
        return self.RETRY_DELAY if exc.errno in self._RESOURCE_ERRORS else 0.0

    def _accept(self) -> None:
        for _ in range(self._per_wake):
            if self._fd < 0:  # closed by on_accept
                return
            try:
                # socket.accept() without reading the listener's kind again (its
                # other step, blocking mode for a listener with a timeout, does
                # nothing on this non-blocking one).
                fd, address = self._listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self._pause(self._on_error(exc)):
                    return
                continue  # ECONNABORTED and the like: that connection is gone
            sock = socket.socket(self._family, self._type, self._proto, fileno=fd)
            self.accepted += 1
            if self._with_address:
                self._on_accept(sock, address)
            else:
                self._on_accept(sock)
            if self._pace is not None and self._pause(self._pace()):
                return

    def _pause(self, seconds: float) -> bool:
        """Stop accepting for `seconds` (if above 0 and still open); True if paused."""
        if seconds > 0 and self._fd >= 0 and self._retry is None:
            if self._reading:
                self._loop.remove_reader(self._fd)
            self._retry = self._loop.call_later(seconds, self._resume)
            return True
        return False

    def _resume(self) -> None:
        self._retry = None
        if self._fd >= 0 and self._reading:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if self._fd >= 0:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            elif self._reading:
                self._loop.remove_reader(self._fd)
            self._fd = -1
            self._listener.close()


def _with_errno(exc: OSError, sock: socket.socket) -> OSError:
    if isinstance(exc, ssl.SSLEOFError) and exc.reason is None:
        return _socket_failure(sock) or exc
    if exc.errno == errno.ETIMEDOUT:
        # The socket's own ETIMEDOUT (a write; Python 3.13's reads, gh-115627).
        info = read_tcp_info(sock)
        if _stopped_reading(info, _user_timeout_ms(sock)):
            return PeerStoppedReading()
        return gave_no_answer(info, sock, window_closed_on_unsent(info))
    return exc


def _tcp_established(sock: socket.socket) -> bool:
    """Whether TCP has the connection ESTABLISHED (or cannot say): not after the
    peer's reset or FIN, nor after a timeout. Asked a few times a call while it
    is set up (`_read_watched`, `linked`): its state byte alone is read, as
    liveness.read_tcp_state reads it, here without its frame (five a churned
    call, session 49)."""
    try:
        state = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, 1)
    except (OSError, AttributeError, TypeError, ValueError):
        return True
    return not state or state == _TCP_ESTABLISHED


def _socket_failure(sock: socket.socket) -> OSError | None:
    """What failed the socket under SSL_read / SSL_write; None if it did not.

    CPython 3.11 and 3.12 on OpenSSL 3 report it as SSLEOFError without a
    reason or the errno (SSL_read_ex returns 0, read as an EOF), and the read
    consumed the socket's error (3.13 raises the socket's own error, gh-115627,
    which needs no guess). A bare FIN is SSLEOFError with reason
    UNEXPECTED_EOF_WHILE_READING instead. What TCP still shows tells the two
    failures apart that the access log does (carrier_lost vs carrier_reset):
    see `peer_stopped_answering`. A connection TCP still has ESTABLISHED did
    not fail: OpenSSL did (a fleet's TLS 1.2 renegotiation under traffic both
    ways, which the TLS audit of session 20 saw logged as the fleet's reset).
    """
    info = read_tcp_info(sock)
    if info[:1] == _TCP_ESTABLISHED:
        return None
    if _stopped_reading(info, _user_timeout_ms(sock)):
        return PeerStoppedReading()
    if peer_stopped_answering(info):
        return gave_no_answer(info, sock, window_closed_on_unsent(info))
    return ConnectionResetError(errno.ECONNRESET, "connection reset by peer")


# tcpi_state, the first byte of struct tcp_info (its offsets: net/liveness.py).
_TCP_ESTABLISHED = bytes([TCP_ESTABLISHED])
_IPPROTO_TCP = socket.IPPROTO_TCP
# None where there is no TCP_INFO: getsockopt raises TypeError, read as "cannot say".
_TCP_INFO: Any = getattr(socket, "TCP_INFO", None)


def peer_stopped_answering(info: bytes) -> bool:
    """From a failed socket's TCP_INFO: did the kernel give the connection up (the
    user timeout or keepalive ran out), rather than the peer resetting it?

    Retransmissions, keepalive or window probes outstanding say the peer stopped
    answering. So does a window the peer closed on bytes still to send: a live peer
    that stops reading (a stuck bot) acknowledges the zero-window probes, and Linux
    still gives up at TCP_USER_TIMEOUT (the pair audit of session 12 saw that taken
    for a reset; the lossy-link audit of session 32 found one probe still counted
    out at the end, so the counts alone cannot tell it). None of these: a reset."""
    return probes_out(info) or window_closed_on_unsent(info)


def _stopped_reading(info: bytes, user_timeout_ms: int) -> bool:
    """A peer alive but not reading: its window closed on bytes of ours while
    it went on sending (a carrier's audio), heard from well within the user
    timeout that ended the connection. Neither the probe counts nor the last
    ACK tell it from a peer that vanished with its window closed (one probe is
    outstanding at the end and an acknowledged window probe does not count as
    heard, both measured); its data does. A peer that stopped sending as well
    cannot be told from one gone, and is not said to be."""
    if not window_closed_on_unsent(info) or user_timeout_ms <= 0:
        return False
    (last_data_recv,) = struct.unpack_from("=I", info, TCPI_LAST_DATA_RECV)
    return last_data_recv * 2 < user_timeout_ms


def _user_timeout_ms(sock: socket.socket) -> int:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    except (OSError, AttributeError):
        return 0


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
