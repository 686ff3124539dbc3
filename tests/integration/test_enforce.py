"""ipsec_set_socket_pToken enforces (issue: enforcement): guard, SA on demand, pinning, latching, server side."""

from __future__ import annotations

import contextlib
import errno
import socket
from pathlib import Path

import pytest

import btns_vici
from btns_lab.testbed import Testbed
from btns_vici import AuthMethod, IToken, ProtectionLostError, PToken, Setting
from btns_vici.api import connect
from btns_vici.backend import Backend
from btns_vici.hostkey import HostIdentity, load_or_create
from btns_vici.latch import LatchBroken, latch, unlatch
from btns_vici.plugins import get_backend

from .acceptor import serve_with, wait_accept

pytestmark = pytest.mark.testbed


class Side:
    def __init__(self, tb: Testbed, peer, root: Path, tag: str = "") -> None:
        self.peer = peer
        self.tb = tb
        self.key_dir = root / f"{peer.name}{tag}-keys"
        self.peer_dir = root / f"{peer.name}{tag}-peers"
        self.peer_dir.mkdir(parents=True)
        self.host: HostIdentity = load_or_create(self.key_dir)
        self.options = {**peer.options, "key_dir": str(self.key_dir), "peer_keys": str(self.peer_dir)}
        self.backend: Backend = get_backend("strongswan", self.options)

    def trust(self, other: Side, name: str = "peer") -> None:
        (self.peer_dir / f"{name}.pem").write_bytes(other.host.public_pem)

    def socket(self, family: int = 4, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with self.tb.in_netns(self.peer):
            s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, kind)
        s.settimeout(10)
        return s


def _cleanup(tb: Testbed) -> None:
    for p in tb.peers:
        if p.proc is None or p.proc.poll() is not None:
            continue
        names = [n for conn in list(p.ctl.list_conns()) for n in conn if n.startswith("btns-")]
        for name in names:
            with contextlib.suppress(Exception):
                for _ in p.ctl.terminate({"ike": name, "timeout": "3000", "force": "yes"}):
                    pass
            with contextlib.suppress(Exception):
                p.ctl.unload_conn({"name": name})


@pytest.fixture
def sides(tb: Testbed, tmp_path: Path):
    a, b = Side(tb, tb.a, tmp_path), Side(tb, tb.b, tmp_path)
    a.trust(b)
    b.trust(a)
    yield a, b
    _cleanup(tb)


def btns_demand(level: Setting = Setting.LEVEL_MEDIUM) -> PToken:
    p = PToken()
    p.privacy_protected = level
    p.integrity_protected = Setting.ENABLE
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    t.set_auth_method(AuthMethod.LEAPOFFAITH, Setting.ENABLE)
    p.itoken = t
    return p


def serve(b: Side, demand: PToken, port: int) -> tuple[socket.socket, list]:
    srv = b.socket()
    return srv, serve_with(srv, demand, b.backend, (str(b.peer.v4), port))


def test_client_server_btns_enforced_end_to_end(tb, sides):
    a, b = sides
    srv, got = serve(b, btns_demand(), 25001)
    cli = a.socket()
    btns_vici.set_socket_ptoken(cli, btns_demand(), a.backend)
    connect(cli, (str(b.peer.v4), 25001), a.backend)
    conn, _addr = wait_accept(got)
    with cli, conn, srv:
        cli.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        pa = btns_vici.get_socket_ptoken(cli, a.backend)
        pb = btns_vici.get_socket_ptoken(conn, b.backend)
        assert pa.privacy_protected >= Setting.LEVEL_MEDIUM and pa.protected
        assert pa.itoken.pub_key_id == b.host.public_der
        assert pb.itoken.pub_key_id == a.host.public_der
        assert pa.itoken == pb.remote_itoken and pb.itoken == pa.remote_itoken
        assert pa.itoken.authentication_method is AuthMethod.BTNS
        unlatch(cli)
        unlatch(conn)


def test_guard_refuses_cleartext(tb, sides):
    """With the guard armed and no SA, nothing leaves; the same connect without the guard goes out in clear."""
    a, b = sides
    with tb.without_inbound_filter(), b.socket() as srv:
        srv.bind((str(b.peer.v4), 25002))
        srv.listen(4)
        with a.socket() as clear:
            clear.connect((str(b.peer.v4), 25002))  # no SA: the testbed link carries it in clear
            assert not btns_vici.get_socket_ptoken(clear, a.backend).protected
        guarded = a.socket()
        guarded.settimeout(2)
        btns_vici.set_socket_ptoken(guarded, btns_demand(), a.backend)
        with guarded, pytest.raises(OSError):
            guarded.connect((str(b.peer.v4), 25002))  # plain connect, no SA: fails closed


def test_pinned_peer_identity_is_required(tb, sides, tmp_path):
    a, b = sides
    # First connection: learn B's identity and save it (serialized iToken).
    srv, got = serve(b, btns_demand(), 25003)
    cli = a.socket()
    btns_vici.set_socket_ptoken(cli, btns_demand(), a.backend)
    connect(cli, (str(b.peer.v4), 25003), a.backend, latch_=False)
    conn, _ = wait_accept(got)
    saved = btns_vici.get_socket_ptoken(cli, a.backend).itoken.to_bytes()
    unlatch(conn)
    for s in (cli, conn, srv):
        s.close()
    _cleanup(tb)
    # Pinning the saved identity works.
    pin = btns_demand()
    pin.itoken = IToken.from_bytes(saved)
    srv, got = serve(b, btns_demand(), 25004)
    cli = a.socket()
    btns_vici.set_socket_ptoken(cli, pin, a.backend)
    connect(cli, (str(b.peer.v4), 25004), a.backend, latch_=False)
    conn, _ = wait_accept(got)
    assert btns_vici.get_socket_ptoken(cli, a.backend).itoken.pub_key_id == b.host.public_der
    unlatch(conn)
    for s in (cli, conn, srv):
        s.close()
    _cleanup(tb)
    # Another identity is refused: pin a key B does not have.
    stranger = load_or_create(tmp_path / "stranger")
    wrong = btns_demand()
    wrong.itoken = stranger.itoken()
    srv, got = serve(b, btns_demand(), 25005)
    cli = a.socket()
    btns_vici.set_socket_ptoken(cli, wrong, a.backend)
    with cli, srv, pytest.raises(OSError) as e:
        connect(cli, (str(b.peer.v4), 25005), a.backend)
    assert e.value.errno == errno.EHOSTUNREACH


def test_latch_breaks_when_sa_is_terminated(tb, sides):
    a, b = sides
    srv, got = serve(b, btns_demand(), 25006)
    cli = a.socket()
    btns_vici.set_socket_ptoken(cli, btns_demand(), a.backend)
    broken: list[LatchBroken] = []
    connect(cli, (str(b.peer.v4), 25006), a.backend, latch_=False)
    lt = latch(cli, a.backend, on_break=broken.append, shutdown=True)
    conn, _ = wait_accept(got)
    assert btns_vici.get_socket_ptoken(cli, a.backend).protected
    # Terminate the SA under the live connection.
    names = [n for entry in list(a.peer.ctl.list_conns()) for n in entry if n.startswith("btns-init-")]
    for name in names:
        for _ in a.peer.ctl.terminate({"ike": name, "timeout": "3000", "force": "yes"}):
            pass
    import time

    deadline = time.monotonic() + 5
    while not broken and time.monotonic() < deadline:
        time.sleep(0.02)
    assert broken, "the latch callback did not run"
    assert lt.broken is not None
    with pytest.raises(ProtectionLostError) as e:
        btns_vici.get_socket_ptoken(cli, a.backend)
    assert e.value.errno == errno.ECONNABORTED
    assert cli.recv(1) == b""  # shut down
    unlatch(cli)
    unlatch(conn)
    for s in (cli, conn, srv):
        s.close()


def test_bad_input_errnos(tb, sides, tmp_path):
    a, _b = sides
    f = open(tmp_path / "file", "w")
    with f, pytest.raises(OSError) as e:
        btns_vici.set_socket_ptoken(f.fileno(), btns_demand(), a.backend)
    assert e.value.errno == errno.ENOTSOCK
    # Requirements the backend cannot meet: NULL authentication only, transport mode on libipsec.
    only_null = PToken()
    t = IToken()
    t.set_auth_method(AuthMethod.NONE, Setting.ENABLE)
    only_null.itoken = t
    with a.socket() as s, pytest.raises(OSError) as e:
        btns_vici.set_socket_ptoken(s, only_null, a.backend)
    assert e.value.errno == errno.EOPNOTSUPP
    transport = btns_demand()
    transport.tunnel_mode = Setting.DISABLE
    with a.socket() as s, pytest.raises(OSError) as e:
        btns_vici.set_socket_ptoken(s, transport, a.backend)
    assert e.value.errno == errno.EOPNOTSUPP
    no_privacy = btns_demand()
    no_privacy.privacy_protected = Setting.DISABLE
    with a.socket() as s, pytest.raises(OSError) as e:
        btns_vici.set_socket_ptoken(s, no_privacy, a.backend)
    assert e.value.errno == errno.EOPNOTSUPP
    # A socket already connected: a policy can no longer apply.
    with tb.in_netns(tb.b):
        srv = socket.socket()
    with srv:
        srv.bind((str(tb.b.v4_plain), 25007))  # no SA covers it (and the inbound filter lets it in)
        srv.listen(1)
        with a.socket() as s:
            s.connect((str(tb.b.v4_plain), 25007))
            with pytest.raises(OSError) as e:
                btns_vici.set_socket_ptoken(s, btns_demand(), a.backend)
            assert e.value.errno == errno.EISCONN


def test_latch_breaks_when_the_peer_key_is_swapped(tb, sides, tmp_path):
    """The SA under a latched connection is replaced by one whose peer proves another key."""
    import ipaddress

    from btns_vici.core.selectors import Flow
    from btns_vici.latch import Latch

    a, b = sides
    b2 = Side(tb, tb.b, tmp_path, tag="2")  # B again, with a new host key
    b2.trust(a)
    a.trust(b2, "peer-new")  # A's BTNS peer-key directory accepts both of B's keys
    srv, got = serve(b, btns_demand(), 25008)
    cli = a.socket()
    btns_vici.set_socket_ptoken(cli, btns_demand(), a.backend)
    connect(cli, (str(b.peer.v4), 25008), a.backend, latch_=False)
    conn, _ = wait_accept(got)
    broken: list[LatchBroken] = []
    lt = Latch(cli, a.backend, on_break=broken.append)  # checked by hand below, not by events
    assert lt.latched.itoken.pub_key_id == b.host.public_der
    # B swaps its key: the old responder connection goes, a new one with the new key comes.
    _cleanup(tb)
    b2.backend.serve(ipaddress.ip_address(str(b.peer.v4)), btns_demand())
    a.backend.establish(Flow(6, a.peer.v4, 0, b.peer.v4, 25008), btns_demand())
    assert btns_vici.ptoken_for_flow(lt.flow, a.backend).itoken.pub_key_id == b2.host.public_der
    with pytest.raises(ProtectionLostError):
        lt.check()
    assert broken and any("pubKeyID differs" in r for r in broken[0].reasons), broken
    unlatch(conn)
    for s in (cli, conn, srv):
        s.close()
