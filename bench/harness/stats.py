"""Figures from numbers, no I/O: percentiles, 5 % histograms, ratios, trends.

Two kinds of percentile, on purpose. Where a generator kept every round trip
(the steady, idle, churn and ramp windows) :func:`percentile` is exact. Where
it only sent counts (live progress, a long soak that must not keep an array
per frame) it sends :func:`histogram` buckets 5 % wide, and
:func:`hist_percentile` gives the upper bound of the bucket the percentile
falls in: at most 5 % above the exact figure, never below it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

HIST_FLOOR = 0.01  # ms: the first bucket holds everything up to this
HIST_BASE = 1.05  # each bucket 5 % wider than the one before

Histogram = dict[int, int]


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (as ``fleet_ingress.sim.summarize``); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return round(ordered[int(rank) - 1], 3)


def histogram(values: Iterable[float]) -> Histogram:
    """Values (ms) in buckets 5 % wide: bucket ``b`` holds up to :func:`bucket_upper` ``(b)``."""
    hist: Histogram = {}
    for v in values:
        b = max(0, math.ceil(math.log(max(v, HIST_FLOOR) / HIST_FLOOR, HIST_BASE)))
        hist[b] = hist.get(b, 0) + 1
    return hist


def bucket_upper(bucket: int) -> float:
    return HIST_FLOOR * HIST_BASE**bucket


def merge(hists: Iterable[Histogram]) -> Histogram:
    out: Histogram = {}
    for hist in hists:
        for b, n in hist.items():
            out[b] = out.get(b, 0) + n
    return out


def hist_percentile(hist: Histogram, p: float) -> float | None:
    """Percentile of a :func:`histogram`, as its bucket's upper bound; None when empty."""
    total = sum(hist.values())
    if not total:
        return None
    need, seen = total * p / 100, 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= need:
            return round(bucket_upper(b), 3)
    return None


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def round_or_none(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None when undefined."""
    if len(points) < 2:
        return None
    mx = mean([p[0] for p in points]) or 0.0
    my = mean([p[1] for p in points]) or 0.0
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 60


def count_between(values: Sequence[float], start: float, end: float) -> int:
    """How many of the sorted ``values`` lie in [start, end]."""
    return bisect.bisect_right(values, end) - bisect.bisect_left(values, start)


def stagger(calls: int, interval: float, ramp: float) -> float:
    """Delay between call starts, ~``ramp / calls``, chosen so the calls' frame clocks
    fall at ``calls`` distinct, evenly spaced phases of ``interval``.

    ``ramp / calls`` itself can be a multiple of the interval (100 calls over 2 s
    with 20 ms frames), which puts every call's frames in the same burst. With
    ``stagger = m * interval / calls`` and ``m`` prime to ``calls``, call ``i``
    starts at phase ``i * m mod calls`` (in ``interval / calls`` units): each once.
    """
    m = max(1, round(ramp / interval))
    while math.gcd(m, calls) != 1:
        m += 1
    return m * interval / calls
