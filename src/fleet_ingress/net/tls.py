"""TLS contexts for the carrier listener and the fleet connections, and certificate facts."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import ssl
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleet_ingress.core.certificate_change import LeafFacts

log = logging.getLogger("fleet_ingress.tls")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_ALPN = ["http/1.1"]  # WebSocket upgrades are HTTP/1.1 only; never let a peer pick h2


class TLSSetupError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the files."""


@dataclass(frozen=True)
class TLSProfile:
    """One `tls.profile`: what the carrier listener offers."""

    floor: ssl.TLSVersion
    ciphers: str  # the TLS 1.2 list; TLS 1.3's three AEAD suites are OpenSSL's default
    groups: str | None  # key exchange groups; None: OpenSSL's default list
    server_order: bool  # the server's cipher order wins over the client's


# Mozilla's server-side TLS guidelines 5.7, "intermediate", minus its three DHE-RSA
# suites: every client Mozilla lists for intermediate (Android 4.4.2, Java 8u31,
# IE 11 on Windows 7, OpenSSL 1.0.1, ...) has ECDHE, and a DHE handshake costs the
# server a 2048-bit modular exponentiation a client can ask for cheaply (D(HE)at,
# CVE-2002-20001) on the event loop every call shares. No CBC (LUCKY13), no static
# RSA key exchange (no forward secrecy, ROBOT).
_MOZILLA_TLS12 = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
_MOZILLA_GROUPS = "X25519:P-256:P-384"
PROFILES = {
    # Mozilla leaves the choice to the client (server_preferred_order false): with only
    # strong suites, a phone without AES hardware picks ChaCha20.
    "intermediate": TLSProfile(ssl.TLSVersion.TLSv1_2, _MOZILLA_TLS12, _MOZILLA_GROUPS, False),
    "modern": TLSProfile(ssl.TLSVersion.TLSv1_3, _MOZILLA_TLS12, _MOZILLA_GROUPS, False),
    # What the listener did before profiles existed (and the HAProxy it replaced):
    # OpenSSL's DEFAULT list, CBC and static-RSA suites included, for a carrier whose
    # TLS 1.2 stack has nothing better.
    "openssl": TLSProfile(ssl.TLSVersion.TLSv1_2, "DEFAULT", None, True),
}


# TLS 1.3 session tickets given a carrier after a full handshake. OpenSSL's
# default is 2 (for a browser opening two connections at once), and it gives 1
# after a resumption whatever this says: a carrier that resumes already lives
# on one ticket a connection. Our tickets are stateless and not single-use (no
# early data, so no anti-replay cache): one resumes any number of connections,
# at once or in turn, until its lifetime ends. Each ticket costs a churned call
# about 0.17 M instructions (2.1 %; the session serialized and sealed, its PSK
# derived: bench/README, session 39), for nothing a carrier can use.
CARRIER_TICKETS = 1


def server_ssl_context(
    cert: Path,
    key: Path,
    min_version: str = "TLSv1.2",
    profile: str = "intermediate",
    *,
    named: tuple[Path, Path] | None = None,
    ticket_keys: bytes | None = None,
) -> ssl.SSLContext:
    """The carrier listener's context from the files `cert` and `key`; `named`: the
    files the messages name when `cert` and `key` hold what was read from them
    (`server_ssl_context_of`). `ticket_keys`: the keys its session tickets are
    sealed with (`share_ticket_keys`); None: OpenSSL's own, random per context."""
    cert_name, key_name = named or (cert, key)
    if min_version not in _VERSIONS:
        raise TLSSetupError(f"TLS minimum version {min_version!r}: the floor is TLSv1.2")
    if profile not in PROFILES:
        raise TLSSetupError(f"TLS profile {profile!r}: use one of {', '.join(PROFILES)}")
    chosen = PROFILES[profile]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Set explicitly rather than trusting the OS OpenSSL policy, as the HAProxy bind did.
    # Both are floors, so the higher wins: "modern" is TLS 1.3 whatever min_version says.
    ctx.minimum_version = max(_VERSIONS[min_version], chosen.floor)
    # Set even for "openssl": Python narrows the cipher list below OpenSSL's default.
    ctx.set_ciphers(chosen.ciphers)
    if chosen.groups is not None:
        _set_groups(ctx, chosen.groups)
    if not chosen.server_order:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(_ALPN)
    ctx.num_tickets = CARRIER_TICKETS
    try:
        # The password callback stops OpenSSL from prompting on the terminal for an
        # encrypted key, which would hang a daemon; such a key just fails to load.
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except OSError as exc:
        # ssl.SSLError is an OSError too; only these mean "both fine, not a pair".
        if getattr(exc, "reason", None) in _NOT_A_PAIR:
            if misordered := _misordered(cert, key, key_name):
                raise TLSSetupError(f"certificate {cert_name} {misordered}") from None
            problem = "do not match: the key is not the one the certificate was issued for"
            # The files named: `cert` and `key` may be /proc/self/fd links (from_bytes).
            problem += _key_types(cert, key) + _key_fix(Path(cert_name), Path(key_name))
        elif isinstance(exc, ssl.SSLError):
            problem = f"cannot be read: {_pem_problem(cert, key, cert_name, key_name)}"
        else:
            unreadable = ", ".join(
                str(n) for p, n in ((cert, cert_name), (key, key_name)) if not os.access(p, os.R_OK)
            )
            problem = f"cannot be read: {exc.strerror} ({unreadable or cert_name})"
        raise TLSSetupError(f"certificate {cert_name} and key {key_name} {problem}") from None
    if ticket_keys is not None:
        share_ticket_keys(ctx, ticket_keys)
    return ctx


# OpenSSL's reasons for a certificate and a key that each load but are not a
# pair: KEY_VALUES_MISMATCH (keys of one type), NO_CERTIFICATE_ASSIGNED (a key
# of another type than the certificate's, which OpenSSL files beside it: an
# RSA <-> ECDSA renewal whose key and certificate disagree). The second was
# told "cannot be read: each must be PEM" (the renewal audit of session 33).
_NOT_A_PAIR = ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED")


def _key_types(cert: Path, key: Path) -> str:
    """What the two keys are, when not of one type: " (the certificate's key is
    RSA, this key is ECDSA)"; else ""."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return ""
    theirs, mine = _key_type(leaf.public_key()), _key_type(private.public_key())
    return "" if theirs == mine else f" (the certificate's key is {theirs}, this key is {mine})"


def _key_fix(cert: Path, key: Path) -> str:
    """What to do about a key that is not the certificate's, naming certbot's
    renewals when the two are links to files of two of them (live/fullchain.pem
    to fullchain8.pem, live/privkey.pem to privkey7.pem: a link put back by hand,
    a swap caught half way). The renewal audit of session 38: no fix was said."""
    fix = "; put the key issued with this certificate in place, then reload"
    if not (cert.is_symlink() and key.is_symlink()):
        return fix
    theirs, mine = Path(os.path.realpath(cert)).name, Path(os.path.realpath(key)).name
    cert_n, key_n = _renewal_number(theirs), _renewal_number(mine)
    if cert_n is None or key_n is None or cert_n == key_n:
        return fix + " (certbot: privkeyN.pem of the renewal of fullchainN.pem, one N)"
    return (
        f"; they are links to two renewals ({cert.name} to {theirs}, {key.name} to {mine}): "
        "link both to the files of one renewal, then reload"
    )


def _renewal_number(name: str) -> str | None:
    """certbot's archive/ name its number: fullchain8.pem -> "8"."""
    stem = name.removesuffix(".pem")
    digits = stem[len(stem.rstrip("0123456789")) :]
    return digits or None


def _key_type(public: Any) -> str:
    if isinstance(public, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "ECDSA"
    return type(public).__name__.lstrip("_").removesuffix("PublicKey")


class CarrierPem(NamedTuple):
    """The carrier certificate chain and key, as read once from tls.cert and
    tls.key: what is checked is what is served, and what the supervisor hands
    the workers it starts (`held_pem`), whatever the files hold since."""

    cert: bytes
    key: bytes


def read_pem(cert: Path, key: Path) -> CarrierPem:
    """The bytes of `cert` and `key`; TLSSetupError naming the one unreadable."""
    try:
        return CarrierPem(cert.read_bytes(), key.read_bytes())
    except OSError as exc:
        raise TLSSetupError(
            f"certificate {cert} and key {key} cannot be read: {exc.strerror} ({exc.filename})"
        ) from None


# What a held memfd may no longer do: change size or content, or lose these seals.
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def memfd_of(data: bytes, name: str) -> int:
    """A sealed memfd (close-on-exec, mode 0600: key material) holding `data`;
    its path for OpenSSL is /proc/self/fd/N (each open reads from the start)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int) -> Path:
    return Path(f"/proc/self/fd/{fd}")


def held_pem(pem: CarrierPem) -> tuple[int, int]:
    """`pem` in two sealed memfds (certificate, key), for a worker to load
    (`pem_from_fds`); the caller closes them."""
    cert_fd = memfd_of(pem.cert, "fleet-ingress tls.cert")
    try:
        return cert_fd, memfd_of(pem.key, "fleet-ingress tls.key")
    except BaseException:
        os.close(cert_fd)
        raise


def pem_from_fds(cert_fd: int, key_fd: int) -> CarrierPem:
    """What `held_pem`'s memfds hold (from their start, whatever their offset)."""
    return CarrierPem(fd_path(cert_fd).read_bytes(), fd_path(key_fd).read_bytes())


def server_ssl_context_of(
    pem: CarrierPem,
    cert: Path,
    key: Path,
    min_version: str = "TLSv1.2",
    profile: str = "intermediate",
    *,
    ticket_keys: bytes | None = None,
) -> ssl.SSLContext:
    """`server_ssl_context` loaded from `pem` (read from `cert` and `key`, which
    messages name), not from the files again."""
    fds = held_pem(pem)
    try:
        return server_ssl_context(
            fd_path(fds[0]),
            fd_path(fds[1]),
            min_version,
            profile,
            named=(cert, key),
            ticket_keys=ticket_keys,
        )
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _pem_problem(cert_path: Path, key_path: Path, cert: Path, key: Path) -> str:
    """Which of the two OpenSSL could not take, from what each holds (read from
    `cert_path` and `key_path`; the messages name `cert` and `key`)."""
    try:
        cert_text, key_text = cert_path.read_bytes(), key_path.read_bytes()
    except OSError:
        return "each must be PEM, and the key not encrypted"
    if b"ENCRYPTED" in key_text:
        return (
            f"the key {key} is encrypted (a daemon cannot be asked for its passphrase); "
            "decrypt it: `openssl pkey -in KEY -out KEY.plain`"
        )
    if b"PRIVATE KEY-----" not in key_text:
        held = "a certificate" if b"-----BEGIN CERTIFICATE-----" in key_text else "no PEM key"
        return f"the key {key} holds {held}; tls.key is the private key (certbot's privkey.pem)"
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        return (
            f"the certificate {cert} holds no PEM certificate; tls.cert is the certificate "
            "chain (certbot's fullchain.pem)"
        )
    # A renewal half written (the renewal audit of session 33): say which file.
    if _cut_short(cert_text, b"CERTIFICATE", x509.load_pem_x509_certificates):
        return f"the certificate {cert} {_CUT_SHORT}"
    if _cut_short(key_text, b"PRIVATE KEY", _load_key):
        return f"the key {key} {_CUT_SHORT}"
    return "each must be PEM, and the key not encrypted"


_CUT_SHORT = "is cut short or damaged (a file half written?): its PEM does not parse whole"


def _load_key(data: bytes) -> Any:
    return serialization.load_pem_private_key(data, password=None)


def _cut_short(text: bytes, label: bytes, parse: Any) -> bool:
    """Whether `text`'s PEM blocks of `label` do not run BEGIN to END, or do not parse."""
    begins, ends = text.count(b"-----BEGIN "), text.count(b"-----END ")
    if begins != ends:
        return True
    try:
        parse(text)
    except ValueError:
        return label in text
    except (TypeError, UnsupportedAlgorithm):
        return False
    return False


# SSL_CTRL_SET_GROUPS_LIST, the control behind SSL_CTX_set1_groups_list (OpenSSL >= 1.1.1).
_SET_GROUPS_LIST = 92
_groups_fallback_logged = False


@functools.cache
def _libssl_calls() -> tuple[Any, Any] | None:
    """OpenSSL's SSL_CTX_get_options and SSL_CTX_ctrl, looked up once per process
    (None: not to be had). Opened for every context built, the library's handle
    and function objects cost about 0.5 KB of memory a reload, in every process,
    for good (the long-life audit of session 25)."""
    try:
        import _ssl

        libssl = ctypes.CDLL(_ssl.__file__)  # resolves through the libssl _ssl links to
        get_options = libssl.SSL_CTX_get_options
        get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
        control = libssl.SSL_CTX_ctrl
        control.restype = ctypes.c_long
        control.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    except (OSError, AttributeError, ImportError):
        return None
    return get_options, control


def _set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """Limit key exchange to `groups`. Python before 3.15 has only set_ecdh_curve,
    which allows one group: P-256 alone would cost every TLS 1.3 client that sends an
    X25519 key share (OpenSSL, Chrome, Firefox) a HelloRetryRequest, one more round
    trip before each call. So OpenSSL's own call is made on the context's SSL_CTX,
    after checking that the pointer read is that SSL_CTX (its options read back)."""
    global _groups_fallback_logged
    calls = _libssl_calls()
    if calls is not None and ssl.OPENSSL_VERSION_INFO >= (1, 1, 1):
        try:
            ssl_ctx = _openssl_ctx(ctx, calls)
            if ssl_ctx and calls[1](ssl_ctx, _SET_GROUPS_LIST, 0, groups.encode()) == 1:
                return
        except (OSError, ValueError, ctypes.ArgumentError):
            pass  # the one-group fallback below
    ctx.set_ecdh_curve("prime256v1")  # within every profile's list, at one round trip's cost
    if not _groups_fallback_logged:
        _groups_fallback_logged = True
        log.warning(
            "TLS key exchange limited to P-256: this Python cannot set a list of groups; "
            "TLS 1.3 clients that lead with X25519 take one more round trip"
        )


def _openssl_ctx(ctx: ssl.SSLContext, calls: tuple[Any, Any]) -> int | None:
    """The address of OpenSSL's SSL_CTX under `ctx` (PySSLContext is PyObject_HEAD
    then SSL_CTX *ctx), when its options read back through it; else None."""
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if ssl_ctx and calls[0](ssl_ctx) == int(ctx.options):
        return int(ssl_ctx)
    return None


# SSL_CTRL_GET_ / SET_TLSEXT_TICKET_KEYS, behind SSL_CTX_get_ / set_tlsext_ticket_keys:
# the key name, HMAC key and AES key tickets are sealed with (16 + 32 + 32 bytes
# since OpenSSL 1.1.0; asked with no buffer, OpenSSL says how many).
_GET_TICKET_KEYS, _SET_TICKET_KEYS = 58, 59
TICKET_KEYS_BYTES = 80
_tickets_fallback_logged = False


def new_ticket_keys() -> bytes:
    return os.urandom(TICKET_KEYS_BYTES)


def share_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Seal `ctx`'s session tickets (TLS 1.3's, and TLS 1.2's) with `keys`, as
    the other workers' contexts given them do: a carrier's ticket resumes on
    whichever worker the kernel hands its next connection. OpenSSL draws random
    keys per context, so with 2 workers a ticket resumed about half the time
    (the renewal audit of session 33). False (the context keeps its own, said
    once) when OpenSSL's call cannot be reached or takes keys of another size."""
    global _tickets_fallback_logged
    calls = _libssl_calls()
    if calls is not None and len(keys) == TICKET_KEYS_BYTES:
        control = calls[1]
        try:
            ssl_ctx = _openssl_ctx(ctx, calls)
            # Asked first, so that a size refused leaves no error queued in OpenSSL.
            if ssl_ctx and control(ssl_ctx, _SET_TICKET_KEYS, 0, None) == len(keys):
                held = ctypes.create_string_buffer(len(keys))
                if (
                    control(ssl_ctx, _SET_TICKET_KEYS, len(keys), keys) == 1
                    and control(ssl_ctx, _GET_TICKET_KEYS, len(keys), held) == 1
                    and held.raw == keys
                ):
                    return True
        except (OSError, ValueError, ctypes.ArgumentError):
            pass
    if not _tickets_fallback_logged:
        _tickets_fallback_logged = True
        log.warning(
            "TLS session tickets are not shared between workers: this Python or OpenSSL "
            "does not take the keys; a carrier resumes its session only on the worker "
            "that issued its ticket"
        )
    return False


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


def leaf_facts(cert: Path) -> LeafFacts:
    """The first certificate of a PEM file (the leaf, in fullchain.pem): its validity
    and the names it is for (its subjectAltName; its common name if it has none)."""
    try:
        data = cert.read_bytes()
    except OSError as exc:
        raise TLSSetupError(f"certificate {cert} cannot be read: {exc.strerror}") from None
    return leaf_facts_of(data, cert)


def leaf_facts_of(data: bytes, cert: Path) -> LeafFacts:
    """`leaf_facts` of `data`, read from `cert` (which messages name)."""
    try:
        leaf = x509.load_pem_x509_certificate(data)
    except ValueError:
        if b"-----BEGIN CERTIFICATE-----" in data:  # a renewal half written
            raise TLSSetupError(f"certificate {cert} {_CUT_SHORT}") from None
        raise TLSSetupError(f"certificate {cert} is not a PEM certificate") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = [
            str(attr.value).lower()
            for attr in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    except ValueError as exc:  # parsed lazily: a malformed extension (the review of session 24)
        raise TLSSetupError(
            f"certificate {cert}: its subjectAltName cannot be read: {exc}"
        ) from None
    return LeafFacts(
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        names=frozenset(names),
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
    )


# How clients judge the chain the listener serves: OpenSSL's verification, as a
# carrier's TLS stack would run it, without the host name (check does not know which
# name carriers dial) and without the clock (expiry has its own warning).
_X509_V_FLAG_NO_CHECK_TIME = 0x200000
_FULLCHAIN_HINT = "certbot's fullchain.pem holds the certificate and its intermediates, in order"


def chain_problem(
    cert: Path,
    key: Path,
    ca_file: Path | None = None,
    *,
    named: tuple[Path, Path] | None = None,
) -> str | None:
    """What keeps a client from verifying the chain in `cert`, or None when nothing does.

    The chain must run leaf first, each certificate followed by its issuer, and end at
    (or just below) a root in the system trust store, or in `ca_file` when the operator
    names one: a private CA that carriers are given, or a self-signed certificate.
    `named`: the files the messages name (read from `cert` and `key`: memfds)."""
    cert_name, key_name = named or (cert, key)
    try:
        chain = x509.load_pem_x509_certificates(cert.read_bytes())
    except (OSError, ValueError):
        return None  # unreadable or not PEM: server_ssl_context names that
    if problem := _misordered(cert, key, key_name):
        return problem
    for i, (subject, issuer) in enumerate(pairwise(chain), start=1):
        if not _issued_by(subject, issuer):
            return (
                f"is not in order: certificate {i + 1} ({_name(issuer)}) did not issue "
                f"certificate {i} ({_name(subject)}); each certificate must be followed by "
                f"its issuer ({_FULLCHAIN_HINT})"
            )
    code, message = _verify_as_client(cert, key, ca_file)
    if code is None:
        return None
    trusted = f"tls.ca_file {ca_file}" if ca_file else "the system trust store"
    if ca_file is None and code in (2, 19, 20) and (where := _empty_trust_store()):
        # No root at all: any chain would read as incomplete; say what is really missing.
        return (
            f"cannot be verified here: the system trust store is empty ({where}); install "
            "the ca-certificates package (or set tls.ca_file to the CA carriers trust)"
        )
    last = chain[-1]
    private = (
        "; for a private CA that carriers are given, set tls.ca_file to its certificate"
        if ca_file is None
        else ""
    )
    if code == 18:  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        return (
            f"is self-signed and not in {trusted}: carriers refuse it unless they were given "
            "it; use a CA-issued certificate, or set tls.ca_file to this one if carriers "
            "trust it"
        )
    if code == 19:  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        return (
            f"ends at the root {_name(last)}, which is not in {trusted}: carriers refuse "
            f"the chain{private}"
        )
    if code in (2, 20):  # unable to get (local) issuer certificate
        if len(chain) == 1:
            fullchain = cert_name.with_name("fullchain.pem")
            use = f"use {fullchain}" if fullchain.is_file() else "use fullchain.pem"
            # Already fullchain.pem: certbot's advice would send the operator in a circle.
            hint = (
                "; the file is named fullchain.pem but holds one certificate: put the "
                "intermediates after it, in order"
                if cert_name.name == "fullchain.pem"
                else f". With certbot, {use}, not cert.pem ({_FULLCHAIN_HINT})"
            )
            return (
                f"holds the server's certificate alone, and its issuer ({_name_of(last.issuer)})"
                f" is not in {trusted}: the intermediate certificate(s) linking it to a "
                f"trusted root are missing, so carriers fail to verify it{hint}{private}"
            )
        return (
            f"stops at {_name(last)}, whose issuer ({_name_of(last.issuer)}) is neither in "
            f"the file nor in {trusted}: an intermediate certificate is missing, so carriers "
            f"fail to verify it ({_FULLCHAIN_HINT}){private}"
        )
    return f"cannot be verified against {trusted}: {message}"


def pem_chain_problem(
    pem: CarrierPem, cert: Path, key: Path, ca_file: Path | None = None
) -> str | None:
    """`chain_problem` of `pem` (read from `cert` and `key`, which messages name),
    not of the files again: what a process serves."""
    fds = held_pem(pem)
    try:
        return chain_problem(fd_path(fds[0]), fd_path(fds[1]), ca_file, named=(cert, key))
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _empty_trust_store() -> str | None:
    """Where OpenSSL looks for the system's roots, when it finds none there (no bundle
    file, no certificate in the directory); None when it has some."""
    paths = ssl.get_default_verify_paths()
    if paths.cafile is not None:  # set only when the file exists
        return None
    directory = Path(paths.capath) if paths.capath else None
    try:
        if directory is not None and any(directory.iterdir()):
            return None
    except OSError:
        pass
    cafile = os.environ.get(paths.openssl_cafile_env, paths.openssl_cafile)
    capath = os.environ.get(paths.openssl_capath_env, paths.openssl_capath)
    return f"no {cafile}, no certificate in {capath}"


def _misordered(cert: Path, key: Path, key_name: Path | None = None) -> str | None:
    """When the key belongs to a certificate other than the first: say so, rather
    than "do not match" (OpenSSL pairs the key with the first certificate only).
    `key_name`: the file messages name (`key` when None)."""
    try:
        chain = x509.load_pem_x509_certificates(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    mine = private.public_key().public_bytes(*spki)
    found = [i for i, c in enumerate(chain) if c.public_key().public_bytes(*spki) == mine]
    if not found or found[0] == 0:
        return None
    return (
        f"has its certificates in the wrong order: the key {key_name or key} belongs to "
        f"certificate {found[0] + 1} of {len(chain)} ({_name(chain[found[0]])}), and the server's "
        f"certificate must come first, then each issuer ({_FULLCHAIN_HINT})"
    )


def _issued_by(subject: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        subject.verify_directly_issued_by(issuer)
    except (ValueError, InvalidSignature):
        return False
    except (TypeError, UnsupportedAlgorithm):  # a signature scheme it cannot check
        return subject.issuer == issuer.subject
    return True


def _name(certificate: x509.Certificate) -> str:
    return _name_of(certificate.subject)


def _name_of(name: x509.Name) -> str:
    return name.rfc4514_string() or "an empty name"


def _verify_as_client(cert: Path, key: Path, ca_file: Path | None) -> tuple[int | None, str]:
    """A TLS handshake in memory, the listener's chain against a client that trusts
    what carriers trust: (OpenSSL's verify code, its message), or (None, "")."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(cert, key, password=lambda: b"")
    except OSError:
        return None, ""  # server_ssl_context names that problem
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
    if ca_file is not None:
        try:
            client.load_verify_locations(cafile=ca_file)
        except OSError as exc:
            pem = isinstance(exc, ssl.SSLError)
            reason = "it holds no PEM certificate" if pem else exc.strerror
            raise TLSSetupError(f"CA file {ca_file} cannot be used: {reason}") from None
    else:
        client.load_default_certs(ssl.Purpose.SERVER_AUTH)
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out)
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(4):  # a TLS 1.3 handshake takes two flights each way
        try:
            client_side.do_handshake()
            return None, ""
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_code, exc.verify_message
        except ssl.SSLWantReadError:
            server_in.write(client_out.read())
        except ssl.SSLError:
            return None, ""  # not a verdict on the chain
        try:
            server_side.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            return None, ""
        client_in.write(server_out.read())
    return None, ""
