"""Child processes of a bench run: every one stopped at the end, even on error."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = 5.0  # for a child to exit on SIGTERM before SIGKILL
_log_name = ["bench"]


def log(msg: str) -> None:
    """A progress line on stderr, ``[bench HH:MM:SS] ...`` (``[soak ...]`` in the soak)."""
    print(f"[{_log_name[0]} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def log_as(name: str) -> None:
    _log_name[0] = name


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the bench dies, however it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without FLEET_INGRESS_* overrides (the config file rules), with
    the repository on PYTHONPATH so ``-m bench.*`` children import this package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    extra = dict(extra or {})
    paths = (extra.pop("PYTHONPATH", None), str(REPO), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Children:
    """Child processes, all stopped (SIGTERM, then SIGKILL, process group too) by ``stop_all``."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def spawn(
        self, argv: list[str], *, cpus: set[int] | None = None, **kw: Any
    ) -> asyncio.subprocess.Process:
        def setup() -> None:
            die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        kw.setdefault("stdin", asyncio.subprocess.DEVNULL)
        kw.setdefault("cwd", str(REPO))
        kw.setdefault("env", child_env())
        proc = await asyncio.create_subprocess_exec(
            *argv, preexec_fn=setup, start_new_session=True, **kw
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    async def stop(proc: asyncio.subprocess.Process, timeout: float = STOP_TIMEOUT) -> int:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        code = await proc.wait()
        # Its own session: anything it left behind (HAProxy workers, helpers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return code

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(p) for p in self.procs), return_exceptions=True)
        self.procs.clear()


# -- the generator protocol: a child streams until it reads ``stop`` on stdin -----------


def stop_on_request(stop: asyncio.Event) -> asyncio.Task[None]:
    """In a generator: set ``stop`` on SIGTERM, SIGINT, a ``stop`` line or EOF on stdin.

    Returns the stdin watcher's task, for the caller to cancel when done."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_stdin() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line or line.strip() == b"stop":
                stop.set()
                return

    return loop.create_task(watch_stdin())


async def stop_generators(procs: list[asyncio.subprocess.Process], timeout: float) -> bool:
    """Ask each generator to stop (``stop`` on its stdin); after ``timeout``, stop them.

    True when every one finished by itself within ``timeout``."""
    for proc in procs:
        if proc.stdin is not None and proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                proc.stdin.write(b"stop\n")
                await proc.stdin.drain()
    finished = True
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(p.wait() for p in procs))
    except TimeoutError:
        finished = False
    for proc in procs:
        await Children.stop(proc, 2.0)
    return finished
