"""The ACQUIRE responder's fail-closed paths on this host's kernel (issue 16, item 1; root).

This kernel has XFRM but no ESP, so no SA can ever be installed here: what can be shown on the
host is everything around the negotiation. Two network namespaces joined by a veth pair, a real
charon (kernel-netlink) in A and one in B that has no connection for A (it refuses the IKE_SA):

* set_socket_ptoken arms the trap (the socket's mark, an SPD out policy on exactly that mark,
  a socket in policy), and a plain connect(2) makes the kernel ACQUIRE: the responder has
  charon try, the negotiation fails, the socket is destroyed: connect fails ECONNABORTED and
  no TCP segment reaches B (AF_PACKET capture on B's veth);
* a socket armed long before it connects keeps its trap (sock_diag does not list an unconnected
  socket; the responder looks for its descriptor instead);
* a marked socket whose trap is gone (its responder killed, say) hits the backstop: still no
  segment in clear;
* closing the socket removes its trap; stopping the responder removes the backstop and restores
  ``net.core.xfrm_larval_drop``.

The success path (an SA, ESP on the wire) is in tests/vm/test_acquire_xfrm_vm.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import btns_vici
from btns_vici import AuthMethod, IToken, PToken, Setting, acquire, xfrm
from btns_vici.hostkey import load_or_create
from btns_vici.plugins import get_backend

from ..vm.charon import PLUGINS, charon
from ..vm.netpair import B, sniffer, two_hosts
from .xfrm_support import ip, socket_in

pytestmark = pytest.mark.testbed  # root; without it the fixtures error (never a skip)

TCP = 6


def demand() -> PToken:
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.tunnel_mode = Setting.DISABLE
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t
    return p


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("acquire-host")
    with (
        two_hosts() as (na, nb),
        charon(na, work / "a", PLUGINS + " pkcs8") as ca,
        charon(nb, work / "b", PLUGINS) as cb,
    ):
        kb = load_or_create(work / "b-keys")
        (work / "a-peers").mkdir()
        (work / "a-peers" / "b.pem").write_bytes(kb.public_pem)
        options = {
            "vici_socket": str(ca.vici_path),
            "netns": na,
            "key_dir": str(work / "a-keys"),
            "peer_keys": str(work / "a-peers"),
        }
        yield {"a": na, "b": nb, "backend": get_backend("strongswan", options), "charon_b": cb}
        acquire.stop_all()


def _larval(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "cat", acquire.LARVAL_DROP], capture_output=True, text=True, check=True
    ).stdout.strip()


def _ours(ns: str) -> list[xfrm.XfrmPolicy]:
    return [p for p in xfrm.dump_policies(ns) if p.mark is not None and p.mark.value & acquire.MARK_BIT]


def _server(ns: str) -> socket.socket:
    srv = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((str(B), 0))
    srv.listen()
    srv.settimeout(0.5)
    return srv


def test_plain_connect_fails_closed_after_a_failed_negotiation(lab: dict) -> None:
    before = _larval(lab["a"])
    srv = _server(lab["b"])
    cli = socket_in(lab["a"], socket.AF_INET, socket.SOCK_STREAM)
    cli.settimeout(20)
    try:
        btns_vici.set_socket_ptoken(cli, demand(), lab["backend"])
        entry = acquire.trapped(cli)
        assert entry is not None
        mark = cli.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0xFFFFFFFF
        assert mark == entry.mark == acquire.mark_for(acquire.cookie_of(cli))
        traps = [p for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF]
        assert [(p.direction, p.priority, p.mark.value) for p in traps] == [("out", 0, mark)]
        assert [(t.proto, t.reqid, t.optional) for t in traps[0].templates] == [(xfrm.IPPROTO_ESP, 0x62746E73, False)]
        assert _larval(lab["a"]) == "0"
        time.sleep(1.5)  # armed long before connecting: the trap must still be there
        assert [p.mark.value for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF] == [mark]
        with sniffer(lab["b"]) as frames:
            t0 = time.monotonic()
            with pytest.raises(OSError) as exc:
                cli.connect((str(B), srv.getsockname()[1]))  # plain: the kernel ACQUIREs
            took = time.monotonic() - t0
        assert exc.value.errno == errno.ECONNABORTED, exc.value
        assert took < 15
        assert not any(len(f) > 20 and f[9] == TCP for f in frames), "a TCP segment reached B"
        with pytest.raises(TimeoutError):
            srv.accept()
        assert str(B) in entry.failed  # why the negotiation failed, as the responder saw it
    finally:
        cli.close()
        srv.close()
    deadline = time.monotonic() + 3
    while [p for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF], "the trap outlived its socket"
    acquire.stop_all()
    assert _ours(lab["a"]) == []  # the backstop too
    assert _larval(lab["a"]) == before


def test_backstop_holds_a_marked_socket_whose_trap_is_gone(lab: dict) -> None:
    srv = _server(lab["b"])
    cli = socket_in(lab["a"], socket.AF_INET, socket.SOCK_STREAM)
    cli.settimeout(3)
    try:
        btns_vici.set_socket_ptoken(cli, demand(), lab["backend"])
        mark = acquire.trapped(cli).mark
        # The trap vanishes behind the responder's back (as when its process was killed).
        ip(
            "xfrm",
            "policy",
            "delete",
            "dir",
            "out",
            "src",
            "0.0.0.0/0",
            "dst",
            "0.0.0.0/0",
            "mark",
            hex(mark),
            "mask",
            "0xffffffff",
            netns=lab["a"],
        )
        with sniffer(lab["b"]) as frames:
            with pytest.raises(OSError) as exc:
                cli.connect((str(B), srv.getsockname()[1]))
        assert exc.value.errno in (errno.EPERM, errno.ETIMEDOUT, errno.ECONNABORTED), exc.value
        assert not any(len(f) > 20 and f[9] == TCP for f in frames), "a TCP segment reached B in clear"
    finally:
        cli.close()
        srv.close()
        acquire.stop_all()


def test_c_program_plain_connect_fails_closed(lab: dict, tmp_path) -> None:
    """The C program (ipsec_set_socket_pToken, then connect(2)) against B, which refuses: the
    connect fails ECONNABORTED, nothing reaches B, and at exit(3) the program's responder
    removed its traps and the backstop and restored the sysctl."""
    from ..vm.test_acquire_xfrm_vm import compile_plain_connect

    exe = compile_plain_connect(tmp_path)
    acquire.stop_all()
    before = _larval(lab["a"])
    srv = _server(lab["b"])
    opts = lab["backend"].options
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "BTNS_BACKEND": "strongswan",
        "BTNS_VICI_SOCKET": opts["vici_socket"],
        "BTNS_KEY_DIR": opts["key_dir"],
        "BTNS_PEER_KEYS": opts["peer_keys"],
        **{k: os.environ[k] for k in ("BTNS_CACHE_DIR", "BTNS_STATE_DIR") if k in os.environ},
    }
    try:
        with sniffer(lab["b"]) as frames:
            proc = subprocess.run(
                ["ip", "netns", "exec", lab["a"], str(exe), str(B), str(srv.getsockname()[1])],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert proc.returncode == 1 and "connect errno 103 ECONNABORTED" in proc.stdout, (proc.stdout, proc.stderr)
        assert not any(len(f) > 20 and f[9] == TCP for f in frames), "a TCP segment reached B"
        with pytest.raises(TimeoutError):
            srv.accept()
    finally:
        srv.close()
    assert _ours(lab["a"]) == []
    assert _larval(lab["a"]) == before


UNPRIV_CONNECT = """
import errno, json, os, socket
import btns_vici
from btns_vici import AuthMethod, IToken, PToken, Setting
p = PToken()
p.privacy_protected = Setting.LEVEL_MEDIUM
p.tunnel_mode = Setting.DISABLE
t = IToken()
t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
p.itoken = t
s = socket.socket()
s.settimeout(20)
btns_vici.set_socket_ptoken(s, p)  # through btnsd: this process has no privilege at all
mark = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0xFFFFFFFF
try:
    s.connect((os.environ["PEER"], int(os.environ["PORT"])))  # the plain system call
    print(json.dumps({"connected": True, "mark": mark}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "mark": mark}))
"""


@pytest.mark.parametrize("peers", ["0.0.0.0/0", "192.0.2.0/24"], ids=["allowed", "peer-not-allowed"])
def test_btnsd_answers_the_acquire_of_an_unprivileged_plain_connect(lab: dict, peers: str) -> None:
    """An unprivileged program (nobody, BTNS_BROKER): set_socket_pToken through btnsd, then a
    plain connect. btnsd armed the trap for the client's socket and answers its ACQUIRE; B
    refuses, so the connect fails ECONNABORTED and nothing reaches B. With a policy that does not
    let the client negotiate with B's network, btnsd does not even try (no IKE packet to B). When
    the client is gone its trap goes; when btnsd stops, the backstop goes and the sysctl is restored."""
    import sys
    import textwrap

    from .test_broker import _unpriv_venv, shared_dir

    acquire.stop_all()
    before = _larval(lab["a"])
    opts = lab["backend"].options
    srv = _server(lab["b"])
    with shared_dir("btns-acq-brk-") as work:
        conf = work / "btnsd.toml"
        conf.write_text(
            textwrap.dedent(f"""
            [broker]
            idle_timeout = 30
            [[backend]]
            name = "strongswan"
            vici_socket = "{opts["vici_socket"]}"
            netns = "{lab["a"]}"
            key_dir = "{opts["key_dir"]}"
            peer_keys = "{opts["peer_keys"]}"
            [[allow]]
            users = ["*"]
            methods = ["BTNS"]
            peers = ["{peers}"]
            """)
        )
        path, log = str(work / "btnsd.sock"), work / "btnsd.log"
        python = _unpriv_venv(work)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "btns_vici.broker", "--socket", path, "--config", str(conf), "-v"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 20
            while not Path(path).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            env = [f"PEER={B}", f"PORT={srv.getsockname()[1]}", f"BTNS_BROKER={path}"]
            cmd = ["ip", "netns", "exec", lab["a"], "runuser", "-u", "nobody", "--", "env", *env, python, "-c"]
            with sniffer(lab["b"]) as frames:
                res = subprocess.run([*cmd, UNPRIV_CONNECT], capture_output=True, text=True, timeout=60)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            assert lines, (res.stdout, res.stderr, log.read_text())

            result = json.loads(lines[-1])
            assert result["errno"] == errno.ECONNABORTED, (result, log.read_text()[-3000:])
            assert result["mark"] & acquire.MARK_BIT  # btnsd marked the client's socket
            assert not any(len(f) > 20 and f[9] == TCP for f in frames), "a TCP segment reached B"
            assert "negotiation failed" in log.read_text()
            ike = [f for f in frames if len(f) > 28 and f[9] == 17 and f[22:24] in (b"\x01\xf4", b"\x11\x94")]
            if peers == "0.0.0.0/0":
                assert ike, "btnsd did not negotiate"
            else:
                assert not ike, "btnsd negotiated with a peer its policy does not allow"
            deadline = time.monotonic() + 5
            while [p for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not [p for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF], "the client's trap outlived it"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            srv.close()
    assert _ours(lab["a"]) == []  # btnsd stopped: the backstop is gone
    assert _larval(lab["a"]) == before


def test_udp_datagrams_of_a_trapped_socket_never_leave_in_clear(lab: dict) -> None:
    """UDP: sendto() of a trapped socket is ACQUIREd like a TCP connect; B refuses the
    negotiation; no datagram for the destination port reaches B (it waits on the trap, then is
    dropped), while IKE does."""
    acquire.stop_all()
    sink = socket_in(lab["b"], socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((str(B), 0))
    sink.settimeout(0.5)
    port = sink.getsockname()[1]
    s = socket_in(lab["a"], socket.AF_INET, socket.SOCK_DGRAM)
    try:
        btns_vici.set_socket_ptoken(s, demand(), lab["backend"])
        entry = acquire.trapped(s)
        assert entry is not None and entry.proto == socket.IPPROTO_UDP
        with sniffer(lab["b"]) as frames:
            for _ in range(3):
                s.sendto(b"udp-trap-marker", (str(B), port))
            deadline = time.monotonic() + 15
            while str(B) not in entry.failed and time.monotonic() < deadline:
                time.sleep(0.05)
            s.sendto(b"udp-trap-marker", (str(B), port))  # after the failure: still not in clear
            time.sleep(0.3)
        assert str(B) in entry.failed, "the responder did not try"
        udp = [f for f in frames if len(f) > 28 and f[9] == 17]
        assert udp, "no IKE at all"
        assert not [f for f in udp if int.from_bytes(f[22:24], "big") == port], "a datagram reached B in clear"
        assert not any(b"udp-trap-marker" in f for f in frames)
        with pytest.raises(TimeoutError):
            sink.recv(100)
    finally:
        s.close()
        sink.close()
        acquire.stop_all()


def test_a_socket_with_its_own_mark_is_refused_before_anything_is_armed(lab: dict) -> None:
    s = socket_in(lab["a"], socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x42)
        before = [p for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF]
        with pytest.raises(OSError) as exc:
            btns_vici.set_socket_ptoken(s, demand(), lab["backend"])
        assert exc.value.errno == errno.EBUSY
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x42  # untouched
        assert [p for p in _ours(lab["a"]) if p.mark.mask == 0xFFFFFFFF] == before
    finally:
        s.close()
