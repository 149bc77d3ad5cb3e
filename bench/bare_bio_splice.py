"""The floor on socket BIOs: ``bare_splice.py``'s relay on ``fleet_ingress.net.tls_socket``.

The same least a TLS WebSocket relay can do (accept TLS, connect with TLS to a
fleet round-robin over ``--fleet``, forward the carrier's upgrade head
verbatim, then bytes both ways with flow control; no parsing, routing,
balancing, retries, registry or logging), but each side is a non-blocking
``ssl.SSLSocket`` driven by the loop's reader/writer callbacks instead of a
uvloop SSL transport: OpenSSL reads and writes the sockets itself, a relayed
record is one ``recv_into`` into a buffer shared by every connection and one
``send``. The ``bare-bio`` target of ``python -m bench`` (bench/targets.py)::

    python bench/bare_bio_splice.py --listen 127.0.0.1:8443 --cert c.pem --key k.pem \\
        --ca ca.pem --fleet 127.0.0.1:9001 --fleet 127.0.0.1:9002

It serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import socket
import ssl
from collections.abc import Iterator, Sequence

import uvloop

from fleet_ingress.net.tls_socket import Acceptor, TLSConnection, connect, wrap_accepted

Address = tuple[str, int]
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0


class Side:
    """One TLS connection of a call; ``peer`` is the other one once linked."""

    __slots__ = ("conn", "peer")

    def __init__(self, conn: TLSConnection) -> None:
        self.conn = conn
        self.peer: Side | None = None

    def data_received(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.conn.write(data)

    def eof_received(self) -> bool:
        return False  # close ours; connection_lost closes the peer

    def connection_lost(self, exc: BaseException | None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.conn.close()

    # My write buffer is full: stop reading the side that fills it.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.conn.resume_reading()


class CarrierSide(Side):
    __slots__ = ("_connecting", "_early", "_fleet_ssl", "_fleets")

    def __init__(
        self, conn: TLSConnection, fleets: Iterator[Address], fleet_ssl: ssl.SSLContext
    ) -> None:
        super().__init__(conn)
        self._fleets = fleets
        self._fleet_ssl = fleet_ssl
        self._early = bytearray()  # the upgrade head (and anything after it) until linked
        self._connecting: asyncio.Task[None] | None = None

    def handshaken(self, exc: BaseException | None) -> None:
        if exc is None:
            self.conn.start(self)
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.conn.write(data)
        else:
            self._early += data

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None

    async def _connect(self) -> None:
        host, port = next(self._fleets)
        try:
            fleet_conn = await connect(
                host, port, self._fleet_ssl, server_hostname=host, timeout=CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            self.conn.close()
            return
        finally:
            self._connecting = None
        if self.conn.is_closing:  # the carrier left while we connected
            fleet_conn.close()
            return
        fleet = Side(fleet_conn)
        fleet.peer, self.peer = self, fleet
        fleet_conn.start(fleet)
        fleet_conn.write(bytes(self._early))
        self._early = bytearray()


async def serve(listen: Address, cert: str, key: str, ca: str, fleets: Sequence[Address]) -> None:
    server_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ssl.set_alpn_protocols(["http/1.1"])
    server_ssl.load_cert_chain(cert, key)
    fleet_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    fleet_ssl.set_alpn_protocols(["http/1.1"])
    fleet_ssl.load_verify_locations(cafile=ca)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    round_robin = itertools.cycle(fleets)

    def accepted(sock: socket.socket) -> None:
        conn = wrap_accepted(loop, sock, server_ssl)
        carrier = CarrierSide(conn, round_robin, fleet_ssl)
        conn.start_handshake(HANDSHAKE_TIMEOUT, carrier.handshaken)

    listener = socket.create_server(listen, backlog=1024)
    acceptor = Acceptor(loop, listener, accepted)
    try:
        await stop.wait()
    finally:
        acceptor.close()


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    parser.add_argument("--key", required=True, help="server key (PEM)")
    parser.add_argument("--ca", required=True, help="CA the fleets' certificates chain to")
    parser.add_argument(
        "--fleet", type=_address, action="append", required=True, help="HOST:PORT (repeat)"
    )
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.cert, args.key, args.ca, args.fleet))


if __name__ == "__main__":
    main()
