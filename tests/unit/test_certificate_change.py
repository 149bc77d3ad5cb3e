"""Which certificate a reload may put in place of the one carriers get (no sockets, no files)."""

from __future__ import annotations

import pytest

from fleet_ingress.core.certificate_change import (
    CLOCK_SKEW,
    LeafFacts,
    change_note,
    covers,
    kept_over_restart,
    renewal_problem,
    renewal_waiting,
)

NOW = 1_800_000_000.0
DAY = 86400.0


def leaf(*names: str, valid_from: float = NOW - DAY, valid_to: float = NOW + 60 * DAY) -> LeafFacts:
    return LeafFacts(not_before=valid_from, not_after=valid_to, names=frozenset(names))


SERVING = leaf("calls.example.com")


def test_a_renewal_for_the_same_name_is_taken() -> None:
    assert renewal_problem(leaf("calls.example.com"), SERVING, NOW) is None


def test_an_expired_certificate_is_refused_with_its_date() -> None:
    problem = renewal_problem(leaf("calls.example.com", valid_to=NOW - 1), SERVING, NOW)
    assert problem is not None and problem.startswith("expired on 2027-01-15")


def test_one_not_valid_yet_is_refused_unless_within_the_clock_skew() -> None:
    later = leaf("calls.example.com", valid_from=NOW + CLOCK_SKEW + 1)
    problem = renewal_problem(later, SERVING, NOW)
    assert problem is not None and "not valid until" in problem and "clock" in problem
    assert renewal_problem(leaf("calls.example.com", valid_from=NOW + 60), SERVING, NOW) is None


def test_one_for_other_names_only_is_refused_naming_both() -> None:
    problem = renewal_problem(leaf("calls.other.test"), SERVING, NOW)
    assert problem is not None
    assert "calls.other.test" in problem and "(calls.example.com)" in problem


@pytest.mark.parametrize(
    "names",
    [
        ("calls.example.com", "calls2.example.com"),  # a name added
        ("calls2.example.com", "calls.example.com"),
        ("*.example.com",),  # a wildcard that covers it
    ],
)
def test_one_that_still_covers_a_name_in_use_is_taken(names: tuple[str, ...]) -> None:
    assert renewal_problem(leaf(*names), SERVING, NOW) is None


def test_dropping_some_names_of_several_is_the_operators_choice() -> None:
    serving = leaf("a.example.com", "b.example.com")
    assert renewal_problem(leaf("b.example.com"), serving, NOW) is None
    # From a wildcard to one name it covered: carriers dialing that name are served.
    assert renewal_problem(leaf("calls.example.com"), leaf("*.example.com"), NOW) is None
    assert renewal_problem(leaf("calls.other.test"), leaf("*.example.com"), NOW) is not None


def test_after_an_expired_certificate_in_use_any_names_may_follow() -> None:
    expired = leaf("old.example.com", valid_from=NOW - 90 * DAY, valid_to=NOW - DAY)
    assert renewal_problem(leaf("new.example.com"), expired, NOW) is None


def test_with_nothing_known_of_the_one_in_use_only_the_dates_are_judged() -> None:
    assert renewal_problem(leaf("anything.test"), None, NOW) is None
    assert renewal_problem(leaf("anything.test", valid_to=NOW - 1), None, NOW) is not None


@pytest.mark.parametrize(
    ("pattern", "name", "covered"),
    [
        ("calls.example.com", "CALLS.example.com", True),
        ("*.example.com", "calls.example.com", True),
        ("*.example.com", "a.calls.example.com", False),  # one label only
        ("*.example.com", "example.com", False),
        ("*.example.com", "*.example.com", True),  # the same wildcard
        ("calls.example.com", "*.example.com", False),
        ("127.0.0.1", "127.0.0.1", True),
    ],
)
def test_what_a_name_covers(pattern: str, name: str, covered: bool) -> None:
    assert covers(pattern, name) is covered


def test_the_certificate_in_use_again_is_never_refused_even_expired() -> None:
    """A reload that changes only the fleets file, while the certificate in use has
    expired (renewal failing: the incident where fleets need changing most)."""
    expired = leaf("calls.example.com", valid_from=NOW - 90 * DAY, valid_to=NOW - DAY)
    assert renewal_problem(expired, expired, NOW) is None
    other_expired = leaf("calls.example.com", valid_from=NOW - 91 * DAY, valid_to=NOW - DAY)
    assert renewal_problem(other_expired, expired, NOW) is not None


def test_a_reload_says_what_certificate_it_put_in_place() -> None:
    """After a renewal `fleet-ingress reload` named no change at all."""
    assert change_note(SERVING, SERVING) is None
    assert change_note(None, SERVING) is None
    renewed = leaf("calls.example.com", valid_to=NOW + 90 * DAY)
    assert change_note(renewed, SERVING) == (
        "new certificate for new handshakes: valid until 2027-04-15 08:00:00 UTC"
        " (the one before: until 2027-03-16 08:00:00 UTC)"
    )
    moved = leaf("calls.example.com", "b.example.com", valid_to=NOW + 90 * DAY)
    assert change_note(moved, SERVING) == (
        "new certificate for new handshakes: valid until 2027-04-15 08:00:00 UTC"
        " (the one before: until 2027-03-16 08:00:00 UTC),"
        " for b.example.com, calls.example.com (was calls.example.com)"
    )
    # Issued in the same second for the same names: another certificate all the same.
    reissued = LeafFacts(SERVING.not_before, SERVING.not_after, SERVING.names, "b2")
    assert change_note(reissued, SERVING) == (
        "new certificate for new handshakes: valid until 2027-03-16 08:00:00 UTC"
    )
    assert renewal_problem(reissued, SERVING, NOW) is None
    assert change_note(renewed, None) == (
        "new certificate for new handshakes: valid until 2027-04-15 08:00:00 UTC"
    )


def test_a_renewal_waits_on_disk_when_another_certificate_there_is_valid_for_longer():
    served = LeafFacts(NOW - DAY, NOW + 20 * DAY, frozenset({"a.example"}), "f1")
    renewed = LeafFacts(NOW, NOW + 90 * DAY, frozenset({"a.example"}), "f2")
    assert renewal_waiting(renewed, served)
    assert not renewal_waiting(served, served)  # loaded
    assert not renewal_waiting(LeafFacts(NOW, NOW + 10 * DAY, served.names, "f3"), served)
    assert not renewal_waiting(None, served) and not renewal_waiting(renewed, None)


def test_a_restart_keeps_the_served_certificate_over_an_expired_one_on_disk() -> None:
    problem = kept_over_restart(leaf("calls.example.com", valid_to=NOW - 1), SERVING, NOW)
    assert problem is not None and problem.startswith("expired on")
    ahead = leaf("calls.example.com", valid_from=NOW + CLOCK_SKEW + 1)
    assert "not valid until" in (kept_over_restart(ahead, SERVING, NOW) or "")


def test_a_restart_keeps_it_over_one_for_other_names_as_a_reload_would() -> None:
    problem = kept_over_restart(leaf("calls.other.test"), SERVING, NOW)
    assert problem is not None and "none of the names" in problem
    assert kept_over_restart(leaf("calls.example.com", "calls.other.test"), SERVING, NOW) is None


def test_a_restart_serves_the_file_when_it_is_good_or_the_served_one_is_no_better() -> None:
    assert kept_over_restart(leaf("calls.example.com"), SERVING, NOW) is None
    assert kept_over_restart(SERVING, SERVING, NOW) is None
    expired = leaf("calls.example.com", valid_to=NOW - 1)
    # The served one is out of date too: nothing better to keep.
    assert kept_over_restart(expired, leaf("calls.example.com", valid_to=NOW - 2), NOW) is None
    assert kept_over_restart(expired, expired, NOW) is None
    ahead = leaf("calls.example.com", valid_from=NOW + CLOCK_SKEW + 1)
    assert kept_over_restart(leaf("calls.other.test"), ahead, NOW) is None


def test_a_restart_keeps_the_served_one_over_a_chain_carriers_may_not_verify() -> None:
    """`chain`: why carriers may fail to verify the chain on disk where they verify
    the served one's (the service judges both files whole): kept, even for the
    same leaf (its intermediate dropped), unless the served one is out of date,
    or a date or name problem says more."""
    chain = "holds the server's certificate alone"
    renewal = leaf("calls.example.com", valid_to=NOW + 90 * DAY)
    assert kept_over_restart(renewal, SERVING, NOW, chain) == chain
    assert kept_over_restart(renewal, SERVING, NOW) is None  # its chain followed: served
    assert kept_over_restart(SERVING, SERVING, NOW, chain) == chain
    assert kept_over_restart(SERVING, SERVING, NOW) is None
    expired = leaf("calls.example.com", valid_to=NOW - 1)
    assert kept_over_restart(renewal, expired, NOW, chain) is None
    assert "expired on" in (kept_over_restart(expired, SERVING, NOW, chain) or "")
