"""`fleet-ingress init`: the packaged example rendered for one deployment, refused
whole on a surviving placeholder, a bad fleet or an existing file, then checked."""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from fleet_ingress.config.check import run_check
from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.config.init_deploy import (
    CHECK_FAILED,
    NOT_WRITTEN,
    OK,
    InitError,
    add_init_arguments,
    check_deployment,
    main_init,
    render_deployment,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = ROOT / "config"
PACKAGED_DIR = ROOT / "src" / "fleet_ingress" / "config" / "templates"
DOMAIN = "calls.example.com"
FLEETS = ["https://fleet1.example.com", "https://fleet2.example.com:8443"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLEET_INGRESS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def templates_with_cert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The packaged templates, with certbot's live/ directory moved under tmp_path
    and holding a real (trustme) certificate for DOMAIN, issued by an intermediate
    under a root that OpenSSL's default bundle (SSL_CERT_FILE) trusts, as Let's
    Encrypt's are."""
    live = tmp_path / "letsencrypt" / "live" / DOMAIN
    live.mkdir(parents=True)
    root = trustme.CA()
    root.cert_pem.write_to_path(tmp_path / "system-roots.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system-roots.pem"))
    leaf = root.create_child_ca().issue_cert(DOMAIN)
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(live / "fullchain.pem", append=True)
    leaf.private_key_pem.write_to_path(live / "privkey.pem")
    templates = tmp_path / "templates"
    templates.mkdir()
    toml = (PACKAGED_DIR / "ingress.toml").read_text()
    assert "/etc/letsencrypt/live/__INGRESS_DOMAIN__/" in toml
    toml = toml.replace("/etc/letsencrypt/live/", f"{tmp_path}/letsencrypt/live/")
    (templates / "ingress.toml").write_text(toml)
    (templates / "fleets.txt").write_text((PACKAGED_DIR / "fleets.txt").read_text())
    return templates


def init_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleet-ingress init")
    add_init_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", ["ingress.toml", "fleets.txt"])
def test_packaged_templates_are_the_config_examples(name: str) -> None:
    # config/ is the one source; the package ships a copy so an installed init finds it.
    packaged, example = PACKAGED_DIR / name, EXAMPLE_DIR / name
    assert packaged.read_bytes() == example.read_bytes(), (
        f"{packaged} differs from {example}; after editing the example run: cp {example} {packaged}"
    )


def test_renders_the_example_with_the_domain_and_fleets(tmp_path: Path) -> None:
    out = tmp_path / "etc"
    paths = render_deployment(DOMAIN, [*FLEETS, "https://Fleet3.Example.com/"], out)
    assert paths == [out / "ingress.toml", out / "fleets.txt"]
    toml = paths[0].read_text()
    assert toml == (EXAMPLE_DIR / "ingress.toml").read_text().replace("__INGRESS_DOMAIN__", DOMAIN)
    assert f'cert = "/etc/letsencrypt/live/{DOMAIN}/fullchain.pem"' in toml
    fleets_text = paths[1].read_text()
    specs = parse_fleets_text(fleets_text, default_maxconn=16)
    assert [s.url for s in specs] == [*FLEETS, "https://fleet3.example.com"]
    assert all(s.maxconn == 16 for s in specs)
    # The example's comment header stays; its example.com fleet lines are gone.
    assert fleets_text.startswith("# Fleets behind the ingress")
    assert "name=fleet1" not in fleets_text


def test_output_passes_check_except_the_certificate_certbot_has_not_issued(
    tmp_path: Path,
) -> None:
    render_deployment(DOMAIN, FLEETS, tmp_path)
    result = check_deployment(tmp_path / "ingress.toml")
    assert result.ok and result.problems == [] and result.warnings == []
    live = Path("/etc/letsencrypt/live") / DOMAIN
    if (live / "fullchain.pem").exists():
        pytest.skip(f"{live} exists on this machine")
    assert result.missing_certificate == [live / "fullchain.pem", live / "privkey.pem"]


def test_output_passes_check_with_a_certificate_in_place(
    tmp_path: Path, templates_with_cert: Path
) -> None:
    out = tmp_path / "etc"
    render_deployment(DOMAIN, FLEETS, out, template_dir=templates_with_cert)
    result = check_deployment(out / "ingress.toml")
    assert (result.problems, result.missing_certificate, result.warnings) == ([], [], [])
    report = io.StringIO()
    assert run_check(out / "ingress.toml", report) == 0, report.getvalue()
    # The fleets' documentation names resolve nowhere without the internet: `check`
    # warns of each such name (input38), and of nothing else.
    said = [line for line in report.getvalue().splitlines() if "does not resolve" not in line]
    assert said and said[0].startswith("OK: 2 fleets"), report.getvalue()
    assert not any(line.startswith("warning") for line in said), report.getvalue()


def test_main_init_says_the_missing_certificate_is_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main_init(init_args("--domain", DOMAIN, *_fleet_args(FLEETS), "--out", str(tmp_path)))
    out = capsys.readouterr().out
    assert status == OK, out
    assert f"wrote {tmp_path / 'ingress.toml'}" in out and f"wrote {tmp_path / 'fleets.txt'}" in out
    if not Path(f"/etc/letsencrypt/live/{DOMAIN}/fullchain.pem").exists():
        assert "no certificate yet" in out and "expected until certbot has issued it" in out


def test_main_init_says_ok_when_the_certificate_is_in_place(
    tmp_path: Path, templates_with_cert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = init_args("--domain", DOMAIN, *_fleet_args(FLEETS), "--out", str(tmp_path / "etc"))
    assert main_init(args, template_dir=templates_with_cert) == OK
    out = capsys.readouterr().out
    assert "check: OK" in out and "no certificate yet" not in out


def test_a_certificate_that_exists_but_is_broken_is_a_real_problem(
    tmp_path: Path, templates_with_cert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "letsencrypt" / "live" / DOMAIN / "fullchain.pem").write_text("not a PEM\n")
    out = tmp_path / "etc"
    render_deployment(DOMAIN, FLEETS, out, template_dir=templates_with_cert)
    result = check_deployment(out / "ingress.toml")
    assert not result.ok and result.missing_certificate == []
    assert any("tls.cert" in line for line in result.problems), result.problems
    # The same through main_init: written, but exit 1 with the problem printed.
    args = init_args("--domain", DOMAIN, *_fleet_args(FLEETS), "--out", str(out), "--force")
    assert main_init(args, template_dir=templates_with_cert) == CHECK_FAILED
    captured = capsys.readouterr()
    assert "check: " in captured.out and "tls.cert" in captured.out
    assert "check found 1 problem(s)" in captured.err


def test_a_surviving_placeholder_refuses_naming_it_and_the_file(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    toml = (PACKAGED_DIR / "ingress.toml").read_text()
    toml = toml.replace('health = "/haproxy-health"', 'health = "/__CARRIER_HEALTH__"')
    (templates / "ingress.toml").write_text(toml)
    (templates / "fleets.txt").write_text("# __OPERATOR_TEAM__ owns these\n__FLEET_SERVERS__\n")
    out = tmp_path / "etc"
    with pytest.raises(InitError) as raised:
        render_deployment(DOMAIN, FLEETS, out, template_dir=templates)
    message = str(raised.value)
    assert f"{templates / 'ingress.toml'} line " in message and "__CARRIER_HEALTH__" in message
    assert f"{templates / 'fleets.txt'} line 1" in message and "__OPERATOR_TEAM__" in message
    assert "nothing was written" in message
    assert not out.exists()


def test_a_templates_fleets_section_in_capitals_sets_the_default_maxconn(tmp_path: Path) -> None:
    """load_config reads [Fleets] as [fleets]; init read only [fleets], so with a
    template's [Fleets] maxconn = 8 a --fleet at maxconn=16 (init's default) was
    written without its maxconn= and served at 8, and one at 8 was written with it."""
    templates = tmp_path / "templates"
    templates.mkdir()
    toml = (PACKAGED_DIR / "ingress.toml").read_text()
    toml = toml.replace("[fleets]\n", "[Fleets]\n", 1).replace(
        "\nmaxconn = 16\n", "\nmaxconn = 8\n"
    )
    assert "[Fleets]\n" in toml and "[fleets]" not in toml and "\nmaxconn = 8\n" in toml
    (templates / "ingress.toml").write_text(toml)
    shutil.copy(PACKAGED_DIR / "fleets.txt", templates / "fleets.txt")
    out = tmp_path / "etc"
    fleets = ["https://fleet1.example.com maxconn=16", "https://fleet2.example.com maxconn=8"]
    render_deployment(DOMAIN, fleets, out, template_dir=templates)
    text = (out / "fleets.txt").read_text()
    assert "https://fleet1.example.com maxconn=16\n" in text
    assert "https://fleet2.example.com\n" in text
    specs = parse_fleets_text(text, default_maxconn=8)
    assert [s.maxconn for s in specs] == [16, 8]


def test_a_placeholder_brought_in_by_a_fleet_name_is_refused_too(tmp_path: Path) -> None:
    with pytest.raises(InitError, match=r"fleets\.txt: placeholder __X__ would survive"):
        render_deployment(DOMAIN, ["https://fleet1.example.com name=a__X__"], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("fleets", "named"),
    [
        (["https://fleet1.example.com", "ftp://fleet2.example.com"], "--fleet #2: 'ftp://"),
        (["fleet1.example.com"], "'fleet1.example.com'"),
        (["https://fleet1.example.com/ws/"], "'https://fleet1.example.com/ws/'"),
        (["https://fleet1.example.com", "https://FLEET1.example.com:443"], "already listed"),
        (["https://fleet1.example.com maxconn=0"], "'maxconn=0'"),
        (  # it said "on line 1" of a file the operator never wrote
            ["https://a.example.com name=x", "https://b.example.com name=x"],
            "--fleet #2: 'name=x' repeats the name of the fleet of --fleet #1",
        ),
        (["https://a.example.com\nhttps://b.example.com"], "give one fleet"),
        ([], "at least one --fleet"),
    ],
)
def test_a_bad_fleet_refuses_naming_it(tmp_path: Path, fleets: list[str], named: str) -> None:
    with pytest.raises(InitError) as raised:
        render_deployment(DOMAIN, fleets, tmp_path)
    assert named in str(raised.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "domain", ["", "localhost", "*.example.com", "calls..example.com", "10.0.0.1", "a b.com"]
)
def test_a_domain_certbot_cannot_issue_for_is_refused(tmp_path: Path, domain: str) -> None:
    with pytest.raises(InitError, match="not a DNS name"):
        render_deployment(domain, FLEETS, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_domain_is_normalised(tmp_path: Path) -> None:
    render_deployment("Calls.Example.COM.", FLEETS, tmp_path)
    assert f"/etc/letsencrypt/live/{DOMAIN}/privkey.pem" in (tmp_path / "ingress.toml").read_text()


def test_existing_files_are_not_overwritten_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fleets.txt").write_text("https://kept.example.com\n")
    with pytest.raises(InitError, match=r"fleets\.txt already exists; nothing was written"):
        render_deployment(DOMAIN, FLEETS, tmp_path)
    # Not even the file that did not exist yet.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleets.txt"]
    assert (tmp_path / "fleets.txt").read_text() == "https://kept.example.com\n"
    args = init_args("--domain", DOMAIN, *_fleet_args(FLEETS), "--out", str(tmp_path))
    assert main_init(args) == NOT_WRITTEN
    assert "--force" in capsys.readouterr().err

    render_deployment(DOMAIN, FLEETS, tmp_path, force=True)
    fleets = parse_fleets_text((tmp_path / "fleets.txt").read_text(), default_maxconn=16)
    assert [s.url for s in fleets] == FLEETS
    assert (tmp_path / "fleets.txt.bak.1").read_text() == "https://kept.example.com\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fleets.txt",
        "fleets.txt.bak.1",
        "ingress.toml",
    ]  # and no temp file left behind


def test_force_twice_never_loses_the_operators_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second `init --force` put the first run's output over fleets.txt.bak,
    the operator's hand-edited file (the audit of 2026-12-04)."""
    mine = "# ours, by hand\nhttps://mine.example.com name=mine\n"
    (tmp_path / "fleets.txt").write_text(mine)
    (tmp_path / "ingress.toml").write_text("# my settings\n")
    for fleets in (FLEETS, FLEETS[:1], FLEETS[:1]):
        args = init_args(
            "--domain", DOMAIN, *_fleet_args(fleets), "--out", str(tmp_path), "--force"
        )
        main_init(args)
    out = capsys.readouterr().out
    assert (tmp_path / "fleets.txt.bak.1").read_text() == mine
    assert (tmp_path / "ingress.toml.bak.1").read_text() == "# my settings\n"
    # The second run kept the first one's fleets.txt; the third wrote what was there.
    assert "fleet2.example.com" in (tmp_path / "fleets.txt.bak.2").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fleets.txt",
        "fleets.txt.bak.1",
        "fleets.txt.bak.2",
        "ingress.toml",
        "ingress.toml.bak.1",
    ]
    kept = tmp_path / "fleets.txt.bak.1"
    assert f"wrote {tmp_path / 'fleets.txt'} (the old one is kept as {kept})" in out


def test_an_unwritable_out_dir_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InitError, match=r"cannot write .*file.*; nothing was written"):
        render_deployment(DOMAIN, FLEETS, tmp_path / "file" / "etc")


def test_an_out_that_is_a_file_is_named_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("kept")  # it said "cannot write ...: File exists"
    with pytest.raises(InitError, match=r"--out .*file is a file, not a directory"):
        render_deployment(DOMAIN, FLEETS, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "kept"


def test_written_files_follow_the_umask_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        render_deployment(DOMAIN, FLEETS, tmp_path)
    finally:
        os.umask(old)
    for name in ("ingress.toml", "fleets.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640


def test_the_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fleet_ingress", "init", "--domain", DOMAIN]
    done = subprocess.run(
        [*cmd, *_fleet_args(FLEETS), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == OK, done.stdout + done.stderr
    assert (tmp_path / "ingress.toml").is_file() and (tmp_path / "fleets.txt").is_file()
    done = subprocess.run(
        [*cmd, *_fleet_args(FLEETS), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == NOT_WRITTEN and "already exist" in done.stderr


def test_the_command_line_takes_the_fleets_after_one_flag_as_spec_8_writes_it(
    tmp_path: Path,
) -> None:
    cmd = [sys.executable, "-m", "fleet_ingress", "init", "--domain", DOMAIN]
    one = tmp_path / "one"
    done = subprocess.run(
        [*cmd, "--fleet", *FLEETS, "--out", str(one)], capture_output=True, text=True
    )
    assert done.returncode == OK, done.stdout + done.stderr
    repeated = tmp_path / "repeated"
    subprocess.run([*cmd, *_fleet_args(FLEETS), "--out", str(repeated)], check=True)
    assert (one / "fleets.txt").read_text() == (repeated / "fleets.txt").read_text()
    assert len(parse_fleets_text((one / "fleets.txt").read_text(), default_maxconn=16)) == len(
        FLEETS
    )


def _fleet_args(fleets: list[str]) -> list[str]:
    return [arg for url in fleets for arg in ("--fleet", url)]


@pytest.mark.parametrize("force", [False, True])
def test_a_file_that_cannot_be_written_takes_back_the_others(tmp_path: Path, force: bool) -> None:
    """ingress.toml was left written when fleets.txt failed (a full disk), and the
    re-run was refused because ingress.toml existed; the message named the directory."""
    before = {}
    if force:
        before = {"ingress.toml": "# my settings\n", "fleets.txt": "https://mine.example.com\n"}
    for name, text in before.items():
        (tmp_path / name).write_text(text)
    blocker = tmp_path / f".fleets.txt.tmp-{os.getpid()}"
    blocker.mkdir()  # fleets.txt's temp file cannot be made, after ingress.toml is written
    with pytest.raises(InitError) as caught:
        render_deployment(DOMAIN, FLEETS, tmp_path, force=force)
    assert str(caught.value) == (
        f"cannot write {tmp_path / 'fleets.txt'} ({blocker}): Is a directory; nothing was "
        "changed (what this run wrote is taken back); fix that, then run init again"
    )
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == before
    blocker.rmdir()
    render_deployment(DOMAIN, FLEETS, tmp_path, force=force)  # as it says: run it again
    assert (tmp_path / "fleets.txt").read_text().endswith("https://fleet2.example.com:8443\n")


@pytest.mark.parametrize("force", [False, True])
def test_ctrl_c_half_way_takes_back_what_was_written(
    tmp_path: Path, force: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's Ctrl-C as fleets.txt is written left ingress.toml written
    (the review of session 19); it is taken back as a failure is."""
    from fleet_ingress.config import init_deploy

    before = {"ingress.toml": "# my settings\n"} if force else {}
    for name, text in before.items():
        (tmp_path / name).write_text(text)
    real_write = init_deploy.write_atomically

    def interrupted_at_fleets(path: Path, *args: object, **kw: object) -> object:
        if path.name == "fleets.txt":
            raise KeyboardInterrupt
        return real_write(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(init_deploy, "write_atomically", interrupted_at_fleets)
    with pytest.raises(KeyboardInterrupt):
        render_deployment(DOMAIN, FLEETS, tmp_path, force=force)
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: needs root")
@pytest.mark.parametrize("force", [False, True])
def test_a_full_disk_at_any_point_changes_nothing_and_names_the_file(force: bool) -> None:
    """A real ENOSPC at every step of the run: one tmpfs, filled to leave 0, 1, 2...
    pages free until the run fits. Each failure names a file, says to free space,
    and leaves the directory as it was."""
    base = Path(tempfile.mkdtemp(prefix="fi-full-"))
    mnt = base / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        before = {}
        if force:
            before = {"ingress.toml": "# my settings\n", "fleets.txt": "https://mine.example.com\n"}
        page = os.statvfs(mnt).f_frsize
        failed = 0
        for free in range(64):
            for p in mnt.iterdir():
                p.unlink()
            for name, text in before.items():
                (mnt / name).write_text(text)
            fs = os.statvfs(mnt)
            (mnt / "filler").write_bytes(b"x" * ((fs.f_bavail - free) * page))
            assert os.statvfs(mnt).f_bavail == free
            try:
                render_deployment(DOMAIN, FLEETS, mnt, force=force)
            except InitError as exc:
                message = str(exc)
                failed += 1
                assert re.match(
                    rf"cannot write {mnt}/(ingress\.toml|fleets\.txt): No space left on device; "
                    r"nothing was (written|changed \(what this run wrote is taken back\)); ",
                    message,
                ), message
                assert message.endswith(
                    f"free some space or inodes there (df -h {mnt}, df -i {mnt}), "
                    "then run init again"
                )
                left = {p.name: p.read_text() for p in mnt.iterdir() if p.name != "filler"}
                assert left == before, (free, message)
            else:
                break
        else:
            pytest.fail("init never fitted in 64 free pages")
        assert failed == free > 1  # every run before failed, some of them half way
        assert sorted(p.name for p in mnt.iterdir())[:2] == ["filler", "fleets.txt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        shutil.rmtree(base)


@pytest.fixture
def linked_elsewhere(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/ingress.toml, a link to a file "# my settings" on another file
    system (/dev/shm); that file's path."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than tmp_path")
    elsewhere = Path(tempfile.mkdtemp(prefix="fi-init-", dir=shm))
    try:
        real = elsewhere / "ingress.toml"
        real.write_text("# my settings\n")
        (tmp_path / "ingress.toml").symlink_to(real)
        yield real
    finally:
        shutil.rmtree(elsewhere)


def test_force_through_a_symlink_to_another_file_system(
    tmp_path: Path, linked_elsewhere: Path
) -> None:
    """ingress.toml -> a file on another file system: written through (the link
    stays), and its backup, which cannot be a hard link there, is a copy."""
    real = linked_elsewhere
    backups: dict[Path, Path] = {}
    render_deployment(DOMAIN, FLEETS, tmp_path, force=True, backups=backups)
    assert (tmp_path / "ingress.toml").is_symlink() and DOMAIN in real.read_text()
    assert backups == {tmp_path / "ingress.toml": tmp_path / "ingress.toml.bak.1"}
    assert (tmp_path / "ingress.toml.bak.1").read_text() == "# my settings\n"
    assert not (tmp_path / "ingress.toml.bak.1").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fleets.txt",
        "ingress.toml",
        "ingress.toml.bak.1",
    ]
    assert [p.name for p in real.parent.iterdir()] == ["ingress.toml"]


def test_a_failed_force_takes_back_a_file_on_another_file_system(
    tmp_path: Path, linked_elsewhere: Path
) -> None:
    """Its backup (a copy beside the link) cannot be renamed back across file
    systems: the take-back said 'Invalid cross-device link' and left the new
    text there (the review of session 19)."""
    real = linked_elsewhere
    (tmp_path / "fleets.txt").symlink_to(tmp_path / "gone" / "fleets.txt")  # cannot be written
    with pytest.raises(InitError, match="nothing was changed") as raised:
        render_deployment(DOMAIN, FLEETS, tmp_path, force=True)
    assert "could not take back" not in str(raised.value)
    assert real.read_text() == "# my settings\n"
    assert (tmp_path / "ingress.toml").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleets.txt", "ingress.toml"]


def test_init_that_fails_takes_back_the_directory_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The failing-disk audit: init into a full file system said "nothing was
    written" but left the --out directory it had made (empty)."""
    from fleet_ingress.config import init_deploy

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(args[0]))

    monkeypatch.setattr(init_deploy, "write_atomically", full)
    out = tmp_path / "new" / "deploy"
    with pytest.raises(InitError) as failed:
        render_deployment(DOMAIN, FLEETS, out, force=False)
    assert "nothing was written" in str(failed.value)
    assert "df -i" in str(failed.value)
    assert list(tmp_path.iterdir()) == []


def test_an_out_directory_init_makes_is_said_with_what_the_service_needs_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`init --out /etc/fleet-ingress` without section 2's `install -d` made the
    directory root's, 0755, silently: the service could not save a drain or an
    add-fleet there, and a restart forgot them (the docwalk of session 33)."""
    made = tmp_path / "new" / "etc"
    assert main_init(init_args("--domain", DOMAIN, *_fleet_args(FLEETS), "--out", str(made))) == OK
    out = capsys.readouterr().out
    mode = made.stat().st_mode & 0o7777
    assert (
        f"note: made {made} (mode {mode:04o}, this user's group): the service rewrites "
        "fleets.txt there on add-fleet, drain and the like, so give it the service's group, "
        f"group-writable: chgrp fleet-ingress {made} && chmod 2770 {made}" in out
    ), out
    there = tmp_path / "there"
    there.mkdir()
    assert main_init(init_args("--domain", DOMAIN, *_fleet_args(FLEETS), "--out", str(there))) == OK
    assert "note: made" not in capsys.readouterr().out
