"""Prometheus metrics, read from the live fleets and registry at scrape time.

State and counters live once, in `FleetState`, `Registry` and `Dispatcher`;
the collector turns them into metric families when Prometheus scrapes. Only
distributions (handshake, call and check durations) are observed as they
happen, since no record keeps them.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fleet_ingress import __version__
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.net.calls import Call, Registry
from fleet_ingress.net.dispatch import SlotQueue

PREFIX = "fleet_ingress"


class IngressMetrics:
    def __init__(
        self,
        balancer: Balancer,
        registry: Registry,
        dispatcher: SlotQueue,
        *,
        certificate_not_after: Callable[[], float | None] = lambda: None,
        reloads: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        # Memory, descriptors, CPU, start time: restarts and fd leaks show here.
        _ProcessCollector(registry=self.prometheus)
        self.handshake_seconds = Histogram(
            f"{PREFIX}_handshake_duration_seconds",
            "Carrier request head received to the fleet's 101 relayed.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.prometheus,
        )
        self.call_seconds = Histogram(
            f"{PREFIX}_call_duration_seconds",
            "Duration of tunneled calls, 101 to end.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
            registry=self.prometheus,
        )
        self.check_seconds = Histogram(
            f"{PREFIX}_fleet_check_duration_seconds",
            "Duration of health probes.",
            ["fleet"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.prometheus,
        )
        # Carriers stream 20 ms frames: lag of a few ms is audible jitter.
        self.loop_lag_seconds = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the event loop ran a timer (probed every 0.2 s): what every "
            "call's frames wait while the loop is busy.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.prometheus,
        )
        self.prometheus.register(
            _StateCollector(balancer, registry, dispatcher, certificate_not_after, reloads)
        )
        registry.on_call_linked.append(self._call_linked)
        registry.on_call_ended.append(self._call_ended)

    def _call_linked(self, call: Call) -> None:
        if call.handshake_ms is not None:
            self.handshake_seconds.observe(call.handshake_ms / 1000)

    def _call_ended(self, call: Call) -> None:
        if call.tunnel_since is not None and call.ended_mono is not None:
            self.call_seconds.observe(call.ended_mono - call.tunnel_since)

    def loop_lag_observed(self, seconds: float) -> None:
        self.loop_lag_seconds.observe(seconds)

    def check_observed(self, fleet: str, seconds: float) -> None:
        self.check_seconds.labels(fleet).observe(seconds)

    def fleet_removed(self, fleet: str) -> None:
        try:
            self.check_seconds.remove(fleet)
        except KeyError:
            pass


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
    def __init__(
        self,
        balancer: Balancer,
        registry: Registry,
        dispatcher: SlotQueue,
        certificate_not_after: Callable[[], float | None],
        reloads: Callable[[], Mapping[str, int]],
    ) -> None:
        self.balancer = balancer
        self.registry = registry
        self.dispatcher = dispatcher
        self.certificate_not_after = certificate_not_after
        self.reloads = reloads

    def collect(self) -> Iterator[Metric]:
        yield from self._fleets()
        yield from self._frontend()

    def _fleets(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_fleet_{name}", doc, labels=["fleet"])

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_fleet_{name}", doc, labels=["fleet", *extra])

        up = gauge("up", "1 when the fleet's health is UP (probes pass).")
        health = GaugeMetricFamily(
            f"{PREFIX}_fleet_health_state",
            "1 for the fleet's current health state (INIT, UP, DOWN), else 0.",
            labels=["fleet", "state"],
        )
        admin = GaugeMetricFamily(
            f"{PREFIX}_fleet_admin_state",
            "1 for the fleet's current admin state (READY, DRAIN, MAINT), else 0.",
            labels=["fleet", "state"],
        )
        eligible = gauge("eligible", "1 when the fleet takes new calls now.")
        full = gauge("full", "1 when the fleet's own capacity report says no worker is free.")
        active = gauge("active_calls", "Calls (and call attempts) open on the fleet.")
        maxconn = gauge("maxconn", "Most calls the ingress sends the fleet at once.")
        reported = gauge("reported_available", "Free workers the last passing probe reported.")
        estimated = gauge(
            "estimated_available", "Reported free workers less calls opened since that probe."
        )
        last_check = gauge("last_check_timestamp_seconds", "When the last probe answered.")
        calls = counter("calls", "Calls tunneled to the fleet.")
        responses = counter("responses", "Fleet answers to call requests by status.", ("code",))
        retries = counter("retries", "Failed attempts on the fleet that were tried again.")
        redispatches = counter("redispatches", "Retries that went to another fleet.")
        checks = counter("checks", "Health probes sent.")
        check_failures = counter("check_failures", "Health probes that failed.")
        for f in self.balancer.fleets:
            name = [f.name]
            up.add_metric(name, 1 if f.health is Health.UP else 0)
            for h in Health:
                health.add_metric([f.name, h.value], 1 if f.health is h else 0)
            for a in Admin:
                admin.add_metric([f.name, a.value], 1 if f.admin is a else 0)
            eligible.add_metric(name, 1 if f.up and f.has_room else 0)
            full.add_metric(name, 1 if f.full else 0)
            active.add_metric(name, f.active)
            maxconn.add_metric(name, f.maxconn)
            if f.reported_available is not None:
                reported.add_metric(name, f.reported_available)
            if (estimate := f.estimated_available) is not None:
                estimated.add_metric(name, estimate)
            if f.last_probe_at is not None:
                last_check.add_metric(name, f.last_probe_at)
            calls.add_metric(name, f.calls_total)
            for code, n in sorted(f.responses.items()):
                responses.add_metric([f.name, str(code)], n)
            retries.add_metric(name, f.retries)
            redispatches.add_metric(name, f.redispatches)
            checks.add_metric(name, f.probes_total)
            check_failures.add_metric(name, f.check_failures)
        yield from (up, health, admin, eligible, full, active, maxconn, reported, estimated)
        yield from (last_check, calls, responses, retries, redispatches, checks, check_failures)

    def _frontend(self) -> Iterator[Metric]:
        reg = self.registry
        yield GaugeMetricFamily(
            f"{PREFIX}_connections", "Open carrier connections.", value=len(reg.connections)
        )
        yield CounterMetricFamily(
            f"{PREFIX}_connections", "Carrier connections accepted.", value=reg.connections_total
        )
        yield CounterMetricFamily(
            f"{PREFIX}_tls_handshake_failures",
            "Carrier TLS handshakes that failed.",
            value=reg.tls_handshake_failures,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_refused_connections",
            "Carrier connections reset at accept: limits.max_connections was reached.",
            value=reg.refused_connections,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_accept_failures",
            "accept() failures for lack of descriptors or memory (retried).",
            value=reg.accept_failures,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_tls_handshakes_in_progress",
            "Carrier connections accepted and still in their TLS handshake.",
            value=reg.handshaking,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_active_calls", "Calls tunneled now.", value=len(reg.tunnels())
        )
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "Carrier requests by route and answer.", labels=["route", "code"]
        )
        for (route, status), n in sorted(reg.requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_length",
            "Calls waiting for a fleet slot.",
            value=self.dispatcher.queue_length,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_queue_timeouts",
            "Calls that got 503 after waiting in the queue.",
            value=self.dispatcher.queue_timeouts,
        )
        relayed = CounterMetricFamily(
            f"{PREFIX}_relayed_bytes", "Bytes relayed, by direction.", labels=["direction"]
        )
        to_fleet, to_carrier = reg.relayed_bytes()
        relayed.add_metric(["carrier_to_fleet"], to_fleet)
        relayed.add_metric(["fleet_to_carrier"], to_carrier)
        yield relayed
        ended = CounterMetricFamily(
            f"{PREFIX}_calls_ended",
            "Calls ended, by fleet (empty: none answered) and why they ended.",
            labels=["fleet", "reason"],
        )
        for (fleet, reason), n in sorted(reg.ended.items()):
            ended.add_metric([fleet, reason], n)
        yield ended
        reloads = CounterMetricFamily(
            f"{PREFIX}_reloads", "SIGHUP reloads, by result (applied, refused).", labels=["result"]
        )
        for result, n in sorted(self.reloads().items()):
            reloads.add_metric([result], n)
        yield reloads
        build = GaugeMetricFamily(
            f"{PREFIX}_build_info", "Always 1; the version is a label.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        not_after = self.certificate_not_after()
        if not_after is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_certificate_expiry_timestamp_seconds",
                "When the carrier listener's certificate expires.",
                value=not_after,
            )
