"""What the tests share: TLS files, the in-process ingress's handles, bounded
waits, raw requests, and fleet stand-ins (each a real server on loopback).

`WsFleet` is a `websockets` server (echo, close codes, subprotocols, what it
saw). `RawFleet` runs a scripted reaction per connection: a fixed answer,
silence, an immediate close... for the retry and relay cases. Fixtures live in
conftest.py; test modules import helpers from here only, never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from fleet_ingress.core.cgroups import mounts
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.net.slot_wire import encode
from fleet_ingress.service.ingress import Ingress
from fleet_ingress.service.oom_kills import count_in
from fleet_ingress.sim import SimulatedFleet

# A carrier's WebSocket upgrade, as raw bytes (format with path=...).
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: calls.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# A fleet's answer to it (RFC 6455 1.3's accept value for that key).
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


# -- reaching OpenSSL's own objects (tests that pin or drive OpenSSL itself) ------------

LIBSSL = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # its libssl symbols
for _name, _argtypes in {
    "SSL_ctrl": [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
    "SSL_CTX_ctrl": [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
}.items():
    getattr(LIBSSL, _name).argtypes = _argtypes
    getattr(LIBSSL, _name).restype = ctypes.c_long
LIBSSL.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
LIBSSL.SSL_get_SSL_CTX.restype = ctypes.c_void_p
LIBSSL.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
LIBSSL.SSL_shutdown.argtypes = [ctypes.c_void_p]  # once: sends close_notify, reads nothing
LIBSSL.SSL_renegotiate.argtypes = [ctypes.c_void_p]  # a TLS 1.2 server: sends a HelloRequest
LIBSSL.SSL_renegotiate_pending.argtypes = [ctypes.c_void_p]
LIBSSL.SSL_in_init.argtypes = [ctypes.c_void_p]  # a handshake under way
SSL_KEY_UPDATE_REQUESTED = 1


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    # PySSLContext: PyObject_HEAD, then SSL_CTX *ctx (Modules/_ssl.c).
    return ctypes.c_void_p.from_address(id(ctx) + 16).value or 0


def ssl_pointer(sock: ssl.SSLSocket | ssl.SSLObject) -> int:
    # PySSLSocket: PyObject_HEAD, PyObject *Socket, then SSL *ssl. Checked below
    # against SSL_get_SSL_CTX, so a layout change fails loudly, not silently.
    pointer = ctypes.c_void_p.from_address(id(sock._sslobj) + 24).value or 0  # type: ignore[attr-defined]
    assert LIBSSL.SSL_get_SSL_CTX(pointer) == ssl_ctx_pointer(sock.context)
    return pointer


def tls12_server_context(tls_files: TLSFiles) -> ssl.SSLContext:
    """A fleet's TLS server held to 1.2, the version that renegotiates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    tls_files.fleet_cert.configure_cert(ctx)
    return ctx


def renegotiate_while_sending(tls: ssl.SSLSocket) -> int:
    """A TLS 1.2 server asks for a renegotiation (HelloRequest), then sends 600
    bytes over 60 ms before it reads the ClientHello, as a fleet streaming to a
    distant ingress does a round trip long. Its SSL's address (to ask
    SSL_renegotiate_pending)."""
    pointer = ssl_pointer(tls)
    LIBSSL.SSL_renegotiate(pointer)
    tls.do_handshake()  # sends the HelloRequest, and returns
    for _ in range(6):
        tls.sendall(b"f" * 100)
        time.sleep(0.01)
    return pointer


def request_key_update(sock: ssl.SSLSocket | ssl.SSLObject) -> None:
    """TLS 1.3: send a KeyUpdate asking the peer for one too (with our next write)."""
    assert LIBSSL.SSL_key_update(ssl_pointer(sock), SSL_KEY_UPDATE_REQUESTED) == 1


@dataclass(frozen=True)
class TLSFiles:
    ca: trustme.CA
    ca_pem: Path
    ingress_cert: Path
    ingress_key: Path
    fleet_cert: trustme.LeafCert

    def client_context(self, **kw: Any) -> ssl.SSLContext:
        """What a carrier uses: trusts the test CA."""
        ctx = ssl.create_default_context(**kw)
        self.ca.configure_trust(ctx)
        return ctx

    def fleet_server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.fleet_cert.configure_cert(ctx)
        return ctx


StartIngress = Callable[..., Awaitable[Ingress]]


def wss_url(ingress: Ingress, path: str = "/ws/bot-1") -> str:
    host, port = ingress.wss_address
    return f"wss://{host}:{port}{path}"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait (bounded) until `predicate()`; the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    return loop.time() - started


# The tests' own wall bound on one `upgrade` command (run_cli's timeout). The
# product sets none this short: it judges the niced trial run by its CPU time
# (service.upgrade.TrialProgress: given up past TRIAL_CPU_LIMIT, 30 s, of CPU,
# after TRIAL_STALL_LIMIT, 60 s, with none, or at TRIAL_WALL_LIMIT, 600 s), and
# the command waits while the trial progresses (ops.admin_client.UPGRADE_TIMEOUT,
# 180 s, after its last progress). Taken from what a sound install needs on a
# loaded 2-core machine: the trial 27-41 s of wall time beside a busy loop on each
# core (50 s at a load of 10-16; 92 s once in session 44 beside the upgrade tests),
# then the exec, the table's rebuild and the new workers (35 s at most). Above
# TRIAL_STALL_LIMIT and those 35 s, so a stalled trial's own verdict is printed
# before this cuts the command. pytest's own timeout (pyproject, 120 s) is
# shorter: a test that runs `upgrade` under this bound marks its own,
# `pytest.mark.timeout(upgrade_test_timeout(n))`, or pytest cut a slow but sound
# upgrade first, the command's verdict (a stalled trial's, printed) unread.
UPGRADE_WITHIN = 150.0
# A test's time besides its `upgrade` commands: the service started (trustme's
# files, the workers joined and probed: 5-15 s under load), its own calls and
# checks, the service stopped (its drain bounded by STOP_GRACE and the test's).
UPGRADE_TEST_REST = 90.0


def upgrade_test_timeout(upgrades: int = 1) -> float:
    """pytest's bound on a test running `upgrades` upgrade commands, each
    bounded by UPGRADE_WITHIN: above their sum, so the command's bound (and
    what it printed) is what fails a slow upgrade, not pytest's."""
    return upgrades * UPGRADE_WITHIN + UPGRADE_TEST_REST


async def run_cli(
    service: RunningIngress,
    *args: str,
    timeout: float = 20,
    installed: bool = False,
    pythonpath: Path | None = None,
) -> tuple[int, str, str]:
    """`fleet-ingress ARGS --admin-socket ...` against `service`: its exit code,
    stdout and stderr. `installed`: from the installed package, whatever
    PYTHONPATH the service runs from (as an operator's shell has it);
    `pythonpath`: from the release in that directory."""
    env = None
    if installed:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elif pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleet_ingress",
        *args,
        "--admin-socket",
        str(service.home / "admin.sock"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def admin_command(
    service: RunningIngress, *args: str, timeout: float = 20
) -> tuple[int, str]:
    """`run_cli`'s exit code and all it printed (stdout, then stderr). An
    `upgrade` wants more than the 20 s (`UPGRADE_WITHIN`)."""
    code, out, err = await run_cli(service, *args, timeout=timeout)
    return code, out + err


def metric_samples(exposition: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A `/metrics` text as {sample name: {sorted label pairs: value}}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def echo(ws: ClientConnection, text: str = "ping") -> None:
    """`text` sent on a call and read back from the fleet's echo within 5 s."""
    await ws.send(text)
    async with asyncio.timeout(5):
        assert await ws.recv() == text


async def close_calls(calls: Iterable[ClientConnection]) -> None:
    """Close a test's calls as it cleans up, whatever state each is in (a
    test that failed half way may leave them broken)."""
    for ws in calls:
        with contextlib.suppress(Exception):
            await ws.close()


async def raw_exchange(
    ingress: Ingress, tls_files: TLSFiles, request: bytes, *, timeout: float = 5.0
) -> bytes:
    """Send raw bytes over one TLS connection; read until the ingress closes."""
    host, port = ingress.wss_address
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        writer.write(request)
        try:
            return await reader.read(-1)
        finally:
            writer.close()


def access_entries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access-log lines captured, as their structured fields."""
    return [r.fields for r in caplog.records if r.name == "fleet_ingress.access"]  # type: ignore[attr-defined]


class WsFleet:
    def __init__(
        self, ssl_context: ssl.SSLContext | None, *, subprotocols: list[str] | None = None
    ):
        self.ssl_context = ssl_context
        self.subprotocols = subprotocols
        self.requests: list[Any] = []  # websockets Request objects
        self.peer_close_codes: list[int | None] = []
        self.peer_close_reasons: list[str | None] = []
        self.active = 0
        self._server: Any = None

    async def start(self) -> WsFleet:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            ssl=self.ssl_context,
            subprotocols=self.subprotocols,  # type: ignore[arg-type]
            max_size=None,
            process_request=self._record,
        )
        return self

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    def line(self, name: str, extra: str = "") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port} name={name} {extra}".strip()

    def _record(self, connection: ServerConnection, request: Any) -> None:
        self.requests.append(request)

    async def _handler(self, ws: ServerConnection) -> None:
        self.active += 1
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("close:"):
                    await ws.close(int(message.removeprefix("close:")), "asked to")
                    break
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.peer_close_codes.append(ws.close_code)
            self.peer_close_reasons.append(ws.close_reason)
            self.active -= 1


Reaction = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def upgrade_on(tls: ssl.SSLSocket, path: str) -> bytes:
    """A blocking carrier's upgrade for `path` sent on `tls` (connected), and
    the answer's head read byte by byte, nothing past it (what follows stays
    in the socket for the test)."""
    tls.sendall(UPGRADE.format(path=path).encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += tls.recv(1)
    return head


async def raw_carrier(
    ingress: Any, tls_files: TLSFiles, path: str = "/ws/bot-1", *, then: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A carrier speaking raw bytes over TLS to `ingress`, its upgrade for
    `path` sent, with `then` in the same write: (reader, writer)."""
    host, port = ingress.wss_address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    writer.write(UPGRADE.format(path=path).encode() + then)
    return reader, writer


def switching_101(head: bytes, line_end: bytes = b"\r\n") -> bytes:
    """A fleet's whole 101 to the upgrade `head` (for the carrier's own key),
    its lines ended by `line_end` (a bare LF: a fleet that writes them so)."""
    from fleet_ingress.core.fleet_exchange import websocket_accept

    key = re.search(rb"(?i)\r\nsec-websocket-key: *([^\r]+)", head)
    assert key is not None
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + websocket_accept(key[1]),
    ]
    return line_end.join(lines) + line_end * 2


def switching_then(react_after, *, with_101: bytes = b"", line_end: bytes = b"\r\n"):
    """A raw fleet's reaction: answer the upgrade 101 (`switching_101`), with
    `with_101` in the same write, then do `react_after`."""

    async def react(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(switching_101(await read_head(reader), line_end) + with_101)
        await writer.drain()
        await react_after(reader, writer)

    return react


def masked_close(code: int = 1000) -> bytes:
    """A carrier's (a client's, so masked) close frame with `code`."""
    mask = b"\x01\x02\x03\x04"
    payload = code.to_bytes(2, "big")
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One WebSocket frame off a raw stream: (opcode, unmasked payload)."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    mask = await reader.readexactly(4) if second & 0x80 else b"\0\0\0\0"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(length)))
    return first & 0x0F, payload


def answer(raw: bytes) -> Reaction:
    async def react(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(raw)
        await writer.drain()

    return react


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    await asyncio.sleep(3600)


class RawFleet:
    def __init__(self, ssl_context: ssl.SSLContext | None, react: Reaction):
        self.ssl_context = ssl_context
        self.react = react
        self.connections = 0
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawFleet:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def line(self, name: str, extra: str = "") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port} name={name} {extra}".strip()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.react(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def free_port() -> int:
    """A loopback port with nothing listening on it (`free_ports`)."""
    (port,) = await free_ports(1)
    return port


# Where `free_ports` picks: below the kernel's ephemeral range (net.ipv4.
# ip_local_port_range, 32768-60999 by default), which neither a bind to port 0
# nor a connect() is ever given, and above the ports services are set up on.
# A port picked by binding to port 0 and released was the kernel's to hand to
# the next bind to port 0 on the host (every test's fleets and servers bind
# one): a CI run lost the race between the release and the ingress's own bind
# seconds later (a unit under systemd: "cannot listen: Address already in
# use" at its start, test_under_systemd).
PICKED_PORTS_FROM = 10000
PICK_TRIES = 1000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def pick_range(worker: str | None, workers: str | None, below: int) -> range:
    """The ports this test process picks from: those from PICKED_PORTS_FROM up
    to `below` (the ephemeral range's start), split between pytest-xdist's
    workers (`worker` is PYTEST_XDIST_WORKER, gw0..gwN-1; `workers`,
    PYTEST_XDIST_WORKER_COUNT) so that no two pick the same port. A port one
    worker picked and released is still free until the ingress it named binds
    it, seconds later under systemd; another worker picking it meanwhile made
    that bind fail (CI on cb4bf60b: "cannot listen: Address already in use")."""
    whole = range(PICKED_PORTS_FROM, below)
    if worker is None or not worker.startswith("gw") or not worker[2:].isdigit():
        return whole
    try:
        count = int(workers or "1")
    except ValueError:
        return whole
    index = int(worker[2:])
    if count <= 1 or index >= count:
        return whole
    size = len(whole) // count
    return whole[index * size : (index + 1) * size]


class _PortCursor:
    """Walks this process's pick range from a random start, so that a port
    handed out is not handed out again by this process until every other port
    in the range was (a test picking twice, or the next test, never gets a
    port an earlier pick named that may not be bound yet)."""

    def __init__(self) -> None:
        self._range: range | None = None
        self._next = 0

    def take(self, tries: int) -> Iterator[int]:
        if self._range is None:
            self._range = pick_range(
                os.environ.get("PYTEST_XDIST_WORKER"),
                os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
                _ephemeral_start(),
            )
            self._next = random.randrange(len(self._range)) if self._range else 0
        span = self._range
        for _ in range(min(tries, len(span))):
            port = span[self._next]
            self._next = (self._next + 1) % len(span)
            yield port


_PORT_CURSOR = _PortCursor()


async def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports with nothing bound to them, taken in turn
    from this process's share of the ports below the ephemeral range
    (`pick_range`): each is held until all are chosen, bound without
    SO_REUSEADDR (so none is in TIME_WAIT either). Where the ephemeral range
    leaves too little room below it, ports the kernel picks."""
    held: list[socket.socket] = []
    try:
        if _ephemeral_start() - PICKED_PORTS_FROM >= 1000:
            for port in _PORT_CURSOR.take(PICK_TRIES):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    sock.close()
                    continue
                held.append(sock)
                if len(held) == count:
                    break
        while len(held) < count:  # no room below the range, or none found there
            held.append(socket.create_server(("127.0.0.1", 0)))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def no_ipv6_loopback() -> str | None:
    """Why ::1 cannot be used on this machine, or None. `socket.has_ipv6` says
    only that Python was built with IPv6: a kernel booted with ipv6.disable=1,
    or lo with net.ipv6.conf.lo.disable_ipv6=1 (containers, some VM images),
    has no ::1 to bind or connect to."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as e:
        return f"no IPv6 on loopback here: binding [::1] failed ({e.strerror})"
    return None


def need_ipv6_loopback() -> None:
    """Skip the test where this machine has no ::1 (`no_ipv6_loopback`), unless
    CI is set: there it fails, as a missing tool does (they skipped unseen
    wherever lo has disable_ipv6=1, CI included)."""
    if (why := no_ipv6_loopback()) is None:
        return
    # A kernel without IPv6 at all (ipv6.disable=1) has nothing to give lo: skipped
    # even under CI; .ci/run gives lo its ::1 wherever the kernel has IPv6.
    if os.environ.get("CI") and os.path.isdir("/proc/sys/net/ipv6"):
        pytest.fail(
            f"{why}; CI must run the IPv6 tests: give lo its ::1 "
            "(sysctl net.ipv6.conf.lo.disable_ipv6=0)",
            pytrace=False,
        )
    pytest.skip(f"{why} (CI unset)")


# -- network namespaces ---------------------------------------------------------------
# The dead-peer tests take a link down under a live call, which loopback cannot do:
# they build namespaces joined by veth pairs, using documentation addresses
# (192.0.2.0/24) only inside them, and remove everything they made.

_CLONE_NEWNET = 0x40000000


def netns_prefix() -> str:
    """What the namespaces a test makes are named with, before the pid:
    `FI_TEST_NETNS_PREFIX` (a run that must name its own), else "fi"."""
    return os.environ.get("FI_TEST_NETNS_PREFIX", "fi")


class NetLab:
    """Network namespaces made (and removed) by one test; names carry the pid."""

    def __init__(self) -> None:
        self.prefix = f"{netns_prefix()}{os.getpid()}"
        self.made: list[str] = []

    def ip(self, *args: str) -> None:
        result = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=10, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def namespace(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        self.ip("netns", "add", name)
        self.made.append(name)
        self.ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, a: str, a_dev: str, a_addr: str, b: str, b_dev: str, b_addr: str) -> None:
        """A veth pair between namespaces a and b; addresses as "192.0.2.1/30"."""
        self.ip("-n", a, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b)
        for ns, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            self.ip("-n", ns, "addr", "add", addr, "dev", dev)
            self.ip("-n", ns, "link", "set", dev, "up")

    def link_down(self, ns: str, dev: str) -> None:
        """No FIN, no RST: the host behind it is simply gone."""
        self.ip("-n", ns, "link", "set", dev, "down")

    def drop_arriving(self, ns: str, dev: str) -> None:
        """Everything arriving on `dev` in `ns` dropped (nftables, input hook):
        on both ends of a link, a blackout in the middle of the path. Unlike a
        link taken down, neither end's sends fail locally (a local failure
        makes Linux retry without backing off): each end retransmits into the
        void on its own backoff, as across a real network."""
        rules = (
            "add table inet blackout\n"
            "add chain inet blackout input { type filter hook input priority 0; }\n"
            f'add rule inet blackout input iifname "{dev}" drop\n'
        )
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=rules.encode(),
            check=True,
            capture_output=True,
            timeout=10,
        )

    def stop_dropping(self, ns: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "delete table inet blackout"],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def socket_in(self, ns: str, make: Callable[[], socket.socket]) -> socket.socket:
        """A socket created inside namespace `ns` (it keeps that namespace for
        life) by this thread entering it for the call to `make` alone."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns}")
            try:
                return make()
            finally:
                if libc.setns(home, _CLONE_NEWNET) != 0:  # pragma: no cover
                    # Every later socket would be made in the wrong namespace.
                    print(f"cannot leave network namespace {ns}", file=sys.stderr)
                    os._exit(70)
        finally:
            os.close(home)
            os.close(target)

    async def connect(self, ns: str, host: str, port: int) -> socket.socket:
        """A TCP connection from inside `ns`, ready for asyncio (`sock=`)."""
        sock = self.socket_in(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.setblocking(False)
        try:
            async with asyncio.timeout(5):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def http_get(self, ns: str, host: str, port: int, path: str) -> bytes:
        """An HTTP/1.0 GET from inside `ns` (a stats listener's, say): the body."""
        sock = await self.connect(ns, host, port)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: stats\r\n\r\n".encode())
            async with asyncio.timeout(5):
                raw = await reader.read(-1)
        finally:
            writer.close()
        return raw.partition(b"\r\n\r\n")[2]

    def listen(self, ns: str, host: str, port: int) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.create_server((host, port), backlog=128)
            sock.setblocking(False)
            return sock

        return self.socket_in(ns, make)

    def remove(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self.made.clear()


@dataclass
class Caller:
    """A carrier's call in the netns tests: a frame every 20 ms, the fleet's echoes counted."""

    bot: str
    echoes: int = 0
    closed_at: float | None = None
    task: asyncio.Task[None] | None = None
    sending: bool = True  # False: the carrier holds its frames (a call on hold), still connected


async def stream_call(ws: Any, caller: Caller) -> None:
    """Send `caller`'s frames (a sequence number and 316 bytes, every 20 ms,
    while `caller.sending`) and count what the fleet sends (its echoes, a
    talking bot's audio) until the connection ends; its end's moment kept."""

    async def send() -> None:
        seq = 0
        while True:
            if caller.sending:
                seq += 1
                await ws.send(seq.to_bytes(4, "big") + bytes(316))
            await asyncio.sleep(0.02)

    sender = asyncio.get_running_loop().create_task(send())
    try:
        async for _ in ws:
            caller.echoes += 1
    except (ConnectionClosed, OSError):
        pass
    finally:
        caller.closed_at = time.monotonic()
        sender.cancel()
        ws.transport.abort()


@contextlib.asynccontextmanager
async def netns_ingress(
    netlab: NetLab, ns: str, config: Path, log: list[dict[str, Any]], stats: tuple[str, int]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real `python -m fleet_ingress run -c CONFIG` inside namespace `ns`
    (the environment's FLEET_INGRESS_ variables left out: only the file
    counts), its JSON log lines appended to `log` as they come; entered once
    every fleet its /stats.json (`stats`, inside `ns`) lists is UP and it has
    logged "ready" (its workers serving), within 15 s, or AssertionError if
    it exits first; killed on the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    proc = await asyncio.create_subprocess_exec(
        *netlab.exec_argv(ns, sys.executable, "-m", "fleet_ingress", "run"),
        "-c",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )

    async def read_log() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            with contextlib.suppress(ValueError):
                log.append(json.loads(line))

    reader = asyncio.get_running_loop().create_task(read_log())
    try:

        def ready() -> bool:
            # The supervisor's /stats.json says UP before its workers accept
            # (3.3 s later, measured under load): a test's first call waited
            # in the backlog meanwhile, most of its 5 s open_timeout.
            return any(
                e.get("logger") == "fleet_ingress.lifecycle" and e.get("event") == "ready"
                for e in log
            )

        async def up() -> None:
            while True:
                with contextlib.suppress(OSError, ValueError):
                    answer = json.loads(await netlab.http_get(ns, *stats, "/stats.json"))
                    health = [f["health"] for f in answer["fleets"]]
                    if health and set(health) == {"UP"} and ready():
                        return
                if proc.returncode is not None:
                    raise AssertionError(f"ingress exited {proc.returncode}: {log}")
                await asyncio.sleep(0.1)

        async with asyncio.timeout(15):
            await up()
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await proc.wait()
        reader.cancel()


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{netns_prefix()}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def python_child(code: str) -> str:
    """``code`` (dedented) run in a fresh Python, whose descriptor limit, forks and
    /proc/self are its own; what it printed. Fails the test if it exits non-zero."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class EventChild:
    """A child process (asyncio) that takes JSON commands on stdin and reports
    JSON events on stdout, one object a line (the tests' stand-in workers and
    supervisors)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *argv: str, **popen: Any) -> EventChild:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, **popen
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == kind]

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)
        self.reader.cancel()


# -- `fleet-ingress run` as a process ------------------------------------------------


def write_leaf_cert(
    ca: trustme.CA,
    home: Path,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
    *,
    names: tuple[str, ...] = ("127.0.0.1", "localhost"),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> str:
    """Issue a fresh leaf into home/cert.pem and key.pem (as certbot's renewal
    replaces them); returns its serial in hex as `ssl` shows it, without leading 0s."""
    from cryptography import x509

    leaf = ca.issue_cert(*names, key_type=key_type, not_before=not_before, not_after=not_after)
    for name, data in (
        ("key.pem", leaf.private_key_pem.bytes()),
        ("cert.pem", b"".join(blob.bytes() for blob in leaf.cert_chain_pems)),
    ):
        tmp = home / f"{name}.new"
        tmp.write_bytes(data)
        os.replace(tmp, home / name)
    serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
    return f"{serial:X}".lstrip("0")


class RunHomes:
    """The homes `fleet-ingress run` is started in by the tests (`run_home`):
    made under pytest's base temp for the run (which pytest prunes, the last
    three runs kept, so even a run killed outright leaves none for good), and
    each one a test made removed at its teardown (conftest's autouse fixture),
    with any process still running from it: a test that failed, or was timed
    out (pytest-timeout's signal method), before its `finish` left both, as
    /tmp/fi-run-* homes did (the review of session 42)."""

    base: Path | None = None  # None: outside pytest's fixtures, the system's temp dir
    made: list[Path] = []

    @classmethod
    @contextlib.contextmanager
    def of_one_test(cls, base: Path) -> Iterator[None]:
        """The homes made meanwhile go under `base`, and are removed after."""
        prior = cls.base, cls.made
        cls.base, cls.made = base, []
        try:
            yield
        finally:
            made = cls.made
            cls.base, cls.made = prior
            for home in made:
                remove_run_home(home)


def run_home() -> Path:
    """A new, empty home for `fleet-ingress run` (0700)."""
    import tempfile

    if RunHomes.base is None:
        return Path(tempfile.mkdtemp(prefix="fi-run-"))
    home = Path(tempfile.mkdtemp(prefix="run-", dir=RunHomes.base))
    RunHomes.made.append(home)
    return home


def remove_run_home(home: Path) -> None:
    """`home` removed, and first every process started with its config (a
    supervisor, its workers) killed: what `RunningIngress.finish` does, for a
    test that never got to call it. Only this home's: its path is its own."""
    if not home.exists():
        return
    # Until three looks in a row find none (2 s at most): a process caught in
    # its exec has an empty command line for a moment (13 looks of 20 right
    # after Popen returned, on this loaded host), and a supervisor may start a
    # worker just before it is killed.
    quiet, deadline = 0, time.monotonic() + 2
    while quiet < 3 and time.monotonic() < deadline:
        found = started_from(home)
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        quiet = 0 if found else quiet + 1
        time.sleep(0.02)
    shutil.rmtree(home, ignore_errors=True)


async def write_run_home(
    tls_files: TLSFiles,
    home: Path,
    fleet_lines: list[str],
    *,
    workers: int | str = 2,
    extra: str = "",
    drain: float = 30,
    queue: float = 3,
    check_timeout: float = 1,
    check_interval: float = 0.2,
) -> tuple[int, int]:
    """What `fleet-ingress run -c home/ingress.toml` needs in `home`: config,
    fleets file, certificate; returns the carrier and stats ports it names."""
    write_leaf_cert(tls_files.ca, home)
    port, stats_port = await free_ports(2)
    (home / "fleets.txt").write_text("\n".join(fleet_lines) + "\n")
    workers_toml = f'"{workers}"' if isinstance(workers, str) else str(workers)
    (home / "ingress.toml").write_text(
        f"""
[listen]
wss = "127.0.0.1:{port}"
acme = ""
stats = "127.0.0.1:{stats_port}"
admin_socket = "admin.sock"

[tls]
cert = "cert.pem"
key = "key.pem"
ca_file = "{tls_files.ca_pem}"

[fleets]
ca_file = "{tls_files.ca_pem}"
check_interval = {check_interval}
check_timeout = {check_timeout}

[timeouts]
drain = {drain}
queue = {queue}

[log]
format = "json"

[process]
workers = {workers_toml}
{extra}
"""
    )
    return port, stats_port


class IngressOnLoopback:
    """What a test reads of an ingress it started (`RunningIngress`; the unit
    under a test's systemd): its JSON log in home/stderr.log, its stats
    listener, its carrier URL."""

    home: Path
    port: int
    stats_port: int

    def log(self) -> list[dict[str, Any]]:
        """The JSON lines written so far, read once the file has stopped growing:
        each process writes its lines from a thread of its own (logs.StderrSink),
        a moment after they are logged (20 ms still, 1 s at most)."""
        path = self.home / "stderr.log"
        size, deadline = -1, time.monotonic() + 1.0
        while (now := path.stat().st_size) != size and time.monotonic() < deadline:
            size = now
            time.sleep(0.02)
        text = path.read_text()
        # A line still being written (a process writing as it is read, past the
        # second waited): whole lines only, the last one read at the next call.
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        return [json.loads(line) for line in lines if line.startswith("{")]

    def log_tail(self, chars: int = 4000) -> str:
        return (self.home / "stderr.log").read_text()[-chars:]

    async def logged(
        self, said: Callable[[dict[str, Any]], bool], timeout: float, *, since: int = 0
    ) -> list[dict[str, Any]]:
        """The log's lines from the `since`th on that `said` holds for, once
        there is one, waited for `timeout` at most. The log is read off the
        event loop, a few times a second: what the test's loop carries (its
        carriers, its fleets' answers to the ingress's probes) is not held
        while it is read and parsed (`log` waits for the file to stop
        growing, up to 1 s; every 10 ms on a loaded host took most of a core)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = [e for e in (await asyncio.to_thread(self.log))[since:] if said(e)]
            if found:
                return found
            if loop.time() >= deadline:
                raise AssertionError(
                    f"not logged within {timeout} s; the log's end: {self.log_tail(2000)}"
                )
            await asyncio.sleep(0.2)

    async def stats(self) -> dict[str, Any]:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.stats_port}/stats.json") as r:
                return await r.json()  # type: ignore[no-any-return]

    async def fleets_up(self, timeout: float = 10) -> None:
        """Until every fleet is UP. READY waits for each fleet's first probe,
        not for it to pass: on a loaded host a first probe can time out, and
        calls are refused ("no fleet is up") until the next one passes."""
        async with asyncio.timeout(timeout):
            while {f["health"] for f in (await self.stats())["fleets"]} != {"UP"}:
                await asyncio.sleep(0.05)

    async def metrics(self) -> str:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.stats_port}/metrics") as r:
                return await r.text()

    def url(self, path: str = "/ws/bot-1") -> str:
        return f"wss://127.0.0.1:{self.port}{path}"

    async def peer_serial(self, tls_files: TLSFiles) -> str:
        """The serial of the certificate a new handshake gets (verified, as a
        carrier does), in hex without leading 0s (as `write_leaf_cert` gives it)."""
        _, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=tls_files.client_context(), server_hostname="localhost"
        )
        serial: str = writer.get_extra_info("peercert")["serialNumber"]
        writer.close()
        return serial.lstrip("0")

    async def open_on_every_worker(
        self, tls_files: TLSFiles, calls: list[ClientConnection], count: int, bot: str = "bot"
    ) -> None:
        """Open `count` calls (/ws/{bot}-{i}), then more until every worker holds
        some, 40 at most: the kernel hands each connection to whichever worker
        accepts first, and one of them may take a run of them (12 in a row once
        in CI)."""
        from websockets.asyncio.client import connect

        for i in range(40):
            calls.append(
                await connect(
                    self.url(f"/ws/{bot}-{i}"), ssl=tls_files.client_context(), open_timeout=15
                )
            )
            if i + 1 >= count and all(r["calls"] > 0 for r in (await self.stats())["workers"]):
                return
        pytest.fail(f"one worker took all of {len(calls)} calls: {(await self.stats())['workers']}")


# How many times RunningIngress.start chooses new ports when one was taken
# between being chosen and bound.
PORT_TAKEN_ATTEMPTS = 3


@dataclass
class RunningIngress(IngressOnLoopback):
    """`python -m fleet_ingress run` in a temporary home: its config, fleets file
    and certificate there, the JSON log in home/stderr.log, sd_notify messages
    received on a real datagram socket, the stats listener on loopback."""

    proc: asyncio.subprocess.Process
    home: Path
    port: int
    stats_port: int
    messages: list[str]
    _notify: socket.socket

    @classmethod
    async def start(
        cls,
        tls_files: TLSFiles,
        fleet_lines: list[str],
        *,
        workers: int | str = 2,
        extra: str = "",
        drain: float = 30,
        queue: float = 3,
        check_timeout: float = 1,
        check_interval: float = 0.2,
        env: dict[str, str] | None = None,
        stderr: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> RunningIngress:
        """`stderr`: a descriptor for its stderr instead of home/stderr.log
        (`log()` then reads nothing); `preexec_fn`: run in the child before
        the exec (e.g. to join a cgroup, as systemd starts it in the unit's)."""
        for attempt in range(PORT_TAKEN_ATTEMPTS):
            home = run_home()
            port, stats_port = await write_run_home(
                tls_files,
                home,
                fleet_lines,
                workers=workers,
                extra=extra,
                drain=drain,
                queue=queue,
                check_timeout=check_timeout,
                check_interval=check_interval,
            )
            try:
                return await cls.launch(
                    home, port, stats_port, env=env, stderr=stderr, preexec_fn=preexec_fn
                )
            except AssertionError as exc:
                # The ports were free when chosen, then released for the ingress
                # to bind: another process on the host (a test's connection, a
                # server of its own) may take one meanwhile. Not what a test
                # checks: new ports (a clean-clone CI of session 32 failed twice so).
                if "Address already in use" not in str(exc) or attempt + 1 == PORT_TAKEN_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    async def launch(
        cls,
        home: Path,
        port: int,
        stats_port: int,
        *,
        env: dict[str, str] | None = None,
        stderr: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> RunningIngress:
        """`fleet-ingress run -c home/ingress.toml` (the files written), its
        notify socket read; returned once it said READY=1."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(home / "notify.sock"))
        notify.setblocking(False)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fleet_ingress",
            "run",
            "-c",
            str(home / "ingress.toml"),
            env={**os.environ, "NOTIFY_SOCKET": str(home / "notify.sock"), **(env or {})},
            stderr=(home / "stderr.log").open("wb") if stderr is None else stderr,
            preexec_fn=preexec_fn,
        )
        service = cls(proc, home, port, stats_port, [], notify)
        asyncio.get_running_loop().add_reader(notify.fileno(), service._on_datagram)
        try:
            await service.wait_for("READY=1", timeout=30)  # a loaded host: 20 s once was not
        except BaseException:
            await service.finish()
            raise
        return service

    def _on_datagram(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.messages.append(self._notify.recv(4096).decode())

    def seen(self, line: str) -> int:
        return sum(line in m.splitlines() for m in self.messages)

    async def wait_for(self, line: str, count: int = 1, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.seen(line) < count:
                if self.proc.returncode is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {self.log_tail()}")
                await asyncio.sleep(0.02)

    async def finish(self) -> int | None:
        """Kill what is left (its workers too) and clean up; the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = await asyncio.wait_for(self.proc.wait(), 10)
        # Workers of a killed supervisor see their channel close and drain; a test
        # leaves none behind.
        for pid in workers_of(self.home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._notify.fileno())
        self._notify.close()
        shutil.rmtree(self.home, ignore_errors=True)
        return code


async def fleets_up_or_finished(service: RunningIngress) -> RunningIngress:
    """`service` once every fleet is UP; finished (nothing left running) if
    they do not come up."""
    try:
        await service.fleets_up()
    except BaseException:
        await service.finish()
        raise
    return service


def workers_of(home: Path) -> list[int]:
    """Pids of the workers started with the config in `home`."""
    return started_from(home, b"worker")


def started_from(home: Path, word: bytes | None = None) -> list[int]:
    """Pids of the processes whose command line names a path in `home` (and
    has `word` as one of its words, where given)."""
    found = []
    mark = str(home).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (word is None or word in cmdline) and any(mark in part for part in cmdline):
            if int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


_SYS_PIDFD_GETFD = 438  # the same number on every architecture (the generic table)


def break_worker_channel(pid: int) -> None:
    """Make the supervisor cut worker `pid`'s slot channel while the worker
    runs on, through the path production takes on a worker bug: a message
    the protocol forbids ("hello" from a worker that has joined) arrives on
    the worker's end of its channel, so the supervisor logs "the worker broke
    the protocol" and closes it. Written from this process into a duplicate
    of the worker's descriptor (pidfd_getfd(2): an ancestor may, as a
    debugger may), so nothing in the worker or the supervisor is a test hook."""
    with worker_channel_copy(pid) as channel:
        channel.sendall(b'{"op": "hello", "pid": 1, "generation": 1}\n')


def worker_channel_copy(pid: int) -> socket.socket:
    """A duplicate of worker `pid`'s end of its slot channel, taken from outside
    it (pidfd_getfd(2): an ancestor may, as a debugger may)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    fds = next(e for e in environ if e.startswith(b"FLEET_INGRESS_LISTEN_FDS="))
    named = dict(kv.split("=") for kv in fds.decode().partition("=")[2].split(","))
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(named["coordinator"]), 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd of worker {pid}'s channel")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


async def until_asked(worker: int, op: str, timeout: float = 10.0) -> None:
    """Until the supervisor's `op` waits unread in `worker`'s slot channel (a
    stopped worker's, or one whose loop has not read it yet): read with
    MSG_PEEK from a copy of the worker's end, nothing taken. Where a test
    slept a fixed while for the supervisor to send it: too long on a quiet
    host, too short on a loaded one (close-fleet was sent 2.6 s after the
    command began in a run beside other suites)."""
    wanted = b'{"op":"' + op.encode() + b'"'
    with worker_channel_copy(worker) as channel:
        channel.setblocking(False)
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(BlockingIOError):
                    if wanted in channel.recv(1 << 20, socket.MSG_PEEK):
                        return
                await asyncio.sleep(0.01)


def fill_unread_channel(server: SlotServer, key: int) -> bytes:
    """Send channel `key`, whose worker end nobody reads, ops of a later
    version until `server`'s transport holds some unwritten (a worker not
    reading its channel): the bytes sent, as they go on the wire."""
    channel = server._channels[key]
    assert channel.transport is not None
    sent = b""
    for i in range(64):  # the socket's buffers hold a few hundred KiB
        message = {"op": "future-op", "n": i, "pad": "x" * 65536}
        assert server.send(key, message)
        sent += encode(message)
        if channel.transport.get_write_buffer_size():
            break
    assert channel.transport.get_write_buffer_size() > 0
    return sent


# -- carriers offering their TLS session ---------------------------------------------


@dataclass(frozen=True)
class Offered:
    """What a carrier's connection offering its TLS session got."""

    resumed: bool
    serial: str  # the certificate's, in hex without leading 0s (as `write_leaf_cert`)
    session: ssl.SSLSession | None  # the session to offer next (its new ticket)
    answer: bytes  # the first 12 bytes of the health route's answer
    holder: int | None  # which of the pids asked about accepted it (None: none)


def offer_session(
    port: int,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None,
    pids: Iterable[int] = (),
) -> Offered:
    """A carrier's connection to 127.0.0.1:`port` offering `session` (a TLS 1.3
    ticket, a TLS 1.2 ticket or id), the health route asked (a TLS 1.3 ticket
    comes after the handshake, read with the answer). Blocking."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            holder = socket_holder(pids, port, tls.getsockname()[1])
            tls.sendall(b"GET /haproxy-health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = tls.recv(12)
            serial = tls.getpeercert()["serialNumber"].lstrip("0")
            return Offered(tls.session_reused, serial, tls.session, answer, holder)


def socket_holder(pids: Iterable[int], port: int, client_port: int) -> int | None:
    """Which of `pids` holds the accepted end of the loopback connection from
    `client_port` to `port` (which worker the kernel handed it to)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote = (int(a.rsplit(":", 1)[1], 16) for a in parts[1:3])
        if (local, remote) == (port, client_port) and parts[9] != "0":
            inode = parts[9]
    if inode is None:
        return None
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


# -- clients a TLS server must refuse, with the alert that says why ------------------


def tls11_only_client() -> ssl.SSLContext:
    """A client that offers TLS 1.1 only (warns: the version is deprecated)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.warns(DeprecationWarning):
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def no_shared_cipher_client() -> ssl.SSLContext:
    # The test certificates are ECDSA (trustme's default): RSA-signed suites cannot be chosen.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    return ctx


def blocking_handshake(port: int, ctx: ssl.SSLContext) -> BaseException | None:
    """A handshake with 127.0.0.1:port: None, or what it failed with."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname="calls.test"):
                return None
        except (ssl.SSLError, OSError) as exc:
            return exc


class TcpDoor:
    """A TCP door in front of a fleet on loopback: it forwards every connection
    it has taken, and once shut takes no new one (they are refused) while those
    already through, a probe's kept-alive one among them, go on. `open` again
    on the same port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def shut(self) -> None:
        assert self._server is not None
        self._server.close()  # the listening socket only: what came through stays

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


@contextlib.asynccontextmanager
async def simulated_fleets(
    tls_files: TLSFiles, *, capacity: int, names: str = "ab"
) -> AsyncIterator[list[SimulatedFleet]]:
    """TLS fleets on loopback, one a name, each with `capacity` workers; stopped after."""
    sims = []
    try:
        for name in names:
            sim = SimulatedFleet(
                name=name, capacity=capacity, ssl_context=tls_files.fleet_server_context()
            )
            await sim.start()
            sims.append(sim)
        yield sims
    finally:
        for sim in sims:
            await sim.stop()


def process_state(pid: int) -> str:
    """Its state letter in /proc (T: stopped, Z: a zombie), as ps shows it."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


async def until_stopped(*pids: int, timeout: float = 5.0) -> None:
    """Until the kernel has stopped every one of `pids` (state T, after a
    SIGSTOP): a frame or signal sent before then may wake its loop first."""
    async with asyncio.timeout(timeout):
        while any(process_state(pid) != "T" for pid in pids):
            await asyncio.sleep(0.01)


async def stopped_together(seconds: float, *pids: int) -> None:
    """Stop `pids` (SIGSTOP, in that order: a VM paused), wait until the kernel
    has stopped them all, `seconds` more, then continue them together (in the
    reverse order), whatever happened meanwhile."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        await until_stopped(*pids)
        await asyncio.sleep(seconds)
    finally:
        for pid in reversed(pids):
            os.kill(pid, signal.SIGCONT)


def drain_outcome(
    events: list[dict[str, Any]], call: Any
) -> tuple[int, int | None, dict[str, Any]]:
    """What a stop did to a call (its carrier side `call`, a websockets
    connection): the workers killed after the drain, its close code, and each
    call's end reason by bot."""
    killed = [e for e in events if e["event"] == "worker still running after the drain: killed"]
    ended = {e["bot_id"]: e["end_reason"] for e in events if e["event"] == "call ended"}
    return len(killed), call.close_code, ended


def _kill_all_and_remove(group: Path) -> None:
    """Kill every process of cgroup `group` (a test's, all of them), then
    remove it; bounded at 5 s (a process killed leaves the group as it is reaped)."""
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(FileNotFoundError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Named for the session that wrote it: a group left behind by a killed run is
# traced to MemoryCgroup (`rmdir` removes one whose processes are gone).
# TESTS_CGROUP_PREFIX: one name for both (a session told to name its groups so).
CGROUP_PREFIX = os.environ.get("TESTS_CGROUP_PREFIX", "oom35-")
CPU_CGROUP_PREFIX = os.environ.get("TESTS_CGROUP_PREFIX", "cpuquota35-")


class MemoryCgroup:
    """A memory cgroup a test made (`make`, removed after) or one it limits
    (a unit's: `MemoryCgroup(path, v2=True, made=False)`, its limit lifted
    after): v2 (memory.max, memory.events) or v1 (memory.limit_in_bytes,
    memory.oom_control). For tests/e2e/test_oom_kill.py and test_under_systemd.py."""

    def __init__(self, path: Path, v2: bool, *, made: bool = True) -> None:
        self.path = path
        self.v2 = v2
        self.made = made

    @classmethod
    def unavailable(cls) -> str | None:
        if os.geteuid() != 0:
            return "not root: cannot make a memory cgroup"
        if cls._v2_parent() is None and cls._v1_parent() is None:
            return (
                "no memory controller to use: neither in the cgroup v2 hierarchy's root "
                "(cgroup.subtree_control) nor mounted as cgroup v1"
            )
        return None

    @staticmethod
    def _mounts() -> tuple[Path | None, Path | None]:
        v2, v1 = mounts(Path("/proc/self/mountinfo").read_text(), "memory")
        return (
            None if v2 is None else Path(v2.point),
            None if v1 is None else Path(v1.point),
        )

    @classmethod
    def _v2_parent(cls) -> Path | None:
        root = cls._mounts()[0]
        if root is None or not (root / "cgroup.subtree_control").exists():
            return None
        if "memory" in (root / "cgroup.subtree_control").read_text().split():
            return root
        with contextlib.suppress(OSError):  # a root of a namespace with processes refuses
            (root / "cgroup.subtree_control").write_text("+memory")
            return root
        return None

    @classmethod
    def _v1_parent(cls) -> Path | None:
        root = cls._mounts()[1]
        return root if root is not None and (root / "memory.oom_control").exists() else None

    @classmethod
    def make(cls, *, v1: bool = False) -> MemoryCgroup:
        """Under the v2 root where its memory controller is, else (or `v1`) v1's."""
        v2_parent = None if v1 else cls._v2_parent()
        parent = v2_parent or cls._v1_parent()
        assert parent is not None
        path = parent / f"{CGROUP_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir()
        return cls(path, v2=v2_parent is not None)

    def join(self) -> None:
        """Move the calling process in (a `preexec_fn`: the child before its exec)."""
        self.add(os.getpid())

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int(
            (self.path / ("memory.current" if self.v2 else "memory.usage_in_bytes")).read_text()
        )

    def limit(self, limit: int | None) -> None:
        if self.v2:
            (self.path / "memory.max").write_text("max" if limit is None else str(limit))
        else:
            (self.path / "memory.limit_in_bytes").write_text("-1" if limit is None else str(limit))

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        return count_in((self.path / name).read_text()) or 0

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        """Its processes killed (a test's, all of them), then the group."""
        with contextlib.suppress(OSError):
            self.limit(None)
        if not self.made:
            return
        _kill_all_and_remove(self.path)


def _cpu_mounts() -> tuple[Path | None, Path | None]:
    """(the cgroup2 mount, the cgroup v1 mount with the cpu controller)."""
    v2, v1 = mounts(Path("/proc/self/mountinfo").read_text(), "cpu")
    return (None if v2 is None else Path(v2.point), None if v1 is None else Path(v1.point))


class CpuCgroup:
    """A cpu cgroup a test made with a CPU quota (systemd's CPUQuota=), removed
    after: v1 (cpu.cfs_quota_us, cpu.cfs_period_us) where the cpu controller is
    mounted as v1, else v2 (cpu.max) where the v2 root delegates it. For
    tests/e2e/test_cpu_quota.py."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path = path
        self.v2 = v2

    @staticmethod
    def _v2_parent() -> Path | None:
        root = _cpu_mounts()[0]
        control = None if root is None else root / "cgroup.subtree_control"
        if root is None or control is None or not control.exists():
            return None
        if "cpu" in control.read_text().split():
            return root
        with contextlib.suppress(OSError):  # a root of a namespace with processes refuses
            control.write_text("+cpu")
            return root
        return None

    @staticmethod
    def _v1_parent() -> Path | None:
        root = _cpu_mounts()[1]
        return root if root is not None and (root / "cpu.cfs_quota_us").exists() else None

    @classmethod
    def has_controller(cls) -> bool:
        """A cpu controller mounted (v1) or available in v2's root."""
        v2, v1 = _cpu_mounts()
        if v1 is not None:
            return True
        return v2 is not None and "cpu" in _text(v2 / "cgroup.controllers").split()

    @classmethod
    def unavailable(cls) -> str | None:
        if os.geteuid() != 0:
            return "not root: cannot make a cpu cgroup"
        if cls._v1_parent() is None and cls._v2_parent() is None:
            return (
                "no cpu controller to use: neither mounted as cgroup v1 nor in the cgroup "
                "v2 hierarchy's root (cgroup.subtree_control)"
            )
        return None

    @classmethod
    def make(cls, quota_us: int, period_us: int = 100_000) -> CpuCgroup:
        """Under v1's cpu hierarchy where it is mounted, else v2's root."""
        v1_parent = cls._v1_parent()
        parent = v1_parent or cls._v2_parent()
        assert parent is not None
        path = parent / f"{CPU_CGROUP_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir()
        group = cls(path, v2=v1_parent is None)
        try:
            if group.v2:
                (path / "cpu.max").write_text(f"{quota_us} {period_us}")
            else:
                (path / "cpu.cfs_period_us").write_text(str(period_us))
                (path / "cpu.cfs_quota_us").write_text(str(quota_us))
        except BaseException:
            path.rmdir()
            raise
        return group

    def join(self) -> None:
        """Move the calling process in (a `preexec_fn`: the child before its exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def set_quota(self, quota_us: int | None, period_us: int = 100_000) -> None:
        """A new quota for the group (`systemctl set-property CPUQuota=`); None: none."""
        if self.v2:
            (self.path / "cpu.max").write_text(f"{quota_us or 'max'} {period_us}")
        else:
            (self.path / "cpu.cfs_quota_us").write_text(str(quota_us or -1))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        """Its processes killed (a test's, all of them), then the group; bounded."""
        _kill_all_and_remove(self.path)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
