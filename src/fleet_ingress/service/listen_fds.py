"""Listening sockets opened once and handed on: to worker processes, and
across the supervisor's own re-execution.

The supervisor binds every listener once. A worker gets them through
`subprocess`'s `pass_fds` and learns which is which from one environment
variable, as systemd's socket activation does with `LISTEN_FDS` and
`LISTEN_FDNAMES`, but naming each fd by the config key it serves:

    FLEET_INGRESS_LISTEN_FDS=listen.wss=5,listen.acme=6
    FLEET_INGRESS_LISTEN_PID=4242        (only when the fds are for that one PID)

An upgrade re-executes the supervisor (`reexec`: `os.execve`, same PID) with
the same sockets marked inheritable; the new image `adopt`s them. A listening
socket never closes on the way, so the kernel keeps completing handshakes and
queueing connections in its backlog while no process accepts: a carrier
connecting during the exec waits a few hundred milliseconds for its accept,
and is never refused. (Closing and re-binding instead leaves a window in which
a SYN meets no socket and gets RST: a refused call.)

The supervisor's channels to its workers (`net.slot_server`) go over the
exec the same way, named `worker.PID.GENERATION`: connected Unix stream
sockets rather than listeners, so the new image knows its workers and keeps
the one lock each of them holds on its slots.

`adopt` unsets the variables, as `sd_listen_fds(1)` does: a process the
worker starts must not claim fds it never received.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, MutableMapping
from typing import NoReturn

from fleet_ingress.logs import flush_lines

EXEC_FLUSH_WAIT = 0.5

LISTEN_FDS = "FLEET_INGRESS_LISTEN_FDS"
LISTEN_PID = "FLEET_INGRESS_LISTEN_PID"
WORKER_PREFIX = "worker."  # worker.PID.GENERATION: a worker's slot channel
COORDINATOR = "coordinator"  # a worker's end of its channel to the supervisor


def worker_key(key: str) -> tuple[int, int] | None:
    """(pid, generation) of a worker channel's key, None for a listener's."""
    if not key.startswith(WORKER_PREFIX):
        return None
    pid, _, generation = key.removeprefix(WORKER_PREFIX).partition(".")
    if not (pid.isdigit() and generation.isdigit()):
        raise ValueError(f"{key!r} is not {WORKER_PREFIX}PID.GENERATION")
    return int(pid), int(generation)


class ListenFdsError(RuntimeError):
    """The inherited listeners are not what the environment says; names the fd and the fix."""


def describe(socks: Mapping[str, socket.socket]) -> str:
    """The variable's value for these sockets: `key=fd,key=fd`."""
    for key in socks:
        if not key or any(c in key for c in ",= "):
            raise ValueError(f"listener key {key!r} cannot be named in {LISTEN_FDS}")
        worker_key(key)
    return ",".join(f"{key}={sock.fileno()}" for key, sock in socks.items())


def handover_env(
    socks: Mapping[str, socket.socket],
    *,
    pid: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment that hands `socks` to a child (`pid` None: whichever
    process gets the fds through pass_fds) or to the re-executed image of
    `pid`. Start it with `pass_fds=pass_fds(socks)`, or use `reexec`."""
    env = dict(os.environ if base is None else base)
    env[LISTEN_FDS] = describe(socks)
    env.pop(LISTEN_PID, None)
    if pid is not None:
        env[LISTEN_PID] = str(pid)
    return env


def pass_fds(socks: Mapping[str, socket.socket]) -> tuple[int, ...]:
    return tuple(sock.fileno() for sock in socks.values())


def reexec(
    argv: list[str],
    socks: Mapping[str, socket.socket],
    *,
    executable: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> NoReturn:
    """Replace this process's image with `executable argv[1:]` (same PID),
    keeping `socks` open across the exec and named in the environment
    (plus `extra_env`, e.g. a state descriptor the caller made inheritable).
    Every other descriptor is closed by the exec (Python opens them
    non-inheritable), so nothing else leaks into the new image. When the
    exec itself fails (OSError: no such interpreter...), this process goes
    on, its sockets untouched: the caller keeps serving and says why."""
    for sock in socks.values():
        os.set_inheritable(sock.fileno(), True)
    env = handover_env(socks, pid=os.getpid())
    env.update(extra_env or {})
    # The exec discards Python's buffers and the log writer's queue: what was
    # logged must be out first (a stderr nobody reads holds the exec at most
    # EXEC_FLUSH_WAIT: the upgrade flushed, and counted what still waited, before).
    flush_lines(EXEC_FLUSH_WAIT)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(executable or sys.executable, argv, env)


def adopt(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The sockets handed to this process, by key (empty when none were):
    listeners by config key, worker channels by `worker.PID.GENERATION`
    (in the supervisor), the channel to the supervisor by `coordinator` (in a worker).
    Checks that each is what its key says; unsets the variables."""
    env = os.environ if environ is None else environ
    value = env.pop(LISTEN_FDS, None)
    owner = env.pop(LISTEN_PID, None)
    if not value:
        return {}
    if owner is not None and owner != str(os.getpid()):
        return {}  # meant for another process (our parent's re-exec), not us
    socks: dict[str, socket.socket] = {}
    for item in value.split(","):
        key, sep, fd_text = item.partition("=")
        if not sep or not fd_text.isdigit() or key in socks:
            raise ListenFdsError(
                f"{LISTEN_FDS}={value!r}: {item!r} is not KEY=FD (or repeats a key); "
                f"unset {LISTEN_FDS} unless fleet-ingress's supervisor started this process"
            )
        try:
            channel = key == COORDINATOR or worker_key(key) is not None
        except ValueError as exc:  # a malformed worker.PID.GENERATION
            raise ListenFdsError(f"{LISTEN_FDS}={value!r}: {exc}") from exc
        socks[key] = inherited_socket(key, int(fd_text), channel=channel)
    return socks


def inherited_socket(key: str, fd: int, *, channel: bool) -> socket.socket:
    fix = f"unset {LISTEN_FDS} unless fleet-ingress's supervisor started this process"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenFdsError(
            f"{key}: inherited fd {fd} is not a socket ({exc.strerror}); {fix}"
        ) from exc
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if channel:
        if listening or sock.family != socket.AF_UNIX:
            sock.detach()  # not ours to close
            raise ListenFdsError(
                f"{key}: inherited fd {fd} is not a connected Unix socket to a worker; {fix}"
            )
    elif not listening:
        sock.detach()
        raise ListenFdsError(f"{key}: inherited fd {fd} is a socket but not listening; {fix}")
    # Ours now: a process we start later gets it only when passed explicitly.
    os.set_inheritable(fd, False)
    return sock
