"""Who answers for a socket: a backend in this process, or btnsd (README "btnsd: the broker").

The process default is selected once (and again in a forked child): ``$BTNS_BROKER``, else
btnsd for a process without root when its socket exists, else the first backend whose
daemon answers (:func:`btns_vici.plugins.get_backend`), else btnsd when no backend can be
used from here.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping

from . import forksafe
from .backend import Backend
from .broker.client import BrokerClient
from .broker.policy import DEFAULT_SOCKET as DEFAULT_BROKER_SOCKET
from .core.errors import BackendError
from .plugins import get_backend

BackendLike = Backend | BrokerClient | str | None
#: What answers: a backend in this process, or btnsd (README "btnsd: the broker").
Authority = Backend | BrokerClient

_lock = threading.Lock()
_default: Authority | None = None


def resolve_backend(backend: BackendLike = None, options: Mapping[str, str] | None = None) -> Authority:
    """A Backend (or the broker) from an instance, a name, or the process default (selected once).

    The default: ``$BTNS_BROKER`` names btnsd's socket; else, for a process without root
    when btnsd's default socket exists, btnsd; else the first backend whose daemon answers
    (see plugins), and btnsd when none can be used from here (EACCES, ENOENT,
    ECONNREFUSED) and its socket exists.
    """
    global _default
    if isinstance(backend, (Backend, BrokerClient)):
        return backend
    if backend is not None or options:
        return get_backend(backend, options)
    with _lock:
        if _default is None:
            _default = _select_default()
        return _default


@forksafe.in_child
def _reset_after_fork() -> None:
    global _default, _lock
    _default = None
    _lock = threading.Lock()


def _select_default() -> Authority:
    path = os.environ.get("BTNS_BROKER")
    if path:
        return BrokerClient(path)
    if os.geteuid() != 0 and not os.environ.get("BTNS_BACKEND") and os.path.exists(DEFAULT_BROKER_SOCKET):
        return BrokerClient(DEFAULT_BROKER_SOCKET)
    try:
        return get_backend()
    except BackendError as exc:
        if exc.errno in (errno.EACCES, errno.ENOENT, errno.ECONNREFUSED) and os.path.exists(DEFAULT_BROKER_SOCKET):
            return BrokerClient(DEFAULT_BROKER_SOCKET)
        raise


def set_default_backend(backend: BackendLike, options: Mapping[str, str] | None = None) -> Authority | None:
    """Choose the backend used when none is passed explicitly (by the draft's calls too, which name
    none: the host's key management, draft section 2.3.1)."""
    global _default
    chosen = resolve_backend(backend, options) if backend is not None or options else None
    with _lock:
        _default = chosen
    return chosen
