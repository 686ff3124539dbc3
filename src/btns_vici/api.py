"""The pythonic API: sockets in, verified tokens out (draft sections 2.3.3 and 2.3.4).

``get_socket_ptoken`` answers "is this socket protected, by what, and who is on
the other end?" from the selected backend; a flow counts as protected only when
the IKE daemon has an installed CHILD_SA for it AND the data plane proves it
carries it. Anything less yields a pToken with privacy and integrity DISABLE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import socket
import threading
from typing import Any

from . import guard, lifecycle, rtnl
from .authority import Authority, BackendLike
from .authority import resolve_backend as resolve_backend  # the public path: btns_vici.api
from .authority import set_default_backend as set_default_backend
from .backend import Backend
from .broker.client import BrokerClient
from .core.derive import ptoken_for
from .core.errors import BackendError, BtnsError, RequirementNotMetError
from .core.records import Protection, SocketView
from .core.requirements import is_no_demand, is_opportunistic, operator_policy, satisfies
from .core.selectors import Flow
from .core.tokens import PToken
from .latch import latch, latch_of
from .protection import ptoken_of, ptoken_of_flow, require
from .sockets import (
    FileDescriptorLike,
    endpoint,
    inspect,
    is_connected,
    resolve_fd,
    socket_key,
    source_address,
    view_of,
)


class _Registry(dict[tuple[int, int], PToken]):
    """pTokens attached to sockets, by socket identity (st_dev, st_ino): live sockets only.

    Entries of sockets that are no longer open anywhere in the process (every descriptor of
    them closed) are swept whenever the registry doubles since the last sweep (amortized O(1)
    per insert), so a server accepting any number of connections keeps it bounded by about
    twice its open sockets (plus :attr:`floor`).
    """

    floor = 256

    def __init__(self) -> None:
        super().__init__()
        self._limit = self.floor
        self._sweeping = threading.Lock()

    def __setitem__(self, key: tuple[int, int], value: PToken) -> None:
        super().__setitem__(key, value)
        if len(self) > self._limit:
            self.sweep()

    def sweep(self) -> None:
        with self._sweeping:
            live = lifecycle.open_socket_keys()
            for key in [k for k in list(self) if k not in live]:
                self.pop(key, None)
            self._limit = max(self.floor, 2 * len(self))


#: pTokens attached with set_socket_ptoken, by socket identity (per process, as the draft says).
_attached: _Registry = _Registry()


def _local(be: Authority, what: str) -> Backend:
    if isinstance(be, BrokerClient):
        raise BtnsError(
            f"{what} needs a backend in this process: btnsd answers only for sockets it receives", errno.EOPNOTSUPP
        )
    return be


def ptoken_for_flow(flow: Flow, backend: BackendLike = None) -> PToken:
    """The verified pToken (draft section 2.3.2) of a bare flow, judged as an unbound, unmarked socket
    of the backend's namespace. For a real socket use :func:`get_socket_ptoken` (section 2.3.3): it
    judges that very socket."""
    return ptoken_of_flow(flow, _local(resolve_backend(backend), "ptoken_for_flow"))


def get_socket_ptoken(sock: FileDescriptorLike, backend: BackendLike = None) -> PToken:
    """The protection of a socket (draft 2.3.3, ``ipsec_get_socket_pToken``).

    A connected socket gets the pToken of its flow, verified now. An unconnected
    socket gets the pToken attached with :func:`set_socket_ptoken`, or ENOTCONN.
    """
    key, view = inspect(sock)  # one dup/fstat: this is the hot path
    lt = latch_of(key)
    if lt is not None and (view is not None or lt.broken is not None):
        return lt.check()  # ProtectionLostError once the latch broke (also after SOCK_DESTROY unconnected it)
    if view is None:
        attached = _attached.get(key)
        if attached is None:
            raise BtnsError("socket is not connected and has no pToken attached", errno.ENOTCONN)
        return attached.copy()
    be = resolve_backend(backend)
    if isinstance(be, BrokerClient):
        return be.get_socket_ptoken(sock)
    return ptoken_of(view, be)  # (with a failed "btns:use" attempt's reason)


def set_socket_ptoken(sock: FileDescriptorLike, ptoken: PToken, backend: BackendLike = None) -> None:
    """Attach ``ptoken`` to a socket so its requirements are enforced (draft 2.3.3)."""
    resolve_fd(sock)
    ptoken.check_live()
    if is_connected(sock):
        raise BtnsError("socket is already connected: a pToken must be set before connect()/listen()", errno.EISCONN)
    try:
        be = resolve_backend(backend)
    except BackendError as exc:
        raise BackendError(f"ipsec_set_socket_pToken needs a running IKE daemon: {exc.strerror}") from None
    if isinstance(be, BrokerClient):
        be.set_socket_ptoken(sock, ptoken)
    else:
        be.enforce(sock, ptoken)
    _attached[socket_key(sock)] = ptoken.copy()


def attached_ptoken(sock: FileDescriptorLike) -> PToken | None:
    """The pToken attached to ``sock`` with set_socket_ptoken (draft section 2.3.3, Figure 9), if any
    (a copy)."""
    tok = _attached.get(socket_key(sock))
    return tok.copy() if tok else None


def _demand_or_none(sock: FileDescriptorLike) -> PToken | None:
    return _attached.get(socket_key(sock))


def connect(sock: socket.socket, address: tuple[Any, ...], backend: BackendLike = None, latch_: bool = True) -> None:
    """connect() for a socket with a pToken: establish an SA meeting it, connect, verify, latch (the
    pToken "effective" once attached, draft section 2.3.3).

    Without an attached pToken this is ``sock.connect(address)``. With one, the
    backend negotiates an SA for the flow first; after connecting, the actual
    protection is checked against the pToken: a shortfall shuts the socket down
    and raises EACCES. The connection is then latched (see :mod:`btns_vici.latch`).
    The same in two steps around your own connect (an event loop's, say):
    :func:`prepare_connect` and :func:`finish_connect`.
    """
    if not prepare_connect(sock, address, backend):
        sock.connect(address)
        return
    sock.connect(address)
    finish_connect(sock, backend, latch_)


def prepare_connect(sock: socket.socket, address: tuple[Any, ...], backend: BackendLike = None) -> bool:
    """Before connecting: have the IKE daemon bring up an SA meeting the socket's pToken (False: none set)."""
    demand = _demand_or_none(sock)
    if demand is None or is_no_demand(demand):
        return False
    be = resolve_backend(backend)
    if isinstance(be, BrokerClient):  # the broker negotiates for the socket it receives
        remote, rport = endpoint(address)
        be.prepare_connect(sock, (str(remote), rport))
        return True
    remote, rport = endpoint(address)
    view = _prospective_view(sock, remote, rport, be)  # this socket's device, mark, namespace
    prospective = view.flow
    existing = be.protect(view)
    if isinstance(existing, Protection) and satisfies(demand, ptoken_for(existing)):
        if existing.proof.dataplane == guard.XFRM:
            # The kernel matches a socket policy's reqid exactly: name the SA that will carry us.
            guard.apply(sock, guard.XFRM, reqid=existing.child_sa.reqid)
        lifecycle.own(be, existing.ike_sa.name, sock)  # an SA of ours: held open while we use it
    else:
        name = be.establish(prospective, demand)
        lifecycle.own(be, name, sock)  # unloaded when its last socket closes or we exit
        # The operator's SA has its own reqid: the guard must name it. "btns:use" that got an SA is
        # held to it from now on (required, not optional: it is latched like any protected connection).
        if operator_policy(demand) is not None or (is_opportunistic(demand) and name):
            found = be.find_sa(prospective)
            if found is not None:
                dp = be.capabilities().dataplane
                guard.apply(sock, dp, reqid=found[1].reqid if dp == guard.XFRM else 0)
    return True


def _prospective_view(
    sock: socket.socket, remote: ipaddress.IPv4Address | ipaddress.IPv6Address, rport: int, be: Backend
) -> SocketView:
    """The view of ``sock`` for the flow its connect to (``remote``, ``rport``) will have.

    One read of the socket's keys (device, mark, uid, TOS, namespace). Its source address: the
    bound one, else the kernel's choice for exactly those keys, asked through the backend's
    event-fed routing view (rtnl: one netlink round trip, none while routing has not changed)
    when the socket lives in the backend's namespace; else :func:`sockets.source_address`
    (a probe from the socket's own namespace).
    """
    proto = socket.IPPROTO_TCP if sock.type == socket.SOCK_STREAM else socket.IPPROTO_UDP
    bound = endpoint(sock.getsockname())[0]
    unspecified = ipaddress.ip_address("::" if remote.version == 6 else "0.0.0.0")
    view = view_of(sock, Flow(proto, bound if not bound.is_unspecified else unspecified, 0, remote, rport))
    if not bound.is_unspecified:
        return view
    local: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if view.netns is not None and not view.unknown and view.netns == be.netns_id and not view.dontroute:
        rt = rtnl.routing(be.options.get("netns") or None)
        if rt.netns_id == view.netns:
            ans = rt.lookup(remote, oif=view.oif, mark=view.mark, uid=view.uid, tos=view.tos, proto=proto, dport=rport)
            if ans.error == 0 and ans.prefsrc:
                local = ipaddress.ip_address(ans.prefsrc)
    if local is None:
        local = source_address(sock, remote)
    return dataclasses.replace(view, flow=Flow(proto, local, 0, remote, rport))


def finish_connect(sock: socket.socket, backend: BackendLike = None, latch_: bool = True) -> PToken | None:
    """After connecting: verify the connection meets the socket's pToken (EACCES and shut down if not), latch it."""
    demand = _demand_or_none(sock)
    if demand is None:
        return None
    be = resolve_backend(backend)
    actual = _verify_or_abort(sock, demand, be)
    if latch_ and actual.protected:  # a demand met in clear (all ANY, "btns:use") has nothing to latch
        latch(sock, be, shutdown=True, verified=actual)  # just verified for this socket: not read again
    return actual


def listen(sock: socket.socket, backlog: int = 128, backend: BackendLike = None) -> None:
    """listen() for a socket with a pToken: the backend accepts peers that meet it (draft section 2.3.3)."""
    demand = _demand_or_none(sock)
    if demand is not None:
        be = resolve_backend(backend)
        if isinstance(be, BrokerClient):
            be.prepare_listen(sock)
        else:
            lifecycle.own(be, be.serve(endpoint(sock.getsockname())[0], demand), sock)
    sock.listen(backlog)


def accept(
    sock: socket.socket, backend: BackendLike = None, latch_: bool = True
) -> tuple[socket.socket, tuple[Any, ...]]:
    """accept() held to the listening socket's pToken (draft section 2.3.3): a connection that does
    not meet it is closed and EACCES raised; an accepted one is latched."""
    conn, addr = sock.accept()
    demand = _demand_or_none(sock)
    if demand is None:
        return conn, addr
    be = resolve_backend(backend)
    try:
        actual = admit(conn, demand, be)  # adopts the responder connection it came in by (lifecycle)
        if latch_ and actual.protected:
            latch(conn, be, shutdown=True, verified=actual)
    except BtnsError:
        conn.close()  # also when the latch failed (the SA went meanwhile): never leak the connection
        raise
    return conn, addr


def admit(conn: socket.socket, demand: PToken, backend: BackendLike = None) -> PToken:
    """For a connection already accepted (by an event loop, say): check it meets ``demand`` (EACCES and
    shut down if not) and attach the demand to it, as :func:`accept` does. Returns its pToken."""
    be = resolve_backend(backend)
    actual = _verify_or_abort(conn, demand, be)
    _attached[socket_key(conn)] = demand.copy()
    if isinstance(be, Backend):  # the responder connection it came in by stays while it is open
        lifecycle.adopt(be, conn, actual.policy_name if actual.protected else None)
    return actual


def _verify_or_abort(sock: socket.socket, demand: PToken, be: Authority) -> PToken:
    if isinstance(be, BrokerClient):
        try:
            return be.verify(sock, demand)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            raise
    try:
        return require(demand, view_of(sock), be)
    except RequirementNotMetError:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise
