"""Data-plane proof: does the kernel really carry a flow through a given SA? (fail closed)

Two data planes exist (README "Data planes"):

* ``kernel-libipsec`` (this module): charon's userspace ESP over the TUN ``ipsec0``.
  The kernel holds no SA; a flow is carried by the SA when the route lookup for its
  remote address, as an application socket does it (no mark, i.e. not charon's own
  fwmark 0x42 that bypasses table 220), leaves through ``ipsec0`` from table 220,
  and charon reports the CHILD_SA installed in tunnel mode.
* ``kernel-xfrm``: the kernel's own SAs and policies, proven by :mod:`btns_vici.xfrm`
  (written separately). It registers itself with :func:`register` under that name.

The route lookup uses pyroute2 in the backend's network namespace; answers are cached
per remote address and dropped on every rtnetlink route/rule/link/address notification
(or lost notification, ENOBUFS), which is drained without blocking before each answer.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute

from . import netns
from .records import ChildSA, DataplaneProof, IkeSA
from .selectors import Flow, normalize_address

LIBIPSEC = "kernel-libipsec"
XFRM = "kernel-xfrm"
LIBIPSEC_TABLE = 220
LIBIPSEC_DEVICE = "ipsec0"

Verifier = Callable[[Flow, IkeSA, ChildSA, "str | None"], "DataplaneProof | None"]
_verifiers: dict[str, Verifier] = {}

# rtnetlink multicast groups: link, v4/v6 address, v4/v6 route, v4/v6 rule
_GROUPS = 0x1 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | (1 << 18)


def register(kind: str, verifier: Verifier) -> None:
    """Install the verifier for data plane ``kind`` (``kernel-xfrm`` comes from btns_vici.xfrm)."""
    _verifiers[kind] = verifier


def verify(
    flow: Flow, ike: IkeSA, child: ChildSA, dataplane_kind: str, netns_name: str | None = None
) -> DataplaneProof | None:
    """Proof that ``flow`` goes through ``child`` on data plane ``dataplane_kind``, or None."""
    if not child.installed or not ike.is_established:
        return None
    if dataplane_kind == XFRM and XFRM not in _verifiers:
        try:
            from . import xfrm  # noqa: F401  # registers itself
        except ImportError:
            return None
    verifier = _verifiers.get(dataplane_kind)
    return None if verifier is None else verifier(flow, ike, child, netns_name)


class RouteProber:
    """Route lookups in one network namespace, cached until the routing state changes."""

    def __init__(self, netns_name: str | None) -> None:
        self.netns = netns_name
        self._lock = threading.Lock()
        with netns.entered(netns_name):
            self._ipr = IPRoute()
            self._mon = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
        self._mon.bind((0, _GROUPS))
        self._cache: dict[tuple[Any, Any], tuple[int | None, int | None, str | None]] = {}
        self._paths: dict[Any, str] = {}
        self.proofs: dict[tuple[Any, ...], DataplaneProof] = {}  # see verify_libipsec
        self._ifindex: int | None = None

    def close(self) -> None:
        self._ipr.close()
        self._mon.close()

    def _drain(self) -> None:
        changed = False
        while True:
            try:
                if not self._mon.recv(65536):
                    break
                changed = True
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: notifications were lost, so assume everything changed
                changed = True
        if changed:
            self._cache.clear()
            self._paths.clear()
            self.proofs.clear()
            self._ifindex = None

    def tun_index(self) -> int | None:
        with self._lock:
            self._drain()
            if self._ifindex is None:
                with netns.entered(self.netns):  # pyroute2 may open a socket per thread
                    links = self._ipr.link_lookup(ifname=LIBIPSEC_DEVICE)
                self._ifindex = links[0] if links else 0
            return self._ifindex or None

    def route(self, local: Any, remote: Any) -> tuple[int | None, int | None, str | None]:
        """(table, output ifindex, preferred source) of an unmarked lookup towards ``remote``.

        pyroute2 puts RTA_TABLE=254 into every ``get`` request, which the kernel echoes,
        so the table is found by matching the chosen route against a dump of table 220.
        """
        with self._lock:
            self._drain()
            key = (local, remote)
            hit = self._cache.get(key)
            if hit is None:
                # pyroute2 opens its netlink socket per thread: make sure that happens in our netns.
                with netns.entered(self.netns):
                    hit = self._lookup(remote)
                self._cache[key] = hit
            return hit

    def via_tun(self, remote: Any) -> str | None:
        """Where an unmarked packet to ``remote`` goes, if through ipsec0 from table 220; else None.

        One lock, one non-blocking drain and a dict lookup when nothing changed (the hot path).
        """
        with self._lock:
            self._drain()
            hit = self._paths.get(remote)
            if hit is None:
                with netns.entered(self.netns):  # pyroute2 opens its socket per thread
                    if self._ifindex is None:
                        links = self._ipr.link_lookup(ifname=LIBIPSEC_DEVICE)
                        self._ifindex = links[0] if links else 0
                    table, oif, src = self._lookup(remote)
                ok = bool(self._ifindex) and oif == self._ifindex and table == LIBIPSEC_TABLE
                hit = self._paths[remote] = (
                    f"route to {remote} via {LIBIPSEC_DEVICE} (ifindex {oif}) in table {table}"
                    + (f" src {src}" if src else "")
                    if ok
                    else ""
                )
            return hit or None

    def _lookup(self, remote: Any) -> tuple[int | None, int | None, str | None]:
        try:
            msg = self._ipr.route("get", dst=str(remote))[0]
        except Exception:  # unreachable, no route: not carried
            return (None, None, None)
        oif, src = msg.get("RTA_OIF"), msg.get("RTA_PREFSRC")
        fam = socket.AF_INET if remote.version == 4 else socket.AF_INET6
        best: tuple[int, int | None] | None = None
        for r in self._ipr.route("dump", table=LIBIPSEC_TABLE, family=fam):
            if (r.get("RTA_TABLE") or r["table"]) != LIBIPSEC_TABLE:
                continue
            dst = r.get("RTA_DST") or ("0.0.0.0" if fam == socket.AF_INET else "::")
            net = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
            if remote in net and (best is None or r["dst_len"] > best[0]):
                best = (r["dst_len"], r.get("RTA_OIF"))
        table = LIBIPSEC_TABLE if best is not None and best[1] == oif else msg.get("RTA_TABLE")
        return (table, oif, src)


_probers: dict[str | None, RouteProber] = {}
_probers_lock = threading.Lock()


def prober(netns_name: str | None) -> RouteProber:
    """The (cached) prober of a network namespace."""
    p = _probers.get(netns_name)
    if p is None:
        with _probers_lock:
            p = _probers.get(netns_name)
            if p is None:
                p = _probers[netns_name] = RouteProber(netns_name)
    return p


def forget(netns_name: str | None) -> None:
    """Drop the cached prober of a namespace (call when the namespace is deleted)."""
    with _probers_lock:
        p = _probers.pop(netns_name, None)
    if p is not None:
        p.close()


def verify_libipsec(flow: Flow, ike: IkeSA, child: ChildSA, netns_name: str | None) -> DataplaneProof | None:
    """kernel-libipsec: tunnel-mode SA installed and the flow's route leaves via ipsec0, table 220.

    While nothing changes, the same DataplaneProof object is returned for the same
    route and CHILD_SA (callers may memoize on its identity).
    """
    if child.mode.upper() != "TUNNEL":
        return None
    p = prober(netns_name)
    remote = normalize_address(flow.remote_addr)
    path = p.via_tun(remote)
    if path is None:
        return None
    key = (remote, child.uniqueid, child.spi_out, child.state)
    proof = p.proofs.get(key)
    if proof is None:
        if len(p.proofs) > 4096:  # rekeyed CHILD_SAs leave old keys behind
            p.proofs.clear()
        proof = p.proofs[key] = DataplaneProof(
            dataplane=LIBIPSEC,
            detail=f"{path}; charon reports CHILD_SA {child.name}#{child.uniqueid} {child.state} in tunnel mode",
            spi_out=child.spi_out,
            reqid=child.reqid,
        )
    return proof


register(LIBIPSEC, verify_libipsec)
