"""The slot coordinator's wire: one JSON object a line over a Unix stream socket.

Workers speak to the supervisor's coordinator (`net.slot_server`) through
`net.slot_client`; both ends frame with `LineDecoder` and `encode`. Messages:

    worker -> coordinator
      {"op": "hello", "pid": 1234, "generation": 1, "answers": true, "forgets": true,
       "lists_calls": true, "fleet_down": true,
       "tag": "k3f9"}                                      first, once ("answers": it sends
                                                           "answered"; "forgets": it knows
                                                           "forget-fleet"; "lists_calls": it
                                                           answers "list-calls", "end-call";
                                                           "fleet_down": it knows "fleet-down";
                                                           "tag": of its call ids, PID-N-TAG;
                                                           also in its "state")
      {"op": "acquire", "id": 7, "avoid": ["a"],           a slot for one call attempt;
       "call": {"call_id": 3, "bot_id": "b", ...}}         who the call is (`Call.described`:
                                                           access fields, "started_at",
                                                           "started_monotonic"),
                                                           kept while the lease is open:
                                                           the line of a call lost with
                                                           its worker
      {"op": "release", "id": 7}                           give it back (or leave the queue)
      {"op": "answered", "leases": [[7, 5012.25], ...]}    their fleets answered the calls
                                                           (101) then (monotonic): out of
                                                           flight; sent with the next message
                                                           or within 0.2 s
      {"op": "full", "id": 7}                              its fleet answered the call 429:
                                                           FULL until its next probe
      {"op": "unreachable", "id": 7, "refused": true}      the call could not connect to its
                                                           fleet: fleets.fall refused in a
                                                           row, DOWN; timed out: a probe on
                                                           a new connection
    coordinator -> worker
      {"op": "granted", "id": 7, "fleet": "a", "spec": {...}}   "spec" when the worker
                                                                 has not seen it yet
      {"op": "refused", "id": 7, "reason": "no fleet is up"}    answer 503 with it
      both with "queued": true (the answer came from the queue: the worker times the
      wait from its ask) or false (at once); a supervisor before the key says neither,
      and the worker's access line says queued_ms null (the wait not known), not 0

    the supervisor's own messages (`SlotServer.handlers`, `SlotClient.handlers`;
    service.worker lists them): reload / reloaded, stop / stopping, close-fleet /
    fleet-closed, list-calls / calls-listed, end-call / call-ended (the last two
    not sent to a worker whose hello or state lacks "lists_calls")
    ("reload" carries "config", which a worker of an older release ignores)
    coordinator -> worker   {"op": "forget-fleet", "fleet": "a"}   the fleet left the set
                                                           (supervisor.FORGET_AFTER ago): the
                                                           worker drops its record (at once, or
                                                           at its last slot's release there)
                                                           and that name's counts (its ended
                                                           calls fold into "(removed)"); a
                                                           later grant of the name carries its
                                                           spec again. Sent only to a worker
                                                           whose hello (or state) said
                                                           "forgets": true
    coordinator -> worker   {"op": "fleet-down", "fleet": "a", "leases": [7, 9]}
                                                           the fleet went DOWN (its probes,
                                                           or calls it refused): these leases
                                                           of the worker's are in flight there
                                                           (no "answered" read for them); each
                                                           call's attempt not answered yet is
                                                           given up and retried now, not at its
                                                           timer (`net.fleet_down`). Sent only
                                                           to a worker whose hello (or state)
                                                           said "fleet_down": true; an older
                                                           one waits for its timers as before

    standing grant budgets (`core.slot_budget`; only with a worker whose hello or
    state said "standing": true, docs/WORKERS.md "Standing budgets"):
    coordinator -> worker   {"op": "budget", "standing": true,
                             "fleets": [{"fleet": "a", "slots": 8, "active": 3,
                                         "spec": {...}}, ...]}
                                                           reserved for it while nobody waits:
                                                           it grants calls from it at once
    worker -> coordinator   {"op": "budget-taken"}         it has it: from here on a slot it
                                                           gives back goes back into it (up to
                                                           "slots"), on both ends
    worker -> coordinator   {"op": "acquire", "id": 7, "budget": true, "standing": true,
                             "fleet": "a", "call": {...}}  a call granted from it (the host's
                                                           grant: `HostSlots.grant_standing`)
    coordinator -> worker   {"op": "budget-end"}           a call waits (or a budget's fleet
                                                           cannot be picked): give it back
    worker -> coordinator   {"op": "budget-dropped"}       what was left of it is dropped,
                                                           after every grant made from it
                                                           ("declined": true: it takes no new
                                                           calls, send it none again)
    A release going back into the budget, and "logged", ride the worker's next
    write (or go 0.2 s after): they free nothing for others.

    a lone worker's budget (session 46; only with a worker whose hello or state
    said "lone": true): the same "budget", with "lone": true, given while that
    worker is the only one and nobody waits: every free slot of each fleet. The
    worker holds a recorded call's "acquire" from it too (next write, or 0.2 s).
    It ends with "budget-end" as soon as another worker joins (or an exec, a
    restore, a queue, a pause); the others' messages are read once its
    "budget-dropped" is. (Session 45's "releases" / "releases-told", and the
    hello's "releases_wait", are retired: neither end of this release sends them.)

    what a worker holds back, asked for (session 48; only to a worker whose hello
    or state said "tells_held": true):
    coordinator -> worker   {"op": "tell-held"}        after a probe (any wake of the
                                                       table), while a fleet's capacity is
                                                       counted and the worker holds leases
                                                       or a budget (0.5 s apart at most):
                                                       it writes what it holds back now
                                                       (its fleets' answers, held grants,
                                                       releases, "logged"; nothing if it
                                                       holds none). Once asked, what it
                                                       holds waits for its next write or
                                                       1 s (its report due then goes with
                                                       it), not 0.2 s. An older worker
                                                       ignores it, and is sent none.

    after the supervisor re-executed (an upgrade), on every channel it kept:
    coordinator -> worker   {"op": "sync"}
    worker -> coordinator   {"op": "state", "pid": 1234, "generation": 1,
                             "held": [[7, "a"], ...], "waiting": [[9, ["a"], 0.25], ...],
                             "in_flight": [7],     held, its fleet's answer not read yet
                             "calls": [[7, {...}], ...]}  each open lease's "call", as its
                                                          "acquire" said (an older worker
                                                          sends none)
    just before the exec, to each worker taking calls whose hello (or state)
    said "budgets": true (an older worker is sent none, and behaves as before):
    coordinator -> worker   {"op": "budget", "fleets": [{"fleet": "a", "slots": 2,
                             "active": 5, "spec": {...}}, ...]}
    its grant budget (`core.slot_budget`): until it reads "sync" (or its
    channel ends) the worker grants calls from it itself, leastconn among
    its fleets ("active": the host's calls there at the hand-over), and says
    those leases in its "state" like any other; what is left at "sync" is
    dropped. Each such grant still sends its "acquire", with "budget": true
    and its "fleet": read before the "state" (counted there, not granted),
    it says who the call is should the worker die before its "state", and
    is counted as the host's grant once the "state" is taken (the worker's
    granted_total, the fleet's opened_total). The shares of a fleet
    sum to at most its free slots. A fleet's "standing": n (a worker with a
    standing budget) says n of its "slots" are that budget's rest as the
    coordinator last read it: the worker keeps of those n only what its own
    copy has left (a grant from it whose "acquire" was not read yet is in n).
    The worker is the truth: what it sent before "state" is already counted
    in it, so the coordinator acts on nothing before but a "report" (and a
    "state" that answered the image before). A line the old image had half
    read when it handed the channel over is not lost: it carries what it had
    read of it over the exec (`SlotServer.unread`) and the new image reads
    that first, then the rest, the line whole. (From an old image that did
    not carry it, the tail is not a message and is skipped.)

    stats (`core.host_view`): the coordinator asks, the worker answers with
    everything it has counted since it started; it also sends one unasked,
    "final": true, as it exits cleanly (drained), so that nothing is lost.
    coordinator -> worker   {"op": "report"}
    worker -> coordinator   {"op": "report", "pid": 1234, "generation": 1, "seq": 5,
                             "started": WALL, "calls": 3, "draining": false,
                             "final": false, "process": {...}, "counts": {...}}
    Reports are whole and cumulative: one read twice or lost changes nothing,
    so they are taken in every state, while restoring after a re-execution too.

Versions meet on this channel: after an upgrade a newer supervisor speaks to
the old generation's workers until they have drained (and a downgrade the
other way round). So an op this end does not know is logged once (its name
and the peer's pid) and ignored, on both ends, in any state: the peer is
newer, not broken, and cutting its channel would cost a worker its slots and
make it stop accepting. A new op must therefore be one the old end may
ignore (an answer it would wait for is the newer end's to do without). What
is not this protocol still closes the channel: a line that is not JSON, not
an object with an "op", or longer than `MAX_LINE`; and a known op that is
out of place (an "acquire" before "hello") or whose fields are wrong.

Lines, not length prefixes: a human can read a capture (`socat -v`), and a
line is bounded (`MAX_LINE`), so a confused peer cannot make either end
buffer without end. A stream socket keeps order both ways, which the lease
protocol relies on: a release sent after an acquire is read after it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fleet_ingress.core.fleet_spec import Admin, FleetSpec
from fleet_ingress.logs import fields

log = logging.getLogger("fleet_ingress.slots")

# What the supervisor sends a worker (a grant, a reload's config): far below this.
MAX_LINE = 1024 * 1024
# What a worker sends the supervisor: its report names every fleet it carried a
# call for (0.1 to 3 KB a fleet, its name in each key: 259 characters at most,
# a key per status and end reason), its state after an exec every call it holds
# with its fleet's name. 1 MiB was passed by one worker's report at about 720
# fleets named at the limit, 330 with three statuses and five end reasons a
# fleet (1,800 so at 20-character names), and the supervisor cut the channel as
# broken: that worker took no new call and its calls were cut at
# timeouts.drain, and the next worker did the same once it had carried as many
# (the scale audit of session 32). Still a bound, so a confused worker cannot
# make the supervisor buffer without end: some 20,000 fleets at the names' limit.
MAX_WORKER_LINE = 64 * 1024 * 1024


class WireError(ValueError):
    """The peer sent something that is not this protocol; the channel is closed."""


class UnknownOps:
    """The ops a peer sent that this end does not know: each logged once per
    channel, then ignored (see the module's docstring)."""

    __slots__ = ("_seen",)

    # A confused peer inventing names must not grow this without end: past
    # this many, new names go unlogged (ignored all the same).
    KEPT = 32

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def ignore(self, op: str, **peer: Any) -> None:
        if op in self._seen or len(self._seen) >= self.KEPT:
            return
        self._seen.add(op)
        log.warning(
            "slot channel: op not known to this version ignored (the peer runs other "
            "code, e.g. during an upgrade); logged once per op",
            extra=fields(op=op[:80], **peer),
        )


# Made once: `json.dumps` with `separators` builds an encoder per message, and
# `json.loads` of bytes sniffs their encoding each time; both ends send UTF-8
# (ASCII: `ensure_ascii`). Three messages a call on each end (the lease
# microbenchmark of session 37).
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()
# The C coders themselves, made once too: `JSONEncoder.encode` builds its C
# encoder and a float formatter per message, `JSONDecoder.decode` matches a
# whitespace pattern before and after (the supervisor's instructions per call,
# bench/supervisor_instructions.py). Without circular-reference marks: every
# message is a tree this code builds. The same bytes out, the same objects in.
_C_ENCODE = (
    None
    if json.encoder.c_make_encoder is None
    else json.encoder.c_make_encoder(
        None,
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        True,
    )
)
_SCAN = _DECODER.scan_once


def encode(message: dict[str, Any]) -> bytes:
    if _C_ENCODE is None:
        return _ENCODER.encode(message).encode() + b"\n"
    return "".join(_C_ENCODE(message, 0)).encode() + b"\n"


_ascii_string = json.encoder.encode_basestring_ascii


def granted_line(lease: int, fleet: str, queued: bool) -> bytes:
    """`encode` of a grant that carries no spec, the same bytes, formatted
    at once: the supervisor's one answer a call (the C encoder's argument
    parsing and its pieces joined were 11k instructions of it)."""
    if type(lease) is not int:  # as the encoder writes it: int's own repr
        return encode({"op": "granted", "id": lease, "fleet": fleet, "queued": queued})
    said = "true" if queued else "false"
    return (
        f'{{"op":"granted","id":{lease},"fleet":{_ascii_string(fleet)},"queued":{said}}}\n'.encode()
    )


class LineDecoder:
    """Bytes in, messages out; keeps a partial line between feeds."""

    __slots__ = ("_buffer", "_limit", "_no_newline")

    def __init__(self, pending: bytes = b"", *, limit: int = MAX_LINE) -> None:
        """`pending`: the head of the stream as another decoder had it (its
        `pending`), when this one takes the stream over from it: the line it
        had begun is read whole here. `limit`: the longest line taken."""
        self._buffer = bytearray(pending)
        self._limit = limit
        self._no_newline = 0  # how much of the buffer's head is known to hold none

    @property
    def pending(self) -> bytes:
        """What was fed and is not a whole line yet."""
        return bytes(self._buffer)

    def feed(self, data: bytes, *, skip_bad: bool = False) -> list[dict[str, Any]]:
        """`skip_bad`: drop lines that are not messages rather than raise (the
        tail of a line the previous image of the peer had half read and, from
        an older release, did not carry over: see `pending`)."""
        self._buffer += data
        messages: list[dict[str, Any]] = []
        # A long line read in many pieces is searched for its end in the new
        # bytes only, not again from its start each time.
        start, search = 0, self._no_newline
        while (end := self._buffer.find(b"\n", search)) >= 0:
            try:
                messages.append(_decode(bytes(self._buffer[start:end])))
            except WireError:
                if not skip_bad:
                    raise
            start = search = end + 1
        del self._buffer[:start]
        self._no_newline = len(self._buffer)
        if len(self._buffer) > self._limit:
            raise WireError(f"a line longer than {self._limit} bytes")
        return messages


def _decode(line: bytes) -> dict[str, Any]:
    try:
        # surrogatepass: as json.loads reads bytes.
        text = line.decode("utf-8", "surrogatepass")
        try:
            message, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            # Whitespace around it, or not JSON: as `json.loads` takes or refuses it.
            message = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise WireError(f"not JSON: {line[:80]!r}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise WireError(f"not a message (an object with an 'op'): {line[:80]!r}")
    return message


# Who a call is, as a worker's slot request says it ("call": `Call.described`).
# The supervisor keeps it while the lease is open; decoded, each request's
# keys are new strings, some 480 bytes a call held (the supervisor's memory a
# held call, session 41: 0.98 KiB the decoded "call"). Kept under these.
CALL_KEYS = (
    "call_id",
    "call",
    "started",
    "client_ip",
    "route",
    "bot_id",
    "started_at",
    "started_monotonic",
)
# Copied (its keys table cloned whole, in C) and the decoded call put over it:
# a key already there keeps the copy's string. 4k instructions a request, where
# a dict built key by key took 10k to 14k (bench/supervisor_ops.py).
_CALL_TEMPLATE = dict.fromkeys(CALL_KEYS)


def call_kept(call: dict[str, Any]) -> dict[str, Any]:
    """`call` as a slot request said it, to keep: equal to it, the keys of
    CALL_KEYS this module's own strings (one string a key for every call
    kept), in that order, others after them as they came. A call that lacks
    one of them is kept as it came."""
    kept = _CALL_TEMPLATE.copy()
    kept.update(call)
    return kept if len(kept) == len(call) else call


def field(message: dict[str, Any], name: str, kind: type) -> Any:
    """`message[name]` when it has type `kind`, else WireError naming it."""
    value = message.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"{message.get('op')!r} message: {name!r} must be {kind.__name__}")
    return value


def spec_to_wire(spec: FleetSpec) -> dict[str, Any]:
    return {
        "url": spec.url,
        "name": spec.name,
        "scheme": spec.scheme,
        "host": spec.host,
        "port": spec.port,
        "host_header": spec.host_header,
        "maxconn": spec.maxconn,
        "admin": spec.admin.value,
    }


def spec_from_wire(data: Any) -> FleetSpec:
    if not isinstance(data, dict):
        raise WireError("'spec' must be an object")
    try:
        return FleetSpec(
            url=str(data["url"]),
            name=str(data["name"]),
            scheme=str(data["scheme"]),
            host=str(data["host"]),
            port=int(data["port"]),
            host_header=str(data["host_header"]),
            maxconn=int(data["maxconn"]),
            admin=Admin(data["admin"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise WireError(f"'spec' is not a fleet: {exc}") from exc
