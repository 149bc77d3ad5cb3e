"""Addresses as an operator writes them: a listener's (SPEC 12) on a link-local
IPv6 address with its zone or by host name, resolved as `run` resolves them,
and a fleet's on a link-local address with its zone (SPEC 7).

Each test makes a network namespace and runs the real `python -m fleet_ingress`
(`check`, then `run`) inside it. A host name is given its addresses by a hosts
file of the namespace's own (`ip netns exec` mounts /etc/netns/NAME/hosts over
/etc/hosts), with a resolv.conf naming a resolver on its loopback that is not
there: nothing is looked up outside the namespace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from fleet_ingress.sim import SimulatedFleet
from tests.support import NetLab, TLSFiles

# Each test runs its own `fleet-ingress run` (or `check`) in a namespace and waits on its start.
pytestmark = [pytest.mark.uvloop_only, pytest.mark.timeout(60)]

ENV = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}


@pytest.fixture
def hosts_of(netlab: NetLab) -> Iterator[object]:
    """hosts_of(ns, text): the hosts file `ip netns exec ns` processes read."""
    made: list[Path] = []

    def write(ns: str, text: str) -> None:
        folder = Path("/etc/netns") / ns
        folder.mkdir(parents=True)
        made.append(folder)
        (folder / "hosts").write_text(f"127.0.0.1 localhost\n{text}")
        (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    yield write
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path("/etc/netns").rmdir()  # only when no one else's is left in it


def _config(
    tmp_path: Path,
    tls_files: TLSFiles,
    wss: str,
    acme: str,
    stats: str,
    fleet: str = "https://127.0.0.1:9 name=unused",
) -> Path:
    (tmp_path / "fleets.txt").write_text(f"{fleet}\n")
    config = tmp_path / "ingress.toml"
    config.write_text(
        f'[listen]\nwss = "{wss}"\nacme = "{acme}"\nstats = "{stats}"\nadmin_socket = ""\n'
        f'[tls]\ncert = "{tls_files.ingress_cert}"\nkey = "{tls_files.ingress_key}"\n'
        f'ca_file = "{tls_files.ca_pem}"\n'
        f'[fleets]\nfile = "fleets.txt"\nca_file = "{tls_files.ca_pem}"\n'
    )
    return config


def _check(
    netlab: NetLab, ns: str, config: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    argv = netlab.exec_argv(
        ns, sys.executable, "-m", "fleet_ingress", "check", "-c", str(config), *options
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=ENV)


async def _connect(netlab: NetLab, ns: str, address: str, port: int) -> socket.socket:
    """A TCP connection from inside `ns` to an IP address, a zone taken there."""
    where: list[tuple[object, ...]] = []

    def make() -> socket.socket:
        ((family, kind, proto, _, sockaddr),) = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
        where.append(sockaddr)
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        return sock

    sock = netlab.socket_in(ns, make)
    try:
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_connect(sock, where[0])
    except BaseException:
        sock.close()
        raise
    return sock


async def _get(netlab: NetLab, ns: str, address: str, port: int, path: str) -> bytes:
    sock = await _connect(netlab, ns, address, port)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: calls.test\r\n\r\n".encode())
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()


class _Run:
    """`fleet-ingress run` inside a namespace; its log kept."""

    def __init__(self, netlab: NetLab, ns: str, config: Path) -> None:
        self.argv = netlab.exec_argv(
            ns, sys.executable, "-m", "fleet_ingress", "run", "-c", str(config)
        )
        self.log: list[bytes] = []

    async def __aenter__(self) -> _Run:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=ENV,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line)

    @property
    def text(self) -> str:
        return b"".join(self.log).decode()

    async def until_answered(self, get: object) -> bytes:
        async with asyncio.timeout(40):  # a start takes 1-3 s; far more on a loaded host
            while True:
                assert self.proc.returncode is None, self.text
                with contextlib.suppress(OSError):
                    return await get()  # type: ignore[operator]
                await asyncio.sleep(0.1)

    async def exited(self) -> int:
        async with asyncio.timeout(20):
            status = await self.proc.wait()
        await self._reader
        return status

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        print(self.text)  # the ingress's log, shown if the test failed


async def _handshake(netlab: NetLab, ns: str, tls_files: TLSFiles, address: str, port: int) -> str:
    """The TLS version a carrier gets from the wss listener at `address`."""
    sock = await _connect(netlab, ns, address, port)
    async with asyncio.timeout(5):
        _, writer = await asyncio.open_connection(
            sock=sock, ssl=tls_files.client_context(), server_hostname="calls.test"
        )
    ssl_object = writer.get_extra_info("ssl_object")
    assert isinstance(ssl_object, ssl.SSLObject)
    version = ssl_object.version()
    writer.close()
    return str(version)


async def test_listeners_on_a_link_local_address_with_its_zone_serve(
    netlab: NetLab, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """`check` said OK and `run` exited "cannot listen: Invalid argument": the
    bind dropped the scope id getaddrinfo gave for fe80::10%ve0 (the audit of
    a real run)."""
    ns = netlab.namespace("zone")
    netlab.ip("-n", ns, "link", "add", "ve0", "type", "veth", "peer", "name", "ve1")
    netlab.ip("-n", ns, "link", "set", "ve1", "up")
    netlab.ip("-n", ns, "link", "set", "ve0", "up")
    netlab.ip("-n", ns, "addr", "add", "fe80::10/64", "dev", "ve0", "nodad")
    at = "[fe80::10%ve0]"
    config = _config(tmp_path, tls_files, f"{at}:8443", f"{at}:8080", f"{at}:8404")
    checked = _check(netlab, ns, config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    async with _Run(netlab, ns, config) as run:
        stats = await run.until_answered(
            lambda: _get(netlab, ns, "fe80::10%ve0", 8404, "/stats.json")
        )
        assert stats.startswith(b"HTTP/1.0 200 ")
        acme = await _get(netlab, ns, "fe80::10%ve0", 8080, "/ws/bot")
        assert acme.startswith(b"HTTP/1.1 301 ")
        assert b"Location: https://calls.test/ws/bot\r\n" in acme
        assert await _handshake(netlab, ns, tls_files, "fe80::10%ve0", 8443) == "TLSv1.3"


async def test_a_host_name_with_only_an_ipv6_address_is_listened_on(
    netlab: NetLab, hosts_of, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """It was looked up as IPv4 only, and `run` exited with "Temporary failure
    in name resolution" (the audit of a real run)."""
    ns = netlab.namespace("v6name")
    netlab.ip("-n", ns, "addr", "add", "fd00::5/128", "dev", "lo", "nodad")
    hosts_of(ns, "fd00::5 v6only.test\n")
    config = _config(tmp_path, tls_files, "v6only.test:8443", "", "127.0.0.1:8404")
    checked = _check(netlab, ns, config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    async with _Run(netlab, ns, config) as run:
        await run.until_answered(lambda: _get(netlab, ns, "127.0.0.1", 8404, "/stats.json"))
        assert await _handshake(netlab, ns, tls_files, "fd00::5", 8443) == "TLSv1.3"


async def test_a_host_name_with_two_addresses_is_listened_on_at_one_with_a_warning(
    netlab: NetLab, hosts_of, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Before, `run` bound its IPv4 address alone (the IPv6 one silently not
    served) and `check` said OK. It still binds that one (a configuration with
    `localhost`, 127.0.0.1 and ::1 on Debian, must go on starting); both say so."""
    ns = netlab.namespace("twoaddr")
    netlab.ip("-n", ns, "addr", "add", "127.0.0.5/8", "dev", "lo")
    netlab.ip("-n", ns, "addr", "add", "fd00::5/128", "dev", "lo", "nodad")
    hosts_of(ns, "fd00::5 calls.test\n127.0.0.5 calls.test\n")
    config = _config(tmp_path, tls_files, "calls.test:8443", "", "127.0.0.1:8404")
    checked = _check(netlab, ns, config)
    assert checked.returncode == 0, checked.stdout
    assert (
        f"warning: {config} line 2: listen.wss = 'calls.test:8443': calls.test has several "
        "addresses: listening on 127.0.0.5:8443 only, not on [fd00::5]; give [::]:8443 for "
        "both families on one socket, or one address\n"
    ) in checked.stdout
    async with _Run(netlab, ns, config) as run:
        await run.until_answered(lambda: _get(netlab, ns, "127.0.0.1", 8404, "/stats.json"))
        assert await _handshake(netlab, ns, tls_files, "127.0.0.5", 8443) == "TLSv1.3"
        assert "a listener's host name has several addresses: listening on one" in run.text


async def test_a_zone_no_interface_has_is_named_by_check_and_by_run(
    netlab: NetLab, tls_files: TLSFiles, tmp_path: Path
) -> None:
    ns = netlab.namespace("nozone")
    config = _config(tmp_path, tls_files, "127.0.0.1:8443", "", "[fe80::10%ve9]:8404")
    problem = (
        "listen.stats = '[fe80::10%ve9]:8404': no interface of this machine is named 've9'; "
        "give the zone of the interface with that address (`ip -6 addr`)"
    )
    checked = _check(netlab, ns, config)
    assert checked.returncode == 1
    assert f"{config} line 4: {problem}\n" in checked.stdout
    async with _Run(netlab, ns, config) as run:
        assert await run.exited() == 1
        assert f"fleet-ingress: cannot start: {problem}\n" in run.text


async def test_check_live_answers_for_a_wss_listener_on_a_link_local_address(
    netlab: NetLab, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """keepalived's track script said 'not an address of this host now, so
    another host would answer' for listen.wss = "[fe80::10%ve0]:8443": the
    address was looked for with its zone among this host's, listed without."""
    ns = netlab.namespace("livezone")
    netlab.ip("-n", ns, "link", "add", "ve0", "type", "veth", "peer", "name", "ve1")
    netlab.ip("-n", ns, "link", "set", "ve1", "up")
    netlab.ip("-n", ns, "link", "set", "ve0", "up")
    netlab.ip("-n", ns, "addr", "add", "fe80::10/64", "dev", "ve0", "nodad")
    async with _fleet_at_9443(netlab, ns, tls_files):
        config = _config(
            tmp_path,
            tls_files,
            "[fe80::10%ve0]:8443",
            "",
            "127.0.0.1:8404",
            fleet="https://127.0.0.1:9443",
        )
        async with _Run(netlab, ns, config) as run:
            live = await _live_once_fleet_up(
                run, netlab, ns, tls_files, config, "fe80::10%ve0", "not an address of this host"
            )
        assert live.returncode == 0, live.stdout + live.stderr
        assert live.stdout.startswith("live: wss [fe80::10%ve0]:8443 answers /haproxy-health")


async def test_check_live_answers_for_the_ipv6_wildcard_on_a_host_without_ipv6_loopback(
    netlab: NetLab, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """listen.wss = "[::]:8443" on a host whose lo has disable_ipv6=1: the
    listener takes IPv4 carriers, and keepalived's track script must say so.
    Before (the IPv6 audit of session 33): `check --live` connected to ::1
    only, said 'not live: wss [::1]:8443: Cannot assign requested address',
    and keepalived would have moved the shared address off a serving host
    (off both, configured alike)."""
    ns = netlab.namespace("nov6lo")
    off = netlab.exec_argv(ns, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1")
    await asyncio.to_thread(subprocess.run, off, check=True, timeout=10)
    async with _fleet_at_9443(netlab, ns, tls_files):
        config = _config(
            tmp_path, tls_files, "[::]:8443", "", "127.0.0.1:8404", fleet="https://127.0.0.1:9443"
        )
        async with _Run(netlab, ns, config) as run:
            live = await _live_once_fleet_up(
                run, netlab, ns, tls_files, config, "127.0.0.1", "Cannot assign"
            )
        assert live.returncode == 0, live.stdout + live.stderr
        assert live.stdout.startswith("live: wss 127.0.0.1:8443 answers /haproxy-health")


async def test_a_fleet_named_by_its_zone_is_probed_and_serves_calls(
    netlab: NetLab, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A fleet at [fe80::1%lo], written `https://[fe80::1%25lo]:9443` (RFC
    6874's form). Before: its certificate was checked for 'fe80::1%lo' (it
    never came UP), uvloop's lookup dropped the zone (every call EINVAL), and
    the Host header carried it (RFC 6874 section 4: left out)."""
    ns = netlab.namespace("zonedfleet")
    netlab.ip("-n", ns, "addr", "add", "fe80::1/64", "dev", "lo", "nodad")

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("fe80::1", 9443, 0, socket.if_nametoindex("lo")))
        sock.listen(16)
        sock.setblocking(False)
        return sock

    fleet_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_files.ca.issue_cert("fe80::1").configure_cert(fleet_ctx)
    sock = netlab.socket_in(ns, listen)
    fleet = SimulatedFleet(name="linklocal", ssl_context=fleet_ctx, sock=sock)
    await fleet.start()
    config = _config(
        tmp_path, tls_files, "127.0.0.1:8443", "", "127.0.0.1:8404", "https://[fe80::1%25lo]:9443"
    )
    try:
        async with _Run(netlab, ns, config) as run:

            async def fleet_up() -> bytes:
                body = (await _get(netlab, ns, "127.0.0.1", 8404, "/stats.json")).partition(
                    b"\r\n\r\n"
                )[2]
                (row,) = json.loads(body)["fleets"]
                if row["health"] != "UP":
                    raise OSError(f"not UP yet: {row['last_check']}")
                assert row["name"] == "[fe80::1%lo]:9443"  # the zone is part of its name
                return body

            await run.until_answered(fleet_up)
            sock = await netlab.connect(ns, "127.0.0.1", 8443)
            async with connect(
                "wss://calls.test/ws/bot-1",
                sock=sock,
                ssl=tls_files.client_context(),
                server_hostname="calls.test",
                open_timeout=5,
                close_timeout=1,
            ) as ws:
                await ws.send(b"frame")
                async with asyncio.timeout(5):
                    assert await ws.recv() == b"frame"
            (seen,) = fleet.requests
            assert seen.headers.getall("Host") == ["[fe80::1]:9443"]
    finally:
        async with asyncio.timeout(3):
            await fleet.stop()


async def test_remove_fleet_s_add_again_adds_a_zoned_fleet_again(
    netlab: NetLab, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """remove-fleet prints the add-fleet command that adds the fleet again. For a
    fleet at [fe80::1%lo] named by its URL, it gave --name '[fe80::1%lo]:9443':
    a name add-fleet refuses ('%' is no name's), so the pasted command failed.
    The fleet's own name is left out, as the fleets file leaves it out."""
    import shlex

    ns = netlab.namespace("again")
    netlab.ip("-n", ns, "addr", "add", "fe80::1/64", "dev", "lo", "nodad")

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("fe80::1", 9443, 0, socket.if_nametoindex("lo")))
        sock.listen(16)
        sock.setblocking(False)
        return sock

    fleet_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_files.ca.issue_cert("fe80::1").configure_cert(fleet_ctx)
    fleet = SimulatedFleet(
        name="linklocal", ssl_context=fleet_ctx, sock=netlab.socket_in(ns, listen)
    )
    await fleet.start()
    admin = tmp_path / "admin.sock"
    config = _config(
        tmp_path, tls_files, "127.0.0.1:8443", "", "127.0.0.1:8404", "https://[fe80::1%25lo]:9443"
    )
    config.write_text(config.read_text().replace('admin_socket = ""', f'admin_socket = "{admin}"'))
    with (tmp_path / "fleets.txt").open("a") as fleets:
        fleets.write("https://127.0.0.1:9 name=other\n")  # not the last fleet removed

    async def admin_command(*argv: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fleet_ingress", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env=ENV,
        )

    try:
        async with _Run(netlab, ns, config) as run:
            await run.until_answered(lambda: _get(netlab, ns, "127.0.0.1", 8404, "/stats.json"))
            removed = await admin_command(
                "remove-fleet", "[fe80::1%lo]:9443", "--force", "--admin-socket", str(admin)
            )
            assert removed.returncode == 0, removed.stdout + removed.stderr
            (again,) = [
                line.removeprefix("to add it again: ")
                for line in removed.stdout.splitlines()
                if line.startswith("to add it again: ")
            ]
            program, command, *words = shlex.split(again)
            assert (program, command) == ("fleet-ingress", "add-fleet")
            added = await admin_command(command, *words)
            assert added.returncode == 0, added.stdout + added.stderr
            assert "[fe80::1%lo]:9443" in added.stdout, added.stdout
            assert again == (
                f"fleet-ingress add-fleet 'https://[fe80::1%25lo]:9443' --admin-socket {admin}"
            ), again
            assert (tmp_path / "fleets.txt").read_text().splitlines()[-1] == (
                "https://[fe80::1%25lo]:9443"
            )
    finally:
        async with asyncio.timeout(3):
            await fleet.stop()


async def _live_once_fleet_up(
    run: _Run, netlab: NetLab, ns: str, tls_files: TLSFiles, config: Path, host: str, never: str
) -> subprocess.CompletedProcess[str]:
    """`check --live` in `ns` once the stats listener (127.0.0.1:8404) shows the
    fleet UP and each worker has made its first handshake to `host`:8443 (outside
    the check's 0.8 s); tried up to 3 times (the host is shared: a slow answer is
    not what is tested), `never` never in what it says."""

    async def fleet_up() -> bytes:
        stats = await _get(netlab, ns, "127.0.0.1", 8404, "/stats.json")
        if b'"health": "UP"' not in stats:
            raise ConnectionError("no fleet UP yet")
        return stats

    await run.until_answered(fleet_up)
    for _ in range(4):
        await _handshake(netlab, ns, tls_files, host, 8443)
    for _ in range(3):
        live = await asyncio.to_thread(_check, netlab, ns, config, "--live")
        assert never not in live.stdout, live.stdout
        if live.returncode == 0:
            break
    return live


@contextlib.asynccontextmanager
async def _fleet_at_9443(netlab: NetLab, ns: str, tls_files: TLSFiles) -> AsyncIterator[None]:
    """A fleet on 127.0.0.1:9443 in `ns`, for as long as the block runs."""
    fleet = SimulatedFleet(
        name="fleet",
        ssl_context=tls_files.fleet_server_context(),
        sock=netlab.listen(ns, "127.0.0.1", 9443),
    )
    await fleet.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await fleet.stop()
