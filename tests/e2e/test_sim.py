"""Tests for the simulators themselves: a fleet host and carrier calls, no ingress."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import aiohttp
import pytest
import trustme
import uvloop
from websockets.asyncio.client import connect

from fleet_ingress.sim import PROFILES, SimulatedFleet, run_call, run_calls, summarize


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def wss(fleet: SimulatedFleet) -> str:
    return fleet.url.replace("https://", "wss://")


async def wait_for(predicate, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_binary_call_is_echoed_without_loss(server_ctx, client_ctx):
    async with SimulatedFleet(name="fleet-a", ssl_context=server_ctx) as fleet:
        assert fleet.url == f"https://127.0.0.1:{fleet.port}" and fleet.port > 0
        result = await run_call(
            wss(fleet),
            ssl_context=client_ctx,
            duration=1.0,
            bot_id="bot-7",
            query="a=1&b=2",
            extra_headers=[("X-Dup", "one"), ("X-Dup", "two")],
        )
        assert result.ok, result.error
        assert result.status == 101
        assert result.fleet == "fleet-a"
        assert result.frames_sent == 50  # 1 s of 20 ms frames
        assert result.frames_received == 50
        assert result.lost_frames == 0 and result.corrupt_frames == 0
        assert len(result.rtt_ms) == 50 and all(0 <= x < 1000 for x in result.rtt_ms)
        assert result.handshake_ms is not None and result.handshake_ms > 0
        assert result.close_code == 1000

        seen = fleet.requests[0]
        assert seen.path == "/ws/bot-7" and seen.query_string == "a=1&b=2"
        assert seen.target == "/ws/bot-7?a=1&b=2"
        assert seen.headers.getall("X-Dup") == ["one", "two"]
        assert seen.peer == "127.0.0.1"
        await wait_for(lambda: fleet.active_calls == 0)
        assert (fleet.calls_total, fleet.ws_connections, fleet.rejected_429) == (1, 1, 0)


async def test_a_call_told_to_hang_up_ends_then_whole(server_ctx, client_ctx):
    """`hang_up`: the call ends at its next frame once set, not at `duration`;
    every frame sent echoed, a clean 1000 (the upgrade test's 100 calls, up
    together however long the last took to open)."""
    hang_up = asyncio.Event()
    async with SimulatedFleet(name="fleet-a", ssl_context=server_ctx) as fleet:
        call = asyncio.create_task(
            run_call(wss(fleet), ssl_context=client_ctx, duration=30.0, hang_up=hang_up)
        )
        await wait_for(lambda: fleet.active_calls == 1, within=10)
        await asyncio.sleep(0.5)
        hang_up.set()
        told = time.monotonic()
        result = await asyncio.wait_for(call, 10)
        assert time.monotonic() - told < 2.0
        assert result.ok, result.error
        assert 0 < result.frames_sent == result.frames_received < 30 / 0.02
        assert (result.lost_frames, result.close_code) == (0, 1000)


@pytest.mark.parametrize("profile", ["twilio-like", "exotel"])
async def test_json_profiles_on_exotel_route(profile):
    async with SimulatedFleet(name="plain") as fleet:
        assert fleet.url.startswith("http://")
        url = fleet.url.replace("http://", "ws://")
        result = await run_call(
            url, ssl_context=None, profile=profile, duration=0.4, route="/exotel/"
        )
        assert result.ok, result.error
        expected = round(0.4 / PROFILES[profile].interval)
        assert result.frames_sent == result.frames_received == expected
        assert result.lost_frames == 0 and result.corrupt_frames == 0
        assert fleet.requests[0].path == "/exotel/demo-bot"


async def test_second_call_past_capacity_gets_429(server_ctx, client_ctx):
    async with SimulatedFleet(name="small", capacity=1, ssl_context=server_ctx) as fleet:
        first = asyncio.create_task(run_call(wss(fleet), ssl_context=client_ctx, duration=1.0))
        await wait_for(lambda: fleet.active_calls == 1)
        second = await run_call(wss(fleet), ssl_context=client_ctx, duration=0.2)
        assert not second.ok
        assert second.status == 429 and second.fleet == "small"
        assert second.error == "HTTP 429" and second.frames_sent == 0

        # The refusal looks like nginx's: before the upgrade, HTML body, Retry-After.
        upgrade = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        async with aiohttp.ClientSession() as http:
            async with http.get(fleet.url + "/ws/x", headers=upgrade, ssl=client_ctx) as resp:
                assert resp.status == 429
                assert resp.headers["Retry-After"] == "1"
                assert resp.headers["X-Fleet"] == "small"
                assert "429 Too Many Requests" in await resp.text()
        assert fleet.rejected_429 == 2

        first_result = await first
        assert first_result.ok, first_result.error
        assert fleet.calls_total == 1


async def test_health_reports_active_calls_and_knobs(server_ctx, client_ctx):
    async with (
        SimulatedFleet(name="h", capacity=3, ssl_context=server_ctx) as fleet,
        aiohttp.ClientSession() as http,
    ):
        health = fleet.url + "/health/fleet"

        async def probe() -> tuple[int, bytes]:
            async with http.get(health, ssl=client_ctx) as resp:
                assert resp.headers["X-Fleet"] == "h"
                return resp.status, await resp.read()

        assert await probe() == (200, b'{"status": "ok", "fleet_available": 3}')
        async with connect(wss(fleet) + "/ws/b", ssl=client_ctx, proxy=None):
            await wait_for(lambda: fleet.active_calls == 1)
            status, body = await probe()
            assert status == 200 and json.loads(body)["fleet_available"] == 2

            fleet.available_override = 7
            assert json.loads((await probe())[1])["fleet_available"] == 7
            fleet.available_override = None

            fleet.health_status = 503
            assert (await probe())[0] == 503
            fleet.health_status = 200

            fleet.health_body = b'{"prev_fleet_available":5,"fleet_available":0}'
            assert await probe() == (200, fleet.health_body)
            fleet.health_body = None

            fleet.health_delay = 0.3
            started = time.monotonic()
            await probe()
            assert time.monotonic() - started >= 0.3
            fleet.health_delay = 0.0

            fleet.capacity = 0  # scaled down below its active calls: never negative
            assert json.loads((await probe())[1])["fleet_available"] == 0
            fleet.capacity = 3
        await wait_for(lambda: fleet.active_calls == 0)
        assert json.loads((await probe())[1])["fleet_available"] == 3
        assert fleet.health_probes == 8


async def test_health_connections_counts_tcp_connections(server_ctx, client_ctx):
    async with SimulatedFleet(ssl_context=server_ctx) as fleet:
        for _ in range(2):  # two sessions, each one kept-alive connection
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    async with http.get(fleet.url + "/health/fleet", ssl=client_ctx) as r:
                        assert r.status == 200
                        await r.read()
        assert fleet.health_probes == 6
        assert fleet.health_connections == 2


async def test_fleet_close_code_reaches_the_client(server_ctx, client_ctx):
    async with SimulatedFleet(ssl_context=server_ctx) as fleet:
        result = await run_call(
            wss(fleet), ssl_context=client_ctx, duration=0.2, request_close=4001
        )
        assert result.ok, result.error
        assert result.close_code == 4001
        assert result.frames_sent == result.frames_received == 10


@pytest.mark.parametrize("how", ["close_all_calls", "stop"])
async def test_fleet_hanging_up_mid_call_is_reported(server_ctx, client_ctx, how):
    async with SimulatedFleet(ssl_context=server_ctx) as fleet:
        call = asyncio.create_task(run_call(wss(fleet), ssl_context=client_ctx, duration=2.0))
        await wait_for(lambda: fleet.active_calls == 1)
        await asyncio.sleep(0.2)
        await getattr(fleet, how)()
        result = await asyncio.wait_for(call, 1.5)  # ends early, not after 2 s
        assert not result.ok and result.close_code == 1001
        assert result.error is not None and "closed by server" in result.error
        assert 0 < result.frames_sent < 100


async def test_subprotocol_ping_and_large_messages(server_ctx, client_ctx):
    async with SimulatedFleet(
        subprotocols=("audio.v2", "audio.v1"), ssl_context=server_ctx
    ) as fleet:
        result = await run_call(
            wss(fleet), ssl_context=client_ctx, duration=0.1, subprotocols=["audio.v1"]
        )
        assert result.ok, result.error
        assert result.subprotocol == "audio.v1"
        assert fleet.requests[0].headers["Sec-WebSocket-Protocol"] == "audio.v1"

        async with connect(
            wss(fleet) + "/ws/big",
            ssl=client_ctx,
            proxy=None,
            max_size=None,
            subprotocols=["other"],
        ) as ws:
            assert ws.subprotocol is None  # nothing in common: none negotiated
            pong = await ws.ping()
            await asyncio.wait_for(pong, 1.0)
            big = bytes(range(256)) * (17 * 4096)  # 17 MiB
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), 5.0) == big
            await ws.send("close:notanumber")  # not a control message: echoed
            assert await ws.recv() == "close:notanumber"


async def test_run_calls_and_summary():
    async with SimulatedFleet(name="a", capacity=2) as fleet:
        url = fleet.url.replace("http://", "ws://")
        results = await run_calls(url, 3, duration=0.3, stagger=0.01)
        summary = summarize(results)
        assert summary["calls"] == 3 and summary["ok"] == 2 and summary["failed"] == 1
        assert summary["status"] == {"101": 2, "429": 1}
        assert summary["fleets"] == {"a": {"ok": 2, "failed": 1}}
        assert summary["frames_sent"] == summary["frames_received"] == 30
        assert summary["lost_frames"] == 0
        assert summary["rtt_ms_p50"] <= summary["rtt_ms_p99"]
        assert summary["handshake_ms_p50"] is not None

        # concurrency=1: the calls run one after another, so none is refused
        results = await run_calls(url, 3, concurrency=1, duration=0.1)
        assert [r.status for r in results] == [101, 101, 101]
        assert summarize([])["rtt_ms_p50"] is None


async def test_restart_on_the_same_port():
    fleet = SimulatedFleet()
    await fleet.start()
    url, port = fleet.url, fleet.port
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/health/fleet") as r:
            assert r.status == 200
        await fleet.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(url + "/health/fleet") as r:
                pass
        await fleet.start()
        try:
            assert fleet.port == port
            async with http.get(url + "/health/fleet") as r:
                assert r.status == 200
            assert fleet.health_probes == 2
        finally:
            await fleet.stop()


def test_connection_counting_under_uvloop(server_ctx, client_ctx):
    """uvloop's TLS transports differ from asyncio's (no weak references)."""

    async def scenario() -> None:
        async with SimulatedFleet(ssl_context=server_ctx) as fleet:
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    async with http.get(fleet.url + "/health/fleet", ssl=client_ctx) as r:
                        assert r.status == 200
            results = await run_calls(wss(fleet), 2, ssl_context=client_ctx, duration=0.1)
            assert all(r.ok for r in results), [r.error for r in results]
            assert (fleet.health_probes, fleet.health_connections) == (3, 1)
            assert (fleet.calls_total, fleet.ws_connections) == (2, 2)

    uvloop.run(scenario())
