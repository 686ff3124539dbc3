"""Data-plane proof: will the kernel carry THIS socket's packets through a given SA? (fail closed)

A CHILD_SA covering a flow says nothing about a socket that leaves by another device,
with another mark, from another namespace, or about a datagram that arrived in clear.
So every proof is made for a :class:`~btns_vici.core.records.SocketView` (README: "Socket-exact
truth"), and its answer is a :class:`~btns_vici.core.records.DataplaneProof` or a
:class:`~btns_vici.core.records.NotCarried` with the reason.

One module per data plane (README "Data planes"), in the static table :data:`VERIFIERS`:

* ``kernel-libipsec`` (:mod:`.libipsec`): charon's userspace ESP over the TUN ``ipsec0``;
  the kernel's routing, asked with the socket's own keys, must send it there.
* ``kernel-xfrm`` (:mod:`.xfrm`): the kernel's own SAs and policies, proven by :mod:`btns_vici.xfrm`.

A new data plane is one module with a ``verify(view, ike, child, netns_name)`` and one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .. import rtnl
from ..core.records import LIBIPSEC, LIBIPSEC_DEVICE, XFRM, ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView
from . import libipsec, xfrm
from .libipsec import LIBIPSEC_TABLE

Verdict = DataplaneProof | NotCarried
Verifier = Callable[[SocketView, IkeSA, ChildSA, "str | None"], Verdict]

#: Data plane name -> its proof.
VERIFIERS: Mapping[str, Verifier] = MappingProxyType({LIBIPSEC: libipsec.verify, XFRM: xfrm.verify})

__all__ = [
    "LIBIPSEC",
    "LIBIPSEC_DEVICE",
    "LIBIPSEC_TABLE",
    "VERIFIERS",
    "XFRM",
    "Verdict",
    "Verifier",
    "forget",
    "verify",
]


def verify(view: SocketView, ike: IkeSA, child: ChildSA, dataplane_kind: str, netns_name: str | None = None) -> Verdict:
    """Proof that ``view``'s packets go through ``child`` on data plane ``dataplane_kind``."""
    if view.unknown:
        return NotCarried("cannot read the socket's routing keys: " + "; ".join(view.unknown))
    if not child.installed or not ike.is_established:
        return NotCarried(f"CHILD_SA {child.name}#{child.uniqueid} is {child.state}, IKE_SA {ike.state}")
    verifier = VERIFIERS.get(dataplane_kind)
    if verifier is None:
        return NotCarried(f"no proof exists for data plane {dataplane_kind!r}")
    try:
        return verifier(view, ike, child, netns_name)
    except OSError as exc:  # a netlink error, a vanished namespace: fail closed with the reason
        return NotCarried(f"the {dataplane_kind} data plane could not be read: {exc}")


def forget(netns_name: str | None) -> None:
    """Drop the cached routing view of a namespace (call when the namespace is deleted)."""
    rtnl.forget(netns_name)
