"""An ended call is freed as it ends, by reference counting alone.

Left as reference cycles (sides <-> transports <-> call <-> idle watch), each
ended call with its OpenSSL state and buffers waited for CPython's full
collection, a minute or two under load: the soak's RSS grew 27 MiB a minute
(docs/RELIABILITY.md, "Soak"). With the collector off, nothing but reference
counting can free them, so a cycle left behind keeps these objects alive.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support import StartIngress, TLSFiles, WsFleet, eventually, wss_url


@pytest.fixture
async def ws_fleet(tls_files: TLSFiles):
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    yield fleet
    await fleet.stop()


@pytest.mark.parametrize("hangs_up", ["carrier", "fleet"])
async def test_an_ended_call_is_freed_without_a_garbage_collection(
    start_ingress: StartIngress, tls_files: TLSFiles, ws_fleet: WsFleet, hangs_up: str
):
    ingress = await start_ingress([ws_fleet.line("a")])
    gc.collect()
    gc.disable()
    try:
        async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            (call,) = ingress.registry.calls
            assert call.fleet_side is not None and call.carrier.transport is not None
            tls = call.carrier.transport.get_extra_info("ssl_object")
            kept = {
                "call": weakref.ref(call),
                "carrier side": weakref.ref(call.carrier),
                "fleet side": weakref.ref(call.fleet_side),
                "carrier TLS object": weakref.ref(tls),
            }
            del call, tls
            if hangs_up == "fleet":
                await ws.send("close:4001")
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
        await eventually(lambda: not ingress.registry.calls)
        try:
            await eventually(lambda: all(ref() is None for ref in kept.values()))
        except TimeoutError:
            alive = [name for name, ref in kept.items() if ref() is not None]
            pytest.fail(f"still alive after the call ended, with the collector off: {alive}")
    finally:
        gc.enable()
