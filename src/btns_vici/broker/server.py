"""btnsd: the privileged broker. Applications hand it their socket; it answers and enforces for it.

One process per host, as root or with CAP_NET_ADMIN and access to the IKE daemon's control
socket. It owns the backends (one event-fed SA index each, for the whole host) and makes the
socket-exact proof (:mod:`btns_vici.protection`) for sockets it RECEIVED over SCM_RIGHTS:
possession of a socket is the authority to ask about it or demand protection for it;
SO_PEERCRED names the caller for policy, quotas and logs.

I/O: one thread runs a selector over the listening socket and every client it reads (unix
SOCK_SEQPACKET: a request arrives whole or not at all, so a slow client cannot hold a
half-read request; with ``--workers`` the worker processes read the clients and this process
reads what they forward, :mod:`.workers`); answers that need no negotiation are made inline, negotiations
(set_socket_ptoken, prepare_connect, prepare_listen) in a bounded thread pool. Every
descriptor received is closed when its request is done; excess descriptors are discarded by
the kernel (the ancillary buffer holds one). Bad input gets an error frame with its errno, or
the connection is closed; nobody else is disturbed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import guard, lifecycle
from ..backend import Backend
from ..core.derive import ptoken_for
from ..core.errors import BtnsError, RequirementNotMetError
from ..core.records import IN, Protection, SocketView
from ..core.requirements import satisfies
from ..core.selectors import Flow
from ..core.tokens import PToken
from ..msg import send_view
from ..protection import CONNECTION_REFUSAL, DATAGRAM_REFUSAL, ptoken_of, require, shortfall
from ..sockets import endpoint, inspect, is_connected, netns_of, resolve_fd, source_address, view_of
from . import channel, protocol
from .latches import Latches
from .metrics import Metrics
from .policy import Config
from .serving import TRUNC, Client, Serving
from .workers import Handle, WorkerPool

log = logging.getLogger("btnsd")
SO_PEERCRED = 17
_CRED = struct.Struct("=iII")
#: ops run in the pool, not the loop: negotiations, and listings that wait on the daemon's command session
SLOW_OPS = {"set_socket_ptoken", "prepare_connect", "prepare_listen", "sockets"}


def _groups(pid: int, gid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:]) | {gid}
    except (OSError, ValueError):
        pass
    return frozenset({gid})


class Server(Serving):
    """The main process: accepts, answers every request, holds policy, quotas, demands, loaded
    connections and latches. With ``--workers`` it hands each accepted client to a worker
    process (:mod:`.workers`) that reads it and answers the hot request itself; what the worker
    forwards is answered here, on this process's copy of the client's connection."""

    def __init__(
        self,
        config: Config,
        listener: socket.socket,
        metrics: Metrics | None = None,
        backends: list[Backend] | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        self.listener = listener
        self.listener.setblocking(False)
        super().__init__(config, metrics or Metrics(False), backends)
        self.metrics: Metrics
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="btnsd-slow")
        self._ids = 0
        self._lock = threading.Lock()
        #: socket identity -> (owning client ident, demand): what set_socket_ptoken attached
        self.demands: dict[tuple[int, int], tuple[int, PToken]] = {}
        #: connection name -> (backend, idents of the clients it was loaded for)
        self.loaded: dict[str, tuple[Backend, set[int]]] = {}
        self._stop = threading.Event()
        #: client ident -> (netns, when, rows): a `btns sockets` listing served page by page
        self._listings: dict[int, tuple[tuple[int, int] | None, float, list[dict[str, Any]]]] = {}
        #: latched views and watching connections: pushed latch-broken notifications (broker/latches.py)
        self.latches = Latches(self._notify, self.pool.submit, on_break=self.metrics.latch_break)
        #: the worker processes reading clients (None or empty: this process reads them all)
        self.workers = workers
        if workers is not None:
            for w in workers.alive():
                self.sel.register(w.chan, selectors.EVENT_READ, w)

    # ---- the loop ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            for key, _mask in self.sel.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                elif isinstance(key.data, Client):
                    self._readable(key.data)
                else:
                    self._from_worker(key.data)
            now = time.monotonic()
            if now - last_sweep > 1.0:
                last_sweep = now
                if self.workers is not None:
                    for w in self.workers.respawn():
                        self.sel.register(w.chan, selectors.EVENT_READ, w)
                    if self.metrics.enabled:
                        self.metrics.workers.set(len(self.workers.alive()))
                for c in list(self.clients.values()):
                    if now - c.last > self.config.idle_timeout and c.inflight == 0 and c.watching is None:
                        log.info("closing idle client %s", c.label())
                        self._drop(c)
                self.metrics.sas_of(self.backends)
                if self.latches.count():  # a backend whose event stream ended (charon restarted): watch again
                    for be in self.backends:
                        self.latches.arm(be)
        if self.workers is not None:
            self.workers.stop()  # first: their copies of the clients close with them
        for c in list(self.clients.values()):
            self._drop(c)
        self.latches.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                self.metrics.error("accept")
                return
            conn.setblocking(False)
            pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _CRED.size))
            per_uid = sum(1 for c in self.clients.values() if c.uid == uid)
            if len(self.clients) >= self.config.max_clients or per_uid >= self.config.max_clients_per_uid:
                log.warning("refusing client pid %d uid %d: too many clients", pid, uid)
                self.metrics.error("too_many_clients")
                conn.close()
                continue
            self._ids += 1
            c = Client(conn, pid, uid, gid, _groups(pid, gid), self._ids, tokens=float(self.config.quota.burst))
            self.clients[c.ident] = c
            w = self.workers.pick() if self.workers is not None else None
            if w is not None and w.hand(c):
                c.worker = w  # it reads the client; this process keeps its copy for writing
            else:
                self.sel.register(conn, selectors.EVENT_READ, c)
            if self.metrics.enabled:
                self.metrics.clients.set(len(self.clients))

    def _from_worker(self, w: Handle) -> None:
        """What worker ``w`` sent: forwarded requests, clients gone, its tally; its EOF: it died."""
        for _ in range(256):
            try:
                msg = channel.receive(w.chan)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = None
            if msg is None:
                self._worker_died(w)
                return
            kind, flags, ident, payload, fd = msg
            c = self.clients.get(ident)
            if kind == channel.FORWARD and c is not None and c.worker is w:
                c.last = time.monotonic()
                self._request(c, payload, [fd] if fd >= 0 else [], TRUNC if flags & channel.TRUNCATED else 0, True)
                continue
            if fd >= 0:  # a client this process dropped meanwhile, or nonsense
                os.close(fd)
            if kind == channel.GONE and c is not None and c.worker is w:
                self._drop(c, told=True)
            elif kind == channel.STATS:
                tally, active = channel.parse_stats(payload)
                self.metrics.merge(tally)
                now = time.monotonic()
                for i in active:
                    got = self.clients.get(i)
                    if got is not None:
                        got.last = now

    def _worker_died(self, w: Handle) -> None:
        """This process reads ``w``'s clients from now on; a new worker comes with the next sweep."""
        assert self.workers is not None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(w.chan)
        self.workers.died(w)
        taken = 0
        for c in list(self.clients.values()):
            if c.worker is w:
                c.worker = None
                if not c.closed:
                    self.sel.register(c.sock, selectors.EVENT_READ, c)
                    taken += 1
        log.warning("worker %d died: this process reads its %d clients", w.pid, taken)
        if self.metrics.enabled:
            self.metrics.workers.set(len(self.workers.alive()))

    def _request(self, c: Client, data: bytes, fds: list[int], flags: int, limited: bool = False) -> None:
        """``limited``: a worker's forward, already rate-limited there."""
        ident = 0
        try:
            if flags & TRUNC:
                raise protocol.FrameError(
                    f"request truncated: at most one descriptor and {protocol.MAX_FRAME} bytes per request",
                    errno.EMSGSIZE,
                )
            ident, body = protocol.split(data, protocol.REQUEST)
            req = protocol.HOT_REQUEST if body == protocol.HOT_BODY else protocol.parse_body(body)
            op = req.get("op")
            if op not in protocol.OPS:
                raise BtnsError(f"unknown op {op!r}", errno.EOPNOTSUPP)
            if protocol.OPS[op] and len(fds) != 1:
                raise BtnsError(f"{op} needs exactly one socket descriptor (SCM_RIGHTS), got {len(fds)}", errno.EBADF)
            if not protocol.OPS[op] and fds:
                raise BtnsError(f"{op} takes no descriptor", errno.EINVAL)
            if not limited:
                self._ratelimit(c)
        except OSError as exc:
            self.metrics.error("bad_request")
            for fd in fds:
                os.close(fd)
            self._send(c, protocol.error(ident, exc))
            return
        fd = fds[0] if fds else -1
        if op in SLOW_OPS:
            if c.inflight >= self.config.quota.concurrent:
                os.close(fd)
                self._send(
                    c,
                    protocol.error(
                        ident,
                        BtnsError(
                            f"more than {self.config.quota.concurrent} concurrent negotiations for uid {c.uid}",
                            errno.EAGAIN,
                        ),
                    ),
                )
                return
            c.inflight += 1
            self.pool.submit(self._run, c, ident, op, req, fd, True)
        else:
            self._run(c, ident, op, req, fd, False)

    def _run(self, c: Client, ident: int, op: str, req: dict[str, Any], fd: int, slow: bool) -> None:
        t0 = time.perf_counter()
        answer = "ok"
        try:
            result = getattr(self, f"op_{op}")(c, req, fd)
            body = result if isinstance(result, bytes) else protocol.ok_body(result)
            frame = protocol.frame(protocol.RESPONSE, ident, body)
        except OSError as exc:
            answer = errno.errorcode.get(exc.errno or 0, "error")
            frame = protocol.error(ident, exc)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # malformed arguments
            answer = "EINVAL"
            frame = protocol.error(ident, BtnsError(f"malformed {op} arguments: {exc}", errno.EINVAL))
        finally:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if slow:
                c.inflight -= 1
        self.metrics.query(op, answer, time.perf_counter() - t0)
        self._send(c, frame)

    def _drop(self, c: Client, told: bool = False) -> None:
        """Close ``c`` and forget what it had; ``told``: its worker said it went away."""
        with c.send_lock:
            if c.closed:
                return
            c.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()
        if c.worker is not None:
            if told:
                c.worker.clients -= 1
            else:
                c.worker.drop(c.ident)  # its copy closes too: the client sees EOF
        self.clients.pop(c.ident, None)
        self._listings.pop(c.ident, None)
        if c.watching is not None:
            c.watching()
        if not any(o.pid == c.pid for o in self.clients.values()):
            self.latches.drop(c.pid)  # the process's last connection: its latches go with it
        with self._lock:
            for key in [k for k, (owner, _) in self.demands.items() if owner == c.ident]:
                del self.demands[key]
            unused = []
            for name, (be, owners) in self.loaded.items():
                owners.discard(c.ident)
                if not owners:
                    unused.append((name, be))
            for name, be in unused:
                del self.loaded[name]
                lifecycle.unhold(be, name)
        for name, be in unused:
            self.pool.submit(self._release, be, name)
        if self.metrics.enabled:
            self.metrics.clients.set(len(self.clients))

    @staticmethod
    def _release(be: Backend, name: str) -> None:
        try:
            be.release(name)
            log.info("unloaded %s: its last client went away", name)
        except OSError as exc:
            log.warning("could not unload %s: %s", name, exc)

    def _own(self, c: Client, be: Backend, name: str) -> None:
        with self._lock:
            entry = self.loaded.get(name)
            if entry is None:
                mine = sum(
                    1
                    for _, owners in self.loaded.values()
                    for o in owners
                    if self.clients.get(o) is not None and self.clients[o].uid == c.uid
                )
                if mine >= self.config.quota.connections:
                    raise BtnsError(f"uid {c.uid} already has {mine} connections loaded by btnsd (quota)", errno.EDQUOT)
                entry = self.loaded[name] = (be, set())
                lifecycle.hold(be, name)  # recorded: released at exit, or by the next start after a crash
            entry[1].add(c.ident)

    def _notify(self, c: Client, note: dict[str, Any]) -> None:
        self._send(c, protocol.notify(note))  # a watcher that does not read is dropped like any client

    # ---- operations (one socket each, received) -------------------------------------------------
    def op_hello(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        return {
            "server": "btnsd",
            "version": protocol.VERSION,
            "uid": c.uid,
            "backends": [be.name for be in self.backends],
        }

    def _demand_of(self, key: tuple[int, int]) -> PToken | None:
        with self._lock:
            entry = self.demands.get(key)
        return entry[1] if entry else None

    def op_get_socket_ptoken(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any] | bytes:
        key, view = inspect(fd)
        got = self._main_only(c, key, view, b"", fd)
        assert got is not None  # the main process answers everything
        return got

    def _main_only(
        self, c: Client, key: tuple[int, int], view: SocketView | None, data: bytes, fd: int
    ) -> dict[str, Any] | bytes | None:
        if view is not None:
            return self.socket_answer(view)
        demand = self._demand_of(key)
        if demand is None:
            raise BtnsError("socket is not connected and has no pToken attached", errno.ENOTCONN)
        return {"ptoken": protocol.ptoken_to_wire(demand), "attached": True}

    def op_watch(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        """This connection carries NOTIFY frames from now on (latch-broken, reset)."""
        if c.watching is None:
            c.watching = self.latches.watch(c)
        for be in self.backends:
            self.latches.arm(be)
        return {"watching": True}

    def op_latch(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        """Latch the received socket: its protection now, as btnsd verifies it (EACCES if none)."""
        _, view = inspect(fd)
        if view is None:
            raise BtnsError("socket is not connected", errno.ENOTCONN)
        be = self._backend_or_unprotected(view)
        if isinstance(be, PToken):
            raise BtnsError(f"cannot latch {view.flow}: {be.information_string}", errno.EACCES)
        verdict = be.protect(view)
        if not isinstance(verdict, Protection):
            raise BtnsError(f"cannot latch {view.flow}: it is not protected ({verdict.reason})", errno.EACCES)
        tok = self.latches.latch(c.pid, be, view, verdict)
        return {"ptoken": protocol.ptoken_to_wire(tok)}

    def op_unlatch(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        dev, ino = req["key"]
        self.latches.unlatch(c.pid, (int(dev), int(ino)))
        return {}

    def _demand_arg(self, c: Client, req: dict[str, Any]) -> PToken:
        demand = protocol.ptoken_from_wire(req.get("ptoken"), trusted=False)
        itok = demand.itoken
        if itok is not None:
            from ..core.constants import AuthMethod, Setting

            for m in AuthMethod:
                if itok.auth_method(m) == Setting.ENABLE:
                    why = self.config.allows(c.uid, c.gids, m)
                    if why:
                        raise BtnsError(why, errno.EACCES)
        return demand

    def op_set_socket_ptoken(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        demand = self._demand_arg(c, req)
        resolve_fd(fd)
        if is_connected(fd):
            raise BtnsError(
                "socket is already connected: a pToken must be set before connect()/listen()", errno.EISCONN
            )
        with socket.socket(fileno=os.dup(fd)) as s:
            ns = netns_of(s)
        be = self.backend_for(ns)
        if be is None:
            raise BtnsError("btnsd has no backend for this socket's network namespace", errno.EOPNOTSUPP)
        from .. import acquire

        def admit(flow: Flow) -> None:  # a plain connect's ACQUIRE: the same policy as prepare_connect
            why = self.config.allows(c.uid, c.gids, None, flow.remote_addr)
            if why:
                raise BtnsError(why, errno.EACCES)

        # kernel XFRM: the trap's socket lives in the client; what its ACQUIREs negotiate is the client's.
        with acquire.owned_by(acquire.Owner(c.pid, admit, lambda name: self._own(c, be, name))):
            how = be.enforce(fd, demand)
        key = inspect(fd)[0]
        with self._lock:
            self.demands[key] = (c.ident, demand.copy())
        log.info("%s: pToken set on socket %s (%s)", c.label(), key[1], how.dataplane_guard)
        return {"guard": how.dataplane_guard}

    def op_prepare_connect(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        key = inspect(fd)[0]
        demand = self._demand_of(key)
        if demand is None:
            return {"demand": False}
        remote, rport = endpoint(tuple(req["address"]))
        why = self.config.allows(c.uid, c.gids, None, remote)
        if why:
            raise BtnsError(why, errno.EACCES)
        with socket.socket(fileno=os.dup(fd)) as s:
            local = source_address(s, remote)
            proto = socket.IPPROTO_TCP if s.type == socket.SOCK_STREAM else socket.IPPROTO_UDP
            ns = netns_of(s)
        be = self.backend_for(ns)
        if be is None:
            raise BtnsError("btnsd has no backend for this socket's network namespace", errno.EOPNOTSUPP)
        prospective = Flow(proto, local, 0, remote, rport)
        existing = be.protect(view_of(fd, prospective))
        if isinstance(existing, Protection) and satisfies(demand, ptoken_for(existing)):
            if existing.proof.dataplane == guard.XFRM:
                guard.apply(fd, guard.XFRM, reqid=existing.child_sa.reqid)
            return {"demand": True, "established": existing.ike_sa.name}
        name = be.establish(prospective, demand)
        self._own(c, be, name)
        return {"demand": True, "established": name}

    def op_prepare_listen(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        key = inspect(fd)[0]
        demand = self._demand_of(key)
        if demand is None:
            return {"demand": False}
        with socket.socket(fileno=os.dup(fd)) as s:
            local = endpoint(s.getsockname())[0]
            ns = netns_of(s)
        be = self.backend_for(ns)
        if be is None:
            raise BtnsError("btnsd has no backend for this socket's network namespace", errno.EOPNOTSUPP)
        name = be.serve(local, demand)
        self._own(c, be, name)
        return {"demand": True, "serving": name}

    def op_verify(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        """After connect/accept: the socket's pToken against its demand (the one set, or ``ptoken``)."""
        key, view = inspect(fd)
        if view is None:
            raise BtnsError("socket is not connected", errno.ENOTCONN)
        demand = self._demand_of(key)
        if demand is None and req.get("ptoken") is not None:
            demand = protocol.ptoken_from_wire(req["ptoken"], trusted=False)
        be = self._backend_or_unprotected(view)
        if isinstance(be, PToken):
            actual, problems = be, ["btnsd has no backend for the socket's namespace"] if demand else []
        elif demand is None:
            actual, problems = ptoken_of(view, be), []
        else:
            actual, problems = shortfall(demand, view, be)
        if problems:
            raise RequirementNotMetError(CONNECTION_REFUSAL, problems)
        if demand is not None:
            with self._lock:
                self.demands[key] = (c.ident, demand.copy())
        return {"ptoken": protocol.ptoken_to_wire(actual)}

    def op_get_msg_ptoken(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        """A datagram the client received on the socket ``fd``: where it came from and arrived."""
        with socket.socket(fileno=os.dup(fd)) as s:
            ns = netns_of(s)
        raddr, rport = endpoint(tuple(req["name"]))
        laddr, lport = endpoint(tuple(req["local"]))
        ifindex = req.get("ifindex")
        if ifindex is not None and not isinstance(ifindex, int):
            raise BtnsError("ifindex must be an integer", errno.EINVAL)
        proto = int(req.get("proto", socket.IPPROTO_UDP))
        unknown = () if ifindex is not None else ("the device it arrived on is unknown (no IP_PKTINFO)",)
        view = SocketView(
            flow=Flow(proto, laddr, lport, raddr, rport),
            netns=ns,
            direction=IN,
            arrival_ifindex=ifindex,
            unknown=unknown,
        )
        be = self._backend_or_unprotected(view)
        tok = be if isinstance(be, PToken) else ptoken_of(view, be)
        return {"ptoken": protocol.ptoken_to_wire(tok)}

    def op_check_send(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        demand = protocol.ptoken_from_wire(req["ptoken"], trusted=False)
        control = []
        for level, kind, hexed in req.get("control", [])[:16]:
            control.append((int(level), int(kind), bytes.fromhex(str(hexed))[:256]))
        flags = int(req.get("flags", 0))
        with socket.socket(fileno=os.dup(fd)) as s:
            dest = tuple(req["dest"]) if req.get("dest") else s.getpeername()
            view = send_view(s, dest, control, flags)
        be = self._backend_or_unprotected(view)
        if isinstance(be, PToken):
            raise BtnsError("datagram refused: btnsd has no backend for the socket's namespace", errno.EACCES)
        require(demand, view, be, DATAGRAM_REFUSAL)
        return {}

    def op_sockets(self, c: Client, req: dict[str, Any], fd: int) -> dict[str, Any]:
        """``btns sockets`` for an unprivileged caller: every socket of the namespace of ``fd`` (any
        socket of the caller's), judged socket-exactly as root sees them; processes only the caller's
        own (as ``ss -p`` shows a non-root user). Served in pages of at most ~48 KB."""
        import fcntl
        import json

        from ..cli.cmd_sockets import Snapshot, describe
        from ..cli.sockdiag import list_sockets, socket_holders
        from ..sockets import SIOCGSKNS

        offset = int(req.get("offset", 0))
        with socket.socket(fileno=os.dup(fd)) as s:
            ns = netns_of(s)
        be = self.backend_for(ns)
        if be is None:
            raise BtnsError("btnsd has no backend for this namespace", errno.EOPNOTSUPP)
        cached = self._listings.get(c.ident)
        now = time.monotonic()
        if offset == 0 or cached is None or cached[0] != ns or now - cached[1] > 10:
            ns_fd = fcntl.ioctl(fd, SIOCGSKNS)
            try:
                entries = list_sockets(f"/proc/self/fd/{ns_fd}")
            finally:
                os.close(ns_fd)
            snap, holders = Snapshot(be), socket_holders()
            rows = []
            for e in entries:
                d = describe(e, snap, holders.get(e.inode, []), with_token=False)[1]
                if c.uid != 0:
                    d["processes"] = [p for p in d["processes"] if _owner(p["pid"]) == c.uid]
                rows.append(d)
            cached = self._listings[c.ident] = (ns, now, rows)
        rows = cached[2]
        page: list[dict[str, Any]] = []
        size = 0
        for d in rows[offset:]:
            n = len(json.dumps(d))
            if page and (size + n > 48_000 or len(page) >= 256):
                break
            page.append(d)
            size += n
        return {"total": len(rows), "offset": offset, "sockets": page}


def _owner(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def listen_socket(path: str) -> socket.socket:
    """The broker's listening socket: ``$LISTEN_FDS`` from systemd when given, else bound at ``path``."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        sock = socket.socket(fileno=3)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            raise BtnsError(
                "the socket systemd passed is not a unix SOCK_SEQPACKET socket (ListenSequentialPacket=)",
                errno.EPROTOTYPE,
            )
        return sock
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    os.chmod(path, 0o666)  # anyone may ask: authority comes from the socket they send
    sock.listen(4096)  # a burst of clients queues here (net.core.somaxconn caps it)
    return sock


def notify_ready() -> None:
    """sd_notify READY=1 when started by systemd with Type=notify."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    addr = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(b"READY=1\nSTATUS=serving\n", addr)


def drop_privileges(keep: tuple[int, ...] = (12, 21, 1, 19)) -> None:
    """Drop every capability but CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21: setns), CAP_DAC_OVERRIDE (1:
    the daemon's control socket) and CAP_SYS_PTRACE (19: pidfd_getfd for `btns token`), from the
    bounding set too, and forbid gaining new ones (no_new_privs)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
    for cap in range(0, 41):
        if cap not in keep:
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    mask = [0, 0]
    for cap in keep:
        mask[cap // 32] |= 1 << (cap % 32)
    hdr = Header(0x20080522, 0)
    data = (Data * 2)(Data(mask[0], mask[0], 0), Data(mask[1], mask[1], 0))
    if libc.capset(ctypes.byref(hdr), data) != 0:
        log.warning("capset failed: %s", os.strerror(ctypes.get_errno()))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def run(
    config: Config,
    socket_path: str | None = None,
    metrics_at: str | None = None,
    drop: bool = True,
    leap: str | None = None,
    workers: int | None = None,
) -> None:
    """Start serving (the body of ``btns daemon`` / ``btnsd``); ``leap``: "[HOST:]PORT" of the
    leap-of-faith learner (README "Leap of faith"), None: off unless a backend's options turn it on;
    ``workers``: worker processes that read the clients (None: the config's, else
    :func:`.workers.default_count`; 1: none, this process reads every client, as before workers)."""
    from .workers import default_count

    count = workers if workers is not None else config.workers if config.workers is not None else default_count()
    if count < 1:
        raise BtnsError(f"--workers must be at least 1, got {count}", errno.EINVAL)
    metrics = Metrics(metrics_at is not None)
    if leap is not None:
        config = dataclasses.replace(
            config,
            backends=tuple(
                {**o, "leap_of_faith": "yes", "leap_port": str(leap_address(leap)[1])} for o in config.backends
            ),
        )
    listener = listen_socket(socket_path or config.socket)
    if drop and os.geteuid() == 0:
        drop_privileges()
    # Workers are forked now: after the listener and the drop (they inherit the reduced
    # capabilities), before any thread or backend exists in this process.
    pool = WorkerPool(count, config, metrics.enabled, listener) if count > 1 else None
    try:
        server = Server(config, listener, metrics, workers=pool)
        if metrics_at:
            metrics.serve(metrics_at)
        stale = lifecycle.sweep_stale()  # what a killed btnsd (or library process) left loaded
        if stale:
            log.info("unloaded stale connections of dead owners: %s", ", ".join(stale))
    except BaseException:
        if pool is not None:
            pool.stop()
        raise
    learners = start_learners(server, leap)  # after the drop: threads inherit the reduced capabilities
    log.info(
        "btnsd serving on %s with backends %s, %d worker processes",
        socket_path or config.socket,
        ", ".join(f"{b.name}@{b.options.get('netns') or 'own netns'}" for b in server.backends),
        len(pool.alive()) if pool is not None else 0,
    )
    notify_ready()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        if pool is not None:
            pool.stop()
        for learner in learners:
            learner.stop()
        listener.close()


def leap_address(spec: str) -> tuple[str, int]:
    """ "[HOST:]PORT" / "[V6]:PORT" / "HOST:PORT" -> (host, port); the host defaults to "::" (dual stack)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "", spec
    return (host.strip("[]") or "::"), int(port)


def start_learners(server: Server, leap: str | None) -> list[Any]:
    """One leap-of-faith learner per strongSwan backend with option ``leap_of_faith`` (in its namespace)."""
    from .. import leap as leap_mod

    learners = []
    for be in server.backends:
        if be.name != "strongswan" or not leap_mod.enabled(be.options):
            continue
        from ..leap.responder import Responder

        host, port = leap_address(leap) if leap else ("::", leap_mod.port(be.options))
        learners.append(Responder(be.options, host=host, port=port).start())
        log.info("leap of faith: learner on udp [%s]:%d for %s", host, port, be.options.get("netns") or "own netns")
    return learners


__all__ = ["Config", "Server", "listen_socket", "notify_ready", "run"]
