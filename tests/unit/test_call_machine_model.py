"""A stateful model of one carrier connection's state machine
(`core.call_machine.CallMachine`), driven by a model of the asyncio pump that
feeds it (`net/proxy.py`: CarrierProtocol, FleetProtocol): hypothesis runs random
sequences of the events the pump could feed at each point and carries out the
commands the machine returns, as the pump would.

What it models: a carrier's request head (complete, refused, parsed as a call,
the health check, a path no route has, a call route without an upgrade); the
slot source (a grant on one of two fleets, drained or not, a refusal); a fleet
attempt (connected, with the connect task still running or done; refused
locally or not; its fleet gone DOWN before it answered; its head: 101, 503,
429, 200, a 429 that says it switched; empty or junk answers; an answer
relayed to its end); a tunnel's close frames and clean EOFs from either side,
half-closes; either side lost (closed, gone,
reset); timers firing; the outside's end requests (drain, removal, silence,
tunnel timeout); SetupFailed from the slot or connect task; retries 0 to 2,
with 503 and 429 retried or not. An event is fed only when the pump could feed
it then: timers only if started and not cancelled, fleet events only from the
live, undropped attempt, slot answers only while the slot task runs,
EndRequested only for a registered call, silence reasons only once the sweep
watches the call (else a drain). Early-ending events (losses, refusals,
failures, timers, end requests) are gated to one in `rare` (2, 4 or 8) so that
calls also get far; three `advance` steps push a call along its good path.

Invariants:
- the machine takes every such event (IllegalEvent is a failure);
- its commands are ones the pump can carry out: TakeSlot only with no slot
  task running and no slot held; ConnectFleet only holding a slot, on that
  slot's fleet, with no attempt live; SendHead, Link and Relay only on a
  connected attempt; FleetFull and FleetUnreachable only holding a slot;
  OpenCall once; CallEnded once and only for a call, then SidesGone once
  (with it or after: its sides closing meanwhile, nothing but closing said to
  them); after SidesGone, nothing but ReleaseSlot; no command the pump does
  not know;
- a running timer is one its state may fire (else the fire would raise);
- the machine's `slot_held` is the pump's; each slot is released at most once
  (every ReleaseSlot counts: a second one for the same grant fails);
- the end reason, once set, never changes;
- ENDED is clean: no timer, no slot held, a call ended once with a reason, a
  head that was no call never reported as one;
- at teardown, with every side going as sockets would (the slot task refused,
  a connect failing, an answer empty, the carrier then the fleet closed, the
  timers fired), the machine reaches ENDED within 12 steps and every slot
  granted was released exactly once.

Modelling limits:
- one call per example, with its own machine; the wire and the loop are
  synchronous: a command is carried out before the next event, so events
  racing a command (a fleet byte after DropFleet, a timer fired after its
  cancel) are not fed, and neither is a slot granted after the call ended;
- SetupFailed comes only while the slot task or the connect task runs: never
  after the fleet's head (data is read only once the connect task is done);
- bytes are not modelled: the tunnel's hot path (data, flow control) is not
  the machine's, only its close frames and EOFs are events; a head is one of
  four fixed ones;
- the slot source is two fixed fleets, not the balancer or the host table
  (test_host_slots_model.py models that side).

The normal run is derandomized (tests/property_settings.py). A longer, random
run: FLEET_INGRESS_PROPERTY_EXAMPLES=3000 .venv/bin/python -m pytest -q
-p no:cacheprovider tests/unit/test_call_machine_model.py (20 to 40 ms an
example on one core; `--hypothesis-show-statistics` lists the transitions
taken).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.call_machine import (
    AbortSide,
    Answer,
    CallEnded,
    CallMachine,
    CallRules,
    CancelSlotWait,
    CancelTimer,
    CarrierLost,
    CloseFrameSeen,
    CloseSide,
    ConnectFleet,
    DropFleet,
    EndReason,
    EndRequested,
    FleetAnswerComplete,
    FleetConnected,
    FleetConnectFailed,
    FleetError,
    FleetFull,
    FleetHead,
    FleetLost,
    FleetUnreachable,
    FleetWentDown,
    HeadComplete,
    HeadParsed,
    HeadRefused,
    Link,
    LogAttemptFailed,
    Lost,
    OpenCall,
    ParseHead,
    Relay,
    ReleaseSlot,
    SendHead,
    SetupFailed,
    Side,
    SideFinished,
    SidesGone,
    SlotGranted,
    SlotRefused,
    StartTimer,
    State,
    TakeSlot,
    Timer,
    TimerFired,
)
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.request_head import parse_request_head
from fleet_ingress.core.retry import Failure, RetryPolicy
from fleet_ingress.core.routing import Router
from tests.property_settings import property_settings

EXAMPLES = 100  # in CI, derandomized; FLEET_INGRESS_PROPERTY_EXAMPLES for more
ALL_CONDITIONS = frozenset(f.value for f in Failure)

ALLOWED_TIMERS = {
    State.HEAD: {Timer.REQUEST},
    State.CONNECTING: {Timer.CONNECT},
    State.AWAITING: {Timer.RESPONSE},
    State.HALF_CLOSED: {Timer.HALF_CLOSED},
}

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def _head(kind: str):
    if kind == "call":
        raw = (
            b"GET /ws/bot1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    elif kind == "health":
        raw = b"GET /haproxy-health HTTP/1.1\r\nHost: x\r\n\r\n"
    elif kind == "notfound":
        raw = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    else:  # a call route without upgrade
        raw = b"GET /ws/bot1 HTTP/1.1\r\nHost: x\r\n\r\n"
    return parse_request_head(raw)


HEADS = {k: _head(k) for k in ("call", "health", "notfound", "plain")}


def fleets() -> list[FleetState]:
    specs = parse_fleets_text(
        "http://127.0.0.1:9001 name=f1 maxconn=5\nhttp://127.0.0.1:9002 name=f2 maxconn=5\n",
        default_maxconn=5,
    )
    return [FleetState(s) for s in specs]


@dataclass
class Lease:
    fleet: FleetState
    held: bool = True
    releases: int = 0


@dataclass
class Attempt:
    fleet: FleetState
    phase: str = "connecting"  # connecting | connected | tunnel | relaying | closing
    task: bool = True  # the connect task still runs
    eof: bool = False
    answer_complete: bool = False


# What a call logged (CallEnded) may still be told: its sides' closing.
_CLOSING_COMMANDS = (CloseSide, AbortSide, CancelTimer, StartTimer, ReleaseSlot, SidesGone)


class CallMachineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m: CallMachine | None = None
        self.fleets = fleets()

    @initialize(
        retries=st.integers(0, 2),
        statuses=st.sampled_from([frozenset(), frozenset({503}), frozenset({503, 429})]),
        rare=st.sampled_from([2, 4, 8]),
    )
    def start(self, retries, statuses, rare):
        self.rare = rare  # early-ending events happen 1 time in `rare`
        rules = CallRules(
            router=Router(["/ws/"], "/haproxy-health"),
            retry=RetryPolicy(retries=retries, conditions=ALL_CONDITIONS, statuses=statuses),
            request_timeout=20.0,
            connect_timeout=3.0,
            response_timeout=5.0,
        )
        self.m = CallMachine(rules)
        self.timers: set[Timer] = set()
        self.slot_task = False
        self.lease: Lease | None = None
        self.leases: list[Lease] = []
        self.attempt: Attempt | None = None
        self.carrier_alive = True  # its transport not lost yet
        self.carrier_closing = False
        self.carrier_peer = False  # linked (hot path: close frames, eof)
        self.carrier_eof = False
        self.parse_pending = False
        self.registered = False
        self.watched = False
        self.ended_calls = 0
        self.sides_gone = 0
        self.closing = False  # logged, its sides closing: in the registry's `closing`
        self.reason_seen: EndReason | None = None
        self._run(self.m.start())

    # -- the pump ----------------------------------------------------------------

    def feed(self, ev) -> None:
        m = self.m
        assert m is not None
        before = m.state
        commands = m.feed(ev)  # IllegalEvent propagates: a failure
        if before is State.ENDED or self.sides_gone:
            for c in commands:
                assert isinstance(c, ReleaseSlot), f"command {c} after the call ended ({ev})"
        elif self.ended_calls:  # logged: its sides are closing, nothing more
            for c in commands:
                assert isinstance(c, _CLOSING_COMMANDS), f"command {c} after the line ({ev})"
        self._run(commands)
        event(f"{before.value} --{type(ev).__name__}--> {m.state.value}")

    def _run(self, commands) -> None:
        m = self.m
        for c in commands:
            if isinstance(c, Answer):
                pass  # written to the carrier (a carrier already gone drops it)
            elif isinstance(c, ParseHead):
                self.parse_pending = True
            elif isinstance(c, OpenCall):
                assert not self.registered, "OpenCall twice"
                self.registered = True
            elif isinstance(c, TakeSlot):
                assert not self.slot_task, "TakeSlot while a slot task runs"
                assert self.lease is None or not self.lease.held, "TakeSlot while holding a slot"
                self.slot_task = True
            elif isinstance(c, CancelSlotWait):
                self.slot_task = False
            elif isinstance(c, ReleaseSlot):
                # Each one counts: the machine says a release once per grant.
                assert self.lease is not None, "ReleaseSlot before any slot was granted"
                self.lease.held = False
                self.lease.releases += 1
            elif isinstance(c, (FleetFull, FleetUnreachable)):
                assert self.lease is not None and self.lease.held, f"{c} with no slot held"
            elif isinstance(c, ConnectFleet):
                assert self.attempt is None, "ConnectFleet while an attempt is live"
                assert self.lease is not None and self.lease.held, "ConnectFleet with no slot held"
                assert c.fleet is self.lease.fleet, "ConnectFleet to another fleet than its slot's"
                self.attempt = Attempt(c.fleet)
            elif isinstance(c, SendHead):
                assert self.attempt is not None and self.attempt.phase == "connected", (
                    "SendHead on no connected attempt"
                )
            elif isinstance(c, DropFleet):
                # _cancel_task (the connect task), pump=None: nothing more from it
                self.attempt = None
            elif isinstance(c, LogAttemptFailed):
                pass
            elif isinstance(c, Link):
                a = self.attempt
                assert a is not None and a.phase == "connected", "Link on no connected attempt"
                a.phase = "tunnel"
                self.carrier_peer = True
                self.watched = True
            elif isinstance(c, Relay):
                a = self.attempt
                assert a is not None and a.phase == "connected", "Relay on no connected attempt"
                a.phase = "relaying"
                self.watched = True
            elif isinstance(c, (CloseSide, AbortSide)):
                if c.side is Side.CARRIER:
                    self.carrier_closing = True
                elif self.attempt is not None:
                    self.attempt.phase = "closing"
            elif isinstance(c, StartTimer):
                self.timers.add(c.timer)
            elif isinstance(c, CancelTimer):
                self.timers.discard(c.timer)
            elif isinstance(c, CallEnded):
                assert m.is_call, "CallEnded for a head that was no call"
                assert c.reason is m.end_reason, "CallEnded with another reason than the call's"
                self.ended_calls += 1
                assert self.ended_calls == 1, "CallEnded twice"
                self.registered = False
                self.closing = True  # a stop's end still asks it to end (every_call)
            elif isinstance(c, SidesGone):
                assert self.ended_calls == 1, "SidesGone before its CallEnded"
                self.sides_gone += 1
                assert self.sides_gone == 1, "SidesGone twice"
                self.closing = False
                self.slot_task = False  # _sides_gone cancels the task
            else:
                raise AssertionError(f"unknown command {c}")

    def _started(self) -> bool:
        return self.m is not None

    # -- carrier events --------------------------------------------------------------

    @precondition(lambda self: self._started() and self.carrier_alive)
    @rule(_gate=st.integers(0, 7), how=st.sampled_from(list(Lost)))
    def carrier_lost(self, how, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        self.carrier_alive = False
        self.carrier_peer = False
        self.feed(CarrierLost(how))

    @precondition(
        lambda self: (
            self._started()
            and self.carrier_alive
            and not self.carrier_closing
            and self.m.state is State.HEAD
        )
    )
    @rule()
    def head_complete(self):
        self.feed(HeadComplete())

    @precondition(
        lambda self: (
            self._started()
            and self.carrier_alive
            and not self.carrier_closing
            and (
                self.m.state is State.HEAD or (self.m.state is State.PARSING and self.parse_pending)
            )
        )
    )
    @rule(_gate=st.integers(0, 7))
    def head_refused(self, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        self.parse_pending = False
        self.feed(HeadRefused(400, "bad"))

    @precondition(
        lambda self: (
            self._started()
            and self.carrier_alive
            and not self.carrier_closing
            and self.m.state is State.PARSING
            and self.parse_pending
        )
    )
    @rule(kind=st.sampled_from(["call", "call", "call", "health", "notfound", "plain"]))
    def head_parsed(self, kind):
        self.parse_pending = False
        self.feed(HeadParsed(HEADS[kind]))

    @precondition(
        lambda self: (
            self._started()
            and self.carrier_alive
            and self.carrier_peer
            and not self.carrier_closing
        )
    )
    @rule()
    def carrier_close_frame(self):
        self.feed(CloseFrameSeen(Side.CARRIER))

    @precondition(
        lambda self: (
            self._started()
            and self.carrier_alive
            and self.carrier_peer
            and not self.carrier_eof
            and not self.carrier_closing
        )
    )
    @rule()
    def carrier_eof_clean(self):
        self.carrier_eof = True
        self.feed(SideFinished(Side.CARRIER))
        # eof_received returns False unless HALF_CLOSED: the transport closes
        if self.m.state is not State.HALF_CLOSED:
            self.carrier_closing = True

    # -- slot source -------------------------------------------------------------------

    @precondition(lambda self: self._started() and self.slot_task)
    @rule(which=st.integers(0, 1), drained=st.booleans())
    def slot_granted(self, which, drained):
        self.slot_task = False
        fleet = self.fleets[which]
        fleet.admin = Admin.DRAIN if drained else Admin.READY
        assert self.lease is None or not self.lease.held, "a new grant overwrites a held lease"
        self.lease = Lease(fleet)
        self.leases.append(self.lease)
        self.feed(SlotGranted(fleet))

    @precondition(lambda self: self._started() and self.slot_task)
    @rule(_gate=st.integers(0, 7))
    def slot_refused(self, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        self.slot_task = False
        self.feed(SlotRefused("no fleet is up"))

    @precondition(
        lambda self: (
            self._started() and (self.slot_task or (self.attempt is not None and self.attempt.task))
        )
    )
    @rule(_gate=st.integers(0, 7))
    def setup_failed(self, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        # _lease / _connect raised something unexpected (only while their task runs)
        if self.slot_task:
            self.slot_task = False
        else:
            self.attempt.task = False
        self.feed(SetupFailed("boom"))

    # -- fleet attempt ----------------------------------------------------------------

    def _attempt_phase(self, *phases) -> bool:
        return self._started() and self.attempt is not None and self.attempt.phase in phases

    @precondition(lambda self: self._attempt_phase("connecting") and self.attempt.task)
    @rule(task_done=st.booleans())
    def fleet_connected(self, task_done=True):
        # connection_made runs inside create_connection: the task may still be on
        self.attempt.phase = "connected"
        self.attempt.task = not task_done
        self.feed(FleetConnected())

    @precondition(lambda self: self._attempt_phase("connecting") and self.attempt.task)
    @rule(
        _gate=st.integers(0, 7),
        kind=st.sampled_from(["fleet", "local", "unresolved", "exhausted"]),
    )
    def fleet_connect_failed(self, kind, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        self.attempt.task = False
        self.feed(
            FleetConnectFailed(
                "refused",
                local=kind in ("local", "exhausted"),
                unresolved=kind == "unresolved",
                exhausted=kind == "exhausted",
            )
        )

    @precondition(lambda self: self._attempt_phase("connected"))
    @rule(
        answer=st.sampled_from([(101, True), (503, False), (429, False), (200, False), (429, True)])
    )
    def fleet_head(self, answer):
        status, switched = answer
        if status == 429 and switched:
            status = 101
        self.attempt.task = False  # data is read only after the connect task has finished
        self.feed(FleetHead(status, switched))

    @precondition(lambda self: self._attempt_phase("connected"))
    @rule(
        _gate=st.integers(0, 7),
        failure=st.sampled_from([Failure.EMPTY_RESPONSE, Failure.JUNK_RESPONSE]),
    )
    def fleet_error(self, failure, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        self.attempt.task = False
        self.feed(FleetError(failure, "x"))

    @precondition(
        lambda self: (
            self._attempt_phase("connecting", "connected")
            and self.lease is not None
            and self.lease.held
            and self.m.state in (State.CONNECTING, State.AWAITING)
        )
    )
    @rule(_gate=st.integers(0, 7))
    def fleet_went_down(self, _gate=None):
        # The pump feeds it for the attempt under way alone (`fleet_went_down`).
        if _gate is not None and _gate % self.rare:
            return
        self.feed(FleetWentDown())

    @precondition(lambda self: self._attempt_phase("relaying") and not self.attempt.answer_complete)
    @rule()
    def fleet_answer_complete(self):
        self.attempt.answer_complete = True
        self.feed(FleetAnswerComplete())

    @precondition(lambda self: self._attempt_phase("tunnel"))
    @rule()
    def fleet_close_frame(self):
        self.feed(CloseFrameSeen(Side.FLEET))

    @precondition(lambda self: self._attempt_phase("tunnel") and not self.attempt.eof)
    @rule()
    def fleet_eof_clean(self):
        self.attempt.eof = True
        self.feed(SideFinished(Side.FLEET))
        if self.m.state is not State.HALF_CLOSED and self.attempt is not None:
            self.attempt.phase = "closing"

    @precondition(lambda self: self._attempt_phase("tunnel", "relaying", "closing"))
    @rule(how=st.sampled_from(list(Lost)))
    def fleet_lost(self, how):
        a = self.attempt
        if a.phase == "relaying" and not a.answer_complete:
            a.answer_complete = True
            self.feed(FleetAnswerComplete())
        if self.attempt is a:
            self.attempt = None
            self.feed(FleetLost(how))

    # -- timers and the outside ---------------------------------------------------------

    @precondition(lambda self: self._started() and self.timers)
    @rule(_gate=st.integers(0, 7), data=st.data())
    def timer_fires(self, data, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        timer = data.draw(st.sampled_from(sorted(self.timers, key=lambda t: t.value)))
        self.timers.discard(timer)
        self.feed(TimerFired(timer))

    @precondition(lambda self: self._started() and (self.registered or self.closing))
    @rule(
        _gate=st.integers(0, 7),
        reason=st.sampled_from(
            [
                EndReason.DRAIN,
                EndReason.REMOVED,
                EndReason.CARRIER_SILENT,
                EndReason.FLEET_SILENT,
                EndReason.TIMEOUT,
            ]
        ),
    )
    def end_requested(self, reason, _gate=None):
        if _gate is not None and _gate % self.rare:
            return
        if reason in (EndReason.CARRIER_SILENT, EndReason.FLEET_SILENT, EndReason.TIMEOUT):
            # The sweep watches live linked calls only; one logged and closing
            # is asked to end by a stop's end (or a forced removal) alone.
            if not self.watched or self.closing:
                reason = EndReason.DRAIN  # the sweep watches linked calls only
        self.feed(EndRequested(reason))

    @precondition(lambda self: self._started() and self.m.state is State.ENDED)
    @rule()
    def idle(self):
        pass

    def _advance(self, status):
        """The natural next step of a call that goes well (weights the search
        toward tunnels, half-closes and relays)."""
        m = self.m
        if m.state is State.HEAD and self.carrier_alive and not self.carrier_closing:
            self.head_complete()
        elif m.state is State.PARSING and self.parse_pending and not self.carrier_closing:
            self.head_parsed("call")
        elif self.slot_task:
            self.slot_granted(0, False)
        elif self.attempt is not None and self.attempt.phase == "connecting" and self.attempt.task:
            self.fleet_connected(True)
        elif self.attempt is not None and self.attempt.phase == "connected":
            self.fleet_head(status)

    @precondition(lambda self: self._started() and self.m.state is not State.ENDED)
    @rule(status=st.sampled_from([(101, True), (101, True), (503, False), (429, False)]))
    def advance(self, status):
        self._advance(status)

    @precondition(lambda self: self._started() and self.m.state is not State.ENDED)
    @rule(status=st.sampled_from([(101, True), (200, False)]))
    def advance2(self, status):
        self._advance(status)

    @precondition(lambda self: self._started() and self.m.state is not State.ENDED)
    @rule()
    def advance3(self):
        self._advance((101, True))

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def timers_legal(self):
        if self.m is None:
            return
        allowed = ALLOWED_TIMERS.get(self.m.state, set())
        assert self.timers <= allowed, (
            f"timer(s) {self.timers - allowed} running in {self.m.state}: "
            "firing would raise IllegalEvent"
        )

    @invariant()
    def slot_flag_matches(self):
        if self.m is None:
            return
        held = self.lease is not None and self.lease.held
        assert self.m.slot_held == held, f"machine slot_held {self.m.slot_held} != pump {held}"
        assert all(lease.releases <= 1 for lease in self.leases), "a slot released twice"

    @invariant()
    def end_reason_stable(self):
        if self.m is None:
            return
        if self.reason_seen is not None:
            assert self.m.end_reason is self.reason_seen, "end reason changed"
        self.reason_seen = self.m.end_reason

    @invariant()
    def ended_clean(self):
        m = self.m
        if m is None or m.state is not State.ENDED:
            return
        assert not self.timers, f"ENDED with timers {self.timers}"
        assert self.lease is None or not self.lease.held, "ENDED holding a slot"
        assert all(not lease.held for lease in self.leases), "ENDED holding a slot"
        assert not self.slot_task or not m.is_call, "ENDED with its slot task running"
        if m.is_call:
            assert self.ended_calls == 1 and m.end_reason is not None, "call ENDED unreported"
            assert self.sides_gone == 1, "call ENDED without SidesGone"
        else:
            assert self.ended_calls == 0, "CallEnded for a head that was no call"
            assert self.sides_gone == 0, "SidesGone for a head that was no call"

    def teardown(self):
        """Drive what is left to its end as the sockets would: every side goes."""
        m = self.m
        if m is None:
            return
        for _ in range(12):
            if m.state is State.ENDED:
                break
            if self.slot_task:
                self.slot_refused()
            elif (
                self.attempt is not None
                and self.attempt.phase == "connecting"
                and self.attempt.task
            ):
                self.fleet_connect_failed(False)
            elif self.attempt is not None and self.attempt.phase == "connected":
                self.fleet_error(Failure.EMPTY_RESPONSE)
            elif self.carrier_alive:
                self.carrier_lost(Lost.CLOSED)
            elif self.attempt is not None:
                self.fleet_lost(Lost.CLOSED)
            elif self.timers:
                t = sorted(self.timers, key=lambda t: t.value)[0]
                self.timers.discard(t)
                self.feed(TimerFired(t))
            else:
                break
            self.timers_legal()
            self.slot_flag_matches()
        assert m.state is State.ENDED, f"stuck in {m.state} with every side gone"
        self.ended_clean()
        assert all(lease.releases == 1 for lease in self.leases), "a lease not released once"


CallMachineModel.TestCase.settings = property_settings(EXAMPLES, stateful_step_count=60)
TestCallMachineModel = CallMachineModel.TestCase
