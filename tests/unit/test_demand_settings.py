"""The draft's settings (issue 16, README "Demand settings") and the two-sided channel binding. Pure."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from btns_vici import AuthMethod, IToken, PToken, Setting, satisfies, unmet
from btns_vici.core.derive import (
    channel_binding,
    connection_binding,
    itoken_for,
    peer_key_binding,
    unprotected_ptoken,
)
from btns_vici.core.errors import BtnsError, NotSupportedError
from btns_vici.core.records import Identity
from btns_vici.core.requirements import USE_POLICY, is_no_demand, is_opportunistic, operator_policy
from btns_vici.guard import LIBIPSEC, XFRM
from btns_vici.hostkey import load_or_create
from btns_vici.strongswan import conns, enforce

from .test_equivalence import FLOW, KEY_A, KEY_B, child, token


def test_all_any_is_no_demand() -> None:
    p = PToken()
    assert is_no_demand(p)
    p.itoken = IToken()  # an iToken with every switch ANY constrains nothing
    assert is_no_demand(p)
    conns.check_supported(p, XFRM)
    conns.check_supported(p, LIBIPSEC)
    for attr, value in (
        ("privacy_protected", Setting.ENABLE),
        ("tunnel_mode", Setting.DISABLE),
        ("policy_name", "conn"),
    ):
        q = PToken()
        setattr(q, attr, value)
        assert not is_no_demand(q)
    q = PToken()
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    q.itoken = t
    assert not is_no_demand(q)


def test_use_is_met_in_clear_but_a_protected_connection_must_meet_it() -> None:
    p = PToken()
    p.policy_name = USE_POLICY
    p.privacy_protected = Setting.LEVEL_HIGH
    assert is_opportunistic(p) and operator_policy(p) is None
    assert satisfies(p, unprotected_ptoken(FLOW, "the peer cannot"))
    assert unmet(p, token(child())) == ["privacyProtected: required LEVEL_HIGH, have LEVEL_MEDIUM"]
    p.privacy_protected = Setting.LEVEL_MEDIUM
    assert satisfies(p, token(child()))


def test_esp_null_proposals_only_when_privacy_disable_is_demanded() -> None:
    p = PToken()
    p.privacy_protected = Setting.DISABLE
    p.integrity_protected = Setting.LEVEL_MEDIUM
    assert conns.esp_proposals(p) == ["null-sha384", "null-sha256"]
    conns.check_supported(p, XFRM)
    with pytest.raises(NotSupportedError, match="ESP-NULL"):
        conns.check_supported(p, LIBIPSEC)
    p.integrity_protected = Setting.ANY
    with pytest.raises(NotSupportedError):
        conns.check_supported(p, XFRM)  # privacy off, integrity not asked: no IPsec at all
    q = PToken()
    q.integrity_protected = Setting.ENABLE  # privacy ANY: never a NULL cipher
    assert not [n for n in conns.esp_proposals(q) if n.startswith("null")]
    # An ESP-NULL SA reads privacy DISABLE, integrity from the HMAC: it meets the demand.
    null_sa = token(child(encr_alg="NULL", encr_keysize=0))
    assert null_sa.protected and null_sa.privacy_protected == Setting.DISABLE
    p.integrity_protected = Setting.LEVEL_MEDIUM
    assert satisfies(p, null_sa)
    assert not satisfies(p, token(child()))  # encrypted: privacy must be absent


def test_policy_name_selects_and_is_checked() -> None:
    p = PToken()
    p.policy_name = "conn/c"
    assert operator_policy(p) == ("conn", "c")
    assert satisfies(p, token(child()))  # token(): IKE "conn", CHILD "c"
    p.policy_name = "conn"
    assert operator_policy(p) == ("conn", None) and satisfies(p, token(child()))
    p.policy_name = "other/c"
    assert unmet(p, token(child())) == ["policyName: required other/c, have conn/c"]
    assert unmet(p, token(child()), policy=False) == []  # latching compares protection, not names
    conns.check_supported(p, XFRM)  # the operator's connection decides proposals


def _write_key(directory: Path, name: str) -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    path = directory / name
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_remote_itoken_selects_our_key(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    host = load_or_create(d)
    alt = _write_key(d, "alt.key")
    opts = {"key_dir": str(d)}
    p = PToken()
    assert enforce.local_identity(p, opts).public_der == host.public_der
    p.remote_itoken = itoken_for(Identity("%any", AuthMethod.BTNS, public_key=alt))
    chosen = enforce.local_identity(p, opts)
    assert chosen.public_der == alt and chosen.path.name == "alt.key"
    p.remote_itoken = itoken_for(Identity("%any", AuthMethod.BTNS, public_key=KEY_A))
    with pytest.raises(BtnsError) as exc:
        enforce.local_identity(p, opts)
    assert exc.value.errno == errno.ENOKEY
    # A different local key is a different connection (charon must not reuse the other one's IKE_SA).
    q = PToken()
    names = {conns.conn_name("init", "a", "b", q, [KEY_B], XFRM, k) for k in (b"", alt)}
    assert len(names) == 2


def test_connection_binding_is_symmetric_and_canonical() -> None:
    a = Identity("a", AuthMethod.BTNS, public_key=KEY_A)
    b = Identity("b", AuthMethod.BTNS, public_key=KEY_B)
    c = Identity("c", AuthMethod.BTNS, public_key=KEY_B[:-1] + b"C")
    ab = connection_binding(a, b)
    assert ab is not None and ab.startswith("btns-cb-v2:endpoints-sha256:") and len(ab) == 28 + 64
    assert ab == connection_binding(b, a)  # both ends compute the same value
    assert ab != connection_binding(a, c) != connection_binding(b, c)
    # The IKE identity around a key does not matter; the key does.
    assert ab == connection_binding(Identity("other", AuthMethod.BTNS, public_key=KEY_A), b)
    # A PSK identity cannot be confused with a key of the same bytes.
    psk = Identity(KEY_B.decode("latin-1"), AuthMethod.PRESHAREDKEY)
    assert connection_binding(a, psk) not in (None, ab)
    assert connection_binding(a, Identity("%any", AuthMethod.BTNS)) is None  # NULL auth: nothing bound
    # The one-sided value keeps its documented name and format.
    assert peer_key_binding is channel_binding
    assert peer_key_binding(b).startswith("btns-cb-v1:spki-sha256:")  # type: ignore[union-attr]


def test_both_tokens_of_a_connection_carry_the_same_binding() -> None:
    tok = token(child())
    assert tok.itoken.channel_binding == tok.remote_itoken.channel_binding  # type: ignore[union-attr]
    assert "peer-key-binding btns-cb-v1:spki-sha256:" in (tok.itoken.audit_string or "")  # type: ignore[union-attr]
    # A host's exported identity is outside any connection: no binding, so pinning it pins the key only.
    assert load_or_create  # (hostkey.itoken() has no channelBinding)
    exported = itoken_for(Identity("%any", AuthMethod.BTNS, public_key=KEY_B))
    assert exported.channel_binding is None
    pin = PToken()
    pin.itoken = exported
    assert satisfies(pin, tok)
