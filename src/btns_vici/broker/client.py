"""The client side of btnsd: what the library uses when the process cannot ask a backend itself.

One SOCK_SEQPACKET connection per process (thread-safe; reconnected on the next call after
the daemon restarted), every request bounded by a deadline for the whole exchange. The
socket in question always travels as SCM_RIGHTS: the broker reads it itself and never
takes a client's word for its flow, device, mark or namespace.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from .. import forksafe
from ..core.errors import DaemonAccessError, DaemonDownError, DaemonTimeoutError
from ..core.tokens import PToken
from ..sockets import FileDescriptorLike, resolve_fd
from . import protocol
from .policy import DEFAULT_SOCKET

DEFAULT_TIMEOUT = 5.0
_FD = struct.Struct("i")
#: negotiations (prepare_connect: an IKE exchange) get longer
SLOW_TIMEOUT = 30.0


_clients: weakref.WeakSet[BrokerClient] = weakref.WeakSet()


@forksafe.in_child
def _reset_after_fork() -> None:
    for c in list(_clients):
        forksafe.close_quietly(c._sock)
        c._sock = None
        c._lock = threading.Lock()
        c._latched = {}  # the parent's latches (latch.py forgets them in the child too)


class BrokerClient:
    """btnsd at ``path``; the library's handle when it answers through the broker."""

    name = "btnsd"

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout if timeout is not None else float(os.environ.get("BTNS_BROKER_TIMEOUT", DEFAULT_TIMEOUT))
        self.options: Mapping[str, str] = {"broker": path}
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        #: socket identity -> descriptor of every socket latched through this client
        self._latched: dict[tuple[int, int], int] = {}
        _clients.add(self)

    def __repr__(self) -> str:
        return f"BrokerClient({self.path!r})"

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _connect(self, deadline: float) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            while True:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    s.connect(self.path)
                    break
                except BlockingIOError:  # the broker's backlog is full (a burst of clients): wait our turn
                    if time.monotonic() >= deadline:
                        raise TimeoutError from None
                    time.sleep(0.005)
        except TimeoutError:
            s.close()
            raise DaemonTimeoutError(f"btnsd at {self.path} did not accept in time", errno.ETIMEDOUT) from None
        except PermissionError:
            s.close()
            raise DaemonAccessError(
                f"not allowed to connect to btnsd at {self.path} (write access to the socket is needed)", errno.EACCES
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            s.close()
            raise DaemonDownError(f"btnsd does not answer at {self.path}: {exc.strerror}", exc.errno) from None
        # Blocking, with kernel timeouts: the hot exchange is one sendmsg and one recv, no poll.
        s.settimeout(None)
        limit = max(self.timeout, 0.001)  # a zero timeval would mean "wait forever"
        tv = struct.pack("@ll", int(limit), int((limit % 1) * 1e6))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        return s

    def request(
        self, op: str, fd: FileDescriptorLike | None = None, timeout: float | None = None, **args: Any
    ) -> dict[str, Any]:
        """One request and its answer (the result object), or the OSError the broker answered."""
        num = resolve_fd(fd) if fd is not None else None
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                if self._sock is None:
                    self._sock = self._connect(deadline)
                try:
                    body = self._exchange(self._sock, op, num, args, deadline)
                except (BrokenPipeError, ConnectionResetError, _Closed):
                    self._sock.close()
                    self._sock = None
                    if fresh or attempt:  # the daemon went away mid-request: say so
                        raise DaemonDownError(f"btnsd at {self.path} closed the connection", errno.ECONNRESET) from None
                except BaseException:
                    self._sock.close()  # a timeout or a bad frame: never reuse a desynchronised socket
                    self._sock = None
                    raise
                else:
                    break
            else:  # pragma: no cover
                raise AssertionError("unreachable")
        return _parsed(body)  # an answered error (EACCES, ENOTCONN, ...) keeps the connection

    def _exchange(self, s: socket.socket, op: str, fd: int | None, args: dict[str, Any], deadline: float) -> bytes:
        """Send one request, return its response's raw payload (parsed by the caller)."""
        ident = next(self._ids) & 0x7FFFFFFF
        frame = protocol.request(op, ident, **args)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd))] if fd is not None else []
        # The socket's kernel timeouts (SO_SNDTIMEO/SO_RCVTIMEO) are this client's default
        # timeout: within it the exchange is a plain sendmsg and recv. A longer deadline (a
        # negotiation) or a second packet waits with poll for what is left of the deadline.
        quick = deadline - time.monotonic() <= self.timeout
        try:
            s.sendmsg([frame], anc)  # a packet this small only waits when the broker is swamped
        except BlockingIOError:  # SO_SNDTIMEO expired: the broker has not read for the whole timeout
            raise DaemonTimeoutError(f"btnsd at {self.path} does not take requests", errno.ETIMEDOUT) from None
        while True:
            if not quick:
                self._wait(s, select.POLLIN, deadline)
            try:
                data = s.recv(protocol.MAX_FRAME + 1)
            except BlockingIOError:  # SO_RCVTIMEO expired
                raise DaemonTimeoutError(f"btnsd at {self.path} did not answer in time", errno.ETIMEDOUT) from None
            if not data:
                raise _Closed()
            if len(data) > 3 and data[3] == protocol.NOTIFY:
                quick = False  # a notification ahead of the answer (a watching connection): skip it
                continue
            got, body = protocol.split(data, protocol.RESPONSE)
            if got == ident:
                return body
            quick = False  # an answer to an earlier request: wait for ours within the deadline only

    def _wait(self, s: socket.socket, event: int, deadline: float) -> None:
        left = deadline - time.monotonic()
        p = select.poll()
        p.register(s, event)
        if left <= 0 or not p.poll(left * 1000):
            raise DaemonTimeoutError(f"btnsd at {self.path} did not answer in time", errno.ETIMEDOUT)

    # ---- the library's operations -----------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return self.request("hello")

    def probe(self) -> bool:
        try:
            self.hello()
        except OSError:
            return False
        return True

    def get_socket_ptoken(self, fd: FileDescriptorLike) -> PToken:
        return _token(self.request("get_socket_ptoken", fd))

    def set_socket_ptoken(self, fd: FileDescriptorLike, ptoken: PToken) -> None:
        self.request("set_socket_ptoken", fd, timeout=SLOW_TIMEOUT, ptoken=protocol.ptoken_to_wire(ptoken))

    def prepare_connect(self, fd: FileDescriptorLike, address: tuple[str, int]) -> None:
        self.request("prepare_connect", fd, timeout=SLOW_TIMEOUT, address=[str(address[0]), int(address[1])])

    def prepare_listen(self, fd: FileDescriptorLike) -> None:
        self.request("prepare_listen", fd, timeout=SLOW_TIMEOUT)

    def verify(self, fd: FileDescriptorLike, demand: PToken | None = None) -> PToken:
        args: dict[str, Any] = {"ptoken": protocol.ptoken_to_wire(demand)} if demand is not None else {}
        return _token(self.request("verify", fd, **args))

    def get_msg_ptoken(
        self, fd: FileDescriptorLike, name: tuple[Any, ...], local: tuple[Any, ...], ifindex: int | None, proto: int
    ) -> PToken:
        res = self.request(
            "get_msg_ptoken",
            fd,
            name=[str(name[0]), int(name[1])],
            local=[str(local[0]), int(local[1])],
            ifindex=ifindex,
            proto=proto,
        )
        return _token(res)

    def check_send(
        self,
        fd: FileDescriptorLike,
        dest: tuple[Any, ...] | None,
        control: list[tuple[int, int, bytes]],
        flags: int,
        demand: PToken,
    ) -> None:
        self.request(
            "check_send",
            fd,
            dest=[str(dest[0]), int(dest[1])] if dest else None,
            control=[[lvl, kind, data.hex()] for lvl, kind, data in control],
            flags=flags,
            ptoken=protocol.ptoken_to_wire(demand),
        )

    def sockets(self, fd: FileDescriptorLike) -> list[dict[str, Any]]:
        """Every socket of ``fd``'s namespace as ``btns sockets --json`` shows them (without pTokens)."""
        out: list[dict[str, Any]] = []
        while True:
            res = self.request("sockets", fd, timeout=SLOW_TIMEOUT, offset=len(out))
            out.extend(res["sockets"])
            if len(out) >= res["total"] or not res["sockets"]:
                return out

    def latch(self, fd: FileDescriptorLike) -> PToken:
        """Latch ``fd`` in btnsd (it verifies the protection itself); the latched pToken (EACCES: none).
        Remembered, so that a restarted btnsd is told again when the watch reconnects."""
        tok: PToken = self.request("latch", fd)["token"]
        num = resolve_fd(fd)
        st = os.fstat(num)
        with self._lock:
            self._latched[(st.st_dev, st.st_ino)] = num
        return tok

    def unlatch(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._latched.pop((int(key[0]), int(key[1])), None)
        self.request("unlatch", key=[int(key[0]), int(key[1])])

    def _relatch(self) -> bool:
        """After the watch (re)connected: tell btnsd every latch again (a restart forgot them).
        False when btnsd could not be asked for some (try again); closed sockets and ones no
        longer protected are forgotten (the latch's own re-check decides about those)."""
        with self._lock:
            latched = list(self._latched.items())
        done = True
        for key, fd in latched:
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != key:
                    raise OSError(errno.EBADF, "closed")
                self.request("latch", fd)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTCONN, errno.EACCES, errno.ENOTSOCK):
                    with self._lock:
                        self._latched.pop(key, None)
                else:
                    done = False
        return done

    def watch(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """btnsd's notifications, pushed on a connection of their own: ``latch-broken`` (with the
        socket's key) and ``reset`` become SAEvents for the latches' re-check. Returns once the
        watch stands (at most the client's timeout). Each time it stands, the first time too, a
        ``reset`` is delivered (a latch broken while nobody watched is found by its re-check);
        when the connection drops (btnsd restarted) it reconnects."""
        from ..backend import SAEvent

        stop = threading.Event()
        ready = threading.Event()  # the first watch stands (or could not be made in time)
        holder: list[socket.socket | None] = [None]

        def run() -> None:
            backoff = 0.05
            while not stop.is_set():
                try:
                    s = self._connect(time.monotonic() + self.timeout)
                except OSError:
                    if stop.wait(backoff):
                        return
                    backoff = min(0.5, backoff * 2)  # a restarted btnsd is re-told the latches within 0.5 s
                    continue
                holder[0] = s
                try:
                    _parsed(self._exchange(s, "watch", None, {}, time.monotonic() + self.timeout))
                    backoff = 0.05
                    for _ in range(10):  # btnsd may still be starting: its backends, its index
                        if self._relatch() or stop.wait(0.2):
                            break
                    ready.set()
                    # A latch that broke before this watch stood was pushed to nobody (and _relatch
                    # forgot it): every latch re-checks itself now, as after a reconnect.
                    callback(SAEvent("reset"))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 0))  # wait forever
                    while not stop.is_set():
                        data = s.recv(protocol.MAX_FRAME + 1)
                        if not data:
                            break
                        _, body = protocol.split(data, protocol.NOTIFY)
                        note = protocol.parse_body(body)
                        kind = "latch-broken" if note.get("event") == "latch-broken" else "reset"
                        callback(SAEvent(kind, raw=note))
                except (OSError, _Closed):
                    pass
                finally:
                    holder[0] = None
                    s.close()
                if not stop.is_set():
                    callback(SAEvent("reset"))  # whatever happened meanwhile: re-check everything
                    stop.wait(backoff)

        t = threading.Thread(target=run, name="btns-broker-watch", daemon=True)
        t.start()
        ready.wait(self.timeout)  # watching from the return on (a later connect: the reset above)

        def stopper() -> None:
            stop.set()
            s = holder[0]
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            t.join(2)

        return stopper


@functools.lru_cache(maxsize=512)
def _parsed_memo(body: bytes) -> tuple[dict[str, Any], PToken | None]:
    result = protocol.raise_for(protocol.parse_body(body))
    wire = result.get("ptoken")
    return result, (protocol.ptoken_from_wire(wire, trusted=True) if wire is not None else None)


def _parsed(body: bytes) -> dict[str, Any]:
    """The result of a response body; the same bytes (the same answer) are parsed once."""
    try:
        result, tok = _parsed_memo(body)
    except OSError:
        raise
    out = dict(result)
    if tok is not None:
        out["token"] = tok.copy()
    return out


def _token(result: Mapping[str, Any]) -> PToken:
    """The pToken an answer carries (EPROTO when the broker sent none)."""
    token = result.get("token")
    if not isinstance(token, PToken):
        raise protocol.FrameError("the broker's answer carries no pToken")
    return token


class _Closed(Exception):
    """The broker closed the connection (EOF)."""
