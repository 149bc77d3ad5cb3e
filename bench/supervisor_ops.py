"""The supervisor's instructions per slot-channel op, counted (callgrind), not timed.

A `SlotServer` (with a `HostView`, 2 fleets at maxconn 1000) in this process
adopts one end of a real socketpair; the other end plays a worker: "hello",
then ``--calls`` calls one after the other, each the ops a churned call sends
(its "acquire" with who the call is, as `Call.described` says it; "answered";
"logged"; "release"), and a "report" (a churn run's families, its
"call_bytes") every ``--report-every`` calls. Each op's line is fed to the
channel's `data_received` (what uvloop calls on a read: the line decoded,
handled, its answer encoded and written) inside its own C-level wrapper, one
per op (``itertools.starmap`` for acquire, ``takewhile`` answered,
``dropwhile`` logged, ``filterfalse`` release, ``groupby`` report),
so that one callgrind run tells them apart by the wrappers' inclusive
instructions::

    for n in 100 400; do valgrind --tool=callgrind --callgrind-out-file=/tmp/ops.$n \\
        python -m bench.supervisor_ops --calls $n; done
    python -m bench.supervisor_ops --annotate /tmp/ops.100 /tmp/ops.400 --calls-pair 100 400

The epoll wake-up and the read system call of each message are not in it
(`bench.supervisor_instructions` counts the whole process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import subprocess
import sys

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer, Health
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.core.host_view import Counts, HostView, WorkerReport
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.net.slot_wire import encode

FLEETS = "https://a.test name=a\nhttps://b.test name=b\n"
PID = 4242

# The C function each op runs under (callgrind's inclusive count of it).
WRAPPERS = {
    "acquire": "starmap_next",
    "answered": "takewhile_next",
    "logged": "dropwhile_next",
    "release": "filterfalse_next",
    "report": "groupby_next",
}


def described(i: int) -> dict[str, object]:
    """Who call `i` is, as `Call.described` sends it."""
    return {
        "call_id": i,
        "call": f"{PID}-{i}-k3f9",
        "started": "2026-12-06T13:00:00Z",
        "client_ip": "127.0.0.1",
        "route": "/ws/",
        "bot_id": f"bot-{i % 50}",
        "started_at": 1796562000.0 + i,
        "started_monotonic": 5012.25 + i,
    }


def report(seq: int, calls: list[int]) -> dict[str, object]:
    counts = Counts()
    c = counts.counters
    for fleet in ("a", "b"):
        c[("fleet_calls", fleet)] = seq
        c[("fleet_responses", fleet, "101")] = seq
        c[("calls_ended", fleet, "normal")] = seq
    for name in ("connections_total", "bytes_from_carrier", "bytes_to_carrier"):
        c[(name,)] = seq * 1000
    counts.gauges[("active_calls",)] = len(calls)
    wire = WorkerReport(
        pid=PID, generation=1, seq=seq, started=1.7e9, counts=counts, calls=len(calls)
    ).to_wire()
    return {"op": "report", **wire, "call_bytes": [[lease, 100, 200] for lease in calls]}


def drain(sock: socket.socket) -> None:
    while True:
        try:
            if not sock.recv(65536):
                return
        except BlockingIOError:
            return


async def run(args: argparse.Namespace) -> None:
    specs = parse_fleets_text(FLEETS, default_maxconn=1000)
    balancer = Balancer(FleetSet.from_specs(specs))
    for fleet in balancer.fleets:  # probed UP (capacity not reported): calls are granted
        fleet.health = Health.UP
    server = SlotServer(HostSlots(balancer, queue_timeout=3.0, max_queue=256), view=HostView())
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    key = await server.adopt(ours)
    channel = server._channels[key]
    feed = channel.data_received
    hello = {"op": "hello", "pid": PID, "generation": 1, "answers": True, "forgets": True}
    feed(encode({**hello, "lists_calls": True, "fleet_down": True, "tag": "k3f9"}))
    calls = range(args.calls)
    lines = {
        "acquire": [encode({"op": "acquire", "id": i, "call": described(i)}) for i in calls],
        "answered": [encode({"op": "answered", "leases": [[i, 6000.0 + i]]}) for i in calls],
        "logged": [encode({"op": "logged", "id": i}) for i in calls],
        "release": [encode({"op": "release", "id": i}) for i in calls],
    }
    seq = 0
    for i in range(args.calls):
        # Each op under its own C wrapper (see WRAPPERS); the worker's end drained between.
        list(itertools.starmap(feed, [(lines["acquire"][i],)]))
        assert b'"granted"' in theirs.recv(65536)
        list(itertools.takewhile(feed, [lines["answered"][i]]))
        if i % args.report_every == 0:
            seq += 1
            line = encode(report(seq, [i]))
            list(itertools.groupby([line], feed))
        list(itertools.dropwhile(feed, [lines["logged"][i]]))
        list(itertools.filterfalse(feed, [lines["release"][i]]))
        drain(theirs)
    await server.close()
    theirs.close()


def wrapped(path: str) -> dict[str, int]:
    """Each wrapper's inclusive instructions in a callgrind output of this script."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    per: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) .*?:(\w+)(?:'\d+)? \[", line)
        if m and m.group(2) in WRAPPERS.values():
            name = m.group(2)
            per[name] = max(per.get(name, 0), int(m.group(1).replace(",", "")))
    return per


def annotate(paths: list[str], calls: list[int], report_every: int) -> None:
    """Per op: the difference between two runs (``--calls N1 N2``) over the
    ops between them, so that what runs once (first-time paths) is not in it."""
    (a, b), (n1, n2) = [wrapped(p) for p in paths], calls
    total = 0.0
    for op, wrapper in WRAPPERS.items():
        ops = n2 - n1
        if op == "report":  # one at call 0, report_every, ...
            ops = -(-n2 // report_every) - -(-n1 // report_every)
        each = (b.get(wrapper, 0) - a.get(wrapper, 0)) / ops
        total += each if op != "report" else each / report_every
        counted = f"N={n1}: {a.get(wrapper, 0):,}, N={n2}: {b.get(wrapper, 0):,}"
        print(f"{op:9s} {each:10,.0f} instructions an op ({counted})")
    print(f"a call's ops (a report each {report_every} calls): {total:,.0f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--report-every", type=int, default=20, help="calls between reports")
    p.add_argument(
        "--annotate", nargs=2, help="two callgrind outputs of this script, at --calls-pair"
    )
    p.add_argument("--calls-pair", type=int, nargs=2, default=[100, 400])
    args = p.parse_args()
    if args.annotate:
        annotate(args.annotate, args.calls_pair, args.report_every)
        return 0
    import uvloop

    uvloop.run(run(args))
    print(json.dumps({"calls": args.calls, "pid": os.getpid()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
