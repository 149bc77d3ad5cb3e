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
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from dataclasses import dataclass
from typing import Any

from fleet_ingress.logs import fields

log = logging.getLogger("fleet_ingress.liveness")

# Seconds between retransmissions at most (with a user timeout set); the
# kernel accepts 1 to 120.
RTO_MAX = 2.0
# <linux/tcp.h>; Python 3.11's socket module has no name for it.
TCP_RTO_MAX_MS = 44

# The errors a connection fails with when its peer vanished without a word:
# the user timeout or keepalive ran out (ETIMEDOUT), or, when ICMP or a dead
# neighbour said so on the way, the host or network was unreachable.
_GONE_ERRNOS = frozenset(
    {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)


@dataclass(frozen=True)
class TcpLiveness:
    """Seconds (0 turns an option off) and the probes keepalive sends."""

    user_timeout: float = 20.0
    keepalive_idle: float = 10.0
    keepalive_interval: float = 5.0
    keepalive_probes: int = 3

    def apply(self, sock: Any) -> None:
        """Set the options on a connected TCP socket (or a transport's socket-like
        object); a refusal is logged, never fatal: the call works without them."""
        try:
            if self.user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _ms(self.user_timeout))
            if self.keepalive_idle > 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for name, value in (
                    ("TCP_KEEPIDLE", _whole_seconds(self.keepalive_idle)),
                    ("TCP_KEEPINTVL", _whole_seconds(self.keepalive_interval)),
                    ("TCP_KEEPCNT", self.keepalive_probes),
                ):
                    if hasattr(socket, name):
                        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        except OSError as exc:
            log.debug("tcp liveness options not set", extra=fields(error=repr(exc)))
            return
        if self.user_timeout > 0 and sys.platform == "linux":
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, _ms(RTO_MAX))
            except OSError as exc:  # before Linux 6.15: blackouts past ~12 s end calls
                log.debug("tcp rto max not set", extra=fields(error=repr(exc)))

    def set_on_listener(self, sock: Any) -> None:
        """Set the options on a listening socket, those turned off too (after a
        reload): Linux copies a listener's socket and TCP options to each
        connection it accepts from then on (pinned by
        tests/e2e/test_listener_options.py), which then needs none set of its
        own: six system calls a carrier (session 40). A connection the kernel
        took before (in the backlog as the worker started, or as a reload
        changed them) is told by `inherited_by`."""
        try:
            if hasattr(socket, "TCP_USER_TIMEOUT") and self.user_timeout <= 0:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)
            if self.keepalive_idle <= 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        except OSError as exc:
            log.debug("tcp liveness options not set", extra=fields(error=repr(exc)))
        self.apply(sock)

    def inherited_by(self, sock: Any) -> bool:
        """Whether an accepted socket has these options from its listener
        (`set_on_listener`): its user timeout as set, or (none set) its
        keepalive on; one getsockopt. False when both are off (nothing tells)."""
        try:
            if self.user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
                ms = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                return bool(ms == _ms(self.user_timeout))
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


# struct tcp_info (linux/tcp.h): tcpi_retransmits, tcpi_probes, tcpi_backoff.
_TCPI_RETRANSMITS, _TCPI_PROBES, _TCPI_BACKOFF = 2, 3, 4


def gave_no_answer(info: bytes, sock: Any, window_closed: bool = False) -> PeerGaveNoAnswer:
    """Which option ended a connection whose peer stopped answering, from its
    TCP_INFO once failed (`window_closed`: its window was closed on bytes of
    ours): data retransmitted or probed into a closed window is the user
    timeout's; keepalive probes alone, keepalive's (ended by the user timeout
    when one is set, else after its probes)."""
    user_timeout = _option(sock, socket.IPPROTO_TCP, "TCP_USER_TIMEOUT") / 1000
    data_out = len(info) > _TCPI_BACKOFF and bool(info[_TCPI_RETRANSMITS] or info[_TCPI_BACKOFF])
    if window_closed or data_out:
        return PeerGaveNoAnswer(
            f"TCP user timeout: what was sent to it went unacknowledged for "
            f"{user_timeout:g}s (timeouts.tcp_user_timeout)"
        )
    if len(info) > _TCPI_PROBES and info[_TCPI_PROBES]:
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


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _whole_seconds(seconds: float) -> int:
    # The kernel counts keepalive in whole seconds, from 1.
    return max(1, round(seconds))
