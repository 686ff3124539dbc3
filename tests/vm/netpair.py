"""Two hosts in network namespaces joined by a veth pair, manual ESP SAs, a sniffer and a TCP transfer.

Helpers for the VM tier (the host kernel has no ESP).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator

from btns_vici import xfrm

from ..integration.xfrm_support import ip, netns, socket_in

A, B = ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("10.99.0.2")
KEYS = {"ab": "0x" + "5a" * 20, "ba": "0x" + "a5" * 20}
SPI = {"ab": 0xAB01, "ba": 0xBA01}


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str]]:
    """Namespaces a (10.99.0.1) and b (10.99.0.2) joined by a veth pair, with the same SAs in both."""
    with netns("a") as na, netns("b") as nb:
        ip("link", "add", "btns-vm-va", "netns", na, "type", "veth", "peer", "name", "btns-vm-vb", "netns", nb)
        for ns, dev, addr in ((na, "btns-vm-va", A), (nb, "btns-vm-vb", B)):
            ip("addr", "add", f"{addr}/24", "dev", dev, netns=ns)
            ip("link", "set", dev, "up", netns=ns)
        yield na, nb


def add_sas(na: str, nb: str, reqid: int = 42) -> None:
    for ns in (na, nb):
        for d, src, dst in (("ab", A, B), ("ba", B, A)):
            ip(
                "xfrm",
                "state",
                "add",
                "src",
                str(src),
                "dst",
                str(dst),
                "proto",
                "esp",
                "spi",
                hex(SPI[d]),
                "reqid",
                str(reqid),
                "mode",
                "transport",
                "aead",
                "rfc4106(gcm(aes))",
                KEYS[d],
                "128",
                netns=ns,
            )


def add_policies(na: str, nb: str, reqid: int = 42) -> None:
    for ns, me, peer in ((na, A, B), (nb, B, A)):
        for d, src, dst in (("out", me, peer), ("in", peer, me)):
            ip(
                "xfrm",
                "policy",
                "add",
                "src",
                str(src),
                "dst",
                str(dst),
                "proto",
                "tcp",
                "dir",
                d,
                "tmpl",
                "src",
                str(src),
                "dst",
                str(dst),
                "proto",
                "esp",
                "mode",
                "transport",
                "reqid",
                str(reqid),
                netns=ns,
            )


@contextlib.contextmanager
def sniffer(ns: str) -> Iterator[list[bytes]]:
    """IPv4 packets seen on b's veth while the block runs (AF_PACKET, so before any decryption)."""
    sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    sock.settimeout(0.2)
    frames: list[bytes] = []
    try:
        yield frames
        with contextlib.suppress(TimeoutError):
            while True:
                frames.append(sock.recv(65535)[14:])
    finally:
        sock.close()


def transfer(na: str, nb: str, payload: bytes, policy: str | None = None, reqid: int = 42, port: int = 0) -> bytes:
    """Send ``payload`` over TCP from a to b; with ``policy`` ("required"/"use") both sockets
    carry an ESP transport-mode socket policy with ``reqid`` (b's accepted socket inherits it)."""
    server = socket_in(nb, socket.AF_INET, socket.SOCK_STREAM)
    client = socket_in(na, socket.AF_INET, socket.SOCK_STREAM)
    try:
        if policy:
            for sock in (server, client):
                xfrm.set_socket_policy(sock, "out", ["esp"], level=policy, reqid=reqid)
                xfrm.set_socket_policy(sock, "in", ["esp"], level=policy, reqid=reqid)
        server.bind((str(B), port))
        server.listen()
        server.settimeout(5)
        client.settimeout(5)
        client.connect((str(B), server.getsockname()[1]))
        conn, _ = server.accept()
        with conn:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
        return got
    finally:
        client.close()
        server.close()
