"""What the ingress knows of one fleet before it probes it: its address, name,
maxconn and the operator's admin state. Parsed from the fleets file
(`config.fleets_file`), read by the balancer, the poller and fleet changes."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# The most calls one fleet is given at once (fleets.maxconn, maxconn=): an
# ingress host opens at most 64,512 connections to one fleet address from one
# source address (its source ports); a million is 15 addresses' worth. More is a
# typo's extra zeros (the bounds audit of session 35: 18 digits were taken).
MAX_MAXCONN = 1_000_000


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
    host: str  # no brackets; what is connected to (an IPv6 zone kept: fe80::1%eth0)
    port: int  # explicit, else 80/443
    host_header: str  # host[:port] as sent in Host: port only if the URL has one, no zone
    maxconn: int
    admin: Admin = Admin.READY  # as the file records it

    @property
    def tls_name(self) -> str:
        """The TLS SNI and certificate name for https: the host without an IPv6
        zone, which only this host knows (RFC 6874 section 4); a certificate
        names the address (fe80::1), never an interface."""
        return self.host.partition("%")[0]
