"""Live fleet changes an operator makes: admin state, add a fleet, remove one.

Each change either happens whole or not at all, and says why not. There are
no server lines to hand-edit: the fleets file is written here, atomically,
with a backup, keeping the operator's comments.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet_ingress.config.atomic import write_atomically
from fleet_ingress.config.fleets_file import FleetsFileError, parse_fleets_text
from fleet_ingress.config.fleets_store import (
    FleetNotListed,
    text_with_admin_state,
    text_with_fleet,
    text_without_fleet,
)
from fleet_ingress.core.balancer import FleetState
from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.core.health import Health
from fleet_ingress.logs import fields
from fleet_ingress.net.calls import EndReason
from fleet_ingress.net.poller import health_session, probe_fleet

if TYPE_CHECKING:
    from fleet_ingress.service.ingress import Ingress

log = logging.getLogger("fleet_ingress.admin")


class FleetChangeError(Exception):
    """A refused change; `status` is the HTTP status the admin API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --force closes calls; their sockets take a moment to go.
FORCED_REMOVAL_WAIT = 5.0


@dataclass
class FleetOps:
    ingress: Ingress
    _gone: dict[str, asyncio.Event] = field(default_factory=dict)
    # Fleets an add-fleet is bringing in: in the balancer, not yet in the fleets file.
    adding: set[str] = field(default_factory=set)

    @property
    def fleets_file(self) -> Path:
        return self.ingress.config.fleets.file

    def _fleet(self, name: str) -> FleetState:
        fleet = self.ingress.balancer.get(name)
        if fleet is None:
            known = ", ".join(f.name for f in self.ingress.balancer.fleets) or "none"
            raise FleetChangeError(404, f"no fleet named {name!r} (fleets: {known})")
        if name in self.adding:
            raise FleetChangeError(
                409, f"fleet {name!r} is being added; try again once add-fleet has finished"
            )
        return fleet

    def set_admin_state(self, name: str, state: str) -> dict[str, Any]:
        fleet = self._fleet(name)
        try:
            admin = Admin(state.upper())
        except ValueError:
            raise FleetChangeError(
                400, f"unknown state {state!r}: use ready, drain or maint"
            ) from None
        if fleet.removing and admin is not Admin.DRAIN:
            raise FleetChangeError(409, f"fleet {name!r} is being removed; it stays in DRAIN")
        before = fleet.admin
        fleet.set_admin(admin)
        self.ingress.dispatcher.wake()
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
        try:
            new_text = text_with_admin_state(
                self._read_fleets_text(),
                fleet.name,
                admin,
                default_maxconn=self.ingress.config.fleets.maxconn,
                source=str(self.fleets_file),
            )
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

    def _read_fleets_text(self) -> str:
        try:
            return self.fleets_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise FleetChangeError(
                500, f"cannot read the fleets file {self.fleets_file}: {exc.strerror}"
            ) from None

    def _persist(self, text: str, *, backup: bool = True) -> Path | None:
        try:
            return write_atomically(self.fleets_file, text, backup=backup)
        except OSError as exc:
            # Name the file that failed: the fleets file, its backup or a temporary file
            # beside them (the directory must be writable by the service).
            where = f" ({exc.filename})" if exc.filename else ""
            raise FleetChangeError(
                500,
                f"cannot write the fleets file {self.fleets_file}{where}: {exc.strerror or exc}",
            ) from None

    async def add_fleet(
        self, url: str, *, name: str | None, maxconn: int | None, dry_run: bool
    ) -> dict[str, Any]:
        config = self.ingress.config
        default_maxconn = config.fleets.maxconn
        # The options are pasted into a fleets-file line: a space or '#' would turn part
        # of a name into another option or a comment.
        for what, value in (("URL", url), ("--name", name or "")):
            if any(c.isspace() or c == "#" for c in value):
                raise FleetChangeError(
                    400, f"{what} {value!r} holds a space or '#'; a fleet's {what} has neither"
                )
        line = " ".join(
            [url, *([f"name={name}"] if name else []), *([f"maxconn={maxconn}"] if maxconn else [])]
        )
        try:
            (spec,) = parse_fleets_text(line, default_maxconn=default_maxconn, source="add-fleet")
        except (FleetsFileError, ValueError) as exc:
            # One line, built from the options: its number would mean nothing here.
            message = str(exc).replace("add-fleet line 1: ", "add-fleet: ")
            raise FleetChangeError(400, message) from None
        self._refuse_duplicate(spec)
        # Pre-check: the fleet must pass the same probe the poller will send.
        poller = self.ingress.poller
        assert poller is not None, "fleet changes need the health poller"
        async with health_session(poller.fleet_ssl, poller.settings) as session:
            precheck = await probe_fleet(session, spec, poller.settings)
        if not precheck.passed:
            raise FleetChangeError(
                422,
                f"health pre-check of {spec.url}{poller.settings.health_path} failed: "
                f"{precheck.reason}; nothing changed",
            )
        new_text = text_with_fleet(self._read_fleets_text(), spec, default_maxconn=default_maxconn)
        plan = {
            "fleet": spec.name,
            "url": spec.url,
            "maxconn": spec.maxconn,
            "precheck": precheck.describe(poller.settings.capacity_key),
            "fleets_file": str(self.fleets_file),
            "line": new_text.splitlines()[-1],
        }
        if dry_run:
            return {"dry_run": True, **plan}
        fleet = FleetState(spec, health=Health.INIT, capacity_aware=config.fleets.capacity_aware)
        self.adding.add(spec.name)
        try:
            self.ingress.balancer.fleets.append(fleet)
            poller.start(fleet)
            settings = poller.settings
            wait = settings.timeout + settings.interval * (settings.rise + 1) + 1
            if not await poller.wait_for(fleet, lambda f: f.health is Health.UP, timeout=wait):
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
                    self._read_fleets_text(), spec, default_maxconn=default_maxconn
                )
                try:  # e.g. the same fleet written in by hand meanwhile
                    parse_fleets_text(
                        new_text, default_maxconn=default_maxconn, source=str(self.fleets_file)
                    )
                except FleetsFileError as exc:
                    raise FleetChangeError(409, f"{exc} (after adding the fleet's line)") from None
                backup = self._persist(new_text)
            except FleetChangeError as exc:
                await self._drop(fleet)
                raise FleetChangeError(exc.status, f"{exc.message}; rolled back") from None
        finally:
            self.adding.discard(spec.name)
        log.info("fleet added", extra=fields(fleet=spec.name, url=spec.url, maxconn=spec.maxconn))
        return {**plan, "health": fleet.health.value, "backup": str(backup) if backup else None}

    def _refuse_duplicate(self, spec: FleetSpec) -> None:
        for other in self.ingress.balancer.fleets:
            if other.name == spec.name:
                raise FleetChangeError(409, f"a fleet named {spec.name!r} exists already")
            if (other.spec.host, other.spec.port) == (spec.host, spec.port):
                raise FleetChangeError(
                    409, f"{spec.url} is already in the ingress as fleet {other.name!r}"
                )

    async def remove_fleet(self, name: str, *, force: bool) -> dict[str, Any]:
        fleet = self._fleet(name)
        staying = [f for f in self.ingress.balancer.fleets if not f.removing and f is not fleet]
        if not fleet.removing and not staying:
            raise FleetChangeError(
                409,
                f"fleet {name!r} is the last fleet: without one every call gets 503, and "
                "`fleet-ingress check` (run before every start and reload) fails; add its "
                "replacement first (fleet-ingress add-fleet URL), then remove it",
            )
        text = self._read_fleets_text()
        try:
            new_text: str | None = text_without_fleet(
                text,
                name,
                default_maxconn=self.ingress.config.fleets.maxconn,
                source=str(self.fleets_file),
            )
        except FleetNotListed:
            new_text = None  # not in the file (taken out by hand): nothing to persist
        except FleetsFileError as exc:
            raise FleetChangeError(409, f"{exc}; fix it, then remove again") from None
        backup = self._persist(new_text) if new_text is not None else None
        fleet.admin, fleet.removing = Admin.DRAIN, True
        gone = self._gone.setdefault(name, asyncio.Event())
        closed = 0
        if force:
            for call in self.ingress.registry.calls_on(name):
                call.end(EndReason.REMOVED)
                closed += 1
        calls = fleet.active
        log.info("fleet removed", extra=fields(fleet=name, force=force, calls_left=calls))
        self.reap(fleet)
        if force:
            try:
                async with asyncio.timeout(FORCED_REMOVAL_WAIT):
                    await gone.wait()
            except TimeoutError:
                pass  # reported below as not yet removed
        return {
            "fleet": name,
            "removed": fleet not in self.ingress.balancer.fleets,
            "draining_calls": 0 if force else calls,
            "closed_calls": closed,
            "fleets_file": str(self.fleets_file) if new_text is not None else None,
            "backup": str(backup) if backup else None,
        }

    def reap(self, fleet: FleetState) -> None:
        """Take a removed fleet out once it carries no call."""
        if fleet.removing and fleet.active == 0 and fleet in self.ingress.balancer.fleets:
            self.ingress.balancer.fleets.remove(fleet)
            # Its probes stop now, not in a task that could run after a fleet of the same
            # name (moved to a new address) has started probing.
            if self.ingress.poller is not None:
                self.ingress.poller.stop_probing(fleet)
            asyncio.get_running_loop().create_task(self._forget(fleet))
            if (gone := self._gone.pop(fleet.name, None)) is not None:
                gone.set()
            log.info("fleet gone", extra=fields(fleet=fleet.name))

    async def _drop(self, fleet: FleetState) -> None:
        if fleet in self.ingress.balancer.fleets:
            self.ingress.balancer.fleets.remove(fleet)
        await self._forget(fleet)

    async def _forget(self, fleet: FleetState) -> None:
        if self.ingress.poller is not None:
            await self.ingress.poller.stop(fleet)
        if self.ingress.balancer.get(fleet.name) is None:  # not replaced by a moved fleet
            self.ingress.metrics.fleet_removed(fleet.name)
