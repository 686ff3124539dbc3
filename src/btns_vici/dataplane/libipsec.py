"""The ``kernel-libipsec`` data plane: charon's userspace ESP over the TUN ``ipsec0``.

The kernel holds no SA: what the kernel routes to ``ipsec0`` libipsec encrypts (or drops
when no SA covers it); what leaves by any other device is clear. So the kernel is asked,
with the socket's own keys (bound device, mark, uid, TOS, protocol, ports, source), where
its packets go; they must go to ``ipsec0``. Received data: a datagram counts only when it
arrived on ``ipsec0``; for a connection the kernel is asked whether a clear packet from the
peer's address on any other link would be delivered to it (it is not when the socket is
bound to ``ipsec0``, or routing refuses it, see README "Inbound filter"). If it would, what
the socket receives has no integrity protection and the proof says so.
"""

from __future__ import annotations

import os

from .. import rtnl
from ..core.records import IN, LIBIPSEC, LIBIPSEC_DEVICE, OUT, ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView
from ..core.selectors import normalize_address

#: The routing table charon's kernel-libipsec installs its routes into.
LIBIPSEC_TABLE = 220

Verdict = DataplaneProof | NotCarried


def verify(view: SocketView, ike: IkeSA, child: ChildSA, netns_name: str | None) -> Verdict:
    """kernel-libipsec: the kernel sends this socket's packets into ipsec0 (and only ipsec0's reach it).

    While nothing changes, the same DataplaneProof object is returned for the same
    answers and CHILD_SA (callers may memoize on its identity).
    """
    if child.mode.upper() != "TUNNEL":
        return NotCarried(f"kernel-libipsec carries only tunnel-mode SAs, CHILD_SA is {child.mode}")
    rt = rtnl.routing(netns_name)
    rt.fresh()  # one non-blocking drain: every answer below is as of now
    memo_key = (view, child.uniqueid, child.spi_out, child.state, child.name)
    hit = rt.memo.get(memo_key)
    if hit is not None:
        return hit  # type: ignore[return-value]
    verdict = _prove_libipsec(rt, view, child)
    if len(rt.memo) > 4096:  # many sockets, or rekeyed CHILD_SAs leave old keys behind
        rt.memo.clear()
    rt.memo[memo_key] = verdict
    return verdict


def _prove_libipsec(rt: rtnl.RoutingView, view: SocketView, child: ChildSA) -> Verdict:
    tun = rt.ifindex(LIBIPSEC_DEVICE)
    if tun is None:
        return NotCarried(f"no {LIBIPSEC_DEVICE} device in the data plane's namespace")
    facts = view.facts()
    route_text = ""
    if view.direction != IN:
        if view.dontroute:
            return NotCarried(
                "SO_DONTROUTE is set: its packets skip the gateway routes, charon's table "
                f"{LIBIPSEC_TABLE} included, and may leave in clear ({facts})"
            )
        ans = rt.route_of(view)
        if ans.error:
            return NotCarried(f"the kernel has no route for this socket's packets ({_err(ans.error)}; {facts})")
        if ans.oif != tun:
            return NotCarried(
                f"the kernel sends this socket's packets via {rt.ifname(ans.oif)} (ifindex {ans.oif}, "
                f"table {ans.table}), not {LIBIPSEC_DEVICE}: they leave in clear ({facts})"
            )
        route_text = f"kernel route for this socket via {LIBIPSEC_DEVICE} (ifindex {tun}) table {ans.table}" + (
            f" src {ans.prefsrc}" if ans.prefsrc else ""
        )
    inbound, inbound_text = True, ""
    if view.direction == IN:
        if view.arrival_ifindex != tun:
            return NotCarried(
                f"the datagram arrived on {rt.ifname(view.arrival_ifindex)} (ifindex {view.arrival_ifindex}), "
                f"not {LIBIPSEC_DEVICE}: it did not come through an SA ({facts})"
            )
        inbound_text = f"arrived decrypted on {LIBIPSEC_DEVICE} (ifindex {tun})"
    elif view.direction != OUT:
        inbound, inbound_text = _inbound(rt, view, tun)
    detail = "; ".join(t for t in (route_text, inbound_text) if t)
    return DataplaneProof(
        dataplane=LIBIPSEC,
        detail=f"{detail}; charon reports CHILD_SA {child.name}#{child.uniqueid} {child.state} in tunnel "
        f"mode; socket {facts}",
        spi_out=child.spi_out,
        reqid=child.reqid,
        inbound=inbound,
    )


def _inbound(rt: rtnl.RoutingView, view: SocketView, tun: int) -> tuple[bool, str]:
    """Would a clear packet from the peer's address, arriving on another link, reach this socket?"""
    if view.bound_ifindex == tun:
        return True, (f"inbound: bound to {LIBIPSEC_DEVICE}, the kernel delivers it only what arrived decrypted there")
    flow = view.flow
    local, remote = normalize_address(flow.local_addr), normalize_address(flow.remote_addr)
    links = rt.links()
    if view.bound_ifindex:  # a bound socket only receives what arrives on its own device
        candidates = [links[view.bound_ifindex]] if view.bound_ifindex in links else []
    else:
        candidates = [link for link in links.values() if link.index != tun and link.up and link.name != "lo"]
    open_links = []
    for link in candidates:
        ans = rt.lookup(local, remote, iif=link.index, proto=flow.proto, sport=flow.remote_port, dport=flow.local_port)
        if ans.delivered_locally:
            open_links.append(link.name)
    if open_links:
        return False, (
            f"inbound NOT protected: a clear packet from {remote} arriving on {', '.join(open_links)} "
            f"would be delivered to this socket (no integrity for what it receives; bind it to "
            f"{LIBIPSEC_DEVICE} or install the inbound filter)"
        )
    return True, f"inbound: the kernel refuses clear packets from {remote} on every other link"


def _err(code: int) -> str:
    return f"{os.strerror(code)} (errno {code})"
