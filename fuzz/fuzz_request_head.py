"""atheris harness: carrier bytes -> head reader -> route -> fleet head -> re-parse.

The path a carrier's request head takes through the ingress, without sockets:
`RequestHeadReader` (fed whole, and again in fuzzer-chosen pieces), `Router`,
`fleet_request_headers` and `FleetExchange.request_bytes`, then the bytes the
fleet would get are parsed again, by h11 as a server and by
`parse_request_head`. Any exception other than `RequestRefused` is a finding,
and so is any broken invariant:

- a refusal is 400 or 431 (431 only past the size limit), whichever way the
  bytes arrive;
- an accepted head forwards as exactly one head, with no CR, LF or NUL inside
  a line, that re-parses to the same method, target and route, and to the
  carrier's headers except the documented rewrites (Host replaced,
  X-Forwarded-* set, hop-by-hop dropped).

A quarter of the inputs are raw bytes; the rest are built from the fuzzer's
bytes on a request-head template, so that libFuzzer gets past the grammar
without a seed corpus. Run outside the regular suite (see fuzz/README.md):

    .venv/bin/python fuzz/fuzz_request_head.py -atheris_runs=200000
"""

from __future__ import annotations

import os
import re
import sys

import atheris

with atheris.instrument_imports():
    import h11

    from fleet_ingress.fleet_exchange import FleetExchange
    from fleet_ingress.forwarding import fleet_request_headers
    from fleet_ingress.request_head import (
        RequestHead,
        RequestHeadReader,
        RequestRefused,
        parse_request_head,
    )
    from fleet_ingress.routing import Router

# FUZZ_CONTROLS=1 also refuses control characters other than HTAB inside a
# forwarded line (RFC 9110 field-vchar). Off by default: the ingress forwards
# them today (see tests/test_hostile_input.py, the xfail "ctl-*-in-value"
# cases); turn it on to check a fix.
CONTROLS = re.compile(
    rb"[\x00-\x08\x0a-\x1f\x7f]" if os.environ.get("FUZZ_CONTROLS") == "1" else rb"[\x00\r\n]"
)
ROUTER = Router(["/ws/", "/exotel/"], "/haproxy-health")
FLEET_HOST = "fleet-1.internal:8443"
CLIENT_IP = "203.0.113.7"
SET_BY_INGRESS = {
    b"host",
    b"connection",
    b"upgrade",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
    b"proxy-authenticate",
}

# Index 0 of each list is the valid choice: an exhausted input picks it.
METHODS = [b"GET", b"GET", b"POST", b"HEAD", b"get", b"CONNECT"]
PREFIXES = [b"/ws/", b"/exotel/", b"/", b"/haproxy-health", b"http://f/ws/", b"*"]
SEGMENTS = [b"bot-1", b"x", b"", b".", b"..", b"%2e", b"%2f", b"..;", b"?a=/../b", b"/"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b""]
NAMES = [
    b"X-Trace", b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
    b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Authorization", b"X-Forwarded-For",
    b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Sec-WebSocket-Key",
]  # fmt: skip
VALUES = [b"a", b"websocket", b"Upgrade", b"keep-alive, Upgrade", b"0", b"chunked", b"calls.test"]
SEPARATORS = [b": ", b": ", b":", b" : ", b":\t"]
EOLS = [b"\r\n"] * 6 + [b"\n", b"\r"]


def build(data: bytes) -> tuple[bytes, list[int], int]:
    """(the carrier's bytes, how to cut them, the head size limit)."""
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.PickValueInList([16384, 16384, 16384, 256])
    cuts = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    if fdp.ConsumeIntInRange(0, 3) == 3:
        return fdp.ConsumeBytes(fdp.remaining_bytes()), cuts, limit

    def piece(choices: list[bytes], max_len: int = 16) -> bytes:
        if fdp.ConsumeIntInRange(0, 3) != 3:
            return fdp.PickValueInList(choices)
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, max_len))

    target = piece(PREFIXES) + b"/".join(
        piece(SEGMENTS) for _ in range(fdp.ConsumeIntInRange(1, 3))
    )
    out = [piece(METHODS) + b" " + target + b" " + piece(VERSIONS) + piece(EOLS)]
    if not fdp.ConsumeIntInRange(0, 3):
        out.append(b"Host: calls.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n")
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        out.append(piece(NAMES) + piece(SEPARATORS) + piece(VALUES, 24) + piece(EOLS))
    out.append(b"\r\n" if fdp.ConsumeIntInRange(0, 7) else piece(EOLS))
    out.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)))  # bytes after the head
    return b"".join(out), cuts, limit


def judge(limit: int, pieces: list[bytes]) -> tuple[RequestHead | RequestRefused | None, bytes]:
    reader = RequestHeadReader(limit)
    try:
        for i, chunk in enumerate(pieces):
            head = reader.feed(chunk)
            if head is not None:
                return head, head.trailing + b"".join(pieces[i + 1 :])
    except RequestRefused as refused:
        return refused, b""
    return None, b""


def check_forwarded(head: RequestHead, limit: int) -> None:
    headers = fleet_request_headers(head, fleet_host=FLEET_HOST, client_ip=CLIENT_IP)
    sent = FleetExchange(head.method, head.target, headers, max_head_bytes=limit).request_bytes
    assert sent.endswith(b"\r\n\r\n") and sent.count(b"\r\n\r\n") == 1, sent
    for line in sent[:-4].split(b"\r\n"):
        assert not CONTROLS.search(line), line
    fleet = h11.Connection(h11.SERVER)
    fleet.receive_data(sent)
    request = fleet.next_event()
    assert isinstance(request, h11.Request), request
    assert isinstance(fleet.next_event(), h11.EndOfMessage)
    assert fleet.trailing_data == (b"", False)
    assert (request.method, request.target) == (head.method, head.target)
    got = [(bytes(k), bytes(v)) for k, v in request.headers.raw_items()]
    dropped = SET_BY_INGRESS | HOP_BY_HOP | head.tokens(b"connection")
    kept = [(k, v) for k, v in got if k.lower() not in SET_BY_INGRESS]
    assert kept == [(k, v) for k, v in head.headers if k.lower() not in dropped], (kept, head)
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in got:
        by_name.setdefault(name.lower(), []).append(value)
    prior = [v.strip() for v in head.get_all(b"x-forwarded-for") if v.strip()]
    assert by_name[b"host"] == [FLEET_HOST.encode()]
    assert by_name[b"x-forwarded-for"] == [b", ".join([*prior, CLIENT_IP.encode()])]
    assert by_name[b"x-forwarded-proto"] == [b"https"]
    assert by_name[b"x-forwarded-host"] == [head.host]
    assert by_name.get(b"upgrade", []) == head.get_all(b"upgrade")
    again = parse_request_head(sent)
    assert (again.method, again.target) == (head.method, head.target)
    assert ROUTER.route(again.path.decode("latin-1")) == ROUTER.route(head.path.decode("latin-1"))


def test_one_input(data: bytes) -> None:
    raw, cuts, limit = build(data)
    whole, _ = judge(limit, [raw])
    pieces, at = [], 0
    for cut in cuts:
        if raw[at : at + cut]:
            pieces.append(raw[at : at + cut])
        at += cut
    if raw[at:]:
        pieces.append(raw[at:])
    trickled, after = judge(limit, pieces)
    assert type(whole) is type(trickled), (whole, trickled)
    if isinstance(whole, RequestRefused):
        assert whole.status in (400, 431), whole.status
        assert isinstance(trickled, RequestRefused) and trickled.status in (400, 431)
        assert whole.status != 431 or len(raw) > limit
        return
    if whole is None:
        assert b"\r\n\r\n" not in raw and len(raw) <= limit
        return
    assert isinstance(trickled, RequestHead)
    assert (trickled.method, trickled.target, trickled.headers) == (
        whole.method,
        whole.target,
        whole.headers,
    )
    assert whole.trailing == after == raw[raw.index(b"\r\n\r\n") + 4 :]
    ROUTER.route(whole.path.decode("latin-1"))
    check_forwarded(whole, limit)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
