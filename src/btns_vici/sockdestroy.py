"""Destroy a socket in the kernel: sock_diag SOCK_DESTROY (what ``ss -K`` does).

A latch that breaks must stop the connection for whatever program holds it, in any
language, not only for the Python object that latched it. ``SOCK_DESTROY`` over
``NETLINK_SOCK_DIAG`` (inet_diag, ``CONFIG_INET_DIAG_DESTROY``) aborts a TCP socket
(``tcp_abort``: reset sent, ``sk_err = ECONNABORTED``) or a UDP socket (``udp_abort``):
every later ``recv``/``send``/``read``/``write`` of any process holding it fails with
ECONNABORTED (a blocked ``recv`` wakes up with it). The socket is named by its 4-tuple
and its **cookie** (``SO_COOKIE``), so a new socket that reused the addresses is never hit.

Needs CAP_NET_ADMIN in the socket's network namespace; the netlink socket is opened in
that namespace (the kernel looks the socket up in the netlink socket's namespace).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .core.errors import BtnsError
from .netns import setns

_T = TypeVar("_T")

NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
SO_COOKIE = 57
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
#: TCP states inet_diag can be asked for: every state.
ALL_STATES = 0xFFFFFFFF
SIOCGSKNS = 0x894C


@dataclass(frozen=True)
class SocketId:
    """What inet_diag identifies a socket by: family, protocol, both ends, cookie."""

    family: int
    protocol: int
    src: str
    sport: int
    dst: str
    dport: int
    cookie: int
    ifindex: int = 0


def socket_id(sock: socket.socket) -> SocketId:
    """The inet_diag identity of a connected (or bound) IPv4/IPv6 socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise BtnsError("SOCK_DESTROY works on IPv4/IPv6 sockets only", errno.EAFNOSUPPORT)
    proto = socket.IPPROTO_TCP if sock.type == socket.SOCK_STREAM else socket.IPPROTO_UDP
    src, sport = sock.getsockname()[:2]
    try:
        dst, dport = sock.getpeername()[:2]
    except OSError:
        dst, dport = ("::" if sock.family == socket.AF_INET6 else "0.0.0.0"), 0
    cookie = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return SocketId(sock.family, proto, src, sport, dst, dport, cookie)


def _addr16(family: int, text: str) -> bytes:
    packed = ipaddress.ip_address(text.split("%", 1)[0]).packed
    if family == socket.AF_INET6 and len(packed) == 4:
        packed = b"\0" * 10 + b"\xff\xff" + packed
    return packed.ljust(16, b"\0")


def request(sid: SocketId, seq: int = 1) -> bytes:
    """The SOCK_DESTROY netlink message for ``sid`` (nlmsghdr + inet_diag_req_v2)."""
    # struct inet_diag_sockid: sport, dport (be16), src[4], dst[4] (be32), if (u32), cookie[2] (u32)
    sockid = struct.pack(">HH", sid.sport, sid.dport) + _addr16(sid.family, sid.src) + _addr16(sid.family, sid.dst)
    sockid += struct.pack("=III", sid.ifindex, sid.cookie & 0xFFFFFFFF, sid.cookie >> 32)
    # struct inet_diag_req_v2: family, protocol, ext, pad (u8 each), states (u32), id
    body = struct.pack("=BBBxI", sid.family, sid.protocol, 0, ALL_STATES) + sockid
    return struct.pack("=IHHII", 16 + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _netns_fd(sock: socket.socket) -> int:
    import fcntl

    return fcntl.ioctl(sock.fileno(), SIOCGSKNS)


def _in_netns(ns_fd: int | None, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a thread that entered the namespace ``ns_fd`` (None: ours)."""
    if ns_fd is None:
        return fn()
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            setns(ns_fd)  # this short-lived thread only
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, name="btns-sockdestroy", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def destroy_id(sid: SocketId, ns_fd: int | None = None, timeout: float = 2.0) -> None:
    """Send SOCK_DESTROY for ``sid`` in the namespace ``ns_fd``; OSError with the kernel's errno.

    ENOENT: no such socket (already closed); EOPNOTSUPP: the kernel lacks
    CONFIG_INET_DIAG_DESTROY (or the protocol's diag module); EPERM: no CAP_NET_ADMIN.
    """

    def send() -> None:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        try:
            nl.settimeout(timeout)
            nl.bind((0, 0))
            nl.send(request(sid))
            reply = nl.recv(65536)
        finally:
            nl.close()
        if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == NLMSG_ERROR:
            err = -struct.unpack_from("=i", reply, 16)[0]
            if err:
                raise OSError(err, f"SOCK_DESTROY {sid.src}:{sid.sport} -> {sid.dst}:{sid.dport}: {os.strerror(err)}")

    _in_netns(ns_fd, send)


def destroy(sock: socket.socket) -> SocketId:
    """Destroy ``sock`` in the kernel (every holder sees ECONNABORTED); its identity."""
    sid = socket_id(sock)
    ns_fd = _netns_fd(sock)
    try:
        own = os.stat("/proc/thread-self/ns/net")
        theirs = os.fstat(ns_fd)
        same = (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino)
        destroy_id(sid, None if same else ns_fd)
    finally:
        os.close(ns_fd)
    return sid
