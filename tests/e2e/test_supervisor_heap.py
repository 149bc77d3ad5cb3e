"""The supervisor gives its freed heap back to the kernel, as the workers do
(service/glibc_malloc.py): a real `run_supervisor` in this process, its worker
a real process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import load_config
from fleet_ingress.service import glibc_malloc
from fleet_ingress.service.supervisor import Supervisor
from fleet_ingress.service.supervisor_process import run_supervisor
from tests.support import TLSFiles, eventually, write_run_home


async def test_the_supervisor_trims_its_heap_as_the_workers_do(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch
) -> None:
    """Only the workers trimmed: the supervisor's heap grew with the calls it
    coordinated (slot requests, reports) while nothing in it leaked (the leak
    audit of session 33: 72 to 74 MB over 20,000 short calls, climbing at the
    same pace to the end; `malloc_trim(0)` gave back 1.3 MB of a 1.6 MB rise)."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=a"], workers=1, drain=1)
    config = load_config(tmp_path / "ingress.toml")
    fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
    trims: list[None] = []
    monkeypatch.setattr(glibc_malloc, "TRIM_EVERY", 0.05)
    monkeypatch.setattr(glibc_malloc, "trim", lambda: trims.append(None))
    monkeypatch.chdir(tmp_path)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    supervisor = Supervisor(config, fleets, tmp_path / "ingress.toml")
    running = asyncio.ensure_future(run_supervisor(supervisor))
    try:
        await eventually(lambda: len(trims) >= 3 or running.done(), timeout=15)
        assert not running.done(), running.exception()
        assert len(trims) >= 3
    finally:
        supervisor.stop_asked.set()
        try:
            await asyncio.wait_for(running, 30)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            await supervisor.close()
