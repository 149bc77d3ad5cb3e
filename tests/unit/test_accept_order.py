"""process.accept: whether a worker's listener reads, look by look (no I/O).

A look passes the accept queue's length (None: not readable here) and the
connections this worker has accepted in all; the answer is whether its
reader is on until the next look."""

from __future__ import annotations

import pytest

from fleet_ingress.core.accept_order import (
    ACCEPT_LOOK,
    BUSY_PAUSE,
    BUSY_STEPS,
    CONFIRM_LOOK,
    AcceptOrder,
)


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
    assert CONFIRM_LOOK < ACCEPT_LOOK


def test_it_reads_while_connections_wait_and_stops_after_a_quiet_look():
    order = AcceptOrder(2, "first")
    # (queue length, accepted in all) -> (reading, next look in)
    transcript = [
        ((0, 0), (False, ACCEPT_LOOK)),  # nothing waits: stays off
        ((0, 0), (False, ACCEPT_LOOK)),
        ((3, 0), (False, CONFIRM_LOOK)),  # some wait: looked at again soon
        ((2, 0), (True, ACCEPT_LOOK)),  # still: the first worker fell behind, on
        ((1, 2), (True, ACCEPT_LOOK)),  # still waiting: on
        ((0, 4), (True, ACCEPT_LOOK)),  # empty, but it took some since the last look: on
        ((0, 5), (True, ACCEPT_LOOK)),  # and again
        ((0, 5), (False, ACCEPT_LOOK)),  # empty and nothing taken since: off
        ((0, 5), (False, ACCEPT_LOOK)),
        ((1, 5), (False, CONFIRM_LOOK)),
        ((0, 5), (False, ACCEPT_LOOK)),  # taken by the first worker meanwhile: stays off
        ((1, 5), (False, CONFIRM_LOOK)),
        ((4, 5), (True, ACCEPT_LOOK)),
    ]
    got = [(order.look(*seen), order.next_look) for seen, _ in transcript]
    assert got == [want for _, want in transcript]


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
    assert order.look(2, 7) is False and order.confirming
    assert order.set_mode("spread", accepted=7) is True and not order.confirming
    assert order.set_mode("first", accepted=7) is False
    assert order.look(2, 7) is False
    assert order.look(2, 7) is True
    assert order.set_mode("spread", accepted=9) is True
    assert not order.looks and order.reading
    assert order.look(0, 9) is True


def test_a_reload_that_keeps_first_keeps_what_the_last_look_decided():
    order = AcceptOrder(1, "first")
    assert order.look(4, 0) is False
    assert order.look(4, 0) is True
    assert order.set_mode("first", accepted=3) is True
    assert order.look(0, 3) is True  # 3 taken since the last look: on one more
    assert order.look(0, 3) is False


def test_the_first_rank_under_first_is_unmoved_by_a_reload():
    order = AcceptOrder(0, "first")
    assert order.set_mode("spread", 0) is True
    assert order.set_mode("first", 0) is True
    assert not order.looks


@pytest.mark.parametrize("rank", [0, 1])
def test_under_first_a_worker_behind_on_its_handshakes_pauses_its_accepts(rank):
    """Steps of new connections waiting for its loop (handshakes, heads): at
    BUSY_STEPS it leaves the queue to the others for BUSY_PAUSE an accept."""
    order = AcceptOrder(rank, "first")
    assert order.pause_when_busy(0) == 0.0
    assert order.pause_when_busy(BUSY_STEPS - 1) == 0.0
    assert order.pause_when_busy(BUSY_STEPS) == BUSY_PAUSE
    assert 0 < BUSY_PAUSE < CONFIRM_LOOK


@pytest.mark.parametrize("rank", [0, 1])
def test_under_spread_a_busy_worker_accepts_as_before(rank):
    assert AcceptOrder(rank, "spread").pause_when_busy(1000) == 0.0
