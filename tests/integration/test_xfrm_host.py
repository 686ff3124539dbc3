"""btns_vici.xfrm against this host's real kernel, in btns-vm- network namespaces.

The host kernel has XFRM netlink but no ESP: policies, larval SAs (allocspi), acquires and
per-socket policies work here; keyed SAs are tested in the VM tier (tests/vm/).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import threading

import pytest

from btns_vici import xfrm
from btns_vici.core.selectors import Flow

from .xfrm_support import ip, netns, parse_ip_xfrm, socket_in, view

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (network namespaces)"
)

POLICIES = [
    "src 10.1.0.0/16 dst 10.2.0.1/32 proto tcp sport 1234 dport 80 dir out priority 77 mark 0x5 mask 0xff "
    "tmpl src 1.1.1.1 dst 2.2.2.2 proto esp mode tunnel reqid 9",
    "src fd00::/64 dst fd01::1/128 proto udp sport 53 dir in priority 5 if_id 7 "
    "tmpl src fd00::1 dst fd01::1 proto esp mode tunnel reqid 4 level use",
    "src 10.9.0.0/24 dst 0.0.0.0/0 dir fwd action block priority 3000",
    "src 10.1.0.0/16 dst 10.2.0.2/32 proto tcp dport 443 dir out priority 70 "
    "tmpl proto ah mode transport reqid 1 tmpl proto comp mode transport reqid 1 "
    "tmpl proto esp mode transport reqid 1",
    "src 10.3.0.0/16 dst 10.4.0.0/16 proto icmp type 8 code 0 dir out",
    "src 10.5.0.0/16 dst 10.6.0.1/32 dir out tmpl proto esp spi 0x100 src 1.1.1.1 dst 2.2.2.2 mode tunnel",
]


def by_index(records: list[dict]) -> dict[int, dict]:
    return {r["index"]: r for r in records}


def test_policy_dump_equals_iproute2_field_by_field() -> None:
    with netns("pol") as ns:
        for spec in POLICIES:
            ip("xfrm", "policy", "add", *spec.split(), netns=ns)
        ours = by_index([view(p) for p in xfrm.dump_policies(ns)])
        theirs = by_index(parse_ip_xfrm(ip("-s", "xfrm", "policy", netns=ns)))
        assert len(ours) == len(POLICIES) and ours.keys() == theirs.keys()
        for index, rec in ours.items():
            assert rec == theirs[index], f"policy {index} differs"
        # Spot checks that do not depend on the parser: byte order, masks, marks.
        pol = next(p for p in xfrm.dump_policies(ns) if p.priority == 77)
        assert (pol.sel.sport, pol.sel.dport, pol.sel.sport_mask, pol.sel.dport_mask) == (1234, 80, 0xFFFF, 0xFFFF)
        assert (pol.mark.value, pol.mark.mask, pol.direction, pol.is_socket) == (5, 0xFF, "out", False)
        assert [t.proto_name for t in next(p for p in xfrm.dump_policies(ns) if p.priority == 70).templates] == [
            "ah",
            "comp",
            "esp",
        ]


def test_larval_state_dump_equals_iproute2() -> None:
    with netns("sa") as ns:
        ip(
            "xfrm",
            "state",
            "allocspi",
            "src",
            "10.0.0.1",
            "dst",
            "10.0.0.2",
            "proto",
            "esp",
            "reqid",
            "5",
            "mode",
            "tunnel",
            "min",
            "0x1000",
            "max",
            "0x1fff",
            netns=ns,
        )
        ip(
            "xfrm",
            "state",
            "allocspi",
            "src",
            "fd00::1",
            "dst",
            "fd00::2",
            "proto",
            "ah",
            "reqid",
            "6",
            "min",
            "0x2000",
            "max",
            "0x2fff",
            netns=ns,
        )
        states = xfrm.dump_states(ns)
        ours = {(r["spi"], r["dst"]): r for r in map(view, states)}
        theirs = {(r["spi"], r["dst"]): r for r in parse_ip_xfrm(ip("-s", "xfrm", "state", netns=ns))}
        assert len(ours) == 2 and ours == theirs
        v6 = next(s for s in states if s.family == socket.AF_INET6)
        assert 0x2000 <= v6.spi <= 0x2FFF and v6.proto_name == "ah" and v6.reqid == 6
        assert xfrm.find_state(v6.spi, "ah", ipaddress.ip_address("fd00::2"), ns) == v6
        assert xfrm.find_state(v6.spi, "esp", ipaddress.ip_address("fd00::2"), ns) is None


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_socket_policy_visible_then_gone_after_close(family: int) -> None:
    with netns("sock") as ns:
        sock = socket_in(ns, family, socket.SOCK_STREAM)
        xfrm.set_socket_policy(sock, "out", ["esp"], reqid=11)
        xfrm.set_socket_policy(sock, "in", ["esp", "comp"], level="use")
        pols = xfrm.dump_policies(ns)
        assert sorted((p.direction, p.is_socket) for p in pols) == [("in", True), ("out", True)]
        out = next(p for p in pols if p.direction == "out")
        assert [(t.proto_name, t.mode_name, t.reqid, t.level, t.family) for t in out.templates] == [
            ("esp", "transport", 11, "required", family)
        ]
        inbound = next(p for p in pols if p.direction == "in")
        assert [(t.proto_name, t.level) for t in inbound.templates] == [("esp", "use"), ("comp", "use")]
        text = parse_ip_xfrm(ip("-s", "xfrm", "policy", netns=ns))
        assert by_index(text) == by_index([view(p) for p in pols])
        assert {r["dir"] for r in text if r["socket"]} == {"in", "out"}

        xfrm.clear_socket_policy(sock, "in")  # the kernel drops both; "out" is reinstalled
        assert [(p.direction, p.templates[0].reqid) for p in xfrm.dump_policies(ns)] == [("out", 11)]
        assert list(xfrm.socket_policies(sock)) == ["out"]
        sock.close()
        assert xfrm.dump_policies(ns) == []
        assert xfrm.socket_policies(sock) == {}


@pytest.mark.parametrize(("family", "loopback"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_connect_fails_closed_without_sa(family: int, loopback: str) -> None:
    with netns("closed") as ns:
        server = socket_in(ns, family, socket.SOCK_STREAM)
        server.bind((loopback, 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        with xfrm.XfrmMonitor(("acquire",), netns=ns) as mon:
            client = socket_in(ns, family, socket.SOCK_STREAM)
            xfrm.set_socket_policy(client, "out", ["esp"], reqid=3)
            with pytest.raises(OSError) as exc:
                client.connect((loopback, port))
            assert exc.value.errno == errno.EAGAIN
            with pytest.raises(TimeoutError):
                server.accept()  # nothing went out in clear
            events = list(mon.events(timeout=1.0))
        acquires = [e.acquire for e in events if isinstance(e, xfrm.XfrmEvent) and e.kind == "acquire"]
        assert acquires, "the kernel asked no key manager for an SA"
        sel = acquires[0].sel
        assert (sel.dport, sel.proto, str(sel.daddr), sel.family) == (port, socket.IPPROTO_TCP, loopback, family)
        # The acquire names the policy that triggered it: our socket policy (reported with dir "out").
        sock_pol = next(p for p in xfrm.dump_policies(ns) if p.is_socket)
        assert acquires[0].templates[0].reqid == 3 and acquires[0].policy.index == sock_pol.index
        # The kernel parks a larval SA for the acquire; it carries the flow's selector.
        larval = [s for s in xfrm.dump_states(ns) if s.reqid == 3]
        assert larval and larval[0].sel.dport == port and larval[0].algorithms == ()
        client.close()
        server.close()


def test_level_use_sends_in_clear_without_sa() -> None:
    with netns("use") as ns:
        server = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
        xfrm.set_socket_policy(client, "out", ["esp"], level="use")
        client.settimeout(2)
        client.connect(server.getsockname())  # optional template: no SA, so plaintext
        conn, _ = server.accept()
        client.sendall(b"clear")
        assert conn.recv(5) == b"clear"
        for s in (conn, client, server):
            s.close()


def test_udp_send_fails_closed_without_sa() -> None:
    with netns("udp") as ns:
        rx = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.3)
        tx = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        xfrm.set_socket_policy(tx, "out", ["esp"])
        with pytest.raises(OSError) as exc:
            tx.sendto(b"secret", rx.getsockname())
        assert exc.value.errno == errno.EAGAIN
        with pytest.raises(TimeoutError):
            rx.recv(100)
        tx.close()
        rx.close()


def test_monitor_reports_policy_and_sa_events() -> None:
    with netns("mon") as ns, xfrm.XfrmMonitor(netns=ns) as mon:
        ip(
            "xfrm",
            "policy",
            "add",
            "src",
            "10.7.0.0/16",
            "dst",
            "10.8.0.0/16",
            "dir",
            "out",
            "priority",
            "9",
            "tmpl",
            "proto",
            "esp",
            "mode",
            "transport",
            netns=ns,
        )
        ip("xfrm", "policy", "del", "src", "10.7.0.0/16", "dst", "10.8.0.0/16", "dir", "out", netns=ns)
        ip("xfrm", "state", "allocspi", "src", "10.7.0.1", "dst", "10.8.0.1", "proto", "esp", netns=ns)
        ip("xfrm", "state", "flush", netns=ns)  # notifies only when something was flushed
        got = list(mon.events(timeout=1.0))
    new = [p for p in got if isinstance(p, xfrm.XfrmPolicy)]
    kinds = [e.kind for e in got if isinstance(e, xfrm.XfrmEvent)]
    assert [(p.priority, str(p.sel.dst)) for p in new] == [(9, "10.8.0.0/16")]
    assert kinds == ["del-policy", "flush-sa"]
    deleted = next(e for e in got if isinstance(e, xfrm.XfrmEvent) and e.kind == "del-policy")
    assert deleted.policy is not None and deleted.policy.index == new[0].index


def test_watch_calls_back_from_a_thread() -> None:
    with netns("watch") as ns:
        seen: list[object] = []
        arrived = threading.Event()

        def callback(item: object) -> None:
            seen.append(item)
            arrived.set()

        stop = xfrm.watch(callback, ("policy",), netns=ns)
        try:
            ip("xfrm", "policy", "add", "src", "10.7.0.1", "dst", "10.8.0.1", "dir", "in", netns=ns)
            assert arrived.wait(5)
        finally:
            stop()
        assert isinstance(seen[0], xfrm.XfrmPolicy) and seen[0].direction == "in"


def test_policies_covering_orders_by_priority() -> None:
    with netns("cover") as ns:
        ip("xfrm", "policy", "add", "src", "10.0.0.0/8", "dst", "10.0.0.0/8", "dir", "out", "priority", "500", netns=ns)
        ip(
            "xfrm",
            "policy",
            "add",
            "src",
            "10.0.0.1",
            "dst",
            "10.0.0.2",
            "proto",
            "tcp",
            "dport",
            "443",
            "dir",
            "out",
            "priority",
            "100",
            "tmpl",
            "proto",
            "esp",
            "mode",
            "transport",
            "reqid",
            "8",
            netns=ns,
        )
        ip(
            "xfrm",
            "policy",
            "add",
            "src",
            "10.0.0.1",
            "dst",
            "10.0.0.2",
            "proto",
            "udp",
            "dir",
            "out",
            "priority",
            "50",
            netns=ns,
        )
        ip(
            "xfrm",
            "policy",
            "add",
            "src",
            "10.0.0.2",
            "dst",
            "10.0.0.1",
            "proto",
            "tcp",
            "sport",
            "443",
            "dir",
            "in",
            "priority",
            "100",
            netns=ns,
        )
        a, b = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
        flow = Flow(socket.IPPROTO_TCP, a, 40000, b, 443)
        assert [p.priority for p in xfrm.policies_covering(flow, netns=ns)] == [100, 500]
        assert xfrm.policies_covering(flow, netns=ns)[0].templates[0].reqid == 8
        # Inbound, the flow's packets go 10.0.0.2:443 -> 10.0.0.1:40000: only the "in" policy covers them.
        assert [p.priority for p in xfrm.policies_covering(flow, "in", netns=ns)] == [100]
        assert xfrm.policies_covering(Flow(socket.IPPROTO_TCP, a, 40000, b, 80), netns=ns)[0].priority == 500
