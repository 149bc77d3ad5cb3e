"""The request head sent to a fleet, rebuilt from parsed fields. No I/O.

The carrier's raw bytes are never forwarded: the fleet sees a head we
serialized ourselves from fields h11 validated, so whatever a carrier smuggled
into its head cannot reach the fleet in a shape the fleet reads differently.
"""

from __future__ import annotations

from fleet_ingress.core.request_head import Header, RequestHead

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
        # The settings of an h2c upgrade (RFC 7540 3.2): a call upgrades to
        # WebSocket only, and only "websocket" is sent on as Upgrade.
        b"http2-settings",
    }
)
# Set by us; a carrier's own copies must not reach the fleet. X-Real-IP is set
# to the carrier's address, as a fleet behind nginx reads it; a carrier's
# RFC 7239 Forwarded (for=, proto=, host=) is its own say-so, and is dropped:
# X-Forwarded-For keeps the chain it claims, with the address we saw last.
_REPLACED = frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"forwarded",
    }
)
# A call has no body (a head with one is refused), so a carrier's
# `Expect: 100-continue` asks for nothing; forwarded, a fleet may answer
# `100 Continue` before its 101, which the ingress relays (RFC 9110 15.2) and
# strict WebSocket clients fail the call on (the carrier-edge audit of session 30).
_BODYLESS = frozenset({b"expect"})
# Other claims of the client's address, scheme or original URL, which frameworks
# and modules read as a trusted proxy's word when told to: a carrier's would pass
# for ours (the one proxy in front of the fleet), so none reaches the fleet. The
# address: nginx's realip (real_ip_header is any name), request-ip/Express-style
# lookups, Akamai/Cloudflare/Fastly/GCLB names, Tornado's xheaders (X-Scheme);
# the scheme: X-Scheme, X-Url-Scheme, Front-End-Https (gunicorn/Tornado, paste,
# IIS); the host and URL: X-Original-Host, X-Host, X-Original-URL and X-Rewrite-URL
# (IIS's URL Rewrite and Symfony before 5 routed by them: CVE-2018-14773). The
# carrier's Via is kept: a record of its hops, which no framework reads an
# address, scheme or path from (HAProxy passes it too and adds none).
_CLAIMS = frozenset(
    {
        b"x-client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-proxyuser-ip",
        b"client-ip",
        b"x-original-forwarded-for",
        b"forwarded-for",
        b"x-forwarded",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-scheme",
        b"x-url-scheme",
        b"front-end-https",
        b"x-original-host",
        b"x-host",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | _REPLACED | _BODYLESS | _CLAIMS
# A fleet behind WSGI/CGI reads "X_Forwarded_For" and "X-Forwarded-For" as the
# same variable (HTTP_X_FORWARDED_FOR), so a carrier's underscore spelling of a
# header we set, drop or judge the head by could stand in for ours: it is
# dropped too. (Content-Length itself is forwarded: only "0" gets this far.)
_UNDERSCORE_DROPPED = _NOT_FORWARDED | {b"content-length"}
# The X-Forwarded-* family is the proxy's word on the carrier's connection to it:
# beside ours (For, Proto, Host), a fleet's framework reads -Port, -Prefix, -Ssl,
# -Scheme... as ours too (Werkzeug's ProxyFix, Rack, Spring), and a carrier's
# "X-Forwarded-Port: 80" and "-Prefix: /attach" next to ours made a request's URL
# under ProxyFix "https://calls.test:80/attach/ws/bot". A carrier's are dropped,
# any spelling; its X-Forwarded-For chain is kept, ours appended (SPEC 3.2).
_FORWARDED_FAMILY = b"x-forwarded-"


def _is_dropped(lower: bytes, named_by_connection: frozenset[bytes]) -> bool:
    """Whether the header named `lower` (lowercased) stays with the carrier."""
    if lower in _NOT_FORWARDED or lower in named_by_connection:
        return True
    dashed = lower.replace(b"_", b"-")
    if dashed.startswith(_FORWARDED_FAMILY):
        return True
    return dashed != lower and dashed in _UNDERSCORE_DROPPED


def fleet_request_headers(
    head: RequestHead, *, fleet_host: str, client_ip: str, proto: str = "https"
) -> list[Header]:
    """Headers for the fleet: the carrier's, with Host, X-Forwarded-* and
    X-Real-IP set, and its other claims of its address, scheme or URL dropped."""
    named_by_connection = head.tokens(b"connection")
    headers: list[Header] = [(b"Host", fleet_host.encode("ascii"))]
    for header in head.headers:
        lower = header[0].lower()
        # A name with no underscore and not of the X-Forwarded- family is judged
        # here by the sets (a call's every header), the others by `_is_dropped`.
        if lower in _NOT_FORWARDED or lower in named_by_connection:
            continue
        if lower.find(b"_") >= 0 or lower.startswith(_FORWARDED_FAMILY):
            if _is_dropped(lower, named_by_connection):
                continue
        headers.append(header)
    # The upgrade the call is: a carrier's other tokens ("h2c") would let a
    # fleet that honours them switch to a protocol whose requests the ingress
    # never routes.
    ip = client_ip.encode("ascii")
    # A chain the carrier sent is kept, ours appended: made only when there is
    # one (a comprehension costs some 3,000 instructions made, callgrind).
    prior = head.get_all(b"x-forwarded-for")
    chain = b", ".join([*(v.strip() for v in prior if v.strip()), ip]) if prior else ip
    headers += (
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"X-Forwarded-For", chain),
        (b"X-Forwarded-Proto", proto.encode("ascii")),
        (b"X-Forwarded-Host", head.host),
        (b"X-Real-IP", ip),
    )
    return headers
