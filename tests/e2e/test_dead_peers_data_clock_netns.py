"""When the ingress gives up a connection with data out, measured on a real
socket: the kernel counts the user timeout for data from its first send
(`retrans_stamp`), not from when the peer was last heard. A call on hold is
last heard by a keepalive answer up to `keepalive_idle` (10 s) before a
blackout; something it sends as the blackout begins is the kernel's to count
out at the user timeout after that send. `liveness.given_up_in` counted from
the peer's last word and gave such a call up up to 10 s early, well inside
the blackouts RELIABILITY.md says are ridden out (up to about 18 s).

One namespace (its loopback), one TCP pair, everything arriving dropped
(nftables) for the blackout: no ingress, a few seconds, removed after."""

from __future__ import annotations

import socket
import time

import pytest

from fleet_ingress.net.liveness import TCP_ESTABLISHED, TcpLiveness, given_up_in, read_tcp_info
from tests.support import NetLab

pytestmark = [pytest.mark.uvloop_only, pytest.mark.timeout(40)]

USER_TIMEOUT = 4.0
HEARD_BEFORE = 2.5  # the peer's last word, before the blackout (a keepalive answer's age)


def test_data_sent_into_a_blackout_is_given_up_the_user_timeout_after_it_was_sent(
    netlab: NetLab,
) -> None:
    ns = netlab.namespace("clock")
    listener = netlab.socket_in(ns, lambda: socket.create_server(("127.0.0.1", 0)))
    port = listener.getsockname()[1]
    peer = netlab.socket_in(ns, lambda: socket.create_connection(("127.0.0.1", port), 5))
    ours, _ = listener.accept()
    try:
        TcpLiveness(user_timeout=USER_TIMEOUT, keepalive_idle=0).apply(ours)
        peer.sendall(b"hello")
        assert ours.recv(5) == b"hello"
        time.sleep(HEARD_BEFORE)  # on hold: nothing either way
        netlab.drop_arriving(ns, "lo")
        sent_at = time.monotonic()
        ours.send(b"on hold music resumes" * 5)  # one segment, into the blackout
        due_at = ended_at = None
        while ended_at is None and time.monotonic() - sent_at < USER_TIMEOUT + 5:
            info = read_tcp_info(ours)
            now = time.monotonic() - sent_at
            if info and info[0] != TCP_ESTABLISHED:
                ended_at = now  # the kernel's own timeout (no reset)
            elif due_at is None and given_up_in(info, USER_TIMEOUT) == 0:
                due_at = now
            time.sleep(0.05)
        print(f"given up due {due_at} s after the send, the kernel ended it at {ended_at} s")
        assert ended_at is not None, "the kernel's user timeout never ended the connection"
        assert due_at is not None, "never due before the kernel ended the connection"
        # Not from the peer's last word (counted from it: due about 1.5 s after the send) ...
        assert due_at > USER_TIMEOUT - 0.5, due_at
        # ... and still before the kernel's own end (BACKSTOP later), with the
        # watch's pass (0.5 s) to spare: the reset can be sent.
        assert due_at < ended_at - 0.5, (due_at, ended_at)
    finally:
        for sock in (ours, peer, listener):
            sock.close()
