"""Parsing and formatting of `host:port` addresses (listeners, upstreams, fleet URLs)."""

from __future__ import annotations

import ipaddress
import re

# One DNS label (letters, digits, hyphen; underscore too, since internal names use it).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_FORMS = "write it as HOST:PORT or [IPv6]:PORT, e.g. 0.0.0.0:443 or [::]:443"
# An IPv6 zone: an interface's name or index, as Linux takes it (at most 15
# bytes; no '/', ':' or space), in printable ASCII: a fleet's default name is
# its host, shown in a terminal, where an escape sequence would act.
_ZONE = re.compile(r"[!-.0-9;-~]{1,15}")


def split_hostport(text: str) -> tuple[str, int | None]:
    """Split `host[:port]` or `[v6][:port]`; the port is None when absent.

    Raises ValueError with the bare problem (no advice), so callers can phrase the fix
    in their own terms (a listener address, a fleet URL).
    """
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("has '[' without a closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"has {rest!r} after the ']'")
        port_text = rest[1:] if rest else None
        try:
            # One spelling per address ([0:0::1] is [::1]): a fleet listed twice is
            # seen as such, and [::0] is the wildcard that takes IPv4 too.
            host = _one_spelling(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"has {host!r} in brackets, which is not an IPv6 address") from None
        address, percent, zone = host.partition("%")
        if percent and not _ZONE.fullmatch(zone):
            raise ValueError(
                f"has zone {zone!r} after {address}%, which is not an interface's name or "
                "index (at most 15 printable ASCII characters; no '/', ':' or space)"
            )
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, None
        if ":" in host:
            raise ValueError("is an IPv6 address without brackets")
        _check_host(host)
    return host, None if port_text is None else _port(port_text)


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("has an empty host")
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or len(host) > 253:
        raise ValueError(f"has {host!r}, which is not a host name or IPv4 address")
    # All-numeric names are IPv4 addresses to every resolver, so they must be valid ones.
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"has {host!r}, which is not a valid IPv4 address") from None


def _port(text: str) -> int:
    if not text:
        raise ValueError("has ':' but no port after it")
    # int() would also take "+80", " 80" and "8_0"; a port is plain ASCII digits.
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ValueError(f"has port {text!r}; a port is a number from 1 to 65535")
    return int(text)


def parse_hostport(text: str, *, what: str) -> tuple[str, int]:
    """Parse `host:port` or `[v6]:port` into (host without brackets, port).

    Port 0 is accepted: it asks the OS for any free port (tests and the demo rely on it).
    """
    try:
        host, port = split_hostport(text)
    except ValueError as exc:
        raise ValueError(f"{what} {text!r} {exc}; {_FORMS}") from None
    if port is None:
        raise ValueError(f"{what} {text!r} has no port; {_FORMS}")
    return host, port


def format_hostport(host: str, port: int | None) -> str:
    """Inverse of split_hostport: brackets around IPv6 hosts, no port when None."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def ip_literal_version(host: str) -> int | None:
    """4 or 6 for an IP literal that needs no lookup; None for a name.

    A fleet at an IP literal needs no ``getaddrinfo``, and asyncio's runs in a
    thread pool: measured here, 130 us of CPU and four context switches per
    call for a literal (uvloop answers a literal itself, in about 2 us). A
    scoped IPv6 literal (``fe80::1%eth0``) is None: its address needs the
    interface's index (``net.tcp_connect.literal_addrinfo`` asks for it)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None
    return address.version


def peer_ip(address: str) -> str:
    """A peer's address as it is written: an IPv4 client of a dual-stack
    listener ("::ffff:203.0.113.7") as IPv4."""
    if address.startswith("::ffff:") and "." in address:
        return address.removeprefix("::ffff:")
    return address


def _one_spelling(address: ipaddress.IPv6Address) -> str:
    """RFC 5952's form, an IPv4-mapped address with its IPv4 part dotted
    (Python 3.11 writes ::ffff:7f00:1)."""
    if (mapped := address.ipv4_mapped) is not None:
        return f"::ffff:{mapped}"
    return address.compressed
