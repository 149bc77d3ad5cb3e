"""The plain-HTTP listener (`:80`): ACME HTTP-01 passthrough, else a redirect.

certbot's standalone authenticator listens on `acme.upstream`
(127.0.0.1:8888) only while it renews; `/.well-known/acme-challenge/<token>`
is forwarded there and its answer relayed byte for byte, and 503 says when
nothing listens. Everything else gets 301 to https (or 404). The head is read
with the same checks, size limit and timeout as on the carrier listener.

At most ACME_MAX_CONNECTIONS are open at once per worker; more are reset at
accept. Each is held up to `timeouts.request` for its head: without a bound, a
flood of idle connections to `:80` could take the descriptors the carrier
listener needs (`limits.max_connections` counts carriers only). One client (an
IPv4 address, an IPv6 /64) holds at most ACME_MAX_PER_CLIENT of them not
answered yet: alone, it could hold them all, and Let's Encrypt's validation,
reset at accept, fails the renewal. Answered ones (only their lingering close
left) count against the total bound only: a NAT's quick requests are not
refused for the lingering closes of its last answers. Many clients (a flood
from many addresses) can still fill the bound: then the oldest connection that
has not sent its head yet (or has its answer already) is closed to let the new
one in, so that a validation, which sends its head at once, is never shut out
for good (the :80 audit of session 33). One whose client has sent bytes not
read yet (its head, accepted in one go with a flood) is passed over.

An answer is followed by a lingering close: the writing side is shut (FIN after
the answer), and what the client still sends (a body we do not read) is read
and dropped, up to ACME_LINGER_BYTES and ACME_LINGER_SECONDS, until it closes.
Closing with its bytes unread would reset the connection, and a reset can take
our answer with it before the client has read it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

from fleet_ingress.core.addresses import format_hostport, peer_ip
from fleet_ingress.core.fleet_exchange import FleetExchange, Progress, ResponseError
from fleet_ingress.core.request_head import (
    BODY_REFUSED,
    RequestHead,
    RequestHeadReader,
    RequestRefused,
    logged_first_line,
    logged_target,
    parse_request_head,
)
from fleet_ingress.core.responses import local_response
from fleet_ingress.logs import RateLimitedLog, fields
from fleet_ingress.net.head_queue import HeadQueue
from fleet_ingress.net.late_timers import patient_timeout
from fleet_ingress.net.tcp_connect import open_tcp

log = logging.getLogger("fleet_ingress.acme")

# Connections open on the plain-HTTP listener at once, per worker: challenge
# fetches and redirects are a handful; the rest of a flood is reset at accept.
ACME_MAX_CONNECTIONS = 256
# Descriptors those may hold: each forwarded challenge holds its upstream's too.
ACME_DESCRIPTORS = 2 * ACME_MAX_CONNECTIONS
# Of those, one client's: a browser opens six at most, a validator one per check.
ACME_MAX_PER_CLIENT = 16
# After an answer, how long and how much of what the client still sends is read
# and dropped before the connection is closed all the same.
ACME_LINGER_SECONDS = 2.0
ACME_LINGER_BYTES = 1024 * 1024
# The methods a challenge is fetched with (a 405's Allow).
CHALLENGE_METHODS = "GET, HEAD"
# How many connections with unread bytes (a head on its way) `admit` passes over
# looking for one to close, before it refuses the new one instead.
EVICTION_PEEKS = 32
# What a TLS client's first bytes start with: a handshake record (RFC 8446 5.1).
_TLS_HANDSHAKE_RECORD = b"\x16\x03"


@dataclass
class AcmeConnections:
    """The plain-HTTP listener's count, one per ingress (kept across reloads)."""

    refused: int = 0  # reset at accept: ACME_MAX_CONNECTIONS were open, or the client's share
    limit: int = ACME_MAX_CONNECTIONS
    per_client: int = ACME_MAX_PER_CLIENT
    # Open and not answered yet, by `client_key` (see `unshare`).
    by_client: Counter[str] = field(default_factory=Counter)
    # Closed before their head to let a new one in when `limit` were open (see
    # `admit`; an answered one closed so is not counted: it cost nobody anything).
    evicted: int = 0
    # The open ones, oldest first.
    members: dict[AcmeProtocol, None] = field(default_factory=dict)
    # Answered but for what is still in their buffer (a large answer, a slow
    # reader): in their client's share until `admit` finds it gone. By client:
    # `admit` looks at that client's alone.
    draining: dict[str, dict[AcmeProtocol, None]] = field(default_factory=dict)
    # Challenges forwarded to acme.upstream, by CHALLENGE_OUTCOMES.
    challenges: Counter[str] = field(default_factory=Counter)

    def admit(self, protocol: AcmeProtocol, key: str) -> bool:
        """Count `protocol` open for client `key`, or say False (refused). When
        `limit` are open, the oldest that has no head yet (or has its answer) is
        closed for it: a flood from many addresses, each within its share, held
        :80 whole and reset every validation at accept (the :80 audit of
        session 33). A validator sends its head at once: to be closed before it,
        its connection would have to be the oldest of `limit` waiting."""
        if self.by_client[key] >= self.per_client:
            self._unshare_answered(key)
            if self.by_client[key] >= self.per_client:
                self.refused += 1
                return False
        if self.open >= self.limit:
            oldest = self._oldest_evictable()
            if oldest is None:  # every one is a challenge being relayed: bounded by its timeouts
                self.refused += 1
                return False
            if oldest.waiting_for_head:  # an answered one costs nobody anything: not counted
                self.evicted += 1
            oldest.evict()
        self.by_client[key] += 1
        self.members[protocol] = None
        return True

    def unshare(self, protocol: AcmeProtocol, key: str) -> None:
        """`protocol` answered (its answer out, its writing side shut): it no
        longer counts against its client's share, only against `limit`. A NAT's
        quick requests were refused while the lingering closes of its 16 last
        answers ran (ACME_LINGER_SECONDS each; the :80 audit of session 34)."""
        self.by_client[key] -= 1
        if self.by_client[key] <= 0:
            del self.by_client[key]
        if (its := self.draining.get(key)) is not None:
            its.pop(protocol, None)
            if not its:
                del self.draining[key]

    def _unshare_answered(self, key: str) -> None:
        """The client's answered connections whose answer left our buffer after
        their `_write` (a large one, a slow reader) out of its share now. Only
        that client's are looked at: a flood from one address past its share,
        a look at each connect, would look at every connection open (or every
        one draining, any client's)."""
        for p in list(self.draining.get(key, ())):
            if p.answered:
                p.leave_share()

    def _oldest_evictable(self) -> AcmeProtocol | None:
        """The oldest with no head (or its answer sent) whose client has sent
        nothing the loop has not read yet. Connections accepted in one go (the
        loop busy, a flood's backlog) are all made before any is read: a
        validator's head, already in its socket, was taken for an idle one and
        reset (the review of session 33). A few are looked at: each is a recv."""
        looked = 0
        for p in self.members:
            if not p.evictable:
                continue
            if not p.has_unread_bytes():
                return p
            looked += 1
            if looked >= EVICTION_PEEKS:
                return None
        return None

    @property
    def open(self) -> int:
        """How many are open (at most `limit`)."""
        return len(self.members)

    def release(self, protocol: AcmeProtocol) -> None:
        """Out of `open` (its share left already: `unshare`); once or more."""
        self.members.pop(protocol, None)

    async def settled(self, *, step: float = 0.02) -> None:
        """Every :80 connection answered (its answer sent, only a lingering close
        left) or gone: a process may exit then. Each is bounded by its timeouts."""
        while True:
            if all(p.answered for p in self.members):
                return
            await asyncio.sleep(step)  # an answer goes out in one of several callbacks


def client_key(ip: str) -> str:
    """Whose share a connection counts against: its IPv4 address, or its IPv6
    /64 (one host is routinely given a whole /64, and can speak from any of it)."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
# What came of a challenge forwarded to certbot (fleet_ingress_acme_challenges_total):
# relayed (certbot answered: its answer relayed, whatever its status); refused
# (503: nothing listens, as between renewals); not_served (502: closed with no
# answer, as certbot does for a token it does not serve); failed (503 or 502:
# no connection in timeouts.connect, no answer in timeouts.response, or not a
# usable one: never what certbot does).
CHALLENGE_OUTCOMES = ("relayed", "refused", "not_served", "failed")
# A challenge answer is a token and a key thumbprint: tiny. Anything larger is refused.
MAX_ACME_RESPONSE = 64 * 1024


@dataclass(frozen=True)
class AcmeSettings:
    upstream_host: str
    upstream_port: int
    redirect_https: bool
    request_timeout: float
    connect_timeout: float
    response_timeout: float
    max_head_bytes: int
    max_header_count: int
    refusals: RateLimitedLog | None = None  # the carrier listener's, shared
    heads: HeadQueue | None = None  # the carrier listener's queue (None: parse at once)
    connections: AcmeConnections | None = None  # None: no bound (tests of one protocol)
    # One per ingress: the upstream's failures, rate-limited (None: each written).
    upstream_failures: RateLimitedLog | None = None
    # One line per challenge relayed, rate-limited (None: log.access is off).
    relayed: RateLimitedLog | None = None


def host_without_port(host: bytes) -> bytes:
    """`calls.example.com:80` -> `calls.example.com`; `[::1]:80` -> `[::1]`."""
    if host.startswith(b"["):
        return host.partition(b"]")[0] + b"]"
    return host.partition(b":")[0]


class AcmeProtocol(asyncio.Protocol):
    def __init__(self, settings: AcmeSettings) -> None:
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self._reader = RequestHeadReader(settings.max_head_bytes, settings.max_header_count)
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._done = False
        self.client_ip = "unknown"
        self.target = ""  # the head's target once read (for the refused-request line)
        self._sharing: str | None = None  # the `client_key` whose share it counts against
        self._start = b""  # its first bytes, up to 2 (a TLS ClientHello is told by them)
        self._eof = False  # the client shut its writing side
        self._lingering = False  # answered: its writing side shut, the rest read and dropped
        self._dropped = 0  # bytes read and dropped after the head

    @property
    def waiting_for_head(self) -> bool:
        return not self._done

    @property
    def answered(self) -> bool:
        """Its answer is out (written to the socket whole): only the lingering close is left."""
        t = self.transport
        return self._lingering and (t is None or t.get_write_buffer_size() == 0)

    @property
    def evictable(self) -> bool:
        """Closing it costs nobody an answer: no head yet, or answered already
        (its answer out of our buffer: an abort would drop what is left there)."""
        return not self._done or self.answered

    def has_unread_bytes(self) -> bool:
        """The client sent bytes the loop has not read yet (peeked, not taken)."""
        t = self.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is None:
            return False
        try:
            # uvloop's is a pseudo-socket with no recv: a socket object on its descriptor.
            peek = socket.socket(sock.family, sock.type, 0, sock.fileno())
        except (OSError, ValueError):
            return False
        try:
            return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing there (EAGAIN), or a reset
            return False
        finally:
            peek.detach()  # the transport's descriptor: not closed here

    def evict(self) -> None:
        """Closed to let a new connection in (`AcmeConnections.admit`)."""
        self._uncount()
        self._done = True
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        if peername:
            self.client_ip = peer_ip(peername[0])
        count = self.settings.connections
        if count is not None:
            key = client_key(self.client_ip)
            if not count.admit(self, key):
                self._done = True
                transport.abort()  # its connection_lost follows; nothing was counted open
                return
            self._sharing = key
        self.transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(
            self.settings.request_timeout, self._answer, 408, "request head not received in time"
        )

    def data_received(self, data: bytes) -> None:
        looking = len(self._start) < len(_TLS_HANDSHAKE_RECORD)
        if looking:
            self._start += data[: len(_TLS_HANDSHAKE_RECORD) - len(self._start)]
        if self._done:
            # A body we do not read, or what follows our answer: dropped, up to a bound.
            self._dropped += len(data)
            if self._dropped > ACME_LINGER_BYTES and self.transport is not None:
                self.transport.abort()
            return
        if looking and self._start == _TLS_HANDSHAKE_RECORD:
            # A TLS client on :80 (https://host:80/, a monitor set up wrong): it would
            # wait the request timeout for a 408 it cannot read. Told at once, its
            # record's first two bytes read in one go or not (no method starts with
            # 0x16, a control byte: 0x16 alone, then nothing, is a 408 as any stall).
            self.target = "(a TLS handshake)"
            self._answer(400, "this is plain HTTP: use https:// on port 443")
            return
        try:
            taken = self._reader.take(data)
        except RequestRefused as refused:
            self._answer(refused.status, refused.reason)
            return
        if taken is not None:
            self._done = True
            if self._timer is not None:
                self._timer.cancel()
            # Port 80 is as open as 443: its heads wait their turn like the carriers'.
            if self.settings.heads is None:
                self._parse(taken[0])
            else:
                self.settings.heads.add(lambda: self._parse(taken[0]))

    def _parse(self, raw: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        try:
            # A body is refused in `_route`, after a challenge's method (405 first).
            head = parse_request_head(raw, refuse_body=False)
        except RequestRefused as refused:
            self.target = logged_first_line(raw)
            self._answer(refused.status, refused.reason, head_only=refused.head_only)
            return
        except Exception:
            # A bug in the parse: answered and closed all the same, never left open
            # with its head timer gone (a stranger could hold descriptors that way).
            log.exception("request head parse failed", extra=fields(client_ip=self.client_ip))
            self._answer(400, "malformed request")
            return
        self.target = logged_target(head)
        self._route(head)

    def eof_received(self) -> bool:
        # A client may shut its writing side once its request is sent (`nc -N`,
        # socat): the answer still goes out, then `_write` closes. Before, the
        # transport closed at once and cancelled a challenge's forward: nothing
        # came back (the :80 audit of session 32). A head not complete by then
        # never will be: closed.
        self._eof = True
        t = self.transport
        return self._done and not self._lingering and t is not None and not t.is_closing()

    def leave_share(self) -> None:
        """Out of its client's share (once: answered, evicted or lost)."""
        count, key = self.settings.connections, self._sharing
        if count is not None and key is not None:
            self._sharing = None
            count.unshare(self, key)

    def _uncount(self) -> None:
        """Out of the connections counted (once: evicted, then lost)."""
        self.leave_share()
        if (count := self.settings.connections) is not None:
            count.release(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        # No cycles through this protocol (see CarrierProtocol.connection_lost).
        self._timer = self.transport = None

    def _route(self, head: RequestHead) -> None:
        head_only = head.method == b"HEAD"
        host = host_without_port(head.host)
        challenge = head.path.startswith(CHALLENGE_PREFIX) and head.path != CHALLENGE_PREFIX
        if challenge and head.method not in (b"GET", b"HEAD"):
            self._answer(405, "ACME challenges are fetched with GET", allow=CHALLENGE_METHODS)
        elif head.has_body:
            self._answer(400, BODY_REFUSED, head_only=head_only)
        elif challenge:
            self._task = asyncio.get_running_loop().create_task(self._forward(head))
        elif self.settings.redirect_https and host:
            self._write(
                b"HTTP/1.1 301 Moved Permanently\r\n"
                b"Location: https://" + host + head.target + b"\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        elif self.settings.redirect_https:
            # HTTP/1.0 with no Host, or `Host: :80`: no name to send it to on https
            # (it was 404 "this listener serves ACME challenges only", or a
            # Location of "https:///path").
            self._answer(
                400,
                "no host name in the request (Host) to redirect to: use https://<name>/",
                head_only=head_only,
            )
        else:
            self._answer(404, "this listener serves ACME challenges only", head_only=head_only)

    async def _forward(self, head: RequestHead) -> None:
        s = self.settings
        where = format_hostport(s.upstream_host, s.upstream_port)  # [::1]:8888, not ::1:8888
        head_only = head.method == b"HEAD"
        began = asyncio.get_running_loop().time()
        exchange = FleetExchange(
            head.method,
            head.target,
            [(b"Host", head.host or where.encode()), (b"Connection", b"close")],
            max_head_bytes=s.max_head_bytes,
        )
        try:
            # Patient: after a stall of the worker (SIGSTOP, a VM paused), certbot's
            # answer waiting unread is read before its timer blames it (late_timers).
            async with patient_timeout(s.connect_timeout):
                # open_tcp, as a fleet's connect: a name of two addresses that both
                # refuse is a ConnectionRefusedError, where asyncio's own connect (3.11)
                # raised an OSError of its own and the challenge was counted failed.
                sock = await open_tcp(s.upstream_host, s.upstream_port)
                try:
                    reader, writer = await asyncio.open_connection(sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except (OSError, TimeoutError) as exc:
            self._challenge("refused" if isinstance(exc, ConnectionRefusedError) else "failed")
            self._upstream_failed("acme upstream unreachable", where, exc)
            self._answer(503, f"no ACME responder is listening on {where}", head_only=head_only)
            return
        answer = bytearray()
        try:
            writer.write(exchange.request_bytes)
            async with patient_timeout(s.response_timeout):
                while True:
                    chunk = await reader.read(65536)
                    answer += chunk
                    if len(answer) > MAX_ACME_RESPONSE:
                        raise ResponseError(
                            "junk-response", f"larger than {MAX_ACME_RESPONSE} bytes"
                        )
                    progress = exchange.feed(chunk) if chunk else exchange.feed_eof()
                    if progress is Progress.BODY_COMPLETE or not chunk:
                        break
                    if progress is Progress.HEAD_COMPLETE and exchange.advance() is (
                        Progress.BODY_COMPLETE
                    ):
                        break
            if exchange.cut_short:
                # Relayed, a token cut short fails the validation as a wrong answer,
                # and nobody learns why: a 502 says the responder failed.
                raise ResponseError("junk-response", "closed before the end of its answer")
        except (OSError, TimeoutError, ResponseError) as exc:
            empty = isinstance(exc, ResponseError) and exc.kind == "empty-response"
            self._challenge("not_served" if empty else "failed")
            self._upstream_failed("acme upstream failed", where, exc)
            self._answer(
                502, f"the ACME responder on {where} did not answer properly", head_only=head_only
            )
            return
        finally:
            writer.close()
        self._challenge("relayed")
        self._write(exchange.relayable(bytes(answer)))
        if s.relayed is not None and exchange.head is not None:
            # What a failed renewal is read against: did the validation reach :80,
            # and what did certbot answer it (before, a relayed challenge left no trace).
            s.relayed.info(
                "acme challenge relayed",
                client_ip=self.client_ip,
                target=self.target,
                status=exchange.head.status,
                upstream=where,
                ms=round((asyncio.get_running_loop().time() - began) * 1000, 1),
            )

    def _challenge(self, outcome: str) -> None:
        if (count := self.settings.connections) is not None:
            count.challenges[outcome] += 1

    def _upstream_failed(self, event: str, where: str, exc: BaseException) -> None:
        # Rate-limited: between renewals nothing listens on the upstream, and any
        # stranger's challenge requests would each write a warning (the
        # stalled-dependencies audit of session 14: 3,000 lines in 2.3 s).
        if (failures := self.settings.upstream_failures) is not None:
            failures.info(event, upstream=where, error=_said(exc))
        else:
            log.warning(event, extra=fields(upstream=where, error=_said(exc)))

    def _answer(
        self, status: int, text: str, *, head_only: bool = False, allow: str | None = None
    ) -> None:
        """Answer and close; `head_only` for a HEAD request (RFC 9110 9.3.2: no body)."""
        self._done = True
        if not self.target:  # refused as it was read (431, 408): what came of its first line
            self.target = self._reader.first_line()
            head_only = head_only or self.target.startswith("HEAD ")
        refusals = self.settings.refusals
        if 400 <= status < 500 and refusals is not None:
            refusals.info(
                "request refused",
                client_ip=self.client_ip,
                listener="acme",
                route="acme",
                target=self.target,
                status=status,
                reason=text,
            )
        self._write(local_response(status, text, head_only=head_only, allow=allow))

    def _write(self, data: bytes) -> None:
        """Send the answer, then close lingering (see the module's docstring)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self._done = True
        t.write(data)
        if self._eof or not t.can_write_eof():
            t.close()
            return
        t.write_eof()  # the FIN follows the answer once it is sent
        self._lingering = True
        if self.answered:  # out of our buffer whole
            self.leave_share()
        elif (count := self.settings.connections) is not None and self._sharing is not None:
            count.draining.setdefault(self._sharing, {})[self] = None  # `admit` looks again
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(ACME_LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        t = self.transport
        if t is None:
            return
        # A client that reads nothing would hold a close() waiting for the buffer for ever.
        if t.get_write_buffer_size():
            t.abort()
        else:
            t.close()


# What of a responder's error a log line keeps: h11 quotes the bytes it could
# not read, up to a head's limit.
_SAID_CHARS = 200


def _said(exc: BaseException) -> str:
    """An error for the log: a timeout has no text of its own, and the exchange's
    words are a fleet's."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time (timed out)"
    if isinstance(exc, ResponseError) and exc.kind == "empty-response":
        # certbot's standalone listener closes so, unanswered, for a token it
        # does not serve (a scanner's, a stale one): not a responder out of order.
        return "closed without a complete answer (as certbot does for a token it does not serve)"
    if isinstance(exc, ResponseError):
        return f"not a usable answer: {exc.detail}"[:_SAID_CHARS]
    return str(exc) or type(exc).__name__
