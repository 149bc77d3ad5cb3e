"""systemd's fd store as the supervisor takes it up after a crash
(service/fd_store.py): what it was handed, read as systemd hands it (fds from 3,
LISTEN_FDS, LISTEN_FDNAMES) in a process of its own; the state the workers are
taken up with; listeners the configuration moved. Real sockets, no systemd
(tests/e2e/test_under_systemd.py has it whole)."""

from __future__ import annotations

import array
import asyncio
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_ingress.config.fleets_file import load_fleets_file
from fleet_ingress.config.settings import (
    ListenSection,
    edits_hidden,
    file_settings,
    load_config,
    settings_of_text,
)
from fleet_ingress.core.addresses import format_hostport
from fleet_ingress.core.host_view import Counts, WorkerReport
from fleet_ingress.net.listener import bind_tcp
from fleet_ingress.net.tls import CarrierPem, new_ticket_keys, read_pem
from fleet_ingress.service import oom_verdict as oom_verdict_module
from fleet_ingress.service.carrier_certificate import read_carrier_pem, ticket_keys_drawn_for
from fleet_ingress.service.fd_store import (
    CrashSnapshot,
    crash_state,
    drop_moved_listeners,
    store_ticket_keys,
    ticket_keys_taken_up,
)
from fleet_ingress.service.oom_kills import OomCounter
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.supervisor import Supervisor
from fleet_ingress.service.upgrade import (
    STATE_VERSION,
    process_start,
    state_to_json,
    state_to_json_in_turns,
)
from tests.support import NetLab, TLSFiles, need_ipv6_loopback, write_leaf_cert, write_run_home

# In a process of its own: descriptors 3.. as systemd hands them.
CHILD = r"""
import fcntl, json, os, socket, sys
from fleet_ingress.service.fd_store import taken_from_store

listener = socket.create_server(("127.0.0.1", 0))
ours, theirs = socket.socketpair()
connected = socket.create_connection(listener.getsockname())
handed = [listener, ours, listener, connected, ours]  # fds 3, 4, 5, 6, 7
names = ["listen.wss", "worker.123.2", "listen.wss", "listen.acme", "admin"]
for content in sys.argv[2:]:  # snapshots: fds 8, 9...
    memfd = os.memfd_create("snapshot")
    os.write(memfd, content.encode())
    handed.append(fcntl.fcntl(memfd, fcntl.F_DUPFD, 100))  # above what dup2 writes over
    names.append(f"state.{len(names) - 5}")
for content in os.environ.get("TICKETS", "").split(",") if "TICKETS" in os.environ else []:
    memfd = os.memfd_create("tickets")  # then the session ticket keys' (hex)
    os.write(memfd, bytes.fromhex(content))
    handed.append(fcntl.fcntl(memfd, fcntl.F_DUPFD, 100))
    names.append("tls.tickets")
for n, sock in enumerate(handed):
    os.dup2(sock if isinstance(sock, int) else sock.fileno(), 3 + n)
os.environ["LISTEN_FDS"] = str(len(handed))
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[1] == "ours" else "1"
os.environ["LISTEN_FDNAMES"] = ":".join(names)
back = taken_from_store()
open_fds = [fd for fd in range(3, 3 + len(handed)) if os.path.exists(f"/proc/self/fd/{fd}")]
print(json.dumps({
    "taken": {name: sock.fileno() for name, sock in back.sockets.items()},
    "snapshot": back.snapshot,
    "served": None if back.served_before_stop is None else [
        back.served_before_stop.cert.decode(), back.served_before_stop.key.decode()
    ],
    "unused": [what["key"] for what in back.unused],
    "tickets": None if back.ticket_keys is None else back.ticket_keys.hex(),
    "open": open_fds,
    "env": [k for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES") if k in os.environ],
}))
"""


def _child(owner: str, *snapshots: str, tickets: tuple[bytes, ...] | None = None) -> dict:
    """`tickets`: memfds named tls.tickets handed after the snapshots'."""
    env = dict(os.environ)
    if tickets is not None:
        env["TICKETS"] = ",".join(content.hex() for content in tickets)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, owner, *snapshots],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_what_systemd_hands_back_is_taken_once_by_name_and_the_rest_closed():
    seen = _child("ours")
    # The listener and the channel by their names; the listener stored twice
    # taken once; a name not ours and a socket that is not what its name says
    # (listen.acme, connected rather than listening) closed.
    assert seen["taken"] == {"listen.wss": 3, "worker.123.2": 4}
    assert seen["open"] == [3, 4]
    assert seen["env"] == []  # unset, as sd_listen_fds(1) does


def test_the_newest_snapshot_read_whole_is_taken_and_its_descriptors_closed():
    older = json.dumps({"version": STATE_VERSION, "sequence": 7, "generation": 3})
    newer = json.dumps({"version": STATE_VERSION, "sequence": 8, "generation": 4})
    seen = _child("ours", older, newer)
    assert seen["snapshot"]["sequence"] == 8 and seen["snapshot"]["generation"] == 4
    assert seen["taken"] == {"listen.wss": 3, "worker.123.2": 4}
    assert seen["open"] == [3, 4]  # the snapshots' memfds closed once read
    # The newer one cut short by the death as it was written: the older one
    # (the torn one said once logging is set up: `say_unused`).
    torn = _child("ours", older, newer[:-9])
    assert torn["snapshot"]["sequence"] == 7
    assert torn["unused"] == ["listen.acme", "state.1"]  # (acme: connected, not listening)
    assert _child("ours", newer, "")["snapshot"]["sequence"] == 8  # one never written
    # Of a release whose state this one does not understand: none taken.
    other = json.dumps({"version": STATE_VERSION + 1, "sequence": 9})
    assert _child("ours", other)["snapshot"] is None
    assert _child("ours")["snapshot"] is None


@pytest.fixture
def notify_receiver(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    """A notify socket as systemd's (non-blocking: `_stored` reads what was
    sent so far), and its path (NOTIFY_SOCKET)."""
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)
    yield receiver, path
    receiver.close()


@pytest.fixture
def notify_socket(notify_receiver) -> Iterator[tuple[socket.socket, Notifier]]:
    """`notify_receiver`, and a Notifier that sends to it."""
    receiver, path = notify_receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    yield receiver, notifier
    notifier.close()


@pytest.fixture
def socket_ends() -> Iterator[Callable[[int], list[socket.socket]]]:
    """socket_ends(n): one end each of `n` new socket pairs (descriptors to
    store), both ends closed after the test."""
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def make(n: int) -> list[socket.socket]:
        made = [socket.socketpair() for _ in range(n)]
        pairs.extend(made)
        return [a for a, _ in made]

    yield make
    for a, b in pairs:
        a.close()
        b.close()


def _stored(receiver: socket.socket) -> list[tuple[str, list[int]]]:
    """The fd store's messages sent so far: (message, descriptors)."""
    got = []
    while True:
        try:
            message, ancillary, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        except BlockingIOError:
            return got
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        got.append((message.decode(), fds))


def test_snapshots_are_written_in_turn_to_two_memfds_stored_once(notify_socket):
    receiver, notifier = notify_socket
    snapshots = CrashSnapshot(notifier)
    snapshots.write({"generation": 1})
    sent = _stored(receiver)
    # An earlier image's taken out first, then each stored under its name.
    assert [message for message, _ in sent] == [
        "FDSTOREREMOVE=1\nFDNAME=state.0",
        "FDSTORE=1\nFDNAME=state.0",
        "FDSTOREREMOVE=1\nFDNAME=state.1",
        "FDSTORE=1\nFDNAME=state.1",
    ]
    kept = {message.rpartition("=")[2]: fds[0] for message, fds in sent if fds}

    def read(name: str) -> dict | None:  # systemd's copy
        data = os.pread(kept[name], 1 << 20, 0)
        return json.loads(data) if data else None

    first = read("state.1")
    assert first is not None and isinstance(first.pop("written_monotonic"), float)
    assert first == {"version": STATE_VERSION, "sequence": 1, "generation": 1}
    assert read("state.0") is None
    snapshots.write({"generation": 2})
    snapshots.write({"generation": 3, "fleets": ["x" * 5000]})
    snapshots.write({"generation": 4})
    assert _stored(receiver) == []  # stored once: written in place since
    assert (read("state.0")["sequence"], read("state.0")["generation"]) == (4, 4)
    assert (read("state.1")["sequence"], read("state.1")["generation"]) == (3, 3)
    snapshots.discard()  # at a failed start: taken out of the store
    assert [message for message, _ in _stored(receiver)] == [
        "FDSTOREREMOVE=1\nFDNAME=state.0",
        "FDSTOREREMOVE=1\nFDNAME=state.1",
    ]
    for fd in kept.values():
        os.close(fd)
    # Without systemd's notify socket nothing is made.
    quiet = CrashSnapshot(Notifier({}))
    quiet.write({"generation": 1})
    assert quiet._fds == []


def _fleets_state(generation: int, fleets: int = 500) -> dict:
    """A crash snapshot's shape at `fleets` fleets: a long list, a large dict."""
    return {
        "generation": generation,
        "fleets": [
            {"name": f"f{i}", "health": "UP", "last_probe_at": i + 0.5, "note": 'é"\n'}
            for i in range(fleets)
        ],
        "fleet_checks": {"fleets": {f"f{i}": [[0, 1, 2], 0.25] for i in range(fleets)}},
        "running": {"config": "x" * 90_000, "fleets": ["https://f.test"] * 3},
        "empty": [],
        "last_reload": None,
    }


async def test_the_every_second_snapshot_is_encoded_in_turns_as_one_piece_would_be(
    notify_socket,
):
    """At 500 fleets the state is 270 KB, 4-5 ms of encoding: in one piece,
    every second, a floor under the leases the supervisor answers meanwhile
    (the supervisor's scale audit of session 34). In turns, and byte for byte."""
    state = {"sequence": 7, "written_monotonic": 1.5, **_fleets_state(1)}
    assert await state_to_json_in_turns(state) == state_to_json(state)
    assert json.loads(await state_to_json_in_turns({})) == {"version": STATE_VERSION}
    receiver, notifier = notify_socket
    snapshots = CrashSnapshot(notifier)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counter = asyncio.get_running_loop().create_task(count_turns())
    await asyncio.sleep(0)
    await snapshots.write_in_turns(lambda: _fleets_state(1))
    counter.cancel()
    assert turns >= 5  # the fleets alone: 500 by 100
    kept = {message.rpartition("=")[2]: fds[0] for message, fds in _stored(receiver) if fds}
    data = os.pread(kept["state.1"], 1 << 20, 0)
    written = json.loads(data)
    assert written["sequence"] == 1 and isinstance(written.pop("written_monotonic"), float)
    assert data == state_to_json(
        {
            "sequence": 1,
            "written_monotonic": json.loads(data)["written_monotonic"],
            **_fleets_state(1),
        }
    )
    for fd in kept.values():
        os.close(fd)


async def test_a_write_while_the_snapshot_is_encoded_in_turns_is_never_written_over(
    notify_socket,
):
    """A scrape's or an operator change's write comes while the every-second
    one is being encoded: that one, taken before, is dropped; the snapshot is
    never behind what the scrape showed (session 33). Two in turns at once
    (a scrape's while the every-second one is encoded): the one taken later
    stands, whichever ends first."""
    receiver, notifier = notify_socket
    snapshots = CrashSnapshot(notifier)
    snapshots.write({"generation": 1})
    kept = {message.rpartition("=")[2]: fds[0] for message, fds in _stored(receiver) if fds}
    loop = asyncio.get_running_loop()

    def newest() -> dict:
        states = [json.loads(os.pread(fd, 1 << 20, 0)) for fd in kept.values()]
        return max(states, key=lambda state: state["sequence"])

    async def encoding() -> None:  # taken, and part encoded
        for _ in range(2):
            await asyncio.sleep(0)

    in_turns = loop.create_task(snapshots.write_in_turns(lambda: _fleets_state(2)))
    await encoding()
    snapshots.write({"generation": 3})  # a scrape's
    await in_turns
    assert (newest()["sequence"], newest()["generation"]) == (3, 3)
    # Nothing in between: written, in the other memfd (the newest and the one before).
    await snapshots.write_in_turns(lambda: _fleets_state(4))
    states = sorted(json.loads(os.pread(fd, 1 << 20, 0))["generation"] for fd in kept.values())
    assert states == [3, 4]
    # The every-second one (500 fleets) under way when a scrape's (1 fleet) is
    # taken: the scrape's ends first and stands.
    slow = loop.create_task(snapshots.write_in_turns(lambda: _fleets_state(5)))
    await encoding()
    await snapshots.write_in_turns(lambda: _fleets_state(6, fleets=1))
    await slow
    assert newest()["generation"] == 6
    # Taken in that order and ended in that order: both written.
    first = loop.create_task(snapshots.write_in_turns(lambda: _fleets_state(7, fleets=1)))
    await encoding()
    await snapshots.write_in_turns(lambda: _fleets_state(8))
    await first
    states = sorted(json.loads(os.pread(fd, 1 << 20, 0))["generation"] for fd in kept.values())
    assert states == [7, 8]
    # A discard (a failed start) meanwhile: nothing stored again.
    in_turns = loop.create_task(snapshots.write_in_turns(lambda: _fleets_state(9)))
    await encoding()
    snapshots.discard()
    _stored(receiver)
    await in_turns
    assert snapshots._fds == [] and _stored(receiver) == []
    for fd in kept.values():
        os.close(fd)


def test_a_stop_leaves_the_certificate_it_served_alone_for_the_next_start(notify_socket):
    receiver, notifier = notify_socket
    snapshots = CrashSnapshot(notifier)
    snapshots.write({"generation": 1, "calls_lost_total": 3})
    kept = {message.rpartition("=")[2]: fds[0] for message, fds in _stored(receiver) if fds}
    snapshots.stopped(CarrierPem(b"CERT PEM", b"KEY PEM"))
    assert _stored(receiver) == []  # left in the store: a `systemctl restart` keeps it
    written = [os.pread(kept[name], 1 << 20, 0).decode() for name in ("state.0", "state.1")]
    # Both written over: nothing of the running state is left to take up.
    for text in written:
        state = json.loads(text)
        assert state["stopped"] is True and "calls_lost_total" not in state
    seen = _child("ours", *written)
    assert seen["snapshot"] is None and seen["served"] == ["CERT PEM", "KEY PEM"]
    assert seen["open"] == [3, 4]
    # One that cannot be read is said, not served.
    broken = json.dumps({"version": STATE_VERSION, "sequence": 5, "stopped": True, "pem": {}})
    unread = _child("ours", broken)
    assert unread["served"] is None and "state" in unread["unused"]
    for fd in kept.values():
        os.close(fd)


def test_the_session_ticket_keys_are_stored_sealed_with_what_they_were_drawn_for(
    notify_socket,
):
    receiver, notifier = notify_socket
    keys, drawn_for = new_ticket_keys(), hashlib.sha256(b"this certificate").digest()
    store_ticket_keys(notifier, keys, drawn_for)
    sent = _stored(receiver)
    # Those of before (other keys, an earlier image's) taken out first.
    assert [message for message, _ in sent] == [
        "FDSTOREREMOVE=1\nFDNAME=tls.tickets",
        "FDSTORE=1\nFDNAME=tls.tickets",
    ]
    (kept,) = sent[1][1]  # systemd's copy
    try:
        assert os.pread(kept, 1024, 0) == keys + drawn_for
        seals = fcntl.fcntl(kept, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_GROW
        # Taken back as systemd hands it, and taken up for what it was drawn for.
        seen = _child("ours", tickets=(os.pread(kept, 1024, 0),))
        assert seen["open"] == [3, 4]  # its memfd closed once read
        assert ticket_keys_taken_up(bytes.fromhex(seen["tickets"]), drawn_for) == (keys, "")
    finally:
        os.close(kept)
    store_ticket_keys(Notifier({}), keys, drawn_for)  # without systemd: nothing kept
    assert _stored(receiver) == []


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        (None, "none in systemd's fd store"),
        (b"", "0 bytes, not 112"),
        (b"k" * 111, "111 bytes, not 112"),  # cut short
        (b"k" * 80 + hashlib.sha256(b"this certificate").digest() + b"\0", "113 bytes, not 112"),
        (b"k" * 80 + hashlib.sha256(b"the one before").digest(), "another certificate"),
    ],
)
def test_session_ticket_keys_that_cannot_serve_are_not_taken_up(
    stored: bytes | None, problem: str
) -> None:
    keys, why = ticket_keys_taken_up(stored, hashlib.sha256(b"this certificate").digest())
    assert keys is None and problem in why, why


def test_the_first_of_two_session_ticket_keys_handed_back_is_read_whole_or_said() -> None:
    drawn_for = hashlib.sha256(b"this certificate").digest()
    first, second = new_ticket_keys() + drawn_for, new_ticket_keys() + drawn_for
    seen = _child("ours", tickets=(first, second))
    assert bytes.fromhex(seen["tickets"]) == first and seen["open"] == [3, 4]
    # One longer than it should be is read one byte past its size: said too long.
    seen = _child("ours", tickets=(first + b"more",))
    assert bytes.fromhex(seen["tickets"]) == first + b"m"
    assert _child("ours")["tickets"] is None


async def test_a_supervisor_started_after_a_crash_takes_up_the_keys_drawn_for_what_it_serves(
    tls_files: TLSFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The keys the dead supervisor kept serve on when they were drawn for the
    certificate and [tls] served now; missing, cut short, of another size, or
    drawn for another certificate or tls.profile, the keys drawn at this start
    serve, and a warning names the entry and why."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    pem = read_carrier_pem(config)
    keys = new_ticket_keys()
    (tmp_path / "renewed").mkdir()
    write_leaf_cert(tls_files.ca, tmp_path / "renewed")
    renewed = read_pem(tmp_path / "renewed" / "cert.pem", tmp_path / "renewed" / "key.pem")
    modern = config.model_copy(update={"tls": config.tls.model_copy(update={"profile": "modern"})})

    def taken_up(stored: bytes | None) -> tuple[bytes, bytes, list[dict[str, Any]]]:
        """(the keys drawn at its start, the keys it serves, what it warned)."""
        supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
        drawn = supervisor.tickets.ticket_keys
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fleet_ingress.lifecycle"):
            supervisor.tickets.take_up_ticket_keys(
                stored, supervisor.config, supervisor.serving_pem
            )
        said = [r.fields for r in caplog.records if "ticket keys" in r.getMessage()]  # type: ignore[attr-defined]
        return drawn, supervisor.tickets.ticket_keys, said

    drawn, serving, said = taken_up(keys + ticket_keys_drawn_for(config, pem))
    assert serving == keys != drawn and said == []
    for stored, problem in (
        (None, "none in systemd's fd store"),
        ((keys + ticket_keys_drawn_for(config, pem))[:-1], "111 bytes, not 112"),
        (keys + ticket_keys_drawn_for(config, renewed), "another certificate"),
        (keys + ticket_keys_drawn_for(modern, pem), "another certificate"),
    ):
        drawn, serving, said = taken_up(stored)
        assert serving == drawn != keys, problem
        assert [(s["key"], problem in s["problem"]) for s in said] == [("tls.tickets", True)], said


def test_descriptors_meant_for_another_process_are_not_taken():
    seen = _child("another")
    assert seen["taken"] == {} and seen["env"] == []


def test_the_workers_are_taken_up_with_the_newest_generation_serving():
    a, b = socket.socketpair()
    taken = {"listen.wss": a, "worker.11.3": a, "worker.12.3": a, "worker.9.2": b}
    state = crash_state(taken, worker_target=3)
    assert state is not None and state["crash_restart"] is True
    assert state["generation"] == 3
    assert sorted((w["pid"], w["generation"]) for w in state["workers"]) == [
        (9, 2),
        (11, 3),
        (12, 3),
    ]
    assert len(state["respawns"]) == 1  # 3 wanted, 2 of the newest generation
    assert crash_state({"listen.wss": a}, worker_target=2) is None  # no worker to take up
    a.close()
    b.close()


W11, W12, W13 = 4_194_311, 4_194_312, 4_194_313  # no such process: past pid_max


def test_the_workers_are_taken_up_with_what_the_last_snapshot_knew_of_them():
    """The workers' pids are past pid_max: one whose channel was lost is kept
    while its pid runs, and pid 11 was a kernel thread on a CI machine."""
    a, b = socket.socketpair()
    known = {  # what the dead one knew of worker 11 that holds for the next
        "pid": W11,
        "generation": 3,
        "started_at": 5.0,
        "retiring": True,
        "retire_by": 99.0,
        "drain_told": 60.0,
        "held": ["a"],
        "cpu": 1,
    }
    # What its channel and process did there: not this one's.
    worker = {**known, "exit_code": 0, "channel_lost": True, "calls_at_leave": {"1": {}}}
    snapshot = {
        "version": STATE_VERSION,
        "sequence": 40,
        "generation": 3,
        "worker_target": 2,
        "started_monotonic": 1.0,
        "reloads": {"last": {"result": "refused"}},
        "calls_lost_total": 7,
        "queue_timeouts": 3,
        "bound_listen": {"wss": "127.0.0.1:1"},
        "running": {"config": {}},
        "upgrades": [
            {"id": "old", "state": "done", "error": None},
            {"id": "mid", "state": "re-executing", "error": None, "finished": None},
        ],
        "respawns": [1.0, 2.0],
        # 12 exited after the snapshot (its channel did not come back), 13 started after it.
        "workers": [worker, {"pid": W12, "generation": 3, "held": ["b"]}],
    }
    taken = {f"worker.{W11}.3": a, f"worker.{W13}.3": b}
    before = time.monotonic()
    state = crash_state(taken, worker_target=5, snapshot=snapshot)
    assert state is not None and state["crash_restart"] is True
    # What must not reset, taken up; where it ran and what it was short of, as now.
    assert (state["calls_lost_total"], state["queue_timeouts"]) == (7, 3)
    assert state["reloads"] == {"last": {"result": "refused"}}
    assert state["running"] == {"config": {}}
    assert state["bound_listen"] is None
    # 2 wanted; 11 retires (it drains): one replacement due now.
    assert state["worker_target"] == 2 and state["respawns"] == [state["started_monotonic"]]
    assert state["started_monotonic"] >= before  # its uptime says a supervisor died
    assert state["upgrades"][0] == {"id": "old", "state": "done", "error": None}
    assert state["upgrades"][1]["state"] == "failed"
    assert "the supervisor died during it" in state["upgrades"][1]["error"]
    assert state["workers"] == [known, {"pid": W13, "generation": 3}]
    # Known by pid in another generation (a pid used again): not the same worker.
    again = crash_state({f"worker.{W11}.4": a}, worker_target=1, snapshot=snapshot)
    assert again is not None and again["workers"] == [{"pid": W11, "generation": 4}]
    a.close()
    b.close()


def test_a_worker_whose_channel_was_lost_is_kept_counted_while_it_runs():
    """Its channel is in no store (the dead process had lost it), but it drains
    its calls: kept, with what it held and its deadline, while its process runs
    (this test's own, here); one that exited since is not, nor one whose pid
    another process has since."""
    a, b = socket.socketpair()
    kept = {
        "pid": os.getpid(),  # running
        "generation": 2,
        "retiring": True,
        "retire_by": 50.0,
        "held": ["a", "a"],
        "channel_lost": True,
        "lost_confirmed": True,
        "calls_lost": 2,  # what it held as its channel was lost: counted if it dies
    }
    lost = {**kept, "exit_code": None}
    gone = {"pid": 4_194_399, "generation": 2, "channel_lost": True, "held": ["a"]}  # > pid_max
    # Its pid another process's since (this one, which started at another time):
    # not waited for nor killed as a worker.
    reused = {**kept, "generation": 1, "process_start": process_start(os.getpid()) - 1}
    kept["process_start"] = process_start(os.getpid())
    lost["process_start"] = kept["process_start"]
    snapshot = {"version": STATE_VERSION, "sequence": 3, "workers": [lost, gone, reused]}
    state = crash_state({"worker.20.2": a}, worker_target=1, snapshot=snapshot)
    assert state is not None
    assert state["workers"] == [{"pid": 20, "generation": 2}, kept]
    assert state["respawns"] == []  # 20 serves: the one it replaced is not counted
    a.close()
    b.close()


async def test_a_snapshot_written_before_the_workers_are_taken_up_still_knows_them(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A supervisor started after a crash serves its stats listener (and the
    admin socket) before it has taken up the workers (`adopt_workers`: up to
    FIRST_PROBE_WAIT and RESTORE_TIMEOUT); a scrape or `stat` then writes its
    snapshot, in place of the dead one's. It still names the workers it is
    taking up with what the dead one knew of them: a second death meanwhile
    (a crash loop) had the next supervisor forget a worker whose channel was
    lost (its calls counted against no fleet: maxconn passed) and the
    retirement deadline of the others (the review of session 34)."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    a, b = socket.socketpair()
    lost = {  # this test's own process: running, its channel in no store
        "pid": os.getpid(),
        "generation": 1,
        "retiring": True,
        "retire_by": 50.0,
        "held": ["c"],
        "channel_lost": True,
        "lost_confirmed": True,
        "calls_lost": 1,
        "process_start": process_start(os.getpid()),
    }
    retiring = {"pid": 20, "generation": 2, "retiring": True, "retire_by": 60.0, "held": ["c"]}
    snapshot = {"version": STATE_VERSION, "sequence": 3, "workers": [retiring, lost]}
    carried = crash_state({"worker.20.2": a}, worker_target=1, snapshot=snapshot)
    assert carried is not None
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    # Before `adopt_workers`: what a scrape's write takes.
    written = json.loads(state_to_json({"sequence": 4, **supervisor.upgrade.crash_snapshot()}))
    again = crash_state({"worker.20.2": a}, worker_target=1, snapshot=written)
    assert again is not None
    by_pid = {w["pid"]: w for w in again["workers"]}
    assert by_pid[20]["retire_by"] == 60.0 and by_pid[20]["held"] == ["c"]
    assert by_pid[os.getpid()]["channel_lost"] and by_pid[os.getpid()]["held"] == ["c"]
    a.close()
    b.close()


async def test_a_supervisor_started_after_a_crash_tells_hidden_edits_against_the_first_read(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file as the service first read it is in the crash snapshot: the
    supervisor started after a crash tells a reload's hidden edits against it,
    not against the file as it reads it at its own start (queue = 5, edited
    before the crash under FLEET_INGRESS_TIMEOUTS__QUEUE: never said again)."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    path = tmp_path / "ingress.toml"
    config = load_config(path)
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    monkeypatch.setenv("FLEET_INGRESS_TIMEOUTS__QUEUE", "7")
    old = Supervisor(config, specs, path)
    old.file_read_text = path.read_text()  # as its start read it (queue = 3)
    assert "\nqueue = 3\n" in old.file_read_text
    path.write_text(old.file_read_text.replace("\nqueue = 3\n", "\nqueue = 5\n"))
    a, b = socket.socketpair()
    written = json.loads(state_to_json({"sequence": 4, **old.upgrade.crash_snapshot()}))
    carried = crash_state({"worker.20.1": a}, worker_target=1, snapshot=written)
    assert carried is not None
    new = Supervisor(config, specs, path, carried=carried)
    assert new.file_read_carried and new.file_read_text == old.file_read_text
    hidden = edits_hidden(settings_of_text(new.file_read_text), file_settings(path))
    assert [h.split(" is not applied")[0] for h in hidden] == [
        "timeouts.queue: the file's edit (3 -> 5)"
    ], hidden
    # A release that did not carry it: the file as read at this start.
    del written["file_read_text"]
    carried = crash_state({"worker.20.1": a}, worker_target=1, snapshot=written)
    assert carried is not None
    assert not Supervisor(config, specs, path, carried=carried).file_read_carried
    a.close()
    b.close()


def test_a_listener_the_configuration_moved_is_closed_and_taken_out_of_the_store(tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    receiver.settimeout(2)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    wss = socket.create_server(("127.0.0.1", 0))
    stats = socket.create_server(("127.0.0.1", 0))
    port = wss.getsockname()[1]
    taken = {"listen.wss": wss, "listen.stats": stats}
    listen = ListenSection(wss=f"127.0.0.1:{port}", acme="", stats="127.0.0.2:1", admin_socket="")
    assert drop_moved_listeners(taken, listen, notifier) == ["listen.stats"]
    assert taken == {"listen.wss": wss} and stats.fileno() == -1
    assert receiver.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=listen.stats"
    # Bound on every address, named so: kept.
    anywhere = socket.create_server(("0.0.0.0", 0))
    listen = ListenSection(wss=f"0.0.0.0:{anywhere.getsockname()[1]}", acme="", stats="")
    assert drop_moved_listeners({"listen.wss": anywhere}, listen, notifier) == []
    for sock in (wss, anywhere, receiver):
        sock.close()
    notifier.close()


def test_a_listener_on_a_link_local_address_with_its_zone_is_where_configured(
    netlab: NetLab, tmp_path: Path
) -> None:
    """listen.wss = "[fe80::1%lo]:PORT" handed back unchanged: kept. Before (the
    IPv6 audit of session 33) it read as moved, its zone never among what
    getsockname gives (the address, and the interface's index apart): after a
    supervisor's crash its copy was closed and the address bound again while
    the workers taken up still listened there."""
    ns = netlab.namespace("zoned")
    netlab.ip("-n", ns, "addr", "add", "fe80::1/64", "dev", "lo", "nodad")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    for zone, moved in (("lo", []), ("1", []), ("2", ["listen.wss"])):
        sock = netlab.socket_in(ns, lambda: bind_tcp("fe80::1%lo", 0))
        wss = f"[fe80::1%{zone}]:{sock.getsockname()[1]}"
        listen = ListenSection(wss=wss, acme="", stats="", admin_socket="")
        assert drop_moved_listeners({"listen.wss": sock}, listen, notifier) == moved, wss
        sock.close()
    receiver.close()
    notifier.close()


@pytest.mark.parametrize("host", ["::1%1", "::%1"])
def test_a_zone_the_kernel_ignores_is_no_listener_moved(host: str) -> None:
    """A zone on an address that takes none ("[::%1]:443", "[::1%1]:443": glibc
    takes a numeric one, and the kernel binds the address on every interface,
    its scope id 0): handed back by the store it read as moved, the zone's index
    never what getsockname gives, so after a supervisor's crash its copy was
    closed and bound again while the workers taken up still listened there
    ('Address already in use', as for a link-local address before 65ccbe9)."""
    need_ipv6_loopback()
    sock = bind_tcp(host, 0)
    port = sock.getsockname()[1]
    assert sock.getsockname()[3] == 0  # the kernel kept no scope
    listen = ListenSection(wss=f"[{host}]:{port}", acme="", stats="", admin_socket="")
    assert drop_moved_listeners({"listen.wss": sock}, listen, Notifier({})) == []
    sock.close()


def test_a_wildcard_of_the_other_family_is_a_listener_moved(tmp_path):
    """listen.wss from "0.0.0.0:443" to "[::]:443" (an AAAA record added), then
    `systemctl restart` (systemd keeps the store over it): the IPv4-only
    socket was taken up as bound where configured (both are wildcards), and
    every IPv6 carrier was refused while the file, the log and `stat` said
    [::]:443. The other way, the dual-stack one served on where IPv4 alone was
    asked for."""
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 here")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    receiver.settimeout(2)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    ipv4 = socket.create_server(("0.0.0.0", 0))
    port = ipv4.getsockname()[1]
    listen = ListenSection(wss=f"[::]:{port}", acme="", stats="", admin_socket="")
    assert drop_moved_listeners({"listen.wss": ipv4}, listen, notifier) == ["listen.wss"]
    assert ipv4.fileno() == -1
    assert receiver.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=listen.wss"
    both = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = both.getsockname()[1]
    listen = ListenSection(wss=f"0.0.0.0:{port}", acme="", stats="", admin_socket="")
    assert drop_moved_listeners({"listen.wss": both}, listen, notifier) == ["listen.wss"]
    # Each where it is configured: kept.
    for host, family in (("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6)):
        sock = socket.create_server((host, 0), family=family)
        wss = format_hostport(host, sock.getsockname()[1])
        listen = ListenSection(wss=wss, acme="", stats="", admin_socket="")
        assert drop_moved_listeners({"listen.wss": sock}, listen, notifier) == []
        sock.close()
    receiver.close()
    notifier.close()


def test_a_move_that_would_clash_with_the_workers_taken_up_is_kept_where_bound(caplog):
    """After a crash with no usable snapshot (the file's configuration served),
    workers taken up still listen on their copies: a listener moved to where its
    own port clashes ("0.0.0.0:PORT" to "[::]:PORT", or "127.0.0.1:PORT" to
    "0.0.0.0:PORT") was closed, binding the new address failed ('Address already
    in use') and the unit failed, its workers drained (the review of session 33).
    Kept where bound, with a warning naming the fix; a move that cannot clash
    (another address, another port) is still made; with no worker taken up (a
    stop, then a start) the clashing move is made as before."""
    channel, other_end = socket.socketpair()
    workers = {"worker.20.2": channel}
    moves = [("0.0.0.0", "[::]:{port}"), ("127.0.0.1", "0.0.0.0:{port}")]
    for held, wanted in moves:
        sock = socket.create_server((held, 0))
        port = sock.getsockname()[1]
        listen = ListenSection(wss=wanted.format(port=port), acme="", stats="", admin_socket="")
        taken = {"listen.wss": sock, **workers}
        with caplog.at_level(logging.WARNING, logger="fleet_ingress.lifecycle"):
            assert drop_moved_listeners(taken, listen, Notifier({})) == []
        assert taken["listen.wss"] is sock and sock.fileno() != -1
        assert "kept where bound" in caplog.text and "systemctl restart" in caplog.text
        caplog.clear()
        # No worker taken up: nothing clashes, the move is made.
        assert drop_moved_listeners({"listen.wss": sock}, listen, Notifier({})) == ["listen.wss"]
        assert sock.fileno() == -1
    for wanted in ("127.0.0.2:{port}", "127.0.0.1:{other}"):
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        wss = wanted.format(port=port, other=port + 1 if port < 65535 else port - 1)
        listen = ListenSection(wss=wss, acme="", stats="", admin_socket="")
        taken = {"listen.wss": sock, **workers}
        assert drop_moved_listeners(taken, listen, Notifier({})) == ["listen.wss"], wss
        assert "listen.wss" not in taken
    channel.close()
    other_end.close()


async def test_an_oom_kill_seen_before_an_exec_is_the_next_images_to_claim(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker OOM-killed just before an upgrade's exec: the old image read
    the kernel's count risen (its snapshot tick), the exec came before it read
    the worker's death, which the new image reads (the worker is still its
    child). The new image must see that kill as its own to claim; before (the
    review of session 35) it started from the count the old one had read and
    called the death an operator's kill -9 (`reason="killed"`)."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    events = tmp_path / "memory.events"  # the kernel's count, as a memory cgroup has it
    counter = OomCounter(str(events), "memory cgroup /test (cgroup v2 memory.events)")
    monkeypatch.setattr(oom_verdict_module, "find_oom_counter", lambda: counter)
    events.write_text("oom 5\noom_kill 5\n")
    old = Supervisor(config, specs, tmp_path / "ingress.toml")
    events.write_text("oom 6\noom_kill 6\n")  # a worker OOM-killed...
    old.oom_verdict.look_for_oom_kills()  # ...seen by the old image, its death not read yet
    carried = json.loads(json.dumps(old.upgrade._state_for_exec()))
    new = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    assert new.oom_verdict.oom_kills.claim(counter.read(), time.monotonic())
    # One kill, one claim: a kill -9 after it is not the OOM killer's.
    assert not new.oom_verdict.oom_kills.claim(counter.read(), time.monotonic())
    # A crash snapshot carries the count as read: a kill seen and not claimed
    # there is a worker's, not the next supervisor's sign of its own OOM kill.
    assert old.upgrade.crash_snapshot()["oom_kill_count"] == 6


async def test_a_worker_the_supervisor_kills_is_never_taken_for_the_oom_killers(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SIGKILL the supervisor sends goes through `WorkerProcess.kill`,
    which marks it its own: with an OOM kill counted and not yet claimed, the
    death of a worker it killed (its stop's backstop, a failed upgrade's new
    worker: each sent `proc.kill()` unmarked before, the review of session 35)
    is not the OOM killer's, and the kill is left for the death that is."""
    from fleet_ingress.service.worker_process import WorkerProcess

    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    events = tmp_path / "memory.events"
    counter = OomCounter(str(events), "memory cgroup /test (cgroup v2 memory.events)")
    monkeypatch.setattr(oom_verdict_module, "find_oom_counter", lambda: counter)
    events.write_text("oom 1\noom_kill 1\n")
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
    events.write_text("oom 2\noom_kill 2\n")  # another process of the unit OOM-killed
    supervisor.oom_verdict.look_for_oom_kills()
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    worker = WorkerProcess(proc, generation=1, key=1)
    worker.kill()
    code = await asyncio.wait_for(proc.wait(), 5)
    assert code == -9 and worker.killed_here
    assert not await supervisor.oom_verdict.oom_killed(worker, code)
    # The kill counted is still there for a death that was the OOM killer's.
    assert supervisor.oom_verdict.oom_kills.claim(counter.read(), time.monotonic())
    worker.kill()  # a second kill of a process gone raises nothing


class _KernelLogSaying:
    """The kernel's log (/dev/kmsg) as `OomVerdict.oom_killed` reads it: the
    pids it logged OOM kills of."""

    usable = complete = True

    def __init__(self) -> None:
        self.logged: set[int] = set()
        self.last_seq = None

    def read(self, now: float) -> None:
        pass

    def rewind(self, after_seq: object, now: float) -> None:
        pass

    def killed(self, pid: int, now: float) -> bool:
        if pid in self.logged:
            self.logged.discard(pid)
            return True
        return False


async def test_where_the_kernels_log_is_read_it_names_the_oom_killers_deaths(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count is the whole host's (/proc/vmstat: broad): another process's
    OOM kill, then an operator's kill -9 of a worker, within OOM_CREDIT_S. By
    the count alone (main) the kill -9 was the OOM killer's; the kernel's
    log, which names the pid it killed, says it was not. A worker it names
    is, without doubt."""
    from fleet_ingress.service.worker_process import WorkerProcess

    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    vmstat = tmp_path / "vmstat"
    counter = OomCounter(str(vmstat), "the whole host (/proc/vmstat)", broad=True)
    monkeypatch.setattr(oom_verdict_module, "find_oom_counter", lambda: counter)
    kernel_log = _KernelLogSaying()
    monkeypatch.setattr(oom_verdict_module, "KernelLog", lambda: kernel_log)
    vmstat.write_text("oom_kill 1\n")
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
    vmstat.write_text("oom_kill 2\n")  # a process elsewhere on the host
    supervisor.oom_verdict.look_for_oom_kills()

    async def sigkilled() -> tuple[WorkerProcess, int]:
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        worker = WorkerProcess(proc, generation=1, key=proc.pid)
        proc.kill()  # an operator's kill -9 (not `worker.kill()`: not the supervisor's own)
        return worker, await asyncio.wait_for(proc.wait(), 5)

    worker, code = await sigkilled()
    assert not await supervisor.oom_verdict.oom_killed(worker, code)
    assert not worker.oom_possibly
    # One the kernel logged: the OOM killer's, named so (not "possibly").
    worker, code = await sigkilled()
    vmstat.write_text("oom_kill 3\n")
    kernel_log.logged.add(worker.pid)
    assert await supervisor.oom_verdict.oom_killed(worker, code)
    assert worker.oom_logged and not worker.oom_possibly
    # Without the log (not root, the unit's ProtectKernelLogs=): possibly.
    kernel_log.usable = False
    worker, code = await sigkilled()
    vmstat.write_text("oom_kill 4\n")
    assert await supervisor.oom_verdict.oom_killed(worker, code)
    assert worker.oom_possibly and not worker.oom_logged


class _EmulatedStore:
    """systemd's fd store as far as the supervisor's messages go: FDSTORE=1
    keeps a copy of each descriptor under its name, FDSTOREREMOVE=1 closes
    the copies under that name (as systemd does; it also drops a stored
    socket that hangs up, which a channel cut by the supervisor never does:
    its worker's end is open)."""

    def __init__(self, receiver: socket.socket) -> None:
        self.receiver = receiver
        self.kept: dict[str, list[int]] = {}

    def read(self) -> dict[str, list[int]]:
        for message, fds in _stored(self.receiver):
            lines = dict(line.split("=", 1) for line in message.split("\n"))
            name = lines["FDNAME"]
            if lines.get("FDSTORE") == "1":
                self.kept.setdefault(name, []).extend(fds)
            elif lines.get("FDSTOREREMOVE") == "1":
                for fd in self.kept.pop(name, []):
                    os.close(fd)
        return self.kept

    def close(self) -> None:
        for fds in self.kept.values():
            for fd in fds:
                os.close(fd)
        self.kept = {}


def _sees_end(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False


async def test_a_channel_cut_before_adopt_returns_leaves_the_store_though_its_worker_held_nothing(
    tls_files: TLSFiles, tmp_path: Path, notify_socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's channel kept over an exec (an upgrade's, or handed back by
    systemd after a crash) that breaks the protocol in what it sent during the
    exec is cut as the new image serves it, before `adopt()` returns. Holding
    nothing, it has no row to name it by: its copy in systemd's fd store was
    left there (FDSTOREREMOVE skipped), held its channel open, and the worker
    never saw it end: it took calls on a channel nobody reads (each refused
    after answer_timeout) and never drained (the fd-store audit of session 35).
    Taken out of the store, the worker sees the end and drains."""
    receiver, notifier = notify_socket
    store = _EmulatedStore(receiver)
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    ours, theirs = socket.socketpair()  # theirs: the worker's end (this process: it runs)
    name = f"worker.{os.getpid()}.1"
    notifier.store_fd(name, ours.fileno())  # as the image before the exec stored it
    assert list(store.read()) == [name]
    carried = Supervisor(config, specs, tmp_path / "ingress.toml").upgrade._state_for_exec()
    new = Supervisor(config, specs, tmp_path / "ingress.toml", handed={name: ours}, carried=carried)
    new.notifier = notifier
    monkeypatch.setattr(new.pool, "schedule_respawn", lambda delay: None)  # no real replacement
    # Sent during the exec: a "state" the protocol cannot mean (no generation).
    theirs.sendall(b'{"op": "state", "pid": 1}\n')
    theirs.setblocking(False)
    try:
        await new.upgrade.adopt_workers(new.handed)
        (worker,) = new.pool.workers.values()
        assert worker.left.is_set()  # the supervisor took it as gone
        store.read()
        assert name not in store.kept
        assert _sees_end(theirs)  # so the worker drains
    finally:
        await new.close()
        for adopted in new.pool.workers.values():
            adopted.proc._close()  # type: ignore[attr-defined]
        store.close()
        theirs.close()


async def test_a_supervisor_the_kernels_log_names_is_said_killed_by_it(
    tls_files: TLSFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The supervisor started again after a death finds its predecessor's pid
    in the kernel's log (`Killed process PID`): it says so, not "most likely
    (the OOM kills counted rose ...)" with a count that did not rise."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    vmstat = tmp_path / "vmstat"
    counter = OomCounter(str(vmstat), "the whole host (/proc/vmstat)", broad=True)
    monkeypatch.setattr(oom_verdict_module, "find_oom_counter", lambda: counter)
    kernel_log = _KernelLogSaying()
    kernel_log.last_seq = 7
    monkeypatch.setattr(oom_verdict_module, "KernelLog", lambda: kernel_log)
    vmstat.write_text("oom_kill 1\n")
    old = Supervisor(config, specs, tmp_path / "ingress.toml")
    carried = json.loads(json.dumps(old.upgrade.crash_snapshot()))
    carried.update(crash_restart=True, supervisor_pid=4_194_311, oom_kill_counter="/elsewhere")
    kernel_log.logged.add(4_194_311)  # its OOM kill, logged after its last snapshot
    with caplog.at_level(logging.ERROR, logger="fleet_ingress.lifecycle"):
        new = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    assert new.supervisor_oom_kills == 1
    (said,) = [r for r in caplog.records if "OOM killer" in r.getMessage()]
    assert said.fields["oom_kill_logged"] is True  # type: ignore[attr-defined]
    assert "the kernel's log names its pid" in said.getMessage()
    assert "most likely" not in said.getMessage()


async def test_a_supervisor_possibly_oom_killed_is_said_possibly_by_stat_over_exec_and_crash(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal says "died, possibly by the kernel's OOM killer" where the
    count takes in other processes' (the host's /proc/vmstat, the kernel's
    log unread): stat and the page say "possibly" too, from this supervisor
    on and from the next ones (an exec's, a crash's), where on main they said
    "was killed by the kernel's OOM killer once". A handover from a release
    that did not carry which it was: as that one said it, "killed"."""
    from fleet_ingress.ops.admin_client import format_stat_table
    from fleet_ingress.ops.stats_page import render_stats_page
    from fleet_ingress.service.oom_kills import KernelLog

    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    vmstat = tmp_path / "vmstat"
    counter = OomCounter(str(vmstat), "the whole host (/proc/vmstat)", broad=True)
    monkeypatch.setattr(oom_verdict_module, "find_oom_counter", lambda: counter)
    monkeypatch.setattr(oom_verdict_module, "KernelLog", lambda: KernelLog(str(tmp_path / "none")))
    vmstat.write_text("oom_kill 1\n")
    old = Supervisor(config, specs, tmp_path / "ingress.toml")
    carried = json.loads(json.dumps(old.upgrade.crash_snapshot()))
    carried.update(crash_restart=True)
    vmstat.write_text("oom_kill 2\n")  # counted after its last snapshot: it died
    new = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    assert new.supervisor_oom_kills == 1

    def said(supervisor: Supervisor) -> list[str]:
        snap = supervisor.snapshot()
        page = render_stats_page(snap).replace("&#x27;", "'").replace("&#x60;", "`")
        return [format_stat_table(snap), page]

    for shown in said(new):
        assert "the supervisor died, possibly by the kernel's OOM killer, once" in shown
        assert "was killed by the kernel's OOM killer" not in shown
    after_exec = json.loads(json.dumps(new.upgrade._state_for_exec()))
    after_crash = json.loads(json.dumps(new.upgrade.crash_snapshot()))
    after_crash.update(crash_restart=True)
    for carried_on in (after_exec, after_crash):
        for shown in said(Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried_on)):
            assert "the supervisor died, possibly by the kernel's OOM killer, once" in shown
    # A second one, by the service's own count (a v2 memory.events): "killed", 1 of 2 possibly.
    events = tmp_path / "memory.events"
    own = OomCounter(str(events), "memory cgroup /test (cgroup v2 memory.events)")
    monkeypatch.setattr(oom_verdict_module, "find_oom_counter", lambda: own)
    events.write_text("oom_kill 3\n")
    after_crash["oom_kill_counter"], after_crash["oom_kill_count"] = str(events), 2
    third = Supervisor(config, specs, tmp_path / "ingress.toml", carried=after_crash)
    for shown in said(third):
        assert "the supervisor was killed by the kernel's OOM killer 2 times" in shown
        assert "(1 of them possibly: " in shown
    del after_exec["supervisor_oom_kills_possibly"]  # the release before: "killed"
    for shown in said(Supervisor(config, specs, tmp_path / "ingress.toml", carried=after_exec)):
        assert "the supervisor was killed by the kernel's OOM killer once" in shown


async def test_a_worker_oom_killed_as_a_release_without_the_kernels_log_hands_over_is_named(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade from a release that read no kernel log (before session 36;
    or not root there): a worker OOM-killed just before the exec was counted
    by the old image, and its record logged before the new image opened the
    log, which reads what was there as its past. Its death, read by the new
    image, is the count's to name: on main the log, which never noted the
    record, said `killed` (after waiting 0.5 s for it)."""
    from fleet_ingress.service import oom_kills
    from fleet_ingress.service.worker_process import WorkerProcess
    from tests.unit.test_oom_kills import _Kmsg

    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    events = tmp_path / "memory.events"
    counter = OomCounter(str(events), "memory cgroup /test (cgroup v2 memory.events)")
    monkeypatch.setattr(oom_verdict_module, "find_oom_counter", lambda: counter)
    kmsg = _Kmsg(["6,SEQ,1,-;eth0: link up\n"] * 3)
    monkeypatch.setattr(oom_kills, "os", kmsg)  # /dev/kmsg, readable (root)
    events.write_text("oom 5\noom_kill 5\n")
    old = Supervisor(config, specs, tmp_path / "ingress.toml")
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    events.write_text("oom 6\noom_kill 6\n")  # the worker OOM-killed...
    kmsg.log(f"3,SEQ,2,-;Memory cgroup out of memory: Killed process {proc.pid} (python)\n")
    old.oom_verdict.look_for_oom_kills()  # ...counted by the old image, its death not read yet
    carried = json.loads(json.dumps(old.upgrade._state_for_exec()))
    for field in ("kmsg_seq", "supervisor_pid"):  # what the release before did not carry
        del carried[field]
    new = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    worker = WorkerProcess(proc, generation=1, key=proc.pid)
    proc.kill()  # (the OOM killer's SIGKILL, sent before the exec)
    code = await asyncio.wait_for(proc.wait(), 5)
    assert await new.oom_verdict.oom_killed(worker, code)


async def test_auto_workers_are_counted_off_the_loop_at_start(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """process.workers = "auto" at a start: the CPU quota's group, behind a
    cgroup namespace over the host's cgroupfs, is looked for through up to
    5000 groups' cgroup.procs (0.2-0.5 s), read off the loop that serves the
    admin and stats sockets and the first probes meanwhile (on main: on it)."""
    from fleet_ingress.config import settings
    from fleet_ingress.core.cpu_quota import AutoWorkers

    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers="auto")
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    on_loop: list[bool] = []

    class Counted(Exception):
        pass

    def usable_cpus() -> AutoWorkers:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        raise Counted  # no worker started: what is asserted is where this ran

    monkeypatch.setattr(settings, "usable_cpus", usable_cpus)
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
    try:
        with pytest.raises(Counted):
            await supervisor.start()
    finally:
        await supervisor.close()
    assert on_loop == [False]


async def test_an_exec_carrying_its_worker_count_does_not_count_auto_again(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next image of an upgrade's exec takes the serving generation's
    count as carried: "auto" is not counted again (a walk of up to 5000
    groups behind a cgroup namespace over the host's cgroupfs, while no
    supervisor answers); on main it was, its answer unused."""
    from fleet_ingress.config import settings
    from fleet_ingress.core.cpu_quota import AutoWorkers

    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers="auto")
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    counted: list[int] = []

    def usable_cpus() -> AutoWorkers:
        counted.append(1)
        return AutoWorkers(3)

    monkeypatch.setattr(settings, "usable_cpus", usable_cpus)
    old = Supervisor(config, specs, tmp_path / "ingress.toml")
    old.pool.worker_target, old.pool.workers_from = 2, "2 (CPUQuota 200% of 64 CPUs)"
    carried = json.loads(json.dumps(old.upgrade._state_for_exec()))
    new = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    assert (new.pool.worker_target, new.pool.workers_from) == (2, "2 (CPUQuota 200% of 64 CPUs)")
    assert counted == []
    del carried["workers_from"]  # a release that did not carry it: counted
    new = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    assert (new.pool.worker_target, counted) == (2, [1])


def test_an_earlier_images_snapshot_left_by_a_lost_remove_is_not_taken_over_the_newer():
    """Each image numbers its snapshots from 1. An upgrade's exec (or a crash's
    restart) whose FDSTOREREMOVE of state.N was lost to a full notify socket
    left the earlier image's memfds beside the new ones, with a higher sequence
    (a day's: 86,400): that one was taken up after a crash, its fleets, admin
    states and counts from before the newer image's changes. The one written
    last is (the host's monotonic clock)."""
    now = time.monotonic()
    earlier = {"version": STATE_VERSION, "sequence": 86_400, "generation": 3}
    newer = {"version": STATE_VERSION, "sequence": 4, "generation": 4}
    seen = _child(
        "ours",
        json.dumps({**earlier, "written_monotonic": now - 60}),
        json.dumps({**newer, "written_monotonic": now - 1}),
    )
    assert seen["snapshot"]["generation"] == 4, seen["snapshot"]
    # An older release's snapshots, unstamped: by sequence, as before.
    assert _child("ours", json.dumps(earlier), json.dumps(newer))["snapshot"]["sequence"] == 86_400


def _fill(notifier: Notifier) -> int:
    """The receiver's queue filled (bounded): the datagrams sent."""
    sock = notifier._socket()
    for sent in range(100_000):
        try:
            sock.sendto(b"X=1", notifier.address)
        except BlockingIOError:
            return sent
    raise AssertionError("the notify socket never filled")


def _drain(receiver: socket.socket) -> None:
    for _ in range(100_000):
        try:
            receiver.recv(64)
        except BlockingIOError:
            return


def test_a_remove_lost_to_a_full_notify_socket_is_sent_before_the_next_message(
    notify_socket, caplog
):
    """A channel the supervisor cuts must leave the store, or the copy there holds
    it open and the worker never sees it end (session 35). Lost to a full notify
    socket, the remove was never sent again; it goes before the next message."""
    receiver, notifier = notify_socket
    store = _EmulatedStore(receiver)
    a, b = socket.socketpair()
    notifier.store_fd("worker.7.1", a.fileno())
    assert list(store.read()) == ["worker.7.1"]
    _fill(notifier)
    with caplog.at_level(logging.WARNING, "fleet_ingress.systemd"):
        notifier.remove_fd("worker.7.1")
    _drain(receiver)
    notifier.notify("WATCHDOG=1")
    got = [message for message, _ in _stored(receiver)]
    assert got == ["FDSTOREREMOVE=1\nFDNAME=worker.7.1", "WATCHDOG=1"]
    assert "cannot take a descriptor out of systemd's fd store: sent again" in caplog.text
    assert notifier.kept == {}
    a.close()
    b.close()
    store.close()


def test_a_store_after_a_lost_remove_of_its_name_is_not_taken_out_by_it(notify_socket):
    """The name stored again before the lost remove was sent: sent after the
    store, the remove would take the new copy too. It goes first."""
    receiver, notifier = notify_socket
    old, new = os.memfd_create("old"), os.memfd_create("new")
    notifier.store_fd("tls.tickets", old)
    _fill(notifier)
    notifier.remove_fd("tls.tickets")
    _drain(receiver)
    notifier.store_fd("tls.tickets", new)  # the remove goes first
    got = [message for message, _ in _stored(receiver)]
    assert got == ["FDSTOREREMOVE=1\nFDNAME=tls.tickets", "FDSTORE=1\nFDNAME=tls.tickets"]
    assert notifier.kept_count == 1
    os.close(old)
    os.close(new)


def test_what_systemd_keeps_is_counted_against_its_limit_and_a_full_store_said(
    notify_receiver, socket_ends, caplog
):
    """systemd answers no FDSTORE=1: past FileDescriptorStoreMax= it closes what
    it was sent and says so in its journal alone. The supervisor counts what it
    keeps there (a descriptor sent again under its name not twice, as systemd
    does not) and says a store full: log, stat, metrics."""
    receiver, path = notify_receiver
    notifier = Notifier({"NOTIFY_SOCKET": path, "FDSTORE": "3"})
    store = _EmulatedStore(receiver)
    listener = socket.create_server(("127.0.0.1", 0))
    socks = socket_ends(3)
    try:
        notifier.store_fd("listen.wss", listener.fileno())
        notifier.store_fd("listen.wss", listener.fileno())  # the same socket: kept once
        notifier.store_fd("worker.1.1", socks[0].fileno())
        assert (notifier.kept_count, notifier.not_kept) == (2, 0)
        notifier.store_fd("worker.2.1", socks[1].fileno())
        with caplog.at_level(logging.WARNING, "fleet_ingress.systemd"):
            notifier.store_fd("worker.3.1", socks[2].fileno())
        assert (notifier.kept_count, notifier.not_kept) == (3, 1)
        assert "systemd's fd store is full" in caplog.text
        (said,) = [r for r in caplog.records if "fd store is full" in r.getMessage()]
        assert said.fields["name"] == "worker.3.1" and said.fields["max"] == 3  # type: ignore[attr-defined]
        notifier.remove_fd("worker.1.1")  # a worker gone: room again
        assert notifier.kept_count == 2
        store.read()
    finally:
        listener.close()
        store.close()
        notifier.close()


def test_a_unit_that_keeps_nothing_is_not_said_full(notify_receiver, socket_ends, caplog):
    """FileDescriptorStoreMax=0 is the operator's choice (the supervisor's death
    then takes its workers' slots with it): no warning at each store."""
    _, path = notify_receiver
    notifier = Notifier({"NOTIFY_SOCKET": path, "FDSTORE": "0"})
    try:
        with caplog.at_level(logging.WARNING, "fleet_ingress.systemd"):
            notifier.store_fd("worker.1.1", socket_ends(1)[0].fileno())
        assert notifier.not_kept == 0 and "full" not in caplog.text
    finally:
        notifier.close()


async def test_what_the_store_would_not_keep_and_a_lost_remove_go_over_an_exec(
    tls_files: TLSFiles, tmp_path: Path, notify_receiver, socket_ends
) -> None:
    """Over an upgrade's exec the count of what systemd would not keep went back
    to 0 (a counter a scraper saw, carried by every other), what of it is still
    wanted was forgotten, and a remove lost to a full notify socket just before
    it was never sent: the copy held a cut worker's channel open. After a crash,
    the count goes on; the rest was the dead one's."""
    await write_run_home(tls_files, tmp_path, ["https://127.0.0.1:9 name=c"], workers=1)
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    receiver, path = notify_receiver
    env = {"NOTIFY_SOCKET": path, "FDSTORE": "1"}
    socks = socket_ends(2)
    notifiers = [Notifier(env) for _ in range(3)]
    try:
        old = Supervisor(config, specs, tmp_path / "ingress.toml")
        old.notifier = notifiers[0]
        old.notifier.store_fd("worker.1.1", socks[0].fileno())
        old.notifier.store_fd("worker.2.1", socks[1].fileno())  # full: not kept
        _fill(old.notifier)
        old.notifier.remove_fd("worker.1.1")  # cut on purpose, its remove lost
        _drain(receiver)
        carried = json.loads(json.dumps(old.upgrade._state_for_exec()))
        new = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
        new.store_taken_up.take_up_fd_store(notifiers[1])
        assert (notifiers[1].not_kept, notifiers[1].unkept) == (1, {"worker.2.1"})
        notifiers[1].notify("WATCHDOG=1")
        got = [message for message, _ in _stored(receiver)]
        assert got == ["FDSTOREREMOVE=1\nFDNAME=worker.1.1", "WATCHDOG=1"], got
        crashed = crash_state({"worker.9.1": socks[0]}, 1, old.upgrade.crash_snapshot())
        assert crashed is not None
        after = Supervisor(config, specs, tmp_path / "ingress.toml", carried=crashed)
        after.store_taken_up.take_up_fd_store(notifiers[2])
        assert (notifiers[2].not_kept, notifiers[2].unkept, notifiers[2].owed) == (1, set(), [])
    finally:
        for notifier in notifiers:
            notifier.close()


@pytest.mark.parametrize(
    ("cgroup", "limit"),
    [
        ("0::/system.slice/fleet-ingress.service\n", 1024),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/fleet-ingress.service\n", 64),
        ("0::/system.slice/gone.service\n", None),
    ],
    ids=["system", "user", "not-loaded"],
)
def test_the_store_limit_is_asked_of_the_manager_the_unit_runs_under(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cgroup: str, limit: int | None
) -> None:
    """systemd 252 sets no $FDSTORE: `systemctl show` says the limit. A unit of a
    user's manager was asked of the system's, which shows a unit it has not
    loaded with the defaults: FileDescriptorStoreMax=0, read as the operator's
    choice to keep nothing, and a full store was never said."""
    from fleet_ingress.service import fd_store as fd_store_module

    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    # As systemd answers: the system's manager has fleet-ingress.service loaded
    # (1024), a user's has its own (64); a unit not loaded shows the defaults.
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        "  *--user*fleet-ingress.service) max=64; state=loaded ;;\n"
        "  *--user*) max=0; state=not-found ;;\n"
        "  *user@*|*gone.service) max=0; state=not-found ;;\n"
        "  *fleet-ingress.service) max=1024; state=loaded ;;\n"
        "esac\n"
        'case "$*" in *--value*) echo "$max" ;; *) printf "LoadState=%s\\nFileDescriptor'
        'StoreMax=%s\\n" "$state" "$max" ;; esac\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    (tmp_path / "cgroup").write_text(cgroup)
    monkeypatch.setattr(fd_store_module, "Path", lambda _: tmp_path / "cgroup")
    assert fd_store_module.read_store_max({}) == limit


def test_a_moved_listeners_remove_lost_to_a_full_notify_socket_is_sent_by_the_supervisor(
    notify_receiver, monkeypatch
):
    """After a crash, a listener the configuration moved is taken out of the
    store through a notifier of its own: its remove lost to a full notify socket
    went with it, and systemd kept the old copy (the old address bound, held by
    systemd with nobody accepting, until a stop; counted against the limit
    but not by the supervisor). Now the supervisor's notifier owes it, and it
    stays counted until sent."""
    from types import SimpleNamespace

    from fleet_ingress.cli import _take_up_after_crash
    from fleet_ingress.service.fd_store import HandedBack

    receiver, path = notify_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    stats = socket.create_server(("127.0.0.1", 0))
    stat = os.fstat(stats.fileno())
    stored = HandedBack(
        sockets={"listen.stats": stats}, kept=[("listen.stats", (stat.st_dev, stat.st_ino))]
    )
    config = SimpleNamespace(
        listen=ListenSection(wss="127.0.0.1:1", acme="", stats="127.0.0.2:1", admin_socket=""),
        process=SimpleNamespace(worker_count=lambda: 1),
    )
    filler = Notifier({"NOTIFY_SOCKET": path})
    try:
        _fill(filler)
        sockets, carried = _take_up_after_crash(stored, config, False)
        assert (sockets, carried) == ({}, None) and stats.fileno() == -1
        assert stored.kept == [("listen.stats", (stat.st_dev, stat.st_ino))]  # still there
        assert getattr(stored, "owed", []) == ["listen.stats"]
        _drain(receiver)
        supervisors = Notifier({"NOTIFY_SOCKET": path})
        supervisors.kept = {"listen.stats": [(stat.st_dev, stat.st_ino)]}
        supervisors.owe_removes(stored.owed)
        supervisors.notify("WATCHDOG=1")
        got = [message for message, _ in _stored(receiver)]
        assert got == ["FDSTOREREMOVE=1\nFDNAME=listen.stats", "WATCHDOG=1"], got
        assert supervisors.kept_count == 0
        supervisors.close()
    finally:
        filler.close()


def test_what_was_stored_before_the_limit_was_known_is_set_against_it(
    notify_receiver, socket_ends, caplog
):
    """FileDescriptorStoreMax= read in the background (`systemctl show`) as the
    supervisor starts: what was stored meanwhile is counted, then set against
    the limit once known as systemd did, in the order stored (what it handed
    back first, a remove freeing its room): past it, not kept, and said."""
    _, path = notify_receiver
    socks = socket_ends(4)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    handed = os.fstat(socks[0].fileno())
    notifier.kept = {"listen.wss": [(handed.st_dev, handed.st_ino)]}
    notifier.awaiting_limit = True
    notifier.store_fd("worker.1.1", socks[1].fileno())  # 2 of 2
    notifier.store_fd("worker.2.1", socks[2].fileno())  # 3 of 2: refused as it came
    notifier.remove_fd("worker.1.1")  # room again, before the next
    notifier.store_fd("worker.3.1", socks[3].fileno())  # 2 of 2: kept
    assert (notifier.kept_count, notifier.not_kept) == (3, 0)
    with caplog.at_level(logging.WARNING, "fleet_ingress.systemd"):
        notifier.limit_known(2)
    assert notifier.store_max == 2
    assert sorted(notifier.kept) == ["listen.wss", "worker.3.1"]
    assert (notifier.not_kept, notifier.unkept) == (1, {"worker.2.1"})
    assert [r.name for r in caplog.records if "not kept" in r.getMessage()] == [
        "fleet_ingress.systemd"
    ]
    # Known: a store past it is said as it is made; nothing is kept for later.
    assert not notifier.awaiting_limit and notifier._stored_unknown == []
    zero = Notifier({"NOTIFY_SOCKET": path})
    zero.awaiting_limit = True
    zero.store_fd("worker.1.1", socks[1].fileno())
    zero.limit_known(0)  # the operator's choice to keep nothing: not said
    assert (zero.store_max, zero.not_kept) == (0, 0)
    notifier.close()
    zero.close()


def test_a_store_refused_before_the_limit_was_known_stays_refused_after_a_remove(
    notify_receiver, socket_ends, caplog
):
    """systemd refuses a store past FileDescriptorStoreMax= as it comes: a
    remove sent after it (a worker gone) frees room for the next store, not for
    the one already closed. Set against the limit by where it stood once the
    limit was known, that store was counted as kept: the count past what
    systemd held, nothing said, and it never stored again at a reload."""
    _, path = notify_receiver
    socks = socket_ends(3)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    handed = os.fstat(socks[0].fileno())
    notifier.kept = {"listen.wss": [(handed.st_dev, handed.st_ino)]}
    notifier.awaiting_limit = True
    notifier.store_fd("worker.1.1", socks[1].fileno())  # 2 of 2: kept
    notifier.store_fd("worker.2.1", socks[2].fileno())  # 3 of 2: closed by systemd
    notifier.remove_fd("worker.1.1")  # after it: room for the next, not for it
    with caplog.at_level(logging.WARNING, "fleet_ingress.systemd"):
        notifier.limit_known(2)
    assert sorted(notifier.kept) == ["listen.wss"]
    assert (notifier.kept_count, notifier.not_kept) == (1, 1)
    assert notifier.unkept == {"worker.2.1"}  # stored again at the next reload
    assert [r for r in caplog.records if "not kept" in r.getMessage()]
    notifier.close()


def _report(pid: int, seq: int, calls: int) -> WorkerReport:
    """A live worker's cumulative report (`WorkerReporter`'s shape, trimmed)."""
    counts = Counts()
    counts.counters[("fleet_calls", "c")] = calls
    counts.counters[("bytes_from_carrier",)] = 160 * calls
    counts.gauges[("active_calls",)] = calls % 3
    return WorkerReport(pid=pid, generation=1, seq=seq, started=1.7e9, counts=counts, calls=1)


async def test_a_quiet_supervisors_snapshot_is_written_as_what_a_crash_restart_takes_up_moves(
    tls_files: TLSFiles, tmp_path: Path, notify_socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The every-second snapshot (`CrashSnapshot.keep_up`) is encoded and
    written when what a crash restart takes up at once moved (a fleet's
    health, a worker leaving, an upgrade's status changed in place, the OOM
    kills counted), and otherwise every QUIET_WRITE_EVERY: a minute of probes
    and reports moving counters and times alone wrote nothing (main wrote it
    60 times, 1.9 M instructions a second, session 39). What it wrote last is
    what the supervisor started after a death takes up."""
    from fleet_ingress.core.health import Health
    from fleet_ingress.service import snapshot_pace

    await write_run_home(
        tls_files, tmp_path, ["https://127.0.0.1:9 name=c", "https://127.0.0.1:10 name=d"]
    )
    config = load_config(tmp_path / "ingress.toml")
    specs = load_fleets_file(tmp_path / "fleets.txt", default_maxconn=config.fleets.maxconn)
    supervisor = Supervisor(config, specs, tmp_path / "ingress.toml")
    receiver, notifier = notify_socket
    snapshots = CrashSnapshot(notifier)
    take = supervisor.upgrade.crash_snapshot
    fleet = supervisor.balancer.fleets[0]
    fleet.health = Health.UP
    worker = os.getpid()  # this test's process: a worker whose report is kept
    supervisor.view.report(_report(worker, 1, 1), time.monotonic())
    assert await snapshots.keep_up(take)  # the first: written
    kept = {message.rpartition("=")[2]: fds[0] for message, fds in _stored(receiver) if fds}

    def newest() -> dict:
        states = [json.loads(data) for fd in kept.values() if (data := os.pread(fd, 1 << 22, 0))]
        return max(states, key=lambda state: state["sequence"])

    def a_quiet_second(second: int) -> None:
        """What moves each second on its own: probes, their figures, reports."""
        for f in supervisor.balancer.fleets:
            f.probes_total += 1
            f.last_probe_monotonic = time.monotonic()
            f.last_probe_at = time.time()
            f.last_probe_seconds = 0.001 * (second % 7 + 1)
            f.reported_available = 10 + second % 3
            supervisor.metrics.checks.check_observed(f.name, 0.002)
        supervisor.slots.queue_timeouts += 1
        supervisor.view.report(_report(worker, second + 2, second + 2), time.monotonic())

    for second in range(60):
        a_quiet_second(second)
        assert not await snapshots.keep_up(take), f"written after {second + 1} quiet seconds"
    assert newest()["sequence"] == 1
    # Past QUIET_WRITE_EVERY since the last write: written, counters as they are now.
    monkeypatch.setattr(snapshot_pace, "QUIET_WRITE_EVERY", 0.0)
    assert await snapshots.keep_up(take)
    assert newest()["queue_timeouts"] == 60
    assert newest()["fleets"][0]["probes_total"] == fleet.probes_total == 60
    monkeypatch.undo()
    a_quiet_second(60)
    assert not await snapshots.keep_up(take)

    # Each of these moves what a crash restart takes up: written at the next take.
    def health() -> None:
        fleet.health = Health.DOWN

    def upgrade_in_place() -> None:  # an upgrade's status, the same dict changed
        status = supervisor.upgrade.statuses["u1"]
        status["state"] = "failed"

    def oom_kill() -> None:
        supervisor.oom_verdict.oom_kills.seen((supervisor.oom_verdict.oom_kills.last or 0) + 1, 0.0)

    def worker_gone() -> None:
        supervisor.view.leave((worker, 1))

    supervisor.upgrade.statuses["u1"] = {"id": "u1", "state": "running"}
    assert await snapshots.keep_up(take)
    for change in (health, upgrade_in_place, oom_kill, worker_gone):
        a_quiet_second(61)
        change()
        assert await snapshots.keep_up(take), change.__name__
        a_quiet_second(62)
        assert not await snapshots.keep_up(take), change.__name__
    written = newest()
    assert written["upgrades"] == [{"id": "u1", "state": "failed"}]
    assert written["view"]["retired"]["counters"] == [
        ["bytes_from_carrier", 160 * 64],
        ["fleet_calls", "c", 64],
    ]
    # A scrape's write (`write`) is the last written for the next take too.
    a_quiet_second(63)
    snapshots.write(take())
    assert not await snapshots.keep_up(take)

    # What the supervisor started after a death takes up: the fleet down, the
    # worker's totals retired.
    a, b = socket.socketpair()
    carried = crash_state({"worker.20.1": a}, worker_target=1, snapshot=newest())
    assert carried is not None
    again = Supervisor(config, specs, tmp_path / "ingress.toml", carried=carried)
    assert {f.name: f.health for f in again.balancer.fleets} == {"c": Health.DOWN, "d": Health.INIT}
    assert again.view.retired.counters[("fleet_calls", "c")] == 64
    a.close()
    b.close()
    for fd in kept.values():
        os.close(fd)
