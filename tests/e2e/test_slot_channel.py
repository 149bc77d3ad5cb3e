"""The slot coordinator and its worker client over real Unix socketpairs, one
process (the multi-process cases are in test_slot_workers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import socket
import time
from collections import Counter

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots, queue_timeout_reason
from fleet_ingress.core.host_view import Counts, HostView, WorkerReport
from fleet_ingress.logs import _FIELDS
from fleet_ingress.net import slot_client
from fleet_ingress.net.calls import Call
from fleet_ingress.net.dispatch import Dispatcher, NoFleetAvailable
from fleet_ingress.net.slot_client import (
    ANSWERS_FLUSH,
    COORDINATOR_GONE,
    HELD_BEFORE_HELLO,
    SlotClient,
)
from fleet_ingress.net.slot_server import HandoverError, SlotServer
from fleet_ingress.net.slot_wire import LineDecoder, encode, spec_to_wire
from tests.support import eventually, fill_unread_channel

TWO_FLEETS = "https://a.test name=a admin=drain\nhttps://b.test name=b\n"


def _balancer(maxconn: int) -> Balancer:
    balancer = Balancer(FleetSet.from_specs(parse_fleets_text(TWO_FLEETS, default_maxconn=maxconn)))
    for fleet in balancer.fleets:
        fleet.set_admin(fleet.admin.READY)  # the file's drain is stale: READY live
        fleet.health = Health.UP
    return balancer


class Host:
    """A coordinator and the clients of its workers, each on a socketpair."""

    def __init__(
        self,
        maxconn: int = 2,
        queue_timeout: float = 5.0,
        max_queue: int = 8,
        *,
        standing: bool = False,
        lone: bool = False,
    ) -> None:
        """`standing`: its workers take standing grant budgets (as with
        INGRESS_STANDING_BUDGETS=1), whatever this process's environment says;
        `lone`: a lone worker's budget (the default, session 46)."""
        self.standing = standing
        self.lone = lone
        self.slots = HostSlots(_balancer(maxconn), queue_timeout=queue_timeout, max_queue=max_queue)
        self.server = SlotServer(self.slots)
        self.clients: list[SlotClient] = []

    async def worker(self, generation: int = 1, answer_timeout: float = 10.0) -> SlotClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        await self.server.adopt(ours)
        client = await SlotClient.connect(
            sock=theirs,
            pid=os.getpid() * 10 + len(self.clients),
            generation=generation,
            answer_timeout=answer_timeout,
            standing=self.standing,
            lone=self.lone,
        )
        self.clients.append(client)
        await eventually(lambda: len(self.slots.workers) == len(self.clients))
        # A standing budget is given as its hello is read: once the worker says
        # it has it ("budget-taken"), it writes nothing of its own unasked.
        row = next(r for r in self.slots.workers if r.pid == client.pid)
        await eventually(lambda: row.standing is None or row.standing_taken)
        return client

    def active(self) -> dict[str, int]:
        return {f.name: f.active for f in self.slots.balancer.fleets}

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        await self.server.close()


async def _hosts(standing: bool, lone: bool = False):
    made: list[Host] = []

    def make(**kw) -> Host:
        kw.setdefault("lone", lone)
        made.append(Host(**kw, standing=standing))
        return made[-1]

    yield make
    for h in made:
        await h.close()


@pytest.fixture(params=["asked", "standing", "lone"])
async def host(request):
    """Hosts whose workers ask the supervisor for every slot, or (the same
    tests again) take standing grant budgets (`core.slot_budget`), or a lone
    worker's budget (the default, session 46): what these tests say holds in
    every mode, whatever INGRESS_STANDING_BUDGETS says."""
    async for make in _hosts(request.param == "standing", request.param == "lone"):
        yield make


@pytest.fixture
async def asked_host():
    """Hosts whose workers ask the supervisor for every slot (standing budgets
    off, whatever INGRESS_STANDING_BUDGETS says): for the tests that check,
    message by message, what the supervisor's table holds the moment a lease
    returns, or that a grant is the supervisor's (with a standing budget the
    worker grants it itself and tells the table after, ANSWERS_FLUSH at most;
    no lone worker's budget either)."""
    async for make in _hosts(False):
        yield make


async def test_two_workers_share_one_maxconn_and_a_release_wakes_the_first_waiter(host):
    h = host(maxconn=2)
    w1, w2 = await h.worker(), await h.worker()
    leases = [await w1.lease(), await w2.lease(), await w1.lease(), await w2.lease()]
    assert Counter(lease.fleet.name for lease in leases) == {"a": 2, "b": 2}
    first = asyncio.create_task(w2.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    second = asyncio.create_task(w1.lease())
    await eventually(lambda: h.slots.queue_length == 2)
    assert h.active() == {"a": 2, "b": 2}
    leases[0].release()
    granted = await asyncio.wait_for(first, 2)
    assert granted.fleet.name == leases[0].fleet.name and not second.done()
    assert (w1.held, w2.held) == (1, 3)
    granted.release()
    assert (await asyncio.wait_for(second, 2)).fleet.name == granted.fleet.name


async def test_a_waiter_gets_the_503_reason_at_the_queue_timeout(host):
    h = host(maxconn=1, queue_timeout=0.3)
    w1 = await h.worker()
    await w1.lease()
    await w1.lease()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoFleetAvailable) as caught:
        await w1.lease()
    assert caught.value.reason == queue_timeout_reason(0.3)
    assert 0.29 <= loop.time() - started < 2.0
    assert h.slots.queue_timeouts == 1 and h.slots.queue_length == 0


async def test_a_grant_that_came_while_the_worker_was_stalled_is_taken() -> None:
    """A worker's loop stalled (a stop, a debugger, a VM paused) past its
    answer timeout while it waits for a slot, the coordinator's grant coming
    during the stall: the grant is taken. The answer timeout ran first on the
    loop resumed, the grant unread: the call was refused ("the slot
    coordinator did not answer") and the slot given back."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = await SlotClient.connect(sock=theirs, pid=1, generation=1, answer_timeout=0.3)
    loop = asyncio.get_running_loop()
    ours.setblocking(False)
    try:
        leasing = asyncio.ensure_future(client.lease())
        heard = b""
        async with asyncio.timeout(5):
            while b'"acquire"' not in heard:
                heard += await loop.sock_recv(ours, 65536)
        (spec,) = parse_fleets_text("https://a.test name=a", default_maxconn=2)
        grant = encode({"op": "granted", "id": 1, "fleet": "a", "spec": spec_to_wire(spec)})

        def stall() -> None:
            time.sleep(0.1)
            ours.send(grant)  # the coordinator answers within the answer timeout
            time.sleep(0.5)

        loop.call_soon(stall)
        lease = await asyncio.wait_for(leasing, 5)
        assert lease.fleet.name == "a" and client.held == 1
        await asyncio.sleep(0.1)
        with contextlib.suppress(BlockingIOError):
            heard = ours.recv(65536)
        assert b'"release"' not in heard  # not given back
    finally:
        client.close()
        ours.close()


async def test_a_closed_channel_gives_back_every_slot_and_a_waiter_gets_one(host):
    h = host(maxconn=2)
    w1, w2 = await h.worker(), await h.worker()
    for _ in range(4):
        await w1.lease()
    waiting = asyncio.create_task(w2.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    w1.close()
    assert (await asyncio.wait_for(waiting, 2)).fleet.name in {"a", "b"}
    await eventually(lambda: h.active() in ({"a": 1, "b": 0}, {"a": 0, "b": 1}))
    assert h.slots.reclaimed_total == 4
    assert [r.pid for r in h.slots.workers] == [w2.pid]


async def test_what_a_worker_said_of_each_call_is_kept_while_its_lease_is_open(host):
    """Each slot request says who its call is ("call"): kept while the lease
    is open (held or queued), with status 101 and its moment once its fleet answered; gone
    with a release or a refusal; what was open when the channel ended is
    given once (the supervisor's lines for calls lost with a worker)."""
    h = host(maxconn=1, queue_timeout=0.3)
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]

    def said(n: int) -> dict[str, object]:
        return {"call_id": n, "bot_id": f"bot-{n}", "started_at": 1000.0 + n}

    up = await w1.lease(call=said(1))
    released = await w1.lease(call=said(2))
    with pytest.raises(NoFleetAvailable):  # both fleets full: queued, then refused
        await w1.lease(call=said(3))
    released.release()
    answered_at = asyncio.get_running_loop().time()
    up.fleet_answered(answered_at)
    await eventually(lambda: h.server.calls_of(key).get(up.id, {}).get("status") == 101)
    waiting = asyncio.create_task(w1.lease(call=said(4)))  # b is free again: granted
    blocked = asyncio.create_task(w1.lease(call=said(5)))  # queued
    await eventually(lambda: h.slots.queue_length == 1)
    assert sorted(c["call_id"] for c in h.server.calls_of(key).values()) == [1, 4, 5]
    w1.close()
    await eventually(lambda: not h.slots.workers)
    lost = h.server.take_calls(key)
    assert sorted(c["call_id"] for c in lost.values()) == [1, 4, 5]
    # With its 101's moment, which a lost call's duration is observed from (views38).
    assert lost[up.id] == {**said(1), "status": 101, "answered_monotonic": answered_at}
    assert h.server.take_calls(key) == {}
    assert h.server.calls_of(key) == {}
    for task in (waiting, blocked):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, NoFleetAvailable):
            await task


async def test_who_each_call_is_is_kept_under_one_string_a_key_for_all_calls(host):
    """The supervisor keeps who each open lease's call is (its memory a held
    call): its keys the same strings for every call, not new ones decoded
    from each request; what it keeps reads as the worker said it."""
    h = host()
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]
    said = [Call(None, "192.0.2.1", "/ws/", f"bot-{n}").described for n in (1, 2)]  # type: ignore[arg-type]
    leases = [await w1.lease(call=call) for call in said]
    # Granted from a standing budget, the table hears of it after (its "acquire").
    await eventually(lambda: all(lease.id in h.server.calls_of(key) for lease in leases))
    kept = h.server.calls_of(key)
    assert [kept[lease.id] for lease in leases] == said
    first, second = (list(kept[lease.id]) for lease in leases)
    assert all(a is b for a, b in zip(first, second, strict=True))


async def test_a_call_logged_while_its_slot_is_held_is_no_lost_call_of_its_worker(host):
    """A worker writes a call's access line as soon as its end is settled, its
    fleet side possibly still closing, its slot held until then: it says so
    ("logged"), and the coordinator forgets who the call is, so that a worker
    dying in that moment is no second line (as lost with its worker). The
    slot itself stays held until released."""
    h = host(maxconn=1)
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]
    closing = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
    live = await w1.lease(call={"call_id": 2, "bot_id": "bot-2"})
    closing.call_logged()
    await eventually(lambda: list(h.server.calls_of(key)) == [live.id])
    assert closing.held and sum(h.active().values()) == 2
    closing.call_logged()  # said once: nothing more to forget
    w1.close()
    await eventually(lambda: not h.slots.workers)
    assert [c["call_id"] for c in h.server.take_calls(key).values()] == [2]


async def test_a_cancelled_waiter_leaves_the_queue_and_a_slot_granted_meanwhile_comes_back(host):
    h = host(maxconn=1)
    w1 = await h.worker()
    held = [await w1.lease(), await w1.lease()]
    waiting = asyncio.create_task(w1.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    waiting.cancel()
    await eventually(lambda: h.slots.queue_length == 0)
    # Now the race: a grant on the wire while its call gives up.
    racing = asyncio.create_task(w1.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    held[0].release()
    await asyncio.sleep(0)  # the release is written; the grant has not been read
    racing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await racing
    await eventually(lambda: sum(h.active().values()) == 1 and w1.held == 1)
    assert h.slots.queue_length == 0


async def test_release_is_idempotent_and_a_late_grant_to_nobody_is_given_back(host):
    h = host(maxconn=4)
    w1 = await h.worker()
    lease = await w1.lease()
    lease.release()
    lease.release()
    assert not lease.held
    await eventually(lambda: sum(h.active().values()) == 0)
    assert w1.held == 0


async def test_the_coordinator_gone_fails_waiters_and_new_requests_with_the_reason(host):
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()
    await w1.lease()
    waiting = asyncio.create_task(w1.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    await h.server.close()
    with pytest.raises(NoFleetAvailable, match=COORDINATOR_GONE):
        await asyncio.wait_for(waiting, 2)
    assert w1.lost.done()
    with pytest.raises(NoFleetAvailable, match=COORDINATOR_GONE):
        await w1.lease()


async def test_a_worker_breaking_the_protocol_is_cut_off_and_its_slots_come_back(host):
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()
    assert w1._transport is not None
    w1._transport.write(b"this is not json\n")
    await asyncio.wait_for(w1.lost, 2)
    await eventually(lambda: sum(h.active().values()) == 0 and not h.slots.workers)


async def test_the_grant_carries_the_fleet_once_and_the_worker_sees_it_ready(host):
    h = host(maxconn=4)
    w1 = await h.worker()
    a1, b1, a2 = await w1.lease(), await w1.lease(), await w1.lease()
    assert a1.fleet is a2.fleet and a1.fleet is not b1.fleet
    assert a1.fleet.spec == h.slots.balancer.fleets[0].spec
    assert a1.fleet.admin is a1.fleet.admin.READY  # the file said drain; live it is READY


async def test_after_a_reload_that_left_a_fleet_equal_its_grants_carry_no_spec_by_identity(
    asked_host,
):
    """A reload sets each fleet's spec anew (`FleetSet`), equal when the file
    did not change it: the next grant carries no spec and the channel keeps
    the new object, so the grants after it are told spec-less by identity
    (`granted_line`). Fails on main: the old object stayed kept, and every
    grant of the fleet after any reload compared the specs by value. The
    supervisor's grants: asked (a standing budget's carry their specs with it)."""
    h = asked_host(maxconn=4)
    w1 = await h.worker()
    first = await w1.lease()
    a = h.slots.balancer.get(first.fleet.name)
    assert a is not None
    a.spec = dataclasses.replace(a.spec)  # what a reload of the same file does
    (channel,) = h.server._channels.values()
    second = await w1.lease()
    while second.fleet.name != a.name:  # leastconn: the other fleet's turn first
        second = await w1.lease()
    assert second.fleet.spec == a.spec
    assert channel.sent_specs[a.name] is a.spec


@pytest.mark.parametrize("kind", ["dispatcher", "slot client"])
async def test_the_call_path_interface_is_the_same(host, kind):
    """What net/proxy.py uses: lease(avoid) -> .fleet / .held / .release(),
    NoFleetAvailable.reason when nothing is left."""
    if kind == "dispatcher":
        source = Dispatcher(_balancer(1), queue_timeout=0, max_queue=8)
    else:
        source = await host(maxconn=1, queue_timeout=0).worker()
    first = await source.lease()
    second = await source.lease(avoid=[first.fleet.name])
    assert {first.fleet.name, second.fleet.name} == {"a", "b"} and first.held
    with pytest.raises(NoFleetAvailable) as caught:
        await source.lease()
    assert caught.value.reason == "every fleet is at capacity and queueing is off"
    first.release()
    first.release()
    assert not first.held
    third = await source.lease(avoid=["b"])
    assert third.fleet.name == first.fleet.name


@pytest.mark.parametrize("kind", ["dispatcher", "slot client"])
async def test_a_fleets_429_makes_it_full_where_slots_are_handed_out(host, kind):
    """`fleet_said_full()` on a held slot (the fleet answered its call 429): the
    fleet gets no call until a probe says it has room, in this process
    (`Dispatcher`) or in the supervisor's table for a worker (op `full`)."""
    balancer = _balancer(8)
    h: Host | None = None
    if kind == "dispatcher":
        source: Dispatcher | SlotClient = Dispatcher(balancer, queue_timeout=0, max_queue=8)
    else:
        h = host(maxconn=8, queue_timeout=0)
        balancer = h.slots.balancer
        source = await h.worker()
    a, b = balancer.fleets
    for fleet in (a, b):  # probed: 5 free each
        fleet.reported_available, fleet.opened_at_probe = 5, fleet.opened_total
    if h is not None:
        h.server.wake()  # as the poller does after a probe
        await eventually(
            lambda: all(r.standing is None or r.standing_taken for r in h.slots.workers)
        )
    first = await source.lease()
    assert first.fleet.name == "a"
    first.fleet_said_full()
    await eventually(lambda: a.full)
    first.release()
    await eventually(lambda: a.active == 0)
    # A standing budget on it is taken back at the 429 ("budget-end", one
    # round trip): kept, its worker granted a calls until its next probe.
    await eventually(lambda: a.standing == 0)
    assert a.estimated_available == 0
    # a carries no call and b one, yet every new call goes to b.
    assert [(await source.lease()).fleet.name for _ in range(3)] == ["b", "b", "b"]
    a.reported_available, a.opened_at_probe = 3, a.opened_total  # its next probe
    if h is not None:
        h.server.wake()
        if h.standing or h.lone:  # budgets it was not in are given anew with it (a round trip)
            await eventually(
                lambda: a.standing > 0 and all(r.standing_taken for r in h.slots.workers)
            )
    assert (await source.lease()).fleet.name == "a"


async def test_a_worker_tells_when_fleets_answer_its_calls_with_its_next_message(asked_host):
    """A lease is in flight in the supervisor's table until the worker says the
    fleet answered its call: with the next message it sends (here a release),
    or on its own after ANSWERS_FLUSH. Asked: a lease from a standing budget is
    in flight in the table only once its "acquire" is read."""
    h = asked_host(maxconn=8)
    w1 = await h.worker()

    def in_flight() -> set[object]:
        return set().union(*(fleet.pending for fleet in h.slots.balancer.fleets))

    first, second = await w1.lease(), await w1.lease()
    assert in_flight() == {(1, first.id), (1, second.id)}
    first.fleet_answered(1.0)
    second.fleet_answered(2.0)
    other = await w1.lease()  # its acquire carries both answers
    await eventually(lambda: in_flight() == {(1, other.id)})
    loop = asyncio.get_running_loop()
    other.fleet_answered(3.0)
    told_at = loop.time()
    await eventually(lambda: not in_flight())  # nothing else sent: the timer tells
    assert loop.time() - told_at >= ANSWERS_FLUSH * 0.9


async def test_an_older_worker_that_does_not_tell_answers_leaves_nothing_in_flight(host):
    h = host(maxconn=8)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await h.server.adopt(ours)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    hello = {"op": "hello", "pid": 4242, "generation": 1}  # no "answers": an older release
    await loop.sock_sendall(theirs, encode(hello) + encode({"op": "acquire", "id": 1}))
    async with asyncio.timeout(5):
        assert b'"granted"' in await loop.sock_recv(theirs, 65536)
    fleets = h.slots.balancer.fleets
    assert sum(f.active for f in fleets) == 1 and not any(f.pending for f in fleets)
    theirs.close()


async def test_a_fleet_down_is_told_to_the_workers_with_attempts_in_flight_there(host):
    """The coordinator names to each worker its leases in flight on the fleet
    that went DOWN (granted, no answer told): not those answered, not another
    fleet's; and nothing to a worker whose hello does not say "fleet_down" (a
    release before it: its attempts wait for their timers, as they did)."""
    h = host(maxconn=8)
    w1, w2 = await h.worker(), await h.worker()
    told: dict[int, list[tuple[str, list[int]]]] = {1: [], 2: []}
    w1.handlers["fleet-down"] = lambda m: told[1].append((m["fleet"], m["leases"]))
    w2.handlers["fleet-down"] = lambda m: told[2].append((m["fleet"], m["leases"]))
    answered, waiting, also = [await w1.lease(avoid=["b"]) for _ in range(3)]
    on_b = await w2.lease(avoid=["a"])
    assert [x.fleet.name for x in (answered, waiting, also, on_b)] == ["a", "a", "a", "b"]
    answered.fleet_answered(1.0)
    released = await w1.lease(avoid=["b"])
    released.release()  # its release carries the answer before it
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await h.server.adopt(ours)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    hello = {"op": "hello", "pid": 4243, "generation": 1, "answers": True}  # no "fleet_down"
    await loop.sock_sendall(
        theirs, encode(hello) + encode({"op": "acquire", "id": 1, "avoid": ["b"]})
    )
    async with asyncio.timeout(5):
        assert b'"granted"' in await loop.sock_recv(theirs, 65536)
    (a,) = [f for f in h.slots.balancer.fleets if f.name == "a"]
    await eventually(lambda: len(a.pending) == 3)  # waiting, also, the older worker's

    h.server.fleet_down(a)
    await eventually(lambda: bool(told[1]))
    assert told == {1: [("a", sorted([waiting.id, also.id]))], 2: []}
    await asyncio.sleep(0.1)
    with contextlib.suppress(BlockingIOError):
        assert b"fleet-down" not in theirs.recv(65536)
    theirs.close()


async def test_calls_refused_until_a_fleet_goes_down_tell_the_workers_of_its_attempts(host):
    """Not its probes: calls its fleet refused took it DOWN (`unreachable`, as
    many as `fall`). The attempts in flight there are named to their worker
    ("fleet-down") as a probe's DOWN names them."""
    h = host(maxconn=8)
    w1, w2 = await h.worker(), await h.worker()
    told: list[tuple[str, list[int]]] = []
    w1.handlers["fleet-down"] = lambda m: told.append((m["fleet"], m["leases"]))
    waiting = await w1.lease(avoid=["b"])
    assert waiting.fleet.name == "a"
    (a,) = [f for f in h.slots.balancer.fleets if f.name == "a"]
    h.slots.fall = 2  # fleets.fall (0, the table's default: never by calls)
    for _ in range(h.slots.fall):
        refused = await w2.lease(avoid=["b"])
        assert refused.fleet.name == "a"
        refused.fleet_unreachable(refused=True)
        refused.release()
    await eventually(lambda: a.health is Health.DOWN)
    await eventually(lambda: bool(told))
    assert told == [("a", [waiting.id])]


async def test_an_answer_whose_id_is_not_a_number_breaks_the_protocol(host, caplog):
    """The supervisor's handlers look answers up by id: `{"op": "reloaded",
    "id": [1]}` closes the channel as a protocol break, said with the worker
    (before: a TypeError inside the transport, logged as uvloop's fatal error)."""
    h = host(maxconn=8)
    answered: list[dict] = []
    h.server.handlers["reloaded"] = lambda key, message: answered.append(message)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await h.server.adopt(ours)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    hello = {"op": "hello", "pid": 4243, "generation": 1}
    good, bad = {"op": "reloaded", "id": 1}, {"op": "reloaded", "id": [1]}
    await loop.sock_sendall(theirs, encode(hello) + encode(good) + encode(bad))
    async with asyncio.timeout(5):
        while await loop.sock_recv(theirs, 65536):
            pass  # until closed
    assert answered == [good]
    said = [r.getMessage() for r in caplog.records if "broke the protocol" in r.getMessage()]
    assert said and not [r for r in caplog.records if "Fatal error" in r.getMessage()]
    theirs.close()


async def test_after_the_supervisor_reexecutes_the_table_is_rebuilt_from_the_workers(host):
    h = host(maxconn=2)
    w1, w2 = await h.worker(), await h.worker()
    held1 = [await w1.lease(), await w1.lease(), await w1.lease()]  # a, b, a
    await w2.lease()  # b
    first = asyncio.create_task(w2.lease(avoid=["b"]))
    await eventually(lambda: h.slots.queue_length == 1)
    second = asyncio.create_task(w1.lease())
    await eventually(lambda: h.slots.queue_length == 2)

    kept = h.server.handover()  # the old image stops reading here, then execs
    assert sorted(kept) == sorted(f"worker.{w.pid}.1" for w in (w1, w2))
    # The old image may have read half a line: the new one reads its tail.
    assert w2._transport is not None
    w2._transport.write(b'ase","id":99}\n')
    # During the exec a call ends and another asks: it waits in the kernel.
    held1[0].release()
    third = asyncio.create_task(w1.lease())
    await asyncio.sleep(0.05)
    assert not (first.done() or second.done() or third.done())

    server = _next_image(2)
    slots = server.slots
    try:
        for sock in kept.values():
            await server.adopt(sock, restoring=True)
        assert await server.finish_restore(2.0) == []
        # The one free slot (a, freed during the exec) went to the first in line.
        assert (await asyncio.wait_for(first, 2)).fleet.name == "a"
        assert {f.name: f.active for f in slots.balancer.fleets} == {"a": 2, "b": 2}
        rows = {r.pid: (r.generation, r.calls) for r in slots.workers}
        assert rows == {w1.pid: (1, 2), w2.pid: (1, 2)}
        assert not (w1.lost.done() or w2.lost.done())  # the channels never closed
        # A new generation's worker asks the same table: it queues behind.
        ours, theirs = socket.socketpair()
        await server.adopt(ours)
        w3 = await SlotClient.connect(sock=theirs, pid=3, generation=2, answer_timeout=10)
        fourth = asyncio.create_task(w3.lease())
        await eventually(lambda: slots.queue_length == 3)
        held1[1].release()  # b
        assert (await asyncio.wait_for(second, 2)).fleet.name == "b"
        held1[2].release()  # a
        assert (await asyncio.wait_for(third, 2)).fleet.name == "a"
        assert not fourth.done()
        fourth.cancel()
        w3.close()
    finally:
        await server.close()


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    """What a worker's end of its channel reads, `size` bytes (within 2 s)."""
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(2):
        while len(received) < size:
            received += await loop.sock_recv(sock, 1024)
    return received


def _next_image(maxconn: int, *, view: HostView | None = None) -> SlotServer:
    """The coordinator of the image a re-execution starts: paused until the
    channels kept over the exec are restored."""
    slots = HostSlots(_balancer(maxconn), queue_timeout=5.0, max_queue=8)
    slots.paused = True
    return SlotServer(slots, view=view)


async def _third_image_adopts(
    third: SlotServer, kept: dict[str, socket.socket], unread: dict[str, bytes] | None = None
) -> None:
    """`third` adopts the channels a second image (`_slow_after_reexec`'s)
    handed over, each with what the carried table says it held: worker 77 b,
    the other worker a."""
    for name, sock in kept.items():
        pid, generation = (int(n) for n in name.split(".")[1:])
        held = ["b"] if pid == 77 else ["a"]
        await third.adopt(
            sock,
            restoring=True,
            worker=(pid, generation),
            held_before=held,
            unread=(unread or {}).get(name, b""),
        )


async def _slow_after_reexec(h: Host) -> tuple[SlotServer, HostSlots, socket.socket, int]:
    """A re-executed coordinator with `h`'s workers kept over the exec, and one
    more that held b in the previous image and is slow to answer "sync" (the
    test's end of it, raw)."""
    kept = h.server.handover()
    slow_ours, slow_theirs = socket.socketpair()
    server = _next_image(1)
    for sock in kept.values():
        await server.adopt(sock, restoring=True)
    slow = await server.adopt(slow_ours, restoring=True, worker=(77, 1), held_before=["b"])
    slow_theirs.setblocking(False)
    return server, server.slots, slow_theirs, slow


async def test_a_worker_slow_after_the_reexecution_keeps_its_slots_counted_and_maxconn_holds(host):
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()  # a; the slow worker holds b: both fleets full
    server, slots, slow_theirs, slow = await _slow_after_reexec(h)
    loop = asyncio.get_running_loop()
    try:
        assert await server.finish_restore(0.3) == [slow]
        assert not slots.paused  # the others are served again
        assert {f.name: f.active for f in slots.balancer.fleets} == {"a": 1, "b": 1}
        waiting = asyncio.create_task(w1.lease())  # no room: b is the slow one's
        await eventually(lambda: slots.queue_length == 1)
        await asyncio.sleep(0.1)
        assert not waiting.done()
        # The supervisor's own messages reach it (an old generation told to
        # retire), read after "sync".
        assert server.send(slow, {"op": "stop", "id": 9, "upgrade": True})
        expected = b'{"op":"sync"}\n{"op":"stop","id":9,"upgrade":true}\n'
        assert await _read_exactly(slow_theirs, len(expected)) == expected
        # It answers, late; its channel was never closed.
        state = b'{"op":"state","pid":77,"generation":1,"held":[[4,"b"]],"waiting":[]}\n'
        await loop.sock_sendall(slow_theirs, state)
        await eventually(lambda: {r.pid: r.calls for r in slots.workers} == {w1.pid: 1, 77: 1})
        assert not waiting.done() and slots.reclaimed_total == 0
        await loop.sock_sendall(slow_theirs, b'{"op":"release","id":4}\n')
        assert (await asyncio.wait_for(waiting, 2)).fleet.name == "b"
        assert {f.name: f.active for f in slots.balancer.fleets} == {"a": 1, "b": 1}
    finally:
        slow_theirs.close()
        await server.close()


async def _silent_since_an_exec_with_a_call_left_out() -> tuple[SlotServer, socket.socket, int]:
    """A re-executed coordinator (maxconn 4) whose worker 77 held lease 4 on b
    before the exec, its call then in flight when b's last counted probe left
    (carried: `left_out_before`), and that has not said what it holds since
    (counted silent)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    server = _next_image(4)
    key = await server.adopt(
        ours, restoring=True, worker=(77, 1), held_before=["b"], left_out_before=[4]
    )
    assert await server.finish_restore(0.2) == [key]
    return server, theirs, key


async def _state_says_lease_4_answered(server: SlotServer, theirs: socket.socket) -> None:
    """b's number, carried from a probe sent while lease 4's call connected,
    says 1 free; the worker's "state" says the fleet has answered it since."""
    b = server.slots.balancer.get("b")
    assert b is not None
    b.probe_counted(1, b.probe_sending(time.monotonic()))
    state = {
        "op": "state",
        "pid": 77,
        "generation": 1,
        "held": [[4, "b"]],
        "waiting": [],
        "answers": True,
        "in_flight": [],
    }
    await asyncio.get_running_loop().sock_sendall(theirs, encode(state))
    await eventually(lambda: [(r.calls, r.reserved) for r in server.slots.workers] == [(1, False)])
    # Lease 4 is still left out of that number: b has no free worker.
    assert b.estimated_available == 0


async def test_a_call_left_out_stays_left_out_over_a_second_exec_before_its_worker_says():
    """Two execs in a row, the worker silent in between: the second carries
    the leases the first did (its `left_out` is the channel's while no "state"
    was taken). Fails on main, which carried the table's alone (the silent
    row's are `reserve`'s: none): the third image took lease 4's answered call
    for a free worker on b, and granted a call into its 429."""
    second, theirs, key = await _silent_since_an_exec_with_a_call_left_out()
    third = _next_image(4)
    try:
        left_out = second.left_out(key)  # what the exec's state carries, before the hand-over
        kept = second.handover()
        assert list(kept) == ["worker.77.1"]
        await third.adopt(
            kept["worker.77.1"],
            restoring=True,
            worker=(77, 1),
            held_before=["b"],
            left_out_before=left_out,
        )
        await _state_says_lease_4_answered(third, theirs)
    finally:
        theirs.close()
        await second.close()
        await third.close()


async def test_a_call_left_out_stays_left_out_over_an_exec_that_failed_before_its_worker_says():
    """The same when the second exec fails (`take_back`): the channel served
    again keeps what the first exec carried. Fails on main (`_serve_again`
    dropped `left_out_before`)."""
    server, theirs, key = await _silent_since_an_exec_with_a_call_left_out()
    try:
        kept = server.handover()
        assert await server.take_back(kept, 0.2) == [key]
        await _state_says_lease_4_answered(server, theirs)
    finally:
        theirs.close()
        await server.close()


def _report_line(pid: int, ended: int, *, seq: int, final: bool = False) -> bytes:
    counts = Counts()
    counts.counters[("calls_ended", "carrier closed")] = ended
    wire = WorkerReport(pid, 2, seq, 100.0, counts, final=final).to_wire()
    return encode({**wire, "op": "report"})


@pytest.mark.parametrize("final", [True, False])
async def test_a_worker_that_exits_during_the_exec_is_read_before_it_is_written_to(final):
    """Found by an independent check (session 8): a worker whose last calls end
    during the supervisor's exec sends their releases and its final report and
    exits. The next image wrote "sync" first: the write failed (EPIPE) and the
    transport closed unread, so the host lost what that worker had counted
    since its last report (calls_ended short for good) and counted its
    released slots reclaimed. Now what waits is read first. A worker that
    dies instead (no final report) still takes what it held with it."""
    view = HostView()
    view.report(WorkerReport.from_wire(json.loads(_report_line(4242, 10, seq=5))), 0.0)
    server = _next_image(4, view=view)
    ours, theirs = socket.socketpair()
    sent = encode({"op": "release", "id": 7}) + encode({"op": "release", "id": 8})
    if final:
        sent += _report_line(4242, 12, seq=6, final=True)
    theirs.sendall(sent)
    theirs.close()  # exited
    try:
        await server.adopt(ours, restoring=True, worker=(4242, 2), held_before=["b", "b"])
        await eventually(lambda: not server._channels)
        ended = view.totals().counter("calls_ended", "carrier closed")
        assert (ended, server.slots.reclaimed_total) == ((12, 0) if final else (10, 2))
        assert server.slots.workers == []
    finally:
        await server.close()


@pytest.mark.parametrize("final", [True, False])
async def test_an_idle_worker_gone_before_its_state_is_said_to_leave(final, caplog):
    """An upgrade's old generation, idle, ends as soon as the new image starts:
    its channel, kept over the exec, closed before its "state", with no row in
    the table (it held nothing). It left without "worker left the slot
    coordinator" (13 of 60 old-generation exits in the longevity run of session
    35; each had its "old-generation worker exited"). Said, nothing reclaimed."""
    caplog.set_level("INFO", logger="fleet_ingress")
    server = _next_image(4)
    ours, theirs = socket.socketpair()
    if final:
        theirs.sendall(_report_line(4242, 3, seq=6, final=True))
    theirs.close()  # exited
    try:
        await server.adopt(ours, restoring=True, worker=(4242, 2), held_before=[])
        await eventually(lambda: not server._channels)
        (left,) = [
            r for r in caplog.records if r.getMessage() == "worker left the slot coordinator"
        ]
        said = getattr(left, _FIELDS)
        assert (said["pid"], said["generation"], said["slots_reclaimed"]) == (4242, 2, 0)
        assert server.slots.reclaimed_total == 0 and server.slots.workers == []
    finally:
        await server.close()


async def test_a_worker_that_dies_before_it_answers_the_reexecution_gives_its_slots_back(host):
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()
    server, slots, slow_theirs, slow = await _slow_after_reexec(h)
    try:
        assert await server.finish_restore(0.3) == [slow]
        waiting = asyncio.create_task(w1.lease())
        await eventually(lambda: slots.queue_length == 1)
        slow_theirs.close()  # dead: the kernel closes its end
        assert (await asyncio.wait_for(waiting, 2)).fleet.name == "b"
        assert slots.reclaimed_total == 1 and [r.pid for r in slots.workers] == [w1.pid]
    finally:
        slow_theirs.close()
        await server.close()


async def test_a_worker_whose_state_names_a_lease_twice_is_cut_off_and_its_slots_come_back(
    host, caplog
):
    """A "state" the table cannot mean (a lease id twice), late after the
    re-execution: the channel closes with a log naming the worker, and what
    the previous table said it held is given back, not counted for ever."""
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()  # a; the slow worker holds b: both fleets full
    server, slots, slow_theirs, slow = await _slow_after_reexec(h)
    loop = asyncio.get_running_loop()
    try:
        assert await server.finish_restore(0.3) == [slow]
        assert await _read_exactly(slow_theirs, len(b'{"op":"sync"}\n')) == b'{"op":"sync"}\n'
        waiting = asyncio.create_task(w1.lease())  # no room: b is the slow one's
        await eventually(lambda: slots.queue_length == 1)
        state = b'{"op":"state","pid":77,"generation":1,"held":[[4,"b"],[4,"b"]],"waiting":[]}\n'
        await loop.sock_sendall(slow_theirs, state)
        async with asyncio.timeout(2):
            assert await loop.sock_recv(slow_theirs, 100) == b""  # closed
        # Up to maxconn again: the waiter gets b, the slow one's slot.
        assert (await asyncio.wait_for(waiting, 2)).fleet.name == "b"
        assert {f.name: f.active for f in slots.balancer.fleets} == {"a": 1, "b": 1}
        assert [r.pid for r in slots.workers] == [w1.pid] and slots.reclaimed_total == 1
        said = [
            r.fields  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == "fleet_ingress.slots" and "broke the protocol" in r.getMessage()
        ]
        assert [(f["pid"], f["generation"], f["channel"]) for f in said] == [(77, 1, slow)]
        assert "lease id 4 twice" in said[0]["error"]
    finally:
        slow_theirs.close()
        await server.close()


async def test_a_handover_waits_for_a_worker_not_reading_and_refuses_rather_than_cut_a_line(host):
    """What the supervisor sent a worker that is not reading sits in the
    transport's buffer; aborted by the hand-over it would be lost, the worker
    reading a line cut short. `handover` refuses, nothing handed over, every
    channel served on; once the worker reads (`flushed`), it goes through
    and the worker reads every line whole."""
    h = host(maxconn=2)
    w1 = await h.worker()
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    key = await h.server.adopt(ours)
    try:
        await loop.sock_sendall(theirs, b'{"op":"hello","pid":4242,"generation":1}\n')
        await eventually(lambda: 4242 in {r.pid for r in h.slots.workers})
        sent = fill_unread_channel(h.server, key)
        channel = h.server._channels[key]
        assert channel.transport is not None
        assert not await h.server.flushed(0.1)
        with pytest.raises(HandoverError) as caught:
            h.server.handover()
        said = str(caught.value)
        assert "pid 4242" in said and "not reading" in said
        assert "nothing was handed over" in said and "`fleet-ingress upgrade` again" in said
        assert str(w1.pid) not in said  # the worker that reads is not named
        # Every channel served on: nothing aborted, the reader granted.
        assert not any(c.handed_over for c in h.server._channels.values())
        assert not channel.transport.is_closing() and not w1.lost.done()
        assert (await asyncio.wait_for(w1.lease(), 2)).fleet.name in {"a", "b"}

        async def read_all() -> bytes:
            received = b""
            while len(received) < len(sent):
                received += await loop.sock_recv(theirs, 65536)
            return received

        reading = asyncio.create_task(read_all())
        assert await h.server.flushed(2.0)
        kept = h.server.handover()
        try:
            assert sorted(kept) == sorted([f"worker.{w1.pid}.1", "worker.4242.1"])
            received = await asyncio.wait_for(reading, 5)
            assert received == sent  # every line whole, none cut by the hand-over
        finally:
            for sock in kept.values():
                sock.close()
    finally:
        theirs.close()


# -- versions meet on the channel (an upgrade): unknown ops are ignored ---------------------------


def _unknown_ops_logged(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "fleet_ingress.slots" and "op not known" in r.getMessage()
    ]


async def test_an_op_the_worker_does_not_know_is_logged_once_and_the_channel_stays(host, caplog):
    """A newer supervisor (after an upgrade) speaks to an old worker: its new op
    must not cost the worker its channel, its slots and its accepting."""
    h = host(maxconn=2)
    w1 = await h.worker()
    held = await w1.lease()
    key = next(iter(h.server._channels))
    for _ in range(3):
        assert h.server.send(key, {"op": "future-op", "what": {"nested": [1]}})
    h.server.send(key, {"op": "other-future-op"})  # no "id", no fields it knows
    assert await h.server.collect_reports(2.0) == 0  # read after them, in order
    assert not w1.lost.done() and held.held
    assert (await w1.lease()).fleet.name in {"a", "b"}
    said = _unknown_ops_logged(caplog)
    assert sorted(f["op"] for f in said) == ["future-op", "other-future-op"]
    assert {f["pid"] for f in said} == {w1.pid}


async def test_an_op_the_coordinator_does_not_know_is_logged_once_and_the_channel_stays(
    host, caplog
):
    h = host(maxconn=2)
    w1 = await h.worker()
    held = await w1.lease()
    for _ in range(3):
        w1.send({"op": "future-op", "id": 1})
    assert (await w1.lease()).fleet.name in {"a", "b"}  # answered after the op was read
    # (Granted from a standing budget, at once: the table reads the ops after.)
    await eventually(lambda: _unknown_ops_logged(caplog))
    assert not w1.lost.done() and held.held
    assert [r.pid for r in h.slots.workers] == [w1.pid]
    assert [(f["op"], f["pid"]) for f in _unknown_ops_logged(caplog)] == [("future-op", w1.pid)]


async def test_an_unknown_op_before_hello_is_ignored_but_a_known_one_breaks_the_channel(host):
    h = host(maxconn=2)
    await h.worker()  # the coordinator's loop is serving
    for first, survives in ((b'{"op":"future-op"}\n', True), (b'{"op":"acquire","id":1}\n', False)):
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        await h.server.adopt(ours)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(theirs, first + b'{"op":"hello","pid":7,"generation":1}\n')
            if survives:
                await eventually(lambda: 7 in {r.pid for r in h.slots.workers})
            else:
                async with asyncio.timeout(2):
                    assert await loop.sock_recv(theirs, 100) == b""  # closed
                assert 7 not in {r.pid for r in h.slots.workers}
        finally:
            theirs.close()
        await eventually(lambda: 7 not in {r.pid for r in h.slots.workers})


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b'{"no-op": 1}\n', b'{"op":"granted","id":"x","fleet":"a"}\n'],
    ids=["not-json", "no-op", "bad-field"],
)
async def test_what_is_not_the_protocol_still_breaks_the_workers_channel(host, line):
    h = host(maxconn=2)
    w1 = await h.worker()
    channel = next(iter(h.server._channels.values()))
    assert channel.transport is not None
    channel.transport.write(line)
    await asyncio.wait_for(w1.lost, 2)


async def test_an_exec_that_fails_after_the_handover_takes_the_channels_back_counted_all_along(
    host,
):
    """`take_back` after a failed exec: the same channels, the same keys, the
    table rebuilt from the workers; a fleet removed while a worker has a call
    on it stays until that call ends (it was reaped at once before)."""
    h = host(maxconn=2)
    fleet_set = h.slots.balancer.members
    assert isinstance(fleet_set, FleetSet)
    reaped: list[str] = []
    h.slots.on_release.append(lambda f: fleet_set.reap(f) and reaped.append(f.name))
    w1, w2 = await h.worker(), await h.worker()
    on_b = await w1.lease(avoid=["a"])
    on_b2 = await w2.lease(avoid=["a"])
    b = h.slots.balancer.get("b")
    assert b is not None and on_b.fleet.name == on_b2.fleet.name == "b"
    assert not fleet_set.remove(b)  # removed: drains its two calls
    keys = sorted(r.worker for r in h.slots.workers)
    kept = h.server.handover()
    assert await h.server.take_back(kept, 2.0) == []
    assert sorted(r.worker for r in h.slots.workers) == keys  # same channels, same keys
    assert reaped == [] and b.active == 2 and h.slots.reclaimed_total == 0
    assert not h.slots.paused and not (w1.lost.done() or w2.lost.done())
    on_b.release()
    await eventually(lambda: b.active == 1)
    assert reaped == []
    on_b2.release()
    await eventually(lambda: reaped == ["b"])
    assert (await w1.lease()).fleet.name == "a"


async def test_a_channel_that_cannot_be_taken_back_is_closed_and_the_host_grants_again(
    host, monkeypatch, caplog
):
    """One kept channel cannot be served again after the failed exec (a fault
    inside `adopt`): that worker's channel is closed (it drains), its slots
    come back, the other worker is served again, nothing stays paused."""
    h = host(maxconn=1)
    w1, w2 = await h.worker(), await h.worker()
    await w1.lease()
    await w2.lease()  # both fleets full
    victim = next(r.worker for r in h.slots.workers if r.pid == w1.pid)
    channel_class = type(next(iter(h.server._channels.values())))
    kept = h.server.handover()

    class Failing(channel_class):
        def __init__(self, server, key, **kw) -> None:
            if key == victim:
                raise OSError(errno.EMFILE, "Too many open files")
            super().__init__(server, key, **kw)

    monkeypatch.setattr("fleet_ingress.net.slot_server._Channel", Failing)
    assert await h.server.take_back(kept, 2.0) == []
    assert not h.slots.paused
    assert all(sock.fileno() == -1 for name, sock in kept.items() if str(w1.pid) in name)
    await asyncio.wait_for(w1.lost, 2)  # closed: it drains
    assert [r.pid for r in h.slots.workers] == [w2.pid] and h.slots.reclaimed_total == 1
    assert not w2.lost.done()
    assert (await asyncio.wait_for(w2.lease(), 2)).fleet.name in {"a", "b"}  # granted again
    said = [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.levelname == "ERROR" and "could not be served again" in r.getMessage()
    ]
    assert [(f["pid"], f["channel"]) for f in said] == [(w1.pid, victim)]
    assert "Too many open files" in said[0]["error"]


async def test_a_never_joined_channel_taken_back_and_slow_is_not_an_unknown_hold(host, caplog):
    """A worker whose hello was unread at the failed exec holds nothing here:
    slow to answer the take-back's "sync", it is not logged as holding what
    is not known; when it speaks it joins with what it says."""
    h = host(maxconn=1)
    ours, theirs = socket.socketpair()
    key = await h.server.adopt(ours, worker=(4242, 1))
    kept = h.server.handover()
    assert list(kept) == ["worker.4242.1"]
    assert await h.server.take_back(kept, 0.2) == [key]
    assert not h.slots.paused
    unknown = [
        r
        for r in caplog.records
        if r.name == "fleet_ingress.slots" and "is not known" in r.getMessage()
    ]
    assert unknown == []
    assert [(r.pid, r.calls) for r in h.slots.workers] == [(4242, 0)]  # counted as nothing
    client = await SlotClient.connect(
        sock=theirs, pid=4242, generation=1, answer_timeout=10, hello=False
    )
    try:
        client.say_hello()
        assert (await asyncio.wait_for(client.lease(), 2)).fleet.name in {"a", "b"}
        assert [(r.pid, r.calls) for r in h.slots.workers] == [(4242, 1)]
    finally:
        client.close()


async def test_a_channel_not_yet_restored_goes_over_a_second_exec_too(host):
    """A second upgrade while a worker kept over the first has not answered
    "sync" yet: its channel goes on to the next image (closed, the worker
    would take the supervisor for dead), and its answer to each image's
    "sync" rebuilds its row once."""
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()  # a; the slow worker holds b
    server, _, slow_theirs, slow = await _slow_after_reexec(h)
    loop = asyncio.get_running_loop()
    third = _next_image(1)
    try:
        assert await server.finish_restore(0.3) == [slow]
        kept = server.handover()
        assert sorted(kept) == sorted([f"worker.{w1.pid}.1", "worker.77.1"])
        await _third_image_adopts(third, kept)
        # It reads both images' "sync" and answers each.
        expected = b'{"op":"sync"}\n{"op":"sync"}\n'
        assert await _read_exactly(slow_theirs, len(expected)) == expected
        state = b'{"op":"state","pid":77,"generation":1,"held":[[4,"b"]],"waiting":[]}\n'
        await loop.sock_sendall(slow_theirs, state + state)
        assert await third.finish_restore(2.0) == []
        await eventually(
            lambda: {r.pid: r.calls for r in third.slots.workers} == {w1.pid: 1, 77: 1}
        )
        waiting = asyncio.create_task(w1.lease())
        await eventually(lambda: third.slots.queue_length == 1)
        await asyncio.sleep(0.1)  # the second "state" read: the channel stays
        assert 77 in {r.pid for r in third.slots.workers}
        await loop.sock_sendall(slow_theirs, b'{"op":"release","id":4}\n')
        assert (await asyncio.wait_for(waiting, 2)).fleet.name == "b"
        assert third.slots.reclaimed_total == 0
    finally:
        slow_theirs.close()
        await third.close()
        await server.close()


async def test_a_worker_whose_hello_is_unread_at_the_exec_goes_over_with_its_channel(host):
    """A worker just started: the supervisor re-executes before it reads its
    hello. Its channel goes over, named by the pid the supervisor started;
    the new image's "sync" (and any op of its own) is read by the worker only
    after its hello, so its "state" follows the hello and it joins."""
    h = host(maxconn=1)
    ours, theirs = socket.socketpair()
    await h.server.adopt(ours, worker=(4242, 1))
    kept = h.server.handover()
    assert list(kept) == ["worker.4242.1"]
    server = _next_image(1)
    slots = server.slots
    try:
        key = await server.adopt(
            kept["worker.4242.1"], restoring=True, worker=(4242, 1), held_before=[]
        )
        client = await SlotClient.connect(
            sock=theirs, pid=4242, generation=1, answer_timeout=10, hello=False
        )
        stops: list[dict] = []
        client.handlers["stop"] = stops.append
        assert server.send(key, {"op": "stop", "id": 1, "upgrade": True})
        await asyncio.sleep(0.1)
        assert stops == []  # nothing read before its hello
        client.say_hello()
        assert await server.finish_restore(2.0) == []
        assert [(r.pid, r.calls) for r in slots.workers] == [(4242, 0)]
        await eventually(lambda: len(stops) == 1)
        assert (await client.lease()).fleet.name in {"a", "b"}
        assert not client.lost.done()
        client.close()
    finally:
        await server.close()


async def test_a_worker_flooded_before_its_hello_breaks_the_channel(caplog):
    """Held until the hello: a few messages (a "sync" per exec, a stop, a
    reload). A peer that sends more than HELD_BEFORE_HELLO to a worker that
    has not joined is not this protocol: the channel is broken, as on any
    other protocol error, and nothing held is acted on."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    client = await SlotClient.connect(
        sock=theirs, pid=4343, generation=1, answer_timeout=10, hello=False
    )
    stops: list[dict] = []
    client.handlers["stop"] = stops.append
    try:
        few = b'{"op":"sync"}\n' + b'{"op":"stop","id":1}\n'
        await loop.sock_sendall(ours, few * (HELD_BEFORE_HELLO // 2))
        await asyncio.sleep(0.1)
        assert not client.lost.done()  # HELD_BEFORE_HELLO held: still fine
        await loop.sock_sendall(ours, b'{"op":"sync"}\n')
        async with asyncio.timeout(5):
            await client.lost
        broken = [
            r
            for r in caplog.records
            if r.name == "fleet_ingress.slots" and r.getMessage() == "slot channel broken"
        ]
        assert len(broken) == 1
        assert "before this worker's hello" in broken[0].fields["error"]  # type: ignore[attr-defined]
        client.say_hello()
        assert stops == []
    finally:
        client.close()
        ours.close()


# -- a line the old image had half read when it handed the channel over --------------------------


def _reporting(client: SlotClient, requests: int) -> bytes:
    """`client`'s next report as it goes on the wire, counting `requests`."""
    client.reporter = lambda: {"counts": {"counters": [["requests", "/ws/", "101", requests]]}}
    return encode(client._report(final=False))


def _requests(view: HostView) -> int:
    return view.totals().counter("requests", "/ws/", "101")


async def _half_read(server: SlotServer, pid: int, line: bytes, sent: bytes) -> None:
    """Wait until `server` has read `line` (of worker `pid`) up to where `sent` ends."""
    channel = next(c for c in server._channels.values() if c.pid == pid)
    await eventually(lambda: channel.decoder.pending == sent)
    assert line.startswith(sent) and b"\n" not in sent


async def test_a_line_cut_by_the_exec_is_read_whole_by_the_next_image(host):
    """The old image had read the head of a worker's report when it handed the
    channel over; the rest came meanwhile. The head goes over the exec
    (`unread`), the new image reads it first: the report counts. (Before, the
    new image read the tail alone, not a message: skipped, the report lost.)"""
    h = host(maxconn=2)
    w1 = await h.worker()
    line = _reporting(w1, requests=7)
    assert w1._transport is not None
    w1._transport.write(line[:40])
    await _half_read(h.server, w1.pid, line, line[:40])
    unread = h.server.unread()
    kept = h.server.handover()
    assert unread == {f"worker.{w1.pid}.1": line[:40]}
    w1._transport.write(line[40:])  # during the exec: waits in the kernel
    view = HostView()
    server = _next_image(2, view=view)
    slots = server.slots
    try:
        for name, sock in kept.items():
            await server.adopt(
                sock, restoring=True, worker=(w1.pid, 1), held_before=[], unread=unread[name]
            )
        assert await server.finish_restore(2.0) == []
        await eventually(lambda: _requests(view) == 7)
        assert [r.pid for r in slots.workers] == [w1.pid]
        assert not w1.lost.done()  # nothing the channel could not read
    finally:
        await server.close()


async def test_a_state_cut_by_a_second_exec_rebuilds_the_row_without_waiting(host):
    """A worker answered the first new image's "sync" and that image had read
    half of its "state" when it re-executed again. Carried, the head and the
    rest make the whole "state" in the third image, which rebuilds the row
    from it at once, however long the worker takes to read the third image's
    "sync"; its answer to that one is then a second "state", ignored. (Before,
    the half was lost: the row waited for that second answer, silent until the
    restore timeout.)"""
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()  # a
    server, _, slow_theirs, _ = await _slow_after_reexec(h)  # 77 held b
    loop = asyncio.get_running_loop()
    third = _next_image(1)
    try:
        assert await _read_exactly(slow_theirs, len(b'{"op":"sync"}\n')) == b'{"op":"sync"}\n'
        state = b'{"op":"state","pid":77,"generation":1,"held":[[4,"b"]],"waiting":[]}\n'
        await loop.sock_sendall(slow_theirs, state[:30])
        await _half_read(server, 77, state, state[:30])
        unread = server.unread()
        kept = server.handover()
        assert unread == {"worker.77.1": state[:30]}
        await loop.sock_sendall(slow_theirs, state[30:])
        await _third_image_adopts(third, kept, unread)
        # The worker does not answer the third image's "sync" (busy): no need.
        assert await third.finish_restore(1.0) == []
        assert {r.pid: r.calls for r in third.slots.workers} == {w1.pid: 1, 77: 1}
        assert not any(r.reserved for r in third.slots.workers)  # its own account
        # Its answer comes late: a second "state", ignored; nothing counted twice.
        await loop.sock_sendall(slow_theirs, state)
        await asyncio.sleep(0.1)
        assert {f.name: f.active for f in third.slots.balancer.fleets} == {"a": 1, "b": 1}
        waiting = asyncio.create_task(w1.lease())
        await eventually(lambda: third.slots.queue_length == 1)
        await loop.sock_sendall(slow_theirs, b'{"op":"release","id":4}\n')
        assert (await asyncio.wait_for(waiting, 2)).fleet.name == "b"
        assert {f.name: f.active for f in third.slots.balancer.fleets} == {"a": 1, "b": 1}
        assert third.slots.reclaimed_total == 0
    finally:
        slow_theirs.close()
        await third.close()
        await server.close()


async def test_a_line_cut_by_an_exec_that_failed_is_read_whole_when_taken_back(host):
    """The exec failed after the hand-over: `take_back` serves the channel
    again in this process, the head of the line this image had read first."""
    h = host(maxconn=2)
    view = h.server.view = HostView()
    w1 = await h.worker()
    line = _reporting(w1, requests=5)
    assert w1._transport is not None
    w1._transport.write(line[:25])
    await _half_read(h.server, w1.pid, line, line[:25])
    kept = h.server.handover()
    w1._transport.write(line[25:])
    assert await h.server.take_back(kept, 2.0) == []
    await eventually(lambda: _requests(view) == 5)
    assert [r.pid for r in h.slots.workers] == [w1.pid] and not w1.lost.done()


# -- a channel that ends while its worker's process runs on ------------------------


async def test_a_channel_cut_while_its_worker_runs_keeps_its_slots_until_the_process_exits(host):
    """The supervisor cuts a worker's channel (it broke the protocol) while
    its process runs on with its calls: those slots count for the host until
    the process has exited (`keeps_slots` says it runs; `release_kept` as it
    exits), then go to the queue first."""
    h = host(maxconn=1)
    w1, w2 = await h.worker(), await h.worker()
    await w1.lease()
    await w1.lease()  # both fleets full
    key = next(r.worker for r in h.slots.workers if r.pid == w1.pid)
    asked: list[tuple[int, int]] = []
    h.server.keeps_slots = lambda k, pid: asked.append((k, pid)) or pid == w1.pid
    waiting = asyncio.create_task(w2.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    w1.send({"op": "hello", "pid": w1.pid, "generation": 1})  # joined already: a worker bug
    await asyncio.wait_for(w1.lost, 2)
    await asyncio.sleep(0.1)
    assert asked == [(key, w1.pid)]
    assert not waiting.done() and h.active() == {"a": 1, "b": 1}
    rows = {r.pid: (r.calls, r.channel_lost) for r in h.slots.workers}
    assert rows == {w1.pid: (2, True), w2.pid: (0, False)}
    assert h.slots.reclaimed_total == 0
    assert h.server.release_kept(key) is not None  # its process exited
    assert (await asyncio.wait_for(waiting, 2)).fleet.name in {"a", "b"}
    assert h.slots.reclaimed_total == 2 and [r.pid for r in h.slots.workers] == [w2.pid]
    assert h.server.release_kept(key) is None


@pytest.mark.parametrize("runs_on", [False, True], ids=["exited", "still-running"])
async def test_a_worker_kept_over_the_exec_whose_channel_ends_before_its_state_counts_what_it_held(
    host, runs_on
):
    """The previous image's table said it held b; its channel ends before it
    answered "sync". Its slot is counted reclaimed (it was not: the calls it
    lost were counted, their slots not), and kept counted until its process
    exits if it runs on."""
    h = host(maxconn=1)
    w1 = await h.worker()
    await w1.lease()  # a; the slow worker held b
    server, slots, slow_theirs, slow = await _slow_after_reexec(h)
    server.keeps_slots = lambda key, pid: runs_on
    try:
        slow_theirs.close()  # before its "state"
        assert await server.finish_restore(2.0) == []
        if runs_on:
            assert {f.name: f.active for f in slots.balancer.fleets} == {"a": 1, "b": 1}
            waiting = asyncio.create_task(w1.lease())
            await eventually(lambda: slots.queue_length == 1)
            assert {r.pid: (r.calls, r.channel_lost) for r in slots.workers} == {
                w1.pid: (1, False),
                77: (1, True),
            }
            assert slots.reclaimed_total == 0
            server.release_kept(slow)  # its process exited
            assert (await asyncio.wait_for(waiting, 2)).fleet.name == "b"
        else:
            assert {f.name: f.active for f in slots.balancer.fleets} == {"a": 1, "b": 0}
        assert slots.reclaimed_total == 1
        assert 77 not in {r.pid for r in slots.workers}
    finally:
        slow_theirs.close()
        await server.close()


async def test_a_channel_whose_hello_named_pid_0_still_gives_its_slots_back(host):
    """Review (session 7): the supervisor's `keeps_slots` (`_still_running`)
    asks `os.waitid(P_PID, channel.pid, ...)` with the pid the worker *said*
    in its hello; for pid 0 (or negative) waitid raises EINVAL, an OSError
    that `child_running` does not catch (only ChildProcessError). It escapes
    `_gone` (connection_lost): `slots.leave` and `on_leave` never run, the
    slots stay counted for ever and the waiter never gets one."""
    from fleet_ingress.service.worker_exits import child_running

    h = host(maxconn=1)
    h.server.keeps_slots = lambda key, pid: child_running(pid)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await h.server.adopt(ours)
    bad = await SlotClient.connect(sock=theirs, pid=0, generation=1, answer_timeout=5)
    h.clients.append(bad)
    await eventually(lambda: [r.pid for r in h.slots.workers] == [0])
    w2 = await h.worker()
    await bad.lease()
    await bad.lease()  # both fleets full
    waiting = asyncio.create_task(w2.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    bad.close()
    try:
        assert (await asyncio.wait_for(waiting, 2)).fleet.name in {"a", "b"}
    finally:
        waiting.cancel()


async def test_a_message_the_worker_fails_to_act_on_is_skipped_and_the_channel_stays(host, caplog):
    """A bug in acting on one message (here: a handler that raises) is logged,
    counted and skipped; the channel, the slots held and the messages after it
    are kept. Before, the exception ended the channel, and the worker drained:
    every call it carried cut at timeouts.drain. But a `stop` it failed to act
    on still ends the channel: the worker drains, as it was told."""
    from fleet_ingress.net.event_loop import unexpected_errors

    h = host(maxconn=2)
    w1 = await h.worker()
    held = await w1.lease()
    acted: list[dict] = []

    def fails(message: dict) -> None:
        acted.append(message)
        raise RuntimeError("a bug in a handler")

    w1.handlers["reload"] = fails
    w1.handlers["stop"] = fails
    key = next(iter(h.server._channels))
    before = unexpected_errors()
    assert h.server.send(key, {"op": "reload", "id": 1})
    assert await h.server.collect_reports(2.0) == 0  # none unanswered: read after it
    assert len(acted) == 1 and unexpected_errors() == before + 1
    assert not w1.lost.done() and held.held
    assert (await w1.lease()).fleet.name in {"a", "b"}
    (said,) = [r for r in caplog.records if "could not be acted on" in r.getMessage()]
    assert said.fields["op"] == "reload" and said.exc_info is not None  # type: ignore[attr-defined]

    assert h.server.send(key, {"op": "stop", "drain": 1})
    await asyncio.wait_for(w1.lost, 2)
    assert len(acted) == 2


async def test_a_waiter_behind_one_served_after_a_stall_is_refused_at_its_deadline(host):
    """The coordinator's loop stalled past two waiters' deadlines, a slot freed
    meanwhile: the first waiter gets the slot (its timer put off, the release
    read first) and the second is refused at once, the queue's timer armed for
    a deadline already past. On uvloop a timer of under 0.5 ms is no
    TimerHandle (no `when()`): the late timer raised AttributeError when due,
    the queue's timer was lost and the waiter waited for its worker's answer
    timeout (timeouts.queue + 10 s) instead."""
    h = host(maxconn=1, queue_timeout=0.3)
    w1, w2 = await h.worker(), await h.worker(answer_timeout=5.0)
    held = [await w1.lease(), await w1.lease()]
    first = asyncio.create_task(w1.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    second = asyncio.create_task(w2.lease())
    await eventually(lambda: h.slots.queue_length == 2)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    def stall() -> None:
        time.sleep(0.4)  # the coordinator's loop does not run
        held[0].release()  # a slot freed while it was stalled: unread
        time.sleep(0.1)

    loop.call_soon(stall)
    granted = await asyncio.wait_for(first, 5)
    assert granted.fleet.name == held[0].fleet.name
    began = loop.time()
    with pytest.raises(NoFleetAvailable) as caught:
        await asyncio.wait_for(second, 5)
    assert caught.value.reason == queue_timeout_reason(0.3)
    assert loop.time() - began < 1.0
    assert errors == []


async def test_a_waiter_that_waited_through_a_reexecution_past_its_deadline_is_refused_after_it(
    host,
):
    """A re-execution slower than timeouts.queue, the fleets full: a call that
    waited through it is refused at the resume, its deadline past (the queue's
    timer armed with a negative delay). On uvloop that timer raised
    AttributeError (a plain Handle, no `when()`) and the waiter waited for its
    worker's answer timeout instead."""
    h = host(maxconn=1, queue_timeout=0.3)
    w1 = await h.worker(answer_timeout=5.0)
    await w1.lease()
    await w1.lease()  # a and b: both full
    waiting = asyncio.create_task(w1.lease())
    await eventually(lambda: h.slots.queue_length == 1)
    kept = h.server.handover()
    await asyncio.sleep(0.5)  # the exec, slower than timeouts.queue
    slots = HostSlots(_balancer(1), queue_timeout=0.3, max_queue=8)
    slots.paused = True
    server = SlotServer(slots)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        for sock in kept.values():
            await server.adopt(sock, restoring=True)
        assert await server.finish_restore(2.0) == []
        began = loop.time()
        with pytest.raises(NoFleetAvailable) as caught:
            await asyncio.wait_for(waiting, 5)
        assert caught.value.reason == queue_timeout_reason(0.3)
        assert loop.time() - began < 1.0
        assert errors == []
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("said", "wait"),
    [
        ({}, None),  # a supervisor of a release before "queued": the wait is not known
        ({"queued": False}, 0.0),  # this release's, granted at once
        ({"queued": True}, 0.3),  # this release's, from its queue
    ],
)
async def test_a_grant_from_a_supervisor_that_does_not_say_queued_has_no_wait_known(said, wait):
    """A worker of this release under a supervisor of the release before (the
    venv holds the new code before `upgrade`: a worker replaced then runs it)
    is granted a slot after a 0.3 s wait in that supervisor's queue, which says
    nothing of it: its access line's queued_ms must not say 0 ("did not wait"),
    but that the wait is not known (null). This release's supervisor says
    "queued" in every grant, false at once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = await SlotClient.connect(sock=theirs, pid=1, generation=1, answer_timeout=5)
    loop = asyncio.get_running_loop()
    ours.setblocking(False)
    try:
        leasing = asyncio.ensure_future(client.lease())
        heard = b""
        async with asyncio.timeout(5):
            while b'"acquire"' not in heard:
                heard += await loop.sock_recv(ours, 65536)
        await asyncio.sleep(0.3)  # in the coordinator's queue
        (spec,) = parse_fleets_text("https://a.test name=a", default_maxconn=2)
        await loop.sock_sendall(
            ours,
            encode({"op": "granted", "id": 1, "fleet": "a", "spec": spec_to_wire(spec), **said}),
        )
        lease = await asyncio.wait_for(leasing, 5)
        if wait is None:
            assert lease.queued_s is None
        else:
            assert lease.queued_s == pytest.approx(wait, abs=0.1 if wait else 0)
    finally:
        client.close()
        ours.close()


async def test_every_answer_of_this_releases_coordinator_says_whether_it_came_from_the_queue(host):
    """The worker tells "no wait" from "not said" (a supervisor before the key)."""
    h = host(maxconn=1, queue_timeout=5.0)
    w1 = await h.worker()
    first = await w1.lease()
    second = await w1.lease(avoid=[first.fleet.name])
    assert (first.queued_s, second.queued_s) == (0.0, 0.0)
    waiting = asyncio.ensure_future(w1.lease())
    await asyncio.sleep(0.2)
    first.release()
    third = await asyncio.wait_for(waiting, 2)
    assert 0.15 <= third.queued_s < 2.0


async def test_a_call_with_a_record_in_its_workers_table_is_kept_so_and_ended_there_when_logged(
    host,
):
    """A worker with a call table (`net.call_table_map`, a real memfd) says in
    each slot request whether the call has a record ("table"); the supervisor
    keeps that ("in_table": a lease the table no longer has when the worker
    dies had its record ended and reused, `core.lost_calls.lost_with_table`).
    Past the table's records a call has none and is not so marked. Its access
    line written ("logged"), its record reads ENDED at once, its slot still
    held: a death then is no second line, whatever of "logged" reached the
    supervisor. Pins the wiring of both ends (the unit tests pin the rule)."""
    from fleet_ingress.core.call_table import ENDED, LIVE
    from fleet_ingress.core.lost_calls import lost_with_table
    from fleet_ingress.net.call_table_map import CallTableWriter, make_table, read_table_fd

    h = host(maxconn=2)
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]
    fd = make_table(count=1)
    try:
        w1.table = CallTableWriter(os.dup(fd))
        recorded = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        unrecorded = await w1.lease(call={"call_id": 2, "bot_id": "bot-2"})  # table full
        await eventually(lambda: len(h.server.calls_of(key)) == 2)
        kept = h.server.calls_of(key)
        assert kept[recorded.id].get("in_table") is True
        assert "in_table" not in kept[unrecorded.id]
        recorded.call_logged()
        assert recorded.held
        assert {n: s for n, (s, _) in read_table_fd(fd).items()} == {recorded.id: ENDED}
        live = await w1.lease(call={"call_id": 3, "bot_id": "bot-3"})  # no record free yet
        assert "in_table" not in (await _kept_when_said(h, key, live.id))
        recorded.release()
        again = await w1.lease(call={"call_id": 4, "bot_id": "bot-4"})  # its record, reused
        assert (await _kept_when_said(h, key, again.id)).get("in_table") is True
        assert {n: s for n, (s, _) in read_table_fd(fd).items()} == {again.id: LIVE}
        w1.close()
        await eventually(lambda: not h.slots.workers)
        lost = lost_with_table(h.server.take_calls(key), read_table_fd(fd))
        assert sorted(c["call_id"] for c in lost.values()) == [2, 3, 4]
    finally:
        os.close(fd)


async def _kept_when_said(h: Host, key: object, lease: int) -> dict[str, object]:
    await eventually(lambda: lease in h.server.calls_of(key))
    return h.server.calls_of(key)[lease]


async def test_a_recorded_calls_logged_rides_its_release_one_write_for_the_two(asked_host):
    """A call with a record in its worker's call table: once its access line is
    written (its record ENDED), its "logged" waits for this end's next write,
    and the release that comes a moment later says it: the supervisor reads
    one "release" (one wake-up, not two) and forgets the call all the same. A
    call with no record (the table full) is told at once, as before. A
    recorded call whose release does not come is told "logged" ANSWERS_FLUSH
    after. Before, every "logged" went at once: "logged", then "release"."""
    h = asked_host(maxconn=3)
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]
    read = _ops_read(h)
    fd = _with_table(w1, count=2)
    try:
        recorded = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        lingering = await w1.lease(call={"call_id": 2, "bot_id": "bot-2"})
        unrecorded = await w1.lease(call={"call_id": 3, "bot_id": "bot-3"})  # table full
        await eventually(lambda: len(h.server.calls_of(key)) == 3)
        read.clear()
        recorded.call_logged()
        recorded.release()
        unrecorded.call_logged()
        unrecorded.release()
        await eventually(lambda: sum(h.active().values()) == 1)
        assert read == [("release", recorded.id), ("logged", unrecorded.id),
                        ("release", unrecorded.id)]  # fmt: skip
        assert list(h.server.calls_of(key)) == [lingering.id]
        read.clear()
        logged_at = time.monotonic()
        lingering.call_logged()
        await eventually(lambda: not h.server.calls_of(key))
        assert read == [("logged", lingering.id)]
        assert time.monotonic() - logged_at >= ANSWERS_FLUSH * 0.9
        assert lingering.held and sum(h.active().values()) == 1
    finally:
        os.close(fd)


def _with_table(client: SlotClient, count: int) -> int:
    """A real call table (memfd) for `client`; its descriptor, to close."""
    from fleet_ingress.net.call_table_map import CallTableWriter, make_table

    fd = make_table(count=count)
    client.table = CallTableWriter(os.dup(fd))
    return fd


def _ops_read(h: Host) -> list[tuple[str, object]]:
    """Every slot message the coordinator reads from here on: (op, id)."""
    read: list[tuple[str, object]] = []
    handle = h.server._handle

    def seen(channel, message):
        read.append((message["op"], message.get("id")))
        handle(channel, message)

    h.server._handle = seen  # type: ignore[method-assign]
    return read


def _lone_row(h: Host):
    (row,) = h.slots.workers
    return row


async def _lone_budget_taken(h: Host, client: SlotClient) -> None:
    row = next(r for r in h.slots.workers if r.pid == client.pid)
    await eventually(lambda: row.standing_lone and row.standing_taken and client._lone)


async def test_a_lone_worker_is_given_every_free_slot_and_holds_its_grants(asked_host):
    """The only worker, nobody waiting: it is given every free slot of each
    fleet as a standing budget ("lone"), grants its calls from it at once and
    holds their "acquire" (a recorded call) and their release into it for its
    next write, or ANSWERS_FLUSH: the supervisor reads none of a call's
    messages as it is granted (0 wake-ups, where main reads its "acquire" and
    answers it). maxconn holds: calls and reserved slots never pass it. On
    main no budget is given (`standing_lone` does not exist; the row has none)."""
    h = asked_host(maxconn=2, lone=True)
    w1 = await h.worker()
    fd = _with_table(w1, 8)
    try:
        await _lone_budget_taken(h, w1)
        fleets = {f.name: f for f in h.slots.balancer.fleets}
        assert {n: f.standing for n, f in fleets.items()} == {"a": 2, "b": 2}
        read = _ops_read(h)
        granted_at = time.monotonic()
        first = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        second = await w1.lease(call={"call_id": 2, "bot_id": "bot-2"})
        assert first.queued_s == 0.0 and {first.fleet.name, second.fleet.name} == {"a", "b"}
        await asyncio.sleep(0.02)
        if time.monotonic() - granted_at < ANSWERS_FLUSH / 2:
            assert read == []  # held: nothing read yet
        # Logged while its "acquire" is held: told at once (its record reads
        # ENDED, its slot still held), the release into the budget held.
        first.call_logged()
        first.release()  # back into the budget: held too
        await eventually(lambda: len(read) >= 4)
        assert read[:4] == [
            ("acquire", first.id),
            ("acquire", second.id),
            ("logged", first.id),
            ("release", first.id),
        ]
        assert {n: (f.active, f.standing) for n, f in fleets.items()} == {
            first.fleet.name: (0, 2),
            second.fleet.name: (1, 1),
        }
        for f in fleets.values():
            assert f.active + f.standing <= f.maxconn
    finally:
        os.close(fd)


async def test_a_look_at_the_host_reads_the_lone_workers_held_grants_first(asked_host):
    """Stats are exact when someone looks: a scrape or `stat` asks every worker
    for a report (`collect_reports`), and the lone worker's answer carries what
    it held (its grants, its releases) ahead of it: once it is read, the
    fleets' calls count every call granted, however recent. (On main the
    grants are not held: the first assertion fails.)"""
    h = asked_host(maxconn=4, lone=True)
    w1 = await h.worker()
    fd = _with_table(w1, 8)
    try:
        await _lone_budget_taken(h, w1)
        granted_at = time.monotonic()
        leases = [await w1.lease(call={"call_id": n, "bot_id": f"b{n}"}) for n in range(3)]
        if time.monotonic() - granted_at < ANSWERS_FLUSH / 2:
            assert sum(h.active().values()) == 0  # held: not told yet
        assert await h.server.collect_reports(2.0) == 0
        assert sum(h.active().values()) == 3  # read before the report: exact at the look
        assert _lone_row(h).calls == 3
        leases[0].release()
        assert await h.server.collect_reports(2.0) == 0
        assert sum(h.active().values()) == 2
    finally:
        os.close(fd)


async def test_a_second_workers_hello_ends_the_lone_budget_before_it_is_granted(asked_host):
    """A second worker joins while the first holds a lone budget, a grant from
    it held and a release into it held: the budget is taken back at the hello,
    and the second worker's "acquire" is read only once the first has dropped
    it (after its held grant and release): it is granted the fleet leastconn
    names host-wide, at once, never past maxconn. On main no lone budget is given."""
    h = asked_host(maxconn=1, lone=True)
    w1 = await h.worker()
    fd = _with_table(w1, 4)
    fleets = {f.name: f for f in h.slots.balancer.fleets}
    most = 0

    def watch() -> None:
        nonlocal most
        most = max(most, *(f.active + f.standing for f in fleets.values()))

    try:
        await _lone_budget_taken(h, w1)
        held = [await w1.lease(call={"call_id": n, "bot_id": f"bot-{n}"}) for n in (1, 2)]
        held[0].release()  # held by w1, into its budget
        watch()
        read = _ops_read(h)
        w2 = await h.worker()
        lease = await asyncio.wait_for(w2.lease(), 2)
        watch()
        assert lease.fleet.name == held[0].fleet.name and lease.queued_s == 0.0
        assert h.slots.queue_length == 0 and sum(h.active().values()) == 2
        # w2's lease id is read after w1's "budget-dropped" (w1's own ids come before).
        assert read[read.index(("budget-dropped", None)) + 1 :] == [("acquire", lease.id)]
        assert all(r.standing is None for r in h.slots.workers)
        await asyncio.sleep(0.05)
        assert w1._budget is None and w2._budget is None  # two workers: no lone budget
        watch()
        assert most <= 1
    finally:
        os.close(fd)


async def test_a_call_that_must_wait_takes_the_lone_budget_back(asked_host):
    """A call waits in the queue: the lone budget is taken back, so the worker's
    releases go at once again and the waiting call is granted when a slot is
    given back, not ANSWERS_FLUSH later; given again once nobody waits."""
    h = asked_host(maxconn=1, queue_timeout=5.0, lone=True)
    w1 = await h.worker()
    fd = _with_table(w1, 4)
    try:
        await _lone_budget_taken(h, w1)
        held = [await w1.lease(call={"call_id": n, "bot_id": f"bot-{n}"}) for n in (1, 2)]
        waiting = asyncio.ensure_future(w1.lease(call={"call_id": 3, "bot_id": "bot-3"}))
        await eventually(lambda: h.slots.queue_length == 1 and w1._budget is None)
        released_at = time.monotonic()
        held[0].release()
        granted = await asyncio.wait_for(waiting, 2)
        assert time.monotonic() - released_at < ANSWERS_FLUSH / 2 or granted.queued_s > 0
        assert granted.fleet.name == held[0].fleet.name
        held[1].release()
        # Nobody waits: given again at the next look (its next call, or a probe).
        await eventually(lambda: sum(h.active().values()) == 1)
        h.server.wake()
        await _lone_budget_taken(h, w1)
    finally:
        os.close(fd)


async def test_a_lone_worker_gone_with_grants_and_releases_held_gives_every_slot_back(
    asked_host,
):
    """Its channel ends (SIGKILL's effect here) with a grant and a release
    unwritten: every slot it held or had reserved comes back at once, the
    call granted and held is lost (named by its record in the table, though
    its "acquire" never came), the released one is not (its record freed)."""
    from fleet_ingress.core.lost_calls import lost_with_table
    from fleet_ingress.net.call_table_map import read_table_fd

    h = asked_host(maxconn=2, lone=True)
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]
    fd = _with_table(w1, 4)
    try:
        await _lone_budget_taken(h, w1)
        told = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        assert await h.server.collect_reports(2.0) == 0  # its acquire read
        ended = await w1.lease(call={"call_id": 2, "bot_id": "bot-2"})
        unread = await w1.lease(call={"call_id": 3, "bot_id": "bot-3"})  # held
        ended.call_logged()
        ended.release()  # held
        assert told.held and unread.held
        w1._cancel_flush()  # dies before its flush
        w1._transport.abort()
        await eventually(lambda: not h.slots.workers)
        assert {f.name: (f.active, f.standing) for f in h.slots.balancer.fleets} == {
            "a": (0, 0),
            "b": (0, 0),
        }
        lost = lost_with_table(h.server.take_calls(key), read_table_fd(fd))
        assert sorted(c["call_id"] for c in lost.values()) == [1, 3]
    finally:
        os.close(fd)


async def test_a_lone_workers_grant_held_past_a_probe_is_not_counted_twice(asked_host):
    """The lone worker grants a call (its "acquire" held for its next write)
    and the fleet answers it; a probe leaves and the fleet's number counts it;
    the acquire is read after. It is counted as opened before that probe (its
    "at"), not since: on main the estimate read one low per call granted in
    the ANSWERS_FLUSH before each probe, until the next one (the lone budget
    given again that much smaller, the fleet FULL early)."""
    h = asked_host(maxconn=8, lone=True)
    fleets = {f.name: f for f in h.slots.balancer.fleets}
    for f in fleets.values():  # probed: 4 free each
        f.probe_counted(4, f.probe_sending(time.monotonic()))
    w1 = await h.worker()
    fd = _with_table(w1, 8)
    try:
        await _lone_budget_taken(h, w1)
        granted_at = time.monotonic()
        lease = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        answered_at = time.monotonic()
        lease.fleet_answered(answered_at)
        fleet = fleets[lease.fleet.name]
        # A probe leaves after its 101; the fleet's number counts the call.
        fleet.probe_counted(3, fleet.probe_sending(answered_at + 0.001))
        if time.monotonic() - granted_at < ANSWERS_FLUSH / 2:
            assert fleet.active == 0  # held: read after the probe
        assert await h.server.collect_reports(2.0) == 0
        assert fleet.active == 1
        assert fleet.estimated_free == 3
    finally:
        os.close(fd)


async def test_a_lone_workers_call_asked_as_its_budget_is_given_waits_for_it_with_queueing_off(
    asked_host,
):
    """Queueing off (timeouts.queue 0): the only worker asks the supervisor
    for a slot just as it is given a lone budget (it had none: its hello, a
    probe, a 429 or a second worker took it back; the two cross on the wire).
    Every free slot is reserved for that same worker: the call waits for them
    (the budget is taken back at once, a round trip) and is granted. On main
    it was refused 503 "every fleet is at capacity and queueing is off"
    while its fleets had room (SPEC 4: 503 only when none is eligible)."""
    h = asked_host(maxconn=2, queue_timeout=0, lone=True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await h.server.adopt(ours)
        hello = {"op": "hello", "pid": 4242, "generation": 1, "answers": True, "lone": True}
        # Its hello and its first call's ask in one write: read in that order.
        asking = {"op": "acquire", "id": 1, "avoid": [], "call": {"call_id": "c1"}}
        await loop.sock_sendall(theirs, encode(hello) + encode(asking))
        decoder, seen = LineDecoder(), []
        async with asyncio.timeout(5):
            while not any(m["op"] in ("granted", "refused") for m in seen):
                for message in decoder.feed(await loop.sock_recv(theirs, 65536)):
                    seen.append(message)
                    if message["op"] == "budget":  # taken, then dropped when told
                        await loop.sock_sendall(theirs, encode({"op": "budget-taken"}))
                    elif message["op"] == "budget-end":
                        await loop.sock_sendall(theirs, encode({"op": "budget-dropped"}))
        answer = next(m for m in seen if m["op"] in ("granted", "refused"))
        assert answer["op"] == "granted", answer
        assert [m["op"] for m in seen[:2]] == ["budget", "budget-end"]
        assert answer["queued"] is True  # it waited for the reserved slots
        assert h.slots.queue_timeouts == 0 and h.slots.queue_length == 0
        for f in h.slots.balancer.fleets:
            assert f.active + f.standing <= f.maxconn
    finally:
        theirs.close()


async def test_a_call_asked_on_a_parked_channel_that_ends_still_has_its_line(
    asked_host, monkeypatch
):
    """A second worker asks for a slot while the lone one is taking its
    budget back (its message parked), and dies: who the call is was in the
    parked "acquire" alone. It is kept (its line as lost with its worker);
    on main it was not, and a call with no record in its worker's table
    went without a line."""
    monkeypatch.setattr("fleet_ingress.net.slot_server.LONE_END_WAIT", 30.0)  # told, not timed
    h = asked_host(maxconn=1, queue_timeout=5.0, lone=True)
    w1 = await h.worker()
    await _lone_budget_taken(h, w1)
    assert w1._transport is not None
    w1._transport.pause_reading()  # busy: it reads "budget-end" later
    w2 = await h.worker()
    (channel,) = [c for c in h.server._channels.values() if c.pid == w2.pid]
    asked = asyncio.ensure_future(w2.lease(call={"call_id": "c7", "bot_id": "bot-7"}))
    await eventually(lambda: len(channel.parked) == 1)
    assert w2._transport is not None
    w2._transport.abort()  # SIGKILL's effect on its channel
    with pytest.raises(NoFleetAvailable):
        await asyncio.wait_for(asked, 2)
    await eventually(lambda: channel.key not in h.server._channels)
    calls = h.server.take_calls(channel.key)
    assert [c.get("call_id") for c in calls.values()] == ["c7"]
    w1._transport.resume_reading()


@pytest.mark.timeout(60)
async def test_a_second_workers_many_parked_messages_are_each_read_once_in_order(
    asked_host, monkeypatch
):
    """A second worker joins while the lone one holds its budget and asks for
    three slots before the first has dropped it (busy, it reads "budget-end"
    late): once it has, each parked message is read once, in order: two
    granted at once, the third queued (no room) and granted the first slot
    given back. (Session 45: with two or more parked, each one read went
    back behind the others still parked and the supervisor looped for good.)"""
    monkeypatch.setattr("fleet_ingress.net.slot_server.LONE_END_WAIT", 30.0)  # told, not timed
    h = asked_host(maxconn=1, queue_timeout=5.0, lone=True)
    w1 = await h.worker()
    await _lone_budget_taken(h, w1)
    assert w1._transport is not None
    w1._transport.pause_reading()  # busy: it reads "budget-end" later
    w2 = await h.worker()
    (channel,) = [c for c in h.server._channels.values() if c.pid == w2.pid]
    handle, reads = h.server._handle, Counter[str]()

    def bounded(channel, message):  # a loop over the parked ones fails here, not hangs
        reads["read"] += 1
        assert reads["read"] < 100, "the same parked messages read over and over"
        handle(channel, message)

    h.server._handle = bounded  # type: ignore[method-assign]
    asked = [asyncio.ensure_future(w2.lease()) for _ in range(3)]
    await eventually(lambda: len(channel.parked) == 3)
    assert not any(a.done() for a in asked)
    w1._transport.resume_reading()
    first, second = await asyncio.wait_for(asyncio.gather(*asked[:2]), 5)
    assert {first.fleet.name, second.fleet.name} == {"a", "b"}
    await eventually(lambda: h.slots.queue_length == 1)  # the third waits: no room
    assert not asked[2].done() and not channel.parked
    first.release()
    third = await asyncio.wait_for(asked[2], 5)
    assert third.fleet.name == first.fleet.name


async def test_a_lone_worker_that_does_not_drop_its_budget_holds_the_others_a_second_at_most(
    asked_host, monkeypatch
):
    """The lone worker does not answer "budget-end" (stopped): the second
    worker's messages are read LONE_END_WAIT after, by a timer put off after a
    stall of the supervisor's own loop; its slots stay reserved meanwhile, so
    the second's call waits for them and maxconn holds."""
    monkeypatch.setattr("fleet_ingress.net.slot_server.LONE_END_WAIT", 0.3)
    h = asked_host(maxconn=1, queue_timeout=5.0, lone=True)
    w1 = await h.worker()
    await _lone_budget_taken(h, w1)
    assert w1._transport is not None
    w1._transport.pause_reading()
    w2 = await h.worker()
    asked = asyncio.ensure_future(w2.lease())
    await eventually(lambda: h.slots.queue_length == 1, timeout=3)
    assert not asked.done()
    for f in h.slots.balancer.fleets:
        assert f.active + f.standing <= f.maxconn
    w1._transport.resume_reading()
    granted = await asyncio.wait_for(asked, 5)
    assert granted.queued_s > 0


def _live_on_table(fd: int) -> dict[int, str]:
    """What the supervisor's `WorkerPool._live_on_table` reads: the calls the
    table has live and granted, lease -> fleet name."""
    from fleet_ingress.core.call_table import LIVE
    from fleet_ingress.net.call_table_map import read_table_fd

    return {
        lease: call["fleet"]
        for lease, (state, call) in read_table_fd(fd).items()
        if state == LIVE and call.get("fleet") is not None
    }


def _lease_at_once(client: SlotClient, n: int):
    """`client.lease()` run to its end in this very step if it can be (a grant
    from its budget, nothing to wait for), as a worker running on another core
    would grant while the supervisor acts; None if it would wait."""
    coro = client.lease(call={"call_id": n, "bot_id": f"bot-{n}"})
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    return None


async def test_a_lone_worker_cut_from_its_channel_grants_nothing_uncounted_before_it_reads_the_end(
    asked_host,
):
    """The lone worker's channel ends while its process runs on (cut here;
    `keeps_slots` says it runs): the supervisor reads its call table as the
    channel ends, but the worker may grant from its budget until it reads the
    end (a worker SIGSTOPped then resumed gets its accepts and the end in one
    turn; here it grants as the supervisor reads the table, and once more with
    its reading stopped). Every call it has live is counted, or its slot
    reserved, before another worker's budget can take it: the rest of the
    budget stays reserved until `settle_lost` (the supervisor's
    LOST_CHANNEL_CONFIRM) reads the table again, and the worker grants nothing
    from its budget once the end waits unread. On main the rest was freed at
    once and the worker granted from it: the replacement's lone budget and the
    cut worker's calls passed maxconn (6 on 4 slots)."""
    h = asked_host(maxconn=2, lone=True)
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]
    fd = _with_table(w1, 8)
    raced: list[object] = []

    def live(k: int) -> dict[int, str] | None:
        if k != key:
            return None
        calls = _live_on_table(fd)
        if not raced:  # granted on its own core just after the supervisor read
            raced.append(_lease_at_once(w1, 2))
        return calls

    h.server.keeps_slots = lambda k, pid: k == key
    h.server.live_calls = live
    try:
        await _lone_budget_taken(h, w1)
        told = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})  # held
        assert told.held
        assert w1._transport is not None
        w1._transport.pause_reading()  # stopped: the end waits unread
        assert h.server.cut(key)
        await eventually(lambda: raced)
        assert raced[0] is not None  # the end not seen yet: granted from the budget
        await asyncio.sleep(0.05)
        with contextlib.suppress(NoFleetAvailable):
            await asyncio.wait_for(w1.lease(call={"call_id": 3, "bot_id": "bot-3"}), 3)
        w2 = await h.worker(generation=2)

        def over() -> int:
            """Calls live on w1 and slots w2 may grant, past the host's maxconn."""
            w2_row = next(r for r in h.slots.workers if r.pid == w2.pid)
            w2_may = 0 if w2_row.standing is None else w2_row.standing.left
            return len(_live_on_table(fd)) + w2_may + w2_row.calls - 4

        await asyncio.sleep(0.05)
        assert over() <= 0
        h.server.settle_lost(key)  # LOST_CHANNEL_CONFIRM later, the worker runs on
        await asyncio.sleep(0.05)
        assert over() <= 0
        for f in h.slots.balancer.fleets:
            assert f.active + f.standing <= f.maxconn
        row = h.slots.get(key)
        assert row is not None and row.channel_lost
        assert row.calls == len(_live_on_table(fd)) and row.standing is None
    finally:
        os.close(fd)


async def test_a_hung_lone_worker_gives_back_the_slots_it_has_not_used_after_lone_end_wait(
    asked_host, monkeypatch
):
    """A second worker joins (an upgrade's new generation) while the lone
    worker is hung (it reads nothing): LONE_END_WAIT after "budget-end", the
    slots it has not used (given, less what it told it granted and what its
    call table has live) are taken back, and the second worker's calls are
    granted; what it has live stays counted or reserved, so maxconn holds.
    Unstuck, it grants nothing from the budget it no longer has (it reads
    "budget-end" first) and drops it. On main every slot stayed reserved
    until it answered (or was killed as hung, a minute): the second worker's
    call waited (here: refused at its 2 s queue timeout)."""
    monkeypatch.setattr("fleet_ingress.net.slot_server.LONE_END_WAIT", 0.3)
    h = asked_host(maxconn=2, queue_timeout=2.0, lone=True)
    w1 = await h.worker()
    (key,) = [row.worker for row in h.slots.workers]
    fd = _with_table(w1, 8)
    h.server.live_calls = lambda k: _live_on_table(fd) if k == key else None
    try:
        await _lone_budget_taken(h, w1)
        told = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        assert await h.server.collect_reports(2.0) == 0  # its acquire read: told
        held = await w1.lease(call={"call_id": 2, "bot_id": "bot-2"})  # held, in the table
        assert w1._transport is not None
        w1._transport.pause_reading()  # hung: reads nothing
        w1._cancel_flush()  # and writes nothing
        w2 = await h.worker(generation=2)
        granted = [
            await asyncio.wait_for(w2.lease(), 3),
            await asyncio.wait_for(w2.lease(), 3),
        ]
        assert {g.fleet.name for g in granted} <= {"a", "b"}
        for f in h.slots.balancer.fleets:
            assert f.active + f.standing <= f.maxconn
        # w1's two calls (one told, one held) and w2's two: every slot; a third waits.
        third = asyncio.ensure_future(w2.lease())
        await asyncio.sleep(0.1)
        assert not third.done()
        # Unstuck: it reads "budget-end" before any grant from the budget, so
        # its next call is asked of the supervisor and waits behind w2's.
        w1._transport.resume_reading()
        late = asyncio.ensure_future(w1.lease(call={"call_id": 3, "bot_id": "bot-3"}))
        await eventually(lambda: h.slots.get(key).standing is None and h.slots.queue_length == 2)
        assert w1._budget is None and h.slots.grants_past_cut_total == 0
        for f in h.slots.balancer.fleets:
            assert f.active + f.standing <= f.maxconn
        held.release()
        assert (await asyncio.wait_for(third, 3)).queued_s > 0
        told.release()
        assert (await asyncio.wait_for(late, 3)).queued_s > 0
        for f in h.slots.balancer.fleets:
            assert f.active + f.standing <= f.maxconn
    finally:
        os.close(fd)


async def _restored_holding_calls_4_and_5(more_state: dict[str, object]) -> set[int]:
    """A re-executed coordinator adopts worker 77's channel with its calls
    carried (leases 4 and 5, both held on b); the worker's "state" says it
    holds both, with `more_state`: the leases whose calls stay known."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    server = _next_image(4)
    calls = {4: {"call_id": "c4", "bot_id": "bot-4"}, 5: {"call_id": "c5", "bot_id": "bot-5"}}
    try:
        key = await server.adopt(
            ours, restoring=True, worker=(77, 1), held_before=["b", "b"], calls=calls
        )
        state = {
            "op": "state",
            "pid": 77,
            "generation": 1,
            "held": [[4, "b"], [5, "b"]],
            "waiting": [],
            **more_state,
        }
        await asyncio.get_running_loop().sock_sendall(theirs, encode(state))
        await eventually(lambda: [r.calls for r in server.slots.workers] == [2])
        return set(server.calls_of(key))
    finally:
        theirs.close()
        await server.close()


async def test_a_restored_worker_whose_state_lists_its_calls_has_the_ones_it_logged_forgotten():
    """An exec carries a worker's calls (`calls_of`: leases 4 and 5, both
    held); the worker wrote lease 4's access line during the exec, and its
    "logged" went to the old image, unread, or waited behind "sync" (the new
    image reads only "state" and "acquire" before it). Its "state" says it
    holds both and lists only lease 5's call as still to log ("lists_calls"):
    lease 4's call is forgotten, so that a death of that worker without a call
    table writes no second line for it. Fails on main (review of session 47's
    reload47): a held call the state left out of its "calls" stayed known."""
    c5 = {"call_id": "c5", "bot_id": "bot-5"}
    assert await _restored_holding_calls_4_and_5({"lists_calls": True, "calls": [[5, c5]]}) == {5}


async def test_a_restored_worker_whose_state_does_not_list_its_calls_keeps_them_known():
    """The same state from a worker that does not list its calls (an older
    release: no "lists_calls"): nothing is forgotten that it may not have logged."""
    assert await _restored_holding_calls_4_and_5({}) == {4, 5}


def _probe_counts(h: Host, free: int) -> None:
    """Each fleet's probe, sent now, counts `free` workers; then what the
    poller does after a probe (`SlotServer.wake`)."""
    for fleet in h.slots.balancer.fleets:
        fleet.probe_counted(free, fleet.probe_sending(time.monotonic()))
    h.server.wake()


async def test_a_probe_asks_the_lone_worker_for_its_held_grants_and_answers(
    asked_host, monkeypatch
):
    """After a probe counts the fleets' capacity, the supervisor asks a
    worker that holds lines back to write them ("tell-held"): the lone
    worker's held grant and its fleet's answer are read within a round trip
    of the probe, not at its flush (30 s here: only the ask can bring them).
    Read, the fleet's estimate is its own count: the call granted and
    answered before the probe left is in the fleet's number, not opened
    since nor in flight. On main nothing asks: nothing is read (session 48)."""
    monkeypatch.setattr(slot_client, "ANSWERS_FLUSH", 30.0)
    monkeypatch.setattr(slot_client, "HELD_FLUSH_ASKED", 30.0, raising=False)
    h = asked_host(maxconn=4, lone=True)
    w1 = await h.worker()
    fd = _with_table(w1, 8)
    try:
        await _lone_budget_taken(h, w1)
        read = _ops_read(h)
        lease = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        lease.fleet_answered(time.monotonic())
        await asyncio.sleep(0.05)
        assert read == []  # held
        _probe_counts(h, 9)  # the fleet counts the call: 9 free
        fleet = lease.fleet.name
        await eventually(lambda: ("answered", None) in read)
        assert read == [("acquire", lease.id), ("answered", None)]
        (counted,) = (f for f in h.slots.balancer.fleets if f.name == fleet)
        assert counted.active == 1 and not counted.pending and not counted.unseen
        assert counted.estimated_free == 9
    finally:
        os.close(fd)


async def test_once_asked_a_worker_holds_its_lines_past_answers_flush_and_its_report_rides_them(
    asked_host, monkeypatch
):
    """Asked once ("tell-held"), a worker lets what it holds wait for its next
    write or HELD_FLUSH_ASKED (0.6 s here), not ANSWERS_FLUSH (0.2 s): the
    supervisor asks when it matters. And a report due (its timer armed: 30 s
    here) goes with that flush, one wake-up of the supervisor for both. On
    main the held grant is read at 0.2 s and the report 30 s later."""
    monkeypatch.setattr(slot_client, "HELD_FLUSH_ASKED", 0.6, raising=False)
    monkeypatch.setattr(slot_client, "REPORT_AFTER_COUNT", 30.0)
    h = asked_host(maxconn=4, lone=True)
    w1 = await h.worker()
    fd = _with_table(w1, 8)
    w1.reporter = lambda: {}
    try:
        await _lone_budget_taken(h, w1)
        _probe_counts(h, 9)  # asked: nothing held yet, nothing written
        await asyncio.sleep(0.05)
        read = _ops_read(h)
        w1.report_soon()  # a count moved: a report due within REPORT_AFTER_COUNT
        lease = await w1.lease(call={"call_id": 1, "bot_id": "bot-1"})
        await asyncio.sleep(ANSWERS_FLUSH * 2)
        assert read == []  # past ANSWERS_FLUSH, still held
        await eventually(lambda: ("report", None) in read)
        assert read == [("acquire", lease.id), ("report", None)]
    finally:
        os.close(fd)
