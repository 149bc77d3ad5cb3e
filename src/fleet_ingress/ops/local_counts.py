"""What one process counted, as `core.host_view.Counts`: the one shape that
stats, metrics and a worker's report are rendered from. No I/O.

The one-process ingress renders its own counts; a worker sends them to the
supervisor (`ops.host_stats.WorkerReporter`), which renders the sum over its
workers through the same functions (`ops.snapshot`, `ops.metrics`).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.host_view import Counts, Histo, Key
from fleet_ingress.net.calls import Registry

# Histogram keys (metric names without the fleet_ingress_ prefix).
HANDSHAKE = ("handshake_duration_seconds",)
CALL_DURATION = ("call_duration_seconds",)
LOOP_LAG = ("event_loop_lag_seconds",)
QUEUE_WAIT = ("queue_wait_seconds",)

# Counter families labelled by fleet first (fleet "" in calls_ended: no fleet answered).
FLEET_FAMILIES = frozenset(
    {"fleet_calls", "fleet_responses", "fleet_retries", "fleet_redispatches", "calls_ended"}
)
# The fleet label of calls ended on fleets that have left the set since: a
# label no fleet can be named (config.fleets_file's names start with a letter,
# a digit or "["). Every name a worker had ever carried a call for stayed in
# its reports, which the channel cuts at slot_wire.MAX_LINE: a host whose
# fleets come and go under new names (autoscaled, one name per instance)
# would have had every long-lived worker's channel cut at about the same time,
# past a few thousand names (the channel audit of session 24). Folded, the
# frontend's calls_ended by reason keeps every call; per fleet, a removed
# fleet's series go from the metrics as before (its calls_ended once it is
# forgotten: `metrics._StateCollector`).
REMOVED_FLEETS = "(removed)"


class _Sample(Protocol):
    name: str
    labels: dict[str, str]
    value: float


class _Family(Protocol):
    samples: list[_Sample]


class Observed(Protocol):
    """A prometheus_client Histogram without labels (what we need of it)."""

    def collect(self) -> Iterable[_Family]: ...


def histo_of(histogram: Observed) -> Histo:
    """A prometheus_client Histogram's cumulative buckets, sum and count.

    Read from its bucket values (`_read_buckets`) where it has them: through
    `collect()` a worker's report took 1.3 M instructions for its four
    histograms, each bucket made a labelled sample, its bound formatted as
    text and read back as a float (of the 1.7 M a report costs, sent every
    second while calls are live: the workers' count of session 39)."""
    add_up = getattr(histogram, "add_up", None)  # ops.histogram_later's: observed, not added
    if add_up is not None:
        add_up()
    read = _read_buckets(histogram)
    if read is not None:
        return read
    bounds: list[float] = []
    cumulative: list[int] = []
    total = 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                if le != float("inf"):
                    bounds.append(le)
                cumulative.append(int(sample.value))
            elif sample.name.endswith("_sum"):
                total = sample.value
    return Histo(tuple(bounds), tuple(cumulative), total)


def _read_buckets(histogram: object) -> Histo | None:
    """`histo_of` from the histogram's own values, as its `collect()` sums
    them (prometheus_client's `Histogram._child_samples`: each bucket's count,
    accumulated; the sum where the first bound is not negative); None for
    one that does not have them (another client release, one with labels):
    `collect()` then. tests/unit/test_host_stats.py holds the two equal."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if not isinstance(bounds, list) or not isinstance(buckets, list) or total is None:
        return None
    if len(bounds) != len(buckets) or not bounds or bounds[-1] != math.inf:
        return None
    try:
        cumulative = list(itertools.accumulate(int(bucket.get()) for bucket in buckets))
        observed = float(total.get()) if bounds[0] >= 0 else 0.0
    except (AttributeError, TypeError, ValueError):
        return None
    return Histo(tuple(bounds[:-1]), tuple(cumulative), observed)


def local_counts(
    registry: Registry | None,
    fleets: Iterable[FleetState],
    histograms: Mapping[Key, Observed] | None = None,
    forgotten: Mapping[tuple[str, ...], int] | None = None,
) -> Counts:
    """The counts of this process: its registry (frontend; None: none), the
    call counters of its fleet records, those of the records it has dropped
    (`forgotten`, summed: under REMOVED_FLEETS), and its histograms."""
    counts = Counts()
    c = counts.counters
    for fleet in fleets:
        c[("fleet_calls", fleet.name)] = fleet.calls_total
        for code, n in fleet.responses.items():
            c[("fleet_responses", fleet.name, str(code))] = n
        c[("fleet_retries", fleet.name)] = fleet.retries
        c[("fleet_redispatches", fleet.name)] = fleet.redispatches
    if forgotten:
        add_forgotten(counts, forgotten)
    for key, histogram in (histograms or {}).items():
        counts.histograms[key] = histo_of(histogram)
    if registry is None:
        return counts
    c[("connections_total",)] = registry.connections_total
    c[("tls_handshake_failures",)] = registry.tls_handshake_failures
    for kind, n in registry.fleet_tls_handshakes.items():
        c[("fleet_tls_handshakes", kind)] = n
    c[("fleet_tls_sessions_refused",)] = registry.fleet_tls_sessions_refused
    c[("refused_connections",)] = registry.refused_connections
    c[("accept_failures",)] = registry.accept_failures
    c[("acme_refused_connections",)] = registry.acme.refused
    c[("acme_evicted_connections",)] = registry.acme.evicted
    for outcome, n in registry.acme.challenges.items():
        c[("acme_challenges", outcome)] = n
    c[("accepts_paused_ms",)] = registry.accepts_paused_ms
    c[("new_connection_cpu_ms",)] = round(registry.new_connection_cpu.spent * 1000)
    for (route, status), n in registry.requests.items():
        c[("requests", route, str(status))] = n
    to_fleet, to_carrier = registry.relayed_bytes()
    c[("bytes_from_carrier",)] = to_fleet
    c[("bytes_to_carrier",)] = to_carrier
    for (fleet_name, reason), n in registry.ended.items():
        c[("calls_ended", fleet_name, reason)] = n
    for (who, status), n in registry.refused.items():
        c[("calls_refused", who, status)] = n
    g = counts.gauges
    g[("connections",)] = len(registry.connections)
    g[("handshaking",)] = registry.handshaking
    g[("acme_connections",)] = registry.acme.open
    g[("active_calls",)] = len(registry.tunnels())
    # Ended (logged) calls whose sides are still closing (`Registry.closing`):
    # why a worker holds connections, and a drain waits, with no call up.
    g[("closing_calls",)] = len(registry.closing)
    return counts


def fold_ended_of_fleets_gone(registry: Registry, kept: Collection[str]) -> None:
    """Count the calls ended on fleets not in `kept` under REMOVED_FLEETS, in
    `registry` itself (its keys stay as many as the fleets it has)."""
    ended = registry.ended
    for key in [k for k in ended if k[0] not in kept and k[0] not in ("", REMOVED_FLEETS)]:
        n = ended.pop(key)
        ended[(REMOVED_FLEETS, key[1])] += n


def count_forgotten(kept: Counter[tuple[str, ...]], fleet: FleetState) -> None:
    """Add the call counters of `fleet`, whose record is dropped, to `kept`
    (the shape `add_forgotten` reads: `SlotClient.forgotten`, and the
    one-process ingress's `FleetOps.forgotten_counts`)."""
    if fleet.calls_total:
        kept[("calls",)] += fleet.calls_total
    for code, n in fleet.responses.items():
        if n:
            kept[("responses", str(code))] += n
    if fleet.retries:
        kept[("retries",)] += fleet.retries
    if fleet.redispatches:
        kept[("redispatches",)] += fleet.redispatches


def add_forgotten(counts: Counts, forgotten: Mapping[tuple[str, ...], int]) -> None:
    """A worker's call counters of the fleets it has forgotten, summed
    (`SlotClient.forgotten`), into `counts` under REMOVED_FLEETS."""
    c = counts.counters
    for (what, *labels), n in forgotten.items():
        if n:
            c[(f"fleet_{what}", REMOVED_FLEETS, *labels)] += n


def fold_fleets_gone(counts: Counts, kept: Collection[str]) -> None:
    """The same for counts summed already (the supervisor's of workers gone):
    the counters of fleets not in `kept` (calls ended, tunneled, answers,
    retries) under REMOVED_FLEETS. Dropped, a fleet's lifetime totals left
    the host's "removed fleets" row as it was forgotten, while the frontend's
    (requests, calls ended) kept them."""
    c = counts.counters
    gone = [
        key
        for key in c
        if key[0] in FLEET_FAMILIES
        and len(key) > 1
        and key[1] not in kept
        and key[1] not in ("", REMOVED_FLEETS)
    ]
    for key in gone:
        n = c.pop(key)
        c[(key[0], REMOVED_FLEETS, *key[2:])] += n
