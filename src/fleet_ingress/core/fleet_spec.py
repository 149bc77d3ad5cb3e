"""What the ingress knows of one fleet before it probes it: its address, name,
maxconn and the operator's admin state. Parsed from the fleets file
(`config.fleets_file`), read by the balancer, the poller and fleet changes."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Admin(enum.Enum):
    """An operator's admin state of a fleet (SPEC 7)."""

    READY = "READY"
    DRAIN = "DRAIN"  # no new calls, probes go on, calls kept
    MAINT = "MAINT"  # no new calls, no probes, calls kept


@dataclass(frozen=True)
class FleetSpec:
    url: str  # normalised: scheme://host[:port] as written back (a zone's "%" as %25), no "/"
    name: str
    scheme: str  # "http" | "https"
    host: str  # no brackets; the TLS SNI and certificate name for https
    port: int  # explicit, else 80/443
    host_header: str  # host[:port] as sent in Host: port only if the URL has one
    maxconn: int
    admin: Admin = Admin.READY  # as the file records it
