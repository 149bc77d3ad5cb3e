"""What `stat` says of tls.cert on disk against the certificate served
(service/files_on_disk.py's picture, ops/fleet_display.py's lines): a renewal
a reload would load, or one it would refuse, never both (no files: the
certificate as last read is set directly)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import trustme

from fleet_ingress.config.settings import IngressConfig
from fleet_ingress.core.certificate_change import LeafFacts
from fleet_ingress.net.tls import leaf_facts
from fleet_ingress.ops.fleet_display import (
    certificate_chain_doubted,
    certificate_not_served,
    certificate_refused,
    certificate_served_refused,
)
from fleet_ingress.service.files_on_disk import FilesOnDisk, file_state

DAY = 86400.0


def _leaf(valid_from: float, valid_to: float, name: str = "calls.example.com") -> LeafFacts:
    return LeafFacts(valid_from, valid_to, frozenset({name}), fingerprint=f"{valid_from}{name}")


def _said(on_disk: LeafFacts | None, serving: LeafFacts) -> tuple[str | None, str | None]:
    files = FilesOnDisk(Path("ingress.toml"))
    files.certificate_file = on_disk
    snap = {**files.picture(serving), "certificate_not_after": serving.not_after}
    return certificate_not_served(snap), certificate_refused(snap)


def test_a_renewal_a_reload_would_load_is_not_loaded_and_not_refused() -> None:
    now = time.time()
    serving = _leaf(now - 60 * DAY, now + 20 * DAY)
    waiting, refused = _said(_leaf(now - DAY, now + 90 * DAY), serving)
    assert waiting is not None and "CERTIFICATE NOT LOADED" in waiting and refused is None


def test_one_a_reload_would_refuse_is_said_refused_and_not_offered_to_a_reload() -> None:
    now = time.time()
    serving = _leaf(now - 60 * DAY, now + 20 * DAY)
    # Valid for longer, but not yet: a reload refuses it (before, stat said
    # both "reload loads it" and that the reload was refused).
    waiting, refused = _said(_leaf(now + 2 * DAY, now + 90 * DAY), serving)
    assert waiting is None and refused is not None
    assert refused.startswith("CERTIFICATE ON DISK REFUSED: tls.cert is not valid until")
    assert "a reboot or a stop then a start takes the files as they are" in refused
    _, expired = _said(_leaf(now - 90 * DAY, now - DAY), serving)
    assert expired is not None and "expired on" in expired
    _, other = _said(_leaf(now - DAY, now + 90 * DAY, "other.example.net"), serving)
    assert other is not None and "none of the names" in other


def test_nothing_is_said_of_the_certificate_served_or_a_file_not_read() -> None:
    now = time.time()
    serving = _leaf(now - 60 * DAY, now + 20 * DAY)
    assert _said(serving, serving) == (None, None)
    assert _said(None, serving) == (None, None)


def test_a_certificate_served_that_carriers_refuse_is_said_file_or_not() -> None:
    now = time.time()
    files = FilesOnDisk(Path("ingress.toml"))
    # A start took a certificate not valid yet from the files (the fd store was
    # released): the file is the one served, and both are out of date.
    ahead = _leaf(now + 2 * DAY, now + 90 * DAY)
    files.certificate_file, files._certificate_seen = ahead, ("cert.pem", "key.pem")
    snap = {**files.picture(ahead), "certificate_not_after": ahead.not_after}
    served = certificate_served_refused(snap)
    assert served is not None and served.startswith(
        "CERTIFICATE SERVED IS REFUSED BY CARRIERS: it is not valid until"
    )
    refused = certificate_refused(snap)
    assert refused is not None and "serves on" not in refused
    assert files.certificate_file_refused(ahead) is True
    # A kept certificate that expired while served, the file refused beside it.
    expired = _leaf(now - 90 * DAY, now - 60)
    snap = {**files.picture(expired), "certificate_not_after": expired.not_after}
    assert "expired on" in (certificate_served_refused(snap) or "")
    assert "serves on" not in (certificate_refused(snap) or "")


def test_files_that_cannot_serve_are_refused_though_no_certificate_could_be_read() -> None:
    now = time.time()
    serving = _leaf(now - 60 * DAY, now + 20 * DAY)
    files = FilesOnDisk(Path("ingress.toml"))
    assert files.certificate_file_refused(serving) is None  # not looked at yet
    files._certificate_seen = ("cert.pem", "key.pem")
    files.certificate_load_error = "cert.pem: not a PEM certificate (cut short?)"
    snap = {**files.picture(serving), "certificate_not_after": serving.not_after}
    assert snap["certificate_file"]["refused"] == files.certificate_load_error
    assert "serves on" in (certificate_refused(snap) or "")
    assert files.certificate_file_refused(serving) is True


async def test_the_look_tries_the_key_with_the_certificate_and_sees_every_change(
    tmp_path: Path,
) -> None:
    """Real files: a key replaced alone (another certificate's), a key made a
    FIFO (not opened: it would hold the look for good), a certificate gone,
    and a chmod (only its ctime changes) are each seen at the next look."""
    ca = trustme.CA()
    leaf = ca.issue_cert("calls.example.com")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    config = IngressConfig.model_validate(
        {"tls": {"cert": str(cert), "key": str(key)}, "fleets": {"file": str(tmp_path / "f")}}
    )
    files = FilesOnDisk(tmp_path / "ingress.toml")
    serving = leaf_facts(cert)

    async def refused() -> str | None:
        await files.look(config, [], 0)
        return files.certificate_refused(serving)

    assert await refused() is None and files.certificate_file_refused(serving) is False
    ca.issue_cert("calls.example.com").private_key_pem.write_to_path(key)  # another's
    assert "do not match" in (await refused() or "")
    leaf.private_key_pem.write_to_path(key)
    assert await refused() is None
    before = file_state(key)
    os.chmod(key, 0o600)
    assert file_state(key) != before  # who may read it: seen
    key.unlink()
    os.mkfifo(key)
    async with asyncio.timeout(5):  # the look does not open it
        said = await refused() or ""
    assert "tls.key" in said and "no regular file" in said
    key.unlink()
    leaf.private_key_pem.write_to_path(key)
    cert.unlink()
    assert "tls.cert" in (await refused() or "")
    assert files.certificate_file_refused(serving) is True
    files.close()


async def test_a_chain_carriers_may_not_verify_is_refused_or_said_of_the_one_served(
    tmp_path: Path,
) -> None:
    """Real files, tls.ca_file naming the root: a renewal without its
    intermediate (the unit's reload check refuses it) is a refused file while
    another certificate is served; when it is the one served (a start with none
    to keep took it), stat says carriers may fail to verify it. The CA file is
    looked at too: replaced, the chain is judged again; a FIFO, not opened."""
    root = trustme.CA()
    ca_file = tmp_path / "root.pem"
    root.cert_pem.write_to_path(ca_file)
    issuer = root.create_child_ca()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    config = IngressConfig.model_validate(
        {
            "tls": {"cert": str(cert), "key": str(key), "ca_file": str(ca_file)},
            "fleets": {"file": str(tmp_path / "f")},
        }
    )
    leaf = issuer.issue_cert("calls.example.com")
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    served = leaf_facts(cert)
    files = FilesOnDisk(tmp_path / "ingress.toml")

    async def said(serving: LeafFacts) -> tuple[str | None, str | None]:
        await files.look(config, [], 0)
        snap = {**files.picture(serving), "certificate_not_after": serving.not_after}
        return certificate_refused(snap), certificate_chain_doubted(snap)

    assert await said(served) == (None, None)
    renewal = issuer.issue_cert("calls.example.com")
    cert.write_bytes(renewal.cert_chain_pems[0].bytes())  # the leaf alone
    renewal.private_key_pem.write_to_path(key)
    refused, doubted = await said(served)
    assert refused is not None and doubted is None
    assert refused.startswith(
        "CERTIFICATE ON DISK REFUSED: tls.cert holds the server's certificate alone"
    )
    assert files.certificate_file_refused(served) is True
    taken = leaf_facts(cert)  # a start with none to keep served it
    refused, doubted = await said(taken)
    assert refused is None and doubted is not None
    assert doubted.startswith(
        "CARRIERS MAY FAIL TO VERIFY THE CERTIFICATE SERVED: tls.cert holds the server's "
        "certificate alone"
    )
    assert files.certificate_file_refused(taken) is False
    # The full chain under another root, tls.ca_file replaced by that root: judged
    # again, and passed.
    other_root = trustme.CA()
    other = other_root.create_child_ca().issue_cert("calls.example.com")
    cert.write_bytes(b"".join(blob.bytes() for blob in other.cert_chain_pems))
    other.private_key_pem.write_to_path(key)
    assert (await said(leaf_facts(cert)))[1] is not None  # not under root.pem
    other_root.cert_pem.write_to_path(ca_file)
    assert await said(leaf_facts(cert)) == (None, None)
    cert.write_bytes(other.cert_chain_pems[0].bytes())
    ca_file.unlink()
    os.mkfifo(ca_file)
    async with asyncio.timeout(5):  # not opened: the chain is not judged
        assert await said(leaf_facts(cert)) == (None, None)
