"""`fleet-ingress calls` and `end-call`, their I/O-free parts: which calls a
listing keeps (`CallFilter`), the state shown for a call machine's state, a
call's host-wide id, and the order of the rows. No I/O.

A call's id in a worker (`Call.id`, the access line's `call_id`) counts from 1
in each process, so two workers have a call 17 each: on the host a call is
named `PID-N-TAG`, its worker's pid, that number and the worker's tag, drawn
at random when the process starts; its access line says it whole (`call`).
Without the tag, `PID-N` copied from an old listing or log line named another
live call once the pid had come back (a container restarted, a pid wrap), and
`end-call` cut that one (the review of session 36): with it, a call of a
process gone is refused as such. 4 characters of 32 (no i, l, o, u): one pid
come back with the same tag is 1 in 1,048,576.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

from fleet_ingress.core.call_machine import State

# An operator's reason for end-call, as its access line keeps it (characters).
MAX_END_REASON = 200

__all__ = [
    "TAG_LENGTH",
    "CallFilter",
    "CallId",
    "CallIdError",
    "FilterError",
    "host_call_id",
    "new_process_tag",
    "no_such_call",
    "oldest_first",
    "parse_call_id",
    "process_gone",
    "shown_state",
    "whole_id_wanted",
]

# What an operator reads of a call machine's state: four words, not twelve.
_SHOWN = {
    State.HEAD: "waiting",
    State.PARSING: "waiting",
    State.LEASING: "waiting",  # for a fleet slot (the queue)
    State.CONNECTING: "connecting",
    State.AWAITING: "connecting",  # its head sent, the fleet's 101 not read yet
    State.TUNNEL: "tunnel",
    State.HALF_CLOSED: "closing",  # a side hung up, the other's reply awaited
    State.RELAYING: "closing",  # a fleet's refusal passed through
    State.ANSWERING: "closing",
    State.CLOSING: "closing",
    State.ENDED: "closing",  # both sides gone, the access line not written yet
}
STATES = ("waiting", "connecting", "tunnel", "closing")
# How long `--longer-than` may ask (SECONDS): a day's calls are a mistake to keep.
MAX_LONGER_THAN = 7 * 24 * 3600.0


def shown_state(state: State | None) -> str:
    return "waiting" if state is None else _SHOWN[state]


class FilterError(ValueError):
    """A filter an operator gave that means nothing (its message says which, and why)."""


class CallIdError(ValueError):
    """Not a call's host-wide id (`PID-N`)."""


@dataclass(frozen=True)
class CallFilter:
    """Which calls a listing keeps: all given must hold (None: any)."""

    fleet: str | None = None
    bot: str | None = None
    longer_than: float | None = None  # seconds of age, more than this

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> CallFilter:
        """From GET /calls's query (`fleet`, `bot`, `longer_than`); FilterError
        names the one that is wrong."""
        unknown = sorted(set(query) - {"fleet", "bot", "longer_than"})
        if unknown:
            raise FilterError(
                f"unknown filter {unknown[0]!r}: calls are filtered by fleet, bot and longer_than"
            )
        longer = query.get("longer_than")
        return cls(
            fleet=query.get("fleet") or None,
            bot=query.get("bot") or None,
            longer_than=None if longer is None else parse_longer_than(longer),
        )

    @classmethod
    def from_wire(cls, data: Any) -> CallFilter:
        """From a supervisor's `list-calls` (`to_wire`); anything odd is no filter."""
        if not isinstance(data, dict):
            return cls()
        fleet, bot, longer = data.get("fleet"), data.get("bot"), data.get("longer_than")
        return cls(
            fleet=fleet if isinstance(fleet, str) else None,
            bot=bot if isinstance(bot, str) else None,
            longer_than=float(longer)
            if isinstance(longer, int | float) and math.isfinite(longer)
            else None,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            key: value
            for key, value in (
                ("fleet", self.fleet),
                ("bot", self.bot),
                ("longer_than", self.longer_than),
            )
            if value is not None
        }

    def to_query(self) -> str:
        from urllib.parse import urlencode

        return urlencode(self.to_wire())

    def keeps(self, fleet: str | None, bot_id: str, age_s: float) -> bool:
        if self.fleet is not None and fleet != self.fleet:
            return False
        if self.bot is not None and bot_id != self.bot:
            return False
        return self.longer_than is None or age_s > self.longer_than

    @property
    def said(self) -> str:
        """The filter as words, for the count line ("" for none)."""
        parts = []
        if self.fleet is not None:
            parts.append(f"on fleet {self.fleet}")
        if self.bot is not None:
            parts.append(f"of bot {self.bot}")
        if self.longer_than is not None:
            parts.append(f"older than {self.longer_than:g}s")
        return " ".join(parts)


def parse_longer_than(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_LONGER_THAN:  # nan too
        raise FilterError(
            f"longer_than {text!r} is not a number of seconds from 0 to {MAX_LONGER_THAN:g}"
        )
    return value


TAG_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's: none read as another
TAG_LENGTH = 4


def new_process_tag(random: bytes) -> str:
    """A process's tag from TAG_LENGTH random bytes."""
    return "".join(TAG_ALPHABET[b % 32] for b in random[:TAG_LENGTH])


def host_call_id(pid: int, call_id: int, tag: str | None) -> str:
    """`PID-N-TAG` (`PID-N` for a process with no tag: a release before them)."""
    return f"{pid}-{call_id}" if tag is None else f"{pid}-{call_id}-{tag}"


class CallId(NamedTuple):
    pid: int
    number: int
    tag: str | None  # None: `PID-N`, said without its tag


def parse_call_id(text: str) -> CallId:
    """`PID-N-TAG` (or `PID-N`); CallIdError says the form."""
    parts = text.strip().lower().split("-")
    if 2 <= len(parts) <= 3:
        pid, number = parts[0], parts[1]
        tag = parts[2] if len(parts) == 3 else None
        if (
            pid.isdecimal()
            and number.isdecimal()
            and int(pid) > 0
            and int(number) > 0
            and (tag is None or (len(tag) == TAG_LENGTH and set(tag) <= set(TAG_ALPHABET)))
        ):
            return CallId(int(pid), int(number), tag)
    raise CallIdError(
        f"{text!r} is not a call id: a call is named PID-N-TAG (its worker's pid, its "
        "call_id and its worker's tag), as `fleet-ingress calls` lists it and its access "
        "line's `call` says, e.g. 4242-17-k3f9"
    )


def whole_id_wanted(text: str) -> str:
    """The refusal of a `PID-N` given without its tag, where the process has one."""
    return (
        f"call {text}: give its whole id, PID-N-TAG, as `fleet-ingress calls` lists it "
        "(or its access line's `call`): PID-N alone may name another call, once the pid "
        "of a process gone has come back (a restart, a pid wrap)"
    )


def process_gone(text: str, why: str) -> str:
    """`end-call`'s refusal for an id of no process here: one gone, or another
    host's (two hosts' containers number their workers alike, so its pid may
    be one here, with another tag): "gone" alone sent the operator away from
    a live call (review36g)."""
    return no_such_call(
        text, f"the process it ran in is gone, or it is another host's call ({why})"
    )


def no_such_call(text: str, why: str) -> str:
    """`end-call`'s refusal for an id no process holds: names it, and the listing."""
    return f"no live call {text}: {why}. `fleet-ingress calls` lists the live calls with their ids"


def oldest_first(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of every worker, oldest call first: by when each began on the host's
    monotonic clock (one clock for every process, unlike each row's `age_s`,
    read when its worker listed it). One float a key: 1.2 ms of CPU for 10,000
    rows, where a tuple key took 15-44 ms, held in the supervisor's loop (the
    slots' coordinator)."""
    return sorted(rows, key=itemgetter("started_monotonic"))
