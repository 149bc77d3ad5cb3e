"""TLS contexts for the carrier listener and the fleet connections, and certificate facts."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_ALPN = ["http/1.1"]  # WebSocket upgrades are HTTP/1.1 only; never let a peer pick h2


class TLSSetupError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the files."""


def server_ssl_context(cert: Path, key: Path, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    if min_version not in _VERSIONS:
        raise TLSSetupError(f"TLS minimum version {min_version!r}: the floor is TLSv1.2")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Set explicitly rather than trusting the OS OpenSSL policy, as the HAProxy bind did.
    ctx.minimum_version = _VERSIONS[min_version]
    # Python narrows the cipher list below OpenSSL's default (no SHA-1 CBC suites, for
    # one); older carrier TLS 1.2 stacks may need those, and rejecting a carrier's
    # handshake costs calls. The TLS 1.2 floor is what keeps the weak ones out.
    ctx.set_ciphers("DEFAULT")
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(_ALPN)
    try:
        # The password callback stops OpenSSL from prompting on the terminal for an
        # encrypted key, which would hang a daemon; such a key just fails to load.
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except OSError as exc:
        # ssl.SSLError is an OSError too; only KEY_VALUES_MISMATCH means "both fine, not a pair".
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            problem = "do not match: the key is not the one the certificate was issued for"
        elif isinstance(exc, ssl.SSLError):
            problem = "cannot be read: each must be PEM, and the key not encrypted"
        else:
            unreadable = ", ".join(str(p) for p in (cert, key) if not os.access(p, os.R_OK))
            problem = f"cannot be read: {exc.strerror} ({unreadable or cert})"
        raise TLSSetupError(f"certificate {cert} and key {key} {problem}") from None
    return ctx


def fleet_ssl_context(*, verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(_ALPN)
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except OSError as exc:
            reason = (
                "it holds no PEM certificate" if isinstance(exc, ssl.SSLError) else exc.strerror
            )
            raise TLSSetupError(f"CA file {ca_file} cannot be used: {reason}") from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not verify:
        # check_hostname must go first: CERT_NONE is refused while it is on.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def certificate_not_after(cert: Path) -> float:
    """Expiry (epoch seconds) of the first certificate in a PEM file: the leaf, in fullchain.pem."""
    try:
        data = cert.read_bytes()
    except OSError as exc:
        raise TLSSetupError(f"certificate {cert} cannot be read: {exc.strerror}") from None
    try:
        from cryptography import x509
    except ImportError:  # not a declared dependency; the stdlib's private decoder will do
        try:
            decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
        except (OSError, ValueError):
            raise TLSSetupError(f"certificate {cert} is not a PEM certificate") from None
        return float(ssl.cert_time_to_seconds(decoded["notAfter"]))
    try:
        return x509.load_pem_x509_certificate(data).not_valid_after_utc.timestamp()
    except ValueError:
        raise TLSSetupError(f"certificate {cert} is not a PEM certificate") from None
