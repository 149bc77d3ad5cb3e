"""atheris harness: a WebSocket byte stream, cut into reads -> FrameTracker.

The frame tracker (core/ws_frames.py) reads carrier- and bot-controlled bytes
and says when a close frame is whole (the call's end) and where the ingress's
own close frame may go. The fuzzer's bytes drive the generator of
``tests/ws_frames_oracle.py`` (frames in every length form, non-minimal ones,
masked or not, control frames, junk, floods of tiny frames; reads at, around
and across frame boundaries, of 1-3 bytes or several frames), and each read's
state is checked against the stream parsed whole and against main's tracker
before session 45 (``tests/ws_frames_e50cd9a4.py``): the property test's
invariants (``tests/unit/test_ws_frames_oracle.py``), from the same module.
Run outside the regular suite (see fuzz/README.md):

    .venv/bin/python fuzz/fuzz_ws_frames.py -atheris_runs=200000
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# The oracle is the one the property test uses (tests/ws_frames_oracle.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from tests.ws_frames_oracle import build_stream, check_reads


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)

    def pick(n: int) -> int:
        return fdp.ConsumeIntInRange(0, n - 1)

    stream, cuts = build_stream(pick)
    check_reads(stream, cuts, views=pick)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
