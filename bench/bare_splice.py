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

``BARE_SPLICE_BUFFERED=1`` (or ``--buffered``) makes both sides
``asyncio.BufferedProtocol``s reading into one buffer shared by every
connection (each read is copied out and written to the peer at once). uvloop's
SSL layer then decrypts straight into that buffer (``_do_read__buffered``)
instead of allocating a 256 KiB ``bytes`` per read and shrinking it
(``_do_read__copied``, what a plain ``Protocol`` gets): the experiment behind
bench/README.md's advice on memory per call.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import ssl
from collections.abc import Iterator, Sequence
from typing import cast

import uvloop

Address = tuple[str, int]


class _Side(asyncio.BaseProtocol):
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
    fleet_side: type[_Side]  # set below: the same flavour as this side

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
                self.fleet_side, host, port, ssl=self._fleet_ssl, server_hostname=host
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


class PlainCarrierSide(CarrierSide, asyncio.Protocol):
    pass


class PlainFleetSide(FleetSide, asyncio.Protocol):
    pass


# One read buffer for every connection: what a read delivers is copied out and
# written to the peer before the next read can happen (one thread, one loop).
_SHARED = memoryview(bytearray(256 * 1024))


# uvloop's SSL layer takes the buffered path only for a protocol that is not an
# asyncio.Protocol, hence the two flavours of each side.
class _Buffered(asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_SHARED[:nbytes]))  # type: ignore[attr-defined]


class BufferedCarrierSide(CarrierSide, _Buffered):
    pass


class BufferedFleetSide(FleetSide, _Buffered):
    pass


PlainCarrierSide.fleet_side = PlainFleetSide
BufferedCarrierSide.fleet_side = BufferedFleetSide


async def serve(
    listen: Address,
    cert: str,
    key: str,
    ca: str,
    fleets: Sequence[Address],
    buffered: bool = False,
) -> None:
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
    carrier: type[CarrierSide] = BufferedCarrierSide if buffered else PlainCarrierSide
    server = await loop.create_server(
        lambda: carrier(round_robin, fleet_ssl), *listen, ssl=server_ssl, backlog=1024
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
    parser.add_argument(
        "--buffered",
        action="store_true",
        default=os.environ.get("BARE_SPLICE_BUFFERED") == "1",
        help="BufferedProtocol sides sharing one read buffer (also BARE_SPLICE_BUFFERED=1)",
    )
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.cert, args.key, args.ca, args.fleet, args.buffered))


if __name__ == "__main__":
    main()
