"""Which crash snapshots to write: what a supervisor started after this one
died must find at once, and what may be some seconds behind. No I/O.

The supervisor takes its state every SNAPSHOT_EVERY (`fd_store.CrashSnapshot.
keep_up`). Encoded and written whole each time, it was 60 % of an idle
supervisor's instructions (1.9 M a second of 3.2 M, session 39), though the
state moves every second on its own: the probes' counters and times, each live
worker's last report and its age, the supervisor's counters. So what moved is
told on the state's `settled` part, everything but the MOVING_* below: a state
whose settled part is as last written is written again only QUIET_WRITE_EVERY
after the last write.

What may be behind a crash restart by up to QUIET_WRITE_EVERY, and why that
is enough:

- counters (probe checks, queue timeouts, slots reclaimed, the operator
  sites' connections, log lines dropped): a death loses what was counted
  since the last write, never what a scraper or `stat` saw (each writes the
  snapshot before its answer: `Supervisor.refresh`, `stats_app`'s `shown`);
- the probes' figures and times (the capacity last reported, the probe's
  time and length): the restarted supervisor probes every fleet before it
  grants a slot;
- each live worker's last report and its age (`view`'s "latest"): the
  worker reports again, cumulatively, to the restarted supervisor, which
  then holds its exact totals; the retired workers' totals, which only the
  snapshot keeps, are settled (they move as a worker leaves);
- what each worker held (`workers`' "held"): counted only for a worker slow
  to say what it holds after the restart, an estimate already.

Everything else (the workers and their retirement, each fleet's health,
admin state and membership, restarts and deaths, OOM kills, reloads,
upgrades, what runs, the fd store's count) is settled: a change is written
within SNAPSHOT_EVERY, as before. A key added to the state is settled unless
named here.
"""

from __future__ import annotations

import marshal
from collections.abc import Mapping
from typing import Any

# The longest a settled state goes unwritten: what a crash restart may lose of
# the counters and figures above.
QUIET_WRITE_EVERY = 10.0

# Top-level keys of `UpgradeSequence.crash_snapshot` that move on their own.
MOVING_KEYS = frozenset(
    {
        "started_at",  # the wall clock's start: recomputed from the two clocks each time
        "fleet_checks",
        "queue_timeouts",
        "reclaimed_total",
        "operator_connections",
        "log_lines_dropped",
        "unexpected_errors",
    }
)
# Of each fleet's entry (`upgrade.fleets_to_json`): the probes' counters and figures.
MOVING_FLEET_KEYS = frozenset(
    {
        "reported_available",
        "opened_total",
        "opened_at_probe",
        "last_probe_at",
        "last_probe_seconds",
        "probes_total",
        "check_failures",
        "last_probe_monotonic",
    }
)
# Of each worker's entry: the fleets of the slots it holds, as calls come and go.
MOVING_WORKER_KEYS = frozenset({"held"})


# Top-level keys whose value is made once and shared, never changed in place,
# until what it describes changes (`upgrade.RunningJson`: the configuration,
# fleets and certificate run, some 300 strings): marshalled once an object.
SHARED_KEYS = frozenset({"running"})


class _Marshalled:
    """The marshal bytes of the last object seen under each SHARED_KEYS key,
    held with it (so that its identity is not another's later)."""

    __slots__ = ("_by_key",)

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[Any, bytes]] = {}

    def of(self, key: str, value: Any) -> bytes:
        kept = self._by_key.get(key)
        if kept is None or kept[0] is not value:
            kept = self._by_key[key] = (value, marshal.dumps(value, 0))
        return kept[1]


_shared = _Marshalled()


def settled(state: Mapping[str, Any]) -> bytes | None:
    """`state` (a crash snapshot's, before its sequence is stamped) less what
    moves on its own, as bytes: equal for two states a crash restart would
    take up alike but for the MOVING_* parts. Bytes, not the parts: the
    state shares objects changed in place later (an upgrade's status, the
    last reload's outcome), which a kept copy would follow. Marshal's format
    0: no references and no interned strings, so equal values give equal
    bytes (and, decodable, unequal ones unequal bytes); C speed, no escaping
    of the certificate's text. None for a value marshal cannot write (a
    subclass of int or str): never settled, written every time."""
    kept: dict[str, Any] = {k: v for k, v in state.items() if k not in MOVING_KEYS}
    try:
        for key in SHARED_KEYS & kept.keys():
            kept[key] = _shared.of(key, kept[key])
    except ValueError:
        return None
    if isinstance(fleets := kept.get("fleets"), list):
        kept["fleets"] = [_less(entry, MOVING_FLEET_KEYS) for entry in fleets]
    if isinstance(workers := kept.get("workers"), list):
        kept["workers"] = [_less(entry, MOVING_WORKER_KEYS) for entry in workers]
    if isinstance(view := kept.get("view"), dict):
        kept["view"] = _settled_view(view)
    try:
        return marshal.dumps(kept, 0)
    except ValueError:
        return None


def _less(entry: Any, moving: frozenset[str]) -> Any:
    if not isinstance(entry, dict):
        return entry
    return {k: v for k, v in entry.items() if k not in moving}


def _settled_view(view: Mapping[str, Any]) -> dict[str, Any]:
    """The host view (`HostView.to_json`) less each live worker's report and
    its age: which workers are live stays (one that leaves moves `retired`)."""
    live = []
    for entry in view.get("latest", ()):
        report = entry.get("report") if isinstance(entry, dict) else None
        if isinstance(report, dict):
            live.append((report.get("pid"), report.get("generation"), report.get("started")))
    return {**{k: v for k, v in view.items() if k != "latest"}, "live": live}


def due(now: bytes | None, written: bytes | None, since_written: float) -> bool:
    """Whether a state taken is written: its settled part (`now`) is not the
    last one written's (`written`; None: unknown), or `since_written` seconds
    have passed since that write (QUIET_WRITE_EVERY)."""
    return now is None or now != written or since_written >= QUIET_WRITE_EVERY
