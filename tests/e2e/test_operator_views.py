"""The operator's views agree with each other and with what happens (the
brief: an operator sees and steers everything without reading code): `stat`,
/stats, /stats.json, /metrics as a real Prometheus scrapes it. A supervisor,
two workers, real TLS, simulated fleets on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fleet_ingress.sim import SimulatedFleet
from tests.e2e.test_deploy_monitoring import JOB, load_alert_rules, prometheus_scraping
from tests.support import (
    RunningIngress,
    TLSFiles,
    close_calls,
    echo,
    eventually,
    fleets_up_or_finished,
    metric_samples,
    run_cli,
)

pytestmark = pytest.mark.uvloop_only


async def test_a_fleet_in_maint_is_not_counted_up_by_metrics_as_stat_does_not(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet], tmp_path: Path
) -> None:
    """A fleet in MAINT is not probed: `stat`, /stats and `check --live` show
    its health as not known ("-"). /metrics said fleet_up 1 and health UP
    from its last probe before MAINT, for as long as it stays there: with its
    host stopped for the work MAINT was for and the other fleet DOWN, every
    new call got 503 at once, `stat` said no fleet UP, and Prometheus counted
    one fleet UP: FleetIngressAllFleetsDown (sum of fleet_up == 0) could not
    fire, the dashboard's "Fleets UP" read 1, and FleetIngressCapacityExhausted
    added the stale free count in."""
    a, b = two_fleets
    service = await RunningIngress.start(
        tls_files, [f"{s.url} name={s.name} maxconn=16" for s in two_fleets], check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    try:
        code, out, err = await run_cli(service, "maint", "a")
        assert code == 0, out + err
        await a.stop()  # the work MAINT was for
        b.health_status = 500

        async def health() -> dict[str, str]:
            return {f["name"]: f["health"] for f in (await service.stats())["fleets"]}

        async with asyncio.timeout(10):  # fleets.fall probes, 0.2 s apart
            while (await health())["b"] != "DOWN":
                await asyncio.sleep(0.1)
        # What really happens: no fleet takes a call, not even after a queue wait.
        with pytest.raises(InvalidStatus) as refused:
            await connect(service.url("/ws/bot-1"), ssl=tls_files.client_context(), open_timeout=15)
        assert refused.value.response.status_code == 503

        code, out, err = await run_cli(service, "stat")
        assert code == 0, err
        assert "fleets: 2 (1 DOWN, 1 not probed (MAINT))" in out, out
        (row_a,) = [line for line in out.splitlines() if line.split()[:1] == ["a"]]
        assert row_a.split()[1:3] == ["-", "MAINT"], row_a

        samples = metric_samples(await service.metrics())
        up = {dict(k)["fleet"]: v for k, v in samples["fleet_ingress_fleet_up"].items()}
        assert up == {"a": 0.0, "b": 0.0}, up
        health = {
            dict(k)["state"]: v
            for k, v in samples["fleet_ingress_fleet_health_state"].items()
            if dict(k)["fleet"] == "a"
        }
        assert health.get("UP") != 1.0, health
        free = {
            dict(k)["fleet"] for k in samples.get("fleet_ingress_fleet_estimated_available", {})
        }
        assert "a" not in free, samples.get("fleet_ingress_fleet_estimated_available")
        # Nor the certificate its last probe saw (a renewal during the work MAINT
        # was for read as the old one, FleetIngressFleetCertificateExpiringSoon
        # kept firing on it); b's, probed (over TLS, its health 500), stays.
        expiry = samples.get("fleet_ingress_fleet_certificate_expiry_timestamp_seconds", {})
        assert {dict(k)["fleet"] for k in expiry} == {"b"}, expiry

        # As a real Prometheus scrapes it: FleetIngressAllFleetsDown's expression
        # (its `for: 1m` aside) has an answer.
        target = SimpleNamespace(stats_address=("127.0.0.1", service.stats_port))
        async with prometheus_scraping(target, tmp_path) as prometheus:  # type: ignore[arg-type]
            (all_down,) = [
                r["expr"] for r in load_alert_rules() if r["alert"] == "FleetIngressAllFleetsDown"
            ]
            async with asyncio.timeout(20):
                while not await prometheus.query(f'up{{job="{JOB}"}} == 1'):
                    await asyncio.sleep(0.2)
            result = await prometheus.query(all_down)
            assert result, json.dumps(await prometheus.query("fleet_ingress_fleet_up"))
    finally:
        await service.finish()


async def test_calls_lost_with_a_killed_worker_are_in_the_call_duration_histogram(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """Every tunneled call that ends is in fleet_ingress_call_duration_seconds
    ("Duration of tunneled calls, 101 to end"), as in calls_ended_total and
    the access log (a line each, with its duration_s). The calls a SIGKILLed
    worker took with it were counted ended (reason error) and logged, but
    not observed: after one worker of two was killed holding half the calls,
    the dashboard's call-duration panels and its mean left them out."""
    service = await RunningIngress.start(
        tls_files, [f"{s.url} name={s.name} maxconn=16" for s in two_fleets], check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    calls: list[ClientConnection] = []
    try:
        await service.open_on_every_worker(tls_files, calls, 6)
        for ws in calls:
            await echo(ws)
        await asyncio.sleep(1.2)  # past the histogram's first bound (1 s)
        # A scrape asks each worker's report: its calls' bytes with it.
        victim = (await service.stats())["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)

        def lost_logged() -> bool:
            return any(
                e.get("end_reason") == "error" and e.get("worker_pid") == victim["pid"]
                for e in service.log()
            )

        await eventually(lost_logged, 10)
        await close_calls(calls)
        async with asyncio.timeout(10):
            while (await service.stats())["frontend"]["active_calls"]:
                await asyncio.sleep(0.1)

        ended = [e for e in service.log() if e.get("event") == "call ended"]
        assert len(ended) == len(calls)
        lost = [e for e in ended if e["end_reason"] == "error"]
        assert len(lost) == victim["calls"] > 0 and all(e["duration_s"] >= 1 for e in lost)
        # Their bytes as the worker's last report said them, at least (each
        # call echoed "ping" once before that report): before, null. Their
        # time in the histogram runs from their 101, not their start.
        for e in lost:
            assert e["bytes_at_least"] is True, e
            assert e["bytes_from_carrier"] >= 10 and e["bytes_to_carrier"] >= 6, e
            assert "bytes at least" in e["detail"], e
            assert 1 <= e["tunnel_s"] < e["duration_s"], e

        samples = metric_samples(await service.metrics())
        assert sum(samples["fleet_ingress_calls_ended_total"].values()) == len(calls)
        count = samples["fleet_ingress_call_duration_seconds_count"][()]
        under_one_s = samples["fleet_ingress_call_duration_seconds_bucket"][(("le", "1.0"),)]
        assert (count, under_one_s) == (len(calls), 0), (count, under_one_s, len(lost))
    finally:
        await close_calls(calls)
        await service.finish()


async def test_stat_says_whose_refusal_and_keeps_a_removed_fleets_totals(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """Fleet a answers 429 (full), passed through; then no fleet takes calls
    and the ingress answers 503 itself. `stat` said "refused 5" for both
    alike: whose refusal only the fleet label in /metrics told. Then a is
    removed: its row, its calls and 429s went from `stat` and the page, so
    the fleets' 429 column no longer added up to the 429s answered (the
    requests by code in /metrics). Now a "(removed)" row keeps them."""
    a = two_fleets[0]
    a.capacity = 0  # every call request: 429
    service = await RunningIngress.start(
        tls_files, [f"{s.url} name={s.name} maxconn=16" for s in two_fleets], check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    try:
        assert (await run_cli(service, "drain", "b"))[0] == 0
        for status, count in ((429, 3), (503, 2)):
            for _ in range(count):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(service.url(), ssl=tls_files.client_context(), open_timeout=15)
                assert refused.value.response.status_code == status
            assert (await run_cli(service, "drain", "a"))[0] == 0
        code, out, err = await run_cli(service, "stat")
        assert code == 0, err
        assert (
            "refused 5 (fleets' own answers passed through 3: 429 3; the ingress's own 2: 503 2)"
            in out
        ), out
        assert (await service.stats())["frontend"]["calls_refused"] == {
            "fleet": {"429": 3},
            "ingress": {"503": 2},
        }

        assert (await run_cli(service, "ready", "b"))[0] == 0
        code, out, err = await run_cli(service, "remove-fleet", "a")
        assert code == 0, out + err
        async with asyncio.timeout(10):
            while len((await service.stats())["fleets"]) != 1:
                await asyncio.sleep(0.1)
        code, out, err = await run_cli(service, "stat")
        assert code == 0, err
        (removed,) = [
            line.split() for line in out.splitlines() if line.split()[:2] == ["(removed)", "-"]
        ]
        # fleet health admin cur/max free total ended 429 retries chkfail last-check
        assert removed[5:8] == ["0", "refused:3", "3"], out
        snap = await service.stats()
        rows = [*snap["fleets"], snap["removed_fleets"]]
        samples = metric_samples(await service.metrics())
        assert samples["fleet_ingress_calls_refused_total"] == {
            (("by", "fleet"), ("code", "429")): 3.0,
            (("by", "ingress"), ("code", "503")): 2.0,
        }
        answered = samples["fleet_ingress_requests_total"]
        assert (
            sum(r["responses_429"] for r in rows)
            == answered[(("code", "429"), ("route", "/ws/"))]
            == 3
        )
        page = await _page(service)
        removed_row = page.split('id="removed-fleets"')[1].split("</tr>")[0]
        cells = removed_row.split("<td")[1:]
        # As the header's 12 columns: calls total 0, ended refused 3, 429s 3.
        assert len(cells) == 12, cells
        assert cells[7:10] == [">0</td>", ' class="l">refused:3</td>', ">3</td>"], cells
    finally:
        await service.finish()


async def _page(service: RunningIngress) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{service.stats_port}/stats") as r:
            return await r.text()
