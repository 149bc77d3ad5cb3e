"""`fleet-ingress` command line (SPEC section 8)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-ingress",
        description="TLS WebSocket ingress that routes carrier calls to voice-call fleets.",
    )
    parser.add_argument("--version", action="version", version=f"fleet-ingress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve the carrier listener")
    run.add_argument("-c", "--config", type=Path, required=True, help="ingress.toml")

    check = sub.add_parser("check", help="validate the configuration and fleets file")
    check.add_argument("-c", "--config", type=Path, help="ingress.toml")
    check.add_argument(
        "--probe", action="store_true", help="also probe every fleet's health endpoint now"
    )
    check.add_argument(
        "--body",
        type=Path,
        metavar="FILE",
        help="judge a captured /health/fleet body instead (pass/fail and the capacity read)",
    )

    demo = sub.add_parser(
        "demo", help="local fleets + ingress + simulated carrier calls, all on loopback"
    )
    demo.add_argument("--calls", type=int, default=6, help="simulated carrier calls")
    demo.add_argument("--duration", type=float, default=3.0, help="seconds each call streams")
    demo.add_argument(
        "--profile",
        default="binary",
        choices=["binary", "twilio-like", "exotel"],
        help="carrier audio profile",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args.config)
    if args.command == "check":
        from .check import run_body_check, run_check

        if args.body is not None:
            return run_body_check(args.body, args.config)
        if args.config is None:
            print("fleet-ingress check: -c CONFIG is required (or --body FILE)", file=sys.stderr)
            return 2
        return run_check(args.config, probe=args.probe)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(calls=args.calls, duration=args.duration, profile=args.profile)
    raise AssertionError(args.command)  # argparse rejects unknown commands


def _run(config_path: Path) -> int:
    import uvloop

    from .config import ConfigError, load_config
    from .fleets_file import FleetsFileError, load_fleets_file
    from .logs import configure_logging
    from .server import Ingress
    from .tls import TLSSetupError

    try:
        config = load_config(config_path)
        fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
        configure_logging(config.log.level, config.log.format)
        ingress = Ingress(config, fleets)
    except (ConfigError, FleetsFileError, TLSSetupError, ValueError) as exc:
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        return 2
    uvloop.run(ingress.serve_until_signalled())
    return 0
