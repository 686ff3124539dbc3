"""Never stale: terminate, rekey, charon restart and a daemon that is down (draft 2.3.3)."""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time

import pytest

from btns_vici.api import get_socket_ptoken
from btns_vici.backend import SAEvent
from btns_vici.core.constants import Setting
from btns_vici.core.errors import BackendError
from btns_vici.plugins import get_plugin_manager
from btns_vici.sockets import flow_of

from .conftest import AUTHS, protected_ptoken

pytestmark = pytest.mark.testbed


def _index(tb):
    return get_plugin_manager().get_plugin("strongswan").context(tb.a.options).index


@pytest.mark.parametrize("auth", AUTHS)
def test_terminate_child_then_not_protected(tb, backend_a, backend_b, pair_factory, auth):
    tb.up(f"term-{auth}", auth, 4)
    sa, sb = pair_factory(socket.IPPROTO_TCP, 4)
    protected_ptoken(tb, backend_a, sa)
    protected_ptoken(tb, backend_b, sb)
    tb.terminate(f"term-{auth}", "host")
    # The very next query, no sleep: the child-updown event must already count.
    pa = get_socket_ptoken(sa, backend_a)
    assert pa.privacy_protected == Setting.DISABLE and pa.itoken is None
    assert backend_a.find_sa(flow_of(sa)) is None
    deadline = time.monotonic() + 2  # B learns it from A's DELETE
    while get_socket_ptoken(sb, backend_b).protected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not get_socket_ptoken(sb, backend_b).protected


@pytest.mark.parametrize("auth", AUTHS)
def test_terminate_ike_then_not_protected(tb, backend_a, pair_factory, auth):
    tb.up(f"termike-{auth}", auth, 6)
    s, _ = pair_factory(socket.IPPROTO_UDP, 6)
    protected_ptoken(tb, backend_a, s)
    tb.terminate(f"termike-{auth}")
    assert not get_socket_ptoken(s, backend_a).protected
    assert backend_a.find_sa(flow_of(s)) is None


@pytest.mark.parametrize("what", ["child", "ike"])
@pytest.mark.parametrize("auth", AUTHS)
def test_rekey_keeps_equivalent_tokens(tb, backend_a, backend_b, pair_factory, auth, what):
    name = f"rk-{auth}"
    tb.up(name, auth, 4)
    sa, sb = pair_factory(socket.IPPROTO_TCP, 4)
    before_a, before_b = protected_ptoken(tb, backend_a, sa), protected_ptoken(tb, backend_b, sb)
    ike0, child0 = backend_a.find_sa(flow_of(sa))
    tb.rekey(name, "host" if what == "child" else None)
    after_a, after_b = protected_ptoken(tb, backend_a, sa), protected_ptoken(tb, backend_b, sb)
    assert after_a.equivalent(before_a) and after_b.equivalent(before_b)  # draft 2.3.5
    ike1, child1 = backend_a.find_sa(flow_of(sa))
    if what == "child":
        assert child1.uniqueid != child0.uniqueid and child1.spi_out != child0.spi_out
        assert after_a.audit_string != before_a.audit_string  # new SPIs are audited
    else:
        assert ike1.uniqueid != ike0.uniqueid and ike1.local_spi != ike0.local_spi
        assert child1.uniqueid == child0.uniqueid  # the CHILD_SA moved to the new IKE_SA
    # The index agrees with a fresh listing.
    listed = {
        c.uniqueid for ike in backend_a.list_sas() for c in ike.children if ike.name == name and c.state == "INSTALLED"
    }
    assert listed == {child1.uniqueid}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
@pytest.mark.parametrize("auth", AUTHS)
def test_charon_restart_reconnects_and_drops_stale(tb, backend_a, pair_factory, auth, sig):
    tb.up("restart", auth, 4)
    s, _ = pair_factory(socket.IPPROTO_TCP, 4)
    protected_ptoken(tb, backend_a, s)
    resyncs = _index(tb).resyncs
    old_pid = tb.a.pid
    tb.restart_charon(tb.a, sig)
    assert tb.a.pid != old_pid
    # A new charon, no SA yet: nothing stale may be reported.
    p = get_socket_ptoken(s, backend_a)
    assert not p.protected and p.itoken is None
    assert _index(tb).resyncs == resyncs + 1
    tb.initiate("restart")
    p = protected_ptoken(tb, backend_a, s)
    assert p.itoken.pub_key_id == (None if auth == "psk" else tb.b.key.public_der)


@pytest.mark.parametrize("auth", AUTHS)
def test_daemon_down_is_a_clear_backend_error(tb, backend_a, pair_factory, auth):
    tb.up("down", auth, 6)
    s, _ = pair_factory(socket.IPPROTO_UDP, 6)
    protected_ptoken(tb, backend_a, s)
    tb.a.stop_charon()
    with pytest.raises(BackendError) as exc:
        get_socket_ptoken(s, backend_a)
    assert exc.value.errno == errno.ECONNREFUSED
    assert tb.a.vici_path in str(exc.value)
    assert backend_a.probe() is False
    with pytest.raises(BackendError) as listing:
        backend_a.list_sas()
    assert listing.value.errno == errno.ECONNREFUSED
    tb.restart_charon(tb.a)
    assert backend_a.probe() is True
    assert not get_socket_ptoken(s, backend_a).protected


def test_watch_delivers_sa_events(tb, backend_a):
    seen: list[SAEvent] = []
    got = threading.Event()

    def cb(ev: SAEvent) -> None:
        seen.append(ev)
        if ev.kind == "child-up":
            got.set()

    stop = backend_a.watch(cb)
    try:
        tb.up("watch", "psk", 4)
        assert got.wait(5)
    finally:
        stop()
    kinds = [e.kind for e in seen]
    assert kinds.index("ike-up") < kinds.index("child-up")
    up = next(e for e in seen if e.kind == "child-up")
    assert up.ike_name == "watch" and up.child_name == "host" and up.child_uniqueid


def test_capabilities_report_libipsec(tb, backend_a):
    caps = backend_a.capabilities()
    assert caps.dataplane == "kernel-libipsec"
    assert caps.modes == frozenset({"TUNNEL"})


def test_many_children_each_socket_its_own_sa(tb, backend_a, pair_factory):
    """20 per-port CHILD_SAs in one IKE_SA: each socket maps to its child; deleting one affects one."""
    a, b = tb.a.v4, tb.b.v4
    children = {f"c{i}": ([f"{a}/32[tcp]"], [f"{b}/32[tcp/{26000 + i}]"]) for i in range(20)}
    tb.load_conn("many", "rawkey", 4, children=children)
    for i in range(20):
        tb.initiate("many", f"c{i}")
    socks = {i: pair_factory(socket.IPPROTO_TCP, 4, 26000 + i)[0] for i in (0, 7, 19)}
    spis = {}
    for i, s in socks.items():
        tok = protected_ptoken(tb, backend_a, s)
        assert tok.policy_name == f"many/c{i}"
        spis[i] = backend_a.find_sa(flow_of(s))[1].spi_out
    assert len(set(spis.values())) == 3
    tb.terminate("many", "c7")
    assert not get_socket_ptoken(socks[7], backend_a).protected
    for i in (0, 19):  # the route via ipsec0 stays (other children use it); the index decides
        assert protected_ptoken(tb, backend_a, socks[i]).policy_name == f"many/c{i}"
    tb.rekey("many", "c19")
    ike, child = backend_a.find_sa(flow_of(socks[19]))
    assert child.name == "c19" and child.spi_out != spis[19]
    assert len([c for c in ike.children if c.name == "c19"]) == 1
    assert {c.name for c in ike.children} == {f"c{i}" for i in range(20)} - {"c7"}


def test_strict_consistency_and_relist_modes_agree(tb, backend_a, pair_factory):
    """consistency=strict (barrier per answer) and index=list (no index) answer like the default."""
    from btns_vici.plugins import get_backend

    strict = get_backend("strongswan", {**tb.a.options, "consistency": "strict"})
    relist = get_backend("strongswan", {**tb.a.options, "index": "list"})
    tb.up("modes", "x509", 4)
    s, _ = pair_factory(socket.IPPROTO_UDP, 4)
    tokens = [protected_ptoken(tb, be, s) for be in (backend_a, strict, relist)]
    assert tokens[0].equivalent(tokens[1]) and tokens[0].equivalent(tokens[2])
    tb.terminate("modes")
    assert not any(get_socket_ptoken(s, be).protected for be in (backend_a, strict, relist))
    plugin = get_plugin_manager().get_plugin("strongswan")
    for be in (strict, relist):
        plugin.forget(be.options)
