"""Where WebSocket frames begin in a relayed byte stream, and the close frame
the ingress sends a side of a tunnel it ends. No I/O.

The ingress relays a tunnel's bytes unchanged and never re-frames a message.
When it ends a call itself (a drain, a forced removal, an idle tunnel, a side
gone), each side still open is told why with a close frame of its own (RFC
6455 5.5.1), as a WebSocket server or client would: 1001 going away, 1011 an
error. Without one, every such end reached the carrier and the bot as 1006
(abnormal closure), the same as a network failure (the endings audit of
session 25). A close frame must not land inside a frame in flight, so a
`FrameTracker` per direction is fed every relayed read from the first byte
after the fleet's 101: it keeps the bytes left in the frame under way and a
header split across reads.

Cost: where the tracker is at rest (a frame boundary, the spare full: every
read of a steady call), a read that is one whole frame (the common read: a
media frame a record) is judged by its first four bytes, read in one unpack,
against a table, with no further call; a read inside a frame's payload is a
few comparisons (callgrind, session 49: a whole frame's read 1,470
instructions over an empty call's, 2,240 before; session 45: 5,000 when it
went through `_frame_end`); a read that holds other frame starts walks their
headers (about 0.25 us each). A stream of tiny frames would make that walk
the dearest part of a read, so past
`max_frames(n)` frame starts in one read of n bytes the tracker draws on a
spare of SPARE_FRAMES (refilled by what each read leaves of its allowance),
and once that is spent it gives up for good: that direction then ends without
a close frame, as before. The spare is for a burst: a bot's text-to-speech
sent faster than real time through a plain (http://) fleet connection, whose
reads hold hundreds of frames, each a few bytes once permessage-deflate has
compressed silence (the WebSocket shapes check of session 37: 500 such frames
made the tracker give up, and a drain's carrier got no 1001).
"""

from __future__ import annotations

import struct

# What a relayed read may be (tls_socket's reads are memoryviews of a shared buffer).
Buffer = bytes | bytearray | memoryview

# Close codes (RFC 6455 7.4.1).
GOING_AWAY = 1001
# A close frame's first byte: FIN and opcode 8, no RSV bit (a control frame is
# never fragmented nor compressed). A first byte with opcode 8 otherwise is no
# close frame a peer accepts (nor a stream that is not WebSocket at all).
_CLOSE_FIRST_BYTE = 0x88
INTERNAL_ERROR = 1011
# Frame starts walked in one read at most: 64, plus one per 64 bytes (media
# frames are hundreds of bytes; a backlog read of 256 KiB from a plain fleet
# may hold a thousand of them).
FRAMES_PER_READ = 64
BYTES_PER_FRAME = 64
# Frame starts a direction may walk past its reads' allowances, for a burst;
# the unused allowance of every read puts some back (at most this many):
# about 1 ms of header walk past the reads' allowances, at most, at a time.
SPARE_FRAMES = 4096
GAVE_UP = 1 << 62  # `need` once given up: every later read takes the first branch
# `FrameTracker.closed`: a close frame started (its header seen), or read whole.
CLOSE_STARTED = 1
CLOSE_WHOLE = 2
# A close frame's payload: the code (2 bytes) and at most 123 bytes of reason.
MAX_REASON = 123
# A frame's first four bytes: its first byte, its second (mask bit, length),
# and the 16-bit length that follows a length of 126 (feed's common read).
_FIRST_FOUR = struct.Struct("!BBH").unpack_from
# A frame's header bytes by its second byte: 2, 2 more for a 16-bit length
# (126), 8 more for a 64-bit one (127), 4 more for a masking key.
_HEADER_BYTES = tuple(
    (2 if b & 0x7F < 126 else 4 if b & 0x7F == 126 else 10) + (4 if b & 0x80 else 0)
    for b in range(256)
)
# By its second byte, what says a read of n bytes is one whole frame (`feed`'s
# common read, its 16-bit length following the second byte): a 16-bit length
# (126), n - the length is _HEADER16[second] (its header: 4, or 8 masked); a 7-bit
# one, n is _WHOLE7[second] (its header and payload). Else _NOT_THIS_FORM, less
# than n - a 16-bit number ever is (a 64-bit length is walked). Compared so, no
# int is made (n - length is 4 or 8, a small int: the product and sum of the
# tables before were two ints made and freed a read, callgrind, session 49).
_NOT_THIS_FORM = -(1 << 20)
_HEADER16 = tuple(_HEADER_BYTES[b] if b & 0x7F == 126 else _NOT_THIS_FORM for b in range(256))
_WHOLE7 = tuple(
    _HEADER_BYTES[b] + (b & 0x7F) if b & 0x7F < 126 else _NOT_THIS_FORM for b in range(256)
)


def max_frames(n: int) -> int:
    return FRAMES_PER_READ + n // BYTES_PER_FRAME


class FrameTracker:
    __slots__ = ("at_rest", "closed", "in_payload", "need", "partial", "spare")

    def __init__(self) -> None:
        self.need = 0  # bytes left in the frame under way (rest of header + payload)
        self.partial = b""  # a header's first bytes, split across reads
        self.spare = SPARE_FRAMES  # frame starts walkable past a read's allowance
        # At a frame boundary, no header split, the spare full: a read of one
        # whole frame other than a close frame changes nothing (`feed`'s first
        # look, one attribute for three; `_feed` sets it after every other read).
        self.at_rest = True
        # Inside a frame's payload (not given up), the spare full: a read that
        # ends at or before the payload's end changes `need` alone (`feed`'s
        # second look).
        self.in_payload = False
        # A close frame started this way (nothing may follow it, the ingress's
        # own neither), seen wherever it was in a read: 0, CLOSE_STARTED, or
        # CLOSE_WHOLE once its last byte is read. Then the call machine hears
        # of it (CloseFrameSeen, net/proxy.py _Side.close_frame_read), whatever
        # a broken peer sent after it in the same read (a frame's first bytes:
        # before, such a close went unheard until that frame was whole).
        self.closed = 0

    @property
    def at_boundary(self) -> bool:
        """The next byte relayed starts a frame."""
        return self.need == 0 and not self.partial

    @property
    def close_whole(self) -> bool:
        """A close frame was read to its last byte."""
        closed = self.closed
        return closed == CLOSE_WHOLE or (closed != 0 and self.need == 0 and not self.partial)

    @property
    def gave_up(self) -> bool:
        return self.need >= GAVE_UP

    def feed(self, data: Buffer, n: int = 0) -> int:
        """`data` was relayed, in this direction (`n`: its length, when the
        caller has it: a relayed read's hot path; 0, not given: no read is
        empty, and the first look takes no read of 0 bytes). Returns nonzero when the
        caller is to look at this read for a close frame: one started in this
        direction (`closed`; 0 for a read of one whole frame other than a
        close frame: one before it was whole in an earlier read, and returned
        nonzero there), or the tracker gave up (`gave_up`: the direction is
        untracked from now on, a read alone may be a close frame). The hot
        path's one look after a read, where it read `closed` and then took
        the untracked direction's lone-read check too (about 150
        instructions a read less, callgrind, session 47)."""
        if self.at_rest:  # one whole frame, not a close frame: the common read?
            try:
                first, second, length16 = _FIRST_FOUR(data)
            except struct.error:  # a read of 3 bytes or fewer: judged below
                pass
            else:
                # Its length from a table by its second byte (fewer steps than
                # from the byte's bits: callgrind, session 46), the 16-bit form
                # first (media frames); 0x88: a close frame's first byte
                # (_CLOSE_FIRST_BYTE, a constant here: no global read).
                if (n - length16 == _HEADER16[second] or n == _WHOLE7[second]) and first != 0x88:
                    return 0
        elif self.in_payload and (need := self.need) >= n and n:
            # Inside a frame's payload (a frame over reads: a large one, or one
            # TCP cut): no frame start, nothing to refill.
            self.need = need = need - n
            if need == 0:
                self.at_rest, self.in_payload = True, False
            return self.closed
        told = self._feed(data, n or len(data))
        need, full = self.need, self.spare >= SPARE_FRAMES
        self.at_rest = need == 0 and full and not self.partial
        # Not given up: by a walk, or a 64-bit length no stream ends (the spare
        # may be full then).
        self.in_payload = 0 < need < GAVE_UP and full
        return told

    def give_up(self) -> None:
        """Track this direction no further: every later read may be a close
        frame alone (`feed` returns nonzero for each)."""
        self.need, self.partial, self.spare = GAVE_UP, b"", 0
        self.at_rest = self.in_payload = False

    def _feed(self, data: Buffer, n: int) -> int:
        """`feed` but for its first look (every read the tracker is not at rest
        for, or that is not one whole frame other than a close frame)."""
        need = self.need
        if need == 0 and not self.partial:  # one whole frame, the common read?
            # Its first four bytes in one unpack, its length from two tables
            # (fewer steps than from the second byte's bits: callgrind, session 46).
            try:
                first, second, length16 = _FIRST_FOUR(data)
            except struct.error:  # a read of 3 bytes or fewer: judged below
                pass
            else:
                if n - length16 == _HEADER16[second] or n == _WHOLE7[second]:
                    if self.spare < SPARE_FRAMES:
                        self._refill(max_frames(n) - 1)
                    if first == _CLOSE_FIRST_BYTE:
                        self.closed = CLOSE_WHOLE
                        return CLOSE_WHOLE
                    # Any close frame before this one was whole before it, and
                    # seen then: nothing to look at.
                    return 0
        elif need >= n:  # inside a frame's payload (or given up)
            if need < GAVE_UP:
                self.need = need - n
                if self.spare < SPARE_FRAMES:  # no frame start: its allowance unused
                    self._refill(max_frames(n))
                return self.closed
            return need  # given up
        if self.partial:
            end = self._end_of_split_header(data)
            if end is None:
                self.partial += bytes(data)
                return self.closed
            if self.partial[0] == _CLOSE_FIRST_BYTE:
                self.closed = CLOSE_WHOLE if end <= n else CLOSE_STARTED
            self.partial = b""
            need = end
        elif need == 0 and n < 4 and _frame_end(data, 0) == n:  # one whole frame of 2 or 3 bytes
            if data[0] == _CLOSE_FIRST_BYTE:
                self.closed = CLOSE_WHOLE
            if self.spare < SPARE_FRAMES:
                self._refill(max_frames(n) - 1)
            return self.closed
        elif self.closed == CLOSE_STARTED:  # the close frame under way ends in this read
            self.closed = CLOSE_WHOLE
        self._walk(data, need, n)
        return self.closed or self.need >= GAVE_UP

    def boundary_in(self, data: Buffer) -> int:
        """Where the frame under way ends in `data` (about to be relayed, not
        fed yet): 0 at once, -1 not within it."""
        n = len(data)
        if self.partial:
            end = self._end_of_split_header(data)
            if end is None:
                return -1
        else:
            end = self.need
        return end if end <= n else -1

    def _end_of_split_header(self, data: Buffer) -> int | None:
        """Where in `data` the frame whose header began in `partial` ends (may
        be past `data`); None when the header is not whole yet."""
        skip = len(self.partial)
        end = _frame_end(self.partial + bytes(data[:14]), 0)
        return None if end < 0 else end - skip

    def _walk(self, data: Buffer, pos: int, n: int) -> None:
        allowance = max_frames(n)
        spare = self.spare
        frames, limit = 0, allowance + spare
        while pos < n:
            frames += 1
            if frames > limit:
                self.give_up()
                return
            end = _frame_end(data, pos)
            if end < 0:
                self.partial = bytes(data[pos:n])
                self.need = 0
                break
            if data[pos] == _CLOSE_FIRST_BYTE:
                if end <= n:
                    self.closed = CLOSE_WHOLE
                elif self.closed != CLOSE_WHOLE:  # a broken peer's second: the first stands
                    self.closed = CLOSE_STARTED
            pos = end
        else:
            self.need = pos - n
        if frames > allowance or spare < SPARE_FRAMES:  # drawn on, or refilled
            self._refill(allowance - frames)

    def _refill(self, unused: int) -> None:
        """What a read left of its allowance goes back to the spare (a read
        past it draws: `unused` < 0), at most SPARE_FRAMES. Every read earns
        it, the common ones too (one whole frame; inside a payload): refilled
        only by the reads walked, a bot's media, a frame a read, put nothing
        back, and a call's twelfth burst of 500 tiny frames gave up (review37a).
        So the walk stays within every read's allowance plus one spare."""
        spare = self.spare + unused
        self.spare = spare if spare < SPARE_FRAMES else SPARE_FRAMES


def _frame_end(data: Buffer, pos: int) -> int:
    """Where the frame starting at `pos` ends (may be past `data`); -1 when its
    header is not all there."""
    left = len(data) - pos
    if left < 2:
        return -1
    second = data[pos + 1]
    length = second & 0x7F
    header = 6 if second & 0x80 else 2  # a masking key follows a masked frame's length
    if length == 126:
        if left < 4:
            return -1
        length = (data[pos + 2] << 8) | data[pos + 3]
        header += 2
    elif length == 127:
        if left < 10:
            return -1
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        header += 8
    return pos + header + length


def close_frame(code: int, reason: str, mask: bytes | None) -> bytes:
    """A close frame: masked with the 4-byte `mask` toward the fleet (the
    ingress as its client), unmasked (None) toward the carrier (as its server).
    Never compressed: a control frame keeps RSV1 at 0 whatever
    permessage-deflate was agreed."""
    said = reason.encode()
    if len(said) > MAX_REASON:  # cut between two characters, not inside one
        said = said[:MAX_REASON].decode("utf-8", "ignore").encode()
    payload = struct.pack("!H", code) + said
    if mask is None:
        return bytes((0x88, len(payload))) + payload
    if len(mask) != 4:
        raise ValueError("a WebSocket masking key is 4 bytes")
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes((0x88, 0x80 | len(payload))) + mask + body
