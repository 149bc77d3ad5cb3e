"""The `fleet-ingress` console script: keepalived's track script,
`fleet-ingress check -c CONFIG --live`, each second on each host of a pair,
without the CLI's imports; a worker's words as the supervisor writes them
without the CLI's parser; every other command goes to `cli.main` as it is.

Only the words `init --vip` writes are taken here (`check`, `-c`/`--config`
with the path, `--live`, in any order after `check`): anything else, help
included, goes to the CLI, which answers the same for them, only slower.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def live_config(words: Sequence[str]) -> str | None:
    """The config path when `words` (argv after the program) ask only `check
    --live` with a config; None otherwise. Pure."""
    if not words or words[0] != "check":
        return None
    config: str | None = None
    live = False
    rest = list(words[1:])
    while rest:
        word = rest.pop(0)
        if word == "--live" and not live:
            live = True
        elif word in ("-c", "--config") and config is None and rest:
            config = rest.pop(0)
            if not config or config.startswith("-"):
                return None  # as argparse takes it, or refuses it: the CLI's to say
        elif word.startswith("--config=") and config is None and len(word) > 9:
            config = word[9:]
        else:
            return None
    return config if live else None


def worker_words(words: Sequence[str]) -> tuple[str, int, int | None] | None:
    """The config path, generation and CPU of `worker -c CONFIG --generation N
    [--cpu C]` as the supervisor writes them (`service.worker_pool`); None for
    any other words, which the CLI reads (and answers the same, after building
    its parser of every command: 8 ms of each worker's start). Pure."""
    if len(words) not in (5, 7) or list(words[:2]) != ["worker", "-c"]:
        return None
    if words[3] != "--generation" or (len(words) == 7 and words[5] != "--cpu"):
        return None
    config = words[2]
    if not config or config.startswith("-"):
        return None  # as argparse takes it, or refuses it: the CLI's to say
    try:
        generation = int(words[4])
        cpu = int(words[6]) if len(words) == 7 else None
    except ValueError:
        return None
    return config, generation, cpu


def main(words: Sequence[str] | None = None) -> int:
    """The console script's (`fleet-ingress`) and `python -m fleet_ingress`'s."""
    words = sys.argv[1:] if words is None else list(words)
    config = live_config(words)
    if config is not None:
        from fleet_ingress.ops.live_check import run_live_check

        return run_live_check(config)
    from fleet_ingress.service.start_collector import collector_back_on, start_without_collector

    start_without_collector()  # on again once the command's start is done
    try:
        from fleet_ingress.service.process_start import first_steps

        first_steps(words[0] if words else "")  # before the CLI's imports, on purpose

        if (worker := worker_words(words)) is not None:
            from pathlib import Path

            from fleet_ingress.cli import run_worker_command

            return run_worker_command(Path(worker[0]), worker[1], worker[2])

        from fleet_ingress.cli import main as cli_main

        return cli_main(words)
    finally:
        collector_back_on()  # a command that ended before (a refused one, --help)
