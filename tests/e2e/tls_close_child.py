"""A stand-in for a worker's TLS side closing with bytes buffered, for
test_clocks.py (run as a program, never imported): it accepts one TLS
connection (net/tls_socket), writes `size` bytes to it and closes it (the
flush, close_notify, abort after tls_socket.CLOSE_TIMEOUT, here `close_timeout`).

    tls_close_child.py CERT KEY CLOSE_TIMEOUT SIZE

Reports on stdout, one JSON object a line:
    {"ev": "listening", "port": ...}
    {"ev": "closing", "buffered": N}    close() called, N bytes still ours to send
    {"ev": "lost", "exc": null|"..."}   the connection is gone
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import uvloop

from fleet_ingress.net import tls_socket
from fleet_ingress.net.tls import server_ssl_context


def say(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Handler(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def connection_lost(self, exc: Exception | None) -> None:
        say(ev="lost", exc=None if exc is None else repr(exc))
        if not self.done.done():
            self.done.set_result(None)


async def main(cert: str, key: str, size: int) -> None:
    loop = asyncio.get_running_loop()
    ctx = server_ssl_context(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    say(ev="listening", port=listener.getsockname()[1])
    sock, _ = await loop.sock_accept(listener)
    conn = tls_socket.wrap_accepted(loop, sock, ctx)
    shaken: asyncio.Future[BaseException | None] = loop.create_future()
    conn.start_handshake(5.0, shaken.set_result)
    if (exc := await shaken) is not None:
        raise exc
    done: asyncio.Future[None] = loop.create_future()
    conn.start(Handler(done))
    conn.write(b"m" * size)
    conn.close()
    say(ev="closing", buffered=conn.get_write_buffer_size())
    await asyncio.wait_for(done, 60)


if __name__ == "__main__":
    tls_socket.CLOSE_TIMEOUT = float(sys.argv[3])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(sys.argv[1], sys.argv[2], int(sys.argv[4])))
