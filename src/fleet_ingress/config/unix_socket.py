"""What is at a path given for a Unix socket: in a module of its own, so that
the admin commands (ops.admin_client) do not import the configuration's models
(pydantic, about a third of a CLI run's start-up) to ask it."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def not_a_socket(path: Path) -> str | None:
    """What is at `path` (a link followed) if it is there and is not a Unix
    socket ("a regular file", "a directory", ...); None if nothing is there or a
    socket is (a link to one too, as connecting to it works)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there, or not ours to look at (its connect says so)
        return None
    if stat.S_ISSOCK(mode):
        return None
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"
