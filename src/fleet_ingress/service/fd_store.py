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
the dead process knew starts afresh: fleet health (probed again before any
slot is granted), counters, the upgrades' history.

A channel the supervisor ends on purpose (a worker that broke the protocol,
one gone whose end another process holds) is taken out of the store
(`FDSTOREREMOVE=1`), or the copy there would keep it open and the worker would
not see it end. A channel that ends because its worker exited needs nothing:
systemd drops a stored socket that hangs up. A clean stop empties the store.

Without systemd, or with a unit whose FileDescriptorStoreMax= is 0, nothing is
kept and a supervisor that dies takes its workers' slots with it as before
(the workers drain).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import MutableMapping
from typing import Any

from fleet_ingress.config.settings import ListenSection
from fleet_ingress.core.addresses import parse_hostport
from fleet_ingress.logs import fields
from fleet_ingress.service.listen_fds import ListenFdsError, inherited_socket, worker_key
from fleet_ingress.service.sdnotify import Notifier

log = logging.getLogger("fleet_ingress.lifecycle")

SD_LISTEN_FDS_START = 3
# Listeners kept: the admin socket is not (its directory, the unit's
# RuntimeDirectory, is removed as the process dies: bound again instead).
STORED_LISTENERS = ("listen.wss", "listen.acme", "listen.stats")


def taken_from_store(
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, socket.socket]:
    """The descriptors systemd handed this process from its fd store, by name
    (empty when none were): listeners and worker channels. A name given twice
    (a listener stored again by an image that did not know it was) is taken
    once; a descriptor that is not what its name says is closed and said.
    Unsets the variables, as sd_listen_fds(1) does."""
    env = os.environ if environ is None else environ
    count = env.pop("LISTEN_FDS", "")
    owner = env.pop("LISTEN_PID", "")
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    if not count.isdigit() or owner != str(os.getpid()):
        return {}
    taken: dict[str, socket.socket] = {}
    for n in range(int(count)):
        fd = SD_LISTEN_FDS_START + n
        name = names[n] if n < len(names) else ""
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
            log.warning(
                "a descriptor from systemd's fd store is not used", extra=fields(error=str(exc))
            )
            _close(fd)
    return taken


def drop_moved_listeners(
    taken: dict[str, socket.socket], listen: ListenSection, notifier: Notifier
) -> list[str]:
    """The stored listeners the configuration no longer names where they are
    bound (listen.* changed, then the supervisor died before a restart took
    it): closed and taken out of the store, so that the new process binds
    what the file says. Returns their names."""
    moved = []
    for name in [n for n in taken if n in STORED_LISTENERS]:
        address = getattr(listen, name.removeprefix("listen."))
        if address and _bound_at(taken[name], address):
            continue
        taken.pop(name).close()
        notifier.remove_fd(name)
        moved.append(name)
    return moved


def _bound_at(sock: socket.socket, address: str) -> bool:
    host, port = parse_hostport(address, what="listen")
    bound = sock.getsockname()
    if bound[1] != port:
        return False
    try:
        wanted = ipaddress.ip_address(host) if host else None
    except ValueError:
        return True  # a name: resolved as it was bound, the port decides
    if wanted is None or wanted.is_unspecified:
        return ipaddress.ip_address(bound[0]).is_unspecified
    return ipaddress.ip_address(bound[0]) == wanted


def crash_state(taken: dict[str, socket.socket], worker_target: int) -> dict[str, Any] | None:
    """The state to take up the workers whose channels came from the store
    with, as an upgrade's new image takes up what the previous one carried
    (`UpgradeSequence`): None when no worker's channel came (only listeners,
    or nothing). The newest generation serves; replacements are due for what
    it lacks. The older ones (an upgrade's old generation) and the workers
    that say they drain are retired once taken up
    (`UpgradeSequence._retire_after_crash`)."""
    workers = [ids for name in taken if (ids := worker_key(name)) is not None]
    if not workers:
        return None
    newest = max(generation for _, generation in workers)
    serving = sum(1 for _, generation in workers if generation == newest)
    now = time.monotonic()
    return {
        "crash_restart": True,
        "fleets": [],
        "generation": newest,
        "worker_target": worker_target,
        # Replacements for the workers the host is short of, due now.
        "respawns": [now] * max(0, worker_target - serving),
        "started_monotonic": now,
        "reloads": {},
        "restarts": {},
        "calls_lost_total": 0,
        "queue_timeouts": 0,
        "reclaimed_total": 0,
        "bound_listen": None,
        "upgrades": [],
        "workers": [{"pid": pid, "generation": generation} for pid, generation in workers],
    }


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
