"""systemd's fd store as the supervisor takes it up after a crash
(service/fd_store.py): what it was handed, read as systemd hands it (fds from 3,
LISTEN_FDS, LISTEN_FDNAMES) in a process of its own; the state the workers are
taken up with; listeners the configuration moved. Real sockets, no systemd
(tests/e2e/test_under_systemd.py has it whole)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from fleet_ingress.config.settings import ListenSection
from fleet_ingress.service.fd_store import crash_state, drop_moved_listeners
from fleet_ingress.service.sdnotify import Notifier

# In a process of its own: descriptors 3.. as systemd hands them.
CHILD = r"""
import json, os, socket, sys
from fleet_ingress.service.fd_store import taken_from_store

listener = socket.create_server(("127.0.0.1", 0))
ours, theirs = socket.socketpair()
connected = socket.create_connection(listener.getsockname())
handed = [listener, ours, listener, connected, ours]  # fds 3, 4, 5, 6, 7
for n, sock in enumerate(handed):
    os.dup2(sock.fileno(), 3 + n)
os.environ["LISTEN_FDS"] = str(len(handed))
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[1] == "ours" else "1"
os.environ["LISTEN_FDNAMES"] = "listen.wss:worker.123.2:listen.wss:listen.acme:admin"
taken = taken_from_store()
open_fds = [fd for fd in range(3, 8) if os.path.exists(f"/proc/self/fd/{fd}")]
print(json.dumps({
    "taken": {name: sock.fileno() for name, sock in taken.items()},
    "open": open_fds,
    "env": [k for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES") if k in os.environ],
}))
"""


def _child(owner: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, owner], capture_output=True, text=True, timeout=30
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
