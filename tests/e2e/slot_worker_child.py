"""A stand-in worker process for test_slot_workers.py (run as a program, never imported).

It inherits its end of a socketpair to the slot coordinator (fd in argv), or
connects to the coordinator's Unix socket (its path in argv), and
takes commands on stdin, one JSON object a line:
    {"cmd": "lease", "n": 20}          start 20 calls, each asking for a slot
    {"cmd": "release", "n": 3}         give back the slots of the first 3 calls holding one
and reports on stdout, one JSON object a line:
    {"ev": "ready", "pid": ...}
    {"ev": "granted", "tag": 4, "fleet": "a", "t": MONOTONIC}
    {"ev": "refused", "tag": 4, "reason": "...", "t": MONOTONIC}
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time

import uvloop

from fleet_ingress.net.dispatch import NoFleetAvailable
from fleet_ingress.net.slot_client import RemoteLease, SlotClient


def say(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main(where: str, generation: int) -> None:
    if where.isdigit():
        connect: dict = {"sock": socket.socket(fileno=int(where))}
    else:
        connect = {"path": where}
    client = await SlotClient.connect(
        **connect, pid=os.getpid(), generation=generation, answer_timeout=30
    )
    held: list[RemoteLease] = []
    tags = iter(range(1_000_000))

    async def call(tag: int) -> None:
        try:
            lease = await client.lease()
        except NoFleetAvailable as exc:
            say(ev="refused", tag=tag, reason=exc.reason, t=time.monotonic())
            return
        held.append(lease)
        say(ev="granted", tag=tag, fleet=lease.fleet.name, t=time.monotonic())

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    say(ev="ready", pid=os.getpid())
    tasks = set()
    while line := await reader.readline():
        command = json.loads(line)
        if command["cmd"] == "lease":
            for _ in range(command["n"]):
                task = asyncio.create_task(call(next(tags)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        elif command["cmd"] == "release":
            for lease in held[: command["n"]]:
                lease.release()
            del held[: command["n"]]
            say(ev="released", n=command["n"])
    client.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
