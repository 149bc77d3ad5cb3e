"""`fleet-ingress run` as systemd runs it: a real process, real signals, the
notify protocol on a real datagram socket, live calls throughout (issue #5)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.client import connect

from fleet_ingress.sim import SimulatedFleet, run_calls
from tests.support import IngressOnLoopback, TLSFiles, eventually, free_port

CLI = [sys.executable, "-m", "fleet_ingress"]


def _write_cert(
    ca: trustme.CA, home: Path, key_type: trustme.KeyType = trustme.KeyType.ECDSA
) -> str:
    """Issue a fresh leaf into cert.pem/key.pem (as certbot's renewal does); its serial."""
    leaf = ca.issue_cert("127.0.0.1", "localhost", key_type=key_type)
    cert, key = home / "cert.pem", home / "key.pem"
    tmp_cert, tmp_key = home / "cert.pem.new", home / "key.pem.new"
    tmp_cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(tmp_key)
    os.replace(tmp_key, key)
    os.replace(tmp_cert, cert)
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
    return f"{serial:X}"


@dataclass
class Service(IngressOnLoopback):
    """(Its log and log_tail: it runs without a stats listener.)"""

    proc: asyncio.subprocess.Process
    home: Path
    port: int
    messages: list[str] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # each message's, time.monotonic()

    def seen(self, line: str) -> int:
        return sum(line in m.splitlines() for m in self.messages)

    async def wait_for(self, line: str, count: int = 1, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.seen(line) < count:
                if self.proc.returncode is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {self.log_tail()}")
                await asyncio.sleep(0.02)

    def status(self) -> str:
        statuses = [s for m in self.messages for s in m.splitlines() if s.startswith("STATUS=")]
        return statuses[-1] if statuses else ""

    def logged(self, event: str, **match: object) -> bool:
        """A complete JSON line of `event` whose fields include `match` is in the log
        (read as it is, without the wait of `log()`: for polling)."""
        for line in (self.home / "stderr.log").read_text().splitlines(keepends=True):
            if line.startswith("{") and line.endswith("\n"):
                entry = json.loads(line)
                if entry.get("event") == event and all(entry.get(k) == v for k, v in match.items()):
                    return True
        return False


def _config(home: Path, tls_files: TLSFiles, port: int, drain: float, extra: str = "") -> str:
    return f"""
[listen]
wss = "127.0.0.1:{port}"
acme = ""
stats = ""
admin_socket = ""

[tls]
cert = "cert.pem"
key = "key.pem"

[fleets]
ca_file = "{tls_files.ca_pem}"
check_interval = 0.2
# The fleets answer from this test's own event loop, beside the carriers: on a
# loaded host a probe can wait over a second for it. Patient probes (as
# test_upgrade's PATIENT_PROBES): a fleet's first probe passes within READY's
# wait for it, and no fleet goes DOWN for this test's own load.
check_timeout = 5
fall = 5

[timeouts]
drain = {drain}

[log]
format = "json"
{extra}
"""


@pytest.fixture
async def fleets(tls_files: TLSFiles) -> AsyncIterator[dict[str, SimulatedFleet]]:
    sims = {n: SimulatedFleet(name=n, ssl_context=tls_files.fleet_server_context()) for n in "abc"}
    for sim in sims.values():
        await sim.start()
    yield sims
    for sim in sims.values():
        await sim.stop()


async def _start(
    tls_files: TLSFiles, fleet_lines: list[str], *, drain: float = 30, watchdog_usec: int = 0
) -> Service:
    home = Path(tempfile.mkdtemp(prefix="fi-"))
    _write_cert(tls_files.ca, home)
    port = await free_port()
    (home / "fleets.txt").write_text("\n".join(fleet_lines) + "\n")
    (home / "ingress.toml").write_text(_config(home, tls_files, port, drain))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(home / "notify.sock"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(home / "notify.sock")}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "run",
        "-c",
        str(home / "ingress.toml"),
        env=env,
        stderr=(home / "stderr.log").open("wb"),  # the JSON log lines
    )
    service = Service(proc, home, port)
    loop = asyncio.get_running_loop()

    def on_datagram() -> None:
        try:
            while True:
                service.messages.append(notify.recv(4096).decode())
                service.arrived.append(time.monotonic())
        except BlockingIOError:
            pass

    loop.add_reader(notify.fileno(), on_datagram)
    service.close_notify = lambda: (loop.remove_reader(notify.fileno()), notify.close())  # type: ignore[attr-defined]
    try:
        await service.wait_for("READY=1", timeout=30)  # a loaded host: 20 s once was not
    except BaseException:
        await _finish(service)
        raise
    return service


async def _finish(service: Service) -> int:
    if service.proc.returncode is None:
        service.proc.kill()
    code = await service.proc.wait()
    service.close_notify()  # type: ignore[attr-defined]
    shutil.rmtree(service.home, ignore_errors=True)
    return code


async def _peer_serial(service: Service, tls_files: TLSFiles) -> str:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", service.port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    serial = writer.get_extra_info("peercert")["serialNumber"]
    writer.close()
    return serial.lstrip("0")


async def _call_fleet(service: Service, tls_files: TLSFiles) -> str:
    async with connect(
        f"wss://127.0.0.1:{service.port}/ws/probe", ssl=tls_files.client_context()
    ) as ws:
        assert ws.response is not None
        return ws.response.headers["X-Fleet"]


# The calls must still be up after the three reloads below: about 1 s from the
# calls' start to the last check idle (each reload 0.05-0.15 s), over 10 s left
# here for a loaded host.
CALL_SECONDS = 12.0


@pytest.mark.uvloop_only
async def test_sighup_renews_cert_refuses_bad_config_and_changes_fleets_with_calls_up(
    tls_files: TLSFiles, fleets
):
    a, b, c = fleets["a"], fleets["b"], fleets["c"]
    service = await _start(tls_files, [f"{a.url} name=a", f"{b.url} name=b"])
    try:
        # READY waits for each fleet's first probe, not for it to pass; STATUS= is
        # sent again every 10 s.
        await eventually(lambda: "2/2 fleets up" in service.status(), timeout=25)
        calls = asyncio.create_task(
            run_calls(
                f"wss://127.0.0.1:{service.port}",
                20,
                ssl_context=tls_files.client_context(),
                duration=CALL_SECONDS,
                stagger=0.02,
            )
        )
        await eventually(lambda: a.active_calls + b.active_calls == 20, timeout=15)
        assert a.active_calls == 10 and b.active_calls == 10
        old_serial = await _peer_serial(service, tls_files)

        # 1. certbot renewed, from ECDSA to RSA (`--key-type rsa`): new handshakes see
        # the new certificate, not the old ECDSA one beside it.
        new_serial = _write_cert(tls_files.ca, service.home, trustme.KeyType.RSA).lstrip("0")
        assert new_serial != old_serial
        service.proc.send_signal(signal.SIGHUP)
        await service.wait_for("RELOADING=1")
        await service.wait_for("READY=1", count=2)
        assert await _peer_serial(service, tls_files) == new_serial

        # 2. A broken configuration is refused whole; the old one serves on.
        config = service.home / "ingress.toml"
        good = config.read_text()
        config.write_text(good.replace("[fleets]", "[fleets]\nmaxcon = 3"))
        service.proc.send_signal(signal.SIGHUP)
        await service.wait_for("READY=1", count=3)
        assert "reload refused" in service.status() and "maxcon" in service.status()
        assert await _call_fleet(service, tls_files) in ("a", "b")
        config.write_text(good)

        # 3. Fleets file: add c, remove a. New calls avoid a; a's calls go on.
        (service.home / "fleets.txt").write_text(f"{b.url} name=b\n{c.url} name=c\n")
        service.proc.send_signal(signal.SIGHUP)
        await service.wait_for("READY=1", count=4)
        await eventually(lambda: service.logged("fleet UP", fleet="c"), timeout=15)
        seen = {await _call_fleet(service, tls_files) for _ in range(4)}
        assert seen == {"c"}  # leastconn: c has no calls, b has 10; a is draining
        assert a.active_calls == 10

        results = await calls
        assert [r.ok for r in results] == [True] * 20, [r.error for r in results if not r.ok]
        assert sum(r.lost_frames for r in results) == 0
        # At least 6/7 of the frames each call sends (one every 20 ms).
        assert sum(r.frames_received for r in results) >= 20 * CALL_SECONDS / 0.02 * 6 / 7
        assert service.proc.returncode is None
    finally:
        await _finish(service)


@pytest.mark.uvloop_only
async def test_sigterm_refuses_new_connections_and_waits_for_calls(tls_files: TLSFiles, fleets):
    a = fleets["a"]
    service = await _start(tls_files, [f"{a.url} name=a"], watchdog_usec=400_000)
    try:
        # Once serving, WATCHDOG=1 every 0.2 s (half of WATCHDOG_USEC, as systemd
        # advises; the pings before READY=1 are another task's): ten in a row
        # come, on average more often than WatchdogSec (0.4 s), after which
        # systemd would end the service. At 0.2 s they span 1.8 s.
        ready = next(i for i, m in enumerate(service.messages) if "READY=1" in m.splitlines())

        def pings() -> list[float]:
            after = zip(service.messages[ready + 1 :], service.arrived[ready + 1 :], strict=True)
            return [at for m, at in after if "WATCHDOG=1" in m.splitlines()]

        await eventually(lambda: len(pings()) >= 10, timeout=10)
        span = pings()[9] - pings()[0]
        assert span < 9 * 0.4, (span, service.messages)
        calls = asyncio.create_task(
            run_calls(
                f"wss://127.0.0.1:{service.port}",
                3,
                ssl_context=tls_files.client_context(),
                duration=2.5,
            )
        )
        await eventually(lambda: a.active_calls == 3, timeout=10)
        service.proc.send_signal(signal.SIGTERM)
        await service.wait_for("STOPPING=1", timeout=3)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", service.port)
        assert service.proc.returncode is None  # still draining
        results = await calls
        assert all(r.ok and r.lost_frames == 0 for r in results)
        started = time.monotonic()
        async with asyncio.timeout(5):
            code = await service.proc.wait()
        assert code == 0
        assert time.monotonic() - started < 2  # exits once the last call ended
    finally:
        await _finish(service)


@pytest.mark.uvloop_only
async def test_drain_time_runs_out_and_a_second_signal_exits_at_once(tls_files: TLSFiles, fleets):
    a = fleets["a"]
    service = await _start(tls_files, [f"{a.url} name=a"], drain=1.0)
    try:
        ws = await connect(
            f"wss://127.0.0.1:{service.port}/ws/long", ssl=tls_files.client_context()
        )
        service.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        async with asyncio.timeout(5):
            code = await service.proc.wait()
        assert code == 0 and 0.9 <= time.monotonic() - started < 3
        with pytest.raises(Exception):  # noqa: B017 - closed by the drain, any close form
            async with asyncio.timeout(2):
                await ws.recv()
    finally:
        await _finish(service)

    service = await _start(tls_files, [f"{a.url} name=a"], drain=60)
    try:
        ws = await connect(
            f"wss://127.0.0.1:{service.port}/ws/long", ssl=tls_files.client_context()
        )
        service.proc.send_signal(signal.SIGTERM)
        await service.wait_for("STOPPING=1", timeout=3)
        service.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(3):
            code = await service.proc.wait()
        assert code == 0
        await ws.close()
        # The call cut by the second signal still has its access-log line.
        logged = [
            json.loads(line) for line in (service.home / "stderr.log").read_text().splitlines()
        ]
        ended = [e for e in logged if e.get("event") == "call ended"]
        assert [(e["bot_id"], e["end_reason"]) for e in ended] == [("long", "drain")], logged
    finally:
        await _finish(service)


@pytest.mark.uvloop_only
async def test_sighup_applies_log_settings_and_warns_that_listeners_need_a_restart(
    tls_files: TLSFiles, fleets
):
    a = fleets["a"]
    service = await _start(tls_files, [f"{a.url} name=a"])
    try:
        config = service.home / "ingress.toml"
        good = config.read_text()
        config.write_text(
            good.replace('stats = ""', 'stats = "127.0.0.1:9"').replace(
                'format = "json"', 'format = "text"'
            )
        )
        service.proc.send_signal(signal.SIGHUP)
        await service.wait_for("READY=1", count=2)
        lines = (service.home / "stderr.log").read_text().splitlines()
        warning = json.loads(next(line for line in lines if "listener not moved" in line))
        assert (warning["level"], warning["key"], warning["configured"]) == (
            "warning",
            "listen.stats",
            "127.0.0.1:9",
        )
        # The reload's own line already comes in the new format.
        assert lines[-1].startswith("info    fleet_ingress.lifecycle: reloaded "), lines[-1]
        assert "listen.stats changed: takes effect at the next restart" in lines[-1]
        # Back to what is bound: nothing to warn about.
        config.write_text(good)
        service.proc.send_signal(signal.SIGHUP)
        await service.wait_for("READY=1", count=3)
        last = (service.home / "stderr.log").read_text().splitlines()[-1]
        # Nothing about the listener; the format, back, said applied.
        assert json.loads(last)["changes"] == "applied: log.format text -> json"
    finally:
        await _finish(service)


async def test_the_watchdog_is_fed_while_the_supervisor_starts(tls_files: TLSFiles, fleets):
    """Starting (workers, first probes; after an upgrade's exec, a new
    generation) can outlast WatchdogSec: systemd must hear WATCHDOG=1 before
    READY=1, or it kills the service, old workers included."""
    a = fleets["a"]
    service = await _start(tls_files, [f"{a.url} name=a"], watchdog_usec=400_000)
    try:
        lines = [line for m in service.messages for line in m.splitlines()]
        assert "WATCHDOG=1" in lines[: lines.index("READY=1")], lines
    finally:
        await _finish(service)
