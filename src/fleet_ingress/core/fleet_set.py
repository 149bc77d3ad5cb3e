"""Which fleets the ingress has, and each one's membership. No I/O.

All fleet membership lives here: the list the balancer picks from is this
set's, and a record enters it, drains and leaves it only through the moves
below, whichever asked (a reload, add-fleet, remove-fleet, a call's end).

    (start, reload) ----------> LISTED
    (add-fleet) --------------> ADDING
    ADDING   --finish adding--> LISTED    its line is in the fleets file
    ADDING   --roll back------> GONE      never UP, the file refused it, or cancelled
    LISTED   --remove---------> DRAINING  unlisted by a reload, moved, or remove-fleet
    DRAINING --remove---------> DRAINING  removed again: nothing more to do
    DRAINING --list again-----> LISTED    a reload lists it again before it has gone
    DRAINING --reap-----------> GONE      its last call has ended
    (an upgrade's exec) ------> DRAINING  removed in the previous image, calls left on it

A DRAINING fleet is always in admin DRAIN (no new call goes to it) and
refuses any other admin state. An illegal move raises `MembershipError`
naming the fleet, its membership and the move.

`apply(specs)` is a reload: it makes the moves the new fleets file asks for
and returns a `ReloadPlan` saying what changed, for the service to carry
out (start and stop probes, forget metrics, wake the queue) and to report.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fleet_ingress.core.addresses import same_host_key
from fleet_ingress.core.balancer import FleetState, Membership
from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.health import Health


class Move(enum.Enum):
    FINISH_ADDING = "finish adding"
    ROLL_BACK = "roll back"
    REMOVE = "remove"
    LIST_AGAIN = "list again"
    REAP = "reap"


TRANSITIONS: dict[Membership, dict[Move, Membership]] = {
    Membership.ADDING: {Move.FINISH_ADDING: Membership.LISTED, Move.ROLL_BACK: Membership.GONE},
    Membership.LISTED: {Move.REMOVE: Membership.DRAINING},
    Membership.DRAINING: {
        Move.REMOVE: Membership.DRAINING,
        Move.LIST_AGAIN: Membership.LISTED,
        Move.REAP: Membership.GONE,
    },
    Membership.GONE: {},
}


class MembershipError(Exception):
    """A move the membership table does not allow (a bug, not an operator's mistake)."""


class Refused(Exception):
    """A change an operator asked for that the set refuses; the message names the
    thing and the fix."""


class NoSuchFleet(Refused):
    pass


class FleetBeingAdded(Refused):
    pass


class FleetExists(Refused):
    pass


class LastFleet(Refused):
    pass


class StaysInDrain(Refused):
    pass


@dataclass
class ReloadPlan:
    """What a reload changed, in the order it happened."""

    notes: list[str] = field(default_factory=list)  # for the operator, one a change
    added: list[FleetState] = field(default_factory=list)  # new records: start probing them
    # Drained with no call left, out of the set now: stop probing them at once, before
    # a record of the same name (moved to a new address) starts probing.
    gone: list[FleetState] = field(default_factory=list)
    drained: list[FleetState] = field(default_factory=list)  # unlisted or moved: draining
    relisted: list[FleetState] = field(default_factory=list)  # listed again while draining
    changed: list[FleetState] = field(default_factory=list)  # maxconn or admin state
    # Moved to a new address while the old one still carries calls: added when the
    # old record goes (`FleetSet.join_waiting`), not by another reload.
    waiting: list[FleetSpec] = field(default_factory=list)


class FleetSet:
    """The fleets in the ingress (ADDING, LISTED, DRAINING), in the order they came."""

    def __init__(self, fleets: Iterable[FleetState] = ()) -> None:
        self._fleets: list[FleetState] = []
        # A fleet moved to a new address by the last reload while its old record still
        # carries calls: joins at the new address once the old record has gone.
        self._waiting: dict[str, FleetState] = {}
        for fleet in fleets:
            self._enter(fleet, Membership.LISTED)

    @classmethod
    def from_specs(
        cls,
        specs: Iterable[FleetSpec],
        *,
        capacity_aware: bool = True,
        health: Health = Health.UP,
    ) -> FleetSet:
        """`health` is where fleets start: INIT when probes will judge them,
        UP when nothing probes them (every fleet then counts as up)."""
        return cls(
            FleetState(spec, health=health, admin=spec.admin, capacity_aware=capacity_aware)
            for spec in specs
        )

    @property
    def fleets(self) -> Sequence[FleetState]:
        return self._fleets

    def get(self, name: str) -> FleetState | None:
        return next((f for f in self._fleets if f.name == name), None)

    @property
    def adding(self) -> set[str]:
        return {f.name for f in self._fleets if f.membership is Membership.ADDING}

    # -- what operators ask for (admin state, add-fleet, remove-fleet) ---------------------

    def member(self, name: str) -> FleetState:
        """The fleet an operator's change names: one in the set that is not being added."""
        fleet = self.get(name)
        if fleet is None:
            known = ", ".join(f.name for f in self._fleets) or "none"
            raise NoSuchFleet(f"no fleet named {name!r} (fleets: {known})")
        if fleet.membership is Membership.ADDING:
            raise FleetBeingAdded(
                f"fleet {name!r} is being added; try again once add-fleet has finished"
            )
        return fleet

    def set_admin(self, fleet: FleetState, admin: Admin) -> None:
        if fleet.membership is Membership.DRAINING and admin is not Admin.DRAIN:
            raise StaysInDrain(f"fleet {fleet.name!r} is being removed; it stays in DRAIN")
        fleet.set_admin(admin)

    def check_new(self, spec: FleetSpec) -> None:
        """A fleet may join only under a new name, at an address no other fleet has."""
        for other in self._fleets:
            if other.name == spec.name:
                raise FleetExists(f"a fleet named {spec.name!r} exists already{_why_there(other)}")
            # One host in two spellings (0x7f.0.0.1 and 127.0.0.1) would get two
            # maxconn budgets, twice its calls.
            if (same_host_key(other.spec.host), other.spec.port) == (
                same_host_key(spec.host),
                spec.port,
            ):
                written = f" ({other.spec.url})" if other.spec.url != spec.url else ""
                raise FleetExists(
                    f"{spec.url} is already in the ingress as fleet {other.name!r}{written}"
                    + (
                        _why_there(other)
                        or "; a host is listed once, with one maxconn: for more calls on it, "
                        "raise its maxconn= in the fleets file and reload"
                    )
                )

    def add(self, spec: FleetSpec, *, capacity_aware: bool) -> FleetState:
        """add-fleet brings `spec` in: in the balancer (probed, taking calls once UP),
        not yet in the fleets file; a reload leaves it alone until `added` or
        `roll_back`."""
        self.check_new(spec)  # again: another add may have come in while this one probed
        fleet = FleetState(
            spec, health=Health.INIT, admin=spec.admin, capacity_aware=capacity_aware
        )
        self._enter(fleet, Membership.ADDING)
        return fleet

    def added(self, fleet: FleetState) -> None:
        self._move(fleet, Move.FINISH_ADDING)

    def roll_back(self, fleet: FleetState) -> None:
        self._move(fleet, Move.ROLL_BACK)

    def check_removable(self, fleet: FleetState) -> None:
        staying = [f for f in self._fleets if not f.removing and f is not fleet]
        if not fleet.removing and not staying:
            raise LastFleet(
                f"fleet {fleet.name!r} is the last fleet: without one every call gets 503, "
                "and `fleet-ingress check` (run before every start and reload) fails; add its "
                "replacement first (fleet-ingress add-fleet URL), then remove it"
            )

    def remove(self, fleet: FleetState) -> bool:
        """Drain `fleet`: no new call goes to it, it goes at its last call. True when it
        has gone already (it carried none)."""
        self._move(fleet, Move.REMOVE)
        # Through set_admin: out of MAINT, what its last probe before it said is
        # stale (health, free count, certificate's expiry), as at any leaving.
        fleet.set_admin(Admin.DRAIN)
        return self.reap(fleet)

    def reap(self, fleet: FleetState) -> bool:
        """Take a draining fleet out once it carries no call; True when it went now.
        Called whenever a slot is given back, on any fleet: otherwise nothing to do."""
        if fleet.membership is Membership.DRAINING and fleet.active == 0:
            self._move(fleet, Move.REAP)
            return True
        return False

    def carry_removing(self, spec: FleetSpec, *, capacity_aware: bool) -> FleetState | None:
        """A fleet the previous image was removing (out of the fleets file, calls
        still on it) enters again, draining: its calls count against its maxconn
        (the workers' accounts name it), it takes no new one, and it goes with
        its last call. None when a fleet of that name is in the set already, at
        that address.

        The file listing it at another address is a move a reload made before
        the exec: as in the previous image, the old address drains (the calls
        there are counted against it, and its carried state is its own) and the
        new one waits to join until the old goes (`join_waiting`). Before, the
        new address took the old one's DRAIN and kept it."""
        listed = self.get(spec.name)
        if listed is not None:
            if _address(listed.spec) == _address(spec) or listed.membership is not (
                Membership.LISTED
            ):
                return None
            # Just read from the file, it carries nothing yet: it waits as it is.
            del self._fleets[next(i for i, f in enumerate(self._fleets) if f is listed)]
            self._waiting[spec.name] = listed
        fleet = FleetState(
            spec, health=Health.INIT, admin=Admin.DRAIN, capacity_aware=capacity_aware
        )
        self._enter(fleet, Membership.DRAINING)
        return fleet

    def join_waiting(self, name: str) -> FleetState | None:
        """The old record of `name` has gone: the fleet a reload moved to a new address
        joins there now (start probing it). None when nothing waits, or when the name
        was taken meanwhile (add-fleet)."""
        fleet = self._waiting.pop(name, None)
        if fleet is None or self.get(name) is not None:
            return None
        self._enter(fleet, Membership.LISTED)
        return fleet

    # -- a reload ------------------------------------------------------------------------

    def apply(
        self, specs: Iterable[FleetSpec], *, capacity_aware: bool, health: Health
    ) -> ReloadPlan:
        """Make the set what the fleets file lists: new fleets join (at `health`),
        unlisted ones drain, a fleet at a new address drains at the old one and
        joins at the new one, maxconn and an operator's edit of an admin state
        apply at once. Fleets add-fleet is bringing in are left alone: it writes
        their line once they are UP."""
        plan = ReloadPlan()
        self._waiting.clear()  # this reload says anew what waits
        wanted = {spec.name: spec for spec in specs}
        for fleet in list(self._fleets):
            fleet.capacity_aware = capacity_aware
            if fleet.membership is Membership.ADDING:
                wanted.pop(fleet.name, None)
                continue
            spec = wanted.pop(fleet.name, None)
            if spec is None or _address(spec) != _address(fleet.spec):
                if not fleet.removing:
                    plan.drained.append(fleet)
                    plan.notes.append(f"fleet {fleet.name} removed: draining {fleet.active} calls")
                    if self.remove(fleet):
                        plan.gone.append(fleet)
                if spec is not None:
                    wanted[spec.name] = spec  # moved: a new fleet of the same name
                continue
            changed = spec.maxconn != fleet.spec.maxconn
            if changed:
                plan.notes.append(f"fleet {fleet.name}: maxconn {fleet.maxconn} -> {spec.maxconn}")
            # The file's admin state applies when the file changed it (an operator's
            # edit); otherwise the live state stays (it was saved to the file).
            edited = spec.admin is not fleet.spec.admin and spec.admin is not fleet.admin
            if fleet.removing:  # listed again while it drained: it stays
                self._move(fleet, Move.LIST_AGAIN)
                fleet.set_admin(spec.admin)
                plan.relisted.append(fleet)
                plan.notes.append(f"fleet {fleet.name} listed again: kept, {spec.admin.value}")
            elif edited:
                plan.notes.append(
                    f"fleet {fleet.name}: admin {fleet.admin.value} -> {spec.admin.value}"
                )
                fleet.set_admin(spec.admin)
                changed = True
            if changed:
                plan.changed.append(fleet)
            fleet.spec = spec
        for spec in wanted.values():
            if self.get(spec.name) is not None:
                plan.waiting.append(spec)
                self._waiting[spec.name] = FleetState(
                    spec, health=health, admin=spec.admin, capacity_aware=capacity_aware
                )
                # With what it joins: an edit of it meanwhile (maxconn, admin) is
                # said, where `stat` shows the old record until the join.
                plan.notes.append(
                    f"fleet {spec.name}: still draining its old address; joins at the new "
                    f"one ({spec.url}, maxconn {spec.maxconn}, {spec.admin.value}) when its "
                    "last call there ends"
                )
                continue
            fleet = FleetState(spec, health=health, admin=spec.admin, capacity_aware=capacity_aware)
            self._enter(fleet, Membership.LISTED)
            plan.added.append(fleet)
            plan.notes.append(f"fleet {spec.name} added")
        return plan

    # -- the one place membership changes ------------------------------------------------

    def _enter(self, fleet: FleetState, membership: Membership) -> None:
        fleet.membership = membership
        self._fleets.append(fleet)

    def _move(self, fleet: FleetState, move: Move) -> None:
        after = TRANSITIONS[fleet.membership].get(move)
        if after is None:
            raise MembershipError(
                f"fleet {fleet.name!r}: cannot {move.value} while {fleet.membership.value}"
            )
        fleet.membership = after
        if after is Membership.GONE:
            # By identity: a record of the same name (moved) may be in the set too.
            del self._fleets[next(i for i, f in enumerate(self._fleets) if f is fleet)]

    def __contains__(self, fleet: object) -> bool:
        return any(f is fleet for f in self._fleets)


def _address(spec: FleetSpec) -> tuple[str, int, str]:
    """Where a fleet is: a fleet of the same name elsewhere is a move."""
    return spec.host, spec.port, spec.scheme


def _why_there(fleet: FleetState) -> str:
    """What an operator can do about a fleet that is on its way in or out."""
    if fleet.membership is Membership.ADDING:
        return " (an add-fleet of it is under way: try again once it has finished)"
    if fleet.membership is Membership.DRAINING:
        return (
            " (being removed: it goes once its calls end, `fleet-ingress stat` shows them; "
            "add it again then, or `remove-fleet --force` it first)"
        )
    return ""
