"""The supervisor's every-second crash snapshot, counted alone (callgrind), not timed.

Builds a `Supervisor` in this process (``bench churn``'s configuration: 2
fleets, or ``--fleets``), with ``--workers`` live workers' reports in its host
view and systemd's notify socket (a datagram socket of its own: the snapshot
is written to real memfds), then runs ``--ticks`` turns of what
``supervisor_process._write_snapshots`` does each second: the OOM count's
look, then the snapshot (`CrashSnapshot.keep_up`; on a tree without it,
`write_in_turns`, as main did), each turn after moving what moves each second
on its own (each fleet's probe counters and times; each worker's report every
``--report-every`` ticks).
Under callgrind at two tick counts, the difference over the ticks is one
second's snapshot::

    for n in 20 220; do valgrind --tool=callgrind --callgrind-out-file=/tmp/st.$n \\
        python -m bench.snapshot_tick --ticks $n --out /tmp/st; done
    # main's: PYTHONPATH=/tmp/base/src (its src) in front of the same commands

Prints how many of the ticks wrote the snapshot. ``--strace`` is for running
it under ``strace -c -f`` the same way (system calls a tick).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import time
from pathlib import Path

from bench.harness.targets import Settings, render_ingress
from bench.harness.tlsfiles import TLSFiles
from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import load_config
from fleet_ingress.core.host_view import Counts, WorkerReport
from fleet_ingress.service.fd_store import CrashSnapshot
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.supervisor import Supervisor


def report(pid: int, seq: int) -> WorkerReport:
    """A worker's report with a churn run's families (about 40 counters)."""
    counts = Counts()
    c = counts.counters
    for fleet in ("fleet-a", "fleet-b"):
        c[("fleet_calls", fleet)] = seq
        c[("fleet_responses", fleet, "101")] = seq
        c[("calls_ended", fleet, "normal")] = seq
        c[("fleet_retries", fleet)] = 0
        c[("fleet_redispatches", fleet)] = 0
    for name in ("connections_total", "bytes_from_carrier", "bytes_to_carrier"):
        c[(name,)] = seq * 1000
    c[("requests", "/ws/", "101")] = seq
    counts.gauges[("active_calls",)] = seq % 5
    return WorkerReport(pid=pid, generation=1, seq=seq, started=1.7e9, counts=counts, calls=2)


async def ticks(args: argparse.Namespace) -> int:
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    tls = TLSFiles.write(args.out)
    config_path = render_ingress(Settings(), tls, 9, list(range(10, 10 + args.fleets)), args.out)
    config = load_config(config_path)
    specs = load_fleets_file(Path(config.fleets.file), default_maxconn=config.fleets.maxconn)
    supervisor = Supervisor(config, specs, config_path)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = args.out / "notify.sock"
    path.unlink(missing_ok=True)
    receiver.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    snapshots = CrashSnapshot(notifier)
    keep_up = getattr(snapshots, "keep_up", snapshots.write_in_turns)
    take = supervisor.upgrade.crash_snapshot
    for w in range(args.retired_workers):  # workers gone: their counts in `retired`
        gone = report(1000 + w, 1)
        gone.counts.counters[("fleet_calls", f"fleet-{w % 7}")] = w
        supervisor.view.report(gone, time.monotonic())
        supervisor.view.leave(gone.worker)
    written = 0
    for tick in range(args.ticks):
        for f in supervisor.balancer.fleets:
            f.probes_total += 1
            f.last_probe_monotonic = time.monotonic()
            f.last_probe_seconds = 0.001 * (tick % 7 + 1)
        if tick % args.report_every == 0:
            for w in range(args.workers):
                supervisor.view.report(report(100 + w, tick + 1), time.monotonic())
        supervisor.oom_verdict.look_for_oom_kills()
        before = snapshots._landed
        await keep_up(take)
        written += snapshots._landed != before
        while True:  # the fd store's messages (the first write's), not left queued
            try:
                receiver.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
    print(f"{args.ticks} ticks, {written} written")
    notifier.close()
    receiver.close()
    for fd in snapshots.descriptors().values():
        os.close(fd)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ticks", type=int, default=20)
    p.add_argument("--fleets", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--report-every",
        type=int,
        default=5,
        help="ticks between each worker's reports: 5 idle (PULL_EVERY), 1 while calls are live",
    )
    p.add_argument(
        "--retired-workers",
        type=int,
        default=0,
        help="workers gone before the ticks (their counts in the view's retired totals)",
    )
    p.add_argument("--out", type=Path, required=True)
    return asyncio.run(ticks(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
