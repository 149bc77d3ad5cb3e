"""The access line of a call lost with its worker (SPEC 12, 13).

A worker writes each call's line when the call ends. A worker that dies (the
kernel's OOM killer, a crash, SIGKILL at a drain's end) writes none for the
calls it carried: the supervisor writes them instead, from what the worker
said of each call as it asked for its fleet slot (`Call.identity`, "call" in
the slot request), with the fields of every access line. Its bytes are those
the worker's last asked report said (`call_bytes`, every few seconds): at
least that many were relayed (`bytes_at_least` true, `detail` says how old);
null when no report said them. What only the worker knew (attempts, queue
wait, handshake time) is null; `end_reason` is `error` and `detail` says
which worker ended how. A tunneled call's `tunnel_s` is from its 101 (as
the worker told it) to its worker's end: what the call-duration histogram
observes ("101 to end"), where `duration_s` runs from its start as on
every access line.
"""

from __future__ import annotations

import time
from typing import Any

# The fields of `Call.access_record`, in its order: a lost call's line has each.
# Not `tried` (the fleets a call left, on a retried call's line alone): only
# the worker knew its attempts, as `attempts`, which is null here.
_ACCESS_FIELDS = (
    "call_id",
    "call",
    "started",
    "client_ip",
    "route",
    "bot_id",
    "fleet",
    "status",
    "attempts",
    "queued_ms",
    "handshake_ms",
    "duration_s",
    "bytes_from_carrier",
    "bytes_to_carrier",
    "end_reason",
    "detail",
)
# What a worker says of a call (`Call.identity` and its start), taken as given
# when it is a plain value: a line is never built from a nested object.
_SAID = ("call_id", "call", "started", "client_ip", "route", "bot_id")
_MAX_TEXT = 256  # a field's text, at most (the worker bounds the bot id already)


def _plain(value: Any) -> Any:
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value
    return None


def lost_call_record(
    call: dict[str, Any],
    *,
    worker_pid: int,
    generation: int,
    exit_status: str,
    now: float,
    now_monotonic: float | None = None,
) -> dict[str, Any]:
    """The access-line fields of `call` (what its worker said of it; "fleet"
    where it held a slot, "status" 101 where its fleet had answered), lost
    when its worker ended with `exit_status` ("killed by SIGKILL") at `now`
    (the wall clock; `now_monotonic` the same by CLOCK_MONOTONIC, which the
    worker's "started_monotonic" is on: this host's, the same after an exec)."""
    record: dict[str, Any] = dict.fromkeys(_ACCESS_FIELDS)
    for key in _SAID:
        record[key] = _plain(call.get(key))
    fleet = call.get("fleet")
    record["fleet"] = fleet if isinstance(fleet, str) else None
    record["status"] = 101 if call.get("status") == 101 else None
    started_at = call.get("started_at")
    # Its duration by CLOCK_MONOTONIC where the worker said its start by it: by
    # the wall clock, a step between the call's start and its worker's death
    # (NTP at boot, a VM resumed, a clock days behind corrected) was in it: a
    # day too long, or none at all once the clock went back over a minute (the
    # clock audit of session 32).
    started_mono = call.get("started_monotonic")
    if (
        now_monotonic is not None
        and isinstance(started_mono, int | float)
        and not isinstance(started_mono, bool)
        and 0 <= started_mono <= now_monotonic
    ):
        record["duration_s"] = round(now_monotonic - started_mono, 3)
    # A time the worker's wall clock could have said (up to a minute past this
    # one's): a value far out of it (1e300, NaN) raised here, and the worker's
    # death went unsaid (the supervisor-crash audit of session 26).
    if (
        isinstance(started_at, int | float)
        and not isinstance(started_at, bool)
        and 0 <= started_at <= now + 60
    ):
        if record["duration_s"] is None:
            record["duration_s"] = round(max(0.0, now - started_at), 3)
        if record["started"] is None:
            record["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at))
    said_at = call.get("answered_monotonic")
    if (
        record["status"] == 101
        and now_monotonic is not None
        and isinstance(said_at, int | float)
        and not isinstance(said_at, bool)
        and 0 <= said_at <= now_monotonic
    ):
        record["tunnel_s"] = round(now_monotonic - said_at, 3)
    bytes_known = ""
    sizes = (call.get("bytes_from_carrier"), call.get("bytes_to_carrier"))
    if all(type(n) is int and n >= 0 for n in sizes):
        record["bytes_from_carrier"], record["bytes_to_carrier"] = sizes
        record["bytes_at_least"] = True
        reported = call.get("bytes_reported_monotonic")
        ago = (
            f", {now_monotonic - reported:.1f}s before it ended"
            if now_monotonic is not None
            and isinstance(reported, int | float)
            and 0 <= reported <= now_monotonic
            else ""
        )
        bytes_known = f"bytes at least, as its worker's last report said them{ago}"
    record["end_reason"] = "error"
    if record["status"] == 101:
        state = "the call was up"
    elif record["fleet"] is not None:
        # Or had just been answered: a worker says a call's 101 once it has
        # relayed it, and one killed in between never said it (the chaos audit
        # of session 31 saw a carrier holding its 101 in such a line).
        state = "the call was connecting to its fleet (or had just been answered)"
    else:
        state = "the call waited for a fleet slot"
    record["detail"] = (
        f"its worker (pid {worker_pid}, generation {generation}) ended: {exit_status}; "
        f"{state} and was lost with it ({bytes_known or 'bytes not known'})"
    )
    record["worker_pid"] = worker_pid
    return record


_LIVE = 1  # core.call_table.LIVE (not imported: this module reads dicts alone)


def lost_with_table(
    known: dict[int, dict[str, Any]], table: dict[int, tuple[int, dict[str, Any]]]
) -> dict[int, dict[str, Any]]:
    """The calls a dead worker took with it, by lease: `known` is what the
    supervisor heard of its open leases (the acquire's "call", its bytes
    and 101, "fleet" where it held a slot), `table` what its call table
    (`core.call_table.read_table`) says, by lease: (state, call).

    A lease the table shows live is lost, whether or not its acquire reached
    the supervisor (it may have been held), its line made of both (what the
    supervisor heard over what the table says, a 101 from either). One the
    table shows ended, or one whose acquire said it was recorded
    ("in_table") and the table no longer has (ended, its record reused),
    had its line written: none here. A lease known by its fleet alone (its
    call's "logged" came, its slot still held) had it too. The rest (no
    record: the table was full) are lost as the supervisor heard them."""
    lost: dict[int, dict[str, Any]] = {}
    for lease, (state, recorded) in table.items():
        if state != _LIVE:
            continue
        call = dict(recorded)
        heard = known.get(lease, {})
        call.update((key, value) for key, value in heard.items() if value is not None)
        if recorded.get("status") == 101 and heard.get("status") != 101:
            call["status"] = 101
            call["answered_monotonic"] = recorded.get("answered_monotonic")
        lost[lease] = call
    for lease, call in known.items():
        if lease in table or call.get("in_table") is True:
            continue
        if "call_id" not in call and "call" not in call:
            continue  # logged already: only its held slot was left
        lost[lease] = call
    return lost
