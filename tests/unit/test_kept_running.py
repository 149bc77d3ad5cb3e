"""The supervisor's background tasks are kept running whatever one of them
raises (service/kept_running.py), and the watchdog's ping does not depend on
the status line (the supervisor-crash audit of session 26: one exception in
either stopped the pings, and systemd then ended every call on the host)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from fleet_ingress.service import kept_running as kr
from fleet_ingress.service.kept_running import TaskFailures, kept_running, say_if_failed
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.supervisor_process import _keep_systemd_informed, _reloader_failed


async def test_a_task_that_raises_is_said_counted_and_started_again(monkeypatch, caplog):
    monkeypatch.setattr(kr, "RETRY_FIRST", 0.01)
    failures = TaskFailures(("pulls", "other"))
    starts: list[int] = []
    told: list[int] = []

    async def flaky() -> None:
        starts.append(len(starts))
        if len(starts) <= 2:
            raise RuntimeError(f"bug {len(starts)}")

    caplog.set_level(logging.ERROR, "fleet_ingress.supervisor")
    async with asyncio.timeout(5):
        await kept_running("pulls", flaky, failures, after_failure=lambda: told.append(1))
    assert len(starts) == 3  # two failures, then it ran to its end
    assert told == [1, 1]
    assert failures.by_task == {"pulls": 2, "other": 0}
    failed = [r for r in caplog.records if r.getMessage().startswith("supervisor task failed")]
    assert [r.exc_info[1].args[0] for r in failed] == ["bug 1", "bug 2"]
    assert [r.fields["task"] for r in failed] == ["pulls", "pulls"]  # type: ignore[attr-defined]


async def test_the_wait_between_starts_doubles_up_to_its_cap(monkeypatch):
    monkeypatch.setattr(kr, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(kr, "RETRY_MAX", 0.04)
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(kr.asyncio, "sleep", sleep)
    runs = 0

    async def failing() -> None:
        nonlocal runs
        runs += 1
        if runs < 6:
            raise ValueError("again")

    await kept_running("t", failing, TaskFailures())
    assert waits == [0.01, 0.02, 0.04, 0.04, 0.04]


async def test_cancelling_it_cancels_the_task_and_is_no_failure():
    failures = TaskFailures()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.ensure_future(kept_running("forever", forever, failures))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    assert failures.by_task == {}


async def test_a_one_off_task_that_fails_is_said_at_once_by_name(caplog):
    failures = TaskFailures()
    caplog.set_level(logging.ERROR, "fleet_ingress.supervisor")

    async def start_replacement() -> None:
        raise KeyError("x")

    async def fine() -> None:
        return None

    for coro in (start_replacement(), fine()):
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(say_if_failed(failures))
        await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks run on the next turn
    name = "test_a_one_off_task_that_fails_is_said_at_once_by_name.<locals>.start_replacement"
    assert failures.by_task == {name: 1}
    (record,) = [r for r in caplog.records if r.getMessage().startswith("supervisor task")]
    assert record.fields["task"] == name  # type: ignore[attr-defined]


async def test_the_watchdog_is_pinged_though_the_status_line_cannot_be_made(
    tmp_path: Path, monkeypatch
):
    """With WATCHDOG_USEC set, `_keep_systemd_informed` pings every second: a
    status line that raises must not keep the ping from going first."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    monkeypatch.setattr("fleet_ingress.service.supervisor_process.WATCHDOG_PING_EVERY", 0.02)
    monkeypatch.setattr("fleet_ingress.service.supervisor_process.STATUS_EVERY", 0.0)
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"})

    class Broken:
        def status_line(self) -> str:
            raise RuntimeError("a bug in the status line")

    informed = asyncio.ensure_future(
        kept_running(
            "systemd status",
            lambda: _keep_systemd_informed(Broken(), notifier),  # type: ignore[arg-type]
            TaskFailures(),
        )
    )
    try:
        await asyncio.sleep(0.5)
    finally:
        informed.cancel()
        notifier.close()
    got = []
    while True:
        try:
            got.append(receiver.recv(200))
        except BlockingIOError:
            break
    receiver.close()
    assert got.count(b"WATCHDOG=1") >= 3, got


@pytest.mark.parametrize("upgrade_state", [None, "trial run", "done"])
async def test_a_reload_task_that_crashes_says_ready_only_when_no_upgrade_is_under_way(
    tmp_path: Path, upgrade_state: str | None
):
    """The reload task (`_reload_on_signal`) raising: its asker is told the
    reload failed, and systemd hears READY=1 as after any round, but not while
    an upgrade is under way (its RELOADING=1 would read as over, and the
    upgrade's STATUS lose "upgrading"): only the STATUS= then."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    asked: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    class Upgrade:
        latest = None if upgrade_state is None else {"state": upgrade_state}

    class Supervisor:
        upgrade = Upgrade()
        reload_in_hand = [asked]

    async def crashing() -> None:
        raise RuntimeError("a bug in the reload task")

    reloader = asyncio.ensure_future(
        kept_running(
            "reloads",
            crashing,
            TaskFailures(),
            after_failure=lambda: _reloader_failed(Supervisor(), notifier),  # type: ignore[arg-type]
        )
    )
    try:
        outcome = await asyncio.wait_for(asked, 5)
    finally:
        reloader.cancel()
        notifier.close()
    said = receiver.recv(400).decode().splitlines()
    receiver.close()
    assert outcome["result"] == "failed"
    if upgrade_state == "trial run":
        assert "READY=1" not in said, said
        assert said == ["STATUS=reload failed; see the log (an upgrade is under way)"]
    else:
        assert said == ["READY=1", "STATUS=reload failed; see the log"]
