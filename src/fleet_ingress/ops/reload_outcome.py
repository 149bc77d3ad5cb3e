"""The outcome of the last reload, as `stat`, `/stats.json`, the stats page and
systemd's STATUS= show it: a refused reload stays in sight until one applies
(the journal line alone scrolls away). No I/O, no imports of the ingress: the
CLI's `stat` formats it too."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

# A reload asked of the supervisor: by SIGHUP (None), or by `fleet-ingress reload`,
# which waits on the future for the outcome (reload_outcome's dict).
ReloadAsked = asyncio.Future[dict[str, Any]] | None


def reload_outcome(error: str | None, changes: str | None = None) -> dict[str, Any]:
    """What `last_reload` says of a reload that ended now: applied (with what it
    changed) or refused (with why: the running configuration stays)."""
    return {
        "result": "refused" if error is not None else "applied",
        "time": time.time(),
        "error": error,
        "changes": changes,
    }


def tell(asked: list[ReloadAsked], outcome: dict[str, Any] | None) -> None:
    """Answer each reload asked that still waits (a SIGHUP's None has no one to
    answer) with `outcome`, or with none recorded."""
    for one in asked:
        if one is not None and not one.done():  # its asker may have gone
            one.set_result(outcome or reload_outcome("no outcome recorded"))


# Added to systemd's STATUS= line while the last reload was refused: the line is
# rewritten every few seconds, and the refusal must not scroll away with it.
REFUSED_RELOAD_STATUS = "; LAST RELOAD REFUSED: see `fleet-ingress stat` or the journal"


def was_refused(last_reload: dict[str, Any] | None) -> bool:
    return last_reload is not None and last_reload.get("result") == "refused"


def reload_warning(snap: dict[str, Any]) -> str | None:
    """One line for `stat` and the stats page while the last reload was refused."""
    last = snap.get("last_reload")
    if last is None or not was_refused(last):
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last["time"]))
    return (
        f"LAST RELOAD REFUSED ({when}): {last['error']}; the previous configuration "
        "still serves: fix it, then reload again"
    )


def edits_hidden_warning(snap: dict[str, Any]) -> str | None:
    """One line for `stat` and the stats page while the last reload applied
    found file edits the environment hides (`last_reload["edits_hidden"]`):
    the reload's answer and its journal line scroll away, the edit stays unserved."""
    last = snap.get("last_reload")
    if last is None or was_refused(last) or not last.get("edits_hidden"):
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last["time"]))
    return f"EDITS NOT APPLIED (reload {when}): " + "; ".join(last["edits_hidden"])


# What a reload says of a listener its file moved (service.ingress.listener_notes):
# the socket bound at start serves on until a restart.
LISTENER_NOT_MOVED = "changed: takes effect at the next restart"
WSS_NOT_MOVED = (
    "; until then calls come on the address bound, and `check --live` "
    "(keepalived's check) reads the one configured and fails"
)
_LISTENER_NOTE = re.compile(
    r"listen\.\w+ " + re.escape(LISTENER_NOT_MOVED) + f"(?:{re.escape(WSS_NOT_MOVED)})?"
)


def listeners_not_moved(snap: dict[str, Any]) -> str | None:
    """One line for `stat` and the stats page while the last reload applied
    a file whose listen.* differs from what was bound at start: the reload's
    answer and its journal line scroll away, and stat said nothing while the
    ingress listened elsewhere than its file says and `check --live` (the
    track script of keepalived) failed (the operator-input audit of session 38).
    Read from the snapshot's `listeners_not_moved` (the bound listeners against
    the configuration running): the last reload's answer alone lost it once a
    reload was refused after (a botched edit), and after an upgrade, which keeps
    the sockets bound but not the last reload. The reload's time is said when the
    last reload applied the file. (A snapshot without the key, an ingress of an
    earlier release: its last reload's answer, as then.)"""
    last = snap.get("last_reload")
    applied = last if isinstance(last, dict) and not was_refused(last) else None
    notes = snap.get("listeners_not_moved")
    if not isinstance(notes, list):
        changes = None if applied is None else applied.get("changes")
        notes = _LISTENER_NOTE.findall(changes) if isinstance(changes, str) else []
    if not notes:
        return None
    said = "; ".join(str(note) for note in notes)
    if applied is None or not isinstance(applied.get("time"), int | float):
        return f"RESTART NEEDED: {said}"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(applied["time"]))
    return f"RESTART NEEDED (reload {when}): {said}"
