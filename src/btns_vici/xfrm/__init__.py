"""The kernel's XFRM SAD/SPD over netlink, and per-socket IPsec policies.

Dumps go over a plain netlink socket (pyroute2's NetlinkSocket refuses to run inside a
running asyncio loop); :mod:`btns_vici.xfrm._wire` decodes the bytes into the frozen records of
:mod:`btns_vici.xfrm._records`. Notifications come from :mod:`btns_vici.xfrm._monitor`,
per-socket policies from :mod:`btns_vici.xfrm._socket`; this module is the public face of
all of them. Nothing here ever exposes key bytes. ``netns`` arguments name a network
namespace under /run/netns (entered with setns in the calling thread); None is the caller's.

This is the data-plane evidence behind a pToken read from a socket (draft-ietf-btns-c-api-04
section 2.3.3, ``ipsec_get_socket_pToken``, Figure 9; the attributes of section 2.3.2, Figure 8):
:func:`find_state` and :func:`policies_covering` tell whether the kernel really carries a
flow through an SA. :func:`set_socket_policy` is the kernel half of attaching a pToken's
requirements to a socket (``ipsec_set_socket_pToken``, section 2.3.3, Figure 9).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

from .. import forksafe
from .. import netns as _netns
from ..core.records import IN, OUT, XFRM, ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView
from ..core.selectors import Flow, IPAddress
from . import _socket
from . import _wire as wire
from ._monitor import GROUPS, XfrmMonitor, watch
from ._records import (
    IPPROTO_AH,
    IPPROTO_COMP,
    IPPROTO_ESP,
    XFRM_INF,
    XFRM_POLICY_MAX,
    Acquire,
    Algorithm,
    Current,
    Encap,
    Lifetime,
    Mark,
    Selector,
    Stats,
    Template,
    XfrmEvent,
    XfrmPolicy,
    XfrmState,
)
from ._socket import (
    IP_XFRM_POLICY,
    IPV6_XFRM_POLICY,
    MODES,
    PROTOS,
    SocketPolicy,
    clear_socket_policy,
    socket_policies,
    socket_template,
)
from ._socket import set_socket_policy as _set_socket_policy
from ._wire import XfrmDecodeWarning

NETLINK_XFRM, NLM_F_REQUEST, NLM_F_DUMP = 6, 0x1, 0x300  # linux/netlink.h
_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP = 270, 1

__all__ = [
    "GROUPS",
    "IPPROTO_AH",
    "IPPROTO_COMP",
    "IPPROTO_ESP",
    "IPV6_XFRM_POLICY",
    "IP_XFRM_POLICY",
    "XFRM_INF",
    "XFRM_POLICY_MAX",
    "Acquire",
    "Algorithm",
    "Current",
    "Encap",
    "Lifetime",
    "Mark",
    "Selector",
    "SocketPolicy",
    "Stats",
    "Template",
    "XfrmDecodeWarning",
    "XfrmEvent",
    "XfrmMonitor",
    "XfrmPolicy",
    "XfrmState",
    "clear_socket_policy",
    "dump_policies",
    "dump_states",
    "find_state",
    "policies_covering",
    "prove_flow",
    "prove_socket",
    "set_socket_policy",
    "socket_policies",
    "socket_template",
    "watch",
]


_NLMSGHDR = struct.Struct("=IHHII")
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_DUMP_DEADLINE = 5.0


def _dump(msg_type: int, netns: str | None) -> Iterator[XfrmState | XfrmPolicy | XfrmEvent | None]:
    """One XFRM dump over a plain netlink socket opened in ``netns`` (no event loop, no helper process)."""
    with _netns.entered(netns):  # setns in this thread; the socket keeps the namespace
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_XFRM)
    try:
        sock.bind((0, 0))
        sock.settimeout(_DUMP_DEADLINE)
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size, msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0))
        deadline = time.monotonic() + _DUMP_DEADLINE
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, "XFRM dump did not finish in time")
            data = sock.recv(1 << 20)
            for raw in wire.split_messages(data):
                _length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(raw)
                if mtype == _NLMSG_DONE:
                    return
                if mtype == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", raw, _NLMSGHDR.size)
                    if code:
                        raise OSError(-code, f"XFRM dump: {os.strerror(-code)}")
                    continue
                yield wire.decode_message(raw)
    finally:
        sock.close()


def _socket_policy_indexes(sock: socket.socket, direction: str) -> set[int] | None:
    """SPD indexes of the socket policies for ``direction`` in ``sock``'s namespace (None: unreadable)."""
    try:
        ns_fd = fcntl.ioctl(sock.fileno(), _socket.SIOCGSKNS)
    except OSError:
        return None
    try:
        return {p.index for p in dump_policies(f"/proc/self/fd/{ns_fd}") if p.is_socket and p.direction == direction}
    except OSError:
        return None
    finally:
        os.close(ns_fd)


def set_socket_policy(
    sock: socket.socket,
    direction: str,
    templates: Sequence[Template | str],
    level: str = "required",
    reqid: int = 0,
) -> SocketPolicy:
    """:func:`btns_vici.xfrm._socket.set_socket_policy` (same arguments), remembering the policy's SPD index.

    The index is learnt from the namespace's SPD before and after, so that the data-plane
    proof can tell this process's socket policies from those of others (README "Socket-exact
    truth"); when another process added one meanwhile it stays unknown (fail closed).
    """
    before = _socket_policy_indexes(sock, direction)
    policy = _set_socket_policy(sock, direction, templates, level, reqid)
    after = _socket_policy_indexes(sock, direction)
    new = (after - before) if before is not None and after is not None else set()
    if len(new) == 1:  # unambiguous: no other process added one meanwhile
        policy = dataclasses.replace(policy, index=new.pop())
        _socket.record(sock, policy)
    return policy


def dump_states(netns: str | None = None) -> list[XfrmState]:
    """Every SA in the kernel's SAD (``ip xfrm state``), in the namespace ``netns`` (a name under /run/netns)."""
    return [r for r in _dump(wire.XFRM_MSG_GETSA, netns) if isinstance(r, XfrmState)]


def dump_policies(netns: str | None = None) -> list[XfrmPolicy]:
    """Every SPD entry (``ip xfrm policy``), per-socket policies included (:attr:`XfrmPolicy.is_socket`)."""
    return [r for r in _dump(wire.XFRM_MSG_GETPOLICY, netns) if isinstance(r, XfrmPolicy)]


def find_state(spi: int, proto: int | str, daddr: IPAddress | str, netns: str | None = None) -> XfrmState | None:
    """The SA identified by (SPI in host order, protocol "esp"/"ah"/"comp" or number, destination)."""
    proto = PROTOS[proto] if isinstance(proto, str) else proto
    daddr = ipaddress.ip_address(daddr)
    return next((s for s in dump_states(netns) if (s.spi, s.proto, s.daddr) == (spi, proto, daddr)), None)


def policies_covering(
    flow: Flow, direction: str = "out", netns: str | None = None, *, include_socket: bool = False
) -> list[XfrmPolicy]:
    """Global SPD entries whose selector selects ``flow`` in ``direction``, best (lowest priority) first.

    Per-socket policies are left out unless ``include_socket``: a dump does not say
    which socket they belong to (see :func:`socket_policies` for our own sockets).
    """
    pols = [
        p
        for p in dump_policies(netns)
        if p.direction == direction and (include_socket or not p.is_socket) and p.sel.covers(flow, direction)
    ]
    return sorted(pols, key=lambda p: (p.priority, p.index))


# ---- data-plane proof (btns_vici.dataplane, "kernel-xfrm") ----


def _proto_num(name: str) -> int:
    return PROTOS.get(name.lower(), -1)


IKE_PORTS = (500, 4500)


_XFRM_MSG_NEWSPDINFO, _XFRM_MSG_GETSPDINFO, _XFRMA_SPD_INFO = 36, 37, 1


def decode_spdinfo(data: bytes) -> tuple[int, ...] | None:
    """(in, out, fwd, socket in, socket out, socket fwd) policy counts from an XFRM_MSG_NEWSPDINFO reply."""
    for raw in wire.split_messages(data):
        _length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(raw)
        if mtype != _XFRM_MSG_NEWSPDINFO:
            continue
        pos = _NLMSGHDR.size + 4  # u32 flags
        while pos + 4 <= len(raw):
            alen, atype = struct.unpack_from("=HH", raw, pos)
            if alen < 4:
                break
            if atype & 0x3FFF == _XFRMA_SPD_INFO and alen >= 4 + 24:
                return struct.unpack_from("=6I", raw, pos + 4)
            pos += (alen + 3) & ~3
    return None


class _SpdView:
    """The SAD, the SPD and the IKE sockets of one namespace, cached until they change.

    Global SAs and policies are announced on the XFRM multicast groups; per-socket policies
    are not (setsockopt installs them silently), so the SPD's policy counts
    (XFRM_MSG_GETSPDINFO, one small request) are compared too: a socket policy added or
    removed anywhere in the namespace refreshes the snapshot.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        with _netns.entered(netns):
            self._mon = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_XFRM
            )
            self._info = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_XFRM)
            st = os.stat("/proc/thread-self/ns/net")
        self.netns_id = (st.st_dev, st.st_ino)
        self._info.bind((0, 0))
        self._info.settimeout(2.0)
        self._mon.bind((0, 0))
        for group in ("sa", "policy", "expire"):
            self._mon.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, GROUPS[group])
        self._lock = threading.Lock()
        self._counts: tuple[int, ...] | None = None
        self._snapshot: tuple[dict[tuple[int, int, IPAddress], XfrmState], list[XfrmPolicy], int] | None = None

    def close(self) -> None:
        self._mon.close()
        self._info.close()

    def _spd_counts(self) -> tuple[int, ...] | None:
        try:
            self._info.send(_NLMSGHDR.pack(_NLMSGHDR.size + 4, _XFRM_MSG_GETSPDINFO, NLM_F_REQUEST, 1, 0) + bytes(4))
            return decode_spdinfo(self._info.recv(1 << 16))
        except OSError:
            return None  # unknown: the caller re-dumps

    def snapshot(self) -> tuple[dict[tuple[int, int, IPAddress], XfrmState], list[XfrmPolicy], int]:
        """(SAs by (spi, proto, daddr), policies, IKE sockets) as of now."""
        with self._lock:
            changed = False
            while True:
                try:
                    if not self._mon.recv(1 << 16):
                        break
                    changed = True
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: lost notifications, so everything may have changed
                    changed = True
            counts = self._spd_counts()
            if changed or self._snapshot is None or counts is None or counts != self._counts:
                states = {(s.spi, s.proto, s.daddr): s for s in dump_states(self.netns)}
                self._snapshot = (states, dump_policies(self.netns), _ike_sockets(self.netns))
                self._counts = counts
            return self._snapshot


def _ike_sockets(netns: str | None) -> int:
    """UDP sockets bound to the IKE ports in ``netns`` (the daemon's; each carries bypass socket policies)."""
    count = 0
    with _netns.entered(netns):
        for name in ("udp", "udp6"):
            try:
                with open(f"/proc/thread-self/net/{name}") as f:
                    lines = f.readlines()[1:]
            except OSError:
                continue
            for line in lines:
                local = line.split()[1]
                if int(local.rsplit(":", 1)[1], 16) in IKE_PORTS:
                    count += 1
    return count


_views: forksafe.PerNamespace[_SpdView] = forksafe.PerNamespace(_SpdView, _SpdView.close)


def _spd(netns: str | None) -> _SpdView:
    return _views.get(netns)


def forget(netns: str | None) -> None:
    """Drop the cached SAD/SPD of a namespace (call when it is deleted)."""
    _views.forget(netns)


def _mark_matches(mark: Mark | None, value: int) -> bool:
    return mark is None or (value & mark.mask) == (mark.value & mark.mask)


def _best(policies: list[XfrmPolicy], flow: Flow, direction: str, mark: int, ifindex: int | None) -> XfrmPolicy | None:
    """The global policy the kernel picks for ``flow`` (lowest priority, then oldest), as it matches.

    ``ifindex`` is the device the packet leaves (out) or arrives (in) by; None: any device,
    so only policies that do not name one can be relied upon.
    """
    covering = [
        p
        for p in policies
        if not p.is_socket
        and p.direction == direction
        and p.if_id == 0
        and p.type == 0
        and _mark_matches(p.mark, mark)
        and p.sel.covers(flow, direction)
        and (p.sel.ifindex == 0 or (ifindex is not None and p.sel.ifindex == ifindex))
    ]
    return min(covering, key=lambda p: (p.priority, p.index), default=None)


def _requires(policy_templates: tuple[Template, ...], proto: int, mode: int, reqid: int) -> bool:
    return any(
        t.proto == proto and t.mode == mode and t.reqid in (reqid, 0) and not t.optional for t in policy_templates
    )


def prove_socket(view: SocketView, ike: IkeSA, child: ChildSA, netns: str | None = None) -> DataplaneProof | NotCarried:
    """Proof that the kernel carries ``view``'s packets through ``child`` (kernel XFRM), or why not.

    Out: the policy the kernel uses for this socket (its own socket policy if we set one,
    else the best global policy for its flow, mark and output device) must require the
    CHILD_SA's protocol, mode and reqid, and both SAs must be in the SAD (matching the
    socket's mark). Socket policies installed by other processes cannot be attributed to
    sockets (the kernel cannot be asked): while more exist than the IKE daemon's sockets
    account for, no socket without a policy of ours is proven. In: the inbound policy
    (ours, else the best global one) must require it too, otherwise what the socket
    receives may have arrived in clear (``inbound=False``; for a received datagram: not
    protected).
    """
    from .. import rtnl

    flow = view.flow
    proto, mode = _proto_num(child.protocol), MODES.get(child.mode.lower(), -1)
    states, policies, ike_socks = _spd(netns).snapshot()
    out_sa = states.get((child.spi_out, proto, ike.remote_host))
    in_sa = states.get((child.spi_in, proto, ike.local_host))
    if out_sa is None or in_sa is None:
        return NotCarried(
            f"the kernel SAD lacks the CHILD_SA's SAs (spi 0x{child.spi_out:08x} out, 0x{child.spi_in:08x} in)"
        )
    reqid = out_sa.reqid
    if child.reqid not in (reqid, 0) or in_sa.reqid != reqid:
        return NotCarried(f"reqid mismatch: charon {child.reqid}, kernel {out_sa.reqid}/{in_sa.reqid}")
    facts = view.facts()
    sock_pols = [p for p in policies if p.is_socket]
    present = {p.index for p in sock_pols}
    _socket.prune(view.netns, present)
    # This socket's own policies, as we installed them, if still in force (index still in the SPD).
    mine = {
        d: p
        for d, p in (_socket.recorded(view.key).items() if view.key is not None else ())
        if p.index is not None and p.index in present
    }
    needed = {"out", "in"} - ({"in"} if view.direction == OUT else {"out"} if view.direction == IN else set())
    census = ""
    if not needed <= set(mine):
        # Socket policies of other processes (the kernel cannot say which socket carries them). Those
        # requiring this very SA cannot make any socket bypass it; the IKE daemon's sockets each carry
        # a bypass pair. Any other one might be on this socket: then nothing can be proven.
        ours = _socket.recorded_indexes(view.netns)
        for d in sorted(needed - set(mine)):
            risky = [
                p
                for p in sock_pols
                if p.direction == d and p.index not in ours and not _requires(p.templates, proto, mode, reqid)
            ]
            if len(risky) > ike_socks:
                idx = ", ".join(f"{p.index} ({'bypass' if not p.templates else 'other templates'})" for p in risky)
                return NotCarried(
                    f"{len(risky) - ike_socks} per-socket XFRM {d} policies that do not require this SA were set "
                    f"by other processes (socket policy indexes {idx}; {ike_socks} IKE daemon sockets account for "
                    f"the rest): the kernel cannot say which sockets carry them, so this socket cannot be proven "
                    f"({facts})"
                )
        census = f"; socket policy census: {len(sock_pols)} in the SPD, none unexplained"
    rt = rtnl.routing(netns)
    out_text = ""
    if view.direction != IN:
        ans = rt.route_of(view)
        if ans.error:
            return NotCarried(f"the kernel has no route for this socket's packets (errno {ans.error}; {facts})")
        if not _mark_matches(out_sa.mark, view.mark):
            return NotCarried(f"the outbound SA's mark does not match the socket's mark 0x{view.mark:x}")
        own = mine.get("out")
        if own is not None:
            if not _requires(own.templates, proto, mode, reqid):
                return NotCarried(
                    f"this socket carries its own out policy that does not require the SA "
                    f"(templates {[t.level for t in own.templates] or 'none: bypass'}; {facts})"
                )
            out_text = f"the socket's own out policy requires {child.protocol} reqid {reqid}"
        else:
            best = _best(policies, flow, "out", view.mark, ans.oif)
            if best is None or best.action != 0 or not _requires(best.templates, proto, mode, reqid):
                what = (
                    "no out policy covers it"
                    if best is None
                    else (
                        f"the out policy index {best.index} (priority {best.priority}, action {best.action_name}) "
                        "does not require it"
                    )
                )
                return NotCarried(
                    f"the kernel will not send this socket's packets through the SA: {what} "
                    f"({facts}, route dev {rt.ifname(ans.oif)})"
                )
            out_text = f"SPD out policy index {best.index} (priority {best.priority}) requires it"
    inbound, in_text = True, ""
    if view.direction != OUT:
        own_in = mine.get("in")
        if own_in is not None:
            inbound = _requires(own_in.templates, proto, mode, reqid)
            in_text = f"the socket's own in policy {'requires' if inbound else 'does NOT require'} it"
        else:
            best = _best(policies, flow, "in", 0, view.arrival_ifindex)
            inbound = best is not None and best.action == 0 and _requires(best.templates, proto, mode, reqid)
            in_text = (
                f"SPD in policy index {best.index} {'requires' if inbound else 'does NOT require'} it"
                if best is not None
                else "no in policy covers it: clear packets are accepted"
            )
        if view.direction == IN and not inbound:
            return NotCarried(f"the kernel accepts such datagrams in clear: {in_text} ({facts})")
    detail = (
        f"kernel SAD: {out_sa.proto_name} SA spi 0x{out_sa.spi:08x} -> {out_sa.daddr} "
        f"({out_sa.current.bytes} bytes, {out_sa.current.packets} packets) and spi 0x{in_sa.spi:08x} "
        f"-> {in_sa.daddr}, reqid {reqid}, {out_sa.mode_name} mode; "
        + "; ".join(t for t in (out_text, in_text) if t)
        + census
        + f"; socket {facts}"
    )
    return DataplaneProof(dataplane=XFRM, detail=detail, spi_out=out_sa.spi, reqid=reqid, inbound=inbound)


def prove_flow(flow: Flow, ike: IkeSA, child: ChildSA, netns: str | None = None) -> DataplaneProof | None:
    """:func:`prove_socket` for a bare flow (an unmarked, unbound socket of ``netns``), None if not carried."""
    with _netns.entered(netns):
        st = os.stat("/proc/thread-self/ns/net")
    verdict = prove_socket(SocketView(flow=flow, netns=(st.st_dev, st.st_ino)), ike, child, netns)
    return verdict if isinstance(verdict, DataplaneProof) else None
