"""The live calls of a host's workers (`fleet-ingress calls`, `end-call`;
the admin socket's `Calls`): listed and ended by asking the workers that
hold them (`service.worker_asks`)."""

from __future__ import annotations

import asyncio
from typing import Any

from fleet_ingress.core.call_list import (
    CallFilter,
    CallIdError,
    no_such_call,
    oldest_first,
    parse_call_id,
    process_gone,
    whole_id_wanted,
)
from fleet_ingress.net.calls import END_CALL_WAIT
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.ops.fleet_ops import FleetChangeError
from fleet_ingress.service.worker_asks import WorkerAsks
from fleet_ingress.service.worker_process import WorkerProcess

# `calls`: a worker reads its calls a part a turn (10,000: 100 turns), answered
# within this or named as not answering. Below the CLI's READ_TIMEOUT (10 s).
LIST_ANSWER_WAIT = 5.0
# `end-call`: the worker answers once the call is gone (END_CALL_WAIT at most).
END_ANSWER_WAIT = END_CALL_WAIT + 3.0


class WorkerCalls:
    """The calls of `workers` (the supervisor's, by channel key), asked
    through `asks`; `server` says what each worker's release can be asked."""

    def __init__(
        self, asks: WorkerAsks, server: SlotServer, workers: dict[int, WorkerProcess]
    ) -> None:
        self.asks = asks
        self.server = server
        self.workers = workers
        # `calls`: the parts of each worker's answer read so far, by (key,
        # ask): its live calls' rows, and its closing ones' (None until a
        # part says `closing`: a worker of a release before it never does).
        self._listed: dict[tuple[int, int], tuple[list[Any], list[Any] | None]] = {}

    def calls_listed(self, key: int, message: dict[str, Any]) -> None:
        """A part of a worker's `list-calls` answer; the last ("more": false)
        answers it with every part's rows, live (`calls`) and closing."""
        ask = (key, message.get("id", -1))
        if not self.asks.waiting(ask):  # too late: that listing is over
            return
        live, closing = self._listed.get(ask, ([], None))
        rows = message.get("calls")
        if isinstance(rows, list):
            live.extend(rows)
        rows = message.get("closing")
        if isinstance(rows, list):
            if closing is None:
                closing = []
            closing.extend(rows)
        self._listed[ask] = (live, closing)
        if not message.get("more"):
            del self._listed[ask]
            self.asks.answered(key, {**message, "calls": live, "closing": closing})

    async def list_calls(self, wanted: CallFilter) -> dict[str, Any]:
        """Every worker's calls that `wanted` keeps (both generations during
        an upgrade), oldest first; the workers that did not answer within
        LIST_ANSWER_WAIT are named (a worker of a release before `calls`
        does not, nor one stopped or hung), their calls not listed."""
        generations = {w.pid: w.generation for w in self.workers.values()}
        # A worker of a release before `calls` ignores the op: named at once,
        # not waited for (LIST_ANSWER_WAIT on every listing of an upgrade's drain).
        before = sorted(
            w.pid
            for w in self.workers.values()
            if not w.left.is_set() and self.server.of_a_release_before_calls(w.key)
        )
        try:
            answers = await self.asks.ask_workers(
                "list-calls",
                LIST_ANSWER_WAIT,
                leave_out=lambda w: self.server.of_a_release_before_calls(w.key),
                filter=wanted.to_wire(),
            )
        finally:
            for ask in [k for k in self._listed if not self.asks.waiting(k)]:
                del self._listed[ask]
        rows: list[dict[str, Any]] = []
        closing_rows: list[dict[str, Any]] = []
        workers = []
        for pid, answer in sorted(answers.items()):
            listed = answer.get("calls")
            answered = isinstance(listed, list)
            if answered:
                rows.extend(row for row in listed if isinstance(row, dict))
            closing = answer.get("closing")
            if isinstance(closing, list):
                closing_rows.extend(row for row in closing if isinstance(row, dict))
            workers.append(
                {
                    "pid": pid,
                    "generation": generations.get(pid),
                    "answered": answered,
                    "calls": len(listed) if answered else None,
                    # None: not said (a release before closing calls were listed).
                    "closing": len(closing) if isinstance(closing, list) else None,
                }
            )
            await asyncio.sleep(0)
        workers.extend(
            {
                "pid": pid,
                "generation": generations.get(pid),
                "answered": False,
                "calls": None,
                "closing": None,
                "release_before_calls": True,
            }
            for pid in before
        )
        return {
            "calls": oldest_first(rows),
            "closing": oldest_first(closing_rows),
            "filter": wanted.to_wire(),
            "workers": workers,
            "channel_lost": [w.pid for w in self.workers.values() if w.channel_lost],
        }

    async def end_call(self, text: str, why: str) -> dict[str, Any]:
        """End the call `text` (PID-N-TAG) in its worker; FleetChangeError 404 when
        no worker holds it, naming it and how to list the live calls, or when
        the tag is not its worker's: the process that call ran in is gone, its
        pid come back. `PID-N` alone only for a worker that names its calls so
        (a build before tags): for one with a tag it may be a call of a process
        gone (an old listing, an access line's `process` and `call_id`)."""
        try:
            pid, number, tag = parse_call_id(text)
        except CallIdError as exc:
            raise FleetChangeError(400, str(exc)) from None
        worker = next(
            (w for w in self.workers.values() if w.pid == pid and not w.left.is_set()), None
        )
        if worker is None:
            if any(w.pid == pid and w.channel_lost for w in self.workers.values()):
                # It runs on, its calls with it, but it cannot be told: "no such
                # worker" would send the operator looking for another process.
                raise FleetChangeError(
                    409,
                    f"call {text}: its worker (pid {pid}) lost its channel to the "
                    "supervisor and cannot be told to end a call; its calls go on until "
                    "they end or its drain does (`fleet-ingress calls` names it NOT LISTED)",
                )
            raise FleetChangeError(
                404,
                no_such_call(text, f"no worker of this ingress is pid {pid}")
                if tag is None
                else process_gone(text, f"no worker of this ingress is pid {pid}"),
            )
        if self.server.of_a_release_before_calls(worker.key):
            raise FleetChangeError(
                409,
                f"call {text}: its worker (pid {pid}, generation {worker.generation}) runs a "
                "release before `end-call` (an upgrade's old generation) and cannot end one "
                "call; its calls go on until they end or its drain does",
            )
        its = self.server.call_tag(worker.key)  # None: not heard yet (the worker checks)
        if tag is None and its != "":
            raise FleetChangeError(400, whole_id_wanted(text))
        if tag is not None and its is not None and tag != its:
            raise FleetChangeError(404, self._another_worker(text, worker, its))
        answer = await self.asks.ask_one(
            worker, "end-call", END_ANSWER_WAIT, call=number, why=why, tag=tag
        )
        if "call" not in answer:
            raise FleetChangeError(
                504, f"call {text}: its worker (pid {pid}) did not answer: {answer.get('error')}"
            )
        if not isinstance(answer["call"], dict):
            its = answer.get("tag")
            if isinstance(its, str) and its != tag:
                raise FleetChangeError(404, self._another_worker(text, worker, its))
            raise FleetChangeError(404, no_such_call(text, "it has ended, or never was"))
        return {"ended": answer["call"], "reason": why}

    @staticmethod
    def _another_worker(text: str, worker: WorkerProcess, its: str) -> str:
        named = (
            f"its calls are named {worker.pid}-N-{its}"
            if its
            else f"it names its calls {worker.pid}-N"
        )
        return process_gone(
            text,
            f"pid {worker.pid} here is a worker of generation {worker.generation}: {named}",
        )
