"""tls_socket's reach to OpenSSL's SSL under a CPython SSL object (for SSL_ctrl,
SSL_free_buffers, SSL_set_session): its place checked once a process, not a connection."""

from __future__ import annotations

import ctypes
import ssl

import pytest

from fleet_ingress.net import tls_socket


def _forget_the_check() -> None:
    # (absent before session 43, when each connection was checked)
    getattr(getattr(tls_socket, "_ssl_offset", None), "cache_clear", lambda: None)()


def _client(ctx: ssl.SSLContext) -> ssl.SSLObject:
    return ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="fleet.test")


def test_each_ssl_is_its_own_and_the_place_is_checked_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = tls_socket._libssl()
    if calls is None:
        pytest.skip("no OpenSSL calls to be had here")
    asked: list[int] = []

    def get_ctx(pointer: int) -> int:
        asked.append(pointer)
        return int(calls.get_ctx(pointer))

    monkeypatch.setattr(tls_socket, "_libssl", lambda: calls._replace(get_ctx=get_ctx))
    _forget_the_check()
    try:
        contexts = [ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) for _ in range(3)]
        objects = [_client(ctx) for ctx in contexts for _ in range(2)]
        pointers = [tls_socket._openssl_ssl(obj._sslobj) for obj in objects]  # type: ignore[attr-defined]
    finally:
        _forget_the_check()
    assert len(asked) <= 1  # the probe's, once
    assert None not in pointers and len(set(pointers)) == len(objects)
    for obj, pointer in zip(objects, pointers, strict=True):
        ctx_pointer = ctypes.c_void_p.from_address(id(obj.context) + object.__basicsize__).value
        assert calls.get_ctx(pointer) == ctx_pointer  # the SSL of that object's context


def test_no_ssl_is_read_when_the_probe_s_does_not_name_its_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = tls_socket._libssl()
    if calls is None:
        pytest.skip("no OpenSSL calls to be had here")
    monkeypatch.setattr(tls_socket, "_libssl", lambda: calls._replace(get_ctx=lambda p: 0))
    _forget_the_check()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        assert tls_socket._openssl_ssl(_client(ctx)._sslobj) is None  # type: ignore[attr-defined]
    finally:
        _forget_the_check()


def test_no_ssl_is_read_and_nothing_raised_when_the_probe_cannot_be_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe is the process's first TLS connection's work: an SSL this
    OpenSSL will not make for it (an SSLError) leaves the connection without
    OpenSSL's SSL (as another CPython's layout does), asked once, and raises
    nothing (it raised out of every TLSConnection: the review of session 43)."""
    if tls_socket._libssl() is None:
        pytest.skip("no OpenSSL calls to be had here")
    real = ssl.SSLContext.wrap_bio
    probes: list[object] = []

    def refusing_the_probe(self: ssl.SSLContext, *args: object, **kw: object) -> ssl.SSLObject:
        if kw.get("server_hostname") is None:  # the probe's (a client, no name)
            probes.append(self)
            raise ssl.SSLError("injected: no SSL for the probe")
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "wrap_bio", refusing_the_probe)
    _forget_the_check()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        said = [tls_socket._openssl_ssl(_client(ctx)._sslobj) for _ in range(3)]  # type: ignore[attr-defined]
    finally:
        _forget_the_check()
    assert said == [None, None, None] and len(probes) == 1
