"""Where a failed write of the fleets file happened, for the fix its error names
(ops.fleet_ops.failed_in): no sockets, real files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fleet_ingress.config.atomic import write_atomically
from fleet_ingress.ops.fleet_ops import failed_in


def test_a_write_through_a_symlink_fails_where_the_file_lies_not_where_the_link_is(
    tmp_path: Path,
) -> None:
    """fleets.txt -> a checkout's file on another disk, which is full: the fix
    said `df -h` of the link's directory (the operator-journeys audit)."""
    etc, checkout = tmp_path / "etc", tmp_path / "checkout"
    etc.mkdir()
    checkout.mkdir()
    (checkout / "fleets.txt").write_text("https://a.test name=a\n")
    link = etc / "fleets.txt"
    link.symlink_to(checkout / "fleets.txt")
    # What write_atomically raises when the data cannot be written (a full disk):
    # the file named as the operator knows it, the link.
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(link))
    assert failed_in(full, link) == checkout
    # Its backup is kept beside the link: a failure there is there.
    backup = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(etc / ".fleets.txt.bak.tmp-1"))
    assert failed_in(backup, link) == etc
    assert failed_in(OSError(errno.EIO, "I/O error"), link) == etc  # no file named
    plain = tmp_path / "plain.txt"
    assert failed_in(OSError(errno.ENOSPC, "full", str(plain)), plain) == tmp_path
    # And write_atomically does write where the link points, keeping the link.
    write_atomically(link, "https://b.test name=b\n")
    assert link.is_symlink() and "b.test" in (checkout / "fleets.txt").read_text()


def test_a_read_only_directory_names_the_units_write_paths_first() -> None:
    """Under the unit (ProtectSystem=strict) a directory outside its
    ReadWritePaths is read-only to the service, whatever its mount: the fix is a
    drop-in, not a remount (the journey under systemd of session 27)."""
    from fleet_ingress.ops.fleet_ops import _write_fix

    fix = _write_fix(errno.EROFS, Path("/srv/fleets"))
    assert "/srv/fleets" in fix and "ReadWritePaths=" in fix and "systemctl edit" in fix
    assert "section 2" in _write_fix(errno.EACCES, Path("/srv/fleets"))
