"""Calls on an address this host no longer has: when to end them (pure logic).

Two hosts share an address with keepalived (SPEC 14). When it moves to the
other host, the calls this host accepted on it cannot reach their carriers any
more: the carriers' packets go to the other host, which resets them. This host
would learn only at `timeouts.tcp_user_timeout` (20 s), holding each call's
fleet worker and bot meanwhile, while the carriers redial through the other
host and find those workers busy (the pair audit of session 37: 16 of 24
redials refused for 21 s).

`AddressWatch` is fed what the host's addresses are at each look, and which
addresses live calls are on; it says which of those have been missing for
`GRACE` or more, so that their calls end (`carrier_lost`).

Why GRACE is 1 s: a redial reaches the other host about 0.05 s after the
move and waits there `timeouts.queue` (3 s) for a free worker, which that host
sees at its next probe of the fleet (`check_interval`, 1 s). A call here ends
between GRACE and GRACE + CHECK_PERIOD after its address left, so its worker
is free and seen by the other host's probe at most GRACE + 2 s after: within
the redial's 3 s with GRACE 1, not with 2. Shorter gains nothing the check
period does not eat. What a grace of 1 s spares: an address removed and put
back within it (a keepalived restart or reload on this host that re-adds it, a
transition that deletes and adds in one go): calls end only when two looks
CHECK_PERIOD apart both found it missing and the kernel said of no address
change between them. What it does not spare: an address away longer that comes
back to this host (both hosts in FAULT for seconds, then this one taking it
back): its calls could have lived, but with `nopreempt` that happens only when
every fleet was DOWN on both hosts, when those calls had no fleet anyway.

Only an address seen among the host's at a look while calls were on it can go
missing: one never seen there is not this reading's to judge (an AnyIP route
such as `ip route add local 192.0.2.0/24 dev lo`, whose addresses are no /32
entry; a transparent socket's; a table that could not be read), and its calls
are left to the TCP timeouts, as before. Without that, such a host would end
every call a second or two after it linked.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Collection, Iterable

# Seconds an address may be missing before its calls end (see above).
GRACE = 1.0
# Seconds between looks at the host's addresses, while calls live on one that could go.
CHECK_PERIOD = 1.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# Asked of every call's local address: the host's few addresses, parsed once each
# (the answers are immutable).
@functools.lru_cache(maxsize=256)
def call_address(text: str) -> Address | None:
    """The address a call's carrier connection is on (its getsockname host),
    as the host lists it, or None when it cannot move away: loopback,
    unspecified, or not an address. An IPv4-mapped IPv6 address (a carrier on
    a dual-stack `[::]` listener) is its IPv4 address; a zone is dropped."""
    try:
        address: Address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified:
        return None
    return address


def gone_detail(address: Address, missing_for: float) -> str:
    """The access line's detail of a call ended for its address."""
    return (
        f"carrier: this host no longer has the address {address} the call was on "
        f"(missing {missing_for:.1f}s): it moved to another host (a failover), "
        "where the carrier's packets now go; the carrier redials there"
    )


class AddressWatch:
    """Since when each address that live calls are on has been missing."""

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        self._missing_since: dict[Address, float] = {}
        # Addresses calls are on that a look found on this host: only those can go.
        self._seen: set[Address] = set()

    @property
    def pending(self) -> bool:
        """Some address calls are on was missing at the last look (look again
        even if nothing was said to change: the grace is running)."""
        return bool(self._missing_since)

    def missing_for(self, address: Address, now: float) -> float:
        since = self._missing_since.get(address)
        return 0.0 if since is None else now - since

    def look(
        self,
        host: Iterable[Address],
        used: Iterable[Address],
        now: float,
        changed: bool | Collection[Address] = False,
    ) -> list[Address]:
        """The host's addresses now and the addresses calls are on: those of
        `used` missing for `grace` or more, their calls to end. An address
        seen again, or no call on it any more, starts afresh. `changed`: the
        host's addresses changed since the last look (the kernel said so): an
        address missing then and now may have been back in between, unseen
        (a flap faster than the looks), so its clock starts again now: missing
        at two looks with no change between is what ends calls. A collection:
        the addresses the kernel said changed, only their clocks start again."""
        present = frozenset(host)
        used = frozenset(used)
        self._seen = (self._seen | (used & present)) & used
        for address in [a for a in self._missing_since if a in present or a not in used]:
            del self._missing_since[address]
        if changed is True:
            self._missing_since.clear()
        elif changed:
            for address in changed:
                self._missing_since.pop(address, None)
        gone = []
        for address in (used - present) & self._seen:
            since = self._missing_since.setdefault(address, now)
            if now - since >= self.grace:
                gone.append(address)
        return sorted(gone, key=str)
