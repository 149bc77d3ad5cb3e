"""When a worker takes its next connection: live calls before new connections.

A worker's live calls and its new connections share one CPU. A new
connection costs far more than a frame (a TLS handshake, up to 16 KiB of
head to read and parse, about 1 ms in all); a flood of them keeps the
worker, and on a small host the whole machine, so busy that every call's
next frame waits for a CPU. The event loop itself stays responsive (one
accept and a bounded parse per turn, `net/head_queue.py`): what the calls
wait on is the processor.

So while a worker has live calls and its new connections (accepting, TLS
handshakes, heads, a call's fleet connection until the link (an https
fleet's handshake, either scheme's answer), refusals,
closes: `Registry.new_connection_cpu`, not the calls' frames) used more
than `share` of a core over the last window, it spaces its accepts: a
pause after each, doubling from `first_pause` up to `max_pause`, halving
per window once they use less. New connections wait in
the kernel's backlog (a flood that waits for its answers slows down with
them); none is refused for it. Connections that cost little (a TCP connect
and close, a health check) barely count, and calls' own CPU not at all: a
worker busy with calls still takes new calls at full speed.

I/O-free: the caller passes the wall clock and the time its new connections
have held the event loop so far (`net.loop_time_meter`: their CPU, and any wait for
a CPU meanwhile, which the calls' frames wait through too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How often the share is measured: long enough to average a few loop turns,
# short enough to react within a few frames.
WINDOW = 0.05
FIRST_PAUSE = 0.001
# While pacing at the most, a worker takes about 60 connections a second.
MAX_PAUSE = 0.016


@dataclass
class AcceptPacer:
    share: float  # of one core, for new connections; 1.0 (or more) never paces
    window: float = WINDOW
    first_pause: float = FIRST_PAUSE
    max_pause: float = MAX_PAUSE
    pause: float = 0.0  # what the next accept waits for while calls are live
    _since: float | None = field(default=None, repr=False)
    _spent_since: float = field(default=0.0, repr=False)

    @property
    def enabled(self) -> bool:
        return self.share < 1.0

    def after_accept(self, now: float, spent: float, live_calls: int) -> float:
        """Seconds to wait before the next accept, given the wall clock `now`, the
        seconds new connections have held the loop so far `spent` (both
        monotonic) and the worker's live calls."""
        if not self.enabled:
            return 0.0
        if self._since is None:
            self._since, self._spent_since = now, spent
            return 0.0
        elapsed = now - self._since
        if elapsed >= self.window:
            used = (spent - self._spent_since) / elapsed
            self._since, self._spent_since = now, spent
            if live_calls and used > self.share:
                self.pause = min(max(2 * self.pause, self.first_pause), self.max_pause)
            else:
                # Halved once per window that passed: after a quiet spell with no
                # accept (the flood over), the next connection finds no pause left.
                self.pause /= 2 ** min(int(elapsed / self.window), 32)
                if self.pause < self.first_pause:
                    self.pause = 0.0
        return self.pause if live_calls else 0.0
