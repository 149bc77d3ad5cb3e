"""A stand-in supervisor for test_slot_reexec.py (run as a program, never imported).

    slot_supervisor_child.py PATH

Runs the slot coordinator (two fleets, maxconn 16, queue timeout 10 s) on the
Unix socket PATH. On SIGUSR2 it re-executes itself, keeping that socket and
every worker's channel (`service.listen_fds`), and what each held (as the
supervisor's state over the exec does); the new image rebuilds the table
from what the workers say they hold. Commands on stdin, one a line:
`stats` prints the table. Events on stdout, one JSON object a line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.service.listen_fds import adopt, reexec, worker_key

SCRIPT = os.path.abspath(__file__)
FLEETS = "https://a.test name=a\nhttps://b.test name=b\n"
HELD = "SLOT_CHILD_HELD"  # over the exec: channel key -> the fleet of each slot it held


def say(**event: object) -> None:
    sys.stdout.write(json.dumps({**event, "t": time.monotonic()}) + "\n")
    sys.stdout.flush()


def stats(slots: HostSlots) -> dict[str, object]:
    return {
        "active": {f.name: f.active for f in slots.balancer.fleets},
        "queue": slots.queue_length,
        "workers": sorted([r.pid, r.generation, r.calls] for r in slots.workers),
    }


async def main(path: str) -> None:
    loop = asyncio.get_running_loop()
    specs = parse_fleets_text(FLEETS, default_maxconn=16)
    slots = HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=10.0, max_queue=256)
    server = SlotServer(slots)
    kept = adopt()
    if kept:
        slots.paused = True
        listener = await server.serve_unix(sock=kept.pop("listen.slots"))
        held = json.loads(os.environ.pop(HELD, "{}"))
        for key, sock in kept.items():
            worker = worker_key(key)
            assert worker is not None
            await server.adopt(sock, restoring=True, worker=worker, held_before=held.get(key))
        silent = await server.finish_restore(2.0)
        say(ev="restored", pid=os.getpid(), silent=silent, **stats(slots))
    else:
        listener = await server.serve_unix(path)
        say(ev="ready", pid=os.getpid())

    upgrade = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR2, upgrade.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    upgrading = asyncio.create_task(upgrade.wait())
    while True:
        line = asyncio.create_task(reader.readline())
        await asyncio.wait([line, upgrading], return_when=asyncio.FIRST_COMPLETED)
        if upgrade.is_set():
            line.cancel()
            break
        if not line.result():
            return
        say(ev="stats", **stats(slots))
    # The upgrade: keep the coordinator's socket and every worker's channel.
    (listening,) = listener.sockets
    held = {
        f"worker.{row.pid}.{row.generation}": [f.name for f in row.held.values()]
        for row in slots.workers
    }
    socks = server.handover()
    socks["listen.slots"] = socket.socket(fileno=os.dup(listening.fileno()))
    say(ev="exec", pid=os.getpid(), **stats(slots))
    reexec([sys.executable, SCRIPT, path], socks, extra_env={HELD: json.dumps(held)})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
