"""Fleet membership and its races, as transcripts: no sockets, no loop.

Each case starts from a membership, runs operations in order (what a reload,
add-fleet, remove-fleet or a call's end asks of the fleet set) and checks what
was said or done (the transcript) and the membership left. A fleet is written
`name@port`; a move to a new address is a new port.

The races found by review (docs/RELIABILITY.md, tests/e2e/test_fleet_change_races.py)
each have a case here; the e2e tests keep checking the sockets side (probes,
calls closed). `remove-fleet --force` closing only the calls that hold a slot on
the fleet is the registry's part of a removal, tested at the end without sockets
too; a stop logging every call it closes is not about membership (e2e only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.core.balancer import Balancer, FleetState, Membership
from fleet_ingress.core.fleet_set import FleetSet, MembershipError, Refused
from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.net.calls import Call, Registry
from fleet_ingress.net.dispatch import Dispatcher, Lease

_UNDER_WAY = " (an add-fleet of it is under way: try again once it has finished)"


def specs(*fleets: str) -> list[FleetSpec]:
    """`"a@1 maxconn=4"` -> the fleets-file line `https://fleet.test:1 name=a maxconn=4`."""
    lines = []
    for fleet in fleets:
        ref, _, options = fleet.partition(" ")
        name, _, port = ref.partition("@")
        lines.append(f"https://fleet.test:{port} name={name} {options}")
    return parse_fleets_text("\n".join(lines), default_maxconn=16)


def ref(fleet: FleetState) -> str:
    return f"{fleet.name}@{fleet.spec.port}"


@dataclass
class World:
    fleets: FleetSet
    balancer: Balancer
    said: list[str] = field(default_factory=list)

    def fleet(self, name: str) -> FleetState:
        """`a` is the first record of that name, `a@1` the one at that address."""
        wanted, _, port = name.partition("@")
        for fleet in self.fleets.fleets:
            if fleet.name == wanted and (not port or fleet.spec.port == int(port)):
                return fleet
        raise AssertionError(f"no {name} in {[ref(f) for f in self.fleets.fleets]}")

    def members(self) -> list[str]:
        return [
            f"{ref(f)} {f.membership.value} {f.admin.value} {f.health.value}"
            + (f" {f.active} calls" if f.active else "")
            for f in self.fleets.fleets
        ]


Step = Callable[[World], None]


def refusing(step: Step) -> Step:
    """A refused change is said, not raised: the case goes on."""

    def run(world: World) -> None:
        try:
            step(world)
        except Refused as exc:
            world.said.append(f"refused: {exc}")

    return run


def reload(*fleets: str) -> Step:
    """What `Ingress.apply_fleets` does with a fleets file that passed its checks."""

    def run(world: World) -> None:
        plan = world.fleets.apply(specs(*fleets), capacity_aware=True, health=Health.INIT)
        world.said += plan.notes
        world.said += [f"stop probing {ref(f)}" for f in plan.gone]  # before any start
        world.said += [f"start probing {ref(f)}" for f in plan.added]

    return run


def call(name: str) -> Step:
    """A call takes a slot on the fleet (the dispatcher hands out the balancer's pick)."""
    return lambda world: world.balancer.open(world.fleet(name))


def end(name: str) -> Step:
    """A call on the fleet ends: its slot is given back, and a removed fleet may go."""

    def run(world: World) -> None:
        fleet = world.fleet(name)
        world.balancer.close(fleet)
        if world.fleets.reap(fleet):
            world.said.append(f"gone {ref(fleet)}")
            if (moved := world.fleets.join_waiting(fleet.name)) is not None:
                world.said.append(f"start probing {ref(moved)}")

    return run


def remove(name: str) -> Step:
    """remove-fleet NAME (the fleets file written between the checks and the move)."""

    @refusing
    def run(world: World) -> None:
        fleet = world.fleets.member(name)
        world.fleets.check_removable(fleet)
        if world.fleets.remove(fleet):
            world.said.append(f"gone {ref(fleet)}")
        else:
            world.said.append(f"draining {ref(fleet)}: {fleet.active} calls")

    return run


def admin(name: str, state: str) -> Step:
    """drain / maint / ready NAME."""

    @refusing
    def run(world: World) -> None:
        world.fleets.set_admin(world.fleets.member(name), Admin(state.upper()))

    return run


def precheck(fleet: str) -> Step:
    """add-fleet URL --name NAME, before its health pre-check (which awaits a probe)."""
    return refusing(lambda world: world.fleets.check_new(*specs(fleet)))


def add(fleet: str) -> Step:
    """add-fleet, its pre-check passed: in the balancer and probed, not yet in the file."""

    @refusing
    def run(world: World) -> None:
        added = world.fleets.add(*specs(fleet), capacity_aware=True)
        world.said.append(f"start probing {ref(added)}")

    return run


def added(name: str) -> Step:
    """add-fleet saw it UP and wrote its line."""
    return lambda world: world.fleets.added(world.fleet(name))


def roll_back(name: str) -> Step:
    """add-fleet gave up (never UP, the file could not take it, cancelled)."""

    def run(world: World) -> None:
        fleet = world.fleet(name)
        world.fleets.roll_back(fleet)
        world.said.append(f"gone {ref(fleet)}")

    return run


def up(name: str) -> Step:
    """A passing probe."""

    def run(world: World) -> None:
        world.fleet(name).health = Health.UP

    return run


def pick(world: World) -> None:
    chosen = world.balancer.pick()
    world.said.append(f"picked {ref(chosen.fleet)}" if chosen.fleet else chosen.verdict.value)


@dataclass
class Case:
    start: tuple[str, ...]
    steps: list[Step]
    said: list[str]
    members: list[str]


CASES = {
    # RELIABILITY: a reload moves a to a new address while it has no call. The old
    # record goes at once and its probes stop before the new record's start.
    "a fleet moved while idle is probed at its new address only": Case(
        start=("a@1", "b@2"),
        steps=[reload("a@3", "b@2")],
        said=[
            "fleet a removed: draining 0 calls",
            "fleet a added",
            "stop probing a@1",
            "start probing a@3",
        ],
        members=["b@2 listed READY UP", "a@3 listed READY INIT"],
    ),
    # Review finding: it used to wait for another reload, so a moved single fleet
    # left every call 503 once its old address drained.
    "a fleet moved while it carries a call joins at its new address when that call ends": Case(
        start=("a@1", "b@2"),
        steps=[
            call("a"),
            reload("a@3", "b@2"),
            pick,
            end("a@1"),
            reload("a@3", "b@2"),
        ],
        said=[
            "fleet a removed: draining 1 calls",
            "fleet a: still draining its old address; joins at the new one "
            "(https://fleet.test:3, maxconn 16, READY) when its last call there ends",
            "picked b@2",
            "gone a@1",
            "start probing a@3",
        ],
        members=["b@2 listed READY UP", "a@3 listed READY INIT"],
    ),
    # The renewal audit of session 38: a maxconn (or admin) edit of a fleet waiting to
    # join at its new address was said as the same "still draining" line each reload,
    # the edit nowhere; `stat` shows the old record (its maxconn) until the join.
    "an edit of a fleet waiting at its new address is said, and is what joins": Case(
        start=("a@1", "b@2"),
        steps=[
            call("a"),
            reload("a@3", "b@2"),
            reload("a@3 maxconn=5 admin=drain", "b@2"),
            end("a@1"),
        ],
        said=[
            "fleet a removed: draining 1 calls",
            "fleet a: still draining its old address; joins at the new one "
            "(https://fleet.test:3, maxconn 16, READY) when its last call there ends",
            "fleet a: still draining its old address; joins at the new one "
            "(https://fleet.test:3, maxconn 5, DRAIN) when its last call there ends",
            "gone a@1",
            "start probing a@3",
        ],
        members=["b@2 listed READY UP", "a@3 listed DRAIN INIT"],
    ),
    "a move taken back by the next reload before the old address drains: nothing joins": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), reload("a@3", "b@2"), reload("b@2"), end("a@1")],
        said=[
            "fleet a removed: draining 1 calls",
            "fleet a: still draining its old address; joins at the new one "
            "(https://fleet.test:3, maxconn 16, READY) when its last call there ends",
            "gone a@1",
        ],
        members=["b@2 listed READY UP"],
    ),
    # RELIABILITY: a reload drops a while it carries a call, the next lists it again.
    "a fleet listed again while it drains stays once its call ends": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), reload("b@2"), reload("a@1", "b@2"), end("a")],
        said=["fleet a removed: draining 1 calls", "fleet a listed again: kept, READY"],
        members=["a@1 listed READY UP", "b@2 listed READY UP"],
    ),
    "a fleet listed again takes the file's admin state": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), reload("b@2"), reload("a@1 admin=maint", "b@2"), end("a")],
        said=["fleet a removed: draining 1 calls", "fleet a listed again: kept, MAINT"],
        members=["a@1 listed MAINT UP", "b@2 listed READY UP"],
    ),
    "remove-fleet undone by a reload that lists the fleet again": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), remove("a"), reload("a@1", "b@2"), end("a"), pick],
        said=["draining a@1: 1 calls", "fleet a listed again: kept, READY", "picked a@1"],
        members=["a@1 listed READY UP", "b@2 listed READY UP"],
    ),
    "a moved fleet already draining is not drained twice": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), remove("a"), reload("a@3", "b@2")],
        said=[
            "draining a@1: 1 calls",
            "fleet a: still draining its old address; joins at the new one "
            "(https://fleet.test:3, maxconn 16, READY) when its last call there ends",
        ],
        members=["a@1 draining DRAIN UP 1 calls", "b@2 listed READY UP"],
    ),
    "a fleet unlisted while idle goes at once": Case(
        start=("a@1", "b@2"),
        steps=[reload("a@1")],
        said=["fleet b removed: draining 0 calls", "stop probing b@2"],
        members=["a@1 listed READY UP"],
    ),
    # tests/e2e/test_operations.py: remove-fleet drains, then removes when idle; again
    # while it drains is no error; new calls go elsewhere meanwhile, even to a busier
    # fleet (and a slot handed out just as it drained is given back: the proxy sees
    # admin DRAIN).
    "remove-fleet drains a fleet with a call, which goes with its last call": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), call("b"), call("b"), remove("a"), remove("a"), pick, end("a")],
        said=["draining a@1: 1 calls", "draining a@1: 1 calls", "picked b@2", "gone a@1"],
        members=["b@2 listed READY UP 2 calls"],
    ),
    "remove-fleet of an idle fleet takes it out at once": Case(
        start=("a@1", "b@2"),
        steps=[remove("a"), remove("a")],
        said=["gone a@1", "refused: no fleet named 'a' (fleets: b)"],
        members=["b@2 listed READY UP"],
    ),
    "the last fleet cannot be removed, nor the last one not draining": Case(
        start=("a@1", "b@2"),
        steps=[call("b"), remove("b"), remove("a")],
        said=[
            "draining b@2: 1 calls",
            "refused: fleet 'a' is the last fleet: without one every call gets 503, and "
            "`fleet-ingress check` (run before every start and reload) fails; add its "
            "replacement first (fleet-ingress add-fleet URL), then remove it",
        ],
        members=["a@1 listed READY UP", "b@2 draining DRAIN UP 1 calls"],
    ),
    "a draining fleet stays in DRAIN": Case(
        start=("a@1", "b@2"),
        steps=[
            call("a"),
            remove("a"),
            admin("a", "ready"),
            admin("a", "maint"),
            admin("a", "drain"),
        ],
        said=[
            "draining a@1: 1 calls",
            "refused: fleet 'a' is being removed; it stays in DRAIN",
            "refused: fleet 'a' is being removed; it stays in DRAIN",
        ],
        members=["a@1 draining DRAIN UP 1 calls", "b@2 listed READY UP"],
    ),
    # tests/e2e/test_operations.py: changes made while add-fleet waits for UP are kept,
    # and a reload in that window neither drains the new fleet nor adds its line twice.
    "a reload while add-fleet waits for UP leaves the new fleet alone": Case(
        start=("a@1", "b@2"),
        steps=[
            add("c@3"),
            admin("a", "drain"),
            reload("a@1", "b@2"),
            reload("a@1", "b@2", "c@4"),
            admin("c", "maint"),
            remove("c"),
            up("c"),
            added("c"),
            reload("a@1", "b@2", "c@3"),
        ],
        said=[
            "start probing c@3",
            "refused: fleet 'c' is being added; try again once add-fleet has finished",
            "refused: fleet 'c' is being added; try again once add-fleet has finished",
        ],
        members=["a@1 listed DRAIN UP", "b@2 listed READY UP", "c@3 listed READY UP"],
    ),
    "add-fleet rolled back leaves no trace": Case(
        start=("a@1", "b@2"),
        steps=[add("c@3"), roll_back("c"), reload("a@1", "b@2")],
        said=["start probing c@3", "gone c@3"],
        members=["a@1 listed READY UP", "b@2 listed READY UP"],
    ),
    "add-fleet refuses a name or an address the ingress has, even mid-add": Case(
        start=("a@1", "b@2"),
        steps=[precheck("b@9"), precheck("x@2"), add("c@3"), precheck("c@4"), add("d@3")],
        said=[
            "refused: a fleet named 'b' exists already",
            "refused: https://fleet.test:2 is already in the ingress as fleet 'b'; a host "
            "is listed once, with one maxconn: for more calls on it, raise its maxconn= in "
            "the fleets file and reload",
            "start probing c@3",
            "refused: a fleet named 'c' exists already" + _UNDER_WAY,
            "refused: https://fleet.test:3 is already in the ingress as fleet 'c'" + _UNDER_WAY,
        ],
        members=["a@1 listed READY UP", "b@2 listed READY UP", "c@3 adding READY INIT"],
    ),
    # Two add-fleets of one fleet both pass the pre-check (each awaits its probe): the
    # second one to finish is refused, not added twice.
    "two add-fleets of the same fleet at once: the second is refused": Case(
        start=("a@1", "b@2"),
        steps=[precheck("c@3"), precheck("c@3"), add("c@3"), add("c@3")],
        said=["start probing c@3", "refused: a fleet named 'c' exists already" + _UNDER_WAY],
        members=["a@1 listed READY UP", "b@2 listed READY UP", "c@3 adding READY INIT"],
    ),
    "add-fleet of a name still draining waits for it to go": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), remove("a"), add("a@3"), end("a"), add("a@3")],
        said=[
            "draining a@1: 1 calls",
            "refused: a fleet named 'a' exists already (being removed: it goes once its calls "
            "end, `fleet-ingress stat` shows them; add it again then, or `remove-fleet --force` "
            "it first)",
            "gone a@1",
            "start probing a@3",
        ],
        members=["b@2 listed READY UP", "a@3 adding READY INIT"],
    ),
    # tests/e2e/test_operations.py: a reload's maxconn applies at once; the file's admin
    # state applies when the file changed it; a live state it does not record is kept.
    "a reload applies maxconn and the file's own admin edits": Case(
        start=("a@1", "b@2"),
        steps=[reload("a@1 maxconn=4", "b@2 admin=drain")],
        said=["fleet a: maxconn 16 -> 4", "fleet b: admin READY -> DRAIN"],
        members=["a@1 listed READY UP", "b@2 listed DRAIN UP"],
    ),
    "a live admin state the file does not record is kept by a reload": Case(
        start=("a@1", "b@2"),
        steps=[admin("a", "drain"), reload("a@1", "b@2")],
        said=[],
        members=["a@1 listed DRAIN UP", "b@2 listed READY UP"],
    ),
    # d0418ac: a reload that takes a fleet out of MAINT has it judged afresh.
    "a reload out of MAINT has the fleet judged afresh": Case(
        start=("a@1 admin=maint", "b@2"),
        steps=[reload("a@1", "b@2"), pick],
        said=["fleet a: admin MAINT -> READY", "picked b@2"],
        members=["a@1 listed READY INIT", "b@2 listed READY UP"],
    ),
    # review38b: removed (remove-fleet, or a reload without it) while in MAINT with
    # calls, it drains, out of MAINT: what its last probe before MAINT said is
    # stale there too (stat and /metrics showed UP, its free count and its
    # certificate's expiry again, until its next probe).
    "a fleet removed from MAINT drains judged afresh": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), admin("a", "maint"), remove("a")],
        said=["draining a@1: 1 calls"],
        members=["a@1 draining DRAIN INIT 1 calls", "b@2 listed READY UP"],
    ),
    "a fleet a reload removes from MAINT drains judged afresh": Case(
        start=("a@1", "b@2"),
        steps=[call("a"), reload("a@1 admin=maint", "b@2"), reload("b@2")],
        said=["fleet a: admin READY -> MAINT", "fleet a removed: draining 1 calls"],
        members=["a@1 draining DRAIN INIT 1 calls", "b@2 listed READY UP"],
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_fleet_membership(case: Case):
    fleets = FleetSet.from_specs(specs(*case.start), health=Health.UP)
    world = World(fleets, Balancer(fleets))
    for step in case.steps:
        step(world)
    assert world.said == case.said
    assert world.members() == case.members


def test_the_balancer_reads_the_set_as_it_is_now():
    fleets = FleetSet.from_specs(specs("a@1"), health=Health.UP)
    balancer = Balancer(fleets)
    fleets.apply(specs("a@1", "b@2"), capacity_aware=True, health=Health.UP)
    assert [ref(f) for f in balancer.fleets] == ["a@1", "b@2"]
    assert balancer.get("b") is fleets.get("b")


@pytest.mark.parametrize(
    ("membership", "move", "message"),
    [
        (Membership.LISTED, FleetSet.added, "fleet 'a': cannot finish adding while listed"),
        (Membership.LISTED, FleetSet.roll_back, "fleet 'a': cannot roll back while listed"),
        (Membership.DRAINING, FleetSet.roll_back, "fleet 'a': cannot roll back while draining"),
        (Membership.ADDING, FleetSet.remove, "fleet 'a': cannot remove while adding"),
    ],
)
def test_an_illegal_move_names_the_fleet_its_membership_and_the_move(
    membership: Membership, move: Callable[[FleetSet, FleetState], object], message: str
):
    fleets = FleetSet.from_specs(specs("a@1", "b@2"))
    fleet = fleets.get("a")
    assert fleet is not None
    fleet.membership = membership
    with pytest.raises(MembershipError, match=f"^{message}$"):
        move(fleets, fleet)


def test_a_record_gone_from_the_set_makes_no_move():
    fleets = FleetSet.from_specs(specs("a@1", "b@2"))
    a = fleets.get("a")
    assert a is not None and fleets.remove(a)
    assert a.membership is Membership.GONE and not fleets.reap(a)
    with pytest.raises(MembershipError, match="cannot remove while gone"):
        fleets.remove(a)


class _Carrier:
    bytes_received = 0
    call = None


def test_remove_fleet_force_closes_only_the_calls_holding_a_slot_there():
    """RELIABILITY: call X's attempt on a timed out and X queues to retry elsewhere,
    call Y holds a's slot; remove-fleet a --force closes Y, not X. a goes with Y."""
    fleets = FleetSet.from_specs(specs("a@1 maxconn=1", "b@2 maxconn=1"))
    dispatcher = Dispatcher(Balancer(fleets), queue_timeout=1.0, max_queue=8)
    dispatcher.on_release.append(fleets.reap)
    registry = Registry()
    a = fleets.get("a")
    assert a is not None

    def attempt(call: Call, fleet: FleetState) -> Lease:
        dispatcher.balancer.open(fleet)
        call.lease = Lease(dispatcher, fleet)
        return call.lease

    x, y = [Call(_Carrier(), "192.0.2.1", "/ws/", "bot") for _ in "xy"]  # type: ignore[arg-type]
    for call in (x, y):
        registry.add_call(call)
    attempt(x, a).release()  # X tried a and gave its slot back: it waits to retry
    held = attempt(y, a)
    assert registry.calls_on("a") == [y]
    assert not fleets.remove(a) and a.removing  # Y still holds a slot
    held.release()  # Y closed by --force
    assert a.membership is Membership.GONE and fleets.get("a") is None


def test_a_reload_plan_names_each_record_it_changed():
    fleets = FleetSet.from_specs(specs("a@1", "b@2", "c@3", "d@4", "f@7"), health=Health.UP)
    balancer = Balancer(fleets)
    for name in ("a", "c"):
        balancer.open(fleets.get(name))  # type: ignore[arg-type]
    c = fleets.get("c")
    assert c is not None and not fleets.remove(c)
    plan = fleets.apply(
        specs("a@5", "b@2 maxconn=4", "c@3", "e@6", "f@7 admin=maint"),
        capacity_aware=False,
        health=Health.INIT,
    )
    assert [ref(f) for f in plan.drained] == ["a@1", "d@4"]
    assert [ref(f) for f in plan.gone] == ["d@4"]
    assert [f"{s.name}@{s.port}" for s in plan.waiting] == ["a@5"]
    assert [ref(f) for f in plan.relisted] == ["c@3"]
    assert [ref(f) for f in plan.changed] == ["b@2", "f@7"]
    assert [ref(f) for f in plan.added] == ["e@6"]
    assert [f.capacity_aware for f in fleets.fleets] == [False] * 5


def test_a_fleet_removed_from_maint_keeps_no_certificate_expiry_its_last_probe_saw():
    """The certificate's expiry a probe read before MAINT is stale once the fleet
    leaves MAINT, by a removal too (it drains, probed again: its next probe
    reads it): FleetIngressFleetCertificateExpiringSoon fired again on it."""
    fleets = FleetSet.from_specs(specs("a@1", "b@2"), health=Health.UP)
    a = fleets.get("a")
    assert a is not None
    Balancer(fleets).open(a)
    a.reported_available, a.certificate_not_after = 5, 1e9
    fleets.set_admin(a, Admin.MAINT)
    assert not fleets.remove(a)
    assert (a.admin, a.health, a.reported_available, a.certificate_not_after) == (
        Admin.DRAIN,
        Health.INIT,
        None,
        None,
    )
