"""Where a key of the configuration file is written: its line, found from the
file's text alone (no I/O), so that a problem names the line as the fleets
file's problems do. `[section]` and `[section.sub]` headers, dotted keys
(`fleets.maxconn = 8`, at the top or under a header) and quoted keys are
followed; a multi-line string or array is passed over, so a line inside one
never passes for a key. Section names are matched without regard to case, as
they are read; keys as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPE = re.compile(r"\\(u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)")
_SIMPLE_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """{key path: its line (from 1)} for every table header and key of `text`,
    the first section name of a path in lower case. Stops quietly at what it
    cannot read (the file's syntax errors are tomllib's to report)."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    scanner = _Scanner()
    # Split at LF alone, as TOML and tomllib count lines: str.splitlines() also
    # ends one at U+2028, U+2029 and U+0085, which a comment or string may hold.
    for lineno, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = line.removesuffix("\r")
        if scanner.continues:  # inside a multi-line string or array: no key here
            scanner.scan(line)
            continue
        rest = line.lstrip()
        if not rest or rest.startswith("#"):
            continue
        try:
            if rest.startswith("["):
                double = rest.startswith("[[")
                path, rest = _key(rest[2 if double else 1 :])
                rest = rest.lstrip()
                if not rest.startswith("]]" if double else "]"):
                    return lines
                table = _normal(path)
                lines.setdefault(table, lineno)
                continue
            path, rest = _key(rest)
        except ValueError:
            return lines
        rest = rest.lstrip()
        if not rest.startswith("="):
            return lines
        full = _normal(table + path)
        for depth in range(len(table) + 1, len(full) + 1):  # `a.b = 1` defines a.b too
            lines.setdefault(full[:depth], lineno)
        scanner.scan(rest[1:])
    return lines


def key_line(text: str, loc: Sequence[str | int]) -> int | None:
    """The line of the key at `loc` (a pydantic error's location: list
    indexes and deeper keys are taken as the key that holds them), or None
    when the file does not write it."""
    found = key_lines(text)
    path = tuple(str(part) for part in loc if not isinstance(part, int))
    path = _normal(path)
    while path:
        if path in found:
            return found[path]
        path = path[:-1]
    return None


def _normal(path: tuple[str, ...]) -> tuple[str, ...]:
    return (path[0].lower(), *path[1:]) if path else path


def _key(text: str) -> tuple[tuple[str, ...], str]:
    """A dotted key at the start of `text` and what follows it."""
    parts = []
    while True:
        text = text.lstrip(" \t")
        if text[:1] == '"':
            end = _basic_end(text, 1)
            parts.append(_ESCAPE.sub(_unescape, text[1:end]))
            text = text[end + 1 :]
        elif text[:1] == "'":
            end = text.index("'", 1)
            parts.append(text[1:end])
            text = text[end + 1 :]
        elif match := _BARE.match(text):
            parts.append(match.group())
            text = text[match.end() :]
        else:
            raise ValueError("no key")
        text = text.lstrip(" \t")
        if not text.startswith("."):
            return tuple(parts), text
        text = text[1:]


def _basic_end(text: str, start: int) -> int:
    """The index of the '"' closing a basic string opened before `start`."""
    at = start
    while True:
        at = text.index('"', at)
        backslashes = len(text[:at]) - len(text[:at].rstrip("\\"))
        if backslashes % 2 == 0:
            return at
        at += 1


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] in "uU":
        return chr(int(code[1:], 16))
    return _SIMPLE_ESCAPES.get(code, code)


class _Scanner:
    """Follows a value across lines: the multi-line string it is in, if any,
    and how many arrays or inline tables are open."""

    def __init__(self) -> None:
        self.string: str | None = None  # '"""' or "'''" while inside one
        self.depth = 0

    @property
    def continues(self) -> bool:
        return self.string is not None or self.depth > 0

    def scan(self, line: str) -> None:
        at = 0
        while at < len(line):
            if self.string is not None:
                end = self._multi_end(line, at)
                if end < 0:
                    return
                at, self.string = end, None
                continue
            char = line[at]
            if char == "#":
                return
            if line.startswith(('"""', "'''"), at):
                self.string, at = line[at : at + 3], at + 3
            elif char == '"':
                try:
                    at = _basic_end(line, at + 1) + 1
                except ValueError:  # unclosed: tomllib says so
                    return
            elif char == "'":
                end = line.find("'", at + 1)
                at = end + 1 if end >= 0 else len(line)
            else:
                if char in "[{":
                    self.depth += 1
                elif char in "]}":
                    self.depth = max(0, self.depth - 1)
                at += 1

    def _multi_end(self, line: str, at: int) -> int:
        """The index past the closing quotes of the open multi-line string, or -1."""
        quote = self.string
        assert quote is not None
        while True:
            found = line.find(quote, at)
            if found < 0:
                return -1
            if quote == '"""':
                backslashes = len(line[:found]) - len(line[:found].rstrip("\\"))
                if backslashes % 2:
                    at = found + 1
                    continue
            end = found + 3
            while end < len(line) and line[end] == quote[0] and end - found < 5:
                end += 1  # up to two quotes of the string's own before its close
            return end
