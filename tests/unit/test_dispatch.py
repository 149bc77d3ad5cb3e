"""The FIFO queue in front of the balancer (asyncio, no sockets)."""

import asyncio

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.core.retry import Failure, RetryPolicy
from fleet_ingress.net.dispatch import Dispatcher, NoFleetAvailable


def _dispatcher(maxconn=1, queue_timeout=1.0, max_queue=8):
    specs = parse_fleets_text(
        "https://a.test name=a\nhttps://b.test name=b\n", default_maxconn=maxconn
    )
    return Dispatcher(
        Balancer(FleetSet.from_specs(specs)), queue_timeout=queue_timeout, max_queue=max_queue
    )


async def test_waiters_are_served_first_in_first_out_as_slots_free():
    d = _dispatcher()
    first = [await d.acquire(), await d.acquire()]
    order: list[int] = []

    async def wait(i):
        fleet = await d.acquire()
        order.append(i)
        return fleet

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert d.queue_length == 3
    d.release(first[0])
    await asyncio.sleep(0.01)
    assert order == [0]
    # A newcomer does not overtake the queue even when it finds a free slot.
    d.release(first[1])
    newcomer = asyncio.create_task(wait(99))
    await asyncio.sleep(0.01)
    assert order == [0, 1]
    for t in tasks[:2]:
        d.release(t.result())
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2, 99]
    newcomer.cancel()


async def test_queue_timeout_gives_no_fleet_available():
    d = _dispatcher(queue_timeout=0.1)
    await d.acquire()
    await d.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoFleetAvailable, match=r"0\.1s"):
        await d.acquire()
    assert 0.09 <= loop.time() - started < 2.0
    assert d.queue_timeouts == 1 and d.queue_length == 0


async def test_full_queue_and_disabled_queue_refuse_at_once():
    d = _dispatcher(max_queue=1)
    await d.acquire()
    await d.acquire()
    waiting = asyncio.create_task(d.acquire())
    await asyncio.sleep(0)
    with pytest.raises(NoFleetAvailable, match="queue is full"):
        await d.acquire()
    waiting.cancel()
    d2 = _dispatcher(queue_timeout=0)
    await d2.acquire()
    await d2.acquire()
    with pytest.raises(NoFleetAvailable, match="queueing is off"):
        await d2.acquire()


async def test_no_fleet_up_is_refused_at_once_and_fails_waiters():
    d = _dispatcher()
    await d.acquire()
    await d.acquire()
    waiting = asyncio.create_task(d.acquire())
    await asyncio.sleep(0)
    for f in d.balancer.fleets:
        f.health = Health.DOWN
    d.wake()
    with pytest.raises(NoFleetAvailable, match=r"^no fleet is up \(2 down\)$"):
        await waiting
    with pytest.raises(NoFleetAvailable, match=r"^no fleet is up \(2 down\)$"):
        await d.acquire()


async def test_a_cancelled_waiter_handed_a_slot_gives_it_back():
    d = _dispatcher()
    a = await d.acquire()
    await d.acquire()
    waiting = asyncio.create_task(d.acquire())
    await asyncio.sleep(0)
    d.release(a)  # handed to the waiter...
    waiting.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert sum(f.active for f in d.balancer.fleets) == 1


async def test_lease_release_is_idempotent():
    d = _dispatcher()
    lease = await d.lease()
    lease.release()
    lease.release()
    assert not lease.held
    assert sum(f.active for f in d.balancer.fleets) == 0


@pytest.mark.parametrize(
    ("failure", "attempt", "retried"),
    [
        (Failure.CONN_FAILURE, 1, True),
        (Failure.CONN_FAILURE, 3, True),
        (Failure.CONN_FAILURE, 4, False),
        (Failure.EMPTY_RESPONSE, 1, True),
        (Failure.RESPONSE_TIMEOUT, 1, True),
        (Failure.JUNK_RESPONSE, 1, False),
    ],
)
def test_retry_policy_defaults(failure, attempt, retried):
    policy = RetryPolicy(
        3, frozenset({"conn-failure", "empty-response", "response-timeout"}), frozenset()
    )
    assert policy.retry_failure(failure, attempt) is retried


def test_statuses_are_retried_only_when_listed():
    assert not RetryPolicy(3, frozenset(), frozenset()).retry_status(429, 1)
    assert RetryPolicy(3, frozenset(), frozenset({429})).retry_status(429, 1)
    assert not RetryPolicy(3, frozenset(), frozenset({429})).retry_status(429, 4)


async def test_calls_refused_until_a_fleet_goes_down_run_the_down_hooks_once():
    """In one process, calls a fleet refused (`fall` in a row) take it DOWN, and
    the hooks that give up its attempts in flight (`net.fleet_down`) hear of it,
    once; a timed-out attempt is no refusal and runs none."""
    d = _dispatcher(maxconn=4)
    d.fall = 2
    for fleet in d.balancer.fleets:
        fleet.health = Health.UP
    heard: list[str] = []
    d.on_down.append(lambda fleet: heard.append(fleet.name))
    leases = [await d.lease(avoid=["b"]) for _ in range(3)]
    assert {lease.fleet.name for lease in leases} == {"a"}
    leases[0].fleet_unreachable(refused=False)
    leases[1].fleet_unreachable()
    assert heard == []
    leases[2].fleet_unreachable()
    assert heard == ["a"] and leases[2].fleet.health is Health.DOWN


async def test_lease_now_takes_a_free_slot_at_once_and_none_where_lease_would_wait():
    """`lease_now` is `lease` where it would not wait: a slot on the least
    loaded fleet, held until released; None once every fleet is full (the call
    queues through `lease`), and None while a call waits, even with a slot
    free (FIFO: nobody overtakes a waiting call)."""
    d = _dispatcher()
    first = d.lease_now()
    assert first is not None and first.held and first.queued_s == 0
    second = d.lease_now(avoid=())
    assert second is not None and {first.fleet.name, second.fleet.name} == {"a", "b"}
    assert [f.active for f in d.balancer.fleets] == [1, 1]
    assert d.lease_now() is None  # full: `lease` queues it
    waiter = asyncio.create_task(d.lease())
    await asyncio.sleep(0.01)
    assert d.queue_length == 1
    first.release()  # handed to the waiter, not to a newcomer
    assert d.lease_now() is None
    handed = await waiter
    assert handed.fleet is first.fleet and handed.held
    handed.release()
    second.release()
    assert [f.active for f in d.balancer.fleets] == [0, 0]


def test_lease_now_prefers_a_fleet_not_tried_and_none_when_no_fleet_is_up():
    d = _dispatcher(maxconn=2)
    lease = d.lease_now(avoid=("a",))
    assert lease is not None and lease.fleet.name == "b"
    lease.release()
    d.balancer.fleets[1].admin = Admin.DRAIN
    assert d.lease_now(avoid=("a",)).fleet.name == "a"  # never a fleet not READY
    for fleet in d.balancer.fleets:
        fleet.health = Health.DOWN
    assert d.lease_now() is None  # `lease` refuses it, saying why
