"""Instructions per churned call, counted (callgrind), not timed: for a shared host.

Runs ``bench/one_process_ingress.py`` (the worker's ``Ingress``, its slot table
in-process: no supervisor, no lease round trip) under ``valgrind
--tool=callgrind``, a simulated fleet in its own process (not counted), and
pushes N churned twilio-like TLS calls through it from this process: WAVE calls
at a time, each upgraded, MESSAGES frames sent one by one (each after the last
one's echo, so every run relays the same frames), then closed (1000). Health
probes are set 600 s apart, so no probe falls inside the counted calls. Run
twice (N=50 and N=250), the difference over 200 is what a call costs; startup,
the first calls' lazy work and the shutdown cancel out::

    python -m bench.call_instructions --out /tmp/ci            # N=50 and N=250
    python -m bench.call_instructions --calls 50 250 --out DIR --variant-pythonpath /tmp/base/src

``--counter strace`` counts system calls instead, by name (``strace -f -c``; the
same calls, the difference over N2-N1)::

    python -m bench.call_instructions --counter strace --calls 20 120 --out /tmp/cs

``--access json`` (or ``text``) counts the access line a production call writes:
the config says ``[log] access = true``, ``level = "info"`` and that format (the
bench's own is ``access = false``, level warning); the lines go to the run's
``stderr.log`` file, written by the process's log-writer thread (counted), as a
service's go to journald's stream socket or a pipe. A run's other info lines (its
start, its stop) fall in both runs and cancel out::

    python -m bench.call_instructions --access json --calls 50 250 --out /tmp/ci-access

``--target haproxy`` counts HAProxy the same way (``haproxy -db``, the config
``bench/harness/targets.py`` renders for the side-by-side runs): the same calls,
the same fleet, one process, one thread.  ``--target bare-bio`` counts the floor of
the design the same way (``bench/bare_bio_splice.py``: the socket-BIO relay
with no head parsing, routing, slot, retry or log; its fleet TLS
session resumed as the ingress does: ``BARE_BIO_REUSE=1``). ``--target lean``
counts the floor of a call's work (``bench/lean_call_splice.py``: the head read,
checked and routed by the project's own parsers, leastconn, the rewrite, the
101 read and checked, the end counted, none of the design's machinery);
``--target-env LEAN_HAND=1`` its hand-written head path instead.

Prints instructions per call in total, OpenSSL's own against the rest (the part
that tells two proxies' CPU apart: ``openssl_and_rest``), and by function group
(callgrind_annotate --inclusive=yes: the Python functions of fleet_ingress, the
interpreter, OpenSSL; the kernel's side is not counted). Each call's start to its end is bounded
(30 s a step), the whole run by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import callgrind, profile
from bench.harness.carrier import FramePool, Recorder, echoed_calls
from bench.harness.children import HOST, REPO, free_port, log
from bench.harness.launch import Launched, fresh_dir, variant_env, wait_port
from bench.harness.targets import (
    Settings,
    haproxy_binary,
    render_haproxy,
    render_ingress,
    splice_argv,
)
from bench.harness.tlsfiles import TLSFiles

STEP = 30.0  # seconds any one step of a call may take under callgrind
WARMUP = 5  # calls before the counted ones (lazy imports, first-time paths): in both runs


async def push(
    port: int, tls: TLSFiles, calls: int, wave: int, messages: int, burst: int = 1
) -> Recorder:
    rec = Recorder()
    await echoed_calls(
        rec, FramePool.build("twilio-like"), (HOST, port), tls.carrier_context(), range(calls),
        wave=wave, messages=messages, step=STEP, burst=burst,
    )  # fmt: skip
    return rec


def warm_then_push(
    port: int, tls: TLSFiles, calls: int, args: argparse.Namespace, deadline: float
) -> float:
    """Once the counted process listens (by `deadline`): WARMUP calls one by
    one, then `calls` counted ones (`--wave`, `--messages`), all by `deadline`.
    Returns the counted calls' seconds."""
    wait_port(port, deadline)
    burst = getattr(args, "burst", 1)  # bench.message_instructions --burst
    asyncio.run(push(port, tls, WARMUP, 1, args.messages, burst))
    t0 = time.monotonic()
    asyncio.run(
        asyncio.wait_for(
            push(port, tls, calls, args.wave, args.messages, burst),
            max(1.0, deadline - time.monotonic()),
        )
    )
    return time.monotonic() - t0


def count(
    calls: int,
    out: Path,
    args: argparse.Namespace,
    *,
    run: str | None = None,
    target_env: dict[str, str] | None = None,
    callgrind_options: tuple[str, ...] = (),
) -> Path:
    """One run under callgrind with ``calls`` counted calls; the callgrind file.
    ``run``: its directory's name under `out` (default ``nCALLS``); ``target_env``:
    more environment for the counted process (a bench variant's switches);
    ``callgrind_options``: valgrind's, before the command (``--toggle-collect``)."""
    work = fresh_dir(out / (run or f"n{calls}"))
    tls = TLSFiles.write(work)
    env = variant_env(args.variant_pythonpath)
    if args.target == "bare-bio":
        env["BARE_BIO_REUSE"] = "1"  # fleet TLS sessions resumed, as the ingress does
    env.update(target_env or {})
    with Launched(work, env) as launched:
        fleet_port = launched.fleet("fleet-a")
        port = free_port()
        # The first probe, at the start, runs under callgrind (or beside it) too: on
        # a busy host it took more than 5 s now and then, the fleet down, every call
        # 503. Its time bounds no call.
        settings = Settings(maxconn=1000, check_interval=600.0, check_timeout=60.0, fall=1, rise=1)
        cg = work / ("strace.out" if args.counter == "strace" else "callgrind.out")
        counter = (
            ["strace", "-f", "-c", "-o", str(cg)]
            if args.counter == "strace"
            else callgrind.argv(cg, *callgrind_options)
        )
        if args.target == "haproxy":
            binary = haproxy_binary()
            if binary is None:
                raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
            config = render_haproxy(settings, tls, port, [fleet_port], work)
            # No health check: HAProxy's first one timed out at 5 s under
            # callgrind whatever `timeout check` said (its fleet down, every
            # call 503); a server with none is up.
            unchecked = config.read_text().replace("default-server check ", "default-server ")
            config.write_text(unchecked)
            counted = [binary, "-db", "-f", str(config)]
        elif args.target in ("bare-bio", "lean"):
            # bare-bio: the floor of the design (no head, route, slot, log): what any
            # call of the ingress's socket-BIO layer costs at least. lean: that and
            # a call's own work (head, route, leastconn, rewrite, 101), no machinery.
            counted = splice_argv(args.target, port, tls, [fleet_port], settings.maxconn)
        else:
            config = render_ingress(settings, tls, port, [fleet_port], work)
            with_access_line(config, args.access)
            one_process = REPO / "bench" / "one_process_ingress.py"
            counted = [sys.executable, str(one_process), "-c", str(config)]
        proc = launched.start([*counter, *counted])
        deadline = time.monotonic() + args.max_seconds
        took = warm_then_push(port, tls, calls, args, deadline)
        log(f"n={calls}: {calls} calls in {took:.0f} s under {args.counter}")
        stop_counted(proc, args.counter)
        proc.wait(timeout=120)
        return cg


BENCH_LOG = 'level = "warning"\naccess = false\n'


def with_access_line(config: Path, access: str | None) -> None:
    """``config`` (render_ingress's) made to write an access line a call in the
    format ``access`` ("json", "text"), at a production level (info); None: as
    rendered (no access line)."""
    if access is None:
        return
    text = config.read_text()
    if BENCH_LOG not in text:
        raise RuntimeError(f"{config}: no [log] section as render_ingress writes it")
    config.write_text(
        text.replace(BENCH_LOG, f'level = "info"\naccess = true\nformat = "{access}"\n')
    )


def stop_counted(proc: subprocess.Popen[bytes], counter: str) -> None:
    """SIGTERM to the process counted: strace ignores it itself while it traces
    a command (a run waited for ever), so under strace its child is sent it."""
    pid = proc.pid
    if counter == "strace":
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pid = int(children[0]) if children else pid
    os.kill(pid, signal.SIGTERM)


def totals(cg: Path) -> dict[str, int]:
    """Inclusive instructions per function (callgrind_annotate --inclusive=yes), and
    each shared object's own (exclusive) instructions as ``[object]``."""
    out: dict[str, int] = {}
    for n, name in callgrind.rows(callgrind.annotate(cg, inclusive=True)):
        out[name] = n
    for n, name in callgrind.rows(callgrind.annotate(cg, inclusive=False)):
        if name == "PROGRAM TOTALS":
            continue
        key = f"self in [{callgrind.shared_object(name)}]"
        out[key] = out.get(key, 0) + n
    return out


# OpenSSL's shared objects as callgrind names them: the system's, and cryptography's
# bundled copy (callgrind names some of the system libcrypto's instructions after it:
# session 41). The rest (the interpreter, uvloop, libc, HAProxy's own) is what each
# proxy adds around the same handshakes.
OPENSSL_OBJECTS = ("libcrypto.so", "libssl.so", "_rust.abi3.so")


def openssl_and_rest(per: dict[str, float]) -> tuple[float, float]:
    """(OpenSSL's own instructions, everyone else's) from ``self in [object]`` rows.

    Their totals do not compare two proxies' CPU: OpenSSL's run several times faster
    an instruction natively than the rest (the elliptic curves and hashes against an
    interpreter's or a proxy's branches and pointers: bench/kernel_cost.py --perf-dso
    beside this), and under valgrind OpenSSL sees no SHA-NI, ADX or AVX-512 (CPUID
    as valgrind 3.19 reports it), so it takes other paths than natively. The rest is
    the part whose count goes with time."""
    openssl = rest = 0.0
    for name, v in per.items():
        if not name.startswith("self in ["):
            continue
        if any(name[9:-1].startswith(o) for o in OPENSSL_OBJECTS):
            openssl += v
        else:
            rest += v
    return openssl, rest


def syscalls(out: Path) -> dict[str, int]:
    """``strace -c``'s summary: calls by system call name (``total``: all of them)."""
    counts = {name: row["calls"] for name, row in profile.strace_counts(out).items()}
    return counts | {"total": sum(counts.values())}


def print_syscalls(files: list[Path], n1: int, n2: int, out: Path) -> None:
    a, b = (syscalls(f) for f in files)
    per = {k: (b.get(k, 0) - a.get(k, 0)) / (n2 - n1) for k in set(a) | set(b)}
    total = per.pop("total", 0.0)
    print(
        f"system calls per call: {total:.1f}"
        f"  (N={n1}: {a.get('total', 0)}, N={n2}: {b.get('total', 0)})"
    )
    for name, v in sorted(per.items(), key=lambda kv: -kv[1]):
        if abs(v) >= 0.05:
            print(f"{v:8.2f}  {name}")
    (out / "syscalls_per_call.json").write_text(
        json.dumps({"total": total, "calls": per}, indent=1)
    )


def add_load_arguments(p: argparse.ArgumentParser, doing: str) -> None:
    """The load's options (`warm_then_push`) and where the runs go, shared with
    `bench.call_profile`; `doing`: what is done to the code ("count", "profile")."""
    p.add_argument("--calls", type=int, nargs=2, default=[50, 250], metavar=("N1", "N2"))
    p.add_argument("--wave", type=int, default=5, help="calls up at once")
    p.add_argument("--messages", type=int, default=4, help="frames relayed each way a call")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant-pythonpath", help=f"src of the code to {doing} (default: this tree)")
    p.add_argument(
        "--access",
        choices=("json", "text"),
        help="write the access line a call (in this format, level info, to the run's "
        "stderr.log) as production does; default: none (access = false)",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(p, "count")
    p.add_argument(
        "--target", choices=("ingress", "haproxy", "bare-bio", "lean"), default="ingress"
    )
    p.add_argument(
        "--target-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more environment for the counted process (a bench variant's switch, "
        "e.g. LEAN_HAND=1 for --target lean's hand-written head path); repeat",
    )
    p.add_argument("--max-seconds", type=float, default=1500.0, help="bound of one run")
    p.add_argument("--top", type=int, default=40)
    p.add_argument(
        "--counter",
        choices=("callgrind", "strace"),
        default="callgrind",
        help="what counts: instructions (callgrind) or system calls by name (strace -f -c)",
    )
    args = p.parse_args(argv)
    n1, n2 = args.calls
    target_env = dict(kv.partition("=")[::2] for kv in args.target_env)
    files = [count(n, args.out, args, target_env=target_env) for n in (n1, n2)]
    if args.counter == "strace":
        print_syscalls(files, n1, n2, args.out)
        return 0
    a, b = (totals(f) for f in files)
    per = {k: (b.get(k, 0) - a.get(k, 0)) / (n2 - n1) for k in set(a) | set(b)}
    total = per.pop("PROGRAM TOTALS", 0.0)
    print(
        f"instructions per call: {total:,.0f}  (N={n1}: {a.get('PROGRAM TOTALS', 0):,}, "
        f"N={n2}: {b.get('PROGRAM TOTALS', 0):,})"
    )
    openssl, rest = openssl_and_rest(per)
    print(f"own instructions per call: OpenSSL {openssl:,.0f}, the rest {rest:,.0f}")
    print("by shared object, own instructions per call:")
    for name, v in sorted(per.items(), key=lambda kv: -kv[1]):
        if name.startswith("self in [") and abs(v) >= 1000:
            print(f"{v:14,.0f}  {name[8:]}")
    print(f"top {args.top} functions, inclusive, per call:")
    functions = [kv for kv in per.items() if not kv[0].startswith("self in [")]
    for name, v in sorted(functions, key=lambda kv: -kv[1])[: args.top]:
        print(f"{v:14,.0f}  {name}")
    (args.out / "per_call.json").write_text(
        json.dumps(
            {"total": total, "openssl": openssl, "not_openssl": rest, "functions": per}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
