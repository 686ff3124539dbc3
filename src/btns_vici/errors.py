"""Exceptions. Every error is an OSError carrying the errno the draft's C call would set.

The README's "Errors" table lists which call raises which errno and why.
"""

from __future__ import annotations

import errno as _errno


class BtnsError(OSError):
    """Base class: an OSError with a precise errno and message."""

    default_errno = _errno.EINVAL

    def __init__(self, message: str, err: int | None = None) -> None:
        code = self.default_errno if err is None else err
        super().__init__(code, message)


class TokenAttributeError(BtnsError):
    """Unknown attribute for this token kind, or a value of wrong length/range (EINVAL)."""


class ReadOnlyAttributeError(BtnsError):
    """The attribute cannot be modified (EPERM)."""

    default_errno = _errno.EPERM


class NoValueError(BtnsError):
    """The attribute has no value yet (ENODATA)."""

    default_errno = _errno.ENODATA


class TokenFreedError(BtnsError):
    """The token was freed with ipsec_free_iToken/ipsec_free_pToken (EBADF)."""

    default_errno = _errno.EBADF


class SerializationError(BtnsError):
    """Bytes that are not a valid serialized iToken (EINVAL)."""


class BackendError(BtnsError):
    """No usable backend, or the IKE daemon is down or answered nonsense."""

    default_errno = _errno.ECONNREFUSED


class ProtocolError(BackendError):
    """The daemon's reply is malformed (EPROTO)."""

    default_errno = _errno.EPROTO


class NotSupportedError(BtnsError):
    """A requirement the backend cannot meet (EOPNOTSUPP)."""

    default_errno = _errno.EOPNOTSUPP


class ProtectionLostError(BtnsError):
    """A latched connection lost or changed its protection (ECONNABORTED)."""

    default_errno = _errno.ECONNABORTED
