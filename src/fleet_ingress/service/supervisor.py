"""`fleet-ingress run`: the supervisor, systemd's main PID (SPEC 11, 13).

It binds the carrier and ACME listeners once and keeps them open while it
runs; `process.workers` worker processes (`service.worker`) inherit them and
serve every carrier. Nothing of a call runs here. What is here is one
host's view of its fleets: the slot coordinator (`HostSlots` behind
`SlotServer`: maxconn, leastconn and the FIFO queue for the host, one
channel per worker), the health poller (each fleet probed once per interval
for the host), the admin socket and the stats listener, signals and sd_notify.

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
- Stats and metrics cover the host: the fleets' state is this process's, the
  per-call counters are the workers', summed from their reports
  (`ops.host_stats`: pulled every few seconds and at every scrape).
- SIGHUP: the configuration, fleets file and certificate are checked here
  first (an invalid one is refused whole), applied to the fleet set, the
  poller and the slot table, then every worker reloads its certificate and
  settings (`reload` on its channel, answered `reloaded`), the configuration
  applied here sent with it (not read again from the file, which may have
  changed since); a worker still starting is told once it serves. READY=1
  once all have answered. Calls are untouched.
- SIGTERM/SIGINT: every worker stops accepting (`stop`, answered
  `stopping`), the listeners close here too, so new connections are refused;
  the workers drain their calls for `timeouts.drain`; this process exits 0
  after the last one. A second signal cuts every call (`stop` with `cut`).
- `remove-fleet --force` sends `close-fleet` to every worker.
- Upgrade (`fleet-ingress upgrade`, SIGUSR2): this process re-executes
  itself (same PID), its workers serving on, and starts a new generation.
  The sequence, both images' sides of it, is `service.upgrade_sequence`
  (`UpgradeSequence`, `self.upgrade`); it has the supervisor start, watch
  and retire the workers (`spawn`, `add_worker`, `retire`).

The process around it (`run_supervisor`: the signals, what systemd is told,
the background tasks) is `service.supervisor_process`.
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
from collections.abc import Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fleet_ingress.config.config_diff import NOTHING_CHANGED, settings_changed
from fleet_ingress.config.settings import (
    IngressConfig,
    config_to_json,
    edits_hidden,
    file_settings,
    file_text,
    settings_of_text,
    unread_variables_said_by_run,
)
from fleet_ingress.core.addresses import parse_hostport
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.certificate_change import reload_note
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import UNRESPONSIVE_PULLS, HostSlots, WorkerRow
from fleet_ingress.core.host_view import HostView, ReportError
from fleet_ingress.core.lost_calls import lost_call_record
from fleet_ingress.logs import fields
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.descriptors import calls_allowed, descriptors_short, say_descriptors_short
from fleet_ingress.net.event_loop import count_unexpected_error
from fleet_ingress.net.late_timers import PatientTimer, patient_timeout, wait_patiently
from fleet_ingress.net.listener import bind_errors_named, bind_tcp
from fleet_ingress.net.poller import HealthPoller
from fleet_ingress.net.slot_server import SlotServer, channel_key
from fleet_ingress.net.tls import CarrierPem, fleet_ssl_context, held_pem, memfd_of, new_ticket_keys
from fleet_ingress.ops.admin_server import (
    admin_app,
    bind_admin_socket,
)
from fleet_ingress.ops.fleet_ops import (
    CLOSE_ANSWER_WAIT,
    ClosedElsewhere,
    FleetChangeError,
    FleetOps,
    ForgetLater,
)
from fleet_ingress.ops.host_stats import (
    PULL_EVERY,
    SCRAPE_WAIT,
    HostMetrics,
    pull_reports,
)
from fleet_ingress.ops.local_counts import fold_fleets_gone
from fleet_ingress.ops.metrics import lost_call_counts
from fleet_ingress.ops.reload_outcome import (
    ReloadAsked,
    reload_outcome,
    tell,
)
from fleet_ingress.ops.stats_server import stats_app
from fleet_ingress.ops.web_sites import OperatorConnectionsCollector, WebSites
from fleet_ingress.release import code_digest
from fleet_ingress.service.admin_socket import KeptAdminSocket
from fleet_ingress.service.carrier_certificate import (
    SERVING_PEM_ENV,
    SERVING_TICKET_KEYS_ENV,
    carrier_ssl_context,
    pem_to_json,
    read_carrier_pem,
    serves_alike,
    serving_leaf,
    ticket_keys_to_json,
    warn_about_chain,
)
from fleet_ingress.service.fd_store import (
    STORE_MAX_READ,
    TICKET_KEYS_NAME,
    CrashSnapshot,
    read_store_max,
)
from fleet_ingress.service.files_on_disk import FilesOnDisk
from fleet_ingress.service.host_picture import last_upgrade_failed, snapshot_of, status_line_of
from fleet_ingress.service.ingress import (
    RUNNING_CONFIG_ENV,
    STOP_GRACE,
    ReloadRefused,
    listener_notes,
    probe_settings,
    read_reload_settled,
    warn_same_host,
)
from fleet_ingress.service.kept_running import TaskFailures, kept_running, say_if_failed
from fleet_ingress.service.listen_fds import COORDINATOR, handover_env, pass_fds
from fleet_ingress.service.oom_verdict import (
    OOM_KILLED_WORKER,
    OOM_POSSIBLY_KILLED_WORKER,
    OomVerdict,
)
from fleet_ingress.service.reload_rounds import ReloadRounds, log_not_reloaded
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.store_keeping import StoreTakenUp, fd_store_picture
from fleet_ingress.service.ticket_keys import SessionTicketKeys
from fleet_ingress.service.upgrade_sequence import STARTS_SETTLE, UpgradeSequence
from fleet_ingress.service.worker_asks import WorkerAsks
from fleet_ingress.service.worker_calls import WorkerCalls
from fleet_ingress.service.worker_exits import (
    child_running,
    exit_fields,
    exit_status,
    lived_s,
    restart_reason,
)
from fleet_ingress.service.worker_process import WORKER_START_TIMEOUT, WorkerProcess

_T = TypeVar("_T")
log = logging.getLogger("fleet_ingress.lifecycle")
server_log = logging.getLogger("fleet_ingress.server")  # where "listening" was always said
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
# A fleet gone from the set is forgotten by the workers this long after (its
# counters then start from 0 if it is listed again): one listed again sooner,
# taken out for maintenance or by a reload that put it back, counts on. Done at
# once, its counters dropped as each worker read the op, in steps while it was
# listed again: Prometheus reads a drop to anything but 0 as a reset and adds a
# false increase (the review of session 25).
FORGET_AFTER = 300.0
_NOT_FOR_WORKERS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# The supervisor's background tasks, by the names their failures are counted under
# (fleet_ingress_supervisor_task_failures_total{task}); a one-off task that
# fails counts under its coroutine's name.
WATCHDOG_PINGS = "watchdog pings"
SYSTEMD_STATUS = "systemd status"
RELOADER = "reloader"
REPORT_PULLER = "report puller"
STATE_SNAPSHOTS = "state snapshots"
ADMIN_SOCKET = "admin socket"
BACKGROUND_TASKS = (
    WATCHDOG_PINGS,
    SYSTEMD_STATUS,
    RELOADER,
    REPORT_PULLER,
    STATE_SNAPSHOTS,
    ADMIN_SOCKET,
)


class WorkerStartError(RuntimeError):
    """Workers could not start; `run` exits non-zero with this, an upgrade is
    abandoned. `error_logged`: the worker wrote its error to the service's log
    (where `run`'s own stderr goes, just before; `upgrade`'s is a terminal)."""

    def __init__(self, message: str, *, error_logged: bool = False) -> None:
        super().__init__(message)
        self.error_logged = error_logged


class Supervisor:
    def __init__(
        self,
        config: IngressConfig,
        fleets: Sequence[FleetSpec],
        config_path: Path,
        *,
        handed: dict[str, socket.socket] | None = None,
        carried: dict[str, Any] | None = None,
        starts_settle: float = STARTS_SETTLE,
        pem: CarrierPem | None = None,
    ) -> None:
        """`handed` and `carried`: the sockets and the state the previous image
        kept over its re-execution (an upgrade); None at a first start.
        `pem`: the certificate to serve, as checked (the previous image's, when
        the files could not be read after its exec); None: read from the files.
        `starts_settle`: how long an upgrade's exec waits for workers being
        started (STARTS_SETTLE; tests shorten it)."""
        self.config = config
        self.config_path = config_path.absolute()  # workers read it too
        # A certificate that cannot load fails `run` here, not in workers. Read
        # once: what is checked here is what every worker started is handed
        # (`_start_worker`), whatever the files hold by then.
        if pem is None:
            pem = read_carrier_pem(config)
        carrier_ssl_context(config, pem)
        self.serving_pem = pem  # the certificate and key served now, as checked
        # The keys every worker of this image seals its session tickets with
        # (`service.ticket_keys`).
        self.tickets = SessionTicketKeys()
        # What this start serves other than what the files hold, said once more
        # by the upgrade that re-executed into it (`upgrade` prints it).
        self.start_notes: list[str] = []
        self.fleet_set = FleetSet.from_specs(
            fleets, capacity_aware=config.fleets.capacity_aware, health=Health.INIT
        )
        self.balancer = Balancer(self.fleet_set)
        self.slots = HostSlots(
            self.balancer,
            queue_timeout=config.timeouts.queue,
            max_queue=config.limits.max_queue,
            fall=config.fleets.fall,
        )
        # What the workers count (requests, bytes, handshakes, histograms), summed
        # from their reports on the slot channel (ops/host_stats.py).
        self.view = HostView()
        if carried is not None and "view" in carried:  # none after a crash (fd_store)
            try:
                self.view = HostView.from_json(carried["view"], time.monotonic())
            except ReportError as exc:
                # Counters from 0 rather than a host with no supervisor.
                log.error(
                    "the workers' counts carried over the upgrade could not be read: the "
                    "host's counters start again from 0 (report it)",
                    extra=fields(error=str(exc)),
                )
        self.server = SlotServer(self.slots, view=self.view)
        self.registry = Registry()  # no call runs here: always empty
        self.started_at = time.monotonic()  # for uptime: a wall-clock step moves no age
        self.serving_leaf = serving_leaf(config, pem)  # what a reload's is judged against
        # What tls.cert, ingress.toml and the fleets file hold against what runs.
        self.files = FilesOnDisk(config_path)
        # Fleets gone from the set are forgotten FORGET_AFTER after, unless back.
        self.forgetting = ForgetLater(
            FORGET_AFTER, lambda name: self.fleet_set.get(name) is not None, self._forget_fleet
        )
        # Why the last try to start a replacement worker failed (None: it did not).
        self.spawn_error: str | None = None
        self.workers_not_reloaded: dict[int, object] = {}  # by the last reload applied here
        # The asks the reload round under way answers (`_reload_on_signal`).
        self.reload_in_hand: list[ReloadAsked] = []
        self.reloads: Counter[str] = Counter()
        # process.worker_hang_timeout as read at start (the report puller's pace).
        self.hang_timeout = config.process.worker_hang_timeout
        # process.cpu_affinity as read at start: every worker this image starts,
        # a replacement too (a reload notes a change, as of process.workers).
        self.cpu_affinity = config.process.cpu_affinity
        self.last_reload: dict[str, Any] | None = None  # shown by stat while it was refused
        # The configuration file as this image read it when it started, with
        # the environment it keeps: what a reload's edits are told against,
        # where the environment hides them (`edits_hidden`). Not the last
        # reload's: an edit still hidden is said again at each reload, as
        # `_pending_notes` says a change still pending (told against the last
        # reload, a second reload said "nothing changed" and `stat` dropped
        # its EDITS NOT APPLIED line, the edit still not served).
        # Its text is carried over an exec and in the crash snapshot (None
        # where the file could not be read): the new image tells edits against
        # the file as the service first read it, not as it read it at its own
        # start (an edit hidden before an upgrade or a crash was never said
        # again). From a release that did not carry it: read at this start.
        self.file_read: dict[str, Any] = {}
        self.file_read_text: str | None = None
        self.file_read_carried = False  # by the image before (`UpgradeSequence`)
        self.edits_hidden: list[str] = []  # by the last reload applied
        # SIGHUPs not acted on yet (run_supervisor's reloader takes them), and
        # one under way: either goes over an exec as a reload the new image does.
        # Each a SIGHUP (None) or `fleet-ingress reload` (a future for its outcome).
        self.reloads_asked: asyncio.Queue[ReloadAsked] = asyncio.Queue()
        self.reloading = False
        self.workers: dict[int, WorkerProcess] = {}  # by channel key
        self.generation = 1
        # Workers the serving generation should have (process.workers when it
        # started: a reload does not change it).
        self.worker_target = 0
        # Where worker_target came from, for stat: "2 (CPUQuota 200% of 64 CPUs)".
        self.workers_from = ""
        self.stopping = False
        self.restarts: Counter[str] = Counter()  # workers replaced, by why
        self.calls_lost_total = 0  # the calls they took with them
        # Supervisors before this one that died, taken up (the fd store): carried.
        self.supervisor_deaths = 0
        # Of those, the ones the kernel's OOM killer took, as far as its count says;
        # of these, the ones said "possibly" (a count that takes in other
        # processes', the kernel's log unread): carried, so stat says it as the log did.
        self.supervisor_oom_kills = 0
        self.supervisor_oom_kills_possibly = 0
        # Workers the OOM killer took, replaced or not (an upgrade's old
        # generation draining is not): carried.
        self.worker_oom_kills = 0
        # [descriptor limit, descriptors needed] when short (cli), carried over an exec.
        self.descriptors_short: list[int] | None = None
        # What the image before this one left of systemd's fd store, until taken up.
        self.store_taken_up = StoreTakenUp()
        # Whether a worker dead of SIGKILL was the kernel's OOM killer's (`service.oom_verdict`).
        self.oom_verdict = OomVerdict()
        # Background tasks of this process that failed (kept running: kept_running).
        self.task_failures = TaskFailures(BACKGROUND_TASKS)
        self._say_if_failed = say_if_failed(self.task_failures)  # for each `_keep` task
        self.metrics = HostMetrics(
            self.slots,
            self.view,
            certificate_not_after=lambda: self.certificate_not_after,
            reloads=lambda: self.reloads,
            restarts=lambda: self.restarts,
            calls_lost=lambda: self.calls_lost_total,
            task_failures=lambda: self.task_failures.by_task,
            supervisor_deaths=lambda: self.supervisor_deaths,
            supervisor_oom_kills=lambda: self.supervisor_oom_kills,
            worker_oom_kills=lambda: self.worker_oom_kills,
            # a snapshot taken as it is built: no notifier yet
            fd_store=lambda: fd_store_picture(getattr(self, "notifier", None)),
            fleets_gone=lambda: self.forgetting.pending,
            upgrade_failed=lambda: last_upgrade_failed(self),
            workers=self.workers_figures,
            certificate_file_not_after=lambda: self.files.certificate_not_after,
            certificate_file_refused=lambda: self.files.certificate_file_refused(self.serving_leaf),
            certificate_chain_doubted=self.files.served_chain_doubted,
        )
        fleet_ssl = fleet_ssl_context(verify=config.fleets.verify, ca_file=config.fleets.ca_file)
        self.poller = HealthPoller(
            self.server,
            fleet_ssl,
            probe_settings(config),
            on_probe=self.metrics.checks.check_observed,
        )
        self.ops = FleetOps(
            self.fleet_set,
            self.server,
            self.registry,
            self.poller,
            settings=lambda: self.config.fleets,
            checks=self.metrics.checks,
            close_elsewhere=self.close_fleet,
            forgotten=self.forgetting.gone,
        )
        self.slots.on_release.append(self.ops.reap)
        self.asks = WorkerAsks(self.server, self.workers)  # the ops sent them, answered
        self.calls = WorkerCalls(self.asks, self.server, self.workers)  # `calls`, `end-call`
        # The workers' side of each reload: told the configuration applied here.
        self.reload_rounds = ReloadRounds(self.asks, self.workers, self._keep, self._reload_told)
        self.server.on_join.append(self._joined)
        self.server.on_leave.append(self._left)
        self.server.keeps_slots = self._still_running
        self.server.handlers["reloaded"] = self.asks.answered
        self.server.handlers["stopping"] = self.asks.answered
        self.server.handlers["fleet-closed"] = self.asks.answered
        self.server.handlers["calls-listed"] = self.calls.calls_listed
        self.server.handlers["call-ended"] = self.asks.answered
        self.server.handlers["serving"] = self._serving
        self.bound_listen = config.listen
        self.listeners: dict[str, socket.socket] = {}  # by config key: listen.wss, listen.acme
        # A worker's "hello" or "serving" read before adopt() returned its
        # channel key (no WorkerProcess yet): the events to set, by key.
        self._early: dict[int, set[str]] = {}
        # A channel that ended before adopt() returned: its last row, by key.
        self._left_early: dict[int, WorkerRow | None] = {}
        # SIGTERM/SIGINT received (run_supervisor waits on it): `stopping`
        # follows a loop turn later.
        self.stop_asked = asyncio.Event()
        self.quick_deaths = 0
        # Replacements of dead workers not started yet, by when they are due
        # (monotonic): carried over an exec, where their tasks would be lost.
        self._respawns: dict[asyncio.Task[None], float] = {}
        self._starting = 0  # workers being started by a respawn, not in `workers` yet
        # `spawn` calls under way, any caller's: an upgrade's exec waits for none.
        self._spawns = 0
        # (generation, CPU) of the workers being started (process.cpu_affinity).
        self._cpus_starting: list[tuple[int, int]] = []
        self._no_spawns = asyncio.Event()
        self._no_spawns.set()
        # Cleared while a new generation starts: replacements wait, then start
        # whichever generation serves by then, if it is short of workers.
        self._generation_settled = asyncio.Event()
        self._generation_settled.set()
        self._watchers: set[asyncio.Task[Any]] = set()
        self._web = WebSites()
        self.metrics.prometheus.register(OperatorConnectionsCollector(self._web))
        self.stats_address: tuple[str, int] | None = None
        self._stats_sock: socket.socket | None = None
        self.kept_admin_socket = KeptAdminSocket(self._web)
        self._puller: asyncio.Task[None] | None = None
        self.notifier: Notifier | None = None  # run_supervisor's: an upgrade says RELOADING=1
        # Its state for a supervisor started after its death (run_supervisor's).
        self.snapshots: CrashSnapshot | None = None
        self.handed = handed or {}
        # Last: it puts the carried state back on what is built above.
        self.upgrade = UpgradeSequence(
            self, self._web, carried=carried, starts_settle=starts_settle
        )

    async def recheck_fd_store(self) -> None:
        """At each reload: the unit's FileDescriptorStoreMax= read again (a
        `systemctl edit` raises it for the running unit at once), and what systemd
        would not keep, still wanted (`Notifier.unkept`: listeners, workers'
        channels, the state's memfds, the ticket keys), stored again: kept now
        if it has room. Before, the limit read at the start stood until the
        next start: the store was still said full once raised, and what it had
        not kept stayed out of it."""
        notifier = self.notifier
        if notifier is None or not notifier.enabled:
            return
        limit = await asyncio.to_thread(read_store_max, timeout=STORE_MAX_READ, now=True)
        if limit is not None and limit != notifier.store_max:
            log.info(
                "systemd's fd store: the unit's FileDescriptorStoreMax= read again",
                extra=fields(was=notifier.store_max, now=limit),
            )
            if notifier.store_max is None:  # the start's read still under way
                notifier.limit_known(limit)
            notifier.store_max = limit
        if not notifier.unkept:
            return
        if TICKET_KEYS_NAME in notifier.unkept:
            # a new memfd of the keys: the last is closed
            self.tickets.store_ticket_keys(self.notifier, self.config, self.serving_pem)
        wanted = {name: sock.fileno() for name, sock in self.sockets_to_keep().items()}
        if self.snapshots is not None:
            wanted.update(self.snapshots.descriptors())
        for worker in list(self.workers.values()):
            if (fd := self.server.channel_fileno(worker.key)) is not None:
                wanted[channel_key(worker.pid, worker.generation)] = fd
        for name in sorted(notifier.unkept):
            if name in wanted:
                notifier.store_fd(name, wanted[name])
            else:  # gone meanwhile without a remove (a listener closed)
                notifier.unkept.discard(name)

    def store_fd(self, name: str, sock: socket.socket) -> None:
        """Keep `sock` in systemd's fd store: a supervisor started again after
        this one died takes it up (`service.fd_store`)."""
        if self.notifier is not None:
            self.notifier.store_fd(name, sock.fileno())

    # -- start -------------------------------------------------------------------

    async def start(self) -> None:
        if not self.file_read_carried:
            self.file_read_text = await asyncio.to_thread(file_text, self.config_path)
        self.file_read = await asyncio.to_thread(settings_of_text, self.file_read_text)
        if not self.tickets.ticket_keys_stored:  # before any worker is handed them
            self.tickets.store_ticket_keys(self.notifier, self.config, self.serving_pem)
            self.tickets.ticket_keys_stored = True
        for fleet in self.balancer.fleets:
            self.poller.start(fleet)
        self.forgetting.start()  # the waits the previous image carried (an upgrade, a crash)
        if not self.config.fleets.verify:
            _warn_unverified()
        warn_same_host((fleet.spec for fleet in self.balancer.fleets), log)
        warn_about_chain(self.config, self.serving_pem)  # what is served: kept, maybe
        # After a re-execution the sockets are the previous image's, never closed;
        # they stay where they were bound (a changed listen.* waits for a restart).
        listen = self.bound_listen if self.handed else self.config.listen
        kept = "kept over the upgrade" if self.handed else None
        for key, address in (("wss", listen.wss), ("acme", listen.acme)):
            if not address:
                continue
            sock = self.handed.pop(f"listen.{key}", None)
            if sock is None:
                host, port = parse_hostport(address, what=f"listen.{key}")
                with bind_errors_named(key, address):
                    sock = bind_tcp(host, port)
                self.store_fd(f"listen.{key}", sock)
            self.listeners[f"listen.{key}"] = sock
            name = sock.getsockname()
            server_log.info(
                "listening", extra=fields(listener=key, address=(name[0], name[1]), note=kept)
            )
        if listen.stats:
            sock = self.handed.pop("listen.stats", None)
            if sock is None:
                host, port = parse_hostport(listen.stats, what="listen.stats")
                with bind_errors_named("stats", listen.stats):
                    sock = bind_tcp(host, port, backlog=128)
                self.store_fd("listen.stats", sock)
            self._stats_sock = sock
            app = stats_app(
                self.snapshot,
                self.metrics.prometheus,
                refresh=self.fresh_counts,
                shown=self.write_snapshot_in_turns,
            )
            await self._web.serve_kept(app, sock, listener="stats")
            sock_name = sock.getsockname()
            self.stats_address = (sock_name[0], sock_name[1])
            server_log.info(
                "listening", extra=fields(listener="stats", address=self.stats_address, note=kept)
            )
        if listen.admin_socket:
            path = Path(listen.admin_socket)
            admin_sock = self.handed.pop("listen.admin_socket", None)
            if admin_sock is None:
                admin_sock = bind_admin_socket(path)
            self.kept_admin_socket.serving(admin_sock)
            await self._web.serve_kept(
                admin_app(
                    self.ops,
                    self.snapshot,
                    refresh=self.refresh,
                    upgrade=self.upgrade,
                    changes_wait=self.upgrade.wait_table_restored,
                    reload=self.reload_and_wait,
                    changed=self.write_snapshot,
                    calls=self.calls,
                ),
                admin_sock,
                listener="admin",
            )
            self.kept_admin_socket.served_at(path)
            server_log.info(
                "listening", extra=fields(listener="admin", address=str(path), note=kept)
            )
        if self.upgrade.resumed:
            self._generation_settled.clear()
            try:
                await self.upgrade.adopt_workers(self.handed)
                self.handed = {}
                # What this image runs, before its generation starts: until now
                # the store has the previous image's (another certificate,
                # another configuration: what a crash from here would serve).
                self.write_snapshot()
                await self.upgrade.finish_upgrade()
            finally:
                self._generation_settled.set()
                self.upgrade.table_restored.set()  # also if adopting failed: never hang a change
            # Replacements the previous image had not started yet (a worker
            # died shortly before the exec): due as they were.
            now = time.monotonic()
            for due in self.upgrade.take_carried_respawns():
                self.schedule_respawn(max(0.0, due - now))
        else:
            # "auto" off the loop, which serves the admin and stats sockets and the
            # first probes meanwhile: behind a cgroup namespace over the host's
            # cgroupfs the CPU quota's group is looked for through up to 5000
            # groups' cgroup.procs (core.cgroups.locate: 0.2-0.5 s measured).
            count, because = await asyncio.to_thread(self.config.process.workers_from)
            self.worker_target, self.workers_from = count, because
            started = [await self.spawn(self.generation) for _ in range(count)]
            await self.wait_serving(started)
            log.info(
                "workers serving",
                extra=fields(
                    workers=[w.pid for w in started],
                    generation=self.generation,
                    configured=self.config.process.workers,
                    count=because,
                ),
            )
        # Bounds what a worker's crash loses of its counts (a scrape asks afresh too).
        self._puller = asyncio.get_running_loop().create_task(
            kept_running(
                REPORT_PULLER,
                lambda: pull_reports(
                    self.server, every=self._pull_every, on_silent=self._worker_silent
                ),
                self.task_failures,
            )
        )

    def sockets_to_keep(self) -> dict[str, socket.socket]:
        """The listeners, stats and admin sockets, by the name the next image
        takes them by (an upgrade's exec keeps them)."""
        socks: dict[str, socket.socket] = dict(self.listeners)
        if self._stats_sock is not None:
            socks["listen.stats"] = self._stats_sock
        if self.kept_admin_socket.sock is not None:
            socks["listen.admin_socket"] = self.kept_admin_socket.sock
        return socks

    async def spawn(self, generation: int, *, candidate: bool = False) -> WorkerProcess:
        """Start a worker of `generation`: its process, its channel served, in
        `workers` and watched. Counted as under way until then: from the fork
        on it is a child that no exec may lose (`starts_settled`)."""
        self._spawns += 1
        self._no_spawns.clear()
        cpu = self._cpu_for(generation)
        if cpu is not None:
            self._cpus_starting.append((generation, cpu))
        try:
            return await self._start_worker(generation, candidate=candidate, cpu=cpu)
        finally:
            if cpu is not None:
                self._cpus_starting.remove((generation, cpu))
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
        self, generation: int, *, candidate: bool, cpu: int | None
    ) -> WorkerProcess:
        rounds = self.reload_rounds.begun  # it reads the configuration from now on
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socks = {**self.listeners, COORDINATOR: theirs}
        env = handover_env(socks)
        for name in _NOT_FOR_WORKERS:
            env.pop(name, None)
        # A worker does not read the configuration file, which may hold an edit
        # not reloaded (a worker started now would route by it alone) or one
        # refused (it could not start).
        env[RUNNING_CONFIG_ENV] = config_to_json(self.config)
        pem_fds: tuple[int, ...] = ()
        try:
            # Nor the certificate files, which may hold one a reload refused, a
            # renewal half written, a key not of the certificate, nothing: a worker
            # started now (a replacement) loads the certificate and key served
            # now, the bytes checked here, from sealed memfds of its own.
            pem_fds = held_pem(self.serving_pem)
            env[SERVING_PEM_ENV] = ",".join(map(str, pem_fds))
            pem_fds += (memfd_of(self.tickets.ticket_keys, "fleet-ingress tls ticket keys"),)
            env[SERVING_TICKET_KEYS_ENV] = str(pem_fds[-1])
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fleet_ingress",
                "worker",
                "-c",
                str(self.config_path),
                "--generation",
                str(generation),
                *(() if cpu is None else ("--cpu", str(cpu))),
                pass_fds=(*pass_fds(socks), *pem_fds),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
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
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            self._keep(proc.wait())
            raise
        worker = WorkerProcess(proc, generation, key, candidate=candidate, cpu=cpu)
        self.add_worker(worker)
        self.store_fd(channel_key(proc.pid, generation), ours)
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
        if self.notifier is not None:
            self.notifier.remove_fd(channel_key(worker.pid, worker.generation))

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

    @property
    def _pull_every(self) -> float:
        """How far apart the workers are asked for their reports: PULL_EVERY, or
        closer where process.worker_hang_timeout asks it (a sixth of it)."""
        hang = self.hang_timeout
        return min(PULL_EVERY, hang / 6) if hang > 0 else PULL_EVERY

    def _worker_silent(self, key: int, pulls: int, silent_for: float) -> None:
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
            if self.config.log.access:
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
        return {row.pid for row in self.slots.workers if row.unresponsive}

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
        await self._generation_settled.wait()
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

    # -- asking workers ----------------------------------------------------------

    def _keep(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """A task of the supervisor's own: held until done (the loop keeps weak
        references), cancelled at exit."""
        task = asyncio.get_running_loop().create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        task.add_done_callback(self._say_if_failed)
        return task

    def _reload_told(self) -> dict[str, Any]:
        """What a worker's `reload` carries. The configuration applied here, not
        the file: it may have changed since it was read (an editor's second
        save), and a worker reading it again would serve another configuration
        than the host's. And the certificate and key checked here, not the
        files read again."""
        return {
            "config": config_to_json(self.config),
            "pem": pem_to_json(self.serving_pem),
            "ticket_keys": ticket_keys_to_json(self.tickets.ticket_keys),
        }

    def _forget_fleet(self, name: str) -> None:
        """A fleet left the set FORGET_AFTER ago and is not back (`forgetting`):
        the workers drop their records of it, and the counts of workers gone
        keep its ended calls only (under `REMOVED_FLEETS`): by name, both grew
        with every fleet ever named. Another fleet gone and not forgotten yet
        keeps its own: its calls_ended series are shown until then, and folded
        with this one's they went down (the review of session 31)."""
        self.server.forget_fleet(name)
        kept = {f.name for f in self.fleet_set.fleets} | self.forgetting.pending
        fold_fleets_gone(self.view.retired, kept - {name})

    async def close_fleet(self, name: str) -> ClosedElsewhere:
        """`remove-fleet --force`: every worker closes its calls on `name` and
        answers how many (`fleet-closed`); the count is the sum of those
        answers, and a worker that does not answer in CLOSE_ANSWER_WAIT (stopped,
        hung, or of a release before the answer) is named, not counted. The
        calls on it of a worker whose slot channel was lost cannot be told: it
        finishes them on its own (killed at its deadline); how many is said."""
        unreachable = sum(
            1
            for row in self.slots.workers
            if row.channel_lost
            for fleet in row.held.values()
            if fleet.name == name
        )
        answers = await self.asks.ask_workers("close-fleet", CLOSE_ANSWER_WAIT, fleet=name)
        said = {pid: a.get("closed") for pid, a in answers.items()}
        counts = {pid: n for pid, n in said.items() if type(n) is int and n >= 0}
        closed = sum(counts.values())
        died = sorted(pid for pid, a in answers.items() if pid not in counts and a.get("gone"))
        silent = sorted(pid for pid in answers if pid not in counts and pid not in died)
        if silent:
            log.warning(
                "remove-fleet --force: a worker did not say how many calls it closed",
                extra=fields(fleet=name, pids=silent, waited_s=CLOSE_ANSWER_WAIT),
            )
        return ClosedElsewhere(closed, unreachable, silent, died)

    # -- retiring workers (an upgrade's old generation) -----------------------------

    def retire(self, worker: WorkerProcess) -> None:
        """Stop accepting, keep the calls (and the handshakes under way) until
        they end or timeouts.upgrade_drain (unset: timeouts.drain; 0: no
        limit); then the worker exits. Killed if still there well after that."""
        if worker.retiring and worker.left.is_set():
            return
        worker.retiring = True
        drain = self.config.timeouts.upgrade_drain
        if worker.drain_told is None:  # told again (a later upgrade): its first drain holds
            worker.drain_told = self.config.timeouts.old_generation_drain()
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
        timeouts = self.config.timeouts
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

    # -- what it shows -----------------------------------------------------------

    @property
    def host_calls(self) -> int:
        """Slots held on this host now: a call attempt or a live call each."""
        return sum(row.calls for row in self.slots.workers)

    async def refresh(self) -> None:
        """Before `stat`: `fresh_counts`, then what it shows in the crash snapshot."""
        await self.fresh_counts()
        # What `stat` shows, in the snapshot first: a supervisor started after
        # this one's death counts on from it, and no counter a scraper saw goes
        # back (Prometheus would take that for a reset, and the whole count for
        # an increase). The stats listener writes it after each render
        # (`stats_app`'s `shown`): /metrics renders in turns, and may show
        # what came meanwhile.
        self.write_snapshot()

    async def fresh_counts(self) -> None:
        """Before a scrape or `stat`: the workers' counts as of now, what the
        certificate file holds, and edits not reloaded (each wait bounded)."""
        await self.look_at_files()
        await self.server.collect_reports(SCRAPE_WAIT)

    async def look_at_files(self) -> None:
        """What the certificate files, ingress.toml and the fleets file hold
        against what runs (`FilesOnDisk.look`, bounded by its LOOK_WAIT)."""
        await self.files.look(self.config, *self._running_for_look())

    async def look_after_reload(self) -> None:
        """Before a reload is answered (its log line, `fleet-ingress reload`,
        READY=1): the files looked at anew against what runs now, so that `stat`
        and /stats.json after it say what it read (`FilesOnDisk.look_anew`)."""
        await self.files.look_anew(self.config, *self._running_for_look())

    def look_at_files_soon(self) -> None:
        """`look_at_files`, not waited for (for systemd's status line)."""
        self.files.look_soon(self.config, *self._running_for_look())

    def _running_for_look(self) -> tuple[list[FleetSpec], object, CarrierPem]:
        """What runs, for the files to be judged against: the fleets in force,
        what changes when they change otherwise, the certificate served."""
        running = [f.spec for f in self.balancer.fleets if not f.removing]
        return running, (self.reloads["applied"], self.ops.file_writes), self.serving_pem

    def write_snapshot(self) -> None:
        """This supervisor's state in systemd's fd store (`service.fd_store`);
        a failure (a bug) is logged and counted, never raised: a scrape or
        `stat` is answered all the same."""
        if self.snapshots is None:
            return
        try:
            self.snapshots.write(self.upgrade.crash_snapshot())
        except Exception:
            _snapshot_failed()

    async def write_snapshot_in_turns(self) -> None:
        """`write_snapshot`, the state taken at once and encoded in turns: after
        each scrape (`stats_app`'s `shown`: answered once written) and every
        SNAPSHOT_EVERY. Dropped should a state taken after it be written first."""
        if self.snapshots is None:
            return
        try:
            await self.snapshots.write_in_turns(self.upgrade.crash_snapshot)
        except Exception:
            _snapshot_failed()

    def snapshot(self) -> dict[str, Any]:
        """What `stat` and the stats listener show (`service.host_picture`)."""
        return snapshot_of(self)

    def status_line(self) -> str:
        """systemd's STATUS= line (`service.host_picture`)."""
        return status_line_of(self)

    # -- reload and stop ---------------------------------------------------------

    @property
    def certificate_not_after(self) -> float | None:
        """When the certificate served now expires (None: not known)."""
        return None if self.serving_leaf is None else self.serving_leaf.not_after

    async def reload_and_wait(self) -> dict[str, Any]:
        """`fleet-ingress reload`: a reload asked as SIGHUP asks it (RELOADING=1
        and READY=1 to systemd), and how it went: the outcome of the first round
        that begins after it was asked (one under way may have read the files
        before the caller's edit), shared with every ask that round answers."""
        if self.stopping or self.stop_asked.is_set():
            raise FleetChangeError(409, "the ingress is stopping: nothing is reloaded")
        asked: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.reloads_asked.put_nowait(asked)
        return await asked

    def say_certificate_kept(self, problem: str) -> None:
        """The start passed over the certificate on disk (`problem`: what
        `carrier_certificate.kept_certificate` or `kept_over_unloadable` says of
        it) and serves the one the previous process served (before a stop, a
        crash or an upgrade's exec). `stat` and the gauge
        `fleet_ingress_certificate_file_refused` say so too, until the files
        hold one a reload takes (`FilesOnDisk.certificate_refused`)."""
        until = self.serving_leaf.not_after if self.serving_leaf is not None else None
        self.start_notes.append(
            f"the certificate on disk is not served, as a reload would refuse it: {problem}; "
            "the one served before serves on: put a good certificate in place, then "
            "`systemctl reload fleet-ingress`"
        )
        log.warning(
            "the certificate on disk is not served, as a reload would refuse it: the one "
            "served before serves on; put a good certificate in place, then `systemctl "
            "reload fleet-ingress` (a reboot, or a stop then a start, takes the files as "
            "they are)",
            extra=fields(key="tls.cert", problem=problem, served_until=until),
        )

    def answer_pending_reloads(self, why: str) -> None:
        """At stop: every `fleet-ingress reload` still waiting is told, rather than
        holding its admin request (and the supervisor's exit) until it times out."""
        outcome = {**reload_outcome(why), "result": "failed"}
        tell(self.reload_in_hand, outcome)
        while not self.reloads_asked.empty():
            tell([self.reloads_asked.get_nowait()], outcome)

    async def reload(self) -> str:
        """Reload configuration, fleets file and certificate: here, then in every
        worker. Raises ReloadRefused (nothing applied) when anything is invalid."""
        self.reloading = True
        try:
            changes = await self._reload()
        except ReloadRefused as exc:
            self.last_reload = reload_outcome(str(exc))
            self.write_snapshot()  # what a crash restart serves: still the previous one
            await self.look_after_reload()
            raise
        finally:
            self.reloading = False
        self.last_reload = reload_outcome(None, changes)
        if self.edits_hidden:  # `stat` says them, as the reload's answer does
            self.last_reload["edits_hidden"] = self.edits_hidden
        if self.workers_not_reloaded:  # `fleet-ingress reload` must not say it all applied
            self.last_reload["workers_failed"] = {
                str(pid): str(error) for pid, error in self.workers_not_reloaded.items()
            }
        self.write_snapshot()  # what a crash restart serves: this one
        await self.look_after_reload()
        return changes

    def _descriptors_said_short(self, config: IngressConfig) -> str | None:
        """A reload that asks more calls than the descriptor limit holds says
        so, as the start does, once for each [limit, needed] (the workers cap
        at what the limit holds: before, without a word until the next start)."""
        max_connections = config.limits.max_connections
        acme = bool(self.bound_listen.acme)  # :80 as bound at start
        short = descriptors_short(max_connections, acme=acme)
        said, self.descriptors_short = self.descriptors_short, short
        if short is None or short == said:
            return None
        say_descriptors_short(short, max_connections, acme=acme)
        allowed = calls_allowed(short, max_connections, acme=acme)
        return (
            f"limits.max_connections = {max_connections}: the descriptor limit ({short[0]}) "
            f"holds {allowed} calls a worker; raise LimitNOFILE (systemd) to carry them"
        )

    async def _reload(self) -> str:
        try:
            # Off the loop, which answers the workers' slot requests meanwhile:
            # the fleets' TLS context alone reads the system's trust store (20 ms
            # measured), and a file on a slow disk could hold every call's lease.
            config, specs, _, fleet_ssl, leaf, pem = await read_reload_settled(
                self.ops, self.config_path, serving=self.serving_leaf
            )
        except ReloadRefused:
            self.reloads["refused"] += 1
            raise
        # Read again, not with the configuration: a few ms for a few lines.
        file_now = await asyncio.to_thread(file_settings, self.config_path)
        # "auto" counted anew off the loop: /proc/self/mountinfo is read for
        # the cgroup's quota, 30-40 ms on a host of 3000 mounts (a Kubernetes node).
        workers = await asyncio.to_thread(config.process.workers_from)
        notes = listener_notes(self.bound_listen, config) + self._pending_notes(config, workers)
        if settings := settings_changed(self.config, config):
            notes.append(f"applied: {settings}")
        if certificate := reload_note(leaf, self.serving_leaf, pem, self.serving_pem):
            notes.append(certificate)
        self.edits_hidden = edits_hidden(self.file_read, file_now)
        for hidden in self.edits_hidden:
            log.warning(
                "a file edit is not applied: the environment sets its key",
                extra=fields(note=hidden),
            )
        notes += self.edits_hidden
        verified = self.config.fleets.verify
        new_keys = not serves_alike(self.config, self.serving_pem, config, pem)
        if new_keys:
            # Workers build a new carrier context: tickets sealed before must not
            # resume into it (a renewal for a key that leaked).
            self.tickets.ticket_keys = new_ticket_keys()
        self.config = config
        self.serving_leaf = leaf
        self.serving_pem = pem  # what workers started from now on get
        if short := self._descriptors_said_short(config):
            notes.append(short)
        if new_keys:  # before any worker is told: a crash from here takes them up
            self.tickets.store_ticket_keys(self.notifier, self.config, self.serving_pem)
        self.slots.queue_timeout = config.timeouts.queue
        self.slots.max_queue = config.limits.max_queue
        self.slots.fall = config.fleets.fall
        plan = self.fleet_set.apply(
            specs, capacity_aware=config.fleets.capacity_aware, health=Health.INIT
        )
        for fleet in plan.gone:
            self.ops.gone(fleet)
        for fleet in plan.added:
            self.poller.start(fleet)
        notes += plan.notes
        notes += warn_same_host(specs, log)  # said at each reload, as check says it
        notes += unread_variables_said_by_run()  # and so are these
        await self.poller.reconfigure(fleet_ssl, probe_settings(config))
        if verified and not config.fleets.verify:
            _warn_unverified()
        self.server.wake()
        answers = await self.reload_rounds.reload_workers()
        gone = sorted(pid for pid, a in answers.items() if a.get("gone"))
        failed = {
            pid: a.get("error")
            for pid, a in answers.items()
            if not a.get("ok") and not a.get("gone")
        }
        # What `fleet-ingress reload` fails on: a worker that answered it did not
        # reload (it serves its previous files), not one whose outcome is not known.
        self.workers_not_reloaded = {
            pid: a.get("error")
            for pid, a in answers.items()
            if not a.get("ok") and not a.get("unknown") and not a.get("gone")
        }
        for pid, error in failed.items():
            log_not_reloaded(pid, error)
            notes.append(f"worker {pid} did not reload: {error}")
        log.info(
            "workers reloaded",
            extra=fields(
                workers=sorted(set(answers) - set(failed) - set(gone)), failed=failed, gone=gone
            ),
        )
        self.reloads["applied"] += 1
        await asyncio.to_thread(warn_about_chain, config, self.serving_pem)
        return "; ".join(notes) or NOTHING_CHANGED

    def _pending_notes(self, config: IngressConfig, workers: tuple[int, str]) -> list[str]:
        """What of `config` a reload does not apply: compared with the values
        in force (as this image read them when it started, `run` or an
        upgrade's exec; for process.workers, the serving generation's count),
        not with the last reload, so that a change still pending is said again
        and putting the running value back says nothing. `workers`: its
        `workers_from()`, read off the loop."""
        process = config.process
        notes = []
        if process.worker_hang_timeout != self.hang_timeout:
            notes.append(
                "process.worker_hang_timeout changed: takes effect at the next "
                "`fleet-ingress upgrade` or restart"
            )
        count, because = workers
        if count != self.worker_target:
            # "auto" in the file before and now: the unit's CPUQuota= or affinity
            # changed, not process.workers (an operator would look for an edit).
            what = (
                'process.workers = "auto" counts anew'
                if process.workers == "auto" == self.config.process.workers
                else "process.workers changed"
            )
            notes.append(
                f"{what}: takes effect at the next `fleet-ingress upgrade` "
                f"(its new generation) or restart: {because}, not the "
                f"{self.worker_target} serving"
            )
        if process.cpu_affinity != self.cpu_affinity:
            notes.append(
                "process.cpu_affinity changed: takes effect at the next `fleet-ingress "
                "upgrade` (its new generation) or restart; a worker started meanwhile "
                "to replace one runs as the others do"
            )
        return notes

    async def stop_accepting(self) -> None:
        """Workers close their listeners, then this process its own: from then
        on the kernel refuses new connections."""
        self.stopping = True
        for worker in list(self.workers.values()):
            self._stop_if_starting(worker)
            self._stop_without_channel(worker)
        await self.asks.ask_workers("stop", STOP_ANSWER_TIMEOUT)
        for sock in self.listeners.values():
            # shutdown() stops the socket listening in every process that holds
            # it, a worker that did not answer included; close() only drops ours.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

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

    async def close(self) -> None:
        if self._puller is not None:
            self._puller.cancel()
        await self.poller.close()
        await self._web.close()
        for sock in (self._stats_sock, self.kept_admin_socket.sock):
            if sock is not None:
                sock.close()
        self.kept_admin_socket.remove_own()
        await self.server.close()
        self.files.close()
        for task in list(self._watchers):
            task.cancel()

    def kill_workers(self) -> None:
        for worker in self.workers.values():
            worker.kill()


def _warn_unverified() -> None:
    """fleets.verify = false, at start and when a reload turns it off."""
    log.warning(
        "fleets.verify = false: fleet certificates are not checked, so anyone on the "
        "path to a fleet can read and alter calls; prefer fleets.ca_file for a private CA"
    )


def pick_cpu(allowed: Sequence[int], taken: Iterable[int]) -> int:
    """The CPU of `allowed` with the fewest workers on it (`taken`: a CPU per
    live worker), the first in `allowed` on a tie; CPUs no longer allowed count
    for nothing."""
    load = Counter(cpu for cpu in taken if cpu in allowed)
    return min(allowed, key=lambda cpu: load[cpu])


def respawn_delay(quick_deaths: int) -> float:
    """Before starting the replacement of a worker, after `quick_deaths` deaths
    in a row each within QUICK_DEATH of its start: at once for a lone crash
    (its calls' replacement must not wait), then doubling, capped."""
    if quick_deaths <= 1:
        return 0.0
    return float(min(RESPAWN_DELAY_FIRST * 2 ** (quick_deaths - 2), RESPAWN_DELAY_MAX))


def _snapshot_failed() -> None:
    """A crash snapshot not written (a bug): logged and counted, never raised."""
    count_unexpected_error()
    log.exception("the supervisor's state could not be written for its successor")
