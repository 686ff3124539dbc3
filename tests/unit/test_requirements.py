"""Does actual protection meet a demanded pToken (README "Requirements")."""

from __future__ import annotations

from btns_vici import AuthMethod, IToken, PToken, Setting, satisfies, unmet
from btns_vici.core.derive import unprotected_ptoken

from .test_equivalence import FLOW, KEY_B, child, token


def demand(**kw: Setting) -> PToken:
    p = PToken()
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_any_demands_nothing() -> None:
    assert satisfies(PToken(), unprotected_ptoken(FLOW, "none"))


def test_levels_are_floors() -> None:
    medium = token(child())  # AES-128 / SHA2-256: MEDIUM, MEDIUM
    assert satisfies(demand(privacy_protected=Setting.ENABLE), medium)
    assert satisfies(demand(privacy_protected=Setting.LEVEL_MEDIUM), medium)
    assert not satisfies(demand(privacy_protected=Setting.LEVEL_HIGH), medium)
    assert not satisfies(demand(integrity_protected=Setting.ENABLE), unprotected_ptoken(FLOW, "x"))
    assert unmet(demand(privacy_protected=Setting.LEVEL_HIGH), medium) == [
        "privacyProtected: required LEVEL_HIGH, have LEVEL_MEDIUM"
    ]


def test_disable_means_must_be_absent() -> None:
    assert not satisfies(demand(privacy_protected=Setting.DISABLE), token(child()))
    assert satisfies(demand(tunnel_mode=Setting.DISABLE), token(child()))
    assert not satisfies(demand(tunnel_mode=Setting.ENABLE), token(child()))


def test_pinned_peer_key() -> None:
    pin = PToken()
    pin.itoken = IToken.from_identity(authentication_method=AuthMethod.BTNS, pub_key_id=KEY_B)
    assert satisfies(pin, token(child()))
    assert not satisfies(pin, token(child(), remote_key=b"0" * 44))
    assert not satisfies(pin, unprotected_ptoken(FLOW, "x"))


def test_auth_method_switches() -> None:
    p = PToken()
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.DISABLE)
    p.itoken = t
    assert unmet(p, token(child())) == ["peer authenticated by BTNS, which is disabled"]
    t2 = IToken()
    t2.set_auth_method(AuthMethod.PKIX_TRUSTED, Setting.ENABLE)
    p.itoken = t2
    assert not satisfies(p, token(child()))
    t2.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t2
    assert satisfies(p, token(child()))


def test_pinned_raw_key_counts_as_leap_of_faith() -> None:
    p = PToken()
    t = IToken.from_identity(authentication_method=AuthMethod.BTNS, pub_key_id=KEY_B)
    for m in AuthMethod:
        t.set_auth_method(m, Setting.ANY)
    t.set_auth_method(AuthMethod.LEAPOFFAITH, Setting.ENABLE)
    p.itoken = t
    assert satisfies(p, token(child()))
    assert not satisfies(p, token(child(), remote_key=b"0" * 44))
