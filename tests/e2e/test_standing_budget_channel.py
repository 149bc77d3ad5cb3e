"""Standing grant budgets over real slot channels (Unix socketpairs, one
process) across the supervisor's exec: the exec's budget is shared from the
slots the standing budgets leave, it replaces the worker's standing budget
(never both), and what is left of a standing budget is counted as held over
the exec. maxconn holds at every moment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer, FleetState
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


async def _standing_client(server: SlotServer, pid: int) -> tuple[int, SlotClient]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    key = await server.adopt(ours)
    client = await SlotClient.connect(
        sock=theirs, pid=pid, generation=1, answer_timeout=10, hello=False
    )
    client.takes_standing = True
    client.takes_lone = False  # the shared standing budget (a lone one: test_slot_channel.py)
    client.say_hello()
    return key, client


def _taken(server: SlotServer, key: int) -> bool:
    row = server.slots.get(key)
    return row is not None and row.standing is not None and row.standing_taken


async def test_an_exec_budget_comes_from_what_standing_ones_leave_and_replaces_them() -> None:
    server = _server(maxconn=8)
    fleet: FleetState = server.slots.balancer.fleets[0]
    client: SlotClient | None = None
    waiting: asyncio.Task | None = None
    most = 0

    def watch() -> None:
        nonlocal most
        most = max(most, fleet.active + fleet.standing)

    try:
        key, client = await _standing_client(server, 1001)
        await eventually(lambda: _taken(server, key))
        assert fleet.standing == 4  # 8 // (1 + 1)
        held = await asyncio.wait_for(client.lease(), 1)  # granted from it, no round trip
        assert held.queued_s == 0.0 and client._standing
        await eventually(lambda: fleet.active == 1)
        assert fleet.standing == 3
        # The exec's budget is shared from the rest (8 - 1 - 3 = 4, not twice)
        # and carries what is left of the standing one (3): one budget, 7.
        assert server.slots.standing_left(key) == ["a", "a", "a"]
        budgets = server.plan_budgets({key})
        assert budgets == {key: {"a": 4 + 3}}
        kept = server.handover(budgets)
        await eventually(lambda: client._budget is not None and not client._standing)

        # Nobody reads the channel: the exec's 7 are granted, and the next
        # call waits (the standing budget, replaced, grants nothing more).
        leases = [await asyncio.wait_for(client.lease(), 1) for _ in range(7)]
        waiting = asyncio.create_task(client.lease())
        await asyncio.sleep(0.2)
        assert not waiting.done()

        await server.take_back(kept, timeout=5)  # the exec failed: "sync", "state"
        watch()
        assert fleet.active == 8 and fleet.standing == 0
        assert not waiting.done()  # counted waiting, not granted past maxconn
        assert client._budget is None  # "sync" ended it; none free to stand
        held.release()
        granted = await asyncio.wait_for(waiting, 2)
        watch()
        assert fleet.active == 8 and most <= 8
        for lease in [granted, *leases]:
            lease.release()
        await eventually(lambda: fleet.active == 0)
    finally:
        if waiting is not None:
            waiting.cancel()
        if client is not None:
            client.close()
        await server.close()
    assert fleet.standing == 0 and fleet.active == 0  # its channel ended: given back


async def test_a_worker_that_does_not_say_standing_gets_no_standing_budget() -> None:
    """An older worker (or one with INGRESS_STANDING_BUDGETS unset) asks for
    every slot, as before: nothing is reserved for it."""
    server = _server(maxconn=8)
    fleet: FleetState = server.slots.balancer.fleets[0]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    key = await server.adopt(ours)
    client = await SlotClient.connect(
        sock=theirs, pid=1002, generation=1, answer_timeout=10, hello=False
    )
    try:
        client.takes_standing = client.takes_lone = False
        client.say_hello()
        await eventually(lambda: server.slots.get(key) is not None)
        lease = await asyncio.wait_for(client.lease(), 1)
        assert fleet.active == 1  # asked: counted before it was granted
        assert fleet.standing == 0 and server.slots.get(key).standing is None
        assert not client.may_lease_now  # the call path awaits `lease` at once
        lease.release()
    finally:
        client.close()
        await server.close()


async def test_a_worker_that_stops_taking_calls_gives_its_budget_back_and_gets_none_again() -> None:
    """A worker draining (a stop, an old generation after an upgrade) would hold
    slots nobody uses: it declines (`decline_standing`), also a budget sent
    before the supervisor read that."""
    server = _server(maxconn=8)
    fleet: FleetState = server.slots.balancer.fleets[0]
    key, client = await _standing_client(server, 1003)
    try:
        await eventually(lambda: _taken(server, key))
        lease = await asyncio.wait_for(client.lease(), 1)
        client.decline_standing()
        await eventually(lambda: fleet.standing == 0)
        assert fleet.active == 1 and server.slots.get(key).standing is None
        lease.release()  # the host's now: nothing goes back into a budget
        await eventually(lambda: fleet.active == 0)
        later = await asyncio.wait_for(client.lease(), 1)  # asked of the supervisor
        assert fleet.active == 1 and fleet.standing == 0
        later.release()
        await eventually(lambda: fleet.active == 0)
        await asyncio.sleep(0.1)
        assert fleet.standing == 0 and server.slots.get(key).standing is None
    finally:
        client.close()
        await server.close()


async def test_an_exec_budget_carries_no_standing_slot_granted_unread() -> None:
    """A call the worker granted from its standing budget just before the
    hand-over, its "acquire" not read yet when the exec's budget was planned:
    the table's copy of the standing rest still counts that slot, so the
    exec's budget names it again. The worker keeps of the carried part only
    what its own budget has left: never a slot twice (maxconn 8, not 9)."""
    server = _server(maxconn=8)
    fleet: FleetState = server.slots.balancer.fleets[0]
    client: SlotClient | None = None
    leases = []
    try:
        key, client = await _standing_client(server, 1004)
        await eventually(lambda: _taken(server, key))
        assert fleet.standing == 4  # 8 // (1 + 1)
        # Granted from the standing budget, its "acquire" written but not read
        # (no loop turn between it and the plan, as at an upgrade).
        leases.append(await client.lease())
        assert server.slots.standing_left(key) == ["a"] * 4  # unread: still 4
        budgets = server.plan_budgets({key})
        assert budgets == {key: {"a": 4 + 4}}  # 8 - 4 reserved = 4 free, shared 4
        kept = server.handover(budgets)
        await eventually(lambda: client._budget is not None and not client._standing)
        # 1 held: 7 more at most, from the exec's budget.
        assert client._budget.left == 7
        leases += [await asyncio.wait_for(client.lease(), 1) for _ in range(7)]
        assert client._budget.left == 0
        await server.take_back(kept, timeout=5)  # "sync", "state": the truth
        await eventually(lambda: fleet.active == 8)
        assert fleet.active + fleet.standing <= 8
    finally:
        for lease in leases:
            lease.release()
        if client is not None:
            client.close()
        await server.close()


async def test_a_slot_released_into_the_budget_and_granted_again_is_read_in_that_order() -> None:
    """A release that goes back into the standing budget waits for the next
    write; a call granted from that slot at once is that write. The release
    must be read first: else the table's copy has no slot left for the grant
    (a protocol error, the channel closed, the worker's calls lost)."""
    server = _server(maxconn=2)
    fleet: FleetState = server.slots.balancer.fleets[0]
    key, client = await _standing_client(server, 1005)
    try:
        await eventually(lambda: _taken(server, key))
        assert fleet.standing == 1  # 2 // (1 + 1)
        first = await client.lease()  # the budget's one slot
        await eventually(lambda: fleet.active == 1 and fleet.standing == 0)
        first.release()  # back into the budget: told with the next write
        again = await client.lease()  # granted from it at once: that write
        await eventually(lambda: fleet.active == 1 and server.slots.get(key).standing_taken)
        await asyncio.sleep(0.3)  # past ANSWERS_FLUSH: nothing else to read
        assert client.connected and server.slots.get(key) is not None
        assert fleet.active == 1 and fleet.standing == 0
        assert server.slots.get(key).standing.slots() == {"a": 0}
        again.release()
        await eventually(lambda: fleet.active == 0 and fleet.standing == 1)
    finally:
        client.close()
        await server.close()


async def test_a_call_given_up_as_its_grant_comes_leaves_both_budgets_equal() -> None:
    """A worker whose standing budget is spent asks the supervisor; the call
    gives up as the grant is on its way, and its release goes back into the
    table's copy of the budget (the lease was held there). The worker's copy
    takes that slot back as the late grant comes: else the table keeps a slot
    reserved that the worker never grants from (both copies equal, maxconn 4)."""
    server = _server(maxconn=4)
    fleet: FleetState = server.slots.balancer.fleets[0]
    key, client = await _standing_client(server, 1006)
    try:
        await eventually(lambda: _taken(server, key))
        assert fleet.standing == 2  # 4 // (1 + 1)
        spent = [await client.lease(), await client.lease()]
        await eventually(lambda: fleet.active == 2 and fleet.standing == 0)
        asking = asyncio.create_task(client.lease())  # asked of the supervisor
        await asyncio.sleep(0)  # its "acquire" written
        asking.cancel()  # given up before the grant is read: released
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        await eventually(lambda: fleet.active == 2 and fleet.standing == 1)
        await eventually(lambda: client._budget is not None and client._budget.left == 1)
        assert server.slots.get(key).standing.slots() == client._budget.slots() == {"a": 1}
        for lease in spent:
            lease.release()
        await eventually(lambda: fleet.active == 0 and fleet.standing == 2)
        assert server.slots.get(key).standing.slots() == client._budget.slots() == {"a": 2}
    finally:
        client.close()
        await server.close()


async def test_a_budget_taken_back_before_the_exec_is_not_carried_past_a_waiting_call() -> None:
    """A call waits (FIFO): the standing budget was taken back ("budget-end"),
    but the worker had not answered when the exec's budget was planned, so
    the table's copy is carried in it. The worker reads "budget-end" first and
    keeps none of that rest: no call of its overtakes the one waiting."""
    server = _server(maxconn=4)
    fleet: FleetState = server.slots.balancer.fleets[0]
    key, client = await _standing_client(server, 1007)
    other, other_key = None, None
    leases, waiting = [], None
    try:
        await eventually(lambda: _taken(server, key))
        assert fleet.standing == 2  # 4 // (1 + 1)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        other_key = await server.adopt(ours)
        other = await SlotClient.connect(
            sock=theirs, pid=1008, generation=1, answer_timeout=10, hello=False
        )
        other.takes_standing = other.takes_lone = False
        other.say_hello()
        client._transport.pause_reading()  # it reads "budget-end" only after the plan
        leases = [await asyncio.wait_for(other.lease(), 1) for _ in range(2)]
        waiting = asyncio.create_task(other.lease())  # 2 calls + 2 reserved: it waits
        await eventually(lambda: server.slots.queue_length == 1)
        await eventually(lambda: server.slots.get(key).standing_ending)
        budgets = server.plan_budgets({key, other_key})
        assert budgets == {key: {"a": 2}}  # the rest, as the table has it
        kept = server.handover(budgets)
        client._transport.resume_reading()
        await eventually(lambda: not client._standing)
        await asyncio.sleep(0.1)
        assert client._budget is None or client._budget.left == 0
        await server.take_back(kept, timeout=5)
        await eventually(lambda: fleet.standing == 0)
        leases[0].release()
        leases.append(await asyncio.wait_for(waiting, 2))  # the one waiting, first
        assert fleet.active <= 4
    finally:
        if waiting is not None and not waiting.done():
            waiting.cancel()
        for lease in leases:
            lease.release()
        if other is not None:
            other.close()
        client.close()
        await server.close()


async def test_a_worker_told_to_stop_declines_its_standing_budget() -> None:
    """`Worker.begin_stop` (a SIGTERM's drain, an upgrade's old generation) hands
    the worker's standing budget back and asks none again: its slots are the
    host's once more (review43a: nothing pinned that begin_stop declines)."""
    from types import SimpleNamespace

    from fleet_ingress.service.worker import Worker

    server = _server(maxconn=8)
    fleet: FleetState = server.slots.balancer.fleets[0]
    key, client = await _standing_client(server, 1007)
    try:
        await eventually(lambda: _taken(server, key))
        assert fleet.standing > 0
        stopping: list[bool] = []
        worker = SimpleNamespace(
            stop=asyncio.Event(),
            keep_pending=False,
            drain=None,
            client=client,
            ingress=SimpleNamespace(stop_accepting=lambda keep_pending: stopping.append(True)),
        )
        Worker.begin_stop(worker)  # type: ignore[arg-type]
        assert stopping == [True] and worker.stop.is_set()
        await eventually(lambda: fleet.standing == 0)
        await asyncio.sleep(0.6)  # past STANDING_RETRY: none given again
        assert fleet.standing == 0 and server.slots.get(key).standing is None
    finally:
        client.close()
        await server.close()


async def test_a_budget_grant_read_after_its_fleet_went_down_is_named_to_its_worker() -> None:
    """A worker granted a call from its standing budget on a fleet that went
    DOWN before the supervisor read that grant's "acquire" (in flight, or held
    with INGRESS_STANDING_BUDGETS=held): the "fleet-down" that named the calls
    in flight there had gone without it. It is named on its own when read, so
    the worker gives the attempt up and retries elsewhere (before: it waited
    for its connect and answer timers on a fleet known DOWN)."""
    server = _server(maxconn=8)
    (fleet,) = server.slots.balancer.fleets
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    loop = asyncio.get_running_loop()
    try:
        await server.adopt(ours)
        theirs.setblocking(False)
        hello = {
            "op": "hello",
            "pid": 4545,
            "generation": 1,
            "answers": True,
            "budgets": True,
            "standing": True,
            "fleet_down": True,
        }
        await loop.sock_sendall(theirs, encode(hello))
        heard = b""
        async with asyncio.timeout(5):
            while b'"budget"' not in heard:
                heard += await loop.sock_recv(theirs, 65536)
        await loop.sock_sendall(theirs, encode({"op": "budget-taken"}))
        await eventually(lambda: fleet.standing > 0 and server.slots.workers[0].standing_taken)
        fleet.health = Health.DOWN  # nothing in flight there: no "fleet-down" to anyone
        server.fleet_down(fleet)
        grant = {"op": "acquire", "id": 1, "budget": True, "standing": True, "fleet": "a"}
        await loop.sock_sendall(theirs, encode(grant))
        heard = b""
        async with asyncio.timeout(5):
            while b'"fleet-down"' not in heard:
                heard += await loop.sock_recv(theirs, 65536)
        (down,) = [m for m in map(json.loads, heard.splitlines()) if m["op"] == "fleet-down"]
        assert down == {"op": "fleet-down", "fleet": "a", "leases": [1]}
        assert fleet.active == 1  # the host's grant all the same, until it gives it back
    finally:
        theirs.close()
        await server.close()


class _Described:
    """A call as `SlotClient.lease_now` reads it (`Call.described`)."""

    def __init__(self, n: int) -> None:
        self.described = {"call_id": f"9-{n}-t", "bot_id": "b", "path": "/ws/b"}


async def test_two_workers_granting_at_once_from_their_budgets_never_pass_maxconn() -> None:
    """`SlotClient.lease_now` grants a call from the standing budget with no
    loop turn (as the one-process `Dispatcher.lease_now`), and None once the
    budget has none left: the rest is asked of the supervisor. Two workers
    doing so, their calls' slots and what the supervisor has reserved for
    them never pass the fleet's maxconn, and a call past it waits."""
    server = _server(maxconn=6)
    fleet: FleetState = server.slots.balancer.fleets[0]
    clients: list[SlotClient] = []
    leases = []
    waiting: asyncio.Task | None = None
    most_granted = most_counted = 0

    def watch() -> None:
        nonlocal most_granted, most_counted
        most_granted = max(most_granted, sum(c.held for c in clients))
        most_counted = max(most_counted, fleet.active + fleet.standing)

    try:
        for pid in (2001, 2002):
            key, client = await _standing_client(server, pid)
            clients.append(client)
            await eventually(lambda key=key: _taken(server, key))
        watch()
        reserved = fleet.standing
        assert 0 < reserved < 6  # a share kept back for calls asked of the supervisor
        # Granted at once, in this turn, from each budget, then None.
        at_once = []
        for n, client in enumerate(clients * 6):
            lease = client.lease_now(call=_Described(n))
            watch()
            if lease is not None:
                at_once.append(lease)
        assert len(at_once) == reserved
        assert sum(c.budget_granted_total for c in clients) == reserved
        assert all(c.budget_granted_total for c in clients)  # each from its own
        leases += at_once
        # The rest asked of the supervisor: granted up to maxconn, the next waits.
        for n in range(6 - reserved):
            leases.append(await asyncio.wait_for(clients[n % 2].lease(), 2))
            watch()
        await eventually(lambda: fleet.active == 6)
        watch()
        waiting = asyncio.create_task(clients[0].lease())
        await asyncio.sleep(0.2)
        watch()
        assert not waiting.done()  # queued: maxconn holds host-wide
        assert most_granted <= 6 and most_counted <= 6
        leases.pop(0).release()
        leases.append(await asyncio.wait_for(waiting, 2))
        watch()
        assert most_granted <= 6 and most_counted <= 6
        for lease in leases:
            lease.release()
        await eventually(lambda: fleet.active == 0)
    finally:
        if waiting is not None:
            waiting.cancel()
        for client in clients:
            client.close()
        await server.close()


async def test_no_grant_at_once_while_the_channel_has_unread_bytes_or_the_fleet_is_not_up() -> None:
    """`lease_now` answers None (the call awaits `lease`, which reads the
    channel first) while bytes wait unread in the channel (a "budget-end" may
    be among them), and when this worker's record of the fleet the budget
    would choose is not UP and READY, its budget left as it was."""
    server = _server(maxconn=8)
    key, client = await _standing_client(server, 2003)
    try:
        await eventually(lambda: _taken(server, key))
        assert client._budget is not None and client.may_lease_now
        slots = client._budget.slots()
        assert server.send(key, {"op": "tell-held"})  # written now: unread in this turn
        await eventually(lambda: client._channel_unread())
        assert client.lease_now() is None
        await eventually(lambda: not client._channel_unread())
        record = client._fleet("a", client._budget_specs["a"])
        record.health = Health.DOWN
        assert client.lease_now() is None
        assert client._budget.slots() == slots and client.budget_granted_total == 0
        record.health = Health.UP
        lease = client.lease_now()
        assert lease is not None and lease.fleet is record
        lease.release()
    finally:
        client.close()
        await server.close()
