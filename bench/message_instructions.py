"""Instructions (callgrind) and system calls (strace) a relayed message, counted, not timed.

The per-call counter's load (bench/call_instructions.py: a simulated fleet in
its own process, not counted; TLS both sides; twilio-like frames, each sent
after the last one's echo), held at N calls up at once (``--calls``, one wave),
run twice per target with M1 and M2 frames a call (``--messages``); the
difference over the frames between them is what a relayed message costs,
the handshakes, start and shutdown cancelling out. A frame and its echo are
two relayed messages; the warm-up calls (call_instructions.WARMUP, one at a
time, before the counted ones) carry the same frames and are counted with
them. Only the proxy process is counted; the kernel's side of its system calls
is not (callgrind counts user space). Targets::

    haproxy            Debian's haproxy -db, the config the side-by-side runs render
    ingress1p          bench/one_process_ingress.py (the worker's Ingress, no supervisor)
    bare-bio           bench/bare_bio_splice.py (BARE_BIO_REUSE=1, as call_instructions)
    bare-bio@unlinked  ... BARE_BIO_UNLINKED=1 (the floor as it was before session 45)
    bare-bio@fused     ... BARE_BIO_FUSED=1
    bare-bio@readahead ... BARE_BIO_FUSED=1 BARE_BIO_READ_AHEAD=1
    bare-bio@crelay    ... BARE_BIO_C_RELAY=1 (bench/c_relay, built first)

    python -m bench.message_instructions --out /tmp/mi            # every target
    python -m bench.message_instructions --targets bare-bio@crelay,haproxy --out /tmp/mi
    python -m bench.message_instructions --counter strace --out /tmp/ms
    python -m bench.message_instructions --targets ingress1p --variant-pythonpath B/src --out /tmp/m
    python -m bench.message_instructions --targets bare-bio,bare-bio@co,haproxy \
        --variant co:BARE_BIO_COALESCE=1 --burst 4 --out /tmp/mc

``--variant NAME:KEY=VALUE`` (repeatable) makes target ``bare-bio@NAME`` with that
environment (a bare_bio_splice variant). ``--burst K``: each call sends K frames back
to back (a TLS record each), then waits for their K echoes: K records wait on each
of the proxy's connections at once, the shape of a loaded proxy, where the default
(K = 1: a frame after the last one's echo) never has more than one.

What is counted (``--window``, callgrind). The difference between the runs
also holds work that falls neither on messages nor equally in both runs:

- TLS handshakes. The same calls make as many in each run, but whether a
  fleet connection resumes a kept session or makes a full handshake depends
  on when the sessions came (20 calls opened at once): two runs of the same
  tree differed by 20 M instructions of ``SSL_do_handshake`` at M1 alone,
  4,000 to 6,000 instructions a message of the difference either way
  (session 47, main 0d2d55d3);
- the event loop's timers (the silence and dead-peer sweeps, the loop-lag
  probe, flush timers) and what they schedule with call_soon (uvloop's idle
  handles): they fall on wall time, and under callgrind (about 50x slower
  than real time) M2's run lasts seconds longer than M1's: 2,505 (timers) and
  2,945 (idle handles) instructions a message of ingress1p's in one run;
- start and shutdown, which wait on wall time in places.

``--window io`` (the default) counts only what runs inside libuv's
``uv__io_poll`` (callgrind's ``--toggle-collect``): the read and write events'
callbacks, where a relayed message's work all is (its record read, handed on
and written; the garbage collections it triggers; epoll_wait's wrapper). No
relayed message goes through a timer or call_soon (``--counter cprofile``
lists the Python functions a message runs: all called from the read event).
The handshakes made inside it (``SSL_do_handshake``'s inclusive count) are
then taken out of the total and shown apart (``handshakes``; the groups'
columns hold them, mostly OpenSSL's). Not with a second toggle on it: two runs
so read 26,476 and 30,172 a message (callgrind's toggles flip, not nest: a
handshake step run outside the window, from the loop's step queue, is counted
by it, it seems). Two runs of the same tree agree within 0.4 % (28,513 and
28,408 instructions a message, ingress1p, main 0d2d55d3; 32,639 and 22,360
with the handshakes in); on a quieter host main read 28,127 (1.4 % off: how
many events one epoll_wait returns depends on the pace): compare runs made
side by side. ``--window all``: the whole process, as before
session 47 (comparable with the figures up to session 46, and as noisy).
HAProxy has no such window (its streams run as tasks outside its poller): it
is counted whole either way. ``--counter cprofile`` (ingress1p only) runs
bench/call_profile.py's profiled ingress on the same load and prints the
Python functions a message calls (a whole call each; time-driven ones show as
a fraction of a call a message).

Prints a table: per message, all instructions, then by shared object (each
one's own instructions: OpenSSL = libssl + libcrypto, libpython, uvloop, libc,
the C relay, haproxy, the rest: ``???``, ``_ssl``, ``_ctypes``, libffi), or the
system calls by name; the JSON file in ``--out`` has every shared object. With
callgrind, a second table: calls a message to OpenSSL's read and write
(``SSL_read`` + ``SSL_read_ex``, one a record read or a read that found none;
``SSL_write`` + ``SSL_write_ex``, one a record written for writes under 16 KiB)
and the epoll waits.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import runpy
import sys
from pathlib import Path

from bench.call_instructions import OPENSSL_OBJECTS, WARMUP, count, syscalls, totals
from bench.call_profile import (
    Cost,
    Key,
    costs_of,
    format_rows,
    label,
    per_call,
    per_call_time,
    profile_run,
    top,
)

TARGETS: dict[str, tuple[str, dict[str, str]]] = {
    "haproxy": ("haproxy", {}),
    "ingress1p": ("ingress", {}),
    "bare-bio": ("bare-bio", {}),
    "bare-bio@unlinked": ("bare-bio", {"BARE_BIO_UNLINKED": "1"}),
    "bare-bio@fused": ("bare-bio", {"BARE_BIO_FUSED": "1"}),
    "bare-bio@readahead": ("bare-bio", {"BARE_BIO_FUSED": "1", "BARE_BIO_READ_AHEAD": "1"}),
    "bare-bio@crelay": ("bare-bio", {"BARE_BIO_C_RELAY": "1"}),
}
# Shared objects by group, as callgrind names them (its file name's start).
GROUPS = (
    # cryptography's bundled copy too: callgrind names some of the system
    # libcrypto's instructions after it.
    ("OpenSSL", OPENSSL_OBJECTS),
    ("libpython", ("libpython", "python3")),
    ("uvloop", ("loop.cpython",)),
    ("libc", ("libc.so", "ld-linux")),
    ("C relay", ("_c_relay",)),
    ("haproxy", ("haproxy",)),
)


def group(shared_object: str) -> str:
    for name, starts in GROUPS:
        if shared_object.startswith(starts):
            return name
    return "other"


# libuv's poll phase: every read and write event's callback runs inside it.
IO_WINDOW = "uv__io_poll"
# OpenSSL's handshake (callgrind_annotate's row, its inclusive count): taken out.
HANDSHAKE = "SSL_do_handshake"


def window_options(window: str, base: str) -> tuple[str, ...]:
    """callgrind's options for ``--window``: collect inside uv__io_poll only
    (`io`, a uvloop target), or everything (`all`; haproxy always)."""
    if window == "io" and base != "haproxy":
        return (f"--toggle-collect={IO_WINDOW}",)
    return ()


def handshake_instructions(inclusive: dict[str, int]) -> int:
    """``SSL_do_handshake``'s inclusive instructions, from totals()' rows."""
    return sum(v for k, v in inclusive.items() if k.split(" [")[0].endswith(f":{HANDSHAKE}"))


def per_message_instructions(files: list[Path], messages: int) -> dict[str, float]:
    """Instructions a message in all (less the handshakes': ``handshakes``) and by
    group of shared objects (the handshakes' in them), from the two runs."""
    a, b = (totals(f) for f in files)
    handshakes = (handshake_instructions(b) - handshake_instructions(a)) / messages
    whole = (b["PROGRAM TOTALS"] - a["PROGRAM TOTALS"]) / messages
    out: dict[str, float] = {"total": whole - handshakes, "handshakes": handshakes}
    by_object: dict[str, float] = {}
    for key in set(a) | set(b):
        if key.startswith("self in ["):
            name = key[len("self in [") : -1]
            by_object[name] = (b.get(key, 0) - a.get(key, 0)) / messages
    for name, v in by_object.items():
        out[group(name)] = out.get(group(name), 0.0) + v
    out["objects"] = {k: v for k, v in by_object.items() if abs(v) >= 1}  # type: ignore[assignment]
    return out


# Functions whose calls a message are counted from the callgrind files: OpenSSL's
# read and write entry points (CPython's _ssl calls the _ex ones, HAProxy the others)
# and the loop's waits.
COUNTED_CALLS = {
    "SSL reads": ("SSL_read", "SSL_read_ex"),
    "SSL writes": ("SSL_write", "SSL_write_ex"),
    "epoll waits": ("epoll_wait", "epoll_pwait"),
}


def per_message_calls(files: list[Path], messages: int) -> dict[str, float]:
    from bench.wake_cost import calls_to

    names = tuple(n for ns in COUNTED_CALLS.values() for n in ns)
    a, b = (calls_to(f, names) for f in files)
    return {label: sum(b[n] - a[n] for n in ns) / messages for label, ns in COUNTED_CALLS.items()}


def parse_variants(specs: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
    """``--variant NAME:KEY=VALUE`` options -> {"bare-bio@NAME": ("bare-bio", env)}."""
    out: dict[str, tuple[str, dict[str, str]]] = {}
    for spec in specs:
        name, _, assignment = spec.partition(":")
        key, eq, value = assignment.partition("=")
        if not name or not key or not eq:
            raise ValueError(f"--variant {spec!r}: write NAME:KEY=VALUE")
        out.setdefault(f"bare-bio@{name}", ("bare-bio", {}))[1][key] = value
    return out


def per_message_syscalls(files: list[Path], messages: int) -> dict[str, float]:
    a, b = (syscalls(f) for f in files)
    return {k: (b.get(k, 0) - a.get(k, 0)) / messages for k in set(a) | set(b)}


def without_addresses(costs: dict[Key, Cost]) -> dict[Key, Cost]:
    """A C function's name without its type's address (``__new__ of type object at
    0x7f...``), which differs from run to run: the two runs' rows matched."""
    out: dict[Key, Cost] = {}
    for (file, line, name), c in costs.items():
        key = (file, line, _ADDRESS.sub("", name))
        had = out.get(key, Cost(0, 0.0))
        out[key] = Cost(had.calls + c.calls, had.own_time + c.own_time)
    return out


_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def print_profile(targets: list[str], args: argparse.Namespace, relayed: int) -> int:
    """``--counter cprofile``: the ingress's Python function calls a relayed message
    (call_profile's process, the same load), by function and by module."""
    if targets != ["ingress1p"]:
        raise SystemExit("--counter cprofile counts ingress1p alone (--targets ingress1p)")
    run_args = argparse.Namespace(
        variant_pythonpath=args.variant_pythonpath, wave=args.calls,
        max_seconds=args.max_seconds, access=None,
    )  # fmt: skip
    files = []
    for m in args.messages:
        run_args.messages = m
        files.append(profile_run(args.calls, args.out / "ingress1p", run_args, run=f"m{m}"))
    a, b = (without_addresses(costs_of(pstats.Stats(str(f)).stats)) for f in files)
    per = per_call(a, b, relayed)
    own = per_call_time(per)
    calls = sum(c.calls for c in per.values())
    print(f"Python calls a relayed message ({relayed} messages between the runs): {calls:,.2f}")
    print(f"top {args.top} functions: calls a message, share of own (tottime) time")
    print("\n".join(format_rows(top({label(k): c for k, c in per.items()}, args.top), own)))
    (args.out / "per_message_cprofile.json").write_text(
        json.dumps({label(k): [c.calls, c.own_time] for k, c in per.items() if c.calls}, indent=1)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"of {', '.join(TARGETS)}")
    p.add_argument(
        "--calls",
        type=int,
        default=20,
        help="calls held up at once (40 under callgrind went past bare_bio_splice's 3 s fleet "
        "connect now and then: 'closed before 101')",
    )
    p.add_argument("--messages", type=int, nargs=2, default=[10, 60], metavar=("M1", "M2"))
    p.add_argument("--counter", choices=("callgrind", "strace", "cprofile"), default="callgrind")
    p.add_argument(
        "--window",
        choices=("io", "all"),
        default="io",
        help="callgrind: count inside uv__io_poll, not in SSL_do_handshake (io: no timers, "
        "call_soon, handshakes, start or stop), or the whole process (all, as before session "
        "47); HAProxy whole either way",
    )
    p.add_argument("--top", type=int, default=40, help="functions listed (--counter cprofile)")
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound of one run")
    p.add_argument(
        "--variant-pythonpath",
        help="a src directory first on the counted process's PYTHONPATH (another commit's "
        "src, `git archive`, compiled: python -m compileall -q DIR)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="environment of target bare-bio@NAME (repeatable), e.g. co:BARE_BIO_COALESCE=1",
    )
    p.add_argument(
        "--burst",
        type=int,
        default=1,
        help="frames a call sends back to back before awaiting their echoes (default 1)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        known = {**TARGETS, **parse_variants(args.variant)}
    except ValueError as exc:
        p.error(str(exc))
    targets = args.targets.split(",")
    if unknown := [t for t in targets if t not in known]:
        p.error(f"unknown targets {unknown}: of {', '.join(known)} (or give --variant NAME:...)")
    if args.burst < 1 or min(args.messages) % args.burst:
        p.error("--burst: at least 1, and dividing M1 and M2 (whole bursts)")
    if "bare-bio@crelay" in targets:
        # bench/c_relay/build.py: built now, not under the counter.
        build = runpy.run_path(str(Path(__file__).resolve().parent / "c_relay" / "build.py"))
        print(f"C relay: {build['build']()}")
    m1, m2 = args.messages
    relayed = (args.calls + WARMUP) * (m2 - m1) * 2
    results: dict[str, dict[str, float]] = {}
    if args.counter == "cprofile":
        return print_profile(targets, args, relayed)
    for name in targets:
        base, env = known[name]
        run_args = argparse.Namespace(
            target=base, counter=args.counter, variant_pythonpath=args.variant_pythonpath,
            wave=args.calls, max_seconds=args.max_seconds, access=None, burst=args.burst,
        )  # fmt: skip
        files = []
        for m in (m1, m2):
            run_args.messages = m
            options = window_options(args.window, base) if args.counter == "callgrind" else ()
            cg = count(args.calls, args.out / name, run_args, run=f"m{m}", target_env=env,
                       callgrind_options=options)  # fmt: skip
            files.append(cg)
        if args.counter == "strace":
            results[name] = per_message_syscalls(files, relayed)
        else:
            results[name] = per_message_instructions(files, relayed)
            results[name]["calls"] = per_message_calls(files, relayed)  # type: ignore[assignment]
        shown = {k: v for k, v in results[name].items() if k != "objects"}
        print(f"{name}: {json.dumps(shown)}")
        # After each target: a later one that fails leaves the earlier ones' counts.
        (args.out / f"per_message_{args.counter}.json").write_text(json.dumps(results, indent=1))
    window = f", window {args.window}" if args.counter == "callgrind" else ""
    print(f"\nper relayed message ({relayed} messages between the runs), {args.counter}{window}:")
    if args.counter == "strace":
        names = sorted({k for r in results.values() for k in r if k != "total"})
        names = [n for n in names if any(abs(r.get(n, 0)) >= 0.01 for r in results.values())]
        print("| target | total | " + " | ".join(names) + " |")
        for t, r in results.items():
            cells = " | ".join(f"{r.get(n, 0):.2f}" for n in names)
            print(f"| {t} | {r['total']:.2f} | {cells} |")
    else:
        cols = ["total", "handshakes", *(g for g, _ in GROUPS), "other"]
        print("| target | " + " | ".join(cols) + " |")
        for t, r in results.items():
            print(f"| {t} | " + " | ".join(f"{r.get(c, 0):,.0f}" for c in cols) + " |")
        print("\n| target | " + " | ".join(COUNTED_CALLS) + " |")
        for t, r in results.items():
            calls: dict[str, float] = r.get("calls", {})  # type: ignore[assignment]
            print(f"| {t} | " + " | ".join(f"{calls.get(c, 0):.3f}" for c in COUNTED_CALLS) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
