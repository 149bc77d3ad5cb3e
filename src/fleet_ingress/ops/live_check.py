"""`fleet-ingress check -c CONFIG --live`: may this host hold the shared address?

keepalived runs this every second as its track script (SPEC section 14, and the
keepalived.conf that `init --vip` renders): exit 0 only when the ingress running
on this host completes a TLS handshake and answers its health route on the
carrier listener, and has at least one fleet that can take a new call. Anything
else is one line saying why, and exit 1: keepalived then moves the address to
the peer.

Two questions are asked at once, under one deadline well inside keepalived's
one-second interval (a check that hangs must read as a failure, not stall the
next one):

- the carrier listener (`listen.wss`; a wildcard is reached on loopback): a real
  TLS handshake, then the health route. The certificate is not verified: it names
  the carrier-facing host, not the loopback address this connects to, and what is
  asked is whether this process serves, not whether carriers trust it (`check`
  without `--live` checks the certificate).
- the fleets, from the running ingress's own snapshot: `/stats.json` on the stats
  listener, which is read-only by design, so keepalived's script user needs no
  right to change anything; only when `listen.stats` is disabled, `/stat` over the
  admin socket (the script user then needs the admin socket's group).

The configuration is read leniently: only the four keys the check needs
(`listen.wss`, `listen.stats`, `listen.admin_socket`, `routes.health`, with their
environment overrides), not validated as a whole. A mistake elsewhere in the file,
not yet reloaded, does not make the running ingress any less fit, and a full
validation would let one typo pushed to both hosts take the address off both.
It also keeps pydantic out of a command that starts every second.

Reads only: no file is written and nothing in the ingress changes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import ssl
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import h11

from fleet_ingress.core.addresses import format_hostport, parse_hostport
from fleet_ingress.ops.fleet_display import NOT_PROBED

# The whole check, network included, within this: keepalived starts it every second,
# and the interpreter's start-up comes on top.
LIVE_TIMEOUT = 0.8
# A snapshot of thousands of fleets is still far below this; anything bigger is not ours.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
ENV_PREFIX = "FLEET_INGRESS_"  # as config.settings, which this does not import (pydantic)
# The defaults of config.settings (a test keeps them equal).
DEFAULTS = {
    ("listen", "wss"): "0.0.0.0:443",
    ("listen", "stats"): "127.0.0.1:8404",
    ("listen", "admin_socket"): "/run/fleet-ingress/admin.sock",
    ("routes", "health"): "/haproxy-health",
}


@dataclass(frozen=True)
class LiveSettings:
    """What the check needs to know of the configuration, nothing more."""

    wss: str
    stats: str  # "" disabled
    admin_socket: str  # "" disabled; absolute
    health: str


class LiveConfigError(Exception):
    """The keys the check needs cannot be read; the message is one line."""


def live_settings(path: Path, environ: dict[str, str] | None = None) -> LiveSettings:
    """The four keys, from the file and FLEET_INGRESS_<SECTION>__<KEY> overrides."""
    environ = dict(os.environ) if environ is None else environ
    try:
        # A byte-order mark dropped as config.settings.read_config_text drops it
        # (not imported: this runs each second, on few imports).
        data = tomllib.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
    except OSError as exc:
        raise LiveConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LiveConfigError(f"{path}: not valid TOML: {exc}") from None
    # Section and variable names in any case, as `run` (pydantic-settings) reads them.
    sections = {name.lower(): table for name, table in data.items()}
    variables = {name.upper(): value for name, value in environ.items()}
    values: dict[str, str] = {}
    for (section, key), default in DEFAULTS.items():
        table = sections.get(section, {})
        value = table.get(key, default) if isinstance(table, dict) else default
        value = variables.get(f"{ENV_PREFIX}{section.upper()}__{key.upper()}", value)
        if not isinstance(value, str):
            raise LiveConfigError(f"{path}: {section}.{key}: {value!r} is not a quoted string")
        values[key] = value
    for key in ("wss", "stats"):
        if values[key] or key == "wss":
            try:
                parse_hostport(values[key], what=f"listen.{key}")
            except ValueError as exc:
                raise LiveConfigError(f"{path}: {exc}") from None
    admin = values["admin_socket"]
    if admin and not Path(admin).is_absolute():
        admin = str(path.parent.absolute() / admin)  # relative to the file, as settings does
    return LiveSettings(values["wss"], values["stats"], admin, values["health"])


class NotLive(Exception):
    """One part of the check failed; the message is the reason, one line."""


# Said of a refused connect, unless the other listener answered: then the
# ingress runs, and the file names another address than it listens on.
_NOT_RUNNING = " (is fleet-ingress running?)"


class _Refused(NotLive):
    """A connect refused: `what` and its reason, the hint said apart."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}{_NOT_RUNNING}")
        self.what, self.why = what, why

    @property
    def key(self) -> str:
        """The listen key refused ("wss", "stats"; "admin" for the admin socket):
        the first word of `what`."""
        return self.what.split()[0]

    def with_the_other_answering(self, other: str) -> str:
        return (
            f"{self.what}: {self.why}, while {other} answers: the ingress runs, and "
            f"listen.{self.key} in the file is not where it listens (an edit takes a restart)"
        )


class _HungUp(Exception):
    """The listener closed the connection before any answer."""


@dataclass(frozen=True)
class LiveResult:
    live: bool
    line: str


def local_target(address: str) -> tuple[str, int]:
    """Where to connect for a listener configured as `address`: a wildcard is
    reached on loopback (the listener accepts there too). [::] on a host whose
    lo has no ::1 (disable_ipv6=1) on 127.0.0.1, which it takes too: before
    (the IPv6 audit of session 33), `check --live` said 'not live: Cannot
    assign requested address' of an ingress serving IPv4 carriers there, and
    keepalived would take the shared address off it."""
    host, port = parse_hostport(address, what="address")
    if host == "::" and not _has_ipv6_loopback():
        return "127.0.0.1", port
    return _LOOPBACK.get(host, host), port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def local_addresses(fib_trie: str, if_inet6: str) -> set[str]:
    """The addresses of this host (this network namespace), from the kernel's
    /proc/net/fib_trie (IPv4: "/32 host LOCAL" under an address) and
    /proc/net/if_inet6 (IPv6: the first field, 32 hex digits); a link-local
    address also with its zone, as listen.wss writes it (fe80::10%eth0, by the
    interface's name or index: the last field and the second). Pure."""
    found: set[str] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text.startswith("/32 host LOCAL") and last:
            found.add(last)
    for line in if_inet6.splitlines():
        if (field := line.split()[:1]) and len(field[0]) == 32:
            address = ipaddress.IPv6Address(int(field[0], 16))
            found.add(str(address))
            if address.is_link_local and len(fields := line.split()) == 6:
                found.add(f"{address}%{fields[5]}")
                found.add(f"{address}%{int(fields[1], 16)}")
    return found


def is_this_hosts(host: str) -> bool:
    """Would a connection to `host` stay on this host? Loopback does; a named
    address only while this host has it. Unknown (a name, no /proc): assume so."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True
    if address.is_loopback:
        return True
    try:
        fib = Path("/proc/net/fib_trie").read_text()
        inet6 = Path("/proc/net/if_inet6").read_text() if address.version == 6 else ""
    except OSError:
        return True
    return str(address) in local_addresses(fib, inet6)


def judge_fleets(snapshot: dict[str, Any]) -> tuple[bool, str]:
    """Can the ingress that took `snapshot` give a new call to a fleet? Pure.

    A fleet counts when its health is UP and its admin state READY (and it is not
    being removed). FULL counts: capacity is the fleets' own word and the peer
    host sees the same fleets, so moving the address would not add a free worker.
    """
    if snapshot.get("state") == "draining":
        return False, "the ingress is stopping (draining): it refuses new calls"
    fleets = snapshot.get("fleets")
    if not isinstance(fleets, list) or not fleets:
        return False, "the ingress reports no fleet"
    ready = [
        f
        for f in fleets
        if f.get("health") == "UP" and f.get("admin") == "READY" and not f.get("removing")
    ]
    if not ready:
        states = ", ".join(_fleet_state(f) for f in fleets)
        return False, f"no fleet UP and READY ({states})"
    names = ", ".join(str(f.get("name")) + (" FULL" if f.get("full") else "") for f in ready)
    return True, f"{len(ready)} of {len(fleets)} fleets UP ({names})"


def _fleet_state(fleet: dict[str, Any]) -> str:
    # MAINT: not probed, its last health stale (as `stat` shows it: ops.fleet_display).
    health = NOT_PROBED if fleet.get("admin") == "MAINT" else fleet.get("health")
    state = f"{fleet.get('name')} {health}"
    if fleet.get("admin") != "READY":
        state += f" {fleet.get('admin')}"
    return state + (" being removed" if fleet.get("removing") else "")


def run_live_check(
    config_path: Path, out: TextIO | None = None, *, timeout: float = LIVE_TIMEOUT
) -> int:
    """Print one line and return 0 (live) or 1 (not live)."""
    out = out or sys.stdout
    result = live_check(config_path, timeout=timeout)
    print(result.line, file=out)
    return 0 if result.live else 1


def live_check(config_path: Path, *, timeout: float = LIVE_TIMEOUT) -> LiveResult:
    try:
        config = live_settings(config_path)
    except LiveConfigError as exc:
        return LiveResult(False, f"not live: {exc}")
    return asyncio.run(_live(config, timeout))


async def _live(config: LiveSettings, timeout: float) -> LiveResult:
    health = _bounded(_health_route(config), timeout, f"wss {_shown(config.wss)}")
    fleets = _bounded(_snapshot(config), timeout, _snapshot_source(config))
    answers = await asyncio.gather(health, fleets, return_exceptions=True)
    reasons = [str(a) for a in answers if isinstance(a, NotLive)]
    refused = [a for a in answers if isinstance(a, _Refused)]
    if len(refused) == 1 and len(reasons) == 1 and refused[0].key in ("wss", "stats"):
        # The other part answered: "is fleet-ingress running?" would mislead.
        (it,) = refused
        snapshot = answers[1]
        if isinstance(snapshot, dict) and snapshot.get("state") == "draining":
            reasons = [f"{it.what}: {it.why}: " + judge_fleets(snapshot)[1]]
        else:
            other = f"wss {_shown(config.wss)}" if snapshot is it else _snapshot_source(config)
            reasons = [it.with_the_other_answering(other)]
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, NotLive):
            raise answer
    if not reasons:
        snapshot = answers[1]
        assert isinstance(snapshot, dict)
        ok, why = judge_fleets(snapshot)
        if ok:
            where = _shown(config.wss)
            return LiveResult(True, f"live: wss {where} answers {config.health}; {why}")
        reasons.append(why)
    return LiveResult(False, "not live: " + "; ".join(reasons))


async def _bounded(work: Any, timeout: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        raise NotLive(f"{what}: no answer within {timeout:g} s") from None
    except ssl.SSLError as exc:
        raise NotLive(f"{what}: TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        # asyncio words a refused connect "Connect call failed (addr)": say it plainly.
        why = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        if isinstance(exc, ConnectionRefusedError):
            raise _Refused(what, why) from None
        raise NotLive(f"{what}: {why}") from None
    except _HungUp:
        raise NotLive(f"{what}: closed the connection without an answer") from None
    except h11.ProtocolError as exc:
        raise NotLive(f"{what}: not an HTTP answer: {exc}") from None


def _shown(address: str) -> str:
    return format_hostport(*local_target(address))


def _snapshot_source(config: LiveSettings) -> str:
    if config.stats:
        return f"stats {_shown(config.stats)}"
    if config.admin_socket:
        return f"admin socket {config.admin_socket}"
    return "fleets"


async def _health_route(config: LiveSettings) -> None:
    host, port = local_target(config.wss)
    context = ssl.create_default_context()
    # Loopback is not the name on the certificate; the handshake itself is the test.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if not is_this_hosts(host):
        # listen.wss naming the shared address itself (bound with ip_nonlocal_bind):
        # on the backup host the other host would answer, and this one look fit.
        raise NotLive(
            f"wss {format_hostport(host, port)}: not an address of this host now, so "
            'another host would answer; listen on a wildcard, listen.wss = "0.0.0.0:443"'
        )
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    status, body = await _get(reader, writer, _host_header(host, port), config.health)
    if status != 200:
        shown = body[:60].decode("utf-8", "replace").strip()
        raise NotLive(
            f"wss {format_hostport(host, port)}: {config.health} answered {status}"
            + (f" {shown!r}" if shown else "")
        )


def _host_header(host: str, port: int) -> str:
    """Host for a listener at `host`: a zone left out (RFC 6874 section 4; the
    ingress answers 'Host is not host[:port]' to [fe80::10%ve0]:8443)."""
    return format_hostport(host.partition("%")[0], port)


async def _snapshot(listen: LiveSettings) -> dict[str, Any]:
    if listen.stats:
        host, port = local_target(listen.stats)
        reader, writer = await asyncio.open_connection(host, port)
        where, path = f"stats {format_hostport(host, port)}", "/stats.json"
        status, body = await _get(reader, writer, _host_header(host, port), path)
    elif listen.admin_socket:
        reader, writer = await asyncio.open_unix_connection(listen.admin_socket)
        where, path = f"admin socket {listen.admin_socket}", "/stat"
        status, body = await _get(reader, writer, "ingress", path)
    else:
        raise NotLive(
            "listen.stats and listen.admin_socket are both disabled: the live check reads "
            'the fleets from one of them; enable listen.stats = "127.0.0.1:8404"'
        )
    if status != 200:
        raise NotLive(f"{where}: {path} answered {status}")
    try:
        snapshot = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise NotLive(f"{where}: {path} is not JSON") from None
    if not isinstance(snapshot, dict):
        raise NotLive(f"{where}: {path} is not a JSON object")
    return snapshot


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str
) -> tuple[int, bytes]:
    """One GET on a fresh connection, closed after: (status, body)."""
    conn = h11.Connection(h11.CLIENT)
    try:
        request = h11.Request(
            method="GET",
            target=path,
            headers=[("Host", host), ("Connection", "close"), ("User-Agent", "fleet-ingress")],
        )
        writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        status, body, size = 0, bytearray(), 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data and not status:
                    raise _HungUp
                size += len(data)
                if size > MAX_ANSWER_BYTES:
                    raise NotLive(f"{host}{path}: answer larger than {MAX_ANSWER_BYTES} bytes")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, bytes(body)
    finally:
        writer.close()
