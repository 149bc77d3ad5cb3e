"""The host's stats while one worker is stopped (session 40's host-view audit,
note 6): `stat`, /stats.json and /metrics took 0.5 s each (every read waited
SCRAPE_WAIT on the stopped worker), and the worker was shown unresponsive only
after two report pulls, 15-20 s. Each read now answers at once from what the
supervisor holds, and names the worker overdue once a report asked of it has
gone unread REPORT_OVERDUE (2 s); its counts stay its last report's. Real
`fleet-ingress run --workers 2`, real TLS, websockets carriers."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection

from fleet_ingress.core.host_slots import REPORT_OVERDUE
from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    RunningIngress,
    TLSFiles,
    admin_command,
    close_calls,
    echo,
    fleets_up_or_finished,
    metric_samples,
    until_stopped,
)

pytestmark = pytest.mark.uvloop_only

# What a read may take with a worker stopped: it took SCRAPE_WAIT (0.5 s) and more.
ANSWERED_WITHIN = 0.3
# From the SIGSTOP until every read names it overdue: REPORT_OVERDUE (2 s) after
# the first read asked it for a report, and the reads' own time.
OVERDUE_WITHIN = 3.5


async def _admin_stat(service: RunningIngress) -> dict[str, Any]:
    """GET /stat on the admin socket (what `fleet-ingress stat` reads)."""
    connector = aiohttp.UnixConnector(path=str(service.home / "admin.sock"))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get("http://admin/stat") as r:
            assert r.status == 200
            return await r.json()  # type: ignore[no-any-return]


def _worker_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """The counters the workers count and the supervisor sums."""
    fe = stats["frontend"]
    return {
        "connections_total": fe["connections_total"],
        "requests": fe["requests"],
        "fleets": [(f["name"], f["calls_total"], f["responses"]) for f in stats["fleets"]],
    }


def _metric_counts(exposition: str) -> dict[str, Any]:
    samples = metric_samples(exposition)
    return {
        name: samples.get(name)
        for name in (
            "fleet_ingress_connections_total",
            "fleet_ingress_requests_total",
            "fleet_ingress_fleet_calls_total",
        )
    }


def _row(stats: dict[str, Any], pid: int) -> dict[str, Any]:
    return next(r for r in stats["workers"] if r["pid"] == pid)


async def test_stats_answer_at_once_and_name_a_stopped_worker_overdue_its_counts_kept(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet
) -> None:
    service = await RunningIngress.start(
        tls_files, [f"{roomy_fleet.url} name=a maxconn=16"], workers=2, check_timeout=5
    )
    await fleets_up_or_finished(service)
    calls: list[ClientConnection] = []
    try:
        await service.open_on_every_worker(tls_files, calls, 4)
        before = await service.stats()
        before_metrics = _metric_counts(await service.metrics())
        assert before_metrics["fleet_ingress_connections_total"], "no such metric"
        victim = max(before["workers"], key=lambda r: r["calls"])["pid"]
        times: dict[str, list[float]] = {"stats.json": [], "metrics": [], "stat": []}

        async def timed(what: str, read: Any) -> Any:
            started = time.monotonic()
            answer = await read()
            times[what].append(time.monotonic() - started)
            return answer

        os.kill(victim, signal.SIGSTOP)
        try:
            await until_stopped(victim)
            stopped_at = time.monotonic()
            seen_overdue: dict[str, float] = {}
            for _ in range(40):  # 4 s at most of reads 0.1 s apart, and their own time
                stats = await timed("stats.json", service.stats)
                metrics = await timed("metrics", service.metrics)
                stat = await timed("stat", lambda: _admin_stat(service))
                overdue = {
                    "stats.json": _row(stats, victim).get("report_overdue"),
                    "stat": _row(stat, victim).get("report_overdue"),
                    "metrics": metric_samples(metrics)
                    .get("fleet_ingress_worker_report_overdue", {})
                    .get((("generation", "1"), ("pid", str(victim)))),
                }
                for what, said in overdue.items():
                    if said and what not in seen_overdue:
                        seen_overdue[what] = time.monotonic() - stopped_at
                if len(seen_overdue) == 3 or time.monotonic() - stopped_at > OVERDUE_WITHIN:
                    break
                await asyncio.sleep(0.1)
            assert sorted(seen_overdue) == ["metrics", "stat", "stats.json"], (seen_overdue, times)
            assert max(seen_overdue.values()) < OVERDUE_WITHIN, seen_overdue
            row = _row(stats, victim)
            assert row["state"] == "unresponsive" and row["calls"] > 0, row
            assert victim in stats["workers_unresponsive"]
            code, out = await admin_command(service, "stat")
            assert code == 0, out
            line = next(x for x in out.splitlines() if x.startswith(str(victim)))
            assert "unresponsive" in line and "s ago, overdue" in line, out
            # Counted once, as of its last report: nothing dropped, nothing twice.
            assert _worker_counts(stats) == _worker_counts(before)
            assert _metric_counts(metrics) == before_metrics
        finally:
            os.kill(victim, signal.SIGCONT)
        for taken in times.values():
            # Before: each at least SCRAPE_WAIT, 0.5 s.
            assert statistics.median(taken) < ANSWERED_WITHIN, times
        # Continued: it answers again, shown serving, its counts neither reset nor doubled.
        async with asyncio.timeout(10):
            while (row := _row(await service.stats(), victim))["report_overdue"]:
                await asyncio.sleep(0.05)
        assert row["state"] == "serving", row
        for ws in calls:
            await echo(ws)
        after = await service.stats()
        assert after["frontend"]["connections_total"] == before["frontend"]["connections_total"]
        assert after["worker_restarts"] == {} and after["worker_calls_lost"] == 0
    finally:
        await close_calls(calls)
        await service.finish()


async def test_a_supervisor_stopped_past_the_overdue_time_shows_no_worker_overdue_after(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet
) -> None:
    """Stats41's review: a supervisor stopped (or starved) more than
    REPORT_OVERDUE after it asked its workers for reports showed every worker
    overdue, `workers_serving` 0, on resuming: overdue was judged from the
    clock, not from what the workers did while the supervisor could read. Here
    both workers are stopped and asked (a read), the supervisor is stopped 3 s;
    one worker is continued meanwhile and answers (its answer waits unread), the
    other stays stopped, as if stopped with the supervisor and not yet given
    its turn. Read at once after the supervisor continues: both serving. The
    one still stopped is overdue REPORT_OVERDUE after the supervisor runs again."""
    service = await RunningIngress.start(
        tls_files, [f"{roomy_fleet.url} name=a maxconn=16"], workers=2, check_timeout=5
    )
    await fleets_up_or_finished(service)
    calls: list[ClientConnection] = []
    supervisor = service.proc.pid
    try:
        await service.open_on_every_worker(tls_files, calls, 4)
        before = await service.stats()
        answering, late = (r["pid"] for r in before["workers"])
        stopped = {answering, late}
        try:
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            await until_stopped(*stopped)
            await service.stats()  # asks both: neither answers yet
            os.kill(supervisor, signal.SIGSTOP)
            stopped.add(supervisor)
            await until_stopped(supervisor)
            os.kill(answering, signal.SIGCONT)  # answers into its channel, unread
            stopped.discard(answering)
            await asyncio.sleep(3.0)
            os.kill(supervisor, signal.SIGCONT)
            stopped.discard(supervisor)
            resumed_at = time.monotonic()
            stats = await service.stats()
            # Before: [late] (or both) overdue, unresponsive, out of workers_serving.
            assert [r["pid"] for r in stats["workers"] if r["report_overdue"]] == [], stats
            assert stats["workers_serving"] == 2 and stats["workers_unresponsive"] == []
            samples = metric_samples(await service.metrics())
            assert samples["fleet_ingress_workers_serving"][()] == 2
            # The one that stays stopped: overdue, REPORT_OVERDUE after the supervisor
            # could read again (its first read, put off after the stall).
            async with asyncio.timeout(OVERDUE_WITHIN):
                while not _row(stats := await service.stats(), late)["report_overdue"]:
                    await asyncio.sleep(0.1)
            assert time.monotonic() - resumed_at >= REPORT_OVERDUE - 0.2, stats
            assert not _row(stats, answering)["report_overdue"]
            assert stats["workers_serving"] == 1 and stats["workers_unresponsive"] == [late]
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(10):
            while (row := _row(await service.stats(), late))["report_overdue"]:
                await asyncio.sleep(0.05)
        assert row["state"] == "serving", row
        for ws in calls:
            await echo(ws)
    finally:
        await close_calls(calls)
        await service.finish()
