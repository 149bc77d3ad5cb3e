"""What a reload changed of the settings, said back to the operator; and
what the files on disk would change, not reloaded yet.

`fleet-ingress reload` printed `reloaded: no fleet changes` when only
`timeouts.drain` or `log.level` changed, applied: nothing confirmed that the
change was taken (the operator-journeys audit of session 24). Listeners and
process settings are left out: their own notes say they wait for a restart
or an upgrade (`listener_notes`, the supervisor's pending notes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fleet_ingress.config.settings import IngressConfig
from fleet_ingress.core.fleet_spec import FleetSpec

# Said by notes of their own: applied at a restart or an upgrade, not by a reload.
NOT_RELOADED = ("listen", "process")
# ...but for these, which a reload applies (each worker at once).
RELOADED_ANYWAY = ("process.accept",)
# A reload that found nothing to change says so, and what it compared: before,
# "no fleet changes" read as if only the fleets had been looked at, or as if
# something else had changed (the operator text audit of session 33).
NOTHING_CHANGED = (
    "nothing changed: the configuration, the fleets file and the certificate read "
    "again are those in force"
)
# A long value (a route list, a CA bundle's path) is cut to this in the note.
SHOWN_CHARACTERS = 60


def settings_changed(old: IngressConfig, new: IngressConfig) -> str | None:
    """`timeouts.drain 300 -> 60, log.level info -> debug`, or None when no
    setting a reload applies changed."""
    before, after = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    changed = [
        f"{key} {_shown(before.get(key))} -> {_shown(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
        and (key.split(".")[0] not in NOT_RELOADED or key in RELOADED_ANYWAY)
    ]
    return ", ".join(changed) if changed else None


def fleets_changed(running: Sequence[FleetSpec], on_disk: Sequence[FleetSpec]) -> str | None:
    """`fleet c added, fleet b removed, fleet a maxconn 16 -> 20`: how the
    fleets file differs from the fleets in force, or None. Admin states are
    left out: the file may lack one it could not save (stat marks it `!`)."""
    before, after = {f.name: f for f in running}, {f.name: f for f in on_disk}
    said = [f"fleet {name} added" for name in after if name not in before]
    said += [f"fleet {name} removed" for name in before if name not in after]
    for name in after.keys() & before.keys():
        old, new = before[name], after[name]
        if old.url != new.url:
            said.append(f"fleet {name} url {old.url} -> {new.url}")
        if old.maxconn != new.maxconn:
            said.append(f"fleet {name} maxconn {old.maxconn} -> {new.maxconn}")
    return ", ".join(said) if said else None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(value: Any) -> str:
    """As TOML would spell it, near enough: true, 300.0, ["/ws/"]; a string bare."""
    text = "unset" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."
