"""VICI framing without I/O (strongswan.session.PacketBuffer): what the event stream and the
barrier read from charon, fed in every possible split."""

from __future__ import annotations

import errno

import pytest

from btns_vici.core.errors import ProtocolError
from btns_vici.strongswan.session import HEADER, MAX_PACKET, PacketBuffer, frame


def test_whole_packets_come_out_whatever_the_split() -> None:
    packets = [b"\x05abc", b"\x01" + bytes(300), b"\x03"]
    wire = b"".join(frame(p) for p in packets)
    for step in (1, 2, 3, 5, 7, len(wire)):
        buf = PacketBuffer()
        out = []
        for i in range(0, len(wire), step):
            buf.feed(wire[i : i + step])
            while (raw := buf.pop()) is not None:
                out.append(raw)
        assert out == packets, step
        assert len(buf) == 0 and buf.need() == HEADER.size


def test_need_says_how_many_bytes_are_missing() -> None:
    buf = PacketBuffer()
    assert buf.need() == 4 and buf.pop() is None
    buf.feed(frame(b"\x05hello")[:2])
    assert buf.need() == 2
    buf.feed(frame(b"\x05hello")[2:7])
    assert buf.need() == 3 and buf.pop() is None
    buf.feed(b"llo")
    assert buf.need() == 0 and buf.pop() == b"\x05hello"


@pytest.mark.parametrize("length", [0, MAX_PACKET + 1, 0xFFFFFFFF])
def test_an_empty_or_oversized_packet_is_refused_from_its_header(length: int) -> None:
    buf = PacketBuffer()
    buf.feed(HEADER.pack(length))
    with pytest.raises(ProtocolError) as err:
        buf.need()
    assert err.value.errno == errno.EPROTO
    with pytest.raises(ProtocolError):
        buf.pop()


def test_the_largest_packet_charon_sends_is_accepted() -> None:
    buf = PacketBuffer()
    buf.feed(frame(b"\x01" + bytes(MAX_PACKET - 1)))
    assert len(buf.pop() or b"") == MAX_PACKET
