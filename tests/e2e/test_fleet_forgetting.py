"""The supervisor forgetting a fleet gone from the set (`ForgetLater`,
`Supervisor._forget_fleet`) against the calls_ended series of another fleet
gone and not forgotten yet: the real supervisor's registry, scraped."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import generate_latest

from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import load_config
from fleet_ingress.ops.admin_client import format_stat_table
from fleet_ingress.ops.local_counts import REMOVED_FLEETS
from fleet_ingress.service.supervisor import Supervisor
from fleet_ingress.service.worker_process import WorkerProcess
from tests.support import TLSFiles, metric_samples, write_run_home


def _ended(supervisor: Supervisor, fleet: str) -> float:
    exposition = generate_latest(supervisor.metrics.prometheus).decode()
    ended = metric_samples(exposition).get("fleet_ingress_calls_ended_total", {})
    return sum(n for labels, n in ended.items() if ("fleet", fleet) in labels)


async def test_forgetting_one_fleet_keeps_another_gone_fleets_calls_ended(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """a and b left the set; a is forgotten while b waits. b's calls ended
    by workers gone (here: 3 lost with a worker that died, counted by the
    supervisor) are shown until b is forgotten, so must stay: before, the
    fold at a's forgetting moved every fleet out of the set to "(removed)",
    b's too, and b's counter went down from 3 to 0 (Prometheus reads a
    drop as a reset: a false increase)."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
    retired = supervisor.view.retired.counters
    retired[("calls_ended", "b", "error")] += 3
    retired[("calls_ended", "a", "error")] += 2
    supervisor.forgetting.gone("b")  # FORGET_AFTER: not within this test
    supervisor.forgetting.gone("a", 0.05)
    assert _ended(supervisor, "b") == 3
    async with asyncio.timeout(5):
        while "a" in supervisor.forgetting.pending:
            await asyncio.sleep(0.02)
    assert _ended(supervisor, "b") == 3
    assert retired[("calls_ended", REMOVED_FLEETS, "error")] == 2  # a's, folded


async def test_the_status_line_does_not_call_an_upgrades_new_workers_old(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """While an upgrade starts its new generation (candidates, generation
    N+1, SERVING_SETTLE and more), systemd's status line said them "of an
    older generation draining": capacity leaving, when it is coming."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
    procs = [await asyncio.create_subprocess_exec("sleep", "30") for _ in range(3)]
    try:
        new = supervisor.pool.generation + 1
        supervisor.pool.workers[9001] = WorkerProcess(procs[0], new, 9001, candidate=True)
        supervisor.pool.workers[9002] = WorkerProcess(procs[1], new, 9002, candidate=True)
        line = supervisor.status_line()
        assert "older generation" not in line, line
        assert "(+2 of the next generation starting)" in line, line
        old = WorkerProcess(procs[2], supervisor.pool.generation - 1, 9003, retiring=True)
        supervisor.pool.workers[9003] = old
        line = supervisor.status_line()
        assert "(+1 of an older generation draining, +2 of the next generation starting)" in (
            line
        ), line
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()


async def test_upgrade_failed_stays_1_while_the_next_upgrade_is_under_way(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """fleet_ingress_upgrade_failed says the last upgrade's outcome "until one
    succeeds": while the next one was being checked it read 0 (and the status
    line dropped LAST UPGRADE FAILED), so FleetIngressUpgradeFailed (for: 0m)
    resolved, to fire again if that one failed too. stat's line stays as well."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")

    def failed() -> float | None:
        exposition = generate_latest(supervisor.metrics.prometheus).decode()
        return metric_samples(exposition).get("fleet_ingress_upgrade_failed", {}).get(())

    assert failed() is None
    statuses = supervisor.upgrade.statuses
    statuses["u1"] = {"id": "u1", "state": "failed", "error": "SyntaxError", "finished": 1.0}
    assert failed() == 1
    statuses["u2"] = {"id": "u2", "state": "checking"}
    assert failed() == 1
    assert "LAST UPGRADE FAILED" in supervisor.status_line()
    # stat and the page too (before, the supervisor's snapshot gave them the
    # latest upgrade alone, and the line went while the gauge stayed 1).
    assert "an upgrade begun since is under way (checking)" in format_stat_table(
        supervisor.snapshot()
    )
    statuses["u2"].update(state="done", finished=2.0)
    assert failed() == 0
    assert "LAST UPGRADE FAILED" not in supervisor.status_line()
    assert "UPGRADE FAILED" not in format_stat_table(supervisor.snapshot())
