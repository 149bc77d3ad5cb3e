"""The supervisor's upgrade in place (`fleet-ingress upgrade`, SIGUSR2; SPEC
13; docs/WORKERS.md "Upgrade: the sequence"), both images' sides of it.

RELOADING=1; the code installed now is trial-run in a child
(`service.upgrade.trial_run`); a failure ends it there, the workers serving
on. Else the supervisor re-executes itself (same PID) keeping the listeners,
the stats and admin sockets and every worker's channel
(`service.listen_fds.reexec`, `SlotServer.handover`), its state in a memfd.
The new image adopts them, rebuilds the slot table from the workers, starts
generation + 1 and, once every new worker serves, tells the old generation
to stop accepting and drain (`stop` with `upgrade`: calls and handshakes
under way are kept). A new generation that cannot start is stopped and the
old one never stopped accepting. READY=1; the outcome is kept (over the exec
too) for `upgrade` to read on the admin socket.

`UpgradeSequence` is the supervisor's (`service.supervisor`; its workers'
pool, `service.worker_pool`, starts, watches, replaces and retires the
workers, the sequence asks it to);
`Upgradable` is what the sequence needs of it. `service.upgrade` holds the
pieces that are no step of the sequence: the trial run, the memfd and the
fleets' part of the state, a worker process adopted from the previous image.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from fleet_ingress.config.cpus import usable_cpus
from fleet_ingress.config.fleets_file import FleetsFileError, load_fleets_file
from fleet_ingress.config.settings import (
    ConfigError,
    IngressConfig,
    ListenSection,
    drain_from_wire,
    drain_to_wire,
    load_config,
)
from fleet_ingress.core.balancer import Balancer, Membership
from fleet_ingress.core.certificate_change import LeafFacts
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.core.host_view import HostView
from fleet_ingress.logs import fields, flush_lines, lines_dropped, lines_waiting
from fleet_ingress.net.call_table_map import handed_over, taken_over
from fleet_ingress.net.event_loop import unexpected_errors
from fleet_ingress.net.slot_server import HandoverError, SlotServer, channel_key
from fleet_ingress.net.tls import CarrierPem
from fleet_ingress.ops.fleet_ops import FleetChangeError, FleetOps
from fleet_ingress.ops.reload_outcome import ReloadAsked
from fleet_ingress.ops.web_sites import WebSites
from fleet_ingress.release import code_digest
from fleet_ingress.service.carrier_certificate import certificate_not_taken
from fleet_ingress.service.kept_running import TaskFailures
from fleet_ingress.service.lifecycle import FIRST_PROBE_WAIT
from fleet_ingress.service.listen_fds import reexec, worker_key
from fleet_ingress.service.oom_kills import OomKills, rose_since
from fleet_ingress.service.oom_verdict import OomVerdict
from fleet_ingress.service.process_start import IGNORED_SIGNALS
from fleet_ingress.service.reexec_steps import (
    EXEC_AT,
    collector_passes,
    step_done,
    steps_since,
)
from fleet_ingress.service.sdnotify import Notifier, monotonic_usec
from fleet_ingress.service.store_keeping import StoreTakenUp
from fleet_ingress.service.ticket_keys import SessionTicketKeys
from fleet_ingress.service.upgrade import (
    TRIAL_SAY_EVERY,
    UPGRADE_STATE,
    AdoptedProcess,
    RunningJson,
    TrialFailed,
    TrialProgress,
    fleets_to_json,
    monotonic_of,
    removing_specs,
    restore_fleets,
    state_fd,
    trial_run,
    unread_from_json,
    unread_to_json,
)
from fleet_ingress.service.worker_pool import WorkerPool
from fleet_ingress.service.worker_process import WorkerProcess

log = logging.getLogger("fleet_ingress.lifecycle")

# After a re-execution, nothing is granted (calls asking for a slot wait) until
# every kept worker has said what it holds, or this has passed: then a worker
# still silent keeps counted what it held before until it says.
RESTORE_TIMEOUT = 5.0
# A new generation must still be there this long after it began serving before
# the old one is told to stop accepting.
SERVING_SETTLE = 1.0
# Before an upgrade's exec, workers being started (their process exists, their
# channel not yet served) are waited for this long at most, so that they go
# over with their channel; past it the upgrade is abandoned. It takes a few
# event-loop turns.
STARTS_SETTLE = 5.0
# The signals that would kill the process if they came while no handler is
# installed (between the exec and the new image's handlers): blocked over the
# exec (the mask is kept by execve), so they wait and are handled after it.
HELD_OVER_EXEC = (signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, *IGNORED_SIGNALS)
# Once those are blocked, the event loop turns for this long before the exec:
# a signal that came just before the block is already out of the kernel, its
# wake-up a byte in the loop's pipe that the exec would discard. Ready work
# runs before the loop sleeps, so this acts on every such signal.
SIGNALS_SETTLE = 0.05
# Before an upgrade's exec, what the supervisor has sent and a worker has not
# read yet (its socket buffer full) is waited for this long at most: the
# hand-over would cut it (`SlotServer.handover` refuses then).
HANDOVER_FLUSH = 1.0
# Before an upgrade's exec, a stats or admin request in flight is given this
# long to be answered (a scrape's refresh waits SCRAPE_WAIT at most; an
# add-fleet waits for the fleet's health to read UP, about 6 s by default).
WEB_QUIESCE = 10.0
# Upgrades whose outcome `upgrade` can still read.
UPGRADES_KEPT = 8
# The states an upgrade ends in; any other is under way.
FINISHED = frozenset({"done", "failed"})


class _ExecFailed(Exception):
    """`execve` failed after the workers' channels were handed over (`kept`)."""

    def __init__(self, error: OSError, kept: dict[str, socket.socket]) -> None:
        super().__init__(str(error))
        self.error = error
        self.kept = kept


class Upgradable(Protocol):
    """The supervisor as its upgrade sees it (`service.supervisor.Supervisor`):
    the state that goes over the exec, and the workers' lives that the
    sequence drives (`pool`)."""

    config: IngressConfig
    config_path: Path
    pool: WorkerPool  # the workers, the generation serving and its count, stopping
    started_at: float
    stop_asked: asyncio.Event
    notifier: Notifier | None
    bound_listen: ListenSection
    balancer: Balancer
    fleet_set: FleetSet
    ops: FleetOps
    slots: HostSlots
    view: HostView
    server: SlotServer
    reloads: Counter[str]
    last_reload: dict[str, Any] | None  # its outcome (`reload_outcome`), None before any
    file_read_text: str | None  # the configuration file as the service first read it
    file_read_carried: bool
    reloading: bool
    reloads_asked: asyncio.Queue[ReloadAsked]
    serving_leaf: LeafFacts | None  # the certificate served now, as reloads judge it
    serving_pem: CarrierPem  # its chain and key, as checked
    task_failures: TaskFailures
    supervisor_deaths: int
    supervisor_oom_kills: int
    supervisor_oom_kills_possibly: int
    oom_verdict: OomVerdict  # the kernel's OOM kills as read, and each SIGKILL death's verdict
    tickets: SessionTicketKeys  # the session ticket keys its workers seal tickets with
    store_taken_up: StoreTakenUp  # what the image before left of systemd's fd store
    start_notes: list[str]  # what this image's start serves other than the files hold

    @property
    def host_calls(self) -> int: ...

    def status_line(self) -> str: ...

    def sockets_to_keep(self) -> dict[str, socket.socket]: ...

    def write_snapshot(self) -> None: ...


class UpgradeSequence:
    def __init__(
        self,
        supervisor: Upgradable,
        web: WebSites,
        *,
        carried: dict[str, Any] | None,
        starts_settle: float = STARTS_SETTLE,
    ) -> None:
        """`web`: the supervisor's stats and admin sites, quiet over the exec.
        `carried`: the state the previous image kept over its re-execution
        (an upgrade), put back on `supervisor` here; None at a first start.
        `starts_settle`: how long an exec waits for workers being started
        (STARTS_SETTLE; tests shorten it)."""
        self.supervisor = supervisor
        self.web = web
        self.starts_settle = starts_settle
        # Upgrades by id, oldest first: what `upgrade` polls for (kept over the exec).
        self.statuses: dict[str, dict[str, Any]] = {}
        # The upgrade under way in this image. Held: the loop keeps only weak
        # references to tasks.
        self._running: asyncio.Task[None] | None = None
        # Resuming an upgrade: decided here, not from what the sockets handed
        # over still hold once the supervisor's start() has taken the listeners
        # from them (a host whose only worker was being replaced at the exec
        # hands over no channel at all).
        self.resumed = carried is not None
        # Resuming from systemd's fd store after the previous supervisor died
        # (`service.fd_store`): nothing of it carried but its workers.
        self.crash_restart = False
        # Set once the slot table holds what every kept worker says it holds:
        # an operator's fleet change waits for it (`wait_table_restored`).
        self.table_restored = asyncio.Event()
        if not self.resumed:
            self.table_restored.set()
        self._carried_workers: dict[int, dict[str, Any]] = {}
        self._carried_unread: dict[str, bytes] = {}  # by channel name: SlotServer.unread
        self._carried_respawns: list[float] = []
        # When the previous image stopped reading its workers (None: not carried).
        self._exec_at: float | None = None
        self._running_json = RunningJson()  # written every second (crash_snapshot)
        # The record sizes of the call tables the installed code reads, as its
        # trial run said them (None: not said; every table is handed over).
        self._tables_installed_reads: frozenset[int] | None = None
        if carried is not None:
            self._take_carried(carried)

    def _take_carried(self, carried: dict[str, Any]) -> None:
        """The previous image's state (`_state_for_exec`): what must not reset.
        Its "view" is read by the supervisor itself, whose coordinator is built
        on it before this runs."""
        supervisor = self.supervisor
        if isinstance(exec_at := carried.get(EXEC_AT), (int, float)):
            self._exec_at = float(exec_at)
        for spec in removing_specs(carried["fleets"]):  # out of the file, calls still on it
            supervisor.fleet_set.carry_removing(
                spec, capacity_aware=supervisor.config.fleets.capacity_aware
            )
        restore_fleets(supervisor.balancer.fleets, carried["fleets"])
        supervisor.pool.generation = int(carried["generation"])
        # (From a release that did not carry it: as configured now. Counted
        # only then: "auto" behind a cgroup namespace over the host's cgroupfs
        # reads up to 5000 groups (0.2-0.5 s) while no supervisor answers.)
        if carried.get("worker_target") and carried.get("workers_from"):
            supervisor.pool.worker_target = int(carried["worker_target"])
            supervisor.pool.workers_from = str(carried["workers_from"])
        else:
            count, because = supervisor.config.process.workers_from()
            supervisor.pool.worker_target = int(carried.get("worker_target") or count)
            supervisor.pool.workers_from = str(
                carried.get("workers_from")
                or (
                    because
                    if supervisor.pool.worker_target == count
                    else supervisor.pool.worker_target
                )
            )
        supervisor.pool.quick_deaths = int(carried.get("quick_deaths", 0))
        self._carried_respawns = [float(due) for due in carried.get("respawns", [])]
        if "started_monotonic" in carried:
            supervisor.started_at = float(carried["started_monotonic"])
        else:  # a release that carried the wall clock's start
            supervisor.started_at = monotonic_of(float(carried["started_at"]))
        supervisor.reloads.update(carried["reloads"])
        if carried.get("reload_pending"):
            log.info("a reload asked during the upgrade: done once this image serves")
            supervisor.reloads_asked.put_nowait(None)
        supervisor.pool.restarts.update(carried["restarts"])
        # (From a release that did not carry them: counted from here.)
        for task, count in dict(carried.get("task_failures") or {}).items():
            supervisor.task_failures.by_task[str(task)] += int(count)
        # The previous images' own dropped log lines: counted as a part gone is.
        dropped = int(carried.get("log_lines_dropped", 0))
        supervisor.view.retired.counters[("log_lines_dropped",)] += dropped
        unexpected = int(carried.get("unexpected_errors", 0))
        supervisor.view.retired.counters[("unexpected_errors",)] += unexpected
        supervisor.pool.calls_lost_total = int(carried["calls_lost_total"])
        # (From a release that did not carry it: counted from here.)
        supervisor.supervisor_deaths = int(carried.get("supervisor_deaths", 0))
        # (From a release that did not carry it: counted from what is stored from here.)
        supervisor.store_taken_up.fd_store_kept = {
            str(name): [(int(dev), int(ino)) for dev, ino in copies]
            for name, copies in dict(carried.get("fd_store_kept") or {}).items()
        }
        supervisor.supervisor_oom_kills = int(carried.get("supervisor_oom_kills", 0))
        # (From a release that did not carry it: none. A release before session
        # 36 said none "possibly"; one that could and did not carry it is gone.)
        supervisor.supervisor_oom_kills_possibly = min(
            int(carried.get("supervisor_oom_kills_possibly", 0)), supervisor.supervisor_oom_kills
        )
        # (From a release that did not carry it: those replaced, at least.)
        supervisor.pool.worker_oom_kills = int(
            carried.get("worker_oom_kills", supervisor.pool.restarts.get("oom", 0))
        )
        self.crash_restart = bool(carried.get("crash_restart"))
        # (From a release that did not carry them: counted from here.)
        supervisor.store_taken_up.fd_store_not_kept = int(carried.get("fd_store_not_kept", 0))
        if not self.crash_restart:  # after a crash, the store holds what it handed back
            supervisor.store_taken_up.fd_store_unkept = {
                str(n) for n in carried.get("fd_store_unkept") or []
            }
            supervisor.store_taken_up.fd_store_owed = [
                str(n) for n in carried.get("fd_store_owed") or []
            ]
        # The kernel's log read on from where the image before this one left it:
        # an OOM kill logged meanwhile (its own, a worker's) is read here.
        supervisor.oom_verdict.kernel_log.rewind(carried.get("kmsg_seq"), time.monotonic())
        if not self.crash_restart:  # (after a crash: the fd store's, cli)
            supervisor.tickets.take_over_ticket_keys(
                carried.get("ticket_keys"), supervisor.config, supervisor.serving_pem
            )
        if self.crash_restart:
            self._say_if_oom_killed(carried)
        elif supervisor.oom_verdict.oom_counter is not None:
            if carried.get("oom_kill_counter") == supervisor.oom_verdict.oom_counter.path:
                # An exec: an OOM kill counted meanwhile is a worker's, whose
                # death this image reads (its parent still).
                supervisor.oom_verdict.oom_kills = OomKills(last=carried.get("oom_kill_count"))
                supervisor.oom_verdict.look_for_oom_kills()
        # (From a release that did not carry it: counted from here.)
        supervisor.metrics.checks.restore(
            carried.get("fleet_checks"), {f.name for f in supervisor.balancer.fleets}
        )
        supervisor.slots.queue_timeouts = int(carried["queue_timeouts"])
        supervisor.slots.reclaimed_total = int(carried["reclaimed_total"])
        # (From a release that did not carry it: counted from here.)
        supervisor.slots.grants_past_cut_total = int(carried.get("grants_past_cut_total", 0))
        # (From a release that did not carry them: counted from here.)
        self.web.carry_counts(carried.get("operator_connections"))
        if carried["bound_listen"] is not None:  # None after a crash: as configured
            supervisor.bound_listen = ListenSection.model_validate(carried["bound_listen"])
        # (From a release that did not carry it: the file as read at this start.)
        if "file_read_text" in carried:
            text = carried["file_read_text"]
            supervisor.file_read_text = text if isinstance(text, str) else None
            supervisor.file_read_carried = True
        if self.crash_restart and isinstance(carried.get("last_reload"), dict):
            supervisor.last_reload = carried["last_reload"]
        self.statuses = {u["id"]: u for u in carried["upgrades"]}
        # (From a release that did not carry it: none.)
        supervisor.forgetting.take(carried.get("forgetting"))
        self._carried_workers = {int(w["pid"]): w for w in carried["workers"]}
        # (From a release that did not carry it: none; a line cut there is skipped.)
        self._carried_unread = unread_from_json(carried.get("unread"))

    def _say_if_oom_killed(self, carried: dict[str, Any]) -> None:
        """The supervisor before this one died: the OOM killer's, most likely,
        when the kernel counted an OOM kill in this service's memory cgroup
        since its last snapshot (a second at most before it died; a worker it
        had not read dead yet would show as a death of its own). Not known
        (said nothing) when the count was not read, or read elsewhere."""
        supervisor = self.supervisor
        counter = supervisor.oom_verdict.oom_counter
        kernel_log, pid = supervisor.oom_verdict.kernel_log, carried.get("supervisor_pid")
        logged = isinstance(pid, int) and kernel_log.killed(pid, time.monotonic())
        if (
            not logged
            and kernel_log.complete
            and kernel_log.last_seq is not None
            and (isinstance(pid, int) and carried.get("kmsg_seq") is not None)
        ):
            return  # the kernel's log, read since its last snapshot, names it not
        if counter is None or carried.get("oom_kill_counter") != counter.path:
            if not logged:
                return
        rose = rose_since(carried.get("oom_kill_count"), supervisor.oom_verdict.oom_kills.last)
        if not rose and not logged:
            return
        broad = counter is not None and counter.broad and not logged
        supervisor.supervisor_oom_kills += 1
        supervisor.supervisor_oom_kills_possibly += broad
        log.error(
            (
                "the previous supervisor died, possibly by the kernel's OOM killer (an OOM "
                "kill was counted since its last snapshot, a second before it died, where "
                "other processes' are counted too: oom_kills_counted_in; `journalctl -k | "
                "grep -i 'killed process'` names the pid killed). If so: "
                if broad
                else "the previous supervisor was killed by the kernel's OOM killer (the "
                "kernel's log names its pid, `journalctl -k | grep -i 'killed process'`): "
                if logged
                else "the previous supervisor was killed by the kernel's OOM killer, most "
                "likely (the OOM kills counted rose since its last snapshot, a second before "
                "it died): "
            )
            + "the service's memory limit (the unit's MemoryMax=) or the host's memory ran "
            "out, and the kernel took the supervisor although each worker asks to be taken "
            "first (oom_score_adj raised by 500). Raise MemoryMax= (`systemctl edit "
            "fleet-ingress`) or give the host memory, or carry fewer calls on this host "
            "(limits.max_connections, the fleets' maxconn); `journalctl -k | grep -i -A20 "
            "oom` says which limit and what each process held",
            extra=fields(
                oom_kills=rose,
                oom_kills_counted_in=None if counter is None else counter.covers,
                oom_kill_logged=logged,
            ),
        )

    @property
    def latest(self) -> dict[str, Any] | None:
        """The last upgrade's status; None before any."""
        return next(reversed(self.statuses.values()), None)

    @property
    def last_finished(self) -> dict[str, Any] | None:
        """The status of the last upgrade done or failed (one under way is not
        an outcome yet); None before any."""
        finished = (u for u in reversed(self.statuses.values()) if u.get("state") in FINISHED)
        return next(finished, None)

    def take_carried_respawns(self) -> list[float]:
        """When the replacements the previous image had not started yet are
        due (a worker died shortly before the exec); given once."""
        respawns, self._carried_respawns = self._carried_respawns, []
        return respawns

    # -- the running image: check, then re-execute ---------------------------------

    def begin_upgrade(self, source: str) -> dict[str, Any]:
        """Start an upgrade in the background (`upgrade` on the admin socket,
        or SIGUSR2); its status, whose `id` `upgrade_status` answers for.
        Refused (FleetChangeError 409) while stopping or upgrading."""
        if self.supervisor.pool.stopping or self.supervisor.stop_asked.is_set():
            raise FleetChangeError(409, "the ingress is stopping: nothing to upgrade")
        # Under way: in this image (its task), or carried over the exec and not
        # finished yet (the new image starts its workers).
        current = self.latest
        if current is not None and current["state"] not in FINISHED:
            raise FleetChangeError(
                409,
                f"an upgrade is under way already (id {current['id']}, {current['state']}); "
                "wait for it: `fleet-ingress upgrade` again afterwards if needed",
            )
        status: dict[str, Any] = {
            "id": secrets.token_hex(6),
            "source": source,
            "state": "checking",
            "pid": os.getpid(),
            "from_generation": self.supervisor.pool.generation,
            "from_code": code_digest(),
            "generation": None,
            "started": time.time(),
            "finished": None,
            # What it took, by CLOCK_MONOTONIC (the same after the exec): the wall
            # clock's difference is wrong by any step NTP makes meanwhile.
            "began_monotonic": time.monotonic(),
            "took_s": None,
            "error": None,
        }
        self.statuses[status["id"]] = status
        while len(self.statuses) > UPGRADES_KEPT:
            del self.statuses[next(iter(self.statuses))]
        self.supervisor.write_snapshot()  # a crash from here on: `upgrade` is told why
        log.info(
            "upgrade: trial run of the installed code",
            extra=fields(upgrade=status["id"], source=source),
        )
        self._notify("RELOADING=1", monotonic_usec(), "STATUS=upgrading: trial run")
        self._running = asyncio.get_running_loop().create_task(self._upgrade(status))
        return status

    def upgrade_status(self) -> dict[str, Any]:
        """What `upgrade` polls: this process, its generation, recent upgrades."""
        return {
            "pid": os.getpid(),
            "generation": self.supervisor.pool.generation,
            "code": code_digest(),
            "upgrades": list(self.statuses.values()),
        }

    async def _upgrade(self, status: dict[str, Any]) -> None:
        try:
            await self._trial_then_exec(status)
        except asyncio.CancelledError:
            # The supervisor exits with the upgrade under way (a stop whose drain
            # ended before the trial's aftermath did): said, as any abandoned
            # upgrade is, not left without a line (a CI run under load).
            if status.get("state") not in ("failed", "re-executing", "done"):
                self._upgrade_failed(
                    status,
                    "the ingress stopped during the upgrade: not re-executing",
                    cause="service",
                )
            raise

    async def _trial_then_exec(self, status: dict[str, Any]) -> None:
        supervisor = self.supervisor
        try:
            passed = await trial_run(
                supervisor.config_path, progress=lambda judge: self._trial_said(status, judge)
            )
        except TrialFailed as exc:
            self._upgrade_failed(status, str(exc), cause=exc.cause)
            return
        except Exception as exc:  # a bug here must not take the service down
            log.exception("upgrade: trial run broke")
            self._upgrade_failed(status, f"the trial run could not be started: {exc!r}")
            return
        self._tables_installed_reads = passed.table_sizes
        try:
            await self._after_trial(status, passed.checked)
        except Exception as exc:
            # A bug: the upgrade stayed "under way" for good (every later one
            # refused) and systemd was told RELOADING=1 with no READY=1 after it
            # (the supervisor-crash audit of session 26).
            log.exception("upgrade: broke after its trial run")
            self._upgrade_failed(status, f"the upgrade broke after its trial run: {exc!r}")

    def _trial_said(self, status: dict[str, Any], judge: TrialProgress) -> None:
        """The trial's progress in the status `upgrade` polls (it prints it and
        waits on while the trial makes some), and every TRIAL_SAY_EVERY in the
        log and to systemd: a niced trial on a busy host takes its time."""
        told = status["trial"]["wall_s"] if status.get("trial") else 0.0
        status["trial"] = judge.said()
        if judge.wall // TRIAL_SAY_EVERY <= told // TRIAL_SAY_EVERY:
            return
        log.info(
            "upgrade: trial run still running (niced behind the calls: the host is busy)",
            extra=fields(upgrade=status["id"], **status["trial"]),
        )
        self._notify(
            f"STATUS=upgrading: trial run, {judge.wall:.0f}s ({judge.cpu:.1f}s of CPU) so far"
        )

    async def _after_trial(self, status: dict[str, Any], checked: str) -> None:
        """From the trial run passed to the exec, or why not."""
        supervisor = self.supervisor
        if supervisor.pool.stopping:
            self._upgrade_failed(
                status, "the ingress began stopping during the trial run", cause="service"
            )
            return
        # The new image reads the certificate file at its start, with no reload to
        # judge it: one a reload refused must not come back this way.
        try:
            problem = await asyncio.to_thread(
                _files_read_again, supervisor.config_path, supervisor.serving_leaf
            )
        except (ConfigError, FleetsFileError) as exc:
            # Changed since the trial run read them (an edit, a file half written).
            self._upgrade_failed(
                status,
                f"the files changed during the trial run and no longer read: {exc}; fix "
                "them, then upgrade",
                cause="files",
            )
            return
        if problem is not None:
            self._upgrade_failed(
                status,
                f"{problem}; the new image would serve it in place of the one in use: fix "
                "the certificate and reload, then upgrade",
                cause="files",
            )
            return
        log.info("upgrade: trial run passed", extra=fields(upgrade=status["id"], check=checked))
        # A worker slow to read its channel gets a moment to, signals not held
        # meanwhile; one still not reading makes the hand-over refuse.
        await supervisor.server.flushed(HANDOVER_FLUSH)
        # A worker being started is waited for before the web sites go quiet
        # (again just before the exec: one may begin meanwhile).
        if not await supervisor.pool.starts_settled(self.starts_settle):
            self._starts_not_settled(status)
            return
        # The stats and admin listeners stop accepting (what comes now waits in
        # their backlog for the next image) and answer what was asked: the exec
        # would cut it.
        began = time.monotonic()
        try:
            open_ = await self.web.quiesce(WEB_QUIESCE)
            log.info(
                "upgrade: stats and admin requests answered, their listeners wait for the new "
                "image",
                extra=fields(
                    upgrade=status["id"],
                    connections=open_,
                    took_s=round(time.monotonic() - began, 3),
                ),
            )
            await self._reexec_or_give_up(status)
        finally:  # reached only when this image serves on (a quiesce that failed too)
            await self.web.resume()

    async def _reexec_or_give_up(self, status: dict[str, Any]) -> None:
        """Re-execute (never returns then), or say why not and serve on."""
        # From here a stop or reload signal waits in the kernel for the next
        # image; one that came before is acted on in this one first.
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_OVER_EXEC)
        try:
            await asyncio.sleep(SIGNALS_SETTLE)
            if not await self.supervisor.pool.starts_settled(self.starts_settle):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_OVER_EXEC)
                self._starts_not_settled(status)
                return
            # Nothing awaited from here to the exec: no start can begin meanwhile.
            if self.supervisor.pool.stopping or self.supervisor.stop_asked.is_set():
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_OVER_EXEC)
                self._upgrade_failed(
                    status,
                    "a stop was asked (SIGTERM/SIGINT) as the trial run ended: not "
                    "re-executing; the ingress stops",
                    cause="service",
                )
                return
            status["state"] = "re-executing"
            self._reexec()
        except _ExecFailed as failed:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_OVER_EXEC)
            try:
                await self._take_back(failed.kept)
            except Exception:  # a bug here must not take the service down
                log.exception("upgrade: taking the workers' channels back broke")
            finally:
                # Even if taking back broke: left "re-executing", every later
                # upgrade would be refused as under way.
                self._upgrade_failed(status, f"cannot re-execute {sys.executable}: {failed.error}")
        except HandoverError as exc:  # it says why and the fix; the workers serve on
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_OVER_EXEC)
            self._upgrade_failed(status, str(exc), cause="service")
        except OSError as exc:  # before anything was handed over: the workers serve on
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_OVER_EXEC)
            self._upgrade_failed(status, f"cannot re-execute {sys.executable}: {exc}")
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_OVER_EXEC)
            raise

    def _starts_not_settled(self, status: dict[str, Any]) -> None:
        self._upgrade_failed(
            status,
            f"a worker being started did not reach its channel within "
            f"{self.starts_settle:g}s (an overloaded host?): nothing was handed over, the "
            "workers serve on; run `fleet-ingress upgrade` again",
            cause="service",
        )

    def _upgrade_failed(
        self, status: dict[str, Any], error: str, *, cause: str | None = None
    ) -> None:
        """`cause`, when the installed code is not at fault (stat's line names the
        fix accordingly): "files", the configuration, fleets file or certificate on
        disk failed it; "service", the service's state at that moment (a worker
        start not settled, a channel not read, descriptors short, a stop), which
        the error says what to do about; "release", the installed release cannot
        take over by `upgrade`. None: the install's, or not known."""
        status.update(state="failed", error=error, finished=time.time(), took_s=_took(status))
        if cause is not None:
            status["cause"] = cause
        log.error(
            "upgrade abandoned: the running generation serves on",
            extra=fields(
                upgrade=status["id"], generation=self.supervisor.pool.generation, error=error
            ),
        )
        self._notify("READY=1", f"STATUS=upgrade abandoned; {self.supervisor.status_line()}")

    def _notify(self, *lines: str) -> None:
        if self.supervisor.notifier is not None:
            self.supervisor.notifier.notify(*lines)

    def crash_snapshot(self) -> dict[str, Any]:
        """What a supervisor started again after this one died takes up
        (`fd_store.CrashSnapshot`, `fd_store.crash_state`): the state an exec
        carries, but for what only an exec's handover can say (the lines being
        read on each channel) and what each worker said of each call (its
        access line should it be lost: too much to write every second)."""
        return self._state_for_exec(handover=False)

    def _state_for_exec(
        self, *, handover: bool = True, budgets: dict[int, dict[str, int]] | None = None
    ) -> dict[str, Any]:
        """What the next image needs that no socket carries (`_take_carried`).
        `budgets`: the grant budgets the hand-over gives (`plan_budgets`)."""
        budgets = budgets or {}
        supervisor = self.supervisor
        notifier = supervisor.notifier
        rows = {row.worker: row for row in supervisor.slots.workers}

        def held_before(key: int) -> list[str] | None:
            # A worker being asked what it holds after an exec has no row yet.
            return supervisor.server.not_counted_yet(key)[0]

        def standing_left(key: int) -> list[str]:
            if handover or supervisor.server.not_counted_yet(key)[1]:
                return []
            return supervisor.slots.standing_left(key)

        # A fleet an `add-fleet` is still bringing up (not in the fleets file
        # yet) is not one a supervisor started after a crash should serve: the
        # add is lost with the process that made it (its command says so).
        fleets = [
            f
            for f in supervisor.balancer.fleets
            if handover or f.membership is not Membership.ADDING
        ]
        return {
            "generation": supervisor.pool.generation,
            # The wall clock's start for a release that reads only that (a downgrade).
            "started_at": time.time() - (time.monotonic() - supervisor.started_at),
            "started_monotonic": supervisor.started_at,
            "fleets": fleets_to_json(fleets),
            "view": supervisor.view.to_json(time.monotonic()),
            "reloads": dict(supervisor.reloads),
            # Shown again only after a crash, which applies no file: after an exec
            # the new image runs the files as they are (its trial checked them).
            "last_reload": supervisor.last_reload,
            # The configuration file as the service first read it: what a
            # reload's hidden edits are told against (`edits_hidden`), this
            # image's start or the one before it. A release that does not
            # know it ignores it (a rollback: it reads the file at its start).
            "file_read_text": supervisor.file_read_text,
            "reload_pending": supervisor.reloading or not supervisor.reloads_asked.empty(),
            "restarts": dict(supervisor.pool.restarts),
            "task_failures": dict(supervisor.task_failures.by_task),
            # The lines still waiting are lost with this image (the exec).
            "log_lines_dropped": lines_dropped() + (lines_waiting() if handover else 0),
            "unexpected_errors": unexpected_errors(),
            "calls_lost_total": supervisor.pool.calls_lost_total,
            "supervisor_deaths": supervisor.supervisor_deaths,
            # What systemd's fd store keeps of this host's (by name, st_dev and
            # st_ino): the next image counts on from it against the unit's limit.
            "fd_store_kept": {
                name: [list(kept) for kept in copies]
                for name, copies in (notifier.kept if notifier is not None else {}).items()
            },
            # Counted on by the next image (a counter), and, over an exec alone,
            # what systemd would not keep and the removes still to send.
            "fd_store_not_kept": notifier.not_kept if notifier is not None else 0,
            "fd_store_unkept": sorted(notifier.unkept) if notifier is not None else [],
            "fd_store_owed": notifier.owed if notifier is not None else [],
            "supervisor_oom_kills": supervisor.supervisor_oom_kills,
            # Of those, said "possibly" (stat and the page say so too).
            "supervisor_oom_kills_possibly": supervisor.supervisor_oom_kills_possibly,
            "worker_oom_kills": supervisor.pool.worker_oom_kills,
            # The descriptor limit's shortfall this image said (or its
            # predecessor): the next image says it again only if it changed.
            "descriptors_short": supervisor.descriptors_short,
            # The count of OOM kills as this image last read it, and where: the
            # next supervisor, should this one die, tells from it whether the
            # OOM killer took it (`_say_if_oom_killed`). An exec's, less the
            # kills not claimed yet: a worker's death the next image reads.
            "oom_kill_count": supervisor.oom_verdict.oom_kills.carried()
            if handover
            else supervisor.oom_verdict.oom_kills.last,
            # The kernel's log read up to here (/dev/kmsg's sequence number), and
            # this process's pid: the next image reads on from there, a
            # supervisor started after this one died looks for its pid's OOM kill.
            "kmsg_seq": supervisor.oom_verdict.kernel_log.last_seq,
            "supervisor_pid": os.getpid(),
            "oom_kill_counter": None
            if supervisor.oom_verdict.oom_counter is None
            else supervisor.oom_verdict.oom_counter.path,
            "fleet_checks": supervisor.metrics.checks.to_json(),
            "queue_timeouts": supervisor.slots.queue_timeouts,
            "reclaimed_total": supervisor.slots.reclaimed_total,
            "grants_past_cut_total": supervisor.slots.grants_past_cut_total,
            "operator_connections": self.web.counts_to_json(),
            "bound_listen": supervisor.bound_listen.model_dump(),
            "upgrades": list(self.statuses.values()),
            "forgetting": supervisor.forgetting.to_json(),
            "worker_target": supervisor.pool.worker_target,
            "workers_from": supervisor.pool.workers_from,
            "quick_deaths": supervisor.pool.quick_deaths,
            # What this image runs, as checked: the next image's, should it not
            # read the files (changed since the trial run), rather than exit and,
            # as the unit's main process, take every call on the host with it.
            "running": self._running_json(
                supervisor.config,
                [f.spec for f in fleets if not f.removing],
                supervisor.serving_pem,
            ),
            # Replacements not started yet (a worker started but not joined yet
            # goes over with its channel, as the others; one being started is
            # waited for before the exec: `starts_settled`).
            "respawns": supervisor.pool.respawns_due(),
            # Of each channel handed over, what was read of a line not yet whole:
            # read first by the next image (built in `_reexec`, the handover's
            # step: nothing is read in between).
            "unread": unread_to_json(supervisor.server.unread()) if handover else {},
            # The keys this image's workers seal session tickets with: the next
            # image's, when it serves the same certificate. An exec's alone (a
            # memfd read once): never in the crash snapshot, the fd store has them.
            **(
                {
                    "ticket_keys": supervisor.tickets.ticket_keys_for_exec(
                        supervisor.config, supervisor.serving_pem
                    )
                }
                if handover
                else {}
            ),
            "workers": [
                {
                    "pid": w.pid,
                    "generation": w.generation,
                    "started_at": w.started_at,  # CLOCK_MONOTONIC: the same after the exec
                    # With the pid, which process it is (a crash restart's check).
                    "process_start": w.process_start,
                    "retiring": w.retiring,
                    "retire_by": w.retire_by,
                    # The drain its retirement gave it (0: until its calls end).
                    "drain_told": None if w.drain_told is None else drain_to_wire(w.drain_told),
                    # Reaped here already but not yet logged and counted (its
                    # channel's end awaited): the new image does, with these.
                    "exit_code": w.proc.returncode,
                    "calls_lost": w.calls_lost,
                    # Its channel ended while its process ran: "held" stays counted
                    # until it exits. Known by the row, or by the worker alone when it
                    # came over an exec holding nothing (no row was kept for it then).
                    "channel_lost": w.channel_lost
                    or (rows[w.key].channel_lost if w.key in rows else False),
                    # Still running LOST_CHANNEL_CONFIRM after (the supervisor's
                    # `_channel_lost`): a channel lost, not a death whose channel
                    # ended a moment first.
                    "lost_confirmed": w.channel_lost,
                    # Counted for it if it is slow to say what it holds (SlotServer.adopt).
                    # And what is left of its standing grant budget (it may grant
                    # from it until it reads "sync"), counted as held until it says
                    # what it holds: in a crash snapshot, unless the exec's budget
                    # was sent, which carries it (`SlotServer.plan_budgets`), as
                    # an exec's "budget" does.
                    "held": [f.name for f in rows[w.key].held.values()] + standing_left(w.key)
                    if w.key in rows
                    else (held_before(w.key) or []),
                    # Of what it holds, the leases the fleets' capacity estimates
                    # leave out (in flight when the probe counted last left): the
                    # next image leaves them out still, answered during the exec
                    # or not (`HostSlots.restore`); a worker silent since an
                    # earlier exec, those that one carried. An exec's alone: a
                    # crash restart carries no fleet's number.
                    "left_out": supervisor.server.left_out(w.key) if handover else [],
                    # Its grant budget (a fleet name a slot): counted on top of
                    # "held" if it is slow to answer, as it may have granted from
                    # it. A crash snapshot's: the one sent at the hand-over, or
                    # carried over it, while the worker has not answered.
                    "budget": [f for f, n in budgets.get(w.key, {}).items() for _ in range(n)]
                    if handover
                    else supervisor.server.not_counted_yet(w.key)[1],
                    # process.cpu_affinity: a replacement started later takes another CPU.
                    "cpu": w.cpu,
                    # process.accept: a replacement started later takes another rank.
                    "rank": w.rank,
                    # Its call table's fd, kept open over the exec (`_reexec`): a
                    # worker of this generation dying after it still has its
                    # lost calls' lines. Not in a crash snapshot: an fd number
                    # means nothing to a process that did not inherit it.
                    # Not one the installed code cannot read (`_handed_table`).
                    "call_table_fd": self._handed_table(w.call_table_fd) if handover else None,
                    # What it said of each call open on its channel, and of those
                    # open when its channel ended: their access lines if lost.
                    "calls": _calls_to_json(supervisor.server.calls_of(w.key)) if handover else {},
                    "calls_at_leave": _calls_to_json(w.calls_at_leave),
                }
                for w in supervisor.pool.workers.values()
            ]
            # A crash snapshot while the workers are being taken up: those not
            # yet, as the previous process carried them.
            + ([] if handover else self._workers_not_taken_up()),
        }

    def _workers_not_taken_up(self) -> list[dict[str, Any]]:
        """The workers the previous process (an exec's, or one dead: `fd_store`)
        carried that `adopt_workers` has not taken up yet, as it carried them
        (their calls left out, as a crash snapshot leaves them). A supervisor
        serves its stats listener and admin socket before it takes them up (up
        to FIRST_PROBE_WAIT and RESTORE_TIMEOUT after a crash), and a scrape's
        or `stat`'s snapshot then replaced the dead one's without them: a death
        meanwhile had the next supervisor forget a worker whose channel was lost
        (its calls counted against no fleet) and the others' retirement (the
        review of session 34)."""
        taken = {w.pid for w in self.supervisor.pool.workers.values()}
        return [
            {**carried, "calls": {}}
            for pid, carried in self._carried_workers.items()
            if pid not in taken
        ]

    def _reexec(self) -> None:
        """Replace this image with the code installed now, same PID, keeping
        every socket. Raises OSError (nothing handed over) when it cannot."""
        if not os.access(sys.executable, os.X_OK):
            raise OSError(f"{sys.executable} is not executable")
        # What was logged goes out first (bounded: a stderr nobody reads), so that
        # the lines still waiting are counted as dropped in the state carried.
        flush_lines()
        # No await from the state to the handover (this is no coroutine): the
        # channels' unread bytes it carries are the ones handed over.
        # A share of each fleet's free slots for each worker taking calls: it
        # grants them itself while nobody else can (`core.slot_budget`).
        takers = {
            w.key
            for w in self.supervisor.pool.workers.values()
            if not (w.retiring or w.candidate or w.left.is_set())
        }
        # What a lone worker's budget held parked that no "state" says (a
        # "logged", a 429, an answer) is read first: in the plan and the
        # calls carried, not dropped by the hand-over.
        self.supervisor.server.read_parked_unstated()
        budgets = self.supervisor.server.plan_budgets(takers)
        state = self._state_for_exec(budgets=budgets)
        state[EXEC_AT] = time.monotonic()  # the hand-over below is microseconds after
        fd = state_fd(state)
        socks = self.supervisor.sockets_to_keep()
        config_path = str(self.supervisor.config_path)
        argv = [sys.executable, "-m", "fleet_ingress", "run", "-c", config_path]
        # From here on nothing is read from the workers: what they send waits in
        # the kernel for the next image, which counts it through their "state".
        try:
            # All or nothing: HandoverError (an OSError).
            kept = self.supervisor.server.handover(budgets)
        except OSError:
            os.close(fd)
            raise
        socks.update(kept)
        # A crash of the new image before its own first snapshot: the next
        # supervisor knows of this upgrade (`fd_store.crash_state`), and of the
        # budgets just sent, counted for a worker slow to say what it holds
        # (written after the hand-over: before, a crash restart under-counted
        # such a worker by its budget; no socket read since, no await).
        self.supervisor.write_snapshot()
        owned = [
            w.call_table_fd
            for w in self.supervisor.pool.workers.values()
            if w.call_table_fd is not None
        ]
        tables = [table for table in owned if self._handed_table(table) is not None]
        log.info(
            "upgrade: re-executing the supervisor with the installed code",
            extra=fields(
                upgrade=next(reversed(self.statuses)),
                kept=sorted(socks),
                executable=sys.executable,
                # Those the installed code cannot read are closed by the exec.
                call_tables_handed=len(tables),
                call_tables_closed=len(owned) - len(tables),
            ),
        )
        try:
            for table in tables:  # named in the state carried (`call_table_fd`)
                os.set_inheritable(table, True)
            reexec(argv, socks, extra_env={UPGRADE_STATE: str(fd)})
        except OSError as exc:
            os.close(fd)
            for table in tables:
                os.set_inheritable(table, False)
            raise _ExecFailed(exc, kept) from exc

    def _handed_table(self, fd: int | None) -> int | None:
        """`fd` when a worker's call table goes over the exec: one whose record
        size the installed code reads (its trial run said them). The others
        stay close-on-exec, closed by the exec: a release before the tables
        (a downgrade) knew nothing of them, kept them open and inheritable
        for good (carried over each of its own execs), read and closed by
        nothing; one that reads other records would refuse it when the
        worker died. Their workers' lost calls are then those the supervisor
        heard of, as before the tables."""
        return fd if fd is not None and handed_over(fd, self._tables_installed_reads) else None

    async def _take_back(self, kept: dict[str, socket.socket]) -> None:
        """The exec failed after the channels were handed over: serve them again
        in this image, the table rebuilt from the workers as the new image would
        (their slots counted meanwhile: nothing given back, nothing reaped)."""
        await self.supervisor.server.take_back(kept, RESTORE_TIMEOUT)
        for worker in self.supervisor.pool.workers.values():
            if channel_key(worker.pid, worker.generation) in kept:
                # Its hello and "serving" may have been read by nobody: its
                # "state" stands for them, as in the new image (adopt_workers).
                worker.joined.set()
                worker.serving.set()

    # -- the new image: take over, then the new generation -------------------------

    async def adopt_workers(self, kept: dict[str, socket.socket]) -> None:
        """The new image: serve every kept worker channel again and rebuild the
        slot table from what the workers say they hold."""
        supervisor = self.supervisor
        supervisor.slots.paused = True
        adopted: set[int] = set()
        for name, sock in kept.items():
            ids = worker_key(name)
            if ids is None:
                close_unused({name: sock})
                continue
            pid, generation = ids
            adopted.add(pid)
            carried = self._carried_workers.get(pid, {})
            held = carried.get("held")
            budget = carried.get("budget")  # from a release before budgets: none
            left_out = carried.get("left_out")  # from a release before it: none
            key = await supervisor.server.adopt(
                sock,
                restoring=True,
                worker=(pid, generation),
                held_before=[str(name) for name in held] if isinstance(held, list) else None,
                budget_before=[str(n) for n in budget] if isinstance(budget, list) else None,
                left_out_before=[n for n in left_out if type(n) is int]
                if isinstance(left_out, list)
                else None,
                unread=self._carried_unread.pop(name, b""),
                calls=_calls_from_json(carried.get("calls")),
            )
            worker = WorkerProcess(
                _adopted_process(pid, carried),
                generation,
                key,
                started_at=float(carried.get("started_at", time.monotonic())),
                # (After a crash none is carried: `_retire_after_crash` tells them.)
                retiring=bool(carried.get("retiring", False)),
                # None from a release that did not carry it: that worker's CPU is free to take.
                cpu=cpu if isinstance(cpu := carried.get("cpu"), int) else None,
                rank=rank if isinstance(rank := carried.get("rank"), int) else None,
            )
            worker.calls_at_leave = _calls_from_json(carried.get("calls_at_leave"))
            worker.call_table_fd = self._carried_table(carried)
            if worker.retiring:
                self._arm_carried_backstop(worker, carried)
            worker.joined.set()
            worker.serving.set()
            supervisor.pool.add_worker(worker)
        # By the pids adopted, not by `workers`: one whose channel came over
        # may have exited and been reaped already (its watcher runs meanwhile).
        self._watch_channelless(adopted)
        self._carried_workers = {}  # every one is a worker here now (`_workers_not_taken_up`)
        step_done("channels adopted")
        if self.crash_restart:
            # No fleet's health came over: a call queued meanwhile waits for the
            # first probes (slots paused) rather than be answered 503.
            await supervisor.poller.wait_first_probes(timeout=FIRST_PROBE_WAIT)
        silent = await supervisor.server.finish_restore(RESTORE_TIMEOUT)
        now = time.monotonic()
        step_done("workers answered", now)
        if not self.crash_restart:
            # How long no call waiting for a slot was answered, and where it went.
            log.info(
                "upgrade: slots granted again after the re-execution",
                extra=fields(
                    since_exec_s=None if self._exec_at is None else round(now - self._exec_at, 3),
                    steps_s=steps_since(self._exec_at, now),
                    collector_passes=collector_passes(),
                ),
            )
        if self.crash_restart:
            await self._retire_after_crash()
        # A fleet being removed whose calls all ended over the exec goes now.
        for fleet in list(supervisor.fleet_set.fleets):
            supervisor.ops.reap(fleet)
        self.table_restored.set()
        # A worker slow to answer is still one: its stats stay its own.
        workers = supervisor.pool.workers
        present = {(w.pid, w.generation) for w in workers.values() if not w.left.is_set()}
        retired = supervisor.view.retire_absent(present)
        log.info(
            "workers rejoined after the re-execution",
            extra=fields(
                workers=sorted(present),
                not_answered_yet=[workers[k].pid for k in silent if k in workers],
                retired_from_stats=sorted(retired),
                calls=supervisor.host_calls,
            ),
        )

    async def _retire_after_crash(self) -> None:
        """After a crash, the old generations are retired as an upgrade retires
        them: told to stop accepting and drain for timeouts.upgrade_drain
        (unset: timeouts.drain; 0: until their calls end), their backstop from
        now. That is every worker older than the newest generation (a crash
        mid-upgrade: left serving, they took new calls, cut at their backstop),
        and every worker that says it drains (told to stop by the previous
        supervisor, a failed upgrade's drain, a stop of its own), for which a
        replacement starts: counted as serving, the host was a worker short
        until its calls ended, and took no call at all were they all draining.
        What they drained for before the crash is not known: the drain starts
        again from now (upgrade_drain = 0 keeps its calls whatever)."""
        supervisor = self.supervisor
        await supervisor.server.collect_reports(RESTORE_TIMEOUT)
        draining = {(r.pid, r.generation) for r in supervisor.view.live if r.draining}
        for worker in list(supervisor.pool.workers.values()):
            if worker.retiring or worker.left.is_set():
                continue
            if worker.generation < supervisor.pool.generation:
                supervisor.pool.retire(worker)
            elif (worker.pid, worker.generation) in draining:
                supervisor.pool.retire(worker)
                supervisor.pool.schedule_respawn(0.0)

    def _watch_channelless(self, adopted: set[int]) -> None:
        """Workers of the previous image whose channel did not come over: it
        had closed (the worker was exiting, its slots reclaimed there and its
        replacement carried as due; or the channel was lost while it ran, its
        slots kept counted there) but the process was not reaped yet. Still
        this process's children: reaped here and their exit logged and
        counted as the previous image would have, not left as zombies; the
        slots of one whose channel was lost stay counted here too until then,
        its kill deadline re-armed. Each is known as the other workers are
        (`workers`): a stop waits for it and kills it at its end, and a later
        exec carries it again."""
        for pid, carried in self._carried_workers.items():
            if pid in adopted:
                continue
            generation = int(carried.get("generation", 0))
            worker = WorkerProcess(
                _adopted_process(pid, carried),
                generation,
                -pid,  # no channel: a key no channel has
                started_at=float(carried.get("started_at", time.monotonic())),
                calls_lost=int(carried.get("calls_lost", 0)),  # counted as its channel closed
                retiring=bool(carried.get("retiring", False)),
                replaced=True,  # its replacement came over in "respawns"
                calls_at_leave=_calls_from_json(carried.get("calls_at_leave")),
            )
            worker.call_table_fd = self._carried_table(carried)
            worker.joined.set()
            worker.left.set()
            held = carried.get("held")
            # Reaped there already, its exit not yet counted: still a worker
            # whose channel was lost (a clean exit then loses no call). A release
            # that carried no "lost_confirmed" counted every kept one as lost.
            kept = bool(carried.get("channel_lost"))
            worker.channel_lost = bool(carried.get("lost_confirmed", kept))
            worker.channel_closed_first = kept
            if kept and worker.proc.returncode is None:
                if isinstance(held, list) and held:
                    slots = self.supervisor.slots
                    slots.reserve(worker.key, pid=pid, generation=generation, fleets=map(str, held))
                    slots.leave(worker.key, keep_held=True)
                self._arm_carried_backstop(worker, carried)
                if not worker.channel_lost:  # its channel ended just before the exec
                    self.supervisor.pool.confirm_channel_lost_later(worker)
            self.supervisor.pool.add_worker(worker)

    def _carried_table(self, carried: dict[str, Any]) -> int | None:
        """The call table of a worker the previous image carried over its
        exec (`call_table_fd`); None after a crash, which inherits none."""
        if self.crash_restart:
            return None
        return taken_over(carried.get("call_table_fd"))

    async def wait_table_restored(self) -> None:
        """Before an operator's fleet change (drain, maint, ready, add, remove):
        after a re-execution the admin socket answers before the kept workers
        have all said what they hold, and a fleet whose calls are on one not
        heard yet would read as idle (removed at once, its calls told to no
        worker, its maxconn open to new calls). Bounded by RESTORE_TIMEOUT."""
        await self.table_restored.wait()

    async def finish_upgrade(self) -> None:
        """The new image: start generation + 1 on the same listeners; once it
        serves, the older generations stop accepting and drain. If it cannot
        start, it is stopped and the running generation serves on."""
        supervisor = self.supervisor
        status = self.latest
        if status is None or status["state"] != "re-executing":
            return
        if supervisor.stop_asked.is_set():  # held over the exec: the workers adopted drain instead
            self._upgrade_failed(
                status,
                "a stop was asked (SIGTERM/SIGINT) during the re-execution: no new "
                "generation is started; the ingress stops",
                cause="service",
            )
            return
        status["state"] = "starting workers"
        new_generation = supervisor.pool.generation + 1
        # As the configuration says now: an upgrade is where a changed
        # process.workers takes effect (a reload only notes it).
        # Off the loop: "auto" and the batches read the cgroup's quota (mountinfo).
        (count, because), batch = await asyncio.to_thread(_workers_and_batch, supervisor.config)
        if count != supervisor.pool.worker_target:
            log.info(
                "upgrade: process.workers changed: the new generation has a different count",
                extra=fields(
                    upgrade=status["id"],
                    workers_before=supervisor.pool.worker_target,
                    workers=count,
                    count=because,
                ),
            )
        candidates: list[WorkerProcess] = []
        try:
            for index in range(count):
                if index and index % batch == 0:  # the previous batch serves first
                    await supervisor.pool.wait_serving(candidates[index - batch :])
                candidates.append(await supervisor.pool.spawn(new_generation, candidate=True))
            await supervisor.pool.wait_serving(candidates, settle=SERVING_SETTLE)
        except Exception as exc:  # whatever stops the new generation, the old serves on
            for worker in candidates:
                if worker.serving.is_set() and worker.proc.returncode is None:
                    # It may hold calls already: they end on their own, as an old
                    # generation's do.
                    supervisor.pool.retire(worker)
                    continue
                worker.kill()
            self._upgrade_failed(
                status,
                f"the new generation's workers cannot start: {exc}; the running generation "
                f"{supervisor.pool.generation} serves on. Fix the cause (see the service's log; "
                f"`fleet-ingress check -c {supervisor.config_path}`), then run `fleet-ingress "
                "upgrade` again",
            )
            return
        old = [w for w in supervisor.pool.workers.values() if w.generation < new_generation]
        for worker in candidates:
            worker.candidate = False
        supervisor.pool.generation = new_generation
        supervisor.pool.worker_target = len(candidates)
        supervisor.pool.workers_from = because
        for worker in old:
            supervisor.pool.retire(worker)
        status.update(
            state="done",
            generation=new_generation,
            finished=time.time(),
            took_s=_took(status),
            # The new image serves what the files did not give it (`upgrade` prints it).
            notes=list(supervisor.start_notes),
        )
        log.info(
            "upgrade done: the new generation serves, the old one drains",
            extra=fields(
                upgrade=status["id"],
                generation=new_generation,
                workers=[w.pid for w in candidates],
                draining=[w.pid for w in old],
                drain_s=_finite(supervisor.config.timeouts.old_generation_drain()),
                seconds=round(status["took_s"], 2),
            ),
        )

    def _arm_carried_backstop(self, worker: WorkerProcess, carried: dict[str, Any]) -> None:
        """A worker of the previous image's: its backstop as that image set it
        (a release that did not carry it: a full one from now), by the drain
        it was told (none carried: the drain told before upgrade_drain)."""
        told = drain_from_wire(carried.get("drain_told"))
        if told is not None:
            worker.drain_told = told
        elif worker.retiring:
            worker.drain_told = self.supervisor.config.timeouts.drain
        retire_by = carried.get("retire_by")
        if retire_by is not None:
            worker.retire_by = float(retire_by)
        self.supervisor.pool.arm_backstop(worker)


def close_unused(kept: dict[str, socket.socket]) -> None:
    """Sockets the previous image kept that this one has no use for (a
    listener no longer configured): closed, each said."""
    for name, sock in kept.items():
        log.warning("inherited socket not used", extra=fields(key=name))
        sock.close()


def _workers_and_batch(config: IngressConfig) -> tuple[tuple[int, str], int]:
    return config.process.workers_from(), start_batch()


def start_batch() -> int:
    """How many of a new generation's workers start at once: one per CPU this
    process may run on, the next ones once those serve. A worker's start (its
    imports) is 0.3-0.5 s of a core: 8 started together on 2 CPUs starved the
    rest of the host for seconds. In the upgrade-lag audit of session 32 (500
    fleets simulated in one process on the same 2 CPUs) a live call's frames
    were 0.1-1.1 s late at worst (p99 66-346 ms), a batch at a time 58-157 ms
    (p99 23-57 ms), and the upgrade no longer (7-10 s). The old worker carrying
    the call, idle but for its frames, waited 16-54 ms for a CPU either way."""
    return usable_cpus().count  # a CPUQuota= of 200% on 64 CPUs: 2 at once


def _adopted_process(pid: int, carried: dict[str, Any]) -> AdoptedProcess:
    """A worker of the previous image, with the exit status it read if it
    had reaped it already (else this image waits for it)."""
    code = carried.get("exit_code")
    return AdoptedProcess(pid, returncode=int(code) if code is not None else None)


def _calls_to_json(calls: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(lease): call for lease, call in calls.items()}


def _calls_from_json(carried: Any) -> dict[int, dict[str, Any]]:
    """`_calls_to_json`'s, as the previous image carried them (a release that
    did not: none)."""
    if not isinstance(carried, dict):
        return {}
    return {
        int(lease): call
        for lease, call in carried.items()
        if isinstance(call, dict) and str(lease).lstrip("-").isdigit()
    }


def _finite(seconds: float) -> float | None:
    """For a log field: None for no limit (JSON has no infinity)."""
    return None if seconds == float("inf") else seconds


def _took(status: dict[str, Any]) -> float:
    """Seconds since the upgrade began; by the wall clock for one begun by a
    release that did not note its monotonic start."""
    began = status.get("began_monotonic")
    if began is None:
        return round(time.time() - status["started"], 3)
    return round(time.monotonic() - began, 3)


def _files_read_again(config_path: Path, serving: LeafFacts | None) -> str | None:
    """The files read again after the trial run, as the new image will read
    them (ConfigError, FleetsFileError: they no longer read): why the
    certificate on disk must not be served, or None."""
    config = load_config(config_path)
    if not load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn):
        # `check` and a reload refuse it too: the new image would serve no fleet.
        raise FleetsFileError(f"{config.fleets.file}: no fleets listed")
    return certificate_not_taken(config, serving)
