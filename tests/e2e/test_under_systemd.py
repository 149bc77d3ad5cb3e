"""The shipped unit file (deploy/systemd/fleet-ingress.service) under a real
systemd: the Debian package's, booted as PID 1 of namespaces of the test's own
(tests/systemd_box.py). What the other tests can only emulate (a notify socket
of their own, signals sent by hand) is here systemd's own doing: Type=notify's
READY=1, ExecReload=, `systemctl stop` under KillMode=mixed, the watchdog,
MAINPID over an upgrade, `systemctl kill` to every process of the unit,
Restart= after the main process is killed.

The unit runs as shipped but for what a test needs: its paths rewritten to this
checkout's virtualenv and a temporary home, and a drop-in that runs it as root
(no fleet-ingress user on a test machine), with its own /tmp off (the test's
files are in /tmp), in the host's network namespace (the test's systemd has
one of its own) and its output in files (no journald)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import fleet_ingress
from fleet_ingress.service.fd_store import SNAPSHOT_EVERY
from fleet_ingress.sim import SimulatedFleet
from tests import systemd_box
from tests.support import (
    IngressOnLoopback,
    MemoryCgroup,
    TLSFiles,
    break_worker_channel,
    close_calls,
    echo,
    metric_samples,
    need_ipv6_loopback,
    offer_session,
    write_leaf_cert,
    write_run_home,
)

pytestmark = pytest.mark.uvloop_only

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "fleet-ingress.service"
NAME = "fleet-ingress.service"


@pytest.fixture
def systemd() -> Iterator[systemd_box.PrivateSystemd]:
    why = systemd_box.unavailable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the tests under systemd (as root, with systemd)")
        pytest.skip(f"{why} (CI unset)")
    box = systemd_box.PrivateSystemd()
    try:
        box.boot()
        yield box
    finally:
        box.shutdown()


@pytest.fixture
def fleet(roomy_fleet: SimulatedFleet) -> SimulatedFleet:
    return roomy_fleet


class Unit(IngressOnLoopback):
    """The ingress installed as fleet-ingress.service in `systemd`."""

    def __init__(
        self, systemd: systemd_box.PrivateSystemd, home: Path, port: int, stats_port: int
    ) -> None:
        self.systemd = systemd
        self.home = home
        self.port = port
        self.stats_port = stats_port

    def show(self, *names: str) -> dict[str, str]:
        return self.systemd.show(NAME, *names)

    def main_pid(self) -> int:
        """MainPID as this test sees it (0: none)."""
        pid = int(self.show("MainPID")["MainPID"])
        return self.systemd.host_pid(pid) if pid else 0

    def process_name(self) -> str:
        """The main process's name, as `systemctl status` and `pgrep -x` read it."""
        return Path(f"/proc/{self.main_pid()}/comm").read_text().strip()

    def main_command(self) -> str:
        return Path(f"/proc/{self.main_pid()}/cmdline").read_text().replace("\0", " ")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of its stderr and what `systemctl status` says."""
        path = self.home / "stderr.log"
        tail = super().log_tail(chars) if path.exists() else ""
        status = self.systemd.systemctl("status", NAME, check=False).stdout
        return f"{tail}\n{status}"

    def started_again(self) -> list[dict[str, Any]]:
        """Its log's lines saying a supervisor was started after one died."""
        return [line for line in self.log() if line["event"].startswith("started again")]

    def workers(self, generation: int | None = None) -> set[int]:
        """The unit's workers (`fleet_ingress worker` by their command line), as
        this test sees them; those of `generation` alone if given. Not every
        process but the main one: an upgrade's trial run, a supervisor's
        `systemctl show`, and the child each forks for `ldconfig -p` (ctypes'
        find_library), which shows its parent's command line until its exec,
        are the unit's too (a CI run under load counted a trial run and its
        child as generation 2's two workers, and killed the supervisor before
        its exec)."""
        others = set(self.systemd.processes(NAME)) - {self.main_pid()}
        found = set()
        for pid in others:
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # gone meanwhile
            (ppid,) = [
                int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")
            ]
            if args[1:4] != [b"-m", b"fleet_ingress", b"worker"] or ppid in others:
                continue
            if generation is None or args[args.index(b"--generation") + 1] == b"%d" % generation:
                found.add(pid)
        return found

    async def until(self, timeout: float = 30, **wanted: str) -> None:
        """Until `systemctl show` says each property `wanted` has its value."""
        deadline = time.monotonic() + timeout
        while (shown := self.show(*wanted)) != wanted:
            assert time.monotonic() < deadline, f"{shown} {self.log_tail()}"
            await asyncio.sleep(0.1)

    def cli(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        """`fleet-ingress ARGS -c ingress.toml` from outside the unit, as an
        operator's shell runs it (over the admin socket)."""
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "fleet-ingress"),
                *args,
                "-c",
                str(self.home / "ingress.toml"),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.returncode, done.stdout + done.stderr


def write_unit(
    systemd: systemd_box.PrivateSystemd,
    home: Path,
    watchdog_sec: int | None,
    pythonpath: Path | None,
    service: tuple[str, ...] = (),
) -> None:
    """The shipped unit with this checkout's paths, and the test's drop-in."""
    cli = str(Path(sys.executable).parent / "fleet-ingress")
    text = UNIT.read_text()
    for shipped, here in (
        ("/opt/fleet-ingress/venv/bin/fleet-ingress", cli),
        ("/etc/fleet-ingress/ingress.toml", str(home / "ingress.toml")),
        ("ReadWritePaths=-/etc/fleet-ingress", f"ReadWritePaths={home}"),
    ):
        assert shipped in text, f"the unit no longer has {shipped!r}: update this test"
        text = text.replace(shipped, here)
    (systemd.units / NAME).write_text(text)
    dropin = [
        "[Service]",
        "User=root",
        "Group=root",
        "PrivateTmp=no",
        systemd_box.JOIN_HOST_NETWORK,  # the test's loopback, where its fleet and calls are
        f"StandardOutput=append:{home}/stdout.log",
        f"StandardError=append:{home}/stderr.log",
    ]
    used = (REPO, Path(sys.executable).resolve(), Path(sys.base_prefix))
    if any(str(p).startswith(("/root/", "/home/", "/run/user/")) for p in used):
        dropin.append("ProtectHome=read-only")  # the checkout or its Python live there
    if pythonpath is not None:
        dropin.append(f"Environment=PYTHONPATH={pythonpath}")
    elif os.environ.get("PYTHONPATH"):
        dropin.append(f"Environment=PYTHONPATH={os.environ['PYTHONPATH']}")
    if watchdog_sec is not None:
        dropin.append(f"WatchdogSec={watchdog_sec}")
    dropin += service
    (systemd.units / f"{NAME}.d").mkdir()
    (systemd.units / f"{NAME}.d" / "test.conf").write_text("\n".join(dropin) + "\n")


async def install(
    systemd: systemd_box.PrivateSystemd,
    tls_files: TLSFiles,
    fleet: SimulatedFleet,
    *,
    drain: float = 30,
    watchdog_sec: int | None = None,
    process: str = "",
    pythonpath: Path | None = None,
    service: tuple[str, ...] = (),
) -> Unit:
    """`process`: lines for the [process] section; `pythonpath`: where the
    unit's processes import fleet_ingress from (a copy to break)."""
    home = systemd.home / "etc"
    home.mkdir()
    port, stats_port = await write_run_home(
        tls_files, home, [f"{fleet.url} name=a maxconn=16"], workers=2, drain=drain, extra=process
    )
    write_unit(systemd, home, watchdog_sec, pythonpath, service)
    systemd.systemctl("daemon-reload")
    unit = Unit(systemd, home, port, stats_port)
    # Type=notify: `start` returns once the ingress said READY=1.
    started = await asyncio.to_thread(systemd.systemctl, "start", NAME, check=False)
    assert started.returncode == 0, started.stderr + unit.log_tail()
    return unit


def write_expired_leaf(tls_files: TLSFiles, home: Path) -> str:
    """A certificate that expired yesterday in home's cert.pem and key.pem (a
    renewal gone wrong); its serial (`write_leaf_cert`)."""
    now = datetime.datetime.now(datetime.UTC)
    return write_leaf_cert(
        tls_files.ca,
        home,
        not_before=now - datetime.timedelta(days=90),
        not_after=now - datetime.timedelta(days=1),
    )


async def a_call(unit: Unit, tls_files: TLSFiles) -> ClientConnection:
    """A call, once the fleet is UP (READY waits for its first probe only)."""
    await unit.fleets_up()
    return await connect(unit.url(), ssl=tls_files.client_context(), open_timeout=5)


async def test_start_reload_and_a_stop_that_lets_the_call_finish(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    unit = await install(systemd, tls_files, fleet, process='cpu_affinity = "auto"')
    state = unit.show("ActiveState", "SubState", "StatusText")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert "calls" in state["StatusText"], state  # STATUS= reaches systemd
    # What the workers do to themselves is allowed by the unit's sandbox.
    said = [line["event"] for line in unit.log()]
    assert said.count("worker pinned to its CPU (process.cpu_affinity)") == 2, said
    assert not [e for e in said if "cannot" in e], said
    supervisor = unit.main_pid()
    assert " run -c " in unit.main_command()
    call = await a_call(unit, tls_files)
    try:
        await echo(call, "before the reload")
        # ExecReload: the check, then `fleet-ingress reload`, waited for.
        reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
        assert reloaded.returncode == 0, reloaded.stderr + unit.log_tail()
        await echo(call, "after the reload")
        assert unit.main_pid() == supervisor
        # `systemctl stop`: SIGTERM to the supervisor alone (KillMode=process); it
        # tells its workers to drain, and the call goes on meanwhile.
        stop = systemd.systemctl_in_background("stop", NAME)
        await unit.until(10, ActiveState="deactivating")
        for n in range(10):
            await echo(call, f"draining {n}")
            await asyncio.sleep(0.2)
        assert stop.poll() is None, "the stop did not wait for the call"
        with pytest.raises(OSError):
            await connect(unit.url(), ssl=tls_files.client_context(), open_timeout=2)
        await call.close()
        await asyncio.to_thread(stop.wait, 20)
        assert stop.returncode == 0, stop.stderr.read() if stop.stderr else ""
    finally:
        await close_calls([call])
    state = unit.show("ActiveState", "Result", "NRestarts")
    # Result=success: the drain ended in an exit 0 before any timeout or SIGKILL.
    assert state == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0"}, state
    assert unit.systemd.processes(NAME) == []


async def test_an_upgrade_keeps_the_main_pid_and_the_call_and_systemd_sees_the_reload(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    unit = await install(systemd, tls_files, fleet)
    supervisor = unit.main_pid()
    main_before = unit.show("MainPID")["MainPID"]
    assert unit.process_name() == "fleet-ingress"
    call = await a_call(unit, tls_files)
    try:
        await echo(call, "before the upgrade")
        upgrade = asyncio.create_task(asyncio.to_thread(unit.cli, "upgrade", timeout=150))
        seen = set()
        while not upgrade.done():
            seen.add(unit.show("ActiveState")["ActiveState"])
            await asyncio.sleep(0.05)
        code, said = await upgrade
        assert code == 0, said + unit.log_tail()
        # RELOADING=1 ... READY=1 around it, from the same MAINPID.
        assert "reloading" in seen, seen
        state = unit.show("ActiveState", "SubState", "NRestarts", "Result")
        assert state == {
            "ActiveState": "active",
            "SubState": "running",
            "NRestarts": "0",
            "Result": "success",
        }, state
        assert unit.main_pid() == supervisor
        # Named as before (`systemctl status`, `pgrep -x fleet-ingress`), though
        # re-executed as `python3 -m fleet_ingress run`.
        assert unit.show("MainPID") == {"MainPID": main_before}
        assert unit.process_name() == "fleet-ingress"
        await echo(call, "after the upgrade")
        fresh = await a_call(unit, tls_files)
        await echo(fresh, "a call of the new generation")
        await fresh.close()
    finally:
        await close_calls([call])


async def test_usr1_and_quit_to_every_process_of_the_unit_end_nothing(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """`systemctl kill -s USR1` (an operator used to nginx's log reopening)
    signals the supervisor and every worker."""
    unit = await install(systemd, tls_files, fleet)
    processes = sorted(systemd.processes(NAME))
    assert len(processes) == 3, processes  # the supervisor and 2 workers
    call = await a_call(unit, tls_files)
    try:
        for signal_name in ("USR1", "QUIT"):
            systemd.systemctl("kill", "-s", signal_name, NAME)
            await asyncio.sleep(0.5)
            await echo(call, f"after SIG{signal_name}")
        assert sorted(systemd.processes(NAME)) == processes
        assert unit.show("ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    finally:
        await close_calls([call])


async def test_the_watchdog_is_fed_through_calls_and_a_drain_longer_than_it(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """WatchdogSec=4 (the unit has 30): 6 s of serving, then a 6 s drain, and
    systemd never aborts the supervisor (it pings every 2 s then: a shorter
    WatchdogSec made the test hang on a host busy for a second)."""
    unit = await install(systemd, tls_files, fleet, watchdog_sec=4)
    assert unit.show("WatchdogUSec")["WatchdogUSec"] == "4s"
    call = await a_call(unit, tls_files)
    try:
        for n in range(30):
            await echo(call, f"serving {n}")
            await asyncio.sleep(0.2)
        assert unit.show("NRestarts", "ActiveState") == {"NRestarts": "0", "ActiveState": "active"}
        stop = systemd.systemctl_in_background("stop", NAME)
        for n in range(30):
            await echo(call, f"draining {n}")
            await asyncio.sleep(0.2)
        await call.close()
        await asyncio.to_thread(stop.wait, 20)
    finally:
        await close_calls([call])
    state = unit.show("ActiveState", "Result", "NRestarts")
    assert state == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0"}, state
    assert not any("watchdog" in line["event"].lower() for line in unit.log())


@pytest.mark.parametrize("signal_name", ["KILL", "ABRT"])
async def test_a_supervisor_killed_outright_is_started_again_and_takes_up_every_call(
    systemd: systemd_box.PrivateSystemd,
    tls_files: TLSFiles,
    fleet: SimulatedFleet,
    signal_name: str,
) -> None:
    """SIGKILL (an operator's kill -9, the OOM killer) or SIGABRT (the
    watchdog on a stuck loop, an abort in native code) to the supervisor: the
    workers and their calls go on (KillMode=process), systemd starts it again
    (Restart=on-failure) and hands it the listeners and the workers' channels
    from its fd store; it takes them up, the slot table rebuilt from what each
    worker holds. Before, systemd killed every worker with it: every call cut.
    The death is counted (`fleet_ingress_supervisor_deaths_total`): the
    counters go on from its snapshot, and before (the supervisor audit of
    session 33) nothing in /metrics said a supervisor had died."""
    unit = await install(systemd, tls_files, fleet)
    supervisor = unit.main_pid()
    workers = sorted(unit.workers())
    assert len(workers) == 2
    calls = [await a_call(unit, tls_files) for _ in range(4)]
    try:
        assert _deaths(await unit.metrics()) == 0
        for n, call in enumerate(calls):
            await echo(call, f"before {n}")
        systemd.systemctl("kill", "-s", signal_name, "--kill-who=main", NAME)
        deadline = time.monotonic() + 30
        while True:
            for n, call in enumerate(calls):
                await echo(call, f"meanwhile {n}")
            state = unit.show("ActiveState", "NRestarts")
            if state == {"ActiveState": "active", "NRestarts": "1"}:
                break
            assert time.monotonic() < deadline, f"{state} {unit.log_tail()}"
            await asyncio.sleep(0.2)
        again = unit.main_pid()
        assert again not in (0, supervisor)
        assert sorted(unit.workers()) == workers  # the same ones
        fresh = await a_call(unit, tls_files)
        calls.append(fresh)
        for n, call in enumerate(calls):
            await echo(call, f"after {n}")
        # The host's slot table, rebuilt from the workers: every call counted.
        async with asyncio.timeout(10):
            while (await unit.stats())["fleets"][0]["active"] != len(calls):
                await asyncio.sleep(0.1)
        assert fleet.active_calls == len(calls)
        said = unit.started_again()
        assert len(said) == 1
        assert sorted(systemd.host_pid(pid) for pid, _ in said[0]["workers"]) == workers
        assert _deaths(await unit.metrics()) == 1
        assert _supervisor_oom_kills(await unit.metrics()) == 0  # an operator's kill
        # A worker taken up, killed now with calls (the OOM killer): systemd's
        # child, its exit status unknown here, the calls it held counted lost.
        # Before (the second review of session 28): its channel's end came
        # first and "exit 0" read as a drain, none lost.
        rows = (await unit.stats())["workers"]
        victim = max(rows, key=lambda r: r["calls"])
        os.kill(systemd.host_pid(victim["pid"]), signal.SIGKILL)
        async with asyncio.timeout(10):
            while (counted := _lost_and_unknown(await unit.metrics())) != (victim["calls"], 1):
                assert counted[0] <= victim["calls"], (counted, victim)
                await asyncio.sleep(0.2)
        # Each has its access line (SPEC 12), written by the supervisor from what
        # the worker told of its calls as it was taken up. Before (the supervisor
        # audit of session 33) only the dead supervisor had known who they were:
        # no line.
        async with asyncio.timeout(10):
            while len(lines := _lines_of(unit, victim["pid"])) < victim["calls"]:
                await asyncio.sleep(0.2)
        assert len(lines) == victim["calls"], lines
        said = {(e["end_reason"], e["status"], e["route"], e["bot_id"]) for e in lines}
        assert said == {("error", 101, "/ws/", "bot-1")}, lines
    finally:
        await close_calls(calls)
    # A stop after it drains and ends every process, as ever.
    stopped = await asyncio.to_thread(systemd.systemctl, "stop", NAME, check=False)
    assert stopped.returncode == 0
    state = unit.show("ActiveState", "Result")
    assert state == {"ActiveState": "inactive", "Result": "success"}, state
    assert systemd.processes(NAME) == []


def _supervisor_oom_kills(exposition: str) -> float:
    return metric_samples(exposition)["fleet_ingress_supervisor_oom_kills_total"][()]


def _limited_group(systemd: systemd_box.PrivateSystemd) -> MemoryCgroup:
    """The unit's own cgroup where systemd's tree has the memory controller
    (cgroup v2: its memory.max, as MemoryMax= sets it); else a v1 memory
    group made for the test. Skipped where neither, unless CI=true."""
    unit_group = systemd.cgroup / "system.slice" / NAME
    if (unit_group / "memory.max").exists():
        return MemoryCgroup(unit_group, v2=True, made=False)
    why = MemoryCgroup.unavailable()
    if why is None and MemoryCgroup._v1_parent() is None:
        why = "the unit's cgroup has no memory.max and there is no cgroup v1 memory controller"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI (root, Debian) must run the supervisor OOM-kill test")
        pytest.skip(f"{why} (CI unset)")
    return MemoryCgroup.make(v1=True)


def _make_the_oom_killers_first_choice(pid: int) -> None:
    # Raised, not lowered: that needs CAP_SYS_RESOURCE, which a test may not have.
    Path(f"/proc/{pid}/oom_score_adj").write_text("1000")


@pytest.mark.alone  # an OOM kill others' supervisors count too (tests/e2e/test_oom_kill.py)
async def test_a_supervisor_oom_killed_is_said_so_by_the_one_started_again(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The kernel's OOM killer takes the supervisor (the unit at its memory
    limit; here made its first choice, over the workers' +500, as a
    supervisor far bigger than its workers would be): systemd
    starts it again, and the new one, whose count of OOM kills rose since its
    predecessor's last snapshot, says it was the OOM killer and what to change,
    and counts it (fleet_ingress_supervisor_oom_kills_total, `stat`). The calls
    go on. A kill -9 counts a death alone
    (test_a_supervisor_killed_outright_is_started_again_and_takes_up_every_call)."""
    unit = await install(systemd, tls_files, fleet)
    group = _limited_group(systemd)
    calls = [await a_call(unit, tls_files) for _ in range(2)]
    try:
        supervisor = unit.main_pid()
        assert _supervisor_oom_kills(await unit.metrics()) == 0
        _make_the_oom_killers_first_choice(supervisor)
        if group.made:  # v1: the supervisor alone (the unit's count is the host's there)
            group.add(supervisor)
        group.limit(group.usage() + (1 << 20))
        try:
            # What it answers takes memory: scraped until the kernel kills it.
            async with asyncio.timeout(30):
                for _ in range(2000):
                    if group.oom_kills():
                        break
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        await unit.metrics()
                        await unit.stats()
                while not group.oom_kills():
                    await asyncio.sleep(0.005)
        finally:
            group.limit(None)
        await unit.until(ActiveState="active", NRestarts="1")
        assert unit.main_pid() != supervisor
        async with asyncio.timeout(10):
            while not [e for e in unit.log() if "OOM killer" in e["event"]]:
                await asyncio.sleep(0.1)
        (said,) = [e for e in unit.log() if "OOM killer" in e["event"]]
        if group.made:
            # v1 (or hybrid): the unit's count is the host's, which takes in any
            # process's OOM kill: possibly, said so (the kernel's log unread).
            assert "/proc/vmstat" in said["oom_kills_counted_in"], said
            assert said["event"].startswith(
                "the previous supervisor died, possibly by the kernel's OOM killer"
            ), said
        else:  # the unit's own memory.events
            assert said["event"].startswith(
                "the previous supervisor was killed by the kernel's OOM killer"
            ), said
        assert "MemoryMax=" in said["event"] and said["oom_kills"] >= 1
        metrics = await unit.metrics()
        assert _deaths(metrics) == 1
        assert _supervisor_oom_kills(metrics) == 1
        code, out = unit.cli("stat")
        stat_says = (  # as the journal said it
            "the supervisor died, possibly by the kernel's OOM killer, once"
            if group.made
            else "the supervisor was killed by the kernel's OOM killer once"
        )
        assert code == 0 and stat_says in out, out
        for n, call in enumerate(calls):
            await echo(call, f"after {n}")
    finally:
        await close_calls(calls)
        group.remove()


async def test_a_supervisor_killed_outright_comes_back_serving_what_it_ran_not_the_files(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The supervisor started again after a kill -9 takes up its predecessor's
    last snapshot from the fd store: it serves the certificate that one served,
    not an expired renewal on disk that a reload refused (before, every new
    handshake got the expired certificate: every carrier's new call failed);
    the reload's refusal is still shown, and its counts go on (a fleet's
    checks) rather than start again."""
    unit = await install(systemd, tls_files, fleet)
    call = await a_call(unit, tls_files)
    try:
        served = await unit.peer_serial(tls_files)
        now = datetime.datetime.now(datetime.UTC)
        write_expired_leaf(tls_files, unit.home)
        reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
        assert reloaded.returncode != 0, unit.log_tail()
        assert await unit.peer_serial(tls_files) == served
        async with asyncio.timeout(20):  # probed every 0.2 s
            while (await unit.stats())["fleets"][0]["checks_total"] < 25:
                await asyncio.sleep(0.2)
        # What a scrape shows is in the snapshot before it is answered: killed
        # at once after, no counter goes back (Prometheus would see a reset).
        checks = (await unit.stats())["fleets"][0]["checks_total"]
        scraped = _counters(await unit.metrics())
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        await unit.until(ActiveState="active", NRestarts="1")
        await echo(call, "after the supervisor came back")
        await unit.fleets_up()
        now_scraped = _counters(await unit.metrics())
        went_back = {
            key: (value, now_scraped.get(key))
            for key, value in scraped.items()
            if now_scraped.get(key, 0.0) < value
        }
        assert went_back == {}
        # The workers taken up serve what they served; a worker started now is
        # handed what the supervisor serves. The one holding no call is killed:
        # its replacement serves it too (verified: not the expired one).
        async with asyncio.timeout(10):  # what each worker holds, as it reports it
            while True:
                rows = (await unit.stats())["workers"]
                if sorted(r["calls"] for r in rows) == [0, 1]:
                    break
                await asyncio.sleep(0.1)
        holder = next(r["pid"] for r in rows if r["calls"] > 0)
        idle = next(r["pid"] for r in rows if r["pid"] != holder)
        os.kill(systemd.host_pid(idle), signal.SIGKILL)

        def replaced(rows: list[dict[str, Any]]) -> bool:
            others = [r for r in rows if r["pid"] != holder]
            return [(r["pid"] != idle, r["state"]) for r in others] == [(True, "serving")]

        async with asyncio.timeout(15):
            while not replaced((await unit.stats())["workers"]):
                await asyncio.sleep(0.1)
        assert {await unit.peer_serial(tls_files) for _ in range(12)} == {served}
        stats = await unit.stats()
        assert stats["certificate_not_after"] > now.timestamp() + 86400  # the good one's
        assert stats["last_reload"]["result"] == "refused", stats["last_reload"]
        assert "expired on" in stats["last_reload"]["error"]
        assert stats["fleets"][0]["checks_total"] >= checks
        said = unit.started_again()
        assert len(said) == 1 and "taken up from its last snapshot" in said[0]["event"]
        assert "not the files" in said[0]["event"]
        # A new call, granted by the supervisor that came back.
        fresh = await a_call(unit, tls_files)
        await echo(fresh, "a new call")
        await close_calls([fresh])
    finally:
        await close_calls([call])


REDIALS = 300  # a carrier's redials until it has gone from each worker to the other


async def test_a_carriers_session_resumes_on_either_worker_after_a_supervisor_crash(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The keys the workers seal their session tickets with outlive the
    supervisor (`tls.tickets` in systemd's fd store): the one started again
    after a kill -9 hands them to a worker it starts, so a carrier's session
    (TLS 1.3 or 1.2) from before the crash resumes on it, and each redial
    resumes on whichever of the worker taken up and the new one the kernel
    hands it. Before (the session-ticket audit of session 34) it drew new keys:
    until the next reload a redial onto the other worker was a full handshake
    (0 of 13 resumed). A renewal still brings new keys, and those are the ones
    a second crash keeps."""
    unit = await install(systemd, tls_files, fleet)
    carriers = [tls_files.client_context(), tls_files.client_context()]
    carriers[1].maximum_version = ssl.TLSVersion.TLSv1_2
    offered = [
        await asyncio.to_thread(offer_session, unit.port, ctx, None, unit.workers())
        for ctx in carriers
    ]
    assert [got.answer for got in offered] == [b"HTTP/1.1 200"] * 2, offered
    serial = offered[0].serial

    async def crash_and_replace_one(restarts: int) -> tuple[int, int]:
        """The supervisor killed, then one of the workers it took up: the one
        started again starts a replacement. (The one left, the replacement.)"""
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        await unit.until(ActiveState="active", NRestarts=str(restarts))
        taken_up = sorted(unit.workers())
        assert len(taken_up) == 2
        os.kill(taken_up[0], signal.SIGKILL)
        async with asyncio.timeout(15):
            while True:
                rows = (await unit.stats())["workers"]
                pids = {systemd.host_pid(r["pid"]) for r in rows if r["state"] == "serving"}
                if len(pids) == 2 and taken_up[0] not in pids:
                    break
                await asyncio.sleep(0.1)
        (replacement,) = pids - {taken_up[1]}
        return taken_up[1], replacement

    async def redial_onto_each(workers: tuple[int, int], *, first_resumes: bool) -> None:
        """Each carrier redials, offering its last session, until it has gone
        from each worker to the other: every redial resumed (the first one too,
        unless `first_resumes` is False: a full handshake, into a renewal)."""
        for i, ctx in enumerate(carriers):
            moves: set[tuple[int | None, int | None]] = set()
            # Which worker accepts is the scheduler's choice: on a loaded host the
            # one asleep longest (not the replacement, busy starting) wins every
            # race for a while (60 redials in a row once, beside a CI run), until
            # the accepts it takes make it the busier one.
            for attempt in range(REDIALS):
                got = await asyncio.to_thread(
                    offer_session, unit.port, ctx, offered[i].session, workers
                )
                assert got.answer == b"HTTP/1.1 200" and got.holder in workers, got
                assert got.serial == serial, (i, attempt)
                resumed = first_resumes or attempt > 0
                assert got.resumed == resumed, (i, attempt, got.holder, workers, sorted(moves))
                if attempt:
                    moves.add((offered[i].holder, got.holder))
                offered[i] = got
                if {workers, workers[::-1]} <= moves:
                    break
            else:
                pytest.fail(
                    f"{REDIALS} redials without going from each worker to the other: {moves}"
                )

    await redial_onto_each(await crash_and_replace_one(1), first_resumes=True)
    serial = write_leaf_cert(tls_files.ca, unit.home)
    reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
    assert reloaded.returncode == 0, unit.log_tail()
    left, right = sorted(unit.workers())
    await redial_onto_each((left, right), first_resumes=False)
    await redial_onto_each(await crash_and_replace_one(2), first_resumes=True)
    assert not [e for e in unit.log() if "ticket keys" in e["event"]], unit.log_tail()


async def test_a_restart_keeps_the_certificate_carriers_get_over_an_expired_one_on_disk(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """`systemctl restart` with an expired renewal on disk (one a reload
    refused): the certificate served before the restart serves on, from the
    fd store, and `stat` and /metrics say why until a good one is in place; so too for one
    of another lineage (the sdjourney audit's reproducer). Before, the restart
    served either, and every carrier's new call failed. A stop then a start
    (the store released) reads the files as they are."""
    unit = await install(systemd, tls_files, fleet)
    served = await unit.peer_serial(tls_files)
    now = datetime.datetime.now(datetime.UTC)
    write_expired_leaf(tls_files, unit.home)
    restarted = await asyncio.to_thread(systemd.systemctl, "restart", NAME, check=False)
    assert restarted.returncode == 0, restarted.stderr + unit.log_tail()
    await unit.fleets_up()
    assert await unit.peer_serial(tls_files) == served
    assert not unit.started_again()  # a restart, not a crash
    stats = await unit.stats()
    assert stats["certificate_not_after"] > now.timestamp() + 86400  # the good one's
    assert "expired on" in stats["certificate_file"]["refused"], stats["certificate_file"]
    assert not stats["certificate_file"]["not_served"]  # no renewal a reload would load
    assert stats["last_reload"] is None  # no reload ran
    code, output = await asyncio.to_thread(unit.cli, "stat")
    assert code == 0 and "CERTIFICATE ON DISK REFUSED: tls.cert" in output, output
    assert "a reboot or a stop then a start takes the files as they are" in output
    assert "fleet_ingress_certificate_file_refused 1.0" in await unit.metrics()
    said = [line for line in unit.log() if "certificate on disk is not served" in line["event"]]
    assert len(said) == 1 and said[0]["key"] == "tls.cert", said
    assert "expired on" in said[0]["problem"]
    async with asyncio.timeout(15):  # systemctl status: the status line says so too
        while "CERTIFICATE ON DISK REFUSED" not in unit.show("StatusText")["StatusText"]:
            await asyncio.sleep(0.2)
    call = await a_call(unit, tls_files)
    try:
        await echo(call, "after the restart")
    finally:
        await close_calls([call])
    # A good renewal, reloaded: served, and the refusal is gone.
    renewed = write_leaf_cert(tls_files.ca, unit.home)
    reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
    assert reloaded.returncode == 0, reloaded.stderr + unit.log_tail()
    assert await unit.peer_serial(tls_files) == renewed
    assert (await unit.stats())["certificate_file"]["refused"] is None
    assert "fleet_ingress_certificate_file_refused 0.0" in await unit.metrics()
    # One for names carriers do not dial (another lineage): kept over a restart too.
    write_leaf_cert(tls_files.ca, unit.home, names=("other.example.net",))
    restarted = await asyncio.to_thread(systemd.systemctl, "restart", NAME, check=False)
    assert restarted.returncode == 0, restarted.stderr + unit.log_tail()
    assert await unit.peer_serial(tls_files) == renewed
    assert "none of the names" in (await unit.stats())["certificate_file"]["refused"]
    # A key of another certificate beside it (copied by hand): the unit's check
    # leaves it to the start (before: ExecStartPre failed every try, and the
    # unit), which keeps serving.
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(unit.home / "key.pem")
    restarted = await asyncio.to_thread(systemd.systemctl, "restart", NAME, check=False)
    assert restarted.returncode == 0, restarted.stderr + unit.log_tail()
    assert await unit.peer_serial(tls_files) == renewed
    assert "do not match" in (await unit.stats())["certificate_file"]["refused"]
    # Expired again, then a stop and a start: the files serve, as they are.
    write_expired_leaf(tls_files, unit.home)
    await asyncio.to_thread(systemd.systemctl, "stop", NAME)
    started = await asyncio.to_thread(systemd.systemctl, "start", NAME, check=False)
    assert started.returncode == 0, started.stderr + unit.log_tail()
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        await unit.peer_serial(tls_files)
    # Said: the certificate served is one carriers refuse (before: nothing, as
    # the file was the one served).
    assert "expired on" in (await unit.stats())["certificate_served_refused"]
    assert "fleet_ingress_certificate_file_refused 1.0" in await unit.metrics()


async def test_a_restart_keeps_the_certificate_over_a_renewal_whose_chain_carriers_cannot_follow(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The certificate served in full (leaf and intermediate), then the file holds
    its leaf alone (certbot's cert.pem copied over it; or a chain under a root
    this host does not trust yet): the reload is refused by the unit's check, as
    before. Before, the unit's ExecStartPre refused it too, so a `systemctl
    restart` failed the unit: every call on the host refused. Now the restart
    keeps the chain served (the same leaf: the whole file is judged, the review
    of session 30), and `stat` and the gauge say the file is refused; a stop
    then a start serves the file, and `stat`, `systemctl status` and the gauge
    `fleet_ingress_certificate_chain_doubted` say carriers may fail to verify it."""
    unit = await install(systemd, tls_files, fleet)
    leaf = tls_files.ca.create_child_ca().issue_cert("127.0.0.1", "localhost")
    (unit.home / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(unit.home / "key.pem")
    reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
    assert reloaded.returncode == 0, reloaded.stderr + unit.log_tail()
    served = await unit.peer_serial(tls_files)  # the whole chain: verified
    (unit.home / "cert.pem").write_bytes(leaf.cert_chain_pems[0].bytes())  # the leaf alone
    reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
    assert reloaded.returncode != 0, unit.log_tail()
    code, output = await asyncio.to_thread(unit.cli, "stat")
    assert code == 0 and "CERTIFICATE ON DISK REFUSED: tls.cert holds" in output, output
    assert "CARRIERS MAY FAIL TO VERIFY" not in output  # what is served is whole
    metrics = await unit.metrics()
    assert "fleet_ingress_certificate_file_refused 1.0" in metrics
    assert "fleet_ingress_certificate_chain_doubted 0.0" in metrics
    restarted = await asyncio.to_thread(systemd.systemctl, "restart", NAME, check=False)
    assert restarted.returncode == 0, restarted.stderr + unit.log_tail()
    await unit.fleets_up()
    assert await unit.peer_serial(tls_files) == served
    refused = (await unit.stats())["certificate_file"]["refused"]
    assert refused.startswith("tls.cert holds the server's certificate alone"), refused
    said = [line for line in unit.log() if "certificate on disk is not served" in line["event"]]
    assert len(said) == 1 and "certificate alone" in said[0]["problem"], said
    # The chain warning is of what is served: none.
    assert not [line for line in unit.log() if "may fail to verify" in line["event"]]
    call = await a_call(unit, tls_files)
    try:
        await echo(call, "after the restart")
    finally:
        await close_calls([call])
    # A stop then a start (the store released): the file serves, said.
    await asyncio.to_thread(systemd.systemctl, "stop", NAME)
    started = await asyncio.to_thread(systemd.systemctl, "start", NAME, check=False)
    assert started.returncode == 0, started.stderr + unit.log_tail()
    with pytest.raises(ssl.SSLCertVerificationError):  # the client lacks the intermediate
        await unit.peer_serial(tls_files)
    code, output = await asyncio.to_thread(unit.cli, "stat")
    assert "CARRIERS MAY FAIL TO VERIFY THE CERTIFICATE SERVED: tls.cert holds" in output, output
    assert "CERTIFICATE ON DISK REFUSED" not in output
    metrics = await unit.metrics()
    assert "fleet_ingress_certificate_chain_doubted 1.0" in metrics
    assert "fleet_ingress_certificate_file_refused 0.0" in metrics
    async with asyncio.timeout(15):
        while "CARRIERS MAY FAIL TO VERIFY" not in unit.show("StatusText")["StatusText"]:
            await asyncio.sleep(0.2)


async def test_a_unit_killed_whole_keeps_the_certificate_it_served_for_the_start_after(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """Every process of the unit killed (`systemctl kill -s KILL`): no worker is
    left to take up, so the start systemd makes reads the files, but passes
    over an expired certificate there (a renewal a reload refused) for the one
    its predecessor's crash snapshot says it served."""
    unit = await install(systemd, tls_files, fleet)
    served = await unit.peer_serial(tls_files)
    write_expired_leaf(tls_files, unit.home)
    await asyncio.sleep(SNAPSHOT_EVERY * 1.5)  # a snapshot written since the start
    systemd.systemctl("kill", "-s", "KILL", NAME)
    await unit.until(30, ActiveState="active", NRestarts="1")
    await unit.fleets_up()
    assert await unit.peer_serial(tls_files) == served
    assert not unit.started_again()  # nothing taken up: no crash take-up said
    said = [line for line in unit.log() if "certificate on disk is not served" in line["event"]]
    assert len(said) == 1 and "expired on" in said[0]["problem"], said


async def test_a_restart_whose_start_fails_keeps_the_certificate_for_the_next_try(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """`systemctl restart` with an expired certificate on disk, and workers that
    exit at start this once (planted in a copy of the package): the start
    fails, systemd tries again (Restart=on-failure), and the try still serves
    the certificate served before the restart. Before (the review of
    8601f71): a scrape during the failed start wrote the state in the store
    over, the failed start took it out, and the try served the expired file."""
    copy = systemd.home / "src"
    shutil.copytree(Path(fleet_ingress.__file__).parent, copy / "fleet_ingress")
    unit = await install(systemd, tls_files, fleet, pythonpath=copy)
    served = await unit.peer_serial(tls_files)
    marker = unit.home / "workers-fail"  # writable under the unit (ReadWritePaths)
    module = copy / "fleet_ingress" / "service" / "worker.py"
    text = module.read_text()
    planted = "    pin_failed = _pin_to(cpu) if cpu is not None else None\n"
    assert planted in text, "the planted fault's place moved: update this test"
    fault = (
        f"    if os.path.exists({str(marker)!r}):\n"
        "        __import__('time').sleep(3)  # while the test scrapes\n"
        f"        with contextlib.suppress(OSError):\n            os.unlink({str(marker)!r})\n"
        "        return 3\n"
    )
    module.write_text(text.replace(planted, fault + planted, 1))
    marker.touch()
    write_expired_leaf(tls_files, unit.home)
    restart = systemd.systemctl_in_background("restart", NAME)
    scraped = 0
    async with asyncio.timeout(30):
        while restart.poll() is None:
            with contextlib.suppress(Exception):  # not listening yet, or gone again
                await unit.stats()  # the supervisor answers scrapes while it starts
                scraped += 1
            await asyncio.sleep(0.2)
    assert restart.returncode != 0 and scraped > 0, (restart.returncode, scraped)
    await unit.until(30, ActiveState="active", NRestarts="1")
    await unit.fleets_up()
    assert await unit.peer_serial(tls_files) == served
    assert "expired on" in (await unit.stats())["certificate_file"]["refused"]


async def test_a_restart_moves_the_stats_listener_to_the_ipv6_wildcard(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """listen.stats from "0.0.0.0:PORT" to "[::]:PORT" (a scraper reaching it
    over IPv6), then `systemctl restart`, as a reload's note says to. Before
    (the IPv6 audit of session 33): systemd handed back the IPv4-only socket
    from its store (the stats listener stays there over a stop), taken up as
    bound where configured (both wildcards), and [::1] was refused."""
    need_ipv6_loopback()
    unit = await install(systemd, tls_files, fleet)
    toml = unit.home / "ingress.toml"
    for before, after in (("127.0.0.1", "0.0.0.0"), ("0.0.0.0", "[::]")):
        text = toml.read_text()
        assert f'stats = "{before}:{unit.stats_port}"' in text
        toml.write_text(text.replace(f'stats = "{before}:', f'stats = "{after}:'))
        restarted = await asyncio.to_thread(systemd.systemctl, "restart", NAME, check=False)
        assert restarted.returncode == 0, restarted.stderr + unit.log_tail()
    for host in ("127.0.0.1", "[::1]"):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{unit.stats_port}/stats.json") as r:
                assert r.status == 200 and (await r.json())["fleets"], host
    taken = [line for line in unit.log() if line["event"].startswith("listeners taken from")]
    assert [line["listeners_moved"] for line in taken] == [["listen.stats"], ["listen.stats"]]


async def test_a_supervisor_killed_outright_takes_up_a_listener_on_a_link_local_address(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles
) -> None:
    """listen.wss = "[fe80::10%lo]:PORT" and a fleet at [fe80::10%lo] too, under
    the unit's sandbox; then the supervisor killed: the one systemd starts
    again takes the listener up and serves. Before (the IPv6 audit of session
    33): the unit's `check --before-start` failed ('Address family not
    supported by protocol': if_nameindex needs netlink, which
    RestrictAddressFamilies= refuses), so the unit never started; and after a
    crash the listener handed back read as moved (its zone never matched what
    getsockname gives), its copy was closed and the address bound again while
    the workers taken up still listened there: 'Address already in use' five
    times, the unit failed. The unit runs in the private systemd's own network
    namespace, where the address is added (not the host's)."""
    home = systemd.home / "etc"
    home.mkdir()
    fleet_line = "http://[fe80::10%25lo]:9080 name=a"
    port, _ = await write_run_home(tls_files, home, [fleet_line])
    toml = home / "ingress.toml"
    toml.write_text(toml.read_text().replace('wss = "127.0.0.1:', 'wss = "[fe80::10%lo]:'))
    netns = (
        "NetworkNamespacePath=",  # the box's own, not the host's
        "ExecStartPre=-+/usr/sbin/ip link set lo up",
        "ExecStartPre=-+/usr/sbin/ip addr add fe80::10/64 dev lo nodad",
    )
    write_unit(systemd, home, None, None, netns)
    systemd.systemctl("daemon-reload")
    started = await asyncio.to_thread(systemd.systemctl, "start", NAME, check=False)
    unit = Unit(systemd, home, port, 0)
    assert started.returncode == 0, started.stderr + unit.log_tail()
    inside = ["nsenter", f"--net=/proc/{systemd.pid1}/ns/net", sys.executable, "-c"]
    serve = (
        "import asyncio\n"
        "from fleet_ingress.sim import SimulatedFleet\n"
        "async def main():\n"
        "    await SimulatedFleet(host='fe80::10%lo', port=9080).start()\n"
        "    print('serving', flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    fleet = await asyncio.create_subprocess_exec(*inside, serve, stdout=subprocess.PIPE)

    def ask(path: str) -> str:
        """The status line the listener answers GET `path` (a call's upgrade)."""
        get = (
            "import socket, ssl\n"
            "c = ssl.create_default_context(); c.check_hostname = False; "
            "c.verify_mode = ssl.CERT_NONE\n"
            f"s = c.wrap_socket(socket.create_connection(('fe80::10%lo', {port}), 5))\n"
            f"s.sendall(b'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\n'\n"
            "    b'Connection: Upgrade\\r\\nSec-WebSocket-Version: 13\\r\\n'\n"
            "    b'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n\\r\\n')\n"
            "print(s.recv(4096).split(b'\\r\\n')[0].decode())\n"
        )
        done = subprocess.run([*inside, get], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() + done.stderr[-300:]

    async def a_call_goes_through() -> None:
        async with asyncio.timeout(20):  # the fleet's first passing probe
            while (said := await asyncio.to_thread(ask, "/ws/bot-1")).startswith("HTTP/1.1 503"):
                await asyncio.sleep(0.2)
        assert said == "HTTP/1.1 101 Switching Protocols", said

    try:
        assert fleet.stdout is not None
        async with asyncio.timeout(30):
            assert await fleet.stdout.readline() == b"serving\n"
        await a_call_goes_through()
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        await unit.until(30, ActiveState="active", NRestarts="1")
        (said,) = [line for line in unit.log() if line["event"].startswith("started again")]
        assert said["listeners"] == ["listen.stats", "listen.wss"], said
        assert said["listeners_moved"] == [], said
        assert await asyncio.to_thread(ask, "/haproxy-health") == "HTTP/1.1 200 OK"
        await a_call_goes_through()
    finally:
        fleet.kill()
        await fleet.wait()


async def test_a_supervisor_killed_with_a_broken_edit_on_disk_is_started_again(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """ingress.toml saved broken, not reloaded, then the supervisor killed: the
    unit's ExecStartPre check says what is wrong but lets the supervisor start,
    which takes up the workers with what its predecessor ran. Before (the
    second review of session 28): the check failed every restart, the unit
    reached its start limit and failed, and every new call was refused."""
    unit = await install(systemd, tls_files, fleet)
    call = await a_call(unit, tls_files)
    try:
        toml = unit.home / "ingress.toml"
        toml.write_text(toml.read_text() + "\n[this is not toml\n")
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        await unit.until(ActiveState="active", NRestarts="1")
        await echo(call, "after the restart")
        fresh = await a_call(unit, tls_files)
        await echo(fresh, "a new call")
        await close_calls([fresh])
        said = (unit.home / "stdout.log").read_text() + unit.log_tail(20000)
        assert "process(es) of a supervisor that died still run in this unit" in said
        # A stop, then a start: the files are what a start reads, and refused.
        await close_calls([call])
        stopped = await asyncio.to_thread(systemd.systemctl, "stop", NAME, check=False)
        assert stopped.returncode == 0
        started = await asyncio.to_thread(systemd.systemctl, "start", NAME, check=False)
        assert started.returncode != 0
    finally:
        await close_calls([call])


async def test_a_supervisor_started_after_a_crash_that_cannot_take_up_says_so_and_drains(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """A bug met only in taking up the workers after a crash (planted in a copy
    of the package the unit runs from): the workers stop accepting and drain
    their calls, and the journal says what happened and to report it, not the
    upgrade's "reinstall the release that ran" (there was no upgrade)."""
    copy = systemd.home / "src"
    shutil.copytree(Path(fleet_ingress.__file__).parent, copy / "fleet_ingress")
    unit = await install(systemd, tls_files, fleet, drain=3, pythonpath=copy)
    call = await a_call(unit, tls_files)
    try:
        module = copy / "fleet_ingress" / "service" / "upgrade_sequence.py"
        text = module.read_text()
        planted = "    async def _retire_after_crash(self) -> None:\n"
        assert planted in text, "the planted fault's place moved: update this test"
        module.write_text(
            text.replace(planted, planted + "        raise RuntimeError('planted')\n", 1)
        )
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        async with asyncio.timeout(30):
            while not [e for e in unit.log() if e["level"] == "critical"]:
                await asyncio.sleep(0.2)
        (said,) = [e for e in unit.log() if e["level"] == "critical"]
        assert said["event"].startswith(
            "the supervisor started again after a crash cannot take up its predecessor's workers"
        ), said
        assert "planted" in said.get("exc_info", said.get("traceback", str(said)))
        # The call drains (timeouts.drain 3 s), told why as it ends.
        with pytest.raises(ConnectionClosed) as ended:
            for _ in range(100):
                await echo(call, "draining")
                await asyncio.sleep(0.1)
        assert ended.value.rcvd is not None and ended.value.rcvd.code == 1001
    finally:
        await close_calls([call])


class _PassesThenFails(SimulatedFleet):
    """A fleet whose health passes `passes` probes (add-fleet's pre-check),
    then fails: add-fleet waits for it to read UP, in vain."""

    passes = 1

    async def _health(self, request: web.Request) -> web.Response:
        self.health_status = 200 if self.passes > 0 else 503
        self.passes -= 1
        return await super()._health(request)


async def test_an_operators_fleet_change_holds_over_a_supervisor_killed_just_after_it(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """A fleet drained, then the supervisor killed at once: the one started
    again keeps it drained (its predecessor's snapshot is written as the change
    is made, not up to a second later; the review of session 28 saw it READY
    again, its new calls going to a fleet about to be taken down). A fleet
    being added, not UP yet (not in the fleets file), when the supervisor
    dies: not served by the next one (it was, once UP)."""
    unit = await install(systemd, tls_files, fleet)
    await unit.fleets_up()
    code, said = await asyncio.to_thread(unit.cli, "drain", "a")
    assert code == 0, said
    systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
    await unit.until(ActiveState="active", NRestarts="1")
    assert [(f["name"], f["admin"]) for f in (await unit.stats())["fleets"]] == [("a", "DRAIN")]
    code, said = await asyncio.to_thread(unit.cli, "ready", "a")
    assert code == 0, said

    b = _PassesThenFails(name="b", capacity=16, ssl_context=tls_files.fleet_server_context())
    b.available_override = 1000
    await b.start()
    try:
        adding = asyncio.create_task(
            asyncio.to_thread(unit.cli, "add-fleet", b.url, "--name", "b", timeout=60)
        )
        async with asyncio.timeout(10):  # its pre-check passed, then probed as it is added
            while b.health_probes < 2:
                await asyncio.sleep(0.01)
        fleets = {f["name"] for f in (await unit.stats())["fleets"]}  # a snapshot meanwhile
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        assert fleets == {"a", "b"}, fleets  # the scenario: killed while adding
        code, said = await adding
        assert code != 0, said
        await unit.until(ActiveState="active", NRestarts="2")
        b.passes = 1000
        await unit.fleets_up()
        assert [f["name"] for f in (await unit.stats())["fleets"]] == ["a"]
        assert "name=b" not in (unit.home / "fleets.txt").read_text()
        calls = [await a_call(unit, tls_files) for _ in range(4)]
        await close_calls(calls)
        assert b.calls_total == 0
    finally:
        await b.stop()


async def test_a_worker_whose_channel_was_cut_keeps_its_calls_counted_over_a_supervisor_crash(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """A worker whose channel the supervisor cut drains its calls, their slots
    still counted; the supervisor then dies. The one started again counts them
    too, from its predecessor's snapshot, while that worker runs (its channel is
    in no store). Before (the review of session 28): forgotten, the host counted
    2 calls on a fleet that carried 6, and maxconn could be passed by 4."""
    unit = await install(systemd, tls_files, fleet)
    calls = [await a_call(unit, tls_files) for _ in range(6)]
    try:
        async with asyncio.timeout(10):
            while sum(r["calls"] for r in (await unit.stats())["workers"]) != 6:
                await asyncio.sleep(0.1)
        rows = (await unit.stats())["workers"]
        holder = max(rows, key=lambda r: r["calls"])
        break_worker_channel(systemd.host_pid(holder["pid"]))
        async with asyncio.timeout(10):  # its channel cut, its calls still counted
            while "channel lost" not in next(
                r["state"] for r in (await unit.stats())["workers"] if r["pid"] == holder["pid"]
            ):
                await asyncio.sleep(0.1)
        assert (await unit.stats())["fleets"][0]["active"] == 6 == fleet.active_calls
        await asyncio.sleep(2 * SNAPSHOT_EVERY + 0.5)  # written with its channel lost
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        await unit.until(ActiveState="active", NRestarts="1")
        await unit.fleets_up()
        async with asyncio.timeout(10):
            while (await unit.stats())["fleets"][0]["active"] != 6:
                await asyncio.sleep(0.1)
        assert fleet.active_calls == 6
        for call in calls:
            await echo(call, "after the crash")
        # Killed now (the OOM killer, say), the workers holding calls: systemd's
        # children since the crash, their exit status is not known here. The
        # calls each held are counted lost, as the kill lost them. Before (the
        # second review of session 28): read as "exit 0", a clean drain, none lost.
        rows = (await unit.stats())["workers"]
        killed = [r["pid"] for r in rows if r["calls"] > 0]
        for pid in killed:
            os.kill(systemd.host_pid(pid), signal.SIGKILL)
        try:
            async with asyncio.timeout(10):
                while _lost_and_unknown(await unit.metrics()) != (6, len(killed)):
                    await asyncio.sleep(0.2)
        except TimeoutError:
            counted = _lost_and_unknown(await unit.metrics())
            pytest.fail(f"{counted} for {len(killed)} killed: {rows}")
    finally:
        await close_calls(calls)


def _lines_of(unit: Unit, worker: int) -> list[dict[str, Any]]:
    """The access lines of the calls lost with `worker` (its pid in the unit)."""
    return [e for e in unit.log() if e["event"] == "call ended" and e.get("worker_pid") == worker]


def _deaths(exposition: str) -> float:
    """`fleet_ingress_supervisor_deaths_total` in a /metrics text."""
    return metric_samples(exposition)["fleet_ingress_supervisor_deaths_total"][()]


def _lost_and_unknown(exposition: str) -> tuple[float, float]:
    """Calls lost with workers, and workers gone whose exit status was not
    known (taken up after a supervisor died), in a /metrics text."""
    samples = metric_samples(exposition)
    lost = sum(samples["fleet_ingress_worker_calls_lost_total"].values())
    return lost, samples["fleet_ingress_worker_restarts_total"][(("reason", "unknown"),)]


def _counters(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The ingress's counters in a /metrics text (histograms' buckets, counts and
    sums included) by (sample name, labels): not those of one process (a pid
    label; prometheus-client's process_ and python_ families, whose restarts
    process_start_time_seconds says)."""
    return {
        (name, labels): value
        for name, by_labels in metric_samples(exposition).items()
        if name.startswith("fleet_ingress_")
        and name.endswith(("_total", "_bucket", "_count", "_sum"))
        for labels, value in by_labels.items()
        if "pid" not in dict(labels)
    }


async def test_a_refused_upgrade_and_a_refused_reload_leave_the_unit_serving(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """A broken install: `upgrade` fails, systemd is back to active (READY=1
    after RELOADING=1), the call goes on; installed again, the upgrade goes
    through. A fleets file saved broken: `systemctl reload` fails (ExecReload's
    check), and nothing changes."""
    copy = systemd.home / "src"
    shutil.copytree(Path(fleet_ingress.__file__).parent, copy / "fleet_ingress")
    unit = await install(systemd, tls_files, fleet, pythonpath=copy)
    supervisor = unit.main_pid()
    call = await a_call(unit, tls_files)
    try:
        module = copy / "fleet_ingress" / "core" / "routing.py"
        good = module.read_text()
        module.write_text(good + "\ndef oops(:\n")
        code, said = await asyncio.to_thread(unit.cli, "upgrade", timeout=150)
        assert code == 1 and "SyntaxError" in said, said
        state = unit.show("ActiveState", "SubState", "NRestarts")
        assert state == {"ActiveState": "active", "SubState": "running", "NRestarts": "0"}
        await echo(call, "after the refused upgrade")
        module.write_text(good)
        code, said = await asyncio.to_thread(unit.cli, "upgrade", timeout=150)
        assert code == 0, said + unit.log_tail()
        assert unit.show("ActiveState")["ActiveState"] == "active"
        assert unit.main_pid() == supervisor
        await echo(call, "after the upgrade")

        fleets = unit.home / "fleets.txt"
        fleets.write_text(fleets.read_text() + "not a fleet line\n")
        reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
        assert reloaded.returncode != 0
        state = unit.show("ActiveState", "SubState", "NRestarts")
        assert state == {"ActiveState": "active", "SubState": "running", "NRestarts": "0"}
        await echo(call, "after the refused reload")
    finally:
        await close_calls([call])


async def test_a_channel_the_supervisor_cuts_reaches_its_worker_though_the_fd_store_keeps_a_copy(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """A worker that breaks the protocol has its channel closed by the
    supervisor, and must see it end (it then drains and is replaced): the copy
    of the supervisor's end in systemd's fd store is dropped with it
    (FDSTOREREMOVE). Kept there, it held the channel open: the worker took new
    calls nobody granted a slot."""
    unit = await install(systemd, tls_files, fleet)
    broken = sorted(unit.workers())[0]
    break_worker_channel(broken)
    async with asyncio.timeout(10):
        while not [
            line
            for line in unit.log()
            if line["event"].startswith("the supervisor's slot coordinator is gone")
        ]:
            await asyncio.sleep(0.1)
    # It drains (nothing to drain: it exits) and a new worker takes its place.
    async with asyncio.timeout(15):
        while broken in systemd.processes(NAME) or len(systemd.processes(NAME)) != 3:
            await asyncio.sleep(0.1)
    call = await a_call(unit, tls_files)
    try:
        await echo(call, "served by the workers there are")
    finally:
        await close_calls([call])


@pytest.mark.usefixtures("systemd")  # where one can run (skipped, or failed in CI, if not)
def test_a_test_process_killed_outright_leaves_no_systemd_running() -> None:
    """The box's own safety: a test process killed (SIGKILL, a crashed xdist
    worker, CI's outer timeout) takes its systemd, and the units under it, with
    it (the review of session 27: they ran on, holding loopback ports). What is
    left (its cgroup, its home) is removed here, as the box would have."""
    script = (
        "import sys; from tests import systemd_box\n"
        "box = systemd_box.PrivateSystemd(); box.boot()\n"
        "print(box.pid1, box.cgroup, box.home, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    pid1, cgroup, home = child.stdout.readline().split()
    leftover = systemd_box.PrivateSystemd.__new__(systemd_box.PrivateSystemd)
    leftover.cgroup, leftover.home, leftover.proc = Path(cgroup), Path(home), None
    leftover.pid1 = int(pid1)  # killed by shutdown() whatever happens here
    try:
        assert Path(f"/proc/{pid1}").exists()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid1}").exists():
            assert time.monotonic() < deadline, "its systemd outlived it"
            time.sleep(0.05)
        leftover.pid1 = 0  # gone: its pid may be another process's soon
    finally:
        child.kill()
        child.wait(10)
        leftover.shutdown()
    assert not Path(cgroup).exists()


async def test_a_worker_draining_when_the_supervisor_dies_is_replaced_after_it(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """A worker that had stopped taking calls (a stop of its own, a failed
    upgrade's drain) when the supervisor died is taken up as draining, its calls
    kept, and a new worker starts in its place: counted as serving, the host was
    a worker short until its calls ended (and took no call at all, were all of
    them draining)."""
    unit = await install(systemd, tls_files, fleet)
    calls: list[ClientConnection] = []
    try:
        for _ in range(3):
            calls.append(await a_call(unit, tls_files))
        async with asyncio.timeout(10):
            while True:
                rows = (await unit.stats())["workers"]
                if sum(row["calls"] for row in rows) == 3:
                    break
                await asyncio.sleep(0.1)
        # One that holds calls (the kernel may have given them all to one).
        draining = systemd.host_pid(next(row["pid"] for row in rows if row["calls"]))
        os.kill(draining, signal.SIGTERM)  # a stop of its own: takes no new call, keeps its own
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        await unit.until(30, ActiveState="active", NRestarts="1")
        async with asyncio.timeout(15):  # the same two, and one more in the draining one's place
            while len(unit.workers() - {draining}) != 2:
                await asyncio.sleep(0.1)
        assert draining in systemd.processes(NAME)
        for n, call in enumerate(calls):
            await echo(call, f"kept {n}")
        fresh = await a_call(unit, tls_files)
        calls.append(fresh)
        await echo(fresh, "served")
    finally:
        await close_calls(calls)


async def test_a_crash_as_an_upgrade_starts_its_generation_retires_the_old_one_by_its_drain(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """The supervisor killed while an upgrade's new generation starts: the one
    started again retires the old generation as the upgrade would have, told
    to stop accepting and to keep its calls for timeouts.upgrade_drain (here 0:
    until they end, past timeouts.drain's 3 s). Before (the review of session
    27): left serving, the old generation took new calls, and every call on it
    was cut at timeouts.drain + 5 s."""
    unit = await install(systemd, tls_files, fleet, drain=3)
    toml = unit.home / "ingress.toml"
    text = toml.read_text()
    assert "[timeouts]\n" in text
    toml.write_text(text.replace("[timeouts]\n", "[timeouts]\nupgrade_drain = 0\n"))
    await asyncio.to_thread(systemd.systemctl, "restart", NAME)
    # Renewed on disk, not reloaded: the upgrade's new image serves it, and so
    # does the supervisor started after the crash (the new image's snapshot is
    # written before its generation starts; before, the store still had the
    # previous image's, and the supervisor served the older certificate to
    # every worker it started from then on: the review of session 28).
    renewed_until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=200)
    write_leaf_cert(tls_files.ca, unit.home, not_after=renewed_until)
    # A restart is a stop then a start, though systemd keeps its fd store over
    # it: the edit applies (upgrade_drain, below), and nothing says a crash.
    assert not unit.started_again()
    old = await a_call(unit, tls_files)
    calls = [old]
    try:
        await echo(old, "generation 1")
        upgrade = asyncio.create_task(asyncio.to_thread(unit.cli, "upgrade", timeout=150))
        async with asyncio.timeout(90):  # both workers of generation 2 started
            while len(unit.workers(generation=2)) < 2:
                await asyncio.sleep(0.02)
        systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
        code, output = await upgrade  # killed before it was done: the scenario
        # The supervisor started again knows of it (its predecessor's snapshot).
        assert code == 1 and "the supervisor died during it" in output, output
        await unit.until(30, ActiveState="active", NRestarts="1")
        for _ in range(4):
            calls.append(await a_call(unit, tls_files))
        # The new calls on generation 2 only, as each worker reports what it holds.
        async with asyncio.timeout(10):
            while True:
                rows = (await unit.stats())["workers"]
                by_generation: dict[int, int] = {}
                for row in rows:
                    by_generation[row["generation"]] = (
                        by_generation.get(row["generation"], 0) + row["calls"]
                    )
                if sum(by_generation.values()) == 5:
                    break
                await asyncio.sleep(0.1)
        assert by_generation == {1: 1, 2: 4}, rows
        served_until = (await unit.stats())["certificate_not_after"]
        assert abs(served_until - renewed_until.timestamp()) < 2, (served_until, renewed_until)
        for n in range(12):  # past timeouts.drain (3 s) and the backstop's 5 s more
            for call in calls:
                await echo(call, f"kept {n}")
            await asyncio.sleep(1)
    finally:
        await close_calls(calls)


async def test_a_stop_that_outlasts_timeoutstopsec_leaves_no_worker_running(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """KillMode=process kills the main process alone at TimeoutStopSec: the
    unit's ExecStopPost kills what is left of its workers then (a drain longer
    than the unit waits, a supervisor stuck at stop). Before (the review of the
    fd-store change): the worker drained on, its call counted by no supervisor
    started since (maxconn 2 seen as 4 by the fleet)."""
    unit = await install(systemd, tls_files, fleet, drain=60, service=("TimeoutStopSec=3",))
    call = await a_call(unit, tls_files)
    try:
        await echo(call, "up")
        stopped = await asyncio.to_thread(systemd.systemctl, "stop", NAME, check=False)
        assert stopped.returncode == 0, stopped.stderr
        assert unit.show("Result")["Result"] == "timeout"
        async with asyncio.timeout(5):
            while systemd.processes(NAME):
                await asyncio.sleep(0.1)
    finally:
        await close_calls([call])


async def test_a_full_fd_store_is_said_in_the_log_stat_and_metrics(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """Past FileDescriptorStoreMax= systemd keeps nothing more and says so in its
    journal alone (FDSTORE=1 has no answer): a supervisor that died then took
    down the calls of a worker whose channel was not kept, with nothing said
    before. Its count, read against the unit's limit (`systemctl show`: systemd
    252 sets no $FDSTORE), is what systemd says it keeps; the rest is said."""
    unit = await install(systemd, tls_files, fleet, service=("FileDescriptorStoreMax=4",))
    async with asyncio.timeout(15):
        while not ((await unit.stats()).get("fd_store") or {}).get("not_kept"):
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # the snapshots' first write, the ticket keys: all sent
    store = (await unit.stats())["fd_store"]
    assert store["max"] == 4 and store["kept"] == 4, store
    assert unit.show("NFileDescriptorStore") == {"NFileDescriptorStore": "4"}
    samples = metric_samples(await unit.metrics())
    assert samples["fleet_ingress_fd_store_descriptors"][()] == 4
    assert samples["fleet_ingress_fd_store_max"][()] == 4
    assert samples["fleet_ingress_fd_store_not_kept_total"][()] == store["not_kept"]
    said = [line for line in unit.log() if line["event"].startswith("systemd's fd store is full")]
    assert len(said) == store["not_kept"], said
    code, out = await asyncio.to_thread(unit.cli, "stat")
    assert code == 0 and "systemd's fd store is full (4 of FileDescriptorStoreMax=4" in out, out


async def test_the_fd_store_count_is_systemds_over_an_upgrade_and_a_crash(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """What the supervisor counts as kept is what systemd says it keeps
    (NFileDescriptorStore), as it starts, after an upgrade's exec (carried over
    it) and after a crash (what systemd handed back)."""
    unit = await install(systemd, tls_files, fleet)

    async def counted_as_systemd(timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while True:
            store = (await unit.stats()).get("fd_store") or {}
            shown = int(unit.show("NFileDescriptorStore")["NFileDescriptorStore"])
            if store.get("kept") == shown and store.get("max") == 1024:
                return shown
            assert time.monotonic() < deadline, f"{store} vs {shown}"
            await asyncio.sleep(0.3)

    # Two listeners, two state memfds, the ticket keys, a channel per worker.
    assert await counted_as_systemd() == 7
    code, said = await asyncio.to_thread(unit.cli, "upgrade", timeout=150)
    assert code == 0, said + unit.log_tail()
    assert await counted_as_systemd() >= 7
    supervisor = unit.main_pid()
    systemd.systemctl("kill", "-s", "KILL", "--kill-who=main", NAME)
    await unit.until(timeout=30, ActiveState="active", NRestarts="1")
    assert unit.main_pid() not in (0, supervisor)
    assert await counted_as_systemd() >= 7


async def test_a_raised_fd_store_limit_is_read_at_a_reload_and_what_was_not_kept_stored(
    systemd: systemd_box.PrivateSystemd, tls_files: TLSFiles, fleet: SimulatedFleet
) -> None:
    """`systemctl edit` (its daemon-reload) raises FileDescriptorStoreMax= for the
    running unit at once. The supervisor read it once, at its start: the store
    was said full still, and the workers' channels systemd had not kept stayed
    out of it (their calls ended with a supervisor that died), until a restart,
    which drains every call. A reload reads it again and stores what was not kept."""
    unit = await install(systemd, tls_files, fleet, service=("FileDescriptorStoreMax=4",))
    async with asyncio.timeout(15):
        while not ((await unit.stats()).get("fd_store") or {}).get("not_kept"):
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # the snapshots' first write, the ticket keys: all sent
    assert unit.show("NFileDescriptorStore") == {"NFileDescriptorStore": "4"}
    (systemd.units / f"{NAME}.d" / "zz-raised.conf").write_text(
        "[Service]\nFileDescriptorStoreMax=16\n"
    )
    systemd.systemctl("daemon-reload")
    reloaded = await asyncio.to_thread(systemd.systemctl, "reload", NAME, check=False)
    assert reloaded.returncode == 0, reloaded.stderr + unit.log_tail()
    # Two listeners, two state memfds, the ticket keys, a channel per worker.
    store = (await unit.stats())["fd_store"]
    assert store["max"] == 16 and store["kept"] == 7 and store["unkept"] == 0, store
    assert unit.show("NFileDescriptorStore") == {"NFileDescriptorStore": "7"}
    code, out = await asyncio.to_thread(unit.cli, "stat")
    assert code == 0 and "fd store is full" not in out, out
