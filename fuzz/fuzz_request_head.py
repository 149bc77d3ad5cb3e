"""atheris harness: carrier bytes -> head reader -> route -> fleet head -> re-parse.

The path a carrier's request head takes through the ingress, without sockets:
`RequestHeadReader` (fed whole, and again in fuzzer-chosen pieces), `Router`,
`fleet_request_headers` and `FleetExchange.request_bytes`, then the bytes the
fleet would get are parsed again, by h11 as a server and by
`parse_request_head`. Any exception other than `RequestRefused` is a finding,
and so is any broken invariant:

- a head read without h11 (a plain one) is read as h11 reads it;
- a refusal is 400 or 431 (431 only past the size limit), whichever way the
  bytes arrive;
- an accepted head forwards as exactly one head, with no control character
  but HTAB inside a line, that re-parses to the same method, target and
  route, and to the carrier's headers except the documented rewrites (Host
  replaced, X-Forwarded-* set, hop-by-hop dropped).

These are the hypothesis property test's invariants, from the same module,
``tests/head_oracle.py``. A quarter of the inputs are raw bytes; the rest are
built from the fuzzer's bytes on a request-head template (``build_head``, which
the parity test of the two head readers draws from too), so that libFuzzer
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
    from tests.head_oracle import (
        ROUTER,
        build_head,
        check_accepted,
        check_hostless,
        check_plain_read,
        check_verdicts,
    )

    from fleet_ingress.core.request_head import RequestRefused


def build(data: bytes) -> tuple[bytes, list[int], int, int]:
    """(the carrier's bytes, how to cut them, the head size limit, the header-line limit)."""
    return build_head(atheris.FuzzedDataProvider(data))


def test_one_input(data: bytes) -> None:
    raw, cuts, limit, max_lines = build(data)
    verdict = check_verdicts(raw, cuts, limit, max_lines)
    check_hostless(raw, limit, max_lines)
    check_plain_read(raw, limit, max_lines)
    if verdict is None or isinstance(verdict, RequestRefused):
        return
    ROUTER.route(verdict.path.decode("latin-1"))
    check_accepted(verdict, limit)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
