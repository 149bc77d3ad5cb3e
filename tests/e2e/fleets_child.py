"""Simulated TLS fleets in a process of their own, for a test whose carriers
would starve the fleets' health answers in one event loop: argv is the
fleet certificate's PEM (key and chain) and the fleets' names; prints one
line `name url` a fleet, then `ready`; stops when stdin closes."""

from __future__ import annotations

import asyncio
import ssl
import sys

from fleet_ingress.net import event_loop
from fleet_ingress.sim import SimulatedFleet


async def main(pem: str, names: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pem)
    sims = [SimulatedFleet(name=name, capacity=400, ssl_context=ctx) for name in names]
    for sim in sims:
        await sim.start()
        print(sim.name, sim.url, flush=True)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for sim in sims:
        await sim.stop()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=event_loop.new_event_loop) as runner:
        runner.run(main(sys.argv[1], sys.argv[2]))
