"""How long calls wait for a slot while the supervisor re-executes (an upgrade).

    python -m bench.reexec_gap --workers 1 --runs 3
    python -m bench.reexec_gap --workers 2 --runs 3 --json /tmp/out.json

Each run: two TLS fleets (`fleet_ingress.sim.SimulatedFleet`) and a real
`python -m fleet_ingress run` on loopback (TLS to carriers and fleets, the
JSON log in a file); a new 1 s call every `--every` seconds (echoed frames),
SIGUSR2 once they flow; the calls keep arriving until the new image has
granted again and `--after` seconds more. Said per run:

- the new image's own account (its log line "upgrade: slots granted again
  after the re-execution"): `since_exec_s`, from the old image's hand-over of
  the workers' channels (its last grant is before it) to the new image's
  first grant, and `steps_s`, each step of the new image's start;
- each call's wait (TCP + TLS + HTTP upgrade to its 101, as the carrier
  sees it): the longest, and how many waited over 0.5 s and over 2 s;
- the longest stretch with no 101 answered at all while calls were arriving
  (`no_101_s`): the gap as carriers see it;
- how many calls the workers granted from their grant budgets over the exec
  (`budget_granted`, their "grant budget ended" lines): since session 40 those
  do not wait for the new image.

Then the median of each over the runs (the host is shared: single runs are
noise). Bounded: `--arrivals` calls and `--seconds` of wall clock a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fleet_ingress.sim import SimulatedFleet
from fleet_ingress.sim.carrier import CallResult, run_call

from .harness.children import HOST, Children, free_port, python_module
from .harness.tlsfiles import TLSFiles

GRANTED_AGAIN = "upgrade: slots granted again after the re-execution"
UPGRADE_DONE = "upgrade done: the new generation serves, the old one drains"
ABANDONED = "upgrade abandoned: the running generation serves on"
BUDGET_ENDED = "grant budget ended: the supervisor grants again"


def _config(home: Path, tls: TLSFiles, workers: int, port: int, stats: int) -> Path:
    (home / "ingress.toml").write_text(
        f"""
[listen]
wss = "{HOST}:{port}"
acme = ""
stats = "{HOST}:{stats}"
admin_socket = "admin.sock"

[tls]
cert = "{tls.server_cert}"
key = "{tls.server_key}"
ca_file = "{tls.ca}"

[fleets]
file = "fleets.txt"
ca_file = "{tls.ca}"
check_interval = 1
check_timeout = 1

[timeouts]
drain = 30
queue = 30

[log]
format = "json"

[process]
workers = {workers}
"""
    )
    return home / "ingress.toml"


def _log(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(entry := json.loads(line), dict):
                lines.append(entry)
    return lines


def _said(path: Path, event: str) -> dict[str, Any] | None:
    return next((e for e in _log(path) if e.get("event") == event), None)


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.05)


def _serving(stats_port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, stats_port), 0.5) as s:
        s.sendall(b"GET /stats.json HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return b'"workers"' in data and b"UP" in data
    return False


async def one_run(args: argparse.Namespace, tls: TLSFiles, scratch: Path) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="reexec-gap-", dir=scratch))
    fleets = [
        SimulatedFleet(name=n, host=HOST, capacity=400, ssl_context=tls.fleet_server_context())
        for n in "ab"
    ]
    for fleet in fleets:
        await fleet.start()
    (home / "fleets.txt").write_text("".join(f"{f.url} name={f.name}\n" for f in fleets))
    port, stats_port = free_port(), free_port()
    config = _config(home, tls, args.workers, port, stats_port)
    log_path = home / "stderr.log"
    children = Children()
    with log_path.open("wb") as err:
        proc = await children.spawn(
            python_module("fleet_ingress", "run", "-c", str(config)), cwd=home, stderr=err
        )
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    calls: list[tuple[float, asyncio.Task[CallResult]]] = []
    try:
        await _until(lambda: _said(log_path, "ready") is not None, 60, "the ingress ready")
        await _until(lambda: _serving(stats_port), 30, "the fleets UP")
        stop = asyncio.Event()

        def call() -> asyncio.Task[CallResult]:
            return asyncio.create_task(run_call(
                f"wss://{HOST}:{port}", ssl_context=ctx, profile="exotel",
                duration=1.0, bot_id=f"c{len(calls)}", open_timeout=60, echo_wait=3.0,
            ))  # fmt: skip

        async def arrive() -> None:
            for _ in range(args.arrivals):
                if stop.is_set():
                    return
                calls.append((time.monotonic(), call()))
                await asyncio.sleep(args.every)

        arriving = asyncio.create_task(arrive())
        await asyncio.sleep(1.0)
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGUSR2)

        def granted_or_over() -> bool:
            return (
                any(e.get("event") in (GRANTED_AGAIN, ABANDONED) for e in _log(log_path))
                or proc.returncode is not None
            )

        await _until(granted_or_over, args.seconds, "the new image granting")
        await asyncio.sleep(args.after)
        stop.set()
        await arriving
        results = await asyncio.gather(*(t for _, t in calls))
        await _until(lambda: _said(log_path, UPGRADE_DONE) is not None, 60, "the upgrade done")
    finally:
        await Children.stop(proc, 40)  # its drain is 30 s
        for fleet in fleets:
            await fleet.stop()
    granted = _said(log_path, GRANTED_AGAIN) or {}
    waits = [r.handshake_ms / 1000 for r in results if r.handshake_ms is not None]
    answered = sorted(
        at + r.handshake_ms / 1000
        for (at, _), r in zip(calls, results, strict=True)
        if r.handshake_ms is not None
    )
    after_signal = [t for t in answered if t >= signalled]
    no_101 = max((b - a for a, b in itertools.pairwise(after_signal)), default=0)
    return {
        "workers": args.workers,
        "calls": len(results),
        "failed": sum(not r.ok for r in results),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "since_exec_s": granted.get("since_exec_s"),
        "steps_s": granted.get("steps_s"),
        "wait_max_s": round(max(waits, default=0.0), 3),
        "wait_p50_s": round(statistics.median(waits), 3) if waits else None,
        "waited_over_0.5s": sum(w > 0.5 for w in waits),
        "waited_over_2s": sum(w > 2.0 for w in waits),
        "no_101_s": round(no_101, 3),
        # Calls the workers granted from their budgets over the exec (session 40).
        "budget_granted": sum(
            int(e.get("granted", 0)) for e in _log(log_path) if e.get("event") == BUDGET_ENDED
        ),
        "home": str(home),
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (
        "since_exec_s",
        "wait_max_s",
        "no_101_s",
        "waited_over_0.5s",
        "budget_granted",
        "failed",
    ):
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(values) if values else None
    steps: dict[str, list[float]] = {}
    for r in runs:
        for name, s in (r.get("steps_s") or {}).items():
            steps.setdefault(name, []).append(s)
    out["steps_s"] = {name: round(statistics.median(v), 3) for name, v in steps.items()}
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="reexec-gap-"))
    os.makedirs(scratch, exist_ok=True)
    tls = TLSFiles.write(Path(tempfile.mkdtemp(prefix="tls-", dir=scratch)))
    runs = []
    for i in range(args.runs):
        run = await one_run(args, tls, scratch)
        print(json.dumps({"run": i, **run}), flush=True)
        runs.append(run)
    summary = {"workers": args.workers, "runs": len(runs), "median": _medians(runs)}
    print(json.dumps(summary), flush=True)
    return {"summary": summary, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between new calls")
    parser.add_argument("--after", type=float, default=1.0, help="arrivals after the grant")
    parser.add_argument("--arrivals", type=int, default=1200, help="at most, a run")
    parser.add_argument("--seconds", type=float, default=60.0, help="at most, for the upgrade")
    parser.add_argument("--dir", help="scratch directory (default: a new temporary one)")
    parser.add_argument("--json", help="write every run and the medians here")
    args = parser.parse_args()
    import uvloop

    out = uvloop.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
