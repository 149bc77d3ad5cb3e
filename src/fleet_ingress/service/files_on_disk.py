"""What the files a reload reads hold on disk, against what runs: a renewal in
tls.cert no reload loaded, and edits of ingress.toml or the fleets file no
reload applied (the operator-journeys audit of session 24: neither showed
anywhere). The supervisor looks before each `stat` and scrape.

Every file is looked at off the loop, the stat(2) too (a hung mount must not
hold every call's slot lease), read again only once it changed, and waited for
LOOK_WAIT at most: a look held up goes on alone, what was seen before is shown
meanwhile, and no second look starts beside it. A reload's answer waits longer
(RELOAD_LOOK_WAIT) for a look begun after its read: what `stat` and a scrape
say after it is what that reload read, or newer. A file that is not a regular
one is not read (a FIFO would wait for a writer: a stat waited for good on one
in this session's first test run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet_ingress.config.config_diff import fleets_changed, settings_changed
from fleet_ingress.config.fleets_file import FleetsFileError, load_fleets_file
from fleet_ingress.config.settings import ConfigError, IngressConfig, TLSSection, load_config
from fleet_ingress.core.certificate_change import (
    LeafFacts,
    clock_before,
    out_of_date,
    renewal_problem,
    renewal_waiting,
)
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.net.late_timers import wait_patiently
from fleet_ingress.net.tls import (
    CarrierPem,
    TLSSetupError,
    chain_problem,
    leaf_facts,
    pem_chain_problem,
    server_ssl_context,
)
from fleet_ingress.ops.fleet_display import WOULD_BE_REFUSED

log = logging.getLogger("fleet_ingress.lifecycle")  # the supervisor's

# A stat or scrape waits this long at most for a look (seconds).
LOOK_WAIT = 0.5
# A reload's answer waits this long at most for a look begun after its read
# (`FilesOnDisk.look_anew`): a look takes 7-61 ms beside two CPU burners (load
# average 10, measured), but outlasted LOOK_WAIT in a supervisor on a host at
# load average 9 (session 36); one held up longer (a hung mount) goes on alone.
RELOAD_LOOK_WAIT = 5.0

FileState = tuple[int, int, int, int]  # inode, mtime (ns), size, ctime (ns)


def served_refused(serving: LeafFacts | None) -> str | None:
    """Why carriers refuse the certificate served now (it expired while served),
    or what is known of it when this host's clock reads before its notBefore
    (a start took it from the files: `served_early`), or None."""
    if serving is None:
        return None
    now = time.time()
    return clock_before(serving, now) or out_of_date(serving, now)


def served_early(serving: LeafFacts | None) -> bool:
    """Whether this host's clock reads before the notBefore of the certificate
    served (`clock_before`): carriers with a right clock may well accept it."""
    return serving is not None and clock_before(serving, time.time()) is not None


class FilesOnDisk:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        # What tls.cert holds, as last read: a renewal there may not be served yet.
        self.certificate_file: LeafFacts | None = None
        # Why tls.cert and tls.key, as last read, do not load together (None: they do).
        self.certificate_load_error: str | None = None
        # Why carriers may fail to verify the chain in tls.cert, as last read (None:
        # they verify it, or it cannot be judged: a tls.ca_file that cannot be used).
        self.certificate_chain: str | None = None
        # Why carriers may fail to verify the chain of the certificate served
        # (the last look's `serving`), judged as the file's is: the same leaf
        # may come with another chain.
        self.served_chain: str | None = None
        # What ingress.toml and the fleets file would change, not reloaded yet.
        self.edits_not_applied: list[str] = []
        self._certificate_seen: tuple[object, ...] | None = None
        self._served_seen: CarrierPem | None = None
        self._served_judged = False  # the chain served was judged at the last look
        self._edits_seen: tuple[object, ...] | None = None
        self._looking: asyncio.Task[None] | None = None

    async def look(
        self,
        config: IngressConfig,
        fleets: Sequence[FleetSpec],
        ran: object,
        serving: CarrierPem | None = None,
    ) -> None:
        """Look at the files against `config` and `fleets` (those in force);
        `ran` changes when what runs changed otherwise (a reload, a fleet
        change): the edits are then judged again. `serving`: the certificate and
        key served (None: not known), whose chain is judged too. Waits LOOK_WAIT
        at most."""
        self.look_soon(config, fleets, ran, serving)
        assert self._looking is not None
        await asyncio.wait({self._looking}, timeout=LOOK_WAIT)

    async def look_anew(
        self,
        config: IngressConfig,
        fleets: Sequence[FleetSpec],
        ran: object,
        serving: CarrierPem | None = None,
        *,
        wait: float = RELOAD_LOOK_WAIT,
    ) -> None:
        """`look`, by a look that begins now (after a reload read the files),
        waited for `wait` at most: a look under way may have read them before,
        and one a scrape starts may outlast LOOK_WAIT; either way the scrape
        after a reload said what the files held before it, or nothing (the
        session 36 test run at load average 9: `certificate_file` null right
        after `reload` said the key did not match). A look under way is waited
        for first: no second starts beside it."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        if self._looking is not None and not self._looking.done():
            await wait_patiently({self._looking}, wait)
            if not self._looking.done():
                return
        self.look_soon(config, fleets, ran, serving)
        assert self._looking is not None
        await wait_patiently({self._looking}, max(0.0, until - loop.time()))

    def look_soon(
        self,
        config: IngressConfig,
        fleets: Sequence[FleetSpec],
        ran: object,
        serving: CarrierPem | None = None,
    ) -> None:
        """`look`, not waited for (a look under way goes on; no second starts):
        what it finds shows from then on (systemd's status line, written every
        few seconds, takes the last look's)."""
        if self._looking is None or self._looking.done():
            self._looking = asyncio.get_running_loop().create_task(
                self._look(config, list(fleets), ran, serving)
            )

    @property
    def certificate_not_after(self) -> float | None:
        """When the certificate in tls.cert expires (None: not read)."""
        return None if self.certificate_file is None else self.certificate_file.not_after

    def certificate_refused(self, serving: LeafFacts | None) -> str | None:
        """Why a reload would refuse tls.cert and tls.key, as last read, in place
        of `serving`: a pair that cannot load, or a certificate expired, not
        valid yet (even as the one served) or for other names, or whose chain
        carriers may fail to follow where they follow the served one's (the
        unit's reload check refuses it); None when it would take them, or before
        the first look. A start with no certificate to keep (a reboot, a stop
        then a start) takes the files all the same."""
        if self.certificate_load_error is not None:
            return self.certificate_load_error
        if self.certificate_file is None:
            return None
        now = time.time()
        # Out of date, even as the one served (a start took it: carriers refuse it).
        problem = out_of_date(self.certificate_file, now)
        if problem is None and serving is not None:
            problem = renewal_problem(self.certificate_file, serving, now)
            if problem is None and self._served_seen is not None and self.served_chain is None:
                # A chain carriers may fail to follow, where they follow the served
                # one's: the unit's reload check refuses it, and a restart keeps the
                # one served (carrier_certificate.kept_certificate, the same rule).
                problem = self.certificate_chain
        return None if problem is None else f"tls.cert {problem}"

    def certificate_file_refused(self, serving: LeafFacts | None) -> bool | None:
        """The gauge `fleet_ingress_certificate_file_refused`: whether
        `certificate_refused` says why; None before the first look."""
        if self._certificate_seen is None:
            return None
        return self.certificate_refused(serving) is not None

    def served_chain_doubted(self) -> bool | None:
        """The gauge `fleet_ingress_certificate_chain_doubted`: whether
        carriers may fail to verify the chain served; None while it is not
        judged (before the first look, or a tls.ca_file gone or unusable: the
        gauge goes absent rather than to 0, which would resolve its alert)."""
        if self._certificate_seen is None or not self._served_judged:
            return None
        return self.served_chain is not None

    def picture(self, serving: LeafFacts | None) -> dict[str, Any]:
        """The snapshot's part: `certificate_file` (against `serving`, the
        certificate carriers get) and `edits_not_applied`."""
        on_disk = self.certificate_file
        refused = self.certificate_refused(serving)
        return {
            "edits_not_applied": self.edits_not_applied,
            "certificate_file": None
            if on_disk is None and refused is None
            else {
                "not_after": None if on_disk is None else on_disk.not_after,
                # A renewal a reload would load (one it would refuse is `refused`).
                "not_served": refused is None and renewal_waiting(on_disk, serving),
                "refused": refused,
            },
            "certificate_served_refused": served_refused(serving),
            "certificate_served_early": served_early(serving),
            "certificate_served_chain": None
            if self.served_chain is None
            else f"tls.cert {self.served_chain}",
        }

    def close(self) -> None:
        if self._looking is not None:
            self._looking.cancel()

    async def _look(
        self,
        config: IngressConfig,
        fleets: list[FleetSpec],
        ran: object,
        serving: CarrierPem | None,
    ) -> None:
        try:
            await self._look_at_certificate(config.tls, serving)
            await self._look_at_edits(config, fleets, ran)
        except Exception:  # a bug here must not fail a scrape, nor go unsaid
            log.exception("looking at the files on disk broke; stat and scrapes go on")

    async def _look_at_certificate(self, tls: TLSSection, serving: CarrierPem | None) -> None:
        path = tls.cert
        if path is None:  # no carrier listener configured: nothing to judge
            self._certificate_seen, self.certificate_file = None, None
            self.certificate_load_error, self.certificate_chain = None, None
            return
        ca_file = tls.ca_file
        # What carriers are trusted to hold: tls.ca_file, or this host's trust store
        # (a ca-certificates update may add the root a chain ends at).
        state = await asyncio.to_thread(
            lambda: (
                file_state(path),
                file_state(tls.key),
                file_state(ca_file) if ca_file is not None else trust_store_state(),
            )
        )
        seen = (str(path), str(tls.key), str(ca_file), tls.min_version, tls.profile, *state)
        if seen == self._certificate_seen and serving is self._served_seen:
            return
        load_error = None
        on_disk = None
        # Not there, or no regular file (a FIFO would hold the look for good):
        # a start without the one served kept could not serve it.
        missing = [
            f"{name} {file}: missing, or no regular file"
            for name, file, found in (("tls.cert", path, state[0]), ("tls.key", tls.key, state[1]))
            if found is None
        ]
        if missing:
            load_error = "; ".join(missing)
        else:
            try:
                on_disk = await asyncio.to_thread(leaf_facts, path)
            except (ValueError, OSError) as exc:  # half written, not a certificate, an odd
                load_error = str(exc)  # extension (TLSSetupError is a ValueError)
        if on_disk is not None and tls.key is not None:
            try:  # with its key: one of another certificate cannot serve
                await asyncio.to_thread(
                    server_ssl_context, path, tls.key, tls.min_version, tls.profile
                )
            except (ValueError, OSError) as exc:
                load_error = str(exc)
        chain = served_chain = None
        served_judged = False
        # A tls.ca_file gone, or no regular file (a FIFO), is not read: not judged.
        key = tls.key
        if key is not None and (ca_file is None or state[2] is not None):
            with contextlib.suppress(TLSSetupError):  # tls.ca_file cannot be used
                if on_disk is not None and load_error is None:
                    chain = await asyncio.to_thread(chain_problem, path, key, ca_file)
                if serving is not None:
                    served_chain = await asyncio.to_thread(
                        pem_chain_problem, serving, path, key, ca_file
                    )
                    served_judged = True
        # Kept only as read now: another look finished meanwhile must not be undone.
        if seen != self._certificate_seen or serving is not self._served_seen:
            self._certificate_seen, self.certificate_file = seen, on_disk
            self.certificate_load_error, self.certificate_chain = load_error, chain
            self._served_seen, self.served_chain = serving, served_chain
            self._served_judged = served_judged

    async def _look_at_edits(
        self, config: IngressConfig, fleets: list[FleetSpec], ran: object
    ) -> None:
        files = await asyncio.to_thread(
            lambda: (file_state(self.config_path), file_state(config.fleets.file))
        )
        seen = (*files, ran, fleets)
        if seen == self._edits_seen:
            return
        if None in files:  # missing, or not a regular file (a FIFO): not read
            self._edits_seen, self.edits_not_applied = seen, []
            return
        edits = await asyncio.to_thread(edits_on_disk, self.config_path, config, fleets)
        self._edits_seen, self.edits_not_applied = seen, edits


def file_state(path: Path | None) -> FileState | None:
    """What tells a file changed (following a symlink); None when there is
    none, or it is no regular file (a FIFO: reading it would wait for a writer)."""
    if path is None:
        return None
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            # ctime: a chmod or chown (who may read it) changes nothing else.
            return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
    return None


def trust_store_state() -> tuple[object, ...]:
    """What tells this host's trust store changed (OpenSSL's default bundle and
    directory, SSL_CERT_FILE and SSL_CERT_DIR heeded): a ca-certificates update
    replaces the bundle and the directory's links."""
    paths = ssl.get_default_verify_paths()
    directory = None
    if paths.capath is not None:
        with contextlib.suppress(OSError):
            st = os.stat(paths.capath)
            directory = (st.st_ino, st.st_mtime_ns)
    return (paths.cafile, file_state(Path(paths.cafile)) if paths.cafile else None, directory)


def edits_on_disk(
    config_path: Path, running: IngressConfig, fleets: Sequence[FleetSpec]
) -> list[str]:
    """What ingress.toml and its fleets file on disk would change of `running`
    and `fleets` (the fleets in force), or why a reload would refuse them."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [f"{config_path.name} {WOULD_BE_REFUSED}: {exc}"]
    said = []
    if settings := settings_changed(running, config):
        said.append(f"{config_path.name}: {settings}")
    path = config.fleets.file
    try:
        specs = load_fleets_file(path, default_maxconn=config.fleets.maxconn)
    except FleetsFileError as exc:
        return [*said, f"{path.name} {WOULD_BE_REFUSED}: {exc}"]
    if changed := fleets_changed(fleets, specs):
        said.append(f"{path.name}: {changed}")
    return said
