"""The command line as an operator runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from fleet_ingress.sim import SimulatedFleet
from tests.support import TLSFiles, eventually, free_port

CLI = [sys.executable, "-m", "fleet_ingress"]


def test_demo_exits_0_and_reports_calls_per_fleet():
    done = subprocess.run(
        [*CLI, "demo", "--calls", "4", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo: OK" in done.stdout
    assert "fleet-a          2 ok" in done.stdout and "fleet-b          2 ok" in done.stdout
    assert " 0 lost" in done.stdout


def test_demo_with_more_calls_than_its_fleets_hold_runs_them_in_turn_and_passes():
    """Before: the calls past the two demo fleets' 32 queued for timeouts.queue
    (3 s), got 503, as the ingress must, and the demo said FAILED (exit 1) of
    an ingress working as specified (the CLI audit of session 32)."""
    done = subprocess.run(
        [*CLI, "demo", "--calls", "36", "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "at most 32 at once (what the 2 demo fleets hold, 16 each)" in done.stdout
    assert "calls ok/failed:   36/0" in done.stdout and "demo: OK" in done.stdout


def _write_config(tmp_path: Path, tls_files: TLSFiles, wss_port: int, fleets: str) -> Path:
    (tmp_path / "fleets.txt").write_text(fleets)
    config = tmp_path / "ingress.toml"
    config.write_text(
        f"""
[listen]
wss = "127.0.0.1:{wss_port}"
acme = ""
stats = ""
admin_socket = ""

[tls]
cert = "{tls_files.ingress_cert}"
key = "{tls_files.ingress_key}"
ca_file = "{tls_files.ca_pem}"

[fleets]
ca_file = "{tls_files.ca_pem}"
"""
    )
    return config


def test_check_exits_nonzero_naming_the_problem(tmp_path: Path, tls_files: TLSFiles):
    config = _write_config(tmp_path, tls_files, 8443, "ftp://fleet1.example.com\n")
    done = subprocess.run([*CLI, "check", "-c", str(config)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "line 1" in done.stdout + done.stderr and "ftp://" in done.stdout + done.stderr
    (tmp_path / "fleets.txt").write_text("https://127.0.0.1:9 name=a\n")
    done = subprocess.run([*CLI, "check", "-c", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, tls_files: TLSFiles):
    """`fleet-ingress check ... | head -1`: the reader goes before the writer
    writes. No traceback, as with any shell tool."""
    config = _write_config(tmp_path, tls_files, 8443, "https://fleet1.example.com\n")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run(
            [*CLI, "check", "-c", str(config)], stdout=stdout, stderr=subprocess.PIPE, text=True
        )
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 0


@pytest.mark.uvloop_only  # the ingress and the CLI run in processes of their own
async def test_run_serves_calls_and_exits_0_on_sigterm(tmp_path: Path, tls_files: TLSFiles):
    async with SimulatedFleet(name="a", ssl_context=tls_files.fleet_server_context()) as fleet:
        port = await free_port()
        config = _write_config(tmp_path, tls_files, port, f"{fleet.url} name=a\n")
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "run",
            "-c",
            str(config),
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "FLEET_INGRESS_LOG__FORMAT": "json"},
        )
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        ws = await connect(
                            f"wss://127.0.0.1:{port}/ws/bot", ssl=tls_files.client_context()
                        )
                        break
                    except OSError:
                        await asyncio.sleep(0.1)
            await ws.send("through the real process")
            assert await ws.recv() == "through the real process"
            await ws.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert b'"event": "listening"' in stderr


def test_run_names_the_listener_whose_port_is_taken_and_how_to_find_who_has_it(
    tmp_path: Path, tls_files: TLSFiles
):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = _write_config(tmp_path, tls_files, port, "https://127.0.0.1:9 name=a\n")
        done = subprocess.run(
            [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=30
        )
    assert done.returncode == 1
    assert (
        f"cannot start: listen.wss = '127.0.0.1:{port}': cannot listen: Address already in use;"
        in done.stderr
    )
    assert f"ss -ltnp 'sport = :{port}'" in done.stderr


def test_run_warns_at_start_when_fleet_certificates_are_not_checked(
    tmp_path: Path, tls_files: TLSFiles
):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:  # fails right after the warning
        port = taken.getsockname()[1]
        config = _write_config(tmp_path, tls_files, port, "https://127.0.0.1:9 name=a\n")
        config.write_text(config.read_text() + "verify = false\n")
        done = subprocess.run(
            [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=30
        )
    assert "fleets.verify = false: fleet certificates are not checked" in done.stderr


def test_run_warns_at_start_when_no_fleet_is_listed(tmp_path: Path, tls_files: TLSFiles):
    """check and reload refuse an empty fleets file; run starts (its :80 serves
    certbot), and said nothing but "0/0 fleets up" at info (the CLI audit)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:  # fails right after the warning
        config = _write_config(tmp_path, tls_files, taken.getsockname()[1], "# none yet\n")
        done = subprocess.run(
            [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=30
        )
    assert "no fleets listed: every call gets 503 until `fleet-ingress add-fleet" in done.stderr


def test_a_listen_host_name_that_does_not_resolve_says_so():
    import socket

    import pytest

    from fleet_ingress.net.listener import ListenError, bind_errors_named

    with pytest.raises(ListenError) as info, bind_errors_named("wss", "calls.invalid:8443"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert str(info.value) == (
        "listen.wss = 'calls.invalid:8443': Name or service not known; "
        "use an address or a host name this machine resolves"
    )


@pytest.mark.parametrize(
    ("key", "address", "host", "said"),
    [
        # 192.0.2.1 (TEST-NET-1) is on no interface here.
        (
            "stats",
            "192.0.2.1:8404",
            "192.0.2.1",
            "listen.stats = '192.0.2.1:8404': cannot listen: Cannot assign requested address; "
            "no interface of this machine has that address (`ip addr` lists them): give one "
            "it has, or 0.0.0.0 / [::] for all; a shared (keepalived) address this host may "
            "not hold needs sysctl net.ipv4.ip_nonlocal_bind=1 (net.ipv6.ip_nonlocal_bind for "
            "IPv6)",
        ),
        # A numeric zone resolves whatever it is: the bind is what fails. `run` said
        # only "cannot listen: No such device" (check named it; session 19).
        (
            "wss",
            "[fe80::10%4242]:8443",
            "fe80::10%4242",
            "listen.wss = '[fe80::10%4242]:8443': cannot listen: No such device; no interface "
            "of this machine has index 4242; give the zone of the interface with that address "
            "(`ip -6 addr`)",
        ),
    ],
    ids=["address", "numeric-zone"],
)
def test_a_listen_address_no_interface_has_says_so(
    key: str, address: str, host: str, said: str
) -> None:
    from fleet_ingress.net.listener import ListenError, bind_errors_named, bind_tcp

    # The bind fails: nothing is sent.
    with pytest.raises(ListenError) as info, bind_errors_named(key, address):
        bind_tcp(host, 0)
    assert str(info.value) == said


# -- `reload`: the unit's ExecReload -------------------------------------------------------


def test_reload_with_no_admin_socket_under_systemd_sends_sighup_to_the_main_pid(
    tmp_path: Path,
) -> None:
    """With listen.admin_socket = "" the shipped ExecReload would always fail, and
    certbot's renewals would never load (the review of session 12): under systemd
    ($MAINPID) it signals the service as the unit did before; elsewhere it says why."""
    config = tmp_path / "ingress.toml"
    config.write_text('[listen]\nadmin_socket = ""\n')
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGHUP, lambda *a: (print('HUP', flush=True), sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(20)\n",
            "fleet-ingress",  # in its command line, as the unit's main process has it
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        env = {**os.environ, "MAINPID": str(child.pid)}
        done = subprocess.run(
            [*CLI, "reload", "-c", str(config)], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert f"sent SIGHUP to {child.pid}" in done.stderr
        assert child.wait(10) == 0 and child.stdout.read() == "HUP\n"
    finally:
        child.kill()
    env = {k: v for k, v in os.environ.items() if k != "MAINPID"}
    done = subprocess.run(
        [*CLI, "reload", "-c", str(config)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "listen.admin_socket is disabled" in done.stderr
    # A $MAINPID that is no ingress (another unit's process) is never signalled.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
    try:
        done = subprocess.run(
            [*CLI, "reload", "-c", str(config)],
            env={**env, "MAINPID": str(other.pid)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2 and other.poll() is None
    finally:
        other.kill()


async def test_reload_exits_1_when_a_worker_did_not_reload_or_it_failed(tmp_path: Path) -> None:
    """What the supervisor answers is judged whole: applied in the supervisor but
    refused by a worker (it serves its previous certificate) is no success for
    certbot's hook; nor is a reload that broke halfway."""
    from aiohttp import web

    from fleet_ingress.ops.admin_client import run_reload

    answers = iter(
        [
            {"result": "applied", "changes": "no fleet changes", "workers_failed": {"42": "no"}},
            {"result": "failed", "error": "the reload failed: a bug"},
            {"result": "applied", "changes": "no fleet changes"},
        ]
    )

    async def reload(_: web.Request) -> web.Response:
        return web.json_response(next(answers))

    app = web.Application()
    app.router.add_post("/reload", reload)  # a bare function: deprecated by aiohttp
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "admin.sock"
    await web.UnixSite(runner, str(path)).start()
    try:
        codes = [await asyncio.to_thread(run_reload, path) for _ in range(3)]
    finally:
        await runner.cleanup()
    assert codes == [1, 1, 0]


async def test_reload_asks_another_way_only_when_nothing_was_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SIGHUP fallback is for a socket nothing listens on; a request that
    reached the ingress and lost its answer is never asked again (a second
    reload), its outcome left to `stat` (exit 2). An upgrade's exec cuts a
    reload still waiting (WEB_QUIESCE): it is said that the new image runs it,
    not "run the command again if it was not", `stat` showing no reload yet."""
    from fleet_ingress.ops.admin_client import run_reload

    asked: list[str] = []

    def fallback() -> int:
        asked.append("sighup")
        return 0

    absent = tmp_path / "absent.sock"
    assert await asyncio.to_thread(run_reload, absent, not_reached=fallback) == 0
    assert asked == ["sighup"]

    async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readuntil(b"\r\n\r\n")  # the request arrived
        writer.close()

    path = tmp_path / "admin.sock"
    server = await asyncio.start_unix_server(read_then_hang_up, str(path))
    try:
        capsys.readouterr()
        assert await asyncio.to_thread(run_reload, path, not_reached=fallback) == 2
    finally:
        server.close()
    assert asked == ["sighup"]  # not asked a second time
    said = capsys.readouterr().err
    assert "an upgrade re-executed it (a reload asked before the exec is run by the new " in said
    assert "run the command again" not in said, said


def test_the_ipv6_wildcard_however_written_takes_ipv4_carriers_too():
    import socket

    import pytest

    from fleet_ingress.core.addresses import parse_hostport
    from fleet_ingress.net.listener import bind_tcp

    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 here")
    for written in ("[::]:0", "[::0]:0", "[0:0:0:0:0:0:0:0]:0"):
        listener = bind_tcp(*parse_hostport(written, what="listen.wss"))
        try:
            port = listener.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # accepted into the backlog: the IPv4 carrier got in
        finally:
            listener.close()


def test_an_operator_outside_the_group_is_told_so_not_shown_a_traceback(
    tmp_path: Path, tls_files: TLSFiles
):
    """The config's directory is 2770 and the admin socket 0660 (the group's):
    `stat`/`check`/`reload -c` by a user outside it printed a Python traceback
    ending in PermissionError, `stat --admin-socket` asked whether the ingress
    was running (the troubleshooting audit of session 16). Root without its
    permission-check capabilities stands in for that user."""
    import shutil
    import socket

    assert shutil.which("setpriv"), "setpriv (util-linux) is needed"

    home = tmp_path / "etc"
    home.mkdir()
    config = _write_config(home, tls_files, 8443, "https://fleet1.example.com\n")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(home / "admin.sock"))
    listening.listen()
    os.chown(home, 65534, 65534)
    home.chmod(0o700)
    as_outsider = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *CLI]
    try:
        for args in (["check", "-c", str(config)], ["stat", "-c", str(config)]):
            done = subprocess.run([*as_outsider, *args], capture_output=True, text=True, timeout=30)
            printed = done.stdout + done.stderr
            assert done.returncode != 0 and "Traceback" not in printed, printed
            assert f"{config}: cannot read the configuration file: permission denied" in printed
            assert "usermod -aG fleet-ingress" in printed
        done = subprocess.run(
            [*as_outsider, "stat", "--admin-socket", str(home / "admin.sock")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode != 0 and "Permission denied" in done.stderr, done.stderr
        assert "member of the socket's group" in done.stderr, done.stderr
        assert "Is fleet-ingress running" not in done.stderr
    finally:
        listening.close()
        home.chmod(0o755)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["drain", "", "--admin-socket", "/nonexistent"], "a fleet's name cannot be empty"),
        (["remove-fleet", "", "--admin-socket", "/nonexistent"], "a fleet's name cannot be empty"),
        (
            ["add-fleet", "https://a.test", "--name", "", "--admin-socket", "/nonexistent"],
            "a fleet's name cannot be empty; leave --name out",
        ),
        (["remove-fleet", "a", "--forc", "--admin-socket", "/x"], "unrecognized arguments: --forc"),
        (["demo", "--duration", "nan"], "'nan' is not a number of seconds above 0 and at most"),
        (["demo", "--duration", "0"], "'0' is not a number of seconds above 0 and at most 3600"),
        (["demo", "--duration", "abc"], "'abc' is not a number of seconds above 0 and at most"),
        (["demo", "--calls", "0"], "'0' is not a whole number of at least 1"),
        (["demo", "--calls", "abc"], "'abc' is not a whole number of at least 1"),
        # Was the ingress's refusal, exit 1 (a usage error is 2 everywhere else).
        (
            ["add-fleet", "https://a.test", "--maxconn", "0", "--admin-socket", "/nonexistent"],
            "argument --maxconn: '0' is not a whole number of at least 1",
        ),
    ],
)
def test_mistyped_arguments_are_refused_naming_them(argv: list[str], said: str) -> None:
    """Before (the CLI audit of session 19): an empty name became a bare 404, --forc
    was taken as --force, demo --duration nan a traceback and -1 a demo that passed."""
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


_LONG = "a" * 10_000


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["drain", _LONG], "argument name: no fleet has a name of 10000 characters (one is 259 "),
        (["remove-fleet", _LONG], "argument name: no fleet has a name of 10000 characters"),
        (["calls", "--fleet", _LONG], "argument --fleet: no fleet has a name of 10000 characters"),
        (["calls", "--bot", _LONG], "argument --bot: a bot id of 10000 characters is more than"),
        (["end-call", _LONG], "argument id: 'aaaaaaaaaaaaaaaaaaaa'... (10000 characters) is not "),
        (
            ["end-call", "4242-17-k3f9", "--reason", _LONG],
            "argument --reason: the reason is 10000 characters long; 200 at most",
        ),
    ],
)
async def test_an_argument_past_what_the_admin_socket_reads_is_refused_naming_it(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    """A fleet name, bot id, call id or reason of 10,000 characters (a paste
    gone wrong) reached the admin socket's HTTP parser, and the operator read
    "Got more than 8190 bytes when reading: bytearray(b'/fleets/aaaa...')."
    (the operator-input audit of session 38). Refused by the command, naming
    the argument and its bound; the running ingress is not asked."""
    from fleet_ingress.ops.admin_server import admin_app, bind_admin_socket
    from fleet_ingress.ops.web_sites import WebSites

    path = tmp_path / "admin.sock"
    sites = WebSites()
    await sites.serve_kept(admin_app(None, dict), bind_admin_socket(path))  # type: ignore[arg-type]
    try:
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            *argv,
            "--admin-socket",
            str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await sites.close()
    assert (proc.returncode, out) == (2, b"") and said in err.decode(), err.decode()[-600:]
    assert b"Got more than" not in err and b"Traceback" not in err


@pytest.mark.uvloop_only  # the ingress and the CLI run in processes of their own
async def test_ctrl_c_while_an_upgrade_is_asked_says_it_goes_on_without_a_traceback(
    tmp_path: Path,
) -> None:
    accepted = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the CLI goes
        writer.close()

    path = tmp_path / "admin.sock"
    server = await asyncio.start_unix_server(never_answers, path=str(path))
    proc = await asyncio.create_subprocess_exec(
        *CLI, "upgrade", "--admin-socket", str(path), stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            await accepted.wait()
            proc.send_signal(signal.SIGINT)
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
    text = err.decode()
    assert proc.returncode == 130, text
    assert "upgrade: interrupted; the upgrade goes on in the ingress" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


@pytest.mark.parametrize("where", ["directory", "file"])
def test_an_admin_socket_path_that_is_no_socket_is_named(tmp_path: Path, where: str) -> None:
    """Before: "Connection refused. Is fleet-ingress running?" (the CLI audit)."""
    path = tmp_path / "x"
    path.mkdir() if where == "directory" else path.write_text("")
    done = subprocess.run(
        [*CLI, "stat", "--admin-socket", str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert (
        f"{path} is a {'directory' if where == 'directory' else 'regular file'}, not the "
        "admin socket" in done.stderr
    ), done.stderr


def test_a_mistyped_command_gets_the_nearest_one_and_not_the_hidden_worker() -> None:
    done = subprocess.run([*CLI, "rn"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "unknown command 'rn'; did you mean 'run'?" in done.stderr, done.stderr
    assert "worker" not in done.stderr and "add-fleet" in done.stderr


def test_an_option_written_before_the_command_is_taken_as_the_commands_own(
    tmp_path: Path, tls_files: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleet-ingress -c FILE check` is `fleet-ingress check -c FILE` (argparse took
    FILE for the command and listed the hidden worker among the choices)."""
    from fleet_ingress.cli import main

    config = _write_config(tmp_path, tls_files, 8443, "ftp://fleet1.example.com\n")
    assert main(["-c", str(config), "check"]) == 1
    said = capsys.readouterr()
    assert "ftp://" in said.out + said.err, said
    assert main(["check", "-c", str(config)]) == 1
    assert capsys.readouterr() == said
    (tmp_path / "fleets.txt").write_text("https://127.0.0.1:9 name=a\n")
    assert main(["-c", str(config), "check"]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["-c", str(config), "chek"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'chek'; did you mean 'check'?" in err, err
    assert main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no command given" in err and "worker" not in err, err


@pytest.mark.parametrize(
    ("argv", "read_as"),
    [
        (["-c", "F", "stat"], ["stat", "-c", "F"]),
        # A value is a value even when it names a command (the review of session 20).
        (
            ["--name", "demo", "add-fleet", "https://x"],
            ["add-fleet", "--name", "demo", "https://x"],
        ),
        (["-c", "run", "stat"], ["stat", "-c", "run"]),
        # A flag takes no value: what follows is the (mistyped) command.
        (["--json", "stats"], ["stats", "--json"]),
        (["--config=F", "stat"], ["stat", "--config=F"]),
        (["--version", "stat"], ["--version", "stat"]),
        (["worker", "-c", "x"], ["worker", "-c", "x"]),
    ],
)
def test_options_before_the_command_are_read_as_written_after_it(
    argv: list[str], read_as: list[str]
) -> None:
    from fleet_ingress.cli import _build_parser, _command_first

    assert _command_first(argv, _build_parser()) == read_as


def test_run_with_a_key_of_another_certificate_and_nothing_kept_refuses_to_start(
    tmp_path: Path, tls_files: TLSFiles
):
    """A first start (no certificate served before it to keep: the unit's
    ExecStartPre check leaves this to `run` since session 29) exits 2 naming
    the files, before it listens."""
    import socket

    import trustme

    key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(key)
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    config = _write_config(tmp_path, tls_files, port, "https://127.0.0.1:9 name=a\n")
    config.write_text(config.read_text().replace(str(tls_files.ingress_key), str(key)))
    done = subprocess.run(
        [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "do not match" in done.stderr and str(key) in done.stderr, done.stderr
    # The settings to change, as `check` names them (before: the files only).
    assert f"fleet-ingress: {config}: tls.cert, tls.key: certificate " in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_run_names_fleets_ca_file_when_it_cannot_be_used(tmp_path: Path, tls_files: TLSFiles):
    """Before: "CA file /etc/.../ca.pem cannot be used: ...", not the key."""
    config = _write_config(tmp_path, tls_files, 0, "https://127.0.0.1:9 name=a\n")
    text = config.read_text().replace(
        f'[fleets]\nca_file = "{tls_files.ca_pem}"', '[fleets]\nca_file = "no-such-ca.pem"'
    )
    config.write_text(text)
    done = subprocess.run(
        [*CLI, "run", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert f"fleet-ingress: {config}: fleets.ca_file: CA file {tmp_path}/no-such-ca.pem" in (
        done.stderr
    ), done.stderr


# HAProxy's stats socket, given an HTTP request line, answers with its command list.
_HAPROXY_ANSWER = b"Unknown command. Please enter one of the following commands only:\n"
_NOT_OURS = {
    "not HTTP": _HAPROXY_ANSWER,
    "not JSON": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    "not a JSON object": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\nConnection: close\r\n\r\n[]",
    # An HTTP service's JSON object (a status endpoint): was a KeyError traceback.
    "without the ingress's fields": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b'Content-Length: 16\r\nConnection: close\r\n\r\n{"status": "ok"}',
}


@pytest.mark.uvloop_only  # the CLI's own loop is what is tested
@pytest.mark.parametrize("answer", list(_NOT_OURS))
async def test_another_programs_socket_is_named_not_shown_a_traceback(
    tmp_path: Path, answer: str
) -> None:
    """`--admin-socket /run/haproxy/admin.sock`, the socket of the HAProxy this
    replaces: before, a traceback a screen long (aiohttp's BadStatusLine quoting
    HAProxy's command list), exit 1; an HTTP server's answer that is not the
    ingress's, a KeyError. Now one line naming the socket and the fix, exit 2."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(_NOT_OURS[answer])
        await writer.drain()
        writer.close()

    path = tmp_path / "haproxy.sock"
    server = await asyncio.start_unix_server(reply, path=str(path))
    said = answer if answer.startswith("without") else f"that is {answer}"
    try:
        for command in (
            ["stat"],
            ["stat", "--json"],
            ["drain", "a"],
            ["add-fleet", "https://fleet9.example.com"],
            ["remove-fleet", "a"],
            ["reload"],
            ["upgrade"],
            ["calls"],
            ["end-call", "1-1"],
        ):
            proc = await asyncio.create_subprocess_exec(
                *CLI, *command, "--admin-socket", str(path), stderr=asyncio.subprocess.PIPE
            )
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            text = err.decode()
            assert proc.returncode == 2, (command, text)
            assert "Traceback" not in text, (command, text)
            assert (
                f"{path} gave an answer {said}: it is another program's socket "
                "(HAProxy's stats socket?), not the ingress's admin socket" in text
            ), (command, text)
    finally:
        server.close()


@pytest.mark.parametrize("where", ["a directory not its own", "under a file"])
def test_run_names_the_admin_socket_it_cannot_make_and_why(
    tmp_path: Path, tls_files: TLSFiles, where: str
) -> None:
    """Before: "cannot start: [Errno 13] Permission denied" (or "[Errno 17] File
    exists: ..."), naming neither listen.admin_socket nor its path (the CLI audit
    of session 32). Root without its permission-check capabilities stands in for
    the service's user."""
    import shutil

    assert shutil.which("setpriv"), "setpriv (util-linux) is needed"
    config = _write_config(tmp_path, tls_files, 0, "https://127.0.0.1:9 name=a\n")
    if where == "under a file":
        path = tmp_path / "fleets.txt" / "admin.sock"
        hint = "a file stands where its directory goes"
    else:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        path = theirs / "admin.sock"
        hint = "this user cannot create it in that directory"
    config.write_text(config.read_text().replace('admin_socket = ""', f'admin_socket = "{path}"'))
    done = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *CLI, "run", "-c", config],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot start: listen.admin_socket = '{path}': cannot listen: " in done.stderr, (
        done.stderr
    )
    assert hint in done.stderr and "[Errno" not in done.stderr, done.stderr


@pytest.mark.uvloop_only  # the ingress and the CLI run in processes of their own
async def test_a_reload_that_changes_nothing_says_so_and_what_it_read(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet
) -> None:
    """`fleet-ingress reload` against a real `run`, nothing edited: before, it
    printed `reloaded: no fleet changes`, read as though only the fleets were
    looked at (or something else had changed)."""
    from tests.support import RunningIngress, admin_command

    service = await RunningIngress.start(tls_files, [f"{roomy_fleet.url} name=a"], workers=1)
    try:
        code, printed = await admin_command(service, "reload")
        assert code == 0, printed
        assert printed.strip() == (
            "reloaded: nothing changed: the configuration, the fleets file and the "
            "certificate read again are those in force"
        ), printed
        (service.home / "fleets.txt").write_text(f"{roomy_fleet.url} name=a maxconn=3\n")
        code, printed = await admin_command(service, "reload")
        assert code == 0 and "fleet a: maxconn 16 -> 3" in printed, printed
        assert "nothing changed" not in printed
    finally:
        await service.finish()


@pytest.mark.uvloop_only  # the ingress and the CLI run in processes of their own
async def test_a_reload_of_the_same_certificate_with_another_chain_does_not_say_nothing_changed(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet
) -> None:
    """The same leaf, its file rewritten with another chain (an intermediate
    appended, as the runbook's fix for a chain carriers may fail to follow):
    workers build a new carrier context, yet the reload said "nothing changed:
    ... the certificate read again are those in force"."""
    from tests.support import RunningIngress, admin_command

    service = await RunningIngress.start(tls_files, [f"{roomy_fleet.url} name=a"], workers=1)
    try:
        cert = service.home / "cert.pem"
        cert.write_bytes(cert.read_bytes() + tls_files.ca.cert_pem.bytes())
        code, printed = await admin_command(service, "reload")
        assert code == 0, printed
        assert "nothing changed" not in printed, printed
        assert "the same certificate, its files changed (its chain or key)" in printed, printed
    finally:
        await service.finish()


@pytest.mark.uvloop_only  # the ingress and the CLI run in processes of their own
async def test_add_fleet_admin_is_refused_by_a_supervisor_that_would_add_it_ready(
    tmp_path: Path,
) -> None:
    """During an upgrade the new release's `add-fleet --admin maint` asks the old
    supervisor, which ignores a field it does not know: before, it added the fleet
    READY (new calls sent to a fleet meant to be held) and the command said
    "added", exit 0. Now its dry run, answered without `admin_state`, stops it."""
    from aiohttp import web

    asked: list[dict] = []

    async def add(request: web.Request) -> web.Response:  # a release before --admin
        body = await request.json()
        asked.append(body)
        plan = {
            "fleet": "f9",
            "url": body["url"],
            "maxconn": 100,
            "precheck": "UP",
            "fleets_file": "/etc/fleet-ingress/fleets.txt",
            "line": body["url"],
        }
        if body.get("dry_run"):
            return web.json_response({**plan, "dry_run": True})
        return web.json_response({**plan, "health": "UP", "backup": None})

    app = web.Application()
    app.router.add_post("/fleets", add)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "admin.sock"
    await web.UnixSite(runner, str(path)).start()
    try:
        command = ["add-fleet", "https://f9.test", "--name", "f9", "--admin-socket", str(path)]
        old = await asyncio.create_subprocess_exec(
            *CLI, *command, "--admin", "maint", stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(old.communicate(), 30)
        ready = await asyncio.create_subprocess_exec(*CLI, *command, stdout=subprocess.DEVNULL)
        await asyncio.wait_for(ready.wait(), 30)
    finally:
        await runner.cleanup()
    assert old.returncode == 1, err.decode()
    assert "a release before `add-fleet --admin`: it would add fleet f9 READY" in err.decode()
    assert "`fleet-ingress maint f9`" in err.decode()
    # Only the dry run reached it; without --admin, nothing is asked first.
    assert [a.get("dry_run") for a in asked] == [True, False]
    assert ready.returncode == 0


@pytest.mark.uvloop_only  # the ingress and the CLI run in processes of their own
async def test_the_ready_line_names_the_values_the_environment_sets(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet
) -> None:
    """A real `run` with FLEET_INGRESS_TIMEOUTS__QUEUE set over the file's
    queue = 3: its start logged nothing of it, so a value left in a unit's
    Environment= (or a container's) outlived every edit of the file unseen
    (the config audit of session 35). Its "ready" line names it."""
    from tests.support import RunningIngress

    service = await RunningIngress.start(
        tls_files,
        [f"{roomy_fleet.url} name=a"],
        workers=1,
        env={"FLEET_INGRESS_TIMEOUTS__QUEUE": "7"},
    )
    try:
        # Logged after READY=1 (its file read in a thread): waited for, not raced.
        await eventually(lambda: any(e.get("event") == "ready" for e in service.log()))
        (ready,) = [entry for entry in service.log() if entry.get("event") == "ready"]
        assert ready["environment"] == [
            "timeouts.queue = '7' from environment variable FLEET_INGRESS_TIMEOUTS__QUEUE, "
            "not the file's 3: the environment wins; unset it where it is set (`systemctl "
            "show fleet-ingress -p Environment`, the unit's Environment= or a drop-in), then "
            "restart the service to have the file's (a reload or an upgrade keeps the "
            "environment it started with)"
        ], ready
        # Why a restart: the variable unset in the unit (daemon-reload), the
        # unit's ExecReload check runs without it, while the reload that
        # follows still applies it (the review of session 35). That check
        # says nothing of its own environment, but asks the service's
        # (tests/e2e/test_reload_operator.py).
        config = service.home / "ingress.toml"
        edited = config.read_text().replace("\nqueue = 3\n", "\nqueue = 5\n")
        assert "\nqueue = 5\n" in edited
        config.write_text(edited)
        checking = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "fleet_ingress", "check", "-c", str(config)),
            stdout=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")},
        )
        said = (await asyncio.wait_for(checking.communicate(), 60))[0].decode()
        assert checking.returncode == 0 and "from environment variable" not in said, said
        assert "the running service (pid" in said and "TIMEOUTS__QUEUE='7' in its" in said
        ready_count = service.seen("READY=1")
        service.proc.send_signal(signal.SIGHUP)
        await service.wait_for("READY=1", ready_count + 1, timeout=20)
        (reloaded,) = [e for e in service.log() if e.get("event") == "reloaded"]
        # 7 still, not 5, and said so (tests/e2e/test_reload_operator.py).
        assert "timeouts.queue 3 -> 5" not in reloaded["changes"], reloaded
        assert "timeouts.queue: the file's edit (3 -> 5) is not applied" in reloaded["changes"]
    finally:
        await service.finish()


@pytest.mark.uvloop_only  # the ingress and the CLI run in processes of their own
async def test_run_says_the_variables_that_set_nothing_at_its_start_and_at_each_reload(
    tls_files: TLSFiles, roomy_fleet: SimulatedFleet
) -> None:
    """A real `run` with FLEET_INGRESS_FLEET_MAXCONN (a section misspelt, one
    `_` short: it names no key) and Kubernetes' FLEET_INGRESS_SERVICE_HOST:
    only `check` said the first sets nothing; `run` served the file's maxconn
    without a word (leftovers of session 36). It starts, warns of it with the
    fix, and each reload's answer says it again; Kubernetes' stays quiet."""
    from tests.support import RunningIngress, admin_command

    service = await RunningIngress.start(
        tls_files,
        [f"{roomy_fleet.url} name=a"],
        workers=1,
        env={
            "FLEET_INGRESS_FLEET_MAXCONN": "4",
            "FLEET_INGRESS_SERVICE_HOST": "10.96.0.12",
            "FLEET_INGRESS_SERVICE_PORT": "443",
        },
    )
    fix = (
        "FLEET_INGRESS_FLEET_MAXCONN is not read: a setting is "
        "FLEET_INGRESS_<SECTION>__<KEY>, two underscores before the key, e.g. "
        "FLEET_INGRESS_FLEETS__MAXCONN"
    )
    try:
        await eventually(lambda: any(e.get("event") == "ready" for e in service.log()))
        said = [e for e in service.log() if "FLEET_INGRESS_FLEET_MAXCONN" in str(e)]
        assert len(said) == 1 and said[0]["level"] == "warning", said
        assert said[0]["event"] == "environment variables that set nothing", said
        (line,) = said[0]["variables"]
        assert line.startswith(f"environment: {fix}") and "then restart" in line, line
        assert not [e for e in service.log() if "SERVICE_HOST" in str(e)]
        code, printed = await admin_command(service, "reload")
        assert code == 0 and fix in printed, printed
        assert "SERVICE_HOST" not in printed, printed
        (reloaded,) = [e for e in service.log() if e.get("event") == "reloaded"]
        assert fix in reloaded["changes"], reloaded
    finally:
        await service.finish()


@pytest.mark.parametrize("trial", ["progressing", "stalled"])
async def test_upgrade_waits_past_its_timeout_while_the_trial_makes_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trial: str
) -> None:
    """`upgrade` waits UPGRADE_TIMEOUT from the trial run's last progress (its
    wall time growing in the supervisor's status), and prints that progress:
    a niced trial on a busy host passes after minutes. A trial whose progress
    stops is waited on no longer than UPGRADE_TIMEOUT after. Before, the
    client gave up UPGRADE_TIMEOUT after it asked, the trial still running."""
    from aiohttp import web

    from fleet_ingress.ops import admin_client

    monkeypatch.setattr(admin_client, "UPGRADE_TIMEOUT", 1.0)
    monkeypatch.setattr(admin_client, "UPGRADE_POLL", 0.05)
    monkeypatch.setattr(admin_client, "UPGRADE_TRIAL_SAY_EVERY", 1.0)
    began: list[float] = []
    trial_takes = 3.0  # three times the client's timeout

    async def ask(_: web.Request) -> web.Response:
        began.append(time.monotonic())
        return web.json_response({"id": 7, "pid": 1, "from_generation": 1, "state": "checking"})

    async def status(_: web.Request) -> web.Response:
        took = time.monotonic() - began[0]
        upgrade: dict[str, Any] = {"id": 7, "from_generation": 1, "generation": 2}
        if took < trial_takes or trial == "stalled":
            wall = took if trial == "progressing" else min(took, 0.3)
            upgrade |= {"state": "checking", "trial": {"wall_s": wall, "cpu_s": 0.1}}
        else:
            upgrade |= {"state": "done", "took_s": took}
        return web.json_response({"upgrades": [upgrade], "pid": 1, "generation": 2})

    app = web.Application()
    app.router.add_post("/upgrade", ask)
    app.router.add_get("/upgrade", status)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "admin.sock"
    await web.UnixSite(runner, str(path)).start()
    out = io.StringIO()
    try:
        async with asyncio.timeout(20):
            code = await admin_client._await_upgrade(path, out)
    finally:
        await runner.cleanup()
    took = time.monotonic() - began[0]
    if trial == "progressing":
        assert code == 0 and "upgraded: generation 2 serves" in out.getvalue(), out.getvalue()
        assert took >= trial_takes
        assert "trial run still running, 1s (0.1s of CPU)" in out.getvalue(), out.getvalue()
    else:  # its last progress at 0.3 s: given up a timeout after it
        assert code == 1 and took < trial_takes, (took, out.getvalue())
