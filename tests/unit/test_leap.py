"""Leap of faith, pure parts: the wire format (fuzzed), the responder's rules, the known-peers store."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btns_vici import knownpeers
from btns_vici.core.constants import AuthMethod
from btns_vici.hostkey import load_or_create
from btns_vici.knownpeers import KnownPeers
from btns_vici.leap import requires_leap, wire
from btns_vici.leap.initiator import exchange
from btns_vici.leap.responder import IP_PKTINFO, Limits, Responder, _pktinfo, plain_addr


@given(st.binary(max_size=600))
@settings(max_examples=3000, deadline=None)
def test_parser_never_raises_anything_but_wire_error(data):
    try:
        msg = wire.parse(data)
    except wire.WireError:
        return
    assert len(data) == wire.SIZES[msg.type]
    assert len(msg.nonce) == 16


@given(
    st.sampled_from(sorted(wire.SIZES)), st.binary(min_size=256, max_size=256), st.integers(0, 255), st.integers(0, 255)
)
@settings(max_examples=2000, deadline=None)
def test_parser_on_near_valid_messages(kind, body, flip, pos):
    data = bytearray(wire.HEADER.pack(wire.MAGIC, wire.VERSION, kind, 0, body[:16]) + body[16:])
    data = data[: wire.SIZES[kind]]
    data[pos % len(data)] ^= flip
    try:
        msg = wire.parse(bytes(data))
    except wire.WireError:
        return
    assert msg.type in wire.SIZES


@given(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=64, max_size=64),
    st.integers(0, 255),
)
def test_round_trips(nonce, cookie, key, sig, reason):
    assert wire.parse(wire.hello(nonce)) == wire.Message(wire.HELLO, nonce)
    assert wire.parse(wire.cookie_msg(nonce, cookie)).cookie == cookie
    m = wire.parse(wire.keyreq(nonce, cookie, key, sig))
    assert (m.cookie, m.key, m.sig) == (cookie, key, sig)
    m = wire.parse(wire.key_msg(nonce, key, sig))
    assert (m.key, m.sig) == (key, sig)
    assert wire.parse(wire.refused(nonce, reason)).reason == reason


def test_no_answer_larger_than_its_question():
    for q, a in ((wire.HELLO, wire.COOKIE), (wire.KEYREQ, wire.KEY), (wire.KEYREQ, wire.REFUSED)):
        assert wire.SIZES[a] < wire.SIZES[q]


def test_spki_raw_round_trip(tmp_path):
    der = load_or_create(tmp_path / "k").public_der
    assert wire.spki_of(wire.raw_of(der)) == der
    with pytest.raises(wire.WireError):
        wire.raw_of(b"\x30" + bytes(43))


@pytest.fixture
def responder(tmp_path):
    r = Responder(
        {"key_dir": str(tmp_path / "r")},
        host="127.0.0.1",
        port=0,
        charon=False,
        limits=Limits(hello_rate=1, hello_burst=3, keyreq_rate=1, keyreq_burst=2),
    )
    yield r
    r.sock.close()


def _keyreq(tmp_path, r, addr="10.0.0.1", port=500, name="i"):
    host = load_or_create(tmp_path / name)
    from cryptography.hazmat.primitives import serialization

    priv = serialization.load_pem_private_key(host.private_pem, password=None)
    nonce = os.urandom(16)
    ans = wire.parse(r.handle(wire.hello(nonce), addr, port))
    raw = wire.raw_of(host.public_der)
    req = wire.keyreq(nonce, ans.cookie, raw, priv.sign(wire.keyreq_transcript(nonce, ans.cookie, raw)))
    return host, nonce, ans.cookie, req


def test_cookie_before_state(tmp_path, responder):
    r = responder
    host, _nonce, _cookie, req = _keyreq(tmp_path, r)
    assert r.store.entries() == []  # a HELLO leaves nothing behind
    assert r.handle(req, "10.0.0.99", 500) is None and r.stats.bad_cookie == 1  # another source: no
    assert r.handle(req, "10.0.0.1", 501) is None and r.stats.bad_cookie == 2  # another port: no
    assert r.store.entries() == []
    ans = wire.parse(r.handle(req, "10.0.0.1", 500))
    assert ans.type == wire.KEY and wire.spki_of(ans.key) == r.host.public_der
    assert r.store.get("10.0.0.1").spki == host.public_der


def test_bad_signature_no_state(tmp_path, responder):
    r = responder
    _, _nonce, _cookie, req = _keyreq(tmp_path, r)
    bad = bytearray(req)
    bad[24 + 16 + 1 + 32] ^= 1  # a signature byte
    assert r.handle(bytes(bad), "10.0.0.1", 500) is None
    assert r.stats.bad_signature == 1 and r.store.entries() == []


def test_rate_limits_per_source(tmp_path, responder):
    r = responder
    answers = [r.handle(wire.hello(os.urandom(16)), "10.0.0.5", 1) for _ in range(10)]
    assert sum(a is not None for a in answers) == 3  # the burst, then nothing
    assert r.handle(wire.hello(os.urandom(16)), "10.0.0.6", 1) is not None  # others are not starved
    assert r.stats.rate_limited == 7


def test_reflection_of_own_key_refused(tmp_path, responder):
    r = responder
    from cryptography.hazmat.primitives import serialization

    priv = serialization.load_pem_private_key(r.host.private_pem, password=None)
    nonce = os.urandom(16)
    c = wire.parse(r.handle(wire.hello(nonce), "10.0.0.1", 1)).cookie
    raw = wire.raw_of(r.host.public_der)
    req = wire.keyreq(nonce, c, raw, priv.sign(wire.keyreq_transcript(nonce, c, raw)))
    assert wire.parse(r.handle(req, "10.0.0.1", 1)).type == wire.REFUSED


def test_pinned_changed_key_refused(tmp_path, responder):
    r = responder
    r.store.pin("10.0.0.1", load_or_create(tmp_path / "old").public_der)
    _, _, _, req = _keyreq(tmp_path, r)
    ans = wire.parse(r.handle(req, "10.0.0.1", 500))
    assert ans.type == wire.REFUSED and ans.reason == wire.R_PINNED


def test_exchange_over_loopback(tmp_path):
    with Responder({"key_dir": str(tmp_path / "r")}, host="127.0.0.1", port=0, charon=False) as r:
        a = load_or_create(tmp_path / "a")
        assert exchange("127.0.0.1", r.port, a, bind_port=False) == r.host.public_der
        assert r.store.get("127.0.0.1").spki == a.public_der


def test_exchange_timeout(tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:
        quiet.bind(("127.0.0.1", 0))
        t = time.monotonic()
        with pytest.raises(OSError) as info:
            exchange("127.0.0.1", quiet.getsockname()[1], load_or_create(tmp_path / "a"), timeout=0.3, bind_port=False)
        assert info.value.errno == 110 and time.monotonic() - t < 1


def test_plain_addr():
    assert plain_addr("::ffff:10.0.0.1") == "10.0.0.1"
    assert plain_addr("fe80::1%eth0") == "fe80::1"


def test_requires_leap():
    assert requires_leap(frozenset({AuthMethod.LEAPOFFAITH}))
    assert not requires_leap(frozenset({AuthMethod.LEAPOFFAITH, AuthMethod.BTNS}))
    assert not requires_leap(frozenset({AuthMethod.BTNS}))


# -- the store -----------------------------------------------------------------------------------


def test_store_learn_same_changed_forget_pin(tmp_path):
    s = KnownPeers(tmp_path)
    k1, k2 = load_or_create(tmp_path / "1").public_der, load_or_create(tmp_path / "2").public_der
    assert s.learn("10.0.0.2", k1, knownpeers.LEARNED_INITIATOR)[0] == knownpeers.NEW
    assert s.learn("10.0.0.2", k1, knownpeers.LEARNED_INITIATOR)[0] == knownpeers.SAME
    out, e = s.learn("10.0.0.2", k2, knownpeers.LEARNED_INITIATOR)
    assert out == knownpeers.CHANGED and e.spki == k1 and len(e.changes) == 1
    assert KnownPeers(tmp_path).get("10.0.0.2").spki == k1  # persisted, never replaced
    assert oct((tmp_path / knownpeers.FILE_NAME).stat().st_mode & 0o777) == "0o600"
    e = s.pin("10.0.0.2", k2)
    assert e.pinned and e.spki == k2 and e.how == knownpeers.LEARNED_PIN
    assert s.forget("10.0.0.2") and not s.forget("10.0.0.2")
    with pytest.raises(OSError):
        s.pin("10.0.0.3")


def test_store_reporting_first_contact_then_leap(tmp_path):
    s = KnownPeers(tmp_path)
    k1, k2 = load_or_create(tmp_path / "1").public_der, load_or_create(tmp_path / "2").public_der
    assert s.note_sa("10.0.0.2", k1, "sa1")[0] is AuthMethod.BTNS  # unknown address
    s.learn("10.0.0.2", k1, knownpeers.LEARNED_INITIATOR)
    assert s.note_sa("10.0.0.2", k1, "sa1")[0] is AuthMethod.BTNS  # the first contact
    assert s.note_sa("10.0.0.2", k1, "sa1")[0] is AuthMethod.BTNS  # ... and stays so
    assert s.note_sa("10.0.0.2", k1, "sa2")[0] is AuthMethod.LEAPOFFAITH  # a later IKE_SA
    assert s.note_sa("10.0.0.2", k2, "sa3")[0] is AuthMethod.BTNS  # a changed key
    assert s.get("10.0.0.2").changes


def test_store_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(knownpeers, "MAX_PEERS", 5)
    s = KnownPeers(tmp_path)
    k = load_or_create(tmp_path / "1").public_der
    s.learn("10.0.0.1", k, "x")
    s.pin("10.0.0.1")
    for i in range(2, 12):
        s.learn(f"10.0.0.{i}", k, "x")
    addrs = {e.address for e in s.entries()}
    assert len(addrs) == 5 and "10.0.0.1" in addrs and "10.0.0.11" in addrs


def test_null_auth_record(tmp_path, caplog, capsys):
    """NULL auth (libreswan): a record per address without a key; sessions and claimed identities."""
    from btns_vici.cli import main

    s = KnownPeers(tmp_path)
    k = load_or_create(tmp_path / "1").public_der
    s.learn("10.0.0.9", k, knownpeers.LEARNED_INITIATOR)
    assert s.note_null("10.0.0.2", "ID_NULL", "sa1")[0] == knownpeers.FIRST_CONTACT
    assert s.note_null("10.0.0.2", "ID_NULL", "sa1")[0] == knownpeers.SAME_SESSION
    before = s.path.stat().st_mtime_ns
    assert s.note_null("10.0.0.2", "ID_NULL", "sa1")[0] == knownpeers.SAME_SESSION
    assert s.path.stat().st_mtime_ns == before, "an unchanged session is not rewritten"
    assert s.note_null("10.0.0.2", "ID_NULL", "sa2")[0] == knownpeers.NEW_SESSION
    with caplog.at_level("WARNING", logger="btns_vici.knownpeers"):
        assert s.note_null("10.0.0.2", "@other", "sa3")[0] == knownpeers.OTHER_IDENTITY
    assert "now claims IKE identity '@other'" in caplog.text
    n = s.get_null("10.0.0.2")
    assert (n.ike_id, n.sessions, n.session, [c.ike_id for c in n.other_ids]) == ("ID_NULL", 3, "sa3", ["@other"])
    assert s.get("10.0.0.2") is None, "no key entry for a NULL peer: nothing to pin"
    assert s.get("10.0.0.9").spki == k, "the keyed section is untouched"
    s.learn("10.0.0.9", k, knownpeers.LEARNED_INITIATOR)  # a keyed write keeps the NULL section
    assert s.get_null("10.0.0.2").sessions == 3
    assert main(["peers", "list", "--key-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NULL ID_NULL" in out and "null-auth" in out and "@otherx1" in out
    assert s.forget("10.0.0.2") and s.get_null("10.0.0.2") is None and s.get("10.0.0.9") is not None


def test_cli_peers(tmp_path, capsys):
    from btns_vici.cli import main

    s = KnownPeers(tmp_path)
    k = load_or_create(tmp_path / "1").public_der
    s.learn("10.0.0.2", k, knownpeers.LEARNED_RESPONDER)
    assert main(["peers", "list", "--key-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "10.0.0.2" in out and knownpeers.fingerprint(k) in out and "leap-responder" in out
    assert main(["--json", "peers", "list", "--key-dir", str(tmp_path)]) == 0
    assert '"address": "10.0.0.2"' in capsys.readouterr().out
    pem = tmp_path / "p.pem"
    pem.write_bytes(load_or_create(tmp_path / "2").public_pem)
    assert main(["peers", "pin", "10.0.0.3", "--key", str(pem), "--key-dir", str(tmp_path)]) == 0
    assert KnownPeers(tmp_path).get("10.0.0.3").pinned
    assert main(["peers", "forget", "10.0.0.2", "--key-dir", str(tmp_path)]) == 0
    assert main(["peers", "forget", "10.0.0.2", "--key-dir", str(tmp_path)]) == 5
    assert main(["peers", "pin", "10.0.0.9", "--key-dir", str(tmp_path)]) == 5


def test_leap_address():
    from btns_vici.broker.server import leap_address

    assert leap_address("[::]:5386") == ("::", 5386)
    assert leap_address("5387") == ("::", 5387)
    assert leap_address("10.0.0.1:5386") == ("10.0.0.1", 5386)
    assert leap_address(":5386") == ("::", 5386)


def test_answers_leave_from_the_address_asked():
    """recvmsg's pktinfo -> (the destination, the cmsg that makes the answer leave from it)."""
    import socket

    v6 = socket.inet_pton(socket.AF_INET6, "fd00:b75::2") + (7).to_bytes(4, "little")
    dst, (level, kind, data) = _pktinfo([(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, v6)])
    assert dst == "fd00:b75::2" and (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)
    assert data == v6[:16] + bytes(4)  # any interface: the route decides
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.2") + bytes(4)
    assert _pktinfo([(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, mapped)])[0] == "10.0.0.2"
    v4 = (3).to_bytes(4, "little") + socket.inet_aton("10.0.0.9") + socket.inet_aton("10.0.0.2")
    dst, (level, kind, data) = _pktinfo([(socket.IPPROTO_IP, IP_PKTINFO, v4)])
    assert dst == "10.0.0.2" and data == bytes(4) + socket.inet_aton("10.0.0.2") + bytes(4)
    assert _pktinfo([]) is None and _pktinfo([(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, b"short")]) is None


def test_responder_replies_from_the_destination_address(tmp_path):
    """A dual-stack learner on a host with two addresses answers each from the one it was asked at."""
    import socket

    for bind, asks in (("::", ("127.0.0.1", "127.0.0.2", "::1")), ("0.0.0.0", ("127.0.0.3", "127.0.0.1"))):
        r = Responder({"key_dir": str(tmp_path / "r")}, host=bind, port=0, charon=False).start()
        try:
            for asked in asks:
                fam = socket.AF_INET6 if ":" in asked else socket.AF_INET
                with socket.socket(fam, socket.SOCK_DGRAM) as s:
                    s.settimeout(2)
                    s.sendto(wire.hello(os.urandom(16)), (asked, r.port))
                    data, frm = s.recvfrom(512)
                    assert wire.parse(data).type == wire.COOKIE and frm[0] == asked
        finally:
            r.stop()
