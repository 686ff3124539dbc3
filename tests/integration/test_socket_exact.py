"""Socket-exact truth, tried as an attacker would (README "Socket-exact truth").

Each test makes a socket whose flow a CHILD_SA covers but whose packets the kernel does
not carry through it (bound to the link, charon's bypass mark, another namespace, a
clear datagram, an injected segment), captures what crossed the veth, and checks the
pToken: "protected" only where the capture shows no cleartext.
"""

from __future__ import annotations

import array
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

import btns_vici
import btns_vici.latch
from btns_lab.testbed import NETNS_PREFIX, Testbed, connected_pair
from btns_vici import PToken, Setting, capi

from .wire import capture, esp_in_udp, seen, send_raw_clear, tcp_segment, tcp_segments

pytestmark = pytest.mark.testbed

SO_BINDTODEVICE = socket.SO_BINDTODEVICE
BYPASS_MARK = 0x42  # socket-default's fwmark: table 220 is skipped for it


@pytest.fixture
def sa(tb: Testbed) -> Testbed:
    tb.up("exact", "rawkey", 4)
    return tb


def udp_in(tb: Testbed, peer, bind: tuple[str, int] | None = None) -> socket.socket:
    with tb.in_netns(peer):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    if bind:
        s.bind(bind)
    return s


def test_the_normal_socket_is_protected_and_its_bytes_are_encrypted(sa, backend_a, backend_b):
    with capture(sa.b.netns, sa.b.link) as frames:
        cli, srv = connected_pair(sa, socket.IPPROTO_TCP, 4)
        with cli, srv:
            cli.sendall(b"NORMAL-SECRET-1")
            assert srv.recv(64) == b"NORMAL-SECRET-1"
            tok = btns_vici.get_socket_ptoken(cli, backend_a)
            peer_tok = btns_vici.get_socket_ptoken(srv, backend_b)
    assert not seen(frames, b"NORMAL-SECRET-1") and esp_in_udp(frames) > 0
    assert tok.protected and tok.integrity_protected == Setting.LEVEL_HIGH, tok.information_string
    assert peer_tok.protected and peer_tok.integrity_protected == Setting.LEVEL_HIGH
    info = tok.information_string
    assert "via ipsec0" in info and "netns=net:[" in info and "mark=0x0" in info and "inbound" in info
    assert "netns=net:[" in tok.audit_string


def test_udp_socket_bound_to_the_link_is_reported_clear(sa, backend_a):
    with udp_in(sa, sa.b, (str(sa.b.v4), 27001)) as srv, udp_in(sa, sa.a) as cli:
        cli.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, sa.a.link.encode())  # any user may (Linux >= 5.7)
        cli.connect((str(sa.b.v4), 27001))
        with capture(sa.b.netns, sa.b.link) as frames:
            cli.send(b"BOUND-LEAK-1")
        tok = btns_vici.get_socket_ptoken(cli, backend_a)
        # The same flow from an unbound socket is protected: the difference is the socket.
        with udp_in(sa, sa.a) as good:
            good.connect((str(sa.b.v4), 27001))
            good.send(b"ok")
            assert srv.recv(16) == b"ok"
            assert btns_vici.get_socket_ptoken(good, backend_a).protected
    assert seen(frames, b"BOUND-LEAK-1")  # the attacker's proof: it went out in clear
    assert not tok.protected and tok.privacy_protected == Setting.DISABLE
    assert sa.a.link in tok.information_string and "not ipsec0" in tok.information_string


def test_tcp_connection_bound_to_the_links_is_reported_clear(sa, backend_a, backend_b):
    with sa.without_inbound_filter():
        with sa.in_netns(sa.b):
            lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, sa.b.link.encode())
        lst.bind((str(sa.b.v4), 27002))
        lst.listen(1)
        with sa.in_netns(sa.a):
            cli = socket.socket()
        cli.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, sa.a.link.encode())
        cli.settimeout(5)
        lst.settimeout(5)
        with lst, cli, capture(sa.b.netns, sa.b.link) as frames:
            cli.connect((str(sa.b.v4), 27002))
            conn, _ = lst.accept()
            with conn:
                cli.sendall(b"BOUND-TCP-LEAK")
                assert conn.recv(64) == b"BOUND-TCP-LEAK"
                tok_a = btns_vici.get_socket_ptoken(cli, backend_a)
                tok_b = btns_vici.get_socket_ptoken(conn, backend_b)
    assert seen(frames, b"BOUND-TCP-LEAK")
    assert not tok_a.protected and not tok_b.protected, (tok_a.information_string, tok_b.information_string)


def test_socket_with_the_bypass_mark_is_reported_clear(sa, backend_a):
    with udp_in(sa, sa.b, (str(sa.b.v4), 27003)), udp_in(sa, sa.a) as cli:
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, BYPASS_MARK)
        cli.connect((str(sa.b.v4), 27003))
        with capture(sa.b.netns, sa.b.link) as frames:
            cli.send(b"MARKED-LEAK-1")
        tok = btns_vici.get_socket_ptoken(cli, backend_a)
    assert seen(frames, b"MARKED-LEAK-1")
    assert not tok.protected and "mark=0x42" in tok.information_string, tok.information_string


@contextlib.contextmanager
def twin_namespaces(tb: Testbed) -> Iterator[tuple[str, str]]:
    """Two more namespaces holding the SAME addresses as A and B, joined by their own veth (no IPsec)."""
    names = (f"{NETNS_PREFIX}{tb.tag}-x", f"{NETNS_PREFIX}{tb.tag}-y")
    links = (f"btns-{tb.tag}x", f"btns-{tb.tag}y")
    made = []
    try:
        for ns in names:
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made.append(ns)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                links[0],
                "netns",
                names[0],
                "type",
                "veth",
                "peer",
                "name",
                links[1],
                "netns",
                names[1],
            ],
            check=True,
        )
        for ns, link, addr in zip(names, links, (tb.a.v4, tb.b.v4), strict=True):
            for cmd in (
                ["ip", "addr", "add", f"{addr}/24", "dev", link],
                ["ip", "link", "set", link, "up"],
                ["ip", "link", "set", "lo", "up"],
            ):
                subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        yield names
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_connection_of_another_namespace_with_the_same_addresses_is_reported_clear(sa, backend_a):
    with twin_namespaces(sa) as (nx, ny):
        with btns_vici.netns.entered(ny):
            lst = socket.socket()
        lst.bind((str(sa.b.v4), 27004))
        lst.listen(1)
        with btns_vici.netns.entered(nx):
            cli = socket.socket()
        cli.settimeout(5)
        lst.settimeout(5)
        with lst, cli, capture(ny, f"btns-{sa.tag}y") as frames:
            cli.connect((str(sa.b.v4), 27004))
            conn, _ = lst.accept()
            with conn:
                cli.sendall(b"TWIN-NETNS-LEAK")
                assert conn.recv(64) == b"TWIN-NETNS-LEAK"
                # Hand the socket over as a broker or a container runtime would: SCM_RIGHTS.
                left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                with left, right:
                    left.sendmsg([b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [cli.fileno()]))])
                    _msg, fds, _flags, _addr = socket.recv_fds(right, 16, 1)
                with socket.socket(fileno=fds[0]) as handed:
                    assert handed.getpeername()[0] == str(sa.b.v4)  # the covered flow, to the letter
                    tok = btns_vici.get_socket_ptoken(handed, backend_a)
    assert seen(frames, b"TWIN-NETNS-LEAK")
    assert not tok.protected and "not in net:[" in tok.information_string, tok.information_string


def test_clear_datagram_from_the_peers_address_is_reported_unprotected(sa, backend_b):
    with sa.without_inbound_filter(), udp_in(sa, sa.b, ("0.0.0.0", 27005)) as srv:
        btns_vici.enable_pktinfo(srv)
        with udp_in(sa, sa.a, (str(sa.a.v4), 27006)) as good, udp_in(sa, sa.a) as evil:
            evil.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sa.a.link.encode())
            evil.bind((str(sa.a.v4), 27007))
            with capture(sa.b.netns, sa.b.link) as frames:
                evil.sendto(b"CLEAR-DGRAM", (str(sa.b.v4), 27005))
                clear = btns_vici.recvmsg(srv, 64)
                good.sendto(b"SA-DGRAM", (str(sa.b.v4), 27005))
                via_sa = btns_vici.recvmsg(srv, 64)
    assert clear.data == b"CLEAR-DGRAM" and via_sa.data == b"SA-DGRAM"
    assert seen(frames, b"CLEAR-DGRAM") and not seen(frames, b"SA-DGRAM")
    btns_vici.set_default_backend(backend_b)
    try:
        p_clear, p_sa = capi.ipsec_create_pToken(), capi.ipsec_create_pToken()
        capi.ipsec_get_msg_pToken(clear, p_clear)
        capi.ipsec_get_msg_pToken(via_sa, p_sa)
    finally:
        btns_vici.set_default_backend(None)
    assert not p_clear.protected and sa.b.link in p_clear.information_string, p_clear.information_string
    assert p_sa.protected and "arrived decrypted on ipsec0" in p_sa.information_string, p_sa.information_string


def test_sendmsg_refuses_a_datagram_that_would_leave_in_clear(sa, backend_a):
    demand = PToken()
    demand.privacy_protected = Setting.LEVEL_MEDIUM
    with udp_in(sa, sa.b, (str(sa.b.v4), 27008)) as srv, udp_in(sa, sa.a) as cli, udp_in(sa, sa.a) as marked:
        marked.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, BYPASS_MARK)
        link_index = socket.if_nametoindex  # resolved in A's namespace below
        with sa.in_netns(sa.a):
            ifindex = link_index(sa.a.link)
        dest = (str(sa.b.v4), 27008)
        pktinfo = (socket.IPPROTO_IP, 8, ifindex.to_bytes(4, "little") + bytes(8))  # IP_PKTINFO: send by the link
        with capture(sa.b.netns, sa.b.link) as frames:
            for sock, control in ((marked, []), (cli, [pktinfo])):
                m = btns_vici.MsgHdr(iov=[b"SENDMSG-LEAK"], name=dest, control=list(control))
                capi.ipsec_set_msg_pToken(m, demand)
                with pytest.raises(OSError) as e:
                    btns_vici.sendmsg(sock, m, backend=backend_a)
                assert e.value.errno == 13, e.value  # EACCES, refused before sending
            ok = btns_vici.MsgHdr(iov=[b"SENDMSG-OK"], name=dest)
            capi.ipsec_set_msg_pToken(ok, demand)
            assert btns_vici.sendmsg(cli, ok, backend=backend_a) == len(b"SENDMSG-OK")
            assert srv.recv(64) == b"SENDMSG-OK"
    assert not seen(frames, b"SENDMSG-LEAK") and not seen(frames, b"SENDMSG-OK")


def _inject(sa: Testbed, cli: socket.socket, srv_port: int, a_frames: list[bytes], payload: bytes) -> None:
    """Forge the next segment of A's side of the connection in clear, from A's address, onto the veth."""
    cport = cli.getsockname()[1]
    segs = [s for s in tcp_segments(a_frames, str(sa.a.v4), cport) if s[2]]
    assert segs, "no data segment of the connection was captured on A's ipsec0"
    seq, ack, data = segs[-1]
    pkt = tcp_segment(str(sa.a.v4), cport, str(sa.b.v4), srv_port, (seq + len(data)) & 0xFFFFFFFF, ack, payload)
    send_raw_clear(sa.a.netns, pkt, str(sa.b.v4))


@pytest.mark.parametrize("inbound_filter", [False, True])
def test_injected_clear_segment_and_the_integrity_it_is_reported_with(sa, backend_b, inbound_filter):
    ctx = contextlib.nullcontext() if inbound_filter else sa.without_inbound_filter()
    with ctx:
        with capture(sa.a.netns, "ipsec0") as a_frames:
            cli, srv = connected_pair(sa, socket.IPPROTO_TCP, 4)
            cli.sendall(b"hello")
            assert srv.recv(16) == b"hello"
        with cli, srv:
            tok = btns_vici.get_socket_ptoken(srv, backend_b)
            with capture(sa.b.netns, sa.b.link) as frames:
                _inject(sa, cli, srv.getsockname()[1], a_frames, b"INJECTED-CLEAR")
            srv.settimeout(1.0)
            try:
                got = srv.recv(64)
            except TimeoutError:
                got = b""
    assert seen(frames, b"INJECTED-CLEAR")  # the forged segment did cross the link in clear
    assert tok.privacy_protected >= Setting.LEVEL_MEDIUM
    if inbound_filter:
        assert got == b"", "the kernel delivered a clear segment despite the inbound filter"
        assert tok.integrity_protected == Setting.LEVEL_HIGH, tok.information_string
    else:
        assert got == b"INJECTED-CLEAR"  # what an unfiltered libipsec host accepts...
        assert tok.integrity_protected == Setting.DISABLE  # ...and the pToken says so
        assert "inbound NOT protected" in tok.information_string and sa.b.link in tok.information_string


def test_a_socket_bound_to_ipsec0_needs_no_filter(sa, backend_b):
    with sa.without_inbound_filter():
        with sa.in_netns(sa.b):
            lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, b"ipsec0")
        lst.bind((str(sa.b.v4), 27009))
        lst.listen(1)
        lst.settimeout(5)
        with sa.in_netns(sa.a):
            cli = socket.socket()
        cli.settimeout(5)
        with lst, cli:
            with capture(sa.a.netns, "ipsec0") as a_frames:
                cli.connect((str(sa.b.v4), 27009))
                conn, _ = lst.accept()
                cli.sendall(b"hello")
                assert conn.recv(16) == b"hello"
            with conn:
                tok = btns_vici.get_socket_ptoken(conn, backend_b)
                _inject(sa, cli, 27009, a_frames, b"INJECTED-BOUND")
                conn.settimeout(1.0)
                with pytest.raises(TimeoutError):
                    conn.recv(64)
    assert tok.protected and tok.integrity_protected == Setting.LEVEL_HIGH, tok.information_string
    assert "bound to ipsec0" in tok.information_string


def test_latch_breaks_when_the_socket_is_re_marked(sa, backend_a):
    cli, srv = connected_pair(sa, socket.IPPROTO_TCP, 4)
    with cli, srv:
        broken = []
        btns_vici.latch.latch(cli, backend_a, on_break=broken.append)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, BYPASS_MARK)  # from now on it would leave in clear
        with pytest.raises(btns_vici.ProtectionLostError):
            btns_vici.get_socket_ptoken(cli, backend_a)
        deadline = time.monotonic() + 2
        while not broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert broken and broken[0].current.privacy_protected == Setting.DISABLE, broken
        assert "mark=0x42" in broken[0].current.information_string
        btns_vici.latch.unlatch(cli)
