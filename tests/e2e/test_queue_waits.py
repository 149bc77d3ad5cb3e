"""What an operator reads of SPEC 4's queue, and the edge's answer to a
WebSocket version it does not speak (the queue audit of session 37).

Before, nothing showed how many calls waited in the queue and got a slot, or
for how long: the access line's handshake_ms held the wait with the fleet's
answer, so "calls wait 2 s for a slot" read as "fleets are slow to answer".
Now each access line has `queued_ms`, /metrics fleet_ingress_queue_wait_seconds,
`stat` and /stats the count and mean. Real TLS, real websockets carriers, a
fleet of maxconn 2 given 5 calls, the waits measured by the test itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from prometheus_client import generate_latest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fleet_ingress.ops.admin_client import format_stat_table
from fleet_ingress.ops.stats_page import render_stats_page
from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    UPGRADE,
    RawFleet,
    RunningIngress,
    StartIngress,
    TLSFiles,
    WsFleet,
    access_entries,
    answer,
    close_calls,
    echo,
    eventually,
    fleets_up_or_finished,
    metric_samples,
    raw_exchange,
    run_cli,
    wss_url,
)

# How far a measured wait may be from the one the test caused: the release is
# read on the ingress's next loop turn, the grant on the worker's (a loaded
# 2-core host: tens of ms).
SLACK_MS = 250


async def test_five_calls_on_a_fleet_of_maxconn_2_say_how_long_each_waited_for_a_slot(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """Two calls get a slot at once, three wait in the queue, each until the
    test frees one: their access lines, the histogram, /stats.json, `stat`
    and /stats say who waited and how long; the two that did not wait, 0."""
    caplog.set_level("INFO", logger="fleet_ingress.access")
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    ctx = tls_files.client_context()
    calls: list[ClientConnection] = []
    try:
        ingress = await start_ingress([fleet.line("a", "maxconn=2")], timeouts={"queue": 10})
        for i in range(2):
            calls.append(await connect(wss_url(ingress, f"/ws/at-once-{i}"), ssl=ctx))
        queued: list[asyncio.Future[ClientConnection]] = []
        entered: list[float] = []
        for i in range(3):
            queued.append(
                asyncio.ensure_future(connect(wss_url(ingress, f"/ws/waited-{i}"), ssl=ctx))
            )
            await eventually(lambda i=i: ingress.dispatcher.queue_length == i + 1)
            entered.append(time.monotonic())
        # Free a slot at 0.4 s, 0.8 s, 1.2 s: the first in line takes each.
        expected_ms: list[float] = []
        for n, holder in enumerate([calls[0], calls[1], None]):
            await asyncio.sleep(0.4)
            if holder is None:
                holder = await queued[0]  # the first one served hangs up in turn
            freed = time.monotonic()
            await holder.close()
            served = await asyncio.wait_for(queued[n], 5)
            expected_ms.append((freed - entered[n]) * 1000)
            calls.append(served)
            await echo(served)
        await close_calls(calls)
        await eventually(lambda: not ingress.registry.calls)

        lines = {e["bot_id"]: e for e in access_entries(caplog) if e.get("route") == "/ws/"}
        assert [lines[f"at-once-{i}"]["queued_ms"] for i in range(2)] == [0, 0]
        waited = [lines[f"waited-{i}"]["queued_ms"] for i in range(3)]
        print(f"queued_ms {waited}, slots freed after {[round(ms, 1) for ms in expected_ms]} ms")
        for got, want in zip(waited, expected_ms, strict=True):
            assert want - 5 <= got <= want + SLACK_MS, (waited, expected_ms)
        # The wait is part of the handshake, and told apart from it.
        assert all(lines[f"waited-{i}"]["handshake_ms"] >= waited[i] for i in range(3))

        samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
        assert samples["fleet_ingress_queue_wait_seconds_count"][()] == 3
        total = samples["fleet_ingress_queue_wait_seconds_sum"][()]
        assert abs(total * 1000 - sum(waited)) < 5, (total, waited)
        assert samples["fleet_ingress_queue_wait_seconds_bucket"][(("le", "0.25"),)] == 0

        snap = ingress.snapshot()
        assert snap["frontend"]["queue_waits"] == 3
        assert abs(snap["frontend"]["queue_wait_s"] - total) < 0.002
        mean = snap["frontend"]["queue_wait_s"] / 3  # as shown: from the sum, rounded to ms
        stat = format_stat_table(snap)
        assert f"3 waited for a slot, {mean:.2f}s on average" in stat, stat
        assert f"3 waited for a slot, {mean:.2f}s on average" in render_stats_page(snap)
    finally:
        await close_calls(calls)
        await fleet.stop()


async def test_a_call_refused_after_its_queue_wait_says_the_wait(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue timeout's 503 carries its wait in queued_ms (the access line
    of a call refused at once says 0); the histogram counts waits that got a
    slot only (the others are fleet_ingress_queue_timeouts_total)."""
    caplog.set_level("INFO", logger="fleet_ingress.access")
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    ctx = tls_files.client_context()
    holder: ClientConnection | None = None
    try:
        ingress = await start_ingress(
            [fleet.line("a", "maxconn=1")], timeouts={"queue": 0.4}, limits={"max_queue": 1}
        )
        holder = await connect(wss_url(ingress, "/ws/holder"), ssl=ctx)
        waiting = asyncio.ensure_future(connect(wss_url(ingress, "/ws/timed-out"), ssl=ctx))
        await eventually(lambda: ingress.dispatcher.queue_length == 1)
        with pytest.raises(InvalidStatus) as full:  # the queue is full: at once
            await connect(wss_url(ingress, "/ws/queue-full"), ssl=ctx)
        assert full.value.response.status_code == 503
        with pytest.raises(InvalidStatus) as timed_out:
            await asyncio.wait_for(waiting, 5)
        assert timed_out.value.response.status_code == 503
        await eventually(lambda: len(ingress.registry.calls) == 1)
        lines = {e["bot_id"]: e for e in access_entries(caplog) if e.get("route") == "/ws/"}
        assert 400 - 5 <= lines["timed-out"]["queued_ms"] <= 400 + SLACK_MS, lines["timed-out"]
        assert lines["queue-full"]["queued_ms"] == 0
        samples = metric_samples(generate_latest(ingress.metrics.prometheus).decode())
        assert samples["fleet_ingress_queue_wait_seconds_count"][()] == 0
        assert samples["fleet_ingress_queue_timeouts_total"][()] == 1
    finally:
        if holder is not None:
            await holder.close()
        await fleet.stop()


@pytest.mark.uvloop_only
async def test_a_hosts_queue_waits_are_summed_over_workers_and_outlive_a_worker_and_an_upgrade(
    tls_files: TLSFiles,
) -> None:
    """`fleet-ingress run` with two workers: the queue is the supervisor's, the
    wait is timed in the worker that holds the call (from its ask to the
    grant the supervisor marks "queued"). Each access line says it, /metrics
    sums the workers' histograms, `stat` and /stats show the count, and
    neither a worker SIGKILLed afterwards nor an upgrade takes any of it."""
    sim = SimulatedFleet(name="a", capacity=16, ssl_context=tls_files.fleet_server_context())
    sim.available_override = 1000
    await sim.start()
    service = await RunningIngress.start(
        tls_files, [f"{sim.url} name=a maxconn=2"], workers=2, queue=10, check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    ctx = tls_files.client_context()
    calls: list[ClientConnection] = []
    try:
        for i in range(2):
            calls.append(await connect(service.url(f"/ws/at-once-{i}"), ssl=ctx))
        queued: list[asyncio.Future[ClientConnection]] = []
        entered: list[float] = []

        async def queue_length() -> int:
            return int((await service.stats())["frontend"]["queue_length"])

        for i in range(3):
            queued.append(
                asyncio.ensure_future(
                    connect(service.url(f"/ws/waited-{i}"), ssl=ctx, open_timeout=15)
                )
            )
            async with asyncio.timeout(10):
                while await queue_length() != i + 1:
                    await asyncio.sleep(0.02)
            entered.append(time.monotonic())
        expected_ms: list[float] = []
        for n, holder in enumerate([calls[0], calls[1], None]):
            await asyncio.sleep(0.5)
            if holder is None:
                holder = await queued[0]
            freed = time.monotonic()
            await holder.close()
            served = await asyncio.wait_for(queued[n], 10)
            expected_ms.append((freed - entered[n]) * 1000)
            calls.append(served)
            await echo(served)
        await close_calls(calls)

        def ended() -> dict[str, dict]:
            return {
                e["bot_id"]: e
                for e in service.log()
                if e.get("event") == "call ended" and e.get("route") == "/ws/"
            }

        await eventually(lambda: len(ended()) == 5, 10)
        lines = ended()
        assert [lines[f"at-once-{i}"]["queued_ms"] for i in range(2)] == [0, 0]
        waited = [lines[f"waited-{i}"]["queued_ms"] for i in range(3)]
        print(f"host queued_ms {waited}, freed after {[round(ms, 1) for ms in expected_ms]} ms")
        # The stats' queue_length polls (0.02 s apart) may see a call a little
        # after it entered: the measured wait may start a poll earlier.
        for got, want in zip(waited, expected_ms, strict=True):
            assert want - 60 <= got <= want + SLACK_MS, (waited, expected_ms)

        async def host_count() -> tuple[float, float]:
            samples = metric_samples(await service.metrics())
            return (
                samples["fleet_ingress_queue_wait_seconds_count"][()],
                samples["fleet_ingress_queue_wait_seconds_sum"][()],
            )

        count, total = await host_count()
        assert count == 3 and abs(total * 1000 - sum(waited)) < 5, (count, total, waited)
        shown = (await service.stats())["frontend"]
        assert shown["queue_waits"] == 3 and abs(shown["queue_wait_s"] - total) < 0.002, shown
        code, out, err = await run_cli(service, "stat")
        assert code == 0, err
        assert f"3 waited for a slot, {shown['queue_wait_s'] / 3:.2f}s on average" in out, out

        # Each worker's report holds its own waits; a worker gone keeps them
        # in the host's retired counts (the page reads the same numbers).
        victim = (await service.stats())["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(20):
            while victim in {w["pid"] for w in (await service.stats())["workers"]}:
                await asyncio.sleep(0.1)
        assert await host_count() == (count, total)
        assert (await service.stats())["frontend"]["queue_waits"] == 3
        # And over an upgrade: the supervisor re-executes, carrying its view.
        code, out, err = await run_cli(service, "upgrade", timeout=150, installed=True)
        assert code == 0, out + err
        assert await host_count() == (count, total)
        assert (await service.stats())["frontend"]["queue_waits"] == 3
    finally:
        await close_calls(calls)
        await service.finish()
        await sim.stop()


# -- a WebSocket version other than 13 -----------------------------------------

CALL = UPGRADE.format(path="/ws/bot").encode()
FLEET_WOULD_SAY = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(
    ("version_line", "said"),
    [
        (b"Sec-WebSocket-Version: 8\r\n", "(it said '8')"),  # hybi-08 (2011)
        (b"Sec-WebSocket-Version: 13, 8\r\n", "(it said '13, 8')"),
        (b"", "(it said none)"),
    ],
)
async def test_a_websocket_version_other_than_13_gets_426_at_the_edge(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    caplog: pytest.LogCaptureFixture,
    version_line: bytes,
    said: str,
) -> None:
    """RFC 6455 4.2.2: 426 with the version the server speaks, answered by
    the ingress: before, the upgrade went to the fleet, which refused it
    with its own 400, a fleet connection spent and a call counted refused
    against that fleet."""
    caplog.set_level("INFO", logger="fleet_ingress")
    fleet = await RawFleet(tls_files.fleet_server_context(), answer(FLEET_WOULD_SAY)).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        request = CALL.replace(b"Sec-WebSocket-Version: 13\r\n", version_line)
        assert request != CALL or not version_line
        got = await raw_exchange(ingress, tls_files, request)
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 426 Upgrade Required", got
        assert b"Sec-WebSocket-Version: 13" in lines, got
        assert b"Upgrade: websocket" in lines, got
        assert b"Connection: upgrade, close" in lines, got
        assert body.decode() == f"a WebSocket upgrade needs Sec-WebSocket-Version: 13 {said}"
        assert fleet.connections == 0
        (a,) = ingress.balancer.fleets
        assert (a.calls_total, dict(a.responses)) == (0, {})
        assert ingress.registry.requests[("/ws/", 426)] == 1
        assert not ingress.registry.ended  # no call: no call counted refused
        refused = [r for r in caplog.records if r.getMessage() == "request refused"]
        assert [(r.fields["status"], r.fields["reason"]) for r in refused] == [  # type: ignore[attr-defined]
            (426, body.decode())
        ]
    finally:
        await fleet.stop()


async def test_version_13_spelt_with_spaces_is_still_a_call(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    try:
        ingress = await start_ingress([fleet.line("a")])
        request = CALL.replace(b"Sec-WebSocket-Version: 13\r\n", b"Sec-WebSocket-Version:  13 \r\n")
        host, port = ingress.wss_address
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 101 "), head
    finally:
        await fleet.stop()
