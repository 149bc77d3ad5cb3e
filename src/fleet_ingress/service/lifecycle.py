"""What `fleet-ingress run`'s processes share of their lifecycle: the signal
semantics, the timings and the heap trim (`service.supervisor` drives the
supervisor, `service.worker` each worker).

SIGHUP reloads in place (configuration, fleets file, certificate) and never
touches an established call; an invalid new configuration is refused whole.
SIGTERM/SIGINT stop accepting at once, let calls finish for up to
`timeouts.drain`, close the rest and exit 0; a second signal exits at once.
SIGUSR1 and SIGQUIT are ignored (`process_start.IGNORED_SIGNALS`) and said.
systemd hears READY=1, RELOADING=1, STOPPING=1, STATUS= and WATCHDOG=1 from
the supervisor only.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from fleet_ingress.logs import RateLimitedLog
from fleet_ingress.net.event_loop import sleep_to_tick
from fleet_ingress.service import glibc_malloc

log = logging.getLogger("fleet_ingress.lifecycle")

# READY=1 waits for every fleet's first probe, but never longer than this:
# a fleet that does not answer must not keep the ingress from serving the others.
FIRST_PROBE_WAIT = 5.0
STATUS_EVERY = 10.0
SECOND_SIGNAL_GRACE = 3.0  # after a second SIGTERM, exit at once if closing calls hangs
EXIT_FLUSH_WAIT = 0.5  # that exit waits this long at most for its log lines to be written


# A line a second at most for each signal: a flood of them (a script sending
# SIGUSR1 in a loop) is not a flood of lines; the next line, or one at the end
# of the second, says how many more came.
_ignored: dict[int, RateLimitedLog] = {}


def say_signal_ignored(signum: int) -> None:
    """SIGUSR1 or SIGQUIT came: ignored, and said, with what does what (from
    the process's event loop: its signal handler)."""
    if (said := _ignored.get(signum)) is None:
        said = _ignored[signum] = RateLimitedLog(
            log,
            per_second=1,
            call_later=lambda delay, then: asyncio.get_running_loop().call_later(delay, then),
            level=logging.WARNING,
            summary_fields={"signal": signal.Signals(signum).name},
        )
    said.info(
        "signal ignored: SIGTERM stops (calls drain), SIGHUP reloads, SIGUSR2 upgrades; "
        "logs go to stderr (the journal), there is no file to reopen",
        signal=signal.Signals(signum).name,
    )


async def trim_heap() -> None:
    """Give freed heap back to the kernel every glibc_malloc.TRIM_EVERY seconds."""
    while True:
        await sleep_to_tick(glibc_malloc.TRIM_EVERY)
        glibc_malloc.trim()
