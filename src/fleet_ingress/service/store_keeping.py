"""What the supervisor keeps of systemd's fd store beside its sockets
(`service.fd_store`): the session ticket keys every worker of this image
seals its tickets with (`SessionTicketKeys`), and what the image before this
one left of the store, until this image's notifier takes it up
(`StoreTakenUp`); and the picture of the store that `stat`, stats.json and
the metrics show (`fd_store_picture`)."""

from __future__ import annotations

import base64
import logging
from typing import Any

from fleet_ingress.config.settings import IngressConfig
from fleet_ingress.logs import fields
from fleet_ingress.net.tls import CarrierPem, new_ticket_keys
from fleet_ingress.service.carrier_certificate import ticket_keys_drawn_for
from fleet_ingress.service.fd_store import (
    TICKET_KEYS_NAME,
    store_ticket_keys,
    ticket_keys_taken_up,
)
from fleet_ingress.service.sdnotify import Notifier

log = logging.getLogger("fleet_ingress.lifecycle")


def fd_store_picture(notifier: Notifier | None) -> dict[str, Any] | None:
    """What systemd's fd store keeps of this process's, against the unit's
    FileDescriptorStoreMax= (None: not known), and what it would not keep;
    None without systemd's notify socket."""
    if notifier is None or not notifier.enabled:
        return None
    return {
        "kept": notifier.kept_count,
        "max": notifier.store_max,
        "not_kept": notifier.not_kept,
        "unkept": len(notifier.unkept),
    }


class StoreTakenUp:
    """What the previous image (or the dead supervisor, or systemd) left of
    the fd store, until this image's notifier takes it up (`take_up_fd_store`)."""

    def __init__(self) -> None:
        # What systemd's fd store held for this process as it started (handed
        # back by systemd, or carried over an exec): `Notifier.kept`'s start.
        self.fd_store_kept: dict[str, list[tuple[int, int]]] = {}
        # Carried over an exec with it (`take_up_fd_store`): the count of what
        # systemd would not keep (over a crash too), what of it is still wanted
        # there, and the removes the notify socket had no room for.
        self.fd_store_not_kept = 0
        self.fd_store_unkept: set[str] = set()
        self.fd_store_owed: list[str] = []

    def take_up_fd_store(self, notifier: Notifier) -> None:
        """What the previous image (or the dead supervisor, or systemd) left of
        the fd store, taken up by this image's `notifier`: before, over an
        exec, the count of what was not kept went back to 0 and a remove lost
        just before it was never sent (the copy held a cut worker's channel open)."""
        for name, kept in self.fd_store_kept.items():
            notifier.kept.setdefault(name, []).extend(kept)
        notifier.not_kept += self.fd_store_not_kept
        notifier.unkept |= self.fd_store_unkept
        notifier.owe_removes(self.fd_store_owed)


class SessionTicketKeys:
    """The keys every worker of this image seals its session tickets with:
    a carrier's ticket resumes on whichever worker accepts its next
    connection. Drawn anew with each certificate served (the supervisor's
    `_reload`), so that no session resumes into the certificate it replaced;
    in memory only (handed in memfds and on the channel, never in a snapshot
    or a file): the next image, an upgrade's, is handed them in the exec's
    state (a memfd read once, `ticket_keys_for_exec`) and takes them when
    it serves the same certificate and [tls] (`take_over_ticket_keys`).
    Kept in systemd's fd store too (`fd_store.store_ticket_keys`): a
    supervisor started again after this one died takes them up
    (`take_up_ticket_keys`). `config` and `pem`: what the supervisor serves."""

    def __init__(self) -> None:
        self.ticket_keys = new_ticket_keys()
        self.ticket_keys_stored = False  # the store has them already (taken up)

    def take_up_ticket_keys(
        self, stored: bytes | None, config: IngressConfig, pem: CarrierPem
    ) -> None:
        """After a crash, its workers taken up: the session ticket keys the
        dead supervisor kept in systemd's fd store (`stored`, as read; None:
        none was), so that the workers taken up and those started from now on
        seal and open each other's tickets. When they cannot (missing, cut
        short, drawn for another certificate than the one served), the keys
        drawn at this start serve, and that is said."""
        drawn_for = ticket_keys_drawn_for(config, pem)
        keys, why = ticket_keys_taken_up(stored, drawn_for)
        if keys is None:
            log.warning(
                "the session ticket keys in systemd's fd store are not taken up: new ones "
                "drawn, so a carrier's session from a worker taken up does not resume on a "
                "worker started now (a full handshake) until the next reload hands every "
                "worker the new ones",
                extra=fields(key=TICKET_KEYS_NAME, problem=why),
            )
            return
        self.ticket_keys = keys
        self.ticket_keys_stored = True

    def ticket_keys_for_exec(self, config: IngressConfig, pem: CarrierPem) -> str:
        """The session ticket keys and what they were drawn for, for the exec's
        state (`take_over_ticket_keys`): the keys are drawn anew whenever what
        the digest covers changes (`_reload`), so the digest of what is served
        now is the one they were drawn for."""
        drawn_for = ticket_keys_drawn_for(config, pem)
        return base64.b64encode(self.ticket_keys + drawn_for).decode()

    def take_over_ticket_keys(
        self, carried: object, config: IngressConfig, pem: CarrierPem
    ) -> None:
        """After an upgrade's exec: the session ticket keys the previous image's
        workers seal tickets with (`ticket_keys_for_exec`), taken when they were
        drawn for the certificate, key and [tls] this image serves, so that a
        carrier's session from before the upgrade resumes on the new generation
        (each carrier's first connection after an upgrade was a full handshake,
        the leftovers of session 36). Not carried (an older release), or drawn
        for another certificate (one renewed on disk before the upgrade, which
        no session from before may resume into): the keys drawn at this start."""
        if not isinstance(carried, str):
            return
        try:
            stored = base64.b64decode(carried, validate=True)
        except ValueError:
            return
        drawn_for = ticket_keys_drawn_for(config, pem)
        keys, _ = ticket_keys_taken_up(stored, drawn_for)
        if keys is not None:
            self.ticket_keys = keys

    def store_ticket_keys(
        self, notifier: Notifier | None, config: IngressConfig, pem: CarrierPem
    ) -> None:
        """The session ticket keys in systemd's fd store, with what they were
        drawn for (`fd_store.store_ticket_keys`). Never raises."""
        if notifier is None:
            return
        try:
            drawn_for = ticket_keys_drawn_for(config, pem)
            store_ticket_keys(notifier, self.ticket_keys, drawn_for)
        except OSError as exc:
            log.warning(
                "the session ticket keys could not be kept in systemd's fd store: should the "
                "supervisor die, the one started again draws new ones",
                extra=fields(key=TICKET_KEYS_NAME, error=str(exc)),
            )
