"""pTokens and enforcement on the kernel-xfrm data plane (runs inside the VM tier).

Two charons with kernel-netlink (no kernel-libipsec, ``install_routes = no``) in two network
namespaces joined by a veth pair:

* get_socket_ptoken on a TCP connection over a transport-mode CHILD_SA loaded over VICI names
  the data plane ``kernel-xfrm`` with the SPIs and reqid the kernel's SAD holds, and says "not
  protected" as soon as the kernel SA is gone behind charon's back.
* set_socket_ptoken + btns_vici.api connect/listen/accept (BTNS raw keys, as in
  tests/integration/test_enforce.py): the guard's per-socket policies, a transport-mode SA
  negotiated on demand, ESP on the wire (the SA's byte counters rise), both ends agree.
* With the guard armed and no possible SA the connection fails closed: nothing reaches the peer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vici.exception import CommandException

import btns_vici
from btns_vici import AuthMethod, IToken, PToken, Setting, dataplane, xfrm
from btns_vici.api import accept, connect, listen
from btns_vici.backend import Backend
from btns_vici.hostkey import HostIdentity, load_or_create
from btns_vici.latch import unlatch
from btns_vici.plugins import get_backend, get_plugin_manager
from btns_vici.strongswan.conns import XFRM_REQID

from ..integration.xfrm_support import ip, socket_in
from .charon import PLUGINS, Charon, charon, child_sas, load_psk_conn
from .netpair import A, B, sniffer, two_hosts

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ipsec_kernel")]

#: pkcs8: the library's host keys are PKCS#8 PEM (load-key type "any").
ENFORCE_PLUGINS = PLUGINS + " pkcs8"
REQID = 77
TCP, ESP = 6, 50


class Host:
    """One namespace with its charon."""

    def __init__(self, netns: str, charon: Charon) -> None:
        self.netns, self.charon = netns, charon

    @property
    def options(self) -> dict[str, str]:
        return {"vici_socket": str(self.charon.vici_path), "netns": self.netns}

    def socket(self, timeout: float = 10.0) -> socket.socket:
        s = socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        return s


#: The ESP algorithms these tests negotiate, with a dummy key of the right length.
AEADS = {"rfc4106(gcm(aes))": 20, "rfc7539esp(chacha20,poly1305)": 36}


def load_esp_algorithms(ns: str) -> None:
    """Make the kernel load the ESP crypto modules now (with a throwaway SA), not while charon
    installs its first SA: under TCG the autoload can outlast charon's IKE retransmissions."""
    for n, (alg, key_len) in enumerate(AEADS.items(), 1):
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
            hex(n),
            "mode",
            "transport",
            "aead",
            alg,
            "0x" + "ab" * key_len,
            "128",
            netns=ns,
        )
    ip("xfrm", "state", "flush", netns=ns)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    work = tmp_path_factory.mktemp("enforce-xfrm")
    with two_hosts() as (na, nb):
        load_esp_algorithms(na)
        with charon(na, work / "a", ENFORCE_PLUGINS) as ca, charon(nb, work / "b", ENFORCE_PLUGINS) as cb:
            yield Host(na, ca), Host(nb, cb)


def _reset(h: Host) -> None:
    """Terminate and unload every connection of ``h``'s charon; flush its kernel SAs and policies."""
    ses = h.charon.session()
    names = [n for entry in ses.list_conns() for n in entry]
    for name in names:
        # The library unloads what it loaded once its sockets are gone (lifecycle's reaper), so a
        # connection or SA listed a moment ago may be gone already: that is the state we want.
        with contextlib.suppress(CommandException):
            if list(ses.list_sas({"ike": name})):
                for _ in ses.terminate({"ike": name, "timeout": "-1", "force": "yes"}):
                    pass
        with contextlib.suppress(CommandException):
            ses.unload_conn({"name": name})
    deadline = time.monotonic() + 5
    while list(ses.list_sas()) and time.monotonic() < deadline:
        time.sleep(0.05)
    ip("xfrm", "state", "flush", netns=h.netns)
    ip("xfrm", "policy", "flush", netns=h.netns)


def _forget(options: dict[str, str]) -> None:
    get_plugin_manager().get_plugin("strongswan").forget(options)


def _diagnose(h: Host, test: str) -> None:
    """Charon's log and the kernel's SAD/SPD: printed (shown when the test failed) and, with
    BTNS_VM_OUT (the VM tier's output share), saved there for BTNS_VM_KEEP."""
    text = (
        f"--- ip xfrm state/policy in {h.netns} ---\n{ip('-s', 'xfrm', 'state', netns=h.netns)}"
        f"{ip('xfrm', 'policy', netns=h.netns)}--- charon log ---\n"
    )
    print(text + h.charon.log_tail(80))
    out = os.environ.get("BTNS_VM_OUT")
    if out and os.path.isdir(out):
        with open(os.path.join(out, f"{test}-{h.netns}.log"), "w") as f:
            f.write(text + h.charon.log_tail(100000))


@pytest.fixture
def pair(hosts: tuple[Host, Host], request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host]]:
    """The module's hosts, reset before and after each test."""
    for h in hosts:
        _reset(h)
    yield hosts
    for h in hosts:
        _diagnose(h, request.node.name)
        _reset(h)
        dataplane.forget(h.netns)


def ptoken_fields(tok: PToken) -> dict[str, str]:
    """``key=value`` words of a pToken's auditString (spi_in, spi_out, reqid, mode, dataplane, ...)."""
    return dict(re.findall(r"(\w+)=(\S+)", tok.audit_string or ""))


def exchange(cli: socket.socket, conn: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` from ``cli`` to ``conn`` and return what arrived."""
    cli.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


# ---- 1. get_socket_ptoken over a transport-mode CHILD_SA loaded over VICI -------------------------


def test_ptoken_names_kernel_xfrm_sa_and_fails_closed_when_it_vanishes(pair: tuple[Host, Host]) -> None:
    ha, hb = pair
    load_psk_conn(ha.charon, "tr", str(A), str(B), reqid=REQID)
    load_psk_conn(hb.charon, "tr", str(B), str(A), reqid=REQID)
    for _ in ha.charon.session().initiate({"ike": "tr", "child": "host", "timeout": "30000"}):
        pass
    (ch,) = [c for c in child_sas(ha.charon) if c["state"] == "INSTALLED"]
    assert (ch["mode"], ch["protocol"]) == ("TRANSPORT", "ESP")
    spi_out, spi_in = int(ch["spi-out"], 16), int(ch["spi-in"], 16)

    be_a, be_b = get_backend("strongswan", ha.options), get_backend("strongswan", hb.options)
    assert be_a.capabilities().dataplane == dataplane.XFRM  # charon loaded kernel-netlink, not libipsec
    server = hb.socket()
    server.bind((str(B), 0))
    server.listen()
    cli = ha.socket()
    try:
        cli.connect(server.getsockname())
        conn, _ = server.accept()
        with conn:
            assert exchange(cli, conn, b"over-transport-sa " * 100) == b"over-transport-sa " * 100
            tok = btns_vici.get_socket_ptoken(cli, be_a)
            peer_tok = btns_vici.get_socket_ptoken(conn, be_b)

            # Levels of aes128gcm16 (load_psk_conn's proposal): 128-bit key, 16-byte ICV.
            assert tok.protected, tok.information_string
            assert tok.privacy_protected == Setting.LEVEL_MEDIUM
            assert tok.integrity_protected == Setting.LEVEL_HIGH
            assert tok.tunnel_mode == Setting.DISABLE
            assert tok.ipoptions_protected == Setting.DISABLE
            assert tok.itoken.authentication_method is AuthMethod.PRESHAREDKEY

            # The SPIs and reqid the token names are the kernel's SAs, cross-checked in dump_states.
            states = {(s.spi, s.daddr): s for s in xfrm.dump_states(ha.netns)}
            out_sa, in_sa = states[(spi_out, B)], states[(spi_in, A)]
            assert (out_sa.reqid, in_sa.reqid, out_sa.mode_name, in_sa.mode_name) == (
                REQID,
                REQID,
                "transport",
                "transport",
            )
            assert out_sa.current.packets > 0  # the exchange above went through it
            audit = ptoken_fields(tok)
            assert audit["dataplane"] == "kernel-xfrm"
            assert (int(audit["spi_out"], 16), int(audit["spi_in"], 16)) == (out_sa.spi, in_sa.spi)
            assert int(audit["reqid"]) == out_sa.reqid and audit["mode"] == "TRANSPORT"
            info = tok.information_string
            assert "transport mode" in info and "data plane kernel-xfrm" in info
            assert f"spi 0x{out_sa.spi:08x} -> {B}" in info and f"spi 0x{in_sa.spi:08x} -> {A}" in info
            assert f"reqid {out_sa.reqid}" in info

            # The other end sees the same SA pair, mirrored.
            assert peer_tok.protected and peer_tok.tunnel_mode == Setting.DISABLE
            peer = ptoken_fields(peer_tok)
            assert (int(peer["spi_in"], 16), int(peer["spi_out"], 16)) == (spi_out, spi_in)
            assert peer["dataplane"] == "kernel-xfrm"

            # The kernel SAs vanish behind charon's back: the very next query fails closed.
            ip("xfrm", "state", "flush", netns=ha.netns)
            assert xfrm.dump_states(ha.netns) == []
            assert [c["state"] for c in child_sas(ha.charon)] == ["INSTALLED"]  # charon was not told
            gone = btns_vici.get_socket_ptoken(cli, be_a)
            assert not gone.protected
            assert (gone.privacy_protected, gone.integrity_protected) == (Setting.DISABLE, Setting.DISABLE)
            assert gone.itoken is None
            assert "NOT protected" in gone.information_string
    finally:
        cli.close()
        server.close()
        _forget(ha.options)
        _forget(hb.options)


# ---- 2./3. set_socket_ptoken + connect/listen/accept on kernel-xfrm ------------------------------


class Side:
    """One end as an application sees it: host key, peer-key directory, backend (as in test_enforce)."""

    def __init__(self, host: Host, root: Path, name: str) -> None:
        self.host_ns = host
        self.key_dir = root / f"{name}-keys"
        self.peer_dir = root / f"{name}-peers"
        self.peer_dir.mkdir(parents=True)
        self.host: HostIdentity = load_or_create(self.key_dir)
        self.options = {**host.options, "key_dir": str(self.key_dir), "peer_keys": str(self.peer_dir)}
        self.backend: Backend = get_backend("strongswan", self.options)

    def trust(self, other: Side) -> None:
        (self.peer_dir / "peer.pem").write_bytes(other.host.public_pem)

    def socket(self, timeout: float = 20.0) -> socket.socket:
        return self.host_ns.socket(timeout)


@pytest.fixture
def sides(pair: tuple[Host, Host], tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    a, b = Side(pair[0], tmp_path, "a"), Side(pair[1], tmp_path, "b")
    a.trust(b)
    b.trust(a)
    yield a, b
    for s in (a, b):
        _forget(s.options)


def transport_demand() -> PToken:
    """BTNS (unauthenticated raw keys), privacy at least MEDIUM, integrity on, transport mode."""
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.integrity_protected = Setting.ENABLE
    p.tunnel_mode = Setting.DISABLE
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    t.set_auth_method(AuthMethod.LEAPOFFAITH, Setting.ENABLE)
    p.itoken = t
    return p


def guard_policies(netns: str) -> list[xfrm.XfrmPolicy]:
    """The per-socket policies in ``netns`` that ask for a transform (charon's IKE sockets carry
    bypass socket policies without templates: those are not the guard's)."""
    return [p for p in xfrm.dump_policies(netns) if p.is_socket and p.templates]


def trap_policies(netns: str) -> list[xfrm.XfrmPolicy]:
    """The SPD out policies btns_vici.acquire keys to a trapped socket's mark."""
    from btns_vici.acquire import MARK_BIT

    return [
        p
        for p in xfrm.dump_policies(netns)
        if not p.is_socket and p.mark is not None and p.mark.value & MARK_BIT and p.mark.mask == 0xFFFFFFFF
    ]


def assert_guarded(netns: str) -> None:
    """The guard of issue 16: a per-socket in policy requiring ESP, and out a trap (SPD policy on
    the socket's own mark) requiring ESP with the library's reqid (the kernel matches it exactly)."""
    pols = guard_policies(netns)
    assert {p.direction for p in pols} == {"in"}, pols
    for p in pols:
        assert p.action == 0 and [(t.proto, t.mode, t.optional) for t in p.templates] == [
            (xfrm.IPPROTO_ESP, xfrm.MODES["transport"], False)
        ]
    traps = trap_policies(netns)
    assert traps and all(p.direction == "out" for p in traps), traps
    for p in traps:
        assert p.action == 0 and [(t.proto, t.mode, t.optional, t.reqid) for t in p.templates] == [
            (xfrm.IPPROTO_ESP, xfrm.MODES["transport"], False, XFRM_REQID)
        ]


def test_enforced_btns_connection_carries_esp_in_transport_mode(sides: tuple[Side, Side]) -> None:
    a, b = sides
    demand = transport_demand()
    payload = b"enforced-over-kernel-esp " * 4000
    srv = b.socket()
    btns_vici.set_socket_ptoken(srv, demand, b.backend)
    srv.bind((str(B), 0))
    listen(srv, 4, b.backend)
    assert_guarded(b.host_ns.netns)
    got: list = []

    def run() -> None:
        try:
            got.append(accept(srv, b.backend))
        except OSError as exc:
            got.append(exc)

    acceptor = threading.Thread(target=run, daemon=True)
    acceptor.start()
    cli = a.socket()
    btns_vici.set_socket_ptoken(cli, demand, a.backend)
    assert_guarded(a.host_ns.netns)
    assert xfrm.dump_states(a.host_ns.netns) == []  # nothing negotiated yet
    conn = None
    try:
        with sniffer(b.host_ns.netns) as frames:
            connect(cli, (str(B), srv.getsockname()[1]), a.backend)
            acceptor.join(30)
            assert got, "the server did not accept"
            if isinstance(got[0], Exception):
                raise got[0]
            conn, _addr = got[0]
            pa = btns_vici.get_socket_ptoken(cli, a.backend)
            spi_out, spi_in = int(ptoken_fields(pa)["spi_out"], 16), int(ptoken_fields(pa)["spi_in"], 16)
            before_a = xfrm.find_state(spi_out, "esp", B, a.host_ns.netns)
            before_b = xfrm.find_state(spi_out, "esp", B, b.host_ns.netns)
            assert exchange(cli, conn, payload) == payload
            assert exchange(conn, cli, b"reply") == b"reply"
        after_a = xfrm.find_state(spi_out, "esp", B, a.host_ns.netns)
        after_b = xfrm.find_state(spi_out, "esp", B, b.host_ns.netns)
        back_a = xfrm.find_state(spi_in, "esp", A, a.host_ns.netns)

        # The backend negotiated a transport-mode SA; the kernel carried the payload through it.
        (child,) = [c for c in child_sas(a.host_ns.charon) if c["state"] == "INSTALLED"]
        assert (child["mode"], child["protocol"]) == ("TRANSPORT", "ESP")
        assert child["name"].startswith("btns-init-")
        assert after_a.mode_name == "transport" and after_a.reqid == int(child["reqid"]) == XFRM_REQID
        assert after_b.reqid == XFRM_REQID  # the responder's conn carries the same static reqid
        assert after_a.current.bytes - before_a.current.bytes >= len(payload)
        assert after_b.current.bytes - before_b.current.bytes >= len(payload)  # and b decrypted it
        assert back_a.current.packets > 0  # and the reply came back through ESP
        assert any(len(f) > 20 and f[9] == ESP for f in frames)
        assert not any(len(f) > 20 and f[9] == TCP for f in frames), "TCP in clear on the wire"
        assert not any(b"enforced-over-kernel-esp" in f for f in frames)
        assert_guarded(a.host_ns.netns)  # the guard is still on the connected socket

        # Both ends' tokens agree.
        pb = btns_vici.get_socket_ptoken(conn, b.backend)
        for tok in (pa, pb):
            assert tok.protected, tok.information_string
            assert tok.privacy_protected >= Setting.LEVEL_MEDIUM and tok.integrity_protected >= Setting.LEVEL_LOW
            assert tok.tunnel_mode == Setting.DISABLE
            assert tok.itoken.authentication_method is AuthMethod.BTNS
            assert ptoken_fields(tok)["dataplane"] == "kernel-xfrm"
            assert "data plane kernel-xfrm" in tok.information_string
        assert (pa.privacy_protected, pa.integrity_protected) == (pb.privacy_protected, pb.integrity_protected)
        assert pa.itoken.pub_key_id == b.host.public_der and pb.itoken.pub_key_id == a.host.public_der
        assert pa.itoken == pb.remote_itoken and pb.itoken == pa.remote_itoken
        fb = ptoken_fields(pb)
        assert (int(fb["spi_in"], 16), int(fb["spi_out"], 16)) == (spi_out, spi_in)
        assert f"spi 0x{spi_out:08x} -> {B}" in pa.information_string
    finally:
        unlatch(cli)
        cli.close()
        if conn is not None:
            unlatch(conn)
            conn.close()
        srv.close()


def test_guard_fails_closed_when_no_sa_is_possible(sides: tuple[Side, Side]) -> None:
    a, b = sides
    # B runs a plain listener and its charon has no connection at all: no SA can be negotiated.
    srv = b.socket(timeout=1.0)
    srv.bind((str(B), 0))
    srv.listen()
    port = srv.getsockname()[1]
    guarded, raw = a.socket(), a.socket(timeout=3.0)
    try:
        with sniffer(b.host_ns.netns) as frames:
            btns_vici.set_socket_ptoken(guarded, transport_demand(), a.backend)
            started = time.monotonic()
            with pytest.raises(OSError) as exc:
                connect(guarded, (str(B), port), a.backend)  # the library's connect: establish fails
            took = time.monotonic() - started
            assert exc.value.errno == errno.EHOSTUNREACH, exc.value
            # A plain connect() on a guarded socket: the kernel refuses to send without an SA.
            btns_vici.set_socket_ptoken(raw, transport_demand(), a.backend)
            with pytest.raises(OSError) as exc2:
                raw.connect((str(B), port))
            # (issue 16: the kernel's ACQUIRE is answered, the negotiation fails, the socket is destroyed)
            assert exc2.value.errno in (errno.ECONNABORTED, errno.ETIMEDOUT), exc2.value
            with pytest.raises(TimeoutError):
                srv.accept()  # the listener receives nothing
        assert took < 25
        assert not any(len(f) > 20 and f[9] in (TCP, ESP) for f in frames), "a segment reached B"
        # No SA exists (the kernel's ACQUIRE may have left a larval entry, SPI 0, without keys).
        assert [s for s in xfrm.dump_states(a.host_ns.netns) if s.proto == xfrm.IPPROTO_ESP and s.spi] == []
        assert len(guard_policies(a.host_ns.netns)) == 2  # both sockets still guarded (in each)
        # Out: the socket that never connected keeps its trap; the destroyed one lost it (sock_diag no
        # longer lists it) and only the backstop (block, any trap mark) stands behind a reconnect.
        marks = {s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0xFFFFFFFF for s in (guarded, raw)}
        assert {p.mark.value for p in trap_policies(a.host_ns.netns)} < marks
        assert [
            p.action
            for p in xfrm.dump_policies(a.host_ns.netns)
            if p.mark is not None and (p.mark.value, p.mark.mask) == (0x80000000, 0x80000000) and p.direction == "out"
        ] == [1, 1]  # the backstop (IPv4 and IPv6): block

        # Control: the same connect without the guard does reach the listener, in clear.
        srv.settimeout(10)
        with a.socket() as clear, sniffer(b.host_ns.netns) as clear_frames:
            clear.connect((str(B), port))
            conn, _ = srv.accept()
            with conn:
                assert exchange(clear, conn, b"in-clear-marker") == b"in-clear-marker"
            assert not btns_vici.get_socket_ptoken(clear, a.backend).protected
        assert any(b"in-clear-marker" in f for f in clear_frames)
    finally:
        for s in (guarded, raw, srv):
            s.close()
