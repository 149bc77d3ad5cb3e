"""A worker's call table (`net.call_table_map`, docs/WORKERS.md "The call
table") with standing budgets held (INGRESS_STANDING_BUDGETS=held), and with
the lone worker's budget of the default (session 46, its grants held): a worker
SIGKILLed at any moment gets one access line per call it took with it, and
none for a call it had ended and logged, whatever of its held messages
("acquire", "logged", "release") reached the supervisor. Real processes,
real TLS, fleets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from fleet_ingress.net.slot_client import HELD_FLUSH_ASKED
from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    RunningIngress,
    TLSFiles,
    close_calls,
    echo,
    fleets_up_or_finished,
)

pytestmark = pytest.mark.uvloop_only

HELD = {"INGRESS_STANDING_BUDGETS": "held"}


@pytest.fixture(params=["held", "lone"])
def budget_env(request) -> dict[str, str]:
    """Standing budgets held (the experiment switch), or none set: the only
    worker's lone budget, its grants held (the default, session 46)."""
    return HELD if request.param == "held" else {}


async def _start(
    tls_files: TLSFiles, sims: list[SimulatedFleet], env: dict[str, str] = HELD
) -> RunningIngress:
    """One worker (every call on it), its grants held (`env`); warmed by a call
    so that the worker holds its standing budget before the calls tested."""
    service = await RunningIngress.start(
        tls_files,
        [f"{sim.url} name={sim.name} maxconn=16" for sim in sims],
        workers=1,
        check_timeout=5,
        env=env,
    )
    service = await fleets_up_or_finished(service)
    ws = await _open(service, tls_files, "warm")
    await echo(ws)
    await ws.close()
    await asyncio.sleep(1.0)  # its releases told; the budget given back and given again
    return service


async def _open(service: RunningIngress, tls_files: TLSFiles, bot: str) -> ClientConnection:
    return await connect(service.url(f"/ws/{bot}"), ssl=tls_files.client_context(), open_timeout=15)


def _ended_lines(service: RunningIngress, prefix: str) -> list[dict[str, Any]]:
    """The access lines written so far of the calls whose bot id starts with `prefix`."""
    path = service.home / "stderr.log"
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        if prefix not in text:
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if entry.get("event") == "call ended" and str(entry.get("bot_id")).startswith(prefix):
            lines.append(entry)
    return lines


async def _slots_back_and_replaced(service: RunningIngress, victim: int, killed_at: float) -> None:
    async with asyncio.timeout(1.0):
        while sum(f["active"] for f in (await service.stats())["fleets"]) != 0:
            await asyncio.sleep(0.02)
    assert time.monotonic() - killed_at < 1.0
    async with asyncio.timeout(15):
        while True:
            rows = (await service.stats())["workers"]
            if rows and all(r["pid"] != victim for r in rows):
                break
            await asyncio.sleep(0.05)


async def test_a_worker_killed_right_after_granting_calls_gets_one_lost_line_per_call(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet], budget_env: dict[str, str]
) -> None:
    """The calls are granted from the standing budget, their "acquire" held
    (up to ANSWERS_FLUSH): killed before it went, the supervisor had not
    heard of them. Before the table, no line for them (SPEC 13 broken)."""
    service = await _start(tls_files, two_fleets, budget_env)
    calls: list[ClientConnection] = []
    try:
        (victim,) = (await service.stats())["workers"]
        calls += await asyncio.gather(
            *(_open(service, tls_files, f"granted-{i}") for i in range(6))
        )
        os.kill(victim["pid"], signal.SIGKILL)  # at once: its acquires likely still held
        killed_at = time.monotonic()
        await _slots_back_and_replaced(service, victim["pid"], killed_at)
        service.log()  # until the file stops growing
        lines = _ended_lines(service, "granted-")
        by_bot = Counter(e["bot_id"] for e in lines)
        assert by_bot == {f"granted-{i}": 1 for i in range(6)}, lines
        for e in lines:
            assert e["end_reason"] == "error" and e["worker_pid"] == victim["pid"], e
            assert "lost with it" in e["detail"] and e["fleet"] in ("a", "b"), e
            assert e["call_id"] and e["route"] and e["duration_s"] is not None, json.dumps(e)
        died = [e for e in service.log() if e["event"].startswith("worker died")]
        assert [(e["pid"], e["calls_lost"]) for e in died] == [(victim["pid"], 6)], died
    finally:
        await close_calls(calls)
        await service.finish()


async def test_a_worker_killed_right_after_logging_calls_writes_no_second_line(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet], budget_env: dict[str, str]
) -> None:
    """The calls end (the carrier closes), their lines written by the worker,
    their "logged" and "release" held (up to ANSWERS_FLUSH): killed before
    they went, the supervisor still had the calls open. Before the table, it
    wrote a second line for each ("lost with it"), counted them lost."""
    service = await _start(tls_files, two_fleets, budget_env)
    calls: list[ClientConnection] = []
    try:
        (victim,) = (await service.stats())["workers"]
        for i in range(4):
            calls.append(await _open(service, tls_files, f"logged-{i}"))
            await echo(calls[-1])
        # Their acquires and 101s told: the supervisor knows them (within
        # HELD_FLUSH_ASKED once it has asked after a probe, else ANSWERS_FLUSH).
        await asyncio.sleep(HELD_FLUSH_ASKED + 0.3)
        closed_at = time.monotonic()
        await asyncio.gather(*(ws.close() for ws in calls))
        # Killed once the worker has written their lines, before their "logged"
        # goes (ANSWERS_FLUSH after the first was held).
        while len(_ended_lines(service, "logged-")) < 4 and time.monotonic() - closed_at < 0.15:
            await asyncio.sleep(0.01)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        await _slots_back_and_replaced(service, victim["pid"], killed_at)
        service.log()
        lines = _ended_lines(service, "logged-")
        by_bot = Counter(e["bot_id"] for e in lines)
        assert by_bot == {f"logged-{i}": 1 for i in range(4)}, lines
        own = [e for e in lines if e["end_reason"] != "error"]
        assert own, f"no call ended before the kill: nothing tested ({lines})"
        assert not [e for e in own if "worker_pid" in e]
        died = [e for e in service.log() if e["event"].startswith("worker died")]
        assert [(e["pid"], e["calls_lost"]) for e in died] == [(victim["pid"], 4 - len(own))]
    finally:
        await close_calls(calls)
        await service.finish()


def _call_tables(pid: int) -> int:
    """The call tables (memfds) process `pid` holds open."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(
                "/memfd:fleet-ingress worker calls"
            )
    return held


async def test_an_old_workers_table_outlives_the_exec_and_names_its_calls_when_it_dies(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """An upgrade re-executes the supervisor: the tables of the workers it
    started go over the exec (named in the state carried), so one of the old
    generation killed after it gets one line per call it held, read from its
    table. Before, the new image had none of them (one memfd: its new worker's).
    The old worker's table is read when it dies ("worker's call table read")."""
    service = await _start(tls_files, two_fleets)
    calls: list[ClientConnection] = []
    try:
        (old,) = (await service.stats())["workers"]
        for i in range(3):
            calls.append(await _open(service, tls_files, f"exec-{i}"))
            await echo(calls[-1])
        assert _call_tables(service.proc.pid) == 1
        os.kill(service.proc.pid, signal.SIGUSR2)

        def upgraded() -> bool:
            return any(str(e.get("event")).startswith("upgrade done") for e in service.log())

        async with asyncio.timeout(60):
            while not upgraded():
                await asyncio.sleep(0.1)
        assert _call_tables(service.proc.pid) == 2  # the old worker's and the new one's
        os.kill(old["pid"], signal.SIGKILL)
        async with asyncio.timeout(10):
            while not [
                e for e in service.log() if e.get("event") == "old-generation worker exited"
            ]:
                await asyncio.sleep(0.05)
        lines = _ended_lines(service, "exec-")
        assert Counter(e["bot_id"] for e in lines) == {f"exec-{i}": 1 for i in range(3)}, lines
        assert all(e["worker_pid"] == old["pid"] and e["status"] == 101 for e in lines), lines
        # Named by its table, not by what the new image heard alone (the same
        # three lines): the handed-over table was read, its three calls live.
        read = [
            (e["records_live"], e["records_ended"])
            for e in service.log()
            if str(e.get("event")).startswith("worker's call table read")
            and e.get("pid") == old["pid"]
        ]
        assert read == [(3, 0)], read
        execed = [e for e in service.log() if str(e.get("event")).startswith("upgrade: re-exec")]
        assert [(e["call_tables_handed"], e["call_tables_closed"]) for e in execed] == [(1, 0)]
        assert _call_tables(service.proc.pid) == 1  # the dead worker's closed once read
    finally:
        await close_calls(calls)
        await service.finish()
