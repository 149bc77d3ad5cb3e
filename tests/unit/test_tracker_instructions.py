"""bench/tracker_instructions.py counts the reads it says it counts: each
whole-frame shape is one whole frame (the tracker's common read, at rest after
it), the payload shape a read inside a frame's payload (its second look)."""

from __future__ import annotations

import pytest
from bench import tracker_instructions

from fleet_ingress.core.ws_frames import FrameTracker
from tests.ws_frames_oracle import frames_of


@pytest.mark.parametrize("shape", ["masked", "unmasked", "small"])
def test_a_whole_frame_shape_is_one_whole_frame_read_at_rest(shape: str) -> None:
    read = tracker_instructions._read(shape)
    (frame,) = frames_of(read)
    assert (frame.start, frame.end) == (0, len(read))
    tracker = FrameTracker()
    assert tracker.feed(memoryview(read), len(read)) == 0
    assert tracker.at_rest and tracker.at_boundary


def test_the_payload_shape_is_read_inside_a_payload() -> None:
    tracker = FrameTracker()
    tracker.feed(bytes((0x82, 127)) + (1 << 40).to_bytes(8, "big"))
    assert tracker.in_payload
    read = tracker_instructions._read("payload")
    tracker.feed(read, len(read))
    assert tracker.in_payload and tracker.need == (1 << 40) - len(read)


@pytest.mark.parametrize("shape", tracker_instructions.SHAPES)
def test_the_counted_loop_runs_each_shape(shape: str) -> None:
    tracker_instructions._loop(shape, 3)


def test_an_unknown_shape_is_named() -> None:
    with pytest.raises(ValueError, match="one of masked"):
        tracker_instructions._read("huge")
