"""When a failed attempt to reach a fleet is tried again, and the answer when
attempts run out (SPEC 5). No I/O.

Only failures before any response byte reached the carrier can be retried.
429 is not retried unless the operator lists it: rewriting or hiding a fleet's
429 would lie to the carrier about the real state (see the HAProxy design).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Failure(enum.Enum):
    CONN_FAILURE = "conn-failure"  # refused, reset, unreachable, connect timeout, TLS
    EMPTY_RESPONSE = "empty-response"  # closed before a complete response head
    JUNK_RESPONSE = "junk-response"  # not an HTTP response
    RESPONSE_TIMEOUT = "response-timeout"  # no complete head in timeouts.response
    # Not a retry_on word: the attempt's fleet went DOWN (its health checks, or
    # calls it refused) before it answered, and the attempt was given up then
    # (`FleetWentDown`), retried as the failure its wait would have ended in.
    FLEET_DOWN = "fleet-down"


# Status and body the carrier gets when the last attempt failed this way.
GIVE_UP_ANSWER: dict[Failure, tuple[int, str]] = {
    Failure.CONN_FAILURE: (503, "no fleet could be reached"),
    Failure.EMPTY_RESPONSE: (502, "the fleet closed without answering"),
    Failure.JUNK_RESPONSE: (502, "the fleet sent an invalid response"),
    Failure.RESPONSE_TIMEOUT: (504, "the fleet did not answer in time"),
    # An attempt given up as its fleet went DOWN: answered as its response
    # timeout would have been (a 504), saying why.
    Failure.FLEET_DOWN: (504, "the fleet went down before it answered"),
}


def local_give_up_answer(detail: str) -> tuple[int, str]:
    """The answer when the last attempt failed for this host's own want
    (descriptors, memory, local ports): no fleet was at fault,
    and the text says so rather than "no fleet could be reached"."""
    return 503, f"this ingress could not connect to a fleet: {detail}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int
    conditions: frozenset[str]
    statuses: frozenset[int]

    def retry_failure(self, failure: Failure, attempt: int) -> bool:
        """`attempt` counts from 1; there are at most 1 + retries attempts."""
        return attempt <= self.retries and failure.value in self.conditions

    def retry_status(self, status: int, attempt: int) -> bool:
        return attempt <= self.retries and status in self.statuses
