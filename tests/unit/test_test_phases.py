"""README's test command is what CI runs (.ci/run's last line), and its phases
take every test exactly once whatever phase marker it carries (pyproject.toml's
`pair` and `alone`): a marker no phase selects, or one two phases select, would
drop its tests from CI or run them beside tests they must not meet."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASE_MARKERS = ("pair", "alone")  # the markers that say how many run at once


def _readme_command() -> str:
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"## Run the tests\n\n```sh\n(.*?)\n```", readme, re.S)
    return command


def _phases(command: str) -> list[tuple[str, str | None]]:
    """Each pytest run's -m expression and -n count (None: one at a time)."""
    phases = []
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[1:3] != ["-m", "pytest"]:
            continue
        selected = words[words.index("-m", 3) + 1]
        workers = words[words.index("-n") + 1] if "-n" in words else None
        phases.append((selected, workers))
    return phases


def _selects(expression: str, markers: set[str]) -> bool:
    """pytest's -m grammar (names, not, and, or, parentheses) is Python's."""
    names = re.findall(r"[a-z_]+", expression)
    marks = {name: name in markers for name in names if name not in ("not", "and", "or")}
    return eval(expression, {"__builtins__": {}}, marks)


def test_ci_runs_readmes_command_last() -> None:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert lines[-1] == _readme_command()


def test_every_test_runs_in_exactly_one_phase_at_its_markers_count() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"
    ]["markers"]
    assert {line.split(":")[0] for line in declared} >= set(PHASE_MARKERS)
    phases = _phases(_readme_command())
    counts = {}
    for marked in [set(), *({m} for m in PHASE_MARKERS)]:
        taking = [workers for selected, workers in phases if _selects(selected, marked)]
        assert len(taking) == 1, (marked, phases)
        counts[frozenset(marked)] = taking[0]
    assert counts == {frozenset(): "4", frozenset({"pair"}): "2", frozenset({"alone"}): None}
