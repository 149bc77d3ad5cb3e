"""Prometheus metrics, read from the live fleets and registry at scrape time.

State and counters live once, in `FleetState`, `Registry` and `Dispatcher`;
the collector turns them into metric families when Prometheus scrapes. Only
distributions (handshake, call and check durations) are observed as they
happen, since no record keeps them.
"""

from __future__ import annotations

import bisect
import math
import os
import resource
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from enum import Enum
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from fleet_ingress import __version__
from fleet_ingress.core.balancer import Balancer, FleetState
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_view import Counts, Histo, Key
from fleet_ingress.logs import LINES_HELD, lines_dropped
from fleet_ingress.net.acme import CHALLENGE_OUTCOMES
from fleet_ingress.net.calls import Call, Registry
from fleet_ingress.net.dispatch import SlotQueue
from fleet_ingress.net.event_loop import unexpected_errors
from fleet_ingress.net.fleet_sessions import FLEET_HANDSHAKE_KINDS
from fleet_ingress.ops.histogram_later import HistogramAddedUpLater
from fleet_ingress.ops.local_counts import (
    CALL_DURATION,
    HANDSHAKE,
    LOOP_LAG,
    QUEUE_WAIT,
    local_counts,
)
from fleet_ingress.release import code_digest

PREFIX = "fleet_ingress"

# No `*_created` series: the host's histograms are sums over workers, which have no
# one start time, and the probes' histogram alone showed one (as its own gauge family).
prometheus_client.disable_created_metrics()


# Per-call histograms: name (without the prefix) -> help, buckets. A worker
# observes them; the supervisor renders the sum over its workers with the same
# names and buckets.
HISTOGRAMS: dict[Key, tuple[str, tuple[float, ...]]] = {
    # From 1 ms: a fleet in the same data centre answers in 1-3 ms, which a first
    # bucket of 5 ms could only put at its midpoint (histogram_quantile). The old
    # bounds are all kept: a host view merges workers of an upgrade on the bounds
    # they share (core/host_view.py), so after an upgrade from a release without
    # them the finer buckets show only from the next restart (retired workers'
    # totals keep the old bounds).
    HANDSHAKE: (
        "Carrier request head received to the fleet's 101 relayed.",
        (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    ),
    CALL_DURATION: (
        "Duration of tunneled calls, 101 to end (one lost with its worker: to its worker's end).",
        (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
    ),
    # SPEC 4's queue (timeouts.queue, 3 s by default): what tells "calls wait for a
    # slot" from "fleets are slow to answer" (the handshake above includes the
    # wait). Its count: the waits that ended with a slot; those that ended in a
    # 503 are fleet_ingress_queue_timeouts_total.
    QUEUE_WAIT: (
        "Time calls waited in the queue for a fleet slot, each wait that ended with "
        "a slot (a call not queued is not observed).",
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30),
    ),
    # Carriers stream 20 ms frames: lag of a few ms is audible jitter.
    LOOP_LAG: (
        "How late the event loop ran a timer (probed every 0.2 s): what every "
        "call's frames wait while the loop is busy.",
        (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    ),
}


def _histogram(key: Key, registry: CollectorRegistry) -> Histogram:
    doc, buckets = HISTOGRAMS[key]
    # Observed a call (twice), read a second: added up when read.
    return HistogramAddedUpLater(f"{PREFIX}_{key[0]}", doc, buckets=buckets, registry=registry)


# The probes' histogram is made this many fleets (13 samples each) at a time.
FLEETS_PER_PIECE = 20


class FamilyInPieces(Metric):
    """A family whose samples are made a piece at a time: a renderer that lets
    the loop run between pieces (`stats_server.generate_in_turns`) reads
    `pieces()`; `samples`, read by anything else (generate_latest), makes
    them all at once."""

    def __init__(
        self, name: str, documentation: str, typ: str, pieces: Callable[[], Iterable[list[Sample]]]
    ) -> None:
        self._samples: list[Sample] | None = None
        self.pieces = pieces
        super().__init__(name, documentation, typ)

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._samples = [sample for piece in self.pieces() for sample in piece]
        return self._samples

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        # Metric's own __init__ sets [] here: made from `pieces` when read.
        self._samples = value or None


class FleetChecks(Collector):
    """The health probes' durations, by fleet: kept by the process that runs
    the poller (the one-process ingress, or the supervisor). Kept as plain
    counts, not a prometheus_client Histogram, so that an upgrade carries them
    over the supervisor's exec (`to_json`/`restore`): a histogram is counters,
    and counters do not reset at an upgrade."""

    NAME = f"{PREFIX}_fleet_check_duration_seconds"
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

    def __init__(self, registry: CollectorRegistry) -> None:
        # By fleet: observations in each bucket (not cumulative; +Inf last), and their sum.
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        registry.register(self)

    def check_observed(self, fleet: str, seconds: float) -> None:
        counts = self._counts.get(fleet)
        if counts is None:
            counts = self._counts[fleet] = [0] * (len(self.BUCKETS) + 1)
            self._sums[fleet] = 0.0
        counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        self._sums[fleet] += seconds

    def fleet_removed(self, fleet: str) -> None:
        self._counts.pop(fleet, None)
        self._sums.pop(fleet, None)

    def collect(self) -> Iterator[Metric]:
        yield FamilyInPieces(self.NAME, "Duration of health probes.", "histogram", self._pieces)

    def _pieces(self) -> Iterator[list[Sample]]:
        """The family's samples, FLEETS_PER_PIECE fleets at a time, each fleet's
        counts and sum read at once. At 500 fleets the family is 6,500 samples:
        made in one piece, 8-10 ms of a scrape's work with the supervisor's loop
        held (the scale audit of session 34). A fleet removed between two pieces
        is left out; one added is shown from the next scrape."""
        # Spelled once: 500 fleets' 5,000 bounds were a tenth of a scrape's work.
        bounds = [*(_le(b) for b in self.BUCKETS), "+Inf"]
        bucket, count, total = (f"{self.NAME}_{s}" for s in ("bucket", "count", "sum"))
        fleets = sorted(self._counts.items())
        for start in range(0, len(fleets), FLEETS_PER_PIECE):
            samples: list[Sample] = []
            for fleet, counts in fleets[start : start + FLEETS_PER_PIECE]:
                if self._counts.get(fleet) is not counts:
                    continue  # removed meanwhile
                running = 0
                for le, n in zip(bounds, counts, strict=True):
                    running += n
                    samples.append(Sample(bucket, {"fleet": fleet, "le": le}, float(running)))
                samples.append(Sample(count, {"fleet": fleet}, float(running)))
                samples.append(Sample(total, {"fleet": fleet}, self._sums[fleet]))
            yield samples

    def to_json(self) -> dict[str, Any]:
        return {
            "buckets": list(self.BUCKETS),
            "fleets": {f: [self._counts[f], self._sums[f]] for f in self._counts},
        }

    def restore(self, data: Any, fleets: Collection[str]) -> None:
        """Add what a previous image counted (`to_json`) for the fleets this
        one has (a fleet taken out of the file meanwhile is not brought back);
        data of a shape this image does not count in (other bucket bounds:
        another release) is left out."""
        try:
            if data.get("buckets") != list(self.BUCKETS):
                return
            entries = list(data["fleets"].items())
        except (AttributeError, KeyError, TypeError):
            return
        for fleet, entry in entries:
            try:
                counts, total = [int(n) for n in entry[0]], float(entry[1])
            except (TypeError, ValueError, IndexError, KeyError):
                continue
            bad = min(counts, default=-1) < 0 or not math.isfinite(total) or total < 0
            if fleet not in fleets or bad or len(counts) != len(self.BUCKETS) + 1:
                continue
            mine = self._counts.get(fleet, [0] * len(counts))
            self._counts[fleet] = [a + b for a, b in zip(mine, counts, strict=True)]
            self._sums[fleet] = self._sums.get(fleet, 0.0) + total


def histogram_families(counts: Counts) -> Iterator[Metric]:
    """The per-call histograms of `counts` (summed over workers) as Prometheus
    histograms: the same names, help and buckets as a process's own."""
    for key, (doc, _) in HISTOGRAMS.items():
        histo = counts.histograms.get(key)
        if histo is None:
            continue
        family = HistogramMetricFamily(f"{PREFIX}_{key[0]}", doc)
        buckets = [
            (_le(bound), float(n)) for bound, n in zip(histo.bounds, histo.cumulative, strict=False)
        ]
        buckets.append(("+Inf", float(histo.count)))
        family.add_metric([], buckets, histo.sum)
        yield family


def lost_call_counts(record: Mapping[str, Any]) -> Counts:
    """What a call lost with its worker adds to the host's counts, from its
    access line (`core.lost_calls.lost_call_record`): ended, by fleet and
    reason, as a worker counts each call it ends; and, a tunneled one (status
    101), its duration in the call-duration histogram, as a worker observes
    each tunneled call that ends (from its start: the worker that knew its
    101's moment is gone). Before, the supervisor counted the first alone:
    the histogram left out every call lost with a worker (the views audit of
    session 37). The supervisor adds it to its retired counts."""
    counts = Counts()
    counts.counters[("calls_ended", record.get("fleet") or "", record["end_reason"])] += 1
    # From its 101 where the worker told it ("answered"), as a worker observes
    # each call it ends; else from its start (a supervisor before the key).
    duration = record.get("tunnel_s", record.get("duration_s"))
    if (
        record.get("status") == 101
        and isinstance(duration, int | float)
        and not isinstance(duration, bool)
        and math.isfinite(duration)
        and duration >= 0
    ):
        bounds = tuple(float(b) for b in HISTOGRAMS[CALL_DURATION][1])
        cumulative = (*(1 if duration <= b else 0 for b in bounds), 1)
        counts.histograms[CALL_DURATION] = Histo(bounds, cumulative, float(duration))
    return counts


def _counted_from_zero(
    counts: Counts, name: str, doc: str, label: str, values: Iterable[str]
) -> CounterMetricFamily:
    """The counter `name` by its one `label`, every one of `values` from 0 (so
    that Prometheus's increase() sees the first count of each)."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    seen = dict(counts.family(name, 1))
    for value in values:
        family.add_metric([value], seen.get((value,), 0))
    return family


def _count_as_float(n: int) -> float:
    """A fleet's reported count as a sample: SPEC 4 sets it no upper bound, and
    an integer past a float's range (a fleet's bug: 10**400) would fail the
    whole scrape; it shows as +Inf (or -Inf for an estimate below)."""
    try:
        return float(n)
    except OverflowError:
        return math.inf if n > 0 else -math.inf


def _le(bound: float) -> str:
    """prometheus_client's spelling of a bucket bound (1 -> "1.0")."""
    return floatToGoString(bound)


class IngressMetrics:
    def __init__(
        self,
        balancer: Balancer,
        registry: Registry,
        dispatcher: SlotQueue,
        *,
        certificate_not_after: Callable[[], float | None] = lambda: None,
        reloads: Callable[[], Mapping[str, int]] = dict,
        forgotten: Callable[[], Mapping[tuple[str, ...], int]] = dict,
    ) -> None:
        """`forgotten`: the call counters of the fleet records dropped as their
        fleets left the set, summed (`FleetOps.forgotten_counts`)."""
        self.prometheus = CollectorRegistry(auto_describe=True)
        # Memory, descriptors, CPU, start time: restarts and fd leaks show here.
        _ProcessCollector(registry=self.prometheus)
        self.handshake_seconds = _histogram(HANDSHAKE, self.prometheus)
        self.call_seconds = _histogram(CALL_DURATION, self.prometheus)
        self.checks = FleetChecks(self.prometheus)
        self.loop_lag_seconds = _histogram(LOOP_LAG, self.prometheus)
        self.queue_wait_seconds = _histogram(QUEUE_WAIT, self.prometheus)
        # What a worker reports of its histograms (`ops.host_stats.WorkerReporter`).
        self.histograms: dict[Key, Histogram] = {
            HANDSHAKE: self.handshake_seconds,
            CALL_DURATION: self.call_seconds,
            LOOP_LAG: self.loop_lag_seconds,
            QUEUE_WAIT: self.queue_wait_seconds,
        }
        self.prometheus.register(
            _StateCollector(
                lambda: balancer.fleets,
                lambda: local_counts(registry, balancer.fleets, forgotten=forgotten()),
                lambda: (dispatcher.queue_length, dispatcher.queue_timeouts),
                certificate_not_after,
                reloads,
            )
        )
        registry.on_call_linked.append(self._call_linked)
        registry.on_call_ended.append(self._call_ended)
        registry.on_slot_waited.append(self.queue_wait_seconds.observe)

    def _call_linked(self, call: Call) -> None:
        if call.handshake_ms is not None:
            self.handshake_seconds.observe(call.handshake_ms / 1000)

    def _call_ended(self, call: Call) -> None:
        if call.tunnel_since is not None and call.ended_mono is not None:
            self.call_seconds.observe(call.ended_mono - call.tunnel_since)

    def loop_lag_observed(self, seconds: float) -> None:
        self.loop_lag_seconds.observe(seconds)


class _ProcessCollector(Collector):
    """prometheus_client's process_* metrics (same names and meaning), with open
    descriptors counted without listing them: with 10,000 carriers connected,
    listing /proc/self/fd (as prometheus_client does) held the event loop about
    4 ms per scrape. Linux 6.2 and later give the count as that directory's
    size; older kernels say 0 there, and get the listing."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._pagesize = resource.getpagesize()
        with open("/proc/stat", "rb") as f:
            self._boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        with open("/proc/self/stat", "rb") as f:
            parts = f.read().rpartition(b")")[2].split()
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", float(parts[20])
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            float(parts[21]) * self._pagesize,
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            float(parts[19]) / self._ticks + self._boot,
        )
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            (float(parts[11]) + float(parts[12])) / self._ticks,
        )
        fd_dir = "/proc/self/fd"
        yield GaugeMetricFamily(
            "process_open_fds",
            "Number of open file descriptors.",
            os.stat(fd_dir).st_size or len(os.listdir(fd_dir)),
        )
        yield GaugeMetricFamily(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )


class _StateCollector(Collector):
    """Fleet state from `fleets` and everything counted per call from one
    `Counts` read per scrape: this process's (one-process ingress) or the
    sum over a host's workers (`ops.host_stats.HostMetrics`, which also has
    the counts' histograms rendered: `histograms=True`)."""

    def __init__(
        self,
        fleets: Callable[[], Iterable[FleetState]],
        counts: Callable[[], Counts],
        queue: Callable[[], tuple[int, int]],
        certificate_not_after: Callable[[], float | None],
        reloads: Callable[[], Mapping[str, int]],
        *,
        histograms: bool = False,
        ended_of_gone: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """`ended_of_gone`: fleets out of the set whose calls_ended series are
        still shown (the supervisor's, until it forgets them)."""
        self.fleets = fleets
        self.counts = counts
        self.queue = queue  # (length, timeouts)
        self.certificate_not_after = certificate_not_after
        self.reloads = reloads
        self.histograms = histograms
        self.ended_of_gone = ended_of_gone

    def collect(self) -> Iterator[Metric]:
        counts = self.counts()
        yield from self._fleets(counts)
        shown = {f.name for f in self.fleets()} | {*self.ended_of_gone()}
        yield from self._frontend(counts, shown)
        if self.histograms:
            yield from histogram_families(counts)

    def _fleets(self, counts: Counts) -> Iterator[Metric]:
        """A family at a time, filled in a pass over the fleets and yielded at
        once: a renderer that lets the loop run between families
        (`stats_server.generate_in_turns`) is held a pass at a time, and keeps
        no family it has written."""
        fleets = list(self.fleets())

        def gauge(name: str, doc: str, value: Callable[[FleetState], float | None]) -> Metric:
            family = GaugeMetricFamily(f"{PREFIX}_fleet_{name}", doc, labels=["fleet"])
            for f in fleets:
                if (v := value(f)) is not None:
                    family.add_metric([f.name], v)
            return family

        def counter(name: str, doc: str, value: Callable[[FleetState], float]) -> Metric:
            family = CounterMetricFamily(f"{PREFIX}_fleet_{name}", doc, labels=["fleet"])
            for f in fleets:
                family.add_metric([f.name], value(f))
            return family

        def states(
            name: str, doc: str, every: Iterable[Enum], now: Callable[[FleetState], Enum | None]
        ) -> Metric:
            family = GaugeMetricFamily(f"{PREFIX}_fleet_{name}", doc, labels=["fleet", "state"])
            for f in fleets:
                current = now(f)
                for state in every:
                    family.add_metric([f.name, state.value], 1 if current is state else 0)
            return family

        def probed(f: FleetState) -> bool:
            # A fleet in MAINT is not probed (SPEC 7): what its last probe said
            # before MAINT is stale, as `stat`, /stats and `check --live` show
            # it (ops.fleet_display.probed). Rendered UP, its host stopped for
            # the work MAINT was for counted as a fleet UP: with every other
            # fleet DOWN, FleetIngressAllFleetsDown could not fire and the
            # dashboard's "Fleets UP" read 1 while every call got 503 (the
            # views audit of session 37). /stats.json keeps the figures.
            return f.admin is not Admin.MAINT

        def responses() -> Metric:
            family = CounterMetricFamily(
                f"{PREFIX}_fleet_responses",
                "Fleet answers to call requests by status.",
                labels=["fleet", "code"],
            )
            responses_of: dict[str, list[tuple[str, int]]] = {}
            for (fleet_name, code), n in counts.family("fleet_responses", 2):
                responses_of.setdefault(fleet_name, []).append((code, n))
            for f in fleets:
                for code, n in sorted(responses_of.get(f.name, []), key=lambda e: int(e[0])):
                    family.add_metric([f.name, code], n)
            return family

        def check_age(f: FleetState) -> float | None:
            if f.last_probe_monotonic is None:
                return None
            return round(time.monotonic() - f.last_probe_monotonic, 3)

        def as_float(n: int | None) -> float | None:
            return None if n is None else _count_as_float(n)

        yield gauge(
            "up",
            "1 when the fleet's health is UP (probes pass); 0 in MAINT (not probed).",
            lambda f: 1 if f.health is Health.UP and probed(f) else 0,
        )
        yield states(
            "health_state",
            "1 for the fleet's current health state (INIT, UP, DOWN), else 0; "
            "all 0 in MAINT (not probed: not known).",
            Health,
            lambda f: f.health if probed(f) else None,
        )
        yield states(
            "admin_state",
            "1 for the fleet's current admin state (READY, DRAIN, MAINT), else 0.",
            Admin,
            lambda f: f.admin,
        )
        yield gauge(
            "admin_state_saved",
            "0 when the fleet's admin state applies but the fleets file could not record it "
            "(a restart would not keep it), else 1.",
            lambda f: 0 if f.admin_unsaved else 1,
        )
        yield gauge(
            "eligible",
            "1 when the fleet takes new calls now.",
            lambda f: 1 if f.takes_calls else 0,
        )
        yield gauge(
            "full",
            "1 when the fleet's own capacity report says no worker is free.",
            lambda f: 1 if f.out_of_workers and probed(f) else 0,
        )
        yield gauge(
            "active_calls", "Calls (and call attempts) open on the fleet.", lambda f: f.active
        )
        yield gauge(
            "maxconn", "Most calls the ingress sends the fleet at once.", lambda f: f.maxconn
        )
        yield gauge(
            "reserved_slots",
            "Slots of the fleet held for workers' grant budgets (the only worker's: every "
            "free slot while it is the only one; or standing budgets, "
            "INGRESS_STANDING_BUDGETS): no call yet, a worker may grant one without asking "
            "the supervisor. Counted against maxconn (active_calls + reserved_slots <= "
            "maxconn), not taken from estimated_available; the fleet stays eligible.",
            lambda f: f.standing,
        )
        yield gauge(
            "reported_available",
            "Free workers the last passing probe reported (none in MAINT: stale).",
            lambda f: as_float(f.reported_available) if probed(f) else None,
        )
        yield gauge(
            "estimated_available",
            "Reported free workers less calls opened since that probe (none in MAINT).",
            lambda f: as_float(f.estimated_free) if probed(f) else None,
        )
        yield gauge(
            "last_check_timestamp_seconds",
            "When the last probe ended, passed or failed.",
            lambda f: f.last_probe_at,
        )
        yield gauge(
            "last_check_age_seconds",
            "Seconds since the last probe ended, passed or failed, by this host's own "
            "monotonic clock (time() - last_check_timestamp_seconds compares Prometheus's "
            "clock with this host's).",
            check_age,
        )
        # MAINT: not probed, so what its last probe saw is stale (a certificate
        # renewed during the work MAINT was for still read as the old one, and
        # FleetIngressFleetCertificateExpiringSoon kept firing on it).
        yield gauge(
            "certificate_expiry_timestamp_seconds",
            "When the certificate the fleet served to its last probe expires (https, "
            "verified); none in MAINT (not probed: stale).",
            lambda f: f.certificate_not_after if probed(f) else None,
        )
        yield counter(
            "calls", "Calls tunneled to the fleet.", lambda f: counts.counter("fleet_calls", f.name)
        )
        yield responses()
        yield counter(
            "retries",
            "Failed attempts on the fleet that were tried again.",
            lambda f: counts.counter("fleet_retries", f.name),
        )
        yield counter(
            "redispatches",
            "Retries that went to another fleet.",
            lambda f: counts.counter("fleet_redispatches", f.name),
        )
        yield counter("checks", "Health probes sent.", lambda f: f.probes_total)
        yield counter("check_failures", "Health probes that failed.", lambda f: f.check_failures)

    def _frontend(self, counts: Counts, fleets: set[str]) -> Iterator[Metric]:
        gauges = counts.gauges
        yield GaugeMetricFamily(
            f"{PREFIX}_connections",
            "Open carrier connections.",
            value=gauges.get(("connections",), 0),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_connections",
            "Carrier connections accepted that completed their TLS handshake.",
            value=counts.counter("connections_total"),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_tls_handshake_failures",
            "Carrier TLS handshakes that failed.",
            value=counts.counter("tls_handshake_failures"),
        )
        yield _counted_from_zero(
            counts,
            "fleet_tls_handshakes",
            "TLS handshakes of calls' connections to the fleets, by kind: full (the fleet's"
            " certificate checked) or resumed (the fleet's kept session; a session is"
            " offered at most a minute after the full handshake it rests on).",
            "kind",
            FLEET_HANDSHAKE_KINDS,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_fleet_tls_sessions_refused",
            "Calls' connections offered a kept TLS session that a fleet was proven to refuse:"
            " it failed the handshake (an alert; or a close or reset of a session kept after"
            " one, none resumed between) and the connection made again at once without it got"
            " through; the fleet is then kept no session for 10 minutes. A close or reset not"
            " proven so counts as a failed connection to the fleet (passive health) instead.",
            value=counts.counter("fleet_tls_sessions_refused"),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_acme_connections",
            "Connections open on the plain-HTTP listener (:80: ACME and redirects).",
            value=gauges.get(("acme_connections",), 0),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_acme_refused_connections",
            "Plain-HTTP (:80) connections reset at accept: 16 of the client's open (or 256 a"
            " worker, all relaying challenges).",
            value=counts.counter("acme_refused_connections"),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_acme_evicted_connections",
            "Plain-HTTP (:80) connections with no request yet closed for a new one:"
            " 256 a worker were open (a flood from many addresses).",
            value=counts.counter("acme_evicted_connections"),
        )
        yield _counted_from_zero(
            counts,
            "acme_challenges",
            "ACME challenges forwarded from :80 to acme.upstream (certbot), by outcome: relayed"
            " (certbot answered), refused (nothing listens: normal between renewals),"
            " not_served (closed unanswered: certbot's way for a token it does not serve),"
            " failed (no connection or no usable answer in time: never normal).",
            "outcome",
            CHALLENGE_OUTCOMES,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_refused_connections",
            "Carrier connections reset at accept: limits.max_connections was reached.",
            value=counts.counter("refused_connections"),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_accept_failures",
            "accept() failures for lack of descriptors or memory (retried).",
            value=counts.counter("accept_failures"),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_new_connection_cpu_seconds",
            "Seconds a worker's event loop spent on carrier connections before their "
            "call was linked (their CPU, and any wait for a CPU meanwhile): accept, TLS "
            "handshake, request head, the call's fleet connection until the link, answer "
            "and close (a flood shows here).",
            value=counts.counter("new_connection_cpu_ms") / 1000,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_accepts_paused_seconds",
            "Pauses a worker with live calls took between accepts because its new "
            "connections used more than limits.new_connection_share of a core (summed "
            "over workers): new connections waited in the listen backlog meanwhile.",
            value=counts.counter("accepts_paused_ms") / 1000,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_tls_handshakes_in_progress",
            "Carrier connections accepted and still in their TLS handshake.",
            value=gauges.get(("handshaking",), 0),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_active_calls", "Calls tunneled now.", value=gauges.get(("active_calls",), 0)
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_closing_calls",
            "Calls ended (their access line written) whose connections are still closing: "
            "a close frame and the TLS close flushed to a peer slow to read or gone, 10 s "
            "at most each. Their connections count in fleet_ingress_connections, and a "
            "drain waits for them.",
            value=gauges.get(("closing_calls",), 0),
        )
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "Carrier requests by route and answer.", labels=["route", "code"]
        )
        for (route, status), n in counts.family("requests", 2):
            requests.add_metric([route, status], n)
        yield requests
        queue_length, queue_timeouts = self.queue()
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_length", "Calls waiting for a fleet slot.", value=queue_length
        )
        yield CounterMetricFamily(
            f"{PREFIX}_queue_timeouts",
            "Calls that got 503 after waiting in the queue.",
            value=queue_timeouts,
        )
        relayed = CounterMetricFamily(
            f"{PREFIX}_relayed_bytes", "Bytes relayed, by direction.", labels=["direction"]
        )
        relayed.add_metric(["carrier_to_fleet"], counts.counter("bytes_from_carrier"))
        relayed.add_metric(["fleet_to_carrier"], counts.counter("bytes_to_carrier"))
        yield relayed
        ended = CounterMetricFamily(
            f"{PREFIX}_calls_ended",
            "Calls ended, by fleet (empty: none answered) and why they ended.",
            labels=["fleet", "reason"],
        )
        for (fleet, reason), n in counts.family("calls_ended", 2):
            # A removed fleet's series go, as its other families' do (else one
            # more for each fleet ever removed; the leak audit of session 15),
            # once the supervisor forgets it (`fleets` has it until then): its
            # last calls end as it leaves the set (at its last slot given back,
            # before their worker reports them; every call a forced removal
            # closes), and those ends reached no scrape (the accounting audit
            # of session 31).
            if not fleet or fleet in fleets:
                ended.add_metric([fleet, reason], n)
        yield ended
        refused = CounterMetricFamily(
            f"{PREFIX}_calls_refused",
            "Calls answered without a tunnel (calls_ended reason refused), by whose answer "
            "the carrier got (by: fleet, its own passed through, e.g. a 429; ingress, its "
            "own: a 503 of the queue or of no fleet up, a 502/503/504 once attempts ran "
            "out, counted ended on the fleet tried last) and status.",
            labels=["by", "code"],
        )
        for (who, status), n in counts.family("calls_refused", 2):
            refused.add_metric([who, status], n)
        yield refused
        yield CounterMetricFamily(
            f"{PREFIX}_log_lines_dropped",
            "Log lines dropped because stderr (journald) was not read in time, or "
            "could not be written (a full disk): "
            f"{LINES_HELD} lines per process wait for it, calls never do.",
            # The workers' (in the host's counts) and this process's own.
            value=counts.counter("log_lines_dropped") + lines_dropped(),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_unexpected_errors",
            "Exceptions of a bug: caught by a guard that logged it and went on, or "
            "caught by no code and logged by the event loop; each with its traceback.",
            # The workers' (in the host's counts) and this process's own.
            value=counts.counter("unexpected_errors") + unexpected_errors(),
        )
        reloads = CounterMetricFamily(
            f"{PREFIX}_reloads", "SIGHUP reloads, by result (applied, refused).", labels=["result"]
        )
        # Both results from the start, 0 until one happens: an alert or a panel on
        # `refused` would otherwise have no series to read before the first refusal.
        counted = self.reloads()
        for result in sorted({"applied", "refused", *counted}):
            reloads.add_metric([result], counted.get(result, 0))
        yield reloads
        build = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "Always 1; the version and the code's digest (the supervisor's) are labels.",
            labels=["version", "code"],
        )
        build.add_metric([__version__, code_digest()], 1)
        yield build
        not_after = self.certificate_not_after()
        if not_after is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_certificate_expiry_timestamp_seconds",
                "When the carrier listener's certificate expires.",
                value=not_after,
            )
