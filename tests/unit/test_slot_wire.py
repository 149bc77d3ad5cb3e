"""The slot coordinator's framing: one JSON object a line, bounded."""

import json

import pytest

from fleet_ingress.config.fleets_file import parse_fleets_text
from fleet_ingress.net.slot_wire import (
    CALL_KEYS,
    MAX_LINE,
    MAX_WORKER_LINE,
    LineDecoder,
    WireError,
    call_kept,
    encode,
    field,
    granted_line,
    spec_from_wire,
    spec_to_wire,
)


@pytest.mark.parametrize(
    ("chunks", "messages"),
    [
        ([b'{"op":"release","id":1}\n'], [[{"op": "release", "id": 1}]]),
        ([b'{"op":"rel', b'ease","id":1}\n'], [[], [{"op": "release", "id": 1}]]),
        ([b'{"op":"a"}\n{"op":"b"}\n{"op"'], [[{"op": "a"}, {"op": "b"}]]),
        ([b'{"op":"a"}\n{"op"', b':"b"}\n'], [[{"op": "a"}], [{"op": "b"}]]),
    ],
)
def test_lines_are_split_wherever_the_reads_cut_them(chunks, messages):
    decoder = LineDecoder()
    assert [decoder.feed(chunk) for chunk in chunks] == messages


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not a message"),
        (b'{"id": 1}\n', "not a message"),
        # What follows a whole object is refused as json.loads refuses it (the
        # decoder's quick path reads the object alone, session 39).
        (b'{"op": "a"} x\n', "not JSON"),
        (b'{"op": "a"}{"op": "b"}\n', "not JSON"),
        (b"\n", "not JSON"),
        (b"x" * (MAX_LINE + 1), "longer than"),
        # Within the line's limit, nested past the interpreter's: a protocol
        # error, not a crash of the channel's reader (the channel audit).
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "not JSON"),
    ],
)
def test_what_is_not_the_protocol_is_named(data, error):
    with pytest.raises(WireError, match=error):
        LineDecoder().feed(data)


def test_a_line_over_a_mib_in_many_pieces_is_read_whole_within_its_limit():
    """A worker's report at hundreds of long-named fleets passes 1 MiB (the
    scale audit of session 32): the supervisor's end takes it, in the pieces
    the socket gives, and the two lines around it; past its own limit, still
    refused."""
    big = encode({"op": "report", "names": ["n" * 259] * 8_000})
    assert MAX_LINE < len(big) < MAX_WORKER_LINE
    data = encode({"op": "a"}) + big + encode({"op": "b"})
    decoder = LineDecoder(limit=MAX_WORKER_LINE)
    got = [m for i in range(0, len(data), 65_536) for m in decoder.feed(data[i : i + 65_536])]
    assert [m["op"] for m in got] == ["a", "report", "b"]
    assert got[1]["names"] == ["n" * 259] * 8_000
    assert decoder.pending == b""
    with pytest.raises(WireError, match="longer than"):
        LineDecoder(limit=MAX_WORKER_LINE).feed(b"x" * (MAX_WORKER_LINE + 1))


def test_a_message_round_trips_and_a_field_of_the_wrong_type_is_named():
    message = {"op": "acquire", "id": 3, "avoid": ["a", "b"]}
    assert LineDecoder().feed(encode(message)) == [message]
    with pytest.raises(WireError, match="'id' must be int"):
        field({"op": "acquire", "id": True}, "id", int)


def test_a_fleet_spec_round_trips():
    (spec,) = parse_fleets_text(
        "https://[::1]:8443 name=x maxconn=32 admin=maint", default_maxconn=16
    )
    assert spec_from_wire(spec_to_wire(spec)) == spec
    with pytest.raises(WireError, match="not a fleet"):
        spec_from_wire({"name": "x"})


def test_the_bytes_are_those_of_json_both_ways():
    """The encoder and decoder are made once (session 37), not per message:
    the wire stays what `json.dumps(separators=(",", ":"))` wrote and
    `json.loads` read, so that either end meets an older release's."""
    message = {
        "op": "acquire",
        "id": 7,
        "avoid": [],
        "call": {"bot_id": "b\u00e9\U0001f600", "at": 5012.25, "n": None, "ok": True},
        "odd": [float("inf"), -0.0, 1e300, {"k": {}}],
    }
    assert encode(message) == json.dumps(message, separators=(",", ":")).encode() + b"\n"
    lines = [
        b' {"op": "a", "x": "\\ud800"} \n',
        '{"op":"b\u00e9"}\n'.encode(),
        b'{"op":"\xed\xa0\x80"}\n',
    ]
    assert LineDecoder().feed(b"".join(lines)) == [json.loads(line) for line in lines]
    with pytest.raises(WireError, match="not JSON"):
        LineDecoder().feed(b'{"op":"\xff"}\n')


def test_a_call_is_kept_as_said_under_one_string_a_key_for_every_call():
    """Who a call is ("call" in a slot request, `Call.described`) is kept by
    the supervisor while its lease is open: equal to what was decoded, its
    known keys the same strings for every call (not new ones each decode),
    others after them as they came; one that lacks a known key (another
    release's) as it came, nothing added. Every key `Call.described` sends
    is a known one."""
    from fleet_ingress.net.calls import Call

    described = Call(None, "192.0.2.1", "/ws/", "bot").described  # type: ignore[arg-type]
    assert set(described) <= set(CALL_KEYS)
    lines = b"".join(
        encode({"op": "acquire", "id": n, "call": {**described, "extra": n}}) for n in (1, 2)
    )
    kept = [call_kept(message["call"]) for message in LineDecoder().feed(lines)]
    for n, call in enumerate(kept, 1):
        assert call == {**described, "extra": n}
        assert list(call) == [*described, "extra"]
    first, second = (list(call) for call in kept)
    assert all(a is b for a, b in zip(first[:-1], second[:-1], strict=True))
    assert all(key is CALL_KEYS[CALL_KEYS.index(key)] for key in first[:-1])
    (older,) = LineDecoder().feed(encode({"op": "acquire", "call": {"call_id": 3, "x": 1}}))
    assert call_kept(older["call"]) == {"call_id": 3, "x": 1}
    shuffled = dict(reversed(described.items()))
    assert call_kept(shuffled) == shuffled


@pytest.mark.parametrize(
    "fleet", ["a", "fleet-b.example", 'q"uote\\back', "é☎\U0001f4de", "\x00\x1f\x7f"]
)
@pytest.mark.parametrize("lease", [0, 7, -3, 2**63, True])
@pytest.mark.parametrize("queued", [True, False])
def test_a_grant_formatted_at_once_is_the_same_bytes_as_encoded(fleet, lease, queued):
    """The supervisor's grant without a spec (`granted_line`, its one answer
    a call) is the line `encode` writes of the same message, byte for byte,
    and reads back as it."""
    message = {"op": "granted", "id": lease, "fleet": fleet, "queued": queued}
    line = granted_line(lease, fleet, queued)
    assert line == encode(message)
    assert LineDecoder().feed(line) == [message]
