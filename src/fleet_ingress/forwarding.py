"""The request head sent to a fleet, rebuilt from parsed fields. No I/O.

The carrier's raw bytes are never forwarded: the fleet sees a head we
serialized ourselves from fields h11 validated, so whatever a carrier smuggled
into its head cannot reach the fleet in a shape the fleet reads differently.
"""

from __future__ import annotations

from .request_head import Header, RequestHead

# Hop-by-hop headers (RFC 9110 section 7.6.1) belong to the carrier's
# connection, not to the fleet's. Connection and Upgrade are re-sent below for
# the WebSocket handshake, which is end to end.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Set by us; a carrier's own copies must not reach the fleet.
_REPLACED = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def fleet_request_headers(
    head: RequestHead, *, fleet_host: str, client_ip: str, proto: str = "https"
) -> list[Header]:
    """Headers for the fleet: the carrier's, with Host and X-Forwarded-* set."""
    named_by_connection = head.tokens(b"connection")
    dropped = _HOP_BY_HOP | _REPLACED | named_by_connection
    headers: list[Header] = [(b"Host", fleet_host.encode("ascii"))]
    for name, value in head.headers:
        if name.lower() not in dropped:
            headers.append((name, value))
    # Upgrade is re-sent with the carrier's own value (e.g. "websocket").
    headers.append((b"Connection", b"Upgrade"))
    headers.extend((b"Upgrade", value) for value in head.get_all(b"upgrade"))
    prior = [v.strip() for v in head.get_all(b"x-forwarded-for") if v.strip()]
    headers.append((b"X-Forwarded-For", b", ".join([*prior, client_ip.encode("ascii")])))
    headers.append((b"X-Forwarded-Proto", proto.encode("ascii")))
    headers.append((b"X-Forwarded-Host", head.host))
    return headers
