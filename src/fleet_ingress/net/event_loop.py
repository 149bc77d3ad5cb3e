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

And a name's lookups: every call to a fleet given by name asks getaddrinfo, and
a lookup cannot be called back once libuv runs it. With the resolver hung (or
slow) on one fleet's name, 20 calls' lookups of it held the two threads libuv
gives lookups, queued behind them every other name's, and fleets whose names
resolved at once failed their calls and their probes (the DNS audit of session
21). Here lookups of the same name under way at once are one lookup, whose
answer each caller gets (a caller that gives up leaves it to the others), and
libuv's pool has 16 threads (8 for lookups) unless UV_THREADPOOL_SIZE says
otherwise. Nothing is cached: the next lookup after an answer asks again.

But a name this loop has resolved keeps working while the resolver does not:
a lookup that fails for now (EAI_AGAIN: the resolver timed out, refused or
answered SERVFAIL) or has not answered within STALE_AFTER gets the name's last
answer (of the last STALE_FOR), and the lookup goes on to refresh it; "serve
stale", RFC 8767. Before, a resolver outage took every fleet given by name
DOWN, and every call to them failed, though the fleets were fine (HAProxy
without a `resolvers` section resolves once, at its start, and never notices).
A name that does not exist (EAI_NONAME: its record was removed) still fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from fleet_ingress.core.addresses import ip_literal_version
from fleet_ingress.logs import fields
from fleet_ingress.net.tcp_connect import connect_socket

T = TypeVar("T")

log = logging.getLogger("fleet_ingress.loop")

# libuv reads it at its pool's first use, once a process: set before any loop runs.
THREADPOOL_SIZE = "16"

_LookupKey = tuple[Any, Any, int, int, int, int]

# Serve stale (RFC 8767's figures): a name's last answer is used when its lookup
# has not answered within STALE_AFTER seconds or fails for now, for up to
# STALE_FOR seconds after that answer; answers of ANSWERS_KEPT keys at most.
STALE_AFTER = 0.5  # under the probes' check_timeout (1 s by default)
STALE_FOR = 86_400.0
ANSWERS_KEPT = 512
STALE_SAID_EVERY = 60.0  # seconds: a warning a name, not one a call


class IngressLoop(uvloop.Loop):
    def __init__(self) -> None:
        super().__init__()
        # Each lookup under way, and the loop time it was asked.
        self._lookups: dict[_LookupKey, tuple[asyncio.Future[list[Any]], float]] = {}
        # Each key's last answer and when it came (monotonic), oldest first.
        self._answers: dict[_LookupKey, tuple[float, list[Any]]] = {}
        self._stale_said: dict[Any, float] = {}

    async def getaddrinfo(  # type: ignore[override]
        self,
        host: Any,
        port: Any,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        key = (host, port, family, type, proto, flags)
        under_way = self._lookups.get(key)
        if under_way is None:
            lookup = self.create_task(self._lookup(host, port, family, type, proto, flags))
            under_way = self._lookups[key] = (lookup, self.time())
            lookup.add_done_callback(functools.partial(self._lookup_done, key))
        lookup, asked_at = under_way
        last = self._last_answer(key)
        if last is None:
            # A caller's timeout cancels its wait, not the lookup others wait on.
            return list(await asyncio.shield(lookup))
        # STALE_AFTER from when the lookup was asked, not from when this caller came:
        # a probe that joins a hung lookup (inside its own check_timeout) gets the
        # last answer at once. asyncio.wait cancels nothing: the lookup goes on.
        wait = STALE_AFTER - (self.time() - asked_at)
        if wait > 0:
            await asyncio.wait((lookup,), timeout=wait)
        if not lookup.done():
            self._say_stale(host, last, f"no answer within {STALE_AFTER:g} s")
            return list(last[1])
        try:
            return list(lookup.result())
        except socket.gaierror as exc:
            if exc.errno != socket.EAI_AGAIN:
                raise
            self._say_stale(host, last, str(exc))
            return list(last[1])

    async def _lookup(
        self, host: Any, port: Any, family: int, type: int, proto: int, flags: int
    ) -> list[Any]:
        return await uvloop.Loop.getaddrinfo(
            self, host, port, family=family, type=type, proto=proto, flags=flags
        )

    def _lookup_done(self, key: _LookupKey, lookup: asyncio.Future[list[Any]]) -> None:
        if (under_way := self._lookups.get(key)) is not None and under_way[0] is lookup:
            del self._lookups[key]
        if lookup.cancelled():
            return
        failed = lookup.exception()  # also: every caller may have left, not "never retrieved"
        if failed is not None:
            if not (isinstance(failed, socket.gaierror) and failed.errno == socket.EAI_AGAIN):
                # The name is gone (EAI_NONAME...): its last address is not to be used.
                self._answers.pop(key, None)
        else:
            self._answers.pop(key, None)
            self._answers[key] = (time.monotonic(), lookup.result())
            if len(self._answers) > ANSWERS_KEPT:
                del self._answers[next(iter(self._answers))]

    def _last_answer(self, key: _LookupKey) -> tuple[float, list[Any]] | None:
        last = self._answers.get(key)
        if last is None or time.monotonic() - last[0] > STALE_FOR:
            return None
        return last

    def _say_stale(self, host: Any, last: tuple[float, list[Any]], why: str) -> None:
        now = time.monotonic()
        if now - self._stale_said.get(host, -STALE_SAID_EVERY) < STALE_SAID_EVERY:
            return
        self._stale_said[host] = now
        if len(self._stale_said) > ANSWERS_KEPT:
            del self._stale_said[next(iter(self._stale_said))]
        log.warning(
            "name lookup failing: its last answer is used",
            extra=fields(
                name=str(host),
                reason=why,
                answer_age_s=round(now - last[0], 1),
                fix="check this host's resolver (resolvectl status, /etc/resolv.conf)",
            ),
        )

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
    os.environ.setdefault("UV_THREADPOOL_SIZE", THREADPOOL_SIZE)
    loop = IngressLoop()
    loop.set_exception_handler(_exception_handler)
    return loop


def next_tick(now: float, every: float) -> float:
    """The loop clock's next multiple of `every` seconds after `now`, never
    `now` itself (`now` when `every` is not positive). The clock work of a
    process (`sleep_to_tick`) is due on these ticks."""
    if every <= 0:
        return now
    # Rounded first: a tick just fired may read a hair under its multiple.
    return (math.floor(round(now / every, 6)) + 1) * every


async def sleep_to_tick(every: float) -> None:
    """Sleep until the loop's clock reaches its next multiple of `every`: a
    process's tasks that do something every second (or every 5, 10, 30) wake
    it once a tick between them, not once each at its own moment in the
    second (the idle audit of session 48: an idle supervisor woke 4.7 times a
    second, one of them for its admin socket's look alone). A task whose work
    took a while keeps its rate: the next tick comes no later for it. The
    timer is set at the tick itself (`call_at`), not after a delay from now:
    two tasks' timers then fall due at the same instant, which asyncio's loop
    runs in one turn too (delays read from two moments differ by a hair)."""
    loop = asyncio.get_running_loop()
    if every <= 0:
        await asyncio.sleep(0)
        return
    woken = loop.create_future()
    timer = loop.call_at(next_tick(loop.time(), every), _wake, woken)
    try:
        await woken
    finally:
        timer.cancel()


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


_unexpected = 0  # bugs met in this process (`unexpected_errors`)


def unexpected_errors() -> int:
    """How many exceptions of a bug this process met: those no code of ours
    caught that reached its event loop (a callback or transport that raised, a
    task's exception never retrieved), and those a guard caught and logged to
    keep going (`count_unexpected_error`); each logged with its traceback.
    Exported, summed over the host, as fleet_ingress_unexpected_errors_total."""
    return _unexpected


def count_unexpected_error() -> None:
    """One more exception of a bug: caught by a guard that logs it and goes on,
    or reaching the loop's handler (`_exception_handler`)."""
    global _unexpected
    _unexpected += 1


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's default, counted (`unexpected_errors`), but for uvloop's own
    complaint about a TLS connection it had already closed: a health probe cut
    at its timeout in the middle of its handshake makes uvloop's SSL layer write
    to the closed transport and log "Fatal error on SSL protocol" with a
    traceback, at ERROR. The probe says what failed; hundreds of those
    tracebacks when many probes time out at once (the scale audit of session
    16) said nothing more."""
    if _closed_tls_noise(context):
        log.debug(
            "TLS connection already closed", extra=fields(detail=str(context.get("exception")))
        )
        return
    count_unexpected_error()
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
