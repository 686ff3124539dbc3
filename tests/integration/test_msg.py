"""Datagram pTokens (draft 2.3.4) on real SAs: recvmsg + get_msg_pToken, set_msg_pToken + sendmsg."""

from __future__ import annotations

import errno
import socket

import pytest

import btns_vici
from btns_vici import PToken, Setting, capi

pytestmark = pytest.mark.testbed


def udp(tb, peer, family: int = 4) -> socket.socket:
    with tb.in_netns(peer):
        s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(5)
    return s


def test_received_datagram_ptoken(tb, backend_b):
    tb.up("msg4", "rawkey", 4)
    with udp(tb, tb.b) as srv, udp(tb, tb.a) as cli:
        srv.bind(("0.0.0.0", 26001))  # unconnected, wildcard: the local address comes from IP_PKTINFO
        btns_vici.enable_pktinfo(srv)  # before anything is queued: the kernel records the arrival device
        cli.sendto(b"dgram", (str(tb.b.v4), 26001))
        msg = btns_vici.recvmsg(srv, 64)
        assert msg.data == b"dgram" and msg.local[0] == str(tb.b.v4)
        p = capi.ipsec_create_pToken()
        btns_vici.set_default_backend(backend_b)
        try:
            assert capi.ipsec_get_msg_pToken(msg, p) == 0
        finally:
            btns_vici.set_default_backend(None)
        assert p.protected and p.privacy_protected >= Setting.LEVEL_LOW, p.information_string
        assert p.itoken.pub_key_id == tb.a.key.public_der


def test_received_datagram_without_sa_is_unprotected(tb, backend_b):
    with tb.without_inbound_filter(), udp(tb, tb.b) as srv, udp(tb, tb.a) as cli:
        srv.bind(("0.0.0.0", 26002))
        btns_vici.enable_pktinfo(srv)
        cli.sendto(b"clear", (str(tb.b.v4), 26002))
        msg = btns_vici.recvmsg(srv, 64)
        p = btns_vici.ptoken_for_flow(btns_vici.msg.flow_of_msg(msg), backend_b)
        assert not p.protected and p.privacy_protected == Setting.DISABLE and p.itoken is None
        btns_vici.set_default_backend(backend_b)
        try:
            got = capi.ipsec_create_pToken()
            capi.ipsec_get_msg_pToken(msg, got)
        finally:
            btns_vici.set_default_backend(None)
        assert not got.protected and "no installed CHILD_SA" in got.information_string


def test_sendmsg_enforces_the_attached_ptoken(tb, backend_a):
    tb.up("msgsend", "rawkey", 4)  # covers IPv4 only
    demand = PToken()
    demand.privacy_protected = Setting.LEVEL_MEDIUM
    with udp(tb, tb.b) as srv4, udp(tb, tb.b, 6) as srv6, udp(tb, tb.a) as cli4, udp(tb, tb.a, 6) as cli6:
        srv4.bind((str(tb.b.v4), 26003))
        srv6.bind((str(tb.b.v6), 26003))
        msg = btns_vici.MsgHdr(iov=[b"protected"], name=(str(tb.b.v4), 26003))
        assert capi.ipsec_set_msg_pToken(msg, demand) == 0
        assert btns_vici.sendmsg(cli4, msg, backend=backend_a) == len(b"protected")
        assert srv4.recv(64) == b"protected"
        msg6 = btns_vici.MsgHdr(iov=[b"clear"], name=(str(tb.b.v6), 26003))
        capi.ipsec_set_msg_pToken(msg6, demand)
        with pytest.raises(OSError) as e:
            btns_vici.sendmsg(cli6, msg6, backend=backend_a)  # no SA covers IPv6: refused, not sent
        assert e.value.errno == errno.EACCES
        srv6.settimeout(0.3)
        with pytest.raises(TimeoutError):
            srv6.recv(64)
