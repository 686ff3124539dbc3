"""Socket-exact truth on kernel XFRM (transport mode), tried as an attacker would (runs in the VM).

A PSK transport-mode CHILD_SA covers A <-> B. Each test makes sockets whose flow it covers,
captures what crossed B's veth, and checks that the pToken says "protected" exactly when the
capture shows no cleartext: sockets bound to the link or marked (XFRM policies still apply:
protected, and ESP on the wire), a marked socket under a mark-specific bypass policy, a
socket carrying a bypass socket policy set by another privileged process (handed over with
SCM_RIGHTS), and clear datagrams against a required vs an optional inbound template.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import btns_vici
from btns_vici import Setting, capi, xfrm
from btns_vici.plugins import get_backend, get_plugin_manager

from ..integration.xfrm_support import ip, socket_in
from .charon import charon, child_sas, load_psk_conn
from .netpair import A, B, sniffer, two_hosts

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ipsec_kernel")]

REQID = 91
ESP = 50
LINK_A = "btns-vm-va"


class Pair:
    def __init__(self, na: str, nb: str, ca, cb) -> None:
        self.na, self.nb, self.ca, self.cb = na, nb, ca, cb
        self.be_a = get_backend("strongswan", {"vici_socket": str(ca.vici_path), "netns": na})
        self.be_b = get_backend("strongswan", {"vici_socket": str(cb.vici_path), "netns": nb})


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("exact-xfrm")
    with two_hosts() as (na, nb):
        # load the ESP crypto module now (TCG: the autoload may outlast charon's retransmissions)
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
            "0x1",
            "mode",
            "transport",
            "aead",
            "rfc4106(gcm(aes))",
            "0x" + "ab" * 20,
            "128",
            netns=na,
        )
        ip("xfrm", "state", "flush", netns=na)
        with charon(na, work / "a") as ca, charon(nb, work / "b") as cb:
            load_psk_conn(ca, "tr", str(A), str(B), reqid=REQID)
            load_psk_conn(cb, "tr", str(B), str(A), reqid=REQID)
            for _ in ca.session().initiate({"ike": "tr", "child": "host", "timeout": "30000"}):
                pass
            assert [c["state"] for c in child_sas(ca)] == ["INSTALLED"]
            p = Pair(na, nb, ca, cb)
            yield p
            plugin = get_plugin_manager().get_plugin("strongswan")
            plugin.forget(p.be_a.options)
            plugin.forget(p.be_b.options)


@pytest.fixture(autouse=True)
def settled(pair: Pair) -> None:
    """Wait until sockets of earlier tests are gone from A's SPD (UDP sockets are freed after an RCU
    grace period, with their socket policies): only charon's bypass pairs remain."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        socks = [p for p in xfrm.dump_policies(pair.na) if p.is_socket]
        if all(not p.templates for p in socks) and len(socks) <= 8:  # 4 IKE sockets, in + out
            return
        time.sleep(0.1)
    raise AssertionError(f"socket policies left behind: {[(p.index, p.direction, p.templates) for p in socks]}")


def esp_count(frames: list[bytes]) -> int:
    return sum(1 for f in frames if len(f) > 20 and f[9] == ESP)


def udp(ns: str, bind: tuple[str, int] | None = None) -> socket.socket:
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    if bind:
        s.bind(bind)
    return s


def test_bound_and_marked_sockets_are_protected_because_the_policy_still_applies(pair: Pair) -> None:
    srv = socket_in(pair.nb, socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((str(B), 0))
    srv.listen(4)
    srv.settimeout(20)
    results = []
    with srv:
        for name, opt in (
            ("plain", None),
            ("bound", (socket.SO_BINDTODEVICE, LINK_A.encode())),
            ("marked", (socket.SO_MARK, 0x42)),
        ):
            cli = socket_in(pair.na, socket.AF_INET, socket.SOCK_STREAM)
            cli.settimeout(20)
            if opt:
                cli.setsockopt(socket.SOL_SOCKET, *opt)
            marker = f"XFRM-{name.upper()}-SECRET".encode()
            with cli, sniffer(pair.nb) as frames:
                cli.connect(srv.getsockname())
                conn, _ = srv.accept()
                with conn:
                    cli.sendall(marker)
                    assert conn.recv(64) == marker
                    tok = btns_vici.get_socket_ptoken(cli, pair.be_a)
            seen = any(marker in f for f in frames)
            results.append((name, tok, seen, esp_count(frames)))
            assert not seen and esp_count(frames) > 0, (name, len(frames))
            assert tok.protected, f"{name}: {tok.information_string}"
    info = {name: tok.information_string for name, tok, _s, _e in results}
    assert "mark=0x42" in info["marked"] and "dev=none" not in info["bound"]


def test_a_mark_specific_bypass_policy_is_seen(pair: Pair) -> None:
    ip(
        "xfrm",
        "policy",
        "add",
        "src",
        f"{A}/32",
        "dst",
        f"{B}/32",
        "dir",
        "out",
        "priority",
        "1",
        "mark",
        "0x42",
        "mask",
        "0xffffffff",
        netns=pair.na,
    )  # action allow, no template: marked packets in clear
    try:
        with udp(pair.nb, (str(B), 29001)), udp(pair.na) as marked, udp(pair.na) as plain:
            marked.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x42)
            marked.connect((str(B), 29001))
            plain.connect((str(B), 29001))
            with sniffer(pair.nb) as frames:
                marked.send(b"MARK-BYPASS-LEAK")
                plain.send(b"MARK-BYPASS-PLAIN")
            tok_marked = btns_vici.get_socket_ptoken(marked, pair.be_a)
            tok_plain = btns_vici.get_socket_ptoken(plain, pair.be_a)
    finally:
        ip(
            "xfrm",
            "policy",
            "delete",
            "src",
            f"{A}/32",
            "dst",
            f"{B}/32",
            "dir",
            "out",
            "mark",
            "0x42",
            "mask",
            "0xffffffff",
            netns=pair.na,
        )
    assert any(b"MARK-BYPASS-LEAK" in f for f in frames)  # it really left in clear
    assert not any(b"MARK-BYPASS-PLAIN" in f for f in frames)
    info = tok_marked.information_string
    assert not tok_marked.protected and "out policy index" in info, info
    assert tok_plain.protected, tok_plain.information_string


CHILD = textwrap.dedent("""
    import array, socket, sys
    from btns_vici import netns, xfrm
    ns, path, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    xfrm.set_socket_policy(s, "out", [])   # bypass: this socket skips the SPD
    xfrm.set_socket_policy(s, "in", [])
    s.connect((dst, port))
    s.send(b"FOREIGN-BYPASS-LEAK")
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect(path)
    u.sendmsg([b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
    u.recv(1)  # until the parent is done
""")


def test_a_bypass_socket_policy_set_by_another_process_is_never_reported_protected(pair: Pair, tmp_path: Path) -> None:
    path = str(tmp_path / "handover.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    lst.settimeout(60)
    with udp(pair.nb, (str(B), 29002)) as srv, udp(pair.na) as plain, udp(pair.na) as guarded:
        for d in ("out", "in"):  # ours: a recorded policy requiring this SA
            xfrm.set_socket_policy(guarded, d, ["esp"], reqid=REQID)
        plain.connect((str(B), 29002))
        guarded.connect((str(B), 29002))
        with sniffer(pair.nb) as frames:
            child = subprocess.Popen([sys.executable, "-c", CHILD, pair.na, path, str(B), "29002"])
            try:
                conn, _ = lst.accept()
                with conn:
                    _msg, fds, _f, _a = socket.recv_fds(conn, 16, 1)
                    handed = socket.socket(fileno=fds[0])
                    with handed:
                        tok_handed = btns_vici.get_socket_ptoken(handed, pair.be_a)
                        tok_plain = btns_vici.get_socket_ptoken(plain, pair.be_a)
                        tok_guarded = btns_vici.get_socket_ptoken(guarded, pair.be_a)
                    conn.send(b"x")
            finally:
                child.wait(30)
                lst.close()
        # The foreign policy died with its socket: the plain socket is provable again.
        deadline = time.monotonic() + 5
        while not (again := btns_vici.get_socket_ptoken(plain, pair.be_a)).protected and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(TimeoutError):
            srv.recv(64)  # B's kernel dropped it (its inbound policy requires ESP): it did leak, though
    assert any(b"FOREIGN-BYPASS-LEAK" in f for f in frames)  # it crossed the wire in clear
    assert not tok_handed.protected and "set by other processes" in tok_handed.information_string, (
        tok_handed.information_string
    )
    # While it exists, no socket without a policy of ours can be proven (the kernel cannot say which socket has it)
    assert not tok_plain.protected
    assert tok_guarded.protected and "own out policy" in tok_guarded.information_string, tok_guarded.information_string
    assert again.protected, again.information_string


def _in_policy(pair: Pair) -> xfrm.XfrmPolicy:
    flow = btns_vici.Flow(socket.IPPROTO_UDP, A, 29003, B, 29004)
    (pol,) = [
        p for p in xfrm.dump_policies(pair.na) if not p.is_socket and p.direction == "in" and p.sel.covers(flow, "in")
    ]
    return pol


def _set_in_level(pair: Pair, pol: xfrm.XfrmPolicy, level: str) -> None:
    sel = pol.sel
    ip(
        "xfrm",
        "policy",
        "update",
        "src",
        f"{sel.saddr}/{sel.prefixlen_s}",
        "dst",
        f"{sel.daddr}/{sel.prefixlen_d}",
        "dir",
        "in",
        "priority",
        str(pol.priority),
        "tmpl",
        "src",
        str(B),
        "dst",
        str(A),
        "proto",
        "esp",
        "reqid",
        str(REQID),
        "mode",
        "transport",
        "level",
        level,
        netns=pair.na,
    )


def test_clear_datagrams_against_required_and_optional_inbound_templates(pair: Pair) -> None:
    pol = _in_policy(pair)
    assert all(not t.optional for t in pol.templates)  # charon's: level required
    with (
        udp(pair.na, ("0.0.0.0", 29003)) as rcv,
        udp(pair.nb, (str(B), 29004)) as good,
        udp(pair.nb, (str(B), 29005)) as evil,
    ):
        btns_vici.enable_pktinfo(rcv)
        xfrm.set_socket_policy(evil, "out", [])  # B's attacker socket sends in clear
        btns_vici.set_default_backend(pair.be_a)
        try:
            with sniffer(pair.na) as frames:
                evil.sendto(b"CLEAR-REQUIRED", (str(A), 29003))
                good.sendto(b"SA-DGRAM", (str(A), 29003))
                first = btns_vici.recvmsg(rcv, 64)
            assert first.data == b"SA-DGRAM"  # the kernel dropped the clear one (required template)
            p_sa = capi.ipsec_create_pToken()
            capi.ipsec_get_msg_pToken(first, p_sa)
            assert p_sa.protected and "requires it" in p_sa.information_string, p_sa.information_string
            _set_in_level(pair, pol, "use")
            try:
                evil.sendto(b"CLEAR-OPTIONAL", (str(A), 29003))
                clear = btns_vici.recvmsg(rcv, 64)
                assert clear.data == b"CLEAR-OPTIONAL"
                p_clear = capi.ipsec_create_pToken()
                capi.ipsec_get_msg_pToken(clear, p_clear)
                with udp(pair.na, (str(A), 29006)) as conn_a:
                    conn_a.connect((str(B), 29004))
                    stream_tok = btns_vici.get_socket_ptoken(conn_a, pair.be_a)
            finally:
                _set_in_level(pair, pol, "required")
        finally:
            btns_vici.set_default_backend(None)
    assert any(b"CLEAR-REQUIRED" in f for f in frames)  # sent in clear, and refused by the kernel
    assert not p_clear.protected and "in clear" in p_clear.information_string, p_clear.information_string
    assert stream_tok.privacy_protected != Setting.DISABLE
    assert stream_tok.integrity_protected == Setting.DISABLE, stream_tok.information_string
