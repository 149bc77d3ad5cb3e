"""The ingress loop's name lookups: the same name's lookups under way at once
are one (net/event_loop.py). The lookup itself is replaced here by one the test
answers; the real one, with a resolver that hangs, is in e2e/test_tcp_connect.py."""

from __future__ import annotations

import asyncio
import socket

import pytest

from fleet_ingress.net.event_loop import IngressLoop, new_event_loop


class _Answers:
    def __init__(self, loop: IngressLoop) -> None:
        self.asked: list[tuple[object, ...]] = []
        self.pending: list[asyncio.Future[list[object]]] = []
        loop._lookup = self.lookup  # type: ignore[method-assign]

    async def lookup(self, *args: object) -> list[object]:
        self.asked.append(args)
        answer: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        self.pending.append(answer)
        return await answer


def _run(test) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(test())


def test_lookups_of_one_name_under_way_at_once_are_one_each_caller_answered() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, IngressLoop)
        answers = _Answers(loop)
        callers = [
            asyncio.create_task(loop.getaddrinfo("fleet-a.test", 443, type=socket.SOCK_STREAM))
            for _ in range(5)
        ]
        other = asyncio.create_task(loop.getaddrinfo("fleet-b.test", 443, type=socket.SOCK_STREAM))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [a[0] for a in answers.asked] == ["fleet-a.test", "fleet-b.test"]
        callers[0].cancel()  # its call gave up (timeouts.connect): the others still wait
        await asyncio.sleep(0)
        answers.pending[0].set_result([("a", 1)])
        answers.pending[1].set_result([("b", 2)])
        assert await asyncio.gather(*callers[1:]) == [[("a", 1)]] * 4
        assert await other == [("b", 2)]
        # Nothing cached: the next lookup after an answer asks again.
        again = asyncio.create_task(loop.getaddrinfo("fleet-a.test", 443, type=socket.SOCK_STREAM))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(answers.asked) == 3
        answers.pending[2].set_result([("a", 3)])
        assert await again == [("a", 3)]

    _run(test)


def test_a_failed_lookup_fails_every_caller_and_each_gets_its_own_list() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        answers = _Answers(loop)  # type: ignore[arg-type]
        callers = [asyncio.create_task(loop.getaddrinfo("gone.test", 443)) for _ in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        answers.pending[0].set_exception(socket.gaierror(socket.EAI_NONAME, "not known"))
        for caller in callers:
            with pytest.raises(socket.gaierror):
                await caller
        ok = [asyncio.create_task(loop.getaddrinfo("ok.test", 443)) for _ in range(2)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        answers.pending[1].set_result([("x", 1)])
        first, second = await asyncio.gather(*ok)
        first.append("changed by one caller")
        assert second == [("x", 1)]

    _run(test)
