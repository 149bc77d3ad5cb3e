"""The homes the tests start `fleet-ingress run` in (support.run_home): under
pytest's base temp, and removed with what still runs from them when a test
ends without its `finish` (failed or timed out first): /tmp/fi-run-* homes,
and their processes, were left by every such test (the review of session 42)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import RunHomes, run_home


def test_a_tests_run_home_is_under_pytests_base_temp(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = run_home()  # conftest's autouse fixture removes it after
    assert home.is_dir() and home.parent == tmp_path_factory.getbasetemp()
    assert home in RunHomes.made


def test_a_home_left_by_a_failed_test_is_removed_and_what_runs_from_it_killed(
    tmp_path: Path,
) -> None:
    started: subprocess.Popen[bytes] | None = None
    outside = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "ingress.toml")]
    )
    try:
        with pytest.raises(AssertionError), RunHomes.of_one_test(tmp_path):
            home = run_home()
            (home / "ingress.toml").write_text("")
            started = subprocess.Popen(
                # Named as a supervisor is: by its config's path in the home.
                [sys.executable, "-c", "import time; time.sleep(60)", str(home / "ingress.toml")]
            )
            raise AssertionError("the test failed before its finish")
        assert started is not None and started.wait(timeout=10) == -9
        assert not home.exists() and home.parent == tmp_path
        assert outside.poll() is None  # another home's process (its path is not in it)
    finally:
        outside.kill()
        outside.wait()
        if started is not None and started.poll() is None:
            started.kill()
            started.wait()
