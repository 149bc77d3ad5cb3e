"""A TLS scan of the carrier listener with sslyze (issue #7, "Hostile input").

sslyze (PyPI) drives its own OpenSSL builds (nassl), legacy and modern, so it
can offer SSL 2.0 and 3.0 and TLS 1.0 and 1.1, which the Python ssl module
here no longer can. It scans an in-process ingress on 127.0.0.1 from a thread
while the event loop goes on serving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sslyze import (
    CertificateInfoExtraArgument,
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
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
    # Even tls.profile = "openssl" (CBC suites for older carrier stacks) leaves
    # out the broken ones; the default profile offers AEAD suites alone (below).
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


# -- Mozilla's server-side TLS guidelines, per tls.profile (issue #12) ------------------

# Mozilla's "modern" also wants an ECDSA certificate (its rules on the certificate, not
# the listener): with an RSA one these are the only findings allowed.
MODERN_WITH_RSA = {"certificate_types", "certificate_signatures"}


def mozilla_scan(port: int, ca_file: Path) -> Any:
    """sslyze's scan commands for its Mozilla check, trusting the test CA (as a
    carrier given it would) so that the certificate's path validates."""
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("127.0.0.1", port),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status is ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result


def mozilla_findings(result: Any, profile: str) -> dict[str, str]:
    config = MozillaTlsConfiguration.get(TlsConfigurationEnum(profile))
    try:
        check_server_against_tls_configuration(result, config)
    except ServerNotCompliantWithTlsConfiguration as exc:
        return exc.issues
    return {}


def web_pki_leaf(ca: trustme.CA, key_type: trustme.KeyType) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for 127.0.0.1, issued by `ca`, as a public CA would
    issue it: 90 days (Mozilla's lifespan rule) and a non-critical subjectAltName.
    trustme marks it critical beside a non-empty subject, which the RFC 5280 path
    validation sslyze runs (cryptography's) refuses."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    if key_type is trustme.KeyType.RSA:
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=89))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def scanned_ingress(
    start_ingress: StartIngress, tmp_path: Path, key_type: trustme.KeyType, **tls: str
) -> Any:
    """An ingress serving a certificate of `key_type` from a CA of the same type,
    scanned; returns the scan result."""
    ca = trustme.CA(key_type=key_type)
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert_pem, key_pem = web_pki_leaf(ca, key_type)
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    ca.cert_pem.write_to_path(ca_file)
    ingress = await start_ingress(
        [f"https://127.0.0.1:{await free_port()} name=none"],
        tls={"cert": str(cert), "key": str(key), "ca_file": str(ca_file), **tls},
    )
    _, port = ingress.wss_address
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await asyncio.to_thread(mozilla_scan, port, ca_file)
    took = loop.time() - started
    scans = result.scan_result
    accepted = {
        version: [c.cipher_suite.name for c in _done(getattr(scans, field)).accepted_cipher_suites]
        for version, field in [("1.2", "tls_1_2_cipher_suites"), ("1.3", "tls_1_3_cipher_suites")]
    }
    curves = [c.name for c in _done(scans.elliptic_curves).supported_curves or []]
    print(f"\nsslyze Mozilla scan, {key_type.name} {tls} in {took:.1f}s: {accepted}; {curves}")
    return result


@pytest.mark.uvloop_only
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("profile", "key_type"),
    [
        ("intermediate", trustme.KeyType.ECDSA),
        ("intermediate", trustme.KeyType.RSA),
        ("modern", trustme.KeyType.ECDSA),
        ("modern", trustme.KeyType.RSA),
    ],
    ids=["intermediate-ecdsa", "intermediate-rsa", "modern-ecdsa", "modern-rsa"],
)
async def test_sslyze_mozilla_check_passes_for_the_chosen_profile(
    start_ingress: StartIngress, tmp_path: Path, profile: str, key_type: trustme.KeyType
):
    result = await scanned_ingress(start_ingress, tmp_path, key_type, profile=profile)
    findings = mozilla_findings(result, profile)
    if profile == "modern" and key_type is trustme.KeyType.RSA:
        assert set(findings) <= MODERN_WITH_RSA, findings
    else:
        assert findings == {}
    if profile == "intermediate":  # a stricter profile passes its looser one as well
        return
    assert mozilla_findings(result, "intermediate") == {}


@pytest.mark.uvloop_only
@pytest.mark.timeout(240)
async def test_the_openssl_profile_fails_mozillas_intermediate_as_before(
    start_ingress: StartIngress, tmp_path: Path
):
    """The control, and the finding of issue #12: OpenSSL's default list offers CBC
    suites and, with an RSA certificate, static-RSA ones, and curves beyond three."""
    result = await scanned_ingress(start_ingress, tmp_path, trustme.KeyType.RSA, profile="openssl")
    findings = mozilla_findings(result, "intermediate")
    assert set(findings) == {"ciphers", "tls_curves"}, findings
    assert "TLS_RSA_WITH_AES_128_GCM_SHA256" in findings["ciphers"]  # no forward secrecy
    assert "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA" in findings["ciphers"]
