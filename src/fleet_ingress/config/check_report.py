"""How `fleet-ingress check` reports: a line per finding, warnings marked
(WARNING), and that report shortened to a few lines where it is quoted
(an upgrade's refused trial). Apart from config.check, which imports the
probes' aiohttp: a worker imports what quotes the report (service.upgrade)
and must not map aiohttp."""

from __future__ import annotations

from pathlib import Path

WARNING = "warning: "  # lines with this prefix are reported but do not fail the check


def shortened(lines: list[str], limit: int, config_path: Path) -> str:
    """What `check` said, in `limit` lines at most: its problems (and its
    summary), then as many of its warnings as there is room for. check
    prints its warnings after its problems: the last lines alone were warnings
    only once there were more of them than `limit` (the CLI text audit). More
    problems than `limit`: the first ones, often the cause of the rest, and
    the summary (the review of session 33: the last ones were kept)."""
    if len(lines) <= limit:
        return "\n".join(lines)
    problems = [at for at, line in enumerate(lines) if not line.startswith(WARNING)]
    if len(problems) > limit:  # the first (often the cause of the rest) and the summary
        problems = problems[: limit - 1] + problems[-1:]
    room = limit - len(problems)
    warnings = [at for at, line in enumerate(lines) if line.startswith(WARNING)]
    shown = sorted(problems + warnings[:room])
    left = len(lines) - len(shown)
    return "\n".join(lines[at] for at in shown) + (
        f"\n(and {left} more line(s): `fleet-ingress check -c {config_path}` prints them all)"
    )
