"""Every TCP and UDP socket of a network namespace, from the kernel's sock_diag (like ``ss``).

The netlink socket is opened inside the namespace (setns in the calling thread);
it keeps that namespace, so the dumps answer for it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from pyroute2.netlink.diag import DiagSocket

from .. import netns
from ..selectors import Flow, IPAddress

#: TCP states (include/net/tcp_states.h) as ``ss`` names them; UDP uses ESTAB (connected) and UNCONN.
STATES = {
    1: "ESTAB", 2: "SYN-SENT", 3: "SYN-RECV", 4: "FIN-WAIT-1", 5: "FIN-WAIT-2", 6: "TIME-WAIT",
    7: "UNCONN", 8: "CLOSE-WAIT", 9: "LAST-ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW-SYN-RECV",
}
PROTOCOLS = (("tcp", socket.IPPROTO_TCP), ("udp", socket.IPPROTO_UDP))


@dataclass(frozen=True)
class SocketEntry:
    """One socket as sock_diag reports it."""

    proto: int
    family: int
    state: str
    local_addr: IPAddress
    local_port: int
    remote_addr: IPAddress
    remote_port: int
    inode: int
    uid: int
    bound_ifindex: int = 0  # SO_BINDTODEVICE (idiag_if)
    mark: int | None = None  # SO_MARK (INET_DIAG_MARK: only shown to CAP_NET_ADMIN), None when not shown

    @property
    def connected(self) -> bool:
        """Has a peer, hence a flow (LISTEN and unconnected UDP sockets have none)."""
        return self.state != "LISTEN" and self.remote_port != 0 and not self.remote_addr.is_unspecified

    @property
    def flow(self) -> Flow | None:
        if not self.connected:
            return None
        return Flow(self.proto, self.local_addr, self.local_port, self.remote_addr, self.remote_port)


def list_sockets(netns_name: str | None = None) -> list[SocketEntry]:
    """TCP and UDP sockets, IPv4 and IPv6, of ``netns_name`` (None: ours), sorted like ``ss``."""
    if netns_name and not os.path.exists(netns.netns_path(netns_name)):
        raise FileNotFoundError(2, f"no network namespace {netns_name!r} (see `ip netns list`)")
    try:
        with netns.entered(netns_name):
            diag = DiagSocket()
    except PermissionError:
        raise PermissionError(1, f"entering network namespace {netns_name!r} needs CAP_SYS_ADMIN (root)") from None
    out: list[SocketEntry] = []
    try:
        diag.bind()
        for _, proto in PROTOCOLS:
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in diag.get_sock_stats(family=family, protocol=proto):
                    out.append(_entry(msg, proto, family))
    finally:
        diag.close()
    return sorted(out, key=lambda e: (e.proto, e.family, e.local_addr.packed, e.local_port,
                                      e.remote_addr.packed, e.remote_port, e.inode))


def _entry(msg: dict, proto: int, family: int) -> SocketEntry:
    return SocketEntry(
        proto=proto,
        family=family,
        state=STATES.get(msg["idiag_state"], str(msg["idiag_state"])),
        local_addr=ipaddress.ip_address(msg["idiag_src"]),
        local_port=msg["idiag_sport"],
        remote_addr=ipaddress.ip_address(msg["idiag_dst"]),
        remote_port=msg["idiag_dport"],
        inode=msg["idiag_inode"],
        uid=msg["idiag_uid"],
        bound_ifindex=msg["idiag_if"],
        mark=_mark(msg.get_attr("INET_DIAG_MARK")),
    )


def _mark(raw: object) -> int | None:
    """INET_DIAG_MARK as pyroute2 gives it ("42:00:00:00", a little-endian u32), None if absent."""
    if raw is None:
        return None
    if isinstance(raw, int):
        return raw
    try:
        return int.from_bytes(bytes.fromhex(str(raw).replace(":", "")), "little")
    except ValueError:
        return None


def socket_owners() -> dict[int, list[tuple[int, str]]]:
    """Socket inode -> [(pid, command name)] of the processes holding it (what ``ss -p`` shows).

    Processes whose descriptors we may not read are skipped, as ``ss`` does.
    """
    owners: dict[int, list[tuple[int, str]]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                holders = owners.setdefault(int(target[8:-1]), [])
                if (pid, comm) not in holders:
                    holders.append((pid, comm))
    return owners
