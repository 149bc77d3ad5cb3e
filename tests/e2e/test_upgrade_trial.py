"""The upgrade's trial run: the installed code, run as the re-executed
supervisor will run it, before anything is handed over (service/upgrade.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import fleet_ingress
from fleet_ingress.service import upgrade
from tests.support import TLSFiles, write_leaf_cert, write_run_home


async def test_a_release_with_another_state_format_is_refused_before_the_exec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new image would not understand the state this one hands it: the
    trial says so (and what to do) instead of the new image failing after the exec."""
    monkeypatch.setattr(upgrade, "STATE_VERSION", upgrade.STATE_VERSION + 1)
    config = tmp_path / "ingress.toml"
    config.write_text("")  # never read: the format check comes first
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    said = str(failed.value)
    assert f"format {upgrade.STATE_VERSION - 1}, the running one in format" in said
    assert "systemctl restart fleet-ingress" in said
    # Said as what it is: not a broken install to reinstall (it printed that before).
    assert said.startswith("the installed release keeps") and "does not import" not in said


async def test_the_same_release_passes_the_format_check_and_reaches_check(tmp_path: Path) -> None:
    config = tmp_path / "ingress.toml"
    config.write_text("[listen]\nnot_a_key = 1\n")
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    said = str(failed.value)
    assert "not_a_key" in said  # `check` ran and named the bad key
    assert "format" not in said
    # The configuration is named as what failed, not the installation.
    assert said.startswith(f"the configuration does not pass `fleet-ingress check -c {config}`")
    assert "the installed code itself imports" in said and "pip install" not in said
    assert upgrade.TRIAL_CODE_IMPORTED not in said


async def test_a_trial_that_answered_during_a_stall_is_read_not_timed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process stopped (a paused VM, the loop blocked here) past the
    trial's timeout while the trial ran and answered: its answer, waiting in
    the pipe, is read, not "did not finish its trial run within 1s" (a plain
    timeout fired first, on the loop's first turn). The trial answers fast
    here: the state format check comes before the imports."""
    monkeypatch.setattr(upgrade, "STATE_VERSION", upgrade.STATE_VERSION + 1)
    config = tmp_path / "ingress.toml"
    config.write_text("")
    trial = asyncio.create_task(upgrade.trial_run(config, timeout=1.0))
    await asyncio.sleep(0.2)  # started, its timeout running
    time.sleep(5.0)  # noqa: ASYNC251 - the loop does not run, as if stopped
    with pytest.raises(upgrade.TrialFailed) as failed:
        await trial
    said = str(failed.value)
    assert said.startswith("the installed release keeps"), said


async def _trial_of_a_broken_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, break_it: Callable[[Path], None]
) -> upgrade.TrialFailed:
    """The trial run of a copy of the package that `break_it` changed (given
    the copy's package directory): what it failed with."""
    broken = tmp_path / "site"
    package = broken / "fleet_ingress"
    shutil.copytree(
        Path(fleet_ingress.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    break_it(package)
    monkeypatch.setenv("PYTHONPATH", str(broken))
    config = tmp_path / "ingress.toml"
    config.write_text("")
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    return failed.value


async def test_checks_output_cannot_pass_for_the_trials_own_refusal(tmp_path: Path) -> None:
    """The trial's "cannot take over" line counts only where the trial says it
    (before the imports, exit 3): a configuration naming a file whose name
    holds that line is check's refusal (the review of session 16)."""
    config = tmp_path / "ingress.toml"
    marker = upgrade.TRIAL_CANNOT_TAKE_OVER
    config.write_text(f'[fleets]\nfile = "nf\\n{marker}restart now"\n')
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    said = str(failed.value)
    assert said.startswith("the configuration does not pass"), said


async def test_a_release_whose_supervisor_cuts_channels_on_unknown_ops_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback to a release before slot_wire.UnknownOps (fab1a75) passed the
    trial (the same state format): its supervisor then cut both running
    workers' channels at their first `answered`, their slots given back while
    their calls ran (a fleet at 23 calls over maxconn 20), their counts lost
    (the cross-version audit of session 16)."""

    def intolerant(package: Path) -> None:
        wire = package / "net" / "slot_wire.py"
        wire.write_text(wire.read_text().replace("class UnknownOps:", "class _Before:"))

    failed = await _trial_of_a_broken_copy(tmp_path, monkeypatch, intolerant)
    said = str(failed)
    assert said.startswith("the installed release's supervisor cuts a worker's channel"), said
    assert "restart the service instead" in said and "nothing was handed over" in said
    assert "does not import" not in said
    # stat's line then says to restart, not to upgrade again (the review of session 32).
    assert failed.cause == "release"


async def test_a_release_that_does_not_import_is_named_as_the_installation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of the package with a syntax error planted in one module: the
    fix is the install, and the configuration is never checked."""

    def syntax_error(package: Path) -> None:
        (package / "ops" / "metrics.py").write_text("def f(:\n")

    said = str(await _trial_of_a_broken_copy(tmp_path, monkeypatch, syntax_error))
    assert said.startswith("the installed code failed its trial run")
    assert "does not import" in said and "pip install $SRC" in said
    assert "fleet-ingress==" not in said  # not by the bare name (INSTALL 9)
    assert "configuration does not pass" not in said


async def test_a_check_that_crashes_after_the_imports_is_named_as_the_installation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every module imports, but the installed `check` raises: a bug in the
    release, not a configuration to fix."""

    def crashing_check(package: Path) -> None:
        check = package / "config" / "check.py"
        crash = "\n\ndef run_check(*a, **k):\n    raise RuntimeError('bug')\n"
        check.write_text(check.read_text() + crash)

    said = str(await _trial_of_a_broken_copy(tmp_path, monkeypatch, crashing_check))
    assert said.startswith("the installed code failed its trial run"), said
    assert "RuntimeError" in said


async def test_the_trial_run_yields_the_cpu_to_the_running_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trial imports the whole package and runs `check` beside workers
    relaying calls: niced (TRIAL_NICE), it waits for what they leave of the
    CPU (the jitter audit of session 23: at the running workers' priority it
    took their calls' frames up to 0.3 s late on a busy host). The copy says
    its niceness as the package is imported, then fails to import."""

    def say_nice_then_break(package: Path) -> None:
        init = package / "__init__.py"
        init.write_text(
            init.read_text()
            + "\nimport os\nprint(f'NICE={os.getpriority(os.PRIO_PROCESS, 0)}', flush=True)\n"
            + "raise ImportError('planted')\n"
        )

    said = str(await _trial_of_a_broken_copy(tmp_path, monkeypatch, say_nice_then_break))
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert f"NICE={min(19, ours + upgrade.TRIAL_NICE)}" in said, said


async def test_checks_problems_are_shown_before_its_warnings_run_out_the_lines(
    tmp_path: Path,
) -> None:
    """check prints its warnings after its problems; with more than the lines the
    refusal shows, the problem itself was cut off: `upgrade` said "does not pass
    check" followed by warnings and "check failed: 1 problem(s)" only."""
    config = tmp_path / "ingress.toml"
    config.write_text(
        "[retry]\nretry_on = [429]\n"
        "[timeouts]\nconnect = 3000\nresponse = 5000\nrequest = 1000\nqueue = 100\n"
        "drain = 900\n"
        "[fleets]\nverify = false\ncheck_interval = 100\ncheck_timeout = 200\n"
        'file = "no-such-fleets.txt"\n'
    )
    from fleet_ingress.config.check import WARNING, check_configuration

    lines = check_configuration(config)
    problems = [line for line in lines if not line.startswith(WARNING)]
    assert len(lines) - len(problems) >= upgrade.TRIAL_OUTPUT_LINES  # the case at hand
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    said = str(failed.value)
    for problem in problems:  # the fleets file, tls.cert and tls.key
        assert problem in said, said
    assert "check failed: 3 problem(s)" in said


async def _home_whose_renewal_cannot_serve(tls_files: TLSFiles, home: Path, how: str) -> Path:
    """A configuration `check` passes but for the certificate on disk: a renewal
    whose key is another certificate's ("key"), or written intermediate first
    ("order"): what certbot's live/ files are after a renewal gone wrong."""
    await write_run_home(tls_files, home, ["https://127.0.0.1:9 name=a"])
    if how == "key":
        other = tls_files.ca.issue_cert("localhost")
        (home / "key.pem").write_bytes(other.private_key_pem.bytes())
    else:
        pems = (home / "cert.pem").read_bytes()
        leaf = tls_files.ca.create_child_ca().issue_cert("127.0.0.1", "localhost")
        (home / "cert.pem").write_bytes(b"".join(b.bytes() for b in reversed(leaf.cert_chain_pems)))
        (home / "key.pem").write_bytes(leaf.private_key_pem.bytes())
        assert pems != (home / "cert.pem").read_bytes()
    return home / "ingress.toml"


@pytest.mark.parametrize("how", ["key", "order"])
async def test_an_upgrade_refused_for_the_certificate_on_disk_does_not_say_a_restart_fails(
    tls_files: TLSFiles, tmp_path: Path, how: str
) -> None:
    """A renewal that cannot serve (certbot's deploy hook failed: its reload was
    refused) fails the trial's `check`, so the upgrade is refused. It said "Until
    then a restart would start the installed code and fail the same way": false
    for the certificate alone, which the unit's `check --before-start` leaves to
    the start and which a restart serves on the one in use over (systemd keeps
    it; the renewal audit of session 38). An operator told so held off a restart
    that works, or, believing the service could not start, went to roll back a
    sound release. Now the refusal says what a restart and a stop then a start
    each do, and to put a good certificate in place and reload."""
    config = await _home_whose_renewal_cannot_serve(tls_files, tmp_path, how)
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    said = str(failed.value)
    assert failed.value.cause == "files"
    assert "tls.cert" in said  # check's own words, naming the files
    assert "fail the same way" not in said, said
    assert "a restart serves on the certificate in use" in said, said
    assert "a stop then a start" in said and "put a good certificate in place" in said, said
    assert "then run `fleet-ingress upgrade` again" in said


async def test_an_upgrade_refused_for_the_configuration_still_says_a_restart_fails(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """The certificate fine, a key misspelt: a restart would fail the same way."""
    config = await _home_whose_renewal_cannot_serve(tls_files, tmp_path, "key")
    write_leaf_cert(tls_files.ca, tmp_path)  # a good certificate again
    config.write_text(config.read_text().replace("drain = 30", "drian = 30"))
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    said = str(failed.value)
    assert "timeouts.drian" in said and "fail the same way" in said, said
    assert "certificate in use" not in said, said


# Releases by commit: main when this was written (session 44's 2 KiB call
# tables), and the one before the call tables (4e868f6c added them).
_RELEASES = {"session 44": "e638102c", "before the tables": "4e868f6c^"}


def _release_src(tmp_path: Path, commit: str) -> Path | None:
    """`git archive` of `commit`'s src in `tmp_path`; None without git history."""
    import subprocess

    repo = Path(fleet_ingress.__file__).resolve().parents[2]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", commit, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        return None
    tree = tmp_path / commit.replace("^", "-parent")
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree / "src"


@pytest.mark.parametrize("installed", ["this", "session 44", "before the tables"])
async def test_the_trial_says_which_call_tables_the_installed_code_reads(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed: str
) -> None:
    """An exec hands over only the workers' call tables the installed code
    reads (`net.call_table_map.handed_over`): the trial says their record
    sizes. A release before the tables (a downgrade) says none: handed over
    anyway, it kept them open and inheritable for good, read by nothing.
    The older releases are `git archive`s of their commits, run as the
    installed code (PYTHONPATH)."""
    (tmp_path / "home").mkdir()
    await write_run_home(tls_files, tmp_path / "home", ["https://127.0.0.1:9 name=a"])
    if installed != "this":
        src = await asyncio.to_thread(_release_src, tmp_path, _RELEASES[installed])
        if src is None:
            pytest.skip("no git history here to archive an older release from")
        monkeypatch.setenv("PYTHONPATH", str(src))
    passed = await upgrade.trial_run(tmp_path / "home" / "ingress.toml", timeout=60)
    assert (
        passed.table_sizes
        == {
            "this": {1024, 2048},
            "session 44": {2048},
            "before the tables": set(),
        }[installed]
    )
