"""The test suite's port picking (tests.support.free_ports): pytest-xdist's
workers pick from disjoint shares of the ports below the ephemeral range, and
one process does not hand a port out twice until its share is used up."""

from __future__ import annotations

import asyncio

import pytest

from tests import support
from tests.support import PICKED_PORTS_FROM, pick_range


@pytest.mark.parametrize("workers", [2, 3, 4, 6])
def test_each_xdist_worker_picks_from_its_own_share(workers: int) -> None:
    below = 32768
    shares = [pick_range(f"gw{i}", str(workers), below) for i in range(workers)]
    seen: set[int] = set()
    for share in shares:
        assert len(share) >= (below - PICKED_PORTS_FROM) // workers
        assert share.start >= PICKED_PORTS_FROM and share.stop <= below
        assert seen.isdisjoint(share)
        seen.update(share)


@pytest.mark.parametrize(
    ("worker", "workers"),
    [(None, None), ("master", "4"), ("gw7", "4"), ("gw0", "1"), ("gw1", "many")],
)
def test_a_process_outside_xdist_picks_from_the_whole_range(
    worker: str | None, workers: str | None
) -> None:
    assert pick_range(worker, workers, 32768) == range(PICKED_PORTS_FROM, 32768)


def test_a_process_does_not_hand_a_port_out_twice_in_a_row_of_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ports picked and released are free again at once: without the cursor a
    # random pick could name one an earlier test has not bound yet.
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    monkeypatch.setattr(support, "_PORT_CURSOR", support._PortCursor())
    share = pick_range("gw2", "4", support._ephemeral_start())
    picked: list[int] = []
    for _ in range(100):
        picked += asyncio.run(support.free_ports(3))
    assert len(set(picked)) == len(picked)
    assert all(port in share for port in picked)
