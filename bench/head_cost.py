"""What one request head costs the event loop, end to end (no sockets).

Everything the ingress does synchronously with a carrier's head before the
first await: `RequestHeadReader.feed` (size and line limits, then the read, by
h11 or, for a plain head, as h11 reads it, and our checks), the route, the
upgrade check, the fleet's head (`fleet_request_headers` and `FleetExchange`,
h11 serializing it). Timed with `time.perf_counter` around
that work for each head shape, many times; the median and p99 are what one such
head holds every live call's frames for.

The shapes are the worst that still pass the limits (16 KiB, 100 header lines)
and, for comparison, a normal call head and what the limits now refuse. Also:
one TLS handshake's server side (memory BIOs, so only the crypto and OpenSSL's
state machine are timed), and one stats / metrics / admin answer of a running
ingress's state.

    .venv/bin/python -m bench.head_cost [--reps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from fleet_ingress.core.fleet_exchange import FleetExchange
from fleet_ingress.core.forwarding import fleet_request_headers
from fleet_ingress.core.request_head import RequestHeadReader, RequestRefused
from fleet_ingress.core.routing import Router

LIMIT = 16384
MAX_LINES = 100
ROUTER = Router(["/ws/", "/exotel/"], "/haproxy-health")
START = b"GET /ws/bot-1?call=42 HTTP/1.1\r\nHost: calls.example.com\r\n"
UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def _fill(lines: int, make: Callable[[int, int], bytes]) -> bytes:
    """START + UPGRADE + `lines` more header lines of the most bytes that fit LIMIT."""
    fixed = len(START) + len(UPGRADE) + 2
    each = (LIMIT - fixed) // lines  # bytes per line, CRLF included
    body = b"".join(make(i, each - 2) + b"\r\n" for i in range(lines))
    head = START + UPGRADE + body + b"\r\n"
    assert len(head) <= LIMIT, len(head)
    return head


def _name_value(i: int, size: int) -> bytes:
    name = b"X-Pad-%03d: " % i
    return name + b"v" * (size - len(name))


def _one_line(size: int) -> bytes:
    return START + UPGRADE + b"X-Big: " + b"a" * size + b"\r\n\r\n"


def shapes() -> dict[str, bytes]:
    """name -> head bytes. The worst that pass, one normal, two refused for comparison."""
    upgrade_lines = UPGRADE.count(b"\r\n") + 1  # + Host
    room = MAX_LINES - upgrade_lines
    long_size = LIMIT - len(START) - len(UPGRADE) - len(b"X-Big: \r\n\r\n")
    cookie_room = long_size - len(b"Cookie: ") + len(b"X-Big: ")
    cookies = b"; ".join(b"c%d=v" % i for i in range(4000))[:cookie_room].rpartition(b";")[0]
    forwarded = b", ".join(b"198.51.100.%d" % (i % 256) for i in range(2000))
    forwarded = forwarded[: long_size - 10].rpartition(b",")[0]
    connection_tokens = b", ".join([b"Upgrade"] + [b"x-t%d" % i for i in range(3000)])
    connection_tokens = connection_tokens[: long_size - 12].rpartition(b",")[0]
    target = b"/ws/" + b"b%20" * ((LIMIT - 300) // 4)
    return {
        "normal call head": START + UPGRADE + b"User-Agent: carrier/1.0\r\n\r\n",
        f"{room} lines, largest that fit": _fill(room, _name_value),
        f"{room} tiny lines": START + UPGRADE + b"a:\r\n" * room + b"\r\n",
        "one 16 KiB line": _one_line(long_size),
        "16 KiB of cookies": START + UPGRADE + b"Cookie: " + cookies + b"\r\n\r\n",
        f"{room} Cookie lines": _fill(room, lambda i, n: b"Cookie: c%03d=" % i + b"v" * (n - 13)),
        "16 KiB X-Forwarded-For list": START
        + UPGRADE
        + b"X-Forwarded-For: "
        + forwarded
        + b"\r\n\r\n",
        "16 KiB of Connection tokens": START.replace(b"Host", b"Host", 1)
        + UPGRADE.replace(b"Connection: Upgrade", b"Connection: " + connection_tokens)
        + b"\r\n",
        "16 KiB target": b"GET "
        + target
        + b" HTTP/1.1\r\nHost: calls.example.com\r\n"
        + UPGRADE
        + b"\r\n",
        f"{room} lines with 80 x '_' names": _fill(
            room, lambda i, n: b"X_F_" + b"_" * 60 + b"%03d: " % i + b"v" * (n - 69)
        ),
        "refused: 101 lines": START + UPGRADE + b"a:\r\n" * (room + 1) + b"\r\n",
        "refused: 4,000 tiny lines (was accepted)": START + UPGRADE + b"a:\r\n" * 4000 + b"\r\n",
    }


def handle(raw: bytes, pieces: int = 1) -> int:
    """The synchronous work of one head, as the carrier protocol does it."""
    reader = RequestHeadReader(LIMIT, MAX_LINES)
    step = -(-len(raw) // pieces)
    try:
        head = None
        for at in range(0, len(raw), step):
            head = reader.feed(raw[at : at + step])
    except RequestRefused as refused:
        return refused.status
    assert head is not None
    route = ROUTER.route(head.path.decode("latin-1"))
    assert route.prefix and head.is_websocket_upgrade, route
    exchange = FleetExchange(
        head.method,
        head.target,
        fleet_request_headers(head, fleet_host="fleet-1.example.com", client_ip="203.0.113.7"),
        max_head_bytes=LIMIT,
    )
    assert exchange.request_bytes
    return 101


def _summary(samples: list[float], prefix: str = "") -> dict[str, float]:
    samples = sorted(samples)
    return {
        f"{prefix}median_ms": statistics.median(samples) * 1000,
        f"{prefix}p99_ms": samples[max(0, int(len(samples) * 0.99) - 1)] * 1000,
        f"{prefix}max_ms": samples[-1] * 1000,
    }


def timed(work: Callable[[], object], reps: int) -> dict[str, float]:
    """Wall time (perf_counter: what the loop is held for, preemption included) and
    this thread's CPU time (thread_time: the work's own cost, on a shared machine)."""
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.thread_time()
        work()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return {**_summary(wall), **_summary(cpu, "cpu_")}


def tls_handshake_cost(reps: int, key_type: str) -> dict[str, float]:
    """The server side of one full TLS handshake (no resumption), memory BIOs."""
    import trustme

    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    cert = ca.issue_cert("calls.example.com", key_type=getattr(trustme.KeyType, key_type))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    samples, cpu_samples = [], []
    for _ in range(reps):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname="calls.example.com")
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        server_time = server_cpu = 0.0
        for _ in range(10):
            for side, out, into in ((client, c_out, s_in), (server, s_out, c_in)):
                start, start_cpu = time.perf_counter(), time.thread_time()
                try:
                    side.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                if side is server:
                    server_time += time.perf_counter() - start
                    server_cpu += time.thread_time() - start_cpu
                into.write(out.read())
            if done and client.version():
                break
        samples.append(server_time)
        cpu_samples.append(server_cpu)
    return {**_summary(samples), **_summary(cpu_samples, "cpu_")}


async def stats_costs(reps: int, fleets: int, calls: int) -> dict[str, dict[str, float]]:
    """/stats, /stats.json, /metrics and the admin `stat` of an ingress with
    `fleets` fleets: the synchronous part of each answer (no aiohttp)."""
    from prometheus_client import generate_latest

    from fleet_ingress.config.fleets_file import parse_fleets_text
    from fleet_ingress.config.settings import config_from_dict
    from fleet_ingress.ops.stats_page import render_stats_page
    from fleet_ingress.service.ingress import Ingress

    lines = "\n".join(f"https://fleet{i}.example.com name=f{i}" for i in range(fleets))
    config = config_from_dict({"listen": {"acme": "", "stats": "", "admin_socket": ""}})
    ctx = ssl.create_default_context()
    ingress = Ingress(
        config,
        parse_fleets_text(lines, default_maxconn=16),
        server_ssl=ctx,
        fleet_ssl=ctx,
        health_checks=False,
    )
    for fleet in ingress.balancer.fleets:
        fleet.active = calls // fleets
        fleet.responses[101] = 1000
    out = {
        "/stats page": timed(lambda: render_stats_page(ingress.snapshot()), reps),
        "/stats.json (and admin stat)": timed(lambda: json.dumps(ingress.snapshot()), reps),
        "/metrics": timed(lambda: generate_latest(ingress.metrics.prometheus), reps),
    }
    return out


def _line(f: dict[str, float]) -> str:
    keys = ("median_ms", "p99_ms", "max_ms", "cpu_median_ms", "cpu_p99_ms")
    return " ".join(f"{f[k]:7.3f}" for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.head_cost", description=__doc__)
    parser.add_argument("--reps", type=int, default=2000, help="repetitions per shape")
    parser.add_argument("--tls-reps", type=int, default=200)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    reps = max(10, min(args.reps, 100_000))
    results: dict[str, Any] = {"heads": {}, "tls": {}, "stats": {}}
    print(f"one head, end to end, {reps} reps each (ms of event loop)", file=sys.stderr)
    print(
        f"{'head':42} {'bytes':>6} {'reads':>5} {'status':>6} {'median':>7} {'p99':>7} "
        f"{'max':>7} {'cpu med':>7} {'cpu p99':>7}"
    )
    for name, raw in shapes().items():
        for pieces in (1, 16):
            status = handle(raw, pieces)
            figures = timed(lambda raw=raw, pieces=pieces: handle(raw, pieces), reps)
            results["heads"][f"{name} / {pieces}"] = {
                "bytes": len(raw),
                "status": status,
                **figures,
            }
            print(f"{name:42} {len(raw):6} {pieces:5} {status:6} {_line(figures)}")
    tls_reps = max(10, min(args.tls_reps, 5000))
    for key_type in ("ECDSA", "RSA"):
        figures = tls_handshake_cost(tls_reps, key_type)
        results["tls"][key_type] = figures
        print(f"{'TLS handshake, server side, ' + key_type:62} {_line(figures)}")
    for fleets, calls in ((2, 32), (20, 320)):
        for name, figures in asyncio.run(stats_costs(min(reps, 500), fleets, calls)).items():
            results["stats"][f"{name}, {fleets} fleets"] = figures
            print(f"{f'{name}, {fleets} fleets':62} {_line(figures)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
