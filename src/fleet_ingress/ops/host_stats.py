"""The host-wide `stat`, `/stats`, `/stats.json` and `/metrics` of a supervisor
with worker processes (SPEC 12, 13; docs/WORKERS.md "Stats and metrics").

Workers count; the supervisor pulls their counts over the slot channel and
sums them (`core.host_view.HostView`); the fleets' state (health, admin,
slots, capacity, the queue) is the supervisor's own (`HostSlots`). Both are
rendered through the same functions as the one-process ingress
(`ops.snapshot.render`, `ops.metrics`), so names, labels and JSON keys are
the same, plus a row per worker.

Wiring, supervisor side::

    view = HostView()                       # or HostView.from_json(carried, time.monotonic())
    server = SlotServer(slots, view=view)   # every "report" goes in, a worker gone is retired
    metrics = HostMetrics(slots, view, certificate_not_after=..., reloads=...,
                          restarts=lambda: restarts_by_reason)
    poller = HealthPoller(..., on_probe=metrics.checks.check_observed)
    puller = asyncio.create_task(pull_reports(server))          # every few seconds
    fresh = lambda: server.collect_reports(SCRAPE_WAIT)         # at every scrape
    snapshot = lambda: host_snapshot(slots, view, started_at=..., ...)
    stats_app(snapshot, metrics.prometheus, refresh=fresh)
    admin_app(ops, snapshot, refresh=fresh)
    # re-exec: carry view.to_json(time.monotonic()); after finish_restore():
    #   view.retire_absent({(w.pid, w.generation) for w in slots.workers})

Worker side::

    client.reporter = WorkerReporter(registry, lambda: client.fleets.values(),
                                     metrics.histograms, draining=lambda: stopping)
    ...drained: client.send_report(final=True); client.close(); await client.lost
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.host_slots import HostSlots, WorkerRow
from fleet_ingress.core.host_view import HostView, Key, WorkerId
from fleet_ingress.logs import lines_dropped
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.event_loop import sleep_to_tick, unexpected_errors
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.ops.local_counts import (
    Observed,
    add_forgotten,
    fold_ended_of_fleets_gone,
    local_counts,
)
from fleet_ingress.ops.metrics import PREFIX, FleetChecks, _ProcessCollector, _StateCollector
from fleet_ingress.ops.snapshot import render
from fleet_ingress.release import code_digest

__all__ = [
    "PULL_EVERY",
    "SCRAPE_WAIT",
    "HostMetrics",
    "HostView",
    "WorkerReporter",
    "host_snapshot",
    "pull_reports",
]

# How often the supervisor asks each worker for its report (a worker also
# sends one within slot_client.REPORT_AFTER_COUNT of counting, and a scrape
# asks afresh): the pace at which a hung worker is found.
PULL_EVERY = 5.0
# fleet_ingress_worker_restarts_total{reason}: service.worker_exits.restart_reason and hung.
RESTART_REASONS = ("crashed", "exited", "hung", "killed", "oom", "unknown")
# How long a scrape or `stat` waits for the workers' fresh counts (a healthy
# worker answers in milliseconds); a worker busy past it is shown with its last
# report (its age is in the row and in a metric), and one yet to answer a
# report asked before is not waited for at all (a stopped worker slows one read
# at most; it is shown overdue after `core.host_slots.REPORT_OVERDUE`). It was
# 0.5 s, waited on every stopped worker: /stats.json and /metrics took 0.5 s
# each while one was (session 40's host-view audit).
SCRAPE_WAIT = 0.1

_TICKS = float(os.sysconf("SC_CLK_TCK"))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        return next(float(line.split()[1]) for line in f if line.startswith(b"btime "))


class _OwnStat:
    """/proc/self/stat, opened at the first read and read again with one pread:
    a worker reads it for each report (every second while it holds calls), and
    opening it each time took nine system calls, and /proc/stat's boot time
    nine more, read again for a start time no report used (the idle audit of
    session 39). A worker out of descriptors (EMFILE) still reports its CPU
    and memory. A forked child opens its own (the inherited one names its parent)."""

    fd: int | None = None

    @classmethod
    def read(cls) -> bytes:
        if cls.fd is None:
            cls.fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(cls.fd, 4096, 0)

    @classmethod
    def forget(cls) -> None:
        if cls.fd is not None:
            os.close(cls.fd)  # the child's copy
            cls.fd = None


os.register_at_fork(after_in_child=_OwnStat.forget)


def _process_start() -> float:
    """When this process started (seconds since the epoch), from /proc."""
    parts = _OwnStat.read().rpartition(b")")[2].split()
    return float(parts[19]) / _TICKS + _boot_time()


def _process_figures() -> dict[str, float]:
    """{cpu_seconds, resident_bytes} of this process, from /proc/self/stat."""
    parts = _OwnStat.read().rpartition(b")")[2].split()
    cpu = (float(parts[11]) + float(parts[12])) / _TICKS
    return {"cpu_seconds": cpu, "resident_bytes": float(parts[21]) * _PAGE}


class WorkerReporter:
    """A worker's `SlotClient.reporter`: its counts, live calls, draining flag
    and process figures, read when the supervisor asks."""

    def __init__(
        self,
        registry: Registry,
        fleets: Callable[[], Iterable[FleetState]],
        histograms: Mapping[Key, Observed],
        *,
        draining: Callable[[], bool] = lambda: False,
        forgotten: Callable[[], Mapping[tuple[str, ...], int]] = dict,
    ) -> None:
        """`forgotten`: the call counters of the fleets this worker has
        forgotten, summed (`SlotClient.forgotten`)."""
        self.registry = registry
        self.forgotten = forgotten
        self.fleets = fleets
        self.histograms = histograms
        self.draining = draining
        self.started = _process_start()

    def __call__(self) -> dict[str, Any]:
        try:
            process = _process_figures()
        except OSError:  # out of descriptors (EMFILE): the counts matter most then
            process = {}
        fleets = list(self.fleets())
        # Calls ended on fleets this worker has forgotten (SlotClient.fleets)
        # count under REMOVED_FLEETS: the report names only the fleets it has.
        fold_ended_of_fleets_gone(self.registry, {fleet.name for fleet in fleets})
        counts = local_counts(self.registry, fleets, self.histograms)
        add_forgotten(counts, self.forgotten())
        counts.counters[("log_lines_dropped",)] = lines_dropped()
        counts.counters[("unexpected_errors",)] = unexpected_errors()
        return {
            "started": self.started,
            "code": code_digest(),
            "calls": len(self.registry.calls),
            "draining": self.draining(),
            "process": process,
            "counts": counts.to_wire(),
        }


def calls_bytes(registry: Registry) -> list[list[int]]:
    """[[lease id, bytes from the carrier, bytes to it], ...] of the calls
    holding a slot through the coordinator (`SlotClient.calls_bytes`)."""
    said = []
    for call in registry.calls:
        lease_id = getattr(call.lease, "id", None)
        if type(lease_id) is int:
            said.append([lease_id, call.bytes_from_carrier, call.bytes_to_carrier])
    return said


async def pull_reports(
    server: SlotServer,
    every: float = PULL_EVERY,
    on_silent: Callable[[int, int, float], None] | None = None,
) -> None:
    """Ask every worker for its report every `every` seconds, for ever (a task
    the supervisor cancels as it stops): bounds what a crash loses. A worker
    that has not answered by the end of a round is told to `on_silent`
    (channel key, requests in a row unanswered, seconds since it was first
    found so). A supervisor that was itself stopped asked nothing meanwhile:
    its workers' silence starts when it asks again."""
    while True:
        await sleep_to_tick(every)  # with the supervisor's other clock work: one wake-up
        await server.collect_reports(timeout=every)
        for key, pulls, silent_for in server.count_silent(time.monotonic()):
            if on_silent is not None:
                on_silent(key, pulls, silent_for)


def worker_state(
    draining: bool | None, *, channel_lost: bool, unresponsive: bool = False
) -> str | None:
    """What `stat` and /stats say a worker does: serving, draining (an old
    generation, or a stop), draining with its slot channel lost, unresponsive
    (it answers no report request: hung or stopped); None before its first report."""
    if channel_lost:
        return "draining, channel lost"
    if unresponsive:
        return "unresponsive"
    return None if draining is None else "draining" if draining else "serving"


def worker_rows(slots: HostSlots, view: HostView, now: float) -> list[dict[str, Any]]:
    """A row per live worker: the coordinator's (pid, generation, calls holding a
    slot now) and its last report's (connections, draining, started, age)."""
    reported = {(w.pid, w.generation): w for w in view.workers(now)}
    held = {(r.pid, r.generation): r.calls for r in slots.workers}
    reserved = {(r.pid, r.generation): reserved_slots(r) for r in slots.workers}
    # Its channel ended while it runs: it finishes its calls, its slots still counted.
    lost = {(r.pid, r.generation) for r in slots.workers if r.channel_lost}
    stuck = {(r.pid, r.generation) for r in slots.workers if r.stuck}
    overdue = {
        (r.pid, r.generation) for r in slots.workers if not r.channel_lost and r.report_overdue
    }
    rows = []
    for worker in sorted(held.keys() | reported.keys()):
        seen = reported.get(worker)
        draining = True if worker in lost else None if seen is None else seen.draining
        rows.append(
            {
                "pid": worker[0],
                "generation": worker[1],
                "calls": held.get(worker, seen.calls if seen else 0),
                "connections": None if seen is None else seen.connections,
                "closing_calls": None if seen is None else seen.closing_calls,
                # Slots held for its standing grant budget (a lone worker's, by
                # default, session 46; INGRESS_STANDING_BUDGETS's), by fleet
                # (those it has left there): in the fleets' `reserved`.
                "reserved": sum(reserved.get(worker, {}).values()),
                "reserved_by_fleet": reserved.get(worker, {}),
                "draining": draining,
                "channel_lost": worker in lost,
                "state": worker_state(
                    draining, channel_lost=worker in lost, unresponsive=worker in stuck
                ),
                "started": None if seen is None else seen.started,
                "last_report_age_s": None if seen is None else round(seen.last_report_age, 1),
                # A report asked of it went unread REPORT_OVERDUE: its counts are
                # its last report's (`last_report_age_s` old).
                "report_overdue": worker in overdue,
                "cpu_seconds": None if seen is None else seen.process.get("cpu_seconds"),
                "resident_bytes": None if seen is None else seen.process.get("resident_bytes"),
                "code": None if seen is None else seen.code,
                # Draining: seconds until the calls still up there are closed
                # (`with_drain_end`; None: not draining, or no limit).
                "drain_ends_in_s": None,
            }
        )
    return rows


def reserved_slots(row: WorkerRow) -> dict[str, int]:
    """A worker's standing grant budget left, fleet name -> slots (none at 0):
    the slots the table holds for it (`FleetState.standing` summed over the
    workers), taken back at "budget-end" only once it said it dropped them."""
    if row.standing is None:
        return {}
    return {name: n for name, n in sorted(row.standing.slots().items()) if n > 0}


def with_drain_end(row: dict[str, Any], ends_in: float | None) -> None:
    """A draining worker's row (an upgrade's old generation, or one whose
    channel was lost): when the calls still up there are closed, in `state`
    too; `ends_in` None: no limit (timeouts.upgrade_drain = 0), each call
    ends on its own."""
    state = row.get("state") or "draining"
    if ends_in is None:
        row["drain_ends_in_s"] = None
        row["state"] = f"{state}, until its calls end"
        return
    left = max(0, round(ends_in))
    row["drain_ends_in_s"] = left
    row["state"] = f"{state}, calls closed in {_span(left)}"


def _span(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def host_snapshot(
    slots: HostSlots,
    view: HostView,
    *,
    started_at: float,
    certificate_not_after: float | None = None,
    capacity_key: str = "fleet_available",
    stopping: bool = False,
    last_reload: dict[str, Any] | None = None,
    acme_listening: bool = True,
) -> dict[str, Any]:
    """`/stats.json` and `stat` for the whole host: the same keys as the
    one-process ingress's, plus `workers` (a row per worker)."""
    return render(
        slots.balancer.fleets,
        view.totals(),
        queue_length=slots.queue_length,
        queue_timeouts=slots.queue_timeouts,
        started_at=started_at,
        certificate_not_after=certificate_not_after,
        capacity_key=capacity_key,
        stopping=stopping,
        workers=worker_rows(slots, view, time.monotonic()),
        last_reload=last_reload,
        acme_listening=acme_listening,
    )


class HostMetrics:
    """`/metrics` for the whole host: the fleets' state from `slots`, the
    workers' counters and histograms summed from `view` (the one-process
    ingress's names and labels), per-worker gauges by pid and generation, and
    the supervisor's own process_* and probe durations."""

    def __init__(
        self,
        slots: HostSlots,
        view: HostView,
        *,
        certificate_not_after: Callable[[], float | None] = lambda: None,
        reloads: Callable[[], Mapping[str, int]] = dict,
        restarts: Callable[[], Mapping[str, int]] = dict,
        calls_lost: Callable[[], int] = lambda: 0,
        workers: Callable[[], tuple[int, int]] = lambda: (0, 0),
        certificate_file_not_after: Callable[[], float | None] = lambda: None,
        certificate_file_refused: Callable[[], bool | None] = lambda: None,
        certificate_chain_doubted: Callable[[], bool | None] = lambda: None,
        task_failures: Callable[[], Mapping[str, int]] = dict,
        fleets_gone: Callable[[], Collection[str]] = frozenset,
        upgrade_failed: Callable[[], bool | None] = lambda: None,
        supervisor_deaths: Callable[[], int] = lambda: 0,
        supervisor_oom_kills: Callable[[], int] = lambda: 0,
        worker_oom_kills: Callable[[], int] = lambda: 0,
        fd_store: Callable[[], Mapping[str, Any] | None] = lambda: None,
    ) -> None:
        """`restarts`: workers replaced, by why (e.g. {"crashed": 2, "killed": 1});
        `calls_lost`: the calls those workers took with them; `workers`: the
        serving generation's workers serving, and how many it should have;
        `certificate_file_not_after`: when the certificate in tls.cert expires
        (None: not read), which a renewal not loaded makes later than the one served;
        `certificate_file_refused`: whether a reload would refuse it (None: not read);
        `certificate_chain_doubted`: whether carriers may fail to verify the chain
        of the certificate served (None: not judged yet);
        `task_failures`: the supervisor's background tasks that failed (and were
        started again), by task; `fleets_gone`: fleets out of the set not yet
        forgotten, whose calls ended are still shown (their last ones are
        reported after they leave); `upgrade_failed`: whether the last upgrade
        failed (None: none since the supervisor started, or carried to it);
        `supervisor_deaths`: supervisors that died and were started again by
        systemd, taking up their workers (carried from each to the next);
        `supervisor_oom_kills`: of those, the ones the kernel's OOM killer took;
        `worker_oom_kills`: workers the kernel's OOM killer took, whatever their
        generation (an upgrade's old one draining is not replaced: not in
        `restarts`)."""
        self.prometheus = CollectorRegistry(auto_describe=True)
        _ProcessCollector(registry=self.prometheus)
        self.checks = FleetChecks(self.prometheus)
        self.prometheus.register(
            _StateCollector(
                lambda: slots.balancer.fleets,
                view.totals,
                lambda: (slots.queue_length, slots.queue_timeouts),
                certificate_not_after,
                reloads,
                histograms=True,
                ended_of_gone=fleets_gone,
            )
        )
        self.prometheus.register(
            _WorkersCollector(slots, view, restarts, calls_lost, workers, worker_oom_kills)
        )
        self.prometheus.register(
            _CertificateFileCollector(
                certificate_file_not_after, certificate_file_refused, certificate_chain_doubted
            )
        )
        self.prometheus.register(
            _SupervisorFailuresCollector(task_failures, supervisor_deaths, supervisor_oom_kills)
        )
        self.prometheus.register(_UpgradeCollector(upgrade_failed))
        self.prometheus.register(_FdStoreCollector(fd_store))


class _FdStoreCollector(Collector):
    """systemd's fd store, as far as the supervisor can count it: systemd answers
    no FDSTORE=1, and says only in its journal what it could not keep."""

    def __init__(self, store: Callable[[], Mapping[str, Any] | None]) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store()
        if store is None:  # not under systemd
            return
        yield GaugeMetricFamily(
            f"{PREFIX}_fd_store_descriptors",
            "Descriptors systemd's fd store keeps for the supervisor (listeners, a channel "
            "per worker, its state): handed back should it die. Counted by the supervisor.",
            value=store["kept"],
        )
        if store.get("max") is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_fd_store_max",
                "The unit's FileDescriptorStoreMax=: past it, systemd keeps nothing more.",
                value=store["max"],
            )
        yield CounterMetricFamily(
            f"{PREFIX}_fd_store_not_kept",
            "Descriptors systemd would not keep since this supervisor started, its store "
            "full: should the supervisor die, what they served ends (a worker's calls).",
            value=store["not_kept"],
        )


class _UpgradeCollector(Collector):
    def __init__(self, failed: Callable[[], bool | None]) -> None:
        self.failed = failed

    def collect(self) -> Iterator[Metric]:
        yield _flag(
            f"{PREFIX}_upgrade_failed",
            "1 while the last upgrade (`fleet-ingress upgrade`, SIGUSR2) failed: the "
            "generation running serves on, and a worker replaced meanwhile runs the code "
            "installed now, which the upgrade refused as a rule. 0 once one succeeded; "
            "absent before any.",
            self.failed(),
        )


class _SupervisorFailuresCollector(Collector):
    """The supervisor's own failures, not its workers': its background tasks
    that raised (started again) and its deaths (taken up by the next one),
    each carried from one supervisor to the next."""

    def __init__(
        self,
        failures: Callable[[], Mapping[str, int]],
        deaths: Callable[[], int],
        oom_kills: Callable[[], int] = lambda: 0,
    ) -> None:
        self.failures = failures
        self.deaths = deaths
        self.oom_kills = oom_kills

    def collect(self) -> Iterator[Metric]:
        counter = CounterMetricFamily(
            f"{PREFIX}_supervisor_task_failures",
            "Background tasks of the supervisor that raised (a bug: each is logged with "
            "its traceback) and were started again, by task.",
            labels=["task"],
        )
        for task, count in sorted(self.failures().items()):
            counter.add_metric([task], count)
        yield counter
        yield CounterMetricFamily(
            f"{PREFIX}_supervisor_deaths",
            "Times the supervisor died (killed, crashed, the OOM killer, systemd's watchdog) "
            "and was started again by systemd, taking up its workers and their calls: "
            "meanwhile new calls waited for it. Carried from each supervisor to the next.",
            self.deaths(),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_supervisor_oom_kills",
            "Of fleet_ingress_supervisor_deaths_total, the deaths the kernel's OOM killer "
            "caused, as far as its count of OOM kills in the service's memory cgroup (or "
            "the host's) says: it rose between the dead one's last snapshot, a second before "
            "it died at most, and the next one's start. The service's memory "
            "limit (MemoryMax=) or the host's ran out, and the supervisor went although "
            "each worker asks to be taken first. Carried from each supervisor to the next.",
            self.oom_kills(),
        )


class _CertificateFileCollector(Collector):
    def __init__(
        self,
        not_after: Callable[[], float | None],
        refused: Callable[[], bool | None],
        chain_doubted: Callable[[], bool | None],
    ) -> None:
        self.not_after = not_after
        self.refused = refused
        self.chain_doubted = chain_doubted

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            f"{PREFIX}_certificate_file_expiry_timestamp_seconds",
            "When the certificate in tls.cert on disk expires (read at each scrape when "
            "the file changed): later than fleet_ingress_certificate_expiry_timestamp_seconds "
            "when a renewal there is not served yet (no reload loaded it).",
        )
        if (when := self.not_after()) is not None:
            gauge.add_metric([], when)
        yield gauge
        yield _flag(
            f"{PREFIX}_certificate_file_refused",
            "1 while tls.cert and tls.key on disk hold what a reload refuses in place of "
            "the certificate served (one expired, not valid yet, for other names, or a "
            "pair that cannot serve): the one served serves on, but a start with none "
            "kept (a reboot, a stop then a start) takes the files as they are. 0 "
            "otherwise; absent when the file was not read.",
            self.refused(),
        )
        yield _flag(
            f"{PREFIX}_certificate_chain_doubted",
            "1 while carriers may fail to verify the chain of the certificate served (the "
            "intermediate missing, a root this host does not trust: `fleet-ingress check` "
            "names it); a start with none to keep serves such a file, warning. 0 "
            "otherwise; absent before it was judged.",
            self.chain_doubted(),
        )


def _flag(name: str, documentation: str, value: bool | None) -> GaugeMetricFamily:
    """A gauge of one yes-or-no: 1 or 0, absent when `value` is None (not known)."""
    gauge = GaugeMetricFamily(name, documentation)
    if value is not None:
        gauge.add_metric([], 1.0 if value else 0.0)
    return gauge


class _WorkersCollector(Collector):
    def __init__(
        self,
        slots: HostSlots,
        view: HostView,
        restarts: Callable[[], Mapping[str, int]],
        calls_lost: Callable[[], int],
        workers: Callable[[], tuple[int, int]],
        oom_kills: Callable[[], int] = lambda: 0,
    ) -> None:
        self.slots = slots
        self.view = view
        self.restarts = restarts
        self.calls_lost = calls_lost
        self.workers = workers
        self.oom_kills = oom_kills

    def collect(self) -> Iterator[Metric]:
        labels = ["pid", "generation"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_worker_{name}", doc, labels=labels)

        calls = gauge("calls", "Slots a worker holds now: its call attempts and live calls.")
        connections = gauge("connections", "Open carrier connections of a worker (last report).")
        draining = gauge("draining", "1 when a worker has stopped accepting and finishes calls.")
        age = gauge("report_age_seconds", "Seconds since a worker's last report was read.")
        overdue = gauge(
            "report_overdue",
            "1 when a report asked of a worker went unread 2 s: shown unresponsive, "
            "its counts its last report's.",
        )
        rss = gauge("resident_memory_bytes", "A worker's resident memory (last report).")
        reserved = GaugeMetricFamily(
            f"{PREFIX}_worker_reserved_slots",
            "Slots of a fleet held for a worker's standing grant budget "
            "(a lone worker's: every free slot; or INGRESS_STANDING_BUDGETS): "
            "summed over workers, fleet_ingress_fleet_reserved_slots. "
            "No sample for a fleet it holds none of.",
            labels=[*labels, "fleet"],
        )
        cpu = CounterMetricFamily(
            f"{PREFIX}_worker_cpu_seconds", "A worker's CPU time (last report).", labels=labels
        )
        per_generation: dict[str, int] = {}
        for row in worker_rows(self.slots, self.view, time.monotonic()):
            key = [str(row["pid"]), str(row["generation"])]
            per_generation[key[1]] = per_generation.get(key[1], 0) + 1
            calls.add_metric(key, row["calls"])
            if row["connections"] is not None:
                connections.add_metric(key, row["connections"])
                draining.add_metric(key, 1 if row["draining"] else 0)
                age.add_metric(key, row["last_report_age_s"])
            overdue.add_metric(key, 1 if row["report_overdue"] else 0)
            for fleet, n in row["reserved_by_fleet"].items():
                reserved.add_metric([*key, fleet], n)
            if row["resident_bytes"] is not None:
                rss.add_metric(key, row["resident_bytes"])
            if row["cpu_seconds"] is not None:
                cpu.add_metric(key, row["cpu_seconds"])
        workers = GaugeMetricFamily(
            f"{PREFIX}_workers", "Worker processes alive, by generation.", labels=["generation"]
        )
        for generation, n in sorted(per_generation.items(), key=lambda e: int(e[0])):
            workers.add_metric([generation], n)
        yield from (workers, calls, connections, draining, age, overdue, rss, cpu, reserved)
        serving, wanted = self.workers()
        yield GaugeMetricFamily(
            f"{PREFIX}_workers_serving",
            "Workers of the generation serving now that run and take calls (0 with none "
            "left: fleet_ingress_workers then has no sample).",
            value=serving,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_workers_wanted",
            "Workers the generation serving now should have (process.workers as it "
            "started; 0 once stopping, as every worker leaves).",
            value=wanted,
        )
        restarts = CounterMetricFamily(
            f"{PREFIX}_worker_restarts",
            "Worker processes replaced after they died, by why: oom (killed by the kernel's "
            "OOM killer: the service's MemoryMax= or the host's memory ran out), killed (a "
            "SIGKILL the kernel did not count as an OOM kill: an operator's kill -9, or a "
            "userspace OOM killer's, systemd-oomd or earlyoom), "
            "crashed, exited, hung, unknown.",
            labels=["reason"],
        )
        # Every reason from the start, 0 until it happens: a panel or rate() needs a series.
        counted = self.restarts()
        for reason in sorted({*RESTART_REASONS, *counted}):
            restarts.add_metric([reason], counted.get(reason, 0))
        yield restarts
        yield CounterMetricFamily(
            f"{PREFIX}_worker_oom_kills",
            "Worker processes the kernel's OOM killer killed (the service's MemoryMax= or "
            "the host's memory ran out), whatever their generation: those replaced "
            '(fleet_ingress_worker_restarts_total{reason="oom"}) and those not, an '
            "upgrade's old generation draining (the likelier victim: two generations run "
            "side by side, the old one holding the calls) or new one starting, or a "
            "worker of a supervisor stopping.",
            value=self.oom_kills(),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_worker_calls_lost",
            "Calls cut because their worker process died (killed or crashed; or, its slot "
            "channel lost, exited unclean): the slots it held as it went.",
            value=self.calls_lost(),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_slots_reclaimed",
            "Fleet slots taken back from workers gone holding them: died (their calls "
            "lost), or exited after their slot channel was lost (kept counted until then).",
            value=self.slots.reclaimed_total,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_slots_granted_past_cut",
            "Calls a lone worker granted from its budget after the supervisor had taken "
            "the budget's unused slots back (the worker hung or stopped past "
            "LONE_END_WAIT, then granted before it read that): counted, past a fleet's "
            "maxconn while they last. Expected 0; anything else is worth a look at that "
            "worker's logs.",
            value=self.slots.grants_past_cut_total,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_workers_retired",
            "Workers whose counters were added to the host's totals as they left.",
            value=self.view.retired_workers,
        )


def present(slots: HostSlots) -> set[WorkerId]:
    """The workers the coordinator knows (for `HostView.retire_absent`)."""
    return {(row.pid, row.generation) for row in slots.workers}
