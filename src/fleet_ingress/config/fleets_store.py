"""Live fleet changes as edits of the fleets file's text.

An edit keeps the operator's comments and layout: adding appends a line,
removing drops the one line that names the fleet, and an admin state change
rewrites only that line's `admin=` option. `write_atomically` (from `atomic`)
then replaces the file, keeping the old one as `NAME.bak`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fleet_ingress.config.fleets_file import (
    Admin,
    FleetsFileError,
    FleetSpec,
    admin_token,
    format_fleets_text,
    parse_fleets_text,
)


class FleetNotListed(FleetsFileError):
    """The fleets file has no line for the fleet (edited since the last reload)."""


def text_with_fleet(text: str, spec: FleetSpec, *, default_maxconn: int | None) -> str:
    """`text` with `spec`'s line appended; `default_maxconn` None: its maxconn
    written even at the default (an operator who gave it pinned it)."""
    if text and not text.endswith("\n"):
        text += "\n"
    return text + format_fleets_text([spec], default_maxconn=default_maxconn)


def maxconn_pinned(text: str, name: str) -> bool:
    """Whether the line of fleet `name` in `text` (a valid fleets file) gives
    `maxconn=`: pinned there, even at the default, rather than following
    `fleets.maxconn`."""
    # Read with a default no line can give (maxconn=N has N >= 1).
    return any(s.name == name and s.maxconn for s in parse_fleets_text(text, default_maxconn=0))


def text_without_fleet(
    text: str, name: str, *, default_maxconn: int, source: str = "fleets file"
) -> str:
    return _edit_fleet_line(text, name, lambda line: "", default_maxconn, source)


def text_with_admin_state(
    text: str, name: str, admin: Admin, *, default_maxconn: int, source: str = "fleets file"
) -> str:
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

    return _edit_fleet_line(text, name, edit, default_maxconn, source)


def _edit_fleet_line(
    text: str, name: str, edit: Callable[[str], str], default_maxconn: int, source: str
) -> str:
    """`text` with the line that names fleet `name` replaced by `edit(line)`.

    The whole text is checked first, so that an error names the line it is on;
    a valid text names each fleet at most once."""
    parse_fleets_text(text, default_maxconn=default_maxconn, source=source)
    out: list[str] = []
    found = False
    # Lines as parse_fleets_text counts them (LINE_END), each with its end.
    for line in re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z", text):
        specs = parse_fleets_text(line, default_maxconn=default_maxconn)
        if specs and specs[0].name == name:
            found = True
            line = edit(line)
        out.append(line)
    if not found:
        raise FleetNotListed(
            f"{source} has no line for fleet {name!r} (edited since the last reload?); "
            f"run `systemctl reload fleet-ingress` to apply the file, or add the fleet's "
            f"line back (URL name={name})"
        )
    return "".join(out)
