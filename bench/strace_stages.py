"""System calls per stage of a call, from a full strace of one proxy process.

``python -m bench churn --strace full`` writes, for each process of each proxy,
``strace -f -tt -yy`` output (every system call, each descriptor with its TCP
addresses). Run at a rate where calls do not overlap (``--rate 0.5
--call-seconds 1``), this splits what one process did into the stages of each
call, by what is on the wire, the same rules for HAProxy and fleet-ingress:

- ``accept+handshake``: from the carrier's accept4 to the server's last
  handshake write (its session tickets, after the client's Finished);
- ``head``: on to the fleet socket's creation (the head read and parsed; for
  fleet-ingress the slot lease is counted apart, below);
- ``lease``: fleet-ingress's slot lease, the worker's ``acquire`` write to its
  ``granted`` read, and its ``release`` write;
- ``fleet connect+handshake``: the fleet socket's creation to the client's
  Finished;
- ``101 exchange``: on to the first write to the carrier (the 101 relayed);
- ``relay``: on to the carrier's close frame (the first record from the carrier
  of at most 25 bytes of ciphertext: a close frame with its status code);
- ``teardown``: on to the second of the two sockets' close, and the loop turn
  after it;
- ``between calls``: the rest (timers, reports to the supervisor, health checks).

Stage boundaries are positions in the trace; a system call with no descriptor
(epoll_wait, clock_gettime, getpid, io_uring_enter) counts where it falls.
``python -m bench.strace_stages FILE`` (ports found in the trace, or given).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

_LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<t>[\d:.]+)\s+(?P<name>\w+)\((?P<rest>.*)$")
_FD = re.compile(r"^(?P<fd>-?\d+)(?:<(?P<what>[^<]*?)>(?=[,)]))?")
_TCP = re.compile(r"TCP:\[(?P<lip>[\d.]+):(?P<lport>\d+)->(?P<rip>[\d.]+):(?P<rport>\d+)\]")
_RET_FD = re.compile(r"= (?P<fd>\d+)<(?P<what>.*)>\s*$")

STAGES = (
    "accept+handshake",
    "head",
    "lease",
    "fleet connect+handshake",
    "101 exchange",
    "relay",
    "teardown",
    "between calls",
)


def _unescape(s: str) -> bytes:
    """strace's C-style escapes (\\27, \\n, \\"), for a record header's two length bytes."""
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(ord(c))
            i += 1
            continue
        m = re.match(r"\\([0-7]{1,3})", s[i:])
        if m:
            out.append(int(m.group(1), 8))
            i += len(m.group(0))
            continue
        esc = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, '"': 34, "\\": 92}
        out.append(esc.get(s[i + 1], ord(s[i + 1])))
        i += 2
    return bytes(out)


def record_header(rest: str) -> tuple[int, int] | None:
    """(content type, length) of a TLS record whose header opens the buffer
    (a read or write of 5+ bytes: OpenSSL reads the header alone)."""
    m = re.search(r'"(\\2[0-7])\\3\\3((?:\\[0-7]{1,3}|\\.|[^\\"]){2})', rest)
    if not m:
        return None
    ctype = int(m.group(1)[1:], 8)
    raw = _unescape(m.group(2))
    if len(raw) != 2:
        return None
    return ctype, raw[0] * 256 + raw[1]


_BEFORE_FLEET = ("accept+handshake", "head", "lease")


class Call:
    def __init__(self, carrier_fd: int) -> None:
        self.carrier = carrier_fd
        self.fleet: int | None = None
        self.stage = "accept+handshake"
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.client_finished_seen = False  # carrier side: the client's Finished read
        self.closed: set[int] = set()


def _busy_sockets(lines: list[str], least: int = 50) -> set[int]:
    """Line numbers of the socket() calls whose descriptor then carried at least
    `least` reads and writes before its close: a call's fleet connection, not a
    health check's (HAProxy checks on a new connection each time)."""
    open_at: dict[int, int] = {}
    io: Counter[int] = Counter()
    busy: set[int] = set()
    for i, line in enumerate(lines):
        m = _LINE.match(line)
        if not m:
            continue
        ret = _RET_FD.search(line)
        if m["name"] == "socket" and ret:
            open_at[int(ret["fd"])] = i
            continue
        fdm = _FD.match(m["rest"])
        if not fdm:
            continue
        fd = int(fdm["fd"])
        if fd in open_at:
            if m["name"] in ("read", "write", "recvfrom", "sendto"):
                io[open_at[fd]] += 1
            elif m["name"] == "close":
                start = open_at.pop(fd)
                if io[start] >= least:
                    busy.add(start)
    return busy


def ports(lines: list[str]) -> tuple[int | None, set[int]]:
    """The listening port (of the first accept4's listener) and every port connected to."""
    listen, connected = None, set()
    for line in lines:
        if listen is None and (m := re.search(r"accept4\(\d+<TCP:\[[\d.]+:(\d+)\]>", line)):
            listen = int(m.group(1))
        if m := re.search(r"connect\(\d+<[^>]*>, \{sa_family=AF_INET, sin_port=htons\((\d+)", line):
            connected.add(int(m.group(1)))
    return listen, connected


def analyse(
    path: Path, listen_port: int | None = None, fleet_ports: set[int] | None = None
) -> dict[str, object]:
    lines = [
        line
        for line in path.read_text(errors="replace").splitlines()
        if "resumed>" not in line and "write(-1, " not in line  # stage markers of a probe
    ]
    found_listen, found_fleets = ports(lines)
    listen_port = listen_port or found_listen or 0
    fleet_ports = fleet_ports or found_fleets
    busy = _busy_sockets(lines)
    checks: set[int] = set()  # descriptors of health-check connections now open
    calls: list[Call] = []
    current: Call | None = None
    between: Counter[str] = Counter()
    pending_teardown_turn = False
    for i, line in enumerate(lines):
        m = _LINE.match(line)
        if not m:
            continue
        name, rest = m["name"], m["rest"]
        fdm = _FD.match(rest)
        fd = int(fdm["fd"]) if fdm else None
        what = (fdm["what"] or "") if fdm else ""
        tcp = _TCP.search(what)
        is_carrier = bool(tcp and int(tcp["lport"]) == listen_port)
        is_fleet = bool(tcp and int(tcp["rport"]) in fleet_ports)
        ret = _RET_FD.search(line)
        if name == "socket" and ret and i not in busy:
            checks.add(int(ret["fd"]))
            between[name] += 1
            continue
        if fd in checks:
            between[name] += 1
            if name == "close":
                checks.discard(fd)
            continue

        if name == "accept4" and ret and (tcp2 := _TCP.search(ret["what"])):
            if int(tcp2["lport"]) == listen_port:
                current = Call(int(ret["fd"]))
                calls.append(current)
                pending_teardown_turn = False
        if current is None or current.stage == "done":
            if current is not None and pending_teardown_turn and name.startswith("epoll"):
                # The loop turn after the last close belongs to the teardown.
                pending_teardown_turn = False
                current.counts["teardown"][name] += 1
                continue
            between[name] += 1
            continue

        call = current
        stage = call.stage
        # Stage transitions, by what is on the wire.
        if stage == "accept+handshake" and fd == call.carrier and is_carrier:
            hdr = record_header(rest)
            if name in ("read", "recvfrom") and hdr and hdr[0] == 0x14:
                call.client_finished_seen = True  # the client's ChangeCipherSpec
        if name == "socket" and ret and i in busy and stage in _BEFORE_FLEET:
            call.fleet = int(ret["fd"])
            stage = call.stage = "fleet connect+handshake"
        elif stage == "head" and fd is not None and "UNIX" in what and '"op\\":\\"acquire' in rest:
            stage = call.stage = "lease"
        elif stage == "lease" and fd is not None and "UNIX" in what and "granted" in rest:
            call.counts["lease"][name] += 1
            call.stage = "head"  # until the fleet socket: counted as head (none expected)
            continue
        elif (
            stage == "fleet connect+handshake"
            and fd == call.fleet
            and name in ("write", "sendto")
            and (hdr := record_header(rest))
            and hdr[0] == 0x14
        ):
            call.counts[stage][name] += 1
            call.stage = "101 exchange"
            continue
        elif stage == "101 exchange" and fd == call.carrier and name in ("write", "sendto"):
            call.counts[stage][name] += 1
            call.stage = "relay"
            continue
        elif (
            stage == "relay"
            and fd == call.carrier
            and name in ("read", "recvfrom")
            and (hdr := record_header(rest))
            and hdr[0] == 0x17
            and hdr[1] <= 25
        ):
            stage = call.stage = "teardown"

        # Where this system call counts.
        if fd is not None and "UNIX" in what and name in ("write", "sendto"):
            if '"op\\":\\"acquire' in rest or '"op\\":\\"release' in rest:
                call.counts["lease"][name] += 1
                continue
            if "counts" in rest or "started" in rest:
                between[name] += 1  # the worker's report
                continue
        if fd is not None and "/proc/" in what:
            between[name] += 1
            continue
        if fd is not None and tcp and not is_carrier and fd != call.fleet and is_fleet:
            between[name] += 1  # another fleet connection: a health check
            continue
        call.counts[stage][name] += 1
        if stage == "accept+handshake" and call.client_finished_seen and fd == call.carrier:
            # The server's writes after the client's Finished are its session
            # tickets: the handshake ends with the second.
            if name in ("write", "sendto"):
                call.counts.setdefault("_tickets", Counter())["n"] += 1
                if call.counts["_tickets"]["n"] >= 2:
                    call.stage = "head"
        if name == "close" and fd in (call.carrier, call.fleet):
            call.closed.add(fd)
            if len(call.closed) == 2:
                call.stage = "done"
                pending_teardown_turn = True

    complete = [c for c in calls if c.stage == "done" and c.fleet is not None]
    per_stage: dict[str, dict[str, float]] = {}
    n = len(complete)
    for stage in STAGES[:-1]:
        total: Counter[str] = Counter()
        for c in complete:
            total.update(c.counts.get(stage, Counter()))
        if total:
            per_stage[stage] = {
                k: round(v / n, 2) for k, v in sorted(total.items(), key=lambda kv: -kv[1])
            }
    return {
        "file": str(path),
        "calls": n,
        "per_call_by_stage": per_stage,
        "per_call_stage_totals": {s: round(sum(v.values()), 1) for s, v in per_stage.items()},
        "between_calls_total": dict(between.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--listen-port", type=int, help="default: the first accept4's")
    p.add_argument("--fleet-ports", default="", help="comma-separated; default: connect()s'")
    args = p.parse_args(argv)
    fleets = {int(x) for x in args.fleet_ports.split(",") if x}
    json.dump(analyse(args.trace, args.listen_port, fleets), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
