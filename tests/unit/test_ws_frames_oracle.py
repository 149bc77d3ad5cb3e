"""The frame tracker (core/ws_frames.py) against the whole parse of its stream
and against main's tracker before session 45's whole-frame fast path
(tests/ws_frames_oracle.py, tests/ws_frames_e50cd9a4.py): streams of frames,
valid and not, in every length form, cut into reads at and around their
boundaries. The tracker reads carrier-controlled bytes and says when a call's
close frame is whole (the machine's CloseFrameSeen, the call's end) and where
the ingress's own close frame may go.

The normal run is derandomized (tests/property_settings.py);
FLEET_INGRESS_PROPERTY_EXAMPLES=N runs N random streams a test, and
fuzz/fuzz_ws_frames.py runs the same oracle under atheris.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_ingress.core.ws_frames import SPARE_FRAMES, FrameTracker, max_frames
from tests.property_settings import property_settings
from tests.ws_frames_oracle import build_stream, check_reads, frames_of

EXAMPLES = 400


@property_settings(EXAMPLES)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_the_tracker_says_what_the_whole_parse_says_however_the_stream_is_read(
    seed: int,
) -> None:
    """A stream and its reads from a seed (a failure names it: the same
    stream and reads again with build_stream(random.Random(seed).randrange)),
    checked read by read against the whole parse and main's tracker before
    session 45 (tests/ws_frames_oracle.py check_reads)."""
    rng = random.Random(seed)
    stream, cuts = build_stream(rng.randrange)
    check_reads(stream, cuts, views=rng.randrange)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("length", [0, 5, 125, 126, 400, 65535, 65536])
@pytest.mark.parametrize("form", ["minimal", "16-bit", "64-bit"])
def test_a_close_frame_is_heard_whole_whatever_its_reads(
    masked: bool, length: int, form: str
) -> None:
    """A close frame after a media frame, each of its lengths in each form
    (non-minimal too), cut at every place around its header and its end, in
    reads of one to three bytes or whole: heard at the read that holds its
    last byte, never before."""
    b1 = 0x80 if masked else 0
    if form == "minimal" and length < 126:
        head = bytes((0x88, b1 | length))
    elif form == "64-bit" or length > 65535:
        head = bytes((0x88, b1 | 127)) + length.to_bytes(8, "big")
    else:
        head = bytes((0x88, b1 | 126)) + length.to_bytes(2, "big")
    media = bytes((0x82, 0x80 | 7)) + b"\x01\x02\x03\x04" + b"\x88" * 7
    close = head + (b"\x0a\x0b\x0c\x0d" if masked else b"") + b"\x88" * length
    stream = media + close
    assert [f.first for f in frames_of(stream)] == [0x82, 0x88]
    total = len(stream)
    edges = [len(media) + k for k in range(-2, len(head) + 6)] + [total - 2, total - 1]
    for cut in sorted({e for e in edges if 0 < e < total}):
        for step in (1, 2, 3):
            # Tiny reads around the cut and up to the stream's last 3 bytes, one
            # read between: bounded whatever the payload's length.
            near = range(cut, min(cut + 16, total), step)
            last = range(max(total - 3, cut), total, step)
            cuts = sorted({*near, *last, total} - {0})
            check_reads(stream, cuts)
        check_reads(stream, [cut, total])


@pytest.mark.parametrize("tiny", [b"\x82\x00", b"\x88\x00", b"\x81\x81abcdx"])
@pytest.mark.parametrize("past", [0, 1])
def test_a_read_of_tiny_frames_is_walked_to_its_allowance_and_spare_and_no_further(
    tiny: bytes, past: int
) -> None:
    """One read of as many tiny frames as its allowance and the whole spare
    let the walk take, then one more: the first is walked (the spare spent),
    the second gives up; a media frame after each, and a close frame."""
    k = 1
    while k < max_frames(k * len(tiny)) + SPARE_FRAMES:
        k += 1
    assert k == max_frames(k * len(tiny)) + SPARE_FRAMES  # the limit, exactly
    flood = tiny * (k + past)
    media = bytes((0x82, 126)) + (300).to_bytes(2, "big") + b"\x88" * 300
    stream = flood + media + bytes((0x88, 2)) + b"\x03\xe8"
    check_reads(stream, [len(flood), len(flood) + len(media), len(stream)])
    tracker = FrameTracker()
    tracker.feed(flood)
    assert tracker.gave_up == bool(past) and tracker.spare == 0
