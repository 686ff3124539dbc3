"""Fixtures for the strongSwan integration tests: one host testbed per test session.

The testbed needs root, iproute2, openssl and strongSwan (charon + kernel-libipsec).
When any of them is missing the fixture raises, so the tests ERROR instead of being
skipped: CI installs them and must notice when they are gone.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from btns_vici import dataplane
from btns_vici.backend import Backend
from btns_vici.plugins import get_backend, get_plugin_manager
from btns_vici.testbed import Peer, Testbed, connected_pair

AUTHS = ("rawkey", "psk", "x509")
FAMILIES = (4, 6)
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def _forget(p: Peer) -> None:
    plugin = get_plugin_manager().get_plugin("strongswan")
    plugin.forget(p.options)
    dataplane.forget(p.netns)


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    with Testbed() as tb:
        yield tb
        for p in tb.peers:
            _forget(p)


@pytest.fixture
def tb(testbed: Testbed) -> Iterator[Testbed]:
    """The session testbed, with every connection a test loaded unloaded afterwards."""
    yield testbed
    for p in testbed.peers:
        if p.proc is None or p.proc.poll() is not None:
            testbed.restart_charon(p)
    for name in list(testbed.conns):
        testbed.unload_conn(name)


@pytest.fixture
def backend_a(tb: Testbed) -> Backend:
    return get_backend("strongswan", tb.a.options)


@pytest.fixture
def backend_b(tb: Testbed) -> Backend:
    return get_backend("strongswan", tb.b.options)


@pytest.fixture
def pair_factory(tb: Testbed) -> Iterator:
    """connected_pair(proto, family, port=0, plain=False) -> (socket in A, socket in B); closed afterwards."""
    made: list[socket.socket] = []

    def make(proto: int, family: int, port: int = 0, plain: bool = False) -> tuple[socket.socket, socket.socket]:
        a, b = connected_pair(tb, proto, family, port, plain)
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


def explain(tb: Testbed, backend: Backend, sock: socket.socket) -> str:
    """Why a socket is (not) protected: index answer, data-plane route, charon's SAs."""
    from btns_vici import rtnl
    from btns_vici.sockets import flow_of, view_of

    flow = flow_of(sock)
    found = backend.find_sa(flow)
    peer = tb.a if backend.options["netns"] == tb.a.netns else tb.b
    route = rtnl.routing(peer.netns).lookup(flow.remote_addr, flow.local_addr)
    proof = backend.protect(view_of(sock))
    sas = [
        (i.name, i.state, [(c.name, c.state, [str(t) for t in c.remote_ts]) for c in i.children])
        for i in backend.list_sas()
    ]
    index = found and (found[0].name, found[1].uniqueid)
    return f"flow={flow} index={index} route={route} verdict={proof} sas={sas}"


def protected_ptoken(tb: Testbed, backend: Backend, sock: socket.socket):
    """get_socket_pToken, asserting the socket is protected (with a diagnosis if not)."""
    from btns_vici.api import get_socket_ptoken

    tok = get_socket_ptoken(sock, backend)
    assert tok.protected, f"{tok.information_string}; now: {explain(tb, backend, sock)}"
    return tok
