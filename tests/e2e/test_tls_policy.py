"""`tls.profile` on the carrier listener, and the chain warning of `run` (issue #12).

Real TLS handshakes against the in-process ingress on loopback, from Python
clients narrowed to what an old or picky carrier stack offers. sslyze's Mozilla
check of the same profiles is in test_tls_scan.py.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import trustme

from fleet_ingress.service.ingress import Ingress
from tests.support import StartIngress, TLSFiles, free_port, offer_session, write_leaf_cert

# The test certificate is ECDSA (trustme's default), so TLS 1.2 suites are ECDHE-ECDSA.
CBC_ONLY = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384"


async def handshake(ingress: Ingress, ctx: ssl.SSLContext) -> dict[str, Any] | str:
    """Connect and complete a TLS handshake: what was agreed, or why it failed."""
    host, port = ingress.wss_address
    try:
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(host, port, ssl=ctx)
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    tls = writer.get_extra_info("ssl_object")
    agreed = {"version": tls.version(), "cipher": tls.cipher()[0]}
    writer.close()
    await writer.wait_closed()
    return agreed


def client(tls_files: TLSFiles, *, tls12_only: bool = False, ciphers: str | None = None):
    ctx = tls_files.client_context()
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


async def ingress_with(start_ingress: StartIngress, **tls: str) -> Ingress:
    return await start_ingress([f"https://127.0.0.1:{await free_port()} name=none"], tls=tls)


async def test_intermediate_refuses_cbc_which_openssl_profile_accepts(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    cbc = client(tls_files, tls12_only=True, ciphers=CBC_ONLY)
    default = await ingress_with(start_ingress)  # the default is "intermediate"
    assert isinstance(await handshake(default, cbc), str)
    assert await handshake(default, client(tls_files, tls12_only=True)) == {
        "version": "TLSv1.2",
        "cipher": "ECDHE-ECDSA-AES256-GCM-SHA384",
    }
    old = await ingress_with(start_ingress, profile="openssl")
    agreed = await handshake(old, cbc)
    assert isinstance(agreed, dict) and agreed["cipher"] in CBC_ONLY.split(":")


async def test_the_client_picks_among_the_strong_suites_under_mozillas_profiles(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """Mozilla: "cipher preference: client chooses" (a phone without AES hardware
    asks for ChaCha20 first); the OpenSSL profile keeps the server's order."""
    chacha_first = client(
        tls_files,
        tls12_only=True,
        ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384",
    )
    intermediate = await ingress_with(start_ingress, profile="intermediate")
    agreed = await handshake(intermediate, chacha_first)
    assert isinstance(agreed, dict) and agreed["cipher"] == "ECDHE-ECDSA-CHACHA20-POLY1305"
    old = await ingress_with(start_ingress, profile="openssl")
    agreed = await handshake(old, chacha_first)
    assert isinstance(agreed, dict) and agreed["cipher"] == "ECDHE-ECDSA-AES256-GCM-SHA384"


async def test_key_exchange_is_limited_to_mozillas_three_groups(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """X25519, P-256, P-384; P-521 (and X448) only under the OpenSSL profile.
    Over TLS 1.3: in TLS 1.2 a client's groups also bound the certificate's curve
    (P-256 here), so a P-521-only client fails there whatever the server allows;
    sslyze's curve scan covers TLS 1.2 (test_tls_scan.py)."""
    p521 = client(tls_files)
    p521.set_ecdh_curve("secp521r1")  # the client offers this group alone
    p384 = client(tls_files)
    p384.set_ecdh_curve("secp384r1")
    intermediate = await ingress_with(start_ingress)
    assert isinstance(await handshake(intermediate, p521), str)
    assert isinstance(await handshake(intermediate, p384), dict)
    old = await ingress_with(start_ingress, profile="openssl")
    assert isinstance(await handshake(old, p521), dict)


async def test_modern_is_tls_1_3_only_whatever_min_version_says(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    modern = await ingress_with(start_ingress, profile="modern", min_version="TLSv1.2")
    assert isinstance(await handshake(modern, client(tls_files, tls12_only=True)), str)
    agreed = await handshake(modern, client(tls_files))
    assert isinstance(agreed, dict) and agreed["version"] == "TLSv1.3"
    # The other way round: min_version raises the floor of "intermediate".
    floor = await ingress_with(start_ingress, profile="intermediate", min_version="TLSv1.3")
    assert isinstance(await handshake(floor, client(tls_files, tls12_only=True)), str)


async def test_a_reload_applies_a_new_profile_to_new_handshakes(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path
) -> None:
    ingress = await ingress_with(start_ingress, profile="modern")
    tls12 = client(tls_files, tls12_only=True)
    assert isinstance(await handshake(ingress, tls12), str)
    config = tmp_path / "ingress.toml"
    (tmp_path / "fleets.txt").write_text("https://127.0.0.1:9 name=none\n")
    config.write_text(_config_text(tls_files, ingress, 'profile = "intermediate"'))
    await ingress.reload(config)
    agreed = await handshake(ingress, tls12)
    assert isinstance(agreed, dict) and agreed["version"] == "TLSv1.2"


async def test_a_reload_that_changes_no_certificate_keeps_carriers_sessions_resuming(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A reload of fleets and timeouts alone keeps the carrier context, and a
    carrier's session from before resumes: every reload built a new one, so each
    carrier's next connection was a full handshake (about twice a resumption's
    time; the renewal audit of session 33). A renewal, or a new tls.profile,
    still builds a new one, which no session from before resumes into (one of
    a certificate replaced must not go on authenticating)."""
    first = write_leaf_cert(tls_files.ca, tmp_path)
    files = {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    ingress = await ingress_with(start_ingress, **files)
    port = ingress.wss_address[1]
    carriers = [client(tls_files), client(tls_files, tls12_only=True)]  # TLS 1.3, TLS 1.2
    sessions = [(await asyncio.to_thread(offer_session, port, c, None)).session for c in carriers]

    async def reconnect(serial: str, *, resumed: bool) -> None:
        for i, ctx in enumerate(carriers):
            got = await asyncio.to_thread(offer_session, port, ctx, sessions[i])
            assert (got.resumed, got.serial, got.answer) == (resumed, serial, b"HTTP/1.1 200"), i
            sessions[i] = got.session

    config = tmp_path / "ingress.toml"
    (tmp_path / "fleets.txt").write_text("https://127.0.0.1:9 name=none\n")
    config.write_text(_config_text(tls_files, ingress, home=tmp_path) + "[timeouts]\nqueue = 7\n")
    await ingress.reload(config)
    assert ingress.config.timeouts.queue == 7
    await reconnect(first, resumed=True)
    (tmp_path / "fleets.txt").write_text("https://127.0.0.1:10 name=other\n")
    await ingress.reload(config)
    await reconnect(first, resumed=True)

    renewed = write_leaf_cert(tls_files.ca, tmp_path)
    await ingress.reload(config)
    await reconnect(renewed, resumed=False)
    await reconnect(renewed, resumed=True)
    config.write_text(_config_text(tls_files, ingress, 'profile = "openssl"', home=tmp_path))
    await ingress.reload(config)
    await reconnect(renewed, resumed=False)


async def test_a_carrier_gets_one_session_ticket_a_handshake_which_resumes_each_connection(
    start_ingress: StartIngress, tls_files: TLSFiles
) -> None:
    """A full handshake gives the carrier one TLS 1.3 ticket, not OpenSSL's two
    (each cost a churned call 2 % of its instructions, session 39), as a
    resumption always has; and that one ticket resumes every connection that
    offers it, two at once as well as one after another: no carrier needs a
    second ticket for a second connection."""
    ingress = await ingress_with(start_ingress)
    port = ingress.wss_address[1]
    ctx = client(tls_files)
    tickets: list[bytes] = []

    def heard(_conn: Any, direction: str, _v: Any, _type: Any, msg_type: Any, data: bytes) -> None:
        if direction == "read" and msg_type == ssl._TLSMessageType.NEWSESSION_TICKET:
            tickets.append(data)

    ctx._msg_callback = heard  # type: ignore[attr-defined]  # CPython's debug hook
    first = await asyncio.to_thread(offer_session, port, ctx, None)
    assert (first.resumed, first.answer, len(tickets)) == (False, b"HTTP/1.1 200", 1)
    again = await asyncio.gather(
        *(asyncio.to_thread(offer_session, port, ctx, first.session) for _ in range(3))
    )
    assert [got.resumed for got in again] == [True, True, True]
    assert len(tickets) == 4  # one a resumption, as before
    later = await asyncio.to_thread(offer_session, port, ctx, again[0].session)
    assert later.resumed


def _config_text(
    tls_files: TLSFiles, ingress: Ingress, *tls_lines: str, home: Path | None = None
) -> str:
    """`home`: the certificate is home/cert.pem and home/key.pem (`write_leaf_cert`)."""
    host, port = ingress.wss_address
    lines = "\n".join(tls_lines)
    cert, key = (
        (tls_files.ingress_cert, tls_files.ingress_key)
        if home is None
        else (home / "cert.pem", home / "key.pem")
    )
    return f"""
[listen]
wss = "{host}:{port}"
acme = ""
stats = ""
admin_socket = ""

[tls]
cert = "{cert}"
key = "{key}"
ca_file = "{tls_files.ca_pem}"
{lines}

[fleets]
ca_file = "{tls_files.ca_pem}"
"""


async def test_run_serves_a_leaf_only_certificate_but_warns_at_start_and_reload(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path, caplog
) -> None:
    """A missing intermediate breaks carriers that do not hold it, not those that
    do: `run` serves (refusing would drop every call) and says what is wrong."""
    root = trustme.CA()
    root.cert_pem.write_to_path(tmp_path / "root.pem")
    leaf = root.create_child_ca().issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")  # certbot's cert.pem
    leaf.private_key_pem.write_to_path(tmp_path / "privkey.pem")
    caplog.set_level(logging.WARNING, logger="fleet_ingress.server")
    tls = {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "privkey.pem")}
    ingress = await ingress_with(start_ingress, **tls, ca_file=str(tmp_path / "root.pem"))

    def chain_warnings() -> list[dict[str, Any]]:
        return [
            r.fields  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage().startswith("carriers may fail to verify the certificate chain")
        ]

    (warning,) = chain_warnings()
    assert warning["key"] == "tls.cert"
    assert warning["problem"].startswith(
        f"{tmp_path}/cert.pem holds the server's certificate alone"
    )
    assert "use fullchain.pem, not cert.pem" in warning["problem"]
    # It serves: a carrier that holds the intermediate (here: given it) still connects.
    carrier = ssl.create_default_context(cafile=tmp_path / "root.pem")
    carrier.load_verify_locations(cadata=leaf_issuer_pem(leaf))
    assert isinstance(await handshake(ingress, carrier), dict)

    (tmp_path / "fleets.txt").write_text("https://127.0.0.1:9 name=none\n")
    config = tmp_path / "ingress.toml"
    config.write_text(
        _config_text(tls_files, ingress)
        .replace(str(tls_files.ingress_cert), tls["cert"])
        .replace(str(tls_files.ingress_key), tls["key"])
        .replace(f'ca_file = "{tls_files.ca_pem}"', f'ca_file = "{tmp_path}/root.pem"', 1)
    )
    await ingress.reload(config)
    assert len(chain_warnings()) == 2
    # Fixed by the renewal (fullchain.pem), the next reload says nothing.
    (tmp_path / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    await ingress.reload(config)
    assert len(chain_warnings()) == 2


def leaf_issuer_pem(leaf: trustme.LeafCert) -> str:
    return leaf.cert_chain_pems[1].bytes().decode()


async def test_run_warns_of_two_fleets_at_one_address_at_start_and_reload(
    start_ingress: StartIngress, tls_files: TLSFiles, tmp_path: Path, caplog
) -> None:
    """The one-process mode (`run` without workers) says what the supervisor
    and `check` say of a fleet at 127.0.0.1 in another spelling (0x7f.0.0.1):
    one host, two maxconn budgets. It said nothing, at start or reload."""
    caplog.set_level(logging.WARNING, logger="fleet_ingress.server")
    lines = ["http://0x7f.0.0.1:18443 name=hex", "http://127.0.0.1:18443 name=plain"]

    def said() -> list[str]:
        return [
            r.fields["detail"]  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "fleets file: an address in another spelling"
        ]

    ingress = await start_ingress(lines)
    at_start = said()
    assert len(at_start) == 2, at_start
    assert "'0x7f.0.0.1' is the IPv4 address 127.0.0.1 to every resolver" in at_start[0]
    assert at_start[1].startswith("fleets 'hex' (http://0x7f.0.0.1:18443) and 'plain'")
    caplog.clear()
    (tmp_path / "fleets.txt").write_text("\n".join(lines) + "\n")
    config = tmp_path / "ingress.toml"
    config.write_text(_config_text(tls_files, ingress))
    changes = await ingress.reload(config)
    assert said() == at_start
    assert f"warning: {at_start[1]}" in changes, changes
