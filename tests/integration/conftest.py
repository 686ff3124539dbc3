"""Helpers for the strongSwan integration tests.

The testbed fixtures (``testbed``, ``tb``, ``backend_a``, ``backend_b``, ``pair_factory``)
come from btns-lab's pytest plugin (:mod:`btns_lab.pytest_plugin`, entry point ``pytest11``):
one host testbed per test session. It needs root, iproute2, openssl and strongSwan (charon +
kernel-libipsec); when any of them is missing the fixture raises, so the tests ERROR instead
of being skipped: CI installs them and must notice when they are gone.
"""

from __future__ import annotations

import socket

from btns_lab.testbed import Testbed
from btns_vici.backend import Backend

AUTHS = ("rawkey", "psk", "x509")
FAMILIES = (4, 6)
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


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
