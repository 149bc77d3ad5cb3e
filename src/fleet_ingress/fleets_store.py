"""Live fleet changes as edits of the fleets file's text.

An edit keeps the operator's comments and layout: adding appends a line,
removing drops the one line that names the fleet, and an admin state change
rewrites only that line's `admin=` option. `write_atomically` (from `atomic`)
then replaces the file, keeping the old one as `NAME.bak`.
"""

from __future__ import annotations

from collections.abc import Callable

from .fleets_file import (
    Admin,
    FleetsFileError,
    FleetSpec,
    admin_token,
    format_fleets_text,
    parse_fleets_text,
)


def text_with_fleet(text: str, spec: FleetSpec, *, default_maxconn: int) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + format_fleets_text([spec], default_maxconn=default_maxconn)


def text_without_fleet(text: str, name: str, *, default_maxconn: int) -> str:
    return _edit_fleet_line(text, name, lambda line: "", default_maxconn=default_maxconn)


def text_with_admin_state(text: str, name: str, admin: Admin, *, default_maxconn: int) -> str:
    """The fleet's line with `admin=` set to `admin` (none for READY); the rest as it was."""

    def edit(line: str) -> str:
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        code, hash_, comment = body.partition("#")
        indent = code[: len(code) - len(code.lstrip())]
        tokens = [t for t in code.split() if not t.startswith("admin=")]
        if admin is not Admin.READY:
            tokens.append(admin_token(admin))
        gap = code[len(code.rstrip()) :] or (" " if hash_ else "")  # before a comment
        return indent + " ".join(tokens) + gap + hash_ + comment + ending

    return _edit_fleet_line(text, name, edit, default_maxconn=default_maxconn)


def _edit_fleet_line(
    text: str, name: str, edit: Callable[[str], str], *, default_maxconn: int
) -> str:
    """`text` with the one line that names fleet `name` replaced by `edit(line)`."""
    out: list[str] = []
    found = 0
    for line in text.splitlines(keepends=True):
        specs = parse_fleets_text(line, default_maxconn=default_maxconn)
        if specs and specs[0].name == name:
            found += 1
            line = edit(line)
        out.append(line)
    if found != 1:
        raise FleetsFileError(f"fleets file names {name!r} {found} times, expected once")
    return "".join(out)
