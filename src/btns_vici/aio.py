"""The IPsec API for asyncio: awaitable queries, negotiating streams, and the web-server edge.

Nothing here blocks the event loop for more than a few system calls. Every call that may
wait on charon (a VICI round trip with its deadline, an IKE negotiation of up to 10 s, the
post-connect verification, latching) runs in one of two bounded thread pools, never in a
nested loop:

* ``lookup`` (:data:`LOOKUP_WORKERS` threads): get_socket_ptoken, set_socket_ptoken,
  verification of an accepted connection;
* ``negotiation`` (:data:`NEGOTIATION_WORKERS` threads): connect() with a pToken, i.e. the
  IKE exchange; kept apart so that slow negotiations never starve the lookups.

The pools are made on first use, per process: after ``fork()`` the child makes new ones
(threads do not survive a fork; see README "asyncio and web servers").

Streams (:func:`open_connection`, :func:`start_server`) mirror :mod:`asyncio`'s. The
verified pToken of a stream is in ``writer.get_extra_info("btns_ptoken")`` (and in the
transport's, for asyncio's own transports), its latch in ``"btns_latch"``. When the latch
breaks (the SA went away or changed under the connection), ``on_break(info)`` runs on the
loop and the stream fails: the next ``read``/``drain`` raises
:class:`~btns_vici.core.errors.ProtectionLostError` (ECONNABORTED) instead of returning EOF.

The web-server part (:func:`connection_info`, :func:`demand`, :func:`check`) is shared by
:mod:`btns_vici.asgi` and :mod:`btns_vici.aiohttp_support`; it imports no web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from . import api
from . import latch as _latch
from .authority import Authority, BackendLike
from .backend import Backend
from .core.constants import AuthMethod, Setting
from .core.derive import unprotected_ptoken
from .core.errors import BtnsError, ProtectionLostError
from .core.requirements import unmet
from .core.selectors import Flow
from .core.tokens import IToken, PToken

log = logging.getLogger(__name__)

T = TypeVar("T")
OnBreak = Callable[["_latch.LatchBroken"], Any]

#: Threads for lookups (VICI round trips of a few ms at most, bounded by the backend's deadline).
LOOKUP_WORKERS = int(os.environ.get("BTNS_AIO_LOOKUP_WORKERS", "4"))
#: Threads for negotiations (connect with a pToken: one IKE exchange each, up to its timeout).
NEGOTIATION_WORKERS = int(os.environ.get("BTNS_AIO_NEGOTIATION_WORKERS", "4"))

#: Keys of ``get_extra_info`` on streams and transports made here.
EXTRA_PTOKEN = "btns_ptoken"
EXTRA_LATCH = "btns_latch"

_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_pools_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pools_lock, _pools_pid
    _pools.clear()  # their threads are gone in the child; never shut them down (would wait)
    _pools_lock = threading.Lock()
    _pools_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def executor(kind: str = "lookup") -> ThreadPoolExecutor:
    """The bounded pool ``kind`` ("lookup" or "negotiation") of this process."""
    pool = _pools.get(kind)
    if pool is not None and _pools_pid == os.getpid():
        return pool
    with _pools_lock:
        if _pools_pid != os.getpid():  # forked without the hook (e.g. os.fork in a C extension)
            _after_fork_in_child()
        pool = _pools.get(kind)
        if pool is None:
            workers = NEGOTIATION_WORKERS if kind == "negotiation" else LOOKUP_WORKERS
            pool = _pools[kind] = ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"btns-aio-{kind}")
        return pool


async def run_blocking(fn: Callable[..., T], *args: Any, kind: str = "lookup") -> T:
    """``fn(*args)`` in the bounded pool ``kind``, with the caller's context variables."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(executor(kind), functools.partial(ctx.run, fn, *args))


# -- what a socket is ---------------------------------------------------------------------------


def socket_of(obj: Any) -> Any:
    """The socket behind ``obj``: an fd, a socket, a transport, a StreamWriter or anything with
    ``get_extra_info("socket")``. ENOTSOCK when there is none."""
    if isinstance(obj, int) or hasattr(obj, "fileno"):
        return obj
    get = getattr(obj, "get_extra_info", None)
    if callable(get):
        sock = get("socket")
        if sock is not None:
            return sock
    transport = getattr(obj, "transport", None)
    if transport is not None and transport is not obj:
        return socket_of(transport)
    raise BtnsError(f"{type(obj).__name__} has no socket", errno.ENOTSOCK)


async def resolve_backend(backend: BackendLike = None) -> Authority:
    """:func:`btns_vici.api.resolve_backend` off the loop (the default selection probes daemons)."""
    if isinstance(backend, Backend):
        return backend
    return await run_blocking(api.resolve_backend, backend)


# -- the draft's calls, awaitable ----------------------------------------------------------------


async def get_socket_ptoken(sock: Any, backend: BackendLike = None, *, inline: bool = False) -> PToken:
    """ipsec_get_socket_pToken for asyncio: the verified pToken of ``sock`` (or a transport/stream).

    Runs in the lookup pool. ``inline=True`` answers on the loop itself: about twice the
    queries per second, but a negative answer costs a VICI round trip on the loop (bounded
    by the backend's deadline, 5 s by default, if charon hangs).
    """
    target = socket_of(sock)
    if inline:
        return api.get_socket_ptoken(target, backend)
    be = await resolve_backend(backend)
    return await run_blocking(api.get_socket_ptoken, target, be)


async def set_socket_ptoken(sock: Any, ptoken: PToken, backend: BackendLike = None) -> None:
    """ipsec_set_socket_pToken for asyncio (arms the data-plane guard; may ask charon)."""
    target = socket_of(sock)
    be = await resolve_backend(backend)
    await run_blocking(api.set_socket_ptoken, target, ptoken, be)


async def ptoken_for_flow(flow: Flow, backend: BackendLike = None) -> PToken:
    """:func:`btns_vici.api.ptoken_for_flow` in the lookup pool."""
    be = await resolve_backend(backend)
    return await run_blocking(api.ptoken_for_flow, flow, be)


def _loop_callback(loop: asyncio.AbstractEventLoop, *targets: Callable[[Any], Any] | None) -> Callable[[Any], None]:
    """A latch callback (run by the watcher thread) that runs ``targets`` on ``loop``."""

    def on_loop(info: Any) -> None:
        for fn in targets:
            if fn is None:
                continue
            try:
                res = fn(info)
                if asyncio.iscoroutine(res):
                    loop.create_task(res)
            except Exception:
                log.exception("latch callback failed")

    def from_thread(info: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            loop.call_soon_threadsafe(on_loop, info)

    return from_thread


def _connect_sync(
    sock: socket.socket,
    address: tuple[Any, ...],
    be: Authority,
    demand_set: bool,
    timeout: float | None,
    want_latch: bool,
    on_break: Callable[[Any], None],
) -> tuple[PToken, _latch.Latch | None]:
    """In a worker: api.connect (negotiate, connect, verify) on the blocking socket, then latch."""
    sock.settimeout(timeout)
    try:
        api.connect(sock, address, be, latch_=False)
    finally:
        sock.setblocking(False)
    tok = api.get_socket_ptoken(sock, be)
    lt = None
    if want_latch and tok.protected:
        try:
            lt = _latch.latch(sock, be, on_break=on_break, shutdown=demand_set)
        except BtnsError:
            if demand_set:
                raise
    return tok, lt


async def connect(
    sock: socket.socket,
    address: tuple[Any, ...],
    backend: BackendLike = None,
    *,
    latch: bool = True,
    on_break: OnBreak | None = None,
    timeout: float | None = 30.0,
) -> PToken:
    """``api.connect`` for asyncio: the SA negotiation, the TCP handshake and the verification run
    in the negotiation pool; returns the verified pToken. A socket with a pToken attached that
    the connection does not meet is shut down and EACCES raised (EHOSTUNREACH when no SA could
    be negotiated). The connection is latched when protected (``on_break`` on the loop)."""
    loop = asyncio.get_running_loop()
    be = await resolve_backend(backend)
    demand_set = await run_blocking(api.attached_ptoken, sock) is not None
    tok, _lt = await run_blocking(
        _connect_sync, sock, address, be, demand_set, timeout, latch, _loop_callback(loop, on_break), kind="negotiation"
    )
    return tok


async def listen(sock: socket.socket, backlog: int = 128, backend: BackendLike = None) -> None:
    """``api.listen`` for asyncio (loads the responder connection in the lookup pool)."""
    be = await resolve_backend(backend)
    await run_blocking(api.listen, sock, backlog, be)


def _admit_sync(
    conn: Any, demand: PToken | None, be: Authority, want_latch: bool, on_break: Callable[[Any], None]
) -> tuple[PToken, _latch.Latch | None]:
    """In a worker: what api.accept checks for an accepted connection (and the latch)."""
    tok = api.get_socket_ptoken(conn, be) if demand is None else api.admit(conn, demand, be)
    lt = None
    if want_latch and tok.protected:
        try:
            lt = _latch.latch(conn, be, on_break=on_break, shutdown=demand is not None)
        except BtnsError:
            if demand is not None:
                raise
    return tok, lt


def _forget_latch(lt: _latch.Latch) -> None:
    """Drop a latch whose socket is closing."""
    _latch.forget(lt)


# -- streams ------------------------------------------------------------------------------------


class BtnsStreamWriter(asyncio.StreamWriter):
    """An :class:`asyncio.StreamWriter` that also answers ``btns_ptoken`` and ``btns_latch``."""

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        protocol: _Protocol,
        reader: asyncio.StreamReader | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)  # type: ignore[arg-type]
        self._btns = protocol

    @property
    def ptoken(self) -> PToken | None:
        """The pToken verified when the connection was made (a snapshot: ask get_socket_ptoken for now)."""
        return self._btns.ptoken

    @property
    def latch(self) -> _latch.Latch | None:
        return self._btns.latch

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == EXTRA_PTOKEN:
            return self._btns.ptoken if self._btns.ptoken is not None else default
        if name == EXTRA_LATCH:
            return self._btns.latch if self._btns.latch is not None else default
        return super().get_extra_info(name, default)


class _Protocol(asyncio.StreamReaderProtocol):
    """StreamReaderProtocol that knows its latch: a broken latch fails the stream, never a plain EOF."""

    # Set by asyncio's base classes (FlowControlMixin, StreamReaderProtocol); typeshed omits them.
    _loop: asyncio.AbstractEventLoop
    _transport: asyncio.Transport | None

    def __init__(self, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(reader, loop=loop)
        self._reader_ref = reader  # strong: the base class keeps only a weak reference
        self.ptoken: PToken | None = None
        self.latch: _latch.Latch | None = None
        self.writer: BtnsStreamWriter | None = None

    def attach(self, transport: asyncio.BaseTransport, ptoken: PToken | None, lt: _latch.Latch | None) -> None:
        self.ptoken, self.latch = ptoken, lt
        extra = getattr(transport, "_extra", None)  # asyncio's transports: make get_extra_info answer too
        if isinstance(extra, dict):
            if ptoken is not None:
                extra[EXTRA_PTOKEN] = ptoken
            if lt is not None:
                extra[EXTRA_LATCH] = lt

    def _lost_error(self) -> ProtectionLostError | None:
        lt = self.latch
        if lt is None or lt.broken is None:
            return None
        return ProtectionLostError(f"protection of {lt.flow} changed: " + "; ".join(lt.broken.reasons))

    def on_break(self, _info: Any) -> None:
        """Runs on the loop when the latch broke: the stream fails with ProtectionLostError."""
        err = self._lost_error()
        reader = self._reader_ref
        if err is not None and reader is not None and reader.exception() is None:
            reader.set_exception(err)
        transport = self._transport
        if transport is not None and self.latch is not None and self.latch.shutdown:
            transport.abort()

    def eof_received(self) -> bool:
        err = self._lost_error()  # the latch marks itself broken before it shuts the socket down
        if err is not None:
            self._reader_ref.set_exception(err)
            return False
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        err = self._lost_error()
        if err is not None and self._reader_ref.exception() is None:
            self._reader_ref.set_exception(err)
            exc = err
        if self.latch is not None:
            _forget_latch(self.latch)
        super().connection_lost(exc)


async def _addresses(
    host: str | None, port: int | None, family: int, flags: int = 0
) -> list[tuple[int, int, tuple[Any, ...]]]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, flags=flags)
    seen: set[tuple[int, tuple[Any, ...]]] = set()
    out: list[tuple[int, int, tuple[Any, ...]]] = []
    for fam, _type, proto, _name, addr in infos:
        if (fam, addr) not in seen:
            seen.add((fam, addr))
            out.append((fam, proto, addr))
    return out


async def open_connection(
    host: str | None = None,
    port: int | None = None,
    *,
    ptoken: PToken | None = None,
    backend: BackendLike = None,
    limit: int = 2**16,
    family: int = 0,
    local_addr: tuple[Any, ...] | None = None,
    sock: socket.socket | None = None,
    latch: bool = True,
    on_break: OnBreak | None = None,
    timeout: float | None = 30.0,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, BtnsStreamWriter]:
    """:func:`asyncio.open_connection` with IPsec: (reader, writer) of a verified connection.

    ``ptoken``: the demand (draft: a pToken set on the socket before connect). The SA is
    negotiated for the flow, the connection made and verified in the negotiation pool;
    one that does not meet the demand raises EACCES (EHOSTUNREACH: no SA could be
    negotiated, e.g. the pinned peer key is not the server's). Without a demand the
    connection is made by the loop and its pToken read (it may be unprotected).

    ``sock``: a socket to use (e.g. one made in another network namespace), connected or
    not; with ``host``/``port`` it is connected to them. ``on_break(info)`` runs on the loop
    when the latch breaks; the stream then raises ProtectionLostError. Other keyword
    arguments (``ssl``, ``server_hostname``, ...) go to ``loop.create_connection``.
    """
    loop = asyncio.get_running_loop()
    be = await resolve_backend(backend)
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = _Protocol(reader, loop)
    callback = _loop_callback(loop, protocol.on_break, on_break)
    made: list[socket.socket] = []
    try:
        if sock is not None and host is None and port is None:
            candidates: Sequence[tuple[int, int, tuple[Any, ...] | None]] = [(sock.family, 0, None)]
        else:
            candidates = await _addresses(host, port, family or (sock.family if sock is not None else 0))
        last: BaseException | None = None
        for fam, proto, addr in candidates:
            s = sock
            try:
                if s is None:
                    s = socket.socket(fam, socket.SOCK_STREAM, proto)
                    made.append(s)
                    if local_addr is not None:
                        s.bind(local_addr)
                if addr is not None and ptoken is not None and api.attached_ptoken(s) is None:
                    await set_socket_ptoken(s, ptoken, be)
                if addr is None:  # already connected: verified against ptoken, if any
                    tok, lt = await run_blocking(_admit_sync, s, ptoken, be, latch, callback)
                elif ptoken is not None or api.attached_ptoken(s) is not None:
                    tok, lt = await run_blocking(
                        _connect_sync, s, addr, be, True, timeout, latch, callback, kind="negotiation"
                    )
                else:
                    s.setblocking(False)
                    await asyncio.wait_for(loop.sock_connect(s, addr), timeout)
                    tok, lt = await run_blocking(_admit_sync, s, None, be, latch, callback)
                sock = s
                break
            except OSError as exc:  # TimeoutError included
                last = exc
                if sock is not None:
                    raise
        else:
            raise last if last is not None else OSError(errno.EHOSTUNREACH, f"no address for {host!r}")
        sock.setblocking(False)
        protocol.ptoken, protocol.latch = tok, lt
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock, **kwargs)
    except BaseException:
        for s in made:
            s.close()
        raise
    protocol.attach(transport, tok, lt)
    writer = BtnsStreamWriter(transport, protocol, reader, loop)
    protocol.writer = writer
    return reader, writer


ClientConnected = Callable[[asyncio.StreamReader, BtnsStreamWriter], Awaitable[None] | None]


class _ServerProtocol(_Protocol):
    """Admits one accepted connection: verified (and latched) in the lookup pool before the
    handler sees it; one that does not meet the listener's pToken is aborted."""

    def __init__(self, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop, server: _ServerState) -> None:
        super().__init__(reader, loop)
        self._state = server
        self._admitting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._admitting = self._loop.create_task(self._admit(transport))

    async def _admit(self, transport: asyncio.BaseTransport) -> None:
        st = self._state
        try:
            tok, lt = await run_blocking(
                _admit_sync,
                transport.get_extra_info("socket"),
                st.demand,
                st.backend,
                st.latch,
                _loop_callback(self._loop, self.on_break, st.on_break),
            )
        except OSError as exc:
            st.refused += 1
            log.info("refused %s: %s", transport.get_extra_info("peername"), exc)
            cast(asyncio.Transport, transport).abort()  # a stream's transport (asyncio's, uvloop's) has abort()
            return
        if transport.is_closing():
            if lt is not None:
                _forget_latch(lt)
            return
        self.attach(transport, tok, lt)
        writer = self.writer = BtnsStreamWriter(transport, self, self._reader_ref, self._loop)
        try:
            res = st.handler(self._reader_ref, writer)
            if asyncio.iscoroutine(res):
                await res
        except Exception as exc:
            self._loop.call_exception_handler(
                {"message": "Unhandled exception in client_connected_cb", "exception": exc, "transport": transport}
            )
            transport.close()


class _ServerState:
    def __init__(
        self,
        handler: ClientConnected,
        demand: PToken | None,
        backend: Authority,
        latch: bool,
        on_break: OnBreak | None,
    ) -> None:
        self.handler, self.demand, self.backend, self.latch, self.on_break = handler, demand, backend, latch, on_break
        self.refused = 0


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    *,
    ptoken: PToken | None = None,
    backend: BackendLike = None,
    limit: int = 2**16,
    family: int = socket.AF_UNSPEC,
    sock: socket.socket | None = None,
    backlog: int = 100,
    reuse_address: bool = True,
    latch: bool = True,
    on_break: OnBreak | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """:func:`asyncio.start_server` with IPsec: ``client_connected_cb(reader, writer)`` runs only
    for connections verified to meet ``ptoken`` (all connections without one; their pToken
    is then in ``writer.get_extra_info("btns_ptoken")`` and may be unprotected).

    The listening sockets get ``ptoken`` attached (guard armed) and the backend's responder
    connection loaded, off the loop. ``sock``: a socket to listen on (bound, or listening
    already), e.g. made in another namespace. ``on_break`` as in :func:`open_connection`.
    Other keyword arguments (``ssl``, ``start_serving``, ...) go to ``loop.create_server``.
    """
    loop = asyncio.get_running_loop()
    be = await resolve_backend(backend)
    state = _ServerState(client_connected_cb, ptoken, be, latch, on_break)
    sockets: list[socket.socket] = []
    made: list[socket.socket] = []
    try:
        if sock is not None:
            sockets.append(sock)
        else:
            hosts = [host] if host is None or isinstance(host, str) else list(host)
            for h in hosts:
                for fam, proto, addr in await _addresses(h, port, family, socket.AI_PASSIVE):
                    s = socket.socket(fam, socket.SOCK_STREAM, proto)
                    made.append(s)
                    if reuse_address:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if fam == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind(addr)
                    sockets.append(s)
        for s in sockets:
            if ptoken is not None and api.attached_ptoken(s) is None:
                await set_socket_ptoken(s, ptoken, be)
            await listen(s, backlog, be)
            s.setblocking(False)

        def factory() -> _ServerProtocol:
            return _ServerProtocol(asyncio.StreamReader(limit=limit, loop=loop), loop, state)

        server = await loop.create_server(factory, sock=sockets[0], backlog=backlog, **kwargs)
        for s in sockets[1:]:  # asyncio.Server serves one socket per create_server call
            extra = await loop.create_server(factory, sock=s, backlog=backlog, **kwargs)
            server._sockets.extend(extra._sockets)  # type: ignore[attr-defined]
            extra._sockets = []  # type: ignore[attr-defined]
    except BaseException:
        for s in made:
            s.close()
        raise
    server.btns_state = state  # type: ignore[attr-defined]
    return server


# -- the web-server edge (shared by asgi and aiohttp_support) -------------------------------------

#: Request headers that say a proxy forwarded the request: the connection's peer is the proxy.
FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip", b"x-forwarded-host", b"via")

SOURCE_SOCKET = "socket"  # the pToken of the server's own connected socket (socket-exact)
SOURCE_FLOW = "flow"  # no socket reachable: the flow of scope client/server, as an unbound socket
SOURCE_REFUSED = "refused"  # proxied or unidentifiable: no IPsec identity is attributed

_ADDR_CACHE: dict[str, Any] = {}


def _ip(host: str) -> Any:
    hit = _ADDR_CACHE.get(host)
    if hit is None:
        if len(_ADDR_CACHE) > 4096:
            _ADDR_CACHE.clear()
        hit = _ADDR_CACHE[host] = ipaddress.ip_address(host.split("%", 1)[0])
    return hit


def _same_endpoint(a: Any, b: Any) -> bool:
    if not a or not b:
        return False
    try:
        return _ip(str(a[0])) == _ip(str(b[0])) and int(a[1]) == int(b[1])
    except (ValueError, TypeError, IndexError):
        return False


def _flow_of_peer(client: Any, server: Any) -> Flow | None:
    try:
        return Flow(socket.IPPROTO_TCP, _ip(str(server[0])), int(server[1]), _ip(str(client[0])), int(client[1]))
    except (ValueError, TypeError, IndexError):
        return None


def _info(
    ptoken: PToken, source: str, flow: Flow | None, reason: str = "", proxied: bool = False, hop: PToken | None = None
) -> dict[str, Any]:
    return {
        "ptoken": ptoken,
        "itoken": ptoken.itoken if ptoken.protected else None,
        "source": source,
        "flow": flow,
        "proxied": proxied,
        "reason": reason,
        "hop_ptoken": hop,
    }


def _peer_sync(sock: Any, be: Authority) -> tuple[PToken, Any]:
    """In a worker: the peer address and the pToken of a server-side connected socket."""
    peer = sock.getpeername()
    return api.get_socket_ptoken(sock, be), peer


async def connection_info(
    *,
    sock: Any = None,
    client: Any = None,
    server: Any = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    backend: BackendLike = None,
    forwarded: str = "refuse",
    inline: bool = False,
) -> dict[str, Any]:
    """What a web handler may believe about its peer: ``{"ptoken", "itoken", "source", ...}``.

    * ``sock`` (the server's connected socket, when the server exposes it): its own pToken,
      socket-exact (``source`` "socket");
    * else the flow of ``client``/``server`` (scope["client"], scope["server"]) judged as an
      unbound, unmarked socket of the backend's namespace (``source`` "flow").

    Refused (an unprotected pToken saying why, ``itoken`` None, ``source`` "refused",
    ``proxied`` True) when the request came through a proxy: a forwarding header
    (:data:`FORWARDING_HEADERS`), a ``client`` that is not the socket's peer (the server
    rewrote it from such headers), a Unix-domain socket. The IPsec peer is then the proxy,
    not the client, and nothing is guessed. ``forwarded="hop"`` instead reports the proxy
    hop's own protection, still with ``proxied`` True (for a proxy that is itself the
    authenticated peer). The hop's pToken is in ``hop_ptoken`` either way when known.
    """
    flow = _flow_of_peer(client, server) if client and server else None
    why_proxied = ""
    for name, value in headers:
        if name.lower() in FORWARDING_HEADERS:
            why_proxied = f"the request carries a {name.decode('latin-1')} header ({value[:60].decode('latin-1')!r})"
            break
    tok: PToken | None = None
    source = SOURCE_FLOW
    if sock is not None:
        if getattr(sock, "family", socket.AF_INET) not in (socket.AF_INET, socket.AF_INET6):
            why_proxied = why_proxied or "the server's socket is not an IP socket (a Unix socket: a local proxy)"
        else:
            try:
                if inline:
                    be = backend if isinstance(backend, Backend) else api.resolve_backend(backend)
                    tok, peer = _peer_sync(sock, be)
                else:
                    be = await resolve_backend(backend)
                    tok, peer = await run_blocking(_peer_sync, sock, be)
            except OSError as exc:
                return _info(
                    unprotected_ptoken(flow, f"the connection cannot be inspected: {exc}"),
                    SOURCE_REFUSED,
                    flow,
                    str(exc),
                )
            source = SOURCE_SOCKET
            if client and not _same_endpoint(client, peer):
                why_proxied = why_proxied or (
                    f"scope client {tuple(client)} is not the connection's peer {peer[:2]} (rewritten from "
                    "forwarding headers)"
                )
    elif flow is None:
        reason = "neither the connection's socket nor its client/server addresses are known"
        return _info(unprotected_ptoken(None, reason), SOURCE_REFUSED, None, reason)
    if tok is None and not why_proxied:
        assert flow is not None  # no socket here, and without a flow it returned above
        tok = await (ptoken_for_flow(flow, backend) if not inline else _flow_inline(flow, backend))
    if why_proxied:
        reason = f"behind a reverse proxy, the IPsec peer is the proxy, not the client: {why_proxied}"
        if forwarded == "hop" and tok is not None:
            return _info(tok, source, flow, reason, proxied=True, hop=tok)
        return _info(unprotected_ptoken(flow, reason), SOURCE_REFUSED, flow, reason, proxied=True, hop=tok)
    assert tok is not None
    return _info(tok, source, flow)


async def _flow_inline(flow: Flow, backend: BackendLike) -> PToken:
    return api.ptoken_for_flow(flow, backend)


def pin_key(public_key: bytes) -> IToken:
    """An iToken pinning a raw-key (BTNS) peer by its public key (PEM or DER SubjectPublicKeyInfo),
    for ``demand(peer=...)``; its pubKeyID and channelBinding are what ``unmet`` compares."""
    if b"-----BEGIN" in public_key:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_public_key(public_key)
        public_key = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return IToken.from_identity(authentication_method=AuthMethod.BTNS, pub_key_id=public_key)


def demand(
    peer: IToken | PToken | None = None, min_privacy: Setting = Setting.ENABLE, min_integrity: Setting = Setting.ENABLE
) -> PToken:
    """The pToken a handler demands: privacy and integrity at least these levels, and (``peer``)
    the peer identity an iToken pins, e.g. :func:`pin_key` or one saved from an earlier
    connection (``IToken.from_bytes``). A PToken passed as ``peer`` is used as it is."""
    if isinstance(peer, PToken):
        return peer
    want = PToken()
    want.privacy_protected = min_privacy
    want.integrity_protected = min_integrity
    if peer is not None:
        want.itoken = peer
    return want


def check(info: Mapping[str, Any] | None, want: PToken) -> list[str]:
    """Why ``info`` (from :func:`connection_info`) does not meet ``want``; empty when it does."""
    if info is None:
        return ["no IPsec verdict for this request (is the IPsec middleware installed?)"]
    tok: PToken = info["ptoken"]
    if not tok.protected:
        return [tok.information_string or "not protected by IPsec"]
    return unmet(want, tok)


__all__ = [
    "EXTRA_LATCH",
    "EXTRA_PTOKEN",
    "FORWARDING_HEADERS",
    "BtnsStreamWriter",
    "check",
    "connect",
    "connection_info",
    "demand",
    "executor",
    "get_socket_ptoken",
    "listen",
    "open_connection",
    "pin_key",
    "ptoken_for_flow",
    "resolve_backend",
    "run_blocking",
    "set_socket_ptoken",
    "socket_of",
    "start_server",
]
