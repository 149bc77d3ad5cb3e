"""A real worker process (`python -m fleet_ingress worker`) under a slot
coordinator this test runs, as the supervisor does: the listener and the
worker's end of its channel inherited, real TLS carriers, a fleet on loopback.
The coordinator here can speak like another version of the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.net.listener import bind_tcp
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.net.tls import memfd_of, new_ticket_keys
from fleet_ingress.service.carrier_certificate import SERVING_TICKET_KEYS_ENV
from fleet_ingress.service.listen_fds import COORDINATOR, handover_env, pass_fds
from fleet_ingress.sim import SimulatedFleet
from tests.support import TLSFiles, offer_session, write_run_home

pytestmark = pytest.mark.uvloop_only  # a process tree per test


@dataclass
class LoneWorker:
    proc: asyncio.subprocess.Process
    home: Path
    port: int
    slots: HostSlots
    server: SlotServer
    key: int  # its channel

    def log(self) -> list[dict[str, Any]]:
        text = (self.home / "stderr.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
async def start_worker(tls_files: TLSFiles) -> AsyncIterator[Callable[..., Any]]:
    """Starts a lone worker; `at_hello`: messages the coordinator sends it the
    moment it reads its hello; `env` and `fds`: more of its environment and
    descriptors, as the supervisor hands them. Waits until it serves unless
    `wait` is false."""
    started: list[tuple[LoneWorker, socket.socket, SimulatedFleet]] = []

    async def start(
        *,
        at_hello: tuple[dict[str, Any], ...] = (),
        wait: bool = True,
        env: dict[str, str] | None = None,
        fds: tuple[int, ...] = (),
        channel_sndbuf: int | None = None,
    ) -> LoneWorker:
        fleet = SimulatedFleet(name="a", capacity=4, ssl_context=tls_files.fleet_server_context())
        await fleet.start()
        home = Path(tempfile.mkdtemp(prefix="fi-worker-"))
        lines = [f"{fleet.url} name=a maxconn=4"]
        port, _ = await write_run_home(tls_files, home, lines, workers=1)
        balancer = Balancer(FleetSet.from_specs(parse_fleets_text(lines[0], default_maxconn=4)))
        balancer.fleets[0].health = Health.UP
        slots = HostSlots(balancer, queue_timeout=2.0, max_queue=8)
        server = SlotServer(slots)
        serving = asyncio.Event()
        server.handlers["serving"] = lambda key, message: serving.set()
        server.on_join.append(lambda key, pid, generation: [server.send(key, m) for m in at_hello])
        listener = bind_tcp("127.0.0.1", port)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if channel_sndbuf is not None:  # what the worker's end holds in the kernel
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, channel_sndbuf)
        socks = {"listen.wss": listener, COORDINATOR: theirs}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fleet_ingress",
            "worker",
            "-c",
            str(home / "ingress.toml"),
            "--generation",
            "1",
            pass_fds=(*pass_fds(socks), *fds),
            env={**handover_env(socks), **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stderr=(home / "stderr.log").open("wb"),
        )
        theirs.close()
        key = await server.adopt(ours)
        worker = LoneWorker(proc, home, port, slots, server, key)
        started.append((worker, listener, fleet))
        if wait:
            async with asyncio.timeout(20):
                await serving.wait()
        return worker

    yield start
    for worker, listener, fleet in started:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        await asyncio.wait_for(worker.proc.wait(), 10)
        await worker.server.close()
        listener.close()
        await fleet.stop()
        shutil.rmtree(worker.home, ignore_errors=True)


async def _one_call(worker: LoneWorker, tls_files: TLSFiles) -> None:
    try:
        async with connect(
            f"wss://127.0.0.1:{worker.port}/ws/bot-1",
            ssl=tls_files.client_context(),
            open_timeout=10,
        ) as ws:
            await ws.send("ping")
            async with asyncio.timeout(5):
                assert await ws.recv() == "ping"
    except (OSError, TimeoutError) as exc:
        tail = (worker.home / "stderr.log").read_text()[-3000:]
        said = f"the call through the worker failed: {exc!r}; its log:\n{tail}"
        raise AssertionError(said) from exc


async def test_an_old_worker_keeps_serving_when_a_newer_supervisor_sends_an_op_it_does_not_know(
    start_worker: Callable[..., Any], tls_files: TLSFiles
) -> None:
    """After an upgrade, the new supervisor speaks to the old generation until
    it has drained: an op the old worker's code does not know (one a later
    version adds) must not cut its channel, which would make it stop accepting."""
    worker = await start_worker()
    await _one_call(worker, tls_files)
    for _ in range(3):
        assert worker.server.send(worker.key, {"op": "future-op", "id": 5, "x": [1, 2]})
    # Asked after the unknown ops, answered in order: they have been read.
    assert await worker.server.collect_reports(5.0) == 0
    await _one_call(worker, tls_files)
    assert [r.pid for r in worker.slots.workers] == [worker.proc.pid]
    assert worker.proc.returncode is None
    said = [e for e in worker.log() if "op not known" in e["event"]]
    assert [(e["op"], e["pid"]) for e in said] == [("future-op", worker.proc.pid)], said
    assert not [e for e in worker.log() if e["level"] == "error"]


async def test_a_stop_sent_the_moment_the_worker_says_hello_is_heard(
    start_worker: Callable[..., Any],
) -> None:
    """The supervisor may say `stop` (SIGTERM while a worker starts) as soon as
    it reads the worker's hello: by then the worker must listen for it (an op
    with no handler yet would be ignored as unknown). No call: it exits at once."""
    worker = await start_worker(at_hello=({"op": "stop", "id": 1},), wait=False)
    async with asyncio.timeout(15):
        assert await worker.proc.wait() == 0
    assert not [e for e in worker.log() if "op not known" in e["event"]], worker.log()


async def test_a_worker_that_cannot_read_the_supervisors_ticket_keys_seals_tickets_its_own_way(
    start_worker: Callable[..., Any], tls_files: TLSFiles
) -> None:
    """The supervisor hands each worker the keys its session tickets are sealed
    with (INGRESS_SERVING_TICKET_KEYS_FD, a memfd), so that a carrier's session
    resumes on any worker. A worker that cannot use what it is handed (a memfd
    cut short or too long, a descriptor not open, not a number) serves all the
    same, with OpenSSL's own keys: a session resumes on it alone, as before the
    keys were shared, and never into another worker's keys."""
    keys = new_ticket_keys()

    async def handed(value: bytes | str) -> LoneWorker:
        if isinstance(value, str):
            return await start_worker(env={SERVING_TICKET_KEYS_ENV: value})
        fd = memfd_of(value, "ticket keys")
        try:
            return await start_worker(env={SERVING_TICKET_KEYS_ENV: str(fd)}, fds=(fd,))
        finally:
            os.close(fd)

    carriers = [tls_files.client_context(), tls_files.client_context()]
    carriers[1].maximum_version = ssl.TLSVersion.TLSv1_2

    def resumed(first: LoneWorker, then: LoneWorker) -> list[bool]:
        """Whether a carrier's session from `first` resumes on `then`, by version."""
        found = []
        for ctx in carriers:
            got = offer_session(first.port, ctx, None)
            assert got.answer == b"HTTP/1.1 200", got
            again = offer_session(then.port, ctx, got.session)
            assert again.answer == b"HTTP/1.1 200", again
            found.append(again.resumed)
        return found

    sharing = [await handed(keys), await handed(keys)]
    assert await asyncio.to_thread(resumed, sharing[0], sharing[1]) == [True, True]
    for value in (keys[:-1], keys + b"\0", "999", "three"):
        what = value if isinstance(value, str) else f"a memfd of {len(value)} bytes"
        alone = await handed(value)
        assert await asyncio.to_thread(resumed, alone, alone) == [True, True], what
        assert await asyncio.to_thread(resumed, sharing[0], alone) == [False, False], what
        assert await asyncio.to_thread(resumed, alone, sharing[0]) == [False, False], what
        assert not [e for e in alone.log() if e["level"] == "error"], alone.log()
        said = [e for e in alone.log() if "ticket keys the supervisor handed" in e["event"]]
        assert len(said) == 1 and said[0]["level"] == "warning", (what, alone.log())
        assert said[0]["problem"], said
    for worker in sharing:
        assert not [e for e in worker.log() if "ticket keys" in e["event"]], worker.log()


async def _stop_with_the_channel_unread(
    worker: LoneWorker, read_again_after: float | None
) -> tuple[float, bool]:
    """The coordinator reads nothing of the worker's channel, asks for reports
    enough to fill it, then says stop; it reads again `read_again_after` s
    later (None: not until the worker has exited). Returns how long the
    worker took to exit, and whether its final report was read."""
    channel = worker.server._channels[worker.key]
    assert channel.transport is not None
    channel.transport.pause_reading()
    for _ in range(64):  # answered unread: the kernel's share full, the rest in the worker
        worker.server.send(worker.key, {"op": "report"})
    await asyncio.sleep(0.5)
    began = time.monotonic()
    worker.server.send(worker.key, {"op": "stop", "id": 1})
    if read_again_after is not None:
        await asyncio.sleep(read_again_after)
        channel.transport.resume_reading()
    async with asyncio.timeout(30):
        code = await worker.proc.wait()
    took = time.monotonic() - began
    assert code == 0, worker.log()[-5:]
    if read_again_after is None:
        channel.transport.resume_reading()
    await asyncio.sleep(0.3)  # what the kernel held, read
    return took, channel.drained


async def test_a_worker_exits_about_a_second_after_its_drain_when_the_supervisor_reads_nothing(
    start_worker: Callable[..., Any],
) -> None:
    """Drained, the worker sends its final report and waits for its channel to
    flush, CHANNEL_FLUSH_WAIT (1 s) at most: a supervisor that reads nothing (stopped,
    its loop held) does not hold the exit of a worker that is done."""
    worker = await start_worker(channel_sndbuf=4096)
    took, drained = await _stop_with_the_channel_unread(worker, None)
    assert 0.9 <= took < 3.0, took  # 1 s: not cut short, not held longer
    assert not drained  # what it could not write in time is lost with it


async def test_a_workers_final_report_waits_for_a_supervisor_that_reads_again_within_its_wait(
    start_worker: Callable[..., Any],
) -> None:
    """The supervisor reads again 0.5 s into the worker's 1 s wait: the final report,
    queued in the worker behind what filled the channel, reaches it (the
    worker's counts go into the host's totals, its calls are not taken for
    lost with it)."""
    worker = await start_worker(channel_sndbuf=4096)
    took, drained = await _stop_with_the_channel_unread(worker, 0.5)
    assert drained
    assert took < 1.0, took  # let go as soon as its channel flushed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("apart", [1.5, 6.5])
async def test_a_second_stop_signal_cuts_the_calls_only_past_five_seconds(
    start_worker: Callable[..., Any], tls_files: TLSFiles, apart: float
) -> None:
    """A stop signal to the whole group (Ctrl-C, `systemctl kill`) reaches a
    worker directly and, through the supervisor, again, over 1 s later on a
    loaded host: within SAME_SIGNAL_WITHIN (5 s) that is one stop, its calls
    drained, not cut. A person's second Ctrl-C after that cuts them."""
    worker = await start_worker()
    async with connect(
        f"wss://127.0.0.1:{worker.port}/ws/bot-1", ssl=tls_files.client_context(), open_timeout=10
    ) as ws:
        await ws.send("ping")
        async with asyncio.timeout(5):
            assert await ws.recv() == "ping"
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(apart)
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        if apart < 5:
            await ws.send("still there")
            async with asyncio.timeout(5):
                assert await ws.recv() == "still there"  # drained (timeouts.drain 30 s)
            assert worker.proc.returncode is None
        else:
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    await ws.recv()
            async with asyncio.timeout(10):
                await worker.proc.wait()
