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


async def _asked(loop: IngressLoop, name: str) -> asyncio.Task[list[object]]:
    """A lookup of `name` under way (the test answers it)."""
    task = asyncio.create_task(loop.getaddrinfo(name, 443, type=1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return task


async def _answered(loop: IngressLoop, answers: _Answers, name: str, answer: list[object]) -> None:
    """`name` looked up once and answered `answer`."""
    first = asyncio.create_task(loop.getaddrinfo(name, 443, type=socket.SOCK_STREAM))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    answers.pending[-1].set_result(answer)
    assert await first == answer


def test_a_name_answered_before_gets_its_last_answer_while_the_resolver_fails_for_now(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A resolver that times out, refuses or answers SERVFAIL (EAI_AGAIN) took
    every fleet given by name DOWN; a name gone (EAI_NONAME) still fails, and a
    name never answered has nothing to fall back on."""

    async def test() -> None:
        loop = asyncio.get_running_loop()
        answers = _Answers(loop)  # type: ignore[arg-type]
        await _answered(loop, answers, "fleet-a.test", [("a", 1)])
        for _ in range(3):  # each asks again, and each gets the last answer
            again = await _asked(loop, "fleet-a.test")
            answers.pending[-1].set_exception(socket.gaierror(socket.EAI_AGAIN, "try again"))
            assert await again == [("a", 1)]
        assert len(answers.asked) == 4
        said = [r for r in caplog.records if "last answer is used" in r.getMessage()]
        assert len(said) == 1 and said[0].levelname == "WARNING"  # once a minute a name
        gone = await _asked(loop, "fleet-a.test")
        answers.pending[-1].set_exception(socket.gaierror(socket.EAI_NONAME, "not known"))
        with pytest.raises(socket.gaierror):
            await gone
        never = await _asked(loop, "fleet-b.test")
        answers.pending[-1].set_exception(socket.gaierror(socket.EAI_AGAIN, "try again"))
        with pytest.raises(socket.gaierror):
            await never

    _run(test)


def test_a_lookup_that_hangs_gives_the_last_answer_and_its_own_answer_replaces_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fleet_ingress.net import event_loop

    monkeypatch.setattr(event_loop, "STALE_AFTER", 0.05)

    async def test() -> None:
        loop = asyncio.get_running_loop()
        answers = _Answers(loop)  # type: ignore[arg-type]
        await _answered(loop, answers, "fleet-a.test", [("a", 1)])
        started = loop.time()
        assert await loop.getaddrinfo("fleet-a.test", 443, type=1) == [("a", 1)]
        assert loop.time() - started < 1.0
        hung = answers.pending[-1]
        assert not hung.done()  # still asked: its answer, when it comes, is the new last one
        hung.set_result([("a", 2)])
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        late = asyncio.create_task(loop.getaddrinfo("fleet-a.test", 443, type=1))
        await asyncio.sleep(0.1)  # no answer again: the last one, now the refreshed one
        assert await late == [("a", 2)]

    _run(test)


def test_an_answer_older_than_a_day_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet_ingress.net import event_loop

    monkeypatch.setattr(event_loop, "STALE_FOR", 0.0)

    async def test() -> None:
        loop = asyncio.get_running_loop()
        answers = _Answers(loop)  # type: ignore[arg-type]
        await _answered(loop, answers, "fleet-a.test", [("a", 1)])
        await asyncio.sleep(0.01)
        again = await _asked(loop, "fleet-a.test")
        answers.pending[-1].set_exception(socket.gaierror(socket.EAI_AGAIN, "try again"))
        with pytest.raises(socket.gaierror):
            await again

    _run(test)


def test_a_caller_joining_a_hung_lookup_late_gets_the_last_answer_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """STALE_AFTER counts from when the lookup was asked: a health probe (inside
    its 1 s check_timeout) that joined a lookup hung for longer waited the full
    STALE_AFTER again, timed out, and its fleet went DOWN (the review of session 22)."""
    from fleet_ingress.net import event_loop

    monkeypatch.setattr(event_loop, "STALE_AFTER", 0.2)

    async def test() -> None:
        loop = asyncio.get_running_loop()
        answers = _Answers(loop)  # type: ignore[arg-type]
        await _answered(loop, answers, "fleet-a.test", [("a", 1)])
        first = await _asked(loop, "fleet-a.test")  # hangs from now
        assert await first == [("a", 1)]  # at STALE_AFTER
        started = loop.time()
        assert await loop.getaddrinfo("fleet-a.test", 443, type=1) == [("a", 1)]
        assert loop.time() - started < 0.1  # the same hung lookup: no second wait
        assert len(answers.asked) == 2

    _run(test)


def test_a_name_found_gone_loses_its_last_answer() -> None:
    """EAI_NONAME (the record removed) drops the name's last answer, even when it
    came after a caller was given that answer: the next lookup fails rather
    than send calls to the old address for a day (the review of session 22)."""

    async def test() -> None:
        loop = asyncio.get_running_loop()
        answers = _Answers(loop)  # type: ignore[arg-type]
        await _answered(loop, answers, "fleet-a.test", [("a", 1)])
        gone = await _asked(loop, "fleet-a.test")
        answers.pending[-1].set_exception(socket.gaierror(socket.EAI_NONAME, "not known"))
        with pytest.raises(socket.gaierror):
            await gone
        failing = await _asked(loop, "fleet-a.test")
        answers.pending[-1].set_exception(socket.gaierror(socket.EAI_AGAIN, "try again"))
        with pytest.raises(socket.gaierror):  # nothing to fall back on any more
            await failing

    _run(test)


def test_the_answers_kept_are_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """ANSWERS_KEPT names at most: the one answered longest ago has no last answer."""
    from fleet_ingress.net import event_loop

    monkeypatch.setattr(event_loop, "ANSWERS_KEPT", 2)

    async def test() -> None:
        loop = asyncio.get_running_loop()
        answers = _Answers(loop)  # type: ignore[arg-type]
        for name in ("a.test", "b.test", "c.test"):
            await _answered(loop, answers, name, [(name, 1)])
        for name, kept in (("a.test", False), ("c.test", True)):
            failing = await _asked(loop, name)
            answers.pending[-1].set_exception(socket.gaierror(socket.EAI_AGAIN, "try again"))
            if kept:
                assert await failing == [(name, 1)]
            else:
                with pytest.raises(socket.gaierror):
                    await failing

    _run(test)
