"""One picture of the running ingress, read from the live registry and fleets.

`/stats.json`, the `/stats` page and `fleet-ingress stat` all show this, so
they can never disagree. No I/O.

`render` is the one renderer: the fleets' state (health, admin, slots,
capacity) from the process that holds the balancer, and everything counted
per call from a `Counts`: this process's own (`snapshot`, the one-process
ingress) or the sum over a host's workers (`ops.host_stats.host_snapshot`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fleet_ingress import __version__
from fleet_ingress.core.balancer import Balancer, FleetState
from fleet_ingress.core.host_view import Counts, Key
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.dispatch import SlotQueue
from fleet_ingress.ops.local_counts import QUEUE_WAIT, Observed, local_counts
from fleet_ingress.release import code_digest


def by_fleet(counts: Counts, family: str) -> dict[str, dict[str, int]]:
    """A family labelled (fleet, label), e.g. `fleet_responses`: per fleet, in
    one pass (a pass per fleet made a snapshot of N fleets cost N times every
    counter: 112 ms at 300 fleets, 1.4 s at 1,000, on the supervisor's loop)."""
    grouped: dict[str, dict[str, int]] = {}
    for (fleet_name, label), n in counts.family(family, 2):
        grouped.setdefault(fleet_name, {})[label] = n
    return grouped


def fleet_row(
    fleet: FleetState,
    capacity_key: str,
    counts: Counts,
    responses_of: dict[str, dict[str, int]],
    ended_of: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """`counts`: where the fleet's call counters come from; `responses_of`,
    `ended_of`: its families grouped `by_fleet`."""
    name = fleet.name
    responses = {int(code): n for code, n in responses_of.get(name, {}).items()}
    ended = dict(ended_of.get(name, {}))
    probe = fleet.last_probe
    return {
        "name": name,
        "url": fleet.spec.url,
        "health": fleet.health.value,
        "admin": fleet.admin.value,
        "removing": fleet.removing,
        # False: the admin state applies but the fleets file lacks it (a restart would
        # not keep it); the next fleet change that can write the file saves it.
        "admin_saved": not fleet.admin_unsaved,
        "eligible": fleet.takes_calls,
        "full": fleet.out_of_workers,
        "active": fleet.active,
        "maxconn": fleet.maxconn,
        # Slots held for workers' standing grant budgets (the only worker's lone
        # budget, session 46, or INGRESS_STANDING_BUDGETS's; docs/WORKERS.md
        # "Standing budgets"): no call yet (or one not told yet), counted against maxconn
        # (`active` + `reserved` <= `maxconn`), not out of `estimated_available` (the
        # fleet's free workers) nor `eligible` (a worker grants calls from them).
        "reserved": fleet.standing,
        "reported_available": fleet.reported_available,
        "estimated_available": fleet.estimated_free,
        "last_check": None if probe is None else probe.describe(capacity_key),
        "last_check_passed": None if probe is None else probe.passed,
        "last_check_age_s": (
            None
            if fleet.last_probe_monotonic is None
            else round(time.monotonic() - fleet.last_probe_monotonic, 1)
        ),
        "last_check_ms": (
            None if fleet.last_probe_seconds is None else round(fleet.last_probe_seconds * 1000, 1)
        ),
        "certificate_not_after": fleet.certificate_not_after,
        "checks_total": fleet.probes_total,
        "check_failures": fleet.check_failures,
        "calls_total": counts.counter("fleet_calls", name),
        "responses": {str(code): n for code, n in sorted(responses.items())},
        "responses_429": responses.get(429, 0),
        "retries": counts.counter("fleet_retries", name),
        "redispatches": counts.counter("fleet_redispatches", name),
        "calls_ended": ended,
    }


def removed_fleets_row(
    present: set[str],
    counts: Counts,
    responses_of: dict[str, dict[str, int]],
    ended_of: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """The lifetime call counters of every fleet no longer in the set, summed:
    those removed but not forgotten yet (by name in the counts) and those
    forgotten (under REMOVED_FLEETS). Without it the fleets' rows stopped
    adding up to the frontend's totals (requests by code, calls ended) as a
    fleet was removed, and a removed fleet's 429s and calls were in no row."""

    def gone(name: str) -> bool:
        return name not in present and name != ""

    responses: dict[str, int] = {}
    ended: dict[str, int] = {}
    for grouped, into in ((responses_of, responses), (ended_of, ended)):
        for name, by_label in grouped.items():
            if gone(name):
                for label, n in by_label.items():
                    into[label] = into.get(label, 0) + n

    totals = dict.fromkeys(("fleet_calls", "fleet_retries", "fleet_redispatches"), 0)
    for key, n in counts.counters.items():  # one pass, unsorted: 500 fleets' keys
        if len(key) == 2 and key[0] in totals and gone(key[1]):
            totals[key[0]] += n
    return {
        "calls_total": totals["fleet_calls"],
        "responses": dict(sorted(responses.items(), key=lambda e: (len(e[0]), e[0]))),
        "responses_429": responses.get("429", 0),
        "retries": totals["fleet_retries"],
        "redispatches": totals["fleet_redispatches"],
        "calls_ended": dict(sorted(ended.items())),
    }


def render(
    fleets: Iterable[FleetState],
    counts: Counts,
    *,
    queue_length: int,
    queue_timeouts: int,
    started_at: float,
    certificate_not_after: float | None = None,
    capacity_key: str = "fleet_available",
    stopping: bool = False,
    workers: Sequence[dict[str, Any]] | None = None,
    last_reload: dict[str, Any] | None = None,
    acme_listening: bool = True,
) -> dict[str, Any]:
    """`started_at`: time.monotonic() at the start (uptime does not move with the wall clock).
    `workers`: a row per worker process (the supervisor's view); None leaves the key out.
    `last_reload`: the outcome of the last reload (`reload_outcome`), None before any.
    `acme_listening`: whether the :80 listener is open (listen.acme at the start)."""
    now = time.time()
    fleets = list(fleets)
    requests: dict[str, dict[str, int]] = {}
    for (route, status), n in counts.family("requests", 2):
        requests.setdefault(route, {})[status] = n
    responses_of = by_fleet(counts, "fleet_responses")
    ended_of = by_fleet(counts, "calls_ended")
    ended: dict[str, int] = {}  # every fleet's, a removed one's too: since the start
    for reasons in ended_of.values():
        for reason, n in reasons.items():
            ended[reason] = ended.get(reason, 0) + n
    # Of the calls ended "refused", whose answer the carrier got, by status:
    # the fleet's own passed through, or the ingress's (`Registry.refused`;
    # none from workers of a release before it).
    refused: dict[str, dict[str, int]] = {"fleet": {}, "ingress": {}}
    for (who, status), n in counts.family("calls_refused", 2):
        refused.setdefault(who, {})[status] = n
    gauges = counts.gauges
    # The calls handed a slot after a wait in the queue, and their waits' sum
    # (fleet_ingress_queue_wait_seconds: its count and sum; none before a
    # release that kept it).
    waited = counts.histograms.get(QUEUE_WAIT)
    snap: dict[str, Any] = {
        "version": __version__,
        "code": code_digest(),  # this process's (the supervisor's); each worker's in its row
        "time": now,
        "uptime_s": round(time.monotonic() - started_at, 1),
        # "draining" once a stop has begun: no new calls, the live ones may finish.
        "state": "draining" if stopping else "serving",
        "certificate_not_after": certificate_not_after,
        "last_reload": last_reload,
        "frontend": {
            "connections": gauges.get(("connections",), 0),
            "connections_total": counts.counter("connections_total"),
            "tls_handshake_failures": counts.counter("tls_handshake_failures"),
            "refused_connections": counts.counter("refused_connections"),
            # The plain-HTTP listener (:80): what /metrics alone had (the :80 audit
            # of session 32), a flood there keeping certbot's validation out.
            "acme_listening": acme_listening,
            "acme_connections": gauges.get(("acme_connections",), 0),
            "acme_refused_connections": counts.counter("acme_refused_connections"),
            "acme_evicted_connections": counts.counter("acme_evicted_connections"),
            "calls_ended": dict(sorted(ended.items())),
            "calls_refused": refused,
            "active_calls": gauges.get(("active_calls",), 0),
            # Calls ended (their access line written) whose connections are
            # still closing: a close frame and the TLS close flushed to a peer
            # slow to read or gone, 10 s at most each (`Registry.closing`).
            "closing_calls": gauges.get(("closing_calls",), 0),
            "queue_length": queue_length,
            "queue_timeouts": queue_timeouts,
            "queue_waits": 0 if waited is None else waited.count,
            "queue_wait_s": 0.0 if waited is None else round(waited.sum, 3),
            "requests": requests,
            "bytes_from_carrier": counts.counter("bytes_from_carrier"),
            "bytes_to_carrier": counts.counter("bytes_to_carrier"),
        },
        "fleets": [fleet_row(f, capacity_key, counts, responses_of, ended_of) for f in fleets],
        "removed_fleets": removed_fleets_row(
            {f.name for f in fleets}, counts, responses_of, ended_of
        ),
    }
    if workers is not None:
        snap["workers"] = list(workers)
    return snap


def snapshot(
    balancer: Balancer,
    registry: Registry,
    dispatcher: SlotQueue,
    *,
    started_at: float,
    certificate_not_after: float | None = None,
    capacity_key: str = "fleet_available",
    stopping: bool = False,
    last_reload: dict[str, Any] | None = None,
    acme_listening: bool = True,
    histograms: Mapping[Key, Observed] | None = None,
    forgotten: Mapping[tuple[str, ...], int] | None = None,
) -> dict[str, Any]:
    """The one-process ingress: everything from this process (`histograms`:
    its per-call histograms, `IngressMetrics.histograms`; `forgotten`: the
    counters of the fleet records it has dropped, `FleetOps.forgotten_counts`)."""
    fleets = balancer.fleets
    return render(
        fleets,
        local_counts(registry, fleets, histograms, forgotten),
        queue_length=dispatcher.queue_length,
        queue_timeouts=dispatcher.queue_timeouts,
        started_at=started_at,
        certificate_not_after=certificate_not_after,
        capacity_key=capacity_key,
        stopping=stopping,
        last_reload=last_reload,
        acme_listening=acme_listening,
    )
