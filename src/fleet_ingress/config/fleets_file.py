"""The fleets file: one fleet a line, `URL [name=NAME] [maxconn=N] [admin=STATE]`.

`#` starts a comment. `admin=drain` or `admin=maint` records an operator's
admin state (see `fleet_ops`), so that it holds across reloads and restarts;
a fleet without it is READY.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from fleet_ingress.config.atomic import backup_of
from fleet_ingress.config.read_hints import PERMISSION_DENIED
from fleet_ingress.core.addresses import (
    OtherIPv4Spelling,
    UnbracketedIPv6,
    format_hostport,
    same_host_key,
    split_hostport,
)
from fleet_ingress.core.fleet_spec import MAX_MAXCONN, Admin, FleetSpec

_DEFAULT_PORTS = {"http": 80, "https": 443}
# What ends a line of the fleets file (not str.splitlines(): see parse_fleets_text).
LINE_END = re.compile(r"\r\n|\r|\n")
_URL_FORM = "write it as https://HOST[:PORT]"
# A name is typed in admin commands and shown in metrics labels: no spaces, and no
# leading '-' so it is never mistaken for a command-line option. The default name
# (host[:port], v6 in brackets) must fit too.
_NAME = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9._:\[\]-]*")
# As long as a default name can be (a full DNS name, 253, with ":port"; an
# IPv6 one is shorter, its zone an interface of at most 15 characters): a
# longer one stretched every stat row and metric series, and past 8 KiB made
# the admin commands that name it fail (the scale audit of session 16).
MAX_NAME = 259


class FleetsFileError(ValueError):
    """An unreadable fleets file or a bad line; the message says where, what and how to fix it."""


class _BadToken(Exception):
    def __init__(
        self, token: str, problem: str, *, endpoint: tuple[str, int] | None = None
    ) -> None:
        self.token, self.problem = token, problem
        self.endpoint = endpoint  # the host and port a refused line means, when known


def parse_fleets_text(
    text: str, *, default_maxconn: int, source: str = "fleets file"
) -> list[FleetSpec]:
    specs: list[FleetSpec] = []
    problems: list[str] = []  # every bad line, as the config check reports every problem
    name_lines: dict[str, int] = {}
    # The line each host and port is on, and that line's fleet (None: refused itself).
    endpoint_lines: dict[tuple[str, int], tuple[int, FleetSpec | None]] = {}
    # A byte-order mark, as some Windows editors save UTF-8: not part of line 1's URL.
    # At LF, CRLF or CR, as editors and grep -n count: str.splitlines() also
    # ends a line at U+2028, U+2029 and U+0085, and read the rest of a comment
    # holding one as a fleet.
    for lineno, line in enumerate(LINE_END.split(text.removeprefix("\ufeff")), start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        try:
            spec, name_token = _parse_line(tokens, default_maxconn)
            # The same host twice (even as https://x and https://x:443) would silently
            # double its share of calls and its maxconn.
            if (endpoint := (spec.host, spec.port)) in endpoint_lines:
                raise _BadToken(tokens[0], _listed_already(*endpoint_lines[endpoint]))
            if spec.name in name_lines:
                raise _BadToken(
                    name_token,
                    f"repeats the name of the fleet on line {name_lines[spec.name]}; "
                    "give each fleet a unique name=NAME",
                )
        except _BadToken as bad:
            problem = bad.problem
            if bad.endpoint is not None:
                if bad.endpoint in endpoint_lines:  # a trailing dot: and a second listing
                    problem += f"; and it {_listed_already(*endpoint_lines[bad.endpoint])}"
                else:
                    endpoint_lines[bad.endpoint] = (lineno, None)
            problems.append(f"{source} line {lineno}: {_shown(bad.token)!r} {problem}")
            continue
        name_lines[spec.name] = lineno
        endpoint_lines[endpoint] = (lineno, spec)
        specs.append(spec)
    if problems:
        raise FleetsFileError("\n".join(problems))
    return specs


def _listed_already(lineno: int, spec: FleetSpec | None) -> str:
    """Why a second line for one host is refused, naming the first and the fix."""
    if spec is None:
        return f"is already listed on line {lineno}; list it once"
    return (
        f"is already listed on line {lineno}, as fleet {spec.name!r} ({spec.url}): one "
        "host, one maxconn (each line would get its own, and the host twice its calls); "
        f"drop this line (raise maxconn= on line {lineno} for more calls)"
    )


def same_host_warnings(specs: Iterable[FleetSpec]) -> list[str]:
    """Fleets that are one host to every resolver though the fleets file takes
    them (no lookup made): an IPv4 address in another spelling (0x7f.0.0.1,
    which resolvers read as 127.0.0.1; the all-decimal ones, 127.1, are
    refused). Said, not refused: such a file started before these were
    recognised, and a refusal would stop its reload or restart; two of one
    host get two maxconn budgets (twice its calls, its 429s) and two probes."""
    warnings = []
    first: dict[tuple[str, int], FleetSpec] = {}
    for spec in specs:
        address = same_host_key(spec.host)
        if address != spec.host:
            warnings.append(
                f"fleet {spec.name!r} ({spec.url}): {spec.host!r} is the IPv4 address "
                f"{address} to every resolver; write {_with_host(spec, address)}"
            )
        if (other := first.setdefault((address, spec.port), spec)) is not spec:
            warnings.append(
                f"fleets {other.name!r} ({other.url}) and {spec.name!r} ({spec.url}) are one "
                f"host, {format_hostport(address, spec.port)}: it gets two maxconn budgets "
                f"({other.maxconn} + {spec.maxconn} calls) and two probes; list it once "
                "(one line, its maxconn= raised for more calls)"
            )
    return warnings


def _with_host(spec: FleetSpec, host: str) -> str:
    explicit = spec.url.rpartition(":")[2].isdigit()
    return f"{spec.scheme}://{format_hostport(host, spec.port if explicit else None)}"


def _shown(token: str) -> str:
    """A bad token as an error quotes it: a line of 100 KB was quoted whole, in
    `check`'s answer and in the log line of the reload it refused."""
    return token if len(token) <= _SHOWN else f"{token[:_SHOWN]}..."


_SHOWN = 300  # the longest good token (a URL of a 253-character name) fits


def _parse_line(tokens: list[str], default_maxconn: int) -> tuple[FleetSpec, str]:
    """Return the fleet and the token its name came from (for duplicate-name errors)."""
    url_token, *options = tokens
    parts = _parse_url(url_token)
    name, name_token, maxconn = parts.default_name, url_token, default_maxconn
    admin = Admin.READY
    given: set[str] = set()
    for token in options:
        key, eq, value = token.partition("=")
        if not eq or key not in ("name", "maxconn", "admin"):
            raise _BadToken(
                token,
                "is not an option; the options are name=NAME, maxconn=N and admin=drain|maint",
            )
        if key in given:
            raise _BadToken(token, f"gives {key}= a second time; give it once")
        given.add(key)
        if key == "name":
            if not _NAME.fullmatch(value):
                raise _BadToken(
                    token, "is not a valid name; use letters, digits and . _ : - (e.g. name=fleet1)"
                )
            if len(value) > MAX_NAME:
                raise _BadToken(
                    f"{token[:40]}...",
                    f"is a name of {len(value)} characters; give one of {MAX_NAME} at most",
                )
            name, name_token = value, token
        elif key == "admin":
            try:
                admin = Admin(value.upper())
            except ValueError:
                raise _BadToken(
                    token, "is not an admin state; write admin=drain or admin=maint, or drop it"
                ) from None
        else:
            if not (value.isascii() and value.isdigit()) or not value.strip("0"):
                raise _BadToken(token, "is not a valid maxconn; write maxconn=N with N >= 1")
            # More digits than int() reads (4,300) raised a bare ValueError:
            # `check` printed a traceback, a reload logged one, naming no line.
            digits = value.lstrip("0")
            if len(digits) > len(str(MAX_MAXCONN)) or int(digits) > MAX_MAXCONN:
                raise _BadToken(token, f"is not a valid maxconn; give N from 1 to {MAX_MAXCONN}")
            maxconn = int(digits)
    spec = FleetSpec(
        parts.url, name, parts.scheme, parts.host, parts.port, parts.host_header, maxconn, admin
    )
    return spec, name_token


class _URLParts(NamedTuple):
    scheme: str
    host: str  # lower case, an IPv6 zone kept as written
    port: int  # explicit, else 80/443
    host_header: str  # host[:port], the port only if written, no zone (RFC 6874 section 4)
    url: str  # as it is written back
    default_name: str  # host[:port] as written, the zone kept (fleets on two links differ)


def _parse_url(token: str) -> _URLParts:
    try:
        parts = urlsplit(token)
    except ValueError:  # e.g. an unclosed '[' in the host
        raise _BadToken(token, f"is not a valid URL; {_URL_FORM}") from None
    if parts.scheme not in _DEFAULT_PORTS or not token.lower().startswith(parts.scheme + "://"):
        raise _BadToken(token, f"is not an http:// or https:// URL; {_URL_FORM}")
    if "@" in parts.netloc:
        raise _BadToken(token, f"has a user name or password, which fleets never take; {_URL_FORM}")
    # The carrier's path and query are forwarded as they are, so a fleet URL cannot add its own.
    if parts.path not in ("", "/") or "?" in token:
        raise _BadToken(
            token, f"has a path or query; the carrier's path is forwarded as is, so {_URL_FORM}"
        )
    netloc = _zone_unescaped(parts.netloc)
    try:
        host, port = split_hostport(netloc)
    except OtherIPv4Spelling as exc:
        written = f"{parts.scheme}://{format_hostport(exc.address, _port_of(netloc))}"
        raise _BadToken(token, f"{exc}; write {written}") from None
    except UnbracketedIPv6 as exc:
        if not exc.forms:
            raise _BadToken(token, f"{exc}; {_URL_FORM}, an IPv6 HOST in [ ]") from None
        fixes = " or ".join(
            f"{parts.scheme}://{format_hostport(_url_host(address), port)}"
            for address, port in exc.forms
        )
        raise _BadToken(token, f"{exc}; write {fixes} (an IPv6 address in [ ])") from None
    except ValueError as exc:
        if (dotless := _without_trailing_dot(netloc)) is not None:
            host, port = dotless
            written = f"{parts.scheme}://{format_hostport(host.lower(), port)}"
            raise _BadToken(
                token,
                f"has {host + '.'!r}, a host name with a trailing dot; write {written}: one "
                "spelling per host (TLS's SNI, certificates and the Host header never carry "
                "the dot, and /etc/hosts names do not match it)",
                endpoint=(host.lower(), port or _DEFAULT_PORTS[parts.scheme]),
            ) from None
        raise _BadToken(token, f"{exc}; {_URL_FORM}") from None
    if port == 0:
        raise _BadToken(token, f"has port 0; {_URL_FORM} with PORT from 1 to 65535")
    address, percent, zone = host.partition("%")
    if ":" in address and (mapped := ipaddress.IPv6Address(address).ipv4_mapped):
        # An https fleet's certificate was checked for '::ffff:127.0.0.1' (never UP);
        # refused for http too, as listen.* refuses it: one spelling per address.
        raise _BadToken(
            token,
            f"has {address}, an IPv4 address written as IPv6, which no certificate "
            f"names; write {parts.scheme}://{format_hostport(str(mapped), port)}",
        )
    # Host names are case-insensitive; lower case keeps names, SNI and duplicates
    # consistent. An IPv6 zone is an interface's name, which is not (enP1s0).
    host = address.lower() + percent + zone
    return _URLParts(
        scheme=parts.scheme,
        host=host,
        port=port or _DEFAULT_PORTS[parts.scheme],
        host_header=format_hostport(address.lower(), port),
        url=f"{parts.scheme}://{format_hostport(_url_host(host), port)}",
        default_name=format_hostport(host, port),
    )


def _port_of(netloc: str) -> int | None:
    """The port of a `host[:port]` with no brackets, or None (for a fix's URL)."""
    _, colon, port = netloc.rpartition(":")
    return int(port) if colon and port.isascii() and port.isdigit() else None


def _without_trailing_dot(netloc: str) -> tuple[str, int | None] | None:
    """(host, port) of `netloc` once its host's one trailing dot is dropped,
    when that makes it valid (fleet.example.com.:8443); else None."""
    host, colon, port = netloc.rpartition(":")
    if not colon:
        host, port = netloc, ""
    if not host.endswith(".") or host.endswith(".."):
        return None
    try:
        return split_hostport(host[:-1] + colon + port)
    except ValueError:
        return None


def _zone_unescaped(netloc: str) -> str:
    """An IPv6 zone as a URL writes it (RFC 6874: `[fe80::1%25eth0]`, the '%'
    percent-encoded) as an address writes it (`[fe80::1%eth0]`, which is taken
    too). As curl reads it: '%25' followed by more is the escape (so `%251` is
    zone 1), '%25' alone is zone 25."""
    before, escaped, rest = netloc.partition("%25")
    if not escaped or not before.startswith("[") or "]" in before or rest.startswith("]"):
        return netloc
    zone, bracket, after = rest.partition("]")
    return f"{before}%{unquote(zone)}{bracket}{after}"


def _url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 zone's '%' escaped (RFC 6874), so the
    fleets file written back reads as the same zone."""
    return host.replace("%", "%25", 1)


def load_fleets_file(path: Path, *, default_maxconn: int) -> list[FleetSpec]:
    data = b""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetsFileError(
            f"{path}: cannot read the fleets file: {_why(exc, data, path)}"
        ) from None
    return parse_fleets_text(text, default_maxconn=default_maxconn, source=str(path))


def url_default_name(url: str) -> str:
    """The name a fleet at `url` (a FleetSpec's) gets when none is given."""
    return _parse_url(url).default_name


def format_fleets_text(specs: Iterable[FleetSpec], *, default_maxconn: int | None = None) -> str:
    """Render specs so that parse_fleets_text gives them back.

    With default_maxconn, a fleet at the default gets no `maxconn=`, so it keeps following
    `fleets.maxconn` when that changes later instead of being pinned to today's value.
    """
    lines = []
    for spec in specs:
        words = [spec.url]
        if spec.name != url_default_name(spec.url):
            words.append(f"name={spec.name}")
        if spec.maxconn != default_maxconn:
            words.append(f"maxconn={spec.maxconn}")
        if spec.admin is not Admin.READY:
            words.append(admin_token(spec.admin))
        lines.append(" ".join(words))
    return "".join(line + "\n" for line in lines)


def admin_token(admin: Admin) -> str:
    return f"admin={admin.value.lower()}"


def _why(exc: OSError | UnicodeDecodeError, data: bytes, path: Path) -> str:
    """Why the fleets file could not be read, and the fix that fits."""
    if isinstance(exc, UnicodeDecodeError):
        line = data.count(b"\n", 0, exc.start) + 1
        return (
            f"line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            "save the file as UTF-8 text"
        )
    if isinstance(exc, PermissionError):
        return PERMISSION_DENIED
    if isinstance(exc, IsADirectoryError):
        return (
            "it is a directory; point fleets.file at the fleets file itself "
            f"(one fleet URL a line), e.g. {path / 'fleets.txt'}"
        )
    if isinstance(exc, FileNotFoundError):
        backup = backup_of(path)
        if backup.exists():  # add-fleet and remove-fleet keep the list before them there
            return (
                f"{exc.strerror}; {backup} holds it as it was before the last add-fleet or "
                "remove-fleet (a drain or maint saved since is not in it): copy it back, "
                "or point fleets.file at the fleets file"
            )
        return f"{exc.strerror}; create it with one fleet URL a line, or point fleets.file at it"
    if isinstance(exc, NotADirectoryError):
        return f"{exc.strerror}: a part of the path is a file; point fleets.file at the fleets file"
    return exc.strerror or str(exc)
