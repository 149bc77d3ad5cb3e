"""What `check` says of the running service's environment: `check` run by hand
reads the shell's FLEET_INGRESS_ variables, and as the unit's ExecReload the
unit's as they are now, while the service runs with those it started with (a
reload or an upgrade's exec keeps them). Asked of the service over its admin
socket (GET /environment), when it answers: a check that read no variable
said nothing of FLEET_INGRESS_FLEETS__MAXCONN=16 in the unit, which the
service served over the file's 32 (session 36)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fleet_ingress.config.settings import IngressConfig, environment_settings, not_a_socket

# Bounded: the unit's ExecReload runs check, and a service whose admin socket
# does not answer must not hold the reload.
ASK_TIMEOUT = 2.0

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
    # Here, not at the top: aiohttp's import is for a check that asks.
    from fleet_ingress.ops.admin_client import AdminUnreachable

    try:
        status, body = asyncio.run(_ask(Path(where)))
    except (AdminUnreachable, TimeoutError, OSError):
        return []
    theirs = body.get("environment")
    if status != 200 or not isinstance(theirs, dict):
        return []  # a release before GET /environment answers 404
    return differences(environment_settings(), theirs, body.get("pid"), where)


async def _ask(socket_path: Path) -> tuple[int, dict[str, Any]]:
    from fleet_ingress.ops.admin_client import admin_request

    async with asyncio.timeout(ASK_TIMEOUT):
        return await admin_request(socket_path, "GET", "/environment")


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
