"""What `check` says of the running service's environment: `check` run by hand
reads the shell's FLEET_INGRESS_ variables, and as the unit's ExecReload the
unit's as they are now, while the service runs with those it started with (a
reload or an upgrade's exec keeps them). Asked of the service over its admin
socket (GET /environment), when it answers: a check that read no variable
said nothing of FLEET_INGRESS_FLEETS__MAXCONN=16 in the unit, which the
service served over the file's 32 (session 36)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from fleet_ingress.config.settings import IngressConfig, environment_settings
from fleet_ingress.config.unix_socket import not_a_socket

# Bounded: the unit's ExecReload runs check, and a service whose admin socket
# does not answer must not hold the reload.
ASK_TIMEOUT = 2.0
# An answer past this is no answer of ours (a few hundred bytes).
MAX_ANSWER = 1 << 20

# How the service's environment is changed, and why a restart.
_FIX = (
    "the service keeps the environment it started with over a reload or an upgrade: set it "
    "in the unit (`systemctl show fleet-ingress -p Environment`, its Environment= or a "
    "drop-in), then restart the service"
)


def service_environment_lines(config: IngressConfig) -> list[str]:
    """One line for each FLEET_INGRESS_ setting whose value differs between
    this process's environment and the running service's (asked at
    config.listen.admin_socket); none when the service does not answer (not
    running, not ours to ask, a release without GET /environment)."""
    where = config.listen.admin_socket
    if not where or not os.path.exists(where) or not_a_socket(Path(where)) is not None:
        return []
    try:
        status, body = _ask(where)
    except (OSError, ValueError, http.client.HTTPException):  # none in time, not ours, not JSON
        return []
    theirs = body.get("environment") if isinstance(body, dict) else None
    if status != 200 or not isinstance(theirs, dict):
        return []  # a release before GET /environment answers 404
    return differences(environment_settings(), theirs, body.get("pid"), where)


class _ByDeadline(socket.socket):
    """A socket whose every wait ends by `deadline` (time.monotonic()): a
    timeout alone bounds each read, and a peer that sends a byte at a time
    held check (the unit's ExecReload) for as long as the bytes came."""

    deadline = 0.0

    def _left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer in time")
        self.settimeout(left)

    def connect(self, address: Any) -> None:
        self._left()
        super().connect(address)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._left()
        super().sendall(data, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._left()
        return super().recv_into(buffer, nbytes, flags)


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, deadline: float) -> None:
        super().__init__("ingress", timeout=ASK_TIMEOUT)
        self.unix_path = path
        self.deadline = deadline

    def connect(self) -> None:
        sock = _ByDeadline(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.deadline = self.deadline
        self.sock = sock
        sock.connect(self.unix_path)


def _ask(where: str) -> tuple[int, Any]:
    """GET /environment, blocking, all of it within ASK_TIMEOUT (http.client,
    not aiohttp: its import alone was a third of a second of every check)."""
    connection = _UnixHTTP(where, time.monotonic() + ASK_TIMEOUT)
    try:
        connection.request("GET", "/environment")
        response = connection.getresponse()
        body = response.read(MAX_ANSWER)
        return response.status, json.loads(body)
    finally:
        connection.close()


def differences(ours: dict[str, str], theirs: dict[str, Any], pid: object, where: str) -> list[str]:
    service = f"the running service (pid {pid}, admin socket {where})"
    lines = []
    for name in sorted(ours.keys() | theirs.keys()):
        here, there = ours.get(name), theirs.get(name)
        if here == there:
            continue
        shown = ascii(name)[1:-1]  # a control character must not act where this is printed
        if here is None:
            said = (
                f"{service} has {shown}={there!r} in its environment, this check's has not: the "
                "service serves that value over the file's, whatever this check said of the file"
            )
        elif there is None:
            said = (
                f"this check's environment has {shown}={here!r}, {service}'s has not: the "
                "service serves the file's value, not the one this check judged"
            )
        else:
            said = (
                f"{shown} is {here!r} in this check's environment but {there!r} in {service}'s: "
                f"the service serves {there!r}"
            )
        lines.append(f"environment: {said}; {_FIX}")
    return lines
