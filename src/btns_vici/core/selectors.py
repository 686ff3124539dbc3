"""Traffic selectors and flows: which packets an SA (or SPD entry) covers. Pure, no I/O."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTO_ANY = 0
PROTO_NAMES = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": 1, "ipv6-icmp": 58}


@dataclass(frozen=True, order=True)
class TrafficSelector:
    """An address range, an IP protocol (0 = any) and a port range (RFC 7296 section 3.13.1): the SPD
    ranges that ``ipsec_cmp_pToken`` compares (draft section 2.3.5)."""

    start: IPAddress
    end: IPAddress
    proto: int = PROTO_ANY
    port_lo: int = 0
    port_hi: int = 65535

    def __post_init__(self) -> None:
        if self.start.version != self.end.version or int(self.start) > int(self.end):
            raise ValueError(f"bad address range {self.start}..{self.end}")
        if not (0 <= self.proto <= 255) or not (0 <= self.port_lo <= self.port_hi <= 65535):
            raise ValueError("bad protocol or port range")

    @classmethod
    def from_network(cls, net: str, proto: int = PROTO_ANY, port_lo: int = 0, port_hi: int = 65535) -> TrafficSelector:
        n = ipaddress.ip_network(net, strict=False)
        return cls(n.network_address, n.broadcast_address, proto, port_lo, port_hi)

    @property
    def version(self) -> int:
        return self.start.version

    def covers(self, addr: IPAddress, proto: int, port: int) -> bool:
        """True when the endpoint (addr, proto, port) lies inside this selector."""
        if addr.version != self.start.version or not (int(self.start) <= int(addr) <= int(self.end)):
            return False
        if self.proto == PROTO_ANY:
            return True
        if self.proto != proto:
            return False
        return self.port_lo <= port <= self.port_hi

    def __str__(self) -> str:
        try:
            nets = list(ipaddress.summarize_address_range(self.start, self.end))
        except (TypeError, ValueError):  # pragma: no cover - guarded by __post_init__
            nets = []
        addr = str(nets[0]) if len(nets) == 1 else f"{self.start}..{self.end}"
        if self.proto == PROTO_ANY:
            return addr
        ports = (
            ""
            if (self.port_lo, self.port_hi) == (0, 65535)
            else (f"/{self.port_lo}" if self.port_lo == self.port_hi else f"/{self.port_lo}-{self.port_hi}")
        )
        return f"{addr}[{self.proto}{ports}]"


@dataclass(frozen=True)
class Flow:
    """One transport flow as seen from this host: what a connected socket (draft section 2.3.3) or a
    datagram (section 2.3.4) is."""

    proto: int
    local_addr: IPAddress
    local_port: int
    remote_addr: IPAddress
    remote_port: int

    @property
    def family(self) -> int:
        return socket.AF_INET if self.local_addr.version == 4 else socket.AF_INET6

    def __str__(self) -> str:
        name = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(self.proto, str(self.proto))
        return f"{name} {_ep(self.local_addr, self.local_port)} -> {_ep(self.remote_addr, self.remote_port)}"


def _ep(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def normalize_address(addr: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are the IPv4 address for matching."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def flow_covered(flow: Flow, local_ts: tuple[TrafficSelector, ...], remote_ts: tuple[TrafficSelector, ...]) -> bool:
    """True when some local selector covers the flow's local end and some remote one its remote end."""
    la, ra = normalize_address(flow.local_addr), normalize_address(flow.remote_addr)
    return any(ts.covers(la, flow.proto, flow.local_port) for ts in local_ts) and any(
        ts.covers(ra, flow.proto, flow.remote_port) for ts in remote_ts
    )
