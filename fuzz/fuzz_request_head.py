"""atheris harness: carrier bytes -> head reader -> route -> fleet head -> re-parse.

The path a carrier's request head takes through the ingress, without sockets:
`RequestHeadReader` (fed whole, and again in fuzzer-chosen pieces), `Router`,
`fleet_request_headers` and `FleetExchange.request_bytes`, then the bytes the
fleet would get are parsed again, by h11 as a server and by
`parse_request_head`. Any exception other than `RequestRefused` is a finding,
and so is any broken invariant:

- a refusal is 400 or 431 (431 only past the size limit), whichever way the
  bytes arrive;
- an accepted head forwards as exactly one head, with no control character
  but HTAB inside a line, that re-parses to the same method, target and
  route, and to the carrier's headers except the documented rewrites (Host
  replaced, X-Forwarded-* set, hop-by-hop dropped).

These are the hypothesis property test's invariants, from the same module,
``tests/head_oracle.py``. A quarter of the inputs are raw bytes; the rest are
built from the fuzzer's bytes on a request-head template, so that libFuzzer
gets past the grammar without a seed corpus. Run outside the regular suite
(see fuzz/README.md):

    .venv/bin/python fuzz/fuzz_request_head.py -atheris_runs=200000
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# The oracle is the one the hypothesis property test uses (tests/head_oracle.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from tests.head_oracle import ROUTER, check_accepted, check_hostless, check_verdicts

    from fleet_ingress.core.request_head import RequestRefused

# Index 0 of each list is the valid choice: an exhausted input picks it.
METHODS = [b"GET", b"GET", b"POST", b"HEAD", b"get", b"CONNECT"]
PREFIXES = [
    b"/ws/", b"/exotel/", b"/", b"/haproxy-health", b"http://f/ws/", b"*",
    b"https://calls.test/ws/", b"http://calls.test:80/exotel/", b"https://calls.test:99999/",
]  # fmt: skip
SEGMENTS = [b"bot-1", b"x", b"", b".", b"..", b"%2e", b"%2f", b"..;", b"?a=/../b", b"/"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b""]
NAMES = [
    b"X-Trace", b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
    b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Authorization", b"X-Forwarded-For",
    b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Sec-WebSocket-Key", b"Content_Length",
]  # fmt: skip
VALUES = [b"a", b"websocket", b"Upgrade", b"keep-alive, Upgrade", b"0", b"chunked", b"calls.test"]
SEPARATORS = [b": ", b": ", b":", b" : ", b":\t"]
EOLS = [b"\r\n"] * 6 + [b"\n", b"\r"]


def build(data: bytes) -> tuple[bytes, list[int], int, int]:
    """(the carrier's bytes, how to cut them, the head size limit, the header-line limit)."""
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.PickValueInList([16384, 16384, 16384, 256])
    max_lines = fdp.PickValueInList([100, 100, 100, 3])
    cuts = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    if fdp.ConsumeIntInRange(0, 3) == 3:
        return fdp.ConsumeBytes(fdp.remaining_bytes()), cuts, limit, max_lines

    def piece(choices: list[bytes], max_len: int = 16) -> bytes:
        if fdp.ConsumeIntInRange(0, 3) != 3:
            return fdp.PickValueInList(choices)
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, max_len))

    target = piece(PREFIXES) + b"/".join(
        piece(SEGMENTS) for _ in range(fdp.ConsumeIntInRange(1, 3))
    )
    # RFC 9112 2.2: empty lines before the request line are skipped, a few of them.
    out = [b"\r\n" * fdp.PickValueInList([0, 0, 0, 1, 2, 9])]
    out += [piece(METHODS) + b" " + target + b" " + piece(VERSIONS) + piece(EOLS)]
    if not fdp.ConsumeIntInRange(0, 3):
        out.append(b"Host: calls.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n")
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        out.append(piece(NAMES) + piece(SEPARATORS) + piece(VALUES, 24) + piece(EOLS))
    out.append(b"\r\n" if fdp.ConsumeIntInRange(0, 7) else piece(EOLS))
    out.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)))  # bytes after the head
    return b"".join(out), cuts, limit, max_lines


def test_one_input(data: bytes) -> None:
    raw, cuts, limit, max_lines = build(data)
    verdict = check_verdicts(raw, cuts, limit, max_lines)
    check_hostless(raw, limit, max_lines)
    if verdict is None or isinstance(verdict, RequestRefused):
        return
    ROUTER.route(verdict.path.decode("latin-1"))
    check_accepted(verdict, limit)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
