"""The pythonic face of the same objects: typed properties, copy, equality."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

import btns_vici
from btns_vici import AuthMethod, IToken, Level, PToken, Setting, capi
from btns_vici.core.constants import Attr
from btns_vici.core.derive import restored_ptoken, unprotected_ptoken
from btns_vici.core.tokens import fill


def test_capi_returns_the_pythonic_objects() -> None:
    p = capi.ipsec_create_pToken()
    t = capi.ipsec_create_iToken()
    assert isinstance(p, PToken) and isinstance(t, IToken)
    p.privacy_protected = Level.LEVEL_HIGH
    assert capi.ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_privacyProtected) == int(Level.LEVEL_HIGH).to_bytes(
        2, "little" if __import__("sys").byteorder == "little" else "big"
    )


def test_typed_properties_round_trip() -> None:
    p = PToken()
    p.integrity_protected = Setting.ENABLE
    p.tunnel_mode = Setting.DISABLE
    p.compression_available = Setting.ANY
    p.ipoptions_protected = Setting.ENABLE
    p.policy_name = "db"
    p.audit_string = "mine"
    assert (p.integrity_protected, p.tunnel_mode, p.policy_name, p.audit_string) == (
        Setting.ENABLE,
        Setting.DISABLE,
        "db",
        "mine",
    )
    assert p.information_string is None and p.itoken is None and not p.protected
    with pytest.raises(AttributeError):
        p.information_string = "x"  # type: ignore[misc]


def test_property_validation_uses_the_same_errors() -> None:
    p = PToken()
    with pytest.raises(OSError) as e:
        p.tunnel_mode = Setting.LEVEL_HIGH
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        p.policy_name = "a\0b"
    with pytest.raises(OSError):
        p.itoken = "not a token"  # type: ignore[assignment]


def test_itoken_setter_copies_and_object_attribute_reads_back() -> None:
    t = IToken.from_identity(authentication_method=AuthMethod.PRESHAREDKEY, channel_binding="cb")
    p = PToken()
    p.itoken = t
    assert p.itoken == t and p.itoken is not t
    assert p.itoken.authentication_method is AuthMethod.PRESHAREDKEY
    assert p.itoken.auth_method(AuthMethod.PRESHAREDKEY) is Setting.ENABLE
    assert p.itoken.auth_method(AuthMethod.BTNS) is Setting.DISABLE


def test_copy_is_deep() -> None:
    p = PToken()
    p.itoken = IToken()
    c = p.copy()
    c.itoken.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)  # type: ignore[union-attr]
    assert p.itoken.auth_method(AuthMethod.BTNS) is Setting.ANY  # type: ignore[union-attr]
    assert c != p


def test_tokens_are_unhashable_because_mutable() -> None:
    with pytest.raises(TypeError):
        hash(PToken())
    with pytest.raises(TypeError):
        hash(IToken())


def test_freed_token_properties_raise_ebadf() -> None:
    p = PToken()
    p.free()
    with pytest.raises(OSError) as e:
        _ = p.privacy_protected
    assert e.value.errno == errno.EBADF
    assert repr(p) == "<PToken freed>" and p.freed


def test_itoken_identity_attributes_read_only_through_set_attr() -> None:
    t = IToken()
    with pytest.raises(OSError) as e:
        t.set_attr(Attr.pubKeyID, b"k")
    assert e.value.errno == errno.EPERM
    assert not t.has_identity


def test_restored_ptoken_carries_read_only_attributes_validated_and_copied() -> None:
    peer = IToken.from_identity(authentication_method=AuthMethod.PRESHAREDKEY, channel_binding="cb")
    p = restored_ptoken(
        {Attr.privacyProtected: Setting.LEVEL_HIGH, Attr.informationString: "from the broker", Attr.iToken: peer}
    )
    assert p.information_string == "from the broker" and p.privacy_protected is Setting.LEVEL_HIGH
    assert p.itoken == peer and p.itoken is not peer
    assert p.tunnel_mode is Setting.ANY  # the table's default for what is not given
    for bad in (
        {Attr.pubKeyID: b"k"},  # an iToken attribute on a pToken
        {Attr.tunnelMode: Setting.LEVEL_HIGH},  # a switch has no levels
        {Attr.informationString: "a\0b"},
        {Attr.iToken: "not a token"},
        {99: 1},
    ):
        with pytest.raises(OSError) as e:
            restored_ptoken(bad)  # type: ignore[arg-type]
        assert e.value.errno == errno.EINVAL


def test_typed_reads_setting_and_identity() -> None:
    p = unprotected_ptoken(None, "test")
    assert p.setting(Attr.integrityProtected) is Setting.DISABLE
    assert p.setting(Attr.policyName) is None and p.identity(Attr.iToken) is None
    t = IToken.from_identity(authentication_method=AuthMethod.EAP)
    assert t.setting(Attr.authMeth_EAP) is Setting.ENABLE
    assert t.setting(Attr.authenticationMethod) is None  # an AuthMethod, not a Setting


def test_fill_and_check_live_are_public() -> None:
    source, target = unprotected_ptoken(None, "x"), PToken()
    fill(target, source)
    assert target == source and target.information_string == source.information_string
    target.free()
    with pytest.raises(OSError) as e:
        target.check_live()
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError):
        fill(target, source)


PRIVATE = re.compile(r"\.(_attrs|_set_internal|_check_live|_rules|_from_attributes)\b")


def test_no_private_token_members_outside_the_core() -> None:
    """Outside core/tokens.py nothing touches a token's insides; only the core uses the privileged constructor."""
    src = Path(btns_vici.__file__).parent
    offenders = []
    roots = [src, src.parents[1] / "plugins", src.parents[1] / "tests"]
    for root in roots:
        for path in root.rglob("*.py"):
            if path == src / "core" / "tokens.py" or path == Path(__file__):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for match in PRIVATE.finditer(line):
                    if match.group(1) == "_from_attributes" and path.parent == src / "core":
                        continue
                    offenders.append(f"{path}:{number}: {line.strip()}")
    assert offenders == []
