"""One process flooding a proxy with hostile connections (``bench.hostile``).

Kinds, all at once, for ``--seconds``:

- heads: ``--concurrency`` connections in a loop, each a fresh TLS connection
  sending one worst-case head and reading the answer's status line: 4,000
  tiny header lines (under 16 KiB; over any header-line limit), 100 lines of
  the largest size that fits 16 KiB, one 16 KiB line, and a 20 KiB head (over
  every size limit). They ask for a route no proxy serves (``/flood``), so
  each is answered by the proxy alone and no fleet is touched.
- slowloris: ``--slowloris`` TLS connections trickling a header line a second,
  reopened when the proxy closes them (at its request timeout).
- handshake garbage: ``--garbage`` connections in a loop, each writing random
  bytes, or a TLS record header and a cut ClientHello, instead of a handshake.

Certificates are not verified (the flood does not care whom it floods), and
sessions are never resumed: every head costs a full handshake, as from a
botnet. Prints one JSON object (counts per kind and status, rates) on stdout.
Everything stays on the address given (loopback in the bench).

    python -m bench.flood --url 127.0.0.1:8443 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from collections import Counter
from typing import Any

import uvloop

LIMIT = 16384
MAX_SECONDS = 600.0
START = b"GET /flood HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: flood\r\n"


def _lines(count: int, size: int) -> bytes:
    """`count` header lines of `size` bytes each, CRLF included."""
    return b"".join(b"X-Pad-%03d: " % i + b"v" * (size - 13 - 2) + b"\r\n" for i in range(count))


def heads() -> dict[str, bytes]:
    fixed = len(START) + 2
    largest = (LIMIT - fixed) // 97
    return {
        "4000-tiny-lines": START + b"a:\r\n" * 3990 + b"\r\n",
        "100-largest-lines": START + _lines(97, largest) + b"\r\n",
        "one-16k-line": START + b"X-Big: " + b"a" * (LIMIT - fixed - 9) + b"\r\n\r\n",
        "20k-head": START + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n",
    }


class Flood:
    def __init__(self, host: str, port: int, until: float) -> None:
        self.host, self.port, self.until = host, port, until
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.statuses: dict[str, Counter[str]] = {}
        self.slowloris_opened = 0
        self.slowloris_closed_by_server = 0
        self.garbage_sent = 0

    def count(self, kind: str, what: str) -> None:
        self.statuses.setdefault(kind, Counter())[what] += 1

    async def head_loop(self, offset: int) -> None:
        shapes = list(heads().items())
        i = offset
        while time.monotonic() < self.until:
            kind, raw = shapes[i % len(shapes)]
            i += 1
            writer = None
            try:
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.ctx, server_hostname="localhost"
                    )
                    writer.write(raw)
                    got = await reader.read(4096)
                status = got[9:12].decode("latin-1") if got.startswith(b"HTTP/1.") else "none"
                self.count(kind, status or "none")
            except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
                self.count(kind, type(exc).__name__)
            finally:
                if writer is not None:
                    writer.transport.abort()

    async def slowloris_one(self) -> None:
        while time.monotonic() < self.until:
            writer = None
            try:
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.ctx, server_hostname="localhost"
                    )
                self.slowloris_opened += 1
                writer.write(b"GET /ws/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                n = 0
                while time.monotonic() < self.until:
                    n += 1
                    writer.write(b"X-Slow-%d: a\r\n" % n)
                    try:
                        async with asyncio.timeout(1.0):
                            if not await reader.read(4096):
                                break
                            self.slowloris_closed_by_server += 1
                            break  # answered (408): reopen
                    except TimeoutError:
                        continue
            except (OSError, ssl.SSLError, TimeoutError):
                await asyncio.sleep(0.1)
            finally:
                if writer is not None:
                    writer.transport.abort()

    async def garbage_loop(self, offset: int) -> None:
        i = offset
        while time.monotonic() < self.until:
            i += 1
            if i % 2:
                junk = os.urandom(512)
            else:  # a TLS handshake record that stops a third of the way in
                junk = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(160)
            writer = None
            try:
                async with asyncio.timeout(3):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    writer.write(junk)
                    self.garbage_sent += 1
                    if i % 2:
                        await reader.read(4096)  # the proxy's alert or close
            except (OSError, TimeoutError):
                pass
            finally:
                if writer is not None:
                    writer.transport.abort()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.url.rpartition(":")
    seconds = min(args.seconds, MAX_SECONDS)
    started = time.monotonic()
    flood = Flood(host, int(port), started + seconds)
    tasks = [flood.head_loop(i) for i in range(args.concurrency)]
    tasks += [flood.slowloris_one() for _ in range(args.slowloris)]
    tasks += [flood.garbage_loop(i) for i in range(args.garbage)]
    cpu0 = time.process_time()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    heads_done = sum(sum(c.values()) for c in flood.statuses.values())
    return {
        "seconds": round(elapsed, 3),
        "heads": heads_done,
        "heads_per_s": round(heads_done / elapsed, 1),
        "statuses": {k: dict(v) for k, v in flood.statuses.items()},
        "slowloris_opened": flood.slowloris_opened,
        "slowloris_answered": flood.slowloris_closed_by_server,
        "garbage_connections": flood.garbage_sent,
        "garbage_per_s": round(flood.garbage_sent / elapsed, 1),
        "generator_cpu_s": round(time.process_time() - cpu0, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    p.add_argument("--url", required=True, help="HOST:PORT of the proxy")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8, help="head connections at once")
    p.add_argument("--slowloris", type=int, default=100)
    p.add_argument("--garbage", type=int, default=2, help="garbage connections at once")
    args = p.parse_args(argv)
    result = uvloop.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
