"""Which fleets are one host: fleets whose addresses (what their names resolve
to, or their literal) overlap. Two lines for one host give it two maxconn
budgets, so it takes twice the calls it can hold (the excess answered 429),
and two probes. Only a lookup can say it of names, and names may be distinct
hosts behind one address (a TLS passthrough routing by SNI): the caller warns.
No I/O here: the addresses come in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

# An address a fleet is connected to: IP (one spelling), port, IPv6 scope (0: none).
Address = tuple[str, int, int]


class SharedAddress(NamedTuple):
    first: str  # the fleet listed first
    second: str
    address: Address  # one address both reach (the lowest, when they share several)


def shared_addresses(addresses: Mapping[str, Iterable[Address]]) -> list[SharedAddress]:
    """Each pair of fleets (by name, in the mapping's order) that share an
    address, once, with the lowest address they share."""
    owners: dict[Address, list[str]] = {}
    for name, theirs in addresses.items():
        for address in sorted(set(theirs)):
            owners.setdefault(address, []).append(name)
    order = {name: at for at, name in enumerate(addresses)}
    found: dict[tuple[str, str], Address] = {}
    for address in sorted(owners):
        names = owners[address]
        for at, first in enumerate(names):
            for second in names[at + 1 :]:
                pair = (first, second) if order[first] < order[second] else (second, first)
                found.setdefault(pair, address)
    return [
        SharedAddress(a, b, address)
        for (a, b), address in sorted(found.items(), key=lambda i: (order[i[0][0]], order[i[0][1]]))
    ]
