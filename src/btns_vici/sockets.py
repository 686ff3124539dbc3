"""Socket descriptors -> flows: validation and address lookup at the I/O edge.

Accepts what Python's socket module accepts for a descriptor: an int or any
object with ``fileno()``. Errors carry the errno the kernel would give the C
call (EBADF closed fd, ENOTSOCK not a socket, EAFNOSUPPORT not IPv4/IPv6,
ENOTCONN not connected).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from .core.errors import BtnsError
from .core.records import BOTH, SocketView
from .core.selectors import Flow


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FileDescriptorLike = int | HasFileno


def _number(fd: FileDescriptorLike) -> int:
    """The descriptor number of ``fd`` (an int or an object with fileno()), not yet checked."""
    if isinstance(fd, bool):
        raise TypeError("a file descriptor must be an int or have fileno(), not bool")
    if isinstance(fd, int):
        num = fd
    elif hasattr(fd, "fileno"):
        num = fd.fileno()
    else:
        raise TypeError(f"a file descriptor must be an int or have fileno(), not {type(fd).__name__}")
    if not isinstance(num, int) or isinstance(num, bool):
        raise TypeError(f"fileno() must return an int, not {type(num).__name__}")
    if num < 0 or num > 0x7FFFFFFF:
        raise BtnsError(f"bad file descriptor {num}", errno.EBADF)
    return num


def resolve_fd(fd: FileDescriptorLike) -> int:
    """The descriptor number of ``fd``, checked to be an open socket."""
    num = _number(fd)
    try:
        mode = os.fstat(num).st_mode
    except OSError as exc:
        raise BtnsError(f"bad file descriptor {num}: {exc.strerror}", exc.errno) from None
    if not stat.S_ISSOCK(mode):
        raise BtnsError(f"file descriptor {num} is not a socket", errno.ENOTSOCK)
    return num


@contextmanager
def borrowed_socket(fd: FileDescriptorLike) -> Iterator[socket.socket]:
    """A socket object on a duplicate of ``fd``, closed afterwards; the caller's fd is untouched."""
    num = resolve_fd(fd)
    sock = socket.socket(fileno=os.dup(num))
    try:
        yield sock
    finally:
        sock.close()


def socket_key(fd: FileDescriptorLike) -> tuple[int, int]:
    """An identity for the open socket itself (device, inode), stable across dup()."""
    st = os.fstat(resolve_fd(fd))
    return (st.st_dev, st.st_ino)


def _proto(sock: socket.socket) -> int:
    proto = sock.proto  # read by the socket object's constructor (SO_PROTOCOL)
    if proto:
        return proto
    return socket.IPPROTO_TCP if sock.type == socket.SOCK_STREAM else socket.IPPROTO_UDP


@functools.lru_cache(maxsize=4096)
def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.split("%", 1)[0])


def endpoint(addr: tuple[Any, ...]) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """(address, port) from a sockaddr tuple; the IPv6 scope id is dropped."""
    return _address(addr[0]), int(addr[1])


def check_inet(sock: socket.socket) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise BtnsError("IPsec protects only IPv4 and IPv6 sockets", errno.EAFNOSUPPORT)
    if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        raise BtnsError("only stream and datagram sockets are supported", errno.EPROTONOSUPPORT)


def _flow(sock: socket.socket) -> Flow | None:
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    local_addr, local_port = endpoint(sock.getsockname())
    remote_addr, remote_port = endpoint(peer)
    return Flow(_proto(sock), local_addr, local_port, remote_addr, remote_port)


SO_BINDTOIFINDEX = 62
IP_UNICAST_IF = 50
IPV6_UNICAST_IF = 76
IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", 67)


def netns_of(sock: socket.socket) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket's network namespace (SIOCGSKNS), None if unreadable."""
    import fcntl

    try:
        ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    except OSError:
        return None
    try:
        st = os.fstat(ns_fd)
    except OSError:
        return None
    finally:
        os.close(ns_fd)
    return (st.st_dev, st.st_ino)


def _view(sock: socket.socket, st: os.stat_result, flow: Flow, direction: str) -> SocketView:
    """Every routing key of an inspected socket (a few getsockopt calls and one ioctl)."""
    unknown: list[str] = []

    def opt(level: int, name: int, what: str) -> int:
        try:
            return sock.getsockopt(level, name)
        except OSError as exc:
            unknown.append(f"{what} unreadable ({exc.strerror})")
            return 0

    ns = netns_of(sock)
    if ns is None:
        unknown.append("network namespace unreadable (SIOCGSKNS)")
    v6 = sock.family == socket.AF_INET6
    unicast = 0
    if flow.proto == socket.IPPROTO_UDP:  # TCP ignores IP_UNICAST_IF
        raw = (
            opt(socket.IPPROTO_IPV6, IPV6_UNICAST_IF, "IPV6_UNICAST_IF")
            if v6
            else opt(socket.IPPROTO_IP, IP_UNICAST_IF, "IP_UNICAST_IF")
        )
        unicast = socket.ntohl(raw & 0xFFFFFFFF)  # both options speak network byte order
    if v6:
        tos = opt(socket.IPPROTO_IPV6, IPV6_TCLASS, "IPV6_TCLASS")
    else:
        tos = opt(socket.IPPROTO_IP, socket.IP_TOS, "IP_TOS")
    return SocketView(
        flow=flow,
        netns=ns,
        key=(st.st_dev, st.st_ino),
        bound_ifindex=opt(socket.SOL_SOCKET, SO_BINDTOIFINDEX, "SO_BINDTOIFINDEX"),
        unicast_ifindex=unicast,
        mark=opt(socket.SOL_SOCKET, socket.SO_MARK, "SO_MARK") & 0xFFFFFFFF,
        uid=st.st_uid,
        tos=tos & 0xFC if tos > 0 else 0,
        dontroute=bool(opt(socket.SOL_SOCKET, socket.SO_DONTROUTE, "SO_DONTROUTE")),
        direction=direction,
        unknown=tuple(unknown),
    )


def inspect(fd: FileDescriptorLike) -> tuple[tuple[int, int], SocketView | None]:
    """One pass over an IPv4/IPv6 socket: its identity (see socket_key) and its view, None if unconnected.

    The hot path of get_socket_pToken: one fstat, and a socket object on the caller's own
    descriptor (detached, never closed) instead of a dup.
    """
    num = _number(fd)
    try:
        st = os.fstat(num)
    except OSError as exc:
        raise BtnsError(f"bad file descriptor {num}: {exc.strerror}", exc.errno) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BtnsError(f"file descriptor {num} is not a socket", errno.ENOTSOCK)
    sock = socket.socket(fileno=num)
    try:
        check_inet(sock)
        flow = _flow(sock)
        return (st.st_dev, st.st_ino), (None if flow is None else _view(sock, st, flow, BOTH))
    finally:
        sock.detach()


def view_of(fd: FileDescriptorLike, flow: Flow | None = None, direction: str = BOTH) -> SocketView:
    """The view of a socket for ``flow`` (default: its connected flow; ENOTCONN without one).

    ``flow`` lets a not yet connected socket be judged for the flow it is about to use
    (connect, sendto) with its own device, mark and namespace.
    """
    with borrowed_socket(fd) as sock:
        check_inet(sock)
        st = os.fstat(sock.fileno())
        if flow is None:
            flow = _flow(sock)
            if flow is None:
                raise BtnsError("socket is not connected: it has no flow yet", errno.ENOTCONN)
        return _view(sock, st, flow, direction)


def flow_of(fd: FileDescriptorLike) -> Flow:
    """The flow of a connected TCP or UDP socket (ENOTCONN when it has no peer)."""
    with borrowed_socket(fd) as sock:
        check_inet(sock)
        flow = _flow(sock)
    if flow is None:
        raise BtnsError("socket is not connected: it has no flow yet", errno.ENOTCONN)
    return flow


def is_connected(fd: FileDescriptorLike) -> bool:
    with borrowed_socket(fd) as sock:
        try:
            sock.getpeername()
        except OSError:
            return False
        return True


SIOCGSKNS = 0x894C  # ioctl: a new fd for the socket's network namespace


def source_address(
    fd: FileDescriptorLike, remote: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The local address ``fd`` uses (or would use, by the routing of its own netns) towards ``remote``."""
    import fcntl
    import threading

    from .netns import setns

    with borrowed_socket(fd) as sock:
        check_inet(sock)
        bound = endpoint(sock.getsockname())[0]
        if not bound.is_unspecified:
            return bound
        family = sock.family
        ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    result: list[ipaddress.IPv4Address | ipaddress.IPv6Address | OSError] = []
    try:
        own = os.stat("/proc/thread-self/ns/net")
        theirs = os.fstat(ns_fd)
        same_netns = (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino)
    except OSError:
        same_netns = False

    def probe() -> None:  # setns() moves only this short-lived thread
        try:
            if not same_netns:  # setns needs CAP_SYS_ADMIN, which e.g. a container may lack
                setns(ns_fd)
            with socket.socket(family, socket.SOCK_DGRAM) as p:
                p.connect((str(remote), 9))
                result.append(endpoint(p.getsockname())[0])
        except OSError as exc:
            result.append(exc)

    try:
        t = threading.Thread(target=probe, name="btns-source-probe")
        t.start()
        t.join()
    finally:
        os.close(ns_fd)
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]
