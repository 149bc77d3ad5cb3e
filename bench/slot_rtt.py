"""What the host slot coordinator adds to each call's setup: one lease + release.

    python -m bench.slot_rtt --iterations 20000 --workers 1 --loop uvloop

The coordinator (`net.slot_server`) runs in this process; each worker is a
child process with the other end of a socketpair (as the supervisor's
workers will have), running `SlotClient.lease()` then `release()` in a loop,
one call at a time. A loop turn is the whole price: the next `lease` is read
by the coordinator after the previous `release`, so it waits for it. With
`--gap S` a turn holds its lease S seconds and waits S more before the next,
so that every message wakes the coordinator on its own, as at a churn of
calls (its CPU per turn is then what a call costs the supervisor). Prints
the median, p99, p99.9 and max of a turn, and of `Dispatcher.lease()` +
`release()` in-process for comparison. Bounded: `--iterations` turns per
worker and `--seconds` of wall clock, whichever ends first.

The worker's side counted (callgrind, each worker; the coordinator native):

    python -m bench.slot_rtt --iterations 200 --gap 0.005 --like-a-call --no-dispatcher \
        --worker-callgrind /tmp/w200.%p      # then 600: the difference over 400 turns
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter

import uvloop

from bench.harness import callgrind
from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.net import slot_server
from fleet_ingress.net.call_table_map import CallTableWriter, make_table
from fleet_ingress.net.dispatch import Dispatcher
from fleet_ingress.net.slot_client import SlotClient
from fleet_ingress.net.slot_server import SlotServer

FLEETS = "https://a.test name=a\nhttps://b.test name=b\n"
WARMUP = 500


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _switches() -> int:
    """This process's voluntary context switches so far: its wake-ups."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def _summary(turns_ns: list[int]) -> dict[str, float]:
    turns = sorted(turns_ns)
    at = lambda q: turns[min(len(turns) - 1, int(q * len(turns)))] / 1000  # noqa: E731
    return {
        "n": len(turns),
        "median_us": round(statistics.median(turns) / 1000, 1),
        "p99_us": round(at(0.99), 1),
        "p999_us": round(at(0.999), 1),
        "max_us": round(turns[-1] / 1000, 1),
    }


# Who a call is, as the call path describes it in its slot request (`Call.described`).
CALL = {
    "call_id": "4242-17-k3f9",
    "bot_id": "bench-bot",
    "path": "/ws/bench-17",
    "carrier_address": "127.0.0.1:51234",
    "started_at": "2026-12-06T13:00:00.000Z",
    "started_monotonic": 5012.25,
}


def _warmup(gap: float) -> int:
    """Turns before the counted ones: fewer when each holds its lease a while."""
    if not gap:
        return WARMUP
    return max(5, min(WARMUP // 10, int(5 / gap)))


async def _turns(
    source,
    iterations: int,
    seconds: float,
    gap: float = 0.0,
    like_a_call: bool = False,
    logged: bool = False,
    warm: bool = True,
    start_after: float = 0.0,
) -> list[int]:
    for _ in range(_warmup(gap) if warm else 0):
        (await source.lease()).release()
    await asyncio.sleep(start_after)
    turns: list[int] = []
    stop = time.monotonic() + seconds
    clock = time.perf_counter_ns
    for _ in range(iterations):
        t0 = clock()
        if like_a_call:
            # As the call path: who the call is with the request, the fleet's
            # answer told (it rides with the release, or goes within 0.2 s).
            lease = await source.lease(call=CALL)
            lease.fleet_answered(time.monotonic())
        else:
            lease = await source.lease()
        if gap:
            await asyncio.sleep(gap)
        if logged:
            lease.call_logged()  # its access line written, then its slot given back
        lease.release()
        turns.append(clock() - t0)
        if gap:
            await asyncio.sleep(gap)
        if time.monotonic() > stop:
            break
    return turns


async def _worker(
    fd: int,
    iterations: int,
    seconds: float,
    gap: float,
    like_a_call: bool,
    table: bool,
    at_once: int = 1,
) -> None:
    client = await SlotClient.connect(
        sock=socket.socket(fileno=fd), pid=os.getpid(), generation=1, answer_timeout=5.0
    )
    if table:
        # A call table as a worker has one (its own here: nobody reads it), so
        # that a lone worker's grants, releases and "logged" are held as there.
        client.table = CallTableWriter(make_table())
    # `at_once` calls at a time (the first warms up), `iterations` turns in all,
    # their starts spread evenly over a turn (2 gaps): a churn, not bursts.
    parts = await asyncio.gather(
        *(
            _turns(
                client,
                iterations // at_once,
                seconds,
                gap,
                like_a_call,
                logged=table,
                warm=i == 0,
                start_after=i * 2 * gap / at_once,
            )
            for i in range(at_once)
        )
    )
    turns = [turn for part in parts for turn in part]
    # The last release must be read before we leave, or it counts as a crash.
    (await client.lease()).release()
    print(json.dumps(turns))
    client.close()


async def _probes(server: SlotServer, every: float) -> None:
    """As the supervisor's poller: each fleet probed every `every` seconds,
    1000 workers free by its word, then the table woken (`SlotServer.wake`)."""
    while True:
        await asyncio.sleep(every)
        for fleet in server.slots.balancer.fleets:
            fleet.health = Health.UP
            fleet.probe_counted(1000, fleet.probe_sending(time.monotonic()))
            server.wake()


def _count_channel(ops: Counter[str], reads: list[int]) -> None:
    """Count what the coordinator reads: each message by op, and its reads
    (`data_received`: one a wake-up of the channel, however many lines)."""
    received = slot_server._Channel.data_received
    handle = SlotServer._handle

    def counted_read(channel: slot_server._Channel, data: bytes) -> None:
        reads[0] += 1
        received(channel, data)

    def counted_handle(server: SlotServer, channel: slot_server._Channel, message: dict) -> None:
        ops[str(message.get("op"))] += 1
        handle(server, channel, message)

    slot_server._Channel.data_received = counted_read  # type: ignore[method-assign]
    SlotServer._handle = counted_handle  # type: ignore[method-assign]


async def _coordinator(args: argparse.Namespace) -> dict[str, object]:
    ops: Counter[str] = Counter()
    reads = [0]
    _count_channel(ops, reads)
    specs = parse_fleets_text(FLEETS, default_maxconn=16)
    server = SlotServer(
        HostSlots(Balancer(FleetSet.from_specs(specs)), queue_timeout=3.0, max_queue=256)
    )
    children = []
    for _ in range(args.workers):
        ours, theirs = socket.socketpair()
        await server.adopt(ours)
        cmd = [sys.executable, "-m", "bench.slot_rtt", "--child-fd", str(theirs.fileno())]
        cmd += ["--iterations", str(args.iterations), "--seconds", str(args.seconds)]
        cmd += ["--loop", args.loop, "--gap", str(args.gap)]
        cmd += ["--like-a-call"] if args.like_a_call else []
        cmd += ["--table"] if args.table else []
        cmd += ["--calls-at-once", str(args.calls_at_once)]
        if args.worker_callgrind:
            # Each worker counted (callgrind, its own file: %p), the coordinator native.
            cmd = [*callgrind.argv(args.worker_callgrind), *cmd]
        children.append(
            await asyncio.create_subprocess_exec(
                *cmd, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE
            )
        )
        theirs.close()
    probing = None
    if args.probe_every:
        probing = asyncio.create_task(_probes(server, args.probe_every))
    cpu_before = _cpu_seconds()  # the children start up meanwhile: this process idles
    switches_before = _switches()
    ops.clear()
    reads[0] = 0
    outputs = await asyncio.wait_for(
        asyncio.gather(*(c.communicate() for c in children)), args.seconds + 30
    )
    if probing is not None:
        probing.cancel()
    coordinator_cpu = _cpu_seconds() - cpu_before
    switches = _switches() - switches_before
    per_worker = [_summary(json.loads(out)) for out, _ in outputs]
    warmup = _warmup(args.gap)
    turns = sum(w["n"] + warmup + 1 for w in per_worker)
    local = None
    if not args.no_dispatcher:
        inproc = Dispatcher(Balancer(FleetSet.from_specs(specs)), queue_timeout=3.0, max_queue=256)
        local = _summary(await _turns(inproc, args.iterations, args.seconds))
    await server.close()
    return {
        "loop": args.loop,
        "workers": args.workers,
        "gap_s": args.gap,
        "coordinator_per_worker": per_worker,
        # This process's CPU while the workers ran (once spawned), per
        # lease+release: what the supervisor pays per call attempt.
        "coordinator_cpu_us_per_turn": round(coordinator_cpu / turns * 1e6, 1),
        # Its wake-ups (voluntary context switches) a turn: a count, not a time.
        "coordinator_wakeups_per_turn": round(switches / turns, 3),
        # What it read a turn: its reads of the channels, and the messages by op.
        "coordinator_reads_per_turn": round(reads[0] / turns, 3),
        "coordinator_messages_per_turn": round(sum(ops.values()) / turns, 3),
        "coordinator_ops_per_turn": {op: round(n / turns, 3) for op, n in sorted(ops.items())},
        "dispatcher_in_process": local,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--gap", type=float, default=0.0, help="seconds a lease is held, and between turns"
    )
    parser.add_argument(
        "--like-a-call",
        action="store_true",
        help="each request says who its call is, and the fleet's answer is told (as calls do)",
    )
    parser.add_argument(
        "--no-dispatcher",
        action="store_true",
        help="no in-process Dispatcher turns after (this process's count is the coordinator's "
        "alone: `valgrind --tool=callgrind python -m bench.slot_rtt ...` at two --iterations)",
    )
    parser.add_argument(
        "--calls-at-once",
        type=int,
        default=1,
        help="turns each worker runs at once (with --gap G: about calls-at-once / 2G calls a "
        "second a worker, each holding its lease G seconds, as a churn of calls does)",
    )
    parser.add_argument(
        "--probe-every",
        type=float,
        default=0.0,
        help="seconds between probes of each fleet (1000 free), as the supervisor's poller: "
        "its capacity counted, the table woken after each (0: no probe)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="each worker writes a call table, as a worker does (a lone worker's grants held)",
    )
    parser.add_argument(
        "--worker-callgrind",
        metavar="FILE",
        help="run each worker under valgrind --tool=callgrind writing FILE (%%p: its pid): "
        "at two --iterations, the difference over the turns is a worker's instructions a turn",
    )
    parser.add_argument("--child-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = uvloop.run if args.loop == "uvloop" else asyncio.run
    if args.child_fd is not None:
        run(
            _worker(
                args.child_fd,
                args.iterations,
                args.seconds,
                args.gap,
                args.like_a_call,
                args.table,
                args.calls_at_once,
            )
        )
        return
    print(json.dumps(run(_coordinator(args)), indent=1))


if __name__ == "__main__":
    main()
