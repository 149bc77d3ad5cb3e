"""Live fleet changes as edits of the fleets file's text.

An edit keeps the operator's comments and layout: adding appends a line,
removing drops the one line that names the fleet. `write_atomically` (from
`atomic`) then replaces the file, keeping the old one as `NAME.bak`.
"""

from __future__ import annotations

from .fleets_file import FleetsFileError, FleetSpec, format_fleets_text, parse_fleets_text


def text_with_fleet(text: str, spec: FleetSpec, *, default_maxconn: int) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + format_fleets_text([spec], default_maxconn=default_maxconn)


def text_without_fleet(text: str, name: str, *, default_maxconn: int) -> str:
    kept: list[str] = []
    removed = 0
    for line in text.splitlines(keepends=True):
        specs = parse_fleets_text(line, default_maxconn=default_maxconn)
        if specs and specs[0].name == name:
            removed += 1
            continue
        kept.append(line)
    if removed != 1:
        raise FleetsFileError(f"fleets file names {name!r} {removed} times, expected once")
    return "".join(kept)
