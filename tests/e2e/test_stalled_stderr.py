"""A stderr nobody reads (journald stalled, a `| tee` stopped) stops no call:
`fleet-ingress run` with its stderr on a full pipe keeps relaying and taking
calls, and what it logged meanwhile comes out once the pipe is read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect

from fleet_ingress.sim import SimulatedFleet
from tests.support import RunningIngress, TLSFiles

pytestmark = pytest.mark.uvloop_only  # one process tree: the event loop is its own


def _fill(pipe_write_end: int) -> int:
    """Fill the pipe to the brim through a descriptor of our own (made
    non-blocking without touching the one the ingress writes to)."""
    filler = os.open(f"/proc/self/fd/{pipe_write_end}", os.O_WRONLY | os.O_NONBLOCK)
    written = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            written += os.write(filler, b"filler\n" * 512)
    with contextlib.suppress(BlockingIOError):
        while True:
            written += os.write(filler, b"\n")
    os.close(filler)
    return written


def _drain(read_end: int) -> list[dict[str, Any]]:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(read_end, 1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.startswith(b"{")]


async def test_calls_go_on_while_nobody_reads_stderr_and_the_lines_come_out_after(
    tls_files: TLSFiles,
) -> None:
    fleet = SimulatedFleet(name="a", capacity=64, ssl_context=tls_files.fleet_server_context())
    await fleet.start()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    service = None
    try:
        service = await RunningIngress.start(
            tls_files, [f"{fleet.url} name=a maxconn=64"], workers=1, stderr=write_end
        )
        await service.fleets_up()
        ctx = tls_files.client_context()
        live = await connect(service.url("/ws/live"), ssl=ctx, open_timeout=10)
        _drain(read_end)
        assert _fill(write_end) > 0  # from here a write to stderr blocks

        gaps: list[float] = []

        async def stream() -> None:
            """A frame every 20 ms and its echo, as a call does."""
            last = time.monotonic()
            for i in range(150):
                await live.send(f"frame-{i}")
                async with asyncio.timeout(5):
                    assert await live.recv() == f"frame-{i}"
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                await asyncio.sleep(0.02)

        streaming = asyncio.create_task(stream())
        for i in range(20):  # each call that ends writes an access line
            async with connect(service.url(f"/ws/short-{i}"), ssl=ctx, open_timeout=5) as ws:
                await ws.send("hello")
                async with asyncio.timeout(5):
                    assert await ws.recv() == "hello"
        await streaming
        assert max(gaps) < 2.0, f"the live call stalled {max(gaps):.1f} s"
        await live.close()

        # Read at last: the lines held meanwhile come out, none dropped.
        ended: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(ended) < 21:
            ended += [e for e in _drain(read_end) if e["event"] == "call ended"]
            await asyncio.sleep(0.05)
        bots = sorted(e["bot_id"] for e in ended)
        assert bots == sorted(["live", *(f"short-{i}" for i in range(20))])
        metrics = await service.metrics()
        assert "fleet_ingress_log_lines_dropped_total 0.0" in metrics
    finally:
        if service is not None:
            await service.finish()
        os.close(read_end)
        os.close(write_end)
        await fleet.stop()
