"""Acquire-driven negotiation and latches for plain sockets on kernel XFRM (issue 16, items 1 and 2).

After ``ipsec_set_socket_pToken`` a program calls its own ``connect(2)``/``listen(2)``; no
wrapper runs. On kernel XFRM the demand is armed as a **trap** the kernel itself acts on:

* the socket gets a mark of its own, ``SO_MARK`` = :data:`MARK_BIT` | the low 31 bits of its
  ``SO_COOKIE`` (unique per socket), and a per-socket **in** policy requiring ESP;
* a global **out** policy selects exactly that mark (mask ``0xffffffff``, any address, priority
  :data:`TRAP_PRIORITY`) with an ESP transport-mode template (the library's reqid). Its first
  packet finds no SA: the kernel queues it on the policy (``net.core.xfrm_larval_drop = 0``,
  set by the responder for the namespace and restored when it stops) and multicasts an
  ACQUIRE naming the flow and the policy's mark;
* the :class:`Responder` of the namespace (a thread; in-process for root, in btnsd for
  everyone else) maps the mark back to the socket's demand and has the IKE daemon negotiate an
  SA meeting it for exactly that destination (the backend's ``establish``). Then it re-inserts
  the trap policy (``XFRM_MSG_UPDPOLICY``): the kernel moves the queued packets to the new
  policy and re-sends them at once through the SA. A blocking ``connect`` simply waits; the SYN
  never leaves in clear. A negotiation that fails destroys the socket (``SOCK_DESTROY``): the
  ``connect`` fails with ECONNABORTED, nothing was sent.

``btns:use`` ("IPsec if the peer can, else clear"): the trap's template is optional. The kernel
still raises the ACQUIRE (``xfrm_state_find`` ignores ``optional``) but lets the packet go in
clear (``xfrm_tmpl_resolve_one`` skips an optional template without a valid state); once the
negotiated SA is up the trap is re-inserted with a required template (the insertion bumps the
route generation, so the socket's next segment is routed through the SA). A failed attempt
leaves the connection in clear, with the reason (:func:`clear_reason`). Not verified, not latched.

Every sweep (:data:`SWEEP_SECONDS`) the responder lists its namespace's sockets (sock_diag)
and, for the marks it armed: verifies a newly established connection against its demand (a
shortfall destroys it), re-checks latched ones (also on every SA event of the backend and of
the kernel), destroys those whose latch broke, and removes the trap of every socket that is gone.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import forksafe
from . import netns as _netns
from .core.errors import BtnsError
from .core.records import SocketView
from .core.requirements import operator_policy, unmet
from .core.selectors import Flow
from .core.tokens import PToken
from .protection import explains_clear
from .sockets import SIOCGSKNS, borrowed_socket, check_inet
from .xfrm._records import XfrmEvent

log = logging.getLogger(__name__)

#: Marks of trapped sockets: this bit plus the low 31 bits of the socket's cookie.
MARK_BIT = 0x8000_0000
#: The trap policies' priority: ahead of every policy the IKE daemon or an operator installs.
TRAP_PRIORITY = 0
#: The backstop's priority (see :func:`backstop_message`): right behind the traps.
BACKSTOP_PRIORITY = 1
#: How often the responder looks at its sockets (verification, latches, removal of traps).
SWEEP_SECONDS = 0.05
#: The longest a negotiation the kernel asked for may take (the backend's initiate timeout).
NEGOTIATION_MS = 10000
#: How often the sweep runs when no client socket waits for verification (listeners' accepted
#: connections are verified within this; the kernel holds them to ESP meanwhile).
IDLE_SWEEP_SECONDS = 1.0
#: How often latched connections are re-checked without an SA event (events re-check at once).
LATCH_SECONDS = 1.0
#: How often an armed socket sock_diag does not list yet is looked for among its owner's descriptors.
OWNER_CHECK_SECONDS = 1.0
#: How long a new connection may look unprotected to the backend before it is judged (its SA index is
#: fed by events and can lag the kernel by a moment; the kernel holds the socket to ESP meanwhile).
VERIFY_GRACE = 2.0
#: How long a latched connection may look to have NO SA at all before its latch counts as broken:
#: a reauthentication (make-before-break) or rekey replaces the SA, and the event-fed index can
#: see the old one go before the new one comes. The kernel holds the socket to ESP meanwhile
#: (required templates both ways), so nothing leaves or is accepted in clear. Any other shortfall
#: (another peer identity, weaker algorithms) breaks the latch at once.
LATCH_GRACE = 2.0
#: TCP states with a peer that has been answered (not SYN-SENT, SYN-RECV, TIME-WAIT, CLOSE, LISTEN).
CONNECTED_TCP_STATES = frozenset({1, 4, 5, 8, 9, 11})
LARVAL_DROP = "/proc/sys/net/core/xfrm_larval_drop"

XFRM_MSG_NEWPOLICY, XFRM_MSG_DELPOLICY, XFRM_MSG_UPDPOLICY = 19, 20, 25
XFRMA_TMPL, XFRMA_MARK = 5, 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
SO_COOKIE = 57
_NLMSGHDR = struct.Struct("=IHHII")


def cookie_of(sock: socket.socket) -> int:
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def mark_for(cookie: int) -> int:
    return MARK_BIT | (cookie & 0x7FFF_FFFF)


# ---- trap policies (XFRM netlink) ----------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def trap_message(kind: int, family: int, mark: int, reqid: int, optional: bool = False) -> bytes:
    """XFRM_MSG_NEW/UPD/DELPOLICY for the out trap of ``mark`` (pure; see the module docstring).

    ``optional``: the template is optional (``btns:use``, :class:`Trapped`): with no SA the kernel
    still raises the ACQUIRE but sends the packet in clear."""
    from .xfrm import _wire as wire
    from .xfrm._socket import socket_template

    mark_attr = _attr(XFRMA_MARK, struct.pack("=II", mark, 0xFFFF_FFFF))
    if kind == XFRM_MSG_DELPOLICY:  # xfrm_userpolicy_id: selector, index 0 (by selector), dir out
        body = wire.USERPOLICY_ID.pack(wire.encode_selector(family), 0, 1) + mark_attr
    else:
        tmpl = socket_template("esp", reqid=reqid, family=family, level="use" if optional else "required")
        body = wire.encode_userpolicy_info(family, 1, priority=TRAP_PRIORITY) + _attr(
            XFRMA_TMPL, wire.encode_template(tmpl)
        )
        body += mark_attr
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body


def backstop_message(kind: int, family: int) -> bytes:
    """XFRM_MSG_NEW/DELPOLICY for the backstop: every packet of a socket with :data:`MARK_BIT` in
    its mark that no trap (priority 0) selects is dropped (action block, priority 1): a marked
    socket whose trap is gone (its responder killed, say) fails closed instead of sending clear."""
    from .xfrm import _wire as wire

    mark_attr = _attr(XFRMA_MARK, struct.pack("=II", MARK_BIT, MARK_BIT))
    if kind == XFRM_MSG_DELPOLICY:
        body = wire.USERPOLICY_ID.pack(wire.encode_selector(family), 0, 1) + mark_attr
    else:
        body = wire.encode_userpolicy_info(family, 1, priority=BACKSTOP_PRIORITY, action=1) + mark_attr
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body


def _xfrm_request(nl: socket.socket, msg: bytes) -> None:
    nl.send(msg)
    reply = nl.recv(65536)
    if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == 2:  # NLMSG_ERROR
        err = -struct.unpack_from("=i", reply, 16)[0]
        if err:
            raise OSError(err, f"XFRM trap policy: {os.strerror(err)}")


# ---- the registry of trapped sockets -------------------------------------------------------------


@dataclass
class Trapped:
    """One socket armed with a trap: its identity, demand and what happened to it."""

    mark: int
    cookie: int
    family: int
    proto: int
    demand: PToken
    reqid: int
    negotiated: dict[str, str] = field(default_factory=dict)  # remote address -> connection name
    failed: dict[str, str] = field(default_factory=dict)  # remote address -> why no SA could be had
    #: by socket cookie (a listener's accepted sockets share its mark): the latched pToken
    verified: dict[int, PToken] = field(default_factory=dict)
    broken: dict[int, str] = field(default_factory=dict)  # cookie -> why its latch broke
    done: set[int] = field(default_factory=set)  # cookies destroyed: not looked at again
    first_seen: dict[int, float] = field(default_factory=dict)  # cookie -> when first seen connected
    inode: int = 0  # the socket's inode (what /proc/PID/fd links name)
    owner: int = 0  # the process that holds it (ours; btnsd: the client's)
    seen: bool = False  # sock_diag has listed it (once connected or listening)
    checked: float = 0.0  # when its owner's descriptors were last looked at
    policy: Owner | None = None  # btnsd: the client's admission and ownership hooks
    listening: bool = False  # a listener (its accepted connections share the mark)
    #: ``btns:use``: IPsec if the peer can, else clear. The trap's template is optional (the kernel
    #: asks for an SA but sends in clear meanwhile) until an SA is negotiated, then required
    #: (:attr:`optional` False): from the first ESP packet on, never clear again. Not verified, not
    #: latched (README "Enforcement").
    use: bool = False
    optional: bool = False
    clear: dict[str, str] = field(default_factory=dict)  # use: remote address -> why it stays clear
    lost: dict[int, float] = field(default_factory=dict)  # latched cookie -> since when it looks SA-less


class Responder:
    """The ACQUIRE responder and plain-socket latch of one network namespace and backend."""

    def __init__(self, ns_fd: int, backend: Any, establish: Callable[[Flow, PToken], tuple[str, int]]) -> None:
        self.ns_fd = ns_fd  # ours (a dup), kept open: the namespace stays reachable
        self.backend = backend
        self.establish = establish
        self.lock = threading.Lock()
        self.sockets: dict[int, Trapped] = {}  # by mark
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="btns-acquire")
        self._inflight: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pending = False  # a client socket's connection is still to be verified: sweep fast
        self._grace = False  # a latched connection looks SA-less (LATCH_GRACE): re-check every sweep
        self._larval_before: str | None = None
        from .xfrm._monitor import XfrmMonitor

        with self._entered():
            self._nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 6)
            self._nl.bind((0, 0))
            self._nl.settimeout(2.0)
            self._set_larval_drop()
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    _xfrm_request(self._nl, backstop_message(XFRM_MSG_NEWPOLICY, family))
                except FileExistsError:
                    pass  # another responder (or an earlier one, killed) put it there: it stays
            from . import inetdiag as _inetdiag

            self._diag = _inetdiag.open_socket()
        self._nl_lock = threading.Lock()
        self._diag_lock = threading.Lock()
        self._in_lock = threading.Lock()
        self._known_in: set[int] | None = None  # socket in policy indexes at our last dump
        self._monitor = XfrmMonitor(("acquire", "expire", "sa"), f"/proc/self/fd/{ns_fd}")
        self._stop_events: Callable[[], None] | None = None
        with contextlib.suppress(Exception):
            self._stop_events = backend.watch(lambda _event: self._wake.set())
        self._thread = threading.Thread(target=self._run, name="btns-acquire-responder", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def _entered(self):  # type: ignore[no-untyped-def]
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _netns.setns(self.ns_fd)
            try:
                yield
            finally:
                _netns.setns(own)
        finally:
            os.close(own)

    def _set_larval_drop(self) -> None:
        """Queue a trapped socket's packets while its SA is negotiated (instead of dropping them)."""
        try:
            with open(LARVAL_DROP) as f:
                self._larval_before = f.read().strip()
            if self._larval_before != "0":
                with open(LARVAL_DROP, "w") as f:
                    f.write("0")
        except OSError as exc:
            log.warning("cannot set %s: %s (the first packet is dropped and resent)", LARVAL_DROP, exc)
            self._larval_before = None

    # -- arming ---------------------------------------------------------------------------------

    def arm(self, sock: socket.socket, demand: PToken, reqid: int, use: bool = False) -> int:
        """Mark ``sock``, add its trap policy and register its demand; the mark. ``use``: the
        demand is ``btns:use`` (optional template and in policy until an SA is negotiated)."""
        cookie = cookie_of(sock)
        mark = mark_for(cookie)
        proto = socket.IPPROTO_TCP if sock.type == socket.SOCK_STREAM else socket.IPPROTO_UDP
        entry = Trapped(mark, cookie, sock.family, proto, demand.copy(), reqid, use=use, optional=use)
        owner = _owner.get()
        entry.inode, entry.owner = os.fstat(sock.fileno()).st_ino, owner.pid if owner else os.getpid()
        entry.policy = owner
        entry.checked = time.monotonic()
        with self.lock:
            fresh = mark not in self.sockets
            self.sockets[mark] = entry
        if fresh:
            with self._nl_lock:
                _xfrm_request(self._nl, trap_message(XFRM_MSG_NEWPOLICY, sock.family, mark, reqid, use))
        else:  # set again on the same socket: the new reqid
            self.kick(entry)
        try:  # the trap is in place before the mark: a marked socket is never without it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", mark))
            self._set_in_policy(sock, "use" if use else "required")
        except BaseException:
            self._disarm(entry)
            raise
        self._pending = self._pending or not use
        return mark

    def _set_in_policy(self, sock: socket.socket, level: str = "required") -> None:
        """The socket's in policy (ESP required, reqid 0: any transport SA whose selector is this
        flow, an operator's too), its SPD index learnt as :func:`btns_vici.xfrm.set_socket_policy`
        does, from the socket policies before and after, but reading only the index of each entry
        (the full decode costs ~50 us per policy, and every trapped socket adds two)."""
        import dataclasses

        from .xfrm import _socket

        with self._in_lock:
            before = self._known_in if self._known_in is not None else self._socket_in_indexes()
            policy = _socket.set_socket_policy(sock, "in", ["esp"], level=level, reqid=0)
            after = self._socket_in_indexes()
            self._known_in = after  # the next socket's "before": one dump per socket, not two
        new = after - before
        if len(new) == 1:  # unambiguous: nobody else added one since (else the index stays unknown)
            _socket.record(sock, dataclasses.replace(policy, index=new.pop()))

    def _socket_in_indexes(self) -> set[int]:
        """SPD indexes of the namespace's per-socket in policies (one dump, headers only)."""
        from .xfrm import _wire as wire

        out: set[int] = set()
        dir_at = _NLMSGHDR.size + wire.SELECTOR.size + wire.LIFETIME_CFG.size + wire.LIFETIME_CUR.size + 8
        with self._nl_lock:
            self._nl.send(_NLMSGHDR.pack(_NLMSGHDR.size, wire.XFRM_MSG_GETPOLICY, NLM_F_REQUEST | 0x300, 2, 0))
            while True:
                data = self._nl.recv(1 << 20)
                for raw in wire.split_messages(data):
                    _length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(raw)
                    if mtype == 3:  # NLMSG_DONE
                        return out
                    if mtype == 2:  # NLMSG_ERROR
                        (code,) = struct.unpack_from("=i", raw, _NLMSGHDR.size)
                        if code:
                            raise OSError(-code, f"XFRM policy dump: {os.strerror(-code)}")
                        return out
                    if len(raw) > dir_at and raw[dir_at] == 3:  # XFRM_POLICY_MAX + XFRM_POLICY_IN
                        out.add(struct.unpack_from("=I", raw, dir_at - 4)[0])

    def kick(self, entry: Trapped) -> None:
        """Re-insert the trap policy: the kernel re-sends what it queued on it (now through the SA)."""
        with self._nl_lock:
            _xfrm_request(
                self._nl, trap_message(XFRM_MSG_UPDPOLICY, entry.family, entry.mark, entry.reqid, entry.optional)
            )

    def _disarm(self, entry: Trapped) -> None:
        with self.lock:
            self.sockets.pop(entry.mark, None)
        with self._nl_lock, contextlib.suppress(OSError):
            _xfrm_request(self._nl, trap_message(XFRM_MSG_DELPOLICY, entry.family, entry.mark, 0))

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = next_latch = 0.0
        while not self._stop.is_set():
            for item in self._monitor.poll(SWEEP_SECONDS):
                kind = item.kind if isinstance(item, XfrmEvent) else ""
                if kind == "acquire" and isinstance(item, XfrmEvent) and item.acquire is not None:
                    try:
                        self._on_acquire(item.acquire)
                    except Exception:
                        log.exception("ACQUIRE not answered")  # the socket waits, then times out: closed
                elif kind in ("del-sa", "expire", "flush-sa"):
                    self._wake.set()
            now = time.monotonic()
            if now >= next_sweep or self._wake.is_set():
                latches = self._wake.is_set() or now >= next_latch or self._grace
                self._wake.clear()
                # Fast while a client socket waits for its connection to be verified; a listener's
                # accepted connections (and latches without events) are looked at every second.
                next_sweep = now + (SWEEP_SECONDS if self._pending or self._grace else IDLE_SWEEP_SECONDS)
                if latches:
                    next_latch = now + LATCH_SECONDS
                try:
                    self.sweep(latches)
                except Exception:
                    log.exception("acquire responder sweep failed")

    def _on_acquire(self, acq: Any) -> None:
        mark = acq.policy.mark.value if acq.policy.mark is not None else 0
        with self.lock:
            entry = self.sockets.get(mark)
        if entry is None:
            return  # not one of our traps (the IKE daemon answers its own)
        remote = str(acq.sel.daddr if not acq.sel.daddr.is_unspecified else acq.daddr)
        if remote in entry.failed and entry.proto == socket.IPPROTO_TCP:
            return  # the socket is being destroyed
        if entry.use and (remote in entry.clear or self._is_listener(entry)):
            # "use": tried once per peer (its packets go out in clear); a listener's accepted
            # connections use what the peer negotiates, they never initiate (no crossed IKE_SAs).
            return
        key = (mark, remote)
        with self.lock:
            if key in self._inflight:
                return
            self._inflight.add(key)
        local = acq.sel.saddr if not acq.sel.saddr.is_unspecified else acq.saddr
        flow = Flow(entry.proto, local, 0, ipaddress.ip_address(remote), acq.sel.dport)
        self._pool.submit(self._negotiate, entry, flow, key)

    def _is_listener(self, entry: Trapped) -> bool:
        """Whether ``entry`` is a listener's (its mark's sockets include one in LISTEN)."""
        if not entry.listening:
            entry.listening = any(m["idiag_state"] == 10 for m in self._dump().get(entry.mark, []))
        return entry.listening

    def _negotiate(self, entry: Trapped, flow: Flow, key: tuple[int, str]) -> None:
        from .core.derive import ptoken_for
        from .core.requirements import satisfies

        demand = without_policy(entry.demand) if entry.use else entry.demand
        try:
            if entry.policy is not None and entry.policy.admit is not None:
                entry.policy.admit(flow)  # btnsd: the client may negotiate with this peer (EACCES, EDQUOT)
            existing = self.backend.find_protection(flow)
            if existing is not None and satisfies(demand, ptoken_for(existing)):
                # An SA that meets the demand is up (an operator's, with its own reqid): the trap names it.
                entry.reqid, name = existing.child_sa.reqid, existing.ike_sa.name
            else:
                name, reqid = self.establish(flow, demand)
                if name and entry.policy is not None and entry.policy.own is not None:
                    entry.policy.own(name)
                if operator_policy(demand) is not None:
                    # The operator's SA has its own reqid: the one charon reports for it once the
                    # initiate returned (authoritative), else the event-fed index's.
                    entry.reqid = reqid or self._reqid_of(flow, entry.reqid)
            if entry.use:
                entry.optional = False  # an SA is up: from now on the kernel holds the socket to ESP
        except Exception as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            if entry.use and entry.optional:
                entry.clear[str(flow.remote_addr)] = why
                log.info("btns:use: no SA with %s (%s): the connection stays in clear", flow.remote_addr, why)
                return
            log.warning("no SA meeting the pToken for %s: %s; the socket is destroyed", flow, why)
            entry.failed[str(flow.remote_addr)] = why
            self._destroy(entry, f"negotiation failed: {why}", remote=str(flow.remote_addr))
        else:
            entry.negotiated[str(flow.remote_addr)] = name
            log.info("ACQUIRE for mark 0x%08x answered: %s (%s)", entry.mark, flow, name or "existing SA")
            self.kick(entry)
        finally:
            with self.lock:
                self._inflight.discard(key)

    def _reqid_of(self, flow: Flow, default: int) -> int:
        """The reqid of the SA now covering ``flow`` (the backend's index may lag the initiate a little)."""
        deadline = time.monotonic() + VERIFY_GRACE
        while True:
            found = self.backend.find_protection(flow)
            if found is not None:
                return int(found.child_sa.reqid) or default
            if time.monotonic() > deadline:
                return default
            time.sleep(0.02)

    # -- sockets: verification, latches, removal ------------------------------------------------

    def _dump(self) -> dict[int, list[dict[str, Any]]]:
        """Our namespace's sockets carrying a trap mark, by mark (a listener's accepted sockets share it)."""
        from . import inetdiag as _inetdiag

        out: dict[int, list[dict[str, Any]]] = {}
        marked = _inetdiag.mark_filter(MARK_BIT, MARK_BIT)  # the kernel keeps only trap-marked sockets
        with self._diag_lock:  # one dump at a time on the socket (the sweep and a negotiation's failure)
            msgs = [
                (proto, msg)
                for family in (socket.AF_INET, socket.AF_INET6)
                for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
                for msg in _inetdiag.dump(self._diag, family, proto, bytecode=marked)
            ]
        for proto, msg in msgs:
            raw = _inetdiag.attributes(msg).get(_inetdiag.INET_DIAG_MARK, b"")
            if len(raw) >= 4:
                mark = struct.unpack("=I", raw[:4])[0]
                if mark & MARK_BIT:
                    msg["proto"], msg["mark"] = proto, mark
                    out.setdefault(mark, []).append(msg)
        return out

    def sweep(self, latches: bool = True) -> None:
        """Look at the namespace's trapped sockets: traps of gone ones removed, new connections
        verified, and with ``latches`` the verified ones re-checked (on SA events, and every
        :data:`LATCH_SECONDS`: not on every sweep, each check costs a data-plane proof)."""
        with self.lock:
            entries = list(self.sockets.values())
        if not entries:
            return
        live = self._dump()
        for entry in entries:
            msgs = live.get(entry.mark)
            if not msgs:
                # sock_diag lists a TCP socket only once it is connecting, connected or listening. One
                # it listed is gone now (with every socket accepted from it); one it never listed is
                # gone when no descriptor of its owner names it any more.
                if entry.seen or self._gone(entry):
                    self._disarm(entry)
                continue
            entry.seen = True
            entry.listening = any(m["idiag_state"] == 10 for m in msgs)  # TCP_LISTEN
            if entry.use:
                continue  # "use": neither verified nor latched (the pToken read tells the truth)
            for msg in msgs:
                cookie = msg["idiag_cookie"]
                if cookie in entry.done:
                    continue
                why = entry.failed.get(str(msg["dst_addr"]))
                if why and msg["idiag_state"] == 2:  # SYN-SENT after a failed negotiation
                    entry.done.add(cookie)
                    self._destroy(entry, f"negotiation failed: {why}", msg)
                    continue
                if entry.proto == socket.IPPROTO_TCP and msg["idiag_state"] not in CONNECTED_TCP_STATES:
                    continue
                if msg["idiag_dport"] == 0 or (not latches and cookie in entry.verified):
                    continue
                self._check(entry, msg)
            alive = {m["idiag_cookie"] for m in msgs}
            for cookie in [c for c in entry.verified if c not in alive]:
                entry.verified.pop(cookie, None)
                entry.lost.pop(cookie, None)
            entry.done &= alive
        with self.lock:
            self._pending = any(
                not e.use and not e.listening and not e.verified and not e.done and not e.failed
                for e in self.sockets.values()
            )
            self._grace = any(e.lost for e in self.sockets.values())

    def _gone(self, entry: Trapped) -> bool:
        now = time.monotonic()
        if now - entry.checked < OWNER_CHECK_SECONDS:
            return False
        entry.checked = now
        return not _holds(entry.owner, entry.inode)

    def _view(self, msg: dict[str, Any]) -> SocketView:
        st = os.fstat(self.ns_fd)
        flow = Flow(msg["proto"], msg["src_addr"], msg["idiag_sport"], msg["dst_addr"], msg["idiag_dport"])
        return SocketView(
            flow=flow,
            netns=(st.st_dev, st.st_ino),
            key=(_sockfs_dev(), msg["idiag_inode"]),
            bound_ifindex=msg["idiag_if"],
            mark=msg["mark"],
            uid=msg["idiag_uid"],
        )

    def _check(self, entry: Trapped, msg: dict[str, Any]) -> None:
        """Verify a new connection against the demand, or re-check its latch; destroy it on a shortfall."""
        from .latch import latch_of
        from .protection import ptoken_of

        view = self._view(msg)
        cookie = msg["idiag_cookie"]
        if view.key is not None and latch_of(view.key) is not None:
            return  # btns_vici.connect/accept of this process verified and latched it (with its callback)
        actual = ptoken_of(view, self.backend)
        latched = entry.verified.get(cookie)
        if latched is None:
            problems = unmet(entry.demand, actual)
            first = entry.first_seen.setdefault(cookie, time.monotonic())
            if problems and not actual.protected and time.monotonic() - first < VERIFY_GRACE:
                return  # the backend's SA index may not have seen the new SA yet; the kernel holds it to ESP
            if problems:
                entry.done.add(cookie)
                self._destroy(entry, "does not meet the pToken: " + "; ".join(problems), msg)
            elif actual.protected:
                entry.verified[cookie] = actual
                log.info("plain connection %s verified and latched (mark 0x%08x)", view.flow, entry.mark)
            return
        reasons = unmet(latched, actual, policy=False)
        if reasons and not actual.protected:
            since = entry.lost.setdefault(cookie, time.monotonic())
            if time.monotonic() - since < LATCH_GRACE:
                self._grace = True
                return  # no SA at all for a moment (a reauthentication, a rekey): held to ESP meanwhile
        entry.lost.pop(cookie, None)
        if reasons:
            entry.done.add(cookie)
            entry.broken[cookie] = "; ".join(reasons)
            self._destroy(entry, "latch broken: " + entry.broken[cookie], msg)

    def _destroy(self, entry: Trapped, why: str, msg: dict[str, Any] | None = None, remote: str = "") -> None:
        """SOCK_DESTROY the socket ``msg`` describes, else every socket of the entry's mark that is
        connecting or connected to ``remote`` (never its listener)."""
        from . import sockdestroy

        if msg is not None:
            msgs = [msg]
        else:
            msgs = [
                m
                for m in self._dump().get(entry.mark, [])
                if m["idiag_dport"] and (not remote or str(m["dst_addr"]) == remote)
            ]
        if not msgs:
            log.info("no socket with mark 0x%08x left to destroy (%s)", entry.mark, why)
        for m in msgs:
            sid = sockdestroy.SocketId(
                m["idiag_family"],
                m["proto"],
                m["idiag_src"],
                m["idiag_sport"],
                m["idiag_dst"],
                m["idiag_dport"],
                m["idiag_cookie"],
            )
            try:
                sockdestroy.destroy_id(sid, self.ns_fd)
                log.warning("socket %s:%d -> %s:%d destroyed: %s", sid.src, sid.sport, sid.dst, sid.dport, why)
            except OSError as exc:
                log.warning("SOCK_DESTROY of %s failed (%s) after: %s", sid, exc.strerror, why)

    def _remove_backstop(self) -> None:
        """Remove the backstop unless a trap of another responder still needs it."""
        from . import xfrm

        try:
            pols = xfrm.dump_policies(f"/proc/self/fd/{self.ns_fd}")
        except OSError:
            return
        if any(p.mark is not None and p.mark.value & MARK_BIT and p.mark.mask == 0xFFFF_FFFF for p in pols):
            return
        for family in (socket.AF_INET, socket.AF_INET6):
            with self._nl_lock, contextlib.suppress(OSError):
                _xfrm_request(self._nl, backstop_message(XFRM_MSG_DELPOLICY, family))

    def status(self, mark: int) -> Trapped | None:
        with self.lock:
            return self.sockets.get(mark)

    def stop(self) -> None:
        """Stop the thread, remove every trap, restore the sysctl."""
        self._stop.set()
        self._thread.join(5)
        if self._stop_events is not None:
            with contextlib.suppress(Exception):
                self._stop_events()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            entries = list(self.sockets.values())
        for entry in entries:
            self._disarm(entry)
        self._remove_backstop()
        if self._larval_before not in (None, "0"):
            with self._entered(), contextlib.suppress(OSError), open(LARVAL_DROP, "w") as f:
                f.write(self._larval_before or "1")
        self._monitor.close()
        self._nl.close()
        self._diag.close()
        os.close(self.ns_fd)


def _holds(pid: int, inode: int) -> bool:
    """Whether process ``pid`` still has a descriptor of the socket ``inode`` (True when unsure)."""
    want = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False  # the process is gone
    except OSError:
        return True
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == want:
                return True
    return False


@dataclass(frozen=True)
class Owner:
    """Who holds the sockets armed in a context, and what may be negotiated for them.

    btnsd arms its clients' sockets: ``pid`` is the client's (SO_PEERCRED); ``admit(flow)`` raises
    (EACCES by policy, EDQUOT) before a negotiation for ``flow`` starts; ``own(name)`` records the
    connection the negotiation loaded as the client's (its quota; unloaded when the client leaves).
    """

    pid: int
    admit: Callable[[Flow], None] | None = None
    own: Callable[[str], None] | None = None


_owner: contextvars.ContextVar[Owner | None] = contextvars.ContextVar("btns_acquire_owner", default=None)


@contextlib.contextmanager
def owned_by(owner: Owner):  # type: ignore[no-untyped-def]
    """Sockets armed in the block belong to ``owner`` (btnsd: the client)."""
    token = _owner.set(owner)
    try:
        yield
    finally:
        _owner.reset(token)


_sockfs: list[int] = []


def _sockfs_dev() -> int:
    if not _sockfs:
        with socket.socket(socket.AF_UNIX) as s:
            _sockfs.append(os.fstat(s.fileno()).st_dev)
    return _sockfs[0]


# ---- one responder per (namespace, backend options) ----------------------------------------------

_responders: dict[tuple[tuple[int, int], tuple[tuple[str, str], ...]], Responder] = {}
_lock = threading.Lock()


_exit_hooks: list[object] = []


def _stop_at_exit() -> None:
    """Stop the responders when the process ends normally (traps removed, the sysctl restored).

    A Python program: ``atexit``. A C program using libbtns-ipsec (the interpreter is embedded
    and never finalized, so Python's atexit never runs): a C ``atexit`` handler too, which takes
    the GIL through ctypes. A process killed outright leaves ``xfrm_larval_drop`` at 0 (README
    "Enforcement": packets waiting for an SA are queued, never sent in clear).
    """
    if _exit_hooks:
        return
    import atexit

    atexit.register(stop_all)
    _exit_hooks.append(stop_all)
    if os.path.basename(os.readlink("/proc/self/exe")).startswith("python"):
        return
    import ctypes

    def at_exit(_arg: object) -> None:
        stop_all()

    hook = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(at_exit)
    _exit_hooks.append(hook)  # kept alive: the C library calls it at exit(3)
    try:  # glibc exports __cxa_atexit (atexit itself is linked statically into programs)
        ctypes.CDLL(None).__cxa_atexit(hook, None, None)
    except (AttributeError, OSError) as exc:
        log.warning("cannot register a C exit handler (%s): a C program leaves its traps to the sweep", exc)


def responder_for(sock: socket.socket, options: Any, backend_factory: Callable[[], Any], establish: Any) -> Responder:
    ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    st = os.fstat(ns_fd)
    key = ((st.st_dev, st.st_ino), tuple(sorted(dict(options).items())))
    with _lock:
        r = _responders.get(key)
        if r is None:
            r = _responders[key] = Responder(ns_fd, backend_factory(), establish)
            _stop_at_exit()
            return r
    os.close(ns_fd)
    return r


def arm(
    fd: Any,
    demand: PToken,
    reqid: int,
    options: Any,
    backend_factory: Callable[[], Any],
    establish: Callable[[Flow, PToken], tuple[str, int]],
    use: bool = False,
) -> str:
    """Arm the trap for ``fd`` (see the module docstring); a description for Enforcement.

    ``establish(flow, demand)`` negotiates an SA meeting ``demand`` for ``flow``: the connection's
    name and the reqid of its SA (0: unknown). ``use``: ``btns:use`` (optional until an SA is up)."""
    with borrowed_socket(fd) as sock:
        check_inet(sock)
        current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0xFFFF_FFFF
        if current and not current & MARK_BIT:
            raise BtnsError(f"the socket already carries mark 0x{current:x}", errno.EBUSY)
        r = responder_for(sock, options, backend_factory, establish)
        mark = r.arm(sock, demand, reqid, use)
    if use:
        return (
            f"trap: SO_MARK 0x{mark:08x}, SPD out policy (mark, ESP transport level use until an SA is up, "
            f"then required, reqid {reqid}), socket in policy ESP level use (opportunistic)"
        )
    return f"trap: SO_MARK 0x{mark:08x}, SPD out policy (mark, ESP transport, reqid {reqid}), socket in policy ESP"


def without_policy(demand: PToken) -> PToken:
    """``demand`` without its policyName (what a ``btns:use`` attempt negotiates)."""
    from .core.constants import Attr

    out = PToken()
    for attr, value in demand.attributes().items():
        if attr != Attr.policyName:
            out.set_attr(attr, value)
    return out


@explains_clear
def _use_reason(view: SocketView) -> str | None:
    """protection.with_use_reason's answer for a "btns:use" socket whose attempt failed."""
    if not view.mark or not view.mark & MARK_BIT:
        return None
    why = clear_reason(view.mark, str(view.flow.remote_addr))
    if not why:
        return None
    return f"btns:use: no SA could be negotiated with {view.flow.remote_addr} ({why}), so it talks in clear"


def clear_reason(mark: int, remote: str) -> str | None:
    """Why the ``btns:use`` socket of ``mark`` talks to ``remote`` in clear (None: not known so)."""
    with _lock:
        responders = list(_responders.values())
    for r in responders:
        entry = r.status(mark)
        if entry is not None and entry.use:
            return entry.clear.get(remote)
    return None


def trapped(fd: Any) -> Trapped | None:
    """The trap record of ``fd`` (None: not armed with a trap)."""
    with borrowed_socket(fd) as sock:
        mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0xFFFF_FFFF
    if not mark & MARK_BIT:
        return None
    with _lock:
        responders = list(_responders.values())
    for r in responders:
        entry = r.status(mark)
        if entry is not None:
            return entry
    return None


@forksafe.in_child
def _reset_after_fork() -> None:
    """A forked child answers nothing: the parent's responders keep serving the inherited sockets."""
    global _lock
    _responders.clear()
    _lock = threading.Lock()


def stop_all() -> None:
    """Stop every responder (tests, shutdown): their traps are removed, sysctls restored."""
    with _lock:
        items = list(_responders.values())
        _responders.clear()
    for r in items:
        r.stop()
