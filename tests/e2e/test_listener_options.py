"""What an accepted TCP socket inherits from its listening socket (Linux), which
the carrier listener relies on to set the TCP liveness options and TCP_NODELAY
once on the listener rather than on every connection (net/listener.py,
`TcpLiveness.set_on_listener`). Real sockets on loopback."""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import ssl
import sys
import time

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.retry import RetryPolicy
from fleet_ingress.core.routing import Router
from fleet_ingress.core.silence import SilencePolicy
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.dispatch import Dispatcher
from fleet_ingress.net.listener import CarrierListener
from fleet_ingress.net.liveness import BACKSTOP, TCP_RTO_MAX_MS, TcpLiveness
from fleet_ingress.net.proxy import ProxyContext
from tests.support import NetLab, TLSFiles

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
            # TCP_KEEPCNT left as the kernel has it: a user timeout ends keepalive
            # (test_a_user_timeout_not_the_probe_count_ends_a_quiet_connection).
            assert _options(accepted) == (1, kernel_ms, 1, 4, 2, _options(before)[5])
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


def test_a_user_timeout_not_the_probe_count_ends_a_quiet_connection(netlab: NetLab) -> None:
    """What `TcpLiveness` leaving TCP_KEEPCNT unset under a user timeout rests
    on: Linux's keepalive timer ends a connection with a user timeout set once
    that long has passed since the peer was last heard (a probe out), and
    never counts the probes. Here one probe a second after a second idle, and
    TCP_KEEPCNT 1, which alone would end it 2 s into a blackout: it ends at the
    kernel's user timeout, 4 s. In a namespace of its own, its loopback
    blackholed (nftables); bounded by a 10 s socket timeout."""
    ns = netlab.namespace("keepcnt")
    listener = netlab.listen(ns, "127.0.0.1", 0)
    client = netlab.socket_in(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    server = None
    try:
        client.settimeout(5)
        client.connect(listener.getsockname())
        select.select([listener], [], [], 5)
        server, _ = listener.accept()
        TcpLiveness(user_timeout=3.0, keepalive_idle=1, keepalive_interval=1).apply(client)
        client.setsockopt(TCP, socket.TCP_KEEPCNT, 1)
        assert client.getsockopt(TCP, socket.TCP_USER_TIMEOUT) == 4000  # BACKSTOP past 3 s
        netlab.drop_arriving(ns, "lo")
        started = time.monotonic()
        client.settimeout(10)
        with pytest.raises(OSError) as raised:
            client.recv(1)
        took = time.monotonic() - started
        assert raised.value.errno == errno.ETIMEDOUT, raised.value  # the kernel's, not ours
        assert 3.5 <= took < 8, took
    finally:
        for s in (client, server, listener):
            if s is not None:
                s.close()


def _worker_context(liveness: TcpLiveness) -> ProxyContext:
    """A worker's connection context: only its liveness options matter here."""
    balancer = Balancer(
        FleetSet.from_specs(parse_fleets_text("http://127.0.0.1:9 name=a", default_maxconn=4))
    )
    return ProxyContext(
        router=Router(["/ws/"], "/haproxy-health"),
        slots=Dispatcher(balancer, queue_timeout=1.0, max_queue=8),
        registry=Registry(),
        retry=RetryPolicy(retries=0, conditions=frozenset(), statuses=frozenset()),
        fleet_ssl=ssl.create_default_context(),
        connect_timeout=2.0,
        response_timeout=2.0,
        request_timeout=30.0,
        silence=SilencePolicy(tunnel=60.0),
        liveness=liveness,
        max_head_bytes=16384,
        max_header_count=100,
        max_connections=100,
        access_log=False,
    )


async def test_a_carrier_accepted_on_a_listener_another_generation_set_gets_its_worker_s_options(
    tls_files: TLSFiles,
) -> None:
    """Two generations' workers accept on one listening socket (an upgrade's
    overlap; where the new generation fails its trial, the old one serves on
    with the listener as the new one left it): the new one sets its options
    on the listener, and Linux copies them to what the old one accepts from
    then on. The old worker's carriers get its own options (its dead-peer
    watch gives up at its own user timeout, the kernel BACKSTOP after it), not
    the other config's. Session 48's listener took a carrier accepted after it
    had set the options itself for having them, asking nothing: the old
    worker's carriers kept the new generation's 5 s where it runs with 20 s."""
    old_ms, new_ms = (round((seconds + BACKSTOP) * 1000) for seconds in (20.0, 5.0))
    old_ctx = _worker_context(TcpLiveness(user_timeout=20.0))
    new_ctx = _worker_context(TcpLiveness(user_timeout=5.0))
    server_ssl = tls_files.fleet_server_context()
    clients: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as sock:
        old = CarrierListener(sock, lambda: old_ctx, lambda: server_ssl)
        new = CarrierListener(sock, lambda: new_ctx, lambda: server_ssl)
        old._loop = new._loop = asyncio.get_running_loop()  # start()'s, with no acceptor

        def taken_by(listener: CarrierListener) -> int:
            """A carrier that `listener` accepts: its user timeout (ms)."""
            clients.append(socket.create_connection(sock.getsockname()))
            conn, address = sock.accept()
            listener._accepted(conn, address)
            return int(conn.getsockopt(TCP, socket.TCP_USER_TIMEOUT))

        try:
            assert taken_by(old) == old_ms  # its options, set on the listener too
            assert taken_by(old) == old_ms  # inherited
            assert taken_by(new) == new_ms  # the new generation's, on the listener now
            assert taken_by(old) == old_ms  # main: the new generation's (6000)
            assert taken_by(old) == old_ms
        finally:
            old.close()  # (the shared listener too) its handshakes cut
            new.close()
            for client in clients:
                client.close()
