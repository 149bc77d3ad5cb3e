"""The supervisor's slot coordinator: `HostSlots` behind Unix stream sockets.

One channel per worker: the supervisor's end of a socketpair the worker
inherited (`adopt`), or a connection to a listening Unix socket
(`serve_unix`). The channel *is* the worker's lock: when it closes (the
worker exited, crashed, was SIGKILLed; the kernel closes its end) every slot
the worker held comes back at once and its waiters leave the queue. Unless
its process still runs (`keeps_slots`, the supervisor's answer: this end cut
the channel, on a protocol violation or a failed take-back): that worker
finishes its calls without a channel, so what it held stays counted until
`release_kept` (the process exited). Nothing here decides: frames in,
`HostSlots` decides, answers out, one timer for the queue's next deadline.

Across the supervisor's own re-execution (an upgrade) the channels stay open:
`handover` gives their sockets for the exec (`service.listen_fds`), the new
image `adopt`s them with `restoring=True`, asks each worker what it holds
(`sync`), rebuilds the table from the answers and grants nothing until every
worker has answered or `finish_restore`'s timeout has passed. A worker slow
to answer keeps its channel: what the previous table said it held stays
counted (`HostSlots.reserve`) until its answer comes, however late, or its
channel closes (then it is reclaimed like any worker gone).

Standing budgets (`core.slot_budget`, `_review_standing`): while nobody waits
in the queue, each worker that said "standing" is given slots reserved in the
table to grant calls from itself, and they are taken back ("budget-end") when
a call must wait or a budget's fleet can no longer be picked.

A lone worker's budget (session 46, `_review_standing`): while one worker
is the only one on the channels, nobody waits and nothing is paused or being
restored, a worker that says "lone" is given every free slot as a standing
budget, its grants and its releases into it riding its next write. A second
worker, an exec, a restore, a queue or a pause takes it back; the other
workers' messages are parked (`_handle`) until it is dropped ("budget-dropped",
after every grant made from it), so no other grant counts a slot it holds; or
LONE_END_WAIT after, the slots it has not used taken back (session 47). A
channel that ends while its worker runs keeps the rest of its standing
budget, lone or not, reserved until `settle_lost` (it may grant until it
reads the end).

Stats: with a `view` (`core.host_view.HostView`), every worker's `report`
goes into it and a worker that leaves is retired from it; `collect_reports`
asks every worker for a fresh one and waits (bounded) for the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from typing import Any, cast

from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import (
    REPORT_OVERDUE,
    Answer,
    Granted,
    HostSlots,
    SlotProtocolError,
    WorkerRow,
)
from fleet_ingress.core.host_view import HostView, ReportError, WorkerReport
from fleet_ingress.core.slot_budget import share, standing_share
from fleet_ingress.logs import fields
from fleet_ingress.net.dispatch import take_as_full, take_as_unreachable
from fleet_ingress.net.late_timers import PatientTimer, patient_timeout, wait_patiently
from fleet_ingress.net.slot_wire import (
    MAX_WORKER_LINE,
    LineDecoder,
    UnknownOps,
    WireError,
    call_kept,
    encode,
    field,
    granted_line,
    spec_to_wire,
)

log = logging.getLogger("fleet_ingress.slots")


def channel_key(pid: int, generation: int) -> str:
    """The name a worker's channel goes under when handed on (an upgrade's
    exec, systemd's fd store): `worker.PID.GENERATION`."""
    return f"worker.{pid}.{generation}"


# Read at once from a channel kept over an exec: a few reports' worth; more
# waits for the transport.
_WAITING_READ_MAX = 4 * 1024 * 1024
# A budget names this many fleets at most (those with the most slots), and
# fewer when its line would not go in one piece (`whole_write_max`).
BUDGET_FLEETS_MAX = 100
# Linux writes a Unix stream socket's data in pieces of at most half its send
# buffer less 64 bytes, and at most a page's head plus 32 KiB
# (unix_stream_sendmsg): each piece whole or not at all, so a line no longer
# than one piece is never cut short. 32 KiB: below the piece on every kernel.
_WHOLE_WRITE_MAX = 32 * 1024
_REST_WAIT = 1.0
# A worker given no standing budget (no fleet had room) is looked at again
# this long after (seconds), or at the next `wake` (a probe, an admin change).
STANDING_RETRY = 0.5
# A worker's refused reports are said at most this often (seconds), per channel.
REPORT_REFUSED_SAID_EVERY = 60.0
# A lone worker's budget taken back (`SlotServer._review_standing`): its worker
# is given this long (seconds, in time this loop ran: `PatientTimer`) to drop
# it ("budget-dropped"); past it, the slots it has not used are taken back
# (`_lone_wait_over`: those its call table says it granted stay reserved) and
# the messages of the other workers parked meanwhile are read. Its worker
# grants nothing from the budget once "budget-end" waits unread (`slot_client`).
LONE_END_WAIT = 1.0
# After a probe (any `wake`), a worker that holds lines back ("tells_held" in
# its hello or state: its fleets' answers, a lone budget's grants, releases
# and "logged") while its leases or budget sit on a fleet whose capacity is
# counted is asked to write them now ("tell-held"), this often at most
# (seconds, loop time): the calls that probe left out as in flight are known
# answered within a round trip, not when the worker's flush comes. Asked, a
# worker lets them wait for its next write or a second (its report's pace,
# `slot_client.HELD_FLUSH_ASKED`) rather than 0.2 s: the supervisor wakes
# about once a second for them, not five times (session 48).
TELL_HELD_EVERY = 0.5
TELL_HELD_LINE = encode({"op": "tell-held"})

# Of a worker's messages, those its "state" accounts for (what it holds, waits
# for, its calls in flight, its budget): parked ones of these are dropped at a
# hand-over (`handover`), the next image (or `take_back`) reading the state.
# The others (`logged`, `full`, `unreachable`, answers to the supervisor's
# asks) are said nowhere else: read in order there (`read_parked_unstated`).
_SAID_IN_STATE = frozenset(
    {"acquire", "release", "answered", "budget-taken", "budget-dropped", "state"}
)

# What a worker may send of the slots' own (the supervisor's are `handlers`).
_WORKER_OPS = frozenset(
    {
        "hello",
        "acquire",
        "release",
        "answered",
        "full",
        "unreachable",
        "logged",
        "state",
        "report",
        "budget-taken",
        "budget-dropped",
    }
)


class HandoverError(OSError):
    """`handover` could not keep every channel; none was handed over."""


def _tag_said(message: dict[str, Any]) -> str:
    """A hello's or state's "tag", "" when none (or not a tag: no id has it)."""
    tag = message.get("tag")
    return tag if isinstance(tag, str) and 0 < len(tag) <= 16 else ""


class _Channel(asyncio.Protocol):
    def __init__(
        self,
        server: SlotServer,
        key: int,
        *,
        restoring: bool = False,
        held_before: list[str] | None = None,
        budget_before: list[str] | None = None,
        left_out_before: list[int] | None = None,
        unread: bytes = b"",
        waiting: bytes = b"",
        ended: bool = False,
    ) -> None:
        self.server = server
        self.key = key
        # Kept: CPython 3.11's get_running_loop() asks the kernel for the pid each time.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # `unread`: the head of a line the previous reader of this socket had read.
        self.decoder = LineDecoder(unread, limit=MAX_WORKER_LINE)
        # Kept over an exec: what the worker sent meanwhile, read before this end
        # writes, and whether it had closed its end (exited) by then.
        self._waiting = waiting
        self._ended = ended
        # A second descriptor of this end: what the worker sent before it closed
        # its end is read through it when a write fails (`connection_lost`).
        self._spare: socket.socket | None = None
        # Its final report was read: it had ended its calls and given their slots back.
        self.drained = False
        self.report_refused_at = -math.inf  # when a refused report of it was last said
        self.joined = False
        self.restoring = restoring  # kept across a re-execution: waits for "state"
        # What the previous image's table said it held (a fleet name a slot), if known.
        self.held_before = held_before
        # The grant budget it was given at the hand-over (a fleet name a slot):
        # counted on top of `held_before` if it is slow to answer (it may have
        # granted calls from it meanwhile).
        self.budget_before = budget_before
        # Its leases the previous image's capacity estimate left out (their call
        # in flight when the probe behind it left): told to `HostSlots.restore`.
        self.left_out_before = left_out_before
        # The calls it granted from that budget, read before its "state" (lease
        # id -> fleet name, None from a worker that does not say it): counted
        # as grants once its "state" is taken (`HostSlots.count_granted`).
        self.budget_grants: dict[int, str | None] = {}
        # It takes a lone worker's budget ("lone" in its hello or state, session
        # 46): every free slot while it is the only worker, its grants held.
        self.lone = False
        # Its messages read while a lone worker's budget stands or is being
        # taken back: acted on, in order, once it is dropped (`_unpark`).
        self.parked: list[dict[str, Any]] = []
        self.handed_over = False  # its socket went on to the next image
        self.pid: int | None = None
        self.generation: int | None = None
        self.sent_specs: dict[str, FleetSpec] = {}  # what this worker has been told
        # It drops a fleet's record when told ("forgets" in its hello or state):
        # an older worker does not know the op (some releases cut the channel).
        self.forgets = False
        # It answers "list-calls" and "end-call" ("lists_calls" in its hello or
        # state): an older worker ignores them, and would be waited for in vain.
        self.lists_calls = False
        # It grants calls from a budget while the supervisor re-executes
        # ("budgets" in its hello or state): an older worker is sent none.
        self.budgets = False
        # It takes a standing grant budget ("standing" in its hello or state,
        # `core.slot_budget`): an older worker is sent none.
        self.standing = False
        # When to look again at giving it one, none having been possible (loop time).
        self.standing_retry_at = 0.0
        # It gives up the attempts on a fleet that went DOWN when told
        # ("fleet_down" in its hello or state): an older worker is sent none.
        self.hears_down = False
        # It writes the lines it holds back when asked ("tells_held" in its
        # hello or state: "tell-held" after a probe), and when it was last asked.
        self.tells_held = False
        self.held_asked_at = -math.inf
        # The tag of its call ids ("tag" in its hello or state): None until it
        # has said, "" when it said none (a build before tags: ids `PID-N`).
        self.tag: str | None = None
        self.asked: asyncio.Future[None] | None = None  # a report asked for, not yet read
        # Judges that report overdue (`SlotServer._time_report`) unless it is read first.
        self.report_timer: PatientTimer | None = None
        self.reported: tuple[int, int] | None = None  # (pid, generation) its reports name
        self.unknown = UnknownOps()  # a newer worker's ops: logged once, ignored

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server._channels[self.key] = self
        with contextlib.suppress(OSError):  # out of descriptors: no spare, as before
            fd = self.transport.get_extra_info("socket").fileno()
            self._spare = socket.socket(fileno=os.dup(fd))
        if not self.restoring:
            return
        # What a worker sent during the exec is read before "sync" is written: a
        # worker that exited meanwhile (its final report, then its end closed)
        # makes that write fail, and the transport then closes unread.
        waiting, self._waiting = self._waiting, b""
        if waiting:
            self.data_received(waiting)  # one that breaks the protocol is closed there
        if self._ended:
            self.transport.close()  # nobody to ask: gone (connection_lost follows)
        else:
            self.send({"op": "sync"})  # not to a channel closed meanwhile

    def data_received(self, data: bytes) -> None:
        try:
            for message in self.decoder.feed(data, skip_bad=self.restoring):
                self.server._handle(self, message)
        except (WireError, SlotProtocolError) as exc:
            self.broke_protocol(exc)

    def broke_protocol(self, exc: WireError | SlotProtocolError) -> None:
        """A message the table cannot mean (a "state" naming a lease twice) is
        as broken as one that is not the protocol: the channel closes and the
        worker counts as gone (`_gone`: its slots come back)."""
        log.error(
            "slot channel closed: the worker broke the protocol",
            extra=fields(
                channel=self.key, pid=self.pid, generation=self.generation, error=str(exc)
            ),
        )
        self.parked = []  # nothing more of it is read
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.report_timer is not None:
            self.report_timer.cancel()
            self.report_timer = None
        spare, self._spare = self._spare, None
        try:
            if spare is not None and isinstance(exc, OSError) and not self.handed_over:
                self._read_rest(spare)
        except Exception:  # a bug here must not keep the worker from counting as gone
            log.exception("slot channel: reading what was left after a failed write broke")
        finally:
            if spare is not None:
                spare.close()
        if self.handed_over:
            # Its socket lives on (the exec's, or adopted again): not a worker gone.
            if self.server._channels.get(self.key) is self:
                del self.server._channels[self.key]
        else:
            self.server._gone(self)

    def _read_rest(self, spare: socket.socket) -> None:
        """A write to this channel failed (EPIPE, ECONNRESET): the worker had
        closed its end, having sent, unread here yet, its last releases and
        final report (a scrape's `report` or a grant written a moment after a
        drained worker exited). The transport closed without reading them: read
        them now, as a read before that write would have, so that its final
        counts reach the host's totals and its releases are not reclaims."""
        rest, _ = _take_waiting(spare)
        if rest:
            self.data_received(rest)  # a line that is not the protocol: logged, dropped

    def send(self, message: dict[str, Any]) -> None:
        self.send_line(encode(message))

    def send_line(self, line: bytes) -> None:
        """A message already encoded (`encode`, `granted_line`)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line)


def _told_leases(told: Any) -> set[int] | None:
    """The leases a worker's "state" names in its "calls" ([lease, call]
    pairs), or None when it sends no list (an older worker)."""
    if not isinstance(told, list):
        return None
    leases = set()
    for pair in told:
        if isinstance(pair, list) and len(pair) == 2:
            with contextlib.suppress(TypeError, ValueError):
                leases.add(int(pair[0]))
    return leases


class SlotServer:
    def __init__(self, slots: HostSlots, *, view: HostView | None = None) -> None:
        self.slots = slots
        self.view = view
        self._channels: dict[int, _Channel] = {}
        self._keys = itertools.count(1)
        # Put off after a stall (net.late_timers): a release waiting unread in a
        # channel gives its slot to a waiter before the waiter's deadline is judged.
        self._timer: PatientTimer | None = None
        self._timer_at: float | None = None
        self._servers: list[asyncio.Server] = []
        self._restoring: set[int] = set()  # channels kept over an exec, not yet heard
        self._handed: dict[str, _Channel] = {}  # by `handover`'s names: for `take_back`
        # The grant budgets `handover` sent (channel key -> a fleet name a slot):
        # counted for a worker slow to answer after a failed exec (`take_back`).
        self._budgets_sent: dict[int, list[str]] = {}
        self._restored = asyncio.Event()
        # The channel whose lone worker's budget stands or is being taken back
        # (`_review_standing`): the others' messages are parked meanwhile, until
        # it is dropped or LONE_END_WAIT after it was taken back (`_lone_timer`).
        self._lone_holder: int | None = None
        self._lone_timer: PatientTimer | None = None
        self._unparking = False
        # The supervisor's own messages beside the slots' (reload, stop,
        # close-fleet and their answers): op -> handler(channel key, message).
        self.handlers: dict[str, Callable[[int, dict[str, Any]], None]] = {}
        self.on_join: list[Callable[[int, int, int], None]] = []  # channel key, pid, generation
        self.on_leave: list[Callable[[int, WorkerRow | None], None]] = []  # key, its last row
        # (channel key, pid) -> whether that worker's process still runs as its
        # channel ends: its slots then stay counted until `release_kept`. None:
        # every channel's end gives its slots back at once (no process known).
        self.keeps_slots: Callable[[int, int], bool] | None = None
        # Channel key -> the calls that worker's call table has live now, lease
        # -> fleet name (None: no table, or unreadable): asked as a channel
        # ends whose worker runs on, for the calls of a lone budget it never told.
        self.live_calls: Callable[[int], dict[int, str] | None] | None = None
        # Who each open lease's call is ("call" in "acquire": `Call.identity`),
        # by channel key, then lease: the access line the supervisor writes for
        # a call lost with its worker. Gone with the lease (released, refused);
        # a channel's that ended wait in `_left_calls` for `take_calls`.
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}
        self._left_calls: dict[int, dict[int, dict[str, Any]]] = {}

    def take_calls(self, key: int) -> dict[int, dict[str, Any]]:
        """The calls the ended channel `key` had open (held or waiting), by
        lease, each as its worker described it; "status": 101 once its fleet
        answered. Given once."""
        return self._left_calls.pop(key, {})

    def calls_of(self, key: int) -> dict[int, dict[str, Any]]:
        """The calls channel `key` has open now (an exec carries them)."""
        return dict(self._calls.get(key, {}))

    def _keep_call(
        self, key: int, lease: int, call: dict[str, Any], message: dict[str, Any]
    ) -> None:
        kept = call_kept(call)
        if message.get("table") is True:
            # The worker recorded it in its call table: read when it dies, the
            # table says whether it is still live (`core.lost_calls.lost_with_table`).
            kept = {**kept, "in_table": True}
        self._calls.setdefault(key, {})[lease] = kept

    def _forget_call(self, key: int, lease: int) -> None:
        calls = self._calls.get(key)
        if calls is not None:
            calls.pop(lease, None)
            if not calls:
                del self._calls[key]

    def _call_answered(self, key: int, lease: int, at: float) -> None:
        """The fleet answered lease `lease`'s call (101) at `at` (CLOCK_MONOTONIC,
        this host's): a call lost with its worker is observed in the
        call-duration histogram ("101 to end") from it, not from its start."""
        call = self._calls.get(key, {}).get(lease)
        if call is not None:
            call["status"] = 101
            call["answered_monotonic"] = at

    @property
    def queue_length(self) -> int:
        return self.slots.queue_length

    @property
    def queue_timeouts(self) -> int:
        return self.slots.queue_timeouts

    def send(self, key: int, message: dict[str, Any]) -> bool:
        """A message of the supervisor's own to one worker; False if its channel is gone.
        A worker kept over the re-execution that has not answered "sync" yet
        reads it after "sync": its answers come after its "state"."""
        channel = self._channels.get(key)
        if channel is None or not (channel.joined or channel.restoring):
            return False
        channel.send(message)
        return True

    def channel_fileno(self, key: int) -> int | None:
        """The descriptor of worker `key`'s channel, this end (None: none now), to
        store again in systemd's fd store once it has room (`Notifier.unkept`)."""
        channel = self._channels.get(key)
        if channel is None or channel.transport is None:
            return None
        sock = channel.transport.get_extra_info("socket")
        return None if sock is None else sock.fileno()

    def of_a_release_before_calls(self, key: int) -> bool:
        """Worker `key` has said (hello, or its state after an exec) that it
        does not answer "list-calls" / "end-call": a release before them. One
        not heard from yet (no channel, or restoring) is not said to be."""
        channel = self._channels.get(key)
        return (
            channel is not None
            and channel.joined
            and not channel.restoring
            and not channel.lists_calls
        )

    def call_tag(self, key: int) -> str | None:
        """The tag worker `key` names its calls with (`PID-N-TAG`); "" when it said
        none (a build before tags); None when not heard from yet (no channel,
        or kept over the exec, its state unread)."""
        channel = self._channels.get(key)
        return None if channel is None or channel.restoring else channel.tag

    def forget_fleet(self, name: str) -> None:
        """The fleet `name` has left the set: every worker that knows the op
        is told to drop its record ("forget-fleet"; a worker that has not said
        hello has none), and the next grant of that name to any worker carries
        its spec again."""
        for key, channel in list(self._channels.items()):
            channel.sent_specs.pop(name, None)
            if channel.forgets:
                self.send(key, {"op": "forget-fleet", "fleet": name})

    async def adopt(
        self,
        sock: socket.socket,
        *,
        restoring: bool = False,
        worker: tuple[int, int] | None = None,
        held_before: list[str] | None = None,
        budget_before: list[str] | None = None,
        left_out_before: list[int] | None = None,
        key: int | None = None,
        unread: bytes = b"",
        calls: dict[int, dict[str, Any]] | None = None,
    ) -> int:
        """Serve the supervisor's end of a worker's socketpair; returns its
        channel key (`key`: the one it had, served again by `take_back`).
        `restoring`: a channel kept over this process's re-execution; the
        worker is asked what it holds (pause `slots` first).
        `worker` (pid, generation) and `held_before` (a fleet name per slot it
        held in the previous image's table): counted if it is slow to answer,
        and so is `budget_before` (a fleet name a slot of the grant budget it
        was given at the hand-over: it may have granted calls from it).
        `left_out_before`: its lease ids the previous image's capacity
        estimate left out (`FleetState.left_out`), left out still.
        `unread`: what the previous image had read of a line not yet whole
        (its `unread()`): read before what the socket brings, the rest of it.
        `calls`: what the previous image knew of its calls (`calls_of`), in
        place before anything is read (its "state" prunes them)."""
        loop = asyncio.get_running_loop()
        if key is None:
            key = next(self._keys)
        if calls:
            self._calls[key] = dict(calls)
        if restoring:
            self._restoring.add(key)
            self._restored.clear()

        waiting, ended = _take_waiting(sock) if restoring else (b"", False)

        def channel() -> _Channel:
            made = _Channel(
                self,
                key,
                restoring=restoring,
                held_before=held_before,
                budget_before=budget_before,
                left_out_before=left_out_before,
                unread=unread,
                waiting=waiting,
                ended=ended,
            )
            if worker is not None:
                made.pid, made.generation = worker
            return made

        await loop.connect_accepted_socket(channel, sock)
        return key

    async def finish_restore(self, timeout: float) -> list[int]:
        """Wait until every kept channel has told what it holds, then grant
        again. A worker silent for `timeout` is alive (its channel is open)
        but slow: it keeps its channel, and what the previous table said it
        held stays counted until its "state" comes; returns their channel keys."""
        try:
            if self._restoring:
                # Patient: a supervisor stopped through the wait reads the
                # workers' "state" waiting for it before it calls them silent.
                with contextlib.suppress(TimeoutError):
                    async with patient_timeout(timeout):
                        await self._restored.wait()
        finally:
            # Cancelled too (the supervisor stopping): never left paused, as
            # paused every call queues, unanswered (nothing expires meanwhile).
            silent = self._end_restore(timeout)
        return silent

    def _end_restore(self, timeout: float) -> list[int]:
        silent = sorted(self._restoring)
        try:
            for key in silent:
                self._count_silent(key, timeout)
        finally:
            self._restoring.clear()
            self._restored.set()
            self._send(self.slots.resume())
        return silent

    def _count_silent(self, key: int, timeout: float) -> None:
        channel = self._channels.get(key)
        if channel is None:
            return
        held, pid = channel.held_before, channel.pid
        budget = channel.budget_before or []
        row = self.slots.get(key)  # taken back (`take_back`): counted all along
        if row is not None:
            self.slots.count_budget(key, budget)
        kept = row.calls if row is not None else len(held or ()) + len(budget)
        what = fields(channel=key, pid=pid, timeout=timeout, slots_kept=kept)
        if row is not None:
            log.warning(
                "worker has not said what it holds after the failed re-execution: "
                "granting again, with the slots it held counted until it does",
                extra=what,
            )
        elif held is not None and pid is not None:
            self.slots.reserve(key, pid=pid, generation=channel.generation or 0, fleets=held)
            self.slots.count_budget(key, budget)  # its calls in flight besides
            log.warning(
                "worker has not said what it holds after the re-execution: granting "
                "again, with the slots it held before counted until it does",
                extra=what,
            )
        else:
            log.error(
                "worker has not said what it holds after the re-execution, and what it "
                "held before is not known: granting again; its slots count once it says",
                extra=what,
            )

    def _to_hand_over(self) -> dict[str, _Channel]:
        """The channels `handover` gives, by the name each goes under."""
        return {
            channel_key(c.pid, c.generation): c
            for c in self._channels.values()
            if c.transport is not None and c.pid is not None and c.generation is not None
        }

    @staticmethod
    def _unwritten(channels: Iterable[_Channel]) -> dict[int, int]:
        """Of `channels` (the ones `handover` would give), what is still in
        this process's write buffer (pid -> bytes): the hand-over would drop it."""
        unwritten: dict[int, int] = {}
        for channel in channels:
            assert channel.transport is not None and channel.pid is not None
            if size := channel.transport.get_write_buffer_size():
                unwritten[channel.pid] = size
        return unwritten

    async def flushed(self, timeout: float) -> bool:
        """Wait, `timeout` at most, until every channel `handover` would give
        has written all it was asked to (a buffer fills only while a worker
        does not read: rare and short). True when none has bytes left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polled: a transport says when its buffer passes a high-water mark,
        # not when it is empty, and this runs once an upgrade, for a second.
        while self._unwritten(self._to_hand_over().values()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def unread(self) -> dict[str, bytes]:
        """Of each channel `handover` would give (same names), what was read
        of a line the worker has not finished sending: the next image's
        `adopt(unread=...)` reads it before the rest, so the line is read
        whole (a "report", a "state"). Channels with none are left out. Ask
        in the same step as `handover`, with no await between: a read in
        between would make it stale."""
        return {
            name: pending
            for name, channel in self._to_hand_over().items()
            if (pending := channel.decoder.pending)
        }

    def plan_budgets(self, takers: Collection[int]) -> dict[int, dict[str, int]]:
        """Each worker's grant budget for a re-execution (`core.slot_budget`),
        by channel key, fleet name -> slots: between the workers in `takers`
        (the channel keys of those taking new calls) that said they grant from
        one, joined and heard since any exec. None while the table is paused
        (being rebuilt: its count is not complete) or a call waits in the queue."""
        if self.slots.paused:
            return {}
        keys = [
            key
            for key, c in self._channels.items()
            if key in takers
            and c.joined
            and not c.restoring
            and c.budgets
            and not c.drained
            and c.transport is not None
            and not c.transport.is_closing()
        ]
        budgets = share(self.slots.balancer.fleets, keys, queue_length=self.slots.queue_length)
        # What is left of a worker's standing budget is its own already (reserved
        # in this table, not in the free slots just shared): its exec budget,
        # which replaces the standing one, carries it, so that the two are
        # never both granted from and none of it goes unused over the exec.
        for key in keys:
            for name in self.slots.standing_left(key):
                mine = budgets.setdefault(key, {})
                mine[name] = mine.get(name, 0) + 1
        return budgets

    def not_counted_yet(self, key: int) -> tuple[list[str] | None, list[str]]:
        """Of worker channel `key`, what the table does not count yet but a
        supervisor started after this one died must (a crash snapshot's
        "held" and "budget", a fleet name a slot): what it held before an exec,
        while it has not said what it holds (None: not known, or counted); and
        its grant budget, from the hand-over (`handover`) until it says what it
        holds or is counted silent with it (`finish_restore`). Nothing then:
        the budget is dropped at "sync", or counted in its row."""
        if (sent := self._budgets_sent.get(key)) is not None:
            return None, sent
        channel = self._channels.get(key)
        if channel is None or key not in self._restoring:
            return None, []
        return channel.held_before, channel.budget_before or []

    def left_out(self, key: int) -> list[int]:
        """Of worker channel `key`'s lease ids, those the fleets' capacity
        estimates leave out, to carry over an exec (`HostSlots.restore`'s
        `left_out`): the table's, and, while the worker has not said what it
        holds since an earlier exec, the ones that image carried
        (`left_out_before`: in no row yet, the table's is `reserve`'s). Before,
        the table's alone: a second exec before a silent worker's "state"
        dropped them, and the third image took their answered calls for free
        workers."""
        ids = [lease for lease in self.slots.left_out(key) if lease >= 0]  # not `reserve`'s
        channel = self._channels.get(key)
        if channel is not None and channel.left_out_before:
            ids += [lease for lease in channel.left_out_before if lease not in ids]
        return ids

    def _send_budgets(
        self,
        budgets: dict[int, dict[str, int]],
        handed: dict[str, _Channel],
        kept: dict[str, socket.socket],
    ) -> dict[int, list[str]]:
        """Write each worker its budget ("budget") on the socket kept for the
        exec, before this end's transport closes (its buffer is empty:
        `handover` checked). Not written (the worker not reading), a worker
        has none and waits as before. Returns what was sent, a fleet name a slot."""
        sent: dict[int, list[str]] = {}
        for name, channel in handed.items():
            budget = budgets.get(channel.key)
            if not budget:
                continue
            carried = Counter(self.slots.standing_left(channel.key))
            message = self._budget_message(budget, whole_write_max(kept[name]), carried)
            if not message["fleets"] or not _send_whole(kept[name], encode(message)):
                log.warning(
                    "upgrade: a worker's grant budget could not be written: its calls "
                    "wait for the new image",
                    extra=fields(channel=channel.key, pid=channel.pid),
                )
                continue
            # What the line carries (fleets past the cap are not in it).
            sent[channel.key] = [f["fleet"] for f in message["fleets"] for _ in range(f["slots"])]
        if sent:
            log.info(
                "upgrade: grant budgets sent: the workers grant calls from them until "
                "the supervisor answers again",
                extra=fields(
                    workers={self._channels[k].pid: len(v) for k, v in sent.items()},
                    slots=sum(len(v) for v in sent.values()),
                ),
            )
        return sent

    def _budget_message(
        self, budget: dict[str, int], size_max: int, carried: Counter[str] | None = None
    ) -> dict[str, Any]:
        """The "budget" line for `budget`: its fleets with the most slots first,
        BUDGET_FLEETS_MAX at most, as many as keep the line (newline and all)
        within `size_max` bytes (`whole_write_max`). `carried`: of those slots,
        the rest of the worker's standing budget as this table last read it
        (`plan_budgets`), said per fleet ("standing"): a grant the worker made
        from it since, not read yet, is still in that count, so the worker
        keeps of it only what its own copy has left (`SlotClient._take_budget`)."""
        named = sorted(budget.items(), key=lambda kv: -kv[1])[:BUDGET_FLEETS_MAX]
        fleets: list[dict[str, Any]] = []
        size = len(encode({"op": "budget", "fleets": fleets}))
        for name, slots in named:
            fleet = self.slots.balancer.get(name)
            if fleet is None:
                continue
            entry = {
                "fleet": name,
                "slots": slots,
                "active": fleet.active,
                "spec": spec_to_wire(fleet.spec),
            }
            if carried and (standing := min(carried[name], slots)) > 0:
                entry["standing"] = standing
            size += len(encode(entry)) - 1 + (1 if fleets else 0)  # less "\n", plus ","
            if size > size_max:
                break
            fleets.append(entry)
        return {"op": "budget", "fleets": fleets}

    def handover(
        self, budgets: dict[int, dict[str, int]] | None = None
    ) -> dict[str, socket.socket]:
        """Stop serving and give each worker's channel as a socket to keep
        over an exec, by key `worker.PID.GENERATION`. Nothing is read after
        this: what workers send meanwhile waits in the kernel for the next
        image, which counts it through their "state". Every channel whose
        worker is known goes: joined; kept over the previous exec and not yet
        answering "sync" (a second upgrade soon after the first); or not
        joined yet, its hello unread, named by the `worker` given to `adopt`
        (a worker just started). Closed, its worker would take the supervisor
        for dead and drain.

        All or nothing: when a channel cannot be duplicated (out of
        descriptors) the ones already are closed and HandoverError raised,
        every channel still served here; so too, before anything, when a
        channel still has bytes to write (its worker is not reading; wait
        with `flushed` first). What was read of a line not yet
        whole stays with each channel (`unread`: for the exec; `take_back`
        reads it first).

        `budgets` (`plan_budgets`): written to each worker before anything
        else is done with its channel: it grants calls from it until the next
        image (or this one, `take_back`) asks it "sync".

        Messages parked for a lone worker's budget that no "state" says are
        read first, in order (`read_parked_unstated`); call that before
        `plan_budgets` (`upgrade_sequence._reexec` does): what they move
        (a fleet taken as FULL, a grant to a call waiting) is then in the
        plan, and in the calls the exec carries (`calls_of`)."""
        self.read_parked_unstated()
        to_hand = self._to_hand_over()
        channels = list(to_hand.values())
        if unwritten := self._unwritten(channels):
            # Aborted, the transport would drop it: the worker would read a line
            # cut short, then the next image's "sync", take that for a broken
            # channel and drain.
            pids = ", ".join(f"pid {pid} ({size} bytes)" for pid, size in sorted(unwritten.items()))
            raise HandoverError(
                f"a worker is not reading its slot channel, so what the supervisor sent it "
                f"is not all written yet: {pids}; nothing was handed over. Run "
                "`fleet-ingress upgrade` again; if it keeps failing, that worker is stuck "
                "(`fleet-ingress stat` lists it; a worker that exits is replaced)"
            )
        kept: dict[str, socket.socket] = {}
        handed: dict[str, _Channel] = {}
        try:
            for key, channel in to_hand.items():
                assert channel.transport is not None
                fd = channel.transport.get_extra_info("socket").fileno()
                kept[key] = socket.socket(fileno=os.dup(fd))
                handed[key] = channel
        except OSError as exc:
            for sock in kept.values():
                sock.close()
            raise HandoverError(
                f"cannot keep the workers' channels over the re-execution: {exc.strerror or exc} "
                f"(at channel {len(kept) + 1} of {len(channels)}); nothing was handed over. "
                "Raise the service's LimitNOFILE (or lower limits.max_connections), then "
                "`fleet-ingress upgrade` again"
            ) from exc
        self._handed = handed
        self._budgets_sent = self._send_budgets(budgets or {}, handed, kept)
        for channel in channels:
            assert channel.transport is not None
            channel.transport.pause_reading()
            channel.handed_over = True
            # A lone budget is carried in the exec's (`plan_budgets`) and ends
            # at "sync"; what is still parked is counted in its worker's
            # "state" (taken back or read by the next image; the rest was read
            # above): nothing parks any more.
            self._lone_over()
            channel.parked = []
            # Our descriptor closes, the duplicate keeps the channel open: the
            # worker sees no end of file.
            channel.transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None
        return kept

    async def take_back(self, kept: dict[str, socket.socket], timeout: float) -> list[int]:
        """The exec failed after `handover`: serve the channels in `kept` again
        (the ones `handover` gave; any other is closed), each under the key it
        had, the table rebuilt from what the workers say as the next image
        would rebuild it (`finish_restore`'s `timeout`: returns the silent
        ones). What each worker held stays counted in between (never given
        back: a removed fleet with calls on it is not reaped, HostSlots.suspend).
        A channel that cannot be served again is closed and its worker counted
        gone (its slots come back, `on_leave` runs: it drains and is replaced).
        Whatever happens, no kept socket is left open and the host grants again."""
        handed, self._handed = self._handed, {}
        self.slots.paused = True
        # Each worker's, counted if it is slow to answer (it may have granted
        # calls from it); a later hand-over sends its own.
        budgets, self._budgets_sent = self._budgets_sent, {}
        pending = list(kept.items())
        finished = False
        try:
            while pending:
                name, sock = pending.pop(0)
                channel = handed.get(name)
                if channel is None:
                    sock.close()
                    continue
                await self._serve_again(channel, sock, budgets.get(channel.key))
            finished = True
        finally:
            if not finished:  # cancelled (the supervisor stopping): the rest drain
                for name, sock in pending:
                    sock.close()
                    if (channel := handed.get(name)) is not None:
                        self._gone(channel)
                self._end_restore(timeout)
        return await self.finish_restore(timeout)

    async def _serve_again(
        self, channel: _Channel, sock: socket.socket, budget: list[str] | None
    ) -> None:
        row = self.slots.suspend(channel.key)
        assert channel.pid is not None and channel.generation is not None
        held_before = channel.held_before  # kept over an earlier exec, still silent
        if row is None and not channel.restoring:
            # Never joined (its hello unread): it holds nothing in this table.
            # Said so, a slow answer is not logged as what it held being unknown.
            held_before = []
        try:
            await self.adopt(
                sock,
                restoring=True,
                worker=(channel.pid, channel.generation),
                held_before=held_before,
                budget_before=budget,
                left_out_before=channel.left_out_before,  # the same, still silent
                key=channel.key,
                # Nothing was read after `handover`: the line it had begun goes on.
                unread=channel.decoder.pending,
            )
        except BaseException as exc:  # e.g. out of descriptors: this worker only
            log.error(
                "worker's slot channel could not be served again after the failed "
                "re-execution: closed; the worker drains its calls and a new worker "
                "replaces it",
                extra=fields(
                    channel=channel.key,
                    pid=channel.pid,
                    generation=channel.generation,
                    error=repr(exc),
                ),
            )
            sock.close()
            made = self._channels.get(channel.key)
            if made is not None and made is not channel and made.transport is not None:
                # Served after all before it failed: its end counts the worker gone.
                made.transport.abort()
            else:
                self._gone(channel)
            if not isinstance(exc, Exception):
                raise

    async def serve_unix(
        self, path: str | None = None, *, sock: socket.socket | None = None
    ) -> asyncio.Server:
        """Accept workers on a listening Unix socket, bound at `path` or given
        (`sock`: kept over a re-execution)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(
            lambda: _Channel(self, next(self._keys)), path, sock=sock
        )
        self._servers.append(server)
        return server

    async def collect_reports(self, timeout: float, *, silent_too: bool = True) -> int:
        """Ask every worker for its report and wait until each has answered, for
        `timeout` at most (a busy worker's last report stands meanwhile); not
        `silent_too`, not for one that has yet to answer a report asked of it
        before (a read of the host's stats: that one's last report is shown,
        `WorkerRow.report_overdue` once it is, `_time_report`). Returns how
        many did not answer in time."""
        asked: list[asyncio.Future[None]] = []
        for channel in list(self._channels.values()):
            if not channel.joined or channel.restoring:
                continue
            if channel.asked is None or channel.asked.done():
                channel.asked = asyncio.get_running_loop().create_future()
                channel.send({"op": "report"})
                self._time_report(channel)
            elif not silent_too:
                continue
            asked.append(channel.asked)
        if not asked:
            return 0
        _, pending = await wait_patiently(asked, timeout)
        return len(pending)

    def _time_report(self, channel: _Channel) -> None:
        """The report just asked of `channel`'s worker is judged overdue
        REPORT_OVERDUE from now if it has not been read by then, by a timer
        that a stall of this loop puts off by REPORT_OVERDUE (`PatientTimer`):
        overdue says the worker did not answer while the supervisor could
        read. Judged from the clock at each read, a supervisor stopped or
        starved past it after asking showed every worker overdue and
        `workers_serving` 0, their answers waiting unread in the channels, or
        not yet sent by workers stopped with it (a paused VM); and a timer
        comes before the reads after a stall (`net.late_timers`)."""
        if channel.report_timer is not None:
            channel.report_timer.cancel()
        channel.report_timer = PatientTimer(
            channel.loop, REPORT_OVERDUE, self._report_overdue, channel, put_off=REPORT_OVERDUE
        )

    def _report_overdue(self, channel: _Channel) -> None:
        channel.report_timer = None
        if self._channels.get(channel.key) is not channel:
            return  # gone, or handed over: no longer this image's to judge
        if channel.asked is None or channel.asked.done():
            return
        if (row := self.slots.find_row(channel.key)) is not None:
            row.report_overdue = True

    def count_silent(self, now: float) -> list[tuple[int, int, float]]:
        """After a round of report requests: each joined worker that has not
        answered its request has one more silent pull, one that has starts
        over; so has a worker kept over an exec that has not said what it
        holds since the restore's timeout (a worker hung at the exec never
        will: it is asked no report). Returns (channel key, silent pulls,
        seconds since first found silent) of the silent ones; `now` monotonic."""
        silent = []
        for channel in list(self._channels.values()):
            unanswered_sync = channel.restoring and channel.key not in self._restoring
            if not (channel.joined or unanswered_sync):
                continue
            row = self.slots.find_row(channel.key)
            if row is None:
                continue
            if unanswered_sync or (channel.asked is not None and not channel.asked.done()):
                row.silent_pulls += 1
                if row.silent_since is None:
                    row.silent_since = now
                silent.append((channel.key, row.silent_pulls, now - row.silent_since))
            else:
                row.silent_pulls, row.silent_since = 0, None
        return silent

    @staticmethod
    def _told_down_late(channel: _Channel, lease: int, fleet: FleetState) -> None:
        """A grant from a standing budget read after its fleet went DOWN (the
        worker granted it before it read "budget-end", its "acquire" on its
        way, or held: INGRESS_STANDING_BUDGETS=held) was in no "fleet-down":
        named now, as `fleet_down` names the calls in flight there, so that
        its worker gives the attempt up and tries another fleet rather than
        wait for its timers."""
        if (
            fleet.health is Health.DOWN
            and channel.hears_down
            and (channel.key, lease) in fleet.pending
        ):
            channel.send({"op": "fleet-down", "fleet": fleet.name, "leases": [lease]})

    def fleet_down(self, fleet: FleetState) -> None:
        """`fleet` went DOWN (its probes, or calls it refused): every worker with
        calls in flight there (granted, its fleet's answer not told yet) is told
        which ("fleet-down"), and gives up those attempts not answered yet, to
        retry them (`net.fleet_down`). A worker that has not said it knows the
        op ("fleet_down") is sent nothing: its attempts wait for their timers."""
        leases: dict[Any, list[int]] = {}
        for key in fleet.pending:
            if isinstance(key, tuple) and len(key) == 2:
                worker, lease = key
                leases.setdefault(worker, []).append(lease)
        told = 0
        for worker, ids in leases.items():
            channel = self._channels.get(worker)
            if channel is None or not channel.joined or not channel.hears_down:
                continue
            channel.send({"op": "fleet-down", "fleet": fleet.name, "leases": sorted(ids)})
            told += len(ids)
        if told:
            # `in_flight`: leases with no 101 told yet; a worker gives up those
            # still connecting or awaiting the answer, with retries left (each
            # says so: "fleet attempt failed", failure "fleet-down").
            log.info(
                "fleet DOWN: the workers told of its calls in flight, to try again "
                "those not answered yet",
                extra=fields(fleet=fleet.name, in_flight=told),
            )

    def wake(self) -> None:
        """Room may have appeared (a probe, a fleet up, an admin change)."""
        self._send(self.slots.wake())
        self._review_standing(fleets_changed=True)
        self._ask_held()

    def _ask_held(self) -> None:
        """After a probe: each worker holding lines back ("tells_held") with
        leases or a standing budget while a fleet's capacity is counted is
        asked to write them ("tell-held", TELL_HELD_EVERY at most): the calls
        the probe left out of the estimate as in flight (`FleetState.unseen`)
        are taken out once their answers are read, and a lone budget's grants
        told late are counted before the probe is long past. Nothing when no
        fleet's capacity is counted: no estimate waits on them."""
        if not any(
            f.capacity_aware and f.reported_available is not None
            for f in self.slots.balancer.fleets
        ):
            return
        now: float | None = None
        for channel in self._channels.values():
            if not channel.tells_held or not channel.joined or channel.restoring:
                continue
            row = self.slots.find_row(channel.key)
            if row is None or (not row.held and row.standing is None):
                continue
            if now is None:
                now = channel.loop.time()
            if now < channel.held_asked_at + TELL_HELD_EVERY:
                continue
            channel.held_asked_at = now
            channel.send_line(TELL_HELD_LINE)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for channel in list(self._channels.values()):
            if channel.transport is not None:
                channel.transport.close()
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.sleep(0)  # let connection_lost run

    # -- frames in -------------------------------------------------------------

    def _handle(self, channel: _Channel, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "report":
            # Whole and cumulative: taken in any state (a final one sent during
            # an exec included), before "hello" too, as it names its worker.
            self._report(channel, message)
            return
        if channel.restoring:
            if op == "state":
                self._restore(channel, message)
            elif op == "acquire":
                with contextlib.suppress(WireError):
                    lease = field(message, "id", int)
                    if message.get("budget") is True:  # granted from its budget
                        fleet = message.get("fleet")
                        channel.budget_grants[lease] = fleet if isinstance(fleet, str) else None
                    if isinstance(call := message.get("call"), dict):
                        # Counted in its "state", but only there said who the call
                        # is: kept (its "state" says whether it is still open).
                        self._keep_call(channel.key, lease, call, message)
            return  # sent before the worker read "sync": counted in its "state"
        if not channel.joined:
            if op != "hello":
                if self._known(op):
                    raise WireError(f"{op!r} before 'hello'")
                channel.unknown.ignore(op, channel=channel.key, pid=channel.pid)
                return
            pid, generation = field(message, "pid", int), field(message, "generation", int)
            answers = message.get("answers") is True  # an older worker does not say
            self.slots.join(channel.key, pid=pid, generation=generation, tells_answers=answers)
            channel.joined = True
            channel.forgets = message.get("forgets") is True
            channel.lists_calls = message.get("lists_calls") is True
            channel.budgets = message.get("budgets") is True
            channel.standing = message.get("standing") is True
            channel.hears_down = message.get("fleet_down") is True
            channel.lone = message.get("lone") is True
            channel.tells_held = message.get("tells_held") is True
            channel.tag = _tag_said(message)
            channel.pid, channel.generation = pid, generation
            log.info(
                "worker joined the slot coordinator",
                extra=fields(channel=channel.key, pid=pid, generation=generation),
            )
            for hook in self.on_join:
                hook(channel.key, pid, generation)
            self._review_standing()
            return
        if channel.parked or self._parks(channel):
            # A lone worker's budget stands or is being taken back (this one's
            # hello ended it): a grant made now would find its slots reserved,
            # and count the fleets without its grants and releases still held.
            # Read once it has dropped it, after them.
            channel.parked.append(message)
            return
        self._act(channel, message)

    def _act(self, channel: _Channel, message: dict[str, Any]) -> None:
        """A joined worker's message in its turn: at once, or, parked, once
        a lone worker's budget is dropped (`_unpark`, which
        reads them here: through `_handle`, each went back behind the others
        still parked, and the supervisor looped over them for good)."""
        op = message["op"]
        if op == "acquire":
            lease = field(message, "id", int)
            if message.get("budget") is True and message.get("standing") is True:
                # Granted by the worker from its standing budget: the host's grant,
                # made when it says ("at", monotonic: a held one is read late).
                at = message.get("at")
                past = self.slots.grants_past_cut_total
                granted = self.slots.grant_standing(
                    channel.key,
                    lease,
                    field(message, "fleet", str),
                    granted_at=at if type(at) is float and math.isfinite(at) else None,
                )
                if self.slots.grants_past_cut_total != past:
                    log.warning(
                        "a call granted from a lone budget whose unused slots were taken "
                        "back: counted, past maxconn while it lasts",
                        extra=fields(channel=channel.key, pid=channel.pid, lease=lease),
                    )
                if isinstance(call := message.get("call"), dict):
                    self._keep_call(channel.key, lease, call, message)
                self._told_down_late(channel, lease, granted.fleet)
                return
            if message.get("budget") is True:
                # Granted by the worker from its budget: read before its "state"
                # (restoring, above), never here but from a confused worker.
                log.error(
                    "slot request granted from a budget read outside a restore: ignored",
                    extra=fields(channel=channel.key, pid=channel.pid, lease=lease),
                )
                return
            avoid = field(message, "avoid", list) if "avoid" in message else []
            now = channel.loop.time()
            try:
                answer = self.slots.acquire(channel.key, lease, [str(a) for a in avoid], now)
            except SlotProtocolError as exc:
                # A worker bug: refuse this one call, keep the worker's other calls.
                log.error("slot request refused", extra=fields(channel=channel.key, error=str(exc)))
                reason = f"internal error: {exc}"
                channel.send({"op": "refused", "id": lease, "reason": reason, "queued": False})
                return
            if isinstance(call := message.get("call"), dict):
                self._keep_call(channel.key, lease, call, message)
            if answer is None:
                self._arm()
                self._review_standing()  # a call waits: budgets are taken back
            else:
                self._send([answer])
        elif op == "release":
            lease = field(message, "id", int)
            self._forget_call(channel.key, lease)
            self._send(self.slots.release(channel.key, lease))
        elif op == "answered":  # fleets answered these leases' calls (101), each at its time
            try:
                answers = [(int(lease), float(at)) for lease, at in field(message, "leases", list)]
            except (TypeError, ValueError) as exc:
                raise WireError(f"'answered' message: {exc}") from exc
            for lease, at in answers:
                self.slots.answered(channel.key, lease, at)
                self._call_answered(channel.key, lease, at)
        elif op == "budget-taken":  # it has its standing budget: releases go back into it
            self.slots.standing_taken(channel.key)
        elif op == "budget-dropped":  # what was left of it is free (after its grants)
            if message.get("declined") is True:  # it takes no new calls: none again
                channel.standing = channel.lone = False
            answers = self.slots.drop_standing(channel.key)
            if channel.key == self._lone_holder:
                row = self.slots.find_row(channel.key)
                if row is None or row.standing is None:
                    self._lone_over()  # after every grant it made: the others are read
            self._send(answers)
            self._unpark()
        elif op == "logged":
            # The worker wrote that lease's call's access line, its slot still
            # held while its fleet side closes: no second line if it dies now.
            self._forget_call(channel.key, field(message, "id", int))
        elif op == "full":  # the fleet answered that lease's call 429
            fleet = self.slots.fleet_of(channel.key, field(message, "id", int))
            if fleet is not None:  # not if given back meanwhile: nothing to say then
                take_as_full(fleet)
                # Standing budgets on it are taken back: kept, their workers
                # granted it calls (429s to carriers) until its next probe.
                self._review_standing(fleets_changed=True)
        elif op == "unreachable":  # that lease's call could not connect to its fleet
            fleet = self.slots.fleet_of(channel.key, field(message, "id", int))
            refused = message.get("refused", True) is not False
            if fleet is not None and take_as_unreachable(fleet, self.slots.fall, refused=refused):
                self.fleet_down(fleet)
                self.wake()
        elif op == "state":
            # It went over two execs before it read the first "sync": it answers
            # each. The first account rebuilt its row and what it sent after is
            # counted since; this later one may lack grants still on their way.
            log.debug("a second 'state' ignored", extra=fields(channel=channel.key))
        elif (handler := self.handlers.get(op)) is not None:
            # An answer's id is the number its question had: another value (a
            # list) would break the handler's lookup, not read as the protocol's.
            if "id" in message and type(message["id"]) is not int:
                raise WireError(f"{op!r} message: id {message['id']!r} is not a number")
            handler(channel.key, message)
        elif self._known(op):
            raise WireError(f"{op!r} out of place")
        else:
            channel.unknown.ignore(op, channel=channel.key, pid=channel.pid)

    def _known(self, op: str) -> bool:
        return op in _WORKER_OPS or op in self.handlers

    def _report(self, channel: _Channel, message: dict[str, Any]) -> None:
        if channel.asked is not None and not channel.asked.done():
            channel.asked.set_result(None)
        if channel.report_timer is not None:
            channel.report_timer.cancel()
            channel.report_timer = None
        if (row := self.slots.find_row(channel.key)) is not None:
            row.silent_pulls, row.silent_since = 0, None
            row.report_overdue = False
        if "failed" in message:  # alive, but could not count: its last report stands
            log.warning(
                "worker could not build its report: its previous one stands",
                extra=fields(channel=channel.key, pid=channel.pid, error=str(message["failed"])),
            )
            return
        if message.get("final") is True:
            channel.drained = True
        if self.view is None:
            return
        try:
            report = WorkerReport.from_wire(message)
        except ReportError as exc:
            # Stats are not worth a worker's calls: log, keep the channel.
            self._report_refused(channel, "not understood", error=str(exc))
            return
        if (channel.pid is not None and report.pid != channel.pid) or (
            channel.generation is not None and report.generation != channel.generation
        ):
            # Taken, it stood for the worker it names: that one was taken for
            # restarted, and its own reports refused from then on (the channel audit).
            self._report_refused(
                channel,
                "it names another worker than its channel's",
                generation=channel.generation,
                named=list(report.worker),
            )
            return
        channel.reported = report.worker
        now = time.monotonic()
        self.view.report(report, now)
        self._take_call_bytes(channel.key, message.get("call_bytes"), now)

    def _take_call_bytes(self, key: int, said: Any, now: float) -> None:
        """Each open lease's bytes as its worker's report says them (`call_bytes`),
        kept with who the call is: the line of a call lost with its worker says
        them, at least (`core.lost_calls`)."""
        calls = self._calls.get(key)
        if not calls or not isinstance(said, list):
            return
        for entry in said:
            # (Plain tests, no generator: 2,000 calls a report.)
            if type(entry) is not list or len(entry) != 3:
                continue
            lease, from_carrier, to_carrier = entry
            if type(lease) is not int or (call := calls.get(lease)) is None:
                continue
            if type(from_carrier) is not int or type(to_carrier) is not int:
                continue
            if from_carrier < 0 or to_carrier < 0:
                continue
            call["bytes_from_carrier"] = from_carrier
            call["bytes_to_carrier"] = to_carrier
            call["bytes_reported_monotonic"] = now

    def _report_refused(self, channel: _Channel, why: str, **more: Any) -> None:
        """Said once a minute a channel at most: a worker whose reports are
        refused sends one at every pull and every scrape."""
        now = time.monotonic()
        if now - channel.report_refused_at < REPORT_REFUSED_SAID_EVERY:
            return
        channel.report_refused_at = now
        log.error(
            f"worker report ignored: {why}",
            extra=fields(channel=channel.key, pid=channel.pid, **more),
        )

    def _restore(self, channel: _Channel, message: dict[str, Any]) -> None:
        pid, generation = field(message, "pid", int), field(message, "generation", int)
        try:
            held = [(int(lease), str(name)) for lease, name in field(message, "held", list)]
            waiting = [
                (int(lease), [str(a) for a in avoid], float(waited))
                for lease, avoid, waited in field(message, "waiting", list)
            ]
            # Leases whose call its fleet has not answered yet (not sent by an older worker).
            in_flight = {int(lease) for lease in message.get("in_flight", [])}
        except (TypeError, ValueError) as exc:
            raise WireError(f"'state' message: {exc}") from exc
        now = asyncio.get_running_loop().time()
        late = channel.key not in self._restoring  # after finish_restore's timeout
        unknown = self.slots.restore(
            channel.key,
            pid=pid,
            generation=generation,
            held=held,
            waiting=waiting,
            now=now,
            tells_answers=message.get("answers") is True,
            in_flight=in_flight,
            left_out=channel.left_out_before or (),
        )
        if channel.budget_grants:
            # Granted by the worker while nobody else granted: the host's grants
            # and its fleets' calls opened count them now, once.
            on = dict(held)
            grants = channel.budget_grants.items()
            self.slots.count_granted(channel.key, [name or on.get(lease) for lease, name in grants])
            channel.budget_grants = {}
        channel.forgets = message.get("forgets") is True
        channel.lists_calls = message.get("lists_calls") is True
        channel.budgets = message.get("budgets") is True
        channel.standing = message.get("standing") is True
        channel.hears_down = message.get("fleet_down") is True
        channel.lone = message.get("lone") is True
        channel.tells_held = message.get("tells_held") is True
        channel.tag = _tag_said(message)
        # The calls carried over the exec (or asked for during it) still open, as
        # it says; one whose fleet has answered is up (its "answered" may have
        # come during the exec, unread).
        open_ = {lease for lease, _ in held} | {lease for lease, _, _ in waiting}
        told = message.get("calls")
        self._take_told_calls(channel.key, told, open_)
        if (calls := self._calls.get(channel.key)) is not None:
            # A worker that lists its calls names every one whose access line it
            # has not written: one it leaves out it has logged (its "logged" may
            # have been read by no image: sent to the old one, or behind "sync"),
            # and a death of this worker now must not write a second line.
            still = _told_leases(told) if channel.lists_calls else None
            for lease in set(calls):
                if lease not in open_ or (still is not None and lease not in still):
                    self._forget_call(channel.key, lease)
            if "in_flight" in message:
                for lease, _ in held:
                    if lease not in in_flight and (call := calls.get(lease)) is not None:
                        call["status"] = 101
        channel.restoring, channel.joined = False, True
        channel.held_before = channel.budget_before = channel.left_out_before = None
        channel.pid, channel.generation = pid, generation
        log.info(
            "worker rejoined the slot coordinator",
            extra=fields(
                channel=channel.key,
                pid=pid,
                generation=generation,
                held=len(held),
                waiting=len(waiting),
                unknown_fleets=sorted(set(unknown)),
                late=late,
            ),
        )
        self._restoring.discard(channel.key)
        if not self._restoring:
            self._restored.set()
        # Granting already (a late answer): what it no longer holds frees up now.
        self._send([] if self.slots.paused else self.slots.wake())

    def _take_told_calls(self, key: int, told: Any, open_: set[int]) -> None:
        """Who the open calls are, as a worker's "state" tells it (its "calls":
        [lease, call] pairs; an older worker sends none): kept where not known
        already (an exec carries them). A supervisor started after one died
        knows them from here alone, and writes their access lines should the
        worker die with them."""
        if not isinstance(told, list):
            return
        known = self._calls.setdefault(key, {})
        for pair in told:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], dict)):
                continue
            with contextlib.suppress(TypeError, ValueError):
                if (lease := int(pair[0])) in open_:
                    known.setdefault(lease, pair[1])
        if not known:
            del self._calls[key]

    def _gone(self, channel: _Channel) -> None:
        self._channels.pop(channel.key, None)
        # What it held comes back below; the others' messages parked for its
        # lone budget are read after (`_send`, `_unpark`). Of its own parked
        # messages, who its calls are still counts: a call it said it logged
        # or released gets no line as lost, one its fleet answered says 101.
        self._read_parked_calls(channel)
        channel.parked = []
        if channel.key == self._lone_holder:
            self._lone_over()
        if channel.key in self._restoring:
            self._restoring.discard(channel.key)
            if not self._restoring:
                self._restored.set()
        if channel.asked is not None and not channel.asked.done():
            channel.asked.set_result(None)
        if self.view is not None:
            # A channel kept over an exec that ends before its "state" is
            # known by its reports alone.
            if channel.pid is not None and channel.generation is not None:
                self.view.leave((channel.pid, channel.generation))
            elif channel.reported is not None:
                self.view.leave(channel.reported)
        if (
            self.slots.get(channel.key) is None
            and channel.held_before
            and not channel.drained
            and channel.pid is not None
            and channel.generation is not None
        ):
            # Kept over an exec, ended before its "state": what the previous
            # image's table said it held is what it takes with it (counted
            # reclaimed, or kept while its process runs). Not so when its final
            # report came first: it had ended every call and released its slots.
            self.slots.reserve(
                channel.key,
                pid=channel.pid,
                generation=channel.generation,
                fleets=channel.held_before,
            )
        keep = (
            self.keeps_slots is not None
            and channel.pid is not None
            and self.keeps_slots(channel.key, channel.pid)
        )
        live = self.live_calls(channel.key) if keep and self.live_calls is not None else None
        row, answers = self.slots.leave(channel.key, keep_held=keep, live=live)
        self._left_calls[channel.key] = self._calls.pop(channel.key, {})
        if row is not None and row.channel_lost:
            # Also a worker that died: the kernel closes its channel a moment
            # before the process can be reaped. The supervisor tells them apart.
            log.warning(
                "worker's slot channel closed before its process exited: the slots it "
                "holds stay counted until it has",
                extra=fields(
                    channel=channel.key,
                    pid=row.pid,
                    generation=row.generation,
                    slots_kept=row.calls,
                    fleets=_by_fleet(row),
                    # A standing budget's rest, reserved until it is known that
                    # the worker grants no more from it (`settle_lost`).
                    slots_reserved=len(self.slots.standing_left(channel.key)),
                ),
            )
        elif row is not None:
            held = _by_fleet(row)
            log.log(
                logging.WARNING if held else logging.INFO,
                "worker left the slot coordinator",
                extra=fields(
                    channel=channel.key,
                    pid=row.pid,
                    generation=row.generation,
                    slots_reclaimed=row.calls,
                    fleets=held,
                ),
            )
        elif channel.pid is not None:
            # Kept over an exec and gone before its "state", holding nothing
            # (an upgrade's old generation, idle, ends at once): it had no row,
            # and left without its line (13 of 60 old-generation exits in the
            # longevity run of session 35). Nothing to give back.
            log.info(
                "worker left the slot coordinator",
                extra=fields(
                    channel=channel.key,
                    pid=channel.pid,
                    generation=channel.generation,
                    slots_reclaimed=0,
                    fleets={},
                ),
            )
        for hook in self.on_leave:
            hook(channel.key, row)
        self._send(answers)
        self._unpark()

    def cut(self, key: int) -> bool:
        """End channel `key` from this side (its slots then come back as for
        any channel that ends); False when there is none. For a worker whose
        process has exited while its channel has not: another process holds
        a copy of its end."""
        channel = self._channels.get(key)
        if channel is None or channel.transport is None or channel.transport.is_closing():
            return False
        channel.transport.close()
        return True

    def settle_lost(self, key: int) -> WorkerRow | None:
        """The worker whose channel `key` ended runs on past the end
        (LOST_CHANNEL_CONFIRM, the supervisor's `_channel_lost`): it has read
        the end and grants nothing more from a standing budget (or reads it
        first: `slot_client`). Its call table is
        read again (`live_calls`): the calls it granted from the budget since
        the channel ended are counted as its calls, the rest of the budget is
        free (`HostSlots.settle_lost`). Its row (None: nothing was reserved)."""
        row = self.slots.get(key)
        if row is None or not row.channel_lost or row.standing is None:
            return None
        live = self.live_calls(key) if self.live_calls is not None else None
        before = row.calls
        row, answers = self.slots.settle_lost(key, live)
        if row is not None:
            log.info(
                "lost channel's standing budget settled: the calls its worker granted "
                "since are counted, the rest is free",
                extra=fields(
                    channel=key,
                    pid=row.pid,
                    generation=row.generation,
                    calls_found=row.calls - before,
                    slots_kept=row.calls,
                    fleets=_by_fleet(row),
                ),
            )
        self._send(answers)
        return row

    def release_kept(self, key: int) -> WorkerRow | None:
        """The process of a worker whose channel ended while it ran has exited:
        the slots kept for it come back (to the queue first). Its row, or None
        when nothing was kept for `key`."""
        row, answers = self.slots.release_kept(key)
        if row is not None:
            log.info(
                "worker exited: the slots kept since its channel closed came back",
                extra=fields(
                    channel=key,
                    pid=row.pid,
                    generation=row.generation,
                    slots_reclaimed=row.calls,
                    fleets=_by_fleet(row),
                ),
            )
        self._send(answers)
        return row

    # -- answers out -----------------------------------------------------------

    def _send(self, answers: list[Answer]) -> None:
        for answer in answers:
            channel = self._channels.get(answer.worker)  # type: ignore[call-overload]
            if channel is None:
                continue
            # "queued": whether the answer came from the queue, after a wait (the
            # worker times it; a worker before it ignores the key). Said false too:
            # a worker tells "at once" from a supervisor before the key (not known).
            if isinstance(answer, Granted):
                fleet = answer.fleet
                if channel.sent_specs.get(fleet.name) is fleet.spec:  # no spec to send
                    channel.send_line(granted_line(answer.lease, fleet.name, answer.queued))
                    continue
                message = self._granted(channel, answer.lease, fleet)
            else:
                self._forget_call(channel.key, answer.lease)
                message = {"op": "refused", "id": answer.lease, "reason": answer.reason}
            message["queued"] = answer.queued
            channel.send(message)
        self._arm()
        self._review_standing()

    # -- a lone worker's budget: the others' messages parked ---------------------

    def _parks(self, channel: _Channel) -> bool:
        """Whether `channel`'s messages wait: another worker holds a lone
        worker's budget, standing or being taken back."""
        holder = self._lone_holder
        return holder is not None and holder != channel.key

    def _alone(self) -> _Channel | None:
        """The only worker, when it may hold a lone worker's budget: the one
        channel there is, joined, heard since any exec, taking calls and
        saying "lone"; nobody waits in the queue, nothing paused or restoring."""
        slots = self.slots
        if len(self._channels) != 1 or self._restoring or slots.queue_length or slots.paused:
            return None
        (channel,) = self._channels.values()
        if (
            channel.lone
            and channel.joined
            and not channel.restoring
            and not channel.drained
            and channel.transport is not None
            and not channel.transport.is_closing()
        ):
            return channel
        return None

    def _lone_ending(self, channel: _Channel) -> None:
        """`channel`'s lone budget is taken back ("budget-end" sent): the
        others' messages wait for its "budget-dropped", LONE_END_WAIT at most."""
        if channel.key != self._lone_holder or self._lone_timer is not None:
            return
        self._lone_timer = PatientTimer(channel.loop, LONE_END_WAIT, self._lone_wait_over)

    def _lone_wait_over(self) -> None:
        """LONE_END_WAIT passed and the lone worker has not dropped its budget
        (hung, stopped): the slots it has not used are taken back
        (`HostSlots.take_back_unused`: what it was given less what it told it
        granted and what its call table has live), then the other workers'
        messages are read. Before (session 46), every slot stayed reserved
        until it answered or was killed as hung (`worker_hang_timeout`, a
        minute): the new generation's calls queued or got 503 meanwhile. It
        grants nothing from the budget once "budget-end" waits unread in its
        channel (`slot_client`), so none of what is taken back is granted twice."""
        self._lone_timer = None
        holder = self._lone_holder
        answers: list[Answer] = []
        if holder is not None:
            row = self.slots.find_row(holder)
            live = None
            if row is not None and row.standing is not None and self.live_calls is not None:
                live = self.live_calls(holder)
            taken, answers = self.slots.take_back_unused(holder, live)
            log.warning(
                "a lone worker did not drop its budget in time: the slots it has not "
                "used are taken back"
                + ("" if live is not None else " (none: its call table is not read)")
                + ", the other workers' messages are read",
                extra=fields(
                    channel=holder,
                    pid=None if row is None else row.pid,
                    waited=LONE_END_WAIT,
                    slots_taken_back=taken,
                    slots_kept=self.slots.standing_left(holder),
                ),
            )
        self._lone_over()
        self._send(answers)  # the queue first (FIFO), then the parked messages
        self._unpark()

    def _lone_over(self) -> None:
        self._lone_holder = None
        if self._lone_timer is not None:
            self._lone_timer.cancel()
            self._lone_timer = None

    def _read_parked_calls(self, channel: _Channel) -> None:
        """A channel gone with messages parked: who its calls are is kept
        as they say (an "acquire" names a call waiting for its slot, a
        "logged" or "release" forgets the call, an "answered" says its 101),
        so that no call it logged gets a second line and none it asked a slot
        for goes without one."""
        for message in channel.parked:
            op = message.get("op")
            with contextlib.suppress(TypeError, ValueError):
                if op == "acquire" and isinstance(call := message.get("call"), dict):
                    # A call waiting for its slot: lost with its worker, it has its
                    # line (before, only if its worker's table had a record of it).
                    asked = int(message.get("id"))  # type: ignore[arg-type]
                    self._keep_call(channel.key, asked, call, message)
                elif op in ("logged", "release"):
                    self._forget_call(channel.key, int(message.get("id")))  # type: ignore[arg-type]
                elif op == "answered":
                    for lease, at in message.get("leases") or []:
                        self._call_answered(channel.key, int(lease), float(at))

    def read_parked_unstated(self) -> None:
        """Before an exec's hand-over, a lone worker's budget not dropped yet:
        of each channel's parked messages, those no "state" says (`logged`,
        `full`, `unreachable`, answers to the supervisor's asks: everything
        but `_SAID_IN_STATE`) are read now, in order; the others stay parked
        for `handover` to drop. Before, `handover` dropped them all: a
        `logged` lost left its call known (a second access line should that
        worker die without a call table), an answer lost left its ask to
        time out, a 429 or a refused connection was not counted."""
        for channel in list(self._channels.values()):
            if not any(m.get("op") not in _SAID_IN_STATE for m in channel.parked):
                continue
            parked, channel.parked = channel.parked, []
            stated = []
            for message in parked:
                if message.get("op") in _SAID_IN_STATE:
                    stated.append(message)
                    continue
                try:
                    self._act(channel, message)
                except (WireError, SlotProtocolError) as exc:
                    channel.broke_protocol(exc)  # nothing more of it is read
                    stated = []
                    break
            channel.parked = stated + channel.parked

    def _unpark(self) -> None:
        """The messages parked while a lone worker's budget stood, read in
        order, each channel's until it must park again."""
        if self._unparking:
            return  # a message read here moved the table: the loop below goes on
        self._unparking = True
        try:
            self._unpark_each()
        finally:
            self._unparking = False

    def _unpark_each(self) -> None:
        for channel in list(self._channels.values()):
            while channel.parked and not self._parks(channel):
                message = channel.parked.pop(0)
                try:
                    self._act(channel, message)
                except (WireError, SlotProtocolError) as exc:
                    channel.broke_protocol(exc)
                    break

    def _review_standing(self, *, fleets_changed: bool = False) -> None:
        """Standing budgets (`core.slot_budget`) after the table moved: taken
        back ("budget-end") from the workers `HostSlots.end_standing` names (a
        call waits; with `fleets_changed`, from `wake`, a budget's fleet that
        cannot be picked); given, while nobody waits, to each worker that takes
        them and holds none (one that got nothing, no fleet having room, is
        tried again STANDING_RETRY later, or at the next `wake`: not at every
        message, each look a pass over the fleets).

        A lone worker's budget (session 46): to the only worker (`_alone`),
        every free slot of each fleet, its grants held ("lone": true); taken
        back at once when it is not alone any more, before any other worker's
        message is read (`_parks`)."""
        slots = self.slots
        alone = self._alone()
        takers = [
            c
            for c in self._channels.values()
            if (c.standing or c is alone)
            and c.joined
            and not c.restoring
            and not c.drained
            and c.transport is not None
            and not c.transport.is_closing()
        ]
        ending = slots.end_standing(
            fleets_changed=fleets_changed,
            takers=len(takers),
            fleets_most=BUDGET_FLEETS_MAX,
            lone=None if alone is None else alone.key,
        )
        for key in ending:
            # Not to one being restored: its budget ended at "sync", and the
            # table's copy ends with its "state" (`HostSlots.restore`).
            if (channel := self._channels.get(key)) is not None and not channel.restoring:
                channel.send({"op": "budget-end"})
                self._lone_ending(channel)
        if slots.queue_length or slots.paused:
            return
        now: float | None = None
        for channel in takers:
            row = slots.find_row(channel.key)
            if row is None or row.standing is not None or row.channel_lost:
                continue
            if self._parks(channel):
                # A lone budget being taken back holds every free slot: given
                # once it is dropped (its "budget-dropped" looks again).
                continue
            if now is None:
                now = channel.loop.time()
            if not fleets_changed and now < channel.standing_retry_at:
                continue
            lone = channel is alone
            if lone:
                budget = standing_share(
                    slots.balancer.fleets, 1, queue_length=0, most=None, lone=True
                )
            else:
                budget = standing_share(slots.balancer.fleets, len(takers), queue_length=0)
            named = sorted(budget.items(), key=lambda kv: -kv[1])[:BUDGET_FLEETS_MAX]
            fleets = slots.give_standing(channel.key, dict(named), lone=lone)
            if not fleets:
                channel.standing_retry_at = now + STANDING_RETRY
                continue
            if lone:
                self._lone_over()
                self._lone_holder = channel.key
            # Each spec said (not kept in `sent_specs`: the worker makes its
            # record of a fleet at its first grant there, and a grant by the
            # supervisor before that must carry it).
            entries = []
            for f in fleets:
                spec = spec_to_wire(row.standing_fleets[f.name].spec)
                entries.append({"fleet": f.name, "slots": f.left, "active": f.active, "spec": spec})
            message: dict[str, Any] = {"op": "budget", "standing": True, "fleets": entries}
            if lone:
                message["lone"] = True  # it holds its grants from it too
            channel.send(message)

    @staticmethod
    def _granted(channel: _Channel, lease: int, fleet: FleetState) -> dict[str, Any]:
        """A grant of `fleet`, whose spec is not the object `channel` was last
        sent (`_send` writes the others with `granted_line`): the spec said
        where it differs. Kept by identity, equal or not: a reload sets every
        fleet's spec anew, equal for most (`FleetSet`), and `_send` tells a
        grant with no spec to send by `is`. Before, an equal one was not kept:
        after any reload each grant of the fleet came here, its spec compared
        (a dataclass's == builds tuples), not `granted_line`."""
        message: dict[str, Any] = {"op": "granted", "id": lease, "fleet": fleet.name}
        sent = channel.sent_specs.get(fleet.name)
        channel.sent_specs[fleet.name] = fleet.spec
        if sent != fleet.spec:
            message["spec"] = spec_to_wire(fleet.spec)
        return message

    def _arm(self) -> None:
        """One timer, at the queue's next deadline."""
        deadline = self.slots.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = PatientTimer(loop, deadline - loop.time(), self._on_timer)

    def _on_timer(self) -> None:
        # The loop may run a timer a clock tick early: it is due all the same.
        now = max(asyncio.get_running_loop().time(), self._timer_at or 0.0)
        self._timer, self._timer_at = None, None
        self._send(self.slots.expire(now))


def whole_write_max(sock: socket.socket) -> int:
    """The longest line the kernel writes on `sock` (a Unix stream socket) in
    one piece, whole or not at all, whatever its peer has left unread."""
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # as the kernel set it
    return min(_WHOLE_WRITE_MAX, sndbuf // 2 - 64)


def _send_whole(sock: socket.socket, data: bytes) -> bool:
    """Write `data` (one line) on a channel's socket without waiting: True when
    all of it went. A Unix stream socket takes a write no longer than
    `whole_write_max` whole or not at all; should it take a part (a longer
    line), the rest is written within `_REST_WAIT`, as a line cut short would
    break the channel."""
    try:
        done = sock.send(data, socket.MSG_DONTWAIT)
    except OSError:  # full (the worker not reading), or gone
        return False
    deadline = time.monotonic() + _REST_WAIT
    while done < len(data):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [sock], [], left)[1]:
            log.error("slot channel: a line written in part; the worker's channel breaks")
            return False
        with contextlib.suppress(BlockingIOError, InterruptedError):
            done += sock.send(data[done:], socket.MSG_DONTWAIT)
    return True


def _take_waiting(sock: socket.socket) -> tuple[bytes, bool]:
    """What a channel's socket holds unread now, and whether its peer has
    closed its end (read as far as that; bounded: the rest is read as usual).
    For a channel kept over an exec, before anything is written to it
    (`adopt`), and through a channel's spare descriptor after a failed write
    (`_Channel._read_rest`)."""
    sock.setblocking(False)
    chunks: list[bytes] = []
    size = 0
    while size < _WAITING_READ_MAX:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return b"".join(chunks), False
        except OSError:
            return b"".join(chunks), True  # reset: gone as surely as closed
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def _by_fleet(row: WorkerRow) -> dict[str, int]:
    """Slots a row holds, by fleet name (for the log)."""
    return dict(Counter(fleet.name for fleet in row.held.values()))
