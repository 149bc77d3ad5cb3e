"""What the supervisor carries over its re-execution (service/upgrade.py):
the fleets' state by name, and the memfd that holds it, read once."""

from __future__ import annotations

import json
import os

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.config.settings import IngressConfig
from fleet_ingress.core.fleet_set import FleetExists, FleetSet
from fleet_ingress.core.fleet_spec import Admin
from fleet_ingress.core.health import Health
from fleet_ingress.net.tls import CarrierPem
from fleet_ingress.service.upgrade import (
    UPGRADE_STATE,
    RunningJson,
    fleets_to_json,
    removing_specs,
    restore_fleets,
    running_to_json,
    state_fd,
    take_state,
    unread_from_json,
    unread_to_json,
)


def _fleets(text: str) -> FleetSet:
    return FleetSet.from_specs(parse_fleets_text(text, default_maxconn=16), health=Health.INIT)


def test_the_fleets_state_goes_over_by_name_and_no_fleet_starts_at_init() -> None:
    before = _fleets("https://a.test name=a\nhttps://b.test name=b\nhttps://c.test name=c\n")
    a, b, c = before.fleets
    a.health, a.reported_available, a.opened_total, a.opened_at_probe = Health.UP, 9, 40, 35
    a.probes_total, a.check_failures = 120, 2
    b.health, b.health_streak, b.admin = Health.DOWN, 1, Admin.DRAIN
    c.health = Health.UP
    carried = fleets_to_json(before.fleets)
    # The new image's fleets file: c removed meanwhile, d added.
    after = _fleets("https://a.test name=a\nhttps://b.test name=b\nhttps://d.test name=d\n")
    assert restore_fleets(after.fleets, carried) == ["a", "b"]
    a2, b2, d2 = after.fleets
    assert (a2.health, a2.estimated_available, a2.probes_total, a2.check_failures) == (
        Health.UP,
        4,
        120,
        2,
    )
    assert (b2.health, b2.health_streak, b2.admin) == (Health.DOWN, 1, Admin.DRAIN)
    assert d2.health is Health.INIT  # new: probed as at a start


def test_a_fleet_being_removed_goes_over_draining_and_leaves_with_its_last_call() -> None:
    """remove-fleet c while it carries calls: c is out of the fleets file but
    must still count them (its maxconn holds for the host) after an exec, and
    go once they end. Before, the new image dropped it: its calls counted
    against no fleet, and c added again could take maxconn more."""
    before = _fleets("https://a.test name=a\nhttps://c.test name=c maxconn=2\n")
    _, c = before.fleets
    c.health, c.active = Health.UP, 2
    assert not before.remove(c)  # draining: 2 calls left
    carried = fleets_to_json(before.fleets)
    after = _fleets("https://a.test name=a\n")  # the file the new image reads
    (spec,) = removing_specs(carried)
    c2 = after.carry_removing(spec, capacity_aware=True)
    assert c2 is not None and c2.removing and c2.admin is Admin.DRAIN
    assert (c2.spec.url, c2.maxconn) == ("https://c.test", 2)
    assert restore_fleets(after.fleets, carried) == ["a", "c"]
    assert c2.health is Health.UP
    with pytest.raises(FleetExists):  # add-fleet c meanwhile: as before the exec
        after.check_new(spec)
    c2.active = 2  # the workers' accounts name it (HostSlots.restore)
    assert not after.reap(c2)
    c2.active = 0
    assert after.reap(c2) and after.get("c") is None
    # Listed again by the new image's file: that record stands, nothing carried over it.
    assert _fleets("https://c.test name=c\n").carry_removing(spec, capacity_aware=True) is None


def test_a_fleet_a_reload_moved_drains_its_old_address_over_an_exec_and_joins_at_the_new() -> None:
    """A reload moved x to a new address while calls ran at the old one; then an
    upgrade. Before, the new address took the old record's DRAIN (carried by
    name) and kept it, calls refused: now the old address drains, its calls
    counted against it, and the new one joins, READY, once it goes."""
    before = _fleets("https://a.test name=a\nhttps://x-old.test name=x maxconn=3\n")
    x_old = before.fleets[1]
    x_old.health, x_old.active = Health.UP, 3
    plan = before.apply(
        parse_fleets_text("https://a.test name=a\nhttps://x-new.test name=x\n", default_maxconn=16),
        capacity_aware=True,
        health=Health.INIT,
    )
    assert plan.waiting and x_old.removing and x_old.admin is Admin.DRAIN
    carried = fleets_to_json(before.fleets)
    after = _fleets("https://a.test name=a\nhttps://x-new.test name=x\n")  # the file now
    (spec,) = removing_specs(carried)
    x2 = after.carry_removing(spec, capacity_aware=True)
    assert x2 is not None and (x2.spec.url, x2.maxconn) == ("https://x-old.test", 3)
    assert [f.spec.url for f in after.fleets] == ["https://a.test", "https://x-old.test"]
    assert restore_fleets(after.fleets, carried) == ["a", "x"]
    assert x2.admin is Admin.DRAIN and x2.removing
    x2.active = 3  # the workers' accounts name x (HostSlots.restore)
    assert not after.reap(x2)
    x2.active = 0
    assert after.reap(x2)
    joined = after.join_waiting("x")
    assert joined is not None and joined.spec.url == "https://x-new.test"
    assert joined.admin is Admin.READY and not joined.removing and after.get("x") is joined


def test_a_malformed_entry_leaves_that_fleet_as_the_file_says() -> None:
    fleets = _fleets("https://a.test name=a\n")
    assert restore_fleets(fleets.fleets, [{"name": "a", "health": "SIDEWAYS"}]) == []
    assert fleets.fleets[0].health is Health.INIT


def test_the_state_is_read_once_from_an_inherited_memfd() -> None:
    fd = state_fd({"generation": 3})
    assert os.get_inheritable(fd)  # it must survive the exec
    env = {UPGRADE_STATE: str(fd)}
    assert take_state(env) == {"version": 1, "generation": 3}
    assert UPGRADE_STATE not in env
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: nothing of it leaks into the workers
    assert take_state({}) is None


def test_a_state_from_another_version_is_refused_by_name() -> None:
    fd = os.memfd_create("state", 0)
    os.write(fd, b'{"version": 99}')
    os.lseek(fd, 0, os.SEEK_SET)
    with pytest.raises(ValueError, match="FLEET_INGRESS_UPGRADE_STATE: state version 99"):
        take_state({UPGRADE_STATE: str(fd)})


def test_the_head_of_a_line_cut_by_the_exec_goes_over_byte_for_byte() -> None:
    # A worker's bytes need not be text (a newer worker, a cut inside a character).
    unread = {"worker.12.1": b'{"op":"report","counts":{"coun', "worker.13.2": b"\xff\xfe{"}
    fd = state_fd({"unread": unread_to_json(unread)})
    carried = take_state({UPGRADE_STATE: str(fd)})
    assert carried is not None
    assert unread_from_json(carried["unread"]) == unread


@pytest.mark.parametrize(
    ("carried", "kept"),
    [
        (None, {}),  # a release that carried none
        ([], {}),
        ({"worker.1.1": "e30="}, {"worker.1.1": b"{}"}),
        ({"worker.1.1": "not base64!", "worker.2.1": "e30="}, {"worker.2.1": b"{}"}),
        ({"worker.1.1": 7}, {}),
    ],
)
def test_unread_bytes_that_are_not_base64_are_left_out_not_misread(carried, kept) -> None:
    assert unread_from_json(carried) == kept


def test_what_an_upgrade_took_does_not_move_with_the_wall_clock(monkeypatch) -> None:
    """`upgrade` printed "took -3586.1s" when NTP stepped the clock back an hour
    during one (the clock audit of session 19); one begun by a release that
    noted no monotonic start is still timed by the wall clock."""
    import time

    from fleet_ingress.service.upgrade_sequence import _took

    status = {"started": time.time() - 4, "began_monotonic": time.monotonic() - 4}
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    assert 4 <= _took(status) < 6
    assert -3597 < _took({"started": real_time() - 4}) < -3590  # the old release's way


def test_a_fleet_s_last_probe_keeps_its_monotonic_time_over_an_exec() -> None:
    """A MAINT fleet is not probed again: after an upgrade its age fell back to
    the wall clock for good (the review of session 19). From a release that did
    not carry it, it is derived from the wall-clock time."""
    import time

    before = _fleets("https://a.test name=a\n")
    (a,) = before.fleets
    a.admin = Admin.MAINT
    a.last_probe_at, a.last_probe_monotonic = time.time() - 5, time.monotonic() - 5
    carried = fleets_to_json(before.fleets)
    after = _fleets("https://a.test name=a\n")
    restore_fleets(after.fleets, carried)
    assert after.fleets[0].last_probe_monotonic == a.last_probe_monotonic
    older = [{k: v for k, v in carried[0].items() if k != "last_probe_monotonic"}]
    after = _fleets("https://a.test name=a\n")
    assert restore_fleets(after.fleets, older) == ["a"]
    derived = after.fleets[0].last_probe_monotonic
    assert derived is not None and abs(derived - a.last_probe_monotonic) < 0.5


def test_each_fleet_is_carried_field_by_field_in_order_enums_by_name() -> None:
    """Read in one call a fleet (the crash snapshot takes it every second):
    the same entry, key for key and in order, as before."""
    fleets = _fleets("https://a.test name=a\nhttps://c.test name=c maxconn=2\n")
    a, c = fleets.fleets
    a.health, a.health_streak, a.admin, a.reported_available = Health.UP, 1, Admin.MAINT, 7
    a.opened_total, a.opened_at_probe, a.probes_total, a.check_failures = 5, 4, 30, 2
    a.last_probe_at, a.last_probe_seconds, a.last_probe_monotonic = 1700000000.5, 0.01, 99.5
    c.active = 1
    assert not fleets.remove(c)
    carried = fleets_to_json(fleets.fleets)
    assert json.dumps(carried[0]) == json.dumps(
        {
            "name": "a",
            "health": "UP",
            "health_streak": 1,
            "admin": "MAINT",
            "reported_available": 7,
            "opened_total": 5,
            "opened_at_probe": 4,
            "last_probe_at": 1700000000.5,
            "last_probe_seconds": 0.01,
            "probes_total": 30,
            "check_failures": 2,
            "last_probe_monotonic": 99.5,
        }
    )
    assert list(carried[1])[-2:] == ["last_probe_monotonic", "removing"]
    assert carried[1]["health"] == "INIT" and carried[1]["admin"] == "DRAIN"


def test_what_the_image_runs_is_made_again_only_when_it_changed() -> None:
    """`running` (the configuration, every fleet's spec, the certificate) in the
    crash snapshot every second: the one made before while none changed."""
    config = IngressConfig.model_validate({})
    pem = CarrierPem(b"CERT", b"KEY")
    specs = [f.spec for f in _fleets("https://a.test name=a\nhttps://b.test name=b\n").fleets]
    running = RunningJson()
    first = running(config, list(specs), pem)
    assert first == running_to_json(config, specs, pem)
    assert running(config, list(specs), pem) is first
    added = [*specs, _fleets("https://d.test name=d\n").fleets[0].spec]
    assert running(config, added, pem) == running_to_json(config, added, pem)
    reloaded = IngressConfig.model_validate({"timeouts": {"drain": 5}})
    assert running(reloaded, added, pem) == running_to_json(reloaded, added, pem)
    assert running(reloaded, added, pem)["config"] != first["config"]
    renewed = CarrierPem(b"CERT 2", b"KEY 2")
    assert running(reloaded, added, renewed)["pem"] == running_to_json(config, [], renewed)["pem"]
