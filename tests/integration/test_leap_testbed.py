"""Leap of faith on the host testbed (issue 17): zero-configuration BTNS, then the same key held.

Each side has a fresh host key and NO configured peer key; both run the learner (udp/5386 in
their namespace). A third namespace answering for B's address plays the man in the middle.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import btns_vici
from btns_lab.testbed import Peer, Testbed
from btns_vici import AuthMethod, IToken, PToken, Setting
from btns_vici import leap as leap_mod
from btns_vici.api import connect
from btns_vici.hostkey import load_or_create
from btns_vici.knownpeers import KnownPeers
from btns_vici.latch import unlatch
from btns_vici.leap.responder import Limits, Responder
from btns_vici.plugins import get_backend

from .acceptor import serve_with, wait_accept
from .wire import capture, seen, udp_v6

pytestmark = pytest.mark.testbed
PORT = 5386
#: The flood's rate: 1,000 times the per-source HELLO limit, below what one Python learner drains on
#: a loaded 2-core machine (~90,000/s; beyond that the kernel drops at the socket queue, README).
FLOOD_PPS = 20000


def demand(*methods: AuthMethod) -> PToken:
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.integrity_protected = Setting.ENABLE
    t = IToken()
    for m in methods:
        t.set_auth_method(m, Setting.ENABLE)
    p.itoken = t
    return p


BTNS = (AuthMethod.BTNS, AuthMethod.LEAPOFFAITH)  # "asks BTNS": any raw key, known or not
LOF = (AuthMethod.LEAPOFFAITH,)  # "requires leap of faith": only the stored key


class LeapSide:
    def __init__(self, tb: Testbed, peer: Peer, root: Path, tag: str = "") -> None:
        self.tb, self.peer = tb, peer
        self.key_dir = root / f"{peer.name}{tag}-keys"
        self.host = load_or_create(self.key_dir)
        self.options = {**peer.options, "key_dir": str(self.key_dir), "leap_of_faith": "yes"}
        self.backend = get_backend("strongswan", self.options)
        self.store = KnownPeers(self.key_dir)
        self.responder: Responder | None = None
        self.last_local = ""  # the address our last connection came from

    def learner(self, limits: Limits | None = None) -> Responder:
        self.responder = Responder(self.options, port=PORT, limits=limits).start()
        return self.responder

    def socket(self, family: int = 4) -> socket.socket:
        with self.tb.in_netns(self.peer):
            s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(10)
        return s

    def addr(self, family: int = 4) -> str:
        return str(self.peer.v4 if family == 4 else self.peer.v6)

    def close(self) -> None:
        if self.responder is not None:
            self.responder.stop()
            self.responder = None


def _cleanup(*peers: Peer) -> None:
    leap_mod.forget_recent()  # the next connection is a new contact: it runs the exchange again
    for p in peers:
        if p.proc is None or p.proc.poll() is not None:
            continue
        for conn in list(p.ctl.list_conns()):
            for name in conn:
                if not name.startswith("btns-"):
                    continue
                with contextlib.suppress(Exception):
                    for _ in p.ctl.terminate({"ike": name, "timeout": "3000", "force": "yes"}):
                        pass
                with contextlib.suppress(Exception):
                    p.ctl.unload_conn({"name": name})


@pytest.fixture
def leap(tb: Testbed, tmp_path: Path):
    tb.allow_leap(PORT)  # the testbed's inbound filter lets udp/5386 in, as IKE's 500/4500
    a, b = LeapSide(tb, tb.a, tmp_path), LeapSide(tb, tb.b, tmp_path)
    a.learner()
    b.learner()
    made = [a, b]
    yield a, b, made
    for s in made:
        s.close()
    _cleanup(tb.a, tb.b)
    tb.allow_leap(None)


def serve(b: LeapSide, want: PToken, port: int, peer: Peer | None = None, family: int = 4):
    srv = b.socket(family) if peer is None else _socket_in(b.tb, peer)
    return srv, serve_with(srv, want, b.backend, ("0.0.0.0" if family == 4 else "::", port))


def _socket_in(tb: Testbed, p: Peer) -> socket.socket:
    with tb.in_netns(p):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    return s


def contact(
    a: LeapSide, b: LeapSide, want_a: PToken, want_b: PToken, port: int, family: int = 4, payload: bytes = b"ping"
):
    """One connection A -> B; returns (A's pToken, B's pToken) and tears the SAs down."""
    srv, got = serve(b, want_b, port, family=family)
    cli = a.socket(family)
    try:
        btns_vici.set_socket_ptoken(cli, want_a, a.backend)
        connect(cli, (b.addr(family), port), a.backend)
        a.last_local = cli.getsockname()[0]
        conn, _ = wait_accept(got)
        with conn:
            cli.sendall(payload)
            assert conn.recv(len(payload), socket.MSG_WAITALL) == payload
            pa = btns_vici.get_socket_ptoken(cli, a.backend)
            pb = btns_vici.get_socket_ptoken(conn, b.backend)
            unlatch(cli)
            unlatch(conn)
        return pa, pb
    finally:
        cli.close()
        srv.close()
        _cleanup(a.peer, b.peer)


def test_first_contact_btns_then_leap_of_faith(tb, leap):
    a, b, _ = leap
    assert not any(b.key_dir.glob("*.pem")) and a.store.get(b.peer.v4) is None
    pa, pb = contact(a, b, demand(*BTNS), demand(*BTNS), 26001)
    assert pa.protected and pb.protected
    assert pa.itoken.pub_key_id == b.host.public_der and pb.itoken.pub_key_id == a.host.public_der
    assert pa.itoken.authentication_method is AuthMethod.BTNS, pa.information_string
    assert pb.itoken.authentication_method is AuthMethod.BTNS, pb.information_string
    ea, eb = a.store.get(b.peer.v4), b.store.get(a.peer.v4)
    assert ea.spki == b.host.public_der and ea.how == "leap-initiator"
    assert eb.spki == a.host.public_der and eb.how == "leap-responder"
    # Second contact: the same keys, held to what was stored: LEAPOFFAITH on both ends, and a
    # demand that requires leap of faith is met.
    pa, pb = contact(a, b, demand(*LOF), demand(*LOF), 26002)
    assert pa.itoken.authentication_method is AuthMethod.LEAPOFFAITH, pa.information_string
    assert pb.itoken.authentication_method is AuthMethod.LEAPOFFAITH, pb.information_string
    assert "leap of faith" in pa.information_string


def test_ipv6_first_contact_then_leap_of_faith_on_the_wire(tb, leap):
    """IPv6 end to end: the exchange over udp/5386 on v6, IKE and ESP-in-UDP over v6, nothing in clear."""
    a, b, _ = leap
    marker = b"btns-leap-v6-" + os.urandom(8).hex().encode()
    with capture(tb.b.netns, tb.b.link) as frames:
        pa, pb = contact(a, b, demand(*BTNS), demand(*BTNS), 26041, family=6, payload=marker)
    assert pa.protected and pb.protected
    assert pa.itoken.authentication_method is AuthMethod.BTNS and pa.itoken.pub_key_id == b.host.public_der
    assert pb.itoken.authentication_method is AuthMethod.BTNS and pb.itoken.pub_key_id == a.host.public_der
    assert a.store.get(b.peer.v6).how == "leap-initiator"
    # B learned A's key for the address A's connection (and so its IKE_SA) came from: the kernel's
    # choice among A's two IPv6 addresses, the exchange sent from the same one.
    assert a.last_local in (str(a.peer.v6), str(a.peer.v6_plain))
    assert [(e.address, e.how) for e in b.store.entries()] == [(a.last_local, "leap-responder")]
    assert a.store.get(b.peer.v4) is None, "learned per address: the v4 address is still unknown"
    assert udp_v6(frames, PORT) >= 4, "the key exchange went over IPv6 (HELLO, COOKIE, KEYREQ, KEY)"
    assert udp_v6(frames, 4500) > 0, "ESP-in-UDP over IPv6 carried the connection"
    assert not seen(frames, marker), "the payload crossed the link in clear"
    pa, pb = contact(a, b, demand(*LOF), demand(*LOF), 26042, family=6)
    assert pa.itoken.authentication_method is AuthMethod.LEAPOFFAITH, pa.information_string
    assert pb.itoken.authentication_method is AuthMethod.LEAPOFFAITH, pb.information_string


def test_without_learner_no_key(tb, leap):
    a, b, _ = leap
    b.close()
    cli = a.socket()
    with cli:
        btns_vici.set_socket_ptoken(cli, demand(*BTNS), a.backend)
        with pytest.raises(OSError) as info:
            connect(cli, (str(b.peer.v4), 26003), a.backend)
        assert info.value.errno == errno.ENOKEY


def test_swapped_key_refused_for_lof_reported_for_btns(tb, leap, tmp_path, caplog):
    a, b, made = leap
    contact(a, b, demand(*BTNS), demand(*BTNS), 26011)
    old = b.host.public_der
    b.close()
    b2 = LeapSide(tb, tb.b, tmp_path, tag="-swapped")  # B reinstalled: a new host key
    made.append(b2)
    b2.learner()
    caplog.set_level(logging.INFO, logger="btns_vici")
    # Requires leap of faith: refused, before any IKE, as a different peer.
    cli = a.socket()
    with cli:
        btns_vici.set_socket_ptoken(cli, demand(*LOF), a.backend)
        with pytest.raises(OSError) as info:
            connect(cli, (str(b2.peer.v4), 26012), a.backend)
    assert info.value.errno == errno.EACCES and "different key" in info.value.strerror
    assert "KEY CHANGED" in caplog.text
    # Only asks BTNS: connects to the new key, reported BTNS (never LEAPOFFAITH), logged.
    caplog.clear()
    pa, _pb = contact(a, b2, demand(*BTNS), demand(*BTNS), 26013)
    assert pa.itoken.pub_key_id == b2.host.public_der
    assert pa.itoken.authentication_method is AuthMethod.BTNS
    assert "KEY CHANGED" in caplog.text
    e = a.store.get(b.peer.v4)
    assert e.spki == old, "a changed key never replaces the stored one"
    assert any(c.key for c in e.changes)


@pytest.fixture
def mitm(tb: Testbed, tmp_path: Path):
    """A third namespace holding B's address, reachable from A over its own veth (route /32)."""
    tag = tb.tag
    ns = f"btns-lm-{tag}"
    la, lm = f"btns-{tag}ma", f"btns-{tag}mm"
    wd = tmp_path / "m"
    wd.mkdir()
    m = Peer(
        name="m", netns=ns, link=lm, v4=tb.b.v4, v6=tb.b.v6, v4_plain=tb.b.v4_plain, v6_plain=tb.b.v6_plain, workdir=wd
    )
    os.system(f"ip netns add {ns}")
    try:
        os.system(f"ip link add {la} netns {tb.a.netns} type veth peer name {lm} netns {ns}")
        m.exec("ip", "link", "set", "lo", "up")
        m.exec("ip", "addr", "add", f"{tb.b.v4}/24", "dev", lm)
        m.exec("ip", "link", "set", lm, "up")
        tb.a.exec("ip", "link", "set", la, "up")
        tb.a.exec("ip", "route", "add", f"{tb.b.v4}/32", "dev", la)
        m.start_charon()
        yield m, la
    finally:
        with contextlib.suppress(Exception):
            _cleanup(m)
        m.stop_charon()
        tb.a.exec("ip", "route", "del", f"{tb.b.v4}/32", check=False)
        tb.a.exec("ip", "link", "del", la, check=False)  # sockets may still hold the namespace: delete the link
        os.system(f"ip netns del {ns}")


def test_mitm_at_first_contact_accepted_as_btns_then_caught(tb, leap, mitm, tmp_path, caplog):
    a, b, made = leap
    m_peer, _ = mitm
    m = LeapSide(tb, m_peer, tmp_path)
    made.append(m)
    m.learner()
    # First contact: the impersonator answers for B's address (the route leads to it).
    pa, _pm = contact(a, m, demand(*BTNS), demand(*BTNS), 26021)
    assert pa.itoken.authentication_method is AuthMethod.BTNS  # unauthenticated: believed
    assert pa.itoken.pub_key_id == m.host.public_der != b.host.public_der
    assert a.store.get(b.peer.v4).spki == m.host.public_der
    # The impersonator is gone: the next contact reaches the real B, whose key differs.
    tb.a.exec("ip", "route", "del", f"{tb.b.v4}/32")
    caplog.set_level(logging.INFO, logger="btns_vici")
    cli = a.socket()
    with cli:
        btns_vici.set_socket_ptoken(cli, demand(*LOF), a.backend)
        with pytest.raises(OSError) as info:
            connect(cli, (str(b.peer.v4), 26022), a.backend)
    assert info.value.errno == errno.EACCES
    assert "KEY CHANGED" in caplog.text
    pa, _pb = contact(a, b, demand(*BTNS), demand(*BTNS), 26023)
    assert pa.itoken.pub_key_id == b.host.public_der
    assert pa.itoken.authentication_method is AuthMethod.BTNS


def test_learning_port_flooded_real_connections_work(tb, leap):
    a, b, _ = leap
    b.close()
    lim = Limits(hello_rate=20, hello_burst=40, keyreq_rate=4, keyreq_burst=8)
    r = b.learner(lim)
    # The flooder's source is A's plain address: let it through B's filter too.
    rule = (
        "pref",
        "10",
        "iif",
        tb.b.link,
        "from",
        str(tb.a.v4_plain),
        "to",
        str(tb.b.v4),
        "ipproto",
        "udp",
        "dport",
        str(PORT),
        "lookup",
        "local",
    )
    tb.b.exec("ip", "rule", "add", *rule)
    flooder = Path(__file__).with_name("leap_flooder.py")
    procs = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                tb.a.netns,
                sys.executable,
                str(flooder),
                str(tb.a.v4_plain),
                str(b.peer.v4),
                str(PORT),
                "4",
                str(FLOOD_PPS),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(1)
    ]  # another process: the flood does not share our GIL
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        pa, _pb = contact(a, b, demand(*BTNS), demand(*BTNS), 26031)
        took = time.monotonic() - t0
        assert pa.protected and pa.itoken.pub_key_id == b.host.public_der
        time.sleep(0.3)
    finally:
        sent = 0
        for p in procs:
            out, _ = p.communicate(timeout=10)
            sent += int(out.strip() or 0)
        tb.b.exec("ip", "rule", "del", *rule, check=False)
    st = r.stats
    print(
        f"flood: {sent} datagrams sent, learner saw {st.received}, malformed {st.malformed}, "
        f"rate-limited {st.rate_limited}, bad cookies {st.bad_cookie}, cookies sent {st.cookies}, "
        f"bytes in {st.bytes_in} out {st.bytes_out}; connection took {took * 1000:.0f} ms"
    )
    assert st.received > 0.5 * sent  # the learner kept up: the limits, not the queue, dropped the flood
    assert st.rate_limited > 0 and st.bad_cookie > 0 and st.malformed > 0
    assert st.bytes_out < st.bytes_in / 3  # never an amplifier
    assert st.learned == 1  # only A: no state for the flood
    assert len(b.store.entries()) == 1
