"""check's look-up of the fleets' names: two fleets at one address named, a
resolver that never answers held for LOOKUP_BUDGET at most. A fake resolver
here; the real one, hung, in tests/e2e/test_check.py
(test_a_resolver_that_never_answers_holds_check_for_its_budget_only)."""

import threading
import time
from collections.abc import Iterator

import pytest

from fleet_ingress.config.fleet_lookup import Address, look_up, shared_address_warnings
from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.fleet_spec import FleetSpec

HOSTS: dict[str, set[tuple[str, int]]] = {
    "localhost": {("127.0.0.1", 0), ("::1", 0)},
    "fleet-a.test": {("192.0.2.10", 0)},
    "fleet-b.test": {("192.0.2.10", 0)},  # one load balancer, say
    "fleet-c.test": {("192.0.2.11", 0)},
}


# Set after each test (`_answer_the_hung`): the hung lookups' daemon threads
# end then, not 30 s later, asleep in the tests that follow.
HUNG_UNTIL = threading.Event()


@pytest.fixture(autouse=True)
def _answer_the_hung() -> Iterator[None]:
    HUNG_UNTIL.clear()
    yield
    HUNG_UNTIL.set()


def fake(host: str, port: int) -> set[Address]:
    if host == "hung.test":
        HUNG_UNTIL.wait(30)  # never answers, as far as check is concerned
    if host not in HOSTS:
        raise OSError("Name or service not known")
    return {(ip, port, scope) for ip, scope in HOSTS[host]}


def fleets(text: str) -> list[FleetSpec]:
    return parse_fleets_text(text, default_maxconn=16)


def test_a_name_at_another_fleets_address_is_named_with_both_fleets_and_the_fix() -> None:
    warnings = shared_address_warnings(
        fleets("https://localhost:18443\nhttps://127.0.0.1:18443 maxconn=20"), lookup=fake
    )
    assert warnings == [
        "fleets 'localhost:18443' (https://localhost:18443) and '127.0.0.1:18443' "
        "(https://127.0.0.1:18443) resolve to one address, 127.0.0.1:18443: if they are "
        "one host, it gets two maxconn budgets (16 + 20 calls where it holds 20: the rest "
        "answered 429) and two probes: list it once; if they are distinct hosts behind one "
        "address (routed by TLS SNI), nothing is wrong"
    ]


def test_names_at_one_address_are_named_and_others_not() -> None:
    text = "https://fleet-a.test\nhttps://fleet-b.test\nhttps://fleet-c.test\nhttps://nx.test"
    warning, nx = shared_address_warnings(fleets(text), lookup=fake)
    assert warning.startswith("fleets 'fleet-a.test' (https://fleet-a.test) and 'fleet-b.test'")
    assert "one address, 192.0.2.10:443" in warning
    assert nx.startswith("fleet 'nx.test' (https://nx.test): its name nx.test does not resolve")


def test_a_name_that_does_not_resolve_is_named_with_the_resolvers_words_and_the_fix() -> None:
    """check looked every name up, and of one the resolver refuses said
    nothing: OK, and the fleet never came UP (`check --probe` alone said why)."""
    text = "https://fleet-a.test\nhttps://fleet-typo.test:8443 name=b\nhttps://192.0.2.9 name=c"
    assert shared_address_warnings(fleets(text), lookup=fake) == [
        "fleet 'b' (https://fleet-typo.test:8443): its name fleet-typo.test does not resolve "
        "(Name or service not known): the ingress cannot connect to it, so it stays DOWN and "
        "gets no call; check the name, its DNS record and this host's resolver, or give the "
        "fleet's address"
    ]


def test_another_port_or_two_literals_are_not_said_here() -> None:
    # Two literals are the fleets file's to judge (without a lookup): said there.
    text = "https://localhost:18443\nhttps://127.0.0.1:18444\nhttp://0x7f.1\nhttp://127.0.0.1"
    assert shared_address_warnings(fleets(text), lookup=fake) == []


def test_a_resolver_that_never_answers_holds_check_for_the_budget_only() -> None:
    text = "https://hung.test\nhttps://localhost:8443\nhttps://127.0.0.1:8443"
    started = time.monotonic()
    warnings = shared_address_warnings(fleets(text), budget=0.5, lookup=fake)
    took = time.monotonic() - started
    assert 0.5 <= took < 5, took  # the budget, not the hung lookup's 30 s (a loaded host)
    assert "resolve to one address, 127.0.0.1:8443" in warnings[0]  # the others still compared
    assert warnings[1] == (
        "fleet(s) hung.test: no answer from the resolver within 0.5 s, so not compared with "
        "the others' addresses (is DNS slow or down? the ingress resolves a fleet's name "
        "each time it connects)"
    )


def test_many_names_are_looked_up_at_once() -> None:
    def slow(host: str, port: int) -> set[Address]:
        time.sleep(0.2)
        return {("192.0.2.1", port, 0)} if host == "n0.test" else {(host, port, 0)}

    targets = [(f"n{i}.test", 443) for i in range(32)]
    started = time.monotonic()
    answers = look_up(targets, budget=5, lookup=slow)
    assert len(answers) == 32
    # 16 at a time: two rounds of 0.2 s (one at a time: 6.4 s), a loaded host's margin
    assert time.monotonic() - started < 4
