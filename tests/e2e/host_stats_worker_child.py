"""A stand-in worker for test_host_stats.py (run as a program, never imported):
counts as a worker does (a real `Registry`, the fleet records its slot client
keeps, `IngressMetrics` histograms) and reports through a real `SlotClient`.

argv: the fd of its end of a socketpair to the coordinator, its generation.
Commands on stdin, one JSON object a line:
    {"cmd": "count", "n": 5}     5 calls: a connection, a request, a slot on a
                                 fleet, 101, bytes, a handshake time, an end
    {"cmd": "exit"}              drain: a final report, close the channel, exit 0
Events on stdout: {"ev": "ready"}, {"ev": "counted", "total": N}.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import uvloop

from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.dispatch import Dispatcher
from fleet_ingress.net.slot_client import SlotClient
from fleet_ingress.ops.host_stats import WorkerReporter
from fleet_ingress.ops.metrics import IngressMetrics


def say(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main(fd: int, generation: int) -> None:
    client = await SlotClient.connect(
        sock=socket.socket(fileno=fd), pid=os.getpid(), generation=generation, answer_timeout=10
    )
    registry = Registry()
    nothing = Balancer(FleetSet.from_specs([]))
    metrics = IngressMetrics(nothing, registry, Dispatcher(nothing, queue_timeout=1, max_queue=1))
    draining = False
    client.reporter = WorkerReporter(
        registry, lambda: client.fleets.values(), metrics.histograms, draining=lambda: draining
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    say(ev="ready")
    total = 0
    while line := await reader.readline():
        command = json.loads(line)
        if command["cmd"] == "count":
            for _ in range(command["n"]):
                registry.connections_total += 1
                registry.count_request("/ws/", 101)
                lease = await client.lease()
                lease.fleet.calls_total += 1
                lease.fleet.responses[101] += 1
                lease.release()
                registry.ended_bytes_from_carrier += 100
                registry.ended[(lease.fleet.name, "carrier_closed")] += 1
                metrics.handshake_seconds.observe(0.02)
                total += 1
            say(ev="counted", total=total)
        elif command["cmd"] == "exit":
            draining = True
            client.send_report(final=True)
            client.close()
            await client.lost  # the report is written once the channel has closed
            return


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
