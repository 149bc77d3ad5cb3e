"""Two ingress hosts behind one address, for real (SPEC section 14, issue #15).

Network namespaces that this test makes and removes, joined by a bridge, with
documentation addresses (192.0.2.0/24) only inside them:

    ingress A 192.0.2.11 ─┐                    ┌─ fleets  192.0.2.20 (simulated fleet)
    ingress B 192.0.2.12 ─┼── bridge (lan) ────┼─ carrier 192.0.2.30
    shared    192.0.2.10 ─┘   (held by A or B)

Each ingress host runs `fleet-ingress run` and keepalived with the keepalived.conf
that `fleet-ingress init --vip` rendered for it, unchanged. The carrier calls
wss://192.0.2.10 again and again. Kill the active host's ingress (SIGKILL): new
calls succeed again within 6 s, on the other host. Bring it back: the address
stays where it is (nopreempt). Stop keepalived on the active host: the same.

Needs root, `ip netns` and keepalived: without them it skips on a developer's
machine and fails under CI (CI set), where all three are there.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import trustme

from fleet_ingress.config.init_deploy import add_init_arguments, keepalived_binary, main_init
from fleet_ingress.core.address_watch import CHECK_PERIOD
from tests.support import netns_prefix

ROLES = Path(__file__).resolve().parent / "netns_roles.py"
VIP, PREFIX = "192.0.2.10", 24
HOSTS = {"a": "192.0.2.11", "b": "192.0.2.12"}
FLEETS_IP, CARRIER_IP, FLEET_PORT = "192.0.2.20", "192.0.2.30", 8080
# The same lab over IPv6 (documentation prefix, inside the lab's namespaces only).
VIP6, PREFIX6 = "2001:db8::10", 64
HOSTS6 = {"a": "2001:db8::11", "b": "2001:db8::12"}
CARRIER_IP6 = "2001:db8::30"
DOMAIN = "calls.example.com"
FAILOVER_BUDGET = 6.0  # seconds from the failure to the first new call that succeeds
# For an ingress just started to pass its live check (the track script):
# RunningIngress allows 30 s for READY=1 alone on a loaded host.
LIVE_WAIT = 40
# How long "the address stays where it is" is watched: longer than VRRP's master-down
# interval (3 x advert_int + skew, about 3.6 s), after which a host that would preempt
# has done so.
HOLD = 6.0
# Long calls on the active host when its keepalived stops, and how soon after the
# stop it must have ended them: keepalived removes the address at once, the
# grace (1 s) and a look (1 s) follow, with room for a loaded host.
HELD = 4
ENDED_BUDGET = 5.0
LIFETIME = 150  # no helper process outlives this, whatever happens to the test


def _lab_prefix() -> str:
    """What this test's namespaces and its home in /tmp are named with, before
    the pid: the run's prefix (FI_TEST_NETNS_PREFIX, else "fi") and "k" (the
    keepalived test), so two runs on one machine given prefixes of their own
    neither collide nor sweep each other's."""
    return f"{netns_prefix()}k"


def _lab_tag() -> str:
    return f"{_lab_prefix()}{os.getpid()}"


def _require(what: str, ok: bool) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI=true: {what}; CI must run this test", pytrace=False)
    pytest.skip(what)


def _ip_netns_works() -> bool:
    name = f"{_lab_tag()}-probe"
    try:
        added = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return added.returncode == 0


def _die_with_parent() -> None:
    # If pytest itself is killed, the helpers go too (the namespaces are swept by
    # the next run, see _sweep_stale).
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _stale(name: str) -> bool:
    """`name` is this test's (its prefix, then a pid) and its pytest is gone."""
    match = re.match(rf"{re.escape(_lab_prefix())}(\d+)-", name)
    return match is not None and not Path(f"/proc/{match.group(1)}").exists()


def _sweep_stale() -> None:
    """Namespaces and homes left by an earlier run of this test that was killed
    outright (the fixture's finally never ran); a live run's are left alone."""
    for line in _run("ip", "netns", "list").splitlines():
        if line.split() and _stale(name := line.split()[0]):
            _delete_namespace(name)
    for home in Path("/tmp").glob(f"{glob.escape(_lab_prefix())}*-*"):
        if home.is_dir() and not home.is_symlink() and _stale(home.name):
            shutil.rmtree(home, ignore_errors=True)


def _delete_namespace(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    lines: list[str] = field(default_factory=list)  # stdout lines, for the roles that print

    def tail(self, n: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-n:])


class Lab:
    """The namespaces, the files and every process started in them; `close` undoes all."""

    def __init__(self, home: Path) -> None:
        self.home = home
        tag = _lab_tag()
        self.ns = {role: f"{tag}-{role}" for role in ("lan", "a", "b", "fleets", "carrier")}
        self.procs: list[Proc] = []
        self.created: list[str] = []

    # -- network -------------------------------------------------------------

    def build(self) -> None:
        for name in self.ns.values():
            _run("ip", "netns", "add", name)
            self.created.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        lan = self.ns["lan"]
        _run("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", lan, "link", "set", "br0", "up")
        addresses = {**HOSTS, "fleets": FLEETS_IP, "carrier": CARRIER_IP}
        for role, address in addresses.items():
            ns, port = self.ns[role], f"p-{role}"
            # Both ends are made inside their namespaces: nothing appears on the host.
            _run(
                "ip", "link", "add", "eth0", "netns", ns,
                "type", "veth", "peer", "name", port, "netns", lan,
            )  # fmt: skip
            _run("ip", "-n", lan, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0")
            if address6 := {**HOSTS6, "carrier": CARRIER_IP6}.get(role):
                # nodad: usable at once, not after duplicate address detection.
                add6 = ["addr", "add", f"{address6}/{PREFIX6}", "dev", "eth0", "nodad"]
                _run("ip", "-n", ns, *add6)
            _run("ip", "-n", ns, "link", "set", "eth0", "up")

    def holds_vip(self, role: str, vip: str = VIP) -> bool:
        out = _run("ip", "-n", self.ns[role], "-o", "addr", "show", "dev", "eth0")
        return f" {vip}/" in out

    def holder(self, vip: str = VIP) -> str | None:
        holders = [role for role in HOSTS if self.holds_vip(role, vip)]
        assert len(holders) <= 1, f"both hosts hold {vip}"
        return holders[0] if holders else None

    # -- processes -----------------------------------------------------------

    def start(self, name: str, role: str, argv: list[str], *, read_lines: bool = False) -> Proc:
        log = self.home / f"{name}.log"
        out: IO[bytes] | int = subprocess.PIPE if read_lines else log.open("ab")
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[role], *argv],
            stdin=subprocess.PIPE,  # closed at the end: the roles stop on EOF
            stdout=out,
            stderr=log.open("ab"),
            preexec_fn=_die_with_parent,
        )
        proc = Proc(name, popen, log)
        if read_lines:
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        self.procs.append(proc)
        return proc

    @staticmethod
    def _read(proc: Proc) -> None:
        assert proc.popen.stdout is not None
        for raw in proc.popen.stdout:
            proc.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def keepalived(self, role: str) -> Proc:
        run = self.home / role
        return self.start(
            f"keepalived-{role}",
            role,
            [
                keepalived_binary() or "keepalived",
                "--use-file", str(run / "keepalived.conf"),
                "--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp",
                # Pid files of our own: the defaults in /run belong to the host's keepalived.
                "--pid", str(run / "keepalived.pid"),
                "--vrrp_pid", str(run / "vrrp.pid"),
                "--checkers_pid", str(run / "checkers.pid"),
                "--bfd_pid", str(run / "bfd.pid"),
            ],
        )  # fmt: skip

    def ingress(self, role: str) -> Proc:
        cli = str(Path(sys.executable).parent / "fleet-ingress")
        config = str(self.home / role / "ingress.toml")
        return self.start(f"ingress-{role}", role, [cli, "run", "-c", config])

    def live(self, role: str) -> bool:
        """The track script keepalived runs, run by hand."""
        conf = (self.home / role / "keepalived.conf").read_text()
        script = re.search(r'script "([^"]+)"', conf)
        assert script is not None
        argv = ["ip", "netns", "exec", self.ns[role], *script.group(1).split()]
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0

    def check_live_at(self, role: str, wss: str) -> subprocess.CompletedProcess[str]:
        """`check --live` on a copy of the host's ingress.toml listening on `wss`."""
        config = self.home / role / "ingress.toml"
        other = self.home / role / "ingress-at.toml"
        other.write_text(re.sub(r'(?m)^wss = ".*"$', f'wss = "{wss}"', config.read_text()))
        cli = str(Path(sys.executable).parent / "fleet-ingress")
        argv = ["ip", "netns", "exec", self.ns[role], cli, "check", "-c", str(other), "--live"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10)

    def stop(self, proc: Proc, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(5)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.stdin is not None:
                try:
                    proc.popen.stdin.close()
                except OSError:
                    pass
            self.stop(proc, signal.SIGTERM, timeout=5)
        for name in reversed(self.created):
            _delete_namespace(name)

    def logs(self) -> str:
        return "\n".join(proc.tail() for proc in self.procs)


def until(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds it took; fails with every process's log tail if it never happens."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}\n{lab.logs()}")
        time.sleep(0.05)
    return time.monotonic() - start


def attempts(carrier: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in list(carrier.lines) if line.startswith("{")]


def first_success_after(carrier: Proc, t: float) -> float | None:
    """When the first call started after `t` succeeded (its end), or None."""
    for call in attempts(carrier):
        if call["start"] >= t and call["ok"]:
            return call["end"]
    return None


def failed_since(carrier: Proc, t: float) -> list[dict[str, Any]]:
    return [c for c in attempts(carrier) if c["start"] >= t and not c["ok"]]


def script_user() -> str:
    """keepalived runs the check as this user: nobody, when nobody can run this
    interpreter (a venv from Debian's python3 in /opt, as docs/INSTALL.md does); root
    when the interpreter lives where nobody may not go (pyenv under /root)."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import fleet_ingress.ops.live_check"],
            user="nobody",
            capture_output=True,
            timeout=30,
            cwd="/",
        )
    except PermissionError:
        return "root"
    return "nobody" if probe.returncode == 0 else "root"


def render_host(home: Path, role: str, ca: trustme.CA, user: str, *, ipv6: bool = False) -> None:
    """`fleet-ingress init --vip` for this host, as an operator runs it; then only
    what a lab must change in ingress.toml: its certificate and an admin socket of
    its own (the default path is shared by every process of the machine)."""
    import argparse

    out = home / role
    other = "b" if role == "a" else "a"
    if ipv6:
        pair = ["--vip", f"{VIP6}/{PREFIX6}", "--peer", HOSTS6[other], "--source", HOSTS6[role]]
    else:
        pair = ["--vip", f"{VIP}/{PREFIX}", "--peer", HOSTS[other]]
    parser = argparse.ArgumentParser()
    add_init_arguments(parser)
    args = parser.parse_args(
        [
            "--domain", DOMAIN, "--fleet", f"http://{FLEETS_IP}:{FLEET_PORT} name=fleet",
            "--out", str(out), *pair, "--interface", "eth0",
            "--priority", "110" if role == "a" else "100", "--script-user", user,
        ]
    )  # fmt: skip
    # keepalived -t runs on this (outer) host, which has no eth0 of the lab's: 1 is expected.
    main_init(args)
    leaf = ca.issue_cert(DOMAIN, VIP, VIP6)
    cert, key = out / "cert.pem", out / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    os.chmod(key, 0o600)
    toml = (out / "ingress.toml").read_text()
    toml = re.sub(r'(?m)^cert = ".*"$', f'cert = "{cert}"', toml)
    toml = re.sub(r'(?m)^key = ".*"$', f'key = "{key}"', toml)
    toml = re.sub(r'(?m)^admin_socket = ".*"$', f'admin_socket = "{out / "admin.sock"}"', toml)
    (out / "ingress.toml").write_text(toml)


@pytest.fixture
def lab() -> Iterator[Lab]:
    _require("needs root (network namespaces, keepalived)", os.geteuid() == 0)
    _require("`ip netns` is unavailable here", shutil.which("ip") is not None and _ip_netns_works())
    _require("keepalived is not installed (apt-get install keepalived)", bool(keepalived_binary()))
    _sweep_stale()
    # World-readable (0755): keepalived's script user reads the configuration.
    # Not under tmp_path: its parents are 0700, and keepalived's script user
    # reads the configuration. Removed below, or by a later run's sweep.
    home = Path(tempfile.mkdtemp(prefix=f"{_lab_tag()}-", dir="/tmp"))
    home.chmod(0o755)
    lab = Lab(home)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(150)
def test_the_address_moves_when_the_active_host_fails_and_stays_when_it_returns(
    lab: Lab,
) -> None:
    ca = trustme.CA()
    ca_file = lab.home / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    user = script_user()
    for role in HOSTS:
        render_host(lab.home, role, ca, user)
        # The file keepalived runs is the one init wrote, unchanged.
        assert f"script_user {user}" in (lab.home / role / "keepalived.conf").read_text()

    helper = [sys.executable, str(ROLES)]
    serving = [*helper, "fleet", FLEETS_IP, str(FLEET_PORT), str(LIFETIME)]
    fleet = lab.start("fleet", "fleets", serving, read_lines=True)
    until(lab, "the simulated fleet listens", lambda: "ready" in fleet.lines, 20)
    ingress = {role: lab.ingress(role) for role in HOSTS}
    for role in HOSTS:
        until(lab, f"ingress {role} is live", lambda role=role: lab.live(role), LIVE_WAIT)
    # As docs/INSTALL.md says: A first; it takes the address once its check has
    # passed and no other host advertises (the master-down interval), then B.
    keepalived = {"a": lab.keepalived("a")}
    until(lab, f"host a holds {VIP}", lambda: lab.holds_vip("a"), 20)
    keepalived["b"] = lab.keepalived("b")
    until(lab, "keepalived b is BACKUP", lambda: _backups(keepalived["b"]) > 0, 15)
    assert lab.holder() == "a"
    # A check pointed at the shared address itself would pass on the backup (host a
    # answers it): it must see that the address is not the backup's.
    for role, live in (("a", True), ("b", False)):
        done = lab.check_live_at(role, f"{VIP}:443")
        assert (done.returncode == 0) is live, done
    assert "not an address of this host" in done.stdout

    calling = [*helper, "carrier", f"wss://{VIP}", str(ca_file), str(LIFETIME)]
    carrier = lab.start("carrier", "carrier", calling, read_lines=True)
    until(lab, "calls through a succeed", lambda: first_success_after(carrier, 0) is not None, 20)

    # 1. The active host's ingress dies outright.
    t = time.monotonic()
    ingress["a"].popen.send_signal(signal.SIGKILL)
    until(lab, f"host b holds {VIP}", lambda: lab.holder() == "b", 10)
    until(lab, "a new call succeeds", lambda: first_success_after(carrier, t) is not None, 10)
    recovered = first_success_after(carrier, t)
    assert recovered is not None and recovered - t <= FAILOVER_BUDGET, (recovered, t, lab.logs())
    print(f"ingress SIGKILLed: new calls succeed again after {recovered - t:.1f} s")

    # 2. It comes back: keepalived on a sees it live again, and the address stays on b.
    backups = _backups(keepalived["a"])
    ingress["a"] = lab.ingress("a")
    until(lab, "ingress a is live again", lambda: lab.live("a"), LIVE_WAIT)
    until(lab, "keepalived a is BACKUP again", lambda: _backups(keepalived["a"]) > backups, 10)
    t = time.monotonic()
    time.sleep(HOLD)
    assert lab.holder() == "b", lab.logs()
    assert failed_since(carrier, t) == [], lab.logs()  # nothing was cut or refused meanwhile

    # 3. keepalived stops on the active host (b): a takes the address. The calls
    # b holds are cut (a resets their packets); b ends them once the address has
    # left it for a second, freeing their fleet workers for the redials (before:
    # at tcp_user_timeout, 20 s; the pair audit of session 37).
    holding = [*helper, "hold", f"wss://{VIP}", str(ca_file), str(HELD), str(LIFETIME)]
    held = lab.start("held", "carrier", holding, read_lines=True)
    until(lab, "the held calls are up", lambda: len(_held(held, "up")) == HELD, 15)
    time.sleep(CHECK_PERIOD + 0.3)  # b's look has seen the address (one never seen is not judged)
    t, wall = time.monotonic(), time.time()
    lab.stop(keepalived["b"])
    until(lab, f"host a holds {VIP}", lambda: lab.holder() == "a", 10)
    until(lab, "b ends the held calls", lambda: len(_ended_on(ingress["b"], VIP)) == HELD, 8)
    freed = max(_ended_on(ingress["b"], VIP)) - wall
    assert freed <= ENDED_BUDGET, (freed, lab.logs())
    print(f"keepalived stopped: the old host ended its {HELD} cut calls {freed:.1f} s after")
    until(lab, "a new call succeeds", lambda: first_success_after(carrier, t) is not None, 10)
    recovered = first_success_after(carrier, t)
    assert recovered is not None and recovered - t <= FAILOVER_BUDGET, (recovered, t, lab.logs())
    print(f"keepalived stopped: new calls succeed again after {recovered - t:.1f} s")

    # 4. keepalived comes back on b: the address stays on a.
    keepalived["b"] = lab.keepalived("b")
    until(lab, "keepalived b is BACKUP", lambda: _backups(keepalived["b"]) > 0, 15)
    t = time.monotonic()
    time.sleep(HOLD)
    assert lab.holder() == "a", lab.logs()
    assert failed_since(carrier, t) == [], lab.logs()


def _held(held: Proc, what: str) -> list[float]:
    return [line[what] for line in map(json.loads, list(held.lines)) if what in line]


def _ended_on(ingress: Proc, address: str, bots: str = "held-") -> list[float]:
    """When (wall clock) the host's calls of `bots` ended for having lost `address`
    (a short call in flight at the move may be among them too)."""
    ended = []
    for text in ingress.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(text)
            detail = line.get("detail") or ""
            if (
                line.get("end_reason") == "carrier_lost"
                and f"address {address} " in detail
                and str(line.get("bot_id")).startswith(bots)
            ):
                stamp = datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
                ended.append(stamp.timestamp())
    return ended


def _backups(keepalived: Proc) -> int:
    """How often this keepalived has entered BACKUP (its log, which it writes anew on start)."""
    try:
        return keepalived.log.read_text(errors="replace").count("Entering BACKUP STATE")
    except OSError:
        return 0


@pytest.mark.timeout(120)
def test_an_ipv6_shared_address_is_held_by_one_host_at_a_time_and_moves(lab: Lab) -> None:
    """`init --vip` with an IPv6 address (and --source): before, keepalived sent
    its adverts from the link-local address, which the other host's
    unicast_peer does not name, and both hosts held the address at once (the
    IPv6 audit of session 14); and the ingress listened on IPv4 only."""
    ca = trustme.CA()
    ca_file = lab.home / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    user = script_user()
    for role in HOSTS:
        render_host(lab.home, role, ca, user, ipv6=True)
    helper = [sys.executable, str(ROLES)]
    serving = [*helper, "fleet", FLEETS_IP, str(FLEET_PORT), str(LIFETIME)]
    fleet = lab.start("fleet", "fleets", serving, read_lines=True)
    until(lab, "the simulated fleet listens", lambda: "ready" in fleet.lines, 20)
    for role in HOSTS:
        lab.ingress(role)
    for role in HOSTS:
        until(lab, f"ingress {role} is live", lambda role=role: lab.live(role), LIVE_WAIT)
    keepalived = {"a": lab.keepalived("a")}
    until(lab, f"host a holds {VIP6}", lambda: lab.holds_vip("a", VIP6), 20)
    keepalived["b"] = lab.keepalived("b")
    until(lab, "keepalived b is BACKUP", lambda: _backups(keepalived["b"]) > 0, 15)
    deadline = time.monotonic() + HOLD  # past the master-down interval: b stays BACKUP
    while time.monotonic() < deadline:
        assert lab.holder(VIP6) == "a", lab.logs()  # never both
        time.sleep(0.2)

    calling = [*helper, "carrier", f"wss://[{VIP6}]", str(ca_file), str(LIFETIME)]
    carrier = lab.start("carrier", "carrier", calling, read_lines=True)
    until(lab, "calls over IPv6 succeed", lambda: first_success_after(carrier, 0) is not None, 20)

    t = time.monotonic()
    lab.stop(keepalived["a"])
    until(lab, f"host b holds {VIP6}", lambda: lab.holder(VIP6) == "b", 10)
    until(lab, "a new call succeeds", lambda: first_success_after(carrier, t) is not None, 10)
