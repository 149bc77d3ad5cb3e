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
IPv4 address, an IPv6 /64) holds at most ACME_MAX_PER_CLIENT of them: alone, it
could hold them all, and Let's Encrypt's validation, reset at accept, fails the
renewal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

from fleet_ingress.core.addresses import format_hostport, peer_ip
from fleet_ingress.core.fleet_exchange import FleetExchange, Progress, ResponseError
from fleet_ingress.core.request_head import (
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

log = logging.getLogger("fleet_ingress.acme")

# Connections open on the plain-HTTP listener at once, per worker: challenge
# fetches and redirects are a handful; the rest of a flood is reset at accept.
ACME_MAX_CONNECTIONS = 256
# Descriptors those may hold: each forwarded challenge holds its upstream's too.
ACME_DESCRIPTORS = 2 * ACME_MAX_CONNECTIONS
# Of those, one client's: a browser opens six at most, a validator one per check.
ACME_MAX_PER_CLIENT = 16


@dataclass
class AcmeConnections:
    """The plain-HTTP listener's count, one per ingress (kept across reloads)."""

    open: int = 0
    refused: int = 0  # reset at accept: ACME_MAX_CONNECTIONS were open, or the client's share
    limit: int = ACME_MAX_CONNECTIONS
    per_client: int = ACME_MAX_PER_CLIENT
    by_client: Counter[str] = field(default_factory=Counter)  # open, by `client_key`


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
        self._counted: str | None = None  # the `client_key` it is counted open for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        if peername:
            self.client_ip = peer_ip(peername[0])
        count = self.settings.connections
        if count is not None:
            key = client_key(self.client_ip)
            if count.open >= count.limit or count.by_client[key] >= count.per_client:
                count.refused += 1
                self._done = True
                transport.abort()  # its connection_lost follows; nothing was counted open
                return
            count.open += 1
            count.by_client[key] += 1
            self._counted = key
        self.transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(
            self.settings.request_timeout, self._answer, 408, "request head not received in time"
        )

    def data_received(self, data: bytes) -> None:
        if self._done:
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
            head = parse_request_head(raw)
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
        t = self.transport
        return self._done and t is not None and not t.is_closing()

    def connection_lost(self, exc: Exception | None) -> None:
        count, key = self.settings.connections, self._counted
        if key is not None and count is not None:
            self._counted = None
            count.open -= 1
            count.by_client[key] -= 1
            if count.by_client[key] <= 0:
                del count.by_client[key]
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        # No cycles through this protocol (see CarrierProtocol.connection_lost).
        self._timer = self.transport = None

    def _route(self, head: RequestHead) -> None:
        if head.path.startswith(CHALLENGE_PREFIX) and len(head.path) > len(CHALLENGE_PREFIX):
            if head.method not in (b"GET", b"HEAD"):
                self._answer(405, "ACME challenges are fetched with GET")
                return
            self._task = asyncio.get_running_loop().create_task(self._forward(head))
        elif self.settings.redirect_https and head.host:
            self._write(
                b"HTTP/1.1 301 Moved Permanently\r\n"
                b"Location: https://" + host_without_port(head.host) + head.target + b"\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        else:
            self._answer(
                404, "this listener serves ACME challenges only", head_only=head.method == b"HEAD"
            )

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
            async with asyncio.timeout(s.connect_timeout):
                reader, writer = await asyncio.open_connection(s.upstream_host, s.upstream_port)
        except (OSError, TimeoutError) as exc:
            self._upstream_failed("acme upstream unreachable", where, exc)
            self._answer(503, f"no ACME responder is listening on {where}", head_only=head_only)
            return
        answer = bytearray()
        try:
            writer.write(exchange.request_bytes)
            async with asyncio.timeout(s.response_timeout):
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
        except (OSError, TimeoutError, ResponseError) as exc:
            self._upstream_failed("acme upstream failed", where, exc)
            self._answer(
                502, f"the ACME responder on {where} did not answer properly", head_only=head_only
            )
            return
        finally:
            writer.close()
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

    def _upstream_failed(self, event: str, where: str, exc: BaseException) -> None:
        # Rate-limited: between renewals nothing listens on the upstream, and any
        # stranger's challenge requests would each write a warning (the
        # stalled-dependencies audit of session 14: 3,000 lines in 2.3 s).
        if (failures := self.settings.upstream_failures) is not None:
            failures.info(event, upstream=where, error=_said(exc))
        else:
            log.warning(event, extra=fields(upstream=where, error=_said(exc)))

    def _answer(self, status: int, text: str, *, head_only: bool = False) -> None:
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
        self._write(local_response(status, text, head_only=head_only))

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
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
