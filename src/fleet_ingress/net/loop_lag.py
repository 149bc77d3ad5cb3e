"""How late the event loop runs a timer: the jitter every live call feels.

Every call's frames, every handshake and every scrape share one event loop;
work that holds it (a large head's parse, a TLS handshake, a stats page)
delays every call's next 20 ms audio frame by as much. A timer set every
`interval` seconds (on average) and measured on firing shows that delay
directly, at the cost of one callback per interval.

Each wait is drawn between half and one and a half intervals. A timer set a
fixed interval after it fired locks onto a stall that recurs at a multiple of
that interval (work every second, say): after the first, it is always due
just as the stall ends, and the lag it reports is nil (the alerts audit of
session 17: 50 ms stalls every 200 ms, for a minute, recorded nothing).

Given `busy`, the probe rests while nothing is there to feel a lag: a worker
with no connection is woken by nothing else (its report comes every 5 s), and
the probe alone woke it five times a second, all night on an idle host (the
idle audit of session 39: 5.1 wake-ups a second, 4.8 of them this timer). A
probe that fires and finds `busy()` false sets no next timer; `wake()` (a
connection counted) sets it again, its first wait drawn as any other.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

DEFAULT_INTERVAL = 0.2


class LoopLagProbe:
    def __init__(
        self,
        observe: Callable[[float], None],
        interval: float = DEFAULT_INTERVAL,
        *,
        draw: Callable[[], float] = random.random,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        """`busy()`: whether anything is there to feel a lag (None: always)."""
        self.observe = observe
        self.interval = interval
        self._draw = draw  # in [0, 1): where in the interval's span the next wait ends
        self._busy = busy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._started = False

    @property
    def running(self) -> bool:
        """Started and not stopped (resting or not)."""
        return self._started

    @property
    def resting(self) -> bool:
        """Started, but no timer set: nothing was busy when it last looked."""
        return self._started and self._handle is None

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._loop = asyncio.get_running_loop()
            self._schedule_if_busy()

    def stop(self) -> None:
        self._started = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def wake(self) -> None:
        """Something may be busy now (a connection came): a resting probe sets its timer."""
        if self._started and self._handle is None:
            self._schedule()

    def _schedule_if_busy(self) -> None:
        if self._busy is None or self._busy():
            self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + self.interval * (0.5 + self._draw())
        self._handle = self._loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        self._handle = None
        # A timer never fires early, but the loop's clock granularity can make
        # it look a hair early: no negative lag.
        try:
            self.observe(max(0.0, self._loop.time() - self._due))
        finally:
            # Set again whatever the observer did: one that raised (the loop logs
            # it) must not leave the probe stopped while `running` says it runs,
            # the lag metric flat for good. Not after a stop by the observer.
            if self._started:
                self._schedule_if_busy()
