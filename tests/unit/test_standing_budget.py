"""Standing grant budgets (`core.slot_budget.standing_share`, `HostSlots`'
standing methods): the table's side, told as a worker's channel would tell it,
pure logic, no sockets. The wire and real processes: tests/e2e/test_slot_workers.py
and tests/e2e/test_standing_budget_channel.py."""

from __future__ import annotations

import dataclasses

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer, FleetState
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import Granted, HostSlots, SlotProtocolError
from fleet_ingress.core.slot_budget import Budget, BudgetFleet, free_slots, standing_share


def _table(text: str) -> HostSlots:
    fleets = FleetSet.from_specs(parse_fleets_text(text, default_maxconn=10))
    return HostSlots(Balancer(fleets), queue_timeout=3.0, max_queue=8)


def _fleet(slots: HostSlots, name: str) -> FleetState:
    fleet = slots.balancer.get(name)
    assert fleet is not None
    return fleet


def test_a_share_leaves_room_for_calls_asked_of_the_supervisor_and_none_while_one_waits() -> None:
    slots = _table("https://a.test name=a maxconn=16\nhttps://b.test name=b maxconn=2\n")
    a, b = slots.balancer.fleets
    # Of each fleet's free slots, their share over the takers plus one.
    assert standing_share([a, b], 1, queue_length=0) == {"a": 8, "b": 1}
    assert standing_share([a, b], 2, queue_length=0) == {"a": 5}
    assert standing_share([a, b], 1, queue_length=0, most=3) == {"a": 3, "b": 1}
    assert standing_share([a, b], 1, queue_length=1) == {}  # FIFO: nobody overtakes it
    a.admin = Admin.DRAIN
    assert standing_share([a, b], 1, queue_length=0) == {"b": 1}


def test_reserved_slots_count_against_maxconn_and_the_estimate_not_as_calls() -> None:
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    a.reported_available, a.opened_at_probe = 6, 0
    slots.join("w1", pid=1, generation=1)
    slots.join("w2", pid=2, generation=1)
    assert [f.left for f in slots.give_standing("w1", {"a": 2})] == [2]
    assert a.active == 0 and a.standing == 2  # stats show no call
    assert a.estimated_available == 4  # a grant from it may be on its way: left out
    assert free_slots(a) == 2
    assert isinstance(slots.acquire("w2", 1, [], 0.0), Granted)
    assert isinstance(slots.acquire("w2", 2, [], 0.0), Granted)
    assert slots.acquire("w2", 3, [], 0.0) is None  # maxconn: 2 held + 2 reserved
    assert a.active + a.standing == 4


def test_grants_from_it_become_the_hosts_and_releases_go_back_up_to_its_size() -> None:
    slots = _table("https://a.test name=a maxconn=10\n")
    a = _fleet(slots, "a")
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 2})
    # Released before the worker said it has it: the host's again, as the worker's.
    assert isinstance(slots.acquire("w1", 1, [], 0.0), Granted)
    slots.release("w1", 1)
    assert a.active == 0 and a.standing == 2
    slots.standing_taken("w1")
    granted = slots.grant_standing("w1", 2, "a")
    assert granted.fleet is a and a.active == 1 and a.standing == 1
    row = slots.row("w1")
    assert row.held == {2: a} and row.granted_total == 2 and a.opened_total == 2
    assert a.pending == set()  # a worker that does not say its answers: nothing in flight
    assert isinstance(slots.acquire("w1", 3, [], 0.0), Granted)  # beyond it: asked
    assert a.active == 2
    slots.release("w1", 2)  # back into it: reserved, nothing freed
    assert a.active == 1 and a.standing == 2
    slots.release("w1", 3)  # its budget is full (2 of 2): the host's
    assert a.active == 0 and a.standing == 2
    with pytest.raises(SlotProtocolError):
        slots.grant_standing("w1", 4, "b")
    slots.grant_standing("w1", 4, "a")
    slots.grant_standing("w1", 5, "a")
    with pytest.raises(SlotProtocolError):  # a third: it has two
        slots.grant_standing("w1", 6, "a")
    with pytest.raises(SlotProtocolError):
        slots.give_standing("w1", {"a": 1})  # one at a time


def test_a_call_that_must_wait_takes_every_budget_back_and_the_queue_gets_them_in_order() -> None:
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    for w in ("w1", "w2", "w3"):
        slots.join(w, pid=len(w), generation=1)
    slots.give_standing("w1", {"a": 1})
    slots.give_standing("w2", {"a": 1})
    slots.standing_taken("w1")
    assert slots.end_standing() == []  # nobody waits
    assert isinstance(slots.acquire("w3", 1, [], 0.0), Granted)
    assert isinstance(slots.acquire("w3", 2, [], 0.0), Granted)
    assert slots.acquire("w3", 3, [], 1.0) is None
    assert slots.acquire("w3", 4, [], 2.0) is None
    assert slots.end_standing() == ["w1", "w2"]
    assert slots.end_standing() == []  # said once
    # w1 granted one from it before it read "budget-end": it is its call.
    slots.grant_standing("w1", 1, "a")
    assert slots.drop_standing("w1") == []  # nothing left of it
    answers = slots.drop_standing("w2")
    assert [(g.worker, g.lease) for g in answers] == [("w3", 3)]  # the first in line
    assert a.standing == 0 and a.active == 4 and slots.queue_length == 1
    slots.release("w1", 1)  # no budget now: the next in line gets it
    assert slots.queue_length == 0 and a.active == 4


@pytest.mark.parametrize("change", ["maint", "down", "full", "maxconn lowered"])
def test_a_budget_on_a_fleet_pick_would_not_choose_is_taken_back(change: str) -> None:
    slots = _table("https://a.test name=a\nhttps://b.test name=b\n")
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 2, "b": 2})
    b = _fleet(slots, "b")
    b.reported_available, b.opened_at_probe = 6, 0
    assert slots.end_standing() == []
    if change == "maint":
        b.admin = Admin.MAINT
    elif change == "down":
        b.health = Health.DOWN
    elif change == "full":
        b.reported_available = 2  # its two free workers are the budget's
    else:
        b.spec = dataclasses.replace(b.spec, maxconn=1)
    assert slots.end_standing(fleets_changed=False) == []  # looked at on a wake only
    assert slots.end_standing() == ["w1"]


@pytest.mark.parametrize("change", ["up", "ready", "added", "room"])
def test_a_fleet_that_can_take_calls_again_takes_back_budgets_it_is_not_in(change: str) -> None:
    """A budget given while fleet b could not take calls names a alone: kept,
    its worker granted every call on a while b, with none, got only calls
    asked of the supervisor (leastconn broken as long as budgets stood, which
    is as long as nobody queues). Once b can be shared (UP, READY, added, room
    again), the budgets it is missing from are taken back, to be given anew
    with it. Not for a fleet a share would give nothing (no churn at each probe)."""
    text = "https://a.test name=a maxconn=10\nhttps://b.test name=b maxconn=10\n"
    if change == "added":
        text = "https://a.test name=a maxconn=10\n"
    slots = _table(text)
    for fleet in slots.balancer.fleets:
        fleet.health = Health.UP
    a = _fleet(slots, "a")
    b = slots.balancer.get("b")
    if change == "up":
        assert b is not None
        b.health = Health.DOWN
    elif change == "ready":
        assert b is not None
        b.admin = Admin.DRAIN
    elif change == "room":
        assert b is not None
        b.reported_available, b.opened_at_probe = 0, b.opened_total  # FULL by its word
    slots.join("w1", pid=1, generation=1)
    slots.join("w2", pid=2, generation=1)
    for w in ("w1", "w2"):
        slots.give_standing(w, standing_share(slots.balancer.fleets, 2, queue_length=0))
        slots.standing_taken(w)
    assert set(slots.row("w1").standing_fleets) == {"a"} and a.standing > 0
    assert slots.end_standing() == []  # b cannot take calls: nothing missing

    if change == "up":
        b.health = Health.UP
    elif change == "ready":
        b.admin = Admin.READY
    elif change == "room":
        b.reported_available, b.opened_at_probe = 6, b.opened_total
    else:
        (spec,) = parse_fleets_text("https://b.test name=b", default_maxconn=10)
        b = slots.balancer.members.add(spec, capacity_aware=False)  # type: ignore[attr-defined]
        b.health = Health.UP  # its first probe passed
    assert slots.end_standing(fleets_changed=False) == []  # looked at on a wake only
    assert slots.end_standing() == ["w1", "w2"]
    for w in ("w1", "w2"):
        slots.drop_standing(w)
    slots.give_standing("w1", standing_share(slots.balancer.fleets, 2, queue_length=0))
    assert set(slots.row("w1").standing_fleets) == {"a", "b"}

    # A fleet whose share is nothing (1 free slot over 2 takers + 1) is no reason.
    slots.drop_standing("w1")
    b.spec = dataclasses.replace(b.spec, maxconn=1)
    for w in ("w1", "w2"):
        slots.give_standing(w, standing_share(slots.balancer.fleets, 2, queue_length=0))
    assert "b" not in slots.row("w2").standing_fleets
    assert slots.end_standing() == []
    # Nor one past the most fleets a budget names.
    b.spec = dataclasses.replace(b.spec, maxconn=10)
    assert slots.end_standing(fleets_most=1) == []
    assert slots.end_standing() == ["w1", "w2"]


def test_a_budget_whose_fleet_spec_changed_is_taken_back_one_round_trip_of_the_old() -> None:
    """A transcript of the spec staleness. The worker grants from its standing
    budget with the spec the budget was sent with (its record of the fleet is
    set from it at each grant). A reload that changes the fleet in place (its
    maxconn raised, its admin: not its address, which is a move and drains
    the old) took nothing back: a budget granted the old spec, and held the
    share of the old maxconn, for as long as it stood.
    Now the wake after it takes the budget back; grants until the worker
    reads "budget-end" (one round trip) are the old spec's, the next budget
    carries the new. A reload that leaves the spec equal takes nothing back."""
    slots = _table("https://a.test name=a maxconn=10\n")
    a = _fleet(slots, "a")
    a.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 3})
    slots.standing_taken("w1")
    sent = a.spec
    a.spec = dataclasses.replace(a.spec)  # a reload of the same file: equal, anew
    assert slots.end_standing() == []
    assert slots.row("w1").standing_specs["a"] is a.spec  # next look: `is`
    a.spec = dataclasses.replace(a.spec, maxconn=20)  # raised
    assert a.spec != sent
    assert slots.end_standing() == ["w1"]  # "budget-end" goes
    slots.grant_standing("w1", 1, "a")  # granted (old spec) before it read it
    slots.drop_standing("w1")
    slots.give_standing("w1", {"a": 2})
    assert slots.row("w1").standing_specs["a"] is a.spec
    assert slots.end_standing() == []


def test_a_fleet_removed_with_reserved_slots_takes_a_budget_call_for_one_round_trip() -> None:
    """A transcript of the removed-fleet race, pinned as it is: remove-fleet on
    a fleet with no call but slots reserved in a standing budget reaps it at
    once (`FleetSet.reap` looks at its calls), and the budget is taken back
    at the wake after. A grant the worker made from it before it read
    "budget-end" is the host's all the same (its call was already on its
    way): counted on the record of the fleet gone, given back when it ends.
    After "budget-dropped" no grant there is taken."""
    slots = _table("https://a.test name=a\nhttps://b.test name=b\n")
    for fleet in slots.balancer.fleets:
        fleet.health = Health.UP
    a = _fleet(slots, "a")
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 2, "b": 2})
    slots.standing_taken("w1")
    fleet_set = slots.balancer.members
    assert fleet_set.remove(a) is True  # type: ignore[attr-defined]  # reaped: no call on it
    assert slots.balancer.get("a") is None and a.standing == 2
    assert slots.end_standing() == ["w1"]  # "budget-end": a is being removed
    granted = slots.grant_standing("w1", 1, "a")  # before it read "budget-end"
    assert granted.fleet is a and a.active == 1 and slots.row("w1").held == {1: a}
    slots.drop_standing("w1")
    assert a.standing == 0
    with pytest.raises(SlotProtocolError):
        slots.grant_standing("w1", 2, "a")
    slots.release("w1", 1)
    assert a.active == 0 and slots.row("w1").held == {}


def test_a_worker_gone_gives_its_budget_back_at_once_kept_calls_or_not() -> None:
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    slots.join("w1", pid=1, generation=1)
    slots.join("w2", pid=2, generation=1)
    slots.give_standing("w1", {"a": 3})
    slots.standing_taken("w1")
    slots.grant_standing("w1", 1, "a")
    assert slots.acquire("w2", 1, [], 0.0) is not None
    assert slots.acquire("w2", 2, [], 0.0) is None  # 1 + 1 + 2 reserved
    row, answers = slots.leave("w1", keep_held=True)  # its process runs on
    assert row is not None and row.channel_lost and row.standing is None
    assert [(g.worker, g.lease) for g in answers] == [] and slots.queue_length == 1
    assert a.standing == 0 and a.active == 2
    assert [(g.worker, g.lease) for g in slots.wake()] == [("w2", 2)]
    _, answers = slots.release_kept("w1")
    assert a.active == 2 and a.standing == 0


def test_an_exec_that_failed_drops_the_suspended_budget_at_the_workers_state() -> None:
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    slots.join("w1", pid=1, generation=1, tells_answers=True)
    slots.give_standing("w1", {"a": 2})
    slots.standing_taken("w1")
    slots.grant_standing("w1", 1, "a")
    assert slots.standing_left("w1") == ["a"]  # carried over an exec as held
    slots.suspend("w1")
    assert a.active == 1 and a.standing == 1  # counted until it says
    slots.restore("w1", pid=1, generation=1, held=[(1, "a")], waiting=[], now=0.0)
    assert a.active == 1 and a.standing == 0 and slots.row("w1").standing is None


def test_both_ends_keep_the_same_budget_whatever_the_order_of_grants_and_releases() -> None:
    """The worker's `Budget` and the table's copy, fed the same stream."""
    slots = _table("https://a.test name=a maxconn=50\nhttps://b.test name=b maxconn=50\n")
    slots.join("w1", pid=1, generation=1)
    sent = slots.give_standing("w1", {"a": 3, "b": 2})
    slots.standing_taken("w1")
    worker = Budget([BudgetFleet(f.name, f.left, f.active, f.most) for f in sent])
    held: dict[int, str] = {}
    for step in range(200):
        if step % 3 != 2 and (name := worker.take()) is not None:
            held[step] = name
            slots.grant_standing("w1", step, name)
        elif step % 3 != 2:
            assert slots.acquire("w1", step, [], 0.0) is not None  # asked of the supervisor
            held[step] = slots.row("w1").held[step].name
        elif held:
            lease = min(held)
            worker.give_back(held.pop(lease))
            slots.release("w1", lease)
        row = slots.row("w1")
        assert row.standing is not None and row.standing.slots() == worker.slots()
        for fleet in slots.balancer.fleets:
            assert fleet.standing == worker.slots()[fleet.name]
            assert fleet.active == sum(1 for n in held.values() if n == fleet.name)


# -- a lone worker's budget (session 46) -----------------------------------------


def test_a_lone_workers_share_is_every_free_slot_as_calls_would_see_it() -> None:
    """The only worker's budget: every free slot of each fleet pick could
    choose, no share kept back, no STANDING_MOST bound; still capped by the
    capacity estimate (a fleet that reports 5 free gives 5, not its maxconn)."""
    slots = _table(
        "https://a.test name=a maxconn=100\nhttps://b.test name=b maxconn=2\n"
        "https://c.test name=c maxconn=9\n"
    )
    a, b, c = slots.balancer.fleets
    for f in (a, b, c):
        f.health = Health.UP
    c.reported_available, c.opened_at_probe = 5, c.opened_total
    assert standing_share([a, b, c], 1, queue_length=0, most=None, lone=True) == {
        "a": 100,
        "b": 2,
        "c": 5,
    }
    assert standing_share([a, b, c], 1, queue_length=1, most=None, lone=True) == {}


def test_a_lone_budget_ends_when_its_worker_is_not_alone_and_not_before() -> None:
    """`end_standing(lone=...)`: a lone budget stands while its worker is named
    the only one (a slot granted or given back changes nothing), and is
    taken back (once) as soon as it is not: a second worker joined, an exec
    began (the caller passes None)."""
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    a.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 4}, lone=True)
    assert slots.end_standing(fleets_changed=False, lone="w1") == []
    assert slots.end_standing(fleets_changed=True, lone="w1") == []  # FULL with it: its own
    assert a.active + a.standing == 4
    slots.join("w2", pid=2, generation=1)
    assert slots.end_standing(fleets_changed=False, lone=None) == ["w1"]
    assert slots.end_standing(fleets_changed=False, lone=None) == []  # said once
    assert slots.acquire("w2", 1, [], 0.0) is None  # reserved until dropped: it waits
    answers = slots.drop_standing("w1")
    assert [(g.worker, g.lease) for g in answers] == [("w2", 1)]


@pytest.mark.parametrize("change", ["estimate fell", "429"])
def test_a_lone_budget_past_the_fleets_estimate_is_taken_back(change: str) -> None:
    """Reserving every free slot, a lone budget makes a capacity-aware fleet
    read FULL from the start: that alone does not end it. It ends when a probe
    counts fewer free workers than it reserved, or the fleet answers 429."""
    slots = _table("https://a.test name=a maxconn=10\n")
    a = _fleet(slots, "a")
    a.health = Health.UP
    a.reported_available, a.opened_at_probe = 6, a.opened_total
    slots.join("w1", pid=1, generation=1)
    slots.give_standing(
        "w1", standing_share([a], 1, queue_length=0, most=None, lone=True), lone=True
    )
    assert a.standing == 6 and a.full
    assert slots.end_standing(fleets_changed=True, lone="w1") == []
    if change == "429":
        a.said_full()
    else:
        a.reported_available, a.opened_at_probe = 4, a.opened_total  # the next probe
    assert slots.end_standing(fleets_changed=True, lone="w1") == ["w1"]


def test_a_lone_worker_whose_channel_is_lost_keeps_its_budgets_rest_counted_as_calls() -> None:
    """Its process runs on without a channel: it may have granted calls from its
    lone budget whose held "acquire" never came. What was left of the budget
    counts as its calls (an upper bound) until it exits: maxconn holds. Taken
    back as free instead (before), a fleet of maxconn 2 with 2 calls granted
    and held read 0 calls: the next worker's calls went past maxconn
    (tests/e2e/test_upgrade.py's channel-lost worker read 0 calls, not 2)."""
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    a.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    assert isinstance(slots.acquire("w1", 1, [], 0.0), Granted)  # told: a call
    slots.give_standing("w1", {"a": 3}, lone=True)
    row, answers = slots.leave("w1", keep_held=True)
    assert row is not None and row.channel_lost and answers == []
    assert (a.active, a.standing, row.calls) == (4, 0, 4)
    slots.join("w2", pid=2, generation=1)
    assert slots.acquire("w2", 1, [], 0.0) is None  # no room: it waits
    row, answers = slots.release_kept("w1")
    assert [(g.worker, g.lease) for g in answers] == [("w2", 1)] and a.active == 1


def test_a_lost_lone_channels_rest_stays_reserved_until_its_table_is_read_again() -> None:
    """With its call table read as the channel ends (`live`, lease -> fleet),
    the calls it granted from its lone budget and never told are those live
    there and not held here: counted as its calls. The budget's rest stays
    reserved (it may grant from it until it reads the end: a worker
    SIGSTOPped, resumed, gets its accepts and the end in one turn) until
    `settle_lost` reads the table again once it has run past the end: what
    it granted meanwhile is counted, the rest is free. Freed at once (main),
    a replacement's budget took those slots while the cut worker granted
    from them: maxconn passed (here: 5 calls on a fleet of 4)."""
    slots = _table("https://a.test name=a maxconn=4\nhttps://b.test name=b maxconn=4\n")
    a, b = _fleet(slots, "a"), _fleet(slots, "b")
    a.health = b.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    assert isinstance(slots.acquire("w1", 1, [], 0.0), Granted)  # told: a call
    told = a if a.active else b
    slots.give_standing("w1", {"a": 4 - a.active, "b": 4 - b.active}, lone=True)
    # Its table: the told call, two granted from the budget and held (on a and
    # b), one ended, one not granted yet (no fleet: no slot).
    live = {1: told.name, 7: "a", 8: "b"}
    row, answers = slots.leave("w1", keep_held=True, live=live)
    assert row is not None and row.channel_lost and answers == []
    assert (a.active + b.active, a.standing + b.standing, row.calls) == (3, 5, 3)
    slots.join("w2", pid=2, generation=1)
    asked = [slots.acquire("w2", n, [], 0.0) for n in (1, 2, 3, 4, 5, 6)]
    assert sum(isinstance(g, Granted) for g in asked) == 0  # every slot counted or reserved
    assert slots.queue_length == 6
    # It granted two more on a before it read the end (one ended since).
    row, answers = slots.settle_lost("w1", {**live, 9: "a", 10: "a"})
    assert row is not None and row.calls == 5
    assert (a.standing, b.standing) == (0, 0)
    assert len(answers) == 3 and all(isinstance(g, Granted) for g in answers)
    assert a.active <= a.maxconn and b.active <= b.maxconn
    assert a.active + b.active == 8 and slots.queue_length == 3
    assert slots.settle_lost("w1", {}) == (None, [])  # once
    row, answers = slots.release_kept("w1")
    assert row is not None and len(answers) == 3 and a.active + b.active == 6


def test_calls_a_lost_worker_never_told_count_as_opened_as_a_grant_does() -> None:
    """A call of a lone budget found in its worker's call table (`leave`'s or
    `settle_lost`'s `live`) is counted as the supervisor's grant of it would
    be: in its fleet's calls opened since its probe (the capacity estimate)
    and the worker's grants. On main it was only added to `active`: the
    estimate read one high for each until the next probe."""
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    a.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 4}, lone=True)
    opened = a.opened_total
    row, _ = slots.leave("w1", keep_held=True, live={7: "a"})
    assert row is not None
    assert (a.active, a.opened_total - opened, row.granted_total) == (1, 1, 1)
    row, _ = slots.settle_lost("w1", {7: "a", 8: "a"})
    assert row is not None
    assert (a.active, a.opened_total - opened, row.granted_total) == (2, 2, 2)
    assert a.standing == 0


def test_a_lost_lone_channel_without_a_table_counts_the_budgets_rest_until_its_worker_exits() -> (
    None
):
    """No call table to read (`live` None): the rest is counted as its calls,
    at the end or once settled, until `release_kept`."""
    slots = _table("https://a.test name=a maxconn=4\n")
    a = _fleet(slots, "a")
    a.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 4}, lone=True)
    row, _ = slots.leave("w1", keep_held=True, live={})
    assert row is not None and a.standing == 4 and a.active == 0
    row, answers = slots.settle_lost("w1", None)
    assert row is not None and answers == []
    assert (a.active, a.standing, row.calls) == (4, 0, 4)
    row, _ = slots.release_kept("w1")
    assert a.active == 0


def test_a_lost_standing_channels_untold_grants_count_and_its_rest_stays_reserved() -> None:
    """Not only a lone budget's grants go untold: a standing budget's are held
    too with INGRESS_STANDING_BUDGETS=held (a call with a record), and any
    granted once the supervisor has stopped reading the channel never reach
    it. Its channel ending while its process runs, with its call table read
    (`live`), the calls live there that this table never heard of are counted
    as its calls and the budget's rest stays reserved until `settle_lost`, as
    a lone budget's. On main the rest came back at once and those calls were
    counted nowhere: the other worker's calls were granted past maxconn (3
    calls on a fleet of 2 here)."""
    slots = _table("https://a.test name=a maxconn=2\n")
    a = _fleet(slots, "a")
    a.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    slots.join("w2", pid=2, generation=1)
    slots.give_standing("w1", {"a": 2})
    slots.standing_taken("w1")
    # It granted lease 5 from its budget, the "acquire" held: only its table says so.
    row, answers = slots.leave("w1", keep_held=True, live={5: "a"})
    assert row is not None and row.channel_lost and answers == []
    assert (a.active, a.standing, row.calls) == (1, 1, 1)
    assert slots.acquire("w2", 1, [], 0.0) is None  # a call and a reserved slot: it waits
    # It granted lease 6 before it read the end: the table read again counts it.
    row, answers = slots.settle_lost("w1", {5: "a", 6: "a"})
    assert row is not None and row.calls == 2 and answers == []
    assert (a.active, a.standing) == (2, 0)
    row, answers = slots.release_kept("w1")
    assert [(g.worker, g.lease) for g in answers] == [("w2", 1)] and a.active == 1


def test_a_lone_budget_not_dropped_in_time_gives_back_what_its_worker_has_not_used() -> None:
    """`take_back_unused` (LONE_END_WAIT after "budget-end"): of a lone
    budget, what its worker told it granted is out of it already, what its
    call table has live and this table does not hold stays reserved (its
    "acquire" held), the rest is free for the queue. A grant told after,
    beyond what is left, is counted all the same (past maxconn), not a
    protocol break. Without a table read nothing is taken back. On main the
    method does not exist: every slot stayed reserved until the worker
    answered or was killed as hung (a minute)."""
    slots = _table("https://a.test name=a maxconn=4\nhttps://b.test name=b maxconn=2\n")
    a, b = _fleet(slots, "a"), _fleet(slots, "b")
    a.health = b.health = Health.UP
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 4, "b": 2}, lone=True)
    slots.standing_taken("w1")
    slots.grant_standing("w1", 1, "a")  # told
    slots.join("w2", pid=2, generation=2)
    assert slots.end_standing(fleets_changed=False, lone=None) == ["w1"]
    assert slots.acquire("w2", 1, [], 0.0) is None  # every slot reserved or held: waits
    assert slots.take_back_unused("w1", None) == ({}, [])  # no table read: kept
    # Its table: the told call, one granted on b and held, one ended (not there).
    taken, answers = slots.take_back_unused("w1", {1: "a", 2: "b"})
    assert taken == {"a": 3, "b": 1}
    # Leastconn: b has no call (its reserved slot is not one).
    assert [(g.worker, g.lease, g.fleet.name) for g in answers] == [("w2", 1, "b")]
    assert (a.standing, b.standing) == (0, 1)
    for f in (a, b):
        assert f.active + f.standing <= f.maxconn
    slots.grant_standing("w1", 2, "b")  # the held one, told: out of what is left
    assert (b.active, b.standing, slots.grants_past_cut_total) == (2, 0, 0)
    slots.grant_standing("w1", 3, "a")  # granted before it read "budget-end", told late
    assert slots.grants_past_cut_total == 1 and slots.row("w1").calls == 3
    slots.drop_standing("w1")
    assert (a.standing, b.standing) == (0, 0) and not slots.row("w1").standing_cut
    with pytest.raises(SlotProtocolError):
        slots.grant_standing("w1", 4, "a")  # no budget at all: still a protocol break


def test_a_budget_cut_keeps_at_most_what_is_named_and_still_takes_slots_given_back() -> None:
    budget = Budget([BudgetFleet("a", 3, 0, most=3), BudgetFleet("b", 1, 0, most=1)])
    assert budget.cut({"a": 1, "c": 5}) == {"a": 2, "b": 1}
    assert budget.slots() == {"a": 1, "b": 0}
    assert budget.give_back("b") and budget.slots() == {"a": 1, "b": 1}


def test_with_queueing_off_a_call_waits_for_reserved_slots_and_only_for_them() -> None:
    """Queueing off: a call that finds no room but slots reserved for a
    standing budget waits for them (a call waiting takes budgets back at
    once), as many calls as they would take; granted once they come back;
    refused QUEUE_OFF when they do not make room (now, or RESERVED_WAIT
    after), never counted as a queue timeout. On main each was refused at
    once while the fleet had room."""
    from fleet_ingress.core.host_slots import QUEUE_OFF, RESERVED_WAIT, Refused

    fleets = FleetSet.from_specs(parse_fleets_text("https://a.test name=a\n", default_maxconn=2))
    slots = HostSlots(Balancer(fleets), queue_timeout=0.0, max_queue=8)
    slots.join("w1", pid=1, generation=1)
    slots.give_standing("w1", {"a": 2}, lone=True)
    assert slots.reserved_room() == 2
    assert slots.acquire("w1", 1, [], 10.0) is None  # waits for the reserved slots
    assert slots.acquire("w1", 2, [], 10.0) is None
    third = slots.acquire("w1", 3, [], 10.0)  # more than they would take: refused now
    assert isinstance(third, Refused) and third.reason == QUEUE_OFF
    slots.standing_taken("w1")
    slots.grant_standing("w1", 7, "a")  # its worker granted one before it read budget-end
    answers = slots.drop_standing("w1")
    assert [(type(a).__name__, a.lease) for a in answers] == [("Granted", 1), ("Refused", 2)]
    assert all(a.queued for a in answers) and answers[1].reason == QUEUE_OFF
    assert slots.queue_length == 0
    # Reserved again and not given back in time: refused RESERVED_WAIT after, not a timeout.
    slots.release("w1", 7)
    slots.give_standing("w1", {"a": 1}, lone=True)
    assert slots.acquire("w1", 4, [], 20.0) is None
    assert slots.expire(20.0 + RESERVED_WAIT - 0.01) == []
    (late,) = slots.expire(20.0 + RESERVED_WAIT)
    assert isinstance(late, Refused) and late.reason == QUEUE_OFF
    assert slots.queue_timeouts == 0
