"""How `stat` and the stats page show a fleet's row of `/stats.json`: one
rule for both. No imports of the ingress: the CLI uses it too."""

from __future__ import annotations

from typing import Any

NOT_PROBED = "-"


def probed(row: dict[str, Any]) -> bool:
    """A fleet in MAINT is not probed: its last health and free count are stale
    (it starts over from its first probe when it leaves MAINT), so not shown."""
    return row["admin"] != "MAINT"


def shown_health(row: dict[str, Any]) -> str:
    if not probed(row):
        return NOT_PROBED
    return "FULL" if row["health"] == "UP" and row["full"] else str(row["health"])


def shown_free(row: dict[str, Any]) -> tuple[int | None, int | None]:
    """(reported by the last probe, estimated now); None where not known or stale."""
    if not probed(row):
        return None, None
    return row["reported_available"], row["estimated_available"]
