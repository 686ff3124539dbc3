"""The fast paths of `btns sockets` give what the straightforward ones give.

* the stdlib sock_diag dump (btns_vici.inetdiag) reports the same sockets and fields as pyroute2's;
* the clear-flow pToken dict made from a template equals ptoken_dict(unprotected_ptoken(flow));
* the JSON array with one socket per line parses to the same value as json.dumps(indent=2).
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket

from hypothesis import given
from hypothesis import strategies as st

from btns_vici import inetdiag as _inetdiag
from btns_vici.cli.cmd_sockets import clear_ptoken_dict, clear_reason, emit_array
from btns_vici.cli.describe import ptoken_dict
from btns_vici.cli.sockdiag import list_sockets, state_mask
from btns_vici.core.derive import unprotected_ptoken
from btns_vici.core.selectors import Flow


def test_dump_matches_pyroute2():
    from pyroute2.netlink.diag import DiagSocket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.bind(("::1", 0))
    try:
        for family, proto in ((socket.AF_INET, socket.IPPROTO_TCP), (socket.AF_INET6, socket.IPPROTO_UDP)):
            with DiagSocket() as d:
                d.bind()
                theirs = {
                    (
                        m["idiag_inode"],
                        m["idiag_state"],
                        m["idiag_src"],
                        m["idiag_sport"],
                        m["idiag_dst"],
                        m["idiag_dport"],
                        m["idiag_uid"],
                    )
                    for m in d.get_sock_stats(family=family, protocol=proto)
                }
            with _inetdiag.open_socket() as s:
                ours = {
                    (
                        m["idiag_inode"],
                        m["idiag_state"],
                        m["idiag_src"],
                        m["idiag_sport"],
                        m["idiag_dst"],
                        m["idiag_dport"],
                        m["idiag_uid"],
                    )
                    for m in _inetdiag.dump(s, family, proto)
                }
            mine = {x for x in ours if x[0] in {_inode(srv), _inode(cli), _inode(acc), _inode(udp6)}}
            assert mine and mine <= theirs
        with _inetdiag.open_socket() as s:
            listening = _inetdiag.dump(s, socket.AF_INET, socket.IPPROTO_TCP, state_mask(["LISTEN"]))
        assert {m["idiag_state"] for m in listening} == {10}
        assert _inode(srv) in {m["idiag_inode"] for m in listening}
        entries = {e.inode: e for e in list_sockets(None, protocols={socket.IPPROTO_TCP}, states={"ESTAB"})}
        e = entries[_inode(cli)]
        assert (e.local_addr, e.local_port) == (ipaddress.ip_address("127.0.0.1"), cli.getsockname()[1])
        assert e.remote_port == srv.getsockname()[1] and e.state == "ESTAB"
        assert all(x.state == "ESTAB" and x.proto == socket.IPPROTO_TCP for x in entries.values())
    finally:
        for s in (srv, cli, acc, udp6):
            s.close()


def _inode(s: socket.socket) -> int:
    import os

    return os.fstat(s.fileno()).st_ino


class _B:
    name = "strongswan"


addrs4 = st.ip_addresses(v=4)
addrs6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@given(
    st.one_of(st.tuples(addrs4, addrs4), st.tuples(addrs6, addrs6)),
    ports,
    ports,
    st.sampled_from([socket.IPPROTO_TCP, socket.IPPROTO_UDP]),
)
def test_clear_ptoken_template(pair, lport, rport, proto):
    flow = Flow(proto, pair[0], lport, pair[1], rport)
    reason = clear_reason(_B())
    template = ptoken_dict(unprotected_ptoken(None, reason))
    assert clear_ptoken_dict(template, flow) == ptoken_dict(unprotected_ptoken(flow, reason))


def test_json_array_is_the_same_document():
    items = [{"a": 1, "b": [None, "x\u00e9"], "c": {"d": True}}, {"a": 2}]
    out = io.StringIO()
    emit_array(items, out)
    assert json.loads(out.getvalue()) == items
    assert out.getvalue().count("\n") == len(items) + 2
    out = io.StringIO()
    emit_array([], out)
    assert json.loads(out.getvalue()) == []
