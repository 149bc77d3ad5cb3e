"""Where the operators' web apps are served: stats on TCP, admin on its Unix socket.

The in-process ingress and the supervisor serve the same two apps the same
way; each keeps one `WebSites` and closes it when it stops.

The supervisor re-executes itself keeping its listening sockets (`serve_kept`):
before that it stops accepting and lets the requests in flight be answered
(`quiesce`). Connections that arrive meanwhile wait in the socket's backlog for
the next image; a scrape is not cut by the exec.

Each listener holds at most `operator_connections_within` connections open
(`ConnectionCap`): the supervisor that serves them also opens the fleets'
health probes, its workers' channels and pipes, the slot channel and the
fleets file, and a client that opened connections and kept them (a leaking
monitoring script, a scraper that reconnects without closing) took its
descriptors until those failed: fleets went DOWN and calls were refused (the
operator-listener audit). Past the cap, the connection idle longest (no request
under way) is closed to make room; when none is idle, the new one gets a 503
and is closed at once. Both are counted (`fleet_ingress_operator_*`) and warned
of once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet_ingress.logs import fields

log = logging.getLogger("fleet_ingress.server")


# After the sites stop accepting, a connection accepted just before gets this
# long for its request to arrive and be taken up before idle ones are closed.
QUIESCE_SETTLE = 0.25
# A connection with no request under way (none yet, or between two) is closed
# after this long: aiohttp's own default is an hour, and idle connections to
# the stats port took the supervisor's descriptors (the limits audit of session
# 14). Longer than Prometheus's default scrape interval (1 min), so a scraper
# keeps its connection.
OPERATOR_IDLE_TIMEOUT = 75.0
# At close, how long a request under way may take to finish: aiohttp's own
# default is 60 s, and one admin request whose body never came in full held
# every stop (and so every restart) of the supervisor 60 s after its workers
# had gone (the control-plane audit of session 22).
OPERATOR_SHUTDOWN_TIMEOUT = 2.0  # aiohttp waits it twice: its connections, then its handlers
# Connections one operator listener (stats, admin) holds open at once: scrapers
# and operators need a handful (Prometheus keeps one per target).
OPERATOR_MAX_CONNECTIONS = 256
# ...and never more than this share (1/8) of the process's descriptor limit
# each: the two together leave at least three quarters of it for what calls need.
OPERATOR_DESCRIPTOR_SHARE = 8
# One warning per listener per this many seconds while connections are refused
# or closed to make room.
OPERATOR_WARN_EVERY = 60.0


def operator_connections_within(descriptors: int) -> int:
    """How many connections one operator listener holds open at once, given the
    process's RLIMIT_NOFILE (soft) limit `descriptors`: OPERATOR_MAX_CONNECTIONS,
    or 1/OPERATOR_DESCRIPTOR_SHARE of the limit when that is less."""
    if descriptors == resource.RLIM_INFINITY or descriptors < 0:
        return OPERATOR_MAX_CONNECTIONS
    return max(1, min(OPERATOR_MAX_CONNECTIONS, descriptors // OPERATOR_DESCRIPTOR_SHARE))


def _is_idle(handler: Any) -> bool:
    """No request under way on this aiohttp connection: it waits for one (none
    yet, or between two), as aiohttp's own keep-alive close tells it (a private
    attribute: were it gone, no connection would be taken for idle and the new
    one would get the 503, the cap holding all the same)."""
    waiter = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


# A refused connection is answered, its writing side shut, and closed once the
# client has read the answer and closed its end, or after this (seconds). Closed
# at once, a client whose request was still coming (the CLI's POST with its
# body) met the close before it read the 503: "the ingress closed the admin
# connection before answering", and a reload did not know to ask the other way.
REFUSED_LINGER = 0.5
# At most this many refused connections linger so at once (a flood's past it
# are closed at once): the cap is about descriptors.
REFUSED_LINGERING = 32


# What a refused connection reads and drops at most: a request head and a
# command's body; a client that sends more is closed at once.
REFUSED_READ = 65536


class _Refused(asyncio.Protocol):
    """A connection over `cap`: answered 503, its request read and dropped,
    closed when the client closes or after REFUSED_LINGER."""

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap = cap
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.WriteTransport instances: no isinstance.
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(self._cap.refusal)
        if self._cap.lingering >= REFUSED_LINGERING or not writer.can_write_eof():
            transport.close()
            return
        writer.write_eof()
        self._cap.lingering += 1
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        self._read += len(data)  # the request nobody will read
        if self._read > REFUSED_READ and self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport = None
            self._cap.lingering -= 1
        if self._timer is not None:
            self._timer.cancel()


class ConnectionCap:
    """The connections one operator listener holds open, at most `limit`: the
    protocol factory its site accepts with (`_CappedRunner`)."""

    def __init__(self, listener: str, limit: int, *, descriptors: int | None = None) -> None:
        self.listener = listener  # "stats", "admin"
        self.limit = limit
        self.descriptors = descriptors  # the limit it was drawn from, for the warning
        self.refused = 0  # answered 503 and closed at accept: `limit` were busy
        self.idle_closed = 0  # idle ones closed to make room for a new one
        self.address = ""  # where the listener listens, for the warning
        self.lingering = 0  # refused connections not closed yet (`_Refused`)
        self._warned_at = -OPERATOR_WARN_EVERY
        body = f"the {listener} listener has {limit} connections open, its most; try again\n"
        if listener == "admin":
            # "at_cap": nothing was asked (the command may ask another way: a
            # reload's SIGHUP), not the ingress refusing what it was asked.
            body = json.dumps({"error": body.strip(), "at_cap": True}) + "\n"
        kind = "application/json" if listener == "admin" else "text/plain; charset=utf-8"
        self.refusal = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body.encode())}\r\nConnection: close\r\n\r\n{body}"
        ).encode()

    def open_connections(self, server: web.Server) -> list[Any]:
        """The server's connections still open (one closed to make room stays
        in `server.connections` until its handler ends). A connection is in
        it from its `connection_made`, which uvloop (the service's loop) calls
        as it accepts: a burst meets the cap at once. asyncio's loop calls it a
        turn later, so there a burst of up to one accept round (the backlog)
        gets past it for a moment."""
        return [c for c in server.connections if c.transport is not None]

    def protocol(self, server: web.Server) -> asyncio.BaseProtocol:
        """For a connection just accepted: `server`'s handler, after closing the
        longest-open idle connection when `limit` are open; a 503 when every
        one of them has a request under way."""
        open_ = self.open_connections(server)
        if len(open_) >= self.limit:
            idle = next((c for c in open_ if _is_idle(c)), None)
            if idle is None:
                self.refused += 1
                self._warn(len(open_))
                return _Refused(self)
            idle.force_close()
            self.idle_closed += 1
            self._warn(len(open_))
        return server()

    def _warn(self, open_: int) -> None:
        now = time.monotonic()
        if now - self._warned_at < OPERATOR_WARN_EVERY:
            return
        self._warned_at = now
        log.warning(
            "operator listener at its most connections: idle ones are closed to make "
            "room, and new ones refused (503) while every one has a request under way. "
            "A client opens connections and keeps them (a leaking monitoring script, a "
            "scraper that reconnects without closing): find it with `ss -tnp` (stats) "
            "or `ss -xp` (admin) and fix it; the cap keeps the descriptors calls need",
            extra=fields(
                listener=self.listener,
                address=self.address,
                open_connections=open_,
                max_connections=self.limit,
                nofile=self.descriptors,
                refused_total=self.refused,
                idle_closed_total=self.idle_closed,
            ),
        )


class _CappedServer:
    """An aiohttp `web.Server` whose protocol factory (`__call__`) applies a
    `ConnectionCap`; everything else is the server's."""

    def __init__(self, server: web.Server, cap: ConnectionCap) -> None:
        self._server = server
        self._cap = cap

    def __call__(self) -> asyncio.BaseProtocol:
        return self._cap.protocol(self._server)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _CappedRunner(web.AppRunner):
    """An AppRunner whose sites accept through `cap`: they take their protocol
    factory from `server` (aiohttp's `SockSite`, `TCPSite`, `UnixSite`)."""

    def __init__(self, app: web.Application, cap: ConnectionCap, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.cap = cap
        self._capped: _CappedServer | None = None

    @property
    def real_server(self) -> web.Server | None:
        """aiohttp's own server: its connections."""
        return super().server

    @property
    def server(self) -> Any:
        real = self.real_server
        if real is None:
            return None
        if self._capped is None or self._capped._server is not real:
            self._capped = _CappedServer(real, self.cap)
        return self._capped


class OperatorConnectionsCollector(Collector):
    """`fleet_ingress_operator_*`: each operator listener's connections."""

    def __init__(self, sites: WebSites) -> None:
        self._sites = sites

    def collect(self) -> Iterator[Metric]:
        prefix = "fleet_ingress_operator"
        open_ = GaugeMetricFamily(
            f"{prefix}_connections",
            "Connections open on an operator listener (stats, admin).",
            labels=["listener"],
        )
        most = GaugeMetricFamily(
            f"{prefix}_max_connections",
            "Most connections an operator listener holds open: 256, or an eighth of "
            "the process's descriptor limit when that is less.",
            labels=["listener"],
        )
        refused = CounterMetricFamily(
            f"{prefix}_refused_connections",
            "Connections to an operator listener answered 503 and closed at accept: "
            "its most were open, each with a request under way.",
            labels=["listener"],
        )
        idle_closed = CounterMetricFamily(
            f"{prefix}_idle_closed_connections",
            "Idle connections to an operator listener closed to make room for a new one.",
            labels=["listener"],
        )
        for runner, cap in self._sites.caps():
            server = runner.real_server
            label = [cap.listener]
            open_.add_metric(label, len(cap.open_connections(server)) if server else 0)
            most.add_metric(label, cap.limit)
            refused.add_metric(label, cap.refused)
            idle_closed.add_metric(label, cap.idle_closed)
        yield from (open_, most, refused, idle_closed)


def _add_counts(cap: ConnectionCap, counts: Any) -> None:
    if isinstance(counts, dict):
        cap.refused += int(counts.get("refused", 0))
        cap.idle_closed += int(counts.get("idle_closed", 0))


@dataclass
class _KeptSite:
    """A site served on a duplicate of a listening socket its caller keeps."""

    runner: web.AppRunner
    sock: socket.socket
    site: web.SockSite | None


class WebSites:
    """The runners of the web apps a service serves, cleaned up together."""

    def __init__(
        self, *, idle_timeout: float = OPERATOR_IDLE_TIMEOUT, max_connections: int | None = None
    ) -> None:
        """`max_connections`: each listener's cap (None: `operator_connections_within`
        the descriptor limit at `serve`)."""
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._runners: list[web.AppRunner] = []
        self._kept: list[_KeptSite] = []
        self._quieting: asyncio.Future[int] | None = None
        self._closed = False
        # Counts the previous image kept over an upgrade's exec, by listener: a
        # counter does not reset (`carry_counts`).
        self._carried_counts: dict[str, Any] = {}

    async def serve_kept(
        self, app: web.Application, sock: socket.socket, *, listener: str = "operator"
    ) -> web.AppRunner:
        """Serve `app` on listening socket `sock`, which stays the caller's (an
        exec hands it over): the site listens on a duplicate, so stopping it
        (`quiesce`) leaves `sock` listening and its backlog kept."""
        dup = sock.dup()
        try:
            runner = await self.serve(app, web.SockSite, listener=listener, sock=dup)
        except BaseException:
            dup.close()
            raise
        (site,) = runner.sites
        assert isinstance(site, web.SockSite)
        self._kept.append(_KeptSite(runner, sock, site))
        return runner

    async def serve_kept_on(self, old: socket.socket, new: socket.socket) -> None:
        """Serve on `new` what was served on kept socket `old` (the admin socket
        made again at its path once its file was removed: `old` can no longer be
        reached); its connections open go on. `old` stays the caller's to close.
        While quiet for an exec, `new` is what `resume` accepts on. Raises (and
        `old` is served on) when `new` cannot be served."""
        for kept in self._kept:
            if kept.sock is not old:
                continue
            if kept.site is None or self._closed:
                kept.sock = new
                return
            dup = new.dup()
            try:
                site = web.SockSite(kept.runner, sock=dup)
                await site.start()
            except BaseException:
                dup.close()
                raise
            await kept.site.stop()  # closes its duplicate only
            kept.sock, kept.site = new, site
            return
        raise ValueError("not a socket served by serve_kept")

    async def quiesce(self, timeout: float) -> int:
        """Stop accepting on the kept sockets and answer the requests in
        flight, waiting `timeout` at most for them (then they are cancelled);
        idle connections are closed. Returns how many connections were open
        as it stopped accepting. A `close` meanwhile waits for it."""
        self._quieting = asyncio.ensure_future(self._quiesce(timeout))
        return await asyncio.shield(self._quieting)

    async def _quiesce(self, timeout: float) -> int:
        if not self._kept:  # no stats nor admin listener: nothing to wait for
            return 0
        servers = [k.runner.server for k in self._kept if k.runner.server is not None]
        open_ = sum(len(server.connections) for server in servers)
        for kept in self._kept:
            if kept.site is not None:
                await kept.site.stop()  # closes the duplicate only
                kept.site = None
        await asyncio.sleep(QUIESCE_SETTLE)
        for server in servers:
            server.pre_shutdown()
        # aiohttp waits its timeout for the handlers, then cancels them and waits
        # as long again (each rounded up to a whole second): half each, and the
        # whole bounded here, so the exec waits `timeout` at most.
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(server.shutdown(timeout / 2) for server in servers))
        except TimeoutError:
            for server in servers:
                for connection in list(server.connections):
                    connection.force_close()
            log.warning(
                "requests still running at the quiet period's end were cut",
                extra=fields(timeout_s=timeout),
            )
        return open_

    async def resume(self) -> None:
        """Accept again on the kept sockets (the exec did not happen); not
        once closing."""
        for kept in self._kept:
            if kept.site is None and not self._closed:
                site = web.SockSite(kept.runner, sock=kept.sock.dup())
                await site.start()
                kept.site = site

    async def serve(
        self,
        app: web.Application,
        site_type: type[web.BaseSite],
        *,
        listener: str = "operator",
        **where: Any,
    ) -> web.AppRunner:
        """Serve `app` on a TCP or Unix site (`where`: host/port or sock). No
        access log, no signal handlers: the service owns both. At most
        `operator_connections_within` connections at once (`ConnectionCap`,
        named `listener` in its metrics and warnings). When the site cannot
        start (its address in use...) the runner is cleaned up and that error
        raised."""
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = self.max_connections or operator_connections_within(descriptors)
        cap = ConnectionCap(listener, limit, descriptors=descriptors)
        _add_counts(cap, self._carried_counts.pop(listener, None))
        runner = _CappedRunner(
            app,
            cap,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.idle_timeout,
            shutdown_timeout=OPERATOR_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            await site_type(runner, **where).start()
        except BaseException as exc:
            try:
                await runner.cleanup()
            except Exception as cleanup:
                # The site's error is the one to raise: it names what to fix.
                log.warning(
                    "web app cleanup failed after its site could not start",
                    extra=fields(error=repr(cleanup), site_error=repr(exc)),
                )
            raise
        cap.address = ", ".join(str(address) for address in runner.addresses)
        if limit < OPERATOR_MAX_CONNECTIONS and not self.max_connections:
            log.warning(
                "operator listener holds fewer connections than it would: the descriptor "
                "limit is low; raise LimitNOFILE (systemd) or ulimit -n",
                extra=fields(listener=listener, max_connections=limit, nofile=descriptors),
            )
        self._runners.append(runner)
        return runner

    def counts_to_json(self) -> dict[str, dict[str, int]]:
        """Each listener's counters, for the next image of an upgrade's exec."""
        return {
            cap.listener: {"refused": cap.refused, "idle_closed": cap.idle_closed}
            for _, cap in self.caps()
        }

    def carry_counts(self, carried: Any) -> None:
        """The previous image's counters (`counts_to_json`; None from a release
        that did not carry them), added to its listener's when it is served:
        before `serve`, as the supervisor's UpgradeSequence is built."""
        if isinstance(carried, dict):
            self._carried_counts = carried

    def caps(self) -> list[tuple[_CappedRunner, ConnectionCap]]:
        """Each listener's runner and its cap, in the order they were served."""
        return [(r, r.cap) for r in self._runners if isinstance(r, _CappedRunner)]

    async def close(self) -> None:
        self._closed = True
        if self._quieting is not None:
            # Its shutdown of the connections first: a second one on the same
            # connections would wait for the runner's own timeout (60 s).
            with contextlib.suppress(Exception):
                await self._quieting
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
