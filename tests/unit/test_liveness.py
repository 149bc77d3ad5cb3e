"""TCP liveness options and how a failed connection is named. No sockets."""

from __future__ import annotations

import errno
import math
import socket
import ssl
import struct

import pytest

from fleet_ingress.net.liveness import (
    QUIET_LOOK_AGAIN,
    TCP_RTO_MAX_MS,
    TCPI_LAST_DATA_RECV,
    TCPI_LAST_DATA_SENT,
    TCPI_RTO,
    TCPI_RTT,
    TCPI_UNACKED,
    TcpLiveness,
    ThisKernel,
    gave_no_answer,
    given_up_in,
    peer_gone,
)


class Recorder:
    def __init__(self) -> None:
        self.options: dict[tuple[int, int], int] = {}

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options[(level, name)] = value

    def getsockopt(self, level: int, name: int) -> int:
        return self.options.get((level, name), 0)  # unset: 0, as a socket says


TCP, SOL = socket.IPPROTO_TCP, socket.SOL_SOCKET


@pytest.fixture(autouse=True)
def _a_kernel_not_yet_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a test's old kernel refused stays in that test."""
    monkeypatch.setattr(ThisKernel, "refuses_rto_max", False)


def test_defaults_set_user_timeout_and_short_keepalive() -> None:
    sock = Recorder()
    TcpLiveness().apply(sock)
    assert sock.options == {
        # Milliseconds, BACKSTOP past the 20 s: by then the ingress has given
        # the connection up itself, with a reset (net/dead_peers.py).
        (TCP, socket.TCP_USER_TIMEOUT): 21_000,
        (SOL, socket.SO_KEEPALIVE): 1,
        (TCP, socket.TCP_KEEPIDLE): 10,
        (TCP, socket.TCP_KEEPINTVL): 5,
        # No TCP_KEEPCNT: with a user timeout Linux never counts the probes.
        (TCP, TCP_RTO_MAX_MS): 2_000,  # retransmissions at most 2 s apart
    }


def test_keepalive_probes_are_set_only_where_no_user_timeout_ends_keepalive() -> None:
    """Linux's keepalive timer ends a connection with a user timeout set by that
    timeout alone and never reads TCP_KEEPCNT (pinned on a real kernel by
    tests/e2e/test_listener_options.py): set, it was a system call on every
    fleet connection for nothing. On main it was set either way."""
    with_timeout, without = Recorder(), Recorder()
    TcpLiveness(keepalive_probes=4).apply(with_timeout)
    TcpLiveness(user_timeout=0, keepalive_probes=4).apply(without)
    assert (TCP, socket.TCP_KEEPCNT) not in with_timeout.options
    assert without.options[(TCP, socket.TCP_KEEPCNT)] == 4
    assert without.options[(TCP, socket.TCP_KEEPIDLE)] == 10


def test_a_kernel_without_the_rto_cap_is_asked_for_it_once_a_process() -> None:
    """Before Linux 6.15 TCP_RTO_MAX_MS is ENOPROTOOPT: asked on each fleet
    connection, each paid a failed system call, an exception and a debug line
    (on main: one refusal a connection). Asked once; the other options still
    set on every socket."""
    refused: list[int] = []

    class OldKernel(Recorder):
        def setsockopt(self, level: int, name: int, value: int) -> None:
            if name == TCP_RTO_MAX_MS:
                refused.append(name)
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")
            super().setsockopt(level, name, value)

    liveness = TcpLiveness()
    socks = [OldKernel() for _ in range(3)]
    for sock in socks:
        liveness.apply(sock)
    assert len(refused) == 1
    assert all(sock.options[(TCP, socket.TCP_USER_TIMEOUT)] == 21_000 for sock in socks)
    assert ThisKernel.refuses_rto_max


def test_an_rto_cap_only_with_a_user_timeout_and_a_kernel_refusing_it_keeps_the_rest() -> None:
    sock = Recorder()
    TcpLiveness(user_timeout=0).apply(sock)
    assert (TCP, TCP_RTO_MAX_MS) not in sock.options
    assert sock.options[(SOL, socket.SO_KEEPALIVE)] == 1

    class OldKernel(Recorder):  # before Linux 6.15
        def setsockopt(self, level: int, name: int, value: int) -> None:
            if name == TCP_RTO_MAX_MS:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")
            super().setsockopt(level, name, value)

    old = OldKernel()
    TcpLiveness().apply(old)
    assert old.options[(TCP, socket.TCP_USER_TIMEOUT)] == 21_000
    assert old.options[(TCP, socket.TCP_KEEPINTVL)] == 5


def test_zero_leaves_an_option_to_the_kernel() -> None:
    sock = Recorder()
    TcpLiveness(user_timeout=0, keepalive_idle=0).apply(sock)
    assert sock.options == {}


def test_a_refused_option_is_not_fatal() -> None:
    class Refusing:
        def setsockopt(self, *args: int) -> None:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    TcpLiveness().apply(Refusing())


@pytest.mark.parametrize(
    ("exc", "gone"),
    [
        (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), True),  # user timeout, keepalive
        (OSError(errno.EHOSTUNREACH, "No route to host"), True),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), False),  # the peer's stack answered
        (ssl.SSLError(1, "bad record mac"), False),
        (TimeoutError(), False),  # asyncio's own timeouts carry no errno
        (None, False),
    ],
)
def test_which_failures_mean_the_peer_vanished(exc: BaseException | None, gone: bool) -> None:
    assert peer_gone(exc) is gone


def _tcp_info(retransmits: int = 0, probes: int = 0, backoff: int = 0) -> bytes:
    """The head of a failed socket's TCP_INFO (state TCP_CLOSE)."""
    return bytes([7, 0, retransmits, probes, backoff]) + bytes(227)


@pytest.mark.parametrize(
    ("liveness", "info", "window_closed", "why"),
    [
        # Data retransmitted, unacknowledged: the user timeout, its figure.
        (
            TcpLiveness(),
            _tcp_info(retransmits=6, backoff=6),
            False,
            "TCP user timeout: what was sent to it went unacknowledged for 20s "
            "(timeouts.tcp_user_timeout)",
        ),
        # Window probes into a window the peer closed: the user timeout too.
        (TcpLiveness(user_timeout=7.5), _tcp_info(probes=1), True, "TCP user timeout: "),
        # Keepalive probes alone, nothing in flight: keepalive, ended by the user timeout.
        (
            TcpLiveness(),
            _tcp_info(probes=2),
            False,
            "TCP keepalive: nothing in flight, no answer to its probes (timeouts.keepalive_idle "
            "10s, then every 5s), given up 20s after it was last heard (timeouts.tcp_user_timeout)",
        ),
        # ... and without a user timeout, by its probes.
        (
            TcpLiveness(user_timeout=0.0, keepalive_probes=4),
            _tcp_info(probes=4),
            False,
            "TCP keepalive: nothing in flight, no answer to its probes (timeouts.keepalive_idle "
            "10s, then every 5s), given up after 4 probes (limits.keepalive_probes)",
        ),
        (TcpLiveness(), b"", False, "the peer stopped answering (TCP)"),
    ],
)
def test_a_connection_the_kernel_gave_up_says_which_option_and_its_figure(
    liveness, info, window_closed, why
) -> None:
    sock = Recorder()
    liveness.apply(sock)
    gone = gave_no_answer(info, sock, window_closed)
    assert str(gone.strerror).startswith(why), gone.strerror
    assert peer_gone(gone)  # still a side gone: carrier_lost / fleet_lost


def _live_info(
    *, heard_ms: int, last_ack_ms: int | None = None, state: int = 1, **counts: int
) -> bytes:
    """A live socket's TCP_INFO: its state (1 ESTABLISHED), probe counts, and
    how long ago data and an ACK were last received (ms)."""
    info = bytearray(_tcp_info(**counts))
    info[0] = state
    ack = heard_ms if last_ack_ms is None else last_ack_ms
    struct.pack_into("=II", info, TCPI_LAST_DATA_RECV, heard_ms, ack)
    return bytes(info)


@pytest.mark.parametrize(
    ("info", "due_in"),
    [
        # Retransmitting, nothing heard for the user timeout: given up now,
        # with the reset the kernel's own timeout would not send.
        (_live_info(heard_ms=20_000, retransmits=5, backoff=5), 0.0),
        (_live_info(heard_ms=20_300, probes=2), 0.0),  # keepalive probes unanswered
        (_live_info(heard_ms=21_000, state=8, retransmits=1), 0.0),  # CLOSE_WAIT: still sending
        # Heard 14 s ago (a blackout that may heal): looked at again in 6 s.
        (_live_info(heard_ms=14_000, retransmits=4), 6.0),
        # Data long ago, an ACK lately: heard (the kernel counts either).
        (_live_info(heard_ms=60_000, last_ack_ms=3_000, retransmits=1), 17.0),
        # Quiet past the timeout, nothing unanswered (keepalive off): not yet.
        (_live_info(heard_ms=90_000), QUIET_LOOK_AGAIN),
        # Closing or closed (FIN_WAIT1 4, CLOSE 7): the kernel's own end follows.
        (_live_info(heard_ms=30_000, state=4, retransmits=3), math.inf),
        (_live_info(heard_ms=30_000, state=7, retransmits=3), math.inf),
        (b"", math.inf),  # no TCP_INFO (not Linux, not TCP)
    ],
)
def test_when_the_ingress_gives_up_a_peer_that_stopped_answering(
    info: bytes, due_in: float
) -> None:
    assert given_up_in(info, 20.0) == pytest.approx(due_in)


def _sending_info(*, heard_ms: int, retransmits: int, unacked: int = 1) -> bytes:
    """A live socket retransmitting `unacked` segments into a blackout on a
    short path (round trip 100 us, first wait 0.2 s, capped at 2 s as
    `RTO_MAX`), its last retransmission 0.5 s ago, the peer last heard
    `heard_ms` ago."""
    info = bytearray(_live_info(heard_ms=heard_ms, retransmits=retransmits, backoff=retransmits))
    rto_us = min(200_000 << retransmits, 2_000_000)
    struct.pack_into("=I", info, TCPI_RTO, rto_us)
    struct.pack_into("=I", info, TCPI_UNACKED, unacked)
    struct.pack_into("=I", info, TCPI_LAST_DATA_SENT, 500)
    struct.pack_into("=I", info, TCPI_RTT, 100)
    return bytes(info)


@pytest.mark.parametrize(
    ("info", "due_in"),
    [
        # A call on hold, heard by keepalive 8 s before a blackout, something
        # sent as it began: a tail loss probe (0.2 s with one segment out), 6
        # retransmissions 0.2, 0.4, 0.8, 1.6, 2, 2 s apart, the last 0.5 s ago:
        # 7.7 s of the kernel's 21 s (the user timeout and BACKSTOP); heard
        # 20.5 s ago. On main given up now, 12 s into a blackout the docs say
        # is ridden out up to about 18 s.
        (_sending_info(heard_ms=20_500, retransmits=6), 20.0 - 7.7),
        # Several segments out: no allowance for the probe's delayed ACK.
        (_sending_info(heard_ms=20_500, retransmits=6, unacked=4), 20.0 - 7.5),
        # The data out that long too (11 retransmissions: 17.7 s; 13: 21.7 s).
        (_sending_info(heard_ms=29_000, retransmits=11), 20.0 - 17.7),
        (_sending_info(heard_ms=29_000, retransmits=13), 0.0),
        # Streaming into the blackout: the peer last heard after the data out
        # was first sent, the later of the two rules.
        (_sending_info(heard_ms=7_000, retransmits=6), 13.0),
    ],
)
def test_data_out_is_given_up_the_user_timeout_after_it_was_first_sent(
    info: bytes, due_in: float
) -> None:
    """The kernel counts data's user timeout from its first send, not from when
    the peer was last heard (a keepalive answer up to keepalive_idle before)."""
    assert given_up_in(info, 20.0) == pytest.approx(due_in, abs=0.002)


def test_no_user_timeout_no_give_up() -> None:
    assert given_up_in(_live_info(heard_ms=900_000, retransmits=9), 0.0) == math.inf


def test_the_detail_of_a_give_up_says_the_configured_timeout_not_the_kernels() -> None:
    sock = Recorder()
    TcpLiveness(user_timeout=7.5).apply(sock)
    assert sock.getsockopt(TCP, socket.TCP_USER_TIMEOUT) == 8_500  # BACKSTOP later
    gone = gave_no_answer(_live_info(heard_ms=7_600, retransmits=3), sock)
    assert "unacknowledged for 7.5s" in str(gone.strerror), gone.strerror
