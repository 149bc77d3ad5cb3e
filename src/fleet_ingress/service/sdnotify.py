"""systemd's notify protocol, spoken directly: one datagram per message to
`$NOTIFY_SOCKET` (no libsystemd). Without `$NOTIFY_SOCKET` every call is a
no-op, so the ingress runs the same under systemd, a terminal or a test.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from collections.abc import Mapping

from fleet_ingress.logs import fields, flush_lines

log = logging.getLogger("fleet_ingress.systemd")

STATE_CHANGES = frozenset({"READY=1", "RELOADING=1", "STOPPING=1"})
STATE_CHANGE_FLUSH_WAIT = 0.25  # seconds the event loop waits at most, then notifies


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        self._warned = False
        self.dropped = 0  # messages the receiver had no room for
        self.watchdog_interval = _watchdog_interval(env)
        # What systemd's fd store keeps of this process's, as far as it can
        # know (systemd answers no FDSTORE=1): each name's descriptors, by
        # (st_dev, st_ino), as systemd tells one already kept (`same_fd`). A
        # name twice: a remove lost before a store (the newest is used).
        self.kept: dict[str, list[tuple[int, int]]] = {}
        # FileDescriptorStoreMax=: $FDSTORE (systemd 254 and later sets it), or
        # `systemctl show` (`fd_store.read_store_max`); None: not known.
        self.store_max = _digits(env.get("FDSTORE"))
        # Descriptors systemd would not keep, its store full (it says so in its
        # journal alone, and closes them).
        self.not_kept = 0
        # The names whose descriptor systemd would not keep and that are still
        # wanted there (stored again once it has room: `Supervisor.recheck_fd_store`).
        self.unkept: set[str] = set()
        # True while `systemctl show` is asked for the limit (in the background,
        # as the supervisor starts): what is stored meanwhile is counted, and set
        # against the limit once it is known (`limit_known`).
        self.awaiting_limit = False
        # Meanwhile, in the order sent: what was kept when the first came, then
        # each store (name, identity) and each remove (name, None): replayed
        # against the limit as systemd took them (a remove after a store it
        # refused does not make that store kept).
        self._kept_before: list[tuple[str, tuple[int, int]]] | None = None
        self._stored_unknown: list[tuple[str, tuple[int, int] | None]] = []
        # Removes the notify socket had no room for, sent before the next message
        # (a channel's copy kept would hold it open: its worker never sees it end).
        self._owed: dict[str, None] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> None:
        """Send e.g. notify("READY=1", "STATUS=serving"); never raises."""
        if not self.address:
            return
        if any(line in STATE_CHANGES for line in lines):
            # What was logged before a state change reaches the journal before
            # systemd (and `systemctl`) hear of it; briefly, for a stderr nobody reads.
            flush_lines(STATE_CHANGE_FLUSH_WAIT)
        message = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8")
        self._pay_owed()
        try:
            self._socket().sendto(message, self.address)
        except BlockingIOError:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning(
                    "systemd is not reading its notify socket: a message was dropped",
                    extra=fields(socket=self.address, dropped=self.dropped, message=message[:80]),
                )
        except OSError as exc:
            if not self._warned:  # once: a missing socket must not flood the log
                self._warned = True
                log.warning(
                    "cannot notify systemd", extra=fields(socket=self.address, error=str(exc))
                )

    def store_fd(self, name: str, fd: int) -> None:
        """Keep a duplicate of `fd` in systemd's fd store under `name` (the unit's
        FileDescriptorStoreMax=): handed back to the next main process should
        this one die (`service.fd_store`). Never raises. A store full (the
        count kept against FileDescriptorStoreMax=) is said: systemd closes
        what it cannot keep, and says so in its journal only."""
        if not self.address:
            return
        self._pay_owed()
        try:
            stat = os.fstat(fd)
        except OSError:
            return
        identity = (stat.st_dev, stat.st_ino)
        copies = self.kept.get(name, [])
        already = any(identity in kept for kept in self.kept.values())
        # (FileDescriptorStoreMax=0: the operator's choice to keep nothing; not said.)
        full = not already and bool(self.store_max) and self.kept_count >= (self.store_max or 0)
        if not self._send_fds(f"FDSTORE=1\nFDNAME={name}".encode(), [fd]) or already:
            return
        if full:
            self._not_kept(name)
            return
        # Stored after a remove lost: that remove would take this one too.
        self._owed.pop(name, None)
        self.unkept.discard(name)
        self.kept[name] = [*copies, identity]
        self._meanwhile(name, identity)

    def _meanwhile(self, name: str, identity: tuple[int, int] | None) -> None:
        """A store (identity) or remove (None) sent while the limit is asked for."""
        if self.store_max is not None or not self.awaiting_limit:
            return
        if self._kept_before is None:
            self._kept_before = [(n, kept) for n, copies in self.kept.items() for kept in copies]
            if identity is not None:  # this store is already counted in
                self._kept_before.remove((name, identity))
        self._stored_unknown.append((name, identity))

    def limit_known(self, limit: int | None) -> None:
        """FileDescriptorStoreMax= as read (None: not known), with what was
        stored while it was asked for set against it: systemd's stores and
        removes replayed in the order sent (a store kept while its store had
        room), and what it closed dropped from the count, said as a store
        found full would have been."""
        self.awaiting_limit = False
        events, self._stored_unknown = self._stored_unknown, []
        before, self._kept_before = self._kept_before or [], None
        if limit is None:
            return
        self.store_max = limit
        if not limit:  # the operator's choice to keep nothing: not said
            return
        held = list(before)
        refused: list[tuple[str, tuple[int, int]]] = []
        for name, identity in events:
            if identity is None:
                held = [(n, kept) for n, kept in held if n != name]
                refused = [(n, kept) for n, kept in refused if n != name]
            elif any(identity == kept for _, kept in held):
                continue
            elif len(held) >= limit:
                refused.append((name, identity))
            else:
                held.append((name, identity))
        for name, identity in refused:
            if identity not in self.kept.get(name, []):
                continue
            self.kept[name].remove(identity)
            if not self.kept[name]:
                del self.kept[name]
            self._not_kept(name)

    def _not_kept(self, name: str) -> None:
        self.not_kept += 1
        self.unkept.add(name)
        log.warning(
            "systemd's fd store is full: a descriptor was not kept, and a crash of the "
            "supervisor now ends what it serves (a worker's calls, a listener); raise "
            "FileDescriptorStoreMax= in the unit, `systemctl daemon-reload`, then "
            "`systemctl reload fleet-ingress` (it stores again what was not kept)",
            extra=fields(
                name=name, kept=self.kept_count, max=self.store_max, not_kept=self.not_kept
            ),
        )

    @property
    def kept_count(self) -> int:
        return sum(len(copies) for copies in self.kept.values())

    def remove_fd(self, name: str) -> None:
        """Drop what the fd store keeps under `name` (FDSTOREREMOVE=1). Lost to
        a full notify socket, it is sent again before the next message."""
        if not self.address:
            return
        self._pay_owed()
        self._owed.pop(name, None)
        self.unkept.discard(name)  # no longer wanted there
        if self._send_fds(f"FDSTOREREMOVE=1\nFDNAME={name}".encode(), []):
            self.kept.pop(name, None)
            self._meanwhile(name, None)
        else:
            self._owed[name] = None

    @property
    def owed(self) -> list[str]:
        """The names whose remove is still to be sent (carried over an exec)."""
        return list(self._owed)

    def owe_removes(self, names: list[str]) -> None:
        """Removes an earlier image of this process could not send: sent before
        the next message, as its own."""
        for name in names:
            self._owed.setdefault(name, None)

    def _pay_owed(self) -> None:
        """Send the removes lost before, in order, while the socket takes them."""
        for name in list(self._owed):
            message = f"FDSTOREREMOVE=1\nFDNAME={name}".encode()
            try:
                self._socket().sendmsg([message], [], 0, self.address)
            except BlockingIOError:
                return
            except OSError:
                pass  # said when it was lost
            del self._owed[name]
            self.kept.pop(name, None)
            self._meanwhile(name, None)

    def _send_fds(self, message: bytes, fds: list[int]) -> bool:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._socket().sendmsg([message], rights, 0, self.address)
        except OSError as exc:  # BlockingIOError too: that descriptor is not kept
            self.dropped += isinstance(exc, BlockingIOError)
            log.warning(
                "cannot keep a descriptor in systemd's fd store: a crash of this process "
                "would end what it serves"
                if fds
                else "cannot take a descriptor out of systemd's fd store: sent again later",
                extra=fields(message=message.decode(), error=str(exc)),
            )
            return False
        return True

    def _socket(self) -> socket.socket:
        if self._sock is None:
            # Non-blocking: this runs on the event loop, and a receiver that
            # stops reading (its queue full) must not stop every call with it.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def monotonic_usec() -> str:
    """The `MONOTONIC_USEC=` line systemd wants beside `RELOADING=1`."""
    return f"MONOTONIC_USEC={int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)}"


def _digits(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WatchdogSec, as systemd recommends; None when no watchdog is asked."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1_000_000
    except ValueError:
        return None
