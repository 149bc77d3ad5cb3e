"""The host files in deploy/: the systemd unit (verified by systemd itself), the
certbot renewal settings and deploy hook (run against a stand-in systemctl).

systemd-analyze comes from the Debian package `systemd`, shellcheck from
`shellcheck`, the seccomp binding for the system Python from `python3-seccomp`.
Without them these tests skip on a developer's machine and fail under CI (CI set).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

import pytest

from fleet_ingress.config.settings import ListenSection, TimeoutsSection

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "fleet-ingress.service"
SYSUSERS = DEPLOY / "systemd" / "fleet-ingress.sysusers.conf"
HOOK = DEPLOY / "certbot" / "fleet-ingress-deploy-hook.sh"
RENEWAL = DEPLOY / "certbot" / "renewal-example.conf"
EXAMPLE_CONFIG = ROOT / "config" / "ingress.toml"
INSTALLED_CLI = "/opt/fleet-ingress/venv/bin/fleet-ingress"
CONFIG_PATH = "/etc/fleet-ingress/ingress.toml"
APT = {
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
    "shellcheck": "shellcheck",
    "seccomp": "python3-seccomp",
}
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-seccomp is built for Debian's own Python
# systemd-analyze security's exposure, 0-100 (it prints 0.0-10.0); the unit scores 14
# with systemd 252. A rise past this means a hardening line was lost.
MAX_EXPOSURE = 20


def tool(name: str) -> str:
    """The tool's path; skip without it, unless on CI, where it is a failure."""
    if found := shutil.which(name):
        return found
    missing(name)


def missing(name: str) -> NoReturn:
    install = f"apt-get install -y {APT[name]}"
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed and CI must run this test; install it: {install}")
    pytest.skip(f"{name} is not installed (CI unset); install it with: {install}")


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value given, in order (ExecReload= etc. repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{UNIT.name}: {key} given {len(values)} times: {values}"
    return values[0]


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with its /opt/... executable swapped for the venv's own: verify
    insists that every Exec*= binary exists and is executable. User= stays as it
    is: verify does not look the user up (that happens only when it starts)."""
    text = UNIT.read_text()
    assert INSTALLED_CLI in text
    venv_cli = Path(sys.executable).with_name("fleet-ingress")
    executable = venv_cli if os.access(venv_cli, os.X_OK) else Path(sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_CLI, str(executable)))
    return unit


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_systemd_verifies_the_unit_without_a_single_warning(verifiable_unit: Path) -> None:
    done = analyze("verify", verifiable_unit)
    # verify exits 0 on an unknown key or an unparsable value and only prints a
    # warning, so any output at all is a failure.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_verify_check_does_catch_a_mistake(tmp_path: Path, verifiable_unit: Path) -> None:
    broken = tmp_path / "broken" / UNIT.name
    broken.parent.mkdir()
    broken.write_text(verifiable_unit.read_text().replace("Type=notify", "Type=notfy"))
    done = analyze("verify", broken)
    assert "notfy" in done.stdout + done.stderr


def test_the_sandbox_keeps_exposure_low(verifiable_unit: Path) -> None:
    done = analyze("security", "--offline=true", f"--threshold={MAX_EXPOSURE}", verifiable_unit)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


# Runs argv[3:] under the unit's SystemCallFilter= (a libseccomp filter built from the
# groups systemd-analyze lists, refusals answered EPERM as SystemCallErrorNumber= says)
# and MemoryDenyWriteExecute= (the kernel's own W^X switch, PR_SET_MDWE, Linux 6.3+;
# systemd's seccomp version refuses the same mappings). Both survive execve.
SANDBOX = r"""
import ctypes, errno, json, os, subprocess, sys
import seccomp

listing = subprocess.run(
    ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
).stdout
groups, current = {}, None
for line in listing.splitlines():
    if line.startswith("@"):
        current = groups.setdefault(line.strip(), [])
    elif current is not None and line.strip() and not line.strip().startswith("#"):
        current.append(line.strip())

def expand(items, seen=()):
    names = set()
    for item in items:
        if item in seen:
            continue
        names |= expand(groups[item], {*seen, item}) if item.startswith("@") else {item}
    return names

# systemd reads the lines in order: the first an allow-list, then each line
# prefixed ~ takes its names out of it and each other line puts its names back.
allowed = set()
for n, line in enumerate(json.loads(sys.argv[1])):
    if line.startswith("~"):
        allowed -= expand(line.removeprefix("~").split())
    else:
        assert n > 0 or line, "the first SystemCallFilter= line must be an allow-list"
        allowed |= expand(line.split())
sandbox = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in sorted(allowed):
    try:
        sandbox.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError):
        pass  # a name this libseccomp does not know
sandbox.load()
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_the_ingress_runs_under_the_units_syscall_filter_and_w_xor_x() -> None:
    """A dependency that needs writable+executable memory (a JIT) or a system call
    outside the filter would only show in production, as a crash or an odd EPERM."""
    tool("systemd-analyze")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import seccomp"], capture_output=True)
    if probe.returncode != 0:
        missing("seccomp")
    s = unit_settings(UNIT.read_text())
    assert one(s, "Service.MemoryDenyWriteExecute") == "yes"
    assert one(s, "Service.SystemCallErrorNumber") == "EPERM"
    assert not s["Service.SystemCallFilter"][0].startswith("~")  # an allow-list first
    filter_lines_json = json.dumps(s["Service.SystemCallFilter"])
    cli = [sys.executable, "-m", "fleet_ingress"]
    demo = [*cli, "demo", "--calls", "4", "--duration", "1"]
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", SANDBOX, filter_lines_json, *demo],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "PR_SET_MDWE" in done.stderr:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {done.stderr.strip()}")
    assert done.returncode == 0 and "demo: OK" in done.stdout, done.stdout + done.stderr
    # The sandbox does bite: a W+X mapping is refused, and so is a call outside the filter.
    bites = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # PROT_READ|WRITE|EXEC
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", SANDBOX, filter_lines_json, sys.executable, "-c", bites],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "PermissionError" in done.stderr, done.stderr
    chroot = "import os; os.chroot('/')"  # @privileged
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", SANDBOX, filter_lines_json, sys.executable, "-c", chroot],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "Operation not permitted" in done.stderr, done.stderr
    # What an upgrade does beyond serving: its trial run niced, its state in a
    # memfd, a worker of the previous image waited for on a pidfd and signalled
    # through it, signals blocked over the supervisor's own execve; and what
    # process.cpu_affinity does, a worker pinned.
    upgrade = (
        "import os, signal, sys\n"
        "os.nice(10)\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "fd = os.memfd_create('state', 0); os.write(fd, b'{}')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    signal.pause()\n"
        "pidfd = os.pidfd_open(pid); signal.pidfd_send_signal(pidfd, signal.SIGKILL)\n"
        "os.waitpid(pid, 0)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR2})\n"
        "os.execv(sys.executable, [sys.executable, '-c', 'print(\"exec ok\")'])\n"
    )
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", SANDBOX, filter_lines_json, sys.executable, "-c", upgrade],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "exec ok" in done.stdout, done.stderr


def test_the_unit_has_the_settings_the_ingress_relies_on() -> None:
    s = unit_settings(UNIT.read_text())
    assert one(s, "Service.Type") == "notify" and one(s, "Service.NotifyAccess") == "main"
    start_check = f"{INSTALLED_CLI} check --before-start -c {CONFIG_PATH}"
    assert one(s, "Service.ExecStartPre") == start_check
    assert one(s, "Service.ExecStart") == f"{INSTALLED_CLI} run -c {CONFIG_PATH}"
    # The check first, so a bad file fails `systemctl reload`; then the in-process
    # reload, waited for: a refusal there fails it too.
    assert s["Service.ExecReload"] == [
        f"{INSTALLED_CLI} check -c {CONFIG_PATH}",
        f"{INSTALLED_CLI} reload -c {CONFIG_PATH}",
    ]
    assert one(s, "Service.User") == one(s, "Service.Group") == "fleet-ingress"
    assert one(s, "Service.AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(s, "Service.CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert int(one(s, "Service.LimitNOFILE")) >= 2 * 10000 + 1024  # two sockets a call
    # The main process alone: the workers and their calls outlive a supervisor
    # that dies, which is started again and takes them up from the fd store.
    assert one(s, "Service.KillMode") == "process"
    assert int(one(s, "Service.FileDescriptorStoreMax")) >= 3 + 2 * 64
    assert one(s, "Service.Restart") == "on-failure"
    assert one(s, "Service.WatchdogSec") == "30"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert one(s, f"Service.{key}") == "yes", key
    assert one(s, "Service.ProtectSystem") == "strict"
    assert one(s, "Service.MemoryDenyWriteExecute") == "yes"
    assert one(s, "Service.RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"


def test_systemd_waits_longer_than_the_drain_before_sigkill() -> None:
    s = unit_settings(UNIT.read_text())
    stop_timeout = float(one(s, "Service.TimeoutStopSec"))
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    for drain in (TimeoutsSection().drain, example["timeouts"]["drain"]):
        assert stop_timeout >= drain + 10, "calls still draining would be SIGKILLed"


def test_the_unit_gives_the_ingress_the_paths_it_uses() -> None:
    s = unit_settings(UNIT.read_text())
    # The admin socket's directory: created for the service user, group-only.
    admin_socket = Path(ListenSection().admin_socket)
    assert admin_socket == Path("/run") / one(s, "Service.RuntimeDirectory") / admin_socket.name
    assert one(s, "Service.RuntimeDirectoryMode") == "0750"
    # add-fleet/remove-fleet rewrite the fleets file next to the configuration.
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    fleets_file = Path(CONFIG_PATH).parent / example["fleets"]["file"]
    writable = [Path(p.lstrip("-")) for p in one(s, "Service.ReadWritePaths").split()]
    assert any(fleets_file.is_relative_to(p) for p in writable), writable
    assert example["tls"]["cert"].startswith("/etc/letsencrypt/live/")
    assert "/etc/letsencrypt" in one(s, "Service.ReadOnlyPaths").lstrip("-")


def test_sysusers_creates_the_unit_user() -> None:
    entries = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [entry[:2] for entry in entries] == [["u", "fleet-ingress"]]


def test_systemd_sysusers_would_create_user_and_group(tmp_path: Path) -> None:
    etc = tmp_path / "etc"  # a scratch root: the host's users stay untouched
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    done = subprocess.run(
        [tool("systemd-sysusers"), f"--root={tmp_path}", "--dry-run", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "Creating group 'fleet-ingress'" in out and "Creating user 'fleet-ingress'" in out


def renewal_params() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    # certbot's file starts with keys outside any section.
    parser.read_string("[lineage]\n" + RENEWAL.read_text())
    return parser["renewalparams"]


def test_certbot_renews_standalone_on_the_port_the_ingress_forwards_to() -> None:
    params = renewal_params()
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    host, _, port = example["acme"]["upstream"].rpartition(":")
    assert params["authenticator"] == "standalone"
    assert params["http01_port"] == port == "8888"
    assert params["http01_address"] == host == "127.0.0.1"


def test_certbot_runs_the_deploy_hook() -> None:
    hook = renewal_params()["renew_hook"]
    assert Path(hook).name == HOOK.name and Path(hook).is_absolute()


def test_the_hook_is_a_valid_executable_shell_script() -> None:
    text = HOOK.read_text()
    assert text.startswith("#!/bin/sh\n") and os.access(HOOK, os.X_OK)
    assert re.search(r"^set -eu$", text, re.M)
    for shell in ("bash", "sh"):
        done = subprocess.run([shell, "-n", str(HOOK)], capture_output=True, text=True)
        assert done.returncode == 0, f"{shell} -n: {done.stderr}"


def test_shellcheck_finds_nothing_in_the_hook() -> None:
    done = subprocess.run([tool("shellcheck"), str(HOOK)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("active", "reload_status", "exit_status", "logged", "reloaded"),
    [
        (False, 0, 0, "fleet-ingress is not running, it will load it when started", False),
        (True, 0, 0, "fleet-ingress reloaded, new handshakes use it", True),
        (True, 1, 1, "'systemctl reload fleet-ingress' failed (1)", True),
    ],
)
def test_the_hook_reloads_a_running_ingress_and_fails_loudly(
    tmp_path: Path, active: bool, reload_status: int, exit_status: int, logged: str, reloaded: bool
) -> None:
    calls = tmp_path / "calls"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub = {
        "systemctl": f"""#!/bin/sh
echo "systemctl $*" >> {calls}
case "$1" in
  is-active) exit {0 if active else 3} ;;
  reload) exit {reload_status} ;;
esac
exit 99
""",
        "logger": f'#!/bin/sh\necho "logger $*" >> {calls}\n',
    }
    for name, script in stub.items():
        (stubs / name).write_text(script)
        (stubs / name).chmod(0o755)
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "RENEWED_LINEAGE": "/etc/letsencrypt/live/calls.example.com",
    }
    done = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == exit_status, done.stderr
    assert "/etc/letsencrypt/live/calls.example.com" in done.stderr and logged in done.stderr
    record = calls.read_text()
    assert ("systemctl reload fleet-ingress" in record) == reloaded
    assert "logger -t fleet-ingress-deploy-hook" in record
    assert "restart" not in record  # a restart would drain every call


def test_every_deploy_file_the_docs_name_exists() -> None:
    for doc in (ROOT / "docs" / "INSTALL.md", DEPLOY / "README.md"):
        text = doc.read_text()
        named = set(re.findall(r"deploy/[\w./-]+\.(?:service|conf|sh|yml|json|md)", text))
        kinds = "systemd|certbot|prometheus|grafana|keepalived"
        named |= {f"deploy/{m}" for m in re.findall(rf"`((?:{kinds})/[\w.-]+)`", text)}
        assert named, doc
        missing = sorted(n for n in named if not (ROOT / n).exists())
        assert not missing, f"{doc} names files that do not exist: {missing}"
