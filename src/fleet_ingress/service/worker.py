"""A worker process of `fleet-ingress run` (SPEC 13): it serves carriers.

Started by the supervisor (`service.supervisor`) as `python -m fleet_ingress
worker -c CONFIG --generation N`, with the listening sockets and its end of
a channel to the slot coordinator inherited (`service.listen_fds`: named in
`FLEET_INGRESS_LISTEN_FDS`). Its `Ingress` takes every call's fleet slot
from the coordinator (`net.slot_client.SlotClient`) and runs no poller,
admin socket or stats listener: those are the supervisor's, once for the host.
Its log lines (the access log too) go to the stderr it shares with the
supervisor, each naming its pid.

On its channel, beside the slots (`net.slot_wire`), the supervisor sends:

    {"op": "reload", "id": N, "config": "{...}"}   reload certificate and settings;
                                     answered {"op": "reloaded", "id": N, "ok": true} (or
                                     "error"). "config": the configuration the supervisor
                                     read, checked and applied (`config_to_json`), which the
                                     worker applies rather than read the file again (it may
                                     have changed since). Without it (a supervisor of an
                                     older release) the worker reads the file; a worker of
                                     an older release ignores it and reads the file too.
                                     "pem": the certificate chain and key the supervisor
                                     read and checked (`pem_to_json`), loaded rather than
                                     the files read again; without it, the files are read.
                                     "ticket_keys": the keys every worker seals its TLS
                                     session tickets with (`ticket_keys_to_json`), new with
                                     each certificate; without them, OpenSSL's own.
                                     A worker's own SIGHUP is not acted on (logged): read
                                     here alone, it left this worker on files the
                                     supervisor and the other workers never read.
    {"op": "stop", "id": N}          stop accepting, drain the calls, exit; answered
                                     {"op": "stopping", "id": N} once the listeners closed
    {"op": "stop", "id": N, "upgrade": true, "drain": S}   the same for an old generation
                                     after an upgrade: connections accepted but not yet calls
                                     (TLS handshake, head) are kept and become calls; the
                                     calls may go on S seconds (timeouts.upgrade_drain; 0:
                                     until they end; absent: timeouts.drain). A plain stop
                                     after it (SIGTERM) shortens that to timeouts.drain
    {"op": "stop", "cut": true}      (a second signal) close every call now
    {"op": "close-fleet", "fleet": "a", "id": N}   remove-fleet --force: close that
                                     fleet's calls; answered {"op": "fleet-closed", "id": N,
                                     "closed": n} once they are gone (n: how many it
                                     closed; without an id, from a supervisor of an older
                                     release, not answered)
    {"op": "list-calls", "id": N, "filter": {"fleet"?, "bot"?, "longer_than"?}}
                                     `fleet-ingress calls`: answered {"op": "calls-listed",
                                     "id": N, "calls": [row, ...], "more": true} a part at a
                                     time (`net.calls.LIST_TURN` calls read a turn), then
                                     its calls closing as parts {..., "calls": [],
                                     "closing": [row, ...]}, the last part "more": false
    {"op": "end-call", "id": N, "call": 17, "why": "...", "tag": "k3f9"}   `fleet-ingress
                                     end-call`: end that call (end_reason admin); answered
                                     once it is gone {"op": "call-ended", "id": N, "call":
                                     row}, row null when it holds no such call, or when
                                     "tag" (the id's; null: none given) is not this
                                     process's (then with its own "tag")

and the worker says `{"op": "serving"}` once it accepts carriers (an upgrade
waits for that from every new worker before the old generation stops).

When the coordinator is gone (the supervisor died: its end of the channel
closed), no slot can be had any more: the worker stops accepting, lets its
calls finish (`timeouts.drain`) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from fleet_ingress.config.settings import (
    ConfigError,
    IngressConfig,
    config_from_json,
    drain_from_wire,
)
from fleet_ingress.core.call_list import CallFilter
from fleet_ingress.core.call_machine import EndReason
from fleet_ingress.core.call_table import TableOfAnotherRelease
from fleet_ingress.logs import configure_logging, fields, flush_lines
from fleet_ingress.net.call_table_map import CALL_TABLE_ENV, CallTableWriter
from fleet_ingress.net.calls import end_call, list_live_then_closing, process_tag
from fleet_ingress.net.event_loop import count_unexpected_error
from fleet_ingress.net.fleet_down import give_up_leases
from fleet_ingress.net.late_timers import patient_timeout
from fleet_ingress.net.slot_client import SlotClient
from fleet_ingress.net.tls import CarrierPem
from fleet_ingress.ops.fleet_ops import FORCED_ABORT_WAIT, FORCED_REMOVAL_WAIT
from fleet_ingress.ops.host_stats import WorkerReporter, calls_bytes
from fleet_ingress.release import code_digest
from fleet_ingress.service import glibc_malloc
from fleet_ingress.service.carrier_certificate import (
    SERVING_CERTIFICATE_ENV,
    SERVING_PEM_ENV,
    SERVING_TICKET_KEYS_ENV,
    certificate_not_taken,
    pem_from_env,
    pem_from_json,
    serving_leaf_from_env,
    ticket_keys_from_env,
    ticket_keys_from_json,
)
from fleet_ingress.service.ingress import (
    RUNNING_CONFIG_ENV,
    Ingress,
    ReloadRefused,
)
from fleet_ingress.service.kept_running import failed_task_callback
from fleet_ingress.service.lifecycle import (
    EXIT_FLUSH_WAIT,
    SECOND_SIGNAL_GRACE,
    say_signal_ignored,
    trim_heap,
)
from fleet_ingress.service.process_start import IGNORED_SIGNALS
from fleet_ingress.service.start_collector import collector_back_on
from fleet_ingress.service.upgrade import REEXEC_READ_PATIENCE
from fleet_ingress.service.worker_process import WORKER_RANK_ENV

log = logging.getLogger("fleet_ingress.worker")

# How long a lease request may wait for the coordinator's answer beyond the
# queue timeout (which the coordinator enforces itself): the supervisor's
# re-execution in an upgrade (0.4-0.5 s measured, docs/WORKERS.md) with room
# for a loaded host. A call waits this long at most; none is refused for it.
# Plus how long the new image may read its files again (one caught half-written).
REEXEC_ALLOWANCE = 10.0 + REEXEC_READ_PATIENCE
# Stop signals this close together are one stop, not a second signal (which
# cuts every call): a signal to the whole group (Ctrl-C, `systemctl kill`)
# reaches a worker without its channel and, through the supervisor, again: on a
# loaded host the supervisor's came over 1 s after (a test run beside other
# suites, session 24), so a person's second Ctrl-C must wait this long to cut.
SAME_SIGNAL_WITHIN = 5.0
# Drained, the worker waits this long at most for its channel, its final report
# in it, to flush: a supervisor that reads nothing (stopped, its loop held)
# does not hold its exit longer. One that reads again within it gets the final
# report; after it, what the kernel did not take is lost with the process, and
# the worker's counts with it.
CHANNEL_FLUSH_WAIT = 1.0


def answer_timeout(config: IngressConfig) -> float:
    return config.timeouts.queue + REEXEC_ALLOWANCE


class Worker:
    def __init__(
        self,
        config: IngressConfig,
        config_path: Path,
        client: SlotClient,
        listeners: dict[str, socket.socket],
        pem: CarrierPem | None = None,
        ticket_keys: bytes | None = None,
        rank: int = 0,
    ) -> None:
        self.config_path = config_path
        self.client = client
        self.ingress = Ingress(
            config,
            [],
            leases=client,
            sockets=listeners,
            pem=pem,
            ticket_keys=ticket_keys,
            accept_rank=rank,
        )
        self.stop = asyncio.Event()
        self.keep_pending = False  # an upgrade's stop: keep what was accepted
        self.drain: float | None = None  # an upgrade's stop: timeouts.upgrade_drain's
        # What this worker counts, for the supervisor's host-wide stats.
        client.reporter = WorkerReporter(
            self.ingress.registry,
            lambda: client.fleets.values(),
            self.ingress.metrics.histograms,
            draining=self.stop.is_set,
            forgotten=lambda: client.forgotten,
        )
        client.calls_bytes = lambda: calls_bytes(self.ingress.registry)
        self.ingress.registry.on_counted.append(client.report_soon)
        client.live = lambda: bool(self.ingress.registry.calls)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._logging = (config.log.level, config.log.format)
        client.handlers["reload"] = lambda m: self._spawn(
            self._reload(m.get("id"), m.get("config"), m.get("pem"), m.get("ticket_keys"))
        )
        client.handlers["stop"] = self._on_stop
        client.handlers["close-fleet"] = lambda m: self._spawn(
            self.close_fleet(str(m["fleet"]), m.get("id"))
        )
        client.handlers["list-calls"] = lambda m: self._spawn(
            self.list_calls(m.get("id"), CallFilter.from_wire(m.get("filter")))
        )
        client.handlers["fleet-down"] = lambda m: give_up_leases(self.ingress.registry, m)
        client.handlers["end-call"] = lambda m: self._spawn(
            self.end_call(m.get("id"), m.get("call"), m.get("why"), m.get("tag", ...))
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(say_if_task_failed)

    def _on_stop(self, message: dict[str, Any]) -> None:
        if message.get("cut"):
            log.warning("closing every call now (second signal)")
            self.ingress.cut_drain()
        upgrade = bool(message.get("upgrade")) and not message.get("cut")
        self.begin_stop(
            keep_pending=upgrade, drain=drain_from_wire(message.get("drain")) if upgrade else None
        )
        if "id" in message and not message.get("cut"):
            self.client.send({"op": "stopping", "id": message["id"]})

    def begin_stop(self, *, keep_pending: bool = False, drain: float | None = None) -> None:
        """`drain`: how long the calls may go on (an upgrade's; None: timeouts.drain)."""
        if self.stop.is_set():
            if not keep_pending:  # a plain stop wins, its drain too (SIGTERM after an upgrade)
                self.ingress.shorten_drain(self.ingress.config.timeouts.drain)
            keep_pending = self.keep_pending and keep_pending
        else:
            self.drain = drain
        self.keep_pending = keep_pending
        self.ingress.stop_accepting(keep_pending=keep_pending)
        # Its standing grant budget (if any) would hold slots it no longer uses.
        self.client.decline_standing()
        self.stop.set()

    async def _reload(
        self, ask: Any, handed: Any = None, handed_pem: Any = None, handed_keys: Any = None
    ) -> None:
        """`handed`: the supervisor's configuration (`config_to_json`), applied
        as it is; None: the file is read (see the module's docstring).
        `handed_pem`: its certificate and key (`pem_to_json`), likewise;
        `handed_keys`: its session ticket keys (`ticket_keys_to_json`)."""
        try:
            config = pem = None
            if handed is not None:
                try:
                    config = config_from_json(str(handed), base_dir=self.config_path.parent)
                except ConfigError as exc:
                    raise ReloadRefused(str(exc)) from None
            if handed_pem is not None:
                try:
                    pem = pem_from_json(handed_pem)
                except ValueError as exc:
                    raise ReloadRefused(str(exc)) from None
            keys = ticket_keys_from_json(handed_keys)
            await self.ingress.reload(self.config_path, config, pem, keys)
        except ReloadRefused as exc:
            log.error("reload refused in this worker", extra=fields(error=str(exc)))
            answer: dict[str, Any] = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not take the worker's calls down
            log.exception("reload failed in this worker")
            answer = {"ok": False, "error": repr(exc)}
        else:
            config = self.ingress.config
            self.client.answer_timeout = answer_timeout(config)
            if (config.log.level, config.log.format) != self._logging:
                self._logging = (config.log.level, config.log.format)
                configure_logging(*self._logging, pid=True)
            log.debug("reloaded")
            answer = {"ok": True}
        if ask is not None:
            self.client.send({"op": "reloaded", "id": ask, **answer})

    async def close_fleet(self, name: str, ask: Any = None) -> None:
        """remove-fleet --force: this worker's calls on `name` end now. Asked
        with an `id`, answered `fleet-closed` with how many it closed once they
        are gone: the count remove-fleet prints is the workers' own."""
        registry = self.ingress.registry
        calls = registry.calls_on(name)
        try:
            if not calls:
                return
            log.info("closing a removed fleet's calls", extra=fields(fleet=name, calls=len(calls)))
            try:
                for call in calls:
                    call.end(EndReason.REMOVED)
                # As in-process: what does not close in time (a fleet that never reads
                # the TLS close) is aborted, so the fleet's slots come back. Patient:
                # the close replies that came while the worker was stopped are read
                # first (they were aborted unread: no TLS close, a RST).
                with contextlib.suppress(TimeoutError):
                    async with patient_timeout(FORCED_REMOVAL_WAIT):
                        while registry.calls_on(name):  # noqa: ASYNC110 - no event per fleet; 3 s at most
                            await asyncio.sleep(0.05)
            finally:
                # Also when ending one raised (a bug, said by `say_if_task_failed`):
                # the operator asked for them all gone.
                for call in registry.calls_on(name):
                    call.abort()
            await asyncio.sleep(min(FORCED_ABORT_WAIT, 0.1))
        finally:
            if ask is not None:  # also when ending one raised: all were closed
                self.client.send({"op": "fleet-closed", "id": ask, "closed": len(calls)})

    async def list_calls(self, ask: Any, wanted: CallFilter) -> None:
        """`fleet-ingress calls`: this worker's calls, a part a turn (one line
        of some 36 KB each, not one of megabytes encoded in one piece); then
        those ended whose sides are still closing, in parts that say them as
        `closing` (a supervisor reads a worker without that key as of a
        release before it)."""
        pid, generation = os.getpid(), self.client.generation
        registry = self.ingress.registry
        try:
            async for closing, rows in list_live_then_closing(registry, wanted, pid, generation):
                part = {"op": "calls-listed", "id": ask, "calls": rows, "more": True}
                if closing:
                    part.update(calls=[], closing=rows)
                self.client.send(part)
        finally:  # also when a row failed (a bug): the supervisor is not left waiting
            self.client.send(
                {"op": "calls-listed", "id": ask, "calls": [], "closing": [], "more": False}
            )

    async def end_call(self, ask: Any, call_id: Any, why: Any, tag: Any) -> None:
        """`tag`: the id's, as the supervisor read it (None: `PID-N` alone; `...`:
        a supervisor of a release before tags, which says none)."""
        row: dict[str, Any] | None = None
        if tag is not ... and tag != process_tag():
            # Not this process's call (a pid come back): the supervisor did not
            # know this worker's tag yet (kept over its exec, its state unread).
            self.client.send({"op": "call-ended", "id": ask, "call": None, "tag": process_tag()})
            return
        try:
            if type(call_id) is int:
                row = await end_call(
                    self.ingress.registry,
                    call_id,
                    str(why or ""),
                    os.getpid(),
                    self.client.generation,
                )
        finally:
            self.client.send({"op": "call-ended", "id": ask, "call": row})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        signals = 0
        first_at = 0.0

        def on_stop_signal(signum: int) -> None:
            # The supervisor normally says `stop` on the channel; a terminal's
            # Ctrl-C (or a signal sent to the whole group) reaches us too, and a
            # worker without its channel hears the stop from the supervisor's
            # SIGTERM as well: signals within SAME_SIGNAL_WITHIN are one stop.
            nonlocal signals, first_at
            if signals and loop.time() - first_at < SAME_SIGNAL_WITHIN:
                return
            signals += 1
            first_at = first_at or loop.time()
            if signals > 1:
                self.ingress.cut_drain()
                loop.call_later(SECOND_SIGNAL_GRACE, _exit_now)
            self.begin_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, _own_sighup)
        for sig in IGNORED_SIGNALS:
            loop.add_signal_handler(sig, say_signal_ignored, sig)
        await self.ingress.start()
        self.client.send({"op": "serving"})
        gc.collect()
        gc.freeze()
        collector_back_on()  # off since the process started (`start_collector`)
        trim = loop.create_task(trim_heap())
        lost = asyncio.ensure_future(self.client.lost)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({lost, stopping}, return_when="FIRST_COMPLETED")
        if not self.stop.is_set():
            log.error(
                "the supervisor's slot coordinator is gone: no new calls here; "
                "finishing the calls, then exiting",
                extra=fields(calls=len(self.ingress.registry.calls)),
            )
        stopping.cancel()
        await self.ingress.stop(self.drain, keep_pending=self.keep_pending)
        trim.cancel()
        # Drained: what it counted goes into the host's totals as its channel ends.
        self.client.send_report(final=True)
        self.client.close()
        # Patient (net.late_timers): after a stall the channel's close, its final
        # report flushed, is read before the wait is given up.
        with contextlib.suppress(TimeoutError):
            async with patient_timeout(CHANNEL_FLUSH_WAIT):
                await self.client.lost


def call_table_from_env() -> CallTableWriter | None:
    """The call table the supervisor made for this worker (CALL_TABLE_ENV),
    None without one. One that cannot be mapped is said and done without:
    every call is then told the supervisor as before, none held."""
    try:
        return CallTableWriter.from_env()
    except TableOfAnotherRelease as exc:
        log.warning(
            "worker's call table was made by a supervisor of another release: its calls "
            "are told the supervisor one by one instead, as before the tables; expected "
            "until the supervisor runs this release (`fleet-ingress upgrade`)",
            extra=fields(error=f"{CALL_TABLE_ENV}: {exc}"),
        )
        return None
    except (OSError, ValueError) as exc:
        log.error(
            "worker's call table cannot be mapped: its calls are told the supervisor "
            "one by one instead (a bug, report it)",
            extra=fields(error=f"{CALL_TABLE_ENV}: {exc}"),
        )
        return None


async def serve(
    config: IngressConfig,
    config_path: Path,
    listeners: dict[str, socket.socket],
    channel: socket.socket,
    generation: int,
    pem: CarrierPem | None = None,
    ticket_keys: bytes | None = None,
    rank: int = 0,
) -> None:
    client = await SlotClient.connect(
        sock=channel,
        pid=os.getpid(),
        generation=generation,
        answer_timeout=answer_timeout(config),
        hello=False,
    )
    client.tag = process_tag()
    client.table = call_table_from_env()
    worker = Worker(config, config_path, client, listeners, pem, ticket_keys, rank)
    # Only now: the supervisor may say `stop` as soon as it reads our hello,
    # and an op with no handler yet would be ignored (an unknown op).
    client.say_hello()
    await worker.run()


def run_worker(config_path: Path, generation: int, *, cpu: int | None = None) -> int:
    """The `worker` entry point: exits 0 once drained, 2 when it cannot start.
    `cpu`: run on that CPU only (process.cpu_affinity), before any thread starts."""
    from fleet_ingress.config.settings import load_config
    from fleet_ingress.net import event_loop
    from fleet_ingress.net.tls import TLSSetupError
    from fleet_ingress.service.listen_fds import COORDINATOR, ListenFdsError, adopt

    # SIGUSR2 and SIGHUP are ignored since the process's first line
    # (fleet_ingress/__main__.py, which the supervisor starts workers through).
    # First: every thread started after (the log writer's, the executor's) inherits it.
    pin_failed = _pin_to(cpu) if cpu is not None else None
    try:
        socks = adopt()
        channel = socks.pop(COORDINATOR, None)
        if channel is None or "listen.wss" not in socks:
            raise ListenFdsError(
                "a worker runs under `fleet-ingress run`, which hands it the listeners and "
                "its channel; start `fleet-ingress run -c CONFIG` instead"
            )
        handed = os.environ.get(RUNNING_CONFIG_ENV)  # the supervisor's; else the file
        if handed:
            config = config_from_json(handed, base_dir=config_path.parent)
        else:
            config = load_config(config_path)
        configure_logging(config.log.level, config.log.format, pid=True)
    except (ListenFdsError, ConfigError) as exc:
        print(f"fleet-ingress worker {os.getpid()}: {exc}", file=sys.stderr)
        return 2
    try:
        # The certificate and key the supervisor serves (and checked), not the
        # files as they are now: see SERVING_PEM_ENV.
        pem = pem_from_env(os.environ.get(SERVING_PEM_ENV))
    except (OSError, ValueError) as exc:
        log.error("worker cannot serve", extra=fields(error=f"{SERVING_PEM_ENV}: {exc}"))
        return 2
    if pem is None:  # started by a supervisor of an older release: it reads the files
        serving = serving_leaf_from_env(os.environ.get(SERVING_CERTIFICATE_ENV))
        if (problem := certificate_not_taken(config, serving)) is not None:
            log.error(
                "worker cannot serve: the certificate on disk is not taken in place of the "
                "one in use (the other workers serve it); fix it and reload",
                extra=fields(error=problem),
            )
            return 2
    # Shared with the other workers, so that a carrier's session resumes on any
    # of them; None (not handed, or unreadable): OpenSSL's own, as before.
    ticket_keys = ticket_keys_from_env(os.environ.get(SERVING_TICKET_KEYS_ENV))
    glibc_malloc.pin_mmap_threshold()
    _prefer_for_oom_kill()
    code_digest()  # read now, not on the loop at its first report with calls live
    if cpu is not None:
        _say_pinned(cpu, pin_failed)
    try:
        event_loop.run(
            serve(config, config_path, socks, channel, generation, pem, ticket_keys, _rank())
        )
    except (TLSSetupError, ValueError, OSError) as exc:
        log.error("worker cannot serve", extra=fields(error=str(exc)))
        return 2
    return 0


# How much more the kernel's OOM killer prefers a worker to the supervisor. A
# worker killed costs its own calls (it is replaced at once); the supervisor
# killed costs every call on the host (systemd restarts the unit). They are
# about the same size, so without it the kernel picked either (the audit of
# session 16 saw the supervisor go first). Raising one's own score needs no
# privilege; the kernel caps it at 1000.
OOM_SCORE_RAISE = 500
OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")


def _prefer_for_oom_kill() -> None:
    try:
        now = int(OOM_SCORE_ADJ.read_text())
        OOM_SCORE_ADJ.write_text(str(min(1000, now + OOM_SCORE_RAISE)))
    except (OSError, ValueError) as exc:  # not Linux, or a sandbox forbids it
        log.warning(
            "cannot make this worker the OOM killer's first choice over the supervisor",
            extra=fields(error=str(exc)),
        )


# A one-off task of the worker's (a reload, a removed fleet's calls closed) that
# raised: said with its traceback and counted as a bug, not left to asyncio's
# "exception never retrieved" when the task is collected (if ever).
say_if_task_failed = failed_task_callback(
    "worker task failed: a bug, report it", lambda _task: count_unexpected_error(), log
)


def _rank() -> int:
    """This worker's rank in its generation, as the supervisor set it
    (WORKER_RANK_ENV; 0 if none: a supervisor of an older release)."""
    try:
        return max(0, int(os.environ.get(WORKER_RANK_ENV, "0")))
    except ValueError:
        return 0


def _pin_to(cpu: int) -> str | None:
    """process.cpu_affinity: this worker on `cpu` only; why not, if it cannot be.
    A CPU that went away since the supervisor chose it (a cpuset or hotplug
    change) is not worth refusing to serve for: the worker runs where the kernel
    puts it."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _say_pinned(cpu: int, failed: str | None) -> None:
    if failed is not None:
        log.warning(
            "cannot pin this worker to its CPU (process.cpu_affinity): it runs unpinned",
            extra=fields(cpu=cpu, error=failed),
        )
    else:
        log.info("worker pinned to its CPU (process.cpu_affinity)", extra=fields(cpu=cpu))


def _exit_now() -> None:
    """The second stop signal's end: what was logged goes out first, briefly."""
    flush_lines(EXIT_FLUSH_WAIT)
    os._exit(0)


def _own_sighup() -> None:
    """SIGHUP sent to this worker (`kill -HUP PID`, or `systemctl kill -s HUP`,
    which signals every process of the unit, the supervisor too). Only the
    supervisor reloads: it checks the files once and hands every worker what it
    checked, so that one host serves one configuration."""
    log.info(
        "SIGHUP to a worker is not acted on: the supervisor reloads every worker",
        extra=fields(
            fix="systemctl reload fleet-ingress, fleet-ingress reload, or SIGHUP to the "
            "supervisor (the unit's MainPID)"
        ),
    )
