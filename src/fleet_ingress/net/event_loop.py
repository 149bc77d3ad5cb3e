"""The event loop every fleet-ingress process runs: uvloop's, but for one method.

uvloop's ``sock_connect`` resolves the address it is given through getaddrinfo
in libuv's thread pool even when that address is numeric (it asks without a
socket type, so its own shortcut for literals does not apply). libuv lets name
lookups take at most half of its four threads: a resolver that hangs on one
fleet's name held them, and every connection made with ``sock_connect`` waited
behind it. The health probes connect that way (aiohttp, through
aiohappyeyeballs, with addresses it has resolved already): fleets given by IP
failed their probes and went DOWN while the resolver hung (the
stalled-dependencies audit of session 14). Here a numeric address is connected
to directly (``tcp_connect.connect_socket``); anything else is uvloop's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from fleet_ingress.core.addresses import ip_literal_version
from fleet_ingress.logs import fields
from fleet_ingress.net.tcp_connect import connect_socket

T = TypeVar("T")


class IngressLoop(uvloop.Loop):
    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        if (
            sock.family in (socket.AF_INET, socket.AF_INET6)
            and isinstance(address, tuple)
            and isinstance(address[0], str)
            and ip_literal_version(address[0]) is not None
        ):
            await connect_socket(sock, address)
            return
        await super().sock_connect(sock, address)


def new_event_loop() -> IngressLoop:
    loop = IngressLoop()
    loop.set_exception_handler(_exception_handler)
    return loop


log = logging.getLogger("fleet_ingress.loop")


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's default, but for uvloop's own complaint about a TLS
    connection it had already closed: a health probe cut at its timeout in
    the middle of its handshake makes uvloop's SSL layer write to the closed
    transport and log "Fatal error on SSL protocol" with a traceback, at
    ERROR. The probe says what failed; hundreds of those tracebacks when many
    probes time out at once (the scale audit of session 16) said nothing more."""
    if _closed_tls_noise(context):
        log.debug(
            "TLS connection already closed", extra=fields(detail=str(context.get("exception")))
        )
        return
    loop.default_exception_handler(context)


def _closed_tls_noise(context: dict[str, Any]) -> bool:
    exc = context.get("exception")
    return (
        str(context.get("message", "")).startswith("Fatal error on SSL protocol")
        and isinstance(exc, RuntimeError)
        and "handler is closed" in str(exc)
    )


def run(main: Coroutine[Any, Any, T]) -> T:
    """``uvloop.run(main)`` on an IngressLoop."""
    return uvloop.run(main, loop_factory=new_event_loop)
