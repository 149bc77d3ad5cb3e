"""The workers' lives, for the supervisor (`service.supervisor`): each worker
started (`spawn`: its process, its channel served, watched), replaced when
it dies, killed when it hangs, retired with an upgrade's old generation, and
stopped with the service; the serving generation and how many workers it
should have (`WorkerPool`).

- A worker that dies is replaced at once; its channel closing gives its
  slots back (the coordinator's lock dies with its holder), and one line says
  what was lost. Counted in `fleet_ingress_worker_restarts_total{reason}`;
  the slots it held in `fleet_ingress_slots_reclaimed_total`.
- A worker whose channel ends while its process runs (this process cut it: a
  protocol violation, a failed take-back after a failed exec) is replaced at
  once too, but its calls go on there without a channel: the slots it held
  stay counted (maxconn holds for the host) until its process exits, which it
  does once its calls end or `timeouts.drain` passes; still running at
  `timeouts.drain + STOP_GRACE` (it cannot hear `stop` any more), it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from fleet_ingress.config.settings import IngressConfig, config_to_json
from fleet_ingress.core.call_table import LIVE
from fleet_ingress.core.host_slots import UNRESPONSIVE_PULLS, HostSlots, WorkerRow
from fleet_ingress.core.host_view import HostView
from fleet_ingress.core.lost_calls import lost_call_record, lost_with_table
from fleet_ingress.logs import fields
from fleet_ingress.net.call_table_map import CALL_TABLE_ENV, make_table, read_table_fd
from fleet_ingress.net.late_timers import PatientTimer, patient_timeout, wait_patiently
from fleet_ingress.net.slot_server import SlotServer, channel_key
from fleet_ingress.net.tls import CarrierPem, held_pem, memfd_of
from fleet_ingress.ops.metrics import lost_call_counts
from fleet_ingress.release import code_digest
from fleet_ingress.service.carrier_certificate import SERVING_PEM_ENV, SERVING_TICKET_KEYS_ENV
from fleet_ingress.service.ingress import RUNNING_CONFIG_ENV, STOP_GRACE
from fleet_ingress.service.kept_running import TaskFailures
from fleet_ingress.service.listen_fds import COORDINATOR, handover_env, pass_fds
from fleet_ingress.service.oom_verdict import (
    OOM_KILLED_WORKER,
    OOM_POSSIBLY_KILLED_WORKER,
    OomVerdict,
)
from fleet_ingress.service.reload_rounds import ReloadRounds
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.ticket_keys import SessionTicketKeys
from fleet_ingress.service.worker_asks import WorkerAsks
from fleet_ingress.service.worker_exits import (
    child_running,
    exit_fields,
    exit_status,
    lived_s,
    restart_reason,
)
from fleet_ingress.service.worker_process import (
    WORKER_RANK_ENV,
    WORKER_START_TIMEOUT,
    WorkerProcess,
)

log = logging.getLogger("fleet_ingress.lifecycle")
# Where the workers write each call's line: a call lost with its worker gets its line here.
access_log = logging.getLogger("fleet_ingress.access")

# A worker's answer to `stop`: it closes its listeners at once.
STOP_ANSWER_TIMEOUT = 1.0
# After the drain and the workers' own closing time (STOP_GRACE, from
# service.ingress: the worker keeps its waits within it), whatever worker is
# left is killed.
# How long a kill backstop that came over late_timers.STALL late (the
# supervisor did not run: SIGSTOP, a paused VM) is put off. Its workers may
# have been stopped with it: one continued past its drain's end closes its
# calls (1001, an access line each; CLOSE_AT_STOP_TIMEOUT) in this, and one
# that exited meanwhile is reaped on the first turns. Put off by AFTER_STALL
# alone, the kill came as the worker began its close: calls cut with no close
# frame, logged `error` (the review of session 33 on 5114b87). Once, so a hung
# worker is held this long at most more, and only after a stall.
_STALL_GRACE = STOP_GRACE
# A worker's channel closes a moment before the process of a worker that
# dies can be reaped: one still running this long after is said to have lost
# its channel (its slots are kept either way until it exits).
LOST_CHANNEL_CONFIRM = 0.5
# A worker that dies sooner than this after its start is replaced after a delay
# that doubles each time (a crash loop must not spin a core); else at once.
QUICK_DEATH = 5.0
RESPAWN_DELAY_FIRST = 0.1
RESPAWN_DELAY_MAX = 10.0
# The environment a worker must not inherit: only the main PID speaks to systemd.
_NOT_FOR_WORKERS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class WorkerStartError(RuntimeError):
    """Workers could not start; `run` exits non-zero with this, an upgrade is
    abandoned. `error_logged`: the worker wrote its error to the service's log
    (where `run`'s own stderr goes, just before; `upgrade`'s is a terminal)."""

    def __init__(self, message: str, *, error_logged: bool = False) -> None:
        super().__init__(message)
        self.error_logged = error_logged


class StartedWith(Protocol):
    """The supervisor as its workers' pool reads it: what a worker started now
    is handed (the configuration, certificate and session ticket keys served
    now, which a reload replaces; the listeners; the configuration file's
    path), and systemd's fd store, which keeps each worker's channel."""

    config: IngressConfig
    config_path: Path
    serving_pem: CarrierPem
    tickets: SessionTicketKeys
    listeners: dict[str, socket.socket]
    notifier: Notifier | None

    def store_fd(self, name: str, sock: socket.socket) -> None: ...


class WorkerPool:
    """The workers of this supervisor (by channel key), every generation's,
    and their lives."""

    def __init__(
        self,
        supervisor: StartedWith,
        workers: dict[int, WorkerProcess],
        *,
        server: SlotServer,
        slots: HostSlots,
        view: HostView,
        asks: WorkerAsks,
        reload_rounds: ReloadRounds,
        oom_verdict: OomVerdict,
        task_failures: TaskFailures,
        keep: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        """`workers`: the supervisor's, by channel key (its asks, calls and
        reload rounds read the same dict). `keep`: the supervisor's own tasks
        (`Supervisor._keep`), cancelled at its exit."""
        self.supervisor = supervisor
        self.workers = workers
        self.server = server
        self.slots = slots
        self.view = view
        self.asks = asks
        self.reload_rounds = reload_rounds
        self.oom_verdict = oom_verdict
        self.task_failures = task_failures
        self._keep = keep
        config = supervisor.config
        # Why the last try to start a replacement worker failed (None: it did not).
        self.spawn_error: str | None = None
        # process.worker_hang_timeout as read at start (the report puller's pace).
        self.hang_timeout = config.process.worker_hang_timeout
        # process.cpu_affinity as read at start: every worker this image starts,
        # a replacement too (a reload notes a change, as of process.workers).
        self.cpu_affinity = config.process.cpu_affinity
        self.generation = 1
        # Workers the serving generation should have (process.workers when it
        # started: a reload does not change it).
        self.worker_target = 0
        # Where worker_target came from, for stat: "2 (CPUQuota 200% of 64 CPUs)".
        self.workers_from = ""
        self.stopping = False
        self.restarts: Counter[str] = Counter()  # workers replaced, by why
        self.calls_lost_total = 0  # the calls they took with them
        # Workers the OOM killer took, replaced or not (an upgrade's old
        # generation draining is not): carried.
        self.worker_oom_kills = 0
        # A worker's "hello" or "serving" read before adopt() returned its
        # channel key (no WorkerProcess yet): the events to set, by key.
        self._early: dict[int, set[str]] = {}
        # A channel that ended before adopt() returned: its last row, by key.
        self._left_early: dict[int, WorkerRow | None] = {}
        self.quick_deaths = 0
        # Replacements of dead workers not started yet, by when they are due
        # (monotonic): carried over an exec, where their tasks would be lost.
        self._respawns: dict[asyncio.Task[None], float] = {}
        self._starting = 0  # workers being started by a respawn, not in `workers` yet
        # `spawn` calls under way, any caller's: an upgrade's exec waits for none.
        self._spawns = 0
        # (generation, CPU) of the workers being started (process.cpu_affinity).
        self._cpus_starting: list[tuple[int, int]] = []
        # (generation, rank) of the workers being started (process.accept).
        self._ranks_starting: list[tuple[int, int]] = []
        self._no_spawns = asyncio.Event()
        self._no_spawns.set()
        # Cleared while a new generation starts: replacements wait, then start
        # whichever generation serves by then, if it is short of workers.
        self.generation_settled = asyncio.Event()
        self.generation_settled.set()
        # What the workers' channels say of them (the rest is the asks').
        server.on_join.append(self._joined)
        server.on_leave.append(self._left)
        server.keeps_slots = self._still_running
        server.live_calls = self._live_on_table
        server.handlers["serving"] = self._serving

    # -- start -------------------------------------------------------------------

    async def spawn(self, generation: int, *, candidate: bool = False) -> WorkerProcess:
        """Start a worker of `generation`: its process, its channel served, in
        `workers` and watched. Counted as under way until then: from the fork
        on it is a child that no exec may lose (`starts_settled`)."""
        self._spawns += 1
        self._no_spawns.clear()
        cpu = self._cpu_for(generation)
        if cpu is not None:
            self._cpus_starting.append((generation, cpu))
        rank = self._rank_for(generation)
        self._ranks_starting.append((generation, rank))
        try:
            return await self._start_worker(generation, candidate=candidate, cpu=cpu, rank=rank)
        finally:
            if cpu is not None:
                self._cpus_starting.remove((generation, cpu))
            self._ranks_starting.remove((generation, rank))
            self._spawns -= 1
            if not self._spawns:
                self._no_spawns.set()

    async def starts_settled(self, timeout: float) -> bool:
        """No worker is being started (`spawn`), waiting `timeout` at most. One
        whose process exists but whose channel the coordinator does not serve
        yet would be lost at an upgrade's exec: its channel closed (it drains
        and exits), its process a child no image knows, never reaped."""
        with contextlib.suppress(TimeoutError):
            # Patient: a start whose hello came during a stall is read first
            # (the upgrade was refused: "did not reach its channel").
            async with patient_timeout(timeout):
                while self._spawns:
                    await self._no_spawns.wait()
        return not self._spawns

    async def _start_worker(
        self, generation: int, *, candidate: bool, cpu: int | None, rank: int
    ) -> WorkerProcess:
        rounds = self.reload_rounds.begun  # it reads the configuration from now on
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socks = {**self.supervisor.listeners, COORDINATOR: theirs}
        env = handover_env(socks)
        for name in _NOT_FOR_WORKERS:
            env.pop(name, None)
        # A worker does not read the configuration file, which may hold an edit
        # not reloaded (a worker started now would route by it alone) or one
        # refused (it could not start).
        env[RUNNING_CONFIG_ENV] = config_to_json(self.supervisor.config)
        pem_fds: tuple[int, ...] = ()
        # Its table of live calls: read when it dies (its calls' lines, whatever
        # of its messages came). Ours: closed once its death is read.
        table_fd = make_table()
        env[CALL_TABLE_ENV] = str(table_fd)
        env[WORKER_RANK_ENV] = str(rank)
        try:
            # Nor the certificate files, which may hold one a reload refused, a
            # renewal half written, a key not of the certificate, nothing: a worker
            # started now (a replacement) loads the certificate and key served
            # now, the bytes checked here, from sealed memfds of its own.
            pem_fds = held_pem(self.supervisor.serving_pem)
            env[SERVING_PEM_ENV] = ",".join(map(str, pem_fds))
            pem_fds += (
                memfd_of(self.supervisor.tickets.ticket_keys, "fleet-ingress tls ticket keys"),
            )
            env[SERVING_TICKET_KEYS_ENV] = str(pem_fds[-1])
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fleet_ingress",
                "worker",
                "-c",
                str(self.supervisor.config_path),
                "--generation",
                str(generation),
                *(() if cpu is None else ("--cpu", str(cpu))),
                pass_fds=(*pass_fds(socks), *pem_fds, table_fd),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            os.close(table_fd)
            raise
        finally:
            theirs.close()  # the worker's now; its end closing is how we see it die
            for fd in pem_fds:
                os.close(fd)
        # Named from the start: its channel goes over an upgrade's exec even
        # before its hello is read.
        try:
            key = await self.server.adopt(ours, worker=(proc.pid, generation))
        except BaseException:
            # No channel, no worker: not left running unwatched, nor unreaped.
            ours.close()
            os.close(table_fd)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            self._keep(proc.wait())
            raise
        worker = WorkerProcess(proc, generation, key, candidate=candidate, cpu=cpu, rank=rank)
        worker.call_table_fd = table_fd
        self.add_worker(worker)
        self.supervisor.store_fd(channel_key(proc.pid, generation), ours)
        if rounds != self.reload_rounds.begun:
            # Started before a reload round that did not see it: told too.
            self.reload_rounds.tell_late(worker)
        return worker

    def _cpu_for(self, generation: int) -> int | None:
        """process.cpu_affinity = "auto": the CPU for a new worker of
        `generation`, the least taken by its live workers (a replacement takes
        the CPU of the one it replaces). None: unpinned."""
        if self.cpu_affinity != "auto":
            return None
        taken = [
            w.cpu
            for w in self.workers.values()
            if w.generation == generation and w.cpu is not None and not w.replaced
        ] + [cpu for g, cpu in self._cpus_starting if g == generation]
        return pick_cpu(sorted(os.sched_getaffinity(0)), taken)

    def _rank_for(self, generation: int) -> int:
        """The rank of a new worker of `generation` (process.accept): the
        least not held by its live workers (a replacement takes the rank of
        the one it replaces) nor by one being started."""
        taken = {
            w.rank
            for w in self.workers.values()
            if w.generation == generation and w.rank is not None and not w.replaced
        } | {rank for g, rank in self._ranks_starting if g == generation}
        return pick_rank(taken)

    async def wait_serving(self, workers: Sequence[WorkerProcess], *, settle: float = 0.0) -> None:
        """Every worker has joined and accepts carriers, and is still there
        `settle` seconds later; or `WorkerStartError` naming the first to fail."""
        deadline = asyncio.get_running_loop().time() + WORKER_START_TIMEOUT
        for worker in workers:
            serving = asyncio.ensure_future(worker.serving.wait())
            exited = asyncio.ensure_future(worker.proc.wait())
            try:
                # Patient: a `serving` come while this process was stopped is read first.
                done, _ = await wait_patiently(
                    {serving, exited},
                    max(0.0, deadline - asyncio.get_running_loop().time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                serving.cancel()
                exited.cancel()
            if worker.serving.is_set():
                continue
            if exited in done:
                raise WorkerStartError(
                    f"worker {worker.pid} exited at start ({exit_status(exited.result())})",
                    error_logged=True,
                )
            raise WorkerStartError(
                f"worker {worker.pid} did not start serving within {WORKER_START_TIMEOUT:g}s"
            )
        # A worker that dies on its first carriers (a crash the trial run's
        # imports could not show) fails the start here, not after the old
        # generation was told to stop accepting.
        await asyncio.sleep(settle)
        for worker in workers:
            if worker.proc.returncode is not None or worker.left.is_set():
                raise WorkerStartError(
                    f"worker {worker.pid} exited just after it began serving "
                    f"({exit_status(worker.proc.returncode)})",
                    error_logged=True,
                )

    # -- workers come and go ------------------------------------------------------

    def _joined(self, key: int, pid: int, generation: int) -> None:
        self._worker_says(key, "joined")

    def _serving(self, key: int, message: dict[str, Any]) -> None:
        self._worker_says(key, "serving")

    def _worker_says(self, key: int, event: str) -> None:
        worker = self.workers.get(key)
        if worker is not None:
            getattr(worker, event).set()
        else:
            self._early.setdefault(key, set()).add(event)

    def add_worker(self, worker: WorkerProcess) -> None:
        """One of this supervisor's workers from now on (started here, or
        adopted from the previous image): in `workers`, what its channel said
        before its key was known applied, its exit watched."""
        self.workers[worker.key] = worker
        self._said_early(worker)
        self._keep(self._watch(worker))

    def _said_early(self, worker: WorkerProcess) -> None:
        """What its channel said before adopt() returned its key."""
        for event in self._early.pop(worker.key, ()):
            getattr(worker, event).set()
        if worker.key in self._left_early:
            self._unstore_channel(worker)
            self._worker_left(worker, self._left_early.pop(worker.key))

    def _left(self, key: int, row: WorkerRow | None) -> None:
        worker = self.workers.get(key)
        if worker is None:
            # Its channel ended before adopt() returned (no WorkerProcess yet):
            # a worker kept over an exec that died meanwhile must still count
            # what it held. Taken out of the fd store once adopt() names it
            # (`_said_early`): a row names it only if it held slots, and one
            # that held none kept its copy there (the fd-store audit of session 35).
            self._left_early[key] = row
            return
        self._unstore_channel(worker)
        self._worker_left(worker, row)

    def _unstore_channel(self, worker: WorkerProcess) -> None:
        """Its channel ended, on purpose (a protocol break, a cut) or by the
        worker: the fd store's copy must not keep it open (`fd_store`), or a
        worker cut here never sees the end and never drains. By the name it
        was stored under: the pid and generation it was started or handed
        over as, not what it said of itself."""
        if self.supervisor.notifier is not None:
            self.supervisor.notifier.remove_fd(channel_key(worker.pid, worker.generation))

    def confirm_channel_lost_later(self, worker: WorkerProcess) -> None:
        """Its channel has just ended: LOST_CHANNEL_CONFIRM from now, if it
        still runs, its channel is said lost (`_channel_lost`)."""
        asyncio.get_running_loop().call_later(LOST_CHANNEL_CONFIRM, self._channel_lost, worker)

    def _channel_lost(self, worker: WorkerProcess) -> None:
        """Its channel closed a while ago and it still runs: not a death but a
        channel lost (cut by either end); said once, and its exit said so."""
        if worker.proc.returncode is not None or not child_running(worker.pid):
            return  # it died: its exit is logged and counted as a death
        worker.channel_lost = True
        # Running past its channel's end, it has read it: it grants no more
        # from a standing budget (nor after, reading the end first: `slot_client`).
        # Its call table read again counts what it granted since the channel
        # ended; the rest of the budget, reserved till now, is free.
        if (row := self.server.settle_lost(worker.key)) is not None:
            worker.calls_lost = row.calls
        log.error(
            "worker's slot channel was lost while it runs: it takes no new call and "
            "finishes its calls; the slots it holds stay counted until it exits "
            "(killed if still running when its drain is over: kill_in_s; none: it keeps "
            "them until they end); a new worker replaces it",
            extra=fields(
                pid=worker.pid,
                generation=worker.generation,
                slots_kept=worker.calls_lost,
                kill_in_s=None
                if worker.retire_by is None
                else round(worker.retire_by - time.monotonic(), 1),
            ),
        )

    def _still_running(self, key: int, pid: int) -> bool:
        """Whether the worker behind channel `key` (pid `pid`) still runs as
        its channel ends: then its slots stay counted until `_watch` sees it
        exit. A dead one (SIGKILL, crash) is a zombie by then or already reaped."""
        worker = self.workers.get(key)
        if worker is not None:
            if worker.proc.returncode is not None:
                return False
            pid = worker.pid  # the process we know, not the pid its channel claimed
        return child_running(pid)

    def _live_on_table(self, key: int) -> dict[int, str] | None:
        """The calls the call table of the worker behind channel `key` has live
        and granted now, lease -> fleet name; None without a table or when it
        cannot be read (the caller then counts an upper bound)."""
        worker = self.workers.get(key)
        fd = None if worker is None else worker.call_table_fd
        if fd is None:
            return None
        try:
            table = read_table_fd(fd)
        except (OSError, ValueError) as exc:
            log.warning(
                "worker's call table cannot be read as its slot channel ends: the rest "
                "of its budget stays counted as its calls until it exits",
                extra=fields(pid=worker.pid, generation=worker.generation, error=str(exc)),
            )
            return None
        return {
            lease: call["fleet"]
            for lease, (state, call) in table.items()
            if state == LIVE and call.get("fleet") is not None
        }

    def worker_silent(self, key: int, pulls: int, silent_for: float) -> None:
        """Worker `key` has answered none of the last `pulls` report requests:
        its event loop is stuck (or the process stopped), and with it every call
        it carries. Said once it is unresponsive; killed as hung once it has
        been silent `silent_for` process.worker_hang_timeout (a minute by
        default, as read at start), its slots back and a new worker in its
        place, as for a worker that died: its frozen calls are lost either way."""
        worker = self.workers.get(key)
        if worker is None or worker.hung or worker.proc.returncode is not None:
            return
        silent_s = round(silent_for, 1)
        hang = self.hang_timeout
        if pulls == UNRESPONSIVE_PULLS:
            log.warning(
                "worker unresponsive: it answers no report request; its calls are likely "
                "frozen" + (f"; killed as hung if still so after {hang:g}s" if hang > 0 else ""),
                extra=fields(pid=worker.pid, generation=worker.generation, silent_s=silent_s),
            )
        if hang > 0 and silent_for >= hang:
            worker.hung = True
            log.error(
                "worker hung: killed",
                extra=fields(pid=worker.pid, generation=worker.generation, silent_s=silent_s),
            )
            worker.kill()

    def _worker_left(self, worker: WorkerProcess, row: WorkerRow | None) -> None:
        key = worker.key
        worker.calls_lost = row.calls if row is not None else 0
        calls = self.server.take_calls(key)
        for lease, fleet in row.held.items() if row is not None else ():
            calls.setdefault(lease, {})["fleet"] = fleet.name
        worker.calls_at_leave.update(calls)
        worker.left.set()
        if row is not None and row.channel_lost and worker.proc.returncode is None:
            worker.channel_closed_first = True
            # Its slots are kept until it exits. Without a channel it cannot hear
            # `stop`: its own drain ends it, this bounds it.
            by = time.monotonic() + self._drain_of(worker) + STOP_GRACE
            if by < math.inf and (worker.retire_by is None or by < worker.retire_by):
                worker.retire_by = by
                self.arm_backstop(worker)
            self.confirm_channel_lost_later(worker)
        self.asks.worker_gone(key)
        # Its channel is how it gets slots: without it the worker only drains.
        self._replace(worker)

    async def _watch(self, worker: WorkerProcess) -> None:
        code = await worker.proc.wait()
        # Read at once: the count is the kernel's, kept for OOM_CREDIT_S.
        worker.oom_killed = await self.oom_verdict.oom_killed(worker, code)
        worker.oom_possibly = worker.oom_possibly and worker.oom_killed
        # Whatever its generation: an old one draining in an upgrade, when two
        # generations take memory, is not replaced nor in `restarts`.
        self.worker_oom_kills += worker.oom_killed
        # Its channel closes with it: let the coordinator count what it held.
        with contextlib.suppress(TimeoutError):
            async with patient_timeout(1.0):  # its channel's end, read after a stall
                await worker.left.wait()
        if not worker.left.is_set() and self.server.cut(worker.key):
            # Its process is gone, its channel is not: another process holds a
            # copy of its end. Ended here, or its slots stayed taken for good and
            # calls queued behind them got 503 (the channel audit of session 24).
            log.warning(
                "worker exited but its slot channel stayed open (another process "
                "holds its end): closed, its slots come back",
                extra=fields(pid=worker.pid, generation=worker.generation),
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await worker.left.wait()
        # Its channel ended before it exited: what it held was kept until now.
        self.server.release_kept(worker.key)
        self.workers.pop(worker.key, None)
        # Without its channel it drained on its own and exited cleanly: each
        # of its calls ended and was logged there with how it ended (its
        # counts since its last report could not reach the host's stats). Also
        # when it exited before its channel was confirmed lost: its calls
        # ended within LOST_CHANNEL_CONFIRM, each with its line (the audit of
        # what the supervisor keeps of workers gone: each got a second line,
        # "lost with it", counted lost, and "worker died").
        # Taken up after a supervisor died, it is systemd's child: how it ended
        # is not known. What it held when its channel closed is counted lost
        # (0 for one that finished its calls; for one whose channel was lost
        # before, what it had then: more than it lost, if it drained).
        known = worker.exit_status_known
        drained = known and code == 0 and (worker.channel_lost or worker.channel_closed_first)
        if drained:
            worker.calls_lost = 0
        self._take_call_table(worker, code, read=not (worker.channel_lost or drained))
        # Counted whatever the generation and whether stopping: an old generation's
        # worker killed while it drained went uncounted (the draining audit of
        # session 20), and FleetIngressWorkerDied, which reads it, never fired.
        self.calls_lost_total += worker.calls_lost
        if not (worker.channel_lost or drained) and (
            worker.calls_lost or (worker.calls_at_leave and code != 0)
        ):
            # (One whose channel was lost went on without it: which of its calls
            # ended there since, each with its own line, is not known here.) Its
            # calls still waiting for a slot are lost too, held slots or not.
            self._log_lost_calls(worker, code)
        # A retired worker whose channel was lost before (carried over an exec)
        # is counted as the loss it was, not as an old generation ending.
        if worker.candidate or (worker.retiring and not worker.channel_lost):
            log.log(
                logging.INFO if code == 0 and not worker.calls_lost else logging.ERROR,
                "old-generation worker exited" if worker.retiring else "new worker exited",
                extra=fields(**exit_fields(worker, code), lived_s=lived_s(worker)),
            )
            return
        if self.stopping:
            # One stopped before it joined (`_stop_if_starting`) had nothing to lose.
            clean = code == 0 or not worker.joined.is_set()
            log.log(
                logging.INFO if clean and not worker.calls_lost else logging.ERROR,
                "worker exited",
                extra=fields(**exit_fields(worker, code)),
            )
            return
        self.restarts[
            "hung" if worker.hung else "oom" if worker.oom_killed else restart_reason(code, known)
        ] += 1
        if drained:
            log.warning(
                "worker whose slot channel was lost finished its calls and exited: "
                "its slots came back; a new worker replaced it",
                extra=fields(**exit_fields(worker, code), lived_s=lived_s(worker)),
            )
        elif not known and not worker.calls_lost and not worker.channel_lost:
            log.warning(
                "worker exited holding no call (how it ended is systemd's to know: it "
                "was taken up after a supervisor died); a new worker replaces it",
                extra=fields(**exit_fields(worker, code), lived_s=lived_s(worker)),
            )
        elif code == 0 and not worker.calls_lost and known:
            # Not a death: stopped on its own (a SIGTERM sent to it alone), it
            # drained its calls and exited cleanly (the channel audit of session 24).
            log.warning(
                "worker exited by itself (a stop signal sent to it alone, not to the "
                "supervisor?): it drained its calls and exited cleanly; calls still up "
                "at its drain's end were cut, each logged with end_reason drain; a new "
                "worker replaces it",
                extra=fields(**exit_fields(worker, code), lived_s=lived_s(worker)),
            )
        elif worker.oom_killed:
            log.error(
                OOM_POSSIBLY_KILLED_WORKER if worker.oom_possibly else OOM_KILLED_WORKER,
                extra=fields(**self._oom_fields(worker, code)),
            )
        else:
            log.error(
                "worker whose slot channel was lost exited: the calls it had then are "
                "counted lost, its slots came back; a new worker replaced it"
                if worker.channel_lost
                else "worker died: its calls are lost; a new worker replaces it",
                extra=fields(**exit_fields(worker, code), lived_s=lived_s(worker)),
            )
        self._replace(worker)

    def _take_call_table(self, worker: WorkerProcess, code: int | None, *, read: bool) -> None:
        """`worker` is dead: what its call table says decides which calls it
        took with it (`lost_with_table`), unless it exited 0 (each call ended
        with its own line) or `read` is False; the table is closed."""
        fd, worker.call_table_fd = worker.call_table_fd, None
        if fd is None:
            return
        try:
            if not read or code == 0:
                return
            try:
                table = read_table_fd(fd)
            except (OSError, ValueError) as exc:
                log.error(
                    "worker's call table cannot be read: its lost calls are those the "
                    "supervisor heard of (a bug, report it)",
                    extra=fields(pid=worker.pid, generation=worker.generation, error=str(exc)),
                )
                return
            lost = lost_with_table(worker.calls_at_leave, table)
            live = sum(1 for state, _ in table.values() if state == LIVE)
            log.info(
                "worker's call table read: its lost calls are its live records and those "
                "it had none for",
                extra=fields(
                    pid=worker.pid,
                    generation=worker.generation,
                    records_live=live,
                    records_ended=len(table) - live,
                    # Live there, never heard of here (their acquire held or in flight).
                    live_not_heard=sum(
                        1
                        for lease, (state, _) in table.items()
                        if state == LIVE and lease not in worker.calls_at_leave
                    ),
                ),
            )
            worker.calls_at_leave = lost
            # The slots it held that were lost: not those of calls ended and
            # logged whose release had not come, and those granted from its
            # budget whose acquire had not (counted as the table says them).
            worker.calls_lost = sum(1 for call in lost.values() if call.get("fleet") is not None)
        finally:
            os.close(fd)

    def _oom_fields(self, worker: WorkerProcess, code: int | None) -> dict[str, object]:
        return {
            **exit_fields(worker, code),
            "lived_s": lived_s(worker),
            "oom_kills_counted_in": self.oom_verdict.counted_in(),
            # Named by the kernel's own record of the pid (/dev/kmsg), not by a count alone.
            "oom_kill_logged": worker.oom_logged,
        }

    def _log_lost_calls(self, worker: WorkerProcess, code: int | None) -> None:
        """An access line for each call `worker` took with it (SPEC 12: one
        line per call), and each counted ended: it could not do either."""
        calls, worker.calls_at_leave = worker.calls_at_leave, {}
        status = exit_status(code, oom=worker.oom_killed, possibly=worker.oom_possibly)
        now, now_monotonic = time.time(), time.monotonic()
        for _, call in sorted(calls.items()):
            record = lost_call_record(
                call,
                worker_pid=worker.pid,
                generation=worker.generation,
                exit_status=status,
                now=now,
                now_monotonic=now_monotonic,
            )
            # Counted ended as its line says (fleet_ingress_calls_ended_total), as
            # the worker counts each call it ends: before, a call lost with its
            # worker was in worker_calls_lost alone, and the calls ended by reason
            # came up short of the calls made (the accounting audit of session 31).
            # A tunneled one's duration too (fleet_ingress_call_duration_seconds),
            # as a worker observes each tunneled call that ends: before, the
            # histogram left out every call lost with its worker (the views audit
            # of session 37).
            self.view.retired.add(lost_call_counts(record), gauges=False)
            if self.supervisor.config.log.access:
                access_log.info("call ended", extra=fields(**record))

    def _replace(self, worker: WorkerProcess) -> None:
        if worker.replaced or self.stopping or worker.retiring or worker.candidate:
            return
        worker.replaced = True
        quick = time.monotonic() - worker.started_at < QUICK_DEATH
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        delay = respawn_delay(self.quick_deaths)
        if delay:
            # A worker starts from the code installed now, which may not be the
            # code this supervisor runs: after a refused upgrade the broken
            # install stays, and every replacement dies of it.
            log.error(
                "workers keep dying soon after start: waiting before the next. The host "
                "serves with fewer workers until one starts. The worker's own error is in "
                "the lines above; a worker runs the code installed now: if it does not "
                "start (a broken install, e.g. one an upgrade refused), reinstall the "
                "release this supervisor runs (running_code) or fix the install; "
                "`fleet-ingress check -c CONFIG` runs the installed code",
                extra=fields(
                    delay_s=delay,
                    deaths_in_a_row=self.quick_deaths,
                    serving=self.serving_workers(),
                    wanted=self.worker_target,
                    running_code=code_digest(),
                    installed_code=code_digest.__wrapped__(),
                ),
            )
        self.schedule_respawn(delay)

    def schedule_respawn(self, delay: float) -> None:
        task = self._keep(self._respawn(delay))
        self._respawns[task] = time.monotonic() + delay
        task.add_done_callback(lambda done: self._respawns.pop(done, None))

    def respawns_due(self) -> list[float]:
        """When each replacement not started yet is due (monotonic)."""
        return list(self._respawns.values())

    def _running_workers(self) -> list[WorkerProcess]:
        """The workers of the generation serving now that run (started, or
        still starting)."""
        return [
            w
            for w in self.workers.values()
            if w.generation == self.generation
            and not (w.retiring or w.candidate or w.left.is_set())
            and w.proc.returncode is None
        ]

    def serving_workers(self) -> int:
        """The workers of the generation serving now that serve: a replacement
        still starting (or stuck before it serves, or about to die of a broken
        install) is not one (the review of session 24: counted, it reset the
        alert's wait, and one that never served hid the loss). Nor is one
        unresponsive (it answers no report request: its loop stuck, or the
        process stopped): it takes no call, and its calls are frozen (the
        operator text audit of session 33: stat said all serving then)."""
        return len(self._taking_calls())

    def _taking_calls(self) -> list[WorkerProcess]:
        stuck = self._unresponsive_pids()
        return [w for w in self._running_workers() if w.serving.is_set() and w.pid not in stuck]

    def _unresponsive_pids(self) -> set[int]:
        return {row.pid for row in self.slots.workers if row.stuck}

    def unresponsive_workers(self) -> list[int]:
        """Pids of the serving generation's workers that answer no report request."""
        stuck = self._unresponsive_pids()
        return sorted(w.pid for w in self._running_workers() if w.pid in stuck)

    def workers_figures(self) -> tuple[int, int]:
        """(serving, wanted) for /metrics: wanted is 0 once stopping (every
        worker is leaving then: FleetIngressWorkersMissing must not page at a
        restart while calls drain)."""
        return self.serving_workers(), 0 if self.stopping else self.worker_target

    def _short_of_workers(self) -> int:
        """How many workers the serving generation lacks (being started counts)."""
        return self.worker_target - len(self._running_workers()) - self._starting

    async def _respawn(self, delay: float) -> None:
        """A worker died: start one of the generation serving by now (not of
        a generation an upgrade retired meanwhile), if it still lacks one."""
        await asyncio.sleep(delay)
        await self.generation_settled.wait()
        if self.stopping or self._short_of_workers() <= 0:
            return
        generation = self.generation
        self._starting += 1
        try:
            worker = await self._spawn_retrying(generation, delay)
        finally:
            self._starting -= 1
        if worker is None:
            return
        if self.stopping:  # the stop came while it was being started
            self._stop_if_starting(worker)
            return
        log.info(
            "worker started",
            extra=fields(
                pid=worker.pid,
                generation=generation,
                **({} if worker.cpu is None else {"cpu": worker.cpu}),
                rank=worker.rank,  # process.accept: the rank of the worker it replaces
            ),
        )
        # Apart from this task, which counts as a replacement not started yet
        # (carried over an exec) until it ends.
        self._keep(self._kill_if_never_serving(worker))

    async def _kill_if_never_serving(self, worker: WorkerProcess) -> None:
        """A replacement that has not begun serving within
        process.worker_hang_timeout of its start (0: never) is killed as hung,
        and replaced in turn. The hang kill reads reports, which a worker that
        has not joined does not send: one stuck at its start (an import that
        hangs on a dead mount) stayed, the host a worker short for good (the
        review of session 24)."""
        if self.hang_timeout <= 0:
            return
        waits = {
            asyncio.ensure_future(worker.serving.wait()),
            asyncio.ensure_future(worker.left.wait()),
        }
        try:
            # Patient: a replacement that began serving while the supervisor was
            # stopped (SIGSTOP, a paused VM) is read so first, not killed as hung
            # with carriers it has taken since.
            await wait_patiently(waits, self.hang_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if worker.serving.is_set() or worker.left.is_set() or worker.proc.returncode is not None:
            return
        if self.stopping or worker.retiring:
            return
        worker.hung = True
        log.error(
            "worker did not begin serving within process.worker_hang_timeout of its "
            "start: killed as hung, and replaced in turn; its own lines say where it stopped",
            extra=fields(pid=worker.pid, generation=worker.generation, waited_s=self.hang_timeout),
        )
        worker.kill()

    async def _spawn_retrying(self, generation: int, delay: float) -> WorkerProcess | None:
        while True:
            if self.stopping:
                return None
            try:
                worker = await self.spawn(generation)
                self.spawn_error = None
                return worker
            except Exception as exc:  # OSError most often; a bug must not end the retries
                self.spawn_error = str(exc)
                # Out of descriptors, memory or processes: the host serves with a
                # worker fewer until this succeeds, so keep trying, not too often.
                delay = min(max(delay * 2, 1.0), RESPAWN_DELAY_MAX)
                if isinstance(exc, OSError):
                    log.error(
                        "cannot start a worker: the host serves with one worker fewer "
                        "until it can; check the service's LimitNOFILE, memory and tasks",
                        extra=fields(error=str(exc), retry_in_s=delay),
                    )
                else:  # a bug: said as one, with its traceback, and counted
                    failures = self.task_failures.failed("worker start")
                    log.exception(
                        "supervisor task failed: started again; a bug, report it",
                        extra=fields(task="worker start", failures=failures, retry_in_s=delay),
                    )
                await asyncio.sleep(delay)

    # -- retiring workers (an upgrade's old generation) -----------------------------

    def retire(self, worker: WorkerProcess) -> None:
        """Stop accepting, keep the calls (and the handshakes under way) until
        they end or timeouts.upgrade_drain (unset: timeouts.drain; 0: no
        limit); then the worker exits. Killed if still there well after that."""
        if worker.retiring and worker.left.is_set():
            return
        worker.retiring = True
        drain = self.supervisor.config.timeouts.upgrade_drain
        if worker.drain_told is None:  # told again (a later upgrade): its first drain holds
            worker.drain_told = self.supervisor.config.timeouts.old_generation_drain()
        stop = {"op": "stop", "id": self.asks.next_id(), "upgrade": True}
        if drain is not None:
            stop["drain"] = drain
        if not self.server.send(worker.key, stop):
            self._stop_if_starting(worker)  # not joined yet: it holds no call
        if worker.retire_by is None:  # told again (a later upgrade): the first deadline holds
            self.arm_backstop(worker)

    def _drain_of(self, worker: WorkerProcess) -> float:
        """How long `worker` may drain before it is killed (less STOP_GRACE): a
        stop's timeouts.drain; an old generation's, the drain it was told at
        its retirement (not what a later reload says), and never less than
        timeouts.drain: a worker of a release before upgrade_drain drains for
        its own timeouts.drain (and one that has it exits at the shorter one
        itself: the backstop only kills what is still there)."""
        timeouts = self.supervisor.config.timeouts
        if not worker.retiring:
            return timeouts.drain
        told = worker.drain_told
        return max(timeouts.old_generation_drain() if told is None else told, timeouts.drain)

    def arm_backstop(self, worker: WorkerProcess) -> None:
        """`worker` is killed if still there at its `retire_by`; none set yet:
        a full drain from now (its drain + STOP_GRACE; none for an old
        generation kept until its calls end)."""
        if worker.retire_by is None:
            by = time.monotonic() + self._drain_of(worker) + STOP_GRACE
            if by == math.inf:
                return
            worker.retire_by = by
        delay = max(0.0, worker.retire_by - time.monotonic())
        # Patient: one that exited during a stall is reaped first, not "killed";
        # one stopped with us (a paused VM) closes its calls first (_STALL_GRACE).
        PatientTimer(
            asyncio.get_running_loop(),
            delay,
            self._kill_if_left,
            worker,
            put_off=_STALL_GRACE,
        )

    def _kill_if_left(self, worker: WorkerProcess) -> None:
        if worker.proc.returncode is None and not self.stopping:
            log.error(
                "worker whose slot channel was lost still running after the drain: "
                "killed, its slots come back"
                if worker.channel_lost
                else "old-generation worker still running after the drain: killed",
                extra=fields(pid=worker.pid, generation=worker.generation),
            )
            worker.kill()

    # -- stop ----------------------------------------------------------------------

    async def stop_accepting(self) -> None:
        """Every worker stops accepting (`stop`, answered `stopping` within
        STOP_ANSWER_TIMEOUT); one that cannot hear it (not joined yet, its
        channel lost) is sent SIGTERM. Nothing is replaced from now on."""
        self.stopping = True
        for worker in list(self.workers.values()):
            self._stop_if_starting(worker)
            self._stop_without_channel(worker)
        await self.asks.ask_workers("stop", STOP_ANSWER_TIMEOUT)

    def _stop_without_channel(self, worker: WorkerProcess) -> None:
        """A worker whose channel was lost while it runs cannot hear `stop`:
        SIGTERM, which its handler takes as one (its drain shortened to
        timeouts.drain: one kept until its calls end would otherwise be killed
        at the stop's end, its calls unlogged)."""
        if worker.joined.is_set() and worker.left.is_set() and worker.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)

    def _stop_if_starting(self, worker: WorkerProcess) -> None:
        """A worker that has not said hello cannot hear `stop` and holds no
        call (it has no slot): SIGTERM ends it (its handler drains nothing, or
        Python's default exits). Else it would start serving after the stop,
        kept until the drain's end, or fail on the listeners shut down here."""
        if worker.joined.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)

    def cut(self) -> None:
        """A second signal: every worker closes its calls now."""
        for key in list(self.workers):
            self.server.send(key, {"op": "stop", "id": 0, "cut": True})

    async def wait_workers(self, timeout: float) -> None:
        """Until every worker has exited; after `timeout` the rest are killed."""
        try:
            # Patient: workers that exited while the supervisor was stopped are
            # reaped first, not said "still running after the drain: killed";
            # and workers stopped with it (_STALL_GRACE) close their calls first.
            async with patient_timeout(timeout, put_off=_STALL_GRACE):
                while self.workers:
                    await asyncio.gather(*(w.proc.wait() for w in list(self.workers.values())))
                    await asyncio.sleep(0.02)  # each one's watcher logs it and lets go
        except TimeoutError:
            for worker in list(self.workers.values()):
                log.error(
                    "worker still running after the drain: killed",
                    extra=fields(pid=worker.pid, generation=worker.generation),
                )
                worker.kill()
            await asyncio.gather(*(w.proc.wait() for w in list(self.workers.values())))
        for _ in range(3):  # the watchers log each exit
            await asyncio.sleep(0)

    def kill_workers(self) -> None:
        for worker in self.workers.values():
            worker.kill()


def pick_cpu(allowed: Sequence[int], taken: Iterable[int]) -> int:
    """The CPU of `allowed` with the fewest workers on it (`taken`: a CPU per
    live worker), the first in `allowed` on a tie; CPUs no longer allowed count
    for nothing."""
    load = Counter(cpu for cpu in taken if cpu in allowed)
    return min(allowed, key=lambda cpu: load[cpu])


def pick_rank(taken: Iterable[int]) -> int:
    """The least rank (0, 1, ...) not in `taken`, the ranks of a generation's
    live workers: a replacement takes the rank of the worker it replaces."""
    held = set(taken)
    return next(rank for rank in range(len(held) + 1) if rank not in held)


def respawn_delay(quick_deaths: int) -> float:
    """Before starting the replacement of a worker, after `quick_deaths` deaths
    in a row each within QUICK_DEATH of its start: at once for a lone crash
    (its calls' replacement must not wait), then doubling, capped."""
    if quick_deaths <= 1:
        return 0.0
    return float(min(RESPAWN_DELAY_FIRST * 2 ** (quick_deaths - 2), RESPAWN_DELAY_MAX))
