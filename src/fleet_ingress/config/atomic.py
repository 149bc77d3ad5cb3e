"""Writing a file so that a crash leaves the old one or the new one, never half.

The text goes to a temp file beside the target, is fsynced, then renamed over
the target (the old one kept as NAME.bak) or, when nothing may be replaced,
hard-linked into place (which fails if the name appeared meanwhile). The
directory is fsynced so the rename itself survives a crash. A symlink is written
through: the file it names is replaced, in its own directory, and the link stays
(the operator's fleets.txt -> a checkout's file), its backup beside the link.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class FileExists(FileExistsError):
    pass


def write_atomically(
    path: Path, text: str, *, replace: bool = True, backup: bool = True
) -> Path | None:
    """Write `text` to `path`; returns the backup of the old file (`NAME.bak`), if one
    was kept (`backup` and an old file to replace)."""
    # A rename over the link would replace the link itself with a regular file.
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    kept = None
    # Mode 0666 minus the umask, as an editor would create it (not mkstemp's 0600).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            # A full disk fails the write, which names no file: name the one being written.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        if replace:
            if backup and path.exists():
                kept = path.with_name(path.name + ".bak")
                # Through a new file and a rename, like the file itself: an old backup
                # owned by someone else (root, after `init --force`) is replaced, not
                # written into.
                kept_temp = path.with_name(f".{kept.name}.tmp-{os.getpid()}")
                try:
                    shutil.copy2(path, kept_temp)
                    os.replace(kept_temp, kept)
                finally:
                    kept_temp.unlink(missing_ok=True)
            os.replace(temp, target)
        else:
            try:
                os.link(temp, target)  # never clobbers, even a file that appeared just now
            except FileExistsError:
                raise FileExists(f"{path} already exists") from None
    finally:
        temp.unlink(missing_ok=True)
    for where in dict.fromkeys((target.parent, path.parent)):  # the backup's too
        directory = os.open(where, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return kept
