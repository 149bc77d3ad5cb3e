"""The access line of a real call, byte for byte as production writes it
(configure_logging's sink on stderr, both formats), and logging's own ways to
it kept: a handler added once the process runs still gets each call's record.
A child process each: configure_logging changes this process's logging for
good (the sink, `fleet_ingress` not propagating), which the other tests' caplog
would not see past."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import textwrap

import pytest

from tests.support import TLSFiles, WsFleet

CHILD = """
import asyncio, json, logging, sys
from websockets.asyncio.client import connect
from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.config.settings import config_from_dict
from fleet_ingress.logs import configure_logging, flush_lines
from fleet_ingress.service.ingress import Ingress
import ssl

FMT, FLEET, CERT, KEY, CA = sys.argv[1:6]
configure_logging("info", FMT, pid=True)


class Kept(logging.Handler):
    records = []

    def emit(self, record):
        self.records.append([record.name, record.levelname, record.getMessage(),
                             record.fields])


async def call(ingress, ctx, bot):
    # A call, echoed then closed; returns once its end is settled (its line made).
    host, port = ingress.wss_address
    async with connect(f"wss://{host}:{port}/ws/{bot}", ssl=ctx) as ws:
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "ping"
    for _ in range(500):
        if not ingress.registry.calls:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the call did not end")


async def main():
    config = config_from_dict({
        "listen": {"wss": "127.0.0.1:0", "acme": "", "stats": "", "admin_socket": ""},
        "tls": {"cert": CERT, "key": KEY, "ca_file": CA},
        "fleets": {"ca_file": CA},
        "log": {"access": True, "format": FMT},
    })
    ingress = Ingress(config, parse_fleets_text(FLEET, default_maxconn=8), health_checks=False)
    await ingress.start()
    ctx = ssl.create_default_context(cafile=CA)
    access = logging.getLogger("fleet_ingress.access")
    try:
        await call(ingress, ctx, "first")
        kept = Kept()
        access.addHandler(kept)  # an operator's (or a test's) handler, added now
        await call(ingress, ctx, "second")
        access.removeHandler(kept)
        access.setLevel(logging.WARNING)  # and a level that leaves the line out
        await call(ingress, ctx, "third")
    finally:
        await ingress.stop(drain_timeout=0)
    print(json.dumps(Kept.records))


asyncio.run(main())
flush_lines()
"""

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"
NUMBER = r"\d+(?:\.\d+)?"


def json_line(pid: int, bot: str) -> str:
    """The line's pattern: its literal parts as written, its measures any number."""
    return (
        f'{{"time": "{TIME}\\.\\d{{3}}Z", "level": "info", "logger": "fleet_ingress.access", '
        f'"event": "call ended", "process": {pid}, "call_id": \\d+, '
        f'"call": "{pid}-\\d+-\\w+", "started": "{TIME}Z", "client_ip": "127.0.0.1", '
        f'"route": "/ws/", "bot_id": "{bot}", "fleet": "a", "status": 101, "attempts": 1, '
        f'"queued_ms": 0.0, "handshake_ms": {NUMBER}, "duration_s": {NUMBER}, '
        f'"bytes_from_carrier": \\d+, "bytes_to_carrier": \\d+, '
        f'"end_reason": "carrier closed", "detail": null}}'
    )


def text_line(pid: int, bot: str) -> str:
    return (
        f"info    fleet_ingress\\.access: call ended call_id=\\d+ call={pid}-\\d+-\\w+ "
        f"started={TIME}Z client_ip=127\\.0\\.0\\.1 route=/ws/ bot_id={bot} fleet=a "
        f"status=101 attempts=1 queued_ms=0\\.0 handshake_ms={NUMBER} duration_s={NUMBER} "
        f'bytes_from_carrier=\\d+ bytes_to_carrier=\\d+ end_reason="carrier closed" '
        f"process={pid}"
    )


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_call_s_access_line_is_written_as_before_and_a_handler_added_gets_it(
    tls_files: TLSFiles, fmt: str
):
    """A guard (it passes on the code before the access line's fast path, and
    after): each access line's bytes on stderr, in both formats, and a handler
    added while the process runs getting the next call's record (its fields)
    as well as the line being written; a level raised on the access logger
    leaves the line out of both."""
    fleet = await WsFleet(tls_files.fleet_server_context()).start()
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            fmt,
            fleet.line("a"),
            str(tls_files.ingress_cert),
            str(tls_files.ingress_key),
            str(tls_files.ca_pem),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(child.communicate(), 60)
    finally:
        await fleet.stop()
    assert child.returncode == 0, err.decode()
    pid = child.pid
    lines = [
        line
        for line in err.decode().splitlines()
        if "fleet_ingress.access" in line  # the ingress's other lines are not pinned here
    ]
    pattern = json_line if fmt == "json" else text_line
    assert len(lines) == 2, lines  # the third call's line left out by the level
    for line, bot in zip(lines, ["first", "second"], strict=True):
        assert re.fullmatch(pattern(pid, bot), line), line
    (kept,) = json.loads(out)
    name, level, event, values = kept
    assert (name, level, event) == ("fleet_ingress.access", "INFO", "call ended")
    assert values["bot_id"] == "second" and values["status"] == 101
    if fmt == "json":
        written = json.loads(lines[1])
        assert {k: written[k] for k in values} == values
