"""The oracle for `FrameTracker` (core/ws_frames.py): what it must say of any
byte stream, however the stream is cut into reads.

Shared by the property test (``tests/unit/test_ws_frames_oracle.py``) and the
atheris harness (``fuzz/fuzz_ws_frames.py``). No sockets.

- :func:`build_stream`: a stream of frames, valid and not (every length form,
  the 16- and 64-bit ones also non-minimal, masked or not, control frames, RSV
  bits, a close frame's first byte 0x88 in payloads, a length no frame ever
  ends at, a flood of tiny frames, junk), and where to cut it into reads (at a
  frame's boundary, a byte or three short or past it, 1-3 byte reads, several
  frames a read, large reads, the read a header misread as 16-bit would make
  whole), driven by a `pick(n)` (a number below n): a ``random.Random``
  seeded by the property test, or a fuzzer's bytes.
- :func:`frames_of`: the stream parsed whole, frame by frame: where each frame
  starts, where its length is known, where it ends.
- :func:`check_reads`: the stream fed read by read to the tracker under test,
  and to `ws_frames_e50cd9a4.FrameTracker` (main's tracker before session 45's
  whole-frame fast path) beside it: after every read both hold the same state
  (bytes left, a split header, the spare, a close frame started) and hear the
  first close frame at the same read, and while the
  tracker has not given up, what it says matches the whole parse: whether a
  frame starts there, the bytes left in the frame under way or the split
  header, where the next read's first boundary is, the spare as every read's
  allowance earns it and its frame starts spend it, and the first close frame
  heard (`closed` and `close_whole`, as the pump asks) at the read that holds
  its last byte, never before.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from fleet_ingress.core.ws_frames import GAVE_UP, SPARE_FRAMES, FrameTracker, max_frames
from tests import ws_frames_e50cd9a4 as before

Pick = Callable[[int], int]  # a number in range(n)

CLOSE_FIRST_BYTE = 0x88
# First bytes: data and control frames, a close frame's (most often), opcode 8
# with RSV bits or no FIN (no close frame), a continuation, anything.
_FIRST_BYTES = (0x81, 0x82, 0x88, 0x88, 0x08, 0x89, 0x8A, 0x80, 0x00, 0x01, 0xC1, 0xC8, 0x98)
_SMALL = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 100, 124, 125)
_MEDIUM = (126, 127, 128, 200, 400, 1000, 4096, 16384, 65535)
_LARGE = (65536, 65537, 70000)
# Payload bytes that look like frame starts (a close frame's first byte, the
# length forms' markers): a tracker that lost its place would read them as one.
_PAYLOAD = (b"\x88\x02\x03\xe8", b"\x82\x7e\x00\x10", b"\x81\x7f\x00\x00", b"x", b"\x88\x00")
_CHUNKS = (1, 2, 3, 4, 5, 6, 13, 14, 15, 64, 1000, 16384)


def _frame(pick: Pick) -> tuple[bytes, bool]:
    """One frame (header and payload), and whether it is the stream's last (a
    length that no stream here reaches: nothing can follow it)."""
    first = pick(256) if pick(8) == 7 else _FIRST_BYTES[pick(len(_FIRST_BYTES))]
    mask = 0x80 if pick(2) else 0
    form = pick(8)
    last = False
    if form <= 2:  # 7-bit
        length = pick(126) if pick(4) == 3 else _SMALL[pick(len(_SMALL))]
        head = bytes((first, mask | length))
    elif form == 3:  # 16-bit
        length = _MEDIUM[pick(len(_MEDIUM))]
        head = bytes((first, mask | 126)) + length.to_bytes(2, "big")
    elif form == 4:  # 16-bit, non-minimal (a small length)
        length = _SMALL[pick(len(_SMALL))]
        head = bytes((first, mask | 126)) + length.to_bytes(2, "big")
    elif form == 5:  # 64-bit
        length = _LARGE[pick(len(_LARGE))]
        head = bytes((first, mask | 127)) + length.to_bytes(8, "big")
    elif form == 6:  # 64-bit, non-minimal (a small or 16-bit length)
        length = (_SMALL + _MEDIUM[:4])[pick(len(_SMALL) + 4)]
        head = bytes((first, mask | 127)) + length.to_bytes(8, "big")
    else:  # 64-bit, past any stream: the top bit set (invalid), or just huge
        # (Its bytes 2-3, read as a 16-bit length, small in the last two.)
        huge = (1 << 63, (1 << 64) - 1, 1 << 62, (1 << 62) - 1, 1 << 40, 1 << 48, 3 << 48)[pick(7)]
        head = bytes((first, mask | 127)) + huge.to_bytes(8, "big")
        length, last = pick(40), True  # what follows of it in the stream
    key = bytes(pick(256) for _ in range(4)) if mask else b""
    pattern = _PAYLOAD[pick(len(_PAYLOAD))]
    payload = (pattern * (length // len(pattern) + 1))[:length]
    return head + key + payload, last


def build_stream(pick: Pick) -> tuple[bytes, list[int]]:
    """A stream and its reads' ends (increasing, the last its length)."""
    parts: list[bytes] = []
    if pick(10) == 9:  # a flood of tiny frames: the spare spent, or given up
        tiny = (b"\x82\x00", b"\x88\x00", b"\x81\x01x", b"\x82\x80abcd")[pick(4)]
        parts.append(tiny * (500 + pick(6000)))
    for _ in range(1 + pick(12)):
        frame, last = _frame(pick)
        parts.append(frame)
        if last:
            break
    if pick(4) == 3:  # junk after the frames: a header split, or any bytes
        parts.append(bytes(pick(256) for _ in range(pick(16))))
    stream = b"".join(parts)
    return stream, _cuts(stream, pick)


def _cuts(stream: bytes, pick: Pick) -> list[int]:
    total = len(stream)
    parse = Parse(stream)
    cuts: list[int] = []
    pos = 0
    while pos < total:
        mode = pick(6)
        if mode == 5:  # the read a header misread would make whole: its bytes 2-3
            # taken for a 16-bit length (a 7-bit or 64-bit one, or a masking key)
            i = bisect.bisect_left(parse.starts, pos)
            at = parse.starts[i] if i < len(parse.starts) else total
            if at + 4 > total:
                end = total
            elif pick(2):  # at that frame's start first
                end = at
            else:
                second = stream[at + 1]
                header = (10 if second & 0x7F == 127 else 4) + (4 if second & 0x80 else 0)
                end = at + header + int.from_bytes(stream[at + 2 : at + 4], "big")
        elif mode <= 1:  # at a boundary some frames on, or a few bytes short of or past it
            i = bisect.bisect_right(parse.points, pos) + (pick(4) if mode else 0)
            at = parse.points[i] if i < len(parse.points) else total
            end = at + pick(7) - 3
        elif mode == 2:  # a tiny read
            end = pos + 1 + pick(3)
        else:
            end = pos + _CHUNKS[pick(len(_CHUNKS))]
        end = min(max(end, pos + 1), total)
        cuts.append(end)
        pos = end
    return cuts


@dataclass(frozen=True)
class Frame:
    start: int
    known: int  # where its length is known (its header but the masking key read)
    end: int | None  # None: its header is cut off by the stream's end
    first: int


def frames_of(stream: bytes) -> list[Frame]:
    """The stream parsed whole, one frame after another (the last may run past it)."""
    frames: list[Frame] = []
    pos, total = 0, len(stream)
    while pos < total:
        first = stream[pos]
        if total - pos < 2:
            frames.append(Frame(pos, pos + 2, None, first))
            break
        second = stream[pos + 1]
        length = second & 0x7F
        size = 8 if length == 127 else 2 if length == 126 else 0
        known = pos + 2 + size
        if known > total:
            frames.append(Frame(pos, known, None, first))
            break
        if size:
            length = int.from_bytes(stream[pos + 2 : known], "big")
        end = known + (4 if second & 0x80 else 0) + length
        frames.append(Frame(pos, known, end, first))
        pos = end
    return frames


class Parse:
    """A stream parsed whole, and what a tracker must say at any place in it."""

    def __init__(self, stream: bytes) -> None:
        self.stream = stream
        self.frames = frames_of(stream)
        self.starts = [f.start for f in self.frames]
        # Frame boundaries: every frame's start and end, within the stream or not.
        ends = [f.end for f in self.frames if f.end is not None]
        self.points = sorted({*self.starts, *ends})

    def frame_at(self, at: int) -> Frame | None:
        """The frame the byte at `at` is in (None past the last one)."""
        i = bisect.bisect_right(self.starts, at) - 1
        if i < 0:
            return None
        f = self.frames[i]
        return f if f.end is None or at < f.end else None

    def held_at(self, at: int) -> tuple[int, bytes]:
        """What a tracker that read the stream up to `at` holds: the bytes left
        in the frame under way, or the first bytes of a header split there."""
        f = self.frame_at(at)
        if f is None or f.start == at:
            return 0, b""
        if at < f.known:
            return 0, self.stream[f.start : at]
        assert f.end is not None
        return f.end - at, b""

    def length_known_at(self, at: int) -> int:
        """Where the length of the frame under way at `at` is known."""
        f = self.frame_at(at)
        return at if f is None else f.known

    def starts_within(self, a: int, b: int) -> int:
        """Frames that start in the read [a, b)."""
        return bisect.bisect_left(self.starts, b) - bisect.bisect_left(self.starts, a)

    def first_boundary(self, a: int, b: int) -> int:
        """Where in the read [a, b) the first frame boundary is (a: 0), -1 none."""
        i = bisect.bisect_left(self.points, a)
        if i < len(self.points) and self.points[i] <= b:
            return self.points[i] - a
        return -1


def _state(t: FrameTracker | before.FrameTracker) -> tuple[int, bytes, int, bool]:
    """What a tracker holds. Of `closed`, whether a close frame started: once
    one was whole, a tracker may say CLOSE_STARTED or CLOSE_WHOLE (main's
    before session 45 kept CLOSE_STARTED through a later read of one whole
    frame with a 64-bit length, where the fast path now walks and says
    CLOSE_WHOLE); when it is heard is checked apart."""
    return (t.need, bytes(t.partial), t.spare, bool(t.closed))


def _heard(t: FrameTracker | before.FrameTracker) -> bool:
    """The pump's question after a read (net/proxy.py close_frame_read)."""
    return bool(t.closed) and t.close_whole


def check_reads(stream: bytes, cuts: list[int], *, views: Pick | None = None) -> None:
    """Feed `stream` cut at `cuts` to a `FrameTracker` (with each read's
    length, as the pump does, and again without it), to main's tracker before
    session 45 beside them, and check each read against the whole parse.
    `views` picks each read's type (bytes, memoryview, bytearray)."""
    parse = Parse(stream)
    close = next((f for f in parse.frames if f.first == CLOSE_FIRST_BYTE), None)
    told, untold, old = FrameTracker(), FrameTracker(), before.FrameTracker()
    spare, gave_up, heard_at = SPARE_FRAMES, False, None
    told_at: int | None = None  # the read after which each tracker was first heard
    old_at: int | None = None
    for i, (a, b) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True)):
        raw = stream[a:b]
        kind = views(3) if views is not None else i % 3
        read = (raw, memoryview(raw), bytearray(raw))[kind]
        n = b - a
        where = f"read {i} [{a}:{b}] of {len(stream)}"
        said = told.boundary_in(read)
        assert said == untold.boundary_in(read) == old.boundary_in(read), where
        if not gave_up:
            assert said == parse.first_boundary(a, b), where
        look = told.feed(read, n)
        untold_look = untold.feed(read)
        old.feed(read)
        assert _state(told) == _state(untold) == _state(old), where
        # The hot path looks at a read for a close frame only where `feed`
        # returns nonzero (net/proxy.py data_received, session 47): at the read
        # that makes the close frame whole, and at every read once it gave up.
        assert bool(look) == bool(untold_look), where
        if told_at is None and _heard(told):
            told_at = i
            assert look, f"{where}: the close frame is whole, feed said no look"
        if told.gave_up:
            assert look, f"{where}: given up, feed said no look"
        if old_at is None and _heard(old):
            old_at = i
        assert told_at == old_at and _heard(untold) == _heard(told), where
        # The whole parse: the spare each read earns and spends, then where the
        # tracker stands.
        starts = parse.starts_within(a, b)
        split = parse.held_at(a)[1]
        extended_only = bool(split) and not starts and b < parse.length_known_at(a)
        if not gave_up and not extended_only:
            if starts > max_frames(n) + spare:
                gave_up = True
            else:
                spare = min(SPARE_FRAMES, spare + max_frames(n) - starts)
        need, partial = parse.held_at(b)
        if need >= GAVE_UP:  # a frame no stream ends: nothing more to track
            gave_up = True
        assert told.gave_up == gave_up, where
        # `feed`'s first look (one whole frame changes nothing) is taken only
        # where it may be: at a boundary, no split header, the spare full; its
        # second (a read inside a payload changes `need` alone) inside a
        # payload not given up, the spare full.
        for t in (told, untold):
            full = t.spare == SPARE_FRAMES
            assert t.at_rest == (t.need == 0 and not t.partial and full), where
            assert t.in_payload == (0 < t.need < GAVE_UP and full), where
        if gave_up:
            continue
        assert (told.need, bytes(told.partial)) == (need, partial), where
        assert told.spare == spare, where
        assert told.at_boundary == (not need and not partial), where
        heard = _heard(told)
        if close is None or b <= close.start:
            assert not told.closed, where
        elif heard_at is None and close.end is not None:
            assert heard == (b >= close.end), where
            if heard:
                heard_at = i
