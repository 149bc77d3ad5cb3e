"""One picture of the running ingress, read from the live registry and fleets.

`/stats.json`, the `/stats` page and `fleet-ingress stat` all show this, so
they can never disagree. No I/O.
"""

from __future__ import annotations

import time
from typing import Any

from fleet_ingress import __version__
from fleet_ingress.core.balancer import Balancer, FleetState
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.dispatch import SlotQueue


def fleet_row(
    fleet: FleetState, now: float, capacity_key: str = "fleet_available"
) -> dict[str, Any]:
    probe = fleet.last_probe
    return {
        "name": fleet.name,
        "url": fleet.spec.url,
        "health": fleet.health.value,
        "admin": fleet.admin.value,
        "removing": fleet.removing,
        "eligible": fleet.up and fleet.has_room,
        "full": fleet.full,
        "active": fleet.active,
        "maxconn": fleet.maxconn,
        "reported_available": fleet.reported_available,
        "estimated_available": fleet.estimated_available,
        "last_check": None if probe is None else probe.describe(capacity_key),
        "last_check_passed": None if probe is None else probe.passed,
        "last_check_age_s": (
            None if fleet.last_probe_at is None else round(now - fleet.last_probe_at, 1)
        ),
        "last_check_ms": (
            None if fleet.last_probe_seconds is None else round(fleet.last_probe_seconds * 1000, 1)
        ),
        "checks_total": fleet.probes_total,
        "check_failures": fleet.check_failures,
        "calls_total": fleet.calls_total,
        "responses": {str(code): n for code, n in sorted(fleet.responses.items())},
        "responses_429": fleet.responses.get(429, 0),
        "retries": fleet.retries,
        "redispatches": fleet.redispatches,
    }


def snapshot(
    balancer: Balancer,
    registry: Registry,
    dispatcher: SlotQueue,
    *,
    started_at: float,
    certificate_not_after: float | None = None,
    capacity_key: str = "fleet_available",
    stopping: bool = False,
) -> dict[str, Any]:
    now = time.time()
    to_fleet, to_carrier = registry.relayed_bytes()
    requests: dict[str, dict[str, int]] = {}
    for (route, status), n in sorted(registry.requests.items()):
        requests.setdefault(route, {})[str(status)] = n
    return {
        "version": __version__,
        "time": now,
        "uptime_s": round(now - started_at, 1),
        # "draining" once a stop has begun: no new calls, the live ones may finish.
        "state": "draining" if stopping else "serving",
        "certificate_not_after": certificate_not_after,
        "frontend": {
            "connections": len(registry.connections),
            "connections_total": registry.connections_total,
            "active_calls": len(registry.tunnels()),
            "queue_length": dispatcher.queue_length,
            "queue_timeouts": dispatcher.queue_timeouts,
            "requests": requests,
            "bytes_from_carrier": to_fleet,
            "bytes_to_carrier": to_carrier,
        },
        "fleets": [fleet_row(f, now, capacity_key) for f in balancer.fleets],
    }
