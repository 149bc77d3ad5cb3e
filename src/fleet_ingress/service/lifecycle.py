"""One in-process `Ingress` driven by signals: what `fleet-ingress run` was
before it became a supervisor and workers (`service.supervisor`, which
shares the timings below and the same signal semantics).

SIGHUP reloads in place (configuration, fleets file, certificate) and never
touches an established call; an invalid new configuration is refused whole.
SIGTERM/SIGINT stop accepting at once, let calls finish for up to
`timeouts.drain`, close the rest and exit 0; a second signal exits at once.
systemd hears READY=1, RELOADING=1, STOPPING=1, STATUS= and WATCHDOG=1.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from pathlib import Path

from fleet_ingress.logs import configure_logging, fields
from fleet_ingress.service import glibc_malloc
from fleet_ingress.service.ingress import Ingress, ReloadRefused
from fleet_ingress.service.sdnotify import Notifier

log = logging.getLogger("fleet_ingress.lifecycle")

# READY=1 waits for every fleet's first probe, but never longer than this:
# a fleet that does not answer must not keep the ingress from serving the others.
FIRST_PROBE_WAIT = 5.0
STATUS_EVERY = 10.0
SECOND_SIGNAL_GRACE = 3.0  # after a second SIGTERM, exit at once if closing calls hangs


class _Stop(Exception):
    pass


async def run_service(
    ingress: Ingress, config_path: Path, notifier: Notifier | None = None
) -> None:
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue()

    def on_stop_signal(signum: int) -> None:
        if stop.is_set():
            # The operator means it: no more draining. The calls are closed (each
            # still gets its access-log line); if that hangs, exit regardless.
            log.warning(
                "second signal: closing every call and exiting", extra=fields(signal=signum)
            )
            ingress.cut_drain()
            loop.call_later(SECOND_SIGNAL_GRACE, os._exit, 0)
            return
        log.info("stopping: no new connections, draining calls", extra=fields(signal=signum))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)

    await ingress.start()
    if ingress.poller is not None:
        await ingress.poller.wait_first_probes(timeout=FIRST_PROBE_WAIT)
    # Everything built so far (modules, config, TLS contexts) lives as long as the
    # process: out of the cyclic collector's sight, its rare full collections scan
    # only what serving created, not the whole import graph (16 ms -> a few under a
    # flood, measured; a full collection holds every live call's frames).
    gc.collect()
    gc.freeze()
    notifier.notify("READY=1", f"STATUS={ingress.status_line()}", f"MAINPID={os.getpid()}")
    log.info("ready", extra=fields(status=ingress.status_line()))
    background = [
        loop.create_task(_reload_on_signal(ingress, config_path, reloads, notifier)),
        loop.create_task(_keep_systemd_informed(ingress, notifier)),
        loop.create_task(_trim_heap()),
    ]
    await stop.wait()
    notifier.notify("STOPPING=1", f"STATUS=draining: {ingress.status_line()}")
    for task in background:
        task.cancel()
    await ingress.stop()
    log.info("stopped")
    notifier.close()


async def _reload_on_signal(
    ingress: Ingress, config_path: Path, reloads: asyncio.Queue[None], notifier: Notifier
) -> None:
    logging_in_use = (ingress.config.log.level, ingress.config.log.format)
    while True:
        await reloads.get()
        monotonic_usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
        notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        try:
            summary = await ingress.reload(config_path)
        except ReloadRefused as exc:
            log.error(
                "reload refused: the running configuration stays",
                extra=fields(config=str(config_path), error=str(exc)),
            )
            notifier.notify(
                "READY=1", f"STATUS=reload refused ({exc}); still serving the previous config"
            )
            continue
        except Exception:  # a bug must not take the serving process down
            log.exception("reload failed", extra=fields(config=str(config_path)))
            notifier.notify("READY=1", "STATUS=reload failed; see the log")
            continue
        log_config = ingress.config.log
        if (log_config.level, log_config.format) != logging_in_use:
            logging_in_use = (log_config.level, log_config.format)
            configure_logging(*logging_in_use)
        log.info("reloaded", extra=fields(config=str(config_path), changes=summary))
        notifier.notify("READY=1", f"STATUS={ingress.status_line()}")


async def _trim_heap() -> None:
    while True:
        await asyncio.sleep(glibc_malloc.TRIM_EVERY)
        glibc_malloc.trim()


async def _keep_systemd_informed(ingress: Ingress, notifier: Notifier) -> None:
    """STATUS= every few seconds, and WATCHDOG=1 at half of WatchdogSec: the
    ping comes from the event loop itself, so a stuck loop stops it."""
    interval = min(STATUS_EVERY, notifier.watchdog_interval or STATUS_EVERY)
    while True:
        lines = [f"STATUS={ingress.status_line()}"]
        if notifier.watchdog_interval is not None:
            lines.append("WATCHDOG=1")
        notifier.notify(*lines)
        await asyncio.sleep(interval)
