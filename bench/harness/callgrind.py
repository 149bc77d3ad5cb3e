"""valgrind's callgrind for the counting scripts: its command line, and its files read.

``callgrind_annotate`` prints one row a function, ``2,345,678 (12.34%)  file:function
[/path/lib.so]``; :func:`rows` reads those (and ``PROGRAM TOTALS``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_ROW = re.compile(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$")


def argv(out_file: Path | str, *options: str) -> list[str]:
    """``valgrind --tool=callgrind`` writing to ``out_file`` (``%p``: the pid), before
    the command to count."""
    return ["valgrind", "--tool=callgrind", *options, f"--callgrind-out-file={out_file}"]


def annotate(path: Path, *, inclusive: bool, auto: bool = True) -> str:
    """``callgrind_annotate``'s text of one file: each function's inclusive or own
    (exclusive) instructions, every function (threshold 100 %); ``auto=False``: no
    annotated source after the rows."""
    options = [f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100"]
    options += [] if auto else ["--auto=no"]
    return subprocess.run(
        ["callgrind_annotate", *options, str(path)], capture_output=True, text=True, check=True
    ).stdout


def rows(text: str) -> list[tuple[int, str]]:
    """(instructions, function) of each row of ``annotate``'s text, in its order."""
    out = []
    for line in text.splitlines():
        if m := _ROW.match(line):
            out.append((int(m.group(1).replace(",", "")), m.group(2).strip()))
    return out


def shared_object(function: str) -> str:
    """``file:function [/path/lib.so]`` -> ``lib.so`` (``???`` when not said)."""
    return (
        function.rpartition(" [")[2].rstrip("]").rpartition("/")[2] if " [" in function else "???"
    )


def own_counts(path: Path) -> tuple[int, dict[str, int]]:
    """Instructions of one dump, and each function's own (exclusive) instructions.
    Frames already on the stack when the counters were zeroed (the loop's run,
    the interpreter's outer frames) show the window's whole cost as their own
    in callgrind_annotate: left out (half the total or more)."""
    functions: dict[str, int] = {}
    total = 0
    for n, name in rows(annotate(path, inclusive=False, auto=False)):
        if name == "PROGRAM TOTALS":
            total = n
        elif n < total / 2:
            name = re.sub(r"/tmp/python-build[^ ]*?/Python-[\d.]+/", "", name)
            functions[name] = functions.get(name, 0) + n
    return total, functions
