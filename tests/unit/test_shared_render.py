"""`ops.stats_server.SharedRender`: the stats views rendered once for the
requests that come at once, and at most about half of the loop's time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from fleet_ingress.ops.json_in_turns import ENTRIES_PER_TURN, dumps_in_turns
from fleet_ingress.ops.stats_server import SAMPLES_PER_TURN, SharedRender, generate_in_turns


class _Render:
    """A render that takes `takes` seconds of the loop, after `waits` seconds of
    waiting (the workers' reports), which is not counted in the pause."""

    def __init__(self, takes: float = 0.0, waits: float = 0.05) -> None:
        self.takes, self.waits, self.count = takes, waits, 0
        self.fail: Exception | None = None

    async def prepare(self) -> None:
        await asyncio.sleep(self.waits)

    def __call__(self) -> int:
        self.count += 1
        time.sleep(self.takes)
        if self.fail is not None:
            raise self.fail
        return self.count


async def test_requests_at_once_share_one_render_and_one_that_leaves_does_not_stop_it():
    render = _Render()
    shared = SharedRender(render, render.prepare)
    callers = [asyncio.create_task(shared()) for _ in range(5)]
    await asyncio.sleep(0.01)
    callers[0].cancel()  # a scraper that gave up
    assert await asyncio.gather(*callers[1:]) == [1, 1, 1, 1]
    assert render.count == 1


async def test_the_next_render_waits_as_long_as_the_last_took_and_is_fresh():
    loop = asyncio.get_running_loop()
    render = _Render(takes=0.2, waits=0.3)
    shared = SharedRender(render, render.prepare)
    assert await shared() == 1
    began = loop.time()
    assert await shared() == 2  # rendered again, after it came
    # 0.2 s of pause (the render's work, not its 0.3 s wait), 0.3 s of wait, 0.2 s of work
    assert 0.65 <= loop.time() - began


async def test_a_failed_render_fails_its_requests_and_the_next_renders_again():
    render = _Render(waits=0.01)
    render.fail = RuntimeError("collector broke")
    shared = SharedRender(render, render.prepare)
    callers = [asyncio.create_task(shared()) for _ in range(2)]
    for caller in callers:
        with pytest.raises(RuntimeError, match="collector broke"):
            await caller
    render.fail = None
    assert await shared() == 2


class _ManyFleets(Collector):
    """Families of every kind the stats listener serves, some far longer than
    a turn's worth of lines, with label values that must be escaped."""

    def collect(self):
        names = [f'f{i}"\\\n' if i % 97 == 0 else f"f{i}" for i in range(600)]
        up = GaugeMetricFamily("x_fleet_up", "Up.\nTwo lines \\ of help.", labels=["fleet"])
        calls = CounterMetricFamily("x_fleet_calls", "Calls.", labels=["fleet", "code"])
        checks = HistogramMetricFamily("x_check_seconds", "Checks.", labels=["fleet"])
        for i, name in enumerate(names):
            up.add_metric([name], i % 2)
            calls.add_metric([name, "101"], i * 1e20)
            checks.add_metric([name], [("0.5", float(i)), ("+Inf", float(i + 1))], i / 3)
        yield up
        yield GaugeMetricFamily("x_alone", "One sample.", value=1.5)
        yield calls
        yield checks
        yield CounterMetricFamily("x_empty", "No sample.", labels=["fleet"])
        summary = SummaryMetricFamily("x_summary", "A summary.", labels=["fleet"])
        for name in names:
            summary.add_metric([name], count_value=1, sum_value=2.0)
        yield summary
        yield InfoMetricFamily("x_build", "Build.", value={"version": "1"})


_T = TypeVar("_T")


async def _counting_turns(
    work: Awaitable[_T], each_turn: Callable[[int], None] = int
) -> tuple[_T, int]:
    """`work` awaited while another task counts the loop's turns (calling
    `each_turn` with each count): what it gave, and how often it let the
    loop run."""
    turns = 0
    running = True

    async def other_work() -> None:
        nonlocal turns
        while running:
            turns += 1
            each_turn(turns)
            await asyncio.sleep(0)

    others = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    try:
        return await work, turns
    finally:
        running = False
        await others


async def test_metrics_rendered_in_turns_are_generate_latest_byte_for_byte_and_let_the_loop_run():
    registry = CollectorRegistry()
    registry.register(_ManyFleets())
    text, turns = await _counting_turns(generate_in_turns(registry))
    assert text == generate_latest(registry)
    # The gauge and the counter are 600 lines, the histogram 2,400: each is
    # written SAMPLES_PER_TURN lines at a time, the loop let run after each.
    assert turns >= 600 // SAMPLES_PER_TURN * 2 + 2400 // SAMPLES_PER_TURN


async def test_shown_is_told_after_a_render_in_turns_what_it_showed_or_more():
    """A supervisor writes its crash snapshot when told (`shown`), so that no
    count a scraper saw goes back should it die: a render in turns may show
    counts that came during it (a probe ended, a report read), so it is told
    once the render has ended, before the answer."""
    probes = 0

    class Probes(Collector):
        def collect(self):
            yield CounterMetricFamily("x_probes", "Probes.", value=probes)

    registry = CollectorRegistry()
    registry.register(_ManyFleets())  # turns before the probes are read
    registry.register(Probes())
    written: list[int] = []
    shared = SharedRender(lambda: generate_in_turns(registry), shown=lambda: written.append(probes))
    rendering = True

    async def probing() -> None:
        nonlocal probes
        while rendering:
            probes += 1
            await asyncio.sleep(0)

    prober = asyncio.create_task(probing())
    await asyncio.sleep(0)
    began = probes
    text = await shared()
    rendering = False
    await prober
    line = next(li for li in text.decode().splitlines() if li.startswith("x_probes_total "))
    showed = float(line.split()[1])
    assert began < showed  # counted during the render
    assert len(written) == 1 and written[0] >= showed


async def test_a_shown_in_turns_is_awaited_before_the_answer():
    """The supervisor's crash snapshot after a scrape is encoded in turns
    (`Supervisor.write_snapshot_in_turns`): the answer waits until it is written."""
    written: list[str] = []

    async def write_in_turns() -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        written.append("written")

    shared = SharedRender(lambda: "page", shown=write_in_turns)
    assert await shared() == "page"
    assert written == ["written"]


async def test_stats_json_in_turns_is_json_dumps_byte_for_byte_and_lets_the_loop_run():
    """/stats.json of 500 fleets is 300 KB: 3-5 ms of encoding in one piece."""
    picture = {
        "version": "1.0",
        "frontend": {"requests": {"/ws": {"101": 3}}, "calls_ended": {}},
        "fleets": [
            {
                "name": f"f{i}",
                "url": "https://é.test",
                "last_check_ms": None,
                "responses": {"101": i},
            }
            for i in range(500)
        ],
        "workers": [{"pid": 1, "code": "x" * 40_000}, {"pid": 2}],
        "short": [1, 2],
        "upgrade": None,
    }
    text, turns = await _counting_turns(dumps_in_turns(picture))
    assert text == json.dumps(picture)
    assert turns >= 500 // ENTRIES_PER_TURN + 1
    assert await dumps_in_turns({}) == json.dumps({})


async def test_the_probes_histogram_is_read_a_few_fleets_at_a_time_between_turns():
    """At 500 fleets the probes' histogram is 6,500 samples: made in one piece
    it held the supervisor's loop 8-10 ms of a scrape (the scale audit of
    session 34). It is made a few fleets at a time, the loop let run between:
    a probe ended during the render shows for a fleet read after it, and a
    fleet removed meanwhile is left out; the text is generate_latest's."""
    from fleet_ingress.ops.metrics import FleetChecks

    registry = CollectorRegistry()
    checks = FleetChecks(registry)
    names = [f"f{i:03}" for i in range(500)]
    for name in names:
        checks.check_observed(name, 0.003)

    def probing(turn: int) -> None:
        if turn == 2:  # the render's first turn
            checks.check_observed("f499", 0.2)  # read last
            checks.fleet_removed("f498")

    text, turns = await _counting_turns(generate_in_turns(registry), probing)
    assert text == generate_latest(registry)
    lines = text.decode().splitlines()
    assert 'fleet_ingress_fleet_check_duration_seconds_count{fleet="f499"} 2.0' in lines
    assert 'fleet_ingress_fleet_check_duration_seconds_count{fleet="f497"} 1.0' in lines
    assert not any('fleet="f498"' in line for line in lines)
    assert sum(line.startswith("# HELP") for line in lines) == 1
    assert turns >= 500 * 13 // SAMPLES_PER_TURN


async def test_the_probes_histogram_of_no_fleet_is_its_header_alone():
    from fleet_ingress.ops.metrics import FleetChecks

    registry = CollectorRegistry()
    FleetChecks(registry)
    text = await generate_in_turns(registry)
    assert text == generate_latest(registry)
    assert text.decode().splitlines() == [
        "# HELP fleet_ingress_fleet_check_duration_seconds Duration of health probes.",
        "# TYPE fleet_ingress_fleet_check_duration_seconds histogram",
    ]


class _Seen(dict):
    """A fleet's row of the picture that notes at which turn of the loop it was read."""

    turn = 0  # the loop's turns so far (`_turning`)

    def __init__(self, row: dict, seen: list[int]) -> None:
        super().__init__(row)
        self._seen = seen

    def __getitem__(self, key):  # the page reads a row's fields by key
        self._seen.append(_Seen.turn)
        return super().__getitem__(key)

    def items(self):  # json's encoder reads a dict subclass's items()
        self._seen.append(_Seen.turn)
        return super().items()


def _picture_of_500_fleets() -> tuple[dict, list[int], list[int]]:
    from fleet_ingress.config.fleets_file import parse_fleets_text
    from fleet_ingress.core.balancer import Balancer
    from fleet_ingress.core.fleet_set import FleetSet
    from fleet_ingress.core.host_slots import HostSlots
    from fleet_ingress.core.host_view import HostView
    from fleet_ingress.ops.host_stats import host_snapshot

    lines = "".join(f"https://f{i}.test name=f{i}\n" for i in range(500))
    balancer = Balancer(FleetSet.from_specs(parse_fleets_text(lines, default_maxconn=16)))
    picture = host_snapshot(
        HostSlots(balancer, queue_timeout=3, max_queue=8), HostView(), started_at=0.0
    )
    first: list[int] = []
    last: list[int] = []
    rows = picture["fleets"]
    rows[0], rows[-1] = _Seen(rows[0], first), _Seen(rows[-1], last)
    return picture, first, last


async def _turning() -> None:
    while True:
        _Seen.turn += 1
        await asyncio.sleep(0)


@pytest.mark.parametrize("path", ["/stats", "/stat"])
async def test_the_stats_page_and_stat_of_500_fleets_are_made_in_turns_as_before(path):
    """The /stats page's rows (3 ms at 500 fleets) and `fleet-ingress stat`'s
    JSON (300 KB, 3-5 ms) held the supervisor's loop in one piece, a floor under
    every lease answered meanwhile (the scale audit of session 34). The loop
    runs between the first fleet's row and the last's; the text is as before."""
    from aiohttp.test_utils import TestClient, TestServer

    from fleet_ingress.ops.admin_server import admin_app
    from fleet_ingress.ops.stats_page import render_stats_page
    from fleet_ingress.ops.stats_server import stats_app

    picture, first, last = _picture_of_500_fleets()
    if path == "/stats":
        app, expected = stats_app(lambda: picture, CollectorRegistry()), render_stats_page(picture)
    else:
        app, expected = admin_app(None, lambda: picture), json.dumps(picture)  # type: ignore[arg-type]
    first.clear(), last.clear()
    turning = asyncio.create_task(_turning())
    try:
        async with TestClient(TestServer(app)) as client:
            answer = await client.get(path)
            assert answer.status == 200
            assert await answer.text() == expected
    finally:
        turning.cancel()
    assert first and last
    assert min(first) < min(last)  # the loop turned between the first row and the last
