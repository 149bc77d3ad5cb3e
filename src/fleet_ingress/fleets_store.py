"""Persisting live fleet changes to the fleets file, atomically, with a backup.

An edit keeps the operator's comments and layout: adding appends a line,
removing drops the one line that names the fleet. The new text is written to
a temp file beside the real one, fsynced, the old file copied to `NAME.bak`,
then renamed over it: a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def write_atomically(path: Path, text: str) -> Path | None:
    """Replace `path` with `text`; returns the backup path (None when there was no file)."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    backup = None
    try:
        with open(temp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if path.exists():
            backup = path.with_name(path.name + ".bak")
            shutil.copy2(path, backup)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
    return backup
