"""The registry of live carrier connections and calls.

It is the one source that stats, metrics, admin commands, drain and shutdown
read: nothing about a live call is counted twice elsewhere.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fleet_ingress.core.balancer import FleetState
    from fleet_ingress.net.dispatch import Lease


class Side(Protocol):
    """One side of a call as the registry sees it (the call pump's protocols in
    `net.proxy` are the real ones; the registry needs no more than this)."""

    bytes_received: int
    lost: bool

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def buffered_bytes(self) -> int: ...
    def unlink(self) -> None:
        """Drop the references to the peer and the transport (an ended call)."""


class CarrierSide(Side, Protocol):
    call: Call | None


class Watch(Protocol):
    def cancel(self) -> None: ...


class EndReason(enum.Enum):
    CARRIER_CLOSED = "carrier closed"
    FLEET_CLOSED = "fleet closed"
    TIMEOUT = "timeout"  # tunnel idle past timeouts.tunnel
    DRAIN = "drain"  # shutdown drain time ran out
    REMOVED = "removed"  # fleet removed with --force
    REFUSED = "refused"  # answered without a tunnel (429 relayed, 503, ...)
    ERROR = "error"


_ids = itertools.count(1)


@dataclass(eq=False)
class Call:
    """One carrier request on a call route, from its head to its end."""

    carrier: CarrierSide
    client_ip: str
    route: str  # the call prefix, e.g. "/ws/"
    bot_id: str
    id: int = field(default_factory=lambda: next(_ids))
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    lease: Lease | None = None  # the last attempt's slot (held while `lease.held`)
    fleet_side: Side | None = None
    attempts: int = 0
    status: int | None = None  # what the carrier was answered
    handshake_ms: float | None = None  # head received -> 101 relayed
    tunnel_since: float | None = None
    end_reason: EndReason | None = None
    ended_mono: float | None = None
    hung_up_by: EndReason | None = None  # whose WebSocket close frame came first
    idle_watch: Watch | None = None

    @property
    def fleet(self) -> FleetState | None:
        """The fleet of the last attempt (the access log's "fleet")."""
        return None if self.lease is None else self.lease.fleet

    @property
    def in_tunnel(self) -> bool:
        return self.tunnel_since is not None and self.end_reason is None

    @property
    def bytes_from_carrier(self) -> int:
        return self.carrier.bytes_received

    @property
    def bytes_to_carrier(self) -> int:
        return self.fleet_side.bytes_received if self.fleet_side else 0

    def access_record(self) -> dict[str, Any]:
        return {
            "call_id": self.id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "client_ip": self.client_ip,
            "route": self.route,
            "bot_id": self.bot_id,
            "fleet": self.fleet.name if self.fleet else None,
            "status": self.status,
            "attempts": self.attempts,
            "handshake_ms": None if self.handshake_ms is None else round(self.handshake_ms, 1),
            "duration_s": round((self.ended_mono or time.monotonic()) - self.started_mono, 3),
            "bytes_from_carrier": self.bytes_from_carrier,
            "bytes_to_carrier": self.bytes_to_carrier,
            "end_reason": self.end_reason.value if self.end_reason else None,
        }


CallHook = Callable[[Call], None]


@dataclass
class Registry:
    connections: set[CarrierSide] = field(default_factory=set)
    calls: set[Call] = field(default_factory=set)
    _no_calls: asyncio.Event = field(default_factory=asyncio.Event)
    # Frontend totals (live calls add theirs when read: see relayed_bytes()).
    connections_total: int = 0  # carriers through their TLS handshake
    handshaking: int = 0  # accepted, TLS handshake under way
    tls_handshake_failures: int = 0
    refused_connections: int = 0  # over limits.max_connections: reset at accept
    accept_failures: int = 0  # accept() failed for lack of descriptors or memory
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (route, status)
    ended_bytes_from_carrier: int = 0
    ended_bytes_to_carrier: int = 0
    ended: Counter[str] = field(default_factory=Counter)  # calls ended, by end reason
    # Who wants to hear of calls linked to a fleet (101 relayed) and calls ended.
    on_call_linked: list[CallHook] = field(default_factory=list)
    on_call_ended: list[CallHook] = field(default_factory=list)

    def count_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def call_linked(self, call: Call) -> None:
        for hook in self.on_call_linked:
            hook(call)

    def relayed_bytes(self) -> tuple[int, int]:
        """(carrier -> fleet, fleet -> carrier) since start, live calls included."""
        live = list(self.calls)
        return (
            self.ended_bytes_from_carrier + sum(c.bytes_from_carrier for c in live),
            self.ended_bytes_to_carrier + sum(c.bytes_to_carrier for c in live),
        )

    def add_call(self, call: Call) -> None:
        self.calls.add(call)
        self._no_calls.clear()

    def remove_call(self, call: Call) -> bool:
        """Take a call out; False when it was already out."""
        if call not in self.calls:
            return False
        self.calls.discard(call)
        call.ended_mono = time.monotonic()
        self.ended_bytes_from_carrier += call.bytes_from_carrier
        self.ended_bytes_to_carrier += call.bytes_to_carrier
        self.ended[call.end_reason.value if call.end_reason else "unknown"] += 1
        if not self.calls:
            self._no_calls.set()
        for hook in self.on_call_ended:
            hook(call)
        return True

    async def wait_no_calls(self) -> None:
        if self.calls:
            await self._no_calls.wait()

    def tunnels(self) -> list[Call]:
        return [c for c in self.calls if c.in_tunnel]

    def calls_on(self, fleet_name: str) -> list[Call]:
        """Calls holding a slot on the fleet now (not those that only tried it)."""
        return [
            c
            for c in self.calls
            if c.lease is not None and c.lease.held and c.lease.fleet.name == fleet_name
        ]

    def buffered_bytes(self) -> int:
        """Bytes the ingress holds for all connections (flow-control bound)."""
        carriers = sum(conn.buffered_bytes() for conn in self.connections)
        fleets = sum(c.fleet_side.buffered_bytes() for c in self.calls if c.fleet_side)
        return carriers + fleets
