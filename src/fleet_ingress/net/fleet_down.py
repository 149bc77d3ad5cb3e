"""A fleet that went DOWN: the call attempts on it not answered yet are given up.

The health poller (the supervisor's, or this process's) takes a fleet DOWN,
or calls it refused do (`FleetState.call_unreachable`). A call attempt that
holds a slot there and has not had the fleet's answer (connecting, or its
head sent and waiting for the 101) would wait out its timer, timeouts.response
(5 s) for one that is connected, then be retried; it is given up now instead
and retried on another fleet (`core.call_machine.FleetWentDown`, under the
same retry rules). Calls already linked are not touched: a fleet DOWN keeps
its calls (SPEC 6).

In a worker, the supervisor names the leases in flight there (`fleet-down`
on the slot channel, `net.slot_wire`); in one process, every call holding a
slot on that fleet record is asked (its pump feeds the event only while its
attempt is under way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.slot_wire import field


def _tell(registry: Registry, holds: Callable[[Any], bool]) -> int:
    """Every call whose held slot `holds` names is told its fleet went DOWN
    (its pump gives up only an attempt under way). How many were."""
    told = 0
    for call in list(registry.calls):
        lease = call.lease
        if lease is not None and lease.held and holds(lease):
            call.carrier.fleet_went_down(lease)
            told += 1
    return told


def give_up_attempts(registry: Registry, fleet: FleetState) -> int:
    """This process's own slots (`net.dispatch.Dispatcher`): every call holding
    one on `fleet` is told. How many were (not all give up: a linked call keeps on)."""
    return _tell(registry, lambda lease: lease.fleet is fleet)


def give_up_leases(registry: Registry, message: dict[str, Any]) -> int:
    """A worker's, told "fleet-down" on its slot channel: the calls holding the
    leases it names on its fleet (the supervisor's list of those in flight
    there) are told. How many were. Each attempt given up says so in its own
    line ("fleet attempt failed", failure "fleet-down")."""
    name = field(message, "fleet", str)
    wanted = {x for x in field(message, "leases", list) if type(x) is int}
    return _tell(
        registry, lambda lease: getattr(lease, "id", None) in wanted and lease.fleet.name == name
    )
