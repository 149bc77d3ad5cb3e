"""A simulated fleet host: what the ingress sits in front of.

A real fleet host runs at most N concurrent calls (16 in production), accepts
WebSocket calls on ``/ws/{bot_id}`` and ``/exotel/{bot_id}``, answers ``429``
from its nginx once full, and reports its free workers on ``GET /health/fleet``::

    {"status": "ok", "fleet_available": 12}

This simulator does the same with aiohttp, echoes every call message back like
a bot talking back, and records what it saw so tests can assert on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["MAX_MSG_SIZE", "SeenRequest", "SimulatedFleet"]

#: Largest WebSocket message a simulated fleet accepts (and echoes).
MAX_MSG_SIZE = 32 * 1024 * 1024

# What nginx's limit_req/limit_conn answers once the fleet is full.
_NGINX_429 = (
    b"<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n"
    b"<center><h1>429 Too Many Requests</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class SeenRequest:
    """One call (upgrade) request as the fleet received it."""

    path: str
    query_string: str
    headers: CIMultiDictProxy[str]  # duplicates preserved, in order
    peer: str | None  # IP address of the TCP peer (the ingress, normally)
    target: str = ""  # request-target exactly as sent: raw path and query


class SimulatedFleet:
    """A fleet host on a real socket. Use ``async with SimulatedFleet(...) as fleet:``."""

    def __init__(
        self,
        *,
        name: str = "fleet",
        host: str = "127.0.0.1",
        port: int = 0,
        capacity: int = 16,
        ssl_context: ssl.SSLContext | None = None,
        subprotocols: Sequence[str] = (),
        routes: Sequence[str] = ("/ws/", "/exotel/"),
        sock: socket.socket | None = None,
    ) -> None:
        """`sock`: a listening socket to serve on instead of binding `host:port`
        (one made in another network namespace, say)."""
        self.name = name
        self.host = host
        self.capacity = capacity
        self.ssl_context = ssl_context
        self.subprotocols = tuple(subprotocols)
        self.routes = tuple(routes)
        self._port = port
        self._sock = sock

        # Test knobs for GET /health/fleet; change them at any time.
        self.health_status: int = 200
        self.health_body: bytes | None = None  # raw body, replaces the JSON
        self.health_delay: float = 0.0  # seconds to wait before answering
        self.available_override: int | None = None  # reported instead of the real value
        # Seconds a call request waits before the fleet takes it (counts it, or
        # answers 429): a bot slow to start; its health meanwhile leaves it out.
        self.call_delay: float = 0.0
        # Bytes each call's bot sends on its own every 20 ms besides its echoes
        # (a bot speaking: its audio flows whatever the carrier sends), 0 for
        # none. Random bytes, so that permessage-deflate does not shrink them.
        self.talk_bytes: int = 0

        # What happened.
        self.requests: list[SeenRequest] = []
        self.active_calls = 0
        self.peak_calls = 0  # most calls open at once
        self.calls_total = 0  # calls accepted (101)
        self.rejected_429 = 0
        self.health_probes = 0
        self.health_connections = 0  # distinct TCP connections that carried a probe
        self.ws_connections = 0  # distinct TCP connections that carried a call request

        self._calls: set[web.WebSocketResponse] = set()
        self._health_transports = _Connections()
        self._ws_transports = _Connections()
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}"

    async def start(self) -> None:
        app = web.Application()
        app.on_response_prepare.append(self._add_fleet_header)
        app.router.add_get("/health/fleet", self._health)
        for prefix in self.routes:
            app.router.add_get(prefix + "{bot_id}", self._call)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(self._runner, self._sock, ssl_context=self.ssl_context)
        else:
            site = web.TCPSite(self._runner, self.host, self._port, ssl_context=self.ssl_context)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Close open calls (1001 going away) and stop listening."""
        if self._runner is None:
            return
        await self.close_all_calls(1001)
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> SimulatedFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def close_all_calls(self, code: int = 1001) -> None:
        calls = list(self._calls)
        await asyncio.gather(*(ws.close(code=code) for ws in calls), return_exceptions=True)

    # -- handlers ----------------------------------------------------------

    async def _add_fleet_header(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Fleet"] = self.name  # on every response, the 101 too

    async def _health(self, request: web.Request) -> web.Response:
        self.health_probes += 1
        if self._health_transports.is_new(request.transport):
            self.health_connections += 1
        if self.health_delay > 0:
            await asyncio.sleep(self.health_delay)
        if self.health_body is not None:
            body = self.health_body
        else:
            available = max(self.capacity - self.active_calls, 0)
            if self.available_override is not None:
                available = self.available_override
            body = json.dumps({"status": "ok", "fleet_available": available}).encode()
        return web.Response(status=self.health_status, body=body, content_type="application/json")

    async def _call(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.requests.append(
            SeenRequest(
                path=request.path,
                query_string=request.query_string,
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                peer=peer[0] if peer else None,
                target=request.raw_path,
            )
        )
        if self._ws_transports.is_new(transport):
            self.ws_connections += 1

        if self.call_delay > 0:
            await asyncio.sleep(self.call_delay)
        if self.active_calls >= self.capacity:
            self.rejected_429 += 1
            return web.Response(
                status=429,
                body=_NGINX_429,
                content_type="text/html",
                headers={"Retry-After": "1"},
            )

        ws = web.WebSocketResponse(
            protocols=self.subprotocols, autoping=True, max_msg_size=MAX_MSG_SIZE
        )
        # Count the call before the first await so concurrent upgrades see it.
        self.active_calls += 1
        self.peak_calls = max(self.peak_calls, self.active_calls)
        self._calls.add(ws)
        talker: asyncio.Task[None] | None = None
        try:
            await ws.prepare(request)  # 400 here if it is not a WebSocket upgrade
            self.calls_total += 1
            if self.talk_bytes > 0:
                talker = asyncio.get_running_loop().create_task(self._talk(ws))
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    code = _close_request(msg.data)
                    if code is not None:
                        await ws.close(code=code)
                        break
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            if talker is not None:
                talker.cancel()
            self._calls.discard(ws)
            self.active_calls -= 1
        return ws

    async def _talk(self, ws: web.WebSocketResponse) -> None:
        """The bot's own audio: `talk_bytes` every 20 ms until the call ends."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                await ws.send_bytes(os.urandom(self.talk_bytes))
                await asyncio.sleep(0.02)


class _Connections:
    """Tells whether a request is the first on its TCP connection.

    Holds the transports of connections still open (uvloop's TLS transports
    cannot be weak-referenced), forgetting closed ones as it goes.
    """

    def __init__(self) -> None:
        self._open: dict[int, Any] = {}

    def is_new(self, transport: Any) -> bool:
        if transport is None or self._open.get(id(transport)) is transport:
            return False
        self._open = {k: t for k, t in self._open.items() if not t.is_closing()}
        self._open[id(transport)] = transport
        return True


def _close_request(text: str) -> int | None:
    """``"close:4001"`` -> 4001: the control message that makes the fleet hang up."""
    if text.startswith("close:") and len(text) == 10 and text[6:].isdigit():
        return int(text[6:])
    return None
