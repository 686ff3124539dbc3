"""btns_vici.xfrm against a kernel with ESP/AH/IPComp (runs inside the VM tier).

Keyed SAs made with ``ip xfrm state add`` must read back equal, field by field, to what
iproute2 prints; traffic through manual transport-mode SAs must raise the counters we
report; a per-socket policy must carry a connection through ESP when the SA exists and
fail closed when it does not.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time

import pytest

from btns_vici import xfrm
from btns_vici.core.selectors import Flow

from ..integration.xfrm_support import ip, netns, parse_ip_xfrm, view
from .netpair import SPI, A, B, add_policies, add_sas, sniffer, transfer, two_hosts

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ipsec_kernel")]

K128, K160, K256 = "0x" + "11" * 16, "0x" + "22" * 20, "0x" + "33" * 32
STATES = [
    f"src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x1001 reqid 1 mode transport replay-window 32 "
    f"enc cbc(aes) {K128} auth-trunc hmac(sha256) {K256} 128 sel src 10.0.0.1 dst 10.0.0.2 proto tcp dport 443",
    f"src 10.0.0.2 dst 10.0.0.1 proto esp spi 0x1002 reqid 2 mode tunnel aead rfc4106(gcm(aes)) {K160} 128 "
    "mark 0x7 mask 0xff if_id 3",
    f"src fd00::1 dst fd00::2 proto esp spi 0x2001 reqid 3 mode transport enc cbc(aes) {K256} "
    f"auth-trunc hmac(sha1) 0x{'44' * 20} 96 encap espinudp 4500 4501 0.0.0.0",
    f"src 10.0.0.1 dst 10.0.0.2 proto ah spi 0x3001 reqid 4 mode transport auth-trunc hmac(sha256) {K256} 128",
    "src 10.0.0.1 dst 10.0.0.2 proto comp spi 0x4001 reqid 5 mode transport comp deflate",
]


def test_state_dump_equals_iproute2_field_by_field() -> None:
    with netns("vmsa") as ns:
        for spec in STATES:
            ip("xfrm", "state", "add", *spec.split(), netns=ns)
        states = xfrm.dump_states(ns)
        ours = {(r["spi"], r["proto"]): r for r in map(view, states)}
        theirs = {(r["spi"], r["proto"]): r for r in parse_ip_xfrm(ip("-s", "xfrm", "state", netns=ns))}
        assert len(ours) == len(STATES) and ours.keys() == theirs.keys()
        for key, rec in ours.items():
            assert rec == theirs[key], f"SA {key} differs"
        esp = xfrm.find_state(0x1001, "esp", ipaddress.ip_address("10.0.0.2"), ns)
        assert esp is not None and esp.reqid == 1 and esp.replay_window == 32
        assert [(a.kind, a.name, a.key_bits, a.trunc_bits) for a in esp.algorithms] == [
            ("crypt", "cbc(aes)", 128, None),
            ("auth", "hmac(sha256)", 256, 128),
        ]
        assert (esp.sel.dport, esp.sel.proto) == (443, socket.IPPROTO_TCP)
        gcm = xfrm.find_state(0x1002, "esp", ipaddress.ip_address("10.0.0.1"), ns)
        assert gcm.algorithm("aead").icv_bits == 128 and gcm.mark == xfrm.Mark(7, 0xFF) and gcm.if_id == 3
        v6 = xfrm.find_state(0x2001, "esp", ipaddress.ip_address("fd00::2"), ns)
        assert v6.encap == xfrm.Encap(2, 4500, 4501, None) and v6.family == socket.AF_INET6
        assert xfrm.find_state(0x4001, "comp", ipaddress.ip_address("10.0.0.2"), ns).algorithm("comp").name == (
            "deflate"
        )
        assert "11" * 16 not in repr(states)  # key bytes never leave the kernel through us


def test_esp_counters_rise_with_traffic() -> None:
    payload = b"btns-plaintext-marker " * 4000
    with two_hosts() as (na, nb):
        add_sas(na, nb)
        add_policies(na, nb)
        before = xfrm.find_state(SPI["ab"], "esp", B, na)
        assert before is not None and before.current.bytes == 0
        with sniffer(nb) as frames:
            assert transfer(na, nb, payload) == payload
        out_a = xfrm.find_state(SPI["ab"], "esp", B, na)
        in_b = xfrm.find_state(SPI["ab"], "esp", B, nb)
        assert out_a.current.bytes >= len(payload) and out_a.current.packets > 0
        assert in_b.current.packets == out_a.current.packets  # b decrypted every packet a sent
        text = {(r["spi"], r["dst"]): r for r in parse_ip_xfrm(ip("-s", "xfrm", "state", netns=na))}
        assert (text[(SPI["ab"], str(B))]["bytes"], text[(SPI["ab"], str(B))]["packets"]) == (
            out_a.current.bytes,
            out_a.current.packets,
        )
        # On the wire: ESP (protocol 50) only, never the plaintext.
        tcp_or_esp = [f for f in frames if len(f) > 20 and f[9] in (6, 50)]
        assert tcp_or_esp and all(f[9] == 50 for f in tcp_or_esp)
        assert not any(b"btns-plaintext-marker" in f for f in frames)
        cover = xfrm.policies_covering(Flow(socket.IPPROTO_TCP, A, 40000, B, 80), netns=na)
        assert cover and cover[0].templates[0].reqid == 42


def test_socket_policy_fails_closed_then_carries_esp() -> None:
    payload = b"socket-policy-marker " * 500
    with two_hosts() as (na, nb):
        # No global SPD at all: only the sockets ask for ESP. No SA yet: fail closed.
        with pytest.raises(OSError) as exc:
            transfer(na, nb, payload, policy="required")
        assert exc.value.errno == errno.EAGAIN
        assert xfrm.find_state(SPI["ab"], "esp", B, na) is None
        add_sas(na, nb)
        with sniffer(nb) as frames:
            assert transfer(na, nb, payload, policy="required") == payload
        out_a = xfrm.find_state(SPI["ab"], "esp", B, na)
        assert out_a.current.packets > 0 and out_a.current.bytes >= len(payload)
        assert not any(b"socket-policy-marker" in f for f in frames)
        assert [p for p in xfrm.dump_policies(na) if not p.is_socket] == []


def test_level_use_goes_clear_without_sa_and_esp_with_it() -> None:
    payload = b"optional-marker " * 100
    with two_hosts() as (na, nb):
        with sniffer(nb) as frames:
            assert transfer(na, nb, payload, policy="use") == payload
        assert any(b"optional-marker" in f for f in frames)  # "use": clear when there is no SA
        add_sas(na, nb)
        with sniffer(nb) as frames:
            assert transfer(na, nb, payload, policy="use") == payload
        assert not any(b"optional-marker" in f for f in frames)
        assert xfrm.find_state(SPI["ab"], "esp", B, na).current.packets > 0


def test_expire_event_when_a_lifetime_runs_out() -> None:
    with netns("exp") as ns, xfrm.XfrmMonitor(("expire", "sa"), netns=ns) as mon:
        ip(
            "xfrm",
            "state",
            "add",
            "src",
            "10.0.0.1",
            "dst",
            "10.0.0.2",
            "proto",
            "esp",
            "spi",
            "0x77",
            "mode",
            "transport",
            "reqid",
            "7",
            "aead",
            "rfc4106(gcm(aes))",
            K160,
            "128",
            "limit",
            "time-soft",
            "1",
            "limit",
            "time-hard",
            "2",
            netns=ns,
        )
        deadline, events = time.monotonic() + 10, []
        while time.monotonic() < deadline and not any(getattr(e, "hard", False) for e in events):
            events += mon.poll(0.5)
    kinds = [(e.kind, e.hard) for e in events if isinstance(e, xfrm.XfrmEvent)]
    assert ("expire", False) in kinds and ("expire", True) in kinds
    new = [e for e in events if isinstance(e, xfrm.XfrmState)]
    assert new and new[0].spi == 0x77 and new[0].lifetime.hard_add_expires_seconds == 2
