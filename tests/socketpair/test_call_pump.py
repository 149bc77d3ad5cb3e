"""The call pump (net/proxy.py) without TLS: the carrier side on one end of a
socketpair, a plain-HTTP fleet on loopback, no listener, no service around it.

What TLS does not change is tested here, cheaply: answers and their counts,
the relay both ways, flow control's bound, who hangs up, slots given back.
The same behaviour with real TLS and real WebSocket clients is in tests/e2e/.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import sys
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import h11
import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.call_machine import (
    CallMachine,
    Command,
    EndReason,
    Event,
    FleetHead,
    IllegalEvent,
    Link,
)
from fleet_ingress.core.fleet_exchange import FleetExchange, ResponseHead
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.request_head import RequestHeadReader
from fleet_ingress.core.retry import RetryPolicy
from fleet_ingress.core.routing import Router
from fleet_ingress.core.silence import SilencePolicy
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.dispatch import Dispatcher
from fleet_ingress.net.liveness import TcpLiveness
from fleet_ingress.net.proxy import MAX_BUFFERED_PER_CALL, CarrierProtocol, ProxyContext
from tests.support import SWITCHING, UPGRADE, eventually, read_head

FleetHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Pump:
    ctx: ProxyContext
    balancer: Balancer

    async def carrier(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A carrier connection: our end of a socketpair whose other end the pump serves."""
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: CarrierProtocol(self.ctx), theirs)
        return await asyncio.open_connection(sock=ours)


@pytest.fixture
async def pump_with_fleet() -> AsyncIterator[Callable[[FleetHandler], Awaitable[Pump]]]:
    servers: list[asyncio.Server] = []

    async def make(handler: FleetHandler, silence: SilencePolicy | None = None) -> Pump:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        specs = parse_fleets_text(f"http://127.0.0.1:{port} name=a", default_maxconn=16)
        balancer = Balancer(FleetSet.from_specs(specs))
        dispatcher = Dispatcher(balancer, queue_timeout=1.0, max_queue=8)
        ctx = ProxyContext(
            router=Router(["/ws/", "/exotel/"], "/haproxy-health"),
            slots=dispatcher,
            registry=Registry(),
            retry=RetryPolicy(retries=0, conditions=frozenset(), statuses=frozenset()),
            fleet_ssl=ssl.create_default_context(),
            connect_timeout=2.0,
            response_timeout=2.0,
            request_timeout=2.0,
            silence=silence or SilencePolicy(tunnel=60.0, carrier=30.0),
            liveness=TcpLiveness(),
            max_head_bytes=16384,
            max_header_count=100,
            max_connections=100,
            access_log=False,
        )
        return Pump(ctx, balancer)

    yield make
    for server in servers:
        server.close()


async def echo_after_switching(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(SWITCHING)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_the_health_route_is_answered_and_counted_without_a_fleet(pump_with_fleet):
    pump = await pump_with_fleet(echo_after_switching)
    reader, writer = await pump.carrier()
    writer.write(b"GET /haproxy-health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(-1), 5)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
    assert pump.ctx.registry.requests[("health", 200)] == 1
    assert pump.balancer.fleets[0].opened_total == 0
    writer.close()


async def test_a_host_port_too_long_for_int_is_answered_400_not_left_hanging(pump_with_fleet):
    """Python's int() refuses more than 4,300 digits with a ValueError: raised out of
    the queued parse, it left the connection open with no head timer, unanswered."""
    pump = await pump_with_fleet(echo_after_switching)
    reader, writer = await pump.carrier()
    writer.write(b"GET /ws/bot HTTP/1.1\r\nHost: h:" + b"9" * 5000 + b"\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(-1), 5)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert pump.ctx.registry.requests[("-", 400)] == 1
    await eventually(lambda: not pump.ctx.registry.connections)
    writer.close()


async def test_a_head_whose_parse_fails_unexpectedly_is_still_answered_and_closed(
    pump_with_fleet, monkeypatch
):
    def parse_bug(raw: bytes) -> None:
        raise RuntimeError("a bug in the parse")

    monkeypatch.setattr("fleet_ingress.net.proxy.parse_request_head", parse_bug)
    pump = await pump_with_fleet(echo_after_switching)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot").encode())
    try:
        answer = await asyncio.wait_for(reader.read(-1), 3)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_a_call_is_relayed_both_ways_unchanged_and_its_slot_comes_back(pump_with_fleet):
    pump = await pump_with_fleet(echo_after_switching)
    fleet = pump.balancer.fleets[0]
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot-1").encode())
    assert await asyncio.wait_for(reader.readexactly(len(SWITCHING)), 5) == SWITCHING
    assert fleet.active == 1
    payload = bytes(range(256)) * 64
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    (call,) = pump.ctx.registry.calls
    writer.close()
    await eventually(lambda: not pump.ctx.registry.calls)
    assert fleet.active == 0
    assert call.end_reason is not None and call.end_reason.value == "carrier closed"
    # Tunnel bytes each way (the fleet's 101 head is not counted as relayed).
    assert (call.bytes_from_carrier, call.bytes_to_carrier) == (len(payload), len(payload))


def _reachable(root: object, limit: int = 20000) -> list[object]:
    """Objects a call holds: reachable from root without going through what
    every call shares (the context, the loop, functions and their modules)."""
    shared = (type, types.ModuleType, types.FunctionType, ProxyContext, asyncio.AbstractEventLoop)
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, shared):
            continue
        assert len(seen) < limit, "the walk left the call"
        seen[id(obj)] = obj
        stack.extend(gc.get_referents(obj))
    return list(seen.values())


async def test_a_held_tunnel_keeps_none_of_its_set_up_state(pump_with_fleet):
    """Memory per held call (issue 13): once linked, the head reader, the
    fleet's HTTP exchange (h11's connection, the 101's headers) and the machine's
    last commands are let go; a thousand idle calls would carry them all."""
    pump = await pump_with_fleet(echo_after_switching)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot-1").encode())
    assert await asyncio.wait_for(reader.readexactly(len(SWITCHING)), 5) == SWITCHING
    writer.write(b"frame")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"frame"
    (call,) = pump.ctx.registry.calls
    kept = {type(obj) for obj in _reachable(call.carrier)}
    assert call.fleet_side in _reachable(call.carrier)  # the walk does reach the fleet side
    for gone in (h11.Connection, RequestHeadReader, FleetExchange, ResponseHead, Link):
        assert gone not in kept, gone.__name__
    # No timer runs in a tunnel, and none leaves its dict's table behind.
    assert sys.getsizeof(call.carrier._timers) == sys.getsizeof({})
    writer.close()
    await eventually(lambda: not pump.ctx.registry.calls)


async def test_a_fleet_hang_up_closes_the_carrier_and_is_the_fleets(pump_with_fleet):
    async def switch_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await read_head(reader)
        writer.write(SWITCHING + b"bye")
        await writer.drain()
        writer.close()

    pump = await pump_with_fleet(switch_then_close)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/exotel/bot-2").encode())
    assert await asyncio.wait_for(reader.read(-1), 5) == SWITCHING + b"bye"
    await eventually(lambda: not pump.ctx.registry.calls)
    assert pump.ctx.registry.ended[("a", "fleet closed")] == 1
    assert pump.balancer.fleets[0].active == 0
    writer.close()


# A message's payload (a zero mask: sent as it is): 0x88 and zeros, or the very
# bytes of a masked close frame (1000), read alone as a close frame would be.
_LOOKS_CLOSING = [b"\x88" + bytes(99), b"\x88\x82\x01\x02\x03\x04\x02\xea"]


@pytest.mark.parametrize("payload", _LOOKS_CLOSING, ids=["starts-0x88", "one-close-frame"])
async def test_a_message_read_that_starts_like_a_close_frame_does_not_say_who_hung_up(
    pump_with_fleet, payload: bytes
):
    """Who hung up is told by a side's close frame, where the frame tracker
    finds one. A binary message's payload read on its own may start with 0x88
    too (here the carrier's masked payload), or even be the bytes of a whole
    close frame: it is not a close frame. The fleet's close frame, which
    follows, is: the fleet hung up, though the carrier's TCP close then comes
    first (the fleet waits for it)."""
    got_payload = asyncio.Event()

    async def close_after_a_message(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await read_head(reader)
        writer.write(SWITCHING)
        await reader.readexactly(2 + 4 + len(payload))
        got_payload.set()
        writer.write(b"\x88\x02\x0f\xa1")  # close 4001, unmasked: the fleet is the server
        await writer.drain()
        await reader.read()  # until the carrier's side is closed
        writer.close()

    pump = await pump_with_fleet(close_after_a_message)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot-1").encode())
    assert await asyncio.wait_for(reader.readexactly(len(SWITCHING)), 5) == SWITCHING
    writer.write(bytes((0x82, 0x80 | len(payload))) + bytes(4))  # binary, masked; a zero mask
    await writer.drain()
    await asyncio.sleep(0.05)  # read by the ingress apart from its payload
    writer.write(payload)
    await asyncio.wait_for(got_payload.wait(), 5)
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x88\x02\x0f\xa1"
    writer.close()  # the carrier answers a close by closing: TCP goes from its side first
    await eventually(lambda: not pump.ctx.registry.calls)
    assert dict(pump.ctx.registry.ended) == {("a", "fleet closed"): 1}


@pytest.mark.parametrize(
    "answer, after_head",
    [
        (SWITCHING, b"\x81\x05first"),  # a tunnel's first frame in the 101's read
        (b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 5\r\n\r\n", b"slow!"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\n", b"no"),
    ],
)
async def test_bytes_to_the_carrier_count_what_follows_the_fleets_head_in_its_first_read(
    pump_with_fleet, answer, after_head
):
    """What came in the same read as the fleet's head (a body, a tunnel's
    first frame) is relayed with it and counts as relayed, as the reads after
    it do; the head itself does not (nor the carrier's head the other way)."""

    async def answer_in_one_write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await read_head(reader)
        writer.write(answer + after_head)
        await writer.drain()
        writer.close()

    pump = await pump_with_fleet(answer_in_one_write)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot-1").encode())
    # The answer's own head: a 1xx before it is not relayed (the review of session 35).
    head = answer[answer.rindex(b"HTTP/1.1 ") :]
    # A tunnel's fleet gone with no close frame: the ingress's 1011 follows.
    goodbye = b"\x88\x0e\x03\xf3fleet closed" if answer == SWITCHING else b""
    assert await asyncio.wait_for(reader.read(-1), 5) == head + after_head + goodbye
    await eventually(lambda: not pump.ctx.registry.calls)
    assert pump.ctx.registry.ended_bytes_to_carrier == len(after_head)  # relayed: not its own
    writer.close()


async def test_a_fleet_that_stops_reading_stops_the_carrier_being_read(pump_with_fleet):
    """Flow control: what the call holds stays under its bound, however much
    the carrier sends, while the fleet reads nothing."""
    reading = asyncio.Event()

    async def switch_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await read_head(reader)
        writer.write(SWITCHING)
        await reading.wait()
        while await reader.read(65536):
            pass
        writer.close()

    pump = await pump_with_fleet(switch_then_stall)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot-3").encode())
    await asyncio.wait_for(reader.readexactly(len(SWITCHING)), 5)
    chunk = b"x" * 65536
    peak = 0
    for _ in range(400):  # at most 25 MiB offered; the kernel's buffers take some
        writer.write(chunk)
        await asyncio.sleep(0.005)
        peak = max(peak, pump.ctx.registry.buffered_bytes())
        if writer.transport.get_write_buffer_size() > 1024 * 1024:
            break  # the pump has stopped reading us
    assert writer.transport.get_write_buffer_size() > 1024 * 1024, "never held back"
    assert 0 < peak <= MAX_BUFFERED_PER_CALL
    reading.set()
    writer.close()
    await eventually(lambda: not pump.ctx.registry.calls)


async def test_a_carrier_that_stops_reading_while_it_sends_is_ended_and_its_slot_freed(
    pump_with_fleet,
):
    """A carrier whose reader is stuck while its audio flows, the bot talking:
    the pump stops reading the fleet (flow control) and nothing else ends the
    call (the carrier is not silent, bytes move one way). Linux's user timeout
    may not either: every ACK the carrier sends puts its window probe back (the
    lossy-link audit of session 32: 4 of 20 such calls on loopback still up
    25 s after a 1 s user timeout). A socketpair has no user timeout at all:
    the ingress's own limit (`stalled`, timeouts.tcp_user_timeout) ends it."""
    fleet_closed = asyncio.Event()

    async def bot_talking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await read_head(reader)
        writer.write(SWITCHING)

        async def talk() -> None:
            while True:
                writer.write(b"b" * 16384)
                await writer.drain()
                await asyncio.sleep(0.005)

        talking = asyncio.get_running_loop().create_task(talk())
        with contextlib.suppress(OSError):
            while await reader.read(65536):  # it hears the caller
                pass
        fleet_closed.set()
        talking.cancel()

    silence = SilencePolicy(tunnel=60.0, carrier=30.0, stalled=1.0)
    pump = await pump_with_fleet(bot_talking, silence)
    fleet = pump.balancer.fleets[0]
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/stuck").encode())
    await asyncio.wait_for(reader.readexactly(len(SWITCHING)), 5)
    reader._transport.pause_reading()  # type: ignore[attr-defined]  # its reader is stuck
    [call] = pump.ctx.registry.calls
    started = asyncio.get_running_loop().time()
    while call.end_reason is None and asyncio.get_running_loop().time() - started < 8:
        writer.write(b"c" * 320)  # its audio goes on
        await asyncio.sleep(0.02)
    assert call.end_reason is EndReason.CARRIER_LOST
    assert call.machine is not None and "stopped reading" in (call.machine.error_text or "")
    took = asyncio.get_running_loop().time() - started
    assert took < 1.0 * 1.25 + 1.0, took  # the limit, a sweep, and the pump's buffers filling
    await eventually(lambda: fleet.active == 0 and not pump.ctx.registry.calls)
    await asyncio.wait_for(fleet_closed.wait(), 12)  # the bot is told
    writer.transport.abort()


async def test_a_carrier_that_leaves_while_the_fleet_is_silent_gives_its_slot_back(
    pump_with_fleet,
):
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.read(-1)
        writer.close()

    pump = await pump_with_fleet(never_answer)
    fleet = pump.balancer.fleets[0]
    _, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot-4").encode())
    await eventually(lambda: fleet.active == 1)
    writer.close()
    await eventually(lambda: fleet.active == 0 and not pump.ctx.registry.calls)


async def test_an_event_the_call_machine_refuses_closes_both_sides_at_once(
    pump_with_fleet, monkeypatch
):
    """A machine bug (an IllegalEvent) is logged and the call's sockets go, rather
    than the connection being left open in a state nothing will leave."""
    feed = CallMachine.feed

    def refuse_fleet_head(self: CallMachine, event: Event) -> list[Command]:
        if isinstance(event, FleetHead):
            raise IllegalEvent(self.state, event)
        return feed(self, event)

    monkeypatch.setattr(CallMachine, "feed", refuse_fleet_head)
    pump = await pump_with_fleet(echo_after_switching)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot").encode())
    try:
        await asyncio.wait_for(reader.read(-1), 1.0)  # the response timer is 2 s
    except ConnectionResetError:
        pass  # aborted: a reset is as good as a close here
    finally:
        writer.close()
    await eventually(lambda: not pump.ctx.registry.connections, timeout=1.0)
    assert pump.balancer.fleets[0].active == 0


def _fail_building_the_fleet_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug while building the fleet's request")

    monkeypatch.setattr("fleet_ingress.net.proxy.fleet_request_headers", bug)


def _fail_sending_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: TcpLiveness, sock: object) -> None:
        raise RuntimeError("a bug while tuning the fleet socket")

    monkeypatch.setattr(TcpLiveness, "apply", bug)


@pytest.mark.parametrize(
    "inject",
    [_fail_building_the_fleet_request, _fail_sending_the_head],
    ids=["slot-granted", "fleet-connected"],
)
async def test_a_command_that_raises_during_setup_answers_502_and_gives_the_slot_back(
    pump_with_fleet, monkeypatch, inject
):
    """An unexpected error while carrying out a setup command (outside the
    slot-wait and connect coroutines' own try) was raised out of the pump: the
    call stayed in a state whose timer had not been started, the carrier was
    never answered and the slot was held until the carrier gave up. It is
    answered 502 and ended as an error, like any other setup failure."""
    inject(monkeypatch)
    pump = await pump_with_fleet(echo_after_switching)
    fleet = pump.balancer.fleets[0]
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot").encode())
    try:
        answer = await asyncio.wait_for(reader.read(-1), 1.0)  # timers are 2 s
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 502 ")
    await eventually(lambda: not pump.ctx.registry.calls, timeout=1.0)
    assert fleet.active == 0
    assert pump.ctx.registry.ended[("a", "error")] == 1


async def test_a_command_that_raises_once_linked_ends_the_call_as_an_error(
    pump_with_fleet,
):
    """An error while linking (here a linked-call hook) must not leave the call
    half-linked: both sides are closed and the end is the ingress's, not a side's."""

    def hook_bug(call: object) -> None:
        raise RuntimeError("a bug in a linked-call hook")

    pump = await pump_with_fleet(echo_after_switching)
    pump.ctx.registry.on_call_linked.append(hook_bug)
    fleet = pump.balancer.fleets[0]
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot").encode())
    try:
        answer = await asyncio.wait_for(reader.read(-1), 1.0)
    finally:
        writer.close()
    # Linked: the carrier is told the call ended on the ingress's error (1011).
    assert answer == SWITCHING + b"\x88\x0c\x03\xf3call error"
    await eventually(lambda: not pump.ctx.registry.calls, timeout=1.0)
    assert fleet.active == 0
    assert pump.ctx.registry.ended[("a", "error")] == 1


async def test_a_route_lookup_that_raises_closes_the_connection(pump_with_fleet, monkeypatch):
    """The route is looked up inside the machine, after the head timer is gone:
    an error there left the connection open and unanswered for good (holding a
    connection slot). It is logged and the connection closed."""

    def route_bug(self: Router, path: str) -> None:
        raise RuntimeError("a bug in the router")

    monkeypatch.setattr(Router, "route", route_bug)
    pump = await pump_with_fleet(echo_after_switching)
    reader, writer = await pump.carrier()
    writer.write(UPGRADE.format(path="/ws/bot").encode())
    try:
        await asyncio.wait_for(reader.read(-1), 1.0)  # the request timer is 2 s
    except ConnectionResetError:
        pass  # aborted: a reset is as good as a close here
    finally:
        writer.close()
    await eventually(lambda: not pump.ctx.registry.connections, timeout=1.0)


# The bound: the limit, a sweep, a hold (and the test's own look, after the next
# hold). Measured: 1.06 s and 3.05 s; before, 2.7-3.3 s and not ended in 6 s.
@pytest.mark.parametrize(("held", "bound"), [(0.5, 1.0 * 1.25 + 0.5 + 0.45), (1.5, 4.5)])
async def test_a_loop_held_in_turns_keeps_the_silence_limit_and_spares_a_streaming_carrier(
    pump_with_fleet, held, bound
):
    """Two calls with carrier_silence 1 s, their bots talking, on a worker
    whose loop is held `held` seconds at a time (a heavy relay, a host with no
    CPU to spare), reading its sockets in between: the muted carrier is ended
    within 1.25 x its limit and a hold, the streaming one goes on, even where
    a hold is longer than the limit (its audio waits unread in the kernel).
    Before, each late sweep pass counted its lateness as no one's silence: the
    muted call went on for 2.7-3.3 s with 0.5 s holds, and was not ended in
    6 s with 1.5 s holds."""

    async def bot_talking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await read_head(reader)
        writer.write(SWITCHING)
        with contextlib.suppress(OSError):
            while not reader.at_eof():
                writer.write(b"b" * 1600)
                await writer.drain()
                await asyncio.sleep(0.02)

    pump = await pump_with_fleet(bot_talking, SilencePolicy(tunnel=60.0, carrier=1.0))
    loop = asyncio.get_running_loop()
    carriers = []
    for name in ("muted", "streaming"):
        reader, writer = await pump.carrier()
        writer.write(UPGRADE.format(path=f"/ws/{name}").encode())
        await asyncio.wait_for(reader.readexactly(len(SWITCHING)), 5)
        carriers.append((reader, writer))
    muted, streaming = sorted(pump.ctx.registry.calls, key=lambda call: call.bot_id)

    async def carrier(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, talks: bool):
        with contextlib.suppress(OSError):
            while await reader.read(65536):  # it reads what it is sent
                if talks:  # and talks, or says nothing
                    writer.write(b"c" * 320)

    tasks = [
        loop.create_task(carrier(*carriers[0], talks=False)),
        loop.create_task(carrier(*carriers[1], talks=True)),
    ]
    started = loop.time()
    holding = True

    def hold() -> None:  # the loop held, then 50 ms of it free; for 6 s at most
        time.sleep(held)
        if holding and loop.time() - started < 6:
            loop.call_later(0.05, hold)

    loop.call_soon(hold)
    try:
        while muted.end_reason is None and loop.time() - started < 6:
            await asyncio.sleep(0.05)
        took = loop.time() - started
        await asyncio.sleep(0.5)
    finally:
        holding = False
        for task in tasks:
            task.cancel()
    assert muted.end_reason is EndReason.CARRIER_SILENT, (muted.end_reason, took)
    assert muted.bytes_to_carrier > 0  # its bot talked
    assert took < bound, took
    assert streaming.end_reason is None and streaming.bytes_from_carrier > 0
    for _, writer in carriers:
        writer.transport.abort()
