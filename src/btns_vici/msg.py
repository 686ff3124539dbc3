"""Datagram pTokens (draft 2.3.4): msghdr, ancillary data, and the library's send/receive path.

Linux has no per-packet IPsec control: the kernel never reads a pToken from
ancillary data. So (README: "Datagrams"):

* :func:`recvmsg` records where a datagram came from and which local address
  it reached (IP_PKTINFO / IPV6_RECVPKTINFO); ``ipsec_get_msg_pToken`` then
  reports the protection of that flow as verified at query time.
* ``ipsec_set_msg_pToken`` adds a private control message (level
  :data:`SOL_BTNS`) holding a per-process handle of the pToken; :func:`sendmsg`
  removes it, checks the flow to the destination satisfies the pToken right
  before sending, and refuses with EACCES otherwise. The check and the send are
  not atomic: an SA that disappears in between is not caught for that datagram.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import socket
import struct
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import BtnsError
from .selectors import Flow
from .sockets import FileDescriptorLike, borrowed_socket, check_inet, endpoint, resolve_fd, source_address
from .tokens import PToken

#: Private cmsg level/type: never passed to the kernel ("BT", 1).
SOL_BTNS = 0x4254
BTNS_PTOKEN = 1
_HANDLE = struct.Struct("=Q")
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

_handles = itertools.count(1)
_registry: weakref.WeakValueDictionary[int, PToken] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


@dataclass
class MsgHdr:
    """A Python ``struct msghdr``: name (peer address), iov, control (ancillary data), flags.

    ``local`` is the local (address, port) the datagram arrived on, filled by
    :func:`recvmsg`; ``proto`` is the transport protocol.
    """

    iov: list[bytes] = field(default_factory=list)
    name: tuple | None = None
    control: list[tuple[int, int, bytes]] = field(default_factory=list)
    flags: int = 0
    local: tuple | None = None
    proto: int = socket.IPPROTO_UDP
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
    raddr, rport = endpoint(msg.name)
    laddr, lport = endpoint(msg.local)
    return Flow(msg.proto, laddr, lport, raddr, rport)


def attach(msg: MsgHdr, ptoken: PToken) -> None:
    """ipsec_set_msg_pToken: put a handle of (a copy of) ``ptoken`` into msg's ancillary data."""
    if not isinstance(msg, MsgHdr):
        raise TypeError(f"msg must be a btns_vici.MsgHdr, not {type(msg).__name__}")
    copy = ptoken.copy()
    with _registry_lock:
        handle = next(_handles)
        _registry[handle] = copy
    msg._keep.append(copy)  # the msghdr keeps the token alive
    msg.control = [c for c in msg.control if c[:2] != (SOL_BTNS, BTNS_PTOKEN)]
    msg.control.append((SOL_BTNS, BTNS_PTOKEN, _HANDLE.pack(handle)))


def attached(msg: MsgHdr) -> PToken | None:
    """The pToken whose handle msg's ancillary data carries, if any."""
    for level, kind, data in msg.control:
        if (level, kind) == (SOL_BTNS, BTNS_PTOKEN):
            if len(data) != _HANDLE.size:
                raise BtnsError("malformed btns pToken control message", errno.EINVAL)
            tok = _registry.get(_HANDLE.unpack(data)[0])
            if tok is None:
                raise BtnsError("pToken control message refers to no live pToken", errno.EINVAL)
            return tok
    return None


def _enable_pktinfo(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)


def _local_from_pktinfo(sock: socket.socket, ancdata: list) -> tuple | None:
    port = sock.getsockname()[1]
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return (str(ipaddress.IPv4Address(data[8:12])), port)
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return (str(ipaddress.IPv6Address(data[:16])), port)
    return None


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
    """Receive one datagram like socket.recvmsg, recording both addresses for get_msg_pToken."""
    with _as_socket(sock) as s:
        check_inet(s)
        _enable_pktinfo(s)
        data, ancdata, msg_flags, address = s.recvmsg(bufsize, max(ancbufsize, 64), flags)
        local = _local_from_pktinfo(s, ancdata) or s.getsockname()
        proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) or socket.IPPROTO_UDP
    return MsgHdr(iov=[data], name=address, control=list(ancdata), flags=msg_flags, local=local, proto=proto)


def sendmsg(sock: FileDescriptorLike, msg: MsgHdr, flags: int = 0, backend: object = None) -> int:
    """Send like socket.sendmsg; when msg carries a pToken, refuse (EACCES) unless it is met now."""
    from .api import ptoken_for_flow
    from .requirements import unmet

    demand = attached(msg)
    control = [c for c in msg.control if c[0] != SOL_BTNS]
    with _as_socket(sock) as s:
        check_inet(s)
        if demand is not None:
            dest = msg.name if msg.name is not None else s.getpeername()
            raddr, rport = endpoint(dest)
            if endpoint(s.getsockname())[1] == 0:  # bind now as send would: the check needs the port
                s.bind(("::" if s.family == socket.AF_INET6 else "0.0.0.0", 0))
            laddr = source_address(s, raddr)
            lport = endpoint(s.getsockname())[1]
            proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) or socket.IPPROTO_UDP
            actual = ptoken_for_flow(Flow(proto, laddr, lport, raddr, rport), backend)  # type: ignore[arg-type]
            problems = unmet(demand, actual)
            if problems:
                raise BtnsError("datagram refused, pToken not met: " + "; ".join(problems), errno.EACCES)
        args = (msg.iov, control, flags) + ((msg.name,) if msg.name is not None else ())
        return s.sendmsg(*args)
