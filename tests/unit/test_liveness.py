"""TCP liveness options and how a failed connection is named. No sockets."""

from __future__ import annotations

import errno
import socket
import ssl

import pytest

from fleet_ingress.net.liveness import TCP_RTO_MAX_MS, TcpLiveness, peer_gone


class Recorder:
    def __init__(self) -> None:
        self.options: dict[tuple[int, int], int] = {}

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options[(level, name)] = value


TCP, SOL = socket.IPPROTO_TCP, socket.SOL_SOCKET


def test_defaults_set_user_timeout_and_short_keepalive() -> None:
    sock = Recorder()
    TcpLiveness().apply(sock)
    assert sock.options == {
        (TCP, socket.TCP_USER_TIMEOUT): 20_000,  # milliseconds
        (SOL, socket.SO_KEEPALIVE): 1,
        (TCP, socket.TCP_KEEPIDLE): 10,
        (TCP, socket.TCP_KEEPINTVL): 5,
        (TCP, socket.TCP_KEEPCNT): 3,
        (TCP, TCP_RTO_MAX_MS): 2_000,  # retransmissions at most 2 s apart
    }


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
    assert old.options[(TCP, socket.TCP_USER_TIMEOUT)] == 20_000
    assert old.options[(TCP, socket.TCP_KEEPCNT)] == 3


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
