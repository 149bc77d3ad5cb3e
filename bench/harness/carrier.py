"""A lean simulated carrier: the load generator's calls, cheap enough not to be the bottleneck.

``fleet_ingress.sim.run_call`` (websockets) costs about 40 % of a core at 100
twilio-like calls, as much as the ingress it measures; this client streams the
same frames (``fleet_ingress.sim.PROFILES``: exotel, twilio-like, binary) for a
fraction of that:

- RFC 6455 client on a plain ``asyncio.Protocol`` over TLS: upgrade request,
  101 check (``Sec-WebSocket-Accept`` verified), masked client frames,
  unmasked server frames parsed, close handshake (1000);
- a pool of each profile's frames is built and masked once per process, so a
  send is one ``transport.write`` of ready bytes; call ``i`` starts at a
  different place in the pool, so calls crossed over would show as corrupt;
- the fleet echoes in order on one TCP stream, so echo ``k`` must equal frame
  ``k`` byte for byte: the first outstanding frame gives the round trip, a
  mismatch counts as corrupt, and what is still outstanding at the end is lost.

Timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process
on the host), so the orchestrator cuts measurement windows out of what each
generator process recorded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import ssl
import time
from array import array
from collections import deque
from dataclasses import dataclass, field

from fleet_ingress.sim import PROFILES

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
POOL_SECONDS = 5.0  # distinct frames in the pool: this many seconds of audio
MAX_HEAD = 16384


def mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def client_frame(payload: bytes, opcode: int, key: bytes) -> bytes:
    """One masked, final client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + mask(payload, key)


@dataclass(frozen=True)
class FramePool:
    interval: float
    wire: list[bytes]  # masked frames as sent
    payload: list[bytes]  # what the echo must carry

    @classmethod
    def build(cls, profile: str, seed: int = 0) -> FramePool:
        prof = PROFILES[profile]
        key = random.Random(seed).randbytes(4)
        wire, payloads = [], []
        for seq in range(max(2, round(POOL_SECONDS / prof.interval))):
            frame = prof.make_frame(seq)
            data, opcode = (frame.encode(), 1) if isinstance(frame, str) else (frame, 2)
            wire.append(client_frame(data, opcode, key))
            payloads.append(data)
        return cls(prof.interval, wire, payloads)


@dataclass
class Recorder:
    """What every call of one generator process did, as flat arrays (cheap to append)."""

    sent_t: array = field(default_factory=lambda: array("d"))  # one per frame sent
    recv_t: array = field(default_factory=lambda: array("d"))  # one per echo matched
    rtt_ms: array = field(default_factory=lambda: array("d"))  # same index as recv_t
    handshake_ms: list[float] = field(default_factory=list)
    handshake_t: list[float] = field(default_factory=list)  # when each handshake ended
    established: int = 0
    failed: int = 0
    finished: int = 0
    lost: int = 0
    corrupt: int = 0
    unexpected: int = 0  # data messages with nothing outstanding
    errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    fleets: dict[str, int] = field(default_factory=dict)
    # Calls by the TLS version and cipher the proxy chose ("TLSv1.3 TLS_AES_256_GCM_SHA384"):
    # the generator's work a message is the same behind two proxies only if these are.
    tls: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class LeanCall(asyncio.Protocol):
    """One carrier call: upgrade, stream frames on a steady clock, read echoes, close."""

    def __init__(self, rec: Recorder, pool: FramePool, path: str, host: str, offset: int) -> None:
        self.rec = rec
        self.pool = pool
        self.path = path
        self.host = host
        self.offset = offset
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outstanding: deque[tuple[float, bytes]] = deque()
        self.drained: asyncio.Event | None = None
        self.failed = False
        self.close_sent = False
        self.close_received = False
        self.finishing = False
        self.seq = 0
        self.t_start = 0.0
        self._buf = bytearray()
        self._head = bytearray()
        self._key = base64.b64encode(os.urandom(16))
        self._timer: asyncio.TimerHandle | None = None
        self._stream_until = 0.0

    # -- connection --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\nUser-Agent: fleet-ingress-bench\r\n\r\n"
        )
        transport.write(request.encode())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
        if not self.upgraded.done():
            self.upgraded.set_result(False)
            self._fail("closed before 101" if exc is None else f"{type(exc).__name__}")
        elif not self.close_sent and not self.failed:
            self._fail("closed by server during the call")
        if self.drained is not None:
            self.drained.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.failed:
            self.failed = True
            self.rec.failed += 1
            self.rec.error(why)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._refuse("response head too large")
                return
            self._on_head(bytes(self._head[: end + 4]))
            rest = bytes(self._head[end + 4 :])
            self._head.clear()
            if rest and not self.failed:
                self._frames(rest)
            return
        self._frames(data)

    def _refuse(self, why: str) -> None:
        self.upgraded.set_result(False)
        self._fail(why)
        if self.transport is not None:
            self.transport.close()

    def _on_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = parts[1] if len(parts) > 1 else "?"
        self.rec.statuses[status] = self.rec.statuses.get(status, 0) + 1
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        fleet = headers.get("x-fleet", "-")
        self.rec.fleets[fleet] = self.rec.fleets.get(fleet, 0) + 1
        if status != "101":
            self._refuse(f"HTTP {status}")
            return
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            self._refuse("bad Sec-WebSocket-Accept")
            return
        now = time.monotonic()
        self.rec.handshake_ms.append((now - self.t_start) * 1000)
        self.rec.handshake_t.append(now)
        self.rec.established += 1
        self.upgraded.set_result(True)

    # -- frames ------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        n, pos = len(data), 0
        while n - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length, start = b1 & 0x7F, pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length, start = int.from_bytes(data[pos + 2 : pos + 4], "big"), pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, start = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
            if b1 & 0x80:  # a server must not mask; unmask anyway
                start += 4
            end = start + length
            if end > n:
                break
            payload = data[start:end]
            if b1 & 0x80:
                payload = mask(payload, data[start - 4 : start])
            self._message(b0 & 0x0F, payload)
            pos = end
        if pos < n:
            buf += data[pos:]

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode in (1, 2):
            if not self.outstanding:
                self.rec.unexpected += 1
                return
            sent_t, expected = self.outstanding.popleft()
            now = time.monotonic()
            rec = self.rec
            rec.recv_t.append(now)
            rec.rtt_ms.append((now - sent_t) * 1000)
            if payload != expected:
                rec.corrupt += 1
            if self.drained is not None and not self.outstanding:
                self.drained.set()
        elif opcode == 8:
            self.close_received = True
            if not self.close_sent:
                # The server hung up first: answer and note it (the call was cut).
                self._fail(f"server sent close {int.from_bytes(payload[:2], 'big')}")
                self._send_close()
            if self.transport is not None:
                self.transport.close()
        elif opcode == 9 and self.transport is not None:  # ping -> pong
            self.transport.write(client_frame(payload, 0xA, b"\0\0\0\0"))

    # -- streaming ---------------------------------------------------------

    def stream(self, first_at: float, until: float) -> None:
        """Send a frame every pool interval from loop time ``first_at`` while before ``until``."""
        self._stream_until = until
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(first_at, self._tick, first_at)

    def _tick(self, due: float) -> None:
        t = self.transport
        if t is None or self.close_sent or due >= self._stream_until:
            return
        pool = self.pool
        i = (self.offset + self.seq) % len(pool.wire)
        now_t = time.monotonic()
        self.outstanding.append((now_t, pool.payload[i]))
        t.write(pool.wire[i])
        self.rec.sent_t.append(now_t)
        self.seq += 1
        due += pool.interval
        loop = asyncio.get_running_loop()
        now = loop.time()
        if due < now - pool.interval:  # fell behind by more than a frame: do not burst
            due = now
        self._timer = loop.call_at(due, self._tick, due)

    def stop_streaming(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _send_close(self) -> None:
        if not self.close_sent and self.transport is not None:
            self.close_sent = True
            self.transport.write(client_frame((1000).to_bytes(2, "big"), 8, os.urandom(4)))

    async def finish(self, echo_wait: float, close_wait: float) -> None:
        """Stop sending, wait up to ``echo_wait`` for the echoes, close (1000). Once."""
        if self.finishing:
            return
        self.finishing = True
        self.stop_streaming()
        if self.outstanding and self.transport is not None:
            self.drained = asyncio.Event()
            try:
                async with asyncio.timeout(echo_wait):
                    await self.drained.wait()
            except TimeoutError:
                pass
        self.rec.lost += len(self.outstanding)
        self.outstanding.clear()
        if self.transport is not None:
            self._send_close()
            try:
                async with asyncio.timeout(close_wait):
                    await asyncio.shield(self.closed)
            except TimeoutError:
                if self.transport is not None:
                    self.transport.abort()
        if not self.failed:
            self.rec.finished += 1


async def open_call(
    rec: Recorder,
    pool: FramePool,
    url: tuple[str, int],
    path: str,
    ssl_ctx: ssl.SSLContext | None,
    offset: int,
    timeout: float = 10.0,
) -> LeanCall | None:
    """Connect and upgrade; None (recorded as failed) when it does not get a 101 in time."""
    host, port = url
    loop = asyncio.get_running_loop()
    call = LeanCall(rec, pool, path, f"{host}:{port}", offset)
    call.t_start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(
                lambda: call,
                host,
                port,
                ssl=ssl_ctx,
                server_hostname=host if ssl_ctx else None,
            )
            ok = await call.upgraded
        record_tls(rec, call.transport)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        call._fail(f"connect: {type(exc).__name__}")
        if call.transport is not None:
            call.transport.abort()
        return None
    return call if ok else None


def record_tls(rec: Recorder, transport: asyncio.BaseTransport | None) -> None:
    """Count the call's TLS version and cipher (nothing for a plain TCP call)."""
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    if tls is None:
        return
    cipher = tls.cipher()
    key = f"{tls.version()} {cipher[0] if cipher else '?'}"
    rec.tls[key] = rec.tls.get(key, 0) + 1


async def echoed_call(
    rec: Recorder,
    pool: FramePool,
    url: tuple[str, int],
    path: str,
    ssl_ctx: ssl.SSLContext | None,
    offset: int,
    *,
    messages: int,
    step: float,
    hold: float = 0.0,
    burst: int = 1,
) -> None:
    """One call for the counting scripts: ``messages`` frames from ``offset``, each sent
    after the last one's echo (so every run relays the same frames), held ``hold``
    seconds from its start, closed (1000). Each step bounded by ``step``; RuntimeError
    if the call fails or does not end cleanly. ``burst``: frames sent back to back
    (one write each: a TLS record each), then their echoes awaited together: several
    records wait on each of the proxy's connections, as on a loaded proxy's."""
    started = time.monotonic()
    call = await open_call(rec, pool, url, path, ssl_ctx, offset, step)
    if call is None:
        raise RuntimeError(f"call {path} failed: {rec.errors}")
    for first in range(0, messages, burst):
        call.drained = asyncio.Event()
        assert call.transport is not None
        for i in range(first, min(messages, first + burst)):
            j = (offset + i) % len(pool.wire)
            call.outstanding.append((time.monotonic(), pool.payload[j]))
            call.transport.write(pool.wire[j])
        async with asyncio.timeout(step):
            await call.drained.wait()
    if hold:
        await asyncio.sleep(max(0.0, hold - (time.monotonic() - started)))
    await call.finish(step, step)
    if call.failed or not call.close_received:
        raise RuntimeError(f"call {path} did not end cleanly: {rec.errors}")


async def echoed_calls(
    rec: Recorder,
    pool: FramePool,
    url: tuple[str, int],
    ssl_ctx: ssl.SSLContext | None,
    indices: range,
    *,
    wave: int,
    messages: int,
    step: float,
    burst: int = 1,
) -> None:
    """An :func:`echoed_call` for each of ``indices`` (path ``/ws/bench-I``, frames from
    ``7 I``), ``wave`` at a time: a wave's calls all ended before the next opens."""
    for start in range(indices.start, indices.stop, wave):
        await asyncio.gather(
            *(
                echoed_call(rec, pool, url, f"/ws/bench-{i}", ssl_ctx, i * 7,
                            messages=messages, step=step, burst=burst)
                for i in range(start, min(indices.stop, start + wave))
            )
        )  # fmt: skip
