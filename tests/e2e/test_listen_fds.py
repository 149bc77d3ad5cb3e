"""Listeners opened once, handed to a worker process and kept across the
supervisor's re-execution (service/listen_fds.py), with real processes and
real sockets on loopback (the programs are listen_fds_child.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fleet_ingress.net.listener import bind_tcp
from fleet_ingress.service.listen_fds import (
    LISTEN_FDS,
    LISTEN_PID,
    ListenFdsError,
    adopt,
    describe,
    handover_env,
    pass_fds,
    worker_key,
)
from tests.support import eventually

CHILD = Path(__file__).with_name("listen_fds_child.py")


class Program:
    def __init__(self, *args: str, **popen: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            **popen,
        )
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == kind]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _greeting(address: Any, family: int = socket.AF_INET) -> str:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(address)
        return s.makefile().readline().strip()


async def test_a_worker_inherits_the_listeners_by_key_and_serves_them(tmp_path):
    tcp = bind_tcp("127.0.0.1", 0)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "s"))
    unix.listen()
    socks = {"listen.wss": tcp, "listen.admin_socket": unix}
    worker = Program("worker", env=handover_env(socks), pass_fds=pass_fds(socks))
    try:
        await eventually(lambda: worker.of("adopted"), timeout=20)
        (adopted,) = worker.of("adopted")
        assert adopted["keys"] == ["listen.admin_socket", "listen.wss"]
        # Unset once adopted, and not inherited further unless passed on purpose.
        assert adopted["env_left"] is None and adopted["inheritable"] == [False, False]
        # This process never accepts: the answers can only come from the worker.
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, _greeting, tcp.getsockname())
        assert got == f"0 {worker.proc.pid}"
        got = await loop.run_in_executor(None, _greeting, str(tmp_path / "s"), socket.AF_UNIX)
        assert got == f"0 {worker.proc.pid}"
    finally:
        worker.stop()
        tcp.close()
        unix.close()


def _connect_loop(
    port: int, stop: threading.Event, attempts: list[tuple[float, float, str]], kept: list
) -> None:
    """Connect as fast as possible (bounded), note each attempt's start, end
    and outcome; keep one connection per 10 ms open to read its greeting later
    (sampled by time, not by count: on a loaded host thousands of attempts may
    come before the exec, and a count would spend the sockets on them)."""
    deadline = time.monotonic() + 20
    keep_next = 0.0
    for _ in range(30_000):
        if stop.is_set() or time.monotonic() > deadline:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        started = time.monotonic()
        try:
            s.connect(("127.0.0.1", port))
            outcome = "ok"
        except ConnectionRefusedError:
            outcome = "refused"
        except OSError as exc:
            outcome = f"error: {exc}"
        attempts.append((started, time.monotonic(), outcome))
        if outcome == "ok" and started >= keep_next and len(kept) < 800:
            keep_next = started + 0.01
            kept.append((started, s))
        else:
            s.close()


@pytest.mark.uvloop_only
async def test_no_connection_is_refused_while_the_supervisor_reexecutes(tmp_path):
    sup = Program("supervisor", "1", str(tmp_path / "admin.sock"))
    stop = threading.Event()
    attempts: list[tuple[float, float, str]] = []
    kept: list[tuple[float, socket.socket]] = []
    client: threading.Thread | None = None
    try:
        await eventually(lambda: sup.of("listening"), timeout=20)
        (listening,) = sup.of("listening")
        client = threading.Thread(
            target=_connect_loop, args=(listening["port"], stop, attempts, kept)
        )
        client.start()
        await eventually(lambda: len(attempts) >= 200)
        os.kill(sup.proc.pid, signal.SIGUSR2)
        await eventually(lambda: sup.of("adopted"), timeout=20)
        (adopted,) = sup.of("adopted")
        after = len(attempts)
        await eventually(lambda: len(attempts) >= after + 200)
        stop.set()
        client.join(10)
        (exec_event,) = sup.of("exec")

        outcomes = [outcome for _, _, outcome in attempts]
        assert outcomes.count("ok") == len(outcomes), {o for o in outcomes if o != "ok"}
        assert adopted["pid"] == listening["pid"] == sup.proc.pid  # same PID
        assert adopted["keys"] == ["listen.admin_socket", "listen.wss"]
        # The client was connecting all through the exec, when nobody accepted.
        during = [a for a in attempts if exec_event["t"] <= a[0] <= adopted["t"]]
        assert len(during) >= 10, (len(during), adopted["t"] - exec_event["t"])

        # Each connection kept open is answered: by generation 1 before the
        # exec, by generation 2 (from the backlog) from the exec on.
        loop = asyncio.get_running_loop()
        for started, s in kept:
            line = await loop.run_in_executor(None, s.makefile().readline)
            generation, pid = line.split()
            assert int(pid) == sup.proc.pid
            if started > exec_event["t"]:
                assert generation == "2"
            elif started < exec_event["t"] - 0.5:
                assert generation == "1"
        assert any(started > exec_event["t"] for started, _ in kept)
        # The Unix listener went through the exec as well.
        got = await loop.run_in_executor(
            None, _greeting, str(tmp_path / "admin.sock"), socket.AF_UNIX
        )
        assert got == f"2 {sup.proc.pid}"
    finally:
        stop.set()
        if client is not None:
            client.join(10)
        for _, s in kept:
            s.close()
        sup.stop()


def _env(socks: dict[str, socket.socket], **extra: str) -> dict[str, str]:
    return {LISTEN_FDS: describe(socks), **extra}


def test_adopt_without_the_variable_or_for_another_pid_takes_nothing():
    assert adopt({}) == {}
    tcp = bind_tcp("127.0.0.1", 0)
    try:
        env = _env({"listen.wss": tcp}, **{LISTEN_PID: str(os.getpid() + 1)})
        assert adopt(env) == {} and env == {}  # unset all the same
    finally:
        tcp.close()


def test_adopt_takes_the_listeners_of_this_pid_and_unsets_the_variables():
    tcp = bind_tcp("127.0.0.1", 0)
    port = tcp.getsockname()[1]
    env = _env({"listen.wss": tcp}, **{LISTEN_PID: str(os.getpid())})
    socks = adopt(env)
    try:
        assert list(socks) == ["listen.wss"] and env == {}
        assert socks["listen.wss"].fileno() == tcp.fileno()
        assert socks["listen.wss"].getsockname()[1] == port
    finally:
        socks["listen.wss"].detach()
        tcp.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("pipe", "listen.wss: inherited fd \\d+ is not a socket"),
        ("connected", "listen.wss: inherited fd \\d+ is a socket but not listening"),
        ("garbage", "is not KEY=FD"),
    ],
)
def test_adopt_names_the_key_and_the_fix_when_an_fd_is_not_a_listener(make, message):
    opened: list[Any] = []
    try:
        if make == "pipe":
            r, w = os.pipe()
            opened += [r, w]
            value = f"listen.wss={r}"
        elif make == "connected":
            a, b = socket.socketpair()
            opened += [a.detach(), b.detach()]
            value = f"listen.wss={opened[0]}"
        else:
            value = "listen.wss:7"
        with pytest.raises(ListenFdsError, match=message) as caught:
            adopt({LISTEN_FDS: value})
        assert f"unset {LISTEN_FDS}" in str(caught.value)
    finally:
        for fd in opened:
            os.close(fd)


def test_a_key_that_cannot_be_named_is_refused():
    with socket.socket() as s, pytest.raises(ValueError, match="cannot be named"):
        describe({"a,b": s})


def test_worker_channels_go_over_by_pid_and_generation_and_must_be_connected():
    ours, theirs = socket.socketpair()
    tcp = bind_tcp("127.0.0.1", 0)
    try:
        env = _env({"worker.4242.3": ours, "listen.wss": tcp})
        socks = adopt(env)
        assert sorted(socks) == ["listen.wss", "worker.4242.3"]
        assert worker_key("worker.4242.3") == (4242, 3) and worker_key("listen.wss") is None
        for sock in socks.values():
            sock.detach()
        with pytest.raises(ListenFdsError, match="not a connected Unix socket to a worker"):
            adopt(_env({"worker.1.1": tcp}))
        with pytest.raises(ListenFdsError, match=r"is not worker\.PID\.GENERATION"):
            adopt({LISTEN_FDS: f"worker.x={ours.fileno()}"})
    finally:
        for s in (ours, theirs, tcp):
            s.close()
