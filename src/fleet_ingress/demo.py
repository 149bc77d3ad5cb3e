"""`fleet-ingress demo`: the whole job on loopback, no configuration needed.

Two simulated fleets (WebSocket echo bots with /health/fleet, 429 past their
capacity) behind an ingress with a throwaway certificate, and simulated
carrier calls streaming 20 ms audio frames through it. Prints what happened
and exits 0 only when every call went through with no frame lost.
"""

from __future__ import annotations

import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import trustme

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.config.settings import config_from_dict
from fleet_ingress.logs import configure_logging
from fleet_ingress.net import event_loop
from fleet_ingress.service.ingress import Ingress
from fleet_ingress.sim import PROFILES, SimulatedFleet, run_calls, summarize

FLEET_CAPACITY = 16


async def demo(*, calls: int, duration: float, profile: str, out: TextIO) -> bool:
    ca = trustme.CA()  # throwaway: lives for this run only
    fleet_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(fleet_ssl)
    ingress_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ingress_ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    ingress_ssl.set_alpn_protocols(["http/1.1"])
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ingress_ssl)
    carrier_ssl = ssl.create_default_context()
    ca.configure_trust(carrier_ssl)

    fleets = [
        SimulatedFleet(name=name, capacity=FLEET_CAPACITY, ssl_context=fleet_ssl)
        for name in ("fleet-a", "fleet-b")
    ]
    with tempfile.TemporaryDirectory(prefix="fleet-ingress-demo-") as tmp:
        ca_pem = Path(tmp) / "demo-ca.pem"
        ca.cert_pem.write_to_path(ca_pem)
        for fleet in fleets:
            await fleet.start()
        ingress: Ingress | None = None
        try:
            config = config_from_dict(
                {
                    "listen": {"wss": "127.0.0.1:0", "acme": "", "stats": "", "admin_socket": ""},
                    "fleets": {"ca_file": str(ca_pem)},
                    "log": {"access": False},
                }
            )
            specs = parse_fleets_text(
                "\n".join(f"{f.url} name={f.name}" for f in fleets),
                default_maxconn=config.fleets.maxconn,
            )
            ingress = Ingress(config, specs, server_ssl=ingress_ssl)
            await ingress.start()
            assert ingress.poller is not None
            await ingress.poller.wait_first_probes(timeout=5)
            host, port = ingress.wss_address
            url = f"wss://{host}:{port}"
            print(f"fleets:  {', '.join(f'{f.name} {f.url}' for f in fleets)}", file=out)
            print(f"ingress: {url}  (TLS, throwaway certificate)", file=out)
            # Past what the fleets hold, calls would queue, then get 503 (as the
            # ingress must): a demo of it working said FAILED (the CLI audit of
            # session 32). The rest wait their turn, as carriers' retries would.
            at_once = len(fleets) * FLEET_CAPACITY
            print(
                f"calls:   {calls} x {duration:g}s of '{profile}' audio "
                f"({PROFILES[profile].interval * 1000:g} ms frames)"
                + (
                    f", at most {at_once} at once (what the {len(fleets)} demo fleets "
                    f"hold, {FLEET_CAPACITY} each)"
                    if calls > at_once
                    else ""
                ),
                file=out,
            )
            results = await run_calls(
                url,
                calls,
                concurrency=at_once,
                ssl_context=carrier_ssl,
                profile=profile,
                duration=duration,
                stagger=0.05,
            )
        finally:
            if ingress is not None:
                await ingress.stop(drain_timeout=1)
            for fleet in fleets:
                await fleet.stop()
    summary = summarize(results)
    _report(summary, out)
    failed = [r for r in results if not r.ok]
    for r in failed[:5]:
        print(f"  failed call: status={r.status} error={r.error}", file=out)
    ok = not failed and summary["lost_frames"] == 0 and summary["corrupt_frames"] == 0
    print("demo: OK" if ok else "demo: FAILED", file=out)
    return ok


def _report(summary: dict[str, Any], out: TextIO) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    print(f"\ncalls ok/failed:   {summary['ok']}/{summary['failed']}", file=out)
    for name, counts in sorted(summary["fleets"].items()):
        print(f"  {name:<16} {counts['ok']} ok, {counts['failed']} failed", file=out)
    print(
        f"frames relayed:    {summary['frames_sent']} sent, {summary['frames_received']} "
        f"echoed back, {summary['lost_frames']} lost, {summary['corrupt_frames']} corrupt",
        file=out,
    )
    print(
        f"handshake (TCP+TLS+upgrade): p50 {ms(summary['handshake_ms_p50'])}, "
        f"p99 {ms(summary['handshake_ms_p99'])}",
        file=out,
    )
    print(
        f"round trip via ingress:      p50 {ms(summary['rtt_ms_p50'])}, "
        f"p99 {ms(summary['rtt_ms_p99'])}",
        file=out,
    )


def run_demo(
    *, calls: int = 6, duration: float = 3.0, profile: str = "binary", out: TextIO | None = None
) -> int:
    configure_logging("warning", "text")
    ok = event_loop.run(
        demo(calls=calls, duration=duration, profile=profile, out=out or sys.stdout)
    )
    return 0 if ok else 1
