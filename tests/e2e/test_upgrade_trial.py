"""The upgrade's trial run: the installed code, run as the re-executed
supervisor will run it, before anything is handed over (service/upgrade.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_ingress.service import upgrade


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


async def test_the_same_release_passes_the_format_check_and_reaches_check(tmp_path: Path) -> None:
    config = tmp_path / "ingress.toml"
    config.write_text("[listen]\nnot_a_key = 1\n")
    with pytest.raises(upgrade.TrialFailed) as failed:
        await upgrade.trial_run(config, timeout=60)
    said = str(failed.value)
    assert "not_a_key" in said  # `check` ran and named the bad key
    assert "format" not in said
