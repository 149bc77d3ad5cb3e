"""The carrier certificate a process serves, and how it is handed on: read once
from tls.cert/tls.key by the supervisor, checked, and given to each worker it
starts (sealed memfds, SERVING_PEM_ENV) and with each reload (`pem_to_json`), so
that no worker reads the files, which may hold a renewal a reload refused;
with it, the keys every worker seals its session tickets with
(SERVING_TICKET_KEYS_ENV), so that a carrier's session resumes on any of them.
Also what the image an upgrade starts, or a worker of an older supervisor,
must not take from disk (`certificate_not_taken`)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import ssl
import time
from pathlib import Path
from typing import Any

from fleet_ingress.config.settings import IngressConfig
from fleet_ingress.core.certificate_change import (
    LeafFacts,
    kept_over_restart,
    out_of_date,
    renewal_problem,
)
from fleet_ingress.logs import fields
from fleet_ingress.net.tls import (
    TICKET_KEYS_BYTES,
    CarrierPem,
    TLSSetupError,
    chain_problem,
    fd_path,
    leaf_facts,
    leaf_facts_of,
    pem_chain_problem,
    pem_from_fds,
    read_pem,
    server_ssl_context,
    server_ssl_context_of,
)

log = logging.getLogger("fleet_ingress.server")

# Set by a supervisor of an older release for a worker it starts, which then
# reads the certificate files: the certificate it serves (JSON), which one on
# disk a reload refused must not replace (`certificate_not_taken`).
SERVING_CERTIFICATE_ENV = "INGRESS_SERVING_CERTIFICATE"
# Set by the supervisor for a worker it starts: the two fds ("cert,key") of the
# sealed memfds holding the certificate chain and key it serves, read and
# checked once (a reload's, or at its start): the files may hold since a renewal
# a reload refused, half written, a key not the certificate's, or nothing.
SERVING_PEM_ENV = "INGRESS_SERVING_PEM_FDS"
# And the fd of a sealed memfd holding the keys its session tickets are sealed
# with: the supervisor's, the same for every worker it starts, drawn anew with
# each certificate (or [tls] setting) it serves, held in memory only (and in
# systemd's fd store, for a supervisor started again after a crash:
# `fd_store.store_ticket_keys`). A worker of an older release ignores it (and
# draws its own, as OpenSSL does), as does one that cannot read it.
SERVING_TICKET_KEYS_ENV = "INGRESS_SERVING_TICKET_KEYS_FD"


def certificate_not_taken(config: IngressConfig, serving: LeafFacts | None) -> str | None:
    """Why the certificate `config` names on disk must not be served in place of
    `serving` (the one the supervisor serves: a reload refused it), or None. For
    the image an upgrade starts, which reads it without a reload, and a worker a
    supervisor of an older release starts (this release's supervisor hands its
    workers the certificate it serves: SERVING_PEM_ENV)."""
    if serving is None or config.tls.cert is None:
        return None
    try:
        leaf = leaf_facts(config.tls.cert)
    except TLSSetupError:
        return None  # unreadable: loading it says so
    problem = renewal_problem(leaf, serving, time.time())
    return None if problem is None else f"tls.cert: {config.tls.cert} {problem}"


def kept_certificate(config: IngressConfig, served: CarrierPem) -> str | None:
    """At a start after a stop (`systemctl restart`): why the certificate
    `config` names on disk is not served, `served` (the one served before the
    stop: `fd_store.CrashSnapshot.stopped`) serving on instead, or None (the
    files serve). One a reload would refuse (expired, not valid yet, for none
    of its names, or one whose chain carriers may fail to verify where they
    verify the served one's: the unit's reload check refuses it) is passed
    over, for one still good that loads with `config`'s [tls]."""
    tls = config.tls
    if tls.cert is None or tls.key is None or (before := _loads_here(config, served)) is None:
        return None
    try:
        on_disk = leaf_facts(tls.cert)
    except (TLSSetupError, OSError):
        return None  # the files are read as ever (and what cannot load says why)
    chain = None
    # The same bytes have the same chain; other bytes may hold the same leaf
    # with another chain (its intermediate dropped), so the whole file is judged.
    with contextlib.suppress(OSError, TLSSetupError):  # TLSSetupError: tls.ca_file unusable
        if tls.cert.read_bytes() != served.cert:
            chain = chain_problem(tls.cert, tls.key, tls.ca_file)
            if chain is not None and pem_chain_problem(served, tls.cert, tls.key, tls.ca_file):
                chain = None  # no better: the files serve (and the warning says it)
    problem = kept_over_restart(on_disk, before, time.time(), chain)
    return None if problem is None else f"tls.cert: {tls.cert} {problem}"


def kept_over_unloadable(
    config: IngressConfig, served: CarrierPem, error: TLSSetupError
) -> str | None:
    """At a start, tls.cert and tls.key cannot serve (`error`: a key of another
    certificate, a file cut short or missing), as a reload would refuse them:
    why `served`, the one served before, serves on instead, or None when it
    cannot (out of date itself, or it does not load with `config`'s [tls])."""
    before = _loads_here(config, served)
    if before is None or out_of_date(before, time.time()) is not None:
        return None
    return str(error)


def _loads_here(config: IngressConfig, served: CarrierPem) -> LeafFacts | None:
    """What `served` is, if it loads with `config`'s [tls] (a reload may have
    changed tls.min_version or tls.profile since it was served); else None."""
    try:
        before = leaf_facts_of(served.cert, config.tls.cert or Path("tls.cert"))
        carrier_ssl_context(config, served)
    except (TLSSetupError, ssl.SSLError, OSError):
        return None
    return before


def read_carrier_pem(config: IngressConfig) -> CarrierPem:
    """tls.cert and tls.key, read once (`carrier_ssl_context` loads them)."""
    tls = config.tls
    if tls.cert is None or tls.key is None:
        raise TLSSetupError("tls.cert and tls.key must be set to serve the carrier listener")
    return read_pem(tls.cert, tls.key)


def pem_to_json(pem: CarrierPem) -> dict[str, str]:
    """`pem` for a worker's `reload` message (`pem_from_json`)."""
    return {"cert": base64.b64encode(pem.cert).decode(), "key": base64.b64encode(pem.key).decode()}


def pem_from_json(value: Any) -> CarrierPem:
    """ValueError when `value` is not what `pem_to_json` makes."""
    try:
        return CarrierPem(
            base64.b64decode(value["cert"], validate=True),
            base64.b64decode(value["key"], validate=True),
        )
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not a certificate and key: {exc}") from None


def pem_from_env(value: str | None) -> CarrierPem | None:
    """The certificate and key in the memfds SERVING_PEM_ENV names (closed once
    read); None when it names none (a worker started by hand, or by a supervisor
    older than it: it reads the files). OSError or ValueError when unusable."""
    if not value:
        return None
    cert_fd, key_fd = (int(fd) for fd in value.split(","))
    try:
        return pem_from_fds(cert_fd, key_fd)
    finally:
        for fd in (cert_fd, key_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def serving_leaf_from_env(value: str | None) -> LeafFacts | None:
    """SERVING_CERTIFICATE_ENV's certificate, or None."""
    try:
        data = json.loads(value or "")
        return LeafFacts(
            float(data["not_before"]),
            float(data["not_after"]),
            frozenset(data["names"]),
            str(data["fingerprint"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def serving_leaf(config: IngressConfig, pem: CarrierPem | None = None) -> LeafFacts | None:
    """The certificate loaded at start (`pem`, when it was loaded from bytes read
    already), as a reload judges its successor; None when it cannot be read (a
    reload's then judged on its own)."""
    if config.tls.cert is None:
        return None
    with contextlib.suppress(TLSSetupError):
        if pem is not None:
            return leaf_facts_of(pem.cert, config.tls.cert)
        return leaf_facts(config.tls.cert)
    return None


def carrier_ssl_context(
    config: IngressConfig, pem: CarrierPem | None = None, ticket_keys: bytes | None = None
) -> ssl.SSLContext:
    """The carrier listener's TLS context, from `[tls]`; TLSSetupError if it cannot load.
    `pem`: the certificate and key read from tls.cert and tls.key already (then
    loaded, not the files). `ticket_keys`: its session tickets' keys, the same
    in every worker (SERVING_TICKET_KEYS_ENV); None: OpenSSL's own."""
    tls = config.tls
    if tls.cert is None or tls.key is None:
        raise TLSSetupError("tls.cert and tls.key must be set to serve the carrier listener")
    if pem is not None:
        return server_ssl_context_of(
            pem, tls.cert, tls.key, tls.min_version, tls.profile, ticket_keys=ticket_keys
        )
    return server_ssl_context(
        tls.cert, tls.key, tls.min_version, tls.profile, ticket_keys=ticket_keys
    )


def serves_alike(
    config: IngressConfig, pem: CarrierPem | None, other: IngressConfig, other_pem: CarrierPem
) -> bool:
    """Whether the carrier context of `config` and `pem` (None: not known) is
    the one `other` and `other_pem` would build: the same chain and key bytes,
    the same [tls] settings that go into it (tls.ca_file does not: it only
    judges the chain). A reload that changes neither keeps it, and carriers'
    sessions resume on; one that does builds another, which no session from
    before resumes into (nor a ticket: the supervisor draws new keys for it)."""
    mine, theirs = config.tls, other.tls
    return (
        pem == other_pem
        and mine.min_version == theirs.min_version
        and mine.profile == theirs.profile
    )


def ticket_keys_drawn_for(config: IngressConfig, pem: CarrierPem) -> bytes:
    """What session ticket keys are drawn for: a digest of what the carrier
    context is built from, as `serves_alike` compares it (the chain and key
    bytes, tls.min_version, tls.profile). Kept beside the keys in systemd's fd
    store (`fd_store.TICKET_KEYS_NAME`), so that a supervisor started again
    after a crash takes them up only for the certificate they were drawn for."""
    digest = hashlib.sha256(b"fleet-ingress session ticket keys\0")
    tls = config.tls
    for part in (pem.cert, pem.key, str(tls.min_version).encode(), str(tls.profile).encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def ticket_keys_to_json(keys: bytes) -> str:
    """The session ticket keys, for a worker's `reload` message (`ticket_keys_from_json`)."""
    return base64.b64encode(keys).decode()


def ticket_keys_from_json(value: Any) -> bytes | None:
    """`ticket_keys_to_json`'s keys; None when `value` is not that (none sent: a
    supervisor of an older release), and the worker's context keeps OpenSSL's own."""
    try:
        keys = base64.b64decode(value, validate=True)
    except (TypeError, ValueError):
        return None
    return keys if len(keys) == TICKET_KEYS_BYTES else None


def ticket_keys_from_env(value: str | None) -> bytes | None:
    """The session ticket keys in the memfd SERVING_TICKET_KEYS_ENV names
    (closed once read); None when it names none, or names what cannot be
    read, said in a warning (OpenSSL's own keys then serve: sessions resume on
    this worker alone, as before)."""
    if not value:
        return None
    try:
        fd = int(value)
    except ValueError:
        return _ticket_keys_not_taken(value, "not a descriptor number")
    try:
        keys = fd_path(fd).read_bytes()
    except OSError as exc:
        return _ticket_keys_not_taken(value, f"cannot be read: {exc.strerror or exc}")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(keys) != TICKET_KEYS_BYTES:
        return _ticket_keys_not_taken(value, f"{len(keys)} bytes, not {TICKET_KEYS_BYTES}")
    return keys


def _ticket_keys_not_taken(value: str, problem: str) -> None:
    """Said, as the worker falls back to OpenSSL's own keys (a supervisor of
    another release, a descriptor lost on the way): the fallback had been
    silent, and carriers moving between workers made full handshakes unseen."""
    log.warning(
        "the session ticket keys the supervisor handed are not taken: this worker "
        "seals tickets with keys of its own, so a carrier's session resumes on it "
        "alone (a full handshake on the other workers); a restart of the service "
        "hands every worker the same keys again",
        extra=fields(env=SERVING_TICKET_KEYS_ENV, value=value, problem=problem),
    )
    return None


def warn_about_chain(config: IngressConfig, pem: CarrierPem | None = None) -> None:
    """Serve anyway: the chain `check` refuses still works for carriers that hold the
    missing intermediate, and refusing to start would drop every call. `pem`:
    the certificate and key served, when not the files (kept over them)."""
    tls = config.tls
    if tls.cert is None or tls.key is None:
        return
    try:
        if pem is None:
            problem = chain_problem(tls.cert, tls.key, tls.ca_file)
        else:
            problem = pem_chain_problem(pem, tls.cert, tls.key, tls.ca_file)
        problem = problem and f"{tls.cert} {problem}"
        key = "tls.cert"
    except TLSSetupError as exc:  # tls.ca_file unusable: the chain cannot be judged
        problem, key = str(exc), "tls.ca_file"
    if problem:
        log.warning(
            "carriers may fail to verify the certificate chain; fleet-ingress check says how",
            extra=fields(key=key, cert=str(tls.cert), problem=problem),
        )
