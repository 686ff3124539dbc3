"""The draft's settings on kernel XFRM (issue 16; runs inside the VM tier, real kernel ESP):

* privacy DISABLE + integrity required negotiates integrity-only ESP (ESP-NULL with HMAC-SHA2):
  the payload is readable inside ESP packets on the wire, never in plain TCP, and the pToken
  says privacy DISABLE, integrity LEVEL_MEDIUM or better;
* ``btns:use`` ("IPsec if the peer can, else clear"): the socket policies are ``level use``; a
  peer that can gets ESP, one that cannot gets a clear connection, each reported truthfully;
* a broken latch destroys the kernel socket (ECONNABORTED) on kernel XFRM too.
"""

from __future__ import annotations

import errno
import time

import pytest

import btns_vici
from btns_vici import PToken, Setting, xfrm
from btns_vici.api import connect
from btns_vici.core.requirements import USE_POLICY
from btns_vici.latch import latch, unlatch

from ..integration.acceptor import serve_with, wait_accept
from ..integration.xfrm_support import ip
from . import test_enforce_xfrm_vm as _enforce
from .charon import child_sas
from .netpair import B, sniffer
from .test_enforce_xfrm_vm import ESP, TCP, exchange, guard_policies, transport_demand

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
