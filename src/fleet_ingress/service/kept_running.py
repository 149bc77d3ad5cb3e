"""The supervisor's background tasks, kept running whatever one of them raises;
and a one-off task that raises, said at once (the workers' too).

A task of the supervisor's that ends on an exception stops what it does for
good, and asyncio says so only when the task is collected, if ever: the
supervisor-crash audit of session 26 saw one failure each stop the watchdog's
pings (systemd then ends the unit, every call on the host with it, 30 s
later), every reload (a renewed certificate never loaded), the report pulls
and with them the kill of a hung worker, and the replacement of a dead worker.
Each is now started again, soon, and said: an error line with the traceback,
counted by task in `fleet_ingress_supervisor_task_failures_total{task}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from fleet_ingress.logs import fields

log = logging.getLogger("fleet_ingress.supervisor")

# A task that failed starts again this long after, doubling up to RETRY_MAX
# (well within the unit's WatchdogSec, 30 s): a failure that repeats at once
# is said a few times a second at first, then every RETRY_MAX.
RETRY_FIRST = 0.1
RETRY_MAX = 5.0


class TaskFailures:
    """How often each background task of the supervisor failed (for /metrics)."""

    def __init__(self, known: tuple[str, ...] = ()) -> None:
        """`known`: tasks shown at 0 until they fail (a rate() needs a series)."""
        self.by_task: Counter[str] = Counter(dict.fromkeys(known, 0))

    def failed(self, task: str) -> int:
        self.by_task[task] += 1
        return self.by_task[task]


async def kept_running(
    name: str,
    start: Callable[[], Coroutine[Any, Any, None]],
    failures: TaskFailures,
    *,
    after_failure: Callable[[], None] | None = None,
) -> None:
    """Run `start()` until it returns; each time it raises, say so, count it,
    call `after_failure` (whoever waited on it is told) and start it again
    after a short wait. Cancelling this cancels it."""
    delay = RETRY_FIRST
    while True:
        try:
            await start()
            return
        except Exception:
            count = failures.failed(name)
            log.exception(
                "supervisor task failed: started again; a bug, report it",
                extra=fields(task=name, failures=count, retry_in_s=delay),
            )
            if after_failure is not None:
                with contextlib.suppress(Exception):
                    after_failure()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


def say_if_failed(failures: TaskFailures) -> Callable[[asyncio.Task[Any]], None]:
    """A done callback for the supervisor's one-off tasks, counted by task."""
    return failed_task_callback("supervisor task failed; a bug, report it", failures.failed)


def failed_task_callback(
    message: str,
    count: Callable[[str], int | None],
    logger: logging.Logger = log,
) -> Callable[[asyncio.Task[Any]], None]:
    """A done callback for a one-off task (the supervisor's, a worker's): one
    that ended on an exception is said at once, with what it was (asyncio says
    it only as the task is collected, if ever, and not which), and counted
    (`count(name)`: how many so far, or None when that is not kept by task)."""

    def said(task: asyncio.Task[Any]) -> None:
        if task.cancelled() or (exc := task.exception()) is None:
            return
        name = getattr(task.get_coro(), "__qualname__", task.get_name())
        failures = count(name)
        logger.error(
            message,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra=fields(task=name, **({} if failures is None else {"failures": failures})),
        )

    return said
