"""The "ready" line's file read (its `environment` field) holds back none of the
supervisor's duties after READY=1: a real `run_supervisor` in this process,
its worker a real process."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from pathlib import Path

from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import load_config
from fleet_ingress.service import supervisor_process as supervisor_module
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.store_keeping import fd_store_picture
from fleet_ingress.service.supervisor import Supervisor
from fleet_ingress.service.supervisor_process import run_supervisor
from tests.support import TLSFiles, eventually, write_run_home


class _Recorded(Notifier):
    """systemd's side: what the supervisor tells it, one message a list."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        # WatchdogSec=2: a ping a second
        super().__init__({"WATCHDOG_USEC": "2000000", **(environ or {})})
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *lines: str) -> None:
        self.sent.append(lines)


async def test_a_stalled_read_for_the_ready_line_holds_back_no_watchdog_ping(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch
) -> None:
    """The ready line reads the configuration file in a thread (13cf33e), but
    the supervisor awaited it before it started its tasks: the watchdog's
    pings, the admin socket, reloads, snapshots. A file slow to read (a stalled
    mount) went unpinged past WatchdogSec=, and systemd aborted the supervisor.
    The line waits for its read alone."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=a"], workers=1, drain=1)
    config = load_config(tmp_path / "ingress.toml")
    fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
    read_may_end = threading.Event()
    reads: list[Path] = []

    def stalled_read(path: Path) -> list[str]:
        reads.append(path)
        read_may_end.wait(30)
        return []

    monkeypatch.setattr(supervisor_module, "environment_values", stalled_read)
    monkeypatch.chdir(tmp_path)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    notifier = _Recorded()
    supervisor = Supervisor(config, fleets, tmp_path / "ingress.toml")
    running = asyncio.ensure_future(run_supervisor(supervisor, notifier))

    def after_ready() -> list[tuple[str, ...]]:
        ready = [n for n, lines in enumerate(notifier.sent) if "READY=1" in lines]
        return notifier.sent[ready[0] + 1 :] if ready else []

    try:
        await eventually(lambda: reads or running.done(), timeout=20)
        assert not running.done(), running.exception()
        # The read stalls on: systemd hears from the supervisor all the same.
        await eventually(
            lambda: any("WATCHDOG=1" in lines for lines in after_ready()) or running.done(),
            timeout=5,
        )
        assert not running.done(), running.exception()
        assert any("WATCHDOG=1" in lines for lines in after_ready()), notifier.sent
        assert not read_may_end.is_set()
    finally:
        read_may_end.set()
        supervisor.stop_asked.set()
        try:
            await asyncio.wait_for(running, 30)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            await supervisor.close()


async def test_a_hung_read_of_the_fd_store_limit_holds_back_no_start(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch
) -> None:
    """systemd 252 sets no $FDSTORE: the limit is read with `systemctl show`
    (3 s at most), and the supervisor awaited it before it handled a signal or
    started serving (after a crash: its workers' slot requests unanswered). A
    hung D-Bus held every start that long. It is read in the background now:
    what is stored meanwhile is counted, then set against the limit once
    known, what systemd would not keep said as a full store."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=a"], workers=1, drain=1)
    config = load_config(tmp_path / "ingress.toml")
    fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
    read_may_end = threading.Event()

    def hung_read(*_: object, **__: object) -> int:
        read_may_end.wait(30)
        return 2

    monkeypatch.setattr(supervisor_module, "read_store_max", hung_read)
    monkeypatch.chdir(tmp_path)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    notifier = _Recorded({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    supervisor = Supervisor(config, fleets, tmp_path / "ingress.toml")
    running = asyncio.ensure_future(run_supervisor(supervisor, notifier))
    try:
        await eventually(
            lambda: any("READY=1" in lines for lines in notifier.sent) or running.done(),
            timeout=8,
        )
        assert not running.done(), running.exception()
        assert any("READY=1" in lines for lines in notifier.sent), notifier.sent
        picture = fd_store_picture(supervisor.notifier)
        assert picture is not None and picture["max"] is None, picture
        stored = picture["kept"]
        assert stored > 2 and picture["not_kept"] == 0, picture  # listeners, channel, state
        read_may_end.set()
        await eventually(lambda: notifier.store_max == 2, timeout=5)
        after = fd_store_picture(supervisor.notifier)
        assert after == {"kept": 2, "max": 2, "not_kept": stored - 2, "unkept": stored - 2}, after
    finally:
        read_may_end.set()
        supervisor.stop_asked.set()
        try:
            await asyncio.wait_for(running, 30)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            await supervisor.close()
            receiver.close()
