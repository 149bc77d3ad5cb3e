"""A fleet at a link-local IPv6 address, reached through its zone (SPEC 7).

One network namespace made by the test: `lo` up with fe80::1/64 on it, the
fleet (`SimulatedFleet`, TLS, a certificate for the IP address fe80::1) on
[fe80::1%lo]:8443, a real `python -m fleet_ingress run` process whose fleets
file names it `https://[fe80::1%25lo]:8443` (RFC 6874's form). The zone is
where to connect, known only to this host: the certificate names the address,
so SNI and the name checked leave the zone out, and so does the Host header
(RFC 6874 section 4)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from fleet_ingress.sim import SimulatedFleet
from tests.support import NetLab, TLSFiles, eventually

pytestmark = [pytest.mark.uvloop_only, pytest.mark.timeout(60)]

WSS = ("127.0.0.1", 8443)
STATS = ("127.0.0.1", 8404)
FLEET_PORT = 9443


async def _stats(net: NetLab, ns: str) -> dict:
    sock = await net.connect(ns, *STATS)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /stats.json HTTP/1.0\r\nHost: stats\r\n\r\n")
        async with asyncio.timeout(5):
            raw = await reader.read(-1)
    finally:
        writer.close()
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def test_a_fleet_named_by_its_zone_is_probed_and_serves_calls(
    netlab: NetLab, tls_files: TLSFiles, tmp_path: Path
) -> None:
    ns = netlab.namespace("zone")
    netlab.ip("-n", ns, "addr", "add", "fe80::1/64", "dev", "lo", "nodad")

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("fe80::1", FLEET_PORT, 0, socket.if_nametoindex("lo")))
        sock.listen(16)
        sock.setblocking(False)
        return sock

    fleet_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_files.ca.issue_cert("fe80::1").configure_cert(fleet_ctx)
    sock = netlab.socket_in(ns, listen)
    fleet = SimulatedFleet(name="linklocal", ssl_context=fleet_ctx, sock=sock)
    await fleet.start()

    (tmp_path / "fleets.txt").write_text(f"https://[fe80::1%25lo]:{FLEET_PORT}\n")
    config = tmp_path / "ingress.toml"
    config.write_text(
        f'[listen]\nwss = "{WSS[0]}:{WSS[1]}"\nacme = ""\nstats = "{STATS[0]}:{STATS[1]}"\n'
        f'admin_socket = ""\n'
        f'[tls]\ncert = "{tls_files.ingress_cert}"\nkey = "{tls_files.ingress_key}"\n'
        f'[fleets]\nfile = "fleets.txt"\nca_file = "{tls_files.ca_pem}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    proc = await asyncio.create_subprocess_exec(
        *netlab.exec_argv(ns, sys.executable, "-m", "fleet_ingress", "run", "-c", str(config)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    log: list[bytes] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line)

    reader = asyncio.get_running_loop().create_task(read_log())
    try:
        # The probe connects through the zone and checks the certificate for
        # fe80::1: before, it checked it for 'fe80::1%lo', and the fleet stayed DOWN.
        fleets: list[dict] = []
        async with asyncio.timeout(20):
            while [f["health"] for f in fleets] != ["UP"]:
                assert proc.returncode is None, b"".join(log).decode()
                with contextlib.suppress(OSError, ValueError):
                    fleets = (await _stats(netlab, ns))["fleets"]
                await asyncio.sleep(0.1)
        assert fleets[0]["name"] == "[fe80::1%lo]:9443"  # the zone is part of its name

        sock = await netlab.connect(ns, *WSS)
        async with connect(
            "wss://calls.test/ws/bot-1",
            sock=sock,
            ssl=tls_files.client_context(),
            server_hostname="calls.test",
            open_timeout=5,
            close_timeout=1,
        ) as ws:
            await ws.send(b"frame")
            async with asyncio.timeout(5):
                assert await ws.recv() == b"frame"
        (seen,) = fleet.requests
        assert seen.headers.getall("Host") == [f"[fe80::1]:{FLEET_PORT}"]
        await eventually(lambda: fleet.active_calls == 0, timeout=5)
    finally:
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await proc.wait()
        reader.cancel()
        print(b"".join(log).decode())  # the ingress's log, shown if the test failed
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await fleet.stop()
