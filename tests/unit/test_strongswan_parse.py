"""Parsing VICI replies and events captured from a real charon 5.9.8 (tests/data/vici, see capture.py)."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btns_vici.core.constants import AuthMethod, Setting
from btns_vici.core.derive import integrity_level, privacy_level, ptoken_for
from btns_vici.core.errors import ProtocolError
from btns_vici.core.records import DataplaneProof, Protection
from btns_vici.core.selectors import Flow, TrafficSelector
from btns_vici.strongswan import parse
from btns_vici.strongswan.der import parse_certificate
from btns_vici.strongswan.index import SAIndex, _compiled, _match
from btns_vici.strongswan.plugin import find_in, to_sa_event
from btns_vici.strongswan.session import decode_bytes, encode_message

DATA = Path(__file__).parent.parent / "data" / "vici"
A4, B4 = ipaddress.ip_address("10.231.0.1"), ipaddress.ip_address("10.231.0.2")


def load(name: str) -> dict:
    return decode_bytes((DATA / f"{name}.vici").read_bytes())


def certs() -> parse.CertStore:
    return parse.CertStore.from_vici(load(p.stem) for p in sorted(DATA.glob("list-certs-*.vici")))


def record(name: str):
    """list-sas + list-conns + list-certs of connection ``name`` -> IkeSA, like the plugin does."""
    conn = load(f"list-conns-{name}")[name]
    ike_name, sec = parse.single_section(load(f"list-sas-{name}"), "list-sas")
    store = certs()
    local = parse.identity(parse.text(sec["local-id"]), parse.conn_auth(conn, "local"), store)
    remote = parse.identity(parse.text(sec["remote-id"]), parse.conn_auth(conn, "remote"), store)
    return parse.parse_ike(ike_name, sec, local, remote, parse.children_of(sec).values())


# -- traffic selectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10.0.0.1/32", TrafficSelector.from_network("10.0.0.1/32")),
        ("10.0.0.0/24", TrafficSelector.from_network("10.0.0.0/24")),
        ("10.0.0.1/32[tcp/20000]", TrafficSelector.from_network("10.0.0.1/32", 6, 20000, 20000)),
        ("10.231.0.2/32[tcp]", TrafficSelector.from_network("10.231.0.2/32", 6)),
        ("fd00::1/128[udp/5000-6000]", TrafficSelector.from_network("fd00::1/128", 17, 5000, 6000)),
        ("0.0.0.0/0", TrafficSelector.from_network("0.0.0.0/0")),
        ("::/0[ipv6-icmp]", TrafficSelector.from_network("::/0", 58)),
        ("10.0.0.1/32[tcp/http]", TrafficSelector.from_network("10.0.0.1/32", 6, 80, 80)),
        ("10.0.0.1/32[47]", TrafficSelector.from_network("10.0.0.1/32", 47)),
        (
            "10.0.0.1..10.0.0.9[udp/53]",
            TrafficSelector(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.9"), 17, 53, 53),
        ),
    ],
)
def test_parse_ts(spec, expected):
    assert parse.parse_ts(spec) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "10.0.0.1/33",
        "nonsense",
        "10.0.0.1/32[tcp/20000",
        "10.0.0.1/32[nope/1]",
        "10.0.0.9..10.0.0.1",
        "10.0.0.1..fd00::1",
        "10.0.0.1/32[tcp/99999]",
    ],
)
def test_parse_ts_rejects_malformed(bad):
    with pytest.raises(ProtocolError):
        parse.parse_ts(bad)


# -- list-sas / list-conns / list-certs ----------------------------------------------------------


def test_raw_key_peer_is_btns_with_its_spki():
    ike = record("rawkey4")
    assert ike.backend == "strongswan" and ike.name == "rawkey4" and ike.is_established
    assert ike.local_host == A4 and ike.remote_host == B4 and ike.version == 2
    assert ike.remote.auth_method == AuthMethod.BTNS and ike.local.auth_method == AuthMethod.BTNS
    assert ike.remote.ike_id == "b-rawkey4-v4@btns.test"
    pub = next(
        load(p.stem) for p in DATA.glob("list-certs-*") if load(p.stem).get("subject") == b"b-rawkey4-v4@btns.test"
    )
    assert ike.remote.public_key == pub["data"]
    assert ike.remote.public_key.startswith(bytes.fromhex("302a300506032b6570032100"))  # ed25519 SPKI
    assert ike.remote.certificate_dn is None and ike.remote.ca_dn is None
    assert ike.local.public_key != ike.remote.public_key
    (child,) = ike.children
    assert child.mode == "TUNNEL" and child.protocol == "ESP" and child.encap and child.state == "INSTALLED"
    assert child.encr_alg == "CHACHA20_POLY1305" and child.encr_keysize == 256 and child.integ_alg is None
    spi_in = load("list-sas-rawkey4")["rawkey4"]["child-sas"]["host-1"]["spi-in"]
    assert child.spi_in == int(spi_in, 16) and child.spi_in > 0 and child.spi_out > 0
    assert child.local_ts == (TrafficSelector.from_network("10.231.0.1/32"),)
    assert child.remote_ts == (TrafficSelector.from_network("10.231.0.2/32"),)


def test_psk_peer_and_cbc_algorithms():
    ike = record("psk4")
    assert ike.remote.auth_method == AuthMethod.PRESHAREDKEY and ike.remote.public_key is None
    assert ike.remote.auth_class == "pre-shared key"
    (child,) = ike.children
    assert (child.encr_alg, child.encr_keysize, child.integ_alg) == ("AES_CBC", 128, "HMAC_SHA2_256_128")
    assert privacy_level(child) == Setting.LEVEL_MEDIUM and integrity_level(child) == Setting.LEVEL_MEDIUM


def test_x509_peer_is_pkix_trusted_with_dns():
    ike = record("x5094")
    r = ike.remote
    assert r.auth_method == AuthMethod.PKIX_TRUSTED
    assert r.certificate_dn == "CN=host-b.btns.test" == r.ike_id
    assert r.ca_dn.startswith("CN=BTNS Test CA ")
    assert r.public_key.startswith(bytes.fromhex("302a300506032b6570032100"))
    assert ike.local.auth_method == AuthMethod.PKIX_TRUSTED and ike.local.certificate_dn == "CN=host-a.btns.test"
    # The same host key is used for raw-key and certificate auth in the testbed.
    assert r.public_key == record("rawkey4").remote.public_key


def test_ipv6_and_port_selectors():
    ike6 = record("rawkey6")
    assert ike6.remote_host == ipaddress.ip_address("fd00:b75::2")
    assert ike6.children[0].remote_ts == (TrafficSelector.from_network("fd00:b75::2/128"),)
    ports = {c.name: c for c in record("ports").children}
    assert ports["p20000"].local_ts == (TrafficSelector.from_network("10.231.0.1/32", 6, 20000, 20000),)
    assert ports["prange"].remote_ts == (TrafficSelector.from_network("10.231.0.2/32", 17, 5000, 6000),)
    assert ports["v6port"].local_ts == (TrafficSelector.from_network("fd00:b75::1/128", 17, 5000, 5000),)
    sas = [record("ports")]
    hit = find_in(sas, Flow(socket.IPPROTO_UDP, A4, 5500, B4, 5999))
    assert hit is not None and hit[1].name == "prange"
    assert find_in(sas, Flow(socket.IPPROTO_UDP, A4, 6001, B4, 5999)) is None
    assert find_in(sas, Flow(socket.IPPROTO_TCP, A4, 20000, B4, 443))[1].name == "p20000"


def test_x509_certificates_parse():
    infos = [parse_certificate(load(p.stem)["data"]) for p in sorted(DATA.glob("list-certs-*-x509.vici"))]
    subjects = {i.subject for i in infos}
    assert {"CN=host-a.btns.test", "CN=host-b.btns.test"} <= subjects
    ca = next(i for i in infos if i.subject.startswith("CN=BTNS Test CA"))
    assert ca.issuer == ca.subject
    assert all(i.issuer == ca.subject for i in infos)


def test_ptoken_from_captured_sa():
    ike = record("x5094")
    child = ike.children[0]
    flow = Flow(socket.IPPROTO_TCP, A4, 40000, B4, 22)
    proof = DataplaneProof("kernel-libipsec", "route via ipsec0 in table 220", child.spi_out, child.reqid)
    tok = ptoken_for(Protection(flow, ike, child, proof))
    assert tok.privacy_protected == Setting.LEVEL_HIGH and tok.tunnel_mode == Setting.ENABLE
    assert tok.itoken.certificate_dn == "CN=host-b.btns.test"
    assert tok.remote_itoken.certificate_dn == "CN=host-a.btns.test"
    assert tok.policy_name == "x5094/host"


def test_auth_class_mapping():
    assert parse.auth_method("public key", False) == AuthMethod.BTNS
    assert parse.auth_method("public key", True) == AuthMethod.PKIX_TRUSTED
    assert parse.auth_method("pre-shared key", False) == AuthMethod.PRESHAREDKEY
    assert parse.auth_method("EAP", False) == AuthMethod.EAP
    assert parse.auth_method("EAP-TLS", False) == AuthMethod.EAP
    assert parse.auth_method("XAuth", False) == AuthMethod.XAUTH
    assert parse.auth_method("any", False) == AuthMethod.NONE


def test_stats_lists_libipsec():
    plugins = [p.decode() for p in load("stats")["plugins"]]
    assert "kernel-libipsec" in plugins and "vici" in plugins


# -- malformed input ---------------------------------------------------------------------------


def test_truncated_message_is_eproto():
    raw = (DATA / "list-sas-rawkey4.vici").read_bytes()
    with pytest.raises(ProtocolError) as exc:
        decode_bytes(raw[: len(raw) // 2])
    assert exc.value.errno == 71  # EPROTO


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("uniqueid"),
        lambda s: s.__setitem__("local-host", b"not-an-address"),
        lambda s: s["child-sas"]["host-1"].__setitem__("spi-in", b"zz"),
        lambda s: s["child-sas"]["host-1"].__setitem__("local-ts", [b"10.0.0.1/99"]),
        lambda s: s["child-sas"]["host-1"].pop("mode"),
        lambda s: s.__setitem__("child-sas", b"oops"),
    ],
)
def test_malformed_sa_is_eproto(mutate):
    sec = load("list-sas-rawkey4")["rawkey4"]
    mutate(sec)
    with pytest.raises(ProtocolError):
        parse.parse_ike("rawkey4", sec, *[parse.identity("x", None, certs())] * 2, parse.children_of(sec).values())


def test_round_trip_encoding():
    msg = load("list-conns-x5094")
    assert decode_bytes(encode_message(msg)) == msg


def test_bad_der_is_eproto():
    with pytest.raises(ProtocolError):
        parse_certificate(b"\x30\x05\x02\x01")


# -- the event-fed index, offline --------------------------------------------------------------


def test_index_applies_captured_events():
    """Up, child rekey, IKE rekey (children move), child delete, IKE delete, in charon's order."""
    idx = SAIndex("/nonexistent")
    names = json.loads((DATA / "events.json").read_text())
    for i, name in enumerate(names):
        idx.apply(name, load(f"event-{i:02d}-{name}"))
        if i == 11:
            assert idx.child_ids() == {"1": {"1"}, "2": {"2"}, "3": {"3"}, "4": {"4"}, "5": {"5", "6", "7"}}
    # rawkey4's IKE_SA 1 was rekeyed into 6 and kept its child; psk4's child 2 became 8;
    # x5094 lost its child; rawkey6 (IKE_SA 4) was deleted.
    assert idx.child_ids() == {"6": {"1"}, "2": {"8"}, "3": set(), "5": {"5", "6", "7"}}
    # Applying the same events again changes nothing (idempotent).
    gen = idx.generation
    for i, name in enumerate(names[12:], start=12):
        idx.apply(name, load(f"event-{i:02d}-{name}"))
    assert idx.child_ids() == {"6": {"1"}, "2": {"8"}, "3": set(), "5": {"5", "6", "7"}}
    assert idx.generation > gen


def test_sa_events_for_watch():
    kinds = [
        to_sa_event(n, load(f"event-{i:02d}-{n}")) for i, n in enumerate(json.loads((DATA / "events.json").read_text()))
    ]
    assert kinds[0].kind == "ike-up" and kinds[0].ike_name == "rawkey4" and kinds[0].ike_uniqueid == "1"
    assert kinds[1].kind == "child-up" and kinds[1].child_name == "host" and kinds[1].child_uniqueid == "1"
    assert kinds[12].kind == "child-rekey" and kinds[12].child_uniqueid == "8"
    assert kinds[13].kind == "ike-rekey" and kinds[13].ike_uniqueid == "6"
    assert kinds[15].kind == "ike-down" and kinds[16].kind == "child-down"


# -- the index's compiled selector match agrees with TrafficSelector.covers -----------------------

_addrs = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    st.sampled_from([A4, B4, ipaddress.ip_address("fd00:b75::1")]),
)


@st.composite
def _selectors(draw):
    a, b = draw(_addrs), draw(_addrs)
    if a.version != b.version:
        b = a
    lo, hi = sorted((draw(st.integers(0, 65535)), draw(st.integers(0, 65535))))
    return TrafficSelector(min(a, b), max(a, b), draw(st.sampled_from([0, 6, 17, 47])), lo, hi)


@given(st.lists(_selectors(), max_size=3), _addrs, st.sampled_from([6, 17, 47]), st.integers(0, 65535))
def test_compiled_match_equals_covers(sels, addr, proto, port):
    expected = any(t.covers(addr, proto, port) for t in sels)
    assert _match(_compiled(tuple(sels)), (addr.version, int(addr)), proto, port) == expected


# -- port names charon prints (getservbyport): hyphens belong to the name, not a range ----------


@pytest.mark.parametrize(
    ("spec", "port"),
    [
        ("10.0.0.2/32[tcp/http-alt]", 8080),  # not "http" .. "alt"
        ("10.0.0.2/32[tcp/zope-ftp]", 8021),  # not 9673 .. 21 (both halves are names)
        ("10.0.0.2/32[tcp/x11-1]", 6001),  # not 6000 .. 1
        ("10.0.0.2/32[udp/ipsec-nat-t]", 4500),
        ("10.0.0.2/32[tcp/ms-sql-s]", 1433),
    ],
)
def test_parse_ts_reads_a_hyphenated_port_name_as_one_port(spec, port):
    ts = parse.parse_ts(spec)
    assert (ts.port_lo, ts.port_hi) == (port, port)


@pytest.mark.parametrize(
    "bad",
    [
        "10.0.0.2/32[tcp/80-21]",  # charon prints ranges low-high: a reversed one is garbled, not OPAQUE
        "10.0.0.2/32[tcp/http-ssh]",  # names never form a range
        "10.0.0.2/32[tcp/\u00b2]",  # a digit Python's int() refuses
        "10.0.0.2/32[\u00b9\u00b2/80]",
        "10.0.0.2/32[tcp/1-\u00b2]",
        "10.0.0.2/32[tcp/ht\x00tp]",  # a NUL: socket.getservbyname raises ValueError
        "10.0.0.2/32[t\x00cp/80]",
    ],
)
def test_parse_ts_refuses_what_charon_never_prints(bad):
    with pytest.raises(ProtocolError):
        parse.parse_ts(bad)
