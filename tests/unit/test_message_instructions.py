"""bench.message_instructions' window: uv__io_poll for a uvloop target, the
whole process for HAProxy, and the handshakes' inclusive count taken out."""

from __future__ import annotations

from bench.message_instructions import handshake_instructions, window_options


def test_the_io_window_is_libuvs_poll_phase_but_haproxy_is_counted_whole() -> None:
    assert window_options("io", "ingress") == ("--toggle-collect=uv__io_poll",)
    assert window_options("io", "bare-bio") == ("--toggle-collect=uv__io_poll",)
    assert window_options("io", "haproxy") == ()
    assert window_options("all", "ingress") == ()


def test_the_handshakes_are_ssl_do_handshakes_rows_alone() -> None:
    rows = {
        "PROGRAM TOTALS": 1000,
        "???:SSL_do_handshake [/usr/lib/x86_64-linux-gnu/libssl.so.3]": 300,
        "/x/Modules/_ssl.c:_ssl__SSLSocket_do_handshake [/x/_ssl.so]": 310,
        "???:SSL_do_handshake_more [/x/libssl.so.3]": 7,
        "self in [libssl.so.3]": 400,
    }
    assert handshake_instructions(rows) == 300
