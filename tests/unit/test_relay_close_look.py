"""A linked side's hot path (net/proxy.py `data_received`) hears a close frame
the way the tracker's return tells it: tracked, wherever it is; once the
tracker gave up, a read that is one whole close frame alone, and no other
read of a close frame's length (a text frame's first byte is not 0x88). No
socket: the side is made as a link leaves it, its peer a recorder."""

from __future__ import annotations

import pytest

from fleet_ingress.core.ws_frames import FrameTracker
from fleet_ingress.net import proxy


class _Peer:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: object) -> None:
        self.written += data  # type: ignore[operator]


def _frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    mask = b"\x01\x02\x03\x04" if masked else b""
    return bytes((opcode, (0x80 if masked else 0) | len(payload))) + mask + payload


class _Carrier(proxy.CarrierProtocol):
    __slots__ = ("heard",)

    def say_close_frame(self) -> None:
        self.heard.append("close")


class _Fleet(proxy.FleetProtocol):
    __slots__ = ("heard",)

    def say_close_frame(self) -> None:
        self.heard.append("close")


def _linked(cls: type[proxy._Side], *, gave_up: bool) -> tuple[proxy._Side, list[str]]:
    heard: list[str] = []
    side = object.__new__(cls)
    side.heard = heard  # type: ignore[attr-defined]
    proxy._Side.__init__(side)
    side.peer = _Peer()  # type: ignore[assignment]
    side.tracker = FrameTracker()
    if gave_up:
        side.tracker.give_up()
    if isinstance(side, proxy.FleetProtocol):
        side.exchange = None
    return side, heard


@pytest.mark.parametrize("cls", [_Carrier, _Fleet])
@pytest.mark.parametrize("gave_up", [False, True])
def test_a_close_frame_alone_is_heard_and_a_text_frame_of_its_length_is_not(
    cls: type[proxy._Side], gave_up: bool
) -> None:
    side, heard = _linked(cls, gave_up=gave_up)
    masked = cls._masked
    media = _frame(0x81, b"x" * 100, masked=masked)
    for read in (media, _frame(0x81, b"\x03\xe8", masked=masked), media):
        side.data_received(memoryview(read))
    assert heard == []
    side.data_received(memoryview(_frame(0x88, b"\x03\xe8", masked=masked)))
    assert heard == ["close"]
    side.data_received(memoryview(media))  # a broken peer's: heard once
    assert heard == ["close"]
    assert side.bytes_received == 3 * len(media) + 2 * (4 + 4 * masked)
    assert bytes(side.peer.written).count(b"x" * 100) == 3  # type: ignore[union-attr]
