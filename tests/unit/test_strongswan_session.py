"""The VICI session's error contract (hookspecs): daemon down -> ECONNREFUSED, garbage -> EPROTO."""

from __future__ import annotations

import errno
import socket
import threading

import pytest

from btns_vici.core.errors import BackendError, ProtocolError
from btns_vici.strongswan.events import EventStream
from btns_vici.strongswan.session import ViciSession, decode_bytes


def test_vici_errors_are_precise(tmp_path):
    """No daemon -> ECONNREFUSED; a peer that answers garbage -> EPROTO."""
    with pytest.raises(BackendError) as down:
        ViciSession(str(tmp_path / "missing.vici")).request("version")
    assert down.value.errno == errno.ECONNREFUSED

    path = str(tmp_path / "garbage.vici")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(4096)
        body = b"\x01\x03\x07version\x01\x07ab"  # CMD_RESPONSE, KEY_VALUE of 0x107 bytes, cut short
        conn.sendall(len(body).to_bytes(4, "big") + body)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(ProtocolError) as bad:
            ViciSession(path).request("version")
        assert bad.value.errno == errno.EPROTO
    finally:
        t.join(5)
        srv.close()


def test_event_stream_needs_a_daemon(tmp_path):
    with pytest.raises(BackendError) as exc:
        EventStream(str(tmp_path / "none.vici"))
    assert exc.value.errno == errno.ECONNREFUSED


@pytest.mark.parametrize("raw", [b"\x01\x04x", b"\x09", b"\x02", b"\x04\x01l\x05\x00\x01a\x07", b"\x01\x01s"])
def test_strict_decoder_rejects(raw):
    with pytest.raises(ProtocolError):
        decode_bytes(raw)
