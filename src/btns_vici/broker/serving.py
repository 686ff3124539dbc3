"""What every btnsd process that reads clients does: read a request, answer the hot one.

The main process (:class:`.server.Server`) and each worker (:class:`.workers.Worker`) read
their clients with this loop step: :meth:`Serving._readable` takes one packet; the hot request
(``get_socket_ptoken`` as its exact bytes, one descriptor) is answered by :meth:`Serving._hot`,
the one hot path of btnsd, whichever process runs it; anything else goes to the subclass's
``_request`` (the main process answers it, a worker forwards it to the main process).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..acquire import MARK_BIT as TRAP_MARK_BIT
from ..backend import Backend
from ..core.derive import ptoken_for, unprotected_ptoken
from ..core.errors import BtnsError
from ..core.records import NotCarried, Protection, SocketView
from ..core.tokens import PToken
from ..plugins import get_backend
from ..protection import with_use_reason
from ..sockets import inspect
from . import graveyard, protocol
from .answers import AnswerCache
from .policy import Config

log = logging.getLogger("btnsd")

#: The hot request's frame around its id (magic, version 1, kind request | id | length + payload).
_HOT_HEAD = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.REQUEST, 0, 0)[:4]
_HOT_TAIL = len(protocol.HOT_BODY).to_bytes(4, "big") + protocol.HOT_BODY
TRUNC = socket.MSG_CTRUNC | socket.MSG_TRUNC
_FD = struct.Struct("i")


@dataclass
class Client:
    sock: socket.socket
    pid: int
    uid: int
    gid: int
    gids: frozenset[int]
    ident: int
    last: float = field(default_factory=time.monotonic)
    tokens: float = 0.0
    refill: float = field(default_factory=time.monotonic)
    inflight: int = 0
    watching: Callable[[], None] | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    #: the main process's handle of the worker that reads this client (None: this process reads it)
    worker: Any = None

    def label(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


class Recorder(Protocol):
    """What the hot path records: :class:`.metrics.Metrics` (main) or :class:`.metrics.Tally` (worker)."""

    enabled: bool

    def query(self, op: str, answer: str, seconds: float) -> None: ...

    def error(self, kind: str) -> None: ...


class Serving:
    """Clients read by this process, its backends and their answer caches."""

    def __init__(self, config: Config, metrics: Recorder, backends: list[Backend] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.backends = (
            backends
            if backends is not None
            else [
                get_backend(o.get("name") or None, {k: v for k, v in o.items() if k != "name"}) for o in config.backends
            ]
        )
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        #: (id(verdict), flow, facts) -> (verdict, encoded answer); the verdict reference keeps ids unique
        self._answers: dict[tuple[Any, ...], tuple[Any, bytes]] = {}
        #: protected answers by socket view, valid until an SA or route event (broker/answers.py)
        self.answers = AnswerCache()

    # ---- what subclasses decide ----------------------------------------------------------------
    def _request(self, c: Client, data: bytes, fds: list[int], flags: int) -> None:
        """Any request but the hot one (takes ownership of ``fds``)."""
        raise NotImplementedError

    def _main_only(
        self, c: Client, key: tuple[int, int], view: SocketView | None, data: bytes, fd: int
    ) -> dict[str, Any] | bytes | None:
        """The hot request for a socket only the main process can answer (unconnected: its
        attached demand; kernel-XFRM trap-marked: the ACQUIRE responder's state, e.g. why a
        ``btns:use`` attempt left it clear): its answer, or None when handed on (``fd`` stays the
        caller's to close)."""
        raise NotImplementedError

    def _drop(self, c: Client) -> None:
        raise NotImplementedError

    # ---- backends ------------------------------------------------------------------------------
    def backend_for(self, ns: tuple[int, int] | None) -> Backend | None:
        """The backend that speaks for the namespace ``ns`` (None: no backend does)."""
        if ns is None:
            return None
        for be in self.backends:
            if be.netns_id == ns:
                return be
        return None

    def _backend_or_unprotected(self, view: SocketView) -> Backend | PToken:
        be = self.backend_for(view.netns)
        if be is None:
            where = f"net:[{view.netns[1]}]" if view.netns else "an unreadable namespace"
            return unprotected_ptoken(view.flow, f"btnsd has no backend for the socket's namespace {where}")
        return be

    # ---- reading ---------------------------------------------------------------------------------
    def _readable(self, c: Client) -> None:
        fds: list[int] = []
        try:
            data, anc, flags, _ = c.sock.recvmsg(protocol.MAX_FRAME + 1, socket.CMSG_SPACE(4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if len(anc) == 1 and anc[0][0] == socket.SOL_SOCKET and anc[0][1] == socket.SCM_RIGHTS and len(anc[0][2]) == 4:
            fds.append(_FD.unpack(anc[0][2])[0])  # the usual case: one descriptor
        else:
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
        if not data and not anc:
            self._drop(c)  # the client went away
            return
        c.last = time.monotonic()
        if fds and not all(graveyard.is_socket(fd) for fd in fds):
            self._not_sockets(c, data, fds, flags)
            return
        try:
            if len(fds) == 1 and data[:4] == _HOT_HEAD and data[8:] == _HOT_TAIL and not flags & TRUNC:
                self._hot(c, data, fds[0])  # get_socket_ptoken, nothing else
            else:
                self._request(c, data, fds, flags)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    def _not_sockets(self, c: Client, data: bytes, fds: list[int], flags: int) -> None:
        """A request that brought a descriptor that is not a socket: ENOTSOCK (EMSGSIZE when it was
        truncated too), and that descriptor closed on the graveyard's thread, never here (a hung
        file system's file would block the loop for good: graveyard); the client is dropped when
        too many already wait there."""
        others = [fd for fd in fds if not graveyard.is_socket(fd)]
        for fd in fds:
            if fd not in others:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.metrics.error("not_a_socket")
        room = graveyard.bury(others)
        try:
            ident = protocol.split(data, protocol.REQUEST)[0]
        except OSError:
            ident = 0
        if flags & TRUNC:
            why = f"request truncated: at most one descriptor and {protocol.MAX_FRAME} bytes per request"
            err = BtnsError(why, errno.EMSGSIZE)
        else:
            err = BtnsError("btnsd takes sockets only: a descriptor sent is not a socket", errno.ENOTSOCK)
        self._send(c, protocol.error(ident, err))
        if not room:
            log.warning(
                "dropping client %s: %d non-socket descriptors wait to be closed", c.label(), graveyard.pending()
            )
            self._drop(c)

    def _hot(self, c: Client, data: bytes, fd: int) -> None:
        """The hot request (protocol.HOT_BODY with one descriptor: what the main process's generic
        request path would do for it, without its generic steps): rate limit, answer, frame,
        close, send. The same function in the main process and in every worker."""
        ident = int.from_bytes(data[4:8], "big")
        t0 = time.perf_counter()
        answer = "ok"
        try:
            self._ratelimit(c)
        except OSError as exc:  # as the generic path does
            self.metrics.error("bad_request")
            os.close(fd)
            self._send(c, protocol.error(ident, exc))
            return
        frame = b""
        try:
            key, view = inspect(fd)
            if view is None or view.mark & TRAP_MARK_BIT:
                result = self._main_only(c, key, view, data, fd)
            else:
                result = self.socket_answer(view)
            if result is not None:
                body = result if isinstance(result, bytes) else protocol.ok_body(result)
                frame = protocol.frame(protocol.RESPONSE, ident, body)
        except OSError as exc:
            answer = errno.errorcode.get(exc.errno or 0, "error")
            frame = protocol.error(ident, exc)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # as the generic path does
            answer = "EINVAL"
            frame = protocol.error(ident, BtnsError(f"malformed get_socket_ptoken arguments: {exc}", errno.EINVAL))
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        if not frame:
            return  # handed on: the process that answers counts it
        if self.metrics.enabled:
            self.metrics.query("get_socket_ptoken", answer, time.perf_counter() - t0)
        self._send(c, frame)

    def _ratelimit(self, c: Client) -> None:
        q = self.config.quota
        now = time.monotonic()
        c.tokens = min(float(q.burst), c.tokens + (now - c.refill) * q.requests_per_second)
        c.refill = now
        if c.tokens < 1.0:
            raise BtnsError(f"request rate over {q.requests_per_second}/s for uid {c.uid}", errno.EAGAIN)
        c.tokens -= 1.0

    def socket_answer(self, view: SocketView) -> dict[str, Any] | bytes:
        """The get_socket_ptoken answer for a connected socket's view (encoded when it is the body)."""
        be = self._backend_or_unprotected(view)
        if isinstance(be, PToken):
            return {"ptoken": protocol.ptoken_to_wire(be)}
        body, stamp = self.answers.get(be, view)  # the same view, no SA or route event since: the same answer
        if body is not None:
            return body
        verdict = be.protect(view)
        body = self._answer(view, verdict)
        if isinstance(verdict, Protection):
            self.answers.put(stamp, body)
        return body

    def _answer(self, view: SocketView, verdict: Protection | NotCarried) -> bytes:
        """The encoded answer for ``view``: the same verdict objects (nothing changed) give the same bytes."""
        # Protection objects are made per call; their parts are the backend's memoized records.
        parts = (verdict.ike_sa, verdict.child_sa, verdict.proof) if isinstance(verdict, Protection) else (verdict,)
        key = (*(id(p) for p in parts), view.flow, view.facts())
        hit = self._answers.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], parts, strict=True)):
            return hit[1]
        if isinstance(verdict, NotCarried):
            tok = unprotected_ptoken(view.flow, f"{verdict.reason} [socket {view.facts()}]")
            if view.mark & TRAP_MARK_BIT:  # (a reason that may come later: never cached)
                return protocol.ok_body({"ptoken": protocol.ptoken_to_wire(with_use_reason(view, tok))})
        else:
            tok = ptoken_for(verdict)
        body = protocol.ok_body({"ptoken": protocol.ptoken_to_wire(tok)})
        if len(self._answers) >= 4096:
            self._answers.clear()
        self._answers[key] = (parts, body)
        return body

    def _send(self, c: Client, frame: bytes) -> None:
        with c.send_lock:
            if c.closed:
                return
            try:
                c.sock.send(frame)
                return
            except BlockingIOError:
                pass  # a client that does not read its answers is dropped below
            except OSError:
                pass
        self._drop(c)
