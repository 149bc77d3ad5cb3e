"""Which fleet gets the next call: leastconn over eligible fleets. No I/O.

The fleets are read from their one owner, `core.fleet_set.FleetSet`; the
balancer never adds or removes one.

A fleet is eligible when its health is UP, its admin state READY, its active
calls below maxconn and, when capacity-aware, its estimated free workers
above 0. `Balancer.pick()` says which fleet, or why none: NO_FLEET_UP
(answer 503 at once) or NO_CAPACITY (the call may queue: fleets are up but
full, or not yet probed).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.full_log import FullLog
from fleet_ingress.core.health import Health
from fleet_ingress.core.probe import ProbeResult

# What a refused call is told when no fleet takes calls; `Balancer.none_up_reason`
# says why after it.
NO_FLEET_UP = "no fleet is up"
NO_FLEET_TAKES_CALLS = "no fleet takes calls"  # some left drained or in maintenance


class Verdict(enum.Enum):
    PICKED = "picked"
    NO_FLEET_UP = "no_fleet_up"
    NO_CAPACITY = "no_capacity"


# The members a pick reads, looked up once: CPython 3.11 reads a member through
# its class by EnumType's __getattr__ slot, ~900 instructions (callgrind), where a
# module's global is a dict lookup. Three a pick, one pick a call.
_UP = Health.UP
_READY = Admin.READY
_PICKED = Verdict.PICKED


class Membership(enum.Enum):
    """Where a fleet stands in the ingress's fleet set (moves: `core.fleet_set`)."""

    ADDING = "adding"  # add-fleet is bringing it in: taking calls, not yet in the file
    LISTED = "listed"
    DRAINING = "draining"  # removed: no new calls; goes once it carries none
    GONE = "gone"  # out of the set


@dataclass(slots=True)
class FleetState:
    spec: FleetSpec
    health: Health = Health.UP
    admin: Admin = Admin.READY
    membership: Membership = Membership.LISTED  # set by FleetSet alone
    active: int = 0  # calls (and call attempts) this ingress has open there
    # Slots held for workers' standing grant budgets (`core.slot_budget`,
    # `HostSlots.give_standing`): no call yet, but a worker may grant one from
    # them at any moment, unheard until its batch arrives. They count against
    # maxconn and the capacity estimate as calls would; not in `active` (what
    # stats show as the fleet's calls) nor in leastconn's count.
    standing: int = 0
    opened_total: int = 0
    # Capacity the fleet last reported, and `opened_total` when that probe was
    # sent: calls opened since then are not in the fleet's number yet.
    reported_available: int | None = None
    opened_at_probe: int = 0
    # Calls in flight: granted here and not yet answered by the fleet as far as
    # the slot owner has heard (by lease). Of those in flight when the last
    # counted probe was sent, `unseen` are the ones not known to have been
    # answered before it left: the fleet's number may leave them out, so the
    # estimate does (a call whose connection is still being set up when a probe
    # overtakes it). `_probing`: the same for a probe still out.
    pending: set[Hashable] = field(default_factory=set)
    unseen: set[Hashable] = field(default_factory=set)
    _unseen_since: float = 0.0  # when the probe behind `unseen` was sent (monotonic)
    _probing: set[Hashable] | None = None
    _probe_sent_at: float = 0.0
    _probe_overtaken: bool = False  # a 429 came while that probe was out: its number is older
    # Calls granted before the probe still out left but heard of only after it
    # (`grant_heard_late`): counted among those opened before it when it is counted.
    _probe_opened_late: int = 0
    capacity_aware: bool = True
    # When its FULL and room were last said (logged once per real change).
    full_log: FullLog = field(default_factory=FullLog)
    # Health checking (kept here so stats read one record per fleet).
    health_streak: int = 0  # consecutive probes pushing toward a change
    last_probe: ProbeResult | None = None
    last_probe_at: float | None = None  # wall clock, when its last probe ended (pass or fail)
    last_probe_monotonic: float | None = None  # the same by CLOCK_MONOTONIC (for its age)
    last_probe_seconds: float | None = None
    certificate_not_after: float | None = None  # the fleet's, as its last probe saw it
    probes_total: int = 0
    check_failures: int = 0
    # Passive health (a call's attempts): attempts in a row the fleet refused
    # while UP, whether the next probe must open a new connection, and when
    # refused attempts last took it DOWN.
    call_failures: int = 0
    fresh_probe: bool = False
    down_by_calls_at: float = 0.0  # monotonic
    # Call counters, for stats and metrics (read at scrape time).
    calls_total: int = 0  # calls tunneled to this fleet
    responses: Counter[int] = field(default_factory=Counter)  # fleet answers by status
    retries: int = 0  # failed attempts here that were tried again
    redispatches: int = 0  # ...and that went to another fleet
    # The TLS session its calls' connections offer it (net/fleet_sessions.py;
    # opaque here): dropped with this record.
    tls_session: object | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def set_admin(self, admin: Admin) -> None:
        """A fleet leaving MAINT was not probed meanwhile: what it said before is
        stale, so it starts over like a fleet just added (UP on its first passing
        probe, capacity unknown; calls wait for it)."""
        if self.admin is Admin.MAINT and admin is not Admin.MAINT:
            self.health, self.health_streak = Health.INIT, 0
            self.reported_available = None
            self.certificate_not_after = None  # seen by a probe before MAINT: stale
        self.admin = admin

    @property
    def removing(self) -> bool:
        """Removed by the operator (or a reload); goes once it carries no call."""
        return self.membership is Membership.DRAINING

    @property
    def admin_unsaved(self) -> bool:
        """Its admin state applies but the fleets file does not record it (the write
        failed, e.g. on a full disk): a restart would not keep it. `spec` is the
        fleet as the file has it."""
        return (
            self.membership is Membership.LISTED
            and not self.removing
            and self.admin is not self.spec.admin
        )

    @property
    def maxconn(self) -> int:
        return self.spec.maxconn

    @property
    def estimated_available(self) -> int | None:
        """Free workers a pick may still count on: the fleet's report less the
        calls opened since and the slots reserved for workers' budgets (a
        worker may grant a call from them without asking)."""
        free = self.estimated_free
        return None if free is None else free - self.standing

    @property
    def estimated_free(self) -> int | None:
        """The fleet's free workers as an operator reads them: its report less
        the calls opened since. Slots reserved for workers' budgets are not
        taken from it: they are no call, and a lone worker's budget reserves
        every free slot (what `stat`, the stats pages, the metrics and the
        "fleet full" log line go by)."""
        if self.reported_available is None:
            return None
        opened_since = self.opened_total - self.opened_at_probe
        return self.reported_available - opened_since - len(self.unseen)

    def probe_sending(self, now: float) -> int:
        """A probe leaves now (monotonic): what it counts is set against the
        calls opened (returned: `opened_total`) and in flight now."""
        self._probing = set(self.pending)
        self._probe_sent_at = now
        self._probe_overtaken = False
        self._probe_opened_late = 0
        return self.opened_total

    def probe_counted(self, capacity: int | None, opened_before: int) -> None:
        """A probe sent when `opened_total` was `opened_before` says `capacity`
        workers are free: the estimate starts over from it. Not if a `429`
        came while it was out (`said_full`): FULL stands until the next one."""
        probing, self._probing = self._probing, None
        late, self._probe_opened_late = self._probe_opened_late, 0
        if self._probe_overtaken:
            self._probe_overtaken = False
            return
        self.reported_available = capacity
        self.opened_at_probe = opened_before + late
        self.unseen = probing if probing is not None else set()
        self._unseen_since = self._probe_sent_at

    def lease_answered(self, key: Hashable, at: float) -> None:
        """The fleet answered the call of lease `key` (its `101` read at `at`,
        monotonic): no longer in flight. Answered before a probe left, it is in
        that probe's number (the fleet took it before it answered the probe)."""
        self.pending.discard(key)
        if self._probing is not None and at < self._probe_sent_at:
            self._probing.discard(key)
        if at < self._unseen_since:
            self.unseen.discard(key)

    def grant_heard_late(self, key: Hashable | None, at: float) -> None:
        """A call granted on this fleet at `at` (monotonic, this host's clock)
        by a worker from its budget is heard of only now, `open` just counted
        (a lone worker holds its "acquire" for its next write, ANSWERS_FLUSH
        at most). A probe sent after `at` may count it in its number (the
        fleet took it): for that probe it is one of the calls opened before it,
        as if heard then, and in flight then (`key` left out of the estimate,
        as `probe_sending` leaves out the calls in flight, until its 101 is
        told with a time before the probe). Before, it was counted as opened
        since that probe on top of the fleet's own count of it: the estimate
        read low by each call granted in the ANSWERS_FLUSH before a probe
        (FULL early: calls queued or refused while the fleet had room) until
        the next probe. `key` None: its worker does not say when fleets answer."""
        if self.reported_available is not None and at < self._unseen_since:
            self.opened_at_probe += 1
            if key is not None:
                self.unseen.add(key)
        if self._probing is not None and at < self._probe_sent_at:
            self._probe_opened_late += 1
            if key is not None:
                self._probing.add(key)

    def lease_restored_in_flight(self, key: Hashable) -> None:
        """Lease `key`, carried over a re-execution, whose call the fleet had not
        answered when its worker said what it holds: in flight, and left out of
        the estimate from the probe counted last and from one still out (it was
        granted before either left, so either may have missed it), until its
        holder says when the fleet answered it or it ends."""
        self.pending.add(key)
        self.unseen.add(key)
        if self._probing is not None:
            self._probing.add(key)

    def lease_restored_unseen(self, key: Hashable) -> None:
        """Lease `key`, carried over a re-execution, that the estimate left out
        then (`left_out`: in flight when the probe behind it left) and whose
        call the fleet has answered since, at a time not known here (during
        the exec, its "answered" read by nobody): still left out of the
        estimate from the probe counted last and from one still out, as either
        may predate the answer. Before, the new image took the fleet's number
        for one that counted the call: a call answered during the exec was a
        free worker until the next probe, and the calls queued meanwhile went
        to a full fleet and its 429 (session 41's upgrade under load). A probe
        sent from now on counts it: it is not in flight."""
        self.unseen.add(key)
        if self._probing is not None:
            self._probing.add(key)

    def left_out(self, key: Hashable) -> bool:
        """Lease `key` is left out of the estimate: the probe counted last, or
        one still out, was sent while its call was in flight (and may have
        missed it), and it has not ended since."""
        return key in self.unseen or (self._probing is not None and key in self._probing)

    def lease_ended(self, key: Hashable) -> None:
        """Lease `key` is given back (or its holder can no longer tell): not in flight."""
        self.pending.discard(key)
        if self._probing is not None:
            self._probing.discard(key)
        self.unseen.discard(key)

    def call_unreachable(self, fall: int, now: float, *, refused: bool = True) -> bool:
        """A call's attempt could not connect. The probe may pass on a
        connection kept open from before (a fleet taking no new connection, or
        serving a bad certificate on new ones) while leastconn favours this
        fleet, which holds no call: so its next probe opens a new connection,
        and `fall` connections in a row that the fleet `refused` (TCP refused
        or reset, TLS failed: its own answer) take an UP fleet DOWN at once, as
        that many failed probes would. A connection, not an attempt: an attempt
        whose connection offering a kept TLS session was reset and whose
        reconnect without it failed too counts two (net/fleet_sessions.py).
        One that timed out (`timeouts.connect`) only asks for the new
        connection: this host's own stall (its event loop blocked past the
        timer) looks the same, and must not take healthy fleets DOWN; the
        probe tells. It rises again by its probes (`rise`), each on a new
        connection while DOWN, none sent before `now` (monotonic) counted
        (`probe_predates_down`). `fall` 0: not observed (no probe would ever
        bring it back). True if it went DOWN now."""
        if fall < 1:
            return False
        self.fresh_probe = True
        if not refused or self.health is not Health.UP:
            return False
        self.call_failures += 1
        if self.call_failures < fall:
            return False
        self.health, self.health_streak = Health.DOWN, 0
        self.reported_available = None  # as a DOWN fleet's: no longer known
        self.call_failures = 0
        self.down_by_calls_at = now
        return True

    def call_connected(self) -> None:
        """A call's attempt reached the fleet (it answered: 101, or 429): the
        streak of refused attempts ends."""
        self.call_failures = 0

    def probe_predates_down(self, sent_at: float) -> bool:
        """A probe sent at `sent_at` (monotonic) left before calls took the fleet
        DOWN: its pass may come over the old kept-alive connection, and does not
        count toward `rise`."""
        return sent_at < self.down_by_calls_at

    def said_full(self) -> bool:
        """The fleet answered a call `429`: no worker free now, in its own word,
        as a probe reporting 0 would say (SPEC 4: FULL at once). Until its next
        probe, no new call is sent there to get the same answer: not the next
        probe's if it was already out (its number may be older). True if that is
        news (the fleet's last number, less the calls opened since, said room);
        nothing when capacity is not tracked (not capacity-aware, or no probe
        has reported: no probe would ever lift it). It holds even when calls in
        flight (`unseen`) already made the fleet read FULL: they end on their own."""
        if not self.capacity_aware or self.reported_available is None:
            return False
        news = self.reported_available > self.opened_total - self.opened_at_probe
        self.reported_available = 0
        self.opened_at_probe = self.opened_total
        if self._probing is not None:
            self._probe_overtaken = True
        return news

    @property
    def full(self) -> bool:
        """The fleet's own word says no worker is free (SPEC 4: FULL)."""
        estimate = self.estimated_available
        return self.capacity_aware and estimate is not None and estimate <= 0

    @property
    def out_of_workers(self) -> bool:
        """The fleet's own word, as an operator reads it, says no worker is free
        (SPEC 4: FULL): `full` but for slots reserved for workers' budgets."""
        estimate = self.estimated_free
        return self.capacity_aware and estimate is not None and estimate <= 0

    @property
    def up(self) -> bool:
        return self.health is _UP and self.admin is _READY

    @property
    def has_room(self) -> bool:
        """A pick may choose it: below maxconn and not FULL, counting slots
        reserved for workers' budgets as taken."""
        if self.active + self.standing >= self.spec.maxconn:
            return False
        available = self.reported_available
        if not self.capacity_aware or available is None:
            return True
        # Not FULL: `estimated_available` above 0, spelt out here (a pick reads
        # this of every fleet UP; through `full` it was four Python calls).
        opened_since = self.opened_total - self.opened_at_probe
        return available - opened_since - len(self.unseen) - self.standing > 0

    @property
    def takes_calls(self) -> bool:
        """It takes new calls now, as an operator reads it (stats' and the
        metrics' `eligible`, the status line): UP and READY, below maxconn and
        not FULL, slots reserved for workers' budgets being room (a worker
        grants calls from them)."""
        return self.up and self.active < self.maxconn and not self.out_of_workers


@dataclass(slots=True)
class Pick:
    verdict: Verdict
    fleet: FleetState | None = None


class Members(Protocol):
    """The fleets to pick from, as their owner (`FleetSet`) has them now."""

    @property
    def fleets(self) -> Sequence[FleetState]: ...


@dataclass
class Balancer:
    members: Members
    _next: int = 0  # round-robin cursor for ties

    @property
    def fleets(self) -> Sequence[FleetState]:
        return self.members.fleets

    @property
    def starting(self) -> bool:
        """Some fleet that could take calls has not had its first verdict yet."""
        return any(f.health is Health.INIT and f.admin is Admin.READY for f in self.fleets)

    @property
    def may_serve(self) -> bool:
        """Some fleet is UP and READY, or may soon be: queueing can pay off."""
        return self.starting or any(f.up for f in self.fleets)

    def none_up_reason(self) -> str:
        """Why no fleet takes calls, by count (no fleet's name: the 503 that
        says it goes to the carrier), e.g. ``no fleet takes calls (2 drained, 1
        down)``; ``no fleet is up (2 down)`` when health alone is why (an operator
        reading "is up" looks at health, not at the fleets left drained). An
        operator's state is named before health: a drained fleet that is also
        DOWN counts as drained."""
        counts = {"drained": 0, "in maintenance": 0, "down": 0}
        for f in self.fleets:
            if f.admin is Admin.DRAIN:
                counts["drained"] += 1
            elif f.admin is Admin.MAINT:
                counts["in maintenance"] += 1
            elif f.health is Health.DOWN:
                counts["down"] += 1
            # (A READY fleet not probed yet is never here: calls wait for its verdict.)
        parts = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        by_operator = counts["drained"] or counts["in maintenance"]
        return (
            f"{NO_FLEET_TAKES_CALLS if by_operator else NO_FLEET_UP} ({parts or 'none configured'})"
        )

    def get(self, name: str) -> FleetState | None:
        return next((f for f in self.fleets if f.name == name), None)

    def pick(self, avoid: Collection[str] = ()) -> Pick:
        """The eligible fleet with the fewest active calls, preferring fleets
        not in `avoid` (already tried for this call); ties go round-robin."""
        # One pass (a pick per slot the host grants: the supervisor's own work
        # per call, bench/supervisor_instructions.py): of the UP fleets with
        # room, the least (tried already, active calls, place after the
        # round-robin cursor): fresh before tried, then fewest calls, then the
        # next in turn.
        fleets = self.members.fleets
        n = len(fleets)
        any_up = False
        chosen: FleetState | None = None
        chosen_at = 0
        best: tuple[bool, int, int] | None = None
        for i, f in enumerate(fleets):
            if f.health is not _UP or f.admin is not _READY:  # `up`, spelt out
                continue
            any_up = True
            if not f.has_room:
                continue
            key = (f.spec.name in avoid, f.active, (i - self._next) % n)
            if best is None or key < best:
                chosen, chosen_at, best = f, i, key
        if chosen is None:
            if any_up:
                return Pick(Verdict.NO_CAPACITY)
            # A fleet not yet probed (just started, just added) may be UP in a
            # moment: worth queueing for, not a reason to refuse at once.
            return Pick(Verdict.NO_CAPACITY if self.starting else Verdict.NO_FLEET_UP)
        self._next = (chosen_at + 1) % n
        return Pick(_PICKED, chosen)

    def open(self, fleet: FleetState, lease: Hashable | None = None) -> None:
        """A slot taken on `fleet`; `lease`: its key, in flight until its holder
        says the fleet answered (`FleetState.lease_answered`), if it will say."""
        fleet.active += 1
        fleet.opened_total += 1
        if lease is not None:
            fleet.pending.add(lease)

    def close(self, fleet: FleetState, lease: Hashable | None = None) -> None:
        if fleet.active <= 0:
            raise RuntimeError(f"fleet {fleet.name}: close() without a matching open()")
        fleet.active -= 1
        if lease is not None:
            fleet.lease_ended(lease)
