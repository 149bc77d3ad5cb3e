"""What `check --live` reads of the certificate it was served (core.served_certificate),
against cryptography's reading of the same bytes."""

from __future__ import annotations

import datetime
import ssl

import pytest
import trustme
from cryptography import x509

from fleet_ingress.core.served_certificate import certificate_facts, utc_text

UTC = datetime.UTC


def der_of(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        (datetime.datetime(1999, 12, 31, 23, 59, 58), datetime.datetime(2026, 2, 28, 1, 2, 3)),
        (datetime.datetime(2024, 2, 29, 12, 0, 0), datetime.datetime(2049, 12, 31, 23, 59, 59)),
        # 2050 on: GeneralizedTime (RFC 5280 4.1.2.5), before it UTCTime.
        (datetime.datetime(2026, 3, 1), datetime.datetime(2050, 1, 1, 0, 0, 0)),
        (datetime.datetime(1970, 1, 1), datetime.datetime(2400, 3, 1, 6, 7, 8)),
    ],
)
@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_dates_and_serial_are_cryptography_s(
    not_before: datetime.datetime, not_after: datetime.datetime, key_type: trustme.KeyType
) -> None:
    ca = trustme.CA(key_type=key_type)
    leaf = ca.issue_cert("calls.example.com", not_before=not_before, not_after=not_after)
    der = der_of(leaf)
    theirs = x509.load_der_x509_certificate(der)
    facts = certificate_facts(der)
    assert facts.not_before == int(theirs.not_valid_before_utc.timestamp())
    assert facts.not_after == int(theirs.not_valid_after_utc.timestamp())
    assert facts.serial == theirs.serial_number
    assert facts.name() == f"serial {theirs.serial_number:X}"  # trustme's leaf has no CN


def test_the_common_name_is_read_and_the_dates_judged() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.COMMON_NAME, "calls.example.com"),
        ]
    )
    start = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    end = datetime.datetime(2026, 4, 1, 12, 30, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x0ABC)
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    facts = certificate_facts(cert.public_bytes(Encoding.DER))
    assert facts.name() == "serial ABC, CN calls.example.com"
    # A start ahead of the clock is as likely this host's clock behind: carriers
    # with a right clock accept it (review38a); only the expiry is judged.
    assert facts.problem(start.timestamp() - 86_400) == ""
    assert facts.problem(end.timestamp() - 1) == ""
    assert facts.problem(end.timestamp()) == "expired 2026-04-01 12:30:00 UTC"
    assert utc_text(0) == "1970-01-01 00:00:00 UTC"


@pytest.mark.parametrize(
    "der",
    [b"", b"\x30", b"\x30\x05\x30\x03\x02\x01", b"\x04\x00", b"\x30\x84\xff\xff\xff\xff"],
)
def test_bytes_that_are_no_certificate_raise_value_error(der: bytes) -> None:
    with pytest.raises(ValueError, match="not a readable certificate"):
        certificate_facts(der)


def test_a_certificate_cut_short_anywhere_raises_value_error() -> None:
    der = der_of(trustme.CA().issue_cert("calls.example.com"))
    for end in range(0, len(der) - 1, 7):
        with pytest.raises(ValueError):
            certificate_facts(der[:end])
