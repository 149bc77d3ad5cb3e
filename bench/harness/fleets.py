"""One simulated fleet (``fleet_ingress.sim.SimulatedFleet``, TLS, echo) in its own process.

``python -m bench.harness.fleets --tls DIR --name fleet-a --capacity N`` prints
``{"port": P}`` once serving and runs until SIGTERM. One process per fleet, so
the fleets' CPU is theirs (not the proxy's or the generator's) and two fleets
can run on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

import uvloop

from fleet_ingress.sim import SimulatedFleet

from .tlsfiles import TLSFiles


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
