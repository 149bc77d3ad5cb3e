"""`ops.web_sites.operator_connections_within`: how many connections each
operator listener (stats, admin) holds, given the descriptor limit."""

from __future__ import annotations

import resource

from fleet_ingress.ops.web_sites import (
    OPERATOR_DESCRIPTOR_SHARE,
    OPERATOR_MAX_CONNECTIONS,
    operator_connections_within,
)


def test_a_high_or_no_limit_gives_the_default() -> None:
    assert OPERATOR_MAX_CONNECTIONS == 256
    assert operator_connections_within(1048576) == 256  # the unit file's LimitNOFILE
    assert operator_connections_within(resource.RLIM_INFINITY) == 256


def test_a_low_limit_gives_an_eighth_of_it_to_each_listener() -> None:
    """The two listeners together hold at most a quarter of the descriptors:
    the rest stays for the probes, the workers' channels and pipes, the files."""
    assert OPERATOR_DESCRIPTOR_SHARE == 8
    assert operator_connections_within(1024) == 128
    assert operator_connections_within(512) == 64
    assert operator_connections_within(2048) == 256
    assert operator_connections_within(7) == 1  # one at least: the listener still serves
