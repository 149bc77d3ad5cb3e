"""The supervisor's asks to its workers on their slot channels (`reload`,
`stop`, `close-fleet`, `list-calls`, `end-call`), each answer matched to its
ask by (channel key, ask id) (`service.supervisor`)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from typing import Any

from fleet_ingress.net.late_timers import patient_timeout, wait_patiently
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.service.worker_process import WorkerProcess


def first_ask_id() -> int:
    """Where an image's ask ids begin: anywhere in 2**31 (one of a previous
    image's few asks still answered is 1 in some hundreds of millions)."""
    return int.from_bytes(os.urandom(4), "big") % 2**31 + 1


class WorkerAsks:
    """The asks sent to `workers` (the supervisor's, by channel key) over
    `server`, and the answers waited for."""

    def __init__(self, server: SlotServer, workers: dict[int, WorkerProcess]) -> None:
        self.server = server
        self.workers = workers
        # Ids of the asks to workers, whose answers are matched by (channel, id):
        # drawn anew by each image. Counted from 1 in each, a listing the previous
        # image asked for, still streaming its parts over the exec, was taken for
        # the new image's first ask (the review of session 36). Drawn, not carried
        # in the exec's state: a supervisor started again after one died (systemd)
        # takes the workers up with no state from it.
        self._asks = itertools.count(first_ask_id())
        self._answers: dict[tuple[int, int], asyncio.Future[dict[str, Any]]] = {}

    def next_id(self) -> int:
        """An ask id of this image's, for an op whose answer is not waited for."""
        return next(self._asks)

    def waiting(self, ask: tuple[int, int]) -> bool:
        """Whether `ask` (channel key, ask id) still waits for its answer."""
        return ask in self._answers

    async def ask_workers(
        self,
        op: str,
        timeout: float,
        *,
        leave_out: Callable[[WorkerProcess], bool] | None = None,
        **more: Any,
    ) -> dict[int, dict[str, Any]]:
        """Send `op` (with the fields `more`) to every live worker (but those
        `leave_out` names); their answers by pid (a worker that did not answer
        in time: `{"ok": False, "error": ...}`)."""
        ask = next(self._asks)
        asked: dict[int, asyncio.Future[dict[str, Any]]] = {}
        loop = asyncio.get_running_loop()
        for key, worker in list(self.workers.items()):
            if worker.left.is_set() or (leave_out is not None and leave_out(worker)):
                continue
            future = self._answers[(key, ask)] = loop.create_future()
            if self.server.send(key, {"op": op, "id": ask, **more}):
                asked[worker.pid] = future
            else:
                del self._answers[(key, ask)]
        try:
            # Patient: answers that came while the supervisor was stopped are
            # read before a worker is said not to have answered.
            await wait_patiently(asked.values(), timeout)
        finally:
            for answer_key in [k for k in self._answers if k[1] == ask]:
                del self._answers[answer_key]
        return {
            pid: future.result()
            if future.done()
            else {"ok": False, "error": f"no answer within {timeout:g}s"}
            for pid, future in asked.items()
        }

    async def ask_one(
        self, worker: WorkerProcess, op: str, timeout: float, **more: Any
    ) -> dict[str, Any]:
        """Send `op` (with the fields `more`) to one worker; its answer, or
        `{"ok": False, "error": ...}`."""
        ask, key = next(self._asks), worker.key
        future = self._answers[(key, ask)] = asyncio.get_running_loop().create_future()
        try:
            if not self.server.send(key, {"op": op, "id": ask, **more}):
                return {"ok": False, "error": "the worker is gone", "unknown": True, "gone": True}
            async with patient_timeout(timeout):  # an answer come during a stall: read first
                return await future
        except TimeoutError:
            return {"ok": False, "error": f"no answer within {timeout:g}s", "unknown": True}
        finally:
            self._answers.pop((key, ask), None)

    def answered(self, key: int, message: dict[str, Any]) -> None:
        future = self._answers.get((key, message.get("id", -1)))
        if future is not None and not future.done():
            future.set_result(message)

    def worker_gone(self, key: int) -> None:
        """Worker `key`'s channel ended: every ask it has not answered is
        answered "the worker is gone"."""
        for (asked, _), future in list(self._answers.items()):
            if asked == key and not future.done():
                # Nothing to reload: it serves nothing now, and its replacement
                # reads the files as they are (not a worker left on old ones).
                future.set_result({"ok": False, "error": "the worker is gone", "gone": True})
