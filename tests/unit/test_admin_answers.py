"""How `fleet-ingress` words a remove-fleet answer (ops.admin_client.describe_result)."""

from __future__ import annotations

from typing import Any

import pytest

from fleet_ingress.ops.admin_client import describe_result


def _removal(**fields: Any) -> dict[str, Any]:
    return {
        "fleet": "a",
        "removed": False,
        "draining_calls": 0,
        "closed_calls": 0,
        "unreachable_calls": 0,
        "fleets_file": "/etc/fleet-ingress/fleets.txt",
        "backup": None,
        **fields,
    }


@pytest.mark.parametrize(
    "answer, said",
    [
        (
            _removal(removed=True, closed_calls=3, backup="/etc/fleet-ingress/fleets.txt.bak"),
            "removed fleet a (3 calls closed); its line removed from "
            "/etc/fleet-ingress/fleets.txt (backup /etc/fleet-ingress/fleets.txt.bak)",
        ),
        (  # this command removed the line: it was "already gone from" it
            _removal(draining_calls=2),
            "fleet a is draining: removed once its 2 calls end; its line removed from "
            "/etc/fleet-ingress/fleets.txt",
        ),
        (  # forced: some closed, one slow to go
            _removal(draining_calls=1, closed_calls=4),
            "fleet a is draining: 4 calls closed; removed once its 1 call ends; its line removed",
        ),
        (  # forced: a worker stopped (SIGSTOP) said nothing; its calls hold the fleet
            _removal(draining_calls=2, closed_calls=3, unanswered_workers=[4242]),
            "fleet a is draining: 3 calls closed, by the workers that answered; worker 4242 "
            "did not say how many it closed; removed once its 2 calls end; its line removed",
        ),
        (  # a worker killed during the wait: its calls are lost with it, not closed
            _removal(removed=True, closed_calls=3, workers_died=[4244]),
            "removed fleet a (3 calls closed; worker 4244 died meanwhile (its calls are "
            "counted lost: `fleet-ingress stat`)); its line removed",
        ),
        (  # it closed them all, but answered late: the fleet is gone
            _removal(removed=True, closed_calls=0, unanswered_workers=[4242, 4243]),
            "removed fleet a (0 calls closed, by the workers that answered; workers 4242, "
            "4243 did not say how many they closed); its line removed",
        ),
    ],
)
def test_a_removal_says_what_was_closed_and_what_it_waits_for(answer, said):
    assert describe_result(answer).startswith(said)


def test_calls_no_worker_can_be_told_to_close_are_said_with_when_they_end():
    text = describe_result(_removal(draining_calls=2, unreachable_calls=2))
    assert text.startswith("fleet a is draining: removed once its 2 calls end;")
    assert "2 calls on a worker that lost its slot channel could not be told to close" in text
    assert "timeouts.drain + 5 s" in text and '"draining, channel lost"' in text
    assert "could not be told" not in describe_result(_removal(draining_calls=2))
