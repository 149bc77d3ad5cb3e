"""The host-wide stats with real worker processes: the stand-in supervisor runs
the slot coordinator with a `HostView` and serves `/stats.json` and `/metrics`
(ops.stats_server, pulling reports at each request) on loopback; each worker
is a child process counting calls and reporting over its inherited socketpair
(host_stats_worker_child.py). One worker is SIGKILLed and replaced, one
drains and exits after its final report: the host's counters are the sums,
never go down, and a Prometheus-format parse of /metrics shows them."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.core.host_view import HostView
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.ops.host_stats import HostMetrics, host_snapshot, pull_reports
from fleet_ingress.ops.stats_server import stats_app
from tests.support import EventChild, eventually, metric_samples

CHILD = Path(__file__).with_name("host_stats_worker_child.py")
FLEETS = "https://a.test name=a\nhttps://b.test name=b\n"


class Supervisor:
    def __init__(self) -> None:
        specs = parse_fleets_text(FLEETS, default_maxconn=16)
        self.slots = HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=3, max_queue=8)
        self.view = HostView()
        self.server = SlotServer(self.slots, view=self.view)
        self.restarts = {"killed": 0}
        self.metrics = HostMetrics(self.slots, self.view, restarts=lambda: self.restarts)
        self.workers: list[EventChild] = []
        self.runner: web.AppRunner | None = None
        self.base = ""

    async def serve(self) -> None:
        app = stats_app(
            lambda: host_snapshot(self.slots, self.view, started_at=time.time()),
            self.metrics.prometheus,
            refresh=lambda: self.server.collect_reports(timeout=2.0),
        )
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"

    async def spawn(self, generation: int, *, standing: str | None = None) -> EventChild:
        """`standing`: the worker's INGRESS_STANDING_BUDGETS ("1", "held", ""
        for off; None: this process's own)."""
        ours, theirs = socket.socketpair()
        await self.server.adopt(ours)
        env = None if standing is None else {**os.environ, "INGRESS_STANDING_BUDGETS": standing}
        worker = await EventChild.start(
            sys.executable,
            str(CHILD),
            str(theirs.fileno()),
            str(generation),
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        self.workers.append(worker)
        await eventually(lambda: worker.of("ready"), timeout=20)
        await eventually(lambda: worker.proc.pid in {r.pid for r in self.slots.workers})
        return worker

    async def count(self, worker: EventChild, n: int) -> None:
        before = len(worker.of("counted"))
        worker.send(cmd="count", n=n)
        await eventually(lambda: len(worker.of("counted")) > before, timeout=10)

    async def get(self, path: str) -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(self.base + path) as response:
                assert response.status == 200
                return await response.text()

    async def close(self) -> None:
        for worker in self.workers:
            await worker.kill()
        await self.server.close()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def supervisor():
    s = Supervisor()
    await s.serve()
    yield s
    await s.close()


async def scrape(s: Supervisor) -> dict[str, dict[tuple, float]]:
    return metric_samples(await s.get("/metrics"))


def host_figures(m: dict[str, dict[tuple, float]]) -> dict[str, float]:
    return {
        "connections": m["fleet_ingress_connections_total"][()],
        "requests": m["fleet_ingress_requests_total"][(("code", "101"), ("route", "/ws/"))],
        "fleet_calls": sum(m["fleet_ingress_fleet_calls_total"].values()),
        "responses": sum(m["fleet_ingress_fleet_responses_total"].values()),
        "ended": sum(m["fleet_ingress_calls_ended_total"].values()),
        "bytes": m["fleet_ingress_relayed_bytes_total"][(("direction", "carrier_to_fleet"),)],
        "handshakes": m["fleet_ingress_handshake_duration_seconds_count"][()],
    }


def expect(n: int) -> dict[str, float]:
    return {
        "connections": n,
        "requests": n,
        "fleet_calls": n,
        "responses": n,
        "ended": n,
        "bytes": 100 * n,
        "handshakes": n,
    }


@pytest.mark.uvloop_only
async def test_host_counters_are_the_sums_through_a_sigkill_and_a_clean_exit(supervisor):
    s = supervisor
    seen: list[dict[str, float]] = []

    async def host_shows(n: int) -> dict[str, dict[tuple, float]]:
        m = await scrape(s)
        figures = host_figures(m)
        assert figures == expect(n), (n, figures)
        seen.append(figures)
        return m

    w1, w2 = await s.spawn(generation=1), await s.spawn(generation=1)
    await s.count(w1, 5)
    await s.count(w2, 7)
    await host_shows(12)
    await s.count(w1, 3)
    await host_shows(15)

    # w1 counts 2 more, then dies before anyone asks: those 2 are lost, the
    # 8 it reported stay (a crash loses only what followed its last report).
    await s.count(w1, 2)
    os.kill(w1.proc.pid, signal.SIGKILL)
    assert await asyncio.wait_for(w1.proc.wait(), 5) == -signal.SIGKILL
    await eventually(lambda: w1.proc.pid not in {r.pid for r in s.slots.workers})
    s.restarts["killed"] += 1
    await host_shows(15)

    w3 = await s.spawn(generation=2)  # its replacement, a new generation
    await s.count(w3, 4)
    m = await host_shows(19)
    rows = m["fleet_ingress_worker_calls"]
    assert set(rows) == {
        (("generation", "1"), ("pid", str(w2.proc.pid))),
        (("generation", "2"), ("pid", str(w3.proc.pid))),
    }
    assert m["fleet_ingress_workers"] == {(("generation", "1"),): 1, (("generation", "2"),): 1}
    assert m["fleet_ingress_worker_restarts_total"] == {
        (("reason", "crashed"),): 0,  # every reason has its series from the start
        (("reason", "exited"),): 0,
        (("reason", "hung"),): 0,
        (("reason", "killed"),): 1,
        (("reason", "oom"),): 0,
        (("reason", "unknown"),): 0,
    }
    snap = await s.get("/stats.json")
    workers = json.loads(snap)["workers"]
    assert [(w["pid"], w["generation"], w["draining"]) for w in workers] == sorted(
        [(w2.proc.pid, 1, False), (w3.proc.pid, 2, False)]
    )
    assert all(w["last_report_age_s"] < 5 for w in workers)

    # w2 counts 1 more, unasked, then drains and exits: its final report has it.
    await s.count(w2, 1)
    w2.send(cmd="exit")
    assert await asyncio.wait_for(w2.proc.wait(), 10) == 0
    await eventually(lambda: w2.proc.pid not in {r.pid for r in s.slots.workers})
    m = await host_shows(20)
    assert set(m["fleet_ingress_worker_calls"]) == {
        (("generation", "2"), ("pid", str(w3.proc.pid)))
    }
    assert m["fleet_ingress_workers_retired_total"][()] == 2

    for before, after in itertools.pairwise(seen):
        assert all(after[k] >= before[k] for k in before), (before, after)
    page = await s.get("/stats")
    assert f'<td class="l">{w3.proc.pid}</td>' in page


@pytest.mark.uvloop_only
async def test_reports_pulled_in_the_background_bound_what_a_crash_loses(supervisor):
    s = supervisor
    w1 = await s.spawn(generation=1)
    puller = asyncio.create_task(pull_reports(s.server, every=0.2))
    try:
        await s.count(w1, 6)
        # Nobody scrapes: the background pull alone brings the 6 in.
        await eventually(lambda: s.view.totals().counter("connections_total") == 6, timeout=5)
        os.kill(w1.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(w1.proc.wait(), 5)
        await eventually(lambda: not s.slots.workers)
        assert s.view.totals().counter("connections_total") == 6
        assert s.view.retired_workers == 1
    finally:
        puller.cancel()


@pytest.mark.uvloop_only
async def test_slots_reserved_for_workers_standing_budgets_are_on_every_stats_view(supervisor):
    """Workers taking standing grant budgets (INGRESS_STANDING_BUDGETS=1) hold
    fleet slots reserved in the table, no call on them: /stats.json, /stats
    and /metrics say how many, the fleet's and each worker's, and a fleet's
    calls plus its reserved slots never pass maxconn."""
    s = supervisor
    w1 = await s.spawn(generation=1, standing="1")
    w2 = await s.spawn(generation=1, standing="1")

    def budgets_taken() -> bool:
        rows = s.slots.workers
        return len(rows) == 2 and all(r.standing is not None and r.standing_taken for r in rows)

    await eventually(budgets_taken, timeout=10)
    await s.count(w1, 3)  # granted from its budget, then given back into it
    await eventually(budgets_taken, timeout=10)

    snap = json.loads(await s.get("/stats.json"))
    reserved = {f["name"]: f["reserved"] for f in snap["fleets"]}
    assert reserved == {f.name: f.standing for f in s.slots.balancer.fleets}
    assert all(n > 0 for n in reserved.values()), reserved
    assert all(f["active"] + f["reserved"] <= f["maxconn"] for f in snap["fleets"])
    by_worker = {w["pid"]: w["reserved_by_fleet"] for w in snap["workers"]}
    assert set(by_worker) == {w1.proc.pid, w2.proc.pid}
    assert {
        name: sum(fleets.get(name, 0) for fleets in by_worker.values()) for name in reserved
    } == reserved
    assert [w["reserved"] for w in snap["workers"]] == [
        sum(by_worker[w["pid"]].values()) for w in snap["workers"]
    ]

    m = await scrape(s)
    assert m["fleet_ingress_fleet_reserved_slots"] == {
        (("fleet", name),): float(n) for name, n in reserved.items()
    }
    assert m["fleet_ingress_worker_reserved_slots"] == {
        (("fleet", name), ("generation", "1"), ("pid", str(pid))): float(n)
        for pid, fleets in by_worker.items()
        for name, n in fleets.items()
    }
    page = await s.get("/stats")
    assert f"+{reserved['a']} reserved</span>" in page

    # A worker that takes none (the switch off) shows none, and its slots
    # asked of the supervisor are calls, not reserved.
    w3 = await s.spawn(generation=2, standing="")
    await s.count(w3, 2)
    snap = json.loads(await s.get("/stats.json"))
    (row,) = [w for w in snap["workers"] if w["pid"] == w3.proc.pid]
    assert (row["reserved"], row["reserved_by_fleet"]) == (0, {})


@pytest.mark.uvloop_only
async def test_a_lone_workers_budget_leaves_every_fleet_taking_calls_on_every_view(supervisor):
    """The only worker holds every free slot as its budget (session 46): the
    fleets' slots are reserved, yet they take calls (the worker grants them),
    so /stats.json and /metrics must say eligible, as the shipped alert
    FleetIngressNoEligibleFleet reads them, not 0 on every one-worker host."""
    s = supervisor
    w1 = await s.spawn(generation=1)
    await eventually(
        lambda: all(f.standing == f.maxconn - f.active for f in s.slots.balancer.fleets),
        timeout=10,
    )
    await s.count(w1, 2)
    snap = json.loads(await s.get("/stats.json"))
    assert [(f["reserved"] > 0, f["eligible"], f["full"]) for f in snap["fleets"]] == [
        (True, True, False),
        (True, True, False),
    ]
    m = await scrape(s)
    assert m["fleet_ingress_fleet_eligible"] == {(("fleet", "a"),): 1.0, (("fleet", "b"),): 1.0}
