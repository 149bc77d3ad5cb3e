"""What /stats.json says of the files on disk right after a reload: what that
reload read, though looking at the files takes longer than a scrape waits for
it (LOOK_WAIT) on a loaded host. A real `run_supervisor` in this process (the
look's key check slowed here, as a loaded host slowed it), its worker a real
process, /stats.json over loopback."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import load_config
from fleet_ingress.service import files_on_disk
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.supervisor import Supervisor
from fleet_ingress.service.supervisor_process import run_supervisor
from tests.support import TLSFiles, eventually, write_run_home


class _Quiet(Notifier):
    """No systemd here: what the supervisor would tell it is dropped."""

    def __init__(self) -> None:
        super().__init__({})

    def notify(self, *lines: str) -> None:
        pass


async def _stats(supervisor: Supervisor) -> dict[str, Any]:
    assert supervisor.stats_address is not None
    host, port = supervisor.stats_address
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/stats.json") as r:
            return await r.json()  # type: ignore[no-any-return]


async def test_a_scrape_right_after_a_refused_reload_says_why_though_the_look_is_slow(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch
) -> None:
    """certbot's renewal from ECDSA to RSA caught half way (the key written,
    not the certificate): `reload` says refused, and the scrape right after it
    said nothing of the files (`certificate_file` null, or the state before the
    key was written): the look it started took longer than LOOK_WAIT (a test
    beside other suites, load average 9, session 36), and what was seen before
    was shown. The reload's answer waits for a look begun after its read."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=a"], workers=1, drain=1)
    config = load_config(tmp_path / "ingress.toml")
    fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
    tries_key = files_on_disk.server_ssl_context

    def slow_key_check(*args: Any) -> Any:  # off the loop, in the look's thread
        time.sleep(2 * files_on_disk.LOOK_WAIT)
        return tries_key(*args)

    monkeypatch.setattr(files_on_disk, "server_ssl_context", slow_key_check)
    monkeypatch.chdir(tmp_path)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    supervisor = Supervisor(config, fleets, tmp_path / "ingress.toml")
    running = asyncio.ensure_future(run_supervisor(supervisor, _Quiet()))
    try:
        await eventually(lambda: supervisor.stats_address is not None or running.done(), 20)
        assert not running.done(), running.exception()
        renewal = tls_files.ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.RSA)
        renewal.private_key_pem.write_to_path(tmp_path / "key.pem")
        outcome = await asyncio.wait_for(supervisor.reload_and_wait(), 30)
        assert outcome["result"] == "refused" and "do not match" in outcome["error"], outcome
        on_disk = (await _stats(supervisor))["certificate_file"]
        assert on_disk is not None and "do not match" in (on_disk["refused"] or ""), on_disk
    finally:
        supervisor.stop_asked.set()
        try:
            await asyncio.wait_for(running, 30)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            await supervisor.close()
