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
  TLS handshake, then the health route. The certificate is not verified against a
  name or a CA: it names the carrier-facing host, not the loopback address this
  connects to (`check` without `--live` checks the files). Its dates are: a
  certificate served past its expiry (or before its start) fails every carrier's
  handshake, so the host is not fit, and the peer, serving a valid one, may take
  the address (docs/INSTALL.md section 10 says when that helps and when not). One
  that expires soon still serves every carrier: that is the expiry alert's, not a
  reason to move the address and cut the calls on it.
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

Cheap, since it starts every second on both hosts: blocking sockets under one
deadline, one thread a question, and a few lines of HTTP/1.1 client (the answers
are the ingress's own); no asyncio, h11, pathlib, CA store or the CLI's parser,
which cost two thirds of its CPU time (the pair audit of session 38: 130 to 155 ms
of CPU a run before, about 50 after; docs/INSTALL.md section 10, "What the check
costs"). `fleet_ingress.entry` takes the command's words without argparse.

Reads only: no file is written and nothing in the ingress changes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import tomllib
from typing import Any, NamedTuple, TextIO

from fleet_ingress.core.addresses import format_hostport, parse_hostport
from fleet_ingress.core.served_certificate import certificate_facts

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


class LiveSettings(NamedTuple):
    """What the check needs to know of the configuration, nothing more."""

    wss: str
    stats: str  # "" disabled
    admin_socket: str  # "" disabled; absolute
    health: str


class LiveConfigError(Exception):
    """The keys the check needs cannot be read; the message is one line."""


def live_settings(
    path: str | os.PathLike[str], environ: dict[str, str] | None = None
) -> LiveSettings:
    """The four keys, from the file and FLEET_INGRESS_<SECTION>__<KEY> overrides."""
    environ = dict(os.environ) if environ is None else environ
    try:
        # A byte-order mark dropped as config.settings.read_config_text drops it
        # (not imported: this runs each second, on few imports).
        with open(path, encoding="utf-8") as file:
            data = tomllib.loads(file.read().removeprefix("\ufeff"))
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
    if admin and not os.path.isabs(admin):
        # Relative to the file, as settings does (pathlib not imported: see above).
        admin = os.path.join(os.path.abspath(os.path.dirname(path)), admin)
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


class _NotHTTP(Exception):
    """What came back is not an HTTP/1.1 answer; the message says how."""


class _TooLarge(Exception):
    """The answer passed MAX_ANSWER_BYTES (named with its listener by _bounded)."""


class LiveResult(NamedTuple):
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
        fib = _read("/proc/net/fib_trie")
        inet6 = _read("/proc/net/if_inet6") if address.version == 6 else ""
    except OSError:
        return True
    return str(address) in local_addresses(fib, inet6)


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


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
    # MAINT: not probed, its last health stale (as `stat` shows it). Imported here,
    # on the failing path only.
    from fleet_ingress.ops.fleet_display import NOT_PROBED

    health = NOT_PROBED if fleet.get("admin") == "MAINT" else fleet.get("health")
    state = f"{fleet.get('name')} {health}"
    if fleet.get("admin") != "READY":
        state += f" {fleet.get('admin')}"
    return state + (" being removed" if fleet.get("removing") else "")


def run_live_check(
    config_path: str | os.PathLike[str], out: TextIO | None = None, *, timeout: float = LIVE_TIMEOUT
) -> int:
    """Print one line and return 0 (live) or 1 (not live)."""
    out = out or sys.stdout
    result = live_check(config_path, timeout=timeout)
    print(result.line, file=out)
    return 0 if result.live else 1


def live_check(config_path: str | os.PathLike[str], *, timeout: float = LIVE_TIMEOUT) -> LiveResult:
    try:
        config = live_settings(config_path)
    except LiveConfigError as exc:
        return LiveResult(False, f"not live: {exc}")
    return _live(config, timeout)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """For the next blocking step; TimeoutError once none is left."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


class _Asked(threading.Thread):
    """One question in a thread of its own: its answer, or the exception it raised."""

    def __init__(self, ask: Any, what: str, deadline: _Deadline) -> None:
        super().__init__(daemon=True)  # a name lookup that hangs does not hold the exit
        self.ask, self.what, self.deadline = ask, what, deadline
        self.answer: Any = None
        self.start()

    def run(self) -> None:
        try:
            self.answer = _bounded(self.ask, self.deadline, self.what)
        except BaseException as exc:  # handed to the main thread, which raises the unknown
            self.answer = exc

    def result(self) -> Any:
        # Every socket step is bounded by the deadline; a lookup is not: a little past it,
        # a question still out is as late as any.
        self.join(max(0.0, self.deadline.at - time.monotonic()) + 0.05)
        if self.is_alive():
            return NotLive(f"{self.what}: no answer within {self.deadline.seconds:g} s")
        return self.answer


def _live(config: LiveSettings, timeout: float) -> LiveResult:
    deadline = _Deadline(timeout)
    health = _Asked(lambda: _health_route(config, deadline), f"wss {_shown(config.wss)}", deadline)
    fleets = _Asked(lambda: _snapshot(config, deadline), _snapshot_source(config), deadline)
    answers = [health.result(), fleets.result()]
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


def _bounded(ask: Any, deadline: _Deadline, what: str) -> Any:
    try:
        return ask()
    except TimeoutError:  # socket.timeout too
        raise NotLive(f"{what}: no answer within {deadline.seconds:g} s") from None
    except ssl.SSLError as exc:
        raise NotLive(f"{what}: TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        if isinstance(exc, ConnectionRefusedError):
            raise _Refused(what, why) from None
        raise NotLive(f"{what}: {why}") from None
    except _HungUp:
        raise NotLive(f"{what}: closed the connection without an answer") from None
    except _NotHTTP as exc:
        raise NotLive(f"{what}: not an HTTP answer: {exc}") from None
    except _TooLarge:
        raise NotLive(f"{what}: answer larger than {MAX_ANSWER_BYTES} bytes") from None


def _shown(address: str) -> str:
    return format_hostport(*local_target(address))


def _snapshot_source(config: LiveSettings) -> str:
    if config.stats:
        return f"stats {_shown(config.stats)}"
    if config.admin_socket:
        return f"admin socket {config.admin_socket}"
    return "fleets"


def _client_context() -> ssl.SSLContext:
    # Not ssl.create_default_context(): it loads the system's CA store (a third of
    # the check's CPU once the imports were cut), and nothing here is verified by it.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Loopback is not the name on the certificate; the handshake itself is the test,
    # and the certificate's dates (_health_route).
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _health_route(config: LiveSettings, deadline: _Deadline) -> None:
    host, port = local_target(config.wss)
    if not is_this_hosts(host):
        # listen.wss naming the shared address itself (bound with ip_nonlocal_bind):
        # on the backup host the other host would answer, and this one look fit.
        raise NotLive(
            f"wss {format_hostport(host, port)}: not an address of this host now, so "
            'another host would answer; listen on a wildcard, listen.wss = "0.0.0.0:443"'
        )
    with socket.create_connection((host, port), timeout=deadline.left()) as plain:
        plain.settimeout(deadline.left())
        with _client_context().wrap_socket(plain, do_handshake_on_connect=False) as tls:
            tls.do_handshake()
            _judge_certificate(tls.getpeercert(binary_form=True), host, port)
            request = _request(_host_header(host, port), config.health)
            status, body = _get(tls, deadline, request)
    if status != 200:
        shown = body[:60].decode("utf-8", "replace").strip()
        raise NotLive(
            f"wss {format_hostport(host, port)}: {config.health} answered {status}"
            + (f" {shown!r}" if shown else "")
        )


def _judge_certificate(der: bytes | None, host: str, port: int) -> None:
    """A certificate that carriers refuse for its dates: this host cannot take a call."""
    where = f"wss {format_hostport(host, port)}"
    if not der:
        raise NotLive(f"{where}: served no certificate")
    try:
        facts = certificate_facts(der)
    except ValueError as exc:
        raise NotLive(f"{where}: the certificate served is {exc}") from None
    problem = facts.problem(time.time())
    if problem:
        raise NotLive(
            f"{where}: serves a certificate that {problem} ({facts.name()}), which every "
            "carrier refuses: renew it and reload (docs/INSTALL.md section 6)"
        )


def _host_header(host: str, port: int) -> str:
    """Host for a listener at `host`: a zone left out (RFC 6874 section 4; the
    ingress answers 'Host is not host[:port]' to [fe80::10%ve0]:8443)."""
    return format_hostport(host.partition("%")[0], port)


def _snapshot(listen: LiveSettings, deadline: _Deadline) -> dict[str, Any]:
    if listen.stats:
        host, port = local_target(listen.stats)
        where, path = f"stats {format_hostport(host, port)}", "/stats.json"
        request = _request(_host_header(host, port), path)
        with socket.create_connection((host, port), timeout=deadline.left()) as sock:
            status, body = _get(sock, deadline, request)
    elif listen.admin_socket:
        where, path = f"admin socket {listen.admin_socket}", "/stat"
        request = _request("ingress", path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(deadline.left())
            sock.connect(listen.admin_socket)
            status, body = _get(sock, deadline, request)
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


# A request target and Host as RFC 9112 lets them be written: visible ASCII.
_VISIBLE = re.compile(r"[!-~]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")


def _request(host: str, path: str) -> bytes:
    if not _VISIBLE.fullmatch(path) or not _VISIBLE.fullmatch(host):
        raise _NotHTTP(f"{host}{path!r} cannot be asked: not a request target")
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        "User-Agent: fleet-ingress\r\n\r\n"
    ).encode("ascii")


def _get(sock: socket.socket, deadline: _Deadline, request: bytes) -> tuple[int, bytes]:
    """One GET on a fresh connection (closed by the caller): (status, body)."""
    sock.settimeout(deadline.left())
    sock.sendall(request)
    answer = _Answer(sock, deadline)
    head = answer.head()
    lines = head.split(b"\r\n")
    matched = _STATUS_LINE.fullmatch(lines[0])
    if matched is None:
        raise _NotHTTP(f"status line {bytes(lines[0][:40])!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise _NotHTTP(f"header line {bytes(line[:40])!r}")
        name = name.lower()
        value = value.strip()
        headers[name] = headers[name] + b", " + value if name in headers else value
    status = int(matched.group(1))
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return status, answer.chunked()
    if (length := headers.get(b"content-length")) is not None:
        if not length.isdigit():
            raise _NotHTTP(f"Content-Length {bytes(length[:20])!r}")
        return status, answer.exactly(int(length))
    return status, answer.to_the_end()


class _Answer:
    """The bytes of one answer as they arrive, each read under the deadline,
    MAX_ANSWER_BYTES in all."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self.sock, self.deadline = sock, deadline
        self.data = bytearray()
        self.size = 0
        self.ended = False

    def _more(self) -> bool:
        if self.ended:
            return False
        self.sock.settimeout(self.deadline.left())
        data = self.sock.recv(65536)
        if not data:
            self.ended = True
            return False
        self.size += len(data)
        if self.size > MAX_ANSWER_BYTES:
            raise _TooLarge
        self.data += data
        return True

    def head(self) -> bytes:
        while (end := self.data.find(b"\r\n\r\n")) < 0:
            if not self._more():
                if not self.size:
                    raise _HungUp
                raise _NotHTTP("the connection closed in the head")
        head = bytes(self.data[:end])
        del self.data[: end + 4]
        return head

    def exactly(self, length: int) -> bytes:
        while len(self.data) < length:
            if not self._more():
                raise _NotHTTP(f"the connection closed {length - len(self.data)} bytes early")
        return bytes(self.data[:length])

    def to_the_end(self) -> bytes:
        while self._more():
            pass
        return bytes(self.data)

    def _line(self) -> bytes:
        while (end := self.data.find(b"\r\n")) < 0:
            if not self._more():
                raise _NotHTTP("the connection closed in a chunk")
        line = bytes(self.data[:end])
        del self.data[: end + 2]
        return line

    def chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_text = self._line().partition(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _NotHTTP(f"chunk size {size_text[:20]!r}") from None
            if size == 0:
                return bytes(body)  # trailers, if any, are not read: the answer is whole
            body += self.exactly(size + 2)[:size]
            del self.data[: size + 2]
