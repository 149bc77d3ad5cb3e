"""A call attempt waiting for the 101 of a fleet that goes DOWN is tried again
at once on another fleet, not after timeouts.response; the fleet's live calls
go on. A real `fleet-ingress run` (a supervisor probing, two workers), two
simulated fleets over real TLS, real WebSocket carriers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    RunningIngress,
    StartIngress,
    TLSFiles,
    echo,
    eventually,
    metric_samples,
    wss_url,
)

# Far above what the retry takes: a call answered under ANSWERED_WITHIN did
# not wait for it (before: it waited all of it, then was retried).
RESPONSE_S = 8.0
# Probes every 0.3 s, two failing in a row take a fleet DOWN: about 0.6-0.9 s
# after its health fails, plus the other fleet's next probe saying room.
CHECK_INTERVAL_S = 0.3
ANSWERED_WITHIN_S = 3.5
# A bot that never starts: the fleet reads the request and answers nothing.
NEVER_S = 60.0


async def _stats_say(service: RunningIngress, want: dict[str, Any]) -> None:
    """Until the stats' fleet rows say `want` ({name: {field: value}})."""
    async with asyncio.timeout(15):
        while True:
            rows = {f["name"]: f for f in (await service.stats())["fleets"]}
            if all(
                all(rows.get(name, {}).get(k) == v for k, v in fields.items())
                for name, fields in want.items()
            ):
                return
            await asyncio.sleep(0.05)


@pytest.mark.uvloop_only
async def test_an_attempt_awaiting_a_fleet_that_goes_down_is_answered_by_another_at_once(
    tls_files: TLSFiles,
) -> None:
    context = tls_files.fleet_server_context()
    calls: list[ClientConnection] = []
    async with (
        SimulatedFleet(name="a", capacity=50, ssl_context=context) as a,
        SimulatedFleet(name="b", capacity=50, ssl_context=context) as b,
    ):
        b.available_override = 0  # FULL: the calls go to a
        service = await RunningIngress.start(
            tls_files,
            [f"{a.url} name=a", f"{b.url} name=b"],
            workers=2,
            check_interval=CHECK_INTERVAL_S,
            env={"FLEET_INGRESS_TIMEOUTS__RESPONSE": str(RESPONSE_S)},
        )
        try:
            await _stats_say(service, {"a": {"health": "UP"}, "b": {"health": "UP", "full": True}})
            # A live call on a: a fleet DOWN keeps it (SPEC 6).
            live = await connect(
                service.url("/ws/live"), ssl=tls_files.client_context(), open_timeout=15
            )
            calls.append(live)
            assert a.active_calls == 1
            # The next call's request reaches a, whose bot never answers.
            a.call_delay = NEVER_S
            began = time.monotonic()

            async def open_call() -> ClientConnection:
                return await connect(
                    service.url("/ws/waits"), ssl=tls_files.client_context(), open_timeout=15
                )

            opening = asyncio.create_task(open_call())
            await eventually(lambda: len(a.requests) == 2, timeout=5)
            # Then a fails its health checks, and b has room again.
            a.health_status = 503
            b.available_override = None
            waited = await opening
            took = time.monotonic() - began
            calls.append(waited)
            assert took < ANSWERED_WITHIN_S, f"answered after {took:.2f}s"
            assert b.active_calls == 1 and b.calls_total == 1
            await echo(waited, "from b")
            await echo(live, "still on a")  # the live call went on
            await _stats_say(service, {"a": {"health": "DOWN"}})
            await echo(live, "still on a after DOWN")

            await waited.close()
            ended: list[dict[str, Any]] = []

            def access_line() -> bool:
                ended[:] = [
                    e
                    for e in service.log()
                    if e.get("event") == "call ended"
                    and e.get("route") == "/ws/"
                    and e.get("bot_id") == "waits"
                ]
                return bool(ended)

            await eventually(access_line, timeout=5)
            line = ended[0]
            assert (line["fleet"], line["status"], line["attempts"]) == ("b", 101, 2), line
            assert line["handshake_ms"] < ANSWERED_WITHIN_S * 1000, line
            log = service.log()
            failed = [e for e in log if e.get("event") == "fleet attempt failed"]
            assert [(e["fleet"], e["attempt"], e["failure"]) for e in failed] == [
                ("a", 1, "fleet-down")
            ], failed
            told = [e for e in log if e.get("event", "").startswith("fleet DOWN: the workers")]
            assert [(e["fleet"], e["in_flight"]) for e in told] == [("a", 1)], told

            async def counted() -> dict[str, Any]:
                samples = metric_samples(await service.metrics())
                return {
                    name: samples.get(f"fleet_ingress_fleet_{name}_total", {})
                    for name in ("retries", "redispatches")
                }

            want = {(("fleet", "a"),): 1.0, (("fleet", "b"),): 0.0}
            async with asyncio.timeout(10):
                while (got := await counted()) != {"retries": want, "redispatches": want}:
                    await asyncio.sleep(0.2)
            assert got == {"retries": want, "redispatches": want}
        finally:
            for ws in calls:
                with contextlib.suppress(Exception):
                    await ws.close()
            await service.finish()


async def test_in_one_process_an_attempt_awaiting_a_fleet_that_goes_down_is_retried_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """The same where the process that probes carries the calls (its own
    dispatcher, no supervisor): the poller's DOWN gives the attempt up."""
    context = tls_files.fleet_server_context()
    async with (
        SimulatedFleet(name="a", capacity=50, ssl_context=context) as a,
        SimulatedFleet(name="b", capacity=50, ssl_context=context) as b,
    ):
        b.available_override = 0  # FULL: the call goes to a
        a.call_delay = NEVER_S
        ingress = await start_ingress(
            [f"{a.url} name=a", f"{b.url} name=b"],
            health_checks=True,
            fleets={"check_interval": CHECK_INTERVAL_S},
            timeouts={"response": RESPONSE_S},
        )
        fa, fb = ingress.balancer.fleets
        await eventually(lambda: fa.health.value == "UP" and fb.full, timeout=10)
        began = time.monotonic()

        async def open_call() -> ClientConnection:
            return await connect(wss_url(ingress), ssl=tls_files.client_context(), open_timeout=15)

        opening = asyncio.create_task(open_call())
        await eventually(lambda: len(a.requests) == 1, timeout=5)
        a.health_status = 503
        b.available_override = None
        ws = await opening
        try:
            took = time.monotonic() - began
            assert took < ANSWERED_WITHIN_S, f"answered after {took:.2f}s"
            assert ws.response is not None and ws.response.headers["X-Fleet"] == "b"
            await echo(ws)
            assert (fa.retries, fa.redispatches, fb.retries) == (1, 1, 0)
        finally:
            await ws.close()
