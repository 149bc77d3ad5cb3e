"""Health checks steering calls, end to end with real fleets on loopback (issue #3)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.health import Health
from fleet_ingress.core.probe import ProbeSettings
from fleet_ingress.net import poller as poller_module
from fleet_ingress.net.poller import health_session, probe_fleet
from fleet_ingress.net.tls import fleet_ssl_context
from fleet_ingress.service.ingress import Ingress
from fleet_ingress.sim import SimulatedFleet
from tests.support import StartIngress, TcpDoor, TLSFiles, eventually, wss_url


@pytest.fixture
async def sim_fleets(tls_files: TLSFiles):
    fleets = [
        SimulatedFleet(name=name, ssl_context=tls_files.fleet_server_context(), capacity=64)
        for name in ("a", "b")
    ]
    for fleet in fleets:
        await fleet.start()
    yield fleets
    for fleet in fleets:
        await fleet.stop()


def lines(*fleets: SimulatedFleet, extra: str = "") -> list[str]:
    return [f"{f.url} name={f.name} {extra}".strip() for f in fleets]


async def started(start_ingress: StartIngress, fleet_lines: list[str], **sections) -> Ingress:
    ingress = await start_ingress(fleet_lines, health_checks=True, **sections)
    assert ingress.poller is not None
    assert await ingress.poller.wait_first_probes(timeout=3)
    return ingress


async def open_calls(ingress: Ingress, tls_files: TLSFiles, n: int) -> list[ClientConnection]:
    ctx = tls_files.client_context()
    return list(await asyncio.gather(*(connect(wss_url(ingress), ssl=ctx) for _ in range(n))))


def fleet_of(ws: ClientConnection) -> str:
    assert ws.response is not None
    return ws.response.headers["X-Fleet"]


async def test_a_call_before_the_first_probe_waits_for_its_verdict(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    a, b = sim_fleets
    a.health_status = 503
    ingress = await start_ingress(
        lines(a), health_checks=True, fleets={"check_interval": 0.3}, timeouts={"queue": 3}
    )
    assert ingress.balancer.fleets[0].health is Health.INIT
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(InvalidStatus) as info:  # it never passes: DOWN after fall 2
        await connect(wss_url(ingress), ssl=tls_files.client_context())
    assert info.value.response.status_code == 503
    assert 0.2 < loop.time() - started < 2.5  # refused once DOWN, not at queue timeout
    assert a.calls_total == 0

    ingress = await start_ingress(lines(b), health_checks=True)
    assert ingress.balancer.fleets[0].health is Health.INIT
    async with connect(wss_url(ingress), ssl=tls_files.client_context()) as ws:
        assert fleet_of(ws) == "b"  # served once its first probe passed


# -- 3. DOWN within fall x interval + timeout, calls kept, back UP after rise --------


async def test_failing_fleet_goes_down_keeps_its_calls_and_comes_back(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    a, b = sim_fleets
    ingress = await started(start_ingress, lines(a, b))  # defaults: 1 s, fall 2, rise 2
    fleet_a = ingress.balancer.get("a")
    assert fleet_a is not None and fleet_a.health is Health.UP
    call = (await open_calls(ingress, tls_files, 1))[0]
    assert fleet_of(call) == "a"
    streamed = 0

    async def keep_streaming() -> None:
        nonlocal streamed
        while True:
            await call.send(b"frame-%d" % streamed)
            assert await call.recv() == b"frame-%d" % streamed
            streamed += 1
            await asyncio.sleep(0.02)

    streamer = asyncio.create_task(keep_streaming())
    a.health_status = 503
    went_down = await eventually(lambda: fleet_a.health is Health.DOWN, timeout=5)
    assert went_down <= 3.5
    assert fleet_a.last_probe is not None and fleet_a.last_probe.reason == "status 503"
    assert fleet_a.reported_available is None  # a DOWN fleet's old free count is not shown
    new_calls = await open_calls(ingress, tls_files, 4)
    assert {fleet_of(ws) for ws in new_calls} == {"b"}
    a.health_status = 200
    await eventually(lambda: fleet_a.health is Health.UP, timeout=4)
    assert not streamer.done(), "the call on the DOWN fleet stopped streaming"
    streamer.cancel()
    await asyncio.gather(streamer, return_exceptions=True)
    assert streamed > 100  # ~20 ms frames over the whole DOWN/UP cycle
    await call.send(b"after")
    async with asyncio.timeout(2):  # an echo cut off by the cancel may come first
        while (echo := await call.recv()) != b"after":
            assert echo.startswith(b"frame-")
    for ws in [call, *new_calls]:
        await ws.close()


@pytest.mark.uvloop_only
async def test_a_health_answer_no_check_foresaw_fails_probes_and_probing_goes_on(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets, monkeypatch
):
    """The bad-fleet audit of session 15: a health body nested past the JSON
    parser's stack raised out of the probe and ended the fleet's probing for
    good, silently, leaving it UP. Such a body now fails the probe; and
    anything else a probe raises fails it too, once logged, and probing goes on."""
    a, b = sim_fleets
    ingress = await started(start_ingress, lines(a, b))
    fleet_a = ingress.balancer.get("a")
    assert fleet_a is not None and fleet_a.health is Health.UP
    a.health_body = b'{"fleet_available": 5, "x": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    await eventually(lambda: fleet_a.health is Health.DOWN, timeout=5)
    assert fleet_a.last_probe is not None and "too deep" in fleet_a.last_probe.reason
    a.health_body = None
    await eventually(lambda: fleet_a.health is Health.UP, timeout=5)

    def broken_judge(*args: object) -> object:  # what no check foresaw
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(poller_module, "judge_health_response", broken_judge)
    await eventually(lambda: fleet_a.health is Health.DOWN, timeout=5)
    assert "RuntimeError: unforeseen" in fleet_a.last_probe.reason
    monkeypatch.undo()
    await eventually(lambda: fleet_a.health is Health.UP, timeout=5)


# -- 4. FULL: no new call, not DOWN; queue then 503 when all are FULL ------------------


async def test_full_fleet_gets_no_new_call_and_is_not_down(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    a, b = sim_fleets
    ingress = await started(
        start_ingress,
        lines(a, b),
        fleets={"check_interval": 0.2, "check_timeout": 0.5},
        timeouts={"queue": 0.5},
    )
    fleet_a, fleet_b = ingress.balancer.fleets
    a.available_override = 0
    await eventually(lambda: fleet_a.full)
    calls = await open_calls(ingress, tls_files, 10)
    assert Counter(fleet_of(ws) for ws in calls) == {"b": 10}
    assert fleet_a.health is Health.UP and a.calls_total == 0

    b.available_override = 0
    await eventually(lambda: fleet_b.full)
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    with pytest.raises(InvalidStatus) as info:
        await connect(wss_url(ingress), ssl=tls_files.client_context())
    assert info.value.response.status_code == 503
    assert loop.time() - started_at >= 0.45  # it queued first
    assert ingress.dispatcher.queue_timeouts == 1

    # Room reported again: a queued call is served as soon as the probe says so.
    waiting = asyncio.ensure_future(connect(wss_url(ingress), ssl=tls_files.client_context()))
    await eventually(lambda: ingress.dispatcher.queue_length == 1)
    a.available_override = None
    ws = await waiting
    assert fleet_of(ws) == "a"
    for c in [*calls, ws]:
        await c.close()


# -- 5. the estimate: reported minus calls opened since the probe was sent -------------


async def test_a_fleet_reporting_3_free_gets_at_most_3_calls_before_its_next_probe(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    a, _ = sim_fleets
    a.available_override = 3
    ingress = await started(
        start_ingress,
        lines(a),
        fleets={"check_interval": 30, "maxconn": 16},  # no second probe during the test
        timeouts={"queue": 0.3},
    )
    ctx = tls_files.client_context()
    burst = await asyncio.gather(
        *(connect(wss_url(ingress), ssl=ctx) for _ in range(6)), return_exceptions=True
    )
    connected = [ws for ws in burst if isinstance(ws, ClientConnection)]
    refused = [e for e in burst if isinstance(e, InvalidStatus)]
    assert len(connected) == 3 and len(refused) == 3
    assert {e.response.status_code for e in refused} == {503}
    assert a.calls_total == 3
    for ws in connected:
        await ws.close()


async def test_a_fleet_that_answers_429_gets_no_more_calls_until_its_next_probe(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    """Its probe said room; traffic that bypasses the ingress filled it since. Its
    429 goes to the carrier as is (SPEC 3), and says it is full now: the calls
    after it go to the other fleet, not to the same answer."""
    a, b = sim_fleets
    ingress = await started(
        start_ingress,
        lines(a, b),
        fleets={"check_interval": 30},  # no second probe during the test
    )
    fleet_a = ingress.balancer.fleets[0]
    assert fleet_a.estimated_available == 64 and not fleet_a.full
    a.capacity = 0  # its workers all taken from outside
    ctx = tls_files.client_context()
    with pytest.raises(InvalidStatus) as info:
        await connect(wss_url(ingress), ssl=ctx)  # a first: ties go round-robin from a
    assert info.value.response.status_code == 429
    assert fleet_a.full
    # a holds no call and b more and more: leastconn alone would send a every other one.
    calls = [await connect(wss_url(ingress), ssl=ctx) for _ in range(4)]
    assert [fleet_of(ws) for ws in calls] == ["b"] * 4
    assert (a.rejected_429, b.calls_total) == (1, 4)
    for ws in calls:
        await ws.close()


async def test_a_fleet_answering_429_while_its_probes_say_room_is_said_full_once(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets, caplog, monkeypatch
):
    """Its probes say 1000 free, its calls get 429: FULL after each 429, room
    after each probe. Before, "fleet full" and "fleet has room" alternated at
    every probe (twice a second here); now "fleet full" once, and "fleet has
    room" once the 429s stopped for ROOM_HOLD, with how many were answered."""
    from fleet_ingress.core import full_log

    monkeypatch.setattr(full_log, "ROOM_HOLD", 1.5)
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    a, b = sim_fleets
    a.capacity, a.available_override = 0, 1000
    ingress = await started(start_ingress, lines(a, b), fleets={"check_interval": 0.2})
    ctx = tls_files.client_context()
    calls: list[ClientConnection] = []
    deadline = time.monotonic() + 2.5
    for _ in range(200):  # bounded: 2.5 s and 200 calls
        if time.monotonic() > deadline:
            break
        try:
            calls.append(await connect(wss_url(ingress), ssl=ctx))
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
        await asyncio.sleep(0.05)
    for ws in calls:
        await ws.close()
    assert a.rejected_429 >= 3, "a's FULL never lifted by its probes"

    def said() -> list[tuple[str, Any]]:
        return [
            (r.getMessage(), r.fields.get("answered_429"))  # type: ignore[attr-defined]
            for r in caplog.records
            if getattr(r, "fields", {}).get("fleet") == "a"
            and r.getMessage().startswith(("fleet full", "fleet has room"))
        ]

    assert [m for m, _ in said()] == [  # one, whatever the number of 429s
        "fleet full: it answered a call 429; no new call goes there until its next probe"
    ], said()
    await eventually(lambda: len(said()) == 2, timeout=5)
    assert said()[1] == ("fleet has room", a.rejected_429), said()


async def test_the_room_line_counts_every_429_of_calls_in_flight_at_once(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets, caplog, monkeypatch
):
    """Calls sent to a fleet together, each answered 429: only the first is
    news to its estimate, and "fleet has room" said answered_429=1 whatever
    the number it answered (the operator read 1 refusal for a burst of them)."""
    from fleet_ingress.core import full_log

    monkeypatch.setattr(full_log, "ROOM_HOLD", 0.5)
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    a, b = sim_fleets
    a.capacity, a.available_override = 0, 1000
    b.capacity, b.available_override = 0, 0  # every call goes to a
    ingress = await started(start_ingress, lines(a, b), fleets={"check_interval": 0.2})

    async def one() -> None:
        with contextlib.suppress(InvalidStatus):
            ws = await connect(wss_url(ingress), ssl=tls_files.client_context())
            await ws.close()

    async with asyncio.timeout(10):
        await asyncio.gather(*(one() for _ in range(8)))  # bounded: 8 calls
    assert a.rejected_429 >= 2, a.rejected_429

    def room() -> list[Any]:
        return [
            r.fields.get("answered_429")  # type: ignore[attr-defined]
            for r in caplog.records
            if getattr(r, "fields", {}).get("fleet") == "a" and r.getMessage() == "fleet has room"
        ]

    await eventually(lambda: room(), timeout=5)
    assert room() == [a.rejected_429], (room(), a.rejected_429)


async def test_calls_still_connecting_when_a_probe_is_answered_are_not_sent_twice(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    """The fleet takes a call 0.6 s after its request (a slow bot start), and
    answers probes meanwhile without the calls on their way. Each probe's 5 free
    must not let 5 more calls through on top of the 5 still connecting: exactly
    5 are admitted, none meets a 429, the rest wait and get 503."""
    a, _ = sim_fleets
    a.capacity, a.call_delay = 5, 0.6
    ingress = await started(
        start_ingress,
        lines(a),
        fleets={"check_interval": 0.2, "maxconn": 50},
        timeouts={"queue": 1.5},
    )
    ctx = tls_files.client_context()
    burst = await asyncio.gather(
        *(connect(wss_url(ingress), ssl=ctx) for _ in range(12)), return_exceptions=True
    )
    connected = [ws for ws in burst if isinstance(ws, ClientConnection)]
    statuses = Counter(e.response.status_code for e in burst if isinstance(e, InvalidStatus))
    assert (len(connected), statuses) == (5, {503: 7})
    assert (a.calls_total, a.rejected_429, a.peak_calls) == (5, 0, 5)
    assert a.health_probes >= 4  # several probes came and went while 5 were connecting
    for ws in connected:
        await ws.close()


# -- 6. no upper bound: 40 workers, maxconn 40 -----------------------------------------


async def test_a_fleet_with_40_workers_takes_40_calls(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    big = SimulatedFleet(name="big", ssl_context=tls_files.fleet_server_context(), capacity=40)
    async with big:
        ingress = await started(start_ingress, lines(big, extra="maxconn=40"))
        fleet = ingress.balancer.fleets[0]
        assert fleet.health is Health.UP and fleet.last_probe is not None
        assert fleet.last_probe.capacity == 40
        calls = await open_calls(ingress, tls_files, 40)
        assert big.active_calls == 40 and fleet.active == 40
        for ws in calls:
            await ws.close()


# -- 7. a slow probe fails, alone it does not take the fleet DOWN ----------------------


async def test_one_slow_probe_fails_but_does_not_take_the_fleet_down(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    a, _ = sim_fleets
    ingress = await started(
        start_ingress, lines(a), fleets={"check_interval": 1.0, "check_timeout": 0.3}
    )
    fleet = ingress.balancer.fleets[0]
    a.health_delay = 0.6
    await eventually(lambda: fleet.check_failures == 1)
    a.health_delay = 0
    assert fleet.last_probe is not None and "timeout" in fleet.last_probe.reason
    probes = fleet.probes_total
    await eventually(lambda: fleet.probes_total >= probes + 2, timeout=3)
    assert fleet.check_failures == 1
    assert fleet.health is Health.UP


# -- 8. probes reuse one kept-alive connection -----------------------------------------


@pytest.mark.uvloop_only
async def test_probes_reuse_their_connection_over_10_seconds(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    a, _ = sim_fleets
    ingress = await started(start_ingress, lines(a))
    await asyncio.sleep(10)
    fleet = ingress.balancer.fleets[0]
    assert fleet.probes_total >= 10
    assert a.health_probes >= 10
    assert a.health_connections <= 2


async def test_a_kept_probe_connection_is_renewed_so_its_certificate_is_current(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets, monkeypatch
):
    """The fleet's certificate expiry is noted at each probe connection's handshake
    (fleet_ingress_fleet_certificate_expiry_timestamp_seconds); a connection kept for
    days would keep a renewed fleet's old date and raise a false alarm. It is
    replaced every RECONNECT_EVERY (a minute; here 0.6 s), probes at 0.2 s."""
    monkeypatch.setattr(poller_module, "RECONNECT_EVERY", 0.6)
    # A probe that failed (timed out: a loaded host) or was sent while the fleet
    # was DOWN is followed, or made, by a new connection too: counted apart.
    other_reasons = 0
    record = poller_module.HealthPoller.record

    def counted(poller: Any, fleet: Any, result: Any, *args: Any, **kw: Any) -> None:
        nonlocal other_reasons
        other_reasons += not result.passed or fleet.health is Health.DOWN
        record(poller, fleet, result, *args, **kw)

    monkeypatch.setattr(poller_module.HealthPoller, "record", counted)
    a, _ = sim_fleets
    began = time.monotonic()
    ingress = await started(
        start_ingress, lines(a), fleets={"check_interval": 0.2, "check_timeout": 0.2}
    )
    # Renewed: a third connection (due at 1.2 s), 8 probes (1.6 s); 10 s on a loaded host.
    try:
        await eventually(lambda: a.health_connections >= 3 and a.health_probes >= 8, timeout=10)
    except TimeoutError:
        pytest.fail(f"{a.health_connections} connections for {a.health_probes} probes in 10 s")
    # Kept between renewals: no more than one a RECONNECT_EVERY since the start
    # (a connection a probe would be one a 0.2 s), and those for other reasons.
    elapsed, connections = time.monotonic() - began, a.health_connections
    assert connections <= 1 + elapsed / 0.6 + other_reasons, (
        connections,
        elapsed,
        other_reasons,
        a.health_probes,
    )
    assert ingress.balancer.fleets[0].certificate_not_after is not None


async def test_maint_fleet_is_not_probed(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    from fleet_ingress.core.fleet_spec import Admin

    a, _ = sim_fleets
    ingress = await started(start_ingress, lines(a), fleets={"check_interval": 0.1})
    fleet = ingress.balancer.fleets[0]
    fleet.admin = Admin.MAINT
    await asyncio.sleep(0.15)
    seen = a.health_probes
    await asyncio.sleep(0.5)
    assert a.health_probes == seen
    fleet.admin = Admin.READY
    await eventually(lambda: a.health_probes > seen)


# -- 9. check --body and check --probe -------------------------------------------------

CLI = [sys.executable, "-m", "fleet_ingress"]


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b'{"prev_fleet_available": 0, "fleet_available": 40}', 0, "pass: fleet_available=40"),
        (b'{"fleet_available": 0}', 0, "pass: fleet_available=0"),
        (b'{"fleet_available": "5"}', 1, "fail: key 'fleet_available' not an integer"),
        (b"<html>fleet_available</html>", 1, "fail: body not JSON"),
    ],
)
def test_check_body_agrees_with_the_verdict(tmp_path: Path, body, code, says):
    captured = tmp_path / "health.json"
    captured.write_bytes(body)
    done = subprocess.run([*CLI, "check", "--body", str(captured)], capture_output=True, text=True)
    assert done.returncode == code, done.stdout + done.stderr
    assert says in done.stdout


def test_check_body_with_probe_says_to_give_one(tmp_path: Path):
    captured = tmp_path / "health.json"
    captured.write_bytes(b'{"fleet_available": 1}')
    done = subprocess.run(
        [*CLI, "check", "--body", str(captured), "--probe"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "give one of them" in done.stderr


async def test_check_probe_reports_each_fleet_and_fails_when_one_fails(
    tmp_path: Path, tls_files: TLSFiles, sim_fleets
):
    a, b = sim_fleets
    b.health_status = 503
    (tmp_path / "fleets.txt").write_text("\n".join(lines(a, b)))
    config = tmp_path / "ingress.toml"
    config.write_text(
        f'[listen]\nwss = "127.0.0.1:8443"\nacme = ""\nstats = ""\nadmin_socket = ""\n'
        f'[tls]\ncert = "{tls_files.ingress_cert}"\nkey = "{tls_files.ingress_key}"\n'
        f'ca_file = "{tls_files.ca_pem}"\n'
        f'[fleets]\nca_file = "{tls_files.ca_pem}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        *CLI, "check", "-c", str(config), "--probe", stdout=asyncio.subprocess.PIPE
    )
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 1, out
    assert "probe a  pass: fleet_available=64" in out
    assert "probe b  fail: status 503" in out
    # The count the summary gives is said too, not a bare "1 problem(s)".
    assert out.endswith("1 fleet(s) failed the health probe\ncheck failed: 1 problem(s)\n"), out
    a.health_status = 503  # each failing fleet is a problem (two were counted as one)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "check", "-c", str(config), "--probe", stdout=asyncio.subprocess.PIPE
    )
    out = (await proc.communicate())[0].decode()
    assert out.endswith("2 fleet(s) failed the health probe\ncheck failed: 2 problem(s)\n"), out
    a.health_status = b.health_status = 200
    proc = await asyncio.create_subprocess_exec(
        *CLI, "check", "-c", str(config), "--probe", stdout=asyncio.subprocess.PIPE
    )
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out


async def _served_one_at_a_time(ingress: Ingress, tls_files: TLSFiles, n: int) -> list[str]:
    """The fleet of each of `n` calls made one after the other (each closed
    before the next: a fleet holding no call is the one leastconn favours)."""
    ctx = tls_files.client_context()
    served = []
    for i in range(n):
        async with connect(wss_url(ingress, f"/ws/bot-{i}"), ssl=ctx) as ws:
            served.append(fleet_of(ws))
    return served


async def test_a_fleet_whose_new_connections_fail_while_its_probe_passes_goes_down_by_its_calls(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets, caplog
):
    """The probe's kept-alive connection works, new ones are refused: before,
    the fleet stayed UP and leastconn sent it every call's first attempt (it
    holds no call), each one failing before it was tried elsewhere. Now `fall`
    calls in a row that it refuses take it DOWN at once, its probes open
    new connections while it is DOWN, and it comes back only when they work."""
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    a, b = sim_fleets
    door = TcpDoor(a.port)
    await door.open()
    try:
        # Probes far apart: what takes it DOWN within the test is its calls.
        ingress = await started(
            start_ingress,
            [f"https://localhost:{door.port} name=a", f"{b.url} name=b"],
            fleets={"check_interval": 3.0, "fall": 2, "rise": 1},
        )
        fleet_a = ingress.balancer.get("a")
        assert fleet_a is not None and fleet_a.health is Health.UP
        door.shut()
        assert await _served_one_at_a_time(ingress, tls_files, 6) == ["b"] * 6
        assert fleet_a.health is Health.DOWN
        assert fleet_a.retries == 2  # the two calls that found it shut, and no more
        downs = [
            r.fields  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "fleet DOWN" and r.fields.get("fleet") == "a"  # type: ignore[attr-defined]
        ]
        assert len(downs) == 1 and "2 calls in a row were refused by it" in downs[0]["reason"]

        # Its probes, each on a new connection while it is DOWN, keep it DOWN
        # while the door is shut (the kept connection alone would pass)...
        probes = fleet_a.probes_total
        await eventually(lambda: fleet_a.probes_total >= probes + 1, timeout=8)
        assert fleet_a.health is Health.DOWN and fleet_a.last_probe is not None
        assert not fleet_a.last_probe.passed
        # ...and bring it back once new connections work again.
        await door.open()
        await eventually(lambda: fleet_a.health is Health.UP, timeout=8)
        async with connect(wss_url(ingress, "/ws/after"), ssl=tls_files.client_context()) as ws:
            assert fleet_of(ws) in ("a", "b")
    finally:
        await door.close()


@pytest.mark.uvloop_only
async def test_this_hosts_own_stall_does_not_take_healthy_fleets_down(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets
):
    """This host overloaded (its event loop in 0.6 s stalls, past
    timeouts.connect 0.5 s) while 8 calls connect: their connect timers fire
    before the connections they waited for are seen, and each attempt "fails"
    at healthy fleets. Counted as refusals, they took both fleets DOWN in a
    review's runs (503s to carriers); a timeout now only asks for a probe on
    a new connection, which passes."""
    a, b = sim_fleets
    ingress = await started(
        start_ingress,
        lines(a, b),
        fleets={"check_interval": 5.0, "fall": 2, "rise": 2},
        timeouts={"connect": 0.5},
        # A call may spend its attempts in the stalls on a host busy besides
        # (a CI run beside other work: one call's 4 attempts all timed out, a
        # 503 from its retries, not from a fleet taken DOWN, which is what
        # this checks); more attempts keep the two apart.
        retry={"retries": 8},
    )
    ctx = tls_files.client_context()

    async def hog() -> None:
        for _ in range(8):
            await asyncio.sleep(0.02)
            time.sleep(0.6)  # noqa: ASYNC251 - the point: this host's loop stalls

    async def call(n: int) -> int:
        try:
            async with connect(wss_url(ingress, f"/ws/bot-{n}"), ssl=ctx, open_timeout=30) as ws:
                assert ws.response is not None
                return ws.response.status_code
        except InvalidStatus as exc:
            return exc.response.status_code

    stalls = asyncio.create_task(hog())
    results = await asyncio.gather(*(call(n) for n in range(8)))
    await stalls
    assert {f.name: f.health for f in ingress.balancer.fleets} == {"a": Health.UP, "b": Health.UP}
    assert 503 not in results, results


async def test_a_fleet_whose_renewed_certificate_fails_verification_goes_down_by_its_calls(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """A fleet's certificate renewal gone wrong (a certificate for another
    name) while the probe's kept-alive connection, made before, still passes:
    each call's TLS handshake fails verification, and two in a row take the
    fleet DOWN; its probes, on new connections, keep it DOWN until it serves
    the right certificate again."""
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    context = tls_files.fleet_server_context()
    a = SimulatedFleet(name="a", ssl_context=context, capacity=64)
    b = SimulatedFleet(name="b", ssl_context=tls_files.fleet_server_context(), capacity=64)
    async with a, b:
        ingress = await started(
            start_ingress,
            [f"https://localhost:{a.port} name=a", f"{b.url} name=b"],
            fleets={"check_interval": 0.5, "fall": 2, "rise": 2},
        )
        fleet_a = ingress.balancer.get("a")
        assert fleet_a is not None and fleet_a.health is Health.UP
        tls_files.ca.issue_cert("other.test").configure_cert(context)  # new handshakes only
        assert await _served_one_at_a_time(ingress, tls_files, 6) == ["b"] * 6
        assert fleet_a.health is Health.DOWN and fleet_a.retries == 2
        await eventually(lambda: fleet_a.probes_total >= 3, timeout=5)
        await asyncio.sleep(1.2)  # two more probes, each on a new connection: DOWN
        assert fleet_a.health is Health.DOWN
        assert fleet_a.last_probe is not None and not fleet_a.last_probe.passed
        tls_files.fleet_cert.configure_cert(context)  # the right one again
        await eventually(lambda: fleet_a.health is Health.UP, timeout=8)


async def test_a_probe_this_process_cannot_make_for_want_of_descriptors_is_not_judged(
    tls_files: TLSFiles,
) -> None:
    """The supervisor out of descriptors (a real EMFILE: its soft limit lowered to
    its lowest free descriptor): every fleet's probe on a new connection fails
    at once. Counted, they took every fleet DOWN, and every call on the host got
    503, for this host's own want (the review of session 30); not judged now,
    as a probe starved of CPU is, the reason naming the errno."""

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"fleet_available": 3})

    app = web.Application()
    app.router.add_get("/health/fleet", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        (spec,) = parse_fleets_text(f"http://127.0.0.1:{port} name=m", default_maxconn=16)
        settings = ProbeSettings("/health/fleet", "fleet_available", 1.0, 2.0, 2, 2)
        fleet_ssl = fleet_ssl_context(verify=True, ca_file=tls_files.ca_pem)
        async with health_session(fleet_ssl, settings) as session:
            lowest_free = os.open(os.devnull, os.O_RDONLY)
            os.close(lowest_free)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                wanting = await probe_fleet(session, spec, settings)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            passing = await probe_fleet(session, spec, settings)
        assert not wanting.passed and not wanting.judged, wanting
        assert "out of file descriptors (EMFILE" in wanting.reason, wanting
        assert wanting.describe().startswith("not judged: this process is out of")
        assert passing.passed and passing.capacity == 3
    finally:
        await runner.cleanup()


async def test_a_probe_of_a_fleet_that_requires_a_client_certificate_says_it_may(
    tls_files: TLSFiles,
) -> None:
    """fleet-ingress sends no client certificate. Under TLS 1.3 a fleet that
    requires one alerts after the handshake, which aiohttp reads as a plain
    disconnect: the probe's reason asks the question an operator needs (the TLS
    audit of session 12 saw only 'closed the connection without answering')."""
    server_ctx = tls_files.fleet_server_context()
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=str(tls_files.ca_pem))

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"fleet_available": 3})

    app = web.Application()
    app.router.add_get("/health/fleet", health)  # a bare function: deprecated by aiohttp
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        (spec,) = parse_fleets_text(f"https://127.0.0.1:{port} name=m", default_maxconn=16)
        settings = ProbeSettings("/health/fleet", "fleet_available", 1.0, 2.0, 2, 2)
        fleet_ssl = fleet_ssl_context(verify=True, ca_file=tls_files.ca_pem)
        async with health_session(fleet_ssl, settings) as session:
            result = await probe_fleet(session, spec, settings)
        assert not result.passed
        assert "client certificate" in result.reason, result
    finally:
        await runner.cleanup()


async def test_a_health_body_the_fleet_would_compress_is_asked_for_plain_and_read(
    tls_files: TLSFiles,
) -> None:
    """The probe asked for `Accept-Encoding: gzip, deflate` (aiohttp's default)
    and read the body undecoded (`auto_decompress=False`): a fleet whose server
    honours it (aiohttp's `enable_compression`, nginx's `gzip_types
    application/json`) failed every probe, "body not JSON", and was taken DOWN,
    while `curl` of the same URL showed good JSON (the odd-fleet audit of
    session 35). It asks for the body as it is; one sent encoded all the same
    fails saying so."""
    asked: list[str | None] = []

    async def honours(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding"))
        response = web.json_response({"fleet_available": 5, "workers": ["w"] * 40})
        response.enable_compression()  # as the client's Accept-Encoding allows
        return response

    async def forces(_: web.Request) -> web.Response:
        body = gzip.compress(b'{"fleet_available": 5}')
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    async def empty_encoding(_: web.Request) -> web.Response:
        # An empty header names no coding (RFC 9110 8.4: the body as it is).
        body = b'{"fleet_available": 3}'
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": ""}
        )

    app = web.Application()
    app.router.add_get("/health/fleet", honours)
    app.router.add_get("/forced", forces)
    app.router.add_get("/empty", empty_encoding)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_files.fleet_server_context())
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        (spec,) = parse_fleets_text(f"https://127.0.0.1:{port} name=z", default_maxconn=16)
        fleet_ssl = fleet_ssl_context(verify=True, ca_file=tls_files.ca_pem)
        for path in ("/health/fleet", "/forced", "/empty"):
            settings = ProbeSettings(path, "fleet_available", 1.0, 2.0, 2, 2)
            async with health_session(fleet_ssl, settings) as session:
                result = await probe_fleet(session, spec, settings)
            if path == "/health/fleet":
                assert result.passed and result.capacity == 5, result
                assert asked == ["identity"]
            elif path == "/empty":
                assert result.passed and result.capacity == 3, result
            else:
                assert not result.passed
                assert result.reason == "body sent with Content-Encoding: gzip, not as JSON", result
    finally:
        await runner.cleanup()


async def test_a_fleet_whose_name_stops_resolving_goes_down_by_its_probe_on_a_new_connection(
    start_ingress: StartIngress, tls_files: TLSFiles, sim_fleets, monkeypatch
):
    """A fleet given by name whose name stops resolving (its DNS record gone, or
    this host's resolver failing): every call failed at once while the probe,
    on its kept-alive connection, said UP for up to its renewal (the DNS audit
    of session 21). A call's failed lookup now asks the probe for a new
    connection, which resolves the name anew: the fleet goes DOWN naming why.
    The failure is injected through socket.getaddrinfo, which asyncio's loop
    (calls and aiohttp's probes alike) uses; uvloop's libuv cannot be patched."""
    if isinstance(asyncio.get_running_loop(), uvloop.Loop):
        pytest.skip("name resolution is injected through socket.getaddrinfo (asyncio's)")
    a, _ = sim_fleets
    ingress = await started(
        start_ingress,
        [f"https://localhost:{a.port} name=a"],
        fleets={"check_interval": 0.3, "fall": 2, "rise": 2},
    )
    fleet_a = ingress.balancer.get("a")
    assert fleet_a is not None and fleet_a.health is Health.UP
    real = socket.getaddrinfo

    def nxdomain(host, *args, **kwargs):
        if host == "localhost":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", nxdomain)
    with pytest.raises(InvalidStatus) as refused:
        await connect(wss_url(ingress, "/ws/one"), ssl=tls_files.client_context())
    assert refused.value.response.status_code == 503
    await eventually(lambda: fleet_a.health is Health.DOWN, timeout=5)
    assert fleet_a.last_probe is not None
    assert fleet_a.last_probe.reason.startswith("name localhost does not resolve:")


async def test_a_refused_probe_reads_the_same_on_either_loop(tls_files: TLSFiles) -> None:
    """`check --probe` (asyncio's loop) said "refused: Connect call failed
    ('127.0.0.1', PORT)" where stat (uvloop) said "refused: Connection refused"
    of the same fleet (the CLI audit of session 32)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        (spec,) = parse_fleets_text(f"https://127.0.0.1:{port} name=r", default_maxconn=16)
        settings = ProbeSettings("/health/fleet", "fleet_available", 1.0, 2.0, 2, 2)
        fleet_ssl = fleet_ssl_context(verify=True, ca_file=tls_files.ca_pem)
        async with health_session(fleet_ssl, settings) as session:
            result = await probe_fleet(session, spec, settings)
    assert result.reason == "refused: Connection refused", result


async def test_a_refused_probe_of_a_name_says_the_error_is_its_last_addresss(
    tls_files: TLSFiles,
) -> None:
    """aiohttp tries every address of a fleet's name and raises the last one's
    error: "connect failed: Network is unreachable" (an address with no route)
    read as the fleet's whole answer while another address refused (seen with
    a name of two addresses in a network namespace; the CLI text audit)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        (spec,) = parse_fleets_text(f"https://localhost:{port} name=r", default_maxconn=16)
        settings = ProbeSettings("/health/fleet", "fleet_available", 1.0, 2.0, 2, 2)
        fleet_ssl = fleet_ssl_context(verify=True, ca_file=tls_files.ca_pem)
        async with health_session(fleet_ssl, settings) as session:
            result = await probe_fleet(session, spec, settings)
    assert result.reason is not None and result.reason.endswith(
        ": Connection refused (at the last address of localhost tried; "
        "`getent ahosts localhost` lists them)"
    ), result
