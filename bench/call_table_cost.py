"""A worker's call-table writes for N churned calls, to count under callgrind
(instructions, not time: for a shared host). Per call what `SlotClient` does
for a call granted from a standing budget: `open` (its record, fleet known),
`answered` (its 101), then, 5 calls later (5 up at once, as
`bench.call_instructions`' wave), `logged` and `over`. `--noop` runs the same
loop without the table: its cost, to take off. Run N=1000 and N=5000 and take
the difference over 4000 (bench/README, session 44)::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.1000 \\
        .venv/bin/python -m bench.call_table_cost 1000
"""

from __future__ import annotations

import argparse
import os

from fleet_ingress.net.call_table_map import CALL_TABLE_ENV, CallTableWriter, make_table

CALL = {
    "call_id": 17,
    "call": "4242-1-abcd",
    "started": "2026-12-07T05:00:00Z",
    "client_ip": "127.0.0.1",
    "route": "/ws/",
    "bot_id": "bot-0123456789",
    "started_at": 1.8e9,
    "started_monotonic": 1234.5,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("calls", type=int)
    p.add_argument("--noop", action="store_true", help="the loop alone, no table")
    args = p.parse_args()
    fd = make_table()
    os.environ[CALL_TABLE_ENV] = str(fd)
    table = CallTableWriter.from_env()
    assert table is not None
    noop = args.noop
    live: list[int] = []
    for lease in range(1, args.calls + 1):
        if not noop:
            table.open(lease, CALL, "a")
            table.answered(lease, 1235.0)
        live.append(lease)
        if len(live) > 5:
            done = live.pop(0)
            if not noop:
                table.logged(done)
                table.over(done)


if __name__ == "__main__":
    main()
