"""A process of the ingress that does not run for a while (SIGSTOP and SIGCONT,
a debugger, a VM paused while CLOCK_MONOTONIC goes on) while its peers go on
sending: what they sent waits in the kernel, and is not their silence. Real
processes (`fleet-ingress run`), real TLS, real signals, bounded stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleet_ingress.sim import SimulatedFleet
from tests.support import RunningIngress, TLSFiles, close_calls, workers_of, write_run_home

pytestmark = pytest.mark.uvloop_only

FRAME = b"\x01" * 160  # a 20 ms media frame


@pytest.fixture
async def fleet(tls_files: TLSFiles) -> AsyncIterator[SimulatedFleet]:
    sim = SimulatedFleet(name="a", capacity=16, ssl_context=tls_files.fleet_server_context())
    sim.available_override = 1000
    await sim.start()
    yield sim
    await sim.stop()


async def _start(tls_files: TLSFiles, fleet: SimulatedFleet, timeouts: str) -> RunningIngress:
    """One worker, `timeouts` lines added to [timeouts]; its fleet UP."""
    home = Path(tempfile.mkdtemp(prefix="fi-run-"))
    port, stats_port = await write_run_home(
        tls_files, home, [f"{fleet.url} name=a"], workers=1, check_timeout=5
    )
    toml = home / "ingress.toml"
    toml.write_text(toml.read_text().replace("[timeouts]\n", f"[timeouts]\n{timeouts}\n"))
    service = await RunningIngress.launch(home, port, stats_port)
    try:
        await service.fleets_up()
    except BaseException:
        await service.finish()
        raise
    return service


class Streaming:
    """A carrier sending a frame every 20 ms while `sending` is set, and
    counting the echoes its fleet sends back."""

    def __init__(self, ws: ClientConnection, sending: asyncio.Event) -> None:
        self.ws = ws
        self.sent = self.echoed = 0
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send(sending)), loop.create_task(self._read())]

    async def _send(self, sending: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await sending.wait()
                await self.ws.send(FRAME)
                self.sent += 1
                await asyncio.sleep(0.02)

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.ws:
                self.echoed += 1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


async def _stopped(pid: int) -> None:
    """Until the kernel has stopped `pid` (state T): a frame sent before then
    may wake its loop first."""
    async with asyncio.timeout(5):
        while _state(pid) != "T":
            await asyncio.sleep(0.01)


@pytest.mark.timeout(60)
async def test_calls_streaming_through_a_stopped_worker_are_not_ended_as_carrier_silent(
    tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The worker stopped 2.5 s, its carriers streaming all along, with
    carrier_silence = 1 s: once continued, each call goes on. A loop resumed
    from a stop runs its due timers before it reads its sockets (the stop
    interrupts epoll_wait, whose time is then up: uvloop and asyncio's loop
    alike), so the silence sweep ran first, saw no byte since the stop, and
    ended every call `carrier_silent` with its audio waiting unread in the
    kernel (the clock audit of session 32). The carriers pause 0.3 s before the
    stop, so that the worker is waiting in epoll_wait when it comes, as an
    idle one mostly is (a frame read just before it moved the counts). A
    carrier that stops sending with the pause is still ended, its silence on
    either side of the stop counted."""
    service = await _start(tls_files, fleet, "carrier_silence = 1")
    sending = asyncio.Event()
    sending.set()
    calls: list[ClientConnection] = []
    streams: list[Streaming] = []
    (worker,) = workers_of(service.home)
    try:
        for i in range(3):
            calls.append(await connect(service.url(f"/ws/bot-{i}"), ssl=tls_files.client_context()))
            streams.append(Streaming(calls[-1], sending))
        mute = asyncio.Event()  # set once: this carrier stops sending with the pause
        mute.set()
        calls.append(await connect(service.url("/ws/mute"), ssl=tls_files.client_context()))
        streams.append(Streaming(calls[-1], mute))
        await asyncio.sleep(1.0)
        sending.clear()
        mute.clear()
        await asyncio.sleep(0.3)
        os.kill(worker, signal.SIGSTOP)
        try:
            await _stopped(worker)
            sending.set()
            await asyncio.sleep(2.5)
        finally:
            os.kill(worker, signal.SIGCONT)
        await asyncio.sleep(1.5)
        ended = [e for e in service.log() if e["event"] == "call ended"]
        assert [(e["bot_id"], e["end_reason"]) for e in ended] == [("mute", "carrier_silent")]
        assert [ws.close_code for ws in calls[:3]] == [None] * 3
        for s in streams[:3]:
            # Every frame sent before the last half second has come back.
            assert s.echoed >= s.sent - 25, (s.sent, s.echoed)
    finally:
        for s in streams:
            await s.stop()
        await close_calls(calls)
        await service.finish()
