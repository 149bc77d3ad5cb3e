"""The registry of live carrier connections and calls.

It is the one source that stats, metrics, admin commands, drain and shutdown
read: nothing about a live call is counted twice elsewhere. `Call.end` is the
one way a call is ended from outside its two sides (a silent side, a drain, a
forced removal), and `SilenceSweep` the one timer that looks for silent calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fleet_ingress.core.call_list import (
    TAG_LENGTH,
    CallFilter,
    host_call_id,
    new_process_tag,
    shown_state,
)
from fleet_ingress.core.call_machine import CallMachine, EndReason
from fleet_ingress.core.silence import QuietWatch, Silence, SilenceLimits, SilencePolicy
from fleet_ingress.logs import OwnProcess, fields
from fleet_ingress.net.acme import AcmeConnections
from fleet_ingress.net.dead_peers import DeadPeerWatch
from fleet_ingress.net.event_loop import count_unexpected_error
from fleet_ingress.net.late_timers import AFTER_STALL, STALL, patient_timeout
from fleet_ingress.net.loop_time_meter import LoopTimeMeter

__all__ = [
    "Call",
    "CallHook",
    "CarrierSide",
    "Registry",
    "Side",
    "SilenceSweep",
    "end_call",
    "list_calls_in_turns",
    "process_tag",
]

if TYPE_CHECKING:
    from fleet_ingress.core.balancer import FleetState
    from fleet_ingress.net.dispatch import HeldSlot
    from fleet_ingress.net.liveness import PeerGaveNoAnswer

log = logging.getLogger("fleet_ingress.proxy")


class Side(Protocol):
    """One side of a call as the registry sees it (the call pump's protocols in
    `net.proxy` are the real ones; the registry needs no more than this)."""

    bytes_received: int
    lost: bool
    reading_paused: bool  # by flow control: the peer is not taking this side's bytes

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def buffered_bytes(self) -> int: ...
    def read_if_ended(self) -> None:
        """Read now if the connection has ended unseen (`TLSConnection.read_if_ended`)."""

    def unlink(self) -> None:
        """Drop the references to the peer and the transport (an ended call)."""

    def tcp_socket(self) -> Any:
        """The connection's socket (or a transport's socket-like object), None once lost."""

    def give_up(self, why: PeerGaveNoAnswer) -> None:
        """Cut the connection with a reset: its peer stopped answering (`net.dead_peers`)."""


class CarrierSide(Side, Protocol):
    call: Call | None

    def request_end(self, reason: EndReason, why: str = "") -> None:
        """Tell the call's machine to end it (it decides how and why)."""

    def fleet_went_down(self, lease: Any) -> None:
        """The fleet `lease` (a `HeldSlot`) holds a slot on went DOWN: the
        call's attempt there is given up if still under way (`FleetWentDown`)."""


# Characters of a bot id an access line keeps.
LOGGED_BOT_ID = 256
# Entries of `tried` an access line keeps: `retry.retries` has no maximum (a
# configuration HAProxy takes, `retries 1000`, loads), and a fleet refusing
# its connections at once, or answering a status `retry_on` lists, made a
# call of retries=1000 write 1,001 entries, 18 KB, on one line (session 43).
# Past this, the first ones, "+M more", and the last (`logged_tried`).
LOGGED_TRIED = 10


def logged_tried(said: list[str]) -> list[str]:
    """`tried` as an access line keeps it: whole up to LOGGED_TRIED entries;
    past that its first LOGGED_TRIED - 2, "+M more" (M: the entries left out;
    `attempts` still counts them all), and its last, the attempt that ended
    the call (what `fleet` and `status` are of)."""
    if len(said) <= LOGGED_TRIED:
        return said
    first = LOGGED_TRIED - 2
    return [*said[:first], f"+{len(said) - first - 1} more", said[-1]]


_SILENCE_REASON = {
    Silence.IDLE: EndReason.TIMEOUT,
    Silence.CARRIER: EndReason.CARRIER_SILENT,
    Silence.FLEET: EndReason.FLEET_SILENT,
    Silence.CARRIER_STALLED: EndReason.CARRIER_LOST,
    Silence.FLEET_STALLED: EndReason.FLEET_LOST,
}
# The access line's detail, where the reason alone would read as a side gone.
_SILENCE_WHY = {
    Silence.CARRIER_STALLED: "carrier: stopped reading (nothing taken for tcp_user_timeout)",
    Silence.FLEET_STALLED: "fleet: stopped reading (nothing taken for tcp_user_timeout)",
}

# What an end reason is called in counts and on the access line: a lookup (an
# enum's `.value` is a property, two Python calls).
_REASON_WORD = {reason: reason.value for reason in EndReason}
# Read a call as a module constant (an Enum class's attribute read: ~900
# instructions, core/call_machine.py).
_REFUSED = EndReason.REFUSED

_ids = itertools.count(1)


class _Own:
    """The tag of this process's call ids (`core.call_list`), drawn at its
    first use; a process forked from this one draws its own (`_forked`). Its
    pid is `logs.OwnProcess`'s, kept there (os.getpid() is a system call, and
    a call's identity asked it twice: session 41)."""

    tag: str | None = None


def _forked() -> None:
    _Own.tag = None


os.register_at_fork(after_in_child=_forked)


def process_tag() -> str:
    """The tag of this process's call ids (`PID-N-TAG`), drawn at its first use."""
    tag = _Own.tag
    if tag is None:
        tag = _Own.tag = new_process_tag(os.urandom(TAG_LENGTH))
    return tag


@functools.lru_cache(maxsize=1)
def _utc_second(second: int) -> str:
    """A second of the wall clock (time.time(), whole) as the access line
    writes a call's start. Calls start many a second: the last one's text is
    kept (gmtime and strftime cost 9k instructions a call, callgrind,
    session 43)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


@dataclass(eq=False)
class Call:
    """One carrier request on a call route, from its head to its end."""

    carrier: CarrierSide
    client_ip: str
    route: str  # the call prefix, e.g. "/ws/"
    bot_id: str
    id: int = field(default_factory=_ids.__next__)
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    lease: HeldSlot | None = None  # the last attempt's slot (held while `lease.held`)
    fleet_side: Side | None = None
    handshake_ms: float | None = None  # head received -> 101 relayed
    # Of which waiting in the queue for a fleet slot (every attempt's wait,
    # a refusal's after its wait too): 0 for a call that never waited; None once
    # an attempt's wait is not known (a supervisor of a release before it said).
    queued_ms: float | None = 0.0
    tunnel_since: float | None = None
    ended_mono: float | None = None  # its end settled: its access line
    # Its bytes each way as its access line said them (`Registry.remove_call`).
    bytes_at_end: tuple[int, int] | None = None
    quiet: QuietWatch | None = None  # what the silence sweep last saw (None: not watched)
    # Where the call stands, and why it ended: its machine is the one source.
    machine: CallMachine | None = None
    _described: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @property
    def end_reason(self) -> EndReason | None:
        return None if self.machine is None else self.machine.end_reason

    @property
    def status(self) -> int | None:
        """What the carrier was answered."""
        return None if self.machine is None else self.machine.status

    @property
    def attempts(self) -> int:
        return 0 if self.machine is None else self.machine.attempt

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

    def end(self, reason: EndReason, why: str = "") -> None:
        """End the call (a silent side, a drain, a forced removal): its machine
        decides how each side is closed and keeps the first reason given. The
        call itself ends (access log, out of the live calls) as soon as that
        end is settled, its sides closing after it."""
        self.quiet = None
        self.carrier.request_end(reason, why)

    def abort(self) -> None:
        """Cut both sides now, without waiting for a TLS close (a call `end` could
        not close: its peer never reads). The reason given to `end` stands."""
        if self.fleet_side is not None:
            self.fleet_side.abort()
        self.carrier.abort()

    def read_ended_sides(self) -> None:
        """Read each side whose connection has ended without a read to tell
        (uvloop's poll stopped by an error event): its loss ends the call as
        a loss, with its reason, rather than as a silence later."""
        for side in (self.carrier, self.fleet_side):
            if side is not None:
                side.read_if_ended()

    def check_silence(self, now: float) -> tuple[EndReason, str] | None:
        """Why the sweep should end this call now (and the detail), if it should."""
        quiet = self.quiet
        if quiet is None:
            return None
        fleet_side = self.fleet_side
        silence = quiet.check(
            self.bytes_from_carrier,
            self.bytes_to_carrier,
            now,
            carrier_held=self.carrier.reading_paused,
            fleet_held=fleet_side is not None and fleet_side.reading_paused,
        )
        if silence is None:
            return None
        return _SILENCE_REASON[silence], _SILENCE_WHY.get(silence, "")

    def identity(self) -> dict[str, Any]:
        """Who the call is, as its access line says: also sent with its slot
        requests, so that the supervisor can write the line of a call lost
        with its worker (`SlotServer.take_calls`)."""
        return {
            "call_id": self.id,
            # Its id on the host, as `fleet-ingress calls` lists it and `end-call`
            # takes it: `process` and `call_id` alone name another call once
            # the pid has come back.
            "call": host_call_id(OwnProcess.pid, self.id, process_tag()),
            "started": _utc_second(math.floor(self.started_at)),
            "client_ip": self.client_ip,
            "route": self.route,
            # Bounded, as the refused-request line's target: a 15 KB bot id in
            # the path would make a 15 KB access line (the fleet still gets it whole).
            "bot_id": self.bot_id[:LOGGED_BOT_ID],
        }

    @property
    def described(self) -> dict[str, Any]:
        """`identity` and its start (`started_at`; `started_monotonic` for its
        duration, which no wall-clock step moves) as its slot requests carry
        it: built once, a retry's request sends the same. (Not a
        functools.cached_property: Python 3.11's takes a lock at each first
        access, a call's.)"""
        described = self._described
        if described is None:
            described = self._described = {
                **self.identity(),
                "started_at": self.started_at,
                "started_monotonic": self.started_mono,
            }
        return described

    def listed_fleet(self, state: str) -> str | None:
        """The fleet a listing shows: none while the call waits for a slot (a
        retry's wait: the fleet it tried last is not the one it is on)."""
        fleet = self.fleet
        return None if fleet is None or state == "waiting" else fleet.name

    def listed(self, now: float, pid: int, generation: int) -> dict[str, Any]:
        """The call's row in `fleet-ingress calls` (`now`: monotonic).

        `carrier_quiet_s` / `fleet_quiet_s`: how long at least that side has
        sent nothing, as the silence sweep last saw it (its resolution, a
        quarter of the shortest silence limit: 0 when its bytes moved since
        that pass); None before the tunnel (the sweep watches linked calls).
        Read, not kept: the relay's hot path stamps no time per read."""
        quiet = self.quiet
        carrier_quiet = fleet_quiet = None
        if quiet is not None:
            moved = self.bytes_from_carrier != quiet.from_carrier
            carrier_quiet = 0.0 if moved else round(max(0.0, now - quiet.carrier_moved), 1)
            moved = self.bytes_to_carrier != quiet.to_carrier
            fleet_quiet = 0.0 if moved else round(max(0.0, now - quiet.fleet_moved), 1)
        state = shown_state(None if self.machine is None else self.machine.state)
        fleet = self.listed_fleet(state)
        return {
            "id": host_call_id(pid, self.id, process_tag()),
            "pid": pid,
            "generation": generation,
            "call_id": self.id,
            "started": self.described["started"],  # built once (strftime: 3 us)
            "started_monotonic": self.started_mono,  # the host's order (CLOCK_MONOTONIC)
            "age_s": round(now - self.started_mono, 1),
            "client_ip": self.client_ip,
            "route": self.route,
            "bot_id": self.bot_id[:LOGGED_BOT_ID],
            "fleet": fleet,
            "state": state,
            "bytes_from_carrier": self.bytes_from_carrier,
            "bytes_to_carrier": self.bytes_to_carrier,
            "carrier_quiet_s": carrier_quiet,
            "fleet_quiet_s": fleet_quiet,
        }

    def listed_closing(self, now: float, pid: int, generation: int) -> dict[str, Any]:
        """The row in `fleet-ingress calls` of a call ended whose sides are
        still closing (`Registry.closing`): its `listed` row with
        `closing_s`, how long since its access line (`ended_mono`), and the
        `end_reason` that line says. Its sides are not watched for silence
        any more: no `quiet` (None each)."""
        row = self.listed(now, pid, generation)
        ended = self.ended_mono
        row["closing_s"] = None if ended is None else round(max(0.0, now - ended), 1)
        row["end_reason"] = None if self.end_reason is None else self.end_reason.value
        row["carrier_quiet_s"] = row["fleet_quiet_s"] = None
        return row

    def access_record(self) -> dict[str, Any]:
        """The access line's fields (SPEC 12). `tried`, last, only on the line
        of a call that left a fleet (`CallMachine.attempts_said`): every
        attempt's fleet, in order, and what it ended with, where `fleet` names
        the last alone; the common call's line is not made longer. Cut past
        LOGGED_TRIED entries (`logged_tried`)."""
        machine = self.machine
        # Who the call is as its slot requests said it (`described`, built at
        # the first: the same fields, none of which changes in a call's life),
        # not made again; a call that asked no slot has it made now.
        described = self._described
        # What the properties say, read here once each (a Python call a read).
        fleet = self.fleet
        end_reason = None if machine is None else machine.end_reason
        record = {
            **(self.identity() if described is None else described),
            "fleet": None if fleet is None else fleet.name,
            "status": None if machine is None else machine.status,
            "attempts": 0 if machine is None else machine.attempt,
            "queued_ms": None if self.queued_ms is None else round(self.queued_ms, 1),
            "handshake_ms": None if self.handshake_ms is None else round(self.handshake_ms, 1),
            "duration_s": round((self.ended_mono or time.monotonic()) - self.started_mono, 3),
            "bytes_from_carrier": self.bytes_from_carrier,
            "bytes_to_carrier": self.bytes_to_carrier,
            "end_reason": None if end_reason is None else _REASON_WORD[end_reason],
            # The ingress's own answer, for a call it refused (which 503, which 502);
            # what failed, for a call a side's error ended.
            "detail": None if machine is None else machine.answer_text or machine.error_text,
        }
        if described is not None:  # its start as the slot request carries it
            del record["started_at"], record["started_monotonic"]
        if machine is not None and (tried := machine.attempts_said()) is not None:
            record["tried"] = logged_tried(tried)
        return record


CallHook = Callable[[Call], None]

# Whose answer a call refused got (`Registry.refused`).
REFUSED_BY_FLEET = "fleet"
REFUSED_BY_INGRESS = "ingress"


@dataclass
class Registry:
    connections: set[CarrierSide] = field(default_factory=set)
    calls: set[Call] = field(default_factory=set)  # live: their end not settled yet
    # Calls ended (logged, out of `calls`) whose sides are still closing: a
    # close frame and the TLS close flushed to a peer slow to read or gone,
    # bounded each (net/proxy.py's CLOSE_FLUSH_TIMEOUT, tls_socket's
    # CLOSE_TIMEOUT), or a half-closed call's grace for the other side's reply.
    # Their carriers stay in `connections` until they are gone; what their
    # sides hold and the slots they still hold count; a drain waits for them.
    closing: set[Call] = field(default_factory=set)
    # Made by a wait for no call (`wait_no_calls`, a drain's), set and let go
    # once none is left: a call's start and end touch no Event (two Python
    # calls a call, its clear and its set, when it was kept).
    _no_calls: asyncio.Event | None = None
    # Frontend totals (live calls add theirs when read: see relayed_bytes()).
    connections_total: int = 0  # carriers through their TLS handshake
    handshaking: int = 0  # accepted, TLS handshake under way
    tls_handshake_failures: int = 0
    # Calls' TLS handshakes to the fleets, by kind ("full": the certificate
    # checked; "resumed": a kept session, net/fleet_sessions.py), and the kept
    # sessions a fleet failed a handshake on rather than declining them.
    fleet_tls_handshakes: Counter[str] = field(default_factory=Counter)
    fleet_tls_sessions_refused: int = 0
    refused_connections: int = 0  # over limits.max_connections: reset at accept
    accept_failures: int = 0  # accept() failed for lack of descriptors or memory
    accepts_paused_ms: int = 0  # accept pacing: live calls came first (whole ms: counts are)
    acme: AcmeConnections = field(default_factory=AcmeConnections)  # the :80 listener's
    # The CPU of carrier connections until their call is linked: accept, TLS
    # handshake, head, answer and close (what a flood costs; accept pacing reads it).
    new_connection_cpu: LoopTimeMeter = field(default_factory=LoopTimeMeter)
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (route, status)
    ended_bytes_from_carrier: int = 0
    ended_bytes_to_carrier: int = 0
    # Calls ended, by (fleet, end reason); fleet "" for a call no fleet answered.
    ended: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Of those ended "refused" (answered without a tunnel), whose answer the
    # carrier got, by (REFUSED_BY_FLEET or REFUSED_BY_INGRESS, status): the
    # fleet's own, passed through (a 429), or the ingress's (the 503 of a queue
    # timeout or of no fleet up, a 502/503/504 once attempts ran out, a 400).
    # "refused 40" alone (and the fleet label, which a give-up after attempts
    # on a fleet has too) did not say whose refusal.
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Who wants to hear of calls linked to a fleet (101 relayed) and calls ended.
    on_call_linked: list[CallHook] = field(default_factory=list)
    on_call_ended: list[CallHook] = field(default_factory=list)
    # Who wants to hear of a call handed a slot after a wait in the queue (seconds).
    on_slot_waited: list[Callable[[float], None]] = field(default_factory=list)
    # Who wants to hear that a count moved (a connection, a request answered, a
    # call ended, a handshake failed, a connection refused): a worker sends its
    # report soon after (a crash then loses what was counted since, about a second).
    on_counted: list[Callable[[], None]] = field(default_factory=list)
    sweep: SilenceSweep = field(init=False)
    # The peers that stopped answering, given up with a reset (net/dead_peers.py).
    dead_peers: DeadPeerWatch = field(init=False)

    def __post_init__(self) -> None:
        self.sweep = SilenceSweep(self)
        self.dead_peers = DeadPeerWatch(lambda: self.calls)

    def count_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1
        for hook in self.on_counted:  # `counted`, spelt out: twice a call
            hook()

    def counted(self) -> None:
        """A count moved: tell whoever sends them on (`on_counted`)."""
        for hook in self.on_counted:
            hook()

    def slot_waited(self, call: Call, seconds: float | None, *, granted: bool) -> None:
        """`call` waited `seconds` in the queue, then was handed a slot
        (`granted`) or refused (a queue timeout: counted by the slot queue).
        None: a wait not known (its access line says null, not a part of it)."""
        if seconds is None or call.queued_ms is None:
            call.queued_ms = None
            return
        call.queued_ms += seconds * 1000
        if granted:
            for hook in self.on_slot_waited:
                hook(seconds)

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

    def remove_call(self, call: Call) -> bool:
        """The call's end is settled (its access line): out of the live calls,
        among those closing until `forget_call`; False when it was already out."""
        if call not in self.calls:
            return False
        self.calls.discard(call)
        self.closing.add(call)
        call.ended_mono = time.monotonic()
        # What Call's properties say, read from their fields (a property is a
        # Python call a read; `name` too: the fleet's spec has it).
        fleet_side, lease = call.fleet_side, call.lease
        from_carrier = call.carrier.bytes_received
        to_carrier = 0 if fleet_side is None else fleet_side.bytes_received
        call.bytes_at_end = (from_carrier, to_carrier)
        self.ended_bytes_from_carrier += from_carrier
        self.ended_bytes_to_carrier += to_carrier
        machine = call.machine
        end_reason = None if machine is None else machine.end_reason
        reason = "unknown" if end_reason is None else _REASON_WORD[end_reason]
        self.ended[("" if lease is None else lease.fleet.spec.name, reason)] += 1
        if end_reason is _REFUSED:
            own = machine is None or machine.answer_text is not None
            who = REFUSED_BY_INGRESS if own else REFUSED_BY_FLEET
            self.refused[(who, str(call.status))] += 1
        for hook in self.on_call_ended:
            hook(call)
        self.counted()
        return True

    def forget_call(self, call: Call) -> None:
        """Both sides of an ended call are gone: what they relayed after its
        line (a half-closed call's last reply) joins the totals."""
        if call in self.closing:
            self.closing.discard(call)
            logged_from, logged_to = call.bytes_at_end or (0, 0)
            fleet_side = call.fleet_side  # (not its properties: a Python call each)
            to_carrier = 0 if fleet_side is None else fleet_side.bytes_received
            self.ended_bytes_from_carrier += call.carrier.bytes_received - logged_from
            self.ended_bytes_to_carrier += to_carrier - logged_to
        if self._no_calls is not None and not self.calls and not self.closing:
            self._no_calls.set()
            self._no_calls = None

    def every_call(self) -> list[Call]:
        """The live calls and the ended ones whose sides are still closing:
        what a stop ends and cuts."""
        return [*self.calls, *self.closing]

    async def wait_no_calls(self) -> None:
        """Until no call is live and none is closing: a drain waits for the
        closing ones too, each bounded (CLOSE_FLUSH_TIMEOUT): a worker that
        exits as its last call's close frame or TLS close is being flushed
        cuts it, and a peer that reads slowly but reads got a reset, 1006."""
        if self.calls or self.closing:
            if self._no_calls is None:
                self._no_calls = asyncio.Event()
            await self._no_calls.wait()

    def tunnels(self) -> list[Call]:
        return [c for c in self.calls if c.in_tunnel]

    def calls_on(self, fleet_name: str) -> list[Call]:
        """Calls holding a slot on the fleet now (not those that only tried
        it), those closing included: a forced removal waits for their slots."""
        return [
            c
            for c in self.every_call()
            if c.lease is not None and c.lease.held and c.lease.fleet.name == fleet_name
        ]

    def buffered_bytes(self) -> int:
        """Bytes the ingress holds for all connections (flow-control bound)."""
        carriers = sum(conn.buffered_bytes() for conn in self.connections)
        fleets = sum(c.fleet_side.buffered_bytes() for c in self.every_call() if c.fleet_side)
        return carriers + fleets


# `end-call`: the call's sockets take a moment to close (remove-fleet --force's
# wait, `ops.fleet_ops.FORCED_REMOVAL_WAIT`); what is still up then is aborted.
END_CALL_WAIT = 2.0
# Calls a listing reads in one turn of the loop, their rows and the line that
# sends them (`Worker.list_calls`): 9-25 us of CPU a call on a loaded 2-core
# host, so a turn holds the loop 0.9 ms (2.7 at most of 300 turns measured);
# 10,000 calls are 100 turns. At 500 a turn, a turn held it 8-22 ms (session 36).
LIST_TURN = 100


async def list_calls_in_turns(
    registry: Registry,
    wanted: CallFilter,
    pid: int,
    generation: int,
    *,
    closing: bool = False,
    shown_live: set[int] | None = None,
) -> AsyncIterator[list[dict[str, Any]]]:
    """The rows of `registry`'s calls that `wanted` keeps, LIST_TURN calls a
    turn (the calls carried on meanwhile: one ended since is left out, one
    begun since is not listed). `closing`: the calls ended whose sides are
    still closing instead (`Registry.closing`, `Call.listed_closing`): a
    mass hang-up to carriers gone leaves thousands of them, 10 s each at
    most; one gone since is left out.

    `shown_live`: the ids of the calls one listing showed live, which the
    live pass adds to and the closing pass after it leaves out: a call
    listed live that ended during the turns after is not listed twice (250
    live calls, 100 of them ended after the first turn: 43 were, the review
    of session 43)."""
    source = registry.closing if closing else registry.calls
    calls = list(source)
    for start in range(0, len(calls), LIST_TURN):
        now = time.monotonic()
        rows = []
        for call in calls[start : start + LIST_TURN]:
            if call not in source or (closing and shown_live and call.id in shown_live):
                continue
            machine = call.machine
            fleet = call.listed_fleet(shown_state(None if machine is None else machine.state))
            age = now - call.started_mono
            # `--bot` with the whole id, or with what a listing shows of it (its
            # first LOGGED_BOT_ID characters): compared with the shown one alone,
            # the whole id of a call being carried matched none (the review of
            # session 38: "0 calls of bot ..." of a 3000-character token).
            if wanted.keeps(fleet, call.bot_id, age) or wanted.keeps(
                fleet, call.bot_id[:LOGGED_BOT_ID], age
            ):
                listed = call.listed_closing if closing else call.listed
                rows.append(listed(now, pid, generation))
                if shown_live is not None and not closing:
                    shown_live.add(call.id)
        yield rows
        if start + LIST_TURN < len(calls):
            await asyncio.sleep(0)


async def list_live_then_closing(
    registry: Registry, wanted: CallFilter, pid: int, generation: int
) -> AsyncIterator[tuple[bool, list[dict[str, Any]]]]:
    """A listing's parts as `fleet-ingress calls` shows them: (False, rows) of
    the live calls a turn at a time, then (True, rows) of those ended and still
    closing, a call shown live not shown closing too (`list_calls_in_turns`)."""
    shown: set[int] = set()
    async for rows in list_calls_in_turns(registry, wanted, pid, generation, shown_live=shown):
        yield False, rows
    async for rows in list_calls_in_turns(
        registry, wanted, pid, generation, closing=True, shown_live=shown
    ):
        yield True, rows


async def end_call(
    registry: Registry, call_id: int, why: str, pid: int, generation: int
) -> dict[str, Any] | None:
    """`fleet-ingress end-call`: the call ends as a forced removal ends one
    (each side open told 1001 `ended by operator`, then its TLS close; a call
    not linked yet answered 503), its access line's end_reason `admin` and
    detail `why`; one whose sides are not gone within END_CALL_WAIT is
    aborted, so that its fleet slot comes back. Its row as it ended, with the
    `end_reason` its access line says (`admin`, or the call's own when it was
    ending already); None when this registry holds no call `call_id` (gone,
    or never).

    A call ended already whose sides are still closing (`Registry.closing`: a
    close frame and the TLS close flushed to a peer slow to read or gone, 10 s
    at most each) is aborted at once, both sides: its line is written, and
    an operator who asks is cutting a close that is stuck (`closing` and
    `aborted` in its row)."""
    call = next((c for c in registry.calls if c.id == call_id), None)
    if call is None:
        closing = next((c for c in registry.closing if c.id == call_id), None)
        if closing is None:
            return None
        row = closing.listed_closing(time.monotonic(), pid, generation)
        closing.abort()
        row["closing"] = row["aborted"] = True
        return row
    now = time.monotonic()
    row = call.listed(now, pid, generation)
    call.end(EndReason.ADMIN, why)
    # Until both sides are gone, not only until its line (its end settled, at
    # once): a side that does not take its close frame and TLS close is cut
    # here, as before its line came at its end (session 41).
    with contextlib.suppress(TimeoutError):
        async with patient_timeout(END_CALL_WAIT):
            while _held(registry, call):  # noqa: ASYNC110 - no event per call; 2 s at most
                await asyncio.sleep(0.05)
    if _held(registry, call):
        call.abort()
        row["aborted"] = True
    # The first reason given stands (`CallMachine`): a call already ending (a
    # side hung up, a drain, a silence) keeps its own, and its access line says
    # that one, not `admin`: the answer says which.
    reason = call.end_reason
    row["end_reason"] = None if reason is None else reason.value
    return row


def _held(registry: Registry, call: Call) -> bool:
    """Whether `call` is live, or ended with a side still closing."""
    return call in registry.calls or call in registry.closing


class SilenceSweep:
    """One timer for every call: a coarse pass over the registry that ends the
    calls gone silent (`core.silence`). The relay touches no timer per message;
    the pass runs at a quarter of the shortest limit any watched call has, so
    a call ends between its limit and 1.25 x it, and stops when none is watched."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.policy: SilencePolicy | None = None  # the last reload's (`relimit`)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # _timer's, while set
        self._due = math.inf  # loop time of the next pass
        self._check_failed: set[int] = set()  # calls whose check raised (said once)

    def watch_tunnel(self, call: Call, policy: SilencePolicy) -> None:
        """`call` enters its tunnel under `policy`, its connection's (the one in
        force when it was accepted): where a reload since has longer limits,
        those (`relimit`); a call still connecting at the reload is spared too."""
        limits = policy.for_route(call.route)
        if self.policy is not None and self.policy is not policy:
            limits = limits.lenient(self.policy.for_route(call.route))
        self.watch(call, limits)

    def watch(self, call: Call, limits: SilenceLimits) -> None:
        # The pass's loop while one is due (calls come and go: most of the
        # time), not asked: CPython 3.11's get_running_loop is a getpid
        # system call (one a call, session 41).
        loop = self._timer_loop if self._timer is not None else None
        if loop is None:
            loop = asyncio.get_running_loop()
        # The call's counts read from its sides (its byte properties and
        # QuietWatch.start were four Python calls a linked call).
        fleet_side = call.fleet_side
        to_carrier = 0 if fleet_side is None else fleet_side.bytes_received
        now = time.monotonic()
        call.quiet = QuietWatch(limits, call.carrier.bytes_received, to_carrier, now, now, now, now)
        period = limits.sweep_period
        if loop.time() + period < self._due:  # (a pass is due before, most calls)
            self._schedule(loop, period)

    def relimit(self, policy: SilencePolicy) -> None:
        """A reload's limits for the calls in their tunnel where they are longer:
        an operator who turns `carrier_silence` off during a carriers'
        hold-without-media incident saves the calls already up, not only the next
        ones (the long-call audit of session 22: each call kept the limits it
        started with). A shorter limit is for new calls only: a reload never ends
        a call (SPEC 11). A call still waiting for its fleet's answer keeps
        `timeouts.response`."""
        self.policy = policy
        period = math.inf
        for call in self.registry.calls:
            quiet = call.quiet
            if quiet is not None and call.in_tunnel:
                quiet.limits = quiet.limits.lenient(policy.for_route(call.route))
                period = min(period, quiet.limits.sweep_period)
        if period < math.inf:
            self._schedule(asyncio.get_running_loop(), period)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._due = None, math.inf

    def _schedule(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        due = loop.time() + period
        if due < self._due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._due = loop.call_at(due, self.sweep), due
            self._timer_loop = loop

    def sweep(self, after_a_read: bool = False) -> None:
        # A pass run late may come before its loop has read its sockets: a loop
        # resumed from a stop (SIGSTOP, a debugger, a VM paused while
        # CLOCK_MONOTONIC went on) runs its due timers first, with the peers'
        # bytes of that time unread in the kernel (every call was ended
        # `carrier_silent` after a stop longer than carrier_silence: the clock
        # audit of session 32). Such a pass ends nothing: the pass right after
        # it, which the loop's read of its sockets precedes, looks again, and
        # decides whatever its own lateness (a host too busy to run one on
        # time still has its calls checked): `late_timers`' STALL and
        # AFTER_STALL, as the set-up timeouts. Before, a late pass counted its
        # lateness as no one's silence, whether the process had been stopped
        # or its loop busy running and reading: a busy worker's carrier_silence
        # 5 ended silent calls at 7.3-7.5 s (the dead-peer audit of session
        # 39), past the 1.25 x the sweep promises.
        loop = asyncio.get_running_loop()
        due = self._due
        self._timer, self._due = None, math.inf
        if not after_a_read and due < math.inf and loop.time() - due > STALL:
            due = loop.time() + AFTER_STALL
            self._timer, self._due = loop.call_at(due, self.sweep, True), due
            self._timer_loop = loop
            return
        now = time.monotonic()
        period = math.inf
        failed: list[tuple[Call, BaseException]] = []
        try:
            for call in list(self.registry.calls):
                try:
                    call.read_ended_sides()
                    ending = call.check_silence(now)
                    if ending is not None:
                        call.end(*ending)
                        continue
                except Exception as exc:
                    # A bug in one call's check must not end the pass, nor the
                    # sweep: the calls after it, and every later pass, would go
                    # unwatched (a carrier gone without a FIN holding its fleet's
                    # slot and its bot for timeouts.tunnel). The call itself is
                    # kept (a live call is not cut for a bug) and checked again.
                    failed.append((call, exc))
                if call.quiet is not None:
                    period = min(period, call.quiet.limits.sweep_period)
        finally:
            if period < math.inf:
                self._schedule(asyncio.get_running_loop(), period)
            if failed:
                self._say_checks_failed(failed)

    def _say_checks_failed(self, failed: list[tuple[Call, BaseException]]) -> None:
        """Said once a pass, for the calls not said before (one line, the first
        one's traceback: a bug that hits every call must not hold the loop with
        a traceback each); each counted once."""
        new = [(call, exc) for call, exc in failed if call.id not in self._check_failed]
        if not new:
            return
        live = {call.id for call in self.registry.calls}
        self._check_failed = (self._check_failed | {call.id for call, _ in new}) & live
        for _ in new:
            count_unexpected_error()
        first, exc = new[0]
        log.error(
            "silence check failed: those calls are kept and checked again; a bug, report it",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra=fields(calls=len(new), call_id=first.id),
        )
