"""`fleet-ingress calls` and `end-call` (HAProxy's `show sess` and `shutdown
session`): real processes (a supervisor, two workers, an upgrade's second
generation), real TLS, fleets on loopback, the CLI as an operator runs it.

One ingress for the whole file: each step is a CLI process (0.3-0.5 s) and
the upgrade a few seconds; a fresh ingress each would double that."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleet_ingress.sim import SimulatedFleet
from tests.support import (
    RunningIngress,
    TLSFiles,
    break_worker_channel,
    close_calls,
    echo,
    eventually,
    fleets_up_or_finished,
    run_cli,
)

pytestmark = pytest.mark.uvloop_only


async def _calls(service: RunningIngress, *args: str) -> dict[str, Any]:
    code, out, err = await run_cli(service, "calls", "--json", *args)
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


async def _open(service: RunningIngress, tls_files: TLSFiles, bot: str) -> ClientConnection:
    return await connect(service.url(f"/ws/{bot}"), ssl=tls_files.client_context(), open_timeout=15)


def _ended(service: RunningIngress) -> list[dict[str, Any]]:
    return [e for e in service.log() if e.get("event") == "call ended"]


async def test_calls_lists_the_host_s_calls_and_end_call_cuts_exactly_one(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    a, b = two_fleets
    service = await RunningIngress.start(
        tls_files, [f"{s.url} name={s.name} maxconn=16" for s in two_fleets], check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    calls: list[ClientConnection] = []
    try:
        old = await _open(service, tls_files, "old-0")
        calls.append(old)
        await echo(old, "hello")  # 5 bytes each way
        await asyncio.sleep(1)
        await service.open_on_every_worker(tls_files, calls, 4, bot="new")
        workers = {r["pid"] for r in (await service.stats())["workers"]}
        assert len(workers) == 2

        # -- every call, from both workers, oldest first -------------------------
        listing = await _calls(service)
        rows = listing["calls"]
        assert len(rows) == len(calls)
        assert {r["pid"] for r in rows} == workers
        assert {w["pid"] for w in listing["workers"] if w["answered"]} == workers
        assert rows[0]["bot_id"] == "old-0" and rows[0]["age_s"] >= 1
        assert rows[0]["bytes_from_carrier"] > 0 and rows[0]["bytes_to_carrier"] > 0
        # Oldest first by when each began on the host's one clock; not by
        # `age_s`, which each worker reads at its own moment (two calls begun
        # a few ms apart on two workers may read in either order).
        starts = [r["started_monotonic"] for r in rows]
        assert starts == sorted(starts)
        assert {r["bot_id"] for r in rows[1:]} == {f"new-{i}" for i in range(len(calls) - 1)}
        assert {r["state"] for r in rows} == {"tunnel"}
        assert {r["route"] for r in rows} == {"/ws/"}
        assert {r["client_ip"] for r in rows} == {"127.0.0.1"}
        assert {r["generation"] for r in rows} == {1}
        # PID-N-TAG: a tag a worker, 4 characters.
        tags = {r["pid"]: r["id"].split("-")[2] for r in rows}
        assert {len(t) for t in tags.values()} == {4}, tags
        assert [r["id"] for r in rows] == [
            f"{r['pid']}-{r['call_id']}-{tags[r['pid']]}" for r in rows
        ]
        on = {s.name: sum(r["fleet"] == s.name for r in rows) for s in two_fleets}
        assert on == {"a": a.active_calls, "b": b.active_calls}

        # -- filters ----------------------------------------------------------------
        # Calls only age: a call older than the threshold in the listing before
        # is in this one, and each in it is older than the threshold as read.
        # (Which new call is past it depends on how long this CLI took to start.)
        halfway = (rows[0]["age_s"] + max(r["age_s"] for r in rows[1:])) / 2
        longer = (await _calls(service, "--longer-than", f"{halfway:.1f}"))["calls"]
        assert {r["id"] for r in rows if r["age_s"] > halfway} <= {r["id"] for r in longer}
        assert longer[0]["id"] == rows[0]["id"]
        assert all(r["age_s"] >= round(halfway, 1) for r in longer), (halfway, longer)
        assert (await _calls(service, "--longer-than", "3600"))["calls"] == []
        fleet = rows[0]["fleet"]
        by_fleet = (await _calls(service, "--fleet", fleet))["calls"]
        assert {r["id"] for r in by_fleet} == {r["id"] for r in rows if r["fleet"] == fleet}
        assert (await _calls(service, "--bot", "nobody"))["calls"] == []

        # -- the text an operator reads ------------------------------------------
        code, out, err = await run_cli(service, "calls")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["id", "gen", "age", "state"]
        assert lines[1].split()[0] == rows[0]["id"]
        assert f"{len(calls)} calls (2 workers); oldest first" in out

        # -- end-call: that call, no other ----------------------------------------
        victim = next(r for r in rows[1:] if r["pid"] != rows[0]["pid"])
        victim_ws = next(
            ws
            for ws in calls
            if ws.request is not None and ws.request.path.endswith(victim["bot_id"])
        )
        victim_sim = a if victim["fleet"] == "a" else b
        before = victim_sim.active_calls
        # Ids that name the victim's pid and number but not its process: what an
        # access line's `process` and `call_id` give (`PID-N`), and a listing's
        # of a process gone whose pid came back (another tag). Refused, exit 1;
        # on main `PID-N` cut the live call (the review of session 36).
        bare = f"{victim['pid']}-{victim['call_id']}"
        code, out, err = await run_cli(service, "end-call", bare)
        assert code == 1 and f"call {bare}: give its whole id, PID-N-TAG" in err, (out, err)
        other = "zzzz" if tags[victim["pid"]] != "zzzz" else "yyyy"
        code, out, err = await run_cli(service, "end-call", f"{bare}-{other}")
        assert code == 1, (out, err)
        assert f"no live call {bare}-{other}: the process it ran in is gone" in err, err
        assert f"its calls are named {victim['pid']}-N-{tags[victim['pid']]}" in err, err
        await echo(victim_ws)  # untouched
        code, out, err = await run_cli(
            service, "end-call", victim["id"], "--reason", "stuck, ticket 42"
        )
        assert code == 0, err
        assert f"ended call {victim['id']}" in out and "bot " + victim["bot_id"] in out
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                await victim_ws.recv()
        assert (victim_ws.close_code, victim_ws.close_reason) == (1001, "ended by operator")
        others = [ws for ws in calls if ws is not victim_ws]
        for ws in others:
            await echo(ws)  # every other call's frames flow on
        await eventually(lambda: victim_sim.active_calls == before - 1, 5)
        await eventually(lambda: any(e.get("end_reason") == "admin" for e in _ended(service)), 5)
        (line,) = [e for e in _ended(service) if e.get("end_reason") == "admin"]
        assert (line["process"], line["call_id"]) == (victim["pid"], victim["call_id"])
        assert line["call"] == victim["id"]  # the id end-call takes, whole
        assert line["bot_id"] == victim["bot_id"] and line["detail"] == "stuck, ticket 42"
        async with asyncio.timeout(5):  # its fleet slot is back
            while sum(f["active"] for f in (await service.stats())["fleets"]) != len(others):
                await asyncio.sleep(0.1)
        after = await _calls(service)
        assert {r["id"] for r in after["calls"]} == {r["id"] for r in rows} - {victim["id"]}

        # -- an id no live call has: exit 1, named, and how to list them ----------
        for gone in (victim["id"], "1-1", "not-an-id"):  # its worker's; no worker's; no id
            code, out, err = await run_cli(service, "end-call", gone)
            assert code == 1, (gone, out, err)
            assert repr(gone) in err or gone in err, err
            assert "fleet-ingress calls" in err, err

        # -- an upgrade: both generations' calls are listed ------------------------
        calls.remove(victim_ws)
        code, out, err = await run_cli(service, "upgrade", timeout=150, installed=True)
        assert code == 0, out + err
        started = time.monotonic()
        calls.append(await _open(service, tls_files, "after-upgrade"))
        listing = await _calls(service)
        gens = {r["bot_id"]: r["generation"] for r in listing["calls"]}
        assert gens["after-upgrade"] == 2 and gens["old-0"] == 1, gens
        assert len(gens) == len(calls)
        assert listing["calls"][0]["bot_id"] == "old-0"
        assert time.monotonic() - started < 10
    finally:
        await close_calls(calls)
        await service.finish()


async def test_end_call_of_a_worker_whose_channel_was_lost_says_so(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """A worker whose slot channel was lost runs on with its calls but cannot
    be told: end-call of one of them says that, not "no worker of this
    ingress is pid N" (which sent the operator looking for another process),
    and the call goes on."""
    a = two_fleets[0]
    service = await RunningIngress.start(
        tls_files, [f"{a.url} name=a maxconn=4"], workers=1, check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    calls: list[ClientConnection] = []
    try:
        calls.append(await _open(service, tls_files, "kept"))
        (row,) = (await _calls(service))["calls"]
        break_worker_channel(row["pid"])

        def lost() -> bool:
            return any(
                e["event"].startswith("worker's slot channel was lost while it runs")
                for e in service.log()
            )

        await eventually(lost, 10)
        listing = await _calls(service)
        assert listing["channel_lost"] == [row["pid"]] and listing["calls"] == []
        code, out, err = await run_cli(service, "end-call", row["id"])
        assert code == 1, (out, err)
        assert f"pid {row['pid']}) lost its channel" in err, err
        assert "no worker of this ingress" not in err, err
        await echo(calls[0])  # the call goes on
    finally:
        await close_calls(calls)
        await service.finish()


async def test_calls_of_a_fleet_the_host_does_not_have_is_refused_naming_the_fleets(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """`calls --fleet f1x` (a typo) answered "0 calls on fleet f1x", exit 0:
    to an operator asking whether a fleet still carries calls before a
    `remove-fleet --force` or a host's reboot, a wrong answer. Refused as
    drain and remove-fleet refuse the name, naming the fleets; a fleet of the
    host with no call is still "0 calls", exit 0."""
    service = await RunningIngress.start(
        tls_files, [f"{s.url} name={s.name}" for s in two_fleets], workers=1, check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    calls: list[ClientConnection] = []
    try:
        calls.append(await _open(service, tls_files, "bot-1"))
        await echo(calls[0])
        fleet = (await _calls(service))["calls"][0]["fleet"]
        idle = "b" if fleet == "a" else "a"

        code, out, err = await run_cli(service, "calls", "--fleet", f"{fleet}x")
        assert (code, out) == (1, ""), (code, out, err)
        assert err == (
            f"fleet-ingress: no fleet named '{fleet}x' (fleets: a, b); `fleet-ingress stat` "
            "lists them\n"
        )
        code, out, err = await run_cli(service, "calls", "--fleet", idle)
        assert code == 0, err
        assert f"0 calls on fleet {idle} (1 worker); oldest first" in out
        assert [r["bot_id"] for r in (await _calls(service, "--fleet", fleet))["calls"]] == [
            "bot-1"
        ]
        await echo(calls[0])  # asked about, untouched
    finally:
        await close_calls(calls)
        await service.finish()


async def test_calls_of_a_long_bot_id_the_ingress_carries_are_listed(
    tls_files: TLSFiles, two_fleets: list[SimulatedFleet]
) -> None:
    """A bot id of 3,000 characters (a token in the path: the request head holds
    limits.max_header_bytes, 16 KiB by default) is carried; `calls --bot` of it
    was refused "a bot id of 3000 characters is more than --bot asks for (2048
    at most)", exit 2, though the admin socket reads it whole, and one of
    257 to 2048 answered 0 calls: the filter compared it with the 256
    characters a listing shows (the review of session 38). Listed by the whole
    id or the part shown; one past what the admin socket's request line holds
    once written in the query is still refused by the command."""
    service = await RunningIngress.start(
        tls_files, [f"{s.url} name={s.name}" for s in two_fleets], workers=1, check_timeout=5
    )
    service = await fleets_up_or_finished(service)
    calls: list[ClientConnection] = []
    bot = "t" * 3000
    try:
        calls.append(await _open(service, tls_files, bot))
        await echo(calls[0])
        # The whole id, or what a listing shows of it (its first 256 characters).
        shown = bot[:256]
        assert [r["bot_id"] for r in (await _calls(service))["calls"]] == [shown]
        assert [r["bot_id"] for r in (await _calls(service, "--bot", bot))["calls"]] == [shown]
        assert [r["bot_id"] for r in (await _calls(service, "--bot", shown))["calls"]] == [shown]
        assert (await _calls(service, "--bot", bot[:300]))["calls"] == []
        code, out, err = await run_cli(service, "calls", "--bot", "é" * 3000)  # 18,000 bytes quoted
        assert (code, out) == (2, ""), (code, out, err)
        assert "argument --bot: a bot id of 3000 characters" in err and "Got more" not in err, err
        await echo(calls[0])
    finally:
        await close_calls(calls)
        await service.finish()
