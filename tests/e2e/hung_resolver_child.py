"""Run inside a network namespace whose resolv.conf names 127.0.0.1, where this
process binds the resolver's port and never answers: name lookups hang. With
two of them under way (libuv lets lookups take half of its four threads), how
long does a connect to a numeric address take on each loop? Prints JSON.
Arguments: WHAT LOOP, LOOP uvloop or ingress (the ingress's loop).

`connect LOOP`: the connect above. `names LOOP`:
with 12 lookups of one hung name under way (12 calls to a fleet whose name does
not resolve), how long does a lookup of a name the namespace's hosts file
answers (fleet-b.test) take?"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time

import uvloop

from fleet_ingress.net.event_loop import IngressLoop, new_event_loop


async def connect_time() -> float:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    hung = [
        loop.create_task(loop.getaddrinfo(f"fleet-{i}.hang.test", 443, type=socket.SOCK_STREAM))
        for i in range(2)
    ]
    await asyncio.sleep(0.3)  # both lookups under way in the pool
    sock = socket.socket()
    sock.setblocking(False)
    started = time.monotonic()
    try:
        async with asyncio.timeout(3):  # past the control's bound (2 s)
            await loop.sock_connect(sock, ("127.0.0.1", port))
        return time.monotonic() - started
    except TimeoutError:
        return float("inf")
    finally:
        sock.close()
        listener.close()
        for task in hung:
            task.cancel()


async def other_name_time() -> float:
    loop = asyncio.get_running_loop()
    hung = [
        loop.create_task(loop.getaddrinfo("fleet-a.hang.test", 443, type=socket.SOCK_STREAM))
        for _ in range(12)
    ]
    await asyncio.sleep(0.3)  # the lookups under way in the pool
    started = time.monotonic()
    try:
        async with asyncio.timeout(3):  # past the control's bound (2 s)
            await loop.getaddrinfo("fleet-b.test", 443, type=socket.SOCK_STREAM)
        return time.monotonic() - started
    except TimeoutError:
        return float("inf")
    finally:
        for task in hung:
            task.cancel()


def run(what: str, kind: str) -> None:
    """One loop a process: libuv's pool is made once, and the process exits
    without closing it, which would wait for the hung lookups (5 s each, two
    at a time)."""
    # names: the ingress's loop as it runs (libuv's pool of 16); connect: with
    # libuv's pool of 4, as uvloop's, so that only the connect's path differs.
    ingress = {"connect": IngressLoop, "names": new_event_loop}[what]
    make = {"uvloop": uvloop.Loop, "ingress": ingress}[kind]
    measure = {"connect": connect_time, "names": other_name_time}[what]
    took = asyncio.Runner(loop_factory=make).run(measure())
    print(json.dumps({kind: took}).replace("Infinity", "1e9"))
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    resolver.bind(("127.0.0.1", 53))  # takes queries, answers none
    what, kind = sys.argv[1:3]
    run(what, kind)


if __name__ == "__main__":
    main()
