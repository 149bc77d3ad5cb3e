"""`fleet-ingress run`: the supervisor, systemd's main PID (SPEC 11, 13).

It binds the carrier and ACME listeners once and keeps them open while it
runs; `process.workers` worker processes (`service.worker`) inherit them and
serve every carrier. Nothing of a call runs here. What is here is one
host's view of its fleets: the slot coordinator (`HostSlots` behind
`SlotServer`: maxconn, leastconn and the FIFO queue for the host, one
channel per worker), the health poller (each fleet probed once per interval
for the host), the admin socket and the stats listener, signals and sd_notify.
The workers' lives (started, watched, replaced when they die, retired,
stopped; the generation serving and how many workers it should have) are
its pool's (`service.worker_pool`, `self.pool`).

- Stats and metrics cover the host: the fleets' state is this process's, the
  per-call counters are the workers', summed from their reports
  (`ops.host_stats`: pulled every few seconds and at every scrape).
- SIGHUP: the configuration, fleets file and certificate are checked here
  first (an invalid one is refused whole), applied to the fleet set, the
  poller and the slot table, then every worker reloads its certificate and
  settings (`reload` on its channel, answered `reloaded`), the configuration
  applied here sent with it (not read again from the file, which may have
  changed since); a worker still starting is told once it serves. READY=1
  once all have answered. Calls are untouched. The reload's steps are
  `service.host_reload`'s.
- SIGTERM/SIGINT: every worker stops accepting (`stop`, answered
  `stopping`), the listeners close here too, so new connections are refused;
  the workers drain their calls for `timeouts.drain`; this process exits 0
  after the last one. A second signal cuts every call (`stop` with `cut`).
- `remove-fleet --force` sends `close-fleet` to every worker.
- Upgrade (`fleet-ingress upgrade`, SIGUSR2): this process re-executes
  itself (same PID), its workers serving on, and starts a new generation.
  The sequence, both images' sides of it, is `service.upgrade_sequence`
  (`UpgradeSequence`, `self.upgrade`); it has the supervisor's pool start,
  watch and retire the workers (`spawn`, `add_worker`, `retire`).

The process around it (`run_supervisor`: the signals, what systemd is told,
the background tasks) is `service.supervisor_process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fleet_ingress.config.settings import (
    IngressConfig,
    config_to_json,
    file_text,
    settings_of_text,
)
from fleet_ingress.core.addresses import parse_hostport
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.core.host_view import HostView, ReportError
from fleet_ingress.logs import fields
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.event_loop import count_unexpected_error
from fleet_ingress.net.listener import bind_errors_named, bind_tcp
from fleet_ingress.net.poller import HealthPoller
from fleet_ingress.net.slot_server import SlotServer, channel_key
from fleet_ingress.net.tls import CarrierPem, fleet_ssl_context
from fleet_ingress.ops.admin_server import (
    admin_app,
    bind_admin_socket,
)
from fleet_ingress.ops.fleet_ops import (
    CLOSE_ANSWER_WAIT,
    ClosedElsewhere,
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
from fleet_ingress.ops.reload_outcome import (
    ReloadAsked,
)
from fleet_ingress.ops.stats_server import stats_app
from fleet_ingress.ops.web_sites import OperatorConnectionsCollector, WebSites
from fleet_ingress.service.admin_socket import KeptAdminSocket
from fleet_ingress.service.carrier_certificate import (
    carrier_ssl_context,
    pem_to_json,
    read_carrier_pem,
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
from fleet_ingress.service.host_reload import (
    answer_pending_reloads,
    reload_and_wait,
    reload_host,
    say_certificate_kept,
    warn_unverified,
)
from fleet_ingress.service.ingress import (
    probe_settings,
    warn_same_host,
)
from fleet_ingress.service.kept_running import TaskFailures, kept_running, say_if_failed
from fleet_ingress.service.listen_fds import worker_key
from fleet_ingress.service.oom_verdict import (
    OomVerdict,
)
from fleet_ingress.service.reexec_steps import step_done
from fleet_ingress.service.reload_rounds import ReloadRounds
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.store_keeping import StoreTakenUp, fd_store_picture
from fleet_ingress.service.ticket_keys import SessionTicketKeys
from fleet_ingress.service.upgrade_sequence import STARTS_SETTLE, UpgradeSequence, close_unused
from fleet_ingress.service.worker_asks import WorkerAsks
from fleet_ingress.service.worker_calls import WorkerCalls
from fleet_ingress.service.worker_pool import WorkerPool
from fleet_ingress.service.worker_process import WorkerProcess

_T = TypeVar("_T")
log = logging.getLogger("fleet_ingress.lifecycle")
server_log = logging.getLogger("fleet_ingress.server")  # where "listening" was always said

# A fleet gone from the set is forgotten by the workers this long after (its
# counters then start from 0 if it is listed again): one listed again sooner,
# taken out for maintenance or by a reload that put it back, counts on. Done at
# once, its counters dropped as each worker read the op, in steps while it was
# listed again: Prometheus reads a drop to anything but 0 as a reset and adds a
# false increase (the review of session 25).
FORGET_AFTER = 300.0
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


class Supervisor:
    """The coordinator: builds the host's parts (the fleet set, the slot table
    and its server, the poller, the workers' pool, the upgrade), wires them,
    and runs the start, the reloads and the stop across them."""

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
        self.workers_not_reloaded: dict[int, object] = {}  # by the last reload applied here
        # The asks the reload round under way answers (`_reload_on_signal`).
        self.reload_in_hand: list[ReloadAsked] = []
        self.reloads: Counter[str] = Counter()
        self.last_reload: dict[str, Any] | None = None  # shown by stat while it was refused
        # The configuration file as this image read it when it started, with
        # the environment it keeps: what a reload's edits are told against,
        # where the environment hides them (`edits_hidden`). Not the last
        # reload's: an edit still hidden is said again at each reload, as
        # `host_reload._pending_notes` says a change still pending (told
        # against the last reload, a second reload said "nothing changed" and
        # `stat` dropped its EDITS NOT APPLIED line, the edit still not served).
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
        # Supervisors before this one that died, taken up (the fd store): carried.
        self.supervisor_deaths = 0
        # Of those, the ones the kernel's OOM killer took, as far as its count says;
        # of these, the ones said "possibly" (a count that takes in other
        # processes', the kernel's log unread): carried, so stat says it as the log did.
        self.supervisor_oom_kills = 0
        self.supervisor_oom_kills_possibly = 0
        # [descriptor limit, descriptors needed] when short (cli), carried over an exec.
        self.descriptors_short: list[int] | None = None
        # What the image before this one left of systemd's fd store, until taken up.
        self.store_taken_up = StoreTakenUp()
        # Whether a worker dead of SIGKILL was the kernel's OOM killer's (`service.oom_verdict`).
        self.oom_verdict = OomVerdict()
        # Background tasks of this process that failed (kept running: kept_running).
        self.task_failures = TaskFailures(BACKGROUND_TASKS)
        self._say_if_failed = say_if_failed(self.task_failures)  # for each `_keep` task
        workers: dict[int, WorkerProcess] = {}  # by channel key
        self.asks = WorkerAsks(self.server, workers)  # the ops sent them, answered
        self.calls = WorkerCalls(self.asks, self.server, workers)  # `calls`, `end-call`
        # The workers' side of each reload: told the configuration applied here.
        self.reload_rounds = ReloadRounds(self.asks, workers, self._keep, self._reload_told)
        # The workers' lives: started, watched, replaced, retired, stopped.
        self.pool = WorkerPool(
            self,
            workers,
            server=self.server,
            slots=self.slots,
            view=self.view,
            asks=self.asks,
            reload_rounds=self.reload_rounds,
            oom_verdict=self.oom_verdict,
            task_failures=self.task_failures,
            keep=self._keep,
        )
        self.metrics = HostMetrics(
            self.slots,
            self.view,
            certificate_not_after=lambda: self.certificate_not_after,
            reloads=lambda: self.reloads,
            restarts=lambda: self.pool.restarts,
            calls_lost=lambda: self.pool.calls_lost_total,
            task_failures=lambda: self.task_failures.by_task,
            supervisor_deaths=lambda: self.supervisor_deaths,
            supervisor_oom_kills=lambda: self.supervisor_oom_kills,
            worker_oom_kills=lambda: self.pool.worker_oom_kills,
            # a snapshot taken as it is built: no notifier yet
            fd_store=lambda: fd_store_picture(getattr(self, "notifier", None)),
            fleets_gone=lambda: self.forgetting.pending,
            upgrade_failed=lambda: last_upgrade_failed(self),
            workers=self.pool.workers_figures,
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
            on_down=self.server.fleet_down,
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
        self.server.handlers["reloaded"] = self.asks.answered
        self.server.handlers["stopping"] = self.asks.answered
        self.server.handlers["fleet-closed"] = self.asks.answered
        self.server.handlers["calls-listed"] = self.calls.calls_listed
        self.server.handlers["call-ended"] = self.asks.answered
        self.bound_listen = config.listen
        self.listeners: dict[str, socket.socket] = {}  # by config key: listen.wss, listen.acme
        # SIGTERM/SIGINT received (run_supervisor waits on it): `stopping`
        # follows a loop turn later.
        self.stop_asked = asyncio.Event()
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
        # The image before this one (an upgrade's exec) or the supervisor that
        # died (systemd's fd store) handed over its listeners: they are served
        # where they were bound (`bound_listen`), whatever listen.* says now.
        self.listeners_carried = any(name.startswith("listen.") for name in self.handed)
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
        for worker in list(self.pool.workers.values()):
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
        # After an upgrade's exec, no call waiting in a worker for a slot is
        # answered until the slot table is rebuilt: it is rebuilt beside the
        # rest of the start (the workers answer while the settings are read,
        # the probes begin and the stats and admin sites are served), not
        # after it; and a worker slow to answer holds none of that back.
        # After a crash the first probes come first (`adopt_workers` waits).
        # `self.handed` is the start's alone: the restore is given the
        # channels, which stay in it until they are the workers' (a failed
        # resume's drain closes what is left there).
        restoring: asyncio.Task[None] | None = None
        channels: dict[str, socket.socket] = {}
        if self.upgrade.resumed and not self.upgrade.crash_restart:
            channels = {name: sock for name, sock in self.handed.items() if worker_key(name)}
            restoring = self._restore_slot_table(channels)
        try:
            await self._serve_operators()
        except BaseException as exc:
            if restoring is not None:  # never left paused, nor its task unawaited
                restoring.cancel()
                (ended,) = await asyncio.gather(restoring, return_exceptions=True)
                if ended is None:  # it was done: the channels are the workers'
                    self._channels_adopted(channels)
                elif isinstance(ended, Exception):
                    _say_restore_failed_too(exc, ended)
            raise
        if self.upgrade.resumed:
            step_done("listeners served")
            self.pool.generation_settled.clear()
            try:
                if restoring is not None:
                    await restoring
                    self._channels_adopted(channels)
                    close_unused(self.handed)  # none but a listener no longer configured
                else:
                    await self.upgrade.adopt_workers(self.handed)
                self.handed = {}
                # What this image runs, before its generation starts: until now
                # the store has the previous image's (another certificate,
                # another configuration: what a crash from here would serve).
                self.write_snapshot()
                await self.upgrade.finish_upgrade()
            finally:
                self.pool.generation_settled.set()
                self.upgrade.table_restored.set()  # also if adopting failed: never hang a change
            # Replacements the previous image had not started yet (a worker
            # died shortly before the exec): due as they were.
            now = time.monotonic()
            for due in self.upgrade.take_carried_respawns():
                self.pool.schedule_respawn(max(0.0, due - now))
        else:
            # "auto" off the loop, which serves the admin and stats sockets and the
            # first probes meanwhile: behind a cgroup namespace over the host's
            # cgroupfs the CPU quota's group is looked for through up to 5000
            # groups' cgroup.procs (core.cgroups.locate: 0.2-0.5 s measured).
            count, because = await asyncio.to_thread(self.config.process.workers_from)
            self.pool.worker_target, self.pool.workers_from = count, because
            started = [await self.pool.spawn(self.pool.generation) for _ in range(count)]
            await self.pool.wait_serving(started)
            log.info(
                "workers serving",
                extra=fields(
                    workers=[w.pid for w in started],
                    generation=self.pool.generation,
                    configured=self.config.process.workers,
                    count=because,
                ),
            )
        # Bounds what a worker's crash loses of its counts (a scrape asks afresh too).
        self._puller = asyncio.get_running_loop().create_task(
            kept_running(
                REPORT_PULLER,
                lambda: pull_reports(
                    self.server, every=self._pull_every, on_silent=self.pool.worker_silent
                ),
                self.task_failures,
            )
        )

    async def _serve_operators(self) -> None:
        """`start`'s first part: the settings as read, the probes, the warnings,
        the listeners and the stats and admin sites."""
        if not self.file_read_carried:
            self.file_read_text = await asyncio.to_thread(file_text, self.config_path)
        self.file_read = await asyncio.to_thread(settings_of_text, self.file_read_text)
        step_done("settings read")
        if not self.tickets.ticket_keys_stored:  # before any worker is handed them
            self.tickets.store_ticket_keys(self.notifier, self.config, self.serving_pem)
            self.tickets.ticket_keys_stored = True
        for fleet in self.balancer.fleets:
            self.poller.start(fleet)
        self.forgetting.start()  # the waits the previous image carried (an upgrade, a crash)
        if not self.config.fleets.verify:
            warn_unverified()
        warn_same_host((fleet.spec for fleet in self.balancer.fleets), log)
        warn_about_chain(self.config, self.serving_pem)  # what is served: kept, maybe
        step_done("probes started, warnings")
        # After a re-execution the sockets are the previous image's, never closed;
        # they stay where they were bound (a changed listen.* waits for a restart).
        listen = self.bound_listen if self.listeners_carried else self.config.listen
        kept = "kept over the upgrade" if self.listeners_carried else None
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
            step_done("stats site")
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

    def _restore_slot_table(self, channels: dict[str, socket.socket]) -> asyncio.Task[None]:
        """After an upgrade's exec: every kept worker channel served again and
        the slot table rebuilt from what the workers hold
        (`UpgradeSequence.adopt_workers`), in a task beside the rest of the
        start; the table grants from then on. What its end undoes is done as
        the task ends, however it ends (`_slot_table_restore_ended`): a task
        cancelled before its first step runs none of its coroutine, and a
        `finally` there would not run."""
        self.pool.generation_settled.clear()
        restoring = asyncio.get_running_loop().create_task(
            self.upgrade.adopt_workers(channels), name="restore slot table"
        )
        restoring.add_done_callback(self._slot_table_restore_ended)
        return restoring

    def _slot_table_restore_ended(self, restoring: asyncio.Task[None]) -> None:
        """The restore's task ended: the garbage collector on again (off since
        the exec, `reexec_steps.collector_off_over_exec`); failed or
        cancelled, nothing waits on it any longer (a change waits for
        `table_restored`). Its channels stay in `handed` (`start`): a failed
        resume's drain closes them, and a worker not taken up yet sees its
        channel end and drains on its own."""
        gc.enable()
        if restoring.cancelled() or restoring.exception() is not None:
            self.pool.generation_settled.set()
            self.upgrade.table_restored.set()  # also if adopting failed: never hang a change

    def _channels_adopted(self, channels: dict[str, socket.socket]) -> None:
        """The restore took up `channels`: the slot server's now, out of
        `handed` (a failed resume's drain closes what is left there)."""
        for name in channels:
            del self.handed[name]

    def sockets_to_keep(self) -> dict[str, socket.socket]:
        """The listeners, stats and admin sockets, by the name the next image
        takes them by (an upgrade's exec keeps them)."""
        socks: dict[str, socket.socket] = dict(self.listeners)
        if self._stats_sock is not None:
            socks["listen.stats"] = self._stats_sock
        if self.kept_admin_socket.sock is not None:
            socks["listen.admin_socket"] = self.kept_admin_socket.sock
        return socks

    @property
    def _pull_every(self) -> float:
        """How far apart the workers are asked for their reports: PULL_EVERY, or
        closer where process.worker_hang_timeout asks it (a sixth of it)."""
        hang = self.pool.hang_timeout
        return min(PULL_EVERY, hang / 6) if hang > 0 else PULL_EVERY

    # -- its tasks, the workers' reload, the fleets gone --------------------------

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
        keep its counters (calls ended, tunneled, answers, retries) under
        `REMOVED_FLEETS`, the (removed) row of stat and /stats: by name, both grew
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
        certificate file holds, and edits not reloaded (each wait bounded; a
        worker yet to answer a report asked before is not waited for: its last
        report is shown, said overdue once it is)."""
        await self.look_at_files()
        await self.server.collect_reports(SCRAPE_WAIT, silent_too=False)

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
        """`fleet-ingress reload`: a reload asked as SIGHUP asks it, and how it
        went (`host_reload.reload_and_wait`)."""
        return await reload_and_wait(self)

    def say_certificate_kept(self, problem: str) -> None:
        """The start serves the certificate served before, not the one on disk
        (`host_reload.say_certificate_kept`)."""
        say_certificate_kept(self, problem)

    def answer_pending_reloads(self, why: str) -> None:
        """At stop: every `fleet-ingress reload` still waiting is told
        (`host_reload.answer_pending_reloads`)."""
        answer_pending_reloads(self, why)

    async def reload(self) -> str:
        """Reload configuration, fleets file and certificate: here, then in every
        worker (`host_reload.reload_host`). Raises ReloadRefused (nothing
        applied) when anything is invalid."""
        return await reload_host(self)

    async def stop_accepting(self) -> None:
        """Workers close their listeners, then this process its own: from then
        on the kernel refuses new connections."""
        await self.pool.stop_accepting()
        for sock in self.listeners.values():
            # shutdown() stops the socket listening in every process that holds
            # it, a worker that did not answer included; close() only drops ours.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

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


def _say_restore_failed_too(error: BaseException, restore_error: Exception) -> None:
    """The start's own part failed after an upgrade's exec (`error`, raised on
    and logged by the drain that follows) and the slot table's restore beside
    it failed too: its error said here, or nothing would say why the workers'
    channels could not be taken up."""
    log.error(
        "after the upgrade's re-execution the workers' slot channels could not be taken up "
        "either, beside the start's own failure (start_error): the workers drain their calls "
        "as after that one; reinstall the release that ran, then start the service (a bug: "
        "report it with this traceback)",
        extra=fields(error=repr(restore_error), start_error=repr(error)),
        exc_info=restore_error,
    )


def _snapshot_failed() -> None:
    """A crash snapshot not written (a bug): logged and counted, never raised."""
    count_unexpected_error()
    log.exception("the supervisor's state could not be written for its successor")
