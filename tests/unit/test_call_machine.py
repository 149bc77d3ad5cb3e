"""A call's life as transcripts (core/call_machine.py), no sockets.

Read like mitmproxy's playbooks: `>> event` is what the pump reports, `<< command`
what the machine must answer, in order and nothing more. Time moves only by
firing a timer the machine started (and did not cancel), so a transcript also
checks the timers. Each race that docs/RELIABILITY.md and
tests/e2e/test_fleet_change_races.py record about a call's life has its
transcript at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.call_machine import (
    GOODBYE_REPLY_WAIT,
    HALF_CLOSED_GRACE,
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
    Command,
    ConnectFleet,
    DropFleet,
    EndReason,
    EndRequested,
    Event,
    FleetAnswerComplete,
    FleetConnected,
    FleetConnectFailed,
    FleetError,
    FleetFull,
    FleetHead,
    FleetLost,
    FleetUnreachable,
    FleetWentDown,
    Goodbye,
    HeadComplete,
    HeadParsed,
    HeadRefused,
    IllegalEvent,
    Link,
    LogAttemptFailed,
    Lost,
    OfferedConnectionFailed,
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
from fleet_ingress.core.request_head import BODY_REFUSED, parse_request_head
from fleet_ingress.core.retry import Failure, RetryPolicy
from fleet_ingress.core.routing import Router

REQUEST_S, CONNECT_S, RESPONSE_S = 20.0, 3.0, 5.0
ALL_CONDITIONS = frozenset(f.value for f in Failure)


def rules(retries: int = 1, statuses: frozenset[int] = frozenset({503})) -> CallRules:
    return CallRules(
        router=Router(["/ws/", "/exotel/"], "/haproxy-health"),
        retry=RetryPolicy(retries=retries, conditions=ALL_CONDITIONS, statuses=statuses),
        request_timeout=REQUEST_S,
        connect_timeout=CONNECT_S,
        response_timeout=RESPONSE_S,
    )


def fleets(*names: str) -> list[FleetState]:
    text = "\n".join(f"https://fleet.test:{i + 1} name={n}" for i, n in enumerate(names))
    return [FleetState(spec) for spec in parse_fleets_text(text, default_maxconn=16)]


def head(
    path: str = "/ws/bot-1",
    *,
    upgrade: bool = True,
    version: str = "1.1",
    key: str = "dGhlIHNhbXBsZSBub25jZQ==",
    connection: str = "Upgrade",
) -> HeadParsed:
    lines = [f"GET {path} HTTP/{version}", "Host: calls.test"]
    if upgrade:
        lines += ["Upgrade: websocket", f"Connection: {connection}"]
        lines += [f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    return HeadParsed(parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode()))


@dataclass
class Playbook:
    """`>>` an event, `<<` each command it must bring, then `assert playbook`."""

    machine: CallMachine
    steps: list[tuple[str, Event | Command]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    started: bool = False
    timers: set[Timer] = field(default_factory=set)

    def __rshift__(self, event: Event) -> Playbook:
        self.steps.append((">>", event))
        return self

    def __lshift__(self, command: Command) -> Playbook:
        self.steps.append(("<<", command))
        return self

    def __bool__(self) -> bool:
        """Run the steps not run yet; raise with the transcript on a mismatch."""
        expected: list[Command] = []
        got: list[Command] = []
        if not self.started:
            self.started = True
            got = self.machine.start()
            self._track(got)
        for kind, item in self.steps:
            if kind == "<<":
                assert isinstance(item, Command)
                expected.append(item)
                continue
            self._check(expected, got)
            assert isinstance(item, Event)
            if isinstance(item, TimerFired):
                # Time moves only by a timer the machine has running.
                assert item.timer in self.timers, f"{item.timer} fired but is not running"
                self.timers.discard(item.timer)
            self.log.append(f">> {item!r}   [{self.machine.state.value}]")
            expected, got = [], self.machine.feed(item)
            self._track(got)
        self._check(expected, got)
        self.steps.clear()
        return True

    def _track(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, StartTimer):
                self.timers.add(command.timer)
            elif isinstance(command, CancelTimer):
                self.timers.discard(command.timer)

    def _check(self, expected: list[Command], got: list[Command]) -> None:
        self.log.extend(f"<< {c!r}" for c in got)
        if expected != got:
            transcript = "\n".join(self.log)
            raise AssertionError(
                f"expected {expected!r}\n     got {got!r}\ntranscript:\n{transcript}"
            )


def new_call(
    *, retries: int = 1, statuses: frozenset[int] = frozenset({503})
) -> tuple[Playbook, CallMachine]:
    machine = CallMachine(rules(retries, statuses))
    return Playbook(machine), machine


def up_to_slot(pb: Playbook, path: str = "/ws/bot-1") -> Playbook:
    """A carrier's upgrade head, read and parsed: the call waits for a slot."""
    prefix = "/" + path.split("/")[1] + "/"
    return (
        pb
        << StartTimer(Timer.REQUEST, REQUEST_S)
        >> HeadComplete()
        << CancelTimer(Timer.REQUEST)
        << ParseHead()
        >> head(path)
        << OpenCall(prefix, path.split("/")[2])
        << TakeSlot(())
    )


def attempt(pb: Playbook, fleet: FleetState, n: int, avoid: tuple[str, ...] = ()) -> Playbook:
    """From a slot granted on `fleet` to the head sent (attempt `n`)."""
    return (
        pb
        >> SlotGranted(fleet)
        << ConnectFleet(fleet, n)
        << StartTimer(Timer.CONNECT, CONNECT_S)
        >> FleetConnected()
        << CancelTimer(Timer.CONNECT)
        << SendHead()
        << StartTimer(Timer.RESPONSE, RESPONSE_S)
    )


def in_tunnel(pb: Playbook, fleet: FleetState) -> Playbook:
    return (
        attempt(up_to_slot(pb), fleet, 1)
        >> FleetHead(101, True)
        << CancelTimer(Timer.RESPONSE)
        << Link(101)
    )


# The normal call -------------------------------------------------------------


def test_a_call_from_its_head_to_its_end():
    (a,) = fleets("a")
    pb, machine = new_call()
    assert (
        in_tunnel(pb, a)
        >> CarrierLost(Lost.CLOSED)
        << CloseSide(Side.FLEET, Goodbye(1001, "carrier closed"))  # no close frame: 1001 to the bot
        # Its end is settled: its line now, not once the bot's side has closed.
        << CallEnded(EndReason.CARRIER_CLOSED)
        >> FleetLost(Lost.CLOSED)
        << ReleaseSlot()
        << SidesGone()
    )
    assert machine.state is State.ENDED and machine.status == 101 and machine.attempt == 1
    assert (a.calls_total, a.responses[101], a.retries) == (1, 1, 0)


def test_the_health_route_and_refused_heads_are_answered_without_a_call():
    for event, answer in [
        (head("/haproxy-health", upgrade=False), Answer(200, "ok")),
        (head("/nope"), Answer(404, "no such route on this ingress")),
        (
            head("/ws/bot", version="1.0"),
            Answer(400, "a call is a WebSocket upgrade, which needs HTTP/1.1"),
        ),
        (
            head("/ws/bot", upgrade=False),
            Answer(400, "a call route accepts only a GET WebSocket upgrade"),
        ),
        (
            head("/ws/bot", key="k=="),
            Answer(400, "a WebSocket upgrade needs one Sec-WebSocket-Key of 16 bytes in base64"),
        ),
        # Named by Connection, it would be dropped as hop-by-hop before the fleet.
        (
            head("/ws/bot", connection="Upgrade, Sec-WebSocket-Key"),
            Answer(
                400,
                "the Connection header names Sec-WebSocket-Key, which a WebSocket upgrade"
                " must carry to the fleet",
            ),
        ),
        (
            head("/ws/bot", connection="Sec-WebSocket-Protocol, Upgrade"),
            Answer(
                400,
                "the Connection header names Sec-WebSocket-Protocol, which a WebSocket"
                " upgrade must carry to the fleet",
            ),
        ),
    ]:
        pb, machine = new_call()
        assert (
            pb
            << StartTimer(Timer.REQUEST, REQUEST_S)
            >> HeadComplete()
            << CancelTimer(Timer.REQUEST)
            << ParseHead()
            >> event
            << answer
            << CloseSide(Side.CARRIER)
            >> CarrierLost(Lost.CLOSED)  # no call: nothing to log
        )
        assert not machine.is_call and machine.state is State.ENDED


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("/haproxy-health", Answer(200, "ok", head_only=True)),
        ("/nope", Answer(404, "no such route on this ingress", head_only=True)),
        ("/ws/bot", Answer(400, "a call route accepts only a GET WebSocket upgrade", True)),
    ],
)
def test_a_head_request_is_answered_without_a_body_whatever_the_status(path, answer):
    # RFC 9110 9.3.2; only the health route's 200 was (the carrier-edge audit of session 30).
    raw = f"HEAD {path} HTTP/1.1\r\nHost: calls.test\r\n\r\n".encode()
    pb, _ = new_call()
    assert (
        pb
        << StartTimer(Timer.REQUEST, REQUEST_S)
        >> HeadComplete()
        << CancelTimer(Timer.REQUEST)
        << ParseHead()
        >> HeadParsed(parse_request_head(raw))
        << answer
        << CloseSide(Side.CARRIER)
    )


NO_ROUTE = "no such route on this ingress"


@pytest.mark.parametrize(
    ("request_line", "answer"),
    [
        # HAProxy's own check (`option httpchk GET /haproxy-health HTTP/1.1`) has no Host.
        ("GET /haproxy-health HTTP/1.1", Answer(200, "ok")),
        ("GET /ws/bot HTTP/1.1", Answer(400, "malformed request: Missing mandatory Host: header")),
        ("GET /nope HTTP/1.1", Answer(400, "malformed request: Missing mandatory Host: header")),
    ],
)
def test_a_head_without_host_is_answered_on_the_health_route_only(request_line, answer):
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    raw = f"{request_line}\r\n{upgrade}\r\n".encode()
    pb, _ = new_call()
    assert (
        pb
        << StartTimer(Timer.REQUEST, REQUEST_S)
        >> HeadComplete()
        << CancelTimer(Timer.REQUEST)
        << ParseHead()
        >> HeadParsed(parse_request_head(raw, refuse_body=False, refuse_hostless=False))
        << answer
        << CloseSide(Side.CARRIER)
    )


@pytest.mark.parametrize(
    ("request_line", "body_lines", "answer"),
    [
        # SPEC 2: the health route answers any method, a POST with its body too.
        ("POST /haproxy-health HTTP/1.1", "Content-Length: 2", Answer(200, "ok")),
        ("PUT /haproxy-health HTTP/1.0", "Transfer-Encoding: chunked", Answer(200, "ok")),
        # No route is 404 with a body too (SPEC 2's table: /attach, /livekit/* are POSTs).
        ("POST /nope HTTP/1.1", "Content-Length: 2", Answer(404, NO_ROUTE)),
        ("POST /attach HTTP/1.1", "Transfer-Encoding: chunked", Answer(404, NO_ROUTE)),
        ("GET /ws/bot HTTP/1.1", "Content-Length: 5", Answer(400, BODY_REFUSED)),
        ("GET /ws/bot HTTP/1.1", "Content-Length: 0", None),  # no body: a call
    ],
)
def test_a_body_is_refused_but_on_the_health_route(request_line, body_lines, answer):
    # The carrier listener parses with refuse_body=False and leaves it to the machine:
    # the health route's POST was 400 (the carrier-edge audit of session 30).
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    raw = f"{request_line}\r\nHost: calls.test\r\n{upgrade}{body_lines}\r\n\r\n".encode()
    pb, _ = new_call()
    pb = (
        pb
        << StartTimer(Timer.REQUEST, REQUEST_S)
        >> HeadComplete()
        << CancelTimer(Timer.REQUEST)
        << ParseHead()
        >> HeadParsed(parse_request_head(raw, b"ok", refuse_body=False))
    )
    if answer is None:
        assert pb << OpenCall("/ws/", "bot") << TakeSlot(())
    else:
        assert pb << answer << CloseSide(Side.CARRIER)


def test_a_head_refused_as_it_arrives_or_late_is_answered():
    pb, _ = new_call()
    assert (
        pb
        << StartTimer(Timer.REQUEST, REQUEST_S)
        >> HeadRefused(431, "too many header lines")
        << CancelTimer(Timer.REQUEST)
        << Answer(431, "too many header lines")
        << CloseSide(Side.CARRIER)
    )
    pb, _ = new_call()
    assert (
        pb
        << StartTimer(Timer.REQUEST, REQUEST_S)
        >> TimerFired(Timer.REQUEST)
        << Answer(408, "request head not received in time")
        << CloseSide(Side.CARRIER)
    )
    # Refused by its parse, once read as a HEAD request: no body.
    pb, _ = new_call()
    dots = "request path has '.' or '..' segments"
    assert (
        pb
        << StartTimer(Timer.REQUEST, REQUEST_S)
        >> HeadComplete()
        << CancelTimer(Timer.REQUEST)
        << ParseHead()
        >> HeadRefused(400, dots, head_only=True)
        << Answer(400, dots, head_only=True)
        << CloseSide(Side.CARRIER)
    )


# Retries and giving up ------------------------------------------------------

# How attempt 1 on fleet a fails: the events, and the commands before the drop.
FAILURES = {
    "conn-failure": (
        [FleetConnectFailed("connection refused")],
        [CancelTimer(Timer.CONNECT)],
        Failure.CONN_FAILURE,
        "connection refused",
    ),
    # This host out of local ports to that address: retried (another fleet's
    # may have some), not held against the fleet.
    "local conn-failure": (
        [FleetConnectFailed("Cannot assign requested address", local=True)],
        [CancelTimer(Timer.CONNECT)],
        Failure.CONN_FAILURE,
        "Cannot assign requested address",
    ),
    # The fleet's name did not resolve: the fleet's, but only a new probe
    # connection is asked (this host's resolver may be what failed).
    "name not resolved": (
        [FleetConnectFailed("the fleet's name a.test did not resolve: x", unresolved=True)],
        [CancelTimer(Timer.CONNECT)],
        Failure.CONN_FAILURE,
        "the fleet's name a.test did not resolve: x",
    ),
    "connect timeout": (
        [TimerFired(Timer.CONNECT)],
        [],
        Failure.CONN_FAILURE,
        f"no connection within {CONNECT_S:g}s",
    ),
    "empty-response": (
        [FleetConnected(), FleetError(Failure.EMPTY_RESPONSE, "closed")],
        [CancelTimer(Timer.RESPONSE)],
        Failure.EMPTY_RESPONSE,
        "closed",
    ),
    "junk-response": (
        [FleetConnected(), FleetError(Failure.JUNK_RESPONSE, "not HTTP")],
        [CancelTimer(Timer.RESPONSE)],
        Failure.JUNK_RESPONSE,
        "not HTTP",
    ),
    "response-timeout": (
        [FleetConnected(), TimerFired(Timer.RESPONSE)],
        [],
        Failure.RESPONSE_TIMEOUT,
        f"no response head within {RESPONSE_S:g}s",
    ),
}
GIVE_UP = {
    Failure.CONN_FAILURE: Answer(503, "no fleet could be reached"),
    Failure.EMPTY_RESPONSE: Answer(502, "the fleet closed without answering"),
    Failure.JUNK_RESPONSE: Answer(502, "the fleet sent an invalid response"),
    Failure.RESPONSE_TIMEOUT: Answer(504, "the fleet did not answer in time"),
}


def give_up(how: str) -> Answer:
    """The answer when attempts end on a failure of this kind: this host's own
    want names itself, not the fleets (the limits audit of session 14)."""
    if how == "local conn-failure":
        return Answer(
            503, "this ingress could not connect to a fleet: Cannot assign requested address"
        )
    return GIVE_UP[FAILURES[how][2]]


def fail_attempt(pb: Playbook, fleet: FleetState, n: int, how: str) -> Playbook:
    events, before, failure, detail = FAILURES[how]
    pb >> SlotGranted(fleet) << ConnectFleet(fleet, n) << StartTimer(Timer.CONNECT, CONNECT_S)
    for event in events:
        pb >> event
        if event == FleetConnected():
            pb << CancelTimer(Timer.CONNECT) << SendHead() << StartTimer(Timer.RESPONSE, RESPONSE_S)
    for command in before:
        pb << command
    pb << DropFleet()
    local = any(isinstance(e, FleetConnectFailed) and e.local for e in events)
    if failure is Failure.CONN_FAILURE and not local:
        # On the slot it holds, first: counted if the fleet refused it; a timeout
        # (maybe this host's stall) only asks for a probe on a new connection.
        refused = not any(
            isinstance(e, TimerFired) or (isinstance(e, FleetConnectFailed) and e.unresolved)
            for e in events
        )
        pb << FleetUnreachable(refused)
    return pb << ReleaseSlot() << LogAttemptFailed(fleet.name, n, failure, detail)


@pytest.mark.parametrize("how", FAILURES)
def test_a_failed_attempt_is_retried_on_another_fleet(how: str):
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    up_to_slot(pb)
    fail_attempt(pb, a, 1, how) << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    # This host's own want is no retry or redispatch of the fleet's (its stat row).
    counted = 0 if how == "local conn-failure" else 1
    assert (a.retries, a.redispatches, b.retries, machine.attempt) == (counted, counted, 0, 2)
    assert machine.tried == ["a", "b"]


@pytest.mark.parametrize("how", FAILURES)
def test_attempts_run_out_with_the_answer_for_the_last_failure(how: str):
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    up_to_slot(pb)
    fail_attempt(pb, a, 1, how) << TakeSlot(("a",))
    fail_attempt(pb, b, 2, how) << give_up(how) << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.REFUSED)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb
    # The last failure is not retried.
    assert (a.retries, b.retries) == (0 if how == "local conn-failure" else 1, 0)
    assert machine.status == give_up(how).status


@pytest.mark.parametrize("how", FAILURES)
def test_no_fleet_left_to_retry_on_answers_for_the_failure_not_503(how: str):
    (a,) = fleets("a")
    pb, _ = new_call(retries=2)
    up_to_slot(pb)
    fail_attempt(pb, a, 1, how) << TakeSlot(("a",))
    pb >> SlotRefused("no fleet is up") << give_up(how) << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.REFUSED)
    assert pb


EMFILE = "out of file descriptors (EMFILE: Too many open files)"


def test_a_connect_this_process_lacks_descriptors_for_is_answered_at_once_not_retried():
    """Out of descriptors or memory, every fleet's attempt fails the same at
    once: retries left or not, the carrier is answered 503 naming the want,
    no fleet is held responsible or counted a retry, and the line is this
    host's (LogAttemptFailed.exhausted), not the fleet's failed attempt."""
    a, _ = fleets("a", "b")
    pb, machine = new_call(retries=3)
    up_to_slot(pb)
    pb >> SlotGranted(a) << ConnectFleet(a, 1) << StartTimer(Timer.CONNECT, CONNECT_S)
    pb >> FleetConnectFailed(EMFILE, local=True, exhausted=True)
    pb << CancelTimer(Timer.CONNECT) << DropFleet() << ReleaseSlot()
    pb << LogAttemptFailed("a", 1, Failure.CONN_FAILURE, EMFILE, exhausted=True)
    pb << Answer(503, f"this ingress could not connect to a fleet: {EMFILE}")
    pb << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb
    assert (a.retries, a.redispatches, a.call_failures, machine.attempt) == (0, 0, 0, 1)
    assert machine.tried == ["a"]


def test_no_slot_at_all_is_503_with_the_dispatchers_reason():
    pb, machine = new_call()
    up_to_slot(pb)
    pb >> SlotRefused("every fleet is at capacity and the queue is full")
    pb << Answer(503, "every fleet is at capacity and the queue is full")
    pb << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb
    assert machine.attempt == 0


def test_a_listed_status_is_retried_and_the_answer_is_never_relayed():
    a, b = fleets("a", "b")
    pb, _ = new_call(retries=1, statuses=frozenset({503}))
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(503, False) << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    assert (a.responses[503], a.retries, a.redispatches) == (1, 1, 1)


def test_a_listed_status_on_the_last_attempt_is_relayed():
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(503, False) << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetHead(503, False) << CancelTimer(Timer.RESPONSE) << Relay(503)
    assert pb
    assert machine.end_reason is EndReason.REFUSED and machine.status == 503


def test_a_429_is_passed_through_untouched_and_not_retried():
    (a,) = fleets("a")
    pb, machine = new_call(retries=3)
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(429, False) << CancelTimer(Timer.RESPONSE) << FleetFull() << Relay(429)
    pb >> FleetAnswerComplete() << CloseSide(Side.FLEET) << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.REFUSED)  # at the relayed answer's end, not at its head
    pb >> FleetLost(Lost.CLOSED) << ReleaseSlot()
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb
    assert (a.retries, a.calls_total, a.responses[429], machine.status) == (0, 0, 1, 429)


def test_a_429_listed_in_retry_on_takes_its_fleet_as_full_then_tries_another():
    """The fleet's 429 says it is full now: FULL (`FleetFull`, acted on the slot
    the attempt holds) before that slot goes back for the retry."""
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1, statuses=frozenset({429}))
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(429, False) << CancelTimer(Timer.RESPONSE) << FleetFull() << DropFleet()
    pb << ReleaseSlot() << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    assert (a.retries, a.responses[429], b.calls_total, machine.status) == (1, 1, 1, 101)


def test_only_a_429_says_its_fleet_is_full():
    (a,) = fleets("a")
    for status in (503, 404, 200):
        pb, _ = new_call(retries=0, statuses=frozenset())
        attempt(up_to_slot(pb), a, 1)
        pb >> FleetHead(status, False) << CancelTimer(Timer.RESPONSE) << Relay(status)
        assert pb


def test_a_fleet_closing_mid_answer_ends_the_relay():
    (a,) = fleets("a")
    pb, _ = new_call()
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(429, False) << CancelTimer(Timer.RESPONSE) << FleetFull() << Relay(429)
    pb >> FleetLost(Lost.GONE) << ReleaseSlot() << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.REFUSED)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb


def test_a_relayed_answer_cut_for_its_stall_says_so():
    """A fleet's answer that stalls before its end (a chunked 429 never
    finished, a 200 with no length on a kept-alive connection) is cut by the
    relay's watch at timeouts.response: the carrier got it cut short, and the
    access line said only "refused" (the odd-fleet audit of session 35)."""
    (a,) = fleets("a")
    pb, machine = new_call()
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(429, False) << CancelTimer(Timer.RESPONSE) << FleetFull() << Relay(429)
    pb >> EndRequested(EndReason.TIMEOUT) << CloseSide(Side.CARRIER) << CloseSide(Side.FLEET)
    pb << CallEnded(EndReason.REFUSED)  # its detail set: the stall
    pb >> FleetLost(Lost.CLOSED) << ReleaseSlot()
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb
    assert machine.error_text == (
        "the fleet's answer stalled before its end: "
        f"cut, no byte for timeouts.response ({RESPONSE_S:g}s)"
    )


# What the access line says of the fleets a call tried (`attempts_said`) ------


@pytest.mark.parametrize("how", FAILURES)
def test_the_fleets_a_call_left_are_said_in_order_with_each_attempts_end(how: str):
    """A call that left fleet a (any failure) and got its 101 on b: both,
    in order, each with what its attempt ended with; the access line's
    `fleet` names b alone."""
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    up_to_slot(pb)
    fail_attempt(pb, a, 1, how) << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    assert machine.attempts_said() == [f"a {FAILURES[how][2].value}", "b 101"]


def test_a_call_answered_by_its_first_fleet_says_nothing_more():
    """The common call: one attempt, answered (a 101, or a status relayed):
    nothing is kept for it and its line is not made longer."""
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a)
    assert pb
    assert machine.attempts_said() is None and machine.left == ()
    pb, machine = new_call(retries=0)
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(403, False) << CancelTimer(Timer.RESPONSE) << Relay(403)
    assert pb
    assert machine.attempts_said() is None
    pb, machine = new_call()
    up_to_slot(pb) >> SlotRefused("no fleet is up")
    pb << Answer(503, "no fleet is up") << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    assert pb
    assert machine.attempts_said() is None  # no attempt at all


def test_every_attempt_of_a_call_whose_attempts_ran_out_is_said():
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    up_to_slot(pb)
    fail_attempt(pb, a, 1, "conn-failure") << TakeSlot(("a",))
    fail_attempt(pb, b, 2, "response-timeout") << give_up("response-timeout")
    pb << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    assert pb
    assert machine.attempts_said() == ["a conn-failure", "b response-timeout"]
    # One attempt, failed and not retried (retries 0): its failure is said,
    # which the 503's text alone does not (refused, reset or timed out).
    pb, machine = new_call(retries=0)
    up_to_slot(pb)
    fail_attempt(pb, a, 1, "connect timeout") << give_up("connect timeout")
    pb << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    assert pb
    assert machine.attempts_said() == ["a conn-failure"]


def test_a_status_retried_a_fleet_down_and_an_attempt_cut_short_are_said():
    """A 503 retried (retry_on lists it), a fleet gone DOWN before it
    answered, then the carrier gone while the third attempt connects: each
    attempt said, the last `unanswered`."""
    a, b, c = fleets("a", "b", "c")
    pb, machine = new_call(retries=2, statuses=frozenset({503}))
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(503, False) << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << TakeSlot(("a",))
    attempt(pb, b, 2)
    pb >> FleetWentDown() << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << LogAttemptFailed("b", 2, Failure.FLEET_DOWN, DOWN_AWAITING)
    pb << TakeSlot(("a", "b"))
    pb >> SlotGranted(c) << ConnectFleet(c, 3) << StartTimer(Timer.CONNECT, CONNECT_S)
    pb >> CarrierLost(Lost.CLOSED) << CancelTimer(Timer.CONNECT) << DropFleet() << ReleaseSlot()
    pb << CallEnded(EndReason.CARRIER_CLOSED) << SidesGone()
    assert pb
    assert machine.attempts_said() == ["a 503", "b fleet-down", "c unanswered"]


def test_a_status_retried_with_no_slot_left_says_the_fleets_status_not_the_ingresss():
    """a's 503 retried, then no fleet for the retry: the carrier gets the
    ingress's 503 (`status`), and `tried` says a answered 503 itself."""
    (a,) = fleets("a")
    pb, machine = new_call(retries=1, statuses=frozenset({503}))
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(503, False) << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << TakeSlot(("a",))
    pb >> SlotRefused("no fleet is up") << Answer(503, "no fleet is up")
    pb << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    assert pb
    assert machine.attempts_said() == ["a 503"]


def test_a_call_of_a_thousand_retries_writes_a_bounded_tried_with_its_first_and_last():
    """`retry.retries` has no maximum (HAProxy's `retries` has no small one:
    its configs load): a fleet refusing at once made a call of retries=1000
    write 1,001 entries (some 20 KB) in one access line. The line keeps its
    first entries, "+M more" and the last; `attempts` counts them all."""
    from fleet_ingress.net.calls import Call

    (a,) = fleets("a")
    retries = 1000
    pb, machine = new_call(retries=retries)
    up_to_slot(pb)
    for n in range(1, retries + 1):
        # The fleets to avoid, each once: not an avoid list as long as the
        # attempts in every slot request (2.5 MB over the supervisor's channel).
        fail_attempt(pb, a, n, "conn-failure") << TakeSlot(("a",))
    fail_attempt(pb, a, retries + 1, "conn-failure") << give_up("conn-failure")
    pb << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    assert pb
    said = machine.attempts_said()
    assert said is not None and len(said) == retries + 1  # the machine keeps them all

    class _Carrier:
        bytes_received = 0

    call = Call(_Carrier(), "192.0.2.1", "/ws/", "bot-1", machine=machine)  # type: ignore[arg-type]
    record = call.access_record()
    assert record["attempts"] == retries + 1
    tried = record["tried"]
    assert len(tried) == 10, len(tried)
    assert tried == ["a conn-failure"] * 8 + ["+992 more", "a conn-failure"], tried
    assert len(json.dumps(tried)) < 200


def test_a_tried_list_is_whole_up_to_its_bound_and_cut_past_it():
    """`logged_tried`: LOGGED_TRIED entries whole; one more is cut to the
    first LOGGED_TRIED - 2, "+M more" (M + those kept = all) and the last."""
    from fleet_ingress.net.calls import LOGGED_TRIED, logged_tried

    whole = [f"f{i} 503" for i in range(LOGGED_TRIED)]
    assert logged_tried(whole) == whole
    over = [*whole, "g 101"]
    cut = logged_tried(over)
    assert cut == [*whole[:8], "+2 more", "g 101"]
    assert len(cut) == LOGGED_TRIED
    assert logged_tried([]) == []


def test_a_connection_offered_the_session_that_failed_counts_for_health_not_as_an_attempt():
    """The fleet failed a connection offered its kept TLS session, no refusal
    proven, and the connection made again got through (net/fleet_sessions):
    a refused connection for the fleet's passive health, on the slot the
    attempt holds; the attempt goes on, its retries unused, nothing for the
    access line's `tried`. Before (session 42) nothing was counted."""
    a, _ = fleets("a", "b")
    pb, machine = new_call(retries=1)
    up_to_slot(pb) >> SlotGranted(a) << ConnectFleet(a, 1) << StartTimer(Timer.CONNECT, CONNECT_S)
    pb >> OfferedConnectionFailed() << FleetUnreachable(refused=True)
    pb >> FleetConnected() << CancelTimer(Timer.CONNECT) << SendHead()
    pb << StartTimer(Timer.RESPONSE, RESPONSE_S)
    pb >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    assert (machine.attempt, a.retries, machine.attempts_said()) == (1, 0, None)


# An attempt whose fleet went DOWN before it answered --------------------------

DOWN_AWAITING = "the fleet went DOWN before it answered: given up, tried again"
DOWN_CONNECTING = "the fleet went DOWN before it connected: given up, tried again"


def test_an_attempt_awaiting_a_fleet_that_went_down_is_retried_at_once():
    """The head sent, no answer yet, and the fleet goes DOWN: the attempt is
    given up now (not at its response timer, 5 s on) and another fleet takes
    the call; counted a retry and a redispatch of the fleet that went DOWN."""
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetWentDown() << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << LogAttemptFailed("a", 1, Failure.FLEET_DOWN, DOWN_AWAITING)
    pb << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    assert (a.retries, a.redispatches, b.retries, machine.attempt) == (1, 1, 0, 2)
    assert machine.tried == ["a", "b"] and machine.status == 101
    # Not held against the fleet's health: its probes said so already.
    assert a.call_failures == 0


def test_an_attempt_connecting_to_a_fleet_that_went_down_is_retried_at_once():
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    up_to_slot(pb) >> SlotGranted(a) << ConnectFleet(a, 1) << StartTimer(Timer.CONNECT, CONNECT_S)
    pb >> FleetWentDown() << CancelTimer(Timer.CONNECT) << DropFleet() << ReleaseSlot()
    pb << LogAttemptFailed("a", 1, Failure.FLEET_DOWN, DOWN_CONNECTING)
    pb << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    assert (a.retries, a.redispatches, machine.attempt) == (1, 1, 2)


@pytest.mark.parametrize(
    ("connected", "answer"),
    [
        (True, Answer(504, "the fleet went down before it answered")),
        (False, Answer(503, "no fleet could be reached")),
    ],
)
def test_no_fleet_to_retry_on_after_a_down_gets_what_the_timer_would_have(connected, answer):
    """The carrier is answered at once what its timer would have brought it:
    504 awaiting the answer (saying why), 503 connecting."""
    (a,) = fleets("a")
    pb, machine = new_call(retries=2)
    if connected:
        attempt(up_to_slot(pb), a, 1)
        pb >> FleetWentDown() << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
        pb << LogAttemptFailed("a", 1, Failure.FLEET_DOWN, DOWN_AWAITING)
    else:
        up_to_slot(pb) >> SlotGranted(a) << ConnectFleet(a, 1)
        pb << StartTimer(Timer.CONNECT, CONNECT_S)
        pb >> FleetWentDown() << CancelTimer(Timer.CONNECT) << DropFleet() << ReleaseSlot()
        pb << LogAttemptFailed("a", 1, Failure.FLEET_DOWN, DOWN_CONNECTING)
    pb << TakeSlot(("a",))
    pb >> SlotRefused("no fleet is up") << answer << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.REFUSED)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb
    assert machine.status == answer.status and a.retries == 1


def test_a_down_with_no_retry_to_gain_leaves_the_attempt_waiting():
    """Its last attempt (or a response-timeout the policy does not retry):
    given up, it could only fail; waited for as before, the fleet may still
    answer (a fleet DOWN keeps its calls)."""
    a, b = fleets("a", "b")
    pb, machine = new_call(retries=1)
    up_to_slot(pb)
    fail_attempt(pb, a, 1, "conn-failure") << TakeSlot(("a",))
    attempt(pb, b, 2) >> FleetWentDown()
    pb >> FleetHead(101, True) << CancelTimer(Timer.RESPONSE) << Link(101)
    assert pb
    assert (b.retries, machine.attempt, machine.status) == (0, 2, 101)

    (c,) = fleets("c")
    machine = CallMachine(
        CallRules(
            router=Router(["/ws/"], "/haproxy-health"),
            retry=RetryPolicy(3, frozenset({"conn-failure"}), frozenset()),
            request_timeout=REQUEST_S,
            connect_timeout=CONNECT_S,
            response_timeout=RESPONSE_S,
        )
    )
    pb = Playbook(machine)
    attempt(up_to_slot(pb), c, 1) >> FleetWentDown()
    pb >> TimerFired(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << LogAttemptFailed(
        "c", 1, Failure.RESPONSE_TIMEOUT, f"no response head within {RESPONSE_S:g}s"
    )
    pb << Answer(504, "the fleet did not answer in time") << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.REFUSED)
    assert pb


def test_a_fleet_down_is_not_an_event_once_the_fleet_answered():
    """A tunnel is a live call: a fleet DOWN keeps it (SPEC 6). The pump feeds
    the event only before the answer; fed after, the machine refuses it."""
    (a,) = fleets("a")
    pb, machine = new_call()
    assert in_tunnel(pb, a)
    with pytest.raises(IllegalEvent):
        machine.feed(FleetWentDown())


def test_an_unexpected_setup_error_answers_502_and_says_error():
    (a,) = fleets("a")
    pb, _ = new_call()
    pb = up_to_slot(pb) >> SlotGranted(a) << ConnectFleet(a, 1)
    pb << StartTimer(Timer.CONNECT, CONNECT_S)
    pb >> SetupFailed("boom") << CancelTimer(Timer.CONNECT) << DropFleet() << ReleaseSlot()
    pb << Answer(502, "internal error while connecting the call") << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.ERROR)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb


# The carrier leaving at each stage: the slot goes back exactly once ---------


_ENDED_BY_CARRIER = CallEnded(EndReason.CARRIER_CLOSED)


def _leaves_leasing(pb: Playbook, a: FleetState) -> Playbook:
    return up_to_slot(pb) >> CarrierLost(Lost.CLOSED) << CancelSlotWait() << _ENDED_BY_CARRIER


def _leaves_connecting(pb: Playbook, a: FleetState) -> Playbook:
    pb = up_to_slot(pb) >> SlotGranted(a) << ConnectFleet(a, 1)
    pb << StartTimer(Timer.CONNECT, CONNECT_S)
    return (
        pb
        >> CarrierLost(Lost.CLOSED)
        << CancelTimer(Timer.CONNECT)
        << DropFleet()
        << ReleaseSlot()
        << _ENDED_BY_CARRIER
    )


def _leaves_awaiting(pb: Playbook, a: FleetState) -> Playbook:
    pb = attempt(up_to_slot(pb), a, 1)
    return (
        pb
        >> CarrierLost(Lost.CLOSED)
        << CancelTimer(Timer.RESPONSE)
        << DropFleet()
        << ReleaseSlot()
        << _ENDED_BY_CARRIER
    )


def _leaves_retrying(pb: Playbook, a: FleetState) -> Playbook:
    """Between attempts: the slot of the failed one already went back."""
    pb = fail_attempt(up_to_slot(pb), a, 1, "conn-failure") << TakeSlot(("a",))
    return pb >> CarrierLost(Lost.CLOSED) << CancelSlotWait() << _ENDED_BY_CARRIER


def _leaves_relaying(pb: Playbook, a: FleetState) -> Playbook:
    pb = attempt(up_to_slot(pb), a, 1)
    pb >> FleetHead(429, False) << CancelTimer(Timer.RESPONSE) << FleetFull() << Relay(429)
    pb >> CarrierLost(Lost.CLOSED) << CloseSide(Side.FLEET) << CallEnded(EndReason.REFUSED)
    return pb >> FleetLost(Lost.CLOSED) << ReleaseSlot()


def _leaves_tunnel(pb: Playbook, a: FleetState) -> Playbook:
    pb = (
        in_tunnel(pb, a)
        >> CarrierLost(Lost.CLOSED)
        << CloseSide(Side.FLEET, Goodbye(1001, "carrier closed"))
        << _ENDED_BY_CARRIER
    )
    return pb >> FleetLost(Lost.CLOSED) << ReleaseSlot()


def _leaves_answering(pb: Playbook, a: FleetState) -> Playbook:
    pb = up_to_slot(pb) >> SlotRefused("no fleet is up") << Answer(503, "no fleet is up")
    pb << CloseSide(Side.CARRIER) << CallEnded(EndReason.REFUSED)
    return pb >> CarrierLost(Lost.CLOSED)


@pytest.mark.parametrize(
    ("stage", "script", "reason"),
    [
        ("leasing", _leaves_leasing, EndReason.CARRIER_CLOSED),
        ("connecting", _leaves_connecting, EndReason.CARRIER_CLOSED),
        ("awaiting", _leaves_awaiting, EndReason.CARRIER_CLOSED),
        ("retrying", _leaves_retrying, EndReason.CARRIER_CLOSED),
        ("relaying", _leaves_relaying, EndReason.REFUSED),
        ("tunnel", _leaves_tunnel, EndReason.CARRIER_CLOSED),
        ("answering", _leaves_answering, EndReason.REFUSED),
    ],
)
def test_the_carrier_leaving_at_each_stage_gives_the_slot_back_once(stage, script, reason):
    (a,) = fleets("a")
    pb, machine = new_call()
    script(pb, a) << SidesGone()
    assert [c for k, c in pb.steps if isinstance(c, CallEnded)] == [CallEnded(reason)]
    granted = sum(isinstance(e, SlotGranted) for k, e in pb.steps if k == ">>")
    released = sum(isinstance(c, ReleaseSlot) for k, c in pb.steps if k == "<<")
    assert pb
    assert released == granted
    assert machine.state is State.ENDED and not machine.slot_held


@pytest.mark.parametrize("stage", ["head", "parsing"])
def test_a_connection_that_leaves_before_its_head_is_a_call_logs_nothing(stage):
    pb, machine = new_call()
    pb << StartTimer(Timer.REQUEST, REQUEST_S)
    if stage == "parsing":
        pb >> HeadComplete() << CancelTimer(Timer.REQUEST) << ParseHead()
        pb >> CarrierLost(Lost.CLOSED)
    else:
        pb >> CarrierLost(Lost.CLOSED) << CancelTimer(Timer.REQUEST)
    assert pb
    assert machine.state is State.ENDED


# Who hung up ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "first_lost", "reason"),
    [
        # A normal close: whoever asks, the fleet (the server) ends TCP first.
        ([], "fleet", EndReason.FLEET_CLOSED),  # none asked: told 1011
        ([Side.CARRIER], "fleet", EndReason.CARRIER_CLOSED),
        ([Side.FLEET], "fleet", EndReason.FLEET_CLOSED),
        ([Side.FLEET], "carrier", EndReason.FLEET_CLOSED),
        ([], "carrier", EndReason.CARRIER_CLOSED),
    ],
)
def test_close_frames_decide_who_hung_up(frames, first_lost, reason):
    (a,) = fleets("a")
    pb, _ = new_call()
    in_tunnel(pb, a)
    for side in frames:
        pb >> CloseFrameSeen(side)
    if first_lost == "fleet":
        # No close frame either way: the fleet's FIN is a 1011 to the carrier.
        goodbye = None if frames else Goodbye(1011, "fleet closed")
        pb >> FleetLost(Lost.CLOSED) << ReleaseSlot() << CloseSide(Side.CARRIER, goodbye)
        pb << CallEnded(reason) >> CarrierLost(Lost.CLOSED)
    else:
        # No close frame either way: the carrier's FIN is a 1001 to the bot.
        goodbye = None if frames else Goodbye(1001, "carrier closed")
        pb >> CarrierLost(Lost.CLOSED) << CloseSide(Side.FLEET, goodbye) << CallEnded(reason)
        pb >> FleetLost(Lost.CLOSED) << ReleaseSlot()
    pb << SidesGone()
    assert pb


# A side that half-closes ----------------------------------------------------


def _other(side: Side) -> Side:
    return Side.FLEET if side is Side.CARRIER else Side.CARRIER


_CLOSED_BY = {Side.CARRIER: EndReason.CARRIER_CLOSED, Side.FLEET: EndReason.FLEET_CLOSED}


@pytest.mark.parametrize("side", [Side.CARRIER, Side.FLEET])
def test_a_close_handshake_done_closes_both_sides_at_once(side):
    """The reply relayed, nothing may follow either way: both sides are closed
    then, named for the side whose frame came first, whatever their TCP does
    (a fleet keeping its TCP open after its reply held the call until
    carrier_silence, logged carrier_silent: session 37's shapes check)."""
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a)
    pb >> CloseFrameSeen(side)
    assert pb and machine.state is State.TUNNEL  # the reply may take its time
    pb >> CloseFrameSeen(_other(side)) << CloseSide(Side.CARRIER) << CloseSide(Side.FLEET)
    pb << CallEnded(_CLOSED_BY[side])
    assert pb and machine.state is State.CLOSING
    pb >> FleetLost(Lost.CLOSED) << ReleaseSlot()
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb


@pytest.mark.parametrize("side", [Side.CARRIER, Side.FLEET])
def test_a_side_that_half_closes_after_its_close_frame_still_gets_the_reply(side):
    """A client may send its close frame and then its TLS close_notify (TLS
    1.3 lets it read on): the other side's close reply must still reach it,
    and then the call ends at once, named for the side that hung up (the
    carriers audit of session 17: the reply was lost, a 1006 at the carrier)."""
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a)
    pb >> CloseFrameSeen(side)
    pb >> SideFinished(side) << StartTimer(Timer.HALF_CLOSED, HALF_CLOSED_GRACE)
    _slot_freed_if_the_bot_is_done(pb, side)
    # Its end is settled (who hung up, and that side is done): its line now,
    # not after the grace or the TLS close of a side that may have vanished.
    pb << CallEnded(_CLOSED_BY[side])
    assert pb and machine.state is State.HALF_CLOSED  # nothing closed: the reply may come
    pb >> CloseFrameSeen(_other(side))  # the reply, relayed: nothing more to wait for
    pb << CancelTimer(Timer.HALF_CLOSED) << CloseSide(Side.CARRIER) << CloseSide(Side.FLEET)
    pb >> FleetLost(Lost.CLOSED)
    _slot_freed_unless_it_was(pb, side)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb


def _slot_freed_if_the_bot_is_done(pb, side: Side) -> None:
    """A fleet that finished after its close frame (the bot hung up and is
    done) gives its slot back at once (SPEC 4: the slot is the fleet's
    capacity): held the grace before (5.2 s after a carrier vanished, the
    dead-peer audit of session 39)."""
    if side is Side.FLEET:
        pb << ReleaseSlot()


def _slot_freed_unless_it_was(pb, side: Side) -> None:
    if side is not Side.FLEET:
        pb << ReleaseSlot()


@pytest.mark.parametrize("side", [Side.CARRIER, Side.FLEET])
def test_a_half_closed_call_ends_when_the_other_side_ends_or_the_grace_passes(side):
    (a,) = fleets("a")
    # The other side ends too (its own close_notify or FIN): both are closed.
    pb, _ = new_call()
    in_tunnel(pb, a)
    pb >> CloseFrameSeen(side)
    pb >> SideFinished(side) << StartTimer(Timer.HALF_CLOSED, HALF_CLOSED_GRACE)
    _slot_freed_if_the_bot_is_done(pb, side)
    pb << CallEnded(_CLOSED_BY[side])
    pb >> CloseFrameSeen(side)  # a second frame from the same side: still waiting
    pb >> SideFinished(_other(side))
    pb << CancelTimer(Timer.HALF_CLOSED) << CloseSide(Side.CARRIER) << CloseSide(Side.FLEET)
    pb >> CarrierLost(Lost.CLOSED) >> FleetLost(Lost.CLOSED)
    _slot_freed_unless_it_was(pb, side)
    pb << SidesGone()
    assert pb
    # Nothing comes back: the grace passes, both are closed.
    pb, _ = new_call()
    in_tunnel(pb, a)
    pb >> CloseFrameSeen(side)
    pb >> SideFinished(side) << StartTimer(Timer.HALF_CLOSED, HALF_CLOSED_GRACE)
    _slot_freed_if_the_bot_is_done(pb, side)
    pb << CallEnded(_CLOSED_BY[side])
    pb >> TimerFired(Timer.HALF_CLOSED) << CloseSide(Side.CARRIER) << CloseSide(Side.FLEET)
    pb >> FleetLost(Lost.CLOSED)
    _slot_freed_unless_it_was(pb, side)
    pb >> CarrierLost(Lost.CLOSED)
    pb << SidesGone()
    assert pb


@pytest.mark.parametrize("frames", [[], [Side.FLEET]])
def test_a_side_that_finishes_with_no_reply_due_is_closed_as_one_that_left(frames):
    """No close frame of its own: nothing is waited for (the pump closes the
    side; its loss closes the other). The exchange of close frames done, both
    are closed already (test_a_close_handshake_done_closes_both_sides_at_once)."""
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a)
    for side in frames:
        pb >> CloseFrameSeen(side)
    pb >> SideFinished(Side.CARRIER)
    assert pb and machine.state is State.TUNNEL
    goodbye = None if frames else Goodbye(1001, "carrier closed")  # none either way: 1001
    pb >> CarrierLost(Lost.CLOSED) << CloseSide(Side.FLEET, goodbye)
    pb << CallEnded(_CLOSED_BY[frames[0]] if frames else EndReason.CARRIER_CLOSED)
    pb >> FleetLost(Lost.CLOSED) << ReleaseSlot() << SidesGone()
    assert pb


@pytest.mark.parametrize(
    ("event", "commands"),
    [
        (FleetLost(Lost.RESET), [ReleaseSlot(), CloseSide(Side.CARRIER)]),
        (CarrierLost(Lost.RESET), [CloseSide(Side.FLEET)]),
        # The pump's own failure (an end asked of the ingress, a drain's, waits
        # for the reply instead: test_an_end_asked_while_a_close_reply_is_due_...).
        (EndRequested(EndReason.ERROR), [CloseSide(Side.CARRIER), CloseSide(Side.FLEET)]),
        (
            EndRequested(EndReason.FLEET_SILENT),
            [AbortSide(Side.FLEET), CloseSide(Side.CARRIER)],  # the silent side first
        ),
        # The carrier finished: its silence is by design, not a side gone (a
        # carrier_silence under 5 s reset the reply away: the review).
        (EndRequested(EndReason.CARRIER_SILENT), [CloseSide(Side.CARRIER), CloseSide(Side.FLEET)]),
    ],
)
def test_a_half_closed_call_cut_short_stops_its_timer_and_keeps_who_hung_up(event, commands):
    """No timer outlives the state that started it (CLOSING takes no timer)."""
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a)
    pb >> CloseFrameSeen(Side.CARRIER)
    pb >> SideFinished(Side.CARRIER) << StartTimer(Timer.HALF_CLOSED, HALF_CLOSED_GRACE)
    pb << CallEnded(EndReason.CARRIER_CLOSED)  # once: what cuts it short says no more
    pb >> event << CancelTimer(Timer.HALF_CLOSED)
    for command in commands:
        pb << command
    assert pb and machine.state is State.CLOSING
    assert machine.end_reason is EndReason.CARRIER_CLOSED


@pytest.mark.parametrize(
    "reason", [EndReason.DRAIN, EndReason.ADMIN, EndReason.REMOVED, EndReason.TIMEOUT]
)
@pytest.mark.parametrize("side", [Side.CARRIER, Side.FLEET])
@pytest.mark.parametrize("finished", [False, True], ids=["open", "half-closed"])
def test_an_end_asked_while_a_close_reply_is_due_waits_for_it_and_is_the_hang_ups(
    side, reason, finished
):
    """A drain's end, an operator's end-call, a forced removal or the idle
    timer between a side's close frame and the other's reply: nothing is
    closed until the reply is relayed, the replying side ends, or
    GOODBYE_REPLY_WAIT passes (in place of what is left of
    HALF_CLOSED_GRACE), and the call is the hung-up side's. Before (the review
    of session 37): both sides were closed at once with nothing sent (a close
    frame was seen), the reply lost (1006 at the side that hung up), the call
    logged as the ask's ('drain', 'admin'). Asked again meanwhile (a second
    `end-call`, a drain's end), the first ask's wait stands: restarted, each
    ask held the call GOODBYE_REPLY_WAIT more (session 38)."""
    (a,) = fleets("a")
    for ending in ("reply", "reply side ends", "timer", "asked again"):
        pb, machine = new_call()
        in_tunnel(pb, a)
        pb >> CloseFrameSeen(side)
        if finished:
            pb >> SideFinished(side) << StartTimer(Timer.HALF_CLOSED, HALF_CLOSED_GRACE)
            _slot_freed_if_the_bot_is_done(pb, side)
            pb << CallEnded(_CLOSED_BY[side])
        pb >> EndRequested(reason, "ticket 9")
        if finished:
            pb << CancelTimer(Timer.HALF_CLOSED)
        pb << StartTimer(Timer.HALF_CLOSED, GOODBYE_REPLY_WAIT)
        if not finished:  # the hang-up's end, settled by the ask
            pb << CallEnded(_CLOSED_BY[side])
        assert pb and machine.state is State.HALF_CLOSED, ending  # nothing closed yet
        assert machine.end_reason is _CLOSED_BY[side] and machine.error_text is None
        if ending == "reply":
            pb >> CloseFrameSeen(_other(side))
            pb << CancelTimer(Timer.HALF_CLOSED)
        elif ending == "reply side ends":
            pb >> SideFinished(_other(side)) << CancelTimer(Timer.HALF_CLOSED)
        elif ending == "timer":
            pb >> TimerFired(Timer.HALF_CLOSED)
        else:
            # The first ask's wait stands: nothing said, the timer not restarted.
            pb >> EndRequested(EndReason.DRAIN)
            pb >> EndRequested(EndReason.ADMIN, "ticket 10")
            assert pb and machine.state is State.HALF_CLOSED, ending
            pb >> TimerFired(Timer.HALF_CLOSED)
        pb << CloseSide(Side.CARRIER) << CloseSide(Side.FLEET)
        pb >> FleetLost(Lost.CLOSED)
        if not finished:
            pb << ReleaseSlot()
        else:
            _slot_freed_unless_it_was(pb, side)
        pb >> CarrierLost(Lost.CLOSED) << SidesGone()
        assert pb, ending


@pytest.mark.parametrize(
    ("reason", "first", "then"),
    [
        (EndReason.ERROR, CloseSide(Side.CARRIER), CloseSide(Side.FLEET)),
        # The side whose reply is due is gone: nothing to wait for.
        (EndReason.FLEET_SILENT, AbortSide(Side.FLEET), CloseSide(Side.CARRIER)),
        (EndReason.FLEET_LOST, AbortSide(Side.FLEET), CloseSide(Side.CARRIER)),
    ],
)
def test_an_end_that_waits_for_no_reply_closes_at_once_after_a_close_frame(reason, first, then):
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a) >> CloseFrameSeen(Side.CARRIER)
    pb >> EndRequested(reason) << first << then << CallEnded(reason)
    assert pb and machine.state is State.CLOSING


@pytest.mark.parametrize(
    ("side", "how", "reason", "goodbye"),
    [
        # A fleet that closed its connection without a close frame: a 1011 too
        # (the carrier saw 1006, a network failure to its logs).
        ("fleet", Lost.CLOSED, EndReason.FLEET_CLOSED, Goodbye(1011, "fleet closed")),
        ("fleet", Lost.GONE, EndReason.FLEET_LOST, Goodbye(1011, "fleet lost")),
        ("fleet", Lost.RESET, EndReason.FLEET_RESET, Goodbye(1011, "fleet reset")),
        ("fleet", Lost.ERROR, EndReason.ERROR, Goodbye(1011, "call error")),
        # A carrier that did: a 1001 (the bot saw 1006, an abnormal end).
        ("carrier", Lost.CLOSED, EndReason.CARRIER_CLOSED, Goodbye(1001, "carrier closed")),
        ("carrier", Lost.GONE, EndReason.CARRIER_LOST, Goodbye(1001, "carrier lost")),
        ("carrier", Lost.RESET, EndReason.CARRIER_RESET, Goodbye(1001, "carrier reset")),
        ("carrier", Lost.ERROR, EndReason.ERROR, Goodbye(1011, "call error")),
    ],
)
def test_a_side_lost_after_the_101_ends_the_call_and_names_it(side, how, reason, goodbye):
    """The side still open is told why with a close frame (`goodbye`)."""
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a)
    why = "[SSL: UNEXPECTED_RECORD] unexpected record"
    if side == "fleet":
        pb >> FleetLost(how, why) << ReleaseSlot() << CloseSide(Side.CARRIER, goodbye)
        pb << CallEnded(reason)
        pb >> CarrierLost(Lost.ERROR, "the other side's, later") << SidesGone()
    else:
        pb >> CarrierLost(how, why) << CloseSide(Side.FLEET, goodbye) << CallEnded(reason)
        pb >> FleetLost(Lost.ERROR, "the other side's, later") << ReleaseSlot()
        pb << SidesGone()
    assert pb
    # What failed is kept for the access line when an error ended the call, or a
    # side gone that the layer said more of (a peer that stopped reading).
    told = how in (Lost.ERROR, Lost.GONE)
    assert machine.error_text == (f"{side}: {why}" if told else None)


def test_an_error_after_a_hang_up_is_no_error_text():
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a) >> CloseFrameSeen(Side.CARRIER)
    pb >> FleetLost(Lost.ERROR, "bad record") << ReleaseSlot() << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.CARRIER_CLOSED)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb and machine.error_text is None


def test_a_fleet_hang_up_before_the_101_is_an_empty_response():
    (a,) = fleets("a")
    pb, _ = new_call(retries=0)
    attempt(up_to_slot(pb), a, 1)
    pb >> FleetError(Failure.EMPTY_RESPONSE, "fleet closed before a complete response")
    pb << CancelTimer(Timer.RESPONSE) << DropFleet() << ReleaseSlot()
    pb << LogAttemptFailed(
        "a", 1, Failure.EMPTY_RESPONSE, "fleet closed before a complete response"
    )
    pb << Answer(502, "the fleet closed without answering") << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.REFUSED)
    assert pb


# Ended from outside: silence, timeout, drain, removal ----------------------


@pytest.mark.parametrize(
    ("reason", "first", "then"),
    [
        (
            EndReason.CARRIER_SILENT,
            AbortSide(Side.CARRIER),
            CloseSide(Side.FLEET, Goodbye(1001, "carrier silent")),
        ),
        (  # the silent fleet first: no frame of its will end
            EndReason.FLEET_SILENT,
            AbortSide(Side.FLEET),
            CloseSide(Side.CARRIER, Goodbye(1011, "fleet silent")),
        ),
        (
            EndReason.TIMEOUT,
            CloseSide(Side.CARRIER, Goodbye(1001, "tunnel idle")),
            CloseSide(Side.FLEET, Goodbye(1001, "tunnel idle")),
        ),
        (
            EndReason.DRAIN,
            CloseSide(Side.CARRIER, Goodbye(1001, "ingress draining")),
            CloseSide(Side.FLEET, Goodbye(1001, "ingress draining")),
        ),
        (
            EndReason.REMOVED,
            CloseSide(Side.CARRIER, Goodbye(1001, "fleet removed")),
            CloseSide(Side.FLEET, Goodbye(1001, "fleet removed")),
        ),
        (  # fleet-ingress end-call
            EndReason.ADMIN,
            CloseSide(Side.CARRIER, Goodbye(1001, "ended by operator")),
            CloseSide(Side.FLEET, Goodbye(1001, "ended by operator")),
        ),
    ],
)
def test_a_call_ended_from_outside_closes_each_side_and_keeps_the_reason(reason, first, then):
    """Each side still open is told why the ingress ended its call (a close frame:
    1001 going away, 1011 when the fleet is at fault); a silent side, gone, is
    aborted."""
    (a,) = fleets("a")
    pb, _ = new_call()
    in_tunnel(pb, a) >> EndRequested(reason) << first << then << CallEnded(reason)
    # What the sides say as they go does not change why the call ended.
    pb >> CarrierLost(Lost.ERROR) >> FleetLost(Lost.CLOSED) << ReleaseSlot() << SidesGone()
    assert pb


def test_a_drain_during_setup_drops_the_attempt_and_keeps_the_slot_until_the_carrier_goes():
    (a,) = fleets("a")
    pb, machine = new_call()
    attempt(up_to_slot(pb), a, 1)
    pb >> EndRequested(EndReason.DRAIN) << CancelTimer(Timer.RESPONSE) << DropFleet()
    pb << Answer(503, "the ingress is stopping") << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.DRAIN)  # its 503 said: logged before its carrier goes
    assert pb
    assert machine.slot_held  # a forced removal waits for this call's carrier
    pb >> CarrierLost(Lost.CLOSED) << ReleaseSlot() << SidesGone()
    assert pb


def test_a_call_still_queued_when_the_drain_ends_is_answered_503():
    """A carrier whose call waits in the queue (or connects) as the drain
    ends gets its answer: it was closed bare, an HTTP request with no
    response, as if the host had crashed."""
    pb, machine = new_call()
    up_to_slot(pb) >> EndRequested(EndReason.DRAIN) << CancelSlotWait()
    pb << Answer(503, "the ingress is stopping") << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.DRAIN)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb
    assert (machine.status, machine.answer_text) == (503, "the ingress is stopping")


def test_a_queued_call_an_operator_ends_is_answered_503_saying_so():
    """`fleet-ingress end-call` on a call waiting for a slot: the carrier is
    answered, as every refusal is, and told by whom."""
    pb, _ = new_call()
    up_to_slot(pb) >> EndRequested(EndReason.ADMIN, "stuck") << CancelSlotWait()
    pb << Answer(503, "the call was ended by an operator") << CloseSide(Side.CARRIER)
    pb << CallEnded(EndReason.ADMIN)
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb


# Races (docs/RELIABILITY.md, tests/e2e/test_fleet_change_races.py) ----------


def test_race_a_slot_handed_out_in_the_turn_its_fleet_is_drained_is_given_back():
    a, b = fleets("a", "b")
    a.admin = Admin.DRAIN  # drained between the queue's hand-off and this turn
    pb, machine = new_call()
    up_to_slot(pb) >> SlotGranted(a) << ReleaseSlot() << TakeSlot(())  # a was never tried
    attempt(pb, b, 1)
    assert pb
    assert machine.attempt == 1 and machine.tried == ["b"]
    assert a.retries == a.redispatches == 0


def test_race_a_slot_handed_over_as_the_carrier_leaves_goes_back():
    (a,) = fleets("a")
    pb, _ = new_call()
    up_to_slot(pb) >> CarrierLost(Lost.CLOSED) << CancelSlotWait()
    pb << CallEnded(EndReason.CARRIER_CLOSED) << SidesGone()
    pb >> SlotGranted(a) << ReleaseSlot()  # the hand-off had already happened
    assert pb


def test_race_remove_fleet_force_spares_a_call_that_only_tried_that_fleet():
    """X's attempt on a timed out and X waits to retry elsewhere; Y holds a's
    slot. Only Y holds it (the registry's calls_on reads that), and Y ended
    as removed gives it back once."""
    (a,) = fleets("a")
    x, machine_x = new_call()
    fail_attempt(up_to_slot(x), a, 1, "response-timeout") << TakeSlot(("a",))
    y, machine_y = new_call()
    attempt(up_to_slot(y), a, 1)
    assert x and y
    assert (machine_x.slot_held, machine_y.slot_held) == (False, True)
    y >> EndRequested(EndReason.REMOVED) << CancelTimer(Timer.RESPONSE) << DropFleet()
    y << Answer(503, "the call's fleet was removed") << CloseSide(Side.CARRIER)
    y << CallEnded(EndReason.REMOVED)
    y >> CarrierLost(Lost.CLOSED) << ReleaseSlot() << SidesGone()
    assert y
    assert machine_x.end_reason is None and machine_x.state is State.LEASING


def test_race_calls_cut_at_stop_are_each_logged_even_if_the_fleet_never_reads_the_close():
    """stop(): each call is asked to end (drain), a fleet that never reads the
    TLS close is cut after a moment, a second ask changes nothing: logged once, as drain."""
    (a,) = fleets("a")
    pb, machine = new_call()
    draining = Goodbye(1001, "ingress draining")
    in_tunnel(pb, a) >> EndRequested(EndReason.DRAIN)
    pb << CloseSide(Side.CARRIER, draining) << CloseSide(Side.FLEET, draining)
    pb << CallEnded(EndReason.DRAIN)
    pb >> CarrierLost(Lost.CLOSED)  # the carrier went; the fleet's close hangs
    # A second signal: closed again, told nothing more (its close frame is sent).
    pb >> EndRequested(EndReason.DRAIN) << CloseSide(Side.FLEET)
    pb >> FleetLost(Lost.ERROR) << ReleaseSlot() << SidesGone()  # cut
    assert pb
    assert machine.state is State.ENDED


def test_race_a_fleet_that_closes_right_after_its_101_closes_the_carrier():
    (a,) = fleets("a")
    pb, _ = new_call()
    in_tunnel(pb, a) >> FleetLost(Lost.CLOSED) << ReleaseSlot()
    pb << CloseSide(Side.CARRIER, Goodbye(1011, "fleet closed"))
    pb << CallEnded(EndReason.FLEET_CLOSED)
    pb >> CloseFrameSeen(Side.CARRIER)  # its reply, while closing: nothing more to do
    pb >> CarrierLost(Lost.CLOSED) << SidesGone()
    assert pb


def test_race_the_silence_sweep_after_the_fleet_left_does_not_rename_the_end():
    (a,) = fleets("a")
    pb, _ = new_call()
    in_tunnel(pb, a) >> FleetLost(Lost.GONE) << ReleaseSlot()
    pb << CloseSide(Side.CARRIER, Goodbye(1011, "fleet lost"))
    pb << CallEnded(EndReason.FLEET_LOST)
    pb >> EndRequested(EndReason.CARRIER_SILENT) << AbortSide(Side.CARRIER)
    pb >> CarrierLost(Lost.ERROR) << SidesGone()
    assert pb


# The access line: as soon as the end is settled ------------------------------


def test_a_bot_hanging_up_on_a_vanished_carrier_is_logged_at_its_hang_up():
    """The carrier vanished (no FIN, no reply: it reads nothing), then the bot
    hung up (its close frame, then its FIN). Why the call ended is final at
    the bot's FIN: its line comes then (CallEnded), while the carrier is given
    the grace for a reply, then its TLS close flushed (up to 10 s for one that
    reads nothing) in the background (SidesGone at its end). Before, the line
    waited for both: 15 s after the hang-up (session 40's note)."""
    (a,) = fleets("a")
    pb, machine = new_call()
    in_tunnel(pb, a) >> CloseFrameSeen(Side.FLEET)
    assert pb and machine.end_reason is None  # a reply is due: not over yet
    pb >> SideFinished(Side.FLEET) << StartTimer(Timer.HALF_CLOSED, HALF_CLOSED_GRACE)
    pb << ReleaseSlot() << CallEnded(EndReason.FLEET_CLOSED)
    assert pb and machine.state is State.HALF_CLOSED
    pb >> TimerFired(Timer.HALF_CLOSED) << CloseSide(Side.CARRIER) << CloseSide(Side.FLEET)
    pb >> FleetLost(Lost.CLOSED)  # the bot's side closes at once
    # A drain's end meanwhile: the carrier closed again, nothing said again.
    pb >> EndRequested(EndReason.DRAIN) << CloseSide(Side.CARRIER)
    pb >> CarrierLost(Lost.GONE) << SidesGone()  # its close flushed, or cut
    assert pb and machine.state is State.ENDED
    assert machine.end_reason is EndReason.FLEET_CLOSED


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        (CarrierLost(Lost.GONE), EndReason.CARRIER_LOST),
        (FleetLost(Lost.RESET), EndReason.FLEET_RESET),
        (EndRequested(EndReason.CARRIER_SILENT), EndReason.CARRIER_SILENT),
        (EndRequested(EndReason.DRAIN), EndReason.DRAIN),
    ],
)
def test_a_tunnels_line_is_said_with_the_event_that_ends_it_once(ending, reason):
    """Whatever ends a tunnel, its line is said with that event, once: the
    sides' own goings after it say nothing more."""
    (a,) = fleets("a")
    pb, machine = new_call()
    assert in_tunnel(pb, a)
    said = machine.feed(ending)
    assert said[-1] == CallEnded(reason)
    assert [c for c in said if isinstance(c, CallEnded)] == [CallEnded(reason)]
    later: list[Command] = []
    if machine.carrier_open:
        later += machine.feed(CarrierLost(Lost.CLOSED))
    if machine.fleet_open:
        later += machine.feed(FleetLost(Lost.ERROR))
    assert not any(isinstance(c, CallEnded) for c in later)
    assert later[-1] == SidesGone() and machine.state is State.ENDED


# The table itself -----------------------------------------------------------


def test_every_state_has_its_row_in_the_table():
    assert set(CallMachine.TRANSITIONS) == set(State)


@pytest.mark.parametrize(
    ("setup", "event", "state"),
    [
        (lambda pb: pb << StartTimer(Timer.REQUEST, REQUEST_S), FleetHead(101, True), "head"),
        (lambda pb: up_to_slot(pb), FleetConnected(), "leasing"),
        (
            lambda pb: attempt(up_to_slot(pb), fleets("a")[0], 1),
            TimerFired(Timer.CONNECT),
            "awaiting",
        ),
        (lambda pb: in_tunnel(pb, fleets("a")[0]), HeadComplete(), "tunnel"),
    ],
)
def test_an_illegal_event_names_the_state_and_the_event(setup, event, state):
    pb, machine = new_call()
    assert setup(pb)
    with pytest.raises(IllegalEvent) as raised:
        machine.feed(event)
    assert raised.value.state.value == state
    assert state in str(raised.value) and type(event).__name__ in str(raised.value)


def test_a_command_emitted_between_events_is_raised_not_lost():
    """Handlers append to the event's own list; between events a machine holds
    none, and a command emitted then (a bug) raises rather than going nowhere."""
    pb, machine = new_call()
    assert up_to_slot(pb)
    for emit in (lambda: machine._out.append(ReleaseSlot()), lambda: machine._take_slot()):
        with pytest.raises(RuntimeError, match="only while an event is fed"):
            emit()
    assert machine.feed(SlotRefused("no fleet is up")) == [
        Answer(503, "no fleet is up"),
        CloseSide(Side.CARRIER),
        CallEnded(EndReason.REFUSED),
    ]
