"""A worker's end of the slot coordinator: fleet slots from the supervisor.

`SlotClient.lease(avoid)` and `RemoteLease.release()` are `Dispatcher.lease`
and `Lease.release` over a Unix socket: the call path can use either. A
lease's `fleet` is this worker's own record of that fleet (`FleetState`: its
spec and the counters the worker's stats read); the host-wide count behind
maxconn and leastconn lives in the supervisor only.

Leaving is one message whatever the state: a call that gives up (cancelled,
or no answer in time) sends `release`, which the coordinator reads after the
`acquire` (one stream, in order) and applies to whatever that lease has
become: a queued request is withdrawn, a slot granted meanwhile comes back.
A grant that arrives for a lease nobody waits for any more is dropped, as
its release is already on the way.

After the supervisor re-executes, the channel is the same socket; the new
image asks `sync` and this end answers with what it holds and waits for
(`state`), from which the host's table is rebuilt. Just before the exec the
supervisor may give this worker a grant budget ("budget", `core.slot_budget`):
until "sync" (or the channel's end) a call is granted from it at once, as
nobody else grants meanwhile; its lease is held like any other, said in
"state", and given back with "release". What is left of it at "sync" is dropped.

A worker that says "standing" in its hello (INGRESS_STANDING_BUDGETS) may be
given such a budget outside an exec too, while nobody waits host-wide
(`core.slot_budget`, docs/WORKERS.md "Standing budgets"): its calls are granted
from it without a round trip, the releases going back into it and "logged"
ride its next write, and it gives it back when told ("budget-end") or as it
stops taking calls (`decline_standing`).

While it is the only worker and nobody waits, the supervisor gives it a
lone worker's budget ("lone" in its hello; session 46): every free slot, a
standing budget whose grants are held too (each call's "acquire" rides the
next write, or ANSWERS_FLUSH, as its release into the budget and "logged"
do), for a call with a record in the call table. It ends as any standing
budget does ("budget-end", "budget-dropped" after what was held).

Stats: the coordinator asks `report`; this end answers with what `reporter`
returns (the worker's counts: `ops.host_stats.WorkerReporter`), numbered;
`send_report(final=True)` as the worker exits cleanly. Between asks,
`report_soon()` (the worker calls it when a count moves) sends one within
`REPORT_AFTER_COUNT`: what a worker killed outright takes with it is then
at most that long's counts, not the time between two asks. While calls are
live (`live()`), the bytes they relay, which move no count, send one every
`REPORT_AFTER_COUNT` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any, cast

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.slot_budget import Budget, BudgetFleet
from fleet_ingress.logs import fields
from fleet_ingress.net.call_table_map import CallTableWriter
from fleet_ingress.net.dispatch import DescribedCall, NoFleetAvailable
from fleet_ingress.net.event_loop import count_unexpected_error
from fleet_ingress.net.late_timers import PatientTimer
from fleet_ingress.net.slot_wire import (
    LineDecoder,
    UnknownOps,
    WireError,
    encode,
    field,
    spec_from_wire,
)

log = logging.getLogger("fleet_ingress.slots")

COORDINATOR_GONE = "the supervisor's slot coordinator is gone"

# What a worker that has not said hello yet may be sent: a "sync" per
# re-execution of the supervisor and a "stop", "reload" or "close-fleet" of
# its own; a few. Held until the hello, and this many at most: past it the
# peer floods a worker that has not joined, which is not this protocol.
HELD_BEFORE_HELLO = 64
# A fleet's answer to a call (its 101) is told to the coordinator with the next
# message this worker sends, or after this long: one message for many calls.
# Until then the coordinator counts the call in flight (`FleetState.pending`):
# its estimate of the fleet's free workers errs low meanwhile, never high.
ANSWERS_FLUSH = 0.2
# Once the supervisor has asked for them ("tell-held": it asks after each
# probe, when what is held may move its estimate of a fleet's free workers),
# what waits goes with this end's next write, or this long after the first
# (its report's pace: the report due then goes with them): the supervisor
# wakes about once a second for a lone worker's held lines, not five times
# (session 48). A supervisor that never asks gets them within ANSWERS_FLUSH.
HELD_FLUSH_ASKED = 1.0
# A count that moved (`Registry.on_counted`) reaches the supervisor in a report
# sent this long after at most: one report for everything counted meanwhile,
# none while nothing is counted.
REPORT_AFTER_COUNT = 1.0
# Whether a worker asks for standing grant budgets ("standing" in its hello
# and state, `core.slot_budget`): off unless INGRESS_STANDING_BUDGETS is "1"
# or "held" in its environment (session 43: built and tested on the slot
# channel, not yet through the whole suite; docs/WORKERS.md "Standing
# budgets"). Outside FLEET_INGRESS_*, which names settings.
_STANDING_ENV = os.environ.get("INGRESS_STANDING_BUDGETS", "")
STANDING_BUDGETS = _STANDING_ENV in ("1", "held")
# Whether the "acquire" of a call granted from a standing budget waits to ride
# the next write (or ANSWERS_FLUSH), as a release into the budget and "logged"
# do ("held"). Held, the supervisor wakes about 0.5 times a churned call
# instead of 1.3 (bench/README, session 43); but a worker killed within
# ANSWERS_FLUSH of a grant would take that call with it unnamed but for its
# record in the worker's call table (`net.call_table_map`), which the
# supervisor reads when it dies: held only for a call that has one. By
# default ("1") it goes at once.
HOLD_BUDGET_GRANTS = _STANDING_ENV == "held"
# Whether a worker takes a lone worker's budget ("lone" in its hello and
# state, session 46): on unless INGRESS_LONE_BUDGET is "0" (to measure
# without it). Its grants are held whatever HOLD_BUDGET_GRANTS says.
LONE_BUDGETS = os.environ.get("INGRESS_LONE_BUDGET", "1") != "0"
# A call about to be granted from a standing budget (a lone one or not) while
# the channel has bytes (or its end) waiting unread waits for this end to read
# them first, this long at most (seconds, in time this loop ran), and this
# many reads: a "budget-end" or the channel's end waiting there means the
# budget is gone (`SlotClient._budget_current`). Past it (this end's reading
# paused, or stalled), the call is asked of the supervisor instead.
BUDGET_READ_WAIT = 0.5
BUDGET_READS_MOST = 4


def _not_ours(entry: dict[str, Any], own: dict[str, int]) -> int:
    """Of an exec budget's fleet `entry`, the slots of the standing rest it
    carries ("standing") that this worker's standing budget (`own`, fleet ->
    slots left) no longer has: granted since the supervisor last read it."""
    carried = int(entry.get("standing", 0))
    return max(0, carried - own.get(str(entry["fleet"]), 0))


def _read_late(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _no_answer(future: asyncio.Future[FleetState]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _waited(message: dict[str, Any], asked: tuple[list[str], float] | None) -> float | None:
    """How long an answer's lease waited in the coordinator's queue, timed from
    its ask on this worker's clock: 0 when it says it came at once ("queued":
    false), None when it does not say (a supervisor of a release before the
    key: a wait there is not known, and 0 would say there was none)."""
    queued = message.get("queued")
    if queued is True and asked is not None:
        return max(0.0, time.monotonic() - asked[1])
    if queued is False:
        return 0.0
    return None


class RemoteLease:
    """A slot held through the coordinator; `release()` is idempotent."""

    __slots__ = ("_client", "fleet", "id", "queued_s")

    def __init__(
        self, client: SlotClient, lease_id: int, fleet: FleetState, queued_s: float | None = 0.0
    ) -> None:
        """`queued_s`: how long it waited for the coordinator's queue to hand it
        over (0: granted at once; None: not known, a supervisor before "queued")."""
        self.id = lease_id
        self.fleet = fleet
        self.queued_s = queued_s
        self._client: SlotClient | None = client

    @property
    def held(self) -> bool:
        return self._client is not None

    def release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client._release(self)

    def fleet_answered(self, at: float) -> None:
        """The fleet answered this call `101` at `at` (monotonic): the coordinator
        counts it out of flight (`answered`: a supervisor before it ignores the op)."""
        if self._client is not None:
            self._client._answered(self.id, at)

    def fleet_said_full(self) -> None:
        """The fleet answered this call `429`: the coordinator takes it as FULL
        until its next probe (`full`: a supervisor before it ignores the op)."""
        if self._client is not None:
            self._client._write({"op": "full", "id": self.id})

    def call_logged(self) -> None:
        """The call's access line is written while this slot is still held (its
        fleet side closing): the coordinator forgets who the call is, so that
        it writes no second line should this worker die before the release
        (`logged`: a supervisor before it ignores the op)."""
        if self._client is not None:
            self._client._logged(self.id)

    def fleet_unreachable(self, *, refused: bool = True) -> None:
        """This call's attempt could not connect to the fleet: the coordinator
        counts it toward taking the fleet DOWN (`unreachable`: a supervisor
        before it ignores the op)."""
        if self._client is not None:
            self._client._write({"op": "unreachable", "id": self.id, "refused": refused})


class SlotClient(asyncio.Protocol):
    def __init__(
        self,
        *,
        pid: int,
        generation: int,
        answer_timeout: float,
        hello: bool = True,
        standing: bool | None = None,
        lone: bool | None = None,
    ) -> None:
        """`answer_timeout` bounds a wait for the coordinator's answer; set it
        above the queue timeout (which the coordinator enforces itself) plus
        the time the supervisor takes to re-execute. `hello` False: `say_hello`
        later, once `handlers` are in place (the coordinator's own messages
        may follow its reading of "hello" at once). Nothing is acted on before
        "hello": a supervisor re-executed before it read ours asks "sync" (and
        more) at once, and the answer must come after the "hello", from a
        worker whose handlers are in place. What comes meanwhile is held, up
        to `HELD_BEFORE_HELLO` messages (more breaks the channel). `standing`:
        whether it takes standing grant budgets (None: this process's
        INGRESS_STANDING_BUDGETS, `STANDING_BUDGETS`); `lone`: a lone worker's
        budget (None: `LONE_BUDGETS`)."""
        self.pid = pid
        # The tag of this worker's call ids (`net.calls.process_tag`), said in its
        # hello and state: the supervisor refuses an id of another process's.
        self.tag: str | None = None
        self._hello_on_connect = hello
        self._held_back: list[dict[str, Any]] | None = None if hello else []  # until "hello"
        self.generation = generation
        self.answer_timeout = answer_timeout
        self.fleets: dict[str, FleetState] = {}  # this worker's records, by name
        # Fleets forgotten while a slot there was held: dropped at its release.
        self._forget_when_idle: set[str] = set()
        # The call counters of the fleets forgotten, summed (not by name: the
        # report grew with every fleet ever named): ("calls",), ("responses",
        # code), ("retries",), ("redispatches",). Reported under
        # `ops.local_counts.REMOVED_FLEETS`, so that a fleet's lifetime totals
        # stay in the host's "removed fleets" row once it is forgotten.
        self.forgotten: Counter[tuple[str, ...]] = Counter()
        # Kept: CPython 3.11's get_running_loop() asks the kernel for the pid
        # each time (a getpid a call, bench/README "system calls per call").
        self._loop = asyncio.get_running_loop()
        self.lost = self._loop.create_future()  # set when the channel closes
        self._transport: asyncio.Transport | None = None
        self._decoder = LineDecoder()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[FleetState]] = {}
        self._asked: dict[int, tuple[list[str], float]] = {}  # pending: avoid, since
        # Seconds a lease granted from the coordinator's queue waited there, until
        # `lease` hands it over (the wait from its ask: this worker's own clock).
        # None: not known (a supervisor of a release before "queued" said nothing).
        self._queued: dict[int, float | None] = {}
        self._held: dict[int, str] = {}  # lease id -> fleet name
        # What each open lease's call is ("call" in its "acquire"), told again in
        # "state": a supervisor started after one died knows it from there alone.
        self._calls: dict[int, dict[str, Any]] = {}
        self._in_flight: set[int] = set()  # held, its call not answered by its fleet yet
        self._answers: list[list[float]] = []  # [lease id, when] not told yet
        # Armed while something waits to ride the next write (the answers, the
        # held lines): it writes them ANSWERS_FLUSH after the first (or
        # HELD_FLUSH_ASKED, once asked), if nothing else has gone meanwhile.
        self._flush_timer: asyncio.TimerHandle | None = None
        # The supervisor asks for what is held when it matters ("tell-held").
        self._held_asked = False
        # The supervisor's own messages beside the slots' (reload, stop,
        # close-fleet): op -> handler(message).
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        # What the worker has counted, for `report` (None: nothing counted here).
        self.reporter: Callable[[], dict[str, Any]] | None = None
        # Whether calls are live: the bytes they relay move no count, so while
        # there are any a report goes every REPORT_AFTER_COUNT all the same.
        self.live: Callable[[], bool] | None = None
        # [[lease id, bytes from the carrier, bytes to it], ...] of the calls
        # holding a slot: sent in the reports the coordinator asks for.
        self.calls_bytes: Callable[[], list[list[int]]] | None = None
        self._reports = itertools.count(1)
        self._report_timer: asyncio.TimerHandle | None = None
        self.started = time.time()
        self._unknown = UnknownOps()  # a newer supervisor's ops: logged once, ignored
        # The grant budget the supervisor gave as it re-executes, until "sync":
        # calls granted from it at once. The fleets' specs, as it sent them.
        self._budget: Budget | None = None
        self._budget_specs: dict[str, Any] = {}
        # The budget is a standing one (outside an exec): what it grants and
        # gets back is told in batches (`_held_lines`, sent first with the next
        # write, or ANSWERS_FLUSH after: `_flush_soon`).
        self._standing = False
        # Whether it says it takes standing budgets (set before its hello).
        self.takes_standing = STANDING_BUDGETS if standing is None else standing
        # Whether it says it takes a lone worker's budget (set before its hello),
        # and whether the budget it holds is one (its grants held).
        self.takes_lone = LONE_BUDGETS if lone is None else lone
        self._lone = False
        self._held_lines: list[bytes] = []
        # Leases whose "acquire" is among `_held_lines`: granted from the
        # budget, not told yet (`_logged` sends them at once).
        self._held_acquires: set[int] = set()
        # Leases whose call's access line is written, its record in the table
        # ENDED, their "logged" not told yet: it rides this end's next write
        # (the call's release, a few ms later, most often), or goes
        # ANSWERS_FLUSH after; a release told first says it (the supervisor
        # forgets the call at either), and it is dropped. Should this process
        # die meanwhile, the supervisor reads ENDED in the table: no second line.
        self._logged_untold: set[int] = set()
        # Leases given up unanswered while a standing budget stood: should the
        # grant come after all, the supervisor held it when it read the release
        # and gave that slot back into its copy of the budget; ours takes it
        # back too then (`_handle`, "granted"). Cleared as the budget ends.
        self._gave_up_standing: set[int] = set()
        self.budget_granted_total = 0  # calls granted from budgets over its life
        # Its calls' records in the table the supervisor reads when this
        # process dies (`net.call_table_map`): a call with one may have its
        # "acquire", "logged" and "release" held. None: every call is told.
        self.table: CallTableWriter | None = None
        # The channel looked at, without reading it, before a grant from a
        # standing budget (`_channel_unread`), and the futures of the calls
        # waiting for this end to read what is there (`_budget_current`).
        self._peek: select.poll | None = None
        self._read_waiters: list[asyncio.Future[None]] = []

    @classmethod
    async def connect(
        cls,
        *,
        sock: socket.socket | None = None,
        path: str | None = None,
        pid: int,
        generation: int,
        answer_timeout: float,
        hello: bool = True,
        standing: bool | None = None,
        lone: bool | None = None,
    ) -> SlotClient:
        """Over an inherited socket (`sock`, the worker's end of a socketpair)
        or to the coordinator's listening Unix socket (`path`). `standing`: as
        the constructor's (None: this process's INGRESS_STANDING_BUDGETS)."""
        loop = asyncio.get_running_loop()
        make = lambda: cls(  # noqa: E731
            pid=pid,
            generation=generation,
            answer_timeout=answer_timeout,
            hello=hello,
            standing=standing,
            lone=lone,
        )
        if sock is not None:
            _, client = await loop.create_unix_connection(make, sock=sock)
        else:
            _, client = await loop.create_unix_connection(make, path)
        return client

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self.lost.done()

    @property
    def held(self) -> int:
        """Slots this worker holds now."""
        return len(self._held)

    async def lease(
        self, avoid: Collection[str] = (), call: dict[str, Any] | None = None
    ) -> RemoteLease:
        """A slot on the best fleet of the host for this call, or `NoFleetAvailable`.
        `call` (`Call.described`) goes with the request: the supervisor writes
        the call's access line if this process dies with it."""
        if not self.connected:
            raise NoFleetAvailable(COORDINATOR_GONE)
        from_budget = self._budget is not None
        if from_budget and self._standing and self._channel_unread():
            # Something waits unread (no coroutine a call otherwise: one poll).
            from_budget = await self._budget_current()
            if not self.connected:
                raise NoFleetAvailable(COORDINATOR_GONE)
        lease_id = next(self._ids)
        if (
            from_budget
            and self._budget is not None
            and (name := self._budget.take(avoid)) is not None
        ):
            return self._grant_from_budget(lease_id, name, avoid, call)
        future: asyncio.Future[FleetState] = self._loop.create_future()
        self._pending[lease_id] = future
        self._asked[lease_id] = (list(avoid), time.monotonic())
        asking: dict[str, Any] = {"op": "acquire", "id": lease_id, "avoid": list(avoid)}
        if call is not None:
            asking["call"] = call
            self._calls[lease_id] = call
            if self.table is not None and self.table.open(lease_id, call, None):
                asking["table"] = True  # the supervisor trusts its record when it dies
        self._write(asking)
        # Put off after a stall (net.late_timers): a grant waiting unread in the
        # channel is taken before the wait is given up.
        timer = PatientTimer(self._loop, self.answer_timeout, _no_answer, future)
        try:
            fleet = await future
        except TimeoutError:
            self._give_up(lease_id, future)
            raise NoFleetAvailable(
                f"the slot coordinator did not answer within {self.answer_timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            self._give_up(lease_id, future)
            raise
        finally:
            timer.cancel()
        return RemoteLease(self, lease_id, fleet, self._queued.pop(lease_id, 0.0))

    @property
    def may_lease_now(self) -> bool:
        """Whether `lease_now` may grant (`net.proxy` asks it only then): a
        budget stands. Without one (several workers, none taking standing
        budgets: the default) the call's Task is made at once, not after a
        callback that would find nothing (7k instructions more a call)."""
        return self._budget is not None

    def lease_now(
        self, avoid: Collection[str] = (), call: DescribedCall | None = None
    ) -> RemoteLease | None:
        """The slot `lease` would grant from this worker's budget without a
        round trip, taken now: no coroutine, no task, no loop turn
        (`net.proxy` asks this first, as of the one-process `Dispatcher`).
        None where `lease` must be awaited: no budget, none left in it (the
        supervisor is asked), something unread in the channel (a
        "budget-end" may wait there: `_budget_current` reads it first), or
        the fleet chosen is not READY and UP by this worker's record. That
        last is a guard, not what keeps grants off a fleet gone DOWN,
        drained or in MAINT: a worker's records stay READY and UP (the
        supervisor holds health and admin states), and it ends a budget
        whose fleet leaves service with a "budget-end", read before any
        grant as above. Should a record say otherwise, the call machine
        would answer such a grant by giving it back and asking again, which
        taken at once would loop without a turn between. `call`
        (`net.calls.Call`): who the call is, read only when it is granted."""
        budget = self._budget
        if budget is None or not self.connected or self._read_waiters:
            return None
        if self._standing and self._channel_unread():
            return None
        name = budget.take(avoid)
        if name is None:
            return None
        record = self.fleets.get(name)
        if record is not None and not record.up:  # (UP and READY)
            budget.untake(name)
            return None
        described = None if call is None else call.described
        return self._grant_from_budget(next(self._ids), name, avoid, described)

    async def _budget_current(self) -> bool:
        """Whether a call may be granted from the standing budget now: nothing
        waits unread in the channel, or what waited was read and the budget
        is still there. The supervisor takes back the slots of a lone budget
        not dropped LONE_END_WAIT (1 s) after its "budget-end"
        (`SlotServer._lone_wait_over`), and what is left of any standing one
        once the channel has ended and this process has run on
        (`settle_lost`): a worker whose loop did not run meanwhile (SIGSTOP,
        a stall) gets its accepts and that message, or the end, in one turn.
        Granted from before reading them, those calls took slots given to
        others: maxconn passed. One poll(2) a grant; a wait of a loop turn
        only when something is there (a report asked, most often)."""
        for _ in range(BUDGET_READS_MOST):
            if self._budget is None or not self._standing:
                return True  # ended meanwhile: asked of the supervisor as without one
            if not self._channel_unread():
                return True
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._read_waiters.append(waiter)
            timer = PatientTimer(self._loop, BUDGET_READ_WAIT, _read_late, waiter)
            try:
                await waiter
            except TimeoutError:
                break
            finally:
                timer.cancel()
                with contextlib.suppress(ValueError):
                    self._read_waiters.remove(waiter)
        return False

    def _channel_unread(self) -> bool:
        """Bytes, or the channel's end, wait unread in this end's socket."""
        peek = self._peek
        if peek is None:
            return False
        try:
            return bool(peek.poll(0))
        except OSError:
            return True

    def _read_through(self) -> None:
        """This end has read what was waiting (or the channel ended)."""
        waiters, self._read_waiters = self._read_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _grant_from_budget(
        self, lease_id: int, name: str, avoid: Collection[str], call: dict[str, Any] | None
    ) -> RemoteLease:
        """Lease `lease_id` on fleet `name`, from the budget: held as a granted
        one is (said in "state", given back with "release"). Its "acquire" goes
        all the same, marked "budget": read by the next image before this
        worker's "state" (it reads nothing else then), it names the call, so
        that a call lost with this worker before its "state" has its line."""
        fleet = self._fleet(name, self._budget_specs.get(name))
        fleet.active += 1
        fleet.opened_total += 1
        self._held[lease_id] = name
        self._in_flight.add(lease_id)
        asking: dict[str, Any] = {"op": "acquire", "id": lease_id, "avoid": list(avoid)}
        asking["budget"] = True
        asking["fleet"] = name  # counted as the host's grant on it (`HostSlots.count_granted`)
        if self._standing:
            asking["standing"] = True  # `HostSlots.grant_standing`
            # When: a held one is read late, maybe after a probe that counted
            # its call (`FleetState.grant_heard_late`; ignored before session 46).
            asking["at"] = time.monotonic()
        recorded = False
        if call is not None:
            asking["call"] = call
            self._calls[lease_id] = call
            if self.table is not None and self.table.open(lease_id, call, name):
                asking["table"] = recorded = True
        if self._standing and (HOLD_BUDGET_GRANTS or self._lone) and recorded:
            # Its record names the call should this process die before the
            # acquire goes: the supervisor reads the table then.
            self._hold(asking)
            self._held_acquires.add(lease_id)
        else:
            self._write(asking)
        self.budget_granted_total += 1
        return RemoteLease(self, lease_id, fleet, 0.0)

    def _take_budget(self, message: dict[str, Any]) -> None:
        """A grant budget: an exec's (until "sync"), or a standing one
        ("standing": until "budget-end"), which this end says it has
        ("budget-taken": from there on both ends give slots back into it). An
        exec's replaces a standing one: the supervisor shared out the slots
        the standing ones left free, and counts what was left of them until
        this worker's "state"."""
        standing = message.get("standing") is True
        lone = standing and message.get("lone") is True
        if standing and not (self.takes_lone if lone else self.takes_standing):
            # Declined since it was sent (`decline_standing`): what it reserved
            # is freed by this answer.
            self._write({"op": "budget-dropped"})
            return
        # An exec's budget carries the rest of this worker's standing one as the
        # supervisor last read it ("standing" per fleet): a call granted from it
        # since, its "acquire" not read before the plan, is still counted there.
        # Of that part only what this end's copy has left is kept (none when it
        # has dropped its standing budget): else that slot is granted twice.
        own = self._budget.slots() if self._standing and self._budget is not None else {}
        try:
            fleets = [
                BudgetFleet(
                    str(f["fleet"]),
                    int(f["slots"]) - _not_ours(f, own),
                    int(f["active"]),
                    int(f["slots"]) if standing else None,
                )
                for f in field(message, "fleets", list)
            ]
            specs = {str(f["fleet"]): f["spec"] for f in field(message, "fleets", list)}
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"'budget' message: {exc}") from exc
        for spec in specs.values():
            spec_from_wire(spec)  # a spec that is not one breaks the channel now, not at a call
        self._budget, self._budget_specs = Budget(fleets), specs
        self._standing, self._lone = standing, lone
        if standing:
            self._write({"op": "budget-taken"})
            log.debug(
                "standing grant budget taken",
                extra=fields(pid=self.pid, slots={f.name: f.left for f in fleets}),
            )
            return
        log.info(
            "grant budget taken: calls are granted from it until the supervisor answers again",
            extra=fields(pid=self.pid, slots={f.name: f.left for f in fleets}),
        )

    def decline_standing(self) -> None:
        """This worker takes no new calls (it stops, or drains after an
        upgrade): a standing budget would hold slots nobody uses. What is left
        of one goes back, and none is given again ("declined")."""
        if not (self.takes_standing or self.takes_lone):
            return
        self.takes_standing = self.takes_lone = False
        if self._standing:
            self._end_budget()
        self._write({"op": "budget-dropped", "declined": True})

    def _end_budget(self) -> None:
        budget, self._budget = self._budget, None
        self._budget_specs = {}
        standing, self._standing = self._standing, False
        self._lone = False
        self._gave_up_standing.clear()
        if budget is not None and standing:
            log.debug(
                "standing grant budget ended",
                extra=fields(pid=self.pid, granted=budget.granted, dropped=budget.left),
            )
        elif budget is not None:
            log.info(
                "grant budget ended: the supervisor grants again",
                extra=fields(pid=self.pid, granted=budget.granted, dropped=budget.left),
            )

    def _over(self, lease_id: int) -> asyncio.Future[FleetState] | None:
        """Lease `lease_id` is over (given up, released, refused, granted after
        it was given up): what was asked, what is held and who its call is are
        forgotten. Returns its future if it was still waited for."""
        self._asked.pop(lease_id, None)
        self._queued.pop(lease_id, None)
        self._calls.pop(lease_id, None)
        self._held.pop(lease_id, None)
        self._in_flight.discard(lease_id)
        if self.table is not None:
            self.table.over(lease_id)
        return self._pending.pop(lease_id, None)

    def _give_up(self, lease_id: int, future: asyncio.Future[FleetState]) -> None:
        self._logged_untold.discard(lease_id)  # the release says it
        recorded = self.table is not None and self.table.has(lease_id)
        self._over(lease_id)  # writes its record ENDED
        kept = False
        if future.done() and not future.cancelled() and future.exception() is None:
            kept = self._given_back(future.result())  # granted, never used: ours no more
        elif self._standing:
            self._gave_up_standing.add(lease_id)
        self._tell({"op": "release", "id": lease_id}, hold=kept and recorded)

    def _release(self, lease: RemoteLease) -> None:
        self._logged_untold.discard(lease.id)  # the release says it
        kept = self._given_back(lease.fleet)
        # Held only for a call with a record: it reads ENDED should this process
        # die first. Without one, the supervisor would write its line again.
        recorded = self.table is not None and self.table.has(lease.id)
        self._over(lease.id)  # writes its record ENDED
        hold = recorded and kept
        self._tell({"op": "release", "id": lease.id}, hold=hold)

    def _logged(self, lease_id: int) -> None:
        if self._calls.pop(lease_id, None) is not None:
            # ENDED before "logged" is held: a death now writes no second line.
            # With a record (ENDED now), told with the next write: its release
            # most often, which says it (one wake-up of the supervisor, not two).
            if self.table is not None and self.table.logged(lease_id):
                self._logged_untold.add(lease_id)
                if lease_id in self._held_acquires:
                    # Its record reads ENDED now, its slot still held (its fleet
                    # side closing): the supervisor, reading the table for the
                    # grants it was not told (a hung worker's budget taken back,
                    # a lost channel's), would count it free. Told now instead.
                    self._write(None)
                else:
                    self._flush_soon()
            else:
                self._write({"op": "logged", "id": lease_id})

    def _given_back(self, fleet: FleetState) -> bool:
        """A slot held on `fleet` is given back (released, or granted to a call
        that gave up): a fleet forgotten meanwhile is dropped with its last.
        True if it went back into a standing budget: nobody else could have
        it, so its release may wait to be told (`_tell`)."""
        fleet.active -= 1
        kept = False
        if self._budget is not None:
            kept = self._budget.give_back(fleet.name)  # nobody else grants it meanwhile
        if fleet.active == 0 and fleet.name in self._forget_when_idle:
            self._forget_fleet(fleet.name)
        return kept and self._standing

    def _tell(self, message: dict[str, Any], *, hold: bool) -> None:
        """Send `message`, or, while a standing budget stands and `hold`
        says it frees nothing for others, hold it for the next write."""
        if hold and self._standing:
            self._hold(message)
        else:
            self._write(message)

    def _hold(self, message: dict[str, Any]) -> None:
        """`message` goes first in this end's next write, or ANSWERS_FLUSH
        from now: one wake-up of the supervisor for many."""
        self._held_lines.append(encode(message))
        self._flush_soon()

    def _answered(self, lease_id: int, at: float) -> None:
        if self.table is not None:
            self.table.answered(lease_id, at)
        self._in_flight.discard(lease_id)
        self._answers.append([lease_id, at])
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_timer is None:
            wait = HELD_FLUSH_ASKED if self._held_asked else ANSWERS_FLUSH
            self._flush_timer = self._loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        if self._held_asked and self._report_timer is not None:
            # A report is due within a second: it goes now, with what was held
            # (one wake-up of the supervisor for both, at the reports' pace).
            self._cancel_report_soon()
            self._report_now()
        self._write(None)

    def send(self, message: dict[str, Any]) -> None:
        """A message of the worker's own to the supervisor (an answer to one of its ops)."""
        self._write(message)

    def send_report(self, *, final: bool = False) -> None:
        """Send what this worker has counted; `final` as it exits cleanly (then
        close): the supervisor adds it to the host's totals as the channel ends."""
        self._cancel_report_soon()
        self._write(self._report(final=final))

    def report_soon(self) -> None:
        """A count moved: send a report within `REPORT_AFTER_COUNT` (one for
        every count until then)."""
        if self._report_timer is None and self.reporter is not None and self.connected:
            self._report_timer = self._loop.call_later(REPORT_AFTER_COUNT, self._report_now)

    def _report_now(self) -> None:
        self._report_timer = None
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            # The supervisor reads nothing (stopped, or its loop held): reports
            # are cumulative, so another queued behind the last one would only
            # pile up. Try again later.
            self.report_soon()
            return
        self._write(self._report_or_failure())
        self._report_again_if_live()

    def _report_again_if_live(self) -> None:
        if self.live is not None and self.live():
            self.report_soon()

    def _cancel_report_soon(self) -> None:
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- the channel -----------------------------------------------------------

    def say_hello(self) -> None:
        """Join the coordinator (once; `connect` does it unless told not to)."""
        self._write(
            {
                "op": "hello",
                "pid": self.pid,
                "generation": self.generation,
                "answers": True,
                "forgets": True,  # it drops a fleet's record when told ("forget-fleet")
                "lists_calls": True,  # it answers "list-calls" and "end-call"
                "budgets": True,  # it grants from a budget during an exec ("budget")
                # and from a standing one ("budget" with "standing")
                **({"standing": True} if self.takes_standing else {}),
                "fleet_down": True,  # it gives up attempts on a fleet DOWN ("fleet-down")
                # a lone worker's budget: every free slot, its grants held too
                **({"lone": True} if self.takes_lone else {}),
                "tells_held": True,  # it writes what it holds back when asked ("tell-held")
                **({"tag": self.tag} if self.tag is not None else {}),
            }
        )
        held, self._held_back = self._held_back, None
        if held and self._transport is not None and not self._transport.is_closing():
            self._take(held)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Registered by number: the poll object holds no reference to the
            # socket and never closes it (the transport does).
            self._peek = select.poll()
            self._peek.register(sock.fileno(), select.POLLIN)
        if self._hello_on_connect:
            self.say_hello()

    def data_received(self, data: bytes) -> None:
        try:
            self._data_received(data)
        finally:
            if self._read_waiters:
                self._read_through()

    def _data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except WireError as exc:
            self._broken(exc)
            return
        if self._held_back is None:
            self._take(messages)
            return
        self._held_back += messages
        if len(self._held_back) > HELD_BEFORE_HELLO:
            self._broken(
                WireError(
                    f"the supervisor sent {len(self._held_back)} messages before this "
                    f"worker's hello (a few are expected, at most {HELD_BEFORE_HELLO} are "
                    "held): not this protocol"
                )
            )

    def _take(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            try:
                self._handle(message)
            except WireError as exc:
                self._broken(exc)
                return
            except Exception as exc:
                # A bug in acting on one message must not end the channel: this
                # worker would drain, its calls cut at timeouts.drain. What the
                # message asked is left undone (a report is asked again, a lease
                # not answered is given up at its answer timeout), but a `stop`:
                # the channel ends then, and the worker drains as it was told.
                count_unexpected_error()
                op = str(message.get("op"))[:40]
                log.exception(
                    "slot channel message could not be acted on: skipped; a bug, report it",
                    extra=fields(pid=self.pid, op=op),
                )
                if op == "stop":
                    self._broken(WireError(f"acting on stop failed: {exc!r}"))
                    return

    def _broken(self, exc: WireError) -> None:
        log.error("slot channel broken", extra=fields(pid=self.pid, error=str(exc)))
        if self._held_back is not None:
            self._held_back = []  # nothing of a broken channel is acted on
        assert self._transport is not None
        self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        # Held slots need no release: the coordinator reclaims them as it sees
        # this channel close, or, while this process runs on to finish its
        # calls, as it exits (or it is gone itself).
        if not self.lost.done():
            self.lost.set_result(None)
        self._peek = None  # its descriptor is closed after this
        self._cancel_flush()
        self._answers.clear()
        self._held_lines.clear()
        self._held_acquires.clear()
        self._logged_untold.clear()
        self._cancel_report_soon()
        pending, self._pending = self._pending, {}
        self._asked.clear()
        self._queued.clear()
        self._calls.clear()
        self._end_budget()
        self._read_through()
        for future in pending.values():
            if not future.done():
                future.set_exception(NoFleetAvailable(COORDINATOR_GONE))
        if pending or self.held:
            log.error(
                "slot coordinator lost",
                extra=fields(waiting=len(pending), held=self.held, error=str(exc or "")),
            )

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "sync":
            self._end_budget()  # the supervisor counts from this "state" on
            self._write(self._state())
            return
        if op == "budget":
            self._take_budget(message)
            return
        if op == "budget-end":
            # A call waits for a slot (or a budget's fleet cannot be picked):
            # what is left goes back, said after every grant made from it.
            if self._standing:
                self._end_budget()
            self._write({"op": "budget-dropped"})
            return
        if op == "tell-held":
            # After a probe: what is held goes now. From here on it may wait
            # HELD_FLUSH_ASKED, the supervisor asking when it matters.
            self._held_asked = True
            self._write(None)
            return
        if op == "report":
            self._cancel_report_soon()  # this one carries it
            report = self._report_or_failure()
            if self.calls_bytes is not None and "failed" not in report:
                # Asked (every few seconds, and at a scrape), not in the reports
                # sent within REPORT_AFTER_COUNT of a count: the lines of calls
                # lost with this worker say their bytes as of this one, "at
                # least", at a bounded cost (about 20 bytes a call).
                try:
                    report["call_bytes"] = self.calls_bytes()
                except Exception:
                    log.exception("call bytes not reported")
            self._write(report)
            self._report_again_if_live()
            return
        if op == "forget-fleet":
            self._forget_fleet(field(message, "fleet", str))
            return
        if (handler := self.handlers.get(op)) is not None:
            handler(message)
            return
        if op != "granted" and op != "refused":
            self._unknown.ignore(op, pid=self.pid)
            return
        lease_id = field(message, "id", int)
        if op == "granted":
            fleet = self._fleet(field(message, "fleet", str), message.get("spec"))
            future = self._pending.get(lease_id)
            if future is None or future.done():
                self._over(lease_id)
                if lease_id in self._gave_up_standing:
                    # Held by the supervisor as it read the release: back into
                    # its copy of the standing budget, so into ours (`_give_up`).
                    self._gave_up_standing.discard(lease_id)
                    if self._budget is not None:
                        self._budget.give_back(fleet.name)
                return  # given up on: its release is already on the wire
            del self._pending[lease_id]
            asked = self._asked.pop(lease_id, None)
            self._queued[lease_id] = _waited(message, asked)
            fleet.active += 1
            fleet.opened_total += 1
            self._held[lease_id] = fleet.name
            self._in_flight.add(lease_id)
            if self.table is not None:
                self.table.granted(lease_id, fleet.name)
            future.set_result(fleet)
        else:  # "refused"
            asked = self._asked.get(lease_id)
            future = self._over(lease_id)
            self._gave_up_standing.discard(lease_id)
            if future is not None and not future.done():
                future.set_exception(
                    NoFleetAvailable(
                        field(message, "reason", str), queued_s=_waited(message, asked)
                    )
                )

    def _state(self) -> dict[str, Any]:
        """What this worker holds and waits for: the truth the coordinator's
        table is rebuilt from after the supervisor re-executed."""
        now = time.monotonic()
        return {
            "op": "state",
            "pid": self.pid,
            "generation": self.generation,
            "answers": True,  # it says when fleets answer its calls ("answered")
            "forgets": True,  # it drops a fleet's record when told ("forget-fleet")
            "lists_calls": True,  # it answers "list-calls" and "end-call"
            "budgets": True,  # it grants from a budget during an exec ("budget")
            # and from a standing one ("budget" with "standing")
            **({"standing": True} if self.takes_standing else {}),
            "fleet_down": True,  # it gives up attempts on a fleet DOWN ("fleet-down")
            # a lone worker's budget: every free slot, its grants held too
            **({"lone": True} if self.takes_lone else {}),
            "tells_held": True,  # it writes what it holds back when asked ("tell-held")
            **({"tag": self.tag} if self.tag is not None else {}),
            "held": [[lease, name] for lease, name in self._held.items()],
            "in_flight": sorted(self._in_flight),
            "waiting": [
                [lease, avoid, round(now - since, 6)]
                for lease, (avoid, since) in self._asked.items()
            ],
            # Who each call is: the access line the supervisor writes should this
            # process die with it. An exec carries these; a supervisor started
            # after one died has them from here alone (before session 33 such a
            # call lost later had no line).
            "calls": [[lease, call] for lease, call in self._calls.items()],
        }

    def _report_or_failure(self) -> dict[str, Any]:
        try:
            return self._report(final=False)
        except Exception as exc:
            # Raised, it would close this channel and with it the worker's
            # slots; unanswered, the supervisor would take this worker for
            # hung. It answers that it could not: the previous report stands.
            log.exception("report failed: the supervisor keeps the previous one")
            return {
                "op": "report",
                "pid": self.pid,
                "generation": self.generation,
                "failed": repr(exc)[:200],
            }

    def _report(self, *, final: bool) -> dict[str, Any]:
        report: dict[str, Any] = {"started": self.started, "counts": {}}
        if self.reporter is not None:
            report.update(self.reporter())
        report.update(
            op="report", pid=self.pid, generation=self.generation, seq=next(self._reports)
        )
        report["final"] = final
        return report

    def _forget_fleet(self, name: str) -> None:
        """The fleet has left the host's set: drop this worker's record of it,
        now, or once the last slot it holds there is given back (a fleet an
        add-fleet rolled back may have been granted). Its counts leave the
        reports (its ended calls count under `ops.local_counts.REMOVED_FLEETS`):
        the report, one line, grew with every fleet name ever granted. A grant
        of that name later comes with its spec again (the coordinator forgot
        it sent it)."""
        fleet = self.fleets.get(name)
        if fleet is None:
            return
        if fleet.active:  # a slot held there still (a fleet rolled back): at its release
            self._forget_when_idle.add(name)
            return
        self._forget_when_idle.discard(name)
        del self.fleets[name]
        kept = self.forgotten
        kept[("calls",)] += fleet.calls_total
        for code, n in fleet.responses.items():
            kept[("responses", str(code))] += n
        kept[("retries",)] += fleet.retries
        kept[("redispatches",)] += fleet.redispatches
        self.report_soon()

    def _fleet(self, name: str, spec: Any) -> FleetState:
        fleet = self.fleets.get(name)
        if spec is not None:
            self._forget_when_idle.discard(name)  # granted anew: it is in the set again
            new = spec_from_wire(spec)
            if fleet is None:
                # READY whatever the file says: the coordinator grants only on a
                # READY fleet, and the call path releases a lease on any other.
                fleet = self.fleets[name] = FleetState(new)
            else:
                fleet.spec = new
        if fleet is None:
            raise WireError(f"granted fleet {name!r} without its spec")
        return fleet

    def _write(self, message: dict[str, Any] | None) -> None:
        """Send `message` (None: nothing but what follows), the fleets' answers
        not told yet going first, in the same write."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        data = b"" if message is None else encode(message)
        if self._answers:
            data = encode({"op": "answered", "leases": self._answers}) + data
            self._answers = []
        if self._logged_untold:
            # One line each: a supervisor of before this end reads them so.
            logged = b"".join(encode({"op": "logged", "id": n}) for n in self._logged_untold)
            data = logged + data
            self._logged_untold.clear()
        if self._held_lines:  # first: a held "acquire" goes before its call's "answered"
            data = b"".join(self._held_lines) + data
            self._held_lines = []
            self._held_acquires.clear()
        # Nothing is left to ride a later write: the flush armed for what went
        # (or for a "logged" a release has said since) is not needed.
        self._cancel_flush()
        if data:
            transport.write(data)

    def _cancel_flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
