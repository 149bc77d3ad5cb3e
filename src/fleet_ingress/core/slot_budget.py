"""Grant budgets: slots a worker may grant itself while the supervisor re-executes. No I/O.

While the supervisor is away (an upgrade's exec: the new image's imports,
then its table rebuilt from the workers), nobody grants slots, and a call
that arrives waits in its worker: 0.6 s to several seconds on a loaded host
(bench/reexec_gap.py), which a carrier with a short timeout may not wait.

So at the hand-over the supervisor splits, between the workers that take
calls, each fleet's free slots (`share`), and tells each worker its share
(a "budget"). Until the next image (or this one, the exec failed) asks it
what it holds ("sync"), a worker grants a call from its budget at once
(`Budget.take`, leastconn among the fleets it has budget on, as
`Balancer.pick`), and says those leases in its "state" like any other:
the table rebuilt from the states counts them. A slot it gives back
meanwhile (a call ended) is its own to grant again (`Budget.give_back`):
nobody else grants it, and its "state" no longer names it. What is left at
"sync" is dropped.

maxconn holds host-wide at every moment: the shares of a fleet sum to at
most its free slots when nothing else is granted (the table is not served
from the hand-over to the rebuild), and a worker slow to say what it holds
is counted for its share on top of what it held (`HostSlots.count_budget`),
an upper bound like the rest of its reserve (a slot it gave back and
granted again is in what it held).

Only when nobody waits (the host's queue is empty: a budget would let a new
call overtake one queued, and the queue is FIFO), and only on a fleet that
`Balancer.pick` could pick now: UP and READY (not MAINT, not DRAIN), not
being removed, with room (below maxconn and not FULL by its own word).

Standing budgets (protocol "standing": true in a worker's hello, session 43):
the same budget outside an exec, so that a call of the common case costs the
supervisor no wake-up of its own. While nobody waits in the host's queue, a
worker that says it can is given `standing_share` of each fleet, reserved in
the table (`FleetState.standing`: counted against maxconn and the capacity
estimate as calls, `HostSlots.give_standing`); it grants calls from it at once
and tells what it did in batches (its "acquire"s marked "budget", its
releases, riding its next write or sent `slot_client.ANSWERS_FLUSH` after).
Both ends keep the same `Budget` in the same order (one stream): a slot given
back goes back into it, up to the size it was given (`BudgetFleet.most`: a
worker's calls beyond it are asked of the supervisor, their slots given back
to the host). When a call must wait in the queue, or a budget's fleet can no
longer be picked, the supervisor takes every budget back ("budget-end"); the
worker drops what is left and says so ("budget-dropped"), and only then are
those slots free (`HostSlots.drop_standing`): the queue stays FIFO but for the
calls granted while "budget-end" was on its way (one round trip).

A lone worker's budget (session 46, `standing_share(lone=True)`): while one
worker is the only one it is given every free slot (no share kept back), and
it ends as soon as another worker joins (`HostSlots.end_standing(lone=...)`),
the others' messages parked until it is dropped (`net.slot_server`).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

from fleet_ingress.core.balancer import FleetState

WorkerKey = Hashable


def free_slots(fleet: FleetState) -> int:
    """Calls `fleet` may take now, as `Balancer.pick` judges room: below maxconn
    and, when the fleet reports its capacity, below its estimated free workers.
    0 for a fleet pick would not choose (not UP and READY, being removed)."""
    if not fleet.up or fleet.removing:
        return 0
    free = fleet.maxconn - fleet.active - fleet.standing
    estimate = fleet.estimated_available if fleet.capacity_aware else None
    if estimate is not None:
        free = min(free, estimate)
    return max(0, free)


def share(
    fleets: Sequence[FleetState], workers: Sequence[WorkerKey], *, queue_length: int
) -> dict[WorkerKey, dict[str, int]]:
    """Each worker's budget, fleet name -> slots: every fleet's free slots
    split evenly, the odd ones over turns that start one worker on per fleet
    (so that many fleets with one free slot each spread over the workers).
    The shares of a fleet sum to at most its free slots. Nothing at all while
    a call waits in the queue (`queue_length`). A worker with no share is left out."""
    budgets: dict[WorkerKey, dict[str, int]] = {}
    if queue_length or not workers:
        return budgets
    n = len(workers)
    turn = 0
    for fleet in fleets:
        free = free_slots(fleet)
        if free <= 0:
            continue
        each, odd = divmod(free, n)
        for i in range(n):
            slots = each + (1 if (i - turn) % n < odd else 0)
            if slots:
                budgets.setdefault(workers[i], {})[fleet.name] = slots
        turn = (turn + odd) % n
    return budgets


# The most slots of one fleet a worker's standing budget holds: its calls in
# flight or live there beyond it are asked of the supervisor (a round trip, as
# without a budget). Reserved slots are room the other workers' calls do not
# see (each share leaves them more than it takes: `standing_share`).
STANDING_MOST = 64


def _divide(takers: int, lone: bool) -> int:
    """What a fleet's free slots are divided by for one worker's standing
    budget: the takers plus a share kept for calls asked of the supervisor;
    1 for a lone worker's (it is the only one: every call is its own)."""
    return 1 if lone else max(takers, 1) + 1


def standing_share(
    fleets: Sequence[FleetState],
    takers: int,
    *,
    queue_length: int,
    most: int | None = STANDING_MOST,
    lone: bool = False,
) -> dict[str, int]:
    """One worker's standing budget, fleet name -> slots: of each fleet pick
    could choose now (`free_slots`), at most `most` (None: no bound), and at
    most its free slots over `takers` + 1 (the workers that hold or may be
    given standing budgets, plus a share left for calls asked of the
    supervisor): never all of a fleet's room. `lone` (session 46): the only
    worker's, every free slot of each fleet (nobody else asks; the budget
    ends before anyone else is granted). Nothing while a call waits in the
    queue (FIFO)."""
    if queue_length:
        return {}
    divide = _divide(takers, lone)
    budget: dict[str, int] = {}
    for fleet in fleets:
        slots = free_slots(fleet) // divide
        if most is not None:
            slots = min(most, slots)
        if slots > 0:
            budget[fleet.name] = slots
    return budget


def standing_ends(fleet: FleetState, *, lone: bool = False) -> bool:
    """A standing budget on `fleet` must be taken back: pick would not choose
    it for a new call (DOWN, MAINT, DRAIN, being removed, FULL by its own
    word, its reserved slots counted), or its calls and reserved slots are
    past its maxconn (a reload lowered it).

    `lone`: a lone worker's budget holds every free slot, so the fleet reads
    FULL with it counted from the start: it ends when the fleet is FULL
    by its own word with the reserve left out (a 429, a probe saying no
    worker free), or when the estimate of its free workers has fallen below
    what is reserved (a probe counted fewer than the budget holds)."""
    if not fleet.up or fleet.removing or fleet.active + fleet.standing > fleet.maxconn:
        return True
    if not lone:
        return fleet.full
    estimate = fleet.estimated_available
    if not fleet.capacity_aware or estimate is None:
        return False
    return estimate < 0 or estimate + fleet.standing <= 0


def standing_misses(
    fleets: Sequence[FleetState],
    held: Collection[str],
    takers: int,
    *,
    fleets_most: int | None = None,
    lone: bool = False,
) -> bool:
    """A standing budget holding fleets `held` must be taken back to be given
    anew: a fleet pick could choose now that a share would give slots to
    (`standing_share` over `takers`) is not in it (it came UP, out of MAINT or
    DRAIN, was added, or has room again). Kept, the worker would grant every
    call from the fleets it holds while the one left out, with fewer calls,
    got only those asked of the supervisor: leastconn broken for as long as
    the budget stood. Never once the budget names `fleets_most` fleets (the
    most one holds: a share names no more). `lone`: as `standing_share`'s."""
    if fleets_most is not None and len(held) >= fleets_most:
        return False
    divide = _divide(takers, lone)
    return any(f.name not in held and free_slots(f) // divide > 0 for f in fleets)


@dataclass(slots=True)
class BudgetFleet:
    """One fleet of a worker's budget: slots left, and the host's calls there
    as the supervisor counted them at the hand-over plus this worker's own
    grants since (for leastconn; other workers' grants are not known here)."""

    name: str
    left: int
    active: int
    # The most slots left it may hold (a standing budget: the size it was
    # given); None: a slot given back always goes back (an exec's budget).
    most: int | None = None


class Budget:
    """A worker's budget, from "budget" to "sync": `take` a fleet for a call."""

    __slots__ = ("_fleets", "_next", "granted")

    def __init__(self, fleets: Sequence[BudgetFleet]) -> None:
        self._fleets = [f for f in fleets if f.left > 0]  # `give_back` may add to them
        self._next = 0  # round-robin cursor for ties, as Balancer's
        self.granted = 0  # slots taken from it

    @property
    def left(self) -> int:
        return sum(f.left for f in self._fleets)

    def take(self, avoid: Collection[str] = ()) -> str | None:
        """The fleet to grant a call on now, its slot taken from the budget:
        the one with the fewest calls, fresh before tried (`avoid`), ties in
        turn, as `Balancer.pick`. None when no slot is left (the call waits
        for the supervisor, as without a budget)."""
        fleets = self._fleets
        n = len(fleets)
        chosen: BudgetFleet | None = None
        chosen_at = 0
        best: tuple[bool, int, int] | None = None
        for i, f in enumerate(fleets):
            if f.left <= 0:
                continue
            key = (f.name in avoid, f.active, (i - self._next) % n)
            if best is None or key < best:
                chosen, chosen_at, best = f, i, key
        if chosen is None:
            return None
        self._next = (chosen_at + 1) % n
        chosen.left -= 1
        chosen.active += 1
        self.granted += 1
        return chosen.name

    def untake(self, name: str) -> None:
        """The slot of fleet `name` just taken (`take`) is not granted after
        all (the worker's record of that fleet says it takes no call now):
        left as it was before, but for the turn of ties."""
        for f in self._fleets:
            if f.name == name:
                f.left += 1
                f.active = max(0, f.active - 1)
                self.granted -= 1
                return

    def take_named(self, name: str) -> bool:
        """A slot of fleet `name` taken from the budget (the supervisor's copy
        of a worker's standing budget, as its "acquire" says the fleet): False
        when it has none left there."""
        for f in self._fleets:
            if f.name == name and f.left > 0:
                f.left -= 1
                f.active += 1
                self.granted += 1
                return True
        return False

    def give_back(self, name: str) -> bool:
        """A slot this worker held on fleet `name` was given back (a call
        ended, from the budget or granted before): its own again, as nobody
        else grants it meanwhile (the supervisor counts from the worker's
        "state", which no longer names it). Not for a fleet not in the budget
        (judged not to take calls at the hand-over), nor past its `most`.
        True if it went back into the budget (else it is the host's again)."""
        for f in self._fleets:
            if f.name == name:
                f.active = max(0, f.active - 1)
                if f.most is not None and f.left >= f.most:
                    return False
                f.left += 1
                return True
        return False

    def cut(self, kept: Mapping[str, int]) -> dict[str, int]:
        """Of each fleet, at most `kept` (fleet name -> slots) left: the rest
        taken back (a lone budget its worker did not drop in time). Returns
        the slots taken, by fleet. What its worker gives back later still goes
        back into it, up to `most` as before."""
        taken: dict[str, int] = {}
        for f in self._fleets:
            keep = min(f.left, max(0, kept.get(f.name, 0)))
            if f.left > keep:
                taken[f.name] = f.left - keep
                f.left = keep
        return taken

    def slots(self) -> dict[str, int]:
        """Slots left, by fleet (those with none left too)."""
        return {f.name: f.left for f in self._fleets}
