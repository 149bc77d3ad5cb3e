"""Run inside a network namespace whose resolv.conf names 127.0.0.1, where this
process binds the resolver's port and never answers: name lookups hang. With
two of them under way (libuv lets lookups take half of its four threads), how
long does a connect to a numeric address take on each loop? Prints JSON.
Arguments: WHAT LOOP, LOOP uvloop or ingress (the ingress's loop).

`connect LOOP`: the connect above. `stale-hang LOOP`, `stale-servfail LOOP`:
after a name is answered once, the resolver stops answering or answers
SERVFAIL: does the next lookup give the name's last answer, and how soon?
`names LOOP`:
with 12 lookups of one hung name under way (12 calls to a fleet whose name does
not resolve), how long does a lookup of a name the namespace's hosts file
answers (fleet-b.test) take?"""

from __future__ import annotations

import asyncio
import functools
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


def _dns_reply(query: bytes, rcode: int, address: str | None) -> bytes:
    """A reply to `query` (one question, no EDNS): `address` for an A question,
    no record for any other (AAAA), or just `rcode` (2: SERVFAIL)."""
    end = query.index(b"\0", 12) + 5  # the question: its name, type and class
    qtype = int.from_bytes(query[end - 4 : end - 2], "big")
    answer = b""
    if rcode == 0 and address is not None and qtype == 1:
        ttl, rdlength = (0).to_bytes(4, "big"), (4).to_bytes(2, "big")
        answer = b"\xc0\x0c\x00\x01\x00\x01" + ttl + rdlength + socket.inet_aton(address)
    flags = (0x8180 | rcode).to_bytes(2, "big")  # a response, recursion desired and available
    counts = b"\x00\x01" + (b"\x00\x01" if answer else b"\x00\x00") + b"\x00\x00\x00\x00"
    return query[:2] + flags + counts + query[12:end] + answer


async def stale_time(resolver: socket.socket, fails: str) -> float:
    """The resolver answers fleet-c.test (TTL 0) once, then fails: `hang` (no
    answer) or `servfail`. How long does the next lookup take, and does it give
    the first answer?"""
    loop = asyncio.get_running_loop()
    answering = True

    def on_query() -> None:
        query, peer = resolver.recvfrom(512)
        if answering:
            resolver.sendto(_dns_reply(query, 0, "127.0.0.1"), peer)
        elif fails == "servfail":
            resolver.sendto(_dns_reply(query, 2, None), peer)

    loop.add_reader(resolver.fileno(), on_query)
    first = await loop.getaddrinfo("fleet-c.test", 443, type=socket.SOCK_STREAM)
    assert [info[4][0] for info in first] == ["127.0.0.1"], first
    answering = False
    started = time.monotonic()
    try:
        async with asyncio.timeout(3):  # past the control's bound (2 s)
            again = await loop.getaddrinfo("fleet-c.test", 443, type=socket.SOCK_STREAM)
    except (TimeoutError, socket.gaierror):
        return float("inf")
    assert again == first, (again, first)
    return time.monotonic() - started


def run(what: str, kind: str) -> None:
    """One loop a process: libuv's pool is made once, and the process exits
    without closing it, which would wait for the hung lookups (5 s each, two
    at a time)."""
    # names: the ingress's loop as it runs (libuv's pool of 16); connect: with
    # libuv's pool of 4, as uvloop's, so that only the connect's path differs.
    ingress = IngressLoop if what == "connect" else new_event_loop
    make = {"uvloop": uvloop.Loop, "ingress": ingress}[kind]
    if what.startswith("stale-"):
        measure = functools.partial(stale_time, RESOLVER, what.removeprefix("stale-"))
    else:
        measure = {"connect": connect_time, "names": other_name_time}[what]
    took = asyncio.Runner(loop_factory=make).run(measure())
    print(json.dumps({kind: took}).replace("Infinity", "1e9"))
    sys.stdout.flush()
    os._exit(0)


# The namespace's resolver (resolv.conf names 127.0.0.1): it takes queries and
# answers none, but for `stale-*`.
RESOLVER = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def main() -> None:
    RESOLVER.bind(("127.0.0.1", 53))
    RESOLVER.setblocking(False)
    what, kind = sys.argv[1:3]
    run(what, kind)


if __name__ == "__main__":
    main()
