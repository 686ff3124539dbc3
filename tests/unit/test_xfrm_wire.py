"""XFRM wire decoding on crafted bytes: layouts, byte order, and leniency towards garbage."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btns_vici.xfrm import _wire as wire
from btns_vici.xfrm import socket_template
from btns_vici.xfrm._records import XfrmEvent, XfrmPolicy, XfrmState
from btns_vici.xfrm._wire import XfrmDecodeWarning

V4 = ipaddress.IPv4Address
INF = 0xFFFF_FFFF_FFFF_FFFF


def a16(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def selector(src: str, dst: str, plen_s: int, plen_d: int, sport: int, dport: int, proto: int) -> bytes:
    # Written out independently of the module: ports big-endian, the rest native, explicit pads.
    ports = struct.pack("!HHHH", dport, 0xFFFF if dport else 0, sport, 0xFFFF if sport else 0)
    return a16(dst) + a16(src) + ports + struct.pack("=HBBB3xiI", socket.AF_INET, plen_d, plen_s, proto, 0, 0)


def usersa_info(spi: int = 0xC0FFEE01, reqid: int = 7, mode: int = 0) -> bytes:
    sel = selector("10.0.0.1", "10.0.0.2", 32, 32, 40000, 443, 6)
    xid = a16("10.0.0.2") + struct.pack("!I", spi) + struct.pack("=B3x", 50)
    lft = struct.pack("=8Q", INF, INF, INF, INF, 0, 3600, 0, 0)
    cur = struct.pack("=4Q", 1234, 5, 1_700_000_000, 0)
    stats = struct.pack("=3I", 0, 1, 2)
    tail = struct.pack("=IIHBBB7x", 99, reqid, socket.AF_INET, mode, 32, 0)
    return sel + xid + a16("10.0.0.1") + lft + cur + stats + tail


def userpolicy_info(direction: int = 1, priority: int = 100, index: int = 0x41) -> bytes:
    sel = selector("10.1.0.0", "10.2.0.1", 16, 32, 0, 80, 6)
    lft = struct.pack("=8Q", INF, INF, INF, INF, 0, 0, 0, 0)
    return sel + lft + struct.pack("=4Q", 0, 0, 0, 0) + struct.pack("=IIBBBB4x", priority, index, direction, 0, 0, 0)


def user_tmpl(dst: str = "2.2.2.2", src: str = "1.1.1.1", reqid: int = 9, mode: int = 1) -> bytes:
    xid = a16(dst) + struct.pack("!I", 0) + struct.pack("=B3x", 50)
    return xid + struct.pack("=H2x", socket.AF_INET) + a16(src) + struct.pack("=IBBBxIII", reqid, mode, 0, 0, 1, 2, 3)


def attr(atype: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), atype) + payload + b"\0" * (-len(payload) % 4)


def algo(name: bytes, key_bits: int, extra: int | None = None) -> bytes:
    head = struct.pack("=64sI", name, key_bits) + (b"" if extra is None else struct.pack("=I", extra))
    return head + b"\xaa" * (key_bits // 8)


def message(mtype: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 1, 0) + body


def sa_message(*attrs: bytes) -> bytes:
    return message(16, usersa_info() + b"".join(attrs))


def test_layouts_have_the_uapi_sizes() -> None:
    # Sizes as printed by sizeof() against /usr/include/linux/xfrm.h (see test below).
    expected = {
        "SELECTOR": 56,
        "XFRM_ID": 24,
        "LIFETIME_CFG": 64,
        "LIFETIME_CUR": 32,
        "STATS": 12,
        "USERSA_INFO": 224,
        "USERPOLICY_INFO": 168,
        "USER_TMPL": 64,
        "USER_ACQUIRE": 280,
        "USER_EXPIRE": 232,
        "USER_POLEXPIRE": 176,
        "USERSA_ID": 24,
        "USERPOLICY_ID": 64,
        "ALGO": 68,
        "ALGO_LEN": 72,
        "ENCAP_TMPL": 24,
        "MARK": 8,
    }
    assert {name: getattr(wire, name).size for name in expected} == expected


@pytest.mark.skipif(
    not (shutil.which("cc") and Path("/usr/include/linux/xfrm.h").exists()), reason="needs cc and UAPI headers"
)
def test_layouts_match_the_installed_uapi_header(tmp_path: Path) -> None:
    structs = {
        "SELECTOR": "xfrm_selector",
        "XFRM_ID": "xfrm_id",
        "USERSA_INFO": "xfrm_usersa_info",
        "USERPOLICY_INFO": "xfrm_userpolicy_info",
        "USER_TMPL": "xfrm_user_tmpl",
        "USER_ACQUIRE": "xfrm_user_acquire",
        "USER_EXPIRE": "xfrm_user_expire",
        "USER_POLEXPIRE": "xfrm_user_polexpire",
        "USERSA_ID": "xfrm_usersa_id",
        "USERPOLICY_ID": "xfrm_userpolicy_id",
        "ALGO": "xfrm_algo",
        "ALGO_LEN": "xfrm_algo_aead",
        "ENCAP_TMPL": "xfrm_encap_tmpl",
    }
    body = "".join(f'printf("{k} %zu\\n", sizeof(struct {v}));' for k, v in structs.items())
    src = tmp_path / "sizes.c"
    src.write_text(f"#include <stdio.h>\n#include <linux/xfrm.h>\nint main(void){{{body}return 0;}}\n")
    subprocess.run(["cc", "-o", str(tmp_path / "sizes"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "sizes")], check=True, capture_output=True, text=True).stdout
    sizes = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert sizes == {k: getattr(wire, k).size for k in structs}


def test_state_fields_and_byte_order() -> None:
    raw = sa_message(
        attr(2, algo(b"cbc(aes)", 128)),
        attr(20, algo(b"hmac(sha256)", 256, 128)),
        attr(4, struct.pack("=H", 2) + struct.pack("!HH", 4500, 4501) + b"\0\0" + b"\0" * 16),
        attr(21, struct.pack("=II", 0x42, 0xFF)),
        attr(31, struct.pack("=I", 5)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st_ = wire.decode_message(raw)
    assert isinstance(st_, XfrmState)
    assert (st_.spi, st_.proto, st_.reqid, st_.mode_name, st_.proto_name) == (0xC0FFEE01, 50, 7, "transport", "esp")
    assert (st_.saddr, st_.daddr) == (V4("10.0.0.1"), V4("10.0.0.2"))
    assert (st_.sel.sport, st_.sel.dport, st_.sel.proto) == (40000, 443, 6)
    assert (st_.sel.sport_mask, st_.sel.dport_mask) == (0xFFFF, 0xFFFF)
    assert (st_.current.bytes, st_.current.packets) == (1234, 5)
    assert st_.lifetime.hard_add_expires_seconds == 3600 and st_.lifetime.soft_byte_limit == INF
    assert (st_.stats.replay, st_.stats.integrity_failed, st_.seq, st_.replay_window) == (1, 2, 99, 32)
    assert st_.algorithm("crypt").name == "cbc(aes)" and st_.algorithm("crypt").key_bits == 128
    auth = st_.algorithm("auth")
    assert (auth.name, auth.key_bits, auth.trunc_bits) == ("hmac(sha256)", 256, 128)
    assert (st_.encap.type, st_.encap.sport, st_.encap.dport, st_.encap.oa) == (2, 4500, 4501, None)
    assert (st_.mark.value, st_.mark.mask, st_.if_id) == (0x42, 0xFF, 5)
    assert "aa" * 4 not in repr(st_)  # no key bytes anywhere


def test_aead_and_comp() -> None:
    st_ = wire.decode_message(sa_message(attr(18, algo(b"rfc4106(gcm(aes))", 160, 128)), attr(3, algo(b"deflate", 0))))
    assert isinstance(st_, XfrmState)
    assert [(a.kind, a.name, a.key_bits, a.icv_bits) for a in st_.algorithms] == [
        ("aead", "rfc4106(gcm(aes))", 160, 128),
        ("comp", "deflate", 0, None),
    ]


def test_policy_with_templates() -> None:
    raw = message(19, userpolicy_info(direction=4, index=0x44) + attr(5, user_tmpl() + user_tmpl("3.3.3.3")))
    pol = wire.decode_message(raw)
    assert isinstance(pol, XfrmPolicy)
    assert pol.is_socket and pol.direction == "out" and pol.priority == 100 and pol.index == 0x44
    assert (pol.sel.saddr, pol.sel.prefixlen_s, pol.sel.dport, pol.sel.sport_mask) == (V4("10.1.0.0"), 16, 80, 0)
    assert [(t.daddr, t.saddr, t.reqid, t.mode_name, t.proto_name) for t in pol.templates] == [
        (V4("2.2.2.2"), V4("1.1.1.1"), 9, "tunnel", "esp"),
        (V4("3.3.3.3"), V4("1.1.1.1"), 9, "tunnel", "esp"),
    ]
    assert (pol.templates[0].aalgos, pol.templates[0].ealgos, pol.templates[0].calgos) == (1, 2, 3)


def test_events() -> None:
    expire = wire.decode_message(message(24, usersa_info() + struct.pack("=B7x", 1)))
    assert isinstance(expire, XfrmEvent) and expire.kind == "expire" and expire.hard and expire.state.reqid == 7
    sa_id = a16("10.0.0.2") + struct.pack("!I", 0xC0FFEE01) + struct.pack("=HBx", socket.AF_INET, 50)
    deleted = wire.decode_message(message(17, sa_id + attr(6, usersa_info())))
    assert deleted.kind == "del-sa" and deleted.state.spi == 0xC0FFEE01
    pol_id = selector("0.0.0.0", "0.0.0.0", 0, 0, 0, 0, 0) + struct.pack("=IB3x", 9, 1)
    deleted = wire.decode_message(message(20, pol_id + attr(7, userpolicy_info())))
    assert deleted.kind == "del-policy" and deleted.policy.direction == "out"
    acq = a16("10.0.0.2") + struct.pack("!I", 0) + struct.pack("=B3x", 50) + a16("10.0.0.1")
    acq += selector("10.0.0.1", "10.0.0.2", 32, 32, 0, 9, 6) + userpolicy_info() + struct.pack("=IIII", 1, 2, 3, 77)
    acquire = wire.decode_message(message(23, acq + attr(5, user_tmpl())))
    assert acquire.kind == "acquire" and acquire.acquire.seq == 77 and acquire.acquire.sel.dport == 9
    assert acquire.acquire.daddr == V4("10.0.0.2") and acquire.acquire.templates[0].reqid == 9
    flush = wire.decode_message(message(28, struct.pack("=B3x", 50)))
    assert flush.kind == "flush-sa" and flush.proto == 50


def test_unknown_attribute_is_skipped_with_a_warning() -> None:
    with pytest.warns(XfrmDecodeWarning, match="unknown XFRM attribute type 200"):
        st_ = wire.decode_message(sa_message(attr(200, b"\1\2\3\4"), attr(31, struct.pack("=I", 3))))
    assert isinstance(st_, XfrmState) and st_.if_id == 3


def test_short_attribute_is_skipped_with_a_warning() -> None:
    with pytest.warns(XfrmDecodeWarning, match="too short"):
        st_ = wire.decode_message(sa_message(attr(2, b"cbc(aes)"), attr(21, struct.pack("=II", 1, 2))))
    assert isinstance(st_, XfrmState) and st_.algorithms == () and st_.mark.value == 1


def test_attribute_overrunning_the_message_is_skipped() -> None:
    bad = struct.pack("=HH", 200, 21) + b"\0" * 8
    with pytest.warns(XfrmDecodeWarning, match="malformed netlink attribute"):
        st_ = wire.decode_message(sa_message(attr(31, struct.pack("=I", 4)), bad))
    assert isinstance(st_, XfrmState) and st_.if_id == 4 and st_.mark is None


def test_truncated_message_and_unknown_type() -> None:
    with pytest.warns(XfrmDecodeWarning, match="too short"):
        assert wire.decode_message(message(16, usersa_info()[:100])) is None
    with pytest.warns(XfrmDecodeWarning, match="unknown XFRM message type 99"):
        assert wire.decode_message(message(99, b"")) is None
    with pytest.warns(XfrmDecodeWarning, match="does not fit"):
        assert wire.decode_message(struct.pack("=IHHII", 400, 16, 0, 0, 0)) is None
    assert wire.decode_message(message(3, struct.pack("=i", 0))) is None  # NLMSG_DONE: silently nothing


def test_split_messages() -> None:
    one, two = sa_message(), message(28, struct.pack("=B3x", 0))
    assert list(wire.split_messages(one + two)) == [one, two]
    with pytest.warns(XfrmDecodeWarning):
        assert list(wire.split_messages(one + struct.pack("=I", 9999) + b"\0" * 12)) == [one]


@settings(max_examples=300, deadline=None)
@given(mtype=st.sampled_from([16, 17, 19, 20, 23, 24, 25, 26, 27, 28, 29, 99]), body=st.binary(max_size=700))
def test_garbage_never_raises(mtype: int, body: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = wire.decode_message(message(mtype, body))
    assert result is None or isinstance(result, XfrmState | XfrmPolicy | XfrmEvent)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0, max_value=400), junk=st.binary(max_size=64))
def test_mangled_real_messages_never_raise(cut: int, junk: bytes) -> None:
    good = sa_message(attr(2, algo(b"cbc(aes)", 128)), attr(21, struct.pack("=II", 1, 2)))
    mangled = good[: 16 + cut] + junk
    mangled = struct.pack("=I", len(mangled)) + mangled[4:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = wire.decode_message(mangled)
    assert result is None or isinstance(result, XfrmState)


def test_socket_policy_encoding_round_trips() -> None:
    tmpls = [
        socket_template("esp", reqid=3, family=socket.AF_INET),
        socket_template("ah", "tunnel", daddr=V4("192.0.2.2"), saddr=V4("192.0.2.1"), level="use"),
    ]
    optval = wire.encode_socket_policy(socket.AF_INET, 1, tmpls)
    assert len(optval) == 168 + 2 * 64
    pol = wire.decode_message(message(19, optval[:168] + attr(5, optval[168:])))
    assert isinstance(pol, XfrmPolicy)
    assert pol.direction == "out" and pol.sel.family == socket.AF_INET and pol.sel.prefixlen_d == 0
    assert pol.lifetime.hard_byte_limit == INF
    assert pol.templates == tuple(tmpls)


def test_socket_template_validation() -> None:
    with pytest.raises(ValueError, match="tunnel mode needs"):
        socket_template("esp", "tunnel")
    with pytest.raises(ValueError, match="level"):
        socket_template("esp", level="unique")
    with pytest.raises(ValueError, match="unsupported protocol"):
        socket_template(6)
    assert socket_template("comp").proto == 108 and socket_template("esp", level="use").optional
