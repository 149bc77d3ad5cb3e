"""fleet-ingress's own call path in one process, with no supervisor: the bench's
``ingress1p`` target (bench/harness/targets.py).

``fleet-ingress run`` always runs a supervisor and its workers: every call takes
its fleet slot from the supervisor over a Unix socket and gives it back there
(two messages, two process wake-ups). This runs the same ``Ingress`` a worker
runs, from the same config, but with the slot table in-process (as the demo
does): measured beside ``ingress@w1``, the difference is what the host-wide
slot coordinator costs a call, end to end. A bench floor, not a way to run the
product (no upgrade, no host-wide view)::

    python bench/one_process_ingress.py -c ingress.toml

It serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import uvloop

from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import load_config
from fleet_ingress.logs import configure_logging
from fleet_ingress.service.ingress import Ingress


async def serve(config_path: Path) -> None:
    config = load_config(config_path)
    fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
    configure_logging(config.log.level, config.log.format, pid=True)
    ingress = Ingress(config, fleets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await ingress.start()
    try:
        await stop.wait()
    finally:
        await ingress.stop(drain_timeout=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    uvloop.run(serve(parser.parse_args().config))


if __name__ == "__main__":
    main()
