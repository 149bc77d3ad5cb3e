"""A lone worker's budget (session 46) as the host around it changes: a
reload lowering a fleet's maxconn, an exec's hand-over with other workers'
messages parked, the last other channel ending. Real slot channels (Unix
socketpairs, one process); the reload through the supervisor's own
`reload_host`."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from fleet_ingress.config.fleets_file import load_fleets_file, parse_fleets_text
from fleet_ingress.config.settings import load_config
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.net.slot_client import SlotClient
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.net.slot_wire import encode
from fleet_ingress.service.host_reload import reload_host
from fleet_ingress.service.supervisor import Supervisor
from tests.support import TLSFiles, eventually, write_run_home

FLEET = "https://127.0.0.1:9 name=a"


async def _lone_worker(supervisor: Supervisor) -> tuple[int, SlotClient]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    key = await supervisor.server.adopt(ours)
    client = await SlotClient.connect(
        sock=theirs, pid=os.getpid(), generation=1, answer_timeout=10, standing=False, lone=True
    )
    row = await _row(supervisor, key)
    await eventually(lambda: row.standing_lone and row.standing_taken and client._lone)
    return key, client


async def _row(supervisor: Supervisor, key: int):
    await eventually(lambda: supervisor.slots.get(key) is not None)
    row = supervisor.slots.get(key)
    assert row is not None
    return row


async def test_a_reload_lowering_maxconn_ends_the_lone_budget_before_the_poller_is_reconfigured(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """maxconn 4 lowered to 2 by a reload while the lone worker holds a budget
    of every free slot (1 call up, 3 reserved). The poller's reconfigure (TLS
    contexts built anew, probes waited for) is held: meanwhile the worker's
    calls are granted under the new maxconn, one more then a wait, never past
    it. On main the budget was taken back only after the reconfigure
    (`wake` after it): the worker granted 3 more from the old one, 4 calls
    at maxconn 2."""
    await write_run_home(tls_files, tmp_path, [f"{FLEET} maxconn=4"], workers=1, queue=5)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
    (fleet,) = supervisor.balancer.fleets
    fleet.health = Health.UP
    held = asyncio.Event()
    entered = asyncio.Event()

    async def reconfigure(*_: object) -> None:  # a slow one: TLS contexts, probes
        entered.set()
        await held.wait()

    supervisor.poller.reconfigure = reconfigure  # type: ignore[method-assign]
    _, client = await _lone_worker(supervisor)
    leases = []
    asked: list[asyncio.Task] = []
    reloading: asyncio.Task | None = None
    try:
        assert fleet.maxconn == 4 and fleet.standing == 4
        leases.append(await asyncio.wait_for(client.lease(), 2))  # from the budget
        (tmp_path / "fleets.txt").write_text(f"{FLEET} maxconn=2\n")
        reloading = asyncio.create_task(reload_host(supervisor))
        await asyncio.wait_for(entered.wait(), 10)
        assert fleet.maxconn == 2  # applied; the reconfigure not done
        # Two rounds of reports: the worker has read what was sent before
        # each ("budget-end", then the budget given anew) and answered it.
        for _ in range(2):
            assert await supervisor.server.collect_reports(2.0) == 0
        for _ in range(3):
            asked.append(asyncio.ensure_future(client.lease()))
            await eventually(lambda: asked[-1].done() or supervisor.slots.queue_length > 0)
            if not asked[-1].done():
                break
            leases.append(asked[-1].result())
        assert len(leases) == 2  # the one up, one more: maxconn 2
        assert supervisor.slots.queue_length == 1
        assert fleet.active + fleet.standing <= 2
        held.set()
        await asyncio.wait_for(reloading, 10)
        leases.pop().release()
        leases.append(await asyncio.wait_for(asked[-1], 5))  # the one waiting
        assert fleet.active <= 2
    finally:
        held.set()
        for task in asked:
            task.cancel()
        if reloading is not None:
            await asyncio.gather(reloading, return_exceptions=True)
        client.close()
        await supervisor.server.close()


def _slot_server(maxconn: int) -> SlotServer:
    specs = parse_fleets_text("https://a.test name=a\n", default_maxconn=maxconn)
    fleets = FleetSet.from_specs(specs)
    for fleet in fleets.fleets:
        fleet.health = Health.UP
    return SlotServer(HostSlots(Balancer(fleets), queue_timeout=5.0, max_queue=8))


async def _lone_client(server: SlotServer, pid: int) -> tuple[int, SlotClient]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    key = await server.adopt(ours)
    client = await SlotClient.connect(
        sock=theirs, pid=pid, generation=1, answer_timeout=10, standing=False, lone=True
    )
    await eventually(lambda: server.slots.get(key) is not None)
    row = server.slots.get(key)
    assert row is not None
    await eventually(lambda: row.standing_lone and row.standing_taken and client._lone)
    return key, client


async def test_a_hand_over_reads_the_parked_messages_no_state_says_in_order(monkeypatch) -> None:
    """A second worker joins while the lone one holds its budget (busy: it
    reads "budget-end" late) and sends, parked, an answer to an ask, the
    "logged" of a call the supervisor knows, another answer and an
    "acquire". An exec's hand-over comes first: the answers and the "logged"
    are read, in that order (the "acquire" is said in its "state"). On main
    `handover` dropped them all: the ask went unanswered and the call stayed
    known, a second access line should that worker die without a table."""
    monkeypatch.setattr("fleet_ingress.net.slot_server.LONE_END_WAIT", 30.0)  # told, not timed
    server = _slot_server(maxconn=2)
    answers: list[tuple[int, bool]] = []
    kept: dict[str, socket.socket] = {}
    _, w1 = await _lone_client(server, 1001)
    assert w1._transport is not None
    w1._transport.pause_reading()  # busy: "budget-end" waits unread
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        call = {"call_id": "c7", "bot_id": "bot-7"}
        key = await server.adopt(ours, calls={7: call})  # known, as an exec carries it
        server.handlers["reloaded"] = lambda k, m: answers.append(
            (m["id"], 7 in server.calls_of(k))
        )
        hello = {"op": "hello", "pid": 1002, "generation": 2, "answers": True, "lone": True}
        theirs.sendall(encode(hello))
        await eventually(lambda: server.slots.get(key) is not None)
        parked = [
            {"op": "reloaded", "id": 1, "ok": True},
            {"op": "logged", "id": 7},
            {"op": "reloaded", "id": 2, "ok": True},
            {"op": "acquire", "id": 8, "avoid": []},
        ]
        theirs.sendall(b"".join(encode(m) for m in parked))
        channel = server._channels[key]
        await eventually(lambda: len(channel.parked) == 4)
        assert answers == []  # parked: the lone budget is being taken back
        kept = server.handover({})
        assert answers == [(1, True), (2, False)]  # in order, the "logged" between
        assert server.calls_of(key) == {}
        assert not channel.parked
    finally:
        for sock in kept.values():
            sock.close()
        theirs.close()
        w1.close()
        await server.close()


async def test_the_worker_left_alone_after_an_upgrade_is_given_the_lone_budget() -> None:
    """An upgrade's shape: the old generation's worker holds a call while the
    new generation's joins (two channels: no lone budget for either); the old
    one's call ends, it drains and its channel ends: the one left is offered
    the lone budget at once (its hello said "lone") and grants its next call
    from it, no round trip. (Checked on main too, and with a real upgrade of
    a one-worker service: it was given there already; this pins it.)"""
    server = _slot_server(maxconn=2)
    (fleet,) = server.slots.balancer.fleets
    old_key, old = await _lone_client(server, 2001)
    new: SlotClient | None = None
    try:
        up = await asyncio.wait_for(old.lease(), 2)  # from its lone budget
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        new_key = await server.adopt(ours)
        new = await SlotClient.connect(
            sock=theirs, pid=2002, generation=2, answer_timeout=10, standing=False, lone=True
        )
        await eventually(lambda: server.slots.get(new_key) is not None)
        old_row, new_row = server.slots.get(old_key), server.slots.get(new_key)
        assert old_row is not None and new_row is not None
        await eventually(lambda: old_row.standing is None and fleet.active == 1)
        assert await server.collect_reports(2.0) == 0
        assert new_row.standing is None and new._budget is None  # two channels: none
        old.decline_standing()  # retiring: it takes no new calls
        up.release()
        old.close()  # drained, exited: its channel ends
        await eventually(lambda: server.slots.get(old_key) is None)
        await eventually(lambda: new_row.standing_lone and new_row.standing_taken and new._lone)
        assert fleet.standing == 2 and fleet.active == 0
        call = await asyncio.wait_for(new.lease(), 2)
        assert call.queued_s == 0.0 and new._budget is not None
        assert new._budget.slots() == {"a": 1}  # granted from it
        assert await server.collect_reports(2.0) == 0  # its grant read
        assert (fleet.active, fleet.standing) == (1, 1)
        call.release()
    finally:
        if new is not None:
            new.close()
        old.close()
        await server.close()
