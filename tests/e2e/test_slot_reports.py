"""The `report` exchange on the slot channel over real Unix socketpairs, one
process (net.slot_server with a HostView, net.slot_client with a reporter);
the multi-process case is test_host_stats.py."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import aiohttp
from aiohttp import web

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.host_slots import REPORT_OVERDUE, HostSlots
from fleet_ingress.core.host_view import Counts, HostView
from fleet_ingress.net import slot_client, slot_server
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.slot_client import RemoteLease, SlotClient
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.net.slot_wire import encode
from fleet_ingress.ops.host_stats import HostMetrics, WorkerReporter, host_snapshot
from fleet_ingress.ops.local_counts import REMOVED_FLEETS
from fleet_ingress.ops.snapshot import render
from fleet_ingress.ops.stats_server import stats_app
from tests.support import eventually, metric_samples

FLEETS = "https://a.test name=a\n"


def _slots() -> HostSlots:
    specs = parse_fleets_text(FLEETS, default_maxconn=4)
    return HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=5, max_queue=8)


def _reporter(n: list[int]):
    def report() -> dict:
        counts = Counts()
        counts.counters[("connections_total",)] = n[0]
        return {"started": 1.0, "counts": counts.to_wire(), "calls": 0}

    return report


async def _worker(server: SlotServer, pid: int, generation: int = 1) -> SlotClient:
    ours, theirs = socket.socketpair()
    await server.adopt(ours)
    return await SlotClient.connect(sock=theirs, pid=pid, generation=generation, answer_timeout=5)


# The first read's timeout in the test below: it waits all of it for the
# stopped worker, and it must end well before that one is REPORT_OVERDUE.
FIRST_READ = REPORT_OVERDUE / 2


async def test_a_read_waits_not_on_a_worker_yet_to_answer_and_names_it_overdue_by_then():
    """Session 40's host-view audit: every scrape and `stat` waited the whole
    timeout on a stopped worker. A read (`silent_too=False`) waits only on
    workers it asked now: one yet to answer a request asked before is not
    waited for, and is overdue once that request is REPORT_OVERDUE old; its
    answer clears it."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    n = [3]
    w1 = await _worker(server, 11)
    w1.reporter = _reporter(n)
    ours, theirs = socket.socketpair()  # joined, and answers no report (stopped)
    await server.adopt(ours)
    theirs.sendall(encode({"op": "hello", "pid": 13, "generation": 1}))
    try:
        await eventually(lambda: len(slots.workers) == 2)
        silent = next(r for r in slots.workers if r.pid == 13)
        loop = asyncio.get_running_loop()
        # The first read asks it, and waits for it as for any worker asked now
        # (the whole timeout: long enough for w1's answer on a loaded host, where
        # 0.3 s was not; the silent one is not overdue before REPORT_OVERDUE).
        asked_at = loop.time()
        assert await server.collect_reports(timeout=FIRST_READ, silent_too=False) == 1
        assert not silent.report_overdue
        asked = server._channels[silent.worker].asked
        for _ in range(3):
            started = loop.time()
            assert await server.collect_reports(timeout=5.0, silent_too=False) == 0
            assert loop.time() - started < 2.5  # not the 5 s
        assert view.totals().counter("connections_total") == 3  # the others' fresh counts
        assert server._channels[silent.worker].asked is asked  # asked once, not again
        # Overdue REPORT_OVERDUE after the first read (twice that if this loop ran
        # over net.late_timers.STALL late then: its timer is put off).
        await eventually(lambda: silent.report_overdue, timeout=2 * REPORT_OVERDUE + 1)
        assert REPORT_OVERDUE <= loop.time() - asked_at < 2 * REPORT_OVERDUE + 0.5
        assert silent.stuck
        # It answers: nothing outstanding, nothing overdue.
        theirs.sendall(encode({"op": "report", "failed": "busy"}))
        await eventually(lambda: not silent.report_overdue)
        assert not silent.stuck
    finally:
        w1.close()
        theirs.close()
        await server.close()


def _states(slots: HostSlots, view: HostView) -> dict[int, tuple[str, bool]]:
    """pid -> (state, report_overdue), as /stats.json and `stat` show them."""
    snap = host_snapshot(slots, view, started_at=0.0)
    return {w["pid"]: (w["state"], w["report_overdue"]) for w in snap["workers"]}


async def test_a_stall_of_the_supervisor_past_the_overdue_time_makes_no_worker_overdue():
    """Stats41's review: overdue was judged from the clock at each read, so a
    supervisor stopped or starved over REPORT_OVERDUE after it asked for
    reports showed every worker overdue (`workers_serving` 0) until it had
    read its channels, and a read (or the STATUS line) can come first: a
    timer runs before the reads after a stall (net.late_timers). Overdue now
    means that the worker did not answer while the supervisor could read: a
    worker whose answer waits unread is not, nor one stopped with the
    supervisor (a paused VM) that has yet to have its turn; one that does not
    answer once the supervisor runs again is, REPORT_OVERDUE later. This
    test's loop is the supervisor's; it stalls in time.sleep."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    peers = {}
    for pid in (21, 22):  # 21 answers during the stall; 22 stopped with the supervisor
        ours, peers[pid] = socket.socketpair()
        await server.adopt(ours)
        peers[pid].sendall(encode({"op": "hello", "pid": pid, "generation": 1}))
    try:
        await eventually(lambda: len(slots.workers) == 2)
        assert await server.collect_reports(timeout=0.05, silent_too=False) == 2
        time.sleep(0.1)  # noqa: ASYNC251 - the supervisor's loop stalls, as if stopped
        peers[21].sendall(encode({"op": "report", "failed": "busy"}))  # waits unread
        time.sleep(REPORT_OVERDUE + 0.3)  # noqa: ASYNC251 - still stalled
        stalled_until = time.monotonic()
        # The first look after the stall, before the loop has read its channels.
        assert _states(slots, view) == {21: (None, False), 22: (None, False)}
        await asyncio.sleep(0.3)  # the loop runs: 21's answer read, the late timers run
        assert _states(slots, view) == {21: (None, False), 22: (None, False)}
        # 22 does not answer once the supervisor runs again: overdue, counted from then.
        row = slots.find_row(2)
        assert row is not None and row.pid == 22
        await eventually(lambda: row.report_overdue, timeout=REPORT_OVERDUE + 1)
        assert time.monotonic() - stalled_until >= REPORT_OVERDUE
        assert _states(slots, view) == {21: (None, False), 22: ("unresponsive", True)}
        peers[22].sendall(encode({"op": "report", "failed": "busy"}))
        await eventually(lambda: not row.report_overdue)
    finally:
        for peer in peers.values():
            peer.close()
        await server.close()


async def test_collect_reports_waits_for_every_worker_and_a_silent_one_only_so_long():
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    n = [3]
    w1 = await _worker(server, 11)
    w1.reporter = _reporter(n)
    w2 = await _worker(server, 12)  # no reporter: answers with nothing counted
    # A worker that joined and never answers a report (stuck, or of an old version).
    ours, theirs = socket.socketpair()
    await server.adopt(ours)
    theirs.sendall(encode({"op": "hello", "pid": 13, "generation": 1}))
    try:
        await eventually(lambda: len(slots.workers) == 3)
        assert await server.collect_reports(timeout=1.0) == 1
        assert view.totals().counter("connections_total") == 3
        assert sorted(w.pid for w in view.workers(now=0)) == [11, 12]
        n[0] = 5
        assert await server.collect_reports(timeout=1.0) == 1
        assert view.totals().counter("connections_total") == 5
        lease = await w1.lease()  # the channel still serves slots
        lease.release()
    finally:
        w1.close()
        w2.close()
        theirs.close()
        await server.close()


async def test_a_report_not_understood_is_logged_and_the_worker_keeps_its_slots(caplog):
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    w1 = await _worker(server, 21)
    try:
        lease = await w1.lease()
        assert w1._transport is not None
        w1._transport.write(encode({"op": "report", "pid": 21, "counts": "no"}))
        await eventually(lambda: "worker report ignored" in caplog.text)
        assert [(r.pid, r.calls) for r in slots.workers] == [(21, 1)]
        assert not w1.lost.done()
        lease.release()
    finally:
        w1.close()
        await server.close()


async def test_a_report_naming_another_worker_is_ignored_and_that_worker_counts_on(caplog):
    """A report sent on worker 31's channel that names worker 32 (with another
    start) was taken for 32's: 32 was taken for a restarted process, retired,
    and its own reports refused from then on, its counts gone from the host's
    (the channel audit of session 24). Now it is refused, logged."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    n31, n32 = [2], [7]
    w31, w32 = await _worker(server, 31), await _worker(server, 32)
    w31.reporter, w32.reporter = _reporter(n31), _reporter(n32)
    try:
        await eventually(lambda: len(slots.workers) == 2)
        assert await server.collect_reports(timeout=1.0) == 0
        assert view.totals().counter("connections_total") == 9
        forged = Counts()
        forged.counters[("connections_total",)] = 1000
        assert w31._transport is not None
        w31._transport.write(
            encode(
                {
                    "op": "report",
                    "pid": 32,
                    "generation": 1,
                    "seq": 10**6,
                    "started": 2.0,
                    "counts": forged.to_wire(),
                }
            )
        )
        await eventually(lambda: "names another worker" in caplog.text)
        n32[0] = 8
        assert await server.collect_reports(timeout=1.0) == 0
        assert view.totals().counter("connections_total") == 10  # 32's own report taken
        assert sorted(w.pid for w in view.workers(now=0)) == [31, 32]
    finally:
        w31.close()
        w32.close()
        await server.close()


async def test_a_worker_whose_reports_are_refused_is_said_once_a_minute(caplog):
    """A worker whose reports the supervisor refuses sends one at every pull
    (5 s) and every scrape: an ERROR line each flooded the journal (the review
    of session 24). Said once a minute a channel."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    w1 = await _worker(server, 23)
    try:
        assert w1._transport is not None
        for _ in range(3):
            w1._transport.write(encode({"op": "report", "pid": 23, "counts": "no"}))
        lease = await w1.lease()  # read after the three: they were handled
        lease.release()
        refused = [r for r in caplog.records if "worker report ignored" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in refused]
    finally:
        w1.close()
        await server.close()


async def test_a_worker_whose_report_fails_says_so_and_is_not_taken_for_hung(caplog):
    """Building its report raises (a bug in a counter): the worker answers that
    it could not, its last report stands, and its silence count stays 0, so
    the supervisor does not kill a serving worker as hung (a review)."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    n = [3]
    w1 = await _worker(server, 31)
    w1.reporter = _reporter(n)
    try:
        await eventually(lambda: len(slots.workers) == 1)
        assert await server.collect_reports(timeout=1) == 0
        assert view.totals().counter("connections_total") == 3

        def broken() -> dict:
            raise RuntimeError("a counter's bug")

        w1.reporter = broken
        for _ in range(3):
            assert await server.collect_reports(timeout=1) == 0  # answered
            assert server.count_silent(now=0.0) == []
        assert slots.find_row(slots.workers[0].worker).silent_pulls == 0
        assert view.totals().counter("connections_total") == 3  # the last report stands
        assert "could not build its report" in caplog.text and "a counter's bug" in caplog.text
    finally:
        w1.close()
        await server.close()


async def test_a_report_sent_during_the_supervisors_exec_is_counted_by_the_new_image():
    view = HostView()
    server = SlotServer(_slots(), view=view)
    n = [4]
    w1 = await _worker(server, os.getpid() * 10)
    w1.reporter = _reporter(n)
    await eventually(lambda: len(server.slots.workers) == 1)
    assert await server.collect_reports(timeout=2) == 0
    kept = server.handover()
    carried = view.to_json(now=0.0)
    # During the exec the worker counts 2 more and reports unasked (as a
    # draining worker does before it exits): the line waits in the kernel and
    # comes before its "state", which the new image skips everything before.
    n[0] = 6
    w1.send_report()

    new_view = HostView.from_json(carried, now=0.0)
    slots = _slots()
    slots.paused = True
    new = SlotServer(slots, view=new_view)
    try:
        for sock in kept.values():
            await new.adopt(sock, restoring=True)
        assert await new.finish_restore(2.0) == []
        assert new_view.totals().counter("connections_total") == 6
        assert new_view.retire_absent({(r.pid, r.generation) for r in slots.workers}) == []
        w1.close()
        await eventually(lambda: not new_view.live)
        assert new_view.totals().counter("connections_total") == 6
        assert new_view.retired_workers == 1
    finally:
        w1.close()
        await new.close()


def _report_line(pid: int, seq: int, n: int, *, final: bool = False) -> bytes:
    counts = Counts()
    counts.counters[("connections_total",)] = n
    return encode(
        {
            "op": "report",
            "pid": pid,
            "generation": 1,
            "seq": seq,
            "started": 1.0,
            "counts": counts.to_wire(),
            "final": final,
        }
    )


async def _holding_a_slot(server: SlotServer, pid: int) -> tuple[int, socket.socket]:
    """A worker on a raw socketpair: joined, reported (3), holding one slot."""
    ours, theirs = socket.socketpair()
    key = await server.adopt(ours)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(
        theirs,
        encode({"op": "hello", "pid": pid, "generation": 1})
        + _report_line(pid, 1, 3)
        + encode({"op": "acquire", "id": 1, "avoid": []}),
    )
    async with asyncio.timeout(5):
        assert b'"granted"' in await loop.sock_recv(theirs, 65536)
    return key, theirs


async def test_a_final_report_waiting_when_a_write_to_its_channel_fails_is_counted():
    """A drained worker sends its last release and final report, closes its end
    and exits; the supervisor writes to that channel before its loop has read
    it (a scrape's `report`, sent to every worker every 0.2 s in the e2e check;
    a grant; a `reload`). The write fails (EPIPE) and the transport closed at
    once, unread: the worker's final counts never reached the host's totals
    (calls_ended_total ended 8 short after back-to-back upgrades, 1 run in 14)
    and its slot counted as reclaimed. What waits is read first now."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    pid = os.getpid() * 10 + 1
    key, theirs = await _holding_a_slot(server, pid)
    try:
        assert [(r.pid, r.calls) for r in slots.workers] == [(pid, 1)]
        theirs.sendall(encode({"op": "release", "id": 1}) + _report_line(pid, 2, 11, final=True))
        theirs.close()
        # No await since: this loop has not read the channel yet.
        assert server.send(key, {"op": "report"})
        await eventually(lambda: not view.live and not slots.workers)
        assert view.totals().counter("connections_total") == 11
        assert view.retired_workers == 1
        assert slots.reclaimed_total == 0  # its release was read: nothing reclaimed
    finally:
        theirs.close()
        await server.close()


async def test_a_worker_gone_between_the_new_images_read_and_its_sync_is_counted(monkeypatch):
    """After the supervisor's exec, a kept channel is read (`_take_waiting`)
    before "sync" is written to it. A worker that sends its final report and
    exits between that read and that write made the write fail, and its report
    was dropped unread (the window WORKERS.md left, planted here)."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    pid = os.getpid() * 10 + 2
    _, theirs = await _holding_a_slot(server, pid)
    await eventually(lambda: len(view.live) == 1)
    kept = server.handover()
    carried = view.to_json(now=0.0)
    theirs.setblocking(True)

    def exits_after_the_read(sock: socket.socket) -> tuple[bytes, bool]:
        waiting = take_waiting(sock)
        if theirs.fileno() >= 0:  # the first read (adopt's) only
            theirs.sendall(
                encode({"op": "release", "id": 1}) + _report_line(pid, 2, 11, final=True)
            )
            theirs.close()
        return waiting

    take_waiting = slot_server._take_waiting
    monkeypatch.setattr(slot_server, "_take_waiting", exits_after_the_read)
    new_view = HostView.from_json(carried, now=0.0)
    new_slots = _slots()
    new_slots.paused = True
    new = SlotServer(new_slots, view=new_view)
    try:
        [sock] = kept.values()
        await new.adopt(sock, restoring=True, worker=(pid, 1), held_before=["a"])
        await new.finish_restore(2.0)
        await eventually(lambda: not new_view.live)
        assert new_view.totals().counter("connections_total") == 11
        assert new_view.retired_workers == 1
        # Its final report came first: it had released its slot, none reclaimed.
        assert new_slots.reclaimed_total == 0
    finally:
        theirs.close()
        await new.close()


async def test_counts_are_sent_soon_unasked_one_report_for_many(monkeypatch):
    monkeypatch.setattr(slot_client, "REPORT_AFTER_COUNT", 0.2)
    view = HostView()
    server = SlotServer(_slots(), view=view)
    w1 = await _worker(server, 31)
    built = [0]
    n = [0]

    def reporter() -> dict:
        built[0] += 1
        return _reporter(n)()

    w1.reporter = reporter
    try:
        for _ in range(5):  # five counts in a row: one report carries them
            n[0] += 1
            w1.report_soon()
        await eventually(lambda: view.totals().counter("connections_total") == 5, timeout=2)
        await asyncio.sleep(0.4)
        assert built[0] == 1
        # Asked meanwhile, the answer carries what was due: no second report after it.
        n[0] += 1
        w1.report_soon()
        assert await server.collect_reports(timeout=1) == 0
        assert view.totals().counter("connections_total") == 6
        await asyncio.sleep(0.4)
        assert built[0] == 2
    finally:
        w1.close()
        await server.close()


async def test_no_report_is_queued_behind_one_the_supervisor_has_not_read(monkeypatch):
    """A supervisor that reads nothing (stopped): reports are cumulative, so
    none piles up in the worker's buffer behind what waits there."""
    monkeypatch.setattr(slot_client, "REPORT_AFTER_COUNT", 0.05)
    ours, theirs = socket.socketpair()  # `ours` is never read
    client = await SlotClient.connect(sock=theirs, pid=41, generation=1, answer_timeout=5)
    built = [0]

    def reporter() -> dict:
        built[0] += 1
        return {"started": 1.0, "counts": {}, "calls": 0}

    client.reporter = reporter
    try:
        client.send({"op": "filler", "pad": "x" * 4_000_000})  # past the socket's buffer
        assert client._transport is not None and client._transport.get_write_buffer_size() > 0
        for _ in range(6):
            client.report_soon()
            await asyncio.sleep(0.1)
        assert built[0] == 0
    finally:
        client.close()
        ours.close()


async def test_a_fleet_forgotten_leaves_the_workers_reports_and_a_later_grant_brings_it_back():
    """The supervisor forgets a fleet once it has left the set: each worker drops
    its record, and its report names it no more (one line, it grew with every
    fleet name ever granted); its ended calls still count. A grant of that name
    later carries the spec again (the worker has no record to take it from)."""
    server = SlotServer(_slots(), view=(view := HostView()))
    w = await _worker(server, 11)
    registry = Registry()
    w.reporter = WorkerReporter(registry, lambda: w.fleets.values(), {})
    try:
        lease = await w.lease()
        assert lease.fleet.name == "a"
        lease.fleet.calls_total += 1
        # A slot held on it (a fleet an add-fleet rolled back may have been
        # granted): the record stays until that slot is given back.
        server.forget_fleet("a")
        assert await server.collect_reports(timeout=2.0) == 0  # read after the forget
        assert "a" in w.fleets and view.totals().counter("fleet_calls", "a") == 1
        registry.ended[("a", "carrier_closed")] += 1
        lease.release()
        assert await server.collect_reports(timeout=2.0) == 0
        assert "a" not in w.fleets
        totals = view.totals()
        assert [key for key in totals.counters if "a" in key[1:2]] == []
        assert totals.counter("calls_ended", REMOVED_FLEETS, "carrier_closed") == 1
        again = await asyncio.wait_for(w.lease(), 2.0)
        assert again.fleet.name == "a" and again.fleet.spec.url == "https://a.test"
        again.release()
    finally:
        w.close()
        await server.close()


async def test_a_fleet_forgotten_keeps_its_lifetime_totals_in_the_removed_fleets_row():
    """A fleet removed leaves the fleets' rows; its calls, answers and retries
    are in the removed fleets' row (`removed_fleets`), so the rows add up to
    the frontend's totals. They stay there as the supervisor forgets it and
    each worker drops its record: before, only its ended calls were kept
    (under "(removed)"), its calls and 429s went from every row."""
    server = SlotServer(_slots(), view=(view := HostView()))
    w = await _worker(server, 11)
    registry = Registry()
    w.reporter = WorkerReporter(
        registry, lambda: w.fleets.values(), {}, forgotten=lambda: w.forgotten
    )

    def removed_row() -> dict:
        # Rendered with no fleet in the set: "a" has left it.
        return render([], view.totals(), queue_length=0, queue_timeouts=0, started_at=0.0)[
            "removed_fleets"
        ]

    try:
        lease = await w.lease()
        fleet = lease.fleet
        fleet.calls_total += 2
        fleet.responses.update({101: 2, 429: 3})
        fleet.retries += 1
        registry.ended[("a", "refused")] += 3
        lease.release()
        assert await server.collect_reports(timeout=2.0) == 0
        before = removed_row()
        assert before["calls_total"] == 2 and before["responses_429"] == 3, before
        assert before["retries"] == 1 and before["calls_ended"] == {"refused": 3}, before
        server.forget_fleet("a")
        assert await server.collect_reports(timeout=2.0) == 0
        assert "a" not in w.fleets
        assert [key for key in view.totals().counters if "a" in key[1:2]] == []
        assert removed_row() == before
    finally:
        w.close()
        await server.close()


async def test_an_asked_report_carries_each_held_calls_bytes_to_the_supervisors_record():
    """The supervisor keeps who each open call is for the line it writes if
    the worker dies with it; an asked report now adds the call's bytes (and
    what it cannot read as a lease and two counts is left out, the channel
    kept). Reports sent unasked (within a second of a count) carry none."""
    server = SlotServer(_slots(), view=HostView())
    w = await _worker(server, 11)
    w.reporter = _reporter([1])
    sizes = [[0, 0]]
    try:
        lease = await w.lease(call={"call_id": 1, "bot_id": "b"})
        w.calls_bytes = lambda: [
            [lease.id, *sizes[0]],
            [lease.id + 1, 9, 9],  # no such lease
            ["x", 1, 2],
            [lease.id, -1],
            7,
        ]
        sizes[0] = [1200, 800]
        assert await server.collect_reports(timeout=2.0) == 0
        ((key, call),) = [(k, c) for k in server._calls for c in server.calls_of(k).values()]
        assert (call["bytes_from_carrier"], call["bytes_to_carrier"]) == (1200, 800)
        sizes[0] = [1500, -3]  # not a count: the last good one stands
        assert await server.collect_reports(timeout=2.0) == 0
        assert server.calls_of(key)[lease.id]["bytes_from_carrier"] == 1200
        assert len(server.slots.workers) == 1  # the channel kept
        lease.release()
    finally:
        w.close()
        await server.close()


async def test_a_fleet_forgotten_while_granted_to_a_call_that_gave_up_leaves_the_reports():
    """The grant came, and the fleet's forget with it, but the call gave up before
    it took the slot (its task cancelled: its client went): the slot given back
    was the fleet's last, so its record goes as at a release (it lingered in
    every report of this worker's, a removed fleet's name with it)."""
    task: asyncio.Task[RemoteLease] | None = None

    class Client(SlotClient):
        def data_received(self, data: bytes) -> None:
            if b'"granted"' not in data:
                super().data_received(data)
                return
            # The forget read in the same chunk as the grant, then the call
            # gives up before it ran on with its slot.
            super().data_received(data + encode({"op": "forget-fleet", "fleet": "a"}))
            assert task is not None
            task.cancel()

    server = SlotServer(_slots(), view=(view := HostView()))
    ours, theirs = socket.socketpair()
    await server.adopt(ours)
    # Asked (no standing budget, whatever INGRESS_STANDING_BUDGETS says): the
    # race is the supervisor's "granted" read with the forget.
    w = await Client.connect(
        sock=theirs, pid=11, generation=1, answer_timeout=5, standing=False, lone=False
    )
    w.reporter = WorkerReporter(Registry(), lambda: w.fleets.values(), {})
    try:
        task = asyncio.create_task(w.lease())
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the lease was taken: the test did not give it up")
        assert "a" not in w.fleets
        assert await server.collect_reports(timeout=2.0) == 0
        assert [key for key in view.totals().counters if "a" in key[1:2]] == []
    finally:
        w.close()
        await server.close()


async def test_a_worker_that_does_not_say_it_forgets_is_not_sent_forget_fleet():
    """An older worker does not know the op (some releases cut the channel at an
    op they do not know): only a worker whose hello says "forgets" is told."""
    server = SlotServer(_slots(), view=HostView())
    new = await _worker(server, 11)
    ours, theirs = socket.socketpair()
    await server.adopt(ours)
    theirs.sendall(encode({"op": "hello", "pid": 12, "generation": 1, "answers": True}))
    theirs.setblocking(False)
    try:
        await eventually(lambda: len(server.slots.workers) == 2)
        server.forget_fleet("a")
        assert await server.collect_reports(timeout=1.0) == 1  # the old one does not report
        await asyncio.sleep(0.1)
        heard = theirs.recv(65536)
        assert b'"report"' in heard and b"forget-fleet" not in heard
    finally:
        new.close()
        theirs.close()
        await server.close()


async def test_a_report_of_hundreds_of_long_named_fleets_is_taken_and_the_channel_kept():
    """A worker that has carried calls on 800 fleets named at the names' limit
    (259 characters) reports about 1.2 MB: one line past the 1 MiB a worker's
    channel took, so the supervisor cut it as broken and the worker stopped
    taking calls, its calls cut at timeouts.drain (the scale audit of session
    32: 800 fleets, one worker, a report asked by a scrape)."""
    view = HostView()
    slots = _slots()
    server = SlotServer(slots, view=view)
    names = [(f"fleet{i}-" + "x" * 259)[:259] for i in range(800)]

    def report() -> dict:
        counts = Counts()
        for name in names:
            counts.counters[("fleet_calls", name)] = 1
            counts.counters[("fleet_responses", name, "101")] = 1
            counts.counters[("fleet_retries", name)] = 0
            counts.counters[("fleet_redispatches", name)] = 0
            counts.counters[("calls_ended", name, "carrier closed")] = 1
        counts.counters[("connections_total",)] = 800
        return {"started": 1.0, "counts": counts.to_wire(), "calls": 0}

    assert len(encode({"op": "report", **report()})) > 1024 * 1024
    w1 = await _worker(server, 41)
    w1.reporter = report
    try:
        await eventually(lambda: len(slots.workers) == 1)
        assert await server.collect_reports(timeout=5.0) == 0
        assert view.totals().counter("connections_total") == 800
        assert view.totals().counter("fleet_calls", names[-1]) == 1
        assert not w1.lost.done()
        lease = await w1.lease()  # the channel still serves slots
        lease.release()
    finally:
        w1.close()
        await server.close()


async def test_a_lease_is_answered_while_the_metrics_of_500_fleets_render():
    """/metrics of 500 fleets is 1 MB, 16,000 lines: rendered in one piece it
    held the supervisor's loop 100-300 ms, and every new call waited that long
    for its slot (the scale audit of session 32). A worker asks for a slot as
    the render reads the reloads (mid-way); the render is over once it reads
    whether an upgrade failed (its last collector): the slot comes in between."""
    fleets = "".join(f"https://f{i}.test name=f{i}\n" for i in range(500))
    specs = parse_fleets_text(fleets, default_maxconn=4)
    slots = HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=5, max_queue=8)
    view = HostView()
    server = SlotServer(slots, view=view)
    worker = await _worker(server, 41)
    said: list[str] = []
    leasing: list[asyncio.Future[RemoteLease]] = []
    scraping = False  # the registry reads its collectors as they register, too

    def reloads() -> dict[str, int]:
        if not scraping:
            return {}
        said.append("render reads the reloads")
        lease = asyncio.ensure_future(worker.lease())
        lease.add_done_callback(lambda _: said.append("slot granted"))
        leasing.append(lease)
        return {}

    def upgrade_failed() -> None:
        if scraping:
            said.append("render reads the last collector")

    metrics = HostMetrics(slots, view, reloads=reloads, upgrade_failed=upgrade_failed)
    for fleet in slots.balancer.fleets:  # the probes' histogram: 6,000 lines
        metrics.checks.check_observed(fleet.name, 0.01)
    runner = web.AppRunner(
        stats_app(lambda: host_snapshot(slots, view, started_at=0.0), metrics.prometheus),
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        await eventually(lambda: len(slots.workers) == 1)
        scraping = True
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/metrics") as answer:
                text = await answer.text()
        lease = await leasing[0]
        assert said == [
            "render reads the reloads",
            "slot granted",
            "render reads the last collector",
        ]
        assert lease.held
        samples = metric_samples(text)
        assert len(samples["fleet_ingress_fleet_up"]) == 500
        assert (
            samples["fleet_ingress_fleet_check_duration_seconds_count"][(("fleet", "f499"),)] == 1
        )
        lease.release()
    finally:
        worker.close()
        await runner.cleanup()
        await server.close()
