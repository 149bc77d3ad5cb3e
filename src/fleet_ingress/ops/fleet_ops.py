"""Live fleet changes an operator makes: admin state, add a fleet, remove one.

Each change either happens whole or not at all, and says why not. There are
no server lines to hand-edit: the fleets file is written here, atomically,
with a backup, keeping the operator's comments.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shlex
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet_ingress.config.atomic import backup_of, write_atomically
from fleet_ingress.config.fleet_lookup import (
    LOOKUP_BUDGET,
    Address,
    addresses_of,
    literal_addresses,
    shared_warnings,
)
from fleet_ingress.config.fleets_file import FleetsFileError, parse_fleets_text, url_default_name
from fleet_ingress.config.fleets_store import (
    FleetNotListed,
    maxconn_pinned,
    text_with_admin_state,
    text_with_fleet,
    text_without_fleet,
)
from fleet_ingress.config.settings import FleetsSection
from fleet_ingress.core.balancer import FleetState, Membership
from fleet_ingress.core.call_machine import EndReason
from fleet_ingress.core.fleet_set import (
    FleetBeingAdded,
    FleetExists,
    FleetSet,
    LastFleet,
    NoSuchFleet,
    Refused,
    StaysInDrain,
)
from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.logs import fields
from fleet_ingress.net.calls import Registry
from fleet_ingress.net.dispatch import SlotQueue
from fleet_ingress.net.late_timers import patient_timeout
from fleet_ingress.ops.local_counts import count_forgotten
from fleet_ingress.ops.metrics import FleetChecks

if TYPE_CHECKING:  # a worker runs no poller, and does not import aiohttp for it
    from fleet_ingress.net.poller import HealthPoller

log = logging.getLogger("fleet_ingress.admin")


class FleetChangeError(Exception):
    """A refused change; `status` is the HTTP status the admin API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --force closes calls; their sockets take a moment to go.
FORCED_REMOVAL_WAIT = 2.0
# ...and what is still up then (a fleet that never reads the TLS close) is aborted:
# --force means at once, so the answer can say the fleet is gone.
FORCED_ABORT_WAIT = 1.0
# How long a forced removal waits for each worker to say how many calls it
# closed: a worker answers once its calls are gone, aborted at FORCED_REMOVAL_WAIT.
CLOSE_ANSWER_WAIT = FORCED_REMOVAL_WAIT + FORCED_ABORT_WAIT + 1.0


@dataclass(frozen=True)
class ClosedElsewhere:
    """What the workers said of `remove-fleet --force` (Supervisor.close_fleet)."""

    closed: int  # the sum of what each worker that answered says it closed
    unreachable: int  # calls held by workers whose slot channel was lost: not told
    silent: list[int]  # pids of the workers told that did not answer in time
    # pids of the workers that died before answering: their calls are counted
    # lost with them (stat, fleet_ingress_calls_lost_total), not closed.
    died: list[int] = field(default_factory=list)


# The admin API's answer to each refusal of the fleet set.
REFUSED_STATUS: dict[type[Refused], int] = {
    NoSuchFleet: 404,
    FleetBeingAdded: 409,
    FleetExists: 409,
    LastFleet: 409,
    StaysInDrain: 409,
}


@contextlib.contextmanager
def _answered() -> Iterator[None]:
    """A refusal of the fleet set, as the admin API answers it."""
    try:
        yield
    except Refused as exc:
        raise FleetChangeError(REFUSED_STATUS[type(exc)], str(exc)) from None


@dataclass
class FleetOps:
    """Carries out an operator's fleet changes: the fleet set decides membership,
    this writes the fleets file and does the I/O (probes, the queue, calls)."""

    fleets: FleetSet
    dispatcher: SlotQueue
    registry: Registry
    poller: HealthPoller | None
    settings: Callable[[], FleetsSection]  # the running config's: a reload swaps it
    checks: FleetChecks  # the probe-duration histogram: a removed fleet leaves it
    # Calls run in worker processes under a supervisor: `--force` tells them
    # to close the fleet's calls (their slots coming back reap the fleet), and
    # how many each closed is what they answer (see Supervisor.close_fleet).
    close_elsewhere: Callable[[str], Awaitable[ClosedElsewhere]] | None = None
    # A fleet has left the set (reaped, not replaced by one of its name):
    # whoever keeps something by its name may let it go (the supervisor, its
    # workers' records and the counts of workers gone, through ForgetLater
    # unless the fleet is listed again by then).
    forgotten: Callable[[str], None] | None = None
    _gone: dict[str, asyncio.Event] = field(default_factory=dict)
    # What a fleet removed here, draining still, was when removed (its admin
    # state in force, its maxconn pinned): a removal again says the command to
    # add it back as it was then. Its spec says the file as last loaded (a
    # drain the file could not record is not in it, nor in its line, gone).
    _removed_as: dict[str, tuple[FleetState, Admin, bool]] = field(default_factory=dict)
    # Writes of the fleets file so far: a reload that read the file while one
    # was made reads it again (service.ingress.read_reload_settled).
    file_writes: int = 0
    # The call counters of the records dropped as their fleets left the set,
    # summed (`ops.local_counts.count_forgotten`): the one-process ingress's
    # "(removed)" row and series. Its records are where its calls are counted
    # (a worker counts on `SlotClient.fleets`, which keeps its own).
    forgotten_counts: Counter[tuple[str, ...]] = field(default_factory=Counter)

    @property
    def fleets_file(self) -> Path:
        return self.settings().file

    @property
    def adding(self) -> set[str]:
        """Fleets an add-fleet is bringing in: in the balancer, not yet in the file."""
        return self.fleets.adding

    def _fleet(self, name: str) -> FleetState:
        with _answered():
            return self.fleets.member(name)

    def set_admin_state(self, name: str, state: str) -> dict[str, Any]:
        fleet = self._fleet(name)
        try:
            admin = Admin(state.upper())
        except ValueError:
            raise FleetChangeError(
                400, f"unknown state {state!r}: use ready, drain or maint"
            ) from None
        before = fleet.admin
        with _answered():
            self.fleets.set_admin(fleet, admin)
        self.dispatcher.wake()
        saved = self._save_admin_state(fleet, admin)
        log.info(
            "fleet admin state",
            extra=fields(fleet=name, before=before.value, after=admin.value, **saved),
        )
        return {
            "fleet": name,
            "admin": admin.value,
            "was": before.value,
            "calls": fleet.active,
            **saved,
        }

    def _save_admin_state(self, fleet: FleetState, admin: Admin) -> dict[str, Any]:
        """Record `admin` on the fleet's line of the fleets file, so that it holds across
        reloads and restarts. The state applies at once either way: a drain must not wait
        for, or fail on, the file; when it cannot be written, the answer says so."""
        if fleet.removing:
            return {}  # its line is gone already
        if (gone := self._file_gone()) is not None:
            log.warning(
                "fleet admin state not saved",
                extra=fields(fleet=fleet.name, fleets_file=str(self.fleets_file), error=gone),
            )
            return {"not_saved": f"{gone}; it applies now, but a restart will not keep it"}
        try:
            new_text = text_with_admin_state(
                self._read_fleets_text(),
                fleet.name,
                admin,
                default_maxconn=self.settings().maxconn,
                source=str(self.fleets_file),
            )
            self._check_lists_the_running(new_text)
            # No backup: the edit is one option, undone by the opposite command, and a
            # backup taken here would replace the one kept by an add or a remove.
            self._persist(new_text, backup=False)
        except (FleetsFileError, FleetChangeError) as exc:
            log.warning(
                "fleet admin state not saved",
                extra=fields(fleet=fleet.name, fleets_file=str(self.fleets_file), error=str(exc)),
            )
            return {"not_saved": f"{exc}; it applies now, but a restart will not keep it"}
        fleet.spec = replace(fleet.spec, admin=admin)
        return {"fleets_file": str(self.fleets_file)}

    def _check_lists_the_running(self, text: str, but: FleetState | None = None) -> None:
        """The file about to be written must still list every fleet it listed
        and that runs (`but` the one being added or removed): an empty or cut
        file (being rewritten in place by an editor or config management, the
        overlapping-actions audit of session 15) was written over with one
        line, its backup empty, and the next reload removed every other fleet."""
        try:
            listed = parse_fleets_text(
                text, default_maxconn=self.settings().maxconn, source=str(self.fleets_file)
            )
        except FleetsFileError as exc:
            raise FleetChangeError(409, f"{exc}; nothing saved") from None
        names = {spec.name for spec in listed}
        missing = sorted(
            f.name
            for f in self.fleets.fleets
            if f.membership is Membership.LISTED and f is not but and f.name not in names
        )
        if missing and (gone := self._file_gone()) is not None:
            raise FleetChangeError(409, f"{gone}; nothing saved")
        if missing:
            raise FleetChangeError(
                409,
                f"the fleets file {self.fleets_file} no longer lists running fleet(s) "
                f"{', '.join(missing)} (being written? edited by hand?): nothing saved; "
                "see the file, reload if it is meant, then ask again",
            )

    def _read_fleets_text(self) -> str:
        try:
            return self.fleets_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise FleetChangeError(
                500, f"cannot read the fleets file {self.fleets_file}: {exc.strerror}"
            ) from None

    def _file_gone(self) -> str | None:
        """Why nothing can be saved when the fleets file is not there (deleted or
        moved since it was read): it read as a file listing none, and was told
        as "no line for fleet 'a' (edited since the last reload?)" or "no longer
        lists running fleet(s)" (the CLI text audit)."""
        if self.fleets_file.exists():
            return None
        backup = backup_of(self.fleets_file)
        kept = (
            f" ({backup} holds it as it was before the last add-fleet or remove-fleet: "
            "copied back, redo that change, and any drain or maint since; `fleet-ingress "
            "stat` shows the fleets running and their states)"
            if backup.exists()
            else ""
        )
        return (
            f"the fleets file {self.fleets_file} is gone (deleted or moved since the ingress "
            f"read it): put it back{kept}; a reload or a start fails without it"
        )

    def _with_unsaved_admin(self, text: str) -> tuple[str, list[FleetState]]:
        """`text` with the running admin state of every listed fleet whose state the
        file does not record yet (a drain or maint that could not be saved, e.g. on a
        full disk): the next write that succeeds saves it, rather than writing the file
        again without it (a fleet in maintenance would take calls after a restart)."""
        carried: list[FleetState] = []
        for fleet in self.fleets.fleets:
            if not fleet.admin_unsaved:
                continue
            try:
                text = text_with_admin_state(
                    text,
                    fleet.name,
                    fleet.admin,
                    default_maxconn=self.settings().maxconn,
                    source=str(self.fleets_file),
                )
            except FleetsFileError:
                continue  # not in the file (taken out by hand): nothing to carry
            carried.append(fleet)
        return text, carried

    def _persist(self, text: str, *, backup: bool = True) -> Path | None:
        text, carried = self._with_unsaved_admin(text)
        try:
            kept = write_atomically(self.fleets_file, text, backup=backup)
        except OSError as exc:
            # Name the file that failed: the fleets file, its backup or a temporary file
            # beside them (the directory must be writable by the service).
            where = (
                f" ({exc.filename})"
                if exc.filename and str(exc.filename) != str(self.fleets_file)
                else ""
            )
            raise FleetChangeError(
                500,
                f"cannot write the fleets file {self.fleets_file}{where}: {exc.strerror or exc}"
                + _write_fix(exc.errno, failed_in(exc, self.fleets_file)),
            ) from None
        finally:
            # Counted written even when it failed half way (its backup, or the
            # rename done before the directory's fsync failed): a reload reads again.
            self.file_writes += 1
        for fleet in carried:
            fleet.spec = replace(fleet.spec, admin=fleet.admin)
            log.info(
                "fleet admin state saved",
                extra=fields(fleet=fleet.name, admin=fleet.admin.value, late=True),
            )
        return kept

    async def add_fleet(
        self,
        url: str,
        *,
        name: str | None,
        maxconn: int | None,
        dry_run: bool,
        admin: str | None = None,
    ) -> dict[str, Any]:
        settings = self.settings()
        default_maxconn = settings.maxconn
        if not url:
            raise FleetChangeError(
                400, "add-fleet needs the fleet's URL, e.g. https://fleet3.example.com:8443"
            )
        # The options are pasted into a fleets-file line: a space or '#' would turn part
        # of a name into another option or a comment.
        for what, value in (("URL", url), ("--name", name or "")):
            if any(c.isspace() or c == "#" for c in value):
                raise FleetChangeError(
                    400, f"{what} {value!r} holds a space or '#'; a fleet's {what} has neither"
                )
        line = " ".join(
            [
                url,
                *([f"name={name}"] if name else []),
                *([f"maxconn={maxconn}"] if maxconn else []),
                *([f"admin={admin}"] if admin else []),
            ]
        )
        try:
            (spec,) = parse_fleets_text(line, default_maxconn=default_maxconn, source="add-fleet")
        except (FleetsFileError, ValueError) as exc:
            # One line, built from the options: its number would mean nothing here.
            message = str(exc).replace("add-fleet line 1: ", "add-fleet: ")
            raise FleetChangeError(400, message) from None
        with _answered():
            self.fleets.check_new(spec)
        # Pre-check: the fleet must pass the same probe the poller will send.
        poller = self.poller
        assert poller is not None, "fleet changes need the health poller"
        precheck = await poller.probe_once(spec)
        if not precheck.passed:
            raise FleetChangeError(
                422,
                f"health pre-check of {spec.url}{poller.settings.health_path} failed: "
                f"{precheck.reason}; nothing changed",
            )
        # A --maxconn given is written as given, the default's value too: the
        # operator pinned it (remove-fleet's command to add a fleet again gives
        # it so), rather than have it follow fleets.maxconn.
        written_default = None if maxconn else default_maxconn
        new_text = text_with_fleet(self._read_fleets_text(), spec, default_maxconn=written_default)
        shared = await self._at_another_fleets_address(spec)
        plan = {
            "fleet": spec.name,
            "url": spec.url,
            "maxconn": spec.maxconn,
            "admin_state": spec.admin.value,  # not "admin": an admin state change's answer
            "precheck": precheck.describe(poller.settings.capacity_key),
            "fleets_file": str(self.fleets_file),
            "line": new_text.splitlines()[-1],
            **({"warnings": shared} if shared else {}),
        }
        if dry_run:
            return {"dry_run": True, **plan}
        with _answered():  # again: another add-fleet of it may have come in meanwhile
            fleet = self.fleets.add(spec, capacity_aware=settings.capacity_aware)
        poller.start(fleet)
        probing = poller.settings
        wait = probing.timeout + probing.interval * (probing.rise + 1) + 1
        try:
            # A fleet added in MAINT is not probed (SPEC 7): it passed the pre-check,
            # and reads UP once `ready` or `drain` has it probed again.
            if spec.admin is not Admin.MAINT and not await poller.wait_for(
                fleet, lambda f: f.health is Health.UP, timeout=wait
            ):
                last = fleet.last_probe.describe() if fleet.last_probe else "no probe answered"
                await self._drop(fleet)
                raise FleetChangeError(
                    422,
                    f"fleet {spec.name!r} did not read UP within {wait:g}s ({last}); rolled back",
                )
            try:
                # Read again: the file may have changed while the fleet came up (an admin
                # state saved, another fleet removed), and those changes must stay.
                new_text = text_with_fleet(
                    self._read_fleets_text(), spec, default_maxconn=written_default
                )
                try:  # e.g. the same fleet written in by hand meanwhile
                    parse_fleets_text(
                        new_text, default_maxconn=default_maxconn, source=str(self.fleets_file)
                    )
                except FleetsFileError as exc:
                    raise FleetChangeError(409, f"{exc} (after adding the fleet's line)") from None
                self._check_lists_the_running(new_text, but=fleet)
                backup = self._persist(new_text)
            except FleetChangeError as exc:
                await self._drop(fleet)
                raise FleetChangeError(exc.status, f"{exc.message}; rolled back") from None
        except BaseException:
            if fleet.membership is Membership.ADDING:  # e.g. cancelled: not left half-added
                await self._drop(fleet)
            raise
        self.fleets.added(fleet)
        log.info(
            "fleet added",
            extra=fields(
                fleet=spec.name, url=spec.url, maxconn=spec.maxconn, admin=spec.admin.value
            ),
        )
        return {**plan, "health": fleet.health.value, "backup": str(backup) if backup else None}

    async def _at_another_fleets_address(self, spec: FleetSpec) -> list[str]:
        """Whether `spec` resolves to an address another fleet has (localhost
        beside 127.0.0.1): said, not refused (two names at one address may be
        two hosts behind an SNI router). Looked up as calls look it up, within
        LOOKUP_BUDGET: a slow resolver costs add-fleet that, and the warning."""
        fleets = [fleet.spec for fleet in self.fleets.fleets if fleet.name != spec.name]
        fleets.append(spec)
        loop = asyncio.get_running_loop()

        async def addresses(fleet: FleetSpec) -> frozenset[Address]:
            if (literal := literal_addresses(fleet)) is not None:
                return literal
            return addresses_of(
                await loop.getaddrinfo(fleet.host, fleet.port, type=socket.SOCK_STREAM)
            )

        lookups = {fleet.name: asyncio.ensure_future(addresses(fleet)) for fleet in fleets}
        _, late = await asyncio.wait(lookups.values(), timeout=LOOKUP_BUDGET)
        for lookup in late:
            lookup.cancel()
        found = {
            name: lookup.result()
            for name, lookup in lookups.items()
            if lookup.done() and not lookup.cancelled() and lookup.exception() is None
        }
        return shared_warnings(fleets, found, about=spec.name)

    async def remove_fleet(self, name: str, *, force: bool) -> dict[str, Any]:
        fleet = self._fleet(name)
        with _answered():
            self.fleets.check_removable(fleet)
        text = self._read_fleets_text()
        file_gone = None
        # What the command to add it again restores: the admin state it had (a
        # removal drains it; one removing already keeps the file's, as read),
        # and a maxconn the file pinned, at the default too.
        admin = fleet.spec.admin if fleet.removing else fleet.admin
        pinned = fleet.spec.maxconn != self.settings().maxconn
        try:
            new_text: str | None = text_without_fleet(
                text,
                name,
                default_maxconn=self.settings().maxconn,
                source=str(self.fleets_file),
            )
        except FleetNotListed:
            new_text = None  # not in the file (taken out by hand): nothing to persist
            file_gone = self._file_gone()
        except FleetsFileError as exc:
            raise FleetChangeError(409, f"{exc}; fix it, then remove again") from None
        if new_text is not None:
            self._check_lists_the_running(new_text, but=fleet)
            pinned = maxconn_pinned(text, name)
        was = self._removed_as.get(name)
        if fleet.removing and was is not None and was[0] is fleet:
            admin, pinned = was[1], was[2]  # removed here before: as it was then
        backup = self._persist(new_text) if new_text is not None else None
        if not fleet.removing:
            self._removed_as[name] = (fleet, admin, pinned)
        gone_now = self.fleets.remove(fleet)
        gone = self._gone.setdefault(name, asyncio.Event())
        closed = unreachable = 0
        silent: list[int] = []
        died: list[int] = []
        elsewhere: asyncio.Future[ClosedElsewhere] | None = None
        if force:
            for call in self.registry.calls_on(name):
                call.end(EndReason.REMOVED)
                closed += 1
            if self.close_elsewhere is not None:
                # The workers' calls on it close now, but those of a worker
                # without its slot channel, which cannot be told; each worker
                # says how many it closed (not the slots held here: a worker
                # stopped or hung closes none).
                elsewhere = asyncio.ensure_future(self.close_elsewhere(name))
        calls = fleet.active
        log.info("fleet removed", extra=fields(fleet=name, force=force, calls_left=calls))
        if gone_now:
            self.gone(fleet)
        try:
            if force and not gone.is_set():
                await self._forced_gone(name, gone)
            if elsewhere is not None:
                told = await elsewhere
                closed += told.closed
                unreachable, silent, died = told.unreachable, told.silent, told.died
        finally:
            if elsewhere is not None:
                elsewhere.cancel()
        return {
            "fleet": name,
            "removed": fleet not in self.fleets,
            # Forced: what still holds a slot on it after the wait (a call its
            # worker could not be told to close, or one slow to go); none once
            # it is removed, which it is only at its last slot.
            "draining_calls": fleet.active if force else calls,
            "closed_calls": closed,
            "unreachable_calls": unreachable,
            # Workers told to close their calls that did not say how many in
            # CLOSE_ANSWER_WAIT (stopped, hung): theirs are not in closed_calls.
            "unanswered_workers": silent,
            "workers_died": died,
            "fleets_file": str(self.fleets_file) if new_text is not None else None,
            "backup": str(backup) if backup else None,
            "fleets_file_gone": file_gone,
            # A removal is not taken back (`ready` refuses a fleet being removed):
            # the command that adds it again, said to the operator.
            "add_again": _add_again(fleet.spec, admin, pinned=pinned),
        }

    async def _forced_gone(self, name: str, gone: asyncio.Event) -> None:
        """Wait for a forced removal's calls to go; abort what is still up."""
        try:
            # Patient: close replies that came during a stall are read before the abort.
            async with patient_timeout(FORCED_REMOVAL_WAIT):
                await gone.wait()
        except TimeoutError:
            for call in self.registry.calls_on(name):
                call.abort()
            try:
                async with patient_timeout(FORCED_ABORT_WAIT):
                    await gone.wait()
            except TimeoutError:
                pass  # reported as not yet removed

    def reap(self, fleet: FleetState) -> None:
        """A slot on `fleet` was given back: a removed fleet goes with its last call."""
        if self.fleets.reap(fleet):
            self.gone(fleet)

    def gone(self, fleet: FleetState) -> None:
        """`fleet` has left the set (reaped by a call's end, a removal or a reload)."""
        # Its probes stop now, not in a task that could run after a fleet of the same
        # name (moved to a new address) has started probing.
        if self.poller is not None:
            self.poller.stop_probing(fleet)
        asyncio.get_running_loop().create_task(self._forget(fleet))
        if (removed := self._removed_as.get(fleet.name)) is not None and removed[0] is fleet:
            del self._removed_as[fleet.name]
        if (gone := self._gone.pop(fleet.name, None)) is not None:
            gone.set()
        log.info("fleet gone", extra=fields(fleet=fleet.name))
        moved = self.fleets.join_waiting(fleet.name)
        self._keep_counts(fleet)
        if moved is not None:  # a reload moved it while it carried calls
            if self.poller is not None:
                self.poller.start(moved)
            log.info(
                "fleet joined at its new address",
                extra=fields(fleet=moved.name, url=moved.spec.url),
            )

    def _keep_counts(self, fleet: FleetState) -> None:
        """A record left the set: its lifetime counts stay in the host's totals
        (the "(removed)" row) when no record of its name is in the set now.
        Dropped with it before, the one-process ingress's removed row showed
        the fleet's calls ended but none of its calls, answers or retries."""
        if self.fleets.get(fleet.name) is None:
            count_forgotten(self.forgotten_counts, fleet)

    async def _drop(self, fleet: FleetState) -> None:
        self.fleets.roll_back(fleet)
        self._keep_counts(fleet)
        await self._forget(fleet)

    async def _forget(self, fleet: FleetState) -> None:
        if self.poller is not None:
            await self.poller.stop(fleet)
        if self.fleets.get(fleet.name) is None:  # not replaced by a moved fleet
            self.checks.fleet_removed(fleet.name)
            if self.forgotten is not None:
                self.forgotten(fleet.name)


class ForgetLater:
    """Calls `forget(name)` `after` seconds after a fleet has left the set
    (`gone`), unless it is `listed` again by then; leaving again starts the
    wait over (removed, listed again, removed again: from the last removal)."""

    def __init__(
        self, after: float, listed: Callable[[str], bool], forget: Callable[[str], None]
    ) -> None:
        self.after, self.listed, self.forget = after, listed, forget
        # Each wait's handle and its due time on the loop's clock: kept apart, for
        # uvloop gives a wait under a millisecond (one carried over at 0 s left) a
        # plain Handle with no when() (the review of session 33).
        self._due: dict[str, tuple[asyncio.Handle, float]] = {}
        # Taken up from the previous image (`take`), waiting for `start`: seconds left.
        self._carried: dict[str, float] = {}

    @property
    def pending(self) -> frozenset[str]:
        """The fleets gone from the set and not forgotten yet."""
        return frozenset(self._due) | frozenset(self._carried)

    def gone(self, name: str, after: float | None = None) -> None:
        """`name` left the set: forgotten `after` seconds from now (None: `self.after`)."""
        self._carried.pop(name, None)
        if (earlier := self._due.pop(name, None)) is not None:
            earlier[0].cancel()
        wait = self.after if after is None else after
        loop = asyncio.get_running_loop()
        self._due[name] = (loop.call_later(wait, self._now, name), loop.time() + wait)

    def to_json(self) -> dict[str, float]:
        """The seconds left before each pending fleet is forgotten: what the next
        image (an upgrade's, or one started after a crash) takes up (`take`).
        Not carried, a fleet removed shortly before an upgrade was never
        forgotten: its counts kept under its name for good, and its calls ended
        gone from /metrics at the exec (the accounting audit of session 31)."""
        now = asyncio.get_running_loop().time()
        left = {name: max(0.0, round(due - now, 3)) for name, (_, due) in self._due.items()}
        return {**self._carried, **left}

    def take(self, carried: object) -> None:
        """Take up `to_json` of the previous image (anything else: none), before
        the loop runs: the waits start at `start`."""
        if not isinstance(carried, dict):
            return
        for name, left in carried.items():
            if isinstance(name, str) and isinstance(left, int | float) and left == left:
                self._carried[name] = min(max(0.0, float(left)), self.after)

    def start(self) -> None:
        """Start the waits taken up (on the running loop)."""
        carried, self._carried = self._carried, {}
        for name, left in carried.items():
            self.gone(name, left)

    def _now(self, name: str) -> None:
        self._due.pop(name, None)
        if not self.listed(name):
            self.forget(name)


def _add_again(spec: FleetSpec, admin: Admin, *, pinned: bool) -> str:
    """The command that adds the fleet back as it was: its name, its maxconn
    where pinned, its admin state (before, it came back READY, and a maxconn
    the file pinned at the default followed fleets.maxconn from then on)."""
    words = ["fleet-ingress add-fleet", shlex.quote(spec.url)]
    # The URL's own name is left out, as the fleets file leaves it out: a zoned
    # fleet's ([fe80::1%eth0]:443) is no name --name takes, and the command failed.
    if spec.name != url_default_name(spec.url):
        words += ["--name", shlex.quote(spec.name)]
    if pinned:
        words += ["--maxconn", str(spec.maxconn)]
    if admin is not Admin.READY:
        words += ["--admin", admin.value.lower()]
    return " ".join(words)


def failed_in(exc: OSError, fleets_file: Path) -> Path:
    """The directory where writing the fleets file failed: the file's own, where
    a symlink (fleets.txt -> a checkout's file) points (written or renamed into
    place there: `write_atomically`), not the link's; else where the file it
    names lies (the backup, beside the link)."""
    if not exc.filename:
        return fleets_file.parent
    name = Path(os.fsdecode(exc.filename))
    if name == fleets_file:
        return Path(os.path.realpath(fleets_file)).parent
    return name.parent


def _write_fix(code: int | None, directory: Path) -> str:
    """What to do about a fleets file that cannot be written, by its errno."""
    if code == errno.ENOSPC:
        return f" (free some space or inodes: `df -h {directory}`, `df -i {directory}`)"
    if code == errno.EDQUOT:
        return f" (the service user's disk quota is used up: `quota`, `df -h {directory}`)"
    if code == errno.EROFS:
        return (
            f" ({directory} is read-only to the service: under systemd the unit lets it write "
            "only under /etc/fleet-ingress, so add `ReadWritePaths=` for it in a drop-in "
            "(`systemctl edit fleet-ingress`, docs/INSTALL.md section 2); otherwise its file "
            "system is mounted read-only: remount it read-write)"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f" (permission denied: the service user must be able to write {directory} "
            f"and the file: `chgrp fleet-ingress {directory} && chmod 2770 {directory}`, "
            "or `lsattr` for an immutable file; docs/INSTALL.md section 2)"
        )
    return ""
