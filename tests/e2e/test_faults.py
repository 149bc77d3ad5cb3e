"""Faults around a running ingress (issue #7, "Faults"): fleets killed, stalled,
frozen and flapping, and TLS broken mid-stream, with real processes, real
signals and real sockets on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleet_ingress.core.health import Health
from fleet_ingress.core.probe import ProbeResult
from fleet_ingress.net.proxy import GOODBYE_BOUNDARY_WAIT
from fleet_ingress.service.ingress import Ingress
from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    SWITCHING,
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    WsFleet,
    access_entries,
    eventually,
    never_answer,
    read_head,
    switching_then,
    wss_url,
)

# A TLS application-data record whose MAC cannot check out: whoever reads it
# gets an SSL error ("bad record mac"), not bytes.
TLS_JUNK = b"\x17\x03\x03\x00\x40" + bytes(range(64))


async def open_carrier(ingress: Ingress, tls_files: TLSFiles, bot: str = "bot"):
    """A raw TLS carrier with its upgrade sent and the fleet's 101 read."""
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    writer.write(UPGRADE.format(path=f"/ws/{bot}").encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def wait_closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Read until the other end closes (EOF, reset or a TLS alert); what came first."""
    got = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(65536):
                got += chunk
        except (OSError, ssl.SSLError):
            pass
    return bytes(got)


# -- fleets in child processes, to be killed and frozen ---------------------------------

_CHILD_FLEET = """
import asyncio, ssl, sys
from fleet_ingress.sim import SimulatedFleet

async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    fleet = SimulatedFleet(name=sys.argv[3], ssl_context=ctx, capacity=64)
    await fleet.start()
    print(fleet.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@dataclass
class ChildFleet:
    proc: asyncio.subprocess.Process
    name: str
    port: int

    @property
    def line(self) -> str:
        return f"https://127.0.0.1:{self.port} name={self.name}"


@asynccontextmanager
async def child_fleet(tls_files: TLSFiles, tmp_path: Path, name: str) -> AsyncIterator[ChildFleet]:
    """A SimulatedFleet in its own process; always continued and killed at the end."""
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in tls_files.fleet_cert.cert_chain_pems))
    tls_files.fleet_cert.private_key_pem.write_to_path(key)
    stderr = os.open(tmp_path / f"{name}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD_FLEET,
            str(cert),
            str(key),
            name,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    finally:
        os.close(stderr)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = await proc.stdout.readline()
        assert line.strip().isdigit(), (tmp_path / f"{name}.stderr").read_text()
        yield ChildFleet(proc, name, int(line))
    finally:
        if proc.returncode is None:
            with suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        async with asyncio.timeout(10):
            await proc.wait()


# -- 1. fleet process killed mid-call ---------------------------------------------------


async def test_fleet_killed_mid_call_closes_the_carrier_within_1s(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    loop = asyncio.get_running_loop()
    async with child_fleet(tls_files, tmp_path, "doomed") as child:
        ingress = await start_ingress([child.line])
        ws = await connect(wss_url(ingress, "/ws/killed"), ssl=tls_files.client_context())
        frames = 0

        async def stream() -> None:
            nonlocal frames
            while True:
                await ws.send(b"frame-%d" % frames)
                assert await ws.recv() == b"frame-%d" % frames
                frames += 1
                await asyncio.sleep(0.02)

        streamer = asyncio.create_task(stream())
        await eventually(lambda: frames >= 10)
        fleet = ingress.balancer.fleets[0]
        assert fleet.active == 1
        killed_at = loop.time()
        child.proc.kill()  # SIGKILL: no close frame, no TLS close_notify
        done, _ = await asyncio.wait({streamer}, timeout=1.0)
        closed_after = loop.time() - killed_at
        if not done:
            streamer.cancel()
        assert done, "the carrier was still open 1 s after its fleet was killed"
        assert isinstance(streamer.exception(), ConnectionClosed), streamer.exception()
        assert closed_after < 1.0
    await eventually(lambda: fleet.active == 0 and not ingress.registry.calls, timeout=2)
    (entry,) = access_entries(caplog)
    assert entry["fleet"] == "doomed" and entry["status"] == 101 and entry["bot_id"] == "killed"
    # The fleet vanished without a WebSocket close: "fleet closed" (FIN) or
    # "fleet_reset" (RST), never the carrier's doing, never unknown.
    assert entry["end_reason"] in ("fleet closed", "fleet_reset"), entry
    assert entry["bytes_to_carrier"] > 0
    print(f"carrier closed {closed_after * 1000:.0f} ms after SIGKILL; {entry['end_reason']}")


# -- 2. fleet accepts and never answers: response-timeout, then another fleet -----------


async def test_a_carrier_that_resets_mid_call_is_logged_as_its_reset_not_an_error(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    """A carrier's TCP reset is the carrier's doing: `carrier_reset`, and the
    fleet side is closed, its slot back."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    good = await WsFleet(tls_files.fleet_server_context()).start()
    try:
        ingress = await start_ingress([good.line("good")])
        _, writer = await open_carrier(ingress, tls_files, "abrupt")
        fleet = ingress.balancer.fleets[0]
        await eventually(lambda: fleet.active == 1 and good.active == 1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # SO_LINGER 0: an RST, no TLS close, no FIN
        await eventually(lambda: fleet.active == 0 and good.active == 0, timeout=3)
        await eventually(lambda: bool(access_entries(caplog)))
        (entry,) = access_entries(caplog)
        assert (entry["fleet"], entry["status"]) == ("good", 101)
        assert entry["end_reason"] == "carrier_reset", entry
        assert ingress.registry.ended[("good", "carrier_reset")] == 1
    finally:
        await good.stop()


def _last_frames_and_reset(port: int, ctx: ssl.SSLContext, frames: int = 1) -> bytes:
    """A carrier (blocking TLS) that sends its upgrade, reads the 101, then
    its last frames (56 bytes each, a TLS record each, corked into one TCP
    segment) and at once a TCP reset: all reach the ingress together."""
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    ) as tls:
        tls.sendall(UPGRADE.format(path="/ws/bot").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(4096)
        mask, payload = b"\x01\x02\x03\x04", b"audio" * 10
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        for _ in range(frames):
            tls.sendall(b"\x82" + bytes([0x80 | len(payload)]) + mask + masked)
        tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return head


@pytest.mark.parametrize("frames", [1, 6])
async def test_a_carrier_whose_last_frame_and_reset_arrive_together_is_ended_by_its_reset(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog, frames: int
):
    """uvloop stops polling a socket after an error event (libuv's POLLERR),
    calling its reader once more: a frame and the reset that came with it
    were read as the frame alone, and nothing was read again. The call, its
    fleet slot and its bot (silent, listening) were held until
    carrier_silence, and logged `carrier_silent` (30 s at the default; the
    odd-fleet audit of session 35). asyncio's loop saw the reset at once.
    Six frames, six TLS records: the sweep read one a pass, the carrier never
    silent, and the call was held six passes (12.5 s here; the review of
    session 35)."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")

    async def listening(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # a bot that says nothing while the caller talks

    fleet = await RawFleet(tls_files.fleet_server_context(), switching_then(listening)).start()
    try:
        ingress = await start_ingress([fleet.line("quiet")], timeouts={"carrier_silence": 8})
        port = ingress.wss_address[1]
        head = await asyncio.to_thread(
            _last_frames_and_reset, port, tls_files.client_context(), frames
        )
        assert head.startswith(b"HTTP/1.1 101 "), head
        await eventually(lambda: bool(access_entries(caplog)), timeout=12)
        (entry,) = access_entries(caplog)
        assert entry["end_reason"] == "carrier_reset", entry
        assert entry["bytes_from_carrier"] == 56 * frames and entry["duration_s"] < 5, entry
    finally:
        await fleet.stop()


async def test_fleet_stalling_before_its_answer_times_out_and_the_call_lands_elsewhere(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    silent = await RawFleet(tls_files.fleet_server_context(), never_answer).start()
    good = await WsFleet(tls_files.fleet_server_context()).start()
    try:
        # Round-robin starts on the first fleet listed: the silent one.
        ingress = await start_ingress(
            [silent.line("silent"), good.line("good")], timeouts={"response": 0.3}
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with connect(wss_url(ingress, "/ws/patient"), ssl=tls_files.client_context()) as ws:
            handshake = loop.time() - started
            await ws.send("still a call")
            assert await ws.recv() == "still a call"
        assert silent.connections == 1 and len(good.requests) == 1
        assert 0.3 <= handshake < 1.5, handshake
        stalled = ingress.balancer.get("silent")
        assert stalled is not None
        assert (stalled.retries, stalled.redispatches, stalled.active) == (1, 1, 0)
        warnings = [
            r.fields  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == "fleet_ingress.proxy" and r.getMessage() == "fleet attempt failed"
        ]
        assert [(w["fleet"], w["failure"]) for w in warnings] == [("silent", "response-timeout")]
        await eventually(lambda: bool(access_entries(caplog)))
        (entry,) = access_entries(caplog)
        assert (entry["fleet"], entry["attempts"], entry["status"]) == ("good", 2, 101)
    finally:
        await silent.stop()
        await good.stop()


# -- 3. fleet stalls mid-call: the tunnel idle timeout ----------------------------------


async def test_fleet_stalling_mid_call_is_closed_by_the_tunnel_idle_timeout(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")

    async def echo_once_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await read_head(reader)
        writer.write(SWITCHING)
        writer.write(await reader.read(100))  # one echo: the call is up
        await writer.drain()
        await asyncio.sleep(3600)  # then neither reads nor writes, socket kept

    fleet = await RawFleet(tls_files.fleet_server_context(), echo_once_then_stall).start()
    tunnel = 1.0
    try:
        ingress = await start_ingress([fleet.line("stuck")], timeouts={"tunnel": tunnel})
        reader, writer = await open_carrier(ingress, tls_files, "stalled")
        writer.write(b"hello?")
        assert await reader.readexactly(6) == b"hello?"
        loop = asyncio.get_running_loop()
        last_byte = loop.time()
        assert await wait_closed_by_peer(reader, timeout=tunnel * 3) == b""
        idle = loop.time() - last_byte
        writer.close()
        # "hello?" is no WebSocket frame: its first two bytes read as the header of
        # a 101-byte frame that never ends, so the ingress waits
        # GOODBYE_BOUNDARY_WAIT for a frame boundary before it closes (until
        # 6a96f05 the tracker took 'h', 0x68, for a close frame's first byte,
        # and closed at once).
        assert tunnel * 0.95 <= idle <= tunnel * 1.25 + GOODBYE_BOUNDARY_WAIT + 0.3, idle
        await eventually(lambda: not ingress.registry.calls)
        # Logged as the timeout ended it; its slot back once the fleet's side closed.
        await eventually(lambda: ingress.balancer.fleets[0].active == 0)
        (entry,) = access_entries(caplog)
        assert entry["end_reason"] == "timeout" and entry["status"] == 101
        print(f"idle tunnel closed {idle:.2f} s after its last byte (timeouts.tunnel={tunnel})")
    finally:
        await fleet.stop()


# -- 4. fleet frozen with SIGSTOP: DOWN, calls elsewhere, back UP after SIGCONT ----------


async def test_frozen_fleet_goes_down_calls_go_elsewhere_and_it_returns_after_sigcont(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path
):
    interval, timeout, fall, rise = 0.3, 0.2, 2, 2
    b = SimulatedFleet(name="b", ssl_context=tls_files.fleet_server_context(), capacity=64)
    calls: list[ClientConnection] = []
    async with b, child_fleet(tls_files, tmp_path, "a") as a:
        ingress = await start_ingress(
            [a.line, f"{b.url} name=b"],
            health_checks=True,
            fleets={
                "check_interval": interval,
                "check_timeout": timeout,
                "fall": fall,
                "rise": rise,
            },
        )
        assert ingress.poller is not None
        assert await ingress.poller.wait_first_probes(timeout=5)
        fleet_a = ingress.balancer.get("a")
        assert fleet_a is not None and fleet_a.health is Health.UP
        try:
            a.proc.send_signal(signal.SIGSTOP)
            went_down = await eventually(lambda: fleet_a.health is Health.DOWN, timeout=5)
            assert went_down <= fall * interval + timeout + 0.3, went_down
            assert fleet_a.last_probe is not None
            assert fleet_a.last_probe.reason == f"timeout after {timeout:g}s"

            ctx = tls_files.client_context()
            for n in range(4):
                ws = await connect(wss_url(ingress, f"/ws/while-frozen-{n}"), ssl=ctx)
                calls.append(ws)
                assert ws.response is not None and ws.response.headers["X-Fleet"] == "b"
                await ws.send(b"x")
                assert await ws.recv() == b"x"
            assert fleet_a.active == 0

            a.proc.send_signal(signal.SIGCONT)
            came_back = await eventually(lambda: fleet_a.health is Health.UP, timeout=5)
            assert came_back <= rise * interval + timeout + 0.5, came_back
            # leastconn: a has no call, b has four.
            ws = await connect(wss_url(ingress, "/ws/after-thaw"), ssl=ctx)
            calls.append(ws)
            assert ws.response is not None and ws.response.headers["X-Fleet"] == "a"
            await ws.send(b"y")
            assert await ws.recv() == b"y"
            print(f"frozen fleet DOWN after {went_down:.2f} s, UP {came_back:.2f} s after SIGCONT")
        finally:
            with suppress(ProcessLookupError):
                a.proc.send_signal(signal.SIGCONT)
            for ws in calls:
                await ws.close()


# -- 5. a health endpoint failing every other probe never goes DOWN with fall 2 ---------


async def test_health_failing_every_other_probe_never_goes_down_with_fall_2(
    start_ingress: StartIngress, tls_files: TLSFiles
):
    answers = 0
    always_fail = False

    async def health(request: web.Request) -> web.StreamResponse:
        nonlocal answers
        answers += 1
        if answers % 2 == 1 and not always_fail:
            return web.json_response({"status": "ok", "fleet_available": 5})
        kind = (answers // 2) % 4  # vary how it fails
        if kind == 0:
            return web.json_response({"fleet_available": 5}, status=503)
        if kind == 1:
            return web.Response(body=b"<html>oops</html>", content_type="text/html")
        if kind == 2:
            return web.json_response({"prev_fleet_available": 5})
        await asyncio.sleep(2)  # well past check_timeout
        return web.json_response({"fleet_available": 5})

    app = web.Application()
    app.router.add_get("/health/fleet", health)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_files.fleet_server_context())
    await site.start()
    port = runner.addresses[0][1]
    try:
        ingress = await start_ingress(
            [f"https://127.0.0.1:{port} name=flappy"],
            health_checks=True,
            # The fleet answers from this test's own event loop: a passing probe
            # must not time out for a stall of it (two failures in a row).
            fleets={"check_interval": 0.05, "check_timeout": 0.5, "fall": 2, "rise": 2},
        )
        poller = ingress.poller
        assert poller is not None
        fleet = ingress.balancer.fleets[0]
        seen: list[tuple[bool, Health]] = []
        record = poller.record

        def observed(f: Any, result: ProbeResult, opened: int, seconds: float, **kw: Any) -> None:
            record(f, result, opened, seconds, **kw)
            seen.append((result.passed, f.health))

        poller.record = observed  # type: ignore[method-assign]
        await eventually(lambda: len(seen) >= 14, timeout=10)
        first = seen[:14]
        assert [passed for passed, _ in first] == [True, False] * 7
        assert {health for _, health in first} == {Health.UP}
        assert fleet.check_failures >= 7
        # Control: two failures in a row do take it DOWN, so the failures above counted.
        always_fail = True
        mark = len(seen)
        await eventually(lambda: fleet.health is Health.DOWN, timeout=5)
        assert len(seen) - mark <= 3  # at most one probe in flight, then fall = 2
    finally:
        await runner.cleanup()


# -- 6. TLS errors mid-stream close that call only ---------------------------------------


def _raw_write(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Bypass TLS: write straight on the TCP socket under the TLS transport."""
    sock = writer.get_extra_info("socket")
    assert sock is not None
    assert os.write(sock.fileno(), data) == len(data)


async def _stream(reader, writer, counter: list[int]) -> None:
    """Echoed frames every 10 ms, until cancelled or the tunnel breaks."""
    while True:
        frame = b"audio-%08d" % counter[0]
        writer.write(frame)
        assert await reader.readexactly(len(frame)) == frame
        counter[0] += 1
        await asyncio.sleep(0.01)


async def _echo_tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _survivor_keeps_streaming(survivor: asyncio.Task[None], counter: list[int]) -> None:
    before = counter[0]
    await asyncio.sleep(0.5)
    assert not survivor.done(), survivor.exception() if survivor.done() else None
    assert counter[0] - before >= 10, f"the other call stalled: {counter[0] - before} frames"


async def test_tls_junk_from_a_carrier_closes_that_call_only(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCHING)
        await _echo_tunnel(reader, writer)

    fleet = await RawFleet(tls_files.fleet_server_context(), echo).start()
    survivor: asyncio.Task[None] | None = None
    try:
        ingress = await start_ingress([fleet.line("f")])
        good_reader, good_writer = await open_carrier(ingress, tls_files, "good")
        counter = [0]
        survivor = asyncio.create_task(_stream(good_reader, good_writer, counter))
        bad_reader, bad_writer = await open_carrier(ingress, tls_files, "junk")
        bad_writer.write(b"first frame")
        assert await bad_reader.readexactly(11) == b"first frame"
        await eventually(lambda: counter[0] >= 5)
        loop = asyncio.get_running_loop()
        junk_at = loop.time()
        _raw_write(bad_writer, TLS_JUNK)
        await wait_closed_by_peer(bad_reader, timeout=1.0)
        closed_after = loop.time() - junk_at
        bad_writer.close()
        await eventually(lambda: len(ingress.registry.calls) == 1, timeout=1)
        assert ingress.balancer.fleets[0].active == 1
        await _survivor_keeps_streaming(survivor, counter)
        good_writer.close()
        junk_entries = [e for e in access_entries(caplog) if e["bot_id"] == "junk"]
        assert [e["end_reason"] for e in junk_entries] == ["error"]
        # What failed is said (OpenSSL's reason was lost; the TLS audit of session 20).
        assert junk_entries[0]["detail"].startswith("carrier: [SSL: "), junk_entries
        print(f"carrier TLS junk: that call closed in {closed_after * 1000:.0f} ms")
    finally:
        if survivor is not None:
            survivor.cancel()
            await asyncio.gather(survivor, return_exceptions=True)
        await fleet.stop()


async def test_tls_junk_from_a_fleet_closes_that_call_only(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog
):
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    loop = asyncio.get_running_loop()
    send_junk = asyncio.Event()
    junk_sent = loop.create_future()

    async def echo_or_junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        writer.write(SWITCHING)
        if b" /ws/junk " not in head:
            await _echo_tunnel(reader, writer)
            return
        writer.write(await reader.read(100))
        await writer.drain()
        await send_junk.wait()
        _raw_write(writer, TLS_JUNK)  # then keep the socket: the ingress must see the error
        junk_sent.set_result(loop.time())
        await asyncio.sleep(3600)

    fleet = await RawFleet(tls_files.fleet_server_context(), echo_or_junk).start()
    survivor: asyncio.Task[None] | None = None
    try:
        ingress = await start_ingress([fleet.line("f")])
        good_reader, good_writer = await open_carrier(ingress, tls_files, "good")
        counter = [0]
        survivor = asyncio.create_task(_stream(good_reader, good_writer, counter))
        bad_reader, bad_writer = await open_carrier(ingress, tls_files, "junk")
        await eventually(lambda: counter[0] >= 5)
        bad_writer.write(b"first frame")
        assert await bad_reader.readexactly(11) == b"first frame"
        send_junk.set()
        async with asyncio.timeout(1):
            junk_at = await junk_sent
        await wait_closed_by_peer(bad_reader, timeout=1.0)
        closed_after = loop.time() - junk_at
        bad_writer.close()
        await eventually(lambda: len(ingress.registry.calls) == 1, timeout=1)
        assert ingress.balancer.fleets[0].active == 1
        await _survivor_keeps_streaming(survivor, counter)
        good_writer.close()
        junk_entries = [e for e in access_entries(caplog) if e["bot_id"] == "junk"]
        assert [e["end_reason"] for e in junk_entries] == ["error"]
        # What failed is said (OpenSSL's reason was lost; the TLS audit of session 20).
        assert junk_entries[0]["detail"].startswith("fleet: [SSL: "), junk_entries
        print(f"fleet TLS junk: that call closed in {closed_after * 1000:.0f} ms")
    finally:
        if survivor is not None:
            survivor.cancel()
            await asyncio.gather(survivor, return_exceptions=True)
        await fleet.stop()
