"""systemd's notify protocol (service/sdnotify.py) against a real datagram socket."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from fleet_ingress.service.sdnotify import Notifier


def test_a_receiver_that_stops_reading_costs_dropped_messages_not_a_stuck_loop(
    tmp_path: Path,
) -> None:
    """The notify socket's queue fills (net.unix.max_dgram_qlen, 10 by default):
    a blocking send would hold the supervisor's event loop, and every call's
    slot with it, until the receiver reads again."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    sent = threading.Event()

    def send_many() -> None:
        for n in range(200):
            notifier.notify(f"STATUS={n} calls")
        sent.set()

    threading.Thread(target=send_many, daemon=True).start()
    try:
        assert sent.wait(5), "notify() blocked on a receiver that does not read"
        assert 0 < notifier.dropped < 200
        # What was queued is intact, and the receiver reading again gets new ones.
        receiver.setblocking(False)
        assert receiver.recv(100) == b"STATUS=0 calls"
        while True:
            try:
                receiver.recv(100)
            except BlockingIOError:
                break
        receiver.settimeout(1)
        dropped = notifier.dropped
        notifier.notify("READY=1")
        assert notifier.dropped == dropped, notifier.dropped - dropped
        assert receiver.recv(100) == b"READY=1"
    finally:
        notifier.close()
        receiver.close()
