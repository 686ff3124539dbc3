"""Demands that hold for every program (issue 16), on the host testbed (kernel-libipsec):

* a broken latch destroys the socket in the kernel (SOCK_DESTROY): the process holding it, a C
  program that knows nothing about IPsec, gets ECONNABORTED; the Python caller its callback;
* the draft's settings: all-ANY is no demand; ``btns:use`` (IPsec if the peer can, else clear),
  reported truthfully; ESP-NULL refused on kernel-libipsec; ``policyName`` selects the operator's
  connection; ``remote_iToken`` selects which of our keys authenticates us;
* the channel binding is equal at both ends and differs for another pair of end-points.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import btns_vici
from btns_lab.testbed import connected_pair
from btns_vici import AuthMethod, PToken, Setting
from btns_vici.api import connect
from btns_vici.core.errors import NotSupportedError, ProtectionLostError
from btns_vici.core.requirements import USE_POLICY
from btns_vici.guard import bound_device
from btns_vici.latch import LatchBroken, latch, latched, unlatch

from .test_enforce import Side, _cleanup, btns_demand, serve, wait_accept

pytestmark = pytest.mark.testbed

VICTIM = Path(__file__).resolve().parents[1] / "cabi" / "c" / "latch_victim.c"


@pytest.fixture
def sides(tb, tmp_path: Path):
    a, b = Side(tb, tb.a, tmp_path), Side(tb, tb.b, tmp_path)
    a.trust(b)
    b.trust(a)
    yield a, b
    _cleanup(tb)


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None:
        pytest.fail("needs cc (Debian: gcc)")
    exe = tmp_path_factory.mktemp("btns-demands") / "latch_victim"
    subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", str(VICTIM), "-o", str(exe)], check=True)
    return exe


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


# ---- latches the kernel enforces ----------------------------------------------------------------


def test_broken_latch_destroys_the_socket_for_a_c_program(tb, backend_a, victim) -> None:
    tb.up("btns-kill", "rawkey")
    cli, conn = connected_pair(tb, socket.IPPROTO_TCP, 4)
    broken: list[LatchBroken] = []
    try:
        lt = latch(cli, backend_a, on_break=broken.append, shutdown=True)
        cli.settimeout(None)  # the C program blocks in recv (a Python timeout makes the file O_NONBLOCK)
        # The connection now belongs to a plain C program as well (inherited descriptor).
        proc = subprocess.Popen(
            [str(victim), str(cli.fileno())], pass_fds=(cli.fileno(),), stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        conn.sendall(b"hello")
        assert proc.stdout.readline().strip() == "data 5"
        t0 = time.monotonic()
        tb.terminate("btns-kill")
        out, _ = proc.communicate(timeout=10)
        took = time.monotonic() - t0
        assert proc.returncode == 0, out
        assert "recv errno 103 ECONNABORTED" in out, out
        assert _wait(lambda: broken) and broken[0].flow == lt.flow  # the Python caller still gets its callback
        assert lt.how_stopped == "destroyed"
        with pytest.raises(OSError) as exc:  # the in-process socket is destroyed too
            cli.send(b"x")
        assert exc.value.errno in (errno.ECONNABORTED, errno.EPIPE, errno.ENOTCONN)
        with pytest.raises(ProtectionLostError):
            btns_vici.get_socket_ptoken(cli, backend_a)
        print(f"terminate -> C program's recv failed ECONNABORTED in {took * 1000:.1f} ms")
    finally:
        unlatch(cli)
        cli.close()
        conn.close()


def test_broken_latch_aborts_a_blocked_python_recv(tb, backend_a) -> None:
    import threading

    tb.up("btns-kill2", "rawkey")
    cli, conn = connected_pair(tb, socket.IPPROTO_TCP, 4)
    got: list = []
    try:
        latch(cli, backend_a, shutdown=True)

        def reader() -> None:
            try:
                got.append(cli.recv(10))
            except OSError as exc:
                got.append(exc)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        time.sleep(0.1)
        tb.terminate("btns-kill2")
        t.join(10)
        assert got and isinstance(got[0], ConnectionAbortedError), got
    finally:
        unlatch(cli)
        cli.close()
        conn.close()


# ---- the draft's settings ------------------------------------------------------------------------


def test_all_any_is_no_demand(tb, sides) -> None:
    a, _b = sides
    with tb.in_netns(tb.b):
        srv = socket.socket()
    srv.bind((str(tb.b.v4_plain), 0))
    srv.listen()
    s = a.socket()
    before = {n for c in tb.a.ctl.list_conns() for n in c}
    try:
        btns_vici.set_socket_ptoken(s, PToken(), a.backend)  # every attribute ANY
        assert bound_device(s) == ""  # no guard: the system default decides
        connect(s, (str(tb.b.v4_plain), srv.getsockname()[1]), a.backend)
        conn, _ = srv.accept()
        conn.close()
        tok = btns_vici.get_socket_ptoken(s, a.backend)
        assert not tok.protected  # reported truthfully: nothing covers the plain addresses
        assert latched(s) is None
        assert {n for c in tb.a.ctl.list_conns() for n in c} == before  # nothing loaded
    finally:
        s.close()
        srv.close()


def use_demand() -> PToken:
    p = btns_demand()
    p.policy_name = USE_POLICY
    return p


def test_use_gets_ipsec_when_the_peer_can(tb, sides) -> None:
    a, b = sides
    srv, got = serve(b, btns_demand(), 28411)
    s = a.socket()
    try:
        btns_vici.set_socket_ptoken(s, use_demand(), a.backend)
        assert bound_device(s) == ""  # opportunistic: no guard on kernel-libipsec
        connect(s, (str(tb.b.v4), 28411), a.backend)
        conn, _ = wait_accept(got)
        tok = btns_vici.get_socket_ptoken(s, a.backend)
        assert tok.protected, tok.information_string
        assert tok.itoken.pub_key_id == b.host.public_der
        assert latched(s) is not None  # a protected "use" connection is latched
        conn.close()
    finally:
        unlatch(s)
        s.close()
        srv.close()


def test_use_falls_back_to_clear_and_says_so(tb, sides, tmp_path) -> None:
    a, _b = sides
    # A peer whose charon does not know our key: no SA is possible, "use" goes out in clear.
    stranger = Side(tb, tb.a, tmp_path, "-stranger")
    (stranger.peer_dir / "nobody.pem").write_bytes(a.host.public_pem)  # a key the peer does not hold
    with tb.in_netns(tb.b):
        srv = socket.socket()
    srv.bind((str(tb.b.v4_plain), 0))
    srv.listen()
    s = stranger.socket()
    try:
        btns_vici.set_socket_ptoken(s, use_demand(), stranger.backend)
        connect(s, (str(tb.b.v4_plain), srv.getsockname()[1]), stranger.backend)
        conn, _ = srv.accept()
        s.sendall(b"clear")
        assert conn.recv(5) == b"clear"
        conn.close()
        tok = btns_vici.get_socket_ptoken(s, stranger.backend)
        assert not tok.protected and "NOT protected" in tok.information_string
        assert latched(s) is None
    finally:
        s.close()
        srv.close()


def test_esp_null_is_eopnotsupp_on_kernel_libipsec(tb, sides) -> None:
    a, _ = sides
    p = PToken()
    p.privacy_protected = Setting.DISABLE
    p.integrity_protected = Setting.LEVEL_MEDIUM
    s = a.socket()
    try:
        with pytest.raises(NotSupportedError) as exc:
            btns_vici.set_socket_ptoken(s, p, a.backend)
        assert exc.value.errno == errno.EOPNOTSUPP and "ESP-NULL" in str(exc.value)
    finally:
        s.close()


def test_policy_name_selects_the_operator_connection(tb, sides) -> None:
    a, _b = sides
    tb.load_conn("btns-op16", "psk")  # loaded, not initiated: the demand brings it up
    with tb.in_netns(tb.b):
        srv = socket.socket()
    srv.bind((str(tb.b.v4), 0))
    srv.listen()
    s = a.socket()
    try:
        p = PToken()
        p.policy_name = "btns-op16/host"
        p.privacy_protected = Setting.ENABLE
        btns_vici.set_socket_ptoken(s, p, a.backend)
        connect(s, (str(tb.b.v4), srv.getsockname()[1]), a.backend)
        conn, _ = srv.accept()
        conn.close()
        tok = btns_vici.get_socket_ptoken(s, a.backend)
        assert tok.protected and tok.policy_name == "btns-op16/host"
        assert tok.itoken.authentication_method is AuthMethod.PRESHAREDKEY
        assert [n for c in tb.a.ctl.list_conns() for n in c if n.startswith("btns-init")] == []

        missing = PToken()
        missing.policy_name = "btns-no-such-conn"
        with a.socket() as s2:
            btns_vici.set_socket_ptoken(s2, missing, a.backend)
            with pytest.raises(OSError) as exc:
                connect(s2, (str(tb.b.v4), srv.getsockname()[1]), a.backend)
            assert exc.value.errno == errno.EHOSTUNREACH
    finally:
        unlatch(s)
        s.close()
        srv.close()


def test_remote_itoken_selects_our_key(tb, sides) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    a, b = sides
    alt = ed25519.Ed25519PrivateKey.generate()
    pem = alt.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = a.key_dir / "alt.key"
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    alt_der = alt.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    alt_pub = alt.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (b.peer_dir / "peer.pem").write_bytes(alt_pub)  # B knows A only by its alternative key
    srv, got = serve(b, btns_demand(), 28412)
    s = a.socket()
    try:
        from btns_vici.core.derive import itoken_for
        from btns_vici.core.records import Identity

        p = btns_demand()
        p.remote_itoken = itoken_for(Identity("%any", AuthMethod.BTNS, public_key=alt_der))
        btns_vici.set_socket_ptoken(s, p, a.backend)
        connect(s, (str(tb.b.v4), 28412), a.backend)
        conn, _ = wait_accept(got)
        pa = btns_vici.get_socket_ptoken(s, a.backend)
        pb = btns_vici.get_socket_ptoken(conn, b.backend)
        assert pa.remote_itoken.pub_key_id == alt_der and pb.itoken.pub_key_id == alt_der
        conn.close()

        nobody = btns_demand()
        nobody.remote_itoken = itoken_for(Identity("%any", AuthMethod.BTNS, public_key=b.host.public_der))
        with a.socket() as s2:
            btns_vici.set_socket_ptoken(s2, nobody, a.backend)
            with pytest.raises(OSError) as exc:
                connect(s2, (str(tb.b.v4), 28412), a.backend)
            assert exc.value.errno == errno.ENOKEY
    finally:
        unlatch(s)
        s.close()
        srv.close()


# ---- channel bindings ----------------------------------------------------------------------------


def test_channel_binding_is_equal_at_both_ends_and_differs_for_other_endpoints(tb, sides, tmp_path) -> None:
    a, b = sides
    srv, got = serve(b, btns_demand(), 28413)
    s = a.socket()
    try:
        btns_vici.set_socket_ptoken(s, btns_demand(), a.backend)
        connect(s, (str(tb.b.v4), 28413), a.backend)
        conn, _ = wait_accept(got)
        pa = btns_vici.get_socket_ptoken(s, a.backend)
        pb = btns_vici.get_socket_ptoken(conn, b.backend)
        cb = pa.itoken.channel_binding
        assert cb and cb.startswith("btns-cb-v2:endpoints-sha256:")
        assert cb == pb.itoken.channel_binding == pa.remote_itoken.channel_binding == pb.remote_itoken.channel_binding
        # the one-sided peer-key values differ per end and stay available
        assert "peer-key-binding btns-cb-v1:spki-sha256:" in pa.itoken.audit_string
        conn.close()
        first = cb
    finally:
        unlatch(s)
        s.close()
        srv.close()
    _cleanup(tb)
    # Another end-point pair (A with a new key): another binding.
    c = Side(tb, tb.a, tmp_path, "-c")
    c.trust(b)
    b.trust(c, "c")
    srv, got = serve(b, btns_demand(), 28414)
    s = c.socket()
    try:
        btns_vici.set_socket_ptoken(s, btns_demand(), c.backend)
        connect(s, (str(tb.b.v4), 28414), c.backend)
        conn, _ = wait_accept(got)
        pc = btns_vici.get_socket_ptoken(s, c.backend)
        pb2 = btns_vici.get_socket_ptoken(conn, b.backend)
        assert pc.itoken.channel_binding == pb2.itoken.channel_binding != first
        conn.close()
    finally:
        unlatch(s)
        s.close()
        srv.close()


# ---- a plain connect(2) on kernel-libipsec (issue 16 item 1: what this data plane allows) -------


def test_plain_connect_without_sa_fails_closed_on_kernel_libipsec(tb, sides) -> None:
    """kernel-libipsec raises no ACQUIRE the library can see: a plain connect after
    set_socket_ptoken, with no SA for the flow, is never sent (the SYN dies in ipsec0's
    userspace ESP) and times out; with the SA up (negotiated first), the same plain connect works."""
    from .wire import capture

    a, b = sides
    srv, got = serve(b, btns_demand(), 28417)
    s = a.socket()
    s.settimeout(3)
    try:
        btns_vici.set_socket_ptoken(s, btns_demand(), a.backend)
        assert bound_device(s) == "ipsec0"
        with capture(tb.b.netns, tb.b.link) as frames:
            with pytest.raises(OSError) as exc:
                s.connect((str(tb.b.v4), 28417))  # plain: nothing answers for it on this data plane
        assert isinstance(exc.value, TimeoutError) or exc.value.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH)
        port = (28417).to_bytes(2, "big")  # this test's flow only: other tests' connections may still close
        tcp_in_clear = [
            f
            for f in frames
            if len(f) > 38 and f[12:14] == b"\x08\x00" and f[23] == socket.IPPROTO_TCP and port in (f[34:36], f[36:38])
        ]
        assert tcp_in_clear == [], "a TCP segment reached B in clear"
        assert not got
        # The SA negotiated beforehand: the same plain connect of a guarded socket goes through.
        from btns_vici.core.selectors import Flow

        a.backend.establish(Flow(socket.IPPROTO_TCP, tb.a.v4, 0, tb.b.v4, 28417), btns_demand())
        s2 = a.socket()
        with s2:
            btns_vici.set_socket_ptoken(s2, btns_demand(), a.backend)
            s2.connect((str(tb.b.v4), 28417))
            conn, _ = wait_accept(got)
            conn.close()
            assert btns_vici.get_socket_ptoken(s2, a.backend).protected
    finally:
        s.close()
        srv.close()
