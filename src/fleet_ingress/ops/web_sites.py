"""Where the operators' web apps are served: stats on TCP, admin on its Unix socket.

The in-process ingress and the supervisor serve the same two apps the same
way; each keeps one `WebSites` and closes it when it stops.

The supervisor re-executes itself keeping its listening sockets (`serve_kept`):
before that it stops accepting and lets the requests in flight be answered
(`quiesce`). Connections that arrive meanwhile wait in the socket's backlog for
the next image; a scrape is not cut by the exec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import web

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


@dataclass
class _KeptSite:
    """A site served on a duplicate of a listening socket its caller keeps."""

    runner: web.AppRunner
    sock: socket.socket
    site: web.SockSite | None


class WebSites:
    """The runners of the web apps a service serves, cleaned up together."""

    def __init__(self, *, idle_timeout: float = OPERATOR_IDLE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self._runners: list[web.AppRunner] = []
        self._kept: list[_KeptSite] = []
        self._quieting: asyncio.Future[int] | None = None
        self._closed = False

    async def serve_kept(self, app: web.Application, sock: socket.socket) -> web.AppRunner:
        """Serve `app` on listening socket `sock`, which stays the caller's (an
        exec hands it over): the site listens on a duplicate, so stopping it
        (`quiesce`) leaves `sock` listening and its backlog kept."""
        dup = sock.dup()
        try:
            runner = await self.serve(app, web.SockSite, sock=dup)
        except BaseException:
            dup.close()
            raise
        (site,) = runner.sites
        assert isinstance(site, web.SockSite)
        self._kept.append(_KeptSite(runner, sock, site))
        return runner

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
        self, app: web.Application, site_type: type[web.BaseSite], **where: Any
    ) -> web.AppRunner:
        """Serve `app` on a TCP or Unix site (`where`: host/port or sock). No
        access log, no signal handlers: the service owns both. When the site
        cannot start (its address in use...) the runner is cleaned up and
        that error raised."""
        runner = web.AppRunner(
            app,
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
        self._runners.append(runner)
        return runner

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
