"""leastconn, eligibility and capacity, without sockets."""

from collections import Counter

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer, Verdict
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health


def _balancer(text: str = "https://a.test name=a\nhttps://b.test name=b\n", maxconn: int = 16):
    return Balancer(FleetSet.from_specs(parse_fleets_text(text, default_maxconn=maxconn)))


def _take(balancer: Balancer, n: int, avoid=()):
    names = []
    for _ in range(n):
        pick = balancer.pick(avoid)
        assert pick.fleet is not None, pick.verdict
        balancer.open(pick.fleet)
        names.append(pick.fleet.name)
    return names


def test_leastconn_splits_evenly_and_ties_go_round_robin():
    b = _balancer()
    assert _take(b, 4) == ["a", "b", "a", "b"]
    assert Counter(_take(b, 16)) == {"a": 8, "b": 8}


def test_leastconn_prefers_the_fleet_with_fewer_calls():
    b = _balancer()
    a = b.get("a")
    assert a is not None
    for _ in range(3):
        b.open(a)
    assert _take(b, 3) == ["b", "b", "b"]
    assert _take(b, 2) == ["a", "b"]


def test_ties_rotate_over_three_fleets():
    b = _balancer("https://a.test name=a\nhttps://b.test name=b\nhttps://c.test name=c\n")
    names = []
    for _ in range(6):
        pick = b.pick()
        assert pick.fleet is not None
        names.append(pick.fleet.name)  # no open(): all stay tied at 0
    assert names == ["a", "b", "c", "a", "b", "c"]


def test_maxconn_per_fleet_then_no_capacity():
    b = _balancer("https://a.test name=a maxconn=1\nhttps://b.test name=b maxconn=2\n")
    assert Counter(_take(b, 3)) == {"a": 1, "b": 2}
    assert b.pick().verdict is Verdict.NO_CAPACITY
    a = b.get("a")
    assert a is not None
    b.close(a)
    assert _take(b, 1) == ["a"]


def test_avoid_prefers_untried_fleets_but_falls_back_to_the_best():
    b = _balancer()
    assert _take(b, 1, avoid={"a"}) == ["b"]
    assert _take(b, 1, avoid={"a", "b"}) == ["a"]


@pytest.mark.parametrize(
    ("health", "admin", "verdict"),
    [
        (Health.DOWN, Admin.READY, Verdict.NO_FLEET_UP),
        (Health.INIT, Admin.READY, Verdict.NO_CAPACITY),  # not probed yet: wait
        (Health.UP, Admin.DRAIN, Verdict.NO_FLEET_UP),
        (Health.UP, Admin.MAINT, Verdict.NO_FLEET_UP),
        (Health.UP, Admin.READY, Verdict.PICKED),
    ],
)
def test_only_up_and_ready_fleets_are_eligible(health, admin, verdict):
    b = _balancer("https://a.test name=a\n")
    fleet = b.fleets[0]
    fleet.health, fleet.admin = health, admin
    assert b.pick().verdict is verdict


def test_why_no_fleet_is_up_counts_the_fleets_by_what_keeps_them_out():
    b = _balancer("".join(f"https://{n}.test name={n}\n" for n in "abcdef"))
    states = [
        (Health.UP, Admin.DRAIN),
        (Health.DOWN, Admin.DRAIN),  # an operator's state is named before health
        (Health.UP, Admin.MAINT),
        (Health.DOWN, Admin.READY),
        (Health.DOWN, Admin.READY),
        (Health.INIT, Admin.MAINT),
    ]
    for fleet, (health, admin) in zip(b.fleets, states, strict=True):
        fleet.health, fleet.admin = health, admin
    assert b.pick().verdict is Verdict.NO_FLEET_UP
    assert b.none_up_reason() == "no fleet takes calls (2 drained, 2 in maintenance, 2 down)"
    for fleet in b.fleets:  # health alone: "is up" names it
        fleet.health, fleet.admin = Health.DOWN, Admin.READY
    assert b.none_up_reason() == "no fleet is up (6 down)"
    b.fleets[0].admin = Admin.MAINT
    assert b.none_up_reason() == "no fleet takes calls (1 in maintenance, 5 down)"
    for fleet, (health, admin) in zip(b.fleets, states, strict=True):
        fleet.health, fleet.admin = health, admin
    b.fleets[3].health = Health.INIT  # a READY fleet not probed yet: calls wait for it
    assert b.pick().verdict is Verdict.NO_CAPACITY


def test_capacity_estimate_counts_calls_opened_since_the_probe_was_sent():
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    b.open(a)  # before the probe: already in the fleet's own number
    a.opened_at_probe = a.opened_total
    b.open(a)  # sent after the probe left: not in its number
    a.reported_available = 3
    assert a.estimated_available == 2
    assert not a.full
    _take(b, 2)
    assert a.estimated_available == 0 and a.full
    assert b.pick().verdict is Verdict.NO_CAPACITY


def test_a_429_makes_a_fleet_full_until_its_next_probe_says_otherwise():
    b = _balancer()
    a = b.get("a")
    assert a is not None
    a.reported_available, a.opened_at_probe = 5, a.opened_total  # its last probe: 5 free
    _take(b, 2)  # one each
    assert a.estimated_available == 4
    # Traffic that bypasses the ingress took the rest: the fleet answers 429.
    assert a.said_full()
    assert a.full and a.estimated_available == 0
    assert _take(b, 3) == ["b", "b", "b"]  # not a, though it has fewer calls
    assert not a.said_full()  # already full: nothing new to say
    # Its next probe is the truth again (as the poller records one).
    a.reported_available, a.opened_at_probe = 2, a.opened_total
    assert not a.full
    assert _take(b, 1) == ["a"]


def test_a_429_keeps_a_fleet_full_that_only_its_calls_in_flight_made_full():
    """The fleet read FULL only because a call was in flight at its probe (in
    `unseen`); that call meets a 429 and ends. FULL must outlive it: the fleet
    said so itself. (Before, the call's end gave the fleet room again at once.)"""
    b = _balancer()
    a, other = b.get("a"), b.get("b")
    assert a is not None and other is not None
    b.open(other)
    b.open(other)  # b holds two calls: leastconn prefers a
    b.open(a, "c1")  # c1 granted on a, its connection still being set up
    a.probe_counted(1, a.probe_sending(now=10.0))  # 1 free: c1 not in it
    assert a.unseen == {"c1"} and a.full
    assert a.said_full()  # news: the fleet's number had said room
    b.close(a, "c1")  # c1's 429 is relayed, its slot goes back
    assert a.full and b.pick().fleet is other


def test_a_probe_out_when_a_429_comes_does_not_lift_full():
    """Its number may have been taken before the fleet filled: FULL stands
    until the next probe's."""
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    a.probe_counted(5, a.probe_sending(now=0.0))
    opened_before = a.probe_sending(now=1.0)  # the next probe is out
    b.open(a, "c1")
    a.said_full()  # c1 meets a 429 meanwhile
    b.close(a, "c1")
    a.probe_counted(5, opened_before)
    assert a.full and a.estimated_available == 0
    a.probe_counted(2, a.probe_sending(now=2.0))  # the next one is the truth again
    assert not a.full and a.estimated_available == 2


@pytest.mark.parametrize("tracked", ["not capacity-aware", "never probed"])
def test_a_429_changes_nothing_where_capacity_is_not_tracked(tracked: str):
    """No probe would ever lift a FULL it set there."""
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    if tracked == "not capacity-aware":
        a.capacity_aware = False
        a.reported_available = 3
    assert not a.said_full()
    assert not a.full
    assert b.pick().fleet is a


def test_calls_in_flight_when_a_probe_leaves_are_not_in_its_number():
    """A probe that overtakes calls still being set up (granted, not yet answered
    by the fleet) gets a number without them: the estimate leaves them out too,
    until the fleet's answer to a call is known to have come before the probe
    left, or the call is given back."""
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    a.probe_counted(5, a.probe_sending(now=0.0))
    for key in ("x", "y", "z"):
        b.open(a, key)  # three calls on their way to the fleet
    assert a.estimated_available == 2
    opened_before = a.probe_sending(now=10.0)  # x, y, z still in flight
    a.lease_answered("x", at=9.5)  # x's 101 came before the probe left, told late
    b.open(a, "w")  # after it left: counted as opened since
    a.probe_counted(5, opened_before)  # the fleet says 5 free: x in it, not y, z or w
    assert a.unseen == {"y", "z"}
    assert a.estimated_available == 5 - 1 - 2
    a.lease_answered("y", at=10.2)  # after the probe left: it may not be in its number
    assert a.estimated_available == 2
    a.lease_answered("z", at=9.9)  # before it left, told late: it is
    assert a.estimated_available == 3
    b.close(a, "y")  # y ends: gone either way
    assert a.unseen == set() and a.pending == {"w"}


def test_calls_in_flight_count_only_for_holders_that_say_when_the_fleet_answers():
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    b.open(a)  # no key: a holder that will not say (a worker of an older release)
    a.probe_counted(5, a.probe_sending(now=1.0))
    assert a.estimated_available == 5 and not a.pending


def test_capacity_ignored_when_not_capacity_aware():
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    a.capacity_aware = False
    a.reported_available = 0
    assert not a.full
    assert b.pick().fleet is a


def test_close_without_open_is_a_bug_that_names_the_fleet():
    b = _balancer("https://a.test name=a\n")
    with pytest.raises(RuntimeError, match="fleet a"):
        b.close(b.fleets[0])


def test_fleets_not_yet_probed_make_calls_wait_not_fail():
    b = _balancer()
    for f in b.fleets:
        f.health = Health.INIT
    assert b.pick().verdict is Verdict.NO_CAPACITY
    b.fleets[0].health = Health.DOWN
    assert b.pick().verdict is Verdict.NO_CAPACITY  # b may still come up
    b.fleets[1].admin = Admin.MAINT
    assert b.pick().verdict is Verdict.NO_FLEET_UP  # nothing could serve


def test_fleets_start_in_the_admin_state_the_fleets_file_records():
    b = Balancer(
        FleetSet.from_specs(
            parse_fleets_text(
                "https://a.test name=a admin=maint\nhttps://b.test name=b admin=drain\n"
                "https://c.test name=c\n",
                default_maxconn=16,
            ),
            health=Health.INIT,
        )
    )
    assert [f.admin for f in b.fleets] == [Admin.MAINT, Admin.DRAIN, Admin.READY]
    assert b.starting  # c, READY and not yet probed: calls wait for it
    b.fleets[2].health = Health.DOWN
    # a (MAINT, never probed) and b (DRAIN) could not take a call: no waiting for them.
    assert not b.starting and not b.may_serve
    assert b.pick().verdict is Verdict.NO_FLEET_UP


def test_calls_the_fleet_refuses_take_it_down_after_fall_in_a_row():
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    a.reported_available = 5
    assert not a.call_unreachable(3, 1.0) and a.fresh_probe  # its next probe: a new connection
    assert not a.call_unreachable(3, 1.0)
    a.call_connected()  # one got through: the streak starts over
    assert not a.call_unreachable(3, 2.0) and not a.call_unreachable(3, 2.0)
    # Timed out: maybe this host's own stall, not counted (the probe tells).
    for _ in range(5):
        assert not a.call_unreachable(3, 2.5, refused=False)
    assert a.health is Health.UP
    assert a.call_unreachable(3, 3.0)  # the third refused in a row
    assert (a.health, a.reported_available, a.call_failures) == (Health.DOWN, None, 0)
    assert b.pick().verdict is Verdict.NO_FLEET_UP
    # Refused while DOWN: nothing counted, so the streak starts from 0 once UP again.
    for _ in range(5):
        assert not a.call_unreachable(3, 4.0)
    assert a.call_failures == 0
    # A probe sent before it went DOWN may pass on the old connection: not a verdict.
    assert a.probe_predates_down(2.9) and not a.probe_predates_down(3.1)


def test_calls_that_cannot_connect_are_not_observed_where_no_probe_runs():
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    for _ in range(5):
        assert not a.call_unreachable(0, 1.0)
    assert a.health is Health.UP and a.call_failures == 0 and not a.fresh_probe


def test_a_fleet_leaving_maint_keeps_nothing_its_last_probe_before_said():
    """MAINT stops the probes: leaving it, the fleet starts over as one just
    added, its certificate's expiry too (until its next probe reads it)."""
    fleet = _balancer().fleets[0]
    fleet.health, fleet.reported_available, fleet.certificate_not_after = Health.UP, 5, 1e9
    fleet.set_admin(Admin.MAINT)
    fleet.set_admin(Admin.READY)
    assert (fleet.health, fleet.reported_available, fleet.certificate_not_after) == (
        Health.INIT,
        None,
        None,
    )


@pytest.mark.parametrize("aware", [True, False])
def test_room_spelt_out_for_the_pick_is_below_maxconn_and_not_full(aware: bool) -> None:
    """`has_room` spells out `full` (session 48: a pick reads it of every fleet
    UP): over a grid of states it says what `maxconn` and `full` say."""
    b = _balancer("https://a.test name=a\n", maxconn=4)
    a = b.fleets[0]
    a.capacity_aware = aware
    for opened in range(4):
        for reported in (None, 0, 1, 2, 5, 9):
            for standing in range(4):
                for unseen in range(3):
                    a.active, a.opened_total, a.opened_at_probe = opened, 10 + opened, 10
                    a.reported_available, a.standing = reported, standing
                    a.unseen = set(range(unseen))
                    expected = a.active + a.standing < a.maxconn and not a.full
                    assert a.has_room is expected, (opened, reported, standing, unseen)


def test_slots_reserved_for_a_budget_are_room_to_an_operator_not_to_a_pick():
    """A lone worker's budget (session 46) reserves every free slot of each
    fleet, capped by the fleet's free workers: a pick by the supervisor must
    count them as taken, but the fleet still takes calls (the worker grants
    them from its budget). Read as taken, every fleet of a one-worker host
    read not eligible and FULL at all times, which fires the shipped alerts
    FleetIngressNoEligibleFleet and FleetIngressCapacityExhausted and logs
    "fleet full" at each probe."""
    from fleet_ingress.core.host_view import Counts
    from fleet_ingress.ops.snapshot import fleet_row

    b = _balancer("https://a.test name=a\n", maxconn=4)
    a = b.fleets[0]
    a.opened_at_probe = a.opened_total
    a.reported_available = 3
    _take(b, 1)
    a.standing = 2  # the rest of the fleet's free workers, reserved
    assert (a.estimated_available, a.full, a.has_room) == (0, True, False)
    assert (a.estimated_free, a.out_of_workers, a.takes_calls) == (2, False, True)
    row = fleet_row(a, "available", Counts(), {}, {})
    assert (row["eligible"], row["full"], row["estimated_available"]) == (True, False, 2)
    assert row["reserved"] == 2

    a.reported_available, a.standing = 10, 3  # maxconn's rest reserved: room, still
    assert (a.has_room, a.takes_calls) == (False, True)
    assert a.active == 1
    a.standing = 0
    _take(b, 3)  # maxconn reached by calls: no room for anyone
    assert (a.has_room, a.takes_calls, a.out_of_workers) == (False, False, False)
    a.reported_available = 4  # and the fleet's own word: FULL
    assert a.out_of_workers and fleet_row(a, "available", Counts(), {}, {})["full"]


def test_a_grant_heard_after_a_probe_left_that_counted_it_is_not_counted_twice():
    """A lone worker holds its grants' "acquire" (ANSWERS_FLUSH at most): a
    call it granted before a probe left may be in that probe's number, and
    is heard of after it. It is one of the calls opened before that probe
    (and in flight then unless its 101 is told from before it), for the probe
    counted and for one still out: counted as opened since the probe, the
    estimate read one low for each until the next probe (fails on main:
    no `grant_heard_late`)."""
    b = _balancer("https://a.test name=a\n")
    a = b.fleets[0]
    a.probe_counted(5, a.probe_sending(now=10.0))
    # Granted at 11.0 and answered at 11.1 in the worker; a probe leaves at
    # 11.5 and says 4 free (that call in its number); the acquire is read after.
    a.probe_counted(4, a.probe_sending(now=11.5))
    b.open(a, "x")
    a.grant_heard_late("x", at=11.0)
    assert a.estimated_free == 4 - 1  # in flight at the probe, as far as is known
    a.lease_answered("x", at=11.1)  # told with it: before the probe left
    assert a.estimated_free == 4
    # Granted at 12.0, heard while a probe sent at 12.5 is out: counted for that one.
    opened_before = a.probe_sending(now=12.5)
    b.open(a, "y")
    a.grant_heard_late("y", at=12.0)
    a.lease_answered("y", at=12.1)
    a.probe_counted(3, opened_before)  # x and y in its number
    assert a.estimated_free == 3
    # Granted after the probe left: opened since it, as before.
    b.open(a, "z")
    a.grant_heard_late("z", at=13.0)
    assert a.estimated_free == 2
