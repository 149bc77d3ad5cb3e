"""Grant budgets over real slot channels (Unix socketpairs, one process): a
worker grants calls from its budget while nobody reads its channel, and the
table taken back after a failed exec counts them, a worker silent after it
for its whole budget: maxconn holds. A worker of an older release (no
"budgets" in its hello) is sent none."""

from __future__ import annotations

import asyncio
import json
import socket

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.net.slot_client import SlotClient
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.net.slot_wire import encode
from tests.support import eventually


def _server(maxconn: int) -> SlotServer:
    specs = parse_fleets_text("https://a.test name=a\n", default_maxconn=maxconn)
    fleets = FleetSet.from_specs(specs)
    for fleet in fleets.fleets:
        fleet.health = Health.UP
    return SlotServer(HostSlots(Balancer(fleets), queue_timeout=5.0, max_queue=8))


def _lines(sock: socket.socket) -> list[dict]:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def test_budget_grants_while_away_and_the_table_taken_back_counts_them() -> None:
    server = _server(maxconn=4)
    (fleet,) = server.slots.balancer.fleets
    client: SlotClient | None = None
    peers: list[socket.socket] = []
    waiting: asyncio.Task | None = None
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        key_new = await server.adopt(ours)
        # Asked (no standing budget nor a lone one, whatever INGRESS_STANDING_BUDGETS says): the
        # exec's budget alone, its counts exact (tests/e2e/test_standing_budget_channel.py
        # has the exec's over a standing one).
        client = await SlotClient.connect(
            sock=theirs, pid=1001, generation=1, answer_timeout=10, standing=False, lone=False
        )
        # A worker that goes silent once it has its budget (a stopped process),
        # and one of a release before budgets: raw peers.
        keys = {}
        for pid, hello in [
            (1002, {"op": "hello", "pid": 1002, "generation": 1, "budgets": True}),
            (1003, {"op": "hello", "pid": 1003, "generation": 1}),
        ]:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            keys[pid] = await server.adopt(ours)
            theirs.setblocking(False)
            theirs.send(encode(hello))
            peers.append(theirs)
        silent, older = peers
        await eventually(lambda: len(server.slots.workers) == 3)
        held = await client.lease()
        assert fleet.active == 1

        budgets = server.plan_budgets({key_new, *keys.values()})
        assert set(budgets) == {key_new, keys[1002]}  # the older worker: none
        assert sum(b["a"] for b in budgets.values()) == 3  # the free slots, no more
        kept = server.handover(budgets)
        await eventually(lambda: client._budget is not None)

        # Nobody reads the channels: its budget grants at once, then a call waits.
        mine = budgets[key_new]["a"]
        leases = [await asyncio.wait_for(client.lease(), 1) for _ in range(mine)]
        assert all(lease.queued_s == 0.0 for lease in leases)
        waiting = asyncio.create_task(client.lease())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        # A slot given back while away is its own to grant again.
        leases.pop().release()
        leases.append(await asyncio.wait_for(client.lease(), 1))
        (budget,) = _lines(silent)
        assert budget["op"] == "budget" and budget["fleets"][0]["slots"] == 3 - mine
        assert _lines(older) == []

        # The exec failed: the table is taken back from what the workers say;
        # the silent one counts for its whole budget (it may have used it).
        silent_keys = await server.take_back(kept, timeout=0.5)
        assert silent_keys == sorted(keys.values())  # (the raw older peer says nothing either)
        assert client._budget is None  # "sync" ended it
        assert fleet.active == 4  # 1 + its budget's + the silent one's
        assert not waiting.done()  # counted waiting, not granted past maxconn
        assert [line["op"] for line in _lines(older)] == ["sync"]
        held.release()
        granted = await asyncio.wait_for(waiting, 2)
        assert fleet.active == 4
        granted.release()
        for lease in leases:
            lease.release()
        await eventually(lambda: fleet.active == 3 - mine)  # the silent one's budget
    finally:
        if waiting is not None:
            waiting.cancel()
        if client is not None:
            client.close()
        for peer in peers:
            peer.close()
        await server.close()


async def test_calls_granted_from_a_budget_are_counted_once_as_the_hosts_grants() -> None:
    """A worker's grants from its budget count, once its "state" is taken
    after the exec (here a failed one, `take_back`), as the host's grants:
    its granted_total and the fleet's calls opened (its capacity estimate's),
    a call that ended meanwhile too; a later "state" counts nothing again."""
    server = _server(maxconn=4)
    (fleet,) = server.slots.balancer.fleets
    client: SlotClient | None = None
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        key = await server.adopt(ours)
        # Asked (no standing budget nor a lone one, whatever INGRESS_STANDING_BUDGETS says): the
        # exec's budget alone, its counts exact (tests/e2e/test_standing_budget_channel.py
        # has the exec's over a standing one).
        client = await SlotClient.connect(
            sock=theirs, pid=1001, generation=1, answer_timeout=10, standing=False, lone=False
        )
        await eventually(lambda: len(server.slots.workers) == 1)
        held = await client.lease()
        assert (fleet.opened_total, server.slots.get(key).granted_total) == (1, 1)
        kept = server.handover(server.plan_budgets({key}))
        await eventually(lambda: client._budget is not None)
        first, second = [await asyncio.wait_for(client.lease(), 1) for _ in range(2)]
        first.release()  # ended while away: granted all the same
        await server.take_back(kept, timeout=5)
        assert client._budget is None
        row = server.slots.get(key)
        assert row is not None and row.granted_total == 3
        assert fleet.opened_total == 3 and fleet.active == 2
        # Its next "state" (another exec's, taken back) counts them no more.
        await server.take_back(server.handover(), timeout=5)
        assert (server.slots.get(key).granted_total, fleet.opened_total) == (3, 3)
        second.release()
        held.release()
        await eventually(lambda: fleet.active == 0)
    finally:
        if client is not None:
            client.close()
        await server.close()
