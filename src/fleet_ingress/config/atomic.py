"""Writing a file so that a crash leaves the old one or the new one, never half.

The text goes to a temp file beside the target, is fsynced, then renamed over
the target (the old one kept as NAME.bak) or, when nothing may be replaced,
hard-linked into place (which fails if the name appeared meanwhile). The
directory is fsynced so the rename itself survives a crash. A symlink is written
through: the file it names is replaced, in its own directory, and the link stays
(the operator's fleets.txt -> a checkout's file), its backup beside the link.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# A numbered backup series (keep_numbered_backup) ends here: more is a loop, not operators.
MAX_NUMBERED_BACKUPS = 999


class FileExists(FileExistsError):
    pass


def backup_of(path: Path) -> Path:
    """Where `write_atomically` keeps the file it replaced: `NAME.bak` beside `path`
    (a symlink's backup beside the link)."""
    return path.with_name(path.name + ".bak")


def write_atomically(
    path: Path, text: str, *, replace: bool = True, backup: bool = True
) -> Path | None:
    """Write `text` to `path`; returns the backup of the old file (`NAME.bak`), if one
    was kept (`backup` and an old file to replace)."""
    # A rename over the link would replace the link itself with a regular file.
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    remove_stale_temps(target)
    if target != path:
        remove_stale_temps(path)  # the backup's, beside the link
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
            kept_temp = None
            if backup and path.exists():
                kept = backup_of(path)
                # Through a new file and a rename, like the file itself: an old backup
                # owned by someone else (root, after `init --force`) is replaced, not
                # written into. Renamed into place only once the new file is: a change
                # refused at its rename (an immutable file) leaves the old backup.
                kept_temp = path.with_name(f".{kept.name}.tmp-{os.getpid()}")
            try:
                if kept_temp is not None:
                    shutil.copy2(path, kept_temp)
                try:
                    os.replace(temp, target)
                except OSError as exc:
                    # Its filename is the temp file's: name the file being written.
                    raise OSError(exc.errno, exc.strerror, str(path)) from exc
                if kept_temp is not None:
                    os.replace(kept_temp, kept)
            finally:
                if kept_temp is not None:
                    kept_temp.unlink(missing_ok=True)
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


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files `.NAME.tmp-PID` and `.NAME.bak.tmp-PID` beside `path` left
    by a writer killed mid-write (kill -9, a crash): only those whose process is gone,
    so that another writer's file in use is not taken from it. Returns those removed."""
    removed: list[Path] = []
    for prefix in (f".{path.name}.tmp-", f".{path.name}.bak.tmp-"):
        try:
            names = [n for n in os.listdir(path.parent) if n.startswith(prefix)]
        except OSError:
            return removed
        for name in names:
            pid = name[len(prefix) :]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            stale = path.with_name(name)
            try:
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
                    removed.append(stale)
            except OSError:
                pass  # not ours to remove: the write goes on
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process; or not a pid: left alone
    return True


def keep_numbered_backup(path: Path, new_text: str) -> Path | None:
    """Keep the file at `path` (a symlink's target) as the first free `NAME.bak.1`,
    `NAME.bak.2`, ... beside `path`, never replacing one: a second `init --force`
    must not put its first run's output over the operator's own file. Returns the
    backup; None when there is no file, or it already holds `new_text` (nothing to
    lose). A hard link where it can (no space needed: the file is then replaced
    by a rename, so the backup keeps the old inode), else a copy."""
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        return None
    if old == new_text.encode("utf-8"):
        return None
    source = Path(os.path.realpath(path))
    copy: Path | None = None
    try:
        for n in range(1, MAX_NUMBERED_BACKUPS + 1):
            kept = path.with_name(f"{path.name}.bak.{n}")
            try:
                os.link(copy or source, kept)  # never clobbers an older backup
            except FileExistsError:
                continue
            except OSError as exc:
                # Another file system (a symlink's target elsewhere), or a file not
                # ours to link (fs.protected_hardlinks): a copy then.
                if copy is not None or exc.errno not in (errno.EXDEV, errno.EPERM):
                    raise OSError(exc.errno, exc.strerror, str(kept)) from exc
                copy = path.with_name(f".{kept.name}.tmp-{os.getpid()}")
                shutil.copy2(source, copy)
                try:
                    os.link(copy, kept)
                except FileExistsError:
                    continue
            return kept
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)
    raise OSError(
        errno.EEXIST,
        f"{MAX_NUMBERED_BACKUPS} backups are there already; move the old ones away",
        str(path.with_name(f"{path.name}.bak.{MAX_NUMBERED_BACKUPS}")),
    )
