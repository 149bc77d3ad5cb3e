"""What an accepted TCP socket inherits from its listening socket (Linux), which
the carrier listener relies on to set the TCP liveness options and TCP_NODELAY
once on the listener rather than on every connection (net/listener.py,
`TcpLiveness.set_on_listener`). Real sockets on loopback."""

from __future__ import annotations

import socket
import sys

import pytest

from fleet_ingress.net.liveness import BACKSTOP, TCP_RTO_MAX_MS, TcpLiveness

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux socket options")

TCP, SOL = socket.IPPROTO_TCP, socket.SOL_SOCKET
OPTIONS = (
    (TCP, socket.TCP_NODELAY),
    (TCP, socket.TCP_USER_TIMEOUT),
    (SOL, socket.SO_KEEPALIVE),
    (TCP, socket.TCP_KEEPIDLE),
    (TCP, socket.TCP_KEEPINTVL),
    (TCP, socket.TCP_KEEPCNT),
)


def _options(sock: socket.socket) -> tuple[int, ...]:
    return tuple(sock.getsockopt(level, name) for level, name in OPTIONS)


def _accepted(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


def test_an_accepted_socket_inherits_its_listeners_liveness_options_and_nodelay() -> None:
    liveness = TcpLiveness(user_timeout=7.5, keepalive_idle=4, keepalive_interval=2)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        # In the backlog as the options are set (a worker starting): accepted
        # after, it has the kernel's defaults, taken as it connected.
        before_client = socket.create_connection(listener.getsockname())
        listener.setsockopt(TCP, socket.TCP_NODELAY, 1)
        liveness.set_on_listener(listener)
        before, _ = listener.accept()
        client, accepted = _accepted(listener)
        try:
            kernel_ms = round((7.5 + BACKSTOP) * 1000)  # the ingress gives up first
            assert _options(accepted) == (1, kernel_ms, 1, 4, 2, 3)
            assert liveness.inherited_by(accepted)
            assert not liveness.inherited_by(before)
            assert _options(before)[:3] == (0, 0, 0)  # the kernel's defaults
            try:
                rto_max = listener.getsockopt(TCP, TCP_RTO_MAX_MS)
            except OSError:  # before Linux 6.15
                pass
            else:
                assert accepted.getsockopt(TCP, TCP_RTO_MAX_MS) == rto_max == 2000
        finally:
            for s in (before_client, before, client, accepted):
                s.close()


def test_options_turned_off_on_the_listener_are_off_on_what_it_accepts_next() -> None:
    """A reload that turns the user timeout and keepalive off: the listener had
    them on, and what it accepts next must not inherit them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        TcpLiveness().set_on_listener(listener)
        off = TcpLiveness(user_timeout=0, keepalive_idle=0)
        off.set_on_listener(listener)
        client, accepted = _accepted(listener)
        try:
            assert accepted.getsockopt(TCP, socket.TCP_USER_TIMEOUT) == 0
            assert accepted.getsockopt(SOL, socket.SO_KEEPALIVE) == 0
            assert not off.inherited_by(accepted)  # nothing to tell by: set, a no-op
            keepalive_only = TcpLiveness(user_timeout=0)
            keepalive_only.set_on_listener(listener)
            client2, accepted2 = _accepted(listener)
            try:
                assert keepalive_only.inherited_by(accepted2)
                assert not keepalive_only.inherited_by(accepted)
            finally:
                client2.close()
                accepted2.close()
        finally:
            client.close()
            accepted.close()


def test_a_reload_tells_how_many_were_taken_before_the_listener_had_the_new_options() -> None:
    """A reload that changes keepalive alone (or turns the user timeout off):
    a carrier the kernel took before the listener was told keeps the old
    options, and its user timeout (all `inherited_by` reads) passes it for
    inherited: keepalive_idle 10 s where 30 s was configured. The listener sets
    the options on as many as `set_on_listener` says were queued (and on the
    one it just accepted). On main it returns None; the queued one kept 10 s."""
    old, new = TcpLiveness(keepalive_idle=10), TcpLiveness(keepalive_idle=30)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        old.set_on_listener(listener)
        queued = [socket.create_connection(listener.getsockname()) for _ in range(2)]
        taken: list[socket.socket] = []
        try:
            assert new.set_on_listener(listener) == 2  # the reload's first accept
            taken.append(listener.accept()[0])
            assert new.set_on_listener(listener) == 1  # one still queued
            taken.append(listener.accept()[0])
            for before in taken:
                assert before.getsockopt(TCP, socket.TCP_KEEPIDLE) == 10  # the old options
                assert new.inherited_by(before)  # why a count is needed: it cannot tell
            client, accepted = _accepted(listener)
            with client, accepted:
                assert accepted.getsockopt(TCP, socket.TCP_KEEPIDLE) == 30
                assert new.set_on_listener(listener) == 0
        finally:
            for s in queued + taken:
                s.close()
