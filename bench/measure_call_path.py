"""Former entry point, kept so old command lines work: now ``python -m bench steady``.

``python bench/measure_call_path.py [--calls 100] [--duration 20] [--profile
twilio-like] [--target both] [--json-out FILE]`` runs::

    python -m bench steady --targets ingress,bare --calls N --seconds DURATION-4 ...

(fleet-ingress and the bare uvloop TLS splice, with their ratio), which
measures what this script did, the same way (TLS both sides, calls started at
evenly spread frame phases, CPU from /proc over a steady window, RSS per call),
with the lean generator of :mod:`bench.harness.carrier` instead of websockets. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.__main__ import main as bench_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--profile", default="twilio-like")
    parser.add_argument("--target", choices=["ingress", "bare", "both"], default="both")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    targets = "ingress,bare" if args.target == "both" else args.target
    argv = ["steady", "--targets", targets, "--calls", str(args.calls)]
    argv += ["--seconds", str(max(1.0, args.duration - 4)), "--profile", args.profile]
    out = args.out or Path(__file__).resolve().parent / "results" / (
        f"measure-call-path-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    code = bench_main([*argv, "--out", str(out)])
    if args.json_out is not None and (out / "results.json").exists():
        shutil.copy(out / "results.json", args.json_out)
    return code


if __name__ == "__main__":
    sys.exit(main())
