"""The carrier certificate and key read once (net/tls.py `CarrierPem`): what
is checked is what is loaded, and what a supervisor hands its workers."""

from __future__ import annotations

import datetime
import fcntl
import os
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fleet_ingress.config.settings import IngressConfig
from fleet_ingress.net.tls import (
    CarrierPem,
    TLSSetupError,
    held_pem,
    leaf_facts,
    leaf_facts_of,
    pem_from_fds,
    read_pem,
    server_ssl_context,
    server_ssl_context_of,
)
from fleet_ingress.service.carrier_certificate import (
    kept_certificate,
    kept_over_unloadable,
    pem_to_json,
)
from fleet_ingress.service.upgrade import served_pem


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    leaf = trustme.CA().issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def test_held_memfds_are_sealed_private_and_give_back_what_was_read(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    pem = read_pem(cert, key)
    fds = held_pem(pem)
    try:
        assert pem_from_fds(*fds) == pem == (cert.read_bytes(), key.read_bytes())
        assert pem_from_fds(*fds) == pem  # again: each read starts at the beginning
        for fd in fds:
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
            assert not os.get_inheritable(fd)
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
            with pytest.raises(OSError):
                os.write(fd, b"x")
        # What was read is loaded, whatever the files hold since.
        cert.write_bytes(b"")
        key.unlink()
        server_ssl_context_of(pem_from_fds(*fds), cert, key)
        assert leaf_facts_of(pem.cert, cert).names == {"localhost"}
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("broken", ["truncated certificate", "key of another", "encrypted"])
def test_what_cannot_load_is_said_of_the_files_it_was_read_from(
    tmp_path: Path, broken: str
) -> None:
    cert, key = _pair(tmp_path)
    if broken == "truncated certificate":
        cert.write_bytes(cert.read_bytes()[:200])
    elif broken == "key of another":
        key.write_bytes(trustme.CA().issue_cert("localhost").private_key_pem.bytes())
    else:
        key.write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(TLSSetupError) as from_files:
        server_ssl_context(cert, key)
    with pytest.raises(TLSSetupError) as from_bytes:
        server_ssl_context_of(read_pem(cert, key), cert, key)
    assert str(from_bytes.value) == str(from_files.value)
    assert "/proc/self/fd" not in str(from_bytes.value)


def test_a_file_missing_is_named(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    key.unlink()
    with pytest.raises(
        TLSSetupError, match=f"cannot be read: No such file or directory \\({key}\\)"
    ):
        read_pem(cert, key)
    assert leaf_facts(cert) == leaf_facts_of(cert.read_bytes(), cert)


def test_a_certificate_whose_subject_alt_name_cannot_be_read_is_named_not_raised(tmp_path):
    """cryptography parses an extension when it is read: a malformed
    subjectAltName raised a bare ValueError out of leaf_facts, past the
    reload's and the supervisor's look at the file (a 500 at each stat; the
    review of session 24). It is a TLSSetupError naming the file."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "calls.test")])
    now = datetime.datetime.now(datetime.UTC)
    bad_san = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x01\x02")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(bad_san, critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(TLSSetupError, match="subjectAltName cannot be read"):
        leaf_facts(path)


def _config(cert: Path, key: Path) -> IngressConfig:
    return IngressConfig.model_validate({"tls": {"cert": str(cert), "key": str(key)}})


def _issue(ca: trustme.CA, home: Path, *names: str, days: tuple[int, int] = (-1, 60)) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert(
        *names,
        not_before=now + datetime.timedelta(days=days[0]),
        not_after=now + datetime.timedelta(days=days[1]),
    )
    (home / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (home / "key.pem").write_bytes(leaf.private_key_pem.bytes())


def _served(home: Path) -> tuple[trustme.CA, Path, Path, CarrierPem, IngressConfig]:
    """A certificate for calls.example.com in home's files, served: its CA, the
    files, what was read of them, a configuration that names them."""
    ca = trustme.CA()
    cert, key = home / "cert.pem", home / "key.pem"
    _issue(ca, home, "calls.example.com")
    return ca, cert, key, read_pem(cert, key), _config(cert, key)


def test_a_start_keeps_the_certificate_served_before_over_one_a_reload_would_refuse(
    tmp_path: Path,
) -> None:
    ca, cert, key, served, config = _served(tmp_path)
    assert kept_certificate(config, served) is None  # the same one: the files serve
    _issue(ca, tmp_path, "calls.example.com", days=(-90, -1))
    assert "expired on" in (kept_certificate(config, served) or "")
    _issue(ca, tmp_path, "calls.example.com", days=(2, 90))
    assert "not valid until" in (kept_certificate(config, served) or "")
    _issue(ca, tmp_path, "other.example.net")
    assert "none of the names" in (kept_certificate(config, served) or "")
    _issue(ca, tmp_path, "calls.example.com", days=(-1, 90))  # a good renewal: served
    assert kept_certificate(config, served) is None
    # What was served is no better (expired itself) or cannot load: the files serve.
    _issue(ca, tmp_path, "calls.example.com", days=(-90, -2))
    old = read_pem(cert, key)
    _issue(ca, tmp_path, "calls.example.com", days=(-90, -1))
    assert kept_certificate(config, old) is None
    _issue(ca, tmp_path, "calls.example.com", days=(-90, -1))
    assert kept_certificate(config, served._replace(key=old.key)) is None
    cert.write_bytes(b"half a cert")  # what cannot be read: loading the files says why
    assert kept_certificate(config, served) is None


def test_the_certificate_a_previous_process_served_is_read_from_its_state(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    pem = read_pem(cert, key)
    assert served_pem({"running": {"pem": pem_to_json(pem), "config": {}}}) == pem
    assert served_pem({"running": {"pem": {"cert": "not base64!"}}}) is None
    assert served_pem({"version": 1}) is None and served_pem(None) is None


def test_a_start_keeps_the_certificate_served_before_over_files_that_cannot_serve(
    tmp_path: Path,
) -> None:
    ca, cert, key, served, config = _served(tmp_path)
    ca.issue_cert("calls.example.com").private_key_pem.write_to_path(key)  # another's key
    with pytest.raises(TLSSetupError) as error:
        server_ssl_context(cert, key)
    assert kept_over_unloadable(config, served, error.value) == str(error.value)
    # What was served is out of date itself, or does not load: nothing kept.
    _issue(ca, tmp_path, "calls.example.com", days=(-90, -1))
    expired = read_pem(cert, key)
    assert kept_over_unloadable(config, expired, error.value) is None
    assert kept_over_unloadable(config, served._replace(key=expired.key), error.value) is None


def test_a_start_keeps_the_certificate_served_before_over_a_chain_carriers_may_not_verify(
    tmp_path: Path,
) -> None:
    """A renewal whose chain carriers cannot follow (the intermediate missing:
    certbot's cert.pem), which the unit's reload check refuses: a restart
    keeps the served one, whose chain they follow, rather than serve it. When
    the one served is no better, or the chain cannot be judged, the files serve."""
    root = trustme.CA()
    root.cert_pem.write_to_path(tmp_path / "root.pem")
    issuer = root.create_child_ca()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    config = IngressConfig.model_validate(
        {"tls": {"cert": str(cert), "key": str(key), "ca_file": str(tmp_path / "root.pem")}}
    )
    _issue(issuer, tmp_path, "calls.example.com")
    served = read_pem(cert, key)
    assert kept_certificate(config, served) is None
    renewal = issuer.issue_cert("calls.example.com")
    cert.write_bytes(renewal.cert_chain_pems[0].bytes())  # the leaf alone
    renewal.private_key_pem.write_to_path(key)
    kept = kept_certificate(config, served) or ""
    assert kept.startswith(f"tls.cert: {cert} holds the server's certificate alone"), kept
    # The chain in full: a good renewal, served.
    cert.write_bytes(b"".join(blob.bytes() for blob in renewal.cert_chain_pems))
    assert kept_certificate(config, served) is None
    # The one served lacked its intermediate too: no better, the files serve.
    cert.write_bytes(renewal.cert_chain_pems[0].bytes())
    leaf_alone = x509.load_pem_x509_certificates(served.cert)[0].public_bytes(Encoding.PEM)
    assert kept_certificate(config, served._replace(cert=leaf_alone)) is None
    # The leaf served, its intermediate dropped (cert.pem copied over the file):
    # kept, though the leaf is the same (the review of session 30).
    cert.write_bytes(served.cert)
    leaf_of_served = x509.load_pem_x509_certificates(served.cert)[0].public_bytes(Encoding.PEM)
    cert.write_bytes(leaf_of_served)
    key.write_bytes(served.key)
    kept = kept_certificate(config, served) or ""
    assert "holds the server's certificate alone" in kept, kept
    # tls.ca_file cannot be read: the chains cannot be judged, the files serve.
    (tmp_path / "root.pem").unlink()
    assert kept_certificate(config, served) is None
