"""The workers' side of a reload (`service.supervisor`'s `reload`): each
round tells every worker to reload (`reload` on its channel, with what the
supervisor applied), one still starting once it serves, and waits
RELOAD_ANSWER_TIMEOUT for the answers; one that comes later is logged then."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fleet_ingress.logs import fields
from fleet_ingress.net.late_timers import patient_timeout, wait_patiently
from fleet_ingress.service.worker_asks import WorkerAsks
from fleet_ingress.service.worker_process import WORKER_START_TIMEOUT, WorkerProcess

log = logging.getLogger("fleet_ingress.lifecycle")

# A worker's answer to `reload` (it reads the certificate itself).
RELOAD_ANSWER_TIMEOUT = 10.0
# How long a worker's own reload is waited for past its round (which waits
# RELOAD_ANSWER_TIMEOUT): its outcome, late, is logged then. Waited for as long
# as that, a worker stopped for a while (SIGSTOP, a swapped-out host) that
# reloaded once it ran again was logged a second time as not reloaded, its
# answer dropped (the channel audit of session 24). One that hangs is killed
# (process.worker_hang_timeout) and answers "gone" first.
RELOAD_LATE_WAIT = 300.0


class ReloadRounds:
    """The reload rounds of `workers` (the supervisor's, by channel key), asked
    through `asks`; each worker's reload a task of `keep`'s, carrying `told()`."""

    def __init__(
        self,
        asks: WorkerAsks,
        workers: dict[int, WorkerProcess],
        keep: Callable[[Coroutine[Any, Any, dict[str, Any]]], asyncio.Task[dict[str, Any]]],
        told: Callable[[], dict[str, Any]],
    ) -> None:
        self.asks = asks
        self.workers = workers
        self.keep = keep
        self.told = told
        # Reload rounds begun; the one under way (its tasks by worker pid), awaited by READY=1.
        self._reload_rounds = 0
        self._reload_round: dict[int, asyncio.Task[dict[str, Any]]] | None = None

    @property
    def begun(self) -> int:
        """Reload rounds begun (a worker started meanwhile is told: `tell_late`)."""
        return self._reload_rounds

    def tell_late(self, worker: WorkerProcess) -> None:
        """`worker`, started before a round that did not see it, told too (and
        counted in the round if it is still under way)."""
        reloading = self._start_reload(worker)
        if self._reload_round is not None:
            self._reload_round[worker.pid] = reloading

    async def reload_workers(self) -> dict[int, dict[str, Any]]:
        """Every worker reloads, one still starting once it serves; their
        answers by pid, within RELOAD_ANSWER_TIMEOUT (one that has not
        answered by then still reloads when it can, its outcome logged then)."""
        self._reload_rounds += 1
        tasks = self._reload_round = {}
        for worker in list(self.workers.values()):
            if not worker.left.is_set():
                tasks[worker.pid] = self._start_reload(worker)
        # Patient: a supervisor stopped through the round (SIGSTOP, a paused VM)
        # reads the answers waiting for it before its timeout ends the round;
        # they were logged "a worker did not reload", then "reloaded, after".
        try:
            with contextlib.suppress(TimeoutError):
                async with patient_timeout(RELOAD_ANSWER_TIMEOUT):
                    # `tasks` may grow meanwhile: a worker whose start began before this round.
                    while pending := [t for t in tasks.values() if not t.done()]:
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._reload_round = None
        late = {
            "ok": False,
            "error": f"no answer within {RELOAD_ANSWER_TIMEOUT:g}s; it reloads when it can",
            "unknown": True,  # not a refusal: its outcome is logged when it comes
        }
        return {pid: t.result() if t.done() else late for pid, t in tasks.items()}

    def _start_reload(self, worker: WorkerProcess) -> asyncio.Task[dict[str, Any]]:
        return self.keep(self._reload_said_if_late(worker))

    async def _reload_said_if_late(self, worker: WorkerProcess) -> dict[str, Any]:
        """`_reload_worker`, its outcome logged here when no round counts it:
        its round was over (READY=1 sent) as it ended, or it had none. Told
        as the task ends, before any round can read it done: told in a done
        callback, one queued behind the round's wake-up (two answers read a
        loop turn apart) found the round over when the round had counted it,
        and a reload listed in "workers reloaded" was said again "after the
        others" (the longevity soak of session 35: 8 of 100 reloads)."""
        answer = await self._reload_worker(worker)
        if asyncio.current_task() not in (self._reload_round or {}).values():
            if answer.get("ok"):
                log.info("worker reloaded, after the others", extra=fields(pid=worker.pid))
            else:
                log_not_reloaded(worker.pid, answer.get("error"))
        return answer

    async def _reload_worker(self, worker: WorkerProcess) -> dict[str, Any]:
        if not worker.serving.is_set():
            # Not before: it may not listen to its channel yet.
            waits = {
                asyncio.ensure_future(worker.serving.wait()),
                asyncio.ensure_future(worker.left.wait()),
            }
            try:
                # Patient: its `serving` come during a stall is read first.
                await wait_patiently(
                    waits, WORKER_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for wait in waits:
                    wait.cancel()
            if worker.left.is_set() or not worker.serving.is_set():
                # Its replacement runs this configuration and certificate.
                return {"ok": False, "error": "the worker did not start", "unknown": True}
        # What the supervisor applied (`told`), not the files read again.
        return await self.asks.ask_one(worker, "reload", RELOAD_LATE_WAIT, **self.told())


def log_not_reloaded(pid: int, error: object) -> None:
    log.error(
        "a worker did not reload: it serves with its previous certificate and "
        "settings; see its log line (pid) for why",
        extra=fields(pid=pid, error=error),
    )
