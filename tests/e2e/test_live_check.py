"""`fleet-ingress check -c CONFIG --live`, keepalived's track script (SPEC section 14):
exit 0 only when the ingress running here completes a TLS handshake, answers its
health route and has a fleet UP and READY; one line saying why otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet_ingress.config.settings import load_config
from fleet_ingress.core.balancer import Admin
from fleet_ingress.entry import live_config
from fleet_ingress.ops.live_check import (
    LiveSettings,
    is_this_hosts,
    judge_fleets,
    live_check,
    live_settings,
    local_addresses,
    local_target,
)
from fleet_ingress.service.ingress import Ingress
from fleet_ingress.sim import SimulatedFleet
from tests.support import StartIngress, TLSFiles, free_port, no_ipv6_loopback

CLI = [sys.executable, "-m", "fleet_ingress"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLEET_INGRESS_"):
            monkeypatch.delenv(name)


def fleet(name: str, health: str = "UP", admin: str = "READY", **more: Any) -> dict[str, Any]:
    return {"name": name, "health": health, "admin": admin, "removing": False, **more}


@pytest.mark.parametrize(
    ("snapshot", "live", "says"),
    [
        ({"state": "serving", "fleets": [fleet("a")]}, True, "1 of 1 fleets UP (a)"),
        (
            {"state": "serving", "fleets": [fleet("a", "DOWN"), fleet("b", full=True)]},
            True,
            "1 of 2 fleets UP (b FULL)",  # FULL is capacity: the peer sees the same fleets
        ),
        (
            {"state": "serving", "fleets": [fleet("a", "DOWN"), fleet("b", "INIT")]},
            False,
            "no fleet UP and READY (a DOWN, b INIT)",
        ),
        (
            {"state": "serving", "fleets": [fleet("a", admin="DRAIN"), fleet("b", admin="MAINT")]},
            False,
            "no fleet UP and READY (a UP DRAIN, b - MAINT)",
        ),
        (
            {"state": "serving", "fleets": [fleet("a", admin="DRAIN", removing=True)]},
            False,
            "(a UP DRAIN being removed)",
        ),
        ({"state": "draining", "fleets": [fleet("a")]}, False, "stopping (draining)"),
        ({"state": "serving", "fleets": []}, False, "reports no fleet"),
        ({"state": "serving"}, False, "reports no fleet"),
    ],
)
def test_judge_fleets(snapshot: dict[str, Any], live: bool, says: str) -> None:
    ok, line = judge_fleets(snapshot)
    assert ok is live
    assert says in line


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("0.0.0.0:443", ("127.0.0.1", 443)),
        ("[::]:443", ("::1", 443)),
        ("192.0.2.10:8443", ("192.0.2.10", 8443)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("127.0.0.1:8404", ("127.0.0.1", 8404)),
    ],
)
def test_a_wildcard_listener_is_reached_on_loopback(address: str, target: tuple) -> None:
    assert local_target(address) == target


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.10
              /32 host LOCAL
           |-- 192.0.2.11
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
"""
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000011 02 40 00 80     eth0
"""


def test_the_addresses_of_this_host_are_read_from_the_kernel_tables() -> None:
    # Not the network, broadcast or route entries. (tests/test_two_hosts.py has the
    # real thing: the shared address counts on the host holding it, not on the other.)
    assert local_addresses(FIB_TRIE, IF_INET6) == {
        "192.0.2.10",
        "192.0.2.11",
        "127.0.0.1",
        "::1",
        "2001:db8::11",
    }


def test_a_link_local_address_is_this_hosts_with_the_zone_of_its_interface() -> None:
    """listen.wss = "[fe80::10%ve0]:8443": `check --live` said 'not an address of
    this host now' (the address was looked for with its zone, never listed so)."""
    if_inet6 = IF_INET6 + "fe800000000000000000000000000010 03 40 20 80      ve0\n"
    found = local_addresses("", if_inet6)
    assert {"fe80::10", "fe80::10%ve0", "fe80::10%3"} <= found
    assert "fe80::10%eth0" not in found and "fe80::10%2" not in found


def test_loopback_is_always_this_hosts_and_the_kernel_tables_are_readable() -> None:
    """::1 is looked for only where lo has it: a kernel booted with
    ipv6.disable=1 has no /proc/net/if_inet6, and lo with disable_ipv6=1 no ::1
    in it (is_this_hosts("::1") holds on both: loopback needs no table)."""
    assert is_this_hosts("127.0.0.1") and is_this_hosts("::1") and is_this_hosts("127.0.0.2")
    ipv6 = no_ipv6_loopback() is None
    if_inet6 = Path("/proc/net/if_inet6")
    mine = local_addresses(
        Path("/proc/net/fib_trie").read_text(), if_inet6.read_text() if ipv6 else ""
    )
    assert "127.0.0.1" in mine and ("::1" in mine) == ipv6


def write_config(
    path: Path,
    tls_files: TLSFiles,
    *,
    wss: str,
    stats: str = "",
    admin_socket: str = "",
    health: str = "/haproxy-health",
) -> Path:
    path.write_text(
        f"""
[listen]
wss = "{wss}"
acme = ""
stats = "{stats}"
admin_socket = "{admin_socket}"
[tls]
cert = "{tls_files.ingress_cert}"
key = "{tls_files.ingress_key}"
[routes]
health = "{health}"
"""
    )
    return path


def config_for(ingress: Ingress, path: Path, tls_files: TLSFiles) -> Path:
    """A config file naming the listeners `ingress` really has (ports chosen by the OS)."""
    host, port = ingress.wss_address
    stats = "" if ingress.stats_address is None else "{}:{}".format(*ingress.stats_address)
    admin = "" if ingress.admin_socket is None else str(ingress.admin_socket)
    return write_config(path, tls_files, wss=f"{host}:{port}", stats=stats, admin_socket=admin)


async def live(path: Path) -> tuple[bool, str]:
    # live_check runs its own event loop, as the command does.
    result = await asyncio.to_thread(live_check, path)
    return result.live, result.line


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.fixture
async def sim(tls_files: TLSFiles) -> Any:
    async with SimulatedFleet(name="a", ssl_context=tls_files.fleet_server_context()) as fleet:
        yield fleet


@pytest.mark.parametrize("source", ["stats", "admin_socket"])
async def test_live_follows_the_running_ingress(
    start_ingress: StartIngress,
    sim: SimulatedFleet,
    tls_files: TLSFiles,
    tmp_path: Path,
    source: str,
) -> None:
    listen = (
        {"stats": "127.0.0.1:0"}
        if source == "stats"
        else {"admin_socket": str(tmp_path / "admin.sock")}
    )
    ingress = await start_ingress(
        [f"{sim.url} name=a"],
        health_checks=True,
        listen=listen,
        fleets={"check_interval": 0.05, "check_timeout": 1.0},
    )
    path = config_for(ingress, tmp_path / "ingress.toml", tls_files)
    await until(lambda: ingress.balancer.fleets[0].up)
    ok, line = await live(path)
    assert ok, line
    host, port = ingress.wss_address
    assert line == f"live: wss {host}:{port} answers /haproxy-health; 1 of 1 fleets UP (a)"

    # The fleet fails its probes: DOWN after fall, and the host is no longer fit.
    sim.health_status = 503
    await until(lambda: not ingress.balancer.fleets[0].up)
    ok, line = await live(path)
    assert not ok and line == "not live: no fleet UP and READY (a DOWN)"

    sim.health_status = 200
    await until(lambda: ingress.balancer.fleets[0].up)
    ingress.balancer.fleets[0].set_admin(Admin.MAINT)
    ok, line = await live(path)
    assert not ok and line.endswith("(a - MAINT)"), line


async def test_a_stopped_ingress_is_not_live(
    start_ingress: StartIngress, sim: SimulatedFleet, tls_files: TLSFiles, tmp_path: Path
) -> None:
    ingress = await start_ingress([f"{sim.url} name=a"], listen={"stats": "127.0.0.1:0"})
    path = config_for(ingress, tmp_path / "ingress.toml", tls_files)
    assert (await live(path))[0]
    host, port = ingress.wss_address
    stats_port = ingress.stats_address[1]
    await ingress.stop(drain_timeout=0)
    ok, line = await live(path)
    refused = "Connection refused (is fleet-ingress running?)"
    assert not ok
    # Both parts say what they found.
    stats = f"stats 127.0.0.1:{stats_port}"
    assert line == f"not live: wss {host}:{port}: {refused}; {stats}: {refused}"


async def test_a_health_route_that_is_not_served_is_named(
    start_ingress: StartIngress, sim: SimulatedFleet, tls_files: TLSFiles, tmp_path: Path
) -> None:
    ingress = await start_ingress([f"{sim.url} name=a"], listen={"stats": "127.0.0.1:0"})
    path = config_for(ingress, tmp_path / "ingress.toml", tls_files)
    # The running ingress serves /haproxy-health; a config saying otherwise must not pass.
    text = path.read_text().replace("/haproxy-health", "/other-health")
    path.write_text(text)
    ok, line = await live(path)
    host, port = ingress.wss_address
    assert not ok and line.startswith(f"not live: wss {host}:{port}: /other-health answered 404")


async def test_a_listener_that_speaks_no_tls_fails_the_handshake(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        path = write_config(tmp_path / "ingress.toml", tls_files, wss=f"127.0.0.1:{port}")
        ok, line = await live(path)
    finally:
        server.close()
        await server.wait_closed()
    assert not ok and f"wss 127.0.0.1:{port}: TLS handshake failed" in line, line


async def test_a_listener_that_never_answers_fails_within_the_deadline(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never speaks TLS back
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stats = await free_port()
    try:
        wss, stats_at = f"127.0.0.1:{port}", f"127.0.0.1:{stats}"
        path = write_config(tmp_path / "ingress.toml", tls_files, wss=wss, stats=stats_at)
        ok, line = await live(path)
    finally:
        server.close()
        await server.wait_closed()
    assert not ok
    assert f"wss 127.0.0.1:{port}: no answer within 0.8 s" in line, line


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[listen\n", "not valid TOML"),
        ("[listen]\nwss = 'nowhere'\n", "listen.wss 'nowhere' has no port"),
        ("[listen]\nwss = 443\n", "listen.wss: 443 is not a quoted string"),
        ("[listen]\nstats = 'localhost:'\n", "listen.stats 'localhost:' has ':' but no port"),
    ],
)
def test_the_keys_it_needs_are_named_when_unreadable(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "ingress.toml"
    path.write_text(text)
    result = live_check(path)
    assert not result.live and "\n" not in result.line
    assert result.line.startswith(f"not live: {path}: ") and says in result.line, result.line


def test_a_mistake_elsewhere_in_the_file_does_not_fail_a_running_host(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    # Not yet reloaded, it changes nothing in the running ingress; judged by the full
    # check it would take the address off both hosts at once if pushed to both.
    path = write_config(tmp_path / "ingress.toml", tls_files, wss="127.0.0.1:1", stats="")
    path.write_text(path.read_text() + "[fleets]\nmaxconn = 'x'\nno_such_key = 1\n")
    assert live_settings(path).wss == "127.0.0.1:1"


def test_defaults_and_overrides_are_the_ingress_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ingress.toml"
    path.write_text("[listen]\nadmin_socket = 'run/admin.sock'\n")
    config = load_config(path)
    assert live_settings(path) == LiveSettings(
        wss=config.listen.wss,
        stats=config.listen.stats,
        admin_socket=config.listen.admin_socket,
        health=config.routes.health,
    )
    assert live_settings(path).admin_socket == str(tmp_path / "run" / "admin.sock")
    monkeypatch.setenv("FLEET_INGRESS_LISTEN__STATS", "127.0.0.1:9404")
    monkeypatch.setenv("FLEET_INGRESS_ROUTES__HEALTH", "/hc")
    settings = live_settings(path)
    assert (settings.stats, settings.health) == ("127.0.0.1:9404", "/hc")
    assert (settings.stats, settings.health) == (
        load_config(path).listen.stats,
        load_config(path).routes.health,
    )


def test_no_snapshot_source_is_named(tls_files: TLSFiles, tmp_path: Path) -> None:
    path = write_config(tmp_path / "ingress.toml", tls_files, wss="127.0.0.1:1")
    result = live_check(path)
    assert not result.live
    assert "listen.stats and listen.admin_socket are both disabled" in result.line


async def test_the_command_prints_one_line_and_writes_nothing(
    start_ingress: StartIngress, sim: SimulatedFleet, tls_files: TLSFiles, tmp_path: Path
) -> None:
    ingress = await start_ingress([f"{sim.url} name=a"], listen={"stats": "127.0.0.1:0"})
    home = tmp_path / "etc"
    home.mkdir()
    path = config_for(ingress, home / "ingress.toml", tls_files)
    before = sorted(p.name for p in home.iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    proc = await asyncio.create_subprocess_exec(
        *CLI, "check", "-c", str(path), "--live", env=env, stdout=subprocess.PIPE, cwd=home
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    assert out.decode().count("\n") == 1 and out.startswith(b"live: ")
    await ingress.stop(drain_timeout=0)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "check", "-c", str(path), "--live", env=env, stdout=subprocess.PIPE, cwd=home
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 1 and out.startswith(b"not live: ") and out.count(b"\n") == 1
    assert sorted(p.name for p in home.iterdir()) == before


@pytest.mark.parametrize("extra", [["--probe"], ["--body", "x.json"], []])
def test_live_takes_a_config_and_nothing_else(extra: list[str], tmp_path: Path) -> None:
    argv = [*CLI, "check", "--live", *extra]
    if extra:
        argv += ["-c", str(tmp_path / "ingress.toml")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--live asks the running ingress" in done.stderr


async def test_a_listener_that_hangs_up_after_the_handshake_is_named(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.ingress_cert, tls_files.ingress_key)
    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        path = write_config(tmp_path / "ingress.toml", tls_files, wss=f"127.0.0.1:{port}")
        ok, line = await live(path)
    finally:
        server.close()
        await server.wait_closed()
    assert not ok
    assert line.startswith(
        f"not live: wss 127.0.0.1:{port}: closed the connection without an answer"
    )


@pytest.mark.parametrize("moved", ["wss", "stats"])
async def test_a_listener_edited_in_the_file_is_named_while_the_other_answers(
    start_ingress: StartIngress, sim: SimulatedFleet, tls_files: TLSFiles, tmp_path: Path,
    moved: str,
) -> None:  # fmt: skip
    """listen.stats (or wss) edited, not restarted: the check fails from the next
    second, and keepalived moves the address, cutting every call. It said
    `Connection refused (is fleet-ingress running?)` of an ingress whose other
    listener had just answered (the docwalk of session 33)."""
    ingress = await start_ingress([f"{sim.url} name=a"], listen={"stats": "127.0.0.1:0"})
    path = config_for(ingress, tmp_path / "ingress.toml", tls_files)
    host, port = ingress.wss_address
    wss, stats = f"{host}:{port}", f"127.0.0.1:{ingress.stats_address[1]}"
    elsewhere = f"127.0.0.1:{await free_port()}"
    if moved == "wss":
        write_config(path, tls_files, wss=elsewhere, stats=stats)
        other = f"stats {stats}"
    else:
        write_config(path, tls_files, wss=wss, stats=elsewhere)
        other = f"wss {wss}"
    ok, line = await live(path)
    assert not ok
    assert line == (
        f"not live: {moved} {elsewhere}: Connection refused, while {other} answers: the "
        f"ingress runs, and listen.{moved} in the file is not where it listens (an edit "
        "takes a restart)"
    ), line


async def test_a_stopping_ingress_is_said_stopping_not_asked_if_it_runs(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A stop closes the carrier listener at once and serves /stats.json on
    (`"state": "draining"`): the check said `wss ...: Connection refused (is
    fleet-ingress running?)` of an ingress draining its calls."""
    body = b'{"state": "draining", "fleets": [{"name": "a", "health": "UP", "admin": "READY"}]}'

    async def stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(stats, "127.0.0.1", 0)
    stats_port = server.sockets[0].getsockname()[1]
    wss = f"127.0.0.1:{await free_port()}"
    try:
        path = write_config(
            tmp_path / "ingress.toml", tls_files, wss=wss, stats=f"127.0.0.1:{stats_port}"
        )
        ok, line = await live(path)
    finally:
        server.close()
        await server.wait_closed()
    assert not ok
    assert line == (
        f"not live: wss {wss}: Connection refused: the ingress is stopping (draining): it "
        "refuses new calls"
    ), line


def write_leaf(
    tls_files: TLSFiles, home: Path, not_before: datetime.datetime, not_after: datetime.datetime
) -> dict[str, str]:
    """A leaf for 127.0.0.1 with these dates, as a [tls] section naming it."""
    leaf = tls_files.ca.issue_cert(
        "127.0.0.1", "localhost", not_before=not_before, not_after=not_after
    )
    cert, key = home / "leaf.pem", home / "leaf.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    return {"cert": str(cert), "key": str(key)}


def serial_of(tls: dict[str, str]) -> str:
    from cryptography import x509

    return f"{x509.load_pem_x509_certificate(Path(tls['cert']).read_bytes()).serial_number:X}"


async def test_an_expired_certificate_is_not_live(
    start_ingress: StartIngress, sim: SimulatedFleet, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A host serving an expired certificate fails every carrier's handshake (they
    verify it) while its own check passed (it does not verify: loopback is not the
    name on it), so keepalived kept the address there instead of on the peer
    (the pair audit of session 38). It names the certificate and the date."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0, tzinfo=None)
    start, end = now - datetime.timedelta(days=90), now - datetime.timedelta(hours=1)
    said = f"expired {end:%Y-%m-%d %H:%M:%S} UTC"
    tls = write_leaf(tls_files, tmp_path, start, end)
    ingress = await start_ingress([f"{sim.url} name=a"], listen={"stats": "127.0.0.1:0"}, tls=tls)
    path = config_for(ingress, tmp_path / "ingress.toml", tls_files)
    # What a carrier meets there: its handshake fails.
    host, port = ingress.wss_address
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(host, port, ssl=tls_files.client_context())
    ok, line = await live(path)
    assert not ok
    assert line == (
        f"not live: wss {host}:{port}: serves a certificate that {said} "
        f"(serial {serial_of(tls)}), which every carrier refuses: renew it and reload "
        "(docs/INSTALL.md section 6)"
    ), line


@pytest.mark.parametrize("dates", ["expires in an hour", "starts tomorrow"])
async def test_a_certificate_that_still_serves_carriers_keeps_the_host_live(
    start_ingress: StartIngress, sim: SimulatedFleet, tls_files: TLSFiles, tmp_path: Path,
    dates: str,
) -> None:  # fmt: skip
    """Moving the address cuts every call on this host; a certificate that still
    serves every carrier is the expiry alert's business, not a reason to. One that
    starts after this host's clock says is as likely this clock behind (NTP not
    synced yet): carriers with a right clock take it, so it is `stat`'s business
    (review38a: the host gave up the address for it)."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    if dates == "expires in an hour":
        start, end = now - datetime.timedelta(days=89), now + datetime.timedelta(hours=1)
    else:
        start, end = now + datetime.timedelta(days=1), now + datetime.timedelta(days=90)
    tls = write_leaf(tls_files, tmp_path, start, end)
    ingress = await start_ingress([f"{sim.url} name=a"], listen={"stats": "127.0.0.1:0"}, tls=tls)
    path = config_for(ingress, tmp_path / "ingress.toml", tls_files)
    ok, line = await live(path)
    assert ok, line


# Imported by keepalived's track script each second (`fleet-ingress check -c
# CONFIG --live`): each of these cost it CPU time on both hosts of a pair
# (asyncio and h11 a sixth of it, the CLI's parser and its imports a third).
HEAVY = ("asyncio", "h11", "argparse", "pydantic", "cryptography", "pathlib", "fleet_ingress.cli")


async def test_the_console_script_checks_live_without_the_heavy_imports(
    start_ingress: StartIngress, sim: SimulatedFleet, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """The entry point `pip` writes as bin/fleet-ingress, run as keepalived runs it:
    the same line as the CLI, on far fewer imports (the pair audit of session 38:
    0.13 to 0.16 s of CPU a run before, about 0.05 s after)."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "fleet-ingress"]
    module, _, function = script.value.partition(":")
    ingress = await start_ingress([f"{sim.url} name=a"], listen={"stats": "127.0.0.1:0"})
    path = config_for(ingress, tmp_path / "ingress.toml", tls_files)
    code = (
        "import sys, json\n"
        f"sys.argv = ['fleet-ingress', 'check', '-c', {str(path)!r}, '--live']\n"
        f"from {module} import {function} as main\n"
        "code = main()\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stdout=subprocess.PIPE, cwd=tmp_path
    )
    out, _ = await proc.communicate()
    line, answer = out.decode().splitlines()
    code, modules = json.loads(answer)
    host, port = ingress.wss_address
    assert (code, line) == (
        0,
        f"live: wss {host}:{port} answers /haproxy-health; 1 of 1 fleets UP (a)",
    )
    assert [m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY] == []


@pytest.mark.parametrize(
    ("words", "config"),
    [
        (["check", "-c", "/etc/i.toml", "--live"], "/etc/i.toml"),  # as init writes it
        (["check", "--live", "--config", "i.toml"], "i.toml"),
        (["check", "--config=i.toml", "--live"], "i.toml"),
        # Everything else is the CLI's to answer (or refuse).
        (["check", "-c", "i.toml"], None),
        (["check", "--live"], None),
        (["check", "-c", "i.toml", "--live", "--probe"], None),
        (["check", "-c", "i.toml", "--live", "--live"], None),
        (["check", "-c", "--live"], None),
        (["check", "-c", "a", "-c", "b", "--live"], None),
        (["check", "--live", "-c"], None),
        (["check", "-ci.toml", "--live"], None),
        (["stat", "-c", "i.toml", "--live"], None),
        (["check", "-c", "i.toml", "--live", "-h"], None),
        ([], None),
    ],
)
def test_the_console_script_takes_only_the_live_check_s_words(
    words: list[str], config: str | None
) -> None:
    assert live_config(words) == config


SNAPSHOT = b'{"state": "serving", "fleets": [{"name": "a", "health": "UP", "admin": "READY"}]}'


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        # What a server may send for the same snapshot: the check reads each whole.
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(SNAPSHOT), SNAPSHOT), None),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10;x=y\r\n%s\r\n%x\r\n%s\r\n0\r\nTrailer: t\r\n\r\n"
            % (SNAPSHOT[:16], len(SNAPSHOT) - 16, SNAPSHOT[16:]),
            None,
        ),
        (b"HTTP/1.0 200 OK\r\n\r\n%s" % SNAPSHOT, None),  # to the end of the connection
        (b"HTTP/1.1 200\r\ncontent-length:  %d \r\n\r\n%s" % (len(SNAPSHOT), SNAPSHOT), None),
        # And what it may not.
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP answer: status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "not an HTTP answer: header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{}", "closed 498 bytes early"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}", "Content-Length b'x'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size b'zz'"),
        (b"HTTP/1.1 200 OK\r\nContent", "closed in the head"),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "/stats.json answered 503"),
        (b"HTTP/1.1 200 OK\r\n\r\n[1]", "/stats.json is not a JSON object"),
        (b"", "closed the connection without an answer"),
        # Past MAX_ANSWER_BYTES: which listener said too much is named, as for the
        # others (it read "not live: answer larger than 4194304 bytes", no more).
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n" + b" " * 5_000_000,
            "answer larger than 4194304 bytes",
        ),
    ],
)
async def test_the_snapshot_answer_is_read_as_http_1_1(
    tls_files: TLSFiles, tmp_path: Path, answer: bytes, says: str | None
) -> None:
    """The check's own HTTP/1.1 client (h11 is not imported: the pair audit of
    session 38) reads what a server may send and names what it cannot read."""

    async def stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        with contextlib.suppress(ConnectionError):  # the check stops reading past its bound
            await writer.drain()
        writer.close()

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tls_files.ingress_cert, tls_files.ingress_key)

    async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    servers = [
        await asyncio.start_server(stats, "127.0.0.1", 0),
        await asyncio.start_server(health, "127.0.0.1", 0, ssl=tls),
    ]
    stats_port, wss_port = (s.sockets[0].getsockname()[1] for s in servers)
    try:
        path = write_config(
            tmp_path / "ingress.toml",
            tls_files,
            wss=f"127.0.0.1:{wss_port}",
            stats=f"127.0.0.1:{stats_port}",
        )
        ok, line = await live(path)
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    if says is None:
        assert ok and line.endswith("1 of 1 fleets UP (a)"), line
    else:
        assert not ok and says in line, line
        assert line.startswith(f"not live: stats 127.0.0.1:{stats_port}"), line
