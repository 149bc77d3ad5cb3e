"""A grant budget's line over a real socketpair whose send buffer is small:
it goes whole or not at all, never in part (a line cut short breaks the
worker's channel: it reads the next image's "sync" as the rest of it)."""

from __future__ import annotations

import json
import socket

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.net.slot_server import BUDGET_FLEETS_MAX, SlotServer
from fleet_ingress.net.slot_wire import encode
from tests.support import eventually


def _server(fleets: int) -> SlotServer:
    text = "".join(
        f"https://fleet-{i:03d}.media-stream.voice.example.test:8443 name=fleet-{i:03d}\n"
        for i in range(fleets)
    )
    fleet_set = FleetSet.from_specs(parse_fleets_text(text, default_maxconn=1000))
    for fleet in fleet_set.fleets:
        fleet.health = Health.UP
    return SlotServer(HostSlots(Balancer(fleet_set), queue_timeout=5.0, max_queue=8))


def _read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


async def test_a_budget_for_many_fleets_goes_whole_through_a_small_send_buffer() -> None:
    server = _server(fleets=BUDGET_FLEETS_MAX + 20)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    kept: dict[str, socket.socket] = {}
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # the kernel doubles it
        key = await server.adopt(ours)
        theirs.send(encode({"op": "hello", "pid": 1001, "generation": 1, "budgets": True}))
        await eventually(lambda: len(server.slots.workers) == 1)
        _read_all(theirs)  # what was said before the hand-over
        budgets = server.plan_budgets({key})
        # The case: 100 fleets' line (some 300 bytes each here) is more than the
        # kernel takes in one piece (half the send buffer, 8 KiB).
        assert len(budgets[key]) > BUDGET_FLEETS_MAX
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 < 100 * 300

        kept = server.handover(budgets)  # nobody reads the worker's end meanwhile
        data = _read_all(theirs)
        # Whole lines only, and what the server counts as sent is what the worker read.
        assert data.endswith(b"\n"), f"a line cut short at {len(data)} bytes"
        lines = [json.loads(line) for line in data.splitlines()]
        assert [line["op"] for line in lines] == ["budget"]
        told = [f["fleet"] for f in lines[0]["fleets"] for _ in range(f["slots"])]
        assert told  # a smaller budget, not none
        assert sorted(server._budgets_sent[key]) == sorted(told)
    finally:
        for sock in kept.values():
            sock.close()
        theirs.close()
        await server.close()
