"""The floor on socket BIOs: ``bare_splice.py``'s relay on ``fleet_ingress.net.tls_socket``.

The same least a TLS WebSocket relay can do (accept TLS, connect with TLS to a
fleet round-robin over ``--fleet``, forward the carrier's upgrade head
verbatim, then bytes both ways with flow control; no parsing, routing,
balancing, retries, registry or logging), but each side is a non-blocking
``ssl.SSLSocket`` driven by the loop's reader/writer callbacks instead of a
uvloop SSL transport: OpenSSL reads and writes the sockets itself, a relayed
record is one read into a buffer shared by every connection and one write. The
``bare-bio`` target of ``python -m bench`` (bench/harness/targets.py)::

    python bench/bare_bio_splice.py --listen 127.0.0.1:8443 --cert c.pem --key k.pem \\
        --ca ca.pem --fleet 127.0.0.1:9001 --fleet 127.0.0.1:9002

It serves until SIGTERM or SIGINT.

With no variant on, every read and write is ``TLSConnection``'s own, as on
the ingress's hot path: the C object's ``read`` and ``write``
(``SSLSocket._sslobj``; the public ``recv_into`` / ``send`` wrappers add
checks and Python frames per call). Once both sides are linked each
connection is told so (``TLSConnection.linked``), as the ingress tells its
calls': its read events then take the hot path. Until session 45 this floor
never did, and every read event took the set-up detour (``_read_event``, then a
look at TCP: one getsockopt a relayed message, strace); ``BARE_BIO_UNLINKED=1``
runs it that way again, to read figures taken before.

Bench variants, to see where the CPU per relayed message goes (environment,
all off by default; ``--variant NAME:KEY=1 --targets bare-bio@NAME``). They
replace ``TLSConnection._on_readable``'s read (and ``resume_reading`` for read-ahead) in this
process only, nothing in src/; the replacement reads, and handles a read that
fails, as ``TLSConnection._on_readable``'s read does:

- ``BARE_BIO_FUSED=1``: a read is written to the peer's ``_sslobj`` inside the
  read loop (no ``data_received`` / ``write`` frames): about the least Python a
  relayed record can cost on this layer.
- ``BARE_BIO_DRAIN=1``: read until ``SSLWantReadError`` on each wake (bounded),
  instead of once when the read did not fill the buffer.
- ``BARE_BIO_READ_AHEAD=1``: ``SSL_CTX_set_read_ahead(ctx, 1)`` through ctypes
  (CPython offers no switch): OpenSSL reads what the socket holds in one
  ``recv`` instead of a header read and a body read per record. It may then
  hold undecrypted bytes that neither ``pending()`` nor the poller sees, so
  reads go on while ``SSL_has_pending`` (ctypes) says so. A bench hack: it
  reads CPython's private struct layouts (checked against OpenSSL at start).
- ``BARE_BIO_REUSE=1``: each fleet's TLS session is kept (taken at the fleet's
  first bytes, when a TLS 1.3 ticket has come) and offered by the next
  connection to it, as HAProxy does for its servers by default: what
  resumption saves a call's set-up (churn). With ``BARE_BIO_REUSE_KEEP=1``
  too, a fleet's first session is kept for good and offered by every later
  connection, none taken after it.
- ``BARE_BIO_C_RELAY=1``: the record relay out of the interpreter (implies
  ``BARE_BIO_READ_AHEAD=1``). Once a call is linked (``TLSConnection.linked``,
  as the ingress links its calls), each side's reader is a ``Relay`` of
  bench/c_relay/relay.c, a C type the loop calls directly: on a readable event
  it runs ``SSL_read_ex`` -> the peer's ``SSL_write_ex`` on the two connections'
  own ``SSL*`` (read from CPython's private ``PySSLSocket``, checked against
  OpenSSL as read-ahead's are) while ``SSL_has_pending`` says OpenSSL holds
  more, with no Python frame. Python is called only for what is not the hot
  path: a connection paused, closing or with a write waiting (its own
  ``_on_readable``), a read that ends or fails or wants a write (as
  ``TLSConnection._on_readable``'s read handles it), a write that does not finish (the peer's
  write buffer, flow control) or fails. Built on demand
  (bench/c_relay/build.py: the host's cc, this Python's headers, the libssl
  ``_ssl`` uses); the splice exits saying why when it cannot be built.
- ``BARE_BIO_COALESCE=1``: a read event reads records while the socket has
  them (up to ``MAX_READS_PER_WAKE``, and while the shared buffer has room for
  a whole record: 64 KiB at most), stopping at the first ``SSLWantReadError``
  (the cost of asking), into one buffer, then hands them to the peer in one
  ``data_received`` -> one ``write``: one SSL_write, one record of up to
  16 KiB, one send, as HAProxy relays what waits on a connection. Flow control
  as the plain read: a pause stops the next wake's reads (this one's records
  are handed on; 64 KiB at most past the high-water mark, within the write
  buffer's bound). A read that fails after records were read hands them on
  first, then ends as ``TLSConnection._on_readable``'s read does. OpenSSL's buffers are
  given back (``_release_buffers``) after a wake that read nothing, as the
  plain read does at its ``SSLWantReadError``, not after every wake's last
  read (that would be a ctypes call a wake). ``BARE_BIO_COALESCE=adaptive``:
  the second read is tried only when this connection's last probing wake
  found more than one record, and otherwise once every ``COALESCE_PROBE_EVERY``
  wakes (a probe; ``BARE_BIO_COALESCE_PROBE=N`` sets it), so that at low
  load most wakes read once, as the plain read does, with no
  ``SSLWantReadError`` a message. Not with the other read variants.
- ``BARE_BIO_INGRESS_TLS=1``: both sides' TLS contexts made by the ingress's own
  ``net.tls`` (``server_ssl_context``, ``fleet_ssl_context``): the same ciphers,
  groups and session tickets as a call of the ingress, so that the floor's TLS
  work is the ingress's.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.util
import itertools
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import uvloop

from fleet_ingress.net import tls, tls_socket
from fleet_ingress.net.tls_socket import Acceptor, TLSConnection, connect, wrap_accepted

Address = tuple[str, int]
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0


class Side:
    """One TLS connection of a call; ``peer`` is the other one once linked."""

    __slots__ = ("conn", "peer", "probe_in", "ssl_ptr")

    def __init__(self, conn: TLSConnection) -> None:
        self.conn = conn
        self.peer: Side | None = None
        self.ssl_ptr = _ssl_pointer(conn) if _VARIANT["read_ahead"] else 0
        # BARE_BIO_COALESCE=adaptive: wakes to read once before the next probe.
        self.probe_in = 0

    def data_received(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.conn.write(data)

    def eof_received(self) -> bool:
        return False  # close ours; connection_lost closes the peer

    def connection_lost(self, exc: BaseException | None) -> None:
        if _RELAYS:
            relay = _RELAYS.pop(self.conn, None)
            if relay is not None:
                _RELAYED[0] += relay.records  # type: ignore[attr-defined]
                _RELAYED[1] += relay.handed_back  # type: ignore[attr-defined]
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.conn.close()

    # My write buffer is full: stop reading the side that fills it.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.conn.resume_reading()


class CarrierSide(Side):
    __slots__ = ("_connecting", "_early", "_fleet_ssl", "_fleets")

    def __init__(
        self, conn: TLSConnection, fleets: Iterator[Address], fleet_ssl: ssl.SSLContext
    ) -> None:
        super().__init__(conn)
        self._fleets = fleets
        self._fleet_ssl = fleet_ssl
        self._early = bytearray()  # the upgrade head (and anything after it) until linked
        self._connecting: asyncio.Task[None] | None = None

    def handshaken(self, exc: BaseException | None) -> None:
        if exc is None:
            self.conn.start(self)
            _read_held(self)
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.conn.write(data)
        else:
            self._early += data

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None

    async def _connect(self) -> None:
        host, port = next(self._fleets)
        session = _SESSIONS.get((host, port)) if _REUSE else None
        try:
            fleet_conn = await connect(
                host,
                port,
                self._fleet_ssl,
                server_hostname=host,
                timeout=CONNECT_TIMEOUT,
                kept_session=session,
            )
        except (OSError, TimeoutError):
            self.conn.close()
            return
        finally:
            self._connecting = None
        if self.conn.is_closing():  # the carrier left while we connected
            fleet_conn.close()
            return
        fleet = FleetSide(fleet_conn, (host, port)) if _REUSE else Side(fleet_conn)
        fleet.peer, self.peer = self, fleet
        fleet_conn.start(fleet)
        _read_held(fleet)
        fleet_conn.write(bytes(self._early))
        self._early = bytearray()
        if not _UNLINKED:
            # Off the set-up detour (a look at TCP after every read event, a
            # getsockopt a message), as the ingress's calls are once linked.
            self.conn.linked()
            fleet_conn.linked()
        if _c_relay is not None:
            _relay_linked(self, fleet)


# -- bench variants (see the module docstring) ---------------------------------


# BARE_BIO_REUSE=1: the fleet's TLS session kept (after its first answer, when a
# TLS 1.3 ticket has arrived) and offered by the next connection, as HAProxy
# does for its servers by default.
# Held as the ingress holds them (net/fleet_sessions.py): a reference to
# OpenSSL's SSL_SESSION (SSL_get1_session), offered with SSL_set_session, no
# copy. CPython's `SSLObject.session` copies it through DER at each get and
# set, the certificate parsed again: 3.2 M instructions a call (callgrind,
# session 44), which made this floor dearer than the ingress it is the floor of.
class _HeldSession:
    __slots__ = ("pointer",)

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __del__(self) -> None:
        calls = tls_socket.session_calls()
        if calls is not None and self.pointer:
            calls.free(self.pointer)
            self.pointer = 0


_SESSIONS: dict[Address, _HeldSession] = {}


class FleetSide(Side):
    __slots__ = ("_key",)

    def __init__(self, conn: TLSConnection, key: Address) -> None:
        super().__init__(conn)
        self._key: Address | None = key

    def takes_session(self) -> bool:
        """Its session is still to be taken, at its first bytes."""
        return self._key is not None and not (_REUSE_KEEP and self._key in _SESSIONS)

    def data_received(self, data: memoryview) -> None:
        if self.takes_session():
            calls = tls_socket.session_calls()
            ssl_pointer = self.conn._ssl
            if calls is not None and ssl_pointer is not None:
                pointer = calls.get1_session(ssl_pointer)
                if pointer:
                    _SESSIONS[self._key] = _HeldSession(pointer)  # type: ignore[index]
            self._key = None
            if _c_relay is not None and self.peer is not None:
                _relay_side(self, self.peer)  # its session taken: C from now on
        super().data_received(data)


_C_RELAY = os.environ.get("BARE_BIO_C_RELAY") == "1"
# BARE_BIO_UNLINKED=1: the connections never told their call is linked, as this
# floor was until session 45 (see the module docstring).
_UNLINKED = os.environ.get("BARE_BIO_UNLINKED") == "1"
_VARIANT = {
    "fused": os.environ.get("BARE_BIO_FUSED") == "1",
    "drain": os.environ.get("BARE_BIO_DRAIN") == "1",
    "read_ahead": os.environ.get("BARE_BIO_READ_AHEAD") == "1" or _C_RELAY,
}
# Not a replaced method, unlike the above: the fleet connection offers a session.
_REUSE = os.environ.get("BARE_BIO_REUSE") == "1"
# With it: a fleet's first session is kept and offered by every later
# connection (none taken after it).
_REUSE_KEEP = os.environ.get("BARE_BIO_REUSE_KEEP") == "1"
# BARE_BIO_INGRESS_TLS=1: both sides' contexts as the ingress makes them
# (`net.tls`: the carrier's with its profile's ciphers and groups and one
# session ticket a handshake, not OpenSSL's two), so the floor does the same
# TLS work a call of the ingress does.
_INGRESS_TLS = os.environ.get("BARE_BIO_INGRESS_TLS") == "1"
_OPEN = tls_socket._OPEN
_libssl: ctypes.CDLL | None = None
SSL_CTRL_GET_READ_AHEAD = 40
SSL_CTRL_SET_READ_AHEAD = 41


def _load_libssl() -> ctypes.CDLL:
    """The libssl this process's ``_ssl`` module uses (already mapped)."""
    with open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if "/libssl.so" in line)
    lib = ctypes.CDLL(path)
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_has_pending.argtypes = [ctypes.c_void_p]
    lib.SSL_has_pending.restype = ctypes.c_int
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    return lib


def _ctx_pointer(ctx: ssl.SSLContext) -> int:
    # CPython's PySSLContext: PyObject_HEAD, then SSL_CTX *ctx.
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value or 0


def _set_read_ahead(ctx: ssl.SSLContext) -> None:
    global _libssl
    if _libssl is None:
        _libssl = _load_libssl()
    ptr = _ctx_pointer(ctx)
    before = _libssl.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_READ_AHEAD, 0, None)
    _libssl.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_READ_AHEAD, 1, None)
    if before != 0 or _libssl.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_READ_AHEAD, 0, None) != 1:
        raise SystemExit("BARE_BIO_READ_AHEAD: the SSL_CTX pointer is not where expected")


def _ssl_pointer(conn: TLSConnection) -> int:
    # CPython's PySSLSocket: PyObject_HEAD, PyObject *Socket, then SSL *ssl.
    sslobj = conn._sslobj
    ptr = ctypes.c_void_p.from_address(id(sslobj) + object.__basicsize__ + 8).value or 0
    assert _libssl is not None
    if _libssl.SSL_get_SSL_CTX(ptr) != _ctx_pointer(sslobj.context):
        raise SystemExit("BARE_BIO_READ_AHEAD: the SSL pointer is not where expected")
    return ptr


def _read_held(side: Side) -> None:
    """With read-ahead the handshake may have read records past its end: no poll event
    will say so."""
    if side.ssl_ptr and _libssl is not None and _libssl.SSL_has_pending(side.ssl_ptr):
        asyncio.get_running_loop().call_soon(side.conn._on_readable)


def _write_fused(conn: TLSConnection, data: memoryview) -> None:
    """``TLSConnection.write`` on a connection with nothing buffered, inlined in the
    read loop: the C object's ``write``, and the same handling of one that did not
    finish."""
    try:
        conn._sslobj.write(data)
        return
    except ssl.SSLWantWriteError:
        pass
    except ssl.SSLWantReadError:
        conn._want_read_for_write = True
    except OSError as exc:
        conn._finish(tls_socket._with_errno(exc, conn._sock))
        return
    conn._out = bytes(data)  # a view of the shared buffer: the retry needs its own copy
    conn._sync_io()
    conn._buffered()


def _read_variant(self: TLSConnection) -> None:
    """``TLSConnection._on_readable``'s read with the variants' switches."""
    sslobj = self._sslobj
    buf = tls_socket._READ_BUFFER
    size = len(buf)
    fused, drain = _VARIANT["fused"], _VARIANT["drain"]
    handler = self._handler
    ssl_ptr = handler.ssl_ptr if isinstance(handler, Side) else 0
    for _ in range(tls_socket.MAX_READS_PER_WAKE):
        try:
            n = sslobj.read(size, buf)
        except ssl.SSLWantReadError:
            return
        except ssl.SSLWantWriteError:
            self._want_write_for_read = self._detour = True
            self._sync_io()
            return
        except ssl.SSLEOFError as exc:
            if exc.reason is None:  # the socket failed, not a FIN
                self._finish(tls_socket._socket_failure(self._sock))
            else:
                self._peer_ended(clean=False)
            return
        except ssl.SSLZeroReturnError:
            self._peer_ended(clean=True)
            return
        except OSError as exc:
            self._finish(exc)
            return
        if n == 0:
            self._peer_ended(clean=True)
            return
        handler = self._handler
        if handler is not None:
            peer = handler.peer if fused else None
            if peer is not None and peer.conn._state is _OPEN and peer.conn._out is None:
                _write_fused(peer.conn, buf[:n])
            else:
                handler.data_received(buf[:n])
        if self._paused or self._state is not _OPEN:
            return
        if drain:
            continue
        if ssl_ptr:
            if not _libssl.SSL_has_pending(ssl_ptr):  # type: ignore[union-attr]
                return
            continue
        if n < size or not sslobj.pending():
            return
    if sslobj.pending() or (ssl_ptr and _libssl.SSL_has_pending(ssl_ptr)):  # type: ignore[union-attr]
        self._loop.call_soon(self._on_readable)


# BARE_BIO_COALESCE: "1" (every wake reads until SSLWantReadError) or "adaptive".
_COALESCE = os.environ.get("BARE_BIO_COALESCE", "")
_ADAPTIVE = _COALESCE == "adaptive"
# A record's plaintext at most: a wake reads on while the buffer has room for one
# (so every read takes a record whole and OpenSSL holds nothing back).
RECORD_ROOM = 16 * 1024
# BARE_BIO_COALESCE=adaptive: a connection whose last probe found one record reads
# once a wake, and probes again (reads until SSLWantReadError) this many wakes on
# (BARE_BIO_COALESCE_PROBE=N: a huge N never probes after a connection's first wake,
# the variant's own cost at one read a wake, its SSLWantReadError apart).
COALESCE_PROBE_EVERY = int(os.environ.get("BARE_BIO_COALESCE_PROBE", "8"))
# What stopped a wake's reads, apart from an exception kept as it is.
_WANT_READ = "want_read"
_ZERO = "zero"  # close_notify (n == 0)
_BOUND = "bound"  # the wake's records or the buffer's room: the next wake reads on


def _read_coalesced(self: TLSConnection) -> None:
    """``TLSConnection._on_readable``'s read, the records a wake finds read into one buffer and
    handed to the handler in one ``data_received`` (``BARE_BIO_COALESCE``). Every
    handler in this process is a `Side`. The first read is the plain one (the
    whole buffer, no slice); the reads after it only on a probing wake."""
    handler = self._handler
    if handler is None:  # a write that wanted a read, before start(): read later
        self._sync_io(eager=True)
        return
    sslobj = self._sslobj
    buf = tls_socket._READ_BUFFER
    size = len(buf)
    probe = True
    if _ADAPTIVE and handler.probe_in:
        handler.probe_in -= 1
        probe = False
    try:
        n = sslobj.read(size, buf)
    except ssl.SSLWantReadError:
        self._release_buffers()
        return
    except (ssl.SSLWantWriteError, ssl.SSLZeroReturnError, OSError) as exc:
        _read_stopped(self, exc)
        return
    if n == 0:
        _read_stopped(self, _ZERO)
        return
    stop: object = _BOUND
    if probe:
        records = 1
        while records < tls_socket.MAX_READS_PER_WAKE and size - n >= RECORD_ROOM:
            try:
                got = sslobj.read(size - n, buf[n:])
            except ssl.SSLWantReadError:
                stop = _WANT_READ
                break
            except (ssl.SSLWantWriteError, ssl.SSLZeroReturnError, OSError) as exc:
                stop = exc  # handled after the hand-off
                break
            if got == 0:
                stop = _ZERO
                break
            n += got
            records += 1
        if _ADAPTIVE:
            handler.probe_in = 0 if records > 1 else COALESCE_PROBE_EVERY
        _COALESCED[0] += 1
        _COALESCED[1] += records
    handler.data_received(buf[:n])
    # Stopped by a bound or the socket's end of records: the next wake reads on
    # (each read asked for room for a whole record: OpenSSL holds none back, and
    # the poll reports what is on the socket). A handler that closed the
    # connection: nothing more for it.
    if stop is not _BOUND and stop is not _WANT_READ and self._state is _OPEN:
        _read_stopped(self, stop)


def _read_stopped(self: TLSConnection, stop: object) -> None:
    """What ended a wake's reads (after its records were handed on), handled as
    ``TLSConnection._on_readable``'s read handles it."""
    if isinstance(stop, ssl.SSLWantWriteError):
        # OpenSSL must write before it can read on: stop polling for reads.
        self._want_write_for_read = self._detour = True
        self._sync_io()
    elif stop is _ZERO or isinstance(stop, ssl.SSLZeroReturnError):
        self._peer_ended(clean=True)
    elif isinstance(stop, ssl.SSLEOFError):
        if stop.reason is None:  # the socket failed, not a FIN
            self._finish(tls_socket._with_errno(stop, self._sock))
        else:
            self._peer_ended(clean=False)
    else:
        assert isinstance(stop, OSError)
        self._finish(stop)


# Wakes that read on (probed), and the records they read: said on stderr at the stop.
_COALESCED = [0, 0]


_resume_public = TLSConnection.resume_reading


def _resume_read_ahead(self: TLSConnection) -> None:
    _resume_public(self)
    if not self._paused and isinstance(self._handler, Side):
        _read_held(self._handler)


# BARE_BIO_C_RELAY=1: bench/c_relay/relay.c's module, and each linked
# connection's Relay (its reader while it is registered).
_c_relay: ModuleType | None = None
_RELAYS: dict[TLSConnection, object] = {}
# Records relayed in C and events handed to Python, of the relays of closed
# connections, and the C writes that did not finish: said on stderr at the stop.
_RELAYED = [0, 0, 0]


def _load_c_relay() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "c_relay_build", Path(__file__).resolve().parent / "c_relay" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        module = build.load()
    except build.CannotBuild as exc:
        raise SystemExit(f"BARE_BIO_C_RELAY: {exc}") from None
    module.setup(TLSConnection, _OPEN)
    return module


def _relay_linked(carrier: Side, fleet: Side) -> None:
    """Both sides linked: each one's reader becomes a C Relay to the other; a
    fleet's whose session is still to be taken (BARE_BIO_REUSE) once it is,
    at its first bytes (`FleetSide.data_received`)."""
    _relay_side(carrier, fleet)
    if not (isinstance(fleet, FleetSide) and fleet.takes_session()):
        _relay_side(fleet, carrier)


def _relay_side(src: Side, dst: Side) -> None:
    """`src`'s reader becomes a C Relay to `dst` (on TLS 1.3, or 1.2 without
    renegotiation: writes held for a renegotiation stay Python's)."""
    assert _c_relay is not None
    if _UNLINKED or src.conn in _RELAYS:
        return
    if any(s.conn._renegotiating is not None or not s.ssl_ptr for s in (src, dst)):
        return
    conn = src.conn
    loop = conn.loop
    _RELAYS[conn] = _c_relay.Relay(
        conn, dst.conn, src.ssl_ptr, dst.ssl_ptr, conn._on_readable,
        _relay_read_end, _relay_write_failed, loop.call_soon,
    )  # fmt: skip
    if conn._reader_on:
        conn._register(loop.add_reader, loop.remove_reader, conn._on_readable)


def _relay_read_end(conn: TLSConnection, kind: str, reason: str | None) -> None:
    """The C relay's read did not read a record: as ``TLSConnection._on_readable``'s
    read handles it."""
    if kind == "want_write":
        conn._want_write_for_read = conn._detour = True
        conn._sync_io()
    elif kind == "zero":  # the peer's close_notify
        conn._peer_ended(clean=True)
    elif kind == "eof":  # a TCP FIN without close_notify
        conn._peer_ended(clean=False)
    elif kind == "socket":
        conn._finish(tls_socket._socket_failure(conn._sock))
    else:
        conn._finish(ssl.SSLError(1, f"[SSL: {reason}] (the C relay's read)"))


def _relay_write_failed(conn: TLSConnection, kind: str, reason: str | None, data: bytes) -> None:
    """The C relay's write to `conn` did not finish: as ``TLSConnection.write`` handles it."""
    _RELAYED[2] += 1
    if kind == "want_write":
        conn._partial = True
    elif kind == "want_read":
        conn._want_read_for_write = conn._detour = True
    elif kind == "socket":
        conn._finish(tls_socket._socket_failure(conn._sock) or ConnectionResetError())
        return
    else:
        conn._finish(ssl.SSLError(1, f"[SSL: {reason}] (the C relay's write)"))
        return
    conn._out = data  # records may be on the wire: the retry passes the same bytes
    conn._sync_io()
    conn._buffered()


_register_public = TLSConnection._register


def _register_relay(
    self: TLSConnection,
    add: Callable[[int, Callable[[], None]], object],
    remove: Callable[[int], object],
    callback: Callable[[], None],
) -> None:
    """``TLSConnection._register``, with a linked connection's Relay for its reader."""
    relay = _RELAYS.get(self)
    if relay is not None and callback == self._on_readable:
        callback = relay  # type: ignore[assignment]
    _register_public(self, add, remove, callback)


def _install_variants(*contexts: ssl.SSLContext) -> None:
    global _c_relay
    if _C_RELAY:
        _c_relay = _load_c_relay()
        TLSConnection._register = _register_relay  # type: ignore[method-assign]
    if _VARIANT["read_ahead"]:
        for ctx in contexts:
            _set_read_ahead(ctx)
        TLSConnection.resume_reading = _resume_read_ahead  # type: ignore[method-assign]
    if _COALESCE:
        if _COALESCE not in ("1", "adaptive"):
            raise SystemExit(f"BARE_BIO_COALESCE={_COALESCE!r}: write 1 or adaptive")
        if any(_VARIANT.values()):
            raise SystemExit(
                "BARE_BIO_COALESCE: not with BARE_BIO_FUSED, _DRAIN, _READ_AHEAD or _C_RELAY "
                "(each replaces the same read)"
            )
        TLSConnection._on_readable = _reading_by(_read_coalesced)  # type: ignore[method-assign]
    elif any(_VARIANT.values()):
        TLSConnection._on_readable = _reading_by(_read_variant)  # type: ignore[method-assign]


def _reading_by(read: Callable[[TLSConnection], None]) -> Callable[..., None]:
    """``TLSConnection._on_readable`` with `read` for its read (the hot path's,
    and the detour's own: ``wanted``), its detour as it is."""
    detour = TLSConnection._on_readable

    def on_readable(self: TLSConnection, wanted: bool = False) -> None:
        if self._detour and not wanted:
            detour(self)
        else:
            read(self)

    return on_readable


async def serve(listen: Address, cert: str, key: str, ca: str, fleets: Sequence[Address]) -> None:
    if _INGRESS_TLS:
        server_ssl = tls.server_ssl_context(Path(cert), Path(key))
        fleet_ssl = tls.fleet_ssl_context(verify=True, ca_file=Path(ca))
    else:
        server_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ssl.set_alpn_protocols(["http/1.1"])
        server_ssl.load_cert_chain(cert, key)
        fleet_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        fleet_ssl.set_alpn_protocols(["http/1.1"])
        fleet_ssl.load_verify_locations(cafile=ca)
    _install_variants(server_ssl, fleet_ssl)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    round_robin = itertools.cycle(fleets)

    def accepted(sock: socket.socket) -> None:
        conn = wrap_accepted(loop, sock, server_ssl)
        carrier = CarrierSide(conn, round_robin, fleet_ssl)
        conn.start_handshake(HANDSHAKE_TIMEOUT, carrier.handshaken)

    listener = socket.create_server(listen, backlog=1024)
    acceptor = Acceptor(loop, listener, accepted)
    try:
        await stop.wait()
    finally:
        acceptor.close()
        if _c_relay is not None:
            print(
                f"BARE_BIO_C_RELAY: {_RELAYED[0]} records relayed in C, {_RELAYED[1]} "
                f"events or failures handed to Python (connections closed), {_RELAYED[2]} "
                "C writes unfinished (the peer's buffer)",
                file=sys.stderr,
            )
        if _COALESCE:
            print(
                f"BARE_BIO_COALESCE={_COALESCE}: {_COALESCED[1]} records read in "
                f"{_COALESCED[0]} wakes that read on (adaptive: the probing wakes only)",
                file=sys.stderr,
            )


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
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.cert, args.key, args.ca, args.fleet))


if __name__ == "__main__":
    main()
