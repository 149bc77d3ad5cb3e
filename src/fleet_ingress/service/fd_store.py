"""What outlives the supervisor itself: systemd's file descriptor store.

The supervisor is the unit's main process. Should it die outright (SIGKILL,
the kernel's OOM killer, a crash in native code, systemd's watchdog aborting a
stuck loop), its workers carry on with their calls, but nobody answers their
slot requests; and before this, systemd (KillMode=mixed) killed them with it:
every call on the host cut, for a bug or a kill of one process.

So the supervisor keeps in systemd's fd store (`FDSTORE=1`, the unit's
`FileDescriptorStoreMax=`) every listener it binds and its end of each
worker's slot channel, named as an upgrade's exec names them (`listen.wss`,
`worker.PID.GENERATION`: `service.listen_fds`). The unit leaves the workers be
when the main process dies (KillMode=process) and starts it again
(Restart=on-failure); systemd hands the new one the stored descriptors
(`LISTEN_FDS`, `LISTEN_FDNAMES`, from fd 3), and it takes up the listeners and
the workers the way an upgrade's new image does: the slot table is rebuilt
from what each worker says it holds, maxconn holding throughout. What only
the dead process knew comes from its last snapshot (below).

A channel the supervisor ends on purpose (a worker that broke the protocol,
one gone whose end another process holds) is taken out of the store
(`FDSTOREREMOVE=1`), or the copy there would keep it open and the worker would
not see it end. A channel that ends because its worker exited needs nothing:
systemd drops a stored socket that hangs up.

What the dead process knew goes in the store too (`CrashSnapshot`): within a
second of a change a crash restart must see, every QUIET_WRITE_EVERY (10 s)
when only counters, probe figures and worker reports moved (`keep_up`,
`service.snapshot_pace`), before answering each scrape or `stat` (no counter a
scraper saw goes back), and as an operator's change is made (a reload, a fleet change, an
upgrade's start and exec), the supervisor writes the state an upgrade's exec
carries (fleets with their health and admin state and the ones being removed,
the counters that must not reset, the last reload's outcome, the upgrades'
history, what it runs: configuration, fleets and the certificate as checked)
to one of two memfds kept there (`state.0`, `state.1`, written in turn: one
torn by the death is not read). The new process takes up the newer one it
can read, when workers were taken up with it: it serves what the dead one
served, not the files as they are (an edit no reload applied, a certificate a
reload refused, a file half written), and the counters go on. Without one (an
older release, a snapshot that cannot be read) health is probed afresh,
counters start again and the files are read.

systemd keeps the store over a `systemctl restart` too: a stop writes the
snapshots over with the certificate it served alone (`CrashSnapshot.stopped`).
The next start reads the files, but keeps serving that certificate should a
reload refuse what is on disk (a certificate expired, not valid yet or for
other names, or one that cannot load): what a reload refuses, a restart does
not put in place of one carriers accept. A
listener left there is taken up as it is, which is no crash.

The keys every worker seals its carriers' TLS session tickets with are kept
there too (`tls.tickets`, a sealed memfd: `store_ticket_keys`), with a digest
of what they were drawn for (the certificate and key, tls.min_version,
tls.profile): the process started after a death that takes up workers takes
them up too, when it serves what they were drawn for, and hands them to the
workers it starts, so that a carrier's session resumes on the workers taken
up and their replacements alike (before, it drew new ones: a redial onto a
replacement was a full handshake until the next reload, the session-ticket
audit of session 34). Missing, cut short or of another size, or drawn for
another certificate: new ones, said (`ticket_keys_taken_up`). A stop takes
them out of the store; a start that takes up no worker draws its own.

systemd answers no FDSTORE=1, and past FileDescriptorStoreMax= it closes what
it is sent, saying so in its journal alone: the supervisor counts what it keeps
there (`Notifier.kept`: what systemd handed back, carried over an exec, stored
since) against the limit (`read_store_max`, read again at each reload, which
stores again what was not kept: `Supervisor.recheck_fd_store`) and says a store
full (log, stat, `fleet_ingress_fd_store_*`). A remove the notify socket had no room for is sent
before the next message; should a name be there twice meanwhile, the newest is
used (systemd hands the store back newest first; the snapshots go by the time
they were written).

Without systemd, or with a unit whose FileDescriptorStoreMax= is 0, nothing is
kept and a supervisor that dies takes its workers' slots with it as before
(the workers drain).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_ingress.config.settings import ListenSection
from fleet_ingress.core.addresses import format_hostport, parse_hostport
from fleet_ingress.logs import fields
from fleet_ingress.net.tls import TICKET_KEYS_BYTES, CarrierPem, memfd_of
from fleet_ingress.service.carrier_certificate import pem_from_json, pem_to_json
from fleet_ingress.service.listen_fds import ListenFdsError, inherited_socket, worker_key
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.snapshot_pace import due, settled
from fleet_ingress.service.upgrade import (
    process_start,
    process_state,
    state_from_json,
    state_to_json,
    state_to_json_in_turns,
)

log = logging.getLogger("fleet_ingress.lifecycle")

SD_LISTEN_FDS_START = 3
# Listeners kept: the admin socket is not (its directory, the unit's
# RuntimeDirectory, is removed as the process dies: bound again instead).
STORED_LISTENERS = ("listen.wss", "listen.acme", "listen.stats")
# The two memfds the supervisor's state is written to in turn (`CrashSnapshot`).
SNAPSHOT_NAMES = ("state.0", "state.1")
# How often the supervisor takes it, and writes it when what a crash restart
# takes up at once moved (`CrashSnapshot.keep_up`; counters alone: every
# snapshot_pace.QUIET_WRITE_EVERY, what a death loses of them).
SNAPSHOT_EVERY = 1.0
# The sealed memfd holding the session ticket keys and what they were drawn
# for (`carrier_certificate.ticket_keys_drawn_for`, a SHA-256 digest).
TICKET_KEYS_NAME = "tls.tickets"
STORED_TICKET_KEYS_BYTES = TICKET_KEYS_BYTES + 32
# Seconds `systemctl show` has to say the unit's FileDescriptorStoreMax= (read
# in the background as the supervisor starts, where $FDSTORE does not say it,
# and at each reload).
STORE_MAX_READ = 3.0


@dataclass
class HandedBack:
    """What systemd handed a supervisor started again from its fd store."""

    sockets: dict[str, socket.socket] = field(default_factory=dict)  # listeners, channels
    snapshot: dict[str, Any] | None = None  # the newest state readable (`CrashSnapshot`)
    # After a stop (`systemctl restart`): the certificate and key served before it
    # (`CrashSnapshot.stopped`), kept should the file have expired meanwhile.
    served_before_stop: CarrierPem | None = None
    # The bytes of the session ticket keys' memfd (`store_ticket_keys`), as
    # read; None: none was handed back (or it could not be read: `unused`).
    ticket_keys: bytes | None = None
    # What was handed back and not used, why: said once logging is set up
    # (`say_unused`), which it is not yet when the store is read.
    unused: list[dict[str, str]] = field(default_factory=list)
    # Everything handed back, by name and (st_dev, st_ino): systemd keeps it
    # until removed, used or not (`Notifier.kept`: counted against its limit).
    kept: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    # Removes sent as it was taken up (a listener moved: `drop_moved_listeners`)
    # that the notify socket had no room for: the supervisor's notifier owes them.
    owed: list[str] = field(default_factory=list)

    def say_unused(self) -> None:
        for what in self.unused:
            log.warning("a descriptor from systemd's fd store is not used", extra=fields(**what))


def taken_from_store(environ: MutableMapping[str, str] | None = None) -> HandedBack:
    """The descriptors systemd handed this process from its fd store (none:
    empty): listeners and worker channels by name, and the newest snapshot of
    the dead process's state that can be read. A name given twice (a listener
    stored again by an image that did not know it was) is taken once; a
    descriptor that is not what its name says is closed and said. Unsets the
    variables, as sd_listen_fds(1) does."""
    env = os.environ if environ is None else environ
    count = env.pop("LISTEN_FDS", "")
    owner = env.pop("LISTEN_PID", "")
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    handed = HandedBack()
    if not count.isdigit() or owner != str(os.getpid()):
        return handed
    taken = handed.sockets
    snapshots: list[dict[str, Any]] = []
    for n in range(int(count)):
        fd = SD_LISTEN_FDS_START + n
        name = names[n] if n < len(names) else ""
        try:
            stat = os.fstat(fd)
            handed.kept.append((name or "stored", (stat.st_dev, stat.st_ino)))
        except OSError:
            pass
        if name in SNAPSHOT_NAMES:
            try:
                if (snapshot := _read_snapshot(fd)) is not None:
                    snapshots.append(snapshot)
            except (OSError, ValueError) as exc:
                handed.unused.append({"key": name, "error": str(exc)[:200]})
            _close(fd)
            continue
        if name == TICKET_KEYS_NAME:
            if handed.ticket_keys is None:
                try:  # one byte more than it should hold: a longer one is said too
                    handed.ticket_keys = os.pread(fd, STORED_TICKET_KEYS_BYTES + 1, 0)
                except OSError as exc:
                    handed.unused.append({"key": name, "error": str(exc)[:200]})
            _close(fd)
            continue
        try:
            channel = worker_key(name) is not None
        except ValueError:
            channel = False
            name = ""  # not one of ours
        if name in taken or not (channel or name in STORED_LISTENERS):
            _close(fd)
            continue
        try:
            taken[name] = inherited_socket(name, fd, channel=channel)
        except ListenFdsError as exc:
            handed.unused.append({"key": name, "error": str(exc)})
            _close(fd)
    if snapshots:
        # The one written last, by the host's monotonic clock, then by sequence:
        # each image numbers its own from 1, and a remove lost to a full notify
        # socket leaves an earlier image's (or a dead one's) memfds there beside
        # the new ones, most often with a higher sequence: its state was taken
        # up in place of the newer (fleets, admin states and counts gone back).
        newest = max(snapshots, key=_written_order)
        if not newest.get("stopped"):
            handed.snapshot = newest
        else:  # a stop's: nothing to take up but the certificate it served
            try:
                handed.served_before_stop = pem_from_json(newest.get("pem"))
            except ValueError as exc:
                handed.unused.append({"key": "state", "error": str(exc)[:200]})
    return handed


def _written_order(snapshot: Mapping[str, Any]) -> tuple[float, int]:
    written = snapshot.get("written_monotonic")
    when = float(written) if isinstance(written, int | float) else float("-inf")
    return when, snapshot["sequence"]


def read_store_max(
    environ: Mapping[str, str] | None = None,
    timeout: float = STORE_MAX_READ,
    *,
    now: bool = False,
) -> int | None:
    """The unit's FileDescriptorStoreMax=: $FDSTORE where systemd sets it (254
    and later), else `systemctl show` of the unit this process runs in (its
    cgroup's name); None when neither says. `now`: `systemctl show` first, as
    the limit is now: a `systemctl edit` (its daemon-reload) raises it for the
    running unit at once, and $FDSTORE stays what it was at the start.
    Blocking: run in a thread."""
    env = os.environ if environ is None else environ
    given = _digits(env.get("FDSTORE", ""))
    if given is not None and not now:
        return given
    own = _own_unit()
    if own is None:
        return given
    unit, manager = own
    try:
        done = subprocess.run(
            ["systemctl", *manager, "show", "--property=LoadState,FileDescriptorStoreMax", unit],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return given
    said = {key: value for key, _, value in (n.partition("=") for n in done.stdout.splitlines())}
    # A unit its manager has not loaded (asked of another manager than the one
    # it runs under) is shown with the defaults: FileDescriptorStoreMax=0.
    value = said.get("FileDescriptorStoreMax", "")
    if done.returncode != 0 or said.get("LoadState") != "loaded" or not value.isdigit():
        return given
    return int(value)


def _digits(value: str) -> int | None:
    return int(value) if value.isdigit() else None


def _own_unit() -> tuple[str, tuple[str, ...]] | None:
    """The service this process runs in, by its cgroup ("0::/system.slice/x.service"),
    and systemctl's option for its manager: ("--user",) for a unit of a user's
    manager ("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service")."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.rpartition(":")[2].split("/")
        for at in range(len(parts) - 1, -1, -1):
            if parts[at].endswith(".service"):
                user = any(part.startswith("user@") for part in parts[:at])
                return parts[at], ("--user",) if user else ()
    return None


def _read_snapshot(fd: int) -> dict[str, Any] | None:
    """The state in one of `CrashSnapshot`'s memfds; None when it was never
    written. Raises ValueError when it cannot be used: cut short by the death as
    it was written (torn), or of a release whose state this one does not
    understand; OSError when it cannot be read."""
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    if not data:
        return None
    state = state_from_json(data)
    if not isinstance(state.get("sequence"), int):
        raise ValueError("not a snapshot: no sequence number")
    return state


class CrashSnapshot:
    """The supervisor's state for the process systemd starts should it die:
    written (`keep_up` every SNAPSHOT_EVERY, at each scrape and operator
    change: `Supervisor.write_snapshot`) to two memfds kept in the fd store, in turn,
    so that one cut short by the death leaves the other whole; each carries a
    sequence number, and the newer one read whole is taken up. Without
    systemd's notify socket, nothing is written."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._fds: list[int] = []
        # Each state taken is numbered, in the order taken: its sequence. A
        # write in turns lands only if no state taken after it has landed.
        self._sequence = 0
        self._landed = 0  # the sequence of the last state written
        self._writes = 0  # how many were written: the memfds in turn
        # The settled part of the last state written (`snapshot_pace.settled`),
        # and when it was written: `keep_up` skips a state that moved only
        # where a crash restart may be behind.
        self._settled: bytes | None = None
        self._written_at = -math.inf

    def write(self, state: Mapping[str, Any]) -> None:
        """Write `state` (the upgrade's, `UpgradeSequence.crash_snapshot`);
        the first write stores the memfds, in place of any an earlier image of
        this process stored (before an upgrade's exec: their copies here were
        closed by it)."""
        if not self._notifier.enabled:
            return
        sequence, stamped = self._stamped(state)
        self._write(sequence, state_to_json(stamped), settled(state))

    async def write_in_turns(self, take: Callable[[], Mapping[str, Any]]) -> None:
        """`write(take())`, the state taken in one piece and encoded in turns
        (`state_to_json_in_turns`): after each scrape, and by `keep_up`.
        Dropped when a state taken after it was written meanwhile
        (a scrape's, an operator change's: `Supervisor.write_snapshot`) or the
        memfds were discarded: the snapshot is never behind what a scrape
        showed (session 33)."""
        if not self._notifier.enabled:
            return
        state = take()
        await self._write_in_turns(state, settled(state))

    async def keep_up(self, take: Callable[[], Mapping[str, Any]]) -> bool:
        """Every SNAPSHOT_EVERY: `write_in_turns`, when the state's settled
        part moved since the last write or QUIET_WRITE_EVERY has passed since
        it (`snapshot_pace`); else nothing is encoded. True when written."""
        if not self._notifier.enabled:
            return False
        state = take()
        now = settled(state)
        if not due(now, self._settled, time.monotonic() - self._written_at):
            return False
        return await self._write_in_turns(state, now)

    async def _write_in_turns(self, state: Mapping[str, Any], now: bytes | None) -> bool:
        sequence, stamped = self._stamped(state)
        data = await state_to_json_in_turns(stamped)
        if sequence <= self._landed:
            return False
        self._write(sequence, data, now)
        return True

    def _stamped(self, state: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """`state` numbered, as taken now: its sequence, and it with its
        sequence and time first."""
        self._sequence += 1
        stamped = {"sequence": self._sequence, "written_monotonic": time.monotonic(), **state}
        return self._sequence, stamped

    def _write(self, sequence: int, data: bytes, settled_part: bytes | None) -> None:
        first = not self._fds
        if first:
            self._fds = [
                os.memfd_create(f"fleet-ingress-{name}", os.MFD_CLOEXEC) for name in SNAPSHOT_NAMES
            ]
        self._landed = sequence
        self._writes += 1
        self._settled, self._written_at = settled_part, time.monotonic()
        fd = self._fds[self._writes % 2]
        os.ftruncate(fd, 0)  # cut short by a death: empty or torn, and not read
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, len(data) - len(view)) :]
        if first:
            for name, stored in zip(SNAPSHOT_NAMES, self._fds, strict=True):
                self._notifier.remove_fd(name)
                self._notifier.store_fd(name, stored)

    def descriptors(self) -> dict[str, int]:
        """The memfds by the name they are stored under (none before the first write)."""
        return dict(zip(SNAPSHOT_NAMES, self._fds, strict=True)) if self._fds else {}

    def stopped(self, served: CarrierPem) -> None:
        """At a stop: the state is written over with the certificate and key
        served (`served`) alone, both memfds, left in the store (a `systemctl
        restart` keeps it, a stop that ends takes it away). The next start
        reads the files and takes nothing up, but serves this certificate on
        should a reload refuse what is on disk (`carrier_certificate.kept_certificate`,
        `kept_over_unloadable`)."""
        for _ in SNAPSHOT_NAMES:
            self.write({"stopped": True, "pem": pem_to_json(served)})

    def discard(self) -> None:
        """Taken out of the store (a `systemctl restart` keeps it) and closed,
        when the stop's state cannot be written (`stopped`): the next start
        reads the files and keeps nothing."""
        self._landed = self._sequence  # a write in turns under way: dropped
        self._settled = None  # written again should the store take them anew
        if self._fds:
            for name in SNAPSHOT_NAMES:
                self._notifier.remove_fd(name)
        for fd in self._fds:
            _close(fd)
        self._fds = []


def store_ticket_keys(notifier: Notifier, keys: bytes, drawn_for: bytes) -> None:
    """Keep the session ticket keys every worker is handed, and what they were
    drawn for, in the fd store (a sealed memfd, `TICKET_KEYS_NAME`), in place
    of any kept before (other keys, an earlier image's): a supervisor started
    again after this one died takes them up (`ticket_keys_taken_up`). Without
    systemd's notify socket, nothing is kept. OSError: no memfd could be made."""
    if not notifier.enabled:
        return
    fd = memfd_of(keys + drawn_for, f"fleet-ingress {TICKET_KEYS_NAME}")
    try:
        notifier.remove_fd(TICKET_KEYS_NAME)
        notifier.store_fd(TICKET_KEYS_NAME, fd)
    finally:
        _close(fd)  # systemd holds its own


def ticket_keys_taken_up(stored: bytes | None, drawn_for: bytes) -> tuple[bytes | None, str]:
    """The session ticket keys in `stored` (the memfd `store_ticket_keys`
    wrote, as read from the store; None: none was there) when they were drawn
    for `drawn_for` (what this process serves:
    `carrier_certificate.ticket_keys_drawn_for`); else None and why not."""
    if stored is None:
        return None, "none in systemd's fd store (an older release's, or not kept)"
    if len(stored) != STORED_TICKET_KEYS_BYTES:
        return None, f"{len(stored)} bytes, not {STORED_TICKET_KEYS_BYTES}"
    if not hmac.compare_digest(stored[TICKET_KEYS_BYTES:], drawn_for):
        return None, (
            "drawn for another certificate, key or [tls] than the one served "
            "(a crash during a reload, or no snapshot: the files serve)"
        )
    return stored[:TICKET_KEYS_BYTES], ""


def drop_moved_listeners(
    taken: dict[str, socket.socket], listen: ListenSection, notifier: Notifier
) -> list[str]:
    """The stored listeners the configuration no longer names where they are
    bound (listen.* changed, then the supervisor died before a restart took
    it): closed and taken out of the store, so that the new process binds
    what the file says. Returns their names.

    With workers taken up (their channels in `taken`: a crash, not a stop), a
    listener moved to where its own port would clash with it (a wildcard either
    side, or the same address: "0.0.0.0:443" to "[::]:443") is kept where bound,
    with a warning: the workers still listen on their copies, so binding the new
    address failed ("Address already in use") and the unit failed after the
    crash, its workers drained (the review of session 33). A restart moves it."""
    workers_listen = any(worker_key(n) is not None for n in taken)
    moved = []
    for name in [n for n in taken if n in STORED_LISTENERS]:
        address = getattr(listen, name.removeprefix("listen."))
        if address and _bound_at(taken[name], address):
            continue
        if address and workers_listen and _clashes(taken[name], address):
            bound = taken[name].getsockname()
            log.warning(
                f"{name} = {address!r} in the file, but the workers taken up listen at "
                f"{format_hostport(bound[0], bound[1])}, where the new address would clash: "
                "kept where bound; `systemctl restart fleet-ingress` moves it (their calls "
                "drain meanwhile for timeouts.drain)",
                extra=fields(listener=name, configured=address),
            )
            continue
        taken.pop(name).close()
        notifier.remove_fd(name)
        moved.append(name)
    return moved


def _asked_on_its_port(
    sock: socket.socket, address: str
) -> tuple[Any, ipaddress.IPv4Address | ipaddress.IPv6Address | None, str] | None:
    """What `sock` is bound to (getsockname), the address `address` asks for
    (None: a name) and its zone; None when `address` names another port."""
    host, port = parse_hostport(address, what="listen")
    bound = sock.getsockname()
    if bound[1] != port:
        return None
    ip, _, zone = host.partition("%")
    try:
        return bound, ipaddress.ip_address(ip), zone
    except ValueError:
        return bound, None, zone


def _bound_at(sock: socket.socket, address: str) -> bool:
    if (asked := _asked_on_its_port(sock, address)) is None:
        return False
    bound, wanted, zone = asked
    if wanted is None:
        return True  # a name: resolved as it was bound, the port decides
    # The wildcards too: 0.0.0.0 takes IPv4 alone, [::] both families (before,
    # any wildcard passed for the other).
    if ipaddress.ip_address(bound[0]) != wanted:
        return False
    # A zone (fe80::10%eth0) is the scope id apart, an interface's index: it
    # never matched the address alone, and such a listener read as moved. The
    # kernel keeps one for a link-local address only: on another ([::%1]:443,
    # which glibc takes) the scope id is 0, and that read as moved too.
    if not zone or not (isinstance(wanted, ipaddress.IPv6Address) and wanted.is_link_local):
        return True
    return bound[3] == _interface_index(zone)


def _clashes(sock: socket.socket, address: str) -> bool:
    """Would binding `address` fail while `sock` listens (same port, and either
    a wildcard, or the same address)? A name: taken to clash (it may resolve to
    the address bound)."""
    if (asked := _asked_on_its_port(sock, address)) is None:
        return False
    bound, wanted, _ = asked
    if wanted is None:
        return True
    held = ipaddress.ip_address(bound[0])
    return wanted.is_unspecified or held.is_unspecified or wanted == held


def _interface_index(zone: str) -> int:
    """The index of the interface a zone names (by name or by index); 0 for none."""
    if zone.isdigit():
        return int(zone)
    try:
        return socket.if_nametoindex(zone)
    except OSError:
        return 0


def crash_state(
    taken: dict[str, socket.socket],
    worker_target: int,
    snapshot: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The state to take up the workers whose channels came from the store
    with, as an upgrade's new image takes up what the previous one carried
    (`UpgradeSequence`): None when no worker's channel came (only listeners,
    or nothing). The newest generation serves; replacements are due for what
    it lacks. The older ones (an upgrade's old generation) and the workers
    that say they drain are retired once taken up
    (`UpgradeSequence._retire_after_crash`).

    `snapshot`: the dead process's last (`CrashSnapshot`), its counts and
    history taken up; of its workers, those whose channel came back, with what
    it knew of them (their retirement and its deadline, what they held, their
    CPU). None: they start afresh."""
    workers = [ids for name in taken if (ids := worker_key(name)) is not None]
    if not workers:
        return None
    newest = max(generation for _, generation in workers)
    now = time.monotonic()
    carried = dict(snapshot or {})
    worker_target = int(carried.get("worker_target") or worker_target)
    known = {
        (w.get("pid"), w.get("generation")): w
        for w in carried.get("workers", [])
        if isinstance(w, dict)
    }
    serving = sum(
        1
        for pid, generation in workers
        if generation == newest and not known.get((pid, generation), {}).get("retiring")
    )
    return {
        "reloads": {},
        "restarts": {},
        "calls_lost_total": 0,
        "queue_timeouts": 0,
        "reclaimed_total": 0,
        "fleets": [],
        **carried,
        "crash_restart": True,
        # This one's death (`fleet_ingress_supervisor_deaths_total`): the
        # counters go on from its snapshot, so nothing else in /metrics says it.
        "supervisor_deaths": int(carried.get("supervisor_deaths", 0)) + 1,
        "generation": newest,
        "worker_target": worker_target,
        # Replacements for the workers the host is short of, due now.
        "respawns": [now] * max(0, worker_target - serving),
        # Its life starts here: the uptime says a supervisor died.
        "started_monotonic": now,
        "reload_pending": False,
        "bound_listen": None,  # as configured (`drop_moved_listeners`)
        "upgrades": [_ended_by_death(u) for u in carried.get("upgrades", [])],
        "workers": [
            {**_as_taken_up(known.get((pid, generation), {})), "pid": pid, "generation": generation}
            for pid, generation in workers
        ]
        + _lost_channels_running(known, set(workers)),
    }


def _lost_channels_running(
    known: Mapping[tuple[Any, Any], Mapping[str, Any]], handed: set[tuple[int, int]]
) -> list[dict[str, Any]]:
    """The workers whose channel the dead process had lost while they ran
    (their channel is in no store) and that still run: draining their calls,
    whose slots stay counted until they exit, killed at their deadline, as the
    dead process had them (`UpgradeSequence._watch_channelless`). Forgotten,
    their calls counted against no fleet (maxconn passed)."""
    lost = []
    for (pid, generation), worker in known.items():
        if (pid, generation) in handed or not worker.get("channel_lost"):
            continue
        if not isinstance(pid, int) or (state := process_state(pid)) is None or state[0] == "Z":
            continue  # exited since (or a pid the snapshot cannot name)
        started = worker.get("process_start")
        if isinstance(started, int) and process_start(pid) != started:
            continue  # exited since, its pid another process's now (its kill would be theirs)
        kept = {
            key: worker[key]
            for key in (*_WORKER_KEPT, "lost_confirmed", "calls_lost", "process_start")
            if key in worker
        }
        lost.append({**kept, "pid": pid, "generation": generation, "channel_lost": True})
    return lost


# What the dead process knew of a worker that holds for the next: not how its
# channel or process ended there (its channel came back: it runs, and is no
# child of the next), nor what it said of its calls (not in the snapshot).
_WORKER_KEPT = (
    "started_at",
    "retiring",
    "retire_by",
    "drain_told",
    "held",
    "budget",
    "cpu",
    "rank",
)


def _as_taken_up(known: Mapping[str, Any]) -> dict[str, Any]:
    return {key: known[key] for key in _WORKER_KEPT if key in known}


def _ended_by_death(status: Any) -> Any:
    """An upgrade under way when the supervisor died: failed, saying so."""
    if not isinstance(status, dict) or status.get("state") in ("done", "failed"):
        return status
    return {
        **status,
        "state": "failed",
        "finished": time.time(),
        "error": "the supervisor died during it; started again by systemd, the newest "
        "generation of workers serves (see the log); run `fleet-ingress upgrade` again",
    }


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
