"""The library's Python side without C: handle table and errno mapping (btns_vici.cabi._runtime)."""

from __future__ import annotations

import errno

import pytest

from btns_vici import IToken, PToken
from btns_vici.cabi._runtime import (
    HANDLE_BASE_32,
    HANDLE_BASE_64,
    KIND_ITOKEN,
    KIND_PTOKEN,
    HandleTable,
    errno_of,
)
from btns_vici.core.errors import BackendError, BtnsError, NoValueError, TokenFreedError


def test_handles_are_unique_never_reused_and_never_small() -> None:
    table = HandleTable(8)
    first = table.add(PToken())
    table.pop(first)
    second = table.add(PToken())
    assert second != first and min(first, second) > HANDLE_BASE_64
    with pytest.raises(TokenFreedError) as exc:
        table.get(first)
    assert exc.value.errno == errno.EBADF
    assert len(table) == 1


def test_handles_fit_32_bit_pointers() -> None:
    table = HandleTable(4)
    h = table.add(IToken())
    assert HANDLE_BASE_32 < h < 2**32


def test_unknown_and_freed_handles_are_ebadf() -> None:
    table = HandleTable()
    tok = PToken()
    h = table.add(tok)
    for bogus in (0, 1, 0xDEADBEEF, h + 1, h - 16):
        with pytest.raises(OSError) as exc:
            table.get(bogus)
        assert exc.value.errno == errno.EBADF
    tok.free()
    with pytest.raises(OSError) as exc:
        table.get(h)
    assert exc.value.errno == errno.EBADF


def test_wrong_kind_is_einval() -> None:
    table = HandleTable()
    hp, hi = table.add(PToken()), table.add(IToken())
    assert isinstance(table.get(hp, KIND_PTOKEN), PToken)
    assert isinstance(table.get(hi, KIND_ITOKEN), IToken)
    for handle, kind in ((hp, KIND_ITOKEN), (hi, KIND_PTOKEN)):
        with pytest.raises(BtnsError) as exc:
            table.get(handle, kind)
        assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NoValueError("x"), errno.ENODATA),
        (BackendError("down"), errno.ECONNREFUSED),
        (OSError(errno.ENOTSOCK, "not a socket"), errno.ENOTSOCK),
        (TypeError("wrong type"), errno.EINVAL),
        (ValueError("bad"), errno.EINVAL),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), errno.EINVAL),
        (MemoryError(), errno.ENOMEM),
        (RuntimeError("bug"), errno.EIO),
        (OSError("no errno"), errno.EIO),
    ],
)
def test_errno_of(exc: BaseException, code: int) -> None:
    assert errno_of(exc) == code
