"""A/B harness for RSS growth under call churn (docs/RELIABILITY.md, Soak).

Runs one relay as a subprocess in front of a SimulatedFleet on loopback, TLS on
both sides, keeps ``--workers`` calls going back to back for ``--seconds``
(each streams binary 20 ms frames for ``--call-seconds``), and prints the
relay's VmRSS before and after (the ingress's: its supervisor's and workers'
summed, since session 40; before, the supervisor's alone, which holds no
call), the growth per call, and where the resident memory sits (smaps regions
of its largest process, the worker). ``--target bare`` runs bench/bare_splice.py, the
floor with none of our code; ``--prelude CODE`` runs Python in the ingress
process before it starts, to switch one thing off at a time::

    .venv/bin/python bench/rss_growth.py --target ingress --seconds 50
    .venv/bin/python bench/rss_growth.py --target bare --seconds 50
    .venv/bin/python bench/rss_growth.py --prelude "import ssl; ..."
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from fleet_ingress.sim import SimulatedFleet, run_call

if __package__ in (None, ""):  # ``python bench/rss_growth.py``: the harness from this tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.children import HOST, Children, free_port
from bench.harness.procfs import descendants, rss_kib, smaps_rss
from bench.harness.targets import BARE_SPLICE
from bench.harness.tlsfiles import TLSFiles


def host_rss_kib(pid: int) -> int:
    """RSS in KiB of ``pid`` and every process below it: the ingress's calls are
    held by its workers, not by the supervisor ``pid`` is."""
    return sum(rss_kib(p) for p in descendants(pid))


def largest(pid: int) -> int:
    """The process below ``pid`` (or itself) with the most RSS: the worker."""
    return max(descendants(pid), key=rss_kib)


async def measure(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="rss-growth-"))
    tls = TLSFiles.write(home)
    carrier_ssl = ssl.create_default_context(cafile=str(tls.ca))
    port = free_port()
    children = Children()
    async with SimulatedFleet(
        name="a", ssl_context=tls.fleet_server_context(), capacity=1000
    ) as fleet:
        if args.target == "bare":
            command = [
                sys.executable, str(BARE_SPLICE), "--listen", f"{HOST}:{port}",
                "--cert", str(tls.server_cert), "--key", str(tls.server_key),
                "--ca", str(tls.ca), "--fleet", f"{HOST}:{fleet.port}",
            ]  # fmt: skip
        else:
            (home / "fleets.txt").write_text(f"{fleet.url} name=a maxconn=1000\n")
            (home / "ingress.toml").write_text(
                f'[listen]\nwss = "{HOST}:{port}"\nacme = ""\nstats = ""\nadmin_socket = ""\n'
                f'[tls]\ncert = "{tls.server_cert}"\nkey = "{tls.server_key}"\n'
                f'[fleets]\nca_file = "{tls.ca}"\n[log]\naccess = false\nlevel = "error"\n'
            )
            code = (
                f"{args.prelude}\nimport sys\nfrom fleet_ingress.cli import main\n"
                f"sys.exit(main(['run', '-c', {str(home / 'ingress.toml')!r}]))"
            )
            command = [sys.executable, "-c", code]
        relay = await children.spawn(command)
        try:
            await asyncio.sleep(2)
            url = f"wss://{HOST}:{port}"
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
            before, calls_before = host_rss_kib(relay.pid), calls
            await asyncio.gather(*workers)
            await asyncio.sleep(1)
            after = host_rss_kib(relay.pid)
            done = max(1, calls - calls_before)
            print(
                f"{args.target}: {done} calls, RSS {before} -> {after} KiB, "
                f"{(after - before) / done:.1f} KiB per call"
            )
            regions = {k or "anon": v for k, v in smaps_rss(largest(relay.pid)).items()}
            for region, kib in sorted(regions.items(), key=lambda kv: -kv[1])[:5]:
                print(f"  {kib:>8} KiB  {region}")
        finally:
            await children.stop_all()


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
