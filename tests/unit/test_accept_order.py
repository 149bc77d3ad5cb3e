"""process.accept: whether a worker's listener reads, look by look (no I/O).

A look passes the accept queue's length (None: not readable here) and the
connections this worker has accepted in all; the answer is whether its
reader is on until the next look."""

from __future__ import annotations

import pytest

from fleet_ingress.core.accept_order import ACCEPT_LOOK, AcceptOrder


@pytest.mark.parametrize(
    ("rank", "mode"), [(0, "spread"), (1, "spread"), (3, "spread"), (0, "first")]
)
def test_spread_and_the_first_rank_always_read_and_never_look(rank, mode):
    order = AcceptOrder(rank, mode)
    assert order.reading and not order.looks
    for queued, accepted in [(0, 0), (5, 0), (0, 0), (None, 3)]:
        assert order.look(queued, accepted) is True


def test_a_later_rank_under_first_starts_with_its_reader_off_and_looks():
    order = AcceptOrder(1, "first")
    assert order.looks and not order.reading
    assert 0.02 <= ACCEPT_LOOK <= 0.1  # a wait a connection may take, not a poll loop


def test_it_reads_while_connections_wait_and_stops_after_a_quiet_look():
    order = AcceptOrder(2, "first")
    # (queue length, accepted in all) -> reading
    transcript = [
        ((0, 0), False),  # nothing waits: stays off
        ((0, 0), False),
        ((3, 0), True),  # the first worker fell behind: on
        ((1, 2), True),  # still waiting: on
        ((0, 4), True),  # empty, but it took some since the last look: stays on
        ((0, 5), True),  # and again
        ((0, 5), False),  # empty and nothing taken since: off
        ((0, 5), False),
        ((1, 5), True),
    ]
    got = [order.look(*seen) for seen, _ in transcript]
    assert got == [want for _, want in transcript]
    assert order.reading


def test_a_queue_it_cannot_read_reads_as_spread_does():
    """Not Linux (no TCP_INFO of a listening socket): the worker takes
    connections as its loop is free rather than leave them to one."""
    order = AcceptOrder(1, "first")
    assert order.look(None, 0) is True
    assert order.look(None, 0) is True


def test_a_reload_to_first_turns_a_later_rank_off_and_back_to_spread_on():
    order = AcceptOrder(1, "spread")
    assert order.reading
    assert order.set_mode("first", accepted=7) is False
    assert order.looks
    # What it took before the change is not "taken since the last look".
    assert order.look(0, 7) is False
    assert order.look(2, 7) is True
    assert order.set_mode("spread", accepted=9) is True
    assert not order.looks and order.reading
    assert order.look(0, 9) is True


def test_a_reload_that_keeps_first_keeps_what_the_last_look_decided():
    order = AcceptOrder(1, "first")
    assert order.look(4, 0) is True
    assert order.set_mode("first", accepted=3) is True
    assert order.look(0, 3) is True  # 3 taken since the last look: on one more
    assert order.look(0, 3) is False


def test_the_first_rank_under_first_is_unmoved_by_a_reload():
    order = AcceptOrder(0, "first")
    assert order.set_mode("spread", 0) is True
    assert order.set_mode("first", 0) is True
    assert not order.looks
