"""The ingress gives up on a call's peer that stopped answering, with a reset.

The kernel ends a connection whose peer stopped answering at the user
timeout (`net.liveness`), and says nothing to the peer: no reset. A peer that
still receives (a one-way loss: its packets lost on the way here, ours still
reaching it) is never told its call ended: a fleet's bot went on for the
kernel's 15 minutes of retransmissions, holding the fleet's capacity, after
the ingress had ended the call `fleet_lost` (the dead-peer audit of session
39). So the ingress ends such a side itself at the user timeout, reading its
TCP_INFO (`liveness.given_up_in`), with a reset that reaches such a peer
(`_Side.give_up`); the kernel's own timeout is `liveness.BACKSTOP` later.
A two-way blackout that heals before the user timeout is ridden out as
before: a peer heard again is not given up.

One timer for every call, as the silence sweep (`net.calls.SilenceSweep`):
a pass every `PERIOD` while calls are in their tunnel. No system call for a
side that sent anything since the pass before, nor for one that cannot be
due yet (heard from less than the user timeout less a period ago): TCP_INFO
is read only for a side quiet that long, and again no sooner than it could
be due (a call on hold, its peer answering keepalive, is read once per
keepalive interval or so).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fleet_ingress.logs import fields
from fleet_ingress.net.liveness import (
    PeerGaveNoAnswer,
    gave_no_answer,
    given_up_in,
    read_tcp_info,
    window_closed_on_unsent,
)

log = logging.getLogger("fleet_ingress.liveness")

# Seconds between passes: a dead peer is given up this much after the user
# timeout at most (the kernel's own is liveness.BACKSTOP after it). A pass
# costs about a microsecond a call with no system call (two passes a second:
# 2-3% of a core at 10,000 calls, an estimate, not measured).
PERIOD = 0.5


class Side(Protocol):
    """A call's side as the watch sees it (`net.calls.Side`)."""

    @property
    def bytes_received(self) -> int: ...
    @property
    def lost(self) -> bool: ...
    def tcp_socket(self) -> Any: ...
    def give_up(self, why: PeerGaveNoAnswer) -> None: ...


class Call(Protocol):
    """A call as the watch sees it (`net.calls.Call`)."""

    @property
    def id(self) -> int: ...
    @property
    def in_tunnel(self) -> bool: ...
    @property
    def carrier(self) -> Side: ...
    @property
    def fleet_side(self) -> Side | None: ...


class _Heard:
    """What a pass saw of one side: its byte count, since when it stands
    (monotonic), and when its TCP_INFO is worth reading next."""

    __slots__ = ("count", "look_at", "since")

    def __init__(self, count: int, since: float) -> None:
        self.count, self.since, self.look_at = count, since, 0.0


class DeadPeerWatch:
    def __init__(
        self, calls: Callable[[], Iterable[Call]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._calls = calls
        self._clock = clock
        # Each call's user timeout, by call id, as it was when it entered its
        # tunnel: its sockets' options (the kernel's, BACKSTOP later) are set
        # then, and a reload leaves an established call alone (SPEC 11). One
        # figure for all (the last call's) gave calls taken before a reload
        # that lowered it up early, and left those before one that raised it
        # or turned it off (0) to the kernel's end without a reset.
        self._user_timeouts: dict[int, float] = {}
        self._heard: dict[Side, _Heard] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, user_timeout: float, call_id: int) -> None:
        """Call `call_id` is in its tunnel, under `user_timeout` (0: not given up)."""
        if user_timeout <= 0:
            return  # none kept: a call unknown to the watch is not given up
        self._user_timeouts[call_id] = user_timeout
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(PERIOD, self.sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._heard.clear()
        self._user_timeouts.clear()

    def sweep(self) -> None:
        self._timer = None
        now = self._clock()
        heard: dict[Side, _Heard] = {}
        user_timeouts: dict[int, float] = {}
        for call in list(self._calls()):
            if not call.in_tunnel:
                continue
            user_timeout = self._user_timeouts.get(call.id, 0.0)
            user_timeouts[call.id] = user_timeout
            if user_timeout <= 0:
                continue
            for side in (call.carrier, call.fleet_side):
                if side is None or side.lost:
                    continue
                seen = self._heard.get(side)
                if seen is None:
                    seen = _Heard(side.bytes_received, now)
                elif seen.count != side.bytes_received:  # heard since: its clock starts over
                    seen.count, seen.since, seen.look_at = side.bytes_received, now, 0.0
                heard[side] = seen
                if now - seen.since < user_timeout - PERIOD or now < seen.look_at:
                    continue
                try:
                    self._look(side, user_timeout, seen, now)
                except Exception:  # a bug must not stop the watch over every call
                    log.exception("dead peer check failed", extra=fields(call_id=call.id))
        self._heard = heard
        self._user_timeouts = user_timeouts
        if heard:
            self._timer = asyncio.get_running_loop().call_later(PERIOD, self.sweep)

    @staticmethod
    def _look(side: Side, user_timeout: float, seen: _Heard, now: float) -> None:
        sock: Any = side.tcp_socket()
        if sock is None:
            return
        info = read_tcp_info(sock)
        left = given_up_in(info, user_timeout)
        if left > 0:
            seen.look_at = now + max(0.0, left - PERIOD)
            return
        side.give_up(gave_no_answer(info, sock, window_closed_on_unsent(info)))
