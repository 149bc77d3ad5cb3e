"""What `stat` says of tls.cert on disk against the certificate served
(service/files_on_disk.py's picture, ops/fleet_display.py's lines): a renewal
a reload would load, or one it would refuse, never both (no files: the
certificate as last read is set directly)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from fleet_ingress.config.settings import IngressConfig
from fleet_ingress.core.certificate_change import LeafFacts
from fleet_ingress.net.tls import CarrierPem, leaf_facts, read_pem
from fleet_ingress.ops.fleet_display import (
    certificate_chain_doubted,
    certificate_not_served,
    certificate_refused,
    certificate_served_refused,
)
from fleet_ingress.service import files_on_disk
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
    # What is known: this host's clock reads before its notBefore. A clock
    # behind (a boot before chrony syncs) is as likely as a certificate issued
    # for later: stat said carriers refuse it, and "put a good certificate in
    # place", of one carriers with a right clock accept (leftovers of session 36).
    assert served is not None and served.startswith(
        "THIS HOST'S CLOCK READS BEFORE THE CERTIFICATE SERVED IS VALID: it is valid from "
    ), served
    assert "REFUSED BY CARRIERS" not in served
    assert "carriers with a right clock accept it if this host's clock is behind" in served
    assert "timedatectl" in served and "chronyc tracking" in served
    assert snap["certificate_served_early"] is True
    refused = certificate_refused(snap)
    assert refused is not None and "serves on" not in refused
    assert files.certificate_file_refused(ahead) is True
    # A kept certificate that expired while served, the file refused beside it.
    expired = _leaf(now - 90 * DAY, now - 60)
    snap = {**files.picture(expired), "certificate_not_after": expired.not_after}
    assert (certificate_served_refused(snap) or "").startswith(
        "CERTIFICATE SERVED IS REFUSED BY CARRIERS: it expired on"
    )
    assert snap["certificate_served_early"] is False
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
    _rewrite(key, ca.issue_cert("calls.example.com").private_key_pem.bytes())  # another's
    assert "do not match" in (await refused() or "")
    _rewrite(key, leaf.private_key_pem.bytes())
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


def _rewrite(path: Path, data: bytes) -> None:
    """Write `data` over `path` in place so that the next look sees it. The look
    tells a change by the file's inode, mtime, size and ctime: a rewrite of the
    same size within the clock tick of the write before (4 ms at HZ=250) is not
    told apart where timestamps are per tick (ext4 before Linux 6.13, ext2), and
    a test here failed there in 3 runs of 5. Written again a tick later until it
    is (bounded)."""
    before = file_state(path)
    path.write_bytes(data)
    deadline = time.monotonic() + 1.0
    while file_state(path) == before and time.monotonic() < deadline:
        time.sleep(0.005)
        path.write_bytes(data)


def _chain(leaf: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)


def _under_root(tmp_path: Path) -> tuple[trustme.CA, Path, Path, Path, IngressConfig]:
    """A root carriers trust (tls.ca_file) and its issuing intermediate; the
    files' paths; a configuration naming them."""
    root = trustme.CA()
    ca_file = tmp_path / "root.pem"
    root.cert_pem.write_to_path(ca_file)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    config = IngressConfig.model_validate(
        {
            "tls": {"cert": str(cert), "key": str(key), "ca_file": str(ca_file)},
            "fleets": {"file": str(tmp_path / "f")},
        }
    )
    return root.create_child_ca(), ca_file, cert, key, config


def _write(cert: Path, key: Path, leaf: trustme.LeafCert, *, whole: bool = True) -> None:
    _rewrite(cert, _chain(leaf) if whole else leaf.cert_chain_pems[0].bytes())
    _rewrite(key, leaf.private_key_pem.bytes())


async def _lines(
    files: FilesOnDisk, config: IngressConfig, served: CarrierPem
) -> tuple[str | None, str | None]:
    """stat's CERTIFICATE ON DISK REFUSED and CARRIERS MAY FAIL TO VERIFY lines,
    the supervisor serving `served`."""
    await files.look(config, [], 0, served)
    serving = _leaf_of(served, config)
    snap = {**files.picture(serving), "certificate_not_after": serving.not_after}
    return certificate_refused(snap), certificate_chain_doubted(snap)


def _leaf_of(pem: CarrierPem, config: IngressConfig) -> LeafFacts:
    from fleet_ingress.net.tls import leaf_facts_of

    assert config.tls.cert is not None
    return leaf_facts_of(pem.cert, config.tls.cert)


async def test_a_chain_carriers_may_not_verify_is_refused_or_said_of_the_one_served(
    tmp_path: Path,
) -> None:
    """Real files, tls.ca_file naming the root: a renewal without its
    intermediate (the unit's reload check refuses it) is a refused file while a
    chain carriers follow is served; when it is what is served (a start with
    none to keep took it), stat says carriers may fail to verify it, and the
    gauge too. The CA file is looked at too: replaced, the chains are judged
    again; a FIFO there is not opened."""
    issuer, ca_file, cert, key, config = _under_root(tmp_path)
    _write(cert, key, issuer.issue_cert("calls.example.com"))
    served = read_pem(cert, key)
    files = FilesOnDisk(tmp_path / "ingress.toml")
    assert await _lines(files, config, served) == (None, None)
    assert files.served_chain_doubted() is False
    _write(cert, key, issuer.issue_cert("calls.example.com"), whole=False)  # the leaf alone
    refused, doubted = await _lines(files, config, served)
    assert doubted is None and refused is not None
    assert refused.startswith(
        "CERTIFICATE ON DISK REFUSED: tls.cert holds the server's certificate alone"
    )
    assert files.certificate_file_refused(_leaf_of(served, config)) is True
    taken = read_pem(cert, key)  # a start with none to keep served it
    refused, doubted = await _lines(files, config, taken)
    assert refused is None and doubted is not None
    assert doubted.startswith(
        "CARRIERS MAY FAIL TO VERIFY THE CERTIFICATE SERVED: tls.cert holds the server's "
        "certificate alone"
    )
    assert files.certificate_file_refused(_leaf_of(taken, config)) is False
    assert files.served_chain_doubted() is True
    # The full chain under another root, tls.ca_file replaced by that root: judged
    # again, and passed.
    other_root = trustme.CA()
    _write(cert, key, other_root.create_child_ca().issue_cert("calls.example.com"))
    other = read_pem(cert, key)
    assert (await _lines(files, config, other))[1] is not None  # not under root.pem
    other_root.cert_pem.write_to_path(ca_file)
    assert await _lines(files, config, other) == (None, None)
    ca_file.unlink()
    os.mkfifo(ca_file)
    async with asyncio.timeout(5):  # not opened: the chains are not judged
        assert await _lines(files, config, taken) == (None, None)
    files.close()


async def test_the_same_leaf_without_its_intermediate_is_refused_not_said_of_the_one_served(
    tmp_path: Path,
) -> None:
    """The file keeps the leaf served but loses its intermediate (cert.pem copied
    over fullchain.pem): refused (a restart keeps the whole chain served), and
    nothing said against the chain served, which carriers follow (the review
    of session 30: stat said the served chain was in doubt, the gauge 0)."""
    issuer, _, cert, key, config = _under_root(tmp_path)
    leaf = issuer.issue_cert("calls.example.com")
    _write(cert, key, leaf)
    served = read_pem(cert, key)
    _write(cert, key, leaf, whole=False)
    files = FilesOnDisk(tmp_path / "ingress.toml")
    refused, doubted = await _lines(files, config, served)
    files.close()
    assert doubted is None and files.served_chain_doubted() is False
    assert refused is not None and "holds the server's certificate alone" in refused


async def test_a_renewal_no_worse_than_the_chain_served_is_not_refused(tmp_path: Path) -> None:
    """Served for years as the leaf alone, renewed the same way: not refused (a
    restart serves it, the chain served being no better: `kept_certificate`),
    the chain served said in doubt (the review of session 30: stat and the
    alert said a restart would keep the one served)."""
    issuer, _, cert, key, config = _under_root(tmp_path)
    _write(cert, key, issuer.issue_cert("calls.example.com"), whole=False)
    served = read_pem(cert, key)
    _write(cert, key, issuer.issue_cert("calls.example.com"), whole=False)
    files = FilesOnDisk(tmp_path / "ingress.toml")
    refused, doubted = await _lines(files, config, served)
    files.close()
    assert refused is None and doubted is not None


async def test_a_root_added_to_the_trust_store_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tls.ca_file: the system trust store judges the chains, and a
    ca-certificates update (a root added) is seen at the next look (the review
    of session 30: the refusal stayed up, though `check` passed)."""
    bundle = tmp_path / "bundle.pem"
    old_root, new_root = trustme.CA(), trustme.CA()
    old_root.cert_pem.write_to_path(bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "nodir"))
    cert, key = tmp_path / "fullchain.pem", tmp_path / "key.pem"
    _write(cert, key, old_root.create_child_ca().issue_cert("calls.example.com"))
    served = read_pem(cert, key)
    _write(cert, key, new_root.create_child_ca().issue_cert("calls.example.com"))
    config = IngressConfig.model_validate(
        {"tls": {"cert": str(cert), "key": str(key)}, "fleets": {"file": str(tmp_path / "f")}}
    )
    files = FilesOnDisk(tmp_path / "ingress.toml")
    refused, _ = await _lines(files, config, served)
    assert refused is not None and "the system trust store" in refused
    bundle.write_bytes(old_root.cert_pem.bytes() + new_root.cert_pem.bytes())  # the update
    assert await _lines(files, config, served) == (None, None)
    files.close()


async def test_the_chain_gauge_goes_absent_not_to_0_when_the_chain_cannot_be_judged(
    tmp_path: Path,
) -> None:
    """tls.ca_file gone (moved, a config-management run mid-way): nothing is
    judged, and the gauge goes absent rather than to 0, which would resolve
    FleetIngressCertificateChainInDoubt while the leaf alone is still served
    (the second review of session 30)."""
    issuer, ca_file, cert, key, config = _under_root(tmp_path)
    _write(cert, key, issuer.issue_cert("calls.example.com"), whole=False)
    files = FilesOnDisk(tmp_path / "ingress.toml")
    served = read_pem(cert, key)
    await files.look(config, [], 0, served)
    assert files.served_chain_doubted() is True
    ca_file.unlink()
    await files.look(config, [], 0, served)
    files.close()
    assert files.served_chain_doubted() is None


async def test_a_chain_in_doubt_is_refused_over_a_served_certificate_out_of_date_too(
    tmp_path: Path,
) -> None:
    """The one served has expired and the file's chain is in doubt: a reload
    refuses the file (the unit's check), so stat says it is refused, not that a
    reload loads it, nor that the one served serves on (a restart takes the file).
    The third review of session 30 found 1cf72fc had it say `systemctl reload`
    loads it, which the reload's check then refused."""
    import datetime

    issuer, _, cert, key, config = _under_root(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    expired = issuer.issue_cert(
        "calls.example.com",
        not_before=now - datetime.timedelta(days=90),
        not_after=now - datetime.timedelta(days=1),
    )
    _write(cert, key, expired)
    served = read_pem(cert, key)
    _write(cert, key, issuer.issue_cert("calls.example.com"), whole=False)
    files = FilesOnDisk(tmp_path / "ingress.toml")
    await files.look(config, [], 0, served)
    files.close()
    serving = _leaf_of(served, config)
    snap = {**files.picture(serving), "certificate_not_after": serving.not_after}
    refused = certificate_refused(snap)
    assert refused is not None and "holds the server's certificate alone" in refused
    assert "serves on" not in refused  # the one served is refused by carriers itself
    assert certificate_not_served(snap) is None  # no "reload loads it"


async def test_a_look_anew_reads_the_files_again_after_a_look_that_read_them_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a reload's answer waits for (`look_anew`): a look under way when
    the reload read the files (the status line's, every 10 s, or a scrape's)
    had read them before; a scrape after it waited for that look alone and said
    the files as they were before the reload. Here a look is held once it
    has tried the old key with the certificate, the key is replaced by another
    certificate's, and the look anew says they do not match (a plain `look`
    waits for the one held and says nothing)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("calls.example.com")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(_chain(leaf))
    leaf.private_key_pem.write_to_path(key)
    config = IngressConfig.model_validate(
        {"tls": {"cert": str(cert), "key": str(key)}, "fleets": {"file": str(tmp_path / "f")}}
    )
    serving = leaf_facts(cert)
    held, may_go = threading.Event(), threading.Event()
    tries_key = files_on_disk.server_ssl_context

    def held_key_check(*args: Any) -> Any:  # in the look's thread
        tried = tries_key(*args)
        held.set()
        may_go.wait(10)
        return tried

    monkeypatch.setattr(files_on_disk, "server_ssl_context", held_key_check)
    files = FilesOnDisk(tmp_path / "ingress.toml")
    try:
        files.look_soon(config, [], 0)
        assert await asyncio.to_thread(held.wait, 10)  # under way, the old key tried
        _rewrite(key, ca.issue_cert("calls.example.com").private_key_pem.bytes())
        asyncio.get_running_loop().call_later(0.2, may_go.set)
        async with asyncio.timeout(10):
            await files.look_anew(config, [], 0)
        assert "do not match" in (files.certificate_refused(serving) or "")
    finally:
        may_go.set()
        files.close()
