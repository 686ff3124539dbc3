"""Section 2.3.5: a test per bullet, and the rules README "Equivalence" writes down."""

from __future__ import annotations

import ipaddress

from btns_vici import IToken, PToken, capi
from btns_vici.core.constants import AuthMethod, Setting
from btns_vici.core.derive import ptoken_for
from btns_vici.core.records import ChildSA, DataplaneProof, Identity, IkeSA, Protection
from btns_vici.core.selectors import Flow, TrafficSelector

A, B = ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("10.99.0.2")
KEY_B = b"0*0\x05\x06\x03+ep\x03!\x00" + b"B" * 32
KEY_A = b"0*0\x05\x06\x03+ep\x03!\x00" + b"A" * 32
FLOW = Flow(6, A, 40000, B, 80)


def child(**kw: object) -> ChildSA:
    base = dict(
        name="c",
        uniqueid="1",
        reqid=1,
        state="INSTALLED",
        mode="TRANSPORT",
        protocol="ESP",
        spi_in=0xC0000001,
        spi_out=0xC0000002,
        encr_alg="AES_CBC",
        encr_keysize=128,
        integ_alg="HMAC_SHA2_256_128",
        local_ts=(TrafficSelector.from_network("10.99.0.1/32"),),
        remote_ts=(TrafficSelector.from_network("10.99.0.2/32"),),
        install_time=5,
    )
    base.update(kw)
    return ChildSA(**base)  # type: ignore[arg-type]


def ike(c: ChildSA, local_host=A, remote_host=B, remote_key=KEY_B, **kw: object) -> IkeSA:
    return IkeSA(
        backend="test",
        name="conn",
        uniqueid=str(kw.get("uid", 1)),
        version=2,
        state="ESTABLISHED",
        local_host=local_host,
        remote_host=remote_host,
        local=Identity("a", AuthMethod.BTNS, public_key=KEY_A),
        remote=Identity("b", AuthMethod.BTNS, public_key=remote_key),
        children=(c,),
        established=int(kw.get("established", 10)),  # type: ignore[arg-type]
    )


def token(c: ChildSA, **kw: object) -> PToken:
    sa = ike(c, **kw)
    proof = DataplaneProof("kernel-xfrm", f"state spi {c.spi_out:08x}", c.spi_out, c.reqid)
    return ptoken_for(Protection(FLOW, sa, c, proof))


def test_identical_sas_are_equivalent() -> None:
    assert capi.ipsec_cmp_pToken(token(child()), token(child())) == 0


def test_time_does_not_count() -> None:
    later = child(install_time=9999, uniqueid="7")
    assert capi.ipsec_cmp_pToken(token(child()), token(later, uid=5, established=1)) == 0


def test_spi_and_reqid_do_not_count() -> None:
    rekeyed = child(spi_in=0xC1111111, spi_out=0xC2222222, reqid=9)
    assert capi.ipsec_cmp_pToken(token(child()), token(rekeyed)) == 0


def test_algorithm_variant_of_equal_strength_does_not_count() -> None:
    ctr = child(encr_alg="AES_CTR")
    assert capi.ipsec_cmp_pToken(token(child()), token(ctr)) == 0


def test_outer_endpoints_do_not_count() -> None:
    moved = token(child(), local_host=ipaddress.ip_address("192.0.2.1"), remote_host=ipaddress.ip_address("192.0.2.2"))
    assert capi.ipsec_cmp_pToken(token(child()), moved) == 0


def test_jitter_performance_properties_do_not_count() -> None:
    # hardware vs software, counters: only bytes/packets differ
    busy = child(bytes_in=10**9, bytes_out=10**9, packets_in=10**6)
    assert capi.ipsec_cmp_pToken(token(child()), token(busy)) == 0


def test_different_strength_counts() -> None:
    assert capi.ipsec_cmp_pToken(token(child()), token(child(encr_keysize=256))) != 0
    assert capi.ipsec_cmp_pToken(token(child()), token(child(integ_alg="HMAC_SHA1_96"))) != 0


def test_different_spd_ranges_count() -> None:
    wider = child(remote_ts=(TrafficSelector.from_network("10.99.0.0/24"),))
    assert capi.ipsec_cmp_pToken(token(child()), token(wider)) != 0


def test_different_peer_or_mode_counts() -> None:
    assert capi.ipsec_cmp_pToken(token(child()), token(child(), remote_key=b"0" + b"X" * 43)) != 0
    assert capi.ipsec_cmp_pToken(token(child()), token(child(mode="TUNNEL"))) != 0


def test_descriptive_strings_do_not_count() -> None:
    p1, p2 = token(child()), token(child())
    p2.policy_name = "renamed"
    p2.audit_string = "other"
    assert p1 == p2


def test_templates_compare_by_attributes() -> None:
    p1, p2 = PToken(), PToken()
    assert p1 == p2
    p1.privacy_protected = Setting.LEVEL_HIGH
    assert p1 != p2
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p2.privacy_protected = Setting.LEVEL_HIGH
    p2.itoken = t
    assert p1 != p2
