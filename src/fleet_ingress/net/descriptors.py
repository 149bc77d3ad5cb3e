"""Whether this process's descriptor limit (RLIMIT_NOFILE) holds the calls
limits.max_connections allows, and the warning that says it does not: a call
holds two descriptors (carrier and fleet), and a worker out of them drops new
carriers at accept, so each worker refuses carriers past what its limit holds
(`listener.connections_within`). Said at start (workers inherit the
supervisor's limit), and at a reload that asks more than the limit holds."""

from __future__ import annotations

import logging
import resource

from fleet_ingress.logs import fields
from fleet_ingress.net.acme import ACME_DESCRIPTORS
from fleet_ingress.net.listener import DESCRIPTORS_KEPT, connections_within

log = logging.getLogger("fleet_ingress.server")

SHORT = (
    "descriptor limit below what limits.max_connections needs: each worker refuses "
    "carriers past max_connections_allowed; raise LimitNOFILE (systemd) or ulimit -n"
)


def descriptors_short(max_connections: int, *, acme: bool) -> list[int] | None:
    """[limit, needed] when the limit is below what `max_connections` calls
    need (both sides of each, the worker's own, what the :80 listener may
    hold when `acme`); None when it holds them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * max_connections + DESCRIPTORS_KEPT + (ACME_DESCRIPTORS if acme else 0)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return [soft, needed]


def calls_allowed(short: list[int], max_connections: int, *, acme: bool) -> int:
    """The calls a worker takes within the limit `short` names."""
    acme_descriptors = ACME_DESCRIPTORS if acme else 0
    return connections_within(short[0], max_connections, acme_connections=acme_descriptors)


def say_descriptors_short(short: list[int], max_connections: int, *, acme: bool) -> None:
    log.warning(
        SHORT,
        extra=fields(
            nofile=short[0],
            needed=short[1],
            max_connections=max_connections,
            max_connections_allowed=calls_allowed(short, max_connections, acme=acme),
        ),
    )
