"""The fast listing paths of `btns sockets` / `btns sas` give what the straightforward ones give.

* output.table (assembled once, one format string per row length) prints what the cell-by-cell
  version printed;
* _inetdiag.rows (one struct unpack, the mark found inline) reports what _inetdiag.dump does;
* Snapshot.flow_text is str(Flow), and the reach prefilter answers "maybe" for every remote
  address some installed CHILD_SA's remote selector spans (and only for those);
* strongswan.parse's selector caches give the selectors an uncached parse gives;
* the JSON lines of `btns --json sockets` (the clear pToken spliced) are emit_array's.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from btns_vici import inetdiag as _inetdiag
from btns_vici.cli import sockdiag
from btns_vici.cli.cmd_sockets import HEADERS, Snapshot, _Lines, _Reach, _Rows, describe, emit_array, emit_lines
from btns_vici.cli.cmd_sockets import row as straight_row
from btns_vici.cli.output import printable, table
from btns_vici.cli.sockdiag import SocketEntry, list_sockets, socket_holders
from btns_vici.core.constants import AuthMethod
from btns_vici.core.records import ChildSA, Identity, IkeSA
from btns_vici.core.selectors import TrafficSelector
from btns_vici.strongswan import parse


def reference_table(headers, rows) -> str:
    """The table as output.table printed it before it was assembled in one piece (each line's
    control characters escaped: output.printable)."""
    out = io.StringIO()
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    for row in [list(headers), *cells]:
        padded = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        out.write(printable("  ".join(padded).rstrip()) + "\n")
    return out.getvalue()


CELLS = st.one_of(st.none(), st.integers(-5, 10**6), st.text(max_size=12))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_table_prints_what_the_cell_by_cell_version_printed(data):
    headers = data.draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=7))
    rows = data.draw(st.lists(st.lists(CELLS, min_size=1, max_size=len(headers)), max_size=6))
    out = io.StringIO()
    table(headers, rows, out)
    assert out.getvalue() == reference_table(headers, rows)


def _mark(msg) -> int | None:
    raw = _inetdiag.attributes(msg).get(_inetdiag.INET_DIAG_MARK)
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def test_rows_report_what_dump_reports():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.bind(("::1", 0))
    try:
        for family, proto in ((socket.AF_INET, socket.IPPROTO_TCP), (socket.AF_INET6, socket.IPPROTO_UDP)):
            with _inetdiag.open_socket() as s:
                dicts = _inetdiag.dump(s, family, proto)
            with _inetdiag.open_socket() as s:
                rows = _inetdiag.rows(s, family, proto)
            want = {
                (
                    m["idiag_state"],
                    m["idiag_sport"],
                    m["idiag_dport"],
                    m["src_addr"],
                    m["dst_addr"],
                    m["idiag_if"],
                    m["idiag_uid"],
                    m["idiag_inode"],
                    _mark(m),
                )
                for m in dicts
            }
            assert set(rows) == want
            mine = {cli.getsockname()[1], acc.getsockname()[1]} if proto == socket.IPPROTO_TCP else set()
            assert mine <= {r[1] for r in rows}
            if proto == socket.IPPROTO_UDP:
                assert udp6.getsockname()[1] in {r[1] for r in rows}
    finally:
        for s in (srv, cli, acc, udp6):
            s.close()


V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


def entry(local, lport, remote, rport, proto=socket.IPPROTO_TCP):
    family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    return SocketEntry(proto, family, "ESTAB", local, lport, remote, rport, 1, 0)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.tuples(V4, V4), st.tuples(V6, V6)),
    st.integers(1, 65535),
    st.integers(1, 65535),
    st.sampled_from([socket.IPPROTO_TCP, socket.IPPROTO_UDP]),
)
def test_flow_text_is_str_flow(addrs, lport, rport, proto):
    local, remote = addrs
    e = entry(local, lport, remote, rport, proto)
    if e.flow is None:  # an unspecified peer: no flow
        return
    assert Snapshot(None, []).flow_text(e) == str(e.flow)


def child(remote_ts: tuple[TrafficSelector, ...], state: str = "INSTALLED") -> ChildSA:
    local = (TrafficSelector.from_network("0.0.0.0/0"), TrafficSelector.from_network("::/0"))
    return ChildSA(
        name="c",
        uniqueid="1",
        reqid=1,
        state=state,
        mode="TUNNEL",
        protocol="ESP",
        spi_in=1,
        spi_out=2,
        encr_alg="AES_GCM_16",
        encr_keysize=256,
        integ_alg=None,
        local_ts=local,
        remote_ts=remote_ts,
    )


def ike(children: tuple[ChildSA, ...]) -> IkeSA:
    who = Identity("x", AuthMethod.BTNS)
    return IkeSA(
        backend="strongswan",
        name="n",
        uniqueid="1",
        version=2,
        state="ESTABLISHED",
        local_host=ipaddress.ip_address("10.0.0.1"),
        remote_host=ipaddress.ip_address("10.0.0.2"),
        local=who,
        remote=who,
        children=children,
    )


SPANS = st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)).map(sorted), max_size=6)


@settings(max_examples=400, deadline=None)
@given(SPANS, SPANS, st.integers(0, 255), st.booleans())
def test_reach_spans_exactly_the_installed_remote_selectors(installed, gone, last_octet, v6):
    def ts(lo: int, hi: int) -> TrafficSelector:
        base = ipaddress.ip_address("fd00::" if v6 else "10.0.0.0")
        return TrafficSelector(base + lo, base + hi)

    sas = [ike((child(tuple(ts(*s) for s in installed)), child(tuple(ts(*s) for s in gone), "DELETING")))]
    addr = ipaddress.ip_address("fd00::" if v6 else "10.0.0.0") + last_octet
    inside = any(lo <= last_octet <= hi for lo, hi in installed)
    reach = _Reach(sas)
    assert reach.may_cover(addr) is inside
    assert reach.may_cover(addr) is inside  # (the cached answer)
    other = ipaddress.ip_address("10.0.0.0" if v6 else "fd00::") + last_octet
    assert reach.may_cover(other) is False
    if not v6:  # an IPv4-mapped IPv6 peer is matched as its IPv4 address (core.selectors.flow_covered)
        assert reach.may_cover(ipaddress.IPv6Address(f"::ffff:{addr}")) is inside


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["10.0.0.1/32", "10.0.0.0/24", "fd00::1/128", "10.0.0.1..10.0.0.9", "0.0.0.0/0"]),
    st.sampled_from(["", "[tcp]", "[tcp/20000]", "[udp/5000-6000]", "[47]", "[icmp/8]", "[tcp/OPAQUE]"]),
)
def test_cached_selectors_are_the_uncached_ones(addr, rest):
    spec = addr + rest
    first = parse.parse_ts(spec)
    again = parse.parse_ts(spec)
    assert first == again == parse._parse_ts(spec)
    parse._TS_CACHE.clear()
    parse._RANGE_CACHE.clear()
    assert parse.parse_ts(spec) == first


def test_json_lines_are_emit_arrays_lines():
    """`btns --json sockets` lines (cmd_sockets._Lines) against emit_array(describe(...)): this host's
    sockets, listening, unconnected and connected (clear: the snapshot has no SAs)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    srv6 = socket.socket(socket.AF_INET6)
    srv6.bind(("::1", 0))
    srv6.listen(1)
    cli6 = socket.create_connection(srv6.getsockname()[:2])
    acc6, _ = srv6.accept()
    try:
        entries = list_sockets(None)
        holders = socket_holders()
        snap = Snapshot(None, [], name="strongswan")
        want = io.StringIO()
        emit_array([describe(e, snap, holders.get(e.inode, []))[1] for e in entries], want)
        got = io.StringIO()
        emit_lines(list(map(_Lines(Snapshot(None, [], name="strongswan"), holders), entries)), got)
        assert got.getvalue() == want.getvalue()
        assert sum(e.flow is not None for e in entries) >= 4
    finally:
        for s in (srv, cli, acc, srv6, cli6, acc6):
            s.close()


def test_fast_entries_and_table_rows_are_the_straightforward_ones():
    """sockdiag._entry is SocketEntry(*values); the `btns sockets` table from _Rows (cells_ready)
    prints what the table of row(*describe(...)) prints."""
    a = ipaddress.ip_address("10.0.0.1")
    values = (socket.IPPROTO_TCP, socket.AF_INET, "ESTAB", a, 1, a, 2, 3, 0, 0, None)
    fast, plain = sockdiag._entry(values), SocketEntry(*values)
    assert fast == plain and hash(fast) == hash(plain) and fast.flow == plain.flow
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    try:
        entries = list_sockets(None)
        holders = socket_holders()
        snap = Snapshot(None, [], name="strongswan")
        want, got = io.StringIO(), io.StringIO()
        table(HEADERS, [straight_row(e, *describe(e, snap, holders.get(e.inode, []))) for e in entries], want)
        table(HEADERS, list(map(_Rows(snap, holders), entries)), got, cells_ready=True)
        assert got.getvalue() == want.getvalue()
    finally:
        for s in (srv, cli, acc):
            s.close()
