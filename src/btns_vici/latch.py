"""Connection latching (the RFC 5660 model; draft section 3's downgrade attack).

Once a socket is protected, :func:`latch` records its verified pToken. From then
on the protection must stay at least as good, with the same peer identity: the
latched pToken is used as a demand (:mod:`btns_vici.core.requirements`). SA events
from the backend trigger a re-check; so does every :func:`check`. When the SA
disappears, or is replaced by one with another peer identity or weaker
protection, the latch breaks for good: the callback runs once, every later
query raises :class:`~btns_vici.core.errors.ProtectionLostError` (ECONNABORTED), and
if asked, the socket is destroyed in the kernel (sock_diag SOCK_DESTROY, see
:mod:`btns_vici.sockdestroy`: every process holding it sees ECONNABORTED on its next
call), or shut down where that is not allowed. A rekey to an equivalent SA does not break it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import forksafe, sockdestroy
from .authority import Authority, BackendLike, resolve_backend
from .backend import SAEvent
from .broker.client import BrokerClient
from .core.derive import unprotected_ptoken
from .core.errors import BtnsError, ProtectionLostError
from .core.requirements import unmet
from .core.selectors import Flow
from .core.tokens import PToken
from .protection import ptoken_of
from .sockets import FileDescriptorLike, flow_of, resolve_fd, socket_key, view_of

log = logging.getLogger(__name__)

#: Re-check delays after an event (seconds): the index may see the event a moment later.
RECHECK_DELAYS = (0.0, 0.05, 0.25)


@dataclass(frozen=True)
class LatchBroken:
    """Why a latch broke: delivered to the callback."""

    flow: Flow
    reasons: tuple[str, ...]
    latched: PToken
    current: PToken


class Latch:
    """The latched protection of one connected socket."""

    def __init__(
        self,
        sock: FileDescriptorLike,
        backend: Authority,
        on_break: Callable[[LatchBroken], None] | None = None,
        shutdown: bool = False,
        verified: PToken | None = None,
    ) -> None:
        self.fd = resolve_fd(sock)
        self.key = socket_key(sock)
        self.flow = flow_of(sock)
        self.backend = backend
        self.on_break = on_break
        self.shutdown = shutdown
        # ``verified``: the pToken this very socket was just verified with (finish_connect, accept),
        # not read a second time. Only a local backend's: btnsd must record the latch itself.
        self.latched = (
            verified.copy()
            if verified is not None and not isinstance(backend, BrokerClient)
            else _ptoken_now(sock, backend)
        )
        if not self.latched.protected:
            raise BtnsError(f"cannot latch {self.flow}: it is not protected", errno.EACCES)
        self.broken: LatchBroken | None = None
        #: How the connection was stopped when the latch broke: "destroyed" (SOCK_DESTROY: every
        #: holder gets ECONNABORTED), "shutdown" (no CAP_NET_ADMIN), "closed" (already gone), or "".
        self.how_stopped = ""
        self._lock = threading.Lock()

    def alive(self) -> bool:
        """False once the socket was closed (its fd gone or reused by another file)."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.key

    def check(self) -> PToken:
        """Re-verify now: the current pToken, or ProtectionLostError once the latch is broken."""
        with self._lock:
            if self.broken is None:
                current = self._current()
                reasons = unmet(self.latched, current, policy=False)
                if reasons:
                    self._break(LatchBroken(self.flow, tuple(reasons), self.latched.copy(), current))
                else:
                    return current
            assert self.broken is not None
            raise ProtectionLostError(f"protection of {self.flow} changed: " + "; ".join(self.broken.reasons))

    def _current(self) -> PToken:
        """The socket's pToken now, re-read from the socket itself (its mark or device may have changed)."""
        if not self.alive():
            return unprotected_ptoken(self.flow, "the socket was closed")
        try:
            view = view_of(self.fd)
        except OSError as exc:
            return unprotected_ptoken(self.flow, f"the socket cannot be inspected: {exc.strerror}")
        if isinstance(self.backend, BrokerClient):
            return self.backend.get_socket_ptoken(self.fd)
        return ptoken_of(view, self.backend)

    def _break(self, info: LatchBroken) -> None:
        self.broken = info  # first: whoever sees the connection end (asyncio's transport) finds it broken
        log.warning("latch broken for %s: %s", info.flow, "; ".join(info.reasons))
        if self.shutdown:
            self.how_stopped = _stop_socket(self.fd, self.key)
        if self.on_break is not None:
            try:
                self.on_break(info)
            except Exception:  # the application's callback must not kill the watcher
                log.exception("latch callback failed")


def _stop_socket(fd: int, key: tuple[int, int]) -> str:
    """End the latched connection for every holder: SOCK_DESTROY in the kernel (ECONNABORTED on
    everyone's next call, whatever the language); shutdown(2) when that is not possible here."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "closed"
    try:
        if socket_key(dup) != key:  # the fd was reused by another file: not ours to stop
            return "closed"
        try:
            sockdestroy.destroy(dup)
            return "destroyed"
        except OSError as exc:
            log.info("SOCK_DESTROY failed (%s): shutting the socket down instead", exc.strerror)
        with contextlib.suppress(OSError):
            dup.shutdown(socket.SHUT_RDWR)
        return "shutdown"
    finally:
        dup.close()


def _ptoken_now(sock: FileDescriptorLike, backend: Authority) -> PToken:
    if isinstance(backend, BrokerClient):
        return backend.latch(sock)  # btnsd records it too and pushes latch-broken (broker/latches.py)
    return ptoken_of(view_of(sock), backend)


class _Watcher:
    """One backend event watch shared by every latch on that backend."""

    def __init__(self, backend: Authority) -> None:
        self.backend = backend
        self.latches: dict[tuple[int, int], Latch] = {}
        self.lock = threading.Lock()
        self.stop = backend.watch(self._on_event)

    def _on_event(self, event: SAEvent) -> None:
        for delay in RECHECK_DELAYS:
            if delay:
                time.sleep(delay)
            with self.lock:
                for key in [k for k, lt in self.latches.items() if not lt.alive()]:
                    self.latches.pop(key, None)
                    _registry.pop(key, None)
                latches = [latch for latch in self.latches.values() if latch.broken is None]
            for latch in latches:
                with contextlib.suppress(OSError):
                    latch.check()


_watchers: dict[int, _Watcher] = {}
_registry: dict[tuple[int, int], Latch] = {}
_reg_lock = threading.Lock()


def latch(
    sock: FileDescriptorLike,
    backend: BackendLike = None,
    on_break: Callable[[LatchBroken], None] | None = None,
    shutdown: bool = False,
    verified: PToken | None = None,
) -> Latch:
    """Latch a connected, protected socket; see the module docstring.

    ``verified``: the pToken :func:`btns_vici.protection.require` has just given for this very
    connected socket (the wrappers' check after connect/accept), latched as is instead of being
    verified a second time (ignored for btnsd, which records the latch itself)."""
    be = resolve_backend(backend)
    lt = Latch(sock, be, on_break, shutdown, verified)
    with _reg_lock:
        watcher = _watchers.get(id(be))
        if watcher is None:
            watcher = _watchers[id(be)] = _Watcher(be)
        with watcher.lock:
            watcher.latches[lt.key] = lt
        _registry[lt.key] = lt
    return lt


def latched(sock: FileDescriptorLike) -> Latch | None:
    """The latch of ``sock``, if it has one."""
    return latch_of(socket_key(sock))


def latch_of(key: tuple[int, int]) -> Latch | None:
    """The latch of the socket whose identity (sockets.socket_key) is ``key``."""
    return _registry.get(key)


@forksafe.in_child
def _reset_after_fork() -> None:
    global _reg_lock
    _registry.clear()  # the watcher threads did not survive the fork; the parent keeps its latches
    _watchers.clear()
    _reg_lock = threading.Lock()


def forget(lt: Latch) -> None:
    """Drop the latch ``lt`` (its socket may already be closed: it is found by the latch's own key)."""
    with _reg_lock:
        if _registry.get(lt.key) is lt:
            _registry.pop(lt.key, None)
        watcher = _watchers.get(id(lt.backend))
        if watcher is not None:
            with watcher.lock:
                if watcher.latches.get(lt.key) is lt:
                    watcher.latches.pop(lt.key, None)


def unlatch(sock: FileDescriptorLike) -> None:
    """Stop latching ``sock`` (closed sockets are dropped by themselves at the next event)."""
    key = socket_key(sock)
    with _reg_lock:
        lt = _registry.pop(key, None)
        if lt is None:
            return
        watcher = _watchers.get(id(lt.backend))
        if watcher is not None:
            with watcher.lock:
                watcher.latches.pop(key, None)
    if isinstance(lt.backend, BrokerClient):
        with contextlib.suppress(OSError):
            lt.backend.unlatch(key)
