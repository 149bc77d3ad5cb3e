"""Timeouts that let a peer's answer waiting in the kernel in first.

A loop resumed after its process did not run (SIGSTOP, a debugger, a VM paused
while CLOCK_MONOTONIC went on) runs its due timers before it reads its sockets:
the stop interrupts epoll_wait, whose time is then up, and uvloop and asyncio's
loop alike go to their timers without polling again. A timeout that fires then
blames a peer whose answer came in time and waits unread (the clock audit of
session 32: a fleet's 101 that came during a worker's stop was taken for no
answer within timeouts.response, the bot it had answered with cut and the call
tried again). A timer run over STALL late is put off once by AFTER_STALL, so
that the loop reads first: the answer cancels it as it would have.

A timer that can ask whether its peer answered (`answered`: a connect's
sockets, net.tcp_connect.Underway) is put off only if it did, and by as long
as it came late (its own delay at most): the peer had its time, the loop did
not, and the rest of the exchange (a TLS handshake after a connection made
during the stall) takes round trips that could not happen meanwhile. A peer
that did not answer fails on the loop's first turn after the stall, as late
as the stall made it and no later.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

# Late by this much, a timer's loop did not run (a busy loop's lag is ms).
STALL = 0.1
# Turns enough for the loop to read what waits and act on it (a task's step
# after a connect, a TLS record), and short beside any timeout.
AFTER_STALL = 0.05


def put_off_by(
    late: float,
    delay: float,
    answered: Callable[[], bool] | None,
    put_off: float = AFTER_STALL,
) -> float | None:
    """How long a timer of `delay` that runs `late` seconds past its due time,
    its first run, is put off (`PatientTimer`'s rule); None: it fires now."""
    if late <= STALL:
        return None
    if answered is None:
        return put_off
    if answered():
        return max(AFTER_STALL, min(late, delay))
    return None


class PatientTimer:
    """`loop.call_later(delay, callback, *args)`, put off once by `put_off`
    (AFTER_STALL) if it comes over STALL late; given `answered`, only if that
    says the peer answered, and then by how late it came (`delay` at most).
    A longer `put_off`: what a peer stopped with us needs after it is continued
    (a kill backstop: the worker's close of its calls, STOP_GRACE)."""

    __slots__ = (
        "_answered",
        "_args",
        "_callback",
        "_delay",
        "_handle",
        "_loop",
        "_put_off",
        "_when",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        answered: Callable[[], bool] | None = None,
        put_off: float = AFTER_STALL,
    ) -> None:
        self._loop, self._callback, self._args = loop, callback, args
        self._delay, self._answered, self._put_off = delay, answered, put_off
        # Its own due time: uvloop answers a delay under its 1 ms tick (a
        # deadline come or past) with a plain Handle, which has no `when()`.
        self._when = loop.time() + delay
        self._handle = loop.call_later(delay, self._due, True)

    def _due(self, first: bool) -> None:
        if first:
            late = self._loop.time() - self._when
            wait = put_off_by(late, self._delay, self._answered, self._put_off)
            if wait is not None:
                self._handle = self._loop.call_later(wait, self._due, False)
                return
        self._callback(*self._args)

    def cancel(self) -> None:
        self._handle.cancel()


class PatientDeadline:
    """A deadline (`at`, time.monotonic()) that a polling loop asks about every
    `every` seconds (`passed`): asked over STALL late once it has passed (the
    process did not run: SIGSTOP, a paused VM), it moves `put_off` on, once,
    as a PatientTimer is put off: what was stopped with us (workers whose
    drain ends on their first turns) gets that long after it is continued."""

    __slots__ = ("_asked", "_every", "_moved", "_put_off", "at")

    def __init__(self, at: float, every: float, put_off: float) -> None:
        self.at, self._every, self._put_off = at, every, put_off
        self._asked = time.monotonic()
        self._moved = False

    def passed(self) -> bool:
        now = time.monotonic()
        late = now - self._asked - self._every
        self._asked = now
        if now < self.at:
            return False
        if late > STALL and not self._moved:
            self._moved = True
            self.at = now + self._put_off
            return False
        return True


@contextlib.asynccontextmanager
async def patient_timeout(
    delay: float | None, *, put_off: float = AFTER_STALL
) -> AsyncIterator[None]:
    """`asyncio.timeout(delay)` whose expiry is a PatientTimer (put off by
    `put_off`): late after a stall, the awaited answer unread in the kernel is
    read first. None: no timeout."""
    if delay is None:
        yield
        return
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as cm:
        timer = PatientTimer(loop, delay, cm.reschedule, 0.0, put_off=put_off)  # 0: now
        try:
            yield
        finally:
            timer.cancel()


async def wait_patiently(
    aws: Iterable[asyncio.Future[Any]],
    timeout: float | None,
    return_when: str = asyncio.ALL_COMPLETED,
) -> tuple[set[asyncio.Future[Any]], set[asyncio.Future[Any]]]:
    """`asyncio.wait(aws, timeout=timeout, return_when=return_when)` (none
    cancelled at the timeout) whose timeout is patient (`patient_timeout`)."""
    futures = set(aws)
    if futures:
        with contextlib.suppress(TimeoutError):
            async with patient_timeout(timeout):
                await asyncio.wait(futures, return_when=return_when)
    done = {f for f in futures if f.done()}
    return done, futures - done


def peer_moved(sock: Any, *, took: bool = True, sent: bool = False) -> bool:
    """Whether `sock`'s peer did something the loop has not seen yet, one poll,
    no wait (an `answered` for a close's timer): `took` (writable: it read what
    was waiting to go, our buffer having been full), `sent` (readable: its
    bytes, close_notify, FIN or reset wait unread). A closed socket: no."""
    try:
        fd = sock.fileno()
    except (AttributeError, OSError):
        return False
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, (select.POLLOUT if took else 0) | (select.POLLIN if sent else 0))
    return bool(poller.poll(0))
