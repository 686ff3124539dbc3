"""The draft's settings on kernel XFRM (issue 16; runs inside the VM tier, real kernel ESP):

* privacy DISABLE + integrity required negotiates integrity-only ESP (ESP-NULL with HMAC-SHA2):
  the payload is readable inside ESP packets on the wire, never in plain TCP, and the pToken
  says privacy DISABLE, integrity LEVEL_MEDIUM or better;
* ``btns:use`` ("IPsec if the peer can, else clear"): with the wrapper, an SA is attempted before
  connecting; with a PLAIN connect(2), the socket's trap has an OPTIONAL template: the kernel raises
  the ACQUIRE but sends the SYN in clear, the responder negotiates, and once the SA is up the trap
  becomes required, so the connection's later packets are ESP only. A peer that can gets ESP, one
  that cannot gets a clear connection, each reported truthfully (with the reason);
* a broken latch destroys the kernel socket (ECONNABORTED) on kernel XFRM too.
"""

from __future__ import annotations

import errno
import socket
import struct
import time

import pytest

import btns_vici
from btns_vici import PToken, Setting, acquire, xfrm
from btns_vici.api import connect
from btns_vici.core.requirements import USE_POLICY
from btns_vici.latch import latch, unlatch

from ..integration.acceptor import serve_with, wait_accept
from ..integration.xfrm_support import ip
from . import test_enforce_xfrm_vm as _enforce
from .charon import child_sas
from .netpair import A, B, sniffer
from .test_enforce_xfrm_vm import ESP, TCP, exchange, guard_policies, transport_demand, trap_policies

# The two-charon fixtures of the enforcement tests (module-scoped: this module gets its own pair).
hosts, pair, sides = _enforce.hosts, _enforce.pair, _enforce.sides

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ipsec_kernel")]


def _preload_null(ns: str) -> None:
    """Load cipher_null and hmac(sha256) now (module autoload under TCG can outlast IKE retransmits)."""
    ip(
        "xfrm",
        "state",
        "add",
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "spi",
        "0x77",
        "mode",
        "transport",
        "enc",
        "ecb(cipher_null)",
        "",
        "auth",
        "hmac(sha256)",
        "0x" + "ab" * 32,
        netns=ns,
    )
    ip("xfrm", "state", "flush", netns=ns)


def _serve(b, demand: PToken):
    srv = b.socket()
    return srv, serve_with(srv, demand, b.backend, (str(B), 0))


def null_demand() -> PToken:
    p = transport_demand()
    p.privacy_protected = Setting.DISABLE
    p.integrity_protected = Setting.LEVEL_MEDIUM
    return p


def test_privacy_disable_with_integrity_negotiates_esp_null(sides) -> None:
    a, b = sides
    for side in (a, b):
        _preload_null(side.host_ns.netns)
    srv, got = _serve(b, null_demand())
    cli = a.socket()
    conn = None
    marker = b"integrity-only-esp-null " * 50
    try:
        btns_vici.set_socket_ptoken(cli, null_demand(), a.backend)
        with sniffer(b.host_ns.netns) as frames:
            connect(cli, (str(B), srv.getsockname()[1]), a.backend)
            conn, _ = wait_accept(got, 30.0)
            assert exchange(cli, conn, marker) == marker
        (child,) = [c for c in child_sas(a.host_ns.charon) if c["state"] == "INSTALLED"]
        assert child["encr-alg"] == "NULL" and child["integ-alg"].startswith("HMAC_SHA2_"), child
        tok = btns_vici.get_socket_ptoken(cli, a.backend)
        assert tok.protected, tok.information_string
        assert tok.privacy_protected == Setting.DISABLE and tok.integrity_protected >= Setting.LEVEL_MEDIUM
        assert btns_vici.get_socket_ptoken(conn, b.backend).privacy_protected == Setting.DISABLE
        # On the wire: ESP packets whose payload is readable (no encryption), no plain TCP at all.
        assert any(len(f) > 20 and f[9] == ESP and b"integrity-only-esp-null" in f for f in frames)
        assert not any(len(f) > 20 and f[9] == TCP for f in frames), "TCP in clear on the wire"
        states = [s for s in xfrm.dump_states(a.host_ns.netns) if s.proto == xfrm.IPPROTO_ESP and s.spi]
        assert states and all(s.mode_name == "transport" for s in states)
    finally:
        unlatch(cli)
        cli.close()
        if conn is not None:
            unlatch(conn)
            conn.close()
        srv.close()


def use_demand() -> PToken:
    p = transport_demand()
    p.policy_name = USE_POLICY
    return p


def test_use_gets_esp_when_the_peer_can(sides) -> None:
    a, b = sides
    srv, got = _serve(b, transport_demand())
    cli = a.socket()
    conn = None
    try:
        btns_vici.set_socket_ptoken(cli, use_demand(), a.backend)
        pols = guard_policies(a.host_ns.netns)
        assert pols and all(t.optional for p in pols for t in p.templates)  # level use
        connect(cli, (str(B), srv.getsockname()[1]), a.backend)
        conn, _ = wait_accept(got, 30.0)
        assert exchange(cli, conn, b"use-esp") == b"use-esp"
        tok = btns_vici.get_socket_ptoken(cli, a.backend)
        # ESP out; inbound the optional template also accepts clear packets: integrity is reported DISABLE.
        assert tok.privacy_protected >= Setting.LEVEL_MEDIUM, tok.information_string
        assert [c for c in child_sas(a.host_ns.charon) if c["state"] == "INSTALLED"]
    finally:
        unlatch(cli)
        cli.close()
        if conn is not None:
            unlatch(conn)
            conn.close()
        srv.close()


def test_use_falls_back_to_clear_when_the_peer_cannot(sides) -> None:
    a, b = sides
    (b.peer_dir / "peer.pem").unlink()  # b's charon will not accept a's key: no SA is possible
    srv = b.socket()
    srv.bind((str(B), 0))
    srv.listen()
    cli = a.socket()
    try:
        btns_vici.set_socket_ptoken(cli, use_demand(), a.backend)
        with sniffer(b.host_ns.netns) as frames:
            connect(cli, (str(B), srv.getsockname()[1]), a.backend)
            conn, _ = srv.accept()
            with conn:
                assert exchange(cli, conn, b"use-clear-marker") == b"use-clear-marker"
        tok = btns_vici.get_socket_ptoken(cli, a.backend)
        assert not tok.protected and "NOT protected" in tok.information_string
        assert any(b"use-clear-marker" in f for f in frames)  # truthfully clear
    finally:
        cli.close()
        srv.close()


def _wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _tcp_payload(frame: bytes) -> int:
    """Bytes of TCP payload in an IPv4 frame (0 for a bare SYN/ACK/FIN)."""
    ihl = (frame[0] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 2)[0]
    return total - ihl - (frame[ihl + 12] >> 4) * 4


def _src(frame: bytes) -> str:
    return socket.inet_ntoa(frame[12:16])


def _own_trap(netns: str, mark: int) -> xfrm.XfrmPolicy:
    (trap,) = [p for p in trap_policies(netns) if p.mark is not None and p.mark.value == mark]
    return trap


def test_use_plain_connect_moves_to_esp_when_the_peer_can(sides) -> None:
    """A PLAIN connect(2) with ``btns:use``: the SYN leaves in clear (optional template: the kernel
    sends it and raises the ACQUIRE), the responder negotiates the SA, the trap becomes required,
    and every later packet of the connection is ESP; the pToken read then says protected."""
    a, b = sides
    srv = b.socket()
    srv.bind((str(B), 0))
    btns_vici.set_socket_ptoken(srv, use_demand(), b.backend)  # B may be asked: its responder conn
    srv.listen()
    cli = a.socket()
    conn = None
    marker = b"use-plain-connect-esp-marker " * 100
    try:
        btns_vici.set_socket_ptoken(cli, use_demand(), a.backend)
        entry = acquire.trapped(cli)
        assert entry is not None and entry.use and entry.optional
        assert [t.optional for t in _own_trap(a.host_ns.netns, entry.mark).templates] == [True]
        with sniffer(b.host_ns.netns) as frames:
            cli.connect((str(B), srv.getsockname()[1]))  # the plain system call: not held back
            conn, _ = srv.accept()
            early = btns_vici.get_socket_ptoken(cli, a.backend)
            sa_after_read = [s for s in xfrm.dump_states(a.host_ns.netns) if s.proto == xfrm.IPPROTO_ESP and s.spi]
            if not sa_after_read:  # no SA even after the read: it must have said clear
                assert not early.protected, early.information_string
            print(f"pToken right after connect: protected={early.protected} (SA up by then: {bool(sa_after_read)})")
            assert _wait(lambda: not entry.optional, 20), f"no SA negotiated: {entry.clear}"
            assert _wait(lambda: bool(child_sas(b.host_ns.charon)), 10)
            assert exchange(cli, conn, marker) == marker
            assert exchange(conn, cli, b"use-plain-reply-marker") == b"use-plain-reply-marker"
        tcp = [n for n, f in enumerate(frames) if len(f) > 20 and f[9] == TCP]
        esp = [n for n, f in enumerate(frames) if len(f) > 20 and f[9] == ESP]
        assert tcp and esp, "expected the clear handshake, then ESP"
        first_esp_from_a = min(n for n in esp if _src(frames[n]) == str(A))
        assert all(n < first_esp_from_a for n in tcp), "a clear TCP segment after the connection moved to ESP"
        assert not any(_tcp_payload(frames[n]) for n in tcp), "payload in clear"
        assert not any(b"use-plain-connect-esp-marker" in f or b"use-plain-reply-marker" in f for f in frames)
        tok = btns_vici.get_socket_ptoken(cli, a.backend)
        assert tok.protected and tok.privacy_protected >= Setting.LEVEL_MEDIUM, tok.information_string
        # From the first ESP packet on, the kernel holds the socket to ESP (never back to clear).
        assert [t.optional for t in _own_trap(a.host_ns.netns, entry.mark).templates] == [False]
        assert not entry.verified  # "use" is not latched (README "Demand settings")
    finally:
        cli.close()
        if conn is not None:
            conn.close()
        srv.close()


def test_use_plain_connect_stays_clear_when_the_peer_cannot(sides) -> None:
    """A PLAIN connect(2) with ``btns:use`` to a peer that cannot: the connection works in clear
    from the first packet, the ACQUIRE's attempt (IKE on the wire) fails, and the pToken says
    clear with the reason."""
    a, b = sides
    (b.peer_dir / "peer.pem").unlink()  # b's charon will not accept a's key: no SA is possible
    srv = b.socket()
    srv.bind((str(B), 0))
    srv.listen()
    cli = a.socket()
    try:
        btns_vici.set_socket_ptoken(cli, use_demand(), a.backend)
        entry = acquire.trapped(cli)
        assert entry is not None and entry.use
        with sniffer(b.host_ns.netns) as frames:
            cli.connect((str(B), srv.getsockname()[1]))  # plain
            conn, _ = srv.accept()
            with conn:
                assert exchange(cli, conn, b"use-clear-before-marker") == b"use-clear-before-marker"
                assert _wait(lambda: str(B) in entry.clear, 20), "the ACQUIRE's attempt never ended"
                assert exchange(cli, conn, b"use-clear-after-marker") == b"use-clear-after-marker"
                tok = btns_vici.get_socket_ptoken(cli, a.backend)
        assert not tok.protected, tok.information_string
        info = tok.information_string
        assert "NOT protected" in info and f"btns:use: no SA could be negotiated with {B}" in info, info
        assert entry.clear[str(B)] in info
        assert any(b"use-clear-before-marker" in f for f in frames)  # truthfully clear
        assert any(b"use-clear-after-marker" in f for f in frames)
        ike = [f for f in frames if len(f) > 28 and f[9] == 17 and struct.unpack_from("!H", f, 22)[0] in (500, 4500)]
        assert ike, "the ACQUIRE raised by the optional template drove no IKE attempt"
        assert not any(len(f) > 20 and f[9] == ESP for f in frames)
        assert entry.optional  # still optional: nothing holds the socket to ESP
    finally:
        cli.close()
        srv.close()


def test_broken_latch_destroys_the_kernel_socket(sides) -> None:
    a, b = sides
    srv, got = _serve(b, transport_demand())
    cli = a.socket()
    conn = None
    try:
        btns_vici.set_socket_ptoken(cli, transport_demand(), a.backend)
        connect(cli, (str(B), srv.getsockname()[1]), a.backend, latch_=False)
        conn, _ = wait_accept(got, 30.0)
        lt = latch(cli, a.backend, shutdown=True)
        ses = a.host_ns.charon.session()
        for name in [n for entry in ses.list_conns() for n in entry]:
            for _ in ses.terminate({"ike": name, "timeout": "5000"}):
                pass
        deadline = time.monotonic() + 10
        while not lt.how_stopped and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lt.broken is not None and lt.how_stopped == "destroyed"
        with pytest.raises(OSError) as exc:
            cli.recv(1)
        assert exc.value.errno == errno.ECONNABORTED
    finally:
        unlatch(cli)
        cli.close()
        if conn is not None:
            unlatch(conn)
            conn.close()
        srv.close()
