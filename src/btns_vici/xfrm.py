"""The kernel's XFRM SAD/SPD over netlink, and per-socket IPsec policies.

pyroute2 does the netlink plumbing (socket, dump requests, multi-part replies, errors);
:mod:`btns_vici._xfrm_wire` decodes the bytes into the frozen records of
:mod:`btns_vici._xfrm_records`. Notifications come from :mod:`btns_vici._xfrm_monitor`,
per-socket policies from :mod:`btns_vici._xfrm_socket`; this module is the public face of
all of them. Nothing here ever exposes key bytes. ``netns`` arguments name a network
namespace under /run/netns (entered with setns in the calling thread); None is the caller's.

This is the data-plane evidence behind a pToken (draft-ietf-btns-c-api-04 section 5):
:func:`find_state` and :func:`policies_covering` tell whether the kernel really carries a
flow through an SA. :func:`set_socket_policy` is the kernel half of "set a pToken's
requirements on a socket" (``ipsec_set_policy``, section 6).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from pyroute2.netlink import NETLINK_XFRM, NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.nlsocket import Marshal, NetlinkSocket

from . import _xfrm_wire as wire
from . import dataplane
from . import netns as _netns
from ._xfrm_monitor import GROUPS, XfrmMonitor, watch
from ._xfrm_records import (
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
from ._xfrm_socket import (
    IP_XFRM_POLICY,
    IPV6_XFRM_POLICY,
    MODES,
    PROTOS,
    SocketPolicy,
    clear_socket_policy,
    set_socket_policy,
    socket_policies,
    socket_template,
)
from ._xfrm_wire import XfrmDecodeWarning
from .records import ChildSA, DataplaneProof, IkeSA
from .selectors import Flow, IPAddress

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
    "set_socket_policy",
    "socket_policies",
    "socket_template",
    "watch",
]



class _RawMessage(nlmsg):
    """An XFRM message kept as raw bytes for :func:`btns_vici._xfrm_wire.decode_message`."""

    fields = ()

    def decode_nlas(self, offset: int) -> None:  # the wire module walks the attributes
        return None

    @property
    def raw(self) -> bytes:
        return bytes(self.data[self.offset : self.offset + self["header"]["length"]])


class _XfrmMarshal(Marshal):
    default_message_class = _RawMessage


def _dump(msg_type: int, netns: str | None) -> Iterator[XfrmState | XfrmPolicy | XfrmEvent | None]:
    with _netns.entered(netns):  # setns in this thread: much cheaper than pyroute2's helper process
        sock = NetlinkSocket(family=NETLINK_XFRM)
    try:
        sock.set_marshal(_XfrmMarshal())
        for msg in sock.nlm_request(nlmsg(), msg_type, NLM_F_REQUEST | NLM_F_DUMP):
            if isinstance(msg, _RawMessage):
                yield wire.decode_message(msg.raw)
    finally:
        sock.close()


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
        p for p in dump_policies(netns)
        if p.direction == direction and (include_socket or not p.is_socket) and p.sel.covers(flow, direction)
    ]
    return sorted(pols, key=lambda p: (p.priority, p.index))


# ---- data-plane proof (btns_vici.dataplane, "kernel-xfrm") ----

def _proto_num(name: str) -> int:
    return PROTOS.get(name.lower(), -1)


def prove_flow(flow: Flow, ike: IkeSA, child: ChildSA, netns: str | None = None) -> DataplaneProof | None:
    """Proof that the kernel carries ``flow`` through ``child``, or None (fail closed).

    Both directions must hold: the best global policy covering the flow (out, then in)
    is an "allow" whose template asks for the CHILD_SA's protocol, mode and reqid, and
    the SAs with the CHILD_SA's outbound and inbound SPIs are in the SAD with that reqid.
    Per-socket policies are not considered: the flow does not say which socket it is.
    """
    proto, mode = _proto_num(child.protocol), MODES.get(child.mode.lower(), -1)
    states = {(s.spi, s.proto, s.daddr): s for s in dump_states(netns)}
    out_sa = states.get((child.spi_out, proto, ike.remote_host))
    in_sa = states.get((child.spi_in, proto, ike.local_host))
    if out_sa is None or in_sa is None or child.reqid not in (out_sa.reqid, 0) or in_sa.reqid != out_sa.reqid:
        return None
    policies = dump_policies(netns)
    chosen = {}
    for direction in ("out", "in"):
        covering = sorted(
            (p for p in policies if not p.is_socket and p.direction == direction and p.sel.covers(flow, direction)),
            key=lambda p: (p.priority, p.index),
        )
        best = covering[0] if covering else None
        if best is None or best.action != 0 or not any(
            t.proto == proto and t.mode == mode and t.reqid == out_sa.reqid and not t.optional for t in best.templates
        ):
            return None
        chosen[direction] = best
    detail = (
        f"kernel SAD: {out_sa.proto_name} SA spi 0x{out_sa.spi:08x} -> {out_sa.daddr} "
        f"({out_sa.current.bytes} bytes, {out_sa.current.packets} packets) and spi 0x{in_sa.spi:08x} "
        f"-> {in_sa.daddr}, reqid {out_sa.reqid}, {out_sa.mode_name} mode; SPD: out policy index "
        f"{chosen['out'].index} (priority {chosen['out'].priority}) and in policy index {chosen['in'].index} "
        f"require it"
    )
    return DataplaneProof(dataplane=dataplane.XFRM, detail=detail, spi_out=out_sa.spi, reqid=out_sa.reqid)


dataplane.register(dataplane.XFRM, prove_flow)
