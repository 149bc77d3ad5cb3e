"""service.supervisor_process._drain_after_failed_resume's kill of the children it did
not take up, with a real child process and a stall (the loop blocked, as a
SIGSTOP or a paused VM leaves it) while the adopted workers are waited for."""

from __future__ import annotations

import asyncio
import signal
import time
from types import SimpleNamespace

from fleet_ingress.service import supervisor_process as supervisor_module
from fleet_ingress.service.sdnotify import Notifier


async def test_children_not_taken_up_get_their_grace_after_a_stall_during_the_wait(monkeypatch):
    """A stall past the deadline while the adopted workers were waited for: a
    child not taken up, continued with this process, closes its calls (here: it
    ends 0.4 s after) within the stall's grace (2 s here), not killed on the
    kill loop's first ask (its PatientDeadline was made after the wait, blind
    to the stall: the child's calls cut with no close frame)."""
    monkeypatch.setattr(supervisor_module, "STOP_GRACE", 0.2)
    monkeypatch.setattr(supervisor_module, "_STALL_GRACE", 2.0)
    child = await asyncio.create_subprocess_exec("sleep", "30")
    monkeypatch.setattr(
        supervisor_module,
        "children_running",
        lambda: [child.pid] if child.returncode is None else [],
    )
    loop = asyncio.get_running_loop()

    async def wait_workers(timeout: float) -> None:
        await asyncio.sleep(0.05)
        time.sleep(timeout + 0.5)  # noqa: ASYNC251 (the stall: over the deadline)
        loop.call_later(0.4, child.send_signal, signal.SIGTERM)  # it closed its calls

    async def stop_accepting() -> None:
        pass

    supervisor = SimpleNamespace(
        upgrade=SimpleNamespace(crash_restart=False),
        config=SimpleNamespace(timeouts=SimpleNamespace(drain=0.3)),
        stop_accepting=stop_accepting,
        handed={},
        pool=SimpleNamespace(wait_workers=wait_workers),
    )
    try:
        async with asyncio.timeout(10):
            await supervisor_module._drain_after_failed_resume(
                supervisor,  # type: ignore[arg-type]
                Notifier(environ={}),
            )
            assert await child.wait() == -signal.SIGTERM  # its own end, not SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
