"""When a busy worker takes its next connection: live calls before new connections.

A worker's live calls and its new connections share one CPU. A new
connection costs far more than a frame (a TLS handshake, up to 16 KiB of
head to read and parse, about 1 ms in all); a flood of them keeps the
worker, and on a small host the whole machine, so busy that every call's
next frame waits for a CPU. The event loop itself stays responsive (one
accept and a bounded parse per turn, `net/head_queue.py`): what the calls
wait on is the processor.

So while a worker has live calls and has been busier than `busy_share` of a
core over the last window, it spaces its accepts: a pause after each,
doubling from `first_pause` up to `max_pause`, halving again once the worker
is below the share. New connections wait in the kernel's backlog (a closed
loop flood slows down with them); none is refused for it. A worker with no
live call, or under the share, accepts at full speed: a reconnect storm into
an idle ingress is not slowed.

I/O-free: the caller passes the wall clock and the worker's CPU clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How often the busy share is measured: long enough to average a few loop
# turns, short enough to react within a few frames.
WINDOW = 0.05
FIRST_PAUSE = 0.001
# At most about 60 connections a second per worker while pacing: legitimate
# call arrivals (a few a second per host) never notice; a flood is held there.
MAX_PAUSE = 0.016


@dataclass
class AcceptPacer:
    busy_share: float  # of one core; 1.0 (or more) never paces
    window: float = WINDOW
    first_pause: float = FIRST_PAUSE
    max_pause: float = MAX_PAUSE
    pause: float = 0.0  # what the next accept waits for while calls are live
    _since: float | None = field(default=None, repr=False)
    _cpu_since: float = field(default=0.0, repr=False)

    @property
    def enabled(self) -> bool:
        return self.busy_share < 1.0

    def after_accept(self, now: float, cpu: float, live_calls: int) -> float:
        """Seconds to wait before the next accept, given the wall clock `now`,
        the worker's CPU seconds `cpu` (both monotonic) and its live calls."""
        if not self.enabled:
            return 0.0
        if self._since is None:
            self._since, self._cpu_since = now, cpu
            return 0.0
        elapsed = now - self._since
        if elapsed >= self.window:
            busy = (cpu - self._cpu_since) / elapsed
            self._since, self._cpu_since = now, cpu
            if live_calls and busy > self.busy_share:
                self.pause = min(max(2 * self.pause, self.first_pause), self.max_pause)
            else:
                # Halved once per window that passed: after a quiet spell with no
                # accept (the flood over), the next connection finds no pause left.
                self.pause /= 2 ** min(int(elapsed / self.window), 32)
                if self.pause < self.first_pause:
                    self.pause = 0.0
        if not live_calls:
            return 0.0
        return self.pause
