"""The pythonic API: sockets in, verified tokens out (draft sections 2.3.3 and 2.3.4).

``get_socket_ptoken`` answers "is this socket protected, by what, and who is on
the other end?" from the selected backend; a flow counts as protected only when
the IKE daemon has an installed CHILD_SA for it AND the data plane proves it
carries it. Anything less yields a pToken with privacy and integrity DISABLE.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Mapping

from .backend import Backend
from .derive import ptoken_for, unprotected_ptoken
from .errors import BackendError, BtnsError, NotSupportedError
from .plugins import get_backend
from .selectors import Flow
from .sockets import FileDescriptorLike, flow_of, is_connected, resolve_fd, socket_key
from .tokens import PToken

BackendLike = Backend | str | None

_lock = threading.Lock()
_default: Backend | None = None
#: pTokens attached with set_socket_ptoken, by socket identity (per process, as the draft says).
_attached: dict[tuple[int, int], PToken] = {}


def resolve_backend(backend: BackendLike = None, options: Mapping[str, str] | None = None) -> Backend:
    """A Backend from an instance, a name, or the process default (selected once, see plugins)."""
    global _default
    if isinstance(backend, Backend):
        return backend
    if backend is not None or options:
        return get_backend(backend, options)
    with _lock:
        if _default is None:
            _default = get_backend()
        return _default


def set_default_backend(backend: BackendLike, options: Mapping[str, str] | None = None) -> Backend:
    """Choose the backend used when none is passed explicitly."""
    global _default
    chosen = resolve_backend(backend, options) if backend is not None or options else None
    with _lock:
        _default = chosen
    return chosen  # type: ignore[return-value]


def ptoken_for_flow(flow: Flow, backend: BackendLike = None) -> PToken:
    """The verified pToken of one flow (used for sockets and datagrams alike)."""
    be = resolve_backend(backend)
    protection = be.find_protection(flow)
    if protection is None:
        return unprotected_ptoken(
            flow, f"no CHILD_SA verified in both {be.name} and the data plane covers it"
        )
    return ptoken_for(protection)


def get_socket_ptoken(sock: FileDescriptorLike, backend: BackendLike = None) -> PToken:
    """The protection of a socket (draft 2.3.3, ``ipsec_get_socket_pToken``).

    A connected socket gets the pToken of its flow, verified now. An unconnected
    socket gets the pToken attached with :func:`set_socket_ptoken`, or ENOTCONN.
    """
    resolve_fd(sock)
    if not is_connected(sock):
        attached = _attached.get(socket_key(sock))
        if attached is None:
            raise BtnsError("socket is not connected and has no pToken attached", errno.ENOTCONN)
        return attached.copy()
    from .latch import latched  # latch builds on this module

    lt = latched(sock)
    if lt is not None:
        return lt.check()  # ProtectionLostError once the latch broke
    return ptoken_for_flow(flow_of(sock), backend)


def set_socket_ptoken(sock: FileDescriptorLike, ptoken: PToken, backend: BackendLike = None) -> None:
    """Attach ``ptoken`` to a socket so its requirements are enforced (draft 2.3.3)."""
    resolve_fd(sock)
    ptoken._check_live()
    try:
        be = resolve_backend(backend)
    except BackendError as exc:
        raise BackendError(f"ipsec_set_socket_pToken needs a running IKE daemon: {exc.strerror}") from None
    try:
        be.enforce(sock, ptoken)
    except NotSupportedError:
        raise
    _attached[socket_key(sock)] = ptoken.copy()


def attached_ptoken(sock: FileDescriptorLike) -> PToken | None:
    """The pToken attached to ``sock`` with set_socket_ptoken, if any (a copy)."""
    tok = _attached.get(socket_key(sock))
    return tok.copy() if tok else None
