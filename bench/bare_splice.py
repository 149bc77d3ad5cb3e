"""The floor for ``measure_call_path.py``: the least a TLS WebSocket relay can do.

Accepts TLS, connects with TLS to a fleet (round-robin over ``--fleet``),
forwards the carrier's upgrade head verbatim and from then on bytes both ways,
``data_received -> peer.write``: no parsing, no routing, no balancing, no
retries, no registry, no logging. Flow control is kept (it costs nothing per
message and keeps memory bounded), so the comparison is with a relay a careful
operator could actually run.

Run it as its own process (``measure_call_path.py --target bare`` does)::

    python bench/bare_splice.py --listen 127.0.0.1:8443 --cert c.pem --key k.pem \\
        --ca ca.pem --fleet 127.0.0.1:9001 --fleet 127.0.0.1:9002

It serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import ssl
from collections.abc import Iterator, Sequence
from typing import cast

import uvloop

Address = tuple[str, int]


class _Side(asyncio.Protocol):
    """One TLS connection of a call; ``peer`` is the other one once linked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None:
            self.peer.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # My write buffer is full: stop reading the side that fills it.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class CarrierSide(_Side):
    def __init__(self, fleets: Iterator[Address], fleet_ssl: ssl.SSLContext) -> None:
        super().__init__()
        self._fleets = fleets
        self._fleet_ssl = fleet_ssl
        self._early = bytearray()  # the upgrade head (and anything after it) until linked
        self._connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self._early += data
        else:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._connecting is not None:
            self._connecting.cancel()

    async def _connect(self) -> None:
        host, port = next(self._fleets)
        loop = asyncio.get_running_loop()
        try:
            _, fleet = await loop.create_connection(
                FleetSide, host, port, ssl=self._fleet_ssl, server_hostname=host
            )
        except OSError:
            self.close()
            return
        if self.transport is None:  # the carrier left while we connected
            fleet.close()
            return
        fleet.peer, self.peer = self, fleet
        assert fleet.transport is not None
        fleet.transport.write(bytes(self._early))
        self._early.clear()


class FleetSide(_Side):
    pass


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
    server = await loop.create_server(
        lambda: CarrierSide(round_robin, fleet_ssl), *listen, ssl=server_ssl, backlog=1024
    )
    async with server:
        await stop.wait()


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
