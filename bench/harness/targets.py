"""What the carriers call: a fleet directly, fleet-ingress, HAProxy, or the bare splice.

Both proxies are configured from one :class:`Settings`, so they balance,
check, retry and time out alike (the reference design's HAProxy ingress):
leastconn, ``maxconn`` per fleet, a health check of ``GET /health/fleet`` every
second with fall 2 / rise 2, three retries on conn-failure, empty-response and
response-timeout with redispatch, TLS on both sides (TLS 1.2 floor, ALPN
http/1.1 to carriers, fleet certificates verified against the CA with SNI),
tunnel timeout 1 h, no access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import procfs
from .carrier import FramePool, Recorder, open_call
from .children import HOST, Children, child_env, free_port, python_module
from .tlsfiles import TLSFiles

BARE_SPLICE = Path(__file__).resolve().parents[1] / "bare_splice.py"
# The bare relays by target: uvloop's SSL transports, or socket BIOs (net/tls_socket.py).
# `lean`: the floor of a call's work on that layer (head, route, leastconn, rewrite, 101
# checked), none of the design's machinery (bench/lean_call_splice.py).
BARE_SPLICES = {
    "bare": BARE_SPLICE,
    "bare-bio": BARE_SPLICE.with_name("bare_bio_splice.py"),
    "lean": BARE_SPLICE.with_name("lean_call_splice.py"),
}
READY_TIMEOUT = 20.0
TARGETS = ("direct", "ingress", "ingress1p", "haproxy", "bare", "bare-bio", "lean")
# fleet-ingress's Ingress in one process, no supervisor (its slot table in-process).
ONE_PROCESS_INGRESS = Path(__file__).resolve().parent.parent / "one_process_ingress.py"
LABELS = {
    "direct": "direct",
    "ingress": "fleet-ingress",
    "ingress1p": "fleet-ingress in one process (bench floor: no supervisor)",
    "haproxy": "HAProxy",
    "bare": "bare splice",
    "bare-bio": "bare socket-BIO splice",
    "lean": "lean call path (bench floor)",
}


def splice_argv(
    kind: str, port: int, tls: TLSFiles, fleet_ports: list[int], maxconn: int
) -> list[str]:
    """The command line of a bench splice (`BARE_SPLICES`) listening on `port`: the
    bare ones take no maxconn (no balancing); `lean` takes the run's, as the ingress does."""
    argv = [sys.executable, str(BARE_SPLICES[kind]), "--listen", f"{HOST}:{port}"]
    argv += ["--cert", str(tls.server_cert), "--key", str(tls.server_key), "--ca", str(tls.ca)]
    for p in fleet_ports:
        argv += ["--fleet", f"{HOST}:{p}"]
    if kind == "lean":
        argv += ["--maxconn", str(maxconn)]
    return argv


def base(name: str) -> str:
    """``ingress@mmap128`` -> ``ingress``: a variant runs the same program, other environment."""
    return name.partition("@")[0]


# Variants every run knows without ``--variant``: the process layout of each proxy, and
# "pin" for a worker (thread) per CPU: fleet-ingress's process.cpu_affinity = "auto",
# HAProxy's cpu-map.
BUILTIN_VARIANTS = {
    "ingress": (re.compile(r"w([1-9][0-9]?)(pin)?"), "ingress_workers", "ingress_pinned"),
    "haproxy": (re.compile(r"nt([1-9][0-9]?)(pin)?"), "haproxy_nbthread", "haproxy_pinned"),
}


def builtin_variant(name: str) -> dict[str, int | bool] | None:
    """``ingress@w2`` -> {"ingress_workers": 2}, ``haproxy@nt2pin`` ->
    {"haproxy_nbthread": 2, "haproxy_pinned": True}; None for a plain target or
    a variant of the environment only (``--variant``)."""
    kind, _, variant = name.partition("@")
    rule = BUILTIN_VARIANTS.get(kind)
    if rule is None or not (m := rule[0].fullmatch(variant)):
        return None
    count, pinned = rule[1], rule[2]
    return {count: int(m.group(1)), **({pinned: True} if m.group(2) else {})}


def target_settings(name: str, settings: Settings) -> Settings:
    """The run's settings with a built-in variant's settings applied (the rest shared)."""
    built_in = builtin_variant(name)
    if built_in is None:
        return settings
    return dataclasses.replace(settings, **built_in)  # type: ignore[arg-type]


def label(name: str) -> str:
    b, _, variant = name.partition("@")
    return LABELS.get(b, b) + (f"@{variant}" if variant else "")


@dataclass(frozen=True)
class Settings:
    """The ingress settings both proxies are rendered from (SPEC defaults unless noted)."""

    maxconn: int = 16  # per fleet; the bench raises it to the fleets' capacity
    retries: int = 3
    retry_on: tuple[str, ...] = ("conn-failure", "empty-response", "response-timeout")
    health_path: str = "/health/fleet"
    capacity_key: str = "fleet_available"
    check_interval: float = 1.0
    check_timeout: float = 1.0
    fall: int = 2
    rise: int = 2
    connect: float = 3.0
    response: float = 5.0
    request: float = 10.0
    queue: float = 3.0
    tunnel: float = 3600.0
    max_connections: int = 8000
    proxy_routes: tuple[str, ...] = ("/ws/", "/exotel/")
    health_route: str = "/haproxy-health"
    tls_min: str = "TLSv1.2"
    haproxy_nbthread: int = 1
    # fleet-ingress's worker processes ([process] workers), beside a supervisor: 1 is
    # like for like with nbthread 1; "auto" is the product's default (one per CPU).
    ingress_workers: int | str = 1
    ingress_pinned: bool = False  # [process] cpu_affinity = "auto"
    ingress_accept: str = "spread"  # [process] accept: "first" takes connections in rank order
    haproxy_pinned: bool = False  # cpu-map: thread N on the Nth CPU
    haproxy_extra: tuple[str, ...] = ()  # lines added to ``defaults`` (experiments only)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def render_ingress(
    settings: Settings,
    tls: TLSFiles,
    port: int,
    fleet_ports: list[int],
    directory: Path,
    stats_port: int | None = None,
) -> Path:
    """fleet-ingress's config; its stats listener only with ``stats_port`` (the soak reads
    ``/stats.json``; the side-by-side runs leave it off, as HAProxy has none)."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    s = settings
    fleets_file = directory / "fleets.txt"
    fleets_file.write_text(
        "".join(
            f"https://{HOST}:{p} name=fleet-{'abcdefgh'[i]}\n" for i, p in enumerate(fleet_ports)
        )
    )
    config = directory / "ingress.toml"
    config.write_text(
        f"""# rendered by bench/harness/targets.py from {s}
[listen]
wss = {q(f"{HOST}:{port}")}
acme = ""
stats = {q(f"{HOST}:{stats_port}" if stats_port else "")}
admin_socket = ""

[tls]
cert = {q(str(tls.server_cert))}
key = {q(str(tls.server_key))}
ca_file = {q(str(tls.ca))}
min_version = {q(s.tls_min)}

[routes]
proxy = {q(list(s.proxy_routes))}
health = {q(s.health_route)}

[fleets]
file = {q(str(fleets_file))}
maxconn = {s.maxconn}
ca_file = {q(str(tls.ca))}
health_path = {q(s.health_path)}
capacity_key = {q(s.capacity_key)}
check_interval = {s.check_interval}
check_timeout = {s.check_timeout}
fall = {s.fall}
rise = {s.rise}

[retry]
retries = {s.retries}
retry_on = {q(list(s.retry_on))}

[timeouts]
connect = {s.connect}
response = {s.response}
request = {s.request}
queue = {s.queue}
tunnel = {s.tunnel}
drain = 2.0

[limits]
max_connections = {s.max_connections}

[process]
workers = {q(s.ingress_workers) if isinstance(s.ingress_workers, str) else s.ingress_workers}
{'cpu_affinity = "auto"' if s.ingress_pinned else ""}
{f"accept = {q(s.ingress_accept)}" if s.ingress_accept != "spread" else ""}

[log]
level = "warning"
access = false
"""
    )
    return config


def haproxy_check_regex(key: str) -> str:
    """The design's body match without its upper bound (1..16 coupled to maxconn 16), and
    with an optional space after the colon: the simulated fleet writes ``"key": 12``."""
    return f'\\"{key}\\": ?[1-9][0-9]*[,}}]'


def ms(seconds: float) -> str:
    """HAProxy durations take integers: 1.5 s is written 1500ms."""
    return f"{round(seconds * 1000)}ms"


def render_haproxy(
    settings: Settings, tls: TLSFiles, port: int, fleet_ports: list[int], directory: Path
) -> Path:
    s = settings
    retry_on = " ".join(s.retry_on)
    routes = " ".join(s.proxy_routes)
    servers = "\n".join(
        f"    server fleet-{'abcdefgh'[i]} {HOST}:{p}" for i, p in enumerate(fleet_ports)
    )
    checks = f"check inter {ms(s.check_interval)} fall {s.fall} rise {s.rise} maxconn {s.maxconn}"
    server_tls = f"ssl verify required ca-file {tls.ca} sni str(localhost) check-sni localhost"
    extra = "".join(f"    {line}\n" for line in s.haproxy_extra)
    cpus = sorted(os.sched_getaffinity(0))
    cpu_map = (
        "".join(f"    cpu-map 1/{t + 1} {cpus[t % len(cpus)]}\n" for t in range(s.haproxy_nbthread))
        if s.haproxy_pinned
        else ""
    )
    cfg = directory / "haproxy.cfg"
    cfg.write_text(
        f"""# rendered by bench/harness/targets.py from {s}
global
    nbthread {s.haproxy_nbthread}
{cpu_map}    maxconn {s.max_connections}
    ssl-server-verify required

defaults
    mode http
    timeout connect {ms(s.connect)}
    timeout client {ms(s.request)}
    timeout http-request {ms(s.request)}
    timeout server {ms(s.response)}
    timeout queue {ms(s.queue)}
    timeout tunnel {ms(s.tunnel)}
    timeout check {ms(s.check_timeout)}
    retries {s.retries}
    retry-on {retry_on}
    option redispatch
{extra}
frontend carriers
    bind {HOST}:{port} ssl crt {tls.server_combined} alpn http/1.1 ssl-min-ver {s.tls_min}
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request return status 200 content-type text/plain string ok if {{ path {s.health_route} }}
    acl call_route path_beg {routes}
    http-request deny deny_status 404 unless call_route
    default_backend fleets

backend fleets
    balance leastconn
    option httpchk GET {s.health_path}
    http-check send hdr Host {HOST}
    http-check expect rstring "{haproxy_check_regex(s.capacity_key)}"
    default-server {checks} {server_tls}
{servers}
"""
    )
    return cfg


@dataclass
class Target:
    name: str
    urls: list[tuple[str, int]]
    proc: asyncio.subprocess.Process | None = None
    log: Path | None = None
    config: Path | None = None
    ready_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: Settings | None = None
    notify: socket.socket | None = None  # fleet-ingress's NOTIFY_SOCKET, open while it runs

    def close_notify(self) -> None:
        """After the process has exited (it notifies STOPPING=1 on the way out)."""
        if self.notify is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.notify)
            self.notify.close()
            self.notify = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def label(self) -> str:
        return label(self.name)

    @property
    def kind(self) -> str:
        return base(self.name)


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )


def haproxy_version() -> str | None:
    binary = haproxy_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else None


async def start_target(
    name: str,
    children: Children,
    tls: TLSFiles,
    settings: Settings,
    fleet_ports: list[int],
    directory: Path,
    *,
    cpus: set[int] | None = None,
    env: dict[str, str] | None = None,
    stats_port: int | None = None,
) -> Target:
    """Start ``name`` (``direct`` starts nothing) and wait until it is ready (fleet-ingress:
    sd_notify READY=1, sent once every worker has joined) and a real call goes through."""
    kind = base(name)
    settings = target_settings(name, settings)
    if kind == "direct":
        return Target(name, [(HOST, p) for p in fleet_ports], settings=settings)
    port = free_port()
    directory = directory / name.replace("@", "-")
    directory.mkdir(exist_ok=True)
    config = None
    env = dict(env or {})
    notify: socket.socket | None = None
    if kind == "ingress":
        config = render_ingress(settings, tls, port, fleet_ports, directory, stats_port)
        argv = python_module("fleet_ingress", "run", "-c", str(config))
        notify, env["NOTIFY_SOCKET"] = notify_socket()
    elif kind == "ingress1p":
        config = render_ingress(settings, tls, port, fleet_ports, directory, stats_port)
        argv = [sys.executable, str(ONE_PROCESS_INGRESS), "-c", str(config)]
    elif kind == "haproxy":
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        config = render_haproxy(settings, tls, port, fleet_ports, directory)
        argv = [binary, "-db", "-f", str(config)]
    elif kind in BARE_SPLICES:
        argv = splice_argv(kind, port, tls, fleet_ports, settings.maxconn)
    else:
        raise ValueError(name)
    log = directory / "stderr.log"
    with log.open("wb") as err:
        proc = await children.spawn(
            argv,
            stdout=err,
            stderr=err,
            cpus=cpus,
            env=child_env(env),
        )
    target = Target(name, [(HOST, port)], proc, log, config, env=env, settings=settings)
    target.notify = notify
    started = time.monotonic()
    try:
        if notify is not None:
            await wait_notified_ready(target, notify, started + READY_TIMEOUT)
        await wait_ready(target, tls.carrier_context(), settings.proxy_routes[0])
        if kind == "ingress":
            await warm_every_worker(target, tls.carrier_context(), settings.proxy_routes[0])
    except BaseException:
        target.close_notify()
        raise
    target.ready_s = round(time.monotonic() - started, 2)
    return target


_notify_seq = itertools.count(1)


def notify_socket() -> tuple[socket.socket, str]:
    """systemd's side of sd_notify: a datagram socket (abstract namespace: no file, no
    path length limit) the target's READY=1 comes to, and its NOTIFY_SOCKET value."""
    name = f"fleet-ingress-bench-{os.getpid()}-{next(_notify_seq)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind("\0" + name)
    sock.setblocking(False)
    return sock, "@" + name


def notify_ready(message: bytes) -> bool:
    """Whether one sd_notify datagram says READY=1 (lines of KEY=VALUE)."""
    return "READY=1" in message.decode(errors="replace").splitlines()


async def wait_notified_ready(target: Target, sock: socket.socket, deadline: float) -> None:
    """Until the target sends READY=1: a supervisor says it once every worker has joined,
    so that no worker's start-up (its baseline RSS, its imports' CPU) falls in a window.
    Then the socket is drained for the target's life: it keeps sending STATUS= lines, and
    a full socket would block its sends."""
    assert target.proc is not None
    loop = asyncio.get_running_loop()
    # Read by a reader callback, not `sock_recv` under a timeout: a timeout that
    # fires in the turn a datagram was read cancels the task with the datagram
    # taken off the socket and dropped, and a READY=1 lost so left the run
    # waiting its 20 s (test_bench_steady_tiny failed so in CI, 1 run in ~6).
    ready = loop.create_future()

    def read() -> None:
        while True:
            try:
                message = sock.recv(4096)
            except OSError:  # BlockingIOError: nothing more now
                return
            if notify_ready(message) and not ready.done():
                ready.set_result(None)

    loop.add_reader(sock, read)
    try:
        while target.proc.returncode is None and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(min(0.5, max(0.01, deadline - time.monotonic()))):
                    await asyncio.shield(ready)
            except TimeoutError:
                continue
            loop.remove_reader(sock)
            loop.add_reader(sock, _drain, sock)
            return
    finally:
        if not ready.done():
            loop.remove_reader(sock)
    tail = target.log.read_text(errors="replace")[-2000:] if target.log else ""
    raise RuntimeError(
        f"{target.label} sent no READY=1 within {READY_TIMEOUT:g} s "
        f"(exit {target.proc.returncode}):\n{tail}"
    )


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


async def wait_ready(target: Target, ctx: ssl.SSLContext, route: str) -> None:
    """Until a real call (TLS, upgrade, 101 from a fleet) goes through the target."""
    assert target.proc is not None
    pool = FramePool.build("binary")
    deadline = time.monotonic() + READY_TIMEOUT
    for _ in range(int(READY_TIMEOUT / 0.2)):
        if target.proc.returncode is not None or time.monotonic() > deadline:
            break
        call = await open_call(Recorder(), pool, target.urls[0], f"{route}ready", ctx, 0, 2.0)
        if call is not None:
            await call.finish(1.0, 2.0)
            return
        await asyncio.sleep(0.2)
    tail = target.log.read_text(errors="replace")[-2000:] if target.log else ""
    raise RuntimeError(
        f"{target.label} not serving calls after {READY_TIMEOUT:g} s "
        f"(exit {target.proc.returncode}):\n{tail}"
    )


WARM_ROUNDS = 6


async def warm_every_worker(target: Target, ctx: ssl.SSLContext, route: str) -> None:
    """Until every worker process has served a call: the kernel hands connections to
    whichever worker accepts first, so the ready call warmed one. A worker's first call
    faults in code and allocator pages (about 100 KiB); taken after the baseline, that
    fixed cost would be counted as memory per call. A worker holding a call has more
    descriptors open than idle, which tells which ones took a call; bounded rounds of
    more calls held at once, then a note if some worker never got one."""
    assert target.proc is not None
    workers = procfs.descendants(target.proc.pid)[1:]
    if len(workers) < 2:
        return
    idle = {w: procfs.fd_count(w) for w in workers}
    pool = FramePool.build("binary")
    warmed: set[int] = set()
    for attempt in range(1, WARM_ROUNDS + 1):
        opened = await asyncio.gather(
            *(
                open_call(Recorder(), pool, target.urls[0], f"{route}warm", ctx, 0, 2.0)
                for _ in range(2 * len(workers) * attempt)
            )
        )
        calls = [c for c in opened if c is not None]
        now = {w: procfs.fd_count(w) for w in workers}
        warmed |= {w for w in workers if (now[w] or 0) > (idle[w] or 0)}
        await asyncio.gather(*(c.finish(1.0, 2.0) for c in calls))
        if warmed == set(workers):
            return
        await asyncio.sleep(0.2)
    target.notes.append(
        f"workers {sorted(set(workers) - warmed)} took no warm-up call in {WARM_ROUNDS} "
        "rounds: their first calls' memory counts as per call"
    )


async def get_json(
    port: int, path: str, ctx: ssl.SSLContext | None = None
) -> dict[str, Any] | None:
    """``GET path`` on 127.0.0.1:``port`` (TLS with ``ctx``) as a JSON object; None if it
    does not answer in 2 s, or not with JSON. At most 4 MiB is read."""
    try:
        async with asyncio.timeout(2.0):
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=ctx, server_hostname=HOST if ctx else None
            )
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while len(data) < 4 << 20 and (chunk := await reader.read(65536)):
                data += chunk
            writer.close()
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    try:
        return dict(json.loads(body))
    except (ValueError, TypeError):
        return None


async def fleet_available(port: int, ctx: ssl.SSLContext) -> int | None:
    """The fleet's own ``fleet_available`` (GET /health/fleet), None if it does not answer."""
    health = await get_json(port, "/health/fleet", ctx)
    try:
        return int(health["fleet_available"])  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        return None
