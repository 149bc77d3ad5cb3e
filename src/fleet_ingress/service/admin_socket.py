"""The supervisor's admin socket kept at its path (listen.admin_socket):
made again once its file is gone, what keeps it from being so said once
(`service.supervisor`; `service.supervisor_process` looks every second)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

from fleet_ingress.logs import fields
from fleet_ingress.ops.admin_server import bind_admin_socket, remove_own_socket, socket_file_id
from fleet_ingress.ops.web_sites import WebSites

log = logging.getLogger("fleet_ingress.lifecycle")


class KeptAdminSocket:
    """The admin socket served (by `web`) at its path, and what was last said
    of it. Set by the supervisor's start once it serves there."""

    def __init__(self, web: WebSites) -> None:
        self._web = web
        self.admin_socket: Path | None = None
        self._admin_socket_id: tuple[int, int] | None = None
        self._admin_sock: socket.socket | None = None
        self._admin_socket_trouble: str | None = None  # said once (`keep_admin_socket`)

    async def keep_admin_socket(self, stopping: bool) -> None:
        """The admin socket made again at its path once its file is gone (an
        operator's rm, systemd-tmpfiles; its directory too, where this process
        can make it: not /run/fleet-ingress under the shipped unit, said so): a Unix
        socket whose file is gone cannot be connected to, and `stat`, drain,
        add-fleet and upgrade said "Is fleet-ingress running?" until a restart
        (the resources audit of session 34). Connections open go on. Another
        file put at the path is never replaced: said once, as is a socket that
        cannot be made (tried again each time)."""
        path, old = self.admin_socket, self._admin_sock
        if path is None or old is None or stopping:
            return
        found = socket_file_id(path)
        if found is not None:
            if found != self._admin_socket_id:
                self._admin_socket_troubled(
                    path,
                    "another file is at its path now: it is left alone, and the "
                    "ingress cannot be reached there until that file is removed",
                )
            else:
                self._admin_socket_trouble = None
            return
        if (unseen := _not_looked_at(path)) is not None:
            # Not gone, for all this process knows: a directory on the way it
            # may no longer enter (its mode changed). Said "its file was
            # removed" and tried to make it, which failed the same way.
            self._admin_socket_troubled(
                path,
                f"its file cannot be looked at ({unseen}): a directory on its way "
                "is closed to this process now (its mode or owner changed?); the "
                "file is left as it is, and looked at again each second",
            )
            return
        directory_gone = not path.parent.is_dir()
        try:
            new = bind_admin_socket(path)
        except OSError as exc:
            if directory_gone and not path.parent.is_dir():
                self._admin_socket_troubled(path, _admin_directory_not_made(path, exc))
            else:
                self._admin_socket_troubled(path, f"its file was removed and {exc}")
            return
        try:
            await self._web.serve_kept_on(old, new)
        except BaseException as exc:
            new.close()
            with contextlib.suppress(OSError):
                path.unlink()  # ours, unserved: made again next time
            if not isinstance(exc, Exception):
                raise
            self._admin_socket_troubled(path, f"its file was removed and {exc}")
            return
        self._admin_sock, self._admin_socket_id = new, socket_file_id(path)
        old.close()
        self._admin_socket_trouble = None
        log.warning(
            "admin socket removed while running (rm, systemd-tmpfiles, its directory "
            "removed): made again",
            extra=fields(path=str(path)),
        )

    def _admin_socket_troubled(self, path: Path, trouble: str) -> None:
        if trouble != self._admin_socket_trouble:
            self._admin_socket_trouble = trouble
            log.error(
                "admin socket unreachable: fleet-ingress stat, drain, add-fleet and "
                "upgrade cannot reach this ingress",
                extra=fields(path=str(path), why=trouble),
            )

    @property
    def sock(self) -> socket.socket | None:
        """The socket served there (kept over an upgrade's exec)."""
        return self._admin_sock

    def serving(self, sock: socket.socket) -> None:
        """`sock` is the admin socket served from now on (closed at close)."""
        self._admin_sock = sock

    def served_at(self, path: Path) -> None:
        """It is served at `path`: kept there from now on."""
        self.admin_socket = path
        self._admin_socket_id = socket_file_id(path)

    def remove_own(self) -> None:
        """At close: its file, if it is still the one this process made."""
        if self.admin_socket is not None:
            remove_own_socket(self.admin_socket, self._admin_socket_id)


def _not_looked_at(path: Path) -> str | None:
    """Why `path` cannot be looked at (stat fails other than for its absence),
    or None: it is there, or gone."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


def _admin_directory_not_made(path: Path, exc: OSError) -> str:
    """Why the admin socket's directory, removed, is not made again, and what
    makes it: bind_admin_socket's own words ask for another listen.admin_socket,
    which fixes nothing here. Under the shipped unit (User=fleet-ingress,
    ProtectSystem=strict) /run is read-only to the service: its
    RuntimeDirectory= was the one place it could write there, and is gone
    (the review of session 34)."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return (
        f"its directory {path.parent} was removed, and this process cannot make it "
        f"again ({reason}): `systemctl restart fleet-ingress` makes it (the calls "
        "drain first); under the shipped unit /run is read-only to the service "
        "(ProtectSystem=strict), so a directory made by hand does not do. Calls go "
        "on meanwhile, and `systemctl reload` (SIGHUP) works"
    )
