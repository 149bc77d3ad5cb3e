"""bench/call_instructions.py's split of a call's instructions: OpenSSL's own and the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench import call_instructions
from bench.harness.targets import Settings, render_ingress
from bench.harness.tlsfiles import TLSFiles

from fleet_ingress.config.settings import load_config


def test_openssl_and_the_rest_are_split_by_shared_object() -> None:
    # Rows as `totals` makes them: inclusive per function, own per object in brackets.
    per = {
        "self in [libcrypto.so.3]": 4_000_000.0,
        "self in [libssl.so.3]": 300_000.0,
        "self in [_rust.abi3.so]": 1_000_000.0,  # callgrind's name for libcrypto's, at times
        "self in [libpython3.11.so.1.0]": 1_400_000.0,
        "self in [loop.cpython-311-x86_64-linux-gnu.so]": 100_000.0,
        "self in [libc.so.6]": 500_000.0,
        "self in [???]": 20_000.0,
        "???:SSL_do_handshake [/usr/lib/x86_64-linux-gnu/libssl.so.3]": 5_000_000.0,
    }
    openssl, rest = call_instructions.openssl_and_rest(per)
    assert openssl == 5_300_000.0
    assert rest == 2_020_000.0  # inclusive rows are not summed again


def test_haproxy_s_own_binary_is_the_rest() -> None:
    per = {"self in [haproxy]": 150_000.0, "self in [libcrypto.so.3]": 7_000_000.0}
    assert call_instructions.openssl_and_rest(per) == (7_000_000.0, 150_000.0)


def test_access_renders_the_line_a_production_call_writes(tmp_path) -> None:
    """`--access json|text`: the config render_ingress writes, made to log the
    access line at level info in that format, and loaded as such; without it
    the bench's own (no access line, level warning)."""
    tls = TLSFiles.write(tmp_path)
    config = render_ingress(Settings(), tls, 8443, [9443], tmp_path)
    call_instructions.with_access_line(config, None)
    log = load_config(config).log
    assert (log.access, log.level) == (False, "warning")
    call_instructions.with_access_line(config, "text")
    log = load_config(config).log
    assert (log.access, log.level, log.format) == (True, "info", "text")
    with pytest.raises(RuntimeError, match="no \\[log\\] section"):
        call_instructions.with_access_line(config, "json")  # rendered once only


def test_message_instructions_variants_make_bare_bio_targets() -> None:
    from bench import message_instructions

    got = message_instructions.parse_variants(
        ["co:BARE_BIO_COALESCE=1", "once:BARE_BIO_COALESCE=adaptive", "once:X=a=b"]
    )
    assert got == {
        "bare-bio@co": ("bare-bio", {"BARE_BIO_COALESCE": "1"}),
        "bare-bio@once": ("bare-bio", {"BARE_BIO_COALESCE": "adaptive", "X": "a=b"}),
    }
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        message_instructions.parse_variants(["co:BARE_BIO_COALESCE"])


def test_message_instructions_counts_ssl_reads_and_writes_a_message(tmp_path) -> None:
    """Calls to OpenSSL's read and write (either entry point) and the epoll waits, the
    difference between two callgrind files over the messages."""
    from bench import message_instructions

    def callgrind_file(name: str, reads: int, reads_ex: int, writes: int) -> Path:
        path = tmp_path / name
        path.write_text(
            "fn=(1) relay\n"
            f"cfn=(2) SSL_read\ncalls={reads} 0\n1 10\n"
            f"cfn=(3) SSL_read_ex\ncalls={reads_ex} 0\n1 10\n"
            f"cfn=(4) SSL_write_ex\ncalls={writes} 0\n1 10\n"
            "cfn=(3)\ncalls=1 0\n1 10\n"  # a later call, the name compressed
        )
        return path

    a = callgrind_file("a", 0, 10, 10)
    b = callgrind_file("b", 0, 310, 110)
    got = message_instructions.per_message_calls([a, b], 100)
    assert got == {"SSL reads": 3.0, "SSL writes": 1.0, "epoll waits": 0.0}
