"""The pieces of `fleet-ingress upgrade` (SIGUSR2) that are no step of its
sequence (`service.upgrade_sequence`; SPEC 13; docs/WORKERS.md "Upgrade: the
sequence").

- `trial_run`: before re-executing, the code installed now is started in a
  child process (every module of the package imported, then `check -c
  CONFIG`), judged by its progress (`TrialProgress`). An `execve` of a broken
  install would take the supervisor, and with it the service, down; a failed
  trial costs nothing.
- The supervisor's state over the exec: what is not in the kernel's sockets
  (the fleets' health, capacity estimate and admin states, the counters that
  must not reset, the workers' last reports, the generation and the upgrade's
  own status) goes as JSON in an inherited memfd named in
  `FLEET_INGRESS_UPGRADE_STATE`, read once and closed by the new image.
  That includes the head of a line a worker was sending, read by the old
  image from a channel it handed over (`unread_to_json`): the new image reads
  it before the rest, so no message is cut in two by the exec.
- `AdoptedProcess`: a worker started by the previous image. This process is
  still its parent (same PID), but the event loop's child watcher never
  heard of it: it is waited for through a pidfd and reaped with `waitpid`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import operator
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from fleet_ingress.config.check_report import WARNING, shortened
from fleet_ingress.config.settings import (
    ConfigError,
    IngressConfig,
    config_from_json,
    config_to_json,
)
from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.net.late_timers import PatientDeadline
from fleet_ingress.net.slot_wire import WireError, spec_from_wire, spec_to_wire
from fleet_ingress.net.tls import CarrierPem
from fleet_ingress.ops.json_in_turns import dumps_in_turns
from fleet_ingress.service.carrier_certificate import pem_from_json, pem_to_json
from fleet_ingress.service.reexec_steps import UPGRADE_STATE

__all__ = ["UPGRADE_STATE"]  # the name the state's descriptor is passed under, said here too

# After a re-execution, the new image reads the config, the fleets file and the
# certificates again every REEXEC_READ_EVERY seconds for REEXEC_READ_PATIENCE
# when they cannot be read (or list no fleet): one caught half-written by an
# editor, a `cp` or config management must not end the host (cli._run).
REEXEC_READ_PATIENCE = 10.0
REEXEC_READ_EVERY = 0.2

STATE_VERSION = 1
# The trial is judged by its own CPU time (/proc), not the wall clock: niced
# (TRIAL_NICE) on a busy host it waits for what the calls leave, and a wall
# bound refused sound installs there (the upgrade audit of session 45: 0.38 s
# of CPU with the install's .pyc files, 0.62 s with the package compiled from
# source, 1.3 s with nothing compiled; beside a busy loop on each of 2 cores
# 27-41 s of wall time for 0.65-1.0 s of CPU, 3.7 s un-niced; session 44 saw
# 92 s beside the upgrade tests).
# More CPU than TRIAL_CPU_LIMIT: the install spins (an import in a loop).
TRIAL_CPU_LIMIT = 30.0
# No CPU at all for TRIAL_STALL_LIMIT: it waits on something that does not come
# (a lock, a hung mount, a resolver that never answers); a niced process on a
# busy host still gets its share (a few ms a second at load 50). Its check asks
# neither the fleets' names nor this supervisor (cli.CHECK_TRIAL_ARGUMENT); an
# installed release before that asks both, 2 s each at most.
TRIAL_STALL_LIMIT = 60.0
# Whatever its progress, a trial still running after this is given up: the
# host cannot spare it a second of CPU in ten minutes.
TRIAL_WALL_LIMIT = 600.0
# How often its CPU time is read, and its progress told (the log, `upgrade`).
TRIAL_POLL = 1.0
TRIAL_SAY_EVERY = 15.0
# The trial run's niceness: calls first (it is a check, not a server).
TRIAL_NICE = 10
# What of the trial's output goes into the error `upgrade` prints.
TRIAL_OUTPUT_LINES = 8

# The trial: what `python -m fleet_ingress worker` and `run` will import, all
# of it (a syntax error in any module shows here), then `check -c CONFIG`.
_TRIAL = """\
import importlib, os, pkgutil, runpy, signal, sys
# `systemctl kill -s USR2|HUP` signals every process of the unit, this one too.
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
# Behind the running workers for the CPU: its imports and check took 2-5 s of a
# core from them on a busy host, their calls' frames up to 0.3 s late (the jitter
# audit of session 23). Niced, it waits for what their calls leave.
# A sandbox that refuses setpriority (the shipped unit allows it, for this) leaves
# it at the workers' priority: an upgrade is not worth refusing for that.
try:
    os.nice(TRIAL_NICE)
except OSError:
    pass
import uvloop
import fleet_ingress
from fleet_ingress.service import upgrade
# The new image reads the state this (old) image writes: same format, or no exec.
running = int(os.environ.pop("FLEET_INGRESS_STATE_VERSION"))  # not a config key
installed = getattr(upgrade, "STATE_VERSION", None)
def cannot_take_over(why):
    print(CANNOT_TAKE_OVER + why, flush=True)
    sys.exit(CANNOT_TAKE_OVER_EXIT)
if installed != running:
    cannot_take_over(
        f"the installed release keeps the supervisor's state over an upgrade in format "
        f"{installed}, the running one in format {running}: this release cannot take over "
        "by `upgrade`; restart the service instead (systemctl restart fleet-ingress)"
    )
# Its supervisor takes over the running workers' channels: one that cuts a
# channel on an op it does not know (before net.slot_wire.UnknownOps) would
# drop every running call's slot at the first op this release's workers send.
from fleet_ingress.net import slot_wire
if not hasattr(slot_wire, "UnknownOps"):
    cannot_take_over(
        "the installed release's supervisor cuts a worker's channel on a message it "
        "does not know, and the running workers send some: this release cannot take "
        "over by `upgrade`; restart the service instead (systemctl restart fleet-ingress)"
    )
for module in pkgutil.walk_packages(fleet_ingress.__path__, "fleet_ingress."):
    if module.name != "fleet_ingress.__main__":  # that one runs: below
        importlib.import_module(module.name)
# The workers' call tables it reads (their record sizes): an exec hands over
# those alone, the others closed by it (a release before the tables would
# keep them open, and inherited by its own execs, read by nothing).
try:
    from fleet_ingress.core import call_table
except ImportError:
    table_sizes = []
else:
    table_sizes = sorted(getattr(call_table, "LAYOUTS", None) or [call_table.RECORD_SIZE])
print(CALL_TABLES + " ".join(map(str, table_sizes)), flush=True)
print(CODE_IMPORTED, flush=True)
# Not asked by the trial: the running supervisor (the trial's environment is
# its own, handed down) and the fleets' names (the resolver), each up to 2 s,
# said as warnings it does not read; a release before the argument asks both.
trial_argument = getattr(sys.modules.get("fleet_ingress.cli"), "CHECK_TRIAL_ARGUMENT", None)
sys.argv = ["fleet-ingress", "check", "-c", sys.argv[1], *([trial_argument] * bool(trial_argument))]
runpy.run_module("fleet_ingress", run_name="__main__", alter_sys=True)
"""

# What the trial prints once the installed code is imported, before it checks the
# config: a failure after it is the configuration's, not the installation's.
TRIAL_CODE_IMPORTED = "fleet-ingress trial: the installed code imports"
# What it prints before the reason the installed release cannot take over from
# the running one at all (not a broken install, not the configuration).
TRIAL_CANNOT_TAKE_OVER = "fleet-ingress trial: cannot take over: "
TRIAL_CANNOT_TAKE_OVER_EXIT = 3
# What it prints before the record sizes of the call tables the installed code
# reads (`core.call_table.LAYOUTS`; none: a release before the tables).
TRIAL_CALL_TABLES = "fleet-ingress trial: call tables of record sizes: "
_TRIAL = (
    f"CODE_IMPORTED = {TRIAL_CODE_IMPORTED!r}\n"
    f"CALL_TABLES = {TRIAL_CALL_TABLES!r}\n"
    f"CANNOT_TAKE_OVER = {TRIAL_CANNOT_TAKE_OVER!r}\n"
    f"CANNOT_TAKE_OVER_EXIT = {TRIAL_CANNOT_TAKE_OVER_EXIT}\n"
    f"TRIAL_NICE = {TRIAL_NICE}\n" + _TRIAL
)

# Environment the trial must not see: only the main PID speaks to systemd,
# and the listeners are not its to claim.
_NOT_FOR_TRIAL = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "FLEET_INGRESS_LISTEN_FDS")


class TrialPassed(NamedTuple):
    """What a trial run that passed said: `check`'s last line, and the record
    sizes of the call tables the installed code reads (None: the trial did
    not say, as this release's always does)."""

    checked: str
    table_sizes: frozenset[int] | None


class TrialFailed(Exception):
    """The installed code cannot serve; the message names what failed and the fix.
    `cause`: "files", the configuration or fleets file failed the installed
    `check` (the code is sound: not an install to fix or put back); "release",
    the installed release cannot take over from the running one by `upgrade`
    (a restart can); None, the install's."""

    def __init__(self, message: str, *, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class TrialProgress:
    """The verdict on a trial run as it runs, from its CPU time read every
    TRIAL_POLL (I/O-free: given the wall time passed and the CPU time read).
    A sound install needs about a second of CPU however long the host makes
    it wait for one; what it is refused for is spinning (TRIAL_CPU_LIMIT),
    waiting on nothing that comes (no CPU at all for TRIAL_STALL_LIMIT), or,
    whatever its progress, TRIAL_WALL_LIMIT."""

    def __init__(
        self,
        *,
        cpu_limit: float = TRIAL_CPU_LIMIT,
        stall_limit: float = TRIAL_STALL_LIMIT,
        wall_limit: float = TRIAL_WALL_LIMIT,
    ) -> None:
        self.cpu_limit = cpu_limit
        self.stall_limit = stall_limit
        self.wall_limit = wall_limit
        self.wall = 0.0  # seconds it has run
        self.cpu = 0.0  # seconds of CPU it used
        self.idle = 0.0  # seconds since its CPU time last grew

    def observe(self, step: float, cpu: float) -> str | None:
        """`step` seconds more, `cpu` seconds of CPU used by now: why it is
        given up (what to say after "the trial run "), or None."""
        self.wall += step
        if cpu > self.cpu:
            self.cpu, self.idle = cpu, 0.0
        else:
            self.idle += step
        if self.cpu > self.cpu_limit:
            return (
                f"used {self.cpu:.1f}s of CPU, more than the {self.cpu_limit:g}s it may "
                "(a sound install needs about a second): it spins"
            )
        if self.idle >= self.stall_limit:
            return (
                f"used no CPU for {self.idle:.0f}s ({self.cpu:.1f}s in all): it waits on "
                "something that does not come"
            )
        if self.wall >= self.wall_limit:
            return (
                f"did not finish within {self.wall_limit:g}s ({self.cpu:.1f}s of CPU used: "
                "the host left it little)"
            )
        return None

    def said(self) -> dict[str, float]:
        """Its progress as the upgrade's status carries it (`upgrade` prints it)."""
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 2)}


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_used(pid: int) -> float | None:
    """Seconds of CPU process `pid` and the children it reaped used (/proc's
    utime, stime, cutime, cstime); None when there is no such process."""
    fields = _proc_stat(pid)
    if len(fields) <= 14:
        return None
    return sum(int(tick) for tick in fields[11:15]) / _CLOCK_TICKS


async def trial_run(
    config_path: Path,
    *,
    cpu_limit: float = TRIAL_CPU_LIMIT,
    stall_limit: float = TRIAL_STALL_LIMIT,
    wall_limit: float = TRIAL_WALL_LIMIT,
    progress: Callable[[TrialProgress], object] | None = None,
) -> TrialPassed:
    """Run the code installed now (`sys.executable`, this environment) the way
    the re-executed supervisor and its workers will: returns what `check`
    said and the call tables it reads, or raises TrialFailed. Judged by
    `TrialProgress` with these limits, told to `progress` at each reading of
    its CPU time."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_TRIAL}
    env["FLEET_INGRESS_STATE_VERSION"] = str(STATE_VERSION)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _TRIAL,
        str(config_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    judge = TrialProgress(cpu_limit=cpu_limit, stall_limit=stall_limit, wall_limit=wall_limit)
    answered = asyncio.ensure_future(proc.communicate())
    loop = asyncio.get_running_loop()
    last = loop.time()
    try:
        while not answered.done():
            await asyncio.wait((answered,), timeout=TRIAL_POLL)
            if answered.done():
                continue  # it ended: its output is read
            # None: it ended and was reaped, yet its output is not closed (a
            # process it started holds it): judged on, as using no CPU.
            ended = (cpu := cpu_used(proc.pid)) is None
            if ended:
                cpu = judge.cpu
            now = loop.time()
            step, last = now - last, now
            # This process did not run meanwhile (a paused VM, a stopped
            # supervisor): neither did the trial's judge; that time is not the
            # trial's, and the pipe is read before it is judged again.
            stalled = step > TRIAL_POLL + 1.0
            why = judge.observe(TRIAL_POLL if stalled else step, cpu)
            if progress is not None:
                progress(judge)
            if why is not None and not stalled:
                if ended:
                    why += " (it exited, but a process it started holds its output open)"
                raise TrialFailed(
                    f"the installed code's trial run ({sys.executable} importing fleet_ingress "
                    f"and checking {config_path}) {why}; abandoned, the running generation "
                    f"serves on: run `fleet-ingress check -c {config_path}` by hand (it "
                    "takes a second or two of CPU) to see what holds it, then `fleet-ingress "
                    "upgrade` again"
                )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        answered.cancel()
        await proc.wait()
        # Its output's pipe is closed now, not by the garbage collector: once a
        # process it started holds it open (or before its EOF is read), uvloop
        # left it to GC, "unclosed resource <ReadUnixTransport>" or "Event loop is
        # closed" logged from wherever that ran. asyncio.subprocess.Process keeps
        # its transport private; closing it closes the pipes it made.
        proc._transport.close()  # type: ignore[attr-defined]
        raise
    output, _ = answered.result()
    lines = output.decode("utf-8", "replace").strip().splitlines()
    imported = TRIAL_CODE_IMPORTED in lines
    table_sizes = _table_sizes(lines[: lines.index(TRIAL_CODE_IMPORTED)] if imported else [])
    # Only where the trial says it (exit 3, before the imports: not what check printed).
    said = [line for line in lines if line.startswith(TRIAL_CANNOT_TAKE_OVER)]
    if proc.returncode == TRIAL_CANNOT_TAKE_OVER_EXIT and said and not imported:
        raise TrialFailed(
            said[-1].removeprefix(TRIAL_CANNOT_TAKE_OVER)
            + " (nothing was handed over; the running generation serves on)",
            cause="release",
        )
    if imported:
        lines = lines[lines.index(TRIAL_CODE_IMPORTED) + 1 :]
    # A traceback after the imports is the installed check's own crash: the install's.
    crashed = any(line.startswith("Traceback") for line in lines)
    if proc.returncode != 0 and imported and not crashed:
        tail = shortened(lines, TRIAL_OUTPUT_LINES, config_path)
        problems = [
            line
            for line in lines
            if not line.startswith((WARNING, "check failed:")) and not line.startswith("OK:")
        ]
        # The certificate alone (a renewal gone wrong): a restart serves on the one
        # in use over it, as the unit's `check --before-start` leaves it to the start.
        # Said "a restart would fail the same way" before (the renewal audit of
        # session 38).
        # Imported here: workers import this module (REEXEC_READ_PATIENCE) and must
        # not load aiohttp, which config.check brings (its probes).
        from fleet_ingress.config.check import (
            CERTIFICATE_CANNOT_LOAD,
            CERTIFICATE_CHAIN_DOUBTED,
            certificate_alone,
        )

        alone = await asyncio.to_thread(certificate_alone, config_path, problems)
        then = {
            CERTIFICATE_CANNOT_LOAD: "refuses to start with these files",
            CERTIFICATE_CHAIN_DOUBTED: "serves this one, which carriers may fail to verify",
        }.get(alone or "")
        if then is not None:
            raise TrialFailed(
                f"the configuration does not pass `fleet-ingress check -c {config_path}` with "
                f"the installed code (exit {proc.returncode}):\n{tail}\n"
                "the installed code is sound, the carrier certificate on disk is not: put a "
                "good certificate in place and reload (`systemctl reload fleet-ingress`), "
                "then run `fleet-ingress upgrade` again (nothing was handed over; the "
                "running generation serves on, with the certificate in use). Until then a "
                "restart serves on the certificate in use (systemd keeps it), but a stop then "
                f"a start, or a reboot, {then}",
                cause="files",
            )
        raise TrialFailed(
            f"the configuration does not pass `fleet-ingress check -c {config_path}` with "
            f"the installed code (exit {proc.returncode}):\n{tail}\n"
            "the installed code itself imports: fix what check names, then run "
            "`fleet-ingress upgrade` again (nothing was handed over; the running "
            "generation serves on). Until then a restart would start the installed "
            "code and fail the same way",
            cause="files",
        )
    if proc.returncode != 0:
        tail = "\n".join(lines[-TRIAL_OUTPUT_LINES:])
        raise TrialFailed(
            f"the installed code failed its trial run (exit {proc.returncode}; {sys.executable} "
            f"importing fleet_ingress and checking {config_path}):\n{tail}\n"
            "the installed code does not import: reinstall from the release's source, "
            f"`{Path(sys.executable).parent / 'pip'} install $SRC` (docs/INSTALL.md section "
            "9; never by the bare name from a package index), then run `fleet-ingress "
            "upgrade` again (nothing was handed over; the running generation serves on). "
            "Do it now: a worker that dies meanwhile is replaced from the installed code, "
            "which fails the same way, and the host serves with a worker fewer (`fleet-ingress "
            "stat`: WORKERS MISSING)"
        )
    return TrialPassed(lines[-1] if lines else "", table_sizes)


def _table_sizes(lines: list[str]) -> frozenset[int] | None:
    """The record sizes the trial said the installed code's call tables have."""
    said = [line for line in lines if line.startswith(TRIAL_CALL_TABLES)]
    if not said:
        return None
    words = said[-1].removeprefix(TRIAL_CALL_TABLES).split()
    return frozenset(int(word) for word in words if word.isdecimal())


# -- the supervisor's state over the exec -----------------------------------------


def state_to_json(state: Mapping[str, Any]) -> bytes:
    """The supervisor's state as the next image reads it (`state_from_json`):
    over an upgrade's exec (`state_fd`) or after a crash (`fd_store.CrashSnapshot`)."""
    return json.dumps({"version": STATE_VERSION, **state}).encode()


async def state_to_json_in_turns(state: Mapping[str, Any]) -> bytes:
    """state_to_json(state), byte for byte, encoded in turns (`dumps_in_turns`):
    the every-second crash snapshot, 4-5 ms of encoding in one piece at 500
    fleets (the supervisor's scale audit of session 34). The state is taken
    whole before (`CrashSnapshot.write_in_turns`)."""
    return (await dumps_in_turns({"version": STATE_VERSION, **state})).encode()


def state_from_json(data: bytes) -> dict[str, Any]:
    """`state_to_json`'s state. Raises ValueError when it is not JSON, or of a
    release whose state this one does not understand."""
    state = json.loads(data)
    version = state.get("version") if isinstance(state, dict) else None
    if version != STATE_VERSION:
        raise ValueError(f"state version {version!r} not understood")
    return state  # type: ignore[no-any-return]


def state_fd(state: Mapping[str, Any]) -> int:
    """A memfd holding `state` as JSON, inheritable, at offset 0: name it in
    the exec's environment as `UPGRADE_STATE`."""
    fd = os.memfd_create("fleet-ingress-upgrade", 0)  # no MFD_CLOEXEC: it goes over the exec
    try:
        data = memoryview(state_to_json(state))
        while data:
            data = data[os.write(fd, data) :]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_state(environ: MutableMapping[str, str] | None = None) -> dict[str, Any] | None:
    """The state the previous image left (then the fd is closed and the
    variable unset), or None when this is a first start."""
    env = os.environ if environ is None else environ
    value = env.pop(UPGRADE_STATE, None)
    if value is None:
        return None
    try:
        fd = int(value)
    except ValueError:
        raise ValueError(f"{UPGRADE_STATE}={value!r} is not a descriptor") from None
    try:
        with os.fdopen(fd, "rb") as f:
            return state_from_json(f.read())
    except (OSError, json.JSONDecodeError) as exc:
        why = f"{UPGRADE_STATE}: the previous image's state is unreadable: {exc}"
        raise ValueError(why) from None
    except ValueError as exc:  # another release's state
        raise ValueError(f"{UPGRADE_STATE}: {exc}") from None


def _same(value: Any) -> Any:
    return value


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


# What the supervisor knows of each fleet that a fleets file cannot say: health
# and its streak, the admin state, the last capacity report and what was opened
# since, the probe counters. Each with how it is read back (an enum by name).
CARRIED_FLEET_FIELDS: dict[str, Callable[[Any], Any]] = {
    "health": Health.__getitem__,
    "health_streak": int,
    "admin": Admin.__getitem__,
    "reported_available": _int_or_none,
    "opened_total": int,
    "opened_at_probe": int,
    "last_probe_at": _same,
    "last_probe_seconds": _same,
    "probes_total": int,
    "check_failures": int,
}


# `fleets_to_json`'s keys, in order, read in one call a fleet: a getattr and a
# `_to_json` call a field took 1.2 ms at 500 fleets, a third of the crash
# snapshot's taking every second (the supervisor's scale audit of session 34).
_CARRIED_KEYS = ("name", *CARRIED_FLEET_FIELDS, "last_probe_monotonic")
_carried_values = operator.attrgetter(*_CARRIED_KEYS)
# The fields of CARRIED_FLEET_FIELDS that are enums (read back by name): written by name.
_BY_NAME = tuple(
    key
    for key, read in CARRIED_FLEET_FIELDS.items()
    if isinstance(owner := getattr(read, "__self__", None), type) and issubclass(owner, Enum)
)


def running_to_json(
    config: IngressConfig, fleets: Iterable[FleetSpec], pem: CarrierPem
) -> dict[str, Any]:
    """What an image runs, as it checked it: its configuration, the fleets its
    file lists and the certificate it serves, for the next image to serve should
    it not read the files (`running_from_json`)."""
    return {
        "config": config_to_json(config),
        "fleets": [spec_to_wire(spec) for spec in fleets],
        "pem": pem_to_json(pem),
    }


class RunningJson:
    """`running_to_json`, made again only when what it describes changed: the
    configuration and certificate by identity (a reload loads new ones and
    none is changed in place), the fleets' specs by value. At 500 fleets it
    took 0.6 ms of the crash snapshot taken every second, for what changes
    at a reload or a fleet change (the supervisor's scale audit of session 34)."""

    def __init__(self) -> None:
        self._made: tuple[IngressConfig, CarrierPem, list[FleetSpec], dict[str, Any]] | None = None

    def __call__(
        self, config: IngressConfig, fleets: list[FleetSpec], pem: CarrierPem
    ) -> dict[str, Any]:
        made = self._made
        if made is None or made[0] is not config or made[1] is not pem or made[2] != fleets:
            made = self._made = (config, pem, fleets, running_to_json(config, fleets, pem))
        return made[3]


def running_from_json(
    carried: Mapping[str, Any], *, base_dir: Path
) -> tuple[IngressConfig, list[FleetSpec], CarrierPem] | None:
    """`running_to_json`'s (configuration, fleets, certificate) from the previous
    image's state; None when it has none (an older release) or it cannot be read."""
    running = carried.get("running")
    if not isinstance(running, dict):
        return None
    try:
        config = config_from_json(running["config"], base_dir=base_dir)
        fleets = [spec_from_wire(spec) for spec in running["fleets"]]
        pem = pem_from_json(running["pem"])
    except (KeyError, TypeError, ValueError, ConfigError, WireError):
        return None
    return config, fleets, pem


def served_pem(state: Mapping[str, Any] | None) -> CarrierPem | None:
    """The certificate and key a previous process served, from its state (an
    exec's or a crash snapshot's `running`); None without one it can read."""
    running = None if state is None else state.get("running")
    if not isinstance(running, dict):
        return None
    try:
        return pem_from_json(running.get("pem"))
    except ValueError:
        return None


def fleets_to_json(fleets: Iterable[FleetState]) -> list[dict[str, Any]]:
    """Each fleet's CARRIED_FLEET_FIELDS, by its name (and its last probe's
    monotonic time, which a release before it neither sends nor needs); a fleet
    being removed (no longer in the fleets file) with its spec too, so that it
    comes back."""
    carried = []
    for f in fleets:
        entry = dict(zip(_CARRIED_KEYS, _carried_values(f), strict=True))
        for key in _BY_NAME:
            entry[key] = entry[key].name
        if f.removing:
            entry["removing"] = spec_to_wire(f.spec)
        carried.append(entry)
    return carried


def removing_specs(carried: Iterable[Mapping[str, Any]]) -> list[FleetSpec]:
    """The fleets the previous image was removing (`fleets_to_json`): the new
    image keeps them, draining, until their calls end (`FleetSet.carry_removing`).
    An entry it cannot read is left out (its calls then count against no fleet)."""
    specs = []
    for entry in carried:
        if "removing" in entry:
            try:
                specs.append(spec_from_wire(entry["removing"]))
            except WireError:
                continue
    return specs


def restore_fleets(fleets: Iterable[FleetState], carried: Iterable[Mapping[str, Any]]) -> list[str]:
    """Put the carried state back on the fleets of the same name (a fleet the
    fleets file no longer lists is not brought back). Returns the names restored."""
    by_name = {f.name: f for f in fleets}
    restored = []
    for entry in carried:
        fleet = by_name.get(str(entry.get("name")))
        if fleet is None:
            continue
        try:  # all read before any is set: a malformed entry changes nothing
            values = {key: read(entry[key]) for key, read in CARRIED_FLEET_FIELDS.items()}
            values["last_probe_monotonic"] = _probe_monotonic(entry)
        except (KeyError, TypeError, ValueError):
            continue
        for name, value in values.items():
            setattr(fleet, name, value)
        restored.append(fleet.name)
    return restored


def _probe_monotonic(entry: Mapping[str, Any]) -> float | None:
    """When the fleet's last probe ended, by CLOCK_MONOTONIC (the same after the
    exec): carried since it is kept, else (an older release) from its
    wall-clock time. A MAINT fleet is not probed again: its age must not
    fall back to the wall clock for good after an upgrade."""
    if (carried := entry.get("last_probe_monotonic")) is not None:
        return float(carried)
    if (wall := entry.get("last_probe_at")) is not None:
        return monotonic_of(float(wall))
    return None


def monotonic_of(wall: float) -> float:
    """A wall-clock time (time.time()) of this boot as CLOCK_MONOTONIC reads it:
    what an older release carried over an exec, for ages a clock step cannot move."""
    return time.monotonic() - (time.time() - wall)


def unread_to_json(unread: Mapping[str, bytes]) -> dict[str, str]:
    """Each channel's bytes read of a line not yet whole (`SlotServer.unread`),
    by its handover name: base64, as a worker's bytes need not be text."""
    return {name: base64.b64encode(data).decode("ascii") for name, data in unread.items()}


def unread_from_json(carried: Any) -> dict[str, bytes]:
    """`unread_to_json`'s bytes back. An entry that is not base64 is left out:
    that channel's line is then read from its tail, which is skipped (as from
    a release that carried nothing), not misread."""
    if not isinstance(carried, dict):
        return {}
    unread: dict[str, bytes] = {}
    for name, text in carried.items():
        if not isinstance(text, str):
            continue
        try:
            unread[str(name)] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            continue
    return unread


# -- workers started by the previous image ----------------------------------------


class AdoptedProcess:
    """A child this process did not start in this image: `wait`, `kill` and
    `returncode` as `asyncio.subprocess.Process` has them. `returncode`: the
    previous image reaped it already (its exit status read there): it is
    not looked for, its pid may be another process's by now."""

    def __init__(self, pid: int, returncode: int | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        # False once it exited when it was not this process's child (taken up
        # after the previous supervisor died: systemd reaped it): `returncode`
        # then says a kill this process sent, or 0 for "not known".
        self.status_known = True
        self._killed = False
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd: int | None = None
        if returncode is not None:
            self._set(returncode)
            return
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # reaped already: cannot be ours
            self._set(0)
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not our child (its parent died): its status is not ours
            self._close()
            self.status_known = False
            self._set(-signal.SIGKILL if self._killed else 0)
            return
        if pid == 0:
            return  # readable before the zombie is there: next time
        self._close()
        self._set(os.waitstatus_to_exitcode(status))

    def _set(self, code: int) -> None:
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)

    def _close(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None and self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, signum)

    def kill(self) -> None:
        self._killed = True
        self.send_signal(signal.SIGKILL)


def children_running() -> list[int]:
    """This process's children that have not exited (a zombie has): after an
    exec, the previous image's workers as well as this one's."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (state := process_state(int(entry))) is not None:
            if state[1] == me and state[0] != "Z":
                found.append(int(entry))
    return found


def _proc_stat(pid: int) -> list[bytes]:
    """/proc/PID/stat's fields from the state (its 3rd) on, after the process
    name (which may hold spaces and parentheses); empty when there is no such
    process (gone meanwhile)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return []


def process_state(pid: int) -> tuple[str, int] | None:
    """Process `pid`'s state letter (R, S, Z...) and its parent's pid, from
    /proc; None when there is no such process (gone meanwhile)."""
    fields = _proc_stat(pid)
    return (fields[0].decode(), int(fields[1])) if len(fields) >= 2 else None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc's starttime):
    with its pid, what tells it from a later process given the same pid. None
    when there is no such process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 else None  # starttime: the 22nd field


# After the drain's time, what a drain without a supervisor waits more at most.
DRAIN_GRACE = 5.0


def drain_children(handed: dict[str, socket.socket], drain: float) -> None:
    """The new image of an upgrade cannot build its supervisor (its files, a
    bug), and every worker carries calls: exiting now would cut them all
    (systemd kills the unit's processes once its main one is gone). Every
    socket handed over is closed, so each worker sees its channel end, stops
    accepting and drains on its own; this process waits for its children,
    `drain` + DRAIN_GRACE at most, telling systemd's watchdog it lives, then
    kills what is left (the review of session 26)."""
    from fleet_ingress.service.sdnotify import Notifier

    notifier = Notifier()
    notifier.notify("STOPPING=1", "STATUS=the upgraded supervisor could not start: draining")
    for sock in handed.values():
        sock.close()
    handed.clear()
    # Patient: workers stopped with this process (a paused VM) past the
    # deadline close their calls (1001) first; killed at once, they were cut.
    kill_at = PatientDeadline(time.monotonic() + drain + DRAIN_GRACE, 0.5, DRAIN_GRACE)
    while left := children_running():
        if kill_at.passed():
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        if notifier.watchdog_interval is not None:
            notifier.notify("WATCHDOG=1")
        time.sleep(0.5)
    notifier.close()
