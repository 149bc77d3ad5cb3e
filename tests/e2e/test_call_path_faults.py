"""Misbehaving fleets and carriers around the call path (found in review)."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect

from fleet_ingress.net.proxy import MAX_BUFFERED_PER_CALL, CarrierProtocol
from tests.support import (
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    echo,
    eventually,
    raw_exchange,
    read_head,
    wss_url,
)


async def _open(ingress, tls_files: TLSFiles):
    host, port = ingress.wss_address
    return await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )


async def test_a_relayed_answer_obeys_flow_control(start_ingress: StartIngress, tls_files):
    """A fleet streaming a long non-101 body to a carrier that reads slowly."""
    total = 20 * 1024 * 1024

    async def endless_503(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n")
        chunk = b"z" * 65536
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    fleet = await RawFleet(tls_files.fleet_server_context(), endless_503).start()
    ingress = await start_ingress([fleet.line("f")])
    reader, writer = await _open(ingress, tls_files)
    writer.write(UPGRADE.format(path="/ws/x").encode())
    received, peak = 0, 0
    async with asyncio.timeout(60):
        while chunk := await reader.read(65536):
            received += len(chunk)
            peak = max(peak, ingress.registry.buffered_bytes())
            await asyncio.sleep(0.001)
    writer.close()
    await fleet.stop()
    assert received > total
    assert peak <= MAX_BUFFERED_PER_CALL, peak


async def test_a_fleet_stalling_mid_answer_is_cut_off_and_frees_its_slot(
    start_ingress: StartIngress, tls_files
):
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(3600)

    fleet = await RawFleet(tls_files.fleet_server_context(), stall).start()
    ingress = await start_ingress([fleet.line("f", "maxconn=1")], timeouts={"response": 0.4})
    started = asyncio.get_running_loop().time()
    got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/x").encode())
    assert got.startswith(b"HTTP/1.1 429 ") and got.endswith(b"0123456789")
    assert asyncio.get_running_loop().time() - started < 2
    await eventually(lambda: not ingress.registry.calls)
    # Logged at the cut; its slot back once the fleet's side has closed.
    await eventually(lambda: ingress.balancer.fleets[0].active == 0, timeout=2)
    await fleet.stop()


async def test_a_carrier_hanging_up_in_the_queue_leaves_it_and_never_reaches_a_fleet(
    start_ingress: StartIngress, tls_files
):
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    ingress = await start_ingress([fleet.line("f", "maxconn=1")], timeouts={"queue": 5})
    from websockets.asyncio.client import connect

    from tests.support import wss_url

    first = await connect(wss_url(ingress), ssl=tls_files.client_context())
    _, writer = await _open(ingress, tls_files)
    writer.write(UPGRADE.format(path="/ws/queued").encode())
    await eventually(lambda: ingress.dispatcher.queue_length == 1)
    writer.close()
    await eventually(lambda: ingress.dispatcher.queue_length == 0, timeout=1)
    await eventually(lambda: len(ingress.registry.calls) == 1, timeout=1)
    await first.close()
    await asyncio.sleep(0.2)
    assert [r.path for r in fleet.requests] == ["/ws/bot-1"]
    await fleet.stop()


async def test_a_flood_of_informational_heads_is_a_junk_response(
    start_ingress: StartIngress, tls_files
):
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        for _ in range(20000):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(3600)

    fleet = await RawFleet(tls_files.fleet_server_context(), flood).start()
    ingress = await start_ingress([fleet.line("f")], retry={"retries": 0})
    got = await raw_exchange(ingress, tls_files, UPGRADE.format(path="/ws/x").encode())
    assert got.startswith(b"HTTP/1.1 502 ")
    assert b"Continue" not in got
    await fleet.stop()


async def test_a_connection_the_ingress_fails_to_start_serving_is_cut_at_once(
    start_ingress: StartIngress, tls_files, monkeypatch, caplog
) -> None:
    """A bug as a carrier's connection starts being served (after its TLS
    handshake, before its head timer is set): the connection is cut and said,
    not left open with no timer (before: held until the carrier left, a
    limits.max_connections place with it); the next connection is served."""
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    try:
        ingress = await start_ingress([fleet.line("f")], timeouts={"request": 30})
        starts = CarrierProtocol.connection_made
        failures = []

        def fails_once(self, transport) -> None:
            if not failures:
                failures.append(self)
                raise RuntimeError("a bug as the connection starts")
            starts(self, transport)

        monkeypatch.setattr(CarrierProtocol, "connection_made", fails_once)
        reader, writer = await _open(ingress, tls_files)
        try:
            async with asyncio.timeout(3):  # not timeouts.request's 30 s
                assert await reader.read(100) == b""
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        assert failures
        assert any("could not start serving" in r.getMessage() for r in caplog.records)
        await eventually(lambda: not ingress.registry.connections)
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as call:
            await echo(call, "served")
    finally:
        await fleet.stop()
