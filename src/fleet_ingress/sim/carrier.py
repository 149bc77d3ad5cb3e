"""Simulated carrier calls: a telephony carrier streaming audio over a WebSocket.

A call connects to ``{url}{route}{bot_id}``, sends one audio frame per profile
interval on a steady clock, reads the echoes a (simulated) fleet sends back,
and reports what happened in a :class:`CallResult`. Call failures (429, TLS
errors, refused connections, early closes, timeouts) never raise: the result
says what happened.

Profiles (sizes are exact):

==============  ========  ====================================================
name            interval  frame
==============  ========  ====================================================
``binary``      20 ms     320 bytes binary: 20 ms of 16-bit 8 kHz PCM; bytes
                          0-3 are the sequence number, 4-7 the send time (ms)
``twilio-like`` 20 ms     ~0.4 KB JSON text ``{"event":"media",...}``, payload =
                          base64 of 160 bytes of mu-law (216 characters)
``exotel``      100 ms    ~2.3 KB JSON text, payload = base64 of 1600 bytes of
                          16-bit 8 kHz PCM (2136 characters)
==============  ========  ====================================================

Audio bytes are deterministic pseudo-random noise, so permessage-deflate (when
enabled) does not shrink them unrealistically. JSON frames carry ``"seq"`` and
``"t"`` fields; every frame is identifiable by its sequence number, so the
receiver detects loss, corruption and round-trip time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

__all__ = [
    "PROFILES",
    "CallResult",
    "Profile",
    "register_profile",
    "run_call",
    "run_calls",
    "summarize",
]

Frame = str | bytes
MAX_MESSAGE = 32 * 1024 * 1024


@dataclass(frozen=True)
class Profile:
    """How one kind of carrier streams audio."""

    name: str
    interval: float  # seconds between frames
    make_frame: Callable[[int], Frame]  # seq -> frame
    seq_of: Callable[[Frame], int | None]  # echoed frame -> seq (None if not ours)
    description: str = ""


PROFILES: dict[str, Profile] = {}


def register_profile(profile: Profile) -> Profile:
    PROFILES[profile.name] = profile
    return profile


# -- profiles ----------------------------------------------------------------

_NOISE = random.Random(8000).randbytes(8192)
_STREAM_SID = "MZ" + "5e" * 16  # a Twilio-style stream id; fixed, these are simulations


def _audio(seq: int, size: int) -> bytes:
    """``size`` bytes of noise that differ from frame to frame."""
    offset = (seq * 97) % (len(_NOISE) - size)
    return _NOISE[offset : offset + size]


def _now_ms() -> int:
    return int(time.monotonic() * 1000) & 0xFFFFFFFF


_BINARY_HEAD = struct.Struct(">II")  # seq, send time in ms (monotonic, wraps)


def _binary_frame(seq: int) -> bytes:
    head = _BINARY_HEAD.pack(seq & 0xFFFFFFFF, _now_ms())
    return head + _audio(seq, 320 - _BINARY_HEAD.size)


def _binary_seq(frame: Frame) -> int | None:
    if isinstance(frame, bytes) and len(frame) >= _BINARY_HEAD.size:
        return _BINARY_HEAD.unpack_from(frame)[0]
    return None


def _json_seq(frame: Frame) -> int | None:
    if not isinstance(frame, str):
        return None
    try:
        seq = json.loads(frame).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _twilio_frame(seq: int) -> str:
    return _dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq + 1),
            "streamSid": _STREAM_SID,
            "media": {
                "track": "inbound",
                "chunk": str(seq + 1),
                "timestamp": str(seq * 20),
                "payload": base64.b64encode(_audio(seq, 160)).decode(),  # 20 ms mu-law
            },
            "seq": seq,
            "t": _now_ms(),
        }
    )


def _exotel_frame(seq: int) -> str:
    return _dumps(
        {
            "event": "media",
            "sequence_number": seq + 1,
            "stream_sid": _STREAM_SID,
            "media": {
                "chunk": seq + 1,
                "timestamp": str(seq * 100),
                "payload": base64.b64encode(_audio(seq, 1600)).decode(),  # 100 ms PCM16
            },
            "seq": seq,
            "t": _now_ms(),
        }
    )


register_profile(
    Profile("binary", 0.020, _binary_frame, _binary_seq, "raw 20 ms PCM16 8 kHz, 320 B binary")
)
register_profile(
    Profile("twilio-like", 0.020, _twilio_frame, _json_seq, "JSON media event, 20 ms mu-law")
)
register_profile(
    Profile("exotel", 0.100, _exotel_frame, _json_seq, "JSON media event, 100 ms PCM16 8 kHz")
)


# -- one call ----------------------------------------------------------------


@dataclass
class CallResult:
    ok: bool = False
    status: int | None = None  # 101 on success, else the HTTP status answered
    fleet: str | None = None  # X-Fleet response header
    handshake_ms: float | None = None  # TCP + TLS + upgrade
    frames_sent: int = 0
    frames_received: int = 0  # every message received
    lost_frames: int = 0  # sent but never echoed back
    rtt_ms: list[float] = field(default_factory=list)
    close_code: int | None = None  # close code received from the server side
    error: str | None = None
    corrupt_frames: int = 0  # echoed with a different content than sent
    subprotocol: str | None = None  # negotiated subprotocol


async def run_call(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    profile: str = "binary",
    duration: float = 2.0,
    bot_id: str = "demo-bot",
    route: str = "/ws/",
    query: str | None = None,
    subprotocols: Sequence[str] | None = None,
    extra_headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    request_close: int | None = None,
    compression: str | None = None,
    open_timeout: float = 5.0,
    echo_wait: float = 1.0,
    hang_up: asyncio.Event | None = None,
) -> CallResult:
    """Run one call against ``url`` (e.g. ``wss://127.0.0.1:8443``).

    ``request_close=4001`` ends the call by sending the fleet simulator's
    ``"close:4001"`` control message instead of closing with 1000; the call is
    then ok only if the server closed it with that code. ``compression`` is
    passed to websockets (``"deflate"`` offers permessage-deflate; default off).
    With ``hang_up``, the call ends once it is set (at its next frame's time),
    ``duration`` then its longest: calls that must all be up at once however
    long the last took to open.
    """
    prof = PROFILES[profile]
    uri = f"{url.rstrip('/')}{route}{bot_id}" + (f"?{query}" if query else "")
    result = CallResult()
    kwargs: dict[str, Any] = {}
    if ssl_context is not None and uri.startswith("wss:"):
        kwargs["ssl"] = ssl_context

    started = time.perf_counter()
    try:
        ws = await connect(
            uri,
            subprotocols=list(subprotocols) if subprotocols else None,
            additional_headers=extra_headers,
            compression=compression,
            open_timeout=open_timeout,
            close_timeout=2.0,
            max_size=MAX_MESSAGE,
            proxy=None,  # never go through $HTTPS_PROXY
            **kwargs,
        )
    except InvalidStatus as exc:
        result.status = exc.response.status_code
        result.fleet = exc.response.headers.get("X-Fleet")
        result.error = f"HTTP {result.status}"
        return result
    except Exception as exc:  # refused, TLS, timeout, bad handshake...
        result.error = f"{type(exc).__name__}: {exc}"
        return result

    result.handshake_ms = (time.perf_counter() - started) * 1000
    assert ws.response is not None
    result.status = ws.response.status_code
    result.fleet = ws.response.headers.get("X-Fleet")
    result.subprotocol = ws.subprotocol

    outstanding: dict[int, tuple[float, Frame]] = {}  # seq -> (sent at, frame)
    drained = asyncio.Event()
    all_sent = False

    async def read_echoes() -> None:
        try:
            async for msg in ws:
                result.frames_received += 1
                seq = prof.seq_of(msg)
                sent = outstanding.pop(seq, None) if seq is not None else None
                if sent is None:
                    continue
                result.rtt_ms.append((time.perf_counter() - sent[0]) * 1000)
                if msg != sent[1]:
                    result.corrupt_frames += 1
                if all_sent and not outstanding:
                    drained.set()
        except ConnectionClosed:
            pass

    reader = asyncio.create_task(read_echoes())
    closed_early = False
    n_frames = max(1, round(duration / prof.interval))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(duration + echo_wait + 5.0):
            t0 = loop.time()
            try:
                for seq in range(n_frames):
                    delay = t0 + seq * prof.interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if hang_up is not None and hang_up.is_set():
                        break
                    frame = prof.make_frame(seq)
                    outstanding[seq] = (time.perf_counter(), frame)
                    await ws.send(frame)
                    result.frames_sent += 1
            except ConnectionClosed:
                outstanding.pop(result.frames_sent, None)  # the frame that was not sent
                closed_early = True
            all_sent = True
            if not closed_early:
                if outstanding:
                    waiter = asyncio.create_task(drained.wait())
                    await asyncio.wait(
                        {waiter, reader}, timeout=echo_wait, return_when=asyncio.FIRST_COMPLETED
                    )
                    waiter.cancel()
                closed_early = reader.done()
            if not closed_early:
                if request_close is not None:
                    await ws.send(f"close:{request_close}")
                else:
                    await ws.close(1000)
                await reader
            await ws.wait_closed()
    except TimeoutError:
        result.error = "timed out"
    except ConnectionClosed:  # the control message could not be sent
        closed_early = True
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        reader.cancel()
        await ws.close()

    result.close_code = ws.close_code
    result.lost_frames = len(outstanding)
    if result.error is None:
        if closed_early:
            result.error = f"closed by server during the call: {ws.close_code} {ws.close_reason}"
        elif request_close is not None and ws.close_code != request_close:
            result.error = f"expected close code {request_close}, got {ws.close_code}"
    result.ok = result.error is None
    return result


async def run_calls(
    url: str,
    n: int,
    *,
    concurrency: int | None = None,
    stagger: float = 0.0,
    **kw: Any,
) -> list[CallResult]:
    """Run ``n`` calls, call ``i`` starting ``i * stagger`` s after the first,
    at most ``concurrency`` at once. ``kw`` goes to :func:`run_call`."""
    gate = asyncio.Semaphore(max(1, concurrency or n))
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(i: int) -> CallResult:
        delay = t0 + i * stagger - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            return await run_call(url, **kw)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return round(ordered[int(rank) - 1], 3)


def summarize(results: Sequence[CallResult]) -> dict[str, Any]:
    """Aggregate call results into a flat, JSON-serializable dict."""
    fleets: dict[str, dict[str, int]] = {}
    for r in results:
        counts = fleets.setdefault(r.fleet or "-", {"ok": 0, "failed": 0})
        counts["ok" if r.ok else "failed"] += 1
    handshakes = [r.handshake_ms for r in results if r.handshake_ms is not None]
    rtts = [x for r in results for x in r.rtt_ms]
    return {
        "calls": len(results),
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "status": dict(Counter(str(r.status) for r in results)),
        "fleets": fleets,
        "errors": dict(Counter(r.error for r in results if r.error).most_common(10)),
        "frames_sent": sum(r.frames_sent for r in results),
        "frames_received": sum(r.frames_received for r in results),
        "lost_frames": sum(r.lost_frames for r in results),
        "corrupt_frames": sum(r.corrupt_frames for r in results),
        "handshake_ms_p50": _percentile(handshakes, 50),
        "handshake_ms_p99": _percentile(handshakes, 99),
        "rtt_ms_p50": _percentile(rtts, 50),
        "rtt_ms_p99": _percentile(rtts, 99),
    }
