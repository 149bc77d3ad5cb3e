"""This host's addresses, and the timer that ends calls on one it lost.

A call whose address moved to another host (a keepalived failover, SPEC 14)
is ended `carrier_lost` once the address has been missing for
`core.address_watch.GRACE`, so that its fleet worker and bot are free for the
carrier's redial through the other host (`core.address_watch` says why, and
which number). Here is the reading and the timer:

- The addresses come from the kernel's list of them (a netlink RTM_GETADDR
  dump; no subprocess), in this process's network namespace; without netlink,
  from /proc: the LOCAL /32 entries of /proc/net/fib_trie for IPv4 (which
  lists every route too: seconds to read with a full routing table),
  /proc/net/if_inet6 for IPv6. A bind() test would not do: keepalived set-ups often set
  net.ipv4.ip_nonlocal_bind, under which binding an address the host lacks works.
- They are read only when they may have changed: a netlink socket subscribed
  to the kernel's address events (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR) is
  drained at each look, without blocking; a look with no event and no address
  missing reads nothing. Without netlink (a sandbox refusing it) every look reads.
- While linked calls are on an address that could go (not loopback), a look
  comes every CHECK_PERIOD as long as one has something to do: the first read,
  an address missing (its grace running), a read that failed, no netlink. Else
  the sweep waits for the kernel's word: the events socket's readability sets
  the next look, no sooner than CHECK_PERIOD after the last one (a storm of
  events costs a look a period, as before). A look with no event and nothing
  missing did nothing but wake the worker, every second of every call's life
  (the idle audit of session 39). An address gone is still seen by the look
  after its event, at most CHECK_PERIOD later, and its calls end between GRACE
  and GRACE + CHECK_PERIOD after it left, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fleet_ingress.core.address_watch import (
    CHECK_PERIOD,
    Address,
    AddressWatch,
    call_address,
    gone_detail,
)
from fleet_ingress.core.call_machine import EndReason
from fleet_ingress.logs import fields
from fleet_ingress.net.event_loop import count_unexpected_error

if TYPE_CHECKING:
    from fleet_ingress.net.calls import Call, Registry

log = logging.getLogger("fleet_ingress.proxy")

FIB_TRIE = "/proc/net/fib_trie"
IF_INET6 = "/proc/net/if_inet6"
# <linux/rtnetlink.h>: the multicast groups of address changes.
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h>: an address dump.
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
# Seconds a dump may take before the look gives up on it (it takes well under a millisecond).
NETLINK_TIMEOUT = 0.5


def parse_fib_trie(text: str) -> set[ipaddress.IPv4Address]:
    """The IPv4 addresses of this host: each `|-- ADDR` leaf followed by a
    `/32 host LOCAL` entry (the local table's; the main table's routes and
    broadcast entries are not)."""
    found: set[ipaddress.IPv4Address] = set()
    leaf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            leaf = stripped[4:]
        elif stripped == "/32 host LOCAL" and leaf:
            with contextlib.suppress(ValueError):
                found.add(ipaddress.IPv4Address(leaf))
    return found


def parse_if_inet6(text: str) -> set[ipaddress.IPv6Address]:
    """The IPv6 addresses of this host: the first field of each line, 32 hex digits."""
    found: set[ipaddress.IPv6Address] = set()
    for line in text.splitlines():
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if len(word) == 32:
            with contextlib.suppress(ValueError):
                found.add(ipaddress.IPv6Address(int(word, 16)))
    return found


def read_host_addresses() -> set[Address] | None:
    """This host's addresses, both families: the kernel's list of them over
    netlink (RTM_GETADDR), its cost that of the addresses alone; without
    netlink, /proc (`read_proc_addresses`). None when they could not be read."""
    try:
        return netlink_addresses()
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
            return None
    return read_proc_addresses()


def netlink_addresses() -> set[Address]:
    """The addresses of a netlink RTM_GETADDR dump (IFA_LOCAL, else IFA_ADDRESS:
    on a point-to-point link IFA_ADDRESS is the peer's). OSError when refused."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(NETLINK_TIMEOUT)
        sock.bind((0, 0))
        request = struct.pack("=LHHLL", 16 + 8, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        sock.send(request + struct.pack("=BBBBL", socket.AF_UNSPEC, 0, 0, 0, 0))
        found: set[Address] = set()
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise OSError(errno.EIO, "netlink: end of the dump unseen")
            try:
                for kind, body in _messages(data):
                    if kind == NLMSG_DONE:
                        return found
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=l", body)
                        raise OSError(-code or errno.EIO, "netlink: RTM_GETADDR refused")
                    if kind == RTM_NEWADDR:
                        address = _ifaddr(body)
                        if address is not None:
                            found.add(address)
            except ValueError as exc:
                raise OSError(errno.EIO, f"netlink: {exc}") from None


def _named_in(data: bytes, named: set[Address]) -> bool:
    """Add the addresses of the RTM_NEWADDR and RTM_DELADDR messages of one
    netlink datagram to `named`; False when one cannot be read."""
    try:
        for kind, body in _messages(data):
            if kind in (RTM_NEWADDR, RTM_DELADDR):
                address = _ifaddr(body)
                if address is None:
                    return False
                named.add(address)
    except ValueError:
        return False
    return True


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The netlink messages of one datagram: each one's type and body (what
    follows its 16-byte header). ValueError for a message shorter than its header."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=LH", data, offset)
        if length < 16:
            raise ValueError("a message shorter than its header")
        yield kind, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def _ifaddr(body: bytes) -> Address | None:
    """The address of one RTM_NEWADDR message's body (ifaddrmsg, attributes)."""
    if len(body) < 8:
        return None
    size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(body[0])
    if size is None:
        return None
    attributes: dict[int, bytes] = {}
    offset = 8
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            break
        attributes[kind] = body[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    if raw is None or len(raw) != size:
        return None
    return ipaddress.ip_address(raw)


def read_proc_addresses(fib_trie: str = FIB_TRIE, if_inet6: str = IF_INET6) -> set[Address] | None:
    """This host's addresses from /proc, both families (a file missing: none
    of that family, as with IPv6 disabled); None when a table could not be read
    (EMFILE, ENFILE, ENOMEM, ...): that says nothing of the addresses, and
    taken for "none" it would end every call on the host two looks later.
    /proc/net/fib_trie lists every route too: with a full table (100,000
    routes) a read takes seconds, the worker's loop stopped meanwhile; hence
    netlink first."""
    found: set[Address] = set()
    for path, parse in ((fib_trie, parse_fib_trie), (if_inet6, parse_if_inet6)):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                found |= parse(f.read())  # type: ignore[operator]
        except FileNotFoundError:
            pass
        except OSError:
            return None
    return found


class AddressEvents:
    """The kernel's word that an address was added or removed, drained when
    asked (`changed`); None of a socket: no word to be had, always changed."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except (OSError, AttributeError):
            return
        try:
            sock.setblocking(False)
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError:
            sock.close()
            return
        self._sock = sock

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int | None:
        """The socket the events come on, for the loop to watch (None: none)."""
        return None if self._sock is None else self._sock.fileno()

    def changed(self) -> bool:
        """Whether an address event came since the last call (all read now)."""
        named = self.changes()
        return named is None or bool(named)

    def changes(self) -> set[Address] | None:
        """The addresses the events since the last call named (all read now):
        empty when none came; None when what changed is not known (no socket,
        events lost to a full buffer, one not understood)."""
        sock = self._sock
        if sock is None:
            return None
        named: set[Address] = set()
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return named
            except OSError:  # ENOBUFS: events were lost, so anything may have changed
                return None
            if not data or not _named_in(data, named):
                return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class AddressSweep:
    """One timer for the worker: ends the linked calls whose local address
    has been missing from this host for the grace (`core.address_watch`)."""

    def __init__(
        self,
        registry: Registry,
        watch: AddressWatch | None = None,
        period: float = CHECK_PERIOD,
    ) -> None:
        self.registry = registry
        self.watch = watch or AddressWatch()
        self.period = period
        self.looks = 0  # looks taken
        self.reads = 0  # of them, those that read the addresses
        self._events: AddressEvents | None = None
        self._host: set[Address] | None = None  # the last read (None: never read)
        self._unread = False  # the last read failed: the next look reads, as after an event
        self._timer: asyncio.TimerHandle | None = None
        # The loop watching the events socket for the next look, and its descriptor.
        self._watched: tuple[asyncio.AbstractEventLoop, int] | None = None
        self._looked_at = -math.inf  # loop time of the last look
        self._on: dict[Call, Address] = {}  # linked calls on an address that could go
        self._used: Counter[Address] = Counter()  # how many of them on each
        registry.on_call_linked.append(self.call_linked)
        registry.on_call_ended.append(self.call_ended)

    def call_linked(self, call: Call) -> None:
        # Called as the call links (net.proxy): anything raised here would end
        # the call as a failed command. A bug leaves the call unwatched instead.
        try:
            self._call_linked(call)
        except Exception as exc:
            if call in self._on:
                self._forget(self._on.pop(call))
            _bug("address watch: a call could not be watched; it is kept, unwatched", exc)

    def _call_linked(self, call: Call) -> None:
        address = _local_address(call)
        if address is None:
            return
        self._on[call] = address
        self._used[address] += 1
        if self._timer is None and self._watched is None:
            if self._events is None:
                self._events = AddressEvents()
                self._host = None
            self._timer = asyncio.get_running_loop().call_later(self.period, self.look)

    def call_ended(self, call: Call) -> None:
        address = self._on.pop(call, None)
        if address is not None:
            self._forget(address)

    def _forget(self, address: Address) -> None:
        self._used[address] -= 1
        if self._used[address] <= 0:
            del self._used[address]

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unwatch()
        if self._events is not None:
            self._events.close()
            self._events = None

    def _unwatch(self) -> None:
        if self._watched is not None:
            self._watched[0].remove_reader(self._watched[1])
            self._watched = None

    def _next_look(self) -> None:
        """After a look, with calls to watch: the next one in a period when it
        has something to do, else at the kernel's word (`_woken`)."""
        loop = asyncio.get_running_loop()
        events = self._events
        fd = None if events is None else events.fileno()
        idle = not (self._host is None or self._unread or self.watch.pending)
        if fd is not None and idle:
            if self._watched is None:
                loop.add_reader(fd, self._woken)
                self._watched = (loop, fd)
            return
        self._unwatch()
        self._timer = loop.call_later(self.period, self.look)

    def _woken(self) -> None:
        """An address event is there to read: a look, a period after the last
        one at the soonest (the look reads the events; watched no more meanwhile)."""
        self._unwatch()
        if self._timer is None:
            loop = asyncio.get_running_loop()
            wait = max(0.0, self._looked_at + self.period - loop.time())
            self._timer = loop.call_later(wait, self.look)

    def look(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._looked_at = asyncio.get_running_loop().time()
        try:
            self._look()
        except Exception as exc:  # a bug must not end the watch, nor cut calls
            count_unexpected_error()
            log.error(
                "address check failed: calls are kept and checked again; a bug, report it",
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        if self._on:
            self._next_look()
        elif self._events is not None:
            self._unwatch()
            # No call to watch: no socket either (events queued meanwhile are
            # not wanted; the next watch reads the addresses afresh).
            self._events.close()
            self._events = None

    def _look(self) -> None:
        self.looks += 1
        if not self._on:
            return
        events = self._events
        assert events is not None
        named = events.changes()
        unread_before = self._unread
        changed = named is None or bool(named) or unread_before
        if changed or self._host is None or self.watch.pending:
            self.reads += 1
            host = read_host_addresses()
            if host is None:
                # No word this look: judge nothing, read again at the next,
                # which starts the clocks afresh (unseen changes meanwhile).
                self._unread = True
                log.warning("address check: the host's tables could not be read; calls kept")
                return
            self._host, self._unread = host, False
        now = time.monotonic()
        # Without the kernel's word (no netlink), each look reads and stands alone.
        # Only the addresses the events named can have come and gone unseen:
        # other addresses' events (a container's veth, a privacy address
        # renewed) restart no clock, else a steady trickle of them would keep
        # every moved address's calls alive until the TCP timeouts.
        restart: bool | set[Address] = (
            False if not events.listening else True if named is None or unread_before else named
        )
        gone = self.watch.look(self._host, self._used.keys(), now, restart)
        for address in gone:
            why = gone_detail(address, self.watch.missing_for(address, now))
            calls = [c for c, a in self._on.items() if a == address]
            log.warning(
                "calls ended: their address left this host",
                extra=fields(address=str(address), calls=len(calls)),
            )
            for call in calls:
                del self._on[call]
                self._forget(address)
                call.end(EndReason.CARRIER_LOST, why)


def _bug(message: str, exc: Exception) -> None:
    count_unexpected_error()
    log.error(f"{message}; a bug, report it", exc_info=(type(exc), exc, exc.__traceback__))


def _local_address(call: Call) -> Address | None:
    transport = getattr(call.carrier, "transport", None)
    if transport is None:
        return None
    sockname = transport.get_extra_info("sockname")
    if not sockname:
        return None
    return call_address(str(sockname[0]))
