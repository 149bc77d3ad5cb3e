"""process.accept (issue #14's CPU a call with two workers): "first" has the
workers take new connections in rank order, one serving while it keeps up,
the others joining when connections wait (a burst, a worker stopped);
"spread", the default, has every worker take them as its loop is free. Real
`fleet-ingress run` with two workers, real TLS, websockets carriers, fleets
on loopback; which worker holds a call read from /stats.json's rows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from fleet_ingress.core.accept_order import ACCEPT_LOOK
from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    RunningIngress,
    TLSFiles,
    admin_command,
    close_calls,
    echo,
    fleets_up_or_finished,
)

pytestmark = pytest.mark.uvloop_only

REQUEST_TIMEOUT = 10.0  # timeouts.request's default: a handshake and head within it


async def _start(tls_files: TLSFiles, sims: list[SimulatedFleet], accept: str) -> RunningIngress:
    """Two workers, process.accept as given, both fleets UP. The fleets run in
    this test's process: the probes' timeout is long enough that a burst of
    handshakes here makes no fleet DOWN."""
    lines = [f"{sim.url} name={sim.name} maxconn=16" for sim in sims]
    service = await RunningIngress.start(
        tls_files, lines, workers=2, check_timeout=5, extra=f'accept = "{accept}"'
    )
    return await fleets_up_or_finished(service)


async def _open(
    service: RunningIngress, tls_files: TLSFiles, bot: str, timeout: float = 15
) -> ClientConnection:
    return await connect(
        service.url(f"/ws/{bot}"), ssl=tls_files.client_context(), open_timeout=timeout
    )


async def _calls_by_worker(service: RunningIngress, total: int) -> dict[int, int]:
    """Each worker's calls (its row's), once they sum to `total` (bounded)."""
    rows: list[dict[str, Any]] = []
    for _ in range(100):
        rows = (await service.stats())["workers"]
        if sum(r["calls"] for r in rows) == total:
            return {r["pid"]: r["calls"] for r in rows}
        await asyncio.sleep(0.05)
    raise AssertionError(f"the workers' rows never summed to {total} calls: {rows}")


async def _one_after_another(
    service: RunningIngress, tls_files: TLSFiles, count: int, calls: list[ClientConnection]
) -> None:
    """`count` calls opened one after another, each relaying before the next,
    a few looks apart: a low rate that one worker keeps up with."""
    for i in range(count):
        ws = await _open(service, tls_files, f"bot-{i}")
        calls.append(ws)
        await echo(ws)
        await asyncio.sleep(4 * ACCEPT_LOOK)


# pair: every call on one worker holds only while that worker keeps up with calls
# opened one after another; a host at load 10+ (the main phase's four at a time on
# two cores) can have it fall 10 ms behind, and the other worker rightly takes one.
@pytest.mark.pair
async def test_first_has_one_worker_take_calls_opened_one_after_another(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    service = await _start(tls_files, two_fleets, "first")
    calls: list[ClientConnection] = []
    try:
        await _one_after_another(service, tls_files, 10, calls)
        by_worker = await _calls_by_worker(service, 10)
        assert sorted(by_worker.values()) == [0, 10], by_worker
    finally:
        await close_calls(calls)
        await service.finish()


@pytest.mark.pair  # as the first test: on a loaded host the other worker rightly takes one
async def test_a_reload_to_first_applies_at_once(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """No upgrade: the workers serving take connections in rank order from the
    reload on, and the reload says it applied the change."""
    service = await _start(tls_files, two_fleets, "spread")
    calls: list[ClientConnection] = []
    try:
        toml = service.home / "ingress.toml"
        toml.write_text(toml.read_text().replace('accept = "spread"', 'accept = "first"'))
        code, printed = await admin_command(service, "reload")
        assert code == 0 and "applied: process.accept spread -> first" in printed, printed
        await _one_after_another(service, tls_files, 10, calls)
        by_worker = await _calls_by_worker(service, 10)
        assert sorted(by_worker.values()) == [0, 10], by_worker
    finally:
        await close_calls(calls)
        await service.finish()


@pytest.mark.pair  # as the first test: on a loaded host the other worker rightly takes one
async def test_first_has_the_other_worker_take_calls_when_the_first_is_stopped(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """The worker taking calls stopped (SIGSTOP: hung, or fallen behind): a
    new call waits in the accept queue, which the other worker's next look
    finds, and is connected by it well within timeouts.request."""
    service = await _start(tls_files, two_fleets, "first")
    calls: list[ClientConnection] = []
    stopped: int | None = None
    try:
        await _one_after_another(service, tls_files, 3, calls)
        by_worker = await _calls_by_worker(service, 3)
        (stopped,) = (pid for pid, n in by_worker.items() if n == 3)
        (other,) = (pid for pid in by_worker if pid != stopped)
        os.kill(stopped, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        began = loop.time()
        ws = await _open(service, tls_files, "while-stopped", timeout=REQUEST_TIMEOUT / 2)
        calls.append(ws)
        await echo(ws)
        took = loop.time() - began
        assert took < REQUEST_TIMEOUT / 2, took
        assert (await _calls_by_worker(service, 4))[other] == 1
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        await close_calls(calls)
        await service.finish()


# pair: as the first test, calls one after another on one worker.
@pytest.mark.pair
async def test_first_has_the_replacement_of_the_first_worker_take_its_rank(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """The worker taking calls killed (SIGKILL): its replacement takes its
    rank (0), so calls opened one after another land on the replacement, not
    on the survivor (rank 1, which takes them only while they wait)."""
    service = await _start(tls_files, two_fleets, "first")
    calls: list[ClientConnection] = []
    try:
        await _one_after_another(service, tls_files, 3, calls)
        by_worker = await _calls_by_worker(service, 3)
        (victim,) = (pid for pid, n in by_worker.items() if n == 3)
        (survivor,) = (pid for pid in by_worker if pid != victim)
        os.kill(victim, signal.SIGKILL)
        rows: list[dict[str, Any]] = []
        async with asyncio.timeout(15):
            while not (
                len(rows) == 2
                and victim not in [r["pid"] for r in rows]
                and all(r["state"] == "serving" for r in rows)
            ):
                await asyncio.sleep(0.05)
                rows = (await service.stats())["workers"]
        (replacement,) = (r["pid"] for r in rows if r["pid"] != survivor)
        await close_calls(calls)  # the victim's, lost with it
        calls.clear()
        await _one_after_another(service, tls_files, 3, calls)
        assert await _calls_by_worker(service, 3) == {replacement: 3, survivor: 0}
    finally:
        await close_calls(calls)
        await service.finish()


def _burst(port: int, context: ssl.SSLContext, count: int) -> list[tuple[socket.socket, bytes]]:
    """`count` WebSocket calls opened at once, faster than one worker serves
    them: every ClientHello made first, then every connection made and its
    ClientHello sent, then each handshake finished and its request sent. Each
    connection and the status line it was answered. Blocking: run in a thread
    (the fleets answer on the test's loop)."""
    started: list[tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]] = []
    for _ in range(count):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        started.append((tls, incoming, outgoing))
    socks: list[socket.socket] = []
    answered: list[tuple[socket.socket, bytes]] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        for sock, (_, _, outgoing) in zip(socks, started, strict=True):
            sock.sendall(outgoing.read())
        for i, (sock, (tls, incoming, outgoing)) in enumerate(zip(socks, started, strict=True)):
            request = (
                f"GET /ws/burst-{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
            head = b""
            for _ in range(1000):  # bounded: a record a read
                if tls.version() is None:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        tls.do_handshake()
                    if tls.version() is not None:
                        tls.write(request)
                else:
                    with contextlib.suppress(ssl.SSLWantReadError):
                        head += tls.read(65536)
                    if b"\r\n" in head:
                        break
                if pending := outgoing.read():
                    sock.sendall(pending)
                if tls.version() is not None and b"\r\n" in head:
                    break
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
            answered.append((sock, head.partition(b"\r\n")[0]))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return answered


# pair: under "first" the first worker takes a burst whole when its handshakes run
# faster than the other's look (every 50 ms, 10 ms to confirm): so in CI's main phase
# (four tests at a time on two cores), 30 of 30 on one worker.
@pytest.mark.pair
@pytest.mark.parametrize("accept", ["first", "spread"])
async def test_a_burst_of_handshakes_is_answered_and_spread_lands_on_both_workers(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet], accept: str
) -> None:
    """30 calls opened at once (under the host's 32 slots), their ClientHellos
    sent together: every one answered 101. Under "spread" both workers take
    some. Under "first" the split is the host's speed: where the first worker
    handshakes 30 within the second's look (60 ms), it takes them all, as
    designed (CI's clean-clone runs on session 50's main: 30 of 30 twice, in the
    main phase and in the pair phase); on a loaded host the second joined."""
    service = await _start(tls_files, two_fleets, accept)
    answered: list[tuple[socket.socket, bytes]] = []
    try:
        answered = await asyncio.to_thread(_burst, service.port, tls_files.client_context(), 30)
        statuses = [status for _, status in answered]
        assert statuses == [b"HTTP/1.1 101 Switching Protocols"] * 30, statuses
        by_worker = await _calls_by_worker(service, 30)
        assert sum(by_worker.values()) == 30, by_worker
        if accept == "spread":
            assert all(by_worker.values()), by_worker
    finally:
        for sock, _ in answered:
            sock.close()
        await service.finish()
