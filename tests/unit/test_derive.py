"""Records -> tokens: the documented level table, channel bindings, fail-closed tokens."""

from __future__ import annotations

import ipaddress

import pytest

from btns_vici import AuthMethod, Setting
from btns_vici.core.derive import channel_binding, integrity_level, privacy_level, ptoken_for, unprotected_ptoken
from btns_vici.core.records import Identity

from .test_equivalence import FLOW, KEY_A, KEY_B, child, ike, token


@pytest.mark.parametrize(
    ("proto", "encr", "bits", "integ", "privacy", "integrity"),
    [
        ("ESP", "AES_CBC", 128, "HMAC_SHA2_256_128", Setting.LEVEL_MEDIUM, Setting.LEVEL_MEDIUM),
        ("ESP", "AES_CBC", 256, "HMAC_SHA2_512_256", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
        ("ESP", "AES_GCM_16", 128, None, Setting.LEVEL_MEDIUM, Setting.LEVEL_HIGH),
        ("ESP", "AES_GCM_8", 256, None, Setting.LEVEL_HIGH, Setting.LEVEL_LOW),
        ("ESP", "AES_CCM_12", 192, None, Setting.LEVEL_HIGH, Setting.LEVEL_MEDIUM),
        ("ESP", "CHACHA20_POLY1305", 256, None, Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
        ("ESP", "3DES", 192, "HMAC_SHA1_96", Setting.LEVEL_LOW, Setting.LEVEL_LOW),
        ("ESP", "NULL", None, "HMAC_SHA2_256_128", Setting.DISABLE, Setting.LEVEL_MEDIUM),
        ("ESP", "AES_GMAC", 128, None, Setting.DISABLE, Setting.LEVEL_HIGH),
        ("AH", None, None, "HMAC_SHA2_384_192", Setting.DISABLE, Setting.LEVEL_HIGH),
        ("ESP", "AES_CBC", 128, None, Setting.LEVEL_MEDIUM, Setting.DISABLE),
    ],
)
def test_level_table(proto, encr, bits, integ, privacy, integrity) -> None:
    c = child(protocol=proto, encr_alg=encr, encr_keysize=bits, integ_alg=integ)
    assert privacy_level(c) is privacy
    assert integrity_level(c) is integrity


def test_protected_ptoken_has_every_attribute() -> None:
    p = token(child(ipcomp_cpi_in=0x1234, mode="TUNNEL"))
    attrs = {a.name for a in p.attributes()}
    assert attrs == {
        "privacyProtected",
        "integrityProtected",
        "compressionAvailable",
        "policyName",
        "iToken",
        "remote_iToken",
        "tunnelMode",
        "ipoptionsProtected",
        "auditString",
        "informationString",
    }
    assert p.protected and p.compression_available is Setting.ENABLE and p.tunnel_mode is Setting.ENABLE
    assert p.ipoptions_protected is Setting.ENABLE
    assert p.itoken.pub_key_id == KEY_B and p.remote_itoken.pub_key_id == KEY_A  # type: ignore[union-attr]
    assert p.itoken.authentication_method is AuthMethod.BTNS  # type: ignore[union-attr]
    assert "c0000002" in p.audit_string  # type: ignore[operator]
    info = p.information_string or ""
    assert "key" not in info.lower() or "spki" not in info  # no key material, only names
    assert "ESP" in info and "kernel-xfrm" in info


def test_transport_esp_does_not_protect_ip_options() -> None:
    assert token(child()).ipoptions_protected is Setting.DISABLE
    assert token(child(protocol="AH", encr_alg=None, encr_keysize=None)).ipoptions_protected is Setting.ENABLE


def test_unprotected_ptoken_fails_closed() -> None:
    p = unprotected_ptoken(FLOW, "no SA")
    assert p.privacy_protected is Setting.DISABLE and p.integrity_protected is Setting.DISABLE
    assert p.itoken is None and not p.protected
    assert "NOT protected" in (p.information_string or "")


def test_channel_bindings() -> None:
    key = Identity("x", AuthMethod.BTNS, public_key=KEY_B)
    same_key_other_name = Identity("y", AuthMethod.PKIX_TRUSTED, public_key=KEY_B, certificate_dn="CN=y")
    assert channel_binding(key) == channel_binding(same_key_other_name)
    assert channel_binding(key).startswith("btns-cb-v1:spki-sha256:")  # type: ignore[union-attr]
    psk = channel_binding(Identity("peer@example", AuthMethod.PRESHAREDKEY))
    assert psk and psk.startswith("btns-cb-v1:psk-id-sha256:")
    assert channel_binding(Identity("%any", AuthMethod.BTNS)) is None  # NULL auth: nothing to bind


def test_both_ends_agree() -> None:
    a_side = ptoken_for(
        __import__("btns_vici.core.records", fromlist=["Protection"]).Protection(
            FLOW,
            ike(child()),
            child(),
            __import__("btns_vici.core.records", fromlist=["x"]).DataplaneProof("x", "y"),
        )
    )
    b_ike = ike(child(), local_host=ipaddress.ip_address("10.99.0.2"), remote_host=ipaddress.ip_address("10.99.0.1"))
    b_ike = b_ike.__class__(**{**b_ike.__dict__, "local": b_ike.remote, "remote": b_ike.local})
    from btns_vici.core.records import DataplaneProof, Protection

    b_side = ptoken_for(Protection(FLOW, b_ike, child(), DataplaneProof("x", "y")))
    assert a_side.itoken == b_side.remote_itoken and b_side.itoken == a_side.remote_itoken


def test_a_backends_peer_record_reaches_the_audit_string() -> None:
    """A NULL peer's known-peers verdict (libreswan's nullpeers) is in the pToken's auditString, not compared."""
    import dataclasses

    from btns_vici.core.records import DataplaneProof, Protection

    from .test_equivalence import ike

    c = child()
    plain = ike(c)
    noted = dataclasses.replace(plain, extra={"peer_record": "new-session: null-auth 10.0.0.2 claims 'ID_NULL'"})
    proof = DataplaneProof("kernel-xfrm", "state", c.spi_out, c.reqid)
    p_plain, p_noted = (ptoken_for(Protection(FLOW, sa, c, proof)) for sa in (plain, noted))
    assert "peer_record=\"new-session: null-auth 10.0.0.2 claims 'ID_NULL'\"" in (p_noted.audit_string or "")
    assert "peer_record" not in (p_plain.audit_string or "")
    assert p_plain == p_noted  # descriptive: equivalence ignores it
