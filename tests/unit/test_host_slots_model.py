"""A stateful model of the host-wide slot table (`core.host_slots.HostSlots`, with
its `Balancer` and `FleetSet`), driven as `net/slot_server.py` and
`service/supervisor.py` drive them: hypothesis runs random sequences of steps
and checks the table against what the workers hold after each one.

What it models: three fleets (maxconn 1, 1, 2 at first) and up to three
workers, some that say when a fleet answered (`tells_answers`), some that do
not. Steps: join; acquire (with an avoid-list) and release (a held slot, a
waiting one, or a lease never used); a fleet's answer told (`answered`), a
call's 429 or failed connect (`take_as_full`, `take_as_unreachable`); leave,
with or without its process living on (`keep_held`), and that process's exit
(`release_kept`); the take-back of a failed exec (pause, `suspend` every
worker, each `restore`s its account, `resume`, the silent ones `reserve`d);
an upgrade's exec (a fresh table and fleet set, carried health and admin,
removed fleets carried draining, restored from the workers); time passing
(`expire`); health set UP or DOWN, probes sent and counted, admin states,
remove-fleet, and reloads that change maxconn, list or unlist fleets, move one
to a new address and change the queue's timeout and length.

Invariants, after every step:
- a pick takes an eligible fleet (up, with room), a fresh one when the
  avoid-list leaves one, the least loaded of those; NO_CAPACITY only when no
  fleet has room, NO_FLEET_UP only when none is up;
- no slot is granted while the table is paused, past maxconn, on a fleet
  down, FULL or draining, or to a worker that is gone;
- every lease is answered at most once, and only while it waits; the queue is
  answered in order (FIFO);
- an acquire while the table is paused always waits (finding B2: it was
  refused 503 "at capacity" under queueing off or a full queue while fleets
  had room); `resume` then answers the queue in order and refuses what is past
  its bounds, last asked first out, as acquire would (QUEUE_OFF, QUEUE_FULL);
- `expire` refuses nothing before its deadline and nothing while paused, and
  keeps nothing past it;
- each fleet record's `active` is the number of leases the workers hold (or
  the table reserves for them) on that record;
- each fleet's `pending` is exactly the leases of workers that tell answers
  whose answer has not been told, also over a take-back and a restore
  (finding B1: a lease restored in flight lost its mark when the suspended
  row's same key was closed after it); `unseen` holds only leases still held;
- the queue is exactly the leases the open workers wait on;
- a draining fleet is in DRAIN and goes at its last call (reaped);
- the queue's head never waits while a fleet has room for it;
- a restore knows every fleet a worker names and counts its lease on the
  record it was granted on.

Modelling limits:
- the wire is synchronous: an answer reaches its worker before the next step,
  so a grant crossing a release on the wire is not modelled (the idempotent
  release is what covers it);
- add-fleet (`FleetSet.add`, ADDING fleets) and `remove-fleet --force` (the
  workers closing their calls on a fleet) are not modelled;
- workers never lie or repeat a lease id (no `SlotProtocolError` path); a
  restoring worker's acquire and release reach its account, not the table (as
  slot_server ignores them until its "state"); a worker whose channel was lost
  is not modelled finishing its calls one by one: the table keeps what it
  counted until its process exits;
- no fleet change (reload, admin, remove-fleet) comes in while an exec's table
  is being restored (the supervisor holds them until it is);
- health is set directly or through `take_as_unreachable`, not through
  probes' fall/rise; a probe's capacity is 0 to 3; time moves by 0 to 4 s steps
  and the queue's timer is a step, not armed at `next_deadline`.

The normal run is derandomized (tests/property_settings.py). A longer, random
run: FLEET_INGRESS_PROPERTY_EXAMPLES=3000 .venv/bin/python -m pytest -q
-p no:cacheprovider tests/unit/test_host_slots_model.py (20 to 40 ms an
example on one core; `--hypothesis-show-statistics` shows which steps answered
what).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fleet_ingress.core.balancer import Balancer, FleetState, Membership, Pick, Verdict
from fleet_ingress.core.fleet_set import FleetSet
from fleet_ingress.core.fleet_set import Refused as SetRefused
from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.core.host_slots import QUEUE_FULL, QUEUE_OFF, Granted, HostSlots, Refused
from fleet_ingress.net.dispatch import take_as_full, take_as_unreachable
from tests.property_settings import property_settings

NAMES = ["a", "b", "c"]
WORKERS = [1, 2, 3]
QUEUE_TIMEOUT = 5.0
EXAMPLES = 150  # in CI, derandomized; FLEET_INGRESS_PROPERTY_EXAMPLES for more
LeaseKey = tuple[int, int]


def spec(name: str, maxconn: int, port: int = 0, admin: Admin = Admin.READY) -> FleetSpec:
    p = 9000 + NAMES.index(name) * 10 + port
    return FleetSpec(
        url=f"http://127.0.0.1:{p}",
        name=name,
        scheme="http",
        host="127.0.0.1",
        port=p,
        host_header=f"127.0.0.1:{p}",
        maxconn=maxconn,
        admin=admin,
    )


class CheckingBalancer(Balancer):
    """Checks every pick and every slot taken (leastconn, maxconn, eligibility)."""

    slots: HostSlots | None = None

    def pick(self, avoid=()):  # type: ignore[no-untyped-def]
        # What is eligible before the pick moves the cursor.
        up = [f for f in self.fleets if f.up]
        eligible = [f for f in up if f.has_room]
        fresh = [f for f in eligible if f.name not in avoid]
        result: Pick = super().pick(avoid)
        if result.verdict is Verdict.PICKED:
            chosen = result.fleet
            assert chosen is not None
            assert chosen in eligible, f"picked ineligible {chosen.name}"
            cands = fresh or eligible
            assert chosen in cands, "picked an avoided fleet while a fresh one was eligible"
            assert chosen.active == min(f.active for f in cands), "not least-loaded"
        elif result.verdict is Verdict.NO_CAPACITY:
            assert not eligible, "NO_CAPACITY while a fleet has room"
        else:
            assert not up, "NO_FLEET_UP while a fleet is up"
        return result

    def open(self, fleet: FleetState, lease=None) -> None:  # type: ignore[no-untyped-def]
        assert self.slots is None or not self.slots.paused, "granted while paused"
        assert fleet.active < fleet.maxconn, (
            f"grant past maxconn on {fleet.name}: active {fleet.active} maxconn {fleet.maxconn}"
        )
        assert fleet.up and not fleet.full, f"grant on a fleet not taking calls: {fleet}"
        assert fleet.membership in (Membership.LISTED, Membership.ADDING)
        super().open(fleet, lease)


@dataclass(repr=False)
class W:
    """A worker as the model knows it: what it holds, waits on, has been told."""

    key: int
    tells: bool
    next_lease: int = 1
    held: dict[int, FleetState] = field(default_factory=dict)
    # lease -> (since, deadline, avoid)
    waiting: dict[int, tuple[float, float, tuple[str, ...]]] = field(default_factory=dict)
    status: str = "open"  # open | lost (channel gone, process runs) | restoring
    # restoring: what the table counts for it meanwhile (its row at suspend)
    reserved: dict[int, FleetState] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)  # held, its fleet's answer not told yet

    def __repr__(self) -> str:
        held = {k: f.name for k, f in self.held.items()}
        return f"W({self.key}, {self.status}, held={held}, waiting={sorted(self.waiting)})"


class HostSlotsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.maxconn = {"a": 1, "b": 1, "c": 2}
        self.fs = FleetSet.from_specs([spec(n, self.maxconn[n]) for n in NAMES], health=Health.UP)
        self._new_table(self.fs, queue_timeout=QUEUE_TIMEOUT, max_queue=4)
        self.now = 100.0
        self.workers: dict[int, W] = {}
        self.restoring = False  # a take-back or an exec's restore under way (table paused)
        self.exec_restoring = False
        self.exec_held_before: dict[int, list[str]] = {}
        # id(fleet) -> (fleet, opened_total when its probe left)
        self.probes_out: dict[int, tuple[FleetState, int]] = {}
        self._ctx = "?"
        for key, tells in ((1, True), (2, False)):
            self.slots.join(key, pid=1000 + key, generation=1, tells_answers=tells)
            self.workers[key] = W(key, tells)

    def _new_table(self, fs: FleetSet, *, queue_timeout: float, max_queue: int) -> None:
        self.bal = CheckingBalancer(fs)
        self.slots = HostSlots(self.bal, queue_timeout=queue_timeout, max_queue=max_queue, fall=2)
        self.bal.slots = self.slots
        self.slots.on_release.append(self._reap)
        self.all_fleets: list[FleetState] = list(fs.fleets)

    # -- helpers ---------------------------------------------------------------

    def _reap(self, fleet: FleetState) -> None:  # ops.reap + ops.gone
        if self.fs.reap(fleet):
            event("fleet reaped at its last release")
            self._gone(fleet)

    def _gone(self, fleet: FleetState) -> None:
        moved = self.fs.join_waiting(fleet.name)
        if moved is not None:
            event("moved fleet joined at new address")
            self.all_fleets.append(moved)

    def _track_new(self) -> None:
        for f in self.fs.fleets:
            if not any(f is g for g in self.all_fleets):
                self.all_fleets.append(f)

    def _deliver(self, answers, expect_prefix=None) -> None:  # type: ignore[no-untyped-def]
        """Hand the answers to their workers (slot_server's sends), checking each
        lease is answered once, only while it waits, and in queue order."""
        got = []
        for a in answers:
            key = (a.worker, a.lease)
            got.append(key)
            w = self.workers.get(a.worker)
            assert w is None or a.lease not in w.answered, f"lease answered twice: {key}"
            if w is None:
                # slot_server drops answers for a channel that is gone: must not be a grant
                assert not isinstance(a, Granted), f"granted to a gone worker {a}"
                continue
            assert a.lease in w.waiting, f"answer to a lease not waiting: {a}, {w}"
            w.answered.add(a.lease)
            del w.waiting[a.lease]
            if isinstance(a, Granted):
                w.held[a.lease] = a.fleet
                if w.tells:
                    w.in_flight.add(a.lease)
                event(f"grant via {self._ctx}")
            else:
                event(f"refused via {self._ctx}: {a.reason.split(' (')[0][:48]}")
        if expect_prefix is not None:
            assert got == expect_prefix[: len(got)], f"not FIFO: {got} vs queue {expect_prefix}"

    def _open_workers(self) -> list[W]:
        return [w for w in self.workers.values() if w.status == "open"]

    def _wake(self) -> None:
        before = self.slots.queued()
        self._deliver(self.slots.wake(), before)

    # -- workers ---------------------------------------------------------------

    @rule(key=st.sampled_from(WORKERS), tells=st.booleans())
    def join(self, key, tells):
        self._ctx = "join"
        if key in self.workers or self.slots.get(key) is not None:
            return
        self.slots.join(key, pid=1000 + key, generation=1, tells_answers=tells)
        self.workers[key] = W(key, tells)

    @rule(data=st.data(), avoid=st.lists(st.sampled_from(NAMES), max_size=2, unique=True))
    def acquire(self, data, avoid):
        self._ctx = "acquire"
        ws = [w for w in self.workers.values() if w.status in ("open", "restoring")]
        if not ws:
            return
        w = data.draw(st.sampled_from(ws))
        lease = w.next_lease
        w.next_lease += 1
        w.waiting[lease] = (self.now, self.now + self.slots.queue_timeout, tuple(avoid))
        if w.status == "restoring":
            return  # slot_server ignores it: its "state" names it as waiting
        before = self.slots.queued()
        answer = self.slots.acquire(w.key, lease, avoid, self.now)
        if self.slots.paused:
            # B2: the count is not complete, so whether a fleet has room is not known.
            room = [f.name for f in self.fs.fleets if f.up and f.has_room]
            assert answer is None, (
                f"answered {answer} while paused (fleets with room: {room}): it must wait "
                "for resume"
            )
        if answer is None:
            assert self.slots.queued() == [*before, (w.key, lease)]
        else:
            self._deliver([answer])

    @rule(data=st.data())
    def release(self, data):
        self._ctx = "release"
        ws = [w for w in self.workers.values() if w.status in ("open", "restoring")]
        if not ws:
            return
        w = data.draw(st.sampled_from(ws))
        choices = [*w.held, *w.waiting, 0]  # 0: a lease never used (idempotent)
        lease = data.draw(st.sampled_from(choices))
        w.held.pop(lease, None)
        w.in_flight.discard(lease)
        if lease in w.waiting:
            del w.waiting[lease]
            w.answered.add(lease)  # withdrawn: no answer may come
        if w.status == "restoring":
            return  # ignored by slot_server; its "state" leaves it out
        before = self.slots.queued()
        answers = self.slots.release(w.key, lease)
        self._deliver(answers, [q for q in before if q != (w.key, lease)])

    @rule(data=st.data())
    def answered_msg(self, data):
        self._ctx = "answered_msg"
        ws = [w for w in self._open_workers() if w.held]
        if not ws:
            return
        w = data.draw(st.sampled_from(ws))
        lease = data.draw(st.sampled_from(sorted(w.held)))
        self.slots.answered(w.key, lease, self.now)
        w.in_flight.discard(lease)

    @rule(data=st.data(), refused=st.booleans())
    def full_or_unreachable(self, data, refused):
        self._ctx = "full_or_unreachable"
        ws = [w for w in self._open_workers() if w.held]
        if not ws:
            return
        w = data.draw(st.sampled_from(ws))
        lease = data.draw(st.sampled_from(sorted(w.held)))
        fleet = self.slots.fleet_of(w.key, lease)
        assert fleet is w.held[lease]
        if data.draw(st.booleans()):
            take_as_full(fleet)
        elif take_as_unreachable(fleet, self.slots.fall, refused=refused):
            self._wake()

    @rule(data=st.data(), keep=st.booleans())
    def leave(self, data, keep):
        self._ctx = "leave"
        ws = [w for w in self.workers.values() if w.status in ("open", "restoring")]
        if not ws:
            return
        w = data.draw(st.sampled_from(ws))
        before = [q for q in self.slots.queued() if q[0] != w.key]
        for lease in list(w.waiting):
            w.answered.add(lease)
        w.waiting.clear()
        row, answers = self.slots.leave(w.key, keep_held=keep)
        table_held = dict(row.held) if row is not None else {}
        if w.status == "restoring":
            # the table's count for it is the reserved one
            assert table_held == w.reserved or not keep
        event(f"leave keep={keep} held={bool(table_held)} restoring={w.status == 'restoring'}")
        w.in_flight.clear()
        if keep and row is not None and row.channel_lost:
            w.status = "lost"
            # its process finishes its calls: what it really holds may shrink, the
            # table keeps what it counted.
            w.held = table_held
        else:
            del self.workers[w.key]
        self._deliver(answers, before)

    @rule(data=st.data())
    def lost_worker_exits(self, data):
        self._ctx = "lost_worker_exits"
        ws = [w for w in self.workers.values() if w.status == "lost"]
        if not ws:
            return
        w = data.draw(st.sampled_from(ws))
        before = self.slots.queued()
        row, answers = self.slots.release_kept(w.key)
        assert row is not None
        del self.workers[w.key]
        self._deliver(answers, before)

    # -- take_back (a failed exec): pause, suspend all, restore each -------------

    @precondition(lambda self: not self.restoring)
    @rule()
    def take_back_start(self):
        self._ctx = "take_back_start"
        self.restoring = True
        self.slots.paused = True
        for w in self._open_workers():
            row = self.slots.suspend(w.key)
            assert row is not None
            w.status = "restoring"
            w.reserved = dict(row.held)
        assert all(
            q[0] not in self.workers or self.workers[q[0]].status != "restoring"
            for q in self.slots.queued()
        )

    @rule(data=st.data())
    def worker_restores(self, data):
        self._ctx = "worker_restores"
        ws = [w for w in self.workers.values() if w.status == "restoring"]
        if not ws:
            return
        w = data.draw(st.sampled_from(ws))
        held = [(lease, f.name) for lease, f in w.held.items()]
        waiting = [
            (lease, list(av), self.now - since) for lease, (since, _, av) in w.waiting.items()
        ]
        unknown = self.slots.restore(
            w.key,
            pid=1000 + w.key,
            generation=1,
            held=held,
            waiting=waiting,
            now=self.now,
            tells_answers=w.tells,
            in_flight=sorted(w.in_flight & set(w.held)) if w.tells else (),
        )
        assert unknown == [], f"held fleets unknown after restore: {unknown}"
        event(f"restore paused={self.slots.paused} held={bool(held)} waiting={bool(waiting)}")
        for lease, f in list(w.held.items()):
            now_on = self.slots.fleet_of(w.key, lease)
            assert now_on is not None and now_on.name == f.name
            if any(f is g for g in self.all_fleets):
                assert now_on is f, "restore counted a lease on another record"
            w.held[lease] = now_on  # after an exec: the new table's record
        # B1: its in-flight leases stay in flight (in_flight_matches checks them).
        w.status = "open"
        w.reserved = {}
        for lease in w.waiting:  # restored deadline
            since, _, av = w.waiting[lease]
            w.waiting[lease] = (since, since + self.slots.queue_timeout, av)
        if not self.slots.paused:
            self._wake()

    @precondition(lambda self: self.restoring)
    @rule()
    def take_back_end(self):
        self._ctx = "take_back_end"
        # finish_restore's timeout: the silent ones stay counted (row reserved), resume
        self.restoring = False
        for w in self.workers.values():
            if w.status == "restoring" and self.slots.get(w.key) is None:
                names = self.exec_held_before.get(w.key, [])
                self.slots.reserve(w.key, pid=1000 + w.key, generation=1, fleets=names)
                row = self.slots.get(w.key)
                assert row is not None
                w.reserved = dict(row.held)
                event("exec: silent worker reserved")
        self.exec_held_before = {}
        self.exec_restoring = False
        self._resume()
        for f in list(self.fs.fleets):  # adopt_workers: ops.reap for every fleet
            self._reap(f)

    def _resume(self) -> None:
        """`resume`: the queue is answered in order as far as there is room, then
        what is past its bounds is refused, in queue order, as acquire would."""
        before = self.slots.queued()
        if self.slots.queue_timeout <= 0:
            bound, reason = 0, QUEUE_OFF
        else:
            bound, reason = self.slots.max_queue, QUEUE_FULL
        answers = self.slots.resume()
        over = [
            a for a in answers if isinstance(a, Refused) and a.reason in (QUEUE_OFF, QUEUE_FULL)
        ]
        served = answers[: len(answers) - len(over)]
        assert answers[len(served) :] == over, f"refused past the bounds before the end: {answers}"
        assert [(a.worker, a.lease) for a in served] == before[: len(served)], (
            f"not FIFO: {answers} vs queue {before}"
        )
        left = before[len(served) :]
        assert self.slots.queued() == left[:bound], f"queue {self.slots.queued()} kept of {left}"
        assert [(a.worker, a.lease) for a in over] == left[bound:], (
            f"refused {over}, past the bound {bound} of {left}"
        )
        assert all(a.reason == reason for a in over), (
            f"{over}: queue_timeout {self.slots.queue_timeout}"
        )
        if over:
            event(f"resume refused past the bounds: {reason}")
        self._deliver(answers)

    # -- time ------------------------------------------------------------------

    @rule(dt=st.floats(0.0, 4.0))
    def expire(self, dt):
        self._ctx = "expire"
        self.now += dt
        answers = self.slots.expire(self.now)
        if self.slots.paused:
            assert answers == [], "expired while paused"
        for a in answers:
            assert isinstance(a, Refused)
            w = self.workers.get(a.worker)
            if w is not None and a.lease in w.waiting:
                assert w.waiting[a.lease][1] <= self.now + 1e-9, "expired before its deadline"
        self._deliver(answers)
        if not self.slots.paused:
            for w in self._open_workers():
                for lease, (_, deadline, _) in w.waiting.items():
                    assert deadline > self.now, f"waiter past its deadline kept: {w.key}/{lease}"

    # -- fleets: health, probes, admin, reload, removal --------------------------

    @rule(name=st.sampled_from(NAMES), health=st.sampled_from([Health.UP, Health.DOWN]))
    def set_health(self, name, health):
        self._ctx = "set_health"
        f = self.fs.get(name)
        if f is None or f.admin is Admin.MAINT:
            return
        f.health = health
        if health is Health.DOWN:
            f.reported_available = None
        self._wake()

    @rule(name=st.sampled_from(NAMES), cap=st.integers(0, 3), answered_before=st.booleans())
    def probe(self, name, cap, answered_before):
        self._ctx = "probe"
        f = self.fs.get(name)
        if f is None or f.admin is Admin.MAINT:
            return
        if f._probing is None:  # a probe leaves now; its answer is counted by a later probe rule
            self.probes_out[id(f)] = (f, f.probe_sending(self.now))
            if not answered_before:
                return
        sent = self.probes_out.get(id(f))
        opened = sent[1] if sent is not None and sent[0] is f else f.opened_total
        f.probe_counted(cap, opened)
        self._wake()

    @rule(name=st.sampled_from(NAMES), admin=st.sampled_from(list(Admin)))
    @precondition(lambda self: not self.exec_restoring)
    def set_admin(self, name, admin):
        self._ctx = "set_admin"
        try:
            f = self.fs.member(name)
            self.fs.set_admin(f, admin)
        except SetRefused:
            return
        self._wake()

    @rule(name=st.sampled_from(NAMES))
    @precondition(lambda self: not self.exec_restoring)
    def remove_fleet(self, name):
        self._ctx = "remove_fleet"
        try:
            f = self.fs.member(name)
            self.fs.check_removable(f)
        except SetRefused:
            return
        if f.removing:
            return
        if self.fs.remove(f):
            self._gone(f)
        self._wake()

    @rule(
        maxconn=st.fixed_dictionaries({n: st.integers(0, 2) for n in NAMES}),
        listed=st.sets(st.sampled_from(NAMES), min_size=1),
        moved=st.sets(st.sampled_from(NAMES), max_size=1),
        qt=st.sampled_from([5.0, 5.0, 1.0, 0.0]),
        mq=st.sampled_from([4, 4, 2, 0]),
    )
    @precondition(lambda self: not self.exec_restoring)
    def reload(self, maxconn, listed, moved, qt, mq):
        self._ctx = "reload"
        self.slots.queue_timeout = qt
        self.slots.max_queue = mq
        specs = []
        for n in sorted(listed):
            cur = self.fs.get(n)
            port = 0
            if cur is not None:
                port = cur.spec.port - (9000 + NAMES.index(n) * 10)
                if n in moved:
                    port = (port + 1) % 3
            specs.append(spec(n, maxconn[n], port, Admin.READY if cur is None else cur.spec.admin))
        plan = self.fs.apply(specs, capacity_aware=True, health=Health.INIT)
        for f in plan.gone:
            self._gone(f)
        self._track_new()
        self._wake()

    # -- an upgrade's exec: a fresh table and fleet set, rebuilt from the workers --------

    @precondition(lambda self: not self.restoring)
    @rule()
    def exec_upgrade(self):
        self._ctx = "exec_upgrade"
        old_fs, old_slots = self.fs, self.slots
        # the fleets file: what is listed (moved ones at their new address)
        file_specs = [f.spec for f in old_fs.fleets if f.membership is Membership.LISTED]
        file_specs += [w.spec for w in old_fs._waiting.values()]
        removing = [f for f in old_fs.fleets if f.membership is Membership.DRAINING]
        fs = FleetSet.from_specs(file_specs, health=Health.INIT)
        for f in removing:
            fs.carry_removing(f.spec, capacity_aware=True)
        for f in fs.fleets:  # restore_fleets: carried health/admin by name
            old = old_fs.get(f.name)
            if old is not None:
                f.health, f.admin = old.health, old.admin
                f.reported_available = old.reported_available
        self.fs = fs
        self._new_table(fs, queue_timeout=old_slots.queue_timeout, max_queue=old_slots.max_queue)
        self.slots.paused = True
        self.restoring = True
        self.exec_restoring = True  # fleet changes wait (supervisor.start, changes_wait)
        self.exec_held_before = {}
        for w in list(self.workers.values()):
            row = old_slots.get(w.key)
            names = [f.name for f in row.held.values()] if row is not None else []
            if w.status == "lost":  # _watch_channelless
                if names:
                    self.slots.reserve(w.key, pid=1000 + w.key, generation=1, fleets=names)
                    self.slots.leave(w.key, keep_held=True)
                    kept = self.slots.get(w.key)
                    assert kept is not None
                    w.held = dict(kept.held)
                else:
                    del self.workers[w.key]
                continue
            self.exec_held_before[w.key] = names
            w.status = "restoring"
            w.reserved = {}
        event("exec")

    # More weight on the steps that fill and drain the table.

    @rule(data=st.data(), avoid=st.lists(st.sampled_from(NAMES), max_size=2, unique=True))
    def acquire_more(self, data, avoid):
        self.acquire(data, avoid)

    @rule(data=st.data(), avoid=st.lists(st.sampled_from(NAMES), max_size=2, unique=True))
    def acquire_again(self, data, avoid):
        self.acquire(data, avoid)

    @rule(data=st.data())
    def release_more(self, data):
        self.release(data)

    @rule()
    def wake(self):
        self._ctx = "wake"
        self._wake()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def counts_match(self):
        expected: dict[int, int] = {}
        for w in self.workers.values():
            src = w.reserved if w.status == "restoring" else w.held
            for f in src.values():
                expected[id(f)] = expected.get(id(f), 0) + 1
        for f in self.all_fleets:
            assert f.active >= 0
            assert f.active == expected.get(id(f), 0), (
                f"fleet {f.name} ({f.membership.value}) active {f.active} != leases "
                f"{expected.get(id(f), 0)}"
            )

    @invariant()
    def in_flight_matches(self):
        held_keys: dict[int, set[LeaseKey]] = {}
        want: dict[int, set[LeaseKey]] = {}
        for w in self.workers.values():
            table = w.reserved if w.status == "restoring" else w.held
            for lease, f in table.items():
                held_keys.setdefault(id(f), set()).add((w.key, lease))
            if w.status == "open" and w.tells:
                for lease in w.in_flight:
                    want.setdefault(id(w.held[lease]), set()).add((w.key, lease))
        for f in self.all_fleets:
            assert f.unseen <= held_keys.get(id(f), set()), (
                f"fleet {f.name}: unseen keeps leases no longer held: "
                f"{f.unseen - held_keys.get(id(f), set())}"
            )
            if not any(w.status == "restoring" for w in self.workers.values()):
                assert f.pending == want.get(id(f), set()), (
                    f"fleet {f.name}: pending {f.pending} != calls in flight "
                    f"{want.get(id(f), set())}"
                )

    @invariant()
    def queue_matches(self):
        queued = self.slots.queued()
        assert len(queued) == len(set(queued))
        want = {
            (w.key, lease)
            for w in self.workers.values()
            if w.status == "open"
            for lease in w.waiting
        }
        assert set(queued) == want, f"queue {queued} != waiting {want}"
        assert len(queued) == self.slots.queue_length

    @invariant()
    def drained_fleets_are_in_drain(self):
        if self.exec_restoring:
            return  # adopt_workers reaps once the table is restored
        for f in self.fs.fleets:
            if f.membership is Membership.DRAINING:
                assert f.admin is Admin.DRAIN
                # a draining fleet with no call must have gone (reaped at its last release)
                assert f.active > 0, f"draining fleet {f.name} with no call left not reaped"

    @invariant()
    def queue_not_stuck(self):
        # After any step the callers follow with a wake: the head waits only if no
        # fleet has room for it (no overtaking is possible, so a head that could be
        # served is a stall). Not while paused.
        if self.slots.paused or not self.slots.queued():
            return
        head = self.slots.queued()[0]
        eligible = [f for f in self.fs.fleets if f.up and f.has_room]
        assert not eligible, f"head {head} waits while {[f.name for f in eligible]} have room"


HostSlotsMachine.TestCase.settings = property_settings(EXAMPLES, stateful_step_count=40)
TestHostSlotsModel = HostSlotsMachine.TestCase
