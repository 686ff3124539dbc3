"""Exceptions. Every error is an OSError carrying the errno the draft's C call would set.

The README's "Errors" table lists which call raises which errno and why.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import stat as _stat


class BtnsError(OSError):
    """Base class: an OSError with a precise errno and message (the draft's calls "return -1 on error
    and set errno accordingly", draft sections 2.2 and 2.3.4)."""

    default_errno = _errno.EINVAL

    def __init__(self, message: str, err: int | None = None) -> None:
        code = self.default_errno if err is None else err
        super().__init__(code, message)


class TokenAttributeError(BtnsError):
    """Unknown attribute for this token kind, or a value of wrong length/range (EINVAL; draft section 2.2,
    Figure 5)."""


class ReadOnlyAttributeError(BtnsError):
    """The attribute cannot be modified (EPERM): figure 4's ``iToken_attribute`` group of a pToken's
    iToken, and ``informationString`` (draft sections 2.1.2 and 2.3.2)."""

    default_errno = _errno.EPERM


class NoValueError(BtnsError):
    """The attribute has no value yet (ENODATA; ``ipsec_get_token_attr``, draft section 2.2, Figure 5)."""

    default_errno = _errno.ENODATA


class TokenFreedError(BtnsError):
    """The token was freed with ipsec_free_iToken/ipsec_free_pToken (EBADF; draft Figures 3 and 7)."""

    default_errno = _errno.EBADF


class SerializationError(BtnsError):
    """Bytes that are not a valid serialized iToken (EINVAL). The draft keeps the byte form opaque
    (section 2.1.1); this library's is in README "Serialized iTokens"."""


class BackendError(BtnsError):
    """No usable backend, or the IKE daemon is down, unreachable or answered nonsense (the "key
    management" that pTokens are handles to, draft section 2.3.1).

    The base of every daemon failure; the subclasses below carry the precise errno.
    A bare BackendError (ECONNREFUSED) means no backend answers at all.
    """

    default_errno = _errno.ECONNREFUSED


class DaemonDownError(BackendError, ConnectionRefusedError):
    """No daemon there: its control socket does not exist or nobody accepts on it (ECONNREFUSED; the
    key management of draft section 2.3.1 is down)."""

    default_errno = _errno.ECONNREFUSED


class DaemonTimeoutError(BackendError, TimeoutError):
    """The daemon did not complete the operation (connect, send, the whole reply) in time (ETIMEDOUT; the
    key management of draft section 2.3.1 hangs)."""

    default_errno = _errno.ETIMEDOUT


class DaemonAccessError(BackendError, PermissionError):
    """Not allowed to open the daemon's control socket; the message names the path and the access needed
    (EACCES; the key management of draft section 2.3.1 is out of reach)."""

    default_errno = _errno.EACCES


class ProtocolError(BackendError):
    """The daemon's reply is malformed or oversized; the message says what was wrong (EPROTO; from the key
    management of draft section 2.3.1)."""

    default_errno = _errno.EPROTO


class CommandFailedError(BackendError):
    """The daemon understood the command and reported failure (EIO); its message is in ours (the key
    management of draft section 2.3.1)."""

    default_errno = _errno.EIO


#: The more specific a daemon failure, the higher: the default selection reports the highest one.
SPECIFICITY = (BackendError, DaemonDownError, CommandFailedError, DaemonTimeoutError, ProtocolError, DaemonAccessError)


def specificity(exc: BaseException) -> int:
    """Rank of ``exc`` in :data:`SPECIFICITY` (the most derived class that matches)."""
    return max((i for i, cls in enumerate(SPECIFICITY) if isinstance(exc, cls)), default=-1)


class NotSupportedError(BtnsError):
    """A requirement the backend cannot meet (EOPNOTSUPP): a pToken's demand (draft section 2.3.2) that
    ``ipsec_set_socket_pToken`` (section 2.3.3, Figure 9) cannot enforce."""

    default_errno = _errno.EOPNOTSUPP


class RequirementNotMetError(BtnsError):
    """The protection of a socket or datagram does not meet the demanded pToken (EACCES; a pToken
    "can be used to enforce and negotiate required attribute values", draft section 2.3.2).

    ``problems`` lists each unmet requirement (:func:`btns_vici.core.requirements.unmet`),
    plus, when nothing protects it, why (``"why: ..."``). The message is ``refusal: p1; p2``.
    """

    default_errno = _errno.EACCES

    def __init__(self, refusal: str, problems: list[str] | tuple[str, ...], err: int | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__(f"{refusal}: " + "; ".join(self.problems), err)


class ProtectionLostError(BtnsError):
    """A latched connection lost or changed its protection (ECONNABORTED). Not in the draft: the pToken
    read with ``ipsec_get_socket_pToken`` (section 2.3.3) is held to for the connection's life
    (README "Connection latching")."""

    default_errno = _errno.ECONNABORTED


def access_problem(path: str) -> str:
    """Which access to the control socket ``path`` we lack: search (x) on a directory of its path,
    else write (w) on the socket itself (what connect() on an AF_UNIX socket needs)."""
    uid, gid = _os.geteuid(), _os.getegid()
    parts = _os.path.dirname(_os.path.abspath(path)).split(_os.sep)
    for i in range(1, len(parts) + 1):
        d = _os.sep.join(parts[:i]) or _os.sep
        if not _os.access(d, _os.X_OK, effective_ids=True):
            return f"search (x) permission on directory {d} ({_owner(d)}) is needed (we are uid {uid} gid {gid})"
    return f"write (w) permission on the socket is needed ({_owner(path)}; we are uid {uid} gid {gid})"


def _owner(path: str) -> str:
    try:
        st = _os.stat(path)
    except OSError:
        return "not readable"
    return f"mode {_stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}"
