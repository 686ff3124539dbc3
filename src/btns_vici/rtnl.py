"""Ask the kernel how it routes one socket's packets: RTM_GETROUTE with the socket's own keys.

A route answer depends on more than the flow's addresses: policy-routing rules match
the mark (``SO_MARK``), the uid of the socket's owner, the bound device
(``SO_BINDTODEVICE``), the TOS, the IP protocol and the ports. So the lookup is asked
of the kernel with all of them (``ip route get ... mark M uid U oif DEV ipproto P
sport S dport D``), the output way for what a socket sends and the input way
(``iif DEV``) for what would be delivered to it, in the socket's network namespace.

This speaks rtnetlink directly (one request, one reply on a socket opened in the
namespace): pyroute2's IPRoute opens its socket per thread in whatever namespace
the thread is in, refuses to run inside a running asyncio loop, and hides the real
table (it always sends RTA_TABLE=254). Answers are cached until rtnetlink reports a
link, address, route or rule change (or notifications were lost).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
import threading
from dataclasses import dataclass

from . import forksafe
from . import netns as _netns
from .core.records import SocketView
from .core.selectors import IPAddress, normalize_address

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWROUTE, RTM_GETROUTE = 16, 18, 24, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_F_LOOKUP_TABLE = 0x1000
RTA_DST, RTA_SRC, RTA_IIF, RTA_OIF, RTA_PREFSRC, RTA_TABLE, RTA_MARK, RTA_UID = 1, 2, 3, 4, 7, 15, 16, 25
RTA_IP_PROTO, RTA_SPORT, RTA_DPORT = 27, 28, 29
IFLA_IFNAME = 3
IFF_UP = 0x1
RTN_NAMES = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
}
RTN_LOCAL = 2

# rtnetlink multicast groups: link, v4/v6 address, v4/v6 route, v4/v6 rule
GROUPS = 0x1 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | (1 << 18)

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
_NLMSGERR = struct.Struct("=i")
MAX_REPLY = 1 << 16
MAX_CACHE = 8192


@dataclass(frozen=True)
class RouteAnswer:
    """What the kernel answered for one lookup: a route (table, device, type) or an errno."""

    error: int = 0  # 0, or the errno the lookup failed with (ENETUNREACH, EACCES for prohibit, ...)
    table: int | None = None
    oif: int | None = None
    iif: int | None = None
    prefsrc: str | None = None
    rtype: int = 0

    @property
    def type_name(self) -> str:
        return RTN_NAMES.get(self.rtype, str(self.rtype))

    @property
    def delivered_locally(self) -> bool:
        return self.error == 0 and self.rtype == RTN_LOCAL


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    up: bool


def _attr(kind: int, data: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _addr(a: IPAddress) -> bytes:
    return a.packed


def encode_getroute(
    seq: int,
    dst: IPAddress,
    src: IPAddress | None = None,
    *,
    oif: int = 0,
    iif: int = 0,
    mark: int = 0,
    uid: int | None = None,
    tos: int = 0,
    proto: int = 0,
    sport: int = 0,
    dport: int = 0,
) -> bytes:
    """One RTM_GETROUTE request (pure; see :func:`decode_route`)."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    bits = 32 if family == socket.AF_INET else 128
    attrs = _attr(RTA_DST, _addr(dst))
    if src is not None and not src.is_unspecified:
        attrs += _attr(RTA_SRC, _addr(src))
    if oif:
        attrs += _attr(RTA_OIF, struct.pack("=I", oif))
    if iif:
        attrs += _attr(RTA_IIF, struct.pack("=I", iif))
    if mark:
        attrs += _attr(RTA_MARK, struct.pack("=I", mark & 0xFFFFFFFF))
    if uid is not None and not iif:
        attrs += _attr(RTA_UID, struct.pack("=I", uid & 0xFFFFFFFF))
    if proto:
        attrs += _attr(RTA_IP_PROTO, struct.pack("=B", proto))
    if sport:
        attrs += _attr(RTA_SPORT, struct.pack("!H", sport))
    if dport:
        attrs += _attr(RTA_DPORT, struct.pack("!H", dport))
    body = (
        _RTMSG.pack(
            family,
            bits,
            bits if src is not None and not src.is_unspecified else 0,
            tos & 0xFF,
            0,
            0,
            0,
            0,
            RTM_F_LOOKUP_TABLE,
        )
        + attrs
    )
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes, pos: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while pos + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size or pos + length > end:
            break
        out[kind & 0x3FFF] = data[pos + _RTATTR.size : pos + length]
        pos += (length + 3) & ~3
    return out


def _u32(attrs: dict[int, bytes], kind: int) -> int | None:
    raw = attrs.get(kind, b"")
    return struct.unpack("=I", raw[:4])[0] if len(raw) >= 4 else None


def decode_route(data: bytes, seq: int) -> RouteAnswer | None:
    """The answer to request ``seq`` among the netlink messages in ``data``, or None if absent."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            return RouteAnswer(error=errno.EPROTO)
        body = pos + _NLMSGHDR.size
        if mseq == seq:
            if kind == NLMSG_ERROR:
                (code,) = _NLMSGERR.unpack_from(data, body)
                return RouteAnswer(error=-code if code < 0 else errno.EPROTO)
            if kind == RTM_NEWROUTE and length >= _NLMSGHDR.size + _RTMSG.size:
                _fam, _dl, _sl, _tos, table8, _proto, _scope, rtype, _fl = _RTMSG.unpack_from(data, body)
                a = _attrs(data, body + _RTMSG.size, pos + length)
                pref = a.get(RTA_PREFSRC)
                prefsrc = str(ipaddress.ip_address(pref)) if pref and len(pref) in (4, 16) else None
                table = _u32(a, RTA_TABLE)
                return RouteAnswer(
                    table=table if table is not None else table8,
                    oif=_u32(a, RTA_OIF),
                    iif=_u32(a, RTA_IIF),
                    prefsrc=prefsrc,
                    rtype=rtype,
                )
        pos += (length + 3) & ~3
    return None


def decode_links(data: bytes) -> tuple[list[Link], bool]:
    """Links in one RTM_GETLINK dump part, and whether the dump is done."""
    links: list[Link] = []
    done, pos = False, 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            return links, True
        body = pos + _NLMSGHDR.size
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            done = True
        elif kind == RTM_NEWLINK and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            _fam, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            name = _attrs(data, body + _IFINFOMSG.size, pos + length).get(IFLA_IFNAME, b"").split(b"\0", 1)[0]
            links.append(Link(index, name.decode(errors="replace"), bool(flags & IFF_UP)))
        pos += (length + 3) & ~3
    return links, done


class RoutingView:
    """Route lookups and the link list of one network namespace, cached until routing changes."""

    def __init__(self, netns_name: str | None) -> None:
        self.netns = netns_name
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        with _netns.entered(netns_name):  # sockets keep the namespace they were created in
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            self._mon = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_ROUTE
            )
            st = os.stat("/proc/thread-self/ns/net")
        self.netns_id = (st.st_dev, st.st_ino)
        self._sock.settimeout(2.0)
        self._mon.bind((0, GROUPS))
        self._sock.bind((0, 0))
        self._routes: dict[tuple[object, ...], RouteAnswer] = {}
        self._links: dict[int, Link] | None = None
        #: Derived answers of callers (data-plane proofs), dropped with the routing cache.
        self.memo: dict[tuple[object, ...], object] = {}

    def close(self) -> None:
        self._sock.close()
        self._mon.close()

    def _drain(self) -> None:
        changed = False
        while True:
            try:
                if not self._mon.recv(MAX_REPLY):
                    break
                changed = True
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: notifications were lost, so assume everything changed
                changed = True
        if changed:
            self._routes.clear()
            self._links = None
            self.memo.clear()

    def fresh(self) -> None:
        """Drop every cached answer now if routing changed since the last call (cheap when not)."""
        with self._lock:
            self._drain()

    def _ask(self, request: bytes, seq: int) -> RouteAnswer:
        try:
            self._sock.send(request)
            while True:
                answer = decode_route(self._sock.recv(MAX_REPLY), seq)
                if answer is not None:
                    return answer
        except TimeoutError:
            return RouteAnswer(error=errno.ETIMEDOUT)
        except OSError as exc:
            return RouteAnswer(error=exc.errno or errno.EIO)

    def route_of(self, view: SocketView) -> RouteAnswer:
        """The kernel's route for what the socket ``view`` sends: every routing key it has (source,
        bound device, mark, uid, TOS, protocol and ports), as the kernel will look it up."""
        flow = view.flow
        return self.lookup(
            normalize_address(flow.remote_addr),
            normalize_address(flow.local_addr),
            oif=view.oif,
            mark=view.mark,
            uid=view.uid,
            tos=view.tos,
            proto=flow.proto,
            sport=flow.local_port,
            dport=flow.remote_port,
        )

    def lookup(
        self,
        dst: IPAddress,
        src: IPAddress | None = None,
        *,
        oif: int = 0,
        iif: int = 0,
        mark: int = 0,
        uid: int | None = None,
        tos: int = 0,
        proto: int = 0,
        sport: int = 0,
        dport: int = 0,
    ) -> RouteAnswer:
        """The kernel's route for a packet with these keys (``iif`` set: as received on that link)."""
        key = (dst, src, oif, iif, mark, uid, tos, proto, sport, dport)
        with self._lock:
            self._drain()
            hit = self._routes.get(key)
            if hit is None:
                seq = next(self._seq) & 0xFFFFFFFF
                req = encode_getroute(
                    seq, dst, src, oif=oif, iif=iif, mark=mark, uid=uid, tos=tos, proto=proto, sport=sport, dport=dport
                )
                hit = self._ask(req, seq)
                if len(self._routes) >= MAX_CACHE:
                    self._routes.clear()
                if hit.error != errno.ETIMEDOUT:
                    self._routes[key] = hit
            return hit

    def links(self) -> dict[int, Link]:
        """ifindex -> Link of every link in the namespace."""
        with self._lock:
            self._drain()
            if self._links is None:
                self._links = self._dump_links()
            return self._links

    def _dump_links(self) -> dict[int, Link]:
        seq = next(self._seq) & 0xFFFFFFFF
        req = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        self._sock.send(
            _NLMSGHDR.pack(_NLMSGHDR.size + len(req), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req
        )
        out: dict[int, Link] = {}
        for _ in range(10000):
            part, done = decode_links(self._sock.recv(1 << 20))
            out.update((link.index, link) for link in part)
            if done:
                break
        return out

    def ifindex(self, name: str) -> int | None:
        return next((i for i, link in self.links().items() if link.name == name), None)

    def ifname(self, index: int | None) -> str:
        if not index:
            return "none"
        link = self.links().get(index)
        return link.name if link else f"ifindex {index} (gone)"


_views: forksafe.PerNamespace[RoutingView] = forksafe.PerNamespace(RoutingView, RoutingView.close)


def routing(netns_name: str | None) -> RoutingView:
    """The (cached) routing view of a namespace (None: the one this process started in)."""
    return _views.get(netns_name)


def forget(netns_name: str | None) -> None:
    """Drop the cached view of a namespace (call when the namespace is deleted)."""
    _views.forget(netns_name)
