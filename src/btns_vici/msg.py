"""Datagram pTokens (draft 2.3.4): msghdr, ancillary data, and the library's send/receive path.

Linux has no per-packet IPsec control: the kernel never reads a pToken from
ancillary data. So (README: "Datagrams"):

* :func:`recvmsg` records where a datagram came from and which local address
  it reached (IP_PKTINFO / IPV6_RECVPKTINFO); ``ipsec_get_msg_pToken`` then
  reports the protection of that flow as verified at query time.
* ``ipsec_set_msg_pToken`` adds a private control message (level SOL_SOCKET,
  type :data:`BTNS_PTOKEN`, unknown to the kernel: a plain sendmsg of it fails
  with EINVAL, never sends unchecked) holding a per-process handle of the pToken;
  :func:`sendmsg` removes it, checks this socket's datagram satisfies the pToken
  right before sending, and refuses with EACCES otherwise. The check and the send are
  not atomic: an SA that disappears in between is not caught for that datagram.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import socket
import struct
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .authority import BackendLike, resolve_backend
from .backend import Backend
from .broker.client import BrokerClient
from .core.errors import BtnsError
from .core.records import IN, OUT, SocketView
from .core.selectors import Flow, normalize_address
from .core.tokens import PToken
from .protection import DATAGRAM_REFUSAL, require
from .sockets import (
    FileDescriptorLike,
    borrowed_socket,
    check_inet,
    endpoint,
    netns_of,
    resolve_fd,
    source_address,
    view_of,
)

#: Private cmsg level/type: never passed to the kernel ("BT", 1).
SOL_BTNS = 0x4254
#: The pToken's control message: level SOL_SOCKET and a type the kernel does not know, so that a
#: plain ``socket.sendmsg``/sendmsg(2) of a message carrying it fails with EINVAL instead of silently
#: sending unchecked; :func:`sendmsg` checks and strips it.
PTOKEN_LEVEL = socket.SOL_SOCKET
BTNS_PTOKEN = 0x4254
_HANDLE = struct.Struct("=Q")
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

_handles = itertools.count(1)
_registry: weakref.WeakValueDictionary[int, PToken] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


@dataclass
class MsgHdr:
    """A Python ``struct msghdr`` (draft section 2.3.4, Figure 10): name (peer address), iov, control
    (ancillary data), flags.

    ``local`` is the local (address, port) the datagram arrived on, ``ifindex`` the
    device it arrived by (IP_PKTINFO) and ``netns`` the (st_dev, st_ino) of the receiving
    socket's network namespace, all filled by :func:`recvmsg`; ``proto`` is the transport
    protocol. Without ``ifindex`` and ``netns`` a datagram cannot be proven protected.
    """

    iov: list[bytes] = field(default_factory=list)
    name: tuple[Any, ...] | None = None
    control: list[tuple[int, int, bytes]] = field(default_factory=list)
    flags: int = 0
    local: tuple[Any, ...] | None = None
    proto: int = socket.IPPROTO_UDP
    ifindex: int | None = None
    netns: tuple[int, int] | None = None
    #: the receiving socket (descriptor number and identity), for asking btnsd about the datagram
    _receiver: tuple[int, tuple[int, int]] | None = field(default=None, repr=False)
    _keep: list[PToken] = field(default_factory=list, repr=False)

    @property
    def data(self) -> bytes:
        return b"".join(self.iov)


def flow_of_msg(msg: MsgHdr) -> Flow:
    """The flow of a received datagram: its source (name) and where it arrived (local)."""
    if not isinstance(msg, MsgHdr):
        raise TypeError(f"msg must be a btns_vici.MsgHdr, not {type(msg).__name__}")
    if msg.name is None or msg.local is None:
        raise BtnsError("msghdr has no source/destination address (use btns_vici.recvmsg)", errno.EINVAL)
    try:
        raddr, rport = endpoint(msg.name)
        laddr, lport = endpoint(msg.local)
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        raise BtnsError(f"msghdr addresses are malformed: {exc}", errno.EINVAL) from None
    if raddr.version != laddr.version and normalize_address(raddr).version != normalize_address(laddr).version:
        raise BtnsError("msghdr source and destination are of different address families", errno.EINVAL)
    if not (0 <= rport <= 65535 and 0 <= lport <= 65535):
        raise BtnsError("msghdr port out of range", errno.EINVAL)
    return Flow(msg.proto, laddr, lport, raddr, rport)


def view_of_msg(msg: MsgHdr) -> SocketView:
    """A received datagram as the data-plane proof sees it: where it arrived, in which namespace."""
    unknown = []
    if msg.netns is None:
        unknown.append("the receiving socket's network namespace is unknown (receive with btns_vici.recvmsg)")
    if msg.ifindex is None:
        unknown.append(
            "the device it arrived on is unknown (no IP_PKTINFO when it was queued: receive with "
            "btns_vici.recvmsg after btns_vici.enable_pktinfo)"
        )
    return SocketView(
        flow=flow_of_msg(msg), netns=msg.netns, direction=IN, arrival_ifindex=msg.ifindex, unknown=tuple(unknown)
    )


def attach(msg: MsgHdr, ptoken: PToken) -> None:
    """ipsec_set_msg_pToken: put a handle of (a copy of) ``ptoken`` into msg's ancillary data."""
    if not isinstance(msg, MsgHdr):
        raise TypeError(f"msg must be a btns_vici.MsgHdr, not {type(msg).__name__}")
    copy = ptoken.copy()
    with _registry_lock:
        handle = next(_handles)
        _registry[handle] = copy
    msg._keep.append(copy)  # the msghdr keeps the token alive
    msg.control = [c for c in msg.control if c[:2] != (PTOKEN_LEVEL, BTNS_PTOKEN)]
    msg.control.append((PTOKEN_LEVEL, BTNS_PTOKEN, _HANDLE.pack(handle)))


def attached(msg: MsgHdr) -> PToken | None:
    """The pToken whose handle msg's ancillary data carries, if any."""
    for level, kind, data in msg.control:
        if (level, kind) == (PTOKEN_LEVEL, BTNS_PTOKEN):
            if len(data) != _HANDLE.size:
                raise BtnsError("malformed btns pToken control message", errno.EINVAL)
            tok = _registry.get(_HANDLE.unpack(data)[0])
            if tok is None:
                raise BtnsError("pToken control message refers to no live pToken", errno.EINVAL)
            return tok
    return None


def enable_pktinfo(sock: FileDescriptorLike) -> None:
    """Turn on IP_PKTINFO / IPV6_RECVPKTINFO now (recvmsg does it too, but only when first called), so
    that ``ipsec_get_msg_pToken`` (draft section 2.3.4, Figure 10) knows a datagram's arrival.

    The kernel records where a datagram arrived only if the option was on when the datagram
    was queued: a datagram queued before has an unknown arrival device, and its pToken
    says unprotected. Call this right after bind().
    """
    with _as_socket(sock) as s:
        check_inet(s)
        _enable_pktinfo(s)


def _enable_pktinfo(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)


def _pktinfo(sock: socket.socket, ancdata: list[tuple[int, int, bytes]]) -> tuple[tuple[Any, ...] | None, int | None]:
    """(local (address, port), arrival ifindex) from IP_PKTINFO / IPV6_PKTINFO, Nones if absent."""
    port = sock.getsockname()[1]
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            (ifindex,) = struct.unpack_from("=i", data, 0)  # struct in_pktinfo: ifindex, spec_dst, addr
            return (str(ipaddress.IPv4Address(data[8:12])), port), ifindex
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            (ifindex,) = struct.unpack_from("=i", data, 16)  # struct in6_pktinfo: addr, ifindex
            return (str(ipaddress.IPv6Address(data[:16])), port), ifindex
    return None, None


@contextlib.contextmanager
def _as_socket(sock: FileDescriptorLike) -> Iterator[socket.socket]:
    """The caller's socket object itself (keeping its timeout), or one borrowed for a bare fd."""
    if isinstance(sock, socket.socket):
        resolve_fd(sock)
        yield sock
    else:
        with borrowed_socket(sock) as s:
            yield s


def recvmsg(sock: FileDescriptorLike, bufsize: int, ancbufsize: int = 256, flags: int = 0) -> MsgHdr:
    """Receive one datagram like socket.recvmsg, recording both addresses for ``ipsec_get_msg_pToken``
    (draft section 2.3.4, Figure 10)."""
    with _as_socket(sock) as s:
        check_inet(s)
        _enable_pktinfo(s)
        data, ancdata, msg_flags, address = s.recvmsg(bufsize, max(ancbufsize, 64), flags)
        local, ifindex = _pktinfo(s, ancdata)
        if not ifindex:  # queued before IP_PKTINFO was on: the kernel did not record the device
            ifindex = None
        proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) or socket.IPPROTO_UDP
        ns = netns_of(s)
        st = os.fstat(s.fileno())
        receiver = (resolve_fd(sock), (st.st_dev, st.st_ino))
    return MsgHdr(
        iov=[data],
        name=address,
        control=list(ancdata),
        flags=msg_flags,
        local=local or s.getsockname(),
        proto=proto,
        ifindex=ifindex,
        netns=ns,
        _receiver=receiver,
    )


def receiver_of(msg: MsgHdr) -> int | None:
    """The descriptor of the socket that received ``msg``, if it is still that socket."""
    if msg._receiver is None:
        return None
    fd, key = msg._receiver
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return fd if (st.st_dev, st.st_ino) == key else None


def send_view(s: socket.socket, dest: tuple[Any, ...], control: list[tuple[int, int, bytes]], flags: int) -> SocketView:
    """The view of one datagram ``s`` is about to send to ``dest``, with the message's own overrides.

    Per-message routing keys count as the kernel applies them: IP_PKTINFO/IPV6_PKTINFO
    (output device, source), SO_MARK and IP_TOS control messages, MSG_DONTROUTE.
    """
    raddr, rport = endpoint(dest)
    if endpoint(s.getsockname())[1] == 0:  # bind now as send would: the check needs the port
        s.bind(("::" if s.family == socket.AF_INET6 else "0.0.0.0", 0))
    proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) or socket.IPPROTO_UDP
    oif, mark, tos = 0, None, None
    src: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    for level, kind, data in control:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            oif = struct.unpack_from("=i", data, 0)[0]
            spec = ipaddress.IPv4Address(data[4:8])
            src = None if spec.is_unspecified else spec
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            oif = struct.unpack_from("=i", data, 16)[0]
            addr6 = ipaddress.IPv6Address(data[:16])
            src = None if addr6.is_unspecified else addr6
        elif level == socket.SOL_SOCKET and kind == socket.SO_MARK and len(data) >= 4:
            mark = struct.unpack_from("=I", data, 0)[0]
        elif level in (socket.IPPROTO_IP, socket.IPPROTO_IPV6) and kind in (socket.IP_TOS, 67) and data:
            tos = data[0] if len(data) == 1 else struct.unpack_from("=i", data, 0)[0]
    laddr = src if src is not None else source_address(s, raddr)
    lport = endpoint(s.getsockname())[1]
    view = view_of(s, Flow(proto, laddr, lport, raddr, rport), direction=OUT)
    return replace(
        view,
        bound_ifindex=view.bound_ifindex or oif,
        mark=view.mark if mark is None else mark,
        tos=view.tos if tos is None else tos & 0xFC,
        dontroute=view.dontroute or bool(flags & socket.MSG_DONTROUTE),
    )


def check_send(
    s: socket.socket,
    name: tuple[Any, ...] | None,
    control: list[tuple[int, int, bytes]],
    flags: int,
    demand: PToken,
    be: Backend | BrokerClient,
) -> None:
    """Refuse (RequirementNotMetError, EACCES) unless the datagram ``s`` is about to send to ``name``
    (None: its peer) meets ``demand`` now, with the message's own routing keys (see :func:`send_view`).

    btnsd, when it is the authority, reads the socket and judges it itself.
    """
    dest = name if name is not None else s.getpeername()
    if isinstance(be, BrokerClient):
        be.check_send(s, tuple(dest) if name is not None else None, control, flags, demand)
    else:
        require(demand, send_view(s, dest, control, flags), be, DATAGRAM_REFUSAL)


def sendmsg(sock: FileDescriptorLike, msg: MsgHdr, flags: int = 0, backend: BackendLike = None) -> int:
    """Send like socket.sendmsg; when msg carries a pToken (``ipsec_set_msg_pToken``, draft section
    2.3.4, Figure 10), refuse (EACCES) unless it is met now, for this socket and this message's own
    routing keys."""
    demand = attached(msg)
    control = [c for c in msg.control if c[0] != SOL_BTNS and c[:2] != (PTOKEN_LEVEL, BTNS_PTOKEN)]
    with _as_socket(sock) as s:
        check_inet(s)
        if demand is not None:
            check_send(s, msg.name, control, flags, demand, resolve_backend(backend))
        if msg.name is not None:
            return s.sendmsg(msg.iov, control, flags, msg.name)
        return s.sendmsg(msg.iov, control, flags)
