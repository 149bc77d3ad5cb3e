"""`fleet-ingress init --vip ADDR/PREFIX --interface IF --peer ADDR`: this host's
keepalived.conf beside ingress.toml (SPEC section 14), rendered like the rest of
init and accepted by `keepalived -t` itself.

keepalived comes from the Debian package `keepalived`; without it the tests that
run it skip on a developer's machine and fail under CI (CI set).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fleet_ingress.config.init_deploy import (
    CHECK_FAILED,
    NOT_WRITTEN,
    OK,
    PLACEHOLDER,
    InitError,
    TwoHosts,
    add_init_arguments,
    check_keepalived,
    keepalived_binary,
    main_init,
    render_deployment,
    render_keepalived,
    two_hosts,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ROOT / "src" / "fleet_ingress" / "config" / "templates" / "keepalived.conf"
EXAMPLE = ROOT / "deploy" / "keepalived" / "keepalived.example.conf"
DOMAIN = "calls.example.com"
FLEETS = ["https://fleet1.example.com", "https://fleet2.example.com"]
# What docs/INSTALL.md installs; the example in deploy/ is rendered with these.
INSTALLED_CHECK = (
    "/opt/fleet-ingress/venv/bin/fleet-ingress check -c /etc/fleet-ingress/ingress.toml --live"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLEET_INGRESS_"):
            monkeypatch.delenv(name)


def keepalived_or_skip() -> str:
    if found := keepalived_binary():
        return found
    if os.environ.get("CI"):
        pytest.fail(
            "keepalived is not installed and CI must run this test; apt-get install keepalived"
        )
    pytest.skip(
        "keepalived is not installed (CI unset); install it with: apt-get install keepalived"
    )


def an_interface() -> str:
    """An interface this host has (keepalived -t checks that it exists): the
    kernel's list for this network namespace, not /sys/class/net's, which holds
    the file bonding_masters where the bonding module is loaded and shows the
    interfaces of the namespace sysfs was mounted in."""
    names = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if not names:
        pytest.skip("this host has no network interface but lo (keepalived refuses lo)")
    return names[0]


def a_script_user() -> str:
    # keepalived -t checks that script_user exists; nobody does on every Debian.
    return "nobody"


def parse(text: str) -> dict[str, Any]:
    """keepalived's syntax, enough to assert on: `keyword args...` lines and
    `{ }` blocks; a block is keyed by its keyword and name ("vrrp_instance x")."""
    root: dict[str, Any] = {}
    stack = [root]
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split("!", 1)[0].strip()
        if not line:
            continue
        if line == "}":
            stack.pop()
            continue
        if line.endswith("{"):
            block: dict[str, Any] = {}
            stack[-1][line[:-1].strip()] = block
            stack.append(block)
            continue
        key, _, value = line.partition(" ")
        stack[-1][key] = value.strip()
    assert stack == [root], "unbalanced braces"
    return root


def init_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleet-ingress init")
    add_init_arguments(parser)
    return parser.parse_args(argv)


PAIR = two_hosts("192.0.2.10/24", "eth0", "192.0.2.12", priority=110)


def test_renders_keepalived_conf_beside_ingress_toml(tmp_path: Path) -> None:
    paths = render_deployment(DOMAIN, FLEETS, tmp_path, pair=PAIR)
    assert paths == [tmp_path / n for n in ("ingress.toml", "fleets.txt", "keepalived.conf")]
    text = (tmp_path / "keepalived.conf").read_text()
    assert not PLACEHOLDER.search(text)
    conf = parse(text)
    assert conf["global_defs"] == {"enable_script_security": "", "script_user": "fleet-ingress"}
    script = conf["vrrp_script fleet_ingress_live"]
    command = script.pop("script").strip('"')
    assert script == {
        "interval": "1",
        # A check slowed by a starved host's start-up is not a failure (1 to 3.3 s
        # with every core busy, the ingress answering within its own 0.8 s: the
        # pair audit of session 38); one that never ends is, after 5 s.
        "timeout": "5",
        "fall": "2",
        "rise": "2",
        "init_fail": "",
    }
    # This installation's CLI, by absolute path, on the config written beside it.
    argv = command.split()
    assert Path(argv[0]).is_absolute() and argv[0].startswith(str(Path(sys.executable).parent))
    assert argv[-4:] == ["check", "-c", str(tmp_path / "ingress.toml"), "--live"]
    instance = conf["vrrp_instance fleet_ingress"]
    assert instance == {
        "state": "BACKUP",  # nopreempt is ignored with MASTER
        "nopreempt": "",
        "interface": "eth0",
        "virtual_router_id": "10",  # the address's last byte: both hosts agree untold
        "priority": "110",
        "advert_int": "1",
        "unicast_peer": {"192.0.2.12": ""},
        "virtual_ipaddress": {"192.0.2.10/24": "dev eth0"},
        # No weight: a failed check means FAULT, which gives the address up.
        "track_script": {"fleet_ingress_live": ""},
    }


def test_the_check_the_file_names_is_the_live_check(tmp_path: Path) -> None:
    render_deployment(DOMAIN, FLEETS, tmp_path, pair=PAIR)
    command = parse((tmp_path / "keepalived.conf").read_text())["vrrp_script fleet_ingress_live"]
    argv = command["script"].strip('"').split()
    # Nothing listens (the ingress is not running): one line, exit 1, as keepalived sees it.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout.startswith("not live: "), done
    assert done.stdout.count("\n") == 1


def test_the_example_in_deploy_is_what_init_renders() -> None:
    pair = two_hosts("192.0.2.10/24", "eth0", "192.0.2.12", priority=110)
    rendered = render_keepalived(PACKAGED.read_text(), DOMAIN, pair, INSTALLED_CHECK)
    assert EXAMPLE.read_text() == rendered, (
        f"{EXAMPLE} is out of date; regenerate it: python -c 'from tests.test_init_keepalived "
        "import write_example; write_example()'"
    )


def write_example() -> None:
    pair = two_hosts("192.0.2.10/24", "eth0", "192.0.2.12", priority=110)
    EXAMPLE.parent.mkdir(exist_ok=True)
    EXAMPLE.write_text(render_keepalived(PACKAGED.read_text(), DOMAIN, pair, INSTALLED_CHECK))


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"vip": "192.0.2.10"}, "--vip '192.0.2.10': give the shared address with its prefix"),
        ({"vip": "calls.example.com/24"}, "--vip 'calls.example.com/24' is not ADDRESS/PREFIX"),
        ({"vip": "127.0.0.2/8"}, "loopback"),
        ({"vip": "192.0.2.0/24"}, "network's own or broadcast"),
        ({"vip": "192.0.2.255/24"}, "network's own or broadcast"),
        ({"peer": "fleet2.example.com"}, "--peer 'fleet2.example.com'"),
        ({"peer": "2001:db8::12"}, "give both as IPv4 addresses"),
        ({"peer": "192.0.2.10"}, "that is the shared address"),
        ({"interface": "eth0 eth1"}, "--interface 'eth0 eth1'"),
        ({"interface": "a-very-long-interface"}, "not a network interface name"),
        ({"priority": 255}, "--priority 255: give 1 to 254"),
        ({"priority": 0}, "--priority 0"),
        ({"router_id": 256}, "--vrid 256"),
        ({"script_user": "root; rm"}, "--script-user 'root; rm'"),
        (
            {"vip": "2001:db8::10/64", "peer": "2001:db8::12"},
            "--vip 2001:db8::10/64 is IPv6: give --source, this host's own address",
        ),
        ({"source": "2001:db8::11"}, "give both as IPv4 addresses"),
        ({"source": "192.0.2.12"}, "that is --peer, the other host's"),
        ({"source": "192.0.2.10"}, "that is the shared address"),
        ({"source": "host-a"}, "--source 'host-a'"),
    ],
)
def test_bad_values_are_refused_naming_the_option(given: dict[str, Any], named: str) -> None:
    values: dict[str, Any] = {"vip": "192.0.2.10/24", "interface": "eth0", "peer": "192.0.2.12"}
    values.update(given)
    with pytest.raises(InitError) as raised:
        two_hosts(values.pop("vip"), values.pop("interface"), values.pop("peer"), **values)
    assert named in str(raised.value)


def test_ipv6_and_an_explicit_router_id() -> None:
    pair = two_hosts("2001:db8::10/64", "eth0", "2001:db8::12", router_id=51, source="2001:db8::11")
    conf = parse(render_keepalived(PACKAGED.read_text(), DOMAIN, pair, INSTALLED_CHECK))
    instance = conf["vrrp_instance fleet_ingress"]
    assert instance["virtual_router_id"] == "51"
    assert instance["virtual_ipaddress"] == {"2001:db8::10/64": "dev eth0"}
    assert instance["unicast_peer"] == {"2001:db8::12": ""}
    # Sent from the address the other host's unicast_peer names, not the link-local one.
    assert instance["unicast_src_ip"] == "2001:db8::11"


def test_an_ipv4_pair_leaves_the_source_to_keepalived_unless_given() -> None:
    template = PACKAGED.read_text()
    pair = two_hosts("192.0.2.10/24", "eth0", "192.0.2.12")
    conf = parse(render_keepalived(template, DOMAIN, pair, INSTALLED_CHECK))
    assert "unicast_src_ip" not in conf["vrrp_instance fleet_ingress"]
    pair = two_hosts("192.0.2.10/24", "eth0", "192.0.2.12", source="192.0.2.11")
    conf = parse(render_keepalived(template, DOMAIN, pair, INSTALLED_CHECK))
    assert conf["vrrp_instance fleet_ingress"]["unicast_src_ip"] == "192.0.2.11"


def test_an_ipv6_pair_listens_on_both_families(tmp_path: Path) -> None:
    """Carriers call the shared IPv6 address: 0.0.0.0 would refuse them."""
    pair = two_hosts("2001:db8::10/64", "eth0", "2001:db8::12", source="2001:db8::11")
    render_deployment(DOMAIN, ["https://fleet1.example.com"], tmp_path, pair=pair)
    listen = tomllib.loads((tmp_path / "ingress.toml").read_text())["listen"]
    assert (listen["wss"], listen["acme"]) == ("[::]:443", "[::]:80")
    ipv4 = two_hosts("192.0.2.10/24", "eth0", "192.0.2.12")
    render_deployment(DOMAIN, ["https://fleet1.example.com"], tmp_path / "v4", pair=ipv4)
    listen = tomllib.loads((tmp_path / "v4" / "ingress.toml").read_text())["listen"]
    assert (listen["wss"], listen["acme"]) == ("0.0.0.0:443", "0.0.0.0:80")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--vip", "192.0.2.10/24", "--interface", "eth0"], "--peer missing"),
        (["--peer", "192.0.2.12"], "--vip and --interface missing"),
        (["--priority", "110"], "--priority: only with --vip, --interface and --peer"),
    ],
)
def test_the_pair_options_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    args = init_args("--domain", DOMAIN, "--fleet", *FLEETS, "--out", str(tmp_path), *argv)
    assert main_init(args) == NOT_WRITTEN
    assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_keepalived_conf_is_not_overwritten_without_force(tmp_path: Path) -> None:
    (tmp_path / "keepalived.conf").write_text("# hand-written\n")
    with pytest.raises(InitError, match=r"keepalived\.conf already exists"):
        render_deployment(DOMAIN, FLEETS, tmp_path, pair=PAIR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keepalived.conf"]
    render_deployment(DOMAIN, FLEETS, tmp_path, pair=PAIR, force=True)
    assert (tmp_path / "keepalived.conf.bak.1").read_text() == "# hand-written\n"


def test_a_surviving_placeholder_in_the_keepalived_template_is_refused(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    for name in ("ingress.toml", "fleets.txt"):
        shutil.copy(PACKAGED.parent / name, templates / name)
    (templates / "keepalived.conf").write_text(
        PACKAGED.read_text().replace("advert_int 1", "advert_int __ADVERT__")
    )
    out = tmp_path / "etc"
    with pytest.raises(InitError) as raised:
        render_deployment(DOMAIN, FLEETS, out, template_dir=templates, pair=PAIR)
    assert f"{templates / 'keepalived.conf'} line " in str(raised.value)
    assert "__ADVERT__" in str(raised.value) and "nothing was written" in str(raised.value)
    assert not out.exists()


def test_keepalived_accepts_what_init_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keepalived_or_skip()
    args = init_args(
        "--domain", DOMAIN, "--fleet", *FLEETS, "--out", str(tmp_path),
        "--vip", "192.0.2.10/24", "--interface", an_interface(), "--peer", "192.0.2.12",
        "--priority", "110", "--script-user", a_script_user(),
    )  # fmt: skip
    status = main_init(args)
    out = capsys.readouterr().out
    assert status == OK, out
    assert f"wrote {tmp_path / 'keepalived.conf'}" in out
    assert f"check: keepalived -t accepts {tmp_path / 'keepalived.conf'}" in out


def test_keepalived_t_is_a_real_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keepalived = keepalived_or_skip()
    pair = TwoHosts(PAIR.vip, an_interface(), PAIR.peer, script_user=a_script_user())
    good = render_keepalived(PACKAGED.read_text(), DOMAIN, pair, INSTALLED_CHECK)
    (tmp_path / "good.conf").write_text(good)
    assert check_keepalived(tmp_path / "good.conf", keepalived) == []
    # What keepalived itself rejects reaches the operator, with its line number.
    bad = tmp_path / "bad.conf"
    bad.write_text(good.replace("fall 2", "fal 2"))
    problems = check_keepalived(bad, keepalived)
    assert any("Unknown keyword 'fal'" in p for p in problems), problems
    bad.write_text(good.replace(f"script_user {pair.script_user}", "script_user no-such-user-x"))
    problems = check_keepalived(bad, keepalived)
    assert any("--script-user must name a user" in p for p in problems), problems

    # And through main_init: written, exit 1, keepalived's words printed.
    args = init_args(
        "--domain", DOMAIN, "--fleet", *FLEETS, "--out", str(tmp_path / "etc"),
        "--vip", "192.0.2.10/24", "--interface", "no-such-if0", "--peer", "192.0.2.12",
        "--script-user", a_script_user(),
    )  # fmt: skip
    assert main_init(args) == CHECK_FAILED
    said = capsys.readouterr()
    out = said.out
    assert "check: keepalived -t -f" in out and "no-such-if0" in out and "ip -br link" in out
    # What to run once fixed: `check` alone does not read keepalived.conf (the
    # docwalk of session 33: init named only `fleet-ingress check`).
    conf = (tmp_path / "etc" / "keepalived.conf").absolute()
    assert said.err.rstrip().endswith(f"fix them, then run: keepalived -t -f {conf}"), said.err
