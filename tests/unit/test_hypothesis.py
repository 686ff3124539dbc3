"""Random attribute ids, values, lengths and serialized bytes: only documented errors, ever."""

from __future__ import annotations

import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from btns_vici import IToken, PToken, capi
from btns_vici.core.serialize import MAGIC, VERSION

DOCUMENTED = {errno.EINVAL, errno.EPERM, errno.ENODATA, errno.EBADF, errno.ERANGE}
attr_ids = st.one_of(st.integers(-5, 64), st.integers(min_value=0, max_value=2**32 + 5))
values = st.one_of(st.binary(max_size=64), st.binary(min_size=2, max_size=2))


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([PToken, IToken]), attr=attr_ids, val=values, length=st.none() | st.integers(0, 80))
def test_random_get_set_only_documented_errors(kind: type, attr: int, val: bytes, length: int | None) -> None:
    tok = kind()
    try:
        capi.ipsec_set_token_attr(tok, attr, val)
    except OSError as exc:
        assert exc.errno in DOCUMENTED
    else:  # what was accepted reads back identically
        assert capi.ipsec_get_token_attr(tok, attr) == val or attr in (
            capi.IPSEC_API_ATTR_iToken,
            capi.IPSEC_API_ATTR_remote_iToken,
        )
    try:
        capi.ipsec_get_token_attr(tok, attr, length)
    except OSError as exc:
        assert exc.errno in DOCUMENTED


@settings(max_examples=600, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        t = IToken.from_bytes(data)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
    else:
        assert t.to_bytes() == data  # canonical: anything accepted re-encodes to itself


@settings(max_examples=600, deadline=None)
@given(body=st.binary(max_size=200), count=st.integers(0, 255))
def test_random_bodies_behind_a_valid_header(body: bytes, count: int) -> None:
    data = MAGIC + bytes([VERSION, count]) + body
    try:
        t = IToken.from_bytes(data)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
    else:
        assert t.to_bytes() == data


@settings(max_examples=200, deadline=None)
@given(
    strings=st.lists(st.text(max_size=40), min_size=1, max_size=3),
    key=st.binary(min_size=1, max_size=600),
)
def test_built_itokens_round_trip(strings: list[str], key: bytes) -> None:
    from btns_vici import AuthMethod

    clean = [s.replace("\0", "") for s in strings]
    try:
        t = IToken.from_identity(authentication_method=AuthMethod.BTNS, pub_key_id=key, certificate_dn=clean[0])
    except OSError as exc:  # e.g. lone surrogates are not UTF-8
        assert exc.errno == errno.EINVAL
        return
    assert IToken.from_bytes(t.to_bytes()) == t
