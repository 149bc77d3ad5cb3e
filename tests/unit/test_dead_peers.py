"""The dead-peer watch's passes (net/dead_peers.py), with stand-in calls and
sockets: which sides' TCP_INFO it reads, and which it gives up. No sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from fleet_ingress.net import dead_peers
from fleet_ingress.net.dead_peers import DeadPeerWatch
from fleet_ingress.net.liveness import TCPI_LAST_DATA_RECV, PeerGaveNoAnswer, TcpLiveness


@dataclass
class Sock:
    """TCP_INFO as a socket would say it: heard `heard_ms` ago, retransmitting."""

    heard_ms: int
    reads: int = 0
    options: dict[tuple[int, int], int] = field(default_factory=dict)

    def getsockopt(self, level: int, name: int, size: int = 0) -> Any:
        if name == socket.TCP_INFO:
            self.reads += 1
            info = bytearray(232)
            info[0], info[2], info[4] = 1, 3, 3  # ESTABLISHED, retransmits, backoff
            struct.pack_into("=II", info, TCPI_LAST_DATA_RECV, self.heard_ms, self.heard_ms)
            return bytes(info)
        return self.options.get((level, name), 0)

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options[(level, name)] = value


@dataclass(eq=False)
class FakeSide:
    sock: Sock
    bytes_received: int = 0
    lost: bool = False
    why: PeerGaveNoAnswer | None = None

    def tcp_socket(self) -> Any:
        return self.sock

    def give_up(self, why: PeerGaveNoAnswer) -> None:
        self.why, self.lost = why, True


@dataclass(eq=False)
class FakeCall:
    carrier: FakeSide
    fleet_side: FakeSide | None
    id: int = 1
    in_tunnel: bool = True


def _passes(
    watch: DeadPeerWatch,
    clock: list[float],
    seconds: float,
    sides: list[FakeSide],
    user_timeouts: dict[int, float] | None = None,
) -> None:
    """Passes every PERIOD for `seconds` of a stand-in clock; the carrier sends
    all along (its count moves each pass), the fleet nothing. The calls
    watched with `user_timeouts` (call id: seconds; call 1 at 20 s)."""

    async def run() -> None:
        for call_id, user_timeout in (user_timeouts or {1: 20.0}).items():
            watch.watch(user_timeout, call_id)
        steps = round(seconds / dead_peers.PERIOD)
        for _ in range(steps):
            clock[0] += dead_peers.PERIOD
            sides[0].bytes_received += 320
            watch.sweep()

    asyncio.run(run())


def test_only_a_side_quiet_for_the_user_timeout_is_read_and_a_dead_one_is_given_up() -> None:
    clock = [1000.0]
    carrier = FakeSide(Sock(heard_ms=0))
    fleet = FakeSide(Sock(heard_ms=0))
    TcpLiveness().apply(fleet.sock)  # the kernel's user timeout: 21 s
    watch = DeadPeerWatch(lambda: [FakeCall(carrier, fleet)], clock=lambda: clock[0])
    # The fleet quiet since the first pass (0.5 s), but not yet for the user
    # timeout less a pass: no read.
    _passes(watch, clock, 19.5, [carrier, fleet])
    assert (carrier.sock.reads, fleet.sock.reads) == (0, 0)
    # Heard 19.6 s ago by TCP: read, not due yet.
    fleet.sock.heard_ms = 19_600
    _passes(watch, clock, 0.5, [carrier, fleet])
    assert fleet.sock.reads == 1 and fleet.why is None
    fleet.sock.heard_ms = 20_100
    _passes(watch, clock, 0.5, [carrier, fleet])
    watch.stop()
    assert fleet.why is not None  # cut, with a reset (the side's give_up)
    assert str(fleet.why.strerror) == (
        "TCP user timeout: what was sent to it went unacknowledged for 20s "
        "(timeouts.tcp_user_timeout)"
    )
    assert carrier.sock.reads == 0 and carrier.why is None  # it streams: never read


def test_a_quiet_side_whose_peer_still_answers_is_read_once_a_user_timeout_or_so() -> None:
    """A call on hold: the bot quiet, its TCP answering keepalive (heard 4 s ago)."""
    clock = [0.0]
    carrier = FakeSide(Sock(heard_ms=0))
    fleet = FakeSide(Sock(heard_ms=4_000))
    watch = DeadPeerWatch(lambda: [FakeCall(carrier, fleet)], clock=lambda: clock[0])
    _passes(watch, clock, 40.0, [carrier, fleet])
    watch.stop()
    # Quiet from 0.5 s; read at 20 s, then not before 16 s less a pass later.
    assert fleet.sock.reads == 2 and fleet.why is None


def test_a_reload_leaves_each_call_under_the_user_timeout_it_entered_its_tunnel_with() -> None:
    """SPEC 11: a reload never touches an established call. Its sockets keep the
    options they were given; the watch gives each call up at its own figure:
    call 1 at 60 s (taken before a reload to 20 s) is not given up 20.1 s into
    its fleet's silence, call 2 (at 20 s, after the reload) is; call 3 (taken
    after a reload to 0, kernel timeout off) is never looked at, and does not
    stop the watch over the others. On main one figure, the last call's, for
    all: call 1 given up at 20 s; with call 3 last, nothing watched at all."""
    clock = [0.0]
    sides = [FakeSide(Sock(heard_ms=0)) for _ in range(6)]
    for side in sides:
        side.sock.heard_ms = 20_100  # every side's peer silent 20.1 s, data out
    calls = [FakeCall(sides[0], sides[1], id=1), FakeCall(sides[2], sides[3], id=2)]
    calls.append(FakeCall(sides[4], sides[5], id=3))
    watch = DeadPeerWatch(lambda: calls, clock=lambda: clock[0])
    _passes(watch, clock, 21.0, sides, {1: 60.0, 2: 20.0, 3: 0.0})
    watch.stop()
    assert sides[1].why is None and sides[1].sock.reads == 0  # its 60 s not near
    assert sides[3].why is not None  # given up at its 20 s
    assert sides[5].why is None and sides[5].sock.reads == 0
