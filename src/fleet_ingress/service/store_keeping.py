"""What the supervisor keeps of systemd's fd store beside its sockets
(`service.fd_store`): what the image before this one left of the store,
until this image's notifier takes it up (`StoreTakenUp`); and the picture of
the store that `stat`, stats.json and the metrics show (`fd_store_picture`).
The session ticket keys it keeps there are `service.ticket_keys`'s."""

from __future__ import annotations

from typing import Any

from fleet_ingress.service.sdnotify import Notifier


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
