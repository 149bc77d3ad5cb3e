"""What a process of `fleet-ingress` pays at its start, before it does anything:
each worker (a replacement after a crash, an upgrade's new generation), the
supervisor and every CLI command. Counts, not times: which modules are imported
and how often the garbage collector passed while they were."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _start(words: list[str], cwd: Path) -> tuple[int, int, bool]:
    """`fleet-ingress WORDS` as the console script runs it, in a new Python:
    its exit code, the garbage collector's passes (every generation's) while
    it ran, and whether the collector was on again then."""
    code = (
        "import gc, json, sys\n"
        "from fleet_ingress.entry import main\n"
        "before = sum(g['collections'] for g in gc.get_stats())\n"
        f"code = main({words!r})\n"
        "passes = sum(g['collections'] for g in gc.get_stats()) - before\n"
        "print(json.dumps([code, passes, gc.isenabled()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    env.pop("NOTIFY_SOCKET", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout, out.stderr
    answer = json.loads(out.stdout.splitlines()[-1])
    return answer[0], answer[1], answer[2]


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "ingress.toml"
    path.write_text('[listen]\nadmin_socket = "admin.sock"\n\n[log]\nformat = "json"\n')
    return path


def test_a_worker_imports_what_it_serves_without_the_collector_passing(
    tmp_path: Path,
) -> None:
    """A worker started outside `run` stops at its first step after its
    imports and configuration (it holds no listeners): the garbage collector
    did not pass while it imported the whole data plane, and is on again when
    it ends (then one pass over what the start left). Before session 50 it
    passed about 120 times (9 % of the import's CPU)."""
    config = _config(tmp_path)
    code, passes, enabled = _start(["worker", "-c", str(config), "--generation", "1"], tmp_path)
    assert code == 2  # "a worker runs under `fleet-ingress run`"
    assert passes <= 1  # the one its objects get once the collector is on again
    assert enabled


def test_an_admin_command_reads_its_configuration_without_the_collector_passing(
    tmp_path: Path,
) -> None:
    """`stat -c CONFIG` with no ingress to ask: its imports (pydantic, aiohttp)
    and the configuration read without a pass of the collector, which is on
    again for the command itself (the socket refused: exit 1 or 2)."""
    config = _config(tmp_path)
    code, passes, enabled = _start(["stat", "-c", str(config)], tmp_path)
    assert code != 0
    assert passes <= 1
    assert enabled


@pytest.fixture
def collector_on():  # type: ignore[no-untyped-def]
    """The collector on, and nothing held, before and after (this process's)."""
    from fleet_ingress.service import start_collector

    was = gc.isenabled()
    gc.enable()
    start_collector.collector_back_on()
    yield
    start_collector.collector_back_on()
    if was:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_on_again_only_if_the_start_turned_it_off(collector_on: None) -> None:
    from fleet_ingress.service import start_collector

    start_collector.start_without_collector()
    assert not gc.isenabled()
    start_collector.start_without_collector()  # once only
    start_collector.collector_back_on()
    assert gc.isenabled()
    # Off already when the start came (as over an upgrade's exec, whose own
    # `gc.enable()` ends it): left off.
    gc.disable()
    start_collector.start_without_collector()
    start_collector.collector_back_on()
    assert not gc.isenabled()


def test_a_worker_reads_its_words_without_the_cli_parser(tmp_path: Path) -> None:
    """The words the supervisor writes (`worker_pool`) are read without the
    parser of every command (8 ms of each worker's start): with that parser
    made to fail, the worker still gets to its first step (no listeners: 2)."""
    config = _config(tmp_path)
    code = (
        "import sys\n"
        "import fleet_ingress.cli as cli\n"
        "def refused(*args, **kwargs):\n"
        "    raise SystemExit(99)\n"
        "cli._build_parser = refused\n"
        "from fleet_ingress.entry import main\n"
        f"sys.exit(main(['worker', '-c', {str(config)!r}, '--generation', '3']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_INGRESS_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert b"a worker runs under `fleet-ingress run`" in done.stderr


@pytest.mark.parametrize(
    ("words", "read"),
    [
        (["worker", "-c", "/etc/i.toml", "--generation", "2"], ("/etc/i.toml", 2, None)),
        (["worker", "-c", "i.toml", "--generation", "1", "--cpu", "3"], ("i.toml", 1, 3)),
        # Everything else is the CLI's to answer (or refuse), as before.
        (["worker", "-c", "i.toml"], None),
        (["worker", "--config", "i.toml", "--generation", "1"], None),
        (["worker", "--generation", "1", "-c", "i.toml"], None),
        (["worker", "-c", "i.toml", "--generation", "one"], None),
        (["worker", "-c", "i.toml", "--generation", "1", "--cpu", "x"], None),
        (["worker", "-c", "i.toml", "--generation", "1", "--cpus", "1"], None),
        (["worker", "-c", "-h", "--generation", "1"], None),
        (["worker", "-c", "", "--generation", "1"], None),
        (["run", "-c", "i.toml", "--generation", "1"], None),
        (["worker", "-c", "i.toml", "--generation", "1", "-h"], None),
        ([], None),
    ],
)
def test_worker_words(words: list[str], read: tuple[str, int, int | None] | None) -> None:
    from fleet_ingress.entry import worker_words

    assert worker_words(words) == read
