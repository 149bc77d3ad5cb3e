"""Which fleets are one host, from their addresses (no lookup here)."""

import pytest

from fleet_ingress.core.same_host import SharedAddress, shared_addresses

V4 = ("127.0.0.1", 18443, 0)
V6 = ("::1", 18443, 0)


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        ({"a": {V4}, "b": {("127.0.0.2", 18443, 0)}}, []),
        ({"a": {V4}, "b": {("127.0.0.1", 18444, 0)}}, []),  # another port: another host
        ({"localhost": {V4, V6}, "127.0.0.1": {V4}}, [SharedAddress("localhost", "127.0.0.1", V4)]),
        # Several shared addresses: the pair once, with the lowest.
        ({"a": {V6, V4}, "b": {V4, V6}}, [SharedAddress("a", "b", V4)]),
        # Three at one address: each pair, in the order listed.
        (
            {"c": {V4}, "a": {V4}, "b": {V4}},
            [SharedAddress("c", "a", V4), SharedAddress("c", "b", V4), SharedAddress("a", "b", V4)],
        ),
        # A link-local address on two interfaces is two addresses.
        ({"a": {("fe80::1", 443, 2)}, "b": {("fe80::1", 443, 3)}}, []),
        (
            {"a": {("fe80::1", 443, 2)}, "b": {("fe80::1", 443, 2)}},
            [("a", "b", ("fe80::1", 443, 2))],
        ),
        ({"a": set(), "b": {V4}}, []),  # no answer: nothing to compare
    ],
)
def test_shared_addresses(
    addresses: dict[str, set[tuple[str, int, int]]], expected: list[SharedAddress]
) -> None:
    assert shared_addresses(addresses) == expected
