"""`/stats` in a real browser: headless Chromium (Debian `chromium`) opens the page
while fleets are UP, DOWN, FULL and DRAIN and a call is held open, saves a
screenshot as a test artifact and reads the rendered DOM back.

Needs `apt-get install -y --no-install-recommends chromium fonts-dejavu-core`.
Without chromium the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from fleet_ingress.core.health import Health
from fleet_ingress.sim import SimulatedFleet
from tests.support import StartIngress, TLSFiles, eventually, wss_url

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SCREENSHOT = ARTIFACTS / "stats-page.png"
APT = "apt-get install -y --no-install-recommends chromium fonts-dejavu-core"
CHROMIUM_TIMEOUT = 60.0

# Headless, as root, in a container, with no network: no sandbox (root), no GPU,
# /tmp instead of a possibly tiny /dev/shm, and nothing that phones home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = f"headless chromium not installed: {APT}"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


async def run_chromium(chromium: str, url: str, *args: str) -> bytes:
    """Run chromium once with a fresh profile; return its stdout."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            *args,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(CHROMIUM_TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and its renderers
            await proc.wait()
            pytest.fail(f"chromium {' '.join(args)} took over {CHROMIUM_TIMEOUT}s")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode()[-2000:]}"
    return out


class Tables(HTMLParser):
    """Every <table id=...> as rows of cell texts (whitespace collapsed)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id") or "", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.uvloop_only
async def test_stats_page_in_headless_chromium_shows_each_fleet_and_its_state(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path
):
    chromium = chromium_or_skip()
    names = ("alpha", "bravo", "charlie", "delta")
    fleets = {
        name: SimulatedFleet(name=name, ssl_context=tls_files.fleet_server_context())
        for name in names
    }
    for fleet in fleets.values():
        await fleet.start()
    call = None
    try:
        lines = [f"{f.url} name={f.name}" for f in fleets.values()]
        fleets_file = tmp_path / "fleets.txt"  # where charlie's drain is saved
        fleets_file.write_text("\n".join(lines) + "\n")
        ingress = await start_ingress(
            lines,
            health_checks=True,
            listen={"stats": "127.0.0.1:0"},
            fleets={"check_interval": 0.2, "file": str(fleets_file)},
        )
        assert ingress.poller is not None and ingress.stats_address is not None
        assert await ingress.poller.wait_first_probes(timeout=3)
        state = {name: ingress.balancer.get(name) for name in names}

        # alpha stays UP/READY and gets the call; the others cannot take it.
        fleets["bravo"].health_status = 503  # DOWN after `fall` (2) failed probes
        fleets["delta"].available_override = 0  # UP but reports no free worker: FULL
        ingress.ops.set_admin_state("charlie", "drain")
        await eventually(
            lambda: (
                state["bravo"].health is Health.DOWN
                and state["delta"].full
                and state["delta"].health is Health.UP
            )
        )
        call = await connect(wss_url(ingress), ssl=tls_files.client_context())
        assert call.response is not None and call.response.headers["X-Fleet"] == "alpha"
        await call.send(b"hello")
        assert await call.recv() == b"hello"
        assert ingress.snapshot()["frontend"]["active_calls"] == 1

        host, port = ingress.stats_address
        url = f"http://{host}:{port}/stats"
        ARTIFACTS.mkdir(exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        await run_chromium(chromium, url, f"--screenshot={SCREENSHOT}", "--window-size=1400,700")
        dom = (await run_chromium(chromium, url, "--dump-dom")).decode()
    finally:
        if call is not None:
            await call.close()
        for fleet in fleets.values():
            await fleet.stop()

    png = SCREENSHOT.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 20_000, f"screenshot only {len(png)} bytes: a blank page?"

    tables = Tables()
    tables.feed(dom)
    header, *rows = tables.tables["fleets"]
    assert header[:3] == ["fleet", "health", "admin"], header
    by_name = {row[0].split()[0]: row for row in rows}
    assert sorted(by_name) == sorted(names), rows
    expected = {
        "alpha": ("UP", "READY"),
        "bravo": ("DOWN", "READY"),
        "charlie": ("UP", "DRAIN"),
        "delta": ("FULL", "READY"),
    }
    for name, (health, admin) in expected.items():
        row = by_name[name]
        assert (row[1], row[2]) == (health, admin), f"{name}: {row}"
        assert fleets[name].url in row[0], row
    assert by_name["alpha"][3] == "1/16", by_name["alpha"]
    assert "status 503" in by_name["bravo"][header.index("last check")]

    frontend = {row[0]: row[1] for row in tables.tables["frontend"][1:]}
    assert frontend["active calls"] == "1", frontend
