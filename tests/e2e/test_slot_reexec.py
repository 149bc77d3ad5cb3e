"""maxconn holds across the supervisor's re-execution, with real processes:
a stand-in supervisor (slot_supervisor_child.py) runs the slot coordinator,
workers (slot_worker_child.py) connect to it; the supervisor re-executes
itself (same PID) keeping their channels, and rebuilds the host's table
from what they say they hold."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.net.slot_client import SlotClient
from fleet_ingress.net.slot_server import HandoverError, SlotServer
from tests.support import EventChild, eventually

HERE = Path(__file__).parent
SUPERVISOR = HERE / "slot_supervisor_child.py"
WORKER = HERE / "slot_worker_child.py"


async def _stats(sup: EventChild) -> dict:
    seen = len(sup.of("stats"))
    sup.send(cmd="stats")
    await eventually(lambda: len(sup.of("stats")) > seen)
    return sup.of("stats")[-1]


async def _stats_when(sup: EventChild, predicate, timeout: float = 5.0) -> dict:
    """The supervisor's table once `predicate(table)` holds (asked again and
    again, bounded)."""
    async with asyncio.timeout(timeout):
        while not predicate(stats := await _stats(sup)):
            await asyncio.sleep(0.02)
    return stats


@pytest.mark.uvloop_only
async def test_maxconn_holds_across_the_supervisor_reexecution(tmp_path):
    path = str(tmp_path / "slots.sock")
    children: list[EventChild] = []
    try:
        sup = await EventChild.start(sys.executable, str(SUPERVISOR), path)
        children.append(sup)
        await eventually(lambda: sup.of("ready"), timeout=20)
        old = []
        for _ in range(2):
            w = await EventChild.start(sys.executable, str(WORKER), path, "1")
            children.append(w)
            old.append(w)
            await eventually(lambda w=w: w.of("ready"), timeout=20)
        w1, w2 = old
        w1.send(cmd="lease", n=20)
        await eventually(lambda: len(w1.of("granted")) == 20)
        w2.send(cmd="lease", n=14)  # 12 granted, 2 queued
        await eventually(lambda: len(w2.of("granted")) == 12)
        stats = await _stats(sup)
        assert stats["active"] == {"a": 16, "b": 16} and stats["queue"] == 2

        os.kill(sup.proc.pid, signal.SIGUSR2)
        await eventually(lambda: sup.of("exec"))
        # While the supervisor re-executes, a call of w1 ends.
        w1.send(cmd="release", n=1)
        await eventually(lambda: w1.of("released"))
        await eventually(lambda: sup.of("restored"), timeout=20)
        (restored,) = sup.of("restored")
        assert restored["pid"] == sup.proc.pid and restored["silent"] == []
        # 19 + 12 held, and the freed slot went to w2's first waiter: 32 again.
        assert restored["active"] == {"a": 16, "b": 16}
        assert restored["queue"] == 1
        await eventually(lambda: len(w2.of("granted")) == 13)
        assert restored["workers"] == sorted([[w1.proc.pid, 1, 19], [w2.proc.pid, 1, 13]])

        # The new generation asks the same table: it waits behind w2's waiter.
        w3 = await EventChild.start(sys.executable, str(WORKER), path, "2")
        children.append(w3)
        await eventually(lambda: w3.of("ready"), timeout=20)
        w3.send(cmd="lease", n=1)
        stats = await _stats_when(sup, lambda st: st["queue"] == 2)
        assert stats["active"] == {"a": 16, "b": 16} and not w3.of("granted")
        w1.send(cmd="release", n=2)
        await eventually(lambda: len(w2.of("granted")) == 14 and len(w3.of("granted")) == 1)
        stats = await _stats(sup)
        assert stats["active"] == {"a": 16, "b": 16} and stats["queue"] == 0
        assert stats["workers"] == sorted(
            [[w1.proc.pid, 1, 17], [w2.proc.pid, 1, 14], [w3.proc.pid, 2, 1]]
        )
        # An old worker killed after the exec still gives its slots back.
        await w1.kill()
        await eventually(lambda: w1.proc.returncode is not None)
        await _stats_when(sup, lambda st: sum(st["active"].values()) == 15, timeout=1)
        assert not any(e["ev"] == "refused" for c in children[1:] for e in c.events)
    finally:
        for child in reversed(children):
            await child.kill()


def _up_balancer(maxconn: int) -> Balancer:
    specs = parse_fleets_text("https://a.test name=a\n", default_maxconn=maxconn)
    fleets = FleetSet.from_specs(specs)
    for fleet in fleets.fleets:
        fleet.health = Health.UP
    return Balancer(fleets)


async def test_a_handover_that_cannot_keep_every_channel_keeps_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of descriptors half-way through (EMFILE on the second dup): nothing
    is handed over, no duplicate is left open, and every worker is served as
    before (the upgrade is abandoned, the old image serving on)."""
    server = SlotServer(HostSlots(_up_balancer(8), queue_timeout=5.0, max_queue=8))
    clients: list[SlotClient] = []
    try:
        for i in range(3):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            await server.adopt(ours)
            clients.append(
                await SlotClient.connect(sock=theirs, pid=1000 + i, generation=1, answer_timeout=5)
            )
        await eventually(lambda: len(server.slots.workers) == 3)
        held = await clients[0].lease()
        fds = sorted(os.listdir("/proc/self/fd"))
        dups = 0
        real_dup = os.dup

        def dup(fd: int) -> int:
            nonlocal dups
            dups += 1
            if dups == 2:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real_dup(fd)

        monkeypatch.setattr(os, "dup", dup)
        with pytest.raises(HandoverError, match="Too many open files") as refused:
            server.handover()
        monkeypatch.undo()
        assert sorted(os.listdir("/proc/self/fd")) == fds
        # Every channel is read and answered as before.
        for client in clients:
            lease = await asyncio.wait_for(client.lease(), 5)
            lease.release()
        held.release()
        await eventually(lambda: sum(row.calls for row in server.slots.workers) == 0)
        assert all(client.connected for client in clients)
        assert "LimitNOFILE" in str(refused.value)  # the fix
    finally:
        for client in clients:
            client.close()
        await server.close()


@pytest.mark.uvloop_only
async def test_maxconn_holds_while_a_worker_is_slow_to_answer_after_the_reexecution(tmp_path):
    """A live worker that cannot answer "sync" in time (stopped here: a loaded
    host, a long pause) is not forgotten: what it held stays counted, the
    others are served again, and its late answer is taken."""
    path = str(tmp_path / "slots.sock")
    children: list[EventChild] = []
    try:
        sup = await EventChild.start(sys.executable, str(SUPERVISOR), path)
        children.append(sup)
        await eventually(lambda: sup.of("ready"), timeout=20)
        for _ in range(2):
            w = await EventChild.start(sys.executable, str(WORKER), path, "1")
            children.append(w)
            await eventually(lambda w=w: w.of("ready"), timeout=20)
        w1, slow = children[1:]
        w1.send(cmd="lease", n=20)
        await eventually(lambda: len(w1.of("granted")) == 20)
        slow.send(cmd="lease", n=12)
        await eventually(lambda: len(slow.of("granted")) == 12)
        assert (await _stats(sup))["active"] == {"a": 16, "b": 16}

        os.kill(slow.proc.pid, signal.SIGSTOP)
        os.kill(sup.proc.pid, signal.SIGUSR2)
        await eventually(lambda: sup.of("restored"), timeout=20)  # 2 s: the restore's timeout
        (restored,) = sup.of("restored")
        assert restored["silent"] != [] and restored["active"] == {"a": 16, "b": 16}
        # Granting again, the slow worker's slots counted: a newcomer waits.
        w3 = await EventChild.start(sys.executable, str(WORKER), path, "2")
        children.append(w3)
        await eventually(lambda: w3.of("ready"), timeout=20)
        w3.send(cmd="lease", n=2)
        stats = await _stats_when(sup, lambda st: st["queue"] == 2)
        assert stats["active"] == {"a": 16, "b": 16}
        w1.send(cmd="release", n=1)
        await eventually(lambda: len(w3.of("granted")) == 1)
        await asyncio.sleep(0.2)
        assert len(w3.of("granted")) == 1

        os.kill(slow.proc.pid, signal.SIGCONT)  # its answer, late; then a call of it ends
        slow.send(cmd="release", n=1)
        await eventually(lambda: slow.of("released"))
        await eventually(lambda: len(w3.of("granted")) == 2)
        stats = await _stats_when(sup, lambda st: len(st["workers"]) == 3)
        assert stats["active"] == {"a": 16, "b": 16} and stats["queue"] == 0
        assert stats["workers"] == sorted(
            [[w1.proc.pid, 1, 19], [slow.proc.pid, 1, 11], [w3.proc.pid, 2, 2]]
        )
        assert slow.proc.returncode is None
        assert not any(e["ev"] == "refused" for c in children[1:] for e in c.events)
    finally:
        for child in reversed(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signal.SIGCONT)
            await child.kill()
