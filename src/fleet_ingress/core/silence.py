"""Which call has gone quiet, and which side: the I/O-free half of the sweep.

A carrier on a call route streams media all the time (a frame every 20-100
ms, silence included), so a carrier that sends nothing for
`timeouts.carrier_silence` has gone, whatever TCP says. A bot may rightly say
nothing while the caller talks, so `timeouts.fleet_silence` is off unless
set. `timeouts.tunnel` is the old rule: no byte either way.

Nothing here runs per message: the relay only adds to its byte counters, and
a coarse periodic sweep (`net.calls.SilenceSweep`) hands each call's counters
and `now` to `QuietWatch.check`, which compares them with what the last sweep
saw. A side whose reading is paused by flow control (its peer is not taking
its bytes) is not silent: its clock is held, so the side that stopped reading
is not blamed on the one that was stopped.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# Sweeps per shortest limit: a call is ended between its limit and 1.25 x it.
SWEEPS_PER_LIMIT = 4


class Silence(enum.Enum):
    IDLE = "idle"  # no byte either way for `idle`
    CARRIER = "carrier"  # no byte from the carrier for `carrier`
    FLEET = "fleet"  # no byte from the fleet for `fleet`
    # Took none of our bytes for `stalled` while its peer was held for it: it
    # stopped reading (the kernel's user timeout may never end such a side
    # while it still sends: each of its ACKs puts the window probe back).
    CARRIER_STALLED = "carrier_stalled"
    FLEET_STALLED = "fleet_stalled"


@dataclass(frozen=True)
class SilenceLimits:
    """Seconds of silence that end a call; 0 turns a per-side limit off."""

    idle: float
    carrier: float = 0.0
    fleet: float = 0.0
    stalled: float = 0.0
    # A quarter of the shortest limit, worked out once: asked as each call
    # enters its tunnel and by each pass for each call it watches (a property
    # was six Python calls each time, session 46).
    sweep_period: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep_period", self.shortest / SWEEPS_PER_LIMIT)

    def lenient(self, other: SilenceLimits) -> SilenceLimits:
        """Each limit the longer of the two (0, off, the longest): a reload's
        limits for a call already up, which a reload must never end (SPEC 11)
        but may spare."""

        def longer(a: float, b: float) -> float:
            return 0.0 if a == 0 or b == 0 else max(a, b)

        merged = SilenceLimits(
            idle=max(self.idle, other.idle),
            carrier=longer(self.carrier, other.carrier),
            fleet=longer(self.fleet, other.fleet),
            stalled=longer(self.stalled, other.stalled),
        )
        return self if merged == self else merged  # shared by the calls, as before

    @property
    def shortest(self) -> float:
        return min(s for s in (self.idle, self.carrier, self.fleet, self.stalled) if s > 0)


@dataclass(frozen=True)
class SilencePolicy:
    """The configured limits, with per-route overrides of the per-side ones."""

    tunnel: float
    carrier: float = 0.0
    fleet: float = 0.0
    stalled: float = 0.0  # timeouts.tcp_user_timeout, for every route
    route_carrier: Mapping[str, float] = field(default_factory=dict)
    route_fleet: Mapping[str, float] = field(default_factory=dict)

    # One SilenceLimits per route with its own limits, one for every other
    # route: shared by the calls (memory per held call).
    _default: SilenceLimits = field(init=False, repr=False, compare=False)
    _by_route: Mapping[str, SilenceLimits] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_default", SilenceLimits(self.tunnel, self.carrier, self.fleet, self.stalled)
        )
        by_route = {
            route: SilenceLimits(
                idle=self.tunnel,
                carrier=self.route_carrier.get(route, self.carrier),
                fleet=self.route_fleet.get(route, self.fleet),
                stalled=self.stalled,
            )
            for route in {*self.route_carrier, *self.route_fleet}
        }
        object.__setattr__(self, "_by_route", by_route)

    def for_route(self, route: str) -> SilenceLimits:
        return self._by_route.get(route, self._default)


@dataclass(slots=True)
class QuietWatch:
    """One call's counters as the last sweep saw them, and since when each held still."""

    limits: SilenceLimits
    from_carrier: int
    to_carrier: int
    carrier_moved: float  # when the carrier's count last moved
    fleet_moved: float
    carrier_since: float  # the same, or when its reading was last held by flow control
    fleet_since: float

    @classmethod
    def start(
        cls, limits: SilenceLimits, from_carrier: int, to_carrier: int, now: float
    ) -> QuietWatch:
        return cls(limits, from_carrier, to_carrier, now, now, now, now)

    def check(
        self,
        from_carrier: int,
        to_carrier: int,
        now: float,
        *,
        carrier_held: bool = False,
        fleet_held: bool = False,
    ) -> Silence | None:
        """What has gone silent for its limit by `now`, if anything.

        `carrier_held`: the carrier is not being read (flow control: the fleet
        is not taking its bytes), so its silence is not its own. The idle rule
        counts bytes alone, held or not, as `timeouts.tunnel` always has.
        The counts must be read after the sockets were: a pass run late, before
        its loop read what waited in the kernel, is not a verdict (`SilenceSweep`)."""
        if from_carrier != self.from_carrier:
            self.from_carrier, self.carrier_moved = from_carrier, now
        if to_carrier != self.to_carrier:
            self.to_carrier, self.fleet_moved = to_carrier, now
        self.carrier_since = now if carrier_held else max(self.carrier_since, self.carrier_moved)
        self.fleet_since = now if fleet_held else max(self.fleet_since, self.fleet_moved)
        limits = self.limits
        if limits.carrier > 0 and now - self.carrier_since >= limits.carrier:
            return Silence.CARRIER
        if limits.fleet > 0 and now - self.fleet_since >= limits.fleet:
            return Silence.FLEET
        # Held now, and nothing read from the held side since the limit began:
        # its peer took none of what was relayed to it for that long.
        if limits.stalled > 0:
            if fleet_held and now - self.fleet_moved >= limits.stalled:
                return Silence.CARRIER_STALLED
            if carrier_held and now - self.carrier_moved >= limits.stalled:
                return Silence.FLEET_STALLED
        if now - max(self.carrier_moved, self.fleet_moved) >= limits.idle:
            return Silence.IDLE
        return None
