"""The supervisor's reload (SIGHUP, `fleet-ingress reload`): the
configuration, the fleets file and the certificate read again and checked (an
invalid one is refused whole: `ReloadRefused`), applied here (the fleet set,
the poller, the slot table, the session ticket keys), then in every worker
(`service.reload_rounds`); what it changed, and what it did not apply and why,
its outcome (`ops.reload_outcome`). And the asks waiting for a round: queued
by `fleet-ingress reload` (`reload_and_wait`), answered at stop
(`answer_pending_reloads`).

The state is the supervisor's (`service.supervisor.Supervisor`: an upgrade's
exec and the crash snapshot carry some of it); what of it a reload reads and
writes is `Reloadable`."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from fleet_ingress.config.config_diff import NOTHING_CHANGED, settings_changed
from fleet_ingress.config.settings import (
    IngressConfig,
    ListenSection,
    edits_hidden,
    file_settings,
    unread_variables_said_by_run,
)
from fleet_ingress.core.certificate_change import LeafFacts, reload_note
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.logs import fields
from fleet_ingress.net.descriptors import calls_allowed, descriptors_short, say_descriptors_short
from fleet_ingress.net.poller import HealthPoller
from fleet_ingress.net.slot_server import SlotServer
from fleet_ingress.net.tls import CarrierPem, new_ticket_keys
from fleet_ingress.ops.fleet_ops import FleetChangeError, FleetOps
from fleet_ingress.ops.reload_outcome import ReloadAsked, reload_outcome, tell
from fleet_ingress.service.carrier_certificate import serves_alike, warn_about_chain
from fleet_ingress.service.ingress import (
    ReloadRefused,
    listener_notes,
    probe_settings,
    read_reload_settled,
    warn_same_host,
)
from fleet_ingress.service.reload_rounds import ReloadRounds, log_not_reloaded
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.ticket_keys import SessionTicketKeys
from fleet_ingress.service.worker_pool import WorkerPool

log = logging.getLogger("fleet_ingress.lifecycle")


class Reloadable(Protocol):
    """The supervisor as its reload reads and writes it."""

    config: IngressConfig
    config_path: Path
    bound_listen: ListenSection  # where the listeners were bound: a reload moves none
    serving_leaf: LeafFacts | None
    serving_pem: CarrierPem
    tickets: SessionTicketKeys
    notifier: Notifier | None
    fleet_set: FleetSet
    slots: HostSlots
    server: SlotServer
    poller: HealthPoller
    ops: FleetOps
    pool: WorkerPool
    reload_rounds: ReloadRounds
    stop_asked: asyncio.Event
    reloads: Counter[str]
    reloading: bool
    reloads_asked: asyncio.Queue[ReloadAsked]
    reload_in_hand: list[ReloadAsked]
    last_reload: dict[str, Any] | None
    workers_not_reloaded: dict[int, object]
    file_read: dict[str, Any]
    edits_hidden: list[str]
    descriptors_short: list[int] | None
    start_notes: list[str]

    def write_snapshot(self) -> None: ...

    async def look_after_reload(self) -> None: ...


async def reload_and_wait(supervisor: Reloadable) -> dict[str, Any]:
    """`fleet-ingress reload`: a reload asked as SIGHUP asks it (RELOADING=1
    and READY=1 to systemd), and how it went: the outcome of the first round
    that begins after it was asked (one under way may have read the files
    before the caller's edit), shared with every ask that round answers."""
    if supervisor.pool.stopping or supervisor.stop_asked.is_set():
        raise FleetChangeError(409, "the ingress is stopping: nothing is reloaded")
    asked: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    supervisor.reloads_asked.put_nowait(asked)
    return await asked


def say_certificate_kept(supervisor: Reloadable, problem: str) -> None:
    """The start passed over the certificate on disk (`problem`: what
    `carrier_certificate.kept_certificate` or `kept_over_unloadable` says of
    it) and serves the one the previous process served (before a stop, a
    crash or an upgrade's exec). `stat` and the gauge
    `fleet_ingress_certificate_file_refused` say so too, until the files
    hold one a reload takes (`FilesOnDisk.certificate_refused`)."""
    until = supervisor.serving_leaf.not_after if supervisor.serving_leaf is not None else None
    supervisor.start_notes.append(
        f"the certificate on disk is not served, as a reload would refuse it: {problem}; "
        "the one served before serves on: put a good certificate in place, then "
        "`systemctl reload fleet-ingress`"
    )
    log.warning(
        "the certificate on disk is not served, as a reload would refuse it: the one "
        "served before serves on; put a good certificate in place, then `systemctl "
        "reload fleet-ingress` (a reboot, or a stop then a start, takes the files as "
        "they are)",
        extra=fields(key="tls.cert", problem=problem, served_until=until),
    )


def answer_pending_reloads(supervisor: Reloadable, why: str) -> None:
    """At stop: every `fleet-ingress reload` still waiting is told, rather than
    holding its admin request (and the supervisor's exit) until it times out."""
    outcome = {**reload_outcome(why), "result": "failed"}
    tell(supervisor.reload_in_hand, outcome)
    while not supervisor.reloads_asked.empty():
        tell([supervisor.reloads_asked.get_nowait()], outcome)


async def reload_host(supervisor: Reloadable) -> str:
    """Reload configuration, fleets file and certificate: here, then in every
    worker. Raises ReloadRefused (nothing applied) when anything is invalid."""
    supervisor.reloading = True
    try:
        changes = await _reload(supervisor)
    except ReloadRefused as exc:
        supervisor.last_reload = reload_outcome(str(exc))
        supervisor.write_snapshot()  # what a crash restart serves: still the previous one
        await supervisor.look_after_reload()
        raise
    finally:
        supervisor.reloading = False
    supervisor.last_reload = reload_outcome(None, changes)
    if supervisor.edits_hidden:  # `stat` says them, as the reload's answer does
        supervisor.last_reload["edits_hidden"] = supervisor.edits_hidden
    if supervisor.workers_not_reloaded:  # `fleet-ingress reload` must not say it all applied
        supervisor.last_reload["workers_failed"] = {
            str(pid): str(error) for pid, error in supervisor.workers_not_reloaded.items()
        }
    supervisor.write_snapshot()  # what a crash restart serves: this one
    await supervisor.look_after_reload()
    return changes


def _descriptors_said_short(supervisor: Reloadable, config: IngressConfig) -> str | None:
    """A reload that asks more calls than the descriptor limit holds says
    so, as the start does, once for each [limit, needed] (the workers cap
    at what the limit holds: before, without a word until the next start)."""
    max_connections = config.limits.max_connections
    acme = bool(supervisor.bound_listen.acme)  # :80 as bound at start
    short = descriptors_short(max_connections, acme=acme)
    said, supervisor.descriptors_short = supervisor.descriptors_short, short
    if short is None or short == said:
        return None
    say_descriptors_short(short, max_connections, acme=acme)
    allowed = calls_allowed(short, max_connections, acme=acme)
    return (
        f"limits.max_connections = {max_connections}: the descriptor limit ({short[0]}) "
        f"holds {allowed} calls a worker; raise LimitNOFILE (systemd) to carry them"
    )


async def _reload(supervisor: Reloadable) -> str:
    try:
        # Off the loop, which answers the workers' slot requests meanwhile:
        # the fleets' TLS context alone reads the system's trust store (20 ms
        # measured), and a file on a slow disk could hold every call's lease.
        config, specs, _, fleet_ssl, leaf, pem = await read_reload_settled(
            supervisor.ops, supervisor.config_path, serving=supervisor.serving_leaf
        )
    except ReloadRefused:
        supervisor.reloads["refused"] += 1
        raise
    # Read again, not with the configuration: a few ms for a few lines.
    file_now = await asyncio.to_thread(file_settings, supervisor.config_path)
    # "auto" counted anew off the loop: /proc/self/mountinfo is read for
    # the cgroup's quota, 30-40 ms on a host of 3000 mounts (a Kubernetes node).
    workers = await asyncio.to_thread(config.process.workers_from)
    pending = _pending_notes(supervisor, config, workers)
    notes = listener_notes(supervisor.bound_listen, config) + pending
    if settings := settings_changed(supervisor.config, config):
        notes.append(f"applied: {settings}")
    if certificate := reload_note(leaf, supervisor.serving_leaf, pem, supervisor.serving_pem):
        notes.append(certificate)
    supervisor.edits_hidden = edits_hidden(supervisor.file_read, file_now)
    for hidden in supervisor.edits_hidden:
        log.warning(
            "a file edit is not applied: the environment sets its key",
            extra=fields(note=hidden),
        )
    notes += supervisor.edits_hidden
    verified = supervisor.config.fleets.verify
    new_keys = not serves_alike(supervisor.config, supervisor.serving_pem, config, pem)
    if new_keys:
        # Workers build a new carrier context: tickets sealed before must not
        # resume into it (a renewal for a key that leaked).
        supervisor.tickets.ticket_keys = new_ticket_keys()
    supervisor.config = config
    supervisor.serving_leaf = leaf
    supervisor.serving_pem = pem  # what workers started from now on get
    if short := _descriptors_said_short(supervisor, config):
        notes.append(short)
    if new_keys:  # before any worker is told: a crash from here takes them up
        supervisor.tickets.store_ticket_keys(
            supervisor.notifier, supervisor.config, supervisor.serving_pem
        )
    supervisor.slots.queue_timeout = config.timeouts.queue
    supervisor.slots.max_queue = config.limits.max_queue
    supervisor.slots.fall = config.fleets.fall
    plan = supervisor.fleet_set.apply(
        specs, capacity_aware=config.fleets.capacity_aware, health=Health.INIT
    )
    for fleet in plan.gone:
        supervisor.ops.gone(fleet)
    for fleet in plan.added:
        supervisor.poller.start(fleet)
    # The grant budgets sent under the fleets' previous specs (a lone worker's
    # holds every slot of the old maxconn) are taken back now, and given anew
    # under the new ones, with no await between: the reconfigure below builds
    # TLS contexts and waits on probes, and until "budget-end" is sent the
    # worker grants from the old budget (before, past a lowered maxconn).
    supervisor.server.wake()
    notes += plan.notes
    notes += warn_same_host(specs, log)  # said at each reload, as check says it
    notes += unread_variables_said_by_run()  # and so are these
    await supervisor.poller.reconfigure(fleet_ssl, probe_settings(config))
    if verified and not config.fleets.verify:
        warn_unverified()
    supervisor.server.wake()  # the probes' new settings may find room
    answers = await supervisor.reload_rounds.reload_workers()
    gone = sorted(pid for pid, a in answers.items() if a.get("gone"))
    failed = {
        pid: a.get("error") for pid, a in answers.items() if not a.get("ok") and not a.get("gone")
    }
    # What `fleet-ingress reload` fails on: a worker that answered it did not
    # reload (it serves its previous files), not one whose outcome is not known.
    supervisor.workers_not_reloaded = {
        pid: a.get("error")
        for pid, a in answers.items()
        if not a.get("ok") and not a.get("unknown") and not a.get("gone")
    }
    for pid, error in failed.items():
        log_not_reloaded(pid, error)
        notes.append(f"worker {pid} did not reload: {error}")
    log.info(
        "workers reloaded",
        extra=fields(
            workers=sorted(set(answers) - set(failed) - set(gone)), failed=failed, gone=gone
        ),
    )
    supervisor.reloads["applied"] += 1
    await asyncio.to_thread(warn_about_chain, config, supervisor.serving_pem)
    return "; ".join(notes) or NOTHING_CHANGED


def _pending_notes(
    supervisor: Reloadable, config: IngressConfig, workers: tuple[int, str]
) -> list[str]:
    """What of `config` a reload does not apply: compared with the values
    in force (as this image read them when it started, `run` or an
    upgrade's exec; for process.workers, the serving generation's count),
    not with the last reload, so that a change still pending is said again
    and putting the running value back says nothing. `workers`: its
    `workers_from()`, read off the loop."""
    process = config.process
    notes = []
    if process.worker_hang_timeout != supervisor.pool.hang_timeout:
        notes.append(
            "process.worker_hang_timeout changed: takes effect at the next "
            "`fleet-ingress upgrade` or restart"
        )
    count, because = workers
    if count != supervisor.pool.worker_target:
        # "auto" in the file before and now: the unit's CPUQuota= or affinity
        # changed, not process.workers (an operator would look for an edit).
        what = (
            'process.workers = "auto" counts anew'
            if process.workers == "auto" == supervisor.config.process.workers
            else "process.workers changed"
        )
        notes.append(
            f"{what}: takes effect at the next `fleet-ingress upgrade` "
            f"(its new generation) or restart: {because}, not the "
            f"{supervisor.pool.worker_target} serving"
        )
    if process.cpu_affinity != supervisor.pool.cpu_affinity:
        notes.append(
            "process.cpu_affinity changed: takes effect at the next `fleet-ingress "
            "upgrade` (its new generation) or restart; a worker started meanwhile "
            "to replace one runs as the others do"
        )
    return notes


def warn_unverified() -> None:
    """fleets.verify = false, at start and when a reload turns it off."""
    log.warning(
        "fleets.verify = false: fleet certificates are not checked, so anyone on the "
        "path to a fleet can read and alter calls; prefer fleets.ca_file for a private CA"
    )
