"""btnsd's wire protocol, sans I/O: every byte string is a frame or a precise FrameError (EPROTO)."""

from __future__ import annotations

import errno
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btns_vici import PToken, Setting
from btns_vici.broker import protocol
from btns_vici.core.errors import BtnsError


def test_round_trip_of_a_request_and_a_response() -> None:
    ident, payload = protocol.decode(protocol.request("hello", 7, x=1), protocol.REQUEST)
    assert (ident, payload) == (7, {"op": "hello", "x": 1})
    ident, payload = protocol.decode(protocol.ok(9, {"a": [1, 2]}), protocol.RESPONSE)
    assert ident == 9 and protocol.raise_for(payload) == {"a": [1, 2]}


def test_an_error_response_raises_its_errno() -> None:
    _, payload = protocol.decode(protocol.error(3, BtnsError("nope", errno.EACCES)), protocol.RESPONSE)
    with pytest.raises(OSError) as e:
        protocol.raise_for(payload)
    assert e.value.errno == errno.EACCES and "nope" in str(e.value)


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (b"", errno.EPROTO),
        (b"XX\x01\x01" + bytes(8), errno.EPROTO),  # magic
        (b"BT\x02\x01" + bytes(8), errno.EPROTONOSUPPORT),  # version
        (b"BT\x01\x02" + bytes(8), errno.EPROTO),  # a response where a request belongs
        (b"BT\x01\x01" + bytes(4) + (99).to_bytes(4, "big") + b"{}", errno.EPROTO),  # length
        (protocol.frame(protocol.REQUEST, 1, b"\xff\xfe"), errno.EPROTO),  # not UTF-8
        (protocol.frame(protocol.REQUEST, 1, b"[1,2]"), errno.EPROTO),  # not an object
        (protocol.frame(protocol.REQUEST, 1, json.dumps({"a": [[[[[[[[[[1]]]]]]]]]]}).encode()), errno.EPROTO),
        (b"BT\x01\x01" + bytes(4) + (70000).to_bytes(4, "big") + bytes(70000), errno.EPROTO),  # oversized
    ],
)
def test_malformed_frames_are_refused_with_a_precise_errno(packet: bytes, code: int) -> None:
    with pytest.raises(protocol.FrameError) as e:
        protocol.decode(packet, protocol.REQUEST)
    assert e.value.errno == code


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_frame_or_a_frame_error(data: bytes) -> None:
    for packet in (data, b"BT\x01\x01" + data, protocol.frame(protocol.REQUEST, 1, data)):
        try:
            protocol.decode(packet, protocol.REQUEST)
        except protocol.FrameError as exc:
            assert exc.errno in (errno.EPROTO, errno.EPROTONOSUPPORT)


def test_ptoken_wire_form_round_trips() -> None:
    p = PToken()
    p.privacy_protected = Setting.LEVEL_HIGH
    p.policy_name = "conn/child"
    back = protocol.ptoken_from_wire(protocol.ptoken_to_wire(p), trusted=False)
    assert back.privacy_protected == Setting.LEVEL_HIGH and back.policy_name == "conn/child"


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        {"attrs": []},
        {"attrs": {"nosuch": "00"}},
        {"attrs": {"privacyProtected": "zz"}},
        {"attrs": {"privacyProtected": "0900"}},
        {"attrs": {}, "local_ts": [["x", "y", 0, 0, 0]]},
        {"attrs": {}, "local_ts": "nope"},
        {"attrs": {"privacyProtected": 5}},
    ],
)
def test_a_malformed_demand_is_einval(wire: object) -> None:
    with pytest.raises(BtnsError) as e:
        protocol.ptoken_from_wire(wire, trusted=False)
    assert e.value.errno == errno.EINVAL


def test_a_client_cannot_write_what_only_the_library_may() -> None:
    wire = {"attrs": {"informationString": b"protected!\0".hex()}}
    with pytest.raises(BtnsError) as e:
        protocol.ptoken_from_wire(wire, trusted=False)
    assert e.value.errno == errno.EPERM


def test_the_hot_request_is_the_json_it_stands_for() -> None:
    """Both ends skip JSON for get_socket_ptoken: its fixed bytes must be exactly what the general
    encoder makes, so a client in another language that encodes it normally is understood."""
    assert protocol.body_of({"op": "get_socket_ptoken"}) == protocol.HOT_BODY
    ident, payload = protocol.decode(protocol.request("get_socket_ptoken", 5), protocol.REQUEST)
    assert (ident, payload) == (5, protocol.HOT_REQUEST)
    assert protocol.request("get_socket_ptoken", 5) == protocol.encode(protocol.REQUEST, 5, protocol.HOT_REQUEST)
    # with arguments it is an ordinary request
    _, payload = protocol.decode(protocol.request("get_socket_ptoken", 6, x=1), protocol.REQUEST)
    assert payload == {"op": "get_socket_ptoken", "x": 1}


def test_a_notification_is_its_own_kind() -> None:
    note = protocol.notify({"event": "latch-broken", "key": [1, 2], "reasons": ["gone"]})
    ident, payload = protocol.decode(note, protocol.NOTIFY)
    assert ident == 0 and payload["event"] == "latch-broken"
    with pytest.raises(protocol.FrameError):
        protocol.decode(note, protocol.RESPONSE)  # never mistaken for an answer
    assert protocol.OPS["latch"] is True and protocol.OPS["watch"] is False and protocol.OPS["unlatch"] is False
