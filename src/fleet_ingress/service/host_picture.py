"""The picture of the host the supervisor shows: what `stat`, /stats.json and
the stats page are built from (`snapshot_of`, rendered by `ops.snapshot`), and
systemd's STATUS= line (`status_line_of`). Read of the supervisor
(`service.supervisor.Supervisor`), never written; what of it they read is
`Pictured`."""

from __future__ import annotations

import socket
import time
from typing import Any, Protocol

from fleet_ingress.config.settings import IngressConfig, ListenSection
from fleet_ingress.core.balancer import Balancer
from fleet_ingress.core.certificate_change import LeafFacts
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import HostSlots
from fleet_ingress.core.host_view import HostView
from fleet_ingress.ops.host_stats import host_snapshot, with_drain_end
from fleet_ingress.ops.reload_outcome import REFUSED_RELOAD_STATUS, was_refused
from fleet_ingress.service.files_on_disk import FilesOnDisk, served_early, served_refused
from fleet_ingress.service.ingress import STOP_GRACE, listeners_not_moved_notes
from fleet_ingress.service.oom_verdict import OomVerdict
from fleet_ingress.service.sdnotify import Notifier
from fleet_ingress.service.store_keeping import fd_store_picture
from fleet_ingress.service.upgrade_sequence import UpgradeSequence
from fleet_ingress.service.worker_pool import WorkerPool


class Pictured(Protocol):
    """The supervisor as its picture reads it."""

    config: IngressConfig
    balancer: Balancer
    slots: HostSlots
    view: HostView
    files: FilesOnDisk
    started_at: float
    pool: WorkerPool
    listeners: dict[str, socket.socket]
    bound_listen: ListenSection
    last_reload: dict[str, Any] | None
    serving_leaf: LeafFacts | None
    supervisor_oom_kills: int
    supervisor_oom_kills_possibly: int
    oom_verdict: OomVerdict
    notifier: Notifier | None
    upgrade: UpgradeSequence

    @property
    def host_calls(self) -> int: ...

    @property
    def certificate_not_after(self) -> float | None: ...


def snapshot_of(supervisor: Pictured) -> dict[str, Any]:
    """What `stat`, /stats.json and the stats page show of the host (`ops.snapshot`)."""
    picture = host_snapshot(
        supervisor.slots,
        supervisor.view,
        started_at=supervisor.started_at,
        certificate_not_after=supervisor.certificate_not_after,
        capacity_key=supervisor.config.fleets.capacity_key,
        stopping=supervisor.pool.stopping,
        last_reload=supervisor.last_reload,
        acme_listening="listen.acme" in supervisor.listeners,
    )
    _say_drain_ends(supervisor, picture["workers"])
    picture["worker_restarts"] = dict(supervisor.pool.restarts)
    picture["supervisor_oom_kills"] = supervisor.supervisor_oom_kills
    picture["supervisor_oom_kills_possibly"] = supervisor.supervisor_oom_kills_possibly
    picture["fd_store"] = fd_store_picture(getattr(supervisor, "notifier", None))
    picture["worker_oom_kills"] = supervisor.pool.worker_oom_kills
    # Where the OOM kills are counted, when that counts other processes' too.
    # (None where the kernel's log names the pids killed: it decides there.)
    picture["oom_kills_broad"] = supervisor.oom_verdict.broad()
    picture["worker_calls_lost"] = supervisor.pool.calls_lost_total
    picture["workers_wanted"] = supervisor.pool.worker_target
    picture["workers_from"] = supervisor.pool.workers_from
    picture["workers_serving"] = supervisor.pool.serving_workers()
    picture["workers_unresponsive"] = supervisor.pool.unresponsive_workers()
    picture["worker_hang_timeout"] = supervisor.pool.hang_timeout
    picture["workers_dying_at_start"] = supervisor.pool.quick_deaths
    picture["worker_start_error"] = supervisor.pool.spawn_error
    picture.update(supervisor.files.picture(supervisor.serving_leaf))
    picture["generation"] = supervisor.pool.generation
    picture["upgrade"] = supervisor.upgrade.latest
    picture["upgrade_last_finished"] = supervisor.upgrade.last_finished
    picture["listeners_not_moved"] = listeners_not_moved_notes(
        supervisor.bound_listen, supervisor.config
    )
    return picture


def _say_drain_ends(supervisor: Pictured, rows: list[dict[str, Any]]) -> None:
    """When each draining worker closes the calls still up there: its
    backstop less STOP_GRACE (the worker's own drain ends then). Not while
    stopping: every worker then drains for timeouts.drain (STOPPING says)."""
    if supervisor.pool.stopping:
        return
    draining = {w.pid: w for w in supervisor.pool.workers.values() if w.retiring or w.channel_lost}
    now = time.monotonic()
    for row in rows:
        if (worker := draining.get(row["pid"])) is None:
            continue
        by = worker.retire_by
        with_drain_end(row, None if by is None else by - STOP_GRACE - now)


def status_line_of(supervisor: Pictured) -> str:
    """systemd's STATUS= line, and the "ready" line's status."""
    fleets = supervisor.balancer.fleets
    up = sum(1 for f in fleets if f.health is Health.UP)
    eligible = sum(1 for f in fleets if f.takes_calls)
    return (
        f"{supervisor.host_calls} calls, {up}/{len(fleets)} fleets up, "
        f"{eligible} taking calls, queue {supervisor.slots.queue_length}, "
        f"{_workers_said(supervisor)}, generation {supervisor.pool.generation}"
        + (REFUSED_RELOAD_STATUS if was_refused(supervisor.last_reload) else "")
        + (
            "; LAST UPGRADE FAILED: see `fleet-ingress stat`"
            if last_upgrade_failed(supervisor)
            else ""
        )
        + (
            "; THIS HOST'S CLOCK READS BEFORE THE CERTIFICATE SERVED IS VALID: see "
            "`fleet-ingress stat`"
            if served_early(supervisor.serving_leaf)
            else "; CERTIFICATE SERVED IS REFUSED BY CARRIERS: see `fleet-ingress stat`"
            if served_refused(supervisor.serving_leaf) is not None
            else "; CERTIFICATE ON DISK REFUSED: see `fleet-ingress stat`"
            if supervisor.files.certificate_refused(supervisor.serving_leaf) is not None
            else "; CARRIERS MAY FAIL TO VERIFY THE CERTIFICATE: see `fleet-ingress stat`"
            if supervisor.files.served_chain is not None
            else ""
        )
    )


def _workers_said(supervisor: Pictured) -> str:
    """The status line's workers: those of the generation serving, and an
    older one's draining apart (counted in, they read as capacity the host
    does not have: 4 workers while 2 serve after an upgrade; the accounting
    audit of session 31). An upgrade's new generation while it starts
    (candidates) is said apart too: counted as an older one draining, it
    read as capacity leaving when it is coming (the review of session 31);
    one a failed upgrade retired, as of a failed upgrade."""
    alive = [
        w
        for w in supervisor.pool.workers.values()
        if w.generation != supervisor.pool.generation and w.proc.returncode is None
    ]
    older = sum(1 for w in alive if w.generation < supervisor.pool.generation)
    starting = sum(1 for w in alive if w.generation > supervisor.pool.generation and w.candidate)
    failed = sum(1 for w in alive if w.generation > supervisor.pool.generation and not w.candidate)
    parts = [
        f"+{n} {what}"
        for n, what in (
            (older, "of an older generation draining"),
            (starting, "of the next generation starting"),
            (failed, "of a failed upgrade's generation draining"),
        )
        if n
    ]
    said = f"{supervisor.pool.serving_workers()} workers"
    return said + (f" ({', '.join(parts)})" if parts else "")


def last_upgrade_failed(supervisor: Pictured) -> bool | None:
    """For fleet_ingress_upgrade_failed: the last upgrade finished (one under
    way changes nothing until it ends: read as the latest, it went to 0
    while the next was checked and the alert resolved; the review of session
    31); None before any (and while __init__ builds: the registry describes
    its collectors at once)."""
    sequence = getattr(supervisor, "upgrade", None)
    last = None if sequence is None else sequence.last_finished
    return None if last is None else last["state"] == "failed"
