"""One simulated fleet (``fleet_ingress.sim.SimulatedFleet``, TLS, echo) in its own process.

``python -m bench.harness.fleets --tls DIR --name fleet-a --capacity N`` prints
``{"port": P}`` once serving and runs until SIGTERM. One process per fleet, so
the fleets' CPU is theirs (not the proxy's or the generator's) and two fleets
can run on two cores. :func:`argv` is its command line, :func:`start` starts one
from a bench run (:class:`.children.Children`) and waits until it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

import uvloop

from fleet_ingress.sim import SimulatedFleet

from .children import Children, python_module
from .tlsfiles import TLSFiles

START_TIMEOUT = 20.0  # seconds for a fleet process to serve


def argv(tls_dir: Path, name: str, capacity: int) -> list[str]:
    """The command line of one fleet process, with ``tls_dir``'s ``TLSFiles``."""
    return python_module(
        "bench.harness.fleets", "--tls", str(tls_dir), "--name", name, "--capacity", str(capacity)
    )


async def start(
    children: Children, tls_dir: Path, name: str, capacity: int, *, cpus: set[int] | None = None
) -> tuple[asyncio.subprocess.Process, int]:
    """One fleet process, serving: it, and its port."""
    proc = await children.spawn(
        argv(tls_dir, name, capacity), stdout=asyncio.subprocess.PIPE, cpus=cpus
    )
    assert proc.stdout is not None
    async with asyncio.timeout(START_TIMEOUT):
        line = await proc.stdout.readline()
    if not line:
        raise RuntimeError(f"fleet {name} exited ({await proc.wait()}) before serving")
    return proc, int(json.loads(line)["port"])


async def serve(tls: TLSFiles, name: str, capacity: int) -> None:
    fleet = SimulatedFleet(name=name, capacity=capacity, ssl_context=tls.fleet_server_context())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await fleet.start()
    try:
        print(json.dumps({"port": fleet.port}), flush=True)
        await stop.wait()
    finally:
        await fleet.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tls", type=Path, required=True, help="directory of bench.tlsfiles")
    p.add_argument("--name", required=True)
    p.add_argument("--capacity", type=int, required=True)
    args = p.parse_args()
    uvloop.run(serve(TLSFiles.at(args.tls), args.name, args.capacity))


if __name__ == "__main__":
    main()
