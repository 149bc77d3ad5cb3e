"""A churned call's own Python, counted by function (cProfile), not timed: for a shared host.

``bench/call_instructions.py`` counts a churned call's instructions (callgrind)
and says how many are the interpreter's; it cannot say which Python functions
they run. This runs the same load (``bench/one_process_ingress.py``'s ingress:
the worker's ``Ingress``, its slot table in-process; a simulated fleet in its
own process; N churned twilio-like TLS calls pushed from this process, WAVE at
a time, MESSAGES frames each way, closed with 1000; health probes 600 s apart)
with :mod:`cProfile` on inside the ingress process, twice (N=50 and N=250), and
prints the difference over N2-N1: what one call costs, in Python function calls
(C functions such as ``len`` or ``socket.recv`` too, as cProfile counts them)::

    python -m bench.call_profile --out /tmp/cp                   # N=50 and N=250
    python -m bench.call_profile --calls 50 250 --out DIR --variant-pythonpath /tmp/base/src
    python -m bench.call_profile --out DIR --callers monotonic   # who calls these, a call

Counts are deterministic (the same calls run the same functions: two runs
differ by a few periodic ticks' calls, which fall on wall time); the times
under a profiler are not a call's times, only each function's share of the
profiled (own, tottime) time a call's functions take (a function not called
more in the longer run is left out of that: the event loop's runner, whose own
time is the loop's idle wait). Prints the Python calls a call in all, the top
functions (by calls a call) with their tottime share, and the same by module;
each run's raw stats stay in ``DIR/nN/ingress.prof`` (``python -m pstats``).
``--access json`` (or ``text``) counts the access line a call too, written to the
run's ``stderr.log`` (``bench.call_instructions``' option, the same config): its
event loop thread's part (cProfile sees that thread alone, not the log writer's).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.call_instructions import add_load_arguments, warm_then_push, with_access_line
from bench.harness.children import free_port, log
from bench.harness.launch import Launched, fresh_dir, variant_env
from bench.harness.targets import Settings, render_ingress
from bench.harness.tlsfiles import TLSFiles

# pstats' key of a function: (file, first line, name); C functions have file "~".
Key = tuple[str, int, str]
# pstats' row of a function: (primitive calls, calls, own time, cumulative time, callers).
Row = tuple[Any, ...]


@dataclass(frozen=True)
class Cost:
    """One function's cost per call: calls (nc, recursive ones too) and own time (tottime)."""

    calls: float
    own_time: float


def per_call(before: Mapping[Key, Cost], after: Mapping[Key, Cost], n: int) -> dict[Key, Cost]:
    """What ``n`` more calls added, per call: ``after`` less ``before``, over ``n``.
    A function only one run ran counts from zero in the other."""
    zero = Cost(0, 0.0)
    out = {}
    for key in before.keys() | after.keys():
        a, b = before.get(key, zero), after.get(key, zero)
        out[key] = Cost((b.calls - a.calls) / n, (b.own_time - a.own_time) / n)
    return out


_C_NAME = re.compile(r"<(?:built-in method |method '[^']*' of ')([\w.]+)")


def module_of(key: Key) -> str:
    """The module a function is in: dotted from its file's path below the package
    root (``site-packages``, ``src``, the standard library), or ``[C] module`` of a C
    function (its type's module for a method: ``[C] _socket``; ``[C] ?`` unknown)."""
    file, _, name = key
    if file == "~":
        m = _C_NAME.match(name)
        if m is None:
            return "[C] ?"
        owner = m.group(1)
        # "builtins.len" -> builtins; "_socket.socket" (a method's type) -> _socket
        return f"[C] {owner.rpartition('.')[0] or owner}"
    if file.startswith("<frozen "):
        return file[len("<frozen ") : -1]
    path = file.replace("\\", "/")
    for root in ("/site-packages/", "/src/", "/lib/python3.11/", "/bench/"):
        if root in path:
            path = ("bench/" if root == "/bench/" else "") + path.rpartition(root)[2]
            break
    else:
        path = path.rpartition("/")[2]
    module = path.removesuffix(".py").replace("/", ".")
    return module.removesuffix(".__init__")


def label(key: Key) -> str:
    """``module:line(function)``, or a C function's own name."""
    file, line, name = key
    return name if file == "~" else f"{module_of(key)}:{line}({name})"


def by_module(per: Mapping[Key, Cost]) -> dict[str, Cost]:
    """Each module's functions' costs summed."""
    out: dict[str, Cost] = {}
    for key, cost in per.items():
        m = module_of(key)
        had = out.get(m, Cost(0, 0.0))
        out[m] = Cost(had.calls + cost.calls, had.own_time + cost.own_time)
    return out


def top(costs: Mapping[str, Cost], n: int) -> list[tuple[str, Cost]]:
    """The ``n`` with the most calls (then own time), names breaking ties."""
    return sorted(costs.items(), key=lambda kv: (-kv[1].calls, -kv[1].own_time, kv[0]))[:n]


def costs_of(stats: Mapping[Key, Row]) -> dict[Key, Cost]:
    """pstats' ``stats`` (key -> (cc, nc, tt, ct, callers)) as costs."""
    return {key: Cost(row[1], row[2]) for key, row in stats.items()}


def callers_of(stats: Mapping[Key, Row], pattern: str) -> dict[Key, dict[Key, int]]:
    """For each function whose label matches ``pattern``: its calls by caller."""
    found = re.compile(pattern)
    out = {}
    for key, row in stats.items():
        if found.search(label(key)):
            # cProfile's callers rows are (nc, cc, tt, ct): all the calls first.
            out[key] = {caller: v[0] if isinstance(v, tuple) else v for caller, v in row[4].items()}
    return out


def per_call_time(per: Mapping[Key, Cost]) -> float:
    """The own time of the functions a call runs: those the difference counts calls of.
    One not called more in the longer run holds no call's work but waits: the event
    loop's runner (``asyncio.runners:run``, uvloop's wait for events inside it), whose
    own time is the idle time of the run."""
    return sum(c.own_time for c in per.values() if c.calls)


def format_rows(rows: Iterable[tuple[str, Cost]], total_time: float) -> list[str]:
    """``calls a call   share of own time   name`` lines."""
    share = (lambda t: 100 * t / total_time) if total_time > 0 else (lambda t: 0.0)
    return [f"{c.calls:10.1f}  {share(c.own_time):5.1f} %  {name}" for name, c in rows]


def serve_profiled(config: Path, stats: Path) -> None:
    """The ingress process: one_process_ingress's ``serve`` under cProfile until
    SIGTERM, its stats written to ``stats`` on the way out."""
    import uvloop

    from bench.one_process_ingress import serve

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        uvloop.run(serve(config))
    finally:
        profiler.disable()
        profiler.dump_stats(str(stats))


def profile_run(calls: int, out: Path, args: argparse.Namespace, *, run: str | None = None) -> Path:
    """One profiled run with ``calls`` counted calls (after WARMUP): its stats file.
    ``run``: its directory's name under `out` (default ``nCALLS``)."""
    work = fresh_dir(out / (run or f"n{calls}"))
    tls = TLSFiles.write(work)
    stats = work / "ingress.prof"
    with Launched(work, variant_env(args.variant_pythonpath)) as launched:
        fleet_port = launched.fleet("fleet-a")
        port = free_port()
        settings = Settings(maxconn=1000, check_interval=600.0, check_timeout=60.0, fall=1, rise=1)
        config = render_ingress(settings, tls, port, [fleet_port], work)
        with_access_line(config, args.access)
        proc = launched.start(
            [sys.executable, "-m", "bench.call_profile", "--serve", str(config), str(stats)]
        )
        deadline = time.monotonic() + args.max_seconds
        took = warm_then_push(port, tls, calls, args, deadline)
        log(f"n={calls}: {calls} calls in {took:.0f} s under cProfile")
        Launched.stop(proc)
    if not stats.exists():
        raise RuntimeError(f"the ingress wrote no profile: see {work}/stderr.log")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(p, "profile")
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound of one run")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--callers", metavar="REGEX", help="per call, who calls the functions matching")
    args = p.parse_args(argv)
    n1, n2 = args.calls
    files = [profile_run(n, args.out, args) for n in (n1, n2)]
    a, b = (pstats.Stats(str(f)).stats for f in files)
    per = per_call(costs_of(a), costs_of(b), n2 - n1)
    calls = sum(c.calls for c in per.values())
    own = per_call_time(per)
    total_a, total_b = (round(sum(c.calls for c in costs_of(s).values())) for s in (a, b))
    print(f"Python calls per call: {calls:,.1f}  (N={n1}: {total_a:,}, N={n2}: {total_b:,})")
    print(f"top {args.top} functions: calls a call, share of own (tottime) time")
    print("\n".join(format_rows(top({label(k): c for k, c in per.items()}, args.top), own)))
    print(f"top {args.top} modules: calls a call, share of own (tottime) time")
    print("\n".join(format_rows(top(by_module(per), args.top), own)))
    if args.callers:
        before, after = callers_of(a, args.callers), callers_of(b, args.callers)
        for key in sorted(before.keys() | after.keys(), key=label):
            was, now = before.get(key, {}), after.get(key, {})
            rows = {
                label(c): Cost((now.get(c, 0) - was.get(c, 0)) / (n2 - n1), 0.0)
                for c in was.keys() | now.keys()
            }
            print(f"callers of {label(key)}, calls a call:")
            print("\n".join(f"{c.calls:10.1f}  {name}" for name, c in top(rows, args.top)))
    (args.out / "per_call.json").write_text(
        json.dumps(
            {
                "python_calls": calls,
                "functions": {label(k): [c.calls, c.own_time] for k, c in per.items()},
                "modules": {m: [c.calls, c.own_time] for m, c in by_module(per).items()},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if sys.argv[1:2] == ["--serve"]:
        serve_profiled(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
