import os
import re
from pathlib import Path

import pytest

from fleet_ingress.config.fleets_file import (
    Admin,
    FleetsFileError,
    FleetSpec,
    format_fleets_text,
    load_fleets_file,
    parse_fleets_text,
    same_host_warnings,
)
from fleet_ingress.config.read_hints import PERMISSION_DENIED


def parse(text: str, default_maxconn: int = 16) -> list[FleetSpec]:
    return parse_fleets_text(text, default_maxconn=default_maxconn, source="fleets.txt")


# A link-local fleet: its zone (an interface's name) as it is written back, in
# its name and where it is connected to; not in the Host header (RFC 6874 section 4).
_ZONED = FleetSpec(
    "https://[fe80::1%25enP1s0]:8443",
    "[fe80::1%enP1s0]:8443",
    "https",
    "fe80::1%enP1s0",
    8443,
    "[fe80::1]:8443",
    16,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "https://fleet1.example.com",
            FleetSpec(
                url="https://fleet1.example.com",
                name="fleet1.example.com",
                scheme="https",
                host="fleet1.example.com",
                port=443,
                host_header="fleet1.example.com",
                maxconn=16,
            ),
        ),
        (
            "http://10.0.0.5:8080/ name=lan maxconn=32",
            FleetSpec("http://10.0.0.5:8080", "lan", "http", "10.0.0.5", 8080, "10.0.0.5:8080", 32),
        ),
        (
            "http://fleet3",
            FleetSpec("http://fleet3", "fleet3", "http", "fleet3", 80, "fleet3", 16),
        ),
        (
            # The Host header carries the port only when the URL names one.
            "https://fleet2.example.com:443",
            FleetSpec(
                "https://fleet2.example.com:443",
                "fleet2.example.com:443",
                "https",
                "fleet2.example.com",
                443,
                "fleet2.example.com:443",
                16,
            ),
        ),
        (
            "https://[2001:db8::1]:8443 maxconn=4",
            FleetSpec(
                "https://[2001:db8::1]:8443",
                "[2001:db8::1]:8443",
                "https",
                "2001:db8::1",
                8443,
                "[2001:db8::1]:8443",
                4,
            ),
        ),
        (
            # RFC 6874's form (the zone's '%' percent-encoded, as curl writes it) was
            # taken as zone '25eth0'; a zone is an interface's name, kept as it is
            # written (enP1s0 was lower-cased to a name no interface has).
            "https://[FE80::1%25enP1s0]:8443",
            _ZONED,
        ),
        ("https://[fe80::1%enP1s0]:8443", _ZONED),
        (
            "  HTTPS://Fleet4.Example.COM/   name=f4   # scaled to 32 workers maxconn=1",
            FleetSpec(
                "https://fleet4.example.com",
                "f4",
                "https",
                "fleet4.example.com",
                443,
                "fleet4.example.com",
                16,
            ),
        ),
    ],
)
def test_good_line(line: str, expected: FleetSpec) -> None:
    assert parse(line) == [expected]


def test_comments_and_blank_lines_are_skipped_but_counted() -> None:
    text = "# fleets\n\nhttps://a.example.com  # first\n   \n# https://commented.example.com\nftp://b\n"
    with pytest.raises(FleetsFileError, match=r"^fleets\.txt line 6: 'ftp://b' "):
        parse(text)
    assert [spec.name for spec in parse(text.replace("ftp://b", ""))] == ["a.example.com"]


def test_default_maxconn_applies_to_fleets_without_their_own() -> None:
    specs = parse("https://a.example.com\nhttps://b.example.com maxconn=8\n", default_maxconn=32)
    assert [spec.maxconn for spec in specs] == [32, 8]


def test_empty_text_has_no_fleets() -> None:
    assert parse("# nothing yet\n\n") == []


def test_message_names_source_line_token_and_fix() -> None:
    with pytest.raises(FleetsFileError) as caught:
        parse("https://a.example.com\n\nftp://x\n")
    assert str(caught.value) == (
        "fleets.txt line 3: 'ftp://x' is not an http:// or https:// URL; "
        "write it as https://HOST[:PORT]"
    )


@pytest.mark.parametrize(
    ("text", "token", "problem"),
    [
        ("ftp://x", "ftp://x", "is not an http:// or https:// URL"),
        ("fleet1.example.com", "fleet1.example.com", "is not an http:// or https:// URL"),
        ("https:fleet1.example.com", "https:fleet1.example.com", "is not an http:// or https://"),
        ("https://", "https://", "has an empty host"),
        ("https://:8443", "https://:8443", "has an empty host"),
        ("https://user:pw@fleet", "https://user:pw@fleet", "user name or password"),
        ("https://fleet/ws/", "https://fleet/ws/", "has a path or query"),
        ("https://fleet/?x=1", "https://fleet/?x=1", "has a path or query"),
        ("https://fleet:0", "https://fleet:0", "has port 0"),
        ("https://fleet:70000", "https://fleet:70000", "a port is a number from 1 to 65535"),
        ("https://fleet:https", "https://fleet:https", "a port is a number"),
        ("https://[::1", "https://[::1", "is not a valid URL"),
        ("https://bad_host!", "https://bad_host!", "not a host name"),
        (
            "https://fleet fast",
            "fast",
            "is not an option; the options are name=NAME, maxconn=N and admin=drain|maint",
        ),
        ("https://fleet admin=off", "admin=off", "is not an admin state; write admin=drain"),
        ("https://fleet admin=drain admin=maint", "admin=maint", "gives admin= a second time"),
        ("https://fleet mxconn=3", "mxconn=3", "is not an option"),
        (
            "https://fleet maxconn=0",
            "maxconn=0",
            "is not a valid maxconn; write maxconn=N with N >= 1",
        ),
        ("https://fleet maxconn=lots", "maxconn=lots", "is not a valid maxconn"),
        ("https://fleet maxconn=-1", "maxconn=-1", "is not a valid maxconn"),
        ("https://fleet name=", "name=", "is not a valid name"),
        ("https://fleet name=-x", "name=-x", "is not a valid name"),
        ("https://fleet name=a name=b", "name=b", "gives name= a second time"),
        (  # a name that long stretched every stat row; 8 KiB broke the admin commands
            "https://fleet name=" + "n" * 260,
            "name=" + "n" * 35 + "...",
            "is a name of 260 characters; give one of 259 at most",
        ),
        (  # a default name is the host: a zone is an interface's name, or nothing
            "https://[fe80::1%" + "z" * 16 + "]",  # (a longer name than 259 came this way)
            "https://[fe80::1%" + "z" * 16 + "]",
            "is not an interface's name or index",
        ),
        (  # terminal escapes (and text no host name can be) into stat, check, /metrics
            "https://[fe80::1%\x1b[31mRED\x1b[0m]:9",
            "https://[fe80::1%\x1b[31mRED\x1b[0m]:9",
            "has zone '\\x1b[31mRED\\x1b[0m' after fe80::1%, which is not an interface's name",
        ),
        ("https://[fe80::3%\u202etxt.exe]:9", "https://[fe80::3%\u202etxt.exe]:9", "zone"),
        ("https://a name=x\nhttps://b name=x", "name=x", "repeats the name of the fleet on line 1"),
        ("https://a\nhttps://b name=a", "name=a", "repeats the name of the fleet on line 1"),
        ("https://a\nhttp://b\nhttps://a/", "https://a/", "is already listed on line 1"),
        ("https://a\nhttps://a:443 name=a2", "https://a:443", "is already listed on line 1"),
        (
            "https://[::1]:8443\nhttps://[0:0::0001]:8443 name=b",
            "https://[0:0::0001]:8443",
            "is already listed on line 1",
        ),
    ],
)
def test_bad_line(text: str, token: str, problem: str) -> None:
    with pytest.raises(FleetsFileError) as caught:
        parse(text)
    message = str(caught.value)
    lineno = text.count("\n") + 1  # every case has its error on its last line
    assert message.startswith(f"fleets.txt line {lineno}: {token!r} ")
    assert problem in message


def test_format_round_trips_and_omits_defaults() -> None:
    text = (
        "https://fleet1.example.com\n"
        "https://fleet2.example.com name=fleet2\n"
        "http://[2001:db8::1]:8080 name=lab maxconn=32\n"
        "https://fleet3.example.com admin=drain\n"
        "https://fleet4.example.com name=four admin=maint\n"
    )
    specs = parse(text)
    assert [s.admin for s in specs] == [Admin.READY] * 3 + [Admin.DRAIN, Admin.MAINT]
    assert parse("https://f admin=Drain")[0].admin is Admin.DRAIN  # the value, any case
    assert format_fleets_text(specs, default_maxconn=16) == text
    assert parse(format_fleets_text(specs)) == specs
    # Without a default every maxconn is written, so the file alone says what each gets.
    assert format_fleets_text(specs[:1]) == "https://fleet1.example.com maxconn=16\n"


def test_load_reads_the_file_and_names_it_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "fleets.txt"
    path.write_text("https://fleet1.example.com\n")
    assert [spec.name for spec in load_fleets_file(path, default_maxconn=16)] == [
        "fleet1.example.com"
    ]
    path.write_text("https://fleet1.example.com bogus\n")
    with pytest.raises(FleetsFileError, match=f"^{re.escape(str(path))} line 1: 'bogus' "):
        load_fleets_file(path, default_maxconn=16)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(
        FleetsFileError, match=f"^{re.escape(str(missing))}: cannot read the fleets file: No such"
    ):
        load_fleets_file(missing, default_maxconn=16)


def test_each_read_error_gives_the_fix_that_fits(tmp_path: Path) -> None:
    """Every read error ended "create it with one fleet URL a line", even for a
    directory or a file that is not UTF-8."""
    missing = tmp_path / "nope.txt"
    with pytest.raises(FleetsFileError, match="create it with one fleet URL a line"):
        load_fleets_file(missing, default_maxconn=16)
    with pytest.raises(FleetsFileError) as caught:
        load_fleets_file(tmp_path, default_maxconn=16)
    assert str(caught.value) == (
        f"{tmp_path}: cannot read the fleets file: it is a directory; point fleets.file at "
        f"the fleets file itself (one fleet URL a line), e.g. {tmp_path / 'fleets.txt'}"
    )
    latin1 = tmp_path / "fleets.txt"
    latin1.write_bytes(b"# fleets\nhttps://f\xe9.example.com\n")
    with pytest.raises(FleetsFileError) as caught:
        load_fleets_file(latin1, default_maxconn=16)
    assert str(caught.value) == (
        f"{latin1}: cannot read the fleets file: line 2 is not UTF-8 text (byte 0xe9); "
        "save the file as UTF-8 text"
    )


def test_a_fleets_file_not_ours_to_read_gives_the_group_and_mode(tmp_path: Path) -> None:
    """As the configuration file's own message does (settings.load_config)."""
    path = tmp_path / "fleets.txt"
    path.write_text("https://fleet1.example.com\n")
    path.chmod(0o600)
    if os.geteuid() == 0:  # root reads anything: be someone else for the read
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.seteuid(nobody.pw_uid)
    try:
        with pytest.raises(FleetsFileError) as caught:
            load_fleets_file(path, default_maxconn=16)
    finally:
        if os.geteuid() != os.getuid():
            os.seteuid(0)
    assert str(caught.value) == f"{path}: cannot read the fleets file: {PERMISSION_DENIED}"
    assert "chgrp fleet-ingress FILE && chmod 0640 FILE" in PERMISSION_DENIED


def test_every_bad_line_is_reported_not_only_the_first() -> None:
    with pytest.raises(FleetsFileError) as caught:
        parse("https://a\nhttps://b maxconn=0\nhttps://c\nftp://d\n")
    assert str(caught.value).splitlines() == [
        "fleets.txt line 2: 'maxconn=0' is not a valid maxconn; write maxconn=N with N >= 1",
        "fleets.txt line 4: 'ftp://d' is not an http:// or https:// URL; write it as "
        "https://HOST[:PORT]",
    ]


def test_a_maxconn_of_thousands_of_digits_and_a_token_of_100_kb_are_named_briefly() -> None:
    """Past 4,300 digits int() raised a bare ValueError (`check` a traceback, a
    reload 'reload failed' with one, no line named), and a bad token of 100 KB
    was quoted whole (the scale audit of session 32)."""
    digits = "9" * 5000
    with pytest.raises(FleetsFileError) as caught:
        parse(f"https://a\nhttps://b maxconn={digits}\nhttps://c {'x' * 100_000}\n")
    first, second = str(caught.value).splitlines()
    assert first.startswith("fleets.txt line 2: 'maxconn=999")
    assert first.endswith("...' is not a valid maxconn; give N from 1 to 1000000")
    assert second.startswith("fleets.txt line 3: 'xxx")
    assert second.endswith(
        "...' is not an option; the options are name=NAME, maxconn=N and admin=drain|maint"
    )
    assert len(first) < 500 and len(second) < 500
    (spec,) = parse("https://a maxconn=1000000")
    assert spec.maxconn == 1_000_000


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_a_comment_holding_a_unicode_line_separator_stays_a_comment(separator: str) -> None:
    """A line ends at LF (CRLF) only, as an editor and `grep -n` show it:
    str.splitlines() also ended one at U+2028, U+2029 and U+0085 (pasted from
    a web page or a chat), so the rest of a comment was read as a fleet's line:
    a fleet commented out was served, and every line below named one too low."""
    text = f"# retired:{separator}https://old.example\nhttps://a.example\r\nhttps://a.example\n"
    with pytest.raises(FleetsFileError) as caught:
        parse(text)
    assert str(caught.value).startswith("fleets.txt line 3: 'https://a.example' ")
    (spec,) = parse(f"# retired:{separator}https://old.example\nhttps://a.example\r\n")
    assert spec.name == "a.example"
    # A lone CR (old Mac files) still ends a line, as it did.
    assert [s.name for s in parse("https://a.example\rhttps://b.example\r")] == [
        "a.example",
        "b.example",
    ]


def test_a_maxconn_no_host_could_carry_is_refused_as_the_configurations_is() -> None:
    """maxconn=100000000 was taken (any 18 digits were): more calls to one fleet
    than an ingress host's source ports could open to it (64,512 per fleet
    address), a typo's extra zeros rather than a wish (the bounds audit of
    session 35). add-fleet's --maxconn is read through this line too."""
    with pytest.raises(FleetsFileError) as caught:
        parse("https://a maxconn=1000001\n")
    assert str(caught.value) == (
        "fleets.txt line 1: 'maxconn=1000001' is not a valid maxconn; give N from 1 to 1000000"
    )


def test_a_name_as_long_as_a_default_one_can_be_is_taken() -> None:
    host = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253: the longest DNS name
    (spec,) = parse(f"https://{host}:65535\nhttps://x.test name={'n' * 259}\n")[:1]
    assert len(spec.name) == 259


@pytest.mark.parametrize(
    ("url", "zone"),
    [
        ("https://[fe80::1%25eth0]:8443", "eth0"),
        ("https://[fe80::1%eth0]:8443", "eth0"),
        ("https://[fe80::1%25]:8443", "25"),  # '%25' alone: interface index 25
        ("https://[fe80::1%2525]:8443", "25"),
        ("https://[fe80::1%25251]:8443", "251"),
        ("https://[fe80::1%251]:8443", "1"),  # as curl reads it
        ("https://[fe80::1%2525x]:8443", "25x"),
    ],
)
def test_a_zone_is_read_as_curl_reads_it_and_written_back_the_same(url: str, zone: str) -> None:
    """The fleets file written back (add-fleet, init) wrote zone 251 as `%251`,
    read again as zone 1 (the review of session 18)."""
    (spec,) = parse(url)
    assert spec.host == f"fe80::1%{zone}"
    assert (spec.host_header, spec.tls_name) == ("[fe80::1]:8443", "fe80::1")
    written = format_fleets_text([spec])
    assert "name=" not in written  # its name is the default one: the zone kept
    (again,) = parse(written)
    assert again == spec


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("https://[::ffff:127.0.0.1]", "https://127.0.0.1"),
        ("http://[::FFFF:7f00:1]:8080", "http://127.0.0.1:8080"),  # however written; http too
        ("https://[::ffff:10.0.0.1%eth0]:9", "https://10.0.0.1:9"),
    ],
)
def test_an_ipv4_mapped_fleet_address_is_refused_with_the_ipv4_form_to_write(
    url: str, fix: str
) -> None:
    """An https fleet at [::ffff:127.0.0.1] never came UP: its certificate was
    checked for '::ffff:127.0.0.1' (the audit of a real run)."""
    with pytest.raises(FleetsFileError) as caught:
        parse(url)
    assert str(caught.value).endswith(
        ", an IPv4 address written as IPv6, which no certificate names; write " + fix
    )


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_its_url() -> None:
    # Before: fleets.txt line 1: '\ufeffhttps://a.test' is not an http:// or https:// URL.
    assert [s.name for s in parse("\ufeffhttps://a.test\nhttps://b.test\n")] == ["a.test", "b.test"]


# One host in two spellings would get two maxconn budgets (twice its calls,
# the excess answered 429) and two probes. Each refusal names the fix.
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (  # names the fleet of the first line, its URL, and what to do
            "https://[0::1]:18443\nhttps://[::1]:18443",
            "'https://[::1]:18443' is already listed on line 1, as fleet '[::1]:18443' "
            "(https://[::1]:18443): one host, one maxconn (each line would get its own, and "
            "the host twice its calls); drop this line (raise maxconn= on line 1 for more calls)",
        ),
        (
            "https://fleet.example.com name=f1\nhttps://FLEET.example.com:443 name=f2",
            "is already listed on line 1, as fleet 'f1' (https://fleet.example.com)",
        ),
        (  # a trailing dot: the fix, and the line listing it already
            "https://localhost:18443\nhttps://LocalHost.:18443",
            "'https://LocalHost.:18443' has 'LocalHost.', a host name with a trailing dot; "
            "write https://localhost:18443: one spelling per host (TLS's SNI, certificates "
            "and the Host header never carry the dot, and /etc/hosts names do not match it); "
            "and it is already listed on line 1, as fleet 'localhost:18443'",
        ),
        (
            "https://localhost.:18443",
            "has 'localhost.', a host name with a trailing dot; write https://localhost:18443:",
        ),
        ("http://fleet.example.com.", "trailing dot; write http://fleet.example.com:"),
        (  # refused, and the line with the dot is the one named
            "https://localhost.:18443\nhttps://localhost:18443",
            "'https://localhost:18443' is already listed on line 1; list it once",
        ),
        (
            "https://127.000.0.1:18443",
            "has '127.000.0.1', which resolvers read as the IPv4 address 127.0.0.1 (a part "
            "with a leading 0 is octal); write https://127.0.0.1:18443",
        ),
        (
            "http://127.1",
            "has '127.1', which resolvers read as the IPv4 address 127.0.0.1; "
            "write http://127.0.0.1",
        ),
        (
            "https://::1:18443",
            "is an IPv6 address without brackets; write https://[::1]:18443 "
            "(an IPv6 address in [ ])",
        ),
        (
            "https://fe80::1:8443",
            "without brackets; write https://[fe80::1]:8443 or https://[fe80::1:8443] (an IPv6",
        ),
        ("https://fe80::1%eth0:8443", "write https://[fe80::1%25eth0]:8443 (an IPv6"),
        ("https://1:2:3", "without brackets; write it as https://HOST[:PORT], an IPv6 HOST in [ ]"),
    ],
)
def test_one_host_in_another_spelling_is_refused_naming_the_fix(text: str, problem: str) -> None:
    with pytest.raises(FleetsFileError) as caught:
        parse(text)
    assert problem in str(caught.value)


def test_an_ipv4_address_in_hexadecimal_is_taken_with_a_warning_naming_both_fleets() -> None:
    """0x7f.0.0.1 is 127.0.0.1 to every resolver: taken (a file that worked
    must go on starting), but said, and beside 127.0.0.1 said as one host."""
    specs = parse(
        "https://0x7f.0.0.1:18443 name=hex\nhttps://127.0.0.1:18443 maxconn=20\nhttp://0x7f.1"
    )
    assert same_host_warnings(specs) == [
        "fleet 'hex' (https://0x7f.0.0.1:18443): '0x7f.0.0.1' is the IPv4 address 127.0.0.1 "
        "to every resolver; write https://127.0.0.1:18443",
        "fleets 'hex' (https://0x7f.0.0.1:18443) and '127.0.0.1:18443' "
        "(https://127.0.0.1:18443) are one host, 127.0.0.1:18443: it gets two maxconn "
        "budgets (16 + 20 calls) and two probes; list it once (one line, its maxconn= "
        "raised for more calls)",
        "fleet '0x7f.1' (http://0x7f.1): '0x7f.1' is the IPv4 address 127.0.0.1 to every "
        "resolver; write http://127.0.0.1",
    ]
    assert same_host_warnings(parse("https://a\nhttps://127.0.0.1\nhttps://[::1]")) == []
