"""The host's counters, summed over worker processes that come and go. No I/O.

Each worker counts what it serves (connections, requests, bytes, calls ended,
per-fleet answers, histograms) in its own memory and sends the whole of it,
cumulative since it started, when the supervisor asks (`report`, on the slot
channel) and once more as it exits cleanly. The supervisor keeps, here:

- the **latest report of each live worker**, by (pid, generation): a newer
  report replaces the older one (a report read twice, or an older one read
  after a newer, changes nothing: reports carry a sequence number);
- **`retired`**: the last report of every worker that is gone, added once,
  when it leaves (`leave`).

The host's counter is `retired + sum(latest of each live worker)`. A worker's
counters only grow, so the sum never goes down and never counts anything
twice, through restarts, crashes and an old generation draining beside a new
one. What a worker counted after its last report and before a crash is lost
(the supervisor pulls reports every few seconds and at every scrape to keep
that short). Gauges (connections open now, calls now) are summed over live
workers only and leave with them.

Across the supervisor's own re-execution (an upgrade), `to_json()` /
`from_json()` carry the retired totals and each worker's last report.

Histograms are kept as cumulative bucket counts; workers of two versions
with different bucket bounds are merged onto the bounds they share (exact at
each of those bounds), never interpolated.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, ...]  # a family name then its label values, e.g. ("requests", "/ws/", "101")
WorkerId = tuple[int, int]  # (pid, generation)

# Late reports of workers already retired are ignored; this many are remembered.
_RETIRED_IDS_KEPT = 1024


class ReportError(ValueError):
    """A report that is not one (a worker of another version, a bug): named for the log."""


@dataclass(frozen=True, slots=True)
class Histo:
    """One histogram's cumulative state: `cumulative[i]` observations <= `bounds[i]`,
    the last entry (bound +Inf) is the count."""

    bounds: tuple[float, ...]  # finite upper bounds, increasing
    cumulative: tuple[int, ...]  # len(bounds) + 1
    sum: float

    def __post_init__(self) -> None:
        if len(self.cumulative) != len(self.bounds) + 1:
            raise ReportError(
                f"histogram with {len(self.bounds)} bounds needs {len(self.bounds) + 1} counts"
            )

    @property
    def count(self) -> int:
        return self.cumulative[-1]

    def __add__(self, other: Histo) -> Histo:
        if other.bounds == self.bounds:
            bounds = self.bounds
            mine, theirs = self.cumulative, other.cumulative
        else:
            # Exact only where both have a bound: keep those.
            shared = set(other.bounds)
            bounds = tuple(b for b in self.bounds if b in shared)
            mine = self._at(bounds)
            theirs = other._at(bounds)
        merged = tuple(a + b for a, b in zip(mine, theirs, strict=True))
        return Histo(bounds, merged, self.sum + other.sum)

    def _at(self, bounds: tuple[float, ...]) -> tuple[int, ...]:
        index = {b: i for i, b in enumerate(self.bounds)}
        return (*(self.cumulative[index[b]] for b in bounds), self.count)

    def to_wire(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "cumulative": list(self.cumulative), "sum": self.sum}

    @classmethod
    def from_wire(cls, data: Any) -> Histo:
        try:
            bounds = tuple(float(b) for b in data["bounds"])
            cumulative = tuple(_count(c) for c in data["cumulative"])
            total = float(data["sum"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"not a histogram: {exc}") from None
        if any(not math.isfinite(b) for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ReportError("histogram bounds must be finite and increasing")
        return cls(bounds, cumulative, total)


def _count(value: Any) -> int:
    # Bounded: a count past 2**63 broke every /metrics render for good (an
    # OverflowError turning it into a float; the review of session 24).
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _COUNT_LIMIT:
        raise ReportError(f"a count must be a whole number from 0 to 2**63, not {value!r}")
    return value


_COUNT_LIMIT = 2**63


@dataclass(slots=True)
class Counts:
    """What one process counted (or the sum over several)."""

    counters: Counter[Key] = field(default_factory=Counter)  # only grow
    gauges: Counter[Key] = field(default_factory=Counter)  # now-values
    histograms: dict[Key, Histo] = field(default_factory=dict)

    def add(self, other: Counts, *, gauges: bool = True) -> None:
        """Add `other` into this one (`gauges=False`: its counters and histograms only)."""
        self.counters.update(other.counters)
        if gauges:
            self.gauges.update(other.gauges)
        for key, histo in other.histograms.items():
            mine = self.histograms.get(key)
            self.histograms[key] = histo if mine is None else mine + histo

    def copy(self) -> Counts:
        return Counts(Counter(self.counters), Counter(self.gauges), dict(self.histograms))

    def counter(self, *key: str) -> int:
        return self.counters.get(key, 0)

    def family(self, name: str, labels: int) -> list[tuple[tuple[str, ...], int]]:
        """(label values, value) of each counter of one family, sorted; only
        keys with `labels` label values. A worker's report is read as any
        strings (a release with other labels may still be draining), and the
        host's pages unpack each key: one of another shape made every stats
        page a 500, kept in the retired counts for good, and the next upgrade's
        image exit at its first metric (the channel audit of session 24)."""
        return sorted(
            (key[1:], n)
            for key, n in self.counters.items()
            if key[0] == name and len(key) == labels + 1
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "counters": [[*key, n] for key, n in sorted(self.counters.items())],
            "gauges": [[*key, n] for key, n in sorted(self.gauges.items())],
            "histograms": [[*key, h.to_wire()] for key, h in sorted(self.histograms.items())],
        }

    @classmethod
    def from_wire(cls, data: Any) -> Counts:
        if not isinstance(data, dict):
            raise ReportError("'counts' must be an object")
        counts = cls()
        for name, target in (("counters", counts.counters), ("gauges", counts.gauges)):
            _add_entries(target, _entries(data, name))
        for entry in _entries(data, "histograms"):
            counts.histograms[_key(entry[:-1])] = Histo.from_wire(entry[-1])
        return counts


def _entries(data: dict[str, Any], name: str) -> list[list[Any]]:
    entries = data.get(name, [])
    if not isinstance(entries, list) or not all(
        isinstance(e, list) and len(e) >= 2 for e in entries
    ):
        raise ReportError(f"'{name}' must be a list of [key..., value]")
    return entries


def _add_entries(target: Counter[Key], entries: list[list[Any]]) -> None:
    """`target[key] += value` for each [key..., value], each checked as `_key`
    and `_count` check it, by them only when a quicker test fails: a worker's
    report at 500 fleets is 4,000 entries, read 3-5 ms a report in one piece of
    the supervisor's loop (the scale audit of session 34), now 1-1.5 ms."""
    get = target.get
    for entry in entries:
        key, value = tuple(entry[:-1]), entry[-1]
        try:
            "".join(key)  # a TypeError unless every part is a str
        except TypeError:
            key = _key(entry[:-1])  # refused there
        if type(value) is not int or not 0 <= value < _COUNT_LIMIT:
            value = _count(value)  # a bool, a float, out of range: refused there
        target[key] = get(key, 0) + value


def _wall_clock(value: Any) -> float:
    """A time as seconds since the epoch, within what the pages can show (a
    year before 10,000: time.gmtime raised past it, /stats a 500)."""
    when = float(value)
    if not 0.0 <= when < _LAST_WALL_CLOCK:
        raise ReportError(f"'started' is not a time: {value!r}")
    return when


_LAST_WALL_CLOCK = 253_402_300_800.0  # 10000-01-01T00:00:00Z


def _key(parts: list[Any]) -> Key:
    if not all(isinstance(p, str) for p in parts):
        raise ReportError(f"a key is strings, not {parts!r}")
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """One worker's account of itself, cumulative since it started."""

    pid: int
    generation: int
    seq: int  # grows with each report of this process
    started: float  # wall clock: tells a new process from an old one with the same pid
    counts: Counts
    calls: int = 0  # live calls now
    draining: bool = False  # stopped accepting, finishing its calls
    final: bool = False  # sent as it exits: nothing follows
    process: Mapping[str, float] = field(default_factory=dict)  # cpu_seconds, resident_bytes
    code: str | None = None  # its code's digest (release.code_digest); None: not said

    @property
    def worker(self) -> WorkerId:
        return (self.pid, self.generation)

    def to_wire(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "generation": self.generation,
            "seq": self.seq,
            "started": self.started,
            "calls": self.calls,
            "draining": self.draining,
            "final": self.final,
            "process": dict(self.process),
            "counts": self.counts.to_wire(),
            **({} if self.code is None else {"code": self.code}),
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> WorkerReport:
        try:
            process = data.get("process", {})
            return cls(
                pid=_count(data["pid"]),
                generation=_count(data["generation"]),
                seq=_count(data["seq"]),
                started=_wall_clock(data["started"]),
                counts=Counts.from_wire(data["counts"]),
                calls=_count(data.get("calls", 0)),
                draining=bool(data.get("draining", False)),
                final=bool(data.get("final", False)),
                process={str(k): float(v) for k, v in process.items()},
                code=None if data.get("code") is None else str(data["code"])[:64],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ReportError):
                raise
            raise ReportError(f"not a worker report: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A live worker as the host's stats show it."""

    pid: int
    generation: int
    started: float
    calls: int
    connections: int
    draining: bool
    last_report_age: float  # seconds
    process: Mapping[str, float]
    code: str | None = None  # its code's digest, as it said
    # Its calls ended whose connections are still closing (last report; 0 from
    # a release before it said).
    closing_calls: int = 0


class HostView:
    def __init__(self) -> None:
        self.retired = Counts()  # counters and histograms of workers gone (no gauges)
        self.retired_workers = 0
        self._latest: dict[WorkerId, tuple[WorkerReport, float]] = {}  # report, when read
        # What the supervisor keeps of every worker gone: its id, the last
        # _RETIRED_IDS_KEPT of them (the rest is folded into `retired`). The set
        # mirrors the deque: `report` asks it about every report read.
        self._gone: deque[tuple[WorkerId, float]] = deque(maxlen=_RETIRED_IDS_KEPT)
        self._gone_ids: set[tuple[WorkerId, float]] = set()
        # Each live worker's last report as `to_json` wrote it, by the report
        # it was made of: the crash snapshot takes the view every second, and
        # a report is read every PULL_EVERY (5 s) when no call is live.
        self._wires: dict[WorkerId, tuple[WorkerReport, dict[str, Any]]] = {}
        # `retired` as `to_json` last wrote it, and copies of its three parts
        # then: its counters sorted once, not every second, while nothing
        # retires (the parts are changed in place elsewhere: `worker_pool`'s
        # lost calls, `fold_fleets_gone`, an exec's dropped lines).
        self._retired_wire: tuple[Counts, dict[str, Any]] | None = None

    def report(self, report: WorkerReport, now: float) -> bool:
        """Take a worker's report, read at `now` (a monotonic clock that survives
        an exec: `time.monotonic()`). False when it tells nothing new: older than
        the one kept, or from a worker that has already left."""
        worker = report.worker
        if (worker, report.started) in self._gone_ids:
            return False
        kept = self._latest.get(worker)
        if kept is not None:
            previous = kept[0]
            if previous.started != report.started:
                # The pid came round again for a new process: the old one is gone.
                self.leave(worker)
            elif report.seq <= previous.seq:
                return False
        self._latest[worker] = (report, now)
        return True

    def leave(self, worker: WorkerId) -> WorkerReport | None:
        """The worker is gone (exited, crashed, cut off): its last report is
        added to `retired`, once. Returns that report (None: it never reported)."""
        kept = self._latest.pop(worker, None)
        if kept is None:
            return None
        report = kept[0]
        self.retired.add(report.counts, gauges=False)
        self.retired_workers += 1
        self._remember_gone((worker, report.started))
        return report

    def _remember_gone(self, gone: tuple[WorkerId, float]) -> None:
        if len(self._gone) == self._gone.maxlen:
            self._gone_ids.discard(self._gone[0])  # the oldest, about to drop out
        self._gone.append(gone)
        self._gone_ids.add(gone)

    def retire_absent(self, present: Collection[WorkerId]) -> list[WorkerId]:
        """Retire every worker not in `present` (after a re-execution: the
        workers whose channel did not come through). Returns them."""
        absent = [w for w in self._latest if w not in present]
        for worker in absent:
            self.leave(worker)
        return absent

    @property
    def live(self) -> list[WorkerReport]:
        return [report for report, _ in self._latest.values()]

    def totals(self) -> Counts:
        """The host's counts now: retired plus every live worker's last report."""
        total = self.retired.copy()
        for report, _ in self._latest.values():
            total.add(report.counts)
        return total

    def workers(self, now: float) -> list[WorkerView]:
        return [
            WorkerView(
                pid=report.pid,
                generation=report.generation,
                started=report.started,
                calls=report.calls,
                connections=report.counts.gauges.get(("connections",), 0),
                draining=report.draining,
                last_report_age=max(0.0, now - read_at),
                process=report.process,
                code=report.code,
                closing_calls=report.counts.gauges.get(("closing_calls",), 0),
            )
            for report, read_at in sorted(self._latest.values(), key=lambda kept: kept[0].worker)
        ]

    # -- over the supervisor's re-execution ------------------------------------

    def to_json(self, now: float) -> dict[str, Any]:
        """What `from_json` reads. Its reports' parts are shared from one call
        to the next while no newer report came: read, never changed."""
        return {
            "retired": self._retired_to_wire(),
            "retired_workers": self.retired_workers,
            "latest": [
                {"report": self._wire(report), "age": max(0.0, now - read_at)}
                for report, read_at in self._latest.values()
            ],
            "gone": [[pid, generation, started] for (pid, generation), started in self._gone],
        }

    def _retired_to_wire(self) -> dict[str, Any]:
        """`retired.to_wire()`, made again only when `retired` holds other
        counts than when it was last made: compared whole with a copy (dicts
        compared in C, a histogram by identity first: `Histo` is frozen), not
        trusted to a mark that each place changing it would have to set.
        `dict.__eq__`, not `Counter`'s ==, which takes a key at 0 for a key
        missing: the wire writes that key."""
        retired, kept = self.retired, self._retired_wire
        if kept is not None:
            seen, wire = kept
            if (
                dict.__eq__(retired.counters, seen.counters)
                and dict.__eq__(retired.gauges, seen.gauges)
                and retired.histograms == seen.histograms
            ):
                return wire
        wire = retired.to_wire()
        self._retired_wire = (retired.copy(), wire)
        return wire

    def _wire(self, report: WorkerReport) -> dict[str, Any]:
        """`report.to_wire()`, made once a report (its counters sorted: 40 to
        4,000 entries a worker)."""
        kept = self._wires.get(report.worker)
        if kept is None or kept[0] is not report:
            if len(self._wires) > len(self._latest):  # workers gone since
                self._wires = {w: k for w, k in self._wires.items() if w in self._latest}
            kept = self._wires[report.worker] = (report, report.to_wire())
        return kept[1]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], now: float) -> HostView:
        """The view `to_json` described, in a new process (`now` on its clock)."""
        view = cls()
        try:
            view.retired = Counts.from_wire(data["retired"])
            view.retired.gauges.clear()
            view.retired_workers = _count(data["retired_workers"])
            for entry in data["latest"]:
                try:
                    report = WorkerReport.from_wire(entry["report"])
                except ReportError:  # one an earlier release took and this one
                    continue  # refuses: its worker reports again
                view._latest[report.worker] = (report, now - float(entry["age"]))
            for pid, generation, started in data.get("gone", []):
                view._remember_gone(((int(pid), int(generation)), float(started)))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ReportError):
                raise
            raise ReportError(f"not a host view: {exc!r}") from None
        return view
