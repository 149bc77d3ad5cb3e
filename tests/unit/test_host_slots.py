"""The host-wide slot table (`core.host_slots`): transcripts, no sockets.

Each scenario is a list of steps and what the table must answer. A grant
reads `w1#3>a` (worker w1's lease 3 got fleet a), a refusal `w1#3!reason`;
`acquire` answers `wait` when the lease is queued.
"""

from __future__ import annotations

from typing import Any

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import (
    QUEUE_FULL,
    QUEUE_OFF,
    UNRESPONSIVE_PULLS,
    Answer,
    Granted,
    HostSlots,
    SlotProtocolError,
    queue_timeout_reason,
)
from fleet_ingress.service.upgrade import fleets_to_json, restore_fleets

TWO_FLEETS = "https://a.test name=a\nhttps://b.test name=b\n"
TIMEOUT = 3.0
EXPIRED = "!" + queue_timeout_reason(TIMEOUT)
BOTH_DOWN = "no fleet is up (2 down)"  # the refusal says why, by count


def _slots(maxconn: int = 2, *, queue_timeout: float = TIMEOUT, max_queue: int = 8) -> HostSlots:
    specs = parse_fleets_text(TWO_FLEETS, default_maxconn=maxconn)
    slots = HostSlots(
        Balancer(FleetSet.from_specs(specs)), queue_timeout=queue_timeout, max_queue=max_queue
    )
    slots.join("w1", pid=101, generation=1)
    slots.join("w2", pid=102, generation=1)
    return slots


def _render(answer: Answer | None) -> str:
    if answer is None:
        return "wait"
    if isinstance(answer, Granted):
        return f"{answer.worker}#{answer.lease}>{answer.fleet.name}"
    return f"{answer.worker}#{answer.lease}!{answer.reason}"


def _short(answer: Answer | None) -> str:
    """What `acquire` answered, without the worker and lease it was asked for."""
    text = _render(answer)
    return text.split(">", 1)[1] if ">" in text else text.split("#", 1)[-1].lstrip("0123456789")


def _play(slots: HostSlots, steps: list[tuple[Any, ...]]) -> None:
    for i, (op, *args, expected) in enumerate(steps):
        if op == "acquire":
            worker, lease, avoid, now = args
            got: Any = _short(slots.acquire(worker, lease, avoid, now))
        elif op == "release":
            got = [_render(a) for a in slots.release(*args)]
        elif op == "leave":
            got = [_render(a) for a in slots.leave(*args)[1]]
        elif op == "lose":  # its channel ended, its process runs on
            got = [_render(a) for a in slots.leave(*args, keep_held=True)[1]]
        elif op == "exited":  # the process of a worker whose channel was lost
            got = [_render(a) for a in slots.release_kept(*args)[1]]
        elif op == "reclaimed":
            got = slots.reclaimed_total
        elif op == "rows":
            got = {r.worker: (r.calls, r.channel_lost) for r in slots.workers}
        elif op == "expire":
            got = [_render(a) for a in slots.expire(*args)]
        elif op == "wake":
            got = [_render(a) for a in slots.wake()]
        elif op == "active":
            got = {f.name: f.active for f in slots.balancer.fleets}
        elif op == "deadline":
            got = slots.next_deadline()
        else:
            raise AssertionError(f"unknown step {op}")
        assert got == expected, f"step {i} {op}{tuple(args)}: got {got!r}, want {expected!r}"


def _down(slots: HostSlots) -> None:
    for f in slots.balancer.fleets:
        f.health = Health.DOWN


SCENARIOS: dict[str, list[tuple[Any, ...]]] = {
    "leastconn spreads two workers' calls over the fleets, ties round-robin": [
        ("acquire", "w1", 1, (), 0.0, "a"),
        ("acquire", "w2", 1, (), 0.0, "b"),
        ("acquire", "w2", 2, (), 0.0, "a"),
        ("acquire", "w1", 2, (), 0.0, "b"),
        ("active", {"a": 2, "b": 2}),
    ],
    "maxconn holds for the host: the fifth call of four slots waits": [
        ("acquire", "w1", 1, (), 0.0, "a"),
        ("acquire", "w1", 2, (), 0.0, "b"),
        ("acquire", "w2", 1, (), 0.0, "a"),
        ("acquire", "w2", 2, (), 0.0, "b"),
        ("acquire", "w1", 3, (), 0.0, "wait"),
        ("active", {"a": 2, "b": 2}),
    ],
    "waiters of both workers are served first in, first out as slots free": [
        *[("acquire", "w1", n, (), 0.0, f) for n, f in ((1, "a"), (2, "b"), (3, "a"), (4, "b"))],
        ("acquire", "w2", 1, (), 0.1, "wait"),
        ("acquire", "w1", 5, (), 0.2, "wait"),
        ("acquire", "w2", 2, (), 0.3, "wait"),
        ("release", "w1", 3, ["w2#1>a"]),
        ("release", "w1", 1, ["w1#5>a"]),
        ("release", "w1", 2, ["w2#2>b"]),
        ("release", "w1", 4, []),
        ("active", {"a": 2, "b": 1}),
    ],
    "a newcomer does not overtake the queue while waiters remain": [
        *[("acquire", "w1", n, (), 0.0, f) for n, f in ((1, "a"), (2, "b"), (3, "a"), (4, "b"))],
        ("acquire", "w1", 5, (), 0.0, "wait"),
        ("acquire", "w2", 1, (), 0.0, "wait"),
        ("release", "w1", 1, ["w1#5>a"]),
        ("release", "w1", 2, ["w2#1>b"]),
        ("release", "w1", 3, []),  # queue empty: the slot stays free...
        ("acquire", "w2", 2, (), 0.0, "a"),  # ...for whoever comes next
    ],
    "a waiter's deadline is returned, and it is refused at it, not before": [
        *[("acquire", "w1", n, (), 0.0, f) for n, f in ((1, "a"), (2, "b"), (3, "a"), (4, "b"))],
        ("acquire", "w2", 1, (), 1.0, "wait"),
        ("acquire", "w2", 2, (), 2.0, "wait"),
        ("deadline", 1.0 + TIMEOUT),
        ("expire", 1.0 + TIMEOUT - 0.001, []),
        ("expire", 1.0 + TIMEOUT, ["w2#1" + EXPIRED]),
        ("deadline", 2.0 + TIMEOUT),
        ("expire", 10.0, ["w2#2" + EXPIRED]),
        ("deadline", None),
        ("release", "w1", 1, []),  # nobody left waiting
    ],
    "a release withdraws a lease still queued: it is never granted": [
        *[("acquire", "w1", n, (), 0.0, f) for n, f in ((1, "a"), (2, "b"), (3, "a"), (4, "b"))],
        ("acquire", "w2", 1, (), 0.0, "wait"),
        ("acquire", "w2", 2, (), 0.0, "wait"),
        ("release", "w2", 1, []),  # the carrier left while queued
        ("release", "w1", 1, ["w2#2>a"]),
        ("expire", 100.0, []),
    ],
    "releases are idempotent: twice, unknown lease, unknown worker": [
        ("acquire", "w1", 1, (), 0.0, "a"),
        ("acquire", "w1", 2, (), 0.0, "b"),
        ("release", "w1", 1, []),
        ("release", "w1", 1, []),
        ("release", "w1", 99, []),
        ("release", "w9", 2, []),
        ("release", "w2", 2, []),  # w2 cannot give back w1's lease 2
        ("active", {"a": 0, "b": 1}),
    ],
    "a worker gone gives back every slot it held at once; waiters get them in order": [
        ("acquire", "w1", 1, (), 0.0, "a"),
        ("acquire", "w1", 2, (), 0.0, "b"),
        ("acquire", "w1", 3, (), 0.0, "a"),
        ("acquire", "w2", 1, (), 0.0, "b"),
        ("acquire", "w2", 2, (), 0.0, "wait"),
        ("acquire", "w1", 4, (), 0.0, "wait"),  # w1's own waiter leaves with it
        ("acquire", "w2", 3, (), 0.0, "wait"),
        ("leave", "w1", ["w2#2>a", "w2#3>b"]),
        ("active", {"a": 1, "b": 2}),
        ("leave", "w1", []),
        ("release", "w1", 2, []),  # a late release from the dead worker: no-op
        ("active", {"a": 1, "b": 2}),
        ("expire", 100.0, []),
    ],
    "a retry avoids the fleet it tried when another has room, else takes it": [
        ("acquire", "w1", 1, ["a"], 0.0, "b"),
        ("acquire", "w1", 2, ["b"], 0.0, "a"),
        ("acquire", "w1", 3, ["a"], 0.0, "b"),
        ("acquire", "w1", 4, ["b"], 0.0, "a"),  # b is full: a although tried
    ],
    "a queued retry keeps its avoid-list when woken": [
        *[("acquire", "w1", n, (), 0.0, f) for n, f in ((1, "a"), (2, "b"), (3, "a"), (4, "b"))],
        ("release", "w1", 1, []),
        ("release", "w1", 2, []),
        ("acquire", "w2", 1, ["a"], 0.0, "b"),
        ("acquire", "w2", 2, ["b"], 0.0, "a"),
        ("acquire", "w2", 3, ["a"], 0.0, "wait"),
        ("release", "w2", 2, ["w2#3>a"]),  # only a had room: it goes there
    ],
}


# A worker's channel ends while its process lives on (the supervisor cut it):
# its calls go on without a channel, so its slots count until it exits.
LOST_CHANNEL: dict[str, list[tuple[Any, ...]]] = {
    "a lost channel's slots stay counted: maxconn holds until its process exits": [
        ("acquire", "w1", 1, (), 0.0, "a"),
        ("acquire", "w1", 2, (), 0.0, "b"),
        ("acquire", "w1", 3, (), 0.0, "a"),
        ("acquire", "w2", 1, (), 0.0, "b"),
        ("lose", "w1", []),
        ("active", {"a": 2, "b": 2}),
        ("rows", {"w1": (3, True), "w2": (1, False)}),
        ("acquire", "w2", 2, (), 0.5, "wait"),  # beyond maxconn: queued, not admitted
        ("reclaimed", 0),
        ("exited", "w1", ["w2#2>a"]),  # the queue first, in order
        ("active", {"a": 1, "b": 1}),
        ("rows", {"w2": (2, False)}),
        ("reclaimed", 3),
        ("exited", "w1", []),  # once only
        ("reclaimed", 3),
    ],
    "a lost channel's waiters leave the queue at once: nobody is left to answer": [
        *[("acquire", "w1", n, (), 0.0, f) for n, f in ((1, "a"), (2, "b"), (3, "a"), (4, "b"))],
        ("acquire", "w1", 5, (), 0.0, "wait"),
        ("acquire", "w2", 1, (), 0.1, "wait"),
        ("lose", "w1", []),
        ("deadline", 0.1 + TIMEOUT),  # w2's only
        ("expire", 100.0, ["w2#1" + EXPIRED]),
    ],
    "a worker that held nothing is just gone, nothing kept": [
        ("acquire", "w2", 1, (), 0.0, "a"),
        ("lose", "w1", []),
        ("rows", {"w2": (1, False)}),
        ("exited", "w1", []),
        ("reclaimed", 0),
    ],
    "an exit seen for a worker whose channel is open takes nothing back": [
        ("acquire", "w1", 1, (), 0.0, "a"),
        ("exited", "w1", []),
        ("rows", {"w1": (1, False), "w2": (0, False)}),
        ("active", {"a": 1, "b": 0}),
    ],
    "a lost channel told twice stays kept; a plain leave reclaims it": [
        ("acquire", "w1", 1, (), 0.0, "a"),
        ("lose", "w1", []),
        ("lose", "w1", []),  # told twice: still kept
        ("active", {"a": 1, "b": 0}),
        ("leave", "w1", []),  # a plain leave of a kept row reclaims it
        ("reclaimed", 1),
        ("active", {"a": 0, "b": 0}),
    ],
}


@pytest.mark.parametrize("steps", list(LOST_CHANNEL.values()), ids=list(LOST_CHANNEL))
def test_lost_channel(steps):
    _play(_slots(), steps)


@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_transcript(steps):
    _play(_slots(), steps)


@pytest.mark.parametrize(
    ("setup", "kwargs", "reason"),
    [
        ("full", {"max_queue": 1}, QUEUE_FULL),
        ("full", {"queue_timeout": 0}, QUEUE_OFF),
        ("down", {}, BOTH_DOWN),
    ],
)
def test_refusals_at_once(setup, kwargs, reason):
    slots = _slots(maxconn=1, **kwargs)
    if setup == "full":
        for lease in (1, 2):
            assert slots.acquire("w1", lease, (), 0.0) is not None
        if kwargs.get("max_queue") == 1:
            assert slots.acquire("w1", 3, (), 0.0) is None
    else:
        _down(slots)
    assert _short(slots.acquire("w2", 9, (), 0.0)) == "!" + reason


def test_no_fleet_up_fails_the_waiters_on_wake():
    slots = _slots(maxconn=1)
    for lease, fleet in ((1, "a"), (2, "b"), (3, "wait"), (4, "wait")):
        assert _short(slots.acquire("w1", lease, (), 0.0)) == fleet
    _down(slots)
    _play(slots, [("wake", ["w1#3!" + BOTH_DOWN, "w1#4!" + BOTH_DOWN])])
    # While the queue is empty a DOWN host refuses at once, as when it is not.
    assert _short(slots.acquire("w2", 1, (), 0.0)) == "!" + BOTH_DOWN


def test_a_full_fleet_by_its_own_word_makes_calls_wait_until_a_probe_says_room():
    slots = _slots(maxconn=16)
    for f in slots.balancer.fleets:
        f.reported_available, f.opened_at_probe = 1, 0
    _play(
        slots,
        [
            ("acquire", "w1", 1, (), 0.0, "a"),
            ("acquire", "w2", 1, (), 0.0, "b"),
            ("acquire", "w2", 2, (), 0.0, "wait"),
        ],
    )
    a = slots.balancer.get("a")
    assert a is not None
    a.reported_available, a.opened_at_probe = 3, a.opened_total  # a probe says room
    _play(slots, [("wake", ["w2#2>a"])])


def test_a_drained_fleet_gets_no_new_call_and_keeps_its_slots():
    slots = _slots(maxconn=2)
    _play(slots, [("acquire", "w1", 1, (), 0.0, "a")])
    a = slots.balancer.get("a")
    assert a is not None
    a.set_admin(Admin.DRAIN)
    _play(
        slots,
        [
            ("acquire", "w1", 2, (), 0.0, "b"),
            ("acquire", "w1", 3, (), 0.0, "b"),
            ("acquire", "w1", 4, (), 0.0, "wait"),
            ("release", "w1", 1, []),  # a's slot back, but a is drained
            ("active", {"a": 0, "b": 2}),
        ],
    )


def test_stats_per_worker_pid_generation_calls():
    slots = _slots(maxconn=16)
    slots.join("w3", pid=303, generation=2)
    for lease in range(3):
        slots.acquire("w1", lease, (), 0.0)
    slots.acquire("w3", 1, (), 0.0)
    slots.release("w1", 0)
    rows = {r.worker: (r.pid, r.generation, r.calls, r.granted_total) for r in slots.workers}
    assert rows == {"w1": (101, 1, 2, 3), "w2": (102, 1, 0, 0), "w3": (303, 2, 1, 1)}
    row, _ = slots.leave("w1")
    assert row is not None and row.calls == 2 and sorted(row.held) == [1, 2]
    assert slots.reclaimed_total == 2
    assert [r.worker for r in slots.workers] == ["w2", "w3"]


def test_generations_share_one_maxconn():
    """An upgrade's new generation takes slots from the same table the old
    one still holds: maxconn holds across them."""
    slots = _slots(maxconn=2)
    slots.join("new", pid=201, generation=2)
    for lease in range(4):
        slots.acquire("w1", lease, (), 0.0)
    assert _short(slots.acquire("new", 1, (), 0.0)) == "wait"
    slots.leave("w2")  # an old worker with nothing held exits: nothing frees
    assert slots.queue_length == 1
    assert [_render(a) for a in slots.release("w1", 0)] == ["new#1>a"]


def test_release_hooks_run_for_slots_given_back_and_reclaimed():
    slots = _slots(maxconn=2)
    seen: list[str] = []
    slots.on_release.append(lambda fleet: seen.append(fleet.name))
    slots.acquire("w1", 1, (), 0.0)
    slots.acquire("w1", 2, (), 0.0)
    slots.release("w1", 1)
    slots.release("w1", 1)
    slots.leave("w1")
    assert seen == ["a", "b"]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([("w1", 1), ("w1", 1)], "reused lease id 1"),
        ([("w9", 1)], "has not joined"),
    ],
)
def test_protocol_errors_name_the_worker_and_the_lease(steps, message):
    slots = _slots(maxconn=1)
    with pytest.raises(SlotProtocolError, match=message):
        for worker, lease in steps:
            slots.acquire(worker, lease, (), 0.0)


def test_a_queued_lease_id_cannot_be_reused_either():
    slots = _slots(maxconn=1)
    slots.acquire("w1", 1, (), 0.0)
    slots.acquire("w1", 2, (), 0.0)
    assert slots.acquire("w1", 3, (), 0.0) is None
    with pytest.raises(SlotProtocolError, match="reused lease id 3"):
        slots.acquire("w1", 3, (), 0.0)


def test_joining_twice_is_refused():
    slots = _slots()
    with pytest.raises(SlotProtocolError, match="joined twice"):
        slots.join("w1", pid=1, generation=1)


def _say_room(slots: HostSlots, name: str, available: int) -> None:
    """A probe of fleet `name` reports `available` free workers."""
    fleet = slots.balancer.get(name)
    assert fleet is not None
    fleet.reported_available, fleet.opened_at_probe = available, fleet.opened_total


def test_room_from_a_probe_goes_to_the_waiters_before_a_newcomer():
    slots = _slots(maxconn=16)
    _say_room(slots, "a", 1)
    _say_room(slots, "b", 1)
    _play(
        slots,
        [
            ("acquire", "w1", 1, (), 0.0, "a"),
            ("acquire", "w1", 2, (), 0.0, "b"),
            ("acquire", "w1", 3, (), 0.0, "wait"),
        ],
    )
    _say_room(slots, "a", 1)  # room appeared; the caller has not called wake() yet
    _play(slots, [("acquire", "w2", 1, (), 0.0, "wait"), ("wake", ["w1#3>a"])])


def test_a_woken_retry_goes_to_a_fleet_it_has_not_tried():
    slots = _slots(maxconn=16)
    _say_room(slots, "a", 1)
    _say_room(slots, "b", 2)
    _play(
        slots,
        [
            ("acquire", "w1", 1, (), 0.0, "a"),
            ("acquire", "w1", 2, (), 0.0, "b"),
            ("acquire", "w1", 3, (), 0.0, "b"),
            ("acquire", "w2", 1, ["a"], 0.0, "wait"),
        ],
    )
    _say_room(slots, "a", 5)
    _say_room(slots, "b", 5)
    # leastconn alone would say a (1 call against 2): the retry avoids it.
    _play(slots, [("wake", ["w2#1>b"])])


def _fresh(maxconn: int = 2) -> HostSlots:
    """The table of a supervisor just re-executed: nobody has joined yet."""
    specs = parse_fleets_text(TWO_FLEETS, default_maxconn=maxconn)
    slots = HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=TIMEOUT, max_queue=8)
    slots.paused = True
    return slots


def test_a_table_rebuilt_from_the_workers_counts_what_they_hold_and_queues_in_age_order():
    slots = _fresh()
    now = 10.0
    assert (
        slots.restore(
            "w1",
            pid=101,
            generation=1,
            held=[(1, "a"), (2, "a"), (3, "b")],
            waiting=[(4, (), 0.5)],
            now=now,
        )
        == []
    )
    slots.restore("w2", pid=102, generation=1, held=[(1, "b")], waiting=[(2, ["b"], 1.0)], now=now)
    slots.join("new", pid=201, generation=2)
    _play(
        slots,
        [
            ("active", {"a": 2, "b": 2}),
            ("acquire", "new", 1, (), now, "wait"),
            ("deadline", None),  # paused: nothing expires against a count not complete
        ],
    )
    assert slots.queued() == [("w2", 2), ("w1", 4), ("new", 1)]
    assert [_render(a) for a in slots.resume()] == []  # full: nothing to grant yet
    _play(slots, [("deadline", now - 1.0 + TIMEOUT)])  # w2's: it has waited longest
    _play(
        slots,
        [
            ("release", "w1", 1, ["w2#2>a"]),  # avoids b... and only a has room
            ("release", "w2", 1, ["w1#4>b"]),
            ("release", "w1", 3, ["new#1>b"]),
            ("expire", 100.0, []),
        ],
    )
    rows = {r.worker: (r.pid, r.generation, r.calls) for r in slots.workers}
    assert rows == {"w1": (101, 1, 2), "w2": (102, 1, 1), "new": (201, 2, 1)}


def test_nothing_is_granted_while_paused_even_with_room_then_in_order():
    slots = _fresh(maxconn=16)
    slots.restore("w1", pid=1, generation=1, held=[(1, "a")], waiting=[], now=0.0)
    _play(slots, [("acquire", "w1", 2, (), 0.0, "wait"), ("wake", [])])
    slots.restore("w2", pid=2, generation=1, held=[], waiting=[(1, (), 0.2)], now=0.1)
    assert [_render(a) for a in slots.resume()] == ["w2#1>b", "w1#2>a"]


def test_a_call_that_waited_through_a_slow_reexecution_gets_a_free_slot_not_a_timeout():
    """The table is rebuilt after an exec that took longer than the queue's
    timeout (3.6 s on a loaded host, the cross-version audit of session 16):
    the waiters the workers report are past their deadline. Refused then, they
    were told "no fleet had room" while fleets had. They are offered a slot at
    resume; one that still finds none is refused at once after it."""
    slots = _fresh(maxconn=1)
    slots.restore("w1", pid=1, generation=1, held=[(1, "a")], waiting=[(2, (), 3.6)], now=10.0)
    slots.restore(
        "w2", pid=2, generation=1, held=[], waiting=[(1, (), 3.5), (2, (), 3.4)], now=10.0
    )
    _play(slots, [("expire", 10.0 + TIMEOUT, [])])  # paused: nobody refused
    assert slots.queue_timeouts == 0
    assert [_render(a) for a in slots.resume()] == ["w1#2>b"]  # the one free slot, oldest first
    assert slots.next_deadline() is not None and slots.next_deadline() <= 10.0
    timed_out = "!no fleet had room within 3s in the queue"
    _play(slots, [("expire", 10.0, ["w2#1" + timed_out, "w2#2" + timed_out])])
    assert slots.queue_timeouts == 2


def test_held_leases_count_past_maxconn_and_unknown_fleets_count_nowhere():
    slots = _fresh(maxconn=2)
    unknown = slots.restore(
        "w1",
        pid=1,
        generation=1,
        held=[(1, "a"), (2, "a"), (3, "a"), (4, "gone")],
        waiting=[],
        now=0.0,
    )
    assert unknown == ["gone"]
    slots.resume()
    _play(
        slots,
        [
            ("active", {"a": 3, "b": 0}),
            ("acquire", "w1", 5, (), 0.0, "b"),
            ("acquire", "w1", 6, (), 0.0, "b"),
            ("acquire", "w1", 7, (), 0.0, "wait"),
            ("release", "w1", 1, []),  # a at 2 of 2: still no room
            ("release", "w1", 4, []),  # the removed fleet's call ends: nothing to free
            ("release", "w1", 2, ["w1#7>a"]),
        ],
    )


def test_leases_a_worker_says_are_still_in_flight_stay_out_of_the_estimate_after_an_exec():
    """The new image's probe may overtake calls granted before the exec that
    their fleet has not taken yet: they are left out of its number until the
    worker says when the fleet answered them. A worker of an older release
    (no "answers") says none."""
    slots = _fresh(maxconn=16)
    a = slots.balancer.get("a")
    assert a is not None
    slots.restore(
        "w1",
        pid=1,
        generation=1,
        held=[(1, "a"), (2, "a"), (3, "a")],
        waiting=[],
        now=0.0,
        tells_answers=True,
        in_flight={2, 3},
    )
    slots.resume()
    opened = a.probe_sending(10.0)  # the new image's first probe
    a.probe_counted(5, opened)  # the fleet says 5 free: calls 2 and 3 not taken yet
    assert a.estimated_available == 3
    slots.answered("w1", 2, 9.0)  # before that probe left: in its number
    assert a.estimated_available == 4
    slots.answered("w1", 3, 11.0)  # after: out until the next probe, as any call
    assert a.estimated_available == 4
    # An older worker's leases count as answered, whatever it says.
    b = slots.balancer.get("b")
    assert b is not None
    slots.restore("old", pid=2, generation=1, held=[(1, "b")], waiting=[], now=0.0, in_flight={1})
    b.probe_counted(5, b.probe_sending(10.0))
    assert b.estimated_available == 5


def test_a_call_still_connecting_stays_in_flight_over_an_exec_that_failed():
    """The exec failed after the hand-over (`suspend`, then `restore` from the
    same worker): its suspended row holds the lease under the same key, and
    closing it ended the in-flight mark restore had just made, so the next
    probe's count took that call for a free worker (the fuzzing of session 20)."""
    fleet_set = FleetSet.from_specs(parse_fleets_text(TWO_FLEETS, default_maxconn=16))
    slots = HostSlots(Balancer(fleet_set), queue_timeout=TIMEOUT, max_queue=8)
    slots.join("w1", pid=1, generation=1, tells_answers=True)
    _play(slots, [("acquire", "w1", 1, (), 0.0, "a")])
    a = slots.balancer.get("a")
    assert a is not None and a.pending == {("w1", 1)}
    slots.paused = True
    slots.suspend("w1")
    slots.restore(
        "w1",
        pid=1,
        generation=1,
        held=[(1, "a")],
        waiting=[],
        now=1.0,
        tells_answers=True,
        in_flight={1},
    )
    slots.resume()
    assert a.pending == {("w1", 1)} and a.active == 1
    a.probe_counted(5, a.probe_sending(10.0))  # the fleet has not taken the call yet
    assert a.estimated_available == 4


def _one_fleet_with_three_calls_left_out() -> HostSlots:
    """Fleet a (maxconn 16, 3 workers) and worker w1's 3 calls there, still
    connecting when a probe left: it said 3 free, which the table reads as
    none (the 3 left out)."""
    specs = parse_fleets_text("https://a.test name=a\n", default_maxconn=16)
    slots = HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=TIMEOUT, max_queue=8)
    slots.join("w1", pid=1, generation=1, tells_answers=True)
    a = slots.balancer.get("a")
    assert a is not None
    a.probe_counted(3, a.probe_sending(0.0))
    _play(slots, [("acquire", "w1", n, (), 1.0, "a") for n in (1, 2, 3)])
    a.probe_counted(3, a.probe_sending(2.0))  # sent while the 3 connect
    assert a.estimated_available == 0
    return slots


def test_calls_answered_during_the_exec_are_not_counted_free_by_the_new_image():
    """The fleet answers the 3 calls while the supervisor re-executes: the
    worker's "state" no longer says them in flight. The fleet's number carried
    over the exec was sent before they were answered, so it does not count
    them: they stay left out until a probe sent after the exec counts them.
    Before, the new image read that number as 3 free and granted the calls
    queued meanwhile to a full fleet (its 429; the exec audit of session 42)."""
    old = _one_fleet_with_three_calls_left_out()
    assert old.left_out("w1") == [1, 2, 3]  # carried in the exec's state
    carried = fleets_to_json(old.balancer.fleets)
    specs = parse_fleets_text("https://a.test name=a\n", default_maxconn=16)
    new = HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=TIMEOUT, max_queue=8)
    new.paused = True
    assert restore_fleets(new.balancer.fleets, carried) == ["a"]
    new.restore(
        "w1",
        pid=1,
        generation=1,
        held=[(1, "a"), (2, "a"), (3, "a")],
        waiting=[(4, (), 0.5)],
        now=10.0,
        tells_answers=True,
        in_flight=set(),  # answered during the exec
        left_out=old.left_out("w1"),
    )
    assert new.resume() == []  # lease 4 waits: the fleet is full
    a = new.balancer.get("a")
    assert a is not None and a.estimated_available == 0 and not a.pending
    # A probe sent after the exec counts them (the fleet says 0 free); one ends.
    a.probe_counted(0, a.probe_sending(11.0))
    assert a.estimated_available == 0 and not a.unseen
    _play(new, [("release", "w1", 1, [])])
    a.probe_counted(1, a.probe_sending(12.0))
    _play(new, [("wake", ["w1#4>a"])])


def test_calls_answered_during_an_exec_that_failed_stay_left_out_of_the_estimate():
    """The same over an exec that failed (`suspend`, then `restore` in the same
    table): closing the suspended row's leases ended their marks, so the
    number counted before the exec took the 3 answered calls for free workers."""
    slots = _one_fleet_with_three_calls_left_out()
    slots.paused = True
    slots.suspend("w1")
    slots.restore(
        "w1",
        pid=1,
        generation=1,
        held=[(1, "a"), (2, "a"), (3, "a")],
        waiting=[(4, (), 0.5)],
        now=10.0,
        tells_answers=True,
        in_flight=set(),
    )
    assert slots.resume() == []
    a = slots.balancer.get("a")
    assert a is not None and a.estimated_available == 0


@pytest.mark.parametrize(
    ("queue_timeout", "max_queue", "refused"),
    [(0.0, 8, QUEUE_OFF), (TIMEOUT, 1, QUEUE_FULL)],
)
def test_calls_asked_while_the_table_is_paused_wait_for_the_count_not_a_refusal(
    queue_timeout: float, max_queue: int, refused: str
):
    """While an upgrade rebuilds the table, a call's slot is asked before the
    count is whole: refused as queueing off or a full queue, it got 503 "every
    fleet is at capacity" while the fleets had room (the fuzzing of session 20).
    It waits; at resume it gets a slot, or the refusal acquire would have given."""
    specs = parse_fleets_text(TWO_FLEETS, default_maxconn=1)
    slots = HostSlots(
        Balancer(FleetSet.from_specs(specs)), queue_timeout=queue_timeout, max_queue=max_queue
    )
    slots.paused = True
    slots.restore("w1", pid=1, generation=1, held=[], waiting=[], now=0.0)
    _play(slots, [("acquire", "w1", n, (), 0.0, "wait") for n in (1, 2, 3, 4)])
    answers = [_render(a) for a in slots.resume()]
    if queue_timeout:  # room for two; one waits (max_queue 1), the last asked is refused
        assert answers == ["w1#1>a", "w1#2>b", "w1#4!" + refused]
        assert slots.queued() == [("w1", 3)]
    else:  # room for two, no queue: the other two are refused
        assert answers == ["w1#1>a", "w1#2>b", "w1#3!" + refused, "w1#4!" + refused]
        assert slots.queued() == []


def test_a_worker_slow_to_restore_keeps_what_it_held_before_counted_until_it_says():
    """After a re-execution the table grants again once the others answered; a
    worker that has not yet keeps the previous table's count (an upper bound:
    it can only have given slots back), so maxconn holds meanwhile."""
    slots = _fresh(maxconn=2)
    slots.restore("w1", pid=1, generation=1, held=[(1, "b")], waiting=[], now=0.0)
    slots.reserve("slow", pid=2, generation=1, fleets=["a", "a", "b", "gone"])
    assert [_render(a) for a in slots.resume()] == []
    _play(
        slots,
        [
            ("active", {"a": 2, "b": 2}),
            ("acquire", "w1", 2, (), 0.0, "wait"),  # full: the slow one's slots count
            ("acquire", "w1", 3, (), 0.0, "wait"),
        ],
    )
    assert [(r.pid, r.calls, r.reserved) for r in slots.workers] == [(1, 1, False), (2, 3, True)]
    # Its answer, late: one of its calls on a ended during the exec.
    assert (
        slots.restore("slow", pid=2, generation=1, held=[(7, "a"), (8, "b")], waiting=[], now=1.0)
        == []
    )
    _play(slots, [("active", {"a": 1, "b": 2}), ("wake", ["w1#2>a"])])
    assert [(r.pid, r.calls, r.reserved) for r in slots.workers] == [(1, 2, False), (2, 2, False)]
    _play(slots, [("release", "slow", 8, ["w1#3>b"])])
    assert slots.reclaimed_total == 0


def test_a_worker_that_dies_before_it_restores_gives_back_what_was_kept_for_it():
    slots = _fresh(maxconn=1)
    slots.reserve("slow", pid=2, generation=1, fleets=["a", "b"])
    slots.join("new", pid=3, generation=2)
    slots.resume()
    _play(slots, [("acquire", "new", 1, (), 0.0, "wait")])
    row, answers = slots.leave("slow")
    assert row is not None and row.calls == 2 and slots.reclaimed_total == 2
    assert [_render(a) for a in answers] == ["new#1>a"]
    _play(slots, [("active", {"a": 1, "b": 0})])
    with pytest.raises(SlotProtocolError, match="joined twice"):
        slots.restore("new", pid=3, generation=2, held=[], waiting=[], now=0.0)


def test_a_worker_taken_back_keeps_its_slots_counted_and_a_removed_fleet_is_not_reaped():
    """An exec that fails after the hand-over: the table serves the same
    workers again and waits for their account. A slot held meanwhile is never
    given back (a removed fleet would be reaped with calls on it): only what
    the worker no longer holds frees up once it says."""
    fleet_set = FleetSet.from_specs(parse_fleets_text(TWO_FLEETS, default_maxconn=2))
    slots = HostSlots(Balancer(fleet_set), queue_timeout=TIMEOUT, max_queue=8)
    reaped: list[str] = []
    slots.on_release.append(lambda fleet: fleet_set.reap(fleet) and reaped.append(fleet.name))
    slots.join("w1", pid=101, generation=1)
    _play(slots, [("acquire", "w1", 1, (), 0.0, "a"), ("acquire", "w1", 2, (), 0.0, "b")])
    a = slots.balancer.get("a")
    assert a is not None and not fleet_set.remove(a)  # removed from the file: drains its call
    _play(slots, [("acquire", "w1", 3, (), 0.0, "b"), ("acquire", "w1", 4, (), 0.5, "wait")])
    slots.paused = True
    row = slots.suspend("w1")
    assert row is not None and row.reserved and row.calls == 3
    assert reaped == [] and slots.queue_length == 0  # its waiter is named again in its state
    _play(slots, [("active", {"a": 1, "b": 2})])
    # Its account: the call on b (lease 2) ended meanwhile, lease 4 still waits.
    assert (
        slots.restore(
            "w1", pid=101, generation=1, held=[(1, "a"), (3, "b")], waiting=[(4, (), 1.0)], now=1.0
        )
        == []
    )
    assert reaped == [] and slots.reclaimed_total == 0
    _play(slots, [("active", {"a": 1, "b": 1})])
    assert [_render(x) for x in slots.resume()] == ["w1#4>b"]
    _play(slots, [("release", "w1", 1, [])])
    assert reaped == ["a"]


def test_a_worker_silent_since_the_exec_whose_channel_is_lost_keeps_what_it_held_before():
    """Kept over a re-execution, it never said what it holds; its channel ends
    while it runs: the previous table's count stays until it exits, then
    comes back counted reclaimed (it was not, before: the calls it lost were
    counted, their slots not)."""
    slots = _fresh(maxconn=2)
    slots.join("new", pid=3, generation=2)
    slots.reserve("old", pid=2, generation=1, fleets=["a", "a", "b"])
    slots.resume()
    _play(
        slots,
        [
            ("lose", "old", []),
            ("rows", {"new": (0, False), "old": (3, True)}),
            ("acquire", "new", 1, (), 0.0, "b"),
            ("acquire", "new", 2, (), 0.0, "wait"),
            ("exited", "old", ["new#2>a"]),
            ("reclaimed", 3),
        ],
    )


def _table(slots: HostSlots) -> tuple[Any, ...]:
    """Everything `restore` may change, to compare before and after."""
    rows = {
        r.worker: (r.pid, r.generation, r.reserved, {k: f.name for k, f in r.held.items()})
        for r in slots.workers
    }
    active = {f.name: f.active for f in slots.balancer.fleets}
    return rows, active, slots.queued(), slots.reclaimed_total


@pytest.mark.parametrize(
    ("held", "waiting"),
    [
        ([(1, "a"), (2, "b"), (1, "b")], []),
        ([(1, "gone"), (1, "a")], []),  # a fleet it does not know does not hide the clash
        ([(1, "a")], [(1, (), 0.1)]),
        ([], [(3, (), 0.1), (3, ("a",), 0.2)]),
    ],
    ids=["held-twice", "held-twice-unknown-fleet", "held-and-waiting", "waiting-twice"],
)
def test_an_account_with_a_lease_twice_changes_nothing_and_what_was_kept_is_given_back(
    held, waiting
):
    """A worker's "state" the table cannot mean is refused whole: what was
    counted for it before (the previous image's table, `reserve`) stays
    counted, so its channel closing gives it back (it was counted for ever)."""
    slots = _fresh(maxconn=2)
    slots.restore("w1", pid=1, generation=1, held=[(1, "b")], waiting=[(2, (), 0.0)], now=0.0)
    slots.reserve("slow", pid=2, generation=1, fleets=["a", "b"])
    before = _table(slots)
    with pytest.raises(SlotProtocolError, match=r"lease id \d+ twice"):
        slots.restore("slow", pid=2, generation=1, held=held, waiting=waiting, now=1.0)
    assert _table(slots) == before
    row, _ = slots.leave("slow")
    assert row is not None and row.calls == 2
    _play(slots, [("active", {"a": 0, "b": 1})])
    assert [_render(a) for a in slots.resume()] == ["w1#2>a"]
    # Up to maxconn again: 2 on a, 2 on b.
    granted = [_short(slots.acquire("w1", lease, (), 1.0)) for lease in (3, 4, 5)]
    assert sorted(granted) == ["a", "b", "wait"]


def test_an_account_with_a_lease_twice_after_a_take_back_changes_nothing():
    slots = _fresh(maxconn=2)
    slots.join("w1", pid=1, generation=1)
    slots.resume()
    _play(slots, [("acquire", "w1", 1, (), 0.0, "a"), ("acquire", "w1", 2, (), 0.0, "b")])
    slots.paused = True
    slots.suspend("w1")
    before = _table(slots)
    with pytest.raises(SlotProtocolError, match=r"lease id \d+ twice"):
        slots.restore("w1", pid=1, generation=1, held=[(1, "a"), (1, "a")], waiting=[], now=1.0)
    assert _table(slots) == before
    slots.leave("w1")
    _play(slots, [("active", {"a": 0, "b": 0})])


def test_an_answer_from_the_queue_says_so_and_one_at_once_does_not():
    """The worker times a wait from its ask; the table says which answers
    came from the queue (a grant at `wake`, a refusal at `expire` or when no
    fleet is left up), so that a call answered at once is not counted as
    having waited the channel's round trip (the queue audit of session 37)."""
    slots = _slots(maxconn=1)
    at_once = [slots.acquire("w1", lease, [], now=0.0) for lease in (1, 2)]
    assert [type(a).__name__ for a in at_once] == ["Granted", "Granted"]
    assert not any(a.queued for a in at_once if a is not None)
    assert slots.acquire("w2", 1, [], now=0.0) is None  # waits
    assert slots.acquire("w2", 2, [], now=0.5) is None  # waits
    (granted,) = slots.release("w1", 1)
    assert isinstance(granted, Granted) and granted.queued and granted.lease == 1
    (expired,) = slots.expire(now=TIMEOUT + 0.5)
    assert expired.reason == EXPIRED[1:] and expired.queued
    for f in slots.balancer.fleets:
        f.health = Health.DOWN
    refused = slots.acquire("w1", 3, [], now=5.0)  # no fleet up: at once
    assert refused is not None and not isinstance(refused, Granted) and not refused.queued


def test_a_worker_is_stuck_once_a_report_asked_of_it_is_overdue_or_pulls_went_unanswered():
    """The rule `stat`, /stats.json and /metrics show a worker unresponsive by
    (session 40's host-view audit): a report asked of it judged overdue (the
    slot server's timer, REPORT_OVERDUE in time the supervisor ran), or
    UNRESPONSIVE_PULLS pulls unanswered; never once its channel is lost (it is
    asked nothing then)."""
    row = _slots().find_row("w1")
    assert row is not None
    assert not row.report_overdue and not row.stuck  # nothing asked
    row.report_overdue = True
    assert row.stuck
    row.report_overdue = False  # its report read
    assert not row.stuck
    row.silent_pulls = UNRESPONSIVE_PULLS
    assert row.stuck and not row.report_overdue
    row.report_overdue = True
    row.channel_lost = True
    assert not row.stuck
