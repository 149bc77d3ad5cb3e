"""The line of a configuration key, found from the file's text (config.key_lines)."""

import pytest

from fleet_ingress.config.key_lines import key_line

TEXT = '''\
# a comment: maxconn = 1
top = 1
fleets.maxconn = 8

[Listen]
wss = "0.0.0.0:443"  # [fleets] in a comment
"stats" = '127.0.0.1:8404'

[routes]
proxy = [
  "/ws/",
  "/exotel/",
]
notes = """
check_interval = 5
[timeouts]
"""
[ routes . carrier_silence ]
"/exotel/" = 60

[fleets]
check_interval = 2.0
timeouts.connect = 3
inline = { fall = 3, rise = 2 }
'''


def test_tables_dotted_and_quoted_keys_are_found_on_their_lines() -> None:
    assert key_line(TEXT, ("top",)) == 2
    assert key_line(TEXT, ("fleets", "maxconn")) == 3  # a dotted key at the top
    assert key_line(TEXT, ("listen",)) == 5  # the header; a section read in any case
    assert key_line(TEXT, ("listen", "wss")) == 6
    assert key_line(TEXT, ("listen", "stats")) == 7  # quoted
    assert key_line(TEXT, ("routes", "proxy", 1)) == 10  # an item: its key's line
    assert key_line(TEXT, ("routes", "carrier_silence", "/exotel/")) == 19
    assert key_line(TEXT, ("routes", "carrier_silence")) == 18
    # Inside the multi-line string: no key, no header.
    assert key_line(TEXT, ("fleets", "check_interval")) == 22
    assert key_line(TEXT, ("timeouts",)) is None
    assert key_line(TEXT, ("fleets", "timeouts", "connect")) == 23  # below [fleets]
    assert key_line(TEXT, ("fleets", "inline", "fall")) == 24  # an inline table's key
    assert key_line(TEXT, ("log", "level")) is None
    assert key_line(TEXT, ("fleets", "rise")) == 3  # unwritten: its section's first line


def test_text_it_cannot_read_ends_the_search_without_an_error() -> None:
    text = '[fleets]\nmaxconn = 8\nthis is not toml\nfall = 3\n"open = 1\n'
    assert key_line(text, ("fleets", "maxconn")) == 2
    assert key_line(text, ("fleets", "fall")) == 1
    assert key_line('a = "x\\"y" # "\nb = 2\n', ("b",)) == 2
    assert key_line("a = '''x\n'''''\nb = 2\n", ("b",)) == 3


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_only_a_newline_ends_a_line_as_toml_counts_them(separator: str) -> None:
    """TOML ends a line at LF (CRLF) only: U+2028, U+2029 and U+0085 are
    characters a comment or a string may hold (pasted from a web page), and
    tomllib's own line numbers count none of them. str.splitlines() ended a
    line at each: every key below was named one line too low, and a comment's
    rest could pass for a key."""
    text = f"# copied from the wiki:{separator}\n[fleets]\nmaxconn = 0\n"
    assert key_line(text, ("fleets", "maxconn")) == 3
    text = f'[routes]\nnotes = "a{separator}b"\n[fleets]\nmaxconn = 0\n'
    assert key_line(text, ("fleets", "maxconn")) == 4
    text = f"# see{separator}maxconn = 1\n[fleets]\r\nmaxconn = 0\r\n"
    assert key_line(text, ("maxconn",)) is None
    assert key_line(text, ("fleets", "maxconn")) == 3
