"""A prometheus_client Histogram whose observations are added up when read.

A call observes two histograms (its handshake as it links, its duration as it
ends). prometheus_client's `Histogram.observe` is five Python calls, two locks
and a walk along the bounds each time (about 10 of a churned call's 980 Python
calls, session 46): work for a reader that comes once a second (a worker's
report) or once a scrape. Here `observe` keeps the amount; the buckets and the
sum are brought up to date when anything reads them (`collect()`, or
`add_up()`, which `local_counts.histo_of` calls before it reads the buckets),
and whenever PENDING_AT_MOST amounts wait, so that a process nobody reads
holds no more than that. What a reader sees is what prometheus_client's own
observe would have made, to the bit: each amount in the first bucket whose
bound is not below it (none for NaN), the sum added to in the order observed.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
import threading
from collections.abc import Iterable

from prometheus_client import Histogram
from prometheus_client.samples import Sample

# Amounts kept before they are added up: a few seconds of calls at most.
PENDING_AT_MOST = 64


class HistogramAddedUpLater(Histogram):
    """`Histogram` (no labels, no exemplars kept) whose `observe` is a list's append."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._pending: list[float] = []
        # Readers (a scrape's thread, the loop's report) take turns; `observe`
        # never waits for them: an amount appended while one adds up is left
        # for the next (`del pending[:n]` takes out only the n it added).
        self._adding_up = threading.Lock()

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:  # kept by prometheus_client's own observe, in order
            self.add_up()
            super().observe(amount, exemplar)
            return
        pending = self._pending
        pending.append(amount)
        if len(pending) >= PENDING_AT_MOST:
            self.add_up()

    def add_up(self) -> None:
        """Bring the buckets and the sum up to date with the amounts observed."""
        with self._adding_up:
            pending = self._pending
            n = len(pending)
            if not n:
                return
            amounts = pending[:n]
            del pending[:n]
            total = self._sum
            total.set(functools.reduce(operator.add, amounts, total.get()))
            bounds = self._upper_bounds  # ascending, the last +Inf
            # Counted in a list, not a Counter: Counter(iterable) asks
            # isinstance(iterable, Mapping), an ABC's check that cost more than
            # the rest of the add-up (callgrind, session 46).
            landed = [0] * len(bounds)
            for amount in amounts:
                if amount <= math.inf:  # NaN is in no bucket: `amount <= bound` never holds
                    landed[bisect.bisect_left(bounds, amount)] += 1
            for bucket, count in zip(self._buckets, landed, strict=True):
                if count:
                    bucket.inc(count)

    def _child_samples(self) -> Iterable[Sample]:
        self.add_up()
        return super()._child_samples()
