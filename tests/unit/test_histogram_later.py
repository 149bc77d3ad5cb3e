"""ops.histogram_later: observed amounts, added up when read, read as
prometheus_client's own Histogram reads them, to the bit."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from fleet_ingress.ops.histogram_later import PENDING_AT_MOST, HistogramAddedUpLater
from fleet_ingress.ops.local_counts import histo_of
from fleet_ingress.ops.metrics import HISTOGRAMS


def _samples(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in histogram.collect() for s in f.samples]


def _same(a: list[tuple[str, dict[str, str], float]], b: list[tuple[str, dict[str, str], float]]):
    assert [(n, labels) for n, labels, _ in a] == [(n, labels) for n, labels, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert x == y or (math.isnan(x) and math.isnan(y))


def _amounts(buckets: tuple[float, ...], n: int, seed: int) -> list[float]:
    rnd = random.Random(seed)
    special = [0.0, -0.0, -1.0, buckets[0], buckets[-1], math.inf, 1e-9]  # no -inf: a NaN sum
    return [
        rnd.choice(special) if rnd.random() < 0.2 else rnd.uniform(0, buckets[-1] * 1.2)
        for _ in range(n)
    ]


@pytest.mark.parametrize("key", list(HISTOGRAMS))
def test_read_at_any_point_it_says_what_observe_would_have(key) -> None:
    _doc, buckets = HISTOGRAMS[key]
    registry = CollectorRegistry()
    later = HistogramAddedUpLater("later", "", buckets=buckets, registry=registry)
    now = Histogram("now", "", buckets=buckets, registry=registry)
    amounts = _amounts(buckets, 3 * PENDING_AT_MOST + 7, seed=len(buckets))
    for i, amount in enumerate(amounts):
        later.observe(amount)
        now.observe(amount)
        if i % 37 == 0:  # read through collect() (a scrape) and its buckets (a report)
            _same(
                [(n.replace("later", "now"), labels, v) for n, labels, v in _samples(later)],
                _samples(now),
            )
        if i % 23 == 0:
            assert histo_of(later) == histo_of(now)
    assert histo_of(later) == histo_of(now)


def test_nan_is_summed_and_in_no_bucket_as_prometheus_client_does() -> None:
    later = HistogramAddedUpLater("later", "", buckets=(1, 2), registry=None)
    now = Histogram("now", "", buckets=(1, 2), registry=None)
    for h in (later, now):
        h.observe(0.5)
        h.observe(math.nan)
        h.observe(3.0)
    _same(
        [(n.replace("later", "now"), labels, v) for n, labels, v in _samples(later)],
        _samples(now),
    )


def test_amounts_nobody_reads_are_added_up_past_a_bound() -> None:
    """A process whose histograms nobody reads keeps a bounded list."""
    later = HistogramAddedUpLater("later", "", buckets=(1, 2), registry=None)
    for _ in range(10 * PENDING_AT_MOST):
        later.observe(1.5)
        assert len(later._pending) < PENDING_AT_MOST
    assert histo_of(later).count == 10 * PENDING_AT_MOST
