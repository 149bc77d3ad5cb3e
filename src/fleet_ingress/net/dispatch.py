"""Hands each call a fleet slot, queueing FIFO while fleets are up but full.

The thin asyncio layer around `Balancer`: a slot is taken with `acquire()` and
given back with `release()`. A waiter woken from the queue is handed a slot
already taken for it, so nobody arriving later can steal it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from fleet_ingress.core.balancer import Balancer, FleetState, Verdict
from fleet_ingress.logs import fields
from fleet_ingress.net.late_timers import PatientTimer

log = logging.getLogger("fleet_ingress.slots")


class NoFleetAvailable(Exception):
    """Answer 503: `reason` says why (no fleet up, queue full, queue timeout).
    `queued_s`: how long the call waited in the queue first (0: refused at once;
    None: not known, a supervisor of a release before it said)."""

    def __init__(self, reason: str, *, queued_s: float | None = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.queued_s = queued_s


class HeldSlot(Protocol):
    """A slot held for one call attempt: `Lease` here, `RemoteLease` in a worker."""

    @property
    def fleet(self) -> FleetState: ...

    @property
    def held(self) -> bool: ...

    @property
    def queued_s(self) -> float | None:
        """Seconds it waited in the queue before it was handed over (0: at once;
        None: not known, a supervisor of a release before it said)."""
        ...

    def release(self) -> None: ...

    def fleet_answered(self, at: float) -> None: ...

    def fleet_said_full(self) -> None: ...

    def fleet_unreachable(self, *, refused: bool = True) -> None: ...

    def call_logged(self) -> None:
        """The call's access line is written (its end settled) while this slot
        is still held (its fleet side closing): whoever would write a line for
        the call, were its process to die with the slot, forgets it."""
        ...


class SlotSource(Protocol):
    """Where the call path gets its slots: this process's `Dispatcher`, or in a
    worker the supervisor's coordinator through `net.slot_client.SlotClient`."""

    async def lease(
        self, avoid: Collection[str] = (), call: dict[str, Any] | None = None
    ) -> HeldSlot:
        """`call`: who the call is (`Call.described`), for a line if it is lost."""
        ...

    @property
    def may_lease_now(self) -> bool:
        """Whether its `lease_now` (where it has one) may hand a slot over now:
        `net.proxy` asks it only then, else awaits `lease` at once."""
        ...


class DescribedCall(Protocol):
    """Who a call is, as its slot request says it (`net.calls.Call.described`)."""

    @property
    def described(self) -> dict[str, Any]: ...


class SlotQueue(Protocol):
    """What the health poller, fleet changes, stats and metrics need of whoever
    hands out slots: `Dispatcher`, or the supervisor's `net.slot_server.SlotServer`."""

    @property
    def queue_length(self) -> int: ...

    @property
    def queue_timeouts(self) -> int: ...

    def wake(self) -> None: ...


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[_Grant]
    avoid: Collection[str]


@dataclass(eq=False, slots=True)
class _Grant:
    """A slot taken on `fleet`: its key while the call is in flight (`Balancer.open`)."""

    fleet: FleetState
    queued_s: float = 0.0  # how long it waited in the queue (0: taken at once)


class Lease:
    """A slot taken on a fleet for one call attempt; `release()` is idempotent."""

    __slots__ = ("_dispatcher", "_grant", "fleet", "queued_s")

    def __init__(
        self, dispatcher: Dispatcher, fleet: FleetState, grant: _Grant | None = None
    ) -> None:
        """`grant`: its key in the fleet's calls in flight (`Dispatcher.lease`)."""
        self.fleet = fleet
        self._grant = grant
        self.queued_s = 0.0 if grant is None else grant.queued_s
        self._dispatcher: Dispatcher | None = dispatcher

    @property
    def held(self) -> bool:
        return self._dispatcher is not None

    def release(self) -> None:
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.release(self.fleet, self._grant)

    def fleet_answered(self, at: float) -> None:
        """The fleet answered this call `101` at `at` (monotonic): out of flight."""
        fleet = self.fleet
        fleet.call_failures = 0  # `call_connected`, spelt out (a Python call a call)
        if self._grant is not None:
            fleet.lease_answered(self._grant, at)

    def fleet_said_full(self) -> None:
        """The fleet answered this call `429`: FULL until its next probe."""
        take_as_full(self.fleet)

    def call_logged(self) -> None:
        """In-process: no one else writes a line for the call."""

    def fleet_unreachable(self, *, refused: bool = True) -> None:
        """This call's attempt could not connect to the fleet: `refused` by it,
        or timed out (`FleetState.call_unreachable`)."""
        dispatcher = self._dispatcher
        if dispatcher is not None and take_as_unreachable(
            self.fleet, dispatcher.fall, refused=refused
        ):
            for hook in dispatcher.on_down:
                hook(self.fleet)
            dispatcher.wake()


def take_as_full(fleet: FleetState) -> None:
    """A fleet's `429` to a call: FULL until its next probe (`said_full`), logged
    when that is news (here, or in the supervisor for a worker's call)."""
    fleet.call_connected()  # it answered: it takes connections
    # Said once a FULL: a fleet that answers 429 while its probes say room is
    # FULL again after every probe (`FullLog`).
    # Every 429 counted in the FULL said ("fleet has room" answered_429), news or not.
    news = fleet.said_full()
    if fleet.full_log.answered_429_now(time.monotonic(), news=news):
        log.info(
            "fleet full: it answered a call 429; no new call goes there until its next probe",
            extra=fields(fleet=fleet.name),
        )


def take_as_unreachable(fleet: FleetState, fall: int, *, refused: bool) -> bool:
    """A call's attempt on `fleet` could not connect: counted toward taking it
    DOWN (`FleetState.call_unreachable`), logged when it went DOWN now (here, or
    in the supervisor for a worker's call). True then: waiters may need waking."""
    if not fleet.call_unreachable(fall, time.monotonic(), refused=refused):
        return False
    log.warning(
        "fleet DOWN",
        extra=fields(
            fleet=fleet.name,
            before="UP",
            after="DOWN",
            reason=f"{fall} calls in a row were refused by it (TCP or TLS; its probes "
            "now open a new connection each, and bring it back UP as they pass)",
        ),
    )
    return True


class Dispatcher:
    def __init__(
        self, balancer: Balancer, *, queue_timeout: float, max_queue: int, fall: int = 0
    ) -> None:
        """`fall`: calls in a row that cannot connect to a fleet take it DOWN
        (`fleets.fall`; 0 where no probe would bring it back)."""
        self.balancer = balancer
        self.queue_timeout = queue_timeout
        self.max_queue = max_queue
        self.fall = fall
        self._queue: deque[_Waiter] = deque()
        self.queue_timeouts = 0  # count, for metrics
        # Hooks run after a slot is given back (e.g. reap a removed fleet gone idle).
        self.on_release: list[Callable[[FleetState], None]] = []
        # Hooks run when calls refused by a fleet took it DOWN (`Lease.fleet_unreachable`).
        self.on_down: list[Callable[[FleetState], None]] = []

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    async def lease(self, avoid: Collection[str] = (), call: dict[str, Any] | None = None) -> Lease:
        """A slot on the best fleet for this call, or `NoFleetAvailable`. `call`
        is not needed here: a call dies with this process's own log."""
        grant = await self._acquire(avoid)
        return Lease(self, grant.fleet, grant)

    # Whether `lease_now` is worth asking (`net.proxy`): always in one process.
    may_lease_now = True

    def lease_now(
        self, avoid: Collection[str] = (), call: DescribedCall | None = None
    ) -> Lease | None:
        """The slot `lease` would hand over without waiting (a fleet has room
        and no call waits before this one), taken now: no coroutine, no task
        and no loop turn for the common call (`net.proxy` asks this first).
        None where `lease` must be awaited: it queues the call, or refuses it.
        The pick takes only a READY fleet: the call machine answers a grant
        on one that is not by giving it back and asking again, which taken
        at once would loop without a turn of the loop between (session 47).
        `call` is not needed here (as `lease`'s), nor read."""
        if self._queue:  # FIFO: nobody overtakes a waiting call
            return None
        fleet = self.balancer.pick(avoid).fleet
        return None if fleet is None else Lease(self, fleet, self._open(fleet))

    async def acquire(self, avoid: Collection[str] = ()) -> FleetState:
        """A fleet with a slot taken for this call, or `NoFleetAvailable`
        (given back with `release(fleet)`; `lease` also follows the call's flight)."""
        grant = await self._acquire(avoid)
        grant.fleet.lease_ended(grant)  # nobody will say when the fleet answered
        return grant.fleet

    def _open(self, fleet: FleetState) -> _Grant:
        grant = _Grant(fleet)
        self.balancer.open(fleet, grant)
        return grant

    async def _acquire(self, avoid: Collection[str]) -> _Grant:
        if not self._queue:  # FIFO: nobody overtakes a waiting call
            pick = self.balancer.pick(avoid)
            if pick.fleet is not None:
                return self._open(pick.fleet)
            if pick.verdict is Verdict.NO_FLEET_UP:
                raise NoFleetAvailable(self.balancer.none_up_reason())
        elif not self.balancer.may_serve:
            raise NoFleetAvailable(self.balancer.none_up_reason())
        if self.queue_timeout <= 0:
            raise NoFleetAvailable("every fleet is at capacity and queueing is off")
        if len(self._queue) >= self.max_queue:
            raise NoFleetAvailable("every fleet is at capacity and the queue is full")
        return await self._wait(avoid)

    async def _wait(self, avoid: Collection[str]) -> _Grant:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), avoid)
        self._queue.append(waiter)
        # Patient: a release that came during a stall (a call's end, unread)
        # is read before the waiter is refused (as the host's queue: slot_server).
        timer = PatientTimer(loop, self.queue_timeout, self._expire, waiter)
        since = time.monotonic()
        try:
            grant = await waiter.future
            grant.queued_s = max(0.0, time.monotonic() - since)
            return grant
        except NoFleetAvailable as exc:
            exc.queued_s = max(0.0, time.monotonic() - since)
            raise
        except asyncio.CancelledError:
            # Cancelled (the carrier left) after a slot was handed over: give it back.
            fut = waiter.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                grant = fut.result()
                self.release(grant.fleet, grant)
            raise
        finally:
            timer.cancel()
            if waiter in self._queue:
                self._queue.remove(waiter)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self.queue_timeouts += 1
            waiter.future.set_exception(
                NoFleetAvailable(f"no fleet had room within {self.queue_timeout:g}s in the queue")
            )

    def release(self, fleet: FleetState, grant: _Grant | None = None) -> None:
        self.balancer.close(fleet, grant)
        for hook in self.on_release:
            hook(fleet)
        if self._queue:  # (`wake`'s own first look: no call waits, most releases)
            self.wake()

    def wake(self) -> None:
        """Hand freed slots to waiters in order. Call whenever room may have
        appeared (a call ended, a probe reported capacity, a fleet came up)."""
        while self._queue:
            waiter = self._queue[0]
            if waiter.future.done():
                self._queue.popleft()
                continue
            pick = self.balancer.pick(waiter.avoid)
            if pick.verdict is Verdict.NO_FLEET_UP:
                self._queue.popleft()
                waiter.future.set_exception(NoFleetAvailable(self.balancer.none_up_reason()))
                continue
            if pick.fleet is None:
                return
            self._queue.popleft()
            waiter.future.set_result(self._open(pick.fleet))
