"""Persisting fleet changes: comments kept, atomic replace, backup. No sockets."""

import errno
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from fleet_ingress.config.atomic import FileExists, write_atomically
from fleet_ingress.config.fleets_file import FleetsFileError, parse_fleets_text
from fleet_ingress.config.fleets_store import (
    FleetNotListed,
    text_with_admin_state,
    text_with_fleet,
    text_without_fleet,
)
from fleet_ingress.core.fleet_spec import Admin

TEXT = (
    "# production fleets\n"
    "https://fleet1.example.com  # first\n"
    "https://fleet2.example.com:8443 name=two maxconn=32\n"
    "\n"
)


def test_adding_appends_one_line_and_keeps_everything_else():
    (spec,) = parse_fleets_text("https://fleet3.example.com name=three", default_maxconn=16)
    new = text_with_fleet(TEXT, spec, default_maxconn=16)
    assert new == TEXT + "https://fleet3.example.com name=three\n"
    (big,) = parse_fleets_text("https://f4.example.com maxconn=40", default_maxconn=16)
    assert text_with_fleet("x.txt-no-newline", big, default_maxconn=16).endswith(
        "x.txt-no-newline\nhttps://f4.example.com maxconn=40\n"
    )


def test_removing_drops_exactly_the_named_line():
    new = text_without_fleet(TEXT, "two", default_maxconn=16)
    assert new == "# production fleets\nhttps://fleet1.example.com  # first\n\n"
    new = text_without_fleet(TEXT, "fleet1.example.com", default_maxconn=16)
    assert "fleet1" not in new and "name=two" in new and new.startswith("# production")


def test_removing_an_unlisted_fleet_says_so():
    with pytest.raises(FleetNotListed, match="FLEETS has no line for fleet 'nope'"):
        text_without_fleet(TEXT, "nope", default_maxconn=16, source="FLEETS")


def test_an_edit_names_the_line_of_an_error_anywhere_in_the_file():
    bad = TEXT + "https://fleet3.example.com maxconn=lots\n"
    for edit in (
        lambda: text_without_fleet(bad, "two", default_maxconn=16, source="FLEETS"),
        lambda: text_with_admin_state(bad, "two", Admin.DRAIN, default_maxconn=16, source="FLEETS"),
    ):
        with pytest.raises(FleetsFileError, match=r"^FLEETS line 5: 'maxconn=lots'") as info:
            edit()
        assert not isinstance(info.value, FleetNotListed)


def test_an_admin_state_rewrites_only_the_admin_option_of_the_named_line():
    drained = text_with_admin_state(TEXT, "fleet1.example.com", Admin.DRAIN, default_maxconn=16)
    assert drained == TEXT.replace(
        "fleet1.example.com  # first", "fleet1.example.com admin=drain  # first"
    )
    maint = text_with_admin_state(drained, "fleet1.example.com", Admin.MAINT, default_maxconn=16)
    assert maint == TEXT.replace(
        "fleet1.example.com  # first", "fleet1.example.com admin=maint  # first"
    )
    two = text_with_admin_state(maint, "two", Admin.DRAIN, default_maxconn=16)
    assert "name=two maxconn=32 admin=drain\n" in two
    specs = {s.name: s.admin for s in parse_fleets_text(two, default_maxconn=16)}
    assert specs == {"fleet1.example.com": Admin.MAINT, "two": Admin.DRAIN}
    # Back to READY: the option goes, and the file is as it was.
    ready = text_with_admin_state(two, "two", Admin.READY, default_maxconn=16)
    ready = text_with_admin_state(ready, "fleet1.example.com", Admin.READY, default_maxconn=16)
    assert ready == TEXT


def test_an_admin_state_keeps_a_line_without_a_newline_and_says_when_a_fleet_is_unlisted():
    text = "  https://f.example.com#c"
    drained = text_with_admin_state(text, "f.example.com", Admin.DRAIN, default_maxconn=16)
    assert drained == "  https://f.example.com admin=drain #c"
    with pytest.raises(FleetNotListed, match="has no line for fleet 'nope'"):
        text_with_admin_state(TEXT, "nope", Admin.DRAIN, default_maxconn=16)


def test_write_atomically_keeps_a_backup_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "fleets.txt"
    assert write_atomically(path, "one\n") is None  # no old file, no backup
    backup = write_atomically(path, "two\n")
    assert backup == tmp_path / "fleets.txt.bak"
    assert path.read_text() == "two\n" and backup.read_text() == "one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleets.txt", "fleets.txt.bak"]


def test_a_symlinked_file_is_written_through_and_the_link_stays(tmp_path: Path):
    """fleets.txt -> real/fleets.txt became a regular file on the first drain or
    add-fleet (the rename replaced the link) and the real file went stale."""
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "fleets.txt"
    real.write_text("one\n")
    link = tmp_path / "fleets.txt"
    link.symlink_to(Path("real") / "fleets.txt")  # relative, as `ln -s real/fleets.txt`
    assert write_atomically(link, "two\n", backup=False) is None
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "fleets.txt")
    assert real.read_text() == "two\n"
    backup = write_atomically(link, "three\n")
    assert link.is_symlink() and real.read_text() == "three\n"
    # The backup where the operator looks for it: beside the name they gave.
    assert backup == tmp_path / "fleets.txt.bak" and backup.read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleets.txt", "fleets.txt.bak", "real"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["fleets.txt"]  # no temp left


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_a_backup_left_by_another_user_is_replaced_not_written_into():
    """`init --force` as root leaves a root-owned fleets.txt.bak; the service (another
    user, with the directory writable) must still be able to keep its backup."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="fi-"))  # pytest's tmp_path is root's alone (0700)
    base.chmod(0o755)
    try:
        home = base / "etc"
        home.mkdir()
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        (home / "fleets.txt").write_text("current\n")
        os.chown(home / "fleets.txt", nobody.pw_uid, nobody.pw_gid)
        (home / "fleets.txt.bak").write_text("root's\n")  # root-owned, 0644
        os.setegid(nobody.pw_gid)
        os.seteuid(nobody.pw_uid)  # the service's user, for this write only
        try:
            write_atomically(home / "fleets.txt", "new\n")
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert (home / "fleets.txt").read_text() == "new\n"
        assert (home / "fleets.txt.bak").read_text() == "current\n"
        assert (home / "fleets.txt.bak").stat().st_uid == nobody.pw_uid
    finally:
        shutil.rmtree(base)


def test_a_failed_write_leaves_the_old_file(tmp_path: Path):
    path = tmp_path / "fleets.txt"
    path.write_text("old\n")
    # The temp file cannot be created (a directory has its name): works as root too.
    (tmp_path / f".fleets.txt.tmp-{os.getpid()}").mkdir()
    with pytest.raises(OSError):
        write_atomically(path, "new\n")
    assert path.read_text() == "old\n"
    assert not (tmp_path / "fleets.txt.bak").exists()


def test_a_failed_write_names_the_file(tmp_path: Path):
    """A full disk fails the write, whose OSError names no file: init said "cannot
    write DIR" and add-fleet named nothing. EFBIG from a file-size limit stands in
    for ENOSPC here (the same write fails); tests/e2e/test_init.py has a real full disk."""
    path = tmp_path / "fleets.txt"
    path.write_text("old\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2, hard))
    try:
        with pytest.raises(OSError) as caught:
            write_atomically(path, "new\n")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(path)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleets.txt"]


def test_no_clobber_mode_refuses_an_existing_file(tmp_path: Path):
    path = tmp_path / "ingress.toml"
    path.write_text("mine\n")
    with pytest.raises(FileExists):
        write_atomically(path, "theirs\n", replace=False)
    assert path.read_text() == "mine\n"
    assert write_atomically(tmp_path / "new.toml", "x\n", replace=False) is None


def test_a_refused_rename_keeps_the_old_backup_and_names_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The failing-disk audit: with `chattr +i fleets.txt` the rename fails; the
    backup was replaced all the same, and the error named the temp file."""
    path = tmp_path / "fleets.txt"
    path.write_text("one\n")
    (tmp_path / "fleets.txt.bak").write_text("zero\n")
    real_replace = os.replace

    def immutable(src: object, dst: object) -> None:
        if Path(str(dst)) == path:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", immutable)
    with pytest.raises(OSError) as refused:
        write_atomically(path, "two\n")
    assert refused.value.filename == str(path)
    assert (tmp_path / "fleets.txt.bak").read_text() == "zero\n"
    assert path.read_text() == "one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleets.txt", "fleets.txt.bak"]


def test_a_write_removes_the_temp_files_of_writers_killed_mid_write(tmp_path: Path):
    """The failing-disk audit: a kill -9 mid-write left `.fleets.txt.tmp-PID`, one
    per PID, which piled up. A write removes those whose process is gone."""
    path = tmp_path / "fleets.txt"
    dead = 2**22 + 1  # above the kernel's largest pid: no such process
    for name in (f".fleets.txt.tmp-{dead}", f".fleets.txt.bak.tmp-{dead}"):
        (tmp_path / name).write_text("half\n")
    alive = tmp_path / f".fleets.txt.tmp-{os.getppid()}"  # another writer's, in use
    alive.write_text("being written\n")
    other = tmp_path / f".other.txt.tmp-{dead}"  # not this file's
    other.write_text("x\n")
    write_atomically(path, "one\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["fleets.txt", alive.name, other.name]
    )


def test_an_edit_reads_lines_as_the_fleets_file_does() -> None:
    """A comment holding U+2028 is one line, as parse_fleets_text reads it:
    the edit's own split (str.splitlines) took the comment's rest for a
    fleet's line, and remove-fleet of a fleet commented out cut the comment
    in two rather than saying it is not listed."""
    text = "# retired:\u2028https://old.example\nhttps://a.example\n"
    with pytest.raises(FleetNotListed):
        text_without_fleet(text, "old.example", default_maxconn=16)
    drained = text_with_admin_state(text, "a.example", Admin.DRAIN, default_maxconn=16)
    assert drained == "# retired:\u2028https://old.example\nhttps://a.example admin=drain\n"
    assert text_without_fleet(text, "a.example", default_maxconn=16) == (
        "# retired:\u2028https://old.example\n"
    )
