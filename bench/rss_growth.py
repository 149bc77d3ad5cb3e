"""A/B harness for RSS growth under call churn (docs/RELIABILITY.md, Soak).

Runs one relay as a subprocess in front of a SimulatedFleet on loopback, TLS on
both sides, keeps ``--workers`` calls going back to back for ``--seconds``
(each streams binary 20 ms frames for ``--call-seconds``), and prints the
relay's VmRSS before and after, the growth per call, and where the resident
memory sits (smaps regions). ``--target bare`` runs bench/bare_splice.py, the
floor with none of our code; ``--prelude CODE`` runs Python in the ingress
process before it starts, to switch one thing off at a time::

    .venv/bin/python bench/rss_growth.py --target ingress --seconds 50
    .venv/bin/python bench/rss_growth.py --target bare --seconds 50
    .venv/bin/python bench/rss_growth.py --prelude "import ssl; ..."
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import socket
import ssl
import sys
import tempfile
import time

import trustme
import uvloop

from fleet_ingress.sim import SimulatedFleet, run_call

REPO = pathlib.Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def rss_by_region(pid: int) -> dict[str, int]:
    regions: dict[str, int] = {}
    name = "anon"
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "anon"
            elif parts[0] == "Rss:":
                regions[name] = regions.get(name, 0) + int(parts[1])
    return regions


async def measure(args: argparse.Namespace) -> None:
    ca = trustme.CA()
    home = pathlib.Path(tempfile.mkdtemp(prefix="rss-growth-"))
    ca.cert_pem.write_to_path(home / "ca.pem")
    leaf = ca.issue_cert("127.0.0.1")
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(home / "cert.pem", append=True)
    leaf.private_key_pem.write_to_path(home / "key.pem")
    fleet_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(fleet_ssl)
    carrier_ssl = ssl.create_default_context()
    ca.configure_trust(carrier_ssl)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with SimulatedFleet(name="a", ssl_context=fleet_ssl, capacity=1000) as fleet:
        if args.target == "bare":
            command = [
                sys.executable, str(REPO / "bench" / "bare_splice.py"),
                "--listen", f"127.0.0.1:{port}", "--cert", str(home / "cert.pem"),
                "--key", str(home / "key.pem"), "--ca", str(home / "ca.pem"),
                "--fleet", f"127.0.0.1:{fleet.port}",
            ]  # fmt: skip
        else:
            (home / "fleets.txt").write_text(f"{fleet.url} name=a maxconn=1000\n")
            (home / "ingress.toml").write_text(
                f'[listen]\nwss = "127.0.0.1:{port}"\nacme = ""\nstats = ""\nadmin_socket = ""\n'
                f'[tls]\ncert = "cert.pem"\nkey = "key.pem"\n'
                f'[fleets]\nca_file = "ca.pem"\n[log]\naccess = false\nlevel = "error"\n'
            )
            code = (
                f"{args.prelude}\nimport sys\nfrom fleet_ingress.cli import main\n"
                f"sys.exit(main(['run', '-c', {str(home / 'ingress.toml')!r}]))"
            )
            command = [sys.executable, "-c", code]
        relay = await asyncio.create_subprocess_exec(*command)
        try:
            await asyncio.sleep(2)
            url = f"wss://127.0.0.1:{port}"
            stop = time.monotonic() + args.seconds
            calls = 0

            async def worker() -> None:
                nonlocal calls
                while time.monotonic() < stop:
                    await run_call(url, ssl_context=carrier_ssl, duration=args.call_seconds,
                                   echo_wait=0.2)  # fmt: skip
                    calls += 1

            workers = [asyncio.create_task(worker()) for _ in range(args.workers)]
            await asyncio.sleep(5)  # warm-up: buffers, first calls
            before, calls_before = rss_kib(relay.pid), calls
            await asyncio.gather(*workers)
            await asyncio.sleep(1)
            after = rss_kib(relay.pid)
            done = max(1, calls - calls_before)
            print(
                f"{args.target}: {done} calls, RSS {before} -> {after} KiB, "
                f"{(after - before) / done:.1f} KiB per call"
            )
            for region, kib in sorted(rss_by_region(relay.pid).items(), key=lambda kv: -kv[1])[:5]:
                print(f"  {kib:>8} KiB  {region}")
        finally:
            relay.terminate()
            await relay.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["ingress", "bare"], default="ingress")
    parser.add_argument("--seconds", type=float, default=50)
    parser.add_argument("--workers", type=int, default=40)
    parser.add_argument("--call-seconds", type=float, default=5)
    parser.add_argument("--prelude", default="", help="Python run in the ingress first")
    uvloop.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
