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
        this one die (`service.fd_store`). Never raises."""
        self._send_fds(f"FDSTORE=1\nFDNAME={name}".encode(), [fd])

    def remove_fd(self, name: str) -> None:
        """Drop what the fd store keeps under `name` (FDSTOREREMOVE=1)."""
        self._send_fds(f"FDSTOREREMOVE=1\nFDNAME={name}".encode(), [])

    def _send_fds(self, message: bytes, fds: list[int]) -> None:
        if not self.address:
            return
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._socket().sendmsg([message], rights, 0, self.address)
        except OSError as exc:  # BlockingIOError too: that descriptor is not kept
            self.dropped += isinstance(exc, BlockingIOError)
            log.warning(
                "cannot keep a descriptor in systemd's fd store: a crash of this process "
                "would end what it serves",
                extra=fields(message=message.decode(), error=str(exc)),
            )

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
