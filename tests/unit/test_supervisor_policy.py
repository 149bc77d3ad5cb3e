"""The supervisor's small decisions, without processes."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from fleet_ingress.logs import _FIELDS
from fleet_ingress.service.worker import _pin_to, _say_pinned
from fleet_ingress.service.worker_exits import exit_status
from fleet_ingress.service.worker_pool import (
    RESPAWN_DELAY_MAX,
    pick_cpu,
    pick_rank,
    respawn_delay,
)


@pytest.mark.parametrize(
    ("quick_deaths", "delay"),
    [(0, 0.0), (1, 0.0), (2, 0.1), (3, 0.2), (4, 0.4), (9, 10.0), (50, RESPAWN_DELAY_MAX)],
)
def test_a_lone_crash_is_replaced_at_once_a_crash_loop_ever_slower(
    quick_deaths: int, delay: float
) -> None:
    assert respawn_delay(quick_deaths) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (0, "exit 0"),
        (2, "exit 2"),
        (-9, "killed by SIGKILL"),
        (-15, "killed by SIGTERM"),
        (None, "running"),
    ],
)
def test_exit_status_names_the_signal(code: int | None, said: str) -> None:
    assert exit_status(code) == said


@pytest.mark.parametrize(
    ("allowed", "taken", "cpu"),
    [
        ([0, 1], [], 0),
        ([0, 1], [0], 1),
        ([0, 1], [0, 1], 0),  # more workers than CPUs: round-robin
        ([0, 1], [1], 0),  # a replacement takes the CPU its predecessor freed
        ([2, 5, 7], [2, 5], 7),  # the affinity mask's CPUs, not 0..N-1
        ([2, 5], [0, 1, 1, 2], 5),  # CPUs no longer allowed count for nothing
    ],
)
def test_a_new_worker_goes_to_the_least_taken_allowed_cpu(
    allowed: list[int], taken: list[int], cpu: int
) -> None:
    assert pick_cpu(allowed, taken) == cpu


def test_a_worker_whose_cpu_is_gone_runs_unpinned_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """process.cpu_affinity: a CPU the worker cannot run on (a cpuset or
    hotplug change since the supervisor chose it) is a warning, not a refusal
    to serve; the affinity stays what it was."""
    before = os.sched_getaffinity(0)
    no_such_cpu = max(before) + 4096
    with caplog.at_level(logging.INFO, logger="fleet_ingress.worker"):
        # Pinned (or not) before logging is set up, so that every thread the
        # worker starts inherits it; said once it is.
        failed = _pin_to(no_such_cpu)
        assert failed  # why, e.g. "Invalid argument"
        _say_pinned(no_such_cpu, failed)
    assert os.sched_getaffinity(0) == before
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "runs unpinned" in record.getMessage()
    assert getattr(record, _FIELDS)["cpu"] == no_such_cpu


async def test_the_watchdog_hears_from_the_supervisor_often_not_at_half_of_watchdogsec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pinged at half of WatchdogSec (or every STATUS_EVERY), a loop stuck for
    as little as half of it ended the unit, every call on the host with it
    (the pressure audit of session 16). Pinged every WATCHDOG_PING_EVERY, it
    takes a stall of WatchdogSec; STATUS= stays every STATUS_EVERY."""

    from fleet_ingress.service import supervisor_process as module

    class Heard:
        watchdog_interval = 15.0  # WatchdogSec=30

        def __init__(self) -> None:
            self.lines: list[str] = []

        def notify(self, *lines: str) -> None:
            self.lines += lines

    class Status:
        looks = 0

        def status_line(self) -> str:
            return "2 calls"

        def look_at_files_soon(self) -> None:  # for the next status line, not awaited
            self.looks += 1

    monkeypatch.setattr(module, "WATCHDOG_PING_EVERY", 0.05)
    heard, status = Heard(), Status()
    task = asyncio.ensure_future(module._keep_systemd_informed(status, heard))  # type: ignore[arg-type]
    await asyncio.sleep(0.6)
    task.cancel()
    assert heard.lines.count("WATCHDOG=1") >= 5, heard.lines
    assert heard.lines.count("STATUS=2 calls") == 1 and status.looks == 1
    starting = Heard()  # before READY=1 (an upgrade's new image starting) likewise
    task = asyncio.ensure_future(module._ping_watchdog(starting))  # type: ignore[arg-type]
    await asyncio.sleep(0.6)
    task.cancel()
    assert starting.lines.count("WATCHDOG=1") >= 5, starting.lines


def test_a_worker_not_our_child_runs_while_its_process_is_there():
    """After the previous supervisor died, the workers taken up from systemd's fd
    store are systemd's children, not ours: whether one still runs (its slots
    kept while it drains without its channel) is read from /proc."""

    from fleet_ingress.service.worker_exits import child_running

    # A grandchild: its parent (the shell) exits, so it is not ours either.
    done = subprocess.run(
        [
            "sh",
            "-c",
            f"{sys.executable} -c 'import time; time.sleep(30)' >/dev/null 2>&1 & echo $!",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    pid = int(done.stdout.strip())
    try:
        with pytest.raises(ChildProcessError):
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        assert child_running(pid)
    finally:
        os.kill(pid, 9)
    for _ in range(200):  # reaped by whoever adopted it (init, a subreaper)
        if not child_running(pid):
            break
        time.sleep(0.01)
    assert not child_running(pid)
    assert not child_running(0)


async def test_a_workers_one_off_task_that_raises_is_said_and_counted(caplog):
    """A worker's reload or forced removal task that raised was left to asyncio's
    "exception never retrieved", said only if and when the task was collected
    (the worker crash-path audit of session 27: `remove-fleet --force` said its
    calls were closed while one went on)."""

    from fleet_ingress.net.event_loop import unexpected_errors
    from fleet_ingress.service.worker import say_if_task_failed

    async def close_fleet() -> None:
        raise RuntimeError("a bug closing a removed fleet's calls")

    async def fine() -> None:
        return None

    before = unexpected_errors()
    for coro in (close_fleet(), fine()):
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(say_if_task_failed)
        await asyncio.wait([task])
    await asyncio.sleep(0)
    (said,) = [r for r in caplog.records if r.getMessage().startswith("worker task failed")]
    assert said.fields["task"].endswith("close_fleet") and said.exc_info is not None  # type: ignore[attr-defined]
    assert unexpected_errors() == before + 1


async def test_a_removed_fleets_calls_are_all_aborted_even_when_ending_one_raises(monkeypatch):
    """`remove-fleet --force` in a worker (Worker.close_fleet): a bug ending one
    call must not leave the others up on the removed fleet, their slots held."""

    from fleet_ingress.service import worker

    monkeypatch.setattr(worker, "FORCED_REMOVAL_WAIT", 0.05)

    class Call:
        def __init__(self, fails: bool) -> None:
            self.fails, self.aborted = fails, False

        def end(self, reason: object) -> None:
            if self.fails:
                raise RuntimeError("a bug ending a call")

        def abort(self) -> None:
            self.aborted = True

    calls = [Call(fails=True), Call(fails=False)]
    registry = SimpleNamespace(calls_on=lambda name: [c for c in calls if not c.aborted])
    sent: list[dict[str, object]] = []
    host = SimpleNamespace(
        ingress=SimpleNamespace(registry=registry), client=SimpleNamespace(send=sent.append)
    )
    with pytest.raises(RuntimeError):
        await worker.Worker.close_fleet(host, "a", 7)  # type: ignore[arg-type]
    assert [c.aborted for c in calls] == [True, True]
    # The supervisor is told how many it closed, all the same: remove-fleet prints it.
    assert sent == [{"op": "fleet-closed", "id": 7, "closed": 2}]


async def test_the_ready_line_reads_the_configuration_file_off_the_loop(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After READY=1 the supervisor's loop answers its workers' slot requests:
    the ready line's environment field read the file on it, so a file slow to
    read (here a FIFO no one writes yet; a stalled mount) held every slot
    request. Read in a thread, as a reload reads it: the loop runs meanwhile."""
    from fleet_ingress.service.supervisor_process import _log_ready

    monkeypatch.setenv("FLEET_INGRESS_TIMEOUTS__QUEUE", "7")
    config = tmp_path / "ingress.toml"
    os.mkfifo(config)
    supervisor = SimpleNamespace(config_path=config, status_line=lambda: "1 worker")
    caplog.set_level(logging.INFO, logger="fleet_ingress")
    # Opening the FIFO for writing, a second from now, lets the reader's open return.
    writer = threading.Timer(1.0, config.write_text, ("[timeouts]\nqueue = 3\n",))
    # Daemon: were the FIFO never read (the code broken), its open would block
    # for ever and the test run hang at exit, not fail.
    writer.daemon = True
    writer.start()
    try:
        ready = asyncio.create_task(_log_ready(supervisor))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)  # the loop is free: this sleep ends before the read
        assert not ready.done()
        await asyncio.wait_for(ready, 5)
    finally:
        writer.join(5)
    (record,) = [r for r in caplog.records if r.getMessage() == "ready"]
    (line,) = getattr(record, _FIELDS)["environment"]
    assert line.startswith("timeouts.queue = '7' from environment variable") and "file's 3" in line


@pytest.mark.parametrize(
    ("taken", "rank"),
    [
        ([], 0),  # the first worker of a generation
        ([0], 1),
        ([0, 1, 2], 3),
        ([1, 2], 0),  # rank 0 died: its replacement takes rank 0 (process.accept)
        ([0, 2], 1),
        ([0, 0, 1], 2),  # a rank held twice (an exec's carried one): the next free
    ],
)
def test_a_new_worker_takes_the_least_rank_its_generation_does_not_hold(taken, rank):
    assert pick_rank(taken) == rank
