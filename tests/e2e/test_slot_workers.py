"""One host, one view, with real worker processes: the slot coordinator runs
here (as in the supervisor), each worker is a child process holding its end
of a socketpair it inherited (slot_worker_child.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.host_slots import HostSlots, queue_timeout_reason
from fleet_ingress.net.slot_server import SlotServer
from tests.support import EventChild, eventually

CHILD = Path(__file__).with_name("slot_worker_child.py")
FLEETS = "https://a.test name=a\nhttps://b.test name=b\n"


class Host:
    def __init__(self, queue_timeout: float, standing: bool = False) -> None:
        """`standing`: the workers take standing grant budgets
        (INGRESS_STANDING_BUDGETS=1, `core.slot_budget`)."""
        self.standing = standing
        specs = parse_fleets_text(FLEETS, default_maxconn=16)
        balancer = Balancer(FleetSet.from_specs(specs))
        self.slots = HostSlots(balancer, queue_timeout=queue_timeout, max_queue=256)
        self.server = SlotServer(self.slots)
        self.workers: list[EventChild] = []
        # The most calls any fleet held at once, sampled at every grant.
        self.peak: Counter[str] = Counter()
        self.slots.balancer.open = self._open_and_watch  # type: ignore[method-assign]

    def _open_and_watch(self, fleet, lease=None):
        Balancer.open(self.slots.balancer, fleet, lease)
        self.peak[fleet.name] = max(self.peak[fleet.name], fleet.active)

    async def spawn(self, generation: int = 1) -> EventChild:
        ours, theirs = socket.socketpair()
        await self.server.adopt(ours)
        worker = await EventChild.start(
            sys.executable,
            str(CHILD),
            str(theirs.fileno()),
            str(generation),
            pass_fds=[theirs.fileno()],
            # Standing: the shared budgets alone (a lone one would take every slot).
            env={
                **os.environ,
                "INGRESS_STANDING_BUDGETS": "1" if self.standing else "",
                "INGRESS_LONE_BUDGET": "0" if self.standing else "1",
            },
        )
        theirs.close()  # the child's now: when it dies, the channel closes
        proc = worker.proc
        self.workers.append(worker)
        await eventually(lambda: worker.of("ready"), timeout=20)
        await eventually(lambda: proc.pid in {r.pid for r in self.slots.workers})
        return worker

    def active(self) -> dict[str, int]:
        return {f.name: f.active for f in self.slots.balancer.fleets}

    def reserved(self) -> dict[str, int]:
        return {f.name: f.standing for f in self.slots.balancer.fleets}

    def budget(self, worker: EventChild) -> dict[str, int] | None:
        """What the table says is left of `worker`'s standing budget, once it
        has said it has it (None: it has none)."""
        row = next(r for r in self.slots.workers if r.pid == worker.proc.pid)
        return row.standing.slots() if row.standing and row.standing_taken else None

    async def close(self) -> None:
        for worker in self.workers:
            await worker.kill()
        await self.server.close()


async def _hosts(standing: bool):
    made: list[Host] = []

    def make(queue_timeout: float) -> Host:
        made.append(Host(queue_timeout, standing))
        return made[-1]

    yield make
    for h in made:
        await h.close()


@pytest.fixture(params=[False, True], ids=["asked", "standing"])
async def host(request):
    """Hosts whose workers ask the supervisor for every slot, or (the same
    tests again) take standing budgets: what the tests say holds either way."""
    async for make in _hosts(request.param):
        yield make


@pytest.fixture
async def standing_host():
    """Hosts whose workers take standing budgets."""
    async for make in _hosts(True):
        yield make


async def test_forty_calls_from_two_workers_admit_32_and_the_rest_queue_fifo_then_503(host):
    h = host(queue_timeout=2.0)
    w1, w2 = await h.spawn(), await h.spawn()
    asked_at = time.monotonic()
    w1.send(cmd="lease", n=20)
    w2.send(cmd="lease", n=20)
    await eventually(lambda: len(w1.of("granted")) + len(w2.of("granted")) == 32)
    await eventually(lambda: h.slots.queue_length == 8)
    granted = Counter(e["fleet"] for w in (w1, w2) for e in w.of("granted"))
    assert granted == {"a": 16, "b": 16}
    assert h.active() == {"a": 16, "b": 16} and h.peak == {"a": 16, "b": 16}
    rows = {r.pid: r.calls for r in h.slots.workers}
    assert rows == {
        w1.proc.pid: len(w1.of("granted")),
        w2.proc.pid: len(w2.of("granted")),
    }
    assert not w1.of("refused") and not w2.of("refused")

    # Three slots come back: the first three in line get them, in order.
    line = h.slots.queued()
    released_at = time.monotonic()
    w1.send(cmd="release", n=3)
    await eventually(lambda: h.slots.queue_length == 5)
    assert h.slots.queued() == line[3:]
    for key, lease in line[:3]:
        assert lease in h.slots.row(key).held
    await eventually(lambda: len(w1.of("granted")) + len(w2.of("granted")) == 35)
    assert not w1.of("refused") and not w2.of("refused")

    # The other five get the 503 reason at the queue timeout, not before.
    await eventually(lambda: len(w1.of("refused")) + len(w2.of("refused")) == 5)
    refused = w1.of("refused") + w2.of("refused")
    assert {e["reason"] for e in refused} == {queue_timeout_reason(2.0)}
    # A worker sends its requests in the order its calls ask (tags): the ones
    # served from the queue asked before the ones that timed out.
    for w in (w1, w2):
        late = [e["tag"] for e in w.of("granted") if e["t"] > released_at]
        if late and w.of("refused"):
            assert max(late) < min(e["tag"] for e in w.of("refused"))
    waited = [e["t"] - asked_at for e in refused]
    assert min(waited) >= 2.0 - 0.05 and max(waited) < 2.0 + 2.0, waited
    assert h.slots.queue_timeouts == 5
    assert h.active() == {"a": 16, "b": 16} and h.peak == {"a": 16, "b": 16}


async def test_a_worker_killed_with_sigkill_gives_its_slots_back_within_a_second(host):
    h = host(queue_timeout=5.0)
    w1, w2 = await h.spawn(), await h.spawn(generation=2)
    w1.send(cmd="lease", n=32)
    await eventually(lambda: len(w1.of("granted")) == 32)
    w2.send(cmd="lease", n=1)
    await eventually(lambda: h.slots.queue_length == 1)

    killed_at = time.monotonic()
    os.kill(w1.proc.pid, signal.SIGKILL)
    await eventually(lambda: w2.of("granted"), timeout=5)
    assert w2.of("granted")[0]["t"] - killed_at < 1.0
    await eventually(lambda: sum(h.active().values()) == 1, timeout=1)
    assert h.slots.reclaimed_total == 32
    assert [(r.pid, r.generation, r.calls) for r in h.slots.workers] == [(w2.proc.pid, 2, 1)]

    # Every slot is back: the survivor takes the other 31 at once.
    w2.send(cmd="lease", n=31)
    await eventually(lambda: len(w2.of("granted")) == 32)
    assert not w2.of("refused")
    assert h.active() == {"a": 16, "b": 16}
    assert await asyncio.wait_for(w1.proc.wait(), 5) == -signal.SIGKILL


async def test_waiters_of_two_workers_are_served_in_the_order_they_asked(host):
    h = host(queue_timeout=10.0)
    w1, w2 = await h.spawn(), await h.spawn()
    w1.send(cmd="lease", n=32)
    await eventually(lambda: len(w1.of("granted")) == 32)
    asked = ["w2", "w2", "w1", "w1", "w2"]
    for queued, name in enumerate(asked, start=1):
        {"w1": w1, "w2": w2}[name].send(cmd="lease", n=1)
        await eventually(lambda q=queued: h.slots.queue_length == q)
    served = []
    for n in range(len(asked)):
        counts = (len(w1.of("granted")), len(w2.of("granted")))
        w1.send(cmd="release", n=1)
        await eventually(lambda c=counts: (len(w1.of("granted")), len(w2.of("granted"))) != c)
        served.append("w1" if len(w1.of("granted")) > counts[0] else "w2")
        assert h.slots.queue_length == len(asked) - n - 1
    assert served == asked
    assert h.active() == {"a": 16, "b": 16} and h.peak == {"a": 16, "b": 16}


async def test_calls_queued_while_a_worker_holds_a_budget_are_served_in_order_not_overtaken(
    standing_host,
):
    """The case a standing budget makes risky: a worker whose budget slots
    come back to it while another's calls wait. The first call that must wait
    takes every budget back; the slots then go to the queue, in order."""
    h = standing_host(queue_timeout=10.0)
    w1 = await h.spawn()
    await eventually(lambda: h.budget(w1) == {"a": 8, "b": 8})  # 16 // (1 + 1)
    w2 = await h.spawn()
    await eventually(lambda: h.budget(w2) == {"a": 2, "b": 2})  # of the 8 left, over 3
    w1.send(cmd="lease", n=16)  # all from its budget
    await eventually(lambda: len(w1.of("granted")) == 16)
    await eventually(lambda: h.budget(w1) == {"a": 0, "b": 0})
    assert h.reserved() == {"a": 2, "b": 2} and h.active() == {"a": 8, "b": 8}
    w2.send(cmd="lease", n=16)  # 4 from its budget, 12 asked
    await eventually(lambda: len(w2.of("granted")) == 16)
    assert h.active() == {"a": 16, "b": 16} and h.reserved() == {"a": 0, "b": 0}
    assert h.budget(w1) is not None  # standing still, empty

    w2.send(cmd="lease", n=2)
    await eventually(lambda: h.slots.queue_length == 2)
    # Taken back from both: what w1 gives back is no longer its own.
    await eventually(lambda: h.budget(w1) is None and h.budget(w2) is None)
    w1.send(cmd="lease", n=1)
    await eventually(lambda: h.slots.queue_length == 3)
    served = []
    for n in range(3):
        counts = (len(w1.of("granted")), len(w2.of("granted")))
        w1.send(cmd="release", n=1)  # a call granted from its budget ends
        await eventually(lambda c=counts: (len(w1.of("granted")), len(w2.of("granted"))) != c)
        served.append("w1" if len(w1.of("granted")) > counts[0] else "w2")
        assert h.slots.queue_length == 2 - n
    assert served == ["w2", "w2", "w1"]
    assert h.active() == {"a": 16, "b": 16} and h.peak == {"a": 16, "b": 16}
    assert not w1.of("refused") and not w2.of("refused")


async def test_a_worker_killed_holding_a_budget_gives_it_back_within_a_second(standing_host):
    h = standing_host(queue_timeout=5.0)
    w1 = await h.spawn()
    await eventually(lambda: h.budget(w1) == {"a": 8, "b": 8})
    w2 = await h.spawn(generation=2)
    await eventually(lambda: h.budget(w2) == {"a": 2, "b": 2})
    w1.send(cmd="lease", n=3)
    await eventually(lambda: sum(h.active().values()) == 3)
    assert sum(h.reserved().values()) == 13 + 4

    killed_at = time.monotonic()
    os.kill(w1.proc.pid, signal.SIGKILL)
    await eventually(lambda: h.reserved() == {"a": 2, "b": 2}, timeout=5)  # the survivor's
    assert time.monotonic() - killed_at < 1.0
    assert h.active() == {"a": 0, "b": 0}
    assert [(r.pid, r.calls) for r in h.slots.workers] == [(w2.proc.pid, 0)]
    # Everything but the survivor's own budget is free: it gets it without a wait.
    w2.send(cmd="lease", n=32)
    await eventually(lambda: len(w2.of("granted")) == 32)
    assert not w2.of("refused") and h.peak["a"] <= 16 and h.peak["b"] <= 16
    assert await asyncio.wait_for(w1.proc.wait(), 5) == -signal.SIGKILL
