"""How many carrier connections a worker takes: limits.max_connections, or what
its descriptors hold (two a call, after its own and the :80 listener's)."""

import pytest

from fleet_ingress.net.acme import ACME_DESCRIPTORS
from fleet_ingress.net.listener import DESCRIPTORS_KEPT, connections_within


@pytest.mark.parametrize(
    ("descriptors", "configured", "acme", "allowed"),
    [
        (1_048_576, 10_000, ACME_DESCRIPTORS, 10_000),  # the unit file's LimitNOFILE
        (200, 10_000, 0, (200 - DESCRIPTORS_KEPT) // 2),  # no :80 listener
        # 256 :80 connections, each with its upstream's descriptor.
        (1024, 10_000, ACME_DESCRIPTORS, (1024 - DESCRIPTORS_KEPT - 512) // 2),
        (1024, 10, ACME_DESCRIPTORS, 10),  # the operator's lower limit stands
        (64, 10_000, ACME_DESCRIPTORS, 1),  # never none: one carrier is still served
    ],
)
def test_a_worker_takes_no_more_carriers_than_its_descriptors_hold(
    descriptors: int, configured: int, acme: int, allowed: int
) -> None:
    assert connections_within(descriptors, configured, acme_connections=acme) == allowed
