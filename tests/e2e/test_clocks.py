"""Clocks. A process of the ingress that does not run for a while (SIGSTOP and
SIGCONT, a debugger, a VM paused while CLOCK_MONOTONIC goes on) while its peers
go on sending: what they sent waits in the kernel, and is not their silence.
The wall clock stepped under a running ingress (chrony at boot, a VM resumed, a
clock days behind corrected): no call is cut or mis-counted by it. Real
processes (`fleet-ingress run`), real TLS, real signals, bounded stops; the
wall clock stepped for the ingress's processes alone (tests/wall_clock_step)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleet_ingress.sim import SimulatedFleet
from tests.support import RunningIngress, TLSFiles, close_calls, workers_of, write_run_home

# alone: stops of 2.5 s whose outcome hangs on timers a loaded host would make late.
pytestmark = [pytest.mark.uvloop_only, pytest.mark.alone]

FRAME = b"\x01" * 160  # a 20 ms media frame
WALL_CLOCK_STEP = Path(__file__).parent.parent / "wall_clock_step"


@pytest.fixture
def fleet(roomy_fleet: SimulatedFleet) -> SimulatedFleet:
    return roomy_fleet


async def _start(
    tls_files: TLSFiles,
    fleet: SimulatedFleet,
    timeouts: str = "",
    *,
    fleets: str = "",
    check_timeout: float = 5,
    step: Path | None = None,
    line: str = "",
    queue: float = 3,
) -> RunningIngress:
    """One worker, `timeouts` and `fleets` lines added to their sections; its
    fleet UP. `step`: a file holding the seconds its wall clock is stepped by
    (`_step`). `line`: added to the fleet's line (`maxconn=1`); `queue`: timeouts.queue."""
    home = Path(tempfile.mkdtemp(prefix="fi-run-"))
    port, stats_port = await write_run_home(
        tls_files,
        home,
        [f"{fleet.url} name=a {line}"],
        workers=1,
        check_timeout=check_timeout,
        queue=queue,
    )
    toml = home / "ingress.toml"
    text = toml.read_text().replace("[timeouts]\n", f"[timeouts]\n{timeouts}\n")
    toml.write_text(text.replace("[fleets]\n", f"[fleets]\n{fleets}\n"))
    env = None
    if step is not None:
        _step(step, 0.0)
        path = os.pathsep.join(filter(None, [str(WALL_CLOCK_STEP), os.environ.get("PYTHONPATH")]))
        env = {"PYTHONPATH": path, "WALL_CLOCK_STEP_FILE": str(step)}
    service = await RunningIngress.launch(home, port, stats_port, env=env)
    try:
        await service.fleets_up()
    except BaseException:
        await service.finish()
        raise
    return service


def _step(file: Path, seconds: float) -> None:
    """Step the wall clock of the processes started with `file` (`_start`) to
    the host's plus `seconds`."""
    file.write_text(repr(seconds))


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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("step", [86_400.0, -300.0])
async def test_a_call_lost_with_its_worker_after_a_wall_clock_step_has_its_own_duration(
    tls_files: TLSFiles, fleet: SimulatedFleet, tmp_path: Path, step: float
) -> None:
    """The wall clock stepped a day forward (a VM resumed, a clock days behind
    corrected) or 5 minutes back (one ahead, corrected) under a call, then its
    worker killed: the supervisor's line for the lost call gives the call's
    duration. It was the wall clock's difference: 86,402 s for a call of 2 s,
    and none at all after the step back (a start over a minute ahead of the
    supervisor's clock was taken for a bogus one)."""
    service = await _start(tls_files, fleet, step=tmp_path / "step")
    calls: list[ClientConnection] = []
    try:
        calls.append(await connect(service.url("/ws/lost"), ssl=tls_files.client_context()))
        await calls[0].send("hello")
        assert await calls[0].recv() == "hello"
        _step(tmp_path / "step", step)
        await asyncio.sleep(1.0)
        (worker,) = workers_of(service.home)
        os.kill(worker, signal.SIGKILL)

        def lost() -> list[dict[str, object]]:
            return [
                e for e in service.log() if e["event"] == "call ended" and e["bot_id"] == "lost"
            ]

        async with asyncio.timeout(10):
            while not lost():
                await asyncio.sleep(0.05)
        (line,) = lost()
        assert "its worker" in str(line["detail"]) and line["status"] == 101, line
        assert isinstance(line["duration_s"], float) and 1.0 <= line["duration_s"] < 10, line
    finally:
        await close_calls(calls)
        await service.finish()


@pytest.mark.timeout(60)
async def test_a_fleets_answer_that_came_while_the_worker_was_stopped_is_taken(
    tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The worker stopped 2.5 s while it waits for a fleet's 101 (the fleet
    answers after 0.6 s, timeouts.response = 1 s): once continued, the call
    goes on, on its first attempt. The response timer ran first on the loop
    resumed, its 101 unread: the attempt was given up, the bot it had answered
    with cut, and the call tried again, counted a retry (the clock audit of
    session 32: attempts 2 in 3 calls of 3)."""
    service = await _start(tls_files, fleet, "response = 1")
    (worker,) = workers_of(service.home)
    fleet.call_delay = 0.6
    calls: list[ClientConnection] = []
    try:
        for i in range(3):
            asked = len(fleet.requests)
            opening = asyncio.ensure_future(
                connect(service.url(f"/ws/bot-{i}"), ssl=tls_files.client_context())
            )
            async with asyncio.timeout(5):
                while len(fleet.requests) == asked:  # the fleet has the call's head
                    await asyncio.sleep(0.005)
            os.kill(worker, signal.SIGSTOP)
            try:
                await _stopped(worker)
                await asyncio.sleep(2.5)
            finally:
                os.kill(worker, signal.SIGCONT)
            calls.append(await opening)
            await calls[-1].send("hello")
            assert await calls[-1].recv() == "hello"
        await close_calls(calls)
        async with asyncio.timeout(5):
            while len(ended := [e for e in service.log() if e["event"] == "call ended"]) < 3:
                await asyncio.sleep(0.05)
        assert [(e["status"], e["attempts"]) for e in ended] == [(101, 1)] * 3
        assert len(fleet.requests) == 3 and fleet.calls_total == 3
    finally:
        await close_calls(calls)
        await service.finish()


@pytest.mark.timeout(60)
async def test_a_probe_under_way_as_the_supervisor_stops_is_not_held_against_its_fleet(
    tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The supervisor stopped 2.5 s, twice, with a probe under way each time (the
    fleet answers its health in 0.5 s, check_timeout 1 s, fall 1): the fleet
    stays UP and no check failure is counted; a call made as the supervisor
    goes on gets its 101. The probe's timeout ran first on the loop resumed,
    the answer unread, and the run-queue wait that excuses a starved prober
    does not count a stopped one: the fleet went DOWN at each stop (the clock
    audit of session 32), and with it every new call was refused."""
    service = await _start(tls_files, fleet, fleets="fall = 1", check_timeout=1)
    fleet.health_delay = 0.5  # a probe is always under way
    calls: list[ClientConnection] = []
    try:
        for i in range(2):
            await asyncio.sleep(0.7)
            os.kill(service.proc.pid, signal.SIGSTOP)
            try:
                await _stopped(service.proc.pid)
                await asyncio.sleep(2.5)
            finally:
                os.kill(service.proc.pid, signal.SIGCONT)
            calls.append(await connect(service.url(f"/ws/bot-{i}"), ssl=tls_files.client_context()))
        (row,) = (await service.stats())["fleets"]
        assert (row["health"], row["check_failures"]) == ("UP", 0), row
        assert not [e for e in service.log() if e["event"] == "fleet DOWN"]
        (said,) = [e for e in service.log() if e["event"].startswith("health probes timed out")]
        assert "late: the prober did not run meanwhile" in said["reason"], said
    finally:
        await close_calls(calls)
        await service.finish()


@pytest.mark.timeout(60)
async def test_a_call_queued_as_the_supervisor_stops_gets_the_slot_freed_meanwhile(
    tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """maxconn 1, timeouts.queue 1 s: a call holds the slot, a second waits in
    the host's queue; the supervisor is stopped 2.4 s, and the first call ends
    0.2 s into the stop (its release waits in the channel, in time). Once the
    supervisor goes on, the queued call gets the slot, its 101. The loop
    resumed ran the queue's timer before it read the release, and refused the
    call `503 queue timeout` with the slot free (this audit, session 33)."""
    service = await _start(tls_files, fleet, line="maxconn=1", queue=1)
    calls: list[ClientConnection] = []
    try:
        calls.append(await connect(service.url("/ws/first"), ssl=tls_files.client_context()))
        queued = asyncio.ensure_future(
            connect(service.url("/ws/queued"), ssl=tls_files.client_context(), open_timeout=20)
        )
        async with asyncio.timeout(5):
            while (await service.stats())["frontend"]["queue_length"] != 1:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the supervisor waiting in epoll_wait, as an idle one is
        os.kill(service.proc.pid, signal.SIGSTOP)
        try:
            await _stopped(service.proc.pid)
            await asyncio.sleep(0.2)
            await calls[0].close()  # its slot is given back while the supervisor is stopped
            await asyncio.sleep(2.2)
        finally:
            os.kill(service.proc.pid, signal.SIGCONT)
        calls.append(await queued)
        await calls[-1].send(FRAME)
        assert await asyncio.wait_for(calls[-1].recv(), 5) == FRAME
        frontend = (await service.stats())["frontend"]
        assert (frontend["queue_length"], frontend["queue_timeouts"]) == (0, 0), frontend
    finally:
        await close_calls(calls)
        await service.finish()
