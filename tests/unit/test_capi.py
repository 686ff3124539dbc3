"""The draft's functions (figures 2-12) through btns_vici.capi, as a C programmer would use them."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys

import pytest

from btns_vici import capi
from btns_vici.capi import (
    IPSEC_API_ATTR_ANY,
    IPSEC_API_ATTR_DISABLE,
    IPSEC_API_ATTR_ENABLE,
    IPSEC_API_ATTR_LEVEL_HIGH,
    IPSEC_API_ATTR_LEVEL_LOW,
    IPSEC_API_ATTR_LEVEL_MEDIUM,
    ipsec_cmp_pToken,
    ipsec_create_iToken,
    ipsec_create_pToken,
    ipsec_dup_pToken,
    ipsec_free_iToken,
    ipsec_free_pToken,
    ipsec_get_token_attr,
    ipsec_set_token_attr,
)
from btns_vici.core.constants import Attr, AuthMethod

U16 = struct.Struct("=H")

FIG4_ITOKEN = [
    "auditString",
    "authenticationMethod",
    "certificateAuthorityDN",
    "certificateDN",
    "pubKeyID",
    "channelBinding",
]
FIG4_AUTH = [
    "NONE",
    "BTNS",
    "LEAPOFFFAITH",
    "PRESHAREDKEY",
    "GROUPKEY",
    "XAUTH",
    "EAP",
    "PKIX_TRUSTED",
    "PKIX_INLINE",
    "PKIX_OFFLINE",
]
FIG8 = [
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
]


def test_every_constant_of_figures_4_and_8_exists_with_draft_spelling() -> None:
    names = [f"IPSEC_API_ATTR_{n}" for n in FIG4_ITOKEN + FIG8]
    names += [f"IPSEC_API_ATTR_authMeth_{n}" for n in FIG4_AUTH]
    names += [f"IPSEC_API_ATTR_{n}" for n in ("ENABLE", "DISABLE", "ANY", "LEVEL_LOW", "LEVEL_MEDIUM", "LEVEL_HIGH")]
    for name in names:
        assert isinstance(getattr(capi, name), int), name
    assert capi.IPSEC_API_ATTR_authMeth_LEAPOFFFAITH == capi.IPSEC_API_ATTR_authMeth_LEAPOFFAITH


def test_attribute_values_are_distinct_and_auditstring_is_shared() -> None:
    attr_names = {f"IPSEC_API_ATTR_{n}" for n in FIG4_ITOKEN + FIG8}
    attr_names |= {f"IPSEC_API_ATTR_authMeth_{n}" for n in FIG4_AUTH if n != "LEAPOFFFAITH"}
    attr_names.add("IPSEC_API_ATTR_authMeth_LEAPOFFAITH")
    values = [getattr(capi, n) for n in attr_names]
    assert len(values) == len(set(values)) == 25  # 6 + 10 + 10, auditString counted once
    assert 0 not in values  # a zeroed attr_type is never valid
    levels = [IPSEC_API_ATTR_LEVEL_LOW, IPSEC_API_ATTR_LEVEL_MEDIUM, IPSEC_API_ATTR_LEVEL_HIGH]
    assert levels == sorted(levels)
    assert len({IPSEC_API_ATTR_ENABLE, IPSEC_API_ATTR_DISABLE, IPSEC_API_ATTR_ANY, *levels}) == 6


def test_create_and_free_return_zero_and_double_free_is_ebadf() -> None:
    t = ipsec_create_iToken()
    p = ipsec_create_pToken()
    assert ipsec_free_iToken(t) == 0
    assert ipsec_free_pToken(p) == 0
    with pytest.raises(OSError) as e:
        ipsec_free_pToken(p)
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        ipsec_free_iToken(t)
    assert e.value.errno == errno.EBADF


def test_freed_token_attribute_access_is_ebadf() -> None:
    p = ipsec_create_pToken()
    ipsec_free_pToken(p)
    for call in (
        lambda: ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_privacyProtected),
        lambda: ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_privacyProtected, U16.pack(IPSEC_API_ATTR_ENABLE)),
        lambda: ipsec_dup_pToken(p),
        lambda: ipsec_cmp_pToken(p, ipsec_create_pToken()),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF


def test_ptoken_integers_are_two_octets_in_host_order() -> None:
    p = ipsec_create_pToken()
    assert ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_privacyProtected, U16.pack(IPSEC_API_ATTR_LEVEL_HIGH)) == 0
    raw = ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_privacyProtected)
    assert raw == IPSEC_API_ATTR_LEVEL_HIGH.to_bytes(2, sys.byteorder)
    # fresh switches read ANY: "the application relies on the system defaults"
    assert U16.unpack(ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_tunnelMode))[0] == IPSEC_API_ATTR_ANY


@pytest.mark.parametrize("length", [0, 1, 3, 4, 8])
def test_wrong_length_integer_is_einval(length: int) -> None:
    p = ipsec_create_pToken()
    with pytest.raises(OSError) as e:
        ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_integrityProtected, b"\x01" * length)
    assert e.value.errno == errno.EINVAL


def test_out_of_range_values_are_einval() -> None:
    p = ipsec_create_pToken()
    t = ipsec_create_iToken()
    for tok, attr, value in (
        (p, capi.IPSEC_API_ATTR_privacyProtected, 6),
        (p, capi.IPSEC_API_ATTR_tunnelMode, IPSEC_API_ATTR_LEVEL_HIGH),  # a switch has no levels
        (t, capi.IPSEC_API_ATTR_authMeth_BTNS, IPSEC_API_ATTR_LEVEL_LOW),
        (t, capi.IPSEC_API_ATTR_authMeth_EAP, 0xFFFF),
    ):
        with pytest.raises(OSError) as e:
            ipsec_set_token_attr(tok, attr, U16.pack(value))
        assert e.value.errno == errno.EINVAL


def test_unknown_attribute_or_wrong_kind_is_einval() -> None:
    p = ipsec_create_pToken()
    t = ipsec_create_iToken()
    for tok, attr in (
        (p, 0),
        (p, 999),
        (t, 12345),
        (p, -1),
        (p, 2**32),
        (p, capi.IPSEC_API_ATTR_pubKeyID),
        (t, capi.IPSEC_API_ATTR_privacyProtected),
        (p, capi.IPSEC_API_ATTR_authMeth_BTNS),
        (t, capi.IPSEC_API_ATTR_informationString),
    ):
        with pytest.raises(OSError) as e:
            ipsec_get_token_attr(tok, attr)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            ipsec_set_token_attr(tok, attr, U16.pack(1))
        assert e.value.errno == errno.EINVAL


def test_strings_are_nul_terminated() -> None:
    p = ipsec_create_pToken()
    ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_policyName, b"web-servers\0")
    assert ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_policyName) == b"web-servers\0"
    for bad in (b"no-nul", b"two\0nuls\0", b"\xff\xfe\0", b""):
        with pytest.raises(OSError) as e:
            ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_policyName, bad)
        assert e.value.errno == errno.EINVAL


def test_read_only_attributes_are_eperm() -> None:
    p = ipsec_create_pToken()
    with pytest.raises(OSError) as e:
        ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_informationString, b"forged\0")
    assert e.value.errno == errno.EPERM
    t = ipsec_create_iToken()
    for name, val in (
        ("auditString", b"x\0"),
        ("authenticationMethod", U16.pack(AuthMethod.BTNS)),
        ("certificateAuthorityDN", b"CN=x\0"),
        ("certificateDN", b"CN=y\0"),
        ("pubKeyID", b"\x30\x00"),
        ("channelBinding", b"cb\0"),
    ):
        with pytest.raises(OSError) as e:
            ipsec_set_token_attr(t, getattr(capi, f"IPSEC_API_ATTR_{name}"), val)
        assert e.value.errno == errno.EPERM, name


def test_attribute_without_value_is_enodata() -> None:
    p = ipsec_create_pToken()
    t = ipsec_create_iToken()
    for tok, attr in (
        (p, capi.IPSEC_API_ATTR_policyName),
        (p, capi.IPSEC_API_ATTR_iToken),
        (p, capi.IPSEC_API_ATTR_remote_iToken),
        (p, capi.IPSEC_API_ATTR_informationString),
        (p, capi.IPSEC_API_ATTR_auditString),
        (t, capi.IPSEC_API_ATTR_pubKeyID),
        (t, capi.IPSEC_API_ATTR_channelBinding),
        (t, capi.IPSEC_API_ATTR_authenticationMethod),
    ):
        with pytest.raises(OSError) as e:
            ipsec_get_token_attr(tok, attr)
        assert e.value.errno == errno.ENODATA


def test_itoken_auth_switches_default_any_and_are_writable() -> None:
    t = ipsec_create_iToken()
    for m in AuthMethod:
        assert U16.unpack(ipsec_get_token_attr(t, int(m)))[0] == IPSEC_API_ATTR_ANY
    ipsec_set_token_attr(t, capi.IPSEC_API_ATTR_authMeth_BTNS, U16.pack(IPSEC_API_ATTR_ENABLE))
    ipsec_set_token_attr(t, capi.IPSEC_API_ATTR_authMeth_LEAPOFFFAITH, U16.pack(IPSEC_API_ATTR_DISABLE))
    assert U16.unpack(ipsec_get_token_attr(t, capi.IPSEC_API_ATTR_authMeth_BTNS))[0] == IPSEC_API_ATTR_ENABLE
    assert U16.unpack(ipsec_get_token_attr(t, capi.IPSEC_API_ATTR_authMeth_LEAPOFFAITH))[0] == 0


def test_object_attributes_take_and_give_serialized_itokens() -> None:
    from btns_vici import IToken

    peer = IToken.from_identity(authentication_method=AuthMethod.BTNS, pub_key_id=b"\x30\x2a" + b"k" * 42)
    p = ipsec_create_pToken()
    ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_iToken, peer.to_bytes())
    raw = ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_iToken)
    assert raw == peer.to_bytes()
    assert IToken.from_bytes(raw) == peer
    with pytest.raises(OSError) as e:
        ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_remote_iToken, b"garbage")
    assert e.value.errno == errno.EINVAL


def test_get_with_short_attr_len_is_erange() -> None:
    p = ipsec_create_pToken()
    ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_policyName, b"abcdef\0")
    assert ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_policyName, 7) == b"abcdef\0"
    with pytest.raises(OSError) as e:
        ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_policyName, 6)
    assert e.value.errno == errno.ERANGE


def test_set_null_attr_val_is_einval() -> None:
    with pytest.raises(OSError) as e:
        ipsec_set_token_attr(ipsec_create_pToken(), capi.IPSEC_API_ATTR_policyName, None)  # type: ignore[arg-type]
    assert e.value.errno == errno.EINVAL


def test_dup_is_independent_and_equivalent() -> None:
    p = ipsec_create_pToken()
    ipsec_set_token_attr(p, capi.IPSEC_API_ATTR_privacyProtected, U16.pack(IPSEC_API_ATTR_LEVEL_MEDIUM))
    d = ipsec_dup_pToken(p)
    assert d is not p and ipsec_cmp_pToken(p, d) == 0
    ipsec_set_token_attr(d, capi.IPSEC_API_ATTR_privacyProtected, U16.pack(IPSEC_API_ATTR_LEVEL_HIGH))
    assert ipsec_cmp_pToken(p, d) != 0
    assert U16.unpack(ipsec_get_token_attr(p, capi.IPSEC_API_ATTR_privacyProtected))[0] == IPSEC_API_ATTR_LEVEL_MEDIUM
    ipsec_free_pToken(p)
    assert ipsec_get_token_attr(d, capi.IPSEC_API_ATTR_privacyProtected)  # the copy survives its origin


def test_token_functions_reject_non_tokens_with_typeerror() -> None:
    with pytest.raises(TypeError):
        ipsec_get_token_attr(object(), capi.IPSEC_API_ATTR_policyName)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ipsec_cmp_pToken(ipsec_create_iToken(), ipsec_create_pToken())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ipsec_free_pToken(ipsec_create_iToken())  # type: ignore[arg-type]


def test_socket_functions_validate_the_fd_first(tmp_path) -> None:
    p = ipsec_create_pToken()
    s = socket.socket()
    s.close()
    for fn in (capi.ipsec_get_socket_pToken, capi.ipsec_set_socket_pToken):
        with pytest.raises(OSError) as e:
            fn(s, p)
        assert e.value.errno == errno.EBADF
        with pytest.raises(OSError) as e:
            fn(987654, p)
        assert e.value.errno == errno.EBADF
        f = open(tmp_path / "x", "w")
        try:
            with pytest.raises(OSError) as e:
                fn(f.fileno(), p)
            assert e.value.errno == errno.ENOTSOCK
        finally:
            f.close()
        r, w = os.pipe()
        try:
            with pytest.raises(OSError) as e:
                fn(r, p)
            assert e.value.errno == errno.ENOTSOCK
        finally:
            os.close(r)
            os.close(w)


def test_socket_functions_non_inet_socket_is_eafnosupport() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(OSError) as e:
            capi.ipsec_get_socket_pToken(a, ipsec_create_pToken())
        assert e.value.errno in (errno.EAFNOSUPPORT, errno.ENOTCONN)


def test_get_socket_ptoken_on_unconnected_socket_without_ptoken_is_enotconn() -> None:
    with socket.socket() as s:
        with pytest.raises(OSError) as e:
            capi.ipsec_get_socket_pToken(s, ipsec_create_pToken())
        assert e.value.errno == errno.ENOTCONN


def test_attribute_enum_matches_capi() -> None:
    for a in Attr:
        assert getattr(capi, f"IPSEC_API_ATTR_{a.name}") == a
