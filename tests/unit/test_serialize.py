"""Serialized iTokens: canonical, versioned, round-trip exactly, refuse anything else (draft 2)."""

from __future__ import annotations

import errno
import struct

import pytest

from btns_vici import IToken, SerializationError
from btns_vici.core.constants import Attr, AuthMethod, Setting
from btns_vici.core.serialize import MAGIC, MAX_SERIALIZED, VERSION


def sample() -> IToken:
    t = IToken.from_identity(
        authentication_method=AuthMethod.PKIX_TRUSTED,
        pub_key_id=bytes(range(256)) * 2,
        certificate_dn="CN=peer, O=Example",
        certificate_authority_dn="CN=Example CA",
        channel_binding="btns-cb-v1:spki-sha256:" + "ab" * 32,
        audit_string="id 'peer' — ünïcode ok",
    )
    t.set_auth_method(AuthMethod.EAP, Setting.ANY)
    return t


def test_round_trip_is_exact_and_canonical() -> None:
    t = sample()
    raw = t.to_bytes()
    assert raw.startswith(MAGIC + bytes([VERSION]))
    back = IToken.from_bytes(raw)
    assert back == t
    assert back.attributes() == t.attributes()
    assert back.to_bytes() == raw


def test_fresh_itoken_round_trips() -> None:
    t = IToken()
    assert IToken.from_bytes(t.to_bytes()).attributes() == t.attributes()
    assert t.to_bytes() == MAGIC + bytes([VERSION, 0])


def test_every_truncation_is_refused() -> None:
    raw = sample().to_bytes()
    for n in range(len(raw)):
        with pytest.raises(SerializationError) as e:
            IToken.from_bytes(raw[:n])
        assert e.value.errno == errno.EINVAL


def test_trailing_bytes_wrong_magic_wrong_version_oversize() -> None:
    raw = sample().to_bytes()
    for bad in (raw + b"\0", b"XXXX" + raw[4:], raw[:4] + bytes([2]) + raw[5:], b"\0" * (MAX_SERIALIZED + 1)):
        with pytest.raises(SerializationError):
            IToken.from_bytes(bad)


def _one(attr: int, value: bytes) -> bytes:
    return MAGIC + bytes([VERSION, 1]) + struct.pack(">HH", attr, len(value)) + value


def test_non_canonical_inputs_are_refused() -> None:
    two = MAGIC + bytes([VERSION, 2])
    rec_a = struct.pack(">HH", Attr.certificateDN, 1) + b"a"
    rec_b = struct.pack(">HH", Attr.auditString, 1) + b"b"
    for bad in (
        two + rec_a + rec_b,  # out of order
        two + rec_a + rec_a,  # repeated
        _one(Attr.authMeth_BTNS, struct.pack(">H", Setting.ANY)),  # default encoded
        _one(Attr.authMeth_BTNS, b"\x00\x01\x00"),  # integer of length 3
        _one(Attr.authMeth_BTNS, struct.pack(">H", 9)),  # not a switch value
        _one(Attr.auditString, b"\xff"),  # not UTF-8
        _one(Attr.auditString, b"a\0b"),  # embedded NUL
        _one(Attr.pubKeyID, b""),  # empty key
        _one(Attr.privacyProtected, b"\x00\x01"),  # a pToken attribute
        _one(999, b"x"),
    ):
        with pytest.raises(SerializationError):
            IToken.from_bytes(bad)


def test_non_bytes_is_einval() -> None:
    with pytest.raises(SerializationError):
        IToken.from_bytes("text")  # type: ignore[arg-type]
