"""The verdict on one `/health/fleet` answer. No I/O.

The body is parsed as JSON, never pattern-matched: the HAProxy regex check
this replaces broke when the key moved to the front of the object, matched
decoys such as `prev_fleet_available` when anchored wrongly, and marked a
fleet scaled past 16 workers DOWN. Here the key is looked up in the top-level
object, any integer >= 0 passes, and there is no upper bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# A health body is a few hundred bytes; anything this large is not one.
MAX_HEALTH_BODY = 64 * 1024


@dataclass(frozen=True)
class ProbeSettings:
    """How fleets are probed: `[fleets]`'s health_path, capacity_key,
    check_interval, check_timeout, fall and rise."""

    health_path: str
    capacity_key: str
    interval: float
    timeout: float
    fall: int
    rise: int


@dataclass(frozen=True, slots=True)
class ProbeResult:
    passed: bool
    capacity: int | None = None  # the fleet's free workers, when it passed
    reason: str = ""  # why it failed (or "ok")
    # When the certificate the fleet served to this probe expires (epoch seconds);
    # None for http:// fleets, unverified ones, or when no connection was read.
    certificate_not_after: float | None = None
    timed_out: bool = False  # failed by its timeout: no answer in time
    # False: it tells nothing of the fleet (it timed out while this host kept
    # the prober from running): counted as a probe, not toward fall or rise.
    judged: bool = True

    def describe(self, capacity_key: str = "fleet_available") -> str:
        if self.passed:
            key = capacity_key if capacity_key.isprintable() else ascii(capacity_key)
            return f"pass: {key}={self.capacity}"
        if not self.judged:
            return f"not judged: {self.reason}"
        return f"fail: {self.reason}"


def failed(reason: str) -> ProbeResult:
    return ProbeResult(False, None, reason)


def timed_out(reason: str) -> ProbeResult:
    return ProbeResult(False, None, reason, timed_out=True)


# A probe that timed out tells nothing of its fleet when the prober waited for
# a CPU (other processes held them all, or a CPU quota throttled it) this
# share of its timeout or more: the answer may have come, unread. A healthy
# prober waits milliseconds a second; a busy one on a saturated host 0.3-0.5 s
# a second (the review of session 16), whose timeouts still count: past half,
# the host, not the fleet, is what the probe measured (0.9 s a second under a
# 2 % CPU quota).
STARVED_SHARE = 0.5


def judged_against_starvation(
    result: ProbeResult, cpu_waited: float | None, timeout: float
) -> ProbeResult:
    """`result`, or, for a timeout while the prober waited `cpu_waited`
    seconds for a CPU (None: not known) past STARVED_SHARE of `timeout`, the
    same result not judged: every fleet's probes time out together then, and
    taking them all DOWN would refuse every call for the host's own stall (a
    CPU quota of 2 % did, in the audit of session 16)."""
    if not result.timed_out or cpu_waited is None or cpu_waited < STARVED_SHARE * timeout:
        return result
    return ProbeResult(
        False,
        None,
        f"{result.reason} while this host kept the prober waiting {cpu_waited:.2f}s for a "
        "CPU: not counted against the fleet",
        timed_out=True,
        judged=False,
    )


def judged_against_stall(result: ProbeResult, late: float, timeout: float) -> ProbeResult:
    """`result`, or, for a timeout that came `late` seconds past `timeout`
    (STARVED_SHARE of it or more), the same result not judged: the prober did
    not run meanwhile (its process stopped: SIGSTOP, a debugger, a VM paused
    while CLOCK_MONOTONIC went on), which the run-queue wait does not count, and
    a loop resumed runs its due timers before it reads the answer that came
    (the clock audit of session 32: a 2.5 s stop with a probe under way took
    the fleet DOWN with fall = 1, and counted a check failure with fall = 2)."""
    if not result.timed_out or not result.judged or late < STARVED_SHARE * timeout:
        return result
    return ProbeResult(
        False,
        None,
        f"{result.reason}, {late:.1f}s late: the prober did not run meanwhile (this "
        "process stopped, or the host paused): not counted against the fleet",
        timed_out=True,
        judged=False,
    )


def judge_health_response(status: int, body: bytes, capacity_key: str) -> ProbeResult:
    """Pass when the status is 200 and the body is a JSON object whose
    `capacity_key` is an integer >= 0 (a boolean is not an integer here)."""
    if status != 200:
        return failed(f"status {status}")
    if len(body) > MAX_HEALTH_BODY:
        return failed(f"body larger than {MAX_HEALTH_BODY} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return failed("body not JSON")
    except RecursionError:  # "[[[[...": a few KiB nest past the parser's stack
        return failed("body JSON nested too deep")
    if not isinstance(document, dict):
        return failed(f"body is a JSON {type(document).__name__}, not an object")
    if capacity_key not in document:
        return failed(f"key {capacity_key!r} missing")
    value = document[capacity_key]
    if isinstance(value, bool) or not isinstance(value, int):
        return failed(f"key {capacity_key!r} not an integer: {json.dumps(value)[:40]}")
    if value < 0:
        return failed(f"key {capacity_key!r} is negative: {value}")
    return ProbeResult(True, value, "ok")
