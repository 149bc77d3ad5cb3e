"""The key-exchange groups are set through OpenSSL's own call, looked up once
per process: opened for every context built, the library's handle and function
objects cost about 0.5 KB a reload in every process, for good (the long-life
audit of session 25)."""

from __future__ import annotations

import ctypes
import ssl
from pathlib import Path

import trustme

from fleet_ingress.net import tls


def test_openssls_calls_are_looked_up_once_for_every_context(monkeypatch, tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    opened: list[str] = []
    real = ctypes.CDLL

    def counting(name, *args, **kwargs):
        opened.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", counting)
    tls._libssl_calls.cache_clear()
    try:
        contexts = [tls.server_ssl_context(cert, key) for _ in range(20)]
    finally:
        tls._libssl_calls.cache_clear()
    assert len(opened) == 1
    # Every context has the three groups, not the one-curve fallback: a client
    # offering only X25519 completes its TLS 1.3 handshake with each.
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.set_ecdh_curve("X25519")
    for server in contexts[:: len(contexts) - 1]:  # the first and the last
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
        s = server.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for side in (c, s):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        assert c.version() == "TLSv1.3" and s.version() == "TLSv1.3"
