"""The life of one carrier connection and its call, as one state machine. No I/O.

Everything about where a call stands lives here (like h11's `_state.py`): which
stage it is at, which attempt, whether it holds a fleet slot, who hung up, and
why it ended. The asyncio pump (`net/proxy.py`) feeds it events (bytes seen,
a slot granted, a fleet connected, a timer fired, a side gone) and carries out
the commands it returns (answer, take a slot, connect, link, close, time).
Timers are commands too, so a transcript test drives time by firing them.

Not here, on purpose: the tunnel's hot path. Once linked, each side's
`data_received` adds to a counter and writes to its peer without a word to the
machine; only a side's WebSocket close frame is reported (`CloseFrameSeen`, once
all of it is read), the rare event that tells who hung up, and a side that
half-closes (`SideFinished`).
The retry policy (`core.retry`), the router (`core.routing`) and the fleet
exchange (`core.fleet_exchange`, fed by the pump, which reports the head it
finds) stay where they are.

The transition table `TRANSITIONS` says, for each state, which events are
legal and what handles them; an event a state does not list raises
`IllegalEvent`, naming both. The end reason is written in one place, `_end`;
the call is logged and leaves the live calls as soon as that end is settled
(`CallEnded`), and is forgotten once its sides are gone too (`SidesGone`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeAlias

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.request_head import (
    BODY_REFUSED,
    HOSTLESS,
    WEBSOCKET_VERSION,
    RequestHead,
)
from fleet_ingress.core.retry import GIVE_UP_ANSWER, Failure, RetryPolicy, local_give_up_answer
from fleet_ingress.core.routing import Route, RouteKind, Router
from fleet_ingress.core.ws_frames import GOING_AWAY, INTERNAL_ERROR


class _Key(enum.Enum):
    """An enum a call looks up by, about twenty times a call (the machine's
    state, its timers, a side): hashed by identity, as members compare, not by
    Enum's own __hash__, a Python function (hash of the member's name) a lookup."""

    __hash__ = object.__hash__


class EndReason(_Key):
    CARRIER_CLOSED = "carrier closed"
    FLEET_CLOSED = "fleet closed"
    TIMEOUT = "timeout"  # tunnel idle past timeouts.tunnel
    # A side that vanished without a FIN: silent past timeouts.carrier_silence /
    # fleet_silence, or failed by TCP (user timeout, keepalive, unreachable).
    CARRIER_SILENT = "carrier_silent"
    FLEET_SILENT = "fleet_silent"
    CARRIER_LOST = "carrier_lost"
    FLEET_LOST = "fleet_lost"
    # A side's TCP reset (RST): its peer ended the connection abruptly, not the ingress.
    CARRIER_RESET = "carrier_reset"
    FLEET_RESET = "fleet_reset"
    DRAIN = "drain"  # shutdown drain time ran out
    REMOVED = "removed"  # fleet removed with --force
    ADMIN = "admin"  # ended by an operator (`fleet-ingress end-call`)
    REFUSED = "refused"  # answered without a tunnel (429 relayed, 503, ...)
    ERROR = "error"


class State(_Key):
    HEAD = "head"  # reading the request head (the request timer runs)
    PARSING = "parsing"  # the head is complete, queued for its parse
    LEASING = "leasing"  # a call: waiting for a fleet slot
    CONNECTING = "connecting"  # a slot held; connecting to its fleet (the connect timer runs)
    AWAITING = "awaiting"  # the head sent; waiting for the fleet's answer (the response timer)
    TUNNEL = "tunnel"  # 101 relayed: the two sides are linked
    # A side sent its WebSocket close frame, then all it will (its TLS
    # close_notify, a FIN): the other's close reply still reaches it (a timer
    # runs). So too when the ingress is asked to end a call whose close reply
    # is due (a drain, an operator, a removal, an idle tunnel): for
    # GOODBYE_REPLY_WAIT at most.
    HALF_CLOSED = "half_closed"
    RELAYING = "relaying"  # a fleet's non-101 answer is being passed through
    ANSWERING = "answering"  # a local answer written; the carrier is being closed
    CLOSING = "closing"  # the end is decided; waiting for the sides to go
    ENDED = "ended"


class Side(_Key):
    CARRIER = "carrier"
    FLEET = "fleet"


class Lost(_Key):
    """How a side's connection ended."""

    CLOSED = "closed"  # by its peer (FIN, TLS close)
    GONE = "gone"  # without a word: TCP user timeout, keepalive, unreachable
    RESET = "reset"  # its peer reset the connection (TCP RST)
    ERROR = "error"  # another error (a bad TLS record...)


class Timer(_Key):
    REQUEST = "request"  # timeouts.request: the head must be complete by then
    CONNECT = "connect"  # timeouts.connect: one attempt's TCP (+TLS) connection
    RESPONSE = "response"  # timeouts.response: the fleet's answer head
    HALF_CLOSED = "half_closed"  # HALF_CLOSED_GRACE: the other side's last words


HALF_CLOSED_GRACE = 5.0
"""Seconds a tunnel stays open, one way, after a side has finished sending:
time for the other side's close reply, which follows at once when it follows."""
GOODBYE_REPLY_WAIT = 0.5
"""Seconds a side's close reply is waited for once the ingress ends the call:
the reply to the ingress's own close frame (net/proxy.py), or to the other
side's, due when the end was asked. A client that gets close_notify before it
could reply reports 1006 (aiohttp, websockets)."""


# Events ---------------------------------------------------------------------


# Events and commands are frozen dataclasses, but for the four a common call
# makes of its own (`HeadParsed`, `SlotGranted`, `OpenCall`, `ConnectFleet`):
# a frozen dataclass's __init__ sets each field through object.__setattr__,
# 1.3k instructions more than a plain one for one field, 2.7k for two
# (callgrind, session 48). Nothing keeps or shares those four, nor changes them.


class Event:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HeadComplete(Event):
    """The request head's last line arrived; its parse is queued."""


@dataclass(frozen=True, slots=True)
class HeadRefused(Event):
    status: int  # 400, 431, ...
    reason: str
    head_only: bool = False  # a HEAD request (read far enough to say): no body


@dataclass(slots=True)  # made each call: not frozen (see above `Event`)
class HeadParsed(Event):
    head: RequestHead


@dataclass(slots=True)  # made each call: not frozen (see above `Event`)
class SlotGranted(Event):
    fleet: FleetState


@dataclass(frozen=True, slots=True)
class SlotRefused(Event):
    reason: str  # no fleet up, queue full, queue timeout


@dataclass(frozen=True, slots=True)
class FleetConnected(Event):
    pass


@dataclass(frozen=True, slots=True)
class FleetConnectFailed(Event):
    detail: str
    # This host's own failure (out of local ports to that address), not the
    # fleet's: retried as any (another fleet's address may have ports left),
    # and not held against the fleet's health.
    local: bool = False
    # This process is out of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
    # ENOMEM): this host's failure too, and every fleet's attempt would fail
    # the same at once, so none is tried again: the carrier is answered now.
    exhausted: bool = False
    # The fleet's name did not resolve: the fleet's failure as a timeout is (its
    # probe opens a new connection, resolving the name anew, and tells), not a
    # refusal counted toward DOWN: this host's resolver may be what failed.
    unresolved: bool = False


@dataclass(frozen=True, slots=True)
class OfferedConnectionFailed(Event):
    """This attempt's connection, offered the fleet's kept TLS session, was
    failed by the fleet (closed, reset, an alert) and no refusal of the
    session was proven (net/fleet_sessions.connect_again): a failed
    connection to the fleet, counted for its passive health as any refused
    connection is. Not a failed attempt: the connection is made again
    without the session within the same connect timer, to the same fleet,
    and the call's retries are not used (SPEC 5: a retry is another attempt,
    on a fleet not yet tried where one is eligible; this is the fleet's
    optimisation being undone, not the call's attempt). Before session 42,
    it was not counted: a fleet that drops a share p of its connections was
    seen failing p x p of its calls' connections (one made again was free)."""


@dataclass(frozen=True, slots=True)
class FleetWentDown(Event):
    """The fleet of the attempt under way went DOWN (its health checks failed
    `fleets.fall` times, or calls it refused took it there) before it answered:
    the attempt is given up now and retried, not waited for to its timer."""


@dataclass(frozen=True, slots=True)
class FleetHead(Event):
    status: int
    switched: bool


@dataclass(frozen=True, slots=True)
class FleetError(Event):
    failure: Failure  # empty-response or junk-response
    detail: str


@dataclass(frozen=True, slots=True)
class FleetAnswerComplete(Event):
    """A relayed non-101 answer reached its end."""


@dataclass(frozen=True, slots=True)
class CloseFrameSeen(Event):
    side: Side


@dataclass(frozen=True, slots=True)
class SideFinished(Event):
    """A linked side has sent all it will (a TLS close_notify, a FIN) and can
    still be written to: TLS 1.3 and TCP let a peer half-close."""

    side: Side


@dataclass(frozen=True, slots=True)
class CarrierLost(Event):
    how: Lost
    # What failed, for Lost.ERROR; for Lost.GONE, a peer that stopped reading
    # rather than vanished: the access line's detail.
    why: str = ""


@dataclass(frozen=True, slots=True)
class FleetLost(Event):
    how: Lost
    # What failed, for Lost.ERROR; for Lost.GONE, a peer that stopped reading
    # rather than vanished: the access line's detail.
    why: str = ""


@dataclass(frozen=True, slots=True)
class TimerFired(Event):
    timer: Timer


@dataclass(frozen=True, slots=True)
class EndRequested(Event):
    """From outside the call: the silence sweep, a drain, a forced removal."""

    reason: EndReason
    why: str = ""  # the access line's detail (a side that stopped reading)


@dataclass(frozen=True, slots=True)
class SetupFailed(Event):
    """The pump met an unexpected error while setting the call up."""

    detail: str


# Commands -------------------------------------------------------------------


class Command:
    __slots__ = ()


# A local answer's headers besides its own: (name, value) pairs.
AnswerHeaders: TypeAlias = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Answer(Command):
    """Write a local answer to the carrier (then `CloseSide(CARRIER)` follows),
    with `headers` besides its own (a 426's Upgrade and Sec-WebSocket-Version)."""

    status: int
    text: str
    head_only: bool = False
    headers: AnswerHeaders = ()


@dataclass(frozen=True, slots=True)
class ParseHead(Command):
    pass


@dataclass(slots=True)  # made each call: not frozen (see above `Event`)
class OpenCall(Command):
    """The head is a call: register it (stats, drain, the access log)."""

    route: str  # the call prefix
    bot_id: str


@dataclass(frozen=True, slots=True)
class TakeSlot(Command):
    avoid: tuple[str, ...]  # fleets this call already tried


@dataclass(frozen=True, slots=True)
class CancelSlotWait(Command):
    pass


@dataclass(frozen=True, slots=True)
class ReleaseSlot(Command):
    pass


@dataclass(frozen=True, slots=True)
class FleetFull(Command):
    """The fleet answered this attempt `429`: take it as FULL until its next
    probe (`FleetState.said_full`), on the slot this attempt holds."""


@dataclass(frozen=True, slots=True)
class FleetUnreachable(Command):
    """This attempt could not connect to its fleet, not for this host's own
    lack of resources: `refused` (its answer: TCP refused or reset, TLS
    failed) counts toward taking it DOWN; timed out, it asks for a probe on a
    new connection (`FleetState.call_unreachable`). Also for a connection of
    an attempt that goes on: one offered the fleet's TLS session that the
    fleet failed, no refusal proven (`OfferedConnectionFailed`). On the slot
    this attempt holds."""

    refused: bool = True


@dataclass(slots=True)  # made each call: not frozen (see above `Event`)
class ConnectFleet(Command):
    fleet: FleetState
    attempt: int


@dataclass(frozen=True, slots=True)
class SendHead(Command):
    pass


@dataclass(frozen=True, slots=True)
class DropFleet(Command):
    """Give up this attempt's fleet connection: stop connecting, abort it, and
    hear nothing more from it."""


@dataclass(frozen=True, slots=True)
class LogAttemptFailed(Command):
    fleet: str
    attempt: int
    failure: Failure
    detail: str
    # FleetConnectFailed.exhausted: this process's want, said as such (once
    # in a while, naming the fix), not as the fleet's failed attempt.
    exhausted: bool = False


@dataclass(frozen=True, slots=True)
class Link(Command):
    """101: link the two sides (the tunnel) and start the silence watch."""

    status: int


@dataclass(frozen=True, slots=True)
class Relay(Command):
    """Pass the fleet's non-101 answer through, watched by timeouts.response."""

    status: int


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The WebSocket close frame a side of a tunnel is sent when the ingress
    ends the call or the other side is gone without one (`GOODBYES`)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseSide(Command):
    """Close a side: what is pending flushed, then (`goodbye`) a close frame at
    the next frame boundary and its reply waited for, then TLS close_notify."""

    side: Side
    goodbye: Goodbye | None = None


@dataclass(frozen=True, slots=True)
class AbortSide(Command):
    side: Side


@dataclass(frozen=True, slots=True)
class StartTimer(Command):
    timer: Timer
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer(Command):
    timer: Timer


@dataclass(frozen=True, slots=True)
class CallEnded(Command):
    """The call's end is settled: its reason is final and all that is left is
    to close its sides. Write its access line (its duration and bytes up to
    now) and take it out of the live calls; `SidesGone` follows once its sides
    are. Once a call. A half-closed call is settled: the one thing left, the
    other side's close reply within HALF_CLOSED_GRACE, is relayed but not in
    its line. A relayed answer is not, until its end: its bytes, its detail.
    Before, the line waited for both sides gone: a carrier that had vanished
    held it for the TLS close's flush (10 s), after the half-closed grace
    (5 s) when its bot hung up (session 40's note)."""

    reason: EndReason


@dataclass(frozen=True, slots=True)
class SidesGone(Command):
    """Both sides of an ended call are gone (after its `CallEnded`): forget it."""


Commands: TypeAlias = list[Command]
# A transition's handler: the machine and an event of the type it is listed for.
Handler: TypeAlias = "Callable[[CallMachine, Any], None]"

# The commands and events that carry nothing of one call's, made once and
# shared (frozen): a frozen dataclass's __init__ is a Python call setting each
# field through object.__setattr__, 3-4k instructions (callgrind, session 45),
# and a churned call made sixteen (the timers' are made once per CallRules).
_CANCEL = {timer: CancelTimer(timer) for timer in Timer}
_CLOSE = {side: CloseSide(side) for side in Side}
_CALL_ENDED = {reason: CallEnded(reason) for reason in EndReason}
_PARSE_HEAD = ParseHead()
_SEND_HEAD = SendHead()
_RELEASE_SLOT = ReleaseSlot()
_SIDES_GONE = SidesGone()
_TAKE_ANY_SLOT = TakeSlot(())  # a first attempt's: no fleet to avoid yet
_LINK = Link(101)
_HALF_CLOSED_GRACE = StartTimer(Timer.HALF_CLOSED, HALF_CLOSED_GRACE)
_GOODBYE_REPLY_WAIT = StartTimer(Timer.HALF_CLOSED, GOODBYE_REPLY_WAIT)
# For the pump (net/proxy.py): the common events that carry nothing of a call's.
HEAD_COMPLETE = HeadComplete()
FLEET_CONNECTED = FleetConnected()
FLEET_SWITCHED = FleetHead(101, switched=True)  # a 101, a WebSocket's tunnel
CARRIER_CLOSE_FRAME = CloseFrameSeen(Side.CARRIER)
FLEET_CLOSE_FRAME = CloseFrameSeen(Side.FLEET)
CARRIER_CLOSED = CarrierLost(Lost.CLOSED)  # its peer closed it (no error)
FLEET_CLOSED = FleetLost(Lost.CLOSED)

# The members a call's handlers read, as module constants: an Enum class's
# attribute read goes through EnumType's __getattr__ hook (a Python-level
# type slot), about 900 instructions a read in CPython 3.11 (callgrind), and a
# churned call's handlers and pump made some 25 (session 47). `is` compares
# the same members.
_HEAD = State.HEAD
_PARSING = State.PARSING
_LEASING = State.LEASING
_CONNECTING = State.CONNECTING
_AWAITING = State.AWAITING
_TUNNEL = State.TUNNEL
_HALF_CLOSED = State.HALF_CLOSED
_RELAYING = State.RELAYING
_ANSWERING = State.ANSWERING
_CLOSING = State.CLOSING
_ENDED = State.ENDED
_CARRIER = Side.CARRIER
_FLEET = Side.FLEET
_REQUEST_TIMER = Timer.REQUEST
_CONNECT_TIMER = Timer.CONNECT
_RESPONSE_TIMER = Timer.RESPONSE
_HALF_CLOSED_TIMER = Timer.HALF_CLOSED
_END_REFUSED = EndReason.REFUSED
_END_TIMEOUT = EndReason.TIMEOUT
_END_FLEET_SILENT = EndReason.FLEET_SILENT
_END_ERROR = EndReason.ERROR
_LOST_CLOSED = Lost.CLOSED
_READY = Admin.READY
_HEALTH_ROUTE = RouteKind.HEALTH
_NOT_FOUND_ROUTE = RouteKind.NOT_FOUND
_CONN_FAILURE = Failure.CONN_FAILURE
_RESPONSE_TIMEOUT = Failure.RESPONSE_TIMEOUT
_FLEET_DOWN = Failure.FLEET_DOWN


class IllegalEvent(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"call machine: event {event!r} is not expected in state {state.value}")
        self.state = state
        self.event = event


@dataclass(frozen=True, slots=True)
class CallRules:
    """What the machine consults; one per ingress configuration."""

    router: Router
    retry: RetryPolicy
    request_timeout: float
    connect_timeout: float
    response_timeout: float
    # The StartTimer commands of these timeouts, made once (shared by every call).
    request_timer: StartTimer = field(init=False, repr=False, compare=False)
    connect_timer: StartTimer = field(init=False, repr=False, compare=False)
    response_timer: StartTimer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        timers = (
            ("request_timer", Timer.REQUEST, self.request_timeout),
            ("connect_timer", Timer.CONNECT, self.connect_timeout),
            ("response_timer", Timer.RESPONSE, self.response_timeout),
        )
        for name, timer, seconds in timers:
            object.__setattr__(self, name, StartTimer(timer, seconds))


_LOST_REASON = {
    Side.CARRIER: {
        Lost.CLOSED: EndReason.CARRIER_CLOSED,
        Lost.GONE: EndReason.CARRIER_LOST,
        Lost.RESET: EndReason.CARRIER_RESET,
        Lost.ERROR: EndReason.ERROR,
    },
    Side.FLEET: {
        Lost.CLOSED: EndReason.FLEET_CLOSED,
        Lost.GONE: EndReason.FLEET_LOST,
        Lost.RESET: EndReason.FLEET_RESET,
        Lost.ERROR: EndReason.ERROR,
    },
}
# The ends whose access line says what failed (a side's error, a peer that
# stopped reading), from the loss's `why`. Made once: a tuple spelt in
# `_end_lost` was made at each loss, its members looked up on the class (Enum
# class attributes go through EnumType.__getattr__'s hook, ~1k instructions
# each in Python 3.11), twice a call.
_LOSS_TOLD = frozenset({EndReason.ERROR, EndReason.CARRIER_LOST, EndReason.FLEET_LOST})
_HUNG_UP_BY = {Side.CARRIER: EndReason.CARRIER_CLOSED, Side.FLEET: EndReason.FLEET_CLOSED}
# What a side still open is told, by why a tunnel ended, when no side sent a
# close frame: 1001 (going away) for the ingress's own ends and for a carrier
# gone, 1011 (an error) for a fleet gone or failing, the reason a few words a
# bot's or a carrier's log shows. A fleet that closed its connection without
# a close frame (FLEET_CLOSED: a bot process that exited, whose socket the
# kernel ends with a FIN, or with an RST when it held unread bytes) is a 1011
# too: passed on as a bare TLS close, the carrier saw 1006 and logged a network
# failure, and the same crash read as either by chance (leftovers of session
# 36). A carrier that did (CARRIER_CLOSED: a FIN, with or without its TLS
# close) is a 1001 'carrier closed' to the bot, as its reset already was: the
# bot cannot see the carrier's TCP (the ingress ends TLS), and a bare close
# read as 1006 to it (websockets: ConnectionClosedError, "no close frame
# received or sent"), an abnormal end in a bot framework's log, the same as a
# failure of the network between the ingress and the fleet (session 37).
# Nothing is added once a side has sent a close frame: the other's reply is
# relayed; nor inside a frame (`CloseSide`: at a boundary, or none).
GOODBYES = {
    EndReason.DRAIN: Goodbye(GOING_AWAY, "ingress draining"),
    EndReason.REMOVED: Goodbye(GOING_AWAY, "fleet removed"),
    EndReason.ADMIN: Goodbye(GOING_AWAY, "ended by operator"),
    EndReason.TIMEOUT: Goodbye(GOING_AWAY, "tunnel idle"),
    EndReason.CARRIER_SILENT: Goodbye(GOING_AWAY, "carrier silent"),
    EndReason.CARRIER_LOST: Goodbye(GOING_AWAY, "carrier lost"),
    EndReason.CARRIER_RESET: Goodbye(GOING_AWAY, "carrier reset"),
    EndReason.CARRIER_CLOSED: Goodbye(GOING_AWAY, "carrier closed"),
    EndReason.FLEET_SILENT: Goodbye(INTERNAL_ERROR, "fleet silent"),
    EndReason.FLEET_LOST: Goodbye(INTERNAL_ERROR, "fleet lost"),
    EndReason.FLEET_RESET: Goodbye(INTERNAL_ERROR, "fleet reset"),
    EndReason.FLEET_CLOSED: Goodbye(INTERNAL_ERROR, "fleet closed"),
    EndReason.ERROR: Goodbye(INTERNAL_ERROR, "call error"),
}
_OTHER = {Side.CARRIER: Side.FLEET, Side.FLEET: Side.CARRIER}
_SILENT = {Side.CARRIER: EndReason.CARRIER_SILENT, Side.FLEET: EndReason.FLEET_SILENT}
# Ended from outside, a side that will read no close of ours (silent, or it
# stopped reading: the sweep's CARRIER_LOST / FLEET_LOST): aborted, not closed.
_ABORTED_CARRIER = frozenset({EndReason.CARRIER_SILENT, EndReason.CARRIER_LOST})
# Ends asked of the ingress itself while a side's close reply is due: the
# reply is waited for (GOODBYE_REPLY_WAIT at most) and the call is the hung-up
# side's. A side gone or silent (the sweep's) has no reply to wait for.
_REPLY_WAITED_FOR = frozenset(
    {EndReason.DRAIN, EndReason.REMOVED, EndReason.ADMIN, EndReason.TIMEOUT}
)
# The 503's text to a carrier whose call is ended before its fleet answered.
_SETUP_END_ANSWER = {
    EndReason.DRAIN: "the ingress is stopping",
    EndReason.REMOVED: "the call's fleet was removed",
    EndReason.ADMIN: "the call was ended by an operator",
}
_ABORTED_FLEET = frozenset({EndReason.FLEET_SILENT, EndReason.FLEET_LOST})


# RFC 6455 4.2.2: a version not understood gets 426 and the versions that are;
# RFC 9110 15.5.22: a 426 names the protocol in Upgrade (and so in Connection, 7.8).
_VERSION_HEADERS = (
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", WEBSOCKET_VERSION.decode()),
)


def _local_answer(
    head: RequestHead, route: Route
) -> tuple[int, str] | tuple[int, str, AnswerHeaders] | None:
    """What the ingress answers `head` itself (status, text[, headers]), or None for a call."""
    if route.kind is _HEALTH_ROUTE:
        # Like HAProxy's monitor-uri: any method, any version gets 200, a body too
        # (a monitor's POST). Its answer closes the connection: the body is not read.
        return 200, "ok"
    if head.host_missing:  # read for the health route (HAProxy's own check sends no Host)
        return 400, f"malformed request: {HOSTLESS}"
    if route.kind is _NOT_FOUND_ROUTE:
        # With a body or not (SPEC 2's table, HAProxy's deny_status 404): /attach and
        # /livekit/* are POSTs with one, and a 400 for it sent a misrouted client
        # looking at its JSON. The body is not read: the answer closes the connection.
        return 404, "no such route on this ingress"
    if head.has_body:  # parsed with refuse_body=False: refused here, on a call route
        return 400, BODY_REFUSED
    if head.http_version != b"1.1":
        return 400, "a call is a WebSocket upgrade, which needs HTTP/1.1"
    if not head.is_websocket_upgrade:
        return 400, "a call route accepts only a GET WebSocket upgrade"
    if head.websocket_key is None:
        # RFC 6455 4.1; the fleet's 101 is checked against this key.
        return 400, "a WebSocket upgrade needs one Sec-WebSocket-Key of 16 bytes in base64"
    if not head.websocket_version_13:
        # Forwarded, the fleet refused it with its own 400 (or 426): a fleet
        # connection spent and a call counted refused against that fleet.
        said = head.get_all(b"sec-websocket-version")
        return (
            426,
            "a WebSocket upgrade needs Sec-WebSocket-Version: 13"
            + (f" (it said {_said(said)})" if said else " (it said none)"),
            _VERSION_HEADERS,
        )
    if (named := head.handshake_field_named_by_connection) is not None:
        # Forwarded, the fleet would get the upgrade without it (core/forwarding.py
        # drops what Connection names) and refuse it, or choose without it.
        return (
            400,
            f"the Connection header names {named}, which a WebSocket upgrade"
            " must carry to the fleet",
        )
    return None


def _said(values: list[bytes]) -> str:
    """A carrier's header values, quoted briefly for a one-line answer."""
    text = ", ".join(v.decode("latin-1") for v in values)
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


class _NotFeeding(list[Command]):
    """Where a machine's commands would go between events: a command emitted
    then is a bug, raised. (A field's default must hash: its own, as any object's.)"""

    __hash__ = object.__hash__  # type: ignore[assignment]

    def append(self, command: Command) -> NoReturn:
        raise RuntimeError("call machine: commands are emitted only while an event is fed")

    def __iadd__(self, commands: Iterable[Command]) -> NoReturn:  # type: ignore[misc]
        raise RuntimeError("call machine: commands are emitted only while an event is fed")


_NOT_FEEDING: Commands = _NotFeeding()


@dataclass(eq=False, slots=True)
class CallMachine:
    rules: CallRules
    state: State = State.HEAD
    route_label: str = "-"  # for metrics: "-" until a head is routed
    is_call: bool = False  # the head was a call route's upgrade (the call is registered)
    attempt: int = 0  # attempts made on fleets, counting from 1
    tried: list[str] = field(default_factory=list)  # their fleets, in order
    # What each attempt left behind ended with, in order: a failure's word
    # (`Failure`: "conn-failure", "fleet-down", ...) or the fleet's status that
    # was retried ("503"). A tuple: nothing is made for the call whose first
    # attempt is its last, the common one (`attempts_said`).
    left: tuple[str, ...] = ()
    fleet: FleetState | None = None  # the current attempt's fleet
    slot_held: bool = False
    fleet_open: bool = False  # the current attempt's fleet connection is up (until lost)
    carrier_open: bool = True
    # The answer if attempts end on the last failed one (None: none failed yet).
    give_up: tuple[int, str] | None = None
    retried_from: FleetState | None = None  # the fleet the last attempt failed on
    status: int | None = None  # what the carrier was answered
    answer_text: str | None = None  # the text of a local answer (503 "no fleet is up ...")
    # What failed when a side's error ended the call (end reason "error"):
    # "fleet: [SSL: UNEXPECTED_RECORD] ...". The access line's detail.
    error_text: str | None = None
    hung_up_by: EndReason | None = None  # whose WebSocket close frame came first
    # The side whose close frame answers the first one, until it is relayed.
    reply_due_from: Side | None = None
    # An end asked of the ingress waits for that reply (GOODBYE_REPLY_WAIT):
    # the first ask's wait, which a second ask does not restart.
    reply_waited_for: bool = False
    end_reason: EndReason | None = None
    end_said: bool = False  # CallEnded emitted (once a call)
    # What the event being fed brings (its handlers append to it: a list's
    # own method, not a Python call each); `_NOT_FEEDING` between events.
    _out: Commands = field(default=_NOT_FEEDING, repr=False)

    # A handler takes the event of its key's type (the table is keyed by it:
    # no isinstance check in each, an assert a call made some twenty).
    TRANSITIONS: ClassVar[dict[State, dict[type[Event], Handler]]]

    def start(self) -> Commands:
        """The carrier is connected (its TLS handshake done): the head may come."""
        return [self.rules.request_timer]

    def feed(self, event: Event) -> Commands:
        handler = self.TRANSITIONS[self.state].get(type(event))
        if handler is None:
            raise IllegalEvent(self.state, event)
        self._out = out = []
        handler(self, event)
        if (
            self.end_reason is not None
            and not self.end_said
            and self.is_call
            and self.state in _SETTLED
        ):
            self._say_end()
        # Not kept: a held call's machine would keep its last commands (memory per call).
        self._out = _NOT_FEEDING
        return out

    # The one place a call's end reason is written: the first reason stands.
    def _end(self, reason: EndReason) -> None:
        if self.end_reason is None:
            self.end_reason = reason

    def _say_end(self) -> None:
        """The line is written as soon as the end is settled (`CallEnded`):
        checked after each event, once its handler has set all it tells (a
        503's text comes after its reason)."""
        assert self.end_reason is not None
        self.end_said = True
        self._out.append(_CALL_ENDED[self.end_reason])

    def _release_slot(self) -> None:
        if self.slot_held:
            self.slot_held = False
            self._out.append(_RELEASE_SLOT)

    def _answer(
        self,
        status: int,
        text: str,
        headers: AnswerHeaders = (),
        *,
        head_only: bool = False,
    ) -> None:
        self.state = _ANSWERING
        self.status = status
        self.answer_text = text
        if self.is_call:
            self._end(_END_REFUSED)
        self._out += (Answer(status, text, head_only, headers), _CLOSE[_CARRIER])

    def attempts_said(self) -> list[str] | None:
        """The fleets this call tried, in order, each with what its attempt
        ended with ("a conn-failure", "b 101"): the access line's `tried`,
        where the call left a fleet (an attempt failed, or a status was
        retried); None where `fleet` and `status` say it all (one attempt,
        or none). The last attempt, not left: the fleet's status, or
        "unanswered" (the call ended while it was under way: the carrier
        gone, a drain, the ingress's error)."""
        if not self.left:
            return None
        said = [f"{name} {end}" for name, end in zip(self.tried, self.left, strict=False)]
        if len(self.tried) > len(self.left):
            answered = self.status is not None and self.answer_text is None
            said.append(f"{self.tried[-1]} {self.status if answered else 'unanswered'}")
        return said

    def _left(self, end: str) -> None:
        """The current attempt is given up (`end`: what it ended with)."""
        self.left += (end,)

    def _take_slot(self) -> None:
        """Ask for a slot avoiding the fleets tried, each named once: a call
        retried on one fleet (`retry.retries` has no maximum) would otherwise
        send the supervisor an avoid list as long as its attempts."""
        self.state = _LEASING
        self._out.append(
            TakeSlot(tuple(dict.fromkeys(self.tried))) if self.tried else _TAKE_ANY_SLOT
        )

    def _gone_if_both(self) -> None:
        """The call ends once neither side is open."""
        if self.carrier_open or self.fleet_open:
            self.state = _CLOSING
            return
        self.state = _ENDED
        if self.is_call:
            if not self.end_said:
                self._say_end()
            self._out.append(_SIDES_GONE)

    def _end_lost(self, side: Side, event: CarrierLost | FleetLost) -> None:
        if self.end_reason is not None:
            return  # the first reason stands (a call's sides go after its end, most often)
        reason = self._lost_reason(side, event.how)
        if reason in _LOSS_TOLD and event.why:
            self.error_text = f"{side.value}: {event.why}"
        self._end(reason)

    def _lost_reason(self, side: Side, how: Lost) -> EndReason:
        if self.hung_up_by is not None:
            return self.hung_up_by
        return _LOST_REASON[side][how]

    # HEAD and PARSING ------------------------------------------------------

    def _head_complete(self, event: Event) -> None:
        self.state = _PARSING
        self._out += (_CANCEL[_REQUEST_TIMER], _PARSE_HEAD)

    def _head_refused(self, event: HeadRefused) -> None:
        if self.state is _HEAD:
            self._out.append(_CANCEL[_REQUEST_TIMER])
        self._answer(event.status, event.reason, head_only=event.head_only)

    def _request_timer(self, event: TimerFired) -> None:
        if event.timer is not _REQUEST_TIMER:
            raise IllegalEvent(self.state, event)
        self._answer(408, "request head not received in time")

    def _carrier_lost_before_call(self, event: CarrierLost) -> None:
        self.carrier_open = False
        if self.state is _HEAD:
            self._out.append(_CANCEL[_REQUEST_TIMER])
        self.state = _ENDED

    def _head_parsed(self, event: HeadParsed) -> None:
        head = event.head
        route = self.rules.router.route(head.path.decode("latin-1"))
        self.route_label = route.label
        answer = _local_answer(head, route)
        if answer is not None:
            # RFC 9110 9.3.2: an answer to HEAD has no content, whatever its status.
            self._answer(*answer, head_only=head.method == b"HEAD")
        else:
            self.is_call = True
            self._out.append(OpenCall(route.prefix, route.bot_id))
            self._take_slot()

    # Finding a fleet -------------------------------------------------------

    def _slot_granted(self, event: SlotGranted) -> None:
        fleet = event.fleet
        self.slot_held = True
        if fleet.admin is not _READY:
            # Drained (or removed) between the queue's hand-off and this turn.
            self._release_slot()
            self._take_slot()
            return
        if self.retried_from is not None and self.retried_from is not fleet:
            self.retried_from.redispatches += 1
        self.retried_from = None
        self.attempt += 1
        self.fleet = fleet
        self.tried.append(fleet.spec.name)  # (`name` is a property: a Python call)
        self.state = _CONNECTING
        self._out += (ConnectFleet(fleet, self.attempt), self.rules.connect_timer)

    def _slot_refused(self, event: SlotRefused) -> None:
        if self.give_up is None:
            self._answer(503, event.reason)
        else:
            self._answer(*self.give_up)

    def _fleet_connected(self, event: Event) -> None:
        self.fleet_open = True
        self.state = _AWAITING
        self._out += (_CANCEL[_CONNECT_TIMER], _SEND_HEAD, self.rules.response_timer)

    def _connect_failed(self, event: FleetConnectFailed) -> None:
        self._out.append(_CANCEL[_CONNECT_TIMER])
        if event.unresolved:
            self._attempt_failed(_CONN_FAILURE, event.detail, refused=False)
        elif event.exhausted:
            self._attempt_failed(_CONN_FAILURE, event.detail, fleets_fault=False, exhausted=True)
        else:
            self._attempt_failed(_CONN_FAILURE, event.detail, fleets_fault=not event.local)

    def _offered_connection_failed(self, event: Event) -> None:
        self._out.append(FleetUnreachable(refused=True))

    def _connect_timer(self, event: TimerFired) -> None:
        if event.timer is not _CONNECT_TIMER:
            raise IllegalEvent(self.state, event)
        detail = f"no connection within {self.rules.connect_timeout:g}s"
        self._attempt_failed(_CONN_FAILURE, detail, refused=False)

    def _response_timer(self, event: TimerFired) -> None:
        if event.timer is not _RESPONSE_TIMER:
            raise IllegalEvent(self.state, event)
        detail = f"no response head within {self.rules.response_timeout:g}s"
        self._attempt_failed(_RESPONSE_TIMEOUT, detail)

    def _fleet_error(self, event: FleetError) -> None:
        self._out.append(_CANCEL[_RESPONSE_TIMER])
        self._attempt_failed(event.failure, event.detail)

    def _attempt_failed(
        self,
        failure: Failure,
        detail: str,
        *,
        fleets_fault: bool = True,
        refused: bool = True,
        exhausted: bool = False,
    ) -> None:
        """`exhausted`: this process is out of descriptors or memory; not tried
        again whatever the retry policy says (the next attempt, on any fleet,
        fails the same at once)."""
        fleet = self.fleet
        assert fleet is not None
        self.fleet_open = False
        self._out.append(DropFleet())
        if failure is _CONN_FAILURE and fleets_fault:
            self._out.append(FleetUnreachable(refused))  # before its slot goes back
        self._release_slot()
        self.give_up = GIVE_UP_ANSWER[failure] if fleets_fault else local_give_up_answer(detail)
        self._left(failure.value)
        self._out.append(LogAttemptFailed(fleet.name, self.attempt, failure, detail, exhausted))
        if not exhausted and self.rules.retry.retry_failure(failure, self.attempt):
            if fleets_fault:  # this host's own want is no retry or redispatch of the fleet's
                fleet.retries += 1
                self.retried_from = fleet
            self._take_slot()
        else:
            self._answer(*self.give_up)

    def _fleet_went_down(self, event: Event) -> None:
        """Its fleet went DOWN while this attempt connects or waits for the
        answer: given up and retried now, as it would be at its timer (a fleet
        failing its health checks seldom answers; the carrier waited the whole
        timeouts.response, 5 s, for the 504 and its retry). Only when the policy
        retries the failure that wait would end in (conn-failure connecting,
        response-timeout awaiting) with attempts left: else nothing is gained by
        giving it up, and it is waited for as before (a fleet DOWN keeps its
        calls, and may still answer this one). No byte has reached the carrier.
        Counted as a retry on the fleet (a redispatch once another takes it),
        not against its health (its probes said so already). With no other
        fleet to take it, the carrier gets what the timer would have brought:
        503 connecting, 504 awaiting."""
        fleet = self.fleet
        assert fleet is not None
        connecting = self.state is _CONNECTING
        waited_for = _CONN_FAILURE if connecting else _RESPONSE_TIMEOUT
        if not self.rules.retry.retry_failure(waited_for, self.attempt):
            return
        self.fleet_open = False
        self._out += (_CANCEL[_STAGE_TIMER[self.state]], DropFleet())
        self._release_slot()
        self.give_up = GIVE_UP_ANSWER[_CONN_FAILURE if connecting else _FLEET_DOWN]
        stage = "connected" if connecting else "answered"
        detail = f"the fleet went DOWN before it {stage}: given up, tried again"
        self._left(_FLEET_DOWN.value)
        self._out.append(LogAttemptFailed(fleet.name, self.attempt, _FLEET_DOWN, detail))
        fleet.retries += 1
        self.retried_from = fleet
        self._take_slot()

    def _fleet_head(self, event: FleetHead) -> None:
        fleet = self.fleet
        assert fleet is not None
        self._out.append(_CANCEL[_RESPONSE_TIMER])
        fleet.responses[event.status] += 1
        if event.status == 429 and not event.switched:
            self._out.append(FleetFull())  # before its slot may go back (a retry)
        if not event.switched and self.rules.retry.retry_status(event.status, self.attempt):
            self._left(str(event.status))
            self.fleet_open = False
            self._out.append(DropFleet())
            self._release_slot()
            fleet.retries += 1
            self.retried_from = fleet
            self._take_slot()
            return
        self.status = event.status
        if event.switched:
            self.state = _TUNNEL
            fleet.calls_total += 1
            self._out.append(_LINK)  # switched: a 101
        else:
            self.state = _RELAYING
            self._end(_END_REFUSED)
            self._out.append(Relay(event.status))

    def _setup_failed(self, event: Event) -> None:
        if self.state in (_CONNECTING, _AWAITING):
            self.fleet_open = False
            self._out += (_CANCEL[_STAGE_TIMER[self.state]], DropFleet())
        elif self.state is _LEASING:
            self._out.append(CancelSlotWait())
        self._release_slot()
        self._end(_END_ERROR)  # before the answer's REFUSED: the ingress failed
        self._answer(502, "internal error while connecting the call")

    def _carrier_lost_in_setup(self, event: CarrierLost) -> None:
        self.carrier_open = False
        self._end_lost(_CARRIER, event)
        if self.state is _LEASING:
            self._out.append(CancelSlotWait())
        else:
            self.fleet_open = False
            self._out += (_CANCEL[_STAGE_TIMER[self.state]], DropFleet())
        self._release_slot()
        self._gone_if_both()

    def _end_requested_in_setup(self, event: EndRequested) -> None:
        self._end(event.reason)
        if self.state is _LEASING:
            self._out.append(CancelSlotWait())
        else:
            self.fleet_open = False
            self._out += (_CANCEL[_STAGE_TIMER[self.state]], DropFleet())
        # The slot goes back with the carrier (CarrierLost in CLOSING), as the
        # call holds it until then: a forced removal waits for both.
        self.state = _CLOSING
        if self.carrier_open and event.reason not in _ABORTED_CARRIER:
            # Its request is answered, as every refusal is (SPEC 4): closed
            # bare, a carrier queued or connecting at a drain's end read no
            # HTTP response at all, as if this host had crashed.
            self.status = 503
            self.answer_text = _SETUP_END_ANSWER.get(event.reason, "the call was ended")
            self._out.append(Answer(503, self.answer_text))
        self._close_carrier(event.reason)

    # Linked: the tunnel, or a non-101 answer relayed -----------------------

    def _close_frame(self, event: CloseFrameSeen) -> None:
        if self.hung_up_by is None:
            self.hung_up_by = _HUNG_UP_BY[event.side]
            self.reply_due_from = _OTHER[event.side]
        elif event.side is self.reply_due_from:
            # The close handshake is done, both frames relayed whole: nothing
            # may follow either way (RFC 6455 5.5.1), so both sides are closed
            # now, as the fleet (the server) would close TCP. Left to the
            # sides, a fleet that kept its TCP open after its reply, with a
            # carrier waiting for the server's close (7.1.1), held the call
            # and its fleet slot until carrier_silence (30 s), logged
            # "carrier_silent" (the WebSocket shapes check of session 37).
            self.reply_due_from = None
            self._end(self.hung_up_by)
            self.state = _CLOSING
            self._out += (_CLOSE[_CARRIER], _CLOSE[_FLEET])

    def _side_finished(self, event: SideFinished) -> None:
        """A side that sent its close frame and then finished sending (TLS
        1.3's close_notify, a FIN) still gets the other side's close reply:
        the call ends once that reply is relayed, the other side ends too, or
        the grace passes. A side that finishes with no reply due is closed,
        as one that left (the pump closes it; its loss closes the other)."""
        if self.reply_due_from is not _OTHER[event.side]:
            return
        self._end(self._lost_reason(event.side, _LOST_CLOSED))
        self.state = _HALF_CLOSED
        self._out.append(_HALF_CLOSED_GRACE)
        if event.side is _FLEET:
            # The bot hung up and is done (its close frame, then its FIN or
            # close_notify): the fleet's capacity is free now (SPEC 4), not
            # when the carrier's reply comes or the grace passes. After its
            # carrier vanished, its slot was held the whole grace (5.2 s, the
            # dead-peer audit of session 39).
            self._release_slot()

    # Half-closed: one side has finished sending ----------------------------

    def _close_frame_half_closed(self, event: CloseFrameSeen) -> None:
        if event.side is self.reply_due_from:  # the reply, relayed: nothing follows
            self.reply_due_from = None
            self._close_both()

    def _side_finished_half_closed(self, event: SideFinished) -> None:
        if event.side is self.reply_due_from:  # it ends without a reply
            self._close_both()

    def _half_closed_timer(self, event: TimerFired) -> None:
        assert event.timer is _HALF_CLOSED_TIMER
        self.state = _CLOSING
        self._out += (_CLOSE[_CARRIER], _CLOSE[_FLEET])

    def _close_both(self) -> None:
        self.state = _CLOSING
        self._out += (_CANCEL[_HALF_CLOSED_TIMER], _CLOSE[_CARRIER], _CLOSE[_FLEET])

    def _carrier_lost_half_closed(self, event: CarrierLost) -> None:
        self._out.append(_CANCEL[_HALF_CLOSED_TIMER])
        self._carrier_lost_linked(event)

    def _fleet_lost_half_closed(self, event: FleetLost) -> None:
        self._out.append(_CANCEL[_HALF_CLOSED_TIMER])
        self._fleet_lost_linked(event)

    def _end_requested_half_closed(self, event: EndRequested) -> None:
        assert self.reply_due_from is not None
        if event.reason is _SILENT[_OTHER[self.reply_due_from]]:
            # The side that finished is silent by design, not gone: what was
            # written to it is flushed, not reset away.
            self._close_both()
            return
        if self.reply_waited_for and event.reason in _REPLY_WAITED_FOR:
            return  # asked again (a second end-call, a drain's end): the first wait stands
        self._out.append(_CANCEL[_HALF_CLOSED_TIMER])
        self._end_requested_linked(event)

    def _wait_for_the_reply(self, event: EndRequested) -> bool:
        """An end asked of the ingress (`_REPLY_WAITED_FOR`) while a side's
        close reply is due: the call is the side's that hung up, and the reply
        is waited for as in HALF_CLOSED, GOODBYE_REPLY_WAIT at most from the
        first ask (a second does not restart it; in HALF_CLOSED already, in
        place of what is left of its grace).
        Closed at once (before), the side that hung up never got the reply
        (1006 to websockets), and the access line said 'drain' or 'admin'
        (the review of session 37)."""
        if (
            self.state not in (_TUNNEL, _HALF_CLOSED)
            or self.reply_due_from is None
            or self.hung_up_by is None
            or event.reason not in _REPLY_WAITED_FOR
        ):
            return False
        self._end(self.hung_up_by)
        self.state = _HALF_CLOSED
        self.reply_waited_for = True
        self._out.append(_GOODBYE_REPLY_WAIT)
        return True

    def _carrier_lost_linked(self, event: CarrierLost) -> None:
        tunnel = self.state is _TUNNEL
        self.carrier_open = False
        self._end_lost(_CARRIER, event)
        if self.fleet_open:
            self._out.append(CloseSide(_FLEET, self._goodbye(tunnel)))
        self._gone_if_both()

    def _fleet_lost_linked(self, event: FleetLost) -> None:
        tunnel = self.state is _TUNNEL
        self.fleet_open = False
        self._end_lost(_FLEET, event)
        self._release_slot()
        if self.carrier_open:
            self._out.append(CloseSide(_CARRIER, self._goodbye(tunnel)))
        self._gone_if_both()

    def _goodbye(self, tunnel: bool) -> Goodbye | None:
        """The close frame a side still open is sent as the call ends: only a
        tunnel's (WebSocket frames flow), only when no side sent one."""
        if not tunnel or self.hung_up_by is not None or self.end_reason is None:
            return None
        return GOODBYES.get(self.end_reason)

    def _answer_complete(self, event: Event) -> None:
        self.state = _CLOSING
        self._out += (_CLOSE[_FLEET], _CLOSE[_CARRIER])

    def _end_requested_linked(self, event: EndRequested) -> None:
        """A silent side is gone, so it is aborted rather than left to wait for a
        TLS close it will never answer; the other side is closed cleanly (pending
        bytes flushed, TLS close_notify, then TCP), so a bot or a carrier hears at
        once that the call is over."""
        if self._wait_for_the_reply(event):
            return
        tunnel = self.state is _TUNNEL
        if self.end_reason is None and event.why:
            self.error_text = event.why
        elif self.state is _RELAYING and event.reason is _END_TIMEOUT:
            # The relay's watch: the fleet's answer stalled before its end, and
            # the carrier gets it cut short ("refused" alone hid that).
            self.error_text = (
                "the fleet's answer stalled before its end: "
                f"cut, no byte for timeouts.response ({self.rules.response_timeout:g}s)"
            )
        self._end(event.reason)
        goodbye = self._goodbye(tunnel)
        self.state = _CLOSING
        if event.reason in _ABORTED_FLEET and self.fleet_open:
            # Aborted first: the carrier's close frame then waits for no frame
            # of the fleet's that will never end (a silent fleet may have
            # stalled mid-frame).
            self._out.append(AbortSide(_FLEET))
            self._close_carrier(event.reason, goodbye)
            return
        self._close_carrier(event.reason, goodbye)
        if self.fleet_open:
            self._out.append(CloseSide(_FLEET, goodbye))

    def _close_carrier(self, reason: EndReason, goodbye: Goodbye | None = None) -> None:
        if self.carrier_open:
            gone = reason in _ABORTED_CARRIER
            self._out.append(AbortSide(_CARRIER) if gone else CloseSide(_CARRIER, goodbye))

    # Closing ---------------------------------------------------------------

    def _carrier_lost_closing(self, event: CarrierLost) -> None:
        self.carrier_open = False
        self._end_lost(_CARRIER, event)
        if not self.fleet_open:
            self._release_slot()  # held by a call ended in its setup
        self._gone_if_both()

    def _fleet_lost_closing(self, event: FleetLost) -> None:
        self.fleet_open = False
        self._end_lost(_FLEET, event)
        self._release_slot()
        self._gone_if_both()

    def _end_requested_closing(self, event: EndRequested) -> None:
        # Asked again (a drain after the sweep, a stop's second pass): close
        # again, for a side that is slow to go; the first reason stands.
        self._end(event.reason)
        self._close_carrier(event.reason)
        if self.fleet_open:
            silent = event.reason is _END_FLEET_SILENT
            self._out.append(AbortSide(_FLEET) if silent else _CLOSE[_FLEET])

    def _ignore(self, event: Event) -> None:
        """Legal and without effect: late news about a call already ending."""

    def _slot_granted_late(self, event: Event) -> None:
        # A slot handed over as the call ended: it goes back at once.
        self._out.append(_RELEASE_SLOT)


_STAGE_TIMER = {State.CONNECTING: Timer.CONNECT, State.AWAITING: Timer.RESPONSE}
# Where an end reason, once given, is the call's end (`CallEnded`): all but
# RELAYING, whose answer goes on to its end (`FleetAnswerComplete`).
_SETTLED = frozenset({State.HALF_CLOSED, State.ANSWERING, State.CLOSING, State.ENDED})

_M = CallMachine
_SETUP_ENDS: dict[type[Event], Handler] = {
    CarrierLost: _M._carrier_lost_in_setup,
    EndRequested: _M._end_requested_in_setup,
    SetupFailed: _M._setup_failed,
}


CallMachine.TRANSITIONS = {
    State.HEAD: {
        HeadComplete: _M._head_complete,
        HeadRefused: _M._head_refused,
        TimerFired: _M._request_timer,
        CarrierLost: _M._carrier_lost_before_call,
    },
    State.PARSING: {
        HeadParsed: _M._head_parsed,
        HeadRefused: _M._head_refused,
        CarrierLost: _M._carrier_lost_before_call,
    },
    State.LEASING: {
        SlotGranted: _M._slot_granted,
        SlotRefused: _M._slot_refused,
        **_SETUP_ENDS,
    },
    State.CONNECTING: {
        FleetConnected: _M._fleet_connected,
        FleetConnectFailed: _M._connect_failed,
        OfferedConnectionFailed: _M._offered_connection_failed,
        TimerFired: _M._connect_timer,
        FleetWentDown: _M._fleet_went_down,
        **_SETUP_ENDS,
    },
    State.AWAITING: {
        FleetHead: _M._fleet_head,
        FleetError: _M._fleet_error,
        TimerFired: _M._response_timer,
        FleetWentDown: _M._fleet_went_down,
        **_SETUP_ENDS,
    },
    State.TUNNEL: {
        CloseFrameSeen: _M._close_frame,
        SideFinished: _M._side_finished,
        CarrierLost: _M._carrier_lost_linked,
        FleetLost: _M._fleet_lost_linked,
        EndRequested: _M._end_requested_linked,
    },
    State.HALF_CLOSED: {
        CloseFrameSeen: _M._close_frame_half_closed,
        SideFinished: _M._side_finished_half_closed,
        TimerFired: _M._half_closed_timer,
        CarrierLost: _M._carrier_lost_half_closed,
        FleetLost: _M._fleet_lost_half_closed,
        EndRequested: _M._end_requested_half_closed,
    },
    State.RELAYING: {
        FleetAnswerComplete: _M._answer_complete,
        CarrierLost: _M._carrier_lost_linked,
        FleetLost: _M._fleet_lost_linked,
        EndRequested: _M._end_requested_linked,
    },
    State.ANSWERING: {
        CarrierLost: _M._carrier_lost_closing,
        EndRequested: _M._end_requested_closing,
    },
    State.CLOSING: {
        CarrierLost: _M._carrier_lost_closing,
        FleetLost: _M._fleet_lost_closing,
        EndRequested: _M._end_requested_closing,
        CloseFrameSeen: _M._ignore,
        SideFinished: _M._ignore,
        FleetAnswerComplete: _M._ignore,
        SlotGranted: _M._slot_granted_late,
    },
    State.ENDED: {
        EndRequested: _M._ignore,
        SlotGranted: _M._slot_granted_late,
    },
}
