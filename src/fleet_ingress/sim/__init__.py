"""Simulators for demos, tests, benchmarks and operators.

- :class:`SimulatedFleet`: a fleet host (WebSocket echo calls with a capacity,
  nginx-style ``429`` when full, ``GET /health/fleet``).
- :func:`run_call` / :func:`run_calls` / :func:`summarize`: simulated carrier
  calls streaming audio frames and measuring loss and round-trip time.
"""

from fleet_ingress.sim.carrier import (
    PROFILES,
    CallResult,
    Profile,
    register_profile,
    run_call,
    run_calls,
    summarize,
)
from fleet_ingress.sim.fleet import MAX_MSG_SIZE, SeenRequest, SimulatedFleet

__all__ = [
    "MAX_MSG_SIZE",
    "PROFILES",
    "CallResult",
    "Profile",
    "SeenRequest",
    "SimulatedFleet",
    "register_profile",
    "run_call",
    "run_calls",
    "summarize",
]
