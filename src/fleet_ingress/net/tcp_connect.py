"""A TCP connection to a host name's addresses, tried as RFC 8305 (Happy Eyeballs v2) says.

A fleet given by name may resolve to several addresses (an AAAA and an A
record, DNS round robin), and one of them may take connections nowhere: a
firewall that drops, a host that is gone, an IPv6 route that is broken. Tried
one after the other, such an address takes the whole of `timeouts.connect`
and the call fails, on every attempt, while the health probe (aiohttp, which
staggers its attempts) reaches the fleet through the next address and keeps it
UP: every call to the fleet failed (the IPv6 audit of session 14). Here the
next address is tried CONNECT_STAGGER after the previous one started, or at
once when it failed, the families taken in turn; the first connection made
wins and the others are closed.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import select
import socket
import ssl
from typing import Any

from fleet_ingress.core.addresses import ip_literal_version

CONNECT_STAGGER = 0.25
"""Seconds before the next address is tried alongside (RFC 8305's Connection
Attempt Delay; aiohttp's and CPython's choice too)."""

AddrInfo = tuple[int, int, int, str, Any]  # what getaddrinfo answers, one address


class Underway:
    """The sockets of one connection under way, for its timer to ask whether
    the peer answered what the loop has not read yet (`answered`): a loop
    resumed after a stall runs its timers before it polls its sockets
    (net/late_timers.py), and a connection the peer took meanwhile looks,
    until then, like one it never answered."""

    __slots__ = ("_connecting", "_handshaking")

    def __init__(self) -> None:
        self._connecting: set[socket.socket] = set()  # SYN sent: writable once answered
        self._handshaking: set[socket.socket] = set()  # TLS: readable once answered

    def connecting(self, sock: socket.socket, under_way: bool = True) -> None:
        (self._connecting.add if under_way else self._connecting.discard)(sock)

    def handshaking(self, sock: socket.socket, under_way: bool = True) -> None:
        (self._handshaking.add if under_way else self._handshaking.discard)(sock)

    def answered(self) -> bool:
        """Whether the peer has answered on one of the sockets (a SYN-ACK or a
        refusal; a TLS record), unread: one poll, no wait."""
        poller = select.poll()
        for socks, events in (
            (self._connecting, select.POLLOUT),
            (self._handshaking, select.POLLIN),
        ):
            for sock in socks:
                if (fd := sock.fileno()) >= 0:
                    poller.register(fd, events)
        return bool(poller.poll(0))


async def open_tcp(
    host: str,
    port: int,
    underway: Underway | None = None,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    keep_writer: bool = False,
) -> socket.socket:
    """A connected non-blocking socket to `host`:`port`, with TCP_NODELAY (each
    write is whole messages); the OSError of the last address tried if none
    takes it (one this host cannot use gives way to another's answer:
    `_says_more`). Bounded by the caller's timeout. `underway`: told of each
    socket while it connects. `loop`: the running loop, where the caller has
    it (CPython 3.11's get_running_loop is a getpid system call).
    `keep_writer`: the socket is returned with a writer still registered for
    its descriptor (a callback that does nothing), for the caller to take over
    or remove (`loop.remove_writer`) before anything else closes it: with
    uvloop, removing a descriptor's only interest closes its poll handle and
    the next registration opens a new one (six system calls), so a TLS
    handshake that registers its reader first keeps the connect's poll
    (`TLSConnection`'s ``writer_registered``)."""
    loop = loop or asyncio.get_running_loop()
    infos = literal_addrinfo(host, port) or await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    )
    if not infos:
        raise OSError(f"no address for {host}:{port}")
    if len(infos) == 1:  # a fleet at an IP literal, most often: nothing to race
        sock = await _connect_one(infos[0], underway, loop, keep_writer)
    else:
        sock = await first_connected(interleaved(infos), underway)
        if keep_writer:
            loop.add_writer(sock.fileno(), _nothing)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        if keep_writer:
            loop.remove_writer(sock.fileno())
        sock.close()
        raise
    return sock


def _nothing() -> None:
    pass


def literal_addrinfo(host: str, port: int) -> list[AddrInfo]:
    """What getaddrinfo would answer for an IP literal, without asking it
    (core.addresses.ip_literal_version); empty for a name. A scoped IPv6
    literal (fe80::1%eth0) gets its interface's index here: uvloop's
    getaddrinfo answers it with scope 0, and a link-local address without its
    interface cannot be connected to (EINVAL: every call to such a fleet
    failed while its probe, through aiohttp, passed). An interface that does
    not exist is an OSError, as a failed connect is."""
    version = ip_literal_version(host)
    if version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    if version == 6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
    address, percent, zone = host.partition("%")
    if percent and ip_literal_version(address) == 6:
        return [
            (
                socket.AF_INET6,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, port, 0, _interface_index(zone)),
            )
        ]
    return []


def _interface_index(zone: str) -> int:
    if zone.isascii() and zone.isdigit():
        return int(zone)
    try:
        return socket.if_nametoindex(zone)
    except OSError:
        raise OSError(
            errno.ENODEV, f"no network interface {zone!r} on this host (the fleet URL's zone)"
        ) from None


def interleaved(infos: list[AddrInfo]) -> list[AddrInfo]:
    """The resolver's order, the families taken in turn from the first one's
    (RFC 8305 section 4): one family's broken route costs one stagger, not all."""
    by_family: dict[int, list[AddrInfo]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    turns = itertools.zip_longest(*by_family.values())
    return [info for turn in turns for info in turn if info is not None]


async def first_connected(infos: list[AddrInfo], underway: Underway | None = None) -> socket.socket:
    """Connect to `infos` in order, each CONNECT_STAGGER after the last began (at
    once after a failure); the first connected socket, every other one closed."""
    loop = asyncio.get_running_loop()
    waiting = list(infos)
    trying: set[asyncio.Task[socket.socket]] = set()
    error: OSError | None = None
    try:
        while waiting or trying:
            if waiting:
                trying.add(loop.create_task(_connect_one(waiting.pop(0), underway)))
            done, trying = await asyncio.wait(
                trying,
                timeout=CONNECT_STAGGER if waiting else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            connected = None
            unexpected: BaseException | None = None
            for task in done:
                if (exc := task.exception()) is None:
                    if connected is None:
                        connected = task.result()
                    else:
                        task.result().close()
                elif isinstance(exc, OSError):
                    error = exc if _says_more(exc, error) else error
                else:
                    unexpected = exc
            if unexpected is not None:
                if connected is not None:
                    connected.close()
                raise unexpected
            if connected is not None:
                return connected
        assert error is not None
        raise error
    finally:
        _abandon(trying)


def _says_more(new: OSError, kept: OSError | None) -> bool:
    """Whether `new` is the error to raise rather than `kept`: the later one,
    unless it is only that this host cannot use the address (EADDRNOTAVAIL: no
    source address of its family, or out of local ports to it) while another
    address answered. On a host with IPv6 disabled a name's IPv6 address sorts
    last and fails so; raised, it hid the refusal of the fleet's IPv4 address,
    and the proxy took that for this host's failure, never the fleet's."""
    if kept is None or new.errno != errno.EADDRNOTAVAIL:
        return True
    return kept.errno == errno.EADDRNOTAVAIL


async def _connect_one(
    info: AddrInfo,
    underway: Underway | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    keep_writer: bool = False,
) -> socket.socket:
    family, type_, proto, _, address = info
    sock = socket.socket(family, type_, proto)
    if underway is not None:
        underway.connecting(sock)
    try:
        sock.setblocking(False)
        await connect_socket(sock, address, loop, keep_writer=keep_writer)
    except BaseException:
        sock.close()
        raise
    finally:
        if underway is not None:
            underway.connecting(sock, False)
    return sock


# What a non-blocking connect answers while it goes on: the errnos of
# BlockingIOError, and EINTR's (InterruptedError), as `socket.connect` raised them.
_UNDER_WAY = frozenset(
    {errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY, errno.EWOULDBLOCK, errno.EINTR}
)


async def connect_socket(
    sock: socket.socket,
    address: Any,
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    keep_writer: bool = False,
) -> None:
    """Connect non-blocking `sock` to a resolved `address`, waiting on the loop's
    writer callback. Not the loop's sock_connect: uvloop's resolves even a
    numeric address again through getaddrinfo in libuv's thread pool (it asks
    without a socket type, so its shortcut for literals does not apply), where a
    resolver that hangs on one fleet's name held every connection to every
    fleet, those given by IP too (the stalled-dependencies audit of session 14:
    a connect to 127.0.0.1 waited 9.8 s behind two hung lookups).
    `keep_writer`: connected, the descriptor's writer is left registered (see
    `open_tcp`); on failure it never is."""
    loop = loop or asyncio.get_running_loop()
    fd = sock.fileno()
    # connect_ex: a connect under way (EINPROGRESS, every call's) is answered as
    # a number, not raised and caught as BlockingIOError (an exception made,
    # with its traceback: ~11k instructions a connection, callgrind).
    started = sock.connect_ex(address)
    if started == 0:
        if keep_writer:
            loop.add_writer(fd, _nothing)
        return
    if started not in _UNDER_WAY:
        raise OSError(started, os.strerror(started))  # e.g. ConnectionRefusedError
    writable = loop.create_future()
    loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
    connected = False
    try:
        await writable
        if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            raise OSError(error, os.strerror(error))  # e.g. ConnectionRefusedError
        connected = True
    finally:
        if not (connected and keep_writer):
            loop.remove_writer(fd)  # by descriptor, before any close (net/tls_socket.py)


def _abandon(trying: set[asyncio.Task[socket.socket]]) -> None:
    """Cancel the attempts still under way (each closes its socket); one that
    connected before its cancel took effect is closed when it ends."""
    for task in trying:
        task.cancel()
        task.add_done_callback(_close_if_connected)


def _close_if_connected(task: asyncio.Task[socket.socket]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


# What a process has run out of when a connect fails so: not the peer's
# failure, and every other connect fails the same at once.
_OUT_OF = {
    errno.EMFILE: "out of file descriptors",
    errno.ENFILE: "out of file descriptors host-wide",
    errno.ENOBUFS: "out of socket buffer memory",
    errno.ENOMEM: "out of memory",
}


# The fixes for the wants past the process's own descriptor limit (EMFILE's,
# LimitNOFILE, each journal line names with what else frees descriptors there).
HOST_WIDE_FIXES = "ENFILE: the host's limit, fs.file-max; ENOBUFS, ENOMEM: the host's memory"


def out_of_resources(exc: BaseException | None) -> str | None:
    """What this process ran out of, with the errno's name (a call's 503 and
    access line, a probe's reason), when `exc` failed a connect for that; else
    None (a TLS error never: its errno is OpenSSL's)."""
    if not isinstance(exc, OSError) or isinstance(exc, ssl.SSLError) or exc.errno not in _OUT_OF:
        return None
    return f"{_OUT_OF[exc.errno]} ({errno.errorcode[exc.errno]}: {os.strerror(exc.errno)})"
