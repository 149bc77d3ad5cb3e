"""The carrier listener's accept loop, run by us rather than by create_server.

Accepting ourselves lets the ingress (1) count a connection against
`limits.max_connections` before spending any TLS work on it, refusing the
excess at once; (2) survive running out of descriptors with a log line and a
retry, where the loop's own accept path is silent (uvloop) or logs free text;
(3) see every failed TLS handshake; (4) count what new connections cost and
pace accepts when they cost too much while calls are live
(`core.accept_pacing`): a flood waits in the backlog rather than taking the
CPU the calls' frames need; (5) take connections only while they wait, as a
worker of rank > 0 under process.accept = "first" does (`core.accept_order`).
Each accepted socket's TLS runs on a socket BIO (`net.tls_socket`): OpenSSL
reads and writes the socket itself, so a refused client gets its alert
(protocol_version, handshake_failure) rather than a bare close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from fleet_ingress.core.accept_order import ACCEPT_LOOK, AcceptMode, AcceptOrder
from fleet_ingress.core.accept_pacing import AcceptPacer
from fleet_ingress.core.addresses import format_hostport, peer_ip
from fleet_ingress.logs import fields
from fleet_ingress.net.event_loop import count_unexpected_error, next_tick
from fleet_ingress.net.liveness import TcpLiveness
from fleet_ingress.net.proxy import CarrierProtocol, ProxyContext, serve
from fleet_ingress.net.tls_socket import Acceptor, HandshakeTimeout, TLSConnection, wrap_accepted

log = logging.getLogger("fleet_ingress.listener")

# Out of descriptors or kernel memory: wait and try again (HAProxy does the same).
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# The peer gave up before we accepted, or (Linux accept(2)) a pending network
# error surfaced on the listening socket: accept again.
_GONE_ERRNOS = {
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.ECONNRESET,
    errno.EHOSTUNREACH,
    errno.EHOSTDOWN,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.ENONET,
    errno.ENOPROTOOPT,
    errno.EOPNOTSUPP,
    errno.ETIMEDOUT,
}
# A worker's own descriptors beside its calls': listeners, its channel, the
# event loop's, the log's, the admin and stats sockets, a reload's file reads.
DESCRIPTORS_KEPT = 64
ACCEPT_RETRY_FIRST = 0.05
ACCEPT_RETRY_MAX = 1.0
# One warning per kind per this many seconds: a flood must not flood the log too.
WARN_EVERY = 5.0
# struct tcp_info of a LISTEN socket (Linux, net/ipv4/tcp.c tcp_get_info): its
# accept queue's length in tcpi_unacked, its backlog in tcpi_sacked (u32 each).
_TCPI_UNACKED = 24
_ACCEPT_QUEUE_READ = _TCPI_UNACKED + 8
_TCP_INFO: Any = getattr(socket, "TCP_INFO", None)


def accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """A listening socket's accept queue: (connections waiting to be accepted,
    the backlog), from its TCP_INFO; None where it cannot be read (not Linux,
    not TCP, closed)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _ACCEPT_QUEUE_READ)
    except (OSError, TypeError):
        return None
    if len(info) < _ACCEPT_QUEUE_READ:
        return None
    waiting, backlog = struct.unpack_from("=II", info, _TCPI_UNACKED)
    return waiting, backlog


def connections_within(descriptors: int, configured: int, *, acme_connections: int) -> int:
    """limits.max_connections, or fewer when `descriptors` (the process's
    RLIMIT_NOFILE) could not hold that many calls: two descriptors a call
    (carrier and fleet) after DESCRIPTORS_KEPT and `acme_connections`, the
    descriptors the :80 listener may hold. Past its descriptors a worker
    cannot accept at all, and a new carrier waited in the backlog unanswered
    until it gave up (the limits audit of session 14); under this count it is
    refused at once, and counted. Not a guarantee: a call's staggered fleet
    connects (net/tcp_connect.py) hold more than one for up to a second."""
    room = (descriptors - DESCRIPTORS_KEPT - acme_connections) // 2
    return max(1, min(configured, room))


def bind_tcp(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A listening socket on `host`'s address (`listen_sockaddr`); "::" (the
    IPv6 wildcard) takes IPv4 too, as one socket. A name with several
    addresses is bound on one of them, with a warning naming the others."""
    family, sockaddr, others = listen_sockaddr(host, port)
    if others:
        log.warning(
            "a listener's host name has several addresses: listening on one",
            extra=fields(
                address=format_hostport(host, port),
                listening_on=format_hostport(sockaddr[0], port),
                not_on=[format_hostport(other, port) for other in others],
                fix=f"[::]:{port} for both families on one socket, or one address",
            ),
        )
    dualstack = family == socket.AF_INET6 and sockaddr[0] == "::" and socket.has_dualstack_ipv6()
    # The whole sockaddr: a link-local address's scope id (its zone, fe80::10%ve0)
    # is its fourth field, and binding that address without it is EINVAL.
    sock = socket.create_server(sockaddr, family=family, backlog=backlog, dualstack_ipv6=dualstack)
    sock.setblocking(False)
    return sock


def listen_sockaddr(host: str, port: int) -> tuple[int, Any, list[str]]:
    """The (family, sockaddr) a listener on `host` binds, and the addresses of
    its name not bound. Asks the C library's getaddrinfo (socket.getaddrinfo,
    not the event loop's: uvloop's answers fe80::10%ve0 with scope id 0), with
    AF_UNSPEC: a name with only an IPv6 address was looked up as IPv4 and
    failed, misleadingly, as a temporary failure in name resolution. A name
    with several addresses (localhost with 127.0.0.1 and ::1, as Debian's hosts
    file has it) binds its first IPv4 one, as before both families were asked:
    a configuration that started before still starts."""
    infos = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    found = list(dict.fromkeys((info[0], info[4]) for info in infos))
    # IPv4 first, then IPv6, each in the resolver's order.
    found.sort(key=lambda one: one[0] != socket.AF_INET)
    (family, sockaddr), *others = found
    return family, sockaddr, [str(other[0]) for _, other in others]


class ListenError(OSError):
    """A listener could not bind; the message names the config key and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def bind_errors_named(key: str, address: str) -> Iterator[None]:
    """Around binding the listener of config key `listen.<key>`: an OSError becomes a
    ListenError naming the key, the address, the reason and the fix."""
    try:
        yield
    except OSError as exc:
        zone = address.partition("]")[0].partition("%")[2] if address.startswith("[") else ""
        if isinstance(exc, socket.gaierror) and zone:
            raise ListenError(
                exc.errno,
                f"listen.{key} = {address!r}: no interface of this machine is named "
                f"{zone!r}; give the zone of the interface with that address (`ip -6 addr`)",
            ) from None
        if isinstance(exc, socket.gaierror):
            raise ListenError(
                exc.errno,
                f"listen.{key} = {address!r}: {exc.strerror}; use an address or a "
                "host name this machine resolves",
            ) from None
        if exc.errno == errno.EADDRINUSE:
            port = address.rpartition(":")[2]
            hint = f"another process listens there (`ss -ltnp 'sport = :{port}'` shows which)"
        elif exc.errno == errno.EACCES:
            hint = "a port below 1024 needs root or CAP_NET_BIND_SERVICE (the unit file grants it)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = (
                "no interface of this machine has that address (`ip addr` lists them): "
                "give one it has, or 0.0.0.0 / [::] for all; a shared (keepalived) "
                "address this host may not hold needs sysctl net.ipv4.ip_nonlocal_bind=1 "
                "(net.ipv6.ip_nonlocal_bind for IPv6)"
            )
        elif exc.errno == errno.ENODEV and zone:
            # A zone given as a number resolves whatever it is; the bind fails.
            hint = (
                f"no interface of this machine has index {zone}; give the zone of the "
                "interface with that address (`ip -6 addr`)"
            )
        else:
            hint = "check the address"
        raise ListenError(
            exc.errno,
            f"listen.{key} = {address!r}: cannot listen: "
            f"{os.strerror(exc.errno) if exc.errno else exc}; {hint}",
        ) from None


class CarrierListener:
    """Accepts carriers (a reader callback, one connection per loop turn), runs
    their TLS handshakes on socket BIOs (`net.tls_socket`) and hands each
    connection that completes one to a `CarrierProtocol`."""

    def __init__(
        self,
        sock: socket.socket,
        context: Callable[[], ProxyContext],
        server_ssl: Callable[[], ssl.SSLContext],
        *,
        order: AcceptOrder | None = None,
    ) -> None:
        """`order`: this worker's rank and process.accept (None: it takes
        connections as its loop is free, rank 0)."""
        self.sock = sock
        self.context = context  # read per connection: a reload swaps it
        self.server_ssl = server_ssl  # the same: a reload builds a new TLS context
        self._acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # start()
        # The liveness options set on the listening socket (`_take`).
        self._listener_liveness: TcpLiveness | None = None
        # Connections accepted next that the kernel took before the listener
        # had the options (`TcpLiveness.set_on_listener`).
        self._taken_before_options = 0
        self._handshakes: set[TLSConnection] = set()
        self._cutting = False  # close() is aborting the handshakes under way
        self._retry_in = ACCEPT_RETRY_FIRST
        self._warned_at: dict[str, float] = {}
        self._pacer = AcceptPacer(share=1.0)
        self.order = order or AcceptOrder()
        self._look_timer: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return name[0], name[1]

    def start(self) -> None:
        # One accept per loop turn: a burst of new connections (a flood) then
        # starts its TLS handshakes over many turns, between the calls' frames,
        # instead of all in one turn that every live call would wait for. The
        # listening socket's readiness is level-triggered: the rest of the backlog
        # wakes the next turn.
        # Kept for each connection's TLS: CPython 3.11's get_running_loop is a
        # getpid system call.
        self._loop = asyncio.get_running_loop()
        self._acceptor = Acceptor(
            self._loop,
            self.sock,
            self._accepted,
            with_address=True,
            per_wake=1,
            on_error=self._accept_failed,
            pace=self._pace,
            reading=self.order.reading,
        )
        self._look_next()

    def set_accept(self, mode: AcceptMode) -> None:
        """process.accept as a reload sets it: applied at once."""
        acceptor = self._acceptor
        if acceptor is None or mode == self.order.mode:
            return
        acceptor.read(self.order.set_mode(mode, acceptor.accepted))
        self._look_next()

    def _look_next(self) -> None:
        """The next look at the accept queue, on the loop clock's next
        ACCEPT_LOOK tick (one wake-up with the worker's other timers due
        then), while this worker reads only when connections wait."""
        if not self.order.looks:
            if self._look_timer is not None:
                self._look_timer.cancel()
                self._look_timer = None
            return
        loop = self._loop
        if self._look_timer is None and loop is not None:
            if self.order.confirming:  # connections seen waiting: soon, off the tick
                self._look_timer = loop.call_later(self.order.next_look, self._look)
            else:
                self._look_timer = loop.call_at(next_tick(loop.time(), ACCEPT_LOOK), self._look)

    def _look(self) -> None:
        self._look_timer = None
        acceptor = self._acceptor
        if acceptor is None or acceptor.closed:
            return
        queue = accept_queue(self.sock)
        acceptor.read(self.order.look(None if queue is None else queue[0], acceptor.accepted))
        self._look_next()

    def close(self, *, keep_handshakes: bool = False) -> None:
        """Stop accepting: new connections are refused by the kernel at once.
        Handshakes under way are cut, unless `keep_handshakes` (an old
        generation after an upgrade: they finish and become calls here)."""
        if self._look_timer is not None:  # an old generation stops looking too
            self._look_timer.cancel()
            self._look_timer = None
        if self._acceptor is not None:
            self._acceptor.close()
        else:
            self.sock.close()
        if keep_handshakes:
            return
        self._cutting = True
        handshakes, self._handshakes = self._handshakes, set()
        for conn in handshakes:
            conn.abort()  # its done callback counts it out of `handshaking`

    def _accept_failed(self, exc: OSError) -> float:
        """How long to stop accepting after this error (0: accept on)."""
        if exc.errno in _GONE_ERRNOS:
            return 0.0
        if exc.errno not in _RESOURCE_ERRNOS:
            # Unknown: never let one odd error stop the listener for good.
            self._warn("error", "accept failed; retrying", error=repr(exc))
            return ACCEPT_RETRY_FIRST
        registry = self.context().registry
        registry.accept_failures += 1
        registry.counted()
        retry_in = self._retry_in
        self._warn(
            "accept",
            "cannot accept connections: out of resources; retrying. Raise "
            "LimitNOFILE (systemd) or ulimit -n, or lower limits.max_connections",
            error=exc.strerror,
            open_connections=len(registry.connections),
            retry_in_s=retry_in,
        )
        self._retry_in = min(retry_in * 2, ACCEPT_RETRY_MAX)
        return retry_in

    def _pace(self) -> float:
        ctx = self.context()
        registry = ctx.registry
        self._pacer.share = ctx.new_connection_share  # a reload may change it
        pause = self._pacer.after_accept(
            time.monotonic(), registry.new_connection_cpu.spent, len(registry.calls)
        )
        registry.accepts_paused_ms += round(pause * 1000)  # whole ms: 1, 2, 4, 8, 16
        # process.accept = "first": behind on its own handshakes, it leaves the
        # queue to the other workers (`AcceptOrder.pause_when_busy`).
        return max(pause, self.order.pause_when_busy(len(ctx.heads)))

    def _accepted(self, conn: socket.socket, peername: tuple[str, int]) -> None:
        ctx = self.context()
        ctx.registry.new_connection_cpu.run(self._take, conn, peername, ctx)

    def _take(self, conn: socket.socket, peername: tuple[str, int], ctx: ProxyContext) -> None:
        self._retry_in = ACCEPT_RETRY_FIRST
        registry = ctx.registry
        if len(registry.connections) + registry.handshaking >= ctx.max_connections:
            registry.refused_connections += 1
            registry.counted()
            if ctx.descriptor_limit is None:
                self._warn(
                    "limit",
                    "connection refused: limits.max_connections reached; raise it if the "
                    "host has room, or add an ingress",
                    max_connections=ctx.max_connections,
                    refused_total=registry.refused_connections,
                )
            else:
                self._warn(
                    "limit",
                    "connection refused: as many connections as this worker's descriptors "
                    "allow (two a call); raise LimitNOFILE (systemd) or ulimit -n",
                    max_connections=ctx.max_connections,
                    nofile=ctx.descriptor_limit,
                    refused_total=registry.refused_connections,
                )
            _reset(conn)
            return
        # Before TLS: a carrier that vanishes mid-call (no FIN) fails its socket
        # within seconds instead of holding a fleet slot for minutes. Set on the
        # listening socket, the options (and TCP_NODELAY) are what the
        # connections it accepts inherit: set on each only when it has not
        # (taken before the listener had them).
        liveness = ctx.liveness
        if liveness is not self._listener_liveness:
            self._listener_liveness = liveness
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # This one and those queued behind it were taken with the options
            # from before: set on each, whatever its user timeout says.
            self._taken_before_options = 1 + liveness.set_on_listener(self.sock)
        if self._taken_before_options:
            self._taken_before_options -= 1
            inherited = False
        else:
            # Asked of each, not taken from the listener's having been set here:
            # the listening socket is shared with another generation's workers
            # (an upgrade's overlap; a new generation that failed its trial
            # leaves it as it set it), whose options Linux copies to what this
            # worker accepts (tests/e2e/test_listener_options.py).
            inherited = liveness.inherited_by(conn)
        if not inherited:
            liveness.apply(conn)
        loop = self._loop
        assert loop is not None  # start() set it (not typing.cast: a call at run time)
        try:
            tls = wrap_accepted(
                loop,
                conn,
                self.server_ssl(),
                nodelay=not inherited,
                meter=registry.new_connection_cpu,  # until its call is linked: a flood's cost
                peername=peername,
            )
        except OSError as exc:  # the socket died under us
            registry.tls_handshake_failures += 1
            registry.counted()
            log.debug("tls handshake failed", extra=fields(error=repr(exc)))
            conn.close()
            return
        tls.steps_in(ctx.heads)  # a burst's ClientHellos answered over many loop turns
        registry.handshaking += 1
        self._handshakes.add(tls)
        # A handshake that never completes is a request that never came. A failed
        # one has sent its alert already: OpenSSL writes to the socket itself.
        tls.start_handshake(ctx.request_timeout, partial(self._handshake_done, tls, ctx))

    def _handshake_done(
        self, tls: TLSConnection, ctx: ProxyContext, exc: BaseException | None
    ) -> None:
        ctx.registry.handshaking -= 1
        self._handshakes.discard(tls)
        if exc is not None:
            if not self._cutting:  # a stop cuts handshakes short: not the carrier's failure
                ctx.registry.tls_handshake_failures += 1
                ctx.registry.counted()
                _log_handshake_failure(ctx, tls, exc)
            return
        try:
            serve(tls, CarrierProtocol(ctx))
        except Exception:
            # A bug in starting the call (its head timer never set): the carrier
            # would hold the connection, and a limits.max_connections place, for
            # as long as it likes. Cut it; it redials into a new one.
            count_unexpected_error()
            log.exception("could not start serving a connection: cut; a bug, report it")
            tls.abort()

    def _warn(self, kind: str, message: str, **values: object) -> None:
        now = time.monotonic()
        if now - self._warned_at.get(kind, -WARN_EVERY) >= WARN_EVERY:
            self._warned_at[kind] = now
            log.warning(message, extra=fields(**values))


def _handshake_failure_reason(exc: BaseException) -> str | None:
    """What a failed carrier handshake says of the client, for the log: OpenSSL's
    reason (UNSUPPORTED_PROTOCOL: it offered only TLS 1.1 or older;
    NO_SHARED_CIPHER; TLSV1_ALERT_UNKNOWN_CA: it does not trust this host's
    certificate; HTTP_REQUEST: plain HTTP on the TLS port), or the timeout.
    None when the client left without a word (a TCP health check, a scanner):
    not worth a line."""
    if isinstance(exc, HandshakeTimeout):
        return "timeout: no TLS handshake within timeouts.request"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or not isinstance(
        exc, ssl.SSLError
    ):
        return None
    return exc.reason or str(exc)


def _log_handshake_failure(ctx: ProxyContext, tls: TLSConnection, exc: BaseException) -> None:
    """One line a failed handshake with a reason (rate-limited with the refused
    requests: a flood of them is counted, not written line by line)."""
    reason = _handshake_failure_reason(exc)
    if reason is None or ctx.refusals is None or not ctx.access_log:
        log.debug("tls handshake failed", extra=fields(error=repr(exc)))
        return
    peername = tls.peername
    ctx.refusals.info(
        "tls handshake failed",
        client_ip=peer_ip(peername[0]) if peername else "unknown",
        listener="wss",
        reason=reason,
    )


def _reset(conn: socket.socket) -> None:
    """Close with RST: the carrier learns at once, and no TLS work is spent."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()
