"""A call table of 2 KiB records as session 44's workers wrote them: made
by main's code at e638102c (`core.call_table` then: RECORD_SIZE 2048, text
in UTF-8), kept here as bytes, so that a test of this release's reader
(which writes 1 KiB records) reads what a worker of the release before an
upgrade left. Made by:

    t.write_live(buf, 0, 9, CALL, None); t.write_fleet(buf, 0, "fleet-a")
    t.write_answered(buf, 0, 1240.0)
    t.write_live(buf, 1, 10, {**CALL, "call_id": 18, "client_ip": None, "bot_id": "waiting"}, None)
    t.write_live(buf, 2, 11, {**CALL, "call_id": 19, "bot_id": "logged"}, "fleet-b")
    t.write_ended(buf, 2)

in a table of 4 records (the fourth never written)."""

from __future__ import annotations

import base64
import zlib

CALL = {
    "call_id": 17,
    "call": "4242-17-abcdefgh",
    "started": "2026-12-07T05:00:00Z",
    "client_ip": "192.0.2.7",
    "route": "/ws/",
    "bot_id": "bot-é-" + "x" * 300,
    "started_at": 1_800_000_000.25,
    "started_monotonic": 1234.5,
}

TABLE_2K = zlib.decompress(
    base64.b64decode(
        "eNrt1zkKwkAUBuAXCa6NhdeYODMuUStFEBRLKysTjVEQLQxop3fwFJ7DG1h6EjuNCxILxQUkmP8j5IUs"
        "MPMI/LxavVppNluCokQqvU9RLjV2u5NcOttd5XzZWJXPtbMqh5ZJSrlvqZRRIp7vhU5fycqsZEJnhtnt"
        "WX17QD8mucwzIRnXWzxX4tw92t7noig1rknt022mZ9M0QWCZE4dt1mwOL8NPA3+jP7Ishxm+Xd81/in+"
        "LP9pv7jk/+GgUsQ9e/Kx8N/5/y3kf7DNjKEzHNtoBAD4TuhaEy/l/2n+D9Pd/F/E/I/8h0dGE9u2eugD"
        "QHDnfxONAAAAAN84Agbr1pk="
    )
)

# What it holds, by lease: (state, call) as `read_table` says it (1 LIVE, 2 ENDED).
HOLDS = {
    9: (1, {**CALL, "fleet": "fleet-a", "status": 101, "answered_monotonic": 1240.0}),
    10: (1, {**CALL, "call_id": 18, "client_ip": None, "bot_id": "waiting", "fleet": None}),
    11: (2, {**CALL, "call_id": 19, "bot_id": "logged", "fleet": "fleet-b"}),
}
