"""A systemd of a test's own: the Debian package's `/lib/systemd/systemd`
booted as PID 1 of new PID, mount and cgroup namespaces, in a cgroup made
for it, with no unit but those the test installs. The shipped unit file then
runs under the real service manager (Type=notify, the watchdog, KillMode=,
Restart=, ExecReload=), the way operators run the ingress.

It starts nothing of the host's: SYSTEMD_UNIT_PATH names one directory of
the test's, and the target it boots into pulls in no other unit (no
sysinit.target, so no tmpfiles cleaning /tmp, no journald). /run is a tmpfs
of its own. The network namespace is the host's: its units listen on
loopback like any test's process. Killing PID 1 ends every process in the
namespace; the cgroups made are removed after.

Needs root and the `systemd` package (the tests that use it fail without
either under CI, as the network-namespace tests do)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")

TARGET = """\
[Unit]
Description=what a test's systemd boots into: nothing but the units it starts
DefaultDependencies=no
"""

# What a service's default dependencies (Requires=sysinit.target, After=
# basic.target, Conflicts=shutdown.target) and a network service's ordering
# name, each standing in for the real one as reached at once: nothing of the
# host's is set up or waited for.
STAND_INS = (
    "sysinit.target",
    "basic.target",
    "shutdown.target",
    "network.target",
    "network-online.target",
    "time-sync.target",
)
STAND_IN = """\
[Unit]
Description=reached at once in a test's systemd
DefaultDependencies=no
"""

# Stage one: into a cgroup of its own (made by the caller), so that the
# cgroup namespace made next shows systemd that cgroup as the root of its tree.
# Stage two, inside the namespaces: a private /run, the cgroup2 tree mounted
# where systemd looks for it, the host's network namespace kept at HOST_NETNS
# for the units to join, then systemd itself as PID 1 in a network namespace
# of its own: as it boots it raises net.unix.max_dgram_qlen (10 -> 512), a
# sysctl of the network namespace, which must not change on the host (nothing
# a test does may change the host; test_sdnotify reads the value, which a host
# booted by systemd has at 512 already). Its own UTS and IPC namespaces too:
# nothing it sets there reaches the host.
HOST_NETNS = "/run/host-netns"
# Also in its mount namespace, so that nothing it does at boot reaches the host:
# /etc read-only (with an empty machine-id it would write one there), /proc/sys
# read-only (it raises fs.file-max, a sysctl of the whole machine), its console
# a file of the test's (it writes to /dev/console) and /dev/tty0 /dev/null (it
# asks the kernel for the keyboard-request signal there). The outer process is
# killed with the test's (PR_SET_PDEATHSIG), and systemd with it (--kill-child):
# a test process killed outright leaves no systemd running.
BOOT = f"""\
set -e
echo $$ > "$1/cgroup.procs"
exec setpriv --pdeathsig KILL \\
    unshare --mount --pid --cgroup --uts --ipc --fork --kill-child --mount-proc \\
    --propagation private sh -c '
set -e
mount -t tmpfs -o mode=755 tmpfs /run
touch {HOST_NETNS}
mount --bind /proc/self/ns/net {HOST_NETNS}
umount -R /sys/fs/cgroup 2>/dev/null || true
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /etc /etc
mount -o remount,bind,ro /etc
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
touch "$1/console.log"
mount --bind "$1/console.log" /dev/console
if [ -e /dev/tty0 ]; then mount --bind /dev/null /dev/tty0; fi
exec unshare --net "$0" --system --unit=fleet-test.target --log-target=console --log-level=info
' "$2" "$3"
"""
# What a unit that must be reached from the test (on the host's loopback) adds.
JOIN_HOST_NETWORK = f"NetworkNamespacePath={HOST_NETNS}"


def unavailable() -> str | None:
    """Why a private systemd cannot run here, or None."""
    if os.geteuid() != 0:
        return "booting a private systemd needs root"
    if not SYSTEMD.exists() or shutil.which("systemctl") is None:
        return "no systemd here (apt-get install systemd)"
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy mounted"
    return None


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "cgroup2":
                return Path(fields[4])
    return None


class PrivateSystemd:
    """One booted systemd; `systemctl(...)` runs systemctl inside its namespaces.

    Pids it reports (MainPID, ...) are those of its PID namespace; `host_pid`
    turns one into the pid this test sees."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fi-systemd-"))
        self.units = self.home / "units"
        self.units.mkdir()
        (self.units / "fleet-test.target").write_text(TARGET)
        for name in STAND_INS:
            (self.units / name).write_text(STAND_IN)
        root = _cgroup2_mount()
        assert root is not None
        self.cgroup = root / f"fleet-test-{os.getpid()}-{time.monotonic_ns()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0  # systemd's pid as this test sees it

    def boot(self, timeout: float = 30) -> None:
        self.cgroup.mkdir()
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "container": "fleet-test",  # what systemd checks to behave as in a container
            "SYSTEMD_UNIT_PATH": str(self.units),
        }
        self.proc = subprocess.Popen(
            ["sh", "-c", BOOT, "boot", str(self.cgroup), str(SYSTEMD), str(self.home)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=(self.home / "systemd.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pid1 = self._find_pid1()
            if self.pid1:
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (self.home / "systemd.log").read_text(errors="replace")[-2000:]
        self.shutdown()
        raise RuntimeError(f"the private systemd did not come up in {timeout} s: {log}")

    def _find_pid1(self) -> int:
        procs = self.cgroup / "init.scope" / "cgroup.procs"
        if not procs.exists():
            return 0
        pids = procs.read_text().split()
        return int(pids[0]) if pids else 0

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "systemctl", "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"systemctl {' '.join(args)}: {done.returncode} {done.stderr}")
        return done

    def systemctl_in_background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "systemctl", "--no-pager", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def show(self, unit: str, *names: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={n}" for n in names)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def host_pid(self, pid: int) -> int:
        """The pid this test sees for `pid` of systemd's namespace (0: none)."""
        for entry in self.cgroup.rglob("cgroup.procs"):
            for host in entry.read_text().split():
                try:
                    status = Path(f"/proc/{host}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == str(pid):
                        return int(host)
        return 0

    def processes(self, unit: str) -> list[int]:
        """Host pids of every process in `unit`'s cgroup."""
        found = []
        for entry in (self.cgroup / "system.slice" / unit).rglob("cgroup.procs"):
            found += [int(p) for p in entry.read_text().split()]
        return found

    def shutdown(self) -> None:
        """Kill PID 1 (the kernel then kills every process of its namespace),
        remove the cgroups and files made."""
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self.cgroup.exists() and time.monotonic() < deadline:
            for d in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                self.cgroup.rmdir()
            except OSError:
                time.sleep(0.05)
        shutil.rmtree(self.home, ignore_errors=True)
