"""A stand-in supervisor or worker for test_listen_fds.py (run as a program, never imported).

    listen_fds_child.py worker                adopt the listeners handed over, serve them
    listen_fds_child.py supervisor 1 UNIXPATH bind TCP 127.0.0.1:0 and UNIXPATH, serve;
                                              on SIGUSR2 re-execute itself as generation 2,
                                              which adopts the same sockets and serves them

Serving is answering each accepted connection with `GENERATION PID\n`. Events
go to stdout, one JSON object a line; stdin closing ends the program.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time

from fleet_ingress.net.listener import bind_tcp
from fleet_ingress.service.listen_fds import LISTEN_FDS, adopt, reexec

SCRIPT = os.path.abspath(__file__)


def say(**event: object) -> None:
    sys.stdout.write(json.dumps({**event, "t": time.monotonic()}) + "\n")
    sys.stdout.flush()


def start_accepting(sock: socket.socket, generation: int) -> None:
    """Accept and answer in one callback: stopping (`remove_reader`) can never
    drop a connection already taken from the backlog, as cancelling an
    `await sock_accept()` between its accept and its resumption would."""
    greeting = f"{generation} {os.getpid()}\n".encode()
    sock.setblocking(False)

    def on_readable() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                conn.sendall(greeting)  # small: fits the socket buffer
            except OSError:
                pass  # the client left at once: only its connect counted
            conn.close()

    asyncio.get_running_loop().add_reader(sock.fileno(), on_readable)


async def stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


async def serve(socks: dict[str, socket.socket], generation: int) -> None:
    loop = asyncio.get_running_loop()
    for sock in socks.values():
        start_accepting(sock, generation)
    upgrade = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR2, upgrade.set)
    ended = asyncio.create_task(stdin_closed())
    upgrading = asyncio.create_task(upgrade.wait())
    await asyncio.wait([ended, upgrading], return_when=asyncio.FIRST_COMPLETED)
    if upgrade.is_set():
        # Stop accepting, close nothing: the sockets go on through the exec.
        for sock in socks.values():
            loop.remove_reader(sock.fileno())
        say(ev="exec", pid=os.getpid(), generation=generation)
        reexec([sys.executable, SCRIPT, "supervisor", str(generation + 1), ""], socks)


def main() -> None:
    role = sys.argv[1]
    if role == "worker":
        socks = adopt()
        say(
            ev="adopted",
            pid=os.getpid(),
            keys=sorted(socks),
            env_left=os.environ.get(LISTEN_FDS),
            inheritable=[os.get_inheritable(s.fileno()) for s in socks.values()],
        )
        asyncio.run(serve(socks, 0))
        return
    generation, unix_path = int(sys.argv[2]), sys.argv[3]
    if generation == 1:
        tcp = bind_tcp("127.0.0.1", 0, backlog=4096)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(unix_path)
        unix.listen(4096)
        socks = {"listen.wss": tcp, "listen.admin_socket": unix}
        say(ev="listening", pid=os.getpid(), port=tcp.getsockname()[1])
    else:
        socks = adopt()
        say(ev="adopted", pid=os.getpid(), generation=generation, keys=sorted(socks))
    asyncio.run(serve(socks, generation))


if __name__ == "__main__":
    main()
