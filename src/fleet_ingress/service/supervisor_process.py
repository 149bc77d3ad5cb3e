"""`fleet-ingress run`'s process around its `Supervisor` (SPEC 11, 13): the
signals it handles (SIGTERM/SIGINT, SIGHUP, SIGUSR2), what it tells systemd
(READY=1, STATUS=, WATCHDOG=1, STOPPING=1), its background tasks (the
reloader, state snapshots, the admin socket kept, the heap trimmed), the
drain after a failed resume and the exit. The supervisor itself, the
workers' lives and the host's view of its fleets, is `service.supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from fleet_ingress.config.settings import environment_values, unread_variables_said_by_run
from fleet_ingress.logs import configure_logging, fields, flush_lines
from fleet_ingress.net.event_loop import count_unexpected_error, sleep_to_tick
from fleet_ingress.net.late_timers import PatientDeadline
from fleet_ingress.ops.fleet_ops import FleetChangeError
from fleet_ingress.ops.reload_outcome import ReloadAsked, reload_outcome, tell
from fleet_ingress.release import code_digest
from fleet_ingress.service.fd_store import (
    SNAPSHOT_EVERY,
    STORE_MAX_READ,
    TICKET_KEYS_NAME,
    CrashSnapshot,
    read_store_max,
)
from fleet_ingress.service.ingress import STOP_GRACE, ReloadRefused
from fleet_ingress.service.kept_running import kept_running
from fleet_ingress.service.lifecycle import (
    EXIT_FLUSH_WAIT,
    FIRST_PROBE_WAIT,
    SECOND_SIGNAL_GRACE,
    STATUS_EVERY,
    say_signal_ignored,
    trim_heap,
)
from fleet_ingress.service.process_start import IGNORED_SIGNALS
from fleet_ingress.service.reexec_steps import step_done
from fleet_ingress.service.sdnotify import Notifier, monotonic_usec
from fleet_ingress.service.supervisor import (
    ADMIN_SOCKET,
    RELOADER,
    STATE_SNAPSHOTS,
    SYSTEMD_STATUS,
    WATCHDOG_PINGS,
    Supervisor,
)
from fleet_ingress.service.upgrade import children_running
from fleet_ingress.service.upgrade_sequence import FINISHED, HELD_OVER_EXEC
from fleet_ingress.service.worker_pool import _STALL_GRACE

log = logging.getLogger("fleet_ingress.lifecycle")

# How often a failed resume's drain looks for the children it waits for.
_CHILDREN_EVERY = 0.2
# How often the supervisor tells systemd's watchdog it runs (WatchdogSec=30).
WATCHDOG_PING_EVERY = 1.0
# How often the supervisor looks that its admin socket's file is still there.
ADMIN_SOCKET_LOOK_EVERY = 1.0


# -- the process -------------------------------------------------------------------


async def run_supervisor(supervisor: Supervisor, notifier: Notifier | None = None) -> int:
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    stop = supervisor.stop_asked

    def on_stop_signal(signum: int) -> None:
        if stop.is_set():
            log.warning(
                "second signal: closing every call and exiting", extra=fields(signal=signum)
            )
            supervisor.pool.cut()
            loop.call_later(SECOND_SIGNAL_GRACE, _exit_now, supervisor)
            return
        log.info("stopping: no new connections, draining calls", extra=fields(signal=signum))
        stop.set()

    def on_reload_signal() -> None:
        if stop.is_set():  # the reloader is gone: say so rather than drop it unsaid
            log.warning(
                "SIGHUP ignored",
                extra=fields(reason="the ingress is stopping: its calls drain, nothing reloads"),
            )
            return
        supervisor.reloads_asked.put_nowait(None)

    def on_upgrade_signal() -> None:
        try:
            supervisor.upgrade.begin_upgrade("SIGUSR2")
        except FleetChangeError as exc:
            log.warning("SIGUSR2 ignored", extra=fields(reason=exc.message))

    supervisor.notifier = notifier
    supervisor.store_taken_up.take_up_fd_store(notifier)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)
    loop.add_signal_handler(signal.SIGUSR2, on_upgrade_signal)
    for sig in IGNORED_SIGNALS:
        loop.add_signal_handler(sig, say_signal_ignored, sig)
    limit_read: asyncio.Task[None] | None = None
    if notifier.enabled and notifier.store_max is None:
        # Asked in the background: a hung D-Bus held the start up to STORE_MAX_READ
        # (signals unhandled, after a crash the workers' slot requests unanswered).
        # What is stored meanwhile is set against the limit once known.
        notifier.awaiting_limit = True
        limit_read = loop.create_task(_read_store_limit(notifier))
    # Blocked by the previous image over its exec (an upgrade): handled from now
    # on. Before the workers start, who would inherit the mask.
    step_done("event loop")
    await _threads_without_held_signals(loop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_OVER_EXEC)
    step_done("thread pool")
    # Starting can take a while (after an upgrade's exec: restoring the slot
    # table, a new generation, first probes): systemd's watchdog must not fire
    # meanwhile, or it kills every worker, the old generation's included.
    failures = supervisor.task_failures
    watchdog = loop.create_task(
        kept_running(WATCHDOG_PINGS, lambda: _ping_watchdog(notifier), failures)
    )
    code_digest()  # read now, not on the loop that answers slots (the first scrape's)
    step_done("code digest")
    supervisor.snapshots = snapshots = CrashSnapshot(notifier)
    try:
        await supervisor.start()
    except BaseException:
        supervisor.pool.stopping = True
        try:
            if supervisor.upgrade.resumed:
                # The watchdog pinged on: systemd 252 still enforces it after
                # STOPPING=1 in a reload's state, and the drain lasts minutes.
                await _drain_after_failed_resume(supervisor, notifier)
            else:
                supervisor.pool.kill_workers()
                await supervisor.pool.wait_workers(STOP_GRACE)
        finally:
            watchdog.cancel()
            if limit_read is not None:
                limit_read.cancel()
        # Its workers are gone: the next start (Restart=) reads the files, but
        # keeps the certificate served over one a reload would refuse.
        supervisor.snapshots = None
        _keep_certificate_for_next_start(supervisor, snapshots)
        await supervisor.close()
        raise
    await supervisor.poller.wait_first_probes(timeout=FIRST_PROBE_WAIT)
    watchdog.cancel()
    gc.collect()
    gc.freeze()
    notifier.notify("READY=1", f"STATUS={supervisor.status_line()}", f"MAINPID={os.getpid()}")
    # Not awaited: a file slow to read (a stalled mount) held back the tasks
    # below, the watchdog's pings among them (WatchdogSec= then aborted it).
    ready_line = loop.create_task(_log_ready(supervisor))

    def reloader_failed() -> None:
        _reloader_failed(supervisor, notifier)

    background = [
        loop.create_task(
            kept_running(
                RELOADER,
                lambda: _reload_on_signal(supervisor, supervisor.reloads_asked, notifier),
                failures,
                after_failure=reloader_failed,
            )
        ),
        loop.create_task(
            kept_running(
                SYSTEMD_STATUS, lambda: _keep_systemd_informed(supervisor, notifier), failures
            )
        ),
        loop.create_task(
            kept_running(STATE_SNAPSHOTS, lambda: _write_snapshots(supervisor), failures)
        ),
        loop.create_task(
            kept_running(ADMIN_SOCKET, lambda: _keep_admin_socket(supervisor), failures)
        ),
        # As a worker does: the slot requests, reports and probes of every call
        # on the host churn this heap too, and glibc kept what they freed (its
        # RSS climbed with the calls, nothing leaking: the leak audit of session 33).
        loop.create_task(trim_heap()),
    ]
    await stop.wait()
    for task in [*background, ready_line, *([limit_read] if limit_read else [])]:
        task.cancel()
    supervisor.snapshots = None  # a stop: nothing to take up but the certificate served
    _keep_certificate_for_next_start(supervisor, snapshots)
    supervisor.answer_pending_reloads("the ingress is stopping: not reloaded")
    await supervisor.stop_accepting()
    notifier.notify("STOPPING=1", f"STATUS=draining: {supervisor.status_line()}")
    drain = supervisor.config.timeouts.drain
    await supervisor.pool.wait_workers(drain + STOP_GRACE)
    await supervisor.close()
    log.info("stopped")
    notifier.close()
    return 0


async def _read_store_limit(notifier: Notifier) -> None:
    """The unit's FileDescriptorStoreMax= (`read_store_max`), as the supervisor
    starts, where $FDSTORE does not say it; a reload's read (`recheck_fd_store`)
    that came first stands."""
    try:
        limit = await asyncio.to_thread(read_store_max, timeout=STORE_MAX_READ)
    except Exception:
        log.exception("reading the unit's FileDescriptorStoreMax= failed")
        limit = None
    notifier.limit_known(limit if notifier.store_max is None else None)


async def _log_ready(supervisor: Supervisor) -> None:
    """The "ready" line. What the environment sets, over the file: unseen, a
    value left in the unit's Environment= outlived every edit of the file (as
    `check` says). The file is read off the loop, as a reload reads it: after
    READY=1 the workers' slot requests are this loop's to answer."""
    env = await asyncio.to_thread(environment_values, supervisor.config_path)
    from_env = {"environment": env} if env else {}
    if unread := unread_variables_said_by_run():
        log.warning("environment variables that set nothing", extra=fields(variables=unread))
    log.info("ready", extra=fields(status=supervisor.status_line(), **from_env))


async def _drain_after_failed_resume(supervisor: Supervisor, notifier: Notifier) -> None:
    """After an upgrade's exec every worker carries calls: the new image that
    cannot start (a bug of the new release its trial run could not meet) tells
    them to stop accepting and drain, and waits for them as the unit's main
    process, `timeouts.drain` at most, rather than kill them (the
    supervisor-crash audit of session 26: every call on the host was cut). A
    worker whose channel this image had not taken up yet sees it end (closed
    here) and drains on its own. So does a supervisor started again after a
    crash that cannot take up its predecessor's workers (a bug)."""
    if supervisor.upgrade.crash_restart:
        log.critical(
            "the supervisor started again after a crash cannot take up its predecessor's "
            "workers: every worker stops accepting and drains its calls, then the supervisor "
            "exits; a bug: report it with this traceback",
            exc_info=True,
        )
        status = "the supervisor started after a crash could not take up its workers: draining"
    else:
        log.critical(
            "the supervisor cannot go on after the upgrade's re-execution: every worker stops "
            "accepting and drains its calls, then the supervisor exits; reinstall the release "
            "that ran, then start the service",
            exc_info=True,
        )
        status = "the upgraded supervisor could not start: draining"
    notifier.notify("STOPPING=1", f"STATUS={status}")
    deadline = time.monotonic() + supervisor.config.timeouts.drain + STOP_GRACE
    try:
        await supervisor.stop_accepting()
    except Exception:
        log.exception("telling the workers to stop failed: they drain as their channels end")
    for sock in supervisor.handed.values():
        sock.close()
    supervisor.handed.clear()
    # Workers of the previous image this one had not taken up (it failed first)
    # are its children all the same: waited for too, or systemd would kill them,
    # and their calls, as this process exits (the review of session 26).
    # Patient: workers stopped with this process (a paused VM) past the
    # deadline close their calls (1001) first; killed at once, they were cut.
    # Asked from the start, while the adopted workers are waited for too: a
    # stall then, made after, went unseen (the others killed on its first ask).
    kill_at = PatientDeadline(deadline, _CHILDREN_EVERY, _STALL_GRACE)
    asking = asyncio.create_task(_keep_asking(kill_at))
    try:
        await supervisor.pool.wait_workers(max(0.0, deadline - time.monotonic()))
    finally:
        asking.cancel()
    while left := children_running():
        if kill_at.passed():
            for pid in left:
                log.error("worker still running after the drain: killed", extra=fields(pid=pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        await asyncio.sleep(_CHILDREN_EVERY)


async def _keep_asking(deadline: PatientDeadline) -> None:
    """Ask `deadline` every _CHILDREN_EVERY, so that it sees a stall meanwhile."""
    while True:
        deadline.passed()
        await asyncio.sleep(_CHILDREN_EVERY)


def _block_held_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_OVER_EXEC)


async def _threads_without_held_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Every thread but this one blocks HELD_OVER_EXEC. A signal goes to any
    thread that does not block it: one taken by a helper thread while the main
    thread blocks them for an exec would be consumed, and lost with the old
    image. Threads inherit the mask of the thread that starts them: the
    executor's set it themselves, libuv's pool (uvloop's getaddrinfo, file
    work) is started here, all at once, while this thread blocks them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_OVER_EXEC)
    loop.set_default_executor(
        ThreadPoolExecutor(thread_name_prefix="supervisor", initializer=_block_held_signals)
    )
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(2.0):  # the pool starts at the ask; the answer does not matter
            await loop.getaddrinfo("localhost", None)


def _exit_now(supervisor: Supervisor) -> None:
    supervisor.pool.kill_workers()
    flush_lines(EXIT_FLUSH_WAIT)
    os._exit(0)


async def _reload_on_signal(
    supervisor: Supervisor, reloads: asyncio.Queue[ReloadAsked], notifier: Notifier
) -> None:
    """The reloads asked (SIGHUP, `fleet-ingress reload`), one round at a time:
    every ask waiting when a round begins is answered by that round, which reads
    the files after each of them was asked; one that comes while a round runs
    waits for the next (its edit may have come after the round's read). A burst
    (a configuration tool's SIGHUP per file it changed) is a round, then one
    for what came during each (100 SIGHUPs 1 ms apart: 6-12 rounds of 10-50 ms,
    not 78-98), the last change never lost. Who asked with a future is told
    how its round went (`reload_outcome`'s dict)."""
    config_path = supervisor.config_path
    logging_in_use = (supervisor.config.log.level, supervisor.config.log.format)
    while True:
        asked = [await reloads.get()]
        while not reloads.empty():
            asked.append(reloads.get_nowait())
        supervisor.reload_in_hand = asked
        notifier.notify("RELOADING=1", monotonic_usec())
        try:
            await supervisor.recheck_fd_store()
        except Exception:  # never in the reload's way
            log.exception("systemd's fd store could not be checked again")
        try:
            summary = await supervisor.reload()
        except ReloadRefused as exc:
            log.error(
                "reload refused: the running configuration stays",
                extra=fields(config=str(config_path), error=str(exc), asked=len(asked)),
            )
            _ready_unless_upgrading(
                supervisor,
                notifier,
                f"STATUS=reload refused ({exc}); still serving the previous config",
            )
            tell(asked, supervisor.last_reload)
            continue
        except Exception:  # a bug must not take the service down
            log.exception("reload failed", extra=fields(config=str(config_path)))
            _ready_unless_upgrading(supervisor, notifier, "STATUS=reload failed; see the log")
            outcome = reload_outcome("the reload failed: a bug, logged as 'reload failed'")
            tell(asked, {**outcome, "result": "failed"})
            continue
        log_config = supervisor.config.log
        if (log_config.level, log_config.format) != logging_in_use:
            logging_in_use = (log_config.level, log_config.format)
            configure_logging(*logging_in_use, pid=True)
        log.info(
            "reloaded", extra=fields(config=str(config_path), changes=summary, asked=len(asked))
        )
        _ready_unless_upgrading(supervisor, notifier, f"STATUS={supervisor.status_line()}")
        tell(asked, supervisor.last_reload)


def _reloader_failed(supervisor: Supervisor, notifier: Notifier) -> None:
    """The reload task crashed: whoever asked is told, and systemd hears the
    reload is over as after any round: no READY=1 while an upgrade is under
    way (`_ready_unless_upgrading`); before, a crash mid-upgrade told systemd
    the upgrade's RELOADING=1 was over."""
    outcome = reload_outcome("the reload failed: a bug, logged as 'supervisor task failed'")
    tell(supervisor.reload_in_hand, {**outcome, "result": "failed"})
    _ready_unless_upgrading(supervisor, notifier, "STATUS=reload failed; see the log")


def _ready_unless_upgrading(supervisor: Supervisor, notifier: Notifier, status: str) -> None:
    """READY=1 once a reload's round is over, but not while an upgrade is under
    way (its RELOADING=1 said, before or during the round): systemd would read
    the upgrade as over, and its STATUS lose "upgrading"; the upgrade's own
    READY=1 (the new image's, or the one said when it is abandoned) ends both."""
    latest = supervisor.upgrade.latest
    if latest is not None and latest["state"] not in FINISHED:
        notifier.notify(f"{status} (an upgrade is under way)")
        return
    notifier.notify("READY=1", status)


async def _ping_watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 while starting (before READY=1, after an upgrade's exec too),
    as often as `_keep_systemd_informed` pings once serving."""
    if notifier.watchdog_interval is None:
        return
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(min(WATCHDOG_PING_EVERY, notifier.watchdog_interval))


def _keep_certificate_for_next_start(supervisor: Supervisor, snapshots: CrashSnapshot) -> None:
    """At a stop or a failed start: the state in the store written over with the
    certificate served alone (`CrashSnapshot.stopped`), for the next start; the
    session ticket keys taken out of it (the next start draws its own)."""
    if supervisor.notifier is not None:
        supervisor.notifier.remove_fd(TICKET_KEYS_NAME)
    try:
        snapshots.stopped(supervisor.serving_pem)
    except Exception:  # a bug: the stop goes on (the next start serves the files)
        count_unexpected_error()
        log.exception("the certificate served could not be kept for the next start")
        snapshots.discard()


async def _write_snapshots(supervisor: Supervisor) -> None:
    """The supervisor's state in systemd's fd store every SNAPSHOT_EVERY (and
    at each scrape and operator change: `Supervisor.write_snapshot`), for the
    process systemd starts should this one die (`service.fd_store`). Encoded
    in turns: the loop leases every new call its slot meanwhile."""
    while True:
        # The kernel's count of OOM kills, read as often: a SIGKILL death read
        # next is weighed against it, and a supervisor started after this one
        # died compares its own with the one the snapshot carries.
        supervisor.oom_verdict.look_for_oom_kills()
        if supervisor.snapshots is not None:
            # Written when what a crash restart takes up at once moved, else
            # every QUIET_WRITE_EVERY (`CrashSnapshot.keep_up`, `snapshot_pace`).
            await supervisor.snapshots.keep_up(supervisor.upgrade.crash_snapshot)
        await sleep_to_tick(SNAPSHOT_EVERY)


async def _keep_admin_socket(supervisor: Supervisor) -> None:
    """`KeptAdminSocket.keep_admin_socket` every ADMIN_SOCKET_LOOK_EVERY."""
    while True:
        await sleep_to_tick(ADMIN_SOCKET_LOOK_EVERY)  # the snapshots' tick: one wake-up
        await supervisor.kept_admin_socket.keep_admin_socket(supervisor.pool.stopping)


async def _keep_systemd_informed(supervisor: Supervisor, notifier: Notifier) -> None:
    """STATUS= every STATUS_EVERY, and WATCHDOG=1 every WATCHDOG_PING_EVERY:
    the ping comes from the supervisor's event loop itself, so a stuck loop
    stops it, and systemd ends the unit once the loop has been stuck for
    WatchdogSec, not after as little as half of it (a ping at half of it let
    a stall of 15 s end every call on the host, the pressure audit of session 16)."""
    watchdog = notifier.watchdog_interval
    every = STATUS_EVERY if watchdog is None else min(WATCHDOG_PING_EVERY, watchdog)
    status_due = 0.0
    loop = asyncio.get_running_loop()
    while True:
        # The ping on its own, first: a status line that cannot be made must not
        # hold it back (systemd would end the unit, every call on the host, for
        # want of it: the supervisor-crash audit of session 26).
        if watchdog is not None:
            notifier.notify("WATCHDOG=1")
        if loop.time() >= status_due:
            # Less half a tick: due on the tick STATUS_EVERY on, though this one
            # ran late (a busy loop; the clock may also read a tick a hair
            # early). Due a full STATUS_EVERY after a late tick, a line every
            # 10 s became one every 20 s now and then on a loaded host.
            status_due = loop.time() + STATUS_EVERY - every / 2
            notifier.notify(f"STATUS={supervisor.status_line()}")
            # The files looked at for the next line, not waited for here: a
            # refused certificate shows in `systemctl status` too.
            supervisor.look_at_files_soon()
        await sleep_to_tick(every)
