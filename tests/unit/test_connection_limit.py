"""How many carrier connections a worker takes: limits.max_connections, or what
its descriptors hold (two a call, after its own and the :80 listener's)."""

import pytest

from fleet_ingress.net.acme import ACME_MAX_CONNECTIONS
from fleet_ingress.net.listener import DESCRIPTORS_KEPT, connections_within


@pytest.mark.parametrize(
    ("descriptors", "configured", "acme", "allowed"),
    [
        (1_048_576, 10_000, ACME_MAX_CONNECTIONS, 10_000),  # the unit file's LimitNOFILE
        (200, 10_000, 0, (200 - DESCRIPTORS_KEPT) // 2),
        (400, 10_000, ACME_MAX_CONNECTIONS, (400 - DESCRIPTORS_KEPT - 256) // 2),
        (400, 10, ACME_MAX_CONNECTIONS, 10),  # the operator's lower limit stands
        (64, 10_000, ACME_MAX_CONNECTIONS, 1),  # never none: one carrier is still served
    ],
)
def test_a_worker_takes_no_more_carriers_than_its_descriptors_hold(
    descriptors: int, configured: int, acme: int, allowed: int
) -> None:
    assert connections_within(descriptors, configured, acme_connections=acme) == allowed
