import re

import pytest

from fleet_ingress.core.addresses import (
    OtherIPv4Spelling,
    UnbracketedIPv6,
    format_hostport,
    ip_literal_version,
    ipv4_as_resolvers_read,
    parse_hostport,
    peer_ip,
    same_host_key,
    split_hostport,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),  # any free port: tests and the demo bind this
        ("localhost:8404", ("localhost", 8404)),
        ("fleet_1.internal:65535", ("fleet_1.internal", 65535)),
        ("[::1]:8404", ("::1", 8404)),
        ("[::]:443", ("::", 443)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("[fe80::1%2]:80", ("fe80::1%2", 80)),  # an interface's index
        ("[fe80::1%br+lan.10]:80", ("fe80::1%br+lan.10", 80)),  # any name Linux takes
        # One spelling per address: [::0] is the wildcard, [0:0::1] is ::1.
        ("[::0]:443", ("::", 443)),
        ("[0:0:0:0:0:0:0:0]:443", ("::", 443)),
        ("[0:0::0001]:8443", ("::1", 8443)),
        ("[2001:DB8::A]:8443", ("2001:db8::a", 8443)),
        ("[::FFFF:127.0.0.1]:8443", ("::ffff:127.0.0.1", 8443)),
        ("[::ffff:7f00:1]:8443", ("::ffff:127.0.0.1", 8443)),
    ],
)
def test_parse_good(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, what="listen address") == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0.0.0.0", "has no port"),
        ("[::1]", "has no port"),
        ("", "has an empty host"),
        (":443", "has an empty host"),
        ("host:", "no port after it"),
        ("host:65536", "a port is a number from 1 to 65535"),
        ("host:+80", "a port is a number"),
        ("host: 80", "a port is a number"),
        ("host:http", "a port is a number"),
        ("::1:443", "IPv6 address without brackets"),
        ("[::1:443", "without a closing ']'"),
        ("[::1]443", "after the ']'"),
        ("[nothex]:443", "not an IPv6 address"),
        ("a..b:443", "not a host name"),
        ("-host:443", "not a host name"),
        ("bad host:443", "not a host name"),
        ("1.2.3.999:443", "not a valid IPv4 address"),
        # A zone is an interface's name (a default fleet name, shown in a terminal).
        ("[fe80::1%a:b]:443", "not an interface's name or index"),
        ("[fe80::1%a b]:443", "no '/', ':' or space"),
        ("[fe80::1%\x1b[2J]:443", "has zone '\\x1b[2J'"),
        ("[fe80::1%interface-name-16]:443", "at most 15"),
    ],
)
def test_parse_bad_names_what_text_and_fix(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_hostport(text, what="stats address")
    message = str(caught.value)
    assert message.startswith(f"stats address {text!r} ")
    assert problem in message
    assert "write it as HOST:PORT or [IPv6]:PORT" in message


def test_split_reports_absent_port_as_none() -> None:
    assert split_hostport("fleet1.example.com") == ("fleet1.example.com", None)
    assert split_hostport("[2001:db8::1]") == ("2001:db8::1", None)


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("0.0.0.0", 443, "0.0.0.0:443"),
        ("::1", 8404, "[::1]:8404"),
        ("fleet1.example.com", None, "fleet1.example.com"),
        ("2001:db8::1", None, "[2001:db8::1]"),
    ],
)
def test_format_round_trips(host: str, port: int | None, text: str) -> None:
    assert format_hostport(host, port) == text
    assert split_hostport(text) == (host, port)


@pytest.mark.parametrize(
    ("host", "version"),
    [
        ("127.0.0.1", 4),
        ("10.0.0.7", 4),
        ("::1", 6),
        ("2001:db8::1", 6),
        ("fe80::1%eth0", None),  # scoped: the interface's index is looked up
        ("fleet1.example.com", None),
        ("localhost", None),
        ("127.1", None),  # inet_aton's shorthand: left to getaddrinfo
    ],
)
def test_ip_literal_version_answers_literals_and_leaves_names_to_a_lookup(
    host: str, version: int | None
) -> None:
    assert ip_literal_version(host) == version


@pytest.mark.parametrize(
    ("peer", "written"),
    [
        ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client of a dual-stack listener
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("::ffff:0:1", "::ffff:0:1"),  # not a mapped IPv4 address
    ],
)
def test_a_peer_is_written_as_the_family_it_came_from(peer: str, written: str) -> None:
    assert peer_ip(peer) == written


# Spellings of IPv4 addresses the C library's resolver takes (inet_aton, which
# getaddrinfo tries before any lookup), and text it does not.
_IPV4_SPELLINGS = [
    "127.0.0.1",
    "0x7f.0.0.1",
    "0X7F.0.0.1",
    "0x7f.1",
    "0x7f000001",
    "0177.0.0.1",
    "127.000.0.1",
    "127.010.0.1",  # octal: 127.8.0.1
    "127.1",
    "127.0.1",
    "127.65535",
    "2130706433",
    "4294967295",
    "0",
    "00",
    "4294967296",
    "127.0.65536",
    "0x100.0.0.1",
    "08.0.0.1",
    "0x.0.0.1",
    "0x",
    "1.2.3.4.5",
    "1..1",
    ".1",
    "",
    "fleet",
    "a.b",
    "0xg.0.0.1",
    "fleet1.example.com",
]


@pytest.mark.parametrize("host", _IPV4_SPELLINGS)
def test_ipv4_as_resolvers_read_is_what_inet_aton_reads(host: str) -> None:
    import socket

    try:
        expected: str | None = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        expected = None
    assert ipv4_as_resolvers_read(host) == expected
    assert same_host_key(host) == (expected or host)


@pytest.mark.parametrize(
    ("text", "message", "address"),
    [
        ("127.1:443", "has '127.1', which resolvers read as the IPv4 address 127.0.0.1", None),
        (
            "127.000.0.1",
            "which resolvers read as the IPv4 address 127.0.0.1 (a part with a leading 0 is octal)",
            "127.0.0.1",
        ),
        ("127.010.0.1", "the IPv4 address 127.8.0.1 (a part with a leading 0 is octal)", None),
    ],
)
def test_an_ipv4_address_in_another_spelling_names_the_one_resolvers_read(
    text: str, message: str, address: str | None
) -> None:
    with pytest.raises(OtherIPv4Spelling, match=re.escape(message)) as caught:
        split_hostport(text)
    if address is not None:
        assert caught.value.address == address


@pytest.mark.parametrize(
    ("text", "forms"),
    [
        ("::1:18443", [("::1", 18443)]),  # 18443 is no IPv6 group: a port
        ("::1", [("::1", None)]),
        ("fe80::1:8443", [("fe80::1", 8443), ("fe80::1:8443", None)]),  # either
        ("fe80::1%eth0:8443", [("fe80::1%eth0", 8443)]),  # a zone has no ':'
        ("1:2:3", []),
    ],
)
def test_an_ipv6_address_without_brackets_says_what_it_can_have_meant(
    text: str, forms: list[tuple[str, int | None]]
) -> None:
    with pytest.raises(UnbracketedIPv6, match="is an IPv6 address without brackets") as caught:
        split_hostport(text)
    assert caught.value.forms == forms
