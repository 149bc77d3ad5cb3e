"""process.accept = "first" at the socket: the accept queue read from a
listening socket's TCP_INFO, an acceptor's reader turned off and on, and a
carrier listener of rank 1 that reads only while connections wait
(`core.accept_order`). Real loopback sockets, both event loops."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from fleet_ingress.core.accept_order import ACCEPT_LOOK, AcceptOrder
from fleet_ingress.net.listener import CarrierListener, accept_queue
from fleet_ingress.net.tls_socket import Acceptor
from tests.support import eventually

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO of a LISTEN socket")


@contextlib.contextmanager
def _clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        yield clients
    finally:
        for client in clients:
            client.close()


@linux_only
def test_a_listening_socket_s_tcp_info_gives_its_accept_queue_and_backlog() -> None:
    """Linux's TCP_INFO of a LISTEN socket: connections waiting to be accepted
    in tcpi_unacked, the backlog in tcpi_sacked."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        port = listener.getsockname()[1]
        assert accept_queue(listener) == (0, 16)
        with _clients(port, 3):
            assert accept_queue(listener) == (3, 16)
            listener.accept()[0].close()
            assert accept_queue(listener) == (2, 16)
    finally:
        listener.close()
    assert accept_queue(listener) is None  # closed: not readable


async def test_an_acceptor_with_its_reader_off_takes_nothing_until_turned_on() -> None:
    loop = asyncio.get_running_loop()
    accepted: list[socket.socket] = []
    acceptor = Acceptor(
        loop, socket.create_server(("127.0.0.1", 0)), accepted.append, reading=False
    )
    port = acceptor._listener.getsockname()[1]
    try:
        with _clients(port, 2):
            await asyncio.sleep(0.2)
            assert accepted == [] and acceptor.accepted == 0
            acceptor.read(True)
            acceptor.read(True)  # idempotent
            await eventually(lambda: len(accepted) == 2)
            assert acceptor.accepted == 2
            acceptor.read(False)
            with _clients(port, 1):
                await asyncio.sleep(0.2)
                assert len(accepted) == 2
                acceptor.read(True)
                await eventually(lambda: len(accepted) == 3)
    finally:
        for conn in accepted:
            conn.close()
        acceptor.close()


async def test_a_pause_ending_leaves_a_reader_turned_off_meanwhile_off() -> None:
    """Accept pacing's pause and the accept order's off meet: the pause's end
    does not turn on a reader the order turned off."""
    loop = asyncio.get_running_loop()
    accepted: list[socket.socket] = []
    acceptor = Acceptor(
        loop, socket.create_server(("127.0.0.1", 0)), accepted.append, pace=lambda: 0.1
    )
    port = acceptor._listener.getsockname()[1]
    try:
        with _clients(port, 1):
            await eventually(lambda: len(accepted) == 1)
            assert acceptor._retry is not None  # pausing
            acceptor.read(False)
            with _clients(port, 1):
                await asyncio.sleep(0.3)  # past the pause
                assert len(accepted) == 1
                acceptor.read(True)
                await eventually(lambda: len(accepted) == 2)
    finally:
        for conn in accepted:
            conn.close()
        acceptor.close()


class _Collecting(CarrierListener):
    """A carrier listener that keeps what it accepts (no TLS, no calls)."""

    def __init__(self, sock: socket.socket, order: AcceptOrder) -> None:
        super().__init__(sock, self._no_context, self._no_context, order=order)
        self.taken: list[socket.socket] = []

    @staticmethod
    def _no_context() -> Any:
        raise AssertionError("not read: connections are only collected")

    def _accepted(self, conn: socket.socket, peername: tuple[str, int]) -> None:
        self.taken.append(conn)

    def _pace(self) -> float:
        return 0.0


@linux_only
async def test_rank_1_under_first_takes_connections_only_while_they_wait() -> None:
    """Another worker (here an acceptor on the same listening socket) takes
    every connection while it keeps up: rank 1's reader stays off. Once that
    one stops reading (stopped, hung, fallen behind), rank 1 takes the next
    within a look or two, and turns off again once none wait."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    first_taken: list[socket.socket] = []
    first = Acceptor(loop, listener.dup(), first_taken.append)
    second = _Collecting(listener, AcceptOrder(1, "first"))
    second.start()
    acceptor = second._acceptor
    assert acceptor is not None
    try:
        assert not acceptor._reading and second._look_timer is not None
        with _clients(port, 5) as clients:
            await eventually(lambda: len(first_taken) == 5)
            await asyncio.sleep(3 * ACCEPT_LOOK)
            assert second.taken == [] and not acceptor._reading
            first.read(False)  # the first worker stops taking connections
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            await eventually(lambda: len(second.taken) == 1, timeout=5)
            await eventually(lambda: not acceptor._reading, timeout=5)
            assert len(first_taken) == 5
        second.close()
        assert second._look_timer is None  # a listener closed stops looking
    finally:
        for conn in first_taken + second.taken:
            conn.close()
        first.close()
        second.close()


async def test_a_reload_switches_rank_1_between_first_and_spread_at_once() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    first_taken: list[socket.socket] = []
    first = Acceptor(loop, listener.dup(), first_taken.append)
    second = _Collecting(listener, AcceptOrder(1, "spread"))
    second.start()
    acceptor = second._acceptor
    assert acceptor is not None
    try:
        assert acceptor._reading and second._look_timer is None
        second.set_accept("first")
        assert not acceptor._reading and second._look_timer is not None
        second.set_accept("spread")
        assert acceptor._reading and second._look_timer is None
        first.read(False)
        with _clients(port, 1):
            await eventually(lambda: len(second.taken) == 1)
    finally:
        for conn in first_taken + second.taken:
            conn.close()
        first.close()
        second.close()
