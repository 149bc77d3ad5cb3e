"""What a fleet-ingress process's start costs in CPU, per entry point, for one
or more trees of the code side by side (`--variant NAME=SRC`, PYTHONPATH).

    python -m bench.start_cost --rounds 15 --variant main=/tmp/main/src --variant branch=src
    python -m bench.start_cost --count --variant main=/tmp/main/src --variant branch=src

CPU (the default): each round, for each variant in turn (the order alternates
round by round), on loopback:

- `sup`, `worker`: `python -m fleet_ingress run -c CONFIG` (process.workers = 1,
  one fleet nothing listens on, so its first probe is refused at once): the
  supervisor's CPU (utime + stime, /proc) when it says READY=1 on its notify
  socket, and its worker's then: exec, imports, configuration, TLS, its hello
  on the slot channel and `serving` (then idle);
- `stat`, `calls`: `fleet-ingress stat|calls -c CONFIG` (the console script)
  against it, the command's rusage;
- `check`: `fleet-ingress check -c CONFIG --trial` (the files judged), rusage;
- `import`: `python -c 'import fleet_ingress.service.worker'` (not through
  the entry point: the same code for every variant, a control for the host);
- `bare`: `python -c pass`.

Then the median of each (ms of CPU): the host is shared, so single runs are
noise and only medians of interleaved rounds compare.

`--count`: instructions (callgrind, the whole process), once a variant, of
the starts that need nothing running: `worker` (`python -m fleet_ingress
worker -c CONFIG --generation 1` outside `run`: it stops at its first step
after its imports and configuration, as it holds no listeners), `stat`
(`fleet-ingress stat -c CONFIG`, no ingress: its imports and configuration,
then the socket refused), `import` as above. Bounded: `--seconds` of wall clock
in all, 60 s for each READY=1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness.tlsfiles import TLSFiles

REPO_SRC = Path(__file__).resolve().parent.parent / "src"
PYTHON = sys.executable
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("fleet-ingress"))
TICK = os.sysconf("SC_CLK_TCK")
READY_WITHIN = 60.0


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_home(home: Path) -> Path:
    """A config, fleets file and certificate in `home`; the config's path."""
    tls = TLSFiles.write(home)
    wss, stats, fleet = _free_ports(3)
    (home / "fleets.txt").write_text(f"https://127.0.0.1:{fleet} name=a\n")
    config = home / "ingress.toml"
    config.write_text(
        f"""
[listen]
wss = "127.0.0.1:{wss}"
acme = ""
stats = "127.0.0.1:{stats}"
admin_socket = "admin.sock"

[tls]
cert = "{tls.server_cert}"
key = "{tls.server_key}"
ca_file = "{tls.ca}"

[fleets]
file = "fleets.txt"
ca_file = "{tls.ca}"

[log]
format = "json"

[process]
workers = 1
"""
    )
    return config


def _env(src: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # compiled once, as an install has them
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = src
    return env


def _cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def _rusage_ms(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (usage.ru_utime + usage.ru_stime) * 1000, proc.returncode


def _until_ready(notify: socket.socket, sup: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_WITHIN
    while time.monotonic() < deadline and sup.poll() is None:
        try:
            said = notify.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in said.splitlines():
            return True
    return False


def cpu_round(src: str, config: Path) -> dict[str, float]:
    """One round of one variant: ms of CPU per start."""
    home, env = config.parent, _env(src)
    took: dict[str, float] = {}
    notify_path = home / "notify.sock"
    notify_path.unlink(missing_ok=True)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        (home / "stderr.log").open("wb") as log,
    ):
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        sup = subprocess.Popen(
            [PYTHON, "-m", "fleet_ingress", "run", "-c", str(config)],
            env={**env, "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            if not _until_ready(notify, sup):
                raise SystemExit(f"{src}: no READY=1: {(home / 'stderr.log').read_text()[-2000:]}")
            children = Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()
            took["sup"] = _cpu_ms(sup.pid)
            took["worker"] = sum(_cpu_ms(int(pid)) for pid in children)
            for command in ("stat", "calls"):
                took[command], code = _rusage_ms([CONSOLE_SCRIPT, command, "-c", str(config)], env)
                if code != 0:
                    raise SystemExit(f"{src}: {command} exited {code}")
        finally:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(30)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait()
    took["check"], _ = _rusage_ms([CONSOLE_SCRIPT, "check", "-c", str(config), "--trial"], env)
    took["import"], _ = _rusage_ms([PYTHON, "-c", "import fleet_ingress.service.worker"], env)
    took["bare"], _ = _rusage_ms([PYTHON, "-c", "pass"], env)
    return took


def count_starts(src: str, config: Path) -> dict[str, float]:
    """Millions of instructions (callgrind) of each start needing nothing running."""
    starts = {
        "worker": [PYTHON, "-m", "fleet_ingress", "worker", "-c", str(config), "--generation", "1"],
        "stat": [CONSOLE_SCRIPT, "stat", "-c", str(config)],
        "import": [PYTHON, "-c", "import fleet_ingress.service.worker"],
    }
    counted: dict[str, float] = {}
    for name, argv in starts.items():
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
            env=_env(src),
            cwd=config.parent,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(f"{src}: {name}: no count from callgrind: {done.stderr[-1000:]}")
        counted[name] = int(found.group(1)) / 1e6
        print(f"{name:7} {counted[name]:9.1f} M  ({src})", file=sys.stderr, flush=True)
    return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=SRC: a tree of the code (PYTHONPATH); default: this tree's src",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--count", action="store_true", help="callgrind instructions, once")
    parser.add_argument("--seconds", type=float, default=1800, help="wall clock bound")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) or {"this": str(REPO_SRC)}
    for src in variants.values():  # compiled once, as an install has them
        subprocess.run([PYTHON, "-m", "compileall", "-q", src], check=True, capture_output=True)
    home = Path(tempfile.mkdtemp(prefix="start-cost-"))
    try:
        config = write_home(home)
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        started = time.monotonic()
        for n in range(1 if args.count else args.rounds):
            for name in list(variants) if n % 2 == 0 else list(reversed(variants)):
                src = variants[name]
                row = count_starts(src, config) if args.count else cpu_round(src, config)
                rows[name].append(row)
                print(n, name, json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
            if time.monotonic() - started > args.seconds:
                print(f"stopped after {n + 1} rounds: --seconds {args.seconds}", flush=True)
                break
    finally:
        shutil.rmtree(home, ignore_errors=True)
    keys = list(next(iter(rows.values()))[0])
    unit = "M instructions" if args.count else "median ms of CPU (user + sys)"
    print(f"{unit}:\n{'variant':10}" + "".join(f"{k:>9}" for k in keys))
    for name, found in rows.items():
        medians = [statistics.median(r[k] for r in found) for k in keys]
        print(f"{name:10}" + "".join(f"{m:9.1f}" for m in medians))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
