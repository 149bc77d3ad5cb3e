"""Which worker takes new connections: process.accept (docs/WORKERS.md).

"spread" (the default): every worker's listener reads the shared listening
socket as its loop is free; the kernel wakes them all and one wins each
connection. "first": the workers of a generation take connections in rank
order (0..N-1, a replacement taking the rank of the one it replaces), as
nginx's accept_mutex and EPOLLEXCLUSIVE have one worker take them while it
keeps up. Rank 0 accepts as under "spread". A worker of a higher rank keeps
its reader off while no connection waits: every ACCEPT_LOOK seconds it looks
at the listening socket's accept queue, reads while the queue holds any, and
stops once a look finds it empty with nothing accepted since the look before.
At low rates one worker serves, its loop warm and its events many a wake-up
(a second worker woken for the same connection cost CPU for nothing: issue
#14, bench/README session 49); one that falls behind, hangs or is stopped
has the others reading within ACCEPT_LOOK.

uvloop and libuv do not let a reader set EPOLLEXCLUSIVE, and a nested epoll
loses the exclusivity, hence this at the application level.

I/O-free: the listener (`net.listener`) passes what each look read (the
queue's length, None where it cannot be read) and how many connections it has
accepted in all; `reading` says whether its reader should be on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# How often a worker of rank > 0 looks at the accept queue under "first": the
# most a connection waits for a second worker when the first falls behind.
# On the loop clock's ticks (`net.event_loop.next_tick`), with its other timers.
ACCEPT_LOOK = 0.05

AcceptMode = Literal["spread", "first"]


@dataclass
class AcceptOrder:
    """One worker's accept order: its rank in its generation and process.accept."""

    rank: int = 0
    mode: AcceptMode = "spread"
    # Whether the listener's reader is on (when it `looks`, what the last look decided).
    reading: bool = field(init=False, default=True)
    _accepted: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.reading = not self.looks

    @property
    def looks(self) -> bool:
        """Whether this worker reads only while connections wait (and so looks)."""
        return self.mode == "first" and self.rank > 0

    def set_mode(self, mode: AcceptMode, accepted: int) -> bool:
        """process.accept changed (a reload): whether to read now. A worker that
        starts looking stops reading at once (a look turns it on again if
        connections wait); one that stops looking reads from now on."""
        looked = self.looks
        self.mode = mode
        if self.looks and not looked:
            self.reading, self._accepted = False, accepted
        elif not self.looks:
            self.reading = True
        return self.reading

    def look(self, queued: int | None, accepted: int) -> bool:
        """A look: `queued`, the connections in the listening socket's accept
        queue (None: it cannot be read here, not Linux: read, as "spread"
        does); `accepted`, this listener's connections accepted in all.
        Whether the reader should be on until the next look."""
        if not self.looks:
            self.reading = True
            return True
        took = accepted != self._accepted
        self._accepted = accepted
        if queued is None or queued > 0:
            self.reading = True
        elif not took:
            self.reading = False
        return self.reading
