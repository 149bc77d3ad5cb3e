"""The carrier's head read two ways, the same verdict: without h11 (a plain
head, `request_head._plain_read`) and by h11 (every head, as before).

A large bounded corpus, the same every run: the fuzz harness's template heads
(`tests.head_oracle.build_head`, from a seeded random rather than a fuzzer's
bytes) and plain call heads mutated a few bytes or lines at a time, where the
fast path's edges are. Each is parsed as the ingress parses it, whole and as
the reader takes it, under each of the callers' options, with the fast path
and with it turned off: every verdict (the head read, or the status, the
reason and `head_only` of a refusal) must be identical. No sockets.
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Callable, Iterator

import pytest

from fleet_ingress.core import request_head
from fleet_ingress.core.h11_grammar import FIELD_NAME, FIELD_VALUE, OWS
from fleet_ingress.core.request_head import (
    CONTROLS,
    RequestHeadReader,
    RequestRefused,
    parse_request_head,
)
from tests.head_oracle import RandomChoices, build_head

# Plain call heads as carriers send them, and the shapes the fast path takes too
# (no space or a tab after the colon, an empty value, obs-text, a control byte
# in a value that the checks refuse after the read, an absolute-form target).
PLAIN_HEADS = [
    b"GET /ws/bot-1?call=42 HTTP/1.1\r\nHost: calls.example.com\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /exotel/b HTTP/1.1\r\nhost:calls.test:443\r\nUser-Agent:\tExotel/2 \r\n"
    b"connection: keep-alive, Upgrade\r\nupgrade: WebSocket\r\nX-Empty:\r\n"
    b"X-Obs: caf\xc3\xa9 \t a\r\nSec-WebSocket-Protocol: audio, x\r\n\r\n",
    b"GET https://calls.test/ws/x?a=%20 HTTP/1.1\r\nHost: calls.test\r\n"
    b"X-Trace: a\x01b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HEAD /ws/x HTTP/1.1\r\nHost: [::1]:8443\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n",
]
# Bytes a mutation writes: line ends, spaces, separators, the controls and
# obs-text the grammar and the checks tell apart, letters of the names h11 minds.
_ALPHABET = b"\r\n \t:;,/?#%.\\\x00\x01\x0b\x0c\x7f\x80\xffHhCcTtLlE0-_aZ"
# Whole lines a mutation inserts: each one something h11 or the checks decide on.
_LINES = [
    b"Host: calls.test\r\n", b"host: evil.test\r\n", b"Content-Length: 0\r\n",
    b"content-length: 0, 0\r\n", b"Transfer-Encoding: chunked\r\n", b"TE: trailers\r\n",
    b" folded\r\n", b"\tfolded\r\n", b"X-Trace : a\r\n", b"X-Trace\t: a\r\n", b": a\r\n",
    b"X-Trace\r\n", b"X-Trace: a\nX-Other: b\r\n", b"X-Trace: a\rb\r\n", b"X-T: \x00\r\n",
    b"Content_Length: 5\r\n", b"Host:\r\n", b"Host: a b\r\n", b"Expect: 100-continue\r\n",
    b"X-T: a\x0bb\r\n", b"X-T:\x0c\r\n", b"X-T: a\r\r\n", b"X-T: \n\r\n", b"X-T: a\x7f\r\n",
]  # fmt: skip
_VERSIONS = [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11"]
# The callers' options: the call path's reader (`feed`), the carrier listener
# (routes first: body and Host left to the call machine), the ACME listener.
OPTIONS = [(True, True), (False, False), (False, True)]


def _mutated(rng: random.Random) -> bytes:
    head = bytearray(rng.choice(PLAIN_HEADS))
    for _ in range(rng.randint(0, 3)):
        kind = rng.random()
        at = rng.randrange(len(head))
        if kind < 0.35:
            head[at] = rng.choice(_ALPHABET)
        elif kind < 0.6:
            head[at:at] = bytes([rng.choice(_ALPHABET)])
        elif kind < 0.7:
            del head[at]
        elif kind < 0.9:  # a whole line, after the request line
            line_end = head.find(b"\r\n") + 2
            ends = [i + 2 for i in range(line_end, len(head) - 2) if head.startswith(b"\r\n", i)]
            where = rng.choice(ends or [line_end])
            head[where:where] = rng.choice(_LINES)
        else:
            head = bytearray(bytes(head).replace(b"HTTP/1.1", rng.choice(_VERSIONS), 1))
    return bytes(head)


def corpus(count: int, seed: int) -> Iterator[bytes]:
    """`count` heads: half from the fuzz harness's template, half plain ones mutated."""
    rng = random.Random(seed)
    for _ in range(count // 2):
        yield build_head(RandomChoices(rng))[0]
        yield _mutated(rng)


def _raws(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(head, bytes after it) as parsed: the bytes whole, and as the reader takes them."""
    yield data, b""
    try:
        taken = RequestHeadReader(16384, 100).take(data)
    except RequestRefused:
        return
    if taken is not None:
        yield taken


Verdict = tuple[object, ...]


def _verdict(raw: bytes, trailing: bytes, refuse_body: bool, refuse_hostless: bool) -> Verdict:
    try:
        head = parse_request_head(
            raw, trailing, refuse_body=refuse_body, refuse_hostless=refuse_hostless
        )
    except RequestRefused as refused:
        return ("refused", refused.status, refused.reason, refused.head_only)
    fields = (head.method, head.target, *(part for pair in head.headers for part in pair))
    return (
        "read",
        head.method,
        head.target,
        head.headers,
        head.http_version,
        head.trailing,
        {type(part) for part in fields},  # bytes, never a bytearray h11 left
        head.host_missing,
        head.has_body,
        head.is_websocket_upgrade,
    )


def _verdicts(inputs: list[tuple[bytes, bytes]]) -> list[Verdict]:
    return [_verdict(raw, after, *options) for raw, after in inputs for options in OPTIONS]


def _h11_only(monkeypatch: pytest.MonkeyPatch, work: Callable[[], list[Verdict]]):
    with monkeypatch.context() as patched:
        patched.setattr(request_head, "_plain_read", lambda raw, lowered: None)
        return work()


@pytest.mark.parametrize("seed", range(2))
def test_every_head_gets_h11s_verdict_whoever_reads_it(seed: int, monkeypatch):
    inputs = [pair for data in corpus(3000, seed) for pair in _raws(data)]
    plain = [raw for raw, _ in inputs if request_head._plain_read(raw, raw.lower()) is not None]
    # The fast path is taken often enough to be tested (~1 in 5 here), and not
    # for everything.
    assert len(inputs) // 10 < len(plain) < len(inputs) // 2, (len(plain), len(inputs))
    fast = _verdicts(inputs)
    by_h11 = _h11_only(monkeypatch, lambda: _verdicts(inputs))
    for (raw, after), got, expected in zip(
        [pair for pair in inputs for _ in OPTIONS], fast, by_h11, strict=True
    ):
        assert got == expected, (raw, after)
    # Accepted and refused both, for many reasons: the corpus reaches the checks.
    assert sum(v[0] == "read" for v in fast) > len(fast) // 20
    assert len({v[2] for v in fast if v[0] == "refused"}) > 15


def test_a_plain_head_is_read_as_h11_reads_it():
    """`_plain_read`'s own promise, on every plain head of the corpus: h11 reads
    it, raising nothing, to the same method, target, headers and version."""
    read = 0
    for data in corpus(4000, 7):
        for raw, _ in _raws(data):
            plain = request_head._plain_read(raw, raw.lower())
            if plain is not None:
                assert request_head._h11_request(raw) == plain, raw
                read += 1
    assert read > 400


@pytest.mark.parametrize(
    "raw",
    [
        PLAIN_HEADS[0].replace(b"Host: calls.example.com\r\n", b""),  # no Host: h11's word
        PLAIN_HEADS[0].replace(b"Host:", b"Host: a\r\nhost:"),  # two
        PLAIN_HEADS[0].replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),  # h11 reads it
        PLAIN_HEADS[0].replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"),
        PLAIN_HEADS[0].replace(b"HTTP/1.1", b"HTTP/1.0"),
        PLAIN_HEADS[0].replace(b"Upgrade: websocket\r\n", b"Upgrade: websocket\r\n x\r\n"),
        PLAIN_HEADS[0].replace(b"Upgrade:", b"Upgrade :"),
        PLAIN_HEADS[0].replace(b"\r\nUpgrade", b"\nUpgrade"),
        PLAIN_HEADS[0] + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",  # more than one head
        b"\r\n" + PLAIN_HEADS[0],
    ],
)
def test_what_h11_checks_or_normalizes_is_left_to_h11(raw: bytes):
    assert request_head._plain_read(raw, raw.lower()) is None


def _lines_run(work: Callable[[], object]) -> int:
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return trace

    sys.settrace(trace)
    try:
        work()
    finally:
        sys.settrace(None)
    return lines


def test_a_call_head_is_read_in_few_python_lines():
    """Issue #13: h11 read a call's head in ~670 Python lines (sys.settrace), half
    the instructions of a churned call's head; read as h11 would, ~90."""
    raw = PLAIN_HEADS[0]

    def parse():
        head = parse_request_head(raw, refuse_body=False, refuse_hostless=False)
        assert head.is_websocket_upgrade and head.host == b"calls.example.com"

    parse()  # first-time work (imports, caches) not counted
    assert _lines_run(parse) < 200


# h11's header line (`h11._readers`: every line of a head it reads), as bytes.
_H11_HEADER_LINE = re.compile(f"{FIELD_NAME}:{OWS}{FIELD_VALUE}{OWS}".encode())


@pytest.mark.parametrize("byte", range(256))
def test_a_header_line_is_plain_when_h11s_grammar_reads_it_byte_by_byte(byte: int):
    """`_plain_read`'s line (a name, a colon, bytes but CR, in a head with no
    control and no LF but a CRLF's) is h11's header line, byte by byte: each
    byte, where a value or a name may hold it, is read without h11 when h11's
    own expression matches the line and the byte is no control (a head with a
    control is h11's to read, then refused by the checks), and only then."""
    b = bytes([byte])
    lines = [
        b"X-T: " + b, b"X-T: a" + b + b"a", b"X-T: a" + b, b"X-T:" + b + b"a",
        b"X-T: a " + b + b" a", b"X-T: a\t" + b + b"\t", b"X" + b + b"T: a", b + b"X-T: a",
    ]  # fmt: skip
    for line in lines:
        raw = PLAIN_HEADS[0].replace(b"\r\n\r\n", b"\r\n" + line + b"\r\n\r\n")
        by_h11s_grammar = _H11_HEADER_LINE.fullmatch(line) is not None and b not in CONTROLS
        plain = request_head._plain_read(raw, raw.lower())
        assert (plain is not None) == by_h11s_grammar, line
        if plain is not None:
            assert plain == request_head._h11_request(raw), line
