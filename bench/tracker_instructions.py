"""Instructions a `FrameTracker.feed` costs a read, by read shape (callgrind, counts).

A relayed read in a tunnel is fed to its direction's frame tracker
(core/ws_frames.py) on the hot path (net/proxy.py `data_received`). This counts
that call alone, no sockets: a loop of N1 and then N2 feeds of the same read
under callgrind, the difference over N2 - N1 reads. An empty Python call in
the same loop (`empty`) is what the loop and a call cost; a shape's figure less
`empty`'s is the feed's own. Shapes::

    masked    one whole masked frame a read, a 16-bit length (the carrier's media)
    unmasked  the same unmasked (the bot's media)
    small     one whole frame of a 7-bit length (100 bytes)
    payload   a 1,000-byte read inside a frame's payload (a frame over reads)
    empty     an empty call of the same arguments

    python -m bench.tracker_instructions
    python -m bench.tracker_instructions --variant-pythonpath /tmp/main/src --shapes masked,payload
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

SHAPES = ("masked", "unmasked", "small", "payload", "empty")
PAYLOAD = 320  # a twilio-like media frame's payload is about this long


def _read(shape: str) -> bytes:
    length = PAYLOAD.to_bytes(2, "big")
    if shape == "masked":
        return bytes((0x81, 0x80 | 126)) + length + b"abcd" + b"x" * PAYLOAD
    if shape in ("unmasked", "empty"):
        return bytes((0x81, 126)) + length + b"x" * PAYLOAD
    if shape == "small":
        return bytes((0x82, 100)) + b"x" * 100
    if shape == "payload":
        return b"y" * 1000
    raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")


def _loop(shape: str, reads: int) -> None:
    """The counted process: `reads` feeds of the shape's read, as the hot path
    makes them (a view of a larger buffer, its length given)."""
    from fleet_ingress.core.ws_frames import FrameTracker

    raw = _read(shape)
    buf = bytearray(65536)
    buf[: len(raw)] = raw
    view = memoryview(buf)[: len(raw)]
    tracker = FrameTracker()
    if shape == "payload":  # inside a frame longer than any run
        tracker.feed(bytes((0x82, 127)) + (1 << 40).to_bytes(8, "big"))

    def empty(data: object, n: int) -> int:
        return 0

    feed = empty if shape == "empty" else tracker.feed
    n = len(raw)
    for _ in range(reads):
        feed(view, n)
    assert shape in ("payload", "empty") or tracker.at_boundary


def _count(shape: str, reads: int, pythonpath: str | None) -> int:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                "-m",
                "bench.tracker_instructions",
                "--run",
                shape,
                str(reads),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
    found = re.search(r"refs:\s*([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind said no total: {done.stderr[-500:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracker_instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument(
        "--reads", type=int, nargs=2, default=(10_000, 30_000), metavar=("N1", "N2")
    )
    parser.add_argument(
        "--variant-pythonpath", help="a src directory first on the counted process's PYTHONPATH"
    )
    parser.add_argument("--run", nargs=2, metavar=("SHAPE", "READS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        _loop(args.run[0], int(args.run[1]))
        return 0
    n1, n2 = args.reads
    print(f"instructions a read (callgrind, {n2 - n1} reads between {n1} and {n2})")
    for shape in args.shapes.split(","):
        _read(shape)  # an unknown shape said before valgrind runs
        a = _count(shape, n1, args.variant_pythonpath)
        b = _count(shape, n2, args.variant_pythonpath)
        print(f"{shape:10} {(b - a) / (n2 - n1):8,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
