"""What really crossed the link: AF_PACKET captures, and hand-made packets an attacker would send."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import Iterator

from btns_vici import netns

ETH_P_ALL = 0x0003


@contextlib.contextmanager
def capture(ns: str, ifname: str) -> Iterator[list[bytes]]:
    """Frames seen on ``ifname`` in namespace ``ns`` while the block runs (before any decryption)."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    sock.settimeout(0.05)
    frames: list[bytes] = []
    try:
        yield frames
        time.sleep(0.2)  # let the last packets arrive
        with contextlib.suppress(TimeoutError):
            while True:
                frames.append(sock.recv(65535))
    finally:
        sock.close()


def seen(frames: list[bytes], marker: bytes) -> bool:
    """True when ``marker`` crossed the link in clear in any captured frame."""
    return any(marker in f for f in frames)


def esp_in_udp(frames: list[bytes]) -> int:
    """Frames carrying UDP port 4500 (charon's ESP-in-UDP), IPv4 over Ethernet."""
    count = 0
    for f in frames:
        if len(f) >= 14 + 20 + 8 and f[12:14] == b"\x08\x00" and f[14 + 9] == socket.IPPROTO_UDP:
            ihl = (f[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", f, 14 + ihl)
            count += 4500 in (sport, dport)
    return count


def udp_v6(frames: list[bytes], port: int) -> int:
    """Frames carrying IPv6 UDP from or to ``port`` (no extension headers), over Ethernet."""
    count = 0
    for f in frames:
        if len(f) >= 14 + 40 + 8 and f[12:14] == b"\x86\xdd" and f[14 + 6] == socket.IPPROTO_UDP:
            sport, dport = struct.unpack_from("!HH", f, 14 + 40)
            count += port in (sport, dport)
    return count


def tcp_segments(frames: list[bytes], src: str, sport: int) -> list[tuple[int, int, bytes]]:
    """(seq, ack, payload) of IPv4 TCP segments from src:sport among raw IP frames (a TUN capture)."""
    out = []
    for f in frames:
        if len(f) < 40 or f[0] >> 4 != 4 or f[9] != socket.IPPROTO_TCP:
            continue
        ihl = (f[0] & 0x0F) * 4
        if str(ipaddress.IPv4Address(f[12:16])) != src:
            continue
        s_port, _d, seq, ack, off = struct.unpack_from("!HHIIB", f, ihl)
        if s_port != sport:
            continue
        total = struct.unpack_from("!H", f, 2)[0]
        out.append((seq, ack, f[ihl + (off >> 4) * 4 : total]))
    return out


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src: str, sport: int, dst: str, dport: int, seq: int, ack: int, payload: bytes) -> bytes:
    """An IPv4 TCP PSH|ACK segment with correct checksums (for a raw IP_HDRINCL socket)."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, 0x18, 65535, 0, 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, s, d)
    return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + tcp


def send_raw_clear(ns: str, packet: bytes, dst: str, mark: int = 0x42) -> None:
    """Send a hand-made IPv4 packet from ``ns`` with charon's bypass mark, so it leaves in clear."""
    with netns.entered(ns):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        raw.sendto(packet, (dst, 0))
