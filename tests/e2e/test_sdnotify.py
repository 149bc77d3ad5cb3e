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
    slot with it, until the receiver reads again. More are sent than the queue
    holds: systemd raises max_dgram_qlen to 512 as it boots, and the 200 this
    test sent fit in the queue of a machine booted by it (none dropped)."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    sent = threading.Event()
    queue_length = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    many = 2 * queue_length + 100

    def send_many() -> None:
        for n in range(many):
            notifier.notify(f"STATUS={n} calls")
        sent.set()

    threading.Thread(target=send_many, daemon=True).start()
    try:
        assert sent.wait(5), "notify() blocked on a receiver that does not read"
        assert 0 < notifier.dropped < many
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


class _SlowStream:
    """A stderr that takes 0.1 s a write (a busy journal), recording when each
    line landed."""

    def __init__(self) -> None:
        self.landed: list[tuple[float, str]] = []

    def write(self, text: str) -> None:
        import time

        time.sleep(0.1)
        self.landed.append((time.monotonic(), text))

    def flush(self) -> None:
        pass


def test_what_was_logged_before_a_state_change_is_written_before_systemd_hears_it(
    tmp_path: Path, monkeypatch
) -> None:
    """READY=1 after a line: the line is on stderr first (the log writer is a
    thread of its own; an upgrade test read the log between the two). STATUS
    alone waits for nothing."""
    import json
    import logging
    import time

    from fleet_ingress import logs

    stream = _SlowStream()
    sink = logs.StderrSink(stream)  # type: ignore[arg-type]
    sink.setFormatter(logs.JsonFormatter())
    monkeypatch.setattr(logs, "_sink", sink)
    logger = logging.getLogger("test.sdnotify.order")
    logger.handlers[:] = [sink]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        logger.info("upgrade abandoned")
        notifier.notify("READY=1", "STATUS=serving")
        heard = time.monotonic()
        assert receiver.recv(100) == b"READY=1\nSTATUS=serving"
        assert [json.loads(text)["event"] for _, text in stream.landed] == ["upgrade abandoned"]
        assert stream.landed[0][0] <= heard
        logger.info("a status line")
        started = time.monotonic()
        notifier.notify("STATUS=3 calls")
        assert time.monotonic() - started < 0.2  # no state change: no wait (a flush waits 0.25 s)
        assert sink.flush(timeout=5)
    finally:
        receiver.close()
