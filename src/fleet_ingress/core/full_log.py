"""When a fleet's FULL and its room are worth a log line: once per real change.

A fleet that answers calls `429` while its probes say it has room (a worker
pool the probe counts wrongly, a limit in front of it) flipped FULL and back
at every probe: "fleet full" and "fleet has room" alternated twice a second
per fleet (the operator text audit of session 33). The balancer still flips
(a 429 keeps new calls off it until its next probe, SPEC 4); the log tells
the episode instead: "fleet full" once when it starts, "fleet has room" once
a 429's FULL has held off for `ROOM_HOLD` seconds of probes saying room, with
how long it lasted and how many 429s it answered meanwhile. A FULL that only
probes said (capacity 0 reported) ends at once, as before. Fed with `now`
(monotonic seconds); no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

ROOM_HOLD = 10.0
"""Seconds of probes saying room, with no 429 between, before a FULL a 429
began is said to have ended."""


@dataclass(slots=True)
class FullLog:
    logged_full: bool = False
    since: float = 0.0  # when the FULL said last began
    by_429: bool = False  # a 429 began it, or came during it
    answered_429: int = 0  # 429s answered during it (news to the estimate or not)
    room_since: float | None = None  # probes have said room since (a 429's FULL)

    def answered_429_now(self, now: float, *, news: bool = True) -> bool:
        """A call answered 429; `news`: it made the fleet FULL (news to its
        estimate). True when that is to be said (no FULL said now). One that is
        no news (calls sent together, answered 429 after the first) is counted
        in the FULL said, and begins none."""
        if not news:
            if self.logged_full:
                self.answered_429 += 1
                self.room_since, self.by_429 = None, True
            return False
        self.answered_429 += 1
        self.room_since = None
        self.by_429 = True
        if self.logged_full:
            return False
        self.logged_full, self.since, self.answered_429 = True, now, 1
        return True

    def probed(self, full: bool, now: float) -> str | None:
        """A probe was recorded and the fleet reads `full` now: "fleet full",
        "fleet has room", or None when neither is news."""
        if full:
            self.room_since = None
            if self.logged_full:
                return None
            self.logged_full, self.since, self.by_429, self.answered_429 = True, now, False, 0
            return "fleet full"
        if not self.logged_full:
            return None
        if self.by_429:
            if self.room_since is None:
                self.room_since = now
            if now - self.room_since < ROOM_HOLD:
                return None
        self.logged_full, self.room_since = False, None
        return "fleet has room"

    def episode(self, now: float) -> dict[str, float | int]:
        """The fields of a "fleet has room" line: how long FULL was said, and
        the 429s answered meanwhile."""
        return {"full_s": round(now - self.since, 1), "answered_429": self.answered_429}
