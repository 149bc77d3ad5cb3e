"""Grant budgets for a re-execution (`core.slot_budget`) and how the table
counts them (`HostSlots.count_budget`): pure logic, no sockets."""

from __future__ import annotations

import itertools

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer, FleetState
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.core.slot_budget import Budget, BudgetFleet, free_slots, share


def _fleets(text: str) -> list[FleetState]:
    return list(FleetSet.from_specs(parse_fleets_text(text, default_maxconn=10)).fleets)


def test_free_slots_is_what_pick_would_grant_now() -> None:
    a, b, c, d, e = _fleets(
        "https://a.test name=a maxconn=5\nhttps://b.test name=b maxconn=5\n"
        "https://c.test name=c maxconn=5\nhttps://d.test name=d maxconn=5\n"
        "https://e.test name=e maxconn=5\n"
    )
    a.active = 3
    assert free_slots(a) == 2
    b.admin = Admin.DRAIN
    assert free_slots(b) == 0
    c.admin = Admin.MAINT
    assert free_slots(c) == 0
    d.health = Health.DOWN
    assert free_slots(d) == 0
    # Its own word on its free workers bounds it, less the calls opened since.
    e.reported_available, e.opened_total, e.opened_at_probe = 3, 2, 0
    assert free_slots(e) == 1
    e.reported_available = 0
    assert free_slots(e) == 0 and e.full
    a.active = 7  # over maxconn (held calls carried over a reload): none, not negative
    assert free_slots(a) == 0


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
@pytest.mark.parametrize("maxconns", [(2,), (2, 3), (1, 1, 1, 1), (7, 1, 4)])
def test_shares_of_a_fleet_sum_to_its_free_slots(workers: int, maxconns: tuple[int, ...]) -> None:
    lines = "".join(f"https://f{i}.test name=f{i} maxconn={m}\n" for i, m in enumerate(maxconns))
    fleets = _fleets(lines)
    keys = [f"w{i}" for i in range(workers)]
    budgets = share(fleets, keys, queue_length=0)
    for fleet in fleets:
        shares = [budgets.get(k, {}).get(fleet.name, 0) for k in keys]
        assert sum(shares) == fleet.maxconn  # every free slot given, none twice
        assert max(shares) - min(shares) <= 1  # evenly
    # One slot on each of many fleets spreads over the workers.
    if maxconns == (1, 1, 1, 1):
        assert len(budgets) == min(workers, 4)


def test_no_budget_while_a_call_waits_in_the_queue_or_for_no_worker() -> None:
    fleets = _fleets("https://a.test name=a maxconn=4\n")
    assert share(fleets, ["w1", "w2"], queue_length=1) == {}  # FIFO: nobody overtakes it
    assert share(fleets, [], queue_length=0) == {}
    fleets[0].active = 4
    assert share(fleets, ["w1"], queue_length=0) == {}  # full: nothing to share


def test_a_budget_grants_leastconn_fresh_before_tried_then_runs_out() -> None:
    budget = Budget([BudgetFleet("a", 2, 5), BudgetFleet("b", 1, 3), BudgetFleet("c", 0, 0)])
    assert budget.left == 3
    assert budget.take() == "b"  # fewest calls (3 against 5); c has no slot
    assert budget.take(avoid=["a"]) == "a"  # tried, but the only one with slots left
    assert budget.take() == "a"
    assert budget.take() is None  # none left: the call waits, as without a budget
    assert budget.granted == 3 and budget.left == 0


def test_a_slot_given_back_is_granted_again_but_only_on_a_budgeted_fleet() -> None:
    budget = Budget([BudgetFleet("a", 1, 0)])
    assert budget.take() == "a" and budget.take() is None
    budget.give_back("z")  # a call on a fleet not shared (full, drained): not reused
    assert budget.take() is None
    budget.give_back("a")
    assert budget.take() == "a"


def test_a_slot_taken_and_not_granted_is_left_as_it_was() -> None:
    """`untake`: the worker's record of the fleet chosen says it takes no call
    now (`SlotClient.lease_now`): its slot, its count and the total granted
    are as before the take."""
    budget = Budget([BudgetFleet("a", 2, 1, most=2), BudgetFleet("b", 1, 4)])
    assert budget.take() == "a"
    budget.untake("a")
    assert budget.slots() == {"a": 2, "b": 1} and budget.granted == 0
    assert budget.take() == "a"  # still the fewest calls: its count is back to 1
    assert budget.take() == "a" and budget.take() == "b" and budget.take() is None


def test_ties_go_round_robin() -> None:
    budget = Budget([BudgetFleet("a", 5, 0), BudgetFleet("b", 5, 0)])
    taken = [budget.take() for _ in range(4)]
    assert sorted(taken) == ["a", "a", "b", "b"]


def _table(text: str) -> HostSlots:
    fleets = FleetSet.from_specs(parse_fleets_text(text, default_maxconn=10))
    return HostSlots(Balancer(fleets), queue_timeout=3.0, max_queue=8)


def test_a_worker_slow_after_the_exec_counts_its_budget_until_its_state() -> None:
    """maxconn host-wide: a worker that has not said what it holds may have
    granted its whole budget; counted so, nothing else is granted past maxconn
    until its state replaces the count."""
    slots = _table("https://a.test name=a maxconn=3\n")
    (a,) = slots.balancer.fleets
    slots.paused = True
    slots.reserve("w1", pid=1, generation=1, fleets=["a"])  # held one before the exec
    slots.count_budget("w1", ["a", "a"])  # and was given the other two
    slots.join("w2", pid=2, generation=1)
    assert slots.resume() == []
    assert a.active == 3
    assert slots.acquire("w2", 1, [], now=0.0) is None  # queued: no room
    # Its state: it granted one of its budget, the call it held ended.
    restored = slots.restore("w1", pid=1, generation=1, held=[(7, "a")], waiting=[], now=0.0)
    assert restored == [] and a.active == 1
    (granted,) = slots.wake()
    assert granted.worker == "w2" and a.active == 2


def test_a_silent_workers_budget_counts_in_flight_against_the_fleets_estimate() -> None:
    """A worker silent after the exec may have granted its whole budget, the
    calls still connecting: in no count of calls opened (they come with its
    state) and in no fleet's number. Counted against maxconn alone, the
    fleet's estimate (3 free, from before the exec) let the other worker's
    two waiting calls through, one past the fleet's workers (its 429)."""
    slots = _table("https://a.test name=a maxconn=10\n")
    (a,) = slots.balancer.fleets
    a.probe_counted(3, a.probe_sending(0.0))  # before the exec: 3 free
    slots.paused = True
    slots.reserve("w1", pid=1, generation=1, fleets=[])  # held nothing before the exec
    slots.count_budget("w1", ["a", "a"])  # given two slots of a
    slots.restore("w2", pid=2, generation=1, held=[], waiting=[(1, [], 0.1), (2, [], 0.1)], now=0.0)
    (granted,) = slots.resume()
    assert (granted.worker, granted.lease) == ("w2", 1) and a.estimated_available == 0
    # Its state, late: both granted, still connecting; what it was counted goes.
    slots.restore(
        "w1",
        pid=1,
        generation=1,
        held=[(5, "a"), (6, "a")],
        waiting=[],
        now=1.0,
        tells_answers=True,
        in_flight={5, 6},
    )
    assert a.active == 3 and a.pending == {("w1", 5), ("w1", 6)}
    assert a.estimated_available == 0 and slots.wake() == []


def test_a_budget_is_counted_only_for_a_worker_counted_from_before() -> None:
    slots = _table("https://a.test name=a maxconn=3\n")
    (a,) = slots.balancer.fleets
    slots.join("w1", pid=1, generation=1)
    slots.count_budget("w1", ["a"])  # it has said what it holds: its count is exact
    slots.count_budget("w9", ["a"])  # not known
    assert a.active == 0
    # After `suspend` (a failed exec), under the row's own lease ids.
    slots.acquire("w1", 1, [], now=0.0)
    slots.suspend("w1")
    slots.count_budget("w1", ["a", "a"])
    assert a.active == 3
    row = slots.get("w1")
    assert row is not None and sorted(row.held) == [-2, -1, 1]
    _, answers = slots.leave("w1")
    assert a.active == 0 and answers == []


def test_shares_and_budgets_never_exceed_maxconn_whatever_the_workers_take() -> None:
    """Every order of takes and gives-back by every worker: the fleet's count
    (held before + granted from the budgets) stays within maxconn."""
    fleets = _fleets("https://a.test name=a maxconn=4\nhttps://b.test name=b maxconn=3\n")
    fleets[0].active, fleets[1].active = 1, 0
    budgets = share(fleets, ["w1", "w2"], queue_length=0)
    for order in itertools.islice(itertools.product(["w1", "w2"], repeat=8), 0, 256, 7):
        kept = {w: Budget([BudgetFleet(n, s, 0) for n, s in b.items()]) for w, b in budgets.items()}
        counts = {f.name: f.active for f in fleets}
        for worker in order:
            name = kept[worker].take()
            if name is not None:
                counts[name] += 1
            assert counts["a"] <= 4 and counts["b"] <= 3
        for budget in kept.values():  # each worker takes what it has left
            while (name := budget.take()) is not None:
                counts[name] += 1
        assert counts == {"a": 4, "b": 3}  # every free slot was given, none twice
