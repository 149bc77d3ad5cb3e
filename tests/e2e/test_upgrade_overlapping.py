"""An independent end-to-end check of #14's upgrade promise (session 37), in
shapes tests/e2e/test_upgrade.py does not take: 20 ms binary frames each
way with sequence numbers checked for order, upgrades and SIGHUP reloads
overlapping, a broken install whose fault is in
one of the supervisor's new modules, and the operator's end-call and
remove-fleet --force on an old generation during its drain.

Two upgrades 5 s apart under 150 such calls on 3 workers (three generations
side by side) were checked too, in session 37 (upgrade37: 354 calls, 462,332
frames each way, nothing lost or reordered, no counter going down in 43
scrapes), and not kept here: about a minute of both CPUs, which CI's time
cannot carry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.test_upgrade import PATIENT_PROBES, _copy_package, _handshake_failures
from tests.support import (
    RunningIngress,
    TLSFiles,
    eventually,
    run_cli,
)

# Alone: each test streams 20 ms frames through upgrades and reloads from one
# process, which a host loaded by other tests starves. The 1006 of session 37
# (one run in four beside other tests) was that: a close reply not read within
# websockets' 10 s close_timeout (CLOSE_TIMEOUT below now); the ingress logs such
# a call 'carrier closed', the carrier's own end, nothing cut (session 38: the
# fleets' process stopped 12 s as a carrier closed gives exactly that 1006, and
# 1000 with 60 s). Still alone: starved past the ingress's own bounds (a TLS
# handshake within timeouts.request, 10 s, counted and asserted 0 here;
# carrier_silence, 30 s), the product answers
# as it should and the test reads that as a failure (seen at load 15-24). Not `pair`:
# two at a time (beside each other and test_clocks.py's) they failed in 3 runs of 3
# (handshakes timed out, frames lost); one at a time all 4 passed (session 50, load 13-18).
# The suite's 120 s is less than the upgrade alone may take on a loaded host
# (UPGRADE_WAIT): 300 s, these tests' own bound.
pytestmark = [pytest.mark.uvloop_only, pytest.mark.alone, pytest.mark.timeout(300)]

FRAME = 160  # 20 ms of 8 kHz mu-law
EVERY = 0.020
HEAD = struct.Struct(">I")
# The carriers' own clocks, not what is checked: websockets' defaults (a 10 s
# close_timeout, a keepalive ping every 20 s answered within 20 s) read a
# stalled test process as the peer's fault. On a shared host at load 15-24
# (session 38) this process stalled over 20 s at once: 20 calls on all three
# workers and both fleets failed their ping in the same instant, everything
# echoed, the ingress logging each 'carrier closed' (the carrier's own end);
# a close reply not read within 10 s reads as 1006. A close frame missing, or
# a connection ended without one, still fails: a TCP end shows 1006 at once.
CLOSE_TIMEOUT = 60.0
# `upgrade` is waited for long: on a loaded host the trial run took over 90 s
# (session 38; 92 s beside the upgrade tests, session 44), and a 60 s wait here
# failed first, the product's answer never read. The trial is now judged by its
# CPU time (service.upgrade.TrialProgress), its wall bound (600 s) past these
# tests' own 300 s: `upgrade` itself waits as long as the trial makes progress.
UPGRADE_WAIT = 240.0


@pytest.fixture
async def fleets(tls_files: TLSFiles, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Two TLS fleets (capacity 400) in a child process: this test's 150+
    carriers at 50 frames a second each way would starve the fleets' health
    answers in its own event loop (a fleet DOWN, calls answered 503, on the
    shared 2-core host of session 37). Their fleets-file lines at maxconn 300."""
    pem = tmp_path / "fleet.pem"
    tls_files.fleet_cert.private_key_and_cert_chain_pem.write_to_path(pem)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("fleets_child.py")),
        str(pem),
        "ab",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    lines = []
    async with asyncio.timeout(20):
        while (line := (await child.stdout.readline()).decode().strip()) != "ready":
            assert line, "the fleets' child exited"
            name, url = line.split()
            lines.append(f"{url} name={name} maxconn=300")
    try:
        yield lines
    finally:
        child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 10)
        except TimeoutError:
            child.kill()
            await child.wait()


async def open_calls(service: RunningIngress) -> int:
    return int((await service.stats())["frontend"]["active_calls"])


async def until_open(service: RunningIngress, n: int, timeout: float) -> int:
    async with asyncio.timeout(timeout):
        while (now := await open_calls(service)) < n:
            await asyncio.sleep(0.1)
    return now


@dataclass
class Streamed:
    """One carrier call: 160-byte frames every 20 ms, seq in the first 4 bytes."""

    bot: str
    error: str | None = None
    sent: int = 0
    echoed: int = 0
    out_of_order: int = 0  # an echo whose seq is not the one after the last
    corrupt: int = 0
    close_code: int | None = None
    ended_at: float = 0.0
    connected_at: float = 0.0
    # Seconds from our close frame to the connection's end: a 1006 near
    # CLOSE_TIMEOUT is a reply that came late, one well under it a connection
    # ended without a close frame.
    close_s: float | None = None

    @property
    def lost(self) -> int:
        return self.sent - self.echoed


def _frame(seq: int) -> bytes:
    return HEAD.pack(seq) + bytes((seq + i) & 0xFF for i in range(FRAME - HEAD.size))


async def stream_call(
    service: RunningIngress,
    tls_files: TLSFiles,
    bot: str,
    duration: float,
    until: asyncio.Event | None = None,
) -> Streamed:
    """`duration` s of frames; with `until`, frames until it is set (`duration`
    at most): a loaded host's carriers may fall behind the 20 ms clock, and a
    call meant to span an upgrade must not end early for it."""
    result = Streamed(bot)
    try:
        ws = await connect(
            service.url(f"/ws/{bot}"),
            ssl=tls_files.client_context(),
            open_timeout=20,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=None,
        )
    except Exception as exc:
        result.error = f"connect: {type(exc).__name__}: {exc}"
        return result
    loop = asyncio.get_running_loop()
    expected = 0
    all_echoed = asyncio.Event()
    frames = max(1, round(duration / EVERY))

    async def read() -> None:
        nonlocal expected
        with contextlib.suppress(ConnectionClosed):
            async for msg in ws:
                if not isinstance(msg, bytes) or len(msg) != FRAME:
                    result.corrupt += 1
                    continue
                (seq,) = HEAD.unpack_from(msg)
                if seq != expected:
                    result.out_of_order += 1
                elif msg != _frame(seq):
                    result.corrupt += 1
                expected = seq + 1
                result.echoed += 1
                if result.echoed == frames:
                    all_echoed.set()

    reader = loop.create_task(read())
    try:
        async with asyncio.timeout(duration + 20 + CLOSE_TIMEOUT):
            t0 = loop.time()
            result.connected_at = time.monotonic()
            for seq in range(frames):
                if until is not None and until.is_set():
                    frames = seq
                    if result.echoed == frames:
                        all_echoed.set()
                    break
                if (delay := t0 + seq * EVERY - loop.time()) > 0:
                    await asyncio.sleep(delay)
                await ws.send(_frame(seq))
                result.sent += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await all_echoed.wait()
            closing = time.monotonic()
            await ws.close(1000)
            result.close_s = round(time.monotonic() - closing, 2)
            await reader
    except (ConnectionClosed, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        reader.cancel()
        await ws.close()
    result.close_code = ws.close_code
    result.ended_at = time.monotonic()
    if result.error is None and result.close_code != 1000:
        result.error = f"closed {ws.close_code} {ws.close_reason} (close took {result.close_s}s)"
    return result


async def _calls(service: RunningIngress) -> dict[str, Any]:
    code, out, err = await run_cli(service, "calls", "--json")
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def _generations(listing: dict[str, Any]) -> dict[int, int]:
    """{generation: calls listed} from `fleet-ingress calls --json`."""
    of = {w["pid"]: w["generation"] for w in listing["workers"]}
    counts: dict[int, int] = {}
    for call in listing["calls"]:
        gen = of[call["pid"]]
        assert call["generation"] == gen, (call, of)  # the worker's word and the supervisor's
        counts[gen] = counts.get(gen, 0) + 1
    return counts


# ~60 s on a shared 2-core host: 190+ carriers at 50 frames a second each way
# take the CPUs (the carriers fall behind their 20 ms clock; nothing is lost).
def _signal(service: RunningIngress, sig: signal.Signals) -> None:
    service.proc.send_signal(sig)


@dataclass
class Traffic:
    """`n` calls streaming until `end()`, new 0.4 s calls every 50 ms (200 at most)."""

    service: RunningIngress
    tls_files: TLSFiles
    calls: dict[str, asyncio.Task[Streamed]] = field(default_factory=dict)
    _end: asyncio.Event = field(default_factory=asyncio.Event)
    _arriving: asyncio.Task[None] | None = None

    def call(self, bot: str, duration: float, held: bool = False) -> None:
        until = self._end if held else None
        self.calls[bot] = asyncio.get_running_loop().create_task(
            stream_call(self.service, self.tls_files, bot, duration, until)
        )

    async def start(self, n: int, prefix: str = "long") -> None:
        for i in range(n):
            self.call(f"{prefix}-{i}", 90.0, held=True)
            await asyncio.sleep(EVERY)
        await until_open(self.service, n, timeout=30)

        async def arrive() -> None:
            for i in range(200):
                if self._end.is_set():
                    return
                self.call(f"new-{i}", 0.4)
                await asyncio.sleep(0.05)

        if self._arriving is None:
            self._arriving = asyncio.get_running_loop().create_task(arrive())

    async def end(self) -> list[Streamed]:
        self._end.set()
        if self._arriving is not None:
            await self._arriving
        async with asyncio.timeout(100):
            return list(await asyncio.gather(*self.calls.values()))

    async def cancel(self) -> None:
        self._end.set()
        for t in [*self.calls.values(), *([self._arriving] if self._arriving else [])]:
            t.cancel()
        await asyncio.gather(*self.calls.values(), return_exceptions=True)


def _assert_streamed(results: list[Streamed], *, cut: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """Nothing failed, lost or reordered but the calls named in `cut`."""
    failed = [(r.bot, r.error) for r in results if r.error and r.bot not in cut]
    lost = sum(r.lost for r in results if r.bot not in cut)
    reordered = sum(r.out_of_order for r in results)
    corrupt = sum(r.corrupt for r in results)
    said = (
        f"{len(results)} calls, {sum(r.sent for r in results)} frames; failed {len(failed)}, "
        f"lost {lost}, reordered {reordered}, corrupt {corrupt}"
    )
    assert not failed, f"{said}: {failed[:5]}"
    assert (lost, reordered, corrupt) == (0, 0, 0), said
    return said


def _upgrade(service: RunningIngress) -> asyncio.Task[tuple[int, str, str]]:
    return asyncio.get_running_loop().create_task(
        run_cli(service, "upgrade", timeout=UPGRADE_WAIT, installed=True)
    )


def _set_maxconn(service: RunningIngress, maxconn: int) -> None:
    path = service.home / "fleets.txt"
    path.write_text(re.sub(r"maxconn=\d+", f"maxconn={maxconn}", path.read_text()))


async def _maxconns(service: RunningIngress) -> set[int]:
    return {f["maxconn"] for f in (await service.stats())["fleets"]}


@pytest.mark.parametrize("first", ["sighup", "upgrade"])
async def test_an_upgrade_and_a_sighup_reload_overlapping_lose_nothing_and_both_apply(
    tls_files: TLSFiles, fleets: list[str], first: str, tmp_path: Path
) -> None:
    """A SIGHUP (fleets at maxconn 250 in the file) and `upgrade`, either
    first, the other sent while it runs: the upgrade succeeds (or says it
    was refused, and a second one succeeds), the reload is applied on the
    generation serving after, and the calls through both lose nothing."""
    src = _copy_package(tmp_path)
    # Each workers' reload round takes 2 s more: a reload still under way...
    marks = tmp_path / "reloads"
    rounds = src / "fleet_ingress" / "service" / "reload_rounds.py"
    anchor = "        self._reload_rounds += 1\n"
    text = rounds.read_text()
    assert text.count(anchor) == 1
    rounds.write_text(
        text.replace(
            anchor,
            anchor
            + f"        open({str(marks)!r}, 'a').write('round\\n')\n"
            + "        await __import__('asyncio').sleep(2.0)\n",
        )
    )
    # ... and the upgrade waits 3 s between its trial run and the exec: the
    # reload's round ends while the upgrade is under way, in either order
    # (SIGHUP first: the round began before the trial, which takes a second or
    # more, then 3 s to the exec; upgrade first: the SIGHUP as the trial began,
    # its 2 s round ends within the 3 s after the trial). Session 37's 4 s and
    # 6 s kept the same order with 10 s more of the alone phase's time.
    sequence = src / "fleet_ingress" / "service" / "upgrade_sequence.py"
    anchor = '''        """From the trial run passed to the exec, or why not."""\n'''
    text = sequence.read_text()
    assert text.count(anchor) == 1
    sequence.write_text(
        text.replace(anchor, anchor + "        await __import__('asyncio').sleep(3.0)\n")
    )
    env = {"PYTHONPATH": str(src), **PATIENT_PROBES}
    service = await RunningIngress.start(tls_files, fleets, workers=3, drain=60, env=env)
    traffic = Traffic(service, tls_files)
    stderr_log = service.home / "stderr.log"
    try:
        await traffic.start(30)
        _set_maxconn(service, 250)
        if first == "sighup":
            service.proc.send_signal(signal.SIGHUP)
            await eventually(marks.exists, timeout=10)  # the round under way
            upgrading = _upgrade(service)
        else:
            upgrading = _upgrade(service)
            await eventually(
                lambda: "trial run of the installed code" in stderr_log.read_text(), timeout=20
            )
            service.proc.send_signal(signal.SIGHUP)
        code, out, err = await upgrading
        tries = 1
        if code != 0:
            print(f"\nfirst upgrade said {code}: {out}{err}")
            await asyncio.sleep(1.0)
            code, out, err = await _upgrade(service)
            tries = 2
        assert code == 0, (out, err)
        assert "generation 2 serves" in out, out
        # The reload applied on the generation serving after (it was a fixed
        # second's wait): never applied, maxconn stays 300 and this times out.
        async with asyncio.timeout(10):
            while (maxconns := await _maxconns(service)) != {250}:
                await asyncio.sleep(0.1)
        rows = (await service.stats())["workers"]
        results = await traffic.end()
        said = _assert_streamed(results)
        assert await _handshake_failures(service) == 0
        events = [
            e["event"]
            for e in service.log()
            if "reload" in e.get("event", "") or "upgrade" in e.get("event", "")
        ]
        print(f"\n{first} first: {said}; upgrade tries {tries}; maxconn after {maxconns}")
        print("  " + "\n  ".join(events[:20]))
        assert maxconns == {250}, maxconns
        # systemd is not told READY=1 while the upgrade is under way: the first
        # READY=1 after the upgrade's RELOADING=1 is the new image's (MAINPID=).
        told = service.messages
        began = next(i for i, m in enumerate(told) if "STATUS=upgrading" in m)
        first_ready = next(m for m in told[began:] if "READY=1" in m.splitlines())
        assert "MAINPID=" in first_ready, told[began:]
        assert {r["generation"] for r in rows} == {1, 2}, rows
    finally:
        await traffic.cancel()
        await service.finish()


async def test_an_upgrade_into_an_install_whose_worker_calls_module_fails_to_import(
    tls_files: TLSFiles, fleets: list[str], tmp_path: Path
) -> None:
    """An ImportError planted in service/worker_calls.py (one of the modules
    the supervisor was split into) of the install the service runs from:
    `upgrade` exits 1 naming the error and the file, generation 1 serves on,
    untouched, its calls lose nothing."""
    src = _copy_package(tmp_path)
    env = {"PYTHONPATH": str(src), **PATIENT_PROBES}
    service = await RunningIngress.start(tls_files, fleets, workers=3, drain=30, env=env)
    traffic = Traffic(service, tls_files)
    try:
        before = [(r["pid"], r["generation"]) for r in (await service.stats())["workers"]]
        broken = src / "fleet_ingress" / "service" / "worker_calls.py"
        future = "from __future__ import annotations\n"
        text = broken.read_text()
        assert text.count(future) == 1
        planted = "from fleet_ingress.core.call_list import NoSuchName37\n"
        broken.write_text(text.replace(future, future + planted))
        await traffic.start(30)
        started = time.monotonic()
        code, out, err = await run_cli(service, "upgrade", timeout=UPGRADE_WAIT, installed=True)
        took = time.monotonic() - started
        await asyncio.sleep(0.5)
        results = await traffic.end()
        said = _assert_streamed(results)
        print(f"\nbroken install: upgrade exit {code} in {took:.1f}s; {said}\n{err}")
        assert code == 1, (out, err)
        assert "upgrade abandoned, generation 1 serves on" in err, err
        assert "ImportError" in err and "NoSuchName37" in err, err
        assert "worker_calls" in err, err
        after = [(r["pid"], r["generation"]) for r in (await service.stats())["workers"]]
        assert after == before
        assert not [e for e in service.log() if "re-executing" in e.get("event", "")]
        assert service.proc.returncode is None
        assert await _handshake_failures(service) == 0
        one = await stream_call(service, tls_files, "after", 0.4)
        assert one.error is None and one.lost == 0
    finally:
        await traffic.cancel()
        await service.finish()


async def test_end_call_and_remove_fleet_force_on_an_old_generation_during_its_drain(
    tls_files: TLSFiles, fleets: list[str]
) -> None:
    """After an upgrade, with generation 1 draining 30 calls: `end-call` of one
    of its calls ends that call only; `remove-fleet b --force` closes b's
    calls on both generations and leaves a's streaming, nothing lost there;
    generation 1 then exits once its last call ends."""
    service = await RunningIngress.start(tls_files, fleets, workers=3, drain=60, env=PATIENT_PROBES)
    traffic = Traffic(service, tls_files)
    try:
        gen1 = {r["pid"] for r in (await service.stats())["workers"]}
        t0 = time.monotonic()
        await traffic.start(30)
        t1 = time.monotonic()
        code, out, err = await run_cli(service, "upgrade", timeout=UPGRADE_WAIT, installed=True)
        assert code == 0, (out, err)
        print(f"\n30 calls open in {t1 - t0:.1f}s, upgrade {time.monotonic() - t1:.1f}s")
        for i in range(10):
            traffic.call(f"two-{i}", 90.0, held=True)
            await asyncio.sleep(EVERY)
        await until_open(service, 40, timeout=20)
        listing = await _calls(service)
        old = [
            c for c in listing["calls"] if c["generation"] == 1 and c["bot_id"].startswith("long")
        ]
        assert len(old) == 30, _generations(listing)
        victim = old[0]
        code, printed, err = await run_cli(service, "end-call", victim["id"])
        assert code == 0, (printed, err)
        victim_result = await asyncio.wait_for(traffic.calls[victim["bot_id"]], 10)
        on_b = {  # the held calls on b (a short one listed may end by itself before)
            c["bot_id"]
            for c in (await _calls(service))["calls"]
            if c["fleet"] == "b" and not c["bot_id"].startswith("new-")
        }
        gens_b = {c["generation"] for c in (await _calls(service))["calls"] if c["fleet"] == "b"}
        t0 = time.monotonic()
        code, printed, err = await run_cli(service, "remove-fleet", "b", "--force")
        print(f"\nremove-fleet --force took {time.monotonic() - t0:.1f}s: {printed}{err}")
        assert code == 0, (printed, err)
        # Until none of b's is listed (it was a fixed second's wait): a call of b's
        # left open on either generation keeps it listed, and this times out.
        async with asyncio.timeout(10):
            while True:
                left = await _calls(service)
                if not any(c["fleet"] == "b" for c in left["calls"]):
                    break
                await asyncio.sleep(0.2)
        results = await traffic.end()
        # b's calls listed before the removal, and short ones that came since.
        removed = {
            r.bot for r in results if r.close_code == 1001 and "fleet removed" in str(r.error)
        }
        ended = {e["bot_id"]: e for e in service.log() if e.get("event") == "call ended"}
        assert on_b <= removed, {r.bot: (r.error, r.close_code) for r in results if r.bot in on_b}
        assert all(ended[bot]["fleet"] == "b" for bot in removed)
        cut = removed | {victim["bot_id"]}
        print(f"\nremoved: ended {sorted({ended[b]['end_reason'] for b in removed})}")
        said = _assert_streamed(results, cut=cut)
        cut_results = {r.bot: r for r in results if r.bot in on_b}
        fleets_left = sorted({str(c["fleet"]) for c in left["calls"]})  # None: still connecting
        print(
            f"\nend-call {victim['id']}: carrier saw {victim_result.close_code} "
            f"{victim_result.error}; remove-fleet --force b: {len(on_b)} calls on b "
            f"(generations {gens_b}), "
            f"closes {sorted({r.close_code for r in cut_results.values()})}; "
            f"listed after: {len(left['calls'])} on {fleets_left}; "
            f"others: {said}"
        )
        assert victim_result.error is not None  # its carrier was closed, not by itself
        assert all(r.error is not None for r in cut_results.values())
        assert not [c for c in left["calls"] if c["fleet"] == "b"], left["calls"]
        assert {1, 2} <= gens_b
        assert ended[victim["bot_id"]]["process"] in gen1

        def exits() -> list[dict[str, Any]]:
            return [e for e in service.log() if e.get("event") == "old-generation worker exited"]

        await eventually(lambda: len(exits()) == 3, timeout=20)
        assert sorted(e["pid"] for e in exits()) == sorted(gen1)
        assert all(e["exit_status"] == "exit 0" and e["calls_lost"] == 0 for e in exits()), exits()
    finally:
        await traffic.cancel()
        await service.finish()
