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
A queue found holding some is looked at again CONFIRM_LOOK later before the
reader goes on: a connection that arrived a moment before the look, which
the first worker is about to take, is not one waiting for a second worker (on
a loaded host of 2 CPUs one of ten calls opened one after another was seen
so, and half of those taken by the second worker).
A worker that reads under "first" (rank 0 among them) also leaves the queue
to the others while it is behind itself: after an accept that finds
BUSY_STEPS or more of its new connections' steps (TLS handshakes, heads)
waiting for a turn of its loop, it stops accepting for BUSY_PAUSE. Accepting
costs little, so a burst was taken whole from the queue by the first worker,
its handshakes queued inside it, and the second worker's look found the
queue empty (30 calls opened at once all landed on one worker).
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
# A queue found holding connections is looked at again this much later: still
# holding some, they wait for a second worker.
CONFIRM_LOOK = 0.01
# A worker reading under "first" with this many steps of new connections
# waiting for its loop (`net.head_queue`: each gets about one of its turns)
# stops accepting for BUSY_PAUSE after each accept, leaving the queue to the
# other workers' looks.
BUSY_STEPS = 4
BUSY_PAUSE = 0.002

AcceptMode = Literal["spread", "first"]


@dataclass
class AcceptOrder:
    """One worker's accept order: its rank in its generation and process.accept."""

    rank: int = 0
    mode: AcceptMode = "spread"
    # Whether the listener's reader is on (when it `looks`, what the last look decided).
    reading: bool = field(init=False, default=True)
    # The last look found connections waiting, the reader off: the next confirms.
    confirming: bool = field(init=False, default=False)
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
        self.confirming = False
        return self.reading

    @property
    def next_look(self) -> float:
        """Seconds to the next look: CONFIRM_LOOK while confirming, else
        ACCEPT_LOOK (the caller puts it on the loop clock's tick)."""
        return CONFIRM_LOOK if self.confirming else ACCEPT_LOOK

    def pause_when_busy(self, steps_waiting: int) -> float:
        """After an accept: seconds to stop accepting, given the steps of new
        connections waiting for a turn of this worker's loop (0: go on)."""
        if self.mode == "first" and steps_waiting >= BUSY_STEPS:
            return BUSY_PAUSE
        return 0.0

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
        confirming, self.confirming = self.confirming, False
        if queued is None:
            self.reading = True
        elif queued > 0:
            if self.reading or confirming:
                self.reading = True
            else:
                self.confirming = True
        elif not took:
            self.reading = False
        return self.reading
