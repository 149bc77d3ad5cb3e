"""The frame-boundary tracker and the ingress's close frame (core/ws_frames.py):
fed a stream of frames split at random, the tracker says at each read's end
whether a frame begins there, and where in the next read the frame under way ends."""

from __future__ import annotations

import random
import struct
import sys
from typing import Any

import pytest

from fleet_ingress.core.ws_frames import (
    CLOSE_WHOLE,
    SPARE_FRAMES,
    FrameTracker,
    close_frame,
    max_frames,
)


def _frame(n: int, masked: bool, opcode: int = 0x82) -> bytes:
    b1 = 0x80 if masked else 0
    if n < 126:
        head = bytes((opcode, b1 | n))
    elif n < 65536:
        head = bytes((opcode, b1 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((opcode, b1 | 127)) + struct.pack("!Q", n)
    return head + (b"\x01\x02\x03\x04" if masked else b"") + b"x" * n


@pytest.mark.parametrize("seed", range(4))
def test_boundaries_are_found_whatever_the_reads(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, 4, 125, 126, 200, 330, 65535, 65536, 70000]
    for _ in range(150):
        masked = rng.random() < 0.5
        frames = [_frame(rng.choice(sizes), masked) for _ in range(rng.randint(1, 12))]
        stream = b"".join(frames)
        bounds, at = {0}, 0
        for f in frames:
            at += len(f)
            bounds.add(at)
        tracker, pos = FrameTracker(), 0
        while pos < len(stream):
            chunk = memoryview(stream)[pos : pos + rng.choice([1, 2, 3, 5, 13, 14, 100, 16384])]
            end = tracker.boundary_in(chunk)
            # The first boundary within the chunk (its start included), if any.
            within = sorted(b - pos for b in bounds if pos <= b <= pos + len(chunk))
            assert end == (within[0] if within else -1), (pos, len(chunk))
            tracker.feed(chunk)
            pos += len(chunk)
            assert tracker.at_boundary == (pos in bounds)


def test_a_flood_of_tiny_frames_stops_the_tracking_for_good() -> None:
    """Media frames are hundreds of bytes; reads of 8-byte frames, read after
    read, would make the header walk the dearest part of relaying them."""
    tiny = _frame(6, masked=False) * 2048  # 16 KiB of 8-byte frames
    tracker = FrameTracker()
    for _ in range(3):  # a burst's spare, then no more
        tracker.feed(tiny)
    assert tracker.gave_up and not tracker.at_boundary
    tracker.feed(_frame(300, masked=False))
    assert tracker.gave_up and tracker.boundary_in(b"\x82\x00") == -1
    # Ordinary media: a backlog read of twilio-like frames is walked whole.
    media = _frame(330, masked=True) * 40
    assert len(media) // 340 <= max_frames(len(media))
    tracker = FrameTracker()
    tracker.feed(media)
    assert tracker.at_boundary


def test_a_burst_of_tiny_frames_is_walked_and_the_spare_comes_back() -> None:
    """A bot's text-to-speech burst through a plain fleet connection: hundreds
    of frames a read, a few bytes each once permessage-deflate has compressed
    silence. Walked from the spare, which ordinary reads then refill."""
    burst = _frame(7, masked=False) * 500 + _frame(20, masked=False)[:1]  # a header split
    tracker = FrameTracker()
    tracker.feed(burst)
    assert not tracker.gave_up and tracker.partial
    assert tracker.spare < SPARE_FRAMES
    tracker.feed(_frame(20, masked=False)[1:] + _frame(300, masked=False) * 3)
    assert tracker.at_boundary
    for _ in range(100):
        tracker.feed(_frame(300, masked=False) * 2)
    assert tracker.spare == SPARE_FRAMES and tracker.at_boundary
    for _ in range(20):  # a burst a second for 20 s, media between: never given up
        tracker.feed(_frame(7, masked=False) * 500)
        for _ in range(50):
            tracker.feed(_frame(160, masked=False) + _frame(160, masked=False))
    assert not tracker.gave_up and tracker.at_boundary


def test_the_spare_comes_back_from_reads_of_one_frame_and_of_a_payload() -> None:
    """A bot's media through a plain fleet: a frame a read (the common read,
    not walked), or a long frame's payload read by read, between bursts of
    tiny frames. Before, only reads walked refilled the spare: a burst of 500
    a second (about 360 past its read's allowance) gave up at the twelfth,
    and a drain's carrier then got no 1001 (review37a)."""
    tracker = FrameTracker()
    for _ in range(40):  # a burst a second for 40 s, media a frame a read between
        tracker.feed(_frame(7, masked=False) * 500)
        for _ in range(50):
            tracker.feed(_frame(120, masked=False))
    assert not tracker.gave_up and tracker.spare == SPARE_FRAMES
    long = _frame(60000, masked=False)
    for _ in range(40):  # the same, the media one long frame read in parts
        tracker.feed(_frame(7, masked=False) * 500)
        for i in range(0, len(long), 16384):
            tracker.feed(long[i : i + 16384])
    assert not tracker.gave_up and tracker.at_boundary


@pytest.mark.parametrize("masked", [False, True])
def test_a_read_of_one_whole_frame_ends_at_a_boundary_whatever_its_header(masked: bool) -> None:
    """The common read (a frame a read), judged by its first four bytes: every
    length form (7-bit, 16-bit, 64-bit), masked or not, a close frame seen."""
    for size in (0, 1, 2, 125, 126, 127, 400, 65535, 65536, 70000):
        for opcode in (0x81, 0x82, 0x88, 0x08):
            tracker = FrameTracker()
            frame = _frame(size, masked, opcode)
            tracker.feed(memoryview(frame), len(frame))
            assert tracker.at_boundary, (size, opcode)
            assert tracker.closed == (CLOSE_WHOLE if opcode == 0x88 else 0), (size, opcode)
            # A frame's first bytes alone, or one more byte: no boundary there.
            for cut in (frame[: len(frame) - 1], frame + b"\x81"):
                tracker = FrameTracker()
                tracker.feed(cut, len(cut))
                assert not tracker.at_boundary, (size, opcode, len(cut))


def test_a_read_of_one_whole_frame_costs_no_call_but_one_unpack() -> None:
    """The hot path's read (a media frame a record): before session 45 it
    went through `_frame_end` and two len() calls (sys.setprofile), about
    5,000 instructions a read with feed's own call (callgrind); now one
    C unpack of its first four bytes, about 2,700."""
    frame = memoryview(_frame(400, masked=True, opcode=0x81))
    tracker = FrameTracker()
    called: list[str] = []

    def profiler(frame_: object, event: str, arg: object) -> None:
        if event in ("call", "c_call"):
            called.append(getattr(arg, "__name__", "") if event == "c_call" else event)

    sys.setprofile(profiler)
    try:
        tracker.feed(frame, len(frame))
    finally:
        sys.setprofile(None)
    # The profiler sees feed's own call, len() (its argument, the caller's),
    # the unpack and setprofile's own.
    assert called == ["len", "call", "unpack_from", "setprofile"]
    assert tracker.at_boundary


def test_a_read_of_one_whole_frame_takes_few_of_feeds_steps() -> None:
    """The hot path's read, counted in the interpreter's steps (sys.settrace,
    opcode events, CPython 3.11): its length from two tables, the frame start
    looked at first and a short read left to the unpack's error. 58 steps
    before session 46 (bit tests and a length branch, the payload branch
    first, a separate test of the read's length), 44 now: about 190
    instructions a relayed message less (callgrind, proxy's data_received
    with feed, a masked and an unmasked 300-byte frame)."""
    for masked, size in ((True, 400), (False, 300), (True, 100)):
        frame = memoryview(_frame(size, masked=masked, opcode=0x81))
        tracker = FrameTracker()
        tracker.feed(frame, len(frame))  # specialised, as on the hot path
        steps = 0

        def tracer(frame_: Any, event: str, arg: object) -> Any:
            nonlocal steps
            frame_.f_trace_opcodes = True
            if event == "opcode" and frame_.f_code.co_name == "feed":
                steps += 1
            return tracer

        sys.settrace(tracer)
        try:
            tracker.feed(frame, len(frame))
        finally:
            sys.settrace(None)
        assert tracker.at_boundary and not tracker.closed
        assert steps <= 44, (masked, size, steps)


def test_a_flood_between_single_frames_still_gives_up() -> None:
    """Earned back a read's allowance at a time, a flood of tiny frames read
    after read between reads of one frame still spends the spare: the walk
    stays within the reads' allowances and one spare."""
    tiny = _frame(6, masked=False) * 2048  # 16 KiB of 8-byte frames
    tracker = FrameTracker()
    for _ in range(4):
        tracker.feed(tiny)
        tracker.feed(_frame(300, masked=False))
    assert tracker.gave_up and tracker.spare == 0


def test_close_frames_toward_each_side() -> None:
    assert close_frame(1001, "ingress draining", None) == b"\x88\x12\x03\xe9ingress draining"
    masked = close_frame(1011, "fleet lost", b"\x0a\x0b\x0c\x0d")
    assert masked[:6] == b"\x88\x8c\x0a\x0b\x0c\x0d" and len(masked) == 2 + 4 + 12
    assert bytes(b ^ masked[2 + i % 4] for i, b in enumerate(masked[6:])) == b"\x03\xf3fleet lost"
    assert len(close_frame(1001, "x" * 500, None)) == 2 + 125  # a control frame's limit
    with pytest.raises(ValueError):
        close_frame(1001, "", b"abc")
    # Every close frame is one whole frame to a tracker.
    tracker = FrameTracker()
    tracker.feed(masked)
    assert tracker.at_boundary


@pytest.mark.parametrize("seed", range(3))
def test_a_close_frame_is_seen_wherever_it_is_in_the_reads(seed: int) -> None:
    """A close frame in the same read as a data frame, or split across reads,
    is seen as it starts (the ingress adds no close frame of its own after it)
    and is whole when the tracker is next at a boundary: when the call machine
    hears of it (net/proxy.py close_frame_read), never before its last byte."""
    rng = random.Random(seed)
    for _ in range(150):
        masked = rng.random() < 0.5
        frames = [_frame(rng.choice([0, 5, 200, 70000]), masked) for _ in range(rng.randint(0, 5))]
        at = len(b"".join(frames))
        stream = b"".join(frames) + _frame(2, masked, opcode=0x88)
        close_end = len(stream)
        stream += b"".join(
            _frame(rng.choice([0, 5, 200]), masked) for _ in range(rng.randint(0, 3))
        )
        tracker, pos = FrameTracker(), 0
        while pos < len(stream):
            chunk = memoryview(stream)[pos : pos + rng.choice([1, 3, 7, 100, 16384])]
            tracker.feed(chunk)
            pos += len(chunk)
            if pos <= at:
                assert not tracker.closed
            if tracker.closed and tracker.at_boundary:
                assert pos >= close_end
            if pos == close_end:
                assert tracker.closed and tracker.at_boundary
        assert tracker.closed


def test_a_long_reason_is_cut_between_characters() -> None:
    frame = close_frame(1001, "é" * 100, None)
    assert len(frame) <= 2 + 125
    assert frame[4:].decode() == "é" * 61  # 122 bytes: the 123rd would split one


def test_a_close_frame_split_across_reads_is_whole_at_the_boundary_after_it() -> None:
    close = b"\x88\x82\x01\x02\x03\x04\x02\xea"  # masked 1000, as a carrier sends it
    tracker = FrameTracker()
    tracker.feed(_frame(200, masked=True) + close[:6])
    assert tracker.closed and not tracker.at_boundary  # seen as it starts, not whole
    tracker.feed(close[6:])
    assert tracker.closed and tracker.at_boundary


def test_only_fin_and_opcode_8_with_no_rsv_bit_is_a_close_frame() -> None:
    """A first byte with opcode 8 otherwise (a fragmented or compressed
    'control frame', or bytes that are no WebSocket at all: b"x" is 0x78) is
    no close frame a peer accepts, and must not say who hung up."""
    for first in (0x08, 0xC8, 0x78):
        tracker = FrameTracker()
        tracker.feed(bytes((first, 2)) + b"\x03\xe8" + _frame(5, masked=False))
        assert not tracker.closed and tracker.at_boundary, hex(first)
    tracker = FrameTracker()
    tracker.feed(b"x" * 65536)
    assert not tracker.closed


@pytest.mark.parametrize(
    "after",
    [b"\x82", b"\x82\xfe\x10", b"\x82\x85\x01\x02\x03\x04xy", b"\x81\x05hello\x82"],
    ids=["a header's first byte", "a header cut", "a frame cut", "a frame and a byte"],
)
def test_a_close_frame_is_whole_at_its_last_byte_whatever_a_broken_peer_sends_after_it(after):
    """Nothing may follow a close frame (RFC 6455 5.5.1); a broken peer's
    bytes after it in the same read (or the next) leave the tracker off a
    boundary, yet the close frame is whole. Before (the review of session
    37) it was heard only at a boundary: not at all, had the peer sent no more."""
    close = b"\x88\x82\x01\x02\x03\x04\x02\xea"
    media = _frame(200, masked=True)
    for reads in (
        [media + close + after],  # one read
        [media + close[:3], close[3:] + after],  # the close split, its end with the junk
        [media + close[:6], close[6:], after],  # its end alone, then the junk
        [close + after[:1], after[1:]],
    ):
        tracker = FrameTracker()
        for i, read in enumerate(reads):
            if not read:
                continue
            tracker.feed(read)
            if i == 0 and len(reads) > 1 and close not in read:
                assert tracker.closed and not tracker.close_whole, reads
        assert tracker.close_whole, reads
    # Not whole before its last byte, whatever came before it.
    tracker = FrameTracker()
    tracker.feed(media + close[:-1])
    assert tracker.closed and not tracker.close_whole
