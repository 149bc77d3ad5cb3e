"""The processes of a script that counts one process from outside (callgrind, perf, strace).

``bench/call_instructions.py``, ``supervisor_instructions.py`` and ``workers_count.py``
drive their counting tools between calls, from blocking code: they start their fleets
and the process they count here, with plain :mod:`subprocess` (the async runs use
:class:`.children.Children`). Every process started in a :class:`Launched` block is
killed when the block ends, however it ends.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from . import fleets
from .children import HOST, REPO, child_env
from .targets import notify_ready


def fresh_dir(path: Path) -> Path:
    """``path``, emptied (``TLSFiles.write`` appends to its files) and made."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def variant_env(pythonpath: str | None) -> dict[str, str]:
    """A child's environment (:func:`.children.child_env`), with ``pythonpath`` first
    when a variant's src is counted (``--variant-pythonpath``)."""
    return child_env({"PYTHONPATH": pythonpath} if pythonpath else None)


class Launched:
    """The fleets and the counted process of one run in ``work``, with ``env``."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Launched:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def fleet(self, name: str, capacity: int = 1000) -> int:
        """A simulated fleet (:mod:`.fleets`, TLS from ``work``'s files), serving: its port."""
        proc = subprocess.Popen(
            fleets.argv(self.work, name, capacity),
            stdout=subprocess.PIPE,
            env=self.env,
            cwd=REPO,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fleet {name} exited ({proc.wait()}) before serving")
        return int(json.loads(line)["port"])

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """``argv`` run in ``work``, its output in ``work``/stdout.log and stderr.log."""
        with (
            (self.work / "stdout.log").open("wb") as out,
            (self.work / "stderr.log").open("wb") as err,
        ):
            proc = subprocess.Popen(argv, env=self.env, cwd=self.work, stdout=out, stderr=err)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
        """SIGTERM, and its exit awaited (valgrind writes its counts on the way out)."""
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)


def wait_port(port: int, deadline: float) -> None:
    """Until something listens on 127.0.0.1:``port``; TimeoutError at ``deadline``."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listening on {port}")


def wait_notified_ready(
    proc: subprocess.Popen[bytes], notify: socket.socket, deadline: float
) -> None:
    """Until ``proc`` sends READY=1 on ``notify`` (its NOTIFY_SOCKET, from
    :func:`.targets.notify_socket`), then the socket drained."""
    notify.settimeout(1.0)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fleet-ingress exited ({proc.returncode}) before READY=1")
        try:
            if notify_ready(notify.recv(4096)):
                drain_notify(notify)
                return
        except TimeoutError:
            continue
    raise TimeoutError("fleet-ingress did not say READY=1")


def drain_notify(notify: socket.socket) -> None:
    """Read what ``notify`` holds, without waiting: the target keeps sending STATUS=
    lines, and a full socket would block its sends."""
    notify.setblocking(False)
    try:
        while notify.recv(4096):
            pass
    except BlockingIOError:
        pass
