"""Dead peers on loopback (issue #16, must-show 3 and 4): a carrier that stays
connected but stops sending is ended at `timeouts.carrier_silence`; a call whose
bot is silent for longer than that while the carrier streams is not; the TCP
liveness options are on both sides' sockets. Real TLS both sides, real sockets.
The link-down cases need network namespaces: `test_dead_peers_netns.py`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fleet_ingress.net.liveness import TCP_RTO_MAX_MS
from fleet_ingress.service.ingress import Ingress
from tests.support import (
    SWITCHING,
    UPGRADE,
    RawFleet,
    StartIngress,
    TLSFiles,
    access_entries,
    eventually,
    read_head,
    upgrade_on,
)

FRAME = b"a" * 160  # stands for a 20 ms media frame (the ingress never parses frames)


async def carrier(ingress: Ingress, tls_files: TLSFiles, path: str = "/ws/bot"):
    """A raw TLS carrier with its upgrade sent (the 101 not yet read)."""
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    writer.write(UPGRADE.format(path=path).encode())
    return reader, writer


async def switched(reader: asyncio.StreamReader, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head


class Bot:
    """A fleet connection's behaviour after its 101: talks (`talking`) or thinks,
    swallows what the carrier sends, and notes when the ingress closed it."""

    def __init__(self, *, talking: bool = True) -> None:
        self.talking = talking
        self.received = 0
        self.closed_at: list[float] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCHING)
        talk = asyncio.get_running_loop().create_task(self._talk(writer))
        try:
            while data := await reader.read(65536):
                self.received += len(data)
        finally:
            self.closed_at.append(time.monotonic())
            talk.cancel()

    async def _talk(self, writer: asyncio.StreamWriter) -> None:
        while True:
            if self.talking:
                writer.write(FRAME)
            await asyncio.sleep(0.02)


async def stream(writer: asyncio.StreamWriter, seconds: float) -> float:
    """Send a frame every 20 ms for `seconds`; when the last one went."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        writer.write(FRAME)
        await asyncio.sleep(0.02)
    return time.monotonic()


async def drain(reader: asyncio.StreamReader) -> bytes:
    """Read until the ingress closes; the last read (b"" for a clean close)."""
    try:
        while data := await reader.read(65536):
            pass
        return data
    except (ConnectionError, OSError) as exc:
        return repr(exc).encode()


# -- 3. a carrier that stays connected but stops sending -----------------------------


@pytest.mark.timeout(30)
async def test_silent_carrier_is_ended_and_its_slot_goes_to_the_queued_call(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    silence = 0.5
    bot = Bot(talking=True)  # the bot keeps talking: the tunnel is not idle
    fleet = await RawFleet(tls_files.fleet_server_context(), bot).start()
    try:
        ingress = await start_ingress(
            [fleet.line("a", "maxconn=1")],
            timeouts={"carrier_silence": silence, "queue": 10},
        )
        reader, writer = await carrier(ingress, tls_files)
        await switched(reader)
        reading = asyncio.get_running_loop().create_task(drain(reader))
        last_frame = await stream(writer, 0.3)
        # A second call waits in the queue for the one slot.
        queued_reader, queued_writer = await carrier(ingress, tls_files, "/ws/next")
        await eventually(lambda: ingress.dispatcher.queue_length == 1)

        # The first carrier now sends nothing, but stays connected and reads.
        await switched(queued_reader, timeout=silence * 4)
        given_slot = time.monotonic() - last_frame
        await eventually(lambda: bool(bot.closed_at), timeout=2)
        assert bot.closed_at[0] - last_frame >= silence
        async with asyncio.timeout(2):
            await reading  # the silent carrier is disconnected too
        await eventually(lambda: len(access_entries(caplog)) == 1)
        [entry] = access_entries(caplog)
        assert (entry["end_reason"], entry["fleet"], entry["bot_id"]) == (
            "carrier_silent",
            "a",
            "bot",
        )
        assert ingress.registry.ended[("a", "carrier_silent")] == 1
        metrics = generate_latest(ingress.metrics.prometheus).decode()
        assert 'fleet_ingress_calls_ended_total{fleet="a",reason="carrier_silent"} 1.0' in metrics
        print(f"silent carrier ended; queued call in {given_slot:.2f} s after the last frame")
        queued_writer.close()
        writer.close()
    finally:
        await fleet.stop()


@pytest.mark.timeout(30)
async def test_a_silence_check_that_raises_for_one_call_leaves_the_sweep_watching(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one call's silence check: that call is kept and said once, the
    other silent call is still ended, and the sweep goes on (once the check
    works again, the first is ended too). Before, the exception ended the pass
    and the sweep with it: no silent carrier on that worker was ever ended."""
    silence = 0.4
    fleet = await RawFleet(tls_files.fleet_server_context(), Bot(talking=True)).start()
    carriers: list[tuple[asyncio.Task[bytes], asyncio.StreamWriter]] = []
    try:
        ingress = await start_ingress(
            [fleet.line("a", "maxconn=4")], timeouts={"carrier_silence": silence}
        )
        for path in ("/ws/one", "/ws/two"):
            reader, writer = await carrier(ingress, tls_files, path)
            await switched(reader)
            carriers.append((asyncio.get_running_loop().create_task(drain(reader)), writer))
        await eventually(lambda: len(ingress.registry.calls) == 2)
        broken = next(c for c in ingress.registry.calls if c.bot_id == "one")

        def raising(now: float, stalled: float = 0.0) -> None:
            raise RuntimeError("a bug in the silence check")

        broken.check_silence = raising  # type: ignore[method-assign]
        # Both carriers silent from now: "two" is ended, "one" is kept.
        async with asyncio.timeout(silence * 5):
            await carriers[1][0]
        assert broken in ingress.registry.calls and not carriers[0][0].done()
        await asyncio.sleep(silence * 2)  # more passes: said once
        said = [r for r in caplog.records if "silence check failed" in r.getMessage()]
        assert len(said) == 1 and said[0].fields["call_id"] == broken.id  # type: ignore[attr-defined]
        assert said[0].exc_info is not None
        assert str(said[0].exc_info[1]) == "a bug in the silence check"
        del broken.check_silence  # the check works again: the next pass ends it
        async with asyncio.timeout(silence * 5):
            await carriers[0][0]
    finally:
        for reading, writer in carriers:
            reading.cancel()
            writer.close()
        await fleet.stop()


# -- 4. the bot thinking: long silence from the fleet while the carrier streams ------


@pytest.mark.timeout(30)
async def test_a_bot_thinking_longer_than_carrier_silence_is_not_ended(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    silence = 0.3
    bot = Bot(talking=False)
    fleet = await RawFleet(tls_files.fleet_server_context(), bot).start()
    try:
        ingress = await start_ingress(
            [fleet.line("a")], timeouts={"carrier_silence": silence, "tunnel": 60}
        )
        reader, writer = await carrier(ingress, tls_files)
        await switched(reader)
        await stream(writer, silence * 5)  # the bot says nothing all this time
        bot.talking = True
        async with asyncio.timeout(2):
            assert await reader.readexactly(len(FRAME)) == FRAME  # ... and then answers
        await stream(writer, silence * 2)
        assert not bot.closed_at and len(ingress.registry.tunnels()) == 1
        assert access_entries(caplog) == []
        writer.close()
        await eventually(lambda: len(access_entries(caplog)) == 1)
        assert access_entries(caplog)[0]["end_reason"] == "carrier closed"
    finally:
        await fleet.stop()


@pytest.mark.timeout(30)
async def test_fleet_silence_when_set_and_per_route_overrides(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """fleet_silence ends a call whose fleet says nothing; routes.carrier_silence
    turns the carrier's check off on one route while it stays on elsewhere."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    bot = Bot(talking=False)
    fleet = await RawFleet(tls_files.fleet_server_context(), bot).start()
    try:
        ingress = await start_ingress(
            [fleet.line("a")],
            timeouts={"carrier_silence": 0.4, "fleet_silence": 0.4},
            routes={"carrier_silence": {"/exotel/": 0}, "fleet_silence": {"/exotel/": 0}},
        )
        ws_reader, ws_writer = await carrier(ingress, tls_files, "/ws/streaming")
        ex_reader, ex_writer = await carrier(ingress, tls_files, "/exotel/quiet")
        await switched(ws_reader)
        await switched(ex_reader)
        await stream(ws_writer, 1.5)  # the /ws/ carrier streams; its bot never answers
        await eventually(lambda: len(access_entries(caplog)) == 1)
        [entry] = access_entries(caplog)
        assert (entry["bot_id"], entry["end_reason"]) == ("streaming", "fleet_silent")
        # The /exotel/ call, silent both ways, is left to timeouts.tunnel.
        assert [c.bot_id for c in ingress.registry.tunnels()] == ["quiet"]
        ws_writer.close()
        ex_writer.close()
    finally:
        await fleet.stop()


@pytest.mark.timeout(30)
async def test_a_reloads_silence_limits_apply_to_the_calls_already_up(
    start_ingress: StartIngress,
    tls_files: TLSFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The long-call audit of session 22: carrier_silence turned off by a reload
    (carriers holding without media) still ended the calls up before it, at the
    limit each call started with. Turned on again, it is for new calls only: a
    reload never ends a call (SPEC 11)."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    bot = Bot(talking=True)
    fleet = await RawFleet(tls_files.fleet_server_context(), bot).start()
    try:
        fleets_file = tmp_path / "fleets.txt"
        fleets_file.write_text(fleet.line("a") + "\n")
        ingress = await start_ingress(
            [fleet.line("a")], timeouts={"carrier_silence": 0.4}, fleets={"file": str(fleets_file)}
        )
        strict = ingress.config
        relaxed = strict.model_copy(
            update={"timeouts": strict.timeouts.model_copy(update={"carrier_silence": 0.0})}
        )
        reader, writer = await carrier(ingress, tls_files)
        await switched(reader)
        reading = asyncio.get_running_loop().create_task(drain(reader))
        await stream(writer, 0.2)
        # A carrier connected before the reload, its request after (a call still
        # connecting at the reload): its connection's limits are the old ones.
        host, port = ingress.wss_address
        early_reader, early_writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        await ingress.reload(tmp_path / "not-read.toml", config=relaxed)
        early_writer.write(UPGRADE.format(path="/ws/early").encode())
        await switched(early_reader)
        early = asyncio.get_running_loop().create_task(drain(early_reader))
        await asyncio.sleep(1.2)  # the carriers say nothing: 3 times the limit they started with
        assert len(ingress.registry.tunnels()) == 2 and not bot.closed_at
        await ingress.reload(tmp_path / "not-read.toml", config=strict)
        await asyncio.sleep(1.0)
        assert len(ingress.registry.tunnels()) == 2 and access_entries(caplog) == []
        # A call after it has the strict limit.
        later_reader, later_writer = await carrier(ingress, tls_files, "/ws/later")
        await switched(later_reader)
        later = asyncio.get_running_loop().create_task(drain(later_reader))
        await eventually(lambda: len(access_entries(caplog)) == 1, timeout=3)
        assert [(e["bot_id"], e["end_reason"]) for e in access_entries(caplog)] == [
            ("later", "carrier_silent")
        ]
        async with asyncio.timeout(2):
            await later
        writer.close()
        later_writer.close()
        early_writer.close()
        async with asyncio.timeout(2):
            await reading
            await early
    finally:
        await fleet.stop()


@pytest.mark.timeout(30)
async def test_tcp_liveness_options_are_set_on_both_sides(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    fleet = await RawFleet(tls_files.fleet_server_context(), Bot(talking=False)).start()
    try:
        ingress = await start_ingress(
            [fleet.line("a")], timeouts={"tcp_user_timeout": 7.5, "keepalive_idle": 4}
        )
        reader, writer = await carrier(ingress, tls_files)
        await switched(reader)
        [call] = ingress.registry.tunnels()
        assert call.fleet_side is not None
        for side in (call.carrier, call.fleet_side):
            sock = side.transport.get_extra_info("socket")  # type: ignore[attr-defined]
            opts = (
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            )
            # The kernel's user timeout is a second past the ingress's own (8.5 s).
            # TCP_KEEPCNT left as the kernel has it: the user timeout ends keepalive
            # (tests/e2e/test_listener_options.py).
            with socket.socket() as fresh:
                kernels_count = fresh.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert opts == (8500, 1, 4, 5, kernels_count), type(side).__name__
            try:  # retransmissions at most 2 s apart (Linux 6.15 and later)
                rto_max = sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS)
            except OSError:
                continue
            assert rto_max == 2000, type(side).__name__
        writer.close()
    finally:
        await fleet.stop()


class Streaming(Bot):
    """A bot that talks as fast as the ingress takes it (64 KiB a write)."""

    async def _talk(self, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(b"b" * 65536)
            await writer.drain()


def _carrier_that_stops_reading(address: tuple[str, int], ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A blocking TLS carrier: upgraded, its 101 read, and then never read again
    (a small receive buffer: its window closes soon)."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(5)
    raw.connect(address)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    head = upgrade_on(tls, "/ws/stuck")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return tls


@pytest.mark.timeout(30)
async def test_a_carrier_that_stops_reading_is_said_to_have_stopped_reading(
    start_ingress: StartIngress, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A carrier alive and streaming its audio that no longer reads (a stuck
    reader thread) while the bot talks: its window closes on the bot's bytes and
    the user timeout ends the call as `carrier_lost`, as for a carrier gone. The
    access line says which (the lossy-link audit of session 32: `detail` was
    null, the same line as a vanished carrier's, and sent the operator to the
    network rather than to the carrier's client).

    Its frames go every 0.5 s, not every 20 ms: with a frame every 20 ms and a
    1 s user timeout, about one run in five on a loaded host kept the call up
    until the carrier stopped sending (20 s), the kernel never giving the
    connection up meanwhile (the user timeout counts from the first window
    probe; an ACK before it is due may put it back). The silence sweep's stall
    rule ends those (tests/socketpair); here the kernel's end is under test."""
    caplog.set_level(logging.INFO, logger="fleet_ingress.access")
    fleet = await RawFleet(tls_files.fleet_server_context(), Streaming()).start()
    try:
        ingress = await start_ingress(
            [fleet.line("a")], timeouts={"tcp_user_timeout": 2.0, "carrier_silence": 0}
        )
        tls = await asyncio.to_thread(
            _carrier_that_stops_reading, ingress.wss_address, tls_files.client_context()
        )
        tls.setblocking(False)
        with contextlib.suppress(OSError):  # it sends on until the ingress gives it up
            for _ in range(40):
                if access_entries(caplog):
                    break
                with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    tls.send(FRAME)
                await asyncio.sleep(0.5)
        await eventually(lambda: len(access_entries(caplog)) == 1, timeout=10)
        # Known dead, it is cut, not closed: no close frame or TLS close waits
        # a flush on it (CLOSE_FLUSH_TIMEOUT, 10 s). Gone at its line, and
        # the call out of those closing once its bot's side has gone (told
        # 1001, GOODBYE_REPLY_WAIT for a reply this bot never sends).
        assert not ingress.registry.connections
        await eventually(lambda: not ingress.registry.closing, timeout=2)
        [entry] = access_entries(caplog)
        assert entry["end_reason"] == "carrier_lost", entry
        assert entry["detail"] is not None and "stopped reading" in entry["detail"], entry
        tls.close()
    finally:
        await fleet.stop()
