"""A TLS scan of the carrier listener with sslyze (issue #7, "Hostile input").

sslyze (PyPI) drives its own OpenSSL builds (nassl), legacy and modern, so it
can offer SSL 2.0 and 3.0 and TLS 1.0 and 1.1, which the Python ssl module
here no longer can. It scans an in-process ingress on 127.0.0.1 from a thread
while the event loop goes on serving.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from sslyze import (
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)

from tests.support import StartIngress, free_port

PROTOCOLS = {
    "SSL 2.0": ScanCommand.SSL_2_0_CIPHER_SUITES,
    "SSL 3.0": ScanCommand.SSL_3_0_CIPHER_SUITES,
    "TLS 1.0": ScanCommand.TLS_1_0_CIPHER_SUITES,
    "TLS 1.1": ScanCommand.TLS_1_1_CIPHER_SUITES,
    "TLS 1.2": ScanCommand.TLS_1_2_CIPHER_SUITES,
    "TLS 1.3": ScanCommand.TLS_1_3_CIPHER_SUITES,
}
BROKEN = ("NULL", "EXPORT", "RC4", "_DES_", "3DES", "anon", "MD5")
CHECKS = {
    ScanCommand.TLS_COMPRESSION,
    ScanCommand.SESSION_RENEGOTIATION,
    ScanCommand.TLS_FALLBACK_SCSV,
    ScanCommand.HEARTBLEED,
    ScanCommand.OPENSSL_CCS_INJECTION,
}


def scan(port: int) -> Any:
    """Run the scan (blocking); the completed result for 127.0.0.1:port."""
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("127.0.0.1", port),
        scan_commands={*PROTOCOLS.values(), *CHECKS},
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status is ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result.scan_result


def _done(attempt: Any) -> Any:
    assert attempt.status is ScanCommandAttemptStatusEnum.COMPLETED, attempt.error_trace
    return attempt.result


@pytest.mark.timeout(180)
async def test_sslyze_sees_tls_1_2_and_1_3_only_no_insecure_renegotiation_no_compression(
    start_ingress: StartIngress,
):
    ingress = await start_ingress([f"https://127.0.0.1:{await free_port()} name=none"])
    _, port = ingress.wss_address
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await asyncio.to_thread(scan, port)
    took = loop.time() - started

    accepted = {
        name: [
            c.cipher_suite.name
            for c in _done(getattr(result, command.value)).accepted_cipher_suites
        ]
        for name, command in PROTOCOLS.items()
    }
    print(f"\nsslyze scan in {took:.1f}s; accepted: {accepted}")
    for name, command in PROTOCOLS.items():  # each version was really offered
        assert _done(getattr(result, command.value)).rejected_cipher_suites or accepted[name]
    assert {name for name, suites in accepted.items() if suites} == {"TLS 1.2", "TLS 1.3"}
    # SPEC 10 keeps OpenSSL's default ciphers (CBC suites for older carrier
    # stacks); that default still leaves out the broken ones.
    for suite in accepted["TLS 1.2"]:
        assert not any(weak in suite for weak in BROKEN), suite

    renegotiation = _done(result.session_renegotiation)
    assert renegotiation.supports_secure_renegotiation  # RFC 5746: no CVE-2009-3555
    assert not renegotiation.is_vulnerable_to_client_renegotiation_dos
    assert renegotiation.client_renegotiations_success_count == 0
    assert not _done(result.tls_compression).supports_compression  # no CRIME
    assert _done(result.tls_fallback_scsv).supports_fallback_scsv
    assert not _done(result.heartbleed).is_vulnerable_to_heartbleed
    assert not _done(result.openssl_ccs_injection).is_vulnerable_to_ccs_injection
    # The scan's probes were TLS handshakes and no request: nothing leaked.
    await asyncio.sleep(0.1)
    assert not ingress.registry.connections


async def test_the_scan_would_see_a_weaker_listener(start_ingress: StartIngress):
    """The control: a listener with a TLS 1.0 floor and renegotiation allowed
    is reported as such by the same scan, so the passing scan above means something."""
    ingress = await start_ingress([f"https://127.0.0.1:{await free_port()} name=none"])
    ingress.server_ssl.set_ciphers("DEFAULT:@SECLEVEL=0")
    ingress.server_ssl.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ingress.server_ssl.options &= ~ssl.OP_NO_RENEGOTIATION
    ingress.server_ssl.options |= 1 << 8  # SSL_OP_ALLOW_CLIENT_RENEGOTIATION (OpenSSL 3)
    _, port = ingress.wss_address
    result = await asyncio.to_thread(scan, port)
    for name in ("TLS 1.0", "TLS 1.1"):
        assert _done(getattr(result, PROTOCOLS[name].value)).accepted_cipher_suites, name
    assert _done(result.session_renegotiation).is_vulnerable_to_client_renegotiation_dos
