"""Parsing and formatting of `host:port` addresses (listeners, upstreams, fleet URLs)."""

from __future__ import annotations

import functools
import ipaddress
import re

# One DNS label (letters, digits, hyphen; underscore too, since internal names use it).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_FORMS = "write it as HOST:PORT or [IPv6]:PORT, e.g. 0.0.0.0:443 or [::]:443"
# An IPv6 zone: an interface's name or index, as Linux takes it (at most 15
# bytes; no '/', ':' or space), in printable ASCII: a fleet's default name is
# its host, shown in a terminal, where an escape sequence would act.
_ZONE = re.compile(r"[!-.0-9;-~]{1,15}")


class OtherIPv4Spelling(ValueError):
    """A host that resolvers read as an IPv4 address written another way
    (127.1, 127.000.0.1): `address` is the one spelling taken."""

    def __init__(self, host: str, address: str) -> None:
        octal = " (a part with a leading 0 is octal)" if re.search(r"(^|\.)0\d", host) else ""
        super().__init__(f"has {host!r}, which resolvers read as the IPv4 address {address}{octal}")
        self.host, self.address = host, address


class UnbracketedIPv6(ValueError):
    """An IPv6 address written without brackets: `forms` are what it can have
    meant, (address, port or None), the likelier first."""

    def __init__(self, text: str) -> None:
        forms: list[tuple[str, int | None]] = []
        address, _, port = text.rpartition(":")
        if port.isascii() and port.isdigit() and 0 < int(port) <= 65535 and _is_ipv6(address):
            forms.append((address, int(port)))
        if _is_ipv6(text):
            forms.append((text, None))
        super().__init__("is an IPv6 address without brackets")
        self.forms = forms


def _is_ipv6(text: str) -> bool:
    if ":" in text.partition("%")[2]:
        return False  # a zone (an interface) has no ':'
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


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
            raise UnbracketedIPv6(text)
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
            if (read := ipv4_as_resolvers_read(host)) is not None:
                raise OtherIPv4Spelling(host, read) from None
            raise ValueError(f"has {host!r}, which is not a valid IPv4 address") from None


def ipv4_as_resolvers_read(host: str) -> str | None:
    """The IPv4 address `host` is to the C library's resolver (inet_aton, which
    getaddrinfo uses before any lookup), dotted; None for a name. Resolvers take
    more spellings than one: hexadecimal (0x7f.0.0.1), octal (0177.0.0.1, and
    127.010.0.1 is 127.8.0.1), and fewer parts (127.1, 2130706433). No lookup
    is made: these are literals, connected to without DNS."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        text = part.lower()
        if text.startswith("0x"):
            base, digits = 16, text[2:]
        elif text.startswith("0") and len(text) > 1:
            base, digits = 8, text[1:]
        else:
            base, digits = 10, text
        if not digits or not all(c in "0123456789abcdef"[:base] for c in digits):
            return None
        values.append(int(digits, base))
    # The last part fills what the others leave: a.b.c.d, a.b.c (16 bits), a.b (24), a (32).
    *leading, last = values
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    number = last
    for at, value in enumerate(leading):
        number |= value << (8 * (3 - at))
    return ".".join(str(number >> shift & 0xFF) for shift in (24, 16, 8, 0))


def same_host_key(host: str) -> str:
    """`host` as two fleets at one address compare without a lookup: an IPv4
    address in any spelling its dotted form (the rest arrives normalised:
    lower case, IPv6 in RFC 5952's form)."""
    return ipv4_as_resolvers_read(host) or host


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


# Asked of a fleet's host at every call's connect: a few fleets, parsed once each.
@functools.lru_cache(maxsize=1024)
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
