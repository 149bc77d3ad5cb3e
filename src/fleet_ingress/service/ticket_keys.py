"""The session ticket keys every worker of this image seals its tickets with
(`SessionTicketKeys`): drawn with each certificate served, handed over an
upgrade's exec, kept in systemd's fd store (`service.fd_store`) for a
supervisor started after this one died."""

from __future__ import annotations

import base64
import logging

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
