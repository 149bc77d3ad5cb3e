"""TCP options that find a peer gone without a FIN, on both sides of a call.

A carrier or fleet host that vanishes (link down, crash, a NAT forgetting the
flow) sends no FIN or RST; left to the kernel's defaults, a socket with data
in flight notices after about 15 minutes of retransmissions, and an idle one
never. Two options shorten that to seconds:

- `TCP_USER_TIMEOUT`: data left unacknowledged this long fails the connection
  (ETIMEDOUT). It catches the peer that vanished while we were sending to it:
  the carrier's audio toward a dead fleet, the bot's toward a dead carrier.
- keepalive (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`):
  after `idle` seconds with nothing received, a probe every `interval`; it
  catches a dead peer while nothing is in flight. With a user timeout set,
  Linux ends such a connection once `user_timeout` has passed since the last
  thing received (and a probe is out) rather than after `probes` probes.

- `TCP_RTO_MAX_MS` (Linux 6.15 and later), with a user timeout: retransmissions
  at most `RTO_MAX` apart. The kernel doubles the wait between retransmissions
  (0.2, 0.6, 1.4, 3, 6.2, 12.6, 25.4 s after a loss on a short path) and ends
  the connection at the user timeout: after a blackout longer than about 12.6
  s, nothing was sent again before the 20 s deadline, and a link back at 15 s
  lost the call (an audit, in namespaces, with plain TCP as well). Capped,
  a retransmission follows the link's return within `RTO_MAX`, and a blackout
  up to the user timeout less that is ridden out; a dead peer is still found
  at the user timeout.

Linux options: where the platform lacks one it is left unset.

A connection the kernel gives up on is gone without a word in either
direction: Linux sends no reset when the user timeout or keepalive ends it.
After a one-way loss (the peer's packets lost on the way here, ours still
reaching it) the peer is never told: a fleet's bot went on, holding the
fleet's capacity, for the kernel's 15 minutes of retransmissions (the
dead-peer audit of session 39). So the ingress gives such a connection up
itself, at the user timeout, with a reset that reaches a peer whose receive
path works (`net.dead_peers`, from TCP_INFO: `given_up_in`), and the kernel's
own user timeout is set `BACKSTOP` later, for a loop too late to look.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from fleet_ingress.logs import fields

log = logging.getLogger("fleet_ingress.liveness")

# Seconds between retransmissions at most (with a user timeout set); the
# kernel accepts 1 to 120.
RTO_MAX = 2.0
# <linux/tcp.h>; Python 3.11's socket module has no name for it.
TCP_RTO_MAX_MS = 44
# Seconds the kernel's TCP_USER_TIMEOUT is set past `user_timeout`: by then the
# ingress has given the connection up itself, with a reset (`given_up_in`).
BACKSTOP = 1.0
# SO_LINGER on with 0 s (struct linger): close() resets the connection.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)

# The errors a connection fails with when its peer vanished without a word:
# the user timeout or keepalive ran out (ETIMEDOUT), or, when ICMP or a dead
# neighbour said so on the way, the host or network was unreachable.
_GONE_ERRNOS = frozenset(
    {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)


class ThisKernel:
    """What the running kernel was found to lack, once a process (it does not
    change under a running process)."""

    refuses_rto_max = False  # TCP_RTO_MAX_MS: ENOPROTOOPT before Linux 6.15


@dataclass(frozen=True)
class TcpLiveness:
    """Seconds (0 turns an option off) and the probes keepalive sends."""

    user_timeout: float = 20.0
    keepalive_idle: float = 10.0
    keepalive_interval: float = 5.0
    keepalive_probes: int = 3
    # What `apply` sets, (level, option, value) in order, worked out once: a
    # call's fleet connection is set them all (the platform's names looked up,
    # the seconds made the kernel's units: 14 Python calls a call, session 43).
    _options: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)
    _rto_max: tuple[int, int, int] | None = field(init=False, repr=False, compare=False)
    # The kernel's user timeout as set (None: not set), which `inherited_by`
    # looks for on each carrier accepted.
    _user_timeout_ms: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        options = []
        user_timeout_ms = None
        if self.user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            user_timeout_ms = self._kernel_ms()
            options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms))
        if self.keepalive_idle > 0:
            options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
            keepalive = [
                ("TCP_KEEPIDLE", _whole_seconds(self.keepalive_idle)),
                ("TCP_KEEPINTVL", _whole_seconds(self.keepalive_interval)),
            ]
            if user_timeout_ms is None:
                # With a user timeout set, Linux's keepalive timer ends a
                # connection by it alone (tcp_keepalive_timer) and never counts
                # the probes: TCP_KEEPCNT would be a system call a fleet
                # connection for nothing (pinned in a namespace by
                # tests/e2e/test_listener_options.py).
                keepalive.append(("TCP_KEEPCNT", self.keepalive_probes))
            for name, value in keepalive:
                if hasattr(socket, name):
                    options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
        rto_max = None
        if self.user_timeout > 0 and sys.platform == "linux":
            rto_max = (socket.IPPROTO_TCP, TCP_RTO_MAX_MS, _ms(RTO_MAX))
        object.__setattr__(self, "_options", tuple(options))
        object.__setattr__(self, "_rto_max", rto_max)
        object.__setattr__(self, "_user_timeout_ms", user_timeout_ms)

    def apply(self, sock: Any) -> None:
        """Set the options on a connected TCP socket (or a transport's socket-like
        object); a refusal is logged, never fatal: the call works without them."""
        try:
            for level, option, value in self._options:
                sock.setsockopt(level, option, value)
        except OSError as exc:
            log.debug("tcp liveness options not set", extra=fields(error=repr(exc)))
            return
        if self._rto_max is not None and not ThisKernel.refuses_rto_max:
            try:
                sock.setsockopt(*self._rto_max)
            except OSError as exc:  # before Linux 6.15: blackouts past ~12 s end calls
                if exc.errno == errno.ENOPROTOOPT:
                    # The kernel has no such option: asked once a process, not
                    # again on each fleet connection (a failed system call, an
                    # exception and this line each).
                    ThisKernel.refuses_rto_max = True
                log.debug("tcp rto max not set", extra=fields(error=repr(exc)))

    def _kernel_ms(self) -> int:
        """The kernel's TCP_USER_TIMEOUT: the ingress's own give-up comes first
        (`BACKSTOP`); a C int of ms at most (the largest timeouts.tcp_user_timeout,
        less than BACKSTOP under it)."""
        return min(_ms(self.user_timeout + BACKSTOP), _MAX_INT_MS)

    def set_on_listener(self, sock: Any) -> int:
        """Set the options on a listening socket, those turned off too (after a
        reload): Linux copies a listener's socket and TCP options to each
        connection it accepts from then on (pinned by
        tests/e2e/test_listener_options.py), which then needs none set of its
        own: six system calls a carrier (session 40). What it returns is how
        many connections the kernel had taken already (in the backlog as the
        worker started, or as a reload changed them): those have the options
        from before and are to be set as before (`inherited_by` tells by the
        user timeout alone: one a reload changed only keepalive of, or turned
        the user timeout off in, passed for inherited)."""
        try:
            if hasattr(socket, "TCP_USER_TIMEOUT") and self.user_timeout <= 0:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)
            if self.keepalive_idle <= 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        except OSError as exc:
            log.debug("tcp liveness options not set", extra=fields(error=repr(exc)))
        self.apply(sock)
        return queued_on_listener(sock)

    def inherited_by(self, sock: Any) -> bool:
        """Whether an accepted socket has these options from its listener
        (`set_on_listener`): its user timeout as set, or (none set) its
        keepalive on; one getsockopt. False when both are off (nothing tells)."""
        try:
            if (ms := self._user_timeout_ms) is not None:
                return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == ms)
            if self.keepalive_idle > 0:
                return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        except OSError:
            pass
        return False


class PeerStoppedReading(TimeoutError):
    """The user timeout ended a connection whose peer went on sending but took
    no byte: its TCP window stayed closed on what we had to send. Gone as far
    as the call goes (`peer_gone`), but alive: a stuck reader, not a link or
    host lost, which is what the access line's detail says."""

    def __init__(self) -> None:
        super().__init__(
            errno.ETIMEDOUT, "stopped reading while still sending (its TCP window stayed closed)"
        )


class PeerGaveNoAnswer(TimeoutError):
    """The kernel gave a connection up (ETIMEDOUT), and which of its options
    did, with the figure set on the socket: the access line's detail for a
    `carrier_lost` / `fleet_lost` that said nothing of why (the dead-peer
    audit of session 39: an operator could not tell a peer that took no data
    from one that went quiet and answered no keepalive probe)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ETIMEDOUT, why)


# struct tcp_info (linux/tcp.h): the offsets of what the ingress reads, here
# alone (net/tls_socket.py reads a failed socket's with them too).
TCPI_STATE = 0  # u8, include/net/tcp_states.h
TCPI_RETRANSMITS, TCPI_PROBES, TCPI_BACKOFF = 2, 3, 4  # u8 each
TCPI_RTO = 8  # u32, us: the retransmission timeout now (backed off)
TCPI_UNACKED = 24  # u32, segments sent and not acknowledged
TCPI_LAST_DATA_SENT = 44  # u32, ms since (a retransmission counts)
TCPI_LAST_DATA_RECV = 52  # u32, ms since
TCPI_LAST_ACK_RECV = 56  # u32, ms since
TCPI_RTT = 68  # u32, us: the smoothed round trip
TCPI_NOTSENT_BYTES = 144  # u32
TCPI_SND_WND = 228  # u32, Linux 5.19 and later
TCP_INFO_READ = TCPI_SND_WND + 4  # the bytes asked for
TCP_ESTABLISHED = 1
TCP_CLOSE_WAIT = 8  # the peer's FIN read, our side still sending
# Seconds before a peer quiet past the user timeout with nothing of ours
# unanswered is looked at again (`given_up_in`).
QUIET_LOOK_AGAIN = 1.0
# Linux's least retransmission timeout (TCP_RTO_MIN): the first wait is the
# round trip plus this at least.
RTO_MIN = 0.2


def read_tcp_info(sock: Any) -> bytes:
    """The socket's TCP_INFO (as much as `TCP_INFO_READ` of it); b"" where
    there is none (closed, not TCP, not Linux)."""
    try:
        return bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_READ))
    except (OSError, AttributeError, TypeError, ValueError):
        return b""


def read_tcp_state(sock: Any) -> bytes:
    """The socket's TCP_INFO's first byte alone (tcpi_state, one byte copied:
    asked a few times a call while it is set up); b"" where there is none."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (OSError, AttributeError, TypeError, ValueError):
        return b""


def queued_on_listener(sock: Any) -> int:
    """Connections a listening socket's kernel has taken and not yet handed to
    accept() (its TCP_INFO's tcpi_unacked is the accept queue's length); 0 where
    it cannot tell."""
    info = read_tcp_info(sock)
    if len(info) < TCPI_UNACKED + 4:
        return 0
    return int(struct.unpack_from("=I", info, TCPI_UNACKED)[0])


def probes_out(info: bytes) -> bool:
    """Retransmissions, keepalive or window probes unanswered, or backed off."""
    return len(info) > TCPI_BACKOFF and bool(
        info[TCPI_RETRANSMITS] or info[TCPI_PROBES] or info[TCPI_BACKOFF]
    )


def given_up_in(info: bytes, user_timeout: float) -> float:
    """Seconds until the ingress gives a connection up, from its TCP_INFO: 0 now,
    inf never (nothing to say, or no user timeout). Now when, as the kernel
    would at its user timeout, the peer was last heard (data or an ACK)
    `user_timeout` ago and something of ours is unanswered (a retransmission,
    a keepalive or window probe), and data of ours, if any is out, has gone
    unacknowledged that long (`data_unanswered_for`: the kernel counts data's
    timeout from its first send, not from when the peer was last heard; a
    call on hold, heard only by keepalive up to `keepalive_idle` before, that
    sent something as a blackout began was given up up to that much sooner
    than the user timeout: 12 s into a blackout for a peer heard 8 s before
    it, measured in a namespace). Until then, the time left, however it goes
    meanwhile: a peer heard again is looked at again no sooner. Pure: the
    watch (`net.dead_peers`) reads the socket."""
    if user_timeout <= 0 or len(info) < TCPI_LAST_ACK_RECV + 4:
        return float("inf")
    if info[TCPI_STATE] not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
        return float("inf")  # closing or closed: the kernel's own end follows
    last_data, last_ack = struct.unpack_from("=II", info, TCPI_LAST_DATA_RECV)
    left = user_timeout - min(last_data, last_ack) / 1000
    data_out_for = data_unanswered_for(info)
    if data_out_for is not None:
        left = max(left, user_timeout - data_out_for)
    if left > 0:
        return left
    # Heard from that long ago but nothing unanswered (keepalive off, or its
    # probe not out yet): due once something goes out unanswered.
    return 0.0 if probes_out(info) else QUIET_LOOK_AGAIN


def data_unanswered_for(info: bytes) -> float | None:
    """Seconds since data of ours still unacknowledged was first sent, as the
    kernel's user timeout counts it, estimated from its retransmissions (the
    kernel's start, `retrans_stamp`, is not in TCP_INFO): the waits between
    them double from the first retransmission timeout, up to the one now,
    and the last was sent `tcpi_last_data_sent` ago. The first wait is taken
    as the least it can be (the one now halved as often as it was backed off,
    or the round trip plus `RTO_MIN`), so the estimate is low, never high: a
    call is not given up before the kernel would count it out. None when no
    data is out; 0 when it is not yet retransmitted (too soon to count). Before the first
    retransmission timeout Linux sends a tail loss probe (twice the round
    trip; plus `RTO_MIN` with one segment out) and counts that timeout from
    it: measured, with one segment sent into a blackout on a namespace's
    loopback, the estimate is 0.25 s behind the kernel's count with it, 0.45 s
    without."""
    if len(info) < TCPI_RTT + 4:
        return None
    (unacked,) = struct.unpack_from("=I", info, TCPI_UNACKED)
    if not unacked:
        return None
    retransmits = info[TCPI_RETRANSMITS]
    if not retransmits:
        return 0.0
    (rto_now,) = struct.unpack_from("=I", info, TCPI_RTO)
    (rtt,) = struct.unpack_from("=I", info, TCPI_RTT)
    (since_sent,) = struct.unpack_from("=I", info, TCPI_LAST_DATA_SENT)
    rto_now_s = rto_now / 1e6
    backoff = min(info[TCPI_BACKOFF], 31)
    wait = min(rto_now_s, max(rto_now_s / (1 << backoff), rtt / 1e6 + RTO_MIN))
    waited = 2 * rtt / 1e6 + (RTO_MIN if unacked == 1 else 0.0)  # the tail loss probe
    for _ in range(retransmits):
        waited += wait
        wait = min(wait * 2, rto_now_s)
    return waited + since_sent / 1000


def window_closed_on_unsent(info: bytes) -> bool:
    """The peer's window is closed on bytes of ours still to send."""
    if len(info) < TCP_INFO_READ:
        return False
    (notsent,) = struct.unpack_from("=I", info, TCPI_NOTSENT_BYTES)
    (snd_wnd,) = struct.unpack_from("=I", info, TCPI_SND_WND)
    return snd_wnd == 0 and notsent > 0


def gave_no_answer(info: bytes, sock: Any, window_closed: bool = False) -> PeerGaveNoAnswer:
    """Which option ended a connection whose peer stopped answering, from its
    TCP_INFO once failed (`window_closed`: its window was closed on bytes of
    ours): data retransmitted or probed into a closed window is the user
    timeout's; keepalive probes alone, keepalive's (ended by the user timeout
    when one is set, else after its probes)."""
    # The configured figure: the kernel's is BACKSTOP past it (`apply`).
    kernel_timeout = _option(sock, socket.IPPROTO_TCP, "TCP_USER_TIMEOUT") / 1000
    user_timeout = max(0.0, kernel_timeout - BACKSTOP) if kernel_timeout else 0.0
    data_out = len(info) > TCPI_BACKOFF and bool(info[TCPI_RETRANSMITS] or info[TCPI_BACKOFF])
    if window_closed or data_out:
        return PeerGaveNoAnswer(
            f"TCP user timeout: what was sent to it went unacknowledged for "
            f"{user_timeout:g}s (timeouts.tcp_user_timeout)"
        )
    if len(info) > TCPI_PROBES and info[TCPI_PROBES]:
        idle = _option(sock, socket.IPPROTO_TCP, "TCP_KEEPIDLE")
        interval = _option(sock, socket.IPPROTO_TCP, "TCP_KEEPINTVL")
        ended = (
            f"{user_timeout:g}s after it was last heard (timeouts.tcp_user_timeout)"
            if user_timeout > 0
            else f"after {_option(sock, socket.IPPROTO_TCP, 'TCP_KEEPCNT')} probes "
            "(limits.keepalive_probes)"
        )
        return PeerGaveNoAnswer(
            f"TCP keepalive: nothing in flight, no answer to its probes (timeouts.keepalive_idle "
            f"{idle}s, then every {interval}s), given up {ended}"
        )
    return PeerGaveNoAnswer("the peer stopped answering (TCP)")


def _option(sock: Any, level: int, name: str) -> int:
    try:
        return int(sock.getsockopt(level, getattr(socket, name)))
    except (OSError, AttributeError, TypeError, ValueError):
        return 0


def peer_gone(exc: BaseException | None) -> bool:
    """Whether a connection failed because its peer vanished (no FIN, no RST)."""
    return isinstance(exc, OSError) and exc.errno in _GONE_ERRNOS


_MAX_INT_MS = 2**31 - 1  # TCP_USER_TIMEOUT is a C int


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _whole_seconds(seconds: float) -> int:
    # The kernel counts keepalive in whole seconds, from 1.
    return max(1, round(seconds))
